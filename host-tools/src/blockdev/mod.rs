//! One block-device interface under `keelctl`'s read, write, verify and bench, whatever
//! carries the commands: an NVMe/TCP I/O queue (`keelctl nvme`, [`crate::nvme::device`]) or
//! the emulated PCIe function's driver over a window (`keelctl host`,
//! [`crate::host::driver`]).
//!
//! - [`BlockDevice`]: one namespace, asynchronous: [`BlockDevice::submit`] requests with
//!   buffers the device hands out, [`BlockDevice::complete`] waits (bounded) for the next
//!   completion in whatever order they come.
//! - [`Target`]: where devices come from (a controller), so the commands and the benchmark
//!   can open one per worker and close it cleanly.
//! - [`transfer`]: a range read or written through a device, split at its largest transfer,
//!   up to its depth in flight; [`verify`] on top of it.
//! - [`bench`]: the load generator; [`cli`]: the subcommands both `keelctl nvme` and `keelctl
//!   host` offer, with the same options and output.

pub mod bench;
pub mod cli;

use crate::nvme::error::describe_status;
use crate::nvme::pattern::{fill, mismatches};
use anyhow::{Context, Result, bail};
use keel_nvme::Status;
pub use keel_storage::{BlockError, BlockOp, Geometry};
use std::fmt;

/// Why an I/O failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoError {
    /// The controller completed the command with this status.
    Status(Status),
    /// The host-side driver refused or failed the request.
    Block(BlockError),
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(s) => f.write_str(&describe_status(*s)),
            Self::Block(BlockError::OutOfRange) => {
                f.write_str("LBA Out of Range (beyond the namespace; not sent)")
            }
            Self::Block(e) => write!(f, "{e}"),
        }
    }
}

/// A data buffer of a [`BlockDevice`].
pub trait DataBuf {
    /// The bytes.
    fn bytes(&self) -> &[u8];
    /// The bytes, mutable.
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl DataBuf for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// A request: `blocks` blocks at `lba`; Read and Write move the first `blocks × block size`
/// bytes of `buf`.
#[derive(Debug)]
pub struct Request<B> {
    /// The caller's tag, returned in the completion.
    pub tag: u64,
    /// The operation.
    pub op: BlockOp,
    /// First block.
    pub lba: u64,
    /// Blocks.
    pub blocks: u32,
    /// Data buffer (Read, Write), from [`BlockDevice::alloc`].
    pub buf: Option<B>,
}

/// A finished request; the buffer comes back.
#[derive(Debug)]
pub struct Completion<B> {
    /// The request's tag.
    pub tag: u64,
    /// Outcome.
    pub result: Result<(), IoError>,
    /// The request's buffer.
    pub buf: Option<B>,
}

/// One namespace, asynchronously.
pub trait BlockDevice {
    /// Data buffer type.
    type Buf: DataBuf;
    /// Block size and count.
    fn geometry(&self) -> Geometry;
    /// Largest data transfer of one request, in bytes.
    fn max_transfer(&self) -> u32;
    /// Requests in flight at most.
    fn depth(&self) -> usize;
    /// A data buffer of [`BlockDevice::max_transfer`] bytes.
    fn alloc(&mut self) -> Result<Self::Buf>;
    /// Gives a buffer back.
    fn free(&mut self, buf: Self::Buf);
    /// Starts a request (refused: an error; its buffer is gone).
    fn submit(&mut self, req: Request<Self::Buf>) -> Result<()>;
    /// Waits for the next completion (any request), bounded by the device's timeout.
    fn complete(&mut self) -> Result<Completion<Self::Buf>>;
}

/// Where [`BlockDevice`]s come from.
pub trait Target: Sync {
    /// The device.
    type Dev: BlockDevice;
    /// Before a run with `queues` I/O queues (e.g. Set Features Number of Queues).
    fn prepare(&self, _queues: u16) -> Result<()> {
        Ok(())
    }
    /// How many benchmark threads drive `queues` queues: each opens its own device.
    fn workers(&self, queues: u16) -> u16;
    /// Opens namespace `nsid` for worker `index` of a run over `queues` queues of `qd`
    /// commands in flight each.
    fn open(&self, nsid: u32, queues: u16, qd: u16, index: u16) -> Result<Self::Dev>;
    /// Closes a device cleanly (Disconnect, controller shutdown).
    fn close(&self, dev: Self::Dev) -> Result<()>;
}

fn op_name(write: bool) -> &'static str {
    if write { "Write" } else { "Read" }
}

/// Writes `data` (a whole number of blocks) at `lba`; see [`transfer`].
pub fn write<D: BlockDevice>(dev: &mut D, lba: u64, data: &[u8]) -> Result<()> {
    transfer(dev, lba, Data::Out(data))
}

/// Reads `out.len()` bytes (a whole number of blocks) at `lba`; see [`transfer`].
pub fn read<D: BlockDevice>(dev: &mut D, lba: u64, out: &mut [u8]) -> Result<()> {
    transfer(dev, lba, Data::In(out))
}

/// The data of a [`transfer`].
#[derive(Debug)]
pub enum Data<'a> {
    /// Written to the device.
    Out(&'a [u8]),
    /// Read from the device.
    In(&'a mut [u8]),
}

/// Reads or writes a range at `lba`, split at the device's largest transfer, up to its depth
/// in flight. On a failure, what is in flight is waited for, then the first error is
/// returned, naming the command.
pub fn transfer<D: BlockDevice>(dev: &mut D, lba: u64, mut data: Data<'_>) -> Result<()> {
    let bs = dev.geometry().block_size as usize;
    let (write, total) = match &data {
        Data::Out(d) => (true, d.len()),
        Data::In(d) => (false, d.len()),
    };
    if bs == 0 || !total.is_multiple_of(bs) {
        bail!("{} bytes is not a multiple of the block size {bs}", total);
    }
    let per = (dev.max_transfer() as usize / bs).max(1) * bs;
    let depth = dev.depth().max(1);
    let (mut next, mut in_flight) = (0usize, 0usize);
    let mut first_err: Option<anyhow::Error> = None;
    while (next < total && first_err.is_none()) || in_flight > 0 {
        while next < total && in_flight < depth && first_err.is_none() {
            let n = per.min(total - next);
            let mut buf = dev.alloc()?;
            if let Data::Out(d) = &data {
                buf.bytes_mut()[..n].copy_from_slice(&d[next..next + n]);
            }
            let req = Request {
                tag: next as u64,
                op: if write {
                    BlockOp::Write { fua: false }
                } else {
                    BlockOp::Read
                },
                lba: lba + (next / bs) as u64,
                blocks: (n / bs) as u32,
                buf: Some(buf),
            };
            let what = format!(
                "{} (LBA {}, {} block(s))",
                op_name(write),
                req.lba,
                req.blocks
            );
            match dev.submit(req) {
                Ok(()) => in_flight += 1,
                Err(e) => first_err = Some(e.context(what)),
            }
            next += n;
        }
        if in_flight == 0 {
            break;
        }
        let c = dev.complete()?;
        in_flight -= 1;
        let at = c.tag as usize;
        let n = per.min(total - at.min(total));
        match c.result {
            Ok(()) => {
                if let (Data::In(d), Some(b)) = (&mut data, &c.buf) {
                    d[at..at + n].copy_from_slice(&b.bytes()[..n]);
                }
            }
            Err(e) => {
                first_err.get_or_insert_with(|| {
                    anyhow::anyhow!(
                        "{} (LBA {}, {} block(s)) failed: {e}",
                        op_name(write),
                        lba + (at / bs) as u64,
                        n / bs
                    )
                });
            }
        }
        if let Some(b) = c.buf {
            dev.free(b);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Verify works through the range in windows of this many bytes.
const VERIFY_WINDOW: u64 = 8 << 20;
/// Mismatching offsets listed at most.
const VERIFY_LIST: usize = 16;

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Bytes that differ.
    pub bad: u64,
    /// The first differing byte offsets from the start of the range.
    pub offsets: Vec<u64>,
}

/// Writes the pattern of `seed` over `count` blocks at `lba` (unless `read_only`), reads it
/// back and compares, in windows of 8 MiB.
pub fn verify<D: BlockDevice>(
    dev: &mut D,
    lba: u64,
    count: u64,
    seed: u64,
    read_only: bool,
) -> Result<VerifyReport> {
    if count == 0 {
        bail!("--count must be at least 1");
    }
    lba.checked_add(count).context("LBA range overflows")?;
    let bs = dev.geometry().block_size as u64;
    let window = (VERIFY_WINDOW / bs).max(1);
    let mut r = VerifyReport {
        bad: 0,
        offsets: Vec::new(),
    };
    let mut done = 0u64;
    while done < count {
        let n = window.min(count - done);
        let first = lba + done;
        let mut want = vec![0u8; (n * bs) as usize];
        fill(&mut want, seed, first * bs);
        if !read_only {
            write(dev, first, &want)?;
        }
        let mut got = vec![0u8; want.len()];
        read(dev, first, &mut got)?;
        let keep = VERIFY_LIST - r.offsets.len().min(VERIFY_LIST);
        let (bad, offs) = mismatches(&got, &want, keep);
        r.bad += bad;
        r.offsets
            .extend(offs.into_iter().map(|o| done * bs + o as u64));
        done += n;
    }
    Ok(r)
}

#[cfg(test)]
pub(crate) mod testdev {
    //! A RAM block device with a scriptable depth, for the generic code's tests.
    use super::*;
    use std::collections::VecDeque;

    /// RAM device: requests complete in reverse order of submission (the worst case for
    /// code that assumes order).
    #[derive(Debug)]
    pub struct RamDev {
        pub data: Vec<u8>,
        pub bs: u32,
        pub max: u32,
        pub depth: usize,
        pub pending: VecDeque<Request<Vec<u8>>>,
        pub peak: usize,
        pub fail_lba: Option<u64>,
    }

    impl RamDev {
        pub fn new(bytes: usize, bs: u32, max: u32, depth: usize) -> Self {
            Self {
                data: vec![0; bytes],
                bs,
                max,
                depth,
                pending: VecDeque::new(),
                peak: 0,
                fail_lba: None,
            }
        }
    }

    impl BlockDevice for RamDev {
        type Buf = Vec<u8>;
        fn geometry(&self) -> Geometry {
            Geometry {
                block_size: self.bs,
                blocks: (self.data.len() / self.bs as usize) as u64,
            }
        }
        fn max_transfer(&self) -> u32 {
            self.max
        }
        fn depth(&self) -> usize {
            self.depth
        }
        fn alloc(&mut self) -> Result<Vec<u8>> {
            Ok(vec![0; self.max as usize])
        }
        fn free(&mut self, _buf: Vec<u8>) {}
        fn submit(&mut self, req: Request<Vec<u8>>) -> Result<()> {
            if self.pending.len() >= self.depth {
                bail!("over depth");
            }
            self.pending.push_back(req);
            self.peak = self.peak.max(self.pending.len());
            Ok(())
        }
        fn complete(&mut self) -> Result<Completion<Vec<u8>>> {
            let mut r = self.pending.pop_back().context("nothing in flight")?;
            let bs = self.bs as usize;
            let (at, n) = (r.lba as usize * bs, r.blocks as usize * bs);
            let result = if self.fail_lba == Some(r.lba) {
                Err(IoError::Status(Status::generic(0x80)))
            } else if at + n > self.data.len() {
                Err(IoError::Block(BlockError::OutOfRange))
            } else {
                let b = r.buf.as_mut().context("no buffer")?;
                match r.op {
                    BlockOp::Read => b[..n].copy_from_slice(&self.data[at..at + n]),
                    _ => self.data[at..at + n].copy_from_slice(&b[..n]),
                }
                Ok(())
            };
            Ok(Completion {
                tag: r.tag,
                result,
                buf: r.buf,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testdev::RamDev;
    use super::*;

    #[test]
    fn transfer_splits_pipelines_and_reassembles_out_of_order() {
        let mut d = RamDev::new(1 << 20, 512, 4096, 8);
        let mut data: Vec<u8> = (0..100 * 512).map(|i| (i * 31 % 251) as u8).collect();
        write(&mut d, 7, &data).unwrap();
        assert_eq!(d.peak, 8, "depth used");
        assert_eq!(&d.data[7 * 512..107 * 512], &data[..]);
        let mut back = vec![0u8; data.len()];
        read(&mut d, 7, &mut back).unwrap();
        assert_eq!(back, data);
        // A failure names the command and waits for what is in flight.
        d.fail_lba = Some(7 + 16);
        let e = read(&mut d, 7, &mut data).unwrap_err().to_string();
        assert_eq!(
            e,
            "Read (LBA 23, 8 block(s)) failed: LBA Out of Range (SCT 0h, SC 80h)"
        );
        assert!(d.pending.is_empty());
        let e = write(&mut d, 0, &[0u8; 100]).unwrap_err();
        assert!(e.to_string().contains("multiple of the block size"), "{e}");
    }

    #[test]
    fn verify_finds_and_locates_damage() {
        let mut d = RamDev::new(4 << 20, 512, 8192, 4);
        let r = verify(&mut d, 10, 5000, 0x99, false).unwrap();
        assert_eq!(r.bad, 0);
        d.data[(10 + 4000) * 512 + 3] ^= 0xFF;
        let r = verify(&mut d, 10, 5000, 0x99, true).unwrap();
        assert_eq!((r.bad, r.offsets), (1, vec![4000 * 512 + 3]));
        assert!(verify(&mut d, 0, 0, 1, true).is_err());
    }
}
