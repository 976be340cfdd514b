//! Puts virtio devices on the MMIO bus: a 4 KiB window and an IRQ each,
//! QueueNotify wired to ioeventfds, the interrupt to an irqfd, and the
//! device described to the guest in the DSDT (or, as a fallback, with
//! `virtio_mmio.device=` on the command line).

use std::sync::{Arc, Mutex};

use acpi_tables::{aml, Aml};
use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use skiff_devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use skiff_devices::virtio::VirtioDevice;
use vm_memory::GuestMemoryMmap;

use crate::bus::Bus;
use crate::memory::VIRTIO_MMIO_START;

/// First GSI for virtio devices (4 is COM1).
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// Last GSI the IOAPIC has.
pub const LAST_IRQ: u32 = 23;

/// Errors wiring a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// More devices than legacy IRQs.
    #[error("too many virtio devices (at most {})", LAST_IRQ - FIRST_VIRTIO_IRQ + 1)]
    TooMany,
    /// A KVM registration failed.
    #[error("cannot register {what} for {device}: {source}")]
    Kvm {
        /// What was registered.
        what: &'static str,
        /// The device.
        device: String,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// The transport could not be built.
    #[error("cannot create the virtio-mmio transport for {device}: {detail}")]
    Transport {
        /// The device.
        device: String,
        /// Why.
        detail: String,
    },
    /// Bus conflict.
    #[error("cannot place {device} on the MMIO bus: {source}")]
    Bus {
        /// The device.
        device: String,
        /// Why.
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

/// Collects the virtio devices of a VM.
#[derive(Default)]
pub struct DeviceManager {
    slots: Vec<MmioSlot>,
    dsdt: Vec<u8>,
    cmdline: Vec<String>,
    subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
}

impl DeviceManager {
    /// No devices yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wires `device` (named `name` in logs) into the VM and the MMIO bus.
    pub fn add_virtio<D>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        bus: &mut Bus,
        device: Arc<Mutex<D>>,
        name: &str,
    ) -> Result<MmioSlot, DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
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
            let d = crate::bus::lock(&device);
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
        bus.insert(slot.base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)))
            .map_err(|source| DeviceError::Bus {
                device: name.to_owned(),
                source,
            })?;
        self.dsdt.extend(virtio_aml(index, slot));
        self.cmdline.push(virtio_cmdline(slot));
        self.subscribers.push(device);
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
