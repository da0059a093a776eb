//! Fair intake (issue 16): work waiting for a shared resource across connections is served in
//! arrival order. A model-based property test: any interleaving of arrivals on up to 8
//! connections, grants of the resource and closed connections; each grant must go to the
//! oldest waiter still there, so no connection's work waits behind another's later work, and
//! a closed connection's work is never granted.

use keel_qos::Intake;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Work arrives on a connection.
    Arrive(usize),
    /// The resource frees up: the intake grants it to one waiter.
    Grant,
    /// A connection closes.
    Close(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..8).prop_map(Op::Arrive),
        3 => Just(Op::Grant),
        1 => (0usize..8).prop_map(Op::Close),
    ]
}

proptest! {
    #[test]
    fn grants_follow_arrival_order_across_connections(ops in prop::collection::vec(op(), 0..400)) {
        let mut intake = Intake::new();
        // The model: waiters still there, as (id, connection), in arrival order.
        let mut model: Vec<(u32, usize)> = Vec::new();
        let mut id = 0u32;
        for op in ops {
            match op {
                Op::Arrive(c) => {
                    intake.push(c, id);
                    model.push((id, c));
                    id += 1;
                }
                Op::Grant => {
                    let got = intake.pop_oldest().map(|(c, id)| (id, c));
                    let want = (!model.is_empty()).then(|| model.remove(0));
                    prop_assert_eq!(got, want);
                }
                Op::Close(c) => {
                    let n = intake.close(c);
                    let before = model.len();
                    model.retain(|&(_, mc)| mc != c);
                    prop_assert_eq!(n, before - model.len());
                }
            }
            prop_assert_eq!(intake.waiting(), model.len());
            for c in 0..8 {
                prop_assert_eq!(intake.queue_len(c), model.iter().filter(|&&(_, mc)| mc == c).count());
            }
        }
    }

    /// A pool of `buffers` shared by connections that each keep `depth` commands outstanding:
    /// a command takes a buffer at once only when nobody waits, otherwise it waits; a finished
    /// command's buffer goes to the oldest waiter. Buffers go out in arrival order whichever
    /// connection a command came on, and every command gets one.
    #[test]
    fn a_shared_pool_serves_connections_first_come_first_served(
        buffers in 1usize..16,
        arrivals in prop::collection::vec((0usize..8, any::<bool>()), 1..300),
    ) {
        let mut intake = Intake::new();
        let mut free = buffers;
        let mut holding: std::collections::VecDeque<u64> = Default::default(); // arrival numbers holding buffers
        let mut next = 0u64;
        let mut granted_order = Vec::new();
        for (conn, finish) in arrivals {
            if finish && let Some(_done) = holding.pop_front() {
                free += 1;
            }
            let me = next;
            next += 1;
            if intake.is_empty() && free > 0 {
                free -= 1;
                holding.push_back(me);
                granted_order.push(me);
            } else {
                intake.push(conn, me);
            }
            while free > 0 {
                let Some((_, a)) = intake.pop_oldest() else { break };
                free -= 1;
                holding.push_back(a);
                granted_order.push(a);
            }
        }
        // Drain: all commands finish, the waiters get buffers in order.
        while let Some(_done) = holding.pop_front() {
            free += 1;
            if let Some((_, a)) = intake.pop_oldest() {
                free -= 1;
                holding.push_back(a);
                granted_order.push(a);
            }
        }
        prop_assert!(intake.is_empty());
        prop_assert_eq!(free, buffers);
        let sorted = { let mut s = granted_order.clone(); s.sort_unstable(); s };
        prop_assert_eq!(&granted_order, &sorted, "buffers went out of arrival order");
        prop_assert_eq!(granted_order.len() as u64, next);
    }
}
