//! A hardware-reduced ACPI Generic Event Device (GED, `ACPI0013`) that
//! carries the power button and changes of the VM generation id.
//!
//! The DSDT describes the GED with one interrupt and a 4-byte event
//! register at [`GED_PORT_LEN`] bytes of port I/O; its `_EVT` method reads
//! the register and, for each event bit set, notifies a device: the
//! `PNP0C0C` power button for [`GED_EVENT_POWER_BUTTON`] (Linux's ACPI
//! button driver turns it into a KEY_POWER press for systemd-logind or
//! acpid), the `VMGENCTR` device for [`GED_EVENT_VMGENID`] (Linux's
//! vmgenid driver rereads the id and reseeds). Reading the register
//! clears the events it reports.
//!
//! Its state is the pending events ([`Ged::snapshot`], [`Ged::restore`]).

use vm_superio::Trigger;

use crate::snapshot::{GedSnapshot, SnapshotError};
use crate::BusDevice;

/// Size of the GED's register block (one 32-bit event register).
pub const GED_PORT_LEN: u64 = 4;
/// Event bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u32 = 1 << 0;
/// Event bit: the VM generation id changed (a restore from a snapshot).
pub const GED_EVENT_VMGENID: u32 = 1 << 1;
/// Every event bit the GED posts.
pub const GED_EVENTS: u32 = GED_EVENT_POWER_BUTTON | GED_EVENT_VMGENID;

/// The GED: pending events and the interrupt that announces them.
pub struct Ged<T: Trigger> {
    pending: u32,
    irq: T,
}

impl<T: Trigger> Ged<T> {
    /// A GED raising `irq` when an event is posted.
    pub fn new(irq: T) -> Self {
        Ged { pending: 0, irq }
    }

    /// Posts `events` and raises the interrupt.
    pub fn notify(&mut self, events: u32) -> Result<(), T::E> {
        self.pending |= events;
        self.irq.trigger()
    }

    /// Presses the power button.
    pub fn press_power_button(&mut self) -> Result<(), T::E> {
        self.notify(GED_EVENT_POWER_BUTTON)
    }

    /// Events posted and not yet read by the guest.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// The events pending.
    pub fn snapshot(&self) -> GedSnapshot {
        GedSnapshot {
            pending: self.pending,
        }
    }

    /// Takes on the events `snap` recorded (only events this GED posts).
    /// The interrupt is not raised again: one the guest had not taken is
    /// part of the interrupt controller's saved state.
    pub fn restore(&mut self, snap: &GedSnapshot) -> Result<(), SnapshotError> {
        if snap.pending & !GED_EVENTS != 0 {
            return Err(SnapshotError::Invalid {
                device: "ged".into(),
                reason: format!("pending events {:#x} include unknown ones", snap.pending),
            });
        }
        self.pending = snap.pending;
        Ok(())
    }
}

impl<T: Trigger + Send> BusDevice for Ged<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // The _EVT method reads the whole register; other accesses see 0
        // and leave the events pending.
        if offset != 0 || data.len() != 4 {
            return;
        }
        data.copy_from_slice(&self.pending.to_le_bytes());
        self.pending = 0;
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[derive(Default, Clone)]
    struct Counter(Arc<AtomicU32>);

    impl Trigger for Counter {
        type E = std::io::Error;
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn read(g: &mut Ged<Counter>, offset: u64, len: usize) -> Vec<u8> {
        let mut d = vec![0xaa; len];
        g.read(offset, &mut d);
        d
    }

    #[test]
    fn power_button_raises_the_interrupt_and_reads_clear() {
        let irq = Counter::default();
        let mut g = Ged::new(irq.clone());
        assert_eq!(g.pending(), 0);
        g.press_power_button().unwrap();
        g.press_power_button().unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 2);
        assert_eq!(read(&mut g, 0, 4), 1u32.to_le_bytes());
        assert_eq!(read(&mut g, 0, 4), [0; 4]);
    }

    #[test]
    fn a_generation_id_change_is_an_event_of_its_own() {
        let irq = Counter::default();
        let mut g = Ged::new(irq.clone());
        g.notify(GED_EVENT_VMGENID).unwrap();
        g.press_power_button().unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 2);
        assert_eq!(read(&mut g, 0, 4), GED_EVENTS.to_le_bytes());
        assert_eq!(read(&mut g, 0, 4), [0; 4]);
    }

    #[test]
    fn odd_accesses_leave_events_pending() {
        let mut g = Ged::new(Counter::default());
        g.press_power_button().unwrap();
        assert_eq!(read(&mut g, 0, 1), [0]);
        assert_eq!(read(&mut g, 4, 4), [0; 4]);
        assert_eq!(read(&mut g, 2, 2), [0; 2]);
        g.write(0, &[0xff; 4]);
        assert_eq!(g.pending(), GED_EVENT_POWER_BUTTON);
        assert_eq!(read(&mut g, 0, 4), 1u32.to_le_bytes());
    }

    #[test]
    fn an_eventfd_trigger_signals_the_irqfd() {
        use crate::EventFdTrigger;
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut g = Ged::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        g.press_power_button().unwrap();
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn restore_takes_pending_events_and_refuses_unknown_ones() {
        let mut g = Ged::new(Counter::default());
        assert_eq!(g.snapshot().pending, 0);
        g.press_power_button().unwrap();
        let snap = g.snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        let back: GedSnapshot = serde_json::from_str(&json).unwrap();
        let irq = Counter::default();
        let mut r = Ged::new(irq.clone());
        r.restore(&back).unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 0, "no interrupt of its own");
        assert_eq!(read(&mut r, 0, 4), 1u32.to_le_bytes());
        let e = r.restore(&GedSnapshot { pending: 6 }).unwrap_err();
        assert!(e.to_string().contains("pending events 0x6"), "{e}");
        assert_eq!(r.pending(), 0);
        r.restore(&GedSnapshot {
            pending: GED_EVENTS,
        })
        .unwrap();
        assert_eq!(r.pending(), GED_EVENTS);
    }
}
