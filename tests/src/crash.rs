//! Crash-consistency campaigns: a verifiable write workload against a drive namespace of the
//! real image in QEMU (QEMU's NVMe device on a file), QEMU killed with SIGKILL at a random
//! moment, the same image booted again on the same file, and every block checked against
//! what the host was told.
//!
//! Every block the workload writes carries a header (magic `KEELCRSH`, its LBA, the
//! generation of the command that wrote it, its index in that command and the command's
//! length), a pattern derived from those, and a checksum of all of it, so a block read back is
//! either all zeroes, exactly one known version, or damaged (torn), never ambiguous.
//!
//! The workload mixes Write, Write with FUA, Flush, Write Zeroes and Deallocate (the last two
//! when the namespace offers them) over a small region, several commands in flight, never two
//! in flight on the same block. The [`Model`] keeps, per block, every version written since
//! the last one that had to survive, and applies the durability rules of NVMe base 2.0:
//!
//! - a Write with FUA that completed is on non-volatile media (NVM Command Set 1.0, Write
//!   command, FUA bit): from then on that version or a newer one must be read;
//! - a Flush that completed makes every write that completed before the Flush was submitted
//!   durable (NVM Command Set 1.0, Flush command);
//! - anything else may come back old or new: any version written since the last durable one
//!   (a volatile cache may write back some and lose others), or the durable one;
//! - Write Zeroes reads back as zeroes; a deallocated block reads back as zeroes when DLFEAT
//!   (Identify Namespace byte 33, bits 2:0 = 001b) says so, and as anything otherwise, or as
//!   what it held before: Dataset Management is advisory (a compliant controller may take no
//!   action; QEMU's NVMe device with the default `discard=ignore` keeps the data);
//! - nothing is torn within the atomic write unit Identify reports: AWUPF (Identify
//!   Controller bytes 529:528, 0's based) or NAWUPF (Identify Namespace bytes 37:36, when
//!   NSFEAT bit 1 is set): a command of at most that many blocks is found whole or not at
//!   all; and every block is whole (its checksum holds).
//!
//! A block that holds a version older than one that had to survive is a *lost write*; a
//! block that holds something never written there, or a damaged block, is *corrupt*; a
//! command found partly is *torn*. A healthy target has none of them.
//!
//! The same campaign runs through NVMe/TCP (`keel_host_tools::nvme`, in process) and through
//! the emulated PCIe function (`keel_host_tools::host` over the window file).

use crate::{BOOT_TIMEOUT, Build, Qemu, ScratchFile, free_port, root};
use keel_host_tools::blockdev::{BlockDevice, BlockOp, Request};
use keel_host_tools::host::{HostConfig, HostController, HostDevice, Window};
use keel_host_tools::nvme::pattern::{self, Rng, Stamp};
use keel_host_tools::nvme::{Controller, IoQueue as TcpQueue, Params};
use keel_nvme::identify::{IdentifyController, cns};
use keel_nvme::io::{DsmCommand, DsmRange, RwCommand};
use keel_nvme::{IoOpcode, Sqe};
use keel_storage::IoBuf;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The marker at the start of every block the workload writes.
pub use pattern::STAMP_MAGIC as MAGIC;
/// Fills `block` with the workload's content for `lba`, written by command `generation` as
/// its block `index` of `count` (the stamped blocks of `keelctl nvme bench --verify`).
pub use pattern::stamp_block as encode_block;

/// What a block holds (or may hold).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// All zero bytes.
    Zero,
    /// A block written by the workload's command of this generation.
    Gen(u64),
    /// Other content (what was there before the workload, deallocated blocks), by hash.
    Opaque(u64),
    /// A block of the workload whose checksum or LBA does not hold: damaged. Never allowed.
    Damaged(u64),
    /// Deallocated where DLFEAT promises nothing: anything that reads back is allowed.
    Undefined,
}

impl Version {
    fn admits(self, shown: Version) -> bool {
        self == Version::Undefined || (self == shown && !matches!(shown, Version::Damaged(_)))
    }
}

/// What a block read back at `lba` holds.
pub fn classify(block: &[u8], lba: u64) -> Version {
    match pattern::read_stamp(block, lba) {
        Stamp::Zero => Version::Zero,
        Stamp::Gen(g) => Version::Gen(g),
        Stamp::Foreign(h) => Version::Opaque(h),
        Stamp::Damaged(h) => Version::Damaged(h),
    }
}

/// A command of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Write, with FUA or not.
    Write {
        /// Force Unit Access.
        fua: bool,
    },
    /// Write Zeroes.
    Zeroes,
    /// Dataset Management, deallocate.
    Deallocate,
    /// Flush.
    Flush,
}

/// A command in flight.
#[derive(Clone, Copy, Debug)]
pub struct Op {
    /// What it is.
    pub kind: OpKind,
    /// First block (0 for Flush).
    pub lba: u64,
    /// Blocks (0 for Flush).
    pub nlb: u32,
    /// Its generation (unique over the campaign).
    pub generation: u64,
    /// Host event counter when it was submitted.
    pub submitted: u64,
}

#[derive(Clone, Debug)]
struct Entry {
    /// What the block may hold because of this command (a Deallocate may also leave what was
    /// there: the command is advisory).
    alts: Vec<Version>,
    generation: u64,
    /// Host event counter at its completion, if it completed successfully.
    acked: Option<u64>,
    /// Whether it became durable during the run (FUA or Flush).
    guaranteed: bool,
}

impl Entry {
    fn admits(&self, shown: Version) -> bool {
        self.alts.iter().any(|a| a.admits(shown))
    }
}

#[derive(Debug)]
struct Block {
    /// Versions since (and including) the one that must survive, oldest first.
    hist: Vec<Entry>,
    /// Versions older than the one that must survive (since the last check).
    past: Vec<Version>,
    busy: bool,
}

impl Block {
    /// Entry `i` must survive: what is older becomes past.
    fn durable(&mut self, i: usize) {
        self.past
            .extend(self.hist.drain(..i).flat_map(|e| e.alts.into_iter()));
        if self.hist[0].generation != 0 {
            self.hist[0].guaranteed = true;
        }
    }
}

/// Counters of a campaign.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// QEMU kills.
    pub kills: u64,
    /// Commands submitted.
    pub submitted: u64,
    /// Writes (with or without FUA) acknowledged.
    pub writes_acked: u64,
    /// Of them with FUA.
    pub fua_acked: u64,
    /// Flushes acknowledged.
    pub flushes_acked: u64,
    /// Write Zeroes and Deallocate acknowledged.
    pub others_acked: u64,
    /// Blocks read back and checked.
    pub blocks_checked: u64,
    /// Of them, blocks whose version had to survive (made durable by FUA or Flush).
    pub durable_checked: u64,
    /// Acknowledged writes whose blocks were all checked after a kill.
    pub writes_checked: u64,
    /// Blocks holding a version older than one that had to survive.
    pub lost: u64,
    /// Blocks holding a version never written there, or damaged.
    pub corrupt: u64,
    /// Commands within the atomic write unit found partly.
    pub torn: u64,
    /// Commands that failed during the workload.
    pub errors: u64,
    /// The first problems, described.
    pub problems: Vec<String>,
}

impl Tally {
    fn problem(&mut self, p: String) {
        if self.problems.len() < 20 {
            self.problems.push(p);
        }
    }

    /// Adds another campaign's counters.
    pub fn add(&mut self, o: &Tally) {
        self.kills += o.kills;
        self.submitted += o.submitted;
        self.writes_acked += o.writes_acked;
        self.fua_acked += o.fua_acked;
        self.flushes_acked += o.flushes_acked;
        self.others_acked += o.others_acked;
        self.blocks_checked += o.blocks_checked;
        self.durable_checked += o.durable_checked;
        self.writes_checked += o.writes_checked;
        self.lost += o.lost;
        self.corrupt += o.corrupt;
        self.torn += o.torn;
        self.errors += o.errors;
        for p in &o.problems {
            self.problem(p.clone());
        }
    }

    /// Whether nothing went wrong.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.corrupt == 0 && self.torn == 0 && self.errors == 0
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} kills, {} commands, {} writes acknowledged ({} FUA), {} flushes, {} write \
             zeroes/deallocate; {} blocks checked ({} durable), {} acknowledged writes checked; \
             lost {}, corrupt {}, torn {}, errors {}",
            self.kills,
            self.submitted,
            self.writes_acked,
            self.fua_acked,
            self.flushes_acked,
            self.others_acked,
            self.blocks_checked,
            self.durable_checked,
            self.writes_checked,
            self.lost,
            self.corrupt,
            self.torn,
            self.errors
        )
    }
}

/// What the host knows of every block of the region.
#[derive(Debug)]
pub struct Model {
    blocks: Vec<Block>,
    /// Host event counter (submissions and completions).
    seq: u64,
    next_gen: u64,
    /// Deallocated blocks read back as zeroes (DLFEAT).
    dealloc_zeroes: bool,
    /// Atomic write unit in blocks (AWUPF or NAWUPF, plus one).
    atomic_blocks: u32,
    /// Commands written since the last check: (generation, lba, nlb, acknowledged).
    written: Vec<(u64, u64, u32, bool)>,
}

impl Model {
    /// A model of `blocks` blocks whose present content is `base` (as read back).
    pub fn new(
        base: Vec<Version>,
        dealloc_zeroes: bool,
        atomic_blocks: u32,
        first_gen: u64,
    ) -> Self {
        Model {
            blocks: base
                .into_iter()
                .map(|v| Block {
                    hist: vec![Entry {
                        alts: vec![v],
                        generation: 0,
                        acked: Some(0),
                        guaranteed: false,
                    }],
                    past: Vec::new(),
                    busy: false,
                })
                .collect(),
            seq: 1,
            next_gen: first_gen,
            dealloc_zeroes,
            atomic_blocks,
            written: Vec::new(),
        }
    }

    /// Blocks in the region.
    pub fn len(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The next generation (never reused: a campaign passes it from boot to boot).
    pub fn next_generation(&self) -> u64 {
        self.next_gen
    }

    /// Whether none of `lba..lba+nlb` has a command in flight.
    pub fn free(&self, lba: u64, nlb: u32) -> bool {
        (lba..lba + u64::from(nlb)).all(|b| !self.blocks[b as usize].busy)
    }

    /// Records a submission; returns the command.
    pub fn submit(&mut self, kind: OpKind, lba: u64, nlb: u32) -> Op {
        self.seq += 1;
        let generation = self.next_gen;
        self.next_gen += 1;
        let v = match kind {
            OpKind::Write { .. } => Version::Gen(generation),
            OpKind::Zeroes => Version::Zero,
            OpKind::Deallocate if self.dealloc_zeroes => Version::Zero,
            OpKind::Deallocate | OpKind::Flush => Version::Undefined,
        };
        if kind != OpKind::Flush {
            for b in lba..lba + u64::from(nlb) {
                let blk = &mut self.blocks[b as usize];
                blk.busy = true;
                let mut alts = vec![v];
                if kind == OpKind::Deallocate
                    && let Some(prev) = blk.hist.last()
                {
                    // Dataset Management is advisory (NVM Command Set 1.0, Dataset Management
                    // command: a compliant controller may take no action): the old content
                    // may stay.
                    alts.extend(prev.alts.iter().copied());
                }
                blk.hist.push(Entry {
                    alts,
                    generation,
                    acked: None,
                    guaranteed: false,
                });
            }
            if matches!(kind, OpKind::Write { .. }) {
                self.written.push((generation, lba, nlb, false));
            }
        }
        Op {
            kind,
            lba,
            nlb,
            generation,
            submitted: self.seq,
        }
    }

    /// Records a completion.
    pub fn complete(&mut self, op: &Op, ok: bool, tally: &mut Tally) {
        self.seq += 1;
        let now = self.seq;
        if !ok {
            tally.errors += 1;
            tally.problem(format!("{op:?} failed"));
        }
        match op.kind {
            OpKind::Flush => {
                if !ok {
                    return;
                }
                tally.flushes_acked += 1;
                // Every write that completed before the Flush was submitted is durable now.
                for blk in &mut self.blocks {
                    if let Some(i) = blk
                        .hist
                        .iter()
                        .rposition(|e| e.acked.is_some_and(|a| a < op.submitted))
                    {
                        blk.durable(i);
                    }
                }
            }
            kind => {
                match kind {
                    OpKind::Write { fua } => {
                        if ok {
                            tally.writes_acked += 1;
                            if fua {
                                tally.fua_acked += 1;
                            }
                        }
                        if let Some(w) = self.written.iter_mut().find(|w| w.0 == op.generation) {
                            w.3 = ok;
                        }
                    }
                    _ if ok => tally.others_acked += 1,
                    _ => {}
                }
                for b in op.lba..op.lba + u64::from(op.nlb) {
                    let blk = &mut self.blocks[b as usize];
                    blk.busy = false;
                    let Some(i) = blk.hist.iter().rposition(|e| e.generation == op.generation)
                    else {
                        continue;
                    };
                    if !ok {
                        // A failed command leaves its blocks undefined.
                        blk.hist[i].alts = vec![Version::Undefined];
                        continue;
                    }
                    blk.hist[i].acked = Some(now);
                    if op.kind == (OpKind::Write { fua: true }) {
                        blk.durable(i);
                    }
                }
            }
        }
    }

    /// The host lost the device: commands in flight may or may not have happened.
    pub fn abandon_inflight(&mut self) {
        for b in &mut self.blocks {
            b.busy = false;
        }
    }

    /// Checks what was read back after a crash (`shown[i]` for block `i`), counts, and makes it
    /// the new state of every block.
    pub fn check(&mut self, shown: &[Version], tally: &mut Tally) {
        assert_eq!(shown.len(), self.blocks.len());
        for (lba, (blk, &v)) in self.blocks.iter().zip(shown).enumerate() {
            tally.blocks_checked += 1;
            if blk.hist[0].guaranteed {
                tally.durable_checked += 1;
            }
            if blk.hist.iter().any(|e| e.admits(v)) {
                continue;
            }
            let allowed: Vec<&[Version]> = blk.hist.iter().map(|e| &e.alts[..]).collect();
            if blk.past.iter().any(|p| p.admits(v)) {
                // Older than a version that had to survive.
                tally.lost += 1;
                tally.problem(format!(
                    "block {lba}: lost write: holds {v:?}, which {:?} (durable) replaced",
                    allowed[0]
                ));
            } else {
                tally.corrupt += 1;
                tally.problem(format!("block {lba}: holds {v:?}, allowed {allowed:?}"));
            }
        }
        // Torn commands: within the atomic write unit a command is found whole or not at all;
        // a block of it found means each of its blocks holds it or something newer.
        for &(generation, lba, nlb, acked) in &self.written {
            if acked {
                tally.writes_checked += 1;
            }
            if nlb > self.atomic_blocks {
                continue;
            }
            let range = lba as usize..lba as usize + nlb as usize;
            let found = range.clone().any(|b| shown[b] == Version::Gen(generation));
            if !found {
                continue;
            }
            let whole = range.clone().all(|b| {
                let blk = &self.blocks[b];
                // Its entry was superseded by a durable one: the rules above judge the block.
                let Some(at) = blk.hist.iter().position(|e| e.generation == generation) else {
                    return true;
                };
                blk.hist
                    .iter()
                    .rposition(|e| e.admits(shown[b]))
                    .is_some_and(|now| now >= at)
            });
            if !whole {
                tally.torn += 1;
                tally.problem(format!(
                    "command {generation} (LBA {lba}, {nlb} blocks) torn: {:?}",
                    &shown[range]
                ));
            }
        }
        self.written.clear();
        for (blk, &v) in self.blocks.iter_mut().zip(shown) {
            let v = match v {
                Version::Damaged(h) => Version::Opaque(h),
                v => v,
            };
            blk.hist = vec![Entry {
                alts: vec![v],
                generation: 0,
                acked: Some(0),
                guaranteed: false,
            }];
            blk.past.clear();
            blk.busy = false;
        }
    }
}

/// Kills per case: `KEEL_CRASH_RUNS` (set by `tests/crash --runs N`), else `default` (the
/// short form CI runs).
pub fn runs(default: u64) -> u64 {
    std::env::var("KEEL_CRASH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The seed of a campaign: `KEEL_CRASH_SEED`, else the clock.
pub fn seed() -> u64 {
    std::env::var("KEEL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// What the namespace offers, from Identify.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// Logical block size.
    pub block_size: u32,
    /// Blocks in the namespace.
    pub blocks: u64,
    /// Write Zeroes supported (ONCS bit 3).
    pub write_zeroes: bool,
    /// Dataset Management supported (ONCS bit 2).
    pub deallocate: bool,
    /// Deallocated blocks read as zeroes (DLFEAT bits 2:0 = 001b).
    pub dealloc_zeroes: bool,
    /// Volatile write cache present (VWC bit 0).
    pub vwc: bool,
    /// Atomic write unit on power fail, in blocks.
    pub atomic_blocks: u32,
}

impl Geometry {
    /// From Identify Controller and the raw Identify Namespace page.
    pub fn from_identify(ctrl: &IdentifyController, ns: &[u8; 4096]) -> Geometry {
        let idns = keel_nvme::identify::IdentifyNamespace::decode(ns);
        // Identify Namespace (NVM command set 1.0 Figure 97; Linux struct nvme_id_ns):
        // NSFEAT byte 24 (bit 1: NAWUN/NAWUPF/NACWU valid), DLFEAT byte 33, NAWUPF bytes 37:36.
        let nawupf = u16::from_le_bytes([ns[36], ns[37]]);
        let awupf = if ns[24] & 0x02 != 0 {
            nawupf
        } else {
            ctrl.awupf
        };
        Geometry {
            block_size: idns.block_size(),
            blocks: idns.nsze,
            // ONCS (Identify Controller bytes 521:520): bit 2 DSM, bit 3 Write Zeroes.
            write_zeroes: ctrl.oncs.bits() & 0x08 != 0,
            deallocate: ctrl.oncs.bits() & 0x04 != 0,
            dealloc_zeroes: ns[33] & 0x07 == 0x01,
            vwc: ctrl.vwc.bits() & 1 != 0,
            atomic_blocks: u32::from(awupf) + 1,
        }
    }
}

/// One side of the device the workload talks to.
pub trait Driver {
    /// What the namespace offers.
    fn geometry(&self) -> Geometry;
    /// Submits `op` (with `data` for writes); returns a token for its completion.
    fn submit(&mut self, op: &Op, data: &[u8]) -> Result<u64, String>;
    /// The next completion: (token, success); an error once the device is gone.
    fn complete(&mut self) -> Result<(u64, bool), String>;
    /// Reads `nlb` blocks at `lba`.
    fn read(&mut self, lba: u64, nlb: u32) -> Result<Vec<u8>, String>;
}

fn rw_sqe(op: &Op, nsid: u32) -> Sqe {
    let rw = |opcode: IoOpcode, fua: bool| {
        let mut c = RwCommand::simple(op.lba, op.nlb);
        c.fua = fua;
        c.to_sqe(opcode as u8, 0, nsid)
    };
    match op.kind {
        OpKind::Write { fua } => rw(IoOpcode::Write, fua),
        OpKind::Zeroes => rw(IoOpcode::WriteZeroes, false),
        OpKind::Deallocate => DsmCommand {
            nr: 0,
            idr: false,
            idw: false,
            ad: true,
        }
        .to_sqe(0, nsid),
        OpKind::Flush => Sqe::new(IoOpcode::Flush as u8, 0).with_nsid(nsid),
    }
}

/// The workload over NVMe/TCP: an association and one I/O queue.
#[derive(Debug)]
pub struct TcpDriver {
    ctrl: Option<Controller>,
    q: Option<TcpQueue>,
    nsid: u32,
    geo: Geometry,
    tokens: HashMap<u16, u64>,
}

impl TcpDriver {
    /// Connects to subsystem `subnqn` at `addr` with an I/O queue of `depth`.
    pub fn connect(addr: &str, subnqn: &str, nsid: u32, depth: u16) -> Result<Self, String> {
        let p = Params {
            timeout: Duration::from_secs(30),
            ..Params::new(
                addr,
                subnqn,
                "nqn.2014-08.org.nvmexpress:uuid:c7a5c7a5-0000-4000-8000-00000000c7a5",
            )
        };
        let ctrl = Controller::connect(p).map_err(|e| format!("connect: {e}"))?;
        let ns = ctrl
            .identify(cns::NAMESPACE, nsid)
            .map_err(|e| format!("identify namespace: {e}"))?;
        let geo = Geometry::from_identify(&ctrl.id, &ns);
        let q = ctrl
            .io_queue(1, depth)
            .map_err(|e| format!("I/O queue: {e}"))?;
        Ok(TcpDriver {
            ctrl: Some(ctrl),
            q: Some(q),
            nsid,
            geo,
            tokens: HashMap::new(),
        })
    }

    /// Disconnects in order (the device stays up).
    pub fn close(mut self) {
        if let Some(q) = self.q.take() {
            let _ = q.close();
        }
        if let Some(c) = self.ctrl.take() {
            let _ = c.close();
        }
    }
}

impl Driver for TcpDriver {
    fn geometry(&self) -> Geometry {
        self.geo
    }

    fn submit(&mut self, op: &Op, data: &[u8]) -> Result<u64, String> {
        let q = self.q.as_mut().ok_or("no queue")?;
        let bs = self.geo.block_size;
        let data = match op.kind {
            OpKind::Write { .. } => Some((data.to_vec(), op.nlb * bs)),
            OpKind::Deallocate => {
                let r = DsmRange {
                    cattr: 0,
                    nlb: op.nlb,
                    slba: op.lba,
                }
                .to_bytes();
                Some((r.to_vec(), 16))
            }
            _ => None,
        };
        let cid = q
            .submit_command(rw_sqe(op, self.nsid), data)
            .map_err(|e| e.to_string())?;
        self.tokens.insert(cid, op.generation);
        Ok(op.generation)
    }

    fn complete(&mut self) -> Result<(u64, bool), String> {
        let q = self.q.as_mut().ok_or("no queue")?;
        loop {
            let (cid, done) = q.next_completion().map_err(|e| e.to_string())?;
            if let Some(t) = self.tokens.remove(&cid) {
                return Ok((t, done.cqe.status.is_success()));
            }
        }
    }

    fn read(&mut self, lba: u64, nlb: u32) -> Result<Vec<u8>, String> {
        let bs = self.geo.block_size;
        self.q
            .as_mut()
            .ok_or("no queue")?
            .read(self.nsid, lba, u64::from(nlb), bs)
            .map_err(|e| e.to_string())
    }
}

/// The workload through the emulated PCIe function: the user-space host driver over the
/// window file.
#[derive(Debug)]
pub struct FnDriver {
    dev: HostDevice,
    geo: Geometry,
    /// Set once QEMU is killed: completions will not come any more.
    dead: Arc<AtomicBool>,
}

impl FnDriver {
    /// Opens the controller of `window` with one I/O queue of `depth`, on namespace `nsid`.
    pub fn open(
        window: &Path,
        nsid: u32,
        depth: u16,
        dead: Arc<AtomicBool>,
    ) -> Result<Self, String> {
        let win = Arc::new(Window::open(window).map_err(|e| format!("{e:#}"))?);
        let cfg = HostConfig {
            queues: 1,
            depth,
            timeout: Duration::from_secs(30),
        };
        let mut ctrl = HostController::open(win, &cfg).map_err(|e| format!("{e:#}"))?;
        let ns = ctrl
            .identify(cns::NAMESPACE, nsid)
            .map_err(|e| format!("{e:#}"))?;
        let geo = Geometry::from_identify(&ctrl.id, &ns);
        let dev = ctrl
            .into_device(nsid, depth as usize)
            .map_err(|e| format!("{e:#}"))?;
        Ok(FnDriver { dev, geo, dead })
    }

    /// Shuts the controller down (the device stays up).
    pub fn close(self) {
        let _ = self.dev.shutdown();
    }

    /// The next completion: (tag, success, buffer); an error once QEMU is gone.
    fn next(&mut self) -> Result<(u64, bool, Option<IoBuf>), String> {
        let t0 = Instant::now();
        loop {
            if let Some(c) = self.dev.try_complete() {
                return Ok((c.tag, c.result.is_ok(), c.buf));
            }
            if self.dead.load(Ordering::SeqCst) {
                return Err("QEMU was killed".into());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err("no completion within 30 s".into());
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Driver for FnDriver {
    fn geometry(&self) -> Geometry {
        self.geo
    }

    fn submit(&mut self, op: &Op, data: &[u8]) -> Result<u64, String> {
        if self.dead.load(Ordering::SeqCst) {
            return Err("QEMU was killed".into());
        }
        let (bop, buf) = match op.kind {
            OpKind::Write { fua } => {
                let mut b = self.dev.alloc().map_err(|e| format!("{e:#}"))?;
                b.set_len(data.len());
                b.as_mut_slice().copy_from_slice(data);
                (BlockOp::Write { fua }, Some(b))
            }
            OpKind::Zeroes => (
                BlockOp::WriteZeroes {
                    deallocate: false,
                    fua: false,
                },
                None,
            ),
            OpKind::Deallocate => (BlockOp::Deallocate, None),
            OpKind::Flush => (BlockOp::Flush, None),
        };
        let req = Request {
            tag: op.generation,
            op: bop,
            lba: op.lba,
            blocks: op.nlb,
            buf,
        };
        self.dev.submit(req).map_err(|e| format!("{e:#}"))?;
        Ok(op.generation)
    }

    fn complete(&mut self) -> Result<(u64, bool), String> {
        let (tag, ok, buf) = self.next()?;
        if let Some(b) = buf {
            self.dev.free(b);
        }
        Ok((tag, ok))
    }

    fn read(&mut self, lba: u64, nlb: u32) -> Result<Vec<u8>, String> {
        let len = (nlb * self.geo.block_size) as usize;
        let mut b = self.dev.alloc().map_err(|e| format!("{e:#}"))?;
        b.set_len(len);
        let req = Request {
            tag: u64::MAX,
            op: BlockOp::Read,
            lba,
            blocks: nlb,
            buf: Some(b),
        };
        self.dev.submit(req).map_err(|e| format!("{e:#}"))?;
        let (_, ok, buf) = self.next()?;
        let b = buf.ok_or("a read without its buffer")?;
        let out = b.as_slice()[..len].to_vec();
        self.dev.free(b);
        if !ok {
            return Err(format!("read of {nlb} blocks at {lba} failed"));
        }
        Ok(out)
    }
}

/// Reads the whole region and classifies every block.
pub fn read_region(d: &mut dyn Driver, blocks: u64) -> Result<Vec<Version>, String> {
    let bs = d.geometry().block_size as usize;
    let mut out = Vec::with_capacity(blocks as usize);
    let mut lba = 0;
    while lba < blocks {
        let n = (blocks - lba).min(64) as u32;
        let data = d.read(lba, n)?;
        for (i, b) in data.chunks(bs).enumerate() {
            out.push(classify(b, lba + i as u64));
        }
        lba += u64::from(n);
    }
    Ok(out)
}

/// Largest command of the workload, in blocks.
const MAX_BLOCKS: u64 = 32;
/// Commands in flight at most.
pub const DEPTH: u16 = 16;

/// Runs the workload until the driver fails (QEMU killed) or `deadline`: returns whether it
/// ended because the device went away.
pub fn workload(
    d: &mut dyn Driver,
    model: &mut Model,
    rng: &mut Rng,
    tally: &mut Tally,
    deadline: Instant,
) -> bool {
    let geo = d.geometry();
    let bs = geo.block_size as usize;
    let mut inflight: HashMap<u64, Op> = HashMap::new();
    let mut data = vec![0u8; MAX_BLOCKS as usize * bs];
    let gone = loop {
        while inflight.len() < DEPTH as usize && Instant::now() < deadline {
            let roll = rng.below(100);
            let kind = match roll {
                0..=44 => OpKind::Write { fua: false },
                45..=64 => OpKind::Write { fua: true },
                65..=74 => OpKind::Flush,
                75..=84 if geo.write_zeroes => OpKind::Zeroes,
                85..=94 if geo.deallocate => OpKind::Deallocate,
                _ => OpKind::Write { fua: false },
            };
            let (lba, nlb) = if kind == OpKind::Flush {
                (0, 0)
            } else {
                // Mostly small commands (some within the atomic unit), a free range.
                let max = if rng.below(4) == 0 {
                    MAX_BLOCKS
                } else {
                    u64::from(geo.atomic_blocks).clamp(1, MAX_BLOCKS)
                };
                let nlb = 1 + rng.below(max) as u32;
                let picked = (0..8)
                    .map(|_| rng.below(model.len() - u64::from(nlb) + 1))
                    .find(|&lba| model.free(lba, nlb));
                match picked {
                    Some(l) => (l, nlb),
                    None => break,
                }
            };
            let op = model.submit(kind, lba, nlb);
            if let OpKind::Write { .. } = kind {
                for i in 0..nlb {
                    let at = i as usize * bs;
                    encode_block(
                        &mut data[at..at + bs],
                        lba + u64::from(i),
                        op.generation,
                        i,
                        nlb,
                    );
                }
            }
            tally.submitted += 1;
            match d.submit(&op, &data[..nlb as usize * bs]) {
                Ok(t) => {
                    inflight.insert(t, op);
                }
                Err(_) => {
                    model.abandon_inflight();
                    return true;
                }
            }
        }
        if inflight.is_empty() {
            break false;
        }
        match d.complete() {
            Ok((t, ok)) => {
                if let Some(op) = inflight.remove(&t) {
                    model.complete(&op, ok, tally);
                }
            }
            Err(_) => break true,
        }
    };
    model.abandon_inflight();
    gone
}

/// Which path a campaign drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path_ {
    /// NVMe/TCP to the drive namespace, plain.
    Tcp,
    /// NVMe/TCP to the drive namespace, encrypted with AES-XTS.
    TcpXts,
    /// The emulated PCIe function, whose subsystem holds the drive namespace.
    Function,
}

/// A test key for XTS-AES-256 (two different halves).
const XTS_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
                       f0e0d0c0b0a090807060504030201000ffeeddccbbaa99887766554433221100";

/// The subsystem of the function campaign's bundle.
const FN_NQN: &str = "nqn.2026-12.dev.keel.test:crash";

/// A booted device for one path, on a drive file that outlives it.
struct Device {
    qemu: Qemu,
    port: u16,
    window: Option<PathBuf>,
}

fn boot(path: Path_, drive: &Path, window: Option<&Path>, flash: Option<&Path>) -> Device {
    let port = free_port();
    let mut args: Vec<String> = vec![
        "--nvmf-port".into(),
        port.to_string(),
        "--disk".into(),
        drive.display().to_string(),
    ];
    match path {
        Path_::Tcp => args.extend(["--append".into(), "keel.ns=drive:0".into()]),
        Path_::TcpXts => args.extend([
            "--append".into(),
            format!("keel.ns=drive:0 keel.xts=1:{XTS_KEY}"),
        ]),
        Path_::Function => args.extend([
            "--flash".into(),
            flash.expect("flash").display().to_string(),
            "--window".into(),
            window.expect("window").display().to_string(),
        ]),
    }
    let mut qemu = if path == Path_::Function {
        Qemu::start(&args)
    } else {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        Qemu::boot(Build::Release, &argv)
    };
    qemu.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    Device {
        qemu,
        port,
        window: window.map(Path::to_path_buf),
    }
}

/// A flash image with the release firmware in slot A and a bundle whose subsystem holds the
/// drive's namespace 1 and names emulated function 0 (development keys), made once.
fn function_flash(dir: &Path) -> PathBuf {
    let toml = dir.join("crash-fn.toml");
    std::fs::write(
        &toml,
        format!(
            "[network]\ndhcp = true\n\n[[subsystem]]\nnqn = \"{FN_NQN}\"\nallowed_hosts = []\n\n\
             [[namespace]]\nsubsystem = \"{FN_NQN}\"\nnsid = 1\n\
             backend = {{ drive = 0, nsid = 1, offset = \"0\", length = \"all\" }}\n\
             encryption = \"none\"\nfunction = 0\n"
        ),
    )
    .expect("writing the description");
    let bundle = dir.join("crash-fn.bundle");
    let flash = dir.join("crash-fn.flash");
    let keys = root().join("qemu/dev-keys");
    let key = keys.join("provision.key");
    let s = |p: &Path| p.to_str().expect("utf-8").to_string();
    crate::keelctl_ok(&[
        "provision",
        "build",
        &s(&toml),
        "--key",
        &s(&key),
        "--device-key",
        &s(&keys.join("provision.key.device")),
        "--generation",
        "1",
        "-o",
        &s(&bundle),
    ]);
    let elf = crate::image(Build::Release).with_extension("");
    crate::keelctl_ok(&[
        "image",
        "pack",
        &s(&elf),
        "--key",
        &s(&key),
        "-o",
        &s(&flash),
    ]);
    crate::keelctl_ok(&["flash", &s(&bundle), "--to", &s(&flash), "--force"]);
    flash
}

fn driver(path: Path_, dev: &Device, dead: Arc<AtomicBool>) -> Box<dyn Driver> {
    match path {
        Path_::Function => Box::new(
            FnDriver::open(dev.window.as_deref().expect("window"), 1, DEPTH, dead)
                .unwrap_or_else(|e| panic!("emulated function: {e}")),
        ),
        _ => Box::new(
            TcpDriver::connect(
                &format!("127.0.0.1:{}", dev.port),
                keel_host_tools::nvme::DEFAULT_SUBNQN,
                1,
                DEPTH,
            )
            .unwrap_or_else(|e| panic!("NVMe/TCP: {e}")),
        ),
    }
}

/// Blocks in the region the workload writes (1 MiB of 512-byte blocks).
pub const REGION: u64 = 2048;

/// Runs `kills` crash cycles on `path`: boot, workload, SIGKILL at a random moment within
/// `window` of the workload's start, boot again on the same file, check. Returns the tally;
/// `seed` makes the run reproducible (except for the kill times). `tamper`, if given, is run on
/// the drive file between each kill and the next boot (to show that the checks notice damage).
pub fn campaign(
    path: Path_,
    kills: u64,
    seed: u64,
    window: (Duration, Duration),
    tamper: Option<&dyn Fn(&Path)>,
) -> Tally {
    let name = format!("crash-{path:?}").to_lowercase();
    let drive = ScratchFile::new(&format!("{name}.img"), 64 << 20);
    let win = (path == Path_::Function).then(|| ScratchFile::new(&format!("{name}.win"), 64 << 20));
    let flash = (path == Path_::Function).then(|| {
        let dir = drive.path().with_extension("d");
        std::fs::create_dir_all(&dir).expect("flash dir");
        function_flash(&dir)
    });
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    let boot_it = || {
        boot(
            path,
            drive.path(),
            win.as_ref().map(ScratchFile::path),
            flash.as_deref(),
        )
    };
    let mut dev = boot_it();
    let dead = Arc::new(AtomicBool::new(false));
    let mut d = driver(path, &dev, dead.clone());
    let geo = d.geometry();
    assert!(
        geo.block_size >= 512 && geo.blocks >= REGION,
        "namespace too small: {geo:?}"
    );
    let base = read_region(d.as_mut(), REGION).unwrap_or_else(|e| panic!("baseline read: {e}"));
    let mut model = Model::new(base, geo.dealloc_zeroes, geo.atomic_blocks, 1);
    eprintln!("crash campaign {path:?}: seed {seed}, {geo:?}");
    for k in 0..kills {
        let span = window.1.saturating_sub(window.0).as_millis().max(1) as u64;
        let delay = window.0 + Duration::from_millis(rng.below(span));
        let pid = dev.qemu.pid();
        let killed = dead.clone();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            killed.store(true, Ordering::SeqCst);
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        });
        let gone = workload(
            d.as_mut(),
            &mut model,
            &mut rng,
            &mut tally,
            Instant::now() + delay + Duration::from_secs(60),
        );
        killer.join().expect("killer thread");
        assert!(gone, "the workload outlived QEMU's kill");
        drop(d);
        let _ = dev.qemu.wait_exit(Duration::from_secs(30));
        tally.kills += 1;
        if let Some(t) = tamper {
            t(drive.path());
        }
        dev = boot_it();
        dead.store(false, Ordering::SeqCst);
        d = driver(path, &dev, dead.clone());
        let shown =
            read_region(d.as_mut(), REGION).unwrap_or_else(|e| panic!("read after kill {k}: {e}"));
        model.check(&shown, &mut tally);
        eprintln!("  kill {}: {tally}", k + 1);
    }
    drop(d);
    dev.qemu.kill();
    if let Some(b) = flash {
        let _ = std::fs::remove_dir_all(b.parent().expect("dir"));
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_map_to_versions() {
        // The stamp itself is tested in keel_host_tools::nvme::pattern.
        let mut b = vec![0u8; 512];
        encode_block(&mut b, 7, 42, 0, 1);
        assert_eq!(classify(&b, 7), Version::Gen(42));
        assert!(matches!(classify(&b, 8), Version::Damaged(_)));
        assert_eq!(classify(&[0u8; 512], 7), Version::Zero);
        assert!(matches!(classify(&[0x5a; 512], 7), Version::Opaque(_)));
    }

    fn op(m: &mut Model, kind: OpKind, lba: u64, nlb: u32, t: &mut Tally, ok: bool) -> Op {
        let o = m.submit(kind, lba, nlb);
        m.complete(&o, ok, t);
        o
    }

    #[test]
    fn the_model_enforces_fua_and_flush_and_allows_the_rest() {
        let mut t = Tally::default();
        let mut m = Model::new(vec![Version::Zero; 8], true, 1, 1);
        let a = op(&mut m, OpKind::Write { fua: false }, 0, 2, &mut t, true);
        let b = op(&mut m, OpKind::Write { fua: true }, 2, 1, &mut t, true);
        let _f = op(&mut m, OpKind::Flush, 0, 0, &mut t, true);
        let c = m.submit(OpKind::Write { fua: false }, 0, 1); // in flight at the crash
        let _ = c;
        // Block 0: a (flushed) or c (in flight); block 1: a; block 2: b (FUA).
        let mut shown = vec![Version::Zero; 8];
        shown[0] = Version::Gen(c.generation);
        shown[1] = Version::Gen(a.generation);
        shown[2] = Version::Gen(b.generation);
        m.abandon_inflight();
        m.check(&shown, &mut t);
        assert!(t.clean(), "{t}: {:?}", t.problems);
        assert_eq!(t.durable_checked, 3);

        // After the check, what was read is the state; a flushed write lost is caught.
        let d = op(&mut m, OpKind::Write { fua: false }, 5, 1, &mut t, true);
        let _f = op(&mut m, OpKind::Flush, 0, 0, &mut t, true);
        let mut lost = shown.clone();
        lost[5] = Version::Zero;
        m.check(&lost, &mut t);
        assert_eq!((t.corrupt, t.lost), (0, 1), "{:?}", t.problems);
        let _ = d;
    }

    #[test]
    fn unflushed_writes_may_be_lost_but_not_replaced_by_strangers() {
        let mut t = Tally::default();
        let mut m = Model::new(vec![Version::Zero; 4], false, 1, 1);
        let a = op(&mut m, OpKind::Write { fua: false }, 0, 1, &mut t, true);
        let _z = op(&mut m, OpKind::Deallocate, 1, 1, &mut t, true);
        // Block 0 back at zero (never flushed): allowed. Block 1 deallocated without DLFEAT
        // zeroes: anything. Block 2 holds another block's data: corrupt.
        let mut shown = vec![Version::Zero; 4];
        shown[1] = Version::Opaque(9);
        shown[2] = Version::Gen(a.generation);
        m.check(&shown, &mut t);
        assert_eq!((t.corrupt, t.lost), (1, 0), "{:?}", t.problems);
    }

    #[test]
    fn a_durable_deallocate_leaves_zeroes_or_the_old_content() {
        let mut t = Tally::default();
        let mut m = Model::new(vec![Version::Zero; 3], true, 1, 1);
        let a = op(&mut m, OpKind::Write { fua: true }, 0, 3, &mut t, true);
        let _d = op(&mut m, OpKind::Deallocate, 0, 3, &mut t, true);
        let _f = op(&mut m, OpKind::Flush, 0, 0, &mut t, true);
        let g = Version::Gen(a.generation);
        m.check(&[g, Version::Zero, Version::Opaque(1)], &mut t);
        assert_eq!((t.lost, t.corrupt), (0, 1), "{:?}", t.problems);
    }

    #[test]
    fn a_lost_fua_write_is_counted_as_lost() {
        let mut t = Tally::default();
        let mut m = Model::new(vec![Version::Zero; 2], true, 1, 1);
        let a = op(&mut m, OpKind::Write { fua: true }, 0, 1, &mut t, true);
        let b = op(&mut m, OpKind::Write { fua: true }, 0, 1, &mut t, true);
        m.check(&[Version::Gen(a.generation), Version::Zero], &mut t);
        assert_eq!(t.lost, 1, "{:?}", t.problems);
        assert_eq!(t.corrupt, 0);
        let _ = b;
    }

    #[test]
    fn commands_within_the_atomic_unit_are_found_whole_or_not_at_all() {
        let mut t = Tally::default();
        let mut m = Model::new(vec![Version::Zero; 8], true, 4, 1);
        let a = m.submit(OpKind::Write { fua: false }, 0, 4);
        m.abandon_inflight();
        let g = Version::Gen(a.generation);
        // Whole: fine.
        m.check(
            &[
                g,
                g,
                g,
                g,
                Version::Zero,
                Version::Zero,
                Version::Zero,
                Version::Zero,
            ],
            &mut t,
        );
        assert!(t.clean());
        // Partly: torn.
        let b = m.submit(OpKind::Write { fua: false }, 4, 4);
        m.abandon_inflight();
        let h = Version::Gen(b.generation);
        m.check(&[g, g, g, g, h, h, Version::Zero, Version::Zero], &mut t);
        assert_eq!(t.torn, 1, "{:?}", t.problems);
    }
}
