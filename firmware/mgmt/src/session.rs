//! One management connection, sans-IO: bytes in ([`Session::feed`]), bytes out
//! ([`Session::output`]), the device reached through [`Device`].

use crate::wire::{self, ErrorCode, Hello, MAGIC, PROTOCOL_VERSION, Reply, Request, Response};
use crate::{Device, metrics};
use alloc::string::String;
use alloc::vec::Vec;

/// Request frames that fail (bad signature, malformed) before the device closes the
/// connection.
pub const MAX_FAILURES: u8 = 3;
/// Largest HTTP request head (request line and headers).
pub const MAX_HTTP_HEAD: usize = 4096;
/// Buffers above this capacity are released once their frame is done.
const KEEP_CAPACITY: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the client's first four bytes.
    Magic,
    /// Binary protocol: frames.
    Binary,
    /// An HTTP request head is being read.
    Http,
    /// Nothing more is read; the connection closes once the output is sent.
    Closing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reboot {
    No,
    /// Replied; reboot once the transport has sent the reply.
    AfterSend,
    Done,
}

/// One management connection's state.
#[derive(Debug)]
pub struct Session {
    state: State,
    /// Magic, HTTP head, or the frame being received.
    buf: Vec<u8>,
    /// Frame header bytes and the payload length once known.
    header: [u8; 4],
    header_len: usize,
    frame_len: Option<usize>,
    out: Vec<u8>,
    out_pos: usize,
    challenge: [u8; wire::CHALLENGE_LEN],
    failures: u8,
    reboot: Reboot,
    requests: u64,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

/// What the session did with an HTTP request, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpOutcome {
    /// 200 with the metrics.
    Metrics,
    /// An error status.
    Status(u16),
}

/// Parses an HTTP request head; returns the status to answer and whether it is a HEAD.
pub fn route_http(head: &[u8]) -> (HttpOutcome, bool) {
    let Ok(text) = core::str::from_utf8(head) else {
        return (HttpOutcome::Status(400), false);
    };
    let line = text.split('\n').next().unwrap_or("").trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (HttpOutcome::Status(400), false);
    };
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase());
    if !token(method) || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return (HttpOutcome::Status(400), false);
    }
    if target.bytes().any(|b| b.is_ascii_control()) {
        return (HttpOutcome::Status(400), false);
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return (HttpOutcome::Status(405), false);
    }
    let path = target.split('?').next().unwrap_or("");
    if path == "/metrics" {
        (HttpOutcome::Metrics, head_only)
    } else {
        (HttpOutcome::Status(404), head_only)
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

/// An HTTP/1.1 response that closes the connection.
fn http_response(code: u16, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut r = alloc::format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        reason(code),
        body.len(),
        if code == 405 {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        }
    );
    if !head_only {
        r.push_str(body);
    }
    r.into_bytes()
}

/// Whether four bytes can start an HTTP request line (a method token then maybe a space).
fn looks_like_http(b: &[u8]) -> bool {
    let letters = b.iter().take_while(|c| c.is_ascii_uppercase()).count();
    letters >= 1 && b[letters..].iter().all(|&c| c == b' ') && b[letters..].len() <= 1
}

impl Session {
    /// A new connection: nothing is sent until the client speaks.
    pub fn new() -> Self {
        Session {
            state: State::Magic,
            buf: Vec::new(),
            header: [0; 4],
            header_len: 0,
            frame_len: None,
            out: Vec::new(),
            out_pos: 0,
            challenge: [0; wire::CHALLENGE_LEN],
            failures: 0,
            reboot: Reboot::No,
            requests: 0,
        }
    }

    /// Feeds bytes received from the client; returns how many were taken. The rest must be
    /// offered again later: the session takes nothing while it has output pending after a
    /// request (a client waits for each response anyway), so its buffers stay bounded.
    pub fn feed<D: Device + ?Sized>(&mut self, mut input: &[u8], dev: &mut D) -> usize {
        let total = input.len();
        while !input.is_empty() {
            match self.state {
                State::Closing => {
                    // Discard: the connection is closing.
                    input = &[];
                }
                State::Magic => {
                    let n = (4 - self.buf.len()).min(input.len());
                    self.buf.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.buf.len() < 4 {
                        continue;
                    }
                    if self.buf[..] == MAGIC {
                        self.buf.clear();
                        self.state = State::Binary;
                        self.challenge = dev.fresh_challenge();
                        let hello = Hello {
                            protocol: PROTOCOL_VERSION,
                            device: dev.identity(),
                            challenge: self.challenge,
                        };
                        self.out.extend_from_slice(&wire::encode_frame(&hello));
                    } else if looks_like_http(&self.buf) {
                        self.state = State::Http;
                    } else {
                        // Neither protocol: close without a word.
                        self.state = State::Closing;
                    }
                }
                State::Http => {
                    let n = (MAX_HTTP_HEAD - self.buf.len()).min(input.len());
                    // Look for the end of the head across the old and new bytes.
                    let start = self.buf.len().saturating_sub(3);
                    self.buf.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    let end = find_head_end(&self.buf[start..]).map(|e| start + e);
                    match end {
                        Some(end) => {
                            let head = core::mem::take(&mut self.buf);
                            self.answer_http(&head[..end], dev);
                        }
                        None if self.buf.len() >= MAX_HTTP_HEAD => {
                            self.buf = Vec::new();
                            self.out.extend(http_response(
                                431,
                                "text/plain",
                                "request head too large\n",
                                false,
                            ));
                            self.state = State::Closing;
                        }
                        None => {}
                    }
                }
                State::Binary => {
                    if !self.output().is_empty() {
                        break;
                    }
                    let Some(len) = self.frame_len else {
                        let n = (4 - self.header_len).min(input.len());
                        self.header[self.header_len..self.header_len + n]
                            .copy_from_slice(&input[..n]);
                        self.header_len += n;
                        input = &input[n..];
                        if self.header_len == 4 {
                            self.header_len = 0;
                            match wire::frame_len(self.header) {
                                Ok(len) => {
                                    self.frame_len = Some(len);
                                    self.buf.reserve(len.min(KEEP_CAPACITY));
                                }
                                Err(code) => {
                                    self.fail(code, "frame length is zero or too large", true, dev)
                                }
                            }
                        }
                        continue;
                    };
                    let n = (len - self.buf.len()).min(input.len());
                    self.buf.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.buf.len() == len {
                        self.frame_len = None;
                        let payload = core::mem::take(&mut self.buf);
                        self.handle_frame(&payload, dev);
                        if payload.capacity() <= KEEP_CAPACITY {
                            self.buf = payload;
                            self.buf.clear();
                        }
                    }
                }
            }
        }
        total - input.len()
    }

    fn answer_http<D: Device + ?Sized>(&mut self, head: &[u8], dev: &mut D) {
        let (outcome, head_only) = route_http(head);
        let r = match outcome {
            HttpOutcome::Metrics => {
                let body = metrics::render(&dev.snapshot());
                http_response(200, metrics::CONTENT_TYPE, &body, head_only)
            }
            HttpOutcome::Status(code) => {
                let body = alloc::format!("{} {}\n", code, reason(code));
                http_response(code, "text/plain", &body, head_only)
            }
        };
        self.out.extend(r);
        self.state = State::Closing;
    }

    fn respond(&mut self, reply: Reply) {
        let r = Response {
            challenge: self.challenge,
            reply,
        };
        self.out.extend_from_slice(&wire::encode_frame(&r));
    }

    fn fail<D: Device + ?Sized>(
        &mut self,
        code: ErrorCode,
        message: &str,
        fatal: bool,
        dev: &mut D,
    ) {
        self.failures = self.failures.saturating_add(1);
        let closing = fatal || self.failures >= MAX_FAILURES;
        // A failed attempt also burns the challenge: no second try over the same one.
        self.challenge = dev.fresh_challenge();
        self.respond(Reply::Error {
            code,
            message: String::from(message),
            closing,
        });
        if closing {
            self.state = State::Closing;
        }
    }

    fn handle_frame<D: Device + ?Sized>(&mut self, payload: &[u8], dev: &mut D) {
        let key = dev.authorized_key();
        let request = match wire::open_request(payload, &key, &self.challenge) {
            Ok(r) => r,
            Err((code, msg)) => return self.fail(code, msg, false, dev),
        };
        // Verified: the challenge is consumed before anything runs.
        self.challenge = dev.fresh_challenge();
        self.requests += 1;
        let reply = match request {
            Request::Status => Reply::Status(alloc::boxed::Box::new(dev.snapshot())),
            Request::Push(bundle) => match dev.push(&bundle.0) {
                Ok(report) => Reply::Pushed(report),
                Err(msg) => Reply::PushRefused(msg),
            },
            Request::CreateFunction(spec) => match dev.create_function(&spec) {
                Ok(info) => Reply::FunctionCreated(info),
                Err(msg) => Reply::FunctionRefused(msg),
            },
            Request::RemoveFunction(slot) => match dev.remove_function(slot) {
                Ok(info) => Reply::FunctionRemoved(info),
                Err(msg) => Reply::FunctionRefused(msg),
            },
            Request::Reboot => {
                self.reboot = Reboot::AfterSend;
                self.state = State::Closing;
                Reply::Rebooting
            }
        };
        self.respond(reply);
    }

    /// Bytes waiting to be sent.
    pub fn output(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    /// `n` bytes of [`Session::output`] were handed to the transport.
    pub fn advance_output(&mut self, n: usize) {
        self.out_pos = (self.out_pos + n).min(self.out.len());
        if self.out_pos == self.out.len() {
            self.out_pos = 0;
            if self.out.capacity() > KEEP_CAPACITY {
                self.out = Vec::new();
            } else {
                self.out.clear();
            }
        }
    }

    /// The transport has sent everything it was given (the glue's send buffer drained, or it
    /// gave up on it): a reboot that was answered happens now.
    pub fn transport_drained<D: Device + ?Sized>(&mut self, dev: &mut D) {
        if self.reboot == Reboot::AfterSend && self.output().is_empty() {
            self.reboot = Reboot::Done;
            dev.reboot();
        }
    }

    /// A reboot was answered and waits for the transport to drain.
    pub fn reboot_pending(&self) -> bool {
        self.reboot == Reboot::AfterSend
    }

    /// Whether the connection should be closed (gracefully) now: the session reads no more
    /// and its output is all handed over.
    pub fn wants_close(&self) -> bool {
        self.state == State::Closing && self.output().is_empty()
    }

    /// Whether the client has started speaking the binary protocol.
    pub fn is_binary(&self) -> bool {
        self.state == State::Binary
    }

    /// Verified requests executed.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Failed request frames.
    pub fn failures(&self) -> u8 {
        self.failures
    }
}

/// Index just past the blank line ending an HTTP head (`\r\n\r\n` or `\n\n`).
fn find_head_end(b: &[u8]) -> Option<usize> {
    (0..b.len()).find_map(|i| {
        if b[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if b[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}
