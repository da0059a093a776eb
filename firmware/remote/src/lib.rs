//! # keel-remote: remote NVMe/TCP volumes, sans-IO
//!
//! A remote volume is one namespace of a remote NVMe/TCP subsystem served by Keel as if it
//! were local: a [`keel_storage::BlockBackend`] ([`RemoteBackend`]) whose requests become NVMe
//! commands on `keel_nvmf_tcp::HostConnection`s, over one or more paths (addresses of the
//! subsystem), with keep-alive, reconnect, retry and ANA multipath.
//!
//! ## Layering and seams
//! The crate never touches sockets, clocks or hardware:
//! - **Network**: the [`Net`] trait (connect, state, recv, send, close of TCP client
//!   sockets). The firmware implements it over smoltcp client sockets (see [`Net`] for the
//!   mapping); the tests over an in-memory network wired to real Keel targets.
//! - **Time**: every call that advances anything takes `now_ns`. [`RemoteVolume::poll`] runs
//!   the association state machines, timers, dispatch and transmission;
//!   [`RemoteVolume::next_deadline`] says when it must run next at the latest (for a poll loop
//!   that sleeps).
//! - **Block layer**: [`RemoteVolume::backend`] hands out the volume's `BlockBackend` once the
//!   namespace has been identified through some path (its size and capabilities are known
//!   only then). Like `keel_nvme_driver::DriveBackend`, the backend and the volume share one
//!   state (`Rc<RefCell<_>>`): `submit` queues a request and hands its command to a
//!   connection (which sends it at the next `RemoteVolume::poll`); the backend's `poll`
//!   delivers finished requests.
//!
//! What the firmware glue does per pass: feed the NIC, then `RemoteVolume::poll(now, net)`
//! (after the controller core submitted this pass's requests, so the capsules leave in the
//! same pass), and the controller core's `Target::poll` collects completions through the
//! backend. Configuration ([`RemoteConfig`]) carries the paths, NQNs, NSID, digests, queues,
//! KATO and the loss timers with Linux's defaults; [`RemoteVolume::snapshot`] gives state and
//! counters for `keelctl status` and `/metrics`; [`RemoteVolume::reconnect`] revives paths
//! that gave up (a management action).
//!
//! ## For the firmware glue (not done here)
//! - Device description: `backend = { remote = { nqn, paths = ["a.b.c.d:port", ...], nsid,
//!   queues, depth, ... } }` maps onto [`RemoteConfig`] (`PathAddr` parses `a.b.c.d:port`);
//!   the host NQN/ID come from the device identity.
//! - `Net` over smoltcp: a pool of client sockets with their own buffers (the NVMe/TCP
//!   listener pool is separate), ephemeral local ports, abort on close.
//! - The poll loop: `RemoteVolume::poll(now_ns, &mut net)` every pass after the NIC and the
//!   transports ran; `next_deadline` bounds the WFI sleep; once `backend()` returns the
//!   backend, `Target::add_namespace` exports it (wrapped in AES-XTS and/or a slice like any
//!   backend); `snapshot()` feeds `keelctl status` and `/metrics` (per path: state, ANA
//!   state, commands in flight, connects, losses, errors).
//! - Several cores: the volume on the controller core owns every path's association; each
//!   other core may run a *lane* over it (below).
//!
//! ## Lanes (several cores)
//! ARCHITECTURE.md's per-core split: admin queue, keep alive, ANA and reconnects on the
//! controller core; each data core its own I/O connections to every association. The owner
//! is a volume whose [`RemoteConfig::lanes`] counts the other cores; it asks the remote for
//! `lane_queues` more I/O queues per lane and tells each lane, through [`LaneUpdate`]s, which
//! CNTLID and QIDs to connect with. A lane ([`RemoteVolume::lane`]) is a volume without admin
//! queues on its core's own network stack, seeded with the namespace the owner identified
//! ([`LaneSeed`]); it reports the loss of any of its queues ([`LaneLoss`]) and the owner ends
//! and re-creates the association for everyone. See [`lane`] for the rules.
//!
//! ## Association (per path)
//! NVMe/TCP 1.0 §3.3 (ICReq/ICResp) on a fresh connection, then on the admin queue (NVMe-oF
//! 1.1 §3.3, §3.4-3.5; NVMe base 2.0 §3.5.1): Connect (dynamic controller, KATO), Property
//! Get CAP, Property Set CC.EN = 1, Property Get CSTS until RDY (bounded by CAP.TO), Identify
//! Controller (MDTS, IOCCSZ, ONCS, VWC, CMIC, OAES, CTRATT, ANA fields), Set Features Number of
//! Queues, Set Features Asynchronous Event Configuration (ANA change notices, when offered),
//! Identify Namespace (size, block size, ANAGRPID), Get Log Page ANA (0Ch, groups only) when
//! the controller reports ANA, an Asynchronous Event Request, and one connection per I/O queue
//! with its own Connect (SQSIZE = depth, capped by CAP.MQES and MAXCMD). The sequence is the
//! one `keelctl`'s initiator (`host-tools/src/nvme/ctrl.rs`) and Linux's `nvme-tcp` follow.
//!
//! Keep Alive (NVMe base 2.0 §3.9) goes every KATO/2, or KATO/4 with traffic based keep
//! alive, skipped then when commands completed meanwhile (Linux
//! `nvme_keep_alive_work_period`). A Keep Alive without answer for KATO, an I/O command
//! outstanding for `io_timeout`, a failed or closed connection, a transport error, or ANA
//! Change lasting longer than ANATT ends the association: every socket of the path is closed,
//! completions that already arrived count, and the commands in flight go back to the queue.
//! The path tries again every `reconnect_delay` until `ctrl_loss_tmo` after it went down, then
//! gives up (Linux `nvmf_should_reconnect`); a setup status with Do Not Retry (e.g. Connect
//! Invalid Host) or a namespace that does not match the other paths' makes it give up at once.
//!
//! ## Requests
//! Read, Write (FUA), Compare, Flush, Write Zeroes (deallocate, FUA) and Deallocate (Dataset
//! Management, one range) map one to one onto NVM Command Set 1.0 commands. Write data goes
//! in-capsule up to the remote's IOCCSZ and through R2T/H2CData above it (the transport does
//! both, split at MAXH2CDATA). Data moves between the wire and the caller's own `IoBuf` with
//! no copy in this crate: the buffer travels by value into the connection together with the
//! command's byte window (`Data::Io`) and comes back with the completion.
//!
//! A request larger than the remote's MDTS (or the 65536-block NLB limit) is sent as several
//! commands **one after another**: the buffer can be lent to one command at a time without
//! copying it or splitting it in unsafe code. The request completes after its last part, or
//! with the first error (later parts are not sent). Keel's own front-ends transfer at most
//! 128 KiB per command, which Keel and SPDK targets (MDTS 128 KiB) and Linux's nvmet (no
//! MDTS) take whole, so splitting is the exception; sending parts in parallel would need
//! `HostConnection` to take a buffer accessor instead of owning the buffer.
//!
//! Error handling follows Linux's host (`nvme_decide_disposition`, `nvme_failover_req`):
//! - success: the part is done;
//! - a path related status (SCT 3h) without DNR: failover, the request goes back to the queue
//!   for another usable path (not counted as a retry); an ANA status also marks the path's
//!   ANA state at once and re-reads the ANA log;
//! - another status without DNR: retried up to `max_retries` times (command retry delays are
//!   not honoured);
//! - DNR, or retries exhausted: the request fails with the status mapped onto a
//!   `BlockError`.
//!
//! Commands in flight when their association ends are retried on the next association or
//! another path, without limit, until the request has been waiting for a usable path for
//! `ctrl_loss_tmo` (or `fast_io_fail_tmo`): then it fails with `BlockError::PathError`, which
//! the controller core reports as Controller Pathing Error with DNR. When every path has given
//! up, queued and new requests fail at once with that error. So every accepted request
//! completes exactly once, success only when the remote acknowledged every part; the latest a
//! request can complete is `ctrl_loss_tmo` after it started waiting for a path, plus one
//! `io_timeout` if it is in flight at that moment. Not modelled: Linux's `REQ_FAILFAST_*`
//! per-request flags (a `BlockRequest` carries none), and the command quiesce time (CQT) a
//! host may wait before retrying a write that was in flight on a lost association.
//!
//! ## Multipath
//! Paths are independent associations; their ANA state (NVMe base 2.0 §8.1.3: optimized,
//! non-optimized, inaccessible, persistent loss, change) comes from the ANA log read at
//! association start, on an ANA change notice (an Asynchronous Event Request is kept
//! outstanding) and after a command failed with an ANA status. A path is usable when live and
//! optimized or non-optimized; non-optimized paths carry I/O only when no optimized path is
//! usable. Policies ([`Policy`]): round-robin and queue-depth, as Linux's `iopolicy`. A path
//! that dies hands its commands to the usable paths at once (failover) and takes new I/O again
//! as soon as it is live and accessible (failback).
//!
//! ## Hot path
//! No allocation and no log line per request: the request table, the ready queue and the
//! completion queue are sized at construction (`max_requests`), each I/O queue has a command
//! table indexed by CID, and the transport's connections allocate at association setup only.
//! Log lines are written on association changes.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod config;
mod data;
pub mod lane;
pub mod net;
mod path;
pub mod stats;
mod volume;

use alloc::rc::Rc;
use core::cell::RefCell;
use core::fmt;
use keel_storage::{
    BlockBackend, BlockCompletion, BlockRequest, Capabilities, Geometry, RejectReason, Rejected,
};
use volume::Volume;

pub use config::{ConfigError, PathAddr, Policy, RemoteConfig};
pub use lane::{Grant, LaneLoss, LaneSeed, LaneUpdate};
pub use net::{Net, SockState};
pub use stats::{
    LossReason, PathCounters, PathSnapshot, PathState, QueueState, QueueView, Snapshot,
    VolumeCounters, VolumeLoad, VolumeState,
};

/// A remote volume: what the poll loop keeps and polls.
pub struct RemoteVolume<S> {
    inner: Rc<RefCell<Volume<S>>>,
}

impl<S> fmt::Debug for RemoteVolume<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.inner.try_borrow() {
            Ok(v) => fmt::Debug::fmt(&*v, f),
            Err(_) => f.write_str("RemoteVolume (busy)"),
        }
    }
}

impl<S: Copy + Eq + fmt::Debug> RemoteVolume<S> {
    /// A volume; its paths start connecting at the first [`RemoteVolume::poll`]. Allocates
    /// its request table here.
    pub fn new(cfg: RemoteConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            inner: Rc::new(RefCell::new(Volume::new(cfg)?)),
        })
    }

    /// One pass at time `now_ns` over every path: sockets, association setup, keep alive,
    /// timeouts, reconnects, ANA, dispatch of queued requests, transmission. Returns whether
    /// anything happened.
    pub fn poll<N: Net<Sock = S>>(&self, now_ns: u64, net: &mut N) -> bool {
        self.inner
            .try_borrow_mut()
            .is_ok_and(|mut v| v.poll(now_ns, net))
    }

    /// Lane `lane` (1-based) of the volume configured as `cfg` on another core, serving the
    /// namespace its owner identified ([`RemoteVolume::lane_seed`]). Its paths connect when
    /// [`RemoteVolume::apply_lane_update`] says their association is up. Allocates its
    /// request table here.
    pub fn lane(cfg: RemoteConfig, lane: u16, seed: LaneSeed) -> Result<Self, ConfigError> {
        Ok(Self {
            inner: Rc::new(RefCell::new(Volume::new_lane(cfg, lane, seed)?)),
        })
    }

    /// The owner's: from its next association on, asks the remote for I/O queues for
    /// `lanes` lanes too (lane `k` gets the `k`-th share, see [`lane`]); 0: none. Set it
    /// before the first [`RemoteVolume::poll`] so the first association has them. Ignored
    /// on a lane, or when the total would exceed what a configuration may ask for.
    pub fn set_lanes(&self, lanes: u16) {
        if let Ok(mut v) = self.inner.try_borrow_mut() {
            v.set_lanes(lanes);
        }
    }

    /// The owner's: what lanes are seeded with, once the namespace is identified.
    pub fn lane_seed(&self) -> Option<LaneSeed> {
        self.inner.try_borrow().ok()?.lane_seed()
    }

    /// The owner's: changes whenever [`RemoteVolume::lane_updates`] would say something new
    /// (a path came up, went down, gave up or changed ANA state).
    pub fn lane_version(&self) -> u64 {
        self.inner.try_borrow().map_or(0, |v| v.lane_version())
    }

    /// The owner's: every path as lane `lane` (1-based) must see it, appended to `out`.
    pub fn lane_updates(&self, lane: u16, out: &mut alloc::vec::Vec<LaneUpdate>) {
        if let Ok(v) = self.inner.try_borrow() {
            v.lane_updates(lane, out);
        }
    }

    /// The owner's: a lane lost a queue of one of its associations (see [`lane`]).
    pub fn lane_lost<N: Net<Sock = S>>(&self, loss: LaneLoss, now_ns: u64, net: &mut N) {
        if let Ok(mut v) = self.inner.try_borrow_mut() {
            v.lane_lost(loss, now_ns, net);
        }
    }

    /// A lane's: applies its owner's update of a path.
    pub fn apply_lane_update<N: Net<Sock = S>>(&self, u: LaneUpdate, now_ns: u64, net: &mut N) {
        if let Ok(mut v) = self.inner.try_borrow_mut() {
            v.apply_lane_update(u, now_ns, net);
        }
    }

    /// A lane's: the next queue loss to tell its owner about.
    pub fn take_lane_loss(&self) -> Option<LaneLoss> {
        self.inner.try_borrow_mut().ok()?.take_lane_loss()
    }

    /// The block backend, once a path has identified the namespace; handed out once (the
    /// volume has one completion queue).
    pub fn backend(&self) -> Option<RemoteBackend<S>> {
        let mut v = self.inner.try_borrow_mut().ok()?;
        let ns = v.ns()?;
        if v.backend_taken {
            return None;
        }
        v.backend_taken = true;
        Some(RemoteBackend {
            inner: self.inner.clone(),
            geometry: ns.geometry,
            caps: ns.caps,
        })
    }

    /// Size of the namespace, once identified.
    pub fn geometry(&self) -> Option<Geometry> {
        self.inner.try_borrow().ok()?.ns().map(|n| n.geometry)
    }

    /// What the namespace supports, once identified.
    pub fn capabilities(&self) -> Option<Capabilities> {
        self.inner.try_borrow().ok()?.ns().map(|n| n.caps)
    }

    /// Every I/O queue of every path, with its QID, state and counters (on an owner its own
    /// queues, on a lane the lane's); queues an earlier association had and the current one
    /// lacks are reported down. Allocates nothing: a core may publish them every pass.
    pub fn for_each_queue(&self, f: &mut dyn FnMut(QueueView)) {
        if let Ok(v) = self.inner.try_borrow() {
            v.for_each_queue(f);
        }
    }

    /// Its requests' counts and counters (on a lane, the lane's own): allocates nothing, so
    /// a core may publish them every pass.
    pub fn load(&self) -> Option<VolumeLoad> {
        Some(self.inner.try_borrow().ok()?.load())
    }

    /// State and counters (allocates; management path).
    pub fn snapshot(&self) -> Option<Snapshot> {
        Some(self.inner.try_borrow().ok()?.snapshot())
    }

    /// Ends the volume: every association is dropped (sockets closed; no orderly NVMe
    /// shutdown) and every request, in flight, queued or submitted later, fails with
    /// `BlockError::PathError`. [`RemoteVolume::reconnect`] undoes it.
    pub fn shutdown<N: Net<Sock = S>>(&self, now_ns: u64, net: &mut N) {
        if let Ok(mut v) = self.inner.try_borrow_mut() {
            v.shutdown(now_ns, net);
        }
    }

    /// Makes paths that gave up try again from `now_ns` (with a fresh `ctrl_loss_tmo`).
    pub fn reconnect(&self, now_ns: u64) {
        if let Ok(mut v) = self.inner.try_borrow_mut() {
            v.reconnect(now_ns);
        }
    }

    /// When the volume's timers next need a poll (reconnects, keep alive, timeouts); `None`
    /// when nothing is timed. Received data and new requests need a poll regardless.
    pub fn next_deadline(&self) -> Option<u64> {
        self.inner.try_borrow().ok()?.next_deadline()
    }
}

/// The volume as a [`BlockBackend`].
pub struct RemoteBackend<S> {
    inner: Rc<RefCell<Volume<S>>>,
    geometry: Geometry,
    caps: Capabilities,
}

impl<S> fmt::Debug for RemoteBackend<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteBackend")
            .field("geometry", &self.geometry)
            .field("caps", &self.caps)
            .finish()
    }
}

impl<S: Copy + Eq + fmt::Debug> BlockBackend for RemoteBackend<S> {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn submit(&mut self, req: BlockRequest) -> Result<(), Rejected> {
        match self.inner.try_borrow_mut() {
            Ok(mut v) => v.submit(req),
            Err(_) => Err(Rejected {
                reason: RejectReason::Busy,
                req,
            }),
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(BlockCompletion)) -> usize {
        keel_storage::deliver_shared(&self.inner, Volume::take_completion, done)
    }
}
