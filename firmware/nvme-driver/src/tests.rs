//! Host tests of the driver against the fake controller in [`crate::fake`].

use crate::fake::{FakeCtrl, FakeDma, FakeNs, FakeRegs, Shared, iobuf};
use crate::{Config, Drive, DriveBackend, InitError, State};
use keel_nvme::identify::{Oncs, Vwc};
use keel_nvme::regs::{Cap, Cc};
use keel_nvme::{AdminOpcode, IoOpcode, Status};
use keel_storage::{
    BlockBackend, BlockCompletion, BlockError, BlockOp, BlockRequest, IoBuf, RejectReason,
    SharedBackend, SliceBackend,
};
use proptest::prelude::*;

type D = Drive<FakeRegs, FakeDma>;
type B = DriveBackend<FakeRegs, FakeDma>;

fn ns(nsid: u32, lbads: u8, bytes: usize) -> FakeNs {
    FakeNs {
        nsid,
        lbads,
        data: vec![0; bytes],
    }
}

fn test_config() -> Config {
    Config {
        io_queues: 2,
        queue_depth: 16,
        admin_depth: 8,
        io_timeout_ns: 1_000,
        abort_timeout_ns: 1_000,
        admin_timeout_ns: 1_000_000_000,
        health_check_ns: 0,
        timeout_scan_ns: 0,
        max_transfer: 1 << 20,
        zero_buffer: 16 << 10,
        interrupts: false,
        core_queues: 0,
    }
}

fn init_with(f: &Shared, cfg: Config) -> Result<D, InitError> {
    let mut t = 0u64;
    let mut clock = move || {
        t += 1_000_000;
        t
    };
    Drive::init(FakeRegs(f.clone()), FakeDma::new(f), cfg, &mut clock)
}

fn setup(tweak: impl FnOnce(&mut FakeCtrl)) -> (Shared, D) {
    let f = FakeCtrl::new(vec![ns(1, 9, 1 << 20), ns(2, 12, 4 << 20)]);
    tweak(&mut f.borrow_mut());
    let d = init_with(&f, test_config()).expect("init");
    (f, d)
}

fn req(
    tag: u64,
    op: BlockOp,
    lba: u64,
    blocks: u32,
    buf: Option<IoBuf>,
    off: usize,
) -> BlockRequest {
    BlockRequest {
        tag,
        op,
        lba,
        blocks,
        buf,
        buf_offset: off,
    }
}

/// Polls until `n` completions arrived (bounded).
fn collect(d: &D, be: &mut dyn BlockBackend, n: usize) -> Vec<BlockCompletion> {
    let mut out = Vec::new();
    let now = t0(d);
    for _ in 0..1000 {
        d.poll(now);
        be.poll(&mut |c| out.push(c));
        if out.len() >= n {
            return out;
        }
    }
    panic!("only {} of {n} completions", out.len());
}

fn run(d: &D, be: &mut dyn BlockBackend, r: BlockRequest) -> BlockCompletion {
    be.submit(r).expect("submit");
    collect(d, be, 1).pop().unwrap()
}

/// The controller's current time (tests add to it).
fn t0(d: &D) -> u64 {
    d.with(|c| c.now()).unwrap()
}

#[test]
fn init_sequence_and_register_values() {
    let (f, d) = setup(|_| {});
    let fc = f.borrow();
    // Disable first, then admin queue registers, then one CC write with EN.
    let w: Vec<(usize, u32)> = fc.reg_writes.clone();
    assert_eq!(w[0], (0x14, 0), "CC.EN cleared first: {w:x?}");
    assert_eq!(w[1], (0x24, (7 << 16) | 7), "AQA: 8-entry admin queues");
    assert_eq!(w[2].0, 0x28);
    assert_eq!(w[3].0, 0x2C);
    assert_eq!(w[4].0, 0x30);
    assert_eq!(w[5].0, 0x34);
    assert_eq!(fc.asq % 4096, 0);
    assert_eq!(fc.acq % 4096, 0);
    // IOSQES 6, IOCQES 4, MPS 0 (CAP.MPSMIN), CSS NVM, EN.
    assert_eq!(w[6], (0x14, 0x0046_0001));
    assert_eq!(w.len(), 7);
    // Admin commands in order.
    let ops: Vec<(u8, u32)> = fc.admin_log.iter().map(|s| (s.opcode, s.cdw[0])).collect();
    let id = AdminOpcode::Identify as u8;
    assert_eq!(
        ops,
        vec![
            (id, 1),
            (id, 2),
            (id, 0),
            (id, 0),
            (AdminOpcode::SetFeatures as u8, 7),
            (AdminOpcode::CreateIoCq as u8, (15 << 16) | 1),
            (AdminOpcode::CreateIoSq as u8, (15 << 16) | 1),
            (AdminOpcode::CreateIoCq as u8, (15 << 16) | 2),
            (AdminOpcode::CreateIoSq as u8, (15 << 16) | 2),
        ]
    );
    // Number of Queues asks for 2 (0's based 1 in both halves).
    assert_eq!(fc.admin_log[4].cdw[1], 0x0001_0001);
    // CQs: physically contiguous, interrupts disabled (IEN, bit 1, clear).
    assert_eq!(fc.cq_flags, vec![1, 1]);
    // SQ bound to the CQ with the same id.
    assert_eq!(fc.admin_log[6].cdw[1], (1 << 16) | 1);
    drop(fc);
    let info = d.info().unwrap();
    assert_eq!(info.model, "Keel fake NVMe");
    assert_eq!(info.serial, "FAKE-SN-1");
    assert_eq!(info.mdts_bytes, 4096 << 5);
    assert_eq!(info.max_transfer, 4096 << 5);
    assert_eq!(
        (info.io_queues, info.queue_depth, info.page_size),
        (2, 16, 4096)
    );
    let nss = d.namespaces();
    assert_eq!(nss.len(), 2);
    assert_eq!(
        (
            nss[0].nsid,
            nss[0].geometry.block_size,
            nss[0].geometry.blocks
        ),
        (1, 512, 2048)
    );
    assert_eq!(
        (
            nss[1].nsid,
            nss[1].geometry.block_size,
            nss[1].geometry.blocks
        ),
        (2, 4096, 1024)
    );
    assert!(nss[0].caps.volatile_write_cache && nss[0].caps.deallocate && nss[0].caps.compare);
    assert!(nss[0].native_write_zeroes);
    assert_eq!(d.state(), State::Online);
}

#[test]
fn stride_page_size_and_queue_depth_follow_cap() {
    let f = FakeCtrl::new(vec![ns(1, 12, 1 << 20)]);
    // MQES 7 (8 entries), DSTRD 2 (16-byte doorbells), MPSMIN 1 (8 KiB pages), TO 4.
    f.borrow_mut().cap = Cap::new(7, true, 0, 4, 2, false, 1, 1, 4);
    let d = init_with(&f, test_config()).unwrap();
    let info = d.info().unwrap();
    assert_eq!((info.page_size, info.queue_depth), (8192, 8));
    let cc = f
        .borrow()
        .reg_writes
        .iter()
        .rev()
        .find(|w| w.0 == 0x14)
        .unwrap()
        .1;
    assert_eq!(Cc(cc).mps(), 1);
    assert_eq!(f.borrow().aqa, (7 << 16) | 7, "admin depth capped by MQES");
    let mut be = d.backend(0).unwrap();
    let mut b = iobuf(&f, 64 << 10, 100);
    b.as_mut_slice().fill(0x5a);
    let c = run(
        &d,
        &mut be,
        req(1, BlockOp::Write { fua: false }, 3, 15, Some(b), 4),
    );
    assert_eq!(c.result, Ok(()));
    // Doorbells of queue 1 at 0x1000 + 2 * 16 (SQ) and + 3 * 16 (CQ).
    let dbs = f.borrow().doorbells.clone();
    assert!(dbs.iter().any(|&(o, _)| o == 0x1020));
    assert!(dbs.iter().any(|&(o, _)| o == 0x1030));
    assert!(
        f.borrow().namespaces[0].data[3 * 4096..18 * 4096]
            .iter()
            .all(|&x| x == 0x5a)
    );
}

#[test]
fn prp_entries_are_byte_exact() {
    let (f, d) = setup(|c| c.mdts = 0);
    let mut be = d.backend(0).unwrap();
    // (buffer misalignment from a page, buffer offset, blocks of 512)
    let cases = [
        (0usize, 0usize, 1u32),
        (0, 0, 8),
        (0, 0, 16),
        (512, 0, 8),
        (0, 3584, 2),
        (4, 0, 17),
        (0, 0, 64),
        (1024, 512, 100),
    ];
    for (i, &(mis, off, blocks)) in cases.iter().enumerate() {
        let len = blocks as usize * 512;
        let b = iobuf(&f, off + len, mis);
        let addr = b.dma_addr() + off as u64;
        f.borrow_mut().log.clear();
        let c = run(
            &d,
            &mut be,
            req(i as u64, BlockOp::Read, 0, blocks, Some(b), off),
        );
        assert_eq!(c.result, Ok(()), "case {i}");
        let fc = f.borrow();
        let l = &fc.log[0];
        assert_eq!(l.sqe.prp1(), addr, "case {i}: PRP1 is the data address");
        // Expected pages: first partial page, then page-aligned pages.
        let first = (4096 - (addr % 4096) as usize).min(len);
        let mut expect = vec![(addr, first)];
        let mut p = (addr & !4095) + 4096;
        let mut rest = len - first;
        while rest > 0 {
            let n = rest.min(4096);
            expect.push((p, n));
            p += 4096;
            rest -= n;
        }
        assert_eq!(l.segments, expect, "case {i}");
        match expect.len() {
            1 => assert_eq!(l.sqe.prp2(), 0, "case {i}"),
            2 => {
                assert_eq!(l.sqe.prp2(), expect[1].0, "case {i}: PRP2 is the 2nd page");
                assert!(l.prp_list.is_empty());
            }
            _ => {
                assert_eq!(l.sqe.prp2() % 4096, 0, "case {i}: list page aligned");
                let want: Vec<u64> = expect[1..].iter().map(|s| s.0).collect();
                assert_eq!(l.prp_list, want, "case {i}: list entries");
            }
        }
    }
}

#[test]
fn large_requests_split_at_mdts_and_complete_once() {
    // MDTS 1 = 8 KiB per command.
    let (f, d) = setup(|c| c.mdts = 1);
    assert_eq!(d.info().unwrap().max_transfer, 8192);
    let mut be = d.backend(0).unwrap();
    let mut b = iobuf(&f, 64 << 10, 256);
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        *x = (i * 7 % 251) as u8;
    }
    let want = b.as_slice().to_vec();
    f.borrow_mut().log.clear();
    let c = run(
        &d,
        &mut be,
        req(9, BlockOp::Write { fua: true }, 5, 128, Some(b), 0),
    );
    assert_eq!((c.tag, c.result), (9, Ok(())));
    {
        let fc = f.borrow();
        assert_eq!(fc.log.len(), 8);
        for (i, l) in fc.log.iter().enumerate() {
            assert_eq!(l.sqe.opcode, IoOpcode::Write as u8);
            assert_eq!(l.sqe.cdw[0] as u64, 5 + 16 * i as u64, "SLBA of chunk {i}");
            assert_eq!(l.sqe.cdw[2] & 0xFFFF, 15);
            assert_ne!(l.sqe.cdw[2] & (1 << 30), 0, "FUA on every chunk");
            // All chunks on the same queue.
            assert_eq!(l.sqid, fc.log[0].sqid);
        }
        assert_eq!(&fc.namespaces[0].data[5 * 512..133 * 512], &want[..]);
    }
    // Read back through a misaligned offset.
    let b = iobuf(&f, (64 << 10) + 8, 0);
    let mut c = run(&d, &mut be, req(10, BlockOp::Read, 5, 128, Some(b), 8));
    assert_eq!(c.result, Ok(()));
    assert_eq!(&c.buf.as_mut().unwrap().as_slice()[8..], &want[..]);
}

#[test]
fn too_many_chunks_for_a_queue_is_refused() {
    let (f, d) = setup(|c| c.mdts = 1);
    let mut be = d.backend(0).unwrap();
    // 15 slots per queue × 8 KiB = 120 KiB; 128 KiB needs 16 commands.
    let b = iobuf(&f, 128 << 10, 0);
    let r = be
        .submit(req(1, BlockOp::Read, 0, 256, Some(b), 0))
        .unwrap_err();
    assert_eq!(r.reason, RejectReason::Invalid(BlockError::Unsupported));
    assert!(r.req.buf.is_some(), "the buffer comes back");
}

#[test]
fn many_outstanding_on_several_queues_one_doorbell_per_batch() {
    let (f, d) = setup(|c| c.deferred = true);
    let t0 = t0(&d);
    f.borrow_mut().doorbells.clear();
    let mut be = d.backend(1).unwrap();
    // 2 queues × 15 slots: 30 outstanding, the 31st is refused as busy.
    let mut tags = Vec::new();
    for i in 0..30u64 {
        let mut b = iobuf(&f, 4096, 0);
        b.as_mut_slice().fill(i as u8);
        be.submit(req(i, BlockOp::Write { fua: false }, i, 1, Some(b), 0))
            .unwrap();
        tags.push(i);
    }
    let extra = be.submit(req(99, BlockOp::Read, 0, 1, Some(iobuf(&f, 4096, 0)), 0));
    assert_eq!(extra.unwrap_err().reason, RejectReason::Busy);
    assert_eq!(f.borrow().doorbells.len(), 0, "nothing rung during submit");
    d.poll(t0);
    {
        let fc = f.borrow();
        // One SQ tail doorbell per queue for the whole batch.
        let sq_dbs: Vec<_> = fc
            .doorbells
            .iter()
            .filter(|(o, _)| (o - 0x1000) / 4 % 2 == 0)
            .collect();
        assert_eq!(sq_dbs, vec![&(0x1008, 15), &(0x1010, 15)]);
        assert_eq!((fc.pending(1), fc.pending(2)), (15, 15));
    }
    assert_eq!(d.with(|c| c.outstanding()), Some(30));
    f.borrow_mut().tick();
    let mut got: Vec<u64> = collect(&d, &mut be, 30)
        .iter()
        .map(|c| {
            assert_eq!(c.result, Ok(()));
            c.tag
        })
        .collect();
    got.sort();
    assert_eq!(got, tags);
    let fc = f.borrow();
    let cq_dbs: Vec<_> = fc
        .doorbells
        .iter()
        .filter(|(o, _)| (o - 0x1000) / 4 % 2 == 1)
        .collect();
    assert_eq!(
        cq_dbs,
        vec![&(0x100c, 15), &(0x1014, 15)],
        "one CQ head doorbell per queue"
    );
    for i in 0..30usize {
        assert!(
            fc.namespaces[1].data[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&x| x == i as u8)
        );
    }
    drop(fc);
    let s = d.stats();
    assert_eq!(
        (s.commands, s.requests_done, s.sq_doorbells, s.cq_doorbells),
        (30, 30, 2, 2)
    );
}

#[test]
fn queue_wraps_many_times() {
    let (f, d) = setup(|_| {});
    let mut be = d.backend(0).unwrap();
    for i in 0..200u64 {
        let mut b = iobuf(&f, 512, 0);
        b.as_mut_slice().fill(i as u8);
        let c = run(
            &d,
            &mut be,
            req(i, BlockOp::Write { fua: false }, i % 64, 1, Some(b), 0),
        );
        assert_eq!(c.result, Ok(()));
    }
    assert_eq!(f.borrow().namespaces[0].data[63 * 512], 191);
}

#[test]
fn error_statuses_map_to_block_errors() {
    let (f, d) = setup(|_| {});
    let mut be = d.backend(0).unwrap();
    let cases = [
        (IoOpcode::Write, Status::WRITE_FAULT, BlockError::WriteFault),
        (
            IoOpcode::Read,
            Status::UNRECOVERED_READ_ERROR,
            BlockError::ReadError,
        ),
        (IoOpcode::Read, Status::INTERNAL_ERROR, BlockError::Internal),
        (
            IoOpcode::Compare,
            Status::COMPARE_FAILURE,
            BlockError::CompareMismatch,
        ),
    ];
    for (i, (op, st, err)) in cases.into_iter().enumerate() {
        f.borrow_mut().fail_next.push_back((op as u8, st));
        let bop = match op {
            IoOpcode::Write => BlockOp::Write { fua: false },
            IoOpcode::Compare => BlockOp::Compare,
            _ => BlockOp::Read,
        };
        let c = run(
            &d,
            &mut be,
            req(i as u64, bop, 0, 1, Some(iobuf(&f, 512, 0)), 0),
        );
        assert_eq!(c.result, Err(err));
        assert!(c.buf.is_some());
    }
    assert_eq!(d.stats().errors, 4);
    assert_eq!(d.stats().last_error, Some(Status::COMPARE_FAILURE));
    // Out of range is refused before reaching the drive.
    let r = be
        .submit(req(1, BlockOp::Read, 2047, 2, Some(iobuf(&f, 1024, 0)), 0))
        .unwrap_err();
    assert_eq!(r.reason, RejectReason::Invalid(BlockError::OutOfRange));
}

#[test]
fn optional_commands_pass_through_when_supported() {
    let (f, d) = setup(|_| {});
    let mut be = d.backend(0).unwrap();
    f.borrow_mut().namespaces[0].data.fill(0xff);
    f.borrow_mut().log.clear();
    let wz = BlockOp::WriteZeroes {
        deallocate: true,
        fua: true,
    };
    assert_eq!(
        run(&d, &mut be, req(1, wz, 10, 2000, None, 0)).result,
        Ok(())
    );
    assert_eq!(
        run(&d, &mut be, req(2, BlockOp::Deallocate, 2040, 8, None, 0)).result,
        Ok(())
    );
    assert_eq!(
        run(&d, &mut be, req(3, BlockOp::Flush, 0, 0, None, 0)).result,
        Ok(())
    );
    let fc = f.borrow();
    let ops: Vec<u8> = fc.log.iter().map(|l| l.sqe.opcode).collect();
    assert_eq!(
        ops,
        vec![
            IoOpcode::WriteZeroes as u8,
            IoOpcode::DatasetManagement as u8,
            IoOpcode::Flush as u8
        ]
    );
    let wzc = fc.log[0].sqe.cdw[2];
    assert_eq!((wzc & 0xFFFF, wzc >> 25 & 1, wzc >> 30 & 1), (1999, 1, 1));
    assert_eq!(fc.log[1].sqe.cdw[1], 4, "DSM attribute deallocate");
    assert_eq!(fc.flushes, 1);
    let data = &fc.namespaces[0].data;
    assert!(data[..10 * 512].iter().all(|&x| x == 0xff));
    assert!(data[10 * 512..2010 * 512].iter().all(|&x| x == 0));
    assert!(data[2010 * 512..2040 * 512].iter().all(|&x| x == 0xff));
    assert!(data[2040 * 512..].iter().all(|&x| x == 0));
}

#[test]
fn optional_commands_emulated_or_refused_when_missing() {
    let (f, d) = setup(|c| {
        c.oncs = Oncs::empty();
        c.vwc = Vwc::empty();
        c.mdts = 2;
    });
    let mut be = d.backend(0).unwrap();
    let caps = be.capabilities();
    assert!(caps.write_zeroes && caps.flush && !caps.deallocate && !caps.compare);
    assert!(!caps.volatile_write_cache);
    f.borrow_mut().namespaces[0].data.fill(0xee);
    f.borrow_mut().log.clear();
    // Write Zeroes: writes from the 16 KiB zero buffer, 32 blocks per command.
    let wz = BlockOp::WriteZeroes {
        deallocate: false,
        fua: false,
    };
    assert_eq!(run(&d, &mut be, req(1, wz, 1, 100, None, 0)).result, Ok(()));
    {
        let fc = f.borrow();
        assert_eq!(fc.log.len(), 4);
        assert!(fc.log.iter().all(|l| l.sqe.opcode == IoOpcode::Write as u8));
        let d = &fc.namespaces[0].data;
        assert_eq!(d[511], 0xee);
        assert!(d[512..101 * 512].iter().all(|&x| x == 0));
        assert_eq!(d[101 * 512], 0xee);
    }
    // Flush without a volatile write cache: success, no command.
    f.borrow_mut().log.clear();
    assert_eq!(
        run(&d, &mut be, req(2, BlockOp::Flush, 0, 0, None, 0)).result,
        Ok(())
    );
    assert!(f.borrow().log.is_empty());
    // Deallocate and Compare: refused with a clear reason.
    let r = be
        .submit(req(3, BlockOp::Deallocate, 0, 1, None, 0))
        .unwrap_err();
    assert_eq!(r.reason, RejectReason::Invalid(BlockError::Unsupported));
    let r = be
        .submit(req(4, BlockOp::Compare, 0, 1, Some(iobuf(&f, 512, 0)), 0))
        .unwrap_err();
    assert_eq!(r.reason, RejectReason::Invalid(BlockError::Unsupported));
}

#[test]
fn verify_passes_through_or_reads_into_a_sink() {
    // Native: one Verify command per 65536 blocks, no data pointer.
    let (f, d) = setup(|c| c.oncs |= Oncs::VERIFY);
    let mut be = d.backend(0).unwrap();
    assert!(be.capabilities().verify);
    f.borrow_mut().log.clear();
    assert_eq!(
        run(&d, &mut be, req(1, BlockOp::Verify, 8, 100, None, 0)).result,
        Ok(())
    );
    {
        let fc = f.borrow();
        assert_eq!(fc.log.len(), 1);
        let s = fc.log[0].sqe;
        assert_eq!(s.opcode, IoOpcode::Verify as u8);
        assert_eq!((s.cdw[0], s.cdw[2] & 0xFFFF, s.prp1()), (8, 99, 0));
    }
    // A media error on the drive fails the request as a read error.
    f.borrow_mut()
        .fail_next
        .push_back((IoOpcode::Verify as u8, Status::UNRECOVERED_READ_ERROR));
    assert_eq!(
        run(&d, &mut be, req(2, BlockOp::Verify, 0, 1, None, 0)).result,
        Err(BlockError::ReadError)
    );

    // Emulated: Read commands into the 16 KiB sink (32 blocks each); the data stays put.
    let (f, d) = setup(|c| c.oncs = Oncs::empty());
    let mut be = d.backend(0).unwrap();
    assert!(be.capabilities().verify);
    f.borrow_mut().namespaces[0].data.fill(0x5a);
    f.borrow_mut().log.clear();
    assert_eq!(
        run(&d, &mut be, req(3, BlockOp::Verify, 1, 70, None, 0)).result,
        Ok(())
    );
    let fc = f.borrow();
    let cmds: Vec<(u8, u32, u32)> = fc
        .log
        .iter()
        .map(|l| (l.sqe.opcode, l.sqe.cdw[0], l.sqe.cdw[2] & 0xFFFF))
        .collect();
    let rd = IoOpcode::Read as u8;
    assert_eq!(cmds, [(rd, 1, 31), (rd, 33, 31), (rd, 65, 5)]);
    assert!(fc.namespaces[0].data.iter().all(|&x| x == 0x5a));
}

#[test]
fn host_abort_reaches_the_drive() {
    let (f, d) = setup(|c| c.hold_io = true);
    let t0 = t0(&d);
    let mut be = d.backend(0).unwrap();
    be.submit(req(7, BlockOp::Read, 0, 1, Some(iobuf(&f, 512, 0)), 0))
        .unwrap();
    be.submit(req(8, BlockOp::Read, 1, 1, Some(iobuf(&f, 512, 0)), 0))
        .unwrap();
    d.poll(t0 + 10);
    assert_eq!(f.borrow().held.len(), 2);
    // Unknown tag: nothing sent.
    assert!(!be.abort(99));
    assert!(
        !f.borrow()
            .admin_log
            .iter()
            .any(|s| s.opcode == AdminOpcode::Abort as u8)
    );
    // The drive aborts command 7: it fails back as Aborted, with its buffer.
    assert!(be.abort(7));
    d.poll(t0 + 20);
    let abort = *f.borrow().admin_log.last().unwrap();
    assert_eq!(abort.opcode, AdminOpcode::Abort as u8);
    let held_cid = f.borrow().held[0].1.cid;
    assert_eq!(abort.cdw[0] >> 16, held_cid as u32);
    let mut out = Vec::new();
    be.poll(&mut |c| out.push(c));
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].tag, out[0].result), (7, Err(BlockError::Aborted)));
    assert!(out[0].buf.is_some());
    // A drive that does not abort: the request completes normally later.
    f.borrow_mut().abort_works = false;
    assert!(be.abort(8));
    d.poll(t0 + 30);
    be.poll(&mut |c| out.push(c));
    assert_eq!(out.len(), 1);
    f.borrow_mut().release_held();
    d.poll(t0 + 40);
    be.poll(&mut |c| out.push(c));
    assert_eq!((out[1].tag, out[1].result), (8, Ok(())));
    assert_eq!(d.stats().aborts, 2);
    assert_eq!(d.state(), State::Online);
}

#[test]
fn timeout_abort_completes_the_command_with_an_error() {
    let (f, d) = setup(|c| c.hold_io = true);
    let t0 = t0(&d);
    let mut be = d.backend(0).unwrap();
    be.submit(req(7, BlockOp::Read, 0, 1, Some(iobuf(&f, 512, 0)), 0))
        .unwrap();
    d.poll(t0 + 100);
    assert_eq!(f.borrow().held.len(), 1);
    let mut out = Vec::new();
    be.poll(&mut |c| out.push(c));
    assert!(out.is_empty());
    // Past the I/O timeout (1 µs): Abort is sent, the controller completes the command with
    // Abort Requested, the request fails back with its buffer.
    d.poll(t0 + 2_000);
    let last = f.borrow().admin_log.last().copied().unwrap();
    assert_eq!(last.opcode, AdminOpcode::Abort as u8);
    d.poll(t0 + 2_100);
    be.poll(&mut |c| out.push(c));
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].tag, out[0].result), (7, Err(BlockError::Internal)));
    assert!(out[0].buf.is_some());
    let s = d.stats();
    assert_eq!((s.timeouts, s.aborts, s.resets), (1, 1, 0));
    assert_eq!(d.state(), State::Online);
}

#[test]
fn timeout_without_abort_resets_fails_everything_back_and_recovers() {
    let (f, d) = setup(|c| {
        c.hold_io = true;
        c.abort_works = false;
    });
    let t0 = t0(&d);
    let mut be0 = d.backend(0).unwrap();
    let mut be1 = d.backend(1).unwrap();
    for i in 0..5 {
        be0.submit(req(i, BlockOp::Read, i, 1, Some(iobuf(&f, 512, 0)), 0))
            .unwrap();
        be1.submit(req(
            100 + i,
            BlockOp::Write { fua: false },
            i,
            1,
            Some(iobuf(&f, 4096, 0)),
            0,
        ))
        .unwrap();
    }
    d.poll(t0);
    d.poll(t0 + 1_500); // timeout: aborts sent (ignored by the controller)
    assert_eq!(d.stats().aborts, 4, "limited by ACL (3 → 4 outstanding)");
    d.poll(t0 + 3_000); // abort timeout: reset starts
    assert_eq!(d.state(), State::Resetting);
    // While resetting, requests are refused as busy and keep their buffer.
    let r = be0
        .submit(req(50, BlockOp::Read, 0, 1, Some(iobuf(&f, 512, 0)), 0))
        .unwrap_err();
    assert_eq!(r.reason, RejectReason::Busy);
    f.borrow_mut().hold_io = false;
    let mut t = t0 + 3_000;
    while d.state() != State::Online {
        t += 10;
        d.poll(t);
        assert!(t < t0 + 100_000, "recovery did not finish");
    }
    let mut out0 = Vec::new();
    let mut out1 = Vec::new();
    be0.poll(&mut |c| out0.push(c));
    be1.poll(&mut |c| out1.push(c));
    assert_eq!(out0.len(), 5);
    assert_eq!(out1.len(), 5);
    for c in out0.iter().chain(out1.iter()) {
        assert_eq!(c.result, Err(BlockError::Internal));
        assert!(c.buf.is_some());
    }
    let s = d.stats();
    assert_eq!((s.resets, s.failed_by_reset), (1, 10));
    assert_eq!(f.borrow().enables, 2);
    // Queues re-created: I/O works again.
    let mut b = iobuf(&f, 512, 0);
    b.as_mut_slice().fill(3);
    assert_eq!(
        run(
            &d,
            &mut be0,
            req(60, BlockOp::Write { fua: false }, 9, 1, Some(b), 0)
        )
        .result,
        Ok(())
    );
    assert_eq!(f.borrow().namespaces[0].data[9 * 512], 3);
}

#[test]
fn cfs_is_detected_and_recovered_from() {
    let (f, d) = setup(|c| c.deferred = true);
    let t0 = t0(&d);
    let mut be = d.backend(0).unwrap();
    for i in 0..3 {
        be.submit(req(i, BlockOp::Read, 0, 1, Some(iobuf(&f, 512, 0)), 0))
            .unwrap();
    }
    d.poll(t0);
    f.borrow_mut().csts.set_cfs(true);
    f.borrow_mut().deferred = false;
    d.poll(t0 + 10);
    assert_eq!(d.state(), State::Resetting);
    let mut t = t0 + 10;
    while d.state() != State::Online {
        t += 10;
        d.poll(t);
        assert!(t < t0 + 100_000);
    }
    let mut out = Vec::new();
    be.poll(&mut |c| out.push(c));
    assert_eq!(out.len(), 3);
    assert!(
        out.iter()
            .all(|c| c.result == Err(BlockError::Internal) && c.buf.is_some())
    );
    let b = iobuf(&f, 512, 0);
    assert_eq!(
        run(&d, &mut be, req(9, BlockOp::Read, 0, 1, Some(b), 0)).result,
        Ok(())
    );
    assert_eq!(d.stats().resets, 1);
}

#[test]
fn failed_recovery_fails_requests_and_refuses_new_ones() {
    let (f, d) = setup(|c| c.hold_io = true);
    let t0 = t0(&d);
    let mut be = d.backend(0).unwrap();
    be.submit(req(1, BlockOp::Read, 0, 1, Some(iobuf(&f, 512, 0)), 0))
        .unwrap();
    d.poll(t0);
    f.borrow_mut().csts.set_cfs(true);
    f.borrow_mut().refuse_enable = true;
    let mut t = t0;
    while d.state() != State::Dead {
        t += 100_000_000;
        d.poll(t);
        assert!(t < t0 + 100_000_000_000);
    }
    let mut out = Vec::new();
    be.poll(&mut |c| out.push(c));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].result, Err(BlockError::Internal));
    let r = be
        .submit(req(2, BlockOp::Read, 0, 1, Some(iobuf(&f, 512, 0)), 0))
        .unwrap_err();
    assert_eq!(r.reason, RejectReason::Invalid(BlockError::Internal));
}

#[test]
fn enable_failure_is_a_clear_error() {
    let f = FakeCtrl::new(vec![ns(1, 9, 1 << 20)]);
    f.borrow_mut().refuse_enable = true;
    let e = init_with(&f, test_config()).unwrap_err();
    assert_eq!(e, InitError::EnableTimeout);
    assert!(e.to_string().contains("did not become ready"));
    // Bounded by CAP.TO (4 × 500 ms) with the 1 ms clock: a few thousand polls, not forever.

    let f = FakeCtrl::new(vec![ns(1, 9, 1 << 20)]);
    {
        let mut fc = f.borrow_mut();
        fc.cc = 1;
        fc.csts.set_rdy(true);
        fc.stuck_rdy = true;
    }
    assert_eq!(
        init_with(&f, test_config()).unwrap_err(),
        InitError::DisableTimeout
    );

    let f = FakeCtrl::new(vec![ns(1, 9, 1 << 20)]);
    f.borrow_mut().cap = Cap::new(63, true, 0, 4, 0, false, 0x40, 0, 0);
    assert_eq!(
        init_with(&f, test_config()).unwrap_err(),
        InitError::NoNvmCommandSet
    );
}

#[test]
fn controller_without_active_ns_list_and_fewer_queues() {
    let f = FakeCtrl::new(vec![ns(1, 9, 1 << 20), ns(3, 9, 1 << 20)]);
    {
        let mut fc = f.borrow_mut();
        fc.no_ns_list = true;
        fc.max_queues = 1;
    }
    let d = init_with(&f, test_config()).unwrap();
    let nsids: Vec<u32> = d.namespaces().iter().map(|n| n.nsid).collect();
    assert_eq!(
        nsids,
        vec![1, 3],
        "NSID 2 is inactive (zero size) and skipped"
    );
    assert_eq!(d.info().unwrap().io_queues, 1);
}

#[test]
fn slices_of_one_drive() {
    let (f, d) = setup(|_| {});
    let shared = SharedBackend::new(d.backend(0).unwrap(), 64);
    let mut a = SliceBackend::new(shared.handle().unwrap(), 0, 1024).unwrap();
    let mut b = SliceBackend::new(shared.handle().unwrap(), 1024, 1024).unwrap();
    let mut x = iobuf(&f, 512, 0);
    x.as_mut_slice().fill(1);
    let mut y = iobuf(&f, 512, 0);
    y.as_mut_slice().fill(2);
    a.submit(req(1, BlockOp::Write { fua: false }, 5, 1, Some(x), 0))
        .unwrap();
    b.submit(req(2, BlockOp::Write { fua: false }, 5, 1, Some(y), 0))
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..10 {
        d.poll(t0(&d));
        a.poll(&mut |c| got.push(c.tag));
        b.poll(&mut |c| got.push(c.tag));
    }
    got.sort();
    assert_eq!(got, vec![1, 2]);
    let fc = f.borrow();
    assert_eq!(fc.namespaces[0].data[5 * 512], 1);
    assert_eq!(fc.namespaces[0].data[1029 * 512], 2);
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        lba: u64,
        blocks: u32,
        off: usize,
        mis: usize,
        seed: u8,
    },
    Read {
        lba: u64,
        blocks: u32,
        off: usize,
        mis: usize,
    },
    Zero {
        lba: u64,
        blocks: u32,
    },
}

fn op_strategy(blocks_total: u64) -> impl Strategy<Value = Op> {
    let lb = (0..blocks_total - 1, 1u32..80);
    prop_oneof![
        4 => (lb.clone(), 0usize..4, 0usize..1024, any::<u8>()).prop_map(move |((lba, n), o, m, s)| Op::Write {
            lba, blocks: n.min((blocks_total - lba) as u32), off: o * 512, mis: m & !3, seed: s
        }),
        4 => (lb.clone(), 0usize..4, 0usize..1024).prop_map(move |((lba, n), o, m)| Op::Read {
            lba, blocks: n.min((blocks_total - lba) as u32), off: o * 512, mis: m & !3
        }),
        1 => lb.prop_map(move |(lba, n)| Op::Zero { lba, blocks: n.min((blocks_total - lba) as u32) }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn round_trips_match_a_vec_model(
        ops in proptest::collection::vec(op_strategy(2048), 1..40),
        mdts in 1u8..4,
        native_zero in any::<bool>(),
    ) {
        let f = FakeCtrl::new(vec![ns(1, 9, 1 << 20)]);
        {
            let mut fc = f.borrow_mut();
            fc.mdts = mdts;
            if !native_zero { fc.oncs = Oncs::empty(); }
        }
        let d = init_with(&f, test_config()).unwrap();
        let mut be: B = d.backend(0).unwrap();
        let mut model = vec![0u8; 1 << 20];
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Write { lba, blocks, off, mis, seed } => {
                    let len = blocks as usize * 512;
                    let mut b = iobuf(&f, off + len, mis);
                    for (j, x) in b.as_mut_slice()[off..].iter_mut().enumerate() {
                        *x = seed.wrapping_add((j / 7) as u8);
                    }
                    let s = lba as usize * 512;
                    model[s..s + len].copy_from_slice(&b.as_slice()[off..]);
                    let c = run(&d, &mut be, req(i as u64, BlockOp::Write { fua: false }, lba, blocks, Some(b), off));
                    prop_assert_eq!(c.result, Ok(()));
                }
                Op::Read { lba, blocks, off, mis } => {
                    let len = blocks as usize * 512;
                    let b = iobuf(&f, off + len, mis);
                    let c = run(&d, &mut be, req(i as u64, BlockOp::Read, lba, blocks, Some(b), off));
                    prop_assert_eq!(c.result, Ok(()));
                    let s = lba as usize * 512;
                    let got = c.buf.unwrap();
                    prop_assert_eq!(&got.as_slice()[off..], &model[s..s + len]);
                }
                Op::Zero { lba, blocks } => {
                    let s = lba as usize * 512;
                    model[s..s + blocks as usize * 512].fill(0);
                    let wz = BlockOp::WriteZeroes { deallocate: false, fua: false };
                    let c = run(&d, &mut be, req(i as u64, wz, lba, blocks, None, 0));
                    prop_assert_eq!(c.result, Ok(()));
                }
            }
        }
        prop_assert!(f.borrow().namespaces[0].data == model);
        prop_assert_eq!(d.stats().errors, 0);
    }
}

#[test]
fn interrupts_on_request_put_each_queue_on_its_own_vector() {
    // NVMe base 2.0 Figure 474 (Create I/O Completion Queue CDW11): IV in bits 31:16, IEN
    // bit 1, PC bit 0.
    let (f, _d) = setup(|_| {});
    assert_eq!(f.borrow().cq_flags, vec![0b01, 0b01], "IEN 0 by default");
    let f = FakeCtrl::new(vec![ns(1, 9, 1 << 20)]);
    let cfg = Config {
        interrupts: true,
        ..test_config()
    };
    let _d = init_with(&f, cfg).unwrap();
    assert_eq!(
        f.borrow().cq_flags,
        vec![(1 << 16) | 0b11, (2 << 16) | 0b11]
    );
}

#[test]
fn admin_commands_and_identify_pages_after_bring_up() {
    let (f, d) = setup(|_| {});
    let mut clock = {
        let mut t = t0(&d);
        move || {
            t += 1_000;
            t
        }
    };
    let page = d
        .with(|c| c.identify_page(keel_nvme::identify::cns::CONTROLLER, 0, &mut clock))
        .unwrap()
        .unwrap();
    let id = keel_nvme::identify::IdentifyController::decode(&page);
    assert_eq!(id.mdts, 5);
    let page = d
        .with(|c| c.identify_page(keel_nvme::identify::cns::NAMESPACE, 2, &mut clock))
        .unwrap()
        .unwrap();
    let ns2 = keel_nvme::identify::IdentifyNamespace::decode(&page);
    assert_eq!((ns2.nsze, ns2.block_size()), (1024, 4096));
    // A hostile command gets the controller's status; the controller keeps serving.
    let sqe = keel_nvme::Sqe::new(AdminOpcode::CreateIoCq as u8, 0)
        .with_cdw(10, (15 << 16) | 999)
        .with_cdw(11, 1);
    let e = d
        .with(|c| c.admin_command(sqe, &mut clock))
        .unwrap()
        .unwrap_err();
    assert_eq!(
        e,
        InitError::AdminFailed(
            AdminOpcode::CreateIoCq as u8,
            Status::command_specific(keel_nvme::cqe::command_specific::INVALID_QUEUE_IDENTIFIER)
        )
    );
    assert_eq!(d.state(), State::Online);
    let mut be = d.backend(0).unwrap();
    let c = run(
        &d,
        &mut be,
        req(1, BlockOp::Read, 0, 8, Some(iobuf(&f, 4096, 0)), 0),
    );
    assert_eq!(c.result, Ok(()));
}

#[test]
fn shutdown_reaps_what_was_taken_and_refuses_new_requests() {
    let (f, d) = setup(|c| c.deferred = true);
    let t0 = t0(&d);
    let mut clock = {
        let mut t = t0;
        move || {
            t += 1_000;
            t
        }
    };
    let mut be = d.backend(0).unwrap();
    for i in 0..4 {
        be.submit(req(
            i,
            BlockOp::Write { fua: false },
            i * 8,
            8,
            Some(iobuf(&f, 4096, 0)),
            0,
        ))
        .unwrap();
    }
    // Shutdown rings the doorbell for what was queued, then sets CC.SHN.
    d.with(|c| c.shutdown(&mut clock)).unwrap().unwrap();
    let cc = f.borrow().cc;
    assert_eq!(Cc(cc).shn(), Cc::SHN_NORMAL);
    assert!(Cc(cc).en(), "EN stays set");
    assert_eq!(d.state(), State::ShutDown);
    // The controller completes what it took; the driver still reaps it.
    f.borrow_mut().tick();
    let mut out = Vec::new();
    d.poll(t0 + 10);
    be.poll(&mut |c| out.push(c));
    assert_eq!(out.len(), 4);
    assert!(out.iter().all(|c| c.result == Ok(())));
    let r = be
        .submit(req(9, BlockOp::Read, 0, 1, Some(iobuf(&f, 512, 0)), 0))
        .unwrap_err();
    assert_eq!(r.reason, RejectReason::Invalid(BlockError::Internal));
    // A controller that never reports completion: bounded, reported.
    let (_f, d) = setup(|c| c.ignore_shutdown = true);
    let mut clock = {
        let mut t = 0u64;
        move || {
            t += 100_000_000;
            t
        }
    };
    assert_eq!(
        d.with(|c| c.shutdown(&mut clock)).unwrap(),
        Err(InitError::ShutdownTimeout)
    );
}

#[test]
fn submit_on_a_chosen_queue() {
    let (f, d) = setup(|_| {});
    let mut be = d.backend(0).unwrap();
    for i in 0..3 {
        be.submit_on(1, req(i, BlockOp::Read, i, 1, Some(iobuf(&f, 512, 0)), 0))
            .unwrap();
    }
    d.poll(t0(&d));
    // Every command went to I/O queue 2 (SQ 2 tail doorbell at 0x1000 + 2 * 2 * 4).
    let dbs = f.borrow().doorbells.clone();
    assert!(dbs.iter().any(|&(o, v)| o == 0x1010 && v == 3), "{dbs:?}");
    assert!(
        !dbs.iter().any(|&(o, _)| o == 0x1008),
        "SQ 1 untouched: {dbs:?}"
    );
    let mut out = Vec::new();
    be.poll(&mut |c| out.push(c));
    assert_eq!(out.len(), 3);
    let r = be
        .submit_on(2, req(9, BlockOp::Read, 0, 1, Some(iobuf(&f, 512, 0)), 0))
        .unwrap_err();
    assert_eq!(
        r.reason,
        RejectReason::Invalid(BlockError::Internal),
        "no queue 3"
    );
}

/// Issue 17: a queue pair created for another core. The controller creates it after its own
/// (Create I/O CQ / SQ with the next queue ID, within what Number of Queues granted) and
/// hands it out once; I/O submitted there reaches the drive on that queue alone (the
/// controller's own queues and counters do not move). A command that hangs there makes the
/// core ask for a reset: the request fails with the internal error a reset gives on the
/// controller's own queues, the core resets its queue before the controller creates it
/// again, and I/O works on it afterwards.
#[test]
fn a_core_queue_serves_io_alone_and_follows_a_reset() {
    use crate::{CoreBackend, CoreQueue};
    use std::cell::RefCell;
    use std::rc::Rc;
    let f = FakeCtrl::new(vec![ns(1, 9, 1 << 20)]);
    f.borrow_mut().abort_works = false;
    let cfg = Config {
        core_queues: 1,
        ..test_config()
    };
    let d = init_with(&f, cfg).expect("init");
    let info = d.info().unwrap();
    assert_eq!((info.io_queues, info.core_queues), (2, 1));
    let created = |f: &Shared| -> Vec<u32> {
        f.borrow()
            .admin_log
            .iter()
            .filter(|s| s.opcode == AdminOpcode::CreateIoSq as u8)
            .map(|s| s.cdw[0] & 0xFFFF)
            .collect()
    };
    assert_eq!(created(&f), vec![1, 2, 3]);
    // Number of Queues asked for 3 pairs (0's based: 2).
    let noq = f
        .borrow()
        .admin_log
        .iter()
        .find(|s| s.opcode == AdminOpcode::SetFeatures as u8)
        .map(|s| s.cdw[1])
        .unwrap();
    assert_eq!(noq, 2 | (2 << 16));
    let q: CoreQueue<FakeRegs, FakeDma> = d
        .with(|c| c.take_core_queue(0, FakeRegs(f.clone())))
        .flatten()
        .expect("the core queue");
    assert!(
        d.with(|c| c.take_core_queue(0, FakeRegs(f.clone())))
            .flatten()
            .is_none(),
        "handed out once"
    );
    assert_eq!(q.qid(), 3);
    let q = Rc::new(RefCell::new(q));
    let mut be = CoreBackend::new(q.clone(), 0).unwrap();
    let mut t = t0(&d);
    let pump = |be: &mut CoreBackend<FakeRegs, FakeDma>, t: u64| {
        let mut out = Vec::new();
        for _ in 0..100 {
            q.borrow_mut().poll(t);
            be.poll(&mut |c| out.push(c));
            if !out.is_empty() {
                break;
            }
        }
        out.pop()
    };
    q.borrow_mut().poll(t);
    let mut b = iobuf(&f, 4096, 0);
    b.as_mut_slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = (i * 7) as u8);
    be.submit(req(1, BlockOp::Write { fua: false }, 16, 8, Some(b), 0))
        .unwrap();
    assert_eq!(pump(&mut be, t).unwrap().result, Ok(()));
    be.submit(req(2, BlockOp::Read, 16, 8, Some(iobuf(&f, 4096, 0)), 0))
        .unwrap();
    let c = pump(&mut be, t).unwrap();
    assert_eq!(c.result, Ok(()));
    assert!(
        c.buf
            .unwrap()
            .as_slice()
            .iter()
            .enumerate()
            .all(|(i, x)| *x == (i * 7) as u8)
    );
    assert!(f.borrow().log.iter().all(|l| l.sqid == 3), "queue 3 only");
    assert_eq!(d.stats().commands, 0, "nothing on the controller's queues");
    let s = q.borrow().stats();
    assert_eq!((s.commands, s.requests_done), (2, 2));
    // One SQ tail doorbell per command (each submitted alone), a CQ head doorbell per reap.
    assert_eq!(s.sq_doorbells, 2, "{s:?}");
    assert!(s.cq_doorbells >= 2, "{s:?}");
    assert_eq!(s.queue_full, 0);
    assert_eq!(q.borrow().state(), crate::CoreQueueState::Up);
    let own = d.stats();
    assert_eq!(
        (own.sq_doorbells, own.cq_doorbells),
        (0, 0),
        "the controller's queues rang nothing"
    );

    // A command that hangs: the core asks for a reset, the request fails as on the
    // controller's own queues, and the queue serves again once re-created.
    f.borrow_mut().hold_io = true;
    be.submit(req(3, BlockOp::Read, 0, 1, Some(iobuf(&f, 512, 0)), 0))
        .unwrap();
    q.borrow_mut().poll(t);
    assert_eq!(f.borrow().held.len(), 1);
    t += 2_000;
    q.borrow_mut().poll(t); // timed out: asks for a reset
    assert_eq!(q.borrow().stats().timeouts, 1);
    d.poll(t);
    assert_eq!(d.state(), State::Resetting);
    f.borrow_mut().hold_io = false;
    let mut saw_down = false;
    let mut failed = None;
    while d.state() != State::Online {
        t += 10;
        d.poll(t);
        q.borrow_mut().poll(t);
        saw_down |= q.borrow().state() == crate::CoreQueueState::Down;
        be.poll(&mut |c| failed = Some(c));
        assert!(t < t0(&d) + 1_000_000, "recovery did not finish");
    }
    let failed = failed
        .or_else(|| pump(&mut be, t))
        .expect("the hung request");
    assert_eq!((failed.tag, failed.result), (3, Err(BlockError::Internal)));
    assert!(failed.buf.is_some());
    assert_eq!(
        created(&f),
        vec![1, 2, 3, 1, 2, 3],
        "re-created after the reset"
    );
    assert!(saw_down, "the queue was down while the controller reset");
    assert_eq!(q.borrow().stats().resets, 1);
    assert_eq!(q.borrow().stats().failed_by_reset, 1);
    let mut b = iobuf(&f, 512, 0);
    b.as_mut_slice().fill(9);
    q.borrow_mut().poll(t);
    be.submit(req(4, BlockOp::Write { fua: false }, 5, 1, Some(b), 0))
        .unwrap();
    assert_eq!(pump(&mut be, t).unwrap().result, Ok(()));
    assert_eq!(f.borrow().namespaces[0].data[5 * 512], 9);
}

/// A core queue of a controller given up on fails what it has and refuses new requests
/// with the internal error the controller's own queues give.
#[test]
fn a_core_queue_of_a_dead_controller_fails_requests() {
    use crate::CoreBackend;
    use std::cell::RefCell;
    use std::rc::Rc;
    let f = FakeCtrl::new(vec![ns(1, 9, 1 << 20)]);
    let cfg = Config {
        core_queues: 1,
        ..test_config()
    };
    let d = init_with(&f, cfg).expect("init");
    let q = d
        .with(|c| c.take_core_queue(0, FakeRegs(f.clone())))
        .flatten()
        .unwrap();
    let q = Rc::new(RefCell::new(q));
    let mut be = CoreBackend::new(q.clone(), 0).unwrap();
    let t = t0(&d);
    q.borrow_mut().poll(t);
    // CSTS.CFS, and the controller will not become idle: given up on.
    {
        let mut fc = f.borrow_mut();
        fc.stuck_rdy = true;
        fc.csts = keel_nvme::regs::Csts(fc.csts.0 | 2);
    }
    let mut t = t + 200_000_000;
    while d.state() != State::Dead {
        d.poll(t);
        t += 1_000_000_000;
        assert!(t < t0(&d) + 100_000_000_000, "not given up on");
    }
    q.borrow_mut().poll(t);
    let r = be
        .submit(req(1, BlockOp::Read, 0, 1, Some(iobuf(&f, 512, 0)), 0))
        .unwrap_err();
    assert_eq!(r.reason, RejectReason::Invalid(BlockError::Internal));
    assert_eq!(q.borrow().state(), crate::CoreQueueState::Dead);
}

/// A core queue whose slots are all taken refuses more as busy and counts each refusal.
#[test]
fn a_full_core_queue_counts_its_refusals() {
    use crate::CoreBackend;
    use std::cell::RefCell;
    use std::rc::Rc;
    let f = FakeCtrl::new(vec![ns(1, 9, 1 << 20)]);
    let cfg = Config {
        core_queues: 1,
        ..test_config()
    };
    let d = init_with(&f, cfg).expect("init");
    let q = d
        .with(|c| c.take_core_queue(0, FakeRegs(f.clone())))
        .flatten()
        .unwrap();
    let q = Rc::new(RefCell::new(q));
    let mut be = CoreBackend::new(q.clone(), 0).unwrap();
    let t = t0(&d);
    q.borrow_mut().poll(t);
    f.borrow_mut().hold_io = true;
    let mut accepted = 0u64;
    let mut refused = 0u64;
    for tag in 0..40u64 {
        match be.submit(req(tag, BlockOp::Read, tag, 1, Some(iobuf(&f, 512, 0)), 0)) {
            Ok(()) => accepted += 1,
            Err(r) => {
                assert_eq!(r.reason, RejectReason::Busy);
                refused += 1;
            }
        }
        q.borrow_mut().poll(t);
    }
    assert!(
        accepted > 0 && refused > 0,
        "{accepted} accepted, {refused} refused"
    );
    let s = q.borrow().stats();
    assert_eq!(s.queue_full, refused, "{s:?}");
    assert_eq!(s.commands, accepted, "{s:?}");
    assert_eq!(
        d.stats().queue_full,
        0,
        "the controller's own queues refused nothing"
    );
}

/// Issue 17: a host's Abort of a command on another core's queue. The core asks through
/// its link; the controller sends the drive Abort with that queue's SQID and the command's
/// CID; the drive aborts it and the request fails back on the core as Aborted. A second
/// request while one waits in the mailbox is not passed on; a request not on the drive is not
/// either.
#[test]
fn an_abort_on_a_core_queue_is_sent_by_the_controller() {
    use crate::{CoreBackend, CoreQueue};
    use std::cell::RefCell;
    use std::rc::Rc;
    let f = FakeCtrl::new(vec![ns(1, 9, 1 << 20)]);
    let cfg = Config {
        core_queues: 1,
        ..test_config()
    };
    let d = init_with(&f, cfg).expect("init");
    let q: CoreQueue<FakeRegs, FakeDma> = d
        .with(|c| c.take_core_queue(0, FakeRegs(f.clone())))
        .flatten()
        .expect("the core queue");
    let q = Rc::new(RefCell::new(q));
    let mut be = CoreBackend::new(q.clone(), 0).unwrap();
    let t = t0(&d);
    q.borrow_mut().poll(t);
    f.borrow_mut().hold_io = true;
    be.submit(req(7, BlockOp::Read, 0, 1, Some(iobuf(&f, 512, 0)), 0))
        .unwrap();
    be.submit(req(8, BlockOp::Read, 1, 1, Some(iobuf(&f, 512, 0)), 0))
        .unwrap();
    q.borrow_mut().poll(t + 10);
    assert_eq!(f.borrow().held.len(), 2);
    let aborts = |f: &Shared| {
        f.borrow()
            .admin_log
            .iter()
            .filter(|s| s.opcode == AdminOpcode::Abort as u8)
            .copied()
            .collect::<Vec<_>>()
    };
    assert!(!be.abort(99), "unknown tag");
    assert!(be.abort(7));
    assert!(!be.abort(8), "the mailbox holds one request");
    assert!(
        aborts(&f).is_empty(),
        "sent by the controller, not the core"
    );
    let held_cid = f.borrow().held[0].1.cid;
    d.poll(t + 20);
    let sent = aborts(&f);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].cdw[0] & 0xFFFF, 3, "the core's queue (SQID 3)");
    assert_eq!(sent[0].cdw[0] >> 16, u32::from(held_cid));
    let mut out = Vec::new();
    for _ in 0..10 {
        q.borrow_mut().poll(t + 30);
        be.poll(&mut |c| out.push(c));
    }
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].tag, out[0].result), (7, Err(BlockError::Aborted)));
    // The mailbox is free again: request 8 can be aborted now.
    assert!(be.abort(8));
    d.poll(t + 40);
    assert_eq!(aborts(&f).len(), 2);
    assert_eq!(d.stats().aborts, 2);
}
