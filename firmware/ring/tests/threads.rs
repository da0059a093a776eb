//! Two threads, one producer and one consumer, through a small ring: every message arrives,
//! once, in order, while the ring keeps filling up and draining (a stress test of the memory
//! ordering on the host's real memory model; under Miri a shorter run checks for data races).

use keel_ring::Ring;
use std::thread;

/// Messages per run: enough wrap-arounds of a 16-slot ring to hit full and empty many times.
const COUNT: u64 = if cfg!(miri) { 2_000 } else { 2_000_000 };

/// A message larger than a word, so a torn (partly written) slot would be seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Msg {
    seq: u64,
    check: u64,
    pad: [u64; 2],
}

impl Msg {
    fn new(seq: u64) -> Self {
        Self {
            seq,
            check: !seq,
            pad: [seq.wrapping_mul(0x9e37_79b9_7f4a_7c15), seq ^ 0x5555],
        }
    }
}

#[test]
fn two_threads_pass_every_message_in_order() {
    let mut ring = Box::new(Ring::<Msg, 16>::new());
    let (mut tx, mut rx) = ring.split();
    let (full, empty) = thread::scope(|s| {
        let producer = s.spawn(move || {
            let mut full = 0u64;
            for seq in 0..COUNT {
                let mut m = Msg::new(seq);
                loop {
                    match tx.push(m) {
                        Ok(()) => break,
                        Err(back) => {
                            m = back;
                            full += 1;
                            thread::yield_now();
                        }
                    }
                }
            }
            full
        });
        let consumer = s.spawn(move || {
            let mut next = 0u64;
            let mut empty = 0u64;
            while next < COUNT {
                match rx.pop() {
                    Some(m) => {
                        assert_eq!(
                            m,
                            Msg::new(next),
                            "message {next} corrupted or out of order"
                        );
                        next += 1;
                    }
                    None => {
                        empty += 1;
                        thread::yield_now();
                    }
                }
            }
            assert_eq!(rx.pop(), None, "nothing beyond what was sent");
            empty
        });
        (
            producer.join().expect("producer"),
            consumer.join().expect("consumer"),
        )
    });
    eprintln!(
        "{COUNT} messages; producer found the ring full {full} times, consumer empty {empty} times"
    );
}

#[test]
fn ping_pong_between_two_rings() {
    // The firmware's pattern: a request ring one way, a reply ring the other.
    let mut requests = Ring::<u64, 4>::new();
    let mut replies = Ring::<u64, 4>::new();
    let (mut req_tx, mut req_rx) = requests.split();
    let (mut rep_tx, mut rep_rx) = replies.split();
    let rounds = if cfg!(miri) { 200 } else { 100_000 };
    thread::scope(|s| {
        s.spawn(move || {
            let mut served = 0;
            while served < rounds {
                if let Some(v) = req_rx.pop() {
                    while rep_tx.push(v * 2).is_err() {
                        thread::yield_now();
                    }
                    served += 1;
                } else {
                    thread::yield_now();
                }
            }
        });
        for i in 0..rounds {
            while req_tx.push(i).is_err() {
                thread::yield_now();
            }
            let reply = loop {
                if let Some(r) = rep_rx.pop() {
                    break r;
                }
                thread::yield_now();
            };
            assert_eq!(reply, i * 2);
        }
    });
}

#[test]
#[cfg_attr(miri, ignore = "leaks its ring by design")]
fn static_halves_move_to_other_threads() {
    // How the firmware hands rings to its cores: leaked at boot, `'static` halves moved.
    let (mut tx, mut rx) = Ring::split_static(Box::leak(Box::new(Ring::<u64, 8>::new())));
    let consumer = thread::spawn(move || {
        let mut sum = 0;
        let mut seen = 0;
        while seen < 1000 {
            if let Some(v) = rx.pop() {
                sum += v;
                seen += 1;
            } else {
                thread::yield_now();
            }
        }
        sum
    });
    for i in 0..1000u64 {
        while tx.push(i).is_err() {
            thread::yield_now();
        }
    }
    assert_eq!(consumer.join().expect("consumer"), 999 * 1000 / 2);
}

/// One core bumps its loop counters while another reads them: the reader never sees a
/// counter go backwards or busy passes exceed passes, and after the writer is done it sees
/// exactly what was recorded.
#[test]
fn loop_counters_read_from_another_thread() {
    use keel_ring::stats::LoopCounters;
    let passes = if cfg!(miri) { 1_000 } else { 1_000_000 };
    let c = LoopCounters::new();
    thread::scope(|s| {
        s.spawn(|| {
            for i in 0..passes {
                c.pass(i % 3 == 0);
                if i % 10 == 0 {
                    c.slept();
                }
                c.received(i % 2);
            }
        });
        s.spawn(|| {
            let mut last = c.read();
            for _ in 0..passes / 10 {
                let now = c.read();
                assert!(now.passes >= last.passes, "passes went back");
                assert!(now.busy_passes >= last.busy_passes, "busy went back");
                assert!(now.sleeps >= last.sleeps, "sleeps went back");
                assert!(now.messages >= last.messages, "messages went back");
                last = now;
            }
        });
    });
    let end = c.read();
    assert_eq!(end.passes, passes);
    assert_eq!(end.busy_passes, passes.div_ceil(3));
    assert_eq!(end.sleeps, passes.div_ceil(10));
    assert_eq!(end.messages, passes / 2);
}
