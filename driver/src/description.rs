//! Test descriptions: which nodes a test has, how each boots, and its
//! script. JSON (what the Nix side emits) or TOML (for hand-written tests).
//!
//! ```json
//! { "name": "simple",
//!   "nodes": { "machine": { "kernel": "${SKIFF_GUEST}/vmlinuz-microvm",
//!                           "initrd": "${SKIFF_GUEST}/initrd.cpio.gz",
//!                           "cmdline": "root=/dev/vda rw", "memory": 1024,
//!                           "disks": [ { "path": "${SKIFF_GUEST}/rootfs.ext4", "overlay": true } ],
//!                           "vlans": [ 1 ] } },
//!   "script_file": "simple.py" }
//! ```
//!
//! Relative paths are taken from the description's directory; `${VAR}` in a
//! path is replaced by the environment variable (an unset one is an error).
//!
//! Each node is on the VLANs of its `vlans` (default `[1]`, `[]` for none),
//! numbered and addressed as [`crate::network`] says; its command line gets
//! the network parameters appended. Everything is checked here, before any
//! VM starts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use skiff_vmm::config::{BlockConfig, GpuConfig, InputKind, MAX_CPUS};
use skiff_vmm::memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use skiff_vmm::VmConfig;
use thiserror::Error;

use crate::network::{NetworkError, Nic, Plan};

/// What is wrong with a description.
#[derive(Debug, Error)]
pub enum DescriptionError {
    #[error("cannot read test description {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("test description {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("test description {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("test description {path}: {source}")]
    Network { path: PathBuf, source: NetworkError },
}

/// One VM of a test.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// bzImage or ELF vmlinux.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    /// Kernel command line; `console=ttyS0` is added when it names no console.
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// MiB.
    #[serde(default = "default_memory")]
    pub memory: u32,
    /// Disks, as `skiff-vmm --disk` takes them (`path`, `readonly`,
    /// `overlay`, `id`).
    #[serde(default)]
    pub disks: Vec<BlockConfig>,
    /// VLAN numbers the node is on, one network card each, in order
    /// (`virtualisation.vlans`). Signed, so that a negative number gets
    /// the same error as any other out of range.
    #[serde(default = "default_vlans")]
    pub vlans: Vec<i64>,
    /// More `skiff-vmm` flags, passed as they are.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Seconds to wait for the backdoor banner before giving up.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: u64,
    /// A screen, keyboard and tablet: `true` (1024x768) or
    /// `{"width": W, "height": H}`.
    #[serde(default)]
    pub display: Option<DisplaySpec>,
    /// The node's number as the writer of the description computed it
    /// (the Nix side, to configure the guest): checked against the
    /// driver's own, so both sides agree or the test does not start.
    #[serde(default)]
    pub number: Option<u32>,
    /// The MACs of its cards as the writer computed them, checked the same
    /// way.
    #[serde(default)]
    pub macs: Option<Vec<String>>,
}

/// A node's `display`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum DisplaySpec {
    /// `true` for the default mode, `false` for none.
    On(bool),
    /// A mode.
    Mode {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
}

impl DisplaySpec {
    /// The GPU mode asked for, if any.
    pub fn mode(self) -> Option<GpuConfig> {
        match self {
            DisplaySpec::On(false) => None,
            DisplaySpec::On(true) => Some(GpuConfig::default()),
            DisplaySpec::Mode { width, height } => Some(GpuConfig { width, height }),
        }
    }
}

fn default_cpus() -> u32 {
    1
}
fn default_memory() -> u32 {
    1024
}
fn default_connect_timeout() -> u64 {
    600
}
fn default_vlans() -> Vec<i64> {
    vec![1]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: String,
    nodes: BTreeMap<String, Node>,
    script: Option<String>,
    script_file: Option<String>,
    global_timeout: Option<u64>,
}

/// A validated test description with resolved paths.
#[derive(Debug, Clone)]
pub struct Description {
    pub name: String,
    /// Nodes by name, in name order (node numbers follow this order).
    pub nodes: BTreeMap<String, ResolvedNode>,
    /// Every VLAN some node is on, ascending: one switch each.
    pub vlans: BTreeSet<u8>,
    pub script: String,
    /// The file name tracebacks show for the script.
    pub script_name: String,
    /// Seconds; the whole run is stopped after this.
    pub global_timeout: u64,
}

/// A node with its paths resolved and checked.
#[derive(Debug, Clone)]
pub struct ResolvedNode {
    pub name: String,
    /// The name the script sees (`-` and `.` become `_`).
    pub python_name: String,
    /// How skiff-vmm boots it; the driver adds the serial port, console,
    /// QMP socket and name of each run, and the network cards' sockets
    /// ([`ResolvedNode::with_network`]). The command line has the network
    /// parameters already.
    pub vm: VmConfig,
    /// Its number in the test (from 1, in name order).
    pub number: u8,
    /// Its network cards, in order.
    pub nics: Vec<Nic>,
    /// More `skiff-vmm` flags, passed after the config's.
    pub extra_args: Vec<String>,
    pub connect_timeout: u64,
}

const PYTHON_KEYWORDS: &[&str] = &[
    "False", "None", "True", "and", "as", "assert", "async", "await", "break", "class", "continue",
    "def", "del", "elif", "else", "except", "finally", "for", "from", "global", "if", "import",
    "in", "is", "lambda", "nonlocal", "not", "or", "pass", "raise", "return", "try", "while",
    "with", "yield",
];

/// The name a node gets in the script, as the NixOS driver makes it: `-`
/// and `.` become `_`. Anything that cannot become an identifier is an
/// error.
pub fn pythonize(name: &str) -> Result<String, String> {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok {
        return Err(format!(
            "node name {name:?} is not a Python identifier: it must start with a letter or '_'"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "node name {name:?} is not a Python identifier: {bad:?} is not allowed (letters, digits, '_', '-' and '.' are)"
        ));
    }
    let py: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if PYTHON_KEYWORDS.contains(&py.as_str()) {
        return Err(format!(
            "node name {name:?} is a Python keyword and cannot name a machine"
        ));
    }
    Ok(py)
}

fn expand_vars(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated ${{ in {s:?}"))?;
        let var = &after[..end];
        let val = std::env::var(var)
            .map_err(|_| format!("{s:?} uses ${{{var}}}, but {var} is not set"))?;
        out.push_str(&val);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl Description {
    /// Reads and checks a description; `script_override` replaces its
    /// script.
    pub fn load(path: &Path, script_override: Option<&Path>) -> Result<Self, DescriptionError> {
        let text = std::fs::read_to_string(path).map_err(|source| DescriptionError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse_err = |message: String| DescriptionError::Parse {
            path: path.to_owned(),
            message,
        };
        let raw: Raw = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => toml::from_str(&text).map_err(|e| parse_err(e.to_string()))?,
            _ => serde_json::from_str(&text).map_err(|e| parse_err(e.to_string()))?,
        };
        Self::resolve(path, raw, script_override)
    }

    fn resolve(
        path: &Path,
        raw: Raw,
        script_override: Option<&Path>,
    ) -> Result<Self, DescriptionError> {
        let invalid = |message: String| DescriptionError::Invalid {
            path: path.to_owned(),
            message,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve_path = |p: &str| -> Result<PathBuf, String> {
            let p = PathBuf::from(expand_vars(p)?);
            Ok(if p.is_absolute() { p } else { base.join(p) })
        };
        if raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(format!(
                "test name {:?} must be non-empty and use only letters, digits, '-', '_' and '.'",
                raw.name
            )));
        }
        if raw.nodes.is_empty() {
            return Err(invalid(
                "a test needs at least one node in \"nodes\"".into(),
            ));
        }
        let network_err = |source| DescriptionError::Network {
            path: path.to_owned(),
            source,
        };
        let plan = Plan::new(
            raw.nodes
                .iter()
                .map(|(name, n)| (name.as_str(), n.vlans.as_slice())),
        )
        .map_err(network_err)?;
        let mut nodes = BTreeMap::new();
        let mut python_names = BTreeMap::new();
        for (name, n) in raw.nodes {
            let ctx = |m: String| invalid(format!("node {name:?}: {m}"));
            let python_name = pythonize(&name).map_err(&invalid)?;
            if let Some(other) = python_names.insert(python_name.clone(), name.clone()) {
                return Err(invalid(format!(
                    "nodes {other:?} and {name:?} both become {python_name:?} in the script"
                )));
            }
            let kernel = n
                .kernel
                .as_deref()
                .ok_or_else(|| ctx("missing \"kernel\"".into()))?;
            let kernel = resolve_path(kernel).map_err(ctx)?;
            if !kernel.is_file() {
                return Err(ctx(format!("kernel {} does not exist", kernel.display())));
            }
            let initrd = match &n.initrd {
                Some(i) => {
                    let p = resolve_path(i).map_err(ctx)?;
                    if !p.is_file() {
                        return Err(ctx(format!("initrd {} does not exist", p.display())));
                    }
                    Some(p)
                }
                None => None,
            };
            let mut disks = Vec::new();
            for d in &n.disks {
                let path = resolve_path(&d.path.to_string_lossy()).map_err(ctx)?;
                if !path.is_file() {
                    return Err(ctx(format!("disk {} does not exist", path.display())));
                }
                d.validate()
                    .map_err(|e| ctx(format!("disk {}: {e}", path.display())))?;
                disks.push(BlockConfig { path, ..d.clone() });
            }
            let cpus = u8::try_from(n.cpus)
                .ok()
                .filter(|c| (1..=MAX_CPUS).contains(c))
                .ok_or_else(|| ctx(format!("cpus {}: must be 1 to {MAX_CPUS}", n.cpus)))?;
            let memory = u64::from(n.memory);
            if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory) {
                return Err(ctx(format!(
                    "memory {memory}: must be {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} (MiB)"
                )));
            }
            let gpu = n.display.and_then(DisplaySpec::mode);
            if let Some(mode) = gpu {
                mode.check().map_err(|e| ctx(format!("display: {e}")))?;
            }
            // With a screen, kernel messages also go to the VT; /dev/console
            // (the last console) stays the serial line the log reads.
            let consoles = if gpu.is_some() {
                "console=tty0 console=ttyS0"
            } else {
                "console=ttyS0"
            };
            let cmdline = if n
                .cmdline
                .split_whitespace()
                .any(|w| w.starts_with("console="))
            {
                n.cmdline.clone()
            } else {
                format!("{consoles} {}", n.cmdline).trim_end().to_owned()
            };
            let cmdline = plan.node_cmdline(&name, &cmdline).map_err(network_err)?;
            let net = &plan.nodes[&name];
            if let Some(number) = n.number {
                if number != u32::from(net.number) {
                    return Err(ctx(format!(
                        "\"number\" is {number}, but the node is number {} (nodes are numbered from 1 in name order)",
                        net.number
                    )));
                }
            }
            if let Some(macs) = &n.macs {
                let ours: Vec<String> = net.nics.iter().map(|c| c.mac().to_string()).collect();
                let theirs: Vec<String> = macs.iter().map(|m| m.to_ascii_lowercase()).collect();
                if theirs != ours {
                    return Err(ctx(format!(
                        "\"macs\" is {macs:?}, but its cards have {ours:?} (52:54:00:12:<vlan>:<node>, one per VLAN in order)"
                    )));
                }
            }
            nodes.insert(
                name.clone(),
                ResolvedNode {
                    name: name.clone(),
                    python_name,
                    vm: VmConfig {
                        initrd,
                        cmdline,
                        cpus,
                        memory_mib: memory,
                        disks,
                        rng: true,
                        gpu,
                        inputs: if gpu.is_some() {
                            vec![InputKind::Keyboard, InputKind::Tablet]
                        } else {
                            Vec::new()
                        },
                        ..VmConfig::new(kernel)
                    },
                    number: net.number,
                    nics: net.nics.clone(),
                    extra_args: n.extra_args,
                    connect_timeout: n.connect_timeout,
                },
            );
        }
        let (script, script_name) = match (script_override, &raw.script, &raw.script_file) {
            (Some(p), _, _) => read_script(p).map_err(&invalid)?,
            (None, Some(_), Some(_)) => {
                return Err(invalid(
                    "give either \"script\" or \"script_file\", not both".into(),
                ))
            }
            (None, Some(s), None) => (s.clone(), format!("<{}:script>", path.display())),
            (None, None, Some(f)) => {
                read_script(&resolve_path(f).map_err(&invalid)?).map_err(&invalid)?
            }
            (None, None, None) => {
                return Err(invalid(
                    "no test script: add \"script\" or \"script_file\", or pass --script".into(),
                ))
            }
        };
        Ok(Description {
            name: raw.name,
            nodes,
            vlans: plan.vlans(),
            script,
            script_name,
            global_timeout: raw.global_timeout.unwrap_or(3600),
        })
    }

    /// Guest memory of all nodes, MiB.
    pub fn memory_mib(&self) -> u64 {
        self.nodes.values().map(|n| n.vm.memory_mib).sum()
    }
}

impl ResolvedNode {
    /// The node with its network cards on the switches in `state_dir`.
    pub fn with_network(&self, state_dir: &Path) -> ResolvedNode {
        let mut node = self.clone();
        node.vm.nets = self.nics.iter().map(|c| c.net_config(state_dir)).collect();
        node
    }
}

fn read_script(p: &Path) -> Result<(String, String), String> {
    std::fs::read_to_string(p)
        .map(|s| (s, p.display().to_string()))
        .map_err(|e| format!("cannot read test script {}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmp(label: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("skiff-desc-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("kernel"), b"k").unwrap();
        d
    }

    fn err(dir: &Path, text: &str) -> String {
        let p = write(dir, "t.json", text);
        Description::load(&p, None).unwrap_err().to_string()
    }

    #[test]
    fn json_and_toml_load_with_defaults() {
        let d = tmp("ok");
        let p = write(
            &d,
            "t.json",
            r#"{"name":"a","nodes":{"web-1":{"kernel":"kernel","cmdline":"quiet"}},"script":"pass"}"#,
        );
        let desc = Description::load(&p, None).unwrap();
        let n = &desc.nodes["web-1"];
        assert_eq!(n.python_name, "web_1");
        assert_eq!(n.vm.memory_mib, 1024);
        assert_eq!(
            n.vm.cmdline,
            "console=ttyS0 quiet skiff.hostname=web-1 \
             skiff.ip=52:54:00:12:01:01,192.168.1.1/24,2001:db8:1::1/64 skiff.hosts=web-1@1.1"
        );
        assert_eq!(n.vm.kernel, d.join("kernel"));
        assert!(n.vm.rng);
        // One card on VLAN 1 by default; its socket is filled in per run.
        assert_eq!(n.number, 1);
        assert_eq!(n.nics.len(), 1);
        assert!(n.vm.nets.is_empty());
        assert_eq!(desc.vlans, BTreeSet::from([1]));
        let p = write(
            &d,
            "t.toml",
            "name = \"b\"\nscript = \"pass\"\n[nodes.m]\nkernel = \"kernel\"\ncmdline = \"console=hvc0\"\n",
        );
        let desc = Description::load(&p, None).unwrap();
        assert!(desc.nodes["m"]
            .vm
            .cmdline
            .starts_with("console=hvc0 skiff.hostname=m skiff.ip="));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn numbers_and_macs_from_the_writer_must_match() {
        let d = tmp("numbers");
        let ok = r#"{"name":"a","script":"pass","nodes":{
            "b":{"kernel":"kernel","vlans":[2,1],"number":2,"macs":["52:54:00:12:02:02","52:54:00:12:01:02"]},
            "a":{"kernel":"kernel","vlans":[],"number":1,"macs":[]}}}"#;
        let p = write(&d, "t.json", ok);
        assert!(Description::load(&p, None).is_ok());
        let e = err(
            &d,
            r#"{"name":"a","script":"pass","nodes":{"b":{"kernel":"kernel","number":1},"a":{"kernel":"kernel"}}}"#,
        );
        assert!(
            e.contains("node \"b\": \"number\" is 1, but the node is number 2"),
            "{e}"
        );
        let e = err(
            &d,
            r#"{"name":"a","script":"pass","nodes":{"a":{"kernel":"kernel","number":2}}}"#,
        );
        assert!(
            e.contains("\"number\" is 2, but the node is number 1"),
            "{e}"
        );
        let e = err(
            &d,
            r#"{"name":"a","script":"pass","nodes":{"a":{"kernel":"kernel","vlans":[3],"macs":["52:54:00:12:03:02"]}}}"#,
        );
        assert!(
            e.contains(
                "\"macs\" is [\"52:54:00:12:03:02\"], but its cards have [\"52:54:00:12:03:01\"]"
            ),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn vlans_give_numbers_cards_and_command_lines() {
        let d = tmp("vlans");
        let p = write(
            &d,
            "t.json",
            r#"{"name":"a","script":"pass","nodes":{
                "server":{"kernel":"kernel","vlans":[2]},
                "router":{"kernel":"kernel","vlans":[2,1],"cmdline":"quiet"},
                "client":{"kernel":"kernel"},
                "loner":{"kernel":"kernel","vlans":[]}}}"#,
        );
        let desc = Description::load(&p, None).unwrap();
        assert_eq!(desc.vlans, BTreeSet::from([1, 2]));
        let router = &desc.nodes["router"];
        assert_eq!(router.number, 3);
        assert_eq!(
            router.vm.cmdline,
            "console=ttyS0 quiet skiff.hostname=router \
             skiff.ip=52:54:00:12:02:03,192.168.2.3/24,2001:db8:2::3/64 \
             skiff.ip=52:54:00:12:01:03,192.168.1.3/24,2001:db8:1::3/64 \
             skiff.hosts=client@1.1,router@2.3,server@2.4"
        );
        let loner = &desc.nodes["loner"];
        assert!(loner.nics.is_empty());
        assert!(loner
            .vm
            .cmdline
            .ends_with("skiff.hostname=loner skiff.hosts=client@1.1,router@2.3,server@2.4"));
        let run = router.with_network(Path::new("/state"));
        let args = run.vm.to_args();
        let nets: Vec<&String> = args.iter().filter(|a| a.starts_with("--net=")).collect();
        assert_eq!(
            nets,
            [
                "--net=stream=/state/vlan2/socket,mac=52:54:00:12:02:03,id=eth1",
                "--net=stream=/state/vlan1/socket,mac=52:54:00:12:01:03,id=eth2"
            ]
        );
        assert!(loner.with_network(Path::new("/state")).vm.nets.is_empty());
        // No node on a VLAN: no switch, no hosts.
        let p = write(
            &d,
            "t.json",
            r#"{"name":"a","script":"pass","nodes":{"m":{"kernel":"kernel","vlans":[]}}}"#,
        );
        let desc = Description::load(&p, None).unwrap();
        assert!(desc.vlans.is_empty());
        assert_eq!(desc.nodes["m"].vm.cmdline, "console=ttyS0 skiff.hostname=m");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_display_gives_a_gpu_a_keyboard_a_tablet_and_a_vt_console() {
        let d = tmp("display");
        let p = write(
            &d,
            "t.json",
            r#"{"name":"a","script":"pass","nodes":{
                "plain":{"kernel":"kernel","vlans":[]},
                "off":{"kernel":"kernel","vlans":[],"display":false},
                "screen":{"kernel":"kernel","vlans":[],"display":true},
                "wide":{"kernel":"kernel","vlans":[],"display":{"width":1280,"height":800}}}}"#,
        );
        let desc = Description::load(&p, None).unwrap();
        for name in ["plain", "off"] {
            let vm = &desc.nodes[name].vm;
            assert_eq!((vm.gpu, vm.inputs.len()), (None, 0), "{name}");
            assert!(vm.cmdline.starts_with("console=ttyS0 "), "{name}");
        }
        let vm = &desc.nodes["screen"].vm;
        assert_eq!(vm.gpu, Some(GpuConfig::default()));
        assert_eq!(vm.inputs, [InputKind::Keyboard, InputKind::Tablet]);
        assert!(vm.cmdline.starts_with("console=tty0 console=ttyS0 "));
        let args = vm.to_args();
        assert!(
            args.contains(&"--gpu=width=1024,height=768".to_owned()),
            "{args:?}"
        );
        assert_eq!(
            desc.nodes["wide"].vm.gpu,
            Some(GpuConfig {
                width: 1280,
                height: 800
            })
        );
        let p = write(
            &d,
            "t.json",
            r#"{"name":"a","script":"pass","nodes":{"m":{"kernel":"kernel","display":{"width":10,"height":10}}}}"#,
        );
        let e = Description::load(&p, None).unwrap_err().to_string();
        assert!(
            e.contains("node \"m\": display: display mode 10x10 is outside"),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_vlans_and_long_command_lines_are_refused_naming_the_node() {
        let d = tmp("bad-vlans");
        for (vlans, text) in [
            (
                "[0]",
                "node \"web\": VLAN 0 is out of range (VLAN numbers are 1 to 255)",
            ),
            ("[256]", "node \"web\": VLAN 256 is out of range"),
            ("[-3]", "node \"web\": VLAN -3 is out of range"),
            ("[1,2,1]", "node \"web\": VLAN 1 is listed twice"),
        ] {
            let e = err(
                &d,
                &format!(
                    r#"{{"name":"a","script":"","nodes":{{"web":{{"kernel":"kernel","vlans":{vlans}}}}}}}"#
                ),
            );
            assert!(e.contains(text), "{vlans}: {e}");
        }
        let nodes: Vec<String> = (0..255)
            .map(|i| format!(r#""n{i}":{{"kernel":"kernel","vlans":[]}}"#))
            .collect();
        let e = err(
            &d,
            &format!(
                r#"{{"name":"a","script":"","nodes":{{{}}}}}"#,
                nodes.join(",")
            ),
        );
        assert!(e.contains("the test has 255 nodes, more than 254"), "{e}");
        let long = "x".repeat(2000);
        let e = err(
            &d,
            &format!(
                r#"{{"name":"a","script":"","nodes":{{"web":{{"kernel":"kernel","cmdline":"{long}"}}}}}}"#
            ),
        );
        assert!(
            e.contains("node \"web\": its kernel command line would be")
                && e.contains("1 node(s)")
                && e.contains("Linux on x86 keeps only 2047 bytes"),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_descriptions_say_what_is_wrong() {
        let d = tmp("bad");
        assert!(
            err(&d, r#"{"name":"a","nodes":{"m":{}},"script":""}"#).contains("missing \"kernel\"")
        );
        assert!(err(
            &d,
            r#"{"name":"a","nodes":{"m":{"kernel":"nope"}},"script":""}"#
        )
        .contains("does not exist"));
        let e = err(
            &d,
            r#"{"name":"a","nodes":{"m":{"kernel":"kernel","colour":1}},"script":""}"#,
        );
        assert!(e.contains("unknown field `colour`"), "{e}");
        assert!(err(
            &d,
            r#"{"name":"a","nodes":{"1m":{"kernel":"kernel"}},"script":""}"#
        )
        .contains("not a Python identifier"));
        assert!(err(
            &d,
            r#"{"name":"a","nodes":{"class":{"kernel":"kernel"}},"script":""}"#
        )
        .contains("Python keyword"));
        assert!(err(
            &d,
            r#"{"name":"a","nodes":{"a-b":{"kernel":"kernel"},"a_b":{"kernel":"kernel"}},"script":""}"#
        )
        .contains("both become"));
        assert!(
            err(&d, r#"{"name":"a","nodes":{"m":{"kernel":"kernel"}}}"#).contains("no test script")
        );
        assert!(err(
            &d,
            r#"{"name":"a","nodes":{"m":{"kernel":"${SKIFF_SURELY_UNSET_VAR}/k"}},"script":""}"#
        )
        .contains("SKIFF_SURELY_UNSET_VAR is not set"));
        std::fs::write(d.join("disk.img"), b"").unwrap();
        let e = err(
            &d,
            r#"{"name":"a","nodes":{"m":{"kernel":"kernel","disks":[{"path":"disk.img","readonly":true,"overlay":true}]}},"script":""}"#,
        );
        assert!(e.contains("readonly=on and overlay=on"), "{e}");
        let e = err(
            &d,
            r#"{"name":"a","nodes":{"m":{"kernel":"kernel","disks":[{"path":"disk.img","size":3}]}},"script":""}"#,
        );
        assert!(e.contains("unknown field `size`"), "{e}");
        let e = err(
            &d,
            r#"{"name":"a","nodes":{"m":{"kernel":"kernel","cpus":300}},"script":""}"#,
        );
        assert!(e.contains("cpus 300"), "{e}");
        let e = err(
            &d,
            r#"{"name":"a","nodes":{"m":{"kernel":"kernel","memory":16}},"script":""}"#,
        );
        assert!(e.contains("memory 16"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
