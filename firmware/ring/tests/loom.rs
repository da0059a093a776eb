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

/// The wake-up protocol (`keel_ring::wake`) with the real ring: a producer pushes a message
/// and, through [`SleepFlag::should_ring`], decides whether to ring; the consumer announces
/// its sleep, looks at the ring once more and would sleep if it is empty. In no execution may
/// the consumer decide to sleep with the message unseen while the producer decided not to
/// ring (a lost wake-up: the message would wait for the sleep's timer).
#[test]
fn a_message_pushed_as_the_consumer_goes_to_sleep_is_seen_or_rings() {
    use keel_ring::wake::SleepFlag;
    loom::model(|| {
        let ring: &'static mut Ring<u32, 2> = Box::leak(Box::new(Ring::new()));
        let (mut tx, mut rx) = Ring::split_static(ring);
        let flag = Arc::new(SleepFlag::new());
        let producer = {
            let flag = flag.clone();
            thread::spawn(move || {
                tx.push(7).unwrap();
                flag.should_ring()
            })
        };
        flag.going_to_sleep();
        let seen = rx.pop();
        let rang = producer.join().unwrap();
        assert!(
            seen == Some(7) || rang,
            "lost wake-up: the consumer sleeps with a message it did not see, and no doorbell"
        );
        // Whoever rang cleared the flag: the consumer, awake, learns it was rung.
        assert_eq!(flag.awake(), rang);
    });
}

/// The same protocol with the producer's barrier left out (its flag load may then be
/// satisfied before its push is visible): the model must find the lost wake-up, so the test
/// above would catch a missing barrier.
#[test]
fn the_model_finds_the_lost_wake_up_without_the_producers_barrier() {
    use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
    let found = std::panic::catch_unwind(|| {
        loom::model(|| {
            let tail = Arc::new(AtomicUsize::new(0));
            let sleeping = Arc::new(AtomicBool::new(false));
            let producer = {
                let (tail, sleeping) = (tail.clone(), sleeping.clone());
                thread::spawn(move || {
                    tail.store(1, Ordering::Release);
                    // No fence here.
                    sleeping.load(Ordering::Relaxed)
                })
            };
            sleeping.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            let seen = tail.load(Ordering::Acquire) == 1;
            let rang = producer.join().unwrap();
            assert!(seen || rang, "lost wake-up");
        });
    });
    assert!(
        found.is_err(),
        "loom found no lost wake-up without the barrier"
    );
}
