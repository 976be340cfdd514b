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

/// Where the virtio console (the guest's hvc0) is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleConfig {
    /// The VMM's stdin/stdout.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// A unix stream socket the VMM connects to (the test driver listens).
    Socket(PathBuf),
}

impl FromStr for ConsoleConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "stdio" {
            return Ok(ConsoleConfig::Stdio);
        }
        let (kind, path) = s.split_once('=').ok_or_else(|| {
            format!("'{s}' is not a console backend: use socket=PATH, stdio or file=PATH")
        })?;
        if path.is_empty() {
            return Err(format!("{kind}= needs a path"));
        }
        match kind {
            "socket" => Ok(ConsoleConfig::Socket(PathBuf::from(path))),
            "file" => Ok(ConsoleConfig::File(PathBuf::from(path))),
            _ => Err(format!(
                "'{s}' is not a console backend: use socket=PATH, stdio or file=PATH"
            )),
        }
    }
}

/// Where an HMP (human monitor) socket is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MonitorConfig {
    /// skiff-vmm listens at the path (any number of clients).
    Listen(PathBuf),
    /// skiff-vmm connects to a socket someone else listens on, as QEMU's
    /// `-monitor unix:PATH` does for the NixOS test driver.
    Connect(PathBuf),
}

impl FromStr for MonitorConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("socket=") {
            Some("") => Err("socket= needs a path".into()),
            Some(path) => Ok(MonitorConfig::Connect(PathBuf::from(path))),
            None if s.is_empty() => Err("--monitor needs a path".into()),
            None => Ok(MonitorConfig::Listen(PathBuf::from(s))),
        }
    }
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Open read-only; guest writes fail.
    pub readonly: bool,
    /// Writes go to a temporary copy-on-write layer; the image is unchanged.
    pub overlay: bool,
    /// Serial number the guest reads (GET_ID).
    pub id: Option<String>,
}

fn parse_switch(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}={value}: expected on or off")),
    }
}

impl FromStr for DiskConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut path = None;
        let mut readonly = false;
        let mut overlay = false;
        let mut id = None;
        for item in s.split(',') {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                format!("'{item}' in --disk is not key=value (expected path=PATH[,readonly=on][,overlay=on][,id=NAME])")
            })?;
            match key {
                "path" if !value.is_empty() => path = Some(PathBuf::from(value)),
                "path" => return Err("path= needs a file".into()),
                "readonly" => readonly = parse_switch(key, value)?,
                "overlay" => overlay = parse_switch(key, value)?,
                "id" if value.len() <= 20 => id = Some(value.to_owned()),
                "id" => return Err(format!("id={value}: at most 20 bytes")),
                _ => {
                    return Err(format!(
                        "unknown --disk option '{key}' (expected path, readonly, overlay, id)"
                    ))
                }
            }
        }
        let path = path.ok_or("--disk needs path=PATH")?;
        if readonly && overlay {
            return Err(
                "readonly=on and overlay=on exclude each other (an overlay is writable)".into(),
            );
        }
        Ok(DiskConfig {
            path,
            readonly,
            overlay,
            id,
        })
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
    /// virtio-blk disks, in order (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// The virtio console (hvc0), if any.
    pub console: Option<ConsoleConfig>,
    /// Whether to add a virtio-rng device.
    pub rng: bool,
    /// Describe virtio devices with `virtio_mmio.device=` on the kernel
    /// command line instead of in the ACPI DSDT.
    pub virtio_cmdline: bool,
    /// QMP sockets to listen on.
    #[serde(default)]
    pub qmp: Vec<PathBuf>,
    /// HMP monitor sockets.
    #[serde(default)]
    pub monitor: Vec<MonitorConfig>,
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

    #[test]
    fn disks_parse() {
        let d: DiskConfig = "path=/img,readonly=on,id=root".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/img"));
        assert!(d.readonly && !d.overlay);
        assert_eq!(d.id.as_deref(), Some("root"));
        let d: DiskConfig = "path=/img,overlay=on".parse().unwrap();
        assert!(d.overlay);
        for bad in [
            "/img",
            "readonly=on",
            "path=/a,size=3",
            "path=/a,readonly=maybe",
            "path=/a,readonly=on,overlay=on",
            "path=",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn monitors_parse() {
        assert_eq!(
            "/run/mon".parse(),
            Ok(MonitorConfig::Listen(PathBuf::from("/run/mon")))
        );
        assert_eq!(
            "socket=/run/mon".parse(),
            Ok(MonitorConfig::Connect(PathBuf::from("/run/mon")))
        );
        assert!("socket=".parse::<MonitorConfig>().is_err());
        assert!("".parse::<MonitorConfig>().is_err());
    }

    #[test]
    fn consoles_parse() {
        assert_eq!("stdio".parse(), Ok(ConsoleConfig::Stdio));
        assert_eq!(
            "socket=/run/s".parse(),
            Ok(ConsoleConfig::Socket(PathBuf::from("/run/s")))
        );
        assert!("tcp=1".parse::<ConsoleConfig>().is_err());
        assert!("socket=".parse::<ConsoleConfig>().is_err());
    }
}
