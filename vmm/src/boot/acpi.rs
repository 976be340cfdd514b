//! ACPI tables for a hardware-reduced platform: RSDP, XSDT, FADT, MADT and
//! a DSDT that describes the legacy devices, the S5 sleep state and any
//! device the device manager adds (the virtio-mmio windows).
//!
//! The tables describe the platform of `layout.rs`; they define no
//! address of their own.
//!
//! Power off and reset go through one I/O port ([`ACPI_PM_PORT`]): the FADT
//! points its sleep-control, sleep-status and reset registers at it, so a
//! stock kernel powers off and reboots without command-line tricks.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use skiff_devices::legacy::{
    ACPI_RESET_VALUE, ACPI_SLP_TYP_S5, GED_EVENT_POWER_BUTTON, GED_EVENT_VMGENID, GED_PORT_LEN,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    ACPI_PM_PORT, GED_IRQ, GED_PORT, IOAPIC_START, LAPIC_START, PVPANIC_PORT, SERIAL_IRQ,
    SERIAL_PORT,
};
use crate::memory::{ACPI_END, RSDP_START, VMGENID_START};

const OEM_ID: [u8; 6] = *b"SKIFF ";
const OEM_TABLE_ID: [u8; 8] = *b"SKIFFVM ";
const OEM_REVISION: u32 = 1;

/// FADT IAPC_BOOT_ARCH: no VGA, no CMOS RTC (the kernel uses kvmclock).
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_ENABLED: u32 = 1;

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables outgrew their area below 1 MiB.
    #[error("ACPI tables need {0} bytes, more than the area below 1 MiB holds")]
    TooLarge(u64),
    /// Guest memory write failed.
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
    /// More vCPUs than the MADT describes.
    #[error("{0} vCPUs do not fit in the MADT (at most 254)")]
    TooManyCpus(u8),
}

fn to_bytes(obj: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    obj.to_aml_bytes(&mut v);
    v
}

/// The Generic Event Device and the devices it notifies, the power button
/// and the VM generation id:
///
/// ```text
/// Device (\_SB.GED) {
///     Name (_HID, "ACPI0013")  Name (_UID, Zero)
///     Name (_CRS, ResourceTemplate () { Interrupt (Edge, ActiveHigh, Exclusive) { GED_IRQ } })
///     OperationRegion (GDRG, SystemIO, GED_PORT, 4)
///     Field (GDRG, DWordAcc, NoLock, WriteAsZeros) { GDAT, 32 }
///     Method (_EVT, 1, Serialized) {
///         Local0 = GDAT
///         If ((Local0 & 1) == 1) { Notify (\_SB.PWRB, 0x80) }
///         If ((Local0 & 2) == 2) { Notify (\_SB.VGEN, 0x80) }
///     }
/// }
/// Device (\_SB.PWRB) { Name (_HID, EisaId ("PNP0C0C"))  Name (_UID, Zero) }
/// Device (\_SB.VGEN) {
///     Name (_HID, "VMGENCTR")  Name (_CID, "VM_Gen_Counter")  Name (_DDN, "VM_Gen_Counter")
///     Name (ADDR, Package () { VMGENID_START & 0xffffffff, VMGENID_START >> 32 })
/// }
/// ```
pub fn ged_aml() -> Vec<u8> {
    let mut out = Vec::new();
    let irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let port = u64::from(GED_PORT);
    let len = GED_PORT_LEN;
    let region = aml::OpRegion::new("GDRG".into(), aml::OpRegionSpace::SystemIO, &port, &len);
    let field = aml::Field::new(
        "GDRG".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 32)],
    );
    let gdat = aml::Path::new("GDAT");
    let read = aml::Store::new(&aml::Local(0), &gdat);
    let power = GED_EVENT_POWER_BUTTON;
    let masked = aml::And::new(&aml::Local(1), &aml::Local(0), &power);
    let is_power = aml::Equal::new(&aml::Local(1), &power);
    let notify_value = 0x80u8;
    let button = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&button, &notify_value);
    let on_power = aml::If::new(&is_power, vec![&notify]);
    let vmgenid = GED_EVENT_VMGENID;
    let masked_vmgenid = aml::And::new(&aml::Local(1), &aml::Local(0), &vmgenid);
    let is_vmgenid = aml::Equal::new(&aml::Local(1), &vmgenid);
    let generation = aml::Path::new("\\_SB_.VGEN");
    let notify_generation = aml::Notify::new(&generation, &notify_value);
    let on_vmgenid = aml::If::new(&is_vmgenid, vec![&notify_generation]);
    let evt = aml::Method::new(
        "_EVT".into(),
        1,
        true,
        vec![&read, &masked, &on_power, &masked_vmgenid, &on_vmgenid],
    );
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
            &region,
            &field,
            &evt,
        ],
    )
    .to_aml_bytes(&mut out);
    aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut out);
    let low = (VMGENID_START & 0xffff_ffff) as u32;
    let high = (VMGENID_START >> 32) as u32;
    aml::Device::new(
        "_SB_.VGEN".into(),
        vec![
            &aml::Name::new("_HID".into(), &"VMGENCTR"),
            &aml::Name::new("_CID".into(), &"VM_Gen_Counter"),
            &aml::Name::new("_DDN".into(), &"VM_Gen_Counter"),
            &aml::Name::new("ADDR".into(), &aml::Package::new(vec![&low, &high])),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// The DSDT's AML body: COM1, pvpanic, the GED with the power button and
/// the generation id, `_S5_`
/// and `extra` (already-encoded AML device objects, appended as is).
pub fn dsdt_body(extra: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let com1_io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    body.extend(to_bytes(&aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )));
    let pvpanic_io = aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let pvpanic_crs = aml::ResourceTemplate::new(vec![&pvpanic_io]);
    body.extend(to_bytes(&aml::Device::new(
        "_SB_.PEVT".into(),
        vec![
            &aml::Name::new("_HID".into(), &"QEMU0001"),
            &aml::Name::new("_STA".into(), &0x0fu8),
            &aml::Name::new("_CRS".into(), &pvpanic_crs),
        ],
    )));
    body.extend(ged_aml());
    body.extend(to_bytes(&aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&ACPI_SLP_TYP_S5, &ACPI_SLP_TYP_S5, &0u8, &0u8]),
    )));
    body.extend_from_slice(extra);
    body
}

fn pm_register() -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_PM_PORT),
    )
}

/// The FADT: hardware-reduced, reset and sleep registers on the PM port.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.reset_reg = pm_register();
    b.reset_value = ACPI_RESET_VALUE;
    b.sleep_control_reg = pm_register();
    b.sleep_status_reg = pm_register();
    b.iapc_boot_arch = (IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    to_bytes(&b.finalize())
}

/// The MADT: one local APIC per vCPU (APIC id = index) and the IOAPIC.
pub fn madt(num_cpus: u8) -> Result<Vec<u8>, AcpiError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(AcpiError::TooManyCpus(num_cpus));
    }
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, LAPIC_START as u32);
    t.write_u32(40, MADT_PCAT_COMPAT);
    for cpu in 0..num_cpus {
        let mut e = vec![MADT_LOCAL_APIC, 8, cpu, cpu];
        e.extend_from_slice(&MADT_ENABLED.to_le_bytes());
        t.append_slice(&e);
    }
    let ioapic_id = num_cpus;
    let mut e = vec![MADT_IO_APIC, 12, ioapic_id, 0];
    e.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    t.append_slice(&e);
    Ok(t.as_slice().to_vec())
}

/// The DSDT around [`dsdt_body`].
pub fn dsdt(extra: &[u8]) -> Vec<u8> {
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&dsdt_body(extra));
    t.as_slice().to_vec()
}

/// Writes all tables from [`RSDP_START`]; returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    dsdt_extra: &[u8],
) -> Result<GuestAddress, AcpiError> {
    let align = |a: u64| a.next_multiple_of(16);
    let xsdt_addr = align(RSDP_START + Rsdp::len() as u64);
    // XSDT with two entries: FADT and MADT.
    let xsdt_len = 36 + 2 * 8;
    let dsdt_addr = align(xsdt_addr + xsdt_len);
    let dsdt = dsdt(dsdt_extra);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(num_cpus)?;
    let end = madt_addr + madt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - RSDP_START));
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    mem.write_slice(&rsdp, GuestAddress(RSDP_START))?;
    mem.write_slice(&xsdt, GuestAddress(xsdt_addr))?;
    mem.write_slice(&dsdt, GuestAddress(dsdt_addr))?;
    mem.write_slice(&fadt, GuestAddress(fadt_addr))?;
    mem.write_slice(&madt, GuestAddress(madt_addr))?;
    Ok(GuestAddress(RSDP_START))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use vm_memory::Bytes;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut v = vec![0u8; len as usize];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = create_guest_memory(64).unwrap();
        let rsdp = write_tables(&mem, 4, &[]).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = table_at(&mem, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        // Flags at 112: HW_REDUCED_ACPI (bit 20) and RESET_REG_SUP (bit 10).
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
        assert_ne!(flags & (1 << 10), 0);
        // X_DSDT at 140.
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&mem, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(8).any(|w| w == b"ACPI0013"));
        assert!(dsdt.windows(4).any(|w| w == b"_EVT"));
        assert!(dsdt.windows(4).any(|w| w == b"PWRB"));
        assert!(dsdt.windows(8).any(|w| w == b"VMGENCTR"));
        assert!(dsdt.windows(4).any(|w| w == b"ADDR"));
        let madt = table_at(&mem, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        // 44-byte header, 4 local APICs, one IOAPIC.
        assert_eq!(madt.len(), 44 + 4 * 8 + 12);
    }

    #[test]
    fn madt_rejects_bad_cpu_counts() {
        assert!(madt(0).is_err());
        assert!(madt(255).is_err());
        assert!(madt(254).is_ok());
    }
}

#[cfg(test)]
mod dump {
    /// Writes the tables to $SKIFF_ACPI_DUMP (for `iasl -d`), when set.
    #[test]
    fn dump_tables() {
        let Ok(dir) = std::env::var("SKIFF_ACPI_DUMP") else {
            return;
        };
        std::fs::write(format!("{dir}/dsdt.dat"), super::dsdt(&[])).unwrap();
        std::fs::write(format!("{dir}/facp.dat"), super::fadt(0x1000)).unwrap();
        std::fs::write(format!("{dir}/apic.dat"), super::madt(2).unwrap()).unwrap();
    }
}
