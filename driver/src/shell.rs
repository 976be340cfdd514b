//! The NixOS backdoor protocol on the guest's hvc0 (spec: nixos-test-driver
//! §2.2): wait for `Spawning backdoor root shell...`, then send
//! `timeout T bash -c '<cmd>' | (base64 -w 0; echo)`, read one base64 line,
//! and ask for `${PIPESTATUS[0]}`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use base64::Engine;
use thiserror::Error;

/// The line the guest prints when its root shell is ready.
pub const BANNER: &[u8] = b"Spawning backdoor root shell...";

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
    #[error("the guest shell sent output that is not base64 ({0}); something else writes to hvc0")]
    BadOutput(String),
    #[error("the guest shell sent {0:?} where an exit status belongs")]
    BadStatus(String),
}

/// Single-quotes `s` for bash, as Python's `shlex.quote` does.
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./-_".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r#"'"'"'"#))
}

/// The exact line the upstream driver sends for `command`.
pub fn command_line(command: &str, timeout: Option<u64>) -> String {
    let prefix = timeout.map(|t| format!("timeout {t}")).unwrap_or_default();
    format!(
        "{prefix} bash -c {} | (base64 -w 0; echo)\n",
        quote(&format!("set -euo pipefail; {command}"))
    )
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
    /// Called about once a second with the time waited so far.
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
            if let Some(pos) = self.buf.windows(BANNER.len()).position(|x| x == BANNER) {
                let mut end = pos + BANNER.len();
                while matches!(self.buf.get(end), Some(b'\r' | b'\n')) {
                    end += 1;
                }
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
            if let Some(i) = self.buf[searched..].iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..searched + i + 1).collect();
                return Ok(line[..line.len() - 1].to_vec());
            }
            if let Some(s) = stream.as_deref_mut() {
                // No newline yet: the buffer holds the line from its start.
                if let Some(chunk) = s.feed(&self.buf) {
                    w.output(&chunk);
                }
            }
            searched = self.buf.len();
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
        let text = line.trim_ascii();
        let out = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| {
                let shown = String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned();
                ShellError::BadOutput(format!("{e}; received {shown:?}"))
            })?;
        if let Some(d) = decoder.as_mut() {
            if let Some(rest) = d.finish(&out) {
                w.output(&rest);
            }
        }
        if !check_return {
            return Ok((-1, out));
        }
        self.stream.write_all(b"echo ${PIPESTATUS[0]}\n")?;
        let status_line = self.read_line(
            w,
            Some((Instant::now() + Duration::from_secs(60), 60)),
            None,
        )?;
        let s = String::from_utf8_lossy(&status_line).trim().to_owned();
        let status = s.parse().map_err(|_| ShellError::BadStatus(s))?;
        Ok((status, out))
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
    fn framing_matches_upstream() {
        assert_eq!(
            command_line("echo 'hi'", Some(900)),
            "timeout 900 bash -c 'set -euo pipefail; echo '\"'\"'hi'\"'\"'' | (base64 -w 0; echo)\n"
        );
        assert_eq!(
            command_line("true", None),
            " bash -c 'set -euo pipefail; true' | (base64 -w 0; echo)\n"
        );
        assert_eq!(quote("a-b/c.d"), "a-b/c.d");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
    }

    /// A watcher's reason to stop reaches the caller as that reason.
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
