//! Controllers split across cores: the core that holds a controller (its admin queue, its
//! state) validates an I/O queue's Connect and hands the result, an [`Adoption`], to the
//! core whose connection carries that queue; there a *replica* of the controller serves the
//! queue's I/O entirely from its own [`Target`] (built from the same subsystem and namespace
//! configuration), with no message per command.
//!
//! A replica controller has I/O queues only: no admin queue, no keep-alive (the holder keeps
//! it, told of the queue's traffic by the transport), no features of its own. It goes away
//! with its last I/O queue; losing one without Disconnect ends only that queue here (the
//! holder ends the association and tells every core).

use crate::QueueId;
use crate::config::*;
use crate::target::*;
use alloc::string::String;
use keel_nvme::regs::{Cc, Csts};

/// What a core needs to serve an I/O queue of a controller another core holds: the
/// controller's subsystem and CNTLID, and the queue as Connect created it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adoption {
    /// The controller's subsystem.
    pub subnqn: String,
    /// The controller.
    pub cntlid: u16,
    /// The I/O queue (1-based).
    pub qid: u16,
    /// Its size, 0's based.
    pub sqsize: u16,
    /// The host disabled SQ flow control at Connect.
    pub sqflow_disabled: bool,
    /// The controller's I/O queues (its Number of Queues): a core's part of the controller's
    /// flows in a capped domain shared across cores is its queues out of these
    /// ([`Target::capped_domains`]).
    pub nr_io_queues: u16,
    /// The controller's rate limits, whole (its host's `[[qos.host]]` rule, or those set with
    /// [`Target::set_controller_limits`]): the replica's controller limiter has them, and the
    /// holder and every replica split them by demand ([`Target::shared_limits`] lists the
    /// limiter under [`crate::controller_key`]).
    pub limits: QosLimits,
}

/// An entry a replica controller logged in its Error Information log, for the controller
/// it replicates: the host reads the log through the holder's admin queue, so the holder's
/// log must have every queue's errors (NVMe base 2.0 §5.16.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaError {
    /// The controller.
    pub cntlid: u16,
    /// Its subsystem ([`subsystem_key`] of the NQN): a CNTLID reused by a later controller
    /// of another subsystem does not get the entry.
    pub subsystem: u64,
    /// The entry (its Error Count is the holder's to assign).
    pub entry: keel_nvme::log::ErrorLogEntry,
}

/// What a replica controller that ended (its last adopted queue closed or was taken back)
/// admitted through its part of its holder's limits ([`Target::take_retired_counters`]): the
/// holder adds it to its own limiter's counters ([`Target::add_retired_counters`]), so the
/// merged QoS counters of status and `/metrics` keep it once the replica no longer
/// publishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetiredCounters {
    /// The limiter's key in the split across cores ([`crate::controller_key`]).
    pub key: u32,
    /// What it admitted and how long it held commands back.
    pub counts: keel_qos::LimiterStats,
}

/// An Abort of a command on a queue another core serves, parked on the holder until that
/// core's verdict ([`Target::take_abort_requests`], [`Target::abort_verdict_from_elsewhere`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RemoteAbort {
    /// Names it between the cores.
    pub token: u32,
    /// The controller and its CNTLID (the Abort completes on its admin queue).
    pub ci: usize,
    pub cntlid: u16,
    /// The Abort's (CID, cookie) on the admin queue.
    pub waiter: (u16, u32),
    /// The holder's queue of the I/O queue concerned, and the command's CID there.
    pub queue: QueueId,
    pub cid: u16,
    /// Handed to the transport already.
    pub sent: bool,
}

/// A 64-bit key of a subsystem NQN (FNV-1a), the same on every core.
pub fn subsystem_key(nqn: &str) -> u64 {
    nqn.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Target {
    /// The Aborts to ask other cores for, each once: (the holder's queue of the I/O queue,
    /// the command's CID, the token to answer with). The transport finds the core serving
    /// that queue and answers with [`Target::abort_verdict_from_elsewhere`]; the Abort's
    /// completion waits until then (or until the queue closes: not aborted).
    pub fn take_abort_requests(&mut self, out: &mut dyn FnMut(QueueId, u16, u32)) {
        for a in self.remote_aborts.iter_mut().filter(|a| !a.sent) {
            a.sent = true;
            out(a.queue, a.cid, a.token);
        }
    }

    /// [`Target::take_abort_requests`] for the queues of one transport only (`owner`, as
    /// given to [`Target::open_queue_for`]): the others' stay for their transports. Costs
    /// one length test when none is parked (call it every pass).
    pub fn take_abort_requests_of(&mut self, owner: u16, out: &mut dyn FnMut(QueueId, u16, u32)) {
        for a in self
            .remote_aborts
            .iter_mut()
            .filter(|a| !a.sent && a.queue.owner == owner)
        {
            a.sent = true;
            out(a.queue, a.cid, a.token);
        }
    }

    /// The verdict of another core on the Abort `token` (`aborted`: the command ended with
    /// Command Abort Requested): the Abort completes, DW0 bit 0 clear if aborted (NVMe
    /// base 2.0 §5.1). An unknown token (answered already) is ignored.
    pub fn abort_verdict_from_elsewhere(&mut self, token: u32, aborted: bool) {
        let Some(pos) = self.remote_aborts.iter().position(|a| a.token == token) else {
            return;
        };
        let a = self.remote_aborts.swap_remove(pos);
        if let Some(ev) = crate::target::abort_verdict(
            &self.queues,
            &mut self.ctrls,
            a.ci,
            a.cntlid,
            a.waiter,
            aborted,
        ) {
            self.pending.push_back(ev);
        }
    }

    /// Parked Aborts of queue `q` (closing): answered "not aborted".
    pub(crate) fn resolve_remote_aborts_of(&mut self, q: QueueId) {
        while let Some(a) = self.remote_aborts.iter().find(|a| a.queue == q).copied() {
            self.abort_verdict_from_elsewhere(a.token, false);
        }
    }

    /// On the core serving adopted queue `q`: the holder's Abort `token` of command `cid`.
    /// `Some(aborted)` when decided at once (waiting here: aborted; not found, finished, or
    /// its backend cannot: not aborted), `None` when the backend tries: the verdict follows
    /// with the command's completion ([`Target::take_abort_verdicts`]).
    pub fn abort_for_holder(
        &mut self,
        now: Instant,
        q: QueueId,
        cid: u16,
        token: u32,
    ) -> Option<bool> {
        self.now = now;
        let Some(qi) = self.queue_index(q) else {
            return Some(false);
        };
        let Some(si) = self.queues[qi]
            .slots
            .iter()
            .position(|s| s.state != SlotState::Free && s.cid == cid)
        else {
            return Some(false);
        };
        let slot = &self.queues[qi].slots[si];
        if matches!(slot.state, SlotState::Queued | SlotState::Deferred) {
            self.abort_waiting_slot(now, qi, si);
            return Some(true);
        }
        if slot.abort_waiter.is_some() || slot.holder_abort.is_some() {
            return Some(false);
        }
        if !self.start_backend_abort(qi, si) {
            return Some(false);
        }
        self.queues[qi].slots[si].holder_abort = Some(token);
        None
    }

    /// Verdicts of the holder's Aborts decided since the last call: (token, aborted).
    pub fn take_abort_verdicts(&mut self, out: &mut dyn FnMut(u32, bool)) {
        for (token, aborted) in self.holder_verdicts.drain(..) {
            out(token, aborted);
        }
    }

    /// Hands `out` the Error Information log entries replica controllers logged since the
    /// last call, oldest first (at most a log's worth per controller: older ones were
    /// overwritten in the ring, as the holder's own log would have). Returns how many; costs
    /// one flag test when there are none (call it every pass).
    pub fn take_replica_errors(&mut self, out: &mut dyn FnMut(ReplicaError)) -> usize {
        if !core::mem::take(&mut self.replica_errors) {
            return 0;
        }
        let mut n = 0;
        for c in self.ctrls.iter_mut().flatten().filter(|c| c.replica) {
            let fresh = c.errors.count().wrapping_sub(c.exported_errors);
            if fresh == 0 {
                continue;
            }
            let subsystem = self
                .subsystems
                .get(c.subsys)
                .map_or(0, |s| subsystem_key(&s.nqn));
            let kept = (fresh as usize).min(c.errors.capacity());
            for i in (0..kept).rev() {
                if let Some(e) = c.errors.newest(i) {
                    out(ReplicaError {
                        cntlid: c.cntlid,
                        subsystem,
                        entry: *e,
                    });
                    n += 1;
                }
            }
            c.exported_errors = c.errors.count();
        }
        n
    }

    /// Keeps the counters of replica controller `c`, which is ending, for its holder (none
    /// when it admitted nothing). At most one entry per controller lifetime.
    pub(crate) fn retire_replica_counters(&mut self, c: &crate::target::Controller) {
        let Some(counts) = self.sched.limiter_stats(c.limiter) else {
            return;
        };
        if counts == keel_qos::LimiterStats::default() {
            return;
        }
        let Some(s) = self.subsystems.get(c.subsys) else {
            return;
        };
        self.retired.push(RetiredCounters {
            key: crate::controller_key(&s.nqn, c.cntlid),
            counts,
        });
    }

    /// Hands `out` the counters of the replica controllers that ended since the last call
    /// (for their holders on core 0, [`Target::add_retired_counters`]). Costs one emptiness
    /// test when there are none (call it every pass, after the pass's
    /// `crate::SharedLimit` counters were published: the ended replica's are then gone
    /// from its core's published ones, so the holder never counts them twice).
    pub fn take_retired_counters(&mut self, out: &mut dyn FnMut(RetiredCounters)) {
        if self.retired.is_empty() {
            return;
        }
        for r in self.retired.drain(..) {
            out(r);
        }
    }

    /// Adds what an ended replica of a controller admitted through its part of the
    /// controller's limits (`r.key`, [`crate::controller_key`]) to the counters of that
    /// controller's limiter here (its queues may all be back here by now); false if this
    /// target has no such controller (it ended meanwhile).
    pub fn add_retired_counters(&mut self, r: &RetiredCounters) -> bool {
        let subsystems = &self.subsystems;
        let Some(c) = self.ctrls.iter().flatten().find(|c| {
            !c.replica
                && subsystems
                    .get(c.subsys)
                    .is_some_and(|s| crate::controller_key(&s.nqn, c.cntlid) == r.key)
        }) else {
            return false;
        };
        self.sched.add_limiter_counts(c.limiter, &r.counts).is_ok()
    }

    /// Records an entry a replica of controller `e.cntlid` logged on another core in that
    /// controller's Error Information log (a new Error Count); false if no such controller
    /// of that subsystem lives here any more.
    pub fn log_replica_error(&mut self, e: &ReplicaError) -> bool {
        let subsystems = &self.subsystems;
        let Some(c) = self.ctrls.iter_mut().flatten().find(|c| {
            !c.replica
                && c.cntlid == e.cntlid
                && subsystems
                    .get(c.subsys)
                    .is_some_and(|s| subsystem_key(&s.nqn) == e.subsystem)
        }) else {
            return false;
        };
        c.errors.record(e.entry);
        true
    }

    /// The [`Adoption`] of a connected I/O queue of an NVM subsystem's controller (`None`
    /// for an admin queue, a discovery controller, or a queue not connected). A local
    /// controller's I/O queue (an emulated PCIe function's, [`Target::attach_local_io_queue`])
    /// has one too: its transport moves the queue to another core the same way.
    pub fn adoption(&self, q: QueueId) -> Option<Adoption> {
        let qi = self.queue_index(q)?;
        let ci = self.ctrl_of(qi)?;
        let c = self.ctrls[ci].as_ref()?;
        let queue = &self.queues[qi];
        if queue.qid == 0 || c.subsys == DISCOVERY {
            return None;
        }
        Some(Adoption {
            subnqn: self.subsystems.get(c.subsys)?.nqn.clone(),
            cntlid: c.cntlid,
            qid: queue.qid,
            sqsize: queue.sqsize,
            sqflow_disabled: queue.sqflow_disabled,
            nr_io_queues: c.nr_io_queues,
            limits: self
                .sched
                .limiter_base(c.limiter)
                .unwrap_or(QosLimits::NONE),
        })
    }

    /// Queue `q`'s I/O is served by another core from now on (its [`Adoption`] was handed
    /// over; `false`: it came back): it does not count among this target's queues of its
    /// controller when the controller's flows' demand is split across cores
    /// ([`Target::split_demand`]), and an Abort of one of its commands is asked of that core
    /// ([`Target::take_abort_requests`]) instead of answered "not aborted". When it comes
    /// back, the Aborts of its commands still parked (asked of that core or not) are
    /// answered "not aborted" at once; a verdict that core gives later is ignored.
    pub fn served_elsewhere(&mut self, q: QueueId, elsewhere: bool) {
        if let Some(qi) = self.queue_index(q) {
            self.queues[qi].elsewhere = elsewhere;
            if !elsewhere && !self.remote_aborts.is_empty() {
                self.resolve_remote_aborts_of(q);
            }
        }
    }

    /// Makes `q` (opened, not yet connected) I/O queue `a.qid` of a replica of controller
    /// `a.cntlid` of subsystem `a.subnqn`, as if its Connect (answered elsewhere, which
    /// consumed its first submission queue entry) had run here. The replica is created with
    /// the first queue adopted for it.
    pub fn adopt_io_queue(
        &mut self,
        now: Instant,
        q: QueueId,
        a: &Adoption,
    ) -> Result<(), TargetError> {
        self.now = now;
        let qi = self.queue_index(q).ok_or(TargetError::UnknownQueue)?;
        if self.queues[qi].state != QState::Open {
            return Err(TargetError::UnknownQueue);
        }
        let si = self
            .subsys_index(&a.subnqn)
            .filter(|&si| si != DISCOVERY)
            .ok_or(TargetError::UnknownSubsystem)?;
        if a.sqsize == 0 || a.sqsize > self.cap().mqes() {
            return Err(TargetError::UnknownQueue);
        }
        let found = self.ctrls.iter().position(
            |c| matches!(c, Some(c) if c.replica && c.cntlid == a.cntlid && c.subsys == si),
        );
        let ci = match found {
            Some(ci) => ci,
            None => {
                let ci = self
                    .ctrls
                    .iter()
                    .position(Option::is_none)
                    .ok_or(TargetError::TooManyControllers)?;
                // No admin queue: an index no queue has (destroying the replica skips it).
                let admin_q = QueueId {
                    index: u16::MAX,
                    generation: 0,
                    owner: q.owner,
                };
                let mut c = self.new_controller(
                    a.cntlid,
                    si,
                    String::new(),
                    [0; 16],
                    false,
                    admin_q,
                    0,
                    now,
                );
                c.replica = true;
                // Enabled and ready: the holder's controller is (its Connect succeeded).
                c.cc = Cc(1);
                let mut csts = Csts(0);
                csts.set_rdy(true);
                c.csts = csts;
                self.ctrls[ci] = Some(c);
                self.ensure_flows(ci);
                ci
            }
        };
        let taken = self.ctrls[ci].as_ref().is_none_or(|c| {
            (a.qid as usize)
                .checked_sub(1)
                .and_then(|i| c.io_qs.get(i))
                .is_none_or(Option::is_some)
        });
        if taken {
            if self.ctrls[ci]
                .as_ref()
                .is_some_and(|c| c.io_qs.iter().all(Option::is_none))
            {
                self.destroy_controller(ci, None);
            }
            return Err(TargetError::UnknownQueue);
        }
        if let Some(Some(c)) = self.ctrls.get_mut(ci) {
            c.nr_io_queues = c.nr_io_queues.max(a.nr_io_queues);
            // The holder's limits for the controller (a later adoption carries them as they
            // are then: a live change of the host's rule reaches the replica with it).
            let l = c.limiter;
            if self.sched.limiter_base(l).is_some_and(|b| b != a.limits) {
                let _ = self.sched.set_limits(l, a.limits, now.as_nanos());
            }
        }
        self.install_io_queue(ci, qi, a.qid, a.sqsize, a.sqflow_disabled);
        self.queues[qi].sqhd = 1 % (a.sqsize + 1);
        Ok(())
    }

    /// Records traffic on controller `cntlid` seen by another core (its I/O queues there):
    /// traffic-based keep-alive (NVMe base 2.0 §3.9, TBKAS) counts it.
    pub fn touch_controller(&mut self, cntlid: u16, now: Instant) {
        if let Some(c) = self
            .ctrls
            .iter_mut()
            .flatten()
            .find(|c| c.cntlid == cntlid && !c.replica)
        {
            c.last_activity = now;
        }
    }

    /// The LBA data size (log2 of the block size) of namespace `nsid` as the controller of
    /// queue `q` sees it; `None` when `nsid` is not an active namespace of its subsystem. A
    /// transport that sizes a command's data before submitting it and has no admin queue to
    /// send Identify on (an emulated PCIe function's I/O queue served by a replica) asks here.
    pub fn lba_shift(&self, q: QueueId, nsid: u32) -> Option<u8> {
        let qi = self.queue_index(q)?;
        let ci = self.ctrl_of(qi)?;
        let c = self.ctrls[ci].as_ref()?;
        let s = self.subsystems.get(c.subsys)?;
        let ns = s.namespaces.get(s.find_ns(nsid)?)?.as_ref()?;
        let bs = ns.geometry.block_size;
        (bs.is_power_of_two() && (512..=65536).contains(&bs)).then(|| bs.trailing_zeros() as u8)
    }

    /// A number that changes whenever a namespace or a subsystem is added or removed (a
    /// replica built from the configuration before is then out of date).
    pub fn namespace_generation(&self) -> u64 {
        self.ns_generation
    }
}
