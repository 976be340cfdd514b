//! The test host's reproducer: rounds of the backdoor stress (1,000
//! commands, then MIB of output compared by SHA-256) in a busybox guest
//! with 2 vCPUs, each round in a test host of its own that is never
//! replaced, so a hung test host is a lost round. Under QEMU's TCG such a
//! guest, its two vCPUs contending for the hvc console's lock, is what hung
//! the test host (README, Where VM tests run).
//!
//! Not part of the suite (it is ignored); `tests/host/stress` runs it:
//! `SKIFF_STRESS_ROUNDS` (20), `SKIFF_STRESS_MIB` (16), `SKIFF_STRESS_CPUS`
//! (2), and `SKIFF_TEST_HOST_NUDGE=off` to see what happens without the
//! nudges sent to a stuck test host. It fails when any round is lost.

use std::path::Path;
use std::time::Instant;

use skiff_tests::{fixtures, run_batch_with, BatchOptions, VmSpec};
use skiff_vmm::config::MAX_CPUS;
use skiff_vmm::VmConfig;

const SESSION: &str = env!("CARGO_BIN_EXE_skiff-guest-session");

fn env_u32(name: &str, default: u32) -> u32 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: expected a number")),
        Err(_) => default,
    }
}

#[test]
#[ignore = "a reproducer for the test host, run by tests/host/stress"]
fn backdoor_stress_rounds_in_fresh_test_hosts() {
    let rounds = env_u32("SKIFF_STRESS_ROUNDS", 20);
    let mib = env_u32("SKIFF_STRESS_MIB", 16);
    let cpus = env_u32("SKIFF_STRESS_CPUS", 2);
    let vcpus = u8::try_from(cpus)
        .ok()
        .filter(|n| (1..=MAX_CPUS).contains(n))
        .unwrap_or_else(|| panic!("SKIFF_STRESS_CPUS={cpus}: expected 1 to {MAX_CPUS}"));
    let f = fixtures();
    let opts = BatchOptions {
        host_attempts: 1,
        ..BatchOptions::default()
    };
    eprintln!(
        "stress: {rounds} rounds, {mib} MiB, {cpus} vCPUs, nudges to a stuck test host: {}",
        if opts.nudge { "on" } else { "off" }
    );
    let (mut passed, mut lost, mut failed, mut recovered) = (0, 0, 0, 0);
    let started = Instant::now();
    for round in 1..=rounds {
        let t = Instant::now();
        let check = format!("stress={mib}");
        let spec = VmSpec::session(
            "stress",
            Path::new(SESSION),
            "sh",
            &[check.as_str()],
            VmConfig {
                initrd: Some(f.initrd.clone()),
                cmdline: "console=ttyS0 panic=-1 skiff.action=backdoor".into(),
                memory_mib: 512,
                cpus: vcpus,
                ..VmConfig::new(&f.microvm)
            },
        );
        let batch = run_batch_with(&format!("stress-{round}"), 2048, &[spec], &opts);
        let unstuck = batch
            .stalls
            .iter()
            .filter(|s| s.contains("unstuck by"))
            .count();
        recovered += unstuck;
        let verdict = match &batch.outcomes {
            None => {
                lost += 1;
                "LOST (the test host hung)".to_owned()
            }
            Some(o) if o[0].status == Some(0) => {
                passed += 1;
                format!("ok: {}", o[0].check_line("stress").unwrap_or("?"))
            }
            Some(o) => {
                failed += 1;
                format!("FAILED: {}", o[0].describe())
            }
        };
        eprintln!(
            "stress round {round}/{rounds}: {:.0?}, stalls {} (unstuck by a nudge {unstuck}): {verdict}",
            t.elapsed(),
            batch.stalls.len()
        );
    }
    eprintln!(
        "stress: {passed} passed, {failed} failed, {lost} lost to a hung test host, \
         {recovered} stall(s) unstuck by a nudge, in {:.0?}",
        started.elapsed()
    );
    assert_eq!(
        (failed, lost),
        (0, 0),
        "{failed} round(s) failed, {lost} lost"
    );
}
