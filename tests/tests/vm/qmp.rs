//! skiff-vmm's QMP socket against real clients: qemu.qmp (QEMU's own
//! Python client from PyPI) pauses, resumes and powers off a systemd guest
//! through `skiff test`; the shapes of skiff-vmm's replies match those
//! recorded from QEMU 7.2 (tests/qmp/fixtures/qemu.json); `info registers`
//! and `info lapic` show a booted guest's vCPU (tests/qmp/cpu_state.py).

use skiff_tests::{
    assert_clean, cache_dir, disk, exit_of, fixtures, run_batch, scratch_dir, shell_quote,
    skiff_run_env, skiff_vmm, workspace_root, VmSpec,
};
use skiff_vmm::VmConfig;

/// site-packages of the virtualenv scripts/install-deps puts qemu.qmp in.
fn qemu_qmp_path() -> String {
    let venv = cache_dir().join("venv/lib");
    let site = std::fs::read_dir(&venv)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run scripts/install-deps (it installs qemu.qmp)",
                venv.display()
            )
        })
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.join("qemu/qmp").is_dir())
        .unwrap_or_else(|| {
            panic!(
                "qemu.qmp is not in {}: run scripts/install-deps",
                venv.display()
            )
        });
    site.display().to_string()
}

#[test]
fn qemu_qmp_drives_a_guest_and_replies_match_qemu() {
    let f = fixtures();
    let dir = scratch_dir("qmp");
    let client = skiff_run_env(
        "qemu-qmp",
        &format!("PYTHONPATH={}", shell_quote(&qemu_qmp_path())),
        "tests/nixos/qmp.json",
        &dir.join("qemu-qmp"),
        900,
    );
    let sock = format!("/tmp/skiff-qmp-shapes-{}", std::process::id());
    // A named VM with one disk, as the QEMU whose replies were recorded
    // was: query-name and query-block answer with the same shapes.
    let config = VmConfig {
        initrd: Some(f.initrd.clone()),
        cmdline: "console=ttyS0 panic=-1 skiff.action=sleep".into(),
        memory_mib: 256,
        name: "fixture".into(),
        disks: vec![disk(format!("{sock}/disk.img"))],
        qmp: vec![format!("{sock}/qmp.sock").into()],
        ..VmConfig::new(&f.microvm)
    };
    let vmm_args: Vec<String> = config.to_args().iter().map(|a| shell_quote(a)).collect();
    let shapes_script = format!(
        "cd {ws} || exit 1; rm -rf {sock}; mkdir -p {sock}; truncate -s 64M {sock}/disk.img; \
         {vmm} {args} > {sock}/serial 2>&1 & \
         vmm=$!; \
         python3 tests/qmp/cpu_state.py {sock}/qmp.sock --wait 600 2>&1; \
         echo \"cpu-state-exit=$?\"; \
         python3 tests/qmp/qmp_shapes.py {sock}/qmp.sock --compare tests/qmp/fixtures/qemu.json 2>&1; \
         st=$?; echo \"exit=$st\"; [ $st = 0 ] || kill $vmm; \
         wait $vmm; echo \"vmm-exit=$?\"; rm -rf {sock}",
        ws = shell_quote(&workspace_root().display().to_string()),
        vmm = shell_quote(&skiff_vmm().display().to_string()),
        args = vmm_args.join(" "),
    );
    // The guest boots (up to 600 s for its LAPIC timer) before the
    // shapes' session.
    let shapes = VmSpec::shell("qmp-shapes", shapes_script, 1200);

    let o = run_batch("qmp", 3072, &[client, shapes]);
    let client = &o[0];
    assert_eq!(exit_of(client), 0, "{}", client.serial);
    for text in [
        "\"event\": \"POWERDOWN\"",
        "\"reason\": \"guest-shutdown\"",
        "test script finished",
    ] {
        assert!(
            client.serial.contains(text),
            "missing {text:?}:\n{}",
            client.serial
        );
    }
    assert!(
        client.serial.contains("skiff-vmm exited with status 0"),
        "{}",
        client.serial
    );
    assert_clean(client);

    let shapes = &o[1];
    assert_eq!(exit_of(shapes), 0, "{}", shapes.serial);
    assert!(
        shapes
            .serial
            .contains("23 replies and events, 0 difference(s)"),
        "{}",
        shapes.serial
    );
    // info registers / info lapic on the live guest (tests/qmp/cpu_state.py).
    assert!(
        shapes.serial.contains("cpu-state: all checks passed")
            && shapes.serial.contains("cpu-state-exit=0"),
        "{}",
        shapes.serial
    );
    // quit ends skiff-vmm with status 0.
    assert!(shapes.serial.contains("vmm-exit=0"), "{}", shapes.serial);
}
