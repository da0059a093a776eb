//! Per-tenant quality of service for Keel's block layer: limits and fair sharing.
//!
//! Operators put storage on a DPU so that one tenant cannot hurt another. This crate holds the
//! policy, sans-IO: time is passed in as nanoseconds of the monotonic clock, nothing blocks,
//! nothing allocates per command (tables grow only when flows, limiters or queues are
//! created), no locks.
//!
//! - [`bucket`]: token buckets refilled from the clock, charged the full cost of a request
//!   (debt instead of time slices: one large I/O cannot overrun a limit, and limits below
//!   1000 IOPS work); exact 64-bit arithmetic, no division per command.
//! - [`limiter`]: the six limits of a namespace, controller or group (IOPS and bandwidth,
//!   reads, writes and combined, each with its burst), with a short way through while no
//!   limit is near.
//! - [`intake`]: arrival order across queues for work waiting for a shared resource (the
//!   NVMe/TCP buffer pool): the oldest waiter of all connections goes first.
//! - [`sched`]: FIFO intake per flow, limiters, and start-time fair queuing among the flows
//!   sharing one backend, weighted and work-conserving.
//! - [`split`]: a rate limit split across the schedulers (cores) that enforce it together,
//!   by their demand.
//!
//! References: token bucket (RFC 2697's single-rate form, without colours); start-time fair
//! queuing (Goyal, Vin, Cheng, SIGCOMM 1996) for the weighted sharing. SPDK's bdev QoS is the
//! comparison: it refills per 1 ms time slice, lets one large I/O overrun a slice, and has no
//! burst, no read/write split, no groups and a 1000 IOPS minimum; none of that applies here.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod bucket;
pub mod intake;
pub mod limiter;
pub mod sched;
pub mod split;

pub use bucket::{Bucket, Rate};
pub use intake::Intake;
pub use limiter::{Cost, Dir, Limiter, Limits};
pub use sched::{
    Admit, DomainId, FlowId, FlowStats, LimiterId, LimiterStats, SchedError, Scheduler, Share,
    cap_share,
};
pub use split::{limits_share, rate_share, rescale_part};
