//! Controller-side (target) connection state machine (NVMe/TCP 1.0 §3.3 connection
//! establishment, §3.4 data transfers, §3.5 termination, §3.6.2 PDU processing).
//!
//! States: Await-ICReq → Ready → Terminating (C2HTermReq queued) → Closed. Framing, the
//! transmit cursor, TermReq and close are the connection core's ([`Connection`]); this module
//! is the controller's PDU handling: command capsules and H2CData in, R2T, C2HData and
//! CapsuleResp out.

use alloc::vec::Vec;
use core::fmt;

use keel_nvme::{Cqe, DataDirection, Sqe, Status};

use crate::capsule::{SGL_IN_CAPSULE, SGL_TRANSPORT, Sgl1};
use crate::conn::{ConnState, Connection, Core, DirectWrite, PduOf, Role, RxData, RxPdu};
use crate::pdu::{Digests, FatalError, Header, PduFlags, PduType, Repr, field};
use crate::rx::{DataLimits, PduInfo};
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

/// Target connection state (the connection core's).
pub type TargetState = ConnState;

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
        sqe: Sqe,
        /// Host data, if any.
        buf: Option<B>,
        /// Data length (SGL length).
        data_len: u32,
    },
    /// The transport rejected the command; complete it (with [`TargetConnection::complete`])
    /// with `status` so SQ head and flow control stay with the controller core.
    CommandFailed {
        /// The submission queue entry.
        sqe: Sqe,
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
    sqe: Sqe,
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
}

impl<B> Slot<B> {
    const fn new() -> Self {
        Self {
            st: St::Free,
            cid: 0,
            sqe: Sqe::new(0, 0),
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
        }
    }
    fn active(&self) -> bool {
        !matches!(self.st, St::Free | St::Releasing)
    }
}

/// Where the data of the PDU being received goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    Slot(u16),
    Discard,
}

/// The controller role of a connection: its command slots and the PDU handling of a target.
#[derive(Debug)]
pub struct TargetRole<B> {
    cfg: TargetConfig,
    created_ms: u64,
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
    rx_slot: u16,
    sink: Sink,
    limits: DataLimits,
}

/// The controller side of one NVMe/TCP connection (one queue pair), sans-IO.
///
/// All memory is allocated in [`TargetConnection::new`]; nothing is allocated per PDU or per
/// command. Buffers for data are the application's (`B`), handed over with
/// [`provide_buffer`](Connection::provide_buffer) and [`complete`](Connection::complete) and
/// given back in events.
pub type TargetConnection<B> = Connection<TargetRole<B>>;

impl<B: AsRef<[u8]> + AsMut<[u8]>> Connection<TargetRole<B>> {
    /// A new connection, accepted at time `now_ms`; allocates its slot table and queues.
    pub fn new(cfg: TargetConfig, now_ms: u64) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let n = cfg.slots as usize;
        let mut slots = Vec::with_capacity(n);
        slots.resize_with(n, Slot::new);
        let role = TargetRole {
            cfg,
            created_ms: now_ms,
            hpda: 0,
            max_r2t: 1,
            queue_depth: cfg.initial_queue_depth.min(cfg.slots),
            slots,
            active: 0,
            probe: 0,
            rx_slot: 0,
            sink: Sink::Discard,
            limits: DataLimits {
                max_capsule_data: cfg.in_capsule_data.max(MIN_IN_CAPSULE),
                max_data_pdu: cfg.maxh2cdata,
                align: 4,
            },
        };
        Ok(Self::with_role(role, n, false))
    }

    /// Set the queue depth (SQSIZE + 1 from the Connect command); clamped to 1..=slots.
    pub fn set_queue_depth(&mut self, depth: u16) {
        self.role.queue_depth = depth.clamp(1, self.role.cfg.slots);
    }

    /// Hand a buffer for command `cid` after a `NeedBuffer` event. The buffer must be at least
    /// the requested length.
    pub fn provide_buffer(&mut self, cid: u16, buf: B) -> Result<(), Rejected<B>> {
        let t = &mut self.role;
        let Some(idx) = t.find(cid, |s| s.st == St::AwaitBuf) else {
            return Err(Rejected::new(RejectReason::NotAwaitingBuffer, Some(buf)));
        };
        if !self.core.running() {
            return Err(Rejected::new(RejectReason::Closed, Some(buf)));
        }
        let l = t.r2t_len();
        let max_r2t = t.max_r2t;
        let slot = &mut t.slots[idx];
        if buf.as_ref().len() < slot.len as usize {
            return Err(Rejected::new(RejectReason::BufferTooSmall, Some(buf)));
        }
        slot.buf = Some(buf);
        slot.st = St::Receiving;
        slot.announced = true;
        if !slot.in_capsule {
            slot.r2t_sent = 0;
            slot.r2t_allowed = slot.len.div_ceil(l).min(max_r2t);
            self.core.txq.push(idx);
        }
        Ok(())
    }

    /// Refuse the buffer asked for by a `NeedBuffer` event (e.g. the request can never be
    /// satisfied): the command is failed with `status` and reported as `CommandFailed`. Any
    /// in-capsule data is then read and discarded.
    pub fn refuse_buffer(&mut self, cid: u16, status: Status) -> Result<(), RejectReason> {
        let t = &mut self.role;
        let Some(idx) = t.find(cid, |s| s.st == St::AwaitBuf) else {
            return Err(RejectReason::NotAwaitingBuffer);
        };
        if !self.core.running() {
            return Err(RejectReason::Closed);
        }
        let receiving_now = t.sink == Sink::Slot(idx as u16);
        let slot = &mut t.slots[idx];
        slot.st = St::Failed;
        slot.status = Some(status);
        if slot.in_capsule && receiving_now {
            // The capsule's data is in the receive path: drop it; the event follows the PDU.
            t.sink = Sink::Discard;
        } else {
            self.core.evq.push(idx);
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
        cqe: Cqe,
        data: Option<(B, u32)>,
        sq_flow_control_disabled: bool,
    ) -> Result<(), Rejected<B>> {
        let (buf, len) = match data {
            Some((b, l)) => (Some(b), l),
            None => (None, 0),
        };
        let t = &mut self.role;
        let Some(idx) = t.find(cqe.cid, |s| s.st == St::Executing) else {
            return Err(Rejected::new(RejectReason::UnknownCommand, buf));
        };
        if !self.core.running() {
            t.slots[idx].st = St::Free;
            t.deactivated();
            return Err(Rejected::new(RejectReason::Closed, buf));
        }
        let slot = &mut t.slots[idx];
        let c2h_max = if slot.sqe.data_direction() == DataDirection::HostToController {
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
        t.finish(&mut self.core, idx, cqe, buf, len, sq_flow_control_disabled);
        Ok(())
    }

    /// [`recv`](Connection::recv), running each in-capsule write whose data is whole in
    /// `bytes` through `exec` instead of asking for a buffer: `exec(sqe, data)` gets the
    /// command and its data where they lie (the data digest, if negotiated, already verified;
    /// with a bad digest `exec` is not called and the command fails as usual). If it returns
    /// the CQE, the command is complete (its CapsuleResp queued) and no `NeedBuffer` or
    /// `Command` event follows for it; if `None`, the data goes into a buffer the usual way.
    pub fn recv_direct(&mut self, now_ms: u64, bytes: &[u8], exec: &mut DirectWrite<'_>) -> usize {
        self.recv_inner(now_ms, bytes, Some(exec))
    }

    /// Completes command `cid` (handed out by a `Command` event, data controller-to-host)
    /// with its data written straight into `window`, the free space at the end of the
    /// transmit stream (e.g. the buffer of smoltcp's `TcpSocket::send` closure): `exec` runs
    /// the command with the part of `window` where the C2HData PDU's data goes (the command's
    /// transfer length) and returns its CQE and the bytes of data it produced. The PDU
    /// (header, padding, data digest; SUCCESS and no response capsule when
    /// `sq_flow_control_disabled` and the CQE is all-success) is built around the data, and
    /// the response capsule and other pending PDUs follow in the rest of `window`. Returns the
    /// bytes written into `window`.
    ///
    /// 0 when this cannot be done and `exec` was not called: a PDU is half-written, the
    /// command is unknown or moves no controller-to-host data, its data does not fit one
    /// C2HData PDU or `window`. 0 as well when `exec` returns `None` (it did not run the
    /// command). In both cases the command is still the application's: complete it the
    /// usual way. A failed command's data is never sent.
    pub fn complete_in_window(
        &mut self,
        cid: u16,
        window: &mut [u8],
        sq_flow_control_disabled: bool,
        exec: impl FnOnce(&mut [u8]) -> Option<(Cqe, u32)>,
    ) -> usize {
        self.complete_in_split_window(
            cid,
            (window, &mut []),
            sq_flow_control_disabled,
            |dst, rest| {
                debug_assert!(rest.is_empty(), "a window in one piece splits no data");
                exec(dst)
            },
        )
    }

    /// [`complete_in_window`](Self::complete_in_window) for free space in two pieces, as
    /// a ring's is where it wraps: `window.0` up to the ring's end, then `window.1` from its
    /// start; the bytes written run through the first into the second. The PDU's header
    /// (and padding) must fit in `window.0` (else 0, `exec` not called); its data may go
    /// on into `window.1`: `exec` gets the data's place as two slices (the second empty
    /// when it does not wrap), together the transfer length. Returns the bytes written,
    /// counted from the start of `window.0`.
    pub fn complete_in_split_window(
        &mut self,
        cid: u16,
        window: (&mut [u8], &mut [u8]),
        sq_flow_control_disabled: bool,
        exec: impl FnOnce(&mut [u8], &mut [u8]) -> Option<(Cqe, u32)>,
    ) -> usize {
        if self.core.state != ConnState::Ready || self.core.tx.is_active() {
            return 0;
        }
        let t = &mut self.role;
        let Some(idx) = t.find(cid, |s| s.st == St::Executing) else {
            return 0;
        };
        let s = &t.slots[idx];
        let len = s.len;
        if s.sqe.data_direction() == DataDirection::HostToController
            || len == 0
            || len > t.cfg.max_c2h_data
        {
            return 0;
        }
        let dg = self.core.digests;
        let c2h = |len, success| Repr::C2HData {
            cccid: cid,
            offset: 0,
            len,
            last: true,
            success,
        };
        let lay = c2h(len, false).layout(dg, t.hpda);
        let data_at = lay.header_len + lay.pad;
        let (first, second) = window;
        if first.len() < data_at
            || first.len() + second.len() < data_at + len as usize + lay.ddgst_len
        {
            return 0;
        }
        // The data: in `first` after the header, the rest (if any) at the start of `second`.
        let in_first = (first.len() - data_at).min(len as usize);
        let in_second = len as usize - in_first;
        let Some((cqe, n)) = exec(
            &mut first[data_at..data_at + in_first],
            &mut second[..in_second],
        ) else {
            return 0;
        };
        // Data only with a successful completion, never more than the command asked for.
        let mut sent = if cqe.status.is_success() {
            n.min(len)
        } else {
            0
        };
        let mut success = sq_flow_control_disabled && sent > 0 && all_success(&cqe);
        if sent > 0
            && c2h(sent, success)
                .emit(&mut first[..lay.header_len], dg, t.hpda)
                .is_err()
        {
            // Cannot happen (the header fits, checked above); should it, the host gets the
            // completion without data rather than a command that never ends.
            (sent, success) = (0, false);
        }
        let mut used = 0;
        if sent > 0 {
            let end = data_at + sent as usize;
            first[lay.header_len..data_at].fill(0);
            used = end;
            if lay.ddgst_len > 0 {
                let data_first = (end.min(first.len())) - data_at;
                let mut crc = crate::crc32c::Crc32c::new();
                crc.update(&first[data_at..data_at + data_first]);
                crc.update(&second[..sent as usize - data_first]);
                let crc = crc.finish().to_le_bytes();
                for (k, b) in crc.iter().enumerate() {
                    *split_at(first, second, end + k) = *b;
                }
                used += lay.ddgst_len;
            }
        }
        if success {
            // The C2HData ends the command: no response capsule.
            t.slots[idx].st = St::Free;
            t.deactivated();
        } else {
            // As if completed with its data already sent: the response capsule follows.
            t.finish(&mut self.core, idx, cqe, None, sent, false);
            t.slots[idx].sent_off = sent;
        }
        used + if used < first.len() {
            self.transmit(&mut first[used..])
        } else {
            self.transmit(&mut second[used - first.len()..])
        }
    }
}

/// Byte `at` of a window in two pieces (`at` counted through `first` into `second`).
fn split_at<'w>(first: &'w mut [u8], second: &'w mut [u8], at: usize) -> &'w mut u8 {
    if at < first.len() {
        &mut first[at]
    } else {
        &mut second[at - first.len()]
    }
}

/// A CQE the C2HData SUCCESS flag can stand for (NVMe/TCP 1.0 §3.6.2.8: the host then
/// synthesises a CQE with status 0 and command specific dwords 0).
fn all_success(cqe: &Cqe) -> bool {
    cqe.dw0 == 0 && cqe.dw1 == 0 && cqe.status == Status::default()
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> TargetRole<B> {
    fn on_capsule(&mut self, core: &mut Core, sqe: Sqe, data_len: u32) -> Result<bool, FatalError> {
        let cid = sqe.cid;
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
        let sgl = Sgl1::of(&sqe);
        let dir = sqe.data_direction();
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
                SGL_TRANSPORT if dir == DataDirection::HostToController => {
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
            core.evq.push(idx);
        }
        self.rx_slot = idx as u16;
        Ok(true)
    }

    /// Command slot `idx` (with the application) is complete with `cqe`, `len` bytes of
    /// controller-to-host data in `buf`: its PDUs are queued.
    fn finish(
        &mut self,
        core: &mut Core,
        idx: usize,
        cqe: Cqe,
        buf: Option<B>,
        len: u32,
        fc: bool,
    ) {
        let slot = &mut self.slots[idx];
        slot.cqe = cqe.to_bytes();
        slot.buf = buf;
        slot.send_len = len;
        slot.sent_off = 0;
        slot.success = fc && all_success(&cqe) && len > 0;
        slot.st = St::Sending;
        core.txq.push(idx);
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

    fn on_h2c(&mut self, info: PduInfo, h: &Header<&[u8]>) -> Result<(), FatalError> {
        let (cccid, ttag, off, datal) = (h.cccid(), h.ttag(), h.data_offset(), h.data_length());
        if datal != info.data_len {
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
        if info.flags.contains(PduFlags::LAST_PDU) != (got == end) {
            return Err(FatalError::field(field::FLAGS));
        }
        self.sink = Sink::Slot(idx as u16);
        self.rx_slot = idx as u16;
        Ok(())
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Role for TargetRole<B> {
    type Event = Event<B>;
    const TARGET: bool = true;

    fn data_limits(&self) -> DataLimits {
        self.limits
    }

    fn on_ic(&mut self, core: &mut Core, h: &Header<&[u8]>) -> Result<(), FatalError> {
        self.hpda = h.pda();
        core.digests = h.ic_digests();
        self.max_r2t = h.ic_max().saturating_add(1).min(self.cfg.max_r2t);
        core.ic_pending = true;
        Ok(())
    }

    fn on_header(&mut self, core: &mut Core, pdu: &RxPdu) -> Result<bool, FatalError> {
        let (info, h) = (pdu.info, &pdu.hdr);
        match info.ty {
            PduType::CapsuleCmd => self.on_capsule(core, Sqe::from_bytes(&h.sqe()), info.data_len),
            PduType::H2CData => self.on_h2c(info, h).map(|()| true),
            _ => Err(FatalError::field(field::PDU_TYPE)),
        }
    }

    fn rx_whole(&mut self, core: &mut Core, data: &[u8], exec: &mut DirectWrite<'_>) -> bool {
        let Sink::Slot(i) = self.sink else {
            return false;
        };
        let idx = usize::from(i);
        let Some(s) = self.slots.get_mut(idx) else {
            return false;
        };
        // Only in-capsule data that no buffer was given for yet.
        if s.st != St::AwaitBuf || !s.in_capsule || s.buf.is_some() || s.len as usize != data.len()
        {
            return false;
        }
        let Some(cqe) = exec(&s.sqe, data) else {
            return false;
        };
        self.sink = Sink::Discard;
        self.finish(core, idx, cqe, None, 0, false);
        true
    }

    fn rx_data(&mut self, n: usize) -> RxData<'_> {
        let Sink::Slot(idx) = self.sink else {
            return RxData::Skip;
        };
        let Some(slot) = self.slots.get_mut(usize::from(idx)) else {
            return RxData::Stall;
        };
        let at = slot.recv_off as usize;
        let Some(buf) = slot.buf.as_mut() else {
            return RxData::Stall; // waiting for provide_buffer
        };
        slot.recv_off += n as u32;
        match buf.as_mut().get_mut(at..at + n) {
            Some(dst) => RxData::Into(dst),
            None => RxData::Skip,
        }
    }

    fn on_pdu_done(&mut self, core: &mut Core, info: PduInfo, ddgst_ok: bool) {
        let sink = core::mem::replace(&mut self.sink, Sink::Discard);
        match info.ty {
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
                    core.evq.push(idx);
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
                    core.evq.push(idx);
                } else if slot.recv_off % l == 0 {
                    let total = slot.len.div_ceil(l);
                    let done = slot.recv_off / l;
                    slot.r2t_allowed = total.min(done.saturating_add(max_r2t));
                    if slot.r2t_allowed > slot.r2t_sent {
                        core.txq.push(idx);
                    }
                }
            }
            _ => {}
        }
    }

    fn ic_pdu(&self, core: &Core) -> Repr {
        Repr::IcResp {
            pfv: 0,
            cpda: 0,
            digests: core.digests,
            maxh2cdata: self.cfg.maxh2cdata,
        }
    }

    fn next_pdu(&mut self, core: &mut Core) -> bool {
        let dg = core.digests;
        let l = self.r2t_len();
        while let Some(i) = core.txq.pop() {
            let idx = i as usize;
            let Some(s) = self.slots.get_mut(idx) else {
                continue;
            };
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
                    if s.r2t_sent < s.r2t_allowed {
                        core.txq.push(idx);
                    }
                    return core.tx.start(&repr, dg, 0, None);
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
                        let mut of = PduOf::slot(i, s.sent_off);
                        s.sent_off += len;
                        if success {
                            of = of.ending();
                        } else {
                            core.txq.push(idx);
                        }
                        return core.tx.start(&repr, dg, self.hpda, Some(of));
                    }
                    let repr = Repr::CapsuleResp { cqe: s.cqe };
                    return core
                        .tx
                        .start(&repr, dg, 0, Some(PduOf::slot(i, 0).ending()));
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
        // Terminating: the slot whose PDU was in flight still holds its buffer.
        let release = match of {
            Some(of) if of.ends_command || !core.running() => Some(of.slot),
            _ => None,
        };
        if let Some(i) = release
            && let Some(s) = self.slots.get_mut(i as usize)
            && s.st == St::Sending
        {
            if s.buf.is_some() {
                s.st = St::Releasing;
                core.evq.push(i as usize);
            } else {
                s.st = St::Free;
            }
            self.deactivated();
        }
    }

    fn drop_all(&mut self, core: &mut Core) {
        let busy = core.tx_busy();
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if s.st == St::Executing || s.st == St::Free {
                continue;
            }
            if s.st == St::Sending && busy == Some(i as u16) {
                // Its PDU is still being written; released when that finishes.
                continue;
            }
            let was_active = s.active();
            if s.buf.is_some() {
                s.st = St::Releasing;
                core.evq.push(i);
            } else {
                s.st = St::Free;
            }
            if was_active {
                self.deactivated();
            }
        }
    }

    fn deadline(&self, state: ConnState, now_ms: u64) -> Option<CloseReason> {
        (state == ConnState::AwaitIc
            && now_ms.saturating_sub(self.created_ms) >= self.cfg.icreq_timeout_ms)
            .then_some(CloseReason::IcReqTimeout)
    }

    fn connected_event(&self, core: &Core) -> Option<Event<B>> {
        core.running().then_some(Event::Connected {
            digests: core.digests,
        })
    }

    fn slot_event(&mut self, idx: u16) -> Option<Event<B>> {
        let s = self.slots.get_mut(usize::from(idx))?;
        match s.st {
            St::AwaitBuf if !s.announced => {
                s.announced = true;
                Some(Event::NeedBuffer {
                    cid: s.cid,
                    len: s.len,
                })
            }
            St::Ready => {
                s.st = St::Executing;
                Some(Event::Command {
                    sqe: s.sqe,
                    buf: s.buf.take(),
                    data_len: s.len,
                })
            }
            St::Failed => {
                s.st = St::Executing;
                Some(Event::CommandFailed {
                    sqe: s.sqe,
                    buf: s.buf.take(),
                    status: s.status.unwrap_or(Status::INVALID_FIELD),
                })
            }
            St::Releasing => {
                s.st = St::Free;
                let buf = s.buf.take()?;
                Some(Event::BufferReleased { cid: s.cid, buf })
            }
            _ => None,
        }
    }

    fn closed_event(reason: CloseReason) -> Event<B> {
        Event::Closed { reason }
    }

    fn heap_bytes(&self) -> usize {
        self.slots.capacity() * core::mem::size_of::<Slot<B>>()
    }
}
