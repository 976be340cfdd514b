//! The Nix layer (nix/) with Debian's Nix 2.8 and no nixpkgs, no KVM:
//! every .nix file parses (which also catches unbound names, as the guest
//! module avoids `with lib;`); runSkiffTest emits exactly the golden
//! descriptions for one, two and three nodes on two VLANs, and refuses bad
//! arguments with a message naming the problem; the driver accepts what it
//! emits (its numbers and MACs agree with the driver's); the guest module
//! sets exactly the golden list of options, with the golden values.
//!
//! `scripts/install-deps` installs nix-bin; without it these tests fail
//! with that hint rather than pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use skiff_tests::{scratch_dir, skiff_driver, workspace_root};

/// Nix settings for a machine with no network and no nix-daemon: no
/// substituters (no DNS retries), builds as root without a sandbox.
const NIX_CONFIG: &str = "substituters =\nbuild-users-group =\nsandbox = false";

/// One nix-instantiate at a time: the tests run in parallel threads, and
/// Debian's Nix 2.8 fails a second writer of its SQLite store database
/// ("database is busy") instead of waiting for the first.
static NIX_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn nix(args: &[&str]) -> (bool, String, String) {
    let _one_at_a_time = NIX_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new("nix-instantiate")
        .args(args)
        .current_dir(workspace_root())
        .env("NIX_CONFIG", NIX_CONFIG)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run nix-instantiate ({e}); scripts/install-deps installs Debian's nix-bin"
            )
        });
    let stderr: String = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("warning: "))
        .map(|l| format!("{l}\n"))
        .collect();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

/// `nix-instantiate --eval --strict --json FILE -A ATTR`, parsed.
fn eval(file: &str, attr: &str) -> serde_json::Value {
    let (ok, out, err) = nix(&["--eval", "--strict", "--json", file, "-A", attr]);
    assert!(ok, "evaluating {file} -A {attr} failed:\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{file} -A {attr}: {e}: {out}"))
}

fn golden(name: &str) -> serde_json::Value {
    let p = workspace_root().join("nix/tests/golden").join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn golden_lines(name: &str) -> Vec<String> {
    let p = workspace_root().join("nix/tests/golden").join(name);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            nix_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "nix") {
            out.push(p);
        }
    }
}

#[test]
fn every_nix_file_parses_without_unbound_names() {
    let mut files = vec![workspace_root().join("flake.nix")];
    nix_files(&workspace_root().join("nix"), &mut files);
    assert!(files.len() >= 12, "{files:?}");
    for f in &files {
        let (ok, _, err) = nix(&["--parse", &f.display().to_string()]);
        assert!(ok, "{} does not parse:\n{err}", f.display());
    }
    // --parse is what finds an unbound name outside `with`; make sure it
    // still does, so the check above is one.
    let (ok, _, err) = nix(&["--parse", "-E", "{ config, ... }: { a = cfgg.enable; }"]);
    assert!(!ok && err.contains("undefined variable 'cfgg'"), "{err}");
}

#[test]
fn run_skiff_test_emits_the_golden_descriptions() {
    for name in ["one", "two", "three"] {
        let got = eval("nix/tests/eval.nix", &format!("descriptions.{name}"));
        let want = golden(&format!("{name}.json"));
        assert_eq!(
            got,
            want,
            "runSkiffTest's description {name} differs from nix/tests/golden/{name}.json; got:\n{}",
            serde_json::to_string_pretty(&got).unwrap()
        );
    }
    let d = eval("nix/tests/eval.nix", "derivation");
    assert_eq!(
        d,
        serde_json::json!({
            "name": "vm-test-run-one",
            "requiredSystemFeatures": ["kvm", "nixos-test"],
            "driver": "skiff-test-driver-one",
            "description": "one-description.json",
        })
    );
}

#[test]
fn run_skiff_test_refuses_bad_arguments_naming_them() {
    let cases = [
        ("unknownNodeAttribute", "node \"machine\": unknown attribute memroy (a raw node takes kernel,"),
        ("vlanOutOfRange", "node \"machine\": VLAN 256 is out of range (VLAN numbers are 1 to 255)"),
        ("vlanZero", "node \"b\": VLAN 0 is out of range"),
        ("vlanTwice", "node \"machine\": VLAN 3 is listed twice in vlans"),
        ("unknownArgument", "test \"bad\": unknown argument enableOCR (runSkiffTest takes name, nodes,"),
        ("moduleWithoutNixpkgs", "node \"machine\" is a NixOS module (it has no kernel attribute), which needs nixpkgs"),
        ("relativeKernel", "node \"machine\": kernel: expected a path, a derivation or an absolute path, got \"vmlinuz\""),
        ("memoryType", "node \"machine\": memory must be an integer, got a string"),
        ("badDisk", "node \"machine\": disks[0]: readonly and overlay exclude each other"),
        ("badName", "name \"a b\" must use only letters, digits"),
        ("noNodes", "test \"bad\": nodes must be a non-empty attribute set of nodes"),
    ];
    for (attr, want) in cases {
        let (ok, out, err) = nix(&[
            "--eval",
            "--strict",
            "--json",
            "nix/tests/eval.nix",
            "-A",
            &format!("bad.{attr}"),
        ]);
        assert!(!ok, "bad.{attr} evaluated: {out}");
        assert!(
            err.contains(&format!("error: runSkiffTest: {want}")),
            "bad.{attr}: expected {want:?} in:\n{err}"
        );
    }
}

/// The golden descriptions, with their files made real, load in the
/// driver: it checks every node's number and MACs against its own.
#[test]
fn the_driver_accepts_what_run_skiff_test_emits() {
    let dir = scratch_dir("nix-descriptions");
    let fixtures = dir.join("fixtures");
    std::fs::create_dir_all(&fixtures).unwrap();
    for f in ["vmlinuz", "initrd.cpio.gz", "rootfs.ext4"] {
        std::fs::write(fixtures.join(f), b"x").unwrap();
    }
    let tmp = dir.join("tmp");
    for name in ["one", "two", "three"] {
        let text = serde_json::to_string(&golden(&format!("{name}.json")))
            .unwrap()
            .replace("\"/fixtures/", &format!("\"{}/", fixtures.display()));
        let p = dir.join(format!("{name}.json"));
        std::fs::write(&p, text).unwrap();
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let out = Command::new(skiff_driver())
            .args(["test", "--interactive"])
            .arg(&p)
            .current_dir(&dir)
            .env("TMPDIR", &tmp)
            .env("NO_COLOR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin
                    .take()
                    .unwrap()
                    .write_all(b"print('nodes:', sorted(m.name for m in machines))\n")?;
                c.wait_with_output()
            })
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{name}.json: {text}");
        let want = match name {
            "one" => "nodes: ['machine']",
            "two" => "nodes: ['client', 'server']",
            _ => "nodes: ['client', 'router', 'server']",
        };
        assert!(text.contains(want), "{name}.json: {text}");
    }
    // A description whose numbers disagree with the driver's is refused.
    let bad = serde_json::to_string(&golden("three.json"))
        .unwrap()
        .replace("\"/fixtures/", &format!("\"{}/", fixtures.display()))
        .replace("\"52:54:00:12:02:03\"", "\"52:54:00:12:02:09\"");
    let p = dir.join("bad.json");
    std::fs::write(&p, bad).unwrap();
    let out = Command::new(skiff_driver())
        .args(["test", "--interactive"])
        .arg(&p)
        .env("TMPDIR", &tmp)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("node \"server\": \"macs\" is [\"52:54:00:12:02:09\"], but its cards have [\"52:54:00:12:02:03\"]"),
        "{err}"
    );
}

#[test]
fn the_guest_module_sets_the_golden_options_and_values() {
    let list = |v: serde_json::Value| -> Vec<String> {
        v.as_array()
            .expect("a list")
            .iter()
            .map(|s| s.as_str().expect("a string").to_owned())
            .collect()
    };
    let sets = list(eval("nix/tests/module.nix", "options"));
    assert_eq!(
        sets,
        golden_lines("guest-module-sets.txt"),
        "the options nix/modules/skiff-guest.nix sets differ from nix/tests/golden/guest-module-sets.txt"
    );
    let declares = list(eval("nix/tests/module.nix", "declared"));
    assert_eq!(declares, golden_lines("guest-module-declares.txt"));
    let values = eval("nix/tests/module.nix", "values");
    assert_eq!(
        values,
        golden("guest-module-values.json"),
        "got:\n{}",
        serde_json::to_string_pretty(&values).unwrap()
    );
}

#[test]
fn the_flake_exposes_the_same_functions() {
    let (ok, out, err) = nix(&[
        "--eval",
        "--strict",
        "--json",
        "-E",
        "let f = import ./flake.nix; o = f.outputs { self = o; }; s = o.lib.forSystem \"x86_64-linux\"; \
         in { fns = builtins.attrNames s; module = builtins.isFunction o.nixosModules.skiff-guest; \
              plan = (s.network.plan { a = [ 1 ]; }).nodes.a.interfaces; }",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["module"], true, "{out}");
    for f in [
        "runSkiffTest",
        "storeImage",
        "writeText",
        "network",
        "nixosModules",
    ] {
        assert!(
            v["fns"].as_array().unwrap().iter().any(|x| x == f),
            "{f} missing: {out}"
        );
    }
    assert_eq!(v["plan"][0]["mac"], "52:54:00:12:01:01", "{out}");
}
