//! Runs the cargo-fuzz harnesses (fuzz/src/harness.rs) over random and structured inputs as
//! part of the normal test suite.

#[path = "../fuzz/src/harness.rs"]
mod harness;

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    #[test]
    fn target_survives_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..2000)) {
        harness::target_recv(&data);
    }

    #[test]
    fn host_survives_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..2000)) {
        harness::host_recv(&data);
    }
}
