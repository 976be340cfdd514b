//! The virtio-mmio transport, version 2 ("modern"): one 4 KiB register
//! window per device (virtio 1.2 spec, section 4.2.2).
//!
//! Invariants the register handlers keep, and a restore checks in a
//! snapshot before it takes one: the status only ever holds a prefix of
//! ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK (plus FAILED); the driver's
//! features are a subset of the device's, with VERSION_1, once FEATURES_OK
//! is set; queues change only between FEATURES_OK and DRIVER_OK, so an
//! activated device holds the transport's queues, only further along.

use std::path::Path;
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{
    ActivateContext, Interrupt, VirtioDevice, INT_CONFIG, INT_VRING, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
};
use crate::snapshot::{
    queue_from_snapshot, BlobDir, QueueSnapshot, SnapshotError, TransportSnapshot,
};
use crate::BusDevice;

/// Size of a device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where the VMM puts its ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const DEVICE_NEEDS_RESET: u32 = 64;
const FAILED: u32 = 128;

/// The transport state of one virtio-mmio device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<Interrupt>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    device_type: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    name: String,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MmioTransport {
    /// A transport for `device`; `name` is used in log lines.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        name: &str,
    ) -> Result<Self, virtio_queue::Error> {
        let (queues, device_type, device_features, interrupt) = {
            let d = lock(&device);
            let queues = d
                .queue_max_sizes()
                .iter()
                .map(|&max| Queue::new(max))
                .collect::<Result<Vec<_>, _>>()?;
            (
                queues,
                d.device_type(),
                d.features() | VIRTIO_F_VERSION_1,
                d.interrupt().clone(),
            )
        };
        Ok(MmioTransport {
            device,
            interrupt,
            mem,
            queues,
            device_type,
            device_features,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            name: name.to_owned(),
        })
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The current device status register (for tests and logs).
    pub fn status(&self) -> u32 {
        let mut s = self.status;
        if self.interrupt.needs_reset() {
            s |= DEVICE_NEEDS_RESET;
        }
        s
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue fields may change only between FEATURES_OK and DRIVER_OK.
    fn queue_writable(&self) -> bool {
        self.status & FEATURES_OK != 0 && self.status & (DRIVER_OK | FAILED) == 0
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if !self.queue_writable() {
            warn!(
                "{}: queue register written outside FEATURES_OK..DRIVER_OK, ignored",
                self.name
            );
            return;
        }
        match self.selected_queue() {
            Some(q) => f(q),
            None => warn!(
                "{}: write to absent queue {}, ignored",
                self.name, self.queue_sel
            ),
        }
    }

    fn reset(&mut self) {
        if self.activated {
            lock(&self.device).reset();
        }
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.reset();
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        let old = self.status;
        // Only add one bit at a time, in the order the spec gives.
        let valid = matches!(
            (old, value),
            (0, ACKNOWLEDGE) | (ACKNOWLEDGE, 0b11) | (0b11, 0b1011) | (0b1011, 0b1111)
        );
        if !valid {
            warn!(
                "{}: invalid status transition {old:#x} -> {value:#x}, ignored",
                self.name
            );
            return;
        }
        if value & FEATURES_OK != 0 && old & FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.device_features;
            if unknown != 0 {
                warn!(
                    "{}: driver accepted features the device does not offer ({unknown:#x}); FEATURES_OK refused",
                    self.name
                );
                return;
            }
            if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                warn!(
                    "{}: driver did not accept VIRTIO_F_VERSION_1; FEATURES_OK refused",
                    self.name
                );
                return;
            }
            let event_idx = self.driver_features & VIRTIO_F_RING_EVENT_IDX != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
        }
        if value & DRIVER_OK != 0 && old & DRIVER_OK == 0 {
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn activate(&mut self) {
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                warn!(
                    "{}: queue {i} has invalid addresses or size; device needs reset",
                    self.name
                );
                self.interrupt.set_needs_reset();
                return;
            }
        }
        let queues = match self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(q) => q,
            Err(e) => {
                warn!(
                    "{}: queue state invalid ({e}); device needs reset",
                    self.name
                );
                self.interrupt.set_needs_reset();
                return;
            }
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            acked_features: self.driver_features,
        };
        let mut dev = lock(&self.device);
        match dev.activate(ctx) {
            Ok(()) => {
                self.activated = true;
                // The driver may have notified before DRIVER_OK.
                for evt in dev.queue_events() {
                    let _ = evt.write(1);
                }
                debug!("{}: activated", self.name);
            }
            Err(e) => {
                warn!("{}: activation failed: {e}; device needs reset", self.name);
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC_VALUE,
            0x004 => VERSION,
            0x008 => self.device_type,
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            0x034 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status(),
            0x0fc => self.config_generation,
            // Shared memory regions: none ("length ~0").
            0x0b0 | 0x0b4 => u32::MAX,
            _ => {
                debug!("{}: read of unknown register {offset:#x}", self.name);
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                if self.status & DRIVER == 0 || self.status & FEATURES_OK != 0 {
                    warn!(
                        "{}: driver features written in status {:#x}, ignored",
                        self.name, self.status
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => self.update_queue(|q| q.set_size(v as u16)),
            0x044 => self.update_queue(|q| q.set_ready(v == 1)),
            0x050 => {
                // Absorbed by an ioeventfd unless the device handles this
                // queue's notifications in the vCPU thread; before
                // activation the eventfd holds it (activation wakes all).
                let mut dev = lock(&self.device);
                let i = v as usize;
                match dev.queue_events().get(i) {
                    Some(_) if self.activated && dev.notified_in_vcpu(i) => dev.queue_notify(i),
                    Some(evt) => {
                        let _ = evt.write(1);
                    }
                    None => warn!("{}: notify for absent queue {v}", self.name),
                }
            }
            0x064 => {
                if self.status & DRIVER_OK != 0 {
                    self.interrupt.ack(v);
                }
            }
            0x070 => self.set_status(v),
            0x080 => self.update_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x084 => self.update_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x090 => self.update_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x094 => self.update_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0x0a0 => self.update_queue(|q| q.set_used_ring_address(Some(v), None)),
            0x0a4 => self.update_queue(|q| q.set_used_ring_address(None, Some(v))),
            0x0ac => {} // SHMSel: no regions
            _ => debug!("{}: write of unknown register {offset:#x}", self.name),
        }
    }
}

/// Snapshots (see `crate::snapshot`).
impl MmioTransport {
    /// Quiesces the device and records the transport's and the device's
    /// state; the device may write files of its own into `dir`. Called with
    /// the vCPUs paused.
    pub fn snapshot(&mut self, dir: &Path) -> Result<TransportSnapshot, SnapshotError> {
        let blobs = BlobDir::new(dir, &self.name);
        let device = lock(&self.device).snapshot(&blobs)?;
        Ok(TransportSnapshot {
            device_type: self.device_type,
            device_features: self.device_features,
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            activated: self.activated,
            queues: self.queues.iter().map(QueueSnapshot::from).collect(),
            device,
        })
    }

    /// Restores `snap` into this transport, freshly created for a device
    /// built from the same configuration, before any vCPU runs; the
    /// device may read files of its own from `dir`. Refuses a snapshot of
    /// another kind of device, with other features, or with any value the
    /// registers could not hold; on any error the transport is left reset.
    /// Nothing is processed until [`MmioTransport::kick`].
    pub fn restore(&mut self, snap: &TransportSnapshot, dir: &Path) -> Result<(), SnapshotError> {
        self.reset();
        let blobs = BlobDir::new(dir, &self.name);
        let (queues, ctx) = self.check(snap)?;
        self.queues = queues;
        self.device_features_sel = snap.device_features_sel;
        self.driver_features = snap.driver_features;
        self.driver_features_sel = snap.driver_features_sel;
        self.queue_sel = snap.queue_sel;
        self.status = snap.status;
        self.config_generation = snap.config_generation;
        self.interrupt
            .restore(snap.interrupt_status, snap.needs_reset);
        self.activated = ctx.is_some();
        let restored = lock(&self.device).restore(&snap.device, ctx, &blobs);
        if let Err(e) = restored {
            self.reset();
            return Err(e);
        }
        debug!(
            "{}: restored{}",
            self.name,
            if self.activated { ", activated" } else { "" }
        );
        Ok(())
    }

    /// Checks `snap` against this transport and its device; returns the
    /// transport's queues and, when the device was activated, what it is
    /// activated with (its queues at the device's positions).
    fn check(
        &self,
        snap: &TransportSnapshot,
    ) -> Result<(Vec<Queue>, Option<ActivateContext>), SnapshotError> {
        let name = &self.name;
        let invalid = |reason: String| SnapshotError::Invalid {
            device: name.clone(),
            reason,
        };
        if snap.device_type != self.device_type {
            return Err(SnapshotError::DeviceType {
                device: name.clone(),
                snapshot: snap.device_type,
                this: self.device_type,
            });
        }
        if snap.device_features != self.device_features {
            return Err(SnapshotError::Features {
                device: name.clone(),
                snapshot: snap.device_features,
                this: self.device_features,
            });
        }
        let progress = snap.status & !FAILED;
        if !matches!(progress, 0 | ACKNOWLEDGE | 0b11 | 0b1011 | 0b1111) {
            return Err(invalid(format!(
                "device status {:#x} is not one the driver can reach",
                snap.status
            )));
        }
        if snap.status & FEATURES_OK != 0 {
            let unknown = snap.driver_features & !self.device_features;
            if unknown != 0 || snap.driver_features & VIRTIO_F_VERSION_1 == 0 {
                return Err(invalid(format!(
                    "driver features {:#x} after FEATURES_OK are not a subset of the device's \
                     with VERSION_1",
                    snap.driver_features
                )));
            }
        }
        if snap.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return Err(invalid(format!(
                "interrupt status {:#x} has unknown bits",
                snap.interrupt_status
            )));
        }
        if snap.activated && snap.status & DRIVER_OK == 0 {
            return Err(invalid(format!(
                "activated in device status {:#x}, without DRIVER_OK",
                snap.status
            )));
        }
        let max_sizes = lock(&self.device).queue_max_sizes().to_vec();
        if snap.queues.len() != max_sizes.len() {
            return Err(SnapshotError::QueueCount {
                device: name.clone(),
                snapshot: snap.queues.len(),
                this: max_sizes.len(),
            });
        }
        let queues = snap
            .queues
            .iter()
            .zip(&max_sizes)
            .enumerate()
            .map(|(i, (q, &max))| queue_from_snapshot(name, i, q, max, None))
            .collect::<Result<Vec<_>, _>>()?;
        let ctx = match (snap.activated, &snap.device.queues) {
            (false, None) => None,
            (true, Some(device_queues)) => {
                if device_queues.len() != max_sizes.len() {
                    return Err(SnapshotError::QueueCount {
                        device: name.clone(),
                        snapshot: device_queues.len(),
                        this: max_sizes.len(),
                    });
                }
                let mut active = Vec::with_capacity(device_queues.len());
                for (i, (q, transport_q)) in device_queues.iter().zip(&snap.queues).enumerate() {
                    if !q.same_config(transport_q) {
                        return Err(SnapshotError::InvalidQueue {
                            device: name.clone(),
                            index: i,
                            reason: "the device's queue differs from the transport's".into(),
                        });
                    }
                    active.push(queue_from_snapshot(
                        name,
                        i,
                        q,
                        max_sizes[i],
                        Some(&self.mem),
                    )?);
                }
                Some(ActivateContext {
                    mem: self.mem.clone(),
                    queues: active,
                    acked_features: snap.driver_features,
                })
            }
            (activated, _) => {
                return Err(invalid(format!(
                    "the transport {} activated but the device {} queues",
                    if activated { "was" } else { "was not" },
                    if activated { "holds no" } else { "holds" }
                )))
            }
        };
        Ok((queues, ctx))
    }

    /// Wakes the restored device, just before the vCPUs resume: writes
    /// every queue eventfd, so that anything made available while the VM
    /// was paused (or its notification lost with the old process) is
    /// served, and raises the interrupt again if a status bit is set.
    pub fn kick(&self) {
        for (i, evt) in lock(&self.device).queue_events().iter().enumerate() {
            if let Err(e) = evt.write(1) {
                warn!("{}: cannot kick queue {i}: {e}", self.name);
            }
        }
        if self.interrupt.status() != 0 {
            self.interrupt.resend();
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if self.status & FAILED != 0 {
                data.fill(0);
                return;
            }
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            debug!(
                "{}: {}-byte read at {offset:#x} ignored",
                self.name,
                data.len()
            );
            data.fill(0);
            return;
        }
        let v = self.read_register(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if self.status & DRIVER == 0 || self.status & FAILED != 0 {
                warn!("{}: config write before DRIVER, ignored", self.name);
                return;
            }
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            debug!(
                "{}: {}-byte write at {offset:#x} ignored",
                self.name,
                data.len()
            );
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::TransportSnapshot;
    use crate::snapshot::{restore_activation, DeviceExtra, DeviceSnapshot};
    use crate::virtio::test_utils::{
        mem, mmio_configure, mmio_read as read, mmio_write as write, snapshot_through_json,
        TestQueue, MEM_SIZE,
    };
    use crate::virtio::{ActivateError, DeviceState, INT_VRING};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    struct Dummy {
        interrupt: Arc<Interrupt>,
        events: Vec<EventFd>,
        activations: usize,
        resets: usize,
        fail_activate: bool,
        inline_notifies: Vec<usize>,
        config: [u8; 8],
        device_type: u32,
        state: DeviceState,
    }

    impl Dummy {
        fn new() -> Self {
            Dummy {
                interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
                events: vec![
                    EventFd::new(EFD_NONBLOCK).unwrap(),
                    EventFd::new(EFD_NONBLOCK).unwrap(),
                ],
                activations: 0,
                resets: 0,
                fail_activate: false,
                inline_notifies: Vec::new(),
                config: [1, 2, 3, 4, 5, 6, 7, 8],
                device_type: 42,
                state: DeviceState::Inactive,
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            self.device_type
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_RING_EVENT_IDX | 1
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn interrupt(&self) -> &Arc<Interrupt> {
            &self.interrupt
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data)
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Other("no".into()));
            }
            assert_eq!(ctx.queues.len(), 2);
            self.activations += 1;
            let interrupt = self.interrupt.clone();
            self.state.activate(ctx, &interrupt, "dummy", 2)
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.state.reset();
        }
        fn snapshot(&mut self, _blobs: &BlobDir) -> Result<DeviceSnapshot, SnapshotError> {
            Ok(self.state.snapshot(DeviceExtra::None))
        }
        fn restore(
            &mut self,
            snap: &DeviceSnapshot,
            ctx: Option<ActivateContext>,
            blobs: &BlobDir,
        ) -> Result<(), SnapshotError> {
            if snap.extra != DeviceExtra::None {
                return Err(snap.extra.wrong(blobs, "stateless"));
            }
            restore_activation(self, snap, ctx, blobs, |d| &mut d.state)
        }
        fn notified_in_vcpu(&self, index: usize) -> bool {
            index == 1
        }
        fn queue_notify(&mut self, index: usize) {
            self.inline_notifies.push(index);
        }
    }

    fn transport(dev: Dummy) -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let dev = Arc::new(Mutex::new(dev));
        let t = MmioTransport::new(mem(), dev.clone(), "test").unwrap();
        (t, dev)
    }

    /// Drives the standard handshake with valid queues.
    fn bring_up(t: &mut MmioTransport) {
        let m = mem();
        let queues = [
            TestQueue::new(&m, 0x1000, 16),
            TestQueue::new(&m, 0x4000, 16),
        ];
        mmio_configure(
            t,
            1 | VIRTIO_F_RING_EVENT_IDX as u32,
            &[&queues[0], &queues[1]],
        );
        write(t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport(Dummy::new());
        assert_eq!(read(&mut t, 0x0), MAGIC_VALUE);
        assert_eq!(read(&mut t, 0x4), 2);
        assert_eq!(read(&mut t, 0x8), 42);
        write(&mut t, 0x14, 1);
        assert_eq!(read(&mut t, 0x10), 1); // VERSION_1 in the high page
        write(&mut t, 0x14, 0);
        assert_eq!(read(&mut t, 0x10), (VIRTIO_F_RING_EVENT_IDX | 1) as u32);
        write(&mut t, 0x30, 1);
        assert_eq!(read(&mut t, 0x34), 16);
        write(&mut t, 0x30, 7);
        assert_eq!(read(&mut t, 0x34), 0);
    }

    #[test]
    fn handshake_activates_once_and_reset_resets() {
        let (mut t, dev) = transport(Dummy::new());
        bring_up(&mut t);
        assert_eq!(dev.lock().unwrap().activations, 1);
        assert_eq!(read(&mut t, 0x70), 0xf);
        // Queue writes after DRIVER_OK are ignored.
        write(&mut t, 0x30, 0);
        write(&mut t, 0x38, 2);
        assert_eq!(t.queues[0].size(), 16);
        dev.lock().unwrap().interrupt.signal_used();
        assert_eq!(read(&mut t, 0x60), INT_VRING);
        write(&mut t, 0x64, INT_VRING);
        assert_eq!(read(&mut t, 0x60), 0);
        write(&mut t, 0x70, 0);
        assert_eq!(read(&mut t, 0x70), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
    }

    #[test]
    fn out_of_order_status_and_unknown_features_are_refused() {
        let (mut t, dev) = transport(Dummy::new());
        write(&mut t, 0x70, DRIVER_OK);
        assert_eq!(read(&mut t, 0x70), 0);
        write(&mut t, 0x70, ACKNOWLEDGE);
        write(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
        write(&mut t, 0x20, 1 << 5); // not offered
        write(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(read(&mut t, 0x70) & FEATURES_OK, 0);
        assert_eq!(dev.lock().unwrap().activations, 0);
    }

    #[test]
    fn queue_outside_memory_needs_reset() {
        let (mut t, dev) = transport(Dummy::new());
        write(&mut t, 0x70, ACKNOWLEDGE);
        write(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
        write(&mut t, 0x24, 1);
        write(&mut t, 0x20, 1);
        write(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        write(&mut t, 0x30, 0);
        write(&mut t, 0x38, 16);
        write(&mut t, 0x80, 0xffff_0000); // beyond guest memory
        write(&mut t, 0x84, 0x10);
        write(&mut t, 0x44, 1);
        write(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(dev.lock().unwrap().activations, 0);
        assert_ne!(read(&mut t, 0x70) & DEVICE_NEEDS_RESET, 0);
        write(&mut t, 0x70, 0);
        assert_eq!(read(&mut t, 0x70), 0);
    }

    #[test]
    fn failed_activation_needs_reset() {
        let mut d = Dummy::new();
        d.fail_activate = true;
        let (mut t, _) = transport(d);
        bring_up(&mut t);
        assert_ne!(read(&mut t, 0x70) & DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_notify_reaches_the_device_once_it_runs() {
        let (mut t, dev) = transport(Dummy::new());
        // Before DRIVER_OK: the eventfd holds it for activation.
        write(&mut t, 0x50, 1);
        assert!(dev.lock().unwrap().inline_notifies.is_empty());
        assert_eq!(dev.lock().unwrap().events[1].read().unwrap(), 1);
        bring_up(&mut t);
        for e in &dev.lock().unwrap().events {
            let _ = e.read();
        }
        write(&mut t, 0x50, 1);
        write(&mut t, 0x50, 0);
        let d = dev.lock().unwrap();
        assert_eq!(d.inline_notifies, vec![1]);
        assert_eq!(d.events[0].read().unwrap(), 1);
        assert!(
            d.events[1].read().is_err(),
            "inline queue also woke the loop"
        );
    }

    /// The dummy writes no files: any directory will do.
    fn snapshot_of(t: &mut MmioTransport) -> TransportSnapshot {
        snapshot_through_json(t, &std::env::temp_dir())
    }

    fn restore(t: &mut MmioTransport, snap: &TransportSnapshot) -> Result<(), SnapshotError> {
        t.restore(snap, &std::env::temp_dir())
    }

    #[test]
    fn snapshot_restores_registers_and_activation() {
        let (mut t, dev) = transport(Dummy::new());
        bring_up(&mut t);
        write(&mut t, 0x14, 1);
        write(&mut t, 0x24, 1);
        write(&mut t, 0x30, 1);
        t.write(0x100, &[9]);
        dev.lock().unwrap().interrupt.signal_used();
        let snap = snapshot_of(&mut t);
        assert!(snap.activated);
        assert_eq!(snap.interrupt_status, INT_VRING);
        assert_eq!(snap.device.queues.as_ref().map(Vec::len), Some(2));

        let (mut t2, dev2) = transport(Dummy::new());
        restore(&mut t2, &snap).unwrap();
        assert_eq!(read(&mut t2, 0x70), 0xf);
        assert_eq!(read(&mut t2, 0x10), 1, "DeviceFeaturesSel kept");
        assert_eq!(read(&mut t2, 0x34), 16, "QueueSel kept");
        assert_eq!(read(&mut t2, 0x44), 1);
        assert_eq!(read(&mut t2, 0xfc), 1, "ConfigGeneration kept");
        assert_eq!(read(&mut t2, 0x60), INT_VRING);
        {
            let d = dev2.lock().unwrap();
            assert_eq!(d.activations, 1);
            // Nothing is woken before the kick.
            assert!(d.events.iter().all(|e| e.read().is_err()));
            assert!(d.interrupt.eventfd().read().is_err());
        }
        t2.kick();
        {
            let d = dev2.lock().unwrap();
            assert!(d.events.iter().all(|e| e.read().ok() == Some(1)));
            assert_eq!(d.interrupt.eventfd().read().unwrap(), 1);
        }
        // A snapshot of the restored transport is the same snapshot.
        assert_eq!(snapshot_of(&mut t2), snap);
        // The driver goes on as before: acknowledges, resets.
        write(&mut t2, 0x64, INT_VRING);
        assert_eq!(read(&mut t2, 0x60), 0);
        write(&mut t2, 0x70, 0);
        assert_eq!(dev2.lock().unwrap().resets, 1);
    }

    #[test]
    fn a_handshake_in_progress_goes_on_after_restore() {
        let m = mem();
        let queues = [
            TestQueue::new(&m, 0x1000, 16),
            TestQueue::new(&m, 0x4000, 16),
        ];
        let (mut t, _) = transport(Dummy::new());
        mmio_configure(&mut t, 1, &[&queues[0], &queues[1]]);
        let snap = snapshot_of(&mut t);
        assert!(!snap.activated);
        assert_eq!(snap.device.queues, None);
        let (mut t2, dev2) = transport(Dummy::new());
        restore(&mut t2, &snap).unwrap();
        assert_eq!(read(&mut t2, 0x70), 0xb);
        assert_eq!(dev2.lock().unwrap().activations, 0);
        t2.kick();
        assert!(dev2.lock().unwrap().interrupt.eventfd().read().is_err());
        write(&mut t2, 0x70, 0xf);
        assert_eq!(dev2.lock().unwrap().activations, 1);
        assert_eq!(t2.queues[1].desc_table(), 0x4000);
    }

    /// Restoring `snap` into a fresh dummy fails with an error whose
    /// message holds `needle`, and leaves the transport reset.
    fn refused(snap: &TransportSnapshot, needle: &str) -> SnapshotError {
        let (mut t, dev) = transport(Dummy::new());
        let e = restore(&mut t, snap).unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
        assert!(e.to_string().starts_with("test: "), "{e}");
        assert_eq!(read(&mut t, 0x70), 0);
        assert_eq!(read(&mut t, 0x60), 0);
        assert!(!t.activated);
        let d = dev.lock().unwrap();
        assert!(!d.state.is_running());
        e
    }

    fn activated_snapshot() -> TransportSnapshot {
        let (mut t, _) = transport(Dummy::new());
        bring_up(&mut t);
        snapshot_of(&mut t)
    }

    #[test]
    fn another_device_type_is_refused() {
        let mut d = Dummy::new();
        d.device_type = 2;
        let (mut t, _) = transport(d);
        let snap = snapshot_of(&mut t);
        let mut d = Dummy::new();
        d.device_type = 3;
        let (mut t, _) = transport(d);
        let e = restore(&mut t, &snap).unwrap_err();
        assert!(matches!(e, SnapshotError::DeviceType { .. }));
        assert_eq!(
            e.to_string(),
            "test: snapshot has a virtio device of type 2 (block) where this VM has type 3 (console)"
        );
    }

    #[test]
    fn other_features_are_refused() {
        let mut snap = activated_snapshot();
        snap.device_features |= 1 << 7;
        let e = refused(&snap, "differing bits 0x80");
        assert!(matches!(e, SnapshotError::Features { .. }));
    }

    #[test]
    fn impossible_registers_are_refused() {
        let good = activated_snapshot();
        let mut snap = good.clone();
        snap.status = DRIVER_OK;
        refused(&snap, "device status 0x4");
        let mut snap = good.clone();
        snap.driver_features |= 1 << 40;
        refused(&snap, "not a subset");
        let mut snap = good.clone();
        snap.interrupt_status = 0x10;
        refused(&snap, "unknown bits");
        let mut snap = good.clone();
        snap.status = 0xb;
        refused(&snap, "without DRIVER_OK");
        let mut snap = good.clone();
        snap.device.queues = None;
        refused(&snap, "holds no queues");
        let mut snap = good.clone();
        snap.activated = false;
        refused(&snap, "was not activated but the device holds queues");
        let mut snap = good.clone();
        snap.device.extra = crate::snapshot::DeviceExtra::Rng;
        refused(&snap, "holds the state of a entropy device");
        // FAILED after DRIVER_OK is a state the driver can reach.
        let mut snap = good;
        snap.status |= FAILED;
        let (mut t, _) = transport(Dummy::new());
        restore(&mut t, &snap).unwrap();
    }

    #[test]
    fn bad_queues_are_refused() {
        let good = activated_snapshot();
        let mut snap = good.clone();
        snap.queues.pop();
        let e = refused(&snap, "snapshot has 1 queues where this device has 2");
        assert!(matches!(e, SnapshotError::QueueCount { .. }));
        // A size over the largest, or not a power of two.
        for size in [32, 12, 0] {
            let mut snap = good.clone();
            snap.queues[1].size = size;
            let e = refused(&snap, "queue 1 in the snapshot is invalid");
            assert!(matches!(e, SnapshotError::InvalidQueue { index: 1, .. }));
        }
        // Another largest size than the device offers.
        let mut snap = good.clone();
        snap.queues[0].max_size = 8;
        snap.queues[0].size = 8;
        refused(&snap, "largest size 8 where the device offers 16");
        // A misaligned ring.
        let mut snap = good.clone();
        snap.queues[0].used_ring += 2;
        refused(&snap, "InvalidUsedRingAlign");
        // Rings outside guest memory, in the transport and the device alike.
        for addr in [MEM_SIZE as u64, u64::MAX - 15, MEM_SIZE as u64 - 16] {
            let mut snap = good.clone();
            snap.queues[0].desc_table = addr;
            snap.device.queues.as_mut().unwrap()[0].desc_table = addr;
            refused(&snap, "not in guest memory");
        }
        // The device's queue configured otherwise than the transport's.
        let mut snap = good.clone();
        snap.device.queues.as_mut().unwrap()[1].avail_ring = 0x8000;
        refused(&snap, "differs from the transport's");
        let mut snap = good.clone();
        snap.device.queues.as_mut().unwrap().pop();
        refused(&snap, "snapshot has 1 queues");
        // An unready queue in an activated device.
        let mut snap = good.clone();
        snap.queues[1].ready = false;
        snap.device.queues.as_mut().unwrap()[1].ready = false;
        refused(&snap, "activated with it not ready");
        // Any position is possible (the ring says whether it makes sense).
        let mut snap = good;
        let q = &mut snap.device.queues.as_mut().unwrap()[0];
        q.next_avail = 0xfff0;
        q.next_used = 0xffee;
        let (mut t, dev) = transport(Dummy::new());
        restore(&mut t, &snap).unwrap();
        let DeviceState::Activated(a) = &dev.lock().unwrap().state else {
            panic!("not activated");
        };
        assert_eq!(a.queues[0].next_avail(), 0xfff0);
        assert_eq!(a.queues[0].next_used(), 0xffee);
    }

    #[test]
    fn a_device_that_refuses_activation_leaves_the_transport_reset() {
        let snap = activated_snapshot();
        let mut d = Dummy::new();
        d.fail_activate = true;
        let (mut t, _) = transport(d);
        let e = restore(&mut t, &snap).unwrap_err();
        assert!(matches!(e, SnapshotError::Activate { .. }), "{e}");
        assert_eq!(read(&mut t, 0x70), 0);
    }

    #[test]
    fn a_broken_device_stays_broken() {
        let (mut t, dev) = transport(Dummy::new());
        bring_up(&mut t);
        if let DeviceState::Activated(a) = &mut dev.lock().unwrap().state {
            a.set_broken(format_args!("test"));
            a.malformed = 7;
        }
        let snap = snapshot_of(&mut t);
        assert!(snap.device.broken && snap.needs_reset);
        let (mut t2, dev2) = transport(Dummy::new());
        restore(&mut t2, &snap).unwrap();
        assert_ne!(read(&mut t2, 0x70) & DEVICE_NEEDS_RESET, 0);
        let d = dev2.lock().unwrap();
        assert!(!d.state.is_running());
        let DeviceState::Activated(a) = &d.state else {
            panic!("not activated");
        };
        assert_eq!(a.malformed, 7);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let (mut t, _) = transport(Dummy::new());
        let mut b = [0xffu8; 2];
        t.read(0x0, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(0x70, &[1]);
        assert_eq!(read(&mut t, 0x70), 0);
        // Config reads go to the device, bounded.
        let mut c = [0u8; 4];
        t.read(0x104, &mut c);
        assert_eq!(c, [5, 6, 7, 8]);
        t.read(0xfff, &mut c);
        assert_eq!(c, [0; 4]);
        // Config write before DRIVER: ignored.
        t.write(0x100, &[9]);
        // Notify for a queue that does not exist.
        write(&mut t, 0x50, 99);
        for off in (0..0x100).step_by(4) {
            read(&mut t, off);
            write(&mut t, off, 0xffff_ffff);
        }
    }
}
