//! Receive-side segmentation offload through virtio-net (virtio 1.2 §5.1.6.3, §5.1.6.4), the
//! pure part: no hardware, host-tested.
//!
//! With VIRTIO_NET_F_GUEST_TSO4 the device may hand the driver TCPv4 segments larger than the
//! MTU (a tap: QEMU turns on `TUN_F_TSO4` and the host kernel passes its large TCP segments
//! through whole, `gso_type = VIRTIO_NET_HDR_GSO_TCPV4`). They need receive buffers able to hold
//! up to 65550 bytes; with VIRTIO_NET_F_MRG_RXBUF a frame may instead spread over several
//! buffers, the header's `num_buffers` saying how many (§5.1.6.4): the first buffer holds the
//! virtio-net header and the start of the frame, each following one the next bytes from its
//! own start, every buffer but the last filled.
//!
//! The driver posts its receive buffers end to end in one area ([`RxArea`]) and in address
//! order, and re-posts them in the order the device used them, so the device, which takes
//! buffers in the order they are offered, keeps taking them in address order: the buffers of a
//! merged frame then follow each other in memory and the frame is already contiguous
//! ([`RxArea::in_place`]) and is handed to smoltcp where it lies. Only a frame that wraps from
//! the last buffer of the area to the first (or any other layout) is copied together.

use core::ops::Range;

/// Offset of `num_buffers` in `struct virtio_net_hdr` (§5.1.6: flags, gso_type, hdr_len,
/// gso_size, csum_start, csum_offset, num_buffers).
const HDR_NUM_BUFFERS: usize = 10;
/// Offset of `gso_type` in the header.
const HDR_GSO_TYPE: usize = 1;
/// `VIRTIO_NET_HDR_GSO_NONE` (§5.1.6).
pub const HDR_GSO_NONE: u8 = 0;

/// The `num_buffers` field of a received frame's virtio-net header (VIRTIO_NET_F_MRG_RXBUF):
/// how many receive buffers the frame takes, at least 1. `None` for a header too short or a
/// count of 0, which no device may write (§5.1.6.4: "MUST set num_buffers to the number of
/// descriptors used").
pub fn num_buffers(hdr: &[u8]) -> Option<u16> {
    let b = hdr.get(HDR_NUM_BUFFERS..HDR_NUM_BUFFERS + 2)?;
    let n = u16::from_le_bytes([b[0], b[1]]);
    (n > 0).then_some(n)
}

/// Whether the device handed over a segment for the driver to take whole
/// (`gso_type != VIRTIO_NET_HDR_GSO_NONE`, §5.1.6.4: only with a GUEST_TSO feature).
pub fn is_gso(hdr: &[u8]) -> bool {
    hdr.get(HDR_GSO_TYPE).is_some_and(|&t| t != HDR_GSO_NONE)
}

/// Receive buffers laid end to end in one area: buffer `i` is the bytes
/// `shift + i × buf_len .. shift + (i + 1) × buf_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxArea {
    /// Where buffer 0 starts.
    pub shift: usize,
    /// Bytes per buffer.
    pub buf_len: usize,
    /// Buffers.
    pub count: usize,
}

impl RxArea {
    /// Bytes the area needs.
    pub const fn bytes(&self) -> usize {
        self.shift + self.count * self.buf_len
    }

    /// The bytes of buffer `i`.
    pub const fn buffer(&self, i: usize) -> Range<usize> {
        let start = self.shift + i * self.buf_len;
        start..start + self.buf_len
    }

    /// Where a frame the device wrote into `pieces` (buffer index and bytes written, in the
    /// order it used them) lies in the area, header included, when its bytes follow each
    /// other there: each buffer the next one in the area (no wrap from the last to the
    /// first), and every one but the last filled. `None` otherwise (the pieces must be
    /// copied together) or when `pieces` is empty or names a buffer outside the area.
    pub fn in_place(&self, pieces: &[(u16, usize)]) -> Option<Range<usize>> {
        if let [(i, n)] = *pieces {
            // One buffer, the common case (and the only one without MRG_RXBUF).
            let (i, n) = (usize::from(i), n);
            if i >= self.count || n > self.buf_len {
                return None;
            }
            let start = self.shift + i * self.buf_len;
            return Some(start..start + n);
        }
        let &(first, _) = pieces.first()?;
        let first = usize::from(first);
        if first + pieces.len() > self.count {
            return None;
        }
        let mut len = 0;
        for (k, &(i, n)) in pieces.iter().enumerate() {
            let last = k + 1 == pieces.len();
            if usize::from(i) != first + k || n > self.buf_len || (!last && n != self.buf_len) {
                return None;
            }
            len += n;
        }
        let start = self.buffer(first).start;
        Some(start..start + len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn num_buffers_is_the_little_endian_u16_at_byte_10() {
        // virtio 1.2 §5.1.6: struct virtio_net_hdr { u8 flags; u8 gso_type; le16 hdr_len;
        // le16 gso_size; le16 csum_start; le16 csum_offset; le16 num_buffers; }: bytes 10-11.
        // A header as a device writes it for a TCPv4 segment over 3 buffers: flags
        // NEEDS_CSUM (1), gso_type GSO_TCPV4 (1), hdr_len 66, gso_size 1448, csum_start 34,
        // csum_offset 16, num_buffers 3.
        let hdr = [
            0x01, 0x01, 0x42, 0x00, 0xa8, 0x05, 0x22, 0x00, 0x10, 0x00, 0x03, 0x00,
        ];
        assert_eq!(num_buffers(&hdr), Some(3));
        assert!(is_gso(&hdr));
        let mut big = hdr;
        big[10] = 0x21; // 0x0121 = 289: the high byte is byte 11
        big[11] = 0x01;
        assert_eq!(num_buffers(&big), Some(289));
        // A frame in one buffer, no segmentation (gso_type VIRTIO_NET_HDR_GSO_NONE = 0).
        let one = [0x02, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00];
        assert_eq!(num_buffers(&one), Some(1));
        assert!(!is_gso(&one));
        // 0 buffers cannot be; nor can a header cut short.
        let mut zero = one;
        zero[10] = 0;
        assert_eq!(num_buffers(&zero), None);
        assert_eq!(num_buffers(&one[..11]), None);
        assert!(!is_gso(&[]));
    }

    const AREA: RxArea = RxArea {
        shift: 6,
        buf_len: 2048,
        count: 8,
    };

    /// Writes `packet` (header + frame) into the area as §5.1.6.4 has the device do with
    /// VIRTIO_NET_F_MRG_RXBUF: the buffers in the order given, each filled from its start
    /// before the next is taken; returns the pieces (buffer, bytes written).
    fn device_fills(area: &mut [u8], order: &[u16], packet: &[u8]) -> Vec<(u16, usize)> {
        let mut pieces = Vec::new();
        let mut rest = packet;
        for &i in order {
            if rest.is_empty() {
                break;
            }
            let b = AREA.buffer(usize::from(i));
            let n = rest.len().min(b.len());
            area[b.start..b.start + n].copy_from_slice(&rest[..n]);
            pieces.push((i, n));
            rest = &rest[n..];
        }
        assert!(rest.is_empty(), "the packet fits the buffers given");
        pieces
    }

    fn packet(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn a_frame_over_adjacent_buffers_is_read_where_it_lies() {
        let mut area = vec![0u8; AREA.bytes()];
        // 12-byte header + a 4222-byte frame (a 4168-byte PDU in one TCP segment): 3 buffers.
        let p = packet(12 + 4222);
        let pieces = device_fills(&mut area, &[2, 3, 4], &p);
        assert_eq!(pieces, vec![(2, 2048), (3, 2048), (4, 138)]);
        let r = AREA.in_place(&pieces).expect("contiguous");
        assert_eq!(r, 6 + 2 * 2048..6 + 2 * 2048 + 4234);
        assert_eq!(&area[r], &p[..]);
        // A frame in one buffer, the common case.
        let small = packet(12 + 66);
        let pieces = device_fills(&mut area, &[7], &small);
        assert_eq!(&area[AREA.in_place(&pieces).unwrap()], &small[..]);
        // The last buffer of the area, filled exactly.
        let full = packet(2048);
        let pieces = device_fills(&mut area, &[7], &full);
        assert_eq!(&area[AREA.in_place(&pieces).unwrap()], &full[..]);
    }

    #[test]
    fn other_layouts_are_not_taken_for_contiguous() {
        // Wrapping from the last buffer to the first.
        assert_eq!(AREA.in_place(&[(7, 2048), (0, 100)]), None);
        // Out of address order.
        assert_eq!(AREA.in_place(&[(3, 2048), (2, 100)]), None);
        assert_eq!(AREA.in_place(&[(3, 2048), (5, 100)]), None);
        // A buffer not filled before the next one.
        assert_eq!(AREA.in_place(&[(3, 2000), (4, 100)]), None);
        // More than a buffer holds, a buffer outside the area, nothing.
        assert_eq!(AREA.in_place(&[(3, 2049)]), None);
        assert_eq!(AREA.in_place(&[(8, 10)]), None);
        assert_eq!(AREA.in_place(&[(7, 2048), (8, 10)]), None);
        assert_eq!(AREA.in_place(&[]), None);
    }
}
