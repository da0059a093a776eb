//! The NBD server (`keelctl host nbd`) driven from bytes: a client's handshake options and
//! requests, over an in-memory device that can fail.
//!
//! The harness is an oracle for the transmission phase: it follows the requests the server
//! took after the handshake, keeps a shadow copy of the disk, and checks that every request
//! but `NBD_CMD_DISC` gets exactly one simple reply, in order, with its handle; that errors
//! are the ones the NBD protocol prescribes (`ENOSPC`/`EINVAL` out of range, `EINVAL`
//! misaligned, `EIO` when the device fails, `ENOTSUP` unknown); that reads return the
//! requested length of what the disk holds; and that the device is only called in range.

use anyhow::{Result, bail};
use keel_host_tools::host::nbd::{self, Device, Export};
use std::io::Read;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const MAX_REQUEST: u32 = 32 << 20;
const BLOCKS: u64 = 64;

/// An in-memory disk that checks it is only asked for blocks it has.
struct MemDisk {
    bs: usize,
    data: Vec<u8>,
    calls: u64,
    fail_every: u64,
}

impl MemDisk {
    fn call(&mut self, lba: u64, count: u64) -> Result<std::ops::Range<usize>> {
        assert!(
            lba.checked_add(count).is_some_and(|e| e <= BLOCKS),
            "device called out of range: {lba}+{count}"
        );
        self.calls += 1;
        if self.fail_every != 0 && self.calls.is_multiple_of(self.fail_every) {
            bail!("injected failure");
        }
        Ok(lba as usize * self.bs..(lba + count) as usize * self.bs)
    }
}

impl Device for MemDisk {
    fn read(&mut self, lba: u64, count: u64) -> Result<Vec<u8>> {
        let r = self.call(lba, count)?;
        Ok(self.data[r].to_vec())
    }
    fn write(&mut self, lba: u64, count: u64, data: &[u8], _fua: bool) -> Result<()> {
        let r = self.call(lba, count)?;
        assert_eq!(
            data.len(),
            r.len(),
            "write data of another length than its blocks"
        );
        self.data[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        self.call(0, 0).map(|_| ())
    }
    fn trim(&mut self, lba: u64, count: u64) -> Result<()> {
        let r = self.call(lba, count)?;
        self.data[r].fill(0);
        Ok(())
    }
    fn write_zeroes(&mut self, lba: u64, count: u64, _deallocate: bool) -> Result<()> {
        let r = self.call(lba, count)?;
        self.data[r].fill(0);
        Ok(())
    }
}

/// A reader that counts what it handed out (where the handshake stopped).
struct Counted<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What the oracle expects for one request.
struct Expect {
    handle: u64,
    error: u32,
    read: Option<Vec<u8>>,
}

/// Follows the requests in `input` as the protocol defines them, on a shadow disk.
fn oracle(input: &[u8], bs: u64, fail_every: u64, shadow: &mut [u8]) -> Vec<Expect> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut calls = 0u64;
    let size = BLOCKS * bs;
    while let Some(h) = input.get(at..at + 28) {
        at += 28;
        let be32 = |o: usize| u32::from_be_bytes(h[o..o + 4].try_into().unwrap());
        let be64 = |o: usize| u64::from_be_bytes(h[o..o + 8].try_into().unwrap());
        let (magic, flags_ty, handle, off, len) = (be32(0), be32(4), be64(8), be64(16), be32(24));
        let ty = flags_ty as u16;
        if magic != REQUEST_MAGIC {
            break;
        }
        let mut payload: &[u8] = &[];
        if ty == 1 {
            if len > MAX_REQUEST {
                break;
            }
            let Some(p) = input.get(at..at + len as usize) else {
                break;
            };
            payload = p;
            at += len as usize;
        }
        if ty == 2 {
            break;
        }
        let in_range = off.checked_add(len as u64).is_some_and(|e| e <= size);
        let aligned = off.is_multiple_of(bs) && (len as u64).is_multiple_of(bs);
        let data_cmd = matches!(ty, 0 | 1 | 4 | 6);
        let error = if data_cmd && !in_range {
            if ty == 1 || ty == 6 { 28 } else { 22 }
        } else if data_cmd && !aligned {
            22
        } else if !matches!(ty, 0 | 1 | 3 | 4 | 6) {
            95
        } else {
            calls += 1;
            if fail_every != 0 && calls.is_multiple_of(fail_every) {
                5
            } else {
                0
            }
        };
        let mut read = None;
        if error == 0 && data_cmd {
            // In range (checked above).
            let r = off as usize..off as usize + len as usize;
            match ty {
                0 => read = Some(shadow[r].to_vec()),
                1 => shadow[r].copy_from_slice(payload),
                4 | 6 => shadow[r].fill(0),
                _ => {}
            }
        }
        out.push(Expect {
            handle,
            error,
            read,
        });
    }
    out
}

/// The fuzz body. First byte: bit 0 = 4096-byte blocks (else 512), bits 1-3 = the device
/// fails every n-th call (0: never); the rest is what the client sends.
pub fn run(data: &[u8]) {
    let Some((&cfg, stream)) = data.split_first() else {
        return;
    };
    let bs: u64 = if cfg & 1 == 1 { 4096 } else { 512 };
    let export = Export {
        nsid: 1,
        block_size: bs as u32,
        blocks: BLOCKS,
    };
    let fail_every = ((cfg >> 1) & 7) as u64;
    let mut r = Counted {
        data: stream,
        pos: 0,
    };
    let mut w = Vec::new();
    let entered = nbd::handshake(&export, &mut r, &mut w);
    assert_eq!(&w[..8], &NBDMAGIC.to_be_bytes(), "greeting");
    assert_eq!(&w[8..16], &IHAVEOPT.to_be_bytes(), "greeting");
    if !matches!(entered, Ok(true)) {
        return;
    }
    let start = r.pos;
    let mut disk = MemDisk {
        bs: bs as usize,
        data: vec![0; (BLOCKS * bs) as usize],
        calls: 0,
        fail_every,
    };
    let mut out = Vec::new();
    let _ = nbd::transmission(&export, &mut r, &mut out, &mut disk);
    let mut shadow = vec![0; (BLOCKS * bs) as usize];
    let expect = oracle(&stream[start..], bs, fail_every, &mut shadow);
    let mut at = 0;
    for (i, e) in expect.iter().enumerate() {
        let Some(h) = out.get(at..at + 16) else {
            panic!("request {i} (handle {:#x}) got no reply", e.handle);
        };
        assert_eq!(
            &h[..4],
            &SIMPLE_REPLY_MAGIC.to_be_bytes(),
            "reply {i}: magic"
        );
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        assert_eq!(handle, e.handle, "reply {i}: handle");
        assert_eq!(error, e.error, "reply {i} (handle {handle:#x}): error");
        at += 16;
        if let Some(d) = &e.read {
            assert_eq!(
                out.get(at..at + d.len()),
                Some(&d[..]),
                "reply {i}: read data"
            );
            at += d.len();
        }
    }
    assert_eq!(at, out.len(), "replies nobody asked for");
    assert_eq!(disk.data, shadow, "the disk does not hold what was written");
}
