//! `skiff test` without guests: bad input gets a clear message naming the
//! problem, a non-zero status, and leaves no skiff-vmm process, socket or
//! state directory behind; the interactive REPL defines the machines and
//! starts none. None of these needs KVM.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use skiff_tests::{scratch_dir, skiff_driver};

struct Run {
    status: Option<i32>,
    output: String,
}

/// Runs `skiff test ARGS` with a private TMPDIR and checks that nothing
/// is left in it.
fn skiff(dir: &Path, args: &[&str]) -> Run {
    skiff_with_input(dir, args, "")
}

fn skiff_with_input(dir: &Path, args: &[&str], input: &str) -> Run {
    let tmp = dir.join("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let mut child = Command::new(skiff_driver())
        .arg("test")
        .args(args)
        .current_dir(dir)
        .env("TMPDIR", &tmp)
        .env_remove("XDG_RUNTIME_DIR")
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run skiff");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write skiff's stdin");
    let out = child.wait_with_output().expect("wait for skiff");
    let left: Vec<PathBuf> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "skiff left {left:?} behind");
    let ps = Command::new("pgrep")
        .arg("-f")
        .arg(&tmp)
        .output()
        .expect("run pgrep");
    assert!(
        ps.stdout.is_empty(),
        "a process from this run is still there: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
    Run {
        status: out.status.code(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn setup(label: &str) -> PathBuf {
    let dir = scratch_dir(label);
    std::fs::write(dir.join("kernel"), b"not a kernel").unwrap();
    dir
}

fn expect_error(dir: &Path, desc: &str, needle: &str) {
    std::fs::write(dir.join("t.json"), desc).unwrap();
    let r = skiff(dir, &["t.json"]);
    assert_eq!(r.status, Some(1), "{}", r.output);
    assert!(
        r.output.contains(needle),
        "expected {needle:?} in:\n{}",
        r.output
    );
}

#[test]
fn description_errors_name_the_problem() {
    let dir = setup("driver-bad-desc");
    expect_error(
        &dir,
        r#"{"name":"t","nodes":{"m":{"memory":256}},"script":"pass"}"#,
        "t.json: node \"m\": missing \"kernel\"",
    );
    expect_error(
        &dir,
        r#"{"name":"t","nodes":{"m":{"kernel":"kernel","colour":"red"}},"script":"pass"}"#,
        "unknown field `colour`",
    );
    expect_error(
        &dir,
        r#"{"name":"t","nodes":{"m":{"kernel":"kernel"}},"script":"pass","extra":1}"#,
        "unknown field `extra`",
    );
    expect_error(
        &dir,
        r#"{"name":"t","nodes":{"2fast":{"kernel":"kernel"}},"script":"pass"}"#,
        "node name \"2fast\" is not a Python identifier",
    );
    expect_error(
        &dir,
        r#"{"name":"t","nodes":{"web server":{"kernel":"kernel"}},"script":"pass"}"#,
        "is not a Python identifier: ' ' is not allowed",
    );
    expect_error(
        &dir,
        r#"{"name":"t","nodes":{"m":{"kernel":"missing-kernel"}},"script":"pass"}"#,
        "missing-kernel does not exist",
    );
    expect_error(&dir, "{not json", "t.json: key must be a string");
    let r = skiff(&dir, &["nowhere.json"]);
    assert_eq!(r.status, Some(1));
    assert!(
        r.output
            .contains("cannot read test description nowhere.json"),
        "{}",
        r.output
    );
    std::fs::write(
        dir.join("t.toml"),
        "name = \"t\"\nscript = \"pass\"\n[nodes.m]\nkernle = \"kernel\"\n",
    )
    .unwrap();
    let r = skiff(&dir, &["t.toml"]);
    assert_eq!(r.status, Some(1));
    assert!(r.output.contains("unknown field `kernle`"), "{}", r.output);
}

#[test]
fn a_syntax_error_is_reported_before_any_vm_starts() {
    let dir = setup("driver-bad-syntax");
    // The VMM given does not exist: reaching it would be a different error.
    std::fs::write(
        dir.join("t.json"),
        r#"{"name":"t","nodes":{"m":{"kernel":"kernel"}},"script":"machine.start()\nif True\n    pass\n"}"#,
    )
    .unwrap();
    let r = skiff(&dir, &["t.json", "--vmm", "/nonexistent/skiff-vmm"]);
    assert_eq!(r.status, Some(1), "{}", r.output);
    assert!(
        r.output.contains("the test script has a syntax error")
            && r.output.contains("line 2, column 8")
            && r.output.contains("if True"),
        "{}",
        r.output
    );
    assert!(!r.output.contains("skiff-vmm running"), "{}", r.output);
}

#[test]
fn a_vm_that_cannot_start_names_the_machine_and_its_status() {
    let dir = setup("driver-bad-kernel");
    std::fs::write(
        dir.join("t.json"),
        r#"{"name":"t","nodes":{"box":{"kernel":"kernel","memory":128}},"script":"box.succeed('true')\n"}"#,
    )
    .unwrap();
    let r = skiff(&dir, &["t.json"]);
    assert_eq!(r.status, Some(1), "{}", r.output);
    assert!(
        r.output
            .contains("box: skiff-vmm exited with status 1 (the VM could not be started"),
        "{}",
        r.output
    );
    let vmm_log = std::fs::read_to_string(dir.join("skiff-out/t/box.vmm.log")).unwrap();
    assert!(vmm_log.contains("kernel"), "{vmm_log}");
    let junit = std::fs::read_to_string(dir.join("skiff-out/t/junit.xml")).unwrap();
    assert!(junit.contains("<failure"), "{junit}");
}

#[test]
fn a_suite_reports_a_broken_description_in_its_summary() {
    let dir = setup("driver-bad-suite");
    std::fs::write(dir.join("broken.json"), r#"{"name":"broken","nodes":{}}"#).unwrap();
    std::fs::write(
        dir.join("nokernel.json"),
        r#"{"name":"nokernel","nodes":{"m":{"kernel":"kernel","memory":128}},"script":"m.succeed('true')"}"#,
    )
    .unwrap();
    let r = skiff(&dir, &["broken.json", "nokernel.json", "--jobs", "2"]);
    assert_eq!(r.status, Some(1), "{}", r.output);
    assert!(
        r.output.contains("a test needs at least one node"),
        "{}",
        r.output
    );
    assert!(
        r.output
            .lines()
            .any(|l| l.starts_with("broken") && l.contains("error")),
        "{}",
        r.output
    );
    assert!(
        r.output
            .lines()
            .any(|l| l.starts_with("nokernel") && l.contains("FAILED")),
        "{}",
        r.output
    );
    assert!(r.output.contains("0 passed, 2 failed"), "{}", r.output);
}

#[test]
fn bad_command_lines_are_refused() {
    let dir = setup("driver-bad-cli");
    std::fs::write(
        dir.join("t.json"),
        r#"{"name":"t","nodes":{"m":{"kernel":"kernel"}},"script":"pass"}"#,
    )
    .unwrap();
    let r = skiff(&dir, &["t.json", "--vmm", "/nonexistent/skiff-vmm"]);
    assert_eq!(r.status, Some(1));
    assert!(
        r.output
            .contains("skiff-vmm /nonexistent/skiff-vmm does not exist"),
        "{}",
        r.output
    );
    let r = skiff(&dir, &["t.json", "t.json", "--script", "x.py"]);
    assert_eq!(r.status, Some(1));
    assert!(
        r.output
            .contains("--script works with one test description only"),
        "{}",
        r.output
    );
    let r = skiff(&dir, &["t.json", "--jobs", "many"]);
    assert_eq!(r.status, Some(2), "{}", r.output);
    assert!(
        r.output.contains("invalid value 'many' for '--jobs <N>'"),
        "{}",
        r.output
    );
}

#[test]
fn interactive_mode_defines_the_machines_and_starts_none() {
    let dir = setup("driver-interactive");
    std::fs::write(
        dir.join("t.json"),
        r#"{"name":"t","nodes":{"web-1":{"kernel":"kernel"}},"script":"machine.succeed('true')"}"#,
    )
    .unwrap();
    let r = skiff_with_input(
        &dir,
        &["t.json", "--interactive"],
        "print('repl:', machine.name, web_1.booted, len(machines), callable(test_script))\n",
    );
    assert_eq!(r.status, Some(0), "{}", r.output);
    assert!(
        r.output.contains("repl: web-1 False 1 True"),
        "{}",
        r.output
    );
    assert!(r.output.contains("none started"), "{}", r.output);
    assert!(!r.output.contains("skiff-vmm running"), "{}", r.output);
}

/// A stand-in for skiff-vmm (after a line `delay = SECONDS`): it opens its
/// QMP socket (greets, answers every command) after `delay` seconds, then
/// answers the backdoor on its console with empty output and status 0,
/// and exits 0 at `poweroff`. With `delay` negative it exits with status 1
/// after that many seconds instead, without any socket. It reads its flags
/// in both spellings (`--qmp PATH` and `--qmp=PATH`, as `VmConfig::to_args`
/// writes them).
const STUB_VMM: &str = r#"import base64, socket, sys, threading, time
def arg(name):
    for i, a in enumerate(sys.argv):
        if a == name:
            return sys.argv[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    sys.exit(f"stub skiff-vmm: no {name} in {sys.argv}")
time.sleep(abs(delay))
if delay < 0:
    sys.exit(1)
qmp = socket.socket(socket.AF_UNIX)
qmp.bind(arg("--qmp"))
qmp.listen(1)
def serve():
    conn = qmp.accept()[0]
    conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
    for _ in conn.makefile("rb"):
        conn.sendall(b'{"return": {}}\r\n')
threading.Thread(target=serve, daemon=True).start()
con = socket.socket(socket.AF_UNIX)
con.connect(arg("--console").split("=", 1)[1])
con.sendall(b"Spawning backdoor root shell...\n")
for line in con.makefile("rb"):
    if line.startswith(b"poweroff"):
        sys.exit(0)
    if line.startswith(b"echo ${PIPESTATUS[0]}"):
        con.sendall(b"0\n")
    else:
        con.sendall(base64.b64encode(b"") + b"\n")
"#;

/// Writes [`STUB_VMM`] with `qmp_delay` as `dir/stub-vmm`.
fn write_stub(dir: &Path, qmp_delay: &str) -> PathBuf {
    let stub = dir.join("stub-vmm");
    std::fs::write(
        &stub,
        format!("#!/usr/bin/env python3\ndelay = {qmp_delay}\n{STUB_VMM}"),
    )
    .unwrap();
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    stub
}

fn run_stub(label: &str, qmp_delay: &str) -> (Run, std::time::Duration) {
    let dir = setup(label);
    let stub = write_stub(&dir, qmp_delay);
    std::fs::write(
        dir.join("t.json"),
        r#"{"name":"t","nodes":{"box":{"kernel":"kernel"}},"script":"box.start()\nbox.succeed('true')\nbox.shutdown()\n"}"#,
    )
    .unwrap();
    let t = std::time::Instant::now();
    let r = skiff(&dir, &["t.json", "--vmm", stub.to_str().unwrap()]);
    (r, t.elapsed())
}

#[test]
fn a_vmm_slow_to_open_its_qmp_socket_is_waited_for() {
    // Longer than the 10 s the driver once waited, on any host.
    let (r, _) = run_stub("driver-slow-qmp", "16");
    assert_eq!(r.status, Some(0), "{}", r.output);
    assert!(
        r.output
            .contains("box: waiting for skiff-vmm's QMP socket (15s)"),
        "{}",
        r.output
    );
}

#[test]
fn a_vmm_that_dies_before_its_qmp_socket_fails_at_once() {
    let (r, took) = run_stub("driver-dead-qmp", "-1");
    assert_eq!(r.status, Some(1), "{}", r.output);
    assert!(
        r.output.contains("skiff-vmm exited before its QMP socket"),
        "{}",
        r.output
    );
    assert!(
        took < std::time::Duration::from_secs(30),
        "took {took:?}:\n{}",
        r.output
    );
}

/// A driver killed with SIGKILL mid-test takes its VMMs with it
/// (PR_SET_PDEATHSIG), and the next run removes the state directory it
/// could not.
#[test]
fn a_killed_driver_leaves_no_vmm_and_the_next_run_cleans_up() {
    let dir = setup("driver-sigkill");
    let stub = write_stub(&dir, "0");
    std::fs::write(
        dir.join("hang.json"),
        r#"{"name":"hang","nodes":{"box":{"kernel":"kernel"}},"script":"box.start()\nbox.succeed('true')\nopen('started', 'w').close()\nimport time\ntime.sleep(600)\n"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("ok.json"),
        r#"{"name":"ok","nodes":{"box":{"kernel":"kernel"}},"script":"box.start()\nbox.succeed('true')\nbox.shutdown()\n"}"#,
    )
    .unwrap();
    let tmp = dir.join("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let run = |desc: &str| {
        Command::new(skiff_driver())
            .args(["test", desc, "--vmm"])
            .arg(&stub)
            .current_dir(&dir)
            .env("TMPDIR", &tmp)
            .env_remove("XDG_RUNTIME_DIR")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run skiff")
    };
    let vmms = || {
        let ps = Command::new("pgrep")
            .arg("-f")
            .arg(&tmp)
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&ps.stdout).trim().to_owned()
    };
    let mut driver = run("hang.json");
    let t = std::time::Instant::now();
    while !dir.join("started").exists() {
        assert!(
            t.elapsed().as_secs() < 120,
            "the test never started its machine"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!vmms().is_empty(), "no skiff-vmm running");
    let pid = driver.id();
    driver.kill().unwrap();
    driver.wait().unwrap();
    let t = std::time::Instant::now();
    while !vmms().is_empty() {
        assert!(
            t.elapsed().as_secs() < 30,
            "skiff-vmm outlived its driver: {}",
            vmms()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let stale = tmp.join(format!("skiff-{pid}-hang"));
    assert!(
        stale.is_dir(),
        "no state directory {} left to clean",
        stale.display()
    );
    let out = run("ok.json").wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "removed {}, the state directory of a skiff run (pid {pid}) that ended without cleaning up",
            stale.display()
        )),
        "{text}"
    );
    let left: Vec<PathBuf> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
