//! Test descriptions: which nodes a test has, how each boots, and its
//! script. JSON (what the Nix side emits) or TOML (for hand-written tests).
//!
//! ```json
//! { "name": "simple",
//!   "nodes": { "machine": { "kernel": "${SKIFF_GUEST}/vmlinuz-microvm",
//!                           "initrd": "${SKIFF_GUEST}/initrd.cpio.gz",
//!                           "cmdline": "root=/dev/vda rw", "memory": 1024,
//!                           "disks": [ { "path": "${SKIFF_GUEST}/rootfs.ext4", "overlay": true } ] } },
//!   "script_file": "simple.py" }
//! ```
//!
//! Relative paths are taken from the description's directory; `${VAR}` in a
//! path is replaced by the environment variable (an unset one is an error).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use skiff_vmm::config::{BlockConfig, MAX_CPUS};
use skiff_vmm::memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use skiff_vmm::VmConfig;
use thiserror::Error;

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
    /// VLAN numbers the node is on.
    #[serde(default)]
    pub vlans: Vec<u32>,
    /// More `skiff-vmm` flags, passed as they are.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Seconds to wait for the backdoor banner before giving up.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: u64,
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
    /// QMP socket and name of each run.
    pub vm: VmConfig,
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
            if !n.vlans.is_empty() {
                return Err(ctx(format!(
                    "vlans {:?}: VLANs need virtio-net, which skiff-vmm does not have yet",
                    n.vlans
                )));
            }
            let cmdline = if n
                .cmdline
                .split_whitespace()
                .any(|w| w.starts_with("console="))
            {
                n.cmdline.clone()
            } else {
                format!("console=ttyS0 {}", n.cmdline).trim_end().to_owned()
            };
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
                        ..VmConfig::new(kernel)
                    },
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
        assert_eq!(n.vm.cmdline, "console=ttyS0 quiet");
        assert_eq!(n.vm.kernel, d.join("kernel"));
        assert!(n.vm.rng);
        let p = write(
            &d,
            "t.toml",
            "name = \"b\"\nscript = \"pass\"\n[nodes.m]\nkernel = \"kernel\"\ncmdline = \"console=hvc0\"\n",
        );
        let desc = Description::load(&p, None).unwrap();
        assert_eq!(desc.nodes["m"].vm.cmdline, "console=hvc0");
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
