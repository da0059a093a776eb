//! The Error Information log of a controller (NVMe base 2.0 §5.16.1.2): a fixed ring of the
//! newest entries, allocated when the controller is created.
//!
//! What is logged (decided here, compared with Linux's nvmet, which logs only the failures it
//! can attach a parameter location to): every command of a live controller that completes
//! with an error status, whether the controller core, a backend or the transport
//! ([`crate::Target::reject`]) failed it, except Command Abort Requested and Command Aborted
//! due to SQ Deletion (the host's own Abort or teardown, not errors of the command). A
//! Connect that fails has no controller to log into. Each logged command's completion has the
//! More bit set (§4.2.3.2: more status information in this log).
//!
//! Entry fields: the Error Count (64-bit, starts at 1, never reused while the controller
//! lives: fabrics controllers are created per association, so it cannot survive a power
//! cycle), SQID, CID, the Status Field, the Parameter Error Location where the failing field
//! of the command is known (FFFFh otherwise), the LBA of the first block concerned for
//! LBA-related errors and backend failures, the NSID of the command, and the Transport Type
//! for errors the transport reported (0 otherwise).

use alloc::vec::Vec;
use keel_nvme::cqe::{generic, sct};
use keel_nvme::log::ErrorLogEntry;
use keel_nvme::{Sqe, Status};

/// The ring: at most `capacity` entries, the oldest overwritten first.
#[derive(Debug)]
pub(crate) struct ErrorLog {
    entries: Vec<ErrorLogEntry>,
    /// Where the next entry goes once the ring is full.
    next: usize,
    /// Error Count of the newest entry (0: none yet).
    count: u64,
}

impl ErrorLog {
    /// A ring of `capacity` (at least 1) entries; the only allocation it ever makes.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::with_capacity(capacity.max(1)),
            next: 0,
            count: 0,
        }
    }

    /// Entries kept (ELPE + 1).
    pub fn capacity(&self) -> usize {
        self.entries.capacity()
    }

    /// Errors logged over the controller's life (the newest Error Count).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds an entry; its Error Count is assigned here.
    pub fn record(&mut self, mut e: ErrorLogEntry) {
        // Rolls over to 1, never 0 (which marks an invalid entry).
        self.count = self.count.checked_add(1).unwrap_or(1);
        e.error_count = self.count;
        if self.entries.len() < self.entries.capacity() {
            self.entries.push(e);
        } else if let Some(slot) = self.entries.get_mut(self.next) {
            *slot = e;
        }
        self.next = (self.next + 1) % self.entries.capacity();
    }

    /// Entry `i` counting from the newest (0).
    pub fn newest(&self, i: usize) -> Option<&ErrorLogEntry> {
        let n = self.entries.len();
        if i >= n {
            return None;
        }
        let newest = (self.next + self.entries.capacity() - 1) % self.entries.capacity();
        self.entries.get((newest + n - i) % n)
    }
}

/// Whether a completion with `status` goes into the Error Information log.
pub(crate) fn is_logged(status: Status) -> bool {
    let host_abort = status.sct == sct::GENERIC
        && matches!(
            status.sc,
            generic::ABORT_REQUESTED | generic::ABORTED_SQ_DELETION
        );
    !status.is_success() && !host_abort
}

/// Where a failure points: the Parameter Error Location and the LBA of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ErrAt {
    pub loc: u16,
    pub lba: u64,
}

impl ErrAt {
    /// No particular field or block.
    pub const NONE: Self = Self {
        loc: ErrorLogEntry::NOT_SPECIFIC,
        lba: 0,
    };

    /// Byte `byte`, bit `bit` of the command.
    pub const fn field(byte: u8, bit: u8) -> Self {
        Self {
            loc: ErrorLogEntry::location(byte, bit),
            lba: 0,
        }
    }

    /// Byte `byte` of the command, concerning block `lba`.
    pub const fn lba(byte: u8, lba: u64) -> Self {
        Self {
            loc: ErrorLogEntry::location(byte, 0),
            lba,
        }
    }

    /// No command field, concerning block `lba` (a backend's failure).
    pub const fn block(lba: u64) -> Self {
        Self {
            loc: ErrorLogEntry::NOT_SPECIFIC,
            lba,
        }
    }
}

/// Byte offsets of the fields failures point at (NVMe base 2.0 Figure 88; NVM Command Set
/// Figures 38, 63: SLBA in CDW10-11, NLB and the flags in CDW12).
pub(crate) mod at {
    /// CDW0 byte 0: opcode.
    pub const OPCODE: u8 = 0;
    /// CDW0 byte 1: FUSE (bits 1:0), PSDT (bits 7:6).
    pub const FLAGS: u8 = 1;
    /// CDW0 bytes 3:2: command identifier.
    pub const CID: u8 = 2;
    /// Bytes 7:4: NSID.
    pub const NSID: u8 = 4;
    /// Bytes 39:24: data pointer; the SGL Data Block descriptor's length is at byte 32.
    pub const SGL_LENGTH: u8 = 32;
    /// CDW10.
    pub const CDW10: u8 = 40;
    /// CDW11.
    pub const CDW11: u8 = 44;
    /// CDW12.
    pub const CDW12: u8 = 48;
}

/// The location a status points at when the handler named none: the field that status is
/// about for every command (opcode, NSID, CID, SGL length, FUSE) and, for LBA Out of Range on
/// commands whose SLBA is in CDW10-11, the SLBA.
pub(crate) fn default_at(sqe: &Sqe, status: Status) -> ErrAt {
    if status.sct != sct::GENERIC {
        return ErrAt::NONE;
    }
    match status.sc {
        generic::INVALID_OPCODE => ErrAt::field(at::OPCODE, 0),
        generic::INVALID_NAMESPACE_OR_FORMAT => ErrAt::field(at::NSID, 0),
        generic::COMMAND_ID_CONFLICT => ErrAt::field(at::CID, 0),
        generic::DATA_SGL_LENGTH_INVALID => ErrAt::field(at::SGL_LENGTH, 0),
        generic::LBA_OUT_OF_RANGE => {
            let slba = sqe.cdw[0] as u64 | ((sqe.cdw[1] as u64) << 32);
            ErrAt::lba(at::CDW10, slba)
        }
        _ => ErrAt::NONE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ring_keeps_the_newest_and_counts_from_one() {
        let mut r = ErrorLog::new(3);
        assert_eq!((r.capacity(), r.count()), (3, 0));
        assert!(r.newest(0).is_none());
        for cid in 1..=5u16 {
            r.record(ErrorLogEntry {
                cid,
                ..Default::default()
            });
        }
        assert_eq!(r.count(), 5);
        let got: Vec<(u64, u16)> = (0..4)
            .filter_map(|i| r.newest(i))
            .map(|e| (e.error_count, e.cid))
            .collect();
        assert_eq!(got, [(5, 5), (4, 4), (3, 3)]);
        assert_eq!(r.capacity(), 3, "never grows");
    }

    #[test]
    fn what_is_logged_and_where_it_points() {
        assert!(!is_logged(Status::SUCCESS));
        assert!(!is_logged(Status::ABORT_REQUESTED));
        assert!(!is_logged(Status::ABORTED_SQ_DELETION));
        assert!(is_logged(Status::LBA_OUT_OF_RANGE));
        assert!(is_logged(Status::COMPARE_FAILURE));
        assert!(is_logged(Status::INVALID_LOG_PAGE));
        let mut sqe = Sqe::new(0x02, 7).with_nsid(1);
        sqe.cdw[0] = 0x10;
        sqe.cdw[1] = 0x2;
        assert_eq!(
            default_at(&sqe, Status::LBA_OUT_OF_RANGE),
            ErrAt {
                loc: 40,
                lba: 0x2_0000_0010
            }
        );
        assert_eq!(default_at(&sqe, Status::INVALID_OPCODE).loc, 0);
        assert_eq!(default_at(&sqe, Status::INVALID_NAMESPACE_OR_FORMAT).loc, 4);
        assert_eq!(default_at(&sqe, Status::COMMAND_ID_CONFLICT).loc, 2);
        assert_eq!(default_at(&sqe, Status::DATA_SGL_LENGTH_INVALID).loc, 32);
        assert_eq!(default_at(&sqe, Status::INVALID_FIELD), ErrAt::NONE);
        assert_eq!(default_at(&sqe, Status::WRITE_FAULT), ErrAt::NONE);
    }

    proptest! {
        /// The ring reads back like the last `cap` entries of a Vec, newest first.
        #[test]
        fn ring_matches_a_vec(cap in 1usize..10, n in 0usize..40) {
            let mut r = ErrorLog::new(cap);
            for i in 0..n {
                r.record(ErrorLogEntry { lba: i as u64, ..Default::default() });
            }
            let want: Vec<u64> = (0..n as u64).rev().take(cap).collect();
            let got: Vec<u64> = (0..cap + 2).filter_map(|i| r.newest(i)).map(|e| e.lba).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(r.count(), n as u64);
            for i in 0..cap.min(n) {
                prop_assert_eq!(r.newest(i).unwrap().error_count, (n - i) as u64);
            }
        }
    }
}
