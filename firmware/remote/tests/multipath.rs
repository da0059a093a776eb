//! Several paths to one namespace: two ports of one target and two targets sharing a
//! namespace; round-robin and queue-depth policies; failover when a path dies and failback
//! when it returns; ANA states from the log, from change notices and from ANA statuses.

mod common;
use common::*;
use keel_nvme::log::ana::AnaState;
use keel_remote::{LossReason, PathState, Policy, VolumeState};
use keel_storage::BlockOp;

const BLOCKS: u64 = 4096;

/// Two targets sharing one namespace (`two_targets`), or one target with two ports.
fn setup(seed: u64, two_targets: bool, policy: Policy, cfg: ServerCfg) -> (Rig, Disk) {
    let disk = Disk::new(512, BLOCKS);
    let mut net = SimNet::new(seed);
    if two_targets {
        net.add(Server::new(vec![addr(1)], &disk, cfg));
        net.add(Server::new(vec![addr(2)], &disk, cfg));
    } else {
        net.add(Server::new(vec![addr(1), addr(2)], &disk, cfg));
    }
    let mut c = test_config(vec![addr(1), addr(2)]);
    c.policy = policy;
    let mut rig = Rig::new(net, c);
    rig.connect();
    (rig, disk)
}

fn commands(rig: &Rig) -> (u64, u64) {
    let s = rig.vol.snapshot().unwrap();
    (s.paths[0].counters.commands, s.paths[1].counters.commands)
}

fn failover_and_failback(two_targets: bool, policy: Policy, seed: u64) {
    let (mut rig, mut disk) = setup(seed, two_targets, policy, ServerCfg::default());
    let mut w = Workload::new(seed, 512, BLOCKS);
    for _ in 0..500 {
        w.step(&mut rig);
    }
    let (a, b) = commands(&rig);
    assert!(a > 50 && b > 50, "both paths carry I/O: {a} {b}");
    // Path 1 dies and stays unreachable (connects refused) for 1 s.
    rig.net.faults.refuse.push((addr(1), rig.now + 1_000 * MS));
    rig.net.reset(addr(1));
    // The volume notices at its next poll.
    rig.step();
    w.reap(&mut rig);
    let (a0, b0) = commands(&rig);
    for _ in 0..900 {
        w.step(&mut rig);
    }
    let s = rig.vol.snapshot().unwrap();
    assert_eq!(s.state, VolumeState::Degraded);
    assert_ne!(s.paths[0].state, PathState::Live);
    let (a1, b1) = commands(&rig);
    assert_eq!(a1, a0, "nothing goes to the dead path");
    assert!(b1 - b0 > 100, "I/O continues on the other path");
    // Path 1 returns: failback.
    for _ in 0..1000 {
        w.step(&mut rig);
    }
    let s = rig.vol.snapshot().unwrap();
    assert_eq!(s.state, VolumeState::Online);
    let (a2, _) = commands(&rig);
    assert!(a2 - a1 > 50, "path 1 carries I/O again");
    w.drain(&mut rig, 5_000);
    w.verify(&mut disk);
    assert_eq!(w.failed, 0, "failover hides the loss from the caller");
    assert!(w.acked_writes > 300);
}

#[test]
fn two_ports_of_one_target_round_robin() {
    failover_and_failback(false, Policy::RoundRobin, 21);
}

#[test]
fn two_targets_sharing_a_namespace_round_robin() {
    failover_and_failback(true, Policy::RoundRobin, 22);
}

#[test]
fn two_targets_queue_depth() {
    failover_and_failback(true, Policy::QueueDepth, 23);
}

#[test]
fn failover_happens_within_one_reconnect_delay() {
    let (mut rig, mut disk) = setup(24, true, Policy::RoundRobin, ServerCfg::default());
    // Requests in flight on path 1 when it is reset go to path 2 at once.
    rig.net.faults.partition.push((addr(1), u64::MAX));
    for i in 0..8u64 {
        rig.submit(req(
            i,
            BlockOp::Write { fua: false },
            i * 16,
            16,
            Some(buf_with(&pattern(i + 1, i * 16, 16, 512))),
        ));
    }
    rig.step();
    assert!(rig.done.len() < 8, "some are stuck on the partitioned path");
    rig.net.faults.partition.clear();
    rig.net.faults.refuse.push((addr(1), u64::MAX));
    rig.net.reset(addr(1));
    let t0 = rig.now;
    assert!(rig.run_until(100, |r| r.done.len() == 8), "all completed");
    assert!(
        rig.now - t0 < 100 * MS,
        "within one reconnect_delay (100 ms)"
    );
    assert!(rig.done.iter().all(|c| c.result == Ok(())));
    for i in 0..8u64 {
        assert_eq!(disk.read(i * 16, 16), pattern(i + 1, i * 16, 16, 512));
    }
    let s = rig.vol.snapshot().unwrap();
    assert!(s.counters.failovers >= 1);
    assert_eq!(s.paths[0].last_loss, Some(LossReason::ConnectionClosed));
}

#[test]
fn queue_depth_policy_avoids_a_stalled_path() {
    let (mut rig, _disk) = setup(25, true, Policy::QueueDepth, ServerCfg::default());
    let mut w = Workload::new(25, 512, BLOCKS);
    w.max_inflight = 8;
    for _ in 0..200 {
        w.step(&mut rig);
    }
    // Path 1 stalls: its commands stay in flight, so the queue-depth policy sends the new ones
    // to path 2 (round robin would keep feeding path 1 until its keep alive times out).
    rig.net
        .faults
        .partition
        .push((addr(1), rig.now + 1_000 * MS));
    let (a0, b0) = commands(&rig);
    for _ in 0..500 {
        w.step(&mut rig);
    }
    let (a1, b1) = commands(&rig);
    assert!(
        a1 - a0 <= 8,
        "at most a queue's worth went to the stalled path: {}",
        a1 - a0
    );
    assert!(b1 - b0 > 100);
    assert!(w.completed > 100, "I/O flows on path 2 during the stall");
    w.drain(&mut rig, 5_000);
    assert_eq!(w.failed, 0);
}

fn ana_setup(seed: u64) -> (Rig, Disk) {
    let cfg = ServerCfg {
        ana: true,
        ..ServerCfg::default()
    };
    setup(seed, true, Policy::RoundRobin, cfg)
}

fn ana_of(rig: &Rig) -> (Option<AnaState>, Option<AnaState>) {
    let s = rig.vol.snapshot().unwrap();
    (s.paths[0].ana, s.paths[1].ana)
}

#[test]
fn ana_states_steer_io() {
    let (mut rig, mut disk) = ana_setup(26);
    assert_eq!(
        ana_of(&rig),
        (Some(AnaState::Optimized), Some(AnaState::Optimized)),
        "read from the ANA log at association start"
    );
    // Path 2 becomes non-optimized (change notice): I/O prefers path 1.
    let now = rig.now;
    rig.net.servers[1].set_ana(addr(2), AnaState::NonOptimized, now);
    assert!(rig.run_until(100, |r| ana_of(r).1 == Some(AnaState::NonOptimized)));
    let mut w = Workload::new(26, 512, BLOCKS);
    let (a0, b0) = commands(&rig);
    for _ in 0..300 {
        w.step(&mut rig);
    }
    let (a1, b1) = commands(&rig);
    assert!(a1 - a0 > 100);
    assert_eq!(
        b1, b0,
        "non-optimized path unused while an optimized one is usable"
    );
    // Path 1 becomes inaccessible: the non-optimized path takes the I/O.
    let now = rig.now;
    rig.net.servers[0].set_ana(addr(1), AnaState::Inaccessible, now);
    for _ in 0..300 {
        w.step(&mut rig);
    }
    assert_eq!(ana_of(&rig).0, Some(AnaState::Inaccessible));
    let (a2, b2) = commands(&rig);
    assert!(b2 - b1 > 100, "failover to the non-optimized path");
    assert!(
        a2 - a1 <= 24,
        "only commands sent before the notice went to path 1"
    );
    // Path 1 optimized again: failback.
    let now = rig.now;
    rig.net.servers[0].set_ana(addr(1), AnaState::Optimized, now);
    for _ in 0..300 {
        w.step(&mut rig);
    }
    let (a3, b3) = commands(&rig);
    assert!(a3 - a2 > 100);
    assert!(b3 - b2 <= 24);
    w.drain(&mut rig, 5_000);
    w.verify(&mut disk);
    assert_eq!(w.failed, 0);
    let s = rig.vol.snapshot().unwrap();
    assert!(s.paths[0].counters.async_events >= 2 && s.paths[0].counters.ana_reads >= 3);
    assert_eq!(s.paths[0].counters.losses, 0, "ANA changes are not losses");
    assert!(rig.net.servers[0].aers_fired >= 2);
}

#[test]
fn ana_status_on_a_command_moves_io_and_rereads_the_log() {
    let (mut rig, mut disk) = ana_setup(27);
    // Both targets' paths go inaccessible for path 1 without a notice reaching the host
    // (the notice is lost): the host learns it from the ANA status of its next command.
    rig.net.servers[0].ana[0].1 = AnaState::Inaccessible;
    let mut w = Workload::new(27, 512, BLOCKS);
    for _ in 0..300 {
        w.step(&mut rig);
    }
    assert_eq!(ana_of(&rig).0, Some(AnaState::Inaccessible));
    let s = rig.vol.snapshot().unwrap();
    assert!(
        s.counters.failovers >= 1,
        "the failed command went to path 2"
    );
    assert!(s.paths[0].counters.errors >= 1);
    assert!(
        s.paths[0].counters.ana_reads >= 2,
        "log re-read after the status"
    );
    w.drain(&mut rig, 5_000);
    w.verify(&mut disk);
    assert_eq!(w.failed, 0, "ANA statuses are not errors for the caller");
}

#[test]
fn ana_change_longer_than_anatt_resets_the_association() {
    let (mut rig, _disk) = ana_setup(28);
    let now = rig.now;
    rig.net.servers[0].set_ana(addr(1), AnaState::Change, now);
    assert!(rig.run_until(100, |r| ana_of(r).0 == Some(AnaState::Change)));
    // ANATT is 2 s.
    assert!(rig.run_until(
        2_200,
        |r| r.vol.snapshot().unwrap().paths[0].counters.losses == 1
    ));
    assert_eq!(
        rig.vol.snapshot().unwrap().paths[0].last_loss,
        Some(LossReason::AnaTransitionTimeout)
    );
    // The transition ends; the next association reads the new state.
    let now = rig.now;
    rig.net.servers[0].set_ana(addr(1), AnaState::Optimized, now);
    assert!(rig.run_until(500, |r| r.vol.snapshot().unwrap().state
        == VolumeState::Online));
}

#[test]
fn all_paths_inaccessible_then_back() {
    let (mut rig, mut disk) = ana_setup(29);
    for (i, a) in [addr(1), addr(2)].into_iter().enumerate() {
        let now = rig.now;
        rig.net.servers[i].set_ana(a, AnaState::Inaccessible, now);
    }
    rig.run_for(50);
    assert_eq!(rig.vol.snapshot().unwrap().state, VolumeState::NoPath);
    rig.submit(req(
        1,
        BlockOp::Write { fua: false },
        0,
        4,
        Some(buf_with(&pattern(5, 0, 4, 512))),
    ));
    rig.run_for(1_000);
    assert!(rig.done.is_empty(), "waits for an accessible path");
    let now = rig.now;
    rig.net.servers[1].set_ana(addr(2), AnaState::NonOptimized, now);
    assert!(rig.run_until(100, |r| !r.done.is_empty()));
    assert_eq!(rig.done[0].result, Ok(()));
    assert_eq!(disk.read(0, 4), pattern(5, 0, 4, 512));
    // Inaccessible everywhere until ctrl_loss_tmo (3 s): the request fails with a path
    // error although every association stays up.
    let now = rig.now;
    rig.net.servers[1].set_ana(addr(2), AnaState::PersistentLoss, now);
    rig.run_for(50);
    rig.done.clear();
    rig.submit(req(2, BlockOp::Read, 0, 4, Some(buf(2048))));
    let t0 = rig.now;
    assert!(rig.run_until(3_100, |r| !r.done.is_empty()));
    assert!(rig.now - t0 >= 3_000 * MS);
    assert_eq!(rig.done[0].result, Err(keel_storage::BlockError::PathError));
    let s = rig.vol.snapshot().unwrap();
    assert!(s.paths.iter().all(|p| p.state == PathState::Live));
}
