//! Bad input gets one clear error line naming the problem and a non-zero
//! exit, never a panic. These need no KVM: skiff-vmm checks its inputs
//! before it opens /dev/kvm.

use std::process::Command;

use skiff_tests::{fixtures, scratch_dir, skiff_vmm};

struct Run {
    status: i32,
    stderr: String,
}

fn vmm(args: &[&str]) -> Run {
    let out = Command::new(skiff_vmm())
        .args(args)
        .output()
        .expect("run skiff-vmm");
    Run {
        status: out.status.code().expect("exited, not killed"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn assert_clear_error(r: &Run, status: i32, needles: &[&str]) {
    assert_eq!(r.status, status, "stderr:\n{}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "expected '{n}' in:\n{}", r.stderr);
    }
    assert!(!r.stderr.contains("panicked"), "a panic:\n{}", r.stderr);
    let lines = r.stderr.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(lines <= 3, "expected a short message, got:\n{}", r.stderr);
}

#[test]
fn missing_kernel() {
    let r = vmm(&["--kernel", "/nonexistent/vmlinuz"]);
    assert_clear_error(
        &r,
        1,
        &[
            "cannot read kernel image /nonexistent/vmlinuz",
            "No such file",
        ],
    );
}

#[test]
fn unreadable_kernel() {
    // A directory opens but cannot be read as a kernel.
    let dir = scratch_dir("bad-unreadable");
    let r = vmm(&["--kernel", &dir.display().to_string()]);
    assert_eq!(r.status, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&dir.display().to_string()),
        "{}",
        r.stderr
    );
}

#[test]
fn file_that_is_not_a_kernel() {
    let dir = scratch_dir("bad-notakernel");
    let path = dir.join("notes.txt");
    std::fs::write(&path, "this is not a kernel\n".repeat(100)).unwrap();
    let r = vmm(&["--kernel", &path.display().to_string()]);
    assert_clear_error(&r, 1, &["is not a Linux kernel image", "notes.txt"]);
}

#[test]
fn missing_initrd() {
    let f = fixtures();
    let r = vmm(&[
        "--kernel",
        &f.microvm.display().to_string(),
        "--initrd",
        "/nonexistent/initrd.img",
    ]);
    assert_clear_error(&r, 1, &["cannot read initrd /nonexistent/initrd.img"]);
}

#[test]
fn initrd_larger_than_guest_memory() {
    let f = fixtures();
    let dir = scratch_dir("bad-biginitrd");
    let big = dir.join("big.img");
    let file = std::fs::File::create(&big).unwrap();
    file.set_len(100 << 20).unwrap(); // sparse, 100 MiB
    let r = vmm(&[
        "--kernel",
        &f.microvm.display().to_string(),
        "--initrd",
        &big.display().to_string(),
        "--memory",
        "64",
    ]);
    assert_clear_error(&r, 1, &["does not fit in guest memory", "big.img"]);
}

#[test]
fn zero_cpus() {
    let r = vmm(&["--kernel", "/x", "--cpus", "0"]);
    assert_clear_error(&r, 2, &["--cpus", "0"]);
}

#[test]
fn too_little_memory() {
    let r = vmm(&["--kernel", "/x", "--memory", "16"]);
    assert_clear_error(&r, 2, &["--memory", "16"]);
}

#[test]
fn kvm_device_missing() {
    let f = fixtures();
    let r = vmm(&[
        "--kernel",
        &f.microvm.display().to_string(),
        "--kvm-device",
        "/nonexistent/kvm",
    ]);
    assert_clear_error(&r, 1, &["cannot open /nonexistent/kvm"]);
}

#[test]
fn kvm_device_unusable() {
    let f = fixtures();
    let r = vmm(&[
        "--kernel",
        &f.microvm.display().to_string(),
        "--kvm-device",
        "/dev/null",
    ]);
    assert_clear_error(&r, 1, &["/dev/null is unusable", "not a KVM device"]);
}

#[test]
fn bad_serial_backend() {
    let r = vmm(&["--kernel", "/x", "--serial", "tcp:1234"]);
    assert_clear_error(&r, 2, &["tcp:1234", "stdio, file=PATH or none"]);
}

#[test]
fn help_documents_every_flag_and_exit_status() {
    let out = Command::new(skiff_vmm()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
        "--net",
        "--kvm-device",
        "--name",
        "EXIT STATUS",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn missing_disk_image() {
    let f = fixtures();
    let r = vmm(&[
        "--kernel",
        &f.microvm.display().to_string(),
        "--disk",
        "path=/nonexistent/root.img",
    ]);
    assert_clear_error(
        &r,
        1,
        &["disk vda", "cannot open disk image /nonexistent/root.img"],
    );
}

#[test]
fn disk_locked_by_another_process() {
    let f = fixtures();
    let dir = scratch_dir("bad-locked");
    let img = dir.join("busy.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let holder = std::fs::File::open(&img).unwrap();
    holder.lock_shared().unwrap();
    let r = vmm(&[
        "--kernel",
        &f.microvm.display().to_string(),
        "--disk",
        &format!("path={}", img.display()),
    ]);
    assert_clear_error(&r, 1, &["busy.img", "in use by another process"]);
}

#[test]
fn bad_disk_and_console_specs() {
    let r = vmm(&["--kernel", "/x", "--disk", "path=/a,size=3"]);
    assert_clear_error(&r, 2, &["unknown --disk option 'size'"]);
    let r = vmm(&["--kernel", "/x", "--disk", "path=/a,readonly=on,overlay=on"]);
    assert_clear_error(&r, 2, &["readonly=on and overlay=on"]);
    let r = vmm(&["--kernel", "/x", "--console", "tcp=1"]);
    assert_clear_error(&r, 2, &["tcp=1", "socket=PATH"]);
}

#[test]
fn console_socket_nobody_listens_on() {
    let f = fixtures();
    let r = vmm(&[
        "--kernel",
        &f.microvm.display().to_string(),
        "--console",
        "socket=/nonexistent/shell.sock",
        "--serial",
        "none",
    ]);
    assert_clear_error(&r, 1, &["console", "/nonexistent/shell.sock"]);
}

#[test]
fn bad_network_cards() {
    // Malformed or clashing cards are usage errors naming --net.
    let r = vmm(&["--kernel", "/x", "--net", "stream=/s,mac=52:54:00:zz:01:02"]);
    assert_clear_error(&r, 2, &["--net mac", "52:54:00:zz:01:02"]);
    let r = vmm(&["--kernel", "/x", "--net", "mac=52:54:00:12:01:02"]);
    assert_clear_error(&r, 2, &["--net needs stream=PATH"]);
    let r = vmm(&[
        "--kernel",
        "/x",
        "--net",
        "stream=/s,mac=52:54:00:12:01:02,id=lan",
        "--net",
        "stream=/s,mac=52:54:00:12:01:03,id=lan",
    ]);
    assert_clear_error(&r, 2, &["--net", "'lan'"]);
    // A switch socket nobody listens on is a start-up error naming it.
    let f = fixtures();
    let r = vmm(&[
        "--kernel",
        &f.microvm.display().to_string(),
        "--net",
        "stream=/nonexistent/vlan1.sock,mac=52:54:00:12:01:02",
        "--serial",
        "none",
    ]);
    assert_clear_error(&r, 1, &["network card net0", "/nonexistent/vlan1.sock"]);
}
