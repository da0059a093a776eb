//! The two configuration copies: whatever state each copy is in (erased, valid, corrupt,
//! torn), the newest valid one is chosen, and the next write never overwrites it.

use keel_provision::flash::{
    CONFIG_HEADER_LEN, ConfigCopy, chosen_config, encode_config_copy, next_config_write,
};
use keel_provision::{choose_config, next_config_write as next};
use proptest::prelude::*;

const REGION: usize = 2048;

#[derive(Debug, Clone)]
enum State {
    Erased,
    Valid {
        seq: u64,
        payload: Vec<u8>,
    },
    /// A valid copy with one bit flipped.
    Corrupt {
        seq: u64,
        payload: Vec<u8>,
        bit: usize,
    },
    /// A write cut short: a prefix of a valid copy, the rest erased.
    Torn {
        seq: u64,
        payload: Vec<u8>,
        cut: usize,
    },
}

impl State {
    fn region(&self) -> Vec<u8> {
        let mut r = vec![0xff; REGION];
        match self {
            State::Erased => {}
            State::Valid { seq, payload } => {
                let c = encode_config_copy(*seq, payload).unwrap();
                r[..c.len()].copy_from_slice(&c);
            }
            State::Corrupt { seq, payload, bit } => {
                let c = encode_config_copy(*seq, payload).unwrap();
                r[..c.len()].copy_from_slice(&c);
                let bit = bit % (c.len() * 8);
                r[bit / 8] ^= 1 << (bit % 8);
            }
            State::Torn { seq, payload, cut } => {
                let c = encode_config_copy(*seq, payload).unwrap();
                let cut = cut % c.len();
                r[..cut].copy_from_slice(&c[..cut]);
            }
        }
        r
    }

    fn valid(&self) -> Option<(u64, &[u8])> {
        match self {
            State::Valid { seq, payload } => Some((*seq, payload)),
            _ => None,
        }
    }
}

fn state() -> impl Strategy<Value = State> {
    let payload = prop::collection::vec(any::<u8>(), 0..(REGION - CONFIG_HEADER_LEN));
    prop_oneof![
        Just(State::Erased),
        (0u64..1000, payload.clone()).prop_map(|(seq, payload)| State::Valid { seq, payload }),
        (0u64..1000, payload.clone(), any::<usize>())
            .prop_map(|(seq, payload, bit)| State::Corrupt { seq, payload, bit }),
        (0u64..1000, payload, any::<usize>()).prop_map(|(seq, payload, cut)| State::Torn {
            seq,
            payload,
            cut
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_newest_valid_copy_is_chosen(a in state(), b in state()) {
        let (ra, rb) = (a.region(), b.region());
        let expect = match (a.valid(), b.valid()) {
            (Some((sa, pa)), Some((sb, pb))) => Some(if sb > sa { pb } else { pa }),
            (Some((_, p)), None) | (None, Some((_, p))) => Some(p),
            (None, None) => None,
        };
        prop_assert_eq!(choose_config(&ra, &rb), expect);

        // The next write goes to the copy not in force, with a higher sequence number.
        let w = next(&ra, &rb);
        if let Some((copy, entry)) = chosen_config(&ra, &rb) {
            prop_assert_ne!(w.copy, copy);
            prop_assert!(w.sequence > entry.sequence);
        } else {
            prop_assert_eq!(w.copy, ConfigCopy::A);
        }

        // Writing there, even torn, keeps a valid configuration: the old one or the new one.
        let new = encode_config_copy(w.sequence, b"new configuration").unwrap();
        for cut in [0, 1, CONFIG_HEADER_LEN, new.len() - 1, new.len()] {
            let (mut na, mut nb) = (ra.clone(), rb.clone());
            let target = if w.copy == ConfigCopy::A { &mut na } else { &mut nb };
            target.fill(0xff);
            target[..cut].copy_from_slice(&new[..cut]);
            let got = choose_config(&na, &nb);
            if cut == new.len() {
                prop_assert_eq!(got, Some(&b"new configuration"[..]));
            } else {
                prop_assert_eq!(got, expect);
            }
        }
    }
}

#[test]
fn a_sequence_of_updates_alternates_copies() {
    let mut a = vec![0xff; REGION];
    let mut b = vec![0xff; REGION];
    for i in 1..=6u64 {
        let w = next_config_write(&a, &b);
        assert_eq!(w.sequence, i);
        assert_eq!(
            w.copy,
            if i % 2 == 1 {
                ConfigCopy::A
            } else {
                ConfigCopy::B
            }
        );
        let c = encode_config_copy(w.sequence, format!("config {i}").as_bytes()).unwrap();
        let t = if w.copy == ConfigCopy::A {
            &mut a
        } else {
            &mut b
        };
        t.fill(0xff);
        t[..c.len()].copy_from_slice(&c);
        assert_eq!(
            choose_config(&a, &b),
            Some(format!("config {i}").as_bytes())
        );
    }
}
