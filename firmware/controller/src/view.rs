//! Read-only views of the target for status reporting (management, metrics): subsystems,
//! namespaces with their statistics, live controllers. Nothing here changes the target.

use crate::target::{DISCOVERY, Target};
use keel_storage::{Geometry, NsStats};

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
}

impl Target {
    /// The NVM subsystems served.
    pub fn subsystem_views(&self) -> impl Iterator<Item = SubsystemView<'_>> + '_ {
        self.subsystems
            .iter()
            .filter(|s| !s.discovery)
            .map(|s| SubsystemView {
                nqn: &s.nqn,
                allowed_hosts: &s.allowed_hosts,
            })
    }

    /// Every active namespace of every NVM subsystem.
    pub fn namespace_views(&self) -> impl Iterator<Item = NamespaceView<'_>> + '_ {
        self.subsystems
            .iter()
            .filter(|s| !s.discovery)
            .flat_map(|s| {
                s.namespaces
                    .iter()
                    .flatten()
                    .filter(|n| n.active)
                    .map(move |n| NamespaceView {
                        subsystem: &s.nqn,
                        nsid: n.nsid,
                        geometry: n.geometry,
                        stats: &n.stats,
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
        })
    }

    /// Whether subsystem `nqn` has an active namespace `nsid`.
    pub fn has_namespace(&self, nqn: &str, nsid: u32) -> bool {
        self.subsys_index(nqn)
            .and_then(|si| self.subsystems.get(si))
            .is_some_and(|s| s.find_ns(nsid).is_some())
    }
}
