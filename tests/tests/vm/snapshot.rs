//! Snapshots end to end: a busybox guest with 2 vCPUs is saved with QMP
//! `migrate file:DIR`, its VMM quits, and a new skiff-vmm restores it
//! with `--incoming file:DIR`: a counter loop in the guest goes on, files
//! in its RAM-backed root are still there, a disk overlay's contents come
//! back from the snapshot while its base image stays untouched, and the
//! rng and the console work. Damaged copies of that snapshot, and VMs
//! that do not fit it, are refused with exit status 1 and a message that
//! names the problem. Three VMs restored at once from one snapshot get
//! new VM generation ids, so their random numbers differ, and share the
//! snapshot's clean pages.

use std::path::Path;

use skiff_tests::{disk, fixtures, run_batch, scratch_dir, VmSpec};
use skiff_vmm::config::{BlockConfig, ConsoleBackend};
use skiff_vmm::VmConfig;

const SESSION: &str = env!("CARGO_BIN_EXE_skiff-guest-session");

/// The number a `cmd:LABEL` check printed last.
fn number(line: &str) -> u64 {
    line.split_whitespace()
        .last()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number at the end of {line:?}"))
}

#[test]
fn a_busybox_guest_survives_migrate_to_file_and_incoming() {
    let f = fixtures();
    let dir = scratch_dir("snapshot-input");
    let base = dir.join("base.img");
    std::fs::write(&base, vec![0x5au8; 16 << 20]).unwrap();
    let snap = dir.join("snap");
    let qmp = format!("/tmp/skiff-snapshot-{}.qmp", std::process::id());
    let config = VmConfig {
        initrd: Some(f.initrd.clone()),
        cmdline: "console=ttyS0 panic=-1 skiff.action=backdoor".into(),
        memory_mib: 512,
        cpus: 2,
        disks: vec![BlockConfig {
            overlay: true,
            ..disk(&base)
        }],
        rng: true,
        qmp: vec![qmp.into()],
        ..VmConfig::new(&f.microvm)
    };
    let migrate = format!("migrate={}", snap.display());
    let checks = [
        // A counter in the guest's RAM, and a file.
        "cmd:start=echo kept > /note && \
         (i=0; while :; do i=$((i+1)); echo $i > /counter; sleep 0.2; done) </dev/null >/dev/null 2>&1 & \
         sleep 1; cat /counter",
        // Written through to the overlay, and dropped from the page cache,
        // so after the restore it must come from the saved overlay.
        "cmd:overlay-write=yes overlay | head -c 1048576 | dd of=/dev/vda bs=65536 2>/dev/null \
         && sync && echo 3 > /proc/sys/vm/drop_caches && echo written",
        "cmd:before=cat /counter",
        &migrate,
        "cmd:note=cat /note",
        "cmd:after=cat /counter",
        "cmd:later=sleep 2; cat /counter",
        "cmd:overlay=echo 3 > /proc/sys/vm/drop_caches; head -c 7 /dev/vda",
        "cmd:rng=head -c 64 /dev/hwrng | wc -c",
        "cmd:cpus=grep -c ^processor /proc/cpuinfo",
    ];
    let spec = VmSpec::session("busybox", Path::new(SESSION), "sh", &checks, config.clone());
    // Damaged copies of the snapshot, made once it exists.
    let copy = |name: &str, damage: &str| {
        let to = dir.join(name);
        format!(
            "rm -rf {to} && cp -r {snap} {to} && {damage}",
            to = to.display(),
            snap = snap.display()
        )
    };
    let state = |name: &str| dir.join(name).join("state").display().to_string();
    let prepare = [
        copy(
            "truncated",
            &format!("truncate -s -100 {}", state("truncated")),
        ),
        copy(
            "corrupted",
            &format!(
                "printf x | dd of={} bs=1 seek=200 conv=notrunc 2>/dev/null",
                state("corrupted")
            ),
        ),
        copy(
            "version",
            &format!(
                "printf '\\011' | dd of={} bs=1 seek=8 conv=notrunc 2>/dev/null",
                state("version")
            ),
        ),
        copy(
            "no-memory",
            &format!("rm {}/no-memory/memory", dir.display()),
        ),
    ]
    .join(" && ");
    // Each refusal: the config to restore with, the snapshot copy, and
    // what the message must say.
    let refusals: Vec<(&str, VmConfig, &str, &str)> = vec![
        (
            "truncated",
            config.clone(),
            "truncated",
            "truncated or corrupted",
        ),
        (
            "corrupted",
            config.clone(),
            "corrupted",
            "checksum mismatch",
        ),
        ("version", config.clone(), "version", "format version 9"),
        (
            "no-memory",
            config.clone(),
            "no-memory",
            "cannot open the snapshot memory",
        ),
        (
            "memory",
            VmConfig {
                memory_mib: 1024,
                ..config.clone()
            },
            "snap",
            "it has 512 MiB of memory, this VM 1024 MiB",
        ),
        (
            "devices",
            VmConfig {
                rng: false,
                ..config.clone()
            },
            "snap",
            "its virtio devices are [vda, hvc0, rng], this VM's [vda, hvc0]",
        ),
    ];
    let mut specs = vec![spec, VmSpec::shell("damage", prepare, 60)];
    for (name, c, copy, _) in &refusals {
        // The same devices, the console on a file: a refused restore
        // must not depend on a peer.
        let c = VmConfig {
            incoming: Some(dir.join(copy)),
            console: Some(ConsoleBackend::File(dir.join(format!("{name}.console")))),
            qmp: Vec::new(),
            ..c.clone()
        };
        specs.push(VmSpec::new(name, c));
    }
    let outcomes = run_batch("snapshot", 3072, &specs);
    assert_eq!(outcomes[1].status, Some(0), "{}", outcomes[1].describe());
    for ((name, _, _, message), o) in refusals.iter().zip(&outcomes[2..]) {
        assert_eq!(o.status, Some(1), "refusal {name}: {}", o.describe());
        assert!(
            o.log.contains("cannot restore the snapshot") && o.log.contains(message),
            "refusal {name}: expected {message:?}\n{}",
            o.describe()
        );
    }
    let o = outcomes.into_iter().next().unwrap();
    eprintln!("{}", o.log);
    assert_eq!(o.status, Some(0), "{}", o.describe());
    let saved = o.assert_check("migrate");
    eprintln!("migrate: {saved}");
    assert!(o.log.contains("restored from"), "{}", o.describe());
    assert!(
        o.assert_check("cmd:note").ends_with("kept"),
        "{}",
        o.describe()
    );
    let before = number(o.assert_check("cmd:before"));
    let after = number(o.assert_check("cmd:after"));
    let later = number(o.assert_check("cmd:later"));
    assert!(
        before <= after && after < later,
        "counter {before} -> {after} -> {later}\n{}",
        o.describe()
    );
    assert!(o.assert_check("cmd:overlay").ends_with("overlay"));
    assert_eq!(number(o.assert_check("cmd:rng")), 64);
    assert_eq!(number(o.assert_check("cmd:cpus")), 2);
    // The overlay's base image was never written.
    let image = std::fs::read(&base).unwrap();
    assert!(image.iter().all(|&b| b == 0x5a), "the base image changed");
    // The snapshot holds a state file and a sparse memory file.
    let memory = std::fs::metadata(snap.join("memory")).unwrap();
    assert_eq!(memory.len(), 512 << 20);
    assert!(snap.join("state").is_file());
}

/// A number after `key` in a check line (`key 123` or `key [1, 2]`: the
/// list's numbers).
fn numbers_after(line: &str, key: &str) -> Vec<u64> {
    let rest = line
        .split_once(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"))
        .1
        .trim_start();
    let field = if let Some(list) = rest.strip_prefix('[') {
        list.split(']').next().unwrap_or_default()
    } else {
        rest.split([';', ' ']).next().unwrap_or_default()
    };
    field
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{key}: {line:?}"))
        })
        .collect()
}

/// Three VMs restored at once from one snapshot of a busybox guest: each
/// runs, each reseeds its RNG for its new VM generation id so their
/// `/dev/urandom` bytes differ, each clock set from the host's keeps within
/// 2 s of it, and the three share the snapshot's clean pages: their summed
/// PSS is printed beside one guest's RSS and must stay under twice it
/// (three times it if nothing were shared).
#[test]
fn three_clones_of_one_snapshot_diverge_and_share_memory() {
    let f = fixtures();
    let qmp = format!("/tmp/skiff-clones-{}.qmp", std::process::id());
    // In the test host's own /tmp, as a snapshot cache on a local disk.
    let snap = format!("/tmp/skiff-clones-{}", std::process::id());
    let config = VmConfig {
        initrd: Some(f.initrd.clone()),
        cmdline: "console=ttyS0 panic=-1 skiff.action=backdoor".into(),
        memory_mib: 256,
        cpus: 1,
        qmp: vec![qmp.into()],
        ..VmConfig::new(&f.microvm)
    };
    let clones = format!("clones={snap}:3");
    let checks = [
        "cmd:booted=echo booted; head -c 8 /dev/urandom | wc -c",
        &clones,
        "cmd:after=echo first clone goes on",
    ];
    let spec = VmSpec::session("clones", Path::new(SESSION), "sh", &checks, config);
    let outcomes = run_batch("snapshot-clones", 2048, &[spec]);
    let o = &outcomes[0];
    eprintln!("{}", o.log);
    assert_eq!(o.status, Some(0), "{}", o.describe());
    let line = o.assert_check("clones");
    eprintln!("clones: {line}");
    assert!(line.contains("each reseeded once"), "{}", o.describe());
    let pss = numbers_after(line, "pss_kib");
    let rss = numbers_after(line, "rss_kib");
    assert_eq!((pss.len(), rss.len()), (3, 3), "{line}");
    let sum: u64 = pss.iter().sum();
    let one = *rss.iter().max().unwrap();
    eprintln!(
        "summed PSS of three clones: {} MiB; one clone's RSS: {} MiB ({:.2}x)",
        sum / 1024,
        one / 1024,
        sum as f64 / one as f64
    );
    // Unshared, three clones would cost three RSS; sharing the
    // snapshot's clean pages must save at least a third of that.
    assert!(
        sum < one * 2,
        "the clones share too little: summed PSS {sum} KiB, one RSS {one} KiB\n{line}"
    );
    assert!(o.assert_check("cmd:after").ends_with("goes on"));
}

/// A systemd guest on a writable copy of the Debian root: a file written
/// and not synced before `migrate` is there after `--incoming`, and after
/// the restored guest powers off cleanly the image passes `e2fsck -fn`
/// and holds the file.
#[test]
fn a_systemd_guest_keeps_unsynced_writes_over_a_restore() {
    let f = fixtures();
    let dir = scratch_dir("snapshot-systemd-input");
    let image = dir.join("root.img");
    let status = std::process::Command::new("cp")
        .args(["--sparse=always"])
        .arg(crate::systemd::rootfs("rootfs.ext4"))
        .arg(&image)
        .status()
        .expect("cp");
    assert!(status.success(), "copying rootfs.ext4");
    let snap = dir.join("snap");
    let mut config = crate::systemd::systemd_guest(&f.microvm, disk(&image), "root=/dev/vda rw", 2);
    config.qmp = vec![format!("/tmp/skiff-snapshot-systemd-{}.qmp", std::process::id()).into()];
    let migrate = format!("migrate={}", snap.display());
    let checks = [
        "systemd",
        "cmd:write=echo unsynced-before-the-snapshot > /root/snapshot-note && cat /root/snapshot-note",
        &migrate,
        "cmd:note=cat /root/snapshot-note",
        "cmd:unit=systemctl is-active multi-user.target",
        // As a clean shutdown leaves it (the session's poweroff is
        // forced): everything written, then the root read-only, which
        // checkpoints ext4's journal.
        "cmd:readonly=sync && echo 1 > /proc/sys/kernel/sysrq && echo u > /proc/sysrq-trigger \
         && sleep 3 && grep ' / ' /proc/mounts",
    ];
    let mut session = VmSpec::session(
        "systemd",
        Path::new(crate::systemd::SESSION),
        "bash",
        &checks,
        config,
    );
    session.timeout_s = 1800;
    let fsck = VmSpec::shell(
        "fsck",
        format!(
            "e2fsck -fn {img}; echo e2fsck=$?; debugfs -R 'cat /root/snapshot-note' {img} 2>/dev/null",
            img = image.display()
        ),
        300,
    );
    let o = run_batch("snapshot-systemd", 3072, &[session, fsck]);
    let (guest, check) = (&o[0], &o[1]);
    assert_eq!(guest.status, Some(0), "{}", guest.describe());
    guest.assert_check("migrate");
    assert!(
        guest
            .assert_check("cmd:note")
            .ends_with("unsynced-before-the-snapshot"),
        "{}",
        guest.describe()
    );
    assert!(guest.assert_check("cmd:unit").ends_with("active"));
    assert!(
        guest.assert_check("cmd:readonly").contains(" ro"),
        "{}",
        guest.describe()
    );
    assert!(check.serial.contains("e2fsck=0"), "{}", check.serial);
    assert!(
        check.serial.contains("unsynced-before-the-snapshot"),
        "{}",
        check.serial
    );
}
