//! Checksum offload through virtio-net (virtio 1.2 §5.1.6.2, §5.1.6.4), the pure part: no
//! hardware, host-tested.
//!
//! Transmit (VIRTIO_NET_F_CSUM): smoltcp leaves the TCP checksum of a segment at zero; the
//! driver writes the pseudo-header sum (RFC 793 §3.1: source and destination address, zero,
//! protocol, TCP length) into the checksum field, un-complemented, and asks the device, with
//! `VIRTIO_NET_HDR_F_NEEDS_CSUM`, to sum the bytes from `csum_start` (the TCP header) to the
//! end of the frame and store the complement at `csum_start + csum_offset` (§5.1.6.2: "the
//! checksum field holds the pseudo-header sum"). The device's sum covers the field itself, so
//! it folds the pseudo-header in.
//!
//! Segmentation (VIRTIO_NET_F_HOST_TSO4, §5.1.6.2): a TCP segment larger than the MSS is
//! handed to the device whole, with `gso_type = VIRTIO_NET_HDR_GSO_TCPV4`, `gso_size` = the
//! payload bytes per segment and `hdr_len` = Ethernet + IPv4 + TCP header bytes, plus
//! `NEEDS_CSUM` as above. The checksum field holds the pseudo-header sum over the whole
//! segment's TCP length (the IPv4 total length minus the IP header), the same value as without
//! segmentation: Linux, which takes such frames from a tap (`virtio_net_hdr_to_skb`), replaces
//! that length with each segment's own when it splits the frame (`tcp_gso_segment` adds the
//! difference to the partial sum), and rewrites the IPv4 total length, identification and
//! header checksum per segment ([`offload_tx_gso`]).
//!
//! Receive (VIRTIO_NET_F_GUEST_CSUM): a frame flagged `VIRTIO_NET_HDR_F_DATA_VALID` had its
//! checksum verified by the device, and one flagged `VIRTIO_NET_HDR_F_NEEDS_CSUM` comes from a
//! local sender that never computed it (§5.1.6.4: the driver treats it like a valid one). Any
//! other frame still needs a check: [`l4_checksum_ok`].

use smoltcp::phy::{Checksum, ChecksumCapabilities};

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM` (§5.1.6): checksum to complete from `csum_start`.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID` (§5.1.6): the device validated the checksum.
pub const HDR_F_DATA_VALID: u8 = 2;
/// `struct virtio_net_hdr` with VIRTIO_F_VERSION_1 (§5.1.6): flags, gso_type, hdr_len,
/// gso_size, csum_start, csum_offset, num_buffers; 12 bytes, little-endian fields.
pub const NET_HDR_LEN: usize = 12;
/// `VIRTIO_NET_HDR_GSO_TCPV4` (§5.1.6): the frame is a TCPv4 segment for the device to split.
pub const HDR_GSO_TCPV4: u8 = 1;
/// Offset of `gso_type` in the header.
const HDR_GSO_TYPE: usize = 1;
/// Offset of `hdr_len` in the header.
const HDR_HDR_LEN: usize = 2;
/// Offset of `gso_size` in the header.
const HDR_GSO_SIZE: usize = 4;
/// Offset of `csum_start` in the header.
const HDR_CSUM_START: usize = 6;
/// Offset of `csum_offset` in the header.
const HDR_CSUM_OFFSET: usize = 8;

/// Ethernet header length (no VLAN tag: smoltcp sends none).
const ETH_LEN: usize = 14;
/// EtherType IPv4.
const ETHERTYPE_IPV4: u16 = 0x0800;
/// IP protocol numbers.
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
/// Where the checksum sits in a TCP header (RFC 793 §3.1) and a UDP header (RFC 768).
const TCP_CSUM_AT: usize = 16;
const UDP_CSUM_AT: usize = 6;

/// The IPv4 facts of an Ethernet frame the checksum code needs.
struct Ipv4L4 {
    /// Where the transport header starts in the frame.
    start: usize,
    /// Transport header and payload length (IP total length minus IP header).
    len: usize,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// An unfragmented IPv4 packet in `frame` whose header and payload fit the frame.
fn ipv4_l4(frame: &[u8]) -> Option<Ipv4L4> {
    if frame.len() < ETH_LEN + 20 || be16(frame, 12) != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = &frame[ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2));
    // A fragment (more-fragments flag or an offset) carries part of a transport segment.
    let fragment = be16(ip, 6) & 0x3fff != 0;
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() || fragment {
        return None;
    }
    Some(Ipv4L4 {
        start: ETH_LEN + ihl,
        len: total - ihl,
        proto: ip[9],
        src: [ip[12], ip[13], ip[14], ip[15]],
        dst: [ip[16], ip[17], ip[18], ip[19]],
    })
}

/// Adds 16-bit big-endian words of `data` (an odd last byte padded with zero, RFC 1071 §4.1)
/// to `sum` without folding.
pub fn add_words(mut sum: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_be_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        // Four 16-bit words at once: the high and low 32-bit halves, each a pair of words
        // whose carries land in the upper bits and are folded at the end (RFC 1071 §2 (C)).
        sum += (v >> 32) + (v & 0xffff_ffff);
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        sum += u64::from(u16::from_be_bytes([p[0], p[1]])) << 16;
    }
    if let [b] = pairs.remainder() {
        sum += u64::from(*b) << 24;
    }
    sum
}

/// Folds a sum of [`add_words`] (words at either 16-bit position of a 32-bit lane) into 16
/// bits, end-around carry (RFC 1071 §4.1).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The ones'-complement sum of the IPv4 pseudo-header (RFC 793 §3.1, RFC 768): source
/// address, destination address, zero, protocol, transport length. Not complemented: what a
/// driver leaves in the checksum field for the device (§5.1.6.2).
pub fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u16 {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&src);
    b[4..8].copy_from_slice(&dst);
    b[9] = proto;
    b[10..].copy_from_slice(&len.to_be_bytes());
    fold(add_words(0, &b))
}

/// Prepares an IPv4 TCP frame whose checksum the device is to complete: writes the
/// pseudo-header sum into the TCP checksum field and fills `hdr` (a zeroed virtio-net header)
/// with `NEEDS_CSUM`, `csum_start` and `csum_offset`. Returns whether it did; other frames
/// are left as they are (smoltcp checksummed them).
pub fn offload_tx(hdr: &mut [u8], frame: &mut [u8]) -> bool {
    let Some(ip) = ipv4_l4(frame) else {
        return false;
    };
    if ip.proto != PROTO_TCP || ip.len < 20 {
        return false;
    }
    let Ok(len) = u16::try_from(ip.len) else {
        return false;
    };
    let (Ok(start), Ok(offset)) = (u16::try_from(ip.start), u16::try_from(TCP_CSUM_AT)) else {
        return false;
    };
    let sum = pseudo_header_sum(ip.src, ip.dst, ip.proto, len);
    let at = ip.start + TCP_CSUM_AT;
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    hdr[0] = HDR_F_NEEDS_CSUM;
    hdr[HDR_CSUM_START..HDR_CSUM_START + 2].copy_from_slice(&start.to_le_bytes());
    hdr[HDR_CSUM_OFFSET..HDR_CSUM_OFFSET + 2].copy_from_slice(&offset.to_le_bytes());
    true
}

/// Prepares an IPv4 TCP frame larger than one segment for the device to split into segments of
/// `mss` payload bytes (VIRTIO_NET_F_HOST_TSO4): [`offload_tx`]'s checksum preparation, plus
/// `gso_type = VIRTIO_NET_HDR_GSO_TCPV4`, `gso_size = mss` and `hdr_len` = the bytes of the
/// Ethernet, IPv4 and TCP headers (options included) that the device repeats in every
/// segment. Returns false, leaving `hdr` without segmentation, for anything else: then the
/// frame must not be sent (it is larger than one segment).
pub fn offload_tx_gso(hdr: &mut [u8], frame: &mut [u8], mss: u16) -> bool {
    let Some(ip) = ipv4_l4(frame) else {
        return false;
    };
    if ip.proto != PROTO_TCP || ip.len < 20 || mss == 0 {
        return false;
    }
    let tcp_hdr = usize::from(frame[ip.start + 12] >> 4) * 4;
    let Ok(hdr_len) = u16::try_from(ip.start + tcp_hdr) else {
        return false;
    };
    if tcp_hdr < 20 || tcp_hdr > ip.len || !offload_tx(hdr, frame) {
        return false;
    }
    hdr[HDR_GSO_TYPE] = HDR_GSO_TCPV4;
    hdr[HDR_HDR_LEN..HDR_HDR_LEN + 2].copy_from_slice(&hdr_len.to_le_bytes());
    hdr[HDR_GSO_SIZE..HDR_GSO_SIZE + 2].copy_from_slice(&mss.to_le_bytes());
    true
}

/// Whether a received frame the device did not vouch for has a right TCP or UDP checksum
/// (IPv4). Anything else (not IPv4, other protocols, fragments, a UDP checksum of zero, which
/// means "none" in IPv4, RFC 768) passes: smoltcp checks what it parses itself.
pub fn l4_checksum_ok(frame: &[u8]) -> bool {
    let Some(ip) = ipv4_l4(frame) else {
        return true;
    };
    let min = match ip.proto {
        PROTO_TCP => TCP_CSUM_AT + 2,
        PROTO_UDP => 8,
        _ => return true,
    };
    if ip.len < min {
        return false;
    }
    let seg = &frame[ip.start..ip.start + ip.len];
    if ip.proto == PROTO_UDP && be16(seg, UDP_CSUM_AT) == 0 {
        return true;
    }
    let len = ip.len as u16; // ≤ the IP total length, a u16
    let pseudo = pseudo_header_sum(ip.src, ip.dst, ip.proto, len);
    fold(add_words(u64::from(pseudo), seg)) == 0xffff
}

/// Whether a received frame's virtio-net header says its checksum needs no check: the device
/// validated it, or the frame comes from a local sender with a partial checksum (both only
/// with VIRTIO_NET_F_GUEST_CSUM negotiated).
pub fn rx_trusted(hdr: &[u8]) -> bool {
    hdr.first()
        .is_some_and(|f| f & (HDR_F_DATA_VALID | HDR_F_NEEDS_CSUM) != 0)
}

/// The checksum offloads negotiated with the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// VIRTIO_NET_F_CSUM: the device completes the TCP checksum of sent frames.
    pub tx_csum: bool,
    /// VIRTIO_NET_F_GUEST_CSUM: received frames may be flagged as validated.
    pub rx_csum: bool,
    /// VIRTIO_NET_F_HOST_TSO4 (with CSUM): the device splits TCPv4 segments larger than the
    /// MSS ([`offload_tx_gso`]).
    pub tso4: bool,
    /// VIRTIO_NET_F_GUEST_TSO4 (with GUEST_CSUM and MRG_RXBUF): received TCPv4 segments may
    /// be larger than the MTU, spread over several receive buffers ([`crate::netrx`]).
    pub rx_tso4: bool,
}

impl Offloads {
    /// What smoltcp computes and verifies itself. With CSUM it leaves the TCP checksum of
    /// sent segments at zero (the driver marks them for the device). With GUEST_CSUM it
    /// verifies no received TCP or UDP checksum: the driver checks the frames the device did
    /// not vouch for before smoltcp sees them, since smoltcp's capabilities hold for every
    /// frame while the device's flags are per frame (and a frame flagged NEEDS_CSUM carries
    /// a partial checksum smoltcp would reject). The IPv4 header, UDP (DHCP) and ICMP
    /// checksums of sent frames stay with smoltcp.
    pub fn apply(self, caps: &mut ChecksumCapabilities) {
        caps.tcp = match (self.tx_csum, self.rx_csum) {
            (false, false) => Checksum::Both,
            (true, false) => Checksum::Rx,
            (false, true) => Checksum::Tx,
            (true, true) => Checksum::None,
        };
        if self.rx_csum {
            caps.udp = Checksum::Tx;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A TCP SYN (10.199.7.1:41970 → 10.199.7.2:4420, MSS, SACK-permitted, timestamps and
    /// window scale options) as Linux 6.x sent it into a tap without checksum offload, so
    /// the kernel computed its checksum in software: 0xeecb, which tshark 4.0 (`-o
    /// tcp.check_checksum:TRUE`) reports as good. IP header checksum 0x69e4.
    const LINUX_SYN: &str = "525400123456d6f0f5174c4b08004500003cad474000400669e40ac707010ac7\
                             0702a3f2114465abeb3500000000a002faf0eecb0000020405b40402080aefd3\
                             44c4000000000103030a";
    /// A UDP datagram with an odd-length payload (15 bytes, "keel nvme tcp!!"), the same way:
    /// checksum 0x6fc0, good according to tshark.
    const LINUX_UDP: &str = "525400123456b2439b76058408004500002b90914000401186a00ac707010ac7\
                             0702876512b700176fc06b65656c206e766d65207463702121";

    /// RFC 1071 §3's example: the words 0001 f203 f4f5 f6f7 sum to 0xddf2.
    #[test]
    fn rfc1071_example_sum() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(add_words(0, &data)), 0xddf2);
        // The same bytes handed over unaligned to the 8-byte fast path and in pieces.
        assert_eq!(
            fold(add_words(add_words(0, &data[..2]), &data[2..])),
            0xddf2
        );
        assert_eq!(fold(add_words(0, &[data, data].concat())), fold(2 * 0xddf2));
    }

    /// The device side of §5.1.6.2, as QEMU does it (`net_checksum_add`, then the complement
    /// stored at `csum_start + csum_offset`).
    fn device_completes(hdr: &[u8], frame: &mut [u8]) {
        assert_eq!(hdr[0], HDR_F_NEEDS_CSUM);
        let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
        let offset = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
        let sum = !fold(add_words(0, &frame[start..]));
        frame[start + offset..start + offset + 2].copy_from_slice(&sum.to_be_bytes());
    }

    #[test]
    fn offloaded_tcp_checksum_equals_linux_software_checksum() {
        let captured = hex(LINUX_SYN);
        // smoltcp with the TCP checksum offloaded leaves the field at zero.
        let mut frame = captured.clone();
        frame[34 + 16..34 + 18].fill(0);
        let mut hdr = [0u8; NET_HDR_LEN];
        assert!(offload_tx(&mut hdr, &mut frame));
        // csum_start = 14 (Ethernet) + 20 (IPv4), csum_offset = the TCP checksum field.
        assert_eq!(hdr, [1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0]);
        // The field now holds the pseudo-header sum of 10.199.7.1, 10.199.7.2, proto 6,
        // length 40: 0x0ac7 + 0x0701 + 0x0ac7 + 0x0702 + 0x0006 + 0x0028 = 0x23bf.
        assert_eq!(&frame[50..52], &[0x23, 0xbf]);
        device_completes(&hdr, &mut frame);
        assert_eq!(frame, captured);
        assert_eq!(&frame[50..52], &[0xee, 0xcb]);
    }

    /// `LINUX_SYN`'s headers (TCP header with options: 40 bytes) carrying `payload` bytes, the
    /// IPv4 total length set to match, TCP checksum zero (as smoltcp leaves it with offload).
    fn big_segment(payload: usize) -> Vec<u8> {
        let mut f = hex(LINUX_SYN);
        let total = u16::try_from(20 + 40 + payload).unwrap();
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[50..52].fill(0);
        f.extend((0..payload).map(|i| (i * 7 + 3) as u8));
        f
    }

    /// The header of a TSO frame, against `struct virtio_net_hdr` of virtio 1.2 §5.1.6 (and
    /// Linux's `include/uapi/linux/virtio_net.h`): `u8 flags; u8 gso_type; le16 hdr_len;
    /// le16 gso_size; le16 csum_start; le16 csum_offset; le16 num_buffers;`, with
    /// `VIRTIO_NET_HDR_F_NEEDS_CSUM` = 1 and `VIRTIO_NET_HDR_GSO_TCPV4` = 1 (§5.1.6), and
    /// §5.1.6.2's rules for a TSO frame: `hdr_len` the length of the headers (here 14 + 20 +
    /// 40 = 74), `gso_size` the payload bytes per segment, checksum fields as for `NEEDS_CSUM`.
    #[test]
    fn tso_header_bytes_follow_the_spec() {
        let mut frame = big_segment(3000);
        let mut hdr = [0u8; NET_HDR_LEN];
        assert!(offload_tx_gso(&mut hdr, &mut frame, 1448));
        assert_eq!(
            hdr,
            [
                0x01, // flags: NEEDS_CSUM
                0x01, // gso_type: GSO_TCPV4
                0x4a, 0x00, // hdr_len: 74
                0xa8, 0x05, // gso_size: 1448
                0x22, 0x00, // csum_start: 34
                0x10, 0x00, // csum_offset: 16
                0x00, 0x00, // num_buffers
            ]
        );
        // The checksum field: the pseudo-header sum over the whole TCP length, 3040 = 0x0be0:
        // 0x0ac7 + 0x0701 + 0x0ac7 + 0x0702 + 0x0006 + 0x0be0 = 0x2f77.
        assert_eq!(&frame[50..52], &[0x2f, 0x77]);
        // Not TCP, or no MSS: no segmentation asked for.
        assert!(!offload_tx_gso(
            &mut [0u8; NET_HDR_LEN],
            &mut hex(LINUX_UDP),
            1448
        ));
        assert!(!offload_tx_gso(
            &mut [0u8; NET_HDR_LEN],
            &mut big_segment(3000),
            0
        ));
    }

    /// What Linux does with the frame (net/ipv4/tcp_offload.c, `tcp_gso_segment`): cut the
    /// payload into `mss` pieces behind copies of the headers, replace the whole length in the
    /// partial checksum by each segment's (ones'-complement add of the old length's
    /// complement and the new length), then complete the checksum like any `NEEDS_CSUM`
    /// frame. Every segment must then carry a right checksum, judged from scratch.
    #[test]
    fn segments_the_device_cuts_have_right_checksums() {
        for payload in [1449, 2896, 3000, 60_000] {
            let mut frame = big_segment(payload);
            let mut hdr = [0u8; NET_HDR_LEN];
            let mss = 1448;
            assert!(offload_tx_gso(&mut hdr, &mut frame, mss));
            let headers = usize::from(u16::from_le_bytes([hdr[2], hdr[3]]));
            let partial = u16::from_be_bytes([frame[50], frame[51]]);
            let whole_len = (payload + 40) as u16;
            let mut segments = 0;
            for chunk in frame[headers..].chunks(usize::from(mss)) {
                let mut seg = frame[..headers].to_vec();
                seg.extend_from_slice(chunk);
                let total = (20 + 40 + chunk.len()) as u16;
                seg[16..18].copy_from_slice(&total.to_be_bytes());
                let seg_len = 40 + chunk.len() as u64;
                let sum = fold(u64::from(partial) + u64::from(!whole_len) + seg_len);
                seg[50..52].copy_from_slice(&sum.to_be_bytes());
                device_completes(&hdr, &mut seg);
                assert!(
                    l4_checksum_ok(&seg),
                    "payload {payload}, segment {segments}"
                );
                segments += 1;
            }
            assert_eq!(segments, payload.div_ceil(usize::from(mss)));
        }
    }

    #[test]
    fn pseudo_header_sums() {
        // The SYN's, by hand above.
        assert_eq!(
            pseudo_header_sum([10, 199, 7, 1], [10, 199, 7, 2], 6, 40),
            0x23bf
        );
        // A carry out of 16 bits is added back: ffff + ffff + ffff + ffff + 0011 + ffff.
        assert_eq!(
            pseudo_header_sum([255; 4], [255; 4], 17, 0xffff),
            fold(5 * 0xffff + 0x11)
        );
        assert_eq!(fold(5 * 0xffff + 0x11), 0x0011);
    }

    #[test]
    fn received_checksums_verified() {
        let syn = hex(LINUX_SYN);
        let udp = hex(LINUX_UDP);
        assert!(l4_checksum_ok(&syn));
        assert!(l4_checksum_ok(&udp));
        // A flipped payload bit, a wrong checksum, a wrong pseudo-header (address).
        for at in [60, 50, 29] {
            let mut bad = syn.clone();
            bad[at] ^= 0x10;
            assert!(!l4_checksum_ok(&bad), "byte {at}");
        }
        let mut bad = udp.clone();
        bad[udp.len() - 1] ^= 1; // the odd last byte
        assert!(!l4_checksum_ok(&bad));
        // UDP without a checksum (0) passes.
        let mut none = udp.clone();
        none[40..42].fill(0);
        assert!(l4_checksum_ok(&none));
        // Ethernet padding after the IP packet is not summed.
        let mut padded = udp.clone();
        padded.extend_from_slice(&[0xaa; 7]);
        assert!(l4_checksum_ok(&padded));
    }

    #[test]
    fn malformed_frames_never_panic() {
        let syn = hex(LINUX_SYN);
        // Truncated anywhere, the IP total length past the frame, a bogus IHL.
        for n in 0..syn.len() {
            let mut f = syn[..n].to_vec();
            let _ = l4_checksum_ok(&f);
            let mut hdr = [0u8; NET_HDR_LEN];
            let _ = offload_tx(&mut hdr, &mut f);
        }
        let mut long = syn.clone();
        long[16..18].copy_from_slice(&0xffffu16.to_be_bytes());
        assert!(l4_checksum_ok(&long)); // not a packet smoltcp accepts: left to it
        let mut hdr = [0u8; NET_HDR_LEN];
        assert!(!offload_tx(&mut hdr, &mut long));
        for ihl in 0..16u8 {
            let mut f = syn.clone();
            f[14] = 0x40 | ihl;
            let _ = l4_checksum_ok(&f);
            let _ = offload_tx(&mut [0u8; NET_HDR_LEN], &mut f);
        }
        // A fragment is left alone, and so is UDP on transmit (smoltcp sums it).
        let mut frag = syn.clone();
        frag[20] |= 0x20;
        assert!(!offload_tx(&mut [0u8; NET_HDR_LEN], &mut frag));
        assert!(!offload_tx(&mut [0u8; NET_HDR_LEN], &mut hex(LINUX_UDP)));
    }

    #[test]
    fn trusted_flags() {
        assert!(!rx_trusted(&[0; NET_HDR_LEN]));
        assert!(rx_trusted(&[HDR_F_DATA_VALID, 0]));
        assert!(rx_trusted(&[HDR_F_NEEDS_CSUM, 0]));
        assert!(!rx_trusted(&[]));
    }

    #[test]
    fn offloads_decide_what_smoltcp_checksums() {
        // (computes on transmit, verifies on receive) for TCP, UDP, IPv4, ICMP.
        let caps = |tx_csum, rx_csum| {
            let mut c = ChecksumCapabilities::default();
            Offloads {
                tx_csum,
                rx_csum,
                tso4: false,
                rx_tso4: false,
            }
            .apply(&mut c);
            [c.tcp, c.udp, c.ipv4, c.icmpv4].map(|x| (x.tx(), x.rx()))
        };
        const BOTH: (bool, bool) = (true, true);
        // No offload: everything in software, as before.
        assert_eq!(caps(false, false), [BOTH; 4]);
        // CSUM: TCP checksums of sent segments are the device's; received ones still checked.
        assert_eq!(caps(true, false), [(false, true), BOTH, BOTH, BOTH]);
        // GUEST_CSUM: the driver checks received TCP/UDP; smoltcp still sums what it sends.
        assert_eq!(
            caps(false, true),
            [(true, false), (true, false), BOTH, BOTH]
        );
        assert_eq!(
            caps(true, true),
            [(false, false), (true, false), BOTH, BOTH]
        );
    }
}
