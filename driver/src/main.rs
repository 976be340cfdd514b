//! `skiff`: runs NixOS-style VM tests on skiff-vmm.

mod description;
mod machine;
mod network;
mod python;
mod qmp;
mod report;
mod shell;
mod snapshots;
mod suite;
mod switch;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use description::Description;
use machine::Machine;
use network::Switches;
use report::logger;

#[derive(Parser)]
#[command(
    name = "skiff",
    version,
    about = "Fast, headless NixOS-style VM tests on skiff-vmm"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run test descriptions (JSON or TOML) and their Python test scripts.
    Test(TestArgs),
    /// Run one VLAN switch on a unix socket until SIGINT or SIGTERM, then
    /// print its counters.
    Switch(switch::SwitchArgs),
    /// List or prune the snapshot cache (nodes saved once booted, restored
    /// by later runs) [$SKIFF_SNAPSHOTS, else $SKIFF_CACHE/snapshots, else
    /// ~/.cache/skiff/snapshots].
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Every snapshot: key, node, size on disk, last use.
    List,
    /// Remove the least recently used snapshots until the rest fit.
    Prune {
        /// The size to keep to, in MiB (0 removes every snapshot).
        #[arg(long, value_name = "MIB", default_value_t = snapshots::DEFAULT_MAX_BYTES >> 20)]
        max_size: u64,
    },
}

fn run_snapshot(cmd: &SnapshotCmd) -> Result<u8> {
    let cache = snapshots::Cache::new(snapshots::Cache::default_dir());
    match cmd {
        SnapshotCmd::List => {
            let entries = cache.list();
            println!("{}: {} snapshot(s)", cache.dir().display(), entries.len());
            let mut total = 0;
            for e in &entries {
                let age = e.used.elapsed().map_or(0, |d| d.as_secs());
                println!(
                    "{}  {:<16} {:>7.1} MiB  used {age} s ago",
                    e.key,
                    e.node,
                    e.bytes as f64 / (1 << 20) as f64
                );
                total += e.bytes;
            }
            println!("total {:.1} MiB", total as f64 / (1 << 20) as f64);
        }
        SnapshotCmd::Prune { max_size } => {
            let removed = cache.prune(max_size.saturating_mul(1 << 20));
            for e in &removed {
                println!(
                    "removed {} ({}, {:.1} MiB)",
                    e.key,
                    e.node,
                    e.bytes as f64 / (1 << 20) as f64
                );
            }
            println!("{} snapshot(s) removed", removed.len());
        }
    }
    Ok(0)
}

#[derive(Args, Clone)]
pub struct TestArgs {
    /// Test descriptions; several run in parallel (see --jobs).
    #[arg(required = true, value_name = "DESCRIPTION")]
    descriptions: Vec<PathBuf>,
    /// Use this test script instead of the description's (one test only).
    #[arg(long, value_name = "FILE")]
    script: Option<PathBuf>,
    /// Where logs, reports and copied files go [default: ./skiff-out/<test-name>;
    /// with several tests, ./skiff-out/ holds one directory per test].
    #[arg(long, short = 'o', value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Keep the state directory (sockets) after the run.
    #[arg(long, short = 'K')]
    keep_state: bool,
    /// Open a Python REPL with the machines defined and none started.
    #[arg(long, short = 'I')]
    interactive: bool,
    /// Tests to run at once [default: what fits the host's cores and memory].
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,
    /// Stop the whole run after this many seconds [default: the
    /// description's global_timeout, else 3600].
    #[arg(long, value_name = "SECONDS")]
    global_timeout: Option<u64>,
    /// The skiff-vmm binary [default: next to skiff, else on PATH].
    #[arg(long, value_name = "PATH", env = "SKIFF_VMM")]
    vmm: Option<PathBuf>,
    /// Capture every VLAN's frames to vlan<N>.pcap in the output directory.
    #[arg(long)]
    pcap: bool,
    /// Boot every node cold: neither restore nor save snapshots.
    #[arg(long)]
    no_snapshot: bool,
}

fn find_vmm(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            bail!("skiff-vmm {} does not exist", p.display());
        }
        // VMMs start in their state directory: a relative path would break.
        return p
            .canonicalize()
            .with_context(|| format!("resolving {}", p.display()));
    }
    let exe = std::env::current_exe().context("finding the skiff binary")?;
    if let Some(dir) = exe.parent() {
        let p = dir.join("skiff-vmm");
        if p.is_file() {
            return Ok(p);
        }
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("skiff-vmm");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("cannot find skiff-vmm next to skiff or on PATH; pass --vmm PATH")
}

fn state_root(test_name: &str) -> Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    for (dir, pid) in remove_stale_state(&base, std::process::id()) {
        logger().log(
            None,
            &format!(
                "removed {}, the state directory of a skiff run (pid {pid}) that ended without cleaning up",
                dir.display()
            ),
        );
    }
    let dir = base.join(format!("skiff-{}-{test_name}", std::process::id()));
    // Owner only: it holds the VMs' monitor and console sockets.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))?;
    Ok(dir)
}

/// Removes the state directories (`skiff-<pid>-<test>`) in `base` of
/// runs whose process is gone (a driver killed with SIGKILL cannot clean
/// up; its VMMs died with it, PR_SET_PDEATHSIG). Only directories this
/// user owns; a pid that runs again (reused) keeps its directory. Returns
/// what it removed.
fn remove_stale_state(base: &Path, own_pid: u32) -> Vec<(PathBuf, u32)> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("skiff-"))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let owned_dir = std::fs::symlink_metadata(e.path())
            .is_ok_and(|m| m.is_dir() && std::os::unix::fs::MetadataExt::uid(&m) == uid);
        if pid == own_pid || !owned_dir || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if std::fs::remove_dir_all(e.path()).is_ok() {
            removed.push((e.path(), pid));
        }
    }
    removed
}

/// Runs one test in this process; returns its exit status.
fn run_one(args: &TestArgs, path: &Path) -> Result<u8> {
    let desc = Description::load(path, args.script.as_deref())?;
    // A script that does not compile fails before any VM starts.
    if let Err(e) = python::check_syntax(&desc.script, &desc.script_name) {
        bail!("the test script has a syntax error: {}", e.0);
    }
    let vmm = find_vmm(args.vmm.as_deref())?;
    let out_dir = match &args.output_dir {
        Some(d) => d.clone(),
        None => PathBuf::from("skiff-out").join(&desc.name),
    };
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("creating the output directory {}", out_dir.display()))?;
    let out_dir = out_dir.canonicalize()?;
    logger()
        .open(&desc.name, &out_dir)
        .with_context(|| format!("writing the event log in {}", out_dir.display()))?;
    machine::catch_signals(args.interactive).context("installing signal handlers")?;
    let state = state_root(&desc.name)?;
    let machines: Vec<(Machine, String)> = desc
        .nodes
        .values()
        .map(|n| {
            (
                Machine::new(n.with_network(&state), vmm.clone(), &state, &out_dir),
                n.python_name.clone(),
            )
        })
        .collect();
    if !args.no_snapshot {
        let cache = snapshots::Cache::new(snapshots::Cache::default_dir());
        for (m, _) in &machines {
            m.use_snapshots(cache.clone());
        }
    }
    logger().log(
        None,
        &format!(
            "test {}: {} machine(s), output in {}",
            desc.name,
            machines.len(),
            out_dir.display()
        ),
    );
    for n in desc.nodes.values() {
        logger().log(Some(&n.name), &network::summary(n.number, &n.nics));
    }
    if args.keep_state {
        logger().log(None, &format!("state kept in {}", state.display()));
    } else {
        logger().log(
            None,
            "Machine state will be reset. To keep it, pass --keep-state",
        );
    }

    // The switches run from before the first VM starts until after the
    // last one stopped; whoever stops the VMs stops them.
    let switches = match Switches::start(&desc.vlans, &state, args.pcap.then_some(&*out_dir)) {
        Ok(s) => Arc::new(Mutex::new(Some(s))),
        Err(e) => {
            let _ = logger().finish(Some(&e.to_string()));
            if !args.keep_state {
                let _ = std::fs::remove_dir_all(&state);
            }
            return Err(e.into());
        }
    };
    let stop_switches = |switches: &Mutex<Option<Switches>>| {
        let taken = switches.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut s) = taken {
            s.stop();
        }
    };
    let vlans = switches
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(Switches::vlans)
        .unwrap_or_default();

    // The global timeout stops everything, whatever the script is doing.
    let timeout = args.global_timeout.unwrap_or(desc.global_timeout);
    {
        let vms: Vec<Machine> = machines.iter().map(|(v, _)| v.clone()).collect();
        let state = state.clone();
        let keep = args.keep_state;
        let switches = switches.clone();
        std::thread::Builder::new()
            .name("global-timeout".into())
            .spawn(move || {
                std::thread::sleep(Duration::from_secs(timeout));
                logger().error(None, "timeout reached; test terminating...");
                for vm in &vms {
                    vm.release();
                }
                stop_switches(&switches);
                let _ = logger().finish(Some(&format!("global timeout of {timeout} s reached")));
                if !keep {
                    let _ = std::fs::remove_dir_all(&state);
                }
                std::process::exit(1);
            })?;
    }

    let vms: Vec<Machine> = machines.iter().map(|(v, _)| v.clone()).collect();
    let result = python::run(python::RunSpec {
        test_name: &desc.name,
        script: &desc.script,
        script_name: &desc.script_name,
        out_dir: &out_dir,
        state_dir: &state,
        interactive: args.interactive,
        machines,
        vlans,
    });
    for vm in &vms {
        vm.release();
    }
    stop_switches(&switches);
    if !args.keep_state {
        let _ = std::fs::remove_dir_all(&state);
    }
    let status = match &result {
        Ok(0) => {
            logger().finish(None)?;
            0
        }
        Ok(n) => {
            logger().finish(Some("the test script failed"))?;
            u8::try_from(*n).unwrap_or(1).max(1)
        }
        Err(e) => {
            logger().finish(Some(&e.to_string()))?;
            1
        }
    };
    result?;
    Ok(status)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Test(args) if args.descriptions.len() == 1 && args.jobs.is_none() => {
            run_one(&args, &args.descriptions[0])
        }
        Cmd::Test(args) => suite::run(&args),
        Cmd::Switch(args) => switch::run_standalone(&args),
        Cmd::Snapshot(cmd) => run_snapshot(&cmd),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("skiff: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_state_of_dead_runs_is_removed_and_no_other() {
        let base = std::env::temp_dir().join(format!("skiff-stale-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        // A pid that ran and is gone.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let own = std::process::id();
        let stale = base.join(format!("skiff-{dead}-web"));
        std::fs::create_dir_all(stale.join("vm-state-server")).unwrap();
        std::fs::write(stale.join("vm-state-server/qmp"), b"").unwrap();
        let mine = base.join(format!("skiff-{own}-web"));
        let alive = base.join("skiff-1-web");
        let other = base.join("skiff-notes");
        let file = base.join(format!("skiff-{dead}-file"));
        for d in [&mine, &alive, &other] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(&file, b"").unwrap();
        let removed = remove_stale_state(&base, own);
        assert_eq!(removed, vec![(stale.clone(), dead)]);
        assert!(!stale.exists());
        for p in [&mine, &alive, &other, &file] {
            assert!(p.exists(), "{} was removed", p.display());
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
