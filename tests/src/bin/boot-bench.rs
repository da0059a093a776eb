//! Boot benchmark: wall time from starting QEMU to the `keel: ready` line, and the firmware's
//! own reset-to-ready figure, over several boots of the release image (-kernel and pflash).
//!
//! `cargo run --release -p keel-tests --bin boot-bench -- [RUNS] [--image ELF_OR_IMAGE]...
//! [--smp N]...`
//!
//! With `--image` (repeatable) it boots the given images with `-kernel` instead, e.g. a saved
//! build before a change and one after it. With `--smp` (repeatable) it boots each `-kernel`
//! variant with each core count (and no pflash variant). Runs are interleaved (one boot of each variant in
//! turn) so a changing machine load affects every variant alike.

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
    let mut runs = 10;
    let mut images = Vec::new();
    let mut smps: Vec<u32> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--image" {
            images.push(args.next().expect("--image needs a path"));
        } else if a == "--smp" {
            let n = args.next().and_then(|n| n.parse().ok());
            smps.push(n.expect("--smp needs a number of cores"));
        } else {
            runs = a.parse().expect("RUNS: a number");
        }
    }
    let runs: usize = runs.max(1);
    let mut variants: Vec<(String, Vec<String>)> = if images.is_empty() {
        let img = image(Build::Release);
        let flash = flash_image(Build::Release);
        println!(
            "image: {} bytes",
            std::fs::metadata(&img).map(|m| m.len()).unwrap_or(0)
        );
        vec![
            (
                "-kernel".into(),
                vec!["--image".into(), img.display().to_string()],
            ),
            (
                "pflash".into(),
                vec!["--flash".into(), flash.display().to_string()],
            ),
        ]
    } else {
        images
            .iter()
            .map(|p| (p.clone(), vec!["--image".into(), p.clone()]))
            .collect()
    };
    if !smps.is_empty() {
        variants = variants
            .into_iter()
            .filter(|(name, _)| name != "pflash")
            .flat_map(|(name, args)| {
                smps.iter().map(move |n| {
                    let mut args = args.clone();
                    args.extend(["--smp".to_string(), n.to_string()]);
                    (format!("{name} smp {n}"), args)
                })
            })
            .collect();
    }
    let mut wall = vec![Vec::new(); variants.len()];
    let mut fw = vec![Vec::new(); variants.len()];
    for _ in 0..runs {
        for (i, (_, args)) in variants.iter().enumerate() {
            let mut q = Qemu::start(args);
            let (line, t) = q
                .wait_for("keel: ready in ", BOOT_TIMEOUT)
                .unwrap_or_else(|e| panic!("{e}"));
            wall[i].push(t.as_secs_f64() * 1e3);
            let ms = line
                .trim_start_matches("keel: ready in ")
                .split_whitespace()
                .next()
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(f64::NAN);
            fw[i].push(ms);
            q.kill();
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for (i, (name, _)) in variants.iter().enumerate() {
        println!(
            "{name:14} QEMU start to `keel: ready` (wall): {}",
            stats(wall[i].clone())
        );
        println!(
            "{name:14} reset to poll loop (firmware's counter): {}",
            stats(fw[i].clone())
        );
    }
}
