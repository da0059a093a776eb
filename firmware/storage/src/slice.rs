//! Windows over other backends, and sharing one backend among several users.

use crate::backend::*;
use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;

/// A bounds-checked window of `blocks` blocks starting at `start` of another backend. Requests
/// outside the window are refused with [`BlockError::OutOfRange`] before they reach `inner`,
/// so a slice never touches blocks outside its window.
#[derive(Debug)]
pub struct SliceBackend<B> {
    inner: B,
    start: u64,
    blocks: u64,
}

/// Errors constructing a [`SliceBackend`] or [`SharedBackend`] handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceError {
    /// The window is empty or does not fit inside the backend.
    WindowOutOfRange,
    /// A shared backend already has the maximum number of handles (256).
    TooManyHandles,
}

impl fmt::Display for SliceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SliceError::WindowOutOfRange => "window empty or outside the backend",
            SliceError::TooManyHandles => "too many handles on a shared backend",
        })
    }
}

impl<B: BlockBackend> SliceBackend<B> {
    /// A window of `blocks` blocks at `start` of `inner`.
    pub fn new(inner: B, start: u64, blocks: u64) -> Result<Self, SliceError> {
        if blocks == 0 || !inner.geometry().contains(start, blocks) {
            return Err(SliceError::WindowOutOfRange);
        }
        Ok(Self {
            inner,
            start,
            blocks,
        })
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// First block of the window in the inner backend.
    pub fn start(&self) -> u64 {
        self.start
    }
}

impl<B: BlockBackend> BlockBackend for SliceBackend<B> {
    fn geometry(&self) -> Geometry {
        Geometry {
            block_size: self.inner.geometry().block_size,
            blocks: self.blocks,
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    fn submit(&mut self, mut req: BlockRequest) -> Result<(), Rejected> {
        if let Err(e) = req.validate(self.geometry(), self.capabilities()) {
            return Err(Rejected {
                reason: RejectReason::Invalid(e),
                req,
            });
        }
        let shift = if matches!(req.op, BlockOp::Flush) {
            0
        } else {
            self.start
        };
        // Cannot overflow: validate() checked lba + blocks <= self.blocks and
        // start + self.blocks <= inner blocks.
        req.lba = req.lba.saturating_add(shift);
        self.inner.submit(req).map_err(|mut r| {
            r.req.lba = r.req.lba.saturating_sub(shift);
            r
        })
    }

    fn poll(&mut self, done: &mut dyn FnMut(BlockCompletion)) -> usize {
        self.inner.poll(done)
    }

    fn abort(&mut self, tag: u64) -> bool {
        self.inner.abort(tag)
    }

    fn moves_data_now(&self) -> NowIo {
        self.inner.moves_data_now()
    }

    fn read_now(&mut self, lba: u64, blocks: u32, dst: &mut [u8]) -> Result<(), BlockError> {
        self.geometry().check_now(lba, blocks, dst.len())?;
        self.inner.read_now(lba + self.start, blocks, dst)
    }

    fn reads_now_split(&self) -> bool {
        self.inner.reads_now_split()
    }

    fn read_now_split(
        &mut self,
        lba: u64,
        blocks: u32,
        first: &mut [u8],
        second: &mut [u8],
    ) -> Result<(), BlockError> {
        self.geometry()
            .check_now(lba, blocks, first.len() + second.len())?;
        self.inner
            .read_now_split(lba + self.start, blocks, first, second)
    }

    fn write_now(&mut self, lba: u64, blocks: u32, src: &[u8]) -> Result<(), BlockError> {
        self.geometry().check_now(lba, blocks, src.len())?;
        self.inner.write_now(lba + self.start, blocks, src)
    }
}

const HANDLE_SHIFT: u32 = 56;
const TAG_MASK: u64 = (1 << HANDLE_SHIFT) - 1;

struct Shared<B> {
    backend: B,
    stash: Vec<VecDeque<BlockCompletion>>,
    stash_capacity: usize,
}

/// One backend used by several [`SharedHandle`]s (e.g. one drive cut into per-tenant volumes
/// by wrapping each handle in a [`SliceBackend`]). Handles tag requests with their index in the
/// top 8 bits of the tag, so callers' tags must be below 2^56. A handle's `poll` delivers its
/// own completions and parks other handles' completions for them (in queues sized at handle
/// creation). Single-threaded (`Rc`), like the poll loop that owns it.
pub struct SharedBackend<B> {
    shared: Rc<RefCell<Shared<B>>>,
}

impl<B> fmt::Debug for SharedBackend<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedBackend")
    }
}

impl<B: BlockBackend> SharedBackend<B> {
    /// Shares `backend`; `max_in_flight` bounds how many completions may be parked for one
    /// handle (use the backend's queue depth).
    pub fn new(backend: B, max_in_flight: usize) -> Self {
        Self {
            shared: Rc::new(RefCell::new(Shared {
                backend,
                stash: Vec::new(),
                stash_capacity: max_in_flight,
            })),
        }
    }

    /// A new handle (configuration time: allocates its completion queue).
    pub fn handle(&self) -> Result<SharedHandle<B>, SliceError> {
        let mut s = self
            .shared
            .try_borrow_mut()
            .map_err(|_| SliceError::TooManyHandles)?;
        let id = s.stash.len();
        if id > 255 {
            return Err(SliceError::TooManyHandles);
        }
        let cap = s.stash_capacity;
        s.stash.push(VecDeque::with_capacity(cap));
        Ok(SharedHandle {
            shared: self.shared.clone(),
            id: id as u8,
        })
    }
}

/// A user of a [`SharedBackend`]; itself a [`BlockBackend`].
pub struct SharedHandle<B> {
    shared: Rc<RefCell<Shared<B>>>,
    id: u8,
}

impl<B> fmt::Debug for SharedHandle<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedHandle")
            .field("id", &self.id)
            .finish()
    }
}

impl<B: BlockBackend> BlockBackend for SharedHandle<B> {
    fn geometry(&self) -> Geometry {
        match self.shared.try_borrow() {
            Ok(s) => s.backend.geometry(),
            Err(_) => Geometry {
                block_size: 512,
                blocks: 0,
            },
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.shared
            .try_borrow()
            .map(|s| s.backend.capabilities())
            .unwrap_or_default()
    }

    fn submit(&mut self, mut req: BlockRequest) -> Result<(), Rejected> {
        if req.tag > TAG_MASK {
            return Err(Rejected {
                reason: RejectReason::Invalid(BlockError::InvalidTag),
                req,
            });
        }
        let Ok(mut s) = self.shared.try_borrow_mut() else {
            return Err(Rejected {
                reason: RejectReason::Busy,
                req,
            });
        };
        req.tag |= (self.id as u64) << HANDLE_SHIFT;
        s.backend.submit(req).map_err(|mut r| {
            r.req.tag &= TAG_MASK;
            r
        })
    }

    fn poll(&mut self, done: &mut dyn FnMut(BlockCompletion)) -> usize {
        // Collect into the stash first, then deliver with the borrow released, so `done` may
        // submit to any handle of this backend.
        let mine = self.id as usize;
        {
            let Ok(mut guard) = self.shared.try_borrow_mut() else {
                return 0;
            };
            let s = &mut *guard;
            let stash = &mut s.stash;
            s.backend.poll(&mut |mut c| {
                let owner = (c.tag >> HANDLE_SHIFT) as usize;
                c.tag &= TAG_MASK;
                if let Some(q) = stash.get_mut(owner) {
                    q.push_back(c);
                }
            });
        }
        deliver_shared(
            &self.shared,
            |s| s.stash.get_mut(mine).and_then(|q| q.pop_front()),
            done,
        )
    }

    fn abort(&mut self, tag: u64) -> bool {
        if tag > TAG_MASK {
            return false;
        }
        match self.shared.try_borrow_mut() {
            Ok(mut s) => s.backend.abort(tag | (self.id as u64) << HANDLE_SHIFT),
            Err(_) => false,
        }
    }

    fn moves_data_now(&self) -> NowIo {
        self.shared
            .try_borrow()
            .map(|s| s.backend.moves_data_now())
            .unwrap_or_default()
    }

    fn read_now(&mut self, lba: u64, blocks: u32, dst: &mut [u8]) -> Result<(), BlockError> {
        match self.shared.try_borrow_mut() {
            Ok(mut s) => s.backend.read_now(lba, blocks, dst),
            Err(_) => Err(BlockError::Internal),
        }
    }

    fn reads_now_split(&self) -> bool {
        self.shared
            .try_borrow()
            .is_ok_and(|s| s.backend.reads_now_split())
    }

    fn read_now_split(
        &mut self,
        lba: u64,
        blocks: u32,
        first: &mut [u8],
        second: &mut [u8],
    ) -> Result<(), BlockError> {
        match self.shared.try_borrow_mut() {
            Ok(mut s) => s.backend.read_now_split(lba, blocks, first, second),
            Err(_) => Err(BlockError::Internal),
        }
    }

    fn write_now(&mut self, lba: u64, blocks: u32, src: &[u8]) -> Result<(), BlockError> {
        match self.shared.try_borrow_mut() {
            Ok(mut s) => s.backend.write_now(lba, blocks, src),
            Err(_) => Err(BlockError::Internal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::IoBuf;
    use crate::ram::RamBackend;
    use proptest::prelude::*;

    #[test]
    fn synchronous_moves_through_a_shared_slice_stay_in_the_window() {
        let shared = SharedBackend::new(RamBackend::new(512, 16, 8).unwrap(), 8);
        let mut s = SliceBackend::new(shared.handle().unwrap(), 4, 8).unwrap();
        let now = NowIo {
            read: true,
            write: true,
        };
        assert_eq!(s.moves_data_now(), now);
        s.write_now(1, 2, &[7u8; 1024]).unwrap();
        let mut got = vec![0u8; 1536];
        s.read_now(0, 3, &mut got).unwrap();
        assert!(got[..512].iter().all(|&x| x == 0));
        assert!(got[512..].iter().all(|&x| x == 7));
        // Blocks 5..7 of the RAM disk: read back through a handle over all of it.
        let mut all = shared.handle().unwrap();
        let mut raw = vec![0u8; 16 * 512];
        all.read_now(0, 16, &mut raw).unwrap();
        assert!(raw.iter().enumerate().all(|(i, &x)| x
            == if (5 * 512..7 * 512).contains(&i) {
                7
            } else {
                0
            }));
        // Past the window's end, though inside the RAM disk: refused, nothing written.
        assert_eq!(s.write_now(7, 2, &[1u8; 1024]), Err(BlockError::OutOfRange));
        assert_eq!(
            s.read_now(8, 1, &mut got[..512]),
            Err(BlockError::OutOfRange)
        );
        assert_eq!(
            s.read_now(0, 2, &mut got[..512]),
            Err(BlockError::BufferTooSmall)
        );
        all.read_now(0, 16, &mut raw).unwrap();
        assert!(raw[11 * 512..].iter().all(|&x| x == 0));
    }

    #[test]
    fn window_shifts_and_refuses() {
        let ram = RamBackend::new(512, 16, 8).unwrap();
        let mut s = SliceBackend::new(ram, 4, 8).unwrap();
        assert_eq!(s.geometry().blocks, 8);
        let mut buf = IoBuf::leak_zeroed(512);
        buf.as_mut_slice().fill(9);
        s.submit(BlockRequest {
            tag: 1,
            op: BlockOp::Write { fua: false },
            lba: 0,
            blocks: 1,
            buf: Some(buf),
            buf_offset: 0,
        })
        .unwrap();
        assert_eq!(s.poll(&mut |c| assert!(c.result.is_ok())), 1);
        assert!(
            s.inner().contents()[4 * 512..5 * 512]
                .iter()
                .all(|&x| x == 9)
        );
        let r = s
            .submit(BlockRequest {
                tag: 2,
                op: BlockOp::Deallocate,
                lba: 7,
                blocks: 2,
                buf: None,
                buf_offset: 0,
            })
            .unwrap_err();
        assert_eq!(r.reason, RejectReason::Invalid(BlockError::OutOfRange));
        assert_eq!(r.req.lba, 7);
        let ram = RamBackend::new(512, 16, 8).unwrap();
        assert_eq!(
            SliceBackend::new(ram, 10, 7).unwrap_err(),
            SliceError::WindowOutOfRange
        );
    }

    #[test]
    fn shared_handles_route_completions() {
        let ram = RamBackend::new(512, 16, 8).unwrap();
        let shared = SharedBackend::new(ram, 8);
        let mut a = SliceBackend::new(shared.handle().unwrap(), 0, 8).unwrap();
        let mut b = SliceBackend::new(shared.handle().unwrap(), 8, 8).unwrap();
        for (h, tag, v) in [(&mut a, 10u64, 1u8), (&mut b, 20, 2)] {
            let mut buf = IoBuf::leak_zeroed(512);
            buf.as_mut_slice().fill(v);
            h.submit(BlockRequest {
                tag,
                op: BlockOp::Write { fua: false },
                lba: 0,
                blocks: 1,
                buf: Some(buf),
                buf_offset: 0,
            })
            .unwrap();
        }
        let mut got_a = Vec::new();
        a.poll(&mut |c| got_a.push(c.tag));
        assert_eq!(got_a, [10]);
        let mut got_b = Vec::new();
        b.poll(&mut |c| got_b.push(c.tag));
        assert_eq!(got_b, [20]);
        // Read back through b: lands at block 8 of the drive.
        let r = BlockRequest {
            tag: 1 << 56,
            op: BlockOp::Flush,
            lba: 0,
            blocks: 0,
            buf: None,
            buf_offset: 0,
        };
        assert_eq!(
            b.submit(r).unwrap_err().reason,
            RejectReason::Invalid(BlockError::InvalidTag)
        );
        b.submit(BlockRequest {
            tag: 5,
            op: BlockOp::Read,
            lba: 0,
            blocks: 1,
            buf: Some(IoBuf::leak_zeroed(512)),
            buf_offset: 0,
        })
        .unwrap();
        let mut data = Vec::new();
        b.poll(&mut |c| data.extend_from_slice(c.buf.unwrap().as_slice()));
        assert!(data.iter().all(|&x| x == 2));
        // Abort reaches the shared backend with the handle's tag, and only that handle's
        // request is aborted.
        for h in [&mut a, &mut b] {
            h.submit(BlockRequest::new(7, BlockOp::Verify, 0, 1, None))
                .unwrap();
        }
        assert!(b.abort(7));
        assert!(!b.abort(8));
        assert!(!b.abort(1 << 56));
        let mut ra = Vec::new();
        a.poll(&mut |c| ra.push((c.tag, c.result)));
        let mut rb = Vec::new();
        b.poll(&mut |c| rb.push((c.tag, c.result)));
        assert_eq!(ra, [(7, Ok(()))]);
        assert_eq!(rb, [(7, Err(BlockError::Aborted))]);
    }

    proptest! {
        /// Whatever is asked of a slice, blocks outside its window stay untouched.
        #[test]
        fn slice_never_touches_outside(start in 0u64..16, len in 1u64..16,
                                       ops in proptest::collection::vec((0u64..40, 0u32..10, 0u8..4), 1..30)) {
            prop_assume!(start + len <= 32);
            let ram = RamBackend::new(512, 32, 64).unwrap();
            let mut s = SliceBackend::new(ram, start, len).unwrap();
            for (i, (lba, n, kind)) in ops.into_iter().enumerate() {
                let op = match kind {
                    0 => BlockOp::Write { fua: false },
                    1 => BlockOp::WriteZeroes { deallocate: false, fua: false },
                    2 => BlockOp::Deallocate,
                    _ => BlockOp::Read,
                };
                let mut buf = IoBuf::leak_zeroed(n as usize * 512);
                buf.as_mut_slice().fill(0xEE);
                let r = s.submit(BlockRequest { tag: i as u64, op, lba, blocks: n, buf: Some(buf), buf_offset: 0 });
                let ok = n > 0 && lba + n as u64 <= len;
                prop_assert_eq!(r.is_ok(), ok);
                s.poll(&mut |c| assert!(c.result.is_ok()));
            }
            let c = s.inner().contents();
            let lo = start as usize * 512;
            let hi = (start + len) as usize * 512;
            prop_assert!(c[..lo].iter().all(|&x| x == 0));
            prop_assert!(c[hi..].iter().all(|&x| x == 0));
        }
    }
}
