//! What the management session asks of the device ([`keel_mgmt::Device`]), implemented by
//! the services: status snapshots, configuration pushes, reboot, the management key and
//! challenges (drawn by [`crate::challenge`]).

use crate::config::NsSpec;
use crate::hw::{DriveCtl, Hw};
use crate::klog;
use crate::plan::{NsKey, NsPlan, Plan, Source, SubsystemPlan};
use crate::replica::{Outcome, ReplicaOp};
use crate::services::{
    ReplicaNs, ReplicaSource, Services, build_namespace, shared_ram_namespace, start_function,
};
use alloc::{format, string::String, string::ToString, vec, vec::Vec};
use keel_controller::SubsystemConfig;
use keel_controller::{QosCounters, Target};
use keel_mgmt::{
    ControllerInfo, ControllerQosInfo, DriveInfo, DriveQueueInfo, FunctionBackend, FunctionInfo,
    FunctionSlotInfo, FunctionSpec, GroupInfo, Latency, NamespaceInfo, NamespaceQosInfo,
    NsCounters, PushReport, QosDomainInfo, QosInfo, QosLimit, RemoteQueueInfo, Resources,
    SlotState, Snapshot, SubsystemInfo,
};
use keel_nvme_pcie::FunctionState;
use keel_storage::LatencyHistogram;

/// Shared RAM regions made for namespaces: subsystem, NSID, region, NGUID.
type Regions = Vec<(String, u32, crate::sharedram::Region, [u8; 16])>;

/// Core 0's histogram with the other cores' samples added.
fn merged(own: &LatencyHistogram, elsewhere: &LatencyHistogram) -> LatencyHistogram {
    let mut h = own.clone();
    h.add(elsewhere);
    h
}

fn latency(h: &LatencyHistogram) -> Latency {
    // The histogram keeps no exact sum: estimate it from the buckets (each sample counted at
    // 1.5 × its bucket's lower bound, i.e. within ±50 %), capped at the largest sample.
    let sum = h
        .buckets()
        .iter()
        .enumerate()
        .map(|(i, &n)| n.saturating_mul((1u64 << i).saturating_add((1u64 << i) >> 1)))
        .fold(0u64, u64::saturating_add);
    Latency {
        count: h.count(),
        sum_ns: sum.min(h.max().saturating_mul(h.count())),
        p50_ns: h.p50(),
        p99_ns: h.p99(),
        p999_ns: h.p999(),
        max_ns: h.max(),
    }
}

/// Each tenant's rate over the last whole second, measured by the poll loop once a second
/// from the admitted counters (a snapshot reads them; nothing per I/O).
#[derive(Debug, Default)]
pub(crate) struct QosRates {
    next_ns: u64,
    last_ns: u64,
    /// Tenant key, admitted commands and bytes at the last sample, commands/s and bytes/s.
    seen: Vec<(String, u64, u64, u64, u64)>,
}

/// The scheduling domains of the target's namespaces, in the order their first namespace
/// comes: the namespaces sharing each, its cap, what is at its backend (every core's, for a
/// capped domain split across the cores) and what waits.
fn qos_domains<H: Hw>(t: &Target) -> Vec<QosDomainInfo> {
    let elsewhere = |domain: keel_qos::DomainId| {
        t.capped_domains()
            .find(|c| c.domain == domain)
            .map_or(0, |c| H::domain_inflight_elsewhere(c.key))
    };
    let mut out: Vec<(u16, QosDomainInfo)> = Vec::new();
    for n in t.namespace_views() {
        let name = format!("{}/{}", n.subsystem, n.nsid);
        match out.iter_mut().find(|(d, _)| *d == n.domain) {
            Some((_, d)) => {
                d.namespaces.push(name);
                d.queued += n.qos.queued;
            }
            None => out.push((
                n.domain,
                QosDomainInfo {
                    namespaces: vec![name],
                    max_inflight: n.domain_max_inflight,
                    inflight: n
                        .domain_inflight
                        .saturating_add(elsewhere(keel_qos::DomainId(n.domain))),
                    queued: n.qos.queued,
                },
            )),
        }
    }
    out.into_iter().map(|(_, d)| d).collect()
}

/// The keys [`QosRates`] knows tenants by.
fn ns_key(subsystem: &str, nsid: u32) -> String {
    format!("ns {subsystem}/{nsid}")
}
fn ctrl_key(cntlid: u16) -> String {
    format!("ctrl {cntlid}")
}
fn group_key(name: &str) -> String {
    format!("group {name}")
}

/// A namespace's, group's or controller's QoS counters with what the other cores admitted
/// through their part of its limits (`crate::shares`; limit key `key`). The limits shown are the
/// configured ones, not core 0's part.
fn every_core<H: Hw>(key: u32, mut q: QosCounters) -> QosCounters {
    let e = H::limit_elsewhere(key);
    q.admitted_ops += e.admitted_ops;
    q.admitted_bytes += e.admitted_bytes;
    q.throttled_ns += e.throttled_ns;
    q
}

impl QosRates {
    /// Takes a sample when a second has passed since the last one.
    pub(crate) fn tick<H: Hw>(&mut self, now_ns: u64, target: &Target) {
        if now_ns < self.next_ns {
            return;
        }
        let dt = now_ns.saturating_sub(self.last_ns).max(1);
        let counters = target
            .namespace_views()
            .map(|n| {
                let k = keel_controller::limit_key(n.subsystem, n.nsid);
                (ns_key(n.subsystem, n.nsid), every_core::<H>(k, n.qos))
            })
            .chain(target.controller_views().map(|c| {
                let k = keel_controller::controller_key(c.subsystem, c.cntlid);
                (ctrl_key(c.cntlid), every_core::<H>(k, c.qos))
            }))
            .chain(target.group_views().map(|g| {
                let k = keel_controller::group_key(g.name);
                (group_key(g.name), every_core::<H>(k, g.qos))
            }));
        let first = self.last_ns == 0;
        let seen = counters
            .map(|(k, q)| {
                let per_sec = |now: u64, then: u64| {
                    (u128::from(now.saturating_sub(then)) * 1_000_000_000 / u128::from(dt)) as u64
                };
                let (ops, bytes) = match self.seen.iter().find(|e| e.0 == k) {
                    Some(e) if !first => {
                        (per_sec(q.admitted_ops, e.1), per_sec(q.admitted_bytes, e.2))
                    }
                    _ => (0, 0),
                };
                (k, q.admitted_ops, q.admitted_bytes, ops, bytes)
            })
            .collect();
        self.seen = seen;
        self.last_ns = now_ns;
        self.next_ns = now_ns.saturating_add(1_000_000_000);
    }

    /// The QoS report of a tenant.
    fn info(&self, key: &str, q: &QosCounters) -> QosInfo {
        let (ops_per_sec, bytes_per_sec) = self
            .seen
            .iter()
            .find(|e| e.0 == key)
            .map_or((0, 0), |e| (e.3, e.4));
        QosInfo {
            limits: limit_list(&q.limits),
            admitted_ops: q.admitted_ops,
            admitted_bytes: q.admitted_bytes,
            ops_per_sec,
            bytes_per_sec,
            throttled_ns: q.throttled_ns,
            queued: q.queued,
        }
    }
}

impl<H: Hw> Services<H> {
    fn exports_of(&self, nqn: &str) -> Vec<String> {
        let mut e = Vec::new();
        if self.nvmf.is_some() {
            e.push(String::from("tcp"));
        }
        for f in self
            .functions
            .iter()
            .filter(|f| f.slot == SlotState::Live && f.nqn == nqn)
        {
            e.push(format!("pcie-fn{}", f.index));
        }
        e
    }

    fn find_plan_ns(&self, nqn: &str, nsid: u32) -> Option<&NsPlan> {
        self.plan
            .namespaces
            .iter()
            .find(|n| n.subsystem == nqn && n.nsid == nsid)
    }

    /// Gives every served namespace, host and emulated function the limits of the plan in
    /// force (its groups are set already); what the core refuses is reported in `problems`.
    fn apply_qos(&mut self, problems: &mut Vec<String>) {
        for ns in &self.plan.namespaces {
            if !self.target.has_namespace(&ns.subsystem, ns.nsid) {
                continue;
            }
            if let Err(e) =
                self.target
                    .set_namespace_qos(&ns.subsystem, ns.nsid, self.plan.namespace_qos(ns))
            {
                problems.push(format!(
                    "namespace {} of {}: QoS not applied ({e:?})",
                    ns.nsid, ns.subsystem
                ));
            }
        }
        self.target.set_host_qos(self.plan.host_qos());
        for e in &mut self.functions {
            let admin = e.live().and_then(|f| f.admin_queue());
            if let Some(a) = admin {
                let _ = self
                    .target
                    .set_controller_limits(a, self.plan.function_limits(e.index));
            }
            e.limited = admin;
        }
        klog::info!(
            "qos: applied live: {} namespace rule(s), {} group(s), {} host rule(s), {} function rule(s)",
            self.plan.qos.namespaces.len(),
            self.plan.qos.groups.len(),
            self.plan.qos.hosts.len(),
            self.plan.qos.functions.len()
        );
    }

    /// Applies a verified push; on error nothing has changed.
    fn try_push(&mut self, bundle: &[u8]) -> Result<PushReport, String> {
        if self.replication.pending() {
            return Err(String::from(
                "the namespace changes of the previous push are still being applied on every \
                 core: push again in a moment",
            ));
        }
        let floor = self.plan.generation;
        let cfg = self
            .identity
            .open(bundle, floor)
            .map_err(|e| e.to_string())?;
        let new = Plan::from_bundle(&cfg, Source::Push, self.plan.mac, self.identity.pubkey);
        let d = keel_provision::diff(&self.plan.to_device(), &cfg.device);
        let mut needs_reboot = d.needs_reboot.clone();
        for &i in &d.kept {
            let n = &new.namespaces[i];
            if let Some(o) = self.find_plan_ns(&n.subsystem, n.nsid)
                && !o.same_backend(n)
            {
                needs_reboot.push(format!(
                    "namespace {} of {}: data key changed: from the next boot its present \
                     data reads back as noise (build with --keep-keys-from to keep the key)",
                    n.nsid, n.subsystem
                ));
            }
            if let Some(o) = self.find_plan_ns(&n.subsystem, n.nsid)
                && n.nguid.is_some_and(|g| g != self.plan.nguid_of(o))
            {
                needs_reboot.push(format!(
                    "namespace {} of {}: another NGUID from the next boot (hosts see a new \
                     namespace; build with --keep-keys-from to keep it)",
                    n.nsid, n.subsystem
                ));
            }
        }

        // Emulated functions, slot by slot; a change that cannot be made refuses the push.
        let fx = self.function_changes(&new)?;
        needs_reboot.extend(fx.notes.iter().cloned());

        // Removals and additions that can be applied, checked before anything changes.
        let removals: Vec<(String, u32)> = d
            .removed
            .iter()
            .filter(|(nqn, nsid)| self.target.has_namespace(nqn, *nsid))
            .cloned()
            .collect();
        let mut additions = Vec::new();
        for &i in &d.added {
            let n = &new.namespaces[i];
            if !self.target.subsystem_views().any(|s| s.nqn == n.subsystem) {
                needs_reboot.push(format!(
                    "namespace {} of {}: its subsystem is not running yet",
                    n.nsid, n.subsystem
                ));
                continue;
            }
            let removed_first = removals
                .iter()
                .any(|(q, id)| *q == n.subsystem && *id == n.nsid);
            if self.target.has_namespace(&n.subsystem, n.nsid) && !removed_first {
                needs_reboot.push(format!(
                    "namespace {} of {}: the NSID is still in use",
                    n.nsid, n.subsystem
                ));
                continue;
            }
            additions.push(n.clone());
        }

        // Backends (a drive namespace shared with a running slice, a RAM disk...). One that
        // cannot be built now is reported, not fatal: the bundle is valid.
        // A namespace the other cores' replicas can follow is made as at boot for them (a RAM
        // namespace in a shared region) and staged below (`crate::replica`).
        let mut built = Vec::new();
        let mut remote = Vec::new();
        for n in additions {
            if matches!(n.spec, NsSpec::Remote { .. }) {
                // Opened by the remote service: added to the target once identified.
                remote.push(n);
                continue;
            }
            let many = matches!(n.spec, NsSpec::Drive { slice: Some(_), .. });
            let follow = self.replicates(&n);
            let made = match n.spec {
                NsSpec::Ram(bytes) if follow => {
                    let mut regions = Vec::new();
                    shared_ram_namespace::<H>(&new, &n, bytes, &mut regions).and_then(|c| {
                        let region = regions.pop()?.2;
                        Some((c, Some(ReplicaSource::Ram(region))))
                    })
                }
                NsSpec::Drive { drive, nsid, slice } => {
                    build_namespace(&new, &n, many, &mut self.drives, &mut self.shared).map(|c| {
                        let source = follow.then_some(ReplicaSource::Drive { drive, nsid, slice });
                        (c, source)
                    })
                }
                _ => build_namespace(&new, &n, many, &mut self.drives, &mut self.shared)
                    .map(|c| (c, None)),
            };
            match made {
                Some((c, source)) => {
                    let follow = source.map(|source| ReplicaNs {
                        nsid: n.nsid,
                        nguid: c.nguid,
                        qos: new.namespace_qos(&n),
                        source,
                        key: n.key.clone(),
                    });
                    built.push((n, c, follow));
                }
                None => needs_reboot.push(format!(
                    "namespace {} of {}: not served, its backend could not be opened (see the \
                     device console)",
                    n.nsid, n.subsystem
                )),
            }
        }

        // Persist first: the copy that is not in force is overwritten.
        let persisted = match self.identity.persist(bundle) {
            Ok((copy, seq)) => {
                klog::info!(
                    "config: generation {} written to flash copy {} (sequence {})",
                    cfg.generation,
                    copy.name(),
                    seq
                );
                true
            }
            Err(e) => {
                klog::warning!(
                    "config: generation {} not persisted ({}): it lasts until the next boot",
                    cfg.generation,
                    e
                );
                false
            }
        };

        // QoS changes live. Groups first: namespaces added below may name new ones.
        let qos_changed = self.plan.qos != new.qos;
        if qos_changed {
            self.target.set_qos_groups(new.qos_groups());
        }
        // Functions the description no longer has go first (a hot unplug each), with their
        // subsystems when those went too.
        let mut removed = Vec::new();
        for &(slot, drop_subsystem) in &fx.remove {
            match self.remove_function_now(slot, drop_subsystem) {
                Ok(info) if drop_subsystem => {
                    removed.extend(info.nsids.iter().map(|&id| (info.subsystem.clone(), id)))
                }
                Ok(_) => {}
                Err(e) => needs_reboot.push(format!("function {slot}: not removed: {e}")),
            }
        }
        // Namespaces of subsystems the other cores serve are staged: every core first, then
        // core 0 (`Services::finish_replicated`); the others change core 0 alone and stop
        // the adoption of their subsystem (`Replication::note_only`).
        for (nqn, nsid) in removals {
            // A remote namespace the other cores serve through their lanes too.
            let laned = self.replicable.iter().any(|s| {
                s.nqn == nqn
                    && s.namespaces
                        .iter()
                        .any(|n| n.nsid == nsid && matches!(n.source, ReplicaSource::Remote { .. }))
            });
            let follow = self.replication.follows(&nqn)
                && !self.function_subsystem(&nqn)
                && self.find_plan_ns(&nqn, nsid).is_some_and(|o| match o.spec {
                    NsSpec::Ram(_) | NsSpec::Drive { .. } => true,
                    NsSpec::Remote { .. } => laned,
                });
            let before = self.target.namespace_generation();
            if follow {
                klog::info!(
                    "nvmf: namespace {} of {} removed on every core, then on core 0",
                    nsid,
                    nqn
                );
                self.replication.stage(&nqn, ReplicaOp::Remove(nsid), None);
            } else if self.target.remove_namespace(&nqn, nsid).is_ok() {
                klog::info!("nvmf: namespace {} of {} removed", nsid, nqn);
                self.forget_replica_ns(&nqn, nsid);
                self.remotes.removed(&nqn, nsid);
                let after = self.target.namespace_generation();
                self.replication.note_only(&nqn, before, after);
            } else {
                continue;
            }
            self.plan
                .namespaces
                .retain(|n| !(n.subsystem == nqn && n.nsid == nsid));
            self.served.retain(|(q, id)| !(*q == nqn && *id == nsid));
            removed.push((nqn, nsid));
        }
        let mut added = Vec::new();
        let new_groups = new.qos_groups();
        for (n, c, follow) in built {
            let before = self.target.namespace_generation();
            let done = match follow {
                Some(r) => {
                    klog::info!(
                        "nvmf: namespace {} of {} added on every core, then on core 0",
                        n.nsid,
                        n.subsystem
                    );
                    // Its group's definition goes with it (core 0 has the pushed groups
                    // already, above).
                    let group = r
                        .qos
                        .group
                        .as_ref()
                        .and_then(|g| new_groups.iter().find(|x| x.name == *g).cloned());
                    self.describe_staged_add(&n.subsystem, &r, group.as_ref());
                    self.replication.stage(
                        &n.subsystem,
                        ReplicaOp::Add {
                            ns: alloc::boxed::Box::new(r),
                            group,
                        },
                        Some(c),
                    );
                    Ok(())
                }
                None => self.target.add_namespace(&n.subsystem, c),
            };
            let after = self.target.namespace_generation();
            self.replication.note_only(&n.subsystem, before, after);
            match done {
                Ok(()) => {
                    added.push((n.subsystem.clone(), n.nsid));
                    self.served.push((n.subsystem.clone(), n.nsid));
                    self.plan.namespaces.push(n);
                }
                Err(e) => needs_reboot.push(format!(
                    "namespace {} of {}: not added ({e:?})",
                    n.nsid, n.subsystem
                )),
            }
        }
        // Remote volumes new in this push, when other cores serve NVMe/TCP: each core gets a
        // lane of its own (`crate::percore`), as for the boot configuration's volumes.
        let fresh: Vec<keel_provision::Remote> = remote
            .iter()
            .filter_map(|n| match &n.spec {
                NsSpec::Remote { remote: r, .. } if !self.remotes.has_target(r) => {
                    Some((**r).clone())
                }
                _ => None,
            })
            .collect();
        for n in remote {
            let shared = new.namespaces.iter().any(|o| {
                (o.subsystem != n.subsystem || o.nsid != n.nsid)
                    && matches!((&o.spec, &n.spec), (NsSpec::Remote { remote: a, .. }, NsSpec::Remote { remote: b, .. }) if a.same_target(b))
            });
            // Added once its remote namespace is identified (connected hosts then get the
            // Namespace Attribute Changed event).
            if self.remotes.add(&new, &n, shared) {
                // A volume new in the push gets lanes; one whose lanes run already gets
                // this namespace in them too (a further slice of it: every core adds it to
                // its replica first, `percore::RemoteMsg::Users`).
                if let NsSpec::Remote { remote: r, slice } = &n.spec
                    && self.replication.cores != 0
                    && self.replication.lanes != 0
                    && if fresh.iter().any(|f| f.same_target(r)) {
                        self.remotes.lane_new(r, self.replication.lanes)
                    } else {
                        self.replicable_kind(&n)
                            && self.replicable.iter().any(|s| s.nqn == n.subsystem)
                            && self.remotes.lane_more(r)
                    }
                    && self.replicable_kind(&n)
                    && let Some(s) = self.replicable.iter_mut().find(|s| s.nqn == n.subsystem)
                {
                    // Described for the lanes; served on core 0 once every core has it.
                    klog::info!(
                        "remote: namespace {} of {}: served on every core through lanes",
                        n.nsid,
                        n.subsystem
                    );
                    s.namespaces.push(ReplicaNs {
                        nsid: n.nsid,
                        nguid: new.nguid_of(&n),
                        qos: new.namespace_qos(&n),
                        source: ReplicaSource::Remote {
                            remote: r.clone(),
                            slice: *slice,
                        },
                        key: n.key.clone(),
                    });
                    self.remotes.lane_user(r, &n.subsystem, n.nsid);
                }
                added.push((n.subsystem.clone(), n.nsid));
                self.plan.namespaces.push(n);
            } else {
                needs_reboot.push(format!(
                    "namespace {} of {}: not served, its remote volume could not be made (see \
                     the device console)",
                    n.nsid, n.subsystem
                ));
            }
        }
        // New functions (a hot plug each): their subsystems made with their namespaces
        // unless they run already. One whose new subsystem qualifies (RAM or a drive every
        // core has a pair on; QoS limits of the function, its namespaces or their groups
        // go with it and are split across the cores) spreads its I/O queues over the cores
        // as one created live does (`crate::fnq`): its RAM is made in shared regions, and
        // the hub hears of it once the pushed QoS is in force (below), so that its
        // controller has the pushed limits before any pair leaves core 0.
        let mut spread_pushed: Vec<(u16, String, Regions)> = Vec::new();
        // Functions attached to a subsystem that runs already (another function's, or one
        // NVMe/TCP serves): spread with it when the other cores' functions' replicas can
        // serve it (`Services::attached_replica`), once the pushed QoS is in force.
        let mut attached: Vec<(u16, String)> = Vec::new();
        for (slot, nqn) in &fx.create {
            let Some(sub) = new.subsystems.iter().find(|x| x.nqn == *nqn).cloned() else {
                continue;
            };
            let namespaces: Vec<NsPlan> = new
                .namespaces
                .iter()
                .filter(|n| n.subsystem == *nqn)
                .cloned()
                .collect();
            let ids: Vec<u32> = namespaces.iter().map(|n| n.nsid).collect();
            let fresh = !self.target.subsystem_views().any(|x| x.nqn == *nqn);
            // A subsystem that runs already (another function's, or one NVMe/TCP serves) is
            // not made again: the function is attached to it (`attached` below).
            let spread = fresh && self.spreads(&namespaces);
            let mut regions = Regions::new();
            let r = self.start_function_now(
                *slot,
                sub,
                namespaces,
                Some(&new),
                "pushed",
                spread.then_some(&mut regions),
            );
            match r {
                Ok(()) if fresh => {
                    added.extend(ids.into_iter().map(|id| (nqn.clone(), id)));
                    if spread {
                        spread_pushed.push((*slot, nqn.clone(), regions));
                    }
                }
                Ok(()) => attached.push((*slot, nqn.clone())),
                Err(e) => needs_reboot.push(format!(
                    "function {slot} (subsystem {nqn}): not created now ({e}): it is at the next boot"
                )),
            }
        }
        for e in &mut self.functions {
            if fx.adopt.contains(&e.index) {
                e.origin = "pushed";
            }
        }
        for &i in &d.kept {
            let n = &new.namespaces[i];
            if let Some(p) = self
                .plan
                .namespaces
                .iter_mut()
                .find(|p| p.subsystem == n.subsystem && p.nsid == n.nsid)
            {
                p.function = n.function;
            }
        }
        if qos_changed || !fx.create.is_empty() {
            // Functions created by a management request keep their limits unless the bundle
            // gives their slot limits of its own.
            let created: Vec<keel_provision::FunctionQos> = self
                .plan
                .qos
                .functions
                .iter()
                .filter(|f| {
                    self.functions.iter().any(|e| {
                        e.index == f.function && e.slot == SlotState::Live && e.origin == "created"
                    }) && !new.qos.functions.iter().any(|n| n.function == f.function)
                })
                .cloned()
                .collect();
            let hosts_changed = self.plan.host_qos() != new.host_qos();
            // The limits in force on the functions that ran before the push (their
            // replicas' controllers have them, `keel_controller::Adoption::limits`).
            let fn_before: Vec<(u16, keel_controller::QosLimits)> = self
                .functions
                .iter()
                .filter(|e| e.slot == SlotState::Live && !fx.create.iter().any(|c| c.0 == e.index))
                .map(|e| (e.index, self.plan.function_limits(e.index)))
                .collect();
            // Each namespace's QoS (and its group's definition) before the push: what the
            // other cores' replicas of a subsystem core 0 does not describe (a function's
            // created live) were made with.
            let groups_before = self.plan.qos_groups();
            let ns_before: Vec<NsQosBefore> = self
                .plan
                .namespaces
                .iter()
                .map(|n| {
                    let q = self.plan.namespace_qos(n);
                    let g = q
                        .group
                        .as_ref()
                        .and_then(|g| groups_before.iter().find(|x| x.name == *g).cloned());
                    (n.subsystem.clone(), n.nsid, q, g)
                })
                .collect();
            self.plan.qos = new.qos.clone();
            self.plan.qos.functions.extend(created);
            self.apply_qos(&mut needs_reboot);
            self.drop_limited(hosts_changed, &fn_before, &ns_before);
        }
        // The pushed functions that spread, now that the plan's QoS is the pushed one (their
        // replicas' drive shares are its): announced to the functions' hub after the
        // `FnEvent::Changed` their creation logged (`start_function_now`), as for a function
        // created live.
        for (slot, nqn, regions) in spread_pushed {
            if let Some(r) = self.created_replica(&nqn, regions) {
                self.replication
                    .fn_events
                    .push(crate::replica::FnEvent::Created {
                        slot,
                        subsystem: alloc::boxed::Box::new(r),
                    });
            }
        }
        for (slot, nqn) in attached {
            let ev = match self.attached_replica(&nqn) {
                Some(r) => crate::replica::FnEvent::Created {
                    slot,
                    subsystem: alloc::boxed::Box::new(r),
                },
                None if self.spreads(&self.plan_namespaces_of(&nqn)) => {
                    crate::replica::FnEvent::Attached { slot, nqn }
                }
                None => continue,
            };
            self.replication.fn_events.push(ev);
        }
        self.plan.generation = cfg.generation;
        self.plan.source = Source::Push;
        self.plan.device = Some(cfg.device);
        // Functions created by management requests that the description leaves out run on:
        // the description kept for the next push says so.
        self.refresh_device();
        Ok(PushReport {
            generation: self.plan.generation,
            added,
            removed,
            needs_reboot,
            persisted,
        })
    }
}

impl<H: Hw> Services<H> {
    /// Whether subsystem `nqn` has an emulated function (its replicas on other cores,
    /// `crate::fnq`, do not follow namespace changes).
    fn function_subsystem(&self, nqn: &str) -> bool {
        self.functions.iter().any(|e| e.nqn == nqn)
            || self
                .plan
                .namespaces
                .iter()
                .any(|n| n.subsystem == nqn && n.function.is_some())
    }

    /// Whether namespace `n` of a pushed plan can be added on every core first
    /// (`crate::replica`): its subsystem is one the other cores serve, has no emulated
    /// function, and `n` is a RAM namespace (in a shared region) or a namespace of a drive
    /// every core has a queue pair on; its QoS limits and its group go with it.
    fn replicates(&self, n: &NsPlan) -> bool {
        self.replicable_kind(n)
            && match n.spec {
                NsSpec::Ram(_) => self.replication.ram_shared,
                NsSpec::Drive { drive, .. } => self.replication.drives.contains(&drive),
                NsSpec::Remote { .. } => false,
            }
    }

    /// What [`Services::replicates`] asks of any namespace: its subsystem is one the other
    /// cores serve and has no emulated function. Its own limits go with it to every core,
    /// which split them (`crate::shares::LimitSharing`); so does its group's definition
    /// (`ReplicaOp::Add`'s `group`: a replica lacking the group adds it, under the same
    /// key, `keel_controller::group_key`, so its limits are split too), and its hosts'
    /// controller limits come with each adopted queue (`keel_controller::Adoption::limits`).
    fn replicable_kind(&self, n: &NsPlan) -> bool {
        self.replication.follows(&n.subsystem) && !self.function_subsystem(&n.subsystem)
    }

    /// Describes namespace `r` of `nqn`, staged to be added on every core
    /// (`ReplicaOp::Add`), in what other cores serve (`Services::replicable`), with
    /// `group`, the definition of the group it is in, in `nqn`'s groups when they lack it.
    /// Described at once, not when every core acked: a QoS change staged after it in the
    /// same push (`stage_qos`: its `ReplicaOp::Qos` sets the replicas' groups to the
    /// described ones) keeps the namespace's group, and so do later adoptions. A group
    /// described already keeps its definition there: if the push changed it,
    /// `replica_qos_differs` sees it and the change follows as a `ReplicaOp::Qos`. Undone by
    /// [`Services::forget_replica_ns`] if core 0 cannot add it.
    fn describe_staged_add(
        &mut self,
        nqn: &str,
        r: &ReplicaNs,
        group: Option<&keel_controller::QosGroup>,
    ) {
        if let Some(s) = self.replicable.iter_mut().find(|s| s.nqn == nqn) {
            s.namespaces.push(r.clone());
            if let Some(g) = group
                && !s.groups.iter().any(|x| x.name == g.name)
            {
                s.groups.push(g.clone());
            }
        }
    }

    /// Drops namespace `nsid` of `nqn` from the description of what other cores serve (it
    /// holds the namespace's shared RAM region, if any: the memory goes once core 0's
    /// target and every replica dropped theirs too, `crate::sharedram`). Only the first with
    /// that NSID goes: a namespace removed and added again under the same NSID in one push is
    /// described twice until the removal is done (the added one,
    /// [`Services::describe_staged_add`], after the removed one). Its group stays described
    /// (the replicas keep its limiter).
    fn forget_replica_ns(&mut self, nqn: &str, nsid: u32) {
        if let Some(s) = self.replicable.iter_mut().find(|s| s.nqn == nqn)
            && let Some(i) = s.namespaces.iter().position(|n| n.nsid == nsid)
        {
            s.namespaces.remove(i);
        }
    }

    /// Forgets the description of dropped subsystem `nqn` (no other core adopts its queues
    /// any more, `Replication::drop_subsystem`): with the replicas' retirement
    /// (`ReplicaOp::Retire`), its shared RAM goes once core 0 no longer serves it either.
    pub(crate) fn forget_dropped(&mut self, nqn: &str) {
        self.replicable.retain(|s| s.nqn != nqn);
    }

    /// Whether the QoS the plan in force gives subsystem `s`'s namespaces (or their groups)
    /// differs from its description's (what the other cores' replicas have).
    fn replica_qos_differs(&self, s: &crate::services::ReplicaSubsystem) -> bool {
        let groups = self.plan.qos_groups();
        self.plan
            .namespaces
            .iter()
            .filter(|n| n.subsystem == s.nqn)
            .any(|n| {
                let q = self.plan.namespace_qos(n);
                let now = s.namespaces.iter().find(|r| r.nsid == n.nsid);
                now.is_some_and(|r| r.qos != q)
                    || now.is_none() && (q.limits.any() || q.group.is_some())
                    || q.group.as_ref().is_some_and(|g| {
                        groups.iter().find(|x| x.name == *g)
                            != s.groups.iter().find(|x| x.name == *g)
                    })
            })
    }

    /// Keeps the description of subsystem `nqn` (what other cores' replicas were made with,
    /// `Services::replicable`) in step with the QoS the plan in force gives its namespaces
    /// and groups (later adds and adoptions use it); the namespaces' QoS.
    fn follow_qos(&mut self, nqn: &str) -> Vec<(u32, keel_controller::NamespaceQos)> {
        let plan_groups = self.plan.qos_groups();
        let namespaces: Vec<(u32, keel_controller::NamespaceQos)> = self
            .plan
            .namespaces
            .iter()
            .filter(|n| n.subsystem == nqn)
            .map(|n| (n.nsid, self.plan.namespace_qos(n)))
            .collect();
        if let Some(s) = self.replicable.iter_mut().find(|s| s.nqn == nqn) {
            for r in &mut s.namespaces {
                if let Some((_, q)) = namespaces.iter().find(|(id, _)| *id == r.nsid) {
                    r.qos = q.clone();
                }
            }
            s.groups = crate::services::groups_of(&plan_groups, &s.namespaces);
        }
        namespaces
    }

    /// Sends the QoS the plan in force gives subsystem `nqn` to every core serving it
    /// (`ReplicaOp::Qos`: its namespaces', its groups', and with `hosts_changed` the host
    /// rules, with `controllers` core 0's controllers' new limits), and keeps its description
    /// in step (later adds and adoptions use it). Core 0's own target has it already
    /// (`apply_qos`).
    fn stage_qos(&mut self, nqn: &str, hosts_changed: bool, controllers: bool) {
        let namespaces = self.follow_qos(nqn);
        // Every group of the replicas' subsystems (the replicas' own groups are those).
        let mut groups: Vec<keel_controller::QosGroup> = Vec::new();
        for g in self.replicable.iter().flat_map(|s| &s.groups) {
            if !groups.iter().any(|x| x.name == g.name) {
                groups.push(g.clone());
            }
        }
        let qos = crate::replica::ReplicaQos {
            namespaces,
            groups,
            hosts: hosts_changed.then(|| self.plan.host_qos()),
            controllers: if controllers {
                self.target.controller_limits(nqn)
            } else {
                Vec::new()
            },
        };
        klog::info!(
            "config: {}: QoS changed live: applied on every core serving it ({} namespace(s), {} controller(s))",
            nqn,
            qos.namespaces.len(),
            qos.controllers.len()
        );
        self.replication
            .stage(nqn, ReplicaOp::Qos(alloc::boxed::Box::new(qos)), None);
    }

    /// Hands the functions' hub the QoS the plan in force gives function subsystem `nqn`
    /// (`FnEvent::Qos`, for every core serving its functions' pairs: `crate::fnq::FnMsg::Qos`):
    /// its namespaces', the groups of every function subsystem's namespaces (a replica of the
    /// functions' subsystems has those: `crate::services::replica_target_shares`), the host
    /// rules with `hosts_changed`, and core 0's controllers of it with their new limits (its
    /// functions' controllers, which `apply_qos` gave theirs).
    fn fn_qos(&mut self, nqn: &str, hosts_changed: bool) {
        let namespaces = self.follow_qos(nqn);
        let fn_subsystem = |n: &NsPlan| {
            n.function.is_some()
                || self
                    .functions
                    .iter()
                    .any(|e| e.slot == SlotState::Live && e.nqn == n.subsystem)
        };
        let used: Vec<String> = self
            .plan
            .namespaces
            .iter()
            .filter(|n| fn_subsystem(n))
            .filter_map(|n| self.plan.namespace_qos(n).group)
            .collect();
        let groups = self
            .plan
            .qos_groups()
            .into_iter()
            .filter(|g| used.contains(&g.name))
            .collect();
        let qos = crate::replica::ReplicaQos {
            namespaces,
            groups,
            hosts: hosts_changed.then(|| self.plan.host_qos()),
            controllers: self.target.controller_limits(nqn),
        };
        klog::info!(
            "config: {}: QoS changed live: sent to every core serving its function's I/O queues ({} namespace(s), {} controller(s))",
            nqn,
            qos.namespaces.len(),
            qos.controllers.len()
        );
        self.replication
            .fn_events
            .push(crate::replica::FnEvent::Qos {
                nqn: String::from(nqn),
                qos: alloc::boxed::Box::new(qos),
            });
    }

    /// After a QoS change: subsystems every core serves (their NVMe/TCP replicas) get it
    /// on every core ([`Services::stage_qos`]) and stay spread; each core splits the new
    /// namespace, group and host (controller) limits by demand
    /// (`crate::shares::LimitSharing`). So do subsystems with an emulated function whose
    /// QoS changed: their functions' limits changed from those in force before the push
    /// (`fn_before`: the replicas' controllers have those their queues were adopted with),
    /// their namespaces' QoS or groups (or their groups' limits) changed from those the
    /// other cores' replicas were made with (`ns_before` for a subsystem core 0 does not
    /// describe), or the host rules changed (`hosts_changed`): the functions' hub sends the
    /// change with the functions' controllers' new limits to every core serving their pairs
    /// ([`Services::fn_qos`]), and the NVMe/TCP planes get it too when they serve the
    /// subsystem. A core that has no replica of the subsystem has none of its pairs (it
    /// refused them): nothing to apply there. Dropped (served through core 0 from now on,
    /// `Replication::drop_subsystem`): only a plane that cannot apply it
    /// ([`Services::finish_replicated`]).
    fn drop_limited(
        &mut self,
        hosts_changed: bool,
        fn_before: &[(u16, keel_controller::QosLimits)],
        ns_before: &[NsQosBefore],
    ) {
        let everywhere = hosts_changed;
        let none = keel_controller::QosLimits::NONE;
        let plan = &self.plan;
        let replicable = &self.replicable;
        let groups = plan.qos_groups();
        // Whether namespace `n`'s QoS (limits, weight, group, commands at the drive) and its
        // group's definition are those the replicas of its subsystem were made with.
        let as_replicas = |n: &NsPlan, q: &keel_controller::NamespaceQos| {
            let Some(s) = replicable.iter().find(|s| s.nqn == n.subsystem) else {
                // Not described (a function's created live): as before the push.
                return ns_before
                    .iter()
                    .find(|b| b.0 == n.subsystem && b.1 == n.nsid)
                    .map_or(q.limits == none && q.group.is_none(), |b| {
                        b.2 == *q
                            && b.3.as_ref()
                                == q.group
                                    .as_ref()
                                    .and_then(|g| groups.iter().find(|x| x.name == *g))
                    });
            };
            let Some(r) = s.namespaces.iter().find(|r| r.nsid == n.nsid) else {
                return q.limits == none && q.group.is_none();
            };
            r.qos == *q
                && q.group.as_ref().is_none_or(|g| {
                    groups.iter().find(|x| x.name == *g) == s.groups.iter().find(|x| x.name == *g)
                })
        };
        let changed = |nqn: &str| {
            everywhere
                || plan
                    .namespaces
                    .iter()
                    .filter(|n| n.subsystem == nqn)
                    .any(|n| {
                        let q = plan.namespace_qos(n);
                        !as_replicas(n, &q)
                            || n.function.is_some_and(|f| {
                                fn_before
                                    .iter()
                                    .any(|&(s, l)| s == f && l != plan.function_limits(f))
                            })
                    })
        };
        // Subsystems with an emulated function (at boot, created live or pushed) whose QoS
        // changed: described ones (`replicable`) and those of the functions running.
        let mut functions: Vec<String> = Vec::new();
        let candidates = self
            .replicable
            .iter()
            .map(|s| &s.nqn)
            .filter(|nqn| self.function_subsystem(nqn))
            .chain(
                self.functions
                    .iter()
                    .filter(|e| e.slot == SlotState::Live && !e.nqn.is_empty())
                    .map(|e| &e.nqn),
            );
        for nqn in candidates {
            if !functions.contains(nqn) && changed(nqn) {
                functions.push(nqn.clone());
            }
        }
        // Subsystems every core serves, without an emulated function: the change goes to
        // every core (`ReplicaOp::Qos`) and they stay spread; any whose QoS changed at all
        // (weights and commands at the drive too) gets it.
        let spread: Vec<String> = self
            .replicable
            .iter()
            .filter(|s| {
                self.replication.follows(&s.nqn)
                    && !self.function_subsystem(&s.nqn)
                    && (hosts_changed || self.replica_qos_differs(s))
            })
            .map(|s| s.nqn.clone())
            .collect();
        for nqn in &spread {
            self.stage_qos(nqn, hosts_changed, hosts_changed);
        }
        for nqn in &functions {
            // The planes too, when they serve it (its functions' controllers have no replica
            // there: their limits are for the functions' cores).
            if self.replication.follows(nqn) {
                self.stage_qos(nqn, hosts_changed, true);
            }
            if self.replication.functions {
                self.fn_qos(nqn, hosts_changed);
            } else {
                // No other core serves functions' pairs: the description follows.
                self.follow_qos(nqn);
            }
        }
    }

    /// Applies to core 0's target the staged namespace changes every core has applied
    /// (`crate::replica`), in order; one some core refused or did not ack in time is applied
    /// too, and its subsystem is no longer adopted. Returns whether anything was done.
    pub(crate) fn finish_replicated(&mut self, now_ns: u64) -> bool {
        let mut busy = false;
        while let Some((st, outcome)) = self.replication.take_done(now_ns) {
            busy = true;
            let nqn = st.change.subsystem;
            let before = self.target.namespace_generation();
            match st.change.op {
                ReplicaOp::Retire => {}
                ReplicaOp::Qos(_) => {
                    // Core 0 applied it at the push: one core that could not makes the
                    // subsystem come home.
                    if outcome != Outcome::Replicated {
                        klog::warning!(
                            "percore: a QoS change of {} was not applied by every core: its I/O queues adopted by other cores end, new ones are served through core 0",
                            nqn
                        );
                        self.replication.drop_subsystem(&nqn);
                    }
                    continue;
                }
                ReplicaOp::Remove(nsid) => {
                    self.forget_replica_ns(&nqn, nsid);
                    // A remote volume no namespace uses any more goes (and its lanes).
                    self.remotes.removed(&nqn, nsid);
                    if let Err(e) = self.target.remove_namespace(&nqn, nsid) {
                        klog::error!(
                            "nvmf: namespace {} of {}: not removed on core 0 ({})",
                            nsid,
                            nqn,
                            klog::Dbg(&e)
                        );
                    }
                }
                ReplicaOp::Add { ns, .. } => {
                    // Described already (`describe_staged_add`).
                    let added = match st.config {
                        Some(c) => self.target.add_namespace(&nqn, c),
                        None => Ok(()),
                    };
                    if let Err(e) = added {
                        klog::error!(
                            "nvmf: namespace {} of {}: not added on core 0 ({})",
                            ns.nsid,
                            nqn,
                            klog::Dbg(&e)
                        );
                        self.served.retain(|(q, id)| !(*q == nqn && *id == ns.nsid));
                        self.plan
                            .namespaces
                            .retain(|n| !(n.subsystem == nqn && n.nsid == ns.nsid));
                        self.forget_replica_ns(&nqn, ns.nsid);
                    }
                }
            }
            let after = self.target.namespace_generation();
            if outcome == Outcome::Replicated {
                self.replication.note(before, after);
            } else {
                klog::warning!(
                    "percore: a namespace change of {} was {}: applied on core 0 only; its I/O queues adopted by other cores end, new ones are served through core 0",
                    nqn,
                    if outcome == Outcome::TimedOut {
                        "not acknowledged by every core within 1 s"
                    } else {
                        "refused by a core"
                    }
                );
                self.replication.note_only(&nqn, before, after);
            }
        }
        busy
    }
}

/// A namespace's QoS before a push: (subsystem, NSID, its QoS, its group's definition).
type NsQosBefore = (
    String,
    u32,
    keel_controller::NamespaceQos,
    Option<keel_controller::QosGroup>,
);

/// What a pushed description changes in the emulated functions ([`Services::function_changes`]).
#[derive(Debug, Default)]
struct FunctionChanges {
    /// Slots whose function goes, and whether its subsystem goes too.
    remove: Vec<(u16, bool)>,
    /// Free slots that get a function of a subsystem.
    create: Vec<(u16, String)>,
    /// Slots whose function, created by a management request, the description now has.
    adopt: Vec<u16>,
    /// For the operator.
    notes: Vec<String>,
}

impl<H: Hw> Services<H> {
    /// Compares, slot by slot, the functions that run with the ones the pushed plan `new`
    /// describes. A function the description in force had and `new` has not is removed (with
    /// its subsystem unless `new` keeps it); one `new` adds on a free slot is created; one
    /// created by a management request that `new` leaves out runs on until the next boot, and
    /// one `new` describes as it runs becomes part of the description. Refused (nothing
    /// changes): a new function on a slot the device does not have, a function on a slot
    /// still removing, or on a slot whose function serves another subsystem.
    fn function_changes(&self, new: &Plan) -> Result<FunctionChanges, String> {
        let mut fx = FunctionChanges::default();
        let slots = self.functions.len();
        for slot in 0..32u16 {
            let want = new.function_subsystem(slot);
            let kind = keel_mgmt::function::slot_kind(slot);
            let Some(e) = self.functions.iter().find(|e| e.index == slot) else {
                // A slot the device lacks: refused when the push asks for it, not when the
                // description in force already named it (the boot said so once).
                if let Some(n) = want
                    && self.plan.function_subsystem(slot) != Some(n)
                {
                    return Err(format!(
                        "function {slot} (subsystem {n}): the device has {slots} function \
                         slot(s) (0..{slots})"
                    ));
                }
                continue;
            };
            match (e.slot, want) {
                (SlotState::Free, None) | (SlotState::Removing, None) => {}
                (SlotState::Free, Some(n)) => fx.create.push((slot, String::from(n))),
                (SlotState::Removing, Some(_)) => {
                    return Err(format!(
                        "slot {slot}: its removed function still has commands at backends; \
                         push again in a moment"
                    ));
                }
                (SlotState::Live, Some(n)) if n == e.nqn => {
                    if e.origin == "created" {
                        fx.adopt.push(slot);
                    }
                }
                (SlotState::Live, Some(n)) if e.origin == "created" => {
                    return Err(format!(
                        "slot {slot} is busy: function {kind} serves {} (created by keelctl \
                         function create), not {n}: remove it first",
                        e.nqn
                    ));
                }
                (SlotState::Live, Some(n)) => {
                    return Err(format!(
                        "slot {slot}: function {kind} serves {}: a push does not give a slot \
                         to another subsystem ({n}) at once: push a description without it \
                         first, then one with {n}",
                        e.nqn
                    ));
                }
                (SlotState::Live, None) if e.origin == "created" => fx.notes.push(format!(
                    "function {kind} (subsystem {}, created by keelctl function create) is not \
                     in this description: it runs until the next boot",
                    e.nqn
                )),
                (SlotState::Live, None) => {
                    let keep = new.subsystems.iter().any(|s| s.nqn == e.nqn)
                        || self.functions.iter().any(|o| {
                            o.index != slot && o.slot == SlotState::Live && o.nqn == e.nqn
                        });
                    fx.remove.push((slot, !keep));
                }
            }
        }
        Ok(fx)
    }
}

/// The description's form of a function's limits (`keelctl function create --limit`).
fn provision_limits(limits: &[QosLimit]) -> keel_provision::QosLimits {
    let mut l = keel_provision::QosLimits::default();
    for x in limits {
        let r = Some(keel_provision::QosRate {
            per_sec: x.per_sec,
            burst: (x.burst > 0).then_some(x.burst),
        });
        match x.name.as_str() {
            "iops" => l.iops = r,
            "read_iops" => l.read_iops = r,
            "write_iops" => l.write_iops = r,
            "bps" => l.bps = r,
            "read_bps" => l.read_bps = r,
            "write_bps" => l.write_bps = r,
            // FunctionSpec::validate refused any other name.
            _ => {}
        }
    }
    l
}

/// The limits in force as the status reports them.
fn limit_list(l: &keel_controller::QosLimits) -> Vec<QosLimit> {
    [
        ("iops", l.iops),
        ("read_iops", l.read_iops),
        ("write_iops", l.write_iops),
        ("bps", l.bps),
        ("read_bps", l.read_bps),
        ("write_bps", l.write_bps),
    ]
    .into_iter()
    .filter_map(|(name, r)| {
        r.map(|r| QosLimit {
            name: String::from(name),
            per_sec: r.per_sec,
            burst: r.burst,
        })
    })
    .collect()
}

impl<H: Hw> Services<H> {
    /// The endpoint's function slots as the status reports them.
    pub(crate) fn function_slots(&self) -> Vec<FunctionSlotInfo> {
        self.functions
            .iter()
            .map(|e| FunctionSlotInfo {
                slot: e.index,
                state: e.slot,
                kind: keel_mgmt::function::slot_kind(e.index),
                subsystem: e.nqn.clone(),
                nsids: self
                    .plan
                    .namespaces
                    .iter()
                    .filter(|n| e.slot == SlotState::Live && n.subsystem == e.nqn)
                    .map(|n| n.nsid)
                    .collect(),
                host: String::from(match (e.slot, e.f.as_ref().map(|f| f.state())) {
                    (SlotState::Live, Some(FunctionState::Disabled)) => "disabled",
                    (SlotState::Live, Some(FunctionState::Ready)) => "ready",
                    (SlotState::Live, Some(FunctionState::ShuttingDown)) => "shutdown",
                    (SlotState::Live, Some(FunctionState::Fatal)) => "failed",
                    _ => "",
                }),
                origin: String::from(if e.slot == SlotState::Free {
                    ""
                } else {
                    e.origin
                }),
                limits: if e.slot == SlotState::Live {
                    limit_list(&self.plan.function_limits(e.index))
                } else {
                    Vec::new()
                },
            })
            .collect()
    }

    /// The description kept with the plan follows live changes of functions (so a later
    /// push is compared with what runs): subsystems and namespaces that came or went are
    /// added or dropped, the others stay as described; function limits and NGUIDs follow the
    /// plan.
    fn refresh_device(&mut self) {
        let plan = &self.plan;
        let Some(d) = self.plan.device.as_ref() else {
            return;
        };
        let mut d = d.clone();
        d.subsystems
            .retain(|s| plan.subsystems.iter().any(|p| p.nqn == s.nqn));
        for s in &plan.subsystems {
            if !d.subsystems.iter().any(|x| x.nqn == s.nqn) {
                d.subsystems.push(s.to_model());
            }
        }
        d.namespaces.retain(|n| {
            plan.namespaces
                .iter()
                .any(|p| p.subsystem == n.subsystem && p.nsid == n.nsid)
        });
        for n in &plan.namespaces {
            if !d
                .namespaces
                .iter()
                .any(|x| x.subsystem == n.subsystem && x.nsid == n.nsid)
            {
                d.namespaces.push(n.to_model());
            }
        }
        d.nguids = d
            .namespaces
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let p = plan
                    .namespaces
                    .iter()
                    .find(|p| p.subsystem == n.subsystem && p.nsid == n.nsid)?;
                Some((i as u16, p.nguid?))
            })
            .collect();
        d.qos.functions = plan.qos.functions.clone();
        self.plan.device = Some(d);
    }

    /// A data key of `len` bytes (32 or 64) drawn by the device for a created function's
    /// encrypted namespace; an XTS key with equal halves, which the cipher refuses, is drawn
    /// again.
    fn draw_data_key(&mut self, len: usize) -> keel_provision::DataKey {
        loop {
            let mut k = Vec::with_capacity(len);
            while k.len() < len {
                let mut part = self.challenges.secret(b"keel/v1/function-data-key");
                let n = (len - k.len()).min(part.len());
                k.extend_from_slice(&part[..n]);
                part.fill(0);
                core::hint::black_box(&part);
            }
            // Zeroed when dropped, also when drawn again.
            let key = keel_provision::DataKey::from_bytes(k);
            let b = key.expose_secret();
            if b[..len / 2] != b[len / 2..] {
                break key;
            }
        }
    }

    /// A fresh NGUID for a created function's namespace: 128 bits from the device's
    /// generator (never all zero).
    fn draw_nguid(&mut self) -> [u8; 16] {
        loop {
            let mut g = [0u8; 16];
            g.copy_from_slice(&self.challenges.secret(b"keel/v1/nguid")[..16]);
            if g != [0; 16] {
                break g;
            }
        }
    }

    /// The plan of a function to create by a management request: its subsystem and
    /// namespaces, data keys and NGUIDs drawn by the device.
    fn created_plan(
        &mut self,
        spec: &FunctionSpec,
    ) -> Result<(SubsystemPlan, Vec<NsPlan>), String> {
        let hex: String = self.plan.mac.iter().map(|b| format!("{b:02X}")).collect();
        let mut namespaces = Vec::with_capacity(spec.namespaces.len());
        for n in &spec.namespaces {
            let (nsspec, block_size) = match &n.backend {
                FunctionBackend::Ram { bytes, block_size } => (NsSpec::Ram(*bytes), *block_size),
                FunctionBackend::Drive {
                    drive,
                    nsid,
                    offset,
                    length,
                } => (
                    NsSpec::Drive {
                        drive: usize::from(*drive),
                        nsid: *nsid,
                        slice: Some((*offset, (*length > 0).then_some(*length))),
                    },
                    512,
                ),
                FunctionBackend::Remote {
                    nqn,
                    paths,
                    nsid,
                    offset,
                    length,
                } => {
                    let remote = keel_provision::Remote::new(nqn.clone(), paths.clone(), *nsid);
                    keel_provision::model::check_remote(&remote, &|f| format!("remote.{f}"))
                        .map_err(|e| format!("namespace {}: {e}", n.nsid))?;
                    (
                        NsSpec::Remote {
                            remote: alloc::boxed::Box::new(remote),
                            slice: (*offset != 0 || *length != 0)
                                .then_some((*offset, (*length > 0).then_some(*length))),
                        },
                        512,
                    )
                }
            };
            let len = n.encryption.key_len();
            if len > 0 && !H::has_aes() {
                return Err(format!(
                    "namespace {}: this CPU has no AES instructions: no encrypted namespace",
                    n.nsid
                ));
            }
            namespaces.push(NsPlan {
                subsystem: spec.nqn.clone(),
                nsid: n.nsid,
                spec: nsspec,
                block_size,
                key: (len > 0).then(|| NsKey::Bytes(self.draw_data_key(len))),
                cipher: n.encryption.name(),
                function: Some(spec.slot),
                nguid: Some(self.draw_nguid()),
            });
        }
        let sub = SubsystemPlan {
            nqn: spec.nqn.clone(),
            serial: if spec.serial.is_empty() {
                format!("KEEL{hex}F{}", spec.slot)
            } else {
                spec.serial.clone()
            },
            model: if spec.model.is_empty() {
                String::from("Keel emulated NVMe")
            } else {
                spec.model.clone()
            },
            allowed_hosts: Vec::new(),
        };
        Ok((sub, namespaces))
    }

    /// Brings a function up on slot `slot` for subsystem `sub`: when the subsystem does not
    /// run yet, it is made with `namespaces` in the core first (remote ones join once their
    /// volume has identified them), built against `plan` (the plan that describes them);
    /// then the controller emulation on the slot's window. On error nothing has changed.
    /// `regions`: RAM namespaces are made in shared regions, recorded there (the other cores
    /// serve the function's pairs, `crate::fnq`).
    fn start_function_now(
        &mut self,
        slot: u16,
        sub: SubsystemPlan,
        namespaces: Vec<NsPlan>,
        plan: Option<&Plan>,
        origin: &'static str,
        regions: Option<&mut Regions>,
    ) -> Result<(), String> {
        // The change is confined to the function's subsystem: no other core adopts its
        // NVMe/TCP queues from now on (`crate::replica`).
        let nqn = sub.nqn.clone();
        let before = self.target.namespace_generation();
        let r = self.start_function_inner(slot, sub, namespaces, plan, origin, regions);
        let after = self.target.namespace_generation();
        self.replication.note_only(&nqn, before, after);
        r
    }

    fn start_function_inner(
        &mut self,
        slot: u16,
        sub: SubsystemPlan,
        namespaces: Vec<NsPlan>,
        plan: Option<&Plan>,
        origin: &'static str,
        mut regions: Option<&mut Regions>,
    ) -> Result<(), String> {
        let Some(pos) = self.functions.iter().position(|e| e.index == slot) else {
            return Err(format!("slot {slot}: its window could not be opened"));
        };
        let nqn = sub.nqn.clone();
        let attach_only = self.target.subsystem_views().any(|s| s.nqn == nqn);
        if !attach_only {
            // The subsystem joins the plan first (derived NGUIDs use its index); undone on
            // error.
            self.plan.subsystems.push(sub.clone());
            let undo = |s: &mut Self, remote: &[&NsPlan]| {
                for r in remote {
                    s.remotes.removed(&r.subsystem, r.nsid);
                }
                s.plan.subsystems.retain(|x| x.nqn != nqn);
            };
            let mut configs = Vec::with_capacity(namespaces.len());
            let mut remote = Vec::new();
            for ns in &namespaces {
                if matches!(ns.spec, NsSpec::Remote { .. }) {
                    remote.push(ns);
                    continue;
                }
                // Drive namespaces are always cut as slices: other functions may cut theirs.
                let many = matches!(ns.spec, NsSpec::Drive { .. });
                let p = plan.unwrap_or(&self.plan);
                let made = match (&ns.spec, regions.as_deref_mut()) {
                    (NsSpec::Ram(bytes), Some(r)) => shared_ram_namespace::<H>(p, ns, *bytes, r),
                    _ => build_namespace(p, ns, many, &mut self.drives, &mut self.shared),
                };
                match made {
                    Some(c) => configs.push(c),
                    None => {
                        undo(self, &[]);
                        return Err(format!(
                            "namespace {}: its backend could not be made ({}; see the device console)",
                            ns.nsid, ns.spec
                        ));
                    }
                }
            }
            for (k, ns) in remote.iter().enumerate() {
                let p = plan.unwrap_or(&self.plan);
                if !self.remotes.add(p, ns, true) {
                    undo(self, &remote[..k]);
                    return Err(format!(
                        "namespace {}: its remote volume could not be made ({}; see the device console)",
                        ns.nsid, ns.spec
                    ));
                }
            }
            if let Err(e) = self.target.add_subsystem(SubsystemConfig {
                nqn: nqn.clone(),
                serial: sub.serial.clone(),
                model: sub.model.clone(),
                allowed_hosts: sub.allowed_hosts.clone(),
                namespaces: configs,
            }) {
                undo(self, &remote);
                return Err(format!(
                    "subsystem {nqn}: refused by the controller core ({e})"
                ));
            }
        }
        let e = &mut self.functions[pos];
        if let Err(err) = start_function::<H>(e, pos as u16, &nqn, &mut self.target) {
            if !attach_only {
                let _ = self.target.remove_subsystem(&nqn);
                for ns in namespaces
                    .iter()
                    .filter(|n| matches!(n.spec, NsSpec::Remote { .. }))
                {
                    self.remotes.removed(&ns.subsystem, ns.nsid);
                }
                self.plan.subsystems.retain(|x| x.nqn != nqn);
            }
            return Err(err);
        }
        e.origin = origin;
        if !attach_only {
            for ns in namespaces
                .iter()
                .filter(|n| !matches!(n.spec, NsSpec::Remote { .. }))
            {
                self.served.push((nqn.clone(), ns.nsid));
            }
            self.plan.namespaces.extend(namespaces);
        }
        Ok(())
    }

    /// Whether a function about to be created can have its I/O queue pairs served on every
    /// core (`crate::fnq`, as boot functions: [`crate::services::ReplicaSubsystem`]): other
    /// cores serve functions' pairs and every namespace is RAM or on a drive every such core
    /// has a queue pair on. QoS limits do not stop it: the function's controller limits
    /// (host rules do not apply to a function's controller) are set on core 0 when its
    /// admin queue appears (`Target::set_controller_limits`), before the host can create an
    /// I/O queue, and go with each pair adopted (`keel_controller::Adoption::limits`); its
    /// namespaces' and their groups' are in the replica ([`Services::created_replica`]);
    /// every core takes its part of each by demand (`crate::shares::LimitSharing`).
    fn spreads(&self, namespaces: &[NsPlan]) -> bool {
        self.replication.functions
            && namespaces.iter().all(|n| match n.spec {
                NsSpec::Ram(_) => true,
                NsSpec::Drive { drive, .. } => self.replication.fn_drives.contains(&drive),
                NsSpec::Remote { .. } => false,
            })
    }

    /// The replica the other cores' functions' replicas make of subsystem `nqn`, which runs
    /// already, for a function a push attached to it (`None`: its pairs stay on core 0): a
    /// subsystem core 0 describes for the other cores (`Services::replicable`: RAM in shared
    /// regions, drives), not dropped, whose namespaces qualify as a new function's do
    /// ([`Services::spreads`]: RAM, a drive every core has a functions' pair on; QoS limits
    /// go with it). If the subsystem's other functions' pairs are spread already,
    /// the hub adds this function's slot to them (`crate::fnq::Hub`); otherwise the other
    /// cores add the subsystem first. A subsystem made for a function created live is not
    /// described there: such a function's slot joins the pairs of the one(s) the other cores
    /// serve (`FnEvent::Attached`).
    fn attached_replica(&self, nqn: &str) -> Option<crate::services::ReplicaSubsystem> {
        if self.replication.dropped.iter().any(|d| d == nqn) {
            return None;
        }
        let r = self.replicable.iter().find(|s| s.nqn == nqn)?;
        let namespaces = self.plan_namespaces_of(nqn);
        let described = namespaces
            .iter()
            .all(|n| r.namespaces.iter().any(|x| x.nsid == n.nsid))
            && r.namespaces.len() == namespaces.len();
        (described && self.spreads(&namespaces)).then(|| r.clone())
    }

    /// The namespaces of subsystem `nqn` in the plan in force.
    fn plan_namespaces_of(&self, nqn: &str) -> Vec<NsPlan> {
        self.plan
            .namespaces
            .iter()
            .filter(|n| n.subsystem == nqn)
            .cloned()
            .collect()
    }

    /// The replica the other cores make of a function just created with RAM namespaces in
    /// `regions` (`None` if some namespace is missing there).
    fn created_replica(
        &self,
        nqn: &str,
        mut regions: Regions,
    ) -> Option<crate::services::ReplicaSubsystem> {
        let sub = self.plan.subsystems.iter().find(|s| s.nqn == nqn)?;
        let mut namespaces = Vec::new();
        for n in self.plan.namespaces.iter().filter(|n| n.subsystem == nqn) {
            let (source, nguid) = match n.spec {
                NsSpec::Ram(_) => {
                    let i = regions.iter().position(|r| r.1 == n.nsid)?;
                    let r = regions.swap_remove(i);
                    (ReplicaSource::Ram(r.2), r.3)
                }
                NsSpec::Drive { drive, nsid, slice } => (
                    ReplicaSource::Drive { drive, nsid, slice },
                    self.plan.nguid_of(n),
                ),
                NsSpec::Remote { .. } => return None,
            };
            namespaces.push(ReplicaNs {
                nsid: n.nsid,
                nguid,
                qos: self.plan.namespace_qos(n),
                source,
                key: n.key.clone(),
            });
        }
        Some(crate::services::ReplicaSubsystem {
            nqn: sub.nqn.clone(),
            serial: sub.serial.clone(),
            model: sub.model.clone(),
            allowed_hosts: sub.allowed_hosts.clone(),
            groups: crate::services::groups_of(&self.plan.qos_groups(), &namespaces),
            namespaces,
        })
    }

    /// Creates a function on a free slot: its subsystem with its namespaces in the core, then
    /// the controller emulation on the slot's window. On error nothing has changed.
    fn try_create_function(&mut self, spec: &FunctionSpec) -> Result<FunctionSlotInfo, String> {
        let slots = self.function_slots();
        let (target, plan) = (&self.target, &self.plan);
        keel_mgmt::function::check_create(spec, &slots, |n| {
            target.subsystem_views().any(|s| s.nqn == n)
                || plan.subsystems.iter().any(|s| s.nqn == n)
        })?;
        if spec.slot > 31 {
            return Err(format!(
                "slot {}: functions are numbered 0 to 31",
                spec.slot
            ));
        }
        let (sub, namespaces) = self.created_plan(spec)?;
        // Its pairs spread over the cores like a boot function's when the other cores can
        // serve it (`crate::fnq`): RAM in shared regions, drives every core has a pair on.
        let spread = self.spreads(&namespaces);
        let mut regions = Regions::new();
        self.start_function_now(
            spec.slot,
            sub,
            namespaces,
            None,
            "created",
            spread.then_some(&mut regions),
        )?;
        self.plan.qos.functions.retain(|f| f.function != spec.slot);
        if !spec.limits.is_empty() {
            self.plan.qos.functions.push(keel_provision::FunctionQos {
                function: spec.slot,
                limits: provision_limits(&spec.limits),
            });
        }
        if spread && let Some(r) = self.created_replica(&spec.nqn, regions) {
            self.replication
                .fn_events
                .push(crate::replica::FnEvent::Created {
                    slot: spec.slot,
                    subsystem: alloc::boxed::Box::new(r),
                });
        }
        self.refresh_device();
        let info = self
            .function_slots()
            .into_iter()
            .find(|s| s.slot == spec.slot)
            .unwrap_or_default();
        Ok(info)
    }

    /// Removes the function of a slot: the controller emulation lets go of the window (a host
    /// still using it sees CSTS.CFS and no header), its subsystem and namespaces leave the
    /// core. The slot is free once every buffer is home. On error nothing has changed.
    fn try_remove_function(&mut self, slot: u16) -> Result<FunctionSlotInfo, String> {
        keel_mgmt::function::check_remove(slot, &self.function_slots())?;
        let info = self.remove_function_now(slot, true)?;
        self.refresh_device();
        Ok(info)
    }

    /// Takes a live function off its slot; with `drop_subsystem`, its subsystem and
    /// namespaces leave the core too (else the subsystem stays, for its other exports).
    fn remove_function_now(
        &mut self,
        slot: u16,
        drop_subsystem: bool,
    ) -> Result<FunctionSlotInfo, String> {
        // Confined to the function's subsystem, as for `start_function_now`.
        let nqn = self
            .functions
            .iter()
            .find(|e| e.index == slot)
            .map(|e| e.nqn.clone())
            .unwrap_or_default();
        let before = self.target.namespace_generation();
        let r = self.remove_function_inner(slot, drop_subsystem);
        let after = self.target.namespace_generation();
        if !nqn.is_empty() {
            self.replication.note_only(&nqn, before, after);
        }
        r
    }

    fn remove_function_inner(
        &mut self,
        slot: u16,
        drop_subsystem: bool,
    ) -> Result<FunctionSlotInfo, String> {
        let Some(e) = self.functions.iter_mut().find(|e| e.index == slot) else {
            return Err(format!("slot {slot}: no such slot"));
        };
        let Some(f) = e.f.as_mut() else {
            return Err(format!("slot {slot} has no function"));
        };
        let in_flight = f.buffers_total() - f.buffers_available();
        let was_enabled = f.remove(&mut self.target, &mut e.ep);
        e.slot = SlotState::Removing;
        e.limited = None;
        let nqn = core::mem::take(&mut e.nqn);
        let gone: Vec<u32> = self
            .plan
            .namespaces
            .iter()
            .filter(|n| n.subsystem == nqn)
            .map(|n| n.nsid)
            .collect();
        if drop_subsystem {
            if let Err(err) = self.target.remove_subsystem(&nqn) {
                klog::error!(
                    "pcie-fn{}: subsystem {}: {}",
                    slot,
                    klog::D(&nqn),
                    klog::D(&err)
                );
            }
            for nsid in &gone {
                self.remotes.removed(&nqn, *nsid);
            }
            // Core 0's description of what other cores serve lets go of its shared RAM
            // regions too: the memory goes once the other cores' replicas dropped the
            // subsystem (`crate::fnq`, `crate::percore`) and core 0's target its namespaces.
            self.forget_dropped(&nqn);
            self.plan.subsystems.retain(|s| s.nqn != nqn);
            self.plan.namespaces.retain(|n| n.subsystem != nqn);
            self.served.retain(|(q, _)| *q != nqn);
        } else {
            for n in self
                .plan
                .namespaces
                .iter_mut()
                .filter(|n| n.function == Some(slot))
            {
                n.function = None;
            }
        }
        self.plan.qos.functions.retain(|f| f.function != slot);
        klog::info!(
            "pcie-fn{}: function removed live: subsystem {}{}, {} namespace(s); {}",
            slot,
            klog::D(&nqn),
            if drop_subsystem {
                ""
            } else {
                " (stays for its other exports)"
            },
            gone.len(),
            klog::D(&if was_enabled {
                format!(
                    "a host had it enabled: CSTS.CFS set, {in_flight} command buffer(s) were in flight"
                )
            } else {
                String::from("no host had it enabled")
            })
        );
        let mut info = self
            .function_slots()
            .into_iter()
            .find(|s| s.slot == slot)
            .unwrap_or_default();
        info.subsystem = nqn;
        info.nsids = gone;
        Ok(info)
    }

    /// Pools and slots in use right now.
    pub(crate) fn resources(&self) -> Resources {
        let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        let (nvmf_free, nvmf_total) = self.nvmf.as_ref().map_or((0, 0), |s| s.buffers());
        let sk = &self.sockets;
        let limits = self.target.limits();
        // Every slot's buffers: its function's, or a free slot's kept pool.
        let (fn_free, fn_total) = self.functions.iter().fold((0, 0), |(a, t), e| {
            let (fa, ft) =
                e.f.as_ref()
                    .map_or((0, 0), |f| (f.buffers_available(), f.buffers_total()));
            let (pa, pt) = e
                .pool
                .as_ref()
                .map_or((0, 0), |p| (p.available(), p.count()));
            (a + fa + pa, t + ft + pt)
        });
        Resources {
            heap_free: H::heap_free() as u64,
            nvmf_buffers_free: n(nvmf_free),
            nvmf_buffers_total: n(nvmf_total),
            function_buffers_free: n(fn_free),
            function_buffers_total: n(fn_total),
            sockets_created: n(sk.created),
            sockets_max: n(sk.max),
            sockets_free: n(sk.free),
            sockets_listening: n(sk.listening),
            sockets_draining: n(sk.draining),
            awaiting_icreq: n(self.nvmf.as_ref().map_or(0, |s| s.awaiting_icreq())),
            controllers: n(self.target.controller_count()),
            controllers_max: n(limits.max_controllers),
            queues: n(self.target.open_queue_count()),
            queues_max: n(limits.max_queues),
            refused: sk.refused + self.nvmf.as_ref().map_or(0, |s| s.refused),
            evicted: self.nvmf.as_ref().map_or(0, |s| s.evicted),
            icreq_timeouts: self.nvmf.as_ref().map_or(0, |s| s.icreq_timeouts),
        }
    }
}

impl<H: Hw> Services<H> {
    /// Every drive: its state, core 0's own queue pairs, then every other core's (as each
    /// published them).
    fn drive_infos(&self) -> Vec<DriveInfo> {
        self.drives
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let s = d.drive.status();
                let c = s.own;
                let mut queues = vec![DriveQueueInfo {
                    core: 0,
                    first_qid: 1,
                    queues: s.io_queues,
                    state: String::from(match s.state {
                        "online" => "up",
                        "dead" => "dead",
                        _ => "down",
                    }),
                    commands: c.commands,
                    completed: c.completed,
                    errors: c.errors,
                    timeouts: c.timeouts,
                    resets: c.resets,
                    failed_by_reset: c.failed_by_reset,
                    sq_doorbells: c.sq_doorbells,
                    cq_doorbells: c.cq_doorbells,
                    queue_full: c.queue_full,
                }];
                queues.extend(H::drive_queues_elsewhere(i));
                DriveInfo {
                    bdf: d.bdf.clone(),
                    model: s.model,
                    state: String::from(s.state),
                    resets: s.resets,
                    aborts: s.aborts,
                    queues,
                }
            })
            .collect()
    }

    /// Every remote volume's I/O queues: core 0's own, then every other core's lane queues
    /// (as each published them), each named by its volume and path.
    fn remote_queue_infos(&self) -> Vec<RemoteQueueInfo> {
        let mut out = Vec::new();
        for v in &self.remotes.volumes {
            let paths: Vec<String> = v
                .remote
                .paths
                .iter()
                .map(|&(ip, port)| keel_remote::PathAddr::new(ip, port).to_string())
                .collect();
            let row =
                |path: u8, core: u16, qid: u16, state: &str, commands, in_flight| RemoteQueueInfo {
                    subnqn: v.remote.nqn.clone(),
                    nsid: v.remote.nsid,
                    path: paths.get(usize::from(path)).cloned().unwrap_or_default(),
                    core,
                    qid,
                    state: String::from(state),
                    commands,
                    in_flight,
                };
            v.vol.for_each_queue(&mut |q| {
                out.push(row(
                    q.path,
                    0,
                    q.qid,
                    q.state.name(),
                    q.commands,
                    u32::from(q.in_flight),
                ));
            });
            for (path, core, qid, state, commands, in_flight) in H::remote_queues_elsewhere(v.id) {
                out.push(row(path, core, qid, state, commands, in_flight));
            }
        }
        out
    }
}

impl<H: Hw> keel_mgmt::Device for Services<H> {
    fn snapshot(&self) -> Snapshot {
        let t = &self.target;
        Snapshot {
            version: String::from(env!("CARGO_PKG_VERSION")),
            build_id: String::from(env!("KEEL_GIT_HASH")),
            board: String::from(H::BOARD),
            uptime_ns: H::now_ns(),
            generation: self.plan.generation,
            config_source: self.plan.source.to_string(),
            subsystems: t
                .subsystem_views()
                .map(|s| SubsystemInfo {
                    nqn: s.nqn.into(),
                    allowed_hosts: s.allowed_hosts.to_vec(),
                })
                .collect(),
            namespaces: t
                .namespace_views()
                .map(|n| {
                    let p = self.find_plan_ns(n.subsystem, n.nsid);
                    // The I/O queues other cores serve themselves count there.
                    let e = H::namespace_elsewhere(n.subsystem, n.nsid);
                    NamespaceInfo {
                        subsystem: n.subsystem.into(),
                        nsid: n.nsid,
                        backend: p.map_or_else(|| String::from("?"), |p| p.spec.to_string()),
                        size_bytes: n.geometry.blocks * u64::from(n.geometry.block_size),
                        block_size: n.geometry.block_size,
                        encryption: String::from(p.map_or("?", |p| p.cipher)),
                        exports: self.exports_of(n.subsystem),
                        stats: NsCounters {
                            reads: n.stats.reads + e.reads,
                            writes: n.stats.writes + e.writes,
                            others: n.stats.others + e.others,
                            read_bytes: n.stats.read_bytes + e.read_bytes,
                            write_bytes: n.stats.write_bytes + e.write_bytes,
                            errors: n.stats.errors + e.errors,
                            read_latency: latency(&merged(&n.stats.read_latency, &e.read_latency)),
                            write_latency: latency(&merged(
                                &n.stats.write_latency,
                                &e.write_latency,
                            )),
                        },
                    }
                })
                .collect(),
            controllers: t
                .controller_views()
                .filter(|c| !c.discovery)
                .map(|c| ControllerInfo {
                    cntlid: c.cntlid,
                    subsystem: c.subsystem.into(),
                    hostnqn: c.hostnqn.into(),
                    transport: String::from(if c.local { "pcie" } else { "tcp" }),
                    io_queues: c.io_queues,
                })
                .collect(),
            tcp_connections: self.nvmf.as_ref().map_or(0, |s| s.connections() as u32),
            functions: self
                .functions
                .iter()
                .filter_map(|e| {
                    e.live().map(|f| FunctionInfo {
                        index: e.index,
                        subsystem: e.nqn.clone(),
                        enabled: f.state() != FunctionState::Disabled,
                    })
                })
                .collect(),
            function_slots: self.function_slots(),
            cores: H::cores(),
            resources: self.resources(),
            socket_buffer_bytes: self.sockets.buffer_bytes as u64,
            nic: H::nic_counters(),
            remotes: self
                .remotes
                .volumes
                .iter()
                .map(|v| {
                    v.info(
                        &self.remotes.hostnqn,
                        H::remote_load_elsewhere(v.id),
                        &H::remote_queues_elsewhere(v.id),
                    )
                })
                .collect(),
            qos_groups: t
                .group_views()
                .map(|g| GroupInfo {
                    name: g.name.into(),
                    weight: g.weight,
                    qos: self.qos_rates.info(
                        &group_key(g.name),
                        &every_core::<H>(keel_controller::group_key(g.name), g.qos),
                    ),
                })
                .collect(),
            qos_namespaces: t
                .namespace_views()
                .map(|n| NamespaceQosInfo {
                    subsystem: n.subsystem.into(),
                    nsid: n.nsid,
                    weight: n.qos_config.weight,
                    group: n.qos_config.group.clone(),
                    qos: self.qos_rates.info(
                        &ns_key(n.subsystem, n.nsid),
                        &every_core::<H>(keel_controller::limit_key(n.subsystem, n.nsid), n.qos),
                    ),
                })
                .collect(),
            qos_controllers: t
                .controller_views()
                .filter(|c| !c.discovery)
                .map(|c| ControllerQosInfo {
                    cntlid: c.cntlid,
                    hostnqn: c.hostnqn.into(),
                    transport: String::from(if c.local { "pcie" } else { "tcp" }),
                    qos: self.qos_rates.info(
                        &ctrl_key(c.cntlid),
                        &every_core::<H>(
                            keel_controller::controller_key(c.subsystem, c.cntlid),
                            c.qos,
                        ),
                    ),
                })
                .collect(),
            qos_domains: qos_domains::<H>(t),
            drives: self.drive_infos(),
            remote_queues: self.remote_queue_infos(),
        }
    }

    fn push(&mut self, bundle: &[u8]) -> Result<PushReport, String> {
        match self.try_push(bundle) {
            Ok(r) => {
                klog::info!(
                    "config: push of generation {} applied: {} namespace(s) added, {} removed, \
                     {}; {} change(s) at the next boot{}",
                    r.generation,
                    r.added.len(),
                    r.removed.len(),
                    if r.persisted {
                        "persisted"
                    } else {
                        "not persisted"
                    },
                    r.needs_reboot.len(),
                    if r.needs_reboot.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", r.needs_reboot.join("; "))
                    }
                );
                Ok(r)
            }
            Err(e) => {
                let m = format!(
                    "push refused: {e}; the configuration in force (generation {}) is unchanged",
                    self.plan.generation
                );
                klog::error!("config: {}", m);
                Err(m)
            }
        }
    }

    fn create_function(&mut self, spec: &FunctionSpec) -> Result<FunctionSlotInfo, String> {
        let t0 = H::now_ns();
        self.try_create_function(spec)
            .inspect(|info| {
                klog::info!(
                    "pcie-fn{}: {} created live: subsystem {}, namespace(s) {}, {} limit(s), in {} us",
                    info.slot,
                    klog::D(&info.kind),
                    klog::D(&info.subsystem),
                    klog::Dbg(&info.nsids),
                    info.limits.len(),
                    (H::now_ns() - t0) / 1000
                )
            })
            .inspect_err(|e| {
                klog::error!("pcie-fn{}: create refused: {}", spec.slot, klog::D(e));
            })
    }

    fn remove_function(&mut self, slot: u16) -> Result<FunctionSlotInfo, String> {
        self.try_remove_function(slot).inspect_err(|e| {
            klog::error!("pcie-fn{}: remove refused: {}", slot, klog::D(e));
        })
    }

    fn reboot(&mut self) {
        klog::info!("mgmt: reboot requested");
        self.health
            .shutdown(self.identity.flash.as_mut(), H::now_ns());
        H::system_reset()
    }

    fn authorized_key(&self) -> [u8; 32] {
        self.plan.mgmt_key
    }

    fn fresh_challenge(&mut self) -> [u8; 32] {
        self.challenges.next()
    }
}
