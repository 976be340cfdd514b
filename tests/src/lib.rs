//! Harness for tests that boot real guests under `skiff-vmm`.
//!
//! Guests run where `/dev/kvm` runs standard kernels ("direct"), and inside
//! the test host (`tests/host/run`: QEMU TCG with AMD SVM and kvm_amd)
//! everywhere else, such as on PVM hosts. `SKIFF_TEST_HOST=auto|direct|tcg`
//! overrides the choice. To keep emulated boots few, a test hands over a
//! batch of VM runs that go through one test host boot.
//!
//! A run of skiff-vmm is a [`VmConfig`], started with the arguments its
//! `to_args()` writes, as the driver starts it: a test says what VM it
//! wants in the type skiff-vmm parses, never in hand-written flags.

pub mod backdoor;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use skiff_vmm::config::{BlockConfig, ConsoleBackend};
use skiff_vmm::VmConfig;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `$SKIFF_CACHE` or `~/.cache/skiff`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("SKIFF_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/skiff"),
    }
}

/// The guest fixtures built by `tests/guest/build`.
#[derive(Debug, Clone)]
pub struct Fixtures {
    /// Minimal kernel with everything built in.
    pub microvm: PathBuf,
    /// Debian's stock kernel.
    pub debian: PathBuf,
    /// busybox initrd with tests/guest/init.
    pub initrd: PathBuf,
}

/// The fixtures; panics with instructions when they are missing (a test
/// that cannot boot its guest fails, it never passes by skipping).
pub fn fixtures() -> Fixtures {
    let dir = cache_dir().join("guest");
    let f = Fixtures {
        microvm: dir.join("vmlinuz-microvm"),
        debian: dir.join("vmlinuz-debian"),
        initrd: dir.join("initrd.cpio.gz"),
    };
    for p in [&f.microvm, &f.debian, &f.initrd] {
        assert!(
            p.is_file(),
            "guest fixture {} is missing: run tests/guest/build first",
            p.display()
        );
    }
    f
}

/// Builds `bin` of `package` in the profile these tests run under and
/// returns its path.
fn build_bin(package: &str, bin: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps")
        .to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--quiet", "-p", package, "--bin", bin]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build -p {package} failed");
    let path = profile_dir.join(bin);
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// The `skiff-vmm` binary, built on first use (`SKIFF_VMM` overrides).
pub fn skiff_vmm() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("SKIFF_VMM") {
        Some(p) => PathBuf::from(p),
        None => build_bin("skiff-vmm", "skiff-vmm"),
    })
    .clone()
}

/// The `skiff` driver binary, built on first use, with `skiff-vmm` next
/// to it.
pub fn skiff_driver() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let vmm = build_bin("skiff-vmm", "skiff-vmm");
        let skiff = build_bin("skiff-driver", "skiff");
        assert_eq!(vmm.parent(), skiff.parent());
        skiff
    })
    .clone()
}

/// Where guests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// On this machine's /dev/kvm.
    Direct,
    /// Inside the QEMU TCG test host.
    TestHost,
}

/// Picks the mode from `SKIFF_TEST_HOST` (auto|direct|tcg) and the host.
pub fn mode() -> Mode {
    match std::env::var("SKIFF_TEST_HOST").as_deref() {
        Ok("direct") => Mode::Direct,
        Ok("tcg") => Mode::TestHost,
        Ok("auto") | Ok("") | Err(_) => {
            // PVM's /dev/kvm runs only PVM-aware guest kernels.
            let pvm = Path::new("/sys/module/kvm_pvm").exists();
            let usable = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
            if pvm || !usable {
                Mode::TestHost
            } else {
                Mode::Direct
            }
        }
        Ok(other) => panic!("SKIFF_TEST_HOST={other}: expected auto, direct or tcg"),
    }
}

/// One VM run in a batch.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Label for messages and file names (letters, digits, '-').
    pub name: String,
    /// Arguments to the program (skiff-vmm unless `program` is set).
    pub args: Vec<String>,
    /// Seconds before the run is killed.
    pub timeout_s: u64,
    /// When set, send SIGTERM once the serial output contains this text.
    pub sigterm_after: Option<String>,
    /// Program to run instead of skiff-vmm (it gets `args`).
    pub program: Option<PathBuf>,
}

impl VmSpec {
    /// A run of skiff-vmm with `config` (through [`VmConfig::to_args`], as
    /// the driver starts it) and a generous timeout.
    pub fn new(name: &str, config: VmConfig) -> Self {
        Self::raw(name, config.to_args())
    }

    /// A run of `skiff-vmm args...` with literal arguments, for a command
    /// line that no [`VmConfig`] writes (a flag the test means to be bad).
    pub fn raw(name: &str, args: Vec<String>) -> Self {
        VmSpec {
            name: name.to_owned(),
            args,
            timeout_s: 300,
            sigterm_after: None,
            program: None,
        }
    }

    /// A run of `/bin/sh -c script`, its output as the serial text.
    pub fn shell(name: &str, script: String, timeout_s: u64) -> Self {
        let mut spec = Self::raw(name, vec!["-c".into(), script]);
        spec.program = Some("/bin/sh".into());
        spec.timeout_s = timeout_s;
        spec
    }

    /// A run of `skiff-guest-session` (the binary at `session`): skiff-vmm
    /// with `config` and its virtio console on a socket the session listens
    /// on, the backdoor checks `checks` run through it with `shell`.
    pub fn session(
        name: &str,
        session: &Path,
        shell: &str,
        checks: &[&str],
        mut config: VmConfig,
    ) -> Self {
        let socket = format!("/tmp/skiff-{}-{name}.sock", std::process::id());
        let mut args = vec![
            "--socket".to_owned(),
            socket.clone(),
            "--shell".to_owned(),
            shell.to_owned(),
        ];
        for c in checks {
            args.push("--check".into());
            args.push((*c).to_owned());
        }
        args.push("--".into());
        args.push(skiff_vmm().display().to_string());
        config.console = Some(ConsoleBackend::Socket(socket.into()));
        args.extend(config.to_args());
        VmSpec {
            name: name.to_owned(),
            args,
            timeout_s: 900,
            sigterm_after: None,
            program: Some(session.to_owned()),
        }
    }
}

/// A writable virtio-blk disk backed by `path`, with the command line's
/// defaults; set `readonly`, `overlay` or `id` with struct update syntax.
pub fn disk(path: impl Into<PathBuf>) -> BlockConfig {
    BlockConfig {
        path: path.into(),
        readonly: false,
        overlay: false,
        id: None,
    }
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct VmOutcome {
    /// The spec's name.
    pub name: String,
    /// Exit status of skiff-vmm (124 means it was killed on timeout).
    pub status: Option<i32>,
    /// The guest's serial console (skiff-vmm's stdout).
    pub serial: String,
    /// skiff-vmm's log (stderr).
    pub log: String,
}

impl VmOutcome {
    /// Everything, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "VM run '{}' ended with status {:?}\n--- skiff-vmm log ---\n{}\n--- serial (last 60 lines) ---\n{}",
            self.name,
            self.status,
            self.log.trim_end(),
            last_lines(&self.serial, 60)
        )
    }

    /// The `CHECK <name> ...` line skiff-guest-session logged, if any.
    pub fn check_line(&self, name: &str) -> Option<&str> {
        let prefix = format!("skiff-guest-session: CHECK {name} ");
        self.log
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
    }

    /// Asserts that check `name` passed.
    pub fn assert_check(&self, name: &str) -> &str {
        match self.check_line(name) {
            Some(l) if l.starts_with("ok") => l,
            _ => panic!("check {name} did not pass:\n{}", self.describe()),
        }
    }

    /// The `key=value` facts the test init prints on its
    /// `skiff-guest: kernel=...` line.
    pub fn guest_fact(&self, key: &str) -> Option<String> {
        let line = self
            .serial
            .lines()
            .find(|l| l.starts_with("skiff-guest: kernel="))?;
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_owned())
    }
}

/// Quotes `s` for a POSIX shell (the backdoor protocol's quoting).
pub use skiff_backdoor::quote as shell_quote;

/// A scratch directory under target/ for one batch.
pub fn scratch_dir(label: &str) -> PathBuf {
    let dir = workspace_root()
        .join("target/skiff-tests")
        .join(format!("{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

const HEARTBEAT_INTERVAL_S: u64 = 5;
/// A test host whose heartbeat is older than this is hung.
const HEARTBEAT_LIMIT_S: u64 = 120;
/// Test hosts a batch gets: one that hangs is reported (see
/// [`hung_host_report`]) and replaced by a fresh one. QEMU's TCG (7.2 and
/// 10.0 alike) at times does not take the test host's own timer interrupt
/// while a nested guest runs, so a guest vCPU spinning on a lock that its
/// other vCPU holds hangs it. A VM that fails is never retried.
const HOST_ATTEMPTS: u32 = 3;
/// Time a test host gets to boot and start its heartbeat.
const HOST_BOOT_LIMIT_S: u64 = 300;
/// A heartbeat older than this (four beats missed) gets the test host a
/// nudge through the QEMU monitor, and another every [`NUDGE_EVERY_S`]
/// while it stays late, taking turns through [`NUDGES`]. A hung test host
/// spins in a nested guest and takes neither its own timer interrupt nor
/// an NMI (README, Where VM tests run); what brings one back, if anything,
/// goes into the batch's stall lines.
const NUDGE_AFTER_S: u64 = 20;
const NUDGE_EVERY_S: u64 = 10;
/// What a stalled test host is sent, in turn: a key press on its PS/2
/// keyboard first (a device interrupt through the IOAPIC makes QEMU's
/// local APIC re-evaluate what it has pending, which hung test hosts were
/// seen to need: their timer vector waiting in IRR, untaken, where neither
/// of the others helped), then an NMI, then a stop and continue of its
/// emulated CPU (which leaves and re-enters QEMU's execution loop).
const NUDGES: [(&str, &str); 3] = [
    ("a key press", "sendkey shift\n"),
    ("NMI", "nmi\n"),
    ("stop and cont", "stop\ncont\n"),
];

/// How a batch treats its test hosts.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// Test hosts the batch gets: a hung one is reported and replaced
    /// until this many have hung.
    pub host_attempts: u32,
    /// Whether a late heartbeat gets the test host nudges (see
    /// [`NUDGE_AFTER_S`]); `SKIFF_TEST_HOST_NUDGE=off` turns them off.
    pub nudge: bool,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            host_attempts: HOST_ATTEMPTS,
            nudge: std::env::var("SKIFF_TEST_HOST_NUDGE").as_deref() != Ok("off"),
        }
    }
}

/// A batch's outcome, with what happened to its test hosts.
#[derive(Debug, Clone)]
pub struct Batch {
    /// One outcome per spec, in order; `None` when every test host the
    /// batch was given hung.
    pub outcomes: Option<Vec<VmOutcome>>,
    /// Test hosts that hung (no heartbeat for [`HEARTBEAT_LIMIT_S`]) and were
    /// killed.
    pub hung_hosts: u32,
    /// One line per stall the test host came out of: how long its heartbeat
    /// was late and the nudge sent last (`unstuck by NMI after 31 s`).
    pub stalls: Vec<String>,
}

enum BatchEnd {
    /// The batch ran to its end: the runner's status and output.
    Finished(std::process::ExitStatus, String),
    /// The test host stopped responding and was killed.
    HostHung(String),
}

/// A late heartbeat being watched.
struct Stall {
    /// The last heartbeat before the stall.
    last_beat: std::time::SystemTime,
    /// Where the emulated CPU was when the stall was seen.
    cpu: String,
    /// Nudges sent, and when the last one was.
    nudges: u32,
    last_nudge: Option<Instant>,
}

/// Runs the batch script directly or in the test host, watching the test
/// host's heartbeat.
fn run_script(
    mode: Mode,
    dir: &Path,
    script: &Path,
    host_memory_mib: u64,
    total_timeout: u64,
    opts: &BatchOptions,
    stalls: &mut Vec<String>,
) -> BatchEnd {
    let out_path = dir.join("runner.out");
    let out = std::fs::File::create(&out_path).expect("create runner output file");
    let mut cmd = match mode {
        Mode::Direct => {
            let mut c = Command::new("timeout");
            c.arg(total_timeout.to_string()).arg("sh").arg(script);
            c
        }
        Mode::TestHost => {
            let mut c = Command::new(workspace_root().join("tests/host/run"));
            // One vCPU: TCG's SVM emulation is not reliable under SMP load
            // (the test host or its guests triple-fault after a while).
            c.args(["--cpus", "1", "--memory", &host_memory_mib.to_string()])
                .args(["--timeout", &total_timeout.to_string()])
                // For the report on a test host that stops responding.
                .arg("--monitor")
                .arg(dir.join("monitor.sock"))
                .arg("--console")
                .arg(dir.join("host-console.log"))
                // The workspace (binaries, scratch) and the fixture cache
                // must be visible even where they live under /tmp, which
                // the test host covers with a fresh tmpfs.
                .arg("--share")
                .arg(workspace_root())
                .arg("--share")
                .arg(cache_dir())
                .arg("--")
                .arg("sh")
                .arg(script);
            c
        }
    };
    let mut child = cmd
        .stdout(out.try_clone().expect("dup output file"))
        .stderr(out)
        .spawn()
        .expect("start the batch");
    let started = Instant::now();
    let heartbeat = dir.join("heartbeat");
    let read_output = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let mut stall: Option<Stall> = None;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the batch") {
            return BatchEnd::Finished(status, read_output());
        }
        let beat = std::fs::metadata(&heartbeat)
            .and_then(|m| m.modified())
            .ok();
        let age = beat.and_then(|b| b.elapsed().ok()).map(|a| a.as_secs());
        let hung = match age {
            Some(age) => age > HEARTBEAT_LIMIT_S,
            None => started.elapsed().as_secs() > HOST_BOOT_LIMIT_S,
        };
        if mode == Mode::TestHost {
            if let (Some(beat), Some(age)) = (beat, age) {
                match stall.as_mut() {
                    Some(s) if beat > s.last_beat => {
                        // The heartbeat came back.
                        let late = beat
                            .duration_since(s.last_beat)
                            .map_or(0, |d| d.as_secs())
                            .saturating_sub(HEARTBEAT_INTERVAL_S);
                        let line = match s.nudges {
                            0 => format!("test host heartbeat {late} s late, resumed by itself"),
                            n => format!(
                                "test host unstuck by {} after {late} s ({n} nudge(s) sent); its CPU when the heartbeat was {NUDGE_AFTER_S} s late:\n{}",
                                NUDGES[(n as usize - 1) % NUDGES.len()].0,
                                s.cpu
                            ),
                        };
                        // Straight to stderr, past the test harness's capture.
                        let _ = std::io::Write::write_all(
                            &mut std::io::stderr(),
                            format!("[{}] {line}\n", dir.display()).as_bytes(),
                        );
                        stalls.push(line);
                        stall = None;
                    }
                    Some(s) => {
                        let due = s
                            .last_nudge
                            .is_none_or(|t| t.elapsed().as_secs() >= NUDGE_EVERY_S);
                        if opts.nudge && due && !hung {
                            let (_, commands) = NUDGES[s.nudges as usize % NUDGES.len()];
                            let _ = monitor_command(dir, commands);
                            s.nudges += 1;
                            s.last_nudge = Some(Instant::now());
                        }
                    }
                    None if age > NUDGE_AFTER_S => {
                        let cpu = monitor_command(dir, "info registers\n")
                            .map(|r| {
                                r.lines()
                                    .filter(|l| l.starts_with("RIP=") || l.starts_with("EFER="))
                                    .collect::<Vec<_>>()
                                    .join("\n")
                            })
                            .unwrap_or_else(|e| format!("(no monitor: {e})"));
                        stall = Some(Stall {
                            last_beat: beat,
                            cpu,
                            nudges: 0,
                            last_nudge: None,
                        });
                        continue;
                    }
                    None => {}
                }
            }
        }
        if hung && mode == Mode::TestHost {
            let mut report = hung_host_report(dir);
            if let Some(s) = &stall {
                let _ = writeln!(
                    report,
                    "nudges sent while the heartbeat was late: {} (each of {}, in turn; none brought it back)",
                    s.nudges,
                    NUDGES.map(|n| n.0).join(", ")
                );
            }
            // tests/host/run kills its QEMU when terminated.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
            return BatchEnd::HostHung(format!("{}\n{report}", read_output()));
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Sends `commands` (lines) to the test host's QEMU monitor and returns its
/// replies, read until it has been quiet for 3 s.
fn monitor_command(dir: &Path, commands: &str) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    let mut mon = std::os::unix::net::UnixStream::connect(dir.join("monitor.sock"))
        .map_err(|e| e.to_string())?;
    let _ = mon.set_read_timeout(Some(std::time::Duration::from_secs(3)));
    mon.write_all(commands.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    while let Ok(n) = mon.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    // The monitor echoes each command line, with terminal escapes, after a
    // "(qemu)" prompt: keep only the replies.
    let mut replies = String::new();
    for line in String::from_utf8_lossy(&buf).lines() {
        if !line.starts_with("(qemu)") && !line.starts_with("QEMU ") {
            replies.push_str(line.trim_end());
            replies.push('\n');
        }
    }
    Ok(replies)
}

/// What a hung test host's emulated CPU is doing: its registers, next
/// instructions and local APIC, sampled twice a few seconds apart through
/// the QEMU monitor (an unchanged RIP is a spin, a halted CPU a lost
/// wakeup, a vector left in IRR an interrupt never taken), and the end of
/// its kernel console (soft lockup and RCU stall reports).
fn hung_host_report(dir: &Path) -> String {
    let mut report = String::from("--- the hung test host, seen through the QEMU monitor ---\n");
    for sample in 1..=2 {
        if sample > 1 {
            std::thread::sleep(std::time::Duration::from_secs(3));
        }
        let _ = writeln!(report, "sample {sample}:");
        match monitor_command(dir, "info cpus\ninfo registers -a\nx/8i $pc\ninfo lapic\n") {
            Err(e) => {
                let _ = writeln!(report, "(no monitor: {e})");
            }
            Ok(replies) => report.push_str(&replies),
        }
    }
    report.push_str(&name_addresses(&report, &symbol_maps(dir)));
    let console = std::fs::read_to_string(dir.join("host-console.log")).unwrap_or_default();
    let _ = writeln!(
        report,
        "--- the end of the test host's kernel console ---\n{}",
        last_lines(&console, 60)
    );
    report
}

/// The symbol tables a hung test host's instruction pointers may fall in:
/// the emulated CPU is either in the test host's own kernel or in a nested
/// guest's, the microVM kernel (built without KASLR; its System.map is kept
/// with the kernel build). The monitor cannot tell which, so each is
/// tried. The test host's symbols come from its /proc/kallsyms, saved by
/// the batch script: the kernel's own once per release (moved by this
/// boot's KASLR offset, from the `_text` saved with the batch) and the
/// modules', kvm_amd among them, with every batch.
fn symbol_maps(dir: &Path) -> Vec<(String, String)> {
    let mut maps = Vec::new();
    let batch = std::fs::read_to_string(dir.join("modules.kallsyms")).unwrap_or_default();
    let mut host = String::new();
    if let Ok(entries) = std::fs::read_dir(cache_dir().join("testhost")) {
        let mut found: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("kallsyms-"))
            })
            .collect();
        found.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        if let (Some(p), Some(text)) = (found.pop(), symbol_address(&batch, "_text")) {
            host = relocate(&std::fs::read_to_string(p).unwrap_or_default(), text);
        }
    }
    host.push_str(&batch);
    if !host.is_empty() {
        maps.push(("the test host's kernel".to_owned(), host));
    }
    let microvm = cache_dir().join("kernel-build/src/System.map");
    if let Ok(map) = std::fs::read_to_string(microvm) {
        maps.push(("the microVM kernel".to_owned(), map));
    }
    maps
}

/// The symbols of `map` (System.map or kallsyms text): address, type
/// letter, name; lines that do not parse are skipped.
fn symbols(map: &str) -> impl Iterator<Item = (u64, &str, &str)> {
    map.lines().filter_map(|l| {
        let mut f = l.split_whitespace();
        let addr = u64::from_str_radix(f.next()?, 16).ok()?;
        Some((addr, f.next()?, f.next()?))
    })
}

/// The address of symbol `name` in `map`.
fn symbol_address(map: &str, name: &str) -> Option<u64> {
    symbols(map).find_map(|(addr, _, n)| (n == name).then_some(addr))
}

/// `map` (kallsyms text) moved so that its `_text` lies at `text`.
fn relocate(map: &str, text: u64) -> String {
    let Some(old) = symbol_address(map, "_text") else {
        return String::new();
    };
    let delta = text.wrapping_sub(old);
    let mut out = String::with_capacity(map.len());
    for line in map.lines() {
        if let Some((addr, rest)) = line.split_once(' ') {
            if let Ok(a) = u64::from_str_radix(addr, 16) {
                let _ = writeln!(out, "{:016x} {rest}", a.wrapping_add(delta));
            }
        }
    }
    out
}

/// `addr` as `symbol+0xoffset` in `map` (System.map text): the nearest
/// code symbol at or below it, within 64 KiB.
fn symbolize(map: &str, addr: u64) -> Option<String> {
    symbols(map)
        .filter(|(a, kind, _)| *a <= addr && matches!(*kind, "t" | "T" | "w" | "W"))
        // The first of several names at one address, as the map lists them.
        .reduce(|best, s| if s.0 > best.0 { s } else { best })
        .map(|(a, _, name)| (a, name))
        .filter(|(a, _)| addr - a < 0x1_0000)
        .map(|(a, name)| format!("{name}+{:#x}", addr - a))
}

/// A line per distinct `RIP=` in `report`, named in each of `maps`.
fn name_addresses(report: &str, maps: &[(String, String)]) -> String {
    let mut seen = Vec::new();
    for word in report.split_whitespace() {
        if let Some(addr) = word
            .strip_prefix("RIP=")
            .and_then(|a| u64::from_str_radix(a, 16).ok())
        {
            if !seen.contains(&addr) {
                seen.push(addr);
            }
        }
    }
    let mut out = String::new();
    for addr in seen {
        let names: Vec<String> = maps
            .iter()
            .map(|(what, map)| {
                format!(
                    "{} in {what}",
                    symbolize(map, addr).unwrap_or_else(|| "nothing".into())
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "RIP {addr:016x}: {}",
            if names.is_empty() {
                "no System.map to name it".to_owned()
            } else {
                names.join("; ")
            }
        );
    }
    out
}

/// Runs `specs` one after another, in the test host or directly (see
/// [`mode`]), and returns their outcomes in order. `host_memory_mib` sizes
/// the test host: give it room for the largest guest.
pub fn run_batch(label: &str, host_memory_mib: u64, specs: &[VmSpec]) -> Vec<VmOutcome> {
    let opts = BatchOptions::default();
    match run_batch_with(label, host_memory_mib, specs, &opts).outcomes {
        Some(outcomes) => outcomes,
        None => panic!(
            "[{label}] the test host stopped responding {} times",
            opts.host_attempts
        ),
    }
}

/// [`run_batch`] with its test host handling spelt out; reports hung and
/// stalled test hosts instead of failing on them.
pub fn run_batch_with(
    label: &str,
    host_memory_mib: u64,
    specs: &[VmSpec],
    opts: &BatchOptions,
) -> Batch {
    let dir = scratch_dir(label);
    let mode = mode();
    let vmm = skiff_vmm();
    let mut script = String::from("#!/bin/sh\n# generated by the skiff test harness\n");
    // A heartbeat lets the harness tell a hung test host from a slow VM.
    let _ = writeln!(
        script,
        "( while :; do date +%s > '{}/heartbeat'; sleep {HEARTBEAT_INTERVAL_S}; done ) & heartbeat=$!",
        dir.display()
    );
    // `SKIFF_SECCOMP=log` runs every skiff-vmm of the suite with logging
    // seccomp filters (the way their allow-lists are checked); the kernel
    // records each call outside a list, collected after the batch. Only
    // inside the test host is its printk rate limit lifted, so none is lost.
    if let Ok(seccomp) = std::env::var("SKIFF_SECCOMP") {
        let _ = writeln!(script, "export SKIFF_SECCOMP={}", shell_quote(&seccomp));
        if mode == Mode::TestHost {
            let _ = writeln!(script, "sysctl -qw kernel.printk_ratelimit=0");
        }
    }
    if mode == Mode::TestHost {
        // Symbols to name a hung test host's instruction pointer with.
        let _ = writeln!(
            script,
            "k={}/kallsyms-$(uname -r); [ -s \"$k\" ] || {{ grep -v '\\[' /proc/kallsyms > \"$k.$$\" && mv \"$k.$$\" \"$k\"; }}",
            shell_quote(&cache_dir().join("testhost").display().to_string())
        );
        let _ = writeln!(
            script,
            "grep -e '\\[' -e ' _text$' /proc/kallsyms > '{}/modules.kallsyms'",
            dir.display()
        );
        // A guest starved of its timer interrupts: what the test host's KVM
        // held for its timers then (host-timer-state.txt).
        let _ = writeln!(
            script,
            "sh {} '{}' & timer_watch=$!",
            shell_quote(
                &Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("host/timer-watch")
                    .display()
                    .to_string()
            ),
            dir.display()
        );
    }
    for (i, spec) in specs.iter().enumerate() {
        let args: Vec<String> = spec.args.iter().map(|a| shell_quote(a)).collect();
        let out = format!("{}/{i}.serial", dir.display());
        let err = format!("{}/{i}.log", dir.display());
        let status = format!("{}/{i}.status", dir.display());
        let run = format!(
            "timeout -k 10 {} {} {}",
            spec.timeout_s,
            shell_quote(&spec.program.as_ref().unwrap_or(&vmm).display().to_string()),
            args.join(" ")
        );
        let _ = writeln!(script, "echo \"skiff-tests: run {i} ({})\" >&2", spec.name);
        match &spec.sigterm_after {
            None => {
                let _ = writeln!(script, "{run} > '{out}' 2> '{err}' < /dev/null");
                let _ = writeln!(script, "echo $? > '{status}'");
            }
            Some(marker) => {
                let _ = writeln!(script, "{run} > '{out}' 2> '{err}' < /dev/null &");
                let _ = writeln!(script, "pid=$!; n=0");
                let _ = writeln!(
                    script,
                    "while ! grep -qF {} '{out}' && [ $n -lt {} ] && kill -0 $pid 2>/dev/null; do sleep 0.2; n=$((n+1)); done",
                    shell_quote(marker),
                    spec.timeout_s * 5
                );
                let _ = writeln!(script, "kill -TERM $pid; wait $pid; echo $? > '{status}'");
            }
        }
    }
    if mode == Mode::TestHost {
        // The test host's whole kernel log: its console shows errors only,
        // and what its clocks and KVM said (a clocksource marked unstable,
        // KVM's complaints) explains guests that run slow in it. The
        // seccomp audit records come from it.
        let _ = writeln!(
            script,
            "dmesg > '{d}/host-dmesg.log' 2>&1; grep 'type=1326' '{d}/host-dmesg.log' > '{d}/seccomp-audit.log'",
            d = dir.display()
        );
    } else {
        let _ = writeln!(
            script,
            "dmesg 2>/dev/null | grep 'type=1326' > '{}/seccomp-audit.log'",
            dir.display()
        );
    }
    let _ = writeln!(script, "kill $heartbeat");
    if mode == Mode::TestHost {
        let _ = writeln!(script, "kill $timer_watch 2>/dev/null");
    }
    let script_path = dir.join("batch.sh");
    std::fs::write(&script_path, script).expect("write batch script");

    let started = Instant::now();
    eprintln!(
        "[{label}] running {} VM(s) {}",
        specs.len(),
        match mode {
            Mode::Direct => "directly on /dev/kvm".to_owned(),
            Mode::TestHost => format!("in the test host ({host_memory_mib} MiB)"),
        }
    );
    let total_timeout: u64 = specs.iter().map(|s| s.timeout_s + 15).sum::<u64>() + 120;
    let mut attempt = 1;
    let mut stalls = Vec::new();
    let (status, host_output) = loop {
        for i in 0..specs.len() {
            for ext in ["status", "serial", "log"] {
                let _ = std::fs::remove_file(dir.join(format!("{i}.{ext}")));
            }
        }
        let _ = std::fs::remove_file(dir.join("heartbeat"));
        match run_script(
            mode,
            &dir,
            &script_path,
            host_memory_mib,
            total_timeout,
            opts,
            &mut stalls,
        ) {
            BatchEnd::Finished(status, output) => break (status, output),
            BatchEnd::HostHung(output) => {
                let mut text = format!(
                    "[{label}] the test host stopped responding (no heartbeat for {HEARTBEAT_LIMIT_S} s), \
                     test host {attempt} of {} at most; its output:\n{output}",
                    opts.host_attempts
                );
                // Where each VM of the batch was when the test host stopped.
                for (i, spec) in specs.iter().enumerate() {
                    for ext in ["log", "serial"] {
                        let Ok(bytes) = std::fs::read(dir.join(format!("{i}.{ext}"))) else {
                            continue;
                        };
                        let _ = writeln!(
                            text,
                            "--- run {i} ({}), the end of its {ext} ---\n{}",
                            spec.name,
                            last_lines(&String::from_utf8_lossy(&bytes), 20)
                        );
                    }
                }
                let saved = dir.join(format!("host-hang-{attempt}.txt"));
                let _ = std::fs::write(&saved, &text);
                if attempt >= opts.host_attempts {
                    let _ = std::io::Write::write_all(
                        &mut std::io::stderr(),
                        format!("{text}\n[{label}] (saved in {})\n", saved.display()).as_bytes(),
                    );
                    return Batch {
                        outcomes: None,
                        hung_hosts: attempt,
                        stalls,
                    };
                }
                // Straight to stderr, past the test harness's output capture:
                // a hung test host is news even when the next one passes.
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    format!(
                        "{text}\n[{label}] (saved in {}) starting the batch again in a fresh test host \
                         ({} of {}).\n",
                        saved.display(),
                        attempt + 1,
                        opts.host_attempts
                    )
                    .as_bytes(),
                );
                attempt += 1;
            }
        }
    };
    eprintln!(
        "[{label}] batch finished in {:.1?} with {status}",
        started.elapsed(),
    );
    let outcomes: Vec<VmOutcome> = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let read = |ext: &str| {
                std::fs::read(dir.join(format!("{i}.{ext}")))
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default()
            };
            VmOutcome {
                name: spec.name.clone(),
                status: read("status").trim().parse().ok(),
                serial: read("serial"),
                log: read("log"),
            }
        })
        .collect();
    if outcomes.iter().any(|o| o.status.is_none()) {
        panic!("[{label}] the batch did not complete ({status}); its output:\n{host_output}");
    }
    Batch {
        outcomes: Some(outcomes),
        hung_hosts: attempt - 1,
        stalls,
    }
}

/// A `skiff test ARGS` run through `sh`, with its output (stdout and
/// stderr) as the outcome's serial text. Afterwards the script reports
/// `exit=N`, any skiff-vmm still running from this run and anything left in
/// its TMPDIR (state dirs, sockets). The run's snapshot cache is in that
/// TMPDIR too, so every run starts with none (`env` may name another).
pub fn skiff_run(name: &str, args: &str, out_dir: &Path, timeout_s: u64) -> VmSpec {
    skiff_run_env(name, "", args, out_dir, timeout_s)
}

/// [`skiff_run`] with more environment (`VAR=value ...`, shell-quoted).
pub fn skiff_run_env(name: &str, env: &str, args: &str, out_dir: &Path, timeout_s: u64) -> VmSpec {
    let tmp = format!("/tmp/skiff-t-{name}-{}", std::process::id());
    let script = format!(
        "cd {ws} && rm -rf {tmp} && mkdir -p {tmp} && \
         SKIFF_GUEST={guest} TMPDIR={tmp} SKIFF_SNAPSHOTS={tmp}/snapshots NO_COLOR=1 {env} \
         {skiff} test {args} -o {out} 2>&1; \
         echo \"exit=$?\"; \
         for p in $(pgrep -x skiff-vmm) $(pgrep -x skiff); do \
           tr '\\0' ' ' < /proc/$p/cmdline | grep -qF {tmp} && echo \"LEFTOVER-PROCESS $p\"; \
         done; \
         ls -A {tmp} | grep -vx snapshots | sed 's/^/LEFTOVER-STATE /'; \
         rm -rf {tmp}",
        ws = shell_quote(&workspace_root().display().to_string()),
        guest = shell_quote(&cache_dir().join("guest").display().to_string()),
        skiff = shell_quote(&skiff_driver().display().to_string()),
        out = shell_quote(&out_dir.display().to_string()),
    );
    VmSpec::shell(name, script, timeout_s)
}

/// The `exit=N` a [`skiff_run`] reported.
pub fn exit_of(o: &VmOutcome) -> i32 {
    o.serial
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("exit="))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no exit status in the output of {}:\n{}", o.name, o.serial))
}

/// Asserts that a [`skiff_run`] left no process or state behind.
pub fn assert_clean(o: &VmOutcome) {
    assert!(
        !o.serial.contains("LEFTOVER-"),
        "{}: skiff left a process or state behind:\n{}",
        o.name,
        o.serial
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::os::unix::net::UnixListener;

    /// A monitor that answers each connection like QEMU's: a banner, then
    /// for each command line its echo after a prompt and a canned reply.
    fn fake_monitor(dir: &Path, connections: usize) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(dir.join("monitor.sock")).expect("bind");
        std::thread::spawn(move || {
            for _ in 0..connections {
                let (stream, _) = listener.accept().expect("accept");
                let mut out = stream.try_clone().expect("clone");
                let _ =
                    out.write_all(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n");
                for line in BufReader::new(stream).lines() {
                    let Ok(cmd) = line else { break };
                    let reply = match cmd.as_str() {
                        "info registers -a" => "CPU#0\r\nRIP=ffffffff81567c83 RFL=00000002 HLT=0",
                        "info lapic" => "IRR\t 236",
                        _ => "* CPU #0: thread_id=1",
                    };
                    let echo = format!("(qemu) \x1b[K{cmd}\x1b[D\r\n{reply}\r\n");
                    let _ = out.write_all(echo.as_bytes());
                }
            }
        })
    }

    #[test]
    fn hung_host_report_keeps_the_monitor_replies_and_the_console_end() {
        let dir = std::env::temp_dir().join(format!("skiff-hung-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let console: String = (1..=100).map(|i| format!("console line {i}\n")).collect();
        std::fs::write(dir.join("host-console.log"), console).unwrap();
        let monitor = fake_monitor(&dir, 2);
        let report = hung_host_report(&dir);
        monitor.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);

        assert_eq!(
            report.matches("RIP=ffffffff81567c83").count(),
            2,
            "{report}"
        );
        assert_eq!(report.matches("IRR\t 236").count(), 2, "{report}");
        assert!(report.contains("sample 2:"), "{report}");
        assert!(
            !report.contains("(qemu)") && !report.contains("QEMU 7.2"),
            "{report}"
        );
        assert!(report.contains("console line 100"), "{report}");
        assert!(report.contains("console line 41\n"), "{report}");
        assert!(!report.contains("console line 40\n"), "{report}");
    }

    #[test]
    fn hung_host_addresses_are_named_in_each_kernel() {
        let host = "ffffffff81000000 T _text\nffffffff81567c60 T queued_spin_lock_slowpath\n\
                    ffffffff81567d00 t other\nffffffff82000000 D some_data\n";
        let guest = "ffffffff81000000 T _text\nffffffff81567c80 W native_safe_halt\n";
        let maps = [
            ("the test host's kernel".to_owned(), host.to_owned()),
            ("the microVM kernel".to_owned(), guest.to_owned()),
        ];
        let report =
            "RIP=ffffffff81567c83 RFL=00000002\nRIP=ffffffff81567c83\nRIP=ffffffff82000010\n";
        assert_eq!(
            name_addresses(report, &maps),
            "RIP ffffffff81567c83: queued_spin_lock_slowpath+0x23 in the test host's kernel; \
             native_safe_halt+0x3 in the microVM kernel\n\
             RIP ffffffff82000010: nothing in the test host's kernel; nothing in the microVM kernel\n"
        );
        assert_eq!(
            name_addresses("RIP=0000000000001000", &[]),
            "RIP 0000000000001000: no System.map to name it\n"
        );
    }

    #[test]
    fn the_test_host_kernel_symbols_follow_its_kaslr_offset() {
        let cached = "ffffffff81000000 T _text\nffffffff81a592e0 t native_safe_halt\n";
        let batch = "ffffffff9e200000 T _text\nffffffffc0343780 t svm_vcpu_run\t[kvm_amd]\n";
        assert_eq!(symbol_address(batch, "_text"), Some(0xffffffff9e200000));
        let moved = relocate(cached, 0xffffffff9e200000);
        assert_eq!(
            symbolize(&moved, 0xffffffff9ec592eb).as_deref(),
            Some("native_safe_halt+0xb")
        );
        assert_eq!(
            symbolize(batch, 0xffffffffc0343790).as_deref(),
            Some("svm_vcpu_run+0x10")
        );
        assert_eq!(relocate("no text here\n", 0), "");
    }

    #[test]
    fn hung_host_report_says_when_there_is_no_monitor() {
        let dir = std::env::temp_dir().join(format!("skiff-no-monitor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let report = hung_host_report(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(report.matches("(no monitor:").count(), 2, "{report}");
    }
}
