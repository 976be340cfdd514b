//! One machine (node) of a test: its `skiff-vmm` process, serial console,
//! backdoor shell and QMP connection. The Python `Machine` class is built
//! on this.
//!
//! Names: a `Machine` is the test's node, which outlives any one VMM run;
//! "VM" means what a `skiff-vmm` process runs. A machine's state (pid,
//! generation, shell, QMP, console, the script's `booted = False`) lives
//! here and only here, behind one `Arc`, and every clone shares it: the
//! serial and wait threads, and Python's core object.
//!
//! Invariants: every (re)start bumps the generation; a shell or QMP
//! connection is used only with the generation it was opened for. A start
//! returns once QMP is negotiated, and after a guest reboot the wait thread
//! restarts the VMM and reconnects QMP itself. QMP events go to one queue
//! per machine, emptied at each start but kept across reboot restarts.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use skiff_vmm::config::{ConsoleBackend, SerialConfig};
use skiff_vmm::memory::RestoreMemory;
use skiff_vmm::{ExitStatus, VmConfig};
use thiserror::Error;

use crate::description::ResolvedNode;
use crate::qmp::{self, QmpError};
use crate::report::logger;
use crate::shell::{Shell, ShellError, Stop, Watcher, STDOUT_WARNING};
use crate::snapshots::{self, Cache};

/// How often a long wait says what it waits for.
const PROGRESS_EVERY: Duration = Duration::from_secs(15);

/// How long skiff-vmm may take to open its QMP socket and negotiate (it
/// creates the socket while it starts, which on a loaded host takes
/// seconds).
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(300);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Makes SIGTERM (and SIGINT, unless `keep_sigint`) stop every wait of the
/// driver with an error, so the run unwinds and cleans up.
pub fn catch_signals(keep_sigint: bool) -> std::io::Result<()> {
    let mut signals = vec![signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP];
    if !keep_sigint {
        signals.push(signal_hook::consts::SIGINT);
    }
    for s in signals {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            signal_hook::low_level::register(s, || INTERRUPTED.store(true, Ordering::SeqCst))?;
        }
    }
    Ok(())
}

/// Whether the driver was asked to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// A machine-level failure. Each variant is a kind a test script may want
/// to tell apart (the Python side raises one exception class per kind);
/// the texts are what the log shows.
#[derive(Debug, Error)]
pub enum MachineError {
    /// The host could not set the machine up: its state directory,
    /// sockets, log files or threads.
    #[error("{machine}: {message}")]
    Host { machine: String, message: String },
    /// skiff-vmm could not be started at all.
    #[error("{machine}: cannot start skiff-vmm ({vmm}): {source}")]
    Spawn {
        machine: String,
        vmm: PathBuf,
        source: std::io::Error,
    },
    /// The request needs a running VMM, or a connected shell, and there is
    /// none.
    #[error("{machine}: {what}")]
    NotRunning { machine: String, what: &'static str },
    /// skiff-vmm exited while the driver waited on it.
    #[error(
        "{machine}: skiff-vmm exited with status {status} ({}) while {doing}; last serial lines:\n{serial}",
        exit_meaning(*status)
    )]
    Exited {
        machine: String,
        status: i32,
        doing: String,
        serial: String,
    },
    /// The guest's backdoor shell did not come up in time.
    #[error(
        "{machine}: the guest root shell did not come up within {} s (no `Spawning backdoor root shell...` on hvc0; check backdoor.service); last serial lines:\n{serial}{vcpus}",
        timeout.as_secs()
    )]
    ConnectTimeout {
        machine: String,
        timeout: Duration,
        serial: String,
        /// What the vCPUs were doing ([`Machine::vcpu_report`]).
        vcpus: String,
    },
    /// The driver is being stopped.
    #[error("{machine}: {}", Stop::Interrupted)]
    Interrupted { machine: String },
    /// The backdoor shell failed while connecting.
    #[error("{machine}: {source}")]
    Shell { machine: String, source: ShellError },
    /// The backdoor shell failed while running `command`.
    #[error("{machine}: running `{command}`: {source}{vcpus}")]
    Command {
        machine: String,
        command: String,
        source: ShellError,
        /// What the vCPUs were doing when the command timed out
        /// ([`Machine::vcpu_report`]; empty otherwise).
        vcpus: String,
    },
    /// skiff-vmm exited before its QMP socket came up.
    #[error(
        "{machine}: skiff-vmm exited before its QMP socket {} came up (status {status}, {}); last serial lines:\n{serial}",
        socket.display(),
        exit_meaning(*status)
    )]
    ExitedBeforeQmp {
        machine: String,
        status: i32,
        socket: PathBuf,
        serial: String,
    },
    /// A QMP request failed: the connection, or the VMM's error reply.
    #[error("{machine}: {source}")]
    Qmp { machine: String, source: QmpError },
}

impl MachineError {
    /// Whether the driver being stopped caused this.
    pub fn is_interrupted(&self) -> bool {
        matches!(
            self,
            MachineError::Interrupted { .. }
                | MachineError::Shell {
                    source: ShellError::Stopped(Stop::Interrupted),
                    ..
                }
                | MachineError::Command {
                    source: ShellError::Stopped(Stop::Interrupted),
                    ..
                }
                | MachineError::Qmp {
                    source: QmpError::Stopped(Stop::Interrupted),
                    ..
                }
        )
    }
}

/// What `skiff-vmm`'s exit status means (its documented codes).
pub fn exit_meaning(code: i32) -> &'static str {
    match ExitStatus::from_code(code) {
        Some(status) => status.meaning(),
        None if code == 128 + libc::SIGKILL => "killed",
        None => "unexpected exit",
    }
}

#[derive(Default)]
struct Console {
    /// Lines not yet looked at by `wait_for_console_text`.
    queue: VecDeque<String>,
    /// Every line since the last start.
    all: Vec<String>,
}

#[derive(Default)]
struct ProcState {
    /// The running VMM's pid.
    pid: Option<i32>,
    /// Its stdin (serial input).
    stdin: Option<ChildStdin>,
    /// Exit status of the last VMM run, once it ended.
    exit: Option<i32>,
    /// Restart the VMM when the guest reboots.
    allow_reboot: bool,
    /// Bumped at every (re)start; a shell from an older run is stale.
    generation: u64,
    /// Set while the machine is being released: no more restarts.
    released: bool,
    /// The guest rebooted and a new VMM is being started.
    restarting: bool,
    /// The script set `booted = False`: [`Machine::booted`] says so until
    /// the next start or the VMM's exit.
    marked_down: bool,
}

/// How restored machines get their memory: `$SKIFF_RESTORE_MEMORY`
/// (`copy` or `map`, see skiff-vmm's `--incoming-memory`), else
/// [`DEFAULT_RESTORE_MEMORY`].
fn restore_memory() -> RestoreMemory {
    static HOW: OnceLock<RestoreMemory> = OnceLock::new();
    *HOW.get_or_init(|| match std::env::var("SKIFF_RESTORE_MEMORY") {
        Ok(v) => v.parse().unwrap_or_else(|e| {
            logger().log(
                None,
                &format!("SKIFF_RESTORE_MEMORY={e}; restoring with {DEFAULT_RESTORE_MEMORY}"),
            );
            DEFAULT_RESTORE_MEMORY
        }),
        Err(_) => DEFAULT_RESTORE_MEMORY,
    })
}

/// Mapped: a restore costs no copy, and tests running at once share the
/// snapshot's pages. (Measured under emulation, `copy` spent 20 s reading
/// 87 MiB into huge pages that each had to be zeroed first.)
const DEFAULT_RESTORE_MEMORY: RestoreMemory = RestoreMemory::Map;

/// How long a cache snapshot waits for a systemd boot to end.
const SETTLE_TIMEOUT_S: u64 = 300;

/// The boot console up to the snapshot, kept beside it.
const CONSOLE_FILE: &str = "console.log";

/// The machine's use of the snapshot cache (`snapshots.rs`).
#[derive(Default)]
struct Snapshots {
    /// The cache, unless snapshots are off (`--no-snapshot`).
    cache: Option<Cache>,
    /// This node's key, when it can be cached.
    key: Option<String>,
    /// The VMM generation that was restored, and from where: its guest
    /// shell is already up, so no banner comes.
    restored: Option<(u64, PathBuf)>,
    /// A named snapshot the next start restores (`restore_snapshot`).
    next: Option<PathBuf>,
}

/// A QMP connection and the VMM generation it belongs to.
struct QmpLink {
    client: Arc<qmp::Client>,
    generation: u64,
}

struct Inner {
    name: String,
    node: ResolvedNode,
    vmm: PathBuf,
    state_dir: PathBuf,
    out_dir: PathBuf,
    listener: Mutex<Option<UnixListener>>,
    proc: Mutex<ProcState>,
    exited: Condvar,
    console: Mutex<Console>,
    /// Connected shell and the VMM generation it belongs to.
    shell: Mutex<Option<(Shell, u64)>>,
    /// The QMP connection; held only briefly.
    qmp: Mutex<Option<QmpLink>>,
    /// Held while a QMP connection is set up, so that one is at a time.
    qmp_connecting: Mutex<()>,
    /// The QMP events since the last start, from every connection.
    events: Arc<qmp::Events>,
    snapshots: Mutex<Snapshots>,
}

/// A machine of the test; cheap to clone (shared state).
#[derive(Clone)]
pub struct Machine(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Children are spawned from one long-lived thread: PR_SET_PDEATHSIG fires
/// when the spawning *thread* ends, and script threads may be short-lived.
fn spawn(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the spawner thread");
        Mutex::new(tx)
    });
    let (rtx, rrx) = mpsc::channel();
    lock(tx)
        .send((cmd, rtx))
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
    rrx.recv()
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?
}

impl Machine {
    /// A machine for `node`; its state lives in `state_dir/vm-state-<name>`.
    pub fn new(node: ResolvedNode, vmm: PathBuf, state_root: &Path, out_dir: &Path) -> Self {
        // Logs of an earlier run in the same output directory go.
        for log in ["serial.log", "vmm.log"] {
            let _ = std::fs::remove_file(out_dir.join(format!("{}.{log}", node.name)));
        }
        Machine(Arc::new(Inner {
            name: node.name.clone(),
            state_dir: state_root.join(format!("vm-state-{}", node.name)),
            node,
            vmm,
            out_dir: out_dir.to_owned(),
            listener: Mutex::new(None),
            proc: Mutex::new(ProcState::default()),
            exited: Condvar::new(),
            console: Mutex::new(Console::default()),
            shell: Mutex::new(None),
            qmp: Mutex::new(None),
            qmp_connecting: Mutex::new(()),
            events: qmp::Events::new(),
            snapshots: Mutex::new(Snapshots::default()),
        }))
    }

    /// Has every start of this machine restore its snapshot from `cache`
    /// when there is one, and take one on a cold boot otherwise (when the
    /// node can be cached at all: see [`snapshots::key`]).
    pub fn use_snapshots(&self, cache: Cache) {
        let key = match snapshots::key(&self.0.node, &self.0.vmm) {
            Ok(key) => Some(key),
            Err(why) => {
                logger().log(Some(&self.0.name), &format!("no snapshot: {why}"));
                None
            }
        };
        *lock(&self.0.snapshots) = Snapshots {
            cache: Some(cache),
            key,
            ..Snapshots::default()
        };
    }

    /// The snapshot to restore at the next start, if any: a named one
    /// the script asked for, else the cache's.
    fn snapshot_to_restore(&self) -> Option<PathBuf> {
        let mut s = lock(&self.0.snapshots);
        if let Some(dir) = s.next.take() {
            return Some(dir);
        }
        s.cache.as_ref()?.lookup(s.key.as_ref()?)
    }

    /// Where the script's snapshot `name` lives (the machine's state
    /// directory), once the name is checked.
    fn named_snapshot(&self, name: &str) -> Result<PathBuf, MachineError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(self.fail(format!(
                "snapshot name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.', \
                 not starting with '.'"
            )));
        }
        Ok(self.0.state_dir.join("snapshots").join(name))
    }

    /// `machine.snapshot(name)`: saves the running machine as `name`
    /// (replacing an earlier one of that name) and lets it run on. The
    /// guest shell is connected first, so that a restore finds it waiting
    /// for a command, as this save leaves it. Returns the seconds taken.
    pub fn save_snapshot(&self, name: &str) -> Result<f64, MachineError> {
        let dir = self.named_snapshot(name)?;
        if let Some(why) = snapshots::cannot_snapshot(&self.0.node) {
            return Err(self.fail(format!("cannot take snapshot {name:?}: {why}")));
        }
        if !self.running() {
            return Err(self.not_running("snapshot() needs a running machine"));
        }
        self.connect(None)?;
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| self.fail(format!("cannot create {}: {e}", dir.display())))?;
        if let Err(e) = self.migrate_to(&dir) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.qmp("cont", None, Duration::from_secs(60))?;
        let secs = started.elapsed().as_secs_f64();
        logger().log(
            Some(&self.0.name),
            &format!("snapshot {name:?} taken in {secs:.2} seconds"),
        );
        Ok(secs)
    }

    /// Saves the VM into `dir` with QMP `migrate file:DIR`; the VM is left
    /// stopped (a failed migration resumes it by itself).
    fn migrate_to(&self, dir: &Path) -> Result<(), MachineError> {
        let mut args = qmp::Object::new();
        args.insert("uri".into(), format!("file:{}", dir.display()).into());
        self.qmp("migrate", Some(args), Duration::from_secs(600))
            .map(drop)
    }

    /// `machine.restore(name)`: ends the running VMM (as a crash would)
    /// and starts one restored from snapshot `name`: memory, devices and
    /// overlay disks as they were at the save; the guest's clock is then
    /// set to the host's. Returns once the restored guest's shell answers.
    pub fn restore_snapshot(&self, name: &str) -> Result<f64, MachineError> {
        let dir = self.named_snapshot(name)?;
        if !dir.join("state").is_file() {
            return Err(self.fail(format!(
                "there is no snapshot named {name:?}: machine.snapshot({name:?}) takes one"
            )));
        }
        let started = Instant::now();
        if self.running() {
            self.release();
        }
        let allow_reboot = lock(&self.0.proc).allow_reboot;
        lock(&self.0.snapshots).next = Some(dir);
        let restarted = self.start(allow_reboot);
        // A failed start must not leave the named snapshot for a later one.
        lock(&self.0.snapshots).next = None;
        restarted?;
        self.connect(None)?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// The snapshot this run of the VMM was restored from, once: only
    /// the first console connection of a restored VMM comes without a
    /// banner. Any later one (the guest rebooted, or a VMM that is going
    /// away reconnected) must bring a banner as usual.
    fn claim_restored(&self) -> Option<PathBuf> {
        let generation = lock(&self.0.proc).generation;
        let mut s = lock(&self.0.snapshots);
        match &s.restored {
            Some((g, _)) if *g == generation => s.restored.take().map(|(_, dir)| dir),
            _ => None,
        }
    }

    /// After a cold boot's banner: saves the guest as it stands (QMP
    /// `migrate` to a staging directory, then `cont`) into the cache,
    /// unless the cache has it already or the node cannot be cached. A
    /// failure is logged and the test goes on.
    fn take_snapshot(&self) {
        let (cache, key) = {
            let s = lock(&self.0.snapshots);
            match (&s.cache, &s.key) {
                (Some(c), Some(k)) if c.lookup(k).is_none() => (c.clone(), k.clone()),
                _ => return,
            }
        };
        let name = self.0.name.clone();
        if let Err(why) = self.settle_boot() {
            logger().log(Some(&name), &format!("no snapshot: {why}"));
            return;
        }
        let started = Instant::now();
        let staging = match cache.staging(&key) {
            Ok(d) => d,
            Err(e) => {
                logger().log(Some(&name), &format!("no snapshot: {e}"));
                return;
            }
        };
        let saved = self.migrate_to(&staging);
        // The VM stays stopped after a migration; a failed one resumes by
        // itself.
        if saved.is_ok() {
            if let Err(e) = self.qmp("cont", None, Duration::from_secs(60)) {
                logger().log(
                    Some(&name),
                    &format!("cannot resume after the snapshot: {e}"),
                );
            }
        }
        let console = self.console_log();
        let result = saved
            .map_err(|e| e.to_string())
            .and_then(|_| {
                std::fs::write(staging.join(CONSOLE_FILE), console)
                    .map_err(|e| format!("cannot keep the boot console: {e}"))
            })
            .and_then(|()| cache.commit(&staging, &key, &name));
        match result {
            Ok(dir) => {
                logger().log(
                    Some(&name),
                    &format!(
                        "saved snapshot {key} in {:.2} seconds ({})",
                        started.elapsed().as_secs_f64(),
                        dir.display()
                    ),
                );
                for e in cache.prune(snapshots::DEFAULT_MAX_BYTES) {
                    logger().log(
                        None,
                        &format!(
                            "snapshot cache: removed {} ({}, {} MiB)",
                            e.key,
                            e.node,
                            e.bytes >> 20
                        ),
                    );
                }
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                logger().log(Some(&name), &format!("no snapshot saved: {e}"));
            }
        }
    }

    /// Before a cache snapshot: under systemd, waits until the boot is
    /// over (`systemctl is-system-running --wait`, at most
    /// [`SETTLE_TIMEOUT_S`]), so that every restore skips the whole boot,
    /// not only its start; other inits are saved as soon as the backdoor
    /// answers. A boot that does not end in time is not saved.
    fn settle_boot(&self) -> Result<(), String> {
        let started = Instant::now();
        let command = format!(
            "if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then \
             timeout {SETTLE_TIMEOUT_S} systemctl is-system-running --wait 2>&1; echo \"settled=$?\"; \
             else echo settled=no-systemd; fi"
        );
        let (_, out) = self
            .execute(&command, false, true, Some(SETTLE_TIMEOUT_S + 60), false)
            .map_err(|e| format!("waiting for the boot to end: {e}"))?;
        let out = String::from_utf8_lossy(&out);
        let mut lines = out.lines().rev();
        let status = lines
            .next()
            .and_then(|l| l.strip_prefix("settled="))
            .unwrap_or("?");
        let state = lines.next().unwrap_or("").trim();
        match status {
            "no-systemd" => Ok(()),
            "124" => Err(format!(
                "the boot did not end within {SETTLE_TIMEOUT_S} s (systemd says '{state}')"
            )),
            // running (0) or degraded and the like (1): the boot is over.
            "0" | "1" => {
                logger().log(
                    Some(&self.0.name),
                    &format!(
                        "boot over (systemd: {state}) after {:.2} more seconds; saving it",
                        started.elapsed().as_secs_f64()
                    ),
                );
                Ok(())
            }
            other => Err(format!(
                "cannot tell whether the boot is over (status {other}: {})",
                out.trim()
            )),
        }
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn state_dir(&self) -> &Path {
        &self.0.state_dir
    }

    /// The VLANs of its network cards, in card order.
    pub fn vlans(&self) -> Vec<u8> {
        self.0.node.nics.iter().map(|n| n.vlan).collect()
    }

    /// Whether the node has a display (a GPU, a keyboard and a tablet).
    pub fn has_display(&self) -> bool {
        self.0.node.vm.gpu.is_some()
    }

    fn fail(&self, message: impl Into<String>) -> MachineError {
        MachineError::Host {
            machine: self.0.name.clone(),
            message: message.into(),
        }
    }

    fn not_running(&self, what: &'static str) -> MachineError {
        MachineError::NotRunning {
            machine: self.0.name.clone(),
            what,
        }
    }

    /// The VMM's pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        lock(&self.0.proc).pid
    }

    /// Whether a VMM runs (a restart after a guest reboot counts).
    pub fn running(&self) -> bool {
        let p = lock(&self.0.proc);
        p.pid.is_some() || p.restarting
    }

    /// Whether the machine counts as booted for the test script: it runs,
    /// and the script has not said otherwise since the last start.
    pub fn booted(&self) -> bool {
        let p = lock(&self.0.proc);
        (p.pid.is_some() || p.restarting) && !p.marked_down
    }

    /// What a script's `booted = ...` sets: false makes [`Machine::booted`]
    /// false until the next start or exit (tests of a shutdown the driver
    /// cannot see set it to skip the final `sync`); true undoes that.
    pub fn set_booted(&self, booted: bool) {
        lock(&self.0.proc).marked_down = !booted;
    }

    /// Whether the shell is connected to the current VMM run.
    pub fn connected(&self) -> bool {
        let (generation, running) = {
            let p = lock(&self.0.proc);
            (p.generation, p.pid.is_some())
        };
        if !running {
            return false;
        }
        lock(&self.0.shell)
            .as_ref()
            .is_some_and(|(_, g)| *g == generation)
    }

    /// Exit status of the last VMM run.
    pub fn last_exit(&self) -> Option<i32> {
        lock(&self.0.proc).exit
    }

    /// Starts the VMM unless it runs; returns its pid. Does not wait for the
    /// guest.
    pub fn start(&self, allow_reboot: bool) -> Result<i32, MachineError> {
        if let Some(pid) = self.pid() {
            return Ok(pid);
        }
        let dir = &self.0.state_dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| self.fail(format!("cannot create {}: {e}", dir.display())))?;
        {
            let mut l = lock(&self.0.listener);
            if l.is_none() {
                let path = dir.join("shell");
                let _ = std::fs::remove_file(&path);
                let listener = UnixListener::bind(&path)
                    .map_err(|e| self.fail(format!("cannot listen on {}: {e}", path.display())))?;
                listener
                    .set_nonblocking(true)
                    .map_err(|e| self.fail(e.to_string()))?;
                *l = Some(listener);
            } else if let Some(listener) = l.as_ref() {
                // Connections still queued come from VMMs that have exited
                // (one that was stopped before its shell was used): the
                // next accept must be the new VMM's, not a dead one's.
                while listener.accept().is_ok() {}
            }
        }
        *lock(&self.0.console) = Console::default();
        self.0.events.clear();
        {
            let mut p = lock(&self.0.proc);
            p.allow_reboot = allow_reboot;
            p.released = false;
            p.marked_down = false;
        }
        let pid = self.spawn_vmm()?;
        logger().log(
            Some(&self.0.name),
            &format!("skiff-vmm running (pid {pid})"),
        );
        self.connect_qmp()?;
        Ok(pid)
    }

    fn spawn_vmm(&self) -> Result<i32, MachineError> {
        let i = &self.0;
        let mut cmd = Command::new(&i.vmm);
        // A guest that rebooted boots for real: a reboot is what a test
        // wants to see (a new boot id, the boot's own console).
        let restore = if lock(&i.proc).restarting {
            None
        } else {
            self.snapshot_to_restore()
        };
        let config = VmConfig {
            name: i.name.clone(),
            serial: SerialConfig::Stdio,
            console: Some(ConsoleBackend::Socket(i.state_dir.join("shell"))),
            qmp: vec![i.state_dir.join("qmp")],
            incoming_memory: if restore.is_some() {
                restore_memory()
            } else {
                RestoreMemory::Map
            },
            incoming: restore.clone(),
            ..i.node.vm.clone()
        };
        cmd.args(config.to_args())
            .args(&i.node.extra_args)
            .current_dir(&i.state_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let log_path = i.out_dir.join(format!("{}.vmm.log", i.name));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| self.fail(format!("cannot open {}: {e}", log_path.display())))?;
        cmd.stderr(log);
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only async-signal-safe functions (prctl, setpgid).
        unsafe {
            cmd.pre_exec(|| {
                // The VMM dies with the driver, whatever kills the driver.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Its own process group: a terminal's Ctrl-C reaches the
                // driver, which then stops the VMs in order.
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let mut child = spawn(cmd).map_err(|source| MachineError::Spawn {
            machine: i.name.clone(),
            vmm: i.vmm.clone(),
            source,
        })?;
        let pid = child.id() as i32;
        let stdout = child.stdout.take();
        if let Some(dir) = &restore {
            self.replay_console(dir);
        }
        {
            let mut p = lock(&i.proc);
            p.pid = Some(pid);
            p.stdin = child.stdin.take();
            p.exit = None;
            p.restarting = false;
            p.generation += 1;
            lock(&i.snapshots).restored = restore.map(|dir| (p.generation, dir));
        }
        if let Some(out) = stdout {
            let vm = self.clone();
            std::thread::Builder::new()
                .name(format!("{}-serial", i.name))
                .spawn(move || vm.read_serial(out))
                .map_err(|e| self.fail(format!("cannot start the serial thread: {e}")))?;
        }
        let vm = self.clone();
        std::thread::Builder::new()
            .name(format!("{}-wait", i.name))
            .spawn(move || vm.watch(child))
            .map_err(|e| self.fail(format!("cannot start the wait thread: {e}")))?;
        Ok(pid)
    }

    /// Waits for the VMM to exit; restarts it after a guest reboot when
    /// allowed.
    fn watch(&self, mut child: Child) {
        let status = child.wait();
        let code = match status {
            Ok(s) => s.code().unwrap_or_else(|| {
                128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(0)
            }),
            Err(_) => -1,
        };
        let restart = {
            let mut p = lock(&self.0.proc);
            p.pid = None;
            p.stdin = None;
            p.exit = Some(code);
            p.restarting = code == ExitStatus::Reset.code() && p.allow_reboot && !p.released;
            if !p.restarting {
                p.marked_down = false;
            }
            p.restarting
        };
        let name = &self.0.name;
        logger().log(
            Some(name),
            &format!(
                "skiff-vmm exited with status {code} ({})",
                exit_meaning(code)
            ),
        );
        if !restart {
            self.0.exited.notify_all();
            return;
        }
        logger().log(Some(name), "the guest rebooted; starting it again");
        *lock(&self.0.console) = Console::default();
        let spawned = self.spawn_vmm();
        if spawned.is_err() {
            let mut p = lock(&self.0.proc);
            p.restarting = false;
            p.marked_down = false;
        }
        self.0.exited.notify_all();
        if let Err(e) = spawned {
            logger().error(Some(name), &e.to_string());
            return;
        }
        // The new VMM's QMP socket, as a start connects it. A failure is
        // only worth a word while the VMM still runs; the next request
        // tries again.
        if let Err(e) = self.connect_qmp() {
            if self.running() && !e.is_interrupted() {
                logger().warning(Some(name), &format!("reconnecting QMP: {e}"));
            }
        }
    }

    fn read_serial(&self, out: impl std::io::Read) {
        let name = self.0.name.clone();
        let path = self.0.out_dir.join(format!("{name}.serial.log"));
        let mut file: Option<File> = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(&path)
            .ok();
        let mut r = BufReader::new(out);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match r.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&raw)
                .replace('\r', "")
                .trim_end()
                .to_owned();
            self.console_line(file.as_mut(), &name, line);
        }
    }

    /// One serial line: to the serial log, the event log and the console
    /// buffers `wait_for_console_text` reads.
    fn console_line(&self, file: Option<&mut File>, name: &str, line: String) {
        if let Some(f) = file {
            let _ = writeln!(f, "{line}");
        }
        logger().serial(name, &line);
        let mut c = lock(&self.0.console);
        c.queue.push_back(line.clone());
        c.all.push(line);
    }

    /// A restored guest prints no boot messages: the ones its snapshot
    /// kept (the console up to the snapshot) are replayed into the
    /// console, so that a script waiting for boot output sees it, as
    /// after a cold boot.
    fn replay_console(&self, dir: &Path) {
        let Ok(text) = std::fs::read_to_string(dir.join(CONSOLE_FILE)) else {
            return;
        };
        let name = self.0.name.clone();
        let path = self.0.out_dir.join(format!("{name}.serial.log"));
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .ok();
        let lines: Vec<&str> = text.lines().collect();
        logger().log(
            Some(&name),
            &format!(
                "replaying {} boot console line(s) from the snapshot",
                lines.len()
            ),
        );
        for line in lines {
            self.console_line(file.as_mut(), &name, line.to_owned());
        }
    }

    /// Takes the oldest serial line not yet consumed (the queue starts
    /// empty at each start).
    pub fn take_console_line(&self) -> Option<String> {
        lock(&self.0.console).queue.pop_front()
    }

    /// The serial console since the last start.
    pub fn console_log(&self) -> String {
        lock(&self.0.console).all.join("\n")
    }

    fn last_serial_lines(&self, n: usize) -> String {
        let c = lock(&self.0.console);
        let from = c.all.len().saturating_sub(n);
        c.all[from..].join("\n")
    }

    /// Writes to the serial console's input.
    pub fn send_console(&self, data: &[u8]) -> Result<(), MachineError> {
        let mut p = lock(&self.0.proc);
        let stdin = p
            .stdin
            .as_mut()
            .ok_or_else(|| self.not_running("the machine is not running"))?;
        stdin
            .write_all(data)
            .and_then(|_| stdin.flush())
            .map_err(|e| self.fail(format!("cannot write to the serial console: {e}")))
    }

    /// An error for a VMM that is gone, with the end of its serial console.
    fn died(&self, doing: &str) -> MachineError {
        MachineError::Exited {
            machine: self.0.name.clone(),
            status: self.last_exit().unwrap_or(-1),
            doing: doing.to_owned(),
            serial: self.last_serial_lines(20),
        }
    }

    /// Waits for the backdoor banner (connecting the shell first), at most
    /// `timeout` (default: the node's connect_timeout). Returns the seconds
    /// it took.
    pub fn connect(&self, timeout: Option<Duration>) -> Result<f64, MachineError> {
        if self.connected() {
            return Ok(0.0);
        }
        if !self.running() {
            self.start(false)?;
        }
        let timeout = timeout.unwrap_or(Duration::from_secs(self.0.node.connect_timeout));
        let started = Instant::now();
        let name = self.0.name.clone();
        logger().begin_nested(Some(&name), "waiting for the VM to finish booting");
        let too_late = |m: &Machine| MachineError::ConnectTimeout {
            machine: m.0.name.clone(),
            timeout,
            serial: m.last_serial_lines(20),
            vcpus: m.vcpu_report(),
        };
        let mut wait = GuestWait::new(self, Phase::Banner { timeout });
        // The VMM connects to our socket as soon as it starts. A VMM whose
        // connection we dropped (after a reboot request) reconnects before
        // it exits: a connection that closes before the banner is retried.
        let mut restored = None;
        let (shell, generation) = loop {
            let stream = loop {
                let accepted = lock(&self.0.listener)
                    .as_ref()
                    .ok_or_else(|| self.fail("no shell socket"))?
                    .accept();
                match accepted {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if !self.running() {
                            return Err(self.died("waiting for its console connection"));
                        }
                        if interrupted() {
                            return Err(MachineError::Interrupted { machine: name });
                        }
                        if started.elapsed() > timeout {
                            return Err(too_late(self));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(self.fail(format!("accepting the shell connection: {e}"))),
                }
            };
            let mut shell = Shell::new(stream).map_err(|e| MachineError::Shell {
                machine: name.clone(),
                source: e.into(),
            })?;
            if let Some(dir) = self.claim_restored() {
                // A restored guest's shell waits for a command already.
                restored = Some(dir);
                break (shell, lock(&self.0.proc).generation);
            }
            wait.phase = Phase::Banner {
                timeout: timeout.saturating_sub(started.elapsed()),
            };
            let r = shell.wait_banner(&mut wait);
            match r {
                Ok(()) => break (shell, lock(&self.0.proc).generation),
                Err(ShellError::Stopped(Stop::Timeout)) => return Err(too_late(self)),
                Err(ShellError::Closed) if self.running() => continue,
                Err(_) if !self.running() => {
                    return Err(self.died("waiting for the guest root shell"))
                }
                Err(ShellError::Stopped(Stop::Interrupted)) => {
                    return Err(MachineError::Interrupted { machine: name })
                }
                Err(source) => {
                    return Err(MachineError::Shell {
                        machine: name,
                        source,
                    })
                }
            }
        };
        *lock(&self.0.shell) = Some((shell, generation));
        logger().log(Some(&name), "connected to guest root shell");
        match restored {
            Some(dir) => {
                // The guest's clock stood still since the snapshot. It is
                // set twice: the first command pages `date` and the shell
                // back in (seconds under emulation, all of it error in
                // the time set), the second is then quick, and sets the
                // host's time rounded to the second.
                for _ in 0..2 {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| (d.as_millis() + 500) / 1000);
                    let set = self.execute(
                        &format!("date -u -s @{now} >/dev/null"),
                        true,
                        true,
                        Some(60),
                        false,
                    );
                    // Its output and status are read: a command left
                    // unread would put the next one's replies out of step.
                    if let Err(e) = set {
                        logger().log(Some(&name), &format!("cannot set the guest's clock: {e}"));
                        break;
                    }
                }
                logger().log(
                    Some(&name),
                    &format!("restored from snapshot {}", dir.display()),
                );
            }
            None => self.take_snapshot(),
        }
        logger().end_nested(
            Some(&name),
            "waiting for the VM to finish booting",
            started.elapsed().as_secs_f64(),
        );
        let secs = started.elapsed().as_secs_f64();
        logger().log(Some(&name), &format!("(connecting took {secs:.2} seconds)"));
        Ok(secs)
    }

    /// Runs a command through the backdoor (connecting first). See
    /// [`Shell::execute`].
    pub fn execute(
        &self,
        command: &str,
        check_return: bool,
        check_output: bool,
        timeout: Option<u64>,
        stream: bool,
    ) -> Result<(i32, Vec<u8>), MachineError> {
        // A shell is still held when its VMM exited and nothing waited for
        // that (wait_for_shutdown, shutdown, crash): the VM died under the
        // test. The command fails with why, as upstream's fails on the dead
        // connection, instead of booting a new VM behind the script's back.
        if !self.running() && lock(&self.0.shell).take().is_some() {
            return Err(self.died(&format!("running `{command}`")));
        }
        self.connect(None)?;
        let mut guard = lock(&self.0.shell);
        let generation = lock(&self.0.proc).generation;
        let Some((shell, g)) = guard.as_mut().filter(|(_, g)| *g == generation) else {
            return Err(self.not_running("the guest shell is not connected"));
        };
        debug_assert_eq!(*g, generation);
        let mut w = GuestWait::new(
            self,
            Phase::Command {
                command,
                warned: false,
                line: Vec::new(),
            },
        );
        let r = shell.execute(command, check_return, check_output, timeout, stream, &mut w);
        w.flush_output();
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                *guard = None;
                drop(guard);
                // A connection that broke (closed, reset) as the VMM died
                // is reported as the VMM's death, with its status and last
                // serial lines: the reaper may not have seen the exit yet.
                let broken = matches!(
                    e,
                    ShellError::Closed | ShellError::Io(_) | ShellError::Stopped(Stop::VmExited)
                );
                if !self.running()
                    || broken && self.wait_exit(Some(Duration::from_secs(2))).is_some()
                {
                    Err(self.died(&format!("running `{command}`")))
                } else {
                    let vcpus = if matches!(
                        e,
                        ShellError::NoAnswer(_) | ShellError::Stopped(Stop::Timeout)
                    ) {
                        self.vcpu_report()
                    } else {
                        String::new()
                    };
                    Err(MachineError::Command {
                        machine: self.0.name.clone(),
                        command: command.to_owned(),
                        source: e,
                        vcpus,
                    })
                }
            }
        }
    }

    /// What the vCPUs of a guest that stopped answering were doing, for
    /// its failure report: each vCPU's instruction pointer and flags, and
    /// its local APIC timer (mode, TSC deadline against the TSC, pending
    /// and in-service vectors, halted or not), from skiff-vmm's `info
    /// registers` and `info lapic`. A guest idle with its timer armed reads
    /// differently from one whose timer interrupt never comes, or one
    /// spinning with interrupts off. Empty when the VMM is gone; says why
    /// when the monitor does not answer.
    pub fn vcpu_report(&self) -> String {
        if !self.running() {
            return String::new();
        }
        let hmp = |line: &str, cpu: usize| -> Result<String, MachineError> {
            let mut args = qmp::Object::new();
            args.insert("command-line".into(), line.into());
            args.insert("cpu-index".into(), cpu.into());
            let reply = self.qmp("human-monitor-command", Some(args), Duration::from_secs(10))?;
            Ok(reply.as_str().unwrap_or_default().replace("\r\n", "\n"))
        };
        let mut out = String::from("\nvCPU state (info registers, info lapic):");
        for cpu in 0..usize::from(self.0.node.vm.cpus.max(1)) {
            let regs = match hmp("info registers", cpu) {
                Ok(r) => r,
                Err(e) => {
                    out.push_str(&format!("\n  cannot read the vCPUs: {e}"));
                    return out;
                }
            };
            let lapic = hmp("info lapic", cpu).unwrap_or_else(|e| e.to_string());
            out.push_str(&format!("\n  CPU#{cpu}:"));
            let keep = [
                "RIP=",
                "LVTT\t",
                "Timer",
                "TSC deadline",
                "ISR",
                "IRR",
                "APIC ID",
            ];
            for line in regs.lines().chain(lapic.lines()) {
                if keep.iter().any(|k| line.starts_with(k)) {
                    out.push_str(&format!("\n    {}", line.replace('\t', " ")));
                }
            }
        }
        out
    }

    /// Time the current shell connection spent waiting for the guest.
    pub fn guest_wait(&self) -> Duration {
        lock(&self.0.shell)
            .as_ref()
            .map(|(s, _)| s.waited)
            .unwrap_or_default()
    }

    /// Writes raw bytes to the shell (no framing, no reply), as
    /// `shutdown()` does with `poweroff\n`.
    pub fn send_shell_raw(&self, data: &[u8]) -> Result<(), MachineError> {
        self.connect(None)?;
        let mut guard = lock(&self.0.shell);
        let (shell, _) = guard
            .as_mut()
            .ok_or_else(|| self.not_running("the guest shell is not connected"))?;
        shell
            .send_raw(data)
            .map_err(|e| self.fail(format!("writing to the guest shell: {e}")))
    }

    /// Forgets the shell connection (after a reboot request the next
    /// command waits for a fresh banner).
    pub fn disconnect(&self) {
        *lock(&self.0.shell) = None;
    }

    /// Waits until no VMM runs (a reboot restart counts as running), at
    /// most `timeout`. Returns the exit status, or None on timeout.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<i32> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut p = lock(&self.0.proc);
        loop {
            if p.pid.is_none() && !p.restarting {
                let code = p.exit.unwrap_or(0);
                drop(p);
                // The exit was seen: its shell is done with.
                *lock(&self.0.shell) = None;
                return Some(code);
            }
            let wait = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(t) => t.min(Duration::from_millis(500)),
                    None => return None,
                },
                None => Duration::from_millis(500),
            };
            p = self
                .0
                .exited
                .wait_timeout(p, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sends `signal` to the VMM if it runs.
    pub fn signal(&self, signal: i32) {
        let p = lock(&self.0.proc);
        if let Some(pid) = p.pid {
            // SAFETY: kill() only sends a signal; pid is our live child
            // (the wait thread clears it under this lock once reaped).
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Kills the VMM and forgets the shell and QMP; no restart follows.
    pub fn release(&self) {
        lock(&self.0.proc).released = true;
        // A reboot restart may have been under way: kill what runs then.
        for _ in 0..3 {
            self.signal(libc::SIGKILL);
            if self.wait_exit(Some(Duration::from_secs(10))).is_some() {
                break;
            }
        }
        *lock(&self.0.shell) = None;
        *lock(&self.0.qmp) = None;
    }

    /// The QMP connection of the running VMM, if it is open.
    fn current_qmp(&self) -> Option<Arc<qmp::Client>> {
        let generation = lock(&self.0.proc).generation;
        lock(&self.0.qmp)
            .as_ref()
            .filter(|l| l.generation == generation && !l.client.ended())
            .map(|l| l.client.clone())
    }

    /// Connects QMP to the running VMM unless that is done: waits for its
    /// socket (a line every 15 s says so) and negotiates.
    fn connect_qmp(&self) -> Result<Arc<qmp::Client>, MachineError> {
        let _one = lock(&self.0.qmp_connecting);
        if let Some(client) = self.current_qmp() {
            return Ok(client);
        }
        if !self.running() {
            return Err(self.not_running("the machine is not running"));
        }
        // A restart while we connect leaves this connection stale, and the
        // next request connects again.
        let generation = lock(&self.0.proc).generation;
        let socket = self.0.state_dir.join("qmp");
        let mut wait = GuestWait::new(
            self,
            Phase::QmpSocket {
                timeout: QMP_CONNECT_TIMEOUT,
            },
        );
        let client = match qmp::Client::connect(&socket, self.0.events.clone(), &mut wait) {
            Ok(client) => Arc::new(client),
            Err(QmpError::Stopped(Stop::VmExited)) => {
                return Err(MachineError::ExitedBeforeQmp {
                    machine: self.0.name.clone(),
                    status: self.last_exit().unwrap_or(-1),
                    socket,
                    serial: self.last_serial_lines(20),
                })
            }
            Err(e) => return Err(self.qmp_failed(e)),
        };
        *lock(&self.0.qmp) = Some(QmpLink {
            client: client.clone(),
            generation,
        });
        Ok(client)
    }

    fn qmp_failed(&self, e: QmpError) -> MachineError {
        match e {
            QmpError::Stopped(Stop::Interrupted) => MachineError::Interrupted {
                machine: self.0.name.clone(),
            },
            source => MachineError::Qmp {
                machine: self.0.name.clone(),
                source,
            },
        }
    }

    /// Runs QMP `command` with `arguments` on the running VMM and returns
    /// the reply's `return` value; waits at most `timeout` for it. An
    /// error reply is [`QmpError::Api`].
    pub fn qmp(
        &self,
        command: &str,
        arguments: Option<qmp::Object>,
        timeout: Duration,
    ) -> Result<serde_json::Value, MachineError> {
        let client = match self.current_qmp() {
            Some(client) => client,
            None => self.connect_qmp()?,
        };
        let mut wait = GuestWait::new(self, Phase::QmpReply { command, timeout });
        client
            .execute(command, arguments, &mut wait)
            .map_err(|e| self.qmp_failed(e))
    }

    /// The oldest QMP event since the start not yet taken, waiting at most
    /// `timeout` for one (None then). Events of a VMM run that ended stay
    /// until taken. Fails when no VMM runs and none is left.
    pub fn qmp_event(&self, timeout: Duration) -> Result<Option<qmp::Object>, MachineError> {
        if !self.running() && self.0.events.idle() {
            return Err(self.not_running("QMP is not connected"));
        }
        let mut wait = GuestWait::new(self, Phase::QmpEvent { timeout });
        match self.0.events.next(&mut wait) {
            Ok(event) => Ok(Some(event)),
            Err(Stop::Timeout) => Ok(None),
            Err(Stop::Interrupted) => Err(MachineError::Interrupted {
                machine: self.0.name.clone(),
            }),
            Err(Stop::VmExited) => Err(self.died("waiting for a QMP event")),
        }
    }
}

/// What a wait on the guest or the VMM is for.
enum Phase<'a> {
    /// The backdoor banner, for at most `timeout`.
    Banner { timeout: Duration },
    /// `command`'s output; `line` holds streamed output not yet logged.
    Command {
        command: &'a str,
        warned: bool,
        line: Vec<u8>,
    },
    /// The QMP socket, its greeting and negotiation, for at most `timeout`.
    QmpSocket { timeout: Duration },
    /// The reply to QMP `command`, for at most `timeout`.
    QmpReply { command: &'a str, timeout: Duration },
    /// A QMP event, for at most `timeout`.
    QmpEvent { timeout: Duration },
}

/// The [`Watcher`] of every wait on the guest shell or the VMM's QMP
/// socket: it stops the wait when the driver is being stopped or the VMM
/// exits, enforces the deadlines, and says in the log what it still waits
/// for.
struct GuestWait<'a> {
    machine: &'a Machine,
    phase: Phase<'a>,
    last_report: Instant,
}

impl<'a> GuestWait<'a> {
    fn new(machine: &'a Machine, phase: Phase<'a>) -> Self {
        GuestWait {
            machine,
            phase,
            last_report: Instant::now(),
        }
    }

    fn log(&self, message: &str) {
        logger().log(Some(self.machine.name()), message);
    }

    /// Logs the streamed output's last line if it had no newline.
    fn flush_output(&mut self) {
        if let Phase::Command { line, .. } = &mut self.phase {
            if !line.is_empty() {
                let text = format!("| {}", String::from_utf8_lossy(line));
                line.clear();
                self.log(&text);
            }
        }
    }
}

impl Watcher for GuestWait<'_> {
    fn tick(&mut self, waited: Duration) -> Result<(), Stop> {
        if interrupted() {
            return Err(Stop::Interrupted);
        }
        let due = self.last_report.elapsed() >= PROGRESS_EVERY;
        match &self.phase {
            // What the VMM sent before it exited still counts: a reply
            // wait ends when the socket closes, an event wait when nothing
            // is left to come.
            Phase::QmpReply { command, timeout } => {
                if waited > *timeout {
                    return Err(Stop::Timeout);
                }
                if due {
                    let text = format!(
                        "waiting for the reply to QMP command {command} ({:.0}s)",
                        waited.as_secs_f64()
                    );
                    self.last_report = Instant::now();
                    self.log(&text);
                }
                return Ok(());
            }
            Phase::QmpEvent { timeout } => {
                if waited >= *timeout {
                    return Err(Stop::Timeout);
                }
                if !self.machine.running() && self.machine.0.events.idle() {
                    return Err(Stop::VmExited);
                }
                return Ok(());
            }
            _ => {}
        }
        if !self.machine.running() {
            return Err(Stop::VmExited);
        }
        match &mut self.phase {
            Phase::QmpSocket { timeout } => {
                if waited > *timeout {
                    return Err(Stop::Timeout);
                }
                if due {
                    self.last_report = Instant::now();
                    self.log(&format!(
                        "waiting for skiff-vmm's QMP socket ({:.0}s)",
                        waited.as_secs_f64()
                    ));
                }
            }
            Phase::QmpReply { .. } | Phase::QmpEvent { .. } => {}
            Phase::Banner { timeout } => {
                if waited > *timeout {
                    return Err(Stop::Timeout);
                }
                if due {
                    self.last_report = Instant::now();
                    self.log(&format!(
                        "waiting for the guest root shell ({:.0}s)",
                        waited.as_secs_f64()
                    ));
                }
            }
            Phase::Command {
                command, warned, ..
            } => {
                if !*warned && waited >= STDOUT_WARNING {
                    *warned = true;
                    self.last_report = Instant::now();
                    logger().warning(
                        Some(self.machine.name()),
                        &format!(
                            "command `{command}` has not closed its stdout after {} s: it is still running, or a background process it started keeps stdout open (redirect that process's output, e.g. `cmd >/dev/null 2>&1 &`)",
                            STDOUT_WARNING.as_secs()
                        ),
                    );
                } else if *warned && due {
                    let text = format!(
                        "waiting for `{command}` to finish ({:.0}s)",
                        waited.as_secs_f64()
                    );
                    self.last_report = Instant::now();
                    self.log(&text);
                }
            }
        }
        Ok(())
    }

    fn output(&mut self, chunk: &[u8]) {
        let Phase::Command { line, .. } = &mut self.phase else {
            return;
        };
        line.extend_from_slice(chunk);
        let mut lines = Vec::new();
        while let Some(i) = line.iter().position(|&b| b == b'\n') {
            let l: Vec<u8> = line.drain(..=i).collect();
            lines.push(format!("| {}", String::from_utf8_lossy(&l[..l.len() - 1])));
        }
        for l in lines {
            self.log(&l);
        }
    }
}
