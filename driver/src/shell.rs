//! The driver's connection to the NixOS backdoor shell on the guest's hvc0:
//! the protocol's bytes come from `skiff-backdoor` (banner, framing, reply
//! parsing); this module adds the waiting: reads that report progress to a
//! [`Watcher`] about once a second (so a wait can say what it waits for,
//! and stop when the VM dies or the run is interrupted), deadlines, and
//! output streamed while a command runs.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use base64::Engine;
use skiff_backdoor::{
    after_banner, command_line, decode_output, parse_status, take_line, FrameError,
};
use thiserror::Error;

pub use skiff_backdoor::BANNER;

/// How long a command may keep its stdout open before the driver says so.
pub const STDOUT_WARNING: Duration = Duration::from_secs(10);

/// Why a shell request failed.
#[derive(Debug, Error)]
pub enum ShellError {
    #[error("the guest shell connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("the guest shell closed the connection")]
    Closed,
    #[error("{0}")]
    Stopped(Stop),
    #[error("no answer from the guest shell within {0} s")]
    NoAnswer(u64),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Why a [`Watcher`] stopped a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Stop {
    /// The driver is being stopped (SIGTERM, SIGINT, the global timeout).
    #[error("the driver was interrupted")]
    Interrupted,
    /// The VMM exited while the guest was waited for.
    #[error("the VM exited")]
    VmExited,
    /// The watcher's deadline passed.
    #[error("timeout")]
    Timeout,
}

/// What a waiting shell call reports while it waits; returning an error
/// stops the wait (the VM died, the run is being torn down).
pub trait Watcher {
    /// Called at least once a second with the time waited so far.
    fn tick(&mut self, waited: Duration) -> Result<(), Stop>;
    /// Decoded output that arrived while the command runs.
    fn output(&mut self, _chunk: &[u8]) {}
}

/// A connected backdoor shell.
pub struct Shell {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Read buffer, allocated (and zeroed) once rather than per read.
    chunk: Vec<u8>,
    /// Time spent blocked on the guest so far.
    pub waited: Duration,
}

impl Shell {
    /// Wraps a connection on which the banner has not been seen yet.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(false)?;
        // Reads wait at most a second, so that waits can report progress.
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok(Shell {
            stream,
            buf: Vec::new(),
            chunk: vec![0; 65536],
            waited: Duration::ZERO,
        })
    }

    /// Reads once (waiting at most a second); false when nothing came.
    fn fill(&mut self) -> Result<bool, ShellError> {
        let t = Instant::now();
        let r = self.stream.read(&mut self.chunk);
        self.waited += t.elapsed();
        match r {
            Ok(0) => Err(ShellError::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&self.chunk[..n]);
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for the banner, searching everything received so far (a banner
    /// split over two reads still counts).
    pub fn wait_banner(&mut self, w: &mut dyn Watcher) -> Result<(), ShellError> {
        let start = Instant::now();
        loop {
            if let Some(end) = after_banner(&self.buf) {
                self.buf.drain(..end);
                return Ok(());
            }
            // Keep only a tail long enough to hold a split banner.
            if self.buf.len() > 4096 {
                let cut = self.buf.len() - BANNER.len();
                self.buf.drain(..cut);
            }
            if !self.fill()? {
                w.tick(start.elapsed()).map_err(ShellError::Stopped)?;
            }
        }
    }

    /// Writes raw bytes (e.g. `poweroff\n`).
    pub fn send_raw(&mut self, data: &[u8]) -> Result<(), ShellError> {
        self.stream.write_all(data)?;
        Ok(())
    }

    fn read_line(
        &mut self,
        w: &mut dyn Watcher,
        deadline: Option<(Instant, u64)>,
        mut stream: Option<&mut Base64Stream>,
    ) -> Result<Vec<u8>, ShellError> {
        let start = Instant::now();
        let mut searched = 0;
        loop {
            if let Some(line) = take_line(&mut self.buf, &mut searched) {
                return Ok(line);
            }
            if let Some(s) = stream.as_deref_mut() {
                // No newline yet: the buffer holds the line from its start.
                if let Some(chunk) = s.feed(&self.buf) {
                    w.output(&chunk);
                }
            }
            if !self.fill()? {
                if let Some((d, secs)) = deadline {
                    if Instant::now() > d {
                        return Err(ShellError::NoAnswer(secs));
                    }
                }
                w.tick(start.elapsed()).map_err(ShellError::Stopped)?;
            }
        }
    }

    /// Runs `command`; returns (status, stdout) as the upstream driver does:
    /// `(-1, out)` without `check_return`, `(-2, [])` without
    /// `check_output`. `timeout` is enforced in the guest (status 124); the
    /// host gives up a minute after it. With `stream`, output is passed to
    /// the watcher as it arrives.
    pub fn execute(
        &mut self,
        command: &str,
        check_return: bool,
        check_output: bool,
        timeout: Option<u64>,
        stream: bool,
        w: &mut dyn Watcher,
    ) -> Result<(i32, Vec<u8>), ShellError> {
        self.stream
            .write_all(command_line(command, timeout).as_bytes())?;
        if !check_output {
            return Ok((-2, Vec::new()));
        }
        let deadline = timeout.map(|t| (Instant::now() + Duration::from_secs(t + 60), t + 60));
        let mut decoder = stream.then(Base64Stream::default);
        let line = self.read_line(w, deadline, decoder.as_mut())?;
        let out = decode_output(&line)?;
        if let Some(d) = decoder.as_mut() {
            if let Some(rest) = d.finish(&out) {
                w.output(&rest);
            }
        }
        if !check_return {
            return Ok((-1, out));
        }
        self.stream
            .write_all(skiff_backdoor::Framing::Bash.status_command().as_bytes())?;
        let status_line = self.read_line(
            w,
            Some((Instant::now() + Duration::from_secs(60), 60)),
            None,
        )?;
        Ok((parse_status(&status_line)?, out))
    }
}

/// Decodes a base64 line while it arrives, so output can be shown before
/// the command ends.
#[derive(Default)]
pub struct Base64Stream {
    /// Encoded characters decoded so far.
    consumed: usize,
    /// Decoded bytes handed out so far.
    emitted: usize,
}

impl Base64Stream {
    /// `line` is everything received of the line so far, from its start.
    /// Returns the bytes that became decodable since the last call.
    fn feed(&mut self, line: &[u8]) -> Option<Vec<u8>> {
        let whole = line.len() / 4 * 4;
        if whole <= self.consumed {
            return None;
        }
        let out = base64::engine::general_purpose::STANDARD
            .decode(&line[self.consumed..whole])
            .ok()?;
        self.consumed = whole;
        self.emitted += out.len();
        (!out.is_empty()).then_some(out)
    }

    /// The whole decoded output is known; returns what was not yet shown.
    fn finish(&mut self, all: &[u8]) -> Option<Vec<u8>> {
        let rest = &all[self.emitted.min(all.len())..];
        self.emitted = all.len();
        (!rest.is_empty()).then(|| rest.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watcher_stops_the_wait_with_its_reason() {
        struct Give(Stop);
        impl Watcher for Give {
            fn tick(&mut self, _: Duration) -> Result<(), Stop> {
                Err(self.0)
            }
        }
        let (ours, mut guest) = UnixStream::pair().unwrap();
        let mut shell = Shell::new(ours).unwrap();
        // Half a banner is not a banner.
        guest.write_all(&BANNER[..10]).unwrap();
        match shell.wait_banner(&mut Give(Stop::Timeout)) {
            Err(ShellError::Stopped(Stop::Timeout)) => {}
            other => panic!("{other:?}"),
        }
        // The rest arrives: the banner split over two reads counts.
        guest.write_all(&BANNER[10..]).unwrap();
        guest.write_all(b"\n").unwrap();
        shell.wait_banner(&mut Give(Stop::Interrupted)).unwrap();
    }

    #[test]
    fn streamed_output_adds_up() {
        let text = b"line one\nline two\nthe end";
        let enc = base64::engine::general_purpose::STANDARD.encode(text);
        let mut d = Base64Stream::default();
        let mut got = Vec::new();
        for end in [3, 9, 17, enc.len()] {
            if let Some(c) = d.feed(&enc.as_bytes()[..end]) {
                got.extend(c);
            }
        }
        if let Some(c) = d.finish(text) {
            got.extend(c);
        }
        assert_eq!(got, text);
    }
}
