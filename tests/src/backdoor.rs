//! A client for the NixOS guest backdoor on hvc0: waits for the banner,
//! then runs commands with the upstream driver's framing
//! (`timeout T bash -c '...' | (base64 -w 0; echo)`, then
//! `echo ${PIPESTATUS[0]}`).

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use base64::Engine;

/// The banner the guest prints when its root shell is ready.
pub const BANNER: &str = "Spawning backdoor root shell...";

/// A connected backdoor shell.
pub struct Backdoor {
    stream: UnixStream,
    buf: Vec<u8>,
    shell: String,
}

/// Single-quotes `s` for a POSIX shell (as Python's shlex.quote does).
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r#"'"'"'"#))
}

impl Backdoor {
    /// Accepts the VMM's connection on `listener` and waits for the banner.
    /// `shell` is the guest shell that runs commands (`bash` on NixOS and
    /// Debian guests, `sh` on busybox ones).
    pub fn accept(listener: &UnixListener, shell: &str, timeout: Duration) -> io::Result<Self> {
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
        let mut b = Backdoor {
            stream,
            buf: Vec::new(),
            shell: shell.to_owned(),
        };
        b.wait_for(BANNER.as_bytes(), timeout.saturating_sub(start.elapsed()))?;
        Ok(b)
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

    fn wait_for(&mut self, needle: &[u8], timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.windows(needle.len()).position(|w| w == needle) {
                let mut end = pos + needle.len();
                if self.buf.get(end) == Some(&b'\n') {
                    end += 1;
                }
                self.buf.drain(..end);
                return Ok(());
            }
            self.fill(Some(deadline))?;
        }
    }

    fn read_line(&mut self, deadline: Option<Instant>) -> io::Result<Vec<u8>> {
        let mut searched = 0;
        loop {
            if let Some(i) = self.buf[searched..].iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..searched + i + 1).collect();
                return Ok(line[..line.len() - 1].to_vec());
            }
            searched = self.buf.len();
            self.fill(deadline)?;
        }
    }

    /// Runs `command` in the guest; returns (exit status, stdout). With
    /// `timeout_s`, the guest's `timeout` kills it after that many seconds
    /// (status 124).
    pub fn execute(&mut self, command: &str, timeout_s: Option<u32>) -> io::Result<(i32, Vec<u8>)> {
        let prefix = timeout_s
            .map(|t| format!("timeout {t}"))
            .unwrap_or_default();
        let bash = self.shell == "bash";
        let line = if bash {
            // Exactly the upstream NixOS driver's framing.
            format!(
                "{prefix} bash -c {} | (base64 -w 0; echo)\n",
                shell_quote(&format!("set -euo pipefail; {command}"))
            )
        } else {
            // POSIX shells have no PIPESTATUS: keep the status in a file.
            format!(
                "{{ {prefix} {} -c {}; echo $? > /tmp/.skiff-status; }} | (base64 -w 0; echo)\n",
                self.shell,
                shell_quote(&format!("set -eu; {command}"))
            )
        };
        self.stream.write_all(line.as_bytes())?;
        let deadline = timeout_s.map(|t| Instant::now() + Duration::from_secs(u64::from(t) + 30));
        let encoded = self.read_line(deadline)?;
        let output = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim_ascii())
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad base64 from the guest: {e}"),
                )
            })?;
        let status_cmd: &[u8] = if bash {
            b"echo ${PIPESTATUS[0]}\n"
        } else {
            b"cat /tmp/.skiff-status\n"
        };
        self.stream.write_all(status_cmd)?;
        let status_line = self.read_line(deadline)?;
        let status = String::from_utf8_lossy(&status_line)
            .trim()
            .parse()
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "bad exit status line {:?}",
                        String::from_utf8_lossy(&status_line)
                    ),
                )
            })?;
        Ok((status, output))
    }

    /// Asks the guest to power off (no reply is read, as upstream does).
    pub fn poweroff(&mut self) -> io::Result<()> {
        self.stream.write_all(b"poweroff -f || poweroff\n")
    }
}
