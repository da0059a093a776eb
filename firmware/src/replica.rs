//! Live namespace changes on every core (issue 17): the replicas other cores serve adopted
//! I/O queues from follow the namespaces a pushed configuration adds or removes.
//!
//! Core 0 (the controller core) owns one [`Replication`] in its services. A push that adds
//! or removes a namespace of a subsystem the other cores serve ([`Replication::follows`]),
//! of a kind they can serve (a RAM namespace in a shared region, a namespace of a drive every
//! core has an I/O queue pair on, whole or a slice, AES-XTS encrypted or not, with its QoS
//! limits and weight, in a QoS group or not), is *staged* ([`Replication::stage`]): core 0's
//! own target is left alone, the change ([`ReplicaChange`], carrying what
//! `crate::percore::ServeSpec` carries for one namespace, and the definition of its group:
//! a replica has only the groups its namespaces use) goes to every serving core
//! (`crate::cores::Msg::Replica`), each applies it to its replica and acks (`crate::cores::Msg::ReplicaAck`), and only when every core acked
//! does core 0 apply it ([`crate::services::Services::finish_replicated`]): hosts learn of
//! namespaces only through core 0's admin queues (so no core is ever asked for a namespace
//! it lacks), and for a removal no core still has a command on the old blocks when core 0
//! removes the namespace (a core acks a removal once its replica's last command on the
//! namespace completed; a later namespace may reuse that drive range). A core that does
//! not ack within [`ACK_TIMEOUT_NS`], or could not apply the change, makes core 0 apply it
//! anyway and stop adopting that subsystem only ([`Replication::drop_subsystem`]): its
//! adopted queues end (the hosts reconnect, through core 0).
//!
//! Every change of core 0's namespace generation that the replicas account for is logged
//! ([`Replication::note`]): a replicated change, a remote namespace every core added first
//! (`crate::remote`), or a change confined to subsystems that are dropped at the same time
//! ([`Replication::note_only`]). Both watchers of the generation, the NVMe/TCP holder
//! (`crate::percore::Holder`) and the functions' hub (`crate::fnq::Hub`), ask
//! [`Replication::explains`] with their own last generation, and read the dropped subsystems
//! from [`Replication::dropped`] with their own cursor; a change nobody logged keeps the old
//! fallback (every adopted queue ends, every later one is forwarded to core 0).
//!
//! A push that changes the QoS of such a subsystem (its namespaces' limits, weights or groups,
//! its groups' limits, or the host rules) stages a [`ReplicaOp::Qos`] the same way: core 0
//! applied the change to its own target already; every core applies it to its replica, so
//! the subsystem stays served by every core, each splitting the new limits by demand. One a
//! core cannot apply drops that subsystem only. A subsystem with an emulated function whose
//! pairs other cores serve gets the same change through the functions' hub
//! ([`FnEvent::Qos`], `crate::fnq::FnMsg::Qos`), with its functions' controllers' new
//! limits; when the planes serve it too, they get the [`ReplicaOp::Qos`] as well.
//!
//! Per change only: the messages, the clones and the log entries are made once per change,
//! never per I/O.

use crate::services::{ReplicaNs, ReplicaSubsystem};
use alloc::collections::VecDeque;
use alloc::{string::String, vec::Vec};
use keel_controller::NamespaceConfig;

/// How long core 0 waits for every core to apply a staged change before it applies it alone
/// and stops adopting that subsystem.
pub const ACK_TIMEOUT_NS: u64 = 1_000_000_000;

/// Log entries kept: the poll loops ask every pass, so a few are enough.
const LOG_LEN: usize = 64;

/// A namespace change of a subsystem every core serves, as core 0 sends it.
#[derive(Debug, Clone)]
pub struct ReplicaChange {
    /// Sequence number (the acks name it).
    pub seq: u64,
    /// The subsystem.
    pub subsystem: String,
    /// What changes.
    pub op: ReplicaOp,
}

/// What a [`ReplicaChange`] does.
#[derive(Debug, Clone)]
pub enum ReplicaOp {
    /// Add this namespace (its blocks as `crate::percore::ServeSpec` describes them).
    Add {
        /// The namespace (its QoS names its group, if any).
        ns: alloc::boxed::Box<ReplicaNs>,
        /// The definition of the group it is in (as core 0 has it after the push: a group
        /// new in the same push too), which the replica takes first: added when it lacks it
        /// (a replica has only the groups its namespaces use), its limits set when they
        /// differ. Its limiter's key is the group name's (`keel_controller::group_key`), as
        /// on core 0, so every core takes its part of the group's limits.
        group: Option<keel_controller::QosGroup>,
    },
    /// Remove namespace `nsid`.
    Remove(u32),
    /// The subsystem's QoS changed live (a push): core 0 applied it already
    /// (`Services::apply_qos`); each core applies it to its replica and acks, and a core
    /// that cannot (it does not serve the subsystem) makes core 0 stop adopting that
    /// subsystem only. Core 0 has nothing left to do when every core acked.
    Qos(alloc::boxed::Box<ReplicaQos>),
    /// Core 0 no longer adopts queues of the subsystem ([`Replication::drop_subsystem`]):
    /// the replica forgets it (its controllers there end, each namespace's backend is
    /// dropped once drained, so the memory of its shared RAM regions can go). Never staged
    /// and never acked: the holder sends it when it ends the subsystem's adoptions.
    Retire,
}

/// A live QoS change of one subsystem ([`ReplicaOp::Qos`]), as core 0 has it after the push:
/// what a replica needs to enforce the same limits (each core then takes its part of them by
/// demand, `crate::shares::LimitSharing`, under the same keys as before).
#[derive(Debug, Clone)]
pub struct ReplicaQos {
    /// Every namespace of the subsystem: its NSID and its new QoS (limits, weight, group,
    /// commands at the drive; a replica keeps its own domain).
    pub namespaces: Vec<(u32, keel_controller::NamespaceQos)>,
    /// Every group the replicas' subsystems' namespaces are in, with its definition (a
    /// replica's groups are those: `crate::services::replica_target_shares`).
    pub groups: Vec<keel_controller::QosGroup>,
    /// The new host rules, when they changed (the replica's target keeps them; its
    /// controllers take their holders' limits, below).
    pub hosts: Option<Vec<keel_controller::HostQos>>,
    /// Core 0's controllers of the subsystem and their limits, when the host rules changed,
    /// and always for a subsystem with an emulated function (its functions' controllers'
    /// `[[qos.function]]` limits): the replicas of those controllers (queues adopted by
    /// another core) take them (`keel_controller::Target::set_replica_controller_limits`).
    pub controllers: Vec<(u16, keel_controller::QosLimits)>,
}

/// A staged change on core 0.
pub(crate) struct Staged {
    pub(crate) change: ReplicaChange,
    /// Core 0's namespace for an add (built and checked at the push).
    pub(crate) config: Option<NamespaceConfig>,
    /// When it was sent to the cores (`None`: not yet).
    sent_at: Option<u64>,
    /// Cores (a bit each) that have not acked yet.
    acks: u64,
    /// Some core could not apply it.
    failed: bool,
}

impl core::fmt::Debug for Staged {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Staged")
            .field("change", &self.change)
            .field("acks", &self.acks)
            .finish_non_exhaustive()
    }
}

/// How a staged change ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Every serving core applied it.
    Replicated,
    /// Some core said it could not.
    Refused,
    /// Some core did not answer in time.
    TimedOut,
}

/// Core 0's record of what the replicas on other cores follow (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Replication {
    /// Cores (a bit each) serving NVMe/TCP replicas (`crate::percore::Holder::start`); 0:
    /// none, nothing is staged.
    pub(crate) cores: u64,
    /// The NVMe/TCP subsystems those replicas serve (as the holder started them).
    pub(crate) subsystems: Vec<String>,
    /// Drives every serving core has an I/O queue pair on.
    pub(crate) drives: Vec<usize>,
    /// I/O queues a laned remote volume's association asks for beyond core 0's (one per
    /// other core, `crate::remote::RemoteService::lane_new`).
    pub(crate) lanes: u16,
    /// RAM namespaces are made in shared regions (`RamSharing::All`).
    pub(crate) ram_shared: bool,
    /// Subsystems no longer adopted (only ever grows; every watcher keeps its own cursor).
    pub(crate) dropped: Vec<String>,
    /// Namespace generation changes the replicas account for (before, after).
    log: Vec<(u64, u64)>,
    staged: VecDeque<Staged>,
    next_seq: u64,
    /// Other cores serve the I/O queue pairs of functions created live (`crate::fnq::Hub`
    /// started): their RAM namespaces are made in shared regions.
    pub(crate) functions: bool,
    /// Drives every core serving functions' pairs has an I/O queue pair on.
    pub(crate) fn_drives: Vec<usize>,
    /// What the functions' hub must know, in order (it drains them; only kept while
    /// `functions`).
    pub(crate) fn_events: Vec<FnEvent>,
}

/// A change the functions' hub (`crate::fnq::Hub`) acts on.
#[derive(Debug)]
pub(crate) enum FnEvent {
    /// A function was created live on `slot` (or a push attached it to a subsystem that runs
    /// already), and the other cores can serve its subsystem.
    Created {
        /// Its slot.
        slot: u16,
        /// Its subsystem, as the other cores' replicas make it.
        subsystem: alloc::boxed::Box<ReplicaSubsystem>,
    },
    /// A push attached the function on `slot` to subsystem `nqn`, which runs already with
    /// another function whose pairs the other cores may serve: this one's join them (no
    /// replica to make, the other cores have it).
    Attached {
        /// Its slot.
        slot: u16,
        /// The subsystem.
        nqn: String,
    },
    /// Subsystem `nqn` changed (namespaces) or went (its function removed), or a core could
    /// not apply its QoS: no core but core 0 may serve its function's pairs from now on.
    Changed(String),
    /// A push changed the QoS of subsystem `nqn` (its functions' `[[qos.function]]` limits,
    /// its namespaces' limits, weights or groups, its groups' limits, or the host rules):
    /// core 0 applied it already; the hub sends it to every core serving the subsystem's
    /// functions' pairs (`crate::fnq::FnMsg::Qos`), whose replicas take it, and the pairs
    /// stay where they are. Nothing to do for a subsystem the other cores do not serve.
    Qos {
        /// The subsystem.
        nqn: String,
        /// Its new QoS (`controllers`: every function's controller and its new limits).
        qos: alloc::boxed::Box<ReplicaQos>,
    },
}

impl Replication {
    /// Nothing followed yet (the holder fills it in when other cores serve replicas);
    /// `ram_shared`: RAM namespaces are made in shared regions.
    pub(crate) fn new(ram_shared: bool) -> Self {
        Self {
            ram_shared,
            ..Default::default()
        }
    }

    /// Whether a namespace change of `nqn` can be staged (the other cores serve it and it
    /// was not dropped).
    pub(crate) fn follows(&self, nqn: &str) -> bool {
        self.cores != 0
            && self.subsystems.iter().any(|s| s == nqn)
            && !self.dropped.iter().any(|s| s == nqn)
    }

    /// Whether changes are staged and not finished yet.
    pub(crate) fn pending(&self) -> bool {
        !self.staged.is_empty()
    }

    /// Logs a namespace generation change the replicas account for.
    pub(crate) fn note(&mut self, before: u64, after: u64) {
        if before == after {
            return;
        }
        if self.log.len() == LOG_LEN {
            self.log.remove(0);
        }
        self.log.push((before, after));
    }

    /// Logs a change confined to `nqn`, which is dropped (no longer adopted).
    pub(crate) fn note_only(&mut self, nqn: &str, before: u64, after: u64) {
        if before == after {
            return;
        }
        self.drop_subsystem(nqn);
        self.note(before, after);
    }

    /// Stops adopting `nqn`: the watchers end its adopted queues and forward later ones.
    pub(crate) fn drop_subsystem(&mut self, nqn: &str) {
        self.fn_changed(nqn);
        if !self.dropped.iter().any(|s| s == nqn) {
            self.dropped.push(String::from(nqn));
        }
    }

    /// Tells the functions' hub that subsystem `nqn` changed or went (every time: a
    /// subsystem is dropped once, its functions may come and go).
    pub(crate) fn fn_changed(&mut self, nqn: &str) {
        if self.functions {
            self.fn_events.push(FnEvent::Changed(String::from(nqn)));
        }
    }

    /// Whether the target's namespace generation went from `from` to `to` only by changes
    /// the replicas account for (logged with [`Replication::note`]). Every watcher asks
    /// with its own `from`: nothing is forgotten by asking.
    pub(crate) fn explains(&self, from: u64, to: u64) -> bool {
        let mut cur = from;
        let mut steps = 0;
        while cur != to && steps <= self.log.len() {
            match self.log.iter().find(|(b, _)| *b == cur) {
                Some(&(_, a)) => cur = a,
                None => break,
            }
            steps += 1;
        }
        cur == to
    }

    /// Stages a change of `subsystem` (core 0 applies it once every core did).
    pub(crate) fn stage(
        &mut self,
        subsystem: &str,
        op: ReplicaOp,
        config: Option<NamespaceConfig>,
    ) {
        self.next_seq += 1;
        self.staged.push_back(Staged {
            change: ReplicaChange {
                seq: self.next_seq,
                subsystem: String::from(subsystem),
                op,
            },
            config,
            sent_at: None,
            acks: 0,
            failed: false,
        });
    }

    /// The staged changes not yet sent, to send now to every core of `cores` (a bit each);
    /// each then waits for their acks.
    pub(crate) fn take_unsent(&mut self, now_ns: u64, cores: u64) -> Vec<ReplicaChange> {
        let mut out = Vec::new();
        for s in self.staged.iter_mut().filter(|s| s.sent_at.is_none()) {
            s.sent_at = Some(now_ns);
            s.acks = cores;
            out.push(s.change.clone());
        }
        out
    }

    /// Core `core`'s answer to change `seq`.
    pub(crate) fn ack(&mut self, seq: u64, core: u16, ok: bool) {
        if let Some(s) = self.staged.iter_mut().find(|s| s.change.seq == seq) {
            s.acks &= !(1u64 << (core & 63));
            s.failed |= !ok;
        }
    }

    /// The oldest staged change if it is done (in order: a removal and the add of the same
    /// NSID after it finish in that order): every core acked, one refused, or the wait
    /// timed out.
    pub(crate) fn take_done(&mut self, now_ns: u64) -> Option<(Staged, Outcome)> {
        let s = self.staged.front()?;
        let sent = s.sent_at?;
        let outcome = if s.failed {
            Outcome::Refused
        } else if s.acks == 0 {
            Outcome::Replicated
        } else if now_ns.saturating_sub(sent) >= ACK_TIMEOUT_NS {
            Outcome::TimedOut
        } else {
            return None;
        };
        self.staged.pop_front().map(|s| (s, outcome))
    }
}
