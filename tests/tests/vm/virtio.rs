//! virtio devices end to end: the busybox backdoor shell on the virtio console,
//! virtio-blk (writable, copy-on-write overlay, read-only) and virtio-rng,
//! under both kernels.

use std::path::Path;

use skiff_tests::{disk, fixtures, run_batch, scratch_dir, VmSpec};
use skiff_vmm::config::BlockConfig;
use skiff_vmm::VmConfig;

const SESSION: &str = env!("CARGO_BIN_EXE_skiff-guest-session");

/// The bytes `yes skiff-disk-pattern | head -c N` produces.
fn disk_pattern(len: usize) -> Vec<u8> {
    b"skiff-disk-pattern\n"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

fn make_image(path: &Path, len: u64, fill: u8) {
    let block = vec![fill; 1 << 20];
    let mut data = Vec::with_capacity(len as usize);
    while (data.len() as u64) < len {
        data.extend_from_slice(&block[..(len as usize - data.len()).min(block.len())]);
    }
    std::fs::write(path, data).unwrap();
}

/// The busybox guest on `kernel`, its init a backdoor shell, with `disks`
/// (vda, vdb, ... in order) and virtio-rng.
fn busybox_guest(kernel: &Path, disks: Vec<BlockConfig>) -> VmConfig {
    VmConfig {
        initrd: Some(fixtures().initrd),
        cmdline: "console=ttyS0 panic=-1 skiff.action=backdoor".into(),
        memory_mib: 512,
        cpus: 1,
        disks,
        rng: true,
        ..VmConfig::new(kernel)
    }
}

#[test]
fn backdoor_disks_and_rng_work_under_both_kernels() {
    let f = fixtures();
    let dir = scratch_dir("virtio-input");
    let data = dir.join("data.img");
    let base = dir.join("base.img");
    let ro = dir.join("ro.img");
    let small = dir.join("small.img");
    make_image(&data, 256 << 20, 0);
    make_image(&base, 16 << 20, 0x5a);
    make_image(&ro, 16 << 20, 0xa5);
    make_image(&small, 64 << 20, 0);

    let microvm = busybox_guest(
        &f.microvm,
        vec![
            BlockConfig {
                id: Some("data".into()),
                ..disk(&data)
            },
            BlockConfig {
                overlay: true,
                ..disk(&base)
            },
            BlockConfig {
                readonly: true,
                ..disk(&ro)
            },
        ],
    );
    let overlay_check = "cmd=yes overlay | head -c 1048576 | dd of=/dev/vdb bs=65536 2>/dev/null && sync \
        && echo 3 > /proc/sys/vm/drop_caches && head -c 7 /dev/vdb | grep -qx overlay && echo overlay-ok";
    let debian = busybox_guest(&f.debian, vec![disk(&small)]);
    let specs = vec![
        VmSpec::session(
            "microvm",
            Path::new(SESSION),
            "sh",
            // The backdoor stress (1,000 commands, 64 MiB of output) runs
            // in the systemd test, with bash and the upstream framing.
            &[
                "cmd=for i in $(seq 1 200); do echo line-$i; done | tail -n1",
                "disk-write=/dev/vda:256",
                overlay_check,
                "write-fails=/dev/vdc",
                "cmd=cat /sys/block/vda/serial",
                "cmd=grep -q virtio /sys/class/misc/hw_random/rng_current && head -c 64 /dev/hwrng | wc -c",
            ],
            microvm,
        ),
        VmSpec::session(
            "debian",
            Path::new(SESSION),
            "sh",
            &[
                "disk-write=/dev/vda:64",
                "cmd=grep -q virtio /sys/class/misc/hw_random/rng_current && head -c 64 /dev/hwrng | wc -c",
            ],
            debian,
        ),
    ];
    let o = run_batch("virtio", 3072, &specs);
    let (m, d) = (&o[0], &o[1]);
    eprintln!("{}", m.log);
    assert_eq!(m.status, Some(0), "{}", m.describe());
    assert!(m.log.contains("line-200"), "{}", m.describe());
    m.assert_check("disk-write");
    assert!(
        m.assert_check("cmd").contains("overlay-ok") || m.log.contains("overlay-ok"),
        "{}",
        m.describe()
    );
    m.assert_check("write-fails");
    assert!(m.log.contains(": data"), "GET_ID serial:\n{}", m.describe());
    assert!(m.log.contains(": 64"), "hwrng bytes:\n{}", m.describe());

    // The host file holds exactly what the guest wrote; the overlay's base
    // and the read-only image are unchanged.
    assert!(
        std::fs::read(&data).unwrap() == disk_pattern(256 << 20),
        "data.img differs from the pattern"
    );
    assert!(
        std::fs::read(&base).unwrap().iter().all(|&b| b == 0x5a),
        "overlay base changed"
    );
    assert!(
        std::fs::read(&ro).unwrap().iter().all(|&b| b == 0xa5),
        "read-only image changed"
    );

    assert_eq!(d.status, Some(0), "{}", d.describe());
    d.assert_check("disk-write");
    assert!(d.log.contains(": 64"), "hwrng bytes:\n{}", d.describe());
    assert!(
        std::fs::read(&small).unwrap() == disk_pattern(64 << 20),
        "small.img differs from the pattern"
    );
}
