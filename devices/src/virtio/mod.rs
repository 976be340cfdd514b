//! virtio devices over the virtio-mmio (version 2) transport.
//!
//! The transport ([`mmio::MmioTransport`]) owns feature negotiation, the
//! status state machine and queue configuration; a device ([`VirtioDevice`])
//! only sees its ready queues, guest memory and an [`Interrupt`] once the
//! driver sets DRIVER_OK. Devices process their queues on the VMM's device
//! event loop (each is an event-manager subscriber watching its queue
//! eventfds and backend fds), never on a vCPU thread.
//!
//! What every device does alike lives here once: its state between
//! DRIVER_OK and a reset ([`DeviceState`]), and the loop that takes chains
//! off a queue ([`queue::drain`]: notification suppression, the per-event
//! budget, completion, the interrupt and broken rings). A device only says
//! what it does with one chain.
//!
//! Every device can also be saved and restored (snapshots, see
//! [`crate::snapshot`]): [`DeviceState::snapshot`] and
//! [`crate::snapshot::restore_activation`] do the part all devices share
//! (the queues and their positions), and a device adds only its own state.

pub mod block;
pub mod console;
pub mod gpu;
pub mod input;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use log::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::snapshot::{BlobDir, DeviceSnapshot, SnapshotError};

/// Feature bit: the device speaks virtio 1.x (mandatory for mmio v2).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: used/avail event index notification suppression.
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
/// InterruptStatus bit: used buffers were added.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line and the status bits the guest reads back.
///
/// Shared by the transport (vCPU threads read and acknowledge it) and the
/// device (the event loop raises it).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    evt: EventFd,
}

impl Interrupt {
    /// An interrupt that pulses `evt` (a KVM irqfd in the VMM).
    pub fn new(evt: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            evt,
        }
    }

    /// The eventfd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            warn!("virtio: cannot raise interrupt: {e}");
        }
    }

    /// Tells the driver that used buffers are ready.
    pub fn signal_used(&self) {
        self.raise(INT_VRING);
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG);
    }

    /// Marks the device broken (DEVICE_NEEDS_RESET) after a guest error it
    /// cannot recover from, and tells the driver.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(INT_CONFIG);
    }

    /// Whether [`Interrupt::set_needs_reset`] was called since the last reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// InterruptStatus as the guest reads it.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the status bits and the reset request as a snapshot recorded
    /// them, without raising the line (see [`Interrupt::resend`]).
    pub(crate) fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    /// Raises the line again, leaving the status bits as they are: after a
    /// restore, so that an interrupt the guest had not yet taken is not
    /// lost (one too many is harmless: the driver reads InterruptStatus).
    pub fn resend(&self) {
        if let Err(e) = self.evt.write(1) {
            warn!("virtio: cannot raise interrupt: {e}");
        }
    }

    /// Clears all state on a device reset.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, configured and ready, in index order (a queue the driver
    /// left unready is passed as is, with `ready() == false`).
    pub queues: Vec<Queue>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// What a device holds from DRIVER_OK until the driver resets it.
pub struct Activated {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, ready, in index order.
    pub queues: Vec<Queue>,
    /// The device's interrupt (the same one the transport reads).
    pub interrupt: Arc<Interrupt>,
    /// The device's name in log lines.
    pub name: String,
    /// The driver broke a queue and the device asked for a reset
    /// (DEVICE_NEEDS_RESET): nothing is processed until the driver resets
    /// the device.
    pub broken: bool,
    /// Malformed chains completed so far (their log lines are
    /// rate-limited by this count).
    pub malformed: u64,
}

impl Activated {
    /// Marks the device broken after `why`, logged, and asks the driver for
    /// a reset.
    pub fn set_broken(&mut self, why: std::fmt::Arguments<'_>) {
        warn!("{}: {why}; the device needs a reset", self.name);
        self.broken = true;
        self.interrupt.set_needs_reset();
    }
}

/// A device's queue state: nothing before DRIVER_OK and after a reset,
/// then what the driver handed over.
#[derive(Default)]
pub enum DeviceState {
    /// Not activated, or reset since.
    #[default]
    Inactive,
    /// Activated (and possibly broken since).
    Activated(Activated),
}

impl DeviceState {
    /// Activates with `ctx`, which must hold exactly `queues` ready queues
    /// (the transport hands over as many as the device declares); `name`
    /// is the device's name in log lines and errors.
    pub fn activate(
        &mut self,
        ctx: ActivateContext,
        interrupt: &Arc<Interrupt>,
        name: &str,
        queues: usize,
    ) -> Result<(), ActivateError> {
        if ctx.queues.len() != queues {
            return Err(ActivateError::Other(format!(
                "{name} needs {queues} queue{}, got {}",
                if queues == 1 { "" } else { "s" },
                ctx.queues.len()
            )));
        }
        if let Some(i) = ctx.queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        *self = DeviceState::Activated(Activated {
            mem: ctx.mem,
            queues: ctx.queues,
            interrupt: interrupt.clone(),
            name: name.to_owned(),
            broken: false,
            malformed: 0,
        });
        Ok(())
    }

    /// Forgets the queues and memory (driver reset).
    pub fn reset(&mut self) {
        *self = DeviceState::Inactive;
    }

    /// The activated state, unless the device is inactive or broken.
    pub fn running(&mut self) -> Option<&mut Activated> {
        match self {
            DeviceState::Activated(a) if !a.broken => Some(a),
            _ => None,
        }
    }

    /// Whether queues are processed: activated and not broken.
    pub fn is_running(&self) -> bool {
        matches!(self, DeviceState::Activated(a) if !a.broken)
    }
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not set up a queue the device needs.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// virtio device id (`virtio_ids`: 2 block, 3 console, 4 rng, 16 gpu, 18 input ...).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers (must include VERSION_1).
    fn features(&self) -> u64;
    /// One eventfd per queue, written when the driver notifies the queue
    /// (the VMM registers them as KVM ioeventfds on QueueNotify, except for
    /// the queues of [`VirtioDevice::notified_in_vcpu`]).
    fn queue_events(&self) -> &[EventFd];
    /// Whether the driver's notifications of queue `index` are handled in
    /// the notifying vCPU's thread, by [`VirtioDevice::queue_notify`],
    /// instead of through an ioeventfd and the event loop. Worth it only
    /// where the guest driver busy-waits for the device (virtio-console
    /// output) and the work cannot block. Fixed for the device's lifetime.
    fn notified_in_vcpu(&self, index: usize) -> bool {
        let _ = index;
        false
    }
    /// The driver notified queue `index`, one of the queues of
    /// [`VirtioDevice::notified_in_vcpu`], after activation; called in the
    /// notifying vCPU's thread. By default its eventfd is written, for the
    /// event loop.
    fn queue_notify(&mut self, index: usize) {
        if let Some(evt) = self.queue_events().get(index) {
            let _ = evt.write(1);
        }
    }
    /// The device's interrupt.
    fn interrupt(&self) -> &std::sync::Arc<Interrupt>;
    /// Reads from the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the device-specific configuration space (ignored unless
    /// the device has writable fields).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Starts processing queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops processing and forgets the queues (driver reset).
    fn reset(&mut self);
    /// Quiesces the device (nothing half done is left that the snapshot
    /// cannot hold; what the backend can take now is written out) and
    /// records its state, writing any file of its own into `blobs`. Called
    /// by the transport with the vCPUs paused.
    fn snapshot(&mut self, blobs: &BlobDir) -> Result<DeviceSnapshot, SnapshotError>;
    /// Restores `snap` into this device, freshly created from the same
    /// configuration: activates it with `ctx` (given, with the queues at the
    /// snapshot's positions, exactly when the snapshot's device was
    /// activated; see [`crate::snapshot::restore_activation`]), then applies
    /// `snap.extra`, reading any file of its own from `blobs`. Nothing is
    /// processed until the transport's `kick`.
    fn restore(
        &mut self,
        snap: &DeviceSnapshot,
        ctx: Option<ActivateContext>,
        blobs: &BlobDir,
    ) -> Result<(), SnapshotError>;
}

/// Registers each of `events` with the device's event loop; one that
/// cannot be watched is logged (as `name`), and the device does without it.
pub fn watch(ops: &mut event_manager::EventOps, name: &str, events: &[event_manager::Events]) {
    for ev in events {
        if let Err(e) = ops.add(*ev) {
            log::error!("{name}: cannot watch fd {}: {e}", ev.fd());
        }
    }
}

/// Copies `data.len()` bytes of `config` from `offset` into `data`, zero
/// filling what lies outside: guest offsets and sizes are untrusted.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let i = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        i.signal_used();
        i.signal_config();
        assert_eq!(i.status(), INT_VRING | INT_CONFIG);
        assert_eq!(i.eventfd().read().unwrap(), 2);
        i.ack(INT_VRING);
        assert_eq!(i.status(), INT_CONFIG);
        i.set_needs_reset();
        assert!(i.needs_reset());
        i.reset();
        assert_eq!(i.status(), 0);
        assert!(!i.needs_reset());
    }
}
