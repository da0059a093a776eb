//! Commands the controller runs as a series of backend requests, one at a time, from the
//! command's slot:
//!
//! - Dataset Management with Deallocate: one Deallocate per non-empty range.
//! - Write Zeroes on a namespace whose backend has no Write Zeroes (encrypted namespaces):
//!   zero-filled Writes from a scratch buffer, so the backend stores what it stores for
//!   zeroes written by a host (ciphertext of zeroes on an encrypted namespace) and the
//!   blocks read back as zeroes.
//! - Copy (NVM Command Set 2.0 §3.3.1, source range format 0h): for each source range in
//!   order, chunks of at most one scratch buffer are read and written to the destination, so
//!   the data never leaves the device and every backend (RAM, drive, slice, encrypted: read
//!   decrypts with the source LBA, write encrypts with the destination LBA) does its part.
//!   A range whose destination starts inside its source is copied from its end, like
//!   `memmove`; ranges are copied one after the other, so a later range reads what earlier
//!   ones wrote.
//!
//! A step's request carries the scratch buffer to the backend and its completion brings it
//! back ([`Chain::next`] takes it); nothing is allocated per step.

use keel_nvme::io::{CopyRange, DsmRange};
use keel_storage::{BlockOp, BlockRequest, IoBuf};

/// What a chained command does next.
#[derive(Debug)]
pub(crate) enum Step {
    /// Submit this request; its completion calls [`Chain::next`] again.
    Submit(BlockRequest),
    /// The command needs a scratch buffer first.
    NeedScratch,
    /// Every step succeeded.
    Done,
}

/// A Copy in progress.
#[derive(Debug)]
pub(crate) struct CopyState {
    /// The host's source range entries.
    pub ranges: IoBuf,
    pub count: u16,
    /// Next range to start.
    pub next_range: u16,
    /// Destination of the next range to start.
    pub next_dst: u64,
    /// The range being copied: source and destination of its remaining blocks, their
    /// number, and whether it is copied from its end.
    pub src: u64,
    pub dst: u64,
    pub left: u32,
    pub backward: bool,
    /// The scratch buffer holds this chunk, read: write it here.
    pub pending_write: Option<(u64, u32)>,
    pub fua: bool,
}

#[derive(Debug)]
pub(crate) enum Chain {
    /// Dataset Management: deallocate range `next` onwards of `buf`.
    Dsm { buf: IoBuf, next: u16, count: u16 },
    /// Write Zeroes as Writes: blocks `next..end` are still to be zeroed.
    Zeroes {
        scratch: Option<IoBuf>,
        next: u64,
        end: u64,
        fua: bool,
    },
    /// Copy.
    Copy {
        scratch: Option<IoBuf>,
        state: CopyState,
    },
}

impl Chain {
    /// A Copy of the `count` ranges in `ranges` (already checked) to `sdlba`.
    pub fn copy(ranges: IoBuf, count: u16, sdlba: u64, fua: bool) -> Self {
        Chain::Copy {
            scratch: None,
            state: CopyState {
                ranges,
                count,
                next_range: 0,
                next_dst: sdlba,
                src: 0,
                dst: 0,
                left: 0,
                backward: false,
                pending_write: None,
                fua,
            },
        }
    }

    /// Whether this chain needs a scratch buffer it does not hold.
    pub fn needs_scratch(&self) -> bool {
        matches!(
            self,
            Chain::Zeroes { scratch: None, .. } | Chain::Copy { scratch: None, .. }
        )
    }

    /// Gives the chain a scratch buffer (from the pool, or back from a completed step).
    pub fn give_scratch(&mut self, buf: IoBuf) -> Option<IoBuf> {
        match self {
            Chain::Zeroes { scratch, .. } | Chain::Copy { scratch, .. } if scratch.is_none() => {
                *scratch = Some(buf);
                None
            }
            _ => Some(buf),
        }
    }

    /// Takes the scratch buffer back (to return it to the pool) and the host's buffer (to
    /// hand back with the response).
    pub fn into_buffers(self) -> (Option<IoBuf>, Option<IoBuf>) {
        match self {
            Chain::Dsm { buf, .. } => (None, Some(buf)),
            Chain::Zeroes { scratch, .. } => (scratch, None),
            Chain::Copy { scratch, state } => (scratch, Some(state.ranges)),
        }
    }

    /// The next step, for requests tagged `tag` on a namespace of `block_size`-byte blocks.
    pub fn next(&mut self, tag: u64, block_size: u32) -> Step {
        let bs = block_size as usize;
        match self {
            Chain::Dsm { buf, next, count } => {
                while *next < *count {
                    let i = *next as usize;
                    *next += 1;
                    if let Some(r) = DsmRange::read(buf.as_slice(), i)
                        && r.nlb > 0
                    {
                        return Step::Submit(BlockRequest::new(
                            tag,
                            BlockOp::Deallocate,
                            r.slba,
                            r.nlb,
                            None,
                        ));
                    }
                }
                Step::Done
            }
            Chain::Zeroes {
                scratch,
                next,
                end,
                fua,
            } => {
                if *next >= *end {
                    return Step::Done;
                }
                let Some(mut b) = scratch.take() else {
                    return Step::NeedScratch;
                };
                let room = (b.capacity() / bs) as u64;
                let blocks = (*end - *next).min(room).min(u32::MAX as u64) as u32;
                if blocks == 0 {
                    // A scratch buffer smaller than a block: refused when the command began.
                    *scratch = Some(b);
                    return Step::Done;
                }
                let len = blocks as usize * bs;
                b.set_len(len);
                // Zeroed every time: an encrypting backend leaves ciphertext in it.
                b.as_mut_slice().fill(0);
                let lba = *next;
                *next += blocks as u64;
                Step::Submit(BlockRequest::new(
                    tag,
                    BlockOp::Write { fua: *fua },
                    lba,
                    blocks,
                    Some(b),
                ))
            }
            Chain::Copy { scratch, state } => {
                if let Some((dst, blocks)) = state.pending_write.take() {
                    let Some(b) = scratch.take() else {
                        return Step::NeedScratch;
                    };
                    let op = BlockOp::Write { fua: state.fua };
                    return Step::Submit(BlockRequest::new(tag, op, dst, blocks, Some(b)));
                }
                while state.left == 0 {
                    if state.next_range >= state.count {
                        return Step::Done;
                    }
                    let Some(r) =
                        CopyRange::read(state.ranges.as_slice(), state.next_range as usize)
                    else {
                        return Step::Done;
                    };
                    state.next_range += 1;
                    state.src = r.slba;
                    state.dst = state.next_dst;
                    state.left = r.blocks();
                    state.next_dst = state.next_dst.saturating_add(r.blocks() as u64);
                    state.backward =
                        state.dst > state.src && state.dst < state.src + r.blocks() as u64;
                }
                let Some(mut b) = scratch.take() else {
                    return Step::NeedScratch;
                };
                let room = (b.capacity() / bs).min(u32::MAX as usize) as u32;
                let blocks = state.left.min(room);
                if blocks == 0 {
                    *scratch = Some(b);
                    return Step::Done;
                }
                b.set_len(blocks as usize * bs);
                let (src, dst) = if state.backward {
                    let skip = (state.left - blocks) as u64;
                    (state.src + skip, state.dst + skip)
                } else {
                    let at = (state.src, state.dst);
                    state.src += blocks as u64;
                    state.dst += blocks as u64;
                    at
                };
                state.left -= blocks;
                state.pending_write = Some((dst, blocks));
                Step::Submit(BlockRequest::new(tag, BlockOp::Read, src, blocks, Some(b)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    /// Runs a chain against a Vec "disk" of 512-byte blocks holding one byte per block.
    fn run(chain: &mut Chain, disk: &mut [u8], scratch_blocks: usize) -> Vec<(BlockOp, u64, u32)> {
        let mut steps = Vec::new();
        let mut pool = Some(IoBuf::leak_zeroed(scratch_blocks * 512));
        loop {
            match chain.next(1, 512) {
                Step::Done => return steps,
                Step::NeedScratch => {
                    let b = pool.take().expect("one scratch buffer is enough");
                    assert!(chain.give_scratch(b).is_none());
                }
                Step::Submit(mut r) => {
                    steps.push((r.op, r.lba, r.blocks));
                    if let Some(b) = r.buf.as_mut() {
                        assert!(b.capacity() >= r.blocks as usize * 512);
                        let s = b.as_mut_slice();
                        for i in 0..r.blocks as usize {
                            let blk = &mut s[i * 512..(i + 1) * 512];
                            match r.op {
                                BlockOp::Read => blk.fill(disk[r.lba as usize + i]),
                                BlockOp::Write { .. } => disk[r.lba as usize + i] = blk[0],
                                _ => unreachable!(),
                            }
                        }
                    } else if r.op == BlockOp::Deallocate {
                        disk[r.lba as usize..r.lba as usize + r.blocks as usize].fill(0);
                    }
                    // The completion brings the buffer back.
                    if let Some(b) = r.buf.take() {
                        assert!(chain.give_scratch(b).is_none());
                    }
                }
            }
        }
    }

    fn ranges(list: &[(u64, u32)]) -> IoBuf {
        let mut b = IoBuf::leak_zeroed(list.len().max(1) * CopyRange::SIZE);
        for (i, &(slba, n)) in list.iter().enumerate() {
            let r = CopyRange {
                slba,
                nlb: (n - 1) as u16,
            };
            b.as_mut_slice()[i * 32..(i + 1) * 32].copy_from_slice(&r.to_bytes());
        }
        b
    }

    #[test]
    fn copy_in_chunks_and_overlapping_like_memmove() {
        let mut disk: Vec<u8> = (0..64).collect();
        let mut c = Chain::copy(ranges(&[(0, 5), (40, 2)]), 2, 20, true);
        let steps = run(&mut c, &mut disk, 2);
        let w = BlockOp::Write { fua: true };
        assert_eq!(
            steps,
            [
                (BlockOp::Read, 0, 2),
                (w, 20, 2),
                (BlockOp::Read, 2, 2),
                (w, 22, 2),
                (BlockOp::Read, 4, 1),
                (w, 24, 1),
                (BlockOp::Read, 40, 2),
                (w, 25, 2),
            ]
        );
        assert_eq!(&disk[20..27], &[0, 1, 2, 3, 4, 40, 41]);
        // Destination inside the source, after its start: copied from the end.
        let mut disk: Vec<u8> = (0..16).collect();
        let mut c = Chain::copy(ranges(&[(2, 6)]), 1, 4, false);
        run(&mut c, &mut disk, 4);
        assert_eq!(&disk[..10], &[0, 1, 2, 3, 2, 3, 4, 5, 6, 7]);
        let (scratch, host) = c.into_buffers();
        assert!(scratch.is_some() && host.is_some());
    }

    #[test]
    fn zeroes_refill_the_buffer_each_step() {
        let mut disk = [9u8; 16];
        let mut c = Chain::Zeroes {
            scratch: None,
            next: 3,
            end: 10,
            fua: false,
        };
        assert!(c.needs_scratch());
        let steps = run(&mut c, &mut disk, 4);
        let w = BlockOp::Write { fua: false };
        assert_eq!(steps, [(w, 3, 4), (w, 7, 3)]);
        assert_eq!(disk, [9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9, 9, 9]);
    }

    #[test]
    fn dsm_skips_empty_ranges() {
        let mut b = IoBuf::leak_zeroed(48);
        for (i, (slba, nlb)) in [(1u64, 2u32), (5, 0), (8, 1)].into_iter().enumerate() {
            let r = DsmRange {
                cattr: 0,
                nlb,
                slba,
            };
            b.as_mut_slice()[i * 16..(i + 1) * 16].copy_from_slice(&r.to_bytes());
        }
        let mut c = Chain::Dsm {
            buf: b,
            next: 0,
            count: 3,
        };
        let mut disk = [7u8; 12];
        let steps = run(&mut c, &mut disk, 1);
        assert_eq!(
            steps,
            [(BlockOp::Deallocate, 1, 2), (BlockOp::Deallocate, 8, 1)]
        );
    }

    proptest! {
        /// A Copy ends with the disk a model gets by copying each range in turn with
        /// `copy_within` (memmove), whatever the chunk size.
        #[test]
        fn copy_matches_memmove_model(
            list in proptest::collection::vec((0u64..48, 1u32..12), 1..5),
            sdlba in 0u64..48,
            chunk in 1usize..6,
        ) {
            let total: u64 = list.iter().map(|&(_, n)| n as u64).sum();
            prop_assume!(sdlba + total <= 64);
            prop_assume!(list.iter().all(|&(s, n)| s + n as u64 <= 64));
            let mut disk: Vec<u8> = (0..64).map(|i| i as u8 ^ 0xA5).collect();
            let mut model = disk.clone();
            let mut dst = sdlba as usize;
            for &(s, n) in &list {
                model.copy_within(s as usize..s as usize + n as usize, dst);
                dst += n as usize;
            }
            let mut c = Chain::copy(ranges(&list), list.len() as u16, sdlba, false);
            run(&mut c, &mut disk, chunk);
            prop_assert_eq!(disk, model);
        }
    }
}
