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
use keel_nvme::{Cqe, IoOpcode, Sqe};
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

pub(crate) fn now() -> u64 {
    NOW.with(Cell::get)
}

pub(crate) fn advance(ns: u64) {
    NOW.with(|n| n.set(n.get() + ns));
}

/// The host as a board: smoltcp's loopback NIC, in-memory windows and flash, a clock the test
/// moves.
pub(crate) struct TestHw;

pub(crate) struct NoDrive;

impl DriveCtl for NoDrive {
    fn poll(&self, _now_ns: u64) -> bool {
        false
    }
    fn outstanding(&self) -> usize {
        0
    }
}

/// NOR flash in memory: erase sets bytes to FFh, programming can only clear bits.
pub(crate) struct RamFlash(Vec<u8>);

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

pub(crate) fn dev_plan(args: &str, windows: usize) -> Plan {
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
pub(crate) struct Device {
    pub(crate) net: NetStack<TestHw>,
    pub(crate) services: Services<TestHw>,
    mgmt: Option<MgmtService>,
}

impl Device {
    pub(crate) fn new(args: &str) -> Self {
        Self::with_windows(args, Vec::new())
    }

    fn with_windows(args: &str, windows: Vec<MemWindow>) -> Self {
        let mut net = loopback_stack();
        let services = services(args, windows);
        net.listen(4420);
        net.listen(8009);
        Device {
            net,
            services,
            mgmt: None,
        }
    }

    /// One pass as the poll loop makes it (`poll::pass`): receive, services, send.
    pub(crate) fn pass(&mut self) {
        advance(10_000);
        let t = now();
        self.net.poll_ingress(t);
        if let Some(m) = self.mgmt.as_mut() {
            m.poll(t, &mut self.net, &mut self.services);
        }
        self.services.poll(t, Some(&mut self.net));
        self.net.poll_egress(t);
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
pub(crate) struct Queue {
    pub(crate) sock: SocketHandle,
    pub(crate) host: HostConnection<Vec<u8>>,
}

impl Queue {
    pub(crate) fn open(dev: &mut Device, local_port: u16) -> Queue {
        Self::open_with(
            dev,
            local_port,
            HostConfig {
                slots: 32,
                ..HostConfig::default()
            },
        )
    }

    fn open_with(dev: &mut Device, local_port: u16, cfg: HostConfig) -> Queue {
        let sock = dev.client_socket(4420, local_port);
        let host = HostConnection::new(cfg).unwrap();
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
    pub(crate) fn pump(&mut self, dev: &mut Device) {
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
        self.cmd_with(dev, sqe, data, &mut |_| {})
    }

    /// [`Queue::cmd`], running `also` after each device pass.
    pub(crate) fn cmd_with(
        &mut self,
        dev: &mut Device,
        sqe: keel_nvme::Sqe,
        data: Option<Vec<u8>>,
        also: &mut dyn FnMut(&mut Device),
    ) -> (Cqe, Option<Vec<u8>>) {
        let data = data.map(|d| {
            let n = d.len() as u32;
            (d, n)
        });
        let cid = self.host.submit(sqe, data).expect("submit");
        for _ in 0..10_000 {
            self.pump(dev);
            also(dev);
            while let Some(ev) = self.host.poll_event() {
                if let HostEvent::Completion { cid: c, cqe, buf } = ev
                    && c == cid
                {
                    return (cqe, buf);
                }
            }
        }
        panic!("command {cid} never completed");
    }

    /// Sets CC.EN through this (admin) queue.
    fn enable(&mut self, dev: &mut Device) {
        let cc = Cc::new(true, 0, 0, 0, Cc::SHN_NONE, 6, 4);
        let (cqe, _) = self.cmd(
            dev,
            PropertyCommand::set_sqe(0, offset::CC, PropertySize::Four, cc.0 as u64),
            None,
        );
        assert!(cqe.status.is_success(), "CC.EN: {:?}", cqe.status);
    }

    fn connect(&mut self, dev: &mut Device, qid: u16, cntlid: u16, nqn: &str) -> u16 {
        self.connect_with(dev, qid, cntlid, nqn, 0)
    }

    fn connect_with(
        &mut self,
        dev: &mut Device,
        qid: u16,
        cntlid: u16,
        nqn: &str,
        cattr: u8,
    ) -> u16 {
        let sqe = ConnectCommand {
            recfmt: 0,
            qid,
            sqsize: 31,
            cattr,
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
    admin.enable(&mut dev);
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

/// RAM namespaces move data without pool buffers: 4 KiB in-capsule writes run from the receive
/// window, reads land in the transmit window (with SQ flow control disabled, as one C2HData
/// with SUCCESS: the host synthesises the CQE, SQID 0); with digests too. An AES-XTS namespace
/// reads that way and writes through a buffer (the ciphertext needs its own memory).
#[test]
fn ram_data_moves_between_namespace_and_sockets_without_pool_buffers() {
    use keel_nvme::fabrics::CATTR_DISABLE_SQ_FLOW_CONTROL;
    use keel_nvmf_tcp::Digests;
    let key: String = (0..64u8).map(|i| format!("{:02x}", i * 3 + 1)).collect();
    let xts = format!("keel.ram=16 keel.xts=1:{key}");
    let cases = [
        ("keel.ram=16", Digests::default(), false, true),
        ("keel.ram=16", Digests::default(), true, true),
        (
            "keel.ram=16",
            Digests {
                header: true,
                data: true,
            },
            true,
            true,
        ),
        (xts.as_str(), Digests::default(), true, false),
    ];
    for (args, digests, fc_off, direct_writes) in cases {
        let mut dev = Device::new(args);
        let nqn = crate::config::DEFAULT_NQN;
        let mut admin = Queue::open(&mut dev, 50_000);
        let cntlid = admin.connect(&mut dev, 0, CNTLID_DYNAMIC, nqn);
        admin.enable(&mut dev);
        let cfg = HostConfig {
            slots: 32,
            digests,
            sq_flow_control_disabled: fc_off,
            ..HostConfig::default()
        };
        let mut io = Queue::open_with(&mut dev, 50_001, cfg);
        let cattr = if fc_off {
            CATTR_DISABLE_SQ_FLOW_CONTROL
        } else {
            0
        };
        io.connect_with(&mut dev, 1, cntlid, nqn, cattr);
        let mut pattern = vec![0u8; 4096];
        for k in 0..4u32 {
            let rw = RwCommand {
                slba: 8 + 8 * k as u64,
                nlb: 7,
                deac: false,
                fua: false,
                lr: false,
                prinfo: 0,
            };
            pattern.iter_mut().enumerate().for_each(|(i, b)| {
                *b = (i as u32 * 31 + k) as u8;
            });
            let (cqe, _) = io.cmd(
                &mut dev,
                rw.to_sqe(IoOpcode::Write as u8, 0, 1),
                Some(pattern.clone()),
            );
            assert!(cqe.status.is_success(), "{args}: write: {:?}", cqe.status);
            let (cqe, buf) = io.cmd(
                &mut dev,
                rw.to_sqe(IoOpcode::Read as u8, 0, 1),
                Some(vec![0u8; 4096]),
            );
            assert!(cqe.status.is_success(), "{args}: read: {:?}", cqe.status);
            assert_eq!(buf.unwrap(), pattern, "{args}: read back");
            // SUCCESS: no CQE on the wire, the host's own has SQID 0 and SQHD 0.
            let want_sqid = if fc_off { 0 } else { 1 };
            assert_eq!(cqe.sqid, want_sqid, "{args}: {digests:?}");
        }
        let s = dev.services.nvmf.as_ref().unwrap();
        let writes = if direct_writes { 4 } else { 0 };
        assert_eq!(
            s.direct,
            crate::nvmf::DirectCounts { reads: 4, writes },
            "{args}: {digests:?}"
        );
        let (free, all) = s.buffers();
        assert_eq!(free, all);
    }
}

/// 128 KiB reads at QD8 from a RAM namespace all run in the socket's transmit ring, none
/// through a pool buffer: where the ring's free space wraps to its start the data goes on
/// there (smoltcp's `send_wrapped`, `NowData::ReadSplit`), and a read that finds too little
/// room waits for it. 24 reads of 128 KiB go through a 260 KiB ring many times over, at
/// every offset the stream reaches, with and without SQ flow control and with digests;
/// every byte read back is checked.
#[test]
fn large_reads_at_qd8_all_run_in_the_transmit_ring() {
    use keel_nvme::fabrics::CATTR_DISABLE_SQ_FLOW_CONTROL;
    use keel_nvmf_tcp::Digests;
    const BLOCKS: u32 = 256; // 128 KiB of 512-byte blocks
    const LEN: usize = 128 * 1024;
    let data_of = |k: u64| -> Vec<u8> {
        (0..LEN)
            .map(|i| (i as u64 * 7 + k * 13 + (i as u64 >> 9)) as u8)
            .collect()
    };
    for (fc_off, digests) in [
        (false, Digests::default()),
        (true, Digests::default()),
        (
            false,
            Digests {
                header: true,
                data: true,
            },
        ),
    ] {
        let mut dev = Device::new("keel.ram=16");
        let nqn = crate::config::DEFAULT_NQN;
        let mut admin = Queue::open(&mut dev, 50_010);
        let cntlid = admin.connect(&mut dev, 0, CNTLID_DYNAMIC, nqn);
        admin.enable(&mut dev);
        let cfg = HostConfig {
            slots: 32,
            digests,
            sq_flow_control_disabled: fc_off,
            ..HostConfig::default()
        };
        let mut io = Queue::open_with(&mut dev, 50_011, cfg);
        let cattr = if fc_off {
            CATTR_DISABLE_SQ_FLOW_CONTROL
        } else {
            0
        };
        io.connect_with(&mut dev, 1, cntlid, nqn, cattr);
        let rw = |k: u64| RwCommand {
            slba: k * u64::from(BLOCKS),
            nlb: (BLOCKS - 1) as u16,
            deac: false,
            fua: false,
            lr: false,
            prinfo: 0,
        };
        for k in 0..8 {
            let sqe = rw(k).to_sqe(IoOpcode::Write as u8, 0, 1);
            let (cqe, _) = io.cmd(&mut dev, sqe, Some(data_of(k)));
            assert!(cqe.status.is_success(), "write {k}: {:?}", cqe.status);
        }
        let before = dev.services.nvmf.as_ref().unwrap().direct.reads;
        // 3 rounds of 8 reads in flight at once (QD8).
        let mut cids = std::collections::HashMap::new();
        for round in 0..3u64 {
            for k in 0..8 {
                let sqe = rw(k).to_sqe(IoOpcode::Read as u8, 0, 1);
                let cid = io.host.submit(sqe, Some((vec![0u8; LEN], LEN as u32)));
                cids.insert(cid.expect("submit"), k);
            }
            for _ in 0..20_000 {
                if cids.is_empty() {
                    break;
                }
                io.pump(&mut dev);
                while let Some(ev) = io.host.poll_event() {
                    if let HostEvent::Completion { cid, cqe, buf } = ev {
                        let k = cids.remove(&cid).expect("a read of ours");
                        assert!(cqe.status.is_success(), "read {k}: {:?}", cqe.status);
                        assert!(buf.unwrap() == data_of(k), "round {round} read {k}: data");
                    }
                }
            }
            assert!(cids.is_empty(), "reads never completed: {cids:?}");
        }
        let s = dev.services.nvmf.as_ref().unwrap();
        assert_eq!(s.direct.reads - before, 24, "fc off {fc_off}, {digests:?}");
        let (free, all) = s.buffers();
        assert_eq!(free, all);
    }
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

/// The public development signing key (qemu/dev-keys).
fn dev_signing_key() -> keel_provision::ed25519_dalek::SigningKey {
    let key = include_str!("../../qemu/dev-keys/provision.key");
    let hex = key
        .trim()
        .strip_prefix("keel-signing-key ")
        .expect("dev key file");
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    keel_provision::ed25519_dalek::SigningKey::from_bytes(&seed)
}

/// A bundle of `generation` signed with the public development key (qemu/dev-keys).
fn dev_bundle(generation: u64) -> Vec<u8> {
    signed_bundle(&dev_device(), generation)
}

/// A description with subsystem `nqn.2026-12.test:vol` and one 1 MiB RAM namespace.
fn dev_device() -> keel_provision::Device {
    use keel_provision::{Backend, Encryption, Namespace, Network, Subsystem};
    let nqn = String::from("nqn.2026-12.test:vol");
    keel_provision::Device {
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
        qos: Default::default(),
        nguids: Vec::new(),
    }
}

/// Services as a push-provisioned device with two emulated function slots boots them:
/// `device` in force (generation 1), RAM shared per `share`, and the functions' pairs
/// spread over the cores (as `fnq::Hub::start` leaves it at `--smp 2`) unless `share` is
/// `RamSharing::None` (one core).
fn pushed_services(
    device: &keel_provision::Device,
    share: crate::services::RamSharing,
) -> Services<TestHw> {
    let identity: Identity<RamFlash> = Identity::new(None, None);
    let cfg = identity.open(&signed_bundle(device, 1), 0).unwrap();
    let plan = Plan::from_bundle(&cfg, Source::Push, MAC, PROVISION_PUBKEY);
    let mut s: Services<TestHw> =
        Services::build_with(plan, Vec::new(), two_windows(), true, identity, share);
    s.replication.functions = share != crate::services::RamSharing::None;
    s
}

/// Two 1 MiB emulated function windows.
fn two_windows() -> Vec<WindowPort<MemWindow>> {
    (0..2u64)
        .map(|i| WindowPort {
            base: 0x1000_0000 * (i + 1),
            size: 1 << 20,
            ep: Ok(MemWindow::new(1 << 20)),
        })
        .collect()
}

/// `device` as a bundle of `generation` signed with the development key.
pub(crate) fn signed_bundle(device: &keel_provision::Device, generation: u64) -> Vec<u8> {
    let mut counter = 0u8;
    keel_provision::bundle::build(
        device,
        generation,
        &dev_signing_key(),
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

/// Client sockets of the device's own interface connecting to `port` from `first_port` on.
fn open_clients(dev: &mut Device, port: u16, first_port: u16, n: u16) -> Vec<SocketHandle> {
    (0..n)
        .map(|i| dev.client_socket(port, first_port + i))
        .collect()
}

fn established(dev: &Device, clients: &[SocketHandle]) -> usize {
    clients
        .iter()
        .filter(|&&h| dev.net.sockets.get::<tcp::Socket>(h).state() == tcp::State::Established)
        .count()
}

#[test]
fn a_burst_of_syns_finds_a_listener_for_each_while_sockets_remain() {
    let mut dev = Device::new("keel.ram=8");
    for _ in 0..5 {
        dev.pass();
    }
    // 24 SYNs leave in one pass and reach the device together (six times the listeners
    // armed on the port): each must find a listener, none a reset.
    let clients = open_clients(&mut dev, 4420, 51_000, 24);
    for _ in 0..20 {
        dev.pass();
    }
    assert_eq!(established(&dev, &clients), 24);
    assert_eq!(dev.services.nvmf.as_ref().unwrap().connections(), 24);
    let r = dev.services.resources();
    assert_eq!(r.awaiting_icreq, 24);
    assert_eq!(
        r.sockets_listening, 8,
        "4 listeners per port kept armed: {r:?}"
    );
    // They leave with a reset: every socket returns to the pool on the next passes.
    for &h in &clients {
        dev.net.sockets.get_mut::<tcp::Socket>(h).abort();
    }
    for _ in 0..5 {
        dev.pass();
    }
    let r = dev.services.resources();
    assert_eq!(
        (r.awaiting_icreq, r.queues, r.sockets_draining),
        (0, 0, 0),
        "{r:?}"
    );
    assert_eq!(
        r.sockets_free + r.sockets_listening,
        r.sockets_created,
        "{r:?}"
    );
}

#[test]
fn silent_connections_are_evicted_oldest_first_so_a_host_gets_in() {
    let mut dev = Device::new("keel.ram=8");
    for _ in 0..5 {
        dev.pass();
    }
    // More silent connections than the pool has sockets, a few at a time (as a storm reaches
    // the device), never closed by their peers.
    let batches = crate::net::MAX_SOCKETS as u16 / 8 + 1;
    let opened = u32::from(batches) * 8;
    let mut silent = Vec::new();
    for batch in 0..batches {
        silent.extend(open_clients(&mut dev, 4420, 52_000 + batch * 8, 8));
        for _ in 0..5 {
            dev.pass();
        }
    }
    let r = dev.services.resources();
    assert_eq!(r.sockets_created, crate::net::MAX_SOCKETS as u32, "{r:?}");
    assert_eq!(
        r.sockets_listening, 8,
        "every port keeps its listeners: {r:?}"
    );
    // Only as many as needed were evicted: the pool minus the listeners and a port's worth
    // of spare sockets stay connected.
    let kept = crate::net::MAX_SOCKETS as u32 - 8 - 4;
    assert_eq!(
        (r.awaiting_icreq, r.evicted),
        (kept, u64::from(opened - kept)),
        "{r:?}"
    );
    // The oldest went first: the first silent connections were reset, the last ones live.
    let s = |h: SocketHandle| dev.net.sockets.get::<tcp::Socket>(h).state();
    assert_ne!(s(silent[0]), tcp::State::Established);
    assert_eq!(s(*silent.last().unwrap()), tcp::State::Established);
    // A host connects among them and completes its association.
    let mut admin = Queue::open(&mut dev, 50_010);
    let cntlid = admin.connect(&mut dev, 0, CNTLID_DYNAMIC, crate::config::DEFAULT_NQN);
    assert_ne!(cntlid, CNTLID_DYNAMIC);
    // More silent ones keep coming: the host's connection, past its ICReq, is never evicted.
    for batch in 0..4u16 {
        open_clients(&mut dev, 4420, 53_000 + batch * 8, 8);
        for _ in 0..5 {
            dev.pass();
        }
    }
    let (cqe, _) = admin.cmd(
        &mut dev,
        PropertyCommand::get_sqe(0, offset::VS, PropertySize::Four),
        None,
    );
    assert!(cqe.status.is_success());
    assert_eq!(dev.services.target.controller_count(), 1);
}

#[test]
fn a_connection_that_never_sends_its_icreq_times_out() {
    let mut dev = Device::new("keel.ram=8");
    let sock = dev.client_socket(4420, 54_000);
    for _ in 0..20 {
        dev.pass();
    }
    assert_eq!(dev.services.resources().awaiting_icreq, 1);
    // 10 s of silence (the transport's ICReq timeout), in 10 ms steps.
    for _ in 0..1_001 {
        advance(10_000_000);
        dev.pass();
    }
    let r = dev.services.resources();
    assert_eq!(
        (r.icreq_timeouts, r.awaiting_icreq, r.queues),
        (1, 0, 0),
        "{r:?}"
    );
    assert_eq!(dev.services.nvmf.as_ref().unwrap().connections(), 0);
    let s = dev.net.sockets.get::<tcp::Socket>(sock);
    assert!(
        !matches!(s.state(), tcp::State::Established),
        "still established: {}",
        s.state()
    );
}

/// Reads or writes `data.len()` bytes at `lba` of namespace `nsid` on an I/O queue.
fn rw(
    dev: &mut Device,
    io: &mut Queue,
    write: bool,
    nsid: u32,
    lba: u64,
    data: Vec<u8>,
) -> Vec<u8> {
    let rw = RwCommand {
        slba: lba,
        nlb: (data.len() / 512 - 1) as u16,
        deac: false,
        fua: false,
        lr: false,
        prinfo: 0,
    };
    let op = if write {
        IoOpcode::Write
    } else {
        IoOpcode::Read
    };
    let (cqe, buf) = io.cmd(dev, rw.to_sqe(op as u8, 0, nsid), Some(data));
    assert!(
        cqe.status.is_success(),
        "{op:?} nsid {nsid} lba {lba}: {:?}",
        cqe.status
    );
    buf.unwrap_or_default()
}

/// A remote volume end to end on one device: namespaces 2 and 3 are two slices of a remote
/// namespace reached through the firmware's own initiator (client sockets of the stack,
/// keel-remote) over smoltcp's Loopback, and that remote namespace is the device's own
/// NVMe/TCP target's namespace 1. Namespace 2 is encrypted: the remote holds its ciphertext.
#[test]
fn remote_volume_serves_slices_of_a_namespace_reached_over_nvme_tcp() {
    let nqn = crate::config::DEFAULT_NQN;
    let key = "00112233445566778899aabbccddeeff0f1e2d3c4b5a69788796a5b4c3d2e1f0";
    let mut dev = Device::new(&format!(
        "keel.ns=ram:16,remote:127.0.0.1:4420:{nqn}:1:0+8,remote:127.0.0.1:4420:{nqn}:1:8+ \
         keel.remote.queues=2 keel.remote.depth=16 keel.xts=2:{key}"
    ));
    assert_eq!(
        dev.services.remotes.volumes.len(),
        1,
        "one volume for both slices"
    );
    assert!(
        !dev.services.target.has_namespace(nqn, 2),
        "not before it is reached"
    );
    for _ in 0..20_000 {
        dev.pass();
        if dev.services.target.has_namespace(nqn, 3) {
            break;
        }
    }
    assert!(
        dev.services.target.has_namespace(nqn, 2) && dev.services.target.has_namespace(nqn, 3),
        "the remote namespace was never identified"
    );
    let sizes: Vec<(u32, u64)> = dev
        .services
        .target
        .namespace_views()
        .map(|n| (n.nsid, n.geometry.blocks * u64::from(n.geometry.block_size)))
        .collect();
    assert_eq!(sizes, [(1, 16 << 20), (2, 8 << 20), (3, 8 << 20)]);
    // The initiator's connections are client sockets: an admin queue and two I/O queues.
    assert_eq!(dev.net.client_sockets(), 3);
    assert!(dev.net.listening_on_all());

    // A host of the device writes through both slices.
    let (_admin, mut io) = enabled_io_queue(&mut dev, 50_010, nqn);
    let pattern: Vec<u8> = (0..32_768u32).map(|i| (i * 13 + 5) as u8).collect();
    rw(&mut dev, &mut io, true, 3, 0, pattern.clone());
    rw(&mut dev, &mut io, true, 2, 100, pattern.clone());
    // Read back through the volume, and from the remote namespace itself: the plain slice
    // starts 8 MiB in; the encrypted one holds ciphertext only.
    assert_eq!(rw(&mut dev, &mut io, false, 3, 0, vec![0; 32_768]), pattern);
    assert_eq!(
        rw(&mut dev, &mut io, false, 2, 100, vec![0; 32_768]),
        pattern
    );
    assert_eq!(
        rw(&mut dev, &mut io, false, 1, 16_384, vec![0; 32_768]),
        pattern
    );
    let stored = rw(&mut dev, &mut io, false, 1, 100, vec![0; 32_768]);
    assert_ne!(stored, pattern);
    assert!(
        stored
            .windows(16)
            .all(|w| !pattern.windows(16).any(|p| p == w)),
        "plaintext on the remote"
    );
    let snap = keel_mgmt::Device::snapshot(&dev.services);
    assert_eq!(snap.remotes.len(), 1, "{snap:?}");
    let r = &snap.remotes[0];
    assert_eq!(r.state, "online");
    assert_eq!(r.paths.len(), 1);
    assert_eq!(
        (r.paths[0].state.as_str(), r.paths[0].io_queues),
        ("live", 2)
    );
    // Two writes and two reads through the volume, one command each.
    assert_eq!(
        (r.submitted, r.completed, r.paths[0].commands),
        (4, 4, 4),
        "{r:?}"
    );
    assert_eq!(
        r.exports,
        [(nqn.to_string(), 2), (nqn.to_string(), 3)],
        "{r:?}"
    );
}

/// A host of `nqn` over NVMe/TCP from local ports `port` (admin) and `port + 1` (I/O queue
/// 1): connected, CC.EN set. Returns the admin and the I/O queue.
fn enabled_io_queue(dev: &mut Device, port: u16, nqn: &str) -> (Queue, Queue) {
    let mut admin = Queue::open(dev, port);
    let cntlid = admin.connect(dev, 0, CNTLID_DYNAMIC, nqn);
    let cc = Cc::new(true, 0, 0, 0, Cc::SHN_NONE, 6, 4);
    admin.cmd(
        dev,
        PropertyCommand::set_sqe(0, offset::CC, PropertySize::Four, cc.0 as u64),
        None,
    );
    let mut io = Queue::open(dev, port + 1);
    io.connect(dev, 1, cntlid, nqn);
    (admin, io)
}

/// Remotes that cannot be used: nobody listens on the port (the path keeps trying every
/// reconnect_delay), or the subsystem does not exist there (the remote refuses for good).
/// Neither namespace is served, the target serves the rest, and the client sockets of the
/// failed attempts go back to their pool.
#[test]
fn unreachable_remotes_are_retried_or_given_up_without_harm() {
    let mut dev = Device::new(
        "keel.ns=ram:1,remote:127.0.0.1:4999:nqn.2026-11.dev.keel:default:1,\
         remote:127.0.0.1:4420:nqn.2026-11.dev.keel:nowhere:1 keel.remote.reconnect_delay=100ms",
    );
    for _ in 0..100_000 {
        dev.pass();
    }
    let nqn = crate::config::DEFAULT_NQN;
    assert!(dev.services.target.has_namespace(nqn, 1));
    assert!(!dev.services.target.has_namespace(nqn, 2));
    assert!(!dev.services.target.has_namespace(nqn, 3));
    let snap = keel_mgmt::Device::snapshot(&dev.services);
    let closed = &snap.remotes[0];
    assert_eq!(closed.state, "connecting", "{closed:?}");
    // 1 s of passes at 100 ms per attempt (each refused at once by a reset).
    assert!(closed.paths[0].attempts >= 5, "{closed:?}");
    assert_eq!(closed.paths[0].connects, 0);
    assert_eq!(closed.paths[0].last_loss, "TCP connection failed");
    let refused = &snap.remotes[1];
    assert_eq!(refused.state, "failed", "{refused:?}");
    assert_eq!(refused.paths[0].state, "failed");
    assert!(
        refused.paths[0].last_loss.contains("Connect"),
        "{refused:?}"
    );
    assert!(
        dev.net.client_sockets() <= 1,
        "sockets of failed attempts are released"
    );
    assert!(dev.net.listening_on_all());
}

#[test]
fn remote_namespace_specs_from_boot_arguments() {
    use crate::config::{NsSpec, remote_template};
    use keel_provision::{Remote, RemotePolicy};
    let t = remote_template(
        "keel.remote.queues=2 keel.remote.depth=32 keel.remote.digests=data \
         keel.remote.kato=10 keel.remote.reconnect_delay=500ms keel.remote.ctrl_loss_tmo=-1 \
         keel.remote.fast_io_fail_tmo=3 keel.remote.policy=queue-depth \
         keel.remote.hostnqn=nqn.2026-11.dev.keel:dpu",
    );
    let want = |paths: Vec<([u8; 4], u16)>, nqn: &str, nsid: u32| Remote {
        nqn: nqn.into(),
        paths,
        nsid,
        hostnqn: Some("nqn.2026-11.dev.keel:dpu".into()),
        queues: 2,
        depth: 32,
        header_digest: false,
        data_digest: true,
        kato_ms: 10_000,
        reconnect_delay_ms: 500,
        ctrl_loss_tmo_ms: None,
        fast_io_fail_tmo_ms: Some(3_000),
        policy: RemotePolicy::QueueDepth,
    };
    assert_eq!(
        NsSpec::parse("remote:10.0.2.2:4420:nqn.2026-11.dev.keel:default:1", &t),
        Some(NsSpec::Remote {
            remote: Box::new(want(
                vec![([10, 0, 2, 2], 4420)],
                "nqn.2026-11.dev.keel:default",
                1
            )),
            slice: None,
        })
    );
    assert_eq!(
        NsSpec::parse(
            "remote:10.0.2.2:4420+10.0.2.3:4421:nqn.2014-08.org.nvmexpress:uuid:1:7:64+128",
            &t
        ),
        Some(NsSpec::Remote {
            remote: Box::new(want(
                vec![([10, 0, 2, 2], 4420), ([10, 0, 2, 3], 4421)],
                "nqn.2014-08.org.nvmexpress:uuid:1",
                7
            )),
            slice: Some((64 << 20, Some(128 << 20))),
        })
    );
    // Defaults without keel.remote.*: Linux's.
    let d = remote_template("");
    assert_eq!((d.queues, d.depth, d.kato_ms), (4, 128, 5_000));
    assert_eq!(
        (d.reconnect_delay_ms, d.ctrl_loss_tmo_ms),
        (10_000, Some(600_000))
    );
    for bad in [
        "remote:10.0.2.2:4420:nqn.2026-11.dev.keel:default",
        "remote:10.0.2.2:nqn.2026-11.dev.keel:default:1",
        "remote:10.0.2.2:0:nqn.2026-11.dev.keel:default:1",
        "remote:10.0.2.256:4420:nqn.2026-11.dev.keel:default:1",
        "remote:10.0.2.2:4420:default:1",
        "remote:10.0.2.2:4420:nqn.2026-11.dev.keel:default:0",
        "remote:10.0.2.2:4420+10.0.2.2:4420:nqn.2026-11.dev.keel:default:1",
        "remote:10.0.2.2:4420:nqn.2026-11.dev.keel:default:1:x+1",
        "remote:",
    ] {
        assert_eq!(NsSpec::parse(bad, &d), None, "{bad}");
    }
    // In a plan: namespace 2 of the TCP subsystem, and function 0's namespace.
    let p = dev_plan(
        "keel.ns=ram:8,remote:10.0.2.2:4420:nqn.2026-11.dev.keel:pool:1 \
         keel.fn.ns=remote:10.0.2.2:4421:nqn.2026-11.dev.keel:pool:2:0+64",
        1,
    );
    assert!(
        matches!(&p.namespaces[1].spec, NsSpec::Remote { remote, slice: None } if remote.nsid == 1)
    );
    let f = &p.namespaces[2];
    assert_eq!(f.function, Some(0));
    assert!(
        matches!(&f.spec, NsSpec::Remote { remote, slice: Some((0, Some(_))) } if remote.paths == [([10, 0, 2, 2], 4421)])
    );
    // And back to a description: the remote backend as it was given.
    let d = p.to_device();
    assert!(matches!(
        &d.namespaces[2].backend,
        keel_provision::Backend::Remote { remote, offset: 0, length: Some(l) } if remote.nsid == 2 && *l == 64 << 20
    ));
}

/// A bundle that only changes QoS applies live: no reboot, commands keep completing without
/// error and the namespace's own counters show the new limit holding (on the test clock); a
/// bundle whose QoS breaks a rule is refused and the limits in force stay.
#[test]
fn a_push_changing_only_qos_applies_live() {
    use keel_mgmt::Device as _;
    use keel_provision::{NamespaceQos, QosGroup, QosLimits, QosRate};
    const NQN: &str = "nqn.2026-12.test:vol";
    let mut desc = dev_device();
    desc.namespaces.push(keel_provision::Namespace {
        nsid: 2,
        ..desc.namespaces[0].clone()
    });
    desc.qos.groups.push(QosGroup {
        name: "tenant-b".into(),
        limits: QosLimits::default(),
        weight: 0,
    });
    desc.qos.namespaces.push(NamespaceQos {
        subsystem: NQN.into(),
        nsid: 2,
        limits: QosLimits::default(),
        weight: 1,
        group: Some("tenant-b".into()),
    });
    let flash = RamFlash(vec![0xFF; keel_provision::flash::FLASH_SIZE]);
    let identity: Identity<RamFlash> = Identity::new(None, Some(flash));
    let cfg = identity.open(&signed_bundle(&desc, 1), 0).unwrap();
    let plan = Plan::from_bundle(&cfg, Source::Push, MAC, PROVISION_PUBKEY);
    let mut dev = Device::new("keel.ram=1");
    dev.services = Services::build(plan, Vec::new(), Vec::new(), true, identity);

    let mut admin = Queue::open(&mut dev, 50_010);
    let cntlid = admin.connect(&mut dev, 0, CNTLID_DYNAMIC, NQN);
    admin.enable(&mut dev);
    let mut io = Queue::open(&mut dev, 50_011);
    io.connect(&mut dev, 1, cntlid, NQN);
    let write = |io: &mut Queue, dev: &mut Device, slba: u64| {
        let rw = RwCommand {
            slba,
            nlb: 0,
            deac: false,
            fua: false,
            lr: false,
            prinfo: 0,
        };
        let (cqe, _) = io.cmd(
            dev,
            rw.to_sqe(IoOpcode::Write as u8, 0, 2),
            Some(vec![7; 512]),
        );
        assert!(cqe.status.is_success(), "Write: {:?}", cqe.status);
    };
    let ns2 = |dev: &Device| {
        dev.services
            .target
            .namespace_views()
            .find(|n| n.nsid == 2)
            .map(|n| n.qos)
            .unwrap()
    };
    for lba in 0..20 {
        write(&mut io, &mut dev, lba);
    }
    assert_eq!(ns2(&dev).throttled_ns, 0, "no limit yet");

    // Tighten namespace 2 to 100 writes per second, burst 1.
    let limited = QosLimits {
        write_iops: Some(QosRate {
            per_sec: 100,
            burst: Some(1),
        }),
        ..Default::default()
    };
    desc.qos.namespaces[0].limits = limited;
    let r = dev.services.push(&signed_bundle(&desc, 2)).unwrap();
    assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
    assert!(r.added.is_empty() && r.removed.is_empty());
    let before = ns2(&dev);
    assert_eq!(before.limits.write_iops.map(|r| r.per_sec), Some(100));
    let t0 = now();
    for lba in 0..30 {
        write(&mut io, &mut dev, lba);
    }
    let after = ns2(&dev);
    let ops = after.admitted_ops - before.admitted_ops;
    assert_eq!(ops, 30);
    assert!(after.throttled_ns > 0, "the limit held commands back");
    // 30 writes at 100/s with a burst of 1 need at least 290 ms of the device's clock.
    let elapsed = now() - t0;
    assert!(
        elapsed >= 290_000_000,
        "30 writes in {elapsed} ns: faster than 100 per second"
    );
    // Keep writing for two seconds of the device's clock: status reports the limit and a
    // rate at it over the last whole second.
    while now() - t0 < 2_100_000_000 {
        write(&mut io, &mut dev, 1);
    }
    let snap = dev.services.snapshot();
    let info = &snap
        .qos_namespaces
        .iter()
        .find(|n| n.nsid == 2)
        .unwrap()
        .qos;
    assert_eq!(info.limits.len(), 1);
    assert_eq!(
        (info.limits[0].name.as_str(), info.limits[0].per_sec),
        ("write_iops", 100)
    );
    assert!(
        (95..=101).contains(&info.ops_per_sec),
        "rate {} per second under a limit of 100",
        info.ops_per_sec
    );
    assert_eq!(snap.qos_groups.len(), 1);
    assert_eq!(snap.qos_groups[0].name, "tenant-b");
    assert!(snap.qos_groups[0].qos.admitted_ops >= info.admitted_ops);
    let text = keel_mgmt::metrics::render(&snap);
    assert!(
        text.contains("keel_qos_limit{scope=\"namespace\",tenant=\"nqn.2026-12.test:vol/2\",limit=\"write_iops\"} 100\n"),
        "{text}"
    );
    // Namespace 1 is not limited.
    let ns1 = dev
        .services
        .target
        .namespace_views()
        .find(|n| n.nsid == 1)
        .unwrap()
        .qos;
    assert!(!ns1.limits.any());

    // A bundle naming a group that does not exist: refused, the limits in force stay. It is
    // built valid and then edited and re-signed (the builder refuses invalid descriptions).
    desc.qos.groups[0].name = "tenant-x".into();
    desc.qos.namespaces[0].group = Some("tenant-b".into());
    assert!(keel_provision::validate(&desc).is_err());
    desc.qos.namespaces[0].group = Some("tenant-x".into());
    let good = signed_bundle(&desc, 3);
    let mut bad = good[..good.len() - 64].to_vec();
    let at = bad
        .windows(8)
        .position(|w| w == b"tenant-x")
        .expect("the namespace's group reference");
    bad[at + 7] = b'y';
    use keel_provision::ed25519_dalek::Signer;
    let sig = dev_signing_key().sign(&bad);
    bad.extend_from_slice(&sig.to_bytes());
    let e = dev.services.push(&bad).unwrap_err();
    assert!(
        e.contains("qos.group") && e.contains("tenant-y") && e.contains("unchanged"),
        "{e}"
    );
    assert_eq!(dev.services.plan().generation, 2);
    assert_eq!(ns2(&dev).limits, before.limits);
    write(&mut io, &mut dev, 0);
}

/// A host driving one emulated function through its window: admin queue, one I/O queue pair.
struct FnHost {
    index: usize,
    next: u64,
    /// (SQ base, CQ base, tail, head, phase) of queues 0 and 1.
    queues: [(u64, u64, u16, u16, bool); 2],
}

impl FnHost {
    const ENTRIES: u16 = 16;

    fn alloc(&mut self) -> u64 {
        let a = self.next;
        self.next += 4096;
        a
    }

    fn window<'a>(&self, s: &'a mut Services<TestHw>) -> &'a mut MemWindow {
        &mut s.functions[self.index].ep
    }

    /// Enables the function, lets it come up and creates I/O queue pair 1.
    fn ready(s: &mut Services<TestHw>, index: usize) -> Self {
        let mut h = Self::enable(s, index);
        for _ in 0..20 {
            advance(10_000);
            s.poll(now(), None);
        }
        for sqe in h.create_io_queues() {
            h.submit(s, 0, sqe);
            assert!(fn_wait(s, &mut h, 0).status.is_success());
        }
        h
    }

    /// Enables the function with a 16-entry admin queue.
    fn enable(s: &mut Services<TestHw>, index: usize) -> Self {
        let mut h = Self {
            index,
            next: layout::HOST_AREA_OFFSET as u64,
            queues: [(0, 0, 0, 0, true); 2],
        };
        let (sq, cq) = (h.alloc(), h.alloc());
        h.queues[0] = (sq, cq, 0, 0, true);
        let w = h.window(s);
        w.host_set_reg(offset::AQA, (15 << 16) | 15);
        w.host_set_reg64(offset::ASQ, sq);
        w.host_set_reg64(offset::ACQ, cq);
        w.host_set_reg(offset::CC, Cc::new(true, 0, 0, 0, 0, 6, 4).0);
        h
    }

    fn submit(&mut self, s: &mut Services<TestHw>, q: usize, sqe: Sqe) {
        let (sq, _, tail, _, _) = self.queues[q];
        let w = self.window(s);
        w.host_write(sq + u64::from(tail) * 64, &sqe.to_bytes());
        let tail = (tail + 1) % Self::ENTRIES;
        w.host_doorbell(layout::sq_tail_doorbell(q as u16), u32::from(tail));
        self.queues[q].2 = tail;
    }

    fn reap(&mut self, s: &mut Services<TestHw>, q: usize) -> Option<Cqe> {
        let (_, cq, _, head, phase) = self.queues[q];
        let w = self.window(s);
        let mut b = [0u8; 16];
        w.host_read(cq + u64::from(head) * 16, &mut b);
        let c = Cqe::from_bytes(&b);
        if c.phase != phase {
            return None;
        }
        let head = (head + 1) % Self::ENTRIES;
        w.host_doorbell(layout::cq_head_doorbell(q as u16), u32::from(head));
        self.queues[q].3 = head;
        if head == 0 {
            self.queues[q].4 = !phase;
        }
        Some(c)
    }

    /// The commands creating I/O queue pair 1 (for the admin queue; the caller polls).
    fn create_io_queues(&mut self) -> [Sqe; 2] {
        let (sq, cq) = (self.alloc(), self.alloc());
        self.queues[1] = (sq, cq, 0, 0, true);
        let size = (u32::from(Self::ENTRIES) - 1) << 16;
        [
            Sqe::new(0x05, 1)
                .with_cdw(10, size | 1)
                .with_cdw(11, 1)
                .with_prps(cq, 0),
            Sqe::new(0x01, 2)
                .with_cdw(10, size | 1)
                .with_cdw(11, (1 << 16) | 1)
                .with_prps(sq, 0),
        ]
    }
}

/// Polls the services until `host`'s queue `q` has a completion.
fn fn_wait(s: &mut Services<TestHw>, host: &mut FnHost, q: usize) -> Cqe {
    for _ in 0..200 {
        advance(10_000);
        s.poll(now(), None);
        if let Some(c) = host.reap(s, q) {
            return c;
        }
    }
    panic!("function {}: no completion on queue {q}", host.index);
}

/// Two emulated functions and NVMe/TCP on one core: the completions of each function's
/// commands (writes and reads the RAM backend finishes on a later poll) go to the function
/// that owns the queue, recorded when the queue was opened, and reach its host.
#[test]
fn completions_reach_the_function_owning_the_queue() {
    let mut s = services(
        "keel.fn.ram=4",
        vec![MemWindow::new(1 << 20), MemWindow::new(1 << 20)],
    );
    assert!(s.serves_tcp());
    let mut hosts: Vec<FnHost> = (0..2).map(|i| FnHost::enable(&mut s, i)).collect();
    for _ in 0..20 {
        advance(10_000);
        s.poll(now(), None);
    }
    for h in hosts.iter_mut() {
        assert_eq!(h.window(&mut s).host_reg(offset::CSTS) & 1, 1, "CSTS.RDY");
        for sqe in h.create_io_queues() {
            h.submit(&mut s, 0, sqe);
            assert!(fn_wait(&mut s, h, 0).status.is_success());
        }
    }
    // Both functions write at once, then read back: each sees only its own data.
    let bufs: Vec<u64> = hosts.iter_mut().map(FnHost::alloc).collect();
    for (i, h) in hosts.iter_mut().enumerate() {
        h.window(&mut s)
            .host_write(bufs[i], &[0xA0 + i as u8; 4096]);
        let w = RwCommand::simple(8, 8).to_sqe(IoOpcode::Write as u8, 10, 1);
        h.submit(&mut s, 1, w.with_prps(bufs[i], 0));
    }
    for h in hosts.iter_mut() {
        let c = fn_wait(&mut s, h, 1);
        assert_eq!((c.cid, c.status.is_success()), (10, true), "{c:?}");
    }
    for (i, h) in hosts.iter_mut().enumerate() {
        h.window(&mut s).host_write(bufs[i], &[0; 4096]);
        let r = RwCommand::simple(8, 8).to_sqe(IoOpcode::Read as u8, 11, 1);
        h.submit(&mut s, 1, r.with_prps(bufs[i], 0));
    }
    for (i, h) in hosts.iter_mut().enumerate() {
        let c = fn_wait(&mut s, h, 1);
        assert_eq!((c.cid, c.status.is_success()), (11, true), "{c:?}");
        let mut got = [0u8; 4096];
        h.window(&mut s).host_read(bufs[i], &mut got);
        assert_eq!(got, [0xA0 + i as u8; 4096], "function {i}");
    }
}

/// QoS of remote volumes (issue 16): a namespace whose backend is a slice of a remote
/// namespace carries its namespace limits like a local one (description, bundle, the core's
/// limiter, status), and the slices of one remote namespace share one scheduling domain (so
/// they share the remote by weight when it refuses commands as busy). The remote is the
/// device's own namespace 1, reached over smoltcp's Loopback by the firmware's initiator.
#[test]
fn a_remote_volume_carries_namespace_limits_and_its_slices_share_a_domain() {
    use keel_mgmt::Device as _;
    use keel_provision::{Backend, NamespaceQos, QosLimits, QosRate, Remote};
    const NQN: &str = "nqn.2026-12.test:vol";
    let mut desc = dev_device();
    desc.namespaces[0].backend = Backend::Ram {
        size: 16 << 20,
        block_size: 512,
    };
    let remote = Remote::new(NQN, vec![([127, 0, 0, 1], 4420)], 1);
    for (nsid, offset, length) in [(2, 0, Some(8 << 20)), (3, 8 << 20, None)] {
        desc.namespaces.push(keel_provision::Namespace {
            nsid,
            backend: Backend::Remote {
                remote: remote.clone(),
                offset,
                length,
            },
            ..desc.namespaces[0].clone()
        });
    }
    desc.qos.namespaces.push(NamespaceQos {
        subsystem: NQN.into(),
        nsid: 2,
        limits: QosLimits {
            write_iops: Some(QosRate {
                per_sec: 100,
                burst: Some(1),
            }),
            ..Default::default()
        },
        weight: 3,
        group: None,
    });
    let flash = RamFlash(vec![0xFF; keel_provision::flash::FLASH_SIZE]);
    let identity: Identity<RamFlash> = Identity::new(None, Some(flash));
    let cfg = identity.open(&signed_bundle(&desc, 1), 0).unwrap();
    let plan = Plan::from_bundle(&cfg, Source::Push, MAC, PROVISION_PUBKEY);

    // The plan: limits and weight from the bundle; slices of one remote namespace in one
    // domain, which is not a drive's (bit 31) nor the RAM namespace's (none).
    let qos: Vec<_> = plan
        .namespaces
        .iter()
        .map(|n| plan.namespace_qos(n))
        .collect();
    assert_eq!(qos[0].domain, None);
    assert_eq!(qos[1].limits.write_iops.map(|r| r.per_sec), Some(100));
    assert_eq!((qos[1].weight, qos[2].weight), (3, 1));
    assert!(qos[2].limits == keel_controller::QosLimits::NONE);
    let d = qos[1].domain.expect("a remote slice has a domain");
    assert_eq!(qos[2].domain, Some(d));
    assert_ne!(d & 1 << 31, 0, "remote domain keys have bit 31 set");
    let mut other = desc.clone();
    if let Backend::Remote { remote, .. } = &mut other.namespaces[2].backend {
        remote.nsid = 2;
    }
    let plan2 = Plan::from_bundle(
        &identity.open(&signed_bundle(&other, 1), 0).unwrap(),
        Source::Push,
        MAC,
        PROVISION_PUBKEY,
    );
    assert_ne!(
        plan2.namespace_qos(&plan2.namespaces[2]).domain,
        Some(d),
        "another remote namespace is another domain"
    );

    let mut dev = Device::new("keel.ram=1");
    dev.services = Services::build(plan, Vec::new(), Vec::new(), true, identity);
    for _ in 0..20_000 {
        dev.pass();
        if dev.services.target.has_namespace(NQN, 3) {
            break;
        }
    }
    assert!(
        dev.services.target.has_namespace(NQN, 2),
        "the remote namespace was never identified"
    );
    let mut admin = Queue::open(&mut dev, 50_010);
    let cntlid = admin.connect(&mut dev, 0, CNTLID_DYNAMIC, NQN);
    admin.enable(&mut dev);
    let mut io = Queue::open(&mut dev, 50_011);
    io.connect(&mut dev, 1, cntlid, NQN);
    let t0 = now();
    for lba in 0..30 {
        rw(&mut dev, &mut io, true, 2, lba, vec![9; 512]);
    }
    // 30 writes at 100/s with a burst of 1 need at least 290 ms of the device's clock.
    let elapsed = now() - t0;
    assert!(
        elapsed >= 290_000_000,
        "30 writes in {elapsed} ns: faster than 100 per second"
    );
    // Namespace 3, unlimited, is not held back.
    let t1 = now();
    for lba in 0..30 {
        rw(&mut dev, &mut io, true, 3, lba, vec![9; 512]);
    }
    assert!(now() - t1 < 100_000_000, "namespace 3 was throttled");
    let snap = dev.services.snapshot();
    let ns2 = snap
        .qos_namespaces
        .iter()
        .find(|n| n.nsid == 2)
        .expect("the remote namespace in the QoS report");
    assert_eq!(
        (ns2.qos.limits[0].name.as_str(), ns2.qos.limits[0].per_sec),
        ("write_iops", 100)
    );
    assert_eq!((ns2.weight, ns2.qos.admitted_ops), (3, 30));
    assert!(ns2.qos.throttled_ns > 0, "{ns2:?}");
    // Status lists the scheduling domains: the RAM namespace alone, the two remote slices
    // together; neither has a cap (remote volumes and RAM have none), nothing in flight.
    let domains: Vec<(Vec<&str>, u32, u32, u32)> = snap
        .qos_domains
        .iter()
        .map(|d| {
            (
                d.namespaces.iter().map(String::as_str).collect(),
                d.max_inflight,
                d.inflight,
                d.queued,
            )
        })
        .collect();
    let name = |nsid: u32| format!("{NQN}/{nsid}");
    let (n1, n2, n3) = (name(1), name(2), name(3));
    assert_eq!(
        domains,
        [
            (vec![n1.as_str()], 0, 0, 0),
            (vec![n2.as_str(), n3.as_str()], 0, 0, 0)
        ]
    );
}

/// `[qos] drive_max_inflight` (issue 16): the cap of a drive's scheduling domain comes from
/// the description (default 64, 0: no cap); RAM and remote namespaces have no cap.
#[test]
fn the_drive_cap_comes_from_the_description() {
    use keel_provision::{Backend, Remote};
    let mut desc = dev_device();
    let drive = Backend::Drive {
        drive: 0,
        nsid: 1,
        offset: 0,
        length: Some(1 << 20),
    };
    desc.namespaces.push(keel_provision::Namespace {
        nsid: 2,
        backend: drive,
        ..desc.namespaces[0].clone()
    });
    desc.namespaces.push(keel_provision::Namespace {
        nsid: 3,
        backend: Backend::Remote {
            remote: Remote::new("nqn.2026-12.test:far", vec![([10, 0, 0, 9], 4420)], 1),
            offset: 0,
            length: None,
        },
        ..desc.namespaces[0].clone()
    });
    let caps = |desc: &keel_provision::Device| -> Vec<u32> {
        let identity: Identity<RamFlash> = Identity::new(None, None);
        let cfg = identity.open(&signed_bundle(desc, 1), 0).unwrap();
        let plan = Plan::from_bundle(&cfg, Source::Push, MAC, PROVISION_PUBKEY);
        plan.namespaces
            .iter()
            .map(|n| plan.namespace_qos(n).max_inflight)
            .collect()
    };
    assert_eq!(caps(&desc), [0, keel_provision::DRIVE_MAX_INFLIGHT, 0]);
    desc.qos.drive_max_inflight = Some(16);
    assert_eq!(caps(&desc), [0, 16, 0]);
    desc.qos.drive_max_inflight = Some(0);
    assert_eq!(caps(&desc), [0, 0, 0]);
}

/// Functions created and removed live (issue 18): three free slots at boot; a physical
/// function and two virtual functions created by management requests, each its own
/// subsystem with its own namespaces and limits; each host writes and reads its own data;
/// one removed while its host has a write in flight (CSTS.CFS, no header, nothing posted to
/// its queues afterwards), the others keep working; bad requests change nothing; the slot is
/// reused by a new function with fresh (zeroed) storage.
#[test]
fn functions_are_created_and_removed_live() {
    use keel_mgmt::Device as _;
    use keel_mgmt::{
        FunctionBackend, FunctionCipher, FunctionNamespace, FunctionSpec, QosLimit, SlotState,
    };
    let mut s = services(
        "keel.fn.boot=0",
        (0..3).map(|_| MemWindow::new(1 << 20)).collect(),
    );
    assert_eq!(s.functions(), 0);
    let slots = s.snapshot().function_slots;
    assert_eq!(slots.len(), 3);
    assert!(slots.iter().all(|x| x.state == SlotState::Free));
    // A free slot's window has no header: a host sees no function.
    let header = |s: &Services<TestHw>, i: usize| {
        let w = &s.functions[i].ep;
        layout::Header::decode(
            &w.bytes()[layout::HEADER_OFFSET..layout::HEADER_OFFSET + layout::header::SIZE]
                .try_into()
                .unwrap(),
            w.size() as u64,
        )
    };
    assert!(header(&s, 0).is_err());

    let spec = |slot: u16, nsids: &[u32]| FunctionSpec {
        slot,
        nqn: format!("nqn.2026-12.test:f{slot}"),
        serial: String::new(),
        model: String::new(),
        namespaces: nsids
            .iter()
            .map(|&nsid| FunctionNamespace {
                nsid,
                backend: FunctionBackend::Ram {
                    bytes: 4 << 20,
                    block_size: 512,
                },
                encryption: FunctionCipher::None,
            })
            .collect(),
        limits: vec![QosLimit {
            name: "write_iops".into(),
            per_sec: 10_000 + u64::from(slot),
            burst: 0,
        }],
    };
    for (slot, nsids) in [(0u16, &[1u32, 2][..]), (1, &[1]), (2, &[1])] {
        let info = s.create_function(&spec(slot, nsids)).unwrap();
        assert_eq!(info.state, SlotState::Live);
        assert_eq!(info.nsids, nsids);
        assert_eq!(info.origin, "created");
        assert_eq!(info.kind, ["pf", "vf1", "vf2"][usize::from(slot)]);
        assert_eq!(header(&s, slot.into()).unwrap().function, slot);
    }
    assert_eq!(s.functions(), 3);
    let snap = s.snapshot();
    assert_eq!(snap.functions.len(), 3);
    assert!(
        snap.subsystems
            .iter()
            .any(|x| x.nqn == "nqn.2026-12.test:f2")
    );
    assert_eq!(
        snap.namespaces
            .iter()
            .filter(|n| n.subsystem == "nqn.2026-12.test:f0")
            .count(),
        2
    );
    assert_eq!(snap.function_slots[1].limits[0].per_sec, 10_001);

    // Bad requests: refused, nothing changes.
    let before = s.function_slots();
    for bad in [
        spec(1, &[1]), // busy
        FunctionSpec {
            slot: 7,
            ..spec(1, &[1])
        }, // no such slot
        FunctionSpec {
            nqn: "nqn.2026-12.test:f0".into(),
            ..spec(1, &[1])
        },
        FunctionSpec {
            namespaces: vec![],
            ..spec(1, &[1])
        },
    ] {
        assert!(s.create_function(&bad).is_err(), "{bad:?}");
    }
    assert_eq!(s.function_slots(), before);

    // Hosts enable all three, create their I/O queues, write their own pattern at LBA 8.
    let mut hosts: Vec<FnHost> = (0..3).map(|i| FnHost::enable(&mut s, i)).collect();
    for _ in 0..20 {
        advance(10_000);
        s.poll(now(), None);
    }
    let bufs: Vec<u64> = hosts.iter_mut().map(FnHost::alloc).collect();
    for (i, h) in hosts.iter_mut().enumerate() {
        assert_eq!(h.window(&mut s).host_reg(offset::CSTS) & 1, 1, "CSTS.RDY");
        for sqe in h.create_io_queues() {
            h.submit(&mut s, 0, sqe);
            assert!(fn_wait(&mut s, h, 0).status.is_success());
        }
        h.window(&mut s)
            .host_write(bufs[i], &[0xB0 + i as u8; 4096]);
        let w = RwCommand::simple(8, 8).to_sqe(IoOpcode::Write as u8, 10, 1);
        h.submit(&mut s, 1, w.with_prps(bufs[i], 0));
        assert!(fn_wait(&mut s, h, 1).status.is_success());
    }
    assert_eq!(s.function_slots()[2].host, "ready");

    // Function 1 removed while its host has a write submitted (doorbell rung) and not yet
    // fetched: it is never executed nor completed.
    let w = RwCommand::simple(16, 8).to_sqe(IoOpcode::Write as u8, 11, 1);
    hosts[1].submit(&mut s, 1, w.with_prps(bufs[1], 0));
    let info = s.remove_function(1).unwrap();
    assert_eq!(info.subsystem, "nqn.2026-12.test:f1");
    assert_ne!(info.state, SlotState::Live);
    assert!(header(&s, 1).is_err(), "the header is gone");
    assert_eq!(
        hosts[1].window(&mut s).host_reg(offset::CSTS) & 2,
        2,
        "CSTS.CFS"
    );
    for _ in 0..50 {
        advance(10_000);
        s.poll(now(), None);
    }
    assert!(
        hosts[1].reap(&mut s, 1).is_none(),
        "nothing posted after removal"
    );
    assert_eq!(
        s.function_slots()[1].state,
        SlotState::Free,
        "buffers home: free"
    );
    assert!(
        !s.target
            .subsystem_views()
            .any(|x| x.nqn == "nqn.2026-12.test:f1")
    );
    // Removed twice: refused.
    assert!(s.remove_function(1).unwrap_err().contains("free"));
    assert_eq!(s.functions(), 2);

    // The others read back their own data.
    for i in [0usize, 2] {
        let h = &mut hosts[i];
        h.window(&mut s).host_write(bufs[i], &[0; 4096]);
        let r = RwCommand::simple(8, 8).to_sqe(IoOpcode::Read as u8, 12, 1);
        h.submit(&mut s, 1, r.with_prps(bufs[i], 0));
        assert!(fn_wait(&mut s, h, 1).status.is_success());
        let mut got = [0u8; 4096];
        h.window(&mut s).host_read(bufs[i], &mut got);
        assert_eq!(got, [0xB0 + i as u8; 4096], "function {i}");
    }

    // Slot 1 again, a new subsystem: the host starts over and reads zeroes (new storage).
    s.create_function(&FunctionSpec {
        nqn: "nqn.2026-12.test:again".into(),
        ..spec(1, &[1])
    })
    .unwrap();
    // A new host driver: its queue memory starts zeroed.
    let area = (1 << 20) - layout::HOST_AREA_OFFSET;
    s.functions[1]
        .ep
        .host_write(layout::HOST_AREA_OFFSET as u64, &vec![0; area]);
    let mut h = FnHost::ready(&mut s, 1);
    let buf = h.alloc();
    h.window(&mut s).host_write(buf, &[0xFF; 4096]);
    let r = RwCommand::simple(8, 8).to_sqe(IoOpcode::Read as u8, 13, 1);
    h.submit(&mut s, 1, r.with_prps(buf, 0));
    assert!(fn_wait(&mut s, &mut h, 1).status.is_success());
    let mut got = [0u8; 4096];
    h.window(&mut s).host_read(buf, &mut got);
    assert_eq!(got, [0; 4096]);
}

/// A function for slot `slot` of subsystem `nqn` with one 1 MiB RAM namespace, no limits.
fn one_mib_function(
    slot: u16,
    nqn: &str,
    encryption: keel_mgmt::FunctionCipher,
) -> keel_mgmt::FunctionSpec {
    keel_mgmt::FunctionSpec {
        slot,
        nqn: nqn.into(),
        serial: String::new(),
        model: String::new(),
        namespaces: vec![keel_mgmt::FunctionNamespace {
            nsid: 1,
            backend: keel_mgmt::FunctionBackend::Ram {
                bytes: 1 << 20,
                block_size: 512,
            },
            encryption,
        }],
        limits: vec![],
    }
}

/// A function created on a provisioned device stays live through a push that changes QoS,
/// with its own limits (the bundle does not name its slot), and the description kept with the
/// plan lists it, so the push reports that the bundle leaves it out (it would be gone after a
/// reboot) without removing it.
#[test]
fn a_created_function_survives_a_qos_push_with_its_limits() {
    use keel_mgmt::Device as _;
    use keel_mgmt::{FunctionCipher, FunctionSpec, QosLimit, SlotState};
    let mut desc = dev_device();
    let flash = RamFlash(vec![0xFF; keel_provision::flash::FLASH_SIZE]);
    let identity: Identity<RamFlash> = Identity::new(None, Some(flash));
    let cfg = identity.open(&signed_bundle(&desc, 1), 0).unwrap();
    let plan = Plan::from_bundle(&cfg, Source::Push, MAC, PROVISION_PUBKEY);
    let windows = (0..2)
        .map(|i| WindowPort {
            base: 0x1000_0000 * (i as u64 + 1),
            size: 1 << 20,
            ep: Ok(MemWindow::new(1 << 20)),
        })
        .collect();
    let mut s: Services<TestHw> = Services::build(plan, Vec::new(), windows, true, identity);
    assert!(
        s.function_slots()
            .iter()
            .all(|x| x.state == SlotState::Free)
    );
    let limit = QosLimit {
        name: "read_iops".into(),
        per_sec: 3000,
        burst: 30,
    };
    s.create_function(&FunctionSpec {
        limits: vec![limit.clone()],
        ..one_mib_function(1, "nqn.2026-12.test:vf1", FunctionCipher::None)
    })
    .unwrap();
    let d = s.plan().device.clone().unwrap();
    assert!(d.subsystems.iter().any(|x| x.nqn == "nqn.2026-12.test:vf1"));
    assert!(d.namespaces.iter().any(|n| n.function == Some(1)));
    assert_eq!(
        d.subsystems[0], desc.subsystems[0],
        "the described ones stay as described"
    );

    desc.qos.groups.push(keel_provision::QosGroup {
        name: "g".into(),
        limits: keel_provision::QosLimits::default(),
        weight: 2,
    });
    let r = s.push(&signed_bundle(&desc, 2)).unwrap();
    assert!(
        r.needs_reboot
            .iter()
            .any(|m| m.contains("nqn.2026-12.test:vf1")
                && m.contains("not in this description: it runs until the next boot")),
        "{:?}",
        r.needs_reboot
    );
    let slot = &s.function_slots()[1];
    assert_eq!(slot.state, SlotState::Live);
    assert_eq!(slot.limits, [limit]);
}

/// Functions in the device description (issue 18): a push adds a PF (two namespaces, one
/// encrypted, a limit) and a VF live, with the NGUIDs the bundle carries; a push without the
/// VF removes it (hot unplug) and keeps the PF's data; bad pushes (a slot the device does not
/// have, a slot given to another subsystem, a slot still removing, a slot busy with a created
/// function) are refused with nothing changed; a created function the description then names
/// is adopted; a function created again after its removal gets new NGUIDs; after a reboot
/// from the flash the pushed functions are back with the same NGUIDs.
#[test]
fn functions_in_the_description_are_pushed_live_and_persist() {
    use keel_mgmt::Device as _;
    use keel_mgmt::{FunctionCipher, FunctionSpec, QosLimit, SlotState};
    use keel_provision::{Backend, Encryption, FunctionQos, Namespace, QosLimits, QosRate};
    const PF: &str = "nqn.2026-12.test:pf";
    const VF: &str = "nqn.2026-12.test:vf1";
    let sub = |nqn: &str| keel_provision::Subsystem {
        nqn: nqn.into(),
        serial: None,
        model: None,
        allowed_hosts: vec![],
    };
    let ns = |nqn: &str, nsid, function, encryption| Namespace {
        subsystem: nqn.into(),
        nsid,
        backend: Backend::Ram {
            size: 1 << 20,
            block_size: 512,
        },
        encryption,
        function: Some(function),
    };
    let base = dev_device();
    let flash = RamFlash(vec![0xFF; keel_provision::flash::FLASH_SIZE]);
    let mut identity: Identity<RamFlash> = Identity::new(None, Some(flash));
    let first = signed_bundle(&base, 1);
    identity.persist(&first).unwrap();
    let (cfg, src) = identity.load_config().unwrap();
    let plan = Plan::from_bundle(&cfg, src, MAC, PROVISION_PUBKEY);
    let windows = |n: usize| -> Vec<WindowPort<MemWindow>> {
        (0..n)
            .map(|i| WindowPort {
                base: 0x1000_0000 * (i as u64 + 1),
                size: 1 << 20,
                ep: Ok(MemWindow::new(1 << 20)),
            })
            .collect()
    };
    let mut s: Services<TestHw> = Services::build(plan, Vec::new(), windows(3), true, identity);
    assert!(
        s.function_slots()
            .iter()
            .all(|x| x.state == SlotState::Free)
    );

    // Generation 2: PF on slot 0 (namespace 2 encrypted, a write limit), VF on slot 1.
    let mut two = base.clone();
    two.subsystems.extend([sub(PF), sub(VF)]);
    two.namespaces.extend([
        ns(PF, 1, 0, Encryption::None),
        ns(PF, 2, 0, Encryption::Aes256Xts),
        ns(VF, 1, 1, Encryption::None),
    ]);
    let limit = QosRate {
        per_sec: 20_000,
        burst: Some(200),
    };
    two.qos.functions.push(FunctionQos {
        function: 0,
        limits: QosLimits {
            write_iops: Some(limit),
            ..Default::default()
        },
    });
    let mut counter = 0x40u8;
    keel_provision::assign_nguids(&mut two, None, &mut |b: &mut [u8]| {
        for x in b {
            counter = counter.wrapping_add(7);
            *x = counter;
        }
    });
    assert_eq!(two.nguids.len(), 3);
    let r = s.push(&signed_bundle(&two, 2)).unwrap();
    assert!(r.persisted);
    assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
    for want in [(PF, 1), (PF, 2), (VF, 1)] {
        assert!(
            r.added.contains(&(String::from(want.0), want.1)),
            "{:?}",
            r.added
        );
    }
    let slots = s.function_slots();
    assert_eq!(
        slots
            .iter()
            .map(|x| (x.state, x.subsystem.as_str(), x.origin.as_str()))
            .collect::<Vec<_>>(),
        [
            (SlotState::Live, PF, "pushed"),
            (SlotState::Live, VF, "pushed"),
            (SlotState::Free, "", "")
        ]
    );
    assert_eq!(slots[0].nsids, [1, 2]);
    assert_eq!(slots[0].limits[0].name, "write_iops");
    let nguids = |s: &Services<TestHw>| -> Vec<(String, u32, [u8; 16])> {
        s.plan
            .namespaces
            .iter()
            .filter(|n| n.function.is_some())
            .map(|n| (n.subsystem.clone(), n.nsid, s.plan.nguid_of(n)))
            .collect()
    };
    let pushed = nguids(&s);
    for (i, (nqn, nsid, g)) in pushed.iter().enumerate() {
        let j = two
            .namespaces
            .iter()
            .position(|n| n.subsystem == *nqn && n.nsid == *nsid)
            .unwrap();
        assert_eq!(Some(*g), two.nguid(j), "namespace {i}");
    }
    let enc = s
        .plan
        .namespaces
        .iter()
        .find(|n| n.subsystem == PF && n.nsid == 2)
        .unwrap();
    assert_eq!(enc.cipher, "aes-256-xts");
    assert!(enc.key.is_some());

    // The PF's host writes through both namespaces and reads back.
    let mut h = FnHost::ready(&mut s, 0);
    let buf = h.alloc();
    for nsid in [1u32, 2] {
        h.window(&mut s).host_write(buf, &[0xC0 + nsid as u8; 4096]);
        let w = RwCommand::simple(8, 8).to_sqe(IoOpcode::Write as u8, 20, nsid);
        h.submit(&mut s, 1, w.with_prps(buf, 0));
        assert!(fn_wait(&mut s, &mut h, 1).status.is_success());
    }

    // Bad pushes: refused, nothing changes (generation, slots, flash).
    let refused = |s: &mut Services<TestHw>, d: &keel_provision::Device, why: &str| {
        let before = (s.function_slots(), s.plan.generation);
        let e = s
            .push(&signed_bundle(d, s.plan.generation + 1))
            .unwrap_err();
        assert!(e.contains(why), "{why}: {e}");
        assert!(e.contains("unchanged"), "{e}");
        assert_eq!((s.function_slots(), s.plan.generation), before);
    };
    let mut no_slot = two.clone();
    no_slot.namespaces[3].function = Some(5);
    refused(&mut s, &no_slot, "the device has 3 function slot(s)");
    let mut other = two.clone();
    other.subsystems.push(sub("nqn.2026-12.test:other"));
    other.namespaces.retain(|n| n.subsystem != VF);
    other.subsystems.retain(|x| x.nqn != VF);
    other
        .namespaces
        .push(ns("nqn.2026-12.test:other", 1, 1, Encryption::None));
    other.nguids.clear();
    refused(&mut s, &other, "does not give a slot to another subsystem");

    // Generation 3 drops the VF: removed live; the PF keeps running with its data.
    let mut three = two.clone();
    three.namespaces.retain(|n| n.subsystem != VF);
    three.subsystems.retain(|x| x.nqn != VF);
    three.nguids.clear();
    keel_provision::assign_nguids(&mut three, Some(&two), &mut |b: &mut [u8]| b.fill(9));
    let r = s.push(&signed_bundle(&three, 3)).unwrap();
    assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
    assert_eq!(r.removed, [(String::from(VF), 1)]);
    assert!(!s.target.subsystem_views().any(|x| x.nqn == VF));
    assert_eq!(s.function_slots()[1].state, SlotState::Removing);
    // While it is removing, slot 1 cannot be given a function.
    refused(&mut s, &two, "still has commands at backends");
    for _ in 0..20 {
        advance(10_000);
        s.poll(now(), None);
    }
    assert_eq!(s.function_slots()[1].state, SlotState::Free);
    for nsid in [1u32, 2] {
        h.window(&mut s).host_write(buf, &[0; 4096]);
        let r = RwCommand::simple(8, 8).to_sqe(IoOpcode::Read as u8, 21, nsid);
        h.submit(&mut s, 1, r.with_prps(buf, 0));
        assert!(fn_wait(&mut s, &mut h, 1).status.is_success());
        let mut got = [0u8; 4096];
        h.window(&mut s).host_read(buf, &mut got);
        assert_eq!(got, [0xC0 + nsid as u8; 4096], "PF namespace {nsid}");
    }

    // A function created by a request on slot 1 (encrypted, device-drawn key and NGUID)...
    let spec = FunctionSpec {
        limits: vec![QosLimit {
            name: "iops".into(),
            per_sec: 5000,
            burst: 0,
        }],
        ..one_mib_function(1, VF, FunctionCipher::Aes128Xts)
    };
    s.create_function(&spec).unwrap();
    let created = |s: &Services<TestHw>| {
        let n = s
            .plan
            .namespaces
            .iter()
            .find(|n| n.subsystem == VF)
            .unwrap();
        (s.plan.nguid_of(n), n.cipher)
    };
    let (g1, cipher) = created(&s);
    assert_eq!(cipher, "aes-128-xts");
    assert!(!pushed.iter().any(|p| p.2 == g1), "an NGUID came back");
    // ...a push cannot give its slot to another subsystem...
    let mut grab = three.clone();
    grab.subsystems.push(sub("nqn.2026-12.test:x"));
    grab.namespaces
        .push(ns("nqn.2026-12.test:x", 1, 1, Encryption::None));
    grab.nguids.clear();
    refused(&mut s, &grab, "created by keelctl function create");
    // ...and after its removal, created again, it gets new NGUIDs.
    s.remove_function(1).unwrap();
    for _ in 0..20 {
        advance(10_000);
        s.poll(now(), None);
    }
    s.create_function(&spec).unwrap();
    let (g2, _) = created(&s);
    assert_ne!(
        g1, g2,
        "a function created again reused the NGUID of the removed one"
    );

    // Generation 4 describes it as it runs (plain, the bundle's own NGUID): adopted, kept
    // live; the key and NGUID of the description apply from the next boot.
    let mut four = three.clone();
    four.subsystems.push(sub(VF));
    four.namespaces.push(ns(VF, 1, 1, Encryption::Aes128Xts));
    keel_provision::assign_nguids(&mut four, Some(&three), &mut |b: &mut [u8]| b.fill(0x33));
    let r = s.push(&signed_bundle(&four, 4)).unwrap();
    assert_eq!(s.function_slots()[1].origin, "pushed");
    let notes = r.needs_reboot.join("\n");
    assert!(
        notes.contains("data key changed") && notes.contains("another NGUID"),
        "{notes}"
    );

    // A reboot: the flash holds generation 4; the functions are back, same NGUIDs.
    let flash = s.identity.flash.take().unwrap();
    let mut identity: Identity<RamFlash> = Identity::new(None, Some(flash));
    let (cfg, src) = identity.load_config().unwrap();
    assert_eq!(cfg.generation, 4);
    let plan = Plan::from_bundle(&cfg, src, MAC, PROVISION_PUBKEY);
    let s2: Services<TestHw> = Services::build(plan, Vec::new(), windows(3), true, identity);
    let slots = s2.function_slots();
    assert_eq!(
        slots
            .iter()
            .map(|x| (x.state, x.subsystem.as_str()))
            .collect::<Vec<_>>(),
        [
            (SlotState::Live, PF),
            (SlotState::Live, VF),
            (SlotState::Free, "")
        ]
    );
    let after = nguids(&s2);
    for (nqn, nsid, g) in &after {
        let j = four
            .namespaces
            .iter()
            .position(|n| n.subsystem == *nqn && n.nsid == *nsid)
            .unwrap();
        assert_eq!(Some(*g), four.nguid(j), "{nqn} {nsid}");
    }
    assert!(
        after
            .iter()
            .filter(|a| a.0 == PF)
            .all(|a| pushed.contains(a))
    );
}

/// A function created by a request with a remote namespace (issue 18): an encrypted slice of
/// the device's own NSID 1 reached over smoltcp's Loopback by the firmware's initiator. It
/// joins the function's subsystem once identified; the function's host writes and reads it
/// back (plain through the function, ciphertext on the remote); removing the function leaves
/// the remote volume nothing to export.
#[test]
fn a_created_function_can_have_an_encrypted_remote_namespace() {
    use keel_mgmt::Device as _;
    use keel_mgmt::{FunctionBackend, FunctionCipher};
    let nqn = crate::config::DEFAULT_NQN;
    const VF: &str = "nqn.2026-12.test:remote-vf";
    let mut dev = Device::with_windows(
        "keel.ns=ram:16 keel.fn.boot=0",
        vec![MemWindow::new(1 << 20)],
    );
    let mut spec = one_mib_function(0, VF, FunctionCipher::Aes256Xts);
    spec.namespaces[0].backend = FunctionBackend::Remote {
        nqn: nqn.into(),
        paths: vec![([127, 0, 0, 1], 4420)],
        nsid: 1,
        offset: 8 << 20,
        length: 0,
    };
    dev.services.create_function(&spec).unwrap();
    assert!(
        !dev.services.target.has_namespace(VF, 1),
        "not before it is reached"
    );
    for _ in 0..20_000 {
        dev.pass();
        if dev.services.target.has_namespace(VF, 1) {
            break;
        }
    }
    assert!(dev.services.target.has_namespace(VF, 1), "never identified");
    let size = dev
        .services
        .target
        .namespace_views()
        .find(|n| n.subsystem == VF)
        .map(|n| n.geometry.blocks * u64::from(n.geometry.block_size));
    assert_eq!(size, Some(8 << 20), "the slice from 8 MiB to the end");

    let mut h = FnHost::ready(&mut dev.services, 0);
    let buf = h.alloc();
    let mut io = |dev: &mut Device, op: IoOpcode, cid: u16, data: &[u8; 4096]| -> [u8; 4096] {
        h.window(&mut dev.services).host_write(buf, data);
        let c = RwCommand::simple(0, 8).to_sqe(op as u8, cid, 1);
        h.submit(&mut dev.services, 1, c.with_prps(buf, 0));
        for _ in 0..20_000 {
            dev.pass();
            if let Some(c) = h.reap(&mut dev.services, 1) {
                assert!(c.status.is_success(), "{c:?}");
                let mut got = [0u8; 4096];
                h.window(&mut dev.services).host_read(buf, &mut got);
                return got;
            }
        }
        panic!("no completion");
    };
    io(&mut dev, IoOpcode::Write, 30, &[0x6c; 4096]);
    assert_eq!(io(&mut dev, IoOpcode::Read, 31, &[0; 4096]), [0x6c; 4096]);
    // On the remote namespace (the device's own, 8 MiB in): ciphertext.
    let (_admin, mut q) = enabled_io_queue(&mut dev, 50_020, nqn);
    let stored = rw(&mut dev, &mut q, false, 1, 16_384, vec![0; 4096]);
    assert_ne!(stored, vec![0x6c; 4096], "plaintext on the remote");
    assert_ne!(stored, vec![0; 4096], "nothing written on the remote");

    dev.services.remove_function(0).unwrap();
    for _ in 0..100 {
        dev.pass();
    }
    let snap = dev.services.snapshot();
    assert!(
        snap.remotes.iter().all(|r| r.exports.is_empty()),
        "{:?}",
        snap.remotes
    );
    assert!(!dev.services.target.has_namespace(VF, 1));
}

/// A description in force that names a function slot the device lacks (logged at boot) still
/// takes pushes that leave it as it is; a push that asks for another missing slot is refused.
#[test]
fn a_missing_slot_refuses_only_the_push_that_asks_for_it() {
    use keel_mgmt::Device as _;
    let mut desc = dev_device();
    desc.namespaces[0].function = Some(4);
    let identity: Identity<RamFlash> = Identity::new(None, None);
    let cfg = identity.open(&signed_bundle(&desc, 1), 0).unwrap();
    let plan = Plan::from_bundle(&cfg, Source::Push, MAC, PROVISION_PUBKEY);
    let windows = vec![WindowPort {
        base: 0x1000_0000,
        size: 1 << 20,
        ep: Ok(MemWindow::new(1 << 20)),
    }];
    let mut s: Services<TestHw> = Services::build(plan, Vec::new(), windows, true, identity);
    desc.qos.groups.push(keel_provision::QosGroup {
        name: "g".into(),
        limits: keel_provision::QosLimits::default(),
        weight: 2,
    });
    s.push(&signed_bundle(&desc, 2)).unwrap();
    desc.namespaces[0].function = Some(6);
    let e = s.push(&signed_bundle(&desc, 3)).unwrap_err();
    assert!(
        e.contains("function 6") && e.contains("1 function slot(s)"),
        "{e}"
    );
    assert_eq!(s.plan.generation, 2);
}

/// Issue 17, functions created live at `--smp N` (`crate::fnq`): once the functions' hub
/// serves pairs on other cores (`Replication::functions`, set by `fnq::Hub::start`), a
/// function created live whose subsystem qualifies has its RAM made in a shared region and is
/// announced to the hub with the replica the other cores add (`FnEvent::Created`): the
/// blocks its host writes through core 0 are in that region, and a replica target takes the
/// subsystem (once). A function with limits is announced too (its controller's limits go
/// with each pair, `keel_controller::Adoption::limits`); one at one core (no hub) is not;
/// a removal is (`FnEvent::Changed`: its pairs come home, the replicas drop the subsystem),
/// and the function created again on the slot, encrypted this time, is announced again and
/// the replica takes it again.
#[test]
fn a_function_created_live_is_made_for_every_core() {
    use crate::replica::FnEvent;
    use crate::services::{
        RamSharing, ReplicaSource, ReplicaSubsystem, add_replica_subsystem, replica_target_shares,
    };
    use keel_mgmt::Device as _;
    use keel_mgmt::{FunctionCipher, FunctionSpec, QosLimit};
    let build = |share| {
        Services::<TestHw>::build_with(
            dev_plan("keel.fn.boot=0", 2),
            Vec::new(),
            two_windows(),
            true,
            Identity::new(None, None),
            share,
        )
    };
    let created = |s: &mut Services<TestHw>, slot: u16| -> Option<ReplicaSubsystem> {
        s.replication.fn_events.drain(..).find_map(|e| match e {
            FnEvent::Created { slot: x, subsystem } if x == slot => Some(*subsystem),
            _ => None,
        })
    };
    let nqn = "nqn.2026-12.test:live";
    let mut s = build(RamSharing::Functions);
    s.replication.functions = true;
    s.create_function(&one_mib_function(0, nqn, FunctionCipher::None))
        .unwrap();
    let sub = created(&mut s, 0).expect("the function is announced to the hub");
    assert_eq!(sub.nqn, nqn);
    assert_eq!(sub.namespaces.len(), 1);
    let ReplicaSource::Ram(region) = &sub.namespaces[0].source else {
        panic!("a RAM namespace in a shared region: {sub:?}")
    };
    assert!(sub.namespaces[0].key.is_none());

    // What the host writes through core 0 lands in the shared region.
    let mut h = FnHost::ready(&mut s, 0);
    let buf = h.alloc();
    h.window(&mut s).host_write(buf, &[0x5C; 4096]);
    let w = RwCommand::simple(100, 8).to_sqe(IoOpcode::Write as u8, 11, 1);
    h.submit(&mut s, 1, w.with_prps(buf, 0));
    assert!(fn_wait(&mut s, &mut h, 1).status.is_success());
    let mut direct = vec![0u8; 4096];
    keel_storage::BlockBackend::read_now(&mut region.handle(1), 100, 8, &mut direct).unwrap();
    assert!(direct.iter().all(|&b| b == 0x5C), "core 0 wrote elsewhere");

    // A core's replica (built at boot with no function) takes the subsystem, once.
    let (mut replica, mut shares) =
        replica_target_shares(Vec::new(), *s.target.limits(), &mut |_, _| None)
            .expect("an empty replica");
    assert!(add_replica_subsystem(
        &mut replica,
        &mut shares,
        &sub,
        &mut |_, _| None
    ));
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
    assert_eq!(views, [(nqn.to_string(), 1, 1 << 20)]);
    assert!(!add_replica_subsystem(
        &mut replica,
        &mut shares,
        &sub,
        &mut |_, _| None
    ));

    // With limits: announced too, and its controller has them before its first I/O queue
    // exists (set when its admin queue appears), so the pair's adoption carries them.
    s.create_function(&FunctionSpec {
        limits: vec![QosLimit {
            name: "write_iops".into(),
            per_sec: 1000,
            burst: 0,
        }],
        ..one_mib_function(1, "nqn.2026-12.test:limited", FunctionCipher::None)
    })
    .unwrap();
    let limited = created(&mut s, 1).expect("a function with limits is announced");
    assert_eq!(limited.nqn, "nqn.2026-12.test:limited");
    s.functions[1].f.as_mut().unwrap().set_cores(2);
    let _h1 = FnHost::ready(&mut s, 1);
    let f1 = s.functions[1].f.as_mut().unwrap();
    assert!(matches!(
        f1.take_handover(),
        Some(keel_nvme_pcie::Handover::Export { core: 1, .. })
    ));
    let q1 = f1.core_queue(1).expect("the pair's core queue");
    let a = s.target.adoption(q1).expect("an adoption");
    assert_eq!(a.limits.write_iops.map(|r| r.per_sec), Some(1000));
    assert!(add_replica_subsystem(
        &mut replica,
        &mut shares,
        &limited,
        &mut |_, _| None
    ));
    let rq = replica.open_queue_for(7).unwrap();
    replica
        .adopt_io_queue(keel_controller::Instant::from_nanos(now()), rq, &a)
        .unwrap();
    assert_eq!(
        replica.shared_limits().map(|l| l.key).collect::<Vec<_>>(),
        [keel_controller::controller_key(&a.subnqn, a.cntlid)],
        "core 1's replica of the controller has the limits, under the controller's key"
    );

    // Removed: the hub hears of it; the replica drops the subsystem.
    s.remove_function(0).unwrap();
    assert!(
        s.replication
            .fn_events
            .iter()
            .any(|e| matches!(e, FnEvent::Changed(n) if n == nqn)),
        "{:?}",
        s.replication.fn_events
    );
    s.replication.fn_events.clear();
    replica.remove_subsystem(nqn).unwrap();
    for _ in 0..50 {
        advance(10_000);
        s.poll(now(), None);
    }
    assert_eq!(s.functions[0].slot, keel_mgmt::SlotState::Free);
    // Its shared RAM goes with the last holder (here: this test's copy of the description).
    let ram = region.watch();
    drop(sub);
    assert!(
        ram.upgrade().is_none(),
        "the removed function's RAM is freed"
    );

    // Created again on the slot (encrypted): announced again, taken again.
    s.create_function(&one_mib_function(0, nqn, FunctionCipher::Aes256Xts))
        .unwrap();
    let again = created(&mut s, 0).expect("announced again");
    assert!(again.namespaces[0].key.is_some());
    let ReplicaSource::Ram(region2) = &again.namespaces[0].source else {
        panic!("a RAM namespace in a shared region: {again:?}")
    };
    keel_storage::BlockBackend::read_now(&mut region2.handle(1), 100, 8, &mut direct).unwrap();
    assert!(
        direct.iter().all(|&b| b == 0),
        "a new function's storage starts zeroed"
    );
    assert!(add_replica_subsystem(
        &mut replica,
        &mut shares,
        &again,
        &mut |_, _| None
    ));
    assert_eq!(
        replica.namespace_views().count(),
        2,
        "the limited function's and this one's"
    );

    // One core: no hub, nothing announced.
    let mut one = build(RamSharing::None);
    one.create_function(&one_mib_function(0, nqn, FunctionCipher::None))
        .unwrap();
    assert!(one.replication.fn_events.is_empty());
}

/// Issue 17, functions a pushed description creates at `--smp N` (`crate::fnq`): a function
/// the push puts on a free slot, whose subsystem qualifies under the pushed plan's QoS, is
/// made as one created live is: its RAM in a shared region (what its host writes through core
/// 0 lands there) and announced to the functions' hub (`FnEvent::Created`) once the pushed
/// QoS is in force; pushed out again, the hub hears of it and its RAM goes with the last
/// holder. One the push gives limits (on the function, on its namespace, its namespace in a
/// group) is announced too, its replica with its namespace's limits and group (a core's
/// replica target adds the group); one on a subsystem that runs already is not.
#[test]
fn a_function_a_push_creates_is_made_for_every_core() {
    use crate::replica::FnEvent;
    use crate::services::{RamSharing, ReplicaSource, ReplicaSubsystem};
    use keel_mgmt::Device as _;
    use keel_provision::{
        Backend, Encryption, FunctionQos, Namespace, NamespaceQos, QosGroup, QosLimits, QosRate,
    };
    const PUSHED: &str = "nqn.2026-12.test:pushed";
    let sub = |nqn: &str| keel_provision::Subsystem {
        nqn: nqn.into(),
        serial: None,
        model: None,
        allowed_hosts: vec![],
    };
    let ns = |nqn: &str, function| Namespace {
        subsystem: nqn.into(),
        nsid: 1,
        backend: Backend::Ram {
            size: 1 << 20,
            block_size: 512,
        },
        encryption: Encryption::None,
        function: Some(function),
    };
    let limits = QosLimits {
        write_iops: Some(QosRate {
            per_sec: 20_000,
            burst: Some(200),
        }),
        ..Default::default()
    };
    let build = |share| pushed_services(&dev_device(), share);
    let created = |s: &mut Services<TestHw>, slot: u16| -> Option<ReplicaSubsystem> {
        s.replication.fn_events.drain(..).find_map(|e| match e {
            FnEvent::Created { slot: x, subsystem } if x == slot => Some(*subsystem),
            _ => None,
        })
    };
    let with = |slot: u16, f: &dyn Fn(&mut keel_provision::Device)| {
        let mut d = dev_device();
        d.subsystems.push(sub(PUSHED));
        d.namespaces.push(ns(PUSHED, slot));
        f(&mut d);
        d
    };

    let mut s = build(RamSharing::Functions);
    let r = s.push(&signed_bundle(&with(0, &|_| {}), 2)).unwrap();
    assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
    assert_eq!(s.functions[0].slot, keel_mgmt::SlotState::Live);
    assert_eq!(s.functions[0].origin, "pushed");
    let replica = created(&mut s, 0).expect("the pushed function is announced to the hub");
    assert_eq!(replica.nqn, PUSHED);
    assert_eq!(replica.namespaces.len(), 1);
    let ReplicaSource::Ram(region) = &replica.namespaces[0].source else {
        panic!("a RAM namespace in a shared region: {replica:?}")
    };
    let ram = region.watch();

    // What the host writes through core 0 lands in the shared region.
    let mut h = FnHost::ready(&mut s, 0);
    let buf = h.alloc();
    h.window(&mut s).host_write(buf, &[0xA7; 4096]);
    let w = RwCommand::simple(100, 8).to_sqe(IoOpcode::Write as u8, 11, 1);
    h.submit(&mut s, 1, w.with_prps(buf, 0));
    assert!(fn_wait(&mut s, &mut h, 1).status.is_success());
    let mut direct = vec![0u8; 4096];
    keel_storage::BlockBackend::read_now(&mut region.handle(1), 100, 8, &mut direct).unwrap();
    assert!(direct.iter().all(|&b| b == 0xA7), "core 0 wrote elsewhere");

    // Pushed out: the hub hears of it; its RAM goes with the last holder (here: this test's
    // copy of the replica, as a core's replica once it dropped the subsystem).
    s.push(&signed_bundle(&dev_device(), 3)).unwrap();
    assert!(
        s.replication
            .fn_events
            .iter()
            .any(|e| matches!(e, FnEvent::Changed(n) if n == PUSHED)),
        "{:?}",
        s.replication.fn_events
    );
    s.replication.fn_events.clear();
    for _ in 0..50 {
        advance(10_000);
        s.poll(now(), None);
    }
    assert_eq!(s.functions[0].slot, keel_mgmt::SlotState::Free);
    drop(replica);
    assert!(
        ram.upgrade().is_none(),
        "the pushed-out function's RAM is freed"
    );

    // Limits in the pushed plan: on the function, on its namespace, its namespace in a
    // group. Announced all the same, the replica with the pushed namespace QoS and group.
    type Edit<'a> = &'a dyn Fn(&mut keel_provision::Device);
    let limited: [(&str, Edit); 4] = [
        ("function", &|d| {
            d.qos.functions.push(FunctionQos {
                function: 1,
                limits,
            })
        }),
        ("namespace", &|d| {
            d.qos.namespaces.push(NamespaceQos {
                subsystem: PUSHED.into(),
                nsid: 1,
                limits,
                weight: 1,
                group: None,
            })
        }),
        ("group", &|d| {
            d.qos.groups.push(QosGroup {
                name: "g".into(),
                limits,
                weight: 2,
            })
        }),
        ("namespace in a group", &|d| {
            d.qos.groups.push(QosGroup {
                name: "g".into(),
                limits,
                weight: 2,
            });
            d.qos.namespaces.push(NamespaceQos {
                subsystem: PUSHED.into(),
                nsid: 1,
                limits: Default::default(),
                weight: 1,
                group: Some("g".into()),
            })
        }),
    ];
    for (what, f) in limited {
        let mut s = build(RamSharing::Functions);
        let r = s.push(&signed_bundle(&with(1, f), 2)).unwrap();
        assert!(r.needs_reboot.is_empty(), "{what}: {:?}", r.needs_reboot);
        assert_eq!(s.functions[1].slot, keel_mgmt::SlotState::Live, "{what}");
        let sub = created(&mut s, 1).unwrap_or_else(|| panic!("{what}: not announced"));
        let want = s.plan.namespace_qos(
            &s.plan
                .namespaces
                .iter()
                .find(|n| n.subsystem == PUSHED)
                .unwrap()
                .clone(),
        );
        assert_eq!(sub.namespaces[0].qos, want, "{what}");
        assert_eq!(
            sub.groups
                .iter()
                .map(|g| g.name.as_str())
                .collect::<Vec<_>>(),
            if want.group.is_some() {
                vec!["g"]
            } else {
                vec![]
            },
            "{what}"
        );
        // A core's replica target (made with no group) takes it, with its group.
        let (mut replica, mut shares) =
            crate::services::replica_target_shares(Vec::new(), *s.target.limits(), &mut |_, _| {
                None
            })
            .unwrap();
        assert!(
            crate::services::add_replica_subsystem(&mut replica, &mut shares, &sub, &mut |_, _| {
                None
            }),
            "{what}"
        );
        // Its namespace's limits or its group's: one limiter the cores split.
        let split = usize::from(what == "namespace" || what == "namespace in a group");
        assert_eq!(
            replica.shared_limits().count(),
            split,
            "{what}: {:?}",
            replica.shared_limits().collect::<Vec<_>>()
        );
    }

    // A second function of a subsystem that runs already: not announced (the cores'
    // replicas would drop the subsystem with it).
    let mut s = build(RamSharing::Functions);
    s.push(&signed_bundle(&with(0, &|_| {}), 2)).unwrap();
    assert!(created(&mut s, 0).is_some());
    let second = with(0, &|d| {
        d.namespaces.push(Namespace {
            nsid: 2,
            ..ns(PUSHED, 1)
        })
    });
    let r = s.push(&signed_bundle(&second, 3)).unwrap();
    assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
    assert_eq!(s.functions[1].slot, keel_mgmt::SlotState::Live);
    assert_eq!(s.functions[1].nqn, PUSHED);
    assert!(created(&mut s, 1).is_none());

    // One core: no hub, nothing announced.
    let mut one = build(RamSharing::None);
    one.push(&signed_bundle(&with(0, &|_| {}), 2)).unwrap();
    assert_eq!(one.functions[0].slot, keel_mgmt::SlotState::Live);
    assert!(one.replication.fn_events.is_empty());
}

/// A function a push attaches to a subsystem that runs already (here the boot description's
/// NVMe/TCP subsystem, whose RAM namespace every core serves: the push gives it `function =
/// 1`) is announced to the functions' hub with the subsystem as core 0 describes it for the
/// other cores, so its I/O queues spread (`crate::fnq::Hub` adds the subsystem to the other
/// cores, or the slot to the subsystem's functions there). Not when the subsystem's RAM is
/// not in shared regions, nor once the subsystem is dropped.
#[test]
fn a_function_a_push_attaches_to_a_running_subsystem_is_announced() {
    use crate::replica::FnEvent;
    use crate::services::{RamSharing, ReplicaSource};
    use keel_mgmt::Device as _;
    let build = |share| pushed_services(&dev_device(), share);
    let vol = "nqn.2026-12.test:vol";
    let mut attached = dev_device();
    attached.namespaces[0].function = Some(1);
    let announced = |s: &mut Services<TestHw>| {
        s.replication.fn_events.drain(..).find_map(|e| match e {
            FnEvent::Created { slot: 1, subsystem } => Some(*subsystem),
            _ => None,
        })
    };

    let mut s = build(RamSharing::All);
    let r = s.push(&signed_bundle(&attached, 2)).unwrap();
    assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
    assert_eq!(s.functions[1].slot, keel_mgmt::SlotState::Live);
    assert_eq!(s.functions[1].nqn, vol);
    let replica = announced(&mut s).expect("the attached function is announced");
    assert_eq!(replica.nqn, vol);
    assert_eq!(replica.namespaces.len(), 1);
    assert!(
        matches!(replica.namespaces[0].source, ReplicaSource::Ram(_)),
        "{replica:?}"
    );

    // Its RAM is core 0's alone: the function's queues stay there.
    let mut s = build(RamSharing::Functions);
    s.push(&signed_bundle(&attached, 2)).unwrap();
    assert_eq!(s.functions[1].nqn, vol);
    assert!(announced(&mut s).is_none());

    // A subsystem no longer served on every core.
    let mut s = build(RamSharing::All);
    s.replication.drop_subsystem(vol);
    s.replication.fn_events.clear();
    s.push(&signed_bundle(&attached, 2)).unwrap();
    assert_eq!(s.functions[1].nqn, vol);
    assert!(announced(&mut s).is_none());

    // A function moved to another slot on the subsystem a pushed function made (the other
    // cores' functions' replicas have it, core 0 does not describe it): slot 1's goes, slot
    // 0's is attached and joins its pairs (`FnEvent::Attached`).
    const PUSHED: &str = "nqn.2026-12.test:moved";
    let mut s = build(RamSharing::Functions);
    let mut d = dev_device();
    d.subsystems.push(keel_provision::Subsystem {
        nqn: PUSHED.into(),
        serial: None,
        model: None,
        allowed_hosts: vec![],
    });
    d.namespaces.push(keel_provision::Namespace {
        subsystem: PUSHED.into(),
        nsid: 1,
        ..d.namespaces[0].clone()
    });
    d.namespaces[1].function = Some(1);
    s.push(&signed_bundle(&d, 2)).unwrap();
    assert!(
        announced(&mut s).is_some_and(|r| r.nqn == PUSHED),
        "slot 1's new subsystem"
    );
    d.namespaces[1].function = Some(0);
    let r = s.push(&signed_bundle(&d, 3)).unwrap();
    assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
    assert_eq!(s.functions[0].nqn, PUSHED);
    assert_eq!(s.functions[1].slot, keel_mgmt::SlotState::Removing);
    let events = core::mem::take(&mut s.replication.fn_events);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, FnEvent::Attached { slot: 0, nqn } if nqn == PUSHED)),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| matches!(e, FnEvent::Changed(_))),
        "the subsystem stays where it is: {events:?}"
    );
}

/// Issue 17, a boot function with controller limits (`[[qos.function]]`) at `--smp N`: its
/// subsystem is listed for the functions' pairs like any other, the function's controller has
/// its limits before its first I/O queue leaves core 0 (the hub's `Target::adoption` of the
/// exported pair carries them), core 0 and another core's replica of the controller list it
/// under one `controller_key` and split its 2000 IOPS through the demand table. A push that
/// leaves the functions' limits as they are (but changes QoS) drops nothing and sends
/// nothing to the functions' cores; one that changes a function's limits drops nothing
/// either (before, its subsystem was dropped and its pairs came home): the hub is handed the
/// change (`FnEvent::Qos`) with the function's controller's new limits, and core 1's replica
/// target (made as `fnq::FnCore` makes it) applying it as `FnCore::apply_qos` does
/// (`FnMsg::Qos`) has them on its replica of the controller, still under the same key,
/// split again with core 0 from the new 3000 IOPS; NVMe/TCP planes serving the subsystem
/// too get a `ReplicaOp::Qos` of it as well.
#[test]
fn a_boot_function_with_limits_is_served_by_every_core_and_its_new_limits_reach_every_core() {
    use crate::replica::FnEvent;
    use crate::services::{RamSharing, apply_replica_qos, replica_target_shares};
    use keel_mgmt::Device as _;
    use keel_nvme_pcie::Handover;
    use keel_provision::{Backend, Encryption, FunctionQos, Namespace, QosLimits, QosRate};
    const FA: &str = "nqn.2026-12.test:fa";
    const FB: &str = "nqn.2026-12.test:fb";
    let iops = |per_sec| QosLimits {
        iops: Some(QosRate {
            per_sec,
            burst: None,
        }),
        ..Default::default()
    };
    let device = |fa_iops: u64, inflight: Option<u32>| {
        let mut d = dev_device();
        for (slot, nqn) in [(0u16, FA), (1, FB)] {
            d.subsystems.push(keel_provision::Subsystem {
                nqn: nqn.into(),
                serial: None,
                model: None,
                allowed_hosts: vec![],
            });
            d.namespaces.push(Namespace {
                subsystem: nqn.into(),
                nsid: 1,
                backend: Backend::Ram {
                    size: 1 << 20,
                    block_size: 512,
                },
                encryption: Encryption::None,
                function: Some(slot),
            });
        }
        d.qos.functions.push(FunctionQos {
            function: 0,
            limits: iops(fa_iops),
        });
        d.qos.drive_max_inflight = inflight;
        d
    };
    let mut s = pushed_services(&device(2000, None), RamSharing::Functions);
    let listed: Vec<String> = s
        .function_replicas()
        .iter()
        .map(|r| r.nqn.clone())
        .collect();
    assert!(
        listed.iter().any(|n| n == FA) && listed.iter().any(|n| n == FB),
        "both functions are served by every core: {listed:?}"
    );

    // As `fnq::Hub` does at `--smp 2`: queue 1 goes to core 1 with the controller's
    // adoption, taken after the function's poll that created it.
    s.functions[0].f.as_mut().unwrap().set_cores(2);
    let _h = FnHost::ready(&mut s, 0);
    let f = s.functions[0].f.as_mut().unwrap();
    let Some(Handover::Export { core, pair }) = f.take_handover() else {
        panic!("queue 1 is handed to core 1")
    };
    assert_eq!((core, pair.qid()), (1, 1));
    let q = f.core_queue(1).expect("the pair's core queue");
    let adoption = s.target.adoption(q).expect("an adoption");
    assert_eq!(
        adoption.limits.iops.map(|r| r.per_sec),
        Some(2000),
        "the function's limits go with its pair"
    );
    let (mut replica, _shares) =
        replica_target_shares(s.function_replicas(), *s.target.limits(), &mut |_, _| None)
            .expect("a replica of the functions' subsystems");
    let rq = replica.open_queue_for(7).unwrap();
    replica
        .adopt_io_queue(keel_controller::Instant::from_nanos(now()), rq, &adoption)
        .unwrap();
    let key = keel_controller::controller_key(FA, adoption.cntlid);
    let on0: Vec<_> = s.target.shared_limits().collect();
    let on1: Vec<_> = replica.shared_limits().collect();
    assert_eq!(on0.iter().map(|l| l.key).collect::<Vec<_>>(), [key]);
    assert_eq!(on1.iter().map(|l| l.key).collect::<Vec<_>>(), [key]);
    let table: Vec<crate::shares::DemandRow> = (0..crate::shares::DEMAND_ROWS)
        .map(|_| crate::shares::DemandRow::new())
        .collect();
    let mut x0 = crate::shares::LimitSharing::new(crate::shares::demand_row(0, false));
    let mut x1 = crate::shares::LimitSharing::new(crate::shares::demand_row(1, true));
    x0.tend(&table, 0b11, 0, &mut s.target);
    x1.tend(&table, 0b11, 0, &mut replica);
    x0.tend(&table, 0b11, 0, &mut s.target);
    let per_sec = |t: &keel_controller::Target, l| t.limits_in_force(l).iops.unwrap().per_sec;
    assert_eq!(
        per_sec(&s.target, on0[0].limiter) + per_sec(&replica, on1[0].limiter),
        2000,
        "core 0 and core 1 split the function's limit"
    );
    let part_before = per_sec(&replica, on1[0].limiter);

    // QoS changed, the functions' limits not: nothing is dropped.
    s.replication.fn_events.clear();
    let r = s.push(&signed_bundle(&device(2000, Some(32)), 2)).unwrap();
    assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
    assert!(
        s.replication.dropped.is_empty(),
        "{:?}",
        s.replication.dropped
    );
    assert!(
        s.replication.fn_events.is_empty(),
        "{:?}",
        s.replication.fn_events
    );
    // Function 0's limits changed: nothing is dropped, the hub gets the change. The
    // NVMe/TCP planes serve fa too here (as `percore::Holder::start` leaves it with core 1
    // serving it): they get it as well (`ReplicaOp::Qos`).
    s.replication.cores = 0b10;
    s.replication.subsystems = vec![String::from(FA)];
    let r = s.push(&signed_bundle(&device(3000, Some(32)), 3)).unwrap();
    let staged = s.replication.take_unsent(now(), 0b10);
    assert_eq!(staged.len(), 1, "{staged:?}");
    let crate::replica::ReplicaOp::Qos(planes) = &staged[0].op else {
        panic!("{staged:?}")
    };
    assert_eq!(staged[0].subsystem, FA);
    assert_eq!(
        planes
            .controllers
            .iter()
            .map(|(c, _)| *c)
            .collect::<Vec<_>>(),
        [adoption.cntlid]
    );
    assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
    assert!(
        s.replication.dropped.is_empty(),
        "{:?}",
        s.replication.dropped
    );
    let events = core::mem::take(&mut s.replication.fn_events);
    assert!(
        !events.iter().any(|e| matches!(e, FnEvent::Changed(_))),
        "its pairs stay: {events:?}"
    );
    let qos = events
        .into_iter()
        .find_map(|e| match e {
            FnEvent::Qos { nqn, qos } if nqn == FA => Some(qos),
            _ => None,
        })
        .expect("the hub is handed fa's new QoS");
    assert_eq!(
        qos.controllers
            .iter()
            .map(|(c, l)| (*c, l.iops.map(|r| r.per_sec)))
            .collect::<Vec<_>>(),
        [(adoption.cntlid, Some(3000))],
        "the function's controller with its new limits"
    );
    // Core 0's controller has the new limits.
    let now_adopted = s.target.adoption(q).expect("an adoption");
    assert_eq!(now_adopted.limits.iops.map(|r| r.per_sec), Some(3000));
    // Core 1 applies it: its replica of the controller keeps its key and takes the new
    // limits, split again with core 0 by demand.
    assert!(apply_replica_qos(&mut replica, FA, &qos));
    let on1: Vec<_> = replica.shared_limits().collect();
    assert_eq!(on1.iter().map(|l| l.key).collect::<Vec<_>>(), [key]);
    assert_eq!(
        per_sec(&replica, on1[0].limiter),
        part_before * 3000 / 2000,
        "its part scales with the new limits until the next split"
    );
    x1.tend(&table, 0b11, 0, &mut replica);
    x0.tend(&table, 0b11, 0, &mut s.target);
    x1.tend(&table, 0b11, 0, &mut replica);
    x0.tend(&table, 0b11, 0, &mut s.target);
    assert_eq!(
        per_sec(&s.target, on0[0].limiter) + per_sec(&replica, on1[0].limiter),
        3000,
        "core 0 and core 1 split the function's new limit"
    );
}

/// Issue 17, a boot function's RAM at `--smp N` (`crate::fnq`): its namespace is in a
/// shared region every core's replica serves. Removed (a management request or a push),
/// core 0 lets go of every reference of its own (its target's namespace, the description of
/// what other cores serve): once the other cores' replicas dropped the subsystem
/// (`FnMsg::Remove`, here a replica target made as core 1 makes it), the memory is freed.
#[test]
fn a_boot_functions_ram_is_freed_when_it_is_removed() {
    use crate::replica::FnEvent;
    use crate::services::{RamSharing, ReplicaSource, replica_target_shares};
    use keel_mgmt::Device as _;
    let mut s = Services::<TestHw>::build_with(
        dev_plan("keel.fn.ram=4", 2),
        Vec::new(),
        two_windows(),
        true,
        Identity::new(None, None),
        RamSharing::Functions,
    );
    s.replication.functions = true;
    let replicas = s.function_replicas();
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    let nqn = replicas[0].nqn.clone();
    assert_eq!(nqn, s.functions[0].nqn);
    let ReplicaSource::Ram(region) = &replicas[0].namespaces[0].source else {
        panic!("a RAM namespace in a shared region: {replicas:?}")
    };
    let ram = region.watch();
    let ReplicaSource::Ram(other) = &replicas[1].namespaces[0].source else {
        panic!("a RAM namespace in a shared region: {replicas:?}")
    };
    let other = other.watch();
    // Core 1's replica of both functions' subsystems.
    let (mut replica, _shares) =
        replica_target_shares(replicas, *s.target.limits(), &mut |_, _| None).expect("a replica");
    assert_eq!(replica.namespace_views().count(), 2);

    s.remove_function(0).unwrap();
    assert!(
        s.replication
            .fn_events
            .iter()
            .any(|e| matches!(e, FnEvent::Changed(n) if *n == nqn)),
        "the hub hears of it: {:?}",
        s.replication.fn_events
    );
    for _ in 0..50 {
        advance(10_000);
        s.poll(now(), None);
    }
    assert_eq!(s.functions[0].slot, keel_mgmt::SlotState::Free);
    assert!(ram.upgrade().is_some(), "core 1's replica still serves it");
    replica.remove_subsystem(&nqn).unwrap();
    for _ in 0..10 {
        advance(10_000);
        let _ = replica.poll(keel_controller::Instant::from_nanos(now()), &mut |_| {});
    }
    assert!(
        ram.upgrade().is_none(),
        "the removed boot function's RAM is freed once core 1 dropped it"
    );
    // The other boot function's is not.
    assert!(other.upgrade().is_some());
    assert_eq!(replica.namespace_views().count(), 1);
}

/// A pushed function on a namespace with a QoS limit spreads with its replica carrying the
/// limit; core 0 does not describe its subsystem for the NVMe/TCP planes
/// (`Services::replicable`), so a later QoS push compares its namespaces' QoS with what it
/// was before the push: a push changing QoS elsewhere (another namespace's limit) sends the
/// functions' cores nothing, one changing its namespace's limit leaves its pairs where they
/// are too (before, they came home: `FnEvent::Changed`) and hands the hub the new limit
/// (`FnEvent::Qos`), which core 1's replica target (the pushed function's subsystem added as
/// `FnMsg::Add` adds it) applies to its namespace as `fnq::FnCore::apply_qos` does.
#[test]
fn a_later_qos_push_reaches_a_pushed_functions_cores_only_when_its_namespaces_qos_changes() {
    use crate::replica::FnEvent;
    use crate::services::RamSharing;
    use crate::services::{add_replica_subsystem, apply_replica_qos, replica_target_shares};
    use keel_mgmt::Device as _;
    use keel_provision::{NamespaceQos, QosLimits, QosRate};
    const PUSHED: &str = "nqn.2026-12.test:limited-fn";
    let mut s = pushed_services(&dev_device(), RamSharing::Functions);
    let iops = |n: u64| QosLimits {
        iops: Some(QosRate {
            per_sec: n,
            burst: None,
        }),
        ..Default::default()
    };
    let rule = |nqn: &str, n: u64| NamespaceQos {
        subsystem: nqn.into(),
        nsid: 1,
        limits: iops(n),
        weight: 1,
        group: None,
    };
    let device = |own: u64, other: u64| {
        let mut d = dev_device();
        d.subsystems.push(keel_provision::Subsystem {
            nqn: PUSHED.into(),
            serial: None,
            model: None,
            allowed_hosts: vec![],
        });
        d.namespaces.push(keel_provision::Namespace {
            subsystem: PUSHED.into(),
            function: Some(0),
            ..d.namespaces[0].clone()
        });
        d.qos.namespaces = vec![rule(PUSHED, own), rule("nqn.2026-12.test:vol", other)];
        d
    };
    let changed = |s: &mut Services<TestHw>| {
        let events = core::mem::take(&mut s.replication.fn_events);
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, FnEvent::Changed(n) if n == PUSHED)),
            "its pairs come home: {events:?}"
        );
        events.into_iter().find_map(|e| match e {
            FnEvent::Qos { nqn, qos } if nqn == PUSHED => Some(qos),
            _ => None,
        })
    };
    let r = s.push(&signed_bundle(&device(2000, 5000), 2)).unwrap();
    assert!(r.needs_reboot.is_empty(), "{:?}", r.needs_reboot);
    let events = core::mem::take(&mut s.replication.fn_events);
    let replica = events
        .iter()
        .find_map(|e| match e {
            FnEvent::Created { slot: 0, subsystem } => Some(subsystem),
            _ => None,
        })
        .expect("the pushed function spreads");
    assert_eq!(
        replica.namespaces[0].qos.limits.iops.map(|r| r.per_sec),
        Some(2000),
        "its replica carries the namespace's limit"
    );
    // Core 1's replica with the pushed function's subsystem (as `FnMsg::Add` adds it).
    let (mut fc, mut shares) =
        replica_target_shares(Vec::new(), *s.target.limits(), &mut |_, _| None).unwrap();
    assert!(add_replica_subsystem(
        &mut fc,
        &mut shares,
        replica,
        &mut |_, _| None
    ));
    let limit = |fc: &keel_controller::Target| {
        fc.namespace_views()
            .find(|v| v.subsystem == PUSHED && v.nsid == 1)
            .and_then(|v| v.qos_config.limits.iops)
            .map(|r| r.per_sec)
    };
    assert_eq!(limit(&fc), Some(2000));
    // Another namespace's limit changes: nothing for the function's cores.
    s.push(&signed_bundle(&device(2000, 6000), 3)).unwrap();
    assert!(
        changed(&mut s).is_none(),
        "a QoS change elsewhere reached them"
    );
    // Its own namespace's limit changes: the pairs stay, the cores get the new limit.
    s.push(&signed_bundle(&device(1000, 6000), 4)).unwrap();
    let qos = changed(&mut s).expect("the hub is handed the new QoS");
    assert_eq!(
        qos.namespaces
            .iter()
            .map(|(id, q)| (*id, q.limits.iops.map(|r| r.per_sec)))
            .collect::<Vec<_>>(),
        [(1, Some(1000))]
    );
    assert!(s.replication.dropped.is_empty());
    assert!(apply_replica_qos(&mut fc, PUSHED, &qos));
    assert_eq!(limit(&fc), Some(1000), "core 1's replica has the new limit");
    // The next push compares with what the replicas have now: unchanged, nothing is sent.
    s.push(&signed_bundle(&device(1000, 7000), 5)).unwrap();
    assert!(changed(&mut s).is_none());
}
