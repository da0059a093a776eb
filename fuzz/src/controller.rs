//! The controller core fed raw SQEs and data over several queues, as NVMe/TCP connections
//! would: open queues, Connect (admin queues first, then I/O queues of the controllers that
//! exist), enable, admin and I/O commands (typed fields or all 64 bytes raw), time passing
//! (keep-alive expiry), transport rejects, queues closing in order or abruptly, namespaces
//! added and removed live.
//!
//! Invariants: every submitted command gets exactly one answer (at once, or one
//! [`Event::Completion`] later), with its CID and cookie, on its own queue, never after the
//! queue was terminated or closed; read data never exceeds what the host asked for; every
//! buffer comes back to the pool; once every queue is closed no queue or controller is left.

use crate::pool;
use arbitrary::Arbitrary;
use keel_controller::{
    Event, Instant, Limits, NamespaceConfig, NamespaceQos, PortEntry, PropertySize, QosLimits,
    QueueId, QueueLoss, Rate, Request, Response, SubsystemConfig, Target, TargetConfig,
};
use keel_nvme::fabrics::{CNTLID_DYNAMIC, ConnectCommand, ConnectData, PropertyCommand};
use keel_nvme::{DISCOVERY_NQN, NSID_ALL, Sqe, Status};
use keel_storage::{BlockBackend, RamBackend};
use std::collections::HashMap;

const SUB: &str = "nqn.2026-11.dev.keel:fuzz";
const PRIV: &str = "nqn.2026-11.dev.keel:private";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:fuzz-host";
const OK_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:allowed";
const SUBSYSTEMS: [&str; 4] = [SUB, PRIV, DISCOVERY_NQN, "nqn.2026-11.dev.keel:nobody"];
const HOSTS: [&str; 3] = [HOST, OK_HOST, ""];
/// Admin opcodes the core knows (and a few it must refuse), picked by index.
const ADMIN_OPS: [u8; 14] = [
    0x06, 0x02, 0x09, 0x0A, 0x08, 0x0C, 0x18, 0x7F, 0x01, 0x05, 0x00, 0x04, 0x10, 0x80,
];
/// I/O opcodes: Flush, Write, Read, Compare, Write Zeroes, Dataset Management, and fabrics.
const IO_OPS: [u8; 7] = [0x00, 0x01, 0x02, 0x05, 0x08, 0x09, 0x7F];
/// Fabrics command types: Property Set, Connect, Property Get, Disconnect, and unknown.
const FCTYPES: [u8; 5] = [0x00, 0x01, 0x04, 0x08, 0x05];

/// A whole fuzz input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// Backend queue depth (small values exercise the busy-backend retry path).
    pub depth: u8,
    /// Keep-alive grace in milliseconds.
    pub grace_ms: u8,
    /// What happens, in order.
    pub ops: Vec<Op>,
}

/// One step.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// A new connection.
    Open,
    /// A well-formed Connect on queue `q`.
    Connect {
        /// Queue (index into the open ones).
        q: u8,
        /// QID (0: admin queue).
        qid: u8,
        /// SQSIZE (0's based).
        sqsize: u8,
        /// KATO in milliseconds.
        kato: u16,
        /// CATTR.
        cattr: u8,
        /// Subsystem NQN (index).
        sub: u8,
        /// Host NQN (index).
        host: u8,
        /// Controller ID: a known one (index) or dynamic.
        cntlid: Option<u8>,
    },
    /// Property Set CC on queue `q`: enable with the usual values, or a raw value.
    SetCc {
        /// Queue.
        q: u8,
        /// Raw CC (None: EN = 1, IOSQES 6, IOCQES 4).
        raw: Option<u32>,
    },
    /// A typed command.
    Cmd {
        /// Queue.
        q: u8,
        /// The command.
        cmd: Cmd,
    },
    /// 64 raw bytes.
    Raw {
        /// Queue.
        q: u8,
        /// The SQE.
        sqe: [u8; 64],
        /// Its data.
        data: Data,
    },
    /// A command the transport first offers to run at once with its data in place
    /// (`Target::submit_now`, as NVMe/TCP does for RAM reads and in-capsule writes), then
    /// submits the usual way if refused.
    Now {
        /// Queue.
        q: u8,
        /// The command.
        cmd: Cmd,
    },
    /// The transport refuses a command (bad SGL, digest error) with a status.
    Reject {
        /// Queue.
        q: u8,
        /// CID.
        cid: u16,
        /// Status field.
        status: u16,
    },
    /// Time passes and the core is polled.
    Poll {
        /// Milliseconds.
        ms: u16,
    },
    /// A connection goes away.
    Close {
        /// Queue.
        q: u8,
        /// FIN (true) or reset.
        orderly: bool,
    },
    /// A namespace is added to or removed from a subsystem while hosts are connected.
    Namespace {
        /// The private subsystem instead of the open one.
        private: bool,
        /// NSID.
        nsid: u8,
        /// Add (true) or remove.
        add: bool,
    },
}

/// A command with typed fields.
#[derive(Arbitrary, Debug)]
pub struct Cmd {
    /// Opcode: an index into the known ones when `known`, else raw.
    pub opcode: u8,
    /// Pick `opcode` from the known ones.
    pub known: bool,
    /// Use the I/O opcode table (else admin).
    pub io: bool,
    /// Fabrics command type (index), for opcode 7Fh.
    pub fctype: u8,
    /// CID.
    pub cid: u16,
    /// NSID (0xFF: all namespaces).
    pub nsid: u8,
    /// FUSE/PSDT byte.
    pub flags: u8,
    /// CDW10..CDW15.
    pub cdw: [u32; 6],
    /// Data.
    pub data: Data,
}

/// The data the transport hands over with a command.
#[derive(Arbitrary, Debug)]
pub struct Data {
    /// Length the SGL describes (bytes; used when `natural` is false).
    pub len: u32,
    /// Use the length the command itself implies (blocks × 512, Identify's 4 KiB, ...).
    pub natural: bool,
    /// Content (repeated).
    pub fill: Vec<u8>,
}

struct Harness {
    t: Target,
    now: u64,
    cookie: u32,
    /// Open queues in the order they were opened.
    queues: Vec<QueueId>,
    /// Controller IDs a Connect returned.
    cntlids: Vec<u16>,
    /// Commands waiting for a completion: cookie -> (queue, CID, data length asked).
    pending: HashMap<u32, (QueueId, u16, u32)>,
    /// Queues the core terminated (the transport closes them next).
    terminated: Vec<QueueId>,
}

fn namespace(nsid: u32, depth: usize) -> NamespaceConfig {
    let backend: Box<dyn BlockBackend> = if nsid.is_multiple_of(2) {
        Box::new(RamBackend::new(4096, 256, depth).expect("ram"))
    } else {
        Box::new(RamBackend::new(512, 2048, depth).expect("ram"))
    };
    NamespaceConfig {
        nsid,
        backend,
        nguid: [nsid as u8; 16],
        uuid: [0; 16],
        eui64: [0; 8],
        qos: qos(nsid),
    }
}

/// Even namespaces share one scheduling domain with at most 2 commands at the backend and
/// an IOPS limit (commands wait in the QoS scheduler, time passing releases them); odd ones
/// are unlimited.
fn qos(nsid: u32) -> NamespaceQos {
    if nsid.is_multiple_of(2) {
        NamespaceQos {
            limits: QosLimits {
                iops: Some(Rate::new(1000)),
                ..QosLimits::NONE
            },
            weight: nsid % 7 + 1,
            domain: Some(1),
            max_inflight: 2,
            ..NamespaceQos::default()
        }
    } else {
        NamespaceQos::default()
    }
}

fn pick<T: Copy>(list: &[T], i: u8) -> T {
    list[i as usize % list.len()]
}

impl Harness {
    fn new(depth: usize, grace_ms: u32) -> Self {
        let t = Target::new(TargetConfig {
            subsystems: vec![
                SubsystemConfig {
                    nqn: SUB.into(),
                    serial: "KEELFUZZ1".into(),
                    model: "Keel fuzz".into(),
                    allowed_hosts: vec![],
                    namespaces: vec![namespace(1, depth), namespace(2, depth)],
                },
                SubsystemConfig {
                    nqn: PRIV.into(),
                    serial: "KEELFUZZ2".into(),
                    model: "Keel fuzz private".into(),
                    allowed_hosts: vec![OK_HOST.into()],
                    namespaces: vec![namespace(1, depth)],
                },
            ],
            ports: vec![PortEntry::tcp_ipv4("10.0.2.15", "4420", 1)],
            limits: Limits {
                max_controllers: 4,
                max_queues: 12,
                kato_grace_ms: grace_ms,
                ..Limits::default()
            },
            ..TargetConfig::default()
        })
        .expect("target config");
        Self {
            t,
            now: 1_000,
            cookie: 0,
            queues: Vec::new(),
            cntlids: Vec::new(),
            pending: HashMap::new(),
            terminated: Vec::new(),
        }
    }

    fn queue(&self, q: u8) -> Option<QueueId> {
        (!self.queues.is_empty()).then(|| pick(&self.queues, q))
    }

    fn now(&self) -> Instant {
        Instant::from_millis(self.now)
    }

    /// Hands a command to the core as a transport would: data beyond the transfer limit is
    /// refused by the transport itself; a command it cannot get a buffer for waits (dropped
    /// here).
    fn submit(&mut self, q: QueueId, sqe: Sqe, data_len: u32, fill: &[u8]) {
        self.cookie += 1;
        let cookie = self.cookie;
        if data_len as usize > pool::BUF_SIZE {
            let req = Request {
                sqe,
                buf: None,
                data_len,
                cookie,
            };
            let now = self.now();
            let r = self.t.reject(now, q, req, Status::DATA_SGL_LENGTH_INVALID);
            self.answered(q, &sqe, cookie, data_len, r);
            return;
        }
        let buf = if data_len > 0 {
            match pool::get(data_len as usize, fill) {
                Some(b) => Some(b),
                None => return,
            }
        } else {
            None
        };
        let req = Request {
            sqe,
            buf,
            data_len,
            cookie,
        };
        let now = self.now();
        match self.t.submit(now, q, req) {
            Some(r) => self.answered(q, &sqe, cookie, data_len, r),
            None => {
                self.pending.insert(cookie, (q, sqe.cid, data_len));
            }
        }
    }

    /// Checks an immediate answer and returns its buffer.
    fn answered(&mut self, _q: QueueId, sqe: &Sqe, cookie: u32, data_len: u32, r: Response) {
        assert_eq!(r.cookie, cookie, "answer for another command");
        assert_eq!(r.cqe.cid, sqe.cid, "CID not echoed");
        check_data(&r, data_len);
        if let Some(b) = r.buf {
            pool::put(b);
        }
    }

    fn poll(&mut self) {
        let now = self.now();
        let mut events = Vec::new();
        self.t.poll(now, &mut |e| events.push(e));
        for e in events {
            self.event(e);
        }
        for q in std::mem::take(&mut self.terminated) {
            self.close(q, QueueLoss::Abrupt);
        }
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::Completion(q, r) => {
                let Some((pq, cid, data_len)) = self.pending.remove(&r.cookie) else {
                    panic!("completion for a command that is not pending: {r:?}");
                };
                assert_eq!(pq, q, "completion on another queue");
                assert_eq!(r.cqe.cid, cid, "CID not echoed");
                assert!(
                    self.queues.contains(&q) && !self.terminated.contains(&q),
                    "completion on a queue that was terminated or closed"
                );
                check_data(&r, data_len);
                if let Some(b) = r.buf {
                    pool::put(b);
                }
            }
            Event::QueueTerminated(q) => {
                assert!(self.queues.contains(&q), "unknown queue terminated");
                if !self.terminated.contains(&q) {
                    self.terminated.push(q);
                }
                // Its commands are dropped: their buffers come back as BufferReleased.
                self.pending.retain(|_, (pq, _, _)| *pq != q);
            }
            Event::BufferReleased { buf: b, .. } => pool::put(b),
        }
    }

    fn close(&mut self, q: QueueId, how: QueueLoss) {
        let Some(i) = self.queues.iter().position(|&x| x == q) else {
            return;
        };
        self.queues.remove(i);
        self.terminated.retain(|&x| x != q);
        self.pending.retain(|_, (pq, _, _)| *pq != q);
        self.t
            .close_queue_after(q, how)
            .expect("closing an open queue");
    }

    fn connect(&mut self, q: QueueId, op: &Op) {
        let Op::Connect {
            qid,
            sqsize,
            kato,
            cattr,
            sub,
            host,
            cntlid,
            ..
        } = *op
        else {
            return;
        };
        let cntlid = match cntlid {
            Some(i) if !self.cntlids.is_empty() => pick(&self.cntlids, i),
            _ => CNTLID_DYNAMIC,
        };
        let sqe = ConnectCommand {
            recfmt: 0,
            qid: qid as u16,
            sqsize: sqsize as u16,
            cattr,
            kato: kato as u32,
        }
        .to_sqe(qid as u16);
        let mut data = vec![0u8; ConnectData::SIZE];
        ConnectData::new(
            [0x11; 16],
            cntlid,
            pick(&SUBSYSTEMS, sub),
            pick(&HOSTS, host),
        )
        .write(&mut data);
        // Connect is answered at once; remember the controller it made.
        self.cookie += 1;
        let cookie = self.cookie;
        let Some(buf) = pool::get(data.len(), &data) else {
            return;
        };
        let req = Request {
            sqe,
            buf: Some(buf),
            data_len: data.len() as u32,
            cookie,
        };
        let now = self.now();
        match self.t.submit(now, q, req) {
            Some(r) => {
                if r.cqe.status == Status::SUCCESS && qid == 0 {
                    let id = r.cqe.dw0 as u16;
                    assert!((1..=0xFFEF).contains(&id), "CNTLID {id:#x} out of range");
                    self.cntlids.push(id);
                }
                self.answered(q, &sqe, cookie, ConnectData::SIZE as u32, r);
            }
            None => {
                self.pending
                    .insert(cookie, (q, sqe.cid, ConnectData::SIZE as u32));
            }
        }
    }

    fn step(&mut self, op: Op, depth: usize) {
        match op {
            Op::Open => {
                if let Ok(q) = self.t.open_queue() {
                    assert!(
                        !self.queues.contains(&q),
                        "a live queue id was handed out again"
                    );
                    self.queues.push(q);
                }
            }
            Op::Connect { q, .. } => {
                if let Some(qq) = self.queue(q) {
                    self.connect(qq, &op);
                }
            }
            Op::SetCc { q, raw } => {
                let Some(qq) = self.queue(q) else { return };
                let v = raw.unwrap_or(0x0046_0001) as u64;
                let sqe = PropertyCommand::set_sqe(0x5e7, 0x14, PropertySize::Four, v);
                self.submit(qq, sqe, 0, &[]);
            }
            Op::Cmd { q, cmd } => {
                let Some(qq) = self.queue(q) else { return };
                let (sqe, len) = typed(&cmd);
                self.submit(qq, sqe, len, &cmd.data.fill);
            }
            Op::Raw { q, sqe, data } => {
                let Some(qq) = self.queue(q) else { return };
                let sqe = Sqe::from_bytes(&sqe);
                self.submit(qq, sqe, data.len % (2 * pool::BUF_SIZE as u32), &data.fill);
            }
            Op::Now { q, cmd } => {
                let Some(qq) = self.queue(q) else { return };
                let (sqe, len) = typed(&cmd);
                let mut data = vec![0u8; (len as usize).min(2 * pool::BUF_SIZE)];
                for (d, f) in data.iter_mut().zip(cmd.data.fill.iter().cycle()) {
                    *d = *f;
                }
                let before = data.clone();
                self.cookie += 1;
                let cookie = self.cookie;
                let now = self.now();
                let nd = if sqe.opcode & 1 == 1 {
                    keel_controller::NowData::Write(&data)
                } else {
                    keel_controller::NowData::Read(&mut data)
                };
                let writes = matches!(nd, keel_controller::NowData::Write(_));
                match self.t.submit_now(now, qq, &sqe, cookie, nd) {
                    Some(r) => {
                        assert!(r.buf.is_none(), "a buffer from nowhere");
                        assert!(r.data_len as usize <= data.len(), "more data than the window");
                        if writes {
                            assert_eq!(data, before, "write data changed");
                        }
                        // A read's data is in the caller's window, not in a buffer.
                        assert_eq!(r.cookie, cookie, "answer for another command");
                        assert_eq!(r.cqe.cid, sqe.cid, "CID not echoed");
                        assert!(r.data_len <= len, "more data than the host asked for");
                    }
                    None => {
                        self.cookie -= 1;
                        self.submit(qq, sqe, len, &cmd.data.fill);
                    }
                }
            }
            Op::Reject { q, cid, status } => {
                let Some(qq) = self.queue(q) else { return };
                self.cookie += 1;
                let sqe = Sqe::new(0x02, cid);
                let req = Request {
                    sqe,
                    buf: pool::get(512, &[]),
                    data_len: 512,
                    cookie: self.cookie,
                };
                let now = self.now();
                let r = self.t.reject(now, qq, req, Status::from_field(status));
                let cookie = self.cookie;
                self.answered(qq, &sqe, cookie, 512, r);
            }
            Op::Poll { ms } => {
                self.now += ms as u64;
                self.poll();
            }
            Op::Close { q, orderly } => {
                if let Some(qq) = self.queue(q) {
                    let how = if orderly {
                        QueueLoss::Orderly
                    } else {
                        QueueLoss::Abrupt
                    };
                    self.close(qq, how);
                }
            }
            Op::Namespace { private, nsid, add } => {
                let sub = if private { PRIV } else { SUB };
                let nsid = nsid as u32 % 8;
                if add {
                    let _ = self.t.add_namespace(sub, namespace(nsid, depth));
                } else {
                    let _ = self.t.remove_namespace(sub, nsid);
                }
            }
        }
    }

    /// Closes everything and checks that nothing is left behind.
    fn finish(mut self) {
        self.poll();
        for q in self.queues.clone() {
            self.close(q, QueueLoss::Abrupt);
        }
        for _ in 0..8 {
            self.now += 1;
            self.poll();
            if pool::available() == pool::BUFFERS {
                break;
            }
        }
        assert!(self.pending.is_empty(), "commands pending on closed queues");
        assert_eq!(
            pool::available(),
            pool::BUFFERS,
            "buffers not returned after every queue closed"
        );
        assert_eq!(self.t.open_queue_count(), 0, "queues left open");
        assert_eq!(
            self.t.controller_count(),
            0,
            "controllers left without queues"
        );
    }
}

/// Read data handed back never exceeds the buffer or what the host asked for.
fn check_data(r: &Response, data_len: u32) {
    if r.data_len > 0 {
        assert!(r.data_len <= data_len, "more data than the host asked for");
        let cap = r.buf.as_ref().map_or(0, |b| b.len());
        assert!(r.data_len as usize <= cap, "data length beyond the buffer");
    }
}

/// Builds an SQE and the transfer length from typed fields.
fn typed(c: &Cmd) -> (Sqe, u32) {
    let opcode = match (c.known, c.io) {
        (true, true) => pick(&IO_OPS, c.opcode),
        (true, false) => pick(&ADMIN_OPS, c.opcode),
        (false, _) => c.opcode,
    };
    let mut sqe = Sqe::new(opcode, c.cid);
    sqe.flags = c.flags;
    sqe.nsid = match c.nsid {
        0xFF => NSID_ALL,
        n => n as u32 % 8,
    };
    if opcode == 0x7F {
        sqe.nsid = pick(&FCTYPES, c.fctype) as u32;
    }
    sqe.cdw = c.cdw;
    let natural = match (c.io, opcode) {
        // Read, Write, Compare: NLB + 1 blocks (the namespace's block size is 512 or 4096).
        (true, 0x01 | 0x02 | 0x05) => {
            let blocks = (c.cdw[2] & 0xFFFF) + 1;
            blocks * if c.nsid.is_multiple_of(2) { 4096 } else { 512 }
        }
        // Dataset Management: NR + 1 ranges of 16 bytes.
        (true, 0x09) => ((c.cdw[0] & 0xFF) + 1) * 16,
        // Identify.
        (false, 0x06) => 4096,
        // Get Log Page: NUMD + 1 dwords.
        (false, 0x02) => {
            let numd = ((c.cdw[0] >> 16) as u64 | ((c.cdw[1] & 0xFFFF) as u64) << 16) + 1;
            (numd * 4).min(u32::MAX as u64) as u32
        }
        _ => 0,
    };
    let len = if c.data.natural {
        natural
    } else {
        c.data.len % (2 * pool::BUF_SIZE as u32)
    };
    (sqe, len)
}

/// The fuzz body.
pub fn run(input: Input) {
    let depth = (input.depth % 4) as usize + 1;
    let mut h = Harness::new(depth, input.grace_ms as u32);
    for op in input.ops {
        h.step(op, depth);
    }
    h.finish();
}
