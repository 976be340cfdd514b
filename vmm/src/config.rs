//! VM configuration, shared by the command line and other front ends.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Where the 8250 serial port's output goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SerialConfig {
    /// The VMM's stdout (and stdin as input).
    #[default]
    Stdio,
    /// A file, created or truncated.
    File(PathBuf),
    /// Nowhere.
    None,
}

impl FromStr for SerialConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(SerialConfig::Stdio),
            "none" | "off" => Ok(SerialConfig::None),
            _ => match s.strip_prefix("file=") {
                Some("") => Err("file= needs a path, as in file=/tmp/serial.log".into()),
                Some(path) => Ok(SerialConfig::File(PathBuf::from(path))),
                None => Err(format!(
                    "'{s}' is not a serial backend: use stdio, file=PATH or none"
                )),
            },
        }
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialConfig::Stdio => write!(f, "stdio"),
            SerialConfig::File(p) => write!(f, "file={}", p.display()),
            SerialConfig::None => write!(f, "none"),
        }
    }
}

/// Everything needed to build and boot one VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmConfig {
    /// Name used in logs.
    pub name: String,
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initrd/initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Serial port backend.
    pub serial: SerialConfig,
    /// The KVM device node.
    pub kvm_device: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_backends_parse() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("none".parse(), Ok(SerialConfig::None));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(SerialConfig::File(PathBuf::from("/tmp/x")))
        );
        assert!("file=".parse::<SerialConfig>().is_err());
        let err = "tcp:1234".parse::<SerialConfig>().unwrap_err();
        assert!(err.contains("tcp:1234"), "{err}");
        assert_eq!(SerialConfig::File("/a".into()).to_string(), "file=/a");
    }
}
