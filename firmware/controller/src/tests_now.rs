//! `Target::submit_now`: Reads and Writes run at once with their data in the caller's memory,
//! accounted like submitted commands, or refused with nothing changed.

use crate::tests::{BLOCKS, H, HOST, SUB, config, plain};
use crate::*;
use keel_nvme::io::RwCommand;
use keel_nvme::{IoOpcode, Sqe, Status};
use keel_storage::{BlockBackend, RamBackend};

fn rw(op: IoOpcode, cid: u16, nsid: u32, lba: u64, blocks: u32) -> Sqe {
    RwCommand::simple(lba, blocks).to_sqe(op as u8, cid, nsid)
}

fn now_read(h: &mut H, q: QueueId, sqe: &Sqe, dst: &mut [u8]) -> Option<Response> {
    h.t.submit_now(h.now, q, sqe, 7, NowData::Read(dst))
}

fn now_write(h: &mut H, q: QueueId, sqe: &Sqe, src: &[u8]) -> Option<Response> {
    h.t.submit_now(h.now, q, sqe, 7, NowData::Write(src))
}

#[test]
fn reads_and_writes_run_at_once_like_submitted_ones() {
    let (mut h, _a, io, _c) = H::setup();
    // The I/O queue's Connect took SQ slot 1.
    let data: Vec<u8> = (0..2048u32).map(|i| (i * 3 + 1) as u8).collect();
    let r = now_write(&mut h, io, &rw(IoOpcode::Write, 5, 1, 10, 4), &data).unwrap();
    assert_eq!((r.cqe.cid, r.cqe.sqhd, r.cqe.sqid), (5, 2, 1));
    assert_eq!(
        (plain(r.cqe.status), r.data_len, r.cookie),
        (Status::SUCCESS, 0, 7)
    );
    assert!(r.buf.is_none());
    // The buffered path reads what the direct write wrote, and the other way round.
    assert_eq!(&page_of(&h.read(io, 6, 1, 10, 4))[..], &data[..]);
    let w = h.write(io, 8, 1, 20, &data[..512]);
    assert_eq!(w.cqe.sqhd, 4);
    let mut got = vec![0u8; 1024];
    let r = now_read(&mut h, io, &rw(IoOpcode::Read, 9, 1, 20, 2), &mut got).unwrap();
    assert_eq!(
        (plain(r.cqe.status), r.data_len, r.cqe.sqhd),
        (Status::SUCCESS, 1024, 5)
    );
    assert_eq!(&got[..512], &data[..512]);
    assert!(got[512..].iter().all(|&x| x == 0), "never written: zeroes");
    // Accounted like the others: 2 reads and 2 writes, nothing pending.
    let st = h.t.namespace_stats(SUB, 1).unwrap();
    assert_eq!(
        (st.reads, st.writes, st.read_bytes, st.write_bytes),
        (2, 2, 3072, 2560)
    );
    h.poll();
    assert!(h.events.is_empty(), "{:?}", h.events.len());
}

fn page_of(r: &Response) -> Vec<u8> {
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    r.buf.as_ref().unwrap().as_slice()[..r.data_len as usize].to_vec()
}

#[test]
fn anything_else_is_refused_with_nothing_changed() {
    let (mut h, a, io, _c) = H::setup();
    let mut buf = vec![0u8; 1024];
    let refused: [(QueueId, Sqe, usize); 8] = [
        // The admin queue.
        (a, rw(IoOpcode::Read, 1, 1, 0, 2), 1024),
        // Out of range, and a wrong length: the usual path gives the status.
        (io, rw(IoOpcode::Read, 1, 1, BLOCKS - 1, 2), 1024),
        (io, rw(IoOpcode::Read, 1, 1, 0, 1), 1024),
        // An unknown namespace, the broadcast NSID.
        (io, rw(IoOpcode::Read, 1, 9, 0, 2), 1024),
        (io, rw(IoOpcode::Read, 1, 0xFFFF_FFFF, 0, 2), 1024),
        // Other opcodes, and a write handed read memory.
        (io, rw(IoOpcode::Compare, 1, 1, 0, 2), 1024),
        (io, rw(IoOpcode::Write, 1, 1, 0, 2), 1024),
        // A fused command.
        (
            io,
            {
                let mut s = rw(IoOpcode::Read, 1, 1, 0, 2);
                s.flags |= 1;
                s
            },
            1024,
        ),
    ];
    for (q, sqe, len) in refused {
        assert!(
            now_read(&mut h, q, &sqe, &mut buf[..len]).is_none(),
            "{sqe:?}"
        );
    }
    assert!(now_write(&mut h, io, &rw(IoOpcode::Read, 1, 1, 0, 2), &buf).is_none());
    // A CID in use by a command still at the backend.
    assert!(
        h.send(
            io,
            rw(IoOpcode::Read, 3, 1, 0, 1),
            Some(IoBuf::leak_zeroed(512)),
            512
        )
        .is_none()
    );
    assert!(now_read(&mut h, io, &rw(IoOpcode::Read, 3, 1, 0, 2), &mut buf).is_none());
    // Nothing was consumed: the pending read took SQ slot 2, the next command takes 3.
    h.poll();
    assert_eq!(h.completions(), [(3, Status::SUCCESS, 0)]);
    let r = h.read(io, 4, 1, BLOCKS - 1, 2);
    assert_eq!(
        (plain(r.cqe.status), r.cqe.sqhd),
        (Status::LBA_OUT_OF_RANGE, 3)
    );
    // Counted once: the pending read (a command refused in decoding is not a medium access).
    let st = h.t.namespace_stats(SUB, 1).unwrap();
    assert_eq!((st.reads, st.errors), (1, 0));
}

/// A backend with the buffered path only.
struct Buffered(RamBackend);

impl BlockBackend for Buffered {
    fn geometry(&self) -> keel_storage::Geometry {
        self.0.geometry()
    }
    fn capabilities(&self) -> keel_storage::Capabilities {
        self.0.capabilities()
    }
    fn submit(&mut self, req: keel_storage::BlockRequest) -> Result<(), keel_storage::Rejected> {
        self.0.submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(keel_storage::BlockCompletion)) -> usize {
        self.0.poll(done)
    }
}

#[test]
fn backends_without_synchronous_moves_and_qos_limits_take_the_usual_path() {
    let mut cfg = config(64);
    cfg.subsystems[0].namespaces[0].backend =
        Box::new(Buffered(RamBackend::new(512, BLOCKS, 64).unwrap()));
    let mut h = H::with(cfg);
    let (_a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    let mut buf = vec![0u8; 512];
    assert!(now_read(&mut h, io, &rw(IoOpcode::Read, 1, 1, 0, 1), &mut buf).is_none());
    assert!(now_write(&mut h, io, &rw(IoOpcode::Write, 1, 1, 0, 1), &buf).is_none());

    // A namespace limited to a burst of 2 commands: two run at once, the third would have
    // to wait, so it is refused here (and queued by `submit`, not failed).
    let mut cfg = config(64);
    cfg.subsystems[0].namespaces[0].qos.limits = QosLimits {
        iops: Some(Rate::new(1).with_burst(2)),
        ..QosLimits::NONE
    };
    let mut h = H::with(cfg);
    let (_a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    for cid in 1..=2 {
        let r = now_read(&mut h, io, &rw(IoOpcode::Read, cid, 1, 0, 1), &mut buf).unwrap();
        assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    }
    assert!(now_read(&mut h, io, &rw(IoOpcode::Read, 3, 1, 0, 1), &mut buf).is_none());
    let sqe = rw(IoOpcode::Read, 3, 1, 0, 1);
    assert!(
        h.send(io, sqe, Some(IoBuf::leak_zeroed(512)), 512)
            .is_none()
    );
    h.poll();
    assert!(h.completions().is_empty(), "waits for its limit");
    h.now = Instant::from_millis(h.now.as_millis() + 1000);
    h.poll(); // starts it at the RAM disk...
    h.poll(); // ...which answers in its next poll
    assert_eq!(h.completions(), [(3, Status::SUCCESS, 0)]);
}

/// A backend that moves data at once but reads only into one piece (as AES-XTS).
struct WholeOnly(RamBackend);

impl BlockBackend for WholeOnly {
    fn geometry(&self) -> keel_storage::Geometry {
        self.0.geometry()
    }
    fn capabilities(&self) -> keel_storage::Capabilities {
        self.0.capabilities()
    }
    fn submit(&mut self, req: keel_storage::BlockRequest) -> Result<(), keel_storage::Rejected> {
        self.0.submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(keel_storage::BlockCompletion)) -> usize {
        self.0.poll(done)
    }
    fn moves_data_now(&self) -> keel_storage::NowIo {
        self.0.moves_data_now()
    }
    fn read_now(
        &mut self,
        lba: u64,
        blocks: u32,
        dst: &mut [u8],
    ) -> Result<(), keel_storage::BlockError> {
        self.0.read_now(lba, blocks, dst)
    }
}

/// A read into a destination in two pieces (a ring's free space where it wraps) gets the
/// same bytes as one into one piece, cut anywhere, and is accounted the same; a backend that
/// cannot read that way refuses it with nothing changed (the SQ head does not move).
#[test]
fn split_reads_run_at_once_where_the_backend_reads_into_two_pieces() {
    let (mut h, _a, io, _c) = H::setup();
    let data: Vec<u8> = (0..2048u32).map(|i| (i * 5 + 3) as u8).collect();
    let r = now_write(&mut h, io, &rw(IoOpcode::Write, 1, 1, 10, 4), &data).unwrap();
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    let mut sqhd = r.cqe.sqhd;
    for (cid, cut) in [
        (2u16, 0usize),
        (3, 1),
        (4, 511),
        (5, 512),
        (6, 1500),
        (7, 2048),
    ] {
        let mut got = vec![0u8; 2048];
        let (a, b) = got.split_at_mut(cut);
        let sqe = rw(IoOpcode::Read, cid, 1, 10, 4);
        let r =
            h.t.submit_now(h.now, io, &sqe, 7, NowData::ReadSplit(a, b))
                .unwrap();
        assert_eq!(
            (plain(r.cqe.status), r.data_len, r.cqe.sqhd),
            (Status::SUCCESS, 2048, sqhd + 1),
            "cut at {cut}"
        );
        sqhd = r.cqe.sqhd;
        assert_eq!(got, data, "cut at {cut}");
    }
    // Wrong total length: refused.
    let (mut a, mut b) = (vec![0u8; 1000], vec![0u8; 1000]);
    let sqe = rw(IoOpcode::Read, 8, 1, 10, 4);
    assert!(
        h.t.submit_now(h.now, io, &sqe, 7, NowData::ReadSplit(&mut a, &mut b))
            .is_none()
    );

    let mut cfg = config(64);
    cfg.subsystems[0].namespaces[0].backend =
        Box::new(WholeOnly(RamBackend::new(512, BLOCKS, 64).unwrap()));
    let mut h = H::with(cfg);
    let (_a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    let (mut a, mut b) = (vec![0u8; 200], vec![0u8; 312]);
    let sqe = rw(IoOpcode::Read, 1, 1, 0, 1);
    assert!(
        h.t.submit_now(h.now, io, &sqe, 7, NowData::ReadSplit(&mut a, &mut b))
            .is_none()
    );
    // The same read into one piece runs, as the first command the queue took.
    let mut one = vec![0u8; 512];
    let r = now_read(&mut h, io, &sqe, &mut one).unwrap();
    assert_eq!((plain(r.cqe.status), r.cqe.sqhd), (Status::SUCCESS, 2));
}
