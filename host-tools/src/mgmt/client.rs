//! A blocking management client over `std::net::TcpStream`, with timeouts on every call.

use anyhow::{Context, Result, bail};
use keel_mgmt::ed25519_dalek::SigningKey;
use keel_mgmt::wire::{self, Hello, MAGIC, PROTOCOL_VERSION, Reply, Request, Response};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// An open management connection past the device's hello.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    addr: String,
    /// The device's hello.
    pub hello: Hello,
    challenge: [u8; 32],
}

fn open(addr: &str, timeout: Duration) -> Result<TcpStream> {
    let sa = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("{addr}: no address"))?;
    let s = TcpStream::connect_timeout(&sa, timeout)
        .with_context(|| format!("connecting to {addr} (timeout {timeout:?})"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn io_context(addr: &str, what: &str, e: std::io::Error) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            anyhow::anyhow!("{addr}: timed out {what}")
        }
        std::io::ErrorKind::UnexpectedEof => {
            anyhow::anyhow!("{addr}: the device closed the connection while {what}")
        }
        _ => anyhow::Error::new(e).context(format!("{addr}: {what}")),
    }
}

impl Client {
    /// Connects, sends the magic and reads the hello.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Client> {
        let mut stream = open(addr, timeout)?;
        stream
            .write_all(&MAGIC)
            .map_err(|e| io_context(addr, "sending the greeting", e))?;
        let payload = read_frame(&mut stream, addr, "waiting for the device's hello")?;
        let hello: Hello = postcard::from_bytes(&payload)
            .with_context(|| format!("{addr}: not a Keel management endpoint (bad hello)"))?;
        if hello.protocol != PROTOCOL_VERSION {
            bail!(
                "{addr}: management protocol {} (this keelctl speaks {PROTOCOL_VERSION})",
                hello.protocol
            );
        }
        let challenge = hello.challenge;
        Ok(Client {
            stream,
            addr: addr.to_string(),
            hello,
            challenge,
        })
    }

    /// The frame of `request` signed over the current challenge.
    pub fn signed_frame(&self, key: &SigningKey, request: &Request) -> Vec<u8> {
        wire::sign_request(key, &self.challenge, request)
    }

    /// Sends a request frame as it is and reads the response; the next challenge is kept.
    pub fn exchange(&mut self, frame: &[u8]) -> Result<Reply> {
        self.stream
            .write_all(frame)
            .map_err(|e| io_context(&self.addr, "sending the request", e))?;
        let payload = read_frame(&mut self.stream, &self.addr, "waiting for the response")?;
        let r: Response = wire::decode_response(&payload)
            .with_context(|| format!("{}: malformed response", self.addr))?;
        self.challenge = r.challenge;
        Ok(r.reply)
    }

    /// Signs and sends `request`, returns the reply.
    pub fn request(&mut self, key: &SigningKey, request: &Request) -> Result<Reply> {
        let f = self.signed_frame(key, request);
        self.exchange(&f)
    }
}

fn read_frame(s: &mut TcpStream, addr: &str, what: &str) -> Result<Vec<u8>> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h)
        .map_err(|e| io_context(addr, what, e))?;
    let n = wire::frame_len(h).map_err(|_| {
        anyhow::anyhow!(
            "{addr}: frame length {} out of bounds",
            u32::from_le_bytes(h)
        )
    })?;
    let mut p = vec![0u8; n];
    s.read_exact(&mut p)
        .map_err(|e| io_context(addr, what, e))?;
    Ok(p)
}

/// `GET /metrics`: returns the body of a 200 response.
pub fn fetch_metrics(addr: &str, timeout: Duration) -> Result<String> {
    let mut s = open(addr, timeout)?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| io_context(addr, "sending the request", e))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| io_context(addr, "reading the metrics", e))?;
    let text = String::from_utf8(raw).context("metrics are not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr}: not an HTTP response"))?;
    let status = head.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
        bail!("{addr}: {status}");
    }
    Ok(body.to_string())
}
