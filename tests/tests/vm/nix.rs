//! A real `nix-build` of a runSkiffTest test (nix/tests/build.nix): raw
//! nodes from the guest fixtures, two nodes on a VLAN, and a store image
//! the Nix code builds from a closure, mounted as /nix/store under an
//! overlay in the guest. Nix builds it in a store of its own (a tmpfs on
//! /nix where the VMs run), with the sandbox off and as root, as Debian's
//! Nix must to use /dev/kvm; its output must hold the logs and junit.xml.

use skiff_tests::{cache_dir, fixtures, run_batch, skiff_driver, workspace_root, VmSpec};

#[test]
fn nix_build_runs_a_run_skiff_test_test() {
    fixtures();
    // The test host sees this machine's root read-only; the build mounts
    // its store on /nix there, so the mount point must exist (Debian's
    // Nix creates it on first use).
    std::fs::create_dir_all("/nix")
        .expect("cannot create /nix, the mount point of the build's store");
    let q = |p: &std::path::Path| format!("'{}'", p.display());
    let script = format!(
        "mount -t tmpfs nix-store /nix || exit 1\n\
         export NIX_CONFIG='substituters =\nbuild-users-group =\nsandbox = false'\n\
         export HOME=/tmp/nix-home XDG_CACHE_HOME=/tmp/nix-home/.cache\n\
         mkdir -p \"$HOME\"\n\
         cd {ws}\n\
         nix-build nix/tests/build.nix --argstr guest {guest} --argstr skiff {skiff} -o /tmp/nix-result 2>&1\n\
         echo nix-build-status=$?\n\
         echo \"output: $(ls /tmp/nix-result | tr '\\n' ' ')\"\n\
         cat /tmp/nix-result/junit.xml\n\
         echo\n\
         grep -c 'Spawning backdoor root shell' /tmp/nix-result/server.serial.log /tmp/nix-result/client.serial.log || true\n",
        ws = q(&workspace_root()),
        guest = q(&cache_dir().join("guest")),
        skiff = q(&skiff_driver()),
    );
    let out = run_batch(
        "nix-build",
        2048,
        &[VmSpec::shell("nix-build", script, 1800)],
    );
    let o = &out[0];
    let text = &o.serial;
    assert!(text.contains("nix-build-status=0"), "{}", o.describe());
    let files = text
        .lines()
        .find_map(|l| l.strip_prefix("output: "))
        .unwrap_or_else(|| panic!("no output listing:\n{}", o.describe()));
    for f in [
        "junit.xml",
        "events.jsonl",
        "client.serial.log",
        "server.serial.log",
    ] {
        assert!(
            files.split_whitespace().any(|x| x == f),
            "{f} missing from the output: {files}\n{}",
            o.describe()
        );
    }
    assert!(text.contains("failures=\"0\""), "{}", o.describe());
    assert!(
        text.contains("the store image is /nix/store, under a writable overlay"),
        "{}",
        o.describe()
    );
    assert!(
        text.contains("the nodes reach each other on VLAN 1"),
        "{}",
        o.describe()
    );
}
