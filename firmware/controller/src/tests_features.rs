//! Host tests, by raw SQEs, of the Error Information log, the SMART / Health log, Abort of
//! commands at a backend, Verify, Copy and Write Zeroes on namespaces without it (AES-XTS).

use crate::tests::{BLOCKS, H, HOST, SUB, config, page, plain};
use crate::*;
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use keel_crypto::{EncryptedBackend, XtsKey};
use keel_nvme::identify::{IdentifyController, IdentifyNamespace, Ocfs, Oncs};
use keel_nvme::io::{AbortCommand, CopyCommand, CopyRange, DsmCommand, DsmRange, RwCommand};
use keel_nvme::log::{ErrorLogEntry, GetLogPageCommand, SmartLog};
use keel_nvme::{IoOpcode, Sqe, Status};
use keel_storage::{
    BlockBackend, BlockCompletion, BlockError, BlockRequest, BufPool, Capabilities, Geometry,
    RamBackend, Rejected,
};
use proptest::prelude::*;

/// What a test does to a [`Manual`] backend.
#[derive(Default)]
struct Knobs {
    /// Requests held until `release` lets them run.
    held: VecDeque<(BlockRequest, bool)>,
    /// How many held requests the next polls may complete.
    release: usize,
    /// Whether `abort` finds held requests.
    abortable: bool,
    /// Requests touching this LBA fail with an unrecovered read error.
    bad_lba: Option<u64>,
    /// Tags `abort` was called with.
    abort_calls: Vec<u64>,
}

/// A RAM disk whose requests wait until the test releases them (a slow drive).
struct Manual {
    ram: RamBackend,
    k: Rc<RefCell<Knobs>>,
}

impl Manual {
    fn new(k: &Rc<RefCell<Knobs>>) -> Self {
        Self {
            ram: RamBackend::new(512, BLOCKS, 64).unwrap(),
            k: k.clone(),
        }
    }
}

impl BlockBackend for Manual {
    fn geometry(&self) -> Geometry {
        self.ram.geometry()
    }
    fn capabilities(&self) -> Capabilities {
        self.ram.capabilities()
    }
    fn submit(&mut self, req: BlockRequest) -> Result<(), Rejected> {
        self.k.borrow_mut().held.push_back((req, false));
        Ok(())
    }
    fn poll(&mut self, done: &mut dyn FnMut(BlockCompletion)) -> usize {
        let mut n = 0;
        loop {
            let next = {
                let mut k = self.k.borrow_mut();
                if k.release == 0 {
                    None
                } else {
                    k.release -= 1;
                    k.held.pop_front().map(|x| (x, k.bad_lba))
                }
            };
            let Some(((mut req, aborted), bad)) = next else {
                return n;
            };
            let touches_bad =
                bad.is_some_and(|b| (req.lba..req.lba + req.blocks as u64).contains(&b));
            let c = if aborted || touches_bad {
                BlockCompletion {
                    tag: req.tag,
                    result: Err(if aborted {
                        BlockError::Aborted
                    } else {
                        BlockError::ReadError
                    }),
                    buf: req.buf.take(),
                }
            } else {
                self.ram.submit(req).map_err(|_| ()).unwrap();
                let mut out = None;
                self.ram.poll(&mut |c| out = Some(c));
                out.unwrap()
            };
            done(c);
            n += 1;
        }
    }
    fn abort(&mut self, tag: u64) -> bool {
        let mut k = self.k.borrow_mut();
        k.abort_calls.push(tag);
        if !k.abortable {
            return false;
        }
        match k.held.iter_mut().find(|(r, a)| r.tag == tag && !*a) {
            Some((_, a)) => {
                *a = true;
                true
            }
            None => false,
        }
    }
}

fn key() -> XtsKey {
    XtsKey::new(
        &(0..64u8)
            .map(|i| i.wrapping_mul(29) ^ 0x5a)
            .collect::<Vec<_>>(),
    )
    .unwrap()
}

/// NSID 1 RAM, NSID 2 RAM encrypted with AES-XTS, NSID 3 a [`Manual`] backend; `scratch`
/// buffers of `scratch_size` bytes; error logs of 4 entries; Copy limited to 64 KiB and 4
/// ranges.
fn features(k: &Rc<RefCell<Knobs>>, scratch: usize, scratch_size: usize) -> TargetConfig {
    let mut c = config(64);
    let xts = EncryptedBackend::new(RamBackend::new(512, BLOCKS, 64).unwrap(), &key(), 64);
    let s = &mut c.subsystems[0];
    s.namespaces.push(NamespaceConfig {
        nsid: 2,
        backend: Box::new(xts),
        nguid: [2; 16],
        uuid: [0; 16],
        eui64: [0; 8],
        qos: Default::default(),
    });
    s.namespaces.push(NamespaceConfig {
        nsid: 3,
        backend: Box::new(Manual::new(k)),
        nguid: [3; 16],
        uuid: [0; 16],
        eui64: [0; 8],
        qos: Default::default(),
    });
    c.limits.error_log_entries = 4;
    c.limits.copy_max_bytes = 64 << 10;
    c.limits.copy_max_ranges = 4;
    if scratch > 0 {
        c.scratch = Some(BufPool::from_heap(scratch, scratch_size, 0).unwrap());
    }
    c
}

fn setup(k: &Rc<RefCell<Knobs>>, scratch: usize) -> (H, QueueId, QueueId) {
    let mut h = H::with(features(k, scratch, 8192));
    let (a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    (h, a, io)
}

fn error_log(h: &mut H, a: QueueId, off: u64, len: u32) -> Vec<ErrorLogEntry> {
    let r = h.log(a, 0x01, off, len);
    assert_eq!(r.cqe.status, Status::SUCCESS);
    let b = r.buf.unwrap();
    assert_eq!(r.data_len, len);
    b.as_slice()[..len as usize]
        .chunks_exact(64)
        .map(|c| ErrorLogEntry::decode(c.try_into().unwrap()))
        .collect()
}

fn smart(h: &mut H, a: QueueId, nsid: u32) -> Result<SmartLog, Status> {
    let sqe = GetLogPageCommand::to_sqe(9, nsid, 0x02, false, 0, 512);
    let r = h.exec(a, sqe, Some(IoBuf::leak_zeroed(512)), 512);
    if !r.cqe.status.is_success() {
        return Err(plain(r.cqe.status));
    }
    let mut p = [0u8; 512];
    p.copy_from_slice(&r.buf.unwrap().as_slice()[..512]);
    Ok(SmartLog::decode(&p))
}

fn io_cmd(op: IoOpcode, cid: u16, nsid: u32, lba: u64, blocks: u32) -> Sqe {
    RwCommand::simple(lba, blocks).to_sqe(op as u8, cid, nsid)
}

fn copy_sqe(cid: u16, nsid: u32, sdlba: u64, ranges: &[(u64, u32)]) -> (Sqe, IoBuf, u32) {
    let sqe = CopyCommand::simple(sdlba, ranges.len()).to_sqe(cid, nsid);
    let len = ranges.len() * CopyRange::SIZE;
    let mut b = IoBuf::leak_zeroed(len);
    for (i, &(slba, n)) in ranges.iter().enumerate() {
        let r = CopyRange {
            slba,
            nlb: (n - 1) as u16,
        };
        b.as_mut_slice()[i * 32..(i + 1) * 32].copy_from_slice(&r.to_bytes());
    }
    (sqe, b, len as u32)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

fn id_ctrl(h: &mut H, a: QueueId) -> IdentifyController {
    IdentifyController::decode(&page(&h.identify(a, 1, 0)))
}

fn id_ns(h: &mut H, a: QueueId, nsid: u32) -> IdentifyNamespace {
    IdentifyNamespace::decode(&page(&h.identify(a, 0, nsid)))
}

#[test]
fn error_log_records_failures_newest_first() {
    let k = Rc::new(RefCell::new(Knobs::default()));
    let (mut h, a, io) = setup(&k, 1);
    assert_eq!(id_ctrl(&mut h, a).elpe, 3, "4 entries kept");
    // Nothing failed yet: four invalid (zero) entries, a 256-byte log.
    assert!(
        error_log(&mut h, a, 0, 256)
            .iter()
            .all(|e| e.error_count == 0)
    );
    // 1: an offset past the 256-byte log, CID 4: Invalid Field, pointing at LPOL (byte 48).
    let r = h.log(a, 0x01, 256, 64);
    assert_eq!(
        plain(r.cqe.status),
        Status::INVALID_FIELD,
        "offset past the log"
    );

    // 2: LBA out of range on I/O queue 1, CID 10: points at SLBA (CDW10, byte 40).
    let r = h.read(io, 10, 1, BLOCKS - 1, 2);
    assert_eq!(plain(r.cqe.status), Status::LBA_OUT_OF_RANGE);
    assert!(r.cqe.status.more, "the More bit says the log has details");
    // 3: unknown admin opcode, CID 11: points at the opcode.
    let r = h.exec(a, Sqe::new(0xC5, 11), None, 0);
    assert!(r.cqe.status.more);
    // 4: a namespace that does not exist, CID 12: points at the NSID.
    let r = h.read(io, 12, 9, 0, 1);
    assert_eq!(plain(r.cqe.status), Status::INVALID_NAMESPACE_OR_FORMAT);
    // Successful commands and Abort Requested are not logged.
    assert!(!h.read(io, 13, 1, 0, 1).cqe.status.more);
    let log = error_log(&mut h, a, 0, 256);
    let entry = |error_count, sqid, cid, status: Status, loc, lba, nsid| ErrorLogEntry {
        error_count,
        sqid,
        cid,
        status: status.to_field(false),
        param_error_location: loc,
        lba,
        nsid,
        trtype: 0,
    };
    assert_eq!(
        log,
        [
            entry(4, 1, 12, Status::INVALID_NAMESPACE_OR_FORMAT, 4, 0, 9),
            entry(3, 0, 11, Status::INVALID_OPCODE, 0, 0, 0),
            entry(2, 1, 10, Status::LBA_OUT_OF_RANGE, 40, BLOCKS - 1, 1),
            entry(1, 0, 4, Status::INVALID_FIELD, 48, 0, 0),
        ]
    );
    // Any dword-aligned window: the second entry alone.
    let one = error_log(&mut h, a, 64, 64);
    assert_eq!((one[0].error_count, one[0].cid), (3, 11));
    // Inside an entry: SQID and CID of the second one (bytes 8-11).
    let mid = h.log(a, 0x01, 72, 4);
    assert_eq!(&mid.buf.unwrap().as_slice()[..4], &[0, 0, 11, 0]);

    // 5: a data digest error reported by the transport: TRTYPE TCP, counted as a media and
    // data integrity error.
    let req = Request {
        sqe: io_cmd(IoOpcode::Write, 14, 1, 0, 1),
        buf: None,
        data_len: 512,
        cookie: 99,
    };
    let r = h.t.reject(h.now, io, req, Status::generic(0x22));
    assert!(r.cqe.status.more);
    // 6: the backend fails a read (the Manual backend's bad LBA): no field, the command's LBA.
    {
        let mut kk = k.borrow_mut();
        kk.bad_lba = Some(77);
        kk.release = usize::MAX;
    }
    let r = h.read(io, 15, 3, 70, 8);
    assert_eq!(plain(r.cqe.status), Status::UNRECOVERED_READ_ERROR);
    assert!(r.cqe.status.more);
    let log = error_log(&mut h, a, 0, 256);
    let counts: Vec<u64> = log.iter().map(|e| e.error_count).collect();
    assert_eq!(counts, [6, 5, 4, 3], "the oldest entries were overwritten");
    assert_eq!(
        (
            log[0].cid,
            log[0].param_error_location,
            log[0].lba,
            log[0].nsid
        ),
        (15, 0xFFFF, 70, 3)
    );
    assert_eq!(
        log[0].status,
        Status::UNRECOVERED_READ_ERROR.to_field(false)
    );
    assert_eq!((log[1].cid, log[1].trtype, log[1].nsid), (14, 3, 1));

    let s = smart(&mut h, a, 0xFFFF_FFFF).unwrap();
    assert_eq!(s.num_error_log_entries, 6);
    assert_eq!(s.media_errors, 2, "the digest error and the read error");
    assert_eq!(smart(&mut h, a, 3).unwrap().media_errors, 1);
    assert_eq!(smart(&mut h, a, 1).unwrap().media_errors, 1);
    assert_eq!(smart(&mut h, a, 2).unwrap().media_errors, 0);

    // Each controller has its own log.
    let (b, _) = h.admin(SUB, HOST, 0);
    assert!(
        error_log(&mut h, b, 0, 256)
            .iter()
            .all(|e| e.error_count == 0)
    );
}

/// What "other cores" counted in `smart_adds_what_other_cores_counted`: 5 reads of 4 KiB,
/// 3 writes of 512 bytes and a media error on namespace 1 of `SUB`; nothing elsewhere.
fn counted_elsewhere(nqn: &str, nsid: u32) -> keel_storage::NsStats {
    let mut s = keel_storage::NsStats::default();
    if nqn == SUB && nsid == 1 {
        s.reads = 5;
        s.read_bytes = 5 * 4096;
        s.writes = 3;
        s.write_bytes = 3 * 512;
        s.media_errors = 1;
    }
    s
}

/// The SMART / Health log of the target holding the admin queue adds what other cores'
/// replicas counted (`Target::set_stats_elsewhere`): per namespace and for the subsystem.
#[test]
fn smart_adds_what_other_cores_counted() {
    let k = Rc::new(RefCell::new(Knobs::default()));
    let (mut h, a, io) = setup(&k, 1);
    assert_eq!(plain(h.read(io, 1, 1, 0, 8).cqe.status), Status::SUCCESS);
    let before = smart(&mut h, a, 1).unwrap();
    assert_eq!(before.host_read_commands, 1);
    h.t.set_stats_elsewhere(counted_elsewhere);
    let s = smart(&mut h, a, 1).unwrap();
    assert_eq!(
        (s.host_read_commands, s.host_write_commands, s.media_errors),
        (6, 3, 1)
    );
    assert_eq!(s.data_units_read, SmartLog::data_units(8 * 512 + 5 * 4096));
    let all = smart(&mut h, a, 0xFFFF_FFFF).unwrap();
    assert_eq!((all.host_read_commands, all.host_write_commands), (6, 3));
    assert_eq!(smart(&mut h, a, 2).unwrap().host_read_commands, 0);
}

#[test]
fn smart_counts_io_time_and_power() {
    let k = Rc::new(RefCell::new(Knobs::default()));
    let (mut h, a, io) = setup(&k, 1);
    let id = id_ctrl(&mut h, a);
    assert_eq!(id.lpa.bits() & 1, 1, "SMART per namespace");
    h.t.set_health(DeviceHealth {
        power_cycles: 7,
        unsafe_shutdowns: 2,
        power_on_ns: 3 * 3_600_000_000_000 - 30_000_000_000,
        since: h.now,
    });
    // 1000 blocks written = 1000 units of 512 bytes: 1 data unit; one more block: 2.
    for i in 0..8u16 {
        let data = vec![i as u8; 125 * 512];
        assert!(
            h.write(io, 20 + i, 1, i as u64 * 125, &data)
                .cqe
                .status
                .is_success()
        );
    }
    let s = smart(&mut h, a, 0xFFFF_FFFF).unwrap();
    assert_eq!((s.host_write_commands, s.data_units_written), (8, 1));
    assert!(
        h.write(io, 30, 1, 2000, &[1u8; 512])
            .cqe
            .status
            .is_success()
    );
    // Reads, Compare (a read command) and Verify (data read, not a read command); Write
    // Zeroes changes nothing.
    assert!(h.read(io, 31, 1, 0, 8).cqe.status.is_success());
    let cmp = io_cmd(IoOpcode::Compare, 32, 1, 0, 1);
    let mut b = IoBuf::leak_zeroed(512);
    b.as_mut_slice().fill(0);
    assert!(h.exec(io, cmp, Some(b), 512).cqe.status.is_success());
    let v = io_cmd(IoOpcode::Verify, 33, 1, 0, 1000);
    assert!(h.exec(io, v, None, 0).cqe.status.is_success());
    let wz = io_cmd(IoOpcode::WriteZeroes, 34, 1, 0, 64);
    assert!(h.exec(io, wz, None, 0).cqe.status.is_success());
    let s = smart(&mut h, a, 0xFFFF_FFFF).unwrap();
    assert_eq!((s.host_write_commands, s.data_units_written), (9, 2));
    assert_eq!(s.host_read_commands, 2);
    // 8 + 1 + 1000 blocks read: 1009 units, rounded up to 2 thousands.
    assert_eq!(s.data_units_read, 2);
    // Not on QEMU: no sensor, 0 K; spare untouched; power fields from the device.
    assert_eq!(s.composite_temperature, 0);
    assert_eq!((s.available_spare, s.percentage_used), (100, 0));
    assert_eq!((s.power_cycles, s.unsafe_shutdowns), (7, 2));
    assert_eq!(s.power_on_hours, 2);
    // Per namespace: only that namespace's I/O.
    let n1 = smart(&mut h, a, 1).unwrap();
    assert_eq!((n1.host_write_commands, n1.power_cycles), (9, 7));
    let n2 = smart(&mut h, a, 2).unwrap();
    assert_eq!((n2.host_write_commands, n2.data_units_read), (0, 0));
    assert_eq!(
        smart(&mut h, a, 5),
        Err(Status::INVALID_NAMESPACE_OR_FORMAT)
    );

    // Busy time: minutes with a command outstanding at a backend. A write held by the Manual
    // backend for 3 minutes and 10 seconds, then released.
    assert_eq!(s.controller_busy_time, 0);
    let w = io_cmd(IoOpcode::Write, 40, 3, 0, 1);
    assert!(h.send(io, w, Some(IoBuf::leak_zeroed(512)), 512).is_none());
    h.now = Instant::from_nanos(h.now.as_nanos() + 190_000_000_000);
    h.poll();
    // Still outstanding: the open interval counts; and the power-on time moved on.
    let s = smart(&mut h, a, 0).unwrap();
    assert_eq!((s.controller_busy_time, s.power_on_hours), (3, 3));
    k.borrow_mut().release = usize::MAX;
    h.poll();
    assert!(h.events.iter().any(
        |e| matches!(e, Event::Completion(_, r) if r.cqe.cid == 40 && r.cqe.status.is_success())
    ));
    h.now = Instant::from_nanos(h.now.as_nanos() + 600_000_000_000);
    assert_eq!(
        smart(&mut h, a, 0).unwrap().controller_busy_time,
        3,
        "idle time does not count"
    );
    // Offsets into the log: Power Cycles at byte 112.
    let r = h.log(a, 0x02, 112, 16);
    assert_eq!(&r.buf.unwrap().as_slice()[..16], &7u128.to_le_bytes());
}

#[test]
fn abort_reaches_commands_at_a_backend() {
    let k = Rc::new(RefCell::new(Knobs::default()));
    let (mut h, a, io) = setup(&k, 1);
    let abort = |cid: u16, target: u16| {
        AbortCommand {
            sqid: 1,
            cid: target,
        }
        .to_sqe(cid)
    };
    let done = |h: &mut H| {
        let v = h.completions();
        h.events.clear();
        v
    };
    // A backend that can abort: the Abort waits; the command ends Abort Requested, then the
    // Abort with DW0 bit 0 clear.
    k.borrow_mut().abortable = true;
    let r = io_cmd(IoOpcode::Read, 50, 3, 0, 1);
    assert!(h.send(io, r, Some(IoBuf::leak_zeroed(512)), 512).is_none());
    assert!(h.send(a, abort(90, 50), None, 0).is_none());
    h.poll();
    assert!(done(&mut h).is_empty(), "nothing until the backend answers");
    k.borrow_mut().release = 1;
    h.poll();
    assert_eq!(
        done(&mut h),
        [(50, Status::ABORT_REQUESTED, 0), (90, Status::SUCCESS, 0)]
    );
    // Not logged: the host asked for it.
    assert!(error_log(&mut h, a, 0, 64)[0].error_count == 0);

    // A backend that cannot: DW0 bit 0 set at once; the command completes normally.
    k.borrow_mut().abortable = false;
    let r = io_cmd(IoOpcode::Read, 51, 3, 0, 1);
    assert!(h.send(io, r, Some(IoBuf::leak_zeroed(512)), 512).is_none());
    let r = h.exec(a, abort(91, 51), None, 0);
    assert_eq!((plain(r.cqe.status), r.cqe.dw0), (Status::SUCCESS, 1));
    k.borrow_mut().release = 1;
    h.poll();
    assert_eq!(done(&mut h), [(51, Status::SUCCESS, 0)]);

    // The backend started the abort but the command finished first: DW0 bit 0 set, after it.
    k.borrow_mut().abortable = true;
    let r = io_cmd(IoOpcode::Read, 52, 3, 0, 1);
    assert!(h.send(io, r, Some(IoBuf::leak_zeroed(512)), 512).is_none());
    assert!(h.send(a, abort(92, 52), None, 0).is_none());
    k.borrow_mut().held[0].1 = false; // the drive ignored it
    k.borrow_mut().release = 1;
    h.poll();
    assert_eq!(
        done(&mut h),
        [(52, Status::SUCCESS, 0), (92, Status::SUCCESS, 1)]
    );

    // At most ACL + 1 = 4 Aborts wait at once; a second Abort of the same command is
    // answered at once.
    for cid in 60..65u16 {
        let r = io_cmd(IoOpcode::Read, cid, 3, 0, 1);
        assert!(h.send(io, r, Some(IoBuf::leak_zeroed(512)), 512).is_none());
    }
    for cid in 60..64u16 {
        assert!(h.send(a, abort(cid + 40, cid), None, 0).is_none());
    }
    let r = h.exec(a, abort(110, 64), None, 0);
    assert_eq!(
        (r.cqe.status.sct, r.cqe.status.sc),
        (1, 0x03),
        "Abort Command Limit Exceeded"
    );
    let r = h.exec(a, abort(111, 60), None, 0);
    assert_eq!(r.cqe.dw0, 1);
    // Closing the I/O queue drops its commands: the waiting Aborts complete, not aborted.
    h.t.close_queue_after(io, QueueLoss::Orderly).unwrap();
    h.poll();
    let mut aborts: Vec<(u16, u32)> = done(&mut h)
        .into_iter()
        .filter(|(c, _, _)| *c >= 100)
        .map(|(c, _, d)| (c, d))
        .collect();
    aborts.sort();
    assert_eq!(aborts, [(100, 1), (101, 1), (102, 1), (103, 1)]);
    // The held requests come back later and only their buffers are released.
    k.borrow_mut().release = usize::MAX;
    h.poll();
    assert_eq!(h.released(), 5);
}

/// An Abort of a command on an I/O queue another core serves (`Target::served_elsewhere`):
/// the holder parks it and asks that core (`take_abort_requests`); the replica aborts the
/// command at its backend (`abort_for_holder`) and reports the verdict with its completion
/// (`take_abort_verdicts`); the holder then completes the Abort (DW0 bit 0 clear). A command
/// the replica does not have: not aborted. The queue closing answers parked Aborts.
#[test]
fn abort_of_a_command_on_another_core() {
    let k = Rc::new(RefCell::new(Knobs::default()));
    k.borrow_mut().abortable = true;
    let (mut h, a, io) = setup(&k, 1);
    let adoption = h.t.adoption(io).unwrap();
    h.t.served_elsewhere(io, true);
    let mut r = H::with(features(&k, 1, 8192));
    let rq = r.t.open_queue().unwrap();
    r.t.adopt_io_queue(r.now, rq, &adoption).unwrap();
    let abort = |cid: u16, target: u16| {
        AbortCommand {
            sqid: 1,
            cid: target,
        }
        .to_sqe(cid)
    };
    let done = |h: &mut H| {
        let v = h.completions();
        h.events.clear();
        v
    };
    let asked = |h: &mut H| {
        let mut v = Vec::new();
        h.t.take_abort_requests(&mut |q, cid, token| v.push((q, cid, token)));
        v
    };
    // A read held at the replica's slow backend, and its Abort on the holder.
    let rd = io_cmd(IoOpcode::Read, 50, 3, 0, 1);
    assert!(r.send(rq, rd, Some(IoBuf::leak_zeroed(512)), 512).is_none());
    assert!(h.send(a, abort(90, 50), None, 0).is_none(), "parked");
    let reqs = asked(&mut h);
    assert_eq!(reqs.len(), 1);
    assert_eq!((reqs[0].0, reqs[0].1), (io, 50));
    assert!(asked(&mut h).is_empty(), "asked once");
    let token = reqs[0].2;
    assert_eq!(
        r.t.abort_for_holder(r.now, rq, 50, token),
        None,
        "the backend tries"
    );
    k.borrow_mut().release = 1;
    r.poll();
    assert_eq!(done(&mut r), [(50, Status::ABORT_REQUESTED, 0)]);
    let mut verdicts = Vec::new();
    r.t.take_abort_verdicts(&mut |t, ab| verdicts.push((t, ab)));
    assert_eq!(verdicts, [(token, true)]);
    h.poll();
    assert!(done(&mut h).is_empty(), "nothing until the verdict");
    h.t.abort_verdict_from_elsewhere(token, true);
    h.poll();
    assert_eq!(done(&mut h), [(90, Status::SUCCESS, 0)]);
    // A command the replica does not have (finished already): not aborted.
    assert!(h.send(a, abort(91, 77), None, 0).is_none());
    let t = asked(&mut h)[0].2;
    assert_eq!(r.t.abort_for_holder(r.now, rq, 77, t), Some(false));
    h.t.abort_verdict_from_elsewhere(t, false);
    h.poll();
    assert_eq!(done(&mut h), [(91, Status::SUCCESS, 1)]);
    // The holder's queue closes with an Abort parked: answered, not aborted.
    assert!(h.send(a, abort(92, 51), None, 0).is_none());
    h.t.close_queue_after(io, QueueLoss::Orderly).unwrap();
    h.poll();
    assert_eq!(done(&mut h), [(92, Status::SUCCESS, 1)]);
}

/// An I/O queue served elsewhere coming back (`served_elsewhere(q, false)`: an emulated
/// function's pair recalled, or its controller reset) with Aborts parked: each is answered
/// "not aborted" at once and exactly once (the other core's late verdict, even "aborted",
/// is ignored), whether it was asked of that core already or not. Parked Aborts are taken
/// per transport (`take_abort_requests_of`): another owner's stay parked.
#[test]
fn aborts_parked_for_a_queue_that_comes_back_are_answered_once() {
    let k = Rc::new(RefCell::new(Knobs::default()));
    let (mut h, a, io) = setup(&k, 1);
    h.t.served_elsewhere(io, true);
    let abort = |cid: u16, target: u16| {
        AbortCommand {
            sqid: 1,
            cid: target,
        }
        .to_sqe(cid)
    };
    let done = |h: &mut H| {
        let v = h.completions();
        h.events.clear();
        v
    };
    let owner = io.owner;
    assert!(h.send(a, abort(90, 50), None, 0).is_none(), "parked");
    let mut asked = Vec::new();
    h.t.take_abort_requests_of(owner + 1, &mut |q, cid, t| asked.push((q, cid, t)));
    assert!(asked.is_empty(), "another transport's queue");
    h.t.take_abort_requests_of(owner, &mut |q, cid, t| asked.push((q, cid, t)));
    assert_eq!(asked.len(), 1);
    assert_eq!((asked[0].0, asked[0].1), (io, 50));
    let sent = asked[0].2;
    // A second one, not yet asked of the other core.
    assert!(h.send(a, abort(91, 51), None, 0).is_none(), "parked");
    h.poll();
    assert!(done(&mut h).is_empty(), "nothing until a verdict");
    h.t.served_elsewhere(io, false);
    h.poll();
    let mut got = done(&mut h);
    got.sort_by_key(|c| c.0);
    assert_eq!(got, [(90, Status::SUCCESS, 1), (91, Status::SUCCESS, 1)]);
    h.t.abort_verdict_from_elsewhere(sent, true);
    h.poll();
    assert!(done(&mut h).is_empty(), "answered once");
    let mut again = Vec::new();
    h.t.take_abort_requests(&mut |q, cid, t| again.push((q, cid, t)));
    assert!(again.is_empty(), "nothing left parked");
}

#[test]
fn verify_and_copy_on_ram_and_encrypted_namespaces() {
    let k = Rc::new(RefCell::new(Knobs::default()));
    let (mut h, a, io) = setup(&k, 2);
    let id = id_ctrl(&mut h, a);
    assert!(
        id.oncs
            .contains(Oncs::VERIFY | Oncs::COPY | Oncs::WRITE_ZEROES),
        "{:?}",
        id.oncs
    );
    assert_eq!(id.ocfs, Ocfs::FORMAT_0, "source range format 0h");
    let n = id_ns(&mut h, a, 1);
    // 64 KiB of 512-byte blocks; 4 ranges (0's based 3).
    assert_eq!((n.mssrl, n.mcl, n.msrc), (128, 128, 3));
    let effects = page(&h.log(a, 0x05, 0, 4096));
    assert_eq!(effects[1024 + 4 * 0x0C], 1, "Verify supported");
    assert_eq!(
        effects[1024 + 4 * 0x19],
        3,
        "Copy supported, changes LBA content"
    );

    for nsid in [1u32, 2] {
        let src = pattern(16 * 512, nsid as u8);
        assert!(h.write(io, 1, nsid, 100, &src).cqe.status.is_success());
        // Two ranges, the second first: 8 blocks at 108, then 8 at 100, to 500.
        let (sqe, b, len) = copy_sqe(2, nsid, 500, &[(108, 8), (100, 8)]);
        let r = h.exec(io, sqe, Some(b), len);
        assert_eq!(plain(r.cqe.status), Status::SUCCESS, "copy on NSID {nsid}");
        assert!(r.buf.is_some(), "the range list comes back");
        let back = h.read(io, 3, nsid, 500, 16).buf.unwrap();
        assert_eq!(&back.as_slice()[..4096], &src[4096..]);
        assert_eq!(&back.as_slice()[4096..8192], &src[..4096]);
        // A range overlapping its destination, like memmove: 10 blocks at 100 to 104.
        let (sqe, b, len) = copy_sqe(4, nsid, 104, &[(100, 10)]);
        assert!(h.exec(io, sqe, Some(b), len).cqe.status.is_success());
        let back = h.read(io, 5, nsid, 100, 14).buf.unwrap();
        assert_eq!(&back.as_slice()[..2048], &src[..2048]);
        assert_eq!(&back.as_slice()[2048..7168], &src[..5120]);
        // Verify reads the range; out of range is refused.
        let v = io_cmd(IoOpcode::Verify, 6, nsid, 0, 1024);
        assert!(h.exec(io, v, None, 0).cqe.status.is_success());
        let v = io_cmd(IoOpcode::Verify, 7, nsid, BLOCKS - 2, 4);
        assert_eq!(
            plain(h.exec(io, v, None, 0).cqe.status),
            Status::LBA_OUT_OF_RANGE
        );
    }

    // Copy errors, in the specification's order.
    let size_limit = (1u8, 0x83u8);
    let cases: Vec<(Sqe, IoBuf, u32, (u8, u8))> = vec![
        {
            // 5 ranges: beyond MSRC.
            let (s, b, l) = copy_sqe(10, 1, 0, &[(0, 1); 5]);
            (s, b, l, size_limit)
        },
        {
            // One range longer than MSSRL.
            let (s, b, l) = copy_sqe(11, 1, 0, &[(0, 129)]);
            (s, b, l, size_limit)
        },
        {
            // Ranges adding up to more than MCL.
            let (s, b, l) = copy_sqe(12, 1, 1000, &[(0, 100), (200, 100)]);
            (s, b, l, size_limit)
        },
        {
            // A source range beyond the namespace.
            let (s, b, l) = copy_sqe(13, 1, 0, &[(BLOCKS - 1, 2)]);
            (s, b, l, (0, 0x80))
        },
        {
            // The destination beyond the namespace.
            let (s, b, l) = copy_sqe(14, 1, BLOCKS - 3, &[(0, 4)]);
            (s, b, l, (0, 0x80))
        },
        {
            // Descriptor format 1h is not supported.
            let (mut s, b, l) = copy_sqe(15, 1, 0, &[(0, 1)]);
            s.cdw[2] |= 1 << 8;
            (s, b, l, (0, 0x02))
        },
        {
            // The transfer is not the range list's size.
            let (s, b, _) = copy_sqe(16, 1, 0, &[(0, 1)]);
            (s, b, 16, (0, 0x0F))
        },
    ];
    for (sqe, b, len, want) in cases {
        let r = h.exec(io, sqe, Some(b), len);
        assert_eq!((r.cqe.status.sct, r.cqe.status.sc), want, "CID {}", sqe.cid);
        assert!(r.cqe.status.dnr && r.cqe.status.more);
        assert!(r.buf.is_some());
    }
    let log = error_log(&mut h, a, 0, 64);
    assert_eq!((log[0].cid, log[0].param_error_location), (16, 32));
}

#[test]
fn write_zeroes_on_an_encrypted_namespace_reads_back_zeroes() {
    let k = Rc::new(RefCell::new(Knobs::default()));
    // One 4 KiB scratch buffer: a 20-block Write Zeroes is three writes.
    let mut h = H::with(features(&k, 1, 4096));
    let (a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    // DLFEAT: RAM reads deallocated blocks as zeroes and deallocates on Write Zeroes (09h);
    // the encrypted namespace reports nothing (its deallocated blocks decrypt to noise).
    assert_eq!(id_ns(&mut h, a, 1).dlfeat, 0x09);
    assert_eq!(id_ns(&mut h, a, 2).dlfeat, 0x00);
    let data = pattern(32 * 512, 9);
    assert!(h.write(io, 1, 2, 10, &data).cqe.status.is_success());
    let mut wz = io_cmd(IoOpcode::WriteZeroes, 2, 2, 12, 20);
    wz.cdw[2] |= 1 << 25; // DEAC: a hint, ignored here
    // Also while the only scratch buffer is taken by another command: it waits its turn.
    let wz2 = io_cmd(IoOpcode::WriteZeroes, 3, 2, 40, 2);
    assert!(h.send(io, wz, None, 0).is_none());
    assert!(h.send(io, wz2, None, 0).is_none());
    for _ in 0..10 {
        h.poll();
    }
    assert_eq!(
        h.completions(),
        [(2, Status::SUCCESS, 0), (3, Status::SUCCESS, 0)]
    );
    let back = h.read(io, 4, 2, 10, 32).buf.unwrap();
    let b = back.as_slice();
    assert!(b[..1024] == data[..1024], "blocks 10-11 kept");
    assert!(b[1024..11264].iter().all(|&x| x == 0), "zeroes read back");
    assert!(b[11264..15360] == data[11264..15360], "blocks 32-39 kept");
    assert!(b[15360..].iter().all(|&x| x == 0), "blocks 40-41 zeroed");

    // Without scratch buffers the encrypted namespace cannot: ONCS drops Write Zeroes and
    // Copy, the commands are Invalid Opcode; RAM keeps its own Write Zeroes.
    let mut h = H::with(features(&k, 0, 0));
    let (a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    let id = id_ctrl(&mut h, a);
    assert!(!id.oncs.intersects(Oncs::WRITE_ZEROES | Oncs::COPY));
    assert_eq!(id.ocfs, Ocfs::empty());
    assert_eq!(id_ns(&mut h, a, 1).mcl, 0);
    let wz = io_cmd(IoOpcode::WriteZeroes, 6, 2, 0, 1);
    assert_eq!(
        plain(h.exec(io, wz, None, 0).cqe.status),
        Status::INVALID_OPCODE
    );
    let wz = io_cmd(IoOpcode::WriteZeroes, 7, 1, 0, 1);
    assert!(h.exec(io, wz, None, 0).cqe.status.is_success());
    let (sqe, b, len) = copy_sqe(8, 1, 10, &[(0, 1)]);
    assert_eq!(
        plain(h.exec(io, sqe, Some(b), len).cqe.status),
        Status::INVALID_OPCODE
    );
}

#[test]
fn deallocate_and_chains_give_every_buffer_back() {
    let k = Rc::new(RefCell::new(Knobs::default()));
    let (mut h, _a, io) = setup(&k, 1);
    // DSM over two ranges on the Manual backend; the queue closes mid-chain: the range list
    // comes back once, the scratch pool is whole again after a Copy that was cut short.
    let d = DsmCommand {
        nr: 1,
        idr: false,
        idw: false,
        ad: true,
    };
    let mut b = IoBuf::leak_zeroed(32);
    for (i, (slba, nlb)) in [(0u64, 4u32), (100, 4)].into_iter().enumerate() {
        let r = DsmRange {
            cattr: 0,
            nlb,
            slba,
        };
        b.as_mut_slice()[i * 16..(i + 1) * 16].copy_from_slice(&r.to_bytes());
    }
    assert!(h.send(io, d.to_sqe(1, 3), Some(b), 32).is_none());
    let (sqe, b, len) = copy_sqe(2, 3, 500, &[(0, 8)]);
    assert!(h.send(io, sqe, Some(b), len).is_none());
    k.borrow_mut().release = 1; // the first DSM range
    h.poll();
    h.t.close_queue_after(io, QueueLoss::Orderly).unwrap();
    k.borrow_mut().release = usize::MAX;
    h.poll();
    assert_eq!(h.released(), 2, "the DSM and Copy range lists");
    assert_eq!(h.t.scratch.as_ref().unwrap().available(), 1);
}

proptest! {
    /// The SMART counters match a model of the commands that succeeded, whatever the mix.
    #[test]
    fn smart_matches_a_model(ops in proptest::collection::vec((0u8..4, 0u64..2100, 1u32..64), 1..40)) {
        let k = Rc::new(RefCell::new(Knobs::default()));
        let (mut h, a, io) = setup(&k, 1);
        let (mut reads, mut writes, mut rblocks, mut wblocks) = (0u128, 0u128, 0u128, 0u128);
        for (i, (kind, lba, n)) in ops.into_iter().enumerate() {
            let cid = 100 + i as u16;
            let ok = lba + n as u64 <= BLOCKS;
            let st = match kind {
                0 => h.read(io, cid, 1, lba, n).cqe.status,
                1 => h.write(io, cid, 1, lba, &vec![1u8; n as usize * 512]).cqe.status,
                2 => h.exec(io, io_cmd(IoOpcode::Verify, cid, 1, lba, n), None, 0).cqe.status,
                _ => h.exec(io, io_cmd(IoOpcode::WriteZeroes, cid, 1, lba, n), None, 0).cqe.status,
            };
            prop_assert_eq!(st.is_success(), ok);
            if ok {
                match kind {
                    0 => { reads += 1; rblocks += n as u128; }
                    1 => { writes += 1; wblocks += n as u128; }
                    2 => rblocks += n as u128,
                    _ => {}
                }
            }
        }
        let s = smart(&mut h, a, 0xFFFF_FFFF).unwrap();
        prop_assert_eq!((s.host_read_commands, s.host_write_commands), (reads, writes));
        prop_assert_eq!(s.data_units_read, rblocks.div_ceil(1000));
        prop_assert_eq!(s.data_units_written, wblocks.div_ceil(1000));
        let failed = h.t.ctrls.iter().flatten().map(|c| c.errors.count()).sum::<u64>();
        prop_assert_eq!(s.num_error_log_entries, failed as u128);
    }
}
