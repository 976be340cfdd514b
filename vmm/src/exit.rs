//! How a VM ends: the reasons ([`ExitReason`]), the process exit statuses
//! they map to ([`ExitStatus`], skiff-vmm's contract with whoever runs it:
//! `--help`, the README table and the test driver's messages all come from
//! [`ExitStatus::meaning`]).
//!
//! This module depends on nothing else in the crate, so the control plane,
//! the vCPU threads and the builder can all name an exit without reaching
//! up into `vm.rs`.

use log::{error, info, warn};

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset (reboot).
    Reset,
    /// The guest kernel reported a panic.
    Panic,
    /// A vCPU hit something it cannot go on from.
    Crash(String),
    /// The VMM received a termination signal.
    Signal(i32),
    /// A monitor client sent `quit`.
    Quit,
    /// A monitor client sent `system_reset`: skiff-vmm does not reboot
    /// in place, so it ends as on a guest reset.
    HostReset,
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn status(&self) -> ExitStatus {
        match self {
            ExitReason::PowerOff | ExitReason::Signal(_) | ExitReason::Quit => ExitStatus::Stopped,
            ExitReason::Reset | ExitReason::HostReset => ExitStatus::Reset,
            ExitReason::Panic => ExitStatus::Panic,
            ExitReason::Crash(_) => ExitStatus::Crash,
        }
    }

    /// The process exit code for this reason.
    pub fn exit_code(&self) -> i32 {
        self.status().code()
    }
}

/// skiff-vmm's process exit statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Powered off, `quit`, or stopped by a signal.
    Stopped,
    /// The VM could not start.
    StartFailed,
    /// The command line was invalid (clap's status).
    Usage,
    /// The guest rebooted, or `system_reset`.
    Reset,
    /// The guest kernel panicked.
    Panic,
    /// The guest crashed.
    Crash,
}

impl ExitStatus {
    /// Every status, in code order.
    pub const ALL: [ExitStatus; 6] = [
        ExitStatus::Stopped,
        ExitStatus::StartFailed,
        ExitStatus::Usage,
        ExitStatus::Reset,
        ExitStatus::Panic,
        ExitStatus::Crash,
    ];

    /// The process exit code.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Stopped => 0,
            ExitStatus::StartFailed => 1,
            ExitStatus::Usage => 2,
            ExitStatus::Reset => 3,
            ExitStatus::Panic => 4,
            ExitStatus::Crash => 5,
        }
    }

    /// The status a process exit code stands for, if it is one of ours.
    pub fn from_code(code: i32) -> Option<ExitStatus> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }

    /// What the status means, in one line.
    pub fn meaning(self) -> &'static str {
        match self {
            ExitStatus::Stopped => {
                "the guest powered off, a monitor client sent quit, or skiff-vmm was stopped by SIGTERM/SIGINT"
            }
            ExitStatus::StartFailed => {
                "the VM could not be started (bad input, /dev/kvm missing or unusable)"
            }
            ExitStatus::Usage => "invalid command-line arguments",
            ExitStatus::Reset => {
                "the guest rebooted (a reset request: ACPI reset register or i8042), or a monitor client sent system_reset"
            }
            ExitStatus::Panic => "the guest kernel panicked (reported through the pvpanic device)",
            ExitStatus::Crash => {
                "the guest crashed (triple fault, KVM internal error or an exit skiff-vmm cannot handle; the log names the reason and the registers), or a skiff-vmm thread made a system call its seccomp filter forbids (the log names the thread and the call)"
            }
        }
    }

    /// The `EXIT STATUS:` section of `--help`, wrapped at 76 columns.
    pub fn help_table() -> String {
        let mut out = String::from("EXIT STATUS:\n");
        for status in Self::ALL {
            let mut line = format!("  {}  ", status.code());
            let indent = line.len();
            for word in status.meaning().split(' ') {
                if line.len() + word.len() > 76 && line.len() > indent {
                    out.push_str(line.trim_end());
                    out.push('\n');
                    line = " ".repeat(indent);
                }
                line.push_str(word);
                line.push(' ');
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Logs `reason` the way operators expect to read it.
pub fn log_exit(reason: &ExitReason) {
    match reason {
        ExitReason::PowerOff => info!("guest powered off"),
        ExitReason::Reset => info!("guest requested a reset (reboot); exiting with status 3"),
        ExitReason::Quit => info!("quit requested on a monitor"),
        ExitReason::HostReset => {
            info!("system_reset requested on a monitor; exiting with status 3")
        }
        ExitReason::Panic => error!("guest kernel panicked (pvpanic); exiting with status 4"),
        ExitReason::Crash(msg) => error!("guest crashed: {msg}"),
        ExitReason::Signal(sig) => {
            let name_of = match *sig {
                signal_hook::consts::SIGTERM => "SIGTERM",
                signal_hook::consts::SIGINT => "SIGINT",
                _ => "a signal",
            };
            warn!("stopped by {name_of}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_round_trip() {
        for (i, status) in ExitStatus::ALL.into_iter().enumerate() {
            assert_eq!(status.code(), i as i32);
            assert_eq!(ExitStatus::from_code(status.code()), Some(status));
        }
        assert_eq!(ExitStatus::from_code(137), None);
    }

    #[test]
    fn every_reason_maps_to_its_documented_status() {
        let cases = [
            (ExitReason::PowerOff, 0),
            (ExitReason::Quit, 0),
            (ExitReason::Signal(15), 0),
            (ExitReason::Reset, 3),
            (ExitReason::HostReset, 3),
            (ExitReason::Panic, 4),
            (ExitReason::Crash("x".into()), 5),
        ];
        for (reason, code) in cases {
            assert_eq!(reason.exit_code(), code, "{reason:?}");
        }
    }

    #[test]
    fn help_table_lists_every_status_within_76_columns() {
        let table = ExitStatus::help_table();
        assert!(table.starts_with("EXIT STATUS:\n"));
        for status in ExitStatus::ALL {
            assert!(
                table.contains(&format!("\n  {}  ", status.code())),
                "{table}"
            );
        }
        assert!(table.lines().all(|l| l.len() <= 76), "{table}");
        // Every word of every meaning is there, in order.
        let words: Vec<&str> = table.split_whitespace().collect();
        for status in ExitStatus::ALL {
            let meaning: Vec<&str> = status.meaning().split(' ').collect();
            assert!(
                words
                    .windows(meaning.len())
                    .any(|w| w == meaning.as_slice()),
                "{table}"
            );
        }
    }
}
