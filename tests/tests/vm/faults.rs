//! Faults and load around the driver (tests/nixos/faults/), in one test
//! host: skiff-vmm killed under a test in a `--jobs` run of thirty other
//! tests, an overlay disk whose file system fills up, and sixty VM starts
//! and stops in one driver process.

use crate::driver::read;
use skiff_tests::{
    assert_clean, exit_of, fixtures, run_batch, scratch_dir, skiff_run, skiff_run_env,
    workspace_root, VmOutcome, VmSpec,
};

/// Tests in the load run beside the one whose skiff-vmm is killed.
const LOAD_TESTS: usize = 30;
/// Start/stop rounds of the starts test (its script takes `SKIFF_STARTS`).
const STARTS: usize = 60;

/// A run whose shell `setup` runs first and `after` last, around a
/// `skiff test` run (`skiff_run_env`'s script).
fn around(run: VmSpec, setup: &str, after: &str) -> VmSpec {
    let inner = run.args.last().expect("a shell script").clone();
    VmSpec::shell(
        &run.name,
        format!("{setup}\n{inner}\n{after}"),
        run.timeout_s,
    )
}

#[test]
fn faults_and_load_leave_the_driver_standing() {
    fixtures();
    let dir = scratch_dir("faults");
    let ws = workspace_root();
    let load_dir = dir.join("load-tests");
    let faults = ws.join("tests/nixos/faults");

    // Thirty busybox tests and the one whose skiff-vmm dies, six at a time.
    let write_load = format!(
        r#"mkdir -p '{d}' && for i in $(seq -w 1 {n}); do
    printf '{{"name": "load-%s", "nodes": {{"machine": {{"kernel": "${{SKIFF_GUEST}}/vmlinuz-microvm", "initrd": "${{SKIFF_GUEST}}/initrd.cpio.gz", "cmdline": "panic=-1 skiff.action=backdoor", "memory": 192}}}}, "script_file": "{load}"}}\n' "$i" > '{d}'/load-$i.json
done"#,
        d = load_dir.display(),
        n = LOAD_TESTS,
        load = faults.join("load.py").display(),
    );
    let mut descriptions: Vec<String> = (1..=LOAD_TESTS)
        .map(|i| format!("{}/load-{i:02}.json", load_dir.display()))
        .collect();
    descriptions.insert(LOAD_TESTS / 2, "tests/nixos/faults/vmm-killed.json".into());
    let jobs = around(
        skiff_run(
            "jobs",
            &format!("{} --jobs 6", descriptions.join(" ")),
            &dir.join("jobs"),
            1800,
        ),
        &write_load,
        "",
    );

    // The overlay's layer lives in skiff-vmm's TMPDIR: a 16 MiB tmpfs.
    let full = "/tmp/skiff-faults-full";
    let base = dir.join("base");
    let overlay = around(
        skiff_run_env(
            "overlay-full",
            &format!("SKIFF_FAULT_DIR='{}' TMPDIR={full}", base.display()),
            "tests/nixos/faults/overlay-full.json",
            &dir.join("overlay-full"),
            900,
        ),
        &format!(
            "mkdir -p '{b}' {full} && mount -t tmpfs -o size=16m skiff-full {full} && \
             head -c 64M /dev/urandom > '{b}/base.img' && \
             echo \"base-before=$(sha256sum < '{b}/base.img')\"",
            b = base.display()
        ),
        &format!(
            "echo \"base-after=$(sha256sum < '{b}/base.img')\"; echo \"left in the tmpfs: $(ls -A {full} | wc -l)\"; \
             umount {full}; rm -f '{b}/base.img'",
            b = base.display()
        ),
    );

    let starts = skiff_run_env(
        "starts",
        &format!("SKIFF_STARTS={STARTS}"),
        "tests/nixos/faults/starts.json",
        &dir.join("starts"),
        3000,
    );

    let o = run_batch("faults", 3072, &[jobs, overlay, starts]);
    check_jobs(&o[0], &dir);
    check_overlay(&o[1], &dir);
    check_starts(&o[2]);
}

fn check_jobs(o: &VmOutcome, dir: &std::path::Path) {
    let text = &o.serial;
    assert_eq!(exit_of(o), 1, "{text}");
    assert!(
        text.contains(&format!("{} test(s), 6 at a time", LOAD_TESTS + 1)),
        "{text}"
    );
    assert!(
        text.contains(&format!("{LOAD_TESTS} passed, 1 failed")),
        "{text}"
    );
    // The killed VMM's test failed with its status and the last console
    // lines of its machine; its script stopped there.
    for line in [
        "skiff-vmm exited with status 137",
        "vmm-killed-console-line",
    ] {
        assert!(text.contains(line), "missing {line:?}:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("vmm-killed") && l.contains("FAILED")),
        "vmm-killed is not in the summary as failed:\n{text}"
    );
    let junit = read(&dir.join("jobs/vmm-killed/junit.xml"));
    assert!(!junit.contains("failures=\"0\""), "{junit}");
    for i in 1..=LOAD_TESTS {
        let name = format!("load-{i:02}");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&name) && l.contains("passed")),
            "{name} is not in the summary as passed:\n{text}"
        );
    }
    assert_clean(o);
}

fn check_overlay(o: &VmOutcome, dir: &std::path::Path) {
    let text = &o.serial;
    assert_eq!(exit_of(o), 0, "{text}");
    let digest = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key}:\n{text}"))
            .to_owned()
    };
    assert_eq!(
        digest("base-before="),
        digest("base-after="),
        "the base image changed:\n{text}"
    );
    // skiff-vmm logged the failed writes and lived to power the guest off.
    let log = read(&dir.join("overlay-full/machine.vmm.log"));
    assert!(
        log.contains("failed: No space left on device"),
        "no failed write in skiff-vmm's log:\n{log}"
    );
    assert!(!text.contains("panicked at"), "{text}");
    assert!(text.contains("left in the tmpfs: 0"), "{text}");
}

fn check_starts(o: &VmOutcome) {
    let text = &o.serial;
    assert_eq!(exit_of(o), 0, "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("starts: {STARTS} rounds")))
        .unwrap_or_else(|| panic!("no starts line:\n{text}"));
    println!("{line}");
    // The hung guest's report (the end of starts.py).
    assert!(
        text.contains("starts: a stopped guest's command failed after")
            && text.contains("naming its vCPU state"),
        "{text}"
    );
    assert_clean(o);
}
