//! Arrival-ordered intake across queues: work that has to wait for a shared resource (a data
//! buffer of a pool several connections draw from) waits in its own queue's FIFO with an
//! arrival number, and the resource goes to the oldest waiter of all queues. No queue's work
//! waits behind another queue's later work, and a queue's own work keeps its order.
//!
//! The NVMe/TCP service keeps one queue per connection (`firmware/src/nvmf.rs`). Finding the
//! oldest waiter scans the queues' heads (O(queues)), and only under overload: nothing waits
//! otherwise. Memory: the caller sizes the queue list for its most queues up front
//! ([`Intake::with_queues`]) and a queue for its depth when it opens ([`Intake::reserve`]), so
//! waiting never allocates; [`Intake::close`] gives a closed queue's memory back, so nothing a
//! finished connection used stays on the heap.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

/// Waiting work of several queues, served in arrival order (see the module documentation).
#[derive(Debug)]
pub struct Intake<T> {
    queues: Vec<VecDeque<(u64, T)>>,
    next_arrival: u64,
    waiting: usize,
}

impl<T> Default for Intake<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Intake<T> {
    /// No queue, nothing waiting.
    pub const fn new() -> Self {
        Self {
            queues: Vec::new(),
            next_arrival: 0,
            waiting: 0,
        }
    }

    /// No queue, nothing waiting, room for `queues` queues without reallocating the list.
    pub fn with_queues(queues: usize) -> Self {
        Self {
            queues: Vec::with_capacity(queues),
            next_arrival: 0,
            waiting: 0,
        }
    }

    /// Makes room for `depth` waiters in `queue` (when it opens, with its queue depth), so
    /// [`Intake::push`] does not allocate up to that many.
    pub fn reserve(&mut self, queue: usize, depth: usize) {
        self.grow_to(queue);
        let q = &mut self.queues[queue];
        q.reserve_exact(depth.saturating_sub(q.len()));
    }

    fn grow_to(&mut self, queue: usize) {
        if self.queues.len() <= queue {
            self.queues.resize_with(queue + 1, VecDeque::new);
        }
    }

    /// Work waiting, all queues together.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Whether nothing waits: new work may take the resource at once only then (otherwise it
    /// would overtake the waiters).
    pub fn is_empty(&self) -> bool {
        self.waiting == 0
    }

    /// Work waiting in `queue`.
    pub fn queue_len(&self, queue: usize) -> usize {
        self.queues.get(queue).map_or(0, VecDeque::len)
    }

    /// `item` arrives and waits at the back of `queue`; returns its arrival number.
    pub fn push(&mut self, queue: usize, item: T) -> u64 {
        self.grow_to(queue);
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.queues[queue].push_back((arrival, item));
        self.waiting += 1;
        arrival
    }

    /// The oldest waiter of all queues: its queue and the work (left in place, so that the
    /// caller can first check the resource it needs).
    pub fn oldest(&self) -> Option<(usize, &T)> {
        if self.waiting == 0 {
            return None;
        }
        self.queues
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.front().map(|(a, t)| (*a, i, t)))
            .min_by_key(|(a, _, _)| *a)
            .map(|(_, i, t)| (i, t))
    }

    /// Removes the oldest waiter of all queues.
    pub fn pop_oldest(&mut self) -> Option<(usize, T)> {
        let (queue, _) = self.oldest()?;
        self.pop(queue).map(|t| (queue, t))
    }

    /// Removes the front of `queue` (what [`Intake::oldest`] named).
    pub fn pop(&mut self, queue: usize) -> Option<T> {
        let (_, t) = self.queues.get_mut(queue)?.pop_front()?;
        self.waiting -= 1;
        Some(t)
    }

    /// Drops everything `queue` has waiting and frees its memory (its connection is gone);
    /// returns how many waited.
    pub fn close(&mut self, queue: usize) -> usize {
        let Some(q) = self.queues.get_mut(queue) else {
            return 0;
        };
        let n = q.len();
        *q = VecDeque::new();
        self.waiting -= n;
        n
    }

    /// Room for waiters `queue` has (tests and leak checks).
    pub fn capacity(&self, queue: usize) -> usize {
        self.queues.get(queue).map_or(0, VecDeque::capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_waiter_of_all_queues_goes_first() {
        let mut w = Intake::new();
        // Connection 0 fills up first, then 2 and 1 interleave.
        w.push(0, "a0");
        w.push(0, "a1");
        w.push(2, "c0");
        w.push(1, "b0");
        w.push(2, "c1");
        w.push(0, "a2");
        assert_eq!(w.waiting(), 6);
        assert_eq!(w.oldest(), Some((0, &"a0")));
        let order: Vec<_> = core::iter::from_fn(|| w.pop_oldest()).collect();
        assert_eq!(
            order,
            [
                (0, "a0"),
                (0, "a1"),
                (2, "c0"),
                (1, "b0"),
                (2, "c1"),
                (0, "a2")
            ]
        );
        assert!(w.is_empty());
    }

    #[test]
    fn a_closed_queue_drops_its_waiters_only() {
        let mut w = Intake::new();
        w.push(0, 1);
        w.push(1, 2);
        w.push(0, 3);
        w.push(1, 4);
        assert_eq!(w.close(0), 2);
        assert_eq!(w.close(7), 0);
        assert_eq!((w.waiting(), w.queue_len(0), w.queue_len(1)), (2, 0, 2));
        assert_eq!(w.pop_oldest(), Some((1, 2)));
        // A new connection in the closed one's slot queues behind the older waiter.
        w.push(0, 5);
        assert_eq!(w.pop_oldest(), Some((1, 4)));
        assert_eq!(w.pop_oldest(), Some((0, 5)));
        assert_eq!(w.pop_oldest(), None);
    }

    #[test]
    fn a_reserved_queue_takes_its_depth_without_growing_and_closing_frees_it() {
        let mut w = Intake::with_queues(4);
        w.reserve(2, 16);
        let cap = w.capacity(2);
        assert!(cap >= 16);
        for i in 0..16 {
            w.push(2, i);
        }
        assert_eq!(
            w.capacity(2),
            cap,
            "no reallocation up to the reserved depth"
        );
        assert_eq!((w.close(2), w.capacity(2), w.waiting()), (16, 0, 0));
        // Reserving less than what waits keeps what waits.
        w.push(1, 1);
        w.push(1, 2);
        w.reserve(1, 1);
        assert_eq!(w.queue_len(1), 2);
        assert_eq!(w.pop_oldest(), Some((1, 1)));
    }

    #[test]
    fn pop_of_an_empty_or_unknown_queue_is_none() {
        let mut w: Intake<u8> = Intake::new();
        assert_eq!((w.pop(0), w.pop(9), w.oldest()), (None, None, None));
        assert_eq!(w.queue_len(3), 0);
    }
}
