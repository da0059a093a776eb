//! What every backend whose medium is memory shares (the heap RAM disk, a RAM region several
//! cores serve): how a request runs against the medium ([`execute`]), the capabilities of
//! memory ([`CAPABILITIES`]), and the bounded queue of accepted requests that `poll` runs
//! ([`RequestQueue`]).

use crate::backend::*;
use alloc::collections::VecDeque;

/// A medium of bytes reached synchronously.
pub trait Medium {
    /// Its size in bytes.
    fn len(&self) -> usize;
    /// Whether it has no bytes (never, for a backend).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies the medium at `start` into `dst` (in range).
    fn read_into(&self, start: usize, dst: &mut [u8]);
    /// Copies `src` onto the medium at `start` (in range).
    fn write_from(&mut self, start: usize, src: &[u8]);
    /// Zeroes `len` bytes at `start` (in range).
    fn zero_range(&mut self, start: usize, len: usize);
    /// Whether the medium at `start` holds `data` (in range).
    fn equals(&self, start: usize, data: &[u8]) -> bool;
}

/// What memory does: everything, without a volatile cache.
pub const CAPABILITIES: Capabilities = Capabilities {
    volatile_write_cache: false,
    flush: true,
    fua: true,
    write_zeroes: true,
    deallocate: true,
    deallocate_reads_zero: true,
    compare: true,
    verify: true,
};

/// Byte offset of `blocks` blocks at `lba` whose data is `len` bytes, for `read_now` /
/// `write_now` on a medium of geometry `g`.
pub fn now_start(g: Geometry, lba: u64, blocks: u32, len: usize) -> Result<usize, BlockError> {
    g.check_now(lba, blocks, len)?;
    // In range of the medium (a usize), so the product fits.
    usize::try_from(lba * g.block_size as u64).map_err(|_| BlockError::OutOfRange)
}

/// Runs `req` against medium `m` of geometry `g`.
pub fn execute<M: Medium + ?Sized>(
    m: &mut M,
    g: Geometry,
    req: &mut BlockRequest,
) -> Result<(), BlockError> {
    let range = req.validate(g, CAPABILITIES)?;
    let bs = g.block_size as u64;
    let start = usize::try_from(req.lba * bs).map_err(|_| BlockError::OutOfRange)?;
    let len = usize::try_from(req.blocks as u64 * bs).map_err(|_| BlockError::OutOfRange)?;
    if start.checked_add(len).is_none_or(|end| end > m.len()) {
        return Err(BlockError::OutOfRange);
    }
    match req.op {
        // Memory cannot fail a read: a block in range verifies.
        BlockOp::Flush | BlockOp::Verify => Ok(()),
        BlockOp::WriteZeroes { .. } | BlockOp::Deallocate => {
            m.zero_range(start, len);
            Ok(())
        }
        BlockOp::Read => {
            let buf = req.buf.as_mut().ok_or(BlockError::BufferTooSmall)?;
            let dst = buf
                .capacity_mut()
                .get_mut(range)
                .filter(|d| d.len() == len)
                .ok_or(BlockError::BufferTooSmall)?;
            m.read_into(start, dst);
            Ok(())
        }
        BlockOp::Write { .. } | BlockOp::Compare => {
            let compare = matches!(req.op, BlockOp::Compare);
            let buf = req.buf.as_mut().ok_or(BlockError::BufferTooSmall)?;
            let src = buf
                .capacity_mut()
                .get(range)
                .filter(|d| d.len() == len)
                .ok_or(BlockError::BufferTooSmall)?;
            if !compare {
                m.write_from(start, src);
                Ok(())
            } else if m.equals(start, src) {
                Ok(())
            } else {
                Err(BlockError::CompareMismatch)
            }
        }
    }
}

/// Accepted requests of a memory backend, run by its `poll`: at most `depth`, each with
/// whether it was aborted.
#[derive(Debug)]
pub struct RequestQueue {
    queue: VecDeque<(BlockRequest, bool)>,
    depth: usize,
}

impl RequestQueue {
    /// Room for `depth` requests (allocated now).
    pub fn new(depth: usize) -> Self {
        Self {
            queue: VecDeque::with_capacity(depth),
            depth,
        }
    }

    /// Requests queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether none is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The queue's depth.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// [`BlockBackend::submit`] for a medium of geometry `g`.
    pub fn submit(&mut self, g: Geometry, req: BlockRequest) -> Result<(), Rejected> {
        if let Err(e) = req.validate(g, CAPABILITIES) {
            return Err(Rejected {
                reason: RejectReason::Invalid(e),
                req,
            });
        }
        if self.queue.len() >= self.depth {
            return Err(Rejected {
                reason: RejectReason::Busy,
                req,
            });
        }
        self.queue.push_back((req, false));
        Ok(())
    }

    /// [`BlockBackend::abort`]: a request still queued completes at the next `poll` with
    /// [`BlockError::Aborted`], untouched.
    pub fn abort(&mut self, tag: u64) -> bool {
        match self
            .queue
            .iter_mut()
            .find(|(r, aborted)| r.tag == tag && !*aborted)
        {
            Some((_, aborted)) => {
                *aborted = true;
                true
            }
            None => false,
        }
    }

    /// [`BlockBackend::poll`]: runs every queued request against `m` and reports it.
    pub fn poll<M: Medium + ?Sized>(
        &mut self,
        m: &mut M,
        g: Geometry,
        done: &mut dyn FnMut(BlockCompletion),
    ) -> usize {
        let mut n = 0;
        // Only what was queued before this poll: a `done` callback cannot reach us anyway.
        while let Some((mut req, aborted)) = self.queue.pop_front() {
            let result = if aborted {
                Err(BlockError::Aborted)
            } else {
                execute(m, g, &mut req)
            };
            done(BlockCompletion {
                tag: req.tag,
                result,
                buf: req.buf.take(),
            });
            n += 1;
        }
        n
    }
}
