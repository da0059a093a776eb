//! Admin commands (NVMe base 2.0 §5): Identify, Get Log Page, Set/Get Features, Keep Alive,
//! Asynchronous Event Request, Abort.

use crate::config::*;
use crate::errlog::{ErrAt, at};
use crate::fabrics::VERSION;
use crate::io::copy_limits;
use crate::target::*;
use keel_nvme::identify::{
    self, Cmic, Ctratt, IdentifyCommand, IdentifyController, IdentifyNamespace, Lpa, NsIdentifiers,
    Oacs, Ocfs, Oncs, Vwc, cns,
};
use keel_nvme::io::{AbortCommand, FeaturesCommand};
use keel_nvme::log::{self, Effects, ErrorLogEntry, GetLogPageCommand, discovery};
use keel_nvme::opcode::async_event;
use keel_nvme::{AdminOpcode, FeatureId, IoOpcode, LogPageId, Status};

/// KAS: keep-alive granularity in 100 ms units (1 s).
const KAS: u16 = 10;
/// ACL: Abort commands outstanding at most, 0's based (4).
const ACL: u8 = 3;
/// Nanoseconds per minute and per hour (SMART busy time and power-on hours).
const MINUTE_NS: u64 = 60_000_000_000;
const HOUR_NS: u64 = 60 * MINUTE_NS;

impl Target {
    pub(crate) fn admin(
        &mut self,
        now: Instant,
        qi: usize,
        ci: usize,
        req: Request,
    ) -> Option<Response> {
        if sqe_is_fabrics(&req.sqe) {
            return Some(self.fabrics_admin(now, qi, ci, req));
        }
        let (ready, discovery) = match self.ctrls.get(ci) {
            Some(Some(c)) => (c.cc.en() && c.csts.rdy(), c.subsys == DISCOVERY),
            _ => return Some(self.respond(qi, req, Status::INTERNAL_ERROR, 0)),
        };
        if !ready {
            return Some(self.respond(qi, req, Status::COMMAND_SEQUENCE_ERROR, 0));
        }
        if req.sqe.fuse() != 0 {
            let e = ErrAt::field(at::FLAGS, 0);
            return Some(self.respond_at(qi, req, Status::INVALID_FIELD, e));
        }
        let op = AdminOpcode::from_u8(req.sqe.opcode);
        let r = match op {
            Some(AdminOpcode::Identify) => self.identify(qi, ci, req),
            Some(AdminOpcode::GetLogPage) => self.get_log_page(now, qi, ci, req),
            Some(AdminOpcode::SetFeatures) => self.set_features(qi, ci, req),
            Some(AdminOpcode::GetFeatures) => self.get_features(qi, ci, req),
            Some(AdminOpcode::KeepAlive) => self.respond(qi, req, Status::SUCCESS, 0),
            Some(AdminOpcode::AsyncEventRequest) => return self.aer(qi, ci, req),
            Some(AdminOpcode::Abort) if !discovery => return self.abort(now, qi, ci, req),
            _ => self.respond(qi, req, Status::INVALID_OPCODE, 0),
        };
        Some(r)
    }

    /// Copies `data` (which sits at byte `data_off` of a structure of `total` bytes) into
    /// the window `[win_off, win_off + len)` of the host buffer.
    fn put_data(
        buf: &mut Option<keel_storage::IoBuf>,
        win_off: u64,
        len: u32,
        data: &[u8],
        data_off: u64,
    ) {
        if let Some(b) = buf.as_mut() {
            let n = (len as usize).min(b.capacity());
            if let Some(out) = b.capacity_mut().get_mut(..n) {
                log::copy_window(out, win_off, data, data_off);
            }
        }
    }

    /// Prepares the host buffer for `len` bytes of returned data: checks it exists and holds
    /// `len` bytes, zeroes it.
    fn data_in(req: &mut Request, len: u32) -> Result<(), Status> {
        if len == 0 || req.data_len < len {
            return Err(Status::DATA_SGL_LENGTH_INVALID);
        }
        match req.buf.as_mut() {
            Some(b) if b.capacity() >= len as usize => {
                b.set_len(len as usize);
                b.as_mut_slice().fill(0);
                Ok(())
            }
            _ => Err(Status::DATA_SGL_LENGTH_INVALID),
        }
    }

    fn data_response(&mut self, qi: usize, req: Request, len: u32) -> Response {
        let mut r = self.respond(qi, req, Status::SUCCESS, 0);
        r.data_len = len;
        r
    }

    pub(crate) fn identify_controller(&self, ci: usize) -> IdentifyController {
        let Some(Some(c)) = self.ctrls.get(ci) else {
            return IdentifyController::default();
        };
        let s = self.subsystems.get(c.subsys);
        let discovery = c.subsys == DISCOVERY;
        // A command is offered when every namespace has it (a host sees one ONCS for all).
        let mut oncs = Oncs::COMPARE | Oncs::DSM | Oncs::WRITE_ZEROES | Oncs::VERIFY;
        if self.scratch_size().is_some() {
            oncs |= Oncs::COPY;
        }
        let mut vwc = Vwc::empty();
        if let Some(s) = s {
            for n in s.namespaces.iter().flatten().filter(|n| n.active) {
                if !n.caps.compare {
                    oncs &= !Oncs::COMPARE;
                }
                if !self.write_zeroes_ok(n.caps, n.geometry) {
                    oncs &= !Oncs::WRITE_ZEROES;
                }
                if !n.caps.verify {
                    oncs &= !Oncs::VERIFY;
                }
                if copy_limits(&self.limits, self.scratch_size(), n.geometry).is_none() {
                    oncs &= !Oncs::COPY;
                }
                if n.caps.volatile_write_cache {
                    // Present; Flush with NSID FFFFFFFFh not supported (bits 2:1 = 10b).
                    vwc = Vwc::PRESENT | Vwc::FLUSH_BROADCAST_REPORTED;
                }
            }
        }
        let (sn, mn, nqn) = match s {
            Some(s) => (s.serial.as_str(), s.model.as_str(), s.nqn.as_str()),
            None => ("", "", ""),
        };
        IdentifyController {
            vid: self.identity.vid,
            ssvid: self.identity.ssvid,
            sn: identify::ascii_field(sn),
            mn: identify::ascii_field(mn),
            fr: identify::ascii_field(&self.identity.firmware),
            rab: 6,
            ieee: self.identity.ieee,
            cmic: if discovery {
                Cmic::empty()
            } else {
                Cmic::MULTI_PORT | Cmic::MULTI_CONTROLLER
            },
            mdts: self.limits.mdts,
            cntlid: c.cntlid,
            ver: VERSION.0,
            oaes: if discovery {
                async_event::AEC_DISCOVERY_LOG_CHANGE
            } else {
                async_event::AEC_NS_ATTRIBUTE
            },
            ctratt: Ctratt::HOST_ID_128 | Ctratt::TBKAS,
            cntrltype: if discovery {
                identify::cntrltype::DISCOVERY
            } else {
                identify::cntrltype::IO
            },
            oacs: Oacs::empty(),
            acl: ACL,
            aerl: self.limits.aerl,
            frmw: 0x03,
            lpa: if discovery {
                Lpa::COMMAND_EFFECTS | Lpa::EXTENDED_DATA
            } else {
                Lpa::SMART_PER_NAMESPACE | Lpa::COMMAND_EFFECTS | Lpa::EXTENDED_DATA
            },
            elpe: (self.limits.error_log_entries.clamp(1, 256) - 1) as u8,
            npss: 0,
            kas: KAS,
            sqes: if discovery { 0 } else { 0x66 },
            cqes: if discovery { 0 } else { 0x44 },
            maxcmd: self.limits.max_queue_depth,
            nn: if discovery { 0 } else { self.limits.max_nsid },
            oncs: if discovery { Oncs::empty() } else { oncs },
            fuses: 0,
            fna: 0,
            vwc,
            awun: 0,
            awupf: 0,
            ocfs: if !discovery && oncs.contains(Oncs::COPY) {
                Ocfs::FORMAT_0
            } else {
                Ocfs::empty()
            },
            sgls: self.transport.sgls,
            subnqn: identify::nqn_field(nqn),
            ioccsz: (64 + self.transport.in_capsule_data) / 16,
            iorcsz: 1,
            icdoff: 0,
            fcatt: 0,
            msdbd: self.transport.msdbd,
            ..Default::default()
        }
    }

    fn identify(&mut self, qi: usize, ci: usize, mut req: Request) -> Response {
        let cmd = IdentifyCommand::from_sqe(&req.sqe);
        let len = req.data_len.min(identify::IDENTIFY_LEN as u32);
        let Some(Some(c)) = self.ctrls.get(ci) else {
            return self.respond(qi, req, Status::INTERNAL_ERROR, 0);
        };
        let si = c.subsys;
        let discovery = si == DISCOVERY;
        let mut page = [0u8; identify::IDENTIFY_LEN];
        let result: Result<(), Status> = match cmd.cns {
            cns::CONTROLLER => {
                self.identify_controller(ci).encode(&mut page);
                Ok(())
            }
            _ if discovery => Err(Status::INVALID_FIELD),
            cns::NAMESPACE => self.identify_ns(si, cmd.nsid, &mut page),
            // The NVM Command Set's own structures (CSI 00h): no protection information, no
            // extended LBA formats (CNS 05h), no Write Zeroes, Write Uncorrectable or
            // Dataset Management limits beyond the spec's (CNS 06h): all zero.
            cns::CS_NAMESPACE | cns::CS_CONTROLLER if cmd.csi != 0 => Err(Status::INVALID_FIELD),
            cns::CS_NAMESPACE => self
                .identify_ns(si, cmd.nsid, &mut page)
                .map(|()| page.fill(0)),
            cns::CS_CONTROLLER => Ok(()),
            cns::INDEPENDENT_NAMESPACE => self.identify_ns_independent(si, cmd.nsid, &mut page),
            cns::CS_ACTIVE_NS_LIST if cmd.csi != 0 => Err(Status::INVALID_FIELD),
            cns::ACTIVE_NS_LIST | cns::CS_ACTIVE_NS_LIST => {
                if cmd.nsid >= 0xFFFF_FFFE {
                    Err(Status::INVALID_NAMESPACE_OR_FORMAT)
                } else {
                    let mut last = cmd.nsid;
                    let mut off = 0usize;
                    if let Some(s) = self.subsystems.get(si) {
                        while off + 4 <= page.len() {
                            match s.active_nsids().filter(|&n| n > last).min() {
                                Some(n) => {
                                    keel_nvme::le::put_u32(&mut page, off, n);
                                    off += 4;
                                    last = n;
                                }
                                None => break,
                            }
                        }
                    }
                    Ok(())
                }
            }
            cns::NS_DESCRIPTOR_LIST => {
                match self
                    .subsystems
                    .get(si)
                    .and_then(|s| s.find_ns(cmd.nsid).and_then(|i| s.namespaces.get(i)))
                {
                    Some(Some(ns)) => {
                        NsIdentifiers {
                            eui64: ns.eui64,
                            nguid: ns.nguid,
                            uuid: ns.uuid,
                            csi: 0,
                        }
                        .encode(&mut page);
                        Ok(())
                    }
                    _ => Err(Status::INVALID_NAMESPACE_OR_FORMAT),
                }
            }
            _ => Err(Status::INVALID_FIELD),
        };
        match result {
            // An unknown CNS (CDW10 bits 7:0).
            Err(st) if st == Status::INVALID_FIELD => {
                let e = ErrAt::field(at::CDW10, 0);
                return self.respond_at(qi, req, st, e);
            }
            Err(st) => return self.respond(qi, req, st, 0),
            Ok(()) => {}
        }
        if let Err(st) = Self::data_in(&mut req, len) {
            return self.respond(qi, req, st, 0);
        }
        Self::put_data(&mut req.buf, 0, len, &page, 0);
        self.data_response(qi, req, len)
    }

    /// The I/O Command Set Independent Identify Namespace structure (CNS 08h): what Identify
    /// Namespace says of sharing and ANA, and that the namespace is ready.
    fn identify_ns_independent(
        &self,
        si: usize,
        nsid: u32,
        page: &mut [u8; identify::IDENTIFY_LEN],
    ) -> Result<(), Status> {
        let mut full = [0u8; identify::IDENTIFY_LEN];
        self.identify_ns(si, nsid, &mut full)?;
        let id = IdentifyNamespace::decode(&full);
        let active = self
            .subsystems
            .get(si)
            .is_some_and(|s| s.find_ns(nsid).is_some());
        identify::IdentifyNsIndependent {
            nsfeat: id.nsfeat,
            nmic: id.nmic,
            anagrpid: id.anagrpid,
            nstat: active as u8,
            ..Default::default()
        }
        .encode(page);
        Ok(())
    }

    fn identify_ns(
        &self,
        si: usize,
        nsid: u32,
        page: &mut [u8; identify::IDENTIFY_LEN],
    ) -> Result<(), Status> {
        if nsid == 0 || nsid > self.limits.max_nsid {
            return Err(Status::INVALID_NAMESPACE_OR_FORMAT);
        }
        let s = self.subsystems.get(si).ok_or(Status::INTERNAL_ERROR)?;
        let Some(Some(ns)) = s.find_ns(nsid).and_then(|i| s.namespaces.get(i)) else {
            // An inactive NSID in range: zero-filled structure.
            page.fill(0);
            return Ok(());
        };
        let mut lbaf = [identify::LbaFormat::default(); 16];
        lbaf[0].lbads = ns.geometry.lbads();
        // DLFEAT (NVM Command Set Figure 97): bits 2:0 say what deallocated blocks read as;
        // 001b only when the backend returns zeroes for them (RAM; a drive that reports it;
        // never an encrypted namespace, whose deallocated blocks decrypt to noise: 000b,
        // not reported). Bit 3: Write Zeroes with DEAC deallocates, only when Write Zeroes is
        // the backend's own and deallocated blocks read as zeroes.
        let mut dlfeat = 0;
        if ns.caps.deallocate && ns.caps.deallocate_reads_zero {
            dlfeat |= 0x01;
            if ns.caps.write_zeroes {
                dlfeat |= 0x08;
            }
        }
        let (mssrl, mcl, msrc) =
            copy_limits(&self.limits, self.scratch_size(), ns.geometry).unwrap_or((0, 0, 0));
        IdentifyNamespace {
            nsze: ns.geometry.blocks,
            ncap: ns.geometry.blocks,
            nuse: ns.geometry.blocks,
            nsfeat: 0,
            nlbaf: 0,
            flbas: 0,
            nmic: 1,
            dlfeat,
            mssrl,
            mcl,
            msrc,
            nguid: ns.nguid,
            eui64: ns.eui64,
            lbaf,
            ..Default::default()
        }
        .encode(page);
        Ok(())
    }

    fn get_log_page(&mut self, now: Instant, qi: usize, ci: usize, mut req: Request) -> Response {
        let cmd = GetLogPageCommand::from_sqe(&req.sqe);
        let len64 = cmd.len_bytes();
        let Ok(len) = u32::try_from(len64) else {
            return self.respond(qi, req, Status::DATA_SGL_LENGTH_INVALID, 0);
        };
        // LPOL: CDW12.
        let bad_offset = ErrAt::field(at::CDW12, 0);
        if !cmd.offset.is_multiple_of(4) {
            return self.respond_at(qi, req, Status::INVALID_FIELD, bad_offset);
        }
        let Some(Some(c)) = self.ctrls.get(ci) else {
            return self.respond(qi, req, Status::INTERNAL_ERROR, 0);
        };
        let si = c.subsys;
        let discovery = si == DISCOVERY;
        let error_entries = c.errors.capacity();
        let lid = LogPageId::from_u8(cmd.lid);
        let size: u64 = match lid {
            Some(LogPageId::Discovery) if discovery => {
                (1 + self.discovery_records(ci) as u64) * 1024
            }
            Some(LogPageId::ErrorInformation) => (error_entries * ErrorLogEntry::SIZE) as u64,
            Some(LogPageId::SmartHealth) | Some(LogPageId::FirmwareSlot) if !discovery => 512,
            Some(LogPageId::ChangedNamespaceList)
            | Some(LogPageId::CommandsSupportedAndEffects)
                if !discovery =>
            {
                4096
            }
            _ => {
                // LID: CDW10 bits 7:0.
                let e = ErrAt::field(at::CDW10, 0);
                return self.respond_at(qi, req, Status::INVALID_LOG_PAGE, e);
            }
        };
        if cmd.offset >= size {
            return self.respond_at(qi, req, Status::INVALID_FIELD, bad_offset);
        }
        // SMART / Health per namespace (LPA bit 0) for an NSID other than 0 and FFFFFFFFh.
        let smart_ns = match (lid, req.sqe.nsid) {
            (Some(LogPageId::SmartHealth), 0 | keel_nvme::NSID_ALL) => None,
            (Some(LogPageId::SmartHealth), nsid) => {
                match self.subsystems.get(si).and_then(|s| s.find_ns(nsid)) {
                    Some(ni) => Some(ni),
                    None => {
                        return self.respond(qi, req, Status::INVALID_NAMESPACE_OR_FORMAT, 0);
                    }
                }
            }
            _ => None,
        };
        if let Err(st) = Self::data_in(&mut req, len) {
            return self.respond(qi, req, st, 0);
        }
        let off = cmd.offset;
        match lid {
            Some(LogPageId::Discovery) => self.write_discovery_log(ci, &mut req.buf, off, len),
            Some(LogPageId::ErrorInformation) => self.write_error_log(ci, &mut req.buf, off, len),
            Some(LogPageId::SmartHealth) => {
                let mut p = [0u8; 512];
                self.smart_log(now, ci, smart_ns).encode(&mut p);
                Self::put_data(&mut req.buf, off, len, &p, 0);
            }
            Some(LogPageId::FirmwareSlot) => {
                let mut p = [0u8; 512];
                log::encode_firmware_slot(
                    1,
                    &[identify::ascii_field(&self.identity.firmware)],
                    &mut p,
                );
                Self::put_data(&mut req.buf, off, len, &p, 0);
            }
            Some(LogPageId::ChangedNamespaceList) => {
                let mut p = [0u8; 4096];
                if let Some(Some(c)) = self.ctrls.get_mut(ci) {
                    log::encode_changed_ns_list(&c.changed_ns, c.changed_overflow, &mut p);
                    if !cmd.rae {
                        c.changed_ns.clear();
                        c.changed_overflow = false;
                        c.ns_notice_masked = false;
                    }
                }
                Self::put_data(&mut req.buf, off, len, &p, 0);
            }
            Some(LogPageId::CommandsSupportedAndEffects) => {
                let mut p = [0u8; 4096];
                let sup = Effects::CSUPP;
                let lb = Effects::CSUPP | Effects::LBCC;
                let oncs = self.identify_controller(ci).oncs;
                let has = |bit: Oncs, e: Effects| {
                    if oncs.contains(bit) {
                        e
                    } else {
                        Effects::empty()
                    }
                };
                log::encode_effects(
                    &[
                        (AdminOpcode::GetLogPage as u8, sup),
                        (AdminOpcode::Identify as u8, sup),
                        (AdminOpcode::Abort as u8, sup),
                        (AdminOpcode::SetFeatures as u8, sup),
                        (AdminOpcode::GetFeatures as u8, sup),
                        (AdminOpcode::AsyncEventRequest as u8, sup),
                        (AdminOpcode::KeepAlive as u8, sup),
                    ],
                    &[
                        (IoOpcode::Flush as u8, sup),
                        (IoOpcode::Write as u8, lb),
                        (IoOpcode::Read as u8, sup),
                        (IoOpcode::Compare as u8, has(Oncs::COMPARE, sup)),
                        (IoOpcode::WriteZeroes as u8, has(Oncs::WRITE_ZEROES, lb)),
                        (IoOpcode::DatasetManagement as u8, lb),
                        (IoOpcode::Verify as u8, has(Oncs::VERIFY, sup)),
                        (IoOpcode::Copy as u8, has(Oncs::COPY, lb)),
                    ],
                    &mut p,
                );
                Self::put_data(&mut req.buf, off, len, &p, 0);
            }
            _ => {}
        }
        if lid == Some(LogPageId::Discovery)
            && !cmd.rae
            && let Some(Some(c)) = self.ctrls.get_mut(ci)
        {
            c.disc_notice_masked = false;
        }
        self.data_response(qi, req, len)
    }

    /// The Error Information log window `[off, off + len)`: the controller's entries, newest
    /// first, then entries with Error Count 0 (the buffer is already zeroed).
    fn write_error_log(
        &self,
        ci: usize,
        buf: &mut Option<keel_storage::IoBuf>,
        off: u64,
        len: u32,
    ) {
        let Some(Some(c)) = self.ctrls.get(ci) else {
            return;
        };
        let first = (off / ErrorLogEntry::SIZE as u64) as usize;
        let end = off.saturating_add(len as u64);
        let mut e = [0u8; ErrorLogEntry::SIZE];
        for i in first..c.errors.capacity() {
            let at = (i * ErrorLogEntry::SIZE) as u64;
            if at >= end {
                break;
            }
            let Some(entry) = c.errors.newest(i) else {
                break;
            };
            entry.encode(&mut e);
            Self::put_data(buf, off, len, &e, at);
        }
    }

    /// The SMART / Health log of controller `ci`: for the whole subsystem (NSID 0 or
    /// FFFFFFFFh), or for namespace index `ns`. Device-wide fields (power, temperature,
    /// spare) are the same in both; Controller Busy Time and the error log count are the
    /// controller's.
    fn smart_log(&self, now: Instant, ci: usize, ns: Option<usize>) -> log::SmartLog {
        let h = self.health;
        let mut s = log::SmartLog {
            // No temperature sensor is read (QEMU has none): 0 K, "not measured", as Linux's
            // nvmet target reports; WCTEMP/CCTEMP are 0, so no threshold applies.
            composite_temperature: 0,
            // Nothing wears on RAM; drives' own wear is not aggregated.
            available_spare: 100,
            available_spare_threshold: 10,
            percentage_used: 0,
            power_cycles: h.power_cycles as u128,
            power_on_hours: (h.power_on_ns_at(now) / HOUR_NS) as u128,
            unsafe_shutdowns: h.unsafe_shutdowns as u128,
            ..Default::default()
        };
        let Some(Some(c)) = self.ctrls.get(ci) else {
            return s;
        };
        s.controller_busy_time = (c.busy_ns_at(now) / MINUTE_NS) as u128;
        s.num_error_log_entries = c.errors.count() as u128;
        let Some(sub) = self.subsystems.get(c.subsys) else {
            return s;
        };
        let mut rb = 0u64;
        let mut wb = 0u64;
        let mut add = |st: &keel_storage::NsStats, s: &mut log::SmartLog| {
            rb = rb.saturating_add(st.read_bytes);
            wb = wb.saturating_add(st.write_bytes);
            s.host_read_commands += st.reads as u128;
            s.host_write_commands += st.writes as u128;
            s.media_errors += st.media_errors as u128;
        };
        let elsewhere = self.elsewhere;
        let mut add_ns = |n: &crate::target::Namespace, s: &mut log::SmartLog| {
            add(&n.stats, s);
            if let Some(f) = elsewhere {
                add(&f(&sub.nqn, n.nsid), s);
            }
        };
        match ns {
            Some(ni) => {
                if let Some(Some(n)) = sub.namespaces.get(ni) {
                    add_ns(n, &mut s);
                }
            }
            None => {
                for n in sub.namespaces.iter().flatten() {
                    add_ns(n, &mut s);
                }
                s.media_errors += sub.media_errors as u128;
            }
        }
        s.data_units_read = log::SmartLog::data_units(rb);
        s.data_units_written = log::SmartLog::data_units(wb);
        s
    }

    /// Subsystems the discovery controller's host may see.
    fn visible_subsystems(&self, ci: usize) -> impl Iterator<Item = usize> + '_ {
        let host = match self.ctrls.get(ci) {
            Some(Some(c)) => c.hostnqn.as_str(),
            _ => "",
        };
        self.subsystems
            .iter()
            .enumerate()
            .filter(move |(_, s)| !s.discovery && !s.removed && s.host_allowed(host))
            .map(|(i, _)| i)
    }

    fn discovery_records(&self, ci: usize) -> usize {
        self.visible_subsystems(ci).count() * self.ports.len()
    }

    fn write_discovery_log(
        &self,
        ci: usize,
        buf: &mut Option<keel_storage::IoBuf>,
        off: u64,
        len: u32,
    ) {
        let mut rec = [0u8; discovery::RECORD_LEN];
        discovery::Header {
            genctr: self.genctr,
            numrec: self.discovery_records(ci) as u64,
            recfmt: 0,
        }
        .encode(&mut rec);
        Self::put_data(buf, off, len, &rec, 0);
        let mut pos = 1u64;
        let end = off.saturating_add(len as u64);
        for si in self.visible_subsystems(ci) {
            for p in &self.ports {
                let at = pos * 1024;
                pos += 1;
                if at >= end || at + 1024 <= off {
                    continue;
                }
                let mut trsvcid = [0u8; 32];
                keel_nvme::le::put_str(&mut trsvcid, 0, 32, &p.trsvcid, 0);
                let mut traddr = [0u8; 256];
                keel_nvme::le::put_str(&mut traddr, 0, 256, &p.traddr, 0);
                discovery::Entry {
                    trtype: p.trtype,
                    adrfam: p.adrfam,
                    subtype: discovery::SUBTYPE_NVM,
                    treq: p.treq,
                    portid: p.portid,
                    cntlid: keel_nvme::fabrics::CNTLID_DYNAMIC,
                    asqsz: self.limits.admin_queue_depth,
                    trsvcid,
                    traddr,
                    subnqn: identify::nqn_field(
                        self.subsystems
                            .get(si)
                            .map(|s| s.nqn.as_str())
                            .unwrap_or(""),
                    ),
                    tsas: [0; 256],
                }
                .encode(&mut rec);
                Self::put_data(buf, off, len, &rec, at);
            }
        }
    }

    fn set_features(&mut self, qi: usize, ci: usize, req: Request) -> Response {
        let f = FeaturesCommand::from_sqe(&req.sqe);
        let Some(Some(c)) = self.ctrls.get(ci) else {
            return self.respond(qi, req, Status::INTERNAL_ERROR, 0);
        };
        let discovery = c.subsys == DISCOVERY;
        let fid = FeatureId::from_u8(f.fid);
        let known = match fid {
            Some(id) => feature_supported(id, discovery, c.local),
            None => false,
        };
        if !known {
            return self.respond_at(qi, req, Status::INVALID_FIELD, ErrAt::field(at::CDW10, 0));
        }
        if f.save {
            return self.respond(qi, req, Status::FEATURE_NOT_SAVEABLE, 0);
        }
        let vwc_present = self.subsystem_has_vwc(c.subsys);
        let max_q = self.limits.max_io_queues;
        let Some(Some(c)) = self.ctrls.get_mut(ci) else {
            return self.respond(qi, req, Status::INTERNAL_ERROR, 0);
        };
        let mut dw0 = 0;
        match fid {
            Some(FeatureId::KeepAliveTimer) => c.kato_ms = f.cdw11,
            Some(FeatureId::AsyncEventConfig) => {
                c.aec = f.cdw11
                    & (async_event::AEC_NS_ATTRIBUTE | async_event::AEC_DISCOVERY_LOG_CHANGE)
            }
            Some(FeatureId::Arbitration) => c.arbitration = f.cdw11,
            Some(FeatureId::VolatileWriteCache) => {
                if !vwc_present {
                    return self.respond_at(
                        qi,
                        req,
                        Status::INVALID_FIELD,
                        ErrAt::field(at::CDW11, 0),
                    );
                }
                c.vwc = f.cdw11 & 1 != 0;
            }
            Some(FeatureId::NumberOfQueues) => {
                let nsqr = f.cdw11 as u16;
                let ncqr = (f.cdw11 >> 16) as u16;
                if nsqr == 0xFFFF || ncqr == 0xFFFF {
                    return self.respond_at(
                        qi,
                        req,
                        Status::INVALID_FIELD,
                        ErrAt::field(at::CDW11, 0),
                    );
                }
                if c.io_qs.iter().any(|q| q.is_some()) {
                    return self.respond(qi, req, Status::COMMAND_SEQUENCE_ERROR, 0);
                }
                let nsqa = (nsqr + 1).min(max_q);
                let ncqa = (ncqr + 1).min(max_q);
                c.nr_io_queues = nsqa.min(ncqa);
                dw0 = keel_nvme::io::number_of_queues(nsqa - 1, ncqa - 1);
            }
            Some(FeatureId::PowerManagement) => {
                // One power state (NPSS = 0): only PS 0 exists.
                if f.cdw11 & 0x1F != 0 {
                    return self.respond_at(
                        qi,
                        req,
                        Status::INVALID_FIELD,
                        ErrAt::field(at::CDW11, 0),
                    );
                }
                c.power_mgmt = f.cdw11 & 0xFF;
            }
            Some(FeatureId::TemperatureThreshold) => {
                // TMPTH 15:0, TMPSEL 19:16 (0: composite; no other sensor), THSEL 21:20.
                let (tmpsel, thsel) = ((f.cdw11 >> 16) & 0xF, (f.cdw11 >> 20) & 0x3);
                if tmpsel != 0 || thsel > 1 {
                    return self.respond_at(
                        qi,
                        req,
                        Status::INVALID_FIELD,
                        ErrAt::field(at::CDW11 + 2, 0),
                    );
                }
                c.temp_threshold[thsel as usize] = f.cdw11 as u16;
            }
            Some(FeatureId::ErrorRecovery) => {
                // DULBE (bit 16) needs deallocated-block errors, which no namespace reports.
                if f.cdw11 & (1 << 16) != 0 {
                    return self.respond_at(
                        qi,
                        req,
                        Status::INVALID_FIELD,
                        ErrAt::field(at::CDW11 + 2, 0),
                    );
                }
                c.error_recovery = f.cdw11 & 0xFFFF;
            }
            Some(FeatureId::InterruptCoalescing) => c.irq_coalescing = f.cdw11 & 0xFFFF,
            Some(FeatureId::InterruptVectorConfig) => {
                let iv = f.cdw11 & 0xFFFF;
                if iv >= 64 || iv > u32::from(max_q) {
                    return self.respond_at(
                        qi,
                        req,
                        Status::INVALID_FIELD,
                        ErrAt::field(at::CDW11, 0),
                    );
                }
                if f.cdw11 & (1 << 16) != 0 {
                    c.irq_no_coalesce |= 1 << iv;
                } else {
                    c.irq_no_coalesce &= !(1 << iv);
                }
            }
            Some(FeatureId::WriteAtomicity) => c.write_atomicity = f.cdw11 & 1,
            _ => return self.respond(qi, req, Status::INVALID_FIELD, 0),
        }
        self.respond(qi, req, Status::SUCCESS, dw0)
    }

    /// The value of one of the features that have no effect on this device (see
    /// [`feature_supported`]); `None` for a selection that does not exist (another sensor,
    /// a vector the controller does not have).
    fn feature_value(
        &self,
        c: &Controller,
        id: FeatureId,
        cdw11: u32,
        current: bool,
    ) -> Option<u32> {
        let v = match id {
            FeatureId::PowerManagement => c.power_mgmt,
            FeatureId::TemperatureThreshold => {
                let (tmpsel, thsel) = ((cdw11 >> 16) & 0xF, (cdw11 >> 20) & 0x3);
                if tmpsel != 0 || thsel > 1 {
                    return None;
                }
                let t = if current {
                    c.temp_threshold[thsel as usize]
                } else {
                    [0x0157, 0][thsel as usize]
                };
                return Some(u32::from(t) | (cdw11 & 0x003F_0000));
            }
            FeatureId::ErrorRecovery => c.error_recovery,
            FeatureId::InterruptCoalescing => c.irq_coalescing,
            FeatureId::InterruptVectorConfig => {
                let iv = cdw11 & 0xFFFF;
                if iv >= 64 || iv > u32::from(self.limits.max_io_queues) {
                    return None;
                }
                let cd = if current {
                    (c.irq_no_coalesce >> iv) & 1
                } else {
                    0
                };
                return Some(iv | (cd as u32) << 16);
            }
            FeatureId::WriteAtomicity => c.write_atomicity,
            _ => return None,
        };
        Some(if current { v } else { 0 })
    }

    fn get_features(&mut self, qi: usize, ci: usize, req: Request) -> Response {
        let f = FeaturesCommand::from_sqe(&req.sqe);
        let Some(Some(c)) = self.ctrls.get(ci) else {
            return self.respond(qi, req, Status::INTERNAL_ERROR, 0);
        };
        let discovery = c.subsys == DISCOVERY;
        let fid = FeatureId::from_u8(f.fid);
        let max_q = self.limits.max_io_queues.saturating_sub(1);
        let current = f.sel == FeaturesCommand::SEL_CURRENT;
        let value = match fid {
            Some(FeatureId::KeepAliveTimer) => Some(if current { c.kato_ms } else { 0 }),
            Some(FeatureId::AsyncEventConfig) => Some(if current { c.aec } else { 0 }),
            Some(FeatureId::Arbitration) if !discovery => {
                Some(if current { c.arbitration } else { 0 })
            }
            Some(FeatureId::VolatileWriteCache) if !discovery => Some(if current {
                c.vwc as u32
            } else {
                self.subsystem_has_vwc(c.subsys) as u32
            }),
            Some(FeatureId::NumberOfQueues) if !discovery => {
                let n = if current {
                    c.nr_io_queues.saturating_sub(1)
                } else {
                    max_q
                };
                Some(keel_nvme::io::number_of_queues(n, n))
            }
            Some(id) if feature_supported(id, discovery, c.local) => {
                self.feature_value(c, id, f.cdw11, current)
            }
            _ => None,
        };
        match (value, f.sel) {
            (None, _) => {
                self.respond_at(qi, req, Status::INVALID_FIELD, ErrAt::field(at::CDW10, 0))
            }
            // Supported capabilities: changeable, not saveable, not namespace specific.
            (Some(_), FeaturesCommand::SEL_CAPABILITIES) => {
                self.respond(qi, req, Status::SUCCESS, 0b100)
            }
            (Some(_), s) if s > FeaturesCommand::SEL_CAPABILITIES => self.respond_at(
                qi,
                req,
                Status::INVALID_FIELD,
                ErrAt::field(at::CDW10 + 1, 0),
            ),
            (Some(v), _) => self.respond(qi, req, Status::SUCCESS, v),
        }
    }

    fn aer(&mut self, qi: usize, ci: usize, req: Request) -> Option<Response> {
        let limit = self.limits.aerl as usize + 1;
        let Some(Some(c)) = self.ctrls.get_mut(ci) else {
            return Some(self.respond(qi, req, Status::INTERNAL_ERROR, 0));
        };
        if c.aers.iter().any(|(cid, _)| *cid == req.sqe.cid) {
            return Some(self.respond(qi, req, Status::COMMAND_ID_CONFLICT, 0));
        }
        if !c.aen_pending.is_empty() {
            let dw0 = c.aen_pending.remove(0);
            return Some(self.respond(qi, req, Status::SUCCESS, dw0));
        }
        if c.aers.len() >= limit {
            return Some(self.respond(qi, req, Status::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED, 0));
        }
        c.aers.push((req.sqe.cid, req.cookie));
        // An AER carries no data; a buffer would be lost while it waits.
        if let Some(buf) = req.buf {
            let owner = self.queues[qi].owner;
            self.pending.push_back(Event::BufferReleased { owner, buf });
        }
        None
    }

    /// Abort (NVMe base 2.0 §5.1). An Asynchronous Event Request or a command not yet handed
    /// to a backend (waiting in the QoS scheduler, refused by a busy backend, or waiting for a
    /// scratch buffer) is
    /// aborted at once. A command at a backend is aborted if the backend can
    /// ([`keel_storage::BlockBackend::abort`]: still queued in it, or outstanding on a drive,
    /// which gets an Abort of its own): the Abort then completes after the command, DW0 bit 0
    /// clear if the command ended with Command Abort Requested, set if it finished anyway.
    /// Anything else completes at once with DW0 bit 0 set (not aborted).
    fn abort(&mut self, now: Instant, qi: usize, ci: usize, req: Request) -> Option<Response> {
        let a = AbortCommand::from_sqe(&req.sqe);
        let Some(Some(c)) = self.ctrls.get_mut(ci) else {
            return Some(self.respond(qi, req, Status::INTERNAL_ERROR, 0));
        };
        if a.sqid == 0 {
            if let Some(pos) = c.aers.iter().position(|(cid, _)| *cid == a.cid) {
                let (cid, cookie) = c.aers.remove(pos);
                let aq = c.admin_q;
                if let Some(q) = self.queue(aq) {
                    let cqe = q.cqe(cid, Status::ABORT_REQUESTED, 0);
                    self.pending.push_back(Event::Completion(
                        aq,
                        Response {
                            cqe,
                            buf: None,
                            data_len: 0,
                            cookie,
                        },
                    ));
                }
                return Some(self.respond(qi, req, Status::SUCCESS, 0));
            }
            return Some(self.respond(qi, req, Status::SUCCESS, AbortCommand::NOT_ABORTED));
        }
        let (cntlid, pending_aborts) = (c.cntlid, c.aborts_pending);
        let target = (a.sqid as usize)
            .checked_sub(1)
            .and_then(|i| c.io_qs.get(i))
            .copied()
            .flatten();
        let not_aborted = |t: &mut Self, req| {
            Some(t.respond(qi, req, Status::SUCCESS, AbortCommand::NOT_ABORTED))
        };
        let Some(tqi) = target.and_then(|q| self.queue_index(q)) else {
            return not_aborted(self, req);
        };
        let found = self.queues[tqi]
            .slots
            .iter()
            .position(|s| s.state != SlotState::Free && s.cid == a.cid);
        let Some(si) = found else {
            if self.queues[tqi].elsewhere {
                // Served by another core: the verdict comes from there
                // (`Target::take_abort_requests`).
                if pending_aborts > ACL as u16 {
                    return Some(self.respond(qi, req, Status::ABORT_COMMAND_LIMIT_EXCEEDED, 0));
                }
                let token = self.next_abort_token;
                self.next_abort_token = self.next_abort_token.wrapping_add(1).max(1);
                let queue = self.queues[tqi].id(tqi);
                self.remote_aborts.push(crate::replica::RemoteAbort {
                    token,
                    ci,
                    cntlid,
                    waiter: (req.sqe.cid, req.cookie),
                    queue,
                    cid: a.cid,
                    sent: false,
                });
                if let Some(Some(c)) = self.ctrls.get_mut(ci) {
                    c.aborts_pending += 1;
                }
                if let Some(buf) = req.buf {
                    let owner = self.queues[qi].owner;
                    self.pending.push_back(Event::BufferReleased { owner, buf });
                }
                return None;
            }
            return not_aborted(self, req);
        };
        let state = self.queues[tqi].slots[si].state;
        if matches!(state, SlotState::Queued | SlotState::Deferred) {
            self.abort_waiting_slot(now, tqi, si);
            return Some(self.respond(qi, req, Status::SUCCESS, 0));
        }
        // In flight at a backend.
        if self.queues[tqi].slots[si].abort_waiter.is_some()
            || self.queues[tqi].slots[si].holder_abort.is_some()
        {
            // Already being aborted: the first Abort reports the outcome.
            return not_aborted(self, req);
        }
        if pending_aborts > ACL as u16 {
            return Some(self.respond(qi, req, Status::ABORT_COMMAND_LIMIT_EXCEEDED, 0));
        }
        if !self.start_backend_abort(tqi, si) {
            return not_aborted(self, req);
        }
        self.queues[tqi].slots[si].abort_waiter = Some((req.sqe.cid, req.cookie));
        if let Some(Some(c)) = self.ctrls.get_mut(ci)
            && c.cntlid == cntlid
        {
            c.aborts_pending += 1;
        }
        // An Abort carries no data; a buffer would be lost while it waits.
        if let Some(buf) = req.buf {
            let owner = self.queues[qi].owner;
            self.pending.push_back(Event::BufferReleased { owner, buf });
        }
        None
    }
}

impl Target {
    /// Aborts command slot `si` of queue `tqi`, waiting in the scheduler or for a scratch
    /// buffer (not yet at a backend): it completes with Command Abort Requested.
    pub(crate) fn abort_waiting_slot(&mut self, now: Instant, tqi: usize, si: usize) {
        let state = self.queues[tqi].slots[si].state;
        let h = handle(self.hstride, tqi, si);
        if state == SlotState::Queued {
            self.sched.remove(h);
        } else {
            // Admitted, waiting for a scratch buffer: its place in the domain frees.
            if let Some(p) = self.scratch_wait.iter().position(|&x| x == h) {
                self.scratch_wait.remove(p);
            }
            if let Some(f) = self.queues[tqi].slots[si].flow {
                self.sched.finished(f);
            }
        }
        let buf = self.queues[tqi].slots[si]
            .deferred
            .take()
            .and_then(|r| r.buf);
        if let Some(ev) = self.finish_slot(tqi, si, Status::ABORT_REQUESTED, buf, now) {
            self.pending.push_back(ev);
        }
    }

    /// Asks the backend of command slot `si` of queue `tqi` (at the backend) to abort it;
    /// whether it will try (the command's completion then tells).
    pub(crate) fn start_backend_abort(&mut self, tqi: usize, si: usize) -> bool {
        let (sub, ni) = {
            let s = &self.queues[tqi].slots[si];
            (s.ns.0 as usize, s.ns.1 as usize)
        };
        let t = self.queues[tqi].tag(tqi, si);
        match self
            .subsystems
            .get_mut(sub)
            .and_then(|s| s.namespaces.get_mut(ni))
        {
            Some(Some(ns)) => ns.backend.abort(t),
            _ => false,
        }
    }
}

/// Whether Set/Get Features knows `id` on this controller: Keep Alive Timer and Asynchronous
/// Event Configuration everywhere; on I/O controllers also the features the base
/// specification makes mandatory (Arbitration, Power Management, Temperature Threshold, Error
/// Recovery, Number of Queues, Write Atomicity Normal) and Volatile Write Cache; Interrupt
/// Coalescing and Interrupt Vector Configuration only on a PCIe (local) controller, where
/// they are mandatory and where interrupts exist.
pub(crate) fn feature_supported(id: FeatureId, discovery: bool, local: bool) -> bool {
    match id {
        FeatureId::KeepAliveTimer | FeatureId::AsyncEventConfig => true,
        FeatureId::Arbitration
        | FeatureId::PowerManagement
        | FeatureId::TemperatureThreshold
        | FeatureId::ErrorRecovery
        | FeatureId::VolatileWriteCache
        | FeatureId::NumberOfQueues
        | FeatureId::WriteAtomicity => !discovery,
        FeatureId::InterruptCoalescing | FeatureId::InterruptVectorConfig => !discovery && local,
        _ => false,
    }
}
