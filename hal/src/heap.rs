//! The firmware's global allocator, shared by every core.
//!
//! **Decision: one heap, its lock kept off the I/O path** (rather than per-core arenas). The
//! heap is `linked_list_allocator` behind a spin lock. Every core allocates what it needs
//! while it sets up (buffer pools, socket rings, queue memory, its smoltcp interface) and the
//! I/O path allocates nothing, as on the boot core today: so the lock is only ever taken off
//! the hot path, where a rare wait costs nothing that matters. Per-core arenas would make
//! setup-time allocations contention-free but need a second allocator, an owner lookup on
//! every free (frees of memory another core allocated, e.g. a buffer handed over a ring) and
//! memory split up front between cores; the poll loop has no use for that.
//!
//! The decision is checked, not assumed: [`Heap`] counts allocator calls per core
//! ([`Heap::calls`], one cache line per core, touched only on the rare call), so a core can
//! show that its loop made none between two points (the SMP boot check does; per-core
//! statistics can report it).

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicU64, Ordering};
use linked_list_allocator::LockedHeap;

use crate::MAX_CORES;

/// A counter on its own cache line (no false sharing between cores).
#[repr(align(64))]
#[derive(Debug)]
struct Counter(AtomicU64);

/// The global allocator: a locked linked-list heap with per-core call counters.
pub struct Heap {
    inner: LockedHeap,
    core_index: fn() -> usize,
    calls: [Counter; MAX_CORES],
}

impl core::fmt::Debug for Heap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Heap").finish_non_exhaustive()
    }
}

impl Heap {
    /// An empty heap; `core_index` names the calling core (`arch::percpu::index` on the
    /// target: two instructions, no lock).
    pub const fn new(core_index: fn() -> usize) -> Self {
        Self {
            inner: LockedHeap::empty(),
            core_index,
            calls: [const { Counter(AtomicU64::new(0)) }; MAX_CORES],
        }
    }

    /// Hands the heap its memory.
    ///
    /// # Safety
    /// `start..start + size` must be unused, writable memory that stays reserved for the
    /// heap; call once.
    pub unsafe fn init(&self, start: *mut u8, size: usize) {
        // SAFETY: guaranteed by the caller.
        unsafe { self.inner.lock().init(start, size) }
    }

    /// Grows the heap by `by` bytes at its end.
    ///
    /// # Safety
    /// The `by` bytes after the heap's current end must be unused, writable memory.
    pub unsafe fn extend(&self, by: usize) {
        // SAFETY: guaranteed by the caller.
        unsafe { self.inner.lock().extend(by) }
    }

    /// Bytes free now.
    pub fn free(&self) -> usize {
        self.inner.lock().free()
    }

    /// Allocator calls (allocations, frees, reallocations) made by core `core` so far.
    pub fn calls(&self, core: usize) -> u64 {
        self.calls
            .get(core)
            .map_or(0, |c| c.0.load(Ordering::Relaxed))
    }

    fn count(&self) {
        let core = (self.core_index)().min(MAX_CORES - 1);
        self.calls[core].0.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `LockedHeap`, a correct allocator, after bumping a counter.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.count();
        // SAFETY: the caller's promises about `layout` pass through.
        unsafe { self.inner.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.count();
        // SAFETY: `ptr` came from this allocator (from `inner`) with `layout`.
        unsafe { self.inner.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.count();
        // SAFETY: as in `alloc`.
        unsafe { self.inner.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.count();
        // SAFETY: as in `dealloc`, and the caller's promises about `new_size`.
        unsafe { self.inner.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        static CORE: Cell<usize> = const { Cell::new(0) };
    }

    fn core() -> usize {
        CORE.with(Cell::get)
    }

    #[test]
    fn counts_calls_per_core_and_allocates() {
        let heap = Heap::new(core);
        let mut mem = vec![0u64; 8192];
        // SAFETY: `mem` outlives `heap` in this test and nothing else uses it.
        unsafe { heap.init(mem.as_mut_ptr().cast(), mem.len() * 8) };
        let free = heap.free();
        let layout = Layout::from_size_align(256, 16).unwrap();
        // SAFETY: non-zero layout.
        let a = unsafe { heap.alloc(layout) };
        assert!(!a.is_null());
        assert!(heap.free() < free);
        CORE.with(|c| c.set(3));
        // SAFETY: non-zero layout.
        let b = unsafe { heap.alloc_zeroed(layout) };
        // SAFETY: `b` was just allocated zeroed with 256 bytes.
        let zeroed = unsafe { std::slice::from_raw_parts(b, 256) };
        assert!(zeroed.iter().all(|&x| x == 0));
        // SAFETY: `a` and `b` came from `heap` with `layout` (a free on another core).
        unsafe {
            heap.dealloc(a, layout);
            heap.dealloc(b, layout);
        }
        assert_eq!(heap.free(), free);
        assert_eq!((heap.calls(0), heap.calls(3), heap.calls(1)), (1, 3, 0));
        assert_eq!(heap.calls(MAX_CORES + 5), 0, "out of range reads as none");
    }

    #[test]
    fn an_out_of_range_core_index_is_counted_not_a_crash() {
        let heap = Heap::new(|| usize::MAX);
        let mut mem = vec![0u64; 1024];
        // SAFETY: as above.
        unsafe { heap.init(mem.as_mut_ptr().cast(), mem.len() * 8) };
        let layout = Layout::from_size_align(8, 8).unwrap();
        // SAFETY: non-zero layout; freed at once.
        unsafe { heap.dealloc(heap.alloc(layout), layout) };
        assert_eq!(heap.calls(MAX_CORES - 1), 2);
    }
}
