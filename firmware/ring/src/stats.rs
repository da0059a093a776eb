//! A poll loop's counters, written by its own core and read by any other without a lock.
//!
//! Each core owns one [`LoopCounters`] (the firmware keeps one per core in a static array)
//! and is its only writer: it bumps a counter with a `Relaxed` load and a `Relaxed` store
//! (no read-modify-write instruction, no exclusive-monitor loop, no barrier), which is
//! correct because nothing else stores to it. A reader on another core (core 0 building
//! `keelctl status` or `/metrics`) loads each counter with `Relaxed`: every value it sees
//! was stored by the owner (64-bit accesses are single-copy atomic), and each counter only
//! grows, so two reads in a row never go backwards. The counters of one block are not read
//! as one consistent instant (nothing needs that: they are monotonic totals).
//!
//! The block fills its own 64-byte cache line so two cores' counters never share one.

use crate::sync::{AtomicU64, Ordering};

/// What a loop's counters said when they were read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopStats {
    /// Passes of the loop.
    pub passes: u64,
    /// Passes that found work.
    pub busy_passes: u64,
    /// Times the loop slept (WFI) for lack of work.
    pub sleeps: u64,
    /// Messages received from other cores.
    pub messages: u64,
}

/// One core's loop counters. Only the owning core calls the `&self` writers
/// ([`pass`](Self::pass), [`slept`](Self::slept), [`received`](Self::received)); a second
/// writer would lose counts (never memory safety).
#[derive(Debug)]
#[repr(align(64))]
pub struct LoopCounters {
    passes: AtomicU64,
    busy_passes: AtomicU64,
    sleeps: AtomicU64,
    messages: AtomicU64,
}

impl Default for LoopCounters {
    fn default() -> Self {
        Self::new()
    }
}

/// Adds `n` to a counter with one writer: load and store, no read-modify-write.
#[inline(always)]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

impl LoopCounters {
    /// All zero (usable in a `static`).
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            passes: AtomicU64::new(0),
            busy_passes: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
            messages: AtomicU64::new(0),
        }
    }

    /// All zero.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            passes: AtomicU64::new(0),
            busy_passes: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
            messages: AtomicU64::new(0),
        }
    }

    /// Owner: one pass of the loop, which found work if `busy`.
    #[inline]
    pub fn pass(&self, busy: bool) {
        bump(&self.passes, 1);
        if busy {
            bump(&self.busy_passes, 1);
        }
    }

    /// Owner: the loop is about to sleep.
    #[inline]
    pub fn slept(&self) {
        bump(&self.sleeps, 1);
    }

    /// Owner: `n` messages taken from other cores.
    #[inline]
    pub fn received(&self, n: u64) {
        if n > 0 {
            bump(&self.messages, n);
        }
    }

    /// Any core: the counters now.
    pub fn read(&self) -> LoopStats {
        LoopStats {
            passes: self.passes.load(Ordering::Relaxed),
            busy_passes: self.busy_passes.load(Ordering::Relaxed),
            sleeps: self.sleeps.load(Ordering::Relaxed),
            messages: self.messages.load(Ordering::Relaxed),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn counts_what_its_owner_records() {
        let c = LoopCounters::new();
        assert_eq!(c.read(), LoopStats::default());
        c.pass(false);
        c.pass(true);
        c.pass(true);
        c.slept();
        c.received(0);
        c.received(5);
        assert_eq!(
            c.read(),
            LoopStats {
                passes: 3,
                busy_passes: 2,
                sleeps: 1,
                messages: 5
            }
        );
    }

    #[test]
    fn a_block_fills_its_own_cache_line() {
        assert_eq!(core::mem::align_of::<LoopCounters>(), 64);
        let two = [LoopCounters::new(), LoopCounters::new()];
        let a = &two[0] as *const _ as usize;
        let b = &two[1] as *const _ as usize;
        assert_eq!(b - a, 64);
    }
}
