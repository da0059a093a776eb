//! Replays the committed seed corpora (`seeds/TARGET/*`) through every harness on the stable
//! toolchain, without libFuzzer: `cargo test --manifest-path fuzz/Cargo.toml`.
//!
//! `KEEL_FUZZ_REPLAY=TARGET:FILE` replays one input and prints it (a crash from a campaign,
//! before it becomes a regression test in its crate).

use std::path::Path;

#[test]
fn seeds_replay() {
    if let Ok(spec) = std::env::var("KEEL_FUZZ_REPLAY") {
        let (target, file) = spec.split_once(':').expect("KEEL_FUZZ_REPLAY=TARGET:FILE");
        let data = std::fs::read(file).expect("reading the input");
        assert!(
            keel_fuzz::run(target, &data, true),
            "unknown target {target}"
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for target in keel_fuzz::TARGETS {
        let dir = root.join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("seed").path();
            let data = std::fs::read(&path).expect("reading a seed");
            eprintln!("{target}: {}", path.display());
            keel_fuzz::run(target, &data, false);
            n += 1;
        }
        assert!(n > 0, "no seeds for {target}");
    }
}
