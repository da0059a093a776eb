//! The connection core shared by both roles (NVMe/TCP 1.0 §3.3 connection establishment, §3.5
//! termination, §3.6 PDU framing): the receive phases (common header → PDU-specific header →
//! header digest → padding → data → data digest, under any segmentation), the IC exchange's
//! common checks, the transmit cursor, the event and transmit queues, fatal errors (TermReq with
//! FES/FEI and the offending header, then close), the peer's TermReq, and close.
//!
//! A role supplies only its own PDU handling through the [`Role`] hooks: [`TargetRole`]
//! (capsules and H2CData in, R2T / C2HData / CapsuleResp out) and [`HostRole`] (the reverse).
//! `Connection<R>` is generic over the role, so every hook is a static call (no `dyn`) and
//! nothing is allocated per PDU: [`TargetConnection`] and [`HostConnection`] are this type with
//! their role.
//!
//! [`TargetRole`]: crate::target::TargetRole
//! [`HostRole`]: crate::host::HostRole
//! [`TargetConnection`]: crate::TargetConnection
//! [`HostConnection`]: crate::HostConnection

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use crate::CloseReason;
use crate::crc32c::{Crc32c, copy_and_crc, crc32c};
use crate::pdu::{DIGEST_LEN, Digests, FatalError, Header, PduType, Repr, TERM_MAX_DATA, field};
use crate::rx::{DataLimits, Limits, PduInfo, Phase, RxCore};
use keel_nvme::{Cqe, Sqe};

/// Where a connection is in its life (both roles: [`TargetState`](crate::TargetState) and
/// [`HostState`](crate::host::HostState) are this type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Waiting for the peer's IC PDU (target: ICReq; host: ICResp, its ICReq queued or sent).
    AwaitIc,
    /// IC exchange done; commands flow.
    Ready,
    /// Fatal error: our TermReq (C2HTermReq / H2CTermReq) is queued.
    Terminating,
    /// Closed: the application should flush what `transmit` produced and close the socket.
    Closed,
}

/// A FIFO of command-slot indices, each queued at most once (allocated for all slots up front).
#[derive(Debug)]
pub struct SlotQueue {
    order: VecDeque<u16>,
    queued: Vec<bool>,
}

impl SlotQueue {
    fn new(slots: usize) -> Self {
        Self {
            order: VecDeque::with_capacity(slots),
            queued: vec![false; slots],
        }
    }

    /// Queue slot `idx` unless it is already queued.
    pub fn push(&mut self, idx: usize) {
        if let Some(q) = self.queued.get_mut(idx)
            && !*q
        {
            *q = true;
            self.order.push_back(idx as u16);
        }
    }

    /// The oldest queued slot.
    pub fn pop(&mut self) -> Option<u16> {
        let i = self.order.pop_front()?;
        if let Some(q) = self.queued.get_mut(usize::from(i)) {
            *q = false;
        }
        Some(i)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn clear(&mut self) {
        for i in self.order.drain(..) {
            if let Some(q) = self.queued.get_mut(usize::from(i)) {
                *q = false;
            }
        }
    }

    fn heap_bytes(&self) -> usize {
        self.order.capacity() * core::mem::size_of::<u16>() + self.queued.capacity()
    }
}

/// The command slot a PDU we send belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PduOf {
    /// The slot (its buffer is the data source).
    pub slot: u16,
    /// Offset of the PDU's data in the slot's buffer.
    pub data_off: u32,
    /// The PDU ends its command on our side (target: the slot is released once it is out).
    pub ends_command: bool,
}

impl PduOf {
    /// A PDU of `slot` whose data (if any) starts at `data_off`.
    pub const fn slot(slot: u16, data_off: u32) -> Self {
        Self {
            slot,
            data_off,
            ends_command: false,
        }
    }

    /// The same PDU, ending its command.
    pub const fn ending(mut self) -> Self {
        self.ends_command = true;
        self
    }
}

/// The PDU being transmitted: its header bytes, then padding, data streamed from the slot's
/// buffer (with the data digest computed in the same pass) and the data digest.
#[derive(Debug)]
pub struct TxCur {
    hdr: [u8; 160],
    hdr_len: usize,
    pos: usize,
    pad: usize,
    /// The command slot this PDU belongs to, if any.
    of: Option<PduOf>,
    data_len: u32,
    ddgst: bool,
    crc: Crc32c,
    /// A PDU is being written.
    active: bool,
    close_after: bool,
}

impl TxCur {
    const fn new() -> Self {
        Self {
            hdr: [0; 160],
            hdr_len: 0,
            pos: 0,
            pad: 0,
            of: None,
            data_len: 0,
            ddgst: false,
            crc: Crc32c::new(),
            active: false,
            close_after: false,
        }
    }

    /// Start a PDU from a header repr, of command slot `of` (`None`: a connection PDU such as
    /// IC, TermReq or R2T); returns false if it cannot be encoded.
    pub fn start(&mut self, repr: &Repr, dg: Digests, pda: u8, of: Option<PduOf>) -> bool {
        match repr.emit(&mut self.hdr, dg, pda) {
            Ok(lay) => {
                self.of = of;
                self.close_after = false;
                self.hdr_len = lay.header_len;
                self.pad = if lay.data_len > 0 { lay.pad } else { 0 };
                self.data_len = lay.data_len as u32;
                self.ddgst = lay.ddgst_len > 0;
                self.pos = 0;
                self.crc = Crc32c::new();
                self.active = true;
                true
            }
            Err(_) => false,
        }
    }

    /// Start our TermReq (C2HTermReq from the target, H2CTermReq from the host) carrying the
    /// offending header; the connection closes once it is out.
    fn start_term(&mut self, c2h: bool, e: FatalError, offending: &[u8], dg: Digests) -> bool {
        let n = offending.len().min(TERM_MAX_DATA);
        let repr = Repr::TermReq {
            c2h,
            fes: e.fes(),
            fei: e.fei(),
            data_len: n as u8,
        };
        if !self.start(&repr, dg, 0, None) {
            return false;
        }
        // TermReq data is the offending header: make it part of the header bytes.
        let h = self.hdr_len;
        self.hdr[h..h + n].copy_from_slice(&offending[..n]);
        self.hdr_len += n;
        self.data_len = 0;
        self.pad = 0;
        self.ddgst = false;
        self.close_after = true;
        true
    }

    /// A PDU is partly written: nothing may go into the stream before its remaining bytes.
    pub fn is_active(&self) -> bool {
        self.active
    }

    fn total(&self) -> usize {
        self.hdr_len + self.pad + self.data_len as usize + if self.ddgst { 4 } else { 0 }
    }

    /// Write as much as possible into `out`; `data` is the data source (already offset to
    /// `data_off`). Returns bytes written and whether the PDU is complete.
    fn write(&mut self, out: &mut [u8], data: Option<&[u8]>) -> (usize, bool) {
        let mut n = 0;
        let hl = self.hdr_len;
        if self.pos < hl {
            let k = (hl - self.pos).min(out.len());
            out[..k].copy_from_slice(&self.hdr[self.pos..self.pos + k]);
            self.pos += k;
            n += k;
        }
        let p_end = hl + self.pad;
        if self.pos >= hl && self.pos < p_end {
            let k = (p_end - self.pos).min(out.len() - n);
            out[n..n + k].fill(0);
            self.pos += k;
            n += k;
        }
        let d_end = p_end + self.data_len as usize;
        if self.pos >= p_end && self.pos < d_end {
            let k = (d_end - self.pos).min(out.len() - n);
            let at = self.pos - p_end;
            let dst = &mut out[n..n + k];
            match data.and_then(|d| d.get(at..at + k)) {
                Some(src) => {
                    if self.ddgst {
                        copy_and_crc(dst, src, &mut self.crc);
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
                None => {
                    // Cannot happen: buffer lengths are checked when data is handed over.
                    dst.fill(0);
                    self.crc.update(dst);
                }
            }
            self.pos += k;
            n += k;
        }
        if self.ddgst && self.pos >= d_end && self.pos < d_end + 4 {
            let dg = self.crc.finish().to_le_bytes();
            let at = self.pos - d_end;
            let k = (4 - at).min(out.len() - n);
            out[n..n + k].copy_from_slice(&dg[at..at + k]);
            self.pos += k;
            n += k;
        }
        let fin = self.pos >= self.total();
        if fin {
            self.active = false;
        }
        (n, fin)
    }
}

/// The connection state both roles share, handed to the role's hooks.
#[derive(Debug)]
pub struct Core {
    /// Where the connection is.
    pub state: ConnState,
    /// Negotiated digests (none before the IC exchange).
    pub digests: Digests,
    /// The transmit cursor.
    pub tx: TxCur,
    /// Slots with an event for the application.
    pub evq: SlotQueue,
    /// Slots with a PDU to send.
    pub txq: SlotQueue,
    /// Our IC PDU (ICReq from the host, ICResp from the target) waits to be sent.
    pub ic_pending: bool,
    connected_event: bool,
    term_pending: Option<FatalError>,
    term_hdr: [u8; TERM_MAX_DATA],
    term_hdr_len: usize,
    close_reason: Option<CloseReason>,
    closed_event_pending: bool,
}

impl Core {
    /// Not terminating or closed.
    pub fn running(&self) -> bool {
        matches!(self.state, ConnState::AwaitIc | ConnState::Ready)
    }

    /// The slot whose PDU is being written, if one is.
    pub fn tx_busy(&self) -> Option<u16> {
        if self.tx.active {
            self.tx.of.map(|o| o.slot)
        } else {
            None
        }
    }
}

/// A received PDU's header, complete and digest-checked, and what framing learnt from it.
#[derive(Debug)]
pub struct RxPdu<'a> {
    /// Type, flags, data length.
    pub info: PduInfo,
    /// The header (CH + PSH).
    pub hdr: Header<&'a [u8]>,
}

/// Where the data bytes of the PDU being received go.
#[derive(Debug)]
pub enum RxData<'a> {
    /// Into this slice (exactly the bytes offered).
    Into(&'a mut [u8]),
    /// Nowhere (still covered by the data digest).
    Skip,
    /// Not yet: the application has to provide a buffer first.
    Stall,
}

/// The application's hook that runs a host-to-controller command whose data arrived whole
/// ([`TargetConnection::recv_direct`](crate::TargetConnection::recv_direct)): the command and
/// its data, straight from the receive window (digest already verified). `Some(cqe)`: it ran
/// and this is its completion; `None`: it did not run (the data is then delivered into a
/// buffer the usual way).
pub type DirectWrite<'a> = dyn FnMut(&Sqe, &[u8]) -> Option<Cqe> + 'a;

/// A connection role: the PDU handling of one side. Implemented by
/// [`TargetRole`](crate::target::TargetRole) and [`HostRole`](crate::host::HostRole) only.
pub trait Role {
    /// What `poll_event` returns.
    type Event;
    /// The controller side (it receives host-to-controller PDUs and sends C2HTermReq).
    const TARGET: bool;

    /// Limits on data we receive.
    fn data_limits(&self) -> DataLimits;
    /// The peer's IC PDU (PFV and PDA already checked): take its parameters and set
    /// `core.digests`; the core then moves to Ready.
    fn on_ic(&mut self, core: &mut Core, h: &Header<&[u8]>) -> Result<(), FatalError>;
    /// Any other complete, digest-checked header of a type this role receives. `Ok(false)`
    /// stalls the receive path until the application acts (the header is offered again).
    fn on_header(&mut self, core: &mut Core, pdu: &RxPdu) -> Result<bool, FatalError>;
    /// Where the next `n` data bytes of the current PDU go.
    fn rx_data(&mut self, n: usize) -> RxData<'_>;
    /// All data of the current PDU is at hand in `data`, its digest (if any) verified, and none
    /// of it has been delivered: the role may hand it to `exec` instead of into a buffer.
    /// True if it did; the PDU is then complete (no `on_pdu_done`).
    fn rx_whole(&mut self, core: &mut Core, data: &[u8], exec: &mut DirectWrite<'_>) -> bool {
        let _ = (core, data, exec);
        false
    }
    /// The current PDU is complete (`ddgst_ok`: its data digest matched or there was none).
    fn on_pdu_done(&mut self, core: &mut Core, info: PduInfo, ddgst_ok: bool);
    /// Our IC PDU.
    fn ic_pdu(&self, core: &Core) -> Repr;
    /// Start the next PDU of a slot in `core.tx` (the core has sent TermReq and IC already);
    /// returns false when there is none.
    fn next_pdu(&mut self, core: &mut Core) -> bool;
    /// The data source of slot `slot` (its buffer).
    fn tx_data(&self, slot: u16) -> Option<&[u8]>;
    /// A PDU of slot `of` (or of the connection) has been written out.
    fn pdu_sent(&mut self, core: &mut Core, of: Option<PduOf>);
    /// The connection is failing or closed: hand every held buffer back through events (the
    /// core has dropped the transmit queue). `core.tx_busy()`'s slot is still being written.
    fn drop_all(&mut self, core: &mut Core);
    /// A deadline has passed at `now_ms`: close for this reason.
    fn deadline(&self, state: ConnState, now_ms: u64) -> Option<CloseReason>;
    /// The event for a completed IC exchange, if it is still wanted.
    fn connected_event(&self, core: &Core) -> Option<Self::Event>;
    /// The pending event of slot `idx`, if it still has one.
    fn slot_event(&mut self, idx: u16) -> Option<Self::Event>;
    /// The last event.
    fn closed_event(reason: CloseReason) -> Self::Event;
    /// Heap bytes the role allocated (fixed after construction).
    fn heap_bytes(&self) -> usize;
}

/// One NVMe/TCP connection (one queue pair), sans-IO, in role `R`: bytes in with
/// [`recv`](Self::recv), events out with [`poll_event`](Self::poll_event), PDU bytes out with
/// [`transmit`](Self::transmit). All memory is allocated when it is created.
#[derive(Debug)]
pub struct Connection<R> {
    pub(crate) role: R,
    pub(crate) core: Core,
    rx: RxCore,
}

impl<R: Role> Connection<R> {
    /// A connection in role `role` with `slots` command slots; `ic_pending` queues our IC PDU
    /// at once (the host's ICReq).
    pub(crate) fn with_role(role: R, slots: usize, ic_pending: bool) -> Self {
        Self {
            role,
            core: Core {
                state: ConnState::AwaitIc,
                digests: Digests::default(),
                tx: TxCur::new(),
                evq: SlotQueue::new(slots),
                txq: SlotQueue::new(slots),
                ic_pending,
                connected_event: false,
                term_pending: None,
                term_hdr: [0; TERM_MAX_DATA],
                term_hdr_len: 0,
                close_reason: None,
                closed_event_pending: false,
            },
            rx: RxCore::new(),
        }
    }

    /// Current state.
    pub fn state(&self) -> ConnState {
        self.core.state
    }

    /// Negotiated digests (valid once the IC exchange is done).
    pub fn digests(&self) -> Digests {
        self.core.digests
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.core.close_reason
    }

    /// Close locally (the socket is gone, or the application ends the connection).
    pub fn close(&mut self) {
        self.close_now(CloseReason::Local);
    }

    /// Bytes of memory owned by this connection (fixed after creation; excludes the
    /// application's buffers).
    pub fn memory_footprint(&self) -> usize {
        core::mem::size_of::<Self>()
            + self.role.heap_bytes()
            + self.core.evq.heap_bytes()
            + self.core.txq.heap_bytes()
    }

    /// Whether `transmit` has something to send.
    pub fn wants_transmit(&self) -> bool {
        let c = &self.core;
        c.state != ConnState::Closed
            && (c.tx.active
                || c.term_pending.is_some()
                || c.ic_pending
                || (c.state == ConnState::Ready && !c.txq.is_empty()))
    }

    /// Check timers at `now_ms` (the target's ICReq deadline).
    pub fn poll_timers(&mut self, now_ms: u64) {
        if let Some(reason) = self.role.deadline(self.core.state, now_ms) {
            self.close_now(reason);
        }
    }

    /// Feed received bytes (any segmentation) at time `now_ms`. Returns how many were
    /// consumed: fewer than `bytes.len()` only while the target waits for a buffer (in-capsule
    /// data) or a free slot; call again with the rest after handling events. After a fatal
    /// error everything is consumed and ignored.
    pub fn recv(&mut self, now_ms: u64, bytes: &[u8]) -> usize {
        self.recv_inner(now_ms, bytes, None)
    }

    /// [`recv`](Self::recv), offering the role each PDU whose data is whole in `bytes`
    /// ([`Role::rx_whole`]) to run through `direct`.
    pub(crate) fn recv_inner(
        &mut self,
        now_ms: u64,
        bytes: &[u8],
        mut direct: Option<&mut DirectWrite<'_>>,
    ) -> usize {
        self.poll_timers(now_ms);
        let mut input = bytes;
        loop {
            if !self.core.running() {
                return bytes.len();
            }
            match self.rx.phase {
                Phase::Header => {
                    if input.is_empty() {
                        break;
                    }
                    let lim = Limits {
                        target: R::TARGET,
                        digests: self.core.digests,
                        ic_done: self.core.state != ConnState::AwaitIc,
                        data: self.role.data_limits(),
                    };
                    match self.rx.take_header(&mut input, &lim) {
                        Ok(false) => break,
                        Ok(true) => self.rx.phase = Phase::HeaderDone,
                        Err(e) => self.fatal(e),
                    }
                }
                Phase::HeaderDone => match self.on_header() {
                    Err(e) => self.fatal(e),
                    Ok(false) => break,
                    Ok(true) => {
                        if self.rx.start_payload() {
                            self.pdu_done(true);
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
                    let ddgst = self.rx.info.is_some_and(|i| i.ddgst);
                    // All of the data (and its digest) here, none delivered yet: the role may
                    // take it where it lies, once its digest is known good.
                    let whole = left as usize + if ddgst { DIGEST_LEN } else { 0 };
                    if let Some(exec) = direct.as_deref_mut()
                        && self.rx.info.is_some_and(|i| i.data_len == left)
                        && input.len() >= whole
                    {
                        let (data, rest) = input.split_at(left as usize);
                        let digest_ok =
                            !ddgst || rest[..DIGEST_LEN] == crc32c(data).to_le_bytes()[..];
                        if digest_ok && self.role.rx_whole(&mut self.core, data, exec) {
                            input = &input[whole..];
                            self.rx.reset();
                            continue;
                        }
                    }
                    let n = (left as usize).min(input.len());
                    let src = &input[..n];
                    match self.role.rx_data(n) {
                        RxData::Stall => break,
                        RxData::Into(dst) if ddgst => {
                            copy_and_crc(dst, src, &mut self.rx.crc);
                        }
                        RxData::Into(dst) => dst.copy_from_slice(src),
                        RxData::Skip if ddgst => self.rx.crc.update(src),
                        RxData::Skip => {}
                    }
                    input = &input[n..];
                    self.rx.data_advanced(n as u32);
                }
                Phase::Ddgst => match self.rx.take_ddgst(&mut input) {
                    None => break,
                    Some(ok) => self.pdu_done(ok),
                },
            }
        }
        bytes.len() - input.len()
    }

    /// A complete, digest-checked header: IC and TermReq here, the rest to the role.
    fn on_header(&mut self) -> Result<bool, FatalError> {
        let Some(info) = self.rx.info else {
            return Err(FatalError::PduSequence);
        };
        let Ok(h) = Header::new_checked(self.rx.header()) else {
            return Err(FatalError::field(field::HLEN));
        };
        match info.ty {
            PduType::IcReq | PduType::IcResp => {
                if h.pfv() != 0 {
                    return Err(FatalError::UnsupportedParameter {
                        offset: field::IC_PFV.start as u32,
                    });
                }
                if h.pda() > 31 {
                    return Err(FatalError::field(field::IC_PDA));
                }
                self.role.on_ic(&mut self.core, &h)?;
                self.core.state = ConnState::Ready;
                self.core.connected_event = true;
                Ok(true)
            }
            PduType::H2CTermReq | PduType::C2HTermReq => {
                let reason = CloseReason::PeerTerminated {
                    fes: h.fes(),
                    fei: h.fei(),
                };
                self.close_now(reason);
                Ok(true)
            }
            _ => self.role.on_header(&mut self.core, &RxPdu { info, hdr: h }),
        }
    }

    fn pdu_done(&mut self, ddgst_ok: bool) {
        let info = self.rx.info;
        self.rx.reset();
        if let Some(info) = info {
            self.role.on_pdu_done(&mut self.core, info, ddgst_ok);
        }
    }

    /// A fatal transport error: queue our TermReq with the offending header, hand buffers
    /// back, close once the TermReq is out.
    fn fatal(&mut self, e: FatalError) {
        if !self.core.running() {
            return;
        }
        let h = self.rx.header();
        let n = h.len().min(TERM_MAX_DATA);
        self.core.term_hdr[..n].copy_from_slice(&h[..n]);
        self.core.term_hdr_len = n;
        self.core.term_pending = Some(e);
        self.core.state = ConnState::Terminating;
        self.core.close_reason = Some(CloseReason::Fatal(e));
        self.drop_all();
    }

    fn close_now(&mut self, reason: CloseReason) {
        if self.core.state == ConnState::Closed {
            return;
        }
        self.core.state = ConnState::Closed;
        self.core.close_reason.get_or_insert(reason);
        self.core.term_pending = None;
        self.core.tx.active = false;
        self.core.tx.of = None;
        self.drop_all();
        self.core.closed_event_pending = true;
    }

    fn drop_all(&mut self) {
        self.core.txq.clear();
        self.core.ic_pending = false;
        self.role.drop_all(&mut self.core);
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<R::Event> {
        if self.core.connected_event {
            self.core.connected_event = false;
            if let Some(ev) = self.role.connected_event(&self.core) {
                return Some(ev);
            }
        }
        // The empty check first: the poll loop asks once more after every batch of events,
        // and the loop below is costlier to enter than to skip.
        if !self.core.evq.is_empty() {
            while let Some(i) = self.core.evq.pop() {
                if let Some(ev) = self.role.slot_event(i) {
                    return Some(ev);
                }
            }
        }
        if self.core.closed_event_pending {
            self.core.closed_event_pending = false;
            if let Some(reason) = self.core.close_reason {
                return Some(R::closed_event(reason));
            }
        }
        None
    }

    /// Fill `out` with pending PDU bytes; returns the count. Call until it returns 0 (or
    /// `out` is full), e.g. inside smoltcp's `TcpSocket::send(|buf| ...)`.
    pub fn transmit(&mut self, out: &mut [u8]) -> usize {
        let mut n = 0;
        while n < out.len() {
            if !self.core.tx.active && !self.next_pdu() {
                break;
            }
            let tx = &mut self.core.tx;
            let data = match tx.of {
                Some(of) if tx.data_len > 0 => self
                    .role
                    .tx_data(of.slot)
                    .and_then(|b| b.get(of.data_off as usize..)),
                _ => None,
            };
            let (w, fin) = tx.write(&mut out[n..], data);
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
        let c = &mut self.core;
        if let Some(e) = c.term_pending.take() {
            let offending = &c.term_hdr[..c.term_hdr_len];
            if c.tx.start_term(R::TARGET, e, offending, c.digests) {
                return true;
            }
            self.close_now(CloseReason::Fatal(e));
            return false;
        }
        if c.ic_pending {
            c.ic_pending = false;
            let repr = self.role.ic_pdu(c);
            return c.tx.start(&repr, Digests::default(), 0, None);
        }
        // Nothing queued: skip the role (the common answer when the socket asks for more).
        if c.state != ConnState::Ready || c.txq.is_empty() {
            return false;
        }
        self.role.next_pdu(c)
    }

    fn finish_pdu(&mut self) {
        let of = self.core.tx.of.take();
        if self.core.tx.close_after {
            self.core.state = ConnState::Closed;
            self.core.closed_event_pending = true;
        }
        self.role.pdu_sent(&mut self.core, of);
        self.core.tx.data_len = 0;
    }
}
