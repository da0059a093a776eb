//! QoS in the controller core: limits per namespace, controller (host) and group, commands
//! over a limit waiting (never failed), live changes, fair and weighted sharing of a
//! saturated backend, Abort and teardown of waiting commands.

use crate::tests::{BLOCKS, H, HOST, SUB, config, plain};
use crate::*;
use keel_nvme::io::{AbortCommand, RwCommand};
use keel_nvme::{AdminOpcode, IoOpcode, Sqe, Status};
use keel_storage::{BlockBackend, RamBackend};

fn iops(n: u64, burst: u64) -> QosLimits {
    QosLimits {
        iops: Some(Rate::new(n).with_burst(burst)),
        ..QosLimits::NONE
    }
}

fn read_sqe(cid: u16, nsid: u32, lba: u64) -> Sqe {
    RwCommand::simple(lba, 1).to_sqe(IoOpcode::Read as u8, cid, nsid)
}

/// Submits `n` one-block reads on `q` with CIDs `cid0..`, returning how many completed at
/// once.
fn burst(h: &mut H, q: QueueId, cid0: u16, n: u16) -> usize {
    let mut done = 0;
    for i in 0..n {
        let r = h.send(
            q,
            read_sqe(cid0 + i, 1, i as u64),
            Some(IoBuf::leak_zeroed(512)),
            512,
        );
        if let Some(r) = r {
            assert_eq!(plain(r.cqe.status), Status::SUCCESS);
            done += 1;
        }
    }
    done
}

fn successes(h: &H) -> usize {
    h.completions()
        .iter()
        .filter(|(_, s, _)| *s == Status::SUCCESS)
        .count()
}

#[test]
fn a_namespace_limit_holds_commands_back_without_failing_them() {
    let mut cfg = config(64);
    cfg.subsystems[0].namespaces[0].qos.limits = iops(100, 5);
    let mut h = H::with(cfg);
    let (_a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    // 40 reads: the burst of 5 starts at once (the RAM disk answers in the next poll)...
    assert_eq!(burst(&mut h, io, 10, 40), 0);
    h.poll();
    assert_eq!(successes(&h), 5);
    // ...then 100 per second: after 100 ms, 10 more; nothing fails meanwhile.
    for _ in 0..10 {
        h.now = Instant::from_nanos(h.now.as_nanos() + 10_000_000);
        h.poll();
    }
    h.poll();
    assert_eq!(successes(&h), 15);
    assert_eq!(h.completions().len(), 15);
    // The poll loop is told when to look again.
    let wake = h.t.next_wakeup(h.now).expect("commands wait on a limit");
    assert!(wake.as_nanos() - h.now.as_nanos() <= 10_000_000);
    for _ in 0..30 {
        h.now = Instant::from_nanos(h.now.as_nanos() + 10_000_000);
        h.poll();
    }
    h.poll();
    assert_eq!(successes(&h), 40);
    let v = h.t.namespace_views().next().unwrap();
    assert_eq!(v.qos.admitted_ops, 40);
    assert_eq!(v.qos.queued, 0);
    assert!(v.qos.throttled_ns >= 300_000_000, "{:?}", v.qos);
    assert!(h.t.next_wakeup(h.now).is_none());
}

#[test]
fn a_host_limit_holds_one_host_and_not_the_other() {
    let mut cfg = config(64);
    cfg.host_qos = vec![HostQos {
        hostnqn: HOST.into(),
        limits: iops(10, 2),
    }];
    let mut h = H::with(cfg);
    let (_a, c) = h.admin(SUB, HOST, 0);
    let slow = h.io_queue(1, c);
    let (a2, _) = h.admin(SUB, "nqn.2026-12.test:other-host", 0);
    let c2 =
        h.t.controller_views()
            .find(|v| v.hostnqn == "nqn.2026-12.test:other-host")
            .unwrap()
            .cntlid;
    let _ = a2;
    let q = h.t.open_queue().unwrap();
    let r = h.connect_raw(q, 1, 127, 0, SUB, "nqn.2026-12.test:other-host", c2);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    burst(&mut h, slow, 1, 20);
    burst(&mut h, q, 1, 20);
    h.poll();
    h.poll();
    let by_queue = |h: &H, qq: QueueId| {
        h.events
            .iter()
            .filter(
                |e| matches!(e, Event::Completion(x, r) if *x == qq && r.cqe.status.is_success()),
            )
            .count()
    };
    assert_eq!(by_queue(&h, slow), 2, "the limited host gets its burst");
    assert_eq!(by_queue(&h, q), 20, "the other host is not held back");
    // The same namespace: the unlimited host's commands did not wait behind the limited
    // host's (different flows).
    let limited =
        h.t.controller_views()
            .find(|v| v.hostnqn == HOST)
            .unwrap()
            .qos;
    assert_eq!(limited.queued, 18);
    assert_eq!(limited.limits, iops(10, 2));
}

#[test]
fn a_group_limit_is_shared_by_its_namespaces() {
    let mut cfg = config(64);
    cfg.qos_groups = vec![QosGroup {
        name: "tenant".into(),
        limits: iops(100, 4),
        weight: 0,
    }];
    let mut two = crate::tests::ns(2, 64);
    two.qos.group = Some("tenant".into());
    cfg.subsystems[0].namespaces[0].qos.group = Some("tenant".into());
    cfg.subsystems[0].namespaces.push(two);
    let mut h = H::with(cfg);
    let (_a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    for i in 0..10u16 {
        let nsid = 1 + u32::from(i % 2);
        h.send(
            io,
            read_sqe(i + 1, nsid, 0),
            Some(IoBuf::leak_zeroed(512)),
            512,
        );
    }
    h.poll();
    h.poll();
    assert_eq!(successes(&h), 4, "one burst of 4 for both namespaces");
    let g = h.t.group_views().next().unwrap();
    assert_eq!((g.name, g.qos.admitted_ops), ("tenant", 4));
    // A group unknown to the target is refused.
    let mut bad = crate::tests::ns(3, 4);
    bad.qos.group = Some("nobody".into());
    assert!(h.t.add_namespace(SUB, bad).is_err());
}

#[test]
fn a_live_change_applies_to_waiting_commands() {
    let mut cfg = config(64);
    cfg.subsystems[0].namespaces[0].qos.limits = iops(1, 1);
    let mut h = H::with(cfg);
    let (_a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    burst(&mut h, io, 1, 30);
    h.poll();
    assert_eq!(successes(&h), 1);
    // Loosen: the 29 waiting start at once under the new limit; none failed.
    let q = NamespaceQos {
        limits: iops(100_000, 1000),
        ..Default::default()
    };
    h.t.set_namespace_qos(SUB, 1, q).unwrap();
    // (The bucket keeps its level: 29 commands at 100000/s take 290 µs.)
    h.now = Instant::from_nanos(h.now.as_nanos() + 1_000_000);
    h.poll();
    h.poll();
    assert_eq!(successes(&h), 30);
    assert_eq!(h.completions().len(), 30);
    // Tighten again, then remove every limit.
    h.t.set_namespace_qos(
        SUB,
        1,
        NamespaceQos {
            limits: iops(1, 1),
            ..Default::default()
        },
    )
    .unwrap();
    h.events.clear();
    burst(&mut h, io, 100, 5);
    h.poll();
    assert!(successes(&h) <= 1);
    h.t.set_namespace_qos(SUB, 1, NamespaceQos::default())
        .unwrap();
    h.poll();
    h.poll();
    assert_eq!(successes(&h), 5);
}

/// A backend that takes only `n` requests between polls: commands wait in the scheduler.
fn tight(n: usize) -> Box<dyn BlockBackend> {
    Box::new(RamBackend::new(512, BLOCKS, n).unwrap())
}

#[test]
fn a_saturated_backend_is_shared_in_arrival_order_per_flow() {
    let mut cfg = config(64);
    cfg.subsystems[0].namespaces[0].backend = tight(2);
    let mut h = H::with(cfg);
    let (_a, c) = h.admin(SUB, HOST, 0);
    let q1 = h.io_queue(1, c);
    let q2 = h.io_queue(2, c);
    // Two queues of one host interleave their submissions; the backend takes 2 per poll.
    for i in 0..20u16 {
        let q = if i % 2 == 0 { q1 } else { q2 };
        h.send(q, read_sqe(i, 1, 0), Some(IoBuf::leak_zeroed(512)), 512);
    }
    for _ in 0..20 {
        h.poll();
    }
    // Completions follow arrival (CID order), across both queues.
    let cids: Vec<u16> = h.completions().iter().map(|(c, _, _)| *c).collect();
    assert_eq!(cids, (0..20).collect::<Vec<_>>());
}

#[test]
fn weights_share_a_saturated_domain() {
    let mut cfg = config(64);
    // Two slices of one "drive": one domain, one command at the backend at a time.
    let shared = NamespaceQos {
        domain: Some(7),
        max_inflight: 1,
        ..Default::default()
    };
    cfg.subsystems[0].namespaces[0].qos = NamespaceQos {
        weight: 3,
        ..shared.clone()
    };
    let mut two = crate::tests::ns(2, 64);
    two.qos = NamespaceQos {
        weight: 1,
        ..shared
    };
    cfg.subsystems[0].namespaces.push(two);
    let mut h = H::with(cfg);
    let (_a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    for i in 0..120u16 {
        let nsid = 1 + u32::from(i >= 60);
        h.send(io, read_sqe(i, nsid, 0), Some(IoBuf::leak_zeroed(512)), 512);
    }
    for _ in 0..40 {
        h.poll();
    }
    // 40 starts so far at 3:1 between the namespaces.
    let done: Vec<u16> = h.completions().iter().map(|(c, _, _)| *c).collect();
    let ns1 = done.iter().filter(|&&c| c < 60).count();
    let ns2 = done.len() - ns1;
    assert!(done.len() >= 38, "{}", done.len());
    assert!((ns1 as i64 - 3 * ns2 as i64).abs() <= 4, "{ns1}:{ns2}");
}

#[test]
fn abort_and_teardown_of_waiting_commands() {
    let mut cfg = config(64);
    cfg.subsystems[0].namespaces[0].qos.limits = iops(1, 1);
    let mut h = H::with(cfg);
    let (a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    burst(&mut h, io, 1, 10);
    h.poll();
    assert_eq!(successes(&h), 1);
    // Abort CID 5 (waiting on the limit): aborted at once, DW0 bit 0 clear.
    let abort = AbortCommand { sqid: 1, cid: 5 }.to_sqe(900);
    let r = h.exec(a, abort, None, 0);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert_eq!(r.cqe.dw0 & 1, 0);
    h.poll();
    assert!(
        h.completions()
            .iter()
            .any(|(cid, s, _)| *cid == 5 && *s == Status::ABORT_REQUESTED)
    );
    // The host goes away: the 8 still waiting give their buffers back, and the scheduler
    // forgets the controller.
    h.events.clear();
    h.t.close_queue_after(a, QueueLoss::Abrupt).unwrap();
    h.poll();
    assert_eq!(h.released(), 8);
    assert_eq!(h.t.sched.waiting(), 0);
    assert_eq!(h.t.controller_count(), 0);
    let _ = AdminOpcode::Abort;
}

#[test]
fn a_removed_namespace_drains_its_waiting_commands_first() {
    let mut cfg = config(64);
    cfg.subsystems[0].namespaces[0].qos.limits = iops(10, 1);
    let mut h = H::with(cfg);
    let (_a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    burst(&mut h, io, 1, 5);
    h.t.remove_namespace(SUB, 1).unwrap();
    assert!(!h.t.has_namespace(SUB, 1));
    assert!(h.t.namespace_draining(SUB, 1), "commands still wait for it");
    for _ in 0..10 {
        h.now = Instant::from_nanos(h.now.as_nanos() + 100_000_000);
        h.poll();
    }
    // The commands accepted before the removal all completed; then the namespace went.
    assert_eq!(successes(&h), 5);
    assert!(!h.t.namespace_draining(SUB, 1), "drained");
    assert!(h.t.namespace_views().all(|v| v.subsystem != SUB));
    let si = h.t.subsys_index(SUB).unwrap();
    assert!(h.t.subsystems[si].namespaces[0].is_none(), "reaped");
    assert_eq!(h.t.sched.waiting(), 0);
}

/// A push changing `[qos] drive_max_inflight` reaches the namespace's domain live
/// (`Target::set_namespace_qos`); the domain itself stays.
#[test]
fn a_changed_domain_cap_applies_live() {
    let mut cfg = config(64);
    let capped = |max_inflight| NamespaceQos {
        domain: Some(7),
        max_inflight,
        ..Default::default()
    };
    cfg.subsystems[0].namespaces[0].qos = capped(64);
    let mut h = H::with(cfg);
    let cap = |h: &H| {
        let si = h.t.subsys_index(SUB).unwrap();
        let ni = h.t.subsystems[si].find_ns(1).unwrap();
        let ns = h.t.subsystems[si].namespaces[ni].as_ref().unwrap();
        (
            ns.domain,
            ns.qos.max_inflight,
            h.t.sched.max_inflight(ns.domain),
        )
    };
    let (d, ..) = cap(&h);
    assert_eq!(cap(&h), (d, 64, Some(64)));
    h.t.set_namespace_qos(SUB, 1, capped(2)).unwrap();
    assert_eq!(cap(&h), (d, 2, Some(2)));
    // Status sees the same (`keelctl status` "qos domains", `/metrics`).
    let v = h.t.namespace_views().find(|v| v.nsid == 1).unwrap();
    assert_eq!(
        (v.domain, v.domain_max_inflight, v.domain_inflight),
        (d.0, 2, 0)
    );
    h.t.set_namespace_qos(SUB, 1, capped(0)).unwrap();
    assert_eq!(cap(&h), (d, 0, Some(0)));
}

/// Issue 17: a capped shared domain reports its demand (the weights of its flows with
/// commands waiting or at the backend) for the firmware's split of the cap across cores,
/// takes a part of the cap live, and its demand falls back to 0 when the commands complete
/// or their queues go away with commands at the backend. Status keeps the configured cap.
#[test]
fn a_shared_domain_reports_demand_and_takes_its_part_of_the_cap() {
    let mut cfg = config(64);
    let shared = NamespaceQos {
        domain: Some(7),
        max_inflight: 4,
        ..Default::default()
    };
    cfg.subsystems[0].namespaces[0].qos = NamespaceQos {
        weight: 3,
        ..shared.clone()
    };
    let mut two = crate::tests::ns(2, 64);
    two.qos = NamespaceQos {
        weight: 1,
        ..shared
    };
    cfg.subsystems[0].namespaces.push(two);
    let mut h = H::with(cfg);
    let domains = |h: &H| {
        h.t.capped_domains()
            .map(|c| (c.key, c.domain, c.cap, c.load.demand / DEMAND_UNIT))
            .collect::<Vec<_>>()
    };
    let [(7, d, 4, 0)] = domains(&h)[..] else {
        panic!("{:?}", domains(&h));
    };
    let (a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    // Only namespace 2's flow is busy: demand 1.
    for i in 0..10u16 {
        h.send(io, read_sqe(i, 2, 0), Some(IoBuf::leak_zeroed(512)), 512);
    }
    assert_eq!(domains(&h), [(7, d, 4, 1)]);
    for i in 10..30u16 {
        h.send(io, read_sqe(i, 1, 0), Some(IoBuf::leak_zeroed(512)), 512);
    }
    assert_eq!(domains(&h), [(7, d, 4, 4)]);
    let load = h.t.capped_domains().next().unwrap().load;
    assert_eq!((load.want, load.inflight), (30, 4));
    // Half the cap here: no more than 2 at the backend from now on.
    h.t.set_domain_share(d, 2);
    assert_eq!(h.t.domain_cap_in_force(d), 2);
    let v = h.t.namespace_views().find(|v| v.nsid == 1).unwrap();
    assert_eq!(v.domain_max_inflight, 4, "status shows the configured cap");
    let mut most_after_first = 0;
    for k in 0..40 {
        h.poll();
        if k > 0 {
            most_after_first = most_after_first.max(h.t.sched.inflight(d));
        }
    }
    assert_eq!(most_after_first, 2);
    assert_eq!(successes(&h), 30);
    assert_eq!(domains(&h), [(7, d, 4, 0)], "idle: no demand");
    // Commands at the backend when the host goes: their flows leave the demand.
    h.t.set_domain_share(d, 0);
    assert_eq!(h.t.domain_cap_in_force(d), 4);
    for i in 30..40u16 {
        h.send(io, read_sqe(i, 1, 0), Some(IoBuf::leak_zeroed(512)), 512);
    }
    assert_eq!(domains(&h), [(7, d, 4, 3)]);
    assert_eq!(h.t.sched.inflight(d), 4);
    h.t.close_queue_after(a, QueueLoss::Abrupt).unwrap();
    for _ in 0..4 {
        h.poll();
    }
    assert_eq!(domains(&h), [(7, d, 4, 0)]);
    assert_eq!(h.t.sched.inflight(d), 0);
}
