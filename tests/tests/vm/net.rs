//! Multi-machine tests over Skiff's VLAN switch, the NixOS way: nodes on
//! VLANs get the NixOS addresses, MACs and /etc/hosts, and talk through
//! virtio-net cards and one switch per VLAN (tests/nixos/net/), which a
//! QEMU VM joins too. Two test hosts run two tests each.

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

/// Runs `tests` (name, description under tests/nixos/net/, extra
/// arguments, time limit) in one batch labelled `label`, checks that each
/// passed and left nothing behind, and returns their output directory.
fn run_net_tests(label: &str, tests: &[(&str, &str, u64)]) -> std::path::PathBuf {
    fixtures();
    assert!(
        cache_dir().join("guest/rootfs.ext4").is_file(),
        "rootfs.ext4 is missing: run tests/guest/build"
    );
    let dir = scratch_dir(&format!("{label}-out"));
    let specs: Vec<_> = tests
        .iter()
        .map(|(name, args, timeout_s)| {
            skiff_run(
                name,
                &format!("tests/nixos/net/{name}.json {args}"),
                &dir.join(name),
                *timeout_s,
            )
        })
        .collect();
    let o = run_batch(label, 3072, &specs);
    for run in &o {
        assert_eq!(exit_of(run), 0, "{}:\n{}", run.name, run.serial);
        assert!(
            run.serial.contains("test script finished in"),
            "{}",
            run.serial
        );
        assert_clean(run);
    }
    dir
}

/// A web server and its client on VLAN 1, the switch writing what it saw,
/// and a QEMU VM on the same VLAN talking to a Skiff one.
#[test]
fn nginx_and_a_qemu_vm_over_a_vlan() {
    let dir = run_net_tests(
        "net-web",
        &[("nginx", "--pcap", 1500), ("qemu-interop", "", 1500)],
    );
    // The switch saw the web traffic, and wrote it as tcpdump reads it.
    pcap_records(&dir.join("nginx/vlan1.pcap"), 10);
}

/// A router between two VLANs, and a database server and its client.
#[test]
fn router_and_postgresql_over_vlans() {
    let dir = run_net_tests(
        "net-routed",
        &[("router", "", 1800), ("postgresql", "", 1800)],
    );
    let junit = String::from_utf8_lossy(&read(&dir.join("router/junit.xml"))).into_owned();
    assert!(junit.contains("failures=\"0\""), "{junit}");
}
