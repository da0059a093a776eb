//! Lanes: I/O queues of another core over associations one volume owns.
//!
//! The *owner* (a [`crate::RemoteVolume`] made with `RemoteConfig::lanes` > 0, on the
//! controller core) runs every path's association: admin queue, Connect, keep alive, ANA,
//! reconnects, `ctrl_loss_tmo`. It asks the remote for `lanes × lane_queues` I/O queues more
//! than its own (Set Features Number of Queues) and gives lane `k` (1-based) the QIDs
//! `own + (k - 1) × lane_queues + 1 ..`. A *lane* (a volume made with
//! [`crate::RemoteVolume::lane`], on core `k`, over that core's own network stack) has no
//! admin queue: for each path it connects its I/O queues (ICReq, Connect with the owner's
//! CNTLID and its QIDs) when the owner says the association is up ([`LaneUpdate::Up`]), and
//! serves its own requests on them with the same request table, dispatch, MDTS splitting,
//! retries, failover, I/O timeouts and waiting limits as the owner (the same code).
//!
//! What crosses between the two (the firmware carries it over its rings; everything is
//! `Copy` data):
//! - owner → lane: [`LaneSeed`] once the namespace is identified (size, capabilities), then
//!   [`LaneUpdate`]s whenever a path's association comes up, ends, gives up or changes ANA
//!   state ([`crate::RemoteVolume::lane_version`] says when to ask for them);
//! - lane → owner: [`LaneLoss`] when one of its I/O queues is lost (connection closed,
//!   transport error, I/O timeout, Connect refused). The owner then ends that association
//!   as if one of its own queues had been lost (Linux's host does the same: an I/O queue
//!   error recovers the whole controller), reconnects after `reconnect_delay`, and the lane
//!   follows with the new association's [`LaneUpdate::Up`].
//!
//! A lane's commands in flight when its queue or the association is lost go back to its
//! queue and wait for a usable path, up to `ctrl_loss_tmo` (or `fast_io_fail_tmo`), then fail
//! with a path error; when the owner's path gives up ([`LaneUpdate::Failed`]) and no path is
//! left they fail at once. A lane never completes a command the remote did not complete.

use crate::path::Info;
use crate::stats::LossReason;
use crate::volume::NsInfo;
use keel_nvme::log::ana::AnaState;

/// What a lane needs to serve the namespace before any path is up: its size and
/// capabilities as the owner identified them.
#[derive(Debug, Clone, Copy)]
pub struct LaneSeed(pub(crate) NsInfo);

/// The parameters a lane connects its I/O queues of one association with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The association's controller (Connect CNTLID).
    pub cntlid: u16,
    /// The lane's first QID.
    pub first_qid: u16,
    /// Its I/O queues (0: the remote granted too few queues for this lane).
    pub queues: u16,
    /// The path's ANA state (`None`: not reported).
    pub ana: Option<AnaState>,
    pub(crate) info: Info,
}

/// One path's association as a lane must see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneUpdate {
    /// Association `epoch` of path `path` is live: connect (or keep) the lane's I/O queues.
    Up {
        /// Index of the path in the configuration.
        path: u8,
        /// Which association (counts up on the owner).
        epoch: u32,
        /// How to connect.
        grant: Grant,
    },
    /// The path is down (association `epoch` or an attempt after it): the lane closes its
    /// queues of it and waits.
    Down {
        /// Index of the path.
        path: u8,
        /// The last association the owner had on it.
        epoch: u32,
    },
    /// The path gave up (`ctrl_loss_tmo`, a permanent error or shutdown).
    Failed {
        /// Index of the path.
        path: u8,
    },
}

/// A lane lost one of its I/O queues of association `epoch` on path `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneLoss {
    /// Index of the path.
    pub path: u8,
    /// The association the queue belonged to.
    pub epoch: u32,
    /// Why.
    pub reason: LossReason,
}
