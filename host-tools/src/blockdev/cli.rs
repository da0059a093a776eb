//! The I/O subcommands `keelctl nvme` and `keelctl host` share: `read`, `write`, `verify`,
//! `bench`, with the same options and output, run against any [`Target`].

use super::bench::{self, BenchConfig, BenchResult, Latency, Progress, Stop};
use super::{BlockDevice, Target};
use crate::nvme::pattern::{human_bytes, parse_size};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

/// Parses a decimal or `0x` hexadecimal number.
pub fn seed_arg(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?}: not a number (decimal or 0x hex)"))
}

/// Bench access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PatternArg {
    /// Random.
    Rand,
    /// Sequential.
    Seq,
}

/// Bench read/write mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RwArg {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Both (--mix-read percent reads).
    Mix,
}

/// The blocks a command works on.
#[derive(Debug, Clone, Args)]
pub struct Blocks {
    /// Namespace.
    #[arg(long, default_value_t = 1)]
    pub nsid: u32,
    /// First block.
    #[arg(long)]
    pub lba: u64,
    /// Number of blocks.
    #[arg(long)]
    pub count: u64,
}

/// `read`.
#[derive(Debug, Clone, Args)]
pub struct ReadArgs {
    /// The blocks.
    #[command(flatten)]
    pub blocks: Blocks,
    /// Output file ("-": stdout).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Commands in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub qd: u16,
}

/// `write`.
#[derive(Debug, Clone, Args)]
pub struct WriteArgs {
    /// Namespace.
    #[arg(long, default_value_t = 1)]
    pub nsid: u32,
    /// First block.
    #[arg(long)]
    pub lba: u64,
    /// Input file.
    #[arg(short, long)]
    pub input: PathBuf,
    /// Commands in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub qd: u16,
}

/// `verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// The blocks.
    #[command(flatten)]
    pub blocks: Blocks,
    /// Pattern seed (decimal or 0x hex).
    #[arg(long, value_parser = seed_arg, default_value = "0x6b65656c")]
    pub pattern: u64,
    /// Commands in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub qd: u16,
    /// Only read and compare (the pattern was written before).
    #[arg(long)]
    pub read_only: bool,
}

/// `bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Namespace.
    #[arg(long, default_value_t = 1)]
    pub nsid: u32,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = PatternArg::Rand)]
    pub pattern: PatternArg,
    /// Reads, writes or both.
    #[arg(long, value_enum, default_value_t = RwArg::Read)]
    pub rw: RwArg,
    /// Percent reads with --rw mix.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub mix_read: u8,
    /// Bytes per command (512, 4k, 128k...).
    #[arg(long, value_parser = size_arg, default_value = "4k")]
    pub bs: u64,
    /// Commands in flight per I/O queue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub qd: u16,
    /// I/O queues: NVMe/TCP, one TCP connection and thread each; an emulated function, queue
    /// pairs of its one driver thread.
    #[arg(long, visible_alias = "queues", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub connections: u16,
    /// Run this many seconds [default: 10 unless --ios].
    #[arg(long, conflicts_with = "ios")]
    pub duration: Option<f64>,
    /// Run this many commands in total.
    #[arg(long)]
    pub ios: Option<u64>,
    /// Touch only the first MiB of the namespace.
    #[arg(long)]
    pub range_mib: Option<u64>,
    /// PRNG seed.
    #[arg(long, value_parser = seed_arg, default_value = "1")]
    pub seed: u64,
    /// Write stamped blocks (LBA, generation, checksum), check every read against the last
    /// acknowledged write and read everything written back at the end; exit 1 on a mismatch.
    #[arg(long)]
    pub verify: bool,
    /// Also report each connection's latency (one worker per connection): shows whether
    /// some connections' commands wait longer than others'.
    #[arg(long)]
    pub per_connection: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    /// The benchmark these options describe.
    pub fn config(&self) -> Result<BenchConfig> {
        let stop = match (self.duration, self.ios) {
            (_, Some(0)) => bail!("--ios must be at least 1"),
            (_, Some(n)) => Stop::Ios(n),
            (Some(d), None) if d > 0.0 && d < 1e7 => Stop::Duration(Duration::from_secs_f64(d)),
            (Some(_), None) => bail!("--duration must be positive"),
            (None, None) => Stop::Duration(Duration::from_secs(10)),
        };
        Ok(BenchConfig {
            nsid: self.nsid,
            pattern: match self.pattern {
                PatternArg::Rand => bench::Pattern::Rand,
                PatternArg::Seq => bench::Pattern::Seq,
            },
            rw: match self.rw {
                RwArg::Read => bench::Rw::Read,
                RwArg::Write => bench::Rw::Write,
                RwArg::Mix => bench::Rw::Mix,
            },
            mix_read: self.mix_read,
            bs: u32::try_from(self.bs).context("--bs too large")?,
            qd: self.qd,
            connections: self.connections,
            stop,
            range: self.range_mib.map(|m| m << 20),
            seed: self.seed,
            verify: self.verify,
            per_connection: self.per_connection,
        })
    }
}

/// The I/O subcommands.
#[derive(Debug, Subcommand)]
pub enum IoCmd {
    /// Read blocks into a file.
    Read(ReadArgs),
    /// Write a file to blocks (its size must be a multiple of the block size).
    Write(WriteArgs),
    /// Write a deterministic pattern over a range, read it back and compare.
    Verify(VerifyArgs),
    /// Measure IOPS, throughput and latency.
    Bench(BenchArgs),
}

/// Runs an I/O subcommand against `target`; returns the exit code (0, or 1 for a verify
/// mismatch).
pub fn run<T: Target>(target: &T, cmd: IoCmd, out: &mut dyn Write) -> Result<i32> {
    match cmd {
        IoCmd::Read(a) => read(target, &a, out),
        IoCmd::Write(a) => write(target, &a),
        IoCmd::Verify(a) => verify(target, &a, out),
        IoCmd::Bench(a) => run_bench(target, &a, out),
    }
}

/// Opens namespace `nsid` on one queue of `qd`, runs `f`, and closes the device whether `f`
/// succeeded or not (a failed close is a warning).
fn with_device<T: Target, R>(
    target: &T,
    nsid: u32,
    qd: u16,
    f: impl FnOnce(&mut T::Dev) -> Result<R>,
) -> Result<R> {
    target.prepare(1)?;
    let mut dev = target.open(nsid, 1, qd, 0)?;
    let r = f(&mut dev);
    if let Err(e) = target.close(dev) {
        eprintln!("keelctl: warning: closing: {e:#}");
    }
    r
}

fn check_range(nsid: u32, lba: u64, count: u64) -> Result<()> {
    if count == 0 {
        bail!("--count must be at least 1");
    }
    // The controller answers LBA Out of Range itself; only what cannot be sent is refused.
    if lba.checked_add(count).is_none() {
        bail!("NSID {nsid}: LBA {lba} + {count} blocks overflows");
    }
    Ok(())
}

/// "read 8 block(s) (4 KiB) from NSID 1 LBA 0 in 1.2 ms (3.4 MB/s)" on stderr.
fn report(what: &str, count: u64, bytes: u64, nsid: u32, lba: u64, t: Duration) {
    eprintln!(
        "{what} {count} block(s) ({}) {} NSID {nsid} LBA {lba} in {:.1} ms ({:.1} MB/s)",
        human_bytes(bytes),
        if what == "read" { "from" } else { "to" },
        t.as_secs_f64() * 1e3,
        bytes as f64 / 1e6 / t.as_secs_f64().max(1e-9)
    );
}

fn read<T: Target>(target: &T, args: &ReadArgs, out: &mut dyn Write) -> Result<i32> {
    let a = &args.blocks;
    check_range(a.nsid, a.lba, a.count)?;
    let (data, t) = with_device(target, a.nsid, args.qd, |dev| {
        let bs = dev.geometry().block_size as u64;
        let len = a
            .count
            .checked_mul(bs)
            .filter(|&n| n <= isize::MAX as u64)
            .context("--count too large")?;
        let mut data = vec![0u8; len as usize];
        let t0 = Instant::now();
        super::read(dev, a.lba, &mut data)?;
        Ok((data, t0.elapsed()))
    })?;
    if args.output.as_os_str() == "-" {
        out.write_all(&data)?;
    } else {
        std::fs::write(&args.output, &data)
            .with_context(|| format!("writing {}", args.output.display()))?;
    }
    report("read", a.count, data.len() as u64, a.nsid, a.lba, t);
    Ok(0)
}

fn write<T: Target>(target: &T, a: &WriteArgs) -> Result<i32> {
    let data = std::fs::read(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let (count, t) = with_device(target, a.nsid, a.qd, |dev| {
        let bs = dev.geometry().block_size as usize;
        if data.is_empty() || !data.len().is_multiple_of(bs) {
            bail!(
                "{}: {} bytes is not a positive multiple of the block size {bs}",
                a.input.display(),
                data.len()
            );
        }
        let count = (data.len() / bs) as u64;
        check_range(a.nsid, a.lba, count)?;
        let t0 = Instant::now();
        super::write(dev, a.lba, &data)?;
        Ok((count, t0.elapsed()))
    })?;
    report("wrote", count, data.len() as u64, a.nsid, a.lba, t);
    Ok(0)
}

fn verify<T: Target>(target: &T, args: &VerifyArgs, out: &mut dyn Write) -> Result<i32> {
    let a = &args.blocks;
    check_range(a.nsid, a.lba, a.count)?;
    let (bs, r, t) = with_device(target, a.nsid, args.qd, |dev| {
        let bs = dev.geometry().block_size as u64;
        let t0 = Instant::now();
        let r = super::verify(dev, a.lba, a.count, args.pattern, args.read_only)?;
        Ok((bs, r, t0.elapsed()))
    })?;
    writeln!(
        out,
        "verify NSID {} LBA {}..{} ({}), pattern seed {:#x}: {} in {:.1} ms",
        a.nsid,
        a.lba,
        a.lba + a.count,
        human_bytes(a.count * bs),
        args.pattern,
        if r.bad == 0 { "OK" } else { "MISMATCH" },
        t.as_secs_f64() * 1e3
    )?;
    if r.bad == 0 {
        return Ok(0);
    }
    writeln!(
        out,
        "{} byte(s) differ; first offsets from the start of the range:",
        r.bad
    )?;
    for o in &r.offsets {
        writeln!(
            out,
            "  byte {o} (LBA {}, byte {} of the block)",
            a.lba + o / bs,
            o % bs
        )?;
    }
    Ok(1)
}

fn latency_json(l: &Latency) -> Value {
    json!({
        "count": l.count,
        "mean_us": l.mean_us,
        "p50_us": l.p50_us,
        "p99_us": l.p99_us,
        "p99_9_us": l.p999_us,
        "max_us": l.max_us,
    })
}

/// JSON of a benchmark result.
pub fn bench_json(cfg: &BenchConfig, r: &BenchResult) -> Value {
    json!({
        "config": {
            "nsid": cfg.nsid,
            "pattern": format!("{:?}", cfg.pattern).to_lowercase(),
            "rw": format!("{:?}", cfg.rw).to_lowercase(),
            "mix_read": cfg.mix_read,
            "bs": cfg.bs,
            "qd": cfg.qd,
            "connections": cfg.connections,
            "verify": cfg.verify,
        },
        "ios": r.ios,
        "reads": r.reads,
        "writes": r.writes,
        "bytes": r.bytes,
        "elapsed_s": r.elapsed.as_secs_f64(),
        "iops": r.iops(),
        "mb_per_s": r.mb_per_s(),
        "mib_per_s": r.mib_per_s(),
        "latency": latency_json(&r.latency),
        "read_latency": latency_json(&r.read_latency),
        "write_latency": latency_json(&r.write_latency),
        "verify": cfg.verify.then(|| json!({
            "load_blocks": r.verify.load_blocks,
            "readback_blocks": r.verify.readback_blocks,
            "errors": r.verify.errors,
            "problems": r.verify.problems,
        })),
        "per_connection": cfg.per_connection.then(|| {
            r.per_connection.iter().map(latency_json).collect::<Vec<_>>()
        }),
    })
}

fn latency_line(name: &str, l: &Latency) -> String {
    format!(
        "{name:<6} lat (us): mean {:.1}, p50 {:.1}, p99 {:.1}, p99.9 {:.1}, max {:.1} ({} ios)\n",
        l.mean_us, l.p50_us, l.p99_us, l.p999_us, l.max_us, l.count
    )
}

/// Human form of a benchmark result.
pub fn format_bench(cfg: &BenchConfig, r: &BenchResult) -> String {
    let mut s = format!(
        "{} {} bs={} qd={} connections={}: {} ios in {:.2} s\n",
        format!("{:?}", cfg.pattern).to_lowercase(),
        format!("{:?}", cfg.rw).to_lowercase(),
        human_bytes(cfg.bs as u64),
        cfg.qd,
        cfg.connections,
        r.ios,
        r.elapsed.as_secs_f64()
    );
    s += &format!(
        "IOPS {:.0}, {:.2} MB/s ({:.2} MiB/s)\n",
        r.iops(),
        r.mb_per_s(),
        r.mib_per_s()
    );
    s += &latency_line("all", &r.latency);
    if r.reads > 0 && r.writes > 0 {
        s += &latency_line("read", &r.read_latency);
        s += &latency_line("write", &r.write_latency);
    }
    if cfg.per_connection {
        for (i, l) in r.per_connection.iter().enumerate() {
            s += &latency_line(&format!("conn{i}"), l);
        }
    }
    if cfg.verify {
        let v = &r.verify;
        s += &format!(
            "verify: {} blocks checked ({} by the load's reads, {} read back after it), {} \
             error(s)\n",
            v.load_blocks + v.readback_blocks,
            v.load_blocks,
            v.readback_blocks,
            v.errors
        );
        for p in &v.problems {
            s += &format!("  {p}\n");
        }
    }
    s
}

fn run_bench<T: Target>(target: &T, a: &BenchArgs, out: &mut dyn Write) -> Result<i32> {
    let cfg = a.config()?;
    let progress = Progress::default();
    let live = !a.json && std::io::stdout().is_terminal();
    let done = std::sync::atomic::AtomicBool::new(false);
    let r = std::thread::scope(|s| {
        let bar = live.then(|| {
            let (p, done, stop) = (&progress, &done, cfg.stop);
            s.spawn(move || show_progress(p, done, stop))
        });
        let r = bench::run(target, &cfg, &progress);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = bar {
            let _ = h.join();
        }
        r
    })
    .context("benchmark")?;
    if a.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&bench_json(&cfg, &r))?
        )?;
    } else {
        out.write_all(format_bench(&cfg, &r).as_bytes())?;
    }
    Ok(if r.verify.errors > 0 { 1 } else { 0 })
}

fn show_progress(p: &Progress, done: &std::sync::atomic::AtomicBool, stop: Stop) {
    use indicatif::{ProgressBar, ProgressStyle};
    use std::sync::atomic::Ordering;
    let (len, style) = match stop {
        Stop::Ios(n) => (n, "{bar:40} {pos}/{len} ios  {msg}"),
        Stop::Duration(d) => (d.as_millis() as u64, "{bar:40} {elapsed}  {msg}"),
    };
    let bar = ProgressBar::new(len);
    if let Ok(st) = ProgressStyle::with_template(style) {
        bar.set_style(st);
    }
    let t0 = Instant::now();
    let mut last = (t0, 0u64);
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        let ios = p.ios.load(Ordering::Relaxed);
        let now = Instant::now();
        let iops = (ios - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-6);
        last = (now, ios);
        bar.set_position(match stop {
            Stop::Ios(_) => ios,
            Stop::Duration(_) => t0.elapsed().as_millis() as u64,
        });
        bar.set_message(format!("{iops:.0} IOPS"));
    }
    bar.finish_and_clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct T {
        #[command(subcommand)]
        cmd: IoCmd,
    }

    fn parse(args: &[&str]) -> Result<IoCmd, clap::Error> {
        T::try_parse_from(std::iter::once("io").chain(args.iter().copied())).map(|t| t.cmd)
    }

    #[test]
    fn bench_args() {
        let IoCmd::Bench(a) = parse(&[
            "bench",
            "--bs",
            "8k",
            "--qd",
            "32",
            "--rw",
            "mix",
            "--mix-read",
            "50",
            "--ios",
            "2000",
            "--pattern",
            "seq",
            "--queues",
            "2",
        ])
        .unwrap() else {
            panic!("not bench")
        };
        assert_eq!(
            (
                a.bs,
                a.qd,
                a.rw,
                a.mix_read,
                a.ios,
                a.duration,
                a.connections
            ),
            (8192, 32, RwArg::Mix, 50, Some(2000), None, 2)
        );
        assert_eq!(a.pattern, PatternArg::Seq);
        let c = a.config().unwrap();
        assert_eq!(c.stop, Stop::Ios(2000));
        assert!(parse(&["bench", "--ios", "1", "--duration", "2"]).is_err());
        assert!(parse(&["bench", "--mix-read", "101"]).is_err());
        assert!(parse(&["bench", "--qd", "0"]).is_err());
        assert!(parse(&["bench", "--bs", "4q"]).is_err());
        assert!(parse(&["bench", "--pattern", "zigzag"]).is_err());
        let IoCmd::Bench(a) = parse(&["bench", "--ios", "0"]).unwrap() else {
            panic!()
        };
        assert!(a.config().is_err());
    }

    #[test]
    fn io_args() {
        assert!(
            parse(&["read", "--lba", "0", "-o", "x"]).is_err(),
            "count required"
        );
        let IoCmd::Verify(v) =
            parse(&["verify", "--lba", "0", "--count", "1", "--pattern", "0x10"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (v.pattern, v.blocks.nsid, v.qd, v.read_only),
            (16, 1, 16, false)
        );
        assert!(check_range(1, u64::MAX, 2).is_err());
        assert!(check_range(1, 0, 0).is_err());
    }
}
