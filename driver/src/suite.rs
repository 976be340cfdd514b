//! Several tests at once: each runs in its own `skiff test` process (its
//! own interpreter and state dir), at most `--jobs` at a time, and a summary
//! table follows.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::description::Description;
use crate::TestArgs;

/// MemAvailable from /proc/meminfo, MiB.
fn available_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Tests that fit at once: one per core, and as many as guest memory plus
/// a margin per VM allows.
pub fn default_jobs(per_test_mib: u64, tests: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let by_memory = available_memory_mib()
        .map(|m| (m / per_test_mib.max(1)) as usize)
        .unwrap_or(cores);
    cores.min(by_memory).min(tests).max(1)
}

struct Entry {
    name: String,
    path: PathBuf,
    out_dir: PathBuf,
    /// Set when the description could not be read.
    error: Option<String>,
    result: Option<(String, Duration)>,
}

/// The lines of a failed test's log worth showing next to its verdict: the
/// error report (`!!!` lines) when there is one, else the log's last lines.
fn failure_excerpt(log: &str) -> Vec<&str> {
    const MAX: usize = 40;
    // Log lines start with a clock, then the text.
    let is_report = |l: &&str| {
        l.starts_with("!!!") || l.split_once(' ').is_some_and(|(_, t)| t.starts_with("!!!"))
    };
    let report: Vec<&str> = log.lines().filter(is_report).collect();
    let lines = if report.is_empty() {
        log.lines().collect()
    } else {
        report
    };
    lines[lines.len().saturating_sub(MAX)..].to_vec()
}

/// Runs every description; returns 0 when all passed.
pub fn run(args: &TestArgs) -> Result<u8> {
    if args.script.is_some() {
        bail!("--script works with one test description only");
    }
    if args.interactive {
        bail!("--interactive works with one test description only");
    }
    let root = args
        .output_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("skiff-out"));
    std::fs::create_dir_all(&root)
        .with_context(|| format!("creating the output directory {}", root.display()))?;
    let mut entries = Vec::new();
    let mut need_mib = 0;
    for path in &args.descriptions {
        let (name, error) = match Description::load(path, None) {
            Ok(d) => {
                need_mib = need_mib.max(d.memory_mib() + 128 * d.nodes.len() as u64);
                (d.name, None)
            }
            Err(e) => (
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| path.display().to_string()),
                Some(e.to_string()),
            ),
        };
        if entries.iter().any(|e: &Entry| e.name == name) {
            bail!("two test descriptions are both named {name:?}");
        }
        entries.push(Entry {
            out_dir: root.join(&name),
            name,
            path: path.clone(),
            error,
            result: None,
        });
    }
    let jobs = args
        .jobs
        .unwrap_or_else(|| default_jobs(need_mib, entries.len()))
        .max(1);
    let exe = std::env::current_exe().context("finding the skiff binary")?;
    eprintln!(
        "skiff: running {} test(s), {jobs} at a time; logs in {}/<test>/driver.log",
        entries.len(),
        root.display()
    );
    let started = Instant::now();
    let mut queue: VecDeque<usize> = (0..entries.len()).collect();
    let mut running: Vec<(usize, Child, Instant)> = Vec::new();
    loop {
        while running.len() < jobs {
            let Some(i) = queue.pop_front() else { break };
            let e = &mut entries[i];
            if let Some(err) = &e.error {
                eprintln!("skiff: {} ERROR {err}", e.name);
                e.result = Some(("error".into(), Duration::ZERO));
                continue;
            }
            std::fs::create_dir_all(&e.out_dir)?;
            let log = File::create(e.out_dir.join("driver.log"))?;
            let mut cmd = Command::new(&exe);
            cmd.arg("test")
                .arg(&e.path)
                .arg("--output-dir")
                .arg(&e.out_dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .env("NO_COLOR", "1");
            if args.keep_state {
                cmd.arg("--keep-state");
            }
            if args.no_snapshot {
                cmd.arg("--no-snapshot");
            }
            if args.pcap {
                cmd.arg("--pcap");
            }
            if let Some(t) = args.global_timeout {
                cmd.arg("--global-timeout").arg(t.to_string());
            }
            if let Some(v) = &args.vmm {
                cmd.arg("--vmm").arg(v);
            }
            let child = cmd
                .spawn()
                .with_context(|| format!("starting {}", exe.display()))?;
            eprintln!("skiff: {} started", e.name);
            running.push((i, child, Instant::now()));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut k = 0;
        while k < running.len() {
            if let Some(status) = running[k].1.try_wait()? {
                let (i, _, t0) = running.swap_remove(k);
                let took = t0.elapsed();
                let name = &entries[i].name;
                let secs = took.as_secs_f64();
                let verdict = if status.success() {
                    eprintln!("skiff: {name} passed in {secs:.1} s");
                    "passed"
                } else {
                    let log = entries[i].out_dir.join("driver.log");
                    eprintln!(
                        "skiff: {name} FAILED in {secs:.1} s (see {})",
                        log.display()
                    );
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    for line in failure_excerpt(&text) {
                        eprintln!("skiff: {name} | {line}");
                    }
                    "FAILED"
                };
                entries[i].result = Some((verdict.to_owned(), took));
            } else {
                k += 1;
            }
        }
    }
    let width = entries
        .iter()
        .map(|e| e.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<width$}  {:<7}  {:>9}", "test", "result", "seconds")?;
    let mut failed = 0;
    for e in &entries {
        let (verdict, took) = e.result.clone().unwrap_or(("error".into(), Duration::ZERO));
        if verdict != "passed" {
            failed += 1;
        }
        writeln!(
            out,
            "{:<width$}  {:<7}  {:>9.1}",
            e.name,
            verdict,
            took.as_secs_f64()
        )?;
    }
    writeln!(
        out,
        "{} passed, {failed} failed, {:.1} s in all with --jobs {jobs}",
        entries.len() - failed,
        started.elapsed().as_secs_f64()
    )?;
    Ok(u8::from(failed > 0))
}

#[cfg(test)]
mod tests {
    use super::failure_excerpt;

    #[test]
    fn a_failed_test_shows_its_error_report_or_its_last_lines() {
        let log = "02:01:00.1 client: starting vm\n02:01:00.2 !!! Traceback (most recent call last):\n!!!   x\nclient: exited\n02:01:00.3 !!! machine: client\n";
        assert_eq!(
            failure_excerpt(log),
            [
                "02:01:00.2 !!! Traceback (most recent call last):",
                "!!!   x",
                "02:01:00.3 !!! machine: client"
            ]
        );
        let long: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let tail = failure_excerpt(&long);
        assert_eq!(tail.len(), 40);
        assert_eq!(tail[0], "line 60");
        assert_eq!(tail[39], "line 99");
        assert!(failure_excerpt("").is_empty());
    }
}
