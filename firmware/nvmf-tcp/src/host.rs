//! Host-side (initiator) connection state machine (NVMe/TCP 1.0 §3.3 ICReq/ICResp, §3.4 data
//! transfers from the host's point of view, §3.5 termination). Framing, the transmit cursor,
//! TermReq and close are the connection core's ([`Connection`]); this module is the host's
//! PDU handling: command capsules and H2CData out, CapsuleResp, C2HData and R2T in.

use alloc::vec::Vec;

use keel_nvme::opcode::FABRICS_OPCODE;
use keel_nvme::{Cqe, DataDirection, SglDescriptor, Sqe, Status};

use crate::conn::{ConnState, Connection, Core, PduOf, Role, RxData, RxPdu};
use crate::pdu::{FatalError, Header, PduFlags, PduType, Repr, field};
use crate::rx::{DataLimits, PduInfo};
use crate::target::{ConfigError, MAX_SLOTS, MIN_IN_CAPSULE};
use crate::{CloseReason, Digests, RejectReason, Rejected};

/// Most R2Ts we track per command (MAXR2T is clamped to this − 1).
pub const MAX_R2T_PER_COMMAND: usize = 16;

/// Host connection parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostConfig {
    /// HPDA we ask for (0's based dwords, 0-31).
    pub hpda: u8,
    /// Digests we ask for.
    pub digests: Digests,
    /// MAXR2T we advertise (0's based; clamped to [`MAX_R2T_PER_COMMAND`] − 1).
    pub maxr2t: u32,
    /// Command slots (queue depth); CIDs are the slot numbers.
    pub slots: u16,
    /// Largest write sent as in-capsule data on this queue (IOCCSZ×16 − 64 for I/O queues);
    /// fabrics commands may always use up to 8 KiB. 0 forces R2T for every write.
    pub in_capsule_limit: u32,
    /// The Connect on this connection disables SQ flow control (NVMe-oF Connect CATTR bit 2):
    /// the controller may then end a read with a C2HData PDU carrying the SUCCESS flag and
    /// no response capsule (NVMe/TCP 1.0 §3.6.2.8). Without it a SUCCESS flag is a fatal
    /// error (Invalid PDU Header Field, FLAGS): the CQE's SQ Head Pointer, which the SUCCESS
    /// optimisation leaves out, is what SQ flow control needs.
    pub sq_flow_control_disabled: bool,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            hpda: 0,
            digests: Digests::default(),
            maxr2t: 0,
            slots: 128,
            in_capsule_limit: MIN_IN_CAPSULE,
            sq_flow_control_disabled: false,
        }
    }
}

/// Host connection state (the connection core's).
pub type HostState = ConnState;

/// Events for the host application.
#[derive(Debug)]
pub enum HostEvent<B> {
    /// ICResp accepted.
    Connected {
        /// The controller's MAXH2CDATA.
        maxh2cdata: u32,
        /// Negotiated digests.
        digests: Digests,
    },
    /// A command completed. A data digest error on its C2H data replaces the status with
    /// Transient Transport Error. With the C2HData SUCCESS optimisation the CQE is synthesised
    /// (CID set, everything else 0).
    Completion {
        /// Command identifier (the one `submit` returned).
        cid: u16,
        /// The completion queue entry.
        cqe: Cqe,
        /// The buffer given to `submit`, with read data in it.
        buf: Option<B>,
    },
    /// Closed; outstanding commands' buffers have been returned in `Completion`-less
    /// `Aborted` events before this.
    Closed {
        /// Why.
        reason: CloseReason,
    },
    /// A command that will never complete because the connection closed.
    Aborted {
        /// Command identifier.
        cid: u16,
        /// Its buffer.
        buf: Option<B>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Free,
    /// CapsuleCmd waiting to be sent.
    Queued,
    /// Sent, waiting for data/response.
    Sent,
    /// Response arrived while its data PDU was still being written.
    RespWhileSending,
    /// Completion event pending.
    Done,
    /// Aborted event pending.
    Aborted,
}

#[derive(Debug, Clone, Copy, Default)]
struct R2t {
    ttag: u16,
    off: u32,
    len: u32,
}

#[derive(Debug)]
struct Slot<B> {
    st: St,
    sqe: [u8; 64],
    buf: Option<B>,
    len: u32,
    dir: DataDirection,
    in_capsule: bool,
    // R2T-driven host-to-controller data.
    r2ts: [R2t; MAX_R2T_PER_COMMAND],
    r2t_head: usize,
    r2t_count: usize,
    r2t_next_off: u32,
    h2c_sent: u32,
    // Controller-to-host data.
    c2h_off: u32,
    failed: bool,
    cqe: Cqe,
}

impl<B> Slot<B> {
    fn new() -> Self {
        Self {
            st: St::Free,
            sqe: [0; 64],
            buf: None,
            len: 0,
            dir: DataDirection::None,
            in_capsule: false,
            r2ts: [R2t::default(); MAX_R2T_PER_COMMAND],
            r2t_head: 0,
            r2t_count: 0,
            r2t_next_off: 0,
            h2c_sent: 0,
            c2h_off: 0,
            failed: false,
            cqe: Cqe::default(),
        }
    }
}

/// The host role of a connection: its command slots (CIDs are slot numbers) and the PDU
/// handling of an initiator.
#[derive(Debug)]
pub struct HostRole<B> {
    cfg: HostConfig,
    cpda: u8,
    maxh2cdata: u32,
    slots: Vec<Slot<B>>,
    rx_slot: Option<u16>,
    rx_success: bool,
}

/// The host side of one NVMe/TCP connection, sans-IO. Memory is allocated in `new` only.
pub type HostConnection<B> = Connection<HostRole<B>>;

impl<B: AsRef<[u8]> + AsMut<[u8]>> Connection<HostRole<B>> {
    /// A new connection; the ICReq is queued for `transmit`.
    pub fn new(mut cfg: HostConfig) -> Result<Self, ConfigError> {
        if cfg.slots == 0 || cfg.slots > MAX_SLOTS {
            return Err(ConfigError::Slots);
        }
        cfg.hpda = cfg.hpda.min(31);
        cfg.maxr2t = cfg.maxr2t.min(MAX_R2T_PER_COMMAND as u32 - 1);
        let n = cfg.slots as usize;
        let mut slots = Vec::with_capacity(n);
        slots.resize_with(n, Slot::new);
        let role = HostRole {
            cfg,
            cpda: 0,
            maxh2cdata: 4096,
            slots,
            rx_slot: None,
            rx_success: false,
        };
        Ok(Self::with_role(role, n, true))
    }

    /// Change the in-capsule write limit (after reading IOCCSZ from Identify Controller).
    pub fn set_in_capsule_limit(&mut self, bytes: u32) {
        self.role.cfg.in_capsule_limit = bytes;
    }

    /// Submit a command. The CID in `sqe` is replaced by the slot number (returned), and the
    /// DPTR SGL and PSDT are filled in: in-capsule for host-to-controller data within the
    /// limit, otherwise a transport SGL (R2T for writes, C2HData for reads). `data` is the
    /// buffer and its transfer length.
    pub fn submit(&mut self, mut sqe: Sqe, data: Option<(B, u32)>) -> Result<u16, Rejected<B>> {
        let (buf, len) = match data {
            Some((b, l)) => (Some(b), l),
            None => (None, 0),
        };
        if self.core.state != ConnState::Ready {
            let r = if self.core.running() {
                RejectReason::NotReady
            } else {
                RejectReason::Closed
            };
            return Err(Rejected::new(r, buf));
        }
        if buf
            .as_ref()
            .is_some_and(|b| b.as_ref().len() < len as usize)
        {
            return Err(Rejected::new(RejectReason::InvalidLength, buf));
        }
        let h = &mut self.role;
        let Some(idx) = h.slots.iter().position(|s| s.st == St::Free) else {
            return Err(Rejected::new(RejectReason::QueueFull, buf));
        };
        let dir = sqe.data_direction();
        let limit = if sqe.opcode == FABRICS_OPCODE {
            h.cfg.in_capsule_limit.max(MIN_IN_CAPSULE)
        } else {
            h.cfg.in_capsule_limit
        };
        let in_capsule = dir == DataDirection::HostToController && len > 0 && len <= limit;
        sqe.cid = idx as u16;
        sqe.set_sgl(if in_capsule {
            SglDescriptor::in_capsule(0, len)
        } else {
            SglDescriptor::transport(len)
        });
        let s = &mut h.slots[idx];
        *s = Slot::new();
        s.st = St::Queued;
        s.sqe = sqe.to_bytes();
        s.buf = buf;
        s.len = len;
        s.dir = dir;
        s.in_capsule = in_capsule;
        self.core.txq.push(idx);
        Ok(idx as u16)
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Role for HostRole<B> {
    type Event = HostEvent<B>;
    const TARGET: bool = false;

    fn data_limits(&self) -> DataLimits {
        DataLimits {
            max_capsule_data: 0,
            max_data_pdu: u32::MAX,
            align: (self.cfg.hpda as u32 + 1) * 4,
        }
    }

    fn on_ic(&mut self, core: &mut Core, h: &Header<&[u8]>) -> Result<(), FatalError> {
        let got = h.ic_digests();
        if got != self.cfg.digests {
            return Err(FatalError::field(field::IC_DGST));
        }
        let m = h.ic_max();
        if m < 4096 || !m.is_multiple_of(4) {
            return Err(FatalError::field(field::IC_MAX.start));
        }
        core.digests = got;
        self.cpda = h.pda();
        self.maxh2cdata = m;
        Ok(())
    }

    fn on_header(&mut self, core: &mut Core, pdu: &RxPdu) -> Result<bool, FatalError> {
        let (info, h) = (pdu.info, &pdu.hdr);
        match info.ty {
            PduType::CapsuleResp => {
                let cqe = Cqe::from_bytes(&h.cqe());
                let cid = usize::from(cqe.cid);
                match self.slots.get_mut(cid) {
                    Some(s) if s.st == St::Sent => {
                        s.cqe = cqe;
                        self.rx_slot = Some(cid as u16);
                        Ok(true)
                    }
                    _ => Err(FatalError::field(field::CAPSULE_CQE.start + 12)),
                }
            }
            PduType::C2HData => {
                let (cccid, off, len) = (h.cccid(), h.data_offset(), h.data_length());
                if len != info.data_len {
                    return Err(FatalError::field(field::DATA_LENGTH.start));
                }
                let last = info.flags.contains(PduFlags::LAST_PDU);
                let success = info.flags.contains(PduFlags::SUCCESS);
                // SUCCESS only on the last PDU of a transfer, and only where SQ flow control is
                // disabled (NVMe/TCP 1.0 §3.6.2.8; Linux's host checks the first).
                if success && (!last || !self.cfg.sq_flow_control_disabled) {
                    return Err(FatalError::field(field::FLAGS));
                }
                let Some(s) = self.slots.get_mut(cccid as usize) else {
                    return Err(FatalError::field(field::DATA_CCCID.start));
                };
                if s.st != St::Sent || s.dir == DataDirection::HostToController || s.buf.is_none() {
                    return Err(FatalError::field(field::DATA_CCCID.start));
                }
                if off != s.c2h_off || off as u64 + len as u64 > s.len as u64 {
                    return Err(FatalError::DataOutOfRange);
                }
                self.rx_slot = Some(cccid);
                self.rx_success = success;
                Ok(true)
            }
            PduType::R2T => {
                let (cccid, ttag, off, len) =
                    (h.cccid(), h.ttag(), h.data_offset(), h.data_length());
                let cap = self.cfg.maxr2t as usize + 1;
                let Some(s) = self.slots.get_mut(cccid as usize) else {
                    return Err(FatalError::field(field::DATA_CCCID.start));
                };
                if s.st != St::Sent || s.dir != DataDirection::HostToController || s.in_capsule {
                    return Err(FatalError::field(field::DATA_CCCID.start));
                }
                if len == 0 {
                    return Err(FatalError::field(field::DATA_LENGTH.start));
                }
                if off != s.r2t_next_off || off as u64 + len as u64 > s.len as u64 {
                    return Err(FatalError::DataOutOfRange);
                }
                if s.r2t_count >= cap {
                    return Err(FatalError::DataLimitExceeded);
                }
                let at = (s.r2t_head + s.r2t_count) % MAX_R2T_PER_COMMAND;
                s.r2ts[at] = R2t { ttag, off, len };
                s.r2t_count += 1;
                s.r2t_next_off = off + len;
                core.txq.push(cccid as usize);
                Ok(true)
            }
            _ => Err(FatalError::field(field::PDU_TYPE)),
        }
    }

    fn rx_data(&mut self, n: usize) -> RxData<'_> {
        let dst = self.rx_slot.and_then(|i| {
            let s = self.slots.get_mut(i as usize)?;
            let at = s.c2h_off as usize;
            s.c2h_off += n as u32;
            s.buf.as_mut()?.as_mut().get_mut(at..at + n)
        });
        match dst {
            Some(d) => RxData::Into(d),
            None => RxData::Skip,
        }
    }

    fn on_pdu_done(&mut self, core: &mut Core, info: PduInfo, ddgst_ok: bool) {
        let success = core::mem::take(&mut self.rx_success);
        let Some(i) = self.rx_slot.take() else {
            return;
        };
        let idx = i as usize;
        let tx_busy = core.tx_busy() == Some(i);
        let Some(s) = self.slots.get_mut(idx) else {
            return;
        };
        if !ddgst_ok {
            s.failed = true;
        }
        let complete = match info.ty {
            PduType::CapsuleResp => true,
            PduType::C2HData if success => {
                s.cqe = Cqe::new(i, Status::SUCCESS);
                true
            }
            _ => false,
        };
        if complete {
            if s.failed {
                s.cqe.status = Status::TRANSIENT_TRANSPORT_ERROR;
            }
            s.r2t_count = 0;
            if tx_busy {
                s.st = St::RespWhileSending;
            } else {
                s.st = St::Done;
                core.evq.push(idx);
            }
        }
    }

    fn ic_pdu(&self, _core: &Core) -> Repr {
        Repr::IcReq {
            pfv: 0,
            hpda: self.cfg.hpda,
            digests: self.cfg.digests,
            maxr2t: self.cfg.maxr2t,
        }
    }

    fn next_pdu(&mut self, core: &mut Core) -> bool {
        let dg = core.digests;
        let maxh2c = self.maxh2cdata;
        while let Some(i) = core.txq.pop() {
            let idx = i as usize;
            let Some(s) = self.slots.get_mut(idx) else {
                continue;
            };
            match s.st {
                St::Queued => {
                    let data_len = if s.in_capsule { s.len } else { 0 };
                    let repr = Repr::CapsuleCmd {
                        sqe: s.sqe,
                        data_len,
                    };
                    s.st = St::Sent;
                    return core.tx.start(&repr, dg, self.cpda, Some(PduOf::slot(i, 0)));
                }
                St::Sent if s.r2t_count > 0 => {
                    let r = s.r2ts[s.r2t_head];
                    let done = s.h2c_sent.saturating_sub(r.off);
                    let len = (r.len - done.min(r.len)).min(maxh2c);
                    let last = done + len >= r.len;
                    let repr = Repr::H2CData {
                        cccid: i,
                        ttag: r.ttag,
                        offset: r.off + done,
                        len,
                        last,
                    };
                    let off = r.off + done;
                    s.h2c_sent = off + len;
                    if last {
                        s.r2t_head = (s.r2t_head + 1) % MAX_R2T_PER_COMMAND;
                        s.r2t_count -= 1;
                    }
                    if s.r2t_count > 0 {
                        core.txq.push(idx);
                    }
                    return core
                        .tx
                        .start(&repr, dg, self.cpda, Some(PduOf::slot(i, off)));
                }
                _ => {}
            }
        }
        false
    }

    fn tx_data(&self, slot: u16) -> Option<&[u8]> {
        Some(self.slots.get(usize::from(slot))?.buf.as_ref()?.as_ref())
    }

    fn pdu_sent(&mut self, core: &mut Core, of: Option<PduOf>) {
        let Some(i) = of.map(|o| o.slot) else {
            return;
        };
        let running = core.running();
        if let Some(s) = self.slots.get_mut(i as usize) {
            if s.st == St::RespWhileSending {
                s.st = St::Done;
                core.evq.push(i as usize);
            } else if !running && matches!(s.st, St::Sent | St::Queued) {
                s.st = St::Aborted;
                core.evq.push(i as usize);
            }
        }
    }

    fn drop_all(&mut self, core: &mut Core) {
        let busy = core.tx_busy();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if matches!(s.st, St::Queued | St::Sent | St::RespWhileSending)
                && busy != Some(i as u16)
            {
                s.st = St::Aborted;
                core.evq.push(i);
            }
        }
    }

    fn deadline(&self, _state: ConnState, _now_ms: u64) -> Option<CloseReason> {
        None
    }

    fn connected_event(&self, core: &Core) -> Option<HostEvent<B>> {
        Some(HostEvent::Connected {
            maxh2cdata: self.maxh2cdata,
            digests: core.digests,
        })
    }

    fn slot_event(&mut self, idx: u16) -> Option<HostEvent<B>> {
        let s = self.slots.get_mut(usize::from(idx))?;
        let ev = match s.st {
            St::Done => HostEvent::Completion {
                cid: idx,
                cqe: s.cqe,
                buf: s.buf.take(),
            },
            St::Aborted => HostEvent::Aborted {
                cid: idx,
                buf: s.buf.take(),
            },
            _ => return None,
        };
        s.st = St::Free;
        Some(ev)
    }

    fn closed_event(reason: CloseReason) -> HostEvent<B> {
        HostEvent::Closed { reason }
    }

    fn heap_bytes(&self) -> usize {
        self.slots.capacity() * core::mem::size_of::<Slot<B>>()
    }
}
