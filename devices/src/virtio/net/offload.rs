//! Checksum and TCP segmentation offload for the network card.
//!
//! The peer of a card is a unix socket carrying plain Ethernet frames
//! (QEMU's `-netdev stream` framing: no virtio-net header, so no offload
//! information can cross it). The card therefore finishes on its own side
//! whatever the guest left to it, and what leaves it is always a complete,
//! correctly checksummed frame no larger than the guest's MSS allows:
//!
//! * transmit, `VIRTIO_NET_F_CSUM`: a frame flagged `NEEDS_CSUM` gets its
//!   checksum computed from `csum_start` to the end and stored at
//!   `csum_start + csum_offset` (the guest left the pseudo-header's sum
//!   there), as a NIC does;
//! * transmit, `HOST_TSO4` / `HOST_TSO6`: a TCP segment of up to 64 KiB
//!   is cut into frames of `gso_size` payload bytes, each with its own
//!   IPv4 total length and id (or IPv6 payload length), sequence number,
//!   flags (FIN and PSH on the last only, CWR on the first only) and
//!   checksums computed in full;
//! * receive, `GUEST_CSUM`: a TCP or UDP frame over IPv4 or IPv6 whose
//!   checksum the card has verified is marked `DATA_VALID`, so the guest
//!   does not verify it again; any other frame goes up unmarked and the
//!   guest checks it as usual. Nothing is marked without being checked.
//!
//! Every header here is written by the guest or a peer and is untrusted:
//! a frame the card cannot make sense of is refused (`Err` with the
//! reason, for the queue core's rate-limited log), never indexed out of
//! bounds.

/// The driver may leave transmit checksums to the device.
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// The device may mark received frames whose checksum it verified.
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
/// The driver may send TCP/IPv4 segments of up to 64 KiB.
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
/// The driver may send TCP/IPv6 segments of up to 64 KiB.
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
/// Every offload feature the card offers.
pub const OFFLOAD_FEATURES: u64 =
    VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6;

/// Header flag: the checksum from `csum_start` on is left to the device.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// Header flag: the device verified the frame's checksum.
pub const HDR_F_DATA_VALID: u8 = 2;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

/// Smallest `gso_size` taken: one below cannot be a real MSS, and would
/// make one chain into tens of thousands of frames.
pub const MIN_GSO_SIZE: usize = 64;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// The fields of a transmit chain's virtio-net header that ask for work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxHeader {
    /// `HDR_F_*`.
    pub flags: u8,
    /// `GSO_*`, with the ECN bit.
    pub gso_type: u8,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksummed range starts.
    pub csum_start: u16,
    /// Where in that range the checksum goes.
    pub csum_offset: u16,
}

impl TxHeader {
    /// The header's fields (little-endian, virtio 1.x).
    pub fn parse(h: &[u8; 12]) -> TxHeader {
        let le = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        TxHeader {
            flags: h[0],
            gso_type: h[1],
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        }
    }
}

/// Completes `frame` as `header` asks, within the offloads in `acked`,
/// and hands each frame that results to `emit` (one, or one per segment);
/// `scratch` holds segments while they are built.
pub fn transmit(
    header: &TxHeader,
    acked: u64,
    frame: &mut [u8],
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), &'static str> {
    if header.gso_type & GSO_ECN != 0 {
        return Err("ECN segmentation was not offered");
    }
    match header.gso_type {
        GSO_NONE => {
            if header.flags & HDR_F_NEEDS_CSUM != 0 {
                if acked & VIRTIO_NET_F_CSUM == 0 {
                    return Err("a checksum left to the device, which was not offered");
                }
                complete_checksum(
                    frame,
                    usize::from(header.csum_start),
                    usize::from(header.csum_offset),
                )?;
            }
            emit(frame);
            Ok(())
        }
        GSO_TCPV4 | GSO_TCPV6 => {
            let v6 = header.gso_type == GSO_TCPV6;
            let feature = if v6 {
                VIRTIO_NET_F_HOST_TSO6
            } else {
                VIRTIO_NET_F_HOST_TSO4
            };
            if acked & feature == 0 {
                return Err("a TCP segment to cut, which was not offered");
            }
            segment_tcp(frame, usize::from(header.gso_size), v6, scratch, emit)
        }
        _ => Err("a segmentation type that was not offered"),
    }
}

/// The ones' complement sum of `data` as big-endian 16-bit words (an odd
/// last byte padded with zero), not yet folded.
fn sum(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    let mut s: u64 = chunks
        .by_ref()
        .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    if let [last] = chunks.remainder() {
        s += u64::from(*last) << 8;
    }
    s
}

/// Folds a sum to 16 bits.
fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The checksum to store for a range whose sum is `s` (zero is written as
/// 0xffff, its equal in ones' complement, since UDP reads zero as "none").
fn finish(s: u64) -> [u8; 2] {
    match !fold(s) {
        0 => [0xff, 0xff],
        c => c.to_be_bytes(),
    }
}

/// The generic transmit checksum: the sum of `frame[start..]` (whose
/// checksum field holds the pseudo-header's sum) stored at
/// `start + offset`.
fn complete_checksum(frame: &mut [u8], start: usize, offset: usize) -> Result<(), &'static str> {
    let at = start
        .checked_add(offset)
        .ok_or("checksum offset overflows")?;
    if start >= frame.len() || at.checked_add(2).is_none_or(|end| end > frame.len()) {
        return Err("checksum start or offset beyond the frame");
    }
    let c = finish(sum(&frame[start..]));
    frame[at..at + 2].copy_from_slice(&c);
    Ok(())
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Where the IP header starts and the ethertype after any VLAN tags.
fn l3_start(frame: &[u8]) -> Option<(usize, u16)> {
    let mut at = 12;
    let mut ethertype = be16(frame, at)?;
    // At most two tags (802.1ad and 802.1Q).
    for _ in 0..2 {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        at += 4;
        ethertype = be16(frame, at)?;
    }
    Some((at + 2, ethertype))
}

/// An IP packet's layout in a frame.
struct Ip {
    l3: usize,
    l4: usize,
    /// Where the IP packet ends (the frame may be padded beyond).
    end: usize,
    proto: u8,
    v6: bool,
}

impl Ip {
    /// The IPv4 or IPv6 packet in `frame` (IPv6 without extension headers,
    /// IPv4 unfragmented), checked against the frame's length.
    fn parse(frame: &[u8]) -> Option<Ip> {
        let (l3, ethertype) = l3_start(frame)?;
        let version = frame.get(l3)? >> 4;
        match (ethertype, version) {
            (ETHERTYPE_IPV4, 4) => {
                let ihl = usize::from(frame[l3] & 0x0f) * 4;
                let total = usize::from(be16(frame, l3 + 2)?);
                let frag = be16(frame, l3 + 6)?;
                // More fragments, or not the first: no whole L4 packet.
                if ihl < 20 || total < ihl || frag & 0x3fff != 0 {
                    return None;
                }
                let end = l3.checked_add(total).filter(|e| *e <= frame.len())?;
                Some(Ip {
                    l3,
                    l4: l3 + ihl,
                    end,
                    proto: *frame.get(l3 + 9)?,
                    v6: false,
                })
            }
            (ETHERTYPE_IPV6, 6) => {
                let payload = usize::from(be16(frame, l3 + 4)?);
                let end = (l3 + 40)
                    .checked_add(payload)
                    .filter(|e| *e <= frame.len())?;
                Some(Ip {
                    l3,
                    l4: l3 + 40,
                    end,
                    proto: *frame.get(l3 + 6)?,
                    v6: true,
                })
            }
            _ => None,
        }
    }

    /// The pseudo-header's sum for an L4 packet of `len` bytes.
    fn pseudo_sum(&self, frame: &[u8], len: usize) -> u64 {
        let addrs = if self.v6 {
            &frame[self.l3 + 8..self.l3 + 40]
        } else {
            &frame[self.l3 + 12..self.l3 + 20]
        };
        sum(addrs) + u64::from(self.proto) + len as u64
    }
}

/// Cuts the TCP segment in `frame` into frames of at most `mss` payload
/// bytes, each complete with its own lengths, sequence number, flags and
/// checksums, handed to `emit` in order.
fn segment_tcp(
    frame: &[u8],
    mss: usize,
    v6: bool,
    seg: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), &'static str> {
    if mss < MIN_GSO_SIZE {
        return Err("a segment size too small to be an MSS");
    }
    let ip = Ip::parse(frame).ok_or("a TCP segment without a whole IP header")?;
    if ip.v6 != v6 || ip.proto != PROTO_TCP {
        return Err("a TCP segment whose IP header is not TCP over the announced IP version");
    }
    let doff = usize::from(
        frame
            .get(ip.l4 + 12)
            .ok_or("a TCP header beyond the frame")?
            >> 4,
    ) * 4;
    let payload_at = ip.l4 + doff;
    if doff < 20 || payload_at > ip.end {
        return Err("a TCP header beyond the IP packet");
    }
    let headers = &frame[..payload_at];
    let payload = &frame[payload_at..ip.end];
    let seq = u32::from_be_bytes([
        frame[ip.l4 + 4],
        frame[ip.l4 + 5],
        frame[ip.l4 + 6],
        frame[ip.l4 + 7],
    ]);
    let id = be16(frame, ip.l3 + 4).unwrap_or(0);
    let tcp_flags = frame[ip.l4 + 13];
    let count = payload.len().div_ceil(mss).max(1);
    for i in 0..count {
        let chunk = payload
            .get(i * mss..((i + 1) * mss).min(payload.len()))
            .unwrap_or(&[]);
        seg.clear();
        seg.extend_from_slice(headers);
        seg.extend_from_slice(chunk);
        let (l3, l4) = (ip.l3, ip.l4);
        let l4_len = seg.len() - l4;
        // Lengths fit in 16 bits: the whole frame did.
        if ip.v6 {
            seg[l3 + 4..l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        } else {
            let total = (seg.len() - l3) as u16;
            seg[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
            seg[l3 + 4..l3 + 6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            seg[l3 + 10..l3 + 12].fill(0);
            let c = !fold(sum(&seg[l3..l4]));
            seg[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        let offset = (i * mss) as u32;
        seg[l4 + 4..l4 + 8].copy_from_slice(&seq.wrapping_add(offset).to_be_bytes());
        let mut f = tcp_flags;
        if i + 1 < count {
            f &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            f &= !TCP_CWR;
        }
        seg[l4 + 13] = f;
        seg[l4 + 16..l4 + 18].fill(0);
        let c = finish(ip.pseudo_sum(seg, l4_len) + sum(&seg[l4..]));
        seg[l4 + 16..l4 + 18].copy_from_slice(&c);
        emit(seg);
    }
    Ok(())
}

/// Whether `frame` is TCP or UDP over IPv4 or IPv6 with a correct
/// checksum (a UDP/IPv4 frame without one does not count).
pub fn checksum_verified(frame: &[u8]) -> bool {
    let Some(ip) = Ip::parse(frame) else {
        return false;
    };
    let l4 = &frame[ip.l4..ip.end];
    let checksum_at = match ip.proto {
        PROTO_TCP if l4.len() >= 20 => 16,
        PROTO_UDP if l4.len() >= 8 => 6,
        _ => return false,
    };
    if ip.proto == PROTO_UDP && be16(l4, checksum_at) == Some(0) {
        return false;
    }
    fold(ip.pseudo_sum(frame, l4.len()) + sum(l4)) == 0xffff
}

#[cfg(test)]
/// An Ethernet frame with a TCP segment of `payload` over IPv4 (or
/// IPv6), flags `flags`, with zero checksums.
pub(super) fn tcp_frame(v6: bool, payload: &[u8], flags: u8) -> Vec<u8> {
    let mut f = vec![0x52, 0x54, 0, 0x12, 1, 2, 0x52, 0x54, 0, 0x12, 1, 1];
    let tcp_len = 20 + payload.len();
    if v6 {
        f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        f.extend_from_slice(&[PROTO_TCP, 64]);
        f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    } else {
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, PROTO_TCP, 0, 0]);
        f.extend_from_slice(&[192, 168, 1, 1, 192, 168, 1, 2]);
    }
    f.extend_from_slice(&[0x9c, 0x40, 0x00, 0x50]); // ports 40000 -> 80
    f.extend_from_slice(&0xffff_fff0u32.to_be_bytes()); // seq (wraps)
    f.extend_from_slice(&7u32.to_be_bytes()); // ack
    f.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn segments(frame: &[u8], header: TxHeader, acked: u64) -> Result<Vec<Vec<u8>>, &'static str> {
        let mut out = Vec::new();
        let mut f = frame.to_vec();
        transmit(&header, acked, &mut f, &mut Vec::new(), |s| {
            out.push(s.to_vec())
        })?;
        Ok(out)
    }

    fn tso(v6: bool, mss: u16) -> TxHeader {
        TxHeader {
            flags: HDR_F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            gso_size: mss,
            csum_start: if v6 { 54 } else { 34 },
            csum_offset: 16,
        }
    }

    #[test]
    fn a_large_segment_is_cut_into_checksummed_frames_in_order() {
        for v6 in [false, true] {
            let data = payload(10_000);
            let frame = tcp_frame(v6, &data, TCP_PSH | TCP_FIN | TCP_CWR | 0x10);
            let segs = segments(&frame, tso(v6, 1448), OFFLOAD_FEATURES).unwrap();
            assert_eq!(segs.len(), 7, "v6={v6}");
            let mut joined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                assert!(checksum_verified(s), "segment {i} v6={v6}");
                let ip = Ip::parse(s).unwrap();
                assert_eq!(ip.end, s.len());
                let l4 = ip.l4;
                let seq = u32::from_be_bytes(s[l4 + 4..l4 + 8].try_into().unwrap());
                assert_eq!(seq, 0xffff_fff0u32.wrapping_add(i as u32 * 1448));
                let flags = s[l4 + 13];
                assert_eq!(flags & TCP_CWR != 0, i == 0);
                assert_eq!(flags & (TCP_FIN | TCP_PSH) != 0, i == 6);
                assert_eq!(flags & 0x10, 0x10, "ACK stays");
                if !v6 {
                    assert_eq!(fold(sum(&s[14..34])), 0xffff, "IPv4 header checksum");
                    assert_eq!(be16(s, 18), Some(0x1234 + i as u16), "IPv4 id");
                }
                joined.extend_from_slice(&s[l4 + 20..]);
            }
            assert_eq!(joined, data);
            assert_eq!(segs[6].len(), ip_headers(v6) + 10_000 - 6 * 1448);
        }
    }

    fn ip_headers(v6: bool) -> usize {
        if v6 {
            14 + 40 + 20
        } else {
            14 + 20 + 20
        }
    }

    #[test]
    fn a_partial_checksum_is_completed() {
        let mut frame = tcp_frame(false, &payload(999), 0x18);
        // The guest stores the pseudo-header's sum, as Linux does.
        let ip = Ip::parse(&frame).unwrap();
        let pseudo = fold(ip.pseudo_sum(&frame, frame.len() - 34));
        frame[50..52].copy_from_slice(&pseudo.to_be_bytes());
        let header = TxHeader {
            flags: HDR_F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..TxHeader::default()
        };
        let out = segments(&frame, header, VIRTIO_NET_F_CSUM).unwrap();
        assert_eq!(out.len(), 1);
        assert!(checksum_verified(&out[0]));
        assert!(!checksum_verified(&frame));
    }

    #[test]
    fn what_was_not_offered_or_does_not_parse_is_refused() {
        let frame = tcp_frame(false, &payload(3000), 0x10);
        let refused = |f: &[u8], h: TxHeader, acked: u64| segments(f, h, acked).unwrap_err();
        assert_eq!(
            refused(&frame, tso(false, 1448), VIRTIO_NET_F_CSUM),
            "a TCP segment to cut, which was not offered"
        );
        let csum = TxHeader {
            flags: HDR_F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..TxHeader::default()
        };
        assert_eq!(
            refused(&frame, csum, 0),
            "a checksum left to the device, which was not offered"
        );
        for (start, offset) in [(3100, 0), (34, 3019), (u16::MAX, u16::MAX), (3052, 16)] {
            let h = TxHeader {
                csum_start: start,
                csum_offset: offset,
                ..csum
            };
            assert_eq!(
                refused(&frame, h, OFFLOAD_FEATURES),
                "checksum start or offset beyond the frame",
                "{start} {offset}"
            );
        }
        assert_eq!(
            refused(&frame, tso(true, 1448), OFFLOAD_FEATURES),
            "a TCP segment whose IP header is not TCP over the announced IP version"
        );
        assert_eq!(
            refused(&frame, tso(false, 8), OFFLOAD_FEATURES),
            "a segment size too small to be an MSS"
        );
        let ecn = TxHeader {
            gso_type: GSO_TCPV4 | GSO_ECN,
            ..tso(false, 1448)
        };
        assert_eq!(
            refused(&frame, ecn, OFFLOAD_FEATURES),
            "ECN segmentation was not offered"
        );
        let udp = TxHeader {
            gso_type: 3,
            ..tso(false, 1448)
        };
        assert_eq!(
            refused(&frame, udp, OFFLOAD_FEATURES),
            "a segmentation type that was not offered"
        );
        // Every cut of the frame, and lengths that lie, are refused or cut
        // correctly, never a panic.
        for len in 0..frame.len() {
            let _ = segments(&frame[..len], tso(false, 1448), OFFLOAD_FEATURES);
        }
        let mut lying = frame.clone();
        lying[16..18].copy_from_slice(&60_000u16.to_be_bytes());
        assert_eq!(
            refused(&lying, tso(false, 1448), OFFLOAD_FEATURES),
            "a TCP segment without a whole IP header"
        );
        let mut short_doff = frame.clone();
        short_doff[46] = 0x40;
        assert_eq!(
            refused(&short_doff, tso(false, 1448), OFFLOAD_FEATURES),
            "a TCP header beyond the IP packet"
        );
    }

    #[test]
    fn received_checksums_are_verified_before_being_vouched_for() {
        let frame = tcp_frame(false, &payload(100), 0x10);
        let good = segments(&frame, tso(false, 1448), OFFLOAD_FEATURES).unwrap();
        assert!(checksum_verified(&good[0]));
        let mut bad = good[0].clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(!checksum_verified(&bad));
        // Ethernet padding beyond the IP packet is not summed.
        let mut padded = good[0].clone();
        padded.extend_from_slice(&[0xaa; 20]);
        assert!(checksum_verified(&padded));
        // A fragment, ARP, or a plain frame is left to the guest.
        let mut fragment = good[0].clone();
        fragment[20] |= 0x20;
        assert!(!checksum_verified(&fragment));
        assert!(!checksum_verified(&[0u8; 60]));
        assert!(!checksum_verified(&good[0][..40]));
        // UDP without a checksum is not vouched for; with one it is.
        let mut udp = vec![0u8; 12];
        udp.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        udp.extend_from_slice(&[0x45, 0, 0, 36, 0, 0, 0, 0, 64, PROTO_UDP, 0, 0]);
        udp.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        udp.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 16, 0, 0]);
        udp.extend_from_slice(b"8 bytes!");
        assert!(!checksum_verified(&udp));
        let ip = Ip::parse(&udp).unwrap();
        let c = finish(ip.pseudo_sum(&udp, 16) + sum(&udp[34..]));
        udp[40..42].copy_from_slice(&c);
        assert!(checksum_verified(&udp));
        // A VLAN-tagged frame is looked into.
        let mut tagged = good[0][..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        tagged.extend_from_slice(&good[0][12..]);
        assert!(checksum_verified(&tagged));
    }

    #[test]
    fn sums_fold_and_zero_is_written_as_ffff() {
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
        assert_eq!(fold(0x1_fffe), 0xffff);
        assert_eq!(fold(0x2_0001), 0x0003);
        assert_eq!(finish(0xffff), [0xff, 0xff]);
        assert_eq!(finish(0x1234), (!0x1234u16).to_be_bytes());
    }
}
