//! Boots real guests: both kernels at several vCPU counts and memory sizes,
//! and checks from inside the guest what it was given.

use skiff_tests::{fixtures, run_batch, VmOutcome, VmSpec};
use skiff_vmm::VmConfig;

/// (vCPUs, MiB) pairs that cover one and several vCPUs, and memory below
/// and above the 3 GiB MMIO gap.
const SHAPES: [(u8, u64); 3] = [(1, 256), (2, 2048), (4, 6144)];
const MARKER: &str = "skiff-guest: init ready";

fn boot_spec(kernel: &std::path::Path, cpus: u8, mib: u64, cmdline_extra: &str) -> VmSpec {
    let f = fixtures();
    VmSpec::new(
        &format!("cpus{cpus}-mem{mib}"),
        VmConfig {
            initrd: Some(f.initrd),
            cmdline: format!("console=ttyS0 panic=-1 {cmdline_extra}")
                .trim()
                .to_owned(),
            cpus,
            memory_mib: mib,
            ..VmConfig::new(kernel)
        },
    )
}

/// Checks a run that should have booted to the marker and powered off.
fn assert_booted(o: &VmOutcome, cpus: u8, mib: u64) {
    assert_eq!(o.status, Some(0), "expected power off:\n{}", o.describe());
    assert!(
        o.serial.contains(MARKER),
        "no init marker:\n{}",
        o.describe()
    );
    assert!(
        o.log.contains("guest powered off"),
        "no power-off log line:\n{}",
        o.describe()
    );
    assert_costs_logged(o);
    let nproc: u32 = o
        .guest_fact("nproc")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no nproc from the guest:\n{}", o.describe()));
    assert_eq!(nproc, u32::from(cpus), "nproc:\n{}", o.describe());
    let memtotal_kb: u64 = o
        .guest_fact("memtotal_kb")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal from the guest:\n{}", o.describe()));
    // MemTotal is what is left after the kernel's own reservations (its
    // image, page structures, and a 64 MiB swiotlb buffer when memory goes
    // above 4 GiB): a little under what was asked, never more.
    let asked_kb = mib * 1024;
    let swiotlb_kb = if mib > 3072 { 64 * 1024 } else { 0 };
    let reserve_kb = 64 * 1024 + asked_kb / 40 + swiotlb_kb;
    assert!(
        memtotal_kb <= asked_kb && memtotal_kb + reserve_kb >= asked_kb,
        "MemTotal {memtotal_kb} kB for {mib} MiB asked (allowed: {} to {asked_kb}):\n{}",
        asked_kb - reserve_kb,
        o.describe()
    );
}

/// The number after the first `key` in `text` (its digits and dots).
fn number_after(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// skiff-vmm's closing lines: its exits by kind (a guest logging to ttyS0
/// reads the line status register) and its threads' CPU time, part of it
/// the guest's own.
fn assert_costs_logged(o: &VmOutcome) {
    let exits = number_after(&o.log, "vCPU exits to skiff-vmm: ");
    let port_reads = number_after(&o.log, "(port reads ");
    assert!(
        exits.is_some_and(|n| n > 0.0) && port_reads.is_some_and(|n| n > 0.0),
        "no exit counts (got {exits:?}, port reads {port_reads:?}):\n{}",
        o.describe()
    );
    let total = number_after(&o.log, "CPU time: ");
    let guest = o
        .log
        .find(" in all, ")
        .and_then(|i| number_after(&o.log[i..], " in all, "));
    match (total, guest) {
        (Some(total), Some(guest)) if guest > 0.0 && guest <= total => {}
        _ => panic!(
            "no CPU time line with a guest share (got {total:?}, {guest:?}):\n{}",
            o.describe()
        ),
    }
}

fn boot_matrix(label: &str, kernel: &std::path::Path) {
    let specs: Vec<VmSpec> = SHAPES
        .iter()
        .map(|&(cpus, mib)| boot_spec(kernel, cpus, mib, ""))
        .collect();
    let outcomes = run_batch(label, 8192, &specs);
    for (o, &(cpus, mib)) in outcomes.iter().zip(SHAPES.iter()) {
        assert_booted(o, cpus, mib);
    }
}

#[test]
fn microvm_kernel_boots_with_matching_cpus_and_memory() {
    boot_matrix("boot-microvm", &fixtures().microvm);
}

/// The largest shape the VMM promises: 8 vCPUs and 8 GiB (5 GiB of it
/// above the MMIO gap).
#[test]
fn microvm_kernel_boots_with_8_cpus_and_8_gib() {
    let (cpus, mib) = (8, 8192);
    let outcomes = run_batch(
        "boot-microvm-large",
        10240,
        &[boot_spec(&fixtures().microvm, cpus, mib, "")],
    );
    assert_booted(&outcomes[0], cpus, mib);
}

#[test]
fn debian_kernel_boots_with_matching_cpus_and_memory() {
    boot_matrix("boot-debian", &fixtures().debian);
}
