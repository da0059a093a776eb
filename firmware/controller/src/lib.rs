//! The NVMe controller core behind every Keel transport.
//!
//! NVMe/TCP today and an emulated PCIe NVMe function later both feed commands into one
//! [`Target`]; admin and I/O semantics live only here. The crate is sans-IO: it never reads a
//! clock (every entry point takes an [`Instant`]), performs no I/O and does not log on the I/O
//! path. Backends are [`keel_storage::BlockBackend`]s that complete asynchronously.
//!
//! # Calling protocol (for transports)
//!
//! 1. Configure once: [`Target::new`] with a [`TargetConfig`] (subsystems, namespaces,
//!    allowed hosts, listen ports for the discovery log, [`Limits`], [`TransportParams`]).
//!    [`Target::set_ports`] replaces the ports later (address from DHCP);
//!    [`Target::add_namespace`] / [`Target::remove_namespace`] change a subsystem live and
//!    raise Namespace Attribute Changed events.
//! 2. Per connection: [`Target::open_queue`] gives a [`QueueId`] ([`Target::open_queue_for`]
//!    records which transport owns it: every [`Event`] names its owner, [`Event::owner`], so
//!    a poll loop serving several transports routes each event directly); the first command
//!    must be a fabrics Connect. [`Target::queue_info`] then tells the queue's QID, SQSIZE and whether
//!    the host disabled SQ flow control.
//! 3. Per command: [`Target::submit`] with a [`Request`]: the SQE, an optional [`IoBuf`]
//!    (write data already in it, or room for read data / returned structures), `data_len`
//!    = the transfer length the host's SGL/PRPs describe, and a `cookie` of the transport's
//!    choosing. It returns `Some(Response)` when the answer is immediate, `None` when the
//!    command is pending. The [`Response`] always returns the buffer; `data_len` bytes of it
//!    are read data to send to the host.
//! 4. In the poll loop: [`Target::poll`] delivers [`Event::Completion`] for pending commands,
//!    [`Event::QueueTerminated`] when the controller ends a queue (keep-alive expiry,
//!    Disconnect, controller reset): close the connection then, and
//!    [`Event::BufferReleased`] for buffers of commands whose queue went away.
//! 5. When a connection goes away: [`Target::close_queue`]. Losing the admin queue ends the
//!    controller; losing an I/O queue without Disconnect ends the association (as Linux's
//!    target does); commands in flight are dropped and their buffers come back as
//!    [`Event::BufferReleased`].
//!
//! For a memory-based transport (the PCIe function), [`Target::create_local_controller`]
//! makes a controller without Connect; registers are reached with [`Target::property_get`] /
//! [`Target::property_set`], and the transport implements Create/Delete I/O SQ/CQ itself by
//! calling [`Target::attach_local_io_queue`] / [`Target::close_queue`] (those opcodes are
//! answered Invalid Opcode if they reach the core).
//!
//! No allocation happens per I/O: each I/O queue gets SQSIZE + 1 command slots at Connect,
//! each controller its Error Information log ring at creation, and a busy backend's refusals
//! are parked in the slot and retried by `poll`. Commands that run as several backend
//! requests (Dataset Management, Copy, Write Zeroes on a backend without it) do so from their
//! slot, one request at a time, with scratch buffers from [`TargetConfig::scratch`].
//!
//! The firmware hands in what it knows of the device's life with [`Target::set_health`]
//! (power cycles, unsafe shutdowns, powered-on time) for the SMART / Health log.
//!
//! # Specification coverage
//!
//! - NVMe-oF 1.1 §3.3 Connect (dynamic controller model, CNTLID 1..=FFEFh, IATTR/IPO in DW0
//!   of Connect Invalid Parameters, Connect Invalid Host, Controller Busy, Incompatible
//!   Format), §3.4/§3.5 Property Get/Set (CAP, VS, CC, CSTS; 4/8-byte sizes), §3.6
//!   Disconnect, §5 discovery service with the Discovery log page (70h).
//! - NVMe base 2.0 §3.1.3 / §3.6.1-3.6.2: CC.EN → CSTS.RDY, CC.EN 1→0 controller reset,
//!   CC.SHN → CSTS.SHST complete once outstanding commands drain.
//! - NVMe base 2.0 §5.2 Asynchronous Event Request (AERL + 1 outstanding, Namespace
//!   Attribute Changed and Discovery Log Page Change notices, masked until the log page is
//!   read), §5.1 Abort (AERs and deferred commands at once; commands at a backend through
//!   [`keel_storage::BlockBackend::abort`], the Abort completing after them with DW0 bit 0
//!   telling whether they were aborted; ACL 3), §5.16 Get Log Page (01h Error Information:
//!   see `errlog`; 02h SMART / Health, controller-wide or per namespace (LPA bit 0); 03h,
//!   04h, 05h, 70h; LPOL/LPOU and NUMDL/NUMDU honoured), §5.17 Identify (CNS 00h, 01h, 02h,
//!   03h), §5.27 Set/Get Features (01h, 06h, 07h, 0Bh, 0Fh; SEL), §5.25 Keep Alive with
//!   traffic-based keep-alive (§3.9) enforced at KATO + grace.
//! - NVM Command Set 1.0 §3.2-3.3: Read, Write (FUA), Compare, Flush, Write Zeroes (DEAC;
//!   zero-filled writes where the backend has none, e.g. AES-XTS), Dataset Management
//!   (deallocate), Verify; NVM Command Set 2.0 §3.3.1 Copy (source range format 0h, within a
//!   namespace, MSSRL/MCL/MSRC, Command Size Limit Exceeded); LBA Out of Range, Invalid
//!   Namespace or Format, Data SGL Length Invalid, Invalid Command Opcode, Command Sequence
//!   Error, Command ID Conflict. DLFEAT reports deallocated blocks as zeroes only where the
//!   backend returns zeroes for them.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

mod admin;
mod chain;
mod config;
mod errlog;
mod fabrics;
mod io;
mod qos;
mod replica;
mod target;
mod view;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_features;
#[cfg(test)]
mod tests_now;
#[cfg(test)]
mod tests_qos;
#[cfg(test)]
mod tests_replica;

pub use config::{
    ConfigError, DeviceHealth, Event, HostQos, Identity, Instant, Limits, NamespaceConfig,
    NamespaceQos, PortEntry, QosGroup, QosLimits, QueueId, QueueInfo, QueueLoss, Rate, Request,
    Response, SubsystemConfig, TargetConfig, TargetError, TransportParams,
};
pub use fabrics::VERSION;
pub use io::NowData;
pub use keel_nvme::fabrics::PropertySize;
pub use keel_storage::IoBuf;
pub use qos::{CappedDomain, DEMAND_UNIT, SharedLimit, controller_key, group_key, limit_key};
pub use replica::{Adoption, ReplicaError, RetiredCounters};
pub use target::Target;
pub use view::{ControllerView, GroupView, NamespaceView, QosCounters, SubsystemView};
