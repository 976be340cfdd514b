//! A writer of classic pcap capture files (the libpcap format tcpdump and
//! Wireshark read): a 24-byte global header with microsecond timestamps and
//! link type 1 (Ethernet), then one record header and the frame's bytes per
//! frame.
//!
//! Invariants: every field is little-endian, announced as such by the magic
//! number; each record holds the whole frame (`incl_len == orig_len`, the
//! snap length is above the largest frame the switch accepts). Output is
//! buffered: callers flush it now and then and before they drop it.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Magic number of a little-endian, microsecond pcap file.
pub const MAGIC: u32 = 0xa1b2_c3d4;
pub const VERSION_MAJOR: u16 = 2;
pub const VERSION_MINOR: u16 = 4;
/// Largest record announced; tcpdump's own default.
pub const SNAPLEN: u32 = 262_144;
/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u32 = 1;
/// Bytes of the global header and of each record header.
pub const GLOBAL_HEADER_LEN: usize = 24;
pub const RECORD_HEADER_LEN: usize = 16;

/// An open capture.
pub struct PcapWriter<W: Write> {
    out: BufWriter<W>,
}

impl PcapWriter<File> {
    /// Creates (or truncates) `path` and writes the global header.
    pub fn create(path: &Path) -> io::Result<Self> {
        Self::new(File::create(path)?)
    }
}

impl<W: Write> PcapWriter<W> {
    /// Writes the global header to `out`.
    pub fn new(out: W) -> io::Result<Self> {
        let mut out = BufWriter::with_capacity(256 * 1024, out);
        let mut h = [0u8; GLOBAL_HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&VERSION_MAJOR.to_le_bytes());
        h[6..8].copy_from_slice(&VERSION_MINOR.to_le_bytes());
        // thiszone and sigfigs (8..16) stay zero.
        h[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
        h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&h)?;
        Ok(PcapWriter { out })
    }

    /// Appends one frame seen at `when`.
    pub fn write(&mut self, when: SystemTime, frame: &[u8]) -> io::Result<()> {
        let t = when.duration_since(UNIX_EPOCH).unwrap_or_default();
        let len = u32::try_from(frame.len())
            .ok()
            .filter(|&l| l <= SNAPLEN)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too long"))?;
        let mut h = [0u8; RECORD_HEADER_LEN];
        // The 32-bit seconds field wraps in 2106; pcap has no other.
        h[0..4].copy_from_slice(&(t.as_secs() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&t.subsec_micros().to_le_bytes());
        h[8..12].copy_from_slice(&len.to_le_bytes());
        h[12..16].copy_from_slice(&len.to_le_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(frame)
    }

    /// Pushes buffered records to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A parsed capture, for tests.
#[cfg(test)]
pub mod read {
    use super::*;

    /// One record: timestamp (seconds, microseconds), original length and
    /// the captured bytes.
    pub struct Record {
        pub secs: u32,
        pub micros: u32,
        pub orig_len: u32,
        pub data: Vec<u8>,
    }

    /// Checks the global header and splits `bytes` into records.
    pub fn parse(bytes: &[u8]) -> Vec<Record> {
        let u16_at = |i: usize| u16::from_le_bytes(bytes[i..i + 2].try_into().unwrap());
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        assert!(bytes.len() >= GLOBAL_HEADER_LEN, "no global header");
        assert_eq!(u32_at(0), MAGIC);
        assert_eq!(u16_at(4), 2);
        assert_eq!(u16_at(6), 4);
        assert_eq!(u32_at(8), 0, "thiszone");
        assert_eq!(u32_at(12), 0, "sigfigs");
        assert_eq!(u32_at(16), SNAPLEN);
        assert_eq!(u32_at(20), 1, "link type Ethernet");
        let mut at = GLOBAL_HEADER_LEN;
        let mut out = Vec::new();
        while at < bytes.len() {
            assert!(
                at + RECORD_HEADER_LEN <= bytes.len(),
                "truncated record header"
            );
            let incl = u32_at(at + 8) as usize;
            let r = Record {
                secs: u32_at(at),
                micros: u32_at(at + 4),
                orig_len: u32_at(at + 12),
                data: bytes[at + RECORD_HEADER_LEN..at + RECORD_HEADER_LEN + incl].to_vec(),
            };
            assert!(r.micros < 1_000_000);
            out.push(r);
            at += RECORD_HEADER_LEN + incl;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn header_and_records() {
        let mut buf = Vec::new();
        {
            let mut w = PcapWriter::new(&mut buf).unwrap();
            let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
            w.write(t, &[1; 60]).unwrap();
            w.write(t + Duration::from_micros(5), &[2; 1514]).unwrap();
            w.flush().unwrap();
        }
        assert_eq!(buf.len(), 24 + 16 + 60 + 16 + 1514);
        let recs = read::parse(&buf);
        assert_eq!(recs.len(), 2);
        assert_eq!((recs[0].secs, recs[0].micros), (1_700_000_000, 123_456));
        assert_eq!((recs[1].secs, recs[1].micros), (1_700_000_000, 123_461));
        assert_eq!(recs[0].orig_len, 60);
        assert_eq!(recs[0].data, vec![1; 60]);
        assert_eq!(recs[1].orig_len, 1514);
        assert_eq!(recs[1].data, vec![2; 1514]);
    }
}
