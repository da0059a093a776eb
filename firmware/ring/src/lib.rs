//! Lock-free single-producer single-consumer (SPSC) rings: how Keel's cores pass messages to
//! each other without locks (the SPDK reactor model: one poll loop per core, messages between
//! cores, nothing shared on the I/O path).
//!
//! A [`Ring`] has a fixed capacity `N` (a power of two) chosen at compile time and allocates
//! nothing: create it once (on the heap with `Box::new`, or in a `static`), [`split`] it into
//! its [`Producer`] and [`Consumer`] and hand each to the core that uses it. `push` and `pop`
//! never block, never spin and never take a lock; a full ring refuses the message (the caller
//! keeps it and retries on its next pass), an empty one returns `None`.
//!
//! For cores that must outlive any borrow (the firmware's), [`Ring::split_static`] splits a
//! leaked ring into `'static` halves.
//!
//! # Memory ordering
//!
//! The ring holds two free-running counters: `tail` (slots ever written, stored only by the
//! producer) and `head` (slots ever read, stored only by the consumer). Slot `i % N` holds
//! message `i`; the ring holds `tail - head` messages (wrapping arithmetic, `0..=N`).
//!
//! - **Publishing (producer → consumer).** The producer writes the message into slot
//!   `tail % N`, *then* stores `tail + 1` with `Release`. The consumer loads `tail` with
//!   `Acquire`; once it sees `tail + 1`, the `Release`/`Acquire` pair makes the producer's
//!   write of the slot happen-before the consumer's read of it, so the consumer reads a fully
//!   written message.
//! - **Returning a slot (consumer → producer).** The consumer moves the message out of slot
//!   `head % N`, *then* stores `head + 1` with `Release`. The producer loads `head` with
//!   `Acquire` before it reuses a slot; once it sees `head + 1`, the consumer's read of that
//!   slot happens-before the producer's next write to it, so a slot is never overwritten while
//!   it is still being read.
//! - Each side reads its *own* counter with `Relaxed` (it is the only writer), and keeps a
//!   cached copy of the *other* side's counter, reloading it only when the cache says the ring
//!   is full (producer) or empty (consumer): in the common case a push or pop touches no cache
//!   line the other core writes, apart from the slot itself and one counter store.
//! - The two counters live on separate 64-byte cache lines (no false sharing between the
//!   cores).
//!
//! On Armv8 a `Release` store is an `STLR` and an `Acquire` load an `LDAR` (or `LDAPR`): no
//! `DMB` barrier and no exclusive-monitor loop is needed, only plain loads and stores.
//!
//! The ordering argument is checked by a [loom](https://docs.rs/loom) model test
//! (`RUSTFLAGS="--cfg loom" cargo test -p keel-ring --release --test loom`), which explores
//! every interleaving and memory-order outcome of a small ring, and the unsafe code by Miri
//! (`cargo +nightly miri test -p keel-ring`).
//!
//! [`split`]: Ring::split
#![cfg_attr(not(any(test, loom)), no_std)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod stats;
mod sync;
pub mod wake;

use core::fmt;
use core::marker::PhantomData;
use core::mem::MaybeUninit;
use sync::{AtomicUsize, Ordering, UnsafeCell};

/// Keeps a value on its own 64-byte cache line (Cortex-A and Neoverse cores have 64-byte
/// lines), so the two cores' counters never share one.
#[repr(align(64))]
struct CacheLine<T>(T);

/// A single-producer single-consumer ring of `N` messages of type `T`.
///
/// `N` must be a power of two (checked at compile time).
pub struct Ring<T, const N: usize> {
    /// Messages ever taken out (written only by the consumer).
    head: CacheLine<AtomicUsize>,
    /// Messages ever put in (written only by the producer).
    tail: CacheLine<AtomicUsize>,
    slots: [UnsafeCell<MaybeUninit<T>>; N],
}

// SAFETY: a `Ring` only hands out its messages by value through one `Producer` and one
// `Consumer`, which its `split` methods create from an exclusive borrow; the slots between
// `head` and `tail` are owned by the consumer, the others by the producer (see the crate's
// memory-ordering argument). Sharing a `&Ring` between threads therefore only moves `T`s from
// one thread to another, which `T: Send` allows.
unsafe impl<T: Send, const N: usize> Sync for Ring<T, N> {}

impl<T, const N: usize> Ring<T, N> {
    const CAPACITY_IS_A_POWER_OF_TWO: () = assert!(
        N.is_power_of_two(),
        "keel-ring: the capacity must be a power of two"
    );

    /// An empty ring.
    pub fn new() -> Self {
        let () = Self::CAPACITY_IS_A_POWER_OF_TWO;
        Self {
            head: CacheLine(AtomicUsize::new(0)),
            tail: CacheLine(AtomicUsize::new(0)),
            slots: core::array::from_fn(|_| UnsafeCell::new(MaybeUninit::uninit())),
        }
    }

    /// The number of messages the ring holds when full.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// Splits the ring into its producer and consumer halves. The exclusive borrow guarantees
    /// that there is only ever one of each.
    pub fn split(&mut self) -> (Producer<'_, T, N>, Consumer<'_, T, N>) {
        let ring: &Self = self;
        // Both counters are ours to read: `&mut self` excludes any other user.
        let head = ring.head.0.load(Ordering::Relaxed);
        let tail = ring.tail.0.load(Ordering::Relaxed);
        (
            Producer {
                ring,
                tail,
                head_cache: head,
                _not_sync: PhantomData,
            },
            Consumer {
                ring,
                head,
                tail_cache: tail,
                _not_sync: PhantomData,
            },
        )
    }

    /// Splits a ring that lives for the rest of the program (for example `Box::leak`ed at
    /// boot) into `'static` halves that can be moved to other cores.
    pub fn split_static(
        ring: &'static mut Self,
    ) -> (Producer<'static, T, N>, Consumer<'static, T, N>) {
        ring.split()
    }
}

impl<T, const N: usize> Default for Ring<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const N: usize> fmt::Debug for Ring<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("capacity", &N)
            .field("head", &self.head.0.load(Ordering::Relaxed))
            .field("tail", &self.tail.0.load(Ordering::Relaxed))
            .finish()
    }
}

impl<T, const N: usize> Drop for Ring<T, N> {
    fn drop(&mut self) {
        // `&mut self`: both halves are gone, so both counters are final.
        let head = self.head.0.load(Ordering::Relaxed);
        let tail = self.tail.0.load(Ordering::Relaxed);
        for i in 0..tail.wrapping_sub(head) {
            let slot = &self.slots[head.wrapping_add(i) % N];
            // SAFETY: slots `head..tail` hold messages written by the producer and not yet
            // taken by the consumer; each is dropped exactly once, here.
            slot.with_mut(|p| unsafe { (*p).assume_init_drop() });
        }
    }
}

/// The sending half of a [`Ring`]: owned by one core.
pub struct Producer<'a, T, const N: usize> {
    ring: &'a Ring<T, N>,
    /// Our copy of `ring.tail` (we are its only writer).
    tail: usize,
    /// The consumer's `head` as last seen: the ring has at least `N - (tail - head_cache)`
    /// free slots.
    head_cache: usize,
    /// A producer may move to another thread but not be shared: `&Producer` must not push.
    _not_sync: PhantomData<core::cell::Cell<()>>,
}

// SAFETY: the producer moves `T`s into the ring for the consumer, possibly on another thread;
// that needs `T: Send`. Its own fields are plain values and a shared reference to a `Sync`
// ring.
unsafe impl<T: Send, const N: usize> Send for Producer<'_, T, N> {}

impl<T, const N: usize> Producer<'_, T, N> {
    /// Puts `value` at the end of the ring, or gives it back when the ring is full.
    pub fn push(&mut self, value: T) -> Result<(), T> {
        if self.tail.wrapping_sub(self.head_cache) == N {
            // Acquire: the consumer's reads of the slots it has released happen-before our
            // writes to them.
            self.head_cache = self.ring.head.0.load(Ordering::Acquire);
            if self.tail.wrapping_sub(self.head_cache) == N {
                return Err(value);
            }
        }
        let slot = &self.ring.slots[self.tail % N];
        // SAFETY: `tail - head < N`, so slot `tail % N` is not among the consumer's slots
        // `head..tail`: nobody else reads or writes it until we publish it below. Writing a
        // `MaybeUninit` drops nothing (the slot's previous message, if any, was moved out).
        slot.with_mut(|p| unsafe { (*p).write(value) });
        self.tail = self.tail.wrapping_add(1);
        // Release: the slot write above happens-before the consumer's Acquire load that sees
        // the new tail.
        self.ring.tail.0.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Free slots: at least this many `push`es will succeed (more if the consumer catches up).
    pub fn free(&mut self) -> usize {
        self.head_cache = self.ring.head.0.load(Ordering::Acquire);
        N - self.tail.wrapping_sub(self.head_cache)
    }

    /// Whether the ring is full now.
    pub fn is_full(&mut self) -> bool {
        self.free() == 0
    }

    /// The ring's capacity.
    pub const fn capacity(&self) -> usize {
        N
    }
}

impl<T, const N: usize> fmt::Debug for Producer<'_, T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &N)
            .field("tail", &self.tail)
            .finish()
    }
}

/// The receiving half of a [`Ring`]: owned by one core.
pub struct Consumer<'a, T, const N: usize> {
    ring: &'a Ring<T, N>,
    /// Our copy of `ring.head` (we are its only writer).
    head: usize,
    /// The producer's `tail` as last seen: at least `tail_cache - head` messages are ready.
    tail_cache: usize,
    _not_sync: PhantomData<core::cell::Cell<()>>,
}

// SAFETY: the consumer moves `T`s out of the ring that the producer put in, possibly on
// another thread; that needs `T: Send`.
unsafe impl<T: Send, const N: usize> Send for Consumer<'_, T, N> {}

impl<T, const N: usize> Consumer<'_, T, N> {
    /// Whether a message is ready, refreshing the view of the producer's counter.
    fn ready(&mut self) -> bool {
        if self.tail_cache == self.head {
            // Acquire: the producer's write of every slot up to `tail` happens-before our
            // reads of them.
            self.tail_cache = self.ring.tail.0.load(Ordering::Acquire);
        }
        self.tail_cache != self.head
    }

    /// Takes the oldest message, if any.
    pub fn pop(&mut self) -> Option<T> {
        if !self.ready() {
            return None;
        }
        let slot = &self.ring.slots[self.head % N];
        // SAFETY: `head < tail` (as published with Release by the producer and loaded with
        // Acquire above), so slot `head % N` holds an initialised message that the producer
        // will not touch until we publish `head + 1`. We move it out exactly once.
        let value = slot.with(|p| unsafe { (*p).assume_init_read() });
        self.head = self.head.wrapping_add(1);
        // Release: our read of the slot happens-before the producer's Acquire load that sees
        // the new head, hence before it writes the slot again.
        self.ring.head.0.store(self.head, Ordering::Release);
        Some(value)
    }

    /// Calls `f` on the oldest message without taking it.
    pub fn peek<R>(&mut self, f: impl FnOnce(&T) -> R) -> Option<R> {
        if !self.ready() {
            return None;
        }
        let slot = &self.ring.slots[self.head % N];
        // SAFETY: as in `pop`, the slot holds an initialised message that only we may read
        // until we move `head` past it; the reference does not outlive the closure.
        Some(slot.with(|p| f(unsafe { (*p).assume_init_ref() })))
    }

    /// Messages ready now.
    pub fn len(&mut self) -> usize {
        self.tail_cache = self.ring.tail.0.load(Ordering::Acquire);
        self.tail_cache.wrapping_sub(self.head)
    }

    /// Whether no message is ready now.
    pub fn is_empty(&mut self) -> bool {
        !self.ready()
    }

    /// The ring's capacity.
    pub const fn capacity(&self) -> usize {
        N
    }
}

impl<T, const N: usize> fmt::Debug for Consumer<'_, T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &N)
            .field("head", &self.head)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn fifo_order_full_and_empty() {
        let mut ring = Ring::<u32, 4>::new();
        let (mut p, mut c) = ring.split();
        assert_eq!(c.pop(), None);
        assert!(c.is_empty());
        for i in 0..4 {
            assert_eq!(p.push(i), Ok(()));
        }
        assert!(p.is_full());
        assert_eq!(p.push(99), Err(99), "a full ring gives the message back");
        assert_eq!(c.len(), 4);
        assert_eq!(c.peek(|v| *v), Some(0));
        assert_eq!(c.pop(), Some(0));
        assert_eq!(p.free(), 1);
        assert_eq!(p.push(4), Ok(()));
        assert_eq!(
            core::iter::from_fn(|| c.pop()).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(c.pop(), None);
        assert_eq!(p.free(), 4);
    }

    #[test]
    fn counters_wrap_around_usize() {
        let mut ring = Ring::<u64, 2>::new();
        // Start both counters just below the wrap point.
        ring.head.0.store(usize::MAX - 2, Ordering::Relaxed);
        ring.tail.0.store(usize::MAX - 2, Ordering::Relaxed);
        let (mut p, mut c) = ring.split();
        for i in 0..10u64 {
            assert_eq!(p.push(i), Ok(()));
            assert_eq!(p.push(i + 100), Ok(()));
            assert_eq!(p.push(0), Err(0));
            assert_eq!(c.pop(), Some(i));
            assert_eq!(c.pop(), Some(i + 100));
            assert_eq!(c.pop(), None);
        }
    }

    #[test]
    fn messages_left_in_the_ring_are_dropped_once() {
        let token = Rc::new(());
        {
            let mut ring = Ring::<Rc<()>, 8>::new();
            let (mut p, mut c) = ring.split();
            for _ in 0..5 {
                p.push(token.clone()).unwrap();
            }
            drop(c.pop());
            assert_eq!(Rc::strong_count(&token), 5);
        }
        assert_eq!(Rc::strong_count(&token), 1);
    }

    #[test]
    fn zero_sized_messages() {
        let mut ring = Ring::<(), 2>::new();
        let (mut p, mut c) = ring.split();
        assert_eq!(p.push(()), Ok(()));
        assert_eq!(p.push(()), Ok(()));
        assert_eq!(p.push(()), Err(()));
        assert_eq!(c.pop(), Some(()));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn halves_can_be_split_again_after_use() {
        let mut ring = Ring::<u8, 4>::new();
        {
            let (mut p, _) = ring.split();
            p.push(7).unwrap();
        }
        let (_, mut c) = ring.split();
        assert_eq!(
            c.pop(),
            Some(7),
            "a later split sees what an earlier one left"
        );
    }
}
