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

/// The committed seed corpora (`fuzz/seeds/TARGET/*`: PDU streams of Linux's nvme-tcp
/// initiator and of the target answering it) replay through both harnesses on every
/// `cargo test`, so a harness or protocol change that breaks on real traffic fails here, not
/// only in a fuzz campaign.
#[test]
fn seeds_replay() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    for (target, run) in [
        ("target_recv", harness::target_recv as fn(&[u8])),
        ("host_recv", harness::host_recv),
    ] {
        let dir = root.join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("seed").path();
            run(&std::fs::read(&path).expect("reading a seed"));
            n += 1;
        }
        assert!(n > 0, "no seeds for {target}");
    }
}
