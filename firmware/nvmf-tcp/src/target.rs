//! Controller-side (target) connection state machine (NVMe/TCP 1.0 §3.3 connection
//! establishment, §3.4 data transfers, §3.5 termination, §3.6.2 PDU processing).
//!
//! States: Await-ICReq → Ready → Terminating (C2HTermReq queued) → Closed.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;

use crate::capsule::{self, Direction, SGL_IN_CAPSULE, SGL_TRANSPORT, Status};
use crate::crc32c::{Crc32c, copy_and_crc};
use crate::pdu::{Digests, FLAG_LAST_PDU, FatalError, Header, PduType, Repr, TERM_MAX_DATA, field};
use crate::rx::{Limits, Phase, RxCore};
use crate::{CloseReason, RejectReason, Rejected};

/// Minimum in-capsule data size accepted for every command (fabrics and admin commands,
/// NVMe/TCP 1.0 §3.3: Connect carries 1 KiB; Linux and SPDK accept 8 KiB).
pub const MIN_IN_CAPSULE: u32 = 8192;
/// Largest slot table: TTAG encodes the slot in 10 bits.
pub const MAX_SLOTS: u16 = 1024;

/// Target connection parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetConfig {
    /// MAXH2CDATA advertised in ICResp; also the largest R2T we issue. ≥ 4096, multiple of 4.
    pub maxh2cdata: u32,
    /// In-capsule data accepted for I/O commands (IOCCSZ×16 − 64). ≥ 8 KiB.
    pub in_capsule_data: u32,
    /// Largest DATAL of a C2HData PDU we send.
    pub max_c2h_data: u32,
    /// Largest data transfer (SGL length) of a host-to-controller command we ask a buffer for;
    /// longer ones are failed with Data SGL Length Invalid. Should match MDTS.
    pub max_transfer: u32,
    /// Our cap on outstanding R2Ts per command, 1..=32 (the host's MAXR2T+1 may lower it).
    pub max_r2t: u32,
    /// Command slots allocated at setup: the largest queue depth this connection can carry.
    pub slots: u16,
    /// Queue depth before the application calls `set_queue_depth` (after Connect).
    pub initial_queue_depth: u16,
    /// Time allowed for the ICReq, in milliseconds.
    pub icreq_timeout_ms: u64,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            maxh2cdata: 128 * 1024,
            in_capsule_data: MIN_IN_CAPSULE,
            max_c2h_data: 128 * 1024,
            max_transfer: 1024 * 1024,
            max_r2t: 4,
            slots: 128,
            initial_queue_depth: 32,
            icreq_timeout_ms: 10_000,
        }
    }
}

/// Invalid configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    /// MAXH2CDATA below 4096 or not a multiple of 4.
    MaxH2CData,
    /// In-capsule data size below 8 KiB.
    InCapsuleData,
    /// Zero C2HData size.
    MaxC2HData,
    /// Slots zero or above [`MAX_SLOTS`], or initial depth zero.
    Slots,
    /// R2T limit zero or above 32 (TTAGs carry a 6-bit R2T sequence number).
    MaxR2T,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MaxH2CData => "MAXH2CDATA must be >= 4096 and a multiple of 4",
            Self::InCapsuleData => "in-capsule data size must be >= 8192",
            Self::MaxC2HData => "C2HData size must be > 0",
            Self::Slots => "slots must be 1..=1024 and the initial queue depth > 0",
            Self::MaxR2T => "R2T limit must be 1..=32",
        })
    }
}

impl TargetConfig {
    /// Check the parameters.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.maxh2cdata < 4096 || !self.maxh2cdata.is_multiple_of(4) {
            return Err(ConfigError::MaxH2CData);
        }
        if self.in_capsule_data < MIN_IN_CAPSULE {
            return Err(ConfigError::InCapsuleData);
        }
        if self.max_c2h_data == 0 {
            return Err(ConfigError::MaxC2HData);
        }
        if self.slots == 0 || self.slots > MAX_SLOTS || self.initial_queue_depth == 0 {
            return Err(ConfigError::Slots);
        }
        if self.max_r2t == 0 || self.max_r2t > 32 {
            return Err(ConfigError::MaxR2T);
        }
        Ok(())
    }
}

/// Connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// Waiting for the host's ICReq.
    AwaitIcReq,
    /// IC exchange done; commands flow.
    Ready,
    /// Fatal error: the C2HTermReq is queued for transmission.
    Terminating,
    /// Closed: the application should flush what `transmit` produced and close the socket.
    Closed,
}

/// Something the application must act on.
#[derive(Debug)]
pub enum Event<B> {
    /// ICReq accepted; ICResp queued.
    Connected {
        /// Negotiated digests.
        digests: Digests,
    },
    /// Provide a buffer of at least `len` bytes for command `cid` with [`TargetConnection::provide_buffer`]
    /// (host-to-controller data, in-capsule or solicited with R2T).
    NeedBuffer {
        /// Command identifier.
        cid: u16,
        /// Data length.
        len: u32,
    },
    /// A command ready for execution. `buf` holds `data_len` bytes of host data for
    /// host-to-controller commands; for other commands `buf` is `None` and `data_len` is the
    /// host's buffer size (the most the completion may return). Complete it with
    /// [`TargetConnection::complete`].
    Command {
        /// The submission queue entry.
        sqe: [u8; 64],
        /// Host data, if any.
        buf: Option<B>,
        /// Data length (SGL length).
        data_len: u32,
    },
    /// The transport rejected the command; complete it (with [`TargetConnection::complete`])
    /// with `status` so SQ head and flow control stay with the controller core.
    CommandFailed {
        /// The submission queue entry.
        sqe: [u8; 64],
        /// Partially received data buffer, if one was provided.
        buf: Option<B>,
        /// The status to report.
        status: Status,
    },
    /// A buffer given to [`TargetConnection::complete`] or [`TargetConnection::provide_buffer`]
    /// is no longer needed.
    BufferReleased {
        /// Command identifier.
        cid: u16,
        /// The buffer.
        buf: B,
    },
    /// The connection is closed; no further events.
    Closed {
        /// Why.
        reason: CloseReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Free,
    /// NeedBuffer issued.
    AwaitBuf,
    /// Buffer present, data arriving (in-capsule or via R2T).
    Receiving,
    /// Command event pending.
    Ready,
    /// CommandFailed event pending.
    Failed,
    /// With the application.
    Executing,
    /// Completion being transmitted.
    Sending,
    /// BufferReleased event pending.
    Releasing,
}

#[derive(Debug)]
struct Slot<B> {
    st: St,
    cid: u16,
    sqe: [u8; 64],
    buf: Option<B>,
    len: u32,
    in_capsule: bool,
    announced: bool,
    status: Option<Status>,
    recv_off: u32,
    r2t_sent: u32,
    r2t_allowed: u32,
    cqe: [u8; 16],
    send_len: u32,
    sent_off: u32,
    success: bool,
    txq: bool,
    evq: bool,
}

impl<B> Slot<B> {
    const fn new() -> Self {
        Self {
            st: St::Free,
            cid: 0,
            sqe: [0; 64],
            buf: None,
            len: 0,
            in_capsule: false,
            announced: false,
            status: None,
            recv_off: 0,
            r2t_sent: 0,
            r2t_allowed: 0,
            cqe: [0; 16],
            send_len: 0,
            sent_off: 0,
            success: false,
            txq: false,
            evq: false,
        }
    }
    fn active(&self) -> bool {
        !matches!(self.st, St::Free | St::Releasing)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    None,
    Slot(u16),
    Discard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    Nothing,
    Release(u16),
    Close,
}

/// The PDU being transmitted.
#[derive(Debug)]
pub(crate) struct TxCur {
    pub hdr: [u8; 160],
    pub hdr_len: usize,
    pub pos: usize,
    pub pad: usize,
    pub data_slot: u16,
    pub data_off: u32,
    pub data_len: u32,
    pub ddgst: bool,
    pub crc: Crc32c,
    pub active: bool,
    done: Done,
}

impl TxCur {
    pub(crate) const fn new() -> Self {
        Self {
            hdr: [0; 160],
            hdr_len: 0,
            pos: 0,
            pad: 0,
            data_slot: 0,
            data_off: 0,
            data_len: 0,
            ddgst: false,
            crc: Crc32c::new(),
            active: false,
            done: Done::Nothing,
        }
    }

    /// Start a PDU from a header repr; returns false if it cannot be encoded.
    pub(crate) fn start(&mut self, repr: &Repr, dg: Digests, pda: u8) -> bool {
        match repr.emit(&mut self.hdr, dg, pda) {
            Ok(lay) => {
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

    fn total(&self) -> usize {
        self.hdr_len + self.pad + self.data_len as usize + if self.ddgst { 4 } else { 0 }
    }

    /// Write as much as possible into `out`; `data` is the data source (already offset to
    /// `data_off`). Returns bytes written and whether the PDU is complete.
    pub(crate) fn write(&mut self, out: &mut [u8], data: Option<&[u8]>) -> (usize, bool) {
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

/// The controller side of one NVMe/TCP connection (one queue pair), sans-IO.
///
/// All memory is allocated in [`TargetConnection::new`]; nothing is allocated per PDU or per
/// command. Buffers for data are the application's (`B`), handed over with
/// [`provide_buffer`](Self::provide_buffer) and [`complete`](Self::complete) and given back in
/// events.
#[derive(Debug)]
pub struct TargetConnection<B> {
    cfg: TargetConfig,
    state: TargetState,
    created_ms: u64,
    digests: Digests,
    hpda: u8,
    max_r2t: u32,
    queue_depth: u16,
    slots: Vec<Slot<B>>,
    /// Active slots (not Free or Releasing).
    active: u16,
    /// A command takes the first free slot at or after `cid % slots` (its home); `probe` is
    /// at least the distance from home of every active slot, so finding a command by CID
    /// looks at `probe + 1` slots (usually one) instead of all of them. Reset when no slot
    /// is active.
    probe: usize,
    evq: VecDeque<u16>,
    txq: VecDeque<u16>,
    rx: RxCore,
    rx_slot: u16,
    sink: Sink,
    tx: TxCur,
    tx_slot: Option<u16>,
    icresp_pending: bool,
    connected_event: bool,
    term_pending: Option<FatalError>,
    term_hdr: [u8; TERM_MAX_DATA],
    term_hdr_len: usize,
    close_reason: Option<CloseReason>,
    closed_event_pending: bool,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> TargetConnection<B> {
    /// A new connection, accepted at time `now_ms`; allocates its slot table and queues.
    pub fn new(cfg: TargetConfig, now_ms: u64) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let n = cfg.slots as usize;
        let mut slots = Vec::with_capacity(n);
        slots.resize_with(n, Slot::new);
        Ok(Self {
            cfg,
            state: TargetState::AwaitIcReq,
            created_ms: now_ms,
            digests: Digests::default(),
            hpda: 0,
            max_r2t: 1,
            queue_depth: cfg.initial_queue_depth.min(cfg.slots),
            slots,
            active: 0,
            probe: 0,
            evq: VecDeque::with_capacity(n),
            txq: VecDeque::with_capacity(n),
            rx: RxCore::new(),
            rx_slot: 0,
            sink: Sink::None,
            tx: TxCur::new(),
            tx_slot: None,
            icresp_pending: false,
            connected_event: false,
            term_pending: None,
            term_hdr: [0; TERM_MAX_DATA],
            term_hdr_len: 0,
            close_reason: None,
            closed_event_pending: false,
        })
    }

    /// Current state.
    pub fn state(&self) -> TargetState {
        self.state
    }

    /// Negotiated digests (valid once Ready).
    pub fn digests(&self) -> Digests {
        self.digests
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close_reason
    }

    /// Set the queue depth (SQSIZE + 1 from the Connect command); clamped to 1..=slots.
    pub fn set_queue_depth(&mut self, depth: u16) {
        self.queue_depth = depth.clamp(1, self.cfg.slots);
    }

    /// Bytes of memory owned by this connection (fixed after `new`; excludes `B` buffers'
    /// contents).
    pub fn memory_footprint(&self) -> usize {
        core::mem::size_of::<Self>()
            + self.slots.capacity() * core::mem::size_of::<Slot<B>>()
            + (self.evq.capacity() + self.txq.capacity()) * 2
    }

    /// Whether `transmit` has something to send.
    pub fn wants_transmit(&self) -> bool {
        self.state != TargetState::Closed
            && (self.tx.active
                || self.term_pending.is_some()
                || (self.state == TargetState::Ready
                    && (self.icresp_pending || !self.txq.is_empty())))
    }

    /// Check timers: the ICReq deadline.
    pub fn poll_timers(&mut self, now_ms: u64) {
        if self.state == TargetState::AwaitIcReq
            && now_ms.saturating_sub(self.created_ms) >= self.cfg.icreq_timeout_ms
        {
            self.close_now(CloseReason::IcReqTimeout);
        }
    }

    /// Close locally (the socket is gone or the controller ends the association).
    pub fn close(&mut self) {
        self.close_now(CloseReason::Local);
    }

    fn limits(&self) -> Limits {
        Limits {
            target: true,
            digests: self.digests,
            max_capsule_data: self.cfg.in_capsule_data.max(MIN_IN_CAPSULE),
            max_data_pdu: self.cfg.maxh2cdata,
            align: 4,
            ic_done: self.state != TargetState::AwaitIcReq,
        }
    }

    fn running(&self) -> bool {
        matches!(self.state, TargetState::AwaitIcReq | TargetState::Ready)
    }

    /// Feed received bytes (any segmentation). Returns how many were consumed; fewer than
    /// `bytes.len()` only while waiting for a buffer (in-capsule data) or a free slot: call
    /// again with the rest after handling events. After a fatal error everything is consumed
    /// and ignored.
    pub fn recv(&mut self, now_ms: u64, bytes: &[u8]) -> usize {
        self.poll_timers(now_ms);
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
                    Ok(false) => break,
                    Ok(true) => {
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
                    match self.sink {
                        Sink::Slot(idx) => {
                            let Some(slot) = self.slots.get_mut(idx as usize) else {
                                break;
                            };
                            let Some(buf) = slot.buf.as_mut() else {
                                break; // waiting for provide_buffer
                            };
                            let at = slot.recv_off as usize;
                            let src = &input[..n];
                            match buf.as_mut().get_mut(at..at + n) {
                                Some(dst) if ddgst => {
                                    copy_and_crc(dst, src, &mut self.rx.crc);
                                }
                                Some(dst) => dst.copy_from_slice(src),
                                None => self.rx.crc.update(src),
                            }
                            slot.recv_off += n as u32;
                        }
                        Sink::Discard | Sink::None => {
                            if ddgst {
                                self.rx.crc.update(&input[..n]);
                            }
                        }
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

    /// A complete, digest-checked header. Ok(false): stall (no free slot yet).
    fn on_header(&mut self) -> Result<bool, FatalError> {
        let Some(info) = self.rx.info else {
            return Err(FatalError::PduSequence);
        };
        let Ok(h) = Header::new_checked(&self.rx.hdr[..self.rx.have]) else {
            return Err(FatalError::field(field::HLEN));
        };
        self.sink = Sink::Discard;
        match info.ty {
            PduType::IcReq => {
                if h.pfv() != 0 {
                    return Err(FatalError::UnsupportedParameter {
                        offset: field::IC_PFV.start as u32,
                    });
                }
                if h.pda() > 31 {
                    return Err(FatalError::field(field::IC_PDA));
                }
                self.hpda = h.pda();
                self.digests = Digests {
                    header: h.dgst() & crate::pdu::DGST_HDGST != 0,
                    data: h.dgst() & crate::pdu::DGST_DDGST != 0,
                };
                self.max_r2t = h.ic_max().saturating_add(1).min(self.cfg.max_r2t);
                self.state = TargetState::Ready;
                self.icresp_pending = true;
                self.connected_event = true;
                Ok(true)
            }
            PduType::H2CTermReq => {
                let reason = CloseReason::PeerTerminated {
                    fes: h.fes(),
                    fei: h.fei(),
                };
                self.close_now(reason);
                Ok(true)
            }
            PduType::CapsuleCmd => self.on_capsule(h.sqe(), info.data_len),
            PduType::H2CData => {
                let (cccid, ttag, off, len) =
                    (h.cccid(), h.ttag(), h.data_offset(), h.data_length());
                self.on_h2c(cccid, ttag, off, len, info.flags, info.data_len)?;
                Ok(true)
            }
            _ => Err(FatalError::field(field::PDU_TYPE)),
        }
    }

    fn on_capsule(&mut self, sqe: [u8; 64], data_len: u32) -> Result<bool, FatalError> {
        let cid = capsule::cid(&sqe);
        #[cfg(any(test, debug_assertions))]
        self.check_index();
        if self.find(cid, |s| s.active()).is_some() {
            return Err(FatalError::field(field::CAPSULE_SQE.start + 2));
        }
        if self.active >= self.queue_depth {
            return Err(FatalError::PduSequence);
        }
        if self.active == 0 {
            self.probe = 0;
        }
        let n = self.slots.len();
        let home = usize::from(cid) % n;
        let Some(d) = (0..n).find(|d| self.slots[(home + d) % n].st == St::Free) else {
            return Ok(false); // released buffers not yet collected: stall
        };
        let idx = (home + d) % n;
        self.probe = self.probe.max(d);
        self.active += 1;
        let sgl = capsule::sgl(&sqe);
        let dir = capsule::direction(&sqe);
        let slot = &mut self.slots[idx];
        *slot = Slot::new();
        slot.cid = cid;
        slot.sqe = sqe;
        fn fail<B>(s: &mut Slot<B>, st: Status) {
            s.st = St::Failed;
            s.status = Some(st);
        }
        if data_len > 0 {
            if sgl.id != SGL_IN_CAPSULE {
                fail(slot, Status::SGL_DESCRIPTOR_TYPE_INVALID);
            } else if sgl.address != 0 {
                fail(slot, Status::SGL_OFFSET_INVALID);
            } else if sgl.length != data_len {
                fail(slot, Status::DATA_SGL_LENGTH_INVALID);
            } else {
                slot.st = St::AwaitBuf;
                slot.len = data_len;
                slot.in_capsule = true;
                self.sink = Sink::Slot(idx as u16);
            }
        } else if sgl.length == 0 {
            slot.st = St::Ready;
        } else {
            slot.len = sgl.length;
            match sgl.id {
                SGL_TRANSPORT if dir == Direction::HostToController => {
                    if sgl.length > self.cfg.max_transfer {
                        fail(slot, Status::DATA_SGL_LENGTH_INVALID);
                    } else {
                        slot.st = St::AwaitBuf;
                    }
                }
                SGL_TRANSPORT => slot.st = St::Ready,
                SGL_IN_CAPSULE => fail(slot, Status::DATA_SGL_LENGTH_INVALID),
                _ => fail(slot, Status::SGL_DESCRIPTOR_TYPE_INVALID),
            }
        }
        if slot.st == St::AwaitBuf {
            self.push_event(idx);
        }
        self.rx_slot = idx as u16;
        Ok(true)
    }

    /// The active slot holding command `cid` that satisfies `want`, looking only where such a
    /// slot can be (see `probe`).
    fn find(&self, cid: u16, want: impl Fn(&Slot<B>) -> bool) -> Option<usize> {
        let n = self.slots.len();
        let home = usize::from(cid) % n;
        (0..=self.probe.min(n - 1))
            .map(|d| (home + d) % n)
            .find(|&i| self.slots[i].cid == cid && want(&self.slots[i]))
    }

    /// Debug builds: the counters behind `find` agree with a full scan.
    #[cfg(any(test, debug_assertions))]
    fn check_index(&self) {
        let n = self.slots.len();
        let mut active = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if s.active() {
                active += 1;
                let home = usize::from(s.cid) % n;
                assert!(
                    (i + n - home) % n <= self.probe,
                    "slot {i} beyond the probe"
                );
            }
        }
        assert_eq!(active, self.active, "active slot count");
    }

    /// A slot stops being active (it becomes Free or Releasing).
    fn deactivated(&mut self) {
        debug_assert!(self.active > 0);
        self.active = self.active.saturating_sub(1);
    }

    fn r2t_len(&self) -> u32 {
        self.cfg.maxh2cdata
    }

    fn any_r2t_outstanding(&self) -> bool {
        let l = self.r2t_len();
        self.slots
            .iter()
            .any(|s| s.st == St::Receiving && !s.in_capsule && s.r2t_sent > s.recv_off / l)
    }

    fn on_h2c(
        &mut self,
        cccid: u16,
        ttag: u16,
        off: u32,
        datal: u32,
        flags: u8,
        data_len: u32,
    ) -> Result<(), FatalError> {
        if datal != data_len {
            return Err(FatalError::field(field::DATA_LENGTH.start));
        }
        let l = self.r2t_len();
        let idx = (ttag & 0x3FF) as usize;
        let seq = (ttag >> 10) as u32;
        // Only on the error path: the classification scans every slot.
        let bad_ttag = |t: &Self| {
            if t.any_r2t_outstanding() {
                FatalError::field(field::DATA_TTAG.start)
            } else {
                FatalError::PduSequence
            }
        };
        let Some(slot) = self.slots.get(idx) else {
            return Err(bad_ttag(self));
        };
        if slot.st != St::Receiving || slot.in_capsule {
            return Err(bad_ttag(self));
        }
        let k = slot.recv_off / l;
        if k >= slot.r2t_sent || seq != (k & 0x3F) {
            return Err(bad_ttag(self));
        }
        if cccid != slot.cid {
            return Err(FatalError::field(field::DATA_CCCID.start));
        }
        if off != slot.recv_off {
            return Err(FatalError::DataOutOfRange);
        }
        let end = ((k as u64 + 1) * l as u64).min(slot.len as u64);
        let got = off as u64 + datal as u64;
        if got > end {
            return Err(FatalError::DataOutOfRange);
        }
        if (flags & FLAG_LAST_PDU != 0) != (got == end) {
            return Err(FatalError::field(field::FLAGS));
        }
        self.sink = Sink::Slot(idx as u16);
        self.rx_slot = idx as u16;
        Ok(())
    }

    fn on_pdu_done(&mut self, ddgst_ok: bool) {
        let info = self.rx.info;
        let sink = self.sink;
        self.rx.reset();
        self.sink = Sink::None;
        let Some(info) = info else { return };
        match info.ty {
            PduType::IcReq => {}
            PduType::CapsuleCmd => {
                let idx = self.rx_slot as usize;
                let Some(slot) = self.slots.get_mut(idx) else {
                    return;
                };
                if slot.in_capsule && slot.st == St::Receiving {
                    slot.st = if ddgst_ok { St::Ready } else { St::Failed };
                    if !ddgst_ok {
                        slot.status = Some(Status::TRANSIENT_TRANSPORT_ERROR);
                    }
                } else if !ddgst_ok && slot.st == St::Ready {
                    // Digest error on data we discarded for a command that had none.
                    slot.st = St::Failed;
                    slot.status = Some(Status::TRANSIENT_TRANSPORT_ERROR);
                }
                if matches!(slot.st, St::Ready | St::Failed) {
                    self.push_event(idx);
                }
            }
            PduType::H2CData if sink != Sink::Discard => {
                let idx = self.rx_slot as usize;
                let l = self.r2t_len();
                let max_r2t = self.max_r2t;
                let Some(slot) = self.slots.get_mut(idx) else {
                    return;
                };
                if !ddgst_ok && slot.status.is_none() {
                    slot.status = Some(Status::TRANSIENT_TRANSPORT_ERROR);
                }
                if slot.recv_off >= slot.len {
                    slot.st = if slot.status.is_some() {
                        St::Failed
                    } else {
                        St::Ready
                    };
                    self.push_event(idx);
                } else if slot.recv_off % l == 0 {
                    let total = slot.len.div_ceil(l);
                    let done = slot.recv_off / l;
                    slot.r2t_allowed = total.min(done.saturating_add(max_r2t));
                    if slot.r2t_allowed > slot.r2t_sent {
                        self.push_tx(idx);
                    }
                }
            }
            _ => {}
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
        self.state = TargetState::Terminating;
        self.close_reason = Some(CloseReason::Fatal(e));
        self.release_all();
    }

    fn close_now(&mut self, reason: CloseReason) {
        if self.state == TargetState::Closed {
            return;
        }
        self.state = TargetState::Closed;
        self.close_reason.get_or_insert(reason);
        self.term_pending = None;
        self.tx.active = false;
        self.release_all();
        self.closed_event_pending = true;
    }

    /// Give every held buffer back and drop queued transmissions.
    fn release_all(&mut self) {
        self.txq.clear();
        self.icresp_pending = false;
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            s.txq = false;
            if s.st == St::Executing || s.st == St::Free {
                continue;
            }
            if s.st == St::Sending && self.tx.active && self.tx_slot == Some(i as u16) {
                // Its PDU is still being written; released when that finishes.
                continue;
            }
            let was_active = s.active();
            if s.buf.is_some() {
                s.st = St::Releasing;
                self.push_event(i);
            } else {
                s.st = St::Free;
            }
            if was_active {
                self.deactivated();
            }
        }
    }

    /// Hand a buffer for command `cid` after a `NeedBuffer` event. The buffer must be at least
    /// the requested length.
    pub fn provide_buffer(&mut self, cid: u16, buf: B) -> Result<(), Rejected<B>> {
        let Some(idx) = self.find(cid, |s| s.st == St::AwaitBuf) else {
            return Err(Rejected::new(RejectReason::NotAwaitingBuffer, Some(buf)));
        };
        if !self.running() {
            return Err(Rejected::new(RejectReason::Closed, Some(buf)));
        }
        let l = self.r2t_len();
        let max_r2t = self.max_r2t;
        let slot = &mut self.slots[idx];
        if buf.as_ref().len() < slot.len as usize {
            return Err(Rejected::new(RejectReason::BufferTooSmall, Some(buf)));
        }
        slot.buf = Some(buf);
        slot.st = St::Receiving;
        slot.announced = true;
        if !slot.in_capsule {
            slot.r2t_sent = 0;
            slot.r2t_allowed = slot.len.div_ceil(l).min(max_r2t);
            self.push_tx(idx);
        }
        Ok(())
    }

    /// Refuse the buffer asked for by a `NeedBuffer` event (e.g. the request can never be
    /// satisfied): the command is failed with `status` and reported as `CommandFailed`. Any
    /// in-capsule data is then read and discarded.
    pub fn refuse_buffer(&mut self, cid: u16, status: Status) -> Result<(), RejectReason> {
        let Some(idx) = self.find(cid, |s| s.st == St::AwaitBuf) else {
            return Err(RejectReason::NotAwaitingBuffer);
        };
        if !self.running() {
            return Err(RejectReason::Closed);
        }
        let receiving_now = self.sink == Sink::Slot(idx as u16);
        let slot = &mut self.slots[idx];
        slot.st = St::Failed;
        slot.status = Some(status);
        if slot.in_capsule && receiving_now {
            // The capsule's data is in the receive path: drop it; the event follows the PDU.
            self.sink = Sink::Discard;
        } else {
            self.push_event(idx);
        }
        Ok(())
    }

    /// Complete a command that was handed out by a `Command` or `CommandFailed` event.
    /// `data` is `(buffer, length)` of controller-to-host data (at most the command's data
    /// length). `sq_flow_control_disabled` allows the C2HData SUCCESS optimisation (used only
    /// when the CQE is all-success: status 0, DW0 = DW1 = 0, and there is data). The buffer
    /// comes back in a `BufferReleased` event once sent.
    pub fn complete(
        &mut self,
        cqe: [u8; 16],
        data: Option<(B, u32)>,
        sq_flow_control_disabled: bool,
    ) -> Result<(), Rejected<B>> {
        let cid = capsule::cqe_cid(&cqe);
        let (buf, len) = match data {
            Some((b, l)) => (Some(b), l),
            None => (None, 0),
        };
        let Some(idx) = self.find(cid, |s| s.st == St::Executing) else {
            return Err(Rejected::new(RejectReason::UnknownCommand, buf));
        };
        if !self.running() {
            self.slots[idx].st = St::Free;
            self.deactivated();
            return Err(Rejected::new(RejectReason::Closed, buf));
        }
        let slot = &mut self.slots[idx];
        let c2h_max = if capsule::direction(&slot.sqe) == Direction::HostToController {
            0
        } else {
            slot.len
        };
        if len > c2h_max
            || buf
                .as_ref()
                .is_some_and(|b| b.as_ref().len() < len as usize)
        {
            return Err(Rejected::new(RejectReason::InvalidLength, buf));
        }
        let all_zero = cqe[0..8].iter().all(|&b| b == 0) && capsule::cqe_status(&cqe) >> 1 == 0;
        slot.cqe = cqe;
        slot.buf = buf;
        slot.send_len = len;
        slot.sent_off = 0;
        slot.success = sq_flow_control_disabled && all_zero && len > 0;
        slot.st = St::Sending;
        self.push_tx(idx);
        Ok(())
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<Event<B>> {
        if self.connected_event {
            self.connected_event = false;
            if self.running() {
                return Some(Event::Connected {
                    digests: self.digests,
                });
            }
        }
        while let Some(i) = self.evq.pop_front() {
            let Some(s) = self.slots.get_mut(i as usize) else {
                continue;
            };
            s.evq = false;
            match s.st {
                St::AwaitBuf if !s.announced => {
                    s.announced = true;
                    return Some(Event::NeedBuffer {
                        cid: s.cid,
                        len: s.len,
                    });
                }
                St::Ready => {
                    s.st = St::Executing;
                    return Some(Event::Command {
                        sqe: s.sqe,
                        buf: s.buf.take(),
                        data_len: s.len,
                    });
                }
                St::Failed => {
                    s.st = St::Executing;
                    return Some(Event::CommandFailed {
                        sqe: s.sqe,
                        buf: s.buf.take(),
                        status: s.status.unwrap_or(Status::INVALID_FIELD),
                    });
                }
                St::Releasing => {
                    s.st = St::Free;
                    if let Some(buf) = s.buf.take() {
                        return Some(Event::BufferReleased { cid: s.cid, buf });
                    }
                }
                _ => {}
            }
        }
        if self.closed_event_pending {
            self.closed_event_pending = false;
            if let Some(reason) = self.close_reason {
                return Some(Event::Closed { reason });
            }
        }
        None
    }

    /// Fill `out` with pending PDU bytes; returns the count. Call until it returns 0 (or
    /// `out` is full), e.g. inside smoltcp's `TcpSocket::send(|buf| ...)`.
    pub fn transmit(&mut self, out: &mut [u8]) -> usize {
        let mut n = 0;
        while n < out.len() {
            if !self.tx.active && !self.next_pdu() {
                break;
            }
            let data = if self.tx.data_len > 0 {
                self.slots
                    .get(self.tx.data_slot as usize)
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
        self.tx.done = Done::Nothing;
        self.tx.data_off = 0;
        self.tx_slot = None;
        if let Some(e) = self.term_pending.take() {
            let repr = Repr::TermReq {
                c2h: true,
                fes: e.fes(),
                fei: e.fei(),
                data_len: self.term_hdr_len as u8,
            };
            if self.tx.start(&repr, dg, 0) {
                // TermReq data is the offending header: make it part of the header bytes.
                let h = self.tx.hdr_len;
                let n = self.term_hdr_len;
                self.tx.hdr[h..h + n].copy_from_slice(&self.term_hdr[..n]);
                self.tx.hdr_len += n;
                self.tx.data_len = 0;
                self.tx.pad = 0;
                self.tx.ddgst = false;
                self.tx.done = Done::Close;
                return true;
            }
            self.close_now(CloseReason::Fatal(e));
            return false;
        }
        if self.state != TargetState::Ready {
            return false;
        }
        if self.icresp_pending {
            self.icresp_pending = false;
            let repr = Repr::IcResp {
                pfv: 0,
                cpda: 0,
                digests: dg,
                maxh2cdata: self.cfg.maxh2cdata,
            };
            return self.tx.start(&repr, Digests::default(), 0);
        }
        let l = self.r2t_len();
        while let Some(i) = self.txq.pop_front() {
            let idx = i as usize;
            let Some(s) = self.slots.get_mut(idx) else {
                continue;
            };
            s.txq = false;
            match s.st {
                St::Receiving if s.r2t_sent < s.r2t_allowed => {
                    let k = s.r2t_sent;
                    let off = k as u64 * l as u64;
                    let len = (s.len as u64 - off).min(l as u64) as u32;
                    let repr = Repr::R2T {
                        cccid: s.cid,
                        ttag: (((k & 0x3F) as u16) << 10) | i,
                        offset: off as u32,
                        len,
                    };
                    s.r2t_sent += 1;
                    let more = s.r2t_sent < s.r2t_allowed;
                    if more {
                        self.push_tx(idx);
                    }
                    return self.tx.start(&repr, dg, 0);
                }
                St::Sending => {
                    if s.sent_off < s.send_len {
                        let len = (s.send_len - s.sent_off).min(self.cfg.max_c2h_data);
                        let last = s.sent_off + len == s.send_len;
                        let success = last && s.success;
                        let repr = Repr::C2HData {
                            cccid: s.cid,
                            offset: s.sent_off,
                            len,
                            last,
                            success,
                        };
                        let off = s.sent_off;
                        s.sent_off += len;
                        if success {
                            self.tx.done = Done::Release(i);
                        } else {
                            self.push_tx(idx);
                        }
                        self.tx.data_slot = i;
                        self.tx_slot = Some(i);
                        self.tx.data_off = off;
                        return self.tx.start(&repr, dg, self.hpda);
                    }
                    let repr = Repr::CapsuleResp { cqe: s.cqe };
                    self.tx.done = Done::Release(i);
                    self.tx_slot = Some(i);
                    return self.tx.start(&repr, dg, 0);
                }
                _ => {}
            }
        }
        false
    }

    fn finish_pdu(&mut self) {
        let mut release = match self.tx.done {
            Done::Release(i) => Some(i),
            _ => None,
        };
        if !self.running() && release.is_none() {
            // Terminating: the slot whose PDU was in flight still holds its buffer.
            release = self.tx_slot;
        }
        self.tx_slot = None;
        if let Some(i) = release
            && let Some(s) = self.slots.get_mut(i as usize)
            && s.st == St::Sending
        {
            if s.buf.is_some() {
                s.st = St::Releasing;
                self.push_event(i as usize);
            } else {
                s.st = St::Free;
            }
            self.deactivated();
        }
        match self.tx.done {
            Done::Nothing | Done::Release(_) => {}
            Done::Close => {
                self.state = TargetState::Closed;
                self.closed_event_pending = true;
            }
        }
        self.tx.done = Done::Nothing;
        self.tx.data_len = 0;
    }
}
