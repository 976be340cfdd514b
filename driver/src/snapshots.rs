//! The snapshot cache: a node boots once per configuration; every later
//! start of a node with that configuration restores the snapshot taken
//! when its backdoor shell first answered (`skiff-vmm --incoming`).
//!
//! A snapshot lives in `<cache>/<key>/` (the directory `migrate file:`
//! writes, plus `meta.json`). The key is a hash of everything that
//! determines the guest's state at that point:
//! - the node's skiff-vmm configuration: kernel and initrd, command line
//!   (which carries the hostname and addresses), memory, vCPUs, disks,
//!   network cards (MAC and id; not the socket, which is per run), rng,
//!   extra flags;
//! - files by path, size and modification time (hashing a root image's
//!   contents on every start would cost more than the restore saves);
//! - the skiff-vmm binary (its contents: another build may save another
//!   format), this driver's version, the host CPU and kernel release.
//!
//! A node with a writable disk that is not an overlay is never cached:
//! its image changes after the snapshot, which restoring would corrupt.
//!
//! Writers build a snapshot in a hidden staging directory and rename it
//! into place, so readers never see half of one and two writers of one
//! key simply race (the loser's copy is dropped). The memory file of a
//! snapshot that is pruned while a VM maps it stays readable to that VM
//! (unlinked files live on while mapped).

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use skiff_vmm::snapshot::{HostCpu, FORMAT_VERSION, STATE_FILE};

use crate::description::ResolvedNode;

/// The cache size `prune` keeps to when not told otherwise, and that a
/// run keeps to after it adds a snapshot.
pub const DEFAULT_MAX_BYTES: u64 = 8 << 30;
const META_FILE: &str = "meta.json";
const STAGING_PREFIX: &str = ".staging-";

/// What a snapshot directory says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// The node it was taken of.
    pub node: String,
    /// Seconds since the epoch.
    pub created: u64,
}

/// One cached snapshot, for `skiff snapshot list`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub path: PathBuf,
    pub node: String,
    /// Bytes on disk (the memory file is sparse).
    pub bytes: u64,
    /// When it was last restored or written.
    pub used: SystemTime,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Cache {
    /// `$SKIFF_SNAPSHOTS`, else `$SKIFF_CACHE/snapshots`, else
    /// `~/.cache/skiff/snapshots`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("SKIFF_SNAPSHOTS") {
            return PathBuf::from(d);
        }
        let cache = std::env::var_os("SKIFF_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                    .join(".cache/skiff")
            });
        cache.join("snapshots")
    }

    pub fn new(dir: PathBuf) -> Cache {
        Cache { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The snapshot for `key`, if there is a whole one; marks it used.
    pub fn lookup(&self, key: &str) -> Option<PathBuf> {
        let dir = self.dir.join(key);
        if !dir.join(STATE_FILE).is_file() {
            return None;
        }
        // Its modification time is its last use, for pruning.
        let _ = filetime_now(&dir);
        Some(dir)
    }

    /// A fresh staging directory for a snapshot of `key`.
    pub fn staging(&self, key: &str) -> Result<PathBuf, String> {
        let dir = self
            .dir
            .join(format!("{STAGING_PREFIX}{key}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// Moves a finished staging directory into place as `key`, with its
    /// metadata; drops it when another writer got there first.
    pub fn commit(&self, staging: &Path, key: &str, node: &str) -> Result<PathBuf, String> {
        let meta = Meta {
            node: node.to_owned(),
            created: now_secs(),
        };
        let text = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
        fs::write(staging.join(META_FILE), text)
            .map_err(|e| format!("cannot write {}: {e}", staging.join(META_FILE).display()))?;
        let target = self.dir.join(key);
        match fs::rename(staging, &target) {
            Ok(()) => Ok(target),
            Err(_) if target.join(STATE_FILE).is_file() => {
                let _ = fs::remove_dir_all(staging);
                Ok(target)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(staging);
                Err(format!(
                    "cannot move the snapshot to {}: {e}",
                    target.display()
                ))
            }
        }
    }

    /// Every whole snapshot, least recently used first.
    pub fn list(&self) -> Vec<Entry> {
        let Ok(read) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<Entry> = read
            .filter_map(Result::ok)
            .filter_map(|e| {
                let key = e.file_name().to_string_lossy().into_owned();
                let path = e.path();
                if key.starts_with('.') || !path.join(STATE_FILE).is_file() {
                    return None;
                }
                let meta: Option<Meta> = fs::read(path.join(META_FILE))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                let used = fs::metadata(&path).and_then(|m| m.modified()).ok()?;
                Some(Entry {
                    bytes: disk_usage(&path),
                    node: meta.map_or_else(|| "?".into(), |m| m.node),
                    key,
                    path,
                    used,
                })
            })
            .collect();
        out.sort_by_key(|e| e.used);
        out
    }

    /// Removes the least recently used snapshots until the rest take at
    /// most `max_bytes`, and staging directories of writers that are gone;
    /// returns what was removed.
    pub fn prune(&self, max_bytes: u64) -> Vec<Entry> {
        if let Ok(read) = fs::read_dir(&self.dir) {
            for e in read.filter_map(Result::ok) {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix(STAGING_PREFIX) else {
                    continue;
                };
                let pid = rest.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
                // SAFETY: kill with signal 0 only checks that the process
                // exists; it sends nothing.
                let alive = pid.is_some_and(|p| unsafe { libc::kill(p, 0) } == 0);
                if !alive {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let mut entries = self.list();
        let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
        let mut removed = Vec::new();
        while total > max_bytes && !entries.is_empty() {
            let e = entries.remove(0);
            if fs::remove_dir_all(&e.path).is_ok() {
                total = total.saturating_sub(e.bytes);
                removed.push(e);
            }
        }
        removed
    }
}

/// Sets a directory's modification time to now.
fn filetime_now(dir: &Path) -> std::io::Result<()> {
    let f = fs::File::open(dir)?;
    f.set_modified(SystemTime::now())
}

/// Bytes a directory's files take on disk.
fn disk_usage(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|r| {
            r.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// A file as the key sees it: path, size and modification time.
fn file_id(path: &Path) -> Result<String, String> {
    let m = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(format!(
        "{} {} {}.{}",
        path.display(),
        m.len(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

/// The SHA-256 of the skiff-vmm binary, once per process.
fn vmm_digest(vmm: &Path) -> Result<String, String> {
    static DIGEST: OnceLock<Result<String, String>> = OnceLock::new();
    DIGEST.get_or_init(|| file_sha256(vmm)).clone()
}

fn file_sha256(vmm: &Path) -> Result<String, String> {
    let mut f = fs::File::open(vmm).map_err(|e| format!("{}: {e}", vmm.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", vmm.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// When the driver saves a node (part of the key: snapshots taken at
/// another point are other snapshots).
pub const SNAPSHOT_POINT: &str = "once the backdoor answers and, under systemd, the boot is over";

/// Why `node` cannot be snapshotted at all, if it cannot: a disk written
/// in place would not go back to the instant of the snapshot on restore.
pub fn cannot_snapshot(node: &ResolvedNode) -> Option<String> {
    node.vm
        .disks
        .iter()
        .find(|d| !d.readonly && !d.overlay)
        .map(|d| {
            format!(
                "disk {} is writable without overlay=on: its image changes after a snapshot",
                d.path.display()
            )
        })
}

/// The cache key of `node` started by `vmm`, or why it cannot be cached.
pub fn key(node: &ResolvedNode, vmm: &Path) -> Result<String, String> {
    let vm = &node.vm;
    if let Some(why) = cannot_snapshot(node) {
        return Err(why);
    }
    if node.extra_args.iter().any(|a| a.starts_with("--incoming")) {
        return Err("its extra_args restore a snapshot of their own".into());
    }
    let cpu = HostCpu::current();
    let mut lines = vec![
        format!(
            "skiff {} state format {FORMAT_VERSION}",
            env!("CARGO_PKG_VERSION")
        ),
        // Where in the guest's life the snapshot is taken.
        format!("taken {SNAPSHOT_POINT}"),
        format!("skiff-vmm {}", vmm_digest(vmm)?),
        format!(
            "host {} {:#x} {}",
            cpu.vendor,
            cpu.signature,
            kernel_release()
        ),
        format!("kernel {}", file_id(&vm.kernel)?),
        format!(
            "initrd {}",
            match &vm.initrd {
                Some(p) => file_id(p)?,
                None => "none".into(),
            }
        ),
        format!("cmdline {}", vm.cmdline),
        format!("cpus {} memory {}", vm.cpus, vm.memory_mib),
        format!("rng {} virtio-cmdline {}", vm.rng, vm.virtio_cmdline),
    ];
    for d in &vm.disks {
        lines.push(format!(
            "disk {} readonly={} overlay={} id={:?}",
            file_id(&d.path)?,
            d.readonly,
            d.overlay,
            d.id
        ));
    }
    for n in &vm.nets {
        lines.push(format!("net {} {:?}", n.mac, n.id));
    }
    for a in &node.extra_args {
        lines.push(format!("arg {a}"));
    }
    let digest = Sha256::digest(lines.join("\n").as_bytes());
    Ok(hex(&digest[..12]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn commit_list_lookup_and_prune() {
        let tmp = TempDir::new().unwrap();
        let cache = Cache::new(tmp.as_path().join("snapshots"));
        assert!(cache.list().is_empty());
        assert_eq!(cache.lookup("k1"), None);
        for (key, size) in [("k1", 4096usize), ("k2", 8192)] {
            let staging = cache.staging(key).unwrap();
            fs::write(staging.join(STATE_FILE), vec![1u8; size]).unwrap();
            let dir = cache.commit(&staging, key, "machine").unwrap();
            assert_eq!(dir, cache.dir().join(key));
            assert!(!staging.exists());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // A second writer of k1 loses the race quietly.
        let staging = cache.staging("k1").unwrap();
        fs::write(staging.join(STATE_FILE), b"x").unwrap();
        cache.commit(&staging, "k1", "machine").unwrap();
        assert!(!staging.exists());
        let list = cache.list();
        assert_eq!(
            list.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
            ["k1", "k2"]
        );
        assert_eq!(list[0].node, "machine");
        // Using k1 makes k2 the least recently used.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(cache.lookup("k1").is_some());
        assert_eq!(cache.list()[0].key, "k2");
        // An abandoned staging directory (no such process) goes too.
        let stale = cache.dir().join(format!("{STAGING_PREFIX}k3-999999999"));
        fs::create_dir_all(&stale).unwrap();
        let keep = list.iter().find(|e| e.key == "k1").unwrap().bytes;
        let removed = cache.prune(keep);
        assert_eq!(
            removed.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
            ["k2"]
        );
        assert!(!stale.exists());
        assert!(cache.lookup("k1").is_some() && cache.lookup("k2").is_none());
        cache.prune(0);
        assert!(cache.list().is_empty());
    }
}
