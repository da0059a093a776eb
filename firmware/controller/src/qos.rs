//! Quality of service in the controller core (issue 16): every I/O command passes through a
//! [`keel_qos::Scheduler`] between decoding and its backend.
//!
//! - A **flow** per controller and namespace: the commands of one host to one namespace wait
//!   in arrival order, whichever I/O queue or connection they came on.
//! - **Limiters**: each namespace has one (its own limits, every host together), each
//!   controller one (its host's limits, from [`HostQos`] or
//!   [`Target::set_controller_limits`]), each group one (a tenant's pool); a flow is held by
//!   its namespace's, its controller's and its group's. A command over a limit waits in its
//!   flow and is never failed.
//! - A **domain** per backend: namespaces cut from one drive share one (by
//!   [`NamespaceQos::domain`] key), and when it is saturated (its `max_inflight` reached, or
//!   the backend refused a command as busy) its flows share it by weight, work-conserving.
//!
//! With no limit set and a backend that takes every command, a command starts at once
//! (`Admit::Now`) without being queued.

use crate::config::*;
use crate::target::*;
use alloc::string::String;
use alloc::vec::Vec;
use keel_qos::{DomainId, FlowStats, LimiterId, Share};

/// Units of a weight in [`Target::split_demand`].
pub const DEMAND_UNIT: u32 = 1024;

/// A capped domain of a target ([`Target::capped_domains`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CappedDomain {
    /// Its key ([`NamespaceQos::domain`]): the same in every target reaching the backend.
    pub key: u32,
    /// The domain in this target's scheduler.
    pub domain: DomainId,
    /// Its configured cap (`[qos] drive_max_inflight`).
    pub cap: u32,
    /// Its demand (the weights of its flows with commands waiting or in flight), its
    /// commands waiting and in flight, and those in flight.
    pub load: Share,
}

/// A limited entity of a target whose limits other targets (other cores) enforce too
/// ([`Target::shared_limits`]): a namespace or a group with limits, served on every core, or
/// a controller with limits (its host's) whose I/O queues are served on several cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedLimit {
    /// Its key, the same in every target that has it, below 2³¹ ([`limit_key`],
    /// [`group_key`], [`controller_key`]).
    pub key: u32,
    /// Its limiter in this target's scheduler.
    pub limiter: LimiterId,
    /// Its demand here: the commands of the flows it holds, waiting and in flight
    /// ([`keel_qos::Scheduler::limiter_demand`]).
    pub demand: u32,
}

/// The key of namespace `nsid` of subsystem `nqn` in the split of limits across targets: a
/// 31-bit FNV-1a hash of both (two namespaces colliding would share one split; with the few
/// limited namespaces of a device, 2⁻³¹ each pair).
pub fn limit_key(nqn: &str, nsid: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in nqn.bytes().chain(nsid.to_le_bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h & 0x7fff_ffff
}

/// The key of QoS group `name` ([`limit_key`] of the name with NSID `FFFFFFFFh`, which no
/// namespace has).
pub fn group_key(name: &str) -> u32 {
    limit_key(name, u32::MAX)
}

/// The key of controller `cntlid` of subsystem `nqn` ([`limit_key`] of the NQN with NSID
/// `FFFF0000h` + CNTLID, far above any NSID a configuration gives; CNTLID FFFFh, whose key
/// would be a group's named as the subsystem, is reserved, NVMe base 2.0 §3.1.1). The holder of a controller and each core's replica of it
/// ([`crate::Adoption`]) have the same CNTLID.
pub fn controller_key(nqn: &str, cntlid: u16) -> u32 {
    limit_key(nqn, 0xffff_0000 | u32::from(cntlid))
}

impl Target {
    /// Its namespaces and groups with limits, for the split of each one's limits across the targets
    /// (cores) serving it ([`Target::set_limit_split`]): each target publishes its demand under the
    /// namespace's (group's) key and takes its part. Walks the namespaces and, for each limited
    /// one, the flows (once a pass, not per command). Nothing allocates.
    pub fn shared_limits(&self) -> impl Iterator<Item = SharedLimit> + '_ {
        self.shared_limits_by(keel_qos::Scheduler::limiter_demand)
    }

    /// [`Target::shared_limits`] for a core's pass: the demands of every limiter taken in one
    /// walk over the flows first (`keel_qos::Scheduler::tally_limiter_demands`), not one walk
    /// per limited namespace, group or controller. The same items.
    pub fn shared_limits_for_pass(&mut self) -> impl Iterator<Item = SharedLimit> + '_ {
        self.sched.tally_limiter_demands();
        self.shared_limits_by(keel_qos::Scheduler::tallied_demand)
    }

    fn shared_limits_by(
        &self,
        demand: fn(&keel_qos::Scheduler, LimiterId) -> u32,
    ) -> impl Iterator<Item = SharedLimit> + '_ {
        let limited = |l: LimiterId| self.sched.limiter_base(l).is_some_and(|l| l.any());
        let namespaces = self.subsystems.iter().flat_map(move |s| {
            s.namespaces
                .iter()
                .flatten()
                .filter(move |ns| ns.active && limited(ns.limiter))
                .map(move |ns| SharedLimit {
                    key: limit_key(&s.nqn, ns.nsid),
                    limiter: ns.limiter,
                    demand: demand(&self.sched, ns.limiter),
                })
        });
        let groups =
            self.groups
                .iter()
                .filter(move |(_, l, _)| limited(*l))
                .map(move |(name, l, _)| SharedLimit {
                    key: group_key(name),
                    limiter: *l,
                    demand: demand(&self.sched, *l),
                });
        // Controllers with limits (their host's) whose I/O queues are served on several
        // cores: a replica (its queues are adopted here), or the holder of one with a queue
        // served elsewhere. Listed last: past the slots a target publishes, a limiter gets
        // an even part of its limits by core, which a controller served here only must not.
        let ctrls = self
            .ctrls
            .iter()
            .flatten()
            .filter(move |c| {
                c.subsys != DISCOVERY
                    && limited(c.limiter)
                    && (c.replica
                        || c.io_qs.iter().flatten().any(|q| {
                            self.queue_index(*q)
                                .is_some_and(|qi| self.queues[qi].elsewhere)
                        }))
            })
            .filter_map(move |c| {
                Some(SharedLimit {
                    key: controller_key(&self.subsystems.get(c.subsys)?.nqn, c.cntlid),
                    limiter: c.limiter,
                    demand: demand(&self.sched, c.limiter),
                })
            });
        namespaces.chain(groups).chain(ctrls)
    }

    /// Sets this target's part of a shared limiter's limits from the demands of every
    /// target that has it (its own at `mine`; alone: the whole limits), live:
    /// [`keel_qos::Scheduler::set_limiter_split`]. Returns whether the part changed.
    pub fn set_limit_split(&mut self, limiter: LimiterId, mine: usize, demands: &[u32]) -> bool {
        let now = self.now.as_nanos();
        self.sched
            .set_limiter_split(limiter, mine, demands, now)
            .unwrap_or(false)
    }

    /// What a shared limiter admitted here and how long it held commands back (for the
    /// merged counters of status and `/metrics`; walks the flows: not per command).
    pub fn shared_limit_counters(&self, limiter: LimiterId) -> keel_qos::LimiterStats {
        self.sched.limiter_stats(limiter).unwrap_or_default()
    }

    /// The limits in force on a limiter here (its part while split; for tests and reports).
    pub fn limits_in_force(&self, limiter: LimiterId) -> QosLimits {
        self.sched
            .limiter(limiter)
            .map_or(QosLimits::NONE, |l| l.limits())
    }

    /// The limits of a new controller of `hostnqn`: its own rule, else the `*` rule.
    pub(crate) fn host_limits(&self, hostnqn: &str) -> QosLimits {
        self.host_qos
            .iter()
            .find(|h| h.hostnqn == hostnqn)
            .or_else(|| self.host_qos.iter().find(|h| h.hostnqn == "*"))
            .map_or(QosLimits::NONE, |h| h.limits)
    }

    /// A limiter, or an unlimited stand-in when the scheduler has no room (65535 limiters).
    pub(crate) fn new_limiter(&mut self, limits: QosLimits, now: Instant) -> LimiterId {
        self.sched
            .add_limiter(limits, now.as_nanos())
            .unwrap_or(LimiterId(u16::MAX))
    }

    /// The group limiter and weight of a namespace.
    fn group_of(&self, qos: &NamespaceQos) -> (Option<LimiterId>, u32) {
        let g = qos
            .group
            .as_ref()
            .and_then(|name| self.groups.iter().find(|(n, _, _)| n == name));
        let weight = match g {
            Some((_, _, w)) if *w > 0 => *w,
            _ => qos.weight,
        };
        (g.map(|(_, l, _)| *l), weight)
    }

    /// Gives controller `ci` a flow toward every namespace of its subsystem that has none.
    pub(crate) fn ensure_flows(&mut self, ci: usize) {
        let Some(Some(c)) = self.ctrls.get(ci) else {
            return;
        };
        let (si, climiter) = (c.subsys, c.limiter);
        let n = self.subsystems.get(si).map_or(0, |s| s.namespaces.len());
        for ni in 0..n {
            let has =
                matches!(&self.ctrls[ci], Some(c) if c.flows.get(ni).is_some_and(Option::is_some));
            let Some(Some(ns)) = self.subsystems[si].namespaces.get(ni) else {
                continue;
            };
            if has {
                continue;
            }
            let (group, weight) = self.group_of(&ns.qos);
            let mut ls = Vec::with_capacity(3);
            ls.push(ns.limiter);
            if self.sched.limiter(climiter).is_some() {
                ls.push(climiter);
            }
            ls.extend(group);
            let flow = self.sched.add_flow(ns.domain, weight, &ls).ok();
            if let Some(Some(c)) = self.ctrls.get_mut(ci) {
                if c.flows.len() <= ni {
                    c.flows.resize(ni + 1, None);
                }
                c.flows[ni] = flow;
            }
        }
    }

    /// Changes a namespace's limits, weight and group live (its domain stays): commands
    /// waiting keep their place and start under the new limits.
    pub fn set_namespace_qos(
        &mut self,
        subnqn: &str,
        nsid: u32,
        qos: NamespaceQos,
    ) -> Result<(), TargetError> {
        let si = self
            .subsys_index(subnqn)
            .ok_or(TargetError::UnknownSubsystem)?;
        let ni = self.subsystems[si]
            .find_ns(nsid)
            .ok_or(TargetError::UnknownNamespace)?;
        if let Some(g) = &qos.group
            && !self.groups.iter().any(|(n, _, _)| n == g)
        {
            return Err(ConfigError::UnknownGroup(nsid).into());
        }
        let now = self.now.as_nanos();
        let (group, weight) = self.group_of(&qos);
        let Some(Some(ns)) = self.subsystems[si].namespaces.get_mut(ni) else {
            return Err(TargetError::UnknownNamespace);
        };
        let _ = self.sched.set_limits(ns.limiter, qos.limits, now);
        // The domain stays (the backend does not change live); its cap may.
        if qos.max_inflight != ns.qos.max_inflight {
            let _ = self.sched.set_max_inflight(ns.domain, qos.max_inflight);
        }
        let nlimiter = ns.limiter;
        ns.qos = NamespaceQos {
            domain: ns.qos.domain,
            ..qos
        };
        for c in self.ctrls.iter().flatten() {
            if c.subsys != si {
                continue;
            }
            if let Some(Some(f)) = c.flows.get(ni) {
                let mut ls = Vec::with_capacity(3);
                ls.push(nlimiter);
                if self.sched.limiter(c.limiter).is_some() {
                    ls.push(c.limiter);
                }
                ls.extend(group);
                let _ = self.sched.set_flow_limiters(*f, &ls);
                let _ = self.sched.set_weight(*f, weight);
            }
        }
        Ok(())
    }

    /// Replaces the groups live: limits and weights of groups that stay change in place, new
    /// groups start with full buckets; namespaces of a removed group leave it.
    pub fn set_qos_groups(&mut self, groups: Vec<QosGroup>) {
        let now = self.now.as_nanos();
        let mut kept = Vec::with_capacity(groups.len());
        for g in groups {
            let id = match self.groups.iter().find(|(n, _, _)| *n == g.name) {
                Some((_, id, _)) => {
                    let _ = self.sched.set_limits(*id, g.limits, now);
                    *id
                }
                None => self.new_limiter(g.limits, self.now),
            };
            kept.push((g.name, id, g.weight));
        }
        for (name, id, _) in &self.groups {
            if !kept.iter().any(|(n, _, _)| n == name) {
                self.sched.remove_limiter(*id);
            }
        }
        self.groups = kept;
        // Namespaces naming a group that is gone leave it; weights follow the groups.
        let mut changes: Vec<(String, u32, NamespaceQos)> = Vec::new();
        for s in self.subsystems.iter() {
            for ns in s.namespaces.iter().flatten().filter(|n| n.active) {
                let mut q = ns.qos.clone();
                if q.group
                    .as_ref()
                    .is_some_and(|g| !self.groups.iter().any(|(n, _, _)| n == g))
                {
                    q.group = None;
                }
                changes.push((s.nqn.clone(), ns.nsid, q));
            }
        }
        for (nqn, nsid, q) in changes {
            let _ = self.set_namespace_qos(&nqn, nsid, q);
        }
    }

    /// Adds the groups of `groups` this target does not have yet (a subsystem added live
    /// names them), with full buckets; those it has stay as they are.
    pub fn add_qos_groups(&mut self, groups: &[QosGroup]) {
        for g in groups {
            if !self.groups.iter().any(|(n, _, _)| *n == g.name) {
                let id = self.new_limiter(g.limits, self.now);
                self.groups.push((g.name.clone(), id, g.weight));
            }
        }
    }

    /// Replaces the per-host rules live; every controller's limits follow (a local
    /// controller's set with [`Target::set_controller_limits`] are replaced too). A replica's
    /// controller (its queues adopted here, [`crate::Adoption`]) has no host NQN: its limits
    /// are its holder's, which come with its adoptions and
    /// [`Target::set_replica_controller_limits`], and stay.
    pub fn set_host_qos(&mut self, rules: Vec<HostQos>) {
        self.host_qos = rules;
        let now = self.now.as_nanos();
        for ci in 0..self.ctrls.len() {
            let Some(Some(c)) = self.ctrls.get(ci) else {
                continue;
            };
            if c.replica {
                continue;
            }
            let (l, id) = (self.host_limits(&c.hostnqn), c.limiter);
            let _ = self.sched.set_limits(id, l, now);
        }
    }

    /// The configured limits of every controller of subsystem `subnqn` held here (not a
    /// replica's), by CNTLID: what a live change of the host rules gave them, for the replicas
    /// of those controllers on other cores ([`Target::set_replica_controller_limits`]).
    pub fn controller_limits(&self, subnqn: &str) -> Vec<(u16, QosLimits)> {
        let Some(si) = self.subsys_index(subnqn).filter(|&si| si != DISCOVERY) else {
            return Vec::new();
        };
        self.ctrls
            .iter()
            .flatten()
            .filter(|c| !c.replica && c.subsys == si)
            .map(|c| {
                let l = self
                    .sched
                    .limiter_base(c.limiter)
                    .unwrap_or(QosLimits::NONE);
                (c.cntlid, l)
            })
            .collect()
    }

    /// Sets the limits of the replica of controller `cntlid` of subsystem `subnqn` (its I/O
    /// queues adopted here) to its holder's new ones, live: the limiter stays (so does its
    /// key in the split across cores, [`controller_key`]), its buckets keep their level and
    /// its part is that of the new limits until the next split ([`keel_qos::Scheduler::set_limits`]).
    /// Returns whether such a replica is here (none: no queue of it was adopted here, and a
    /// later adoption carries the limits).
    pub fn set_replica_controller_limits(
        &mut self,
        subnqn: &str,
        cntlid: u16,
        limits: QosLimits,
    ) -> Result<bool, TargetError> {
        let si = self
            .subsys_index(subnqn)
            .filter(|&si| si != DISCOVERY)
            .ok_or(TargetError::UnknownSubsystem)?;
        let Some(l) = self
            .ctrls
            .iter()
            .flatten()
            .find(|c| c.replica && c.cntlid == cntlid && c.subsys == si)
            .map(|c| c.limiter)
        else {
            return Ok(false);
        };
        if self.sched.limiter_base(l) != Some(limits) {
            let now = self.now.as_nanos();
            self.sched
                .set_limits(l, limits, now)
                .map_err(|_| TargetError::UnknownQueue)?;
        }
        Ok(true)
    }

    /// Sets the limits of the controller whose admin queue is `admin` (an emulated
    /// function's, for example).
    pub fn set_controller_limits(
        &mut self,
        admin: QueueId,
        limits: QosLimits,
    ) -> Result<(), TargetError> {
        let qi = self.queue_index(admin).ok_or(TargetError::UnknownQueue)?;
        let ci = self.ctrl_of(qi).ok_or(TargetError::UnknownQueue)?;
        let now = self.now.as_nanos();
        let id = self.ctrls[ci]
            .as_ref()
            .map(|c| c.limiter)
            .ok_or(TargetError::UnknownQueue)?;
        self.sched
            .set_limits(id, limits, now)
            .map_err(|_| TargetError::UnknownQueue)
    }

    /// The capped domains its namespaces share by key (slices of one drive namespace, or a
    /// whole one), with what the firmware publishes of each for other targets (other cores)
    /// reaching the same backend: they have the same key, and each takes its part of the cap
    /// ([`keel_qos::cap_share`], [`Target::set_domain_share`]). Uncapped domains are left
    /// out: their sharing across targets rests on the backend's own arbitration. Nothing
    /// allocates.
    pub fn capped_domains(&self) -> impl Iterator<Item = CappedDomain> + '_ {
        self.shared_domains.iter().filter_map(|&(key, domain, _)| {
            let cap = self.sched.max_inflight(domain).filter(|&c| c > 0)?;
            Some(CappedDomain {
                key,
                domain,
                cap,
                load: Share {
                    demand: self.split_demand(domain),
                    want: self.sched.domain_want(domain),
                    inflight: self.sched.inflight(domain),
                },
            })
        })
    }

    /// A domain's demand for its split across cores, in 1/[`DEMAND_UNIT`] of a weight: each
    /// busy flow's weight times its controller's I/O queues served here out of all of them
    /// (the controller's Number of Queues). A host whose connections landed on several cores
    /// has one controller, hence a flow per core on each namespace (its replicas'): each core
    /// counts the part of the flow its queues carry, so the host's connections get the same
    /// service whichever core they landed on, as they do on one core (one flow, served in
    /// arrival order). A controller all of whose queues are here counts its whole weight; one
    /// split across cores whose host connected fewer I/O queues than its Number of Queues
    /// counts less than its weight in all; a busy flow counts at least 1. Walks the
    /// controllers (once a pass, not per command).
    pub fn split_demand(&self, domain: DomainId) -> u32 {
        let mut demand = 0u32;
        for c in self.ctrls.iter().flatten() {
            let (mut here, mut away) = (0u64, false);
            for q in c.io_qs.iter().flatten() {
                match self.queue_index(*q) {
                    Some(qi) if self.queues[qi].elsewhere => away = true,
                    Some(_) => here += 1,
                    None => {}
                }
            }
            // Split across cores: its queues here out of its Number of Queues (the same
            // figure on every core); otherwise all of it is here.
            let (here, all) = if c.replica || away {
                (here, u64::from(c.nr_io_queues).max(here).max(1))
            } else {
                (1, 1)
            };
            for f in c.flows.iter().flatten() {
                if self.sched.domain_of(*f) != Some(domain) {
                    continue;
                }
                let w = u64::from(self.sched.flow_demand(*f));
                if w > 0 {
                    let part = (w * u64::from(DEMAND_UNIT) * here / all).max(1);
                    demand = demand.saturating_add(part as u32);
                }
            }
        }
        demand
    }

    /// Sets this target's part of a shared domain's cap (0: the whole configured cap), live:
    /// [`keel_qos::Scheduler::set_share`]. Commands waiting for room start at the next poll
    /// if the part grew.
    pub fn set_domain_share(&mut self, domain: DomainId, share: u32) {
        let _ = self.sched.set_share(domain, share);
    }

    /// The cap in force on a domain here (its configured cap lowered to this target's
    /// share; 0: no cap).
    pub fn domain_cap_in_force(&self, domain: DomainId) -> u32 {
        self.sched.cap_in_force(domain).unwrap_or(0)
    }

    /// When the poll loop should look again for commands held back only by their limits
    /// (`None`: none is).
    pub fn next_wakeup(&mut self, now: Instant) -> Option<Instant> {
        self.sched
            .next_wakeup(now.as_nanos())
            .map(Instant::from_nanos)
    }

    /// The counters of a limiter: (admitted commands, admitted bytes, nanoseconds throttled).
    pub(crate) fn limiter_counters(&self, id: LimiterId) -> (u64, u64, u64) {
        self.sched.limiter_stats(id).map_or((0, 0, 0), |l| {
            (l.admitted_ops, l.admitted_bytes, l.throttled_ns)
        })
    }

    /// The sum of the flows' counters toward namespace `ni` of subsystem `si`.
    pub(crate) fn namespace_flow_stats(&self, si: usize, ni: usize) -> FlowStats {
        let mut t = FlowStats::default();
        for c in self.ctrls.iter().flatten().filter(|c| c.subsys == si) {
            if let Some(Some(f)) = c.flows.get(ni)
                && let Some(s) = self.sched.flow_stats(*f)
            {
                t.queued += s.queued;
                t.dispatched += s.dispatched;
                t.bytes += s.bytes;
                t.throttled_ns += s.throttled_ns;
            }
        }
        t
    }
}
