//! The console's host side: the VMM's stdio, an output file, or a unix
//! stream socket the VMM connects to.
//!
//! Every fd here is used without blocking the event loop: the socket is
//! non-blocking, and stdin, whose non-blocking flag would be shared with
//! whoever else uses the terminal or pipe, is read once per readiness event
//! ([`Endpoint::input_may_block`]). A socket that is lost is not an error:
//! it is dropped, closed by the device once its fd has left the event
//! loop, and reconnected by [`Endpoint::reconnect`] while the device holds
//! guest output back. Stdio and files are never reconnected.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use log::{debug, error, info, warn};

use super::{ConsoleBackend, ConsoleError, RECONNECT_INTERVAL};

/// The open backend.
pub(super) enum Endpoint {
    Stdio {
        input: Option<File>,
        output: File,
    },
    File(File),
    /// `path` is `None` for a stream handed in ready-made, which is not
    /// reconnected.
    Socket {
        path: Option<PathBuf>,
        stream: Option<UnixStream>,
    },
}

fn not_connected() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "console socket is not connected",
    )
}

impl Endpoint {
    /// Opens `backend`: duplicates the VMM's stdio, opens (appending) or
    /// creates the file, or connects the socket.
    pub(super) fn open(backend: &ConsoleBackend) -> Result<Endpoint, ConsoleError> {
        let endpoint = match backend {
            ConsoleBackend::Stdio => {
                // No stdin at all is not an error: the guest gets no input.
                let input = io::stdin()
                    .as_fd()
                    .try_clone_to_owned()
                    .ok()
                    .map(File::from);
                let output = io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .map(File::from)
                    .map_err(ConsoleError::Stdout)?;
                Endpoint::Stdio { input, output }
            }
            ConsoleBackend::File(path) => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| ConsoleError::OpenFile {
                        path: path.clone(),
                        source,
                    })?;
                Endpoint::File(f)
            }
            ConsoleBackend::Socket(path) => {
                let stream = connect(path).map_err(|source| ConsoleError::Connect {
                    path: path.clone(),
                    source,
                })?;
                Endpoint::Socket {
                    path: Some(path.clone()),
                    stream: Some(stream),
                }
            }
        };
        Ok(endpoint)
    }

    /// A connected stream that is not reconnected when lost.
    #[cfg(test)]
    pub(super) fn from_stream(stream: UnixStream) -> io::Result<Endpoint> {
        stream.set_nonblocking(true)?;
        Ok(Endpoint::Socket {
            path: None,
            stream: Some(stream),
        })
    }

    /// Whether the backend is a socket (the only one that can be lost and
    /// reconnected).
    pub(super) fn is_socket(&self) -> bool {
        matches!(self, Endpoint::Socket { .. })
    }

    /// Drops a socket's connection after `e`, logged; returns the stream,
    /// for the caller to close once its fd has left the event loop. `None`
    /// if there was no connection (or no socket).
    pub(super) fn disconnect(&mut self, e: &io::Error) -> Option<UnixStream> {
        let Endpoint::Socket { path, stream } = self else {
            return None;
        };
        let s = stream.take()?;
        match path {
            Some(p) => warn!(
                "virtio-console: connection to {} lost ({e}); reconnecting every {} ms",
                p.display(),
                RECONNECT_INTERVAL.as_millis()
            ),
            None => warn!("virtio-console: connection lost ({e})"),
        }
        Some(s)
    }

    /// Tries once to connect a socket that lost its connection.
    pub(super) fn reconnect(&mut self) {
        if let Endpoint::Socket {
            path: Some(path),
            stream: stream @ None,
        } = self
        {
            match connect(path) {
                Ok(s) => {
                    info!("virtio-console: reconnected to {}", path.display());
                    *stream = Some(s);
                }
                Err(e) => debug!(
                    "virtio-console: reconnecting to {} failed: {e}",
                    path.display()
                ),
            }
        }
    }

    pub(super) fn input_fd(&self) -> Option<RawFd> {
        match self {
            Endpoint::Stdio { input, .. } => input.as_ref().map(|f| f.as_raw_fd()),
            Endpoint::File(_) => None,
            Endpoint::Socket { stream, .. } => stream.as_ref().map(|s| s.as_raw_fd()),
        }
    }

    pub(super) fn output_fd(&self) -> Option<RawFd> {
        match self {
            Endpoint::Stdio { output, .. } => Some(output.as_raw_fd()),
            Endpoint::File(f) => Some(f.as_raw_fd()),
            Endpoint::Socket { stream, .. } => stream.as_ref().map(|s| s.as_raw_fd()),
        }
    }

    pub(super) fn connected(&self) -> bool {
        !matches!(self, Endpoint::Socket { stream: None, .. })
    }

    pub(super) fn wants_reconnect(&self) -> bool {
        matches!(
            self,
            Endpoint::Socket {
                path: Some(_),
                stream: None
            }
        )
    }

    /// Whether a read on the input fd can block (stdin is not made
    /// non-blocking: that flag would be shared with other users of the
    /// terminal or pipe). Such an fd is read once per readiness event.
    pub(super) fn input_may_block(&self) -> bool {
        matches!(self, Endpoint::Stdio { .. })
    }

    pub(super) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Endpoint::Stdio { input: Some(f), .. } => f.read(buf),
            Endpoint::Socket {
                stream: Some(s), ..
            } => s.read(buf),
            Endpoint::Socket { stream: None, .. } => Err(not_connected()),
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "console backend has no input",
            )),
        }
    }

    pub(super) fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Endpoint::Stdio { output, .. } => output.write(buf),
            Endpoint::File(f) => f.write(buf),
            Endpoint::Socket {
                stream: Some(s), ..
            } => s.write(buf),
            Endpoint::Socket { stream: None, .. } => Err(not_connected()),
        }
    }
}

fn connect(path: &Path) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(path)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// Which side of the backend failed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Input,
    Output,
}

/// The backend, with what the device knows about it: guest output it has
/// not taken yet, and which sides are gone for good.
pub(super) struct Host {
    pub(super) endpoint: Endpoint,
    /// Guest output not yet written to the backend, from `tx_pos` on (at
    /// most [`super::CHUNK`] bytes).
    pub(super) tx_buf: Vec<u8>,
    pub(super) tx_pos: usize,
    /// No (more) input: end of file, or an fd epoll cannot watch.
    pub(super) input_closed: bool,
    /// A stdio or file output failed for good: guest output is discarded.
    pub(super) output_broken: bool,
    /// Lost connections, closed once out of the event loop.
    pub(super) closing: Vec<UnixStream>,
}

impl Host {
    pub(super) fn new(endpoint: Endpoint) -> Host {
        Host {
            endpoint,
            tx_buf: Vec::new(),
            tx_pos: 0,
            input_closed: false,
            output_broken: false,
            closing: Vec::new(),
        }
    }

    pub(super) fn has_pending_output(&self) -> bool {
        self.tx_pos < self.tx_buf.len()
    }

    /// Reacts to a failed or closed backend.
    pub(super) fn failed(&mut self, dir: Direction, e: io::Error) {
        if self.endpoint.is_socket() {
            if let Some(s) = self.endpoint.disconnect(&e) {
                // Closed by sync_interest, after it leaves the event loop.
                self.closing.push(s);
            }
            return;
        }
        match dir {
            Direction::Input => {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    info!("virtio-console: input reached end of file");
                } else {
                    warn!("virtio-console: reading input failed ({e}); no more input");
                }
                self.input_closed = true;
            }
            Direction::Output => {
                error!("virtio-console: writing output failed ({e}); guest output is discarded from now on");
                self.output_broken = true;
            }
        }
    }

    /// Writes pending guest output. True when nothing is left pending.
    pub(super) fn flush_output(&mut self) -> bool {
        while self.has_pending_output() {
            if self.output_broken {
                break;
            }
            if !self.endpoint.connected() {
                return false;
            }
            match self.endpoint.write(&self.tx_buf[self.tx_pos..]) {
                Ok(0) => self.failed(Direction::Output, io::ErrorKind::WriteZero.into()),
                Ok(n) => self.tx_pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => self.failed(Direction::Output, e),
            }
        }
        self.tx_buf.clear();
        self.tx_pos = 0;
        true
    }
}
