//! Waking a sleeping consumer without losing a wake-up: the consumer's "sleeping" flag and
//! the two halves of the protocol around it (the store-buffering pattern, as in Dekker's
//! algorithm). The firmware's core 0 sleeps in WFI between poll passes; the cores that push
//! messages onto its rings ring its doorbell (an interrupt that stays pending until taken)
//! when it may be asleep (`firmware/src/cores.rs` `BootWake`).
//!
//! - **Consumer**, about to sleep: [`SleepFlag::going_to_sleep`] stores `sleeping = true`,
//!   then a full barrier (`fence(SeqCst)`, `DMB ISH` on Armv8); then it looks at its rings
//!   once more, and sleeps only if they are empty. Once awake (or not sleeping after all),
//!   [`SleepFlag::awake`] clears the flag.
//! - **Producer**, after its pushes (the ring's `Release` store of its tail):
//!   [`SleepFlag::should_ring`] issues a full barrier, then loads `sleeping`; if it is set
//!   it clears it and the caller rings the doorbell.
//!
//! With a full barrier between each side's store and its load, the two loads cannot both
//! miss the other side's store: either the consumer's last look finds the message, or the
//! producer finds `sleeping` and rings. The flag is cleared by whoever rings, so a burst of
//! messages rings at most once per sleep. The `tests/loom.rs` model checks this with the
//! real ring under every interleaving and outcome the memory model allows, and checks that
//! the model does find the lost wake-up when a barrier is missing.

use crate::sync::{AtomicBool, Ordering, fence};

/// A consumer's "sleeping" flag (see the module documentation).
#[derive(Debug)]
pub struct SleepFlag {
    sleeping: AtomicBool,
}

impl Default for SleepFlag {
    fn default() -> Self {
        Self::new()
    }
}

impl SleepFlag {
    /// Awake.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            sleeping: AtomicBool::new(false),
        }
    }

    /// Awake.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            sleeping: AtomicBool::new(false),
        }
    }

    /// Consumer, before it looks at its rings a last time: "I am going to sleep". Includes
    /// the full barrier.
    pub fn going_to_sleep(&self) {
        self.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Consumer, awake (or not sleeping after all): clears the flag; returns whether a
    /// producer had cleared it first (it rang).
    pub fn awake(&self) -> bool {
        !self.sleeping.swap(false, Ordering::Relaxed)
    }

    /// Producer, after its pushes: whether the consumer is going to sleep or sleeps, in
    /// which case the flag is cleared and the caller rings it (at most one producer gets
    /// `true` per sleep). Includes the full barrier.
    pub fn should_ring(&self) -> bool {
        fence(Ordering::SeqCst);
        self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::Relaxed)
    }
}
