//! QEMU's `-netdev stream` framing: each Ethernet frame travels as a 4-byte
//! big-endian length followed by that many bytes of frame, with no padding
//! and no virtio-net header.
//!
//! Invariants: the [`Decoder`] yields frames in arrival order, each with its
//! length prefix still in front (the switch forwards those bytes unchanged),
//! whatever way the byte stream was cut into reads. A prefix outside
//! [`MIN_FRAME`]..=[`MAX_FRAME`] is an error from which the stream cannot be
//! resynchronised: the caller drops the connection.

use thiserror::Error;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;
/// The shortest frame accepted: an Ethernet header (QEMU sends frames
/// unpadded, so 42-byte ARP frames are normal).
pub const MIN_FRAME: usize = 14;
/// The longest frame accepted: virtio-net's largest MTU plus the Ethernet
/// header.
pub const MAX_FRAME: usize = 65_535 + 14;
/// How much the decoder asks the socket for at a time.
const READ_CHUNK: usize = 64 * 1024;

/// A length prefix that cannot start a frame.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    #[error("length prefix {0} is longer than the largest frame ({MAX_FRAME} bytes)")]
    TooLong(u32),
    #[error("length prefix {0} is shorter than an Ethernet header ({MIN_FRAME} bytes)")]
    TooShort(u32),
}

/// Reassembles frames from a byte stream.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Received bytes; those before `start` were already handed out.
    buf: Vec<u8>,
    start: usize,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The buffer to append received bytes to, with room for a read.
    /// Bytes of frames already returned are dropped here, so slices from
    /// [`Decoder::next_frame`] must be used before calling it.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(READ_CHUNK);
        &mut self.buf
    }

    /// The next complete frame, length prefix included, or `None` until
    /// more bytes arrive.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let rest = &self.buf[self.start..];
        let Some(prefix) = rest.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix);
        let n = len as usize;
        if n > MAX_FRAME {
            return Err(FrameError::TooLong(len));
        }
        if n < MIN_FRAME {
            return Err(FrameError::TooShort(len));
        }
        if rest.len() < HEADER_LEN + n {
            return Ok(None);
        }
        let at = self.start;
        self.start += HEADER_LEN + n;
        Ok(Some(&self.buf[at..self.start]))
    }

    /// Bytes received that do not yet make a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// `frame` with its length prefix, as it goes on the wire.
#[cfg(test)]
pub fn encode(frame: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + frame.len());
    v.extend_from_slice(&u32::try_from(frame.len()).unwrap().to_be_bytes());
    v.extend_from_slice(frame);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
    }

    fn drain(d: &mut Decoder) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            out.push(f.to_vec());
        }
        out
    }

    #[test]
    fn several_frames_in_one_read() {
        let frames = [frame(60, 1), frame(14, 2), frame(1514, 3)];
        let mut d = Decoder::new();
        for f in &frames {
            d.buffer().extend_from_slice(&encode(f));
        }
        let got = drain(&mut d);
        assert_eq!(got.len(), 3);
        for (g, f) in got.iter().zip(&frames) {
            assert_eq!(g, &encode(f));
        }
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn frames_split_at_every_byte() {
        let frames = [frame(42, 4), frame(MAX_FRAME, 5), frame(100, 6)];
        let wire: Vec<u8> = frames.iter().flat_map(|f| encode(f)).collect();
        // One byte per read, then odd-sized reads that straddle prefixes.
        for step in [1, 3, 4, 5, 1000] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                d.buffer().extend_from_slice(chunk);
                got.extend(drain(&mut d));
            }
            assert_eq!(got.len(), 3, "step {step}");
            for (g, f) in got.iter().zip(&frames) {
                assert_eq!(g, &encode(f), "step {step}");
            }
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn a_partial_frame_is_pending() {
        let mut d = Decoder::new();
        let w = encode(&frame(60, 7));
        d.buffer().extend_from_slice(&w[..30]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.pending(), 30);
    }

    #[test]
    fn bad_prefixes_are_errors() {
        for (len, err) in [
            (0, FrameError::TooShort(0)),
            (13, FrameError::TooShort(13)),
            (
                MAX_FRAME as u32 + 1,
                FrameError::TooLong(MAX_FRAME as u32 + 1),
            ),
            (u32::MAX, FrameError::TooLong(u32::MAX)),
        ] {
            let mut d = Decoder::new();
            d.buffer().extend_from_slice(&len.to_be_bytes());
            assert_eq!(d.next_frame(), Err(err));
        }
        // The limits themselves are frames.
        let mut d = Decoder::new();
        d.buffer().extend_from_slice(&encode(&frame(MIN_FRAME, 8)));
        d.buffer().extend_from_slice(&encode(&frame(MAX_FRAME, 9)));
        assert_eq!(drain(&mut d).len(), 2);
    }
}
