//! A plain client for the NixOS guest backdoor on hvc0, for the
//! integration tests: the protocol's bytes come from `skiff-backdoor`
//! (the test driver's own), and this client adds blocking reads with
//! deadlines. It runs commands through bash with the upstream framing, or
//! through a POSIX shell on busybox guests.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use skiff_backdoor::{after_banner, decode_output, parse_status, take_line, Framing};

/// A connected backdoor shell.
pub struct Backdoor {
    stream: UnixStream,
    buf: Vec<u8>,
    framing: Framing,
}

impl Backdoor {
    /// Accepts the VMM's connection on `listener` and waits for the banner.
    /// `shell` is the guest shell that runs commands (`bash` on NixOS and
    /// Debian guests, `sh` on busybox ones).
    pub fn accept(listener: &UnixListener, shell: &str, timeout: Duration) -> io::Result<Self> {
        let start = Instant::now();
        let mut b = Self::connection(listener, shell, timeout)?;
        let deadline = start + timeout;
        loop {
            if let Some(end) = after_banner(&b.buf) {
                b.buf.drain(..end);
                return Ok(b);
            }
            b.fill(Some(deadline))?;
        }
    }

    /// Accepts the connection of a VMM that restored a guest whose shell
    /// was already waiting for a command: no banner comes.
    pub fn reattach(listener: &UnixListener, shell: &str, timeout: Duration) -> io::Result<Self> {
        Self::connection(listener, shell, timeout)
    }

    fn connection(listener: &UnixListener, shell: &str, timeout: Duration) -> io::Result<Self> {
        let start = Instant::now();
        listener.set_nonblocking(true)?;
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if start.elapsed() > timeout {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the VMM never connected to the console socket",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        stream.set_nonblocking(false)?;
        Ok(Backdoor {
            stream,
            buf: Vec::new(),
            framing: Framing::for_shell(shell),
        })
    }

    fn fill(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        let timeout = match deadline {
            Some(d) => Some(
                d.checked_duration_since(Instant::now())
                    .filter(|t| !t.is_zero())
                    .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "timed out"))?,
            ),
            None => None,
        };
        self.stream.set_read_timeout(timeout)?;
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the guest shell closed the connection",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    fn read_line(&mut self, deadline: Option<Instant>) -> io::Result<Vec<u8>> {
        let mut searched = 0;
        loop {
            if let Some(line) = take_line(&mut self.buf, &mut searched) {
                return Ok(line);
            }
            self.fill(deadline)?;
        }
    }

    /// Runs `command` in the guest; returns (exit status, stdout). With
    /// `timeout_s`, the guest's `timeout` kills it after that many seconds
    /// (status 124).
    pub fn execute(&mut self, command: &str, timeout_s: Option<u32>) -> io::Result<(i32, Vec<u8>)> {
        let line = self.framing.command_line(command, timeout_s.map(u64::from));
        self.stream.write_all(line.as_bytes())?;
        let deadline = timeout_s.map(|t| Instant::now() + Duration::from_secs(u64::from(t) + 30));
        let invalid = |e: skiff_backdoor::FrameError| io::Error::new(io::ErrorKind::InvalidData, e);
        let output = decode_output(&self.read_line(deadline)?).map_err(invalid)?;
        self.stream
            .write_all(self.framing.status_command().as_bytes())?;
        let status = parse_status(&self.read_line(deadline)?).map_err(invalid)?;
        Ok((status, output))
    }

    /// Asks the guest to power off (no reply is read, as upstream does).
    pub fn poweroff(&mut self) -> io::Result<()> {
        self.stream.write_all(b"poweroff -f || poweroff\n")
    }
}
