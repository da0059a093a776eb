//! Load generator over any [`Target`]: its workers (one thread each, with its own device:
//! an NVMe/TCP connection, or the host driver with all its queues) keep their devices' depth
//! of commands in flight, random or sequential, read/write/mixed; latency per command into
//! HDR histograms.

use super::{BlockDevice, BlockOp, DataBuf, Request, Target};
use crate::nvme::pattern::{Rng, fill};
use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, OnceLock};
use std::time::{Duration, Instant};

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random, aligned to the I/O size.
    Rand,
    /// Sequential (each connection its own cursor), wrapping at the end of the range.
    Seq,
}

/// Read/write mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rw {
    /// Reads only.
    Read,
    /// Writes only.
    Write,
    /// `mix_read` percent reads, the rest writes.
    Mix,
}

/// When to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this long (commands in flight then finish).
    Duration(Duration),
    /// After this many commands in total.
    Ios(u64),
}

/// A benchmark.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Namespace.
    pub nsid: u32,
    /// Access pattern.
    pub pattern: Pattern,
    /// Mix.
    pub rw: Rw,
    /// Percent reads for [`Rw::Mix`].
    pub mix_read: u8,
    /// Bytes per command.
    pub bs: u32,
    /// Commands in flight per I/O queue.
    pub qd: u16,
    /// I/O queues (NVMe/TCP: connections, each driven by its own thread).
    pub connections: u16,
    /// When to stop.
    pub stop: Stop,
    /// Bytes of the namespace to touch, from LBA 0 (`None`: all of it).
    pub range: Option<u64>,
    /// PRNG seed.
    pub seed: u64,
}

/// Live counters, readable while the benchmark runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Completed commands.
    pub ios: AtomicU64,
    /// Bytes moved.
    pub bytes: AtomicU64,
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.5)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// What a benchmark measured.
#[derive(Debug, Clone)]
pub struct BenchResult {
    /// Completed commands.
    pub ios: u64,
    /// Of which reads.
    pub reads: u64,
    /// Of which writes.
    pub writes: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// From the first submission to the last completion.
    pub elapsed: Duration,
    /// All commands.
    pub latency: Latency,
    /// Reads.
    pub read_latency: Latency,
    /// Writes.
    pub write_latency: Latency,
}

impl BenchResult {
    /// Commands per second.
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// Megabytes (10^6) per second.
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// Mebibytes per second.
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1u64 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

struct ThreadResult {
    reads: Histogram<u64>,
    writes: Histogram<u64>,
    bytes: u64,
    start: Instant,
    end: Instant,
}

fn histogram() -> Histogram<u64> {
    // 3 significant figures, auto-resizing: cannot fail.
    Histogram::new(3).unwrap_or_else(|_| unreachable!("valid sigfig"))
}

/// Runs `cfg` against namespace `cfg.nsid` of `target`.
pub fn run<T: Target>(target: &T, cfg: &BenchConfig, progress: &Progress) -> Result<BenchResult> {
    if cfg.qd == 0 || cfg.connections == 0 || cfg.mix_read > 100 || cfg.bs == 0 {
        bail!("qd, connections and bs must be at least 1, mix-read at most 100");
    }
    target.prepare(cfg.connections)?;
    let workers = target.workers(cfg.connections).max(1);
    let barrier = Barrier::new(workers as usize);
    let start = OnceLock::new();
    let failed = AtomicBool::new(false);
    let claimed = AtomicU64::new(0);
    let more = || {
        !failed.load(Ordering::Relaxed)
            && match cfg.stop {
                Stop::Ios(n) => claimed.fetch_add(1, Ordering::Relaxed) < n,
                Stop::Duration(d) => start
                    .get()
                    .is_some_and(|&s: &Instant| Instant::now() < s + d),
            }
    };
    let results: Vec<Result<ThreadResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|i| {
                let (more, barrier, start, failed) = (&more, &barrier, &start, &failed);
                s.spawn(move || {
                    let dev = target.open(cfg.nsid, cfg.connections, cfg.qd, i);
                    if dev.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    // Every worker connected: the clock starts.
                    barrier.wait();
                    start.get_or_init(Instant::now);
                    let mut dev = dev?;
                    let r = worker(&mut dev, cfg, i, workers, more, progress);
                    if r.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    let closed = target.close(dev);
                    let r = r?;
                    closed?;
                    Ok(r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("benchmark thread panicked")))
            })
            .collect()
    });
    let mut reads = histogram();
    let mut writes = histogram();
    let mut bytes = 0;
    let (mut first, mut last): (Option<Instant>, Option<Instant>) = (None, None);
    for r in results {
        let t = r?;
        let _ = reads.add(&t.reads);
        let _ = writes.add(&t.writes);
        bytes += t.bytes;
        first = Some(first.map_or(t.start, |f| f.min(t.start)));
        last = Some(last.map_or(t.end, |l| l.max(t.end)));
    }
    let mut all = reads.clone();
    let _ = all.add(&writes);
    Ok(BenchResult {
        ios: all.len(),
        reads: reads.len(),
        writes: writes.len(),
        bytes,
        elapsed: match (first, last) {
            (Some(f), Some(l)) => l.saturating_duration_since(f),
            _ => Duration::ZERO,
        },
        latency: Latency::of(&all),
        read_latency: Latency::of(&reads),
        write_latency: Latency::of(&writes),
    })
}

fn worker<D: BlockDevice>(
    dev: &mut D,
    cfg: &BenchConfig,
    index: u16,
    workers: u16,
    more: &(dyn Fn() -> bool + Sync),
    progress: &Progress,
) -> Result<ThreadResult> {
    let g = dev.geometry();
    if !cfg.bs.is_multiple_of(g.block_size) || cfg.bs > dev.max_transfer() {
        bail!(
            "--bs {} must be a multiple of the block size {} and at most the largest transfer {}",
            cfg.bs,
            g.block_size,
            dev.max_transfer()
        );
    }
    let lbas_per_io = (cfg.bs / g.block_size) as u64;
    let range_lbas = cfg
        .range
        .map(|b| (b / g.block_size as u64).min(g.blocks))
        .unwrap_or(g.blocks);
    let slots = range_lbas / lbas_per_io;
    if slots == 0 {
        bail!("range of {range_lbas} blocks holds no {}-byte I/O", cfg.bs);
    }
    let index = index as u64;
    let mut rng = Rng::new(cfg.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let depth = dev.depth().max(1);
    let mut free = Vec::with_capacity(depth);
    for i in 0..depth {
        let mut b = dev.alloc()?;
        let n = (cfg.bs as usize).min(b.bytes().len());
        fill(
            &mut b.bytes_mut()[..n],
            cfg.seed,
            (index << 32) | (i as u64) << 20,
        );
        free.push(b);
    }
    let mut started: Vec<Option<(Instant, bool)>> = vec![None; depth];
    let mut tags: Vec<u64> = (0..depth as u64).rev().collect();
    let mut r = ThreadResult {
        reads: histogram(),
        writes: histogram(),
        bytes: 0,
        start: Instant::now(),
        end: Instant::now(),
    };
    let range_end = slots * lbas_per_io;
    let mut cursor = (slots * index / workers as u64) * lbas_per_io;
    let mut in_flight = 0usize;
    loop {
        while in_flight < depth && !free.is_empty() && more() {
            let write = match cfg.rw {
                Rw::Read => false,
                Rw::Write => true,
                Rw::Mix => rng.below(100) >= cfg.mix_read as u64,
            };
            let lba = match cfg.pattern {
                Pattern::Rand => rng.below(slots) * lbas_per_io,
                Pattern::Seq => {
                    let l = cursor;
                    cursor += lbas_per_io;
                    if cursor >= range_end {
                        cursor = 0;
                    }
                    l
                }
            };
            let (Some(buf), Some(tag)) = (free.pop(), tags.pop()) else {
                break;
            };
            let t0 = Instant::now();
            dev.submit(Request {
                tag,
                op: if write {
                    BlockOp::Write { fua: false }
                } else {
                    BlockOp::Read
                },
                lba,
                blocks: lbas_per_io as u32,
                buf: Some(buf),
            })?;
            started[tag as usize] = Some((t0, write));
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        let done = dev.complete()?;
        in_flight -= 1;
        let now = Instant::now();
        let Some((t0, write)) = started.get_mut(done.tag as usize).and_then(Option::take) else {
            bail!("completion for unknown tag {}", done.tag);
        };
        if let Err(e) = done.result {
            bail!(
                "{} (NSID {}) failed: {e}",
                if write { "Write" } else { "Read" },
                cfg.nsid
            );
        }
        let ns = (now - t0).as_nanos().min(u64::MAX as u128) as u64;
        let h = if write { &mut r.writes } else { &mut r.reads };
        let _ = h.record(ns.max(1));
        r.bytes += cfg.bs as u64;
        r.end = now;
        progress.ios.fetch_add(1, Ordering::Relaxed);
        progress.bytes.fetch_add(cfg.bs as u64, Ordering::Relaxed);
        tags.push(done.tag);
        match done.buf {
            Some(b) => free.push(b),
            None => free.push(dev.alloc()?),
        }
    }
    for b in free {
        dev.free(b);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev::testdev::RamDev;
    use std::sync::Mutex;

    struct RamTarget {
        peaks: Mutex<Vec<usize>>,
    }

    impl Target for RamTarget {
        type Dev = RamDev;
        fn workers(&self, queues: u16) -> u16 {
            queues
        }
        fn open(&self, _nsid: u32, _queues: u16, qd: u16, _index: u16) -> Result<RamDev> {
            Ok(RamDev::new(1 << 20, 512, 8192, qd as usize))
        }
        fn close(&self, dev: RamDev) -> Result<()> {
            self.peaks.lock().unwrap().push(dev.peak);
            Ok(())
        }
    }

    #[test]
    fn counts_and_depth_per_worker() {
        let t = RamTarget {
            peaks: Mutex::new(Vec::new()),
        };
        let cfg = BenchConfig {
            nsid: 1,
            pattern: Pattern::Rand,
            rw: Rw::Mix,
            mix_read: 50,
            bs: 4096,
            qd: 8,
            connections: 3,
            stop: Stop::Ios(3000),
            range: None,
            seed: 1,
        };
        let p = Progress::default();
        let r = run(&t, &cfg, &p).unwrap();
        assert_eq!(r.ios, 3000);
        assert_eq!(r.reads + r.writes, 3000);
        assert!(r.reads > 1000 && r.writes > 1000, "{r:?}");
        assert_eq!(r.bytes, 3000 * 4096);
        assert_eq!(p.ios.load(Ordering::Relaxed), 3000);
        // Three workers, each its own device, none beyond its depth.
        let peaks = t.peaks.lock().unwrap().clone();
        assert_eq!(peaks.len(), 3);
        assert_eq!(peaks.iter().max(), Some(&8), "{peaks:?}");
        let bad = BenchConfig { bs: 1000, ..cfg };
        let e = run(&t, &bad, &p).unwrap_err();
        assert!(e.to_string().contains("multiple of the block size"), "{e}");
    }
}
