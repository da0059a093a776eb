//! Controllers split across cores: an I/O queue connected on one target (the holder) and
//! served by a replica on another built from the same configuration.

use crate::tests::{H, SUB, plain};
use crate::*;
use keel_nvme::Status;

/// The holder's admin queue and an I/O queue connected there; the replica's queue adopted.
fn split() -> (H, H, QueueId, QueueId, Adoption) {
    let mut holder = H::new();
    let (admin, cntlid) = holder.admin(SUB, crate::tests::HOST, 0);
    let io0 = holder.io_queue(2, cntlid);
    let a = holder.t.adoption(io0).expect("a connected I/O queue");
    assert_eq!(
        (a.subnqn.as_str(), a.cntlid, a.qid, a.sqsize),
        (SUB, cntlid, 2, 127)
    );
    assert_eq!(
        holder.t.adoption(admin),
        None,
        "an admin queue is never adopted"
    );
    let mut replica = H::new();
    let q = replica.t.open_queue().unwrap();
    replica.t.adopt_io_queue(replica.now, q, &a).unwrap();
    (holder, replica, admin, q, a)
}

#[test]
fn adopted_queue_serves_io_like_the_connected_one() {
    let (_holder, mut r, _admin, q, a) = split();
    let info = r.t.queue_info(q).unwrap();
    assert_eq!((info.qid, info.cntlid, info.sqsize), (2, a.cntlid, 127));
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    let w = r.write(q, 9, 1, 4, &data);
    // The Connect (answered by the holder) took SQ slot 1.
    assert_eq!(
        (plain(w.cqe.status), w.cqe.sqid, w.cqe.sqhd),
        (Status::SUCCESS, 2, 2)
    );
    let rd = r.read(q, 10, 1, 4, 2);
    assert_eq!(plain(rd.cqe.status), Status::SUCCESS);
    assert_eq!(&rd.buf.unwrap().as_slice()[..1024], &data[..]);
    // An admin command cannot reach an I/O queue.
    let id = r.identify(q, 1, 0);
    assert_ne!(plain(id.cqe.status), Status::SUCCESS);
}

#[test]
fn replica_refuses_what_it_cannot_serve() {
    let (_holder, mut r, _admin, q, a) = split();
    // The same QID twice.
    let q2 = r.t.open_queue().unwrap();
    assert_eq!(
        r.t.adopt_io_queue(r.now, q2, &a),
        Err(TargetError::UnknownQueue)
    );
    // A queue already connected, an unknown subsystem, the discovery subsystem, bad sizes.
    let other = Adoption {
        qid: 3,
        ..a.clone()
    };
    assert!(r.t.adopt_io_queue(r.now, q, &other).is_err());
    let bad = [
        Adoption {
            subnqn: "nqn.2024-01.io.keel:none".into(),
            ..other.clone()
        },
        Adoption {
            subnqn: keel_nvme::DISCOVERY_NQN.into(),
            ..other.clone()
        },
        Adoption {
            sqsize: 0,
            ..other.clone()
        },
        Adoption {
            qid: 0,
            ..other.clone()
        },
        Adoption {
            qid: 1000,
            ..other.clone()
        },
    ];
    for b in bad {
        assert!(r.t.adopt_io_queue(r.now, q2, &b).is_err(), "{b:?}");
    }
    // The failed attempts left the queue adoptable.
    r.t.adopt_io_queue(r.now, q2, &other).unwrap();
    assert_eq!(r.t.controller_count(), 1);
}

#[test]
fn replica_goes_with_its_last_queue_and_abrupt_loss_ends_only_the_queue() {
    let (_holder, mut r, _admin, q, a) = split();
    let q2 = r.t.open_queue().unwrap();
    r.t.adopt_io_queue(
        r.now,
        q2,
        &Adoption {
            qid: 3,
            ..a.clone()
        },
    )
    .unwrap();
    assert_eq!(r.t.controller_count(), 1);
    r.t.close_queue_after(q, QueueLoss::Abrupt).unwrap();
    r.poll();
    assert!(r.terminated().is_empty(), "the other queue stays");
    assert_eq!(r.t.controller_count(), 1);
    let w = r.write(q2, 1, 1, 0, &[5u8; 512]);
    assert_eq!(plain(w.cqe.status), Status::SUCCESS);
    r.t.close_queue_after(q2, QueueLoss::Orderly).unwrap();
    assert_eq!(r.t.controller_count(), 0);
    // Adopting again makes a new replica.
    let q3 = r.t.open_queue().unwrap();
    r.t.adopt_io_queue(r.now, q3, &a).unwrap();
    assert_eq!(r.t.controller_count(), 1);
}

#[test]
fn holder_counts_traffic_elsewhere_for_keep_alive() {
    let mut h = H::new();
    let (_admin, cntlid) = h.admin(SUB, crate::tests::HOST, 2_000);
    let kato_end = h.t.limits().kato_grace_ms as u64 + 2_000;
    // Traffic seen by another core keeps the controller alive past KATO...
    for _ in 0..4 {
        h.now = Instant::from_millis(h.now.as_millis() + kato_end / 2);
        h.t.touch_controller(cntlid, h.now);
        h.poll();
    }
    assert_eq!(h.t.controller_count(), 1);
    // ...and without it the controller expires.
    h.now = Instant::from_millis(h.now.as_millis() + kato_end + 1);
    h.poll();
    assert_eq!(h.t.controller_count(), 0);
}

#[test]
fn namespace_generation_moves_on_changes() {
    let mut h = H::new();
    let g = h.t.namespace_generation();
    h.t.add_namespace(SUB, crate::tests::ns(9, 4)).unwrap();
    assert_ne!(h.t.namespace_generation(), g);
    let g = h.t.namespace_generation();
    h.t.remove_namespace(SUB, 9).unwrap();
    assert_ne!(h.t.namespace_generation(), g);
}

/// The holder's log has every queue's errors: an error a replica logs is taken from it
/// (once, oldest first) and recorded in the holder's Error Information log with the
/// holder's own Error Count; an entry for a controller that is gone, or whose CNTLID now
/// belongs to another subsystem, is dropped.
#[test]
fn errors_on_a_replica_reach_the_holder_s_error_log() {
    use keel_nvme::log::ErrorLogEntry;
    let (mut h, mut r, admin, q, a) = split();
    assert_eq!(r.t.take_replica_errors(&mut |_| panic!("nothing yet")), 0);
    let rd = r.read(q, 10, 1, 1 << 40, 1);
    assert_eq!(plain(rd.cqe.status), Status::LBA_OUT_OF_RANGE);
    assert!(
        rd.cqe.status.more,
        "the More bit: the holder's log has details"
    );
    let rd = r.read(q, 11, 7, 0, 1);
    assert_eq!(plain(rd.cqe.status), Status::INVALID_NAMESPACE_OR_FORMAT);
    let mut taken = Vec::new();
    assert_eq!(r.t.take_replica_errors(&mut |e| taken.push(e)), 2);
    assert_eq!(r.t.take_replica_errors(&mut |_| panic!("taken once")), 0);
    assert_eq!(
        taken
            .iter()
            .map(|e| (e.cntlid, e.entry.cid, e.entry.sqid))
            .collect::<Vec<_>>(),
        [(a.cntlid, 10, 2), (a.cntlid, 11, 2)],
        "oldest first"
    );
    assert_eq!(taken[0].entry.lba, 1 << 40);
    for e in &taken {
        assert!(h.t.log_replica_error(e));
    }
    let log = h.log(admin, 0x01, 0, 128);
    assert_eq!(plain(log.cqe.status), Status::SUCCESS);
    let b = log.buf.unwrap();
    let entries: Vec<ErrorLogEntry> = b.as_slice()[..128]
        .chunks_exact(64)
        .map(|c| ErrorLogEntry::decode(c.try_into().unwrap()))
        .collect();
    // Newest first, with the holder's Error Counts.
    assert_eq!(
        entries
            .iter()
            .map(|e| (e.error_count, e.sqid, e.cid, e.nsid))
            .collect::<Vec<_>>(),
        [(2, 2, 11, 7), (1, 2, 10, 1)]
    );
    assert_eq!(entries[1].lba, 1 << 40);
    assert_eq!(
        entries[1].status,
        Status::LBA_OUT_OF_RANGE.to_field(false),
        "{entries:?}"
    );
    // Another subsystem's controller with that CNTLID, or none: dropped.
    let other = ReplicaError {
        subsystem: crate::replica::subsystem_key("nqn.2024-01.io.keel:other"),
        ..taken[0]
    };
    assert!(!h.t.log_replica_error(&other));
    let gone = ReplicaError {
        cntlid: a.cntlid + 100,
        ..taken[0]
    };
    assert!(!h.t.log_replica_error(&gone));
}

/// Issue 17: a controller split across cores counts, on each core, the part of its flows
/// its queues there carry (its queues here out of its Number of Queues), so that one host's
/// connections get the same share of a capped drive domain whichever core they landed on.
#[test]
fn a_split_controller_counts_its_queues_part_of_the_demand() {
    let cfg = || {
        let mut cfg = crate::tests::config(64);
        cfg.subsystems[0].namespaces[0].qos = NamespaceQos {
            domain: Some(7),
            max_inflight: 8,
            weight: 2,
            ..Default::default()
        };
        cfg
    };
    let mut holder = H::with(cfg());
    let (_admin, cntlid) = holder.admin(SUB, crate::tests::HOST, 0);
    let io1 = holder.io_queue(1, cntlid);
    let io2 = holder.io_queue(2, cntlid);
    let read = |cid| {
        keel_nvme::io::RwCommand::simple(0, 1).to_sqe(keel_nvme::IoOpcode::Read as u8, cid, 1)
    };
    let demand = |h: &H| h.t.capped_domains().next().unwrap().load.demand;
    holder.send(io1, read(1), Some(IoBuf::leak_zeroed(512)), 512);
    assert_eq!(
        demand(&holder),
        2 * DEMAND_UNIT,
        "all its queues here: its weight"
    );
    // Queue 2 goes to another core.
    let a = holder.t.adoption(io2).unwrap();
    holder.t.served_elsewhere(io2, true);
    let nq = u32::from(a.nr_io_queues);
    assert!(nq >= 2, "{a:?}");
    assert_eq!(demand(&holder), 2 * DEMAND_UNIT / nq);
    let mut replica = H::with(cfg());
    let q = replica.t.open_queue().unwrap();
    replica.t.adopt_io_queue(replica.now, q, &a).unwrap();
    assert_eq!(demand(&replica), 0, "idle");
    replica.send(q, read(2), Some(IoBuf::leak_zeroed(512)), 512);
    assert_eq!(
        demand(&replica),
        2 * DEMAND_UNIT / nq,
        "one queue each: the same part"
    );
    // Idle again once the commands completed.
    holder.poll();
    replica.poll();
    assert_eq!((demand(&holder), demand(&replica)), (0, 0));
}

/// A holder whose host rule gives every controller 2000 IOPS (burst 20), with one
/// controller and its I/O queue: (holder, CNTLID, the I/O queue, the limits).
fn host_limited_holder() -> (H, u16, QueueId, QosLimits) {
    let limits = QosLimits {
        iops: Some(keel_qos::Rate::new(2000).with_burst(20)),
        ..QosLimits::NONE
    };
    let mut holder = H::new();
    holder.t.set_host_qos(vec![HostQos {
        hostnqn: "*".into(),
        limits,
    }]);
    let (_admin, cntlid) = holder.admin(SUB, crate::tests::HOST, 0);
    let io0 = holder.io_queue(2, cntlid);
    (holder, cntlid, io0, limits)
}

#[test]
fn a_replica_of_a_limited_host_s_controller_has_its_limits_and_splits_them_under_one_key() {
    let (mut holder, cntlid, io0, limits) = host_limited_holder();
    assert_eq!(
        holder.t.shared_limits().count(),
        0,
        "a controller whose queues are all served here is not split"
    );
    let a = holder.t.adoption(io0).unwrap();
    assert_eq!(a.limits, limits, "the adoption carries the host's limits");
    // The replica's target has no host rules (as another core's): the limits come with the
    // adoption.
    let mut replica = H::new();
    let q = replica.t.open_queue().unwrap();
    replica.t.adopt_io_queue(replica.now, q, &a).unwrap();
    holder.t.served_elsewhere(io0, true);
    let key = controller_key(SUB, cntlid);
    assert_ne!(key, limit_key(SUB, 1));
    let on0: Vec<_> = holder.t.shared_limits().collect();
    let on1: Vec<_> = replica.t.shared_limits().collect();
    assert_eq!(on0.iter().map(|l| l.key).collect::<Vec<_>>(), [key]);
    assert_eq!(on1.iter().map(|l| l.key).collect::<Vec<_>>(), [key]);
    assert_eq!(holder.t.limits_in_force(on0[0].limiter), limits);
    assert_eq!(replica.t.limits_in_force(on1[0].limiter), limits);
    // Each takes its part by demand: busy alone on the replica, it gets nearly all.
    replica.t.set_limit_split(on1[0].limiter, 0, &[8, 0]);
    holder.t.set_limit_split(on0[0].limiter, 0, &[0, 8]);
    let r = replica.t.limits_in_force(on1[0].limiter).iops.unwrap();
    let h = holder.t.limits_in_force(on0[0].limiter).iops.unwrap();
    assert!(
        r.per_sec + h.per_sec <= 2001 && r.per_sec > h.per_sec,
        "{r:?} {h:?}"
    );
    // A later adoption carries a live change of the host's rule to the replica.
    let lower = QosLimits {
        iops: Some(keel_qos::Rate::new(500).with_burst(5)),
        ..QosLimits::NONE
    };
    holder.t.set_host_qos(vec![HostQos {
        hostnqn: "*".into(),
        limits: lower,
    }]);
    let io1 = holder.io_queue(3, cntlid);
    let b = holder.t.adoption(io1).unwrap();
    assert_eq!(b.limits, lower);
    let q2 = replica.t.open_queue().unwrap();
    replica.t.adopt_io_queue(replica.now, q2, &b).unwrap();
    let on1: Vec<_> = replica.t.shared_limits().collect();
    assert_eq!(on1.len(), 1);
    // Its part of the new limits at once (in the proportion of its part of the old ones,
    // 1999 of 2000), the whole new limits once alone.
    assert_eq!(
        replica
            .t
            .limits_in_force(on1[0].limiter)
            .iops
            .unwrap()
            .per_sec,
        499
    );
    replica.t.set_limit_split(on1[0].limiter, 0, &[8]);
    assert_eq!(replica.t.limits_in_force(on1[0].limiter), lower);
}

/// A replica controller that ends (its last queue closed) hands over what it admitted
/// through its part of its holder's limits; the holder adds it to its controller's counters,
/// so the merged count keeps it once the replica no longer publishes it.
#[test]
fn an_ended_replica_controller_s_counters_go_to_its_holder() {
    let (mut holder, cntlid, io0, _limits) = host_limited_holder();
    let a = holder.t.adoption(io0).unwrap();
    let mut replica = H::new();
    let q = replica.t.open_queue().unwrap();
    replica.t.adopt_io_queue(replica.now, q, &a).unwrap();
    holder.t.served_elsewhere(io0, true);
    // The holder serves its other queue itself.
    let io1 = holder.io_queue(3, cntlid);
    for cid in 0..2 {
        let w = holder.write(io1, cid, 1, 0, &[1u8; 512]);
        assert_eq!(plain(w.cqe.status), Status::SUCCESS);
    }
    for cid in 0..3 {
        let w = replica.write(q, cid, 1, 8, &[2u8; 1024]);
        assert_eq!(plain(w.cqe.status), Status::SUCCESS);
    }
    let mut taken = Vec::new();
    replica.t.take_retired_counters(&mut |r| taken.push(r));
    assert!(taken.is_empty(), "nothing while the replica lives");
    let admitted = |h: &H| {
        h.t.controller_views()
            .find(|c| c.cntlid == cntlid)
            .map(|c| (c.qos.admitted_ops, c.qos.admitted_bytes))
    };
    assert_eq!(admitted(&holder), Some((2, 1024)));
    replica.t.close_queue_after(q, QueueLoss::Orderly).unwrap();
    assert_eq!(replica.t.controller_count(), 0);
    replica.t.take_retired_counters(&mut |r| taken.push(r));
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].key, controller_key(SUB, cntlid));
    assert_eq!(
        (taken[0].counts.admitted_ops, taken[0].counts.admitted_bytes),
        (3, 3072)
    );
    replica.t.take_retired_counters(&mut |r| taken.push(r));
    assert_eq!(taken.len(), 1, "handed over once");
    // Its queue is back: the holder's controller is no longer split, and still takes them.
    holder.t.served_elsewhere(io0, false);
    assert!(holder.t.add_retired_counters(&taken[0]));
    assert_eq!(admitted(&holder), Some((5, 4096)));
    // Another controller's key, or a holder that ended, takes nothing.
    let other = RetiredCounters {
        key: controller_key(SUB, cntlid.wrapping_add(1)),
        ..taken[0]
    };
    assert!(!holder.t.add_retired_counters(&other));
    assert_eq!(admitted(&holder), Some((5, 4096)));
    // A replica that admitted nothing hands nothing over.
    let q2 = replica.t.open_queue().unwrap();
    replica.t.adopt_io_queue(replica.now, q2, &a).unwrap();
    replica.t.close_queue_after(q2, QueueLoss::Orderly).unwrap();
    replica.t.take_retired_counters(&mut |r| taken.push(r));
    assert_eq!(taken.len(), 1);
}

#[test]
fn a_replica_of_an_unlimited_controller_publishes_nothing() {
    let (holder, r, _admin, _q, a) = split();
    assert_eq!(a.limits, QosLimits::NONE);
    assert_eq!(r.t.shared_limits().count(), 0);
    assert_eq!(holder.t.shared_limits().count(), 0);
}

/// A live change of a host's rule reaches the replica of its controller on another core
/// without a new adoption: the holder lists its controllers' new limits
/// ([`Target::controller_limits`]), the replica's controller takes them
/// ([`Target::set_replica_controller_limits`]) on the same limiter, under the same split key;
/// the replica's own host rules (none here, or any) leave its controller's limits alone.
#[test]
fn a_replica_controller_takes_its_holder_s_new_limits_live_under_the_same_key() {
    let (mut holder, cntlid, io0, _) = host_limited_holder();
    let a = holder.t.adoption(io0).unwrap();
    let mut replica = H::new();
    let q = replica.t.open_queue().unwrap();
    replica.t.adopt_io_queue(replica.now, q, &a).unwrap();
    holder.t.served_elsewhere(io0, true);
    let before: Vec<_> = replica.t.shared_limits().collect();
    assert_eq!(before.len(), 1);
    // Split evenly with the holder, then the rule is lowered on the holder.
    replica.t.set_limit_split(before[0].limiter, 0, &[1, 1]);
    assert_eq!(
        replica
            .t
            .limits_in_force(before[0].limiter)
            .iops
            .unwrap()
            .per_sec,
        1000
    );
    let lower = QosLimits {
        iops: Some(keel_qos::Rate::new(1000).with_burst(10)),
        ..QosLimits::NONE
    };
    holder.t.set_host_qos(vec![HostQos {
        hostnqn: "*".into(),
        limits: lower,
    }]);
    assert_eq!(holder.t.controller_limits(SUB), [(cntlid, lower)]);
    assert!(
        holder
            .t
            .controller_limits("nqn.2026-01.test:none")
            .is_empty()
    );
    // Host rules given to the replica's target do not touch its controller (it has no
    // host NQN: the `*` rule would be a stranger's).
    replica.t.set_host_qos(vec![HostQos {
        hostnqn: "*".into(),
        limits: QosLimits {
            iops: Some(keel_qos::Rate::new(7)),
            ..QosLimits::NONE
        },
    }]);
    assert_eq!(
        replica
            .t
            .limits_in_force(before[0].limiter)
            .iops
            .unwrap()
            .per_sec,
        1000,
        "the replica's controller kept its holder's limits"
    );
    for (id, l) in holder.t.controller_limits(SUB) {
        assert_eq!(
            replica.t.set_replica_controller_limits(SUB, id, l),
            Ok(true)
        );
    }
    assert_eq!(
        replica
            .t
            .set_replica_controller_limits(SUB, cntlid.wrapping_add(1), lower),
        Ok(false),
        "no replica of that controller here"
    );
    assert!(
        replica
            .t
            .set_replica_controller_limits("nqn.2026-01.test:none", cntlid, lower)
            .is_err()
    );
    let after: Vec<_> = replica.t.shared_limits().collect();
    assert_eq!(after.len(), 1);
    assert_eq!(
        after[0].key,
        controller_key(SUB, cntlid),
        "the same split key"
    );
    assert_eq!(after[0].limiter, before[0].limiter, "the same limiter");
    // In force: half of the new limits at once (the part it had), the whole alone.
    assert_eq!(
        replica
            .t
            .limits_in_force(after[0].limiter)
            .iops
            .unwrap()
            .per_sec,
        500
    );
    replica.t.set_limit_split(after[0].limiter, 0, &[1]);
    assert_eq!(replica.t.limits_in_force(after[0].limiter), lower);
}
