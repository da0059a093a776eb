//! Lanes: another core's I/O queues over the owner's associations (crate docs, "Lanes").
//! The owner (the controller core's volume) and lane 1 share the in-memory network to a real
//! Keel target; updates and losses cross between them each step, as the firmware's rings
//! carry them.

mod common;
use common::*;
use keel_remote::{PathState, QueueState, VolumeState};
use keel_storage::{BlockBackend, BlockError, BlockOp};

const BLOCKS: u64 = 4096;

fn lane_rig(seed: u64, cfg: ServerCfg) -> (Rig, Disk) {
    let disk = Disk::new(512, BLOCKS);
    let mut net = SimNet::new(seed);
    net.add(Server::new(vec![addr(1)], &disk, cfg));
    (Rig::with_lane(net, test_config(vec![addr(1)])), disk)
}

/// Runs one request on the owner's backend (the controller core's own I/O).
fn owner_io(
    rig: &mut Rig,
    tag: u64,
    op: BlockOp,
    lba: u64,
    blocks: u32,
    b: Option<keel_storage::IoBuf>,
) -> (Result<(), BlockError>, Option<keel_storage::IoBuf>) {
    let o = rig.owner.as_mut().unwrap();
    o.be.as_mut()
        .unwrap()
        .submit(req(tag, op, lba, blocks, b))
        .expect("owner submit");
    assert!(
        rig.run_until(10_000, |r| r
            .owner
            .as_ref()
            .unwrap()
            .done
            .iter()
            .any(|c| c.tag == tag)),
        "owner request {tag} did not complete"
    );
    let o = rig.owner.as_mut().unwrap();
    let i = o.done.iter().position(|c| c.tag == tag).unwrap();
    let c = o.done.swap_remove(i);
    (c.result, c.buf)
}

#[test]
fn lane_serves_io_on_its_own_queue_of_the_owners_controller() {
    let (mut rig, mut disk) = lane_rig(41, ServerCfg::default());
    // Admin + the owner's 2 I/O queues + the lane's 1.
    assert_eq!(rig.net.servers[0].connections(), 4);
    let owner = rig.owner.as_ref().unwrap().vol.snapshot().unwrap();
    let lane = rig.vol.snapshot().unwrap();
    assert_eq!(owner.paths[0].io_queues, 2);
    assert_eq!(lane.paths[0].io_queues, 1);
    assert_eq!(
        lane.paths[0].cntlid, owner.paths[0].cntlid,
        "same controller"
    );
    assert_eq!(lane.state, VolumeState::Online);

    // Written through the lane, read back through the owner's own queues, and on the disk.
    let data = pattern(5, 100, 16, 512);
    rig.write(1, 100, &data).unwrap();
    assert_eq!(disk.read(100, 16), data);
    let (r, b) = owner_io(&mut rig, 2, BlockOp::Read, 100, 16, Some(buf(16 * 512)));
    r.unwrap();
    let b = b.unwrap();
    assert_eq!(&b.as_slice()[..16 * 512], &data[..]);
    give(b);
    // And the other way round.
    let data2 = pattern(6, 300, 8, 512);
    let (r, b) = owner_io(
        &mut rig,
        3,
        BlockOp::Write { fua: true },
        300,
        8,
        Some(buf_with(&data2)),
    );
    r.unwrap();
    give(b.unwrap());
    assert_eq!(rig.read(4, 300, 8).unwrap(), data2);

    let owner = rig.owner.as_ref().unwrap().vol.snapshot().unwrap();
    let lane = rig.vol.snapshot().unwrap();
    assert_eq!(
        lane.paths[0].counters.commands, 2,
        "the lane's own commands"
    );
    assert_eq!(
        owner.paths[0].counters.commands, 2,
        "the owner's own commands"
    );
    assert_eq!(rig.owner.as_ref().unwrap().losses, 0);
    // Per queue: the owner's QIDs 1 and 2, the lane's QID 3, each with its own commands.
    let queues = |v: &keel_remote::RemoteVolume<_>| {
        let mut out = Vec::new();
        v.for_each_queue(&mut |q| out.push((q.path, q.qid, q.state, q.commands, q.in_flight)));
        out
    };
    let owner_q = queues(&rig.owner.as_ref().unwrap().vol);
    assert_eq!(owner_q.len(), 2, "{owner_q:?}");
    assert_eq!((owner_q[0].1, owner_q[1].1), (1, 2));
    assert!(owner_q.iter().all(|q| q.2 == QueueState::Live && q.4 == 0));
    assert_eq!(owner_q.iter().map(|q| q.3).sum::<u64>(), 2, "{owner_q:?}");
    assert_eq!(
        queues(&rig.vol),
        vec![(0, 3, QueueState::Live, 2, 0)],
        "the lane's own queue"
    );
}

#[test]
fn lane_and_owner_queues_reset_mid_workload_lose_nothing() {
    resets_lose_nothing(42, false);
}

#[test]
fn resets_seen_first_by_the_lane_lose_nothing() {
    resets_lose_nothing(46, true);
}

/// Connections reset at random in the middle of a verifying workload on the lane; with
/// `lane_first` the lane sees each loss before the owner (it reports it, the owner ends the
/// association), else the owner does (the lane follows its update).
fn resets_lose_nothing(seed: u64, lane_first: bool) {
    let (mut rig, mut disk) = lane_rig(seed, ServerCfg::default());
    rig.lane_first = lane_first;
    let mut w = Workload::new(seed, 512, BLOCKS);
    let mut resets = 0;
    for i in 0..8000 {
        w.step(&mut rig);
        // Every 700 ms one connection of the association is reset: the admin queue, one
        // of the owner's I/O queues or the lane's.
        if i % 700 == 350 && rig.net.reset_one(addr(1)) {
            resets += 1;
        }
    }
    w.drain(&mut rig, 5_000);
    w.verify(&mut disk);
    assert!(resets >= 9, "{resets} resets");
    assert_eq!(w.failed, 0, "every loss healed within ctrl_loss_tmo");
    assert!(
        w.acked_writes > 500 && w.reads_checked > 300,
        "{} {}",
        w.acked_writes,
        w.reads_checked
    );
    let o = rig.owner.as_ref().unwrap();
    let owner = o.vol.snapshot().unwrap();
    let lane = rig.vol.snapshot().unwrap();
    if lane_first {
        assert!(o.losses > 0, "the lane reported losses");
    }
    assert_eq!(owner.paths[0].state, PathState::Live);
    assert_eq!(lane.paths[0].state, PathState::Live);
    assert_eq!(
        owner.paths[0].counters.losses, resets,
        "each reset ended the association once"
    );
    assert_eq!(lane.paths[0].counters.connects, resets + 1);
    assert!(
        lane.paths[0].counters.aborted > 0,
        "the lane had commands in flight"
    );
}

#[test]
fn lane_requests_wait_for_a_restarted_target() {
    let (mut rig, mut disk) = lane_rig(43, ServerCfg::default());
    let mut w = Workload::new(43, 512, BLOCKS);
    for _ in 0..500 {
        w.step(&mut rig);
    }
    assert!(!w.inflight.is_empty());
    rig.net.set_alive(0, false);
    for _ in 0..1500 {
        w.step(&mut rig);
    }
    assert_eq!(rig.vol.snapshot().unwrap().state, VolumeState::NoPath);
    assert!(!w.inflight.is_empty(), "the lane's requests wait");
    rig.net.set_alive(0, true);
    for _ in 0..2000 {
        w.step(&mut rig);
    }
    w.drain(&mut rig, 5_000);
    w.verify(&mut disk);
    assert_eq!(w.failed, 0);
    assert_eq!(rig.vol.snapshot().unwrap().state, VolumeState::Online);
}

#[test]
fn lane_requests_fail_with_a_path_error_when_the_owner_gives_up() {
    let (mut rig, mut disk) = lane_rig(44, ServerCfg::default());
    let mut w = Workload::new(44, 512, BLOCKS);
    for _ in 0..300 {
        w.step(&mut rig);
    }
    rig.net.set_alive(0, false);
    // ctrl_loss_tmo is 3 s.
    for _ in 0..5000 {
        w.step(&mut rig);
    }
    w.drain(&mut rig, 2_000);
    w.verify(&mut disk);
    assert!(w.path_errors > 0, "requests failed with a path error");
    assert_eq!(rig.vol.snapshot().unwrap().state, VolumeState::Failed);
    assert_eq!(
        rig.vol.snapshot().unwrap().paths[0].state,
        PathState::Failed
    );
    assert_eq!(
        rig.owner.as_ref().unwrap().vol.snapshot().unwrap().paths[0].state,
        PathState::Failed
    );
    let be = rig.be.as_mut().unwrap();
    let rej = be
        .submit(req(999_999, BlockOp::Read, 0, 1, Some(buf(512))))
        .unwrap_err();
    assert!(matches!(
        rej.reason,
        keel_storage::RejectReason::Invalid(BlockError::PathError)
    ));
}

#[test]
fn a_lane_without_a_granted_queue_fails_its_requests_after_the_wait_limit() {
    // One I/O queue per controller: the owner keeps it, the lane gets none.
    let cfg = ServerCfg {
        max_io_queues: 1,
        ..ServerCfg::default()
    };
    let disk = Disk::new(512, BLOCKS);
    let mut net = SimNet::new(45);
    net.add(Server::new(vec![addr(1)], &disk, cfg));
    let mut c = test_config(vec![addr(1)]);
    c.lanes = 1;
    let owner = keel_remote::RemoteVolume::new(c.clone()).unwrap();
    let mut now = 0;
    let seed = loop {
        now += MS;
        net.step(now);
        owner.poll(now, &mut net);
        if let Some(s) = owner.lane_seed() {
            break s;
        }
        assert!(now < 5_000 * MS);
    };
    let mut rig = Rig::new(net, c.clone());
    rig.vol = keel_remote::RemoteVolume::lane(c, 1, seed).unwrap();
    rig.now = now;
    rig.owner = Some(Owner {
        be: owner.backend(),
        vol: owner,
        done: Vec::new(),
        seen: u64::MAX,
        updates: 0,
        losses: 0,
    });
    rig.run_for(200);
    assert_eq!(
        rig.net.servers[0].connections(),
        2,
        "admin + the owner's queue"
    );
    assert!(rig.be.is_some(), "the lane serves the namespace");
    let (r, b) = rig.io(1, BlockOp::Read, 0, 1, Some(buf(512)), 5_000);
    assert_eq!(r, Err(BlockError::PathError));
    give(b.unwrap());
    // The owner's own I/O is unaffected.
    let (r, b) = owner_io(&mut rig, 2, BlockOp::Read, 0, 1, Some(buf(512)));
    r.unwrap();
    give(b.unwrap());
}

#[test]
fn a_lane_fails_over_and_back_with_its_owner_over_two_targets() {
    let disk = Disk::new(512, BLOCKS);
    let mut net = SimNet::new(47);
    net.add(Server::new(vec![addr(1)], &disk, ServerCfg::default()));
    net.add(Server::new(vec![addr(2)], &disk, ServerCfg::default()));
    let mut rig = Rig::with_lane(net, test_config(vec![addr(1), addr(2)]));
    let mut disk = disk;
    let commands = |rig: &Rig| {
        let s = rig.vol.snapshot().unwrap();
        (s.paths[0].counters.commands, s.paths[1].counters.commands)
    };
    let mut w = Workload::new(47, 512, BLOCKS);
    for _ in 0..500 {
        w.step(&mut rig);
    }
    let (a, b) = commands(&rig);
    assert!(a > 50 && b > 50, "the lane uses both paths: {a} {b}");
    // Path 1 dies and refuses connects for 1 s: the lane's I/O moves to path 2.
    rig.net.faults.refuse.push((addr(1), rig.now + 1_000 * MS));
    rig.net.reset(addr(1));
    rig.step();
    w.reap(&mut rig);
    let (a0, b0) = commands(&rig);
    for _ in 0..900 {
        w.step(&mut rig);
    }
    let s = rig.vol.snapshot().unwrap();
    assert_eq!(s.state, VolumeState::Degraded);
    let (a1, b1) = commands(&rig);
    assert_eq!(a1, a0, "nothing goes to the dead path");
    assert!(b1 - b0 > 100, "the lane's I/O continues on the other path");
    // Back: the owner reconnects, the lane follows (failback).
    for _ in 0..1500 {
        w.step(&mut rig);
    }
    let (a2, _) = commands(&rig);
    assert!(a2 > a1 + 50, "failback: {a1} -> {a2}");
    assert_eq!(rig.vol.snapshot().unwrap().state, VolumeState::Online);
    w.drain(&mut rig, 5_000);
    w.verify(&mut disk);
    assert_eq!(w.failed, 0);
}
