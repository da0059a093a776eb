//! Boot benchmark: wall time from starting QEMU to the `keel: ready` line, and the firmware's
//! own reset-to-ready figure, over several boots of the release image (-kernel and pflash).
//!
//! `cargo run --release -p keel-tests --bin boot-bench -- [RUNS]`

use keel_tests::{BOOT_TIMEOUT, Build, Qemu, flash_image, image};
use std::time::Duration;

fn stats(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!(
        "min {:.1} ms, median {:.1} ms, max {:.1} ms",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
        .max(1);
    let img = image(Build::Release);
    let flash = flash_image(Build::Release);
    println!(
        "image: {} bytes",
        std::fs::metadata(&img).map(|m| m.len()).unwrap_or(0)
    );
    for (name, args) in [
        (
            "-kernel",
            vec!["--image".to_string(), img.display().to_string()],
        ),
        (
            "pflash",
            vec!["--flash".to_string(), flash.display().to_string()],
        ),
    ] {
        let (mut wall, mut fw) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let mut q = Qemu::start(&args);
            let (line, t) = q
                .wait_for("keel: ready in ", BOOT_TIMEOUT)
                .unwrap_or_else(|e| panic!("{e}"));
            wall.push(t.as_secs_f64() * 1e3);
            let ms = line
                .trim_start_matches("keel: ready in ")
                .split_whitespace()
                .next()
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(f64::NAN);
            fw.push(ms);
            q.kill();
            std::thread::sleep(Duration::from_millis(100));
        }
        println!(
            "{name:8} QEMU start to `keel: ready` (wall): {}",
            stats(wall)
        );
        println!(
            "{name:8} reset to poll loop (firmware's counter): {}",
            stats(fw)
        );
    }
}
