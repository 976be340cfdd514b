//! The network card's host side: a unix stream socket speaking QEMU's
//! `-netdev stream` framing, each Ethernet frame preceded by its length as
//! a 4-byte big-endian integer. A QEMU VM started with
//! `-netdev stream,addr.type=unix,addr.path=PATH` and a Skiff VM can thus
//! share a switch.
//!
//! The socket is non-blocking and never blocks the event loop:
//! * output is framed into a bounded buffer ([`Stream::push`]) and written
//!   as the socket takes it; the device stops taking transmit chains while
//!   the buffer holds [`OUT_HIGH_WATER`] bytes or more;
//! * input is read at most [`READ_CHUNK`] bytes at a time into a buffer
//!   that [`Stream::frame`] parses; a frame is only dropped from the buffer
//!   once the device has delivered it ([`Stream::consume`]).
//!
//! A peer that goes away is not an error: the connection is dropped (its
//! fd parked in [`Stream::closing`] until the event loop has forgotten it),
//! frames are dropped until [`Stream::reconnect`] gets a new connection. A
//! peer that sends a length beyond [`MAX_FRAME_LEN`] is speaking something
//! else: its connection is dropped the same way, and logged.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use log::{info, warn};

/// Largest Ethernet frame either way: a 65,535-byte payload and its
/// Ethernet header (anything longer is not a frame).
pub const MAX_FRAME_LEN: usize = 65_535 + ETH_HLEN;
/// Bytes in an Ethernet header (destination, source, type).
pub const ETH_HLEN: usize = 14;
/// Bytes of the length prefix.
pub const PREFIX_LEN: usize = 4;
/// Framed output held before the device stops taking transmit chains.
pub const OUT_HIGH_WATER: usize = 256 * 1024;
/// Most bytes read from the socket per [`Stream::fill`].
pub const READ_CHUNK: usize = 256 * 1024;

/// What [`Stream::fill`] or [`Stream::flush`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Progress, or nothing left to do.
    Ready,
    /// The socket cannot take or give more now.
    WouldBlock,
    /// Not connected (now or before).
    Disconnected,
}

/// The socket, its buffers, and where it reconnects.
pub struct Stream {
    /// Where to reconnect; `None` for a stream handed in ready-made.
    path: Option<PathBuf>,
    sock: Option<UnixStream>,
    /// Lost connections whose fd the event loop may still watch.
    pub closing: Vec<UnixStream>,
    /// Bytes read, from `in_start` on not yet consumed.
    inbuf: Vec<u8>,
    /// Where the socket is read into ([`READ_CHUNK`] bytes, allocated once).
    scratch: Box<[u8]>,
    in_start: usize,
    /// Framed output not yet written, from `out_start` on.
    outbuf: Vec<u8>,
    out_start: usize,
    /// Frames pushed since the output buffer was last empty.
    queued: u64,
    /// Frames thrown away with a lost connection, not yet taken by
    /// [`Stream::take_lost`].
    lost: u64,
    /// The name in log lines.
    name: String,
}

impl Stream {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path, name: &str) -> io::Result<Stream> {
        let sock = connect(path)?;
        Ok(Stream::with(Some(path.to_owned()), Some(sock), name))
    }

    /// A stream on a connected socket, never reconnected.
    pub fn from_socket(sock: UnixStream, name: &str) -> io::Result<Stream> {
        sock.set_nonblocking(true)?;
        Ok(Stream::with(None, Some(sock), name))
    }

    fn with(path: Option<PathBuf>, sock: Option<UnixStream>, name: &str) -> Stream {
        Stream {
            path,
            sock,
            closing: Vec::new(),
            inbuf: Vec::new(),
            scratch: vec![0u8; READ_CHUNK].into_boxed_slice(),
            in_start: 0,
            outbuf: Vec::new(),
            out_start: 0,
            queued: 0,
            lost: 0,
            name: name.to_owned(),
        }
    }

    /// The socket's fd while connected.
    pub fn fd(&self) -> Option<RawFd> {
        self.sock.as_ref().map(|s| s.as_raw_fd())
    }

    /// Whether a connection is up.
    pub fn connected(&self) -> bool {
        self.sock.is_some()
    }

    /// Whether the connection is lost and can be tried again.
    pub fn wants_reconnect(&self) -> bool {
        self.sock.is_none() && self.path.is_some()
    }

    /// Tries to connect again (quietly: a switch that is not back yet is
    /// the normal case).
    pub fn reconnect(&mut self) {
        let Some(path) = self.path.as_deref().filter(|_| self.sock.is_none()) else {
            return;
        };
        if let Ok(sock) = connect(path) {
            info!("{}: reconnected to {}", self.name, path.display());
            self.sock = Some(sock);
        }
    }

    /// Drops the connection after `why` (logged), and with it the frames
    /// on their way either way.
    pub fn lose(&mut self, why: &str) {
        if let Some(sock) = self.sock.take() {
            match &self.path {
                Some(path) => warn!(
                    "{}: {why}; dropping the connection to {} and reconnecting",
                    self.name,
                    path.display()
                ),
                None => warn!("{}: {why}; dropping the connection", self.name),
            }
            self.closing.push(sock);
        }
        self.inbuf.clear();
        self.in_start = 0;
        self.outbuf.clear();
        self.out_start = 0;
        self.lost += std::mem::take(&mut self.queued);
    }

    /// How many frames pushed were thrown away with lost connections since
    /// the last call (some may have reached the peer in part or whole: the
    /// count is an upper bound).
    pub fn take_lost(&mut self) -> u64 {
        std::mem::take(&mut self.lost)
    }

    /// Framed output waiting for the socket, in bytes.
    pub fn pending_output(&self) -> usize {
        self.outbuf.len() - self.out_start
    }

    /// Whether the output buffer is at its high-water mark.
    pub fn output_full(&self) -> bool {
        self.pending_output() >= OUT_HIGH_WATER
    }

    /// Frames `frame` into the output buffer (the caller checks
    /// [`Stream::output_full`] and the frame's length first).
    pub fn push(&mut self, frame: &[u8]) {
        debug_assert!(frame.len() <= MAX_FRAME_LEN);
        // What was written goes, so the buffer stays bounded by what is
        // pending (the caller stops at the high-water mark).
        if self.out_start > 0 && self.out_start * 2 >= self.outbuf.len() {
            self.outbuf.drain(..self.out_start);
            self.out_start = 0;
        }
        // frame.len() <= MAX_FRAME_LEN, which fits in u32.
        self.outbuf
            .extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.outbuf.extend_from_slice(frame);
        self.queued += 1;
    }

    /// Writes buffered output until it is all written or the socket pushes
    /// back.
    pub fn flush(&mut self) -> Io {
        while self.out_start < self.outbuf.len() {
            let Some(sock) = self.sock.as_mut() else {
                return Io::Disconnected;
            };
            match sock.write(&self.outbuf[self.out_start..]) {
                Ok(0) => {
                    self.lose("the peer takes no more bytes");
                    return Io::Disconnected;
                }
                Ok(n) => self.out_start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Io::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.lose(&format!("writing failed ({e})"));
                    return Io::Disconnected;
                }
            }
        }
        self.outbuf.clear();
        self.out_start = 0;
        self.queued = 0;
        Io::Ready
    }

    /// Reads what the socket has, at most [`READ_CHUNK`] bytes.
    pub fn fill(&mut self) -> Io {
        let Some(sock) = self.sock.as_mut() else {
            return Io::Disconnected;
        };
        if self.in_start > 0 {
            self.inbuf.drain(..self.in_start);
            self.in_start = 0;
        }
        match sock.read(&mut self.scratch) {
            Ok(0) => {
                self.lose("the peer closed the connection");
                Io::Disconnected
            }
            Ok(n) => {
                self.inbuf.extend_from_slice(&self.scratch[..n]);
                Io::Ready
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Io::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Io::Ready,
            Err(e) => {
                self.lose(&format!("reading failed ({e})"));
                Io::Disconnected
            }
        }
    }

    /// The next whole frame read, if any (it stays until
    /// [`Stream::consume`]). A length beyond [`MAX_FRAME_LEN`] drops the
    /// connection.
    pub fn frame(&mut self) -> Option<&[u8]> {
        let len = announced(&self.inbuf[self.in_start..])?;
        if len > MAX_FRAME_LEN {
            self.lose(&format!(
                "the peer announced a frame of {len} bytes (at most {MAX_FRAME_LEN})"
            ));
            return None;
        }
        self.inbuf[self.in_start..].get(PREFIX_LEN..PREFIX_LEN + len)
    }

    /// The whole frames read so far, in order, from the one
    /// [`Stream::frame`] returns on; ends at a partial frame or a length
    /// beyond [`MAX_FRAME_LEN`] (which [`Stream::frame`] handles).
    pub fn frames(&self) -> impl Iterator<Item = &[u8]> {
        let mut avail = &self.inbuf[self.in_start..];
        std::iter::from_fn(move || {
            let len = announced(avail)?;
            if len > MAX_FRAME_LEN {
                return None;
            }
            let frame = avail.get(PREFIX_LEN..PREFIX_LEN + len)?;
            avail = &avail[PREFIX_LEN + len..];
            Some(frame)
        })
    }

    /// Drops the frame [`Stream::frame`] returned.
    pub fn consume(&mut self) {
        if let Some(len) = announced(&self.inbuf[self.in_start..]) {
            self.in_start = (self.in_start + PREFIX_LEN + len).min(self.inbuf.len());
        }
    }
}

/// The frame length the length prefix at the start of `input` announces,
/// once the whole prefix is there.
fn announced(input: &[u8]) -> Option<usize> {
    let prefix: [u8; PREFIX_LEN] = input.get(..PREFIX_LEN)?.try_into().ok()?;
    Some(u32::from_be_bytes(prefix) as usize)
}

fn connect(path: &Path) -> io::Result<UnixStream> {
    let sock = UnixStream::connect(path)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Stream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::from_socket(a, "test").unwrap(), b)
    }

    fn framed(frame: &[u8]) -> Vec<u8> {
        let mut v = (frame.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(frame);
        v
    }

    #[test]
    fn frames_split_and_joined_across_reads() {
        let (mut s, mut peer) = pair();
        let a = vec![0xa1; 60];
        let b = vec![0xb2; 1500];
        let mut bytes = framed(&a);
        bytes.extend(framed(&b));
        // The first frame and half of the second's prefix.
        peer.write_all(&bytes[..66]).unwrap();
        assert_eq!(s.fill(), Io::Ready);
        assert_eq!(s.frame(), Some(&a[..]));
        s.consume();
        assert_eq!(s.frame(), None);
        peer.write_all(&bytes[66..700]).unwrap();
        assert_eq!(s.fill(), Io::Ready);
        assert_eq!(s.frame(), None, "only part of the second frame");
        peer.write_all(&bytes[700..]).unwrap();
        assert_eq!(s.fill(), Io::Ready);
        assert_eq!(s.frame(), Some(&b[..]));
        s.consume();
        assert_eq!(s.frame(), None);
        assert_eq!(s.fill(), Io::WouldBlock);
    }

    #[test]
    fn an_oversized_length_drops_the_connection() {
        let (mut s, mut peer) = pair();
        peer.write_all(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes())
            .unwrap();
        peer.write_all(&[0; 64]).unwrap();
        assert_eq!(s.fill(), Io::Ready);
        assert_eq!(s.frame(), None);
        assert!(!s.connected());
        assert!(
            !s.wants_reconnect(),
            "a handed-in stream is not reconnected"
        );
        assert_eq!(s.closing.len(), 1);
        // The largest frame is fine.
        let (mut s, mut peer) = pair();
        let big = vec![7u8; MAX_FRAME_LEN];
        let writer = std::thread::spawn(move || peer.write_all(&framed(&big)).map(|_| peer));
        let mut got = None;
        while got.is_none() {
            match s.fill() {
                Io::Ready | Io::WouldBlock => {}
                Io::Disconnected => panic!("lost"),
            }
            got = s.frame().map(|f| f.len());
        }
        assert_eq!(got, Some(MAX_FRAME_LEN));
        writer.join().unwrap().unwrap();
    }

    #[test]
    fn output_is_framed_and_held_while_the_peer_does_not_read() {
        let (mut s, mut peer) = pair();
        s.push(&[1, 2, 3]);
        assert_eq!(s.flush(), Io::Ready);
        let mut buf = [0u8; 7];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(buf, [0, 0, 0, 3, 1, 2, 3]);
        // Fill the socket until it pushes back; nothing is lost.
        let frame = vec![9u8; 1500];
        let mut pushed = 0usize;
        while s.flush() == Io::Ready {
            s.push(&frame);
            pushed += 1;
        }
        assert!(s.pending_output() > 0);
        peer.set_nonblocking(false).unwrap();
        let reader = std::thread::spawn(move || {
            let mut frames = 0usize;
            let mut hdr = [0u8; 4];
            let mut body = vec![0u8; 1500];
            while frames < pushed {
                peer.read_exact(&mut hdr).unwrap();
                assert_eq!(u32::from_be_bytes(hdr), 1500);
                peer.read_exact(&mut body).unwrap();
                assert!(body.iter().all(|&b| b == 9));
                frames += 1;
            }
            frames
        });
        while s.flush() != Io::Ready {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(reader.join().unwrap(), pushed);
    }

    #[test]
    fn a_closed_peer_is_lost_and_a_path_is_reconnected() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("sw");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut s = Stream::connect(&path, "test").unwrap();
        let (peer, _) = listener.accept().unwrap();
        drop(peer);
        assert_eq!(s.fill(), Io::Disconnected);
        assert!(s.wants_reconnect());
        s.push(&[1; 20]);
        assert_eq!(s.flush(), Io::Disconnected);
        s.reconnect();
        assert!(s.connected());
        let (mut peer, _) = listener.accept().unwrap();
        s.lose("test");
        s.closing.clear();
        s.reconnect();
        assert_eq!(s.flush(), Io::Ready, "lost output is not resent");
        let (_peer2, _) = listener.accept().unwrap();
        peer.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1];
        assert!(matches!(peer.read(&mut buf), Ok(0)));
    }
}
