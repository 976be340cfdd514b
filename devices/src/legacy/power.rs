//! The hardware-reduced ACPI power-management port and the pvpanic port.

use log::{info, warn};

use crate::{BusDevice, GuestPowerEvent, PowerEventSink};

/// Size of the ACPI PM port range: the FADT points its sleep control, sleep
/// status and reset registers at offset 0.
pub const ACPI_PM_PORT_LEN: u64 = 1;
/// The SLP_TYP value the DSDT's `_S5_` object gives for soft-off.
pub const ACPI_SLP_TYP_S5: u8 = 5;
/// Value the FADT tells the guest to write to the reset register.
pub const ACPI_RESET_VALUE: u8 = 1;
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

/// The ACPI sleep-control / reset register (one byte).
///
/// A write of [`ACPI_RESET_VALUE`] resets the machine; a write with SLP_EN
/// set and SLP_TYP = 5 powers it off. Other writes are logged and ignored.
///
/// It holds no state (reads are 0, writes act at once): a snapshot has
/// nothing of it to save.
pub struct AcpiPmPort {
    events: PowerEventSink,
}

impl AcpiPmPort {
    /// A PM port reporting to `events`.
    pub fn new(events: PowerEventSink) -> Self {
        AcpiPmPort { events }
    }
}

impl BusDevice for AcpiPmPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), 0) = (data.first(), offset) else {
            return;
        };
        if value == ACPI_RESET_VALUE {
            (self.events)(GuestPowerEvent::Reset);
        } else if value & SLP_EN != 0 {
            let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
            if slp_typ == ACPI_SLP_TYP_S5 {
                (self.events)(GuestPowerEvent::PowerOff);
            } else {
                warn!("acpi: guest asked for unsupported sleep state SLP_TYP={slp_typ}, ignored");
            }
        }
    }
}

/// Size of the pvpanic port range.
pub const PVPANIC_PORT_LEN: u64 = 1;
const PVPANIC_PANICKED: u8 = 1 << 0;
const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// QEMU's pvpanic device (ACPI id `QEMU0001`), one I/O port: the guest
/// kernel writes bit 0 when it panics.
///
/// It holds no state: a snapshot has nothing of it to save.
pub struct PvPanic {
    events: PowerEventSink,
}

impl PvPanic {
    /// A pvpanic port reporting to `events`.
    pub fn new(events: PowerEventSink) -> Self {
        PvPanic { events }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // The events this device supports.
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if value & PVPANIC_PANICKED != 0 {
            (self.events)(GuestPowerEvent::Panic);
        } else if value & PVPANIC_CRASH_LOADED != 0 {
            info!("pvpanic: guest panicked and loads a crash kernel");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn sink() -> (PowerEventSink, Arc<Mutex<Vec<GuestPowerEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (Arc::new(move |e| s.lock().unwrap().push(e)), seen)
    }

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let (events, seen) = sink();
        let mut pm = AcpiPmPort::new(events);
        pm.write(0, &[(ACPI_SLP_TYP_S5 << 2) | SLP_EN]);
        pm.write(0, &[ACPI_RESET_VALUE]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![GuestPowerEvent::PowerOff, GuestPowerEvent::Reset]
        );
    }

    #[test]
    fn other_sleep_states_and_junk_are_ignored() {
        let (events, seen) = sink();
        let mut pm = AcpiPmPort::new(events);
        pm.write(0, &[(3 << 2) | SLP_EN]);
        pm.write(0, &[ACPI_SLP_TYP_S5 << 2]);
        pm.write(1, &[ACPI_RESET_VALUE]);
        pm.write(0, &[]);
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn pvpanic_reports_panic() {
        let (events, seen) = sink();
        let mut p = PvPanic::new(events);
        let mut caps = [0u8];
        p.read(0, &mut caps);
        assert_eq!(caps[0], 3);
        p.write(0, &[PVPANIC_CRASH_LOADED]);
        assert!(seen.lock().unwrap().is_empty());
        p.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(*seen.lock().unwrap(), vec![GuestPowerEvent::Panic]);
    }
}
