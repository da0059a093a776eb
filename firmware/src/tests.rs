//! Host tests of the services: configuration, plan, the wiring of the controller core with
//! its transports, the NVMe/TCP service over smoltcp's `Loopback` device (keel-nvmf-tcp's host
//! state machine on a client socket of the same interface is the peer), the management
//! endpoint, configuration copies in flash, challenges.

use crate::challenge::Challenges;
use crate::config::DevConfig;
use crate::hw::{DriveCtl, Flash, Hw, Nic};
use crate::mgmt::MgmtService;
use crate::net::{Addressing, NetStack};
use crate::plan::{Plan, Source};
use crate::provisioned::{Identity, PROVISION_PUBKEY, is_development_key};
use crate::services::{Services, WindowPort};
use keel_nvme::fabrics::{
    CNTLID_DYNAMIC, ConnectCommand, ConnectData, PropertyCommand, PropertySize,
};
use keel_nvme::identify::{IDENTIFY_LEN, IdentifyCommand, IdentifyController};
use keel_nvme::io::RwCommand;
use keel_nvme::regs::{Cc, offset};
use keel_nvme::{Cqe, IoOpcode};
use keel_nvme_pcie::{EndpointFunction, MemWindow, layout};
use keel_nvmf_tcp::{HostConfig, HostConnection, HostEvent};
use keel_storage::RamBackend;
use smoltcp::iface::SocketHandle;
use smoltcp::phy::{Loopback, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, Ipv4Address, Ipv4Cidr};
use std::cell::Cell;

thread_local! {
    static NOW: Cell<u64> = const { Cell::new(1_000_000) };
    static RANDOM: Cell<u64> = const { Cell::new(0x1234_5678) };
}

fn now() -> u64 {
    NOW.with(Cell::get)
}

fn advance(ns: u64) {
    NOW.with(|n| n.set(n.get() + ns));
}

/// The host as a board: smoltcp's loopback NIC, in-memory windows and flash, a clock the test
/// moves.
struct TestHw;

struct NoDrive;

impl DriveCtl for NoDrive {
    fn poll(&self, _now_ns: u64) -> bool {
        false
    }
    fn outstanding(&self) -> usize {
        0
    }
}

/// NOR flash in memory: erase sets bytes to FFh, programming can only clear bits.
struct RamFlash(Vec<u8>);

impl Flash for RamFlash {
    type Error = &'static str;
    fn read(&mut self, offset: usize, buf: &mut [u8]) -> Result<(), &'static str> {
        let src = self
            .0
            .get(offset..offset + buf.len())
            .ok_or("out of range")?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn erase(&mut self, offset: usize, len: usize) -> Result<(), &'static str> {
        if !offset.is_multiple_of(self.sector_size()) || !len.is_multiple_of(self.sector_size()) {
            return Err("unaligned erase");
        }
        self.0
            .get_mut(offset..offset + len)
            .ok_or("out of range")?
            .fill(0xFF);
        Ok(())
    }
    fn program(&mut self, offset: usize, data: &[u8]) -> Result<(), &'static str> {
        let dst = self
            .0
            .get_mut(offset..offset + data.len())
            .ok_or("out of range")?;
        for (d, s) in dst.iter_mut().zip(data) {
            *d &= *s;
        }
        Ok(())
    }
    fn sector_size(&self) -> usize {
        keel_provision::flash::SECTOR_SIZE
    }
}

impl Nic for Loopback {
    fn mac(&self) -> [u8; 6] {
        [0x02, 0, 0, 0, 0, 0x01]
    }
}

impl Hw for TestHw {
    type Nic = Loopback;
    type Window = MemWindow;
    type DriveCtl = NoDrive;
    type DriveNs = RamBackend;
    type Flash = RamFlash;
    const BOARD: &'static str = "host-test";

    fn now_ns() -> u64 {
        now()
    }
    fn counter() -> u64 {
        now()
    }
    fn heap_free() -> usize {
        1 << 30
    }
    fn random() -> Option<u64> {
        RANDOM.with(|r| {
            let x = r.get().wrapping_mul(6364136223846793005).wrapping_add(1);
            r.set(x);
            Some(x)
        })
    }
    fn has_aes() -> bool {
        true
    }
    fn system_reset() -> ! {
        panic!("system reset")
    }
    fn cores() -> Vec<keel_mgmt::CoreInfo> {
        vec![keel_mgmt::CoreInfo {
            index: 0,
            role: "test".into(),
            passes: 1,
            ..Default::default()
        }]
    }
}

const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const LOCAL: Ipv4Address = Ipv4Address::new(127, 0, 0, 1);

fn dev_plan(args: &str, windows: usize) -> Plan {
    let cfg = DevConfig::from_bootargs(args, MAC);
    Plan::from_dev(
        &cfg,
        &[],
        windows,
        Addressing::from_bootargs(args),
        PROVISION_PUBKEY,
    )
}

fn services(args: &str, windows: Vec<MemWindow>) -> Services<TestHw> {
    let plan = dev_plan(args, windows.len());
    let windows = windows
        .into_iter()
        .enumerate()
        .map(|(i, w)| WindowPort {
            base: 0x1000_0000 * (i as u64 + 1),
            size: w.size() as u64,
            ep: Ok(w),
        })
        .collect();
    Services::build(plan, Vec::new(), windows, true, Identity::new(None, None))
}

fn loopback_stack() -> NetStack<TestHw> {
    NetStack::new(
        Loopback::new(Medium::Ethernet),
        Addressing::Static(Ipv4Cidr::new(LOCAL, 8), None),
        now(),
        7,
    )
}

/// The device side: its network stack and services, advanced one pass at a time as the poll
/// loop does.
struct Device {
    net: NetStack<TestHw>,
    services: Services<TestHw>,
    mgmt: Option<MgmtService>,
}

impl Device {
    fn new(args: &str) -> Self {
        let mut net = loopback_stack();
        let services = services(args, Vec::new());
        net.listen(4420);
        net.listen(8009);
        Device {
            net,
            services,
            mgmt: None,
        }
    }

    fn pass(&mut self) {
        advance(10_000);
        let t = now();
        self.net.poll(t);
        if let Some(m) = self.mgmt.as_mut() {
            m.poll(t, &mut self.net, &mut self.services);
        }
        self.services.poll(t, Some(&mut self.net));
        self.net.poll(t);
    }

    fn client_socket(&mut self, port: u16, local_port: u16) -> SocketHandle {
        let rx = tcp::SocketBuffer::new(vec![0u8; 256 * 1024]);
        let tx = tcp::SocketBuffer::new(vec![0u8; 256 * 1024]);
        let mut s = tcp::Socket::new(rx, tx);
        // Like a host's stack: no 10 ms delayed ACK on the device's 10 µs passes.
        s.set_ack_delay(None);
        s.set_nagle_enabled(false);
        let h = self.net.sockets.add(s);
        let cx = self.net.iface.context();
        self.net
            .sockets
            .get_mut::<tcp::Socket>(h)
            .connect(cx, (IpAddress::Ipv4(LOCAL), port), local_port)
            .expect("connect");
        h
    }
}

/// An NVMe/TCP queue of a host: a client socket of the device's own interface and
/// keel-nvmf-tcp's host state machine.
struct Queue {
    sock: SocketHandle,
    host: HostConnection<Vec<u8>>,
}

impl Queue {
    fn open(dev: &mut Device, local_port: u16) -> Queue {
        let sock = dev.client_socket(4420, local_port);
        let host = HostConnection::new(HostConfig {
            slots: 32,
            ..HostConfig::default()
        })
        .unwrap();
        let mut q = Queue { sock, host };
        let mut connected = false;
        for _ in 0..1000 {
            q.pump(dev);
            if let Some(HostEvent::Connected { .. }) = q.host.poll_event() {
                connected = true;
                break;
            }
        }
        assert!(connected, "no ICResp");
        q
    }

    /// Moves bytes both ways and runs a device pass.
    fn pump(&mut self, dev: &mut Device) {
        let s = dev.net.sockets.get_mut::<tcp::Socket>(self.sock);
        while self.host.wants_transmit() && s.can_send() {
            let n = s
                .send(|out| {
                    let n = self.host.transmit(out);
                    (n, n)
                })
                .unwrap();
            if n == 0 {
                break;
            }
        }
        while s.can_recv() {
            let n = s
                .recv(|b| {
                    let n = self.host.recv(0, b);
                    (n, n)
                })
                .unwrap();
            if n == 0 {
                break;
            }
        }
        dev.pass();
    }

    /// One command to completion: the CQE and the data buffer.
    fn cmd(
        &mut self,
        dev: &mut Device,
        sqe: keel_nvme::Sqe,
        data: Option<Vec<u8>>,
    ) -> (Cqe, Option<Vec<u8>>) {
        let data = data.map(|d| {
            let n = d.len() as u32;
            (d, n)
        });
        let cid = self.host.submit(sqe.to_bytes(), data).expect("submit");
        for _ in 0..10_000 {
            self.pump(dev);
            while let Some(ev) = self.host.poll_event() {
                if let HostEvent::Completion { cid: c, cqe, buf } = ev
                    && c == cid
                {
                    return (Cqe::from_bytes(&cqe), buf);
                }
            }
        }
        panic!("command {cid} never completed");
    }

    fn connect(&mut self, dev: &mut Device, qid: u16, cntlid: u16, nqn: &str) -> u16 {
        let sqe = ConnectCommand {
            recfmt: 0,
            qid,
            sqsize: 31,
            cattr: 0,
            kato: if qid == 0 { 30_000 } else { 0 },
        }
        .to_sqe(0);
        let mut data = vec![0u8; ConnectData::SIZE];
        ConnectData::new([7; 16], cntlid, nqn, "nqn.2026-12.test:host").write(&mut data);
        let (cqe, _) = self.cmd(dev, sqe, Some(data));
        assert!(cqe.status.is_success(), "Connect: {:?}", cqe.status);
        cqe.dw0 as u16
    }
}

#[test]
fn nvme_tcp_service_serves_a_host_over_loopback() {
    let mut dev = Device::new("keel.ram=16");
    let nqn = crate::config::DEFAULT_NQN;
    let mut admin = Queue::open(&mut dev, 50_000);
    let cntlid = admin.connect(&mut dev, 0, CNTLID_DYNAMIC, nqn);
    assert_ne!(cntlid, CNTLID_DYNAMIC);
    // Enable, then Identify Controller: the subsystem of the development plan.
    let cc = Cc::new(true, 0, 0, 0, Cc::SHN_NONE, 6, 4);
    let (cqe, _) = admin.cmd(
        &mut dev,
        PropertyCommand::set_sqe(0, offset::CC, PropertySize::Four, cc.0 as u64),
        None,
    );
    assert!(cqe.status.is_success());
    let (cqe, _) = admin.cmd(
        &mut dev,
        PropertyCommand::get_sqe(0, offset::CSTS, PropertySize::Four),
        None,
    );
    assert_eq!(cqe.dw0 & 1, 1, "CSTS.RDY");
    let (cqe, buf) = admin.cmd(
        &mut dev,
        IdentifyCommand {
            cns: 1,
            cntid: 0,
            nsid: 0,
            csi: 0,
        }
        .to_sqe(0),
        Some(vec![0u8; IDENTIFY_LEN]),
    );
    assert!(cqe.status.is_success());
    let id = IdentifyController::decode(buf.unwrap()[..IDENTIFY_LEN].try_into().unwrap());
    assert_eq!(&id.subnqn[..nqn.len()], nqn.as_bytes());
    assert_eq!(id.cntlid, cntlid);

    // An I/O queue on a second connection: write 64 KiB, read it back.
    let mut io = Queue::open(&mut dev, 50_001);
    io.connect(&mut dev, 1, cntlid, nqn);
    let pattern: Vec<u8> = (0..65_536u32).map(|i| (i * 7 + 3) as u8).collect();
    let rw = RwCommand {
        slba: 100,
        nlb: 127,
        deac: false,
        fua: true,
        lr: false,
        prinfo: 0,
    };
    let (cqe, _) = io.cmd(
        &mut dev,
        rw.to_sqe(IoOpcode::Write as u8, 0, 1),
        Some(pattern.clone()),
    );
    assert!(cqe.status.is_success(), "Write: {:?}", cqe.status);
    let (cqe, buf) = io.cmd(
        &mut dev,
        rw.to_sqe(IoOpcode::Read as u8, 0, 1),
        Some(vec![0u8; 65_536]),
    );
    assert!(cqe.status.is_success(), "Read: {:?}", cqe.status);
    assert_eq!(buf.unwrap(), pattern);
    // Beyond the 16 MiB namespace: LBA Out of Range, and the service carries on.
    let (cqe, _) = io.cmd(
        &mut dev,
        RwCommand {
            slba: 32_768,
            nlb: 0,
            ..rw
        }
        .to_sqe(IoOpcode::Read as u8, 0, 1),
        Some(vec![0u8; 512]),
    );
    assert_eq!((cqe.status.sct, cqe.status.sc), (0, 0x80));
    assert_eq!(dev.services.nvmf.as_ref().unwrap().connections(), 2);
    // The host goes away abruptly: both connections and the controller are cleaned up.
    for q in [&io, &admin] {
        dev.net.sockets.get_mut::<tcp::Socket>(q.sock).abort();
    }
    for _ in 0..100 {
        dev.pass();
    }
    assert_eq!(dev.services.nvmf.as_ref().unwrap().connections(), 0);
    assert_eq!(dev.services.target.controller_count(), 0);
}

#[test]
fn nvme_tcp_service_refuses_garbage_with_a_termreq() {
    let mut dev = Device::new("");
    let sock = dev.client_socket(4420, 50_002);
    for _ in 0..50 {
        dev.pass();
    }
    // Not an ICReq: a CapsuleCmd first is a PDU sequence error (NVMe/TCP 1.0 §3.6.2.2):
    // C2HTermReq (type 03h), then the target closes.
    let mut bogus = [0u8; 72];
    bogus[0] = 0x04;
    bogus[2] = 72;
    bogus[4] = 72;
    dev.net
        .sockets
        .get_mut::<tcp::Socket>(sock)
        .send_slice(&bogus)
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..200 {
        dev.pass();
        let s = dev.net.sockets.get_mut::<tcp::Socket>(sock);
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
    }
    assert_eq!(got.first(), Some(&0x03), "C2HTermReq expected, got {got:?}");
    let s = dev.net.sockets.get::<tcp::Socket>(sock);
    assert!(!s.may_recv() || s.state() != tcp::State::Established);
    assert_eq!(dev.services.nvmf.as_ref().unwrap().connections(), 0);
}

#[test]
fn management_endpoint_serves_metrics_over_loopback() {
    let mut dev = Device::new("keel.ram=8");
    dev.mgmt = Some(MgmtService::start(7000, &mut dev.net));
    let sock = dev.client_socket(7000, 50_003);
    for _ in 0..20 {
        dev.pass();
    }
    dev.net
        .sockets
        .get_mut::<tcp::Socket>(sock)
        .send_slice(b"GET /metrics HTTP/1.0\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..200 {
        dev.pass();
        let s = dev.net.sockets.get_mut::<tcp::Socket>(sock);
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    assert!(
        text.contains("subsystem=\"nqn.2026-11.dev.keel:default\""),
        "{text}"
    );
}

#[test]
fn development_plan_from_boot_arguments() {
    let p = dev_plan(
        "keel.ram=16,32 keel.nqn=nqn.2026-12.test:a keel.allow=nqn.h1,nqn.h2 keel.ip=10.0.0.5/24 keel.gw=10.0.0.1 keel.advertise=192.0.2.1:4420",
        2,
    );
    assert_eq!(p.source, Source::BootArgs);
    let nqns: Vec<&str> = p.subsystems.iter().map(|s| s.nqn.as_str()).collect();
    assert_eq!(
        nqns,
        [
            "nqn.2026-12.test:a",
            "nqn.2026-11.dev.keel:fn0",
            "nqn.2026-11.dev.keel:fn1"
        ]
    );
    assert_eq!(p.subsystems[0].allowed_hosts, ["nqn.h1", "nqn.h2"]);
    let tcp: Vec<u32> = p
        .namespaces
        .iter()
        .filter(|n| n.subsystem == "nqn.2026-12.test:a")
        .map(|n| n.nsid)
        .collect();
    assert_eq!(tcp, [1, 2]);
    assert_eq!(p.function_subsystem(1), Some("nqn.2026-11.dev.keel:fn1"));
    assert_eq!(
        p.advertise,
        Some(("192.0.2.1".to_string(), "4420".to_string()))
    );
    assert!(matches!(p.addressing, Addressing::Static(..)));
    // Keys never show in what is printed of the arguments.
    let args = "keel.xts=1:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    assert!(!crate::config::redacted(args).contains("0011223344"));
}

#[test]
fn services_build_an_emulated_function_per_window() {
    let s = services(
        "keel.fn.ram=4",
        vec![MemWindow::new(1 << 20), MemWindow::new(1 << 20)],
    );
    assert_eq!(s.functions(), 2);
    for (i, f) in s.functions.iter().enumerate() {
        // Published for the host: the header with the function's index, CAP and VS written.
        let mut w = f.ep.clone();
        let hdr: [u8; layout::header::SIZE] = w.bytes()
            [layout::HEADER_OFFSET..layout::HEADER_OFFSET + layout::header::SIZE]
            .try_into()
            .unwrap();
        let h = layout::Header::decode(&hdr, w.size() as u64).expect("header published");
        assert_eq!(h.function, i as u16);
        assert_ne!(w.read_reg(offset::VS), 0);
        assert_eq!(f.nqn, format!("nqn.2026-11.dev.keel:fn{i}"));
    }
    // Each function's subsystem has its own 4 MiB namespace.
    let sizes: Vec<u64> = s
        .target
        .namespace_views()
        .map(|n| n.geometry.blocks * u64::from(n.geometry.block_size))
        .collect();
    assert!(
        sizes.iter().filter(|&&b| b == 4 << 20).count() >= 2,
        "{sizes:?}"
    );
}

#[test]
fn configuration_copies_fall_back_and_alternate() {
    assert!(
        is_development_key(),
        "the default build trusts the development key"
    );
    let mut id: Identity<RamFlash> = Identity::new(
        None,
        Some(RamFlash(vec![0xFF; keel_provision::flash::FLASH_SIZE])),
    );
    assert!(id.load_config().is_none(), "blank flash: no configuration");
    let b1 = dev_bundle(1);
    let b2 = dev_bundle(2);
    let (c1, s1) = id.persist(&b1).unwrap();
    let (c2, s2) = id.persist(&b2).unwrap();
    assert_ne!(c1, c2, "a new copy never overwrites the copy in force");
    assert!(s2 > s1);
    let (cfg, src) = id.load_config().unwrap();
    assert_eq!(cfg.generation, 2);
    assert!(matches!(src, Source::Flash(..)));
    // Damage the newer copy: the older one is in force again.
    let flash = id.flash.as_mut().unwrap();
    let off = c2.offset() + 100;
    flash.0[off] ^= 0x55;
    let (cfg, _) = id.load_config().unwrap();
    assert_eq!(cfg.generation, 1);
}

#[test]
fn health_records_count_power_cycles_and_unsafe_shutdowns() {
    use crate::health::{CHECKPOINT_NS, HealthLog};
    use keel_provision::flash::{FLASH_SIZE, HEALTH_OFFSET, HEALTH_SIZE};
    const S: u64 = 1_000_000_000;
    // QEMU's pflash with no file behind it reads as zeroes: the area is erased first.
    let mut flash = RamFlash(vec![0; FLASH_SIZE]);
    let (mut log, h) = HealthLog::boot(Some(&mut flash), 5 * S);
    assert_eq!(
        (h.power_cycles, h.unsafe_shutdowns, h.power_on_ns),
        (1, 0, 0)
    );
    assert_eq!(h.since.as_nanos(), 5 * S);
    assert!(
        flash.0[..HEALTH_OFFSET].iter().all(|&b| b == 0),
        "only the health area"
    );
    assert!(
        flash.0[HEALTH_OFFSET + HEALTH_SIZE..]
            .iter()
            .all(|&b| b == 0)
    );
    // A checkpoint is written once 10 minutes have passed, not before.
    let before = flash.0.clone();
    log.tick(Some(&mut flash), 5 * S + CHECKPOINT_NS - 1);
    assert_eq!(flash.0, before);
    log.tick(Some(&mut flash), 5 * S + CHECKPOINT_NS + 30 * S);
    assert_ne!(flash.0, before);
    // Power lost (no shutdown record): the next boot counts an unsafe shutdown and keeps the
    // checkpointed time.
    let (mut log, h) = HealthLog::boot(Some(&mut flash), S);
    assert_eq!((h.power_cycles, h.unsafe_shutdowns), (2, 1));
    assert_eq!(h.power_on_ns, (CHECKPOINT_NS / S + 30) * S);
    // An orderly reboot: not unsafe, and the time up to it is kept.
    log.shutdown(Some(&mut flash), S + 3600 * S);
    let (_, h) = HealthLog::boot(Some(&mut flash), S);
    assert_eq!((h.power_cycles, h.unsafe_shutdowns), (3, 1));
    assert_eq!(h.power_on_ns, (CHECKPOINT_NS / S + 30 + 3600) * S);
    // Without flash: this boot only.
    let (mut log, h) = HealthLog::boot::<RamFlash>(None, 7 * S);
    assert_eq!(
        (h.power_cycles, h.unsafe_shutdowns, h.power_on_ns),
        (1, 0, 0)
    );
    log.shutdown::<RamFlash>(None, 8 * S);
    // A flash that refuses writes: counted as this boot only, no panic.
    let mut tiny = RamFlash(vec![0xFF; 16]);
    let (_, h) = HealthLog::boot(Some(&mut tiny), 0);
    assert_eq!(h.power_cycles, 1);
}

/// A bundle of `generation` signed with the public development key (qemu/dev-keys).
fn dev_bundle(generation: u64) -> Vec<u8> {
    use keel_provision::{Backend, Encryption, Namespace, Network, Subsystem};
    let key = include_str!("../../qemu/dev-keys/provision.key");
    let hex = key
        .trim()
        .strip_prefix("keel-signing-key ")
        .expect("dev key file");
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    let signing = keel_provision::ed25519_dalek::SigningKey::from_bytes(&seed);
    let nqn = String::from("nqn.2026-12.test:vol");
    let device = keel_provision::Device {
        network: Network::Dhcp,
        subsystems: vec![Subsystem {
            nqn: nqn.clone(),
            serial: Some("T1".into()),
            model: None,
            allowed_hosts: vec![],
        }],
        namespaces: vec![Namespace {
            subsystem: nqn,
            nsid: 1,
            backend: Backend::Ram {
                size: 1 << 20,
                block_size: 512,
            },
            encryption: Encryption::None,
            function: None,
        }],
        management: None,
    };
    let mut counter = 0u8;
    keel_provision::bundle::build(
        &device,
        generation,
        &signing,
        &keel_provision::DeviceKey::from_bytes([0; 32]),
        &mut |b: &mut [u8]| {
            for x in b {
                counter = counter.wrapping_add(1);
                *x = counter;
            }
        },
    )
    .expect("bundle")
}

#[test]
fn challenges_never_repeat() {
    let mut c: Challenges<TestHw> = Challenges::new(None);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10_000 {
        assert!(seen.insert(c.next()));
    }
    // Another boot with the same clock and device key still draws different ones (RNDR).
    let mut d: Challenges<TestHw> = Challenges::new(None);
    assert!(!seen.contains(&d.next()));
}
