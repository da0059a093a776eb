//! Fabrics commands: Connect, Property Get/Set, Disconnect (NVMe-oF 1.1 §3.3-3.6), and the
//! controller register model behind them (NVMe base 2.0 §3.1.3, §3.6 initialization and
//! shutdown).

use crate::config::*;
use crate::errlog::ErrAt;
use crate::target::*;
use alloc::string::String;
use alloc::vec::Vec;
use keel_nvme::fabrics::{
    self, ConnectCommand, ConnectData, PropertyCommand, PropertySize, connect_data_field as cdf,
    connect_field as cf,
};
use keel_nvme::regs::{Cap, Cc, Csts, Vs, offset};
use keel_nvme::{FabricsType, Status};

/// The NVMe version Keel controllers report.
pub const VERSION: Vs = Vs::V1_4;

impl Target {
    /// CAP as reported by every controller of this target.
    pub fn cap(&self) -> Cap {
        // MQES, CQR (for the PCIe function), TO 15 (7.5 s), CSS: NVM command set,
        // MPSMIN = MPSMAX = 4 KiB.
        Cap::new(
            self.limits.max_queue_depth.saturating_sub(1),
            true,
            0,
            15,
            0,
            false,
            1,
            0,
            0,
        )
    }

    pub(crate) fn connect(&mut self, now: Instant, qi: usize, req: Request) -> Response {
        let cmd = ConnectCommand::from_sqe(&req.sqe);
        let bad = |t: &mut Self, req: Request, in_data: bool, off: u16| {
            t.respond(
                qi,
                req,
                Status::CONNECT_INVALID_PARAMETERS,
                fabrics::invalid_param_dw0(in_data, off),
            )
        };
        if cmd.recfmt != 0 {
            return self.respond(qi, req, Status::CONNECT_INCOMPATIBLE_FORMAT, 0);
        }
        let data = match req.buf.as_ref() {
            Some(b) if req.data_len as usize >= ConnectData::SIZE => {
                ConnectData::parse(b.as_slice())
            }
            _ => None,
        };
        let Some(data) = data else {
            return self.respond(qi, req, Status::DATA_SGL_LENGTH_INVALID, 0);
        };
        let Some(subnqn) = data.subnqn() else {
            return bad(self, req, true, cdf::SUBNQN);
        };
        let hostnqn = match data.hostnqn() {
            Some(h) if !h.is_empty() => h,
            _ => return bad(self, req, true, cdf::HOSTNQN),
        };
        let Some(si) = self.subsys_index(subnqn) else {
            return bad(self, req, true, cdf::SUBNQN);
        };
        if !self.subsystems[si].host_allowed(hostnqn) {
            return self.respond(
                qi,
                req,
                Status::CONNECT_INVALID_HOST,
                fabrics::invalid_param_dw0(true, cdf::HOSTNQN),
            );
        }
        let mqes = self.cap().mqes();
        if cmd.sqsize == 0 || cmd.sqsize > mqes {
            return bad(self, req, false, cf::SQSIZE);
        }
        let sqflow_disabled = cmd.cattr & fabrics::CATTR_DISABLE_SQ_FLOW_CONTROL != 0;
        let discovery = si == DISCOVERY;
        if cmd.qid == 0 {
            if data.cntlid != fabrics::CNTLID_DYNAMIC && data.cntlid != fabrics::CNTLID_ANY_STATIC {
                return bad(self, req, true, cdf::CNTLID);
            }
            let Some(ci) = self.ctrls.iter().position(|c| c.is_none()) else {
                return self.respond(qi, req, Status::CONNECT_CONTROLLER_BUSY, 0);
            };
            let kato = if cmd.kato == 0 && discovery {
                self.limits.discovery_kato_ms
            } else {
                cmd.kato
            };
            let hostnqn: String = hostnqn.into();
            let cntlid = self.alloc_cntlid();
            let admin_q = self.queues[qi].id(qi);
            let ctrl =
                self.new_controller(cntlid, si, hostnqn, data.hostid, false, admin_q, kato, now);
            self.ctrls[ci] = Some(ctrl);
            self.ensure_flows(ci);
            let q = &mut self.queues[qi];
            q.state = QState::Connected;
            q.ctrl = ci;
            q.cntlid = cntlid;
            q.qid = 0;
            q.sqsize = cmd.sqsize;
            q.sqhd = 1 % (cmd.sqsize + 1);
            q.sqflow_disabled = sqflow_disabled;
            q.slots = Vec::new();
            return self.respond(qi, req, Status::SUCCESS, cntlid as u32);
        }
        if discovery {
            return bad(self, req, false, cf::QID);
        }
        let found = self.ctrls.iter().position(
            |c| matches!(c, Some(c) if c.cntlid == data.cntlid && c.subsys == si && !c.local),
        );
        let Some(ci) = found else {
            return bad(self, req, true, cdf::CNTLID);
        };
        let (ready, host_ok, nrq, taken) = {
            let Some(c) = self.ctrls[ci].as_ref() else {
                return bad(self, req, true, cdf::CNTLID);
            };
            let taken = (cmd.qid as usize)
                .checked_sub(1)
                .and_then(|i| c.io_qs.get(i))
                .map(|x| x.is_some())
                .unwrap_or(true);
            (
                c.csts.rdy(),
                c.hostnqn == hostnqn && c.hostid == data.hostid,
                c.nr_io_queues,
                taken,
            )
        };
        if !host_ok {
            return bad(self, req, true, cdf::HOSTNQN);
        }
        if !ready {
            return self.respond(qi, req, Status::COMMAND_SEQUENCE_ERROR, 0);
        }
        if cmd.qid > nrq || taken {
            return bad(self, req, false, cf::QID);
        }
        self.install_io_queue(ci, qi, cmd.qid, cmd.sqsize, sqflow_disabled);
        let cntlid = data.cntlid;
        let q = &mut self.queues[qi];
        q.sqhd = 1 % (cmd.sqsize + 1);
        self.respond(qi, req, Status::SUCCESS, cntlid as u32)
    }

    pub(crate) fn install_io_queue(
        &mut self,
        ci: usize,
        qi: usize,
        qid: u16,
        sqsize: u16,
        sqflow_disabled: bool,
    ) {
        self.sched
            .ensure_capacity((qi as u32 + 1).saturating_mul(self.hstride));
        let Some(Some(c)) = self.ctrls.get_mut(ci) else {
            return;
        };
        let id = self.queues[qi].id(qi);
        if let Some(x) = (qid as usize)
            .checked_sub(1)
            .and_then(|i| c.io_qs.get_mut(i))
        {
            *x = Some(id);
        }
        let cntlid = c.cntlid;
        let q = &mut self.queues[qi];
        q.state = QState::Connected;
        q.ctrl = ci;
        q.cntlid = cntlid;
        q.qid = qid;
        q.sqsize = sqsize;
        q.sqhd = 0;
        q.sqflow_disabled = sqflow_disabled;
        let mut slots = Vec::with_capacity(sqsize as usize + 1);
        slots.resize_with(sqsize as usize + 1, Slot::free_slot);
        q.slots = slots;
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new_controller(
        &mut self,
        cntlid: u16,
        si: usize,
        hostnqn: String,
        hostid: [u8; 16],
        local: bool,
        admin_q: QueueId,
        kato_ms: u32,
        now: Instant,
    ) -> Controller {
        let nq = if si == DISCOVERY {
            0
        } else {
            self.limits.max_io_queues
        };
        let mut io_qs = Vec::with_capacity(nq as usize);
        io_qs.resize(nq as usize, None);
        let limits = self.host_limits(&hostnqn);
        let limiter = self.new_limiter(limits, now);
        Controller {
            cntlid,
            subsys: si,
            hostnqn,
            hostid,
            local,
            replica: false,
            admin_q,
            io_qs,
            cc: Cc(0),
            csts: Csts(0),
            shutdown_pending: false,
            kato_ms,
            last_activity: now,
            nr_io_queues: nq,
            aec: 0,
            vwc: self.subsystem_has_vwc(si),
            arbitration: 0,
            power_mgmt: 0,
            // 343 K (70 °C) over, 0 under: the defaults are implementation specific.
            temp_threshold: [0x0157, 0],
            error_recovery: 0,
            irq_coalescing: 0,
            irq_no_coalesce: 0,
            write_atomicity: 0,
            aers: Vec::with_capacity(self.limits.aerl as usize + 1),
            aen_pending: Vec::with_capacity(8),
            ns_notice_masked: false,
            disc_notice_masked: false,
            changed_ns: Vec::with_capacity(256),
            changed_overflow: false,
            outstanding: 0,
            busy_since: now,
            busy_ns: 0,
            errors: crate::errlog::ErrorLog::new(self.limits.error_log_entries as usize),
            exported_errors: 0,
            aborts_pending: 0,
            limiter,
            flows: Vec::new(),
        }
    }

    pub(crate) fn subsystem_has_vwc(&self, si: usize) -> bool {
        self.subsystems
            .get(si)
            .map(|s| {
                s.namespaces
                    .iter()
                    .flatten()
                    .any(|n| n.active && n.caps.volatile_write_cache)
            })
            .unwrap_or(false)
    }

    pub(crate) fn fabrics_admin(
        &mut self,
        now: Instant,
        qi: usize,
        ci: usize,
        req: Request,
    ) -> Response {
        match FabricsType::from_u8(req.sqe.fctype()) {
            Some(FabricsType::PropertyGet) => {
                let p = PropertyCommand::from_sqe(&req.sqe);
                match p
                    .size()
                    .ok_or(Status::INVALID_FIELD)
                    .and_then(|sz| self.prop_get(ci, p.offset, sz))
                {
                    Ok(v) => {
                        let mut r = self.respond(qi, req, Status::SUCCESS, v as u32);
                        r.cqe.dw1 = (v >> 32) as u32;
                        r
                    }
                    Err(st) => self.respond(qi, req, st, 0),
                }
            }
            Some(FabricsType::PropertySet) => {
                let p = PropertyCommand::from_sqe(&req.sqe);
                let r = p
                    .size()
                    .ok_or(Status::INVALID_FIELD)
                    .and_then(|sz| self.prop_set(now, ci, p.offset, sz, p.value));
                let st = r.err().unwrap_or(Status::SUCCESS);
                self.respond(qi, req, st, 0)
            }
            Some(FabricsType::Connect) => self.respond(qi, req, Status::COMMAND_SEQUENCE_ERROR, 0),
            Some(FabricsType::Disconnect) => {
                let r = self.respond(qi, req, Status::SUCCESS, 0);
                self.queues[qi].disconnected = true;
                self.destroy_controller(ci, None);
                r
            }
            // Unknown FCTYPE (byte 4 of a fabrics command).
            _ => self.respond_at(qi, req, Status::INVALID_OPCODE, ErrAt::field(4, 0)),
        }
    }

    pub(crate) fn fabrics_io(&mut self, qi: usize, ci: usize, req: Request) -> Response {
        match FabricsType::from_u8(req.sqe.fctype()) {
            Some(FabricsType::Disconnect) => {
                let r = self.respond(qi, req, Status::SUCCESS, 0);
                let qid = self.queues[qi].qid as usize;
                if let Some(Some(c)) = self.ctrls.get_mut(ci)
                    && let Some(x) = qid.checked_sub(1).and_then(|i| c.io_qs.get_mut(i))
                {
                    *x = None;
                }
                self.queues[qi].disconnected = true;
                self.terminate_queue(qi);
                r
            }
            Some(FabricsType::Connect) => self.respond(qi, req, Status::COMMAND_SEQUENCE_ERROR, 0),
            // Unknown FCTYPE (byte 4 of a fabrics command).
            _ => self.respond_at(qi, req, Status::INVALID_OPCODE, ErrAt::field(4, 0)),
        }
    }

    fn prop_get(&self, ci: usize, off: u32, size: PropertySize) -> Result<u64, Status> {
        let c = self
            .ctrls
            .get(ci)
            .and_then(|c| c.as_ref())
            .ok_or(Status::INTERNAL_ERROR)?;
        let (v, want) = match off {
            offset::CAP => (self.cap().0, PropertySize::Eight),
            offset::VS => (VERSION.0 as u64, PropertySize::Four),
            offset::CC => (c.cc.0 as u64, PropertySize::Four),
            offset::CSTS => (c.csts.0 as u64, PropertySize::Four),
            _ => return Err(Status::INVALID_FIELD),
        };
        if want != size {
            return Err(Status::INVALID_FIELD);
        }
        Ok(v)
    }

    fn prop_set(
        &mut self,
        now: Instant,
        ci: usize,
        off: u32,
        size: PropertySize,
        v: u64,
    ) -> Result<(), Status> {
        if off != offset::CC || size != PropertySize::Four || v > u32::MAX as u64 {
            return Err(Status::INVALID_FIELD);
        }
        self.set_cc(now, ci, Cc(v as u32));
        Ok(())
    }

    /// Applies a write to CC: enable (CSTS.RDY), reset (I/O queues end, AERs aborted) and
    /// shutdown notification (SHST complete once outstanding I/O has drained).
    pub(crate) fn set_cc(&mut self, now: Instant, ci: usize, new: Cc) {
        let _ = now;
        let Some(Some(c)) = self.ctrls.get_mut(ci) else {
            return;
        };
        let old = c.cc;
        c.cc = new;
        if new.en() && !old.en() {
            let io_ok = c.subsys == DISCOVERY || (new.iosqes() == 6 && new.iocqes() == 4);
            if new.css() == 0 && new.mps() == 0 && new.ams() == 0 && io_ok {
                c.csts.set_rdy(true);
                c.csts.set_cfs(false);
            } else {
                c.csts.set_cfs(true);
            }
        }
        if !new.en() && old.en() {
            self.reset_controller(ci);
            return;
        }
        let Some(Some(c)) = self.ctrls.get_mut(ci) else {
            return;
        };
        if new.shn() != Cc::SHN_NONE && old.shn() == Cc::SHN_NONE {
            c.csts.set_shst(Csts::SHST_OCCURRING);
            c.shutdown_pending = true;
            if c.outstanding == 0 {
                c.shutdown_pending = false;
                c.csts.set_shst(Csts::SHST_COMPLETE);
            }
        }
    }

    /// Controller Level Reset by CC.EN 1 -> 0: I/O queues end, AERs are aborted, CSTS clears.
    fn reset_controller(&mut self, ci: usize) {
        let Some(Some(c)) = self.ctrls.get_mut(ci) else {
            return;
        };
        let qs: Vec<QueueId> = c.io_qs.iter_mut().filter_map(|x| x.take()).collect();
        let aers = core::mem::take(&mut c.aers);
        c.csts = Csts(0);
        c.shutdown_pending = false;
        c.aen_pending.clear();
        let aq = c.admin_q;
        for q in qs {
            if let Some(qi) = self.queue_index(q)
                && self.queues[qi].state == QState::Connected
            {
                self.terminate_queue(qi);
            }
        }
        for (cid, cookie) in aers {
            if let Some(q) = self.queue(aq) {
                let cqe = q.cqe(cid, Status::ABORTED_SQ_DELETION, 0);
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
        }
    }

    /// Reads a controller property of the controller owning admin queue `q` (for transports
    /// that expose registers directly, like the PCIe function's BAR0).
    pub fn property_get(&self, q: QueueId, offset: u32, size: PropertySize) -> Result<u64, Status> {
        let qi = self.queue_index(q).ok_or(Status::COMMAND_SEQUENCE_ERROR)?;
        let ci = self.ctrl_of(qi).ok_or(Status::COMMAND_SEQUENCE_ERROR)?;
        self.prop_get(ci, offset, size)
    }

    /// Writes a controller property (see [`Target::property_get`]).
    pub fn property_set(
        &mut self,
        now: Instant,
        q: QueueId,
        offset: u32,
        size: PropertySize,
        value: u64,
    ) -> Result<(), Status> {
        let qi = self.queue_index(q).ok_or(Status::COMMAND_SEQUENCE_ERROR)?;
        let ci = self.ctrl_of(qi).ok_or(Status::COMMAND_SEQUENCE_ERROR)?;
        self.prop_set(now, ci, offset, size, value)
    }

    /// Creates a controller without a Connect command, for a memory-based transport (the
    /// emulated PCIe function). Returns its admin queue. The transport handles Create/Delete
    /// I/O SQ/CQ itself and calls [`Target::attach_local_io_queue`] / [`Target::close_queue`].
    /// The queues it gets (admin and I/O) have owner `owner` (see [`Target::open_queue_for`]).
    pub fn create_local_controller(
        &mut self,
        now: Instant,
        subnqn: &str,
        owner: u16,
    ) -> Result<QueueId, TargetError> {
        let si = self
            .subsys_index(subnqn)
            .ok_or(TargetError::UnknownSubsystem)?;
        if si == DISCOVERY {
            return Err(TargetError::UnknownSubsystem);
        }
        let ci = self
            .ctrls
            .iter()
            .position(|c| c.is_none())
            .ok_or(TargetError::TooManyControllers)?;
        let q = self.open_queue_for(owner)?;
        let qi = q.index as usize;
        let cntlid = self.alloc_cntlid();
        let ctrl = self.new_controller(cntlid, si, String::new(), [0; 16], true, q, 0, now);
        self.ctrls[ci] = Some(ctrl);
        self.ensure_flows(ci);
        let queue = &mut self.queues[qi];
        queue.state = QState::Connected;
        queue.ctrl = ci;
        queue.cntlid = cntlid;
        queue.qid = 0;
        queue.sqsize = self.limits.admin_queue_depth.saturating_sub(1).max(1);
        queue.sqhd = 0;
        Ok(q)
    }

    /// Attaches I/O queue `qid` (1-based, at most the negotiated count) of `sqsize + 1`
    /// entries to the local controller owning `admin`. Errors are the Create I/O SQ statuses.
    pub fn attach_local_io_queue(
        &mut self,
        admin: QueueId,
        qid: u16,
        sqsize: u16,
    ) -> Result<QueueId, Status> {
        let aqi = self
            .queue_index(admin)
            .ok_or(Status::COMMAND_SEQUENCE_ERROR)?;
        let ci = self.ctrl_of(aqi).ok_or(Status::COMMAND_SEQUENCE_ERROR)?;
        let (local, nrq, taken, rdy) = {
            let c = self.ctrls[ci].as_ref().ok_or(Status::INTERNAL_ERROR)?;
            let taken = (qid as usize)
                .checked_sub(1)
                .and_then(|i| c.io_qs.get(i))
                .map(|x| x.is_some())
                .unwrap_or(true);
            (c.local, c.nr_io_queues, taken, c.csts.rdy())
        };
        if !local || self.queues[aqi].qid != 0 || !rdy {
            return Err(Status::COMMAND_SEQUENCE_ERROR);
        }
        if qid == 0 || qid > nrq || taken {
            return Err(Status::INVALID_QUEUE_IDENTIFIER);
        }
        if sqsize == 0 || sqsize > self.cap().mqes() {
            return Err(Status::INVALID_QUEUE_SIZE);
        }
        let q = self
            .open_queue_for(admin.owner)
            .map_err(|_| Status::INTERNAL_ERROR)?;
        self.install_io_queue(ci, q.index as usize, qid, sqsize, false);
        Ok(q)
    }
}
