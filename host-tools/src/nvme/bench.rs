//! Load generator: N I/O queues (one TCP connection and one thread each), each keeping `qd`
//! commands in flight, random or sequential, read/write/mixed; latency per command into
//! HDR histograms.

use super::ctrl::{Controller, IoKind, IoQueue};
use super::error::NvmeError;
use super::pattern::{Rng, fill};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Commands in flight per connection.
    pub qd: u16,
    /// I/O queues (TCP connections).
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
    end: Instant,
}

fn histogram() -> Histogram<u64> {
    // 3 significant figures, auto-resizing: cannot fail.
    Histogram::new(3).unwrap_or_else(|_| unreachable!("valid sigfig"))
}

/// Runs `cfg` against namespace geometry `block_size` × `nsze` on `ctrl`.
pub fn run(
    ctrl: &Controller,
    cfg: &BenchConfig,
    block_size: u32,
    nsze: u64,
    progress: &Progress,
) -> Result<BenchResult, NvmeError> {
    if block_size == 0 || cfg.bs == 0 || !cfg.bs.is_multiple_of(block_size) {
        return Err(NvmeError::InvalidArgument(format!(
            "block size {} is not a multiple of the namespace's {block_size}",
            cfg.bs
        )));
    }
    if cfg.bs > ctrl.max_transfer() {
        return Err(NvmeError::InvalidArgument(format!(
            "block size {} exceeds the controller's largest transfer {}",
            cfg.bs,
            ctrl.max_transfer()
        )));
    }
    if cfg.qd == 0 || cfg.connections == 0 || cfg.mix_read > 100 {
        return Err(NvmeError::InvalidArgument(
            "qd and connections must be at least 1, mix-read at most 100".into(),
        ));
    }
    let lbas_per_io = (cfg.bs / block_size) as u64;
    let range_lbas = cfg
        .range
        .map(|b| (b / block_size as u64).min(nsze))
        .unwrap_or(nsze);
    let slots = range_lbas / lbas_per_io;
    if slots == 0 {
        return Err(NvmeError::InvalidArgument(format!(
            "range of {range_lbas} blocks holds no {}-byte I/O",
            cfg.bs
        )));
    }
    let granted = ctrl.set_io_queues(cfg.connections)?;
    if granted < cfg.connections {
        return Err(NvmeError::InvalidArgument(format!(
            "{} connections asked, the controller grants {granted} I/O queues",
            cfg.connections
        )));
    }
    let mut queues = Vec::with_capacity(cfg.connections as usize);
    for i in 0..cfg.connections {
        queues.push(ctrl.io_queue(i + 1, cfg.qd)?);
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
    let conns = cfg.connections as u64;
    let results: Vec<Result<(ThreadResult, IoQueue), NvmeError>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let more = &more;
                let cursor0 = (slots * i as u64 / conns) * lbas_per_io;
                s.spawn(move || {
                    worker(
                        q,
                        cfg,
                        i as u64,
                        cursor0,
                        lbas_per_io,
                        slots,
                        more,
                        progress,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(NvmeError::Protocol("benchmark thread panicked".into()))
                })
            })
            .collect()
    });
    let mut reads = histogram();
    let mut writes = histogram();
    let mut bytes = 0;
    let mut end = start;
    let mut first_err = None;
    for r in results {
        match r {
            Ok((t, q)) => {
                let _ = reads.add(&t.reads);
                let _ = writes.add(&t.writes);
                bytes += t.bytes;
                end = end.max(t.end);
                let _ = q.close();
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
        latency: Latency::of(&all),
        read_latency: Latency::of(&reads),
        write_latency: Latency::of(&writes),
    })
}

#[allow(clippy::too_many_arguments)]
fn worker(
    mut q: IoQueue,
    cfg: &BenchConfig,
    index: u64,
    mut cursor: u64,
    lbas_per_io: u64,
    slots: u64,
    more: &(dyn Fn() -> bool + Sync),
    progress: &Progress,
) -> Result<(ThreadResult, IoQueue), NvmeError> {
    let mut rng = Rng::new(cfg.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let depth = q.depth() as usize;
    let mut free: Vec<Vec<u8>> = (0..depth)
        .map(|i| {
            let mut b = vec![0u8; cfg.bs as usize];
            fill(&mut b, cfg.seed, (index << 32) | (i as u64) << 20);
            b
        })
        .collect();
    // CIDs are slot numbers below the depth.
    let mut started: Vec<Option<(Instant, IoKind)>> = vec![None; depth.max(1)];
    let mut r = ThreadResult {
        reads: histogram(),
        writes: histogram(),
        bytes: 0,
        end: Instant::now(),
    };
    let range_end = slots * lbas_per_io;
    loop {
        while q.inflight() < depth && !free.is_empty() && more() {
            let kind = match cfg.rw {
                Rw::Read => IoKind::Read,
                Rw::Write => IoKind::Write,
                Rw::Mix if rng.below(100) < cfg.mix_read as u64 => IoKind::Read,
                Rw::Mix => IoKind::Write,
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
            let buf = free.pop().unwrap_or_default();
            let t0 = Instant::now();
            let cid = q.submit(kind, cfg.nsid, lba, lbas_per_io as u32, buf, cfg.bs)?;
            match started.get_mut(cid as usize) {
                Some(s) => *s = Some((t0, kind)),
                None => {
                    return Err(NvmeError::Protocol(format!(
                        "CID {cid} beyond the queue depth {depth}"
                    )));
                }
            }
        }
        if q.inflight() == 0 {
            break;
        }
        let (cid, done) = q.next_completion()?;
        let now = Instant::now();
        let Some((t0, kind)) = started.get_mut(cid as usize).and_then(Option::take) else {
            return Err(NvmeError::Protocol(format!(
                "completion for unknown CID {cid}"
            )));
        };
        if !done.cqe.status.is_success() {
            return Err(NvmeError::Status {
                command: format!("{kind:?} (NSID {}, queue {})", cfg.nsid, q.qid()),
                status: done.cqe.status,
                dw0: done.cqe.dw0,
            });
        }
        let ns = (now - t0).as_nanos().min(u64::MAX as u128) as u64;
        let h = match kind {
            IoKind::Read => &mut r.reads,
            IoKind::Write => &mut r.writes,
        };
        let _ = h.record(ns.max(1));
        r.bytes += cfg.bs as u64;
        r.end = now;
        progress.ios.fetch_add(1, Ordering::Relaxed);
        progress.bytes.fetch_add(cfg.bs as u64, Ordering::Relaxed);
        free.push(done.buf.unwrap_or_else(|| vec![0u8; cfg.bs as usize]));
    }
    Ok((r, q))
}
