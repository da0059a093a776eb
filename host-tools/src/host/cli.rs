//! `keelctl host --window FILE ...`: the subcommands. Options and output are those of
//! `keelctl nvme` (the formatting and benchmark report code is shared with [`crate::nvme`]).

use super::driver::{HostController, IoOp, IoQueue};
use super::nbd::Server;
use super::window::{Emulator, EmulatorConfig, Window};
use crate::nvme::bench::{BenchConfig, BenchResult, Latency, Pattern, Rw, Stop};
use crate::nvme::cli::{
    NsReport, PatternArg, RwArg, bench_json, controller_json, format_bench, format_identify,
    namespace_json,
};
use crate::nvme::pattern::{Rng, fill, human_bytes, mismatches, parse_size};
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
enum IoKindArg {
    Read,
    Write,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

fn seed_arg(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("{s:?}: not a number (decimal or 0x hex)"))
}

/// The window and how long to wait.
#[derive(Debug, Clone, Args)]
pub struct WindowArgs {
    /// The window file shared with the emulated function (`qemu/run --window FILE`).
    #[arg(long, global = true)]
    pub window: Option<PathBuf>,
    /// Bound on every wait (enable, each command), seconds.
    #[arg(long, global = true, default_value_t = 30.0)]
    pub timeout: f64,
}

impl WindowArgs {
    fn open(&self) -> Result<HostController> {
        let path = self.window.as_ref().context("--window FILE is required")?;
        if !(self.timeout > 0.0 && self.timeout < 1e6) {
            bail!("--timeout must be positive");
        }
        let w = Arc::new(Window::open(path)?);
        HostController::open(w, Duration::from_secs_f64(self.timeout))
            .with_context(|| format!("initialising the controller behind {}", path.display()))
    }
}

/// `keelctl host` subcommands.
#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// Identify the controller and its namespaces.
    Identify {
        /// Only this namespace.
        #[arg(long)]
        nsid: Option<u32>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read blocks into a file.
    Read {
        /// Namespace.
        #[arg(long, default_value_t = 1)]
        nsid: u32,
        /// First block.
        #[arg(long)]
        lba: u64,
        /// Number of blocks.
        #[arg(long)]
        count: u64,
        /// Output file ("-": stdout).
        #[arg(short, long)]
        output: PathBuf,
        /// Commands in flight.
        #[arg(long, default_value_t = 16)]
        qd: u16,
    },
    /// Write a file to blocks (its size must be a multiple of the block size).
    Write {
        /// Namespace.
        #[arg(long, default_value_t = 1)]
        nsid: u32,
        /// First block.
        #[arg(long)]
        lba: u64,
        /// Input file.
        #[arg(short, long)]
        input: PathBuf,
        /// Commands in flight.
        #[arg(long, default_value_t = 16)]
        qd: u16,
    },
    /// Write a deterministic pattern over a range, read it back and compare.
    Verify {
        /// Namespace.
        #[arg(long, default_value_t = 1)]
        nsid: u32,
        /// First block.
        #[arg(long)]
        lba: u64,
        /// Number of blocks.
        #[arg(long)]
        count: u64,
        /// Pattern seed (decimal or 0x hex).
        #[arg(long, value_parser = seed_arg, default_value = "0x6b65656c")]
        pattern: u64,
        /// Commands in flight.
        #[arg(long, default_value_t = 16)]
        qd: u16,
        /// Only read and compare (the pattern was written before).
        #[arg(long)]
        read_only: bool,
    },
    /// Measure IOPS, throughput and latency.
    Bench {
        /// Namespace.
        #[arg(long, default_value_t = 1)]
        nsid: u32,
        /// Access pattern.
        #[arg(long, value_enum, default_value_t = PatternArg::Rand)]
        pattern: PatternArg,
        /// Reads, writes or both.
        #[arg(long, value_enum, default_value_t = RwArg::Read)]
        rw: RwArg,
        /// Percent reads with --rw mix.
        #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
        mix_read: u8,
        /// Bytes per command (512, 4k, 128k...).
        #[arg(long, value_parser = size_arg, default_value = "4k")]
        bs: u64,
        /// Commands in flight per queue.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1023))]
        qd: u16,
        /// I/O queue pairs, each driven by its own thread.
        #[arg(long, visible_alias = "connections", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        queues: u16,
        /// Run this many seconds [default: 10 unless --ios].
        #[arg(long, conflicts_with = "ios")]
        duration: Option<f64>,
        /// Run this many commands in total.
        #[arg(long)]
        ios: Option<u64>,
        /// Touch only the first MiB of the namespace.
        #[arg(long)]
        range_mib: Option<u64>,
        /// PRNG seed.
        #[arg(long, value_parser = seed_arg, default_value = "1")]
        seed: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Export a namespace over NBD (fixed newstyle) until interrupted.
    Nbd {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        /// Namespace.
        #[arg(long, default_value_t = 1)]
        nsid: u32,
        /// Clients served at once (one I/O queue pair each).
        #[arg(long, default_value_t = 4)]
        clients: u16,
        /// Commands in flight per client.
        #[arg(long, default_value_t = 32)]
        qd: u16,
    },
    /// Serve the window from this process (an in-process firmware with RAM namespaces), for
    /// use without QEMU. Creates the file if needed.
    Emulate {
        /// Window size.
        #[arg(long, value_parser = size_arg, default_value = "64M")]
        size: u64,
        /// RAM namespace sizes (NSID 1, 2, ...).
        #[arg(long, value_parser = size_arg, value_delimiter = ',', default_value = "64M")]
        ram: Vec<u64>,
        /// Logical block size.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        /// Subsystem NQN.
        #[arg(long, default_value = "nqn.2026-11.dev.keel:pcie0")]
        nqn: String,
        /// Stop after this many seconds (default: run until killed).
        #[arg(long)]
        seconds: Option<f64>,
    },
}

/// Runs a subcommand; returns the exit code (0, or 1 for a verify mismatch).
pub fn run(w: &WindowArgs, cmd: HostCmd, out: &mut dyn Write) -> Result<i32> {
    match cmd {
        HostCmd::Identify { nsid, json } => identify(w, nsid, json, out),
        HostCmd::Read {
            nsid,
            lba,
            count,
            output,
            qd,
        } => {
            let (mut c, mut q, bs) = io_session(w, nsid, qd)?;
            let t0 = Instant::now();
            let data = q.read(nsid, lba, count, bs);
            let t = t0.elapsed();
            finish(&mut c, q);
            let data = data?;
            if output.as_os_str() == "-" {
                out.write_all(&data)?;
            } else {
                std::fs::write(&output, &data)
                    .with_context(|| format!("writing {}", output.display()))?;
            }
            eprintln!(
                "read {count} block(s) ({}) from NSID {nsid} LBA {lba} in {:.1} ms",
                human_bytes(data.len() as u64),
                t.as_secs_f64() * 1e3
            );
            close(c);
            Ok(0)
        }
        HostCmd::Write {
            nsid,
            lba,
            input,
            qd,
        } => {
            let data =
                std::fs::read(&input).with_context(|| format!("reading {}", input.display()))?;
            let (mut c, mut q, bs) = io_session(w, nsid, qd)?;
            if data.is_empty() || !data.len().is_multiple_of(bs as usize) {
                finish(&mut c, q);
                bail!(
                    "{}: {} bytes is not a positive multiple of the block size {bs}",
                    input.display(),
                    data.len()
                );
            }
            let t0 = Instant::now();
            let r = q.write(nsid, lba, &data, bs);
            let t = t0.elapsed();
            finish(&mut c, q);
            r?;
            eprintln!(
                "wrote {} block(s) ({}) to NSID {nsid} LBA {lba} in {:.1} ms",
                data.len() / bs as usize,
                human_bytes(data.len() as u64),
                t.as_secs_f64() * 1e3
            );
            close(c);
            Ok(0)
        }
        HostCmd::Verify {
            nsid,
            lba,
            count,
            pattern,
            qd,
            read_only,
        } => verify(w, nsid, lba, count, pattern, qd, read_only, out),
        HostCmd::Bench {
            nsid,
            pattern,
            rw,
            mix_read,
            bs,
            qd,
            queues,
            duration,
            ios,
            range_mib,
            seed,
            json,
        } => {
            let stop = match (duration, ios) {
                (_, Some(0)) => bail!("--ios must be at least 1"),
                (_, Some(n)) => Stop::Ios(n),
                (Some(d), None) if d > 0.0 && d < 1e7 => Stop::Duration(Duration::from_secs_f64(d)),
                (Some(_), None) => bail!("--duration must be positive"),
                (None, None) => Stop::Duration(Duration::from_secs(10)),
            };
            let cfg = BenchConfig {
                nsid,
                pattern: match pattern {
                    PatternArg::Rand => Pattern::Rand,
                    PatternArg::Seq => Pattern::Seq,
                },
                rw: match rw {
                    RwArg::Read => Rw::Read,
                    RwArg::Write => Rw::Write,
                    RwArg::Mix => Rw::Mix,
                },
                mix_read,
                bs: u32::try_from(bs).context("--bs too large")?,
                qd,
                connections: queues,
                stop,
                range: range_mib.map(|m| m << 20),
                seed,
            };
            let mut c = w.open()?;
            let r = bench(&mut c, &cfg);
            close(c);
            let r = r?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&bench_json(&cfg, &r))?
                )?;
            } else {
                out.write_all(format_bench(&cfg, &r).as_bytes())?;
            }
            Ok(0)
        }
        HostCmd::Nbd {
            listen,
            nsid,
            clients,
            qd,
        } => {
            let c = w.open()?;
            let listener = std::net::TcpListener::bind(&listen)
                .with_context(|| format!("listening on {listen}"))?;
            let server = Server::new(c, nsid, clients, qd)?;
            let e = server.export();
            eprintln!(
                "keelctl host nbd: NSID {nsid} ({} blocks of {} bytes) on nbd://{}/",
                e.blocks,
                e.block_size,
                listener.local_addr()?
            );
            let stop = AtomicBool::new(false);
            server.serve(listener, &stop)?;
            server.shutdown()?;
            Ok(0)
        }
        HostCmd::Emulate {
            size,
            ram,
            block_size,
            nqn,
            seconds,
        } => {
            let path = w.window.as_ref().context("--window FILE is required")?;
            let win = Arc::new(Window::create(path, size as usize)?);
            let emu = Emulator::start(
                win,
                EmulatorConfig {
                    nqn,
                    namespaces: ram,
                    block_size,
                    buffers: 64,
                },
            )?;
            eprintln!("keelctl host emulate: serving {}", path.display());
            match seconds {
                Some(s) => std::thread::sleep(Duration::from_secs_f64(s.max(0.0))),
                None => loop {
                    std::thread::sleep(Duration::from_secs(3600));
                },
            }
            emu.stop()?;
            Ok(0)
        }
    }
}

fn close(c: HostController) {
    if let Err(e) = c.shutdown() {
        eprintln!("keelctl: warning: controller shutdown: {e:#}");
    }
}

fn finish(c: &mut HostController, q: IoQueue) {
    if let Err(e) = c.delete_io_queue(q) {
        eprintln!("keelctl: warning: deleting the I/O queue: {e:#}");
    }
}

/// Opens the controller, one I/O queue pair of `qd` commands, and the namespace's block size.
fn io_session(w: &WindowArgs, nsid: u32, qd: u16) -> Result<(HostController, IoQueue, u32)> {
    let mut c = w.open()?;
    let (bs, _) = c.geometry(nsid)?;
    c.set_io_queues(1)
        .context("Set Features (Number of Queues)")?;
    let mt = c.max_transfer() as usize;
    let q = c.create_io_queue(1, qd.max(1), mt)?;
    Ok((c, q, bs))
}

fn identify(w: &WindowArgs, only: Option<u32>, json: bool, out: &mut dyn Write) -> Result<i32> {
    let mut c = w.open()?;
    let nsids = match only {
        Some(n) => vec![n],
        None => c.active_namespaces().context("listing active namespaces")?,
    };
    let mut nss = Vec::new();
    for nsid in nsids {
        let id = c
            .identify_namespace(nsid)
            .with_context(|| format!("Identify Namespace {nsid}"))?;
        let ids = c.namespace_ids(nsid).ok();
        nss.push(NsReport { nsid, id, ids });
    }
    let (id, vs, mt) = (c.id, c.vs, c.max_transfer());
    close(c);
    if json {
        let v = json!({
            "controller": controller_json(&id, mt),
            "namespaces": nss.iter().map(namespace_json).collect::<Vec<_>>(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        out.write_all(format_identify(&id, mt, vs, &nss).as_bytes())?;
    }
    Ok(0)
}

#[allow(clippy::too_many_arguments)]
fn verify(
    w: &WindowArgs,
    nsid: u32,
    lba: u64,
    count: u64,
    seed: u64,
    qd: u16,
    read_only: bool,
    out: &mut dyn Write,
) -> Result<i32> {
    if count == 0 {
        bail!("--count must be at least 1");
    }
    let (mut c, mut q, bs) = io_session(w, nsid, qd)?;
    let bs64 = bs as u64;
    let window = ((8u64 << 20) / bs64).max(1);
    let mut total_bad = 0u64;
    let mut listed: Vec<u64> = Vec::new();
    let t0 = Instant::now();
    let mut done = 0u64;
    let mut run = || -> Result<()> {
        while done < count {
            let n = window.min(count - done);
            let first = lba + done;
            let mut want = vec![0u8; (n * bs64) as usize];
            fill(&mut want, seed, first * bs64);
            if !read_only {
                q.write(nsid, first, &want, bs)?;
            }
            let got = q.read(nsid, first, n, bs)?;
            let (bad, offs) = mismatches(&got, &want, 16 - listed.len().min(16));
            total_bad += bad;
            listed.extend(offs.into_iter().map(|o| done * bs64 + o as u64));
            done += n;
        }
        Ok(())
    };
    let r = run();
    finish(&mut c, q);
    close(c);
    r?;
    let t = t0.elapsed();
    writeln!(
        out,
        "verify NSID {nsid} LBA {lba}..{} ({}), pattern seed {seed:#x}: {} in {:.1} ms",
        lba + count,
        human_bytes(count * bs64),
        if total_bad == 0 { "OK" } else { "MISMATCH" },
        t.as_secs_f64() * 1e3
    )?;
    if total_bad == 0 {
        return Ok(0);
    }
    writeln!(
        out,
        "{total_bad} byte(s) differ; first offsets from the start of the range:"
    )?;
    for o in &listed {
        writeln!(
            out,
            "  byte {o} (LBA {}, byte {} of the block)",
            lba + o / bs64,
            o % bs64
        )?;
    }
    Ok(1)
}

fn latency(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    Latency {
        count: h.len(),
        mean_us: h.mean() / 1000.0,
        p50_us: us(h.value_at_quantile(0.5)),
        p99_us: us(h.value_at_quantile(0.99)),
        p999_us: us(h.value_at_quantile(0.999)),
        max_us: us(h.max()),
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new(3).unwrap_or_else(|_| unreachable!("valid sigfig"))
}

/// The load generator of `keelctl host bench`: one thread per I/O queue pair, `qd` commands
/// in flight on each.
pub fn bench(c: &mut HostController, cfg: &BenchConfig) -> Result<BenchResult> {
    let (block_size, nsze) = c.geometry(cfg.nsid)?;
    if cfg.bs == 0 || !cfg.bs.is_multiple_of(block_size) || cfg.bs > c.max_transfer() {
        bail!(
            "--bs {} must be a multiple of the block size {block_size} and at most {}",
            cfg.bs,
            c.max_transfer()
        );
    }
    let lbas = (cfg.bs / block_size) as u64;
    let range = cfg
        .range
        .map(|b| (b / block_size as u64).min(nsze))
        .unwrap_or(nsze);
    let slots = range / lbas;
    if slots == 0 {
        bail!("range holds no {}-byte I/O", cfg.bs);
    }
    let granted = c.set_io_queues(cfg.connections)?;
    if granted < cfg.connections {
        bail!(
            "{} queues asked, the controller grants {granted}",
            cfg.connections
        );
    }
    let mut queues = Vec::new();
    for i in 0..cfg.connections {
        queues.push(c.create_io_queue(i + 1, cfg.qd, cfg.bs as usize)?);
    }
    let claimed = AtomicU64::new(0);
    let start = Instant::now();
    let deadline = match cfg.stop {
        Stop::Duration(d) => Some(start + d),
        Stop::Ios(_) => None,
    };
    let more = || match cfg.stop {
        Stop::Ios(n) => claimed.fetch_add(1, Ordering::Relaxed) < n,
        Stop::Duration(_) => deadline.is_some_and(|d| Instant::now() < d),
    };
    type Out = Result<(Histogram<u64>, Histogram<u64>, u64, Instant)>;
    let results: Vec<(IoQueue, Out)> = std::thread::scope(|s| {
        let hs: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, mut q)| {
                let more = &more;
                s.spawn(move || {
                    let r = worker(&mut q, cfg, i as u64, lbas, slots, block_size, more);
                    (q, r)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| panic!("benchmark thread panicked"))
            })
            .collect()
    });
    let (mut reads, mut writes, mut bytes, mut end) = (histogram(), histogram(), 0, start);
    let mut first_err = None;
    for (q, r) in results {
        let _ = c.delete_io_queue(q);
        match r {
            Ok((rh, wh, b, e)) => {
                let _ = reads.add(&rh);
                let _ = writes.add(&wh);
                bytes += b;
                end = end.max(e);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let mut all = reads.clone();
    let _ = all.add(&writes);
    Ok(BenchResult {
        ios: all.len(),
        reads: reads.len(),
        writes: writes.len(),
        bytes,
        elapsed: end - start,
        latency: latency(&all),
        read_latency: latency(&reads),
        write_latency: latency(&writes),
    })
}

fn worker(
    q: &mut IoQueue,
    cfg: &BenchConfig,
    index: u64,
    lbas: u64,
    slots: u64,
    block_size: u32,
    more: &(dyn Fn() -> bool + Sync),
) -> Result<(Histogram<u64>, Histogram<u64>, u64, Instant)> {
    let mut rng = Rng::new(cfg.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut data = vec![0u8; cfg.bs as usize];
    fill(&mut data, cfg.seed, index << 32);
    let mut cursor = (slots * index / cfg.connections as u64) * lbas;
    let mut started: Vec<Option<(Instant, IoKindArg)>> = vec![None; q.depth() as usize];
    let (mut rh, mut wh, mut bytes, mut end) = (histogram(), histogram(), 0u64, Instant::now());
    loop {
        while q.inflight() < q.depth() as usize && more() {
            let write = match cfg.rw {
                Rw::Read => false,
                Rw::Write => true,
                Rw::Mix => rng.below(100) >= cfg.mix_read as u64,
            };
            let lba = match cfg.pattern {
                Pattern::Rand => rng.below(slots) * lbas,
                Pattern::Seq => {
                    let l = cursor;
                    cursor += lbas;
                    if cursor >= slots * lbas {
                        cursor = 0;
                    }
                    l
                }
            };
            let t0 = Instant::now();
            let (op, kind) = if write {
                (IoOp::Write(false), IoKindArg::Write)
            } else {
                (IoOp::Read, IoKindArg::Read)
            };
            let cid = q.submit(op, cfg.nsid, lba, lbas as u32, block_size, Some(&data))?;
            started[cid as usize] = Some((t0, kind));
        }
        if q.inflight() == 0 {
            break;
        }
        let c = q.wait()?;
        let now = Instant::now();
        let Some((t0, kind)) = started.get_mut(c.cqe.cid as usize).and_then(Option::take) else {
            bail!("completion for unknown CID {}", c.cqe.cid);
        };
        if !c.cqe.status.is_success() {
            bail!(
                "{kind:?} on queue {} failed: {}",
                q.qid(),
                crate::nvme::error::describe_status(c.cqe.status)
            );
        }
        let ns = (now - t0).as_nanos().min(u64::MAX as u128) as u64;
        let h = match kind {
            IoKindArg::Read => &mut rh,
            IoKindArg::Write => &mut wh,
        };
        let _ = h.record(ns.max(1));
        bytes += cfg.bs as u64;
        end = now;
    }
    Ok((rh, wh, bytes, end))
}
