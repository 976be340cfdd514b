//! CPUID as the guest sees it: what KVM supports, with the APIC id, the
//! hypervisor bit and a topology of `n` single-threaded cores in one socket,
//! for Intel (leaves 1, 4, 0xB, 0x1F) and AMD (0x80000001, 0x80000008,
//! 0x8000001D, 0x8000001E) hosts alike.

use kvm_bindings::kvm_cpuid_entry2;

/// CPU vendor, from leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD (or HygonGenuine).
    Amd,
    /// Anything else: only the vendor-neutral leaves are patched.
    Other,
}

/// Reads the vendor from leaf 0.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(e) = entries.iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&e.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&e.edx.to_le_bytes());
    id[8..].copy_from_slice(&e.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_ECX_PDCM: u32 = 1 << 15;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF6_ECX_EPB: u32 = 1 << 3;
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `n` things (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Patches `entries` (a copy of KVM_GET_SUPPORTED_CPUID) for vCPU `index`
/// of `count`.
pub fn patch(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8, tsc_deadline: bool) {
    let vendor = vendor(entries);
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    let core_bits = bits_for(count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (apic_id << 24) | (8 << 8); // CLFLUSH line size 8 qwords
                if count > 1 {
                    e.ebx |= count.next_power_of_two().min(255) << 16;
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                e.ecx &= !LEAF1_ECX_PDCM;
                if tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
            }
            4 if vendor == Vendor::Intel => {
                // Deterministic cache parameters: cores per package, and
                // which caches are shared (L3 by all, others per core).
                let level = (e.eax >> 5) & 0x7;
                e.eax &= 0x3fff;
                if e.eax & 0x1f != 0 {
                    e.eax |= (count.next_power_of_two() - 1).min(63) << 26;
                    if level >= 3 {
                        e.eax |= ((1 << core_bits) - 1) << 14;
                    }
                }
            }
            6 => e.ecx &= !LEAF6_ECX_EPB,
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0; // one thread per core
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0001 if vendor == Vendor::Amd => {
                if count > 1 {
                    e.ecx |= EXT1_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT1_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                // NC (cores - 1) and the APIC id size.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits.max(1) << 12) | (count - 1);
            }
            0x8000_001d if vendor == Vendor::Amd && e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                e.eax &= !(0xfff << 14);
                if level >= 3 {
                    e.eax |= (count - 1) << 14;
                }
            }
            0x8000_001e if vendor == Vendor::Amd => {
                e.eax = apic_id; // extended APIC id
                e.ebx = apic_id & 0xff; // core id; one thread per core
                e.ecx = 0; // node 0, one node
                e.edx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn leaf0(vendor: &[u8; 12]) -> kvm_cpuid_entry2 {
        let word = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        kvm_cpuid_entry2 {
            function: 0,
            eax: 0x1f,
            ebx: word(0),
            edx: word(4),
            ecx: word(8),
            ..Default::default()
        }
    }

    #[test]
    fn vendors() {
        assert_eq!(vendor(&[leaf0(b"GenuineIntel")]), Vendor::Intel);
        assert_eq!(vendor(&[leaf0(b"AuthenticAMD")]), Vendor::Amd);
        assert_eq!(vendor(&[leaf0(b"SomethingNew")]), Vendor::Other);
        assert_eq!(vendor(&[]), Vendor::Other);
    }

    #[test]
    fn leaf1_carries_apic_id_and_count() {
        let mut e = vec![leaf0(b"GenuineIntel"), entry(1, 0)];
        patch(&mut e, 3, 4, true);
        assert_eq!(e[1].ebx >> 24, 3);
        assert_eq!((e[1].ebx >> 16) & 0xff, 4);
        assert_ne!(e[1].edx & LEAF1_EDX_HTT, 0);
        assert_ne!(e[1].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e[1].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        let mut one = vec![leaf0(b"GenuineIntel"), entry(1, 0)];
        one[1].edx = LEAF1_EDX_HTT;
        patch(&mut one, 0, 1, false);
        assert_eq!(one[1].edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn intel_topology_leaves() {
        let mut e = vec![
            leaf0(b"GenuineIntel"),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
        ];
        patch(&mut e, 5, 6, false);
        assert_eq!((e[1].ebx, e[1].ecx >> 8), (1, LEVEL_TYPE_SMT));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (3, 6, LEVEL_TYPE_CORE));
        assert_eq!(e[3].ecx >> 8, 0);
        assert!(e[1..].iter().all(|l| l.edx == 5));
    }

    #[test]
    fn amd_topology_leaves() {
        let mut e = vec![
            leaf0(b"AuthenticAMD"),
            entry(0x8000_0001, 0),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ];
        patch(&mut e, 2, 4, false);
        assert_ne!(e[1].ecx & EXT1_ECX_CMP_LEGACY, 0);
        assert_eq!(e[2].ecx & 0xff, 3);
        assert_eq!((e[2].ecx >> 12) & 0xf, 2);
        assert_eq!(e[3].eax, 2);
    }

    #[test]
    fn bits() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(8), 3);
        assert_eq!(bits_for(9), 4);
    }
}
