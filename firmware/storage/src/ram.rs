//! A RAM disk.

use crate::backend::*;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::fmt;

/// Errors constructing a [`RamBackend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamError {
    /// Block size is not 512 or 4096.
    BadBlockSize,
    /// Size does not fit in memory / is zero.
    BadSize,
    /// Queue depth is zero.
    BadQueueDepth,
}

impl fmt::Display for RamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RamError::BadBlockSize => "block size must be 512 or 4096",
            RamError::BadSize => "size is zero or too large",
            RamError::BadQueueDepth => "queue depth is zero",
        })
    }
}

/// A backend over heap memory sized at construction. Requests complete in [`poll`], never in
/// [`submit`], so callers exercise the asynchronous path. Deallocated blocks read as zeroes.
///
/// [`poll`]: BlockBackend::poll
/// [`submit`]: BlockBackend::submit
#[derive(Debug)]
pub struct RamBackend {
    data: Vec<u8>,
    geometry: Geometry,
    queue: VecDeque<BlockRequest>,
    depth: usize,
}

impl RamBackend {
    /// A zeroed disk of `blocks` blocks of `block_size` bytes that holds up to `queue_depth`
    /// requests between polls.
    pub fn new(block_size: u32, blocks: u64, queue_depth: usize) -> Result<Self, RamError> {
        if block_size != 512 && block_size != 4096 {
            return Err(RamError::BadBlockSize);
        }
        if queue_depth == 0 {
            return Err(RamError::BadQueueDepth);
        }
        let len = (block_size as u64)
            .checked_mul(blocks)
            .and_then(|l| usize::try_from(l).ok())
            .filter(|&l| l > 0)
            .ok_or(RamError::BadSize)?;
        Ok(Self {
            data: alloc::vec![0u8; len],
            geometry: Geometry { block_size, blocks },
            queue: VecDeque::with_capacity(queue_depth),
            depth: queue_depth,
        })
    }

    /// Direct view of the medium (tests, diagnostics).
    pub fn contents(&self) -> &[u8] {
        &self.data
    }

    fn execute(&mut self, req: &mut BlockRequest) -> Result<(), BlockError> {
        let range = req.validate(self.geometry, self.capabilities())?;
        let bs = self.geometry.block_size as u64;
        let start = usize::try_from(req.lba * bs).map_err(|_| BlockError::OutOfRange)?;
        let len = usize::try_from(req.blocks as u64 * bs).map_err(|_| BlockError::OutOfRange)?;
        let media = self
            .data
            .get_mut(start..start.saturating_add(len))
            .ok_or(BlockError::OutOfRange)?;
        match req.op {
            BlockOp::Flush => Ok(()),
            BlockOp::WriteZeroes { .. } | BlockOp::Deallocate => {
                media.fill(0);
                Ok(())
            }
            BlockOp::Read => {
                let buf = req.buf.as_mut().ok_or(BlockError::BufferTooSmall)?;
                let dst = buf
                    .capacity_mut()
                    .get_mut(range)
                    .ok_or(BlockError::BufferTooSmall)?;
                dst.copy_from_slice(media);
                Ok(())
            }
            BlockOp::Write { .. } => {
                let buf = req.buf.as_mut().ok_or(BlockError::BufferTooSmall)?;
                let src = buf
                    .capacity_mut()
                    .get(range)
                    .ok_or(BlockError::BufferTooSmall)?;
                media.copy_from_slice(src);
                Ok(())
            }
            BlockOp::Compare => {
                let buf = req.buf.as_mut().ok_or(BlockError::BufferTooSmall)?;
                let src = buf
                    .capacity_mut()
                    .get(range)
                    .ok_or(BlockError::BufferTooSmall)?;
                if src == media {
                    Ok(())
                } else {
                    Err(BlockError::CompareMismatch)
                }
            }
        }
    }
}

impl BlockBackend for RamBackend {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            volatile_write_cache: false,
            flush: true,
            fua: true,
            write_zeroes: true,
            deallocate: true,
            deallocate_reads_zero: true,
            compare: true,
        }
    }

    fn submit(&mut self, req: BlockRequest) -> Result<(), Rejected> {
        if let Err(e) = req.validate(self.geometry, self.capabilities()) {
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
        self.queue.push_back(req);
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(BlockCompletion)) -> usize {
        let mut n = 0;
        // Only what was queued before this poll: a `done` callback cannot reach us anyway.
        while let Some(mut req) = self.queue.pop_front() {
            let result = self.execute(&mut req);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::IoBuf;
    use proptest::prelude::*;

    fn run(b: &mut RamBackend, req: BlockRequest) -> BlockCompletion {
        b.submit(req).unwrap();
        let mut out = None;
        assert_eq!(b.poll(&mut |c| out = Some(c)), 1);
        out.unwrap()
    }

    #[test]
    fn completes_in_poll_not_submit() {
        let mut b = RamBackend::new(512, 8, 2).unwrap();
        let mut buf = IoBuf::leak_zeroed(512);
        buf.as_mut_slice().fill(0xAB);
        b.submit(BlockRequest {
            tag: 7,
            op: BlockOp::Write { fua: false },
            lba: 3,
            blocks: 1,
            buf: Some(buf),
            buf_offset: 0,
        })
        .unwrap();
        assert!(b.contents()[1536..2048].iter().all(|&x| x == 0));
        let mut tags = Vec::new();
        b.poll(&mut |c| {
            assert!(c.result.is_ok());
            assert!(c.buf.is_some());
            tags.push(c.tag)
        });
        assert_eq!(tags, [7]);
        assert!(b.contents()[1536..2048].iter().all(|&x| x == 0xAB));
    }

    #[test]
    fn busy_and_invalid_return_the_request() {
        let mut b = RamBackend::new(4096, 4, 1).unwrap();
        let req = |tag, lba| BlockRequest {
            tag,
            op: BlockOp::Flush,
            lba,
            blocks: 0,
            buf: None,
            buf_offset: 0,
        };
        b.submit(req(1, 0)).unwrap();
        let r = b.submit(req(2, 0)).unwrap_err();
        assert_eq!((r.reason, r.req.tag), (RejectReason::Busy, 2));
        let r = b
            .submit(BlockRequest {
                tag: 3,
                op: BlockOp::Read,
                lba: 3,
                blocks: 2,
                buf: Some(IoBuf::leak_zeroed(8192)),
                buf_offset: 0,
            })
            .unwrap_err();
        assert_eq!(r.reason, RejectReason::Invalid(BlockError::OutOfRange));
        assert!(r.req.buf.is_some());
        let r = b
            .submit(BlockRequest {
                tag: 4,
                op: BlockOp::Read,
                lba: 0,
                blocks: 2,
                buf: Some(IoBuf::leak_zeroed(8192)),
                buf_offset: 1,
            })
            .unwrap_err();
        assert_eq!(r.reason, RejectReason::Invalid(BlockError::BufferTooSmall));
        assert_eq!(
            RamBackend::new(1024, 1, 1).unwrap_err(),
            RamError::BadBlockSize
        );
        assert_eq!(RamBackend::new(512, 0, 1).unwrap_err(), RamError::BadSize);
    }

    #[test]
    fn compare_and_zeroes() {
        let mut b = RamBackend::new(512, 4, 4).unwrap();
        let mut buf = IoBuf::leak_zeroed(1024);
        buf.as_mut_slice().fill(5);
        let c = run(
            &mut b,
            BlockRequest {
                tag: 1,
                op: BlockOp::Write { fua: true },
                lba: 1,
                blocks: 2,
                buf: Some(buf),
                buf_offset: 0,
            },
        );
        let buf = c.buf.unwrap();
        let c = run(
            &mut b,
            BlockRequest {
                tag: 2,
                op: BlockOp::Compare,
                lba: 1,
                blocks: 2,
                buf: Some(buf),
                buf_offset: 0,
            },
        );
        assert_eq!(c.result, Ok(()));
        let c = run(
            &mut b,
            BlockRequest {
                tag: 3,
                op: BlockOp::Compare,
                lba: 0,
                blocks: 2,
                buf: c.buf,
                buf_offset: 0,
            },
        );
        assert_eq!(c.result, Err(BlockError::CompareMismatch));
        let c = run(
            &mut b,
            BlockRequest {
                tag: 4,
                op: BlockOp::WriteZeroes {
                    deallocate: false,
                    fua: false,
                },
                lba: 2,
                blocks: 1,
                buf: None,
                buf_offset: 0,
            },
        );
        assert!(c.result.is_ok() && c.buf.is_none());
        assert!(b.contents()[512..1024].iter().all(|&x| x == 5));
        assert!(b.contents()[1024..1536].iter().all(|&x| x == 0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Read(u64, u32, usize),
        Write(u64, u32, usize, u8),
        Zero(u64, u32),
        Trim(u64, u32),
        Compare(u64, u32),
        Flush,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..40, 0u32..6, 0usize..3).prop_map(|(l, n, o)| Op::Read(l, n, o)),
            (0u64..40, 0u32..6, 0usize..3, any::<u8>())
                .prop_map(|(l, n, o, v)| Op::Write(l, n, o, v)),
            (0u64..40, 0u32..6).prop_map(|(l, n)| Op::Zero(l, n)),
            (0u64..40, 0u32..6).prop_map(|(l, n)| Op::Trim(l, n)),
            (0u64..40, 0u32..6).prop_map(|(l, n)| Op::Compare(l, n)),
            Just(Op::Flush),
        ]
    }

    proptest! {
        /// RamBackend behaves like a Vec<u8> model: same data, same errors.
        #[test]
        fn matches_vec_model(ops in proptest::collection::vec(op(), 1..40)) {
            const BS: usize = 512;
            const BLOCKS: u64 = 32;
            let mut b = RamBackend::new(BS as u32, BLOCKS, 64).unwrap();
            let mut model = vec![0u8; BS * BLOCKS as usize];
            for (i, o) in ops.into_iter().enumerate() {
                let (op, lba, n, off, fill) = match o {
                    Op::Read(l, n, off) => (BlockOp::Read, l, n, off * 7, None),
                    Op::Write(l, n, off, v) => (BlockOp::Write { fua: false }, l, n, off * 7, Some(v)),
                    Op::Zero(l, n) => (BlockOp::WriteZeroes { deallocate: false, fua: false }, l, n, 0, None),
                    Op::Trim(l, n) => (BlockOp::Deallocate, l, n, 0, None),
                    Op::Compare(l, n) => (BlockOp::Compare, l, n, 0, None),
                    Op::Flush => (BlockOp::Flush, 0, 0, 0, None),
                };
                let in_range = n > 0 && lba + n as u64 <= BLOCKS;
                let bytes = n as usize * BS;
                let s = lba as usize * BS;
                let mut buf = if op.has_data() { Some(IoBuf::leak_zeroed(off + bytes)) } else { None };
                if let (Some(v), Some(b)) = (fill, buf.as_mut()) {
                    b.capacity_mut()[off..].fill(v);
                }
                if matches!(op, BlockOp::Compare) && in_range {
                    buf.as_mut().unwrap().capacity_mut()[off..].copy_from_slice(&model[s..s + bytes]);
                }
                let r = b.submit(BlockRequest { tag: i as u64, op, lba, blocks: n, buf, buf_offset: off });
                let valid = in_range || matches!(op, BlockOp::Flush);
                if !valid {
                    let rej = r.unwrap_err();
                    prop_assert_eq!(rej.reason, RejectReason::Invalid(BlockError::OutOfRange));
                    continue;
                }
                prop_assert!(r.is_ok());
                let mut got = None;
                prop_assert_eq!(b.poll(&mut |c| got = Some(c)), 1);
                let c = got.unwrap();
                prop_assert_eq!(c.tag, i as u64);
                prop_assert_eq!(c.result, Ok(()));
                match op {
                    BlockOp::Read => {
                        let mut rb = c.buf.unwrap();
                        prop_assert_eq!(&rb.capacity_mut()[off..], &model[s..s + bytes]);
                    }
                    BlockOp::Write { .. } => model[s..s + bytes].fill(fill.unwrap()),
                    BlockOp::WriteZeroes { .. } | BlockOp::Deallocate => model[s..s + bytes].fill(0),
                    _ => {}
                }
                prop_assert_eq!(b.contents(), &model[..]);
            }
        }
    }
}
