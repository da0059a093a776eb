//! Arrival-ordered intake across queues: work that has to wait for a shared resource (a data
//! buffer of a pool several connections draw from) waits in its own queue's FIFO with an
//! arrival number, and the resource goes to the oldest waiter of all queues. No queue's work
//! waits behind another queue's later work, and a queue's own work keeps its order.
//!
//! The NVMe/TCP service keeps one queue per connection (`firmware/src/nvmf.rs`). Finding the
//! oldest waiter scans the queues' heads (O(queues)), and only under overload: nothing waits
//! otherwise. The queues grow (allocate) only beyond their largest depth so far.

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
        if self.queues.len() <= queue {
            self.queues.resize_with(queue + 1, VecDeque::new);
        }
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

    /// Drops everything `queue` has waiting (its connection is gone); returns how many.
    pub fn clear(&mut self, queue: usize) -> usize {
        let Some(q) = self.queues.get_mut(queue) else {
            return 0;
        };
        let n = q.len();
        q.clear();
        self.waiting -= n;
        n
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
        assert_eq!(w.clear(0), 2);
        assert_eq!(w.clear(7), 0);
        assert_eq!((w.waiting(), w.queue_len(0), w.queue_len(1)), (2, 0, 2));
        assert_eq!(w.pop_oldest(), Some((1, 2)));
        // A new connection in the closed one's slot queues behind the older waiter.
        w.push(0, 5);
        assert_eq!(w.pop_oldest(), Some((1, 4)));
        assert_eq!(w.pop_oldest(), Some((0, 5)));
        assert_eq!(w.pop_oldest(), None);
    }

    #[test]
    fn pop_of_an_empty_or_unknown_queue_is_none() {
        let mut w: Intake<u8> = Intake::new();
        assert_eq!((w.pop(0), w.pop(9), w.oldest()), (None, None, None));
        assert_eq!(w.queue_len(3), 0);
    }
}
