//! Data through a remote volume lands in a real Keel target's namespace: reads, writes, FUA,
//! flush, write zeroes, deallocate, compare; MDTS splitting; in-capsule and R2T writes;
//! digests; random segmentation; many requests at once; requests the volume must refuse.

mod common;
use common::*;
use keel_nvmf_tcp::Digests;
use keel_remote::{PathState, VolumeState};
use keel_storage::{BlockBackend, BlockError, BlockOp, BlockRequest, RejectReason};

fn rig(cfg: ServerCfg, seed: u64) -> (Rig, Disk) {
    one_target(seed, cfg, 512, 8192)
}

#[test]
fn data_written_lands_on_the_target() {
    let (mut rig, mut disk) = rig(ServerCfg::default(), 1);
    let g = rig.be.as_ref().unwrap().geometry();
    assert_eq!((g.block_size, g.blocks), (512, 8192));
    let data = pattern(1, 100, 16, 512);
    assert_eq!(rig.write(1, 100, &data), Ok(()));
    assert_eq!(
        disk.read(100, 16),
        data,
        "the target's medium holds the data"
    );
    // Data written on the target's side reads back through the volume.
    let other = pattern(2, 7, 3, 512);
    disk.write(7, &other);
    assert_eq!(rig.read(2, 7, 3).unwrap(), other);
    let s = rig.vol.snapshot().unwrap();
    assert_eq!(s.state, VolumeState::Online);
    assert_eq!(s.paths[0].state, PathState::Live);
    assert_ne!(s.paths[0].cntlid, 0);
    assert_eq!((s.paths[0].io_queues, s.paths[0].queue_depth), (2, 16));
    assert_eq!((s.counters.submitted, s.counters.completed), (2, 2));
    assert_eq!(s.paths[0].counters.commands, 2);
    // 8 KiB of write data fits in the capsule (IOCCSZ 516): no R2T.
    assert_eq!(rig.net.t2h(pdu::R2T), 0);
    assert!(
        rig.net.capsules_with_data() >= 4,
        "3 Connects and the write"
    );
}

#[test]
fn every_operation_is_forwarded() {
    let (mut rig, mut disk) = rig(ServerCfg::default(), 2);
    let caps = rig.be.as_ref().unwrap().capabilities();
    assert!(caps.flush && caps.fua && caps.write_zeroes && caps.deallocate && caps.compare);
    assert!(caps.deallocate_reads_zero, "Keel reports DLFEAT 001b");
    let data = pattern(3, 0, 32, 512);
    let (r, b) = rig.io(
        1,
        BlockOp::Write { fua: true },
        0,
        32,
        Some(buf_with(&data)),
        1000,
    );
    assert_eq!(r, Ok(()));
    give(b.unwrap());
    assert_eq!(disk.read(0, 32), data);
    assert_eq!(rig.io(2, BlockOp::Flush, 0, 0, None, 1000).0, Ok(()));
    // Compare: equal, then different.
    let (r, b) = rig.io(3, BlockOp::Compare, 0, 32, Some(buf_with(&data)), 1000);
    assert_eq!(r, Ok(()));
    give(b.unwrap());
    let mut wrong = data.clone();
    wrong[5000] ^= 1;
    let (r, b) = rig.io(4, BlockOp::Compare, 0, 32, Some(buf_with(&wrong)), 1000);
    assert_eq!(r, Err(BlockError::CompareMismatch));
    give(b.unwrap());
    // Write Zeroes (with and without deallocate) and Deallocate.
    let zop = BlockOp::WriteZeroes {
        deallocate: false,
        fua: true,
    };
    assert_eq!(rig.io(5, zop, 2, 3, None, 1000).0, Ok(()));
    let zop = BlockOp::WriteZeroes {
        deallocate: true,
        fua: false,
    };
    assert_eq!(rig.io(6, zop, 10, 4, None, 1000).0, Ok(()));
    assert_eq!(rig.io(7, BlockOp::Deallocate, 20, 5, None, 1000).0, Ok(()));
    let after = disk.read(0, 32);
    for (blk, chunk) in after.chunks(512).enumerate() {
        let zeroed = (2..5).contains(&blk) || (10..14).contains(&blk) || (20..25).contains(&blk);
        if zeroed {
            assert!(chunk.iter().all(|&x| x == 0), "block {blk} zeroed");
        } else {
            assert_eq!(chunk, &data[blk * 512..(blk + 1) * 512], "block {blk} kept");
        }
    }
    // A write at an offset inside a larger buffer.
    let mut big = buf(4096);
    big.as_mut_slice().fill(0xAB);
    big.as_mut_slice()[1024..2048].copy_from_slice(&pattern(9, 0, 2, 512));
    rig.submit(BlockRequest {
        buf_offset: 1024,
        ..req(8, BlockOp::Write { fua: false }, 40, 2, Some(big))
    });
    assert!(rig.run_until(1000, |r| r.done.iter().any(|c| c.tag == 8)));
    assert_eq!(disk.read(40, 2), pattern(9, 0, 2, 512));
}

#[test]
fn requests_the_volume_refuses() {
    let (mut rig, _disk) = rig(ServerCfg::default(), 3);
    let be = rig.be.as_mut().unwrap();
    let cases: [(u64, u32, usize, keel_storage::BlockError); 3] = [
        (8190, 4, 2048, BlockError::OutOfRange),
        (0, 0, 512, BlockError::OutOfRange),
        (0, 4, 1000, BlockError::BufferTooSmall),
    ];
    for (lba, blocks, len, e) in cases {
        let r = be
            .submit(req(
                1,
                BlockOp::Read,
                lba,
                blocks,
                Some(keel_storage::IoBuf::leak_zeroed(len)),
            ))
            .unwrap_err();
        assert_eq!(r.reason, RejectReason::Invalid(e));
        assert!(r.req.buf.is_some(), "the buffer comes back");
    }
    // Nothing reached the target.
    assert_eq!(rig.net.servers[0].io_commands, 0);
}

#[test]
fn requests_above_mdts_are_split() {
    // MDTS 1 = 8 KiB (4 KiB pages) = 16 blocks: a 64 KiB request is 8 commands.
    let cfg = ServerCfg {
        mdts: 1,
        ..ServerCfg::default()
    };
    let (mut rig, mut disk) = rig(cfg, 4);
    let data = pattern(4, 1000, 128, 512);
    assert_eq!(rig.write(1, 1000, &data), Ok(()));
    assert_eq!(rig.net.servers[0].io_commands, 8);
    assert_eq!(disk.read(1000, 128), data);
    assert_eq!(rig.read(2, 1000, 128).unwrap(), data);
    assert_eq!(rig.net.servers[0].io_commands, 16);
    let s = rig.vol.snapshot().unwrap();
    assert_eq!(s.counters.split, 2);
    assert_eq!(s.paths[0].counters.commands, 16);
    // An odd size: 17 blocks = 16 + 1.
    let data = pattern(5, 3, 17, 512);
    assert_eq!(rig.write(3, 3, &data), Ok(()));
    assert_eq!(rig.net.servers[0].io_commands, 18);
    assert_eq!(disk.read(3, 17), data);
    // A part that fails ends the request with that error: compare 64 blocks whose third
    // part differs; the fourth part is not sent.
    let mut cmp = disk.read(0, 64);
    cmp[2 * 8192 + 7] ^= 0xFF;
    let before = rig.net.servers[0].io_commands;
    let (r, b) = rig.io(4, BlockOp::Compare, 0, 64, Some(buf_with(&cmp)), 1000);
    assert_eq!(r, Err(BlockError::CompareMismatch));
    give(b.unwrap());
    assert_eq!(rig.net.servers[0].io_commands - before, 3);
}

#[test]
fn writes_above_ioccsz_go_through_r2t() {
    // The controller advertises no in-capsule data (IOCCSZ 4) and the transport takes at
    // most 4 KiB per H2CData PDU.
    let cfg = ServerCfg {
        in_capsule: 0,
        maxh2cdata: 4096,
        ..ServerCfg::default()
    };
    let (mut rig, mut disk) = rig(cfg, 5);
    let data = pattern(6, 64, 64, 512);
    assert_eq!(rig.write(1, 64, &data), Ok(()));
    assert_eq!(disk.read(64, 64), data);
    assert!(rig.net.t2h(pdu::R2T) >= 1, "the target solicited the data");
    assert_eq!(
        rig.net.h2t(pdu::H2C_DATA),
        8,
        "32 KiB in 4 KiB H2CData PDUs"
    );
    // Only the Connect capsules carried data.
    assert_eq!(rig.net.capsules_with_data(), 3);
    let small = pattern(7, 0, 1, 512);
    assert_eq!(rig.write(2, 0, &small), Ok(()));
    assert_eq!(
        rig.net.capsules_with_data(),
        3,
        "even 512 bytes went through R2T"
    );
    assert_eq!(disk.read(0, 1), small);
}

#[test]
fn digests_and_tiny_segments() {
    let disk = Disk::new(4096, 1024);
    let mut net = SimNet::new(6);
    net.faults.segment = 7;
    net.add(Server::new(vec![addr(1)], &disk, ServerCfg::default()));
    let mut cfg = test_config(vec![addr(1)]);
    cfg.digests = Digests {
        header: true,
        data: true,
    };
    let mut rig = Rig::new(net, cfg);
    rig.tick = MS / 10;
    rig.connect();
    let mut disk = disk;
    let data = pattern(8, 5, 20, 4096);
    assert_eq!(rig.write(1, 5, &data), Ok(()));
    assert_eq!(disk.read(5, 20), data);
    assert_eq!(rig.read(2, 5, 20).unwrap(), data);
    assert!(rig.net.t2h(pdu::C2H_DATA) >= 1);
}

#[test]
fn more_requests_than_queue_slots() {
    let (mut rig, mut disk) = rig(ServerCfg::default(), 7);
    // 2 queues × 16 slots; 100 writes of 8 blocks each are accepted (the volume holds 32
    // requests: the rest are refused Busy and resubmitted).
    let mut pending: Vec<u64> = (0..100).collect();
    let mut submitted = 0;
    while !pending.is_empty() || rig.done.len() < 100 {
        while let Some(&i) = pending.first() {
            let r = rig.be.as_mut().unwrap().submit(req(
                i,
                BlockOp::Write { fua: false },
                i * 8,
                8,
                Some(buf_with(&pattern(i, i * 8, 8, 512))),
            ));
            match r {
                Ok(()) => {
                    pending.remove(0);
                    submitted += 1;
                }
                Err(rej) => {
                    assert_eq!(rej.reason, RejectReason::Busy);
                    give(rej.req.buf.unwrap());
                    break;
                }
            }
        }
        rig.step();
        assert!(rig.now < 10_000 * MS, "stuck");
    }
    assert_eq!(submitted, 100);
    assert!(rig.done.iter().all(|c| c.result == Ok(())));
    let mut tags: Vec<u64> = rig.done.iter().map(|c| c.tag).collect();
    tags.sort();
    assert_eq!(tags, (0..100).collect::<Vec<_>>(), "each exactly once");
    for i in 0..100 {
        assert_eq!(disk.read(i * 8, 8), pattern(i, i * 8, 8, 512));
    }
}
