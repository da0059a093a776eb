//! Loom model test of the ring's memory ordering: loom runs the two threads under every
//! interleaving and every outcome the C++/Rust memory model allows for the orderings used,
//! and fails on a data race on a slot (a read not ordered after its write, or a write not
//! ordered after the previous read) or on a lost or reordered message.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p keel-ring --release --test loom`
#![cfg(loom)]

use keel_ring::Ring;
use loom::sync::Arc;
use loom::thread;

/// Three messages through a two-slot ring: the producer must wait for the consumer to free a
/// slot (the `head` Release/Acquire pair) and the consumer for the producer to fill one (the
/// `tail` pair).
#[test]
fn messages_cross_a_two_slot_ring_in_order() {
    loom::model(|| {
        let ring: &'static mut Ring<Arc<u32>, 2> = Box::leak(Box::new(Ring::new()));
        let (mut tx, mut rx) = Ring::split_static(ring);
        let producer = thread::spawn(move || {
            for i in 0..3 {
                let mut m = Arc::new(i);
                loop {
                    match tx.push(m) {
                        Ok(()) => break,
                        Err(back) => {
                            m = back;
                            thread::yield_now();
                        }
                    }
                }
            }
        });
        let mut next = 0;
        while next < 3 {
            match rx.pop() {
                Some(m) => {
                    assert_eq!(*m, next);
                    next += 1;
                }
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
        assert!(rx.pop().is_none());
    });
}
