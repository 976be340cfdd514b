//! Wires devices into a VM at the places `layout.rs` gives them.
//!
//! - The legacy platform devices ([`attach_legacy`]) go on the port bus:
//!   the 8250 serial port (IRQ through an irqfd), the i8042 (reset only),
//!   the ACPI PM port, pvpanic and the GED (the power button's interrupt).
//! - Each virtio device ([`DeviceManager::add_virtio`]) gets a 4 KiB
//!   window on the MMIO bus and an IRQ, QueueNotify wired to ioeventfds,
//!   the interrupt to an irqfd, and is described to the guest in the DSDT
//!   (or, as a fallback, with `virtio_mmio.device=` on the command line).

use std::sync::{Arc, Mutex};

use acpi_tables::{aml, Aml};
use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use skiff_devices::legacy::{
    AcpiPmPort, Ged, PvPanic, Serial, SerialOutput, ACPI_PM_PORT_LEN, GED_PORT_LEN, I8042,
    PVPANIC_PORT_LEN, SERIAL_PORT_LEN,
};
use skiff_devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use skiff_devices::virtio::VirtioDevice;
use skiff_devices::{BusDevice, EventFdTrigger, PowerEventSink};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::Bus;
use crate::layout::{
    ACPI_PM_PORT, GED_IRQ, GED_PORT, I8042_PORT, I8042_PORT_LEN, PVPANIC_PORT, SERIAL_IRQ,
    SERIAL_PORT,
};
use crate::layout::{FIRST_VIRTIO_IRQ, LAST_IRQ, VIRTIO_MMIO_START};

/// Errors wiring a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// More devices than legacy IRQs.
    #[error("too many virtio devices (at most {})", LAST_IRQ - FIRST_VIRTIO_IRQ + 1)]
    TooMany,
    /// A KVM registration failed.
    #[error("cannot register {what} for {device}: {source}")]
    Kvm {
        what: &'static str,
        device: String,
        source: kvm_ioctls::Error,
    },
    /// An interrupt's eventfd could not be made.
    #[error("cannot create the interrupt eventfd for {device}: {source}")]
    EventFd {
        device: String,
        source: std::io::Error,
    },
    /// The transport could not be built.
    #[error("cannot create the virtio-mmio transport for {device}: {detail}")]
    Transport { device: String, detail: String },
    /// Bus conflict.
    #[error("cannot place {device} on its bus: {source}")]
    Bus {
        device: String,
        source: crate::bus::BusError,
    },
}

/// Where a device landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Base of the register window.
    pub base: u64,
    /// Its GSI.
    pub irq: u32,
}

/// The MMIO window and IRQ of the `index`th virtio device.
pub fn slot(index: usize) -> Option<MmioSlot> {
    let irq = FIRST_VIRTIO_IRQ.checked_add(u32::try_from(index).ok()?)?;
    (irq <= LAST_IRQ).then_some(MmioSlot {
        base: VIRTIO_MMIO_START + index as u64 * MMIO_WINDOW_SIZE,
        irq,
    })
}

/// AML for one virtio-mmio device (`LNRO0005`, as Linux's virtio_mmio
/// driver matches it).
pub fn virtio_aml(index: usize, slot: MmioSlot) -> Vec<u8> {
    let mem = aml::Memory32Fixed::new(true, slot.base as u32, MMIO_WINDOW_SIZE as u32);
    let irq = aml::Interrupt::new(true, true, false, false, slot.irq);
    let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
    let uid = index as u32;
    let mut out = Vec::new();
    aml::Device::new(
        format!("_SB_.V{index:03X}").as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CCA".into(), &aml::ONE),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// The `virtio_mmio.device=` command-line entry for a slot.
pub fn virtio_cmdline(slot: MmioSlot) -> String {
    format!(
        "virtio_mmio.device={}K@{:#x}:{}",
        MMIO_WINDOW_SIZE / 1024,
        slot.base,
        slot.irq
    )
}

/// A virtio device ready to be wired: the transport's view of it and the
/// event loop's, made from one concrete device so that both see the same
/// object.
pub struct VirtioHandle {
    name: String,
    device: Arc<Mutex<dyn VirtioDevice>>,
    subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>,
}

impl VirtioHandle {
    /// `device`, named `name` in logs and monitor queries (`vda`, `hvc0`).
    pub fn new<D>(name: impl Into<String>, device: D) -> Self
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        Self::shared(name, Arc::new(Mutex::new(device)))
    }

    /// `device`, already shared (the caller keeps a typed handle, as the
    /// monitors do for network cards).
    pub fn shared<D>(name: impl Into<String>, device: Arc<Mutex<D>>) -> Self
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        VirtioHandle {
            name: name.into(),
            device: device.clone(),
            subscriber: device,
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The legacy platform devices, on the port bus at the ports of
/// `layout.rs`.
pub struct LegacyDevices {
    /// The port bus with every legacy device on it.
    pub pio: Bus,
    /// COM1 (the event loop feeds it input; the main thread flushes it).
    pub serial: Arc<Mutex<Serial>>,
    /// The GED (the monitors press the power button through it).
    pub ged: Arc<Mutex<Ged<EventFdTrigger>>>,
}

/// A device on the port bus: its name in errors, first port, span.
type PortDevice = (&'static str, u16, u64, Arc<Mutex<dyn BusDevice>>);

/// Builds the legacy devices: the serial port writing to `serial_output`,
/// and the i8042, ACPI PM port and pvpanic reporting the guest's power
/// requests to `power`; their interrupts are irqfds of `vm`.
pub fn attach_legacy(
    vm: &VmFd,
    serial_output: SerialOutput,
    power: PowerEventSink,
) -> Result<LegacyDevices, DeviceError> {
    let irq = |device: &str, gsi: u32| -> Result<EventFdTrigger, DeviceError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
            device: device.to_owned(),
            source,
        })?;
        vm.register_irqfd(&evt, gsi)
            .map_err(|source| DeviceError::Kvm {
                what: "the interrupt (irqfd)",
                device: device.to_owned(),
                source,
            })?;
        Ok(EventFdTrigger::new(evt))
    };
    let serial = Arc::new(Mutex::new(Serial::new(
        irq("the serial port", SERIAL_IRQ)?,
        serial_output,
    )));
    let ged = Arc::new(Mutex::new(Ged::new(irq("the GED", GED_IRQ)?)));
    let devices: [PortDevice; 5] = [
        (
            "the serial port",
            SERIAL_PORT,
            SERIAL_PORT_LEN,
            serial.clone(),
        ),
        (
            "the i8042",
            I8042_PORT,
            I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042::new(power.clone()))),
        ),
        (
            "the ACPI PM port",
            ACPI_PM_PORT,
            ACPI_PM_PORT_LEN,
            Arc::new(Mutex::new(AcpiPmPort::new(power.clone()))),
        ),
        (
            "pvpanic",
            PVPANIC_PORT,
            PVPANIC_PORT_LEN,
            Arc::new(Mutex::new(PvPanic::new(power))),
        ),
        ("the GED", GED_PORT, GED_PORT_LEN, ged.clone()),
    ];
    let mut pio = Bus::new();
    for (device, port, len, dev) in devices {
        pio.insert(u64::from(port), len, dev)
            .map_err(|source| DeviceError::Bus {
                device: device.to_owned(),
                source,
            })?;
    }
    Ok(LegacyDevices { pio, serial, ged })
}

/// Collects the virtio devices of a VM.
#[derive(Default)]
pub struct DeviceManager {
    slots: Vec<MmioSlot>,
    dsdt: Vec<u8>,
    cmdline: Vec<String>,
    subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    transports: Vec<NamedTransport>,
}

/// A virtio device's transport, by the device's name (vda, eth1, hvc0,
/// rng): what a snapshot saves and restores.
pub type NamedTransport = (String, Arc<Mutex<MmioTransport>>);

impl DeviceManager {
    /// No devices yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wires `handle`'s device into the VM and the MMIO bus, in the next
    /// window and IRQ.
    pub fn add_virtio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        bus: &mut Bus,
        handle: VirtioHandle,
    ) -> Result<MmioSlot, DeviceError> {
        let VirtioHandle {
            name,
            device,
            subscriber,
        } = handle;
        let name = name.as_str();
        let index = self.slots.len();
        let slot = slot(index).ok_or(DeviceError::TooMany)?;
        let kvm_err = |what| {
            let device = name.to_owned();
            move |source| DeviceError::Kvm {
                what,
                device,
                source,
            }
        };
        {
            let d = crate::sync::lock(&device);
            vm.register_irqfd(d.interrupt().eventfd(), slot.irq)
                .map_err(kvm_err("the interrupt (irqfd)"))?;
            for (i, evt) in d.queue_events().iter().enumerate() {
                if d.notified_in_vcpu(i) {
                    continue;
                }
                vm.register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET),
                    i as u32,
                )
                .map_err(kvm_err("a queue notification (ioeventfd)"))?;
            }
        }
        let transport = MmioTransport::new(mem.clone(), device.clone(), name).map_err(|e| {
            DeviceError::Transport {
                device: name.to_owned(),
                detail: e.to_string(),
            }
        })?;
        let transport = Arc::new(Mutex::new(transport));
        self.transports.push((name.to_owned(), transport.clone()));
        bus.insert(slot.base, MMIO_WINDOW_SIZE, transport)
            .map_err(|source| DeviceError::Bus {
                device: name.to_owned(),
                source,
            })?;
        self.dsdt.extend(virtio_aml(index, slot));
        self.cmdline.push(virtio_cmdline(slot));
        self.subscribers.push(subscriber);
        self.slots.push(slot);
        log::debug!("{name}: virtio-mmio at {:#x}, IRQ {}", slot.base, slot.irq);
        Ok(slot)
    }

    /// DSDT objects for all devices.
    pub fn dsdt(&self) -> &[u8] {
        &self.dsdt
    }

    /// `virtio_mmio.device=` entries for all devices.
    pub fn cmdline_entries(&self) -> &[String] {
        &self.cmdline
    }

    /// Takes the devices' event subscribers for the event loop.
    /// The transports, in guest order.
    pub fn transports(&self) -> &[NamedTransport] {
        &self.transports
    }

    pub fn take_subscribers(&mut self) -> Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> {
        std::mem::take(&mut self.subscribers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_sequential_and_bounded() {
        assert_eq!(
            slot(0),
            Some(MmioSlot {
                base: VIRTIO_MMIO_START,
                irq: 5
            })
        );
        assert_eq!(slot(2).unwrap().base, VIRTIO_MMIO_START + 0x2000);
        assert_eq!(slot(18).unwrap().irq, 23);
        assert_eq!(slot(19), None);
    }

    #[test]
    fn cmdline_and_aml() {
        let s = slot(1).unwrap();
        assert_eq!(virtio_cmdline(s), "virtio_mmio.device=4K@0xc0001000:6");
        let aml = virtio_aml(1, s);
        assert!(aml.windows(8).any(|w| w == b"LNRO0005"));
        assert!(aml.windows(4).any(|w| w == b"V001"));
    }
}
