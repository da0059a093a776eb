//! A RAM namespace every core serves: one zeroed region of memory, reached through a
//! [`SharedRam`] handle per core (each with its own request queue), so the I/O queues of
//! one namespace on different cores read and write the same blocks with no lock and no
//! message between the cores.
//!
//! Concurrency: handles copy bytes in and out of the region with raw-pointer copies only (no
//! Rust reference to the medium is ever formed). Different blocks are different bytes, so
//! commands on different LBAs never interfere. Commands on the same LBA at the same time
//! from two cores race as they do on any NVMe device with several queues (NVMe base 2.0
//! §3.4.4: no ordering between commands of different queues): a read may see a mix of the
//! old and new data of a write in flight, blocks are never torn beyond that, and no byte
//! value is invalid for `u8`. Ordering the two is the host's business.

use alloc::boxed::Box;
use alloc::sync::Arc;
use keel_storage::memory::{self, Medium, RequestQueue};
use keel_storage::{
    BlockBackend, BlockCompletion, BlockError, BlockRequest, Capabilities, Geometry, NowIo,
    Rejected,
};

/// The bytes of a region: a heap allocation reached only through raw-pointer copies, freed
/// when the last [`Region`] (description or handle, on any core) referring to it is dropped.
#[derive(Debug)]
struct Mem {
    base: *mut u8,
    len: usize,
}

// SAFETY: `Mem` owns its allocation (nothing else frees it) and every access to the bytes
// goes through raw-pointer copies (see the module documentation for the races they allow);
// the one heap is shared by every core (`keel_hal::heap`), so the last owner may free it on
// any core.
unsafe impl Send for Mem {}
// SAFETY: as for `Send`: shared access never forms a reference to the bytes.
unsafe impl Sync for Mem {}

impl Drop for Mem {
    fn drop(&mut self) {
        let slice = core::ptr::slice_from_raw_parts_mut(self.base, self.len);
        // SAFETY: `base`/`len` are the leaked boxed slice of `Region::new`, and this is its
        // last owner (the `Arc` count reached zero): no handle on any core can reach it any
        // more.
        drop(unsafe { Box::from_raw(slice) });
    }
}

/// The region of a shared RAM namespace: `len` zeroed bytes, shared by every core's
/// description and handles (reference-counted: the memory is freed when the last of them,
/// on whichever core, is dropped, for instance once a namespace removed live is gone from
/// core 0's target and from every other core's replica).
#[derive(Debug, Clone)]
pub struct Region {
    mem: Arc<Mem>,
    geometry: Geometry,
}

impl Region {
    /// Allocates `blocks` zeroed blocks of `block_size` bytes, or `None` if the size is
    /// unusable (block size not 512 or 4096, zero or too large).
    pub fn new(block_size: u32, blocks: u64) -> Option<Self> {
        if block_size != 512 && block_size != 4096 {
            return None;
        }
        let len = u64::from(block_size)
            .checked_mul(blocks)
            .and_then(|l| usize::try_from(l).ok())
            .filter(|&l| l > 0 && l <= isize::MAX as usize)?;
        let mem: &'static mut [u8] = Box::leak(alloc::vec![0u8; len].into_boxed_slice());
        Some(Self {
            mem: Arc::new(Mem {
                base: mem.as_mut_ptr(),
                len,
            }),
            geometry: Geometry { block_size, blocks },
        })
    }

    /// Whether the memory is still there (tests: a weak reference to it).
    #[cfg(test)]
    pub fn watch(&self) -> alloc::sync::Weak<impl Sized + use<>> {
        Arc::downgrade(&self.mem)
    }

    /// A handle with its own queue of `depth` requests.
    pub fn handle(&self, depth: usize) -> SharedRam {
        SharedRam {
            region: self.clone(),
            queue: RequestQueue::new(depth.max(1)),
        }
    }

    /// Byte range of `blocks` blocks at `lba`, checked against the region.
    fn span(&self, lba: u64, blocks: u64) -> Result<(usize, usize), BlockError> {
        let bs = u64::from(self.geometry.block_size);
        let start = lba.checked_mul(bs).ok_or(BlockError::OutOfRange)?;
        let len = blocks.checked_mul(bs).ok_or(BlockError::OutOfRange)?;
        let end = start.checked_add(len).ok_or(BlockError::OutOfRange)?;
        if end > self.mem.len as u64 {
            return Err(BlockError::OutOfRange);
        }
        Ok((start as usize, len as usize))
    }

    fn read(&self, start: usize, dst: &mut [u8]) {
        // SAFETY: `span` checked `start + dst.len()` lies inside the region, alive while `self`
        // holds it; `dst` is the caller's own memory, which cannot overlap the region (nobody holds a
        // reference into it). Concurrent writers: see the module documentation.
        unsafe {
            core::ptr::copy_nonoverlapping(self.mem.base.add(start), dst.as_mut_ptr(), dst.len())
        }
    }

    fn write(&self, start: usize, src: &[u8]) {
        // SAFETY: as in `read`, with `src` as the caller's memory.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), self.mem.base.add(start), src.len()) }
    }

    fn zero(&self, start: usize, len: usize) {
        // SAFETY: `span` checked the range lies inside the region.
        unsafe { core::ptr::write_bytes(self.mem.base.add(start), 0, len) }
    }

    fn equals(&self, start: usize, data: &[u8]) -> bool {
        let mut chunk = [0u8; 512];
        data.chunks(chunk.len()).enumerate().all(|(i, d)| {
            let c = &mut chunk[..d.len()];
            self.read(start + i * 512, c);
            c == d
        })
    }
}

impl Medium for Region {
    fn len(&self) -> usize {
        self.mem.len
    }
    fn read_into(&self, start: usize, dst: &mut [u8]) {
        self.read(start, dst)
    }
    fn write_from(&mut self, start: usize, src: &[u8]) {
        self.write(start, src)
    }
    fn zero_range(&mut self, start: usize, len: usize) {
        self.zero(start, len)
    }
    fn equals(&self, start: usize, data: &[u8]) -> bool {
        Region::equals(self, start, data)
    }
}

/// One core's handle on a shared RAM namespace: a [`BlockBackend`] whose requests complete
/// in `poll`, and that reads and writes at once for the direct paths.
#[derive(Debug)]
pub struct SharedRam {
    region: Region,
    queue: RequestQueue,
}

impl BlockBackend for SharedRam {
    fn geometry(&self) -> Geometry {
        self.region.geometry
    }

    fn capabilities(&self) -> Capabilities {
        memory::CAPABILITIES
    }

    fn submit(&mut self, req: BlockRequest) -> Result<(), Rejected> {
        self.queue.submit(self.region.geometry, req)
    }

    fn moves_data_now(&self) -> NowIo {
        NowIo {
            read: true,
            write: true,
        }
    }

    fn read_now(&mut self, lba: u64, blocks: u32, dst: &mut [u8]) -> Result<(), BlockError> {
        let start = memory::now_start(self.region.geometry, lba, blocks, dst.len())?;
        self.region.span(lba, u64::from(blocks))?;
        self.region.read(start, dst);
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
        let len = first.len() + second.len();
        let start = memory::now_start(self.region.geometry, lba, blocks, len)?;
        self.region.span(lba, u64::from(blocks))?;
        self.region.read(start, first);
        self.region.read(start + first.len(), second);
        Ok(())
    }

    fn write_now(&mut self, lba: u64, blocks: u32, src: &[u8]) -> Result<(), BlockError> {
        let start = memory::now_start(self.region.geometry, lba, blocks, src.len())?;
        self.region.span(lba, u64::from(blocks))?;
        self.region.write(start, src);
        Ok(())
    }

    fn abort(&mut self, tag: u64) -> bool {
        self.queue.abort(tag)
    }

    fn poll(&mut self, done: &mut dyn FnMut(BlockCompletion)) -> usize {
        let g = self.region.geometry;
        self.queue.poll(&mut self.region, g, done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_storage::{BlockOp, IoBuf, RejectReason};

    fn run(
        b: &mut SharedRam,
        op: BlockOp,
        lba: u64,
        blocks: u32,
        buf: Option<IoBuf>,
    ) -> BlockCompletion {
        b.submit(BlockRequest {
            tag: 1,
            op,
            lba,
            blocks,
            buf,
            buf_offset: 0,
        })
        .unwrap();
        let mut out = None;
        assert_eq!(b.poll(&mut |c| out = Some(c)), 1);
        out.unwrap()
    }

    #[test]
    fn handles_see_one_medium() {
        let r = Region::new(512, 16).unwrap();
        let (mut a, mut b) = (r.handle(4), r.handle(4));
        let mut w = IoBuf::leak_zeroed(1024);
        w.as_mut_slice().fill(0x5A);
        assert!(
            run(&mut a, BlockOp::Write { fua: false }, 3, 2, Some(w))
                .result
                .is_ok()
        );
        let c = run(&mut b, BlockOp::Read, 3, 2, Some(IoBuf::leak_zeroed(1024)));
        assert!(c.result.is_ok());
        assert!(c.buf.unwrap().as_slice().iter().all(|&x| x == 0x5A));
        let mut d = [1u8; 512];
        b.read_now(2, 1, &mut d).unwrap();
        assert_eq!(d, [0u8; 512], "never written reads as zeroes");
        b.write_now(15, 1, &[7u8; 512]).unwrap();
        let mut e = [0u8; 512];
        a.read_now(15, 1, &mut e).unwrap();
        assert_eq!(e, [7u8; 512]);
        assert!(run(&mut a, BlockOp::Deallocate, 15, 1, None).result.is_ok());
        b.read_now(15, 1, &mut e).unwrap();
        assert_eq!(e, [0u8; 512]);
        let mut cmp = IoBuf::leak_zeroed(512);
        cmp.as_mut_slice().fill(0x5A);
        assert!(
            run(&mut b, BlockOp::Compare, 4, 1, Some(cmp))
                .result
                .is_ok()
        );
    }

    #[test]
    fn the_memory_goes_with_the_last_handle() {
        let r = Region::new(512, 8).unwrap();
        let w = r.watch();
        let mut h = r.handle(1);
        drop(r);
        assert!(w.upgrade().is_some(), "a handle keeps it");
        h.write_now(7, 1, &[3u8; 512]).unwrap();
        let mut d = [0u8; 512];
        h.read_now(7, 1, &mut d).unwrap();
        assert_eq!(d, [3u8; 512]);
        drop(h);
        assert!(w.upgrade().is_none(), "freed with the last handle");
    }

    #[test]
    fn out_of_range_and_bad_sizes_are_refused() {
        assert!(Region::new(1000, 4).is_none());
        assert!(Region::new(512, 0).is_none());
        let mut h = Region::new(4096, 4).unwrap().handle(1);
        let mut d = [0u8; 4096];
        assert_eq!(h.read_now(4, 1, &mut d), Err(BlockError::OutOfRange));
        assert_eq!(h.read_now(u64::MAX, 1, &mut d), Err(BlockError::OutOfRange));
        assert!(h.write_now(3, 1, &[0u8; 100]).is_err());
        let r = h
            .submit(BlockRequest {
                tag: 2,
                op: BlockOp::Read,
                lba: 3,
                blocks: 2,
                buf: Some(IoBuf::leak_zeroed(8192)),
                buf_offset: 0,
            })
            .unwrap_err();
        assert_eq!(r.reason, RejectReason::Invalid(BlockError::OutOfRange));
    }
}
