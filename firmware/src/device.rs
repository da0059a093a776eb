//! What the management session asks of the device ([`keel_mgmt::Device`]), implemented by
//! the services: status snapshots, configuration pushes, reboot, the management key and
//! challenges (drawn by [`crate::challenge`]).

use crate::config::NsSpec;
use crate::hw::Hw;
use crate::plan::{NsPlan, Plan, Source};
use crate::services::{Services, build_namespace};
use alloc::{format, string::String, string::ToString, vec::Vec};
use keel_mgmt::{
    ControllerInfo, FunctionInfo, Latency, NamespaceInfo, NsCounters, PushReport, Snapshot,
    SubsystemInfo,
};
use keel_nvme_pcie::FunctionState;
use keel_storage::LatencyHistogram;

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

impl<H: Hw> Services<H> {
    fn exports_of(&self, nqn: &str) -> Vec<String> {
        let mut e = Vec::new();
        if self.nvmf.is_some() {
            e.push(String::from("tcp"));
        }
        for f in self.functions.iter().filter(|f| f.nqn == nqn) {
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

    /// Applies a verified push; on error nothing has changed.
    fn try_push(&mut self, bundle: &[u8]) -> Result<PushReport, String> {
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
        }

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
            if let Some(f) = n.function
                && !self
                    .functions
                    .iter()
                    .any(|e| e.index == f && e.nqn == n.subsystem)
            {
                needs_reboot.push(format!(
                    "namespace {} of {}: export through emulated function {f}",
                    n.nsid, n.subsystem
                ));
            }
            additions.push(n.clone());
        }

        // Backends (a drive namespace shared with a running slice, a RAM disk...). One that
        // cannot be built now is reported, not fatal: the bundle is valid.
        let mut built = Vec::new();
        for n in additions {
            let many = matches!(n.spec, NsSpec::Drive { slice: Some(_), .. });
            match build_namespace(&new, &n, many, &mut self.drives, &mut self.shared) {
                Some(c) => built.push((n, c)),
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
                log::info!(
                    "config: generation {} written to flash copy {} (sequence {seq})",
                    cfg.generation,
                    copy.name()
                );
                true
            }
            Err(e) => {
                log::warn!(
                    "config: generation {} not persisted ({e}): it lasts until the next boot",
                    cfg.generation
                );
                false
            }
        };

        let mut removed = Vec::new();
        for (nqn, nsid) in removals {
            if self.target.remove_namespace(&nqn, nsid).is_ok() {
                log::info!("nvmf: namespace {nsid} of {nqn} removed");
                self.plan
                    .namespaces
                    .retain(|n| !(n.subsystem == nqn && n.nsid == nsid));
                self.served.retain(|(q, id)| !(*q == nqn && *id == nsid));
                removed.push((nqn, nsid));
            }
        }
        let mut added = Vec::new();
        for (n, c) in built {
            match self.target.add_namespace(&n.subsystem, c) {
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
        self.plan.generation = cfg.generation;
        self.plan.source = Source::Push;
        self.plan.device = Some(cfg.device);
        Ok(PushReport {
            generation: self.plan.generation,
            added,
            removed,
            needs_reboot,
            persisted,
        })
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
                    NamespaceInfo {
                        subsystem: n.subsystem.into(),
                        nsid: n.nsid,
                        backend: p.map_or_else(|| String::from("?"), |p| p.spec.to_string()),
                        size_bytes: n.geometry.blocks * u64::from(n.geometry.block_size),
                        block_size: n.geometry.block_size,
                        encryption: String::from(p.map_or("?", |p| p.cipher)),
                        exports: self.exports_of(n.subsystem),
                        stats: NsCounters {
                            reads: n.stats.reads,
                            writes: n.stats.writes,
                            others: n.stats.others,
                            read_bytes: n.stats.read_bytes,
                            write_bytes: n.stats.write_bytes,
                            errors: n.stats.errors,
                            read_latency: latency(&n.stats.read_latency),
                            write_latency: latency(&n.stats.write_latency),
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
                .map(|f| FunctionInfo {
                    index: f.index,
                    subsystem: f.nqn.clone(),
                    enabled: f.f.state() != FunctionState::Disabled,
                })
                .collect(),
            cores: H::cores(),
        }
    }

    fn push(&mut self, bundle: &[u8]) -> Result<PushReport, String> {
        match self.try_push(bundle) {
            Ok(r) => {
                log::info!(
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
                log::error!("config: {m}");
                Err(m)
            }
        }
    }

    fn reboot(&mut self) {
        log::info!("mgmt: reboot requested");
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
