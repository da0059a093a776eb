//! The management session state machine fed by a hostile client: raw bytes in any
//! segmentation, the binary protocol's magic, requests signed (with the authorized key, over
//! the current challenge or a stale one, intact or with a byte flipped), HTTP request heads,
//! and a transport that drains the output in pieces.
//!
//! The harness is the client: it reads the session's output as keelctl does, so it knows the
//! challenge in force. Checks: the output is a Hello frame then response frames (or one HTTP
//! response); challenges never repeat; no request runs unless it was signed over the
//! challenge in force (and every such request does run while the session listens); a push
//! carries exactly the bytes signed; a reboot happens once, only after its reply was drained;
//! a function is created only on a free slot and removed only from a live one, and a refused
//! function request leaves the slot table as it was.

use crate::provision::signing_key;
use arbitrary::Arbitrary;
use keel_mgmt::session::MAX_FAILURES;
use keel_mgmt::wire::{self, Bytes, Hello, Reply, Request, Response};
use keel_mgmt::{Device, PushReport, Session, Snapshot};
use keel_provision::ed25519_dalek::SigningKey;
use std::collections::HashSet;

/// A whole fuzz input.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// What the client and the transport do.
    pub ops: Vec<Op>,
}

/// One step.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// Raw bytes from the client.
    Bytes(Vec<u8>),
    /// The binary protocol's magic.
    Magic,
    /// An HTTP request head: a method, a path and the rest.
    Http {
        /// Method (index).
        method: u8,
        /// Path (index).
        path: u8,
        /// Bytes after the request line.
        rest: Vec<u8>,
    },
    /// A signed request frame.
    Signed {
        /// The request.
        req: Req,
        /// Sign over the previous challenge instead of the current one (a replay).
        stale: bool,
        /// Flip one byte of the frame (position, xor mask).
        flip: Option<(u16, u8)>,
        /// Sign with another key.
        wrong_key: bool,
    },
    /// The transport hands `n` bytes of output to the network.
    Drain {
        /// Bytes.
        n: u16,
    },
    /// The transport reports everything sent.
    Drained,
}

/// A request.
#[derive(Arbitrary, Debug)]
pub enum Req {
    /// Status.
    Status,
    /// Push (the fake device refuses bundles that start with 0).
    Push(Vec<u8>),
    /// Reboot.
    Reboot,
    /// Create a function: slot, NQN (index of a few, some invalid or taken), namespace sizes
    /// in 512-byte blocks (0 and odd sizes included), a limit rate.
    CreateFunction {
        /// Slot (the fake has 3).
        slot: u8,
        /// NQN (index).
        nqn: u8,
        /// Namespace sizes.
        sizes: Vec<u16>,
        /// A write_iops limit (0: refused).
        limit: Option<u32>,
    },
    /// Remove a slot's function.
    RemoveFunction(u8),
}

const NQNS: [&str; 5] = [
    "nqn.2026-12.fuzz:a",
    "nqn.2026-12.fuzz:b",
    "nqn.2026-12.fuzz:vol0",
    "not-an-nqn",
    "",
];

const METHODS: [&str; 5] = ["GET", "HEAD", "POST", "get", "G"];
const PATHS: [&str; 5] = ["/metrics", "/metrics?x=1", "/", "metrics", "/metrics\x01"];

struct Fake {
    key: [u8; 32],
    counter: u64,
    slots: Vec<keel_mgmt::FunctionSlotInfo>,
    pushes: Vec<Vec<u8>>,
    reboots: u32,
}

impl Device for Fake {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: "0.1.0".into(),
            board: "fuzz".into(),
            generation: self.pushes.len() as u64,
            ..Snapshot::default()
        }
    }
    fn push(&mut self, bundle: &[u8]) -> Result<PushReport, String> {
        self.pushes.push(bundle.to_vec());
        if bundle.first() == Some(&0) {
            return Err("refused".into());
        }
        Ok(PushReport {
            generation: self.pushes.len() as u64,
            added: vec![],
            removed: vec![],
            needs_reboot: vec![],
            persisted: false,
        })
    }
    fn reboot(&mut self) {
        self.reboots += 1;
    }
    fn create_function(
        &mut self,
        spec: &keel_mgmt::FunctionSpec,
    ) -> Result<keel_mgmt::FunctionSlotInfo, String> {
        let before = self.slots.clone();
        let taken: Vec<String> = self.slots.iter().map(|s| s.subsystem.clone()).collect();
        let r = keel_mgmt::function::check_create(spec, &self.slots, |n| {
            n == "nqn.2026-12.fuzz:vol0" || taken.iter().any(|t| !t.is_empty() && t == n)
        });
        if let Err(e) = r {
            assert_eq!(self.slots, before);
            return Err(e);
        }
        let s = &mut self.slots[usize::from(spec.slot)];
        assert_eq!(s.state, keel_mgmt::SlotState::Free, "created on a busy slot");
        assert!(!spec.namespaces.is_empty() && spec.nqn.starts_with("nqn."));
        s.state = keel_mgmt::SlotState::Live;
        s.subsystem = spec.nqn.clone();
        Ok(s.clone())
    }
    fn remove_function(&mut self, slot: u16) -> Result<keel_mgmt::FunctionSlotInfo, String> {
        keel_mgmt::function::check_remove(slot, &self.slots)?;
        let s = &mut self.slots[usize::from(slot)];
        assert_eq!(s.state, keel_mgmt::SlotState::Live, "removed a free slot");
        s.state = keel_mgmt::SlotState::Free;
        s.subsystem.clear();
        Ok(s.clone())
    }
    fn authorized_key(&self) -> [u8; 32] {
        self.key
    }
    fn fresh_challenge(&mut self) -> [u8; 32] {
        self.counter += 1;
        let mut c = [0u8; 32];
        c[..8].copy_from_slice(&self.counter.to_le_bytes());
        c[8..].fill(0xC5);
        c
    }
}

struct Client {
    s: Session,
    dev: Fake,
    key: SigningKey,
    other: SigningKey,
    /// Bytes the client wrote that the session has not taken yet.
    unsent: Vec<u8>,
    /// Everything the transport took from the session.
    received: Vec<u8>,
    /// Frames of `received` already parsed.
    parsed: usize,
    http: Option<bool>,
    challenges: HashSet<[u8; 32]>,
    current: Option<[u8; 32]>,
    previous: Option<[u8; 32]>,
    /// Authentic requests sent (authorized key, current challenge, intact) and the pushes
    /// among them.
    valid: u64,
    pushed: Vec<Vec<u8>>,
    rebooting_seen: bool,
    /// Only well-framed bytes were sent so far (then the session waits at a frame boundary
    /// whenever the client has read all its output).
    framed: bool,
    /// Bytes sent so far.
    sent: usize,
}

impl Client {
    fn feed(&mut self) {
        while !self.unsent.is_empty() {
            let n = self.s.feed(&self.unsent, &mut self.dev);
            assert!(n <= self.unsent.len());
            if n == 0 {
                break;
            }
            self.unsent.drain(..n);
        }
    }

    fn drain(&mut self, n: usize) {
        let out = self.s.output();
        let n = n.min(out.len());
        self.received.extend_from_slice(&out[..n]);
        self.s.advance_output(n);
        self.parse();
        self.feed();
    }

    /// Parses what arrived: Hello then responses (binary), or one HTTP response.
    fn parse(&mut self) {
        if self.http == Some(true) {
            return;
        }
        if self.http.is_none() {
            const STATUS_LINE: &[u8] = b"HTTP/1.1 ";
            let n = self.received.len().min(STATUS_LINE.len());
            if self.received[..n] == STATUS_LINE[..n] {
                if n == STATUS_LINE.len() {
                    self.http = Some(true);
                }
                return;
            }
            self.http = Some(false);
        }
        loop {
            let rest = &self.received[self.parsed..];
            let Some((len, body)) = rest.split_first_chunk::<4>() else {
                return;
            };
            let len = u32::from_le_bytes(*len) as usize;
            assert!(len > 0 && len <= wire::MAX_FRAME, "bad frame length {len}");
            if body.len() < len {
                return;
            }
            let payload = &body[..len];
            let challenge = if self.parsed == 0 {
                let h: Hello = postcard::from_bytes(payload).expect("first frame is a Hello");
                assert_eq!(h.protocol, wire::PROTOCOL_VERSION);
                h.challenge
            } else {
                let r: Response = postcard::from_bytes(payload).expect("frame is a Response");
                match r.reply {
                    Reply::Rebooting => self.rebooting_seen = true,
                    Reply::Pushed(_) | Reply::PushRefused(_) | Reply::Status(_) => {}
                    Reply::Error { .. } => {}
                    Reply::FunctionCreated(_)
                    | Reply::FunctionRemoved(_)
                    | Reply::FunctionRefused(_) => {}
                }
                r.challenge
            };
            assert!(
                self.challenges.insert(challenge),
                "a challenge was repeated"
            );
            self.previous = self.current.replace(challenge);
            self.parsed += 4 + len;
        }
    }

    fn op(&mut self, op: Op) {
        match op {
            Op::Bytes(b) => {
                self.framed &= b.is_empty();
                self.sent += b.len();
                self.unsent.extend_from_slice(&b);
                self.feed();
            }
            Op::Magic => {
                self.framed &= self.sent == 0;
                self.sent += 4;
                self.unsent.extend_from_slice(&wire::MAGIC);
                self.feed();
            }
            Op::Http { method, path, rest } => {
                let m = METHODS[method as usize % METHODS.len()];
                let p = PATHS[path as usize % PATHS.len()];
                self.framed = false;
                self.sent += 1;
                self.unsent
                    .extend_from_slice(format!("{m} {p} HTTP/1.1\r\n").as_bytes());
                self.unsent.extend_from_slice(&rest);
                self.unsent.extend_from_slice(b"\r\n\r\n");
                self.feed();
            }
            Op::Signed {
                req,
                stale,
                flip,
                wrong_key,
            } => self.signed(req, stale, flip, wrong_key),
            Op::Drain { n } => self.drain(n as usize),
            Op::Drained => {
                let before = self.dev.reboots;
                let idle = self.s.output().is_empty();
                self.s.transport_drained(&mut self.dev);
                if self.dev.reboots > before {
                    assert!(idle, "rebooted with the reply still unsent");
                    assert!(
                        self.rebooting_seen,
                        "rebooted without a Rebooting reply drained"
                    );
                }
            }
        }
    }

    fn signed(&mut self, req: Req, stale: bool, flip: Option<(u16, u8)>, wrong_key: bool) {
        let challenge = if stale { self.previous } else { self.current };
        let Some(challenge) = challenge else {
            return;
        };
        let bundle = match &req {
            Req::Push(b) => Some(b.clone()),
            _ => None,
        };
        let request = match req {
            Req::Status => Request::Status,
            Req::Push(b) => Request::Push(Bytes(b)),
            Req::Reboot => Request::Reboot,
            Req::CreateFunction {
                slot,
                nqn,
                sizes,
                limit,
            } => Request::CreateFunction(keel_mgmt::FunctionSpec {
                slot: u16::from(slot % 5),
                nqn: NQNS[usize::from(nqn) % NQNS.len()].into(),
                serial: String::new(),
                model: String::new(),
                namespaces: sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| keel_mgmt::FunctionNamespace {
                        nsid: i as u32 + 1,
                        backend: if b % 7 == 6 {
                            // A remote namespace, its path sometimes invalid.
                            keel_mgmt::FunctionBackend::Remote {
                                nqn: NQNS[usize::from(b) % NQNS.len()].into(),
                                paths: vec![([10, 0, 2, (b % 3) as u8], b / 7)],
                                nsid: u32::from(b % 5),
                                offset: u64::from(b) * 512,
                                length: 0,
                            }
                        } else {
                            keel_mgmt::FunctionBackend::Ram {
                                bytes: u64::from(b) * 512 + u64::from(b % 3 == 2),
                                block_size: 512,
                            }
                        },
                        encryption: [
                            keel_mgmt::FunctionCipher::None,
                            keel_mgmt::FunctionCipher::Aes128Xts,
                            keel_mgmt::FunctionCipher::Aes256Xts,
                        ][usize::from(b % 3)],
                    })
                    .collect(),
                limits: limit
                    .map(|r| keel_mgmt::QosLimit {
                        name: "write_iops".into(),
                        per_sec: u64::from(r),
                        burst: 0,
                    })
                    .into_iter()
                    .collect(),
            }),
            Req::RemoveFunction(slot) => Request::RemoveFunction(u16::from(slot % 5)),
        };
        let key = if wrong_key { &self.other } else { &self.key };
        let mut frame = wire::sign_request(key, &challenge, &request);
        let flipped = match flip {
            Some((at, x)) if x != 0 => {
                let i = at as usize % frame.len();
                frame[i] ^= x;
                true
            }
            _ => false,
        };
        // Valid: signed by the authorized key over the challenge in force, intact, and the
        // client has read everything (so the session is waiting for this frame).
        let in_step = self.framed
            && self.unsent.is_empty()
            && self.s.output().is_empty()
            && self.s.is_binary()
            && self.s.failures() < MAX_FAILURES;
        let authentic = !stale && !flipped && !wrong_key;
        let requests = self.s.requests();
        self.framed &= !flipped;
        self.sent += frame.len();
        self.unsent.extend_from_slice(&frame);
        if authentic {
            self.valid += 1;
            if let Some(b) = bundle {
                self.pushed.push(b);
            }
        }
        self.feed();
        if authentic && in_step {
            assert_eq!(
                self.s.requests(),
                requests + 1,
                "a valid request was not executed"
            );
        }
        assert!(
            self.s.requests() <= self.valid,
            "a request ran without a valid signature"
        );
    }
}

/// The fuzz body.
pub fn run(input: Input) {
    let key = signing_key();
    let mut c = Client {
        s: Session::new(),
        dev: Fake {
            key: key.verifying_key().to_bytes(),
            counter: 0,
            slots: (0..3)
                .map(|i| keel_mgmt::FunctionSlotInfo {
                    slot: i,
                    kind: keel_mgmt::function::slot_kind(i),
                    ..Default::default()
                })
                .collect(),
            pushes: Vec::new(),
            reboots: 0,
        },
        key,
        other: SigningKey::from_bytes(&[8; 32]),
        unsent: Vec::new(),
        received: Vec::new(),
        parsed: 0,
        http: None,
        challenges: HashSet::new(),
        current: None,
        previous: None,
        valid: 0,
        pushed: Vec::new(),
        rebooting_seen: false,
        framed: true,
        sent: 0,
    };
    for op in input.ops {
        c.op(op);
        assert!(
            c.s.requests() <= c.valid,
            "a request ran without a valid signature"
        );
        assert!(c.dev.reboots <= 1, "rebooted twice");
    }
    c.drain(usize::MAX);
    // The pushes the device ran are, in order, among the ones the client signed.
    let mut signed = c.pushed.iter();
    for p in &c.dev.pushes {
        assert!(
            signed.any(|s| s == p),
            "a push ran with bytes nobody signed"
        );
    }
    if c.http == Some(true) {
        assert!(
            c.s.wants_close(),
            "an HTTP connection stays open after its response"
        );
    }
}
