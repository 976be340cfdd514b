//! VM configuration: one type per thing, from the command line to the
//! device.
//!
//! - The command line parses straight into [`VmConfig`] (it is clap's
//!   `Args`; `main.rs` only flattens it). Devices own their config types
//!   ([`BlockConfig`], [`ConsoleBackend`]); `VmConfig` holds them as they
//!   are and the builder hands them over unchanged.
//! - Every `key=value,...` option (`--disk`, `--net`, `--serial`,
//!   `--console`, `--monitor`) goes through one parser, [`Options`]: keys known, none
//!   given twice, no empty value, commas in values written `,,` as QEMU
//!   writes them. Each rule about a device's options is checked once,
//!   here.
//! - [`VmConfig::to_args`] writes a config back as the `skiff-vmm`
//!   arguments that parse to it (a round trip the tests check on random
//!   configs). The test driver and the integration tests start skiff-vmm
//!   with it rather than with hand-written flags.

use std::fmt;
use std::path::PathBuf;

pub use skiff_devices::virtio::block::BlockConfig;
pub use skiff_devices::virtio::console::ConsoleBackend;
pub use skiff_devices::virtio::gpu::GpuConfig;
pub use skiff_devices::virtio::input::InputKind;
pub use skiff_devices::virtio::net::{MacAddr, NetBackend, NetConfig};

use crate::memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};

/// The command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Most vCPUs a VM may have (APIC ids fit in the MADT's byte fields).
pub const MAX_CPUS: u8 = 254;

/// One `key=value,...` option string, split and checked: every key is one
/// the option knows, none is given twice, none has an empty value, and a
/// bare word (no `=`) is one the option allows. A comma inside a value is
/// written `,,` (QEMU's escape).
#[derive(Debug)]
pub struct Options {
    flag: &'static str,
    usage: &'static str,
    word: Option<String>,
    pairs: Vec<(String, String)>,
}

impl Options {
    /// Parses `s`, given to `--{flag}` whose accepted form is `usage`;
    /// `keys` are the keys it may have and `words` the bare words.
    pub fn parse(
        flag: &'static str,
        usage: &'static str,
        s: &str,
        keys: &[&str],
        words: &[&str],
    ) -> Result<Options, String> {
        let mut opts = Options {
            flag,
            usage,
            word: None,
            pairs: Vec::new(),
        };
        for item in split_escaped(s) {
            match item.split_once('=') {
                Some((key, value)) => {
                    if !keys.contains(&key) {
                        return Err(format!(
                            "unknown --{flag} option '{key}' in '{s}' (expected {usage})"
                        ));
                    }
                    if value.is_empty() {
                        return Err(format!("--{flag}: {key}= needs a value (expected {usage})"));
                    }
                    if opts.value(key).is_some() {
                        return Err(format!("--{flag}: {key}= is given twice in '{s}'"));
                    }
                    opts.pairs.push((key.to_owned(), value.to_owned()));
                }
                None if words.contains(&item.as_str()) && opts.word.is_none() => {
                    opts.word = Some(item)
                }
                None => return Err(format!("'{s}' is not a valid --{flag} (expected {usage})")),
            }
        }
        if opts.word.is_some() && !opts.pairs.is_empty() {
            return Err(format!("'{s}' is not a valid --{flag} (expected {usage})"));
        }
        Ok(opts)
    }

    /// The bare word given, if any.
    pub fn word(&self) -> Option<&str> {
        self.word.as_deref()
    }

    /// The value of `key`, if given.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The only key given, with its value, when the option is one of
    /// several `kind=PATH` forms.
    pub fn single(&self) -> Result<(&str, &str), String> {
        match self.pairs.as_slice() {
            [(k, v)] => Ok((k, v)),
            _ => Err(format!(
                "'{}' is not a valid --{} (expected {})",
                self.source(),
                self.flag,
                self.usage
            )),
        }
    }

    /// `key` as an on/off switch; off when not given.
    pub fn switch(&self, key: &str) -> Result<bool, String> {
        match self.value(key) {
            None => Ok(false),
            Some("on" | "true" | "yes") => Ok(true),
            Some("off" | "false" | "no") => Ok(false),
            Some(v) => Err(format!("--{}: {key}={v}: expected on or off", self.flag)),
        }
    }

    fn source(&self) -> String {
        let mut parts: Vec<String> = self.word.iter().cloned().collect();
        parts.extend(self.pairs.iter().map(|(k, v)| format!("{k}={}", escape(v))));
        parts.join(",")
    }
}

/// Splits at single commas; `,,` stands for a comma inside an item.
fn split_escaped(s: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                items.last_mut().expect("never empty").push(',');
            } else {
                items.push(String::new());
            }
        } else {
            items.last_mut().expect("never empty").push(c);
        }
    }
    items
}

/// `value` with its commas doubled, for an option string.
pub fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// Where the 8250 serial port's output goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// The VMM's stdout (and stdin as input).
    #[default]
    Stdio,
    /// A file, created or truncated.
    File(PathBuf),
    /// Nowhere.
    None,
}

const SERIAL_USAGE: &str = "stdio, file=PATH or none";

/// Parses `--serial`.
pub fn parse_serial(s: &str) -> Result<SerialConfig, String> {
    let o = Options::parse(
        "serial",
        SERIAL_USAGE,
        s,
        &["file"],
        &["stdio", "none", "off"],
    )?;
    Ok(match o.word() {
        Some("stdio") => SerialConfig::Stdio,
        Some(_) => SerialConfig::None,
        None => SerialConfig::File(o.single()?.1.into()),
    })
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialConfig::Stdio => write!(f, "stdio"),
            SerialConfig::File(p) => write!(f, "file={}", escape(&p.to_string_lossy())),
            SerialConfig::None => write!(f, "none"),
        }
    }
}

const CONSOLE_USAGE: &str = "socket=PATH, stdio or file=PATH";

/// Parses `--console`.
pub fn parse_console(s: &str) -> Result<ConsoleBackend, String> {
    let o = Options::parse("console", CONSOLE_USAGE, s, &["socket", "file"], &["stdio"])?;
    if o.word().is_some() {
        return Ok(ConsoleBackend::Stdio);
    }
    Ok(match o.single()? {
        ("socket", path) => ConsoleBackend::Socket(path.into()),
        (_, path) => ConsoleBackend::File(path.into()),
    })
}

/// `--console`'s value for `backend`.
pub fn console_arg(backend: &ConsoleBackend) -> String {
    match backend {
        ConsoleBackend::Stdio => "stdio".into(),
        ConsoleBackend::File(p) => format!("file={}", escape(&p.to_string_lossy())),
        ConsoleBackend::Socket(p) => format!("socket={}", escape(&p.to_string_lossy())),
    }
}

const DISK_USAGE: &str = "path=PATH[,readonly=on][,overlay=on][,id=NAME]";

/// Parses `--disk`; the disk's own rules are [`BlockConfig::validate`]'s.
pub fn parse_disk(s: &str) -> Result<BlockConfig, String> {
    let o = Options::parse(
        "disk",
        DISK_USAGE,
        s,
        &["path", "readonly", "overlay", "id"],
        &[],
    )?;
    let path = o
        .value("path")
        .ok_or_else(|| format!("--disk needs path=PATH (expected {DISK_USAGE})"))?;
    let config = BlockConfig {
        path: path.into(),
        readonly: o.switch("readonly")?,
        overlay: o.switch("overlay")?,
        id: o.value("id").map(str::to_owned),
    };
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// `--disk`'s value for `disk`.
pub fn disk_arg(disk: &BlockConfig) -> String {
    let mut s = format!("path={}", escape(&disk.path.to_string_lossy()));
    if disk.readonly {
        s.push_str(",readonly=on");
    }
    if disk.overlay {
        s.push_str(",overlay=on");
    }
    if let Some(id) = &disk.id {
        s.push_str(",id=");
        s.push_str(&escape(id));
    }
    s
}

const NET_USAGE: &str = "stream=PATH,mac=MAC[,id=NAME]";

/// Parses `--net`.
pub fn parse_net(s: &str) -> Result<NetConfig, String> {
    let o = Options::parse("net", NET_USAGE, s, &["stream", "mac", "id"], &[])?;
    let path = o
        .value("stream")
        .ok_or_else(|| format!("--net needs stream=PATH (expected {NET_USAGE})"))?;
    let mac = o
        .value("mac")
        .ok_or_else(|| format!("--net needs mac=MAC (expected {NET_USAGE})"))?;
    let mac = mac.parse().map_err(|e| format!("--net mac: {e}"))?;
    Ok(NetConfig {
        backend: NetBackend::Stream(path.into()),
        mac,
        id: o.value("id").map(str::to_owned),
    })
}

/// `--net`'s value for `net`.
pub fn net_arg(net: &NetConfig) -> String {
    let NetBackend::Stream(path) = &net.backend;
    let mut s = format!("stream={},mac={}", escape(&path.to_string_lossy()), net.mac);
    if let Some(id) = &net.id {
        s.push_str(",id=");
        s.push_str(&escape(id));
    }
    s
}

/// The id of network card `index` of `nets`: its own, or `net<index>`.
pub fn net_id(nets: &[NetConfig], index: usize) -> String {
    nets.get(index)
        .and_then(|n| n.id.clone())
        .unwrap_or_else(|| format!("net{index}"))
}

const GPU_USAGE: &str = "width=W,height=H (or nothing, for 1024x768)";

/// Parses `--gpu`: the display mode, or nothing for the default.
pub fn parse_gpu(s: &str) -> Result<GpuConfig, String> {
    let mut gpu = GpuConfig::default();
    if !s.is_empty() {
        let o = Options::parse("gpu", GPU_USAGE, s, &["width", "height"], &[])?;
        let num = |key: &str, default: u32| -> Result<u32, String> {
            match o.value(key) {
                None => Ok(default),
                Some(v) => v
                    .parse()
                    .map_err(|_| format!("--gpu {key}: '{v}' is not a number of pixels")),
            }
        };
        gpu.width = num("width", gpu.width)?;
        gpu.height = num("height", gpu.height)?;
    }
    gpu.check().map_err(|e| format!("--gpu: {e}"))?;
    Ok(gpu)
}

/// `--gpu`'s value for `gpu`.
pub fn gpu_arg(gpu: &GpuConfig) -> String {
    format!("width={},height={}", gpu.width, gpu.height)
}

/// Parses `--input`.
pub fn parse_input(s: &str) -> Result<InputKind, String> {
    match s {
        "keyboard" => Ok(InputKind::Keyboard),
        "tablet" => Ok(InputKind::Tablet),
        other => Err(format!(
            "'{other}' is not a valid --input (expected keyboard or tablet)"
        )),
    }
}

/// `--input`'s value for `kind`.
pub fn input_arg(kind: InputKind) -> &'static str {
    match kind {
        InputKind::Keyboard => "keyboard",
        InputKind::Tablet => "tablet",
    }
}

/// Where an HMP (human monitor) socket is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorConfig {
    /// skiff-vmm listens at the path (any number of clients).
    Listen(PathBuf),
    /// skiff-vmm connects to a socket someone else listens on, as QEMU's
    /// `-monitor unix:PATH` does for the NixOS test driver.
    Connect(PathBuf),
}

const MONITOR_USAGE: &str = "PATH, path=PATH or socket=PATH";

/// Parses `--monitor`: a bare path (or `path=PATH`) to listen on, or
/// `socket=PATH` to connect to.
pub fn parse_monitor(s: &str) -> Result<MonitorConfig, String> {
    if s.is_empty() {
        return Err(format!("--monitor needs a path (expected {MONITOR_USAGE})"));
    }
    if !s.starts_with("socket=") && !s.starts_with("path=") {
        return Ok(MonitorConfig::Listen(s.into()));
    }
    let o = Options::parse("monitor", MONITOR_USAGE, s, &["socket", "path"], &[])?;
    Ok(match o.single()? {
        ("socket", path) => MonitorConfig::Connect(path.into()),
        (_, path) => MonitorConfig::Listen(path.into()),
    })
}

impl fmt::Display for MonitorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MonitorConfig::Listen(p) => write!(f, "path={}", escape(&p.to_string_lossy())),
            MonitorConfig::Connect(p) => write!(f, "socket={}", escape(&p.to_string_lossy())),
        }
    }
}

/// Everything needed to build and boot one VM: the `skiff-vmm` command
/// line, field for flag.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct VmConfig {
    /// Kernel to boot: an x86_64 bzImage or ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initial ramdisk (initrd/initramfs) to load.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_CPUS)))]
    pub cpus: u8,

    /// Guest memory in MiB.
    #[arg(long = "memory", value_name = "MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(MIN_MEMORY_MIB..=MAX_MEMORY_MIB))]
    pub memory_mib: u64,

    /// Where the serial console (ttyS0) goes: stdio, file=PATH or none.
    #[arg(long, value_name = "BACKEND", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialConfig,

    /// A virtio-blk disk: path=PATH[,readonly=on][,overlay=on][,id=NAME].
    /// Repeat for more disks; they appear as vda, vdb, ... in order.
    /// overlay=on keeps the guest's writes in a temporary copy-on-write
    /// layer (gone when the VM exits), so many VMs can share one image.
    #[arg(long = "disk", value_name = "SPEC", value_parser = parse_disk)]
    pub disks: Vec<BlockConfig>,

    /// A virtio-net card on a unix stream socket with QEMU's `-netdev
    /// stream` framing (a Skiff switch port, or any peer speaking it):
    /// stream=PATH,mac=MAC[,id=NAME]. Repeat for more cards, in the
    /// guest's order; ids default to net0, net1, ... and must differ.
    #[arg(long = "net", value_name = "SPEC", value_parser = parse_net)]
    pub nets: Vec<NetConfig>,

    /// The virtio console (guest /dev/hvc0): socket=PATH (connect to a unix
    /// socket someone listens on), stdio or file=PATH.
    #[arg(long, value_name = "BACKEND", value_parser = parse_console)]
    pub console: Option<ConsoleBackend>,

    /// Add a virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    pub rng: bool,

    /// Add a virtio-gpu display (2D, one screen; QMP/HMP screendump):
    /// width=W,height=H is the mode the guest gets, 1024x768 when
    /// `--gpu` is given alone.
    #[arg(long, value_name = "SPEC", num_args = 0..=1, default_missing_value = "",
          value_parser = parse_gpu)]
    pub gpu: Option<GpuConfig>,

    /// Add a virtio input device: keyboard (QMP send-key, HMP sendkey) or
    /// tablet (an absolute pointer, QMP input-send-event). Once per kind.
    #[arg(long = "input", value_name = "keyboard|tablet", value_parser = parse_input)]
    pub inputs: Vec<InputKind>,

    /// Describe virtio devices on the kernel command line
    /// (virtio_mmio.device=) instead of in the ACPI DSDT.
    #[arg(long = "virtio-mmio-cmdline")]
    pub virtio_cmdline: bool,

    /// KVM device node to use.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,

    /// Listen for QMP clients on a unix socket at PATH (QEMU 7.2's
    /// protocol; any number of clients at once). Repeatable.
    #[arg(long, value_name = "PATH")]
    pub qmp: Vec<PathBuf>,

    /// A human monitor (HMP subset): PATH to listen on, or socket=PATH to
    /// connect to a unix socket someone listens on (as QEMU's
    /// `-monitor unix:PATH`). Repeatable.
    #[arg(long, value_name = "SPEC", value_parser = parse_monitor)]
    pub monitor: Vec<MonitorConfig>,

    /// Name of this VM in log lines.
    #[arg(long, value_name = "NAME", default_value = "vm")]
    pub name: String,

    /// Restore the VM saved by `migrate file:DIR` (QMP or HMP) instead of
    /// booting the kernel: file:DIR. The rest of the command line must
    /// give the same memory, vCPUs and devices (their backends may
    /// differ: a new console socket, say); a snapshot that does not fit
    /// is refused.
    #[arg(long, value_name = "file:DIR", value_parser = parse_incoming)]
    pub incoming: Option<PathBuf>,

    /// How a restore backs guest memory: map (the memory file mapped
    /// MAP_PRIVATE: no copy, clean pages shared by every VM restored from
    /// it, faulted in 4 KiB at a time) or copy (read into the VM's own
    /// memory at restore, which then runs on huge pages as a booted VM).
    #[arg(long, value_name = "map|copy", default_value = "map")]
    pub incoming_memory: crate::memory::RestoreMemory,

    /// Start with the vCPUs paused (QEMU's -S), until QMP/HMP `cont`.
    #[arg(short = 'S', long)]
    pub paused: bool,

    /// What a system call outside a thread's seccomp allow-list does: kill
    /// (the VM ends with status 5 and a log line naming the thread and the
    /// call), log (allowed, recorded in the kernel's audit log) or off (no
    /// filter).
    #[arg(
        long,
        value_name = "off|log|kill",
        default_value = "kill",
        env = "SKIFF_SECCOMP"
    )]
    pub seccomp: crate::seccomp::SeccompMode,
}

/// `--incoming file:DIR`: the snapshot directory.
pub fn parse_incoming(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix("file:") {
        Some("") => Err("file: needs the snapshot directory after it".into()),
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Err(format!(
            "'{s}': only file:DIR is supported (the directory `migrate file:DIR` wrote)"
        )),
    }
}

impl VmConfig {
    /// A config with the command line's defaults and `kernel`.
    pub fn new(kernel: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
            cpus: 1,
            memory_mib: 256,
            serial: SerialConfig::Stdio,
            disks: Vec::new(),
            nets: Vec::new(),
            console: None,
            rng: false,
            gpu: None,
            inputs: Vec::new(),
            virtio_cmdline: false,
            kvm_device: "/dev/kvm".into(),
            qmp: Vec::new(),
            monitor: Vec::new(),
            name: "vm".into(),
            incoming: None,
            incoming_memory: crate::memory::RestoreMemory::Map,
            paused: false,
            seccomp: crate::seccomp::SeccompMode::Kill,
        }
    }

    /// The rules between options, which no single option's parser sees:
    /// every network card's id is its own. The message names the option.
    pub fn check(&self) -> Result<(), String> {
        for i in 0..self.nets.len() {
            let id = net_id(&self.nets, i);
            if (0..i).any(|j| net_id(&self.nets, j) == id) {
                return Err(format!(
                    "--net: two network cards have the id '{id}' (ids default to net0, net1, ...)"
                ));
            }
        }
        for (i, kind) in self.inputs.iter().enumerate() {
            if self.inputs[..i].contains(kind) {
                return Err(format!("--input: {} is given twice", input_arg(*kind)));
            }
        }
        if self.incoming.is_none() && self.incoming_memory != crate::memory::RestoreMemory::Map {
            return Err("--incoming-memory applies to a restore: give --incoming file:DIR".into());
        }
        Ok(())
    }

    /// The `skiff-vmm` arguments that parse back to this config.
    pub fn to_args(&self) -> Vec<String> {
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        // `--flag=VALUE` throughout: a value may start with a dash.
        let mut a = vec![format!("--kernel={}", path(&self.kernel))];
        if let Some(initrd) = &self.initrd {
            a.push(format!("--initrd={}", path(initrd)));
        }
        a.extend([
            format!("--cmdline={}", self.cmdline),
            format!("--cpus={}", self.cpus),
            format!("--memory={}", self.memory_mib),
            format!("--serial={}", self.serial),
        ]);
        for disk in &self.disks {
            a.push(format!("--disk={}", disk_arg(disk)));
        }
        for net in &self.nets {
            a.push(format!("--net={}", net_arg(net)));
        }
        if let Some(console) = &self.console {
            a.push(format!("--console={}", console_arg(console)));
        }
        if self.rng {
            a.push("--rng".into());
        }
        if let Some(gpu) = &self.gpu {
            a.push(format!("--gpu={}", gpu_arg(gpu)));
        }
        for kind in &self.inputs {
            a.push(format!("--input={}", input_arg(*kind)));
        }
        if self.virtio_cmdline {
            a.push("--virtio-mmio-cmdline".into());
        }
        a.push(format!("--kvm-device={}", path(&self.kvm_device)));
        for qmp in &self.qmp {
            a.push(format!("--qmp={}", path(qmp)));
        }
        for monitor in &self.monitor {
            a.push(format!("--monitor={monitor}"));
        }
        a.push(format!("--name={}", self.name));
        if let Some(dir) = &self.incoming {
            a.push(format!("--incoming=file:{}", path(dir)));
        }
        if self.incoming_memory != crate::memory::RestoreMemory::Map {
            a.push(format!("--incoming-memory={}", self.incoming_memory));
        }
        if self.paused {
            a.push("--paused".into());
        }
        if self.seccomp != crate::seccomp::SeccompMode::Kill {
            a.push(format!("--seccomp={}", self.seccomp));
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        vm: VmConfig,
    }

    fn parse_args(args: &[String]) -> Result<VmConfig, clap::Error> {
        Cli::try_parse_from(std::iter::once("skiff-vmm".to_owned()).chain(args.iter().cloned()))
            .map(|c| c.vm)
    }

    #[test]
    fn serial_backends_parse() {
        assert_eq!(parse_serial("stdio"), Ok(SerialConfig::Stdio));
        assert_eq!(parse_serial("none"), Ok(SerialConfig::None));
        assert_eq!(parse_serial("off"), Ok(SerialConfig::None));
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(SerialConfig::File(PathBuf::from("/tmp/x")))
        );
        assert!(parse_serial("file=").is_err());
        let err = parse_serial("tcp:1234").unwrap_err();
        assert!(
            err.contains("tcp:1234") && err.contains(SERIAL_USAGE),
            "{err}"
        );
        assert!(parse_serial("stdio,file=/a").is_err());
        assert_eq!(SerialConfig::File("/a".into()).to_string(), "file=/a");
    }

    #[test]
    fn nets_parse_and_refuse_bad_input_by_name() {
        let n = parse_net("stream=/run/vlan1.sock,mac=52:54:00:12:01:02,id=eth1").unwrap();
        assert_eq!(n.backend, NetBackend::Stream("/run/vlan1.sock".into()));
        assert_eq!(n.mac.to_string(), "52:54:00:12:01:02");
        assert_eq!(n.id.as_deref(), Some("eth1"));
        for (bad, says) in [
            ("mac=52:54:00:12:01:02", "--net needs stream=PATH"),
            ("stream=/s", "--net needs mac=MAC"),
            (
                "stream=/s,mac=52:54:00:12:01",
                "--net mac: '52:54:00:12:01' is not a MAC address",
            ),
            ("stream=/s,mac=01:00:5e:00:00:01", "multicast"),
            (
                "stream=/s,mac=52:54:00:12:01:02,tap=x",
                "unknown --net option 'tap'",
            ),
        ] {
            let err = parse_net(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let mut c = VmConfig::new("/k");
        let card = |id: Option<&str>| NetConfig {
            backend: NetBackend::Stream("/s".into()),
            mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
            id: id.map(str::to_owned),
        };
        c.nets = vec![card(None), card(Some("a"))];
        assert_eq!(c.check(), Ok(()));
        c.nets = vec![card(Some("net1")), card(None)];
        let err = c.check().unwrap_err();
        assert!(err.contains("--net") && err.contains("'net1'"), "{err}");
        c.nets = vec![card(Some("a")), card(Some("a"))];
        assert!(c.check().is_err());
    }

    #[test]
    fn disks_parse() {
        let d = parse_disk("path=/img,readonly=on,id=root").unwrap();
        assert_eq!(d.path, PathBuf::from("/img"));
        assert!(d.readonly && !d.overlay);
        assert_eq!(d.id.as_deref(), Some("root"));
        let d = parse_disk("path=/img,overlay=on").unwrap();
        assert!(d.overlay);
        let d = parse_disk("path=/a,,b.img").unwrap();
        assert_eq!(d.path, PathBuf::from("/a,b.img"));
        for (bad, says) in [
            ("/img", "not a valid --disk"),
            ("readonly=on", "needs path=PATH"),
            ("path=/a,size=3", "unknown --disk option 'size'"),
            (
                "path=/a,readonly=maybe",
                "readonly=maybe: expected on or off",
            ),
            (
                "path=/a,readonly=on,overlay=on",
                "readonly=on and overlay=on",
            ),
            ("path=", "path= needs a value"),
            ("path=/a,path=/b", "path= is given twice"),
            ("path=/a,id=abcdefghijklmnopqrstu", "at most 20 bytes"),
        ] {
            let err = parse_disk(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn monitors_parse() {
        assert_eq!(
            parse_monitor("/run/mon"),
            Ok(MonitorConfig::Listen(PathBuf::from("/run/mon")))
        );
        assert_eq!(
            parse_monitor("path=/run/mon"),
            Ok(MonitorConfig::Listen(PathBuf::from("/run/mon")))
        );
        assert_eq!(
            parse_monitor("socket=/run/mon"),
            Ok(MonitorConfig::Connect(PathBuf::from("/run/mon")))
        );
        assert!(parse_monitor("socket=").is_err());
        assert!(parse_monitor("").is_err());
    }

    #[test]
    fn consoles_parse() {
        assert_eq!(parse_console("stdio"), Ok(ConsoleBackend::Stdio));
        assert_eq!(
            parse_console("socket=/run/s"),
            Ok(ConsoleBackend::Socket(PathBuf::from("/run/s")))
        );
        assert_eq!(
            parse_console("socket=a=b"),
            Ok(ConsoleBackend::Socket(PathBuf::from("a=b")))
        );
        assert_eq!(
            parse_console("file=/run/f"),
            Ok(ConsoleBackend::File(PathBuf::from("/run/f")))
        );
        let err = parse_console("tcp=1").unwrap_err();
        assert!(err.contains("tcp") && err.contains("socket=PATH"), "{err}");
        assert!(parse_console("socket=").is_err());
        assert!(parse_console("socket=/a,file=/b").is_err());
    }

    #[test]
    fn defaults_match_the_command_line() {
        let parsed = parse_args(&["--kernel".into(), "/k".into()]).unwrap();
        assert_eq!(parsed, VmConfig::new("/k"));
    }

    /// xorshift64*: random configs without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn flip(&mut self) -> bool {
            self.below(2) == 1
        }
        /// A string of the characters that options and shells make
        /// hard: commas, equals signs, spaces, dashes, quotes.
        fn text(&mut self, min: usize) -> String {
            const CHARS: &[char] = &['a', 'Z', '0', ',', '=', ' ', '-', '/', '.', '\'', 'é'];
            let len = min + self.below(12) as usize;
            (0..len)
                .map(|_| CHARS[self.below(CHARS.len() as u64) as usize])
                .collect()
        }
        fn path(&mut self) -> PathBuf {
            format!("/{}", self.text(1)).into()
        }
    }

    fn random_config(r: &mut Rng) -> VmConfig {
        let mut c = VmConfig::new(r.path());
        c.initrd = r.flip().then(|| r.path());
        c.cmdline = if r.flip() {
            r.text(0)
        } else {
            format!("-{}", r.text(0))
        };
        c.cpus = 1 + r.below(u64::from(MAX_CPUS)) as u8;
        c.memory_mib = MIN_MEMORY_MIB + r.below(MAX_MEMORY_MIB - MIN_MEMORY_MIB + 1);
        c.serial = match r.below(3) {
            0 => SerialConfig::Stdio,
            1 => SerialConfig::None,
            _ => SerialConfig::File(r.path()),
        };
        for _ in 0..r.below(4) {
            let readonly = r.flip();
            c.disks.push(BlockConfig {
                path: r.path(),
                readonly,
                overlay: !readonly && r.flip(),
                id: r.flip().then(|| {
                    let mut id = r.text(1);
                    id.truncate(20);
                    id
                }),
            });
        }
        for _ in 0..r.below(3) {
            let mut mac = [0u8; 6];
            for b in &mut mac {
                *b = r.below(256) as u8;
            }
            mac[0] &= !1;
            c.nets.push(NetConfig {
                backend: NetBackend::Stream(r.path()),
                mac: MacAddr(mac),
                id: r.flip().then(|| r.text(1)),
            });
        }
        c.console = match r.below(4) {
            0 => None,
            1 => Some(ConsoleBackend::Stdio),
            2 => Some(ConsoleBackend::File(r.path())),
            _ => Some(ConsoleBackend::Socket(r.path())),
        };
        c.rng = r.flip();
        c.gpu = r.flip().then(|| GpuConfig {
            width: 320 + r.below(3776) as u32,
            height: 200 + r.below(3896) as u32,
        });
        if r.flip() {
            c.inputs.push(InputKind::Keyboard);
        }
        if r.flip() {
            c.inputs.insert(0, InputKind::Tablet);
        }
        c.virtio_cmdline = r.flip();
        c.kvm_device = r.path();
        c.qmp = (0..r.below(3)).map(|_| r.path()).collect();
        c.monitor = (0..r.below(3))
            .map(|_| {
                if r.flip() {
                    MonitorConfig::Listen(r.path())
                } else {
                    MonitorConfig::Connect(r.path())
                }
            })
            .collect();
        c.name = r.text(1);
        c.incoming = r.flip().then(|| r.path());
        if c.incoming.is_some() && r.flip() {
            c.incoming_memory = crate::memory::RestoreMemory::Copy;
        }
        c.paused = r.flip();
        c.seccomp = [
            crate::seccomp::SeccompMode::Off,
            crate::seccomp::SeccompMode::Log,
            crate::seccomp::SeccompMode::Kill,
        ][r.below(3) as usize];
        c
    }

    #[test]
    fn display_options_parse_and_refuse_bad_input_by_name() {
        let c = parse_args(&[
            "--kernel=/k".into(),
            "--gpu".into(),
            "--input=keyboard".into(),
        ])
        .unwrap();
        assert_eq!(c.gpu, Some(GpuConfig::default()));
        assert_eq!(c.inputs, [InputKind::Keyboard]);
        assert_eq!(
            parse_gpu("width=1280,height=800"),
            Ok(GpuConfig {
                width: 1280,
                height: 800
            })
        );
        assert_eq!(parse_gpu("height=600").unwrap().width, 1024);
        for (bad, want) in [
            (
                "width=wide",
                "--gpu width: 'wide' is not a number of pixels",
            ),
            (
                "width=100",
                "--gpu: display mode 100x768 is outside 320x200 .. 4095x4095",
            ),
            ("depth=24", "unknown --gpu option 'depth'"),
        ] {
            let e = parse_gpu(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert!(parse_input("mouse")
            .unwrap_err()
            .contains("keyboard or tablet"));
        let mut c = VmConfig::new("/k");
        c.inputs = vec![InputKind::Tablet, InputKind::Tablet];
        assert_eq!(c.check().unwrap_err(), "--input: tablet is given twice");
    }

    #[test]
    fn to_args_round_trips_through_the_command_line() {
        let mut r = Rng(0x5eed_cafe_f00d_d00d);
        for _ in 0..2000 {
            let config = random_config(&mut r);
            let args = config.to_args();
            let parsed = parse_args(&args)
                .unwrap_or_else(|e| panic!("{config:?}\n{args:?}\ndoes not parse: {e}"));
            assert_eq!(parsed, config, "{args:?}");
        }
    }
}
