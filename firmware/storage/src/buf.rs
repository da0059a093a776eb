//! DMA-capable data buffers.

use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;
use core::mem::MaybeUninit;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering};

/// A data buffer that moves by value between transport, controller and backend.
///
/// It owns `&'static mut [u8]` memory (so it can be held across polls by an asynchronous
/// backend), the address a device would DMA to (`dma_addr`, supplied by whoever created the
/// memory) and a valid length `len <= capacity`.
///
/// The memory is kept as a raw pointer, not as a `&mut [u8]`: while a command is outstanding
/// a device reads or writes it behind the program's back, and a live (if untouched) mutable
/// reference to memory something else writes is undefined behaviour (Miri reports it for the
/// NVMe driver's fake device under Stacked and Tree Borrows). References exist only for the
/// duration of [`IoBuf::as_slice`] / [`IoBuf::as_mut_slice`] / [`IoBuf::capacity_mut`]
/// borrows; [`IoBuf::as_mut_ptr`] gives the pointer a DMA engine (or a fake device) uses.
pub struct IoBuf {
    ptr: NonNull<u8>,
    cap: usize,
    dma_addr: u64,
    len: usize,
    pool: u32,
    _mem: PhantomData<&'static mut [u8]>,
}

// SAFETY: an `IoBuf` owns its memory exclusively (it was a `&'static mut [u8]`), exactly like
// the `&'static mut [u8]` it replaces, which is `Send` and `Sync`.
#[allow(unsafe_code)]
unsafe impl Send for IoBuf {}
// SAFETY: see `Send`; shared access only reads.
#[allow(unsafe_code)]
unsafe impl Sync for IoBuf {}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("dma_addr", &self.dma_addr)
            .field("len", &self.len)
            .field("capacity", &self.cap)
            .field("pool", &self.pool)
            .finish()
    }
}

impl IoBuf {
    /// A buffer over `mem` whose first byte a device reaches at `dma_addr`. Valid length =
    /// capacity. Not owned by any pool.
    pub fn new(mem: &'static mut [u8], dma_addr: u64) -> Self {
        let cap = mem.len();
        Self {
            ptr: NonNull::from(mem).cast::<u8>(),
            cap,
            dma_addr,
            len: cap,
            pool: 0,
            _mem: PhantomData,
        }
    }

    /// A zeroed heap buffer of `len` bytes, leaked so it lives forever (configuration time and
    /// tests only; DMA address = 0).
    pub fn leak_zeroed(len: usize) -> Self {
        let mem = alloc::vec![0u8; len].leak();
        Self::new(mem, 0)
    }

    /// Total size of the memory.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Number of valid bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no byte is valid.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the valid length, clamped to the capacity; returns the new length.
    pub fn set_len(&mut self, len: usize) -> usize {
        self.len = len.min(self.cap);
        self.len
    }

    /// Device address of the first byte.
    pub fn dma_addr(&self) -> u64 {
        self.dma_addr
    }

    /// The valid bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `cap >= len` bytes for 'static (it came from a
        // `&'static mut [u8]` this buffer owns), and the shared borrow of `self` keeps every
        // mutable access through `self` away for the slice's lifetime.
        #[allow(unsafe_code)]
        unsafe {
            core::slice::from_raw_parts(self.ptr.as_ptr(), self.len)
        }
    }

    /// The valid bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.capacity_mut()[..len]
    }

    /// The whole memory regardless of the valid length (to receive data).
    pub fn capacity_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, for `cap` bytes; the exclusive borrow of `self` makes this
        // the only reference to the memory for the slice's lifetime.
        #[allow(unsafe_code)]
        unsafe {
            core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap)
        }
    }

    /// The first byte, for a DMA engine or a device model: valid for `capacity()` bytes of
    /// reads and writes while no slice of this buffer is borrowed.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Identifier of the pool this buffer belongs to (0 = none).
    pub fn pool_id(&self) -> u32 {
        self.pool
    }
}

/// The valid bytes (what a transport sends from or receives into).
impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// The valid bytes, mutable.
impl AsMut<[u8]> for IoBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

/// Errors of [`BufPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolError {
    /// The buffer size is zero.
    ZeroSize,
    /// The region is smaller than one buffer.
    RegionTooSmall,
    /// The buffer was not carved by this pool.
    ForeignBuffer,
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolError::ZeroSize => "buffer size is zero",
            PoolError::RegionTooSmall => "region smaller than one buffer",
            PoolError::ForeignBuffer => "buffer does not belong to this pool",
        })
    }
}

static NEXT_POOL_ID: AtomicU32 = AtomicU32::new(1);

/// A fixed set of equally sized buffers carved from one region. `get`/`put` are O(1) and
/// never allocate (the free list's capacity is reserved at construction).
///
/// A pool made with [`BufPool::new`] carves an initialised region at once; one made with
/// [`BufPool::lazy`] takes uninitialised memory and zeroes and carves a buffer only when `get`
/// finds no free one, so building a large pool costs nothing at boot (each buffer is zeroed
/// once, the first time it is needed).
#[derive(Debug)]
pub struct BufPool {
    id: u32,
    buf_size: usize,
    count: usize,
    free: Vec<IoBuf>,
    /// Memory not carved yet (lazy pools) and the device address of its first byte.
    uncarved: &'static mut [MaybeUninit<u8>],
    uncarved_dma: u64,
}

impl BufPool {
    /// Carves `region` (device address `dma_base`) into `region.len() / buf_size` buffers;
    /// any tail smaller than a buffer is unused.
    pub fn new(
        region: &'static mut [u8],
        dma_base: u64,
        buf_size: usize,
    ) -> Result<Self, PoolError> {
        let (id, count) = Self::identify(region.len(), buf_size)?;
        let mut free = Vec::with_capacity(count);
        let mut rest: &'static mut [u8] = region;
        let mut addr = dma_base;
        for _ in 0..count {
            let (chunk, tail) = core::mem::take(&mut rest).split_at_mut(buf_size);
            rest = tail;
            let mut b = IoBuf::new(chunk, addr);
            b.pool = id;
            free.push(b);
            addr = addr.wrapping_add(buf_size as u64);
        }
        // Hand out low addresses first.
        free.reverse();
        Ok(Self {
            id,
            buf_size,
            count,
            free,
            uncarved: &mut [],
            uncarved_dma: 0,
        })
    }

    /// A new pool's id and buffer count for a region of `len` bytes.
    fn identify(len: usize, buf_size: usize) -> Result<(u32, usize), PoolError> {
        if buf_size == 0 {
            return Err(PoolError::ZeroSize);
        }
        let count = len / buf_size;
        if count == 0 {
            return Err(PoolError::RegionTooSmall);
        }
        Ok((NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed).max(1), count))
    }

    /// A pool of `region.len() / buf_size` buffers over uninitialised memory (device address
    /// `dma_base`): nothing is touched now; `get` zeroes and carves a buffer when the free list
    /// is empty.
    pub fn lazy(
        region: &'static mut [MaybeUninit<u8>],
        dma_base: u64,
        buf_size: usize,
    ) -> Result<Self, PoolError> {
        let (id, count) = Self::identify(region.len(), buf_size)?;
        Ok(Self {
            id,
            buf_size,
            count,
            free: Vec::with_capacity(count),
            uncarved: region,
            uncarved_dma: dma_base,
        })
    }

    /// Zeroes and carves the next buffer of a lazy pool.
    fn carve(&mut self) -> Option<IoBuf> {
        if self.uncarved.len() < self.buf_size {
            return None;
        }
        let (chunk, rest) = core::mem::take(&mut self.uncarved).split_at_mut(self.buf_size);
        self.uncarved = rest;
        chunk.fill(MaybeUninit::new(0));
        // SAFETY: every byte of `chunk` was initialised just above, and `MaybeUninit<u8>` has
        // the layout of `u8`; the chunk is borrowed for 'static and handed over whole.
        #[allow(unsafe_code)]
        let mem = unsafe { &mut *(core::ptr::from_mut(chunk) as *mut [u8]) };
        let mut b = IoBuf::new(mem, self.uncarved_dma);
        b.pool = self.id;
        self.uncarved_dma = self.uncarved_dma.wrapping_add(self.buf_size as u64);
        Some(b)
    }

    /// A pool over leaked, zeroed heap memory (configuration time and tests).
    pub fn from_heap(count: usize, buf_size: usize, dma_base: u64) -> Result<Self, PoolError> {
        let len = count
            .checked_mul(buf_size)
            .ok_or(PoolError::RegionTooSmall)?;
        Self::new(alloc::vec![0u8; len].leak(), dma_base, buf_size)
    }

    /// Takes a buffer, valid length set to the full buffer size.
    pub fn get(&mut self) -> Option<IoBuf> {
        let mut b = match self.free.pop() {
            Some(b) => b,
            None => self.carve()?,
        };
        b.len = b.cap;
        Some(b)
    }

    /// Returns a buffer. A buffer from another pool is handed back in the error.
    pub fn put(&mut self, buf: IoBuf) -> Result<(), (PoolError, IoBuf)> {
        if buf.pool != self.id || self.free.len() >= self.count {
            return Err((PoolError::ForeignBuffer, buf));
        }
        self.free.push(buf);
        Ok(())
    }

    /// Whether `buf` was carved by this pool.
    pub fn owns(&self, buf: &IoBuf) -> bool {
        buf.pool == self.id
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Total number of buffers.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Buffers currently free (including those of a lazy pool not carved yet).
    pub fn available(&self) -> usize {
        self.free.len() + self.uncarved.len() / self.buf_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_pool_carves_zeroed_buffers_on_demand() {
        let region = alloc::boxed::Box::<[u8]>::new_uninit_slice(3 * 4096 + 100);
        let region: &'static mut [MaybeUninit<u8>] = alloc::boxed::Box::leak(region);
        let mut p = BufPool::lazy(region, 0x9000_0000, 4096).unwrap();
        assert_eq!((p.count(), p.available()), (3, 3));
        let mut a = p.get().unwrap();
        assert_eq!((a.dma_addr(), a.len()), (0x9000_0000, 4096));
        assert!(a.as_slice().iter().all(|&x| x == 0));
        a.as_mut_slice().fill(0xAB);
        assert_eq!(p.available(), 2);
        // A returned buffer is reused before new memory is carved.
        p.put(a).unwrap();
        let a = p.get().unwrap();
        assert_eq!(a.dma_addr(), 0x9000_0000);
        assert_eq!(a.as_slice()[0], 0xAB, "recycled, not re-zeroed");
        let b = p.get().unwrap();
        let c = p.get().unwrap();
        assert_eq!((b.dma_addr(), c.dma_addr()), (0x9000_1000, 0x9000_2000));
        assert!(c.as_slice().iter().all(|&x| x == 0));
        assert!(p.get().is_none(), "the 100-byte tail is not a buffer");
        assert_eq!(p.available(), 0);
        for x in [a, b, c] {
            p.put(x).unwrap();
        }
        assert_eq!(p.available(), 3);
        let foreign = IoBuf::leak_zeroed(4096);
        assert!(!p.owns(&foreign));
        let own = p.get().unwrap();
        assert!(p.owns(&own));
        p.put(own).unwrap();
        assert!(p.put(foreign).is_err());
        let empty: &'static mut [MaybeUninit<u8>] =
            alloc::boxed::Box::leak(alloc::boxed::Box::<[u8]>::new_uninit_slice(10));
        assert_eq!(
            BufPool::lazy(empty, 0, 4096).unwrap_err(),
            PoolError::RegionTooSmall
        );
    }

    /// What Miri checks here: buffers carved earlier stay usable after later carves (each
    /// carve reborrows the rest of the region), a device-style write through the raw pointer
    /// is seen by later slices, and recycled buffers keep their bytes.
    #[test]
    fn carved_buffers_stay_valid_across_carves_and_pointer_writes() {
        let region: &'static mut [MaybeUninit<u8>] =
            alloc::boxed::Box::leak(alloc::boxed::Box::<[u8]>::new_uninit_slice(4 * 64));
        let mut p = BufPool::lazy(region, 0, 64).unwrap();
        let mut held: Vec<IoBuf> = Vec::new();
        for i in 0..4u8 {
            let mut b = p.get().unwrap();
            // As a DMA engine would: through the pointer, no slice borrowed.
            let ptr = b.as_mut_ptr();
            for k in 0..64 {
                // SAFETY: `ptr` is valid for `capacity()` (64) bytes and no slice of `b` is
                // borrowed while it is used.
                #[allow(unsafe_code)]
                unsafe {
                    ptr.add(k).write(i ^ k as u8)
                };
            }
            held.push(b);
            // Every buffer carved so far still holds what was written into it.
            for (j, h) in held.iter().enumerate() {
                assert!(
                    h.as_slice()
                        .iter()
                        .enumerate()
                        .all(|(k, &x)| x == j as u8 ^ k as u8)
                );
            }
        }
        assert!(p.get().is_none());
        for b in held.drain(..).rev() {
            p.put(b).unwrap();
        }
        let mut again: Vec<IoBuf> = core::iter::from_fn(|| p.get()).collect();
        assert_eq!(again.len(), 4);
        for b in &mut again {
            let first = b.as_slice()[0];
            b.capacity_mut()[63] = first;
            assert_eq!(b.as_slice()[63], first);
        }
    }

    #[test]
    fn carve_get_put() {
        let mut p = BufPool::from_heap(4, 4096, 0x8000_0000).unwrap();
        assert_eq!((p.count(), p.available(), p.buf_size()), (4, 4, 4096));
        let a = p.get().unwrap();
        let b = p.get().unwrap();
        assert_eq!(a.dma_addr(), 0x8000_0000);
        assert_eq!(b.dma_addr(), 0x8000_1000);
        assert_eq!(a.len(), 4096);
        let c = p.get().unwrap();
        let d = p.get().unwrap();
        assert!(p.get().is_none());
        for x in [a, b, c, d] {
            p.put(x).unwrap();
        }
        assert_eq!(p.available(), 4);
        let foreign = IoBuf::leak_zeroed(16);
        let (e, _back) = p.put(foreign).unwrap_err();
        assert_eq!(e, PoolError::ForeignBuffer);
        let mut q = BufPool::from_heap(1, 8, 0).unwrap();
        let x = q.get().unwrap();
        assert!(p.put(x).is_err());
    }

    #[test]
    fn buffers_are_disjoint_and_len_clamped() {
        let mut p = BufPool::from_heap(3, 10, 0).unwrap();
        let mut v: Vec<IoBuf> = (0..3).map(|_| p.get().unwrap()).collect();
        for (i, b) in v.iter_mut().enumerate() {
            b.as_mut_slice().fill(i as u8 + 1);
        }
        for (i, b) in v.iter().enumerate() {
            assert!(b.as_slice().iter().all(|&x| x == i as u8 + 1));
        }
        assert_eq!(v[0].set_len(100), 10);
        assert_eq!(v[0].set_len(3), 3);
        assert_eq!(v[0].as_slice().len(), 3);
        assert_eq!(v[0].capacity_mut().len(), 10);
        assert_eq!(
            BufPool::from_heap(0, 10, 0).unwrap_err(),
            PoolError::RegionTooSmall
        );
        assert_eq!(
            BufPool::from_heap(1, 0, 0).unwrap_err(),
            PoolError::ZeroSize
        );
    }
}
