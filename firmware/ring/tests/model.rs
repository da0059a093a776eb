//! Property test: any sequence of pushes and pops on a ring behaves like a bounded FIFO queue
//! (std's `VecDeque` with the same capacity).

use keel_ring::Ring;
use proptest::prelude::*;
use std::collections::VecDeque;

#[derive(Clone, Debug)]
enum Op {
    Push(u16),
    Pop,
    Peek,
    Len,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<u16>().prop_map(Op::Push),
        3 => Just(Op::Pop),
        1 => Just(Op::Peek),
        1 => Just(Op::Len),
    ]
}

proptest! {
    // Under Miri: fewer cases, and no failure file (Miri isolates the file system).
    #![proptest_config(ProptestConfig {
        cases: if cfg!(miri) { 8 } else { 512 },
        failure_persistence: if cfg!(miri) { None } else { ProptestConfig::default().failure_persistence },
        ..ProptestConfig::default()
    })]

    #[test]
    fn behaves_like_a_bounded_fifo(ops in proptest::collection::vec(op(), 0..300)) {
        let mut ring = Ring::<u16, 8>::new();
        let (mut p, mut c) = ring.split();
        let mut model = VecDeque::new();
        for op in ops {
            match op {
                Op::Push(v) => {
                    let r = p.push(v);
                    if model.len() == 8 {
                        prop_assert_eq!(r, Err(v));
                    } else {
                        prop_assert_eq!(r, Ok(()));
                        model.push_back(v);
                    }
                }
                Op::Pop => prop_assert_eq!(c.pop(), model.pop_front()),
                Op::Peek => prop_assert_eq!(c.peek(|v| *v), model.front().copied()),
                Op::Len => {
                    prop_assert_eq!(c.len(), model.len());
                    prop_assert_eq!(p.free(), 8 - model.len());
                }
            }
        }
    }
}
