//! A RAM disk.

use crate::backend::*;
use crate::memory::{self, Medium, RequestQueue};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use core::mem::MaybeUninit;
use core::ops::Range;

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

/// Bytes per lazily zeroed chunk of a [`RamBackend`].
pub const CHUNK: usize = 4096;

/// A backend over heap memory sized at construction. Requests complete in [`poll`], never in
/// [`submit`], so callers exercise the asynchronous path. Deallocated blocks read as zeroes.
///
/// The memory is allocated uninitialised and zeroed lazily, [`CHUNK`] bytes at a time, so a
/// large namespace costs nothing at boot: a bitmap records which chunks hold data; reading a
/// chunk that was never written returns zeroes without touching it; the first write into a
/// chunk zeroes the rest of that chunk first; deallocating or zeroing a whole chunk just clears
/// its bit. Invariant: every byte of a chunk whose bit is set is initialised; the bytes of
/// other chunks are never read.
///
/// [`poll`]: BlockBackend::poll
/// [`submit`]: BlockBackend::submit
pub struct RamBackend {
    mem: Box<[MaybeUninit<u8>]>,
    /// Bit `c` set: chunk `c` is initialised (and holds the disk's data); clear: reads as zeroes.
    written: Vec<u64>,
    geometry: Geometry,
    /// Accepted requests.
    queue: RequestQueue,
}

impl fmt::Debug for RamBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamBackend")
            .field("geometry", &self.geometry)
            .field("chunks_written", &self.chunks_written())
            .field("queued", &self.queue.len())
            .field("depth", &self.queue.depth())
            .finish()
    }
}

/// Writes zeroes over possibly uninitialised bytes.
fn zero(s: &mut [MaybeUninit<u8>]) {
    for b in s {
        *b = MaybeUninit::new(0);
    }
}

impl RamBackend {
    /// A disk of `blocks` blocks of `block_size` bytes that reads as zeroes and holds up to
    /// `queue_depth` requests between polls. The memory is allocated but not touched.
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
            .filter(|&l| l > 0 && l <= isize::MAX as usize)
            .ok_or(RamError::BadSize)?;
        Ok(Self {
            mem: Box::new_uninit_slice(len),
            written: alloc::vec![0u64; len.div_ceil(CHUNK).div_ceil(64)],
            geometry: Geometry { block_size, blocks },
            queue: RequestQueue::new(queue_depth),
        })
    }

    /// A copy of the whole medium (tests, diagnostics): allocates its size.
    pub fn contents(&self) -> Vec<u8> {
        let mut out = alloc::vec![0u8; self.mem.len()];
        self.read_into(0, &mut out);
        out
    }

    /// How many chunks hold written data (the rest read as zeroes without being stored).
    pub fn chunks_written(&self) -> usize {
        self.written.iter().map(|w| w.count_ones() as usize).sum()
    }

    fn is_written(&self, chunk: usize) -> bool {
        self.written[chunk / 64] & (1 << (chunk % 64)) != 0
    }

    fn set_written(&mut self, chunk: usize, on: bool) {
        let bit = 1u64 << (chunk % 64);
        if on {
            self.written[chunk / 64] |= bit;
        } else {
            self.written[chunk / 64] &= !bit;
        }
    }

    /// Calls `f(chunk, range inside the medium)` for each chunk that `[start, start + len)`
    /// overlaps, with the part of the range inside that chunk.
    fn for_each_chunk(start: usize, len: usize, mut f: impl FnMut(usize, Range<usize>)) {
        let end = start + len;
        let mut pos = start;
        while pos < end {
            let chunk = pos / CHUNK;
            let stop = end.min((chunk + 1) * CHUNK);
            f(chunk, pos..stop);
            pos = stop;
        }
    }

    /// The bytes of chunk `chunk` (the last chunk may be short).
    fn chunk_range(&self, chunk: usize) -> Range<usize> {
        chunk * CHUNK..((chunk + 1) * CHUNK).min(self.mem.len())
    }

    /// Copies the medium at `start` into `dst` (zeroes for chunks never written).
    /// `start + dst.len()` must lie inside the medium.
    fn read_into(&self, start: usize, dst: &mut [u8]) {
        Self::for_each_chunk(start, dst.len(), |chunk, r| {
            let d = &mut dst[r.start - start..r.end - start];
            if self.is_written(chunk) {
                let src = &self.mem[r];
                // SAFETY: the chunk's bit is set, so every byte of the chunk, `src` included,
                // has been initialised (the invariant of the type).
                d.copy_from_slice(unsafe { src.assume_init_ref() });
            } else {
                d.fill(0);
            }
        });
    }

    /// Copies `src` onto the medium at `start`; `start + src.len()` must lie inside it.
    fn write_from(&mut self, start: usize, src: &[u8]) {
        Self::for_each_chunk(start, src.len(), |chunk, r| {
            let s = &src[r.start - start..r.end - start];
            if !self.is_written(chunk) {
                // First write into the chunk: zero the rest of it so the whole chunk is
                // initialised before its bit is set.
                let whole = self.chunk_range(chunk);
                zero(&mut self.mem[whole.start..r.start]);
                zero(&mut self.mem[r.end..whole.end]);
                self.set_written(chunk, true);
            }
            self.mem[r].write_copy_of_slice(s);
        });
    }

    /// Zeroes `[start, start + len)`: whole chunks are forgotten (they read as zeroes again),
    /// written chunks that are only partly covered are zeroed in place.
    fn zero_range(&mut self, start: usize, len: usize) {
        Self::for_each_chunk(start, len, |chunk, r| {
            if !self.is_written(chunk) {
                return;
            }
            if r == self.chunk_range(chunk) {
                self.set_written(chunk, false);
            } else {
                zero(&mut self.mem[r]);
            }
        });
    }

    /// True when the medium at `start` equals `data`.
    fn equals(&self, start: usize, data: &[u8]) -> bool {
        let mut same = true;
        Self::for_each_chunk(start, data.len(), |chunk, r| {
            let d = &data[r.start - start..r.end - start];
            same &= if self.is_written(chunk) {
                let m = &self.mem[r];
                // SAFETY: the chunk's bit is set: all its bytes are initialised.
                d == unsafe { m.assume_init_ref() }
            } else {
                d.iter().all(|&b| b == 0)
            };
        });
        same
    }
}

impl Medium for RamBackend {
    fn len(&self) -> usize {
        self.mem.len()
    }
    fn read_into(&self, start: usize, dst: &mut [u8]) {
        RamBackend::read_into(self, start, dst)
    }
    fn write_from(&mut self, start: usize, src: &[u8]) {
        RamBackend::write_from(self, start, src)
    }
    fn zero_range(&mut self, start: usize, len: usize) {
        RamBackend::zero_range(self, start, len)
    }
    fn equals(&self, start: usize, data: &[u8]) -> bool {
        RamBackend::equals(self, start, data)
    }
}

impl BlockBackend for RamBackend {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn capabilities(&self) -> Capabilities {
        memory::CAPABILITIES
    }

    fn submit(&mut self, req: BlockRequest) -> Result<(), Rejected> {
        self.queue.submit(self.geometry, req)
    }

    fn moves_data_now(&self) -> NowIo {
        NowIo {
            read: true,
            write: true,
        }
    }

    fn read_now(&mut self, lba: u64, blocks: u32, dst: &mut [u8]) -> Result<(), BlockError> {
        let start = memory::now_start(self.geometry, lba, blocks, dst.len())?;
        self.read_into(start, dst);
        Ok(())
    }

    fn reads_now_split(&self) -> bool {
        true
    }

    fn read_now_split(
        &mut self,
        lba: u64,
        blocks: u32,
        first: &mut [u8],
        second: &mut [u8],
    ) -> Result<(), BlockError> {
        let start = memory::now_start(self.geometry, lba, blocks, first.len() + second.len())?;
        self.read_into(start, first);
        self.read_into(start + first.len(), second);
        Ok(())
    }

    fn write_now(&mut self, lba: u64, blocks: u32, src: &[u8]) -> Result<(), BlockError> {
        let start = memory::now_start(self.geometry, lba, blocks, src.len())?;
        self.write_from(start, src);
        Ok(())
    }

    /// A request still queued (not yet executed by `poll`) is taken out of the queue and
    /// completes at the next `poll` with [`BlockError::Aborted`], untouched.
    fn abort(&mut self, tag: u64) -> bool {
        self.queue.abort(tag)
    }

    fn poll(&mut self, done: &mut dyn FnMut(BlockCompletion)) -> usize {
        let g = self.geometry;
        // The queue runs its requests against the rest of `self`: taken out meanwhile (an
        // empty queue in its place allocates nothing).
        let mut queue = core::mem::replace(&mut self.queue, RequestQueue::new(0));
        let n = queue.poll(self, g, done);
        self.queue = queue;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::IoBuf;
    use proptest::prelude::*;

    /// A read into two pieces gets the bytes a read into one gets, cut anywhere, written
    /// chunks and never-written ones (zeroes) alike; a wrong total length is refused.
    #[test]
    fn reads_into_two_pieces_match_reads_into_one() {
        let mut b = RamBackend::new(512, 64, 8).unwrap();
        assert!(b.reads_now_split());
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 11 + 1) as u8).collect();
        b.write_now(8, 8, &data).unwrap();
        // Blocks 4..20: 2 KiB never written, 4 KiB written, 2 KiB never written.
        let mut whole = vec![0xEEu8; 8192];
        b.read_now(4, 16, &mut whole).unwrap();
        assert_eq!(&whole[2048..6144], &data[..]);
        for cut in [0, 1, 100, 2047, 2048, 2049, 4096, 6143, 6144, 8191, 8192] {
            let mut got = vec![0xEEu8; 8192];
            let (first, second) = got.split_at_mut(cut);
            b.read_now_split(4, 16, first, second).unwrap();
            assert_eq!(got, whole, "cut at {cut}");
        }
        let (mut x, mut y) = (vec![0u8; 100], vec![0u8; 100]);
        assert!(b.read_now_split(4, 16, &mut x, &mut y).is_err());
    }

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

    #[test]
    fn verify_and_abort() {
        let mut b = RamBackend::new(512, 8, 4).unwrap();
        let req = |tag, op, lba, blocks| BlockRequest::new(tag, op, lba, blocks, None);
        assert_eq!(run(&mut b, req(1, BlockOp::Verify, 0, 8)).result, Ok(()));
        let r = b.submit(req(2, BlockOp::Verify, 7, 2)).unwrap_err();
        assert_eq!(r.reason, RejectReason::Invalid(BlockError::OutOfRange));
        // Aborting a queued request: it completes at the next poll as Aborted and the
        // medium is untouched; the others run; an unknown or finished tag is refused.
        let mut buf = IoBuf::leak_zeroed(512);
        buf.as_mut_slice().fill(0x77);
        let w = BlockOp::Write { fua: false };
        b.submit(BlockRequest::new(3, w, 2, 1, Some(buf))).unwrap();
        b.submit(req(4, BlockOp::Flush, 0, 0)).unwrap();
        assert!(b.abort(3));
        assert!(!b.abort(3), "already aborted");
        assert!(!b.abort(99));
        let mut got = Vec::new();
        b.poll(&mut |c| got.push((c.tag, c.result, c.buf.is_some())));
        assert_eq!(
            got,
            [(3, Err(BlockError::Aborted), true), (4, Ok(()), false)]
        );
        assert!(b.contents().iter().all(|&x| x == 0));
        assert!(!b.abort(4), "completed");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Read(u64, u32, usize),
        Write(u64, u32, usize, u8),
        Zero(u64, u32),
        Trim(u64, u32),
        Compare(u64, u32),
        Flush,
        /// `read_now` (None) or `write_now` of a byte value, with the length off by `i8`.
        Now(u64, u32, Option<u8>, i8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..40, 0u32..12, 0usize..3).prop_map(|(l, n, o)| Op::Read(l, n, o)),
            (0u64..40, 0u32..12, 0usize..3, any::<u8>())
                .prop_map(|(l, n, o, v)| Op::Write(l, n, o, v)),
            (0u64..40, 0u32..12).prop_map(|(l, n)| Op::Zero(l, n)),
            (0u64..40, 0u32..12).prop_map(|(l, n)| Op::Trim(l, n)),
            (0u64..40, 0u32..12).prop_map(|(l, n)| Op::Compare(l, n)),
            Just(Op::Flush),
            (
                0u64..40,
                0u32..12,
                any::<Option<u8>>(),
                prop_oneof![4 => Just(0i8), 1 => -1i8..=1]
            )
                .prop_map(|(l, n, v, d)| Op::Now(l, n, v, d)),
        ]
    }

    fn io(b: &mut RamBackend, op: BlockOp, lba: u64, blocks: u32, data: Option<u8>) -> Vec<u8> {
        let buf = op.has_data().then(|| {
            let mut buf = IoBuf::leak_zeroed(blocks as usize * b.geometry().block_size as usize);
            buf.capacity_mut().fill(data.unwrap_or(0));
            buf
        });
        let c = run(
            b,
            BlockRequest {
                tag: 0,
                op,
                lba,
                blocks,
                buf,
                buf_offset: 0,
            },
        );
        assert_eq!(c.result, Ok(()));
        c.buf
            .map(|mut b| b.capacity_mut().to_vec())
            .unwrap_or_default()
    }

    #[test]
    fn zeroed_lazily_by_chunk() {
        // 1 GiB: allocated, never touched unless written.
        let mut b = RamBackend::new(4096, 1 << 18, 4).unwrap();
        assert_eq!(b.chunks_written(), 0);
        assert!(
            io(&mut b, BlockOp::Read, 12345, 8, None)
                .iter()
                .all(|&x| x == 0)
        );
        assert_eq!(b.chunks_written(), 0, "reads store nothing");
        io(&mut b, BlockOp::Write { fua: false }, 100, 2, Some(7));
        assert_eq!(b.chunks_written(), 2);
        assert!(
            io(&mut b, BlockOp::Read, 100, 2, None)
                .iter()
                .all(|&x| x == 7)
        );
        io(&mut b, BlockOp::Deallocate, 100, 1, None);
        assert_eq!(
            b.chunks_written(),
            1,
            "a whole deallocated chunk is forgotten"
        );
        let r = io(&mut b, BlockOp::Read, 99, 3, None);
        assert!(r[..8192].iter().all(|&x| x == 0) && r[8192..].iter().all(|&x| x == 7));

        // 512-byte blocks: the first write into a chunk zeroes the rest of the chunk.
        let mut b = RamBackend::new(512, 16, 4).unwrap();
        io(&mut b, BlockOp::Write { fua: false }, 3, 1, Some(9));
        assert_eq!(b.chunks_written(), 1);
        let r = io(&mut b, BlockOp::Read, 0, 16, None);
        assert!(
            r.iter()
                .enumerate()
                .all(|(i, &x)| x == if (1536..2048).contains(&i) { 9 } else { 0 })
        );
        io(
            &mut b,
            BlockOp::WriteZeroes {
                deallocate: false,
                fua: false,
            },
            2,
            2,
            None,
        );
        assert_eq!(b.chunks_written(), 1, "a partly zeroed chunk stays");
        assert!(b.contents().iter().all(|&x| x == 0));
        io(
            &mut b,
            BlockOp::WriteZeroes {
                deallocate: true,
                fua: false,
            },
            0,
            8,
            None,
        );
        assert_eq!(b.chunks_written(), 0);
    }

    proptest! {
        /// RamBackend behaves like a Vec<u8> model: same data, same errors. The disk spans a
        /// few chunks (its last one short for 35 blocks) so requests start, end and cross
        /// chunk boundaries anywhere.
        #[test]
        fn matches_vec_model(
            short_tail in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            const BS: usize = 512;
            let blocks: u64 = if short_tail { 35 } else { 32 };
            let mut b = RamBackend::new(BS as u32, blocks, 64).unwrap();
            let mut model = vec![0u8; BS * blocks as usize];
            for (i, o) in ops.into_iter().enumerate() {
                if let Op::Now(lba, n, v, d) = o {
                    // Synchronous moves: the same data and the same range check as through
                    // submit, and a length that is not exactly the blocks' is refused.
                    let in_range = n > 0 && lba + n as u64 <= blocks;
                    let s = lba as usize * BS;
                    let len = (n as usize * BS).saturating_add_signed(d as isize);
                    let mut data = vec![v.unwrap_or(0xEE); len];
                    let before = b.contents();
                    let r = match v {
                        Some(_) => b.write_now(lba, n, &data),
                        None => b.read_now(lba, n, &mut data),
                    };
                    if !in_range {
                        prop_assert_eq!(r, Err(BlockError::OutOfRange));
                    } else if d != 0 {
                        prop_assert_eq!(r, Err(BlockError::BufferTooSmall));
                    } else {
                        prop_assert_eq!(r, Ok(()));
                        match v {
                            Some(x) => model[s..s + len].fill(x),
                            None => prop_assert_eq!(&data[..], &model[s..s + len]),
                        }
                    }
                    if r.is_err() {
                        prop_assert_eq!(b.contents(), before, "nothing written on error");
                    }
                    prop_assert_eq!(b.contents(), &model[..]);
                    continue;
                }
                let (op, lba, n, off, fill) = match o {
                    Op::Read(l, n, off) => (BlockOp::Read, l, n, off * 7, None),
                    Op::Write(l, n, off, v) => (BlockOp::Write { fua: false }, l, n, off * 7, Some(v)),
                    Op::Zero(l, n) => (BlockOp::WriteZeroes { deallocate: false, fua: false }, l, n, 0, None),
                    Op::Trim(l, n) => (BlockOp::Deallocate, l, n, 0, None),
                    Op::Compare(l, n) => (BlockOp::Compare, l, n, 0, None),
                    Op::Flush => (BlockOp::Flush, 0, 0, 0, None),
                    Op::Now(..) => unreachable!("handled above"),
                };
                let in_range = n > 0 && lba + n as u64 <= blocks;
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
                prop_assert!(b.chunks_written() <= blocks as usize * BS / CHUNK + 1);
            }
        }
    }
}
