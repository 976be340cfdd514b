//! Skiff's device models.
//!
//! Nothing in this crate touches KVM or starts threads: a device sees the
//! bytes the guest reads and writes on its port or MMIO window, eventfds to
//! raise interrupts, and callbacks for events that concern the whole VM
//! (power off, reset, panic). The VMM crate wires them to KVM.

pub mod bus;
pub mod legacy;
pub mod snapshot;
pub mod virtio;

pub use bus::BusDevice;

use vmm_sys_util::eventfd::EventFd;

/// What the guest asked of the whole machine through a platform device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestPowerEvent {
    /// ACPI S5 (soft off): the guest shut down.
    PowerOff,
    /// A reset request (ACPI reset register or the i8042 CPU reset line).
    Reset,
    /// The guest kernel panicked (pvpanic).
    Panic,
}

/// Receives [`GuestPowerEvent`]s; called on the vCPU thread that caused them.
pub type PowerEventSink = std::sync::Arc<dyn Fn(GuestPowerEvent) + Send + Sync>;

/// A `vm_superio::Trigger` that raises an interrupt by writing an eventfd
/// (which the VMM registers as a KVM irqfd).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps an eventfd.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }

    /// The eventfd to register with the interrupt controller.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
