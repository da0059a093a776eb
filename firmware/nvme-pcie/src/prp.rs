//! PRP walking (NVMe base 2.0 §4.1.1): PRP1, PRP2 as a second page or as a PRP list pointer,
//! chained PRP lists. Memory page size 4 KiB (CC.MPS = 0). No allocation: list entries are
//! fetched by DMA in small batches into a stack array.

use crate::endpoint::{DmaError, EndpointFunction};
use crate::layout::PAGE_SIZE;
use core::ops::Range;
use keel_nvme::Status;

/// List entries read per DMA.
const BATCH: usize = 32;

fn dma(r: Result<(), DmaError>) -> Result<(), Status> {
    r.map_err(|_| Status::DATA_TRANSFER_ERROR)
}

/// Walks the PRPs of a command moving `len` bytes and calls `f(ep, host_addr, range)` for
/// each piece, `range` being its bytes in the transfer, in order.
///
/// Errors: PRP1 not dword aligned, PRP2 (second page) or any list entry not page aligned, a
/// PRP list pointer not qword aligned → Invalid PRP Offset; a PRP list that cannot be read,
/// or `f` failing (host address outside host memory) → Data Transfer Error.
pub fn walk<E: EndpointFunction + ?Sized>(
    ep: &mut E,
    prp1: u64,
    prp2: u64,
    len: usize,
    mut f: impl FnMut(&mut E, u64, Range<usize>) -> Result<(), DmaError>,
) -> Result<(), Status> {
    let ps = PAGE_SIZE as u64;
    if len == 0 {
        return Ok(());
    }
    if prp1 & 3 != 0 {
        return Err(Status::INVALID_PRP_OFFSET);
    }
    let n1 = len.min((ps - prp1 % ps) as usize);
    dma(f(ep, prp1, 0..n1))?;
    let mut off = n1;
    if off == len {
        return Ok(());
    }
    let rem = len - off;
    if rem <= PAGE_SIZE {
        if !prp2.is_multiple_of(ps) {
            return Err(Status::INVALID_PRP_OFFSET);
        }
        return dma(f(ep, prp2, off..len));
    }
    if prp2 & 7 != 0 {
        return Err(Status::INVALID_PRP_OFFSET);
    }
    let mut list = prp2;
    // Every list page but a degenerate one moves at least one page of data.
    let mut budget = len / PAGE_SIZE + 2;
    while off < len {
        if budget == 0 {
            return Err(Status::INVALID_PRP_OFFSET);
        }
        budget -= 1;
        let in_page = ((ps - list % ps) / 8) as usize;
        let pages_left = (len - off).div_ceil(PAGE_SIZE);
        let chained = pages_left > in_page;
        let data_entries = if chained { in_page - 1 } else { pages_left };
        let mut i = 0;
        let mut entries = [0u64; BATCH];
        while i < data_entries {
            let n = (data_entries - i).min(BATCH);
            let mut raw = [0u8; BATCH * 8];
            dma(ep.dma_read(list + (i * 8) as u64, &mut raw[..n * 8]))?;
            for (k, e) in entries.iter_mut().take(n).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(&raw[k * 8..k * 8 + 8]);
                *e = u64::from_le_bytes(b);
            }
            for &e in entries.iter().take(n) {
                if !e.is_multiple_of(ps) {
                    return Err(Status::INVALID_PRP_OFFSET);
                }
                let m = (len - off).min(PAGE_SIZE);
                dma(f(ep, e, off..off + m))?;
                off += m;
            }
            i += n;
        }
        if off < len {
            let mut b = [0u8; 8];
            dma(ep.dma_read(list + ((in_page - 1) * 8) as u64, &mut b))?;
            let next = u64::from_le_bytes(b);
            if next & 7 != 0 {
                return Err(Status::INVALID_PRP_OFFSET);
            }
            list = next;
        }
    }
    Ok(())
}

/// Copies host memory described by the PRPs into `buf` (all of it).
pub fn gather<E: EndpointFunction + ?Sized>(
    ep: &mut E,
    prp1: u64,
    prp2: u64,
    buf: &mut [u8],
) -> Result<(), Status> {
    let len = buf.len();
    walk(ep, prp1, prp2, len, |ep, addr, r| match buf.get_mut(r) {
        Some(dst) => ep.dma_read(addr, dst),
        None => Err(DmaError::Fault),
    })
}

/// Copies `data` into host memory described by the PRPs.
pub fn scatter<E: EndpointFunction + ?Sized>(
    ep: &mut E,
    prp1: u64,
    prp2: u64,
    data: &[u8],
) -> Result<(), Status> {
    walk(ep, prp1, prp2, data.len(), |ep, addr, r| {
        match data.get(r) {
            Some(src) => ep.dma_write(addr, src),
            None => Err(DmaError::Fault),
        }
    })
}

/// Checks the PRPs' alignment and list structure without moving data (list pages are read).
pub fn check<E: EndpointFunction + ?Sized>(
    ep: &mut E,
    prp1: u64,
    prp2: u64,
    len: usize,
) -> Result<(), Status> {
    let area = ep.host_area();
    walk(ep, prp1, prp2, len, |_, addr, r| {
        let end = addr.checked_add(r.len() as u64);
        match end {
            Some(end) if addr >= area.start && end <= area.end => Ok(()),
            _ => Err(DmaError::OutOfRange { addr, len: r.len() }),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::MemWindow;

    const A: u64 = 0x10000;

    fn win() -> MemWindow {
        MemWindow::new(0x100000)
    }

    fn pieces(
        w: &mut MemWindow,
        p1: u64,
        p2: u64,
        len: usize,
    ) -> Result<Vec<(u64, usize)>, Status> {
        let mut v = Vec::new();
        walk(w, p1, p2, len, |_, a, r| {
            v.push((a, r.len()));
            Ok(())
        })?;
        Ok(v)
    }

    #[test]
    fn single_and_two_pages() {
        let mut w = win();
        assert_eq!(pieces(&mut w, A + 8, 0, 100).unwrap(), vec![(A + 8, 100)]);
        assert_eq!(
            pieces(&mut w, A + 0x800, A + 0x5000, 4096).unwrap(),
            vec![(A + 0x800, 0x800), (A + 0x5000, 0x800)]
        );
        assert_eq!(
            pieces(&mut w, A + 2, 0, 4).unwrap_err(),
            Status::INVALID_PRP_OFFSET
        );
        assert_eq!(
            pieces(&mut w, A, A + 0x5001, 8192).unwrap_err(),
            Status::INVALID_PRP_OFFSET
        );
    }

    #[test]
    fn list_and_chain() {
        let mut w = win();
        // A list at the last two qwords of a page: one data entry then a chain pointer.
        let list = A + 0x1000 - 16;
        w.host_write(list, &(A + 0x8000).to_le_bytes());
        w.host_write(list + 8, &(A + 0x3000).to_le_bytes());
        w.host_write(A + 0x3000, &(A + 0x9000).to_le_bytes());
        w.host_write(A + 0x3008, &(A + 0xA000).to_le_bytes());
        let v = pieces(&mut w, A + 0x7000, list, 4 * 4096).unwrap();
        assert_eq!(
            v,
            vec![
                (A + 0x7000, 4096),
                (A + 0x8000, 4096),
                (A + 0x9000, 4096),
                (A + 0xA000, 4096)
            ]
        );
        // Misaligned entry.
        w.host_write(A + 0x3008, &(A + 0xA010).to_le_bytes());
        assert_eq!(
            pieces(&mut w, A + 0x7000, list, 4 * 4096).unwrap_err(),
            Status::INVALID_PRP_OFFSET
        );
        // A list outside host memory.
        assert_eq!(
            pieces(&mut w, A, 0x2000, 3 * 4096).unwrap_err(),
            Status::DATA_TRANSFER_ERROR
        );
        // A self-referencing chain terminates.
        let last = A + 0x4000 - 8;
        w.host_write(last, &(last).to_le_bytes());
        assert!(pieces(&mut w, A, last, 64 * 4096).is_err());
    }

    #[test]
    fn gather_scatter_outside_is_refused() {
        let mut w = win();
        let mut b = [0u8; 8192];
        assert_eq!(
            gather(&mut w, 0x1000, 0x2000, &mut b),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        assert_eq!(
            scatter(&mut w, A, 0x100000, &b),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        assert_eq!(
            check(&mut w, A, 0x100000, 8192),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        assert!(check(&mut w, A, A + 0x1000, 8192).is_ok());
        let before = w.clone();
        let _ = scatter(&mut w, 0x0, 0, &[0xFF; 64]);
        assert_eq!(w.bytes(), before.bytes());
    }
}
