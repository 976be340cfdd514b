//! A Debian systemd root on virtio-blk, under both kernels: systemd reaches
//! multi-user.target and the backdoor shell on hvc0 answers with the NixOS
//! framing. The microVM kernel's guest is in backdoor_stress.rs, with the
//! stress it also runs.

use std::path::{Path, PathBuf};

use skiff_tests::{cache_dir, disk, fixtures, run_batch, VmOutcome, VmSpec};
use skiff_vmm::config::BlockConfig;
use skiff_vmm::VmConfig;

pub(crate) const SESSION: &str = env!("CARGO_BIN_EXE_skiff-guest-session");

pub(crate) fn rootfs(name: &str) -> PathBuf {
    let p = cache_dir().join("guest").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run tests/guest/build",
        p.display()
    );
    p
}

/// A guest on `kernel` whose root is `root` (vda), the test init handing
/// over to systemd, with `cmdline` added and virtio-rng.
pub(crate) fn systemd_guest(kernel: &Path, root: BlockConfig, cmdline: &str, cpus: u8) -> VmConfig {
    VmConfig {
        initrd: Some(fixtures().initrd),
        cmdline: format!("console=ttyS0 panic=-1 {cmdline}"),
        memory_mib: 1024,
        cpus,
        disks: vec![root],
        rng: true,
        ..VmConfig::new(kernel)
    }
}

pub(crate) const CHECKS: [&str; 2] = [
    "systemd",
    "cmd=systemctl is-active multi-user.target && findmnt -n -o FSTYPE / && uname -r",
];

/// Runs `spec` alone in a batch and checks that systemd reached
/// multi-user.target in it and the backdoor answered; returns its outcome.
pub(crate) fn run_systemd_guest(label: &str, spec: VmSpec) -> VmOutcome {
    let o = run_batch(label, 4096, &[spec]).remove(0);
    eprintln!("{}", o.log);
    assert_eq!(o.status, Some(0), "{}", o.describe());
    let state = o.assert_check("systemd");
    assert!(
        state.contains("running") || state.contains("degraded"),
        "{}",
        o.describe()
    );
    let facts = o.assert_check("cmd");
    assert!(facts.contains("active"), "{}", o.describe());
    o
}

/// Debian's stock kernel on a read-only erofs root with a tmpfs overlay.
#[test]
fn systemd_reaches_multi_user_under_the_debian_kernel() {
    let o = run_systemd_guest(
        "systemd-debian",
        VmSpec::session(
            "debian-erofs",
            Path::new(SESSION),
            "bash",
            &CHECKS,
            systemd_guest(
                &fixtures().debian,
                BlockConfig {
                    readonly: true,
                    ..disk(rootfs("rootfs.erofs"))
                },
                "root=/dev/vda rootfstype=erofs",
                2,
            ),
        ),
    );
    assert!(
        o.log.contains("overlay") && o.log.contains("amd64"),
        "{}",
        o.describe()
    );
}
