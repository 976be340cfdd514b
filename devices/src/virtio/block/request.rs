//! Parsing virtio-blk requests out of guest descriptor chains.
//!
//! Everything here is guest-controlled: descriptor addresses, lengths,
//! flags and the header contents. [`parse_request`] checks all of it and
//! never touches the disk, so it can be fuzzed on its own.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::SECTOR_SIZE;

/// Size of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_SIZE: u64 = 16;

/// Longest descriptor chain [`parse_request`] accepts (indirect tables
/// included). Linux sends at most `seg_max + 2` descriptors.
pub const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// Bytes of the GET_ID answer (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// A guest buffer: `len` bytes at guest-physical `addr`, checked to lie in
/// guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// What the driver asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the guest (`VIRTIO_BLK_T_IN`).
    In,
    /// Write sectors from the guest (`VIRTIO_BLK_T_OUT`).
    Out,
    /// Make earlier writes durable (`VIRTIO_BLK_T_FLUSH`).
    Flush,
    /// Return the device id string (`VIRTIO_BLK_T_GET_ID`).
    GetId,
    /// Any other type; answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

/// A well-formed request: every buffer lies in guest memory and has the
/// direction its type needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request type.
    pub request_type: RequestType,
    /// First sector (512 bytes each), from the header.
    pub sector: u64,
    /// The data buffers in order: device-readable for OUT, device-writable
    /// for IN and GET_ID, empty for FLUSH. For unsupported types whatever
    /// follows the header, unchecked for direction.
    pub data: Vec<Segment>,
    /// Sum of the data lengths; a multiple of 512 for IN and OUT, at least
    /// 20 for GET_ID.
    pub data_len: u64,
    /// Where the one-byte status goes.
    pub status: GuestAddress,
}

/// Why a descriptor chain is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain has no descriptors (unreadable head or bad indirect table).
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain does not end: a loop, a chain longer than the queue, a
    /// `next` index outside the table or a table outside guest memory.
    #[error("descriptor chain does not terminate (loop, bad next index or unreadable descriptor)")]
    Unterminated,
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    #[error("descriptor chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooLong,
    /// No device-writable descriptor, so no place for the status byte.
    #[error("no device-writable status descriptor")]
    NoStatus,
    /// A device-readable descriptor follows a device-writable one, so the
    /// status byte has no defined place.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// The status byte is not in guest memory.
    #[error("status byte at {0:#x} is outside guest memory")]
    StatusOutsideMemory(u64),
    /// A buffer is not (entirely) in guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest-physical start.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Fewer than 16 device-readable bytes for the header.
    #[error("request header has {0} device-readable bytes, needs 16")]
    HeaderTooShort(u64),
    /// A request that only reads from the guest has device-writable data.
    #[error("{0} request has device-writable data buffers")]
    UnexpectedWritable(&'static str),
    /// A request that only writes to the guest has device-readable data.
    #[error("{0} request has device-readable data buffers")]
    UnexpectedReadable(&'static str),
    /// IN or OUT data length not a multiple of 512.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// GET_ID with fewer than 20 writable bytes.
    #[error("GET_ID buffer has {0} bytes, needs 20")]
    IdBufferTooShort(u64),
}

/// A chain that is not a valid request, and where its status byte is (if
/// the chain has a well-defined one in guest memory): the device answers
/// `VIRTIO_BLK_S_IOERR` there, or completes the chain without writing
/// anything when `status` is `None`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct InvalidRequest {
    /// What is wrong.
    pub error: RequestError,
    /// The status byte, when known.
    pub status: Option<GuestAddress>,
}

fn invalid(error: RequestError, status: Option<GuestAddress>) -> InvalidRequest {
    InvalidRequest { error, status }
}

/// Removes the first `n` bytes from a list of segments.
fn skip_bytes(segments: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segments.len());
    for s in segments {
        let len = u64::from(s.len);
        if n >= len {
            n -= len;
            continue;
        }
        // n < len <= u32::MAX, and the segment was checked to lie in guest
        // memory, so the additions cannot overflow.
        out.push(Segment {
            addr: s.addr.unchecked_add(n),
            len: s.len - n as u32,
        });
        n = 0;
    }
    out
}

/// Removes the last byte from a list of segments.
fn drop_last_byte(segments: &[Segment]) -> Vec<Segment> {
    let mut out = segments.to_vec();
    if let Some(last) = out.last_mut() {
        if last.len == 1 {
            out.pop();
        } else {
            last.len -= 1;
        }
    }
    out
}

fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Parses one virtio-blk request from the descriptors of a chain.
///
/// `descriptors` is normally a [`virtio_queue::DescriptorChain`] (which
/// follows `next` links and indirect tables and stops after as many
/// descriptors as the table holds); a fuzz target can pass any sequence of
/// [`Descriptor`]s instead.
///
/// The layout is not assumed to be one descriptor per part (virtio 1.x lets
/// the driver frame the request freely): the device-readable bytes come
/// first and start with the 16-byte header, the device-writable bytes follow
/// and end with the status byte. Descriptors of length 0 are skipped.
///
/// Checks, in order: the chain is non-empty, not longer than
/// [`MAX_CHAIN_DESCRIPTORS`] and terminated (the last descriptor has no
/// NEXT flag); a device-writable byte exists for the status and no
/// device-readable descriptor follows a device-writable one (without these
/// the error carries `status: None`); then, with the status known: every
/// buffer lies in `mem`, the header is complete, and the data buffers have
/// the direction and length the request type needs. The sector range is
/// checked later, against the disk size.
///
/// Reads only the header from guest memory; writes nothing.
pub fn parse_request<I>(mem: &GuestMemoryMmap, descriptors: I) -> Result<Request, InvalidRequest>
where
    I: IntoIterator<Item = Descriptor>,
{
    let mut readable: Vec<Segment> = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
    let mut count = 0usize;
    let mut terminated = false;
    let mut misordered = false;

    for desc in descriptors {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS {
            return Err(invalid(RequestError::TooLong, None));
        }
        terminated = !desc.has_next();
        if desc.len() == 0 {
            continue;
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() {
            writable.push(seg);
        } else {
            if !writable.is_empty() {
                misordered = true;
            }
            readable.push(seg);
        }
    }

    if count == 0 {
        return Err(invalid(RequestError::EmptyChain, None));
    }
    if !terminated {
        return Err(invalid(RequestError::Unterminated, None));
    }
    if misordered {
        return Err(invalid(RequestError::ReadableAfterWritable, None));
    }
    let Some(last) = writable.last() else {
        return Err(invalid(RequestError::NoStatus, None));
    };
    let status = match last.addr.checked_add(u64::from(last.len) - 1) {
        Some(a) if mem.check_range(a, 1) => a,
        _ => {
            let a = last.addr.raw_value().wrapping_add(u64::from(last.len) - 1);
            return Err(invalid(RequestError::StatusOutsideMemory(a), None));
        }
    };
    let fail = |error| Err(invalid(error, Some(status)));

    for s in readable.iter().chain(writable.iter()) {
        if !mem.check_range(s.addr, s.len as usize) {
            return fail(RequestError::OutsideMemory {
                addr: s.addr.raw_value(),
                len: s.len,
            });
        }
    }

    let readable_len = total_len(&readable);
    if readable_len < HEADER_SIZE {
        return fail(RequestError::HeaderTooShort(readable_len));
    }
    let mut header = [0u8; HEADER_SIZE as usize];
    let mut filled = 0usize;
    for s in &readable {
        if filled == header.len() {
            break;
        }
        let n = (header.len() - filled).min(s.len as usize);
        if mem
            .read_slice(&mut header[filled..filled + n], s.addr)
            .is_err()
        {
            return fail(RequestError::OutsideMemory {
                addr: s.addr.raw_value(),
                len: s.len,
            });
        }
        filled += n;
    }
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    let readable_data = skip_bytes(&readable, HEADER_SIZE);
    let writable_data = drop_last_byte(&writable);

    let (request_type, data) = match request_type {
        VIRTIO_BLK_T_IN => {
            if !readable_data.is_empty() {
                return fail(RequestError::UnexpectedReadable("IN"));
            }
            (RequestType::In, writable_data)
        }
        VIRTIO_BLK_T_OUT => {
            if !writable_data.is_empty() {
                return fail(RequestError::UnexpectedWritable("OUT"));
            }
            (RequestType::Out, readable_data)
        }
        VIRTIO_BLK_T_FLUSH => (RequestType::Flush, Vec::new()),
        VIRTIO_BLK_T_GET_ID => {
            if !readable_data.is_empty() {
                return fail(RequestError::UnexpectedReadable("GET_ID"));
            }
            (RequestType::GetId, writable_data)
        }
        other => {
            let mut data = readable_data;
            data.extend(writable_data);
            (RequestType::Unsupported(other), data)
        }
    };
    let data_len = total_len(&data);
    match request_type {
        RequestType::In | RequestType::Out if !data_len.is_multiple_of(SECTOR_SIZE) => {
            return fail(RequestError::UnalignedLength(data_len));
        }
        RequestType::GetId if data_len < ID_BYTES as u64 => {
            return fail(RequestError::IdBufferTooShort(data_len));
        }
        _ => {}
    }

    Ok(Request {
        request_type,
        sector,
        data,
        data_len,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{mem, MEM_SIZE, NEXT, R, W};

    /// Past the end of guest memory.
    const OUTSIDE: u64 = 2 * MEM_SIZE as u64;
    /// 256 bytes before the end of guest memory.
    const NEAR_END: u64 = MEM_SIZE as u64 - 0x100;

    /// A terminated chain: NEXT on all but the last descriptor.
    fn chain(parts: &[(u64, u32, u16)]) -> Vec<Descriptor> {
        parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i + 1 < parts.len() { NEXT } else { 0 };
                Descriptor::new(addr, len, flags | next, i as u16 + 1)
            })
            .collect()
    }

    fn header(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        m.write_obj(t.to_le(), GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
    }

    #[test]
    fn linux_layouts() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 7);
        let r = parse_request(
            &m,
            chain(&[(0x1000, 16, R), (0x2000, 1024, W), (0x3000, 1, W)]),
        )
        .unwrap();
        assert_eq!(r.request_type, RequestType::In);
        assert_eq!(r.sector, 7);
        assert_eq!(r.data_len, 1024);
        assert_eq!(
            r.data,
            vec![Segment {
                addr: GuestAddress(0x2000),
                len: 1024
            }]
        );
        assert_eq!(r.status, GuestAddress(0x3000));

        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 1);
        let r = parse_request(
            &m,
            chain(&[(0x1000, 16, R), (0x2000, 512, R), (0x3000, 1, W)]),
        )
        .unwrap();
        assert_eq!(r.request_type, RequestType::Out);
        assert_eq!(r.data_len, 512);

        header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        let r = parse_request(&m, chain(&[(0x1000, 16, R), (0x3000, 1, W)])).unwrap();
        assert_eq!(r.request_type, RequestType::Flush);
        assert!(r.data.is_empty());
    }

    #[test]
    fn free_framing() {
        // Header and data in one readable descriptor; data and status in one
        // writable descriptor.
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 3);
        let r = parse_request(&m, chain(&[(0x1000, 16 + 512, R), (0x3000, 1, W)])).unwrap();
        assert_eq!(
            r.data,
            vec![Segment {
                addr: GuestAddress(0x1010),
                len: 512
            }]
        );
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 3);
        let r = parse_request(
            &m,
            chain(&[(0x1000, 8, R), (0x1008, 8, R), (0x2000, 513, W)]),
        )
        .unwrap();
        assert_eq!(r.sector, 3);
        assert_eq!(
            r.data,
            vec![Segment {
                addr: GuestAddress(0x2000),
                len: 512
            }]
        );
        assert_eq!(r.status, GuestAddress(0x2200));
    }

    #[test]
    fn malformed_chains() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let err = |parts: &[(u64, u32, u16)]| parse_request(&m, chain(parts)).unwrap_err();

        assert_eq!(
            parse_request(&m, Vec::new()).unwrap_err().error,
            RequestError::EmptyChain
        );
        let e = err(&[(0x1000, 16, R), (0x2000, 512, R)]);
        assert_eq!(e, invalid(RequestError::NoStatus, None));
        let e = err(&[(0x1000, 16, R), (0x2000, 512, W), (0x3000, 1, R)]);
        assert_eq!(e, invalid(RequestError::ReadableAfterWritable, None));
        let e = err(&[(0x1000, 16, R), (0x2000, 512, W), (OUTSIDE, 1, W)]);
        assert_eq!(e, invalid(RequestError::StatusOutsideMemory(OUTSIDE), None));
        let e = err(&[(0x1000, 16, R), (u64::MAX, 2, W)]);
        assert_eq!(e.error, RequestError::StatusOutsideMemory(0));

        let st = Some(GuestAddress(0x3000));
        let e = err(&[(0x1000, 8, R), (0x3000, 1, W)]);
        assert_eq!(e, invalid(RequestError::HeaderTooShort(8), st));
        let e = err(&[(0x1000, 16, W), (0x3000, 1, W)]);
        assert_eq!(e, invalid(RequestError::HeaderTooShort(0), st));
        let e = err(&[(0x1000, 16, R), (NEAR_END, 512, W), (0x3000, 1, W)]);
        assert_eq!(
            e.error,
            RequestError::OutsideMemory {
                addr: NEAR_END,
                len: 512
            }
        );
        assert_eq!(e.status, st);
        let e = err(&[(0x1000, 16, R), (0x2000, 100, W), (0x3000, 1, W)]);
        assert_eq!(e, invalid(RequestError::UnalignedLength(100), st));
        let e = err(&[(0x1000, 16, R), (0x2000, 512, R), (0x3000, 1, W)]);
        assert_eq!(e, invalid(RequestError::UnexpectedReadable("IN"), st));

        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let e = err(&[(0x1000, 16, R), (0x2000, 512, W), (0x3000, 1, W)]);
        assert_eq!(e, invalid(RequestError::UnexpectedWritable("OUT"), st));

        header(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let e = err(&[(0x1000, 16, R), (0x2000, 10, W), (0x3000, 1, W)]);
        assert_eq!(e, invalid(RequestError::IdBufferTooShort(10), st));
        let e = err(&[(0x1000, 16, R), (0x3000, 1, W)]);
        assert_eq!(e, invalid(RequestError::IdBufferTooShort(0), st));

        // Not terminated: the last descriptor still says NEXT.
        let mut c = chain(&[(0x1000, 16, R), (0x3000, 1, W)]);
        c[1] = Descriptor::new(0x3000, 1, W | NEXT, 0);
        assert_eq!(
            parse_request(&m, c).unwrap_err().error,
            RequestError::Unterminated
        );

        // Too long.
        let c = std::iter::repeat_n(
            Descriptor::new(0x1000, 16, NEXT, 0),
            MAX_CHAIN_DESCRIPTORS + 1,
        );
        assert_eq!(
            parse_request(&m, c).unwrap_err().error,
            RequestError::TooLong
        );
    }

    #[test]
    fn unsupported_types_still_parse() {
        let m = mem();
        header(&m, 0x1000, 11, 0); // DISCARD
        let r = parse_request(
            &m,
            chain(&[(0x1000, 16, R), (0x2000, 16, R), (0x3000, 1, W)]),
        )
        .unwrap();
        assert_eq!(r.request_type, RequestType::Unsupported(11));
    }
}
