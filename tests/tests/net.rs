//! Multi-machine tests over Skiff's VLAN switch, the NixOS way: nodes on
//! VLANs get the NixOS addresses, MACs and /etc/hosts, and talk through
//! virtio-net cards and one switch per VLAN (tests/nixos/net/), which a
//! QEMU VM joins too. All four run in one test host.

use std::path::Path;

use skiff_tests::{assert_clean, cache_dir, exit_of, fixtures, run_batch, scratch_dir, skiff_run};

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Checks a pcap file's global header (little-endian, Ethernet) and that
/// it holds at least `min_records` frames; returns how many it holds.
fn pcap_records(p: &Path, min_records: usize) -> usize {
    let data = read(p);
    assert!(
        data.len() >= 24,
        "{} is shorter than a pcap header",
        p.display()
    );
    assert_eq!(&data[..4], &0xa1b2_c3d4u32.to_le_bytes(), "pcap magic");
    assert_eq!(
        u32::from_le_bytes(data[20..24].try_into().unwrap()),
        1,
        "link type Ethernet"
    );
    let mut at = 24;
    let mut records = 0;
    while at + 16 <= data.len() {
        let incl = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap()) as usize;
        assert!(incl >= 14, "a record shorter than an Ethernet header");
        at += 16 + incl;
        records += 1;
    }
    assert_eq!(at, data.len(), "{} ends inside a record", p.display());
    assert!(
        records >= min_records,
        "{records} frames in {}",
        p.display()
    );
    records
}

#[test]
fn nginx_router_postgresql_and_qemu_over_vlans() {
    fixtures();
    assert!(
        cache_dir().join("guest/rootfs.ext4").is_file(),
        "rootfs.ext4 is missing: run tests/guest/build"
    );
    let dir = scratch_dir("net");
    let o = run_batch(
        "net",
        3072,
        &[
            skiff_run(
                "nginx",
                "tests/nixos/net/nginx.json --pcap",
                &dir.join("nginx"),
                1500,
            ),
            skiff_run(
                "router",
                "tests/nixos/net/router.json",
                &dir.join("router"),
                1800,
            ),
            skiff_run(
                "postgresql",
                "tests/nixos/net/postgresql.json",
                &dir.join("postgresql"),
                1800,
            ),
            skiff_run(
                "qemu-interop",
                "tests/nixos/net/qemu-interop.json",
                &dir.join("qemu-interop"),
                1500,
            ),
        ],
    );
    for run in &o {
        assert_eq!(exit_of(run), 0, "{}:\n{}", run.name, run.serial);
        assert!(
            run.serial.contains("test script finished in"),
            "{}",
            run.serial
        );
        assert_clean(run);
    }
    // The switch saw the web traffic, and wrote it as tcpdump reads it.
    pcap_records(&dir.join("nginx/vlan1.pcap"), 10);
    let junit = String::from_utf8_lossy(&read(&dir.join("router/junit.xml"))).into_owned();
    assert!(junit.contains("failures=\"0\""), "{junit}");
}
