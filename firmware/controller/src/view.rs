//! Read-only views of the target for status reporting (management, metrics): subsystems,
//! namespaces with their statistics, live controllers. Nothing here changes the target.

use crate::config::{NamespaceQos, QosLimits};
use crate::target::{DISCOVERY, Target};
use keel_storage::{Geometry, NsStats};

/// What QoS did for a namespace, a controller or a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QosCounters {
    /// The limits in force.
    pub limits: QosLimits,
    /// Commands started so far (counted once they pass their limits).
    pub admitted_ops: u64,
    /// Bytes of those commands.
    pub admitted_bytes: u64,
    /// Nanoseconds a command was held back by these limits.
    pub throttled_ns: u64,
    /// Commands waiting now (namespaces: in all their flows).
    pub queued: u32,
}

/// One QoS group.
#[derive(Debug, Clone, Copy)]
pub struct GroupView<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its weight (0: its namespaces' own).
    pub weight: u32,
    /// Its counters.
    pub qos: QosCounters,
}

/// One subsystem (the discovery subsystem is never listed).
#[derive(Debug, Clone, Copy)]
pub struct SubsystemView<'a> {
    /// Its NQN.
    pub nqn: &'a str,
    /// Host NQNs allowed; empty: any.
    pub allowed_hosts: &'a [alloc::string::String],
}

/// One active namespace.
#[derive(Debug, Clone, Copy)]
pub struct NamespaceView<'a> {
    /// NQN of its subsystem.
    pub subsystem: &'a str,
    /// Its NSID.
    pub nsid: u32,
    /// Its geometry.
    pub geometry: Geometry,
    /// Its counters.
    pub stats: &'a NsStats,
    /// Its QoS configuration.
    pub qos_config: &'a NamespaceQos,
    /// What its limits did.
    pub qos: QosCounters,
    /// Its scheduling domain (its backend: the slices of one drive namespace or remote
    /// volume share one): an index, stable while the domain lives.
    pub domain: u16,
    /// The domain's cap on commands at the backend at once (`[qos] drive_max_inflight` for a
    /// drive; 0: no cap).
    pub domain_max_inflight: u32,
    /// The domain's commands at the backend now.
    pub domain_inflight: u32,
}

/// One live controller (discovery controllers included: `discovery` says so).
#[derive(Debug, Clone, Copy)]
pub struct ControllerView<'a> {
    /// Controller ID.
    pub cntlid: u16,
    /// NQN of its subsystem.
    pub subsystem: &'a str,
    /// The host's NQN.
    pub hostnqn: &'a str,
    /// Created by a local transport (emulated PCIe function) rather than a fabrics Connect.
    pub local: bool,
    /// A controller of the discovery subsystem.
    pub discovery: bool,
    /// I/O queues connected.
    pub io_queues: u16,
    /// What its (host's) limits did.
    pub qos: QosCounters,
}

impl Target {
    /// The NVM subsystems served.
    pub fn subsystem_views(&self) -> impl Iterator<Item = SubsystemView<'_>> + '_ {
        self.subsystems
            .iter()
            .filter(|s| !s.discovery && !s.removed)
            .map(|s| SubsystemView {
                nqn: &s.nqn,
                allowed_hosts: &s.allowed_hosts,
            })
    }

    /// Every active namespace of every NVM subsystem.
    pub fn namespace_views(&self) -> impl Iterator<Item = NamespaceView<'_>> + '_ {
        self.subsystems
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.discovery && !s.removed)
            .flat_map(move |(si, s)| {
                s.namespaces
                    .iter()
                    .enumerate()
                    .filter_map(|(ni, n)| n.as_ref().map(|n| (ni, n)))
                    .filter(|(_, n)| n.active)
                    .map(move |(ni, n)| NamespaceView {
                        subsystem: &s.nqn,
                        nsid: n.nsid,
                        geometry: n.geometry,
                        stats: &n.stats,
                        qos_config: &n.qos,
                        qos: QosCounters {
                            queued: self.namespace_flow_stats(si, ni).queued,
                            ..self.qos_counters(n.limiter)
                        },
                        domain: n.domain.0,
                        domain_max_inflight: self.sched.max_inflight(n.domain).unwrap_or(0),
                        domain_inflight: self.sched.inflight(n.domain),
                    })
            })
    }

    /// Every live controller.
    pub fn controller_views(&self) -> impl Iterator<Item = ControllerView<'_>> + '_ {
        self.ctrls.iter().flatten().map(|c| ControllerView {
            cntlid: c.cntlid,
            subsystem: self.subsystems.get(c.subsys).map_or("", |s| s.nqn.as_str()),
            hostnqn: &c.hostnqn,
            local: c.local,
            discovery: c.subsys == DISCOVERY,
            io_queues: c.io_qs.iter().flatten().count() as u16,
            qos: QosCounters {
                queued: c
                    .flows
                    .iter()
                    .flatten()
                    .filter_map(|f| self.sched.flow_stats(*f))
                    .map(|s| s.queued)
                    .sum(),
                ..self.qos_counters(c.limiter)
            },
        })
    }

    /// Every QoS group.
    pub fn group_views(&self) -> impl Iterator<Item = GroupView<'_>> + '_ {
        self.groups.iter().map(|(name, id, weight)| GroupView {
            name,
            weight: *weight,
            qos: self.qos_counters(*id),
        })
    }

    fn qos_counters(&self, id: keel_qos::LimiterId) -> QosCounters {
        let (admitted_ops, admitted_bytes, throttled_ns) = self.limiter_counters(id);
        QosCounters {
            // The configured limits (this target's part of them while they are split
            // across cores is `Target::limits_in_force`).
            limits: self.sched.limiter_base(id).unwrap_or(QosLimits::NONE),
            admitted_ops,
            admitted_bytes,
            throttled_ns,
            queued: 0,
        }
    }

    /// Whether subsystem `nqn` still holds a removed namespace `nsid` whose commands have not
    /// all completed (its backend is dropped once they have, at a later poll).
    pub fn namespace_draining(&self, nqn: &str, nsid: u32) -> bool {
        self.subsys_index(nqn)
            .and_then(|si| self.subsystems.get(si))
            .is_some_and(|s| {
                s.namespaces
                    .iter()
                    .flatten()
                    .any(|n| !n.active && n.nsid == nsid)
            })
    }

    /// Whether the target serves NVM subsystem `nqn`.
    pub fn has_subsystem(&self, nqn: &str) -> bool {
        self.subsys_index(nqn).is_some_and(|si| si != DISCOVERY)
    }

    /// Whether subsystem `nqn` has an active namespace `nsid`.
    pub fn has_namespace(&self, nqn: &str, nsid: u32) -> bool {
        self.subsys_index(nqn)
            .and_then(|si| self.subsystems.get(si))
            .is_some_and(|s| s.find_ns(nsid).is_some())
    }
}
