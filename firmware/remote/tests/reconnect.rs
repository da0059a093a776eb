//! Association loss and reconnect: connections reset mid-workload, a target that crashes and
//! comes back, a stalled path, refused connects, keep alive, `ctrl_loss_tmo` and
//! `fast_io_fail_tmo` expiry, and paths that must give up at once.

mod common;
use common::*;
use keel_remote::{LossReason, PathState, VolumeState};
use keel_storage::{BlockBackend, BlockError, BlockOp, RejectReason};

const BLOCKS: u64 = 4096;

fn setup(seed: u64, cfg: ServerCfg) -> (Rig, Disk) {
    one_target(seed, cfg, 512, BLOCKS)
}

#[test]
fn connections_reset_mid_workload_lose_nothing() {
    let (mut rig, mut disk) = setup(11, ServerCfg::default());
    let mut w = Workload::new(11, 512, BLOCKS);
    let mut resets = 0;
    for i in 0..6000 {
        w.step(&mut rig);
        // Every 700 ms, reset one connection of the association (admin or I/O).
        if i % 700 == 350 && rig.net.reset_one(addr(1)) {
            resets += 1;
        }
    }
    w.drain(&mut rig, 5_000);
    w.verify(&mut disk);
    assert!(resets >= 7, "{resets} resets");
    assert_eq!(
        w.failed, 0,
        "every loss healed within ctrl_loss_tmo: no errors"
    );
    assert!(
        w.acked_writes > 500 && w.reads_checked > 300,
        "{} {}",
        w.acked_writes,
        w.reads_checked
    );
    let s = rig.vol.snapshot().unwrap();
    let p = &s.paths[0];
    assert_eq!(p.state, PathState::Live);
    assert_eq!(p.counters.losses, resets);
    assert_eq!(p.counters.connects, resets + 1);
    assert!(
        p.counters.aborted > 0,
        "commands were in flight at some resets"
    );
    assert!(s.counters.failovers >= p.counters.aborted);
    assert_eq!(p.last_loss, Some(LossReason::ConnectionClosed));
}

#[test]
fn target_restart_within_ctrl_loss_tmo() {
    let (mut rig, mut disk) = setup(12, ServerCfg::default());
    let mut w = Workload::new(12, 512, BLOCKS);
    for _ in 0..500 {
        w.step(&mut rig);
    }
    // The target dies with requests in flight and stays down 1.5 s (ctrl_loss_tmo is 3 s).
    assert!(!w.inflight.is_empty());
    rig.net.set_alive(0, false);
    for _ in 0..1500 {
        w.step(&mut rig);
    }
    assert_eq!(rig.vol.snapshot().unwrap().state, VolumeState::NoPath);
    assert!(!w.inflight.is_empty(), "requests wait for the target");
    rig.net.set_alive(0, true);
    for _ in 0..2000 {
        w.step(&mut rig);
    }
    w.drain(&mut rig, 5_000);
    w.verify(&mut disk);
    assert_eq!(w.failed, 0);
    let s = rig.vol.snapshot().unwrap();
    assert_eq!(s.state, VolumeState::Online);
    assert!(
        s.paths[0].counters.attempts > 5,
        "reconnected every reconnect_delay"
    );
    // A crash-and-restart (fresh controller core) mid-workload.
    for _ in 0..300 {
        w.step(&mut rig);
    }
    rig.net.restart(0);
    for _ in 0..1000 {
        w.step(&mut rig);
    }
    w.drain(&mut rig, 5_000);
    w.verify(&mut disk);
    assert_eq!(w.failed, 0);
}

#[test]
fn stalled_path_is_detected_by_keep_alive() {
    let (mut rig, mut disk) = setup(13, ServerCfg::default());
    let data = pattern(1, 0, 8, 512);
    assert_eq!(rig.write(1, 0, &data), Ok(()));
    // Idle for 10 s: Keep Alive (KATO 2 s) keeps the target's controller alive.
    rig.run_for(10_000);
    let s = rig.vol.snapshot().unwrap();
    assert_eq!(s.paths[0].counters.losses, 0, "{:?}", s.paths[0].last_loss);
    assert!(s.paths[0].counters.keep_alives >= 4);
    assert_eq!(rig.net.servers[0].target.controller_count(), 1);
    // Idle, the next timer is the next keep alive check (KATO/4: Keel reports traffic based
    // keep alive).
    let d = rig.vol.next_deadline().unwrap();
    assert!(d > rig.now && d <= rig.now + 500 * MS, "{d} {}", rig.now);
    // The path stalls (nothing passes, no reset is seen) with a request in flight.
    rig.net
        .faults
        .partition
        .push((addr(1), rig.now + 2_500 * MS));
    rig.submit(req(
        2,
        BlockOp::Write { fua: false },
        8,
        8,
        Some(buf_with(&pattern(2, 8, 8, 512))),
    ));
    assert!(rig.run_until(
        2_400,
        |r| r.vol.snapshot().unwrap().paths[0].counters.losses == 1
    ));
    let p = rig.vol.snapshot().unwrap().paths[0].clone();
    assert!(
        matches!(
            p.last_loss,
            Some(LossReason::KeepAliveTimeout) | Some(LossReason::IoTimeout)
        ),
        "{:?}",
        p.last_loss
    );
    assert!(rig.done.is_empty(), "the write waits for a path");
    // Once the stall ends the path reconnects and the write completes.
    assert!(rig.run_until(3_000, |r| r.done.iter().any(|c| c.tag == 2)));
    assert_eq!(rig.done[0].result, Ok(()));
    assert_eq!(disk.read(8, 8), pattern(2, 8, 8, 512));
}

#[test]
fn refused_connects_are_retried() {
    let disk = Disk::new(512, BLOCKS);
    let mut net = SimNet::new(14);
    net.add(Server::new(vec![addr(1)], &disk, ServerCfg::default()));
    net.faults.refuse.push((addr(1), 750 * MS));
    let mut rig = Rig::new(net, test_config(vec![addr(1)]));
    rig.connect();
    assert!(rig.now >= 750 * MS);
    let p = rig.vol.snapshot().unwrap().paths[0].clone();
    // Attempts at 0, 100, ..., 700 ms were refused; the one after 750 ms succeeded.
    assert!(p.counters.attempts >= 8, "{:?}", p.counters);
    assert_eq!(p.counters.connects, 1);
    assert_eq!(p.last_loss, Some(LossReason::ConnectFailed));
}

#[test]
fn ctrl_loss_tmo_fails_io_with_a_path_error_and_never_hangs() {
    let (mut rig, mut disk) = setup(15, ServerCfg::default());
    let mut w = Workload::new(15, 512, BLOCKS);
    for _ in 0..300 {
        w.step(&mut rig);
    }
    let lost_at = rig.now;
    rig.net.set_alive(0, false);
    // Keep submitting while the target is gone: everything completes, with path errors, by
    // ctrl_loss_tmo (3 s) after it started waiting (plus the io_timeout bound).
    for _ in 0..4_000 {
        w.step(&mut rig);
    }
    w.drain(&mut rig, 1);
    let s = rig.vol.snapshot().unwrap();
    assert_eq!(s.state, VolumeState::Failed);
    assert_eq!(s.paths[0].state, PathState::Failed);
    assert!(w.path_errors > 0, "requests in flight and queued failed");
    assert_eq!(w.failed, w.path_errors, "only path errors");
    assert!(w.refused > 0, "later submissions were refused at once");
    assert!(rig.now - lost_at <= 4_300 * MS);
    // New requests are refused at once with the path error.
    let r = rig
        .be
        .as_mut()
        .unwrap()
        .submit(req(999_999, BlockOp::Read, 0, 1, Some(buf(512))))
        .unwrap_err();
    assert_eq!(r.reason, RejectReason::Invalid(BlockError::PathError));
    // Nothing acknowledged was lost.
    w.verify(&mut disk);
    // The target returns; a management reconnect revives the path.
    rig.net.set_alive(0, true);
    rig.vol.reconnect(rig.now);
    rig.connect();
    let data = pattern(77, 5, 4, 512);
    assert_eq!(rig.write(1_000_000, 5, &data), Ok(()));
    assert_eq!(disk.read(5, 4), data);
}

#[test]
fn fast_io_fail_tmo_fails_waiting_io_while_reconnecting() {
    let disk = Disk::new(512, BLOCKS);
    let mut net = SimNet::new(16);
    net.add(Server::new(vec![addr(1)], &disk, ServerCfg::default()));
    let mut cfg = test_config(vec![addr(1)]);
    cfg.fast_io_fail_tmo_ms = Some(400);
    cfg.ctrl_loss_tmo_ms = None;
    let mut rig = Rig::new(net, cfg);
    rig.connect();
    rig.net.set_alive(0, false);
    rig.run_for(5);
    let t0 = rig.now;
    let (r, b) = rig.io(1, BlockOp::Read, 0, 1, Some(buf(512)), 1_000);
    assert_eq!(r, Err(BlockError::PathError));
    give(b.unwrap());
    let waited = rig.now - t0;
    assert!((400 * MS..=420 * MS).contains(&waited), "{waited}");
    // The path keeps trying (no ctrl_loss_tmo) and comes back.
    assert_eq!(
        rig.vol.snapshot().unwrap().paths[0].state,
        PathState::Reconnecting
    );
    rig.net.set_alive(0, true);
    rig.connect();
    assert_eq!(rig.read(2, 0, 1).unwrap(), vec![0; 512]);
}

#[test]
fn a_remote_that_refuses_us_is_given_up_at_once() {
    // Connect Invalid Host (DNR): the host is not allowed.
    let disk = Disk::new(512, BLOCKS);
    let mut net = SimNet::new(17);
    net.add(Server::new(vec![addr(1)], &disk, ServerCfg::default()));
    let mut cfg = test_config(vec![addr(1)]);
    cfg.subnqn = "nqn.2026-11.dev.keel:no-such-subsystem".into();
    let mut rig = Rig::new(net, cfg);
    rig.run_for(1_000);
    let s = rig.vol.snapshot().unwrap();
    assert_eq!(s.state, VolumeState::Failed);
    assert_eq!(s.paths[0].counters.attempts, 1);
    match s.paths[0].last_loss {
        Some(LossReason::SetupFailed { step, status }) => {
            assert_eq!(step, "Connect (admin queue)");
            assert!(status.dnr);
        }
        other => panic!("{other:?}"),
    }
    assert!(rig.vol.backend().is_none(), "nothing identified");
    // A namespace the subsystem does not have.
    let mut net = SimNet::new(18);
    net.add(Server::new(vec![addr(1)], &disk, ServerCfg::default()));
    let mut cfg = test_config(vec![addr(1)]);
    cfg.nsid = 9;
    let mut rig = Rig::new(net, cfg);
    rig.run_for(1_000);
    let s = rig.vol.snapshot().unwrap();
    assert_eq!(s.state, VolumeState::Failed);
    assert_eq!(s.paths[0].counters.attempts, 1);
    assert!(
        matches!(
            s.paths[0].last_loss,
            Some(LossReason::Namespace(_)) | Some(LossReason::SetupFailed { .. })
        ),
        "{:?}",
        s.paths[0].last_loss
    );
}

#[test]
fn shutdown_fails_everything_and_closes_the_sockets() {
    let disk = Disk::new(512, BLOCKS);
    let mut net = SimNet::new(19);
    net.add(Server::new(vec![addr(1)], &disk, ServerCfg::default()));
    let mut cfg = test_config(vec![addr(1)]);
    // 32 command slots, 48 requests: some wait in the volume's queue.
    cfg.max_requests = 48;
    let mut rig = Rig::new(net, cfg);
    rig.connect();
    rig.net.faults.partition.push((addr(1), u64::MAX));
    for i in 0..40u64 {
        rig.submit(req(i, BlockOp::Read, i, 1, Some(buf(512))));
    }
    rig.step();
    let s = rig.vol.snapshot().unwrap();
    assert_eq!((s.in_flight, s.queued), (32, 8));
    let now = rig.now;
    rig.vol.shutdown(now, &mut rig.net);
    rig.step();
    assert_eq!(
        rig.done.len(),
        40,
        "in flight and queued requests completed"
    );
    assert!(
        rig.done
            .iter()
            .all(|c| c.result == Err(BlockError::PathError) && c.buf.is_some())
    );
    assert!(
        rig.net.conns.iter().all(|c| c.client_closed),
        "every socket closed"
    );
    let s = rig.vol.snapshot().unwrap();
    assert_eq!(s.state, VolumeState::Failed);
    assert_eq!(s.paths[0].last_loss, Some(LossReason::Shutdown));
    rig.net.faults.partition.clear();
    rig.vol.reconnect(rig.now);
    rig.connect();
}
