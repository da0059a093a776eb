//! NVM command set I/O commands (NVM Command Set 1.0 §3): Read, Write, Compare, Flush,
//! Write Zeroes, Dataset Management.

use crate::config::*;
use crate::target::*;
use keel_nvme::io::{DsmCommand, DsmRange, RwCommand};
use keel_nvme::{IoOpcode, NSID_ALL, Status};
use keel_storage::{BlockOp, BlockRequest, OpKind, RejectReason};

impl Target {
    pub(crate) fn io(
        &mut self,
        now: Instant,
        qi: usize,
        ci: usize,
        mut req: Request,
    ) -> Option<Response> {
        if sqe_is_fabrics(&req.sqe) {
            return Some(self.fabrics_io(qi, ci, req));
        }
        let (ready, si, cache_enabled) = match self.ctrls.get(ci) {
            Some(Some(c)) => (
                c.csts.rdy() && c.csts.shst() == 0 && !c.shutdown_pending,
                c.subsys,
                c.vwc,
            ),
            _ => return Some(self.respond(qi, req, Status::INTERNAL_ERROR, 0)),
        };
        if !ready {
            return Some(self.respond(qi, req, Status::COMMAND_SEQUENCE_ERROR, 0));
        }
        if req.sqe.fuse() != 0 {
            return Some(self.respond(qi, req, Status::INVALID_FIELD, 0));
        }
        let Some(op) = IoOpcode::from_u8(req.sqe.opcode) else {
            return Some(self.respond(qi, req, Status::INVALID_OPCODE, 0));
        };
        if !matches!(
            op,
            IoOpcode::Read
                | IoOpcode::Write
                | IoOpcode::Compare
                | IoOpcode::Flush
                | IoOpcode::WriteZeroes
                | IoOpcode::DatasetManagement
        ) {
            return Some(self.respond(qi, req, Status::INVALID_OPCODE, 0));
        }
        let nsid = req.sqe.nsid;
        let found = self.subsystems.get(si).and_then(|s| s.find_ns(nsid));
        let Some(ni) = found else {
            return Some(self.respond(qi, req, Status::INVALID_NAMESPACE_OR_FORMAT, 0));
        };
        if nsid == NSID_ALL {
            return Some(self.respond(qi, req, Status::INVALID_NAMESPACE_OR_FORMAT, 0));
        }
        let Some(Some(ns)) = self.subsystems.get(si).and_then(|s| s.namespaces.get(ni)) else {
            return Some(self.respond(qi, req, Status::INVALID_NAMESPACE_OR_FORMAT, 0));
        };
        let g = ns.geometry;
        let caps = ns.caps;
        let bs = g.block_size as u64;
        // The host disabled the volatile write cache (Set Features 06h, WCE = 0): a write
        // completes only once it is on media, so writes to a backend with a cache carry FUA.
        let write_through = caps.volatile_write_cache && caps.fua && !cache_enabled;

        // Build the backend request (or answer at once).
        let (bop, lba, blocks, kind, bytes, read_len, dsm) = match op {
            IoOpcode::Read | IoOpcode::Write | IoOpcode::Compare => {
                let rw = RwCommand::from_sqe(&req.sqe);
                let blocks = rw.blocks();
                if !g.contains(rw.slba, blocks as u64) {
                    return Some(self.respond(qi, req, Status::LBA_OUT_OF_RANGE, 0));
                }
                let bytes = blocks as u64 * bs;
                if self.limits.mdts != 0 && bytes > (4096u64 << self.limits.mdts) {
                    return Some(self.respond(qi, req, Status::INVALID_FIELD, 0));
                }
                let buf_ok = matches!(&req.buf, Some(b) if b.capacity() as u64 >= bytes);
                if req.data_len as u64 != bytes || !buf_ok {
                    return Some(self.respond(qi, req, Status::DATA_SGL_LENGTH_INVALID, 0));
                }
                if op == IoOpcode::Compare && !caps.compare {
                    return Some(self.respond(qi, req, Status::INVALID_OPCODE, 0));
                }
                let (bop, kind, read_len) = match op {
                    IoOpcode::Read => (BlockOp::Read, OpKind::Read, bytes as u32),
                    IoOpcode::Write => (
                        BlockOp::Write {
                            fua: rw.fua || write_through,
                        },
                        OpKind::Write,
                        0,
                    ),
                    _ => (BlockOp::Compare, OpKind::Read, 0),
                };
                (bop, rw.slba, blocks, kind, bytes, read_len, None)
            }
            IoOpcode::Flush => {
                if !caps.flush {
                    return Some(self.respond(qi, req, Status::SUCCESS, 0));
                }
                (BlockOp::Flush, 0, 0, OpKind::Other, 0, 0, None)
            }
            IoOpcode::WriteZeroes => {
                if !caps.write_zeroes {
                    return Some(self.respond(qi, req, Status::INVALID_OPCODE, 0));
                }
                let rw = RwCommand::from_sqe(&req.sqe);
                let blocks = rw.blocks();
                if !g.contains(rw.slba, blocks as u64) {
                    return Some(self.respond(qi, req, Status::LBA_OUT_OF_RANGE, 0));
                }
                let op = BlockOp::WriteZeroes {
                    deallocate: rw.deac,
                    fua: rw.fua || write_through,
                };
                (op, rw.slba, blocks, OpKind::Write, 0, 0, None)
            }
            _ => {
                // Dataset Management.
                let d = DsmCommand::from_sqe(&req.sqe);
                let need = d.data_len();
                let buf_ok = matches!(&req.buf, Some(b) if b.capacity() >= need);
                if req.data_len as usize != need || !buf_ok {
                    return Some(self.respond(qi, req, Status::DATA_SGL_LENGTH_INVALID, 0));
                }
                let mut first = None;
                if let Some(b) = req.buf.as_mut() {
                    b.set_len(need);
                    for i in 0..d.ranges() {
                        let Some(r) = DsmRange::read(b.as_slice(), i) else {
                            continue;
                        };
                        if !g.contains(r.slba, r.nlb as u64) {
                            return Some(self.respond(qi, req, Status::LBA_OUT_OF_RANGE, 0));
                        }
                        if first.is_none() && r.nlb > 0 {
                            first = Some((i, r));
                        }
                    }
                }
                // Deallocation is advisory: without support or without work, succeed.
                let Some((i, r)) = first.filter(|_| d.ad && caps.deallocate) else {
                    return Some(self.respond(qi, req, Status::SUCCESS, 0));
                };
                (
                    BlockOp::Deallocate,
                    r.slba,
                    r.nlb,
                    OpKind::Other,
                    0,
                    0,
                    Some((i as u16 + 1, d.ranges() as u16)),
                )
            }
        };

        // A command slot: free, and no conflicting CID.
        let cid = req.sqe.cid;
        let mut free = None;
        for (i, s) in self.queues[qi].slots.iter().enumerate() {
            if s.state == SlotState::Free {
                if free.is_none() {
                    free = Some(i);
                }
            } else if s.cid == cid {
                return Some(self.respond(qi, req, Status::COMMAND_ID_CONFLICT, 0));
            }
        }
        let Some(slot_i) = free else {
            // The host exceeded the queue size it connected with.
            return Some(self.respond(qi, req, Status::COMMAND_INTERRUPTED, 0));
        };
        let generation = self.queues[qi].generation;
        let Request { buf, cookie, .. } = req;
        let (buf, dsm_buf) = if dsm.is_some() {
            (None, buf)
        } else {
            (buf, None)
        };
        let (data_buf, stray) = if bop.has_data() {
            (buf, None)
        } else {
            (None, buf)
        };
        if let Some(b) = stray {
            // A data-less op (Flush, Write Zeroes) cannot carry the host's buffer back.
            self.pending.push_back(Event::BufferReleased(b));
        }
        let breq = BlockRequest {
            tag: tag(qi, generation, slot_i),
            op: bop,
            lba,
            blocks,
            buf: data_buf,
            buf_offset: 0,
        };
        {
            let slot = &mut self.queues[qi].slots[slot_i];
            slot.state = SlotState::InFlight;
            slot.cid = cid;
            slot.cookie = cookie;
            slot.ns = (si as u16, ni as u16);
            slot.kind = kind;
            slot.bytes = bytes;
            slot.read_len = read_len;
            slot.start = now;
            slot.deferred = None;
            slot.dsm = match (dsm, dsm_buf) {
                (Some((next, count)), Some(b)) => Some(Dsm {
                    buf: b,
                    next,
                    count,
                }),
                _ => None,
            };
        }
        if let Some(Some(c)) = self.ctrls.get_mut(ci) {
            c.outstanding += 1;
        }
        let Some(Some(ns)) = self
            .subsystems
            .get_mut(si)
            .and_then(|s| s.namespaces.get_mut(ni))
        else {
            return self
                .finish_slot(qi, slot_i, Status::INTERNAL_ERROR, None, now)
                .and_then(event_response);
        };
        match ns.backend.submit(breq) {
            Ok(()) => {
                ns.inflight += 1;
                None
            }
            Err(r) => match r.reason {
                RejectReason::Busy => {
                    let slot = &mut self.queues[qi].slots[slot_i];
                    slot.state = SlotState::Deferred;
                    slot.deferred = Some(r.req);
                    self.deferred += 1;
                    None
                }
                RejectReason::Invalid(e) => {
                    let mut rq = r.req;
                    self.finish_slot(qi, slot_i, block_status(e), rq.buf.take(), now)
                        .and_then(event_response)
                }
            },
        }
    }
}

fn event_response(e: Event) -> Option<Response> {
    match e {
        Event::Completion(_, r) => Some(r),
        _ => None,
    }
}
