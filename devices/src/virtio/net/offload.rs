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
//! * receive, `GUEST_TSO4` / `GUEST_TSO6` (with `GUEST_CSUM` and mergeable
//!   buffers): in-order segments of one TCP flow already read from the
//!   socket are joined into one large segment, as a NIC's receive offload
//!   (or Linux's GRO) does, so the guest takes one buffer chain, one packet
//!   through its stack and one wake-up for up to 64 KiB instead of one per
//!   1,448 bytes. Only segments that Linux's GRO would join are joined
//!   (same addresses, ports, acknowledgement, window and TCP options,
//!   consecutive sequence numbers, plain ACK flags with PSH on the last
//!   only, no segment longer than the first), and only ones whose
//!   checksums the card verified: the joined segment goes up as a partial
//!   checksum (`NEEDS_CSUM`) with `gso_size` set, which the guest's stack
//!   trusts and can cut again when it forwards it.
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
/// The driver takes received TCP/IPv4 segments of up to 64 KiB.
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
/// The driver takes received TCP/IPv6 segments of up to 64 KiB.
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
/// Every offload feature the card offers.
pub const OFFLOAD_FEATURES: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6;

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
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
/// Most IP packet bytes (header and payload) a joined segment may have:
/// IPv4's total length is 16 bits, and IPv6's payload length too.
const MAX_JOINED_IP_LEN: usize = 65_535;

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
    let Segment {
        ip,
        payload_at,
        seq,
        flags: tcp_flags,
    } = Segment::of(frame, ip).ok_or("a TCP header beyond the IP packet")?;
    let headers = &frame[..payload_at];
    let payload = &frame[payload_at..ip.end];
    let id = be16(frame, ip.l3 + 4).unwrap_or(0);
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

/// The frames [`coalesce`] joined: how many, their bytes on the wire, and
/// the virtio-net header (without `num_buffers`) the joined frame goes up
/// with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    /// Frames joined (at least two).
    pub frames: usize,
    /// Their bytes as received.
    pub wire_bytes: usize,
    /// `flags`, `gso_type`, `hdr_len`, `gso_size`, `csum_start` and
    /// `csum_offset`, little-endian, as the first ten header bytes.
    pub header: [u8; 10],
}

/// A TCP segment's layout, sequence number and flags.
struct Segment {
    ip: Ip,
    /// Where the payload starts.
    payload_at: usize,
    seq: u32,
    flags: u8,
}

impl Segment {
    /// The TCP segment of the IP packet `ip` in `frame` (its protocol
    /// checked by the caller); `None` when its header does not lie whole
    /// within the IP packet.
    fn of(frame: &[u8], ip: Ip) -> Option<Segment> {
        let doff = usize::from(*frame.get(ip.l4 + 12)? >> 4) * 4;
        let payload_at = ip.l4 + doff;
        if doff < 20 || payload_at > ip.end {
            return None;
        }
        let seq = u32::from_be_bytes(frame[ip.l4 + 4..ip.l4 + 8].try_into().ok()?);
        Some(Segment {
            flags: frame[ip.l4 + 13],
            ip,
            payload_at,
            seq,
        })
    }

    /// The TCP segment in `frame`, if it is one joining may take: TCP over
    /// IPv4 (unfragmented) or IPv6 (no extension headers), with a payload,
    /// only ACK and perhaps PSH set. Its checksum is left to the caller,
    /// as the costliest check.
    fn joinable(frame: &[u8]) -> Option<Segment> {
        let ip = Ip::parse(frame)?;
        if ip.proto != PROTO_TCP {
            return None;
        }
        let seg = Segment::of(frame, ip)?;
        (seg.payload_at < seg.ip.end && seg.flags & !TCP_PSH == TCP_ACK).then_some(seg)
    }

    fn payload_len(&self) -> usize {
        self.ip.end - self.payload_at
    }

    /// Whether `next` (in `nf`) continues the flow of this segment (in
    /// `f`) as Linux's GRO would join it: the same Ethernet and IP headers
    /// but for the lengths, id and header checksum, the same ports,
    /// acknowledgement, window and options, and the same flags but PSH.
    fn same_flow(&self, f: &[u8], next: &Segment, nf: &[u8]) -> bool {
        let (a, b) = (&self.ip, &next.ip);
        if a.l3 != b.l3 || a.v6 != b.v6 || self.payload_at != next.payload_at {
            return false;
        }
        let ip_same = if a.v6 {
            // Version, class and flow label; next header, hop limit and
            // addresses.
            f[a.l3..a.l3 + 4] == nf[b.l3..b.l3 + 4] && f[a.l3 + 6..a.l4] == nf[b.l3 + 6..b.l4]
        } else {
            // Version, header length, TOS; flags and fragment offset, TTL,
            // protocol; addresses and options.
            f[a.l3..a.l3 + 2] == nf[b.l3..b.l3 + 2]
                && f[a.l3 + 6..a.l3 + 10] == nf[b.l3 + 6..b.l3 + 10]
                && f[a.l3 + 12..a.l4] == nf[b.l3 + 12..b.l4]
        };
        ip_same
            && f[..a.l3] == nf[..b.l3]
            // Ports; acknowledgement, data offset.
            && f[a.l4..a.l4 + 4] == nf[b.l4..b.l4 + 4]
            && f[a.l4 + 8..a.l4 + 13] == nf[b.l4 + 8..b.l4 + 13]
            && self.flags & !TCP_PSH == next.flags & !TCP_PSH
            // Window; options (the urgent pointer and checksum differ).
            && f[a.l4 + 14..a.l4 + 16] == nf[b.l4 + 14..b.l4 + 16]
            && f[a.l4 + 20..self.payload_at] == nf[b.l4 + 20..next.payload_at]
    }
}

/// Joins the leading run of in-order segments of one TCP flow among
/// `frames` (whole frames as read, in order) into `out`, at most
/// `max_frame` bytes, when the driver acked receive segmentation for its
/// IP version in `acked`. `None` when fewer than two frames could be
/// joined: the first frame then goes up alone, as it came.
pub fn coalesce<'a>(
    mut frames: impl Iterator<Item = &'a [u8]>,
    acked: u64,
    max_frame: usize,
    out: &mut Vec<u8>,
) -> Option<Joined> {
    let first = frames.next()?;
    let head = Segment::joinable(first)?;
    let feature = if head.ip.v6 {
        VIRTIO_NET_F_GUEST_TSO6
    } else {
        VIRTIO_NET_F_GUEST_TSO4
    };
    if acked & (feature | VIRTIO_NET_F_GUEST_CSUM) != feature | VIRTIO_NET_F_GUEST_CSUM
        || head.flags & TCP_PSH != 0
        || !checksum_verified(first)
    {
        return None;
    }
    let mss = head.payload_len();
    let limit = max_frame.min(head.ip.l3 + MAX_JOINED_IP_LEN);
    out.clear();
    out.extend_from_slice(&first[..head.ip.end]);
    let mut count = 1;
    let mut wire_bytes = first.len();
    let mut next_seq = head.seq.wrapping_add(mss as u32);
    let mut push = false;
    for frame in frames {
        let Some(seg) = Segment::joinable(frame) else {
            break;
        };
        let len = seg.payload_len();
        if seg.seq != next_seq
            || len > mss
            || out.len() + len > limit
            || !head.same_flow(first, &seg, frame)
            || !checksum_verified(frame)
        {
            break;
        }
        out.extend_from_slice(&frame[seg.payload_at..seg.ip.end]);
        count += 1;
        wire_bytes += frame.len();
        next_seq = next_seq.wrapping_add(len as u32);
        push = seg.flags & TCP_PSH != 0;
        // A short segment or PSH ends a run, as in Linux's GRO.
        if push || len < mss {
            break;
        }
    }
    if count < 2 {
        return None;
    }
    let Ip { l3, l4, .. } = head.ip;
    let l4_len = out.len() - l4;
    // Lengths fit in 16 bits: `limit` kept the IP packet within them.
    if head.ip.v6 {
        out[l3 + 4..l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        let total = (out.len() - l3) as u16;
        out[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
        out[l3 + 10..l3 + 12].fill(0);
        let c = !fold(sum(&out[l3..l4]));
        out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    if push {
        out[l4 + 13] |= TCP_PSH;
    }
    // A partial checksum: the pseudo-header's sum, which the guest's stack
    // takes as checked (every joined segment's sum was).
    let pseudo = fold(head.ip.pseudo_sum(out, l4_len));
    out[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    let gso_type = if head.ip.v6 { GSO_TCPV6 } else { GSO_TCPV4 };
    let le = |v: usize| (v as u16).to_le_bytes();
    let mut header = [0u8; 10];
    header[0] = HDR_F_NEEDS_CSUM;
    header[1] = gso_type;
    header[2..4].copy_from_slice(&le(head.payload_at));
    header[4..6].copy_from_slice(&le(mss));
    header[6..8].copy_from_slice(&le(l4));
    header[8..10].copy_from_slice(&le(16));
    Some(Joined {
        frames: count,
        wire_bytes,
        header,
    })
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

    /// Joins `segs` as the card would for a driver that acked everything.
    fn join(segs: &[Vec<u8>]) -> Option<(Joined, Vec<u8>)> {
        let mut out = Vec::new();
        let j = coalesce(
            segs.iter().map(Vec::as_slice),
            OFFLOAD_FEATURES,
            65_535 + 14,
            &mut out,
        )?;
        Some((j, out))
    }

    /// The segments the card cuts `data` into at `mss`, ACK and PSH set.
    fn cut(v6: bool, data: &[u8], mss: u16) -> Vec<Vec<u8>> {
        let frame = tcp_frame(v6, data, TCP_ACK | TCP_PSH);
        segments(&frame, tso(v6, mss), OFFLOAD_FEATURES).unwrap()
    }

    #[test]
    fn in_order_segments_are_joined_into_one_that_cuts_back_into_them() {
        for v6 in [false, true] {
            let data = payload(10_000);
            let segs = cut(v6, &data, 1448);
            let (j, out) = join(&segs).unwrap();
            assert_eq!(j.frames, 7, "v6={v6}");
            assert_eq!(j.wire_bytes, segs.iter().map(Vec::len).sum::<usize>());
            let headers = ip_headers(v6);
            assert_eq!(out.len(), headers + 10_000);
            assert_eq!(&out[headers..], &data[..]);
            let l4 = if v6 { 54 } else { 34 };
            let le = |i: usize| u16::from_le_bytes([j.header[i], j.header[i + 1]]);
            assert_eq!(j.header[0], HDR_F_NEEDS_CSUM);
            assert_eq!(j.header[1], if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
            assert_eq!(usize::from(le(2)), headers, "hdr_len");
            assert_eq!(le(4), 1448, "gso_size");
            assert_eq!(usize::from(le(6)), l4, "csum_start");
            assert_eq!(le(8), 16, "csum_offset");
            // PSH of the last segment is kept.
            assert_eq!(out[l4 + 13], TCP_ACK | TCP_PSH);
            // The partial checksum, completed as the guest's stack would,
            // is right, and so is the IPv4 header's.
            let mut done = out.clone();
            complete_checksum(&mut done, l4, 16).unwrap();
            assert!(checksum_verified(&done), "v6={v6}");
            // Cut again at gso_size, it gives back the very frames joined.
            let header = TxHeader {
                flags: HDR_F_NEEDS_CSUM,
                gso_type: j.header[1],
                gso_size: le(4),
                csum_start: le(6),
                csum_offset: le(8),
            };
            assert_eq!(segments(&out, header, OFFLOAD_FEATURES).unwrap(), segs);
        }
    }

    #[test]
    fn a_run_ends_where_linux_would_end_it() {
        let segs = cut(false, &payload(8 * 1000), 1000);
        let mss = 1000;
        let l4 = 34;
        let joined = |segs: &[Vec<u8>]| join(segs).map(|(j, _)| j.frames);
        assert_eq!(joined(&segs), Some(8));
        // A gap in the sequence.
        let mut gap = segs.clone();
        gap.remove(3);
        assert_eq!(joined(&gap), Some(3));
        // Another window, port or acknowledgement: another run.
        for at in [l4 + 14, l4 + 1, l4 + 9] {
            let mut other = segs.clone();
            other[2][at] ^= 1;
            // Keep the checksum right: only the field differs.
            other[2][l4 + 16..l4 + 18].fill(0);
            let ip = Ip::parse(&other[2]).unwrap();
            let c = finish(ip.pseudo_sum(&other[2], other[2].len() - l4) + sum(&other[2][l4..]));
            other[2][l4 + 16..l4 + 18].copy_from_slice(&c);
            assert_eq!(joined(&other), Some(2), "byte {at}");
        }
        // A segment whose checksum is wrong is not vouched for.
        let mut bad = segs.clone();
        let last = bad[1].len() - 1;
        bad[1][last] ^= 1;
        assert_eq!(joined(&bad), None);
        // PSH on the first: it goes up alone; on a later one, it ends the
        // run with itself.
        assert_eq!(joined(&segs[7..]), None);
        let mut push = segs.clone();
        push[2][l4 + 13] |= TCP_PSH;
        push[2][l4 + 16..l4 + 18].fill(0);
        let c = finish(
            Ip::parse(&push[2]).unwrap().pseudo_sum(&push[2], mss + 20) + sum(&push[2][l4..]),
        );
        push[2][l4 + 16..l4 + 18].copy_from_slice(&c);
        assert_eq!(joined(&push), Some(3));
        // A short segment ends the run with itself; a longer one does not
        // join.
        let short = cut(false, &payload(1500), 1000);
        let mut longer = short.clone();
        longer.reverse();
        assert_eq!(joined(&short), Some(2));
        assert_eq!(joined(&longer), None);
        // The size limit.
        let mut out = Vec::new();
        let j = coalesce(
            segs.iter().map(Vec::as_slice),
            OFFLOAD_FEATURES,
            34 + 20 + 3500,
            &mut out,
        );
        assert_eq!(j.map(|j| j.frames), Some(3));
    }

    #[test]
    fn only_what_the_driver_acked_and_plain_tcp_is_joined() {
        let v4 = cut(false, &payload(3000), 1000);
        let v6 = cut(true, &payload(3000), 1000);
        let frames = |segs: &[Vec<u8>], acked| {
            let mut out = Vec::new();
            coalesce(segs.iter().map(Vec::as_slice), acked, 70_000, &mut out).map(|j| j.frames)
        };
        let tso4 = VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_CSUM;
        let tso6 = VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_CSUM;
        assert_eq!(frames(&v4, tso4), Some(3));
        assert_eq!(frames(&v4, tso6), None);
        assert_eq!(frames(&v6, tso6), Some(3));
        assert_eq!(frames(&v6, tso4), None);
        assert_eq!(frames(&v4, VIRTIO_NET_F_GUEST_TSO4), None, "no GUEST_CSUM");
        // SYN, FIN, RST, URG, ECE or CWR, and segments without a payload
        // go up as they came.
        for flag in [0x02, TCP_FIN, 0x04, 0x20, 0x40, TCP_CWR] {
            let segs: Vec<Vec<u8>> = (0..2)
                .map(|_| {
                    let mut f = tcp_frame(false, &payload(100), TCP_ACK | flag);
                    let ip = Ip::parse(&f).unwrap();
                    let c = finish(ip.pseudo_sum(&f, 120) + sum(&f[34..]));
                    f[50..52].copy_from_slice(&c);
                    f
                })
                .collect();
            assert!(checksum_verified(&segs[0]));
            assert_eq!(frames(&segs, OFFLOAD_FEATURES), None, "flag {flag:#x}");
        }
        let acks = cut(false, &[], 1000);
        assert_eq!(
            frames(&[acks[0].clone(), acks[0].clone()], OFFLOAD_FEATURES),
            None
        );
        assert_eq!(frames(&[], OFFLOAD_FEATURES), None);
        assert_eq!(
            frames(&[vec![0u8; 60], vec![0u8; 60]], OFFLOAD_FEATURES),
            None
        );
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
