//! Host-side (initiator) connection state machine (NVMe/TCP 1.0 §3.3 ICReq/ICResp, §3.4 data
//! transfers from the host's point of view, §3.5 termination).

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use crate::capsule::{self, Direction, FABRICS_OPCODE, SGL_IN_CAPSULE, SGL_TRANSPORT, Sgl, Status};
use crate::crc32c::copy_and_crc;
use crate::pdu::{
    DGST_DDGST, DGST_HDGST, Digests, FLAG_LAST_PDU, FLAG_SUCCESS, FatalError, Header, PduType,
    Repr, TERM_MAX_DATA, field,
};
use crate::rx::{Limits, Phase, RxCore};
use crate::target::{ConfigError, MAX_SLOTS, MIN_IN_CAPSULE, TxCur};
use crate::{CloseReason, RejectReason, Rejected};

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
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            hpda: 0,
            digests: Digests::default(),
            maxr2t: 0,
            slots: 128,
            in_capsule_limit: MIN_IN_CAPSULE,
        }
    }
}

/// Host connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    /// ICReq sent (or queued), waiting for ICResp.
    AwaitIcResp,
    /// Commands may be submitted.
    Ready,
    /// Fatal error: H2CTermReq queued.
    Terminating,
    /// Closed.
    Closed,
}

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
        cqe: [u8; 16],
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
    dir: Direction,
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
    cqe: [u8; 16],
    txq: bool,
    evq: bool,
}

impl<B> Slot<B> {
    fn new() -> Self {
        Self {
            st: St::Free,
            sqe: [0; 64],
            buf: None,
            len: 0,
            dir: Direction::None,
            in_capsule: false,
            r2ts: [R2t::default(); MAX_R2T_PER_COMMAND],
            r2t_head: 0,
            r2t_count: 0,
            r2t_next_off: 0,
            h2c_sent: 0,
            c2h_off: 0,
            failed: false,
            cqe: [0; 16],
            txq: false,
            evq: false,
        }
    }
}

/// The host side of one NVMe/TCP connection, sans-IO. Memory is allocated in `new` only.
#[derive(Debug)]
pub struct HostConnection<B> {
    cfg: HostConfig,
    state: HostState,
    digests: Digests,
    cpda: u8,
    maxh2cdata: u32,
    slots: Vec<Slot<B>>,
    evq: VecDeque<u16>,
    txq: VecDeque<u16>,
    rx: RxCore,
    rx_slot: Option<u16>,
    rx_success: bool,
    tx: TxCur,
    tx_slot: Option<u16>,
    tx_after: Option<u16>,
    icreq_pending: bool,
    connected_event: bool,
    term_pending: Option<FatalError>,
    term_hdr: [u8; TERM_MAX_DATA],
    term_hdr_len: usize,
    close_reason: Option<CloseReason>,
    closed_event_pending: bool,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> HostConnection<B> {
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
        Ok(Self {
            cfg,
            state: HostState::AwaitIcResp,
            digests: Digests::default(),
            cpda: 0,
            maxh2cdata: 4096,
            slots,
            evq: VecDeque::with_capacity(n),
            txq: VecDeque::with_capacity(n),
            rx: RxCore::new(),
            rx_slot: None,
            rx_success: false,
            tx: TxCur::new(),
            tx_slot: None,
            tx_after: None,
            icreq_pending: true,
            connected_event: false,
            term_pending: None,
            term_hdr: [0; TERM_MAX_DATA],
            term_hdr_len: 0,
            close_reason: None,
            closed_event_pending: false,
        })
    }

    /// Current state.
    pub fn state(&self) -> HostState {
        self.state
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close_reason
    }

    /// Change the in-capsule write limit (after reading IOCCSZ from Identify Controller).
    pub fn set_in_capsule_limit(&mut self, bytes: u32) {
        self.cfg.in_capsule_limit = bytes;
    }

    /// Whether `transmit` has something to send.
    pub fn wants_transmit(&self) -> bool {
        self.state != HostState::Closed
            && (self.tx.active
                || self.term_pending.is_some()
                || self.icreq_pending
                || (self.state == HostState::Ready && !self.txq.is_empty()))
    }

    fn running(&self) -> bool {
        matches!(self.state, HostState::AwaitIcResp | HostState::Ready)
    }

    /// Close locally.
    pub fn close(&mut self) {
        self.close_now(CloseReason::Local);
    }

    /// Submit a command. The CID in `sqe` is replaced by the slot number (returned), and the
    /// DPTR SGL and PSDT are filled in: in-capsule for host-to-controller data within the
    /// limit, otherwise a transport SGL (R2T for writes, C2HData for reads). `data` is the
    /// buffer and its transfer length.
    pub fn submit(
        &mut self,
        mut sqe: [u8; 64],
        data: Option<(B, u32)>,
    ) -> Result<u16, Rejected<B>> {
        let (buf, len) = match data {
            Some((b, l)) => (Some(b), l),
            None => (None, 0),
        };
        if self.state != HostState::Ready {
            let r = if self.running() {
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
        let Some(idx) = self.slots.iter().position(|s| s.st == St::Free) else {
            return Err(Rejected::new(RejectReason::QueueFull, buf));
        };
        let dir = capsule::direction(&sqe);
        let limit = if capsule::opcode(&sqe) == FABRICS_OPCODE {
            self.cfg.in_capsule_limit.max(MIN_IN_CAPSULE)
        } else {
            self.cfg.in_capsule_limit
        };
        let in_capsule = dir == Direction::HostToController && len > 0 && len <= limit;
        capsule::set_cid(&mut sqe, idx as u16);
        capsule::set_sgl(
            &mut sqe,
            Sgl {
                address: 0,
                length: len,
                id: if in_capsule {
                    SGL_IN_CAPSULE
                } else {
                    SGL_TRANSPORT
                },
            },
        );
        let s = &mut self.slots[idx];
        *s = Slot::new();
        s.st = St::Queued;
        s.sqe = sqe;
        s.buf = buf;
        s.len = len;
        s.dir = dir;
        s.in_capsule = in_capsule;
        self.push_tx(idx);
        Ok(idx as u16)
    }

    fn limits(&self) -> Limits {
        Limits {
            target: false,
            digests: self.digests,
            max_capsule_data: 0,
            max_data_pdu: u32::MAX,
            align: (self.cfg.hpda as u32 + 1) * 4,
            ic_done: self.state != HostState::AwaitIcResp,
        }
    }

    /// Feed received bytes; always consumes everything.
    pub fn recv(&mut self, _now_ms: u64, bytes: &[u8]) -> usize {
        let mut input = bytes;
        loop {
            if !self.running() {
                return bytes.len();
            }
            match self.rx.phase {
                Phase::Header => {
                    if input.is_empty() {
                        break;
                    }
                    let lim = self.limits();
                    match self.rx.take_header(&mut input, &lim) {
                        Ok(false) => break,
                        Ok(true) => self.rx.phase = Phase::HeaderDone,
                        Err(e) => self.fatal(e),
                    }
                }
                Phase::HeaderDone => match self.on_header() {
                    Err(e) => self.fatal(e),
                    Ok(()) => {
                        if self.rx.start_payload() {
                            self.on_pdu_done(true);
                        }
                    }
                },
                Phase::Pad { .. } => {
                    if input.is_empty() {
                        break;
                    }
                    self.rx.skip_pad(&mut input);
                }
                Phase::Data { left } => {
                    if input.is_empty() {
                        break;
                    }
                    let n = (left as usize).min(input.len());
                    let ddgst = self.rx.info.is_some_and(|i| i.ddgst);
                    let src = &input[..n];
                    let dst = self.rx_slot.and_then(|i| {
                        let s = self.slots.get_mut(i as usize)?;
                        let at = s.c2h_off as usize;
                        s.c2h_off += n as u32;
                        s.buf.as_mut()?.as_mut().get_mut(at..at + n)
                    });
                    match dst {
                        Some(d) if ddgst => {
                            copy_and_crc(d, src, &mut self.rx.crc);
                        }
                        Some(d) => d.copy_from_slice(src),
                        None if ddgst => self.rx.crc.update(src),
                        None => {}
                    }
                    input = &input[n..];
                    self.rx.data_advanced(n as u32);
                }
                Phase::Ddgst => match self.rx.take_ddgst(&mut input) {
                    None => break,
                    Some(ok) => self.on_pdu_done(ok),
                },
            }
        }
        bytes.len() - input.len()
    }

    fn on_header(&mut self) -> Result<(), FatalError> {
        let Some(info) = self.rx.info else {
            return Err(FatalError::PduSequence);
        };
        let Ok(h) = Header::new_checked(&self.rx.hdr[..self.rx.have]) else {
            return Err(FatalError::field(field::HLEN));
        };
        self.rx_slot = None;
        self.rx_success = false;
        match info.ty {
            PduType::IcResp => {
                if h.pfv() != 0 {
                    return Err(FatalError::UnsupportedParameter {
                        offset: field::IC_PFV.start as u32,
                    });
                }
                if h.pda() > 31 {
                    return Err(FatalError::field(field::IC_PDA));
                }
                let want = self.cfg.digests;
                let got = Digests {
                    header: h.dgst() & DGST_HDGST != 0,
                    data: h.dgst() & DGST_DDGST != 0,
                };
                if got != want {
                    return Err(FatalError::field(field::IC_DGST));
                }
                let m = h.ic_max();
                if m < 4096 || !m.is_multiple_of(4) {
                    return Err(FatalError::field(field::IC_MAX.start));
                }
                self.digests = got;
                self.cpda = h.pda();
                self.maxh2cdata = m;
                self.state = HostState::Ready;
                self.connected_event = true;
                Ok(())
            }
            PduType::C2HTermReq => {
                self.close_now(CloseReason::PeerTerminated {
                    fes: h.fes(),
                    fei: h.fei(),
                });
                Ok(())
            }
            PduType::CapsuleResp => {
                let cqe = h.cqe();
                let cid = capsule::cqe_cid(&cqe) as usize;
                match self.slots.get_mut(cid) {
                    Some(s) if s.st == St::Sent => {
                        s.cqe = cqe;
                        self.rx_slot = Some(cid as u16);
                        Ok(())
                    }
                    _ => Err(FatalError::field(field::CAPSULE_CQE.start + 12)),
                }
            }
            PduType::C2HData => {
                let (cccid, off, len) = (h.cccid(), h.data_offset(), h.data_length());
                if len != info.data_len {
                    return Err(FatalError::field(field::DATA_LENGTH.start));
                }
                let last = info.flags & FLAG_LAST_PDU != 0;
                let success = info.flags & FLAG_SUCCESS != 0;
                if success && !last {
                    return Err(FatalError::field(field::FLAGS));
                }
                let Some(s) = self.slots.get_mut(cccid as usize) else {
                    return Err(FatalError::field(field::DATA_CCCID.start));
                };
                if s.st != St::Sent || s.dir == Direction::HostToController || s.buf.is_none() {
                    return Err(FatalError::field(field::DATA_CCCID.start));
                }
                if off != s.c2h_off || off as u64 + len as u64 > s.len as u64 {
                    return Err(FatalError::DataOutOfRange);
                }
                self.rx_slot = Some(cccid);
                self.rx_success = success;
                Ok(())
            }
            PduType::R2T => {
                let (cccid, ttag, off, len) =
                    (h.cccid(), h.ttag(), h.data_offset(), h.data_length());
                let cap = self.cfg.maxr2t as usize + 1;
                let Some(s) = self.slots.get_mut(cccid as usize) else {
                    return Err(FatalError::field(field::DATA_CCCID.start));
                };
                if s.st != St::Sent || s.dir != Direction::HostToController || s.in_capsule {
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
                self.push_tx(cccid as usize);
                Ok(())
            }
            _ => Err(FatalError::field(field::PDU_TYPE)),
        }
    }

    fn on_pdu_done(&mut self, ddgst_ok: bool) {
        let info = self.rx.info;
        self.rx.reset();
        let (Some(info), Some(i)) = (info, self.rx_slot.take()) else {
            return;
        };
        let idx = i as usize;
        let tx_busy = self.tx.active && self.tx_slot == Some(i);
        let Some(s) = self.slots.get_mut(idx) else {
            return;
        };
        if !ddgst_ok {
            s.failed = true;
        }
        let complete = match info.ty {
            PduType::CapsuleResp => true,
            PduType::C2HData if self.rx_success => {
                s.cqe = [0; 16];
                s.cqe[12..14].copy_from_slice(&i.to_le_bytes());
                true
            }
            _ => false,
        };
        if complete {
            if s.failed {
                let phase = capsule::cqe_status(&s.cqe) & 1;
                let st = Status::TRANSIENT_TRANSPORT_ERROR.to_field() | phase;
                s.cqe[14..16].copy_from_slice(&st.to_le_bytes());
            }
            s.r2t_count = 0;
            if tx_busy {
                s.st = St::RespWhileSending;
            } else {
                s.st = St::Done;
                self.push_event(idx);
            }
        }
    }

    fn push_event(&mut self, idx: usize) {
        if let Some(s) = self.slots.get_mut(idx)
            && !s.evq
        {
            s.evq = true;
            self.evq.push_back(idx as u16);
        }
    }

    fn push_tx(&mut self, idx: usize) {
        if let Some(s) = self.slots.get_mut(idx)
            && !s.txq
        {
            s.txq = true;
            self.txq.push_back(idx as u16);
        }
    }

    fn fatal(&mut self, e: FatalError) {
        if !self.running() {
            return;
        }
        let h = self.rx.header();
        let n = h.len().min(TERM_MAX_DATA);
        self.term_hdr[..n].copy_from_slice(&h[..n]);
        self.term_hdr_len = n;
        self.term_pending = Some(e);
        self.state = HostState::Terminating;
        self.close_reason = Some(CloseReason::Fatal(e));
        self.abort_all();
    }

    fn close_now(&mut self, reason: CloseReason) {
        if self.state == HostState::Closed {
            return;
        }
        self.state = HostState::Closed;
        self.close_reason.get_or_insert(reason);
        self.term_pending = None;
        self.tx.active = false;
        self.tx_slot = None;
        self.abort_all();
        self.closed_event_pending = true;
    }

    fn abort_all(&mut self) {
        self.txq.clear();
        self.icreq_pending = false;
        for i in 0..self.slots.len() {
            let busy = self.tx.active && self.tx_slot == Some(i as u16);
            let s = &mut self.slots[i];
            s.txq = false;
            if matches!(s.st, St::Queued | St::Sent | St::RespWhileSending) && !busy {
                s.st = St::Aborted;
                self.push_event(i);
            }
        }
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<HostEvent<B>> {
        if self.connected_event {
            self.connected_event = false;
            return Some(HostEvent::Connected {
                maxh2cdata: self.maxh2cdata,
                digests: self.digests,
            });
        }
        while let Some(i) = self.evq.pop_front() {
            let Some(s) = self.slots.get_mut(i as usize) else {
                continue;
            };
            s.evq = false;
            match s.st {
                St::Done => {
                    s.st = St::Free;
                    return Some(HostEvent::Completion {
                        cid: i,
                        cqe: s.cqe,
                        buf: s.buf.take(),
                    });
                }
                St::Aborted => {
                    s.st = St::Free;
                    return Some(HostEvent::Aborted {
                        cid: i,
                        buf: s.buf.take(),
                    });
                }
                _ => {}
            }
        }
        if self.closed_event_pending {
            self.closed_event_pending = false;
            if let Some(reason) = self.close_reason {
                return Some(HostEvent::Closed { reason });
            }
        }
        None
    }

    /// Fill `out` with pending PDU bytes; returns the count.
    pub fn transmit(&mut self, out: &mut [u8]) -> usize {
        let mut n = 0;
        while n < out.len() {
            if !self.tx.active && !self.next_pdu() {
                break;
            }
            let data = if self.tx.data_len > 0 {
                self.tx_slot
                    .and_then(|i| self.slots.get(i as usize))
                    .and_then(|s| s.buf.as_ref())
                    .and_then(|b| b.as_ref().get(self.tx.data_off as usize..))
            } else {
                None
            };
            let (w, fin) = self.tx.write(&mut out[n..], data);
            n += w;
            if fin {
                self.finish_pdu();
            } else {
                break;
            }
        }
        n
    }

    fn next_pdu(&mut self) -> bool {
        let dg = self.digests;
        self.tx_slot = None;
        self.tx.data_off = 0;
        self.tx_after = None;
        if let Some(e) = self.term_pending.take() {
            let repr = Repr::TermReq {
                c2h: false,
                fes: e.fes(),
                fei: e.fei(),
                data_len: self.term_hdr_len as u8,
            };
            if self.tx.start(&repr, dg, 0) {
                let h = self.tx.hdr_len;
                let n = self.term_hdr_len;
                self.tx.hdr[h..h + n].copy_from_slice(&self.term_hdr[..n]);
                self.tx.hdr_len += n;
                self.tx.data_len = 0;
                self.tx.pad = 0;
                self.tx.ddgst = false;
                self.tx_after = Some(u16::MAX);
                return true;
            }
            self.close_now(CloseReason::Fatal(e));
            return false;
        }
        if self.icreq_pending {
            self.icreq_pending = false;
            let repr = Repr::IcReq {
                pfv: 0,
                hpda: self.cfg.hpda,
                digests: self.cfg.digests,
                maxr2t: self.cfg.maxr2t,
            };
            return self.tx.start(&repr, Digests::default(), 0);
        }
        if self.state != HostState::Ready {
            return false;
        }
        let maxh2c = self.maxh2cdata;
        while let Some(i) = self.txq.pop_front() {
            let idx = i as usize;
            let Some(s) = self.slots.get_mut(idx) else {
                continue;
            };
            s.txq = false;
            match s.st {
                St::Queued => {
                    let data_len = if s.in_capsule { s.len } else { 0 };
                    let repr = Repr::CapsuleCmd {
                        sqe: s.sqe,
                        data_len,
                    };
                    s.st = St::Sent;
                    self.tx_slot = Some(i);
                    return self.tx.start(&repr, dg, self.cpda);
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
                        self.push_tx(idx);
                    }
                    self.tx_slot = Some(i);
                    self.tx.data_off = off;
                    return self.tx.start(&repr, dg, self.cpda);
                }
                _ => {}
            }
        }
        false
    }

    fn finish_pdu(&mut self) {
        if self.tx_after == Some(u16::MAX) {
            self.state = HostState::Closed;
            self.closed_event_pending = true;
        }
        if let Some(i) = self.tx_slot.take() {
            let running = self.running();
            if let Some(s) = self.slots.get_mut(i as usize) {
                if s.st == St::RespWhileSending {
                    s.st = St::Done;
                    self.push_event(i as usize);
                } else if !running && matches!(s.st, St::Sent | St::Queued) {
                    s.st = St::Aborted;
                    self.push_event(i as usize);
                }
            }
        }
        self.tx.data_len = 0;
    }
}
