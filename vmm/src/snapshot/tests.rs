//! The state file's header and checks, and the memory file, without KVM.

use super::*;
use vm_memory::{Bytes, GuestAddress};

/// A state file around `payload`, with its header as written.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(payload);
    out
}

fn refusal(bytes: &[u8]) -> String {
    match parse_state(Path::new("snap/state"), bytes) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_damaged_state_file_is_refused_saying_why() {
    assert!(refusal(b"").contains("shorter than a snapshot header"));
    assert!(refusal(&[0u8; 100]).contains("bad magic"));
    let good = framed(b"{}");
    // Another format version.
    let mut v = good.clone();
    v[8] = 9;
    assert!(refusal(&v).contains("format version 9"), "{}", refusal(&v));
    // Truncated.
    assert!(refusal(&good[..good.len() - 1]).contains("truncated"));
    // One bit flipped in the payload.
    let mut c = good.clone();
    *c.last_mut().unwrap() ^= 1;
    assert!(refusal(&c).contains("checksum mismatch"));
    // A length past the cap is refused before anything is read.
    let mut big = good.clone();
    big[12..20].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    assert!(refusal(&big).contains("more than"));
    // The right frame around the wrong payload.
    assert!(refusal(&good).contains("cannot decode the state"));
    // Every message names the file.
    assert!(refusal(&good).starts_with("snap/state: "));
}

#[test]
fn memory_is_written_sparsely_and_read_back_through_a_private_mapping() {
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let mem = crate::memory::create_guest_memory(64).unwrap();
    mem.write_obj(0xfeed_u64, GuestAddress(0x1000)).unwrap();
    mem.write_obj(0xbeef_u64, GuestAddress((64 << 20) - 8))
        .unwrap();
    let written = write_memory(dir.as_path(), &mem).unwrap();
    // Two pages hold data; the rest are holes.
    assert_eq!(written, 2 * PAGE as u64);
    let f = open_memory(dir.as_path(), 64 << 20).unwrap();
    assert!(f.metadata().unwrap().len() == 64 << 20);
    let restored =
        crate::memory::create_guest_memory_from_file(64, &f, crate::memory::RestoreMemory::Map)
            .unwrap();
    assert_eq!(
        restored.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
        0xfeed
    );
    assert_eq!(
        restored
            .read_obj::<u64>(GuestAddress((64 << 20) - 8))
            .unwrap(),
        0xbeef
    );
    // The guest's writes stay private: the file is unchanged, and a
    // second VM mapping it sees the saved contents.
    restored.write_obj(1u64, GuestAddress(0x1000)).unwrap();
    let other =
        crate::memory::create_guest_memory_from_file(64, &f, crate::memory::RestoreMemory::Map)
            .unwrap();
    assert_eq!(other.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0xfeed);
    // A memory file of the wrong size is refused.
    let err = open_memory(dir.as_path(), 128 << 20)
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated or another VM's"), "{err}");
    std::fs::remove_file(dir.as_path().join(MEMORY_FILE)).unwrap();
    let err = open_memory(dir.as_path(), 64 << 20)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot open the snapshot memory"), "{err}");
}

#[test]
fn a_copy_restore_reads_every_data_extent_into_memory_of_its_own() {
    use crate::memory::RestoreMemory;
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    // 3.5 GiB: two regions around the MMIO gap, so the file offsets of
    // the second region are checked too.
    let mib = 3 * 1024 + 512;
    let mem = crate::memory::create_guest_memory(mib).unwrap();
    let high = GuestAddress((1u64 << 32) + 0x20_0000);
    let marks = [
        (GuestAddress(0), 1u64),
        (GuestAddress(0x1234_5000), 2),
        (GuestAddress(crate::memory::MMIO_GAP_START - 8), 3),
        (high, 4),
        (GuestAddress((1u64 << 32) + (512 << 20) - 8), 5),
    ];
    for (addr, v) in marks {
        mem.write_obj(v, addr).unwrap();
    }
    write_memory(dir.as_path(), &mem).unwrap();
    drop(mem);
    let f = open_memory(dir.as_path(), mib << 20).unwrap();
    let copy = crate::memory::create_guest_memory_from_file(mib, &f, RestoreMemory::Copy).unwrap();
    for (addr, v) in marks {
        assert_eq!(copy.read_obj::<u64>(addr).unwrap(), v, "{addr:?}");
    }
    // Holes read as zeros, and writes stay in the copy.
    assert_eq!(copy.read_obj::<u64>(GuestAddress(0x10_0000)).unwrap(), 0);
    copy.write_obj(9u64, high).unwrap();
    let map = crate::memory::create_guest_memory_from_file(mib, &f, RestoreMemory::Map).unwrap();
    assert_eq!(map.read_obj::<u64>(high).unwrap(), 4);
}

#[test]
fn this_host_has_a_cpu_fingerprint() {
    let a = HostCpu::current();
    assert_eq!(a, HostCpu::current());
    assert_eq!(a.vendor.len(), 12);
}
