//! Shared test helpers: a RAM-disk target application, host PDU builders, TermReq decoding.
#![allow(dead_code)]

use keel_nvme::sqe::Psdt;
use keel_nvme::{Cqe, DataDirection, Sqe, Status};
use keel_nvmf_tcp::crc32c::crc32c;
use keel_nvmf_tcp::pdu::{Digests, Repr, encode_pdu};
use keel_nvmf_tcp::{Event, TargetConfig, TargetConnection};

pub type Buf = Vec<u8>;

/// Build an SQE's bytes: opcode, CID, SGL1 (identifier byte and length, address 0, PSDT 01b),
/// cdw10 = byte offset into the RAM disk.
pub fn sqe(opcode: u8, cid: u16, sgl_id: u8, sgl_len: u32, cdw10: u32) -> [u8; 64] {
    let mut s = Sqe::new(opcode, cid).with_cdw(10, cdw10);
    s.dptr[8..12].copy_from_slice(&sgl_len.to_le_bytes());
    s.dptr[15] = sgl_id;
    s.set_psdt(Psdt::SglContiguousMetadata);
    s.to_bytes()
}

/// A CQE's bytes: CID and the raw status field.
pub fn cqe(cid: u16, status: u16) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[12..14].copy_from_slice(&cid.to_le_bytes());
    c[14..16].copy_from_slice(&status.to_le_bytes());
    c
}

pub fn icreq(dg: Digests, hpda: u8, maxr2t: u32) -> Vec<u8> {
    let mut out = vec![0u8; 128];
    let n = encode_pdu(
        &mut out,
        &Repr::IcReq {
            pfv: 0,
            hpda,
            digests: dg,
            maxr2t,
        },
        Digests::default(),
        0,
        &[],
    )
    .unwrap();
    out.truncate(n);
    out
}

pub fn pdu(repr: &Repr, dg: Digests, data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 300 + data.len()];
    let n = encode_pdu(&mut out, repr, dg, 0, data).unwrap();
    out.truncate(n);
    out
}

/// A deterministic target application over a RAM disk, logging events as strings.
pub struct App {
    pub disk: Vec<u8>,
    pub log: Vec<String>,
    pub fc_disabled: bool,
    pub tx: Vec<u8>,
    pub closed: Option<keel_nvmf_tcp::CloseReason>,
    pub hold_buffers: bool,
    pub need: Vec<(u16, u32)>,
    pub max_need: u32,
}

impl App {
    pub fn new() -> Self {
        Self {
            disk: vec![0; 1 << 20],
            log: Vec::new(),
            fc_disabled: false,
            tx: Vec::new(),
            closed: None,
            hold_buffers: false,
            need: Vec::new(),
            max_need: 0,
        }
    }

    /// Handle all pending events.
    pub fn service(&mut self, t: &mut TargetConnection<Buf>) {
        while let Some(ev) = t.poll_event() {
            match ev {
                Event::Connected { digests } => self.log.push(format!("connected {digests:?}")),
                Event::NeedBuffer { cid, len } => {
                    self.log.push(format!("need cid={cid} len={len}"));
                    self.max_need = self.max_need.max(len);
                    if self.hold_buffers {
                        self.need.push((cid, len));
                    } else {
                        t.provide_buffer(cid, vec![0; len as usize]).unwrap();
                    }
                }
                Event::Command { sqe, buf, data_len } => {
                    let cid = sqe.cid;
                    let op = sqe.opcode;
                    let off = sqe.cdw(10) as usize;
                    self.log.push(format!(
                        "cmd op={op:#x} cid={cid} len={data_len} data_crc={:#x}",
                        buf.as_ref()
                            .map(|b| crc32c(&b[..data_len as usize]))
                            .unwrap_or(0)
                    ));
                    let ok = Cqe::new(cid, Status::SUCCESS);
                    match sqe.data_direction() {
                        DataDirection::HostToController if op != 0x7F => {
                            let b = buf.unwrap();
                            let end = (off + data_len as usize).min(self.disk.len());
                            let n = end.saturating_sub(off);
                            self.disk[off..end].copy_from_slice(&b[..n]);
                            t.complete(ok, None, self.fc_disabled).unwrap();
                        }
                        DataDirection::ControllerToHost if data_len > 0 => {
                            let mut b = vec![0u8; data_len as usize];
                            let end = (off + data_len as usize).min(self.disk.len());
                            let n = end.saturating_sub(off);
                            b[..n].copy_from_slice(&self.disk[off..end]);
                            t.complete(ok, Some((b, data_len)), self.fc_disabled)
                                .unwrap();
                        }
                        _ => t.complete(ok, None, self.fc_disabled).unwrap(),
                    }
                }
                Event::CommandFailed { sqe, status, .. } => {
                    let cid = sqe.cid;
                    self.log.push(format!("failed cid={cid} status={status}"));
                    t.complete(Cqe::new(cid, status), None, false).unwrap();
                }
                Event::BufferReleased { cid, .. } => self.log.push(format!("released cid={cid}")),
                Event::Closed { reason } => {
                    self.log.push(format!("closed {reason:?}"));
                    self.closed = Some(reason);
                }
            }
        }
    }

    /// Feed `bytes` completely (servicing events whenever the target stalls) and collect all
    /// transmitted bytes.
    pub fn feed(&mut self, t: &mut TargetConnection<Buf>, now: u64, bytes: &[u8]) {
        let mut rest = bytes;
        let mut spins = 0;
        loop {
            let n = t.recv(now, rest);
            rest = &rest[n..];
            self.service(t);
            self.drain(t);
            if rest.is_empty() {
                break;
            }
            if n == 0 {
                spins += 1;
                assert!(spins < 4, "target stalled");
            } else {
                spins = 0;
            }
        }
    }

    pub fn drain(&mut self, t: &mut TargetConnection<Buf>) {
        let mut out = [0u8; 1500];
        loop {
            let n = t.transmit(&mut out);
            if n == 0 {
                break;
            }
            self.tx.extend_from_slice(&out[..n]);
            self.service(t);
        }
    }
}

pub fn target(cfg: TargetConfig) -> TargetConnection<Buf> {
    TargetConnection::new(cfg, 0).unwrap()
}

/// Split `tx` into PDUs by PLEN.
pub fn split_pdus(tx: &[u8]) -> Vec<&[u8]> {
    let mut v = Vec::new();
    let mut at = 0;
    while at + 8 <= tx.len() {
        let plen = u32::from_le_bytes(tx[at + 4..at + 8].try_into().unwrap()) as usize;
        v.push(&tx[at..(at + plen).min(tx.len())]);
        at += plen;
    }
    v
}

/// Expected C2HTermReq: FES, FEI and the offending header copy.
pub fn term_req(fes: u16, fei: u32, hdr: &[u8]) -> Vec<u8> {
    let n = hdr.len().min(128);
    let mut v = vec![0x03, 0x00, 0x18, 0x00];
    v.extend_from_slice(&(24 + n as u32).to_le_bytes());
    v.extend_from_slice(&fes.to_le_bytes());
    v.extend_from_slice(&fei.to_le_bytes());
    v.extend_from_slice(&[0; 10]);
    v.extend_from_slice(&hdr[..n]);
    v
}

pub const TRANSIENT: Status = Status::TRANSIENT_TRANSPORT_ERROR;
