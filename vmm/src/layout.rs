//! The platform: every I/O port, interrupt line and MMIO base of the
//! devices skiff-vmm puts in a VM, in one place. The builder places the
//! devices here and the ACPI tables (`boot/acpi.rs`) describe them to the
//! guest from the same constants; nothing else defines an address.
//!
//! ```text
//! I/O ports                      GSI (IOAPIC pin)
//! 0x0060..0x0065  i8042 (reset)   3   GED (power button), edge
//! 0x0080          POST/delay      4   COM1
//! 0x03f8..0x0400  COM1 (8250)     5.. one per virtio-mmio device, up to 23
//! 0x0505          pvpanic
//! 0x0600          ACPI PM (sleep control/status, reset)
//! 0x0610          GED event register
//!
//! MMIO (inside the 32-bit gap, see `memory.rs`)
//! 0xc000_0000     virtio-mmio windows, 4 KiB each, in device order
//! 0xfec0_0000     IOAPIC
//! 0xfee0_0000     LAPIC
//! 0xfffb_c000     KVM identity-map page, then KVM's TSS (3 pages)
//! ```
//!
//! The RAM side of the address map (boot structures, kernel, initrd, the
//! gap's bounds) is in `memory.rs`.

use crate::memory::MMIO_GAP_START;

/// The i8042 controller's data port; its command port is at +4.
pub const I8042_PORT: u16 = 0x60;
/// The i8042's span: data (0x60) to command/status (0x64).
pub const I8042_PORT_LEN: u64 = 5;
/// The POST/delay port: guests write it, nothing answers.
pub const POST_PORT: u16 = 0x80;
/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// QEMU's pvpanic port.
pub const PVPANIC_PORT: u16 = 0x505;
/// The ACPI power-management port (sleep control/status and reset).
pub const ACPI_PM_PORT: u16 = 0x600;
/// The ACPI Generic Event Device's event register (port I/O).
pub const GED_PORT: u16 = 0x610;

/// The GED's interrupt: ISA IRQ 3 (COM2's, unused here), edge-triggered.
pub const GED_IRQ: u32 = 3;
/// COM1's IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// First GSI for virtio devices.
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// Last GSI the IOAPIC has.
pub const LAST_IRQ: u32 = 23;

/// First virtio-mmio window.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC registers.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's identity-map page (for real-mode emulation), inside the gap.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// KVM's TSS (3 pages), inside the gap.
pub const KVM_TSS_START: u64 = 0xfffb_d000;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MMIO_GAP_END;

    #[test]
    fn mmio_bases_lie_in_the_gap_and_do_not_overlap() {
        for addr in [
            VIRTIO_MMIO_START,
            IOAPIC_START,
            LAPIC_START,
            KVM_TSS_START,
            KVM_IDENTITY_MAP_START,
        ] {
            assert!((MMIO_GAP_START..MMIO_GAP_END).contains(&addr));
        }
        const { assert!(KVM_IDENTITY_MAP_START + 0x1000 <= KVM_TSS_START) };
        let virtio_end = VIRTIO_MMIO_START
            + u64::from(LAST_IRQ - FIRST_VIRTIO_IRQ + 1)
                * skiff_devices::virtio::mmio::MMIO_WINDOW_SIZE;
        assert!(virtio_end <= IOAPIC_START);
    }

    #[test]
    fn interrupt_lines_are_distinct() {
        let legacy = [GED_IRQ, SERIAL_IRQ];
        for irq in legacy {
            assert!(!(FIRST_VIRTIO_IRQ..=LAST_IRQ).contains(&irq));
        }
        assert_ne!(GED_IRQ, SERIAL_IRQ);
    }
}
