//! The non-blocking block backend interface.

use crate::buf::IoBuf;
use core::fmt;

/// Size of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Logical block size in bytes (512 or 4096).
    pub block_size: u32,
    /// Number of logical blocks.
    pub blocks: u64,
}

impl Geometry {
    /// Capacity in bytes.
    pub const fn bytes(&self) -> u128 {
        self.block_size as u128 * self.blocks as u128
    }

    /// log2 of the block size (LBADS).
    pub const fn lbads(&self) -> u8 {
        self.block_size.trailing_zeros() as u8
    }

    /// True when `[lba, lba + blocks)` lies inside the backend.
    pub const fn contains(&self, lba: u64, blocks: u64) -> bool {
        match lba.checked_add(blocks) {
            Some(end) => end <= self.blocks,
            None => false,
        }
    }

    /// The checks of [`BlockBackend::read_now`] / [`BlockBackend::write_now`]: `blocks`
    /// (at least one) at `lba` inside the backend, and `len` exactly their bytes.
    pub fn check_now(&self, lba: u64, blocks: u32, len: usize) -> Result<(), BlockError> {
        if blocks == 0 || !self.contains(lba, blocks as u64) {
            return Err(BlockError::OutOfRange);
        }
        if len as u64 != blocks as u64 * self.block_size as u64 {
            return Err(BlockError::BufferTooSmall);
        }
        Ok(())
    }
}

/// Which data moves a backend does synchronously, without a buffer
/// ([`BlockBackend::moves_data_now`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NowIo {
    /// [`BlockBackend::read_now`] works.
    pub read: bool,
    /// [`BlockBackend::write_now`] works.
    pub write: bool,
}

/// What a backend can do beyond Read and Write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Has a volatile write cache (Flush is meaningful).
    pub volatile_write_cache: bool,
    /// Supports [`BlockOp::Flush`] (always accepted when true; a no-op without cache).
    pub flush: bool,
    /// Honours FUA on writes.
    pub fua: bool,
    /// Supports [`BlockOp::WriteZeroes`].
    pub write_zeroes: bool,
    /// Supports [`BlockOp::Deallocate`].
    pub deallocate: bool,
    /// Deallocated blocks read back as zeroes.
    pub deallocate_reads_zero: bool,
    /// Supports [`BlockOp::Compare`].
    pub compare: bool,
    /// Supports [`BlockOp::Verify`].
    pub verify: bool,
}

/// Operation of a [`BlockRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    /// Read `blocks` blocks at `lba` into the buffer.
    Read,
    /// Write `blocks` blocks at `lba` from the buffer.
    Write {
        /// Force Unit Access: durable before completion.
        fua: bool,
    },
    /// Compare `blocks` blocks at `lba` with the buffer; mismatch fails with
    /// [`BlockError::CompareMismatch`].
    Compare,
    /// Make completed writes durable. `lba`/`blocks` ignored, no buffer.
    Flush,
    /// Zero `blocks` blocks at `lba`. No buffer.
    WriteZeroes {
        /// The blocks may be deallocated instead of written.
        deallocate: bool,
        /// Force Unit Access.
        fua: bool,
    },
    /// Deallocate (trim) `blocks` blocks at `lba`. No buffer.
    Deallocate,
    /// Check that `blocks` blocks at `lba` can be read (NVM Command Set §3.3.6 Verify: the
    /// medium is read, nothing is transferred). No buffer; an unreadable block fails with
    /// [`BlockError::ReadError`].
    Verify,
}

impl BlockOp {
    /// True for operations that move data through a buffer.
    pub const fn has_data(&self) -> bool {
        matches!(
            self,
            BlockOp::Read | BlockOp::Write { .. } | BlockOp::Compare
        )
    }
}

/// A request to a backend.
#[derive(Debug)]
pub struct BlockRequest {
    /// Caller's tag, returned in the completion.
    pub tag: u64,
    /// Operation.
    pub op: BlockOp,
    /// First logical block.
    pub lba: u64,
    /// Number of blocks (not 0's based).
    pub blocks: u32,
    /// Data buffer for Read / Write / Compare.
    pub buf: Option<IoBuf>,
    /// Byte offset of the data inside `buf`.
    pub buf_offset: usize,
}

impl BlockRequest {
    /// A request of `blocks` blocks at `lba`, its data (if any) at the start of `buf`.
    pub fn new(tag: u64, op: BlockOp, lba: u64, blocks: u32, buf: Option<IoBuf>) -> Self {
        Self {
            tag,
            op,
            lba,
            blocks,
            buf,
            buf_offset: 0,
        }
    }

    /// Number of data bytes the request moves for a given block size (0 without data).
    pub fn data_bytes(&self, block_size: u32) -> u64 {
        if self.op.has_data() {
            self.blocks as u64 * block_size as u64
        } else {
            0
        }
    }

    /// Checks a request against a geometry and capabilities; on success returns the byte
    /// range of the data inside the buffer (empty without data).
    pub fn validate(
        &self,
        g: Geometry,
        caps: Capabilities,
    ) -> Result<core::ops::Range<usize>, BlockError> {
        match self.op {
            BlockOp::Flush => {
                return if caps.flush {
                    Ok(0..0)
                } else {
                    Err(BlockError::Unsupported)
                };
            }
            BlockOp::WriteZeroes { .. } if !caps.write_zeroes => {
                return Err(BlockError::Unsupported);
            }
            BlockOp::Deallocate if !caps.deallocate => return Err(BlockError::Unsupported),
            BlockOp::Compare if !caps.compare => return Err(BlockError::Unsupported),
            BlockOp::Verify if !caps.verify => return Err(BlockError::Unsupported),
            _ => {}
        }
        if self.blocks == 0 || !g.contains(self.lba, self.blocks as u64) {
            return Err(BlockError::OutOfRange);
        }
        if !self.op.has_data() {
            return Ok(0..0);
        }
        let len = usize::try_from(self.data_bytes(g.block_size))
            .map_err(|_| BlockError::BufferTooSmall)?;
        let end = self
            .buf_offset
            .checked_add(len)
            .ok_or(BlockError::BufferTooSmall)?;
        match &self.buf {
            Some(b) if b.capacity() >= end => Ok(self.buf_offset..end),
            _ => Err(BlockError::BufferTooSmall),
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockError {
    /// The block range is empty or extends beyond the backend.
    OutOfRange,
    /// The buffer is missing or smaller than the data.
    BufferTooSmall,
    /// The operation is not supported.
    Unsupported,
    /// The tag cannot be carried (e.g. reserved bits used by a shared backend).
    InvalidTag,
    /// Compare found different data.
    CompareMismatch,
    /// The medium failed to write.
    WriteFault,
    /// The medium failed to read.
    ReadError,
    /// No path to the data: a remote volume lost every path to its storage for longer than
    /// its controller loss timeout (or fast I/O fail timeout). Maps to an NVMe path related
    /// status.
    PathError,
    /// The request was aborted ([`BlockBackend::abort`]) before it finished.
    Aborted,
    /// Any other failure.
    Internal,
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockError::OutOfRange => "block range outside the backend",
            BlockError::BufferTooSmall => "buffer missing or too small",
            BlockError::Unsupported => "operation not supported",
            BlockError::InvalidTag => "tag not usable with this backend",
            BlockError::CompareMismatch => "compare mismatch",
            BlockError::WriteFault => "write fault",
            BlockError::ReadError => "unrecovered read error",
            BlockError::PathError => "no path to the storage",
            BlockError::Aborted => "aborted",
            BlockError::Internal => "internal backend error",
        })
    }
}

/// Why `submit` refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// No room right now: retry after a `poll`.
    Busy,
    /// The request is invalid and will never succeed.
    Invalid(BlockError),
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::Busy => f.write_str("backend busy"),
            RejectReason::Invalid(e) => write!(f, "invalid request: {e}"),
        }
    }
}

/// A refused request, handed back whole so nothing (in particular the buffer) is lost.
#[derive(Debug)]
pub struct Rejected {
    /// Why.
    pub reason: RejectReason,
    /// The request.
    pub req: BlockRequest,
}

/// A finished request. The buffer always comes back.
#[derive(Debug)]
pub struct BlockCompletion {
    /// The request's tag.
    pub tag: u64,
    /// Outcome.
    pub result: Result<(), BlockError>,
    /// The request's buffer.
    pub buf: Option<IoBuf>,
}

/// A block device. Implementations never block: `submit` queues (or refuses) and `poll`
/// reports what finished.
pub trait BlockBackend {
    /// Block size and count.
    fn geometry(&self) -> Geometry;
    /// Optional features.
    fn capabilities(&self) -> Capabilities;
    /// Queues a request. Invalid requests are refused with [`RejectReason::Invalid`]; a full
    /// queue with [`RejectReason::Busy`]. Accepted requests complete in a later `poll`.
    fn submit(&mut self, req: BlockRequest) -> Result<(), Rejected>;
    /// Reports finished requests through `done`; returns how many.
    fn poll(&mut self, done: &mut dyn FnMut(BlockCompletion)) -> usize;
    /// Asks the backend to abort the accepted request tagged `tag` (NVMe base 2.0 §5.1,
    /// best effort). True when an abort was started: the request still completes through
    /// `poll`, with [`BlockError::Aborted`] if it was aborted or with its own result if it
    /// finished first. False when the backend does not hold it or cannot abort it (the
    /// default).
    fn abort(&mut self, tag: u64) -> bool {
        let _ = tag;
        false
    }
    /// Whether [`read_now`](Self::read_now) and [`write_now`](Self::write_now) work: the
    /// medium is memory the backend reaches synchronously (a RAM disk, a slice of one, AES-XTS
    /// reads over one). Neither by default. A backend with a volatile write cache never offers
    /// `write_now` (what it writes is durable when it returns).
    fn moves_data_now(&self) -> NowIo {
        NowIo::default()
    }
    /// Reads `blocks` blocks at `lba` into `dst` (exactly their bytes) now, with no buffer
    /// and no completion: the caller's memory (a transport's send window) is the destination.
    /// Only when [`moves_data_now`](Self::moves_data_now) says reads do; errors as
    /// [`BlockOp::Read`] through `submit` ([`Geometry::check_now`]); on error `dst` holds
    /// anything.
    fn read_now(&mut self, lba: u64, blocks: u32, dst: &mut [u8]) -> Result<(), BlockError> {
        let _ = (lba, blocks, dst);
        Err(BlockError::Unsupported)
    }
    /// Writes `src` (exactly `blocks` blocks) at `lba` now and durably, from the caller's
    /// memory (what a transport received). Only when [`moves_data_now`](Self::moves_data_now)
    /// says writes do; on error nothing was written.
    fn write_now(&mut self, lba: u64, blocks: u32, src: &[u8]) -> Result<(), BlockError> {
        let _ = (lba, blocks, src);
        Err(BlockError::Unsupported)
    }
    /// Whether [`read_now_split`](Self::read_now_split) works: reads that are plain copies
    /// out of memory (a RAM disk, a slice of one). Not by default (AES-XTS decrypts whole
    /// sectors in place, which a destination cut anywhere does not allow).
    fn reads_now_split(&self) -> bool {
        false
    }
    /// [`read_now`](Self::read_now) into a destination in two pieces: the blocks' bytes run
    /// through `first` into `second` (together exactly their bytes; either may be empty),
    /// e.g. the free space of a transmit ring where it wraps. Only when
    /// [`reads_now_split`](Self::reads_now_split) says so; errors as `read_now`.
    fn read_now_split(
        &mut self,
        lba: u64,
        blocks: u32,
        first: &mut [u8],
        second: &mut [u8],
    ) -> Result<(), BlockError> {
        let _ = (lba, blocks, first, second);
        Err(BlockError::Unsupported)
    }
}

/// Delivers completions that `take` pulls one at a time out of a state shared through a
/// `RefCell` (a backend whose handles share one device), with the borrow released while
/// `done` runs so `done` may submit again. Returns how many were delivered; a state that is
/// borrowed elsewhere delivers nothing now.
pub fn deliver_shared<T: ?Sized>(
    cell: &core::cell::RefCell<T>,
    mut take: impl FnMut(&mut T) -> Option<BlockCompletion>,
    done: &mut dyn FnMut(BlockCompletion),
) -> usize {
    let mut n = 0;
    loop {
        let next = match cell.try_borrow_mut() {
            Ok(mut s) => take(&mut s),
            Err(_) => None,
        };
        match next {
            Some(c) => {
                done(c);
                n += 1;
            }
            None => return n,
        }
    }
}

impl<B: BlockBackend + ?Sized> BlockBackend for alloc::boxed::Box<B> {
    fn geometry(&self) -> Geometry {
        (**self).geometry()
    }
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn submit(&mut self, req: BlockRequest) -> Result<(), Rejected> {
        (**self).submit(req)
    }
    fn poll(&mut self, done: &mut dyn FnMut(BlockCompletion)) -> usize {
        (**self).poll(done)
    }
    fn abort(&mut self, tag: u64) -> bool {
        (**self).abort(tag)
    }
    fn moves_data_now(&self) -> NowIo {
        (**self).moves_data_now()
    }
    fn read_now(&mut self, lba: u64, blocks: u32, dst: &mut [u8]) -> Result<(), BlockError> {
        (**self).read_now(lba, blocks, dst)
    }
    fn write_now(&mut self, lba: u64, blocks: u32, src: &[u8]) -> Result<(), BlockError> {
        (**self).write_now(lba, blocks, src)
    }
    fn reads_now_split(&self) -> bool {
        (**self).reads_now_split()
    }
    fn read_now_split(
        &mut self,
        lba: u64,
        blocks: u32,
        first: &mut [u8],
        second: &mut [u8],
    ) -> Result<(), BlockError> {
        (**self).read_now_split(lba, blocks, first, second)
    }
}
