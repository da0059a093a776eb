//! Host-side tests: drive the target with raw SQEs like an NVMe-oF host would.

use crate::*;
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use keel_nvme::fabrics::{CNTLID_DYNAMIC, ConnectCommand, ConnectData, PropertyCommand};
use keel_nvme::identify::{IdentifyCommand, IdentifyController, IdentifyNamespace};
use keel_nvme::io::{AbortCommand, DsmCommand, DsmRange, FeaturesCommand, RwCommand};
use keel_nvme::log::{GetLogPageCommand, discovery};
use keel_nvme::regs::{Cap, Csts};
use keel_nvme::{AdminOpcode, IoOpcode, Sqe, Status};
use keel_storage::{BlockBackend, BlockOp, RamBackend};

pub(crate) const SUB: &str = "nqn.2024-01.io.keel:sub1";
const PRIV: &str = "nqn.2024-01.io.keel:private";
pub(crate) const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:host-a";
const OK_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:allowed";
const HOSTID: [u8; 16] = [0x11; 16];
pub(crate) const BLOCKS: u64 = 2048;

fn ram(depth: usize) -> Box<dyn BlockBackend> {
    Box::new(RamBackend::new(512, BLOCKS, depth).unwrap())
}

pub(crate) fn ns(nsid: u32, depth: usize) -> NamespaceConfig {
    NamespaceConfig {
        nsid,
        backend: ram(depth),
        nguid: [nsid as u8; 16],
        uuid: [0xA0 | nsid as u8; 16],
        eui64: [0; 8],
        qos: Default::default(),
    }
}

pub(crate) fn config(depth: usize) -> TargetConfig {
    TargetConfig {
        subsystems: vec![
            SubsystemConfig {
                nqn: SUB.into(),
                serial: "KEEL0001".into(),
                model: "Keel RAM".into(),
                allowed_hosts: vec![],
                namespaces: vec![ns(1, depth)],
            },
            SubsystemConfig {
                nqn: PRIV.into(),
                serial: "KEEL0002".into(),
                model: "Keel private".into(),
                allowed_hosts: vec![OK_HOST.into()],
                namespaces: vec![ns(1, depth)],
            },
        ],
        ports: vec![PortEntry::tcp_ipv4("10.0.0.2", "4420", 1)],
        limits: Limits {
            max_controllers: 4,
            ..Limits::default()
        },
        ..Default::default()
    }
}

/// A test host: a target plus a clock and helpers that speak raw SQEs.
pub(crate) struct H {
    pub t: Target,
    pub now: Instant,
    pub cookie: u32,
    pub events: Vec<Event>,
}

impl H {
    pub(crate) fn new() -> Self {
        Self::with(config(64))
    }

    pub(crate) fn with(cfg: TargetConfig) -> Self {
        Self {
            t: Target::new(cfg).unwrap(),
            now: Instant::from_millis(1000),
            cookie: 0,
            events: Vec::new(),
        }
    }

    pub(crate) fn send(
        &mut self,
        q: QueueId,
        sqe: Sqe,
        buf: Option<IoBuf>,
        data_len: u32,
    ) -> Option<Response> {
        self.cookie += 1;
        self.t.submit(
            self.now,
            q,
            Request {
                sqe,
                buf,
                data_len,
                cookie: self.cookie,
            },
        )
    }

    pub(crate) fn poll(&mut self) {
        let mut ev = Vec::new();
        self.t.poll(self.now, &mut |e| ev.push(e));
        self.events.extend(ev);
    }

    /// Submits and waits (polling) for the completion.
    pub(crate) fn exec(
        &mut self,
        q: QueueId,
        sqe: Sqe,
        buf: Option<IoBuf>,
        data_len: u32,
    ) -> Response {
        if let Some(r) = self.send(q, sqe, buf, data_len) {
            assert_eq!(r.cookie, self.cookie);
            assert_eq!(r.cqe.cid, sqe.cid);
            return r;
        }
        let want = self.cookie;
        for _ in 0..10 {
            self.poll();
            if let Some(i) = self
                .events
                .iter()
                .position(|e| matches!(e, Event::Completion(_, r) if r.cookie == want))
                && let Event::Completion(qq, r) = self.events.remove(i)
            {
                {
                    assert_eq!(qq, q);
                    assert_eq!(r.cqe.cid, sqe.cid);
                    return r;
                }
            }
        }
        panic!("no completion for cookie {want}");
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn connect_raw(
        &mut self,
        q: QueueId,
        qid: u16,
        sqsize: u16,
        kato: u32,
        sub: &str,
        host: &str,
        cntlid: u16,
    ) -> Response {
        let sqe = ConnectCommand {
            recfmt: 0,
            qid,
            sqsize,
            cattr: 0,
            kato,
        }
        .to_sqe(qid + 100);
        let mut b = IoBuf::leak_zeroed(1024);
        ConnectData::new(HOSTID, cntlid, sub, host).write(b.as_mut_slice());
        self.exec(q, sqe, Some(b), 1024)
    }

    pub(crate) fn prop_set(&mut self, q: QueueId, off: u32, v: u64) -> Response {
        self.exec(
            q,
            PropertyCommand::set_sqe(1, off, PropertySize::Four, v),
            None,
            0,
        )
    }

    pub(crate) fn prop_get(&mut self, q: QueueId, off: u32, size: PropertySize) -> u64 {
        let r = self.exec(q, PropertyCommand::get_sqe(2, off, size), None, 0);
        assert_eq!(plain(r.cqe.status), Status::SUCCESS);
        r.cqe.dw0 as u64 | ((r.cqe.dw1 as u64) << 32)
    }

    /// Admin queue connected and enabled; returns (queue, cntlid).
    pub(crate) fn admin(&mut self, sub: &str, host: &str, kato: u32) -> (QueueId, u16) {
        let q = self.t.open_queue().unwrap();
        let r = self.connect_raw(q, 0, 31, kato, sub, host, CNTLID_DYNAMIC);
        assert_eq!(plain(r.cqe.status), Status::SUCCESS, "connect");
        let cntlid = r.cqe.dw0 as u16;
        assert!((1..=0xFFEF).contains(&cntlid));
        assert_eq!(
            plain(self.prop_set(q, 0x14, 0x0046_0001).cqe.status),
            Status::SUCCESS
        );
        assert_eq!(self.prop_get(q, 0x1C, PropertySize::Four) & 1, 1);
        (q, cntlid)
    }

    pub(crate) fn io_queue(&mut self, qid: u16, cntlid: u16) -> QueueId {
        let q = self.t.open_queue().unwrap();
        let r = self.connect_raw(q, qid, 127, 0, SUB, HOST, cntlid);
        assert_eq!(plain(r.cqe.status), Status::SUCCESS, "io connect");
        q
    }

    pub(crate) fn setup() -> (Self, QueueId, QueueId, u16) {
        let mut h = Self::new();
        let (a, c) = h.admin(SUB, HOST, 0);
        let io = h.io_queue(1, c);
        (h, a, io, c)
    }

    pub(crate) fn write(
        &mut self,
        q: QueueId,
        cid: u16,
        nsid: u32,
        lba: u64,
        data: &[u8],
    ) -> Response {
        let blocks = (data.len() / 512) as u32;
        let mut b = IoBuf::leak_zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        let sqe = RwCommand::simple(lba, blocks).to_sqe(IoOpcode::Write as u8, cid, nsid);
        self.exec(q, sqe, Some(b), data.len() as u32)
    }

    pub(crate) fn read(
        &mut self,
        q: QueueId,
        cid: u16,
        nsid: u32,
        lba: u64,
        blocks: u32,
    ) -> Response {
        let len = blocks as usize * 512;
        let sqe = RwCommand::simple(lba, blocks).to_sqe(IoOpcode::Read as u8, cid, nsid);
        self.exec(q, sqe, Some(IoBuf::leak_zeroed(len)), len as u32)
    }

    pub(crate) fn identify(&mut self, q: QueueId, cns: u8, nsid: u32) -> Response {
        let sqe = IdentifyCommand {
            cns,
            cntid: 0,
            csi: 0,
            nsid,
        }
        .to_sqe(3);
        self.exec(q, sqe, Some(IoBuf::leak_zeroed(4096)), 4096)
    }

    pub(crate) fn log(&mut self, q: QueueId, lid: u8, off: u64, len: u32) -> Response {
        let sqe = GetLogPageCommand::to_sqe(4, 0, lid, false, off, len);
        self.exec(q, sqe, Some(IoBuf::leak_zeroed(len as usize)), len)
    }

    /// (CID, status without the More bit, DW0) of the completions in `events`, in order.
    pub(crate) fn completions(&self) -> Vec<(u16, Status, u32)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Completion(_, r) => Some((r.cqe.cid, plain(r.cqe.status), r.cqe.dw0)),
                _ => None,
            })
            .collect()
    }

    /// Buffers handed back without a completion (`Event::BufferReleased`) in `events`.
    pub(crate) fn released(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, Event::BufferReleased { .. }))
            .count()
    }

    pub(crate) fn terminated(&self) -> Vec<QueueId> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::QueueTerminated(q) => Some(*q),
                _ => None,
            })
            .collect()
    }
}

/// The status without the More bit (set when the Error Information log holds an entry for the
/// command; tests of the log check it explicitly).
pub(crate) fn plain(s: Status) -> Status {
    Status { more: false, ..s }
}

trait Plain {
    fn plain(self) -> Status;
}

impl Plain for Status {
    fn plain(self) -> Status {
        plain(self)
    }
}

pub(crate) fn page(r: &Response) -> [u8; 4096] {
    let mut p = [0u8; 4096];
    let b = r.buf.as_ref().unwrap().as_slice();
    p[..b.len()].copy_from_slice(b);
    p
}

#[test]
fn connect_identify_and_properties() {
    let (mut h, a, io, cntlid) = H::setup();
    let cap = Cap(h.prop_get(a, 0, PropertySize::Eight));
    assert_eq!(cap.mqes(), 127);
    assert_eq!(cap.css() & 1, 1);
    assert_eq!(h.prop_get(a, 8, PropertySize::Four), 0x0001_0400);
    assert_eq!(h.prop_get(a, 0x14, PropertySize::Four), 0x0046_0001);
    // Wrong size for CAP, unknown offset, read-only property.
    let r = h.exec(
        a,
        PropertyCommand::get_sqe(9, 0, PropertySize::Four),
        None,
        0,
    );
    assert_eq!(plain(r.cqe.status), Status::INVALID_FIELD);
    let r = h.exec(
        a,
        PropertyCommand::get_sqe(9, 0x40, PropertySize::Four),
        None,
        0,
    );
    assert_eq!(plain(r.cqe.status), Status::INVALID_FIELD);
    assert_eq!(
        plain(h.prop_set(a, 0x1C, 1).cqe.status),
        Status::INVALID_FIELD
    );

    let r = h.identify(a, 1, 0);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert_eq!(r.data_len, 4096);
    let id = IdentifyController::decode(&page(&r));
    assert_eq!(id.cntlid, cntlid);
    assert_eq!(id.cntrltype, 1);
    assert_eq!(&id.subnqn[..SUB.len()], SUB.as_bytes());
    assert_eq!(id.subnqn[SUB.len()], 0);
    assert_eq!(&id.sn[..8], b"KEEL0001");
    assert_eq!(id.sn[8], b' ');
    assert_eq!(
        (id.sqes, id.cqes, id.mdts, id.aerl, id.kas),
        (0x66, 0x44, 5, 3, 10)
    );
    assert_eq!(id.ioccsz, (64 + 8192) / 16);
    assert_eq!(id.oncs.bits() & 0x0D, 0x0D);
    assert_eq!(id.oaes, 1 << 8);
    assert_eq!(id.ver, 0x0001_0400);

    let r = h.identify(a, 0, 1);
    let n = IdentifyNamespace::decode(&page(&r));
    assert_eq!((n.nsze, n.ncap, n.block_size()), (BLOCKS, BLOCKS, 512));
    assert_eq!(n.nguid, [1; 16]);
    // Inactive NSID in range: zeroes. Out of range: Invalid Namespace.
    let r = h.identify(a, 0, 5);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert!(page(&r).iter().all(|&b| b == 0));
    assert_eq!(
        plain(h.identify(a, 0, 0).cqe.status),
        Status::INVALID_NAMESPACE_OR_FORMAT
    );
    assert_eq!(
        plain(h.identify(a, 0, 0xFFFF_FFFF).cqe.status),
        Status::INVALID_NAMESPACE_OR_FORMAT
    );
    let r = h.identify(a, 2, 0);
    assert_eq!(&page(&r)[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    let r = h.identify(a, 3, 1);
    let ids = keel_nvme::identify::NsIdentifiers::decode(&page(&r));
    assert_eq!((ids.nguid, ids.uuid), ([1; 16], [0xA1; 16]));
    assert_eq!(
        plain(h.identify(a, 3, 9).cqe.status),
        Status::INVALID_NAMESPACE_OR_FORMAT
    );
    assert_eq!(
        plain(h.identify(a, 0x10, 0).cqe.status),
        Status::INVALID_FIELD
    );

    let info = h.t.queue_info(io).unwrap();
    assert_eq!((info.qid, info.cntlid, info.sqsize), (1, cntlid, 127));
    assert!(!info.sq_flow_control_disabled);
}

#[test]
fn write_read_roundtrip_and_data_commands() {
    let (mut h, _a, io, _) = H::setup();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let r = h.write(io, 1, 1, 100, &data);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert_eq!(r.cqe.sqid, 1);
    assert_eq!(r.data_len, 0);
    assert!(r.buf.is_some());
    let r = h.read(io, 2, 1, 100, 8);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert_eq!(r.data_len, 4096);
    assert_eq!(r.buf.as_ref().unwrap().as_slice(), &data[..]);

    // Compare: match, then mismatch.
    let mut b = IoBuf::leak_zeroed(512);
    b.as_mut_slice().copy_from_slice(&data[..512]);
    let sqe = RwCommand::simple(100, 1).to_sqe(IoOpcode::Compare as u8, 3, 1);
    assert_eq!(
        plain(h.exec(io, sqe, Some(b), 512).cqe.status),
        Status::SUCCESS
    );
    let sqe = RwCommand::simple(101, 1).to_sqe(IoOpcode::Compare as u8, 4, 1);
    let r = h.exec(io, sqe, Some(IoBuf::leak_zeroed(512)), 512);
    assert_eq!(plain(r.cqe.status), Status::COMPARE_FAILURE);
    assert_eq!((r.cqe.status.sct, r.cqe.status.sc), (2, 0x85));

    // Write Zeroes block 101, Flush.
    let sqe = RwCommand::simple(101, 1).to_sqe(IoOpcode::WriteZeroes as u8, 5, 1);
    assert_eq!(plain(h.exec(io, sqe, None, 0).cqe.status), Status::SUCCESS);
    let sqe = Sqe::new(IoOpcode::Flush as u8, 6).with_nsid(1);
    assert_eq!(plain(h.exec(io, sqe, None, 0).cqe.status), Status::SUCCESS);
    let r = h.read(io, 7, 1, 100, 3);
    let got = r.buf.as_ref().unwrap().as_slice();
    assert_eq!(&got[..512], &data[..512]);
    assert!(got[512..1024].iter().all(|&x| x == 0));
    assert_eq!(&got[1024..], &data[1024..1536]);

    // Dataset Management: deallocate two ranges (blocks 100 and 103..105).
    let mut rb = IoBuf::leak_zeroed(32);
    rb.as_mut_slice()[..16].copy_from_slice(
        &DsmRange {
            cattr: 0,
            nlb: 1,
            slba: 100,
        }
        .to_bytes(),
    );
    rb.as_mut_slice()[16..].copy_from_slice(
        &DsmRange {
            cattr: 0,
            nlb: 2,
            slba: 103,
        }
        .to_bytes(),
    );
    let sqe = DsmCommand {
        nr: 1,
        idr: false,
        idw: false,
        ad: true,
    }
    .to_sqe(8, 1);
    let r = h.exec(io, sqe, Some(rb), 32);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert!(r.buf.is_some());
    let r = h.read(io, 9, 1, 100, 5);
    let got = r.buf.as_ref().unwrap().as_slice();
    assert!(got[..1024].iter().all(|&x| x == 0));
    assert_eq!(&got[1024..1536], &data[1024..1536]);
    assert!(got[1536..].iter().all(|&x| x == 0));
    // A range beyond the namespace fails the whole command.
    let mut rb = IoBuf::leak_zeroed(16);
    rb.as_mut_slice().copy_from_slice(
        &DsmRange {
            cattr: 0,
            nlb: 2,
            slba: BLOCKS - 1,
        }
        .to_bytes(),
    );
    let sqe = DsmCommand {
        nr: 0,
        idr: false,
        idw: false,
        ad: true,
    }
    .to_sqe(10, 1);
    assert_eq!(
        plain(h.exec(io, sqe, Some(rb), 16).cqe.status),
        Status::LBA_OUT_OF_RANGE
    );

    // Linux's discard: one range (NR 0) in a 4096-byte buffer; the excess is ignored.
    h.write(io, 11, 1, 200, &data[..512]);
    let mut rb = IoBuf::leak_zeroed(4096);
    rb.as_mut_slice()[..16].copy_from_slice(
        &DsmRange {
            cattr: 0,
            nlb: 1,
            slba: 200,
        }
        .to_bytes(),
    );
    rb.as_mut_slice()[16..32].fill(0xff); // not a range: NR says one
    let sqe = DsmCommand {
        nr: 0,
        idr: false,
        idw: false,
        ad: true,
    }
    .to_sqe(12, 1);
    assert_eq!(
        plain(h.exec(io, sqe, Some(rb), 4096).cqe.status),
        Status::SUCCESS
    );
    let r = h.read(io, 13, 1, 200, 1);
    assert!(r.buf.as_ref().unwrap().as_slice().iter().all(|&x| x == 0));
    // Fewer bytes than NR's ranges: Data SGL Length Invalid.
    let sqe = DsmCommand {
        nr: 1,
        idr: false,
        idw: false,
        ad: true,
    }
    .to_sqe(14, 1);
    assert_eq!(
        plain(h.exec(io, sqe, Some(IoBuf::leak_zeroed(16)), 16).cqe.status),
        Status::DATA_SGL_LENGTH_INVALID
    );

    let st = h.t.namespace_stats(SUB, 1).unwrap();
    assert_eq!(st.write_bytes, 4096 + 512);
    assert_eq!(st.reads, 5); // 4 reads + 1 successful compare
    assert_eq!(st.errors, 1);
    assert!(st.read_latency.count() >= 3);
}

#[test]
fn io_error_statuses() {
    let (mut h, _a, io, _) = H::setup();
    // LBA range beyond the namespace: SCT 0 SC 80h.
    let r = h.read(io, 1, 1, BLOCKS - 1, 2);
    assert_eq!((r.cqe.status.sct, r.cqe.status.sc), (0, 0x80));
    assert!(r.buf.is_some(), "buffer handed back on error");
    let sqe = RwCommand::simple(u64::MAX, 1).to_sqe(IoOpcode::Write as u8, 2, 1);
    assert_eq!(
        h.exec(io, sqe, Some(IoBuf::leak_zeroed(512)), 512)
            .cqe
            .status
            .plain(),
        Status::LBA_OUT_OF_RANGE
    );
    // Unknown NSID: 0Bh.
    let r = h.read(io, 3, 7, 0, 1);
    assert_eq!((r.cqe.status.sc, r.cqe.status.dnr), (0x0B, true));
    assert_eq!(h.read(io, 3, 0xFFFF_FFFF, 0, 1).cqe.status.sc, 0x0B);
    // Unknown opcode: 01h.
    let r = h.exec(io, Sqe::new(0x7E, 4).with_nsid(1), None, 0);
    assert_eq!(plain(r.cqe.status), Status::INVALID_OPCODE);
    let r = h.exec(
        io,
        Sqe::new(IoOpcode::WriteUncorrectable as u8, 4).with_nsid(1),
        None,
        0,
    );
    assert_eq!(plain(r.cqe.status), Status::INVALID_OPCODE);
    // Transfer length mismatch: Data SGL Length Invalid (0Fh).
    let sqe = RwCommand::simple(0, 2).to_sqe(IoOpcode::Read as u8, 5, 1);
    let r = h.exec(io, sqe, Some(IoBuf::leak_zeroed(1024)), 512);
    assert_eq!(r.cqe.status.sc, 0x0F);
    let sqe = RwCommand::simple(0, 2).to_sqe(IoOpcode::Write as u8, 5, 1);
    assert_eq!(
        plain(h.exec(io, sqe, None, 1024).cqe.status),
        Status::DATA_SGL_LENGTH_INVALID
    );
    // Above MDTS (2^5 * 4 KiB = 128 KiB): Invalid Field.
    let sqe = RwCommand::simple(0, 512).to_sqe(IoOpcode::Read as u8, 6, 1);
    let r = h.exec(io, sqe, Some(IoBuf::leak_zeroed(256 * 1024)), 256 * 1024);
    assert_eq!(plain(r.cqe.status), Status::INVALID_FIELD);
    // Fused commands are not supported.
    let mut sqe = RwCommand::simple(0, 1).to_sqe(IoOpcode::Read as u8, 7, 1);
    sqe.flags = 1;
    assert_eq!(
        h.exec(io, sqe, Some(IoBuf::leak_zeroed(512)), 512)
            .cqe
            .status
            .plain(),
        Status::INVALID_FIELD
    );
    // Command ID conflict with a command still in flight.
    let sqe = RwCommand::simple(0, 1).to_sqe(IoOpcode::Read as u8, 42, 1);
    assert!(
        h.send(io, sqe, Some(IoBuf::leak_zeroed(512)), 512)
            .is_none()
    );
    let r = h.send(io, sqe, Some(IoBuf::leak_zeroed(512)), 512).unwrap();
    assert_eq!(plain(r.cqe.status), Status::COMMAND_ID_CONFLICT);
    h.poll();
    assert_eq!(h.events.len(), 1);
}

#[test]
fn command_sequence_errors() {
    let mut h = H::new();
    let q = h.t.open_queue().unwrap();
    // Anything but Connect on a fresh queue.
    let r = h.exec(q, Sqe::new(AdminOpcode::Identify as u8, 1), None, 0);
    assert_eq!(plain(r.cqe.status), Status::COMMAND_SEQUENCE_ERROR);
    let r = h.connect_raw(q, 0, 31, 0, SUB, HOST, CNTLID_DYNAMIC);
    let cntlid = r.cqe.dw0 as u16;
    assert_eq!(r.cqe.sqhd, 1);
    // Admin commands before CC.EN.
    let r = h.identify(q, 1, 0);
    assert_eq!(plain(r.cqe.status), Status::COMMAND_SEQUENCE_ERROR);
    assert_eq!(h.prop_get(q, 0x1C, PropertySize::Four), 0);
    // I/O queue connect before the controller is ready.
    let io = h.t.open_queue().unwrap();
    let r = h.connect_raw(io, 1, 15, 0, SUB, HOST, cntlid);
    assert_eq!(plain(r.cqe.status), Status::COMMAND_SEQUENCE_ERROR);
    // A second Connect on a connected queue.
    let r = h.connect_raw(q, 0, 31, 0, SUB, HOST, CNTLID_DYNAMIC);
    assert_eq!(plain(r.cqe.status), Status::COMMAND_SEQUENCE_ERROR);
    // Bad CC (IOCQES 0): CFS, not ready.
    assert_eq!(
        plain(h.prop_set(q, 0x14, 0x0006_0001).cqe.status),
        Status::SUCCESS
    );
    let csts = Csts(h.prop_get(q, 0x1C, PropertySize::Four) as u32);
    assert!(csts.cfs() && !csts.rdy());
    // Unknown queue handle.
    h.t.close_queue(io).unwrap();
    assert_eq!(h.t.close_queue(io), Err(TargetError::UnknownQueue));
    let r = h.exec(io, Sqe::new(0, 1), None, 0);
    assert_eq!(plain(r.cqe.status), Status::COMMAND_SEQUENCE_ERROR);
}

#[test]
fn connect_errors() {
    let mut h = H::new();
    let q = h.t.open_queue().unwrap();
    // Unknown subsystem: Connect Invalid Parameters, IATTR=1, IPO=256 (SUBNQN).
    let r = h.connect_raw(q, 0, 31, 0, "nqn.none", HOST, CNTLID_DYNAMIC);
    assert_eq!(plain(r.cqe.status), Status::CONNECT_INVALID_PARAMETERS);
    assert_eq!((r.cqe.status.sct, r.cqe.status.sc), (1, 0x82));
    assert_eq!(r.cqe.dw0, 0x0001_0100);
    // Host not allowed: Connect Invalid Host (84h).
    let r = h.connect_raw(q, 0, 31, 0, PRIV, HOST, CNTLID_DYNAMIC);
    assert_eq!((r.cqe.status.sct, r.cqe.status.sc), (1, 0x84));
    // SQSIZE 0 and above MQES: IPO 44 in the SQE.
    let r = h.connect_raw(q, 0, 0, 0, SUB, HOST, CNTLID_DYNAMIC);
    assert_eq!(
        (plain(r.cqe.status), r.cqe.dw0),
        (Status::CONNECT_INVALID_PARAMETERS, 44)
    );
    let r = h.connect_raw(q, 0, 128, 0, SUB, HOST, CNTLID_DYNAMIC);
    assert_eq!(r.cqe.dw0, 44);
    // Static CNTLID on an admin connect under the dynamic model: IPO 16 in the data.
    let r = h.connect_raw(q, 0, 31, 0, SUB, HOST, 5);
    assert_eq!(r.cqe.dw0, 0x0001_0010);
    // RECFMT != 0.
    let mut sqe = ConnectCommand {
        recfmt: 1,
        qid: 0,
        sqsize: 31,
        cattr: 0,
        kato: 0,
    }
    .to_sqe(1);
    sqe.cdw[0] |= 1;
    let mut b = IoBuf::leak_zeroed(1024);
    ConnectData::new(HOSTID, CNTLID_DYNAMIC, SUB, HOST).write(b.as_mut_slice());
    assert_eq!(
        plain(h.exec(q, sqe, Some(b), 1024).cqe.status),
        Status::CONNECT_INCOMPATIBLE_FORMAT
    );
    // Missing Connect data.
    let sqe = ConnectCommand {
        recfmt: 0,
        qid: 0,
        sqsize: 31,
        cattr: 0,
        kato: 0,
    }
    .to_sqe(1);
    assert_eq!(
        plain(h.exec(q, sqe, None, 0).cqe.status),
        Status::DATA_SGL_LENGTH_INVALID
    );
    // The allowed host gets in.
    let r = h.connect_raw(q, 0, 31, 0, PRIV, OK_HOST, CNTLID_DYNAMIC);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert_eq!(h.t.controller_count(), 1);

    // I/O queue errors.
    let (_a, cntlid) = h.admin(SUB, HOST, 0);
    let io = h.t.open_queue().unwrap();
    let r = h.connect_raw(io, 1, 15, 0, SUB, HOST, cntlid.wrapping_add(100));
    assert_eq!(r.cqe.dw0, 0x0001_0010, "unknown CNTLID");
    let r = h.connect_raw(io, 1, 15, 0, SUB, OK_HOST, cntlid);
    assert_eq!(r.cqe.dw0, 0x0001_0200, "different host");
    let r = h.connect_raw(io, 9, 15, 0, SUB, HOST, cntlid);
    assert_eq!(r.cqe.dw0, 42, "QID above the queue count");
    let r = h.connect_raw(io, 1, 15, 0, SUB, HOST, cntlid);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    let io2 = h.t.open_queue().unwrap();
    let r = h.connect_raw(io2, 1, 15, 0, SUB, HOST, cntlid);
    assert_eq!(r.cqe.dw0, 42, "QID already connected");
    // Controllers run out: Controller Busy (limit 4).
    let _ = h.admin(SUB, HOST, 0);
    let _ = h.admin(SUB, HOST, 0);
    let q5 = h.t.open_queue().unwrap();
    let r = h.connect_raw(q5, 0, 31, 0, SUB, HOST, CNTLID_DYNAMIC);
    assert_eq!((r.cqe.status.sct, r.cqe.status.sc), (1, 0x81));
}

#[test]
fn number_of_queues_negotiation() {
    let mut h = H::new();
    let (a, cntlid) = h.admin(SUB, HOST, 0);
    let r = h.exec(a, FeaturesCommand::set_sqe(5, 0x07, 0x0001_0001), None, 0);
    assert_eq!(
        (plain(r.cqe.status), r.cqe.dw0),
        (Status::SUCCESS, 0x0001_0001)
    );
    let r = h.exec(a, FeaturesCommand::get_sqe(5, 0x07, 0), None, 0);
    assert_eq!(r.cqe.dw0, 0x0001_0001);
    let r = h.exec(a, FeaturesCommand::set_sqe(5, 0x07, 0x0040_0040), None, 0);
    assert_eq!(r.cqe.dw0, 0x0007_0007, "capped at 8");
    let r = h.exec(a, FeaturesCommand::set_sqe(5, 0x07, 0xFFFF), None, 0);
    assert_eq!(plain(r.cqe.status), Status::INVALID_FIELD);
    h.exec(a, FeaturesCommand::set_sqe(5, 0x07, 0x0001_0001), None, 0);
    let _ = h.io_queue(2, cntlid);
    let q3 = h.t.open_queue().unwrap();
    assert_eq!(h.connect_raw(q3, 3, 15, 0, SUB, HOST, cntlid).cqe.dw0, 42);
    // Other features.
    let r = h.exec(a, FeaturesCommand::set_sqe(5, 0x0F, 15_000), None, 0);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert_eq!(
        h.exec(a, FeaturesCommand::get_sqe(5, 0x0F, 0), None, 0)
            .cqe
            .dw0,
        15_000
    );
    assert_eq!(
        h.exec(a, FeaturesCommand::get_sqe(5, 0x0F, 3), None, 0)
            .cqe
            .dw0,
        0b100
    );
    let r = h.exec(
        a,
        FeaturesCommand::set_sqe(5, 0x01, 3).with_cdw(10, 0x8000_0001),
        None,
        0,
    );
    assert_eq!(plain(r.cqe.status), Status::FEATURE_NOT_SAVEABLE);
    let r = h.exec(a, FeaturesCommand::set_sqe(5, 0x06, 1), None, 0);
    assert_eq!(
        plain(r.cqe.status),
        Status::INVALID_FIELD,
        "no volatile write cache"
    );
    assert_eq!(
        h.exec(a, FeaturesCommand::get_sqe(5, 0x06, 0), None, 0)
            .cqe
            .dw0,
        0
    );
    assert_eq!(
        h.exec(a, FeaturesCommand::get_sqe(5, 0x55, 0), None, 0)
            .cqe
            .status
            .plain(),
        Status::INVALID_FIELD
    );
}

#[test]
fn keep_alive_expiry_tears_down_and_frees() {
    let mut h = H::new();
    let (a, cntlid) = h.admin(SUB, HOST, 2000);
    let io = h.io_queue(1, cntlid);
    // Keep-alive and I/O keep it alive.
    for _ in 0..5 {
        h.now = Instant::from_millis(h.now.as_millis() + 1500);
        assert_eq!(
            h.exec(a, Sqe::new(AdminOpcode::KeepAlive as u8, 9), None, 0)
                .cqe
                .status
                .plain(),
            Status::SUCCESS
        );
        h.poll();
        assert_eq!(h.t.controller_count(), 1);
    }
    // A read is in flight when the timer expires: its buffer comes back released.
    let sqe = RwCommand::simple(0, 1).to_sqe(IoOpcode::Read as u8, 1, 1);
    assert!(
        h.send(io, sqe, Some(IoBuf::leak_zeroed(512)), 512)
            .is_none()
    );
    h.now = Instant::from_millis(h.now.as_millis() + 3001);
    h.poll();
    assert_eq!(h.t.controller_count(), 0);
    let mut t = h.terminated();
    t.sort_by_key(|q| q.as_u32());
    assert_eq!(t, vec![a, io]);
    assert!(
        h.events
            .iter()
            .any(|e| matches!(e, Event::BufferReleased { .. }))
    );
    assert!(!h.events.iter().any(|e| matches!(e, Event::Completion(..))));
    // Commands on a terminated queue are aborted.
    let r = h.read(io, 2, 1, 0, 1);
    assert_eq!(plain(r.cqe.status), Status::ABORTED_SQ_DELETION);
    h.t.close_queue(a).unwrap();
    h.t.close_queue(io).unwrap();
    assert_eq!(h.t.open_queue_count(), 0);
    // A new association reuses the freed resources.
    let (_a2, _c2) = h.admin(SUB, HOST, 2000);
    assert_eq!(h.t.controller_count(), 1);
    assert_eq!(h.t.open_queue_count(), 1);
    assert_eq!(h.t.queues.len(), 2);
}

#[test]
fn closing_admin_queue_ends_controller() {
    let (mut h, a, io, _) = H::setup();
    h.t.close_queue(a).unwrap();
    assert_eq!(h.t.controller_count(), 0);
    h.poll();
    assert_eq!(h.terminated(), vec![io]);
    h.t.close_queue(io).unwrap();
    // Disconnect on an I/O queue is graceful.
    let (mut h, _a, io, _) = H::setup();
    let r = h.exec(io, keel_nvme::fabrics::disconnect_sqe(3), None, 0);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    h.poll();
    assert_eq!(h.terminated(), vec![io]);
    h.t.close_queue(io).unwrap();
    assert_eq!(h.t.controller_count(), 1);
    // Losing an I/O queue without Disconnect ends the association.
    let (mut h, a, io, _) = H::setup();
    h.t.close_queue(io).unwrap();
    assert_eq!(h.t.controller_count(), 0);
    h.poll();
    assert_eq!(h.terminated(), vec![a]);
    // A host that closes an I/O queue in order (FIN, as Linux does before shutting the
    // controller down) loses only that queue: the admin queue still answers.
    let (mut h, a, io, _) = H::setup();
    h.t.close_queue_after(io, crate::QueueLoss::Orderly)
        .unwrap();
    assert_eq!(h.t.controller_count(), 1);
    h.poll();
    assert!(h.terminated().is_empty());
    let r = h.identify(a, 1, 0);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    // Disconnect on the admin queue ends the association; a transport that closes the queue
    // before its next poll hears nothing more of it (found by the controller fuzz target:
    // the stale QueueTerminated named a queue the transport no longer had), while the I/O
    // queue is still told.
    let (mut h, a, io, _) = H::setup();
    let r = h.exec(a, keel_nvme::fabrics::disconnect_sqe(3), None, 0);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert_eq!(h.t.controller_count(), 0);
    h.t.close_queue_after(a, crate::QueueLoss::Orderly).unwrap();
    h.poll();
    assert_eq!(h.terminated(), vec![io]);
    h.t.close_queue(io).unwrap();
    assert_eq!(h.t.open_queue_count(), 0);
}

#[test]
fn discovery_log_page() {
    let mut h = H::new();
    let (d, _) = h.admin(keel_nvme::DISCOVERY_NQN, HOST, 0);
    assert!(h.t.queue_info(d).unwrap().discovery);
    let id = IdentifyController::decode(&page(&h.identify(d, 1, 0)));
    assert_eq!(id.cntrltype, 2);
    assert_eq!(
        &id.subnqn[..keel_nvme::DISCOVERY_NQN.len()],
        keel_nvme::DISCOVERY_NQN.as_bytes()
    );
    assert_eq!(plain(h.identify(d, 0, 1).cqe.status), Status::INVALID_FIELD);
    // Header only.
    let r = h.log(d, 0x70, 0, 1024);
    assert_eq!(r.data_len, 1024);
    let mut hdr = [0u8; 1024];
    hdr.copy_from_slice(r.buf.as_ref().unwrap().as_slice());
    let hd = discovery::Header::decode(&hdr);
    assert_eq!(
        hd.numrec, 1,
        "the private subsystem is hidden from this host"
    );
    // The entry, read at offset 1024.
    let r = h.log(d, 0x70, 1024, 1024);
    let mut rec = [0u8; 1024];
    rec.copy_from_slice(r.buf.as_ref().unwrap().as_slice());
    let e = discovery::Entry::decode(&rec);
    assert_eq!(
        (e.trtype, e.adrfam, e.subtype, e.portid, e.cntlid, e.asqsz),
        (3, 1, 2, 1, 0xFFFF, 32)
    );
    assert_eq!(e.traddr_str(), Some("10.0.0.2"));
    assert_eq!(e.trsvcid_str(), Some("4420"));
    assert_eq!(e.subnqn_str(), Some(SUB));
    // The same fields where a foreign host reads them (NVMe-oF 1.1 Discovery Log Page Entry,
    // Linux struct nvmf_disc_rsp_page_entry): TRSVCID at byte 32, SUBNQN at 256, TRADDR at
    // 512, each NUL padded.
    assert_eq!(&rec[32..37], b"4420\0");
    assert_eq!(
        &rec[256..256 + SUB.len() + 1],
        [SUB.as_bytes(), &[0]].concat()
    );
    assert_eq!(&rec[512..521], b"10.0.0.2\0");
    // Unaligned window across header and entry.
    let r = h.log(d, 0x70, 1016, 16);
    let b = r.buf.as_ref().unwrap().as_slice();
    assert_eq!(&b[8..], &rec[..8]);
    // Offset beyond the log: Invalid Field. Unaligned offset: Invalid Field.
    assert_eq!(
        plain(h.log(d, 0x70, 4096, 1024).cqe.status),
        Status::INVALID_FIELD
    );
    assert_eq!(
        plain(h.log(d, 0x70, 2, 1024).cqe.status),
        Status::INVALID_FIELD
    );
    // I/O controller log pages are not on the discovery controller.
    assert_eq!(
        plain(h.log(d, 0x02, 0, 512).cqe.status),
        Status::INVALID_LOG_PAGE
    );
    // An allowed host sees both subsystems; ports change the generation counter.
    let (d2, _) = h.admin(keel_nvme::DISCOVERY_NQN, OK_HOST, 0);
    let r = h.log(d2, 0x70, 0, 3072);
    let mut hdr = [0u8; 1024];
    hdr.copy_from_slice(&r.buf.as_ref().unwrap().as_slice()[..1024]);
    let before = discovery::Header::decode(&hdr);
    assert_eq!(before.numrec, 2);
    // Discovery log change notice.
    let r = h.exec(d2, FeaturesCommand::set_sqe(5, 0x0B, 1 << 31), None, 0);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert!(
        h.send(
            d2,
            Sqe::new(AdminOpcode::AsyncEventRequest as u8, 77),
            None,
            0
        )
        .is_none()
    );
    h.t.set_ports(vec![
        PortEntry::tcp_ipv4("10.0.0.2", "4420", 1),
        PortEntry::tcp_ipv4("10.0.0.3", "4420", 2),
    ]);
    h.poll();
    let aen = h.events.iter().find_map(|e| match e {
        Event::Completion(q, r) if *q == d2 && r.cqe.cid == 77 => Some(r.cqe.dw0),
        _ => None,
    });
    assert_eq!(aen, Some(0x0070_F002));
    let r = h.log(d2, 0x70, 0, 1024);
    hdr.copy_from_slice(r.buf.as_ref().unwrap().as_slice());
    let after = discovery::Header::decode(&hdr);
    assert_eq!(after.numrec, 4);
    assert_ne!(after.genctr, before.genctr);
    // Discovery controllers get a default KATO and expire without keep-alive.
    h.now = Instant::from_millis(h.now.as_millis() + 200_000);
    h.poll();
    assert_eq!(h.t.controller_count(), 0);
}

#[test]
fn aer_fires_on_namespace_add_and_remove() {
    let (mut h, a, io, _) = H::setup();
    let r = h.exec(a, FeaturesCommand::set_sqe(5, 0x0B, 1 << 8), None, 0);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert!(
        h.send(
            a,
            Sqe::new(AdminOpcode::AsyncEventRequest as u8, 50),
            None,
            0
        )
        .is_none()
    );
    let aer_cookie = h.cookie;
    h.poll();
    assert!(h.events.is_empty());
    h.t.add_namespace(SUB, ns(3, 8)).unwrap();
    assert!(h.t.add_namespace(SUB, ns(3, 8)).is_err());
    assert!(h.t.add_namespace("nqn.x", ns(4, 8)).is_err());
    h.poll();
    let ev = h.events.remove(0);
    match ev {
        Event::Completion(q, r) => {
            assert_eq!(q, a);
            assert_eq!(r.cookie, aer_cookie);
            assert_eq!(r.cqe.cid, 50);
            assert_eq!(r.cqe.dw0, 0x0004_0002);
        }
        e => panic!("{e:?}"),
    }
    // Changed Namespace List reports NSID 3, then is cleared by the read.
    let r = h.log(a, 0x04, 0, 4096);
    assert_eq!(&page(&r)[..8], &[3, 0, 0, 0, 0, 0, 0, 0]);
    let r = h.log(a, 0x04, 0, 4096);
    assert_eq!(&page(&r)[..4], &[0, 0, 0, 0]);
    let r = h.identify(a, 2, 0);
    assert_eq!(&page(&r)[..12], &[1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        plain(h.write(io, 1, 3, 0, &[9u8; 512]).cqe.status),
        Status::SUCCESS
    );
    // Removal: an event is kept until the next AER arrives.
    h.t.remove_namespace(SUB, 3).unwrap();
    assert_eq!(
        plain(h.read(io, 2, 3, 0, 1).cqe.status),
        Status::INVALID_NAMESPACE_OR_FORMAT
    );
    let r = h
        .send(
            a,
            Sqe::new(AdminOpcode::AsyncEventRequest as u8, 51),
            None,
            0,
        )
        .unwrap();
    assert_eq!(r.cqe.dw0, 0x0004_0002);
    let r = h.log(a, 0x04, 0, 4096);
    assert_eq!(&page(&r)[..4], &[3, 0, 0, 0]);
    assert!(h.t.remove_namespace(SUB, 3).is_err());
}

#[test]
fn aer_limit_and_abort() {
    let (mut h, a, io, _) = H::setup();
    for cid in 0..4 {
        assert!(
            h.send(
                a,
                Sqe::new(AdminOpcode::AsyncEventRequest as u8, 60 + cid),
                None,
                0
            )
            .is_none()
        );
    }
    let r = h
        .send(
            a,
            Sqe::new(AdminOpcode::AsyncEventRequest as u8, 64),
            None,
            0,
        )
        .unwrap();
    assert_eq!((r.cqe.status.sct, r.cqe.status.sc), (1, 0x05));
    // Abort an outstanding AER.
    let r = h.exec(a, AbortCommand { sqid: 0, cid: 61 }.to_sqe(70), None, 0);
    assert_eq!((plain(r.cqe.status), r.cqe.dw0), (Status::SUCCESS, 0));
    h.poll();
    assert!(h.events.iter().any(|e| matches!(e, Event::Completion(_, r) if r.cqe.cid == 61 && plain(r.cqe.status) == Status::ABORT_REQUESTED)));
    // A read still queued in the RAM backend is aborted there: the Abort waits for the
    // backend's verdict, the read completes with Command Abort Requested, then the Abort with
    // DW0 bit 0 clear.
    let sqe = RwCommand::simple(0, 1).to_sqe(IoOpcode::Read as u8, 5, 1);
    assert!(
        h.send(io, sqe, Some(IoBuf::leak_zeroed(512)), 512)
            .is_none()
    );
    h.events.clear();
    assert!(
        h.send(a, AbortCommand { sqid: 1, cid: 5 }.to_sqe(71), None, 0)
            .is_none(),
        "the Abort waits for the backend"
    );
    h.poll();
    assert_eq!(
        h.completions(),
        [(5, Status::ABORT_REQUESTED, 0), (71, Status::SUCCESS, 0)]
    );
    // A command that already completed (or an unknown CID) is not aborted: DW0 bit 0 set.
    let r = h.exec(a, AbortCommand { sqid: 1, cid: 5 }.to_sqe(72), None, 0);
    assert_eq!((plain(r.cqe.status), r.cqe.dw0), (Status::SUCCESS, 1));
    let r = h.exec(a, AbortCommand { sqid: 9, cid: 5 }.to_sqe(73), None, 0);
    assert_eq!(r.cqe.dw0, 1);
    // Controller reset (CC.EN 1 -> 0) aborts the remaining AERs and ends I/O queues.
    h.events.clear();
    assert_eq!(plain(h.prop_set(a, 0x14, 0).cqe.status), Status::SUCCESS);
    h.poll();
    let aborted = h
        .events
        .iter()
        .filter(|e| matches!(e, Event::Completion(q, r) if *q == a && plain(r.cqe.status) == Status::ABORTED_SQ_DELETION))
        .count();
    assert_eq!(aborted, 3);
    assert_eq!(h.terminated(), vec![io]);
    assert_eq!(h.prop_get(a, 0x1C, PropertySize::Four), 0);
}

#[test]
fn busy_backend_defers_and_abort_catches_deferred() {
    let mut h = H::with(config(1));
    let (a, cntlid) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, cntlid);
    // Depth 1: the second and third writes are refused Busy and parked.
    for cid in 0..3u16 {
        let mut b = IoBuf::leak_zeroed(512);
        b.as_mut_slice().fill(cid as u8 + 1);
        let sqe = RwCommand::simple(cid as u64, 1).to_sqe(IoOpcode::Write as u8, cid, 1);
        assert!(h.send(io, sqe, Some(b), 512).is_none());
    }
    // Abort the last one while it is still parked.
    let r = h.exec(a, AbortCommand { sqid: 1, cid: 2 }.to_sqe(9), None, 0);
    assert_eq!(r.cqe.dw0, 0);
    for _ in 0..4 {
        h.poll();
    }
    let mut done: Vec<(u16, Status)> = h
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Completion(_, r) => Some((r.cqe.cid, plain(r.cqe.status))),
            _ => None,
        })
        .collect();
    done.sort_by_key(|x| x.0);
    assert_eq!(
        done,
        vec![
            (0, Status::SUCCESS),
            (1, Status::SUCCESS),
            (2, Status::ABORT_REQUESTED)
        ]
    );
    let r = h.read(io, 5, 1, 0, 3);
    let b = r.buf.as_ref().unwrap().as_slice();
    assert!(b[..512].iter().all(|&x| x == 1));
    assert!(b[512..1024].iter().all(|&x| x == 2));
    assert!(b[1024..].iter().all(|&x| x == 0));
}

#[test]
fn shutdown_completes_after_io_drains() {
    let (mut h, a, io, _) = H::setup();
    let sqe = RwCommand::simple(0, 1).to_sqe(IoOpcode::Read as u8, 1, 1);
    assert!(
        h.send(io, sqe, Some(IoBuf::leak_zeroed(512)), 512)
            .is_none()
    );
    assert_eq!(
        plain(h.prop_set(a, 0x14, 0x0046_4001).cqe.status),
        Status::SUCCESS
    );
    assert_eq!(
        Csts(h.prop_get(a, 0x1C, PropertySize::Four) as u32).shst(),
        1
    );
    // New I/O is refused while shutting down.
    assert_eq!(
        plain(h.read(io, 2, 1, 0, 1).cqe.status),
        Status::COMMAND_SEQUENCE_ERROR
    );
    h.poll();
    assert_eq!(
        Csts(h.prop_get(a, 0x1C, PropertySize::Four) as u32).shst(),
        2
    );
}

#[test]
fn smart_and_other_logs() {
    let (mut h, a, io, _) = H::setup();
    h.write(io, 1, 1, 0, &[1u8; 4096]);
    h.read(io, 2, 1, 0, 8);
    let r = h.log(a, 0x02, 0, 512);
    let mut p = [0u8; 512];
    p.copy_from_slice(r.buf.as_ref().unwrap().as_slice());
    let s = keel_nvme::log::SmartLog::decode(&p);
    assert_eq!((s.host_read_commands, s.host_write_commands), (1, 1));
    assert_eq!((s.data_units_read, s.data_units_written), (1, 1));
    let r = h.log(a, 0x05, 0, 4096);
    let p = page(&r);
    assert_eq!(p[24] & 1, 1, "Identify supported");
    assert_eq!(p[1028], 3, "Write supported, changes LBA content");
    assert_eq!(p[1040], 0, "Write Uncorrectable not supported");
    let r = h.log(a, 0x03, 0, 512);
    assert_eq!(r.buf.as_ref().unwrap().as_slice()[0], 1);
    assert_eq!(plain(h.log(a, 0x01, 0, 64).cqe.status), Status::SUCCESS);
    assert_eq!(
        plain(h.log(a, 0x42, 0, 64).cqe.status),
        Status::INVALID_LOG_PAGE
    );
    // The host's buffer is smaller than NUMD asks for.
    let sqe = GetLogPageCommand::to_sqe(4, 0, 0x02, false, 0, 512);
    assert_eq!(
        h.exec(a, sqe, Some(IoBuf::leak_zeroed(256)), 256)
            .cqe
            .status
            .plain(),
        Status::DATA_SGL_LENGTH_INVALID
    );
}

/// Every event names the owner its queue was opened with, and a command's buffer goes back to
/// the owner it was submitted under even when its queue's slot has a new owner by then.
#[test]
fn events_carry_the_owner_recorded_for_the_queue() {
    let mut h = H::new();
    let a = h.t.open_queue_for(3).unwrap();
    let r = h.connect_raw(a, 0, 31, 0, SUB, HOST, CNTLID_DYNAMIC);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    let cntlid = r.cqe.dw0 as u16;
    assert_eq!(
        plain(h.prop_set(a, 0x14, 0x0046_0001).cqe.status),
        Status::SUCCESS
    );
    let io = h.t.open_queue_for(4).unwrap();
    let r = h.connect_raw(io, 1, 127, 0, SUB, HOST, cntlid);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert_eq!((a.owner(), io.owner()), (3, 4));

    // A read completing at the backend: its completion is owner 4's.
    let read = RwCommand::simple(0, 1).to_sqe(IoOpcode::Read as u8, 1, 1);
    assert!(
        h.send(io, read, Some(IoBuf::leak_zeroed(512)), 512)
            .is_none()
    );
    h.poll();
    let owners: Vec<u16> = h.events.drain(..).map(|e| e.owner()).collect();
    assert_eq!(owners, vec![4]);

    // A read still at the backend when its connection drops (abruptly: the association ends)
    // and the queue's slot is reopened by owner 9: the buffer goes back to owner 4, the
    // termination of the admin queue to owner 3.
    assert!(
        h.send(io, read, Some(IoBuf::leak_zeroed(512)), 512)
            .is_none()
    );
    h.t.close_queue(io).unwrap();
    let reused = h.t.open_queue_for(9).unwrap();
    assert_eq!(
        reused.as_u32() >> 16,
        io.as_u32() >> 16,
        "the slot is reused"
    );
    h.poll();
    let mut seen: Vec<(&str, u16)> = h
        .events
        .iter()
        .map(|e| match e {
            Event::Completion(..) => ("completion", e.owner()),
            Event::QueueTerminated(..) => ("terminated", e.owner()),
            Event::BufferReleased { .. } => ("released", e.owner()),
        })
        .collect();
    seen.sort();
    assert_eq!(seen, vec![("released", 4), ("terminated", 3)]);

    // A local controller's I/O queues have its admin queue's owner.
    let now = h.now;
    let la = h.t.create_local_controller(now, SUB, 5).unwrap();
    h.t.property_set(now, la, 0x14, PropertySize::Four, 0x0046_0001)
        .unwrap();
    let lio = h.t.attach_local_io_queue(la, 1, 15).unwrap();
    assert_eq!((la.owner(), lio.owner()), (5, 5));
}

#[test]
fn local_controller_for_pcie() {
    let mut h = H::new();
    let now = h.now;
    let a = h.t.create_local_controller(now, SUB, 0).unwrap();
    assert_eq!(h.t.property_get(a, 0x1C, PropertySize::Four), Ok(0));
    h.t.property_set(now, a, 0x14, PropertySize::Four, 0x0046_0001)
        .unwrap();
    assert_eq!(h.t.property_get(a, 0x1C, PropertySize::Four), Ok(1));
    let r = h.exec(a, Sqe::new(AdminOpcode::CreateIoSq as u8, 1), None, 0);
    assert_eq!(plain(r.cqe.status), Status::INVALID_OPCODE);
    assert_eq!(
        h.t.attach_local_io_queue(a, 0, 15),
        Err(Status::INVALID_QUEUE_IDENTIFIER)
    );
    assert_eq!(
        h.t.attach_local_io_queue(a, 1, 0),
        Err(Status::INVALID_QUEUE_SIZE)
    );
    let io = h.t.attach_local_io_queue(a, 1, 15).unwrap();
    assert_eq!(
        plain(h.write(io, 1, 1, 0, &[4u8; 512]).cqe.status),
        Status::SUCCESS
    );
    assert_eq!(h.read(io, 2, 1, 0, 1).buf.unwrap().as_slice(), &[4u8; 512]);
    // Delete I/O SQ: closing a local I/O queue keeps the controller.
    h.t.close_queue(io).unwrap();
    assert_eq!(h.t.controller_count(), 1);
    assert!(h.t.attach_local_io_queue(a, 1, 15).is_ok());
}

#[test]
fn config_validation() {
    let mut cfg = config(4);
    cfg.subsystems[1].nqn = SUB.into();
    assert_eq!(
        Target::new(cfg).unwrap_err(),
        ConfigError::DuplicateSubsystem
    );
    let mut cfg = config(4);
    cfg.subsystems[0].namespaces.push(ns(1, 4));
    assert_eq!(Target::new(cfg).unwrap_err(), ConfigError::BadNsid(1));
    let mut cfg = config(4);
    cfg.subsystems[0].nqn = String::from(keel_nvme::DISCOVERY_NQN);
    assert_eq!(Target::new(cfg).unwrap_err(), ConfigError::BadNqn);
    let mut cfg = config(4);
    cfg.limits.max_queue_depth = 1;
    assert_eq!(Target::new(cfg).unwrap_err(), ConfigError::BadLimits);
}

#[test]
fn raw_linux_connect_bytes_and_sq_flow_control() {
    // The admin Connect exactly as Linux nvme-tcp puts it on the wire, with CATTR bit 2.
    let mut raw = [0u8; 64];
    raw[0] = 0x7f;
    raw[1] = 0x40;
    raw[4] = 0x01;
    raw[33] = 0x04;
    raw[39] = 0x01;
    raw[44] = 31;
    raw[46] = 0x04;
    raw[48] = 0x88;
    raw[49] = 0x13;
    let mut h = H::new();
    let q = h.t.open_queue().unwrap();
    let mut b = IoBuf::leak_zeroed(1024);
    ConnectData::new(HOSTID, CNTLID_DYNAMIC, SUB, HOST).write(b.as_mut_slice());
    let r = h.exec(q, Sqe::from_bytes(&raw), Some(b), 1024);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert_eq!(
        r.cqe.sqhd, 0xFFFF,
        "SQ flow control disabled: SQHD reserved as FFFFh"
    );
    let info = h.t.queue_info(q).unwrap();
    assert!(info.sq_flow_control_disabled);
    assert_eq!((info.qid, info.sqsize), (0, 31));
    // KATO 5000 ms was recorded: expiry after 5 s + grace.
    h.now = Instant::from_millis(h.now.as_millis() + 5_900);
    h.poll();
    assert_eq!(h.t.controller_count(), 1);
    h.now = Instant::from_millis(h.now.as_millis() + 200);
    h.poll();
    assert_eq!(h.t.controller_count(), 0);
}

#[test]
fn tenant_volumes_cut_from_one_drive() {
    use keel_storage::{SharedBackend, SliceBackend};
    let drive = SharedBackend::new(RamBackend::new(512, 1024, 64).unwrap(), 64);
    let vol = |start| -> Box<dyn BlockBackend> {
        Box::new(SliceBackend::new(drive.handle().unwrap(), start, 512).unwrap())
    };
    let mut cfg = config(8);
    cfg.subsystems[0].namespaces = vec![
        NamespaceConfig {
            nsid: 1,
            backend: vol(0),
            nguid: [1; 16],
            uuid: [0; 16],
            eui64: [0; 8],
            qos: Default::default(),
        },
        NamespaceConfig {
            nsid: 2,
            backend: vol(512),
            nguid: [2; 16],
            uuid: [0; 16],
            eui64: [0; 8],
            qos: Default::default(),
        },
    ];
    let mut h = H::with(cfg);
    let (_a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    assert_eq!(
        plain(h.write(io, 1, 1, 511, &[1u8; 512]).cqe.status),
        Status::SUCCESS
    );
    assert_eq!(
        plain(h.write(io, 2, 2, 0, &[2u8; 512]).cqe.status),
        Status::SUCCESS
    );
    assert_eq!(
        plain(h.read(io, 3, 1, 511, 2).cqe.status),
        Status::LBA_OUT_OF_RANGE
    );
    assert_eq!(
        h.read(io, 4, 1, 511, 1).buf.unwrap().as_slice(),
        &[1u8; 512]
    );
    assert_eq!(h.read(io, 5, 2, 0, 1).buf.unwrap().as_slice(), &[2u8; 512]);
}

#[test]
fn changed_namespace_list_overflow() {
    let (mut h, a, _io, _) = H::setup();
    for nsid in 2..=300 {
        let small = NamespaceConfig {
            backend: Box::new(RamBackend::new(512, 8, 1).unwrap()),
            ..ns(nsid, 1)
        };
        h.t.add_namespace(SUB, small).unwrap();
    }
    let r = h.log(a, 0x04, 0, 4096);
    assert_eq!(&page(&r)[..8], &[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]);
    let r = h.identify(a, 2, 250);
    let p = page(&r);
    assert_eq!(&p[..8], &[251, 0, 0, 0, 252, 0, 0, 0]);
    assert_eq!(&p[200..204], &[0, 0, 0, 0]);
    assert_eq!(
        plain(h.identify(a, 2, 0xFFFF_FFFE).cqe.status),
        Status::INVALID_NAMESPACE_OR_FORMAT
    );
}

mod prop {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Mostly plausible commands (known opcodes, NSID 1, small LBAs, matching transfer
    /// lengths) so the success paths run, mixed with arbitrary bytes.
    fn sqe_strategy() -> impl Strategy<Value = (u8, u8, u16, u32, [u32; 6], u32, bool)> {
        let known = proptest::sample::select(vec![
            0x00u8, 0x01, 0x02, 0x05, 0x08, 0x09, 0x06, 0x02, 0x09, 0x0A, 0x0C, 0x08, 0x18, 0x7F,
            0x19,
        ]);
        (
            prop_oneof![3 => known, 1 => any::<u8>()],
            prop_oneof![3 => Just(0u8), 1 => any::<u8>()],
            0u16..8,
            prop_oneof![4 => Just(1u32), 1 => Just(0), 1 => Just(0xFFFF_FFFF), 1 => any::<u32>()],
            prop_oneof![
                1 => any::<[u32; 6]>(),
                3 => (prop_oneof![0u32..4, 0u32..2100], 0u32..4, any::<u32>())
                    .prop_map(|(a, b, x)| [a, x & 0x3, b, x >> 28, 0, 0]),
            ],
            prop_oneof![3 => Just(u32::MAX), 1 => Just(0u32), 1 => 0u32..9000],
            any::<bool>(),
        )
    }

    /// The transfer length a well-behaved host would send for `sqe` (`u32::MAX` = "right").
    fn plausible_len(sqe: &Sqe, on_admin: bool) -> u32 {
        if on_admin {
            return match sqe.opcode {
                0x06 => 4096,
                0x02 => ((sqe.cdw[0] >> 16) + 1).min(2048) * 4,
                0x7F => 1024,
                _ => 0,
            };
        }
        match sqe.opcode {
            0x01 | 0x02 | 0x05 => ((sqe.cdw[2] & 0xFFFF) + 1) * 512,
            0x09 => ((sqe.cdw[0] & 0xFF) + 1) * 16,
            0x19 => ((sqe.cdw[2] & 0xFF) + 1) * 32,
            _ => 0,
        }
    }

    proptest! {
        /// Hostile Connect commands and Connect data on fresh queues never panic and always
        /// get exactly one immediate answer; successes yield a valid CNTLID.
        #[test]
        fn hostile_connects(cases in proptest::collection::vec(
            (any::<[u32; 4]>(), proptest::collection::vec(any::<u8>(), 0..1100), 0u8..4, any::<u16>(), 0u32..1200),
            1..12))
        {
            let mut h = H::new();
            let (_a, real) = h.admin(SUB, HOST, 0);
            for (cdw, mut data, mode, cntlid, len) in cases {
                let q = h.t.open_queue().unwrap();
                let mut sqe = Sqe::fabrics(1, 7);
                sqe.cdw[..4].copy_from_slice(&cdw);
                if mode > 0 {
                    // Keep it close to valid so deeper checks run.
                    sqe.cdw[0] &= if mode == 1 { 0x0000_0000 } else { 0x000F_0000 };
                    sqe.cdw[1] &= 0x0004_00FF;
                    data.resize(1024, 0);
                    let c = if mode == 3 { real } else { cntlid };
                    let host = if mode == 2 { OK_HOST } else { HOST };
                    ConnectData::new(HOSTID, c, if cntlid % 3 == 0 { PRIV } else { SUB }, host)
                        .write(&mut data);
                }
                let n = data.len();
                let mut b = IoBuf::leak_zeroed(n.max(1));
                b.capacity_mut()[..n].copy_from_slice(&data);
                b.set_len(n);
                h.cookie += 1;
                let r = h.t.submit(h.now, q, Request { sqe, buf: Some(b), data_len: len, cookie: h.cookie });
                let r = r.expect("Connect is always answered at once");
                prop_assert_eq!(r.cookie, h.cookie);
                prop_assert!(r.buf.is_some());
                if r.cqe.status.is_success() {
                    let id = r.cqe.dw0 as u16;
                    prop_assert!((1..=0xFFEF).contains(&id));
                    prop_assert!(h.t.queue_info(q).is_some());
                }
                h.t.close_queue(q).unwrap();
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Hostile commands on admin and I/O queues never panic; every command gets at most
        /// one completion, exactly one unless its queue was terminated or it is a waiting AER;
        /// every buffer handed in comes back exactly once.
        #[test]
        fn hostile_sqes(cmds in proptest::collection::vec(sqe_strategy(), 1..60), depth in 1usize..4) {
            // With one scratch buffer, so Copy runs (and waits for it) too.
            let mut cfg = config(depth);
            cfg.scratch = Some(keel_storage::BufPool::from_heap(1, 4096, 0xF000_0000).unwrap());
            let mut h = H::with(cfg);
            let (a, cntlid) = h.admin(SUB, HOST, 5000);
            let io = h.io_queue(1, cntlid);
            let mut expected: HashMap<u32, (QueueId, u8)> = HashMap::new();
            let mut seen: HashMap<u32, u32> = HashMap::new();
            let mut bufs_in: HashMap<u64, ()> = HashMap::new();
            let mut bufs_out: HashMap<u64, u32> = HashMap::new();
            let mut next_addr = 0x1000u64;
            let record = |e: &Event, seen: &mut HashMap<u32, u32>, bufs_out: &mut HashMap<u64, u32>| {
                match e {
                    Event::Completion(_, r) => {
                        *seen.entry(r.cookie).or_default() += 1;
                        if let Some(b) = &r.buf { *bufs_out.entry(b.dma_addr()).or_default() += 1; }
                    }
                    Event::BufferReleased { buf: b, .. } => *bufs_out.entry(b.dma_addr()).or_default() += 1,
                    Event::QueueTerminated(_) => {}
                }
            };
            for (i, (op, flags, cid, nsid, cdw, len, on_admin)) in cmds.into_iter().enumerate() {
                let q = if on_admin { a } else { io };
                let mut sqe = Sqe::new(op, cid).with_nsid(nsid);
                sqe.flags = flags & 0xC1;
                sqe.cdw = cdw;
                let len = if len == u32::MAX { plausible_len(&sqe, on_admin) } else { len };
                let buf = if len > 0 {
                    let mem = vec![0xA5u8; len as usize].leak();
                    next_addr += 0x10000;
                    bufs_in.insert(next_addr, ());
                    Some(IoBuf::new(mem, next_addr))
                } else { None };
                h.cookie = i as u32 + 1_000;
                let r = h.t.submit(h.now, q, Request { sqe, buf, data_len: len, cookie: h.cookie });
                expected.insert(h.cookie, (q, op));
                if let Some(r) = r {
                    prop_assert_eq!(r.cookie, h.cookie);
                    prop_assert_eq!(r.cqe.cid, cid);
                    prop_assert!(r.data_len as usize <= r.buf.as_ref().map(|b| b.capacity()).unwrap_or(0));
                    record(&Event::Completion(q, r), &mut seen, &mut bufs_out);
                }
                h.now = Instant::from_millis(h.now.as_millis() + 10);
                let mut ev = Vec::new();
                h.t.poll(h.now, &mut |e| ev.push(e));
                for e in &ev { record(e, &mut seen, &mut bufs_out); }
                h.events.extend(ev);
            }
            for _ in 0..4 {
                let mut ev = Vec::new();
                h.t.poll(h.now, &mut |e| ev.push(e));
                for e in &ev { record(e, &mut seen, &mut bufs_out); }
                h.events.extend(ev);
            }
            let terminated = h.terminated();
            for (cookie, (q, op)) in &expected {
                let n = seen.get(cookie).copied().unwrap_or(0);
                prop_assert!(n <= 1, "cookie {} completed {} times", cookie, n);
                let waiting_aer = *op == AdminOpcode::AsyncEventRequest as u8 && *q == a;
                if n == 0 {
                    prop_assert!(terminated.contains(q) || waiting_aer, "cookie {} (op {:#x}) never completed", cookie, op);
                }
            }
            // Close everything: in-flight buffers come back too.
            let _ = h.t.close_queue(io);
            let _ = h.t.close_queue(a);
            for _ in 0..3 {
                let mut ev = Vec::new();
                h.t.poll(h.now, &mut |e| ev.push(e));
                for e in &ev { record(e, &mut seen, &mut bufs_out); }
            }
            // The connect buffers (dma 0) are not tracked.
            bufs_out.remove(&0);
            for (addr, n) in &bufs_out {
                prop_assert!(bufs_in.contains_key(addr));
                prop_assert_eq!(*n, 1, "buffer {:#x} returned {} times", addr, n);
            }
            prop_assert_eq!(bufs_out.len(), bufs_in.len(), "buffers lost");
            prop_assert_eq!(h.t.scratch.as_ref().map(|p| p.available()), Some(1), "scratch lost");
            prop_assert_eq!(h.t.controller_count(), 0);
        }
    }
}

#[test]
fn transport_rejections_consume_a_queue_slot() {
    let mut h = H::new();
    let q = h.t.open_queue().unwrap();
    let r = h.connect_raw(q, 0, 31, 0, SUB, HOST, CNTLID_DYNAMIC);
    assert_eq!(r.cqe.sqhd, 1);
    // A command the transport refused (e.g. a data digest error) still advances SQHD and
    // carries the transport's status, with the buffer handed back.
    let sqe = Sqe::new(AdminOpcode::Identify as u8, 7);
    let req = Request {
        sqe,
        buf: Some(IoBuf::leak_zeroed(64)),
        data_len: 64,
        cookie: 9,
    };
    let r =
        h.t.reject(Instant::from_millis(1), q, req, Status::new(0, 0x22));
    assert_eq!(r.cqe.sqhd, 2);
    assert_eq!(r.cqe.cid, 7);
    assert_eq!((r.cqe.status.sct, r.cqe.status.sc), (0, 0x22));
    assert_eq!(r.cookie, 9);
    assert!(r.buf.is_some());
    // On a queue that never connected the status is still reported.
    let fresh = h.t.open_queue().unwrap();
    let r = h.t.reject(
        Instant::from_millis(1),
        fresh,
        Request {
            sqe,
            buf: None,
            data_len: 0,
            cookie: 0,
        },
        Status::new(0, 0x0F),
    );
    assert_eq!(r.cqe.status.sc, 0x0F);
}

/// A RAM backend that says it has a volatile write cache and records the operations it gets.
struct CachedRam {
    ram: RamBackend,
    ops: alloc::rc::Rc<core::cell::RefCell<Vec<BlockOp>>>,
}

impl BlockBackend for CachedRam {
    fn geometry(&self) -> keel_storage::Geometry {
        self.ram.geometry()
    }
    fn capabilities(&self) -> keel_storage::Capabilities {
        keel_storage::Capabilities {
            volatile_write_cache: true,
            flush: true,
            fua: true,
            ..self.ram.capabilities()
        }
    }
    fn submit(&mut self, req: keel_storage::BlockRequest) -> Result<(), keel_storage::Rejected> {
        self.ops.borrow_mut().push(req.op);
        // RAM has no cache: Flush is the backend's no-op.
        self.ram.submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(keel_storage::BlockCompletion)) -> usize {
        self.ram.poll(done)
    }
}

#[test]
fn a_host_that_disables_the_volatile_write_cache_gets_write_through() {
    let ops = alloc::rc::Rc::new(core::cell::RefCell::new(Vec::new()));
    let mut cfg = config(64);
    cfg.subsystems[0].namespaces[0].backend = Box::new(CachedRam {
        ram: RamBackend::new(512, BLOCKS, 64).unwrap(),
        ops: ops.clone(),
    });
    let mut h = H::with(cfg);
    let (a, c) = h.admin(SUB, HOST, 0);
    let io = h.io_queue(1, c);
    // Identify Controller VWC bit 0: present; Get Features 06h: enabled.
    let id = IdentifyController::decode(&page(&h.identify(a, 1, 0)));
    assert_eq!(id.vwc.bits() & 1, 1);
    let get = |h: &mut H| {
        h.exec(a, FeaturesCommand::get_sqe(11, 0x06, 0), None, 0)
            .cqe
            .dw0
    };
    assert_eq!(get(&mut h), 1);
    let fua_of = |ops: &[BlockOp]| match ops.last() {
        Some(BlockOp::Write { fua }) | Some(BlockOp::WriteZeroes { fua, .. }) => *fua,
        other => panic!("not a write: {other:?}"),
    };
    let data = [0x5au8; 512];
    assert_eq!(h.write(io, 1, 1, 0, &data).cqe.status, Status::SUCCESS);
    assert!(!fua_of(&ops.borrow()), "cache enabled: a plain write");
    // WCE = 0: every write must be on media at completion.
    let r = h.exec(a, FeaturesCommand::set_sqe(12, 0x06, 0), None, 0);
    assert_eq!(r.cqe.status, Status::SUCCESS);
    assert_eq!(get(&mut h), 0);
    assert_eq!(h.write(io, 2, 1, 1, &data).cqe.status, Status::SUCCESS);
    assert!(
        fua_of(&ops.borrow()),
        "cache disabled: the write carries FUA"
    );
    let sqe = RwCommand::simple(2, 1).to_sqe(IoOpcode::WriteZeroes as u8, 3, 1);
    assert_eq!(h.exec(io, sqe, None, 0).cqe.status, Status::SUCCESS);
    assert!(fua_of(&ops.borrow()), "and so does Write Zeroes");
    // Enabled again: plain writes.
    let r = h.exec(a, FeaturesCommand::set_sqe(13, 0x06, 1), None, 0);
    assert_eq!(r.cqe.status, Status::SUCCESS);
    assert_eq!(h.write(io, 4, 1, 3, &data).cqe.status, Status::SUCCESS);
    assert!(!fua_of(&ops.borrow()));
}

/// The features NVMe base 2.0 §5.27.1 makes mandatory for an I/O controller, which have no
/// effect here: Set keeps what is valid, Get returns it (SEL 0) or the default (SEL 1).
#[test]
fn mandatory_features_without_an_effect() {
    let mut h = H::new();
    let (a, _) = h.admin(SUB, HOST, 0);
    let get = |h: &mut H, fid: u8, cdw11: u32, sel: u8| {
        let r = h.exec(
            a,
            FeaturesCommand::get_sqe(6, fid, sel).with_cdw(11, cdw11),
            None,
            0,
        );
        (plain(r.cqe.status), r.cqe.dw0)
    };
    let set = |h: &mut H, fid: u8, v: u32| {
        plain(
            h.exec(a, FeaturesCommand::set_sqe(6, fid, v), None, 0)
                .cqe
                .status,
        )
    };
    // Power Management: one power state (NPSS 0), so PS 1 is invalid; WH is kept.
    assert_eq!(set(&mut h, 0x02, 1), Status::INVALID_FIELD);
    assert_eq!(set(&mut h, 0x02, 2 << 5), Status::SUCCESS);
    assert_eq!(get(&mut h, 0x02, 0, 0), (Status::SUCCESS, 2 << 5));
    assert_eq!(get(&mut h, 0x02, 0, 1), (Status::SUCCESS, 0));
    // Temperature Threshold: composite sensor only, over and under thresholds apart.
    assert_eq!(get(&mut h, 0x04, 0, 0), (Status::SUCCESS, 0x0157));
    assert_eq!(set(&mut h, 0x04, (1 << 20) | 250), Status::SUCCESS);
    assert_eq!(
        get(&mut h, 0x04, 1 << 20, 0),
        (Status::SUCCESS, (1 << 20) | 250)
    );
    assert_eq!(get(&mut h, 0x04, 0, 0), (Status::SUCCESS, 0x0157));
    assert_eq!(set(&mut h, 0x04, (1 << 16) | 300), Status::INVALID_FIELD);
    assert_eq!(get(&mut h, 0x04, 2 << 16, 0).0, Status::INVALID_FIELD);
    // Error Recovery: TLER kept; DULBE cannot be enabled.
    assert_eq!(set(&mut h, 0x05, 10), Status::SUCCESS);
    assert_eq!(get(&mut h, 0x05, 0, 0), (Status::SUCCESS, 10));
    assert_eq!(set(&mut h, 0x05, 1 << 16), Status::INVALID_FIELD);
    // Write Atomicity Normal: DN.
    assert_eq!(set(&mut h, 0x0A, 1), Status::SUCCESS);
    assert_eq!(get(&mut h, 0x0A, 0, 0), (Status::SUCCESS, 1));
    assert_eq!(get(&mut h, 0x0A, 0, 1), (Status::SUCCESS, 0));
    // Interrupt Coalescing and Interrupt Vector Configuration exist on PCIe only.
    assert_eq!(get(&mut h, 0x08, 0, 0).0, Status::INVALID_FIELD);
    assert_eq!(get(&mut h, 0x09, 0, 0).0, Status::INVALID_FIELD);
    // Every one reports its capabilities: changeable, not saveable.
    for fid in [0x01, 0x02, 0x04, 0x05, 0x07, 0x0A, 0x0B, 0x0F] {
        assert_eq!(
            get(&mut h, fid, 0, 3),
            (Status::SUCCESS, 0b100),
            "FID {fid:#x}"
        );
    }
}

/// Interrupt Coalescing and Interrupt Vector Configuration on a local (PCIe) controller.
#[test]
fn interrupt_features_on_a_local_controller() {
    let mut h = H::new();
    let a = h.t.create_local_controller(h.now, SUB, 0).unwrap();
    // CC.EN = 1 (the local host enables the controller before any admin command).
    h.t.property_set(h.now, a, 0x14, PropertySize::Four, 0x0046_0001)
        .unwrap();
    let get = |h: &mut H, fid: u8, cdw11: u32| {
        let r = h.exec(
            a,
            FeaturesCommand::get_sqe(6, fid, 0).with_cdw(11, cdw11),
            None,
            0,
        );
        (plain(r.cqe.status), r.cqe.dw0)
    };
    let r = h.exec(a, FeaturesCommand::set_sqe(6, 0x08, 0x0A04), None, 0);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert_eq!(get(&mut h, 0x08, 0), (Status::SUCCESS, 0x0A04));
    let r = h.exec(a, FeaturesCommand::set_sqe(6, 0x09, (1 << 16) | 2), None, 0);
    assert_eq!(plain(r.cqe.status), Status::SUCCESS);
    assert_eq!(get(&mut h, 0x09, 2), (Status::SUCCESS, (1 << 16) | 2));
    assert_eq!(get(&mut h, 0x09, 1), (Status::SUCCESS, 1));
    assert_eq!(get(&mut h, 0x09, 4000).0, Status::INVALID_FIELD);
}

/// Identify CNS 05h-08h for the NVM Command Set (CSI 00h).
#[test]
fn identify_command_set_structures() {
    let (mut h, a, _io, _) = H::setup();
    let id = |h: &mut H, cns: u8, csi: u8, nsid: u32| {
        let sqe = IdentifyCommand {
            cns,
            cntid: 0,
            csi,
            nsid,
        }
        .to_sqe(7);
        let r = h.exec(a, sqe, Some(IoBuf::leak_zeroed(4096)), 4096);
        (plain(r.cqe.status), r.buf.map(|b| b.as_slice().to_vec()))
    };
    // CNS 05h / 06h, CSI NVM: all zero (no PI, no extended formats, no extra limits).
    let (st, p) = id(&mut h, 0x05, 0, 1);
    assert_eq!(st, Status::SUCCESS);
    assert!(p.unwrap().iter().all(|&b| b == 0));
    let (st, p) = id(&mut h, 0x06, 0, 0);
    assert_eq!(st, Status::SUCCESS);
    assert!(p.unwrap().iter().all(|&b| b == 0));
    // Another command set: Invalid Field.
    assert_eq!(id(&mut h, 0x05, 2, 1).0, Status::INVALID_FIELD);
    assert_eq!(id(&mut h, 0x06, 2, 0).0, Status::INVALID_FIELD);
    // CNS 07h: the active NSIDs of the NVM command set.
    let (st, p) = id(&mut h, 0x07, 0, 0);
    assert_eq!(st, Status::SUCCESS);
    assert_eq!(&p.unwrap()[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    // CNS 08h: NMIC bit 0 (sharable), NSTAT bit 0 (ready).
    let (st, p) = id(&mut h, 0x08, 0, 1);
    let p = p.unwrap();
    assert_eq!(st, Status::SUCCESS);
    assert_eq!((p[1], p[14]), (1, 1));
    // An inactive NSID in range: zeroes, not ready.
    let (st, p) = id(&mut h, 0x08, 0, 9);
    assert_eq!(st, Status::SUCCESS);
    assert!(p.unwrap().iter().all(|&b| b == 0));
}

/// A backend tag carries owner, queue, generation and slot in 56 bits: slices of a drive or a
/// remote volume keep the top 8 bits for their handle (keel-storage `slice.rs`), and the
/// NVMe/TCP service's owner is u16::MAX.
#[test]
fn backend_tags_leave_the_top_byte_to_shared_backends() {
    use crate::target::{TAG_BITS, tag, tag_owner, untag};
    let t = tag(0xFFFF, 0x1234, u16::MAX, 0xFFFF);
    assert!(t < 1 << TAG_BITS && TAG_BITS == 56, "{t:#x}");
    assert_eq!(untag(t), (0xFFFF, 0x34, 0xFFFF));
    assert_eq!(tag_owner(t), u16::MAX);
    let t = tag(3, 7, 2, 9);
    assert_eq!((untag(t), tag_owner(t)), ((3, 7, 9), 2));
}

#[test]
fn subsystems_added_and_removed_live() {
    const NEW: &str = "nqn.2024-01.io.keel:fn1";
    let mut h = H::new();
    let now = h.now;
    let sub = |nqn: &str, nsids: &[u32]| SubsystemConfig {
        nqn: nqn.into(),
        serial: "KEELF1".into(),
        model: "Keel function".into(),
        allowed_hosts: vec![],
        namespaces: nsids.iter().map(|&n| ns(n, 8)).collect(),
    };
    // Refused, and nothing changes: a duplicate NQN, the discovery NQN, a bad NQN, the same
    // NSID twice.
    assert!(h.t.add_subsystem(sub(SUB, &[1])).is_err());
    assert!(
        h.t.add_subsystem(sub(keel_nvme::DISCOVERY_NQN, &[1]))
            .is_err()
    );
    assert!(h.t.add_subsystem(sub("", &[1])).is_err());
    assert!(h.t.add_subsystem(sub(NEW, &[1, 1])).is_err());
    assert_eq!(h.t.subsystem_views().count(), 2);
    assert!(h.t.create_local_controller(now, NEW, 1).is_err());

    h.t.add_subsystem(sub(NEW, &[1, 2])).unwrap();
    assert_eq!(h.t.subsystem_views().count(), 3);
    assert!(h.t.has_namespace(NEW, 2));
    let a = h.t.create_local_controller(now, NEW, 1).unwrap();
    h.t.property_set(now, a, 0x14, PropertySize::Four, 0x0046_0001)
        .unwrap();
    let io = h.t.attach_local_io_queue(a, 1, 15).unwrap();
    assert_eq!(
        plain(h.write(io, 1, 2, 0, &[7u8; 512]).cqe.status),
        Status::SUCCESS
    );
    // The first subsystem's namespace 1 is another disk: it reads zeroes there.
    let la = h.t.create_local_controller(now, SUB, 2).unwrap();
    h.t.property_set(now, la, 0x14, PropertySize::Four, 0x0046_0001)
        .unwrap();
    let lio = h.t.attach_local_io_queue(la, 1, 15).unwrap();
    assert_eq!(h.read(lio, 2, 1, 0, 1).buf.unwrap().as_slice(), &[0u8; 512]);

    // A read at the backend when the subsystem goes: its queues are terminated, the buffer
    // comes back, nothing completes on a dead queue.
    let read = RwCommand::simple(0, 1).to_sqe(IoOpcode::Read as u8, 3, 2);
    assert!(
        h.send(io, read, Some(IoBuf::leak_zeroed(512)), 512)
            .is_none()
    );
    h.events.clear();
    h.t.remove_subsystem(NEW).unwrap();
    h.poll();
    let mut seen: Vec<&str> = h
        .events
        .iter()
        .map(|e| match e {
            Event::Completion(..) => "completion",
            Event::QueueTerminated(..) => "terminated",
            Event::BufferReleased { .. } => "released",
        })
        .collect();
    seen.sort();
    assert_eq!(seen, vec!["released", "terminated", "terminated"]);
    assert_eq!(h.t.subsystem_views().count(), 2);
    assert!(!h.t.has_namespace(NEW, 1));
    assert_eq!(
        h.t.controller_count(),
        1,
        "only the other subsystem's controller"
    );
    // Removing it twice is refused; the other subsystem still serves.
    assert_eq!(
        h.t.remove_subsystem(NEW),
        Err(TargetError::UnknownSubsystem)
    );
    assert_eq!(h.read(lio, 4, 1, 0, 1).buf.unwrap().as_slice(), &[0u8; 512]);

    // Created again under the same NQN: a fresh namespace (RAM backends start zeroed) in the
    // drained slot.
    let slots = h.t.subsystems.len();
    h.t.add_subsystem(sub(NEW, &[1])).unwrap();
    assert_eq!(h.t.subsystems.len(), slots, "the removed slot is reused");
    let a = h.t.create_local_controller(now, NEW, 1).unwrap();
    h.t.property_set(now, a, 0x14, PropertySize::Four, 0x0046_0001)
        .unwrap();
    let io = h.t.attach_local_io_queue(a, 1, 15).unwrap();
    assert_eq!(h.read(io, 5, 1, 0, 1).buf.unwrap().as_slice(), &[0u8; 512]);
}
