//! Host tests of a core other than the controller core (`crate::percore`): its NVMe/TCP
//! service forwards Connect and admin commands to the controller core's target and serves
//! the I/O queues it adopts from a replica over the same RAM; the controller core's side is
//! played here by a second target and the steps `percore::Holder` takes (open a queue per
//! connection, run the command, answer with the queue's depth and, for an I/O queue of a
//! replicable subsystem, its adoption).

use crate::net::Addressing;
use crate::nvmf::{ConnRef, FORWARD_OWNER, FromHolder, NvmfService, ToHolder};
use crate::plan::Plan;
use crate::provisioned::{Identity, PROVISION_PUBKEY};
use crate::services::{Services, replica_target};
use crate::tests::{Device, Queue, TestHw, advance, now};
use keel_controller::{Event, Instant, QueueId, Request};
use keel_nvme::fabrics::CNTLID_DYNAMIC;
use keel_nvme::identify::{IDENTIFY_LEN, IdentifyCommand};
use keel_nvme::io::RwCommand;
use keel_nvme::{Cqe, IoOpcode};
use smoltcp::socket::tcp;

/// The controller core: its services (RAM in shared regions) and one queue per forwarded
/// connection.
struct Holder {
    s: Services<TestHw>,
    queues: Vec<(ConnRef, QueueId, bool)>,
    /// Every message the core sent it, in order.
    seen: Vec<&'static str>,
}

impl Holder {
    fn new(args: &str) -> Self {
        Self::with(args, |_| {})
    }

    /// As [`Holder::new`], with `edit` applied to the plan first (its QoS, for example).
    fn with(args: &str, edit: impl FnOnce(&mut Plan)) -> Self {
        let cfg = crate::config::DevConfig::from_bootargs(args, [2, 0, 0, 0, 0, 1]);
        let mut plan = Plan::from_dev(
            &cfg,
            &[],
            0,
            Addressing::from_bootargs(args),
            PROVISION_PUBKEY,
        );
        edit(&mut plan);
        let s = Services::build_with(
            plan,
            Vec::new(),
            Vec::new(),
            true,
            Identity::new(None, None),
            crate::services::RamSharing::All,
        );
        Self {
            s,
            queues: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// Answers everything the core's service sent (as `percore::Holder` does).
    fn serve(&mut self, dev: &mut Device) {
        let t = Instant::from_nanos(now());
        let out: Vec<ToHolder> = dev
            .services
            .nvmf
            .as_mut()
            .unwrap()
            .outbox
            .drain(..)
            .collect();
        for m in out {
            match m {
                ToHolder::Activity { cntlid } => {
                    self.seen.push("activity");
                    self.s.target.touch_controller(cntlid, t);
                }
                ToHolder::Error(e) => {
                    self.seen.push("error");
                    self.s.target.log_replica_error(&e);
                }
                ToHolder::Counters(r) => {
                    self.seen.push("counters");
                    self.s.target.add_retired_counters(&r);
                }
                ToHolder::AbortVerdict { token, aborted } => {
                    self.seen.push("abort verdict");
                    self.s.target.abort_verdict_from_elsewhere(token, aborted);
                }
                ToHolder::Closed { conn, how } => {
                    self.seen.push("closed");
                    if let Some(i) = self.queues.iter().position(|q| q.0 == conn) {
                        let (_, q, _) = self.queues.remove(i);
                        let _ = self.s.target.close_queue_after(q, how);
                    }
                }
                ToHolder::Capsule {
                    conn,
                    sqe,
                    buf,
                    data_len,
                    status,
                } => {
                    self.seen.push("capsule");
                    assert_eq!(status, None);
                    let i = match self.queues.iter().position(|q| q.0 == conn) {
                        Some(i) => i,
                        None => {
                            let q = self.s.target.open_queue_for(FORWARD_OWNER).unwrap();
                            self.queues.push((conn, q, false));
                            self.queues.len() - 1
                        }
                    };
                    // The command runs on the core's own buffer (forwarding copies nothing).
                    assert_eq!(buf.is_some(), data_len > 0, "{sqe:?}");
                    let req = Request {
                        sqe,
                        buf,
                        data_len,
                        cookie: i as u32,
                    };
                    let q = self.queues[i].1;
                    let resp = match self.s.target.submit(t, q, req) {
                        Some(r) => r,
                        None => {
                            let mut got = None;
                            for _ in 0..100 {
                                self.s.target.poll(t, &mut |e| {
                                    if let Event::Completion(_, r) = e {
                                        got = Some(r);
                                    }
                                });
                                if got.is_some() {
                                    break;
                                }
                            }
                            got.expect("a completion")
                        }
                    };
                    let (mut depth, mut adopt) = (None, None);
                    if !self.queues[i].2
                        && let Some(info) = self.s.target.queue_info(q)
                    {
                        self.queues[i].2 = true;
                        depth = Some((info.sqsize, info.sq_flow_control_disabled));
                        adopt = self.s.target.adoption(q).map(Box::new);
                    }
                    let done = FromHolder::Done {
                        conn,
                        cqe: resp.cqe,
                        buf: resp.buf,
                        data_len: resp.data_len,
                        depth,
                        adopt,
                    };
                    let target = &mut dev.services.target;
                    dev.services
                        .nvmf
                        .as_mut()
                        .unwrap()
                        .on_holder(done, now(), target);
                }
            }
        }
    }

    /// Ends every queue the holder's target terminated (as `percore::Holder` does).
    fn terminations(&mut self, dev: &mut Device) {
        let t = Instant::from_nanos(now());
        let mut ended = Vec::new();
        self.s.target.poll(t, &mut |e| {
            if let Event::QueueTerminated(q) = e {
                ended.push(q);
            }
        });
        for q in ended {
            if let Some(&(conn, _, _)) = self.queues.iter().find(|x| x.1 == q) {
                let target = &mut dev.services.target;
                dev.services.nvmf.as_mut().unwrap().on_holder(
                    FromHolder::Terminate { conn },
                    now(),
                    target,
                );
            }
        }
    }
}

/// One command to completion, the holder answering after each pass of the core.
fn run(
    dev: &mut Device,
    h: &mut Holder,
    q: &mut Queue,
    sqe: keel_nvme::Sqe,
    data: Option<Vec<u8>>,
) -> (Cqe, Option<Vec<u8>>) {
    q.cmd_with(dev, sqe, data, &mut |d| h.serve(d))
}

/// A device whose NVMe/TCP service is a secondary core's: forwarding, over a replica of the
/// holder's replicable subsystems.
fn secondary(h: &Holder) -> Device {
    let mut dev = Device::new("keel.ram=16");
    dev.services.target =
        replica_target(h.s.replicable.clone(), *h.s.target.limits(), &mut |_, _| {
            None
        })
        .expect("replica");
    dev.services.nvmf = Some(NvmfService::new(None).unwrap().forwarding());
    dev
}

#[test]
fn a_secondary_forwards_admin_and_serves_adopted_io_over_shared_ram() {
    let mut h = Holder::new("keel.ram=16 keel.ip=127.0.0.1/8");
    assert_eq!(
        h.s.replicable.len(),
        1,
        "the RAM subsystem is served by every core"
    );
    let mut dev = secondary(&h);
    let nqn = crate::config::DEFAULT_NQN;

    // Admin queue: Connect, enable, Identify all answered by the holder.
    let mut admin = Queue::open(&mut dev, 51_000);
    let connect = |qid: u16, cntlid: u16| {
        let sqe = keel_nvme::fabrics::ConnectCommand {
            recfmt: 0,
            qid,
            sqsize: 31,
            cattr: 0,
            kato: if qid == 0 { 30_000 } else { 0 },
        }
        .to_sqe(0);
        let mut data = vec![0u8; keel_nvme::fabrics::ConnectData::SIZE];
        keel_nvme::fabrics::ConnectData::new([7; 16], cntlid, nqn, "nqn.2026-12.test:host")
            .write(&mut data);
        (sqe, data)
    };
    let (sqe, data) = connect(0, CNTLID_DYNAMIC);
    let (cqe, _) = run(&mut dev, &mut h, &mut admin, sqe, Some(data));
    assert!(cqe.status.is_success(), "{:?}", cqe.status);
    let cntlid = cqe.dw0 as u16;
    assert_eq!(
        h.s.target.controller_count(),
        1,
        "the controller lives on the holder"
    );
    assert_eq!(dev.services.target.controller_count(), 0);
    let cc = keel_nvme::regs::Cc::new(true, 0, 0, 0, keel_nvme::regs::Cc::SHN_NONE, 6, 4);
    let sqe = keel_nvme::fabrics::PropertyCommand::set_sqe(
        0,
        keel_nvme::regs::offset::CC,
        keel_nvme::fabrics::PropertySize::Four,
        cc.0 as u64,
    );
    assert!(
        run(&mut dev, &mut h, &mut admin, sqe, None)
            .0
            .status
            .is_success()
    );
    let id = IdentifyCommand {
        cns: 1,
        cntid: 0,
        nsid: 0,
        csi: 0,
    }
    .to_sqe(0);
    let (cqe, buf) = run(
        &mut dev,
        &mut h,
        &mut admin,
        id,
        Some(vec![0u8; IDENTIFY_LEN]),
    );
    assert!(cqe.status.is_success());
    let buf = buf.unwrap();
    assert_eq!(
        &buf[768..768 + nqn.len()],
        nqn.as_bytes(),
        "SUBNQN from the holder"
    );

    // I/O queue: its Connect goes to the holder, then the queue is adopted: I/O runs on the
    // replica, nothing more reaches the holder.
    let mut io = Queue::open(&mut dev, 51_001);
    let (sqe, data) = connect(1, cntlid);
    assert!(
        run(&mut dev, &mut h, &mut io, sqe, Some(data))
            .0
            .status
            .is_success()
    );
    assert_eq!(
        dev.services.target.controller_count(),
        1,
        "a replica took the queue"
    );
    let sent = h.seen.len();
    let pattern: Vec<u8> = (0..16_384u32).map(|i| (i * 13 + 1) as u8).collect();
    let rw = RwCommand {
        slba: 40,
        nlb: 31,
        deac: false,
        fua: false,
        lr: false,
        prinfo: 0,
    };
    let (cqe, _) = run(
        &mut dev,
        &mut h,
        &mut io,
        rw.to_sqe(IoOpcode::Write as u8, 0, 1),
        Some(pattern.clone()),
    );
    assert!(cqe.status.is_success(), "{:?}", cqe.status);
    let (cqe, back) = run(
        &mut dev,
        &mut h,
        &mut io,
        rw.to_sqe(IoOpcode::Read as u8, 0, 1),
        Some(vec![0u8; 16_384]),
    );
    assert!(cqe.status.is_success());
    assert_eq!(back.unwrap(), pattern);
    assert_eq!(h.seen.len(), sent, "no I/O command went to the holder");
    // The holder's target reads the same blocks (shared RAM).
    let mut direct = vec![0u8; 16_384];
    let crate::services::ReplicaSource::Ram(region) = &h.s.replicable[0].namespaces[0].source
    else {
        panic!("a RAM namespace")
    };
    let mut handle = region.handle(1);
    keel_storage::BlockBackend::read_now(&mut handle, 40, 32, &mut direct).unwrap();
    assert_eq!(direct, pattern);

    // A second adopted I/O queue, then Disconnect on the first: the secondary closes that
    // connection once the response has left, before the host's FIN (as a slow host or a
    // relay in between makes it). The holder must take that as the orderly end of one queue,
    // not as an I/O queue lost without Disconnect (which ends the association): the
    // controller and the second queue carry on.
    let mut io2 = Queue::open(&mut dev, 51_002);
    let (sqe, data) = connect(2, cntlid);
    assert!(
        run(&mut dev, &mut h, &mut io2, sqe, Some(data))
            .0
            .status
            .is_success()
    );
    let (cqe, _) = run(
        &mut dev,
        &mut h,
        &mut io,
        keel_nvme::fabrics::disconnect_sqe(0),
        None,
    );
    assert!(cqe.status.is_success(), "{:?}", cqe.status);
    for _ in 0..50 {
        dev.pass();
        h.serve(&mut dev);
        h.terminations(&mut dev);
    }
    assert!(h.seen.contains(&"closed"), "{:?}", h.seen);
    assert_eq!(
        h.s.target.controller_count(),
        1,
        "Disconnect then close ends one queue, not the association: {:?}",
        h.seen
    );
    let (cqe, back) = run(
        &mut dev,
        &mut h,
        &mut io2,
        rw.to_sqe(IoOpcode::Read as u8, 0, 1),
        Some(vec![0u8; 16_384]),
    );
    assert!(cqe.status.is_success(), "{:?}", cqe.status);
    assert_eq!(back.unwrap(), pattern, "the other queue still serves");
    let mut io = io2;

    // Traffic on the adopted queue is reported for keep-alive (once a second at most).
    advance(1_100_000_000);
    io.pump(&mut dev);
    h.serve(&mut dev);
    assert!(h.seen.contains(&"activity"), "{:?}", h.seen);

    // The holder ends the controller (its admin queue lost): the I/O connection is closed on
    // the secondary, which reports it.
    dev.net.sockets.get_mut::<tcp::Socket>(admin.sock).abort();
    for _ in 0..200 {
        dev.pass();
        h.serve(&mut dev);
        h.terminations(&mut dev);
    }
    assert_eq!(h.s.target.controller_count(), 0);
    assert_eq!(
        dev.services.nvmf.as_ref().unwrap().connections(),
        0,
        "both connections closed"
    );
    assert_eq!(
        dev.services.target.controller_count(),
        0,
        "the replica went with its queue"
    );
    assert!(h.queues.is_empty(), "every held queue closed: {:?}", h.seen);
}

/// Forwarding copies nothing: a command goes to the controller core with the core's own
/// data buffer and the buffer comes back with the answer, even when the connection went away
/// in between (a stale answer, or a buffer the controller core's target released after the
/// queue closed): the core's pools end whole.
#[test]
fn forwarded_buffers_come_home_when_the_connection_is_gone() {
    let h = Holder::new("keel.ram=16 keel.ip=127.0.0.1/8");
    let mut dev = secondary(&h);
    let nqn = crate::config::DEFAULT_NQN;
    let (free0, all) = dev.services.nvmf.as_ref().unwrap().buffers();
    let mut admin = Queue::open(&mut dev, 51_100);
    let sqe = keel_nvme::fabrics::ConnectCommand {
        recfmt: 0,
        qid: 0,
        sqsize: 31,
        cattr: 0,
        kato: 30_000,
    }
    .to_sqe(0);
    let mut data = vec![0u8; keel_nvme::fabrics::ConnectData::SIZE];
    keel_nvme::fabrics::ConnectData::new([7; 16], CNTLID_DYNAMIC, nqn, "nqn.2026-12.test:host")
        .write(&mut data);
    let n = data.len() as u32;
    admin.host.submit(sqe, Some((data.clone(), n))).unwrap();
    // Two commands reach the "controller core" and are not answered yet.
    let id = IdentifyCommand {
        cns: 1,
        cntid: 0,
        nsid: 0,
        csi: 0,
    }
    .to_sqe(0);
    admin
        .host
        .submit(id, Some((vec![0u8; IDENTIFY_LEN], IDENTIFY_LEN as u32)))
        .unwrap();
    let mut capsules = Vec::new();
    for _ in 0..200 {
        admin.pump(&mut dev);
        capsules.append(&mut dev.services.nvmf.as_mut().unwrap().outbox);
        if capsules.len() == 2 {
            break;
        }
    }
    let mut bufs = Vec::new();
    for m in capsules {
        let ToHolder::Capsule { conn, sqe, buf, .. } = m else {
            panic!("a capsule");
        };
        let b = buf.expect("the command's data buffer travels with it");
        if sqe.opcode == 0x7F {
            assert_eq!(
                &b.as_slice()[..data.len()],
                &data[..],
                "Connect data in place"
            );
        }
        bufs.push((conn, sqe, b));
    }
    assert_eq!(bufs.len(), 2);
    assert_eq!(
        dev.services.nvmf.as_ref().unwrap().buffers(),
        (free0 - 2, all),
        "both buffers are at the controller core"
    );
    // The host goes away.
    dev.net.sockets.get_mut::<tcp::Socket>(admin.sock).abort();
    for _ in 0..100 {
        dev.pass();
    }
    assert_eq!(dev.services.nvmf.as_ref().unwrap().connections(), 0);
    // One answer comes back for the gone connection, the other buffer as a release.
    let (conn, sqe, b) = bufs.remove(0);
    let done = FromHolder::Done {
        conn,
        cqe: Cqe {
            dw0: 0,
            dw1: 0,
            sqhd: 0,
            sqid: 0,
            cid: sqe.cid,
            phase: false,
            status: keel_nvme::Status::SUCCESS,
        },
        buf: Some(b),
        data_len: 0,
        depth: None,
        adopt: None,
    };
    let (_, _, b) = bufs.remove(0);
    let target = &mut dev.services.target;
    let svc = dev.services.nvmf.as_mut().unwrap();
    svc.on_holder(done, now(), target);
    svc.on_holder(FromHolder::Release { buf: b }, now(), target);
    assert_eq!(svc.buffers(), (free0, all), "every buffer home");
}

/// A subsystem with a remote namespace (unencrypted, no limits) is served by every core: its
/// replica is built at boot without the remote namespace (its size is not known yet), which
/// each core adds when core 0 hands it the volume's lane; namespace changes made only by
/// such adds, once every core has them, are no change for the replicas.
#[test]
fn a_subsystem_with_a_remote_namespace_is_served_by_every_core() {
    let mut h = Holder::new(
        "keel.ns=ram:16,remote:10.0.0.9:4420:nqn.2026-11.dev.keel:pool:1 keel.ip=127.0.0.1/8",
    );
    assert_eq!(h.s.replicable.len(), 1, "{:?}", h.s.replicable);
    let ns = &h.s.replicable[0].namespaces;
    assert_eq!(ns.len(), 2);
    let crate::services::ReplicaSource::Remote { remote, slice } = &ns[1].source else {
        panic!("namespace 2 is remote: {:?}", ns[1].source);
    };
    assert_eq!(remote.nqn, "nqn.2026-11.dev.keel:pool");
    assert_eq!(*slice, None);
    assert_eq!(ns[1].nsid, 2);
    let replica = replica_target(h.s.replicable.clone(), *h.s.target.limits(), &mut |_, _| {
        None
    })
    .expect("replica");
    let nsids: Vec<u32> = replica.namespace_views().map(|v| v.nsid).collect();
    assert_eq!(nsids, [1], "the remote namespace comes later");

    let remotes = &mut h.s.remotes;
    assert_eq!(remotes.volumes.len(), 1);
    let v = &remotes.volumes[0];
    assert!(
        v.id > 0 && v.gate_open && !v.laned,
        "one core until percore says otherwise"
    );
    let cfg = remotes.lane_config(v);
    assert_eq!(cfg.subnqn, "nqn.2026-11.dev.keel:pool");
    // Nothing recorded: any change is a change.
    let log = &mut h.s.replication;
    assert!(!log.explains(3, 4));
    assert!(log.explains(4, 4));
    // Two adds by laned volumes: both watchers of the generation (the NVMe/TCP holder and
    // the functions' hub) get the same answer; asking forgets nothing.
    log.note(4, 5);
    log.note(5, 7);
    assert!(log.explains(4, 7));
    assert!(log.explains(4, 7), "the second watcher");
    assert!(log.explains(5, 7));
    assert!(!log.explains(3, 7), "a change before the adds");

    // An encrypted remote namespace is served by every core too: the replica carries its
    // key (each core wraps its lane in the same cipher).
    let h = Holder::new(
        "keel.ns=remote:10.0.0.9:4420:nqn.2026-11.dev.keel:pool:1 keel.xts=1:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1ff0e1d2c3b4a5968778695a4b3c2d1e0f0123456789abcdeffedcba9876543210 keel.ip=127.0.0.1/8",
    );
    assert_eq!(h.s.replicable.len(), 1, "{:?}", h.s.replicable);
    let n = &h.s.replicable[0].namespaces[0];
    assert!(
        matches!(n.source, crate::services::ReplicaSource::Remote { .. }) && n.key.is_some(),
        "{n:?}"
    );
}

/// Core 0's services for development arguments `args` with `n` emulated-function windows of
/// 1 MiB (the first at 0x1000_0000, each 0x1000_0000 further), sharing RAM as `sharing`.
fn with_windows(args: &str, n: u64, sharing: crate::services::RamSharing) -> Services<TestHw> {
    let windows: Vec<crate::services::WindowPort<keel_nvme_pcie::MemWindow>> = (0..n)
        .map(|i| crate::services::WindowPort {
            base: 0x1000_0000 * (i + 1),
            size: 1 << 20,
            ep: Ok(keel_nvme_pcie::MemWindow::new(1 << 20)),
        })
        .collect();
    Services::<TestHw>::build_with(
        crate::tests::dev_plan(args, n as usize),
        Vec::new(),
        windows,
        true,
        Identity::new(None, None),
        sharing,
    )
}

/// The emulated functions every core serves (`crate::fnq`): with the functions' RAM shared
/// between the cores (`--smp N` without a queue pair per core), the development functions'
/// subsystems (one RAM namespace each) are replicable and listed for the functions' pairs,
/// the NVMe/TCP subsystem is not; a replica built from them serves their namespaces.
#[test]
fn development_functions_are_served_by_every_core_over_shared_ram() {
    let args = "keel.ram=16 keel.fn.ram=8 keel.ip=127.0.0.1/8";
    let s = with_windows(args, 2, crate::services::RamSharing::Functions);
    let fns: Vec<String> = s
        .function_replicas()
        .iter()
        .map(|r| r.nqn.clone())
        .collect();
    assert_eq!(
        fns,
        ["nqn.2026-11.dev.keel:fn0", "nqn.2026-11.dev.keel:fn1"],
        "{fns:?}"
    );
    assert!(
        !s.replicable
            .iter()
            .any(|r| r.nqn == crate::config::DEFAULT_NQN),
        "the NVMe/TCP subsystem's RAM is not shared (no queue pair per core)"
    );
    let replica = replica_target(s.function_replicas(), *s.target.limits(), &mut |_, _| None)
        .expect("a replica of the functions' subsystems");
    let views: Vec<(String, u32, u64)> = replica
        .namespace_views()
        .map(|n| {
            (
                n.subsystem.to_string(),
                n.nsid,
                n.geometry.blocks * u64::from(n.geometry.block_size),
            )
        })
        .collect();
    assert_eq!(
        views,
        [
            ("nqn.2026-11.dev.keel:fn0".to_string(), 1, 8 << 20),
            ("nqn.2026-11.dev.keel:fn1".to_string(), 1, 8 << 20)
        ]
    );
    // Without sharing (one core), no function is listed: every queue stays on core 0.
    let one = Services::<TestHw>::build_with(
        crate::tests::dev_plan(args, 0),
        Vec::new(),
        Vec::new(),
        true,
        Identity::new(None, None),
        crate::services::RamSharing::None,
    );
    assert!(one.function_replicas().is_empty());
}

/// Issue 17, live changes: the controller core with RAM in shared regions and the subsystem
/// `keel.ns=ram:4,ram:4` (NSIDs 1 and 2), as `percore::Holder::start` leaves it with one
/// other core (core 1) serving a replica of it; that replica.
fn replicated() -> (
    Holder,
    keel_controller::Target,
    crate::services::ReplicaShares,
) {
    replicated_with(|_| {})
}

/// [`replicated`], with `edit` applied to the plan first (its QoS, for example).
fn replicated_with(
    edit: impl FnOnce(&mut Plan),
) -> (
    Holder,
    keel_controller::Target,
    crate::services::ReplicaShares,
) {
    let mut h = Holder::with("keel.ns=ram:4,ram:4 keel.ip=127.0.0.1/8", edit);
    assert_eq!(h.s.replicable.len(), 1);
    let r = &mut h.s.replication;
    r.cores = 0b10;
    r.subsystems = vec![crate::config::DEFAULT_NQN.to_string()];
    let (t, shares) = crate::services::replica_target_shares(
        h.s.replicable.clone(),
        *h.s.target.limits(),
        &mut |_, _| None,
    )
    .expect("replica");
    (h, t, shares)
}

/// The pushed description: namespace 2 removed, namespace 3 (RAM, 1 MiB) added.
fn push_add_3_remove_2(h: &mut Holder) -> keel_mgmt::PushReport {
    use keel_mgmt::Device as _;
    let mut desc = h.s.plan.to_device();
    desc.namespaces.retain(|n| n.nsid != 2);
    let mut three = desc.namespaces[0].clone();
    three.nsid = 3;
    three.backend = keel_provision::Backend::Ram {
        size: 1 << 20,
        block_size: 512,
    };
    desc.namespaces.push(three);
    let generation = h.s.plan.generation + 1;
    h.s.push(&crate::tests::signed_bundle(&desc, generation))
        .expect("push")
}

/// A weak reference to the shared RAM of namespace `nsid` as core 0 describes it.
fn ram_of(h: &Holder, nsid: u32) -> alloc::sync::Weak<impl Sized + use<>> {
    let n = h.s.replicable[0]
        .namespaces
        .iter()
        .find(|n| n.nsid == nsid)
        .expect("described");
    let crate::services::ReplicaSource::Ram(region) = &n.source else {
        panic!("a RAM namespace")
    };
    region.watch()
}

fn nsids(t: &keel_controller::Target) -> Vec<u32> {
    let mut v: Vec<u32> = t.namespace_views().map(|n| n.nsid).collect();
    v.sort_unstable();
    v
}

/// A push that adds and removes namespaces of a subsystem every core serves is staged: the
/// other core's replica gets the change (the added namespace over the same shared RAM)
/// before core 0's target, which changes only once every core acked; both watchers of the
/// namespace generation (the NVMe/TCP holder, the functions' hub) find the change explained,
/// so adopted queues stay adopted; a second push meanwhile is refused with nothing changed.
#[test]
fn a_pushed_namespace_change_reaches_every_core_before_core_0() {
    use crate::replica::ReplicaOp;
    use keel_mgmt::Device as _;
    let nqn = crate::config::DEFAULT_NQN;
    let (mut h, mut replica, mut shares) = replicated();
    let g0 = h.s.target.namespace_generation();
    let ram2 = ram_of(&h, 2);
    let r = push_add_3_remove_2(&mut h);
    assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
    assert_eq!(r.added, [(nqn.to_string(), 3)]);
    assert_eq!(r.removed, [(nqn.to_string(), 2)]);
    // Staged: core 0 unchanged until every core applied it.
    assert_eq!(nsids(&h.s.target), [1, 2]);
    assert_eq!(h.s.target.namespace_generation(), g0);
    assert!(h.s.replication.pending());
    let t = now();
    let changes = h.s.replication.take_unsent(t, 0b10);
    assert_eq!(changes.len(), 2);
    assert!(matches!(changes[0].op, ReplicaOp::Remove(2)));
    assert!(matches!(&changes[1].op, ReplicaOp::Add { ns, group: None } if ns.nsid == 3));
    assert!(!h.s.finish_replicated(t), "no ack yet");
    assert_eq!(nsids(&h.s.target), [1, 2]);
    // Another push while the change is in flight is refused and changes nothing.
    let again = h.s.push(&crate::tests::signed_bundle(
        &h.s.plan.to_device(),
        h.s.plan.generation + 1,
    ));
    assert!(again.is_err());
    assert_eq!(nsids(&h.s.target), [1, 2]);

    // Core 1 applies both, in order, and acks.
    for c in &changes {
        assert!(crate::services::apply_replica_change(
            &mut replica,
            &mut shares,
            c,
            &mut |_, _| None
        ));
        h.s.replication.ack(c.seq, 1, true);
    }
    assert_eq!(nsids(&replica), [1, 3], "the replica first");
    assert!(
        !replica.namespace_draining(nqn, 2),
        "no command was in flight: the removal is acked at once"
    );
    assert_eq!(nsids(&h.s.target), [1, 2], "core 0 after the acks are read");
    assert!(ram2.upgrade().is_some(), "core 0 still serves namespace 2");
    assert!(h.s.finish_replicated(t));
    assert_eq!(nsids(&h.s.target), [1, 3]);
    // Namespace 2's memory is freed: neither core's target nor core 0's description of what
    // the others serve holds it any more; namespace 3's is described for later replicas.
    assert!(ram2.upgrade().is_none(), "namespace 2's shared RAM freed");
    assert!(ram_of(&h, 3).upgrade().is_some());
    assert!(ram_of(&h, 1).upgrade().is_some());
    assert!(!h.s.replication.pending());
    let g1 = h.s.target.namespace_generation();
    assert_ne!(g0, g1);
    // Both watchers (each with its own last generation) find it explained; nothing dropped.
    assert!(h.s.replication.explains(g0, g1), "the NVMe/TCP holder");
    assert!(h.s.replication.explains(g0, g1), "the functions' hub");
    assert!(h.s.replication.dropped.is_empty());
    assert!(h.s.replication.follows(nqn));
    // The added namespace: same size on both, and the change carried its shared region.
    let size = |t: &keel_controller::Target| {
        t.namespace_views()
            .find(|n| n.nsid == 3)
            .map(|n| n.geometry.blocks * u64::from(n.geometry.block_size))
    };
    assert_eq!(size(&replica), Some(1 << 20));
    assert_eq!(size(&h.s.target), Some(1 << 20));
    assert!(matches!(&changes[1].op, ReplicaOp::Add { ns, .. }
        if matches!(ns.source, crate::services::ReplicaSource::Ram(_))));
    // An unlogged change still is one.
    h.s.target.remove_namespace(nqn, 3).unwrap();
    assert!(
        !h.s.replication
            .explains(g0, h.s.target.namespace_generation())
    );
}

/// A core that does not ack a staged change within the bound (or refuses it): core 0
/// applies the change alone, logs it, and stops adopting that subsystem only (its adopted
/// queues end); the change is explained for the watchers (the subsystem is dropped), and
/// later pushes of that subsystem are applied on core 0 at once.
#[test]
fn a_core_that_does_not_ack_makes_core_0_apply_alone_and_drop_the_subsystem() {
    let nqn = crate::config::DEFAULT_NQN;
    for refuse in [false, true] {
        let (mut h, mut replica, mut shares) = replicated();
        let g0 = h.s.target.namespace_generation();
        let ram2 = ram_of(&h, 2);
        push_add_3_remove_2(&mut h);
        let t = now();
        let changes = h.s.replication.take_unsent(t, 0b10);
        assert_eq!(changes.len(), 2);
        if refuse {
            h.s.replication.ack(changes[0].seq, 1, false);
            assert!(h.s.finish_replicated(t), "refused: applied at once");
            assert_eq!(nsids(&h.s.target), [1], "the refused removal");
            assert!(h.s.finish_replicated(t + crate::replica::ACK_TIMEOUT_NS));
        } else {
            assert!(!h.s.finish_replicated(t + crate::replica::ACK_TIMEOUT_NS - 1));
            assert_eq!(nsids(&h.s.target), [1, 2], "still waiting");
            assert!(h.s.finish_replicated(t + crate::replica::ACK_TIMEOUT_NS));
        }
        assert_eq!(nsids(&h.s.target), [1, 3]);
        assert!(!h.s.replication.pending());
        assert_eq!(h.s.replication.dropped, [nqn.to_string()]);
        // Core 1's replica still reaches namespace 2 (a dropped subsystem's replica is
        // retired, not followed): its memory stays until the holder retires it there.
        assert!(ram2.upgrade().is_some(), "core 1 still holds namespace 2");
        let ram1 = ram_of(&h, 1);
        h.s.forget_dropped(nqn);
        assert!(
            h.s.replicable.is_empty(),
            "a dropped subsystem is not described"
        );
        let retire = crate::replica::ReplicaChange {
            seq: 0,
            subsystem: nqn.to_string(),
            op: crate::replica::ReplicaOp::Retire,
        };
        assert!(crate::services::apply_replica_change(
            &mut replica,
            &mut shares,
            &retire,
            &mut |_, _| None
        ));
        assert!(
            nsids(&replica).is_empty(),
            "the replica forgot the subsystem"
        );
        assert!(ram2.upgrade().is_none(), "namespace 2's shared RAM freed");
        assert!(ram1.upgrade().is_some(), "core 0 still serves namespace 1");
        assert!(!h.s.replication.follows(nqn));
        let g1 = h.s.target.namespace_generation();
        assert!(h.s.replication.explains(g0, g1));
        // The next push changes core 0 at once.
        use keel_mgmt::Device as _;
        let mut desc = h.s.plan.to_device();
        desc.namespaces.retain(|n| n.nsid != 3);
        h.s.push(&crate::tests::signed_bundle(&desc, h.s.plan.generation + 1))
            .expect("push");
        assert!(!h.s.replication.pending());
        assert_eq!(nsids(&h.s.target), [1]);
        assert!(
            h.s.replication
                .explains(g0, h.s.target.namespace_generation())
        );
    }
}

/// Changes the replicas cannot follow fall back for their subsystem only: with the NVMe/TCP
/// subsystem and an emulated function's subsystem both served by the other cores' replicas
/// (`percore::Holder::start` with one other core), a namespace added live to the function's
/// subsystem (its replicas do not follow namespace changes) is added on core 0 alone and
/// drops that subsystem (its adopted queues end, later ones are forwarded) with nothing
/// staged, while the NVMe/TCP subsystem is still followed; a namespace added once it is
/// dropped changes core 0 at once and is explained for the watchers; without other cores
/// (no holder) nothing is ever staged.
#[test]
fn changes_that_cannot_be_followed_drop_only_their_subsystem() {
    use keel_mgmt::Device as _;
    let nqn = crate::config::DEFAULT_NQN;
    let fn0 = "nqn.2026-11.dev.keel:fn0";
    let args = "keel.ns=ram:4,ram:4 keel.fn.ram=4 keel.ip=127.0.0.1/8";
    let mut s = with_windows(args, 1, crate::services::RamSharing::All);
    let described: Vec<&str> = s.replicable.iter().map(|r| r.nqn.as_str()).collect();
    assert_eq!(described, [nqn, fn0]);
    // As `percore::Holder::start` leaves it with one other core serving both.
    s.replication.cores = 0b10;
    s.replication.subsystems = alloc::vec![nqn.to_string(), fn0.to_string()];
    let fn_nsids = |s: &Services<TestHw>| {
        let mut v: Vec<u32> = s
            .target
            .namespace_views()
            .filter(|n| n.subsystem == fn0)
            .map(|n| n.nsid)
            .collect();
        v.sort_unstable();
        v
    };
    let g0 = s.target.namespace_generation();
    let mut desc = s.plan.to_device();
    let mut two = desc
        .namespaces
        .iter()
        .find(|n| n.subsystem == fn0)
        .expect("the function's namespace")
        .clone();
    two.nsid = 2;
    desc.namespaces.push(two.clone());
    let r = s
        .push(&crate::tests::signed_bundle(&desc, s.plan.generation + 1))
        .expect("push");
    assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
    assert_eq!(r.added, [(fn0.to_string(), 2)]);
    assert_eq!(s.replication.dropped, [fn0.to_string()]);
    assert!(!s.replication.follows(fn0));
    assert!(
        s.replication.follows(nqn),
        "the other subsystem is still followed"
    );
    assert!(!s.replication.pending());
    assert_eq!(fn_nsids(&s), [1, 2]);
    assert!(s.replication.explains(g0, s.target.namespace_generation()));
    // A namespace added now changes core 0 at once (nothing staged), explained.
    let mut three = two;
    three.nsid = 3;
    desc.namespaces.push(three);
    s.push(&crate::tests::signed_bundle(&desc, s.plan.generation + 1))
        .expect("push");
    assert!(!s.replication.pending());
    assert_eq!(fn_nsids(&s), [1, 2, 3]);
    assert!(s.replication.explains(g0, s.target.namespace_generation()));
    assert_eq!(s.replication.dropped, [fn0.to_string()]);

    // No other core serving replicas: applied at once, nothing staged.
    let mut one = Holder::new("keel.ns=ram:4,ram:4 keel.ip=127.0.0.1/8");
    push_add_3_remove_2(&mut one);
    assert!(!one.s.replication.pending());
    assert_eq!(nsids(&one.s.target), [1, 3]);
}

/// A namespace added live in a QoS group is followed like any other: with namespace 1 in
/// group `old` (4000 IOPS) at boot, a push adding namespace 3 in `old` and namespace 4 in
/// `new` (a group new in the push, 3000 IOPS) stages both (`ReplicaOp::Add` with the group's
/// definition) and drops nothing; core 1's replica applying them has both namespaces in their
/// groups, the new group's limiter under the same key as core 0's (`keel_controller::group_key`),
/// and the two split its limits through the demand table; core 0's description of what the
/// other cores serve has both groups, so a later push changing `new`'s limits reaches the
/// replica's limiter (`ReplicaOp::Qos`) and the subsystem stays spread.
#[test]
fn a_namespace_added_live_in_a_qos_group_reaches_every_core() {
    use crate::replica::ReplicaOp;
    use keel_mgmt::Device as _;
    use keel_provision::{NamespaceQos, QosGroup, QosLimits, QosRate};
    let nqn = crate::config::DEFAULT_NQN;
    let rate = |per_sec| QosLimits {
        iops: Some(QosRate {
            per_sec,
            burst: None,
        }),
        ..Default::default()
    };
    let in_group = |nsid: u32, g: &str| NamespaceQos {
        subsystem: nqn.into(),
        nsid,
        limits: QosLimits::default(),
        weight: 1,
        group: Some(g.into()),
    };
    let old = QosGroup {
        name: "old".into(),
        limits: rate(4000),
        weight: 0,
    };
    let (mut h, mut replica, mut shares) = replicated_with(|p| {
        p.qos.groups.push(old.clone());
        p.qos.namespaces.push(in_group(1, "old"));
    });
    assert_eq!(h.s.replicable[0].groups.len(), 1, "{:?}", h.s.replicable);
    let g0 = h.s.target.namespace_generation();
    let mut desc = h.s.plan.to_device();
    for nsid in [3, 4] {
        let mut n = desc.namespaces[0].clone();
        n.nsid = nsid;
        n.backend = keel_provision::Backend::Ram {
            size: 1 << 20,
            block_size: 512,
        };
        desc.namespaces.push(n);
    }
    desc.qos.namespaces.push(in_group(3, "old"));
    desc.qos.namespaces.push(in_group(4, "new"));
    desc.qos.groups.push(QosGroup {
        name: "new".into(),
        limits: rate(3000),
        weight: 0,
    });
    let r =
        h.s.push(&crate::tests::signed_bundle(&desc, h.s.plan.generation + 1))
            .expect("push");
    assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
    assert_eq!(r.added, [(nqn.to_string(), 3), (nqn.to_string(), 4)]);
    // Staged for every core, nothing dropped; core 0 unchanged until every core acked.
    assert!(
        h.s.replication.dropped.is_empty(),
        "the subsystem stays spread"
    );
    assert!(h.s.replication.follows(nqn));
    assert!(h.s.replication.pending());
    assert_eq!(nsids(&h.s.target), [1, 2]);
    // Core 0's description of what the others serve has them, and both groups.
    let d = &h.s.replicable[0];
    let described: Vec<u32> = d.namespaces.iter().map(|n| n.nsid).collect();
    assert_eq!(described, [1, 2, 3, 4]);
    let groups: Vec<&str> = d.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(groups, ["old", "new"]);
    let t = now();
    let changes = h.s.replication.take_unsent(t, 0b10);
    assert_eq!(changes.len(), 2, "{changes:?}");
    // (NSID, its group's name and IOPS limit as the change carries them).
    let staged: Vec<(u32, &str, Option<keel_qos::Rate>)> = changes
        .iter()
        .map(|c| match &c.op {
            ReplicaOp::Add { ns, group: Some(g) } => {
                assert_eq!(ns.qos.group.as_deref(), Some(g.name.as_str()));
                (ns.nsid, g.name.as_str(), g.limits.iops)
            }
            op => panic!("{op:?}"),
        })
        .collect();
    assert_eq!(
        staged,
        [
            (3, "old", Some(keel_qos::Rate::new(4000))),
            (4, "new", Some(keel_qos::Rate::new(3000))),
        ]
    );
    for c in &changes {
        assert!(crate::services::apply_replica_change(
            &mut replica,
            &mut shares,
            c,
            &mut |_, _| None
        ));
        h.s.replication.ack(c.seq, 1, true);
    }
    assert_eq!(nsids(&replica), [1, 2, 3, 4], "the replica first");
    assert!(h.s.finish_replicated(t));
    assert_eq!(nsids(&h.s.target), [1, 2, 3, 4]);
    assert!(!h.s.replication.pending());
    assert!(h.s.replication.dropped.is_empty());
    assert!(h.s.replication.follows(nqn));
    assert!(
        h.s.replication
            .explains(g0, h.s.target.namespace_generation())
    );
    // Both namespaces in their groups on both cores.
    let grouped = |t: &keel_controller::Target| {
        let mut v: Vec<(u32, Option<String>)> = t
            .namespace_views()
            .map(|n| (n.nsid, n.qos_config.group.clone()))
            .collect();
        v.sort_unstable();
        v
    };
    let want = [
        (1, Some("old".to_string())),
        (2, None),
        (3, Some("old".to_string())),
        (4, Some("new".to_string())),
    ];
    assert_eq!(grouped(&h.s.target), want);
    assert_eq!(grouped(&replica), want);
    // The groups' limiters under the same keys on both cores, split through the table.
    let (kold, knew) = (
        keel_controller::group_key("old"),
        keel_controller::group_key("new"),
    );
    let keys = |v: &[keel_controller::SharedLimit]| {
        let mut k: Vec<u32> = v.iter().map(|l| l.key).collect();
        k.sort_unstable();
        k
    };
    let mut both = [kold, knew];
    both.sort_unstable();
    let on0: Vec<_> = h.s.target.shared_limits().collect();
    let on1: Vec<_> = replica.shared_limits().collect();
    assert_eq!(keys(&on0), both);
    assert_eq!(keys(&on1), both, "the replica has the new group's limiter");
    let limiter = |v: &[keel_controller::SharedLimit], k| {
        v.iter().find(|l| l.key == k).expect("limited").limiter
    };
    let (new0, new1) = (limiter(&on0, knew), limiter(&on1, knew));
    let iops = |t: &keel_controller::Target, l| t.limits_in_force(l).iops.unwrap().per_sec;
    assert_eq!(
        (iops(&h.s.target, new0), iops(&replica, new1)),
        (3000, 3000)
    );
    let table: Vec<crate::shares::DemandRow> = (0..crate::shares::DEMAND_ROWS)
        .map(|_| crate::shares::DemandRow::new())
        .collect();
    let mut x0 = crate::shares::LimitSharing::new(crate::shares::demand_row(0, false));
    let mut x1 = crate::shares::LimitSharing::new(crate::shares::demand_row(1, false));
    x0.tend(&table, 0b11, 0, &mut h.s.target);
    assert_eq!(x1.tend(&table, 0b11, 0, &mut replica), 2);
    assert_eq!(x0.tend(&table, 0b11, 0, &mut h.s.target), 2);
    assert_eq!(
        (iops(&h.s.target, new0), iops(&replica, new1)),
        (1500, 1500),
        "both idle: even parts of the new group's limits"
    );

    // A later push lowering the new group's limits reaches the replica's same limiter.
    desc.qos
        .groups
        .iter_mut()
        .find(|g| g.name == "new")
        .unwrap()
        .limits = rate(1000);
    h.s.push(&crate::tests::signed_bundle(&desc, h.s.plan.generation + 1))
        .expect("push");
    assert!(h.s.replication.dropped.is_empty());
    let t = now();
    let changes = h.s.replication.take_unsent(t, 0b10);
    assert_eq!(changes.len(), 1, "{changes:?}");
    let ReplicaOp::Qos(q) = &changes[0].op else {
        panic!("{:?}", changes[0].op)
    };
    let names: Vec<&str> = q.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["old", "new"]);
    assert!(crate::services::apply_replica_change(
        &mut replica,
        &mut shares,
        &changes[0],
        &mut |_, _| None
    ));
    h.s.replication.ack(changes[0].seq, 1, true);
    assert!(h.s.finish_replicated(t));
    assert!(h.s.replication.dropped.is_empty());
    assert_eq!(
        limiter(&replica.shared_limits().collect::<Vec<_>>(), knew),
        new1
    );
    assert_eq!(
        grouped(&replica),
        want,
        "the namespaces stay in their groups"
    );
    let base = |t: &keel_controller::Target| {
        t.group_views()
            .find(|g| g.name == "new")
            .and_then(|g| g.qos.limits.iops)
    };
    assert_eq!(base(&replica), Some(keel_qos::Rate::new(1000)));
    assert_eq!(base(&h.s.target), Some(keel_qos::Rate::new(1000)));

    // A push adding namespace 5 to `old` and raising `old` to 6000 IOPS: the add carries the
    // new definition, which the replica takes with the namespace (its same limiter), and the
    // QoS change follows for the subsystem's other namespaces in `old`.
    let mut five = desc.namespaces[0].clone();
    five.nsid = 5;
    five.backend = keel_provision::Backend::Ram {
        size: 1 << 20,
        block_size: 512,
    };
    desc.namespaces.push(five);
    desc.qos.namespaces.push(in_group(5, "old"));
    desc.qos
        .groups
        .iter_mut()
        .find(|g| g.name == "old")
        .unwrap()
        .limits = rate(6000);
    h.s.push(&crate::tests::signed_bundle(&desc, h.s.plan.generation + 1))
        .expect("push");
    assert!(h.s.replication.dropped.is_empty());
    let t = now();
    let changes = h.s.replication.take_unsent(t, 0b10);
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(
        matches!(&changes[0].op, ReplicaOp::Add { ns, group: Some(g) }
        if ns.nsid == 5 && g.name == "old" && g.limits.iops == Some(keel_qos::Rate::new(6000)))
    );
    assert!(matches!(&changes[1].op, ReplicaOp::Qos(_)));
    let old_base = |t: &keel_controller::Target| {
        t.group_views()
            .find(|g| g.name == "old")
            .and_then(|g| g.qos.limits.iops)
    };
    let old1 = limiter(&replica.shared_limits().collect::<Vec<_>>(), kold);
    assert_eq!(old_base(&replica), Some(keel_qos::Rate::new(4000)));
    assert!(crate::services::apply_replica_change(
        &mut replica,
        &mut shares,
        &changes[0],
        &mut |_, _| None
    ));
    assert_eq!(
        old_base(&replica),
        Some(keel_qos::Rate::new(6000)),
        "the add brought the group's new limits"
    );
    assert_eq!(
        limiter(&replica.shared_limits().collect::<Vec<_>>(), kold),
        old1
    );
    assert!(crate::services::apply_replica_change(
        &mut replica,
        &mut shares,
        &changes[1],
        &mut |_, _| None
    ));
    for c in &changes {
        h.s.replication.ack(c.seq, 1, true);
    }
    assert!(h.s.finish_replicated(t));
    assert!(!h.s.replication.pending());
    assert!(h.s.replication.dropped.is_empty());
    assert_eq!(nsids(&h.s.target), [1, 2, 3, 4, 5]);
    assert_eq!(nsids(&replica), [1, 2, 3, 4, 5]);
    assert_eq!(grouped(&replica), grouped(&h.s.target));
    assert_eq!(old_base(&h.s.target), Some(keel_qos::Rate::new(6000)));
    assert_eq!(old_base(&replica), Some(keel_qos::Rate::new(6000)));
    assert_eq!(
        base(&replica),
        Some(keel_qos::Rate::new(1000)),
        "`new` as it was"
    );
}

/// Issue 17, an emulated function on a remote volume: its subsystem is listed for the
/// functions' pairs on every core only once the NVMe/TCP planes serve it with lanes (core
/// `k`'s functions' replica shares its plane's lane); without lanes (`--smp N` on user
/// networking: no network stack on the other cores) its queues stay on core 0. The replica
/// is built without the remote namespace (added with the lane).
#[test]
fn a_function_on_a_remote_volume_is_spread_only_with_lanes() {
    let args = "keel.fn.ns=remote:10.0.0.9:4420:nqn.2026-11.dev.keel:pool:1 keel.ip=127.0.0.1/8";
    let mut s = with_windows(args, 1, crate::services::RamSharing::All);
    let fn0 = "nqn.2026-11.dev.keel:fn0";
    assert!(
        s.replicable.iter().any(|r| r.nqn == fn0),
        "{:?}",
        s.replicable
    );
    assert!(
        s.function_replicas().is_empty(),
        "no lanes: the function's queues stay on core 0"
    );
    // As `percore::Holder::start` leaves it with one other core serving NVMe/TCP.
    s.replication.lanes = 1;
    s.replication.subsystems = alloc::vec![String::from(fn0)];
    let listed = s.function_replicas();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].nqn, fn0);
    assert!(matches!(
        listed[0].namespaces[0].source,
        crate::services::ReplicaSource::Remote { .. }
    ));
    let replica = replica_target(listed, *s.target.limits(), &mut |_, _| None).expect("replica");
    assert_eq!(
        replica.namespace_views().count(),
        0,
        "the remote namespace comes with the lane"
    );
    // A subsystem the planes do not serve (dropped, or never replicable) stays on core 0.
    s.replication.subsystems.clear();
    assert!(s.function_replicas().is_empty());
}

/// A core that cannot serve a remote volume's namespaces through its lane
/// (`Msg::RemoteReady` with `ok: false`): for a boot volume every adoption ends (the holder's
/// answer) and the subsystems on it, an emulated function's among them, are dropped, so the
/// function's pairs come home (its replica there may lack the namespace); for a pushed
/// volume or a round a push added, only the subsystems concerned fall back.
#[test]
fn a_lane_a_core_refuses_brings_the_functions_on_the_volume_home() {
    let args = "keel.fn.ns=remote:10.0.0.9:4420:nqn.2026-11.dev.keel:pool:1 keel.ip=127.0.0.1/8";
    let build = || {
        let mut s = with_windows(args, 1, crate::services::RamSharing::All);
        s.replication.functions = true;
        s
    };
    let fn0 = "nqn.2026-11.dev.keel:fn0";
    let changed = |s: &Services<TestHw>| {
        s.replication
            .fn_events
            .iter()
            .any(|e| matches!(e, crate::replica::FnEvent::Changed(n) if n == fn0))
    };
    // A boot volume.
    let mut s = build();
    let id = s
        .remotes
        .volumes
        .first()
        .expect("the function's remote volume")
        .id;
    s.remotes.volumes[0].lane_users = alloc::vec![(String::from(fn0), 1)];
    assert!(!changed(&s));
    assert!(
        s.lane_refused(id, 1, false, Vec::new()),
        "a boot volume: every adoption ends"
    );
    assert!(changed(&s), "the function's pairs come home");
    assert!(s.replication.dropped.iter().any(|n| n == fn0));
    assert!(s.remotes.volumes[0].lane_users.is_empty());
    // A pushed volume: only its users fall back, the holder's adoptions go on.
    let mut s = build();
    s.remotes.volumes[0].lane_users = alloc::vec![(String::from(fn0), 1)];
    assert!(!s.lane_refused(id, 1, true, Vec::new()));
    assert!(changed(&s));
    assert!(s.replication.dropped.iter().any(|n| n == fn0));
    // A round a push added on a running volume: only that round's subsystems.
    let mut s = build();
    let other = "nqn.2026-11.dev.keel:other";
    s.remotes.volumes[0].lane_users = alloc::vec![(String::from(fn0), 1), (String::from(other), 2)];
    assert!(!s.lane_refused(id, 1, false, alloc::vec![(String::from(other), 2)]));
    assert!(
        !changed(&s),
        "the function's namespace was not in the round"
    );
    assert!(s.replication.dropped.iter().any(|n| n == other));
    assert!(!s.replication.dropped.iter().any(|n| n == fn0));
    assert_eq!(
        s.remotes.volumes[0].lane_users,
        alloc::vec![(String::from(fn0), 1)]
    );
}

/// A namespace's own QoS limits and its group's no longer keep its subsystem on core 0: with
/// namespace 1 of `keel.ns=ram:4,ram:4` limited to 2000 IOPS, the subsystem is replicable, its
/// replica carries the limits, and core 0's target and the replica (another core's) publish the
/// namespace under the same key and split its limits through the demand table
/// (`crate::shares::LimitSharing`): even parts while both are idle, the whole limits to core 0
/// alone. A namespace in a group too: each replica has the group's limiter, split the same way.
#[test]
fn a_subsystem_with_namespace_and_group_limits_is_served_by_every_core_which_split_them() {
    use keel_provision::{NamespaceQos, QosGroup, QosLimits, QosRate};
    let args = "keel.ns=ram:4,ram:4 keel.ip=127.0.0.1/8";
    let build = |group: bool| {
        let cfg = crate::config::DevConfig::from_bootargs(args, [2, 0, 0, 0, 0, 1]);
        let mut plan = Plan::from_dev(
            &cfg,
            &[],
            0,
            Addressing::from_bootargs(args),
            PROVISION_PUBKEY,
        );
        plan.qos.namespaces.push(NamespaceQos {
            subsystem: crate::config::DEFAULT_NQN.into(),
            nsid: 1,
            limits: QosLimits {
                iops: Some(QosRate {
                    per_sec: 2000,
                    burst: None,
                }),
                ..Default::default()
            },
            weight: 1,
            group: group.then(|| "g".into()),
        });
        if group {
            plan.qos.groups.push(QosGroup {
                name: "g".into(),
                limits: QosLimits {
                    iops: Some(QosRate {
                        per_sec: 5000,
                        burst: None,
                    }),
                    ..Default::default()
                },
                weight: 0,
            });
        }
        Services::<TestHw>::build_with(
            plan,
            Vec::new(),
            Vec::new(),
            true,
            Identity::new(None, None),
            crate::services::RamSharing::All,
        )
    };
    let s = build(false);
    assert_eq!(s.replicable.len(), 1, "{:?}", s.replicable);
    let limits = s.replicable[0].namespaces[0].qos.limits;
    assert_eq!(limits.iops, Some(keel_qos::Rate::new(2000)));
    let mut replica = replica_target(s.replicable.clone(), *s.target.limits(), &mut |_, _| None)
        .expect("replica");
    let mut core0 = s.target;
    let key = keel_controller::limit_key(crate::config::DEFAULT_NQN, 1);
    let on0: Vec<_> = core0.shared_limits().collect();
    let on1: Vec<_> = replica.shared_limits().collect();
    assert_eq!((on0.len(), on1.len()), (1, 1), "namespace 1 only");
    assert_eq!((on0[0].key, on1[0].key), (key, key));
    let table: Vec<crate::shares::DemandRow> = (0..crate::shares::DEMAND_ROWS)
        .map(|_| crate::shares::DemandRow::new())
        .collect();
    let mut x0 = crate::shares::LimitSharing::new(crate::shares::demand_row(0, false));
    let mut x1 = crate::shares::LimitSharing::new(crate::shares::demand_row(1, false));
    let iops = |t: &keel_controller::Target, l| t.limits_in_force(l).iops.unwrap().per_sec;
    assert_eq!(x0.tend(&table, 0b11, 0, &mut core0), 0, "alone so far");
    assert_eq!(x1.tend(&table, 0b11, 0, &mut replica), 1);
    assert_eq!(x0.tend(&table, 0b11, 0, &mut core0), 1);
    assert_eq!(
        (iops(&core0, on0[0].limiter), iops(&replica, on1[0].limiter)),
        (1000, 1000),
        "both idle: even parts"
    );
    // Core 1 stops: core 0 takes the whole limits again.
    x0.tend(&table, 0b01, 0, &mut core0);
    assert_eq!(iops(&core0, on0[0].limiter), 2000);
    // Reports show the configured limits, not the part.
    x0.tend(&table, 0b11, 0, &mut core0);
    assert_eq!(iops(&core0, on0[0].limiter), 1000);
    let v = core0.namespace_views().find(|v| v.nsid == 1).unwrap();
    assert_eq!(v.qos.limits.iops, Some(keel_qos::Rate::new(2000)));

    // In a group (5000 IOPS) too: the replica has the group's limiter, split the same way.
    let s = build(true);
    assert_eq!(s.replicable.len(), 1, "{:?}", s.replicable);
    assert_eq!(s.replicable[0].groups.len(), 1);
    let mut replica = replica_target(s.replicable.clone(), *s.target.limits(), &mut |_, _| None)
        .expect("replica");
    let mut core0 = s.target;
    let gkey = keel_controller::group_key("g");
    let on0: Vec<_> = core0.shared_limits().collect();
    let on1: Vec<_> = replica.shared_limits().collect();
    let keys = |v: &[keel_controller::SharedLimit]| v.iter().map(|l| l.key).collect::<Vec<_>>();
    assert_eq!(keys(&on0), [key, gkey]);
    assert_eq!(keys(&on1), [key, gkey]);
    let table: Vec<crate::shares::DemandRow> = (0..crate::shares::DEMAND_ROWS)
        .map(|_| crate::shares::DemandRow::new())
        .collect();
    let mut x0 = crate::shares::LimitSharing::new(crate::shares::demand_row(0, false));
    let mut x1 = crate::shares::LimitSharing::new(crate::shares::demand_row(1, false));
    x0.tend(&table, 0b11, 0, &mut core0);
    assert_eq!(x1.tend(&table, 0b11, 0, &mut replica), 2);
    assert_eq!(x0.tend(&table, 0b11, 0, &mut core0), 2);
    assert_eq!(
        (iops(&core0, on0[1].limiter), iops(&replica, on1[1].limiter)),
        (2500, 2500)
    );
}

#[test]
fn a_subsystem_with_host_limits_is_served_by_every_core_and_each_controller_s_limits_split() {
    use keel_provision::{HostQos, QosLimits, QosRate};
    let mut h = Holder::with("keel.ram=16 keel.ip=127.0.0.1/8", |plan| {
        plan.qos.hosts.push(HostQos {
            hostnqn: "*".into(),
            limits: QosLimits {
                iops: Some(QosRate {
                    per_sec: 2000,
                    burst: None,
                }),
                ..Default::default()
            },
        });
    });
    assert_eq!(
        h.s.replicable.len(),
        1,
        "host rules leave the RAM subsystem served by every core"
    );
    let mut dev = secondary(&h);
    let nqn = crate::config::DEFAULT_NQN;
    let connect = |qid: u16, cntlid: u16| {
        let sqe = keel_nvme::fabrics::ConnectCommand {
            recfmt: 0,
            qid,
            sqsize: 31,
            cattr: 0,
            kato: if qid == 0 { 30_000 } else { 0 },
        }
        .to_sqe(0);
        let mut data = vec![0u8; keel_nvme::fabrics::ConnectData::SIZE];
        keel_nvme::fabrics::ConnectData::new([7; 16], cntlid, nqn, "nqn.2026-12.test:host")
            .write(&mut data);
        (sqe, data)
    };
    let mut admin = Queue::open(&mut dev, 51_100);
    let (sqe, data) = connect(0, CNTLID_DYNAMIC);
    let (cqe, _) = run(&mut dev, &mut h, &mut admin, sqe, Some(data));
    assert!(cqe.status.is_success(), "{:?}", cqe.status);
    let cntlid = cqe.dw0 as u16;
    let cc = keel_nvme::regs::Cc::new(true, 0, 0, 0, keel_nvme::regs::Cc::SHN_NONE, 6, 4);
    let sqe = keel_nvme::fabrics::PropertyCommand::set_sqe(
        0,
        keel_nvme::regs::offset::CC,
        keel_nvme::fabrics::PropertySize::Four,
        cc.0 as u64,
    );
    assert!(
        run(&mut dev, &mut h, &mut admin, sqe, None)
            .0
            .status
            .is_success()
    );
    let mut io = Queue::open(&mut dev, 51_101);
    let (sqe, data) = connect(1, cntlid);
    assert!(
        run(&mut dev, &mut h, &mut io, sqe, Some(data))
            .0
            .status
            .is_success()
    );
    assert_eq!(dev.services.target.controller_count(), 1, "adopted");
    // Core 0 is told the queue is served elsewhere (as `percore::Holder` does).
    for &(_, q, _) in &h.queues {
        if h.s.target.adoption(q).is_some() {
            h.s.target.served_elsewhere(q, true);
        }
    }
    let key = keel_controller::controller_key(nqn, cntlid);
    let on0: Vec<_> = h.s.target.shared_limits().collect();
    let on1: Vec<_> = dev.services.target.shared_limits().collect();
    let keys = |v: &[keel_controller::SharedLimit]| v.iter().map(|l| l.key).collect::<Vec<_>>();
    assert_eq!(keys(&on0), [key]);
    assert_eq!(
        keys(&on1),
        [key],
        "the replica's controller has the host's limits"
    );
    let iops = |t: &keel_controller::Target, l| t.limits_in_force(l).iops.unwrap().per_sec;
    assert_eq!(iops(&dev.services.target, on1[0].limiter), 2000);
    // Split by demand through the table, as the cores do.
    let table: Vec<crate::shares::DemandRow> = (0..crate::shares::DEMAND_ROWS)
        .map(|_| crate::shares::DemandRow::new())
        .collect();
    let mut x0 = crate::shares::LimitSharing::new(crate::shares::demand_row(0, false));
    let mut x1 = crate::shares::LimitSharing::new(crate::shares::demand_row(1, false));
    assert_eq!(x0.tend(&table, 0b11, 0, &mut h.s.target), 0, "alone so far");
    assert_eq!(x1.tend(&table, 0b11, 0, &mut dev.services.target), 1);
    assert_eq!(x0.tend(&table, 0b11, 0, &mut h.s.target), 1);
    assert_eq!(
        (
            iops(&h.s.target, on0[0].limiter),
            iops(&dev.services.target, on1[0].limiter)
        ),
        (1000, 1000),
        "both idle: even parts"
    );

    // A push lowering the host rule to 1000 IOPS: the subsystem stays spread, and the
    // replica's controller takes its controller's new limits (no new adoption).
    {
        use crate::replica::ReplicaOp;
        use keel_mgmt::Device as _;
        let r = &mut h.s.replication;
        r.cores = 0b10;
        r.subsystems = vec![nqn.to_string()];
        let mut desc = h.s.plan.to_device();
        desc.qos.hosts[0].limits.iops = Some(QosRate {
            per_sec: 1000,
            burst: None,
        });
        let r =
            h.s.push(&crate::tests::signed_bundle(&desc, h.s.plan.generation + 1))
                .expect("push");
        assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
        assert!(
            h.s.replication.dropped.is_empty(),
            "the subsystem stays spread"
        );
        let t = now();
        let changes = h.s.replication.take_unsent(t, 0b10);
        assert_eq!(changes.len(), 1);
        let ReplicaOp::Qos(q) = &changes[0].op else {
            panic!("{:?}", changes[0].op)
        };
        assert_eq!(q.hosts.as_ref().map(Vec::len), Some(1));
        assert_eq!(q.controllers.len(), 1);
        assert_eq!(q.controllers[0].0, cntlid);
        assert_eq!(q.controllers[0].1.iops.unwrap().per_sec, 1000);
        let mut shares = Vec::new();
        assert!(crate::services::apply_replica_change(
            &mut dev.services.target,
            &mut shares,
            &changes[0],
            &mut |_, _| None
        ));
        h.s.replication.ack(changes[0].seq, 1, true);
        assert!(h.s.finish_replicated(t));
        assert!(h.s.replication.dropped.is_empty());
        assert!(h.s.replication.follows(nqn));
        let on1b: Vec<_> = dev.services.target.shared_limits().collect();
        assert_eq!(keys(&on1b), [key], "the same key");
        assert_eq!(on1b[0].limiter, on1[0].limiter, "the same limiter");
        assert_eq!(
            iops(&dev.services.target, on1[0].limiter),
            500,
            "its part of the new limits at once"
        );
        assert_eq!(iops(&h.s.target, on0[0].limiter), 500);
        x1.tend(&table, 0b11, 0, &mut dev.services.target);
        x0.tend(&table, 0b11, 0, &mut h.s.target);
        assert_eq!(
            (
                iops(&h.s.target, on0[0].limiter),
                iops(&dev.services.target, on1[0].limiter)
            ),
            (500, 500)
        );
        // Alone, the replica's controller has the whole new limits.
        x1.tend(&table, 0b10, 0, &mut dev.services.target);
        assert_eq!(iops(&dev.services.target, on1[0].limiter), 1000);
    }
}

/// Issue 17, a live QoS change of a subsystem every core serves: a push giving namespace 1 a
/// 2000 IOPS limit and putting namespace 2 in a 5000 IOPS group does not drop the subsystem
/// to core 0: it is staged (`ReplicaOp::Qos`), the other core's replica applies it (the
/// namespace's and the group's limiters under the same keys as core 0's), core 0's
/// description follows; a second push lowering the limit to 1000 reaches the replica's same
/// limiter, whose part (half, split evenly while both idle) follows the new limit at once and
/// is re-split from it. A core that cannot apply it (it does not serve the subsystem) drops
/// that subsystem only.
#[test]
fn a_pushed_namespace_limit_reaches_every_core_and_its_subsystem_stays_spread() {
    use crate::replica::ReplicaOp;
    use keel_mgmt::Device as _;
    use keel_provision::{NamespaceQos, QosGroup, QosLimits, QosRate};
    let nqn = crate::config::DEFAULT_NQN;
    let (mut h, mut replica, mut shares) = replicated();
    let rate = |per_sec| QosLimits {
        iops: Some(QosRate {
            per_sec,
            burst: None,
        }),
        ..Default::default()
    };
    let push = |h: &mut Holder, ns1: u64, group: u64| {
        let mut desc = h.s.plan.to_device();
        desc.qos.namespaces = vec![
            NamespaceQos {
                subsystem: nqn.into(),
                nsid: 1,
                limits: rate(ns1),
                weight: 1,
                group: None,
            },
            NamespaceQos {
                subsystem: nqn.into(),
                nsid: 2,
                limits: QosLimits::default(),
                weight: 1,
                group: Some("g".into()),
            },
        ];
        desc.qos.groups = vec![QosGroup {
            name: "g".into(),
            limits: rate(group),
            weight: 0,
        }];
        let r =
            h.s.push(&crate::tests::signed_bundle(&desc, h.s.plan.generation + 1))
                .expect("push");
        assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
    };
    // Applies the staged change on core 1's replica (`ok`: it serves the subsystem) and
    // finishes it on core 0.
    let replicate = |h: &mut Holder,
                     replica: &mut keel_controller::Target,
                     shares: &mut crate::services::ReplicaShares,
                     ok: bool| {
        let t = now();
        let changes = h.s.replication.take_unsent(t, 0b10);
        assert_eq!(changes.len(), 1);
        let ReplicaOp::Qos(q) = &changes[0].op else {
            panic!("{:?}", changes[0].op)
        };
        assert_eq!(q.namespaces.len(), 2);
        assert_eq!(q.groups.len(), 1);
        assert!(q.hosts.is_none() && q.controllers.is_empty());
        let mut c = changes[0].clone();
        if !ok {
            c.subsystem = "nqn.2026-12.test:elsewhere".into();
        }
        assert_eq!(
            crate::services::apply_replica_change(replica, shares, &c, &mut |_, _| None),
            ok
        );
        h.s.replication.ack(c.seq, 1, ok);
        assert!(h.s.finish_replicated(t));
        assert!(!h.s.replication.pending());
    };
    push(&mut h, 2000, 5000);
    assert!(
        h.s.replication.dropped.is_empty(),
        "the subsystem stays spread"
    );
    assert!(h.s.replication.follows(nqn));
    assert!(h.s.replication.pending(), "staged for every core");
    replicate(&mut h, &mut replica, &mut shares, true);
    assert!(h.s.replication.dropped.is_empty());
    assert!(h.s.replication.follows(nqn));
    // Core 0's description follows (later replicas and added namespaces use it).
    let d = &h.s.replicable[0];
    assert_eq!(
        d.namespaces[0].qos.limits.iops,
        Some(keel_qos::Rate::new(2000))
    );
    assert_eq!(d.namespaces[1].qos.group.as_deref(), Some("g"));
    assert_eq!(d.groups.len(), 1);
    // The same limiters, under the same keys, on both.
    let key = keel_controller::limit_key(nqn, 1);
    let gkey = keel_controller::group_key("g");
    let keys = |v: &[keel_controller::SharedLimit]| v.iter().map(|l| l.key).collect::<Vec<_>>();
    let on0: Vec<_> = h.s.target.shared_limits().collect();
    let on1: Vec<_> = replica.shared_limits().collect();
    assert_eq!(keys(&on0), [key, gkey]);
    assert_eq!(keys(&on1), [key, gkey], "the replica has the new limits");
    let iops = |t: &keel_controller::Target, l| t.limits_in_force(l).iops.unwrap().per_sec;
    assert_eq!(
        (
            iops(&replica, on1[0].limiter),
            iops(&replica, on1[1].limiter)
        ),
        (2000, 5000)
    );
    // Split through the table as the cores do: even parts while both are idle.
    let table: Vec<crate::shares::DemandRow> = (0..crate::shares::DEMAND_ROWS)
        .map(|_| crate::shares::DemandRow::new())
        .collect();
    let mut x0 = crate::shares::LimitSharing::new(crate::shares::demand_row(0, false));
    let mut x1 = crate::shares::LimitSharing::new(crate::shares::demand_row(1, false));
    x0.tend(&table, 0b11, 0, &mut h.s.target);
    assert_eq!(x1.tend(&table, 0b11, 0, &mut replica), 2);
    assert_eq!(x0.tend(&table, 0b11, 0, &mut h.s.target), 2);
    assert_eq!(
        (
            iops(&h.s.target, on0[0].limiter),
            iops(&replica, on1[0].limiter)
        ),
        (1000, 1000)
    );
    // Lowered to 1000: the replica's part of the new limit at once, then re-split from it.
    push(&mut h, 1000, 5000);
    assert!(h.s.replication.dropped.is_empty());
    replicate(&mut h, &mut replica, &mut shares, true);
    let on1b: Vec<_> = replica.shared_limits().collect();
    assert_eq!(
        on1b,
        on1.iter()
            .map(|l| keel_controller::SharedLimit { demand: 0, ..*l })
            .collect::<Vec<_>>()
    );
    assert_eq!(iops(&replica, on1[0].limiter), 500);
    assert_eq!(
        replica
            .namespace_views()
            .find(|v| v.nsid == 1)
            .unwrap()
            .qos
            .limits
            .iops,
        Some(keel_qos::Rate::new(1000)),
        "the replica's namespace has the new limit"
    );
    x1.tend(&table, 0b11, 0, &mut replica);
    x0.tend(&table, 0b11, 0, &mut h.s.target);
    assert_eq!(
        (
            iops(&h.s.target, on0[0].limiter),
            iops(&replica, on1[0].limiter)
        ),
        (500, 500)
    );
    assert!(h.s.replication.dropped.is_empty());
    // A core that cannot apply it: that subsystem comes home.
    push(&mut h, 3000, 5000);
    replicate(&mut h, &mut replica, &mut shares, false);
    assert_eq!(h.s.replication.dropped, [nqn.to_string()]);
    assert!(!h.s.replication.follows(nqn));
}
