//! The remote volume as a namespace of Keel's own controller core (the gateway and SNAP
//! patterns): a host's commands on a local controller of a front-end `Target` reach a remote
//! Keel target through the volume; when the remote is gone for longer than `ctrl_loss_tmo`
//! the host sees a path related status (Controller Pathing Error, DNR).

mod common;
use common::*;
use keel_controller::{
    Event, Instant, NamespaceConfig, PropertySize, QueueId, Request, Response, SubsystemConfig,
    Target, TargetConfig,
};
use keel_nvme::cqe::{path, sct};
use keel_nvme::io::{FeaturesCommand, RwCommand, number_of_queues};
use keel_nvme::regs::{Cc, offset};
use keel_nvme::{FeatureId, IoOpcode, Sqe, Status};
use keel_storage::IoBuf;

const GW: &str = "nqn.2026-11.dev.keel:gateway";

struct Front {
    t: Target,
    io: QueueId,
    cookie: u32,
    done: Vec<Response>,
}

impl Front {
    fn new(rig: &mut Rig) -> Self {
        let backend = rig.be.take().expect("backend");
        let mut t = Target::new(TargetConfig {
            subsystems: vec![SubsystemConfig {
                nqn: GW.into(),
                serial: "KEELGW".into(),
                model: "Keel gateway".into(),
                allowed_hosts: Vec::new(),
                namespaces: vec![NamespaceConfig {
                    nsid: 1,
                    backend: Box::new(backend),
                    nguid: [1; 16],
                    uuid: [0; 16],
                    eui64: [0; 8],
                    qos: Default::default(),
                }],
            }],
            ..TargetConfig::default()
        })
        .unwrap();
        let now = Instant::from_nanos(rig.now);
        let admin = t.create_local_controller(now, GW, 0).unwrap();
        let cc = Cc::new(true, 0, 0, 0, Cc::SHN_NONE, 6, 4);
        t.property_set(now, admin, offset::CC, PropertySize::Four, cc.0 as u64)
            .unwrap();
        let sqe =
            FeaturesCommand::set_sqe(1, FeatureId::NumberOfQueues as u8, number_of_queues(0, 0));
        let r = t
            .submit(
                now,
                admin,
                Request {
                    sqe,
                    buf: None,
                    data_len: 0,
                    cookie: 0,
                },
            )
            .unwrap();
        assert!(r.cqe.status.is_success());
        let io = t.attach_local_io_queue(admin, 1, 15).unwrap();
        Self {
            t,
            io,
            cookie: 0,
            done: Vec::new(),
        }
    }

    fn submit(&mut self, rig: &Rig, op: IoOpcode, lba: u64, blocks: u32, b: IoBuf) -> u16 {
        self.cookie += 1;
        let cid = self.cookie as u16;
        let sqe: Sqe = RwCommand::simple(lba, blocks).to_sqe(op as u8, cid, 1);
        let len = blocks * 512;
        if let Some(r) = self.t.submit(
            Instant::from_nanos(rig.now),
            self.io,
            Request {
                sqe,
                buf: Some(b),
                data_len: len,
                cookie: self.cookie,
            },
        ) {
            self.done.push(r);
        }
        cid
    }

    fn wait(&mut self, rig: &mut Rig, cid: u16, limit_ms: u64) -> Response {
        let end = rig.now + limit_ms * MS;
        loop {
            if let Some(i) = self.done.iter().position(|r| r.cqe.cid == cid) {
                return self.done.swap_remove(i);
            }
            assert!(rig.now < end, "command {cid} did not complete");
            rig.step();
            let mut ev = Vec::new();
            self.t
                .poll(Instant::from_nanos(rig.now), &mut |e| ev.push(e));
            for e in ev {
                if let Event::Completion(_, r) = e {
                    self.done.push(r);
                }
            }
        }
    }
}

#[test]
fn a_host_reaches_the_remote_through_the_controller_core() {
    let mut disk = Disk::new(512, 4096);
    let mut net = SimNet::new(31);
    net.add(Server::new(vec![addr(1)], &disk, ServerCfg::default()));
    let mut rig = Rig::new(net, test_config(vec![addr(1)]));
    rig.connect();
    let mut front = Front::new(&mut rig);
    let data = pattern(3, 64, 8, 512);
    let cid = front.submit(&rig, IoOpcode::Write, 64, 8, buf_with(&data));
    let r = front.wait(&mut rig, cid, 1_000);
    assert_eq!(r.cqe.status, Status::SUCCESS);
    assert_eq!(disk.read(64, 8), data, "the write landed on the remote");
    let cid = front.submit(&rig, IoOpcode::Read, 64, 8, buf(4096));
    let r = front.wait(&mut rig, cid, 1_000);
    assert_eq!(r.cqe.status, Status::SUCCESS);
    assert_eq!(&r.buf.unwrap().as_slice()[..4096], &data[..]);
    // The remote goes away for good: after ctrl_loss_tmo (3 s) the host gets a path error.
    rig.net.set_alive(0, false);
    let cid = front.submit(&rig, IoOpcode::Read, 0, 1, buf(512));
    let r = front.wait(&mut rig, cid, 5_000);
    assert_eq!(r.cqe.status.sct, sct::PATH);
    assert_eq!(r.cqe.status.sc, path::CONTROLLER_PATHING_ERROR);
    assert!(r.cqe.status.dnr);
    // Later commands fail at once the same way.
    let cid = front.submit(&rig, IoOpcode::Write, 0, 1, buf(512));
    let r = front.wait(&mut rig, cid, 10);
    // The core logs the failure: the More bit is set too.
    let want = Status {
        more: true,
        ..Status::CONTROLLER_PATHING_ERROR
    };
    assert_eq!(r.cqe.status, want);
}
