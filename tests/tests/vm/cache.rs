//! The snapshot cache of `skiff test`, end to end. This batch is the
//! second longest, so its module sorts right after the stress and the
//! short boot tests: the harness starts tests in name order, and this one
//! then runs beside the stress instead of last.

use skiff_tests::{
    assert_clean, exit_of, fixtures, run_batch, scratch_dir, skiff_run_env, workspace_root, VmSpec,
};

/// The descriptions of the API test suite (tests/nixos/suite/), sorted.
pub(crate) fn suite() -> Vec<String> {
    let mut suite: Vec<String> = std::fs::read_dir(workspace_root().join("tests/nixos/suite"))
        .expect("tests/nixos/suite")
        .filter_map(|e| {
            let p = e.ok()?.path();
            let name = p.file_name()?.to_string_lossy().into_owned();
            matches!(p.extension()?.to_str()?, "json" | "toml")
                .then(|| format!("tests/nixos/suite/{name}"))
        })
        .collect();
    suite.sort();
    suite
}

/// `skiff test` with a snapshot cache of its own: the API suite and the
/// two-node network test pass twice, the second time from snapshots (a
/// restored guest's boot console is replayed, so scripts waiting for boot
/// messages still see them); `--no-snapshot` boots cold; another command
/// line makes another snapshot; `skiff snapshot list` and `prune` see
/// them.
#[test]
fn the_driver_boots_each_node_once_and_restores_it_after() {
    fixtures();
    let dir = scratch_dir("snapshot-driver-out");
    let cache = dir.join("snapshots");
    let env = format!("SKIFF_SNAPSHOTS={}", cache.display());
    let suite = suite().join(" ");
    // hello.toml with another kernel command line.
    let hello = std::fs::read_to_string(workspace_root().join("tests/nixos/suite/hello.toml"))
        .expect("hello.toml");
    let changed = hello.replacen("cmdline = \"", "cmdline = \"skiff.snapshot-test=1 ", 1);
    assert_ne!(changed, hello, "hello.toml has no cmdline to change");
    let changed_path = dir.join("hello-changed.toml");
    std::fs::write(
        &changed_path,
        changed.replace(
            "script_file = \"",
            &format!(
                "script_file = \"{}/tests/nixos/suite/",
                workspace_root().display()
            ),
        ),
    )
    .unwrap();
    let skiff = skiff_tests::skiff_driver().display().to_string();
    let specs = vec![
        skiff_run_env("suite-cold", &env, &format!("{suite} --jobs 4"), &dir.join("cold"), 900),
        skiff_run_env("suite-warm", &env, &format!("{suite} --jobs 4"), &dir.join("warm"), 900),
        skiff_run_env("net-cold", &env, "tests/nixos/net/nginx.json", &dir.join("net-cold"), 1500),
        skiff_run_env("net-warm", &env, "tests/nixos/net/nginx.json", &dir.join("net-warm"), 1500),
        skiff_run_env(
            "no-snapshot",
            &env,
            "tests/nixos/suite/hello.toml --no-snapshot",
            &dir.join("no-snapshot"),
            600,
        ),
        skiff_run_env(
            "changed",
            &env,
            &changed_path.display().to_string(),
            &dir.join("changed"),
            600,
        ),
        VmSpec::shell(
            "list",
            format!(
                "{env} {skiff} snapshot list && {env} {skiff} snapshot prune --max-size 0 && {env} {skiff} snapshot list"
            ),
            120,
        ),
    ];
    let o = run_batch("snapshot-driver", 3072, &specs);
    for run in &o[..6] {
        assert_eq!(exit_of(run), 0, "{}:\n{}", run.name, run.serial);
        assert_clean(run);
    }
    let count = |run: &skiff_tests::VmOutcome, text: &str| run.serial.matches(text).count();
    // A suite's tests log to <out>/<test>/driver.log: per test, how often
    // `text` appears.
    let per_test = |out: &str, text: &str| -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> = std::fs::read_dir(dir.join(out))
            .unwrap_or_else(|e| panic!("{out}: {e}"))
            .filter_map(|e| {
                let e = e.ok()?;
                let log = std::fs::read_to_string(e.path().join("driver.log")).ok()?;
                Some((
                    e.file_name().to_string_lossy().into_owned(),
                    log.matches(text).count(),
                ))
            })
            .collect();
        v.sort();
        v
    };
    let (cold, warm) = (&o[0], &o[1]);
    assert!(
        cold.serial.contains("10 passed, 0 failed"),
        "{}",
        cold.serial
    );
    assert!(
        warm.serial.contains("10 passed, 0 failed"),
        "{}",
        warm.serial
    );
    // The first run saved one snapshot per node configuration (the
    // suite's tests share some; which test saves one is a race).
    let saved: usize = per_test("cold", "saved snapshot").iter().map(|t| t.1).sum();
    assert!(saved >= 4, "{:?}", per_test("cold", "saved snapshot"));
    // In the second, every test restored its machines and saved nothing.
    let restored = per_test("warm", "restored from snapshot");
    assert_eq!(restored.len(), 10, "{restored:?}");
    assert!(restored.iter().all(|t| t.1 >= 1), "{restored:?}");
    assert_eq!(
        restored.iter().find(|t| t.0 == "two-nodes").map(|t| t.1),
        Some(2),
        "{restored:?}"
    );
    let saved_again: usize = per_test("warm", "saved snapshot").iter().map(|t| t.1).sum();
    assert_eq!(saved_again, 0, "{:?}", per_test("warm", "saved snapshot"));
    let (net_cold, net_warm) = (&o[2], &o[3]);
    assert_eq!(count(net_cold, "saved snapshot"), 2, "{}", net_cold.serial);
    assert_eq!(
        count(net_warm, "restored from snapshot"),
        2,
        "{}",
        net_warm.serial
    );
    let none = &o[4];
    assert_eq!(count(none, "restored from snapshot"), 0, "{}", none.serial);
    assert_eq!(count(none, "saved snapshot"), 0, "{}", none.serial);
    let changed = &o[5];
    assert_eq!(count(changed, "saved snapshot"), 1, "{}", changed.serial);
    let list = &o[6];
    assert_eq!(list.status, Some(0), "{}", list.describe());
    assert!(
        list.serial.contains("snapshot(s) removed"),
        "{}",
        list.serial
    );
    assert!(list.serial.contains("0 snapshot(s)"), "{}", list.serial);
    // Warm against cold, for the record.
    for run in [cold, warm] {
        let table: Vec<&str> = run
            .serial
            .lines()
            .skip_while(|l| !l.starts_with("test "))
            .collect();
        eprintln!("{}:\n{}", run.name, table.join("\n"));
    }
}
