//! The dispatcher: per-flow FIFO intake queues, limiters, and weighted fair sharing of each
//! backend (a *domain*) among the flows that use it.
//!
//! - A **flow** is the stream of one tenant object toward one backend: in Keel, the commands
//!   of one controller (host) to one namespace. Its commands wait in arrival order (a FIFO),
//!   so no command of a flow is overtaken by a later one of the same flow, whichever queue
//!   or connection it came on.
//! - Each flow names up to three **limiters** (namespace, controller, group): its head
//!   command starts only when all of them allow it, and is then charged to all of them. A
//!   command over its limit waits; it is never failed.
//! - A **domain** is what the flows compete for: one backend (a drive namespace shared by
//!   slices, a RAM disk, a remote volume), with an optional cap on commands in flight so that
//!   the waiting happens here, where it is fair, rather than in the device's own FIFO. When
//!   the domain is saturated (the cap is reached or the backend refused a command as busy),
//!   flows share it by **start-time fair queuing**: each flow has a virtual time that
//!   advances by cost / weight when it dispatches, and the eligible flow with the smallest
//!   virtual time goes next (ties: the older head command). A flow that was idle restarts at
//!   the domain's virtual clock, so it cannot bank credit. Sharing is work-conserving: a flow
//!   held back by its limits does not hold the others back.
//!
//! Entries are the caller's command handles (`u32` below a capacity set up front); the FIFOs
//! are linked through a table indexed by handle, so nothing allocates per command. Cost when
//! no limit binds: [`Scheduler::enqueue`] answers "start now" without queueing when the
//! domain has nobody waiting; it visits only the flow's limiters that have a limit set (none
//! for a flow without limits), and a limiter far from its limits does not touch its buckets
//! ([`Limiter`]). What a limiter admitted is counted by the flows, and summed when reported
//! ([`Scheduler::limiter_stats`]).

use crate::limiter::{Cost, Limiter, Limits};
use alloc::vec::Vec;

const NIL: u32 = u32::MAX;
const NONE16: u16 = u16::MAX;
/// Virtual-time units per byte of service at weight 1.
const VSCALE: u64 = 1 << 10;
/// The smallest service a command counts for (a Flush or Deallocate is not free).
const MIN_SERVICE: u64 = 512;
/// Largest weight.
pub const MAX_WEIGHT: u32 = 1000;

/// A flow (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowId(pub u16);
/// A domain (a backend the flows share).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DomainId(pub u16);
/// A limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LimiterId(pub u16);

/// What [`Scheduler::enqueue`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Start the command now (it has been charged and counted in flight).
    Now,
    /// The command waits; [`Scheduler::next`] hands it out later.
    Queued,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    next: u32,
    flow: u16,
    queued: bool,
    charged: bool,
    cost: Cost,
    arrival: u64,
}

impl Entry {
    const EMPTY: Entry = Entry {
        next: NIL,
        flow: NONE16,
        queued: false,
        charged: false,
        cost: Cost {
            dir: crate::limiter::Dir::Other,
            bytes: 0,
        },
        arrival: 0,
    };
}

/// Counters of one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowStats {
    /// Commands waiting now.
    pub queued: u32,
    /// Commands started so far.
    pub dispatched: u64,
    /// Bytes started so far.
    pub bytes: u64,
    /// Nanoseconds its head command spent held back by a limit.
    pub throttled_ns: u64,
}

/// Counters of one limiter, over all the flows it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimiterStats {
    /// Commands admitted so far.
    pub admitted_ops: u64,
    /// Bytes admitted so far.
    pub admitted_bytes: u64,
    /// Nanoseconds during which a request was held back by this limiter (summed over the
    /// times it was found blocking).
    pub throttled_ns: u64,
}

/// A limiter and its counters. What it admitted is counted by the flows (their
/// [`FlowStats`]); `ops`/`bytes` hold what flows that left it had admitted through it.
#[derive(Debug, Clone)]
struct Slot {
    lim: Limiter,
    /// The limits configured ([`Scheduler::set_limits`]); `lim` holds this scheduler's
    /// part of them while they are split across schedulers ([`Scheduler::set_limiter_split`]).
    base: Limits,
    ops: u64,
    bytes: u64,
    throttled_ns: u64,
    /// Its demand as of the last [`Scheduler::tally_limiter_demands`].
    tally: u32,
}

#[derive(Debug, Clone)]
struct Flow {
    live: bool,
    domain: u16,
    weight: u32,
    limiters: [u16; 3],
    /// Bit `k`: `limiters[k]` has a limit set (the only ones the per-command path visits).
    limited: u8,
    /// The flow's (dispatched, bytes) when it joined `limiters[k]`.
    joined: [(u64, u64); 3],
    head: u32,
    tail: u32,
    vtime: u64,
    active: bool,
    /// Since when (ns) its head has been held back by a limit, and by which limiter.
    blocked: Option<(u64, u16)>,
    /// Its commands started and not yet released ([`Scheduler::release`]).
    inflight: u32,
    stats: FlowStats,
}

impl Flow {
    /// Whether the flow counts in its domain's demand: commands waiting or in flight.
    #[inline(always)]
    fn busy(&self) -> bool {
        self.head != NIL || self.inflight > 0
    }
}

#[derive(Debug, Clone)]
struct Domain {
    live: bool,
    inflight: u32,
    /// The configured cap (0: none).
    max_inflight: u32,
    /// This scheduler's part of the cap when other schedulers share the backend (0: the
    /// whole cap), [`Scheduler::set_share`].
    share: u32,
    /// The cap in force: `max_inflight` lowered to `share` (0: none).
    cap: u32,
    /// Sum of the weights of its busy flows ([`Scheduler::domain_demand`]).
    demand: u32,
    /// Its commands waiting.
    queued: u32,
    saturated: bool,
    vclock: u64,
    /// Flows of this domain with commands waiting.
    active: Vec<u16>,
}

impl Domain {
    fn can_start(&self) -> bool {
        !self.saturated && (self.cap == 0 || self.inflight < self.cap)
    }

    /// The cap in force from the configured cap and the share.
    fn refresh_cap(&mut self) {
        self.cap = match (self.max_inflight, self.share) {
            (0, _) => 0,
            (m, 0) => m,
            (m, s) => m.min(s),
        };
    }
}

/// What one scheduler (one core) sharing a capped domain with others publishes about it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Share {
    /// Its demand: the sum of the weights of its busy flows ([`Scheduler::domain_demand`]).
    pub demand: u32,
    /// Its commands on the domain, waiting and in flight ([`Scheduler::domain_want`]): more
    /// than this it cannot use now.
    pub want: u32,
    /// Its commands at the backend ([`Scheduler::inflight`]).
    pub inflight: u32,
}

/// Scheduler `mine`'s part of a capped domain that the schedulers `all` (one per core,
/// `mine` among them) share, for [`Scheduler::set_share`].
///
/// The cap is split by weight among the schedulers with demand: `cap` × `demand` / (their
/// total demand), rounded down, the whole cap to one alone. A scheduler that wants less than
/// that gets what it wants and leaves the rest to the others, by weight again (water
/// filling), so the split is work-conserving: a QD1 tenant on one core does not keep half
/// of the drive from a deep one on another; when everyone wants less than the cap, what is
/// left goes by weight as well. The part is then lowered to the room the others
/// leave (`cap` − their commands in flight: while a core whose part shrank drains, the one
/// whose part grew waits for it) and is at least 1: a scheduler with no demand of its own,
/// or no room left, still starts one command (its demand counts from the next computation).
/// Parts computed from the same figures add up to at most the cap, plus that one command of
/// each scheduler whose part rounds to 0. A `cap` of 0 (no cap) stays 0 (uncapped). No
/// allocation; at most 64 schedulers count (the others are ignored).
pub fn cap_share(cap: u32, mine: usize, all: &[Share]) -> u32 {
    if cap == 0 {
        return 0;
    }
    let all = &all[..all.len().min(64)];
    let Some(me) = all.get(mine).filter(|s| s.demand > 0) else {
        return 1;
    };
    let others: u64 = all
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != mine)
        .map(|(_, s)| u64::from(s.inflight))
        .sum();
    // Water filling: those that want less than their weighted part of what is left get what
    // they want, until everyone left wants at least their part.
    let mut settled = 0u64;
    let mut left = u64::from(cap);
    let mut weights;
    loop {
        weights = 0u64;
        for (i, s) in all.iter().enumerate() {
            if s.demand > 0 && settled & (1 << i) == 0 {
                weights += u64::from(s.demand);
            }
        }
        let mut changed = false;
        for (i, s) in all.iter().enumerate() {
            if s.demand > 0
                && settled & (1 << i) == 0
                && u64::from(s.want) * weights <= left * u64::from(s.demand)
            {
                settled |= 1 << i;
                left -= u64::from(s.want);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let part = if weights == 0 {
        // Everyone got what they want: the rest goes by weight too (alone: the whole cap).
        let total: u64 = all.iter().map(|s| u64::from(s.demand)).sum();
        u64::from(me.want) + left * u64::from(me.demand) / total
    } else if settled & (1 << mine) != 0 {
        u64::from(me.want)
    } else {
        left * u64::from(me.demand) / weights.max(1)
    };
    (part.min(u64::from(cap).saturating_sub(others)) as u32).max(1)
}

/// Flows, domains and limiters of one target (see the module documentation).
#[derive(Debug, Clone, Default)]
pub struct Scheduler {
    entries: Vec<Entry>,
    flows: Vec<Flow>,
    domains: Vec<Domain>,
    limiters: Vec<Option<Slot>>,
    arrivals: u64,
    waiting: u32,
    /// Flows a new domain's active list has room for ([`Scheduler::reserve`]).
    domain_room: usize,
}

/// Why a configuration call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedError {
    /// No such flow, domain or limiter (or it was removed).
    Unknown,
    /// The flow still has commands waiting.
    NotEmpty,
    /// The handle is beyond the capacity, or already waiting.
    BadHandle,
    /// Too many flows, domains or limiters (65535 of each).
    Full,
}

impl core::fmt::Display for SchedError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            SchedError::Unknown => "no such flow, domain or limiter",
            SchedError::NotEmpty => "the flow has commands waiting",
            SchedError::BadHandle => "command handle out of range or already queued",
            SchedError::Full => "too many flows, domains or limiters",
        })
    }
}

fn free_index<T>(v: &[T], live: impl Fn(&T) -> bool) -> Option<usize> {
    v.iter().position(|x| !live(x))
}

impl Scheduler {
    /// An empty scheduler for command handles `0..capacity`.
    pub fn new(capacity: u32) -> Self {
        let mut s = Self::default();
        s.ensure_capacity(capacity);
        s
    }

    /// Makes handles `0..capacity` usable (allocates; call when queues are created, never
    /// per command).
    pub fn ensure_capacity(&mut self, capacity: u32) {
        if (self.entries.len() as u32) < capacity {
            let more = capacity as usize - self.entries.len();
            self.entries.reserve_exact(more);
            self.entries.resize(capacity as usize, Entry::EMPTY);
        }
    }

    /// Makes room for `flows` more flows, `limiters` more limiters and `per_domain` flows in
    /// every domain (those there are and those added later), so that adding them does not
    /// allocate: the caller sizes them once for its most controllers, and nothing a workload
    /// adds and removes stays allocated after it (call at configuration time).
    pub fn reserve(&mut self, flows: usize, limiters: usize, per_domain: usize) {
        self.flows.reserve_exact(flows);
        self.limiters.reserve_exact(limiters);
        self.domain_room = self.domain_room.max(per_domain);
        for d in self.domains.iter_mut().filter(|d| d.live) {
            d.active
                .reserve_exact(per_domain.saturating_sub(d.active.len()));
        }
    }

    /// Commands waiting in every flow.
    pub fn waiting(&self) -> u32 {
        self.waiting
    }

    /// A new limiter.
    pub fn add_limiter(&mut self, limits: Limits, now_ns: u64) -> Result<LimiterId, SchedError> {
        let l = Some(Slot {
            lim: Limiter::new(limits, now_ns),
            base: limits,
            ops: 0,
            bytes: 0,
            throttled_ns: 0,
            tally: 0,
        });
        let i = match free_index(&self.limiters, Option::is_some) {
            Some(i) => {
                self.limiters[i] = l;
                i
            }
            None if self.limiters.len() < NONE16 as usize => {
                self.limiters.push(l);
                self.limiters.len() - 1
            }
            None => return Err(SchedError::Full),
        };
        Ok(LimiterId(i as u16))
    }

    /// Changes a limiter's limits live (see [`Limiter::set`]): its configured limits become
    /// `limits`; while split ([`Scheduler::set_limiter_split`]), the limits in force are its
    /// part of them in the proportion of its part of the old ones ([`crate::rescale_part`])
    /// until the next split computes the part from the new ones. The buckets keep their
    /// levels (clamped to the new bursts): no burst is created.
    pub fn set_limits(
        &mut self,
        id: LimiterId,
        limits: Limits,
        now_ns: u64,
    ) -> Result<(), SchedError> {
        let slot = self.slot_mut(id).ok_or(SchedError::Unknown)?;
        let part = slot.lim.limits();
        let in_force = if part == slot.base {
            limits
        } else {
            crate::rescale_part(slot.base, part, limits)
        };
        slot.lim.set(in_force, now_ns);
        slot.base = limits;
        self.refresh_limited();
        Ok(())
    }

    /// A limiter's configured limits (what [`Scheduler::set_limits`] set; the limits in
    /// force, [`Scheduler::limiter`], are its part of them while split).
    pub fn limiter_base(&self, id: LimiterId) -> Option<Limits> {
        self.limiters
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .map(|s| s.base)
    }

    /// A limiter's demand, for the split of its limits across schedulers: the commands of
    /// the flows it holds, waiting and in flight. Walks the flows (once a pass, not per
    /// command).
    pub fn limiter_demand(&self, id: LimiterId) -> u32 {
        let mut d = 0u32;
        for f in self.flows.iter().filter(|f| f.live) {
            if f.limiters.contains(&id.0) {
                d = d.saturating_add(f.stats.queued.saturating_add(f.inflight));
            }
        }
        d
    }

    /// Takes every limiter's demand ([`Scheduler::limiter_demand`]) in one walk over the
    /// flows, for [`Scheduler::tallied_demand`]: once a pass, the split of many limiters costs
    /// one walk, not one per limiter (no allocation: the tallies live in the limiters'
    /// slots).
    pub fn tally_limiter_demands(&mut self) {
        for slot in self.limiters.iter_mut().flatten() {
            slot.tally = 0;
        }
        for f in self.flows.iter().filter(|f| f.live) {
            let d = f.stats.queued.saturating_add(f.inflight);
            if d == 0 {
                continue;
            }
            for &li in &f.limiters {
                if let Some(Some(slot)) = self.limiters.get_mut(usize::from(li)) {
                    slot.tally = slot.tally.saturating_add(d);
                }
            }
        }
    }

    /// A limiter's demand as of the last [`Scheduler::tally_limiter_demands`] (0 for an
    /// unknown one, or one added since).
    pub fn tallied_demand(&self, id: LimiterId) -> u32 {
        self.limiters
            .get(usize::from(id.0))
            .and_then(Option::as_ref)
            .map_or(0, |s| s.tally)
    }

    /// Sets a limiter's limits in force to this scheduler's part of its configured ones,
    /// shared with schedulers whose demands are `demands` (its own at `mine`):
    /// [`crate::limits_share`]. Alone (`demands` of one), the configured limits. The buckets
    /// keep their levels (clamped to the new bursts, [`Limiter::set`]); nothing changes when
    /// the part is the one in force. Returns whether it changed.
    pub fn set_limiter_split(
        &mut self,
        id: LimiterId,
        mine: usize,
        demands: &[u32],
        now_ns: u64,
    ) -> Result<bool, SchedError> {
        let slot = self.slot_mut(id).ok_or(SchedError::Unknown)?;
        let part = crate::limits_share(slot.base, mine, demands);
        if part == slot.lim.limits() {
            return Ok(false);
        }
        // The same limits set or unset: each flow's mask of limited limiters stays.
        slot.lim.set(part, now_ns);
        Ok(true)
    }

    /// Adds to a limiter's counters what another scheduler admitted through its part of the
    /// same limits and will no longer report (a replica of the limiter on another core that
    /// ended): [`Scheduler::limiter_stats`] then counts it too. Off the I/O path.
    pub fn add_limiter_counts(
        &mut self,
        id: LimiterId,
        counts: &LimiterStats,
    ) -> Result<(), SchedError> {
        let slot = self.slot_mut(id).ok_or(SchedError::Unknown)?;
        slot.ops = slot.ops.saturating_add(counts.admitted_ops);
        slot.bytes = slot.bytes.saturating_add(counts.admitted_bytes);
        slot.throttled_ns = slot.throttled_ns.saturating_add(counts.throttled_ns);
        Ok(())
    }

    /// Removes a limiter; flows that name it stop being held by it.
    pub fn remove_limiter(&mut self, id: LimiterId) {
        if let Some(slot) = self.limiters.get_mut(id.0 as usize) {
            *slot = None;
        }
        for f in self.flows.iter_mut() {
            for l in f.limiters.iter_mut() {
                if *l == id.0 {
                    *l = NONE16;
                }
            }
        }
        self.refresh_limited();
    }

    /// Recomputes every flow's mask of limiters with a limit set (configuration path).
    fn refresh_limited(&mut self) {
        for f in self.flows.iter_mut() {
            f.limited = 0;
            for (k, li) in f.limiters.iter().enumerate() {
                if let Some(Some(l)) = self.limiters.get(*li as usize)
                    && l.lim.is_limited()
                {
                    f.limited |= 1 << k;
                }
            }
        }
    }

    /// A limiter's limits and buckets.
    pub fn limiter(&self, id: LimiterId) -> Option<&Limiter> {
        self.limiters
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .map(|s| &s.lim)
    }

    /// A limiter's counters: what it admitted over all the flows it holds and held, and how
    /// long it held requests back. (Walks the flows: for reports, not per command.)
    pub fn limiter_stats(&self, id: LimiterId) -> Option<LimiterStats> {
        let slot = self.limiters.get(id.0 as usize)?.as_ref()?;
        let mut st = LimiterStats {
            admitted_ops: slot.ops,
            admitted_bytes: slot.bytes,
            throttled_ns: slot.throttled_ns,
        };
        for f in self.flows.iter().filter(|f| f.live) {
            for (k, li) in f.limiters.iter().enumerate() {
                if *li == id.0 {
                    st.admitted_ops += f.stats.dispatched - f.joined[k].0;
                    st.admitted_bytes += f.stats.bytes - f.joined[k].1;
                }
            }
        }
        Some(st)
    }

    fn slot_mut(&mut self, id: LimiterId) -> Option<&mut Slot> {
        self.limiters
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
    }

    /// `flow` leaves its limiters: what it admitted through them stays in their counters.
    fn leave_limiters(&mut self, fi: usize) {
        let f = &self.flows[fi];
        for (k, li) in f.limiters.iter().enumerate() {
            if let Some(Some(slot)) = self.limiters.get_mut(*li as usize) {
                slot.ops += f.stats.dispatched - f.joined[k].0;
                slot.bytes += f.stats.bytes - f.joined[k].1;
            }
        }
    }

    /// Changes a domain's cap on commands in flight (0: no cap), live: a lower cap lets
    /// no command start until completions bring the domain below it; a higher one lets
    /// waiting commands start at the next [`Scheduler::next`].
    pub fn set_max_inflight(&mut self, id: DomainId, max_inflight: u32) -> Result<(), SchedError> {
        let d = self.live_domain(id)?;
        d.max_inflight = max_inflight;
        d.refresh_cap();
        Ok(())
    }

    /// A domain's configured cap on commands in flight (0: no cap).
    pub fn max_inflight(&self, id: DomainId) -> Option<u32> {
        self.domains
            .get(id.0 as usize)
            .filter(|d| d.live)
            .map(|d| d.max_inflight)
    }

    /// Sets this scheduler's part of a domain's cap when other schedulers (other cores)
    /// send commands to the same backend: at most `min(share, max_inflight)` commands of
    /// the domain start here (0: the whole configured cap; a domain with no cap stays
    /// uncapped). Live, like [`Scheduler::set_max_inflight`]. See [`cap_share`].
    pub fn set_share(&mut self, id: DomainId, share: u32) -> Result<(), SchedError> {
        let d = self.live_domain(id)?;
        d.share = share;
        d.refresh_cap();
        Ok(())
    }

    /// The cap in force on a domain: its configured cap lowered to its share (0: no cap).
    pub fn cap_in_force(&self, id: DomainId) -> Option<u32> {
        self.domains
            .get(id.0 as usize)
            .filter(|d| d.live)
            .map(|d| d.cap)
    }

    /// A domain's demand: the sum of the weights of its flows that have commands waiting or
    /// in flight (started and not yet [released](Scheduler::release)); 0 when idle. Kept up
    /// to date as commands come and go (O(1)).
    pub fn domain_demand(&self, id: DomainId) -> u32 {
        self.domains
            .get(id.0 as usize)
            .filter(|d| d.live)
            .map_or(0, |d| d.demand)
    }

    /// A flow's weight while it has commands waiting or in flight, 0 while idle (its part of
    /// [`Scheduler::domain_demand`]).
    pub fn flow_demand(&self, flow: FlowId) -> u32 {
        self.flows
            .get(flow.0 as usize)
            .filter(|f| f.live && f.busy())
            .map_or(0, |f| f.weight)
    }

    /// A domain's commands here now: waiting and in flight ([`Share::want`]).
    pub fn domain_want(&self, id: DomainId) -> u32 {
        self.domains
            .get(id.0 as usize)
            .filter(|d| d.live)
            .map_or(0, |d| d.inflight + d.queued)
    }

    fn live_domain(&mut self, id: DomainId) -> Result<&mut Domain, SchedError> {
        self.domains
            .get_mut(id.0 as usize)
            .filter(|d| d.live)
            .ok_or(SchedError::Unknown)
    }

    /// A new domain; `max_inflight` caps its commands in flight (0: no cap).
    pub fn add_domain(&mut self, max_inflight: u32) -> Result<DomainId, SchedError> {
        let d = Domain {
            live: true,
            inflight: 0,
            max_inflight,
            share: 0,
            cap: max_inflight,
            demand: 0,
            queued: 0,
            saturated: false,
            vclock: 0,
            active: Vec::with_capacity(self.domain_room),
        };
        let i = match free_index(&self.domains, |d| d.live) {
            Some(i) => {
                self.domains[i] = d;
                i
            }
            None if self.domains.len() < NONE16 as usize => {
                self.domains.push(d);
                self.domains.len() - 1
            }
            None => return Err(SchedError::Full),
        };
        Ok(DomainId(i as u16))
    }

    /// Removes a domain that has no flows left.
    pub fn remove_domain(&mut self, id: DomainId) -> Result<(), SchedError> {
        if self.flows.iter().any(|f| f.live && f.domain == id.0) {
            return Err(SchedError::NotEmpty);
        }
        let d = self.live_domain(id)?;
        d.live = false;
        d.active = Vec::new();
        Ok(())
    }

    /// A new flow toward `domain` with `weight` (1..=[`MAX_WEIGHT`]) held by `limiters`.
    pub fn add_flow(
        &mut self,
        domain: DomainId,
        weight: u32,
        limiters: &[LimiterId],
    ) -> Result<FlowId, SchedError> {
        let d = self
            .domains
            .get(domain.0 as usize)
            .filter(|d| d.live)
            .ok_or(SchedError::Unknown)?;
        let vclock = d.vclock;
        let mut ls = [NONE16; 3];
        for (slot, l) in ls.iter_mut().zip(limiters) {
            if self.limiter(*l).is_none() {
                return Err(SchedError::Unknown);
            }
            *slot = l.0;
        }
        let f = Flow {
            live: true,
            domain: domain.0,
            weight: weight.clamp(1, MAX_WEIGHT),
            limiters: ls,
            limited: 0,
            joined: [(0, 0); 3],
            head: NIL,
            tail: NIL,
            vtime: vclock,
            active: false,
            blocked: None,
            inflight: 0,
            stats: FlowStats::default(),
        };
        let i = match free_index(&self.flows, |f| f.live) {
            Some(i) => {
                self.flows[i] = f;
                i
            }
            None if self.flows.len() < NONE16 as usize => {
                self.flows.push(f);
                self.flows.len() - 1
            }
            None => return Err(SchedError::Full),
        };
        // Room for every flow in the domain's active list, so `enqueue` never allocates.
        let n = self
            .flows
            .iter()
            .filter(|f| f.live && f.domain == domain.0)
            .count();
        let d = &mut self.domains[domain.0 as usize];
        d.active.reserve(n.saturating_sub(d.active.len()));
        self.refresh_limited();
        Ok(FlowId(i as u16))
    }

    /// Changes a flow's weight.
    pub fn set_weight(&mut self, flow: FlowId, weight: u32) -> Result<(), SchedError> {
        let f = self.flow_mut(flow).ok_or(SchedError::Unknown)?;
        let (old, new, busy, di) = (f.weight, weight.clamp(1, MAX_WEIGHT), f.busy(), f.domain);
        f.weight = new;
        if busy {
            let d = &mut self.domains[di as usize];
            d.demand = d.demand.saturating_sub(old) + new;
        }
        Ok(())
    }

    /// Removes a flow with no commands waiting.
    pub fn remove_flow(&mut self, flow: FlowId) -> Result<(), SchedError> {
        let f = self.flow_mut(flow).ok_or(SchedError::Unknown)?;
        if f.head != NIL {
            return Err(SchedError::NotEmpty);
        }
        // Its commands still at the backend leave its domain's demand with it.
        let (busy, w, di) = (f.busy(), f.weight, f.domain as usize);
        f.inflight = 0;
        f.live = false;
        if busy {
            let d = &mut self.domains[di];
            d.demand = d.demand.saturating_sub(w);
        }
        self.leave_limiters(flow.0 as usize);
        Ok(())
    }

    fn flow_mut(&mut self, id: FlowId) -> Option<&mut Flow> {
        self.flows.get_mut(id.0 as usize).filter(|f| f.live)
    }

    /// A flow's counters.
    pub fn flow_stats(&self, id: FlowId) -> Option<FlowStats> {
        self.flows
            .get(id.0 as usize)
            .filter(|f| f.live)
            .map(|f| f.stats)
    }

    /// Commands of `domain` in flight.
    pub fn inflight(&self, domain: DomainId) -> u32 {
        self.domains
            .get(domain.0 as usize)
            .map_or(0, |d| d.inflight)
    }

    /// How long `flow`'s head must wait for its limiters (0: it may go).
    fn limit_wait(&mut self, flow: usize, now_ns: u64, cost: Cost) -> (u64, u16) {
        let f = &self.flows[flow];
        let (mut m, ls) = (f.limited, f.limiters);
        let mut wait = 0;
        let mut by = NONE16;
        while m != 0 {
            let li = ls[m.trailing_zeros() as usize];
            m &= m - 1;
            if let Some(Some(slot)) = self.limiters.get_mut(li as usize) {
                let w = slot.lim.wait_ns(now_ns, cost);
                if w > wait {
                    wait = w;
                    by = li;
                }
            }
        }
        (wait, by)
    }

    fn charge(&mut self, flow: usize, now_ns: u64, cost: Cost) {
        let f = &self.flows[flow];
        let (mut m, ls) = (f.limited, f.limiters);
        while m != 0 {
            let li = ls[m.trailing_zeros() as usize];
            m &= m - 1;
            if let Some(Some(slot)) = self.limiters.get_mut(li as usize) {
                slot.lim.charge(now_ns, cost);
            }
        }
    }

    /// Admits `cost` by all of `f`'s limiters with a limit set at once (charged), or by none.
    #[inline]
    fn admit(slots: &mut [Option<Slot>], f: &Flow, now_ns: u64, cost: Cost) -> bool {
        let (all, ls) = (f.limited, f.limiters);
        for (k, li) in ls.into_iter().enumerate() {
            if all & (1 << k) != 0
                && let Some(Some(slot)) = slots.get_mut(li as usize)
                && !slot.lim.take(now_ns, cost)
            {
                Self::refund(slots, ls, all & ((1 << k) - 1), cost);
                return false;
            }
        }
        true
    }

    #[cold]
    fn refund(slots: &mut [Option<Slot>], ls: [u16; 3], mut m: u8, cost: Cost) {
        while m != 0 {
            let li = ls[m.trailing_zeros() as usize];
            m &= m - 1;
            if let Some(Some(slot)) = slots.get_mut(li as usize) {
                slot.lim.refund(cost);
            }
        }
    }

    /// Starts a command of `flow`, counting it in flight. A first start (`charged` false)
    /// charges its limiters, advances the flow's virtual time and counts it; a command that
    /// was put back ([`Scheduler::requeue_busy`], [`Scheduler::requeue_next_step`]) was
    /// charged and counted already.
    fn start(&mut self, flow: usize, cost: Cost, charged: bool, now_ns: u64) {
        if !charged {
            self.charge(flow, now_ns, cost);
        }
        self.started(flow, cost, charged, now_ns);
    }

    /// The bookkeeping of [`Scheduler::start`] after the limiters.
    fn started(&mut self, flow: usize, cost: Cost, charged: bool, now_ns: u64) {
        let f = &mut self.flows[flow];
        let d = &mut self.domains[f.domain as usize];
        Self::account(&mut self.limiters, f, d, cost, charged, now_ns);
    }

    /// Counts a command of `f` started in `d`: time it was held back, virtual time, counters.
    #[inline(always)]
    fn account(
        slots: &mut [Option<Slot>],
        f: &mut Flow,
        d: &mut Domain,
        cost: Cost,
        charged: bool,
        now_ns: u64,
    ) {
        if f.blocked.is_some() {
            Self::unblock(slots, f, now_ns);
        }
        d.vclock = d.vclock.max(f.vtime);
        if !charged {
            // Weight 1 (every flow without a `weight` rule) needs no division.
            let service = cost.bytes.max(MIN_SERVICE) * VSCALE;
            f.vtime += match f.weight {
                1 => service,
                w => service / u64::from(w),
            };
            f.stats.dispatched += 1;
            f.stats.bytes += cost.bytes;
        }
        if !f.busy() {
            d.demand += f.weight;
        }
        f.inflight += 1;
        d.inflight += 1;
    }

    /// The time `f`'s head was held back by a limit ends.
    #[cold]
    fn unblock(slots: &mut [Option<Slot>], f: &mut Flow, now_ns: u64) {
        if let Some((since, by)) = f.blocked.take() {
            let t = now_ns.saturating_sub(since);
            f.stats.throttled_ns += t;
            if let Some(Some(slot)) = slots.get_mut(by as usize) {
                slot.throttled_ns += t;
            }
        }
    }

    /// A command of `flow` that can only run now (it has no handle to wait with): starts it,
    /// charged and counted in flight as [`Admit::Now`] from [`Scheduler::enqueue`], when
    /// `enqueue` would start it at once, and returns true; otherwise returns false and
    /// changes nothing (the caller then enqueues it the usual way).
    pub fn admit_now(&mut self, now_ns: u64, flow: FlowId, cost: Cost) -> Result<bool, SchedError> {
        let Some(f) = self.flows.get_mut(flow.0 as usize).filter(|f| f.live) else {
            return Err(SchedError::Unknown);
        };
        let d = &mut self.domains[f.domain as usize];
        if !d.active.is_empty() || !d.can_start() {
            return Ok(false);
        }
        // `admit` gives back what it took when a limit refuses.
        if f.limited != 0 && !Self::admit(&mut self.limiters, f, now_ns, cost) {
            return Ok(false);
        }
        Self::account(&mut self.limiters, f, d, cost, false, now_ns);
        Ok(true)
    }

    /// A new command `h` of `flow` arrives. It starts at once ([`Admit::Now`]) when nobody in
    /// its domain waits, the domain has room and the flow's limits allow it; otherwise it
    /// joins the flow's FIFO.
    pub fn enqueue(
        &mut self,
        now_ns: u64,
        flow: FlowId,
        h: u32,
        cost: Cost,
    ) -> Result<Admit, SchedError> {
        let fi = flow.0 as usize;
        let f = self.flows.get_mut(fi).filter(|f| f.live);
        let Some(f) = f else {
            return Err(SchedError::Unknown);
        };
        if self.entries.get(h as usize).is_none_or(|e| e.queued) {
            return Err(SchedError::BadHandle);
        }
        let d = &mut self.domains[f.domain as usize];
        if !d.active.is_empty() || !d.can_start() {
            self.wait(fi, h, cost);
            return Ok(Admit::Queued);
        }
        if f.limited != 0 {
            return Ok(self.enqueue_limited(now_ns, fi, h, cost));
        }
        Self::account(&mut self.limiters, f, d, cost, false, now_ns);
        Ok(Admit::Now)
    }

    /// [`Scheduler::enqueue`] of a command that may start but for its flow's limits.
    #[inline(never)]
    fn enqueue_limited(&mut self, now_ns: u64, fi: usize, h: u32, cost: Cost) -> Admit {
        let f = &mut self.flows[fi];
        if !Self::admit(&mut self.limiters, f, now_ns, cost) {
            self.wait(fi, h, cost);
            return Admit::Queued;
        }
        let d = &mut self.domains[f.domain as usize];
        Self::account(&mut self.limiters, f, d, cost, false, now_ns);
        Admit::Now
    }

    /// Command `h` of flow `fi` joins the flow's FIFO.
    #[inline(never)]
    fn wait(&mut self, fi: usize, h: u32, cost: Cost) {
        self.arrivals += 1;
        self.entries[h as usize] = Entry {
            next: NIL,
            flow: fi as u16,
            queued: true,
            charged: false,
            cost,
            arrival: self.arrivals,
        };
        self.push_back(fi, h);
    }

    fn push_back(&mut self, fi: usize, h: u32) {
        let f = &mut self.flows[fi];
        let d = &mut self.domains[f.domain as usize];
        if !f.busy() {
            d.demand += f.weight;
        }
        d.queued += 1;
        if f.tail == NIL {
            f.head = h;
        } else {
            self.entries[f.tail as usize].next = h;
        }
        f.tail = h;
        f.stats.queued += 1;
        self.waiting += 1;
        self.activate(fi);
    }

    fn activate(&mut self, fi: usize) {
        let f = &mut self.flows[fi];
        if f.active {
            return;
        }
        f.active = true;
        let d = &mut self.domains[f.domain as usize];
        // An idle flow restarts at the domain's clock: no credit banked while idle.
        f.vtime = f.vtime.max(d.vclock);
        d.active.push(fi as u16);
    }

    fn pop_front(&mut self, fi: usize) -> u32 {
        let f = &mut self.flows[fi];
        let h = f.head;
        let e = &mut self.entries[h as usize];
        f.head = e.next;
        if f.head == NIL {
            f.tail = NIL;
        }
        e.next = NIL;
        e.queued = false;
        f.stats.queued -= 1;
        self.waiting -= 1;
        self.domains[f.domain as usize].queued -= 1;
        if f.head == NIL {
            f.active = false;
            let d = &mut self.domains[f.domain as usize];
            if let Some(p) = d.active.iter().position(|&x| x as usize == fi) {
                d.active.swap_remove(p);
            }
            if f.inflight == 0 {
                d.demand = d.demand.saturating_sub(f.weight);
            }
        }
        h
    }

    /// The next waiting command that may start now, already charged and counted in flight,
    /// with its flow; `None` when none may. Call until `None` after completions, after
    /// enqueues that returned [`Admit::Queued`], and when [`Scheduler::next_wakeup`] is due.
    pub fn next(&mut self, now_ns: u64) -> Option<(u32, FlowId)> {
        if self.waiting == 0 {
            return None;
        }
        for di in 0..self.domains.len() {
            let d = &self.domains[di];
            if !d.live || d.active.is_empty() || !d.can_start() {
                continue;
            }
            // The eligible flow with the smallest virtual time (ties: older head).
            let mut best: Option<(u64, u64, usize)> = None;
            for k in 0..self.domains[di].active.len() {
                let fi = self.domains[di].active[k] as usize;
                let head = self.flows[fi].head;
                let e = self.entries[head as usize];
                let key = (self.flows[fi].vtime, e.arrival);
                if best.is_some_and(|(v, a, _)| (v, a) <= key) {
                    continue;
                }
                if !e.charged {
                    let (wait, by) = self.limit_wait(fi, now_ns, e.cost);
                    if wait > 0 {
                        let f = &mut self.flows[fi];
                        if f.blocked.is_none() {
                            f.blocked = Some((now_ns, by));
                        }
                        continue;
                    }
                }
                best = Some((key.0, key.1, fi));
            }
            if let Some((_, _, fi)) = best {
                let h = self.pop_front(fi);
                let e = self.entries[h as usize];
                self.start(fi, e.cost, e.charged, now_ns);
                return Some((h, FlowId(fi as u16)));
            }
        }
        None
    }

    /// When (ns) a command held back only by its limits may start: the caller's poll loop
    /// should look again by then. `None`: no command waits on a limit.
    pub fn next_wakeup(&mut self, now_ns: u64) -> Option<u64> {
        let mut soonest: Option<u64> = None;
        for fi in 0..self.flows.len() {
            let f = &self.flows[fi];
            if !f.live || f.head == NIL || !self.domains[f.domain as usize].can_start() {
                continue;
            }
            let e = self.entries[f.head as usize];
            if e.charged {
                continue;
            }
            let (wait, _) = self.limit_wait(fi, now_ns, e.cost);
            if wait > 0 {
                let t = now_ns.saturating_add(wait);
                soonest = Some(soonest.map_or(t, |s| s.min(t)));
            }
        }
        soonest
    }

    /// The backend refused command `h` of `flow` (started by [`Scheduler::next`] or
    /// [`Admit::Now`]) as busy: it goes back to the head of its flow, already charged, and
    /// the domain counts as saturated until one of its commands completes.
    pub fn requeue_busy(&mut self, flow: FlowId, h: u32, cost: Cost) -> Result<(), SchedError> {
        let dom = self.flow_mut(flow).ok_or(SchedError::Unknown)?.domain as usize;
        if self.entries.get(h as usize).is_none_or(|e| e.queued) {
            return Err(SchedError::BadHandle);
        }
        let d = &mut self.domains[dom];
        d.inflight = d.inflight.saturating_sub(1);
        d.saturated = true;
        self.push_front_charged(flow, h, cost);
        // Waiting again rather than in flight (busy throughout: no demand change).
        let f = &mut self.flows[flow.0 as usize];
        f.inflight = f.inflight.saturating_sub(1);
        Ok(())
    }

    /// A started command of `flow` whose step finished ([`Scheduler::completed`] was
    /// called for it) needs the backend again for its next step (a Copy reads, then
    /// writes): it waits at the head of its flow, already charged, for room in the domain.
    pub fn requeue_next_step(
        &mut self,
        flow: FlowId,
        h: u32,
        cost: Cost,
    ) -> Result<(), SchedError> {
        self.flow_mut(flow).ok_or(SchedError::Unknown)?;
        if self.entries.get(h as usize).is_none_or(|e| e.queued) {
            return Err(SchedError::BadHandle);
        }
        self.push_front_charged(flow, h, cost);
        Ok(())
    }

    fn push_front_charged(&mut self, flow: FlowId, h: u32, cost: Cost) {
        let fi = flow.0 as usize;
        let f = &self.flows[fi];
        let d = &mut self.domains[f.domain as usize];
        if !f.busy() {
            d.demand += f.weight;
        }
        d.queued += 1;
        let old_head = f.head;
        self.entries[h as usize] = Entry {
            next: old_head,
            flow: flow.0,
            queued: true,
            charged: true,
            cost,
            // Its original place: before everything the flow holds.
            arrival: 0,
        };
        let f = &mut self.flows[fi];
        f.head = h;
        if f.tail == NIL {
            f.tail = h;
        }
        f.stats.queued += 1;
        self.waiting += 1;
        self.activate(fi);
    }

    /// A command that was started in `domain` has finished (or left the backend for good):
    /// the domain has room again. The command's flow stays busy (in the domain's demand)
    /// until [`Scheduler::release`] of it; [`Scheduler::finished`] does both.
    pub fn completed(&mut self, domain: DomainId) {
        if let Some(d) = self.domains.get_mut(domain.0 as usize) {
            d.inflight = d.inflight.saturating_sub(1);
            d.saturated = false;
        }
    }

    /// A started command of `flow` is no longer the flow's in flight (it completed, or its
    /// queue went away and its completion will count for the domain only): the flow leaves
    /// its domain's demand when it has nothing else waiting or in flight. Nothing happens
    /// for a flow that was removed.
    pub fn release(&mut self, flow: FlowId) {
        let Some(f) = self.flows.get_mut(flow.0 as usize).filter(|f| f.live) else {
            return;
        };
        if f.inflight == 0 {
            return;
        }
        f.inflight -= 1;
        if !f.busy() {
            let d = &mut self.domains[f.domain as usize];
            d.demand = d.demand.saturating_sub(f.weight);
        }
    }

    /// A started command of `flow` has finished: [`Scheduler::completed`] of its domain and
    /// [`Scheduler::release`] of the flow.
    pub fn finished(&mut self, flow: FlowId) {
        if let Some(d) = self.domain_of(flow) {
            self.completed(d);
            self.release(flow);
        }
    }

    /// The domain of a flow.
    pub fn domain_of(&self, flow: FlowId) -> Option<DomainId> {
        self.flows
            .get(flow.0 as usize)
            .filter(|f| f.live)
            .map(|f| DomainId(f.domain))
    }

    /// Replaces the limiters that hold a flow.
    pub fn set_flow_limiters(
        &mut self,
        flow: FlowId,
        limiters: &[LimiterId],
    ) -> Result<(), SchedError> {
        let mut ls = [NONE16; 3];
        for (slot, l) in ls.iter_mut().zip(limiters) {
            if self.limiter(*l).is_none() {
                return Err(SchedError::Unknown);
            }
            *slot = l.0;
        }
        self.flow_mut(flow).ok_or(SchedError::Unknown)?;
        let fi = flow.0 as usize;
        self.leave_limiters(fi);
        let f = &mut self.flows[fi];
        f.limiters = ls;
        f.joined = [(f.stats.dispatched, f.stats.bytes); 3];
        self.refresh_limited();
        Ok(())
    }

    /// Takes a waiting command out (Abort, queue teardown). Returns whether it was waiting.
    pub fn remove(&mut self, h: u32) -> bool {
        let Some(e) = self.entries.get(h as usize).copied() else {
            return false;
        };
        if !e.queued {
            return false;
        }
        let fi = e.flow as usize;
        if self.flows[fi].head == h {
            self.pop_front(fi);
            return true;
        }
        let mut p = self.flows[fi].head;
        while p != NIL {
            let next = self.entries[p as usize].next;
            if next == h {
                self.entries[p as usize].next = e.next;
                if self.flows[fi].tail == h {
                    self.flows[fi].tail = p;
                }
                let x = &mut self.entries[h as usize];
                x.next = NIL;
                x.queued = false;
                self.flows[fi].stats.queued -= 1;
                self.waiting -= 1;
                self.domains[self.flows[fi].domain as usize].queued -= 1;
                return true;
            }
            p = next;
        }
        false
    }

    /// Whether command `h` is waiting.
    pub fn is_queued(&self, h: u32) -> bool {
        self.entries.get(h as usize).is_some_and(|e| e.queued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacities(s: &Scheduler) -> (usize, usize, Vec<usize>) {
        let active = s.domains.iter().map(|d| d.active.capacity()).collect();
        (s.flows.capacity(), s.limiters.capacity(), active)
    }

    #[test]
    fn reserved_room_takes_flows_and_limiters_without_growing() {
        let mut s = Scheduler::new(16);
        let early = s.add_domain(0).unwrap();
        s.reserve(8, 8, 8);
        let late = s.add_domain(0).unwrap();
        let room = capacities(&s);
        assert!(room.0 >= 8 && room.1 >= 8 && room.2.iter().all(|&c| c >= 8));
        // Connect and disconnect "controllers" twice: a limiter and a flow in each domain.
        for _ in 0..2 {
            let mut made = Vec::new();
            for _ in 0..4 {
                let l = s.add_limiter(Limits::NONE, 0).unwrap();
                let a = s.add_flow(early, 1, &[l]).unwrap();
                let b = s.add_flow(late, 1, &[l]).unwrap();
                made.push((l, a, b));
            }
            assert_eq!(capacities(&s), room, "nothing grew");
            for (l, a, b) in made {
                s.remove_flow(a).unwrap();
                s.remove_flow(b).unwrap();
                s.remove_limiter(l);
            }
        }
        assert_eq!(capacities(&s), room);
    }
}
