//! Power cuts among the flash writes of a configuration update: the next boot always has a
//! valid configuration, the old one or the new one, never none, and its console says which
//! (`config: copy X (sequence S, generation G) in force`).
//!
//! - During a live `keelctl provision push`: the firmware erases and programs the copy not in
//!   force over QEMU's CFI flash; QEMU traces every bus write to the flash (`-trace
//!   pflash_io_write`) and is killed with SIGKILL right after a random one of them (the writes
//!   of one uncut push are counted first).
//! - During `keelctl flash` of a bundle into a flash file: every state the file can be left in
//!   by a cut (the copy written in order up to byte N, the rest as before) is checked against
//!   the firmware's copy chooser on the host, at every byte; random cut points are booted in
//!   QEMU, whose choice must agree.
//!
//! CI runs a short form; `tests/crash --runs N` cuts N times per case (`KEEL_CRASH_RUNS`).

use keel_host_tools::nvme::pattern::Rng;
use keel_host_tools::provision::keel_provision::{self as kp, flash};
use keel_tests::crash::{runs, seed};
use keel_tests::provision::{Dir, boot_flash, bundle, dev_key, flash_with};
use keel_tests::{Qemu, keelctl, keelctl_ok};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A configuration in force: copy, sequence, generation.
type InForce = (String, u64, u64);

const RAM8: (&str, &str) = ("{ ram = \"8MiB\" }", "none");
const RAM4: (&str, &str) = ("{ ram = \"4MiB\" }", "none");

/// Boots `flash` and returns the configuration the console says is in force.
fn boot_and_read(flash: &Path) -> InForce {
    let (mut q, _, _) = boot_flash(flash, &[]);
    let c = q.console();
    q.kill();
    in_force(&c).unwrap_or_else(|| panic!("no configuration in force after the cut:\n{c}"))
}

/// Parses `config: copy X (sequence S, generation G) in force`.
fn in_force(console: &str) -> Option<InForce> {
    let l = console.lines().find(|l| l.contains(") in force"))?;
    let rest = &l[l.find("config: copy ")? + "config: copy ".len()..];
    let copy = rest.split_whitespace().next()?.to_string();
    let num = |key: &str| -> Option<u64> {
        let i = rest.find(key)? + key.len();
        rest[i..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    };
    Some((copy, num("sequence ")?, num("generation ")?))
}

/// Flash bus writes QEMU traced so far.
fn flash_writes(q: &Qemu) -> usize {
    q.console()
        .lines()
        .filter(|l| l.starts_with("pflash_io_write"))
        .count()
}

/// Base flash: generation 100 in copy A (sequence 1), 200 in copy B (sequence 2, in force);
/// and the bundle of generation 300 that the update writes over copy A.
fn setup(d: &Dir) -> (std::path::PathBuf, std::path::PathBuf) {
    let one = bundle(d, "one.bundle", 100, &[RAM8]);
    let two = bundle(d, "two.bundle", 200, &[RAM8, RAM4]);
    let three = bundle(d, "three.bundle", 300, &[RAM4]);
    (flash_with(d, &[&one, &two]), three)
}

fn old() -> InForce {
    ("B".into(), 2, 200)
}

fn new() -> InForce {
    ("A".into(), 3, 300)
}

/// Boots `fl` with flash writes traced, pushes `bundle`, and kills QEMU right after flash
/// write number `cut` of the push (`None`: lets the push finish). Returns the writes seen.
fn push_and_cut(fl: &Path, bundle: &Path, cut: Option<usize>) -> usize {
    let (mut q, _, dev) = boot_flash(fl, &["--", "-trace", "enable=pflash_io_write"]);
    let before = flash_writes(&q);
    let key = dev_key();
    let mut push = Command::new(keelctl())
        .args(["provision", "push"])
        .arg(bundle)
        .args(["--device", &dev, "--key"])
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("keelctl provision push");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = push.try_wait().expect("keelctl").is_some();
        let seen = flash_writes(&q) - before;
        if cut.is_some_and(|k| seen >= k) || (done && cut.is_none()) || Instant::now() > deadline {
            break;
        }
        if done {
            // The push finished before the cut point: cut now (after every write).
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    q.kill();
    let seen = flash_writes(&q) - before;
    let deadline = Instant::now() + Duration::from_secs(30);
    while push.try_wait().expect("keelctl").is_none() {
        if Instant::now() > deadline {
            let _ = push.kill();
            let _ = push.wait();
            panic!("keelctl provision push hung after QEMU was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    seen
}

#[test]
fn a_power_cut_during_a_live_push_leaves_the_old_or_the_new_configuration() {
    let d = Dir::new("cut-push");
    let (fl, three) = setup(&d);
    let pristine = std::fs::read(&fl).expect("flash");
    assert_eq!(boot_and_read(&fl), old());

    // An uncut push: how many flash writes it takes, and its result.
    let total = push_and_cut(&fl, &three, None);
    assert!(total > 0, "no flash write traced during the push");
    assert_eq!(boot_and_read(&fl), new(), "the uncut push");

    let seed = seed();
    let mut rng = Rng::new(seed);
    let (mut olds, mut news) = (0, 0);
    let cuts = runs(2);
    for i in 0..cuts {
        std::fs::write(&fl, &pristine).expect("restore flash");
        let k = 1 + rng.below(total as u64) as usize;
        let seen = push_and_cut(&fl, &three, Some(k));
        let got = boot_and_read(&fl);
        assert!(
            got == old() || got == new(),
            "cut {i} after flash write {seen} of {total} (seed {seed}): {got:?}"
        );
        if got == old() { olds += 1 } else { news += 1 }
    }
    eprintln!(
        "KEEL-CRASH push power cuts (seed {seed}): {cuts} cuts among {total} flash writes: \
         {olds} old, {news} new, 0 without a configuration"
    );
}

#[test]
fn a_power_cut_during_keelctl_flash_leaves_the_old_or_the_new_configuration() {
    let d = Dir::new("cut-flash");
    let (fl, three) = setup(&d);
    let before = std::fs::read(&fl).expect("flash");
    keelctl_ok(&[
        "flash",
        three.to_str().unwrap(),
        "--to",
        fl.to_str().unwrap(),
    ]);
    let after = std::fs::read(&fl).expect("flash");
    // keelctl flash writes the whole copy in one pass from its start; a cut leaves the copy
    // new up to some byte and as before from there.
    let start = flash::ConfigCopy::A.offset();
    let end = start + flash::CONFIG_COPY_SIZE;
    assert_eq!(before[..start], after[..start]);
    assert_eq!(before[end..], after[end..]);
    let cut_at = |n: usize| {
        let mut img = before.clone();
        img[start..n].copy_from_slice(&after[start..n]);
        img
    };
    let expect = |img: &[u8]| -> InForce {
        let (a, b) = keel_host_tools::image::config_regions(img);
        let (copy, e) = flash::chosen_config(a, b).expect("no configuration");
        let generation = kp::inspect(e.payload).expect("bundle").generation;
        (copy.name().to_string(), e.sequence, generation)
    };

    // Every cut point on the host: the chooser the firmware uses.
    let last = start
        + (0..flash::CONFIG_COPY_SIZE)
            .rev()
            .find(|&i| before[start + i] != after[start + i])
            .expect("keelctl flash changed nothing");
    let points: Vec<usize> = (start..=last + 1).collect();
    let (mut olds, mut news) = (0, 0);
    for &n in &points {
        let got = expect(&cut_at(n));
        assert!(
            got == old() || got == new(),
            "cut after {} bytes: {got:?}",
            n - start
        );
        if got == old() { olds += 1 } else { news += 1 }
    }
    assert!(olds > 0 && news > 0, "{olds} old, {news} new");
    eprintln!(
        "KEEL-CRASH keelctl flash cut points on the host: {} ({olds} old, {news} new)",
        points.len()
    );

    // Random cuts booted: the real image agrees with the host.
    let seed = seed();
    let mut rng = Rng::new(seed);
    let cuts = runs(2);
    for i in 0..cuts {
        // Half the cuts within the copy's header, where a torn write is likeliest to fool it.
        let span = if i % 2 == 0 { 64 } else { last + 2 - start };
        let n = start + rng.below(span as u64) as usize;
        let img = cut_at(n);
        std::fs::write(&fl, &img).expect("cut flash");
        let want = expect(&img);
        assert_eq!(
            boot_and_read(&fl),
            want,
            "cut after {} bytes (seed {seed})",
            n - start
        );
    }
    eprintln!("KEEL-CRASH keelctl flash power cuts booted (seed {seed}): {cuts}, all agree");
}
