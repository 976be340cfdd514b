//! The NixOS test driver's backdoor protocol on a guest's hvc0
//! (nixos-test-driver spec §2.2), as bytes: no I/O, no threads, so that
//! the test driver (`driver/src/shell.rs`, with its progress reports and
//! streaming), the integration tests' client (`tests/src/backdoor.rs`,
//! with plain deadlines) and the benchmark harness's Python twin
//! (`bench/qemu_backdoor.py`, compared with this crate by a test) all
//! speak one protocol:
//!
//! 1. the guest prints [`BANNER`] when its root shell reads commands;
//! 2. a command goes as one line, [`Framing::command_line`] (upstream's
//!    `timeout T bash -c 'set -euo pipefail; CMD' | (base64 -w 0; echo)`);
//! 3. its stdout comes back as one base64 line ([`decode_output`]);
//! 4. [`Framing::status_command`] asks for its exit status, one line
//!    ([`parse_status`]).
//!
//! Guests without bash (busybox) get a POSIX framing that keeps the status
//! in a file instead of `${PIPESTATUS[0]}`.

use base64::Engine;

/// The line the guest prints when its root shell is ready.
pub const BANNER: &[u8] = b"Spawning backdoor root shell...";

/// A reply line that breaks the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The output line is not base64: something else writes to hvc0.
    #[error("the guest shell sent output that is not base64 ({0}); something else writes to hvc0")]
    BadOutput(String),
    /// The status line is not a number.
    #[error("the guest shell sent {0:?} where an exit status belongs")]
    BadStatus(String),
}

/// Single-quotes `s` for a POSIX shell, as Python's `shlex.quote` does
/// (bare words of safe characters stay as they are).
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./-_".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r#"'"'"'"#))
}

/// How commands are framed for the guest's shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// bash, byte for byte as the upstream driver sends it.
    Bash,
    /// A POSIX shell (busybox `sh`): no `pipefail`, no `PIPESTATUS`, so
    /// the exit status is kept in `/tmp/.skiff-status`.
    Posix(String),
}

impl Framing {
    /// The framing for the shell named `shell` (`bash`, `sh`, ...).
    pub fn for_shell(shell: &str) -> Framing {
        match shell {
            "bash" => Framing::Bash,
            other => Framing::Posix(other.to_owned()),
        }
    }

    /// The line that runs `command` (killed by the guest's `timeout` after
    /// `timeout` seconds, status 124, when given).
    pub fn command_line(&self, command: &str, timeout: Option<u64>) -> String {
        let prefix = timeout.map(|t| format!("timeout {t}")).unwrap_or_default();
        match self {
            Framing::Bash => format!(
                "{prefix} bash -c {} | (base64 -w 0; echo)\n",
                quote(&format!("set -euo pipefail; {command}"))
            ),
            Framing::Posix(shell) => format!(
                "{{ {prefix} {shell} -c {}; echo $? > /tmp/.skiff-status; }} | (base64 -w 0; echo)\n",
                quote(&format!("set -eu; {command}"))
            ),
        }
    }

    /// The line that asks for the last command's exit status.
    pub fn status_command(&self) -> &'static str {
        match self {
            Framing::Bash => "echo ${PIPESTATUS[0]}\n",
            Framing::Posix(_) => "cat /tmp/.skiff-status\n",
        }
    }
}

/// The upstream driver's line for `command` (bash framing).
pub fn command_line(command: &str, timeout: Option<u64>) -> String {
    Framing::Bash.command_line(command, timeout)
}

/// Where the shell's input starts in `buf`: just past the first
/// [`BANNER`] and the line ends after it; None while it has not come.
pub fn after_banner(buf: &[u8]) -> Option<usize> {
    let pos = buf.windows(BANNER.len()).position(|w| w == BANNER)?;
    let mut end = pos + BANNER.len();
    while matches!(buf.get(end), Some(b'\r' | b'\n')) {
        end += 1;
    }
    Some(end)
}

/// Takes the first whole line (without its `\n`) out of `buf`. `searched`
/// is how much of `buf` is already known to hold no `\n` (kept by the
/// caller across reads, so a long line is not searched again and again).
pub fn take_line(buf: &mut Vec<u8>, searched: &mut usize) -> Option<Vec<u8>> {
    match buf[*searched..].iter().position(|&b| b == b'\n') {
        Some(i) => {
            let mut line: Vec<u8> = buf.drain(..*searched + i + 1).collect();
            line.pop();
            *searched = 0;
            Some(line)
        }
        None => {
            *searched = buf.len();
            None
        }
    }
}

/// A command's stdout from its base64 line.
pub fn decode_output(line: &[u8]) -> Result<Vec<u8>, FrameError> {
    let text = line.trim_ascii();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| {
            let shown = String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned();
            FrameError::BadOutput(format!("{e}; received {shown:?}"))
        })
}

/// A command's exit status from its status line.
pub fn parse_status(line: &[u8]) -> Result<i32, FrameError> {
    let s = String::from_utf8_lossy(line).trim().to_owned();
    s.parse().map_err(|_| FrameError::BadStatus(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

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
        assert_eq!(Framing::Bash.status_command(), "echo ${PIPESTATUS[0]}\n");
        assert_eq!(quote("a-b/c.d"), "a-b/c.d");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
    }

    #[test]
    fn posix_framing_keeps_the_status_in_a_file() {
        let f = Framing::for_shell("sh");
        assert_eq!(
            f.command_line("false", Some(5)),
            "{ timeout 5 sh -c 'set -eu; false'; echo $? > /tmp/.skiff-status; } | (base64 -w 0; echo)\n"
        );
        assert_eq!(f.status_command(), "cat /tmp/.skiff-status\n");
        assert_eq!(Framing::for_shell("bash"), Framing::Bash);
    }

    #[test]
    fn banner_and_lines_are_found_across_reads() {
        let mut buf = b"boot noise\r\nSpawning backdoor ro".to_vec();
        assert_eq!(after_banner(&buf), None);
        buf.extend_from_slice(b"ot shell...\r\n\nYQ==\n0\n");
        let end = after_banner(&buf).unwrap();
        buf.drain(..end);
        let mut searched = 0;
        let line = take_line(&mut buf, &mut searched).unwrap();
        assert_eq!(decode_output(&line), Ok(b"a".to_vec()));
        let line = take_line(&mut buf, &mut searched).unwrap();
        assert_eq!(parse_status(&line), Ok(0));
        assert_eq!(take_line(&mut buf, &mut searched), None);
        buf.extend_from_slice(b"12");
        assert_eq!(take_line(&mut buf, &mut searched), None);
        assert_eq!(searched, 2);
        buf.extend_from_slice(b"4\r\n");
        let line = take_line(&mut buf, &mut searched).unwrap();
        assert_eq!(parse_status(&line), Ok(124));
    }

    #[test]
    fn bad_replies_say_what_came() {
        let e = decode_output(b"not base64!").unwrap_err();
        assert!(e.to_string().contains("not base64!"), "{e}");
        let e = parse_status(b"login:").unwrap_err();
        assert!(e.to_string().contains("login:"), "{e}");
    }

    /// The benchmark harness's Python client frames commands as this crate
    /// does, so that the two drivers it compares send the same bytes.
    #[test]
    fn bench_harness_frames_commands_the_same_way() {
        let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench");
        let commands = [
            "true",
            "echo 'hi'",
            "systemctl --no-pager show \"multi-user.target\" --property=ActiveState",
            "printf '%s\\n' \"$HOME\" | tr a-z A-Z; ls -la /tmp",
            "x=$'\\t'; echo \"${x}é\"",
        ];
        let script = format!(
            "import sys, json\nsys.path.insert(0, {:?})\nimport qemu_backdoor as q\n\
             for c in json.loads(sys.argv[1]):\n    \
             sys.stdout.write(q.command_line(c, 900))\n    \
             sys.stdout.write(q.command_line(c, None))\n",
            bench.display().to_string()
        );
        let arg = format!(
            "[{}]",
            commands
                .iter()
                .map(|c| format!("{:?}", c))
                .collect::<Vec<_>>()
                .join(",")
        );
        let out = Command::new("python3")
            .args(["-c", &script, &arg])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let expected: String = commands
            .iter()
            .flat_map(|c| [command_line(c, Some(900)), command_line(c, None)])
            .collect();
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    }
}
