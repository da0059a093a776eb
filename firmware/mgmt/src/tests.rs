//! Host tests: framing under every segmentation, signatures and replay, HTTP routing, the
//! metrics grammar (and `promtool check metrics` when it is installed).

use super::*;
use crate::session::{HttpOutcome, MAX_FAILURES, route_http};
use crate::wire::*;
use ed25519_dalek::SigningKey;
use proptest::prelude::*;

struct Fake {
    key: SigningKey,
    counter: u64,
    pushes: Vec<Vec<u8>>,
    reboots: u32,
    snapshots: core::cell::Cell<u32>,
    slots: Vec<FunctionSlotInfo>,
}

impl Fake {
    fn new() -> Self {
        Fake {
            key: SigningKey::from_bytes(&[7; 32]),
            counter: 0,
            pushes: Vec::new(),
            reboots: 0,
            snapshots: core::cell::Cell::new(0),
            slots: (0..3)
                .map(|i| FunctionSlotInfo {
                    slot: i,
                    kind: function::slot_kind(i),
                    ..FunctionSlotInfo::default()
                })
                .collect(),
        }
    }
}

fn snapshot() -> Snapshot {
    Snapshot {
        version: "0.1.0".into(),
        build_id: "git 1a2b3c".into(),
        board: "qemu-virt".into(),
        uptime_ns: 12_345_678_901,
        generation: 3,
        config_source: "flash copy A".into(),
        subsystems: vec![SubsystemInfo {
            nqn: "nqn.2026-11.dev.keel:vol0".into(),
            allowed_hosts: vec![],
        }],
        namespaces: vec![
            NamespaceInfo {
                subsystem: "nqn.2026-11.dev.keel:vol0".into(),
                nsid: 1,
                backend: "ram 256 MiB".into(),
                size_bytes: 256 << 20,
                block_size: 512,
                encryption: "none".into(),
                exports: vec!["tcp".into()],
                stats: NsCounters {
                    reads: 10,
                    writes: 20,
                    others: 1,
                    read_bytes: 40960,
                    write_bytes: 81920,
                    errors: 2,
                    read_latency: Latency {
                        count: 10,
                        sum_ns: 1_000_000,
                        p50_ns: 65536,
                        p99_ns: 262_144,
                        p999_ns: 262_144,
                        max_ns: 262_144,
                    },
                    write_latency: Latency::default(),
                },
            },
            NamespaceInfo {
                subsystem: "nqn.weird\"name\\with\nnewline".into(),
                nsid: 2,
                backend: "drive 0 ns 1".into(),
                size_bytes: 1 << 30,
                block_size: 4096,
                encryption: "aes-256-xts".into(),
                exports: vec!["tcp".into(), "pcie-fn0".into()],
                stats: NsCounters::default(),
            },
        ],
        controllers: vec![ControllerInfo {
            cntlid: 1,
            subsystem: "nqn.2026-11.dev.keel:vol0".into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1234".into(),
            transport: "tcp".into(),
            io_queues: 4,
        }],
        tcp_connections: 5,
        functions: vec![FunctionInfo {
            index: 0,
            subsystem: "nqn.2026-11.dev.keel:fn0".into(),
            enabled: true,
        }],
        cores: vec![
            CoreInfo {
                index: 0,
                mpidr: 0,
                role: "network, NVMe/TCP, drives, functions, management".into(),
                passes: 1000,
                busy_passes: 400,
                sleeps: 7,
                messages: 3,
                allocator_calls: 52,
                nvmf_connections: 2,
                nvmf_commands: 77,
                doorbells_to_core0: 0,
                wakeup_rescues: 1,
                function_commands: 12,
            },
            CoreInfo {
                index: 1,
                mpidr: 1,
                role: "ring".into(),
                passes: 90,
                busy_passes: 2,
                sleeps: 80,
                messages: 2,
                allocator_calls: 0,
                nvmf_connections: 1,
                nvmf_commands: 30,
                doorbells_to_core0: 5,
                wakeup_rescues: 0,
                function_commands: 9,
            },
        ],
        resources: Resources {
            heap_free: 1 << 30,
            nvmf_buffers_free: 250,
            nvmf_buffers_total: 256,
            evicted: 3,
            ..Resources::default()
        },
        socket_buffer_bytes: 16 << 20,
        remotes: vec![RemoteInfo {
            subnqn: "nqn.2026-11.dev.keel:pool".into(),
            nsid: 1,
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:5678".into(),
            state: "degraded".into(),
            size_bytes: 256 << 20,
            block_size: 512,
            policy: "round-robin".into(),
            exports: vec![("nqn.2026-11.dev.keel:fn0".into(), 1)],
            queued: 0,
            in_flight: 3,
            submitted: 100,
            completed: 96,
            failed: 1,
            path_errors: 1,
            retries: 0,
            failovers: 7,
            paths: vec![
                RemotePathInfo {
                    addr: "10.0.2.2:4420".into(),
                    state: "live".into(),
                    ana: "optimized".into(),
                    cntlid: 1,
                    io_queues: 4,
                    queue_depth: 128,
                    in_flight: 3,
                    commands: 90,
                    connects: 1,
                    attempts: 1,
                    ..RemotePathInfo::default()
                },
                RemotePathInfo {
                    addr: "10.0.2.2:4421".into(),
                    state: "reconnecting".into(),
                    last_loss: "TCP connection closed".into(),
                    attempts: 3,
                    connects: 1,
                    losses: 3,
                    commands: 17,
                    aborted: 7,
                    ..RemotePathInfo::default()
                },
            ],
        }],
        qos_groups: vec![GroupInfo {
            name: "tenant-a".into(),
            weight: 4,
            qos: QosInfo {
                limits: vec![QosLimit {
                    name: "bps".into(),
                    per_sec: 100 << 20,
                    burst: 1 << 20,
                }],
                ..QosInfo::default()
            },
        }],
        qos_namespaces: vec![
            NamespaceQosInfo {
                subsystem: "nqn.2026-11.dev.keel:vol0".into(),
                nsid: 1,
                weight: 2,
                group: Some("tenant-a".into()),
                qos: QosInfo {
                    limits: vec![QosLimit {
                        name: "write_iops".into(),
                        per_sec: 500,
                        burst: 50,
                    }],
                    admitted_ops: 31,
                    admitted_bytes: 126_976,
                    ops_per_sec: 498,
                    bytes_per_sec: 2_039_808,
                    throttled_ns: 1_500_000_000,
                    queued: 7,
                },
            },
            NamespaceQosInfo {
                subsystem: "nqn.weird\"name\\with\nnewline".into(),
                nsid: 2,
                weight: 1,
                group: None,
                qos: QosInfo::default(),
            },
        ],
        qos_controllers: vec![ControllerQosInfo {
            cntlid: 1,
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1234".into(),
            transport: "tcp".into(),
            qos: QosInfo::default(),
        }],
        function_slots: vec![
            FunctionSlotInfo {
                slot: 0,
                state: SlotState::Live,
                kind: "pf".into(),
                subsystem: "nqn.2026-11.dev.keel:fn0".into(),
                nsids: vec![1, 2],
                host: "ready".into(),
                origin: "created".into(),
                limits: vec![QosLimit {
                    name: "write_iops".into(),
                    per_sec: 1000,
                    burst: 100,
                }],
            },
            FunctionSlotInfo {
                slot: 1,
                kind: "vf1".into(),
                ..FunctionSlotInfo::default()
            },
        ],
        qos_domains: vec![QosDomainInfo {
            namespaces: vec![
                "nqn.2026-11.dev.keel:default/1".into(),
                "nqn.2026-11.dev.keel:default/2".into(),
            ],
            max_inflight: 64,
            inflight: 64,
            queued: 7,
        }],
        nic: NicCounters {
            tx_tso_frames: 4242,
            tx_dropped: 2,
        },
        drives: vec![DriveInfo {
            bdf: "00:02.0".into(),
            model: "QEMU NVMe Ctrl".into(),
            state: "online".into(),
            resets: 1,
            aborts: 2,
            queues: vec![
                DriveQueueInfo {
                    core: 0,
                    first_qid: 1,
                    queues: 4,
                    state: "up".into(),
                    commands: 120,
                    completed: 118,
                    errors: 1,
                    timeouts: 2,
                    resets: 1,
                    failed_by_reset: 2,
                    sq_doorbells: 100,
                    cq_doorbells: 110,
                    queue_full: 3,
                },
                DriveQueueInfo {
                    core: 1,
                    first_qid: 5,
                    queues: 1,
                    state: "down".into(),
                    commands: 1200,
                    completed: 1200,
                    sq_doorbells: 900,
                    cq_doorbells: 1000,
                    ..DriveQueueInfo::default()
                },
            ],
        }],
        remote_queues: vec![
            RemoteQueueInfo {
                subnqn: "nqn.2026-11.dev.keel:pool".into(),
                nsid: 1,
                path: "10.0.2.2:4420".into(),
                core: 0,
                qid: 1,
                state: "live".into(),
                commands: 90,
                in_flight: 3,
            },
            RemoteQueueInfo {
                subnqn: "nqn.2026-11.dev.keel:pool".into(),
                nsid: 1,
                path: "10.0.2.2:4420".into(),
                core: 1,
                qid: 5,
                state: "connecting".into(),
                commands: 1170,
                in_flight: 0,
            },
        ],
    }
}

/// A snapshot as protocol version 1 was first released (before `remotes` was appended): how
/// an older device encodes it, and what an older client decodes.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SnapshotV1 {
    version: String,
    build_id: String,
    board: String,
    uptime_ns: u64,
    generation: u64,
    config_source: String,
    subsystems: Vec<SubsystemInfo>,
    namespaces: Vec<NamespaceInfo>,
    controllers: Vec<ControllerInfo>,
    tcp_connections: u32,
    functions: Vec<FunctionInfo>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum ReplyV1 {
    Status(SnapshotV1),
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ResponseV1 {
    challenge: [u8; 32],
    reply: ReplyV1,
}

#[test]
fn snapshots_stay_readable_across_versions() {
    let new = snapshot();
    let v1 = SnapshotV1 {
        version: new.version.clone(),
        build_id: new.build_id.clone(),
        board: new.board.clone(),
        uptime_ns: new.uptime_ns,
        generation: new.generation,
        config_source: new.config_source.clone(),
        subsystems: new.subsystems.clone(),
        namespaces: new.namespaces.clone(),
        controllers: new.controllers.clone(),
        tcp_connections: new.tcp_connections,
        functions: new.functions.clone(),
    };
    // An older device's reply, read by this client: everything but the remotes.
    let old_bytes = postcard::to_allocvec(&ResponseV1 {
        challenge: [3; 32],
        reply: ReplyV1::Status(v1),
    })
    .unwrap();
    assert!(
        postcard::from_bytes::<Response>(&old_bytes).is_err(),
        "ends early"
    );
    let r = decode_response(&old_bytes).expect("read with the appended field empty");
    let Reply::Status(s) = r.reply else {
        panic!("{:?}", r.reply)
    };
    assert_eq!(
        s,
        Box::new(Snapshot {
            remotes: vec![],
            qos_groups: vec![],
            qos_namespaces: vec![],
            qos_controllers: vec![],
            resources: Resources::default(),
            cores: vec![],
            socket_buffer_bytes: 0,
            function_slots: vec![],
            qos_domains: vec![],
            nic: NicCounters::default(),
            drives: vec![],
            remote_queues: vec![],
            ..snapshot()
        })
    );
    // This device's reply, read by an older client: the appended field is ignored.
    let new_bytes = postcard::to_allocvec(&Response {
        challenge: [3; 32],
        reply: Reply::Status(Box::new(snapshot())),
    })
    .unwrap();
    let ResponseV1 {
        reply: ReplyV1::Status(old_view),
        ..
    } = postcard::from_bytes(&new_bytes).unwrap();
    assert_eq!(old_view.functions, snapshot().functions);
    // And by this client, whole; other replies are untouched by the padding.
    assert_eq!(
        decode_response(&new_bytes).unwrap().reply,
        Reply::Status(Box::new(snapshot()))
    );
    let rebooting = postcard::to_allocvec(&Response {
        challenge: [1; 32],
        reply: Reply::Rebooting,
    })
    .unwrap();
    assert_eq!(decode_response(&rebooting).unwrap().reply, Reply::Rebooting);
    assert!(
        decode_response(&rebooting[..20]).is_err(),
        "a truncated frame"
    );
}

impl Device for Fake {
    fn snapshot(&self) -> Snapshot {
        self.snapshots.set(self.snapshots.get() + 1);
        snapshot()
    }
    fn push(&mut self, bundle: &[u8]) -> Result<PushReport, String> {
        if bundle.starts_with(b"bad") {
            return Err("bundle signature does not verify".into());
        }
        self.pushes.push(bundle.to_vec());
        Ok(PushReport {
            generation: 4,
            added: vec![("nqn.2026-11.dev.keel:vol0".into(), 2)],
            removed: vec![],
            needs_reboot: vec![],
            persisted: true,
        })
    }
    fn reboot(&mut self) {
        self.reboots += 1;
    }
    fn create_function(&mut self, spec: &FunctionSpec) -> Result<FunctionSlotInfo, String> {
        let taken: Vec<String> = self.slots.iter().map(|s| s.subsystem.clone()).collect();
        function::check_create(spec, &self.slots, |n| {
            n == "nqn.2026-11.dev.keel:vol0" || taken.iter().any(|t| t == n)
        })?;
        let s = &mut self.slots[usize::from(spec.slot)];
        s.state = SlotState::Live;
        s.subsystem = spec.nqn.clone();
        s.nsids = spec.namespaces.iter().map(|n| n.nsid).collect();
        s.limits = spec.limits.clone();
        Ok(s.clone())
    }
    fn remove_function(&mut self, slot: u16) -> Result<FunctionSlotInfo, String> {
        function::check_remove(slot, &self.slots)?;
        let s = &mut self.slots[usize::from(slot)];
        *s = FunctionSlotInfo {
            slot,
            kind: function::slot_kind(slot),
            ..FunctionSlotInfo::default()
        };
        Ok(s.clone())
    }
    fn authorized_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }
    fn fresh_challenge(&mut self) -> [u8; 32] {
        self.counter += 1;
        let mut c = [0u8; 32];
        c[..8].copy_from_slice(&self.counter.to_le_bytes());
        c[31] = 0xc4;
        c
    }
}

/// Takes every complete frame out of the session's output.
fn drain_frames(s: &mut Session) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    loop {
        let out = s.output();
        if out.len() < 4 {
            assert!(out.is_empty(), "partial frame in the output");
            return frames;
        }
        let n = u32::from_le_bytes(out[..4].try_into().unwrap()) as usize;
        assert!(out.len() >= 4 + n);
        frames.push(out[4..4 + n].to_vec());
        s.advance_output(4 + n);
    }
}

fn response(s: &mut Session) -> Response {
    let f = drain_frames(s);
    assert_eq!(f.len(), 1, "one response expected");
    postcard::from_bytes(&f[0]).expect("a response")
}

/// A session past the hello; returns it and the challenge.
fn open(dev: &mut Fake) -> (Session, [u8; 32]) {
    let mut s = Session::new();
    assert_eq!(s.feed(b"KMG1", dev), 4);
    let f = drain_frames(&mut s);
    assert_eq!(f.len(), 1);
    let hello: Hello = postcard::from_bytes(&f[0]).unwrap();
    assert_eq!(hello.protocol, PROTOCOL_VERSION);
    assert_eq!(hello.device, "Keel 0.1.0 (git 1a2b3c) on qemu-virt");
    (s, hello.challenge)
}

fn feed_all(s: &mut Session, mut bytes: &[u8], dev: &mut Fake) {
    while !bytes.is_empty() {
        let n = s.feed(bytes, dev);
        assert!(n > 0, "session stalled with {} bytes left", bytes.len());
        bytes = &bytes[n..];
    }
}

#[test]
fn status_then_next_challenge() {
    let mut dev = Fake::new();
    let (mut s, c) = open(&mut dev);
    feed_all(
        &mut s,
        &sign_request(&dev.key.clone(), &c, &Request::Status),
        &mut dev,
    );
    let r = response(&mut s);
    assert_eq!(r.reply, Reply::Status(Box::new(snapshot())));
    assert_ne!(r.challenge, c);
    // The next request over the new challenge works too.
    feed_all(
        &mut s,
        &sign_request(&dev.key.clone(), &r.challenge, &Request::Status),
        &mut dev,
    );
    assert!(matches!(response(&mut s).reply, Reply::Status(_)));
    assert_eq!(s.requests(), 2);
    assert!(!s.wants_close());
}

#[test]
fn replayed_request_is_refused_and_not_executed() {
    let mut dev = Fake::new();
    let key = dev.key.clone();
    let (mut s, c) = open(&mut dev);
    let push = sign_request(&key, &c, &Request::Push(Bytes(b"bundle-1".to_vec())));
    feed_all(&mut s, &push, &mut dev);
    assert!(matches!(response(&mut s).reply, Reply::Pushed(_)));
    // Same frame again on the same connection.
    feed_all(&mut s, &push, &mut dev);
    let r = response(&mut s);
    assert!(
        matches!(
            r.reply,
            Reply::Error {
                code: ErrorCode::BadSignature,
                closing: false,
                ..
            }
        ),
        "{r:?}"
    );
    // And on a new connection (new challenge).
    let (mut s2, _) = open(&mut dev);
    feed_all(&mut s2, &push, &mut dev);
    assert!(matches!(
        response(&mut s2).reply,
        Reply::Error {
            code: ErrorCode::BadSignature,
            ..
        }
    ));
    assert_eq!(dev.pushes.len(), 1, "the replay ran");
}

#[test]
fn other_key_and_tampered_requests_are_refused() {
    let mut dev = Fake::new();
    let (mut s, c) = open(&mut dev);
    let other = SigningKey::from_bytes(&[9; 32]);
    feed_all(
        &mut s,
        &sign_request(&other, &c, &Request::Reboot),
        &mut dev,
    );
    let r = response(&mut s);
    assert!(matches!(
        r.reply,
        Reply::Error {
            code: ErrorCode::BadSignature,
            ..
        }
    ));
    // Right key, but one bit of the request flipped after signing.
    let mut f = sign_request(
        &dev.key.clone(),
        &r.challenge,
        &Request::Push(Bytes(vec![1; 40])),
    );
    f[10] ^= 1;
    feed_all(&mut s, &f, &mut dev);
    assert!(matches!(
        response(&mut s).reply,
        Reply::Error {
            code: ErrorCode::BadSignature,
            ..
        }
    ));
    assert_eq!(dev.reboots, 0);
    assert!(dev.pushes.is_empty());
}

#[test]
fn a_failed_attempt_burns_the_challenge() {
    let mut dev = Fake::new();
    let key = dev.key.clone();
    let (mut s, c) = open(&mut dev);
    feed_all(&mut s, &frame(b"\x05garbage"), &mut dev);
    let r = response(&mut s);
    assert!(matches!(
        r.reply,
        Reply::Error {
            code: ErrorCode::Malformed,
            ..
        }
    ));
    assert_ne!(r.challenge, c);
    // Signed over the hello's challenge: no longer valid.
    feed_all(&mut s, &sign_request(&key, &c, &Request::Status), &mut dev);
    assert!(matches!(response(&mut s).reply, Reply::Error { .. }));
}

#[test]
fn connection_closes_after_a_few_failures() {
    let mut dev = Fake::new();
    let (mut s, _) = open(&mut dev);
    for i in 1..=MAX_FAILURES {
        assert!(!s.wants_close());
        feed_all(&mut s, &frame(&[0xff; 16]), &mut dev);
        let r = response(&mut s);
        match r.reply {
            Reply::Error { closing, .. } => assert_eq!(closing, i == MAX_FAILURES),
            other => panic!("{other:?}"),
        }
    }
    assert!(s.wants_close());
    assert_eq!(s.failures(), MAX_FAILURES);
    // Input after that is discarded, nothing answered.
    let c = [0; 32];
    feed_all(
        &mut s,
        &sign_request(&dev.key.clone(), &c, &Request::Status),
        &mut dev,
    );
    assert!(s.output().is_empty());
}

#[test]
fn oversized_and_zero_lengths_close() {
    for len in [0u32, (MAX_FRAME + 1) as u32, u32::MAX] {
        let mut dev = Fake::new();
        let (mut s, _) = open(&mut dev);
        feed_all(&mut s, &len.to_le_bytes(), &mut dev);
        let r = response(&mut s);
        assert!(
            matches!(
                r.reply,
                Reply::Error {
                    code: ErrorCode::TooLarge,
                    closing: true,
                    ..
                }
            ),
            "{len}: {r:?}"
        );
        assert!(s.wants_close());
    }
}

#[test]
fn largest_push_fits() {
    let mut dev = Fake::new();
    let key = dev.key.clone();
    let (mut s, c) = open(&mut dev);
    let bundle = vec![0x5a; MAX_BUNDLE];
    let f = sign_request(&key, &c, &Request::Push(Bytes(bundle.clone())));
    assert!(f.len() - 4 <= MAX_FRAME);
    feed_all(&mut s, &f, &mut dev);
    assert!(matches!(response(&mut s).reply, Reply::Pushed(_)));
    assert_eq!(dev.pushes, vec![bundle]);
}

#[test]
fn refused_push_reports_the_device_message() {
    let mut dev = Fake::new();
    let key = dev.key.clone();
    let (mut s, c) = open(&mut dev);
    feed_all(
        &mut s,
        &sign_request(&key, &c, &Request::Push(Bytes(b"bad".to_vec()))),
        &mut dev,
    );
    assert_eq!(
        response(&mut s).reply,
        Reply::PushRefused("bundle signature does not verify".into())
    );
}

#[test]
fn reboot_waits_for_the_transport() {
    let mut dev = Fake::new();
    let key = dev.key.clone();
    let (mut s, c) = open(&mut dev);
    feed_all(&mut s, &sign_request(&key, &c, &Request::Reboot), &mut dev);
    assert!(s.reboot_pending());
    // Not yet handed over: nothing happens.
    s.transport_drained(&mut dev);
    assert_eq!(dev.reboots, 0);
    assert_eq!(response(&mut s).reply, Reply::Rebooting);
    assert!(s.wants_close());
    assert_eq!(dev.reboots, 0);
    s.transport_drained(&mut dev);
    s.transport_drained(&mut dev);
    assert_eq!(dev.reboots, 1);
    assert!(!s.reboot_pending());
}

#[test]
fn input_waits_while_a_response_is_pending() {
    let mut dev = Fake::new();
    let key = dev.key.clone();
    let mut s = Session::new();
    // The client does not wait for the hello: only the magic is taken.
    assert_eq!(s.feed(b"KMG1\x01\x00\x00\x00", &mut dev), 4);
    let f = drain_frames(&mut s);
    let hello: Hello = postcard::from_bytes(&f[0]).unwrap();
    let req = sign_request(&key, &hello.challenge, &Request::Status);
    let mut two = req.clone();
    two.extend_from_slice(&req);
    assert_eq!(s.feed(&two, &mut dev), req.len());
    assert!(matches!(response(&mut s).reply, Reply::Status(_)));
}

#[test]
fn garbage_first_bytes_close_silently() {
    for first in [&b"\x00\x01\x02\x03"[..], b"KMG2", b"get ", b"G\x00ET"] {
        let mut dev = Fake::new();
        let mut s = Session::new();
        feed_all(&mut s, first, &mut dev);
        assert!(s.output().is_empty(), "{first:?}");
        assert!(s.wants_close(), "{first:?}");
    }
}

fn http(req: &[u8], chunk: usize) -> (String, Fake) {
    let mut dev = Fake::new();
    let mut s = Session::new();
    for c in req.chunks(chunk.max(1)) {
        feed_all(&mut s, c, &mut dev);
    }
    let out = String::from_utf8(s.output().to_vec()).unwrap();
    let n = s.output().len();
    s.advance_output(n);
    assert!(s.wants_close(), "HTTP must close after answering: {out}");
    (out, dev)
}

#[test]
fn http_metrics_and_errors() {
    for chunk in [1, 3, 1000] {
        let (r, dev) = http(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
            chunk,
        );
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{r}"
        );
        assert!(body.contains("keel_up 1\n"));
        assert_eq!(dev.snapshots.get(), 1);
    }
    assert!(
        http(b"GET /metrics?x=1 HTTP/1.0\n\n", 5)
            .0
            .starts_with("HTTP/1.1 200")
    );
    let (r, dev) = http(b"GET / HTTP/1.1\r\n\r\n", 4);
    assert!(r.starts_with("HTTP/1.1 404 Not Found"), "{r}");
    assert_eq!(dev.snapshots.get(), 0);
    let (r, _) = http(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 7);
    assert!(
        r.starts_with("HTTP/1.1 405") && r.contains("Allow: GET, HEAD"),
        "{r}"
    );
    let (r, _) = http(b"HEAD /metrics HTTP/1.1\r\n\r\n", 9);
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\n"),
        "{r}"
    );
    assert!(
        http(b"GET  HTTP/1.1\r\n\r\n", 2)
            .0
            .starts_with("HTTP/1.1 400")
    );
    assert!(
        http(b"GET /metrics SPDY/3\r\n\r\n", 2)
            .0
            .starts_with("HTTP/1.1 400")
    );
    assert!(
        http(b"GET /metrics HTTP/1.1 x\r\n\r\n", 2)
            .0
            .starts_with("HTTP/1.1 400")
    );
    assert!(
        http(b"GET /\xff\xfe HTTP/1.1\r\n\r\n", 2)
            .0
            .starts_with("HTTP/1.1 400")
    );
    let mut long = b"GET /metrics HTTP/1.1\r\n".to_vec();
    long.extend(core::iter::repeat_n(b'a', 5000));
    let (r, dev) = http(&long, 700);
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    assert_eq!(dev.snapshots.get(), 0);
}

#[test]
fn http_routing_table() {
    assert_eq!(
        route_http(b"GET /metrics HTTP/1.1\r\n"),
        (HttpOutcome::Metrics, false)
    );
    assert_eq!(
        route_http(b"HEAD /metrics HTTP/1.0\r\n"),
        (HttpOutcome::Metrics, true)
    );
    assert_eq!(
        route_http(b"GET /metricsx HTTP/1.1\r\n").0,
        HttpOutcome::Status(404)
    );
    assert_eq!(
        route_http(b"DELETE /metrics HTTP/1.1\r\n").0,
        HttpOutcome::Status(405)
    );
    assert_eq!(
        route_http(b"GET metrics HTTP/1.1\r\n").0,
        HttpOutcome::Status(400)
    );
    assert_eq!(route_http(b"").0, HttpOutcome::Status(400));
}

/// Checks the text exposition grammar (0.0.4) and the family rules promtool enforces.
fn check_exposition(text: &str) -> Result<(), String> {
    use std::collections::{BTreeMap, BTreeSet};
    let name_ok = |n: &str| {
        let mut b = n.bytes();
        b.next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
            && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series = BTreeSet::new();
    if !text.ends_with('\n') {
        return Err("no final newline".into());
    }
    for (i, line) in text.lines().enumerate() {
        let err = |m: &str| Err(format!("line {}: {m}: {line:?}", i + 1));
        if let Some(rest) = line.strip_prefix("# ") {
            let mut p = rest.splitn(3, ' ');
            let (kw, name) = (p.next().unwrap_or(""), p.next().unwrap_or(""));
            let rest = p.next().unwrap_or("");
            if !name_ok(name) {
                return err("bad metric name");
            }
            if current.as_deref() != Some(name) {
                if let Some(c) = current.take() {
                    finished.insert(c);
                }
                if finished.contains(name) {
                    return err("family appears twice");
                }
                current = Some(name.to_string());
            }
            match kw {
                "HELP" => {
                    if rest.is_empty() || !helped.insert(name.to_string()) {
                        return err("empty or second HELP");
                    }
                }
                "TYPE" => {
                    if !["counter", "gauge", "summary", "histogram", "untyped"].contains(&rest) {
                        return err("bad type");
                    }
                    if types.insert(name.to_string(), rest.to_string()).is_some() {
                        return err("second TYPE");
                    }
                    if rest == "counter" && !name.ends_with("_total") {
                        return err("counter without _total");
                    }
                }
                _ => return err("unknown comment"),
            }
            continue;
        }
        let (series_part, value) = line.rsplit_once(' ').ok_or("no value")?;
        if value.parse::<f64>().is_err() {
            return err("bad value");
        }
        let (name, labels) = match series_part.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').ok_or("no closing brace")?),
            None => (series_part, ""),
        };
        if !name_ok(name) {
            return err("bad sample name");
        }
        let family = current.clone().ok_or("sample before TYPE")?;
        let kind = types.get(&family).ok_or("sample without TYPE")?;
        let allowed = if kind == "summary" {
            name == family || name == format!("{family}_sum") || name == format!("{family}_count")
        } else {
            name == family
        };
        if !allowed {
            return err("sample outside its family");
        }
        // Labels: name="escaped value" separated by commas.
        let mut rest = labels;
        let mut seen = BTreeSet::new();
        while !rest.is_empty() {
            let (lname, after) = rest.split_once("=\"").ok_or("label without =\"")?;
            if !name_ok(lname) || lname.starts_with("__") || !seen.insert(lname) {
                return err("bad or repeated label name");
            }
            let mut chars = after.char_indices();
            let mut end = None;
            while let Some((j, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, '\\' | '"' | 'n')) => {}
                        _ => return err("bad escape"),
                    },
                    '"' => {
                        end = Some(j);
                        break;
                    }
                    '\n' => return err("raw newline"),
                    _ => {}
                }
            }
            let end = end.ok_or("unterminated label value")?;
            rest = &after[end + 1..];
            rest = match rest.strip_prefix(',') {
                Some(r) if !r.is_empty() => r,
                Some(_) => return err("trailing comma"),
                None if rest.is_empty() => rest,
                None => return err("junk after label"),
            };
        }
        if kind == "summary" && name == family && !seen.contains("quantile") {
            return err("summary sample without quantile");
        }
        if !series.insert(series_part.to_string()) {
            return err("duplicate series");
        }
    }
    Ok(())
}

#[test]
fn metrics_follow_the_exposition_grammar() {
    let text = metrics::render(&snapshot());
    check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    for want in [
        "keel_info{version=\"0.1.0\",build=\"git 1a2b3c\",board=\"qemu-virt\"} 1\n",
        "keel_uptime_seconds 12.345678901\n",
        "keel_config_generation{source=\"flash copy A\"} 3\n",
        "keel_namespace_reads_total{subsystem=\"nqn.2026-11.dev.keel:vol0\",namespace=\"1\",transport=\"tcp\"} 10\n",
        "keel_namespace_read_latency_seconds{subsystem=\"nqn.2026-11.dev.keel:vol0\",namespace=\"1\",transport=\"tcp\",quantile=\"0.99\"} 0.000262144\n",
        "keel_namespace_read_latency_seconds_count{subsystem=\"nqn.2026-11.dev.keel:vol0\",namespace=\"1\",transport=\"tcp\"} 10\n",
        "keel_namespace_errors_total{subsystem=\"nqn.weird\\\"name\\\\with\\nnewline\",namespace=\"2\",transport=\"tcp,pcie-fn0\"} 0\n",
        "keel_tcp_connections{transport=\"tcp\"} 5\n",
        "keel_qos_limit{scope=\"namespace\",tenant=\"nqn.2026-11.dev.keel:vol0/1\",limit=\"write_iops\"} 500\n",
        "keel_qos_commands_per_second{scope=\"namespace\",tenant=\"nqn.2026-11.dev.keel:vol0/1\"} 498\n",
        "keel_qos_throttled_seconds_total{scope=\"namespace\",tenant=\"nqn.2026-11.dev.keel:vol0/1\"} 1.500000000\n",
        "keel_qos_queued_commands{scope=\"namespace\",tenant=\"nqn.2026-11.dev.keel:vol0/1\"} 7\n",
        "keel_qos_queued_commands{scope=\"controller\",tenant=\"nqn.2014-08.org.nvmexpress:uuid:1234/1\"} 0\n",
        "keel_qos_limit{scope=\"group\",tenant=\"tenant-a\",limit=\"bps\"} 104857600\n",
        "keel_qos_domain_max_inflight{namespaces=\"nqn.2026-11.dev.keel:default/1 nqn.2026-11.dev.keel:default/2\"} 64\n",
        "keel_qos_domain_inflight_commands{namespaces=\"nqn.2026-11.dev.keel:default/1 nqn.2026-11.dev.keel:default/2\"} 64\n",
        "keel_qos_domain_queued_commands{namespaces=\"nqn.2026-11.dev.keel:default/1 nqn.2026-11.dev.keel:default/2\"} 7\n",
        "keel_nvmf_buffers_free 250\n",
        "keel_connections_evicted_total 3\n",
        "keel_nic_tx_tso_frames_total 4242\n",
        "keel_nic_tx_dropped_total 2\n",
        "keel_controller_io_queues{controller=\"1\",subsystem=\"nqn.2026-11.dev.keel:vol0\",transport=\"tcp\",host=\"nqn.2014-08.org.nvmexpress:uuid:1234\"} 4\n",
        "keel_core_loop_passes_total{core=\"0\",role=\"network, NVMe/TCP, drives, functions, management\"} 1000\n",
        "keel_core_loop_busy_passes_total{core=\"1\",role=\"ring\"} 2\n",
        "keel_core_sleeps_total{core=\"1\",role=\"ring\"} 80\n",
        "keel_core_messages_total{core=\"0\",role=\"network, NVMe/TCP, drives, functions, management\"} 3\n",
        "keel_core_allocator_calls_total{core=\"1\",role=\"ring\"} 0\n",
        "keel_core_nvmf_connections_total{core=\"0\",role=\"network, NVMe/TCP, drives, functions, management\"} 2\n",
        "keel_core_nvmf_commands_total{core=\"1\",role=\"ring\"} 30\n",
        "keel_core_doorbells_to_core0_total{core=\"1\",role=\"ring\"} 5\n",
        "keel_core_wakeup_rescues_total{core=\"0\",role=\"network, NVMe/TCP, drives, functions, management\"} 1\n",
        "keel_core_function_commands_total{core=\"1\",role=\"ring\"} 9\n",
        "keel_remote_state{remote=\"nqn.2026-11.dev.keel:pool\",remote_namespace=\"1\",state=\"degraded\"} 1\n",
        "keel_remote_state{remote=\"nqn.2026-11.dev.keel:pool\",remote_namespace=\"1\",state=\"online\"} 0\n",
        "keel_remote_failovers_total{remote=\"nqn.2026-11.dev.keel:pool\",remote_namespace=\"1\"} 7\n",
        "keel_remote_path_state{remote=\"nqn.2026-11.dev.keel:pool\",remote_namespace=\"1\",path=\"10.0.2.2:4421\",state=\"reconnecting\"} 1\n",
        "keel_remote_path_ana_state{remote=\"nqn.2026-11.dev.keel:pool\",remote_namespace=\"1\",path=\"10.0.2.2:4420\",ana=\"optimized\"} 1\n",
        "keel_remote_path_commands_total{remote=\"nqn.2026-11.dev.keel:pool\",remote_namespace=\"1\",path=\"10.0.2.2:4420\"} 90\n",
        "keel_remote_path_aborted_commands_total{remote=\"nqn.2026-11.dev.keel:pool\",remote_namespace=\"1\",path=\"10.0.2.2:4421\"} 7\n",
        "keel_remote_queue_commands_total{remote=\"nqn.2026-11.dev.keel:pool\",remote_namespace=\"1\",path=\"10.0.2.2:4420\",core=\"1\",qid=\"5\"} 1170\n",
        "keel_remote_queue_state{remote=\"nqn.2026-11.dev.keel:pool\",remote_namespace=\"1\",path=\"10.0.2.2:4420\",core=\"1\",qid=\"5\",state=\"connecting\"} 1\n",
        "keel_remote_queue_in_flight_commands{remote=\"nqn.2026-11.dev.keel:pool\",remote_namespace=\"1\",path=\"10.0.2.2:4420\",core=\"0\",qid=\"1\"} 3\n",
        "keel_drive_state{drive=\"00:02.0\",state=\"online\"} 1\n",
        "keel_drive_controller_resets_total{drive=\"00:02.0\"} 1\n",
        "keel_drive_aborts_total{drive=\"00:02.0\"} 2\n",
        "keel_drive_queue_state{drive=\"00:02.0\",core=\"1\",qid=\"5\",state=\"down\"} 1\n",
        "keel_drive_queue_commands_total{drive=\"00:02.0\",core=\"0\",qid=\"1-4\"} 120\n",
        "keel_drive_queue_commands_total{drive=\"00:02.0\",core=\"1\",qid=\"5\"} 1200\n",
        "keel_drive_queue_completions_total{drive=\"00:02.0\",core=\"0\",qid=\"1-4\"} 118\n",
        "keel_drive_queue_command_errors_total{drive=\"00:02.0\",core=\"0\",qid=\"1-4\"} 1\n",
        "keel_drive_queue_timeouts_total{drive=\"00:02.0\",core=\"0\",qid=\"1-4\"} 2\n",
        "keel_drive_queue_resets_total{drive=\"00:02.0\",core=\"0\",qid=\"1-4\"} 1\n",
        "keel_drive_queue_failed_by_reset_total{drive=\"00:02.0\",core=\"0\",qid=\"1-4\"} 2\n",
        "keel_drive_queue_sq_doorbells_total{drive=\"00:02.0\",core=\"1\",qid=\"5\"} 900\n",
        "keel_drive_queue_cq_doorbells_total{drive=\"00:02.0\",core=\"1\",qid=\"5\"} 1000\n",
        "keel_drive_queue_full_total{drive=\"00:02.0\",core=\"0\",qid=\"1-4\"} 3\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    // The checker itself catches what it must.
    assert!(check_exposition("# TYPE a_total counter\na_total{x=\"1\\q\"} 1\n").is_err());
    assert!(check_exposition("# TYPE a counter\na 1\n").is_err());
    assert!(check_exposition("# TYPE a gauge\nb 1\n").is_err());
    assert!(check_exposition("# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\n# HELP a x\n").is_err());
    assert!(check_exposition("# TYPE a gauge\na{x=\"1\",} 1\n").is_err());
}

#[test]
fn differences_from_idle_name_what_has_not_come_back() {
    let idle = snapshot();
    let mut busy = snapshot();
    assert!(busy.differences_from(&idle).is_empty());
    // Heap and cumulative counters are not part of "at rest".
    busy.resources.heap_free -= 4096;
    busy.resources.evicted += 10;
    assert!(busy.differences_from(&idle).is_empty());
    busy.resources.nvmf_buffers_free -= 1;
    busy.resources.queues += 2;
    busy.tcp_connections += 1;
    assert_eq!(
        busy.differences_from(&idle),
        [
            "NVMe/TCP connections: 6 (idle: 5)",
            "NVMe/TCP buffers free: 249 (idle: 250)",
            "queues: 2 (idle: 0)"
        ]
    );
}

#[test]
fn empty_snapshot_renders_validly() {
    check_exposition(&metrics::render(&Snapshot::default())).unwrap();
}

#[test]
fn promtool_accepts_the_metrics() {
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!(
            "promtool not installed (apt-get install prometheus): grammar checked in Rust only"
        );
        return;
    };
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics::render(&snapshot()).as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn request_strategy() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Status),
        Just(Request::Reboot),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|v| Request::Push(Bytes(v))),
    ]
}

proptest! {
    /// Arbitrary bytes in arbitrary pieces: no panic, bounded output, nothing executed.
    #[test]
    fn garbage_never_executes(
        prefix in prop_oneof![Just(b"KMG1".to_vec()), Just(b"GET ".to_vec()), Just(vec![])],
        body in proptest::collection::vec(any::<u8>(), 0..2000),
        cuts in proptest::collection::vec(1usize..64, 1..50),
    ) {
        let mut dev = Fake::new();
        let mut s = Session::new();
        let mut bytes = prefix;
        bytes.extend_from_slice(&body);
        let mut rest = &bytes[..];
        let mut i = 0;
        while !rest.is_empty() && !s.wants_close() {
            let n = cuts[i % cuts.len()].min(rest.len());
            i += 1;
            let taken = s.feed(&rest[..n], &mut dev);
            rest = &rest[taken..];
            prop_assert!(s.output().len() < 64 * 1024);
            let out = s.output().len();
            s.advance_output(out);
        }
        prop_assert!(dev.pushes.is_empty());
        prop_assert_eq!(dev.reboots, 0);
        prop_assert_eq!(s.requests(), 0);
    }

    /// A valid request split anywhere gives the same answer as in one piece.
    #[test]
    fn any_segmentation_of_a_valid_request(
        req in request_strategy(),
        cuts in proptest::collection::vec(1usize..40, 1..20),
    ) {
        let mut dev = Fake::new();
        let key = dev.key.clone();
        let (mut s, c) = open(&mut dev);
        let f = sign_request(&key, &c, &req);
        let mut rest = &f[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = cuts[i % cuts.len()].min(rest.len());
            i += 1;
            let taken = s.feed(&rest[..n], &mut dev);
            prop_assert_eq!(taken, n);
            rest = &rest[taken..];
        }
        let r = response(&mut s);
        let ok = matches!(
            (&req, &r.reply),
            (Request::Status, Reply::Status(_))
                | (Request::Push(_), Reply::Pushed(_))
                | (Request::Reboot, Reply::Rebooting)
        );
        prop_assert!(ok, "{:?} -> {:?}", req, r.reply);
    }

    /// Any single-byte change to a signed frame's payload is refused.
    #[test]
    fn tampering_is_refused(
        req in request_strategy(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let mut dev = Fake::new();
        let key = dev.key.clone();
        let (mut s, c) = open(&mut dev);
        let mut f = sign_request(&key, &c, &req);
        let i = 4 + at.index(f.len() - 4);
        f[i] ^= xor;
        let mut rest = &f[..];
        while !rest.is_empty() {
            let n = s.feed(rest, &mut dev);
            prop_assert!(n > 0);
            rest = &rest[n..];
        }
        // The frame may now be shorter or longer than its payload: one error at most.
        let frames = drain_frames(&mut s);
        prop_assert!(frames.len() <= 1);
        for fr in frames {
            let r: Response = postcard::from_bytes(&fr).unwrap();
            let is_err = matches!(r.reply, Reply::Error { .. });
            prop_assert!(is_err, "{:?}", r.reply);
        }
        prop_assert!(dev.pushes.is_empty());
        prop_assert_eq!(dev.reboots, 0);
        prop_assert_eq!(s.requests(), 0);
    }
}

fn ram_spec(slot: u16, nqn: &str) -> FunctionSpec {
    FunctionSpec {
        slot,
        nqn: nqn.into(),
        serial: String::new(),
        model: String::new(),
        namespaces: vec![FunctionNamespace {
            nsid: 1,
            backend: FunctionBackend::Ram {
                bytes: 16 << 20,
                block_size: 512,
            },
            encryption: FunctionCipher::None,
        }],
        limits: vec![],
    }
}

/// `CreateFunction` as the table in `function.rs` ("Wire form") gives it, byte by byte.
#[test]
fn create_function_wire_form_follows_the_documented_table() {
    let spec = FunctionSpec {
        slot: 1,
        nqn: "nqn.a".into(),
        serial: String::new(),
        model: String::new(),
        namespaces: vec![
            FunctionNamespace {
                nsid: 1,
                backend: FunctionBackend::Ram {
                    bytes: 4096,
                    block_size: 512,
                },
                encryption: FunctionCipher::Aes256Xts,
            },
            FunctionNamespace {
                nsid: 2,
                backend: FunctionBackend::Remote {
                    nqn: "nqn.r".into(),
                    paths: vec![([10, 0, 2, 2], 4420)],
                    nsid: 1,
                    offset: 0,
                    length: 0,
                },
                encryption: FunctionCipher::None,
            },
        ],
        limits: vec![],
    };
    let mut want = vec![3, 1, 5];
    want.extend_from_slice(b"nqn.a");
    want.extend_from_slice(&[0, 0, 2]); // serial, model, two namespaces
    // NSID 1, Ram, 4096 = varint 80 20, 512 = varint 80 04, aes-256-xts.
    want.extend_from_slice(&[1, 0, 0x80, 0x20, 0x80, 0x04, 2]);
    // NSID 2, Remote, "nqn.r", one path 10.0.2.2 port 4420 (varint C4 22), NSID 1, offset 0,
    // length 0, no encryption.
    want.extend_from_slice(&[2, 2, 5]);
    want.extend_from_slice(b"nqn.r");
    want.extend_from_slice(&[1, 10, 0, 2, 2, 0xC4, 0x22, 1, 0, 0, 0]);
    want.push(0); // no limits
    assert_eq!(
        postcard::to_allocvec(&Request::CreateFunction(spec.clone())).unwrap(),
        want
    );
    assert_eq!(
        postcard::from_bytes::<Request>(&want).unwrap(),
        Request::CreateFunction(spec)
    );
}

#[test]
fn remote_namespaces_of_a_function_are_checked() {
    let remote = |nqn: &str, paths: Vec<([u8; 4], u16)>, nsid, offset| FunctionSpec {
        namespaces: vec![FunctionNamespace {
            nsid: 1,
            backend: FunctionBackend::Remote {
                nqn: nqn.into(),
                paths,
                nsid,
                offset,
                length: 0,
            },
            encryption: FunctionCipher::Aes128Xts,
        }],
        ..ram_spec(1, "nqn.2026-11.dev.keel:vf1")
    };
    let p = ([10, 0, 2, 2], 4420);
    assert_eq!(
        remote("nqn.2026-11.dev.keel:pool", vec![p], 1, 4096).validate(),
        Ok(())
    );
    for (spec, why) in [
        (remote("pool", vec![p], 1, 0), "not an NQN"),
        (remote("nqn.p", vec![], 1, 0), "1 to 8 paths"),
        (remote("nqn.p", vec![p; 9], 1, 0), "1 to 8 paths"),
        (remote("nqn.p", vec![p, p], 1, 0), "given twice"),
        (remote("nqn.p", vec![([0; 4], 4420)], 1, 0), "unicast"),
        (remote("nqn.p", vec![([10, 0, 2, 2], 0)], 1, 0), "unicast"),
        (remote("nqn.p", vec![p], 0, 0), "invalid"),
        (remote("nqn.p", vec![p], 1, 512), "aligned"),
    ] {
        let e = spec.validate().unwrap_err();
        assert!(e.contains(why), "{why}: {e}");
    }
    for c in [
        FunctionCipher::None,
        FunctionCipher::Aes128Xts,
        FunctionCipher::Aes256Xts,
    ] {
        assert_eq!(FunctionCipher::from_name(c.name()), Some(c));
    }
    assert_eq!(FunctionCipher::from_name("xts"), None);
}

#[test]
fn function_specs_are_checked_before_anything_happens() {
    let good = ram_spec(1, "nqn.2026-11.dev.keel:vf1");
    assert_eq!(good.validate(), Ok(()));
    let ns = |nsid, backend| FunctionNamespace {
        nsid,
        backend,
        encryption: FunctionCipher::None,
    };
    let ram = |bytes, block_size| FunctionBackend::Ram { bytes, block_size };
    let bad: Vec<(FunctionSpec, &str)> = vec![
        (
            FunctionSpec {
                nqn: "".into(),
                ..good.clone()
            },
            "NQN",
        ),
        (
            FunctionSpec {
                nqn: "vol1".into(),
                ..good.clone()
            },
            "NQN",
        ),
        (
            FunctionSpec {
                nqn: format!("nqn.{}", "x".repeat(220)),
                ..good.clone()
            },
            "NQN",
        ),
        (
            FunctionSpec {
                nqn: "nqn.a\nb".into(),
                ..good.clone()
            },
            "control",
        ),
        (
            FunctionSpec {
                nqn: "nqn.2014-08.org.nvmexpress.discovery".into(),
                ..good.clone()
            },
            "discovery",
        ),
        (
            FunctionSpec {
                serial: "s".repeat(21),
                ..good.clone()
            },
            "serial",
        ),
        (
            FunctionSpec {
                model: "m\u{e9}".into(),
                ..good.clone()
            },
            "model",
        ),
        (
            FunctionSpec {
                namespaces: vec![],
                ..good.clone()
            },
            "namespaces",
        ),
        (
            FunctionSpec {
                namespaces: (1..=33).map(|i| ns(i, ram(4096, 512))).collect(),
                ..good.clone()
            },
            "namespaces",
        ),
        (
            FunctionSpec {
                namespaces: vec![ns(0, ram(4096, 512))],
                ..good.clone()
            },
            "NSID 0",
        ),
        (
            FunctionSpec {
                namespaces: vec![ns(u32::MAX, ram(4096, 512))],
                ..good.clone()
            },
            "invalid",
        ),
        (
            FunctionSpec {
                namespaces: vec![ns(2, ram(4096, 512)), ns(2, ram(4096, 512))],
                ..good.clone()
            },
            "twice",
        ),
        (
            FunctionSpec {
                namespaces: vec![ns(1, ram(4096, 1024))],
                ..good.clone()
            },
            "block size",
        ),
        (
            FunctionSpec {
                namespaces: vec![ns(1, ram(0, 512))],
                ..good.clone()
            },
            "size",
        ),
        (
            FunctionSpec {
                namespaces: vec![ns(1, ram(4097, 512))],
                ..good.clone()
            },
            "size",
        ),
        (
            FunctionSpec {
                namespaces: vec![ns(
                    1,
                    FunctionBackend::Drive {
                        drive: 0,
                        nsid: 1,
                        offset: 512,
                        length: 0,
                    },
                )],
                ..good.clone()
            },
            "aligned",
        ),
        (
            FunctionSpec {
                namespaces: vec![ns(
                    1,
                    FunctionBackend::Drive {
                        drive: 0,
                        nsid: 0,
                        offset: 0,
                        length: 0,
                    },
                )],
                ..good.clone()
            },
            "drive namespace",
        ),
        (
            FunctionSpec {
                limits: vec![QosLimit {
                    name: "speed".into(),
                    per_sec: 1,
                    burst: 0,
                }],
                ..good.clone()
            },
            "one of",
        ),
        (
            FunctionSpec {
                limits: vec![QosLimit {
                    name: "iops".into(),
                    per_sec: 0,
                    burst: 0,
                }],
                ..good.clone()
            },
            "rate of 0",
        ),
        (
            FunctionSpec {
                limits: vec![
                    QosLimit {
                        name: "iops".into(),
                        per_sec: 5,
                        burst: 0,
                    },
                    QosLimit {
                        name: "iops".into(),
                        per_sec: 6,
                        burst: 0,
                    },
                ],
                ..good.clone()
            },
            "twice",
        ),
    ];
    for (spec, why) in bad {
        let e = spec.validate().expect_err(why);
        assert!(e.contains(why), "{why}: {e}");
        // The same through check_create: refused before the slot table is looked at.
        let slots = [FunctionSlotInfo {
            slot: 1,
            ..Default::default()
        }];
        assert!(function::check_create(&spec, &slots, |_| false).is_err());
    }
}

#[test]
fn function_slots_busy_missing_removing_and_nqn_in_use() {
    let slots = vec![
        FunctionSlotInfo {
            slot: 0,
            state: SlotState::Live,
            kind: "pf".into(),
            subsystem: "nqn.a:pf".into(),
            ..Default::default()
        },
        FunctionSlotInfo {
            slot: 1,
            kind: "vf1".into(),
            ..Default::default()
        },
        FunctionSlotInfo {
            slot: 2,
            state: SlotState::Removing,
            kind: "vf2".into(),
            ..Default::default()
        },
    ];
    let c =
        |slot, nqn: &str| function::check_create(&ram_spec(slot, nqn), &slots, |n| n == "nqn.a:pf");
    assert!(c(0, "nqn.b").unwrap_err().contains("busy"));
    assert_eq!(c(1, "nqn.b"), Ok(()));
    assert!(c(1, "nqn.a:pf").unwrap_err().contains("exists already"));
    assert!(c(2, "nqn.b").unwrap_err().contains("try again"));
    assert!(c(3, "nqn.b").unwrap_err().contains("3 function slot(s)"));
    assert_eq!(function::check_remove(0, &slots), Ok(()));
    assert!(
        function::check_remove(1, &slots)
            .unwrap_err()
            .contains("free")
    );
    assert!(
        function::check_remove(2, &slots)
            .unwrap_err()
            .contains("removing")
    );
    assert!(function::check_remove(9, &slots).is_err());
    assert_eq!(function::slot_kind(0), "pf");
    assert_eq!(function::slot_kind(2), "vf2");
}

/// Sends one signed request over a fresh challenge; returns the reply and the next challenge.
fn ask(s: &mut Session, dev: &mut Fake, c: [u8; 32], req: &Request) -> (Reply, [u8; 32]) {
    let key = dev.key.clone();
    feed_all(s, &sign_request(&key, &c, req), dev);
    let r = response(s);
    (r.reply, r.challenge)
}

#[test]
fn functions_created_and_removed_through_the_session() {
    let mut dev = Fake::new();
    let (mut s, c) = open(&mut dev);
    let spec = FunctionSpec {
        limits: vec![QosLimit {
            name: "write_iops".into(),
            per_sec: 800,
            burst: 0,
        }],
        ..ram_spec(1, "nqn.2026-11.dev.keel:vf1")
    };
    let (r, c) = ask(&mut s, &mut dev, c, &Request::CreateFunction(spec.clone()));
    let Reply::FunctionCreated(info) = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        (info.slot, info.state, info.nsids.clone()),
        (1, SlotState::Live, vec![1])
    );
    assert_eq!(info.limits, spec.limits);
    // The same slot again, another NQN: busy, and the function in it is unchanged.
    let again = ram_spec(1, "nqn.2026-11.dev.keel:other");
    let (r, c) = ask(&mut s, &mut dev, c, &Request::CreateFunction(again));
    let Reply::FunctionRefused(m) = r else {
        panic!("{r:?}")
    };
    assert!(m.contains("busy"), "{m}");
    assert_eq!(dev.slots[1], info);
    // An NQN the device serves already.
    let (r, c) = ask(
        &mut s,
        &mut dev,
        c,
        &Request::CreateFunction(ram_spec(2, "nqn.2026-11.dev.keel:vol0")),
    );
    assert!(
        matches!(r, Reply::FunctionRefused(ref m) if m.contains("exists")),
        "{r:?}"
    );
    assert_eq!(dev.slots[2].state, SlotState::Free);
    // Removed, then removed twice.
    let (r, c) = ask(&mut s, &mut dev, c, &Request::RemoveFunction(1));
    assert!(
        matches!(r, Reply::FunctionRemoved(ref i) if i.state == SlotState::Free),
        "{r:?}"
    );
    let (r, _) = ask(&mut s, &mut dev, c, &Request::RemoveFunction(1));
    assert!(
        matches!(r, Reply::FunctionRefused(ref m) if m.contains("no function")),
        "{r:?}"
    );
    // Refusals are answers, not protocol failures: the connection stays.
    assert_eq!(s.failures(), 0);
    assert!(!s.wants_close());
}

#[test]
fn a_malformed_function_request_runs_nothing() {
    let mut dev = Fake::new();
    let key = dev.key.clone();
    let (mut s, c) = open(&mut dev);
    // A signed CreateFunction whose spec is cut short: the frame does not decode.
    let req = postcard::to_allocvec(&Request::CreateFunction(ram_spec(1, "nqn.x:y"))).unwrap();
    let cut = &req[..req.len() - 3];
    let sig = ed25519_dalek::Signer::sign(&key, &signed_message(&c, cut));
    let mut payload = cut.to_vec();
    payload.push(64);
    payload.extend_from_slice(&sig.to_bytes());
    feed_all(&mut s, &frame(&payload), &mut dev);
    let r = response(&mut s);
    assert!(
        matches!(
            r.reply,
            Reply::Error {
                code: ErrorCode::Malformed,
                ..
            }
        ),
        "{r:?}"
    );
    assert!(dev.slots.iter().all(|x| x.state == SlotState::Free));
    // An unknown request variant (a newer client's) is malformed too.
    let mut unknown = vec![42u8];
    let sig = ed25519_dalek::Signer::sign(&key, &signed_message(&r.challenge, &unknown));
    unknown.push(64);
    unknown.extend_from_slice(&sig.to_bytes());
    feed_all(&mut s, &frame(&unknown), &mut dev);
    assert!(matches!(
        response(&mut s).reply,
        Reply::Error {
            code: ErrorCode::Malformed,
            ..
        }
    ));
    assert!(dev.slots.iter().all(|x| x.state == SlotState::Free));
}

#[test]
fn function_requests_keep_their_variant_numbers() {
    // Request and Reply grow by appended variants only: postcard encodes the variant index as
    // a varint, so the earlier ones keep their bytes and an older device reads them.
    assert_eq!(postcard::to_allocvec(&Request::Status).unwrap(), [0]);
    assert_eq!(postcard::to_allocvec(&Request::Reboot).unwrap(), [2]);
    assert_eq!(
        postcard::to_allocvec(&Request::RemoveFunction(2)).unwrap(),
        [4, 2]
    );
    let create = postcard::to_allocvec(&Request::CreateFunction(ram_spec(1, "nqn.a"))).unwrap();
    assert_eq!(&create[..3], &[3, 1, 5]);
    assert_eq!(&create[3..8], b"nqn.a");
    assert_eq!(postcard::to_allocvec(&Reply::Rebooting).unwrap(), [3]);
    assert_eq!(
        postcard::to_allocvec(&Reply::FunctionRefused("x".into())).unwrap(),
        [7, 1, b'x']
    );
}
