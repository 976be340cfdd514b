//! virtio-rng (device id 4): hands the guest random bytes from the host's
//! kernel CSPRNG so that early boot never stalls waiting for entropy.
//!
//! One queue; every device-writable descriptor of a chain is filled with
//! bytes read from `/dev/urandom` (the same pool `getrandom(2)` uses), capped
//! per chain and chains per event so that a guest cannot keep the event
//! loop busy.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::{drain, ChainError, Drained, Handled};
use super::{
    watch, ActivateContext, ActivateError, DeviceState, Interrupt, VirtioDevice,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::snapshot::{restore_activation, BlobDir, DeviceExtra, DeviceSnapshot, SnapshotError};

/// virtio device id of an entropy source.
pub const RNG_DEVICE_ID: u32 = 4;
/// Largest size of the request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// At most this many random bytes are given per descriptor chain.
pub const MAX_BYTES_PER_CHAIN: usize = 64 * 1024;
/// Most chains served per event, so that a guest posting requests as fast
/// as it can cannot keep the event loop from the other devices.
pub const CHAINS_PER_EVENT: usize = 64;

const RANDOM_SOURCE: &str = "/dev/urandom";
/// Event data tag of the request queue's eventfd.
const QUEUE_EVENT: u32 = 0;

/// Why the entropy device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The host's random source could not be opened.
    #[error("cannot open {RANDOM_SOURCE}: {0}")]
    OpenSource(io::Error),
    /// An eventfd could not be created.
    #[error("cannot create the queue eventfd: {0}")]
    EventFd(io::Error),
}

/// The virtio entropy device.
pub struct Rng {
    source: File,
    interrupt: Arc<Interrupt>,
    queue_events: Vec<EventFd>,
    state: DeviceState,
    buf: Vec<u8>,
}

impl Rng {
    /// An entropy device that raises its interrupt through `interrupt_evt`.
    pub fn new(interrupt_evt: EventFd) -> Result<Rng, RngError> {
        let source = File::open(RANDOM_SOURCE).map_err(RngError::OpenSource)?;
        let queue_evt = EventFd::new(EFD_NONBLOCK).map_err(RngError::EventFd)?;
        Ok(Rng {
            source,
            interrupt: Arc::new(Interrupt::new(interrupt_evt)),
            queue_events: vec![queue_evt],
            state: DeviceState::Inactive,
            buf: Vec::new(),
        })
    }

    /// Serves every available request, then signals the guest if it asked
    /// for it.
    pub(crate) fn process_queue(&mut self) {
        let Some(active) = self.state.running() else {
            return;
        };
        let (source, buf) = (&mut self.source, &mut self.buf);
        let drained = drain(active, 0, Some(CHAINS_PER_EVENT), |mem, chain| {
            let mut writer = match chain.writer(mem) {
                Ok(writer) => writer,
                Err(e) => return Handled::Malformed(ChainError::Malformed(e)),
            };
            let n = writer.available_bytes().min(MAX_BYTES_PER_CHAIN);
            if n == 0 {
                return Handled::Malformed(ChainError::NoWritable);
            }
            Handled::Used(fill(source, buf, &mut writer, n))
        });
        if drained == Drained::Budget {
            // Let other devices run; come back on the next turn.
            if let Err(e) = self.queue_events[0].write(1) {
                warn!("virtio-rng: cannot re-arm the queue event: {e}");
            }
        }
    }
}

/// Writes `n` random bytes through `writer`; returns how many went to the
/// guest (0 if the host's source failed, which is logged).
fn fill<W: Write>(source: &mut File, buf: &mut Vec<u8>, writer: &mut W, n: usize) -> u32 {
    buf.resize(n, 0);
    if let Err(e) = source.read_exact(&mut buf[..n]) {
        error!("virtio-rng: reading {RANDOM_SOURCE} failed: {e}");
        return 0;
    }
    match writer.write_all(&buf[..n]) {
        // n <= MAX_BYTES_PER_CHAIN, which fits in u32.
        Ok(()) => n as u32,
        Err(e) => {
            warn!("virtio-rng: cannot write to guest memory: {e}");
            0
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        RNG_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.state.activate(ctx, &self.interrupt, "virtio-rng", 1)
    }

    fn reset(&mut self) {
        self.state.reset();
    }

    /// Nothing beyond the queue: every chain is served at once.
    fn snapshot(&mut self, _blobs: &BlobDir) -> Result<DeviceSnapshot, SnapshotError> {
        Ok(self.state.snapshot(DeviceExtra::Rng))
    }

    fn restore(
        &mut self,
        snap: &DeviceSnapshot,
        ctx: Option<ActivateContext>,
        blobs: &BlobDir,
    ) -> Result<(), SnapshotError> {
        if snap.extra != DeviceExtra::Rng {
            return Err(snap.extra.wrong(blobs, "entropy"));
        }
        restore_activation(self, snap, ctx, blobs, |d| &mut d.state)
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        let queue = Events::with_data(&self.queue_events[0], QUEUE_EVENT, EventSet::IN);
        watch(ops, "virtio-rng", &[queue]);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            QUEUE_EVENT => {
                // Always drain, so that a notify before activation does not
                // keep the event loop awake.
                let _ = self.queue_events[0].read();
                self.process_queue();
            }
            other => warn!("virtio-rng: unexpected event tag {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    use crate::virtio::test_utils::{
        mem, mmio_activate, mmio_configure, mmio_read, read_guest, snapshot_through_json, Looped,
        TestQueue, MEM_SIZE, R, W,
    };

    type Setup = Looped<Rng>;

    fn setup() -> Setup {
        Looped::new(|irq| Rng::new(irq).unwrap())
    }

    fn kick(s: &mut Setup) {
        s.kick(0);
        s.settle();
    }

    #[test]
    fn identity() {
        let s = setup();
        let d = s.lock();
        assert_eq!(d.device_type(), 4);
        assert_eq!(d.queue_max_sizes(), &[256]);
        assert_ne!(d.features() & VIRTIO_F_VERSION_1, 0);
        assert_eq!(d.queue_events().len(), 1);
    }

    #[test]
    fn fills_writable_descriptors() {
        let mut s = setup();
        let mem = mem();
        let mut q = TestQueue::new(&mem, 0, 16);
        s.activate(&mem, &[&q], false);
        kick(&mut s);
        // Skip the notify that activation would have sent.
        let _ = s.irq.read();
        // A readable descriptor in the middle is skipped, not filled.
        q.add_chain(&[(0x10_000, 32, W), (0x11_000, 8, R), (0x12_000, 32, W)]);
        mem.write_slice(&[0xaa; 8], GuestAddress(0x11_000)).unwrap();
        kick(&mut s);
        assert_eq!(q.used_idx(), 1);
        assert_eq!(q.used_entry(0), (0, 64));
        let a = read_guest(&mem, 0x10_000, 32);
        let b = read_guest(&mem, 0x12_000, 32);
        // 2^-256 chance of a false failure per buffer.
        assert_ne!(a, [0u8; 32]);
        assert_ne!(b, [0u8; 32]);
        assert_ne!(a, b);
        assert_eq!(read_guest(&mem, 0x11_000, 8), [0xaa; 8]);
        assert_eq!(s.irq.read().unwrap(), 1);
    }

    #[test]
    fn caps_bytes_per_chain() {
        let mut s = setup();
        let mem = mem();
        let mut q = TestQueue::new(&mem, 0, 16);
        s.activate(&mem, &[&q], false);
        q.add_chain(&[(0x10_0000, 0x10_0000, W)]);
        kick(&mut s);
        assert_eq!(q.used_entry(0), (0, MAX_BYTES_PER_CHAIN as u32));
        let after = read_guest(&mem, 0x10_0000 + MAX_BYTES_PER_CHAIN as u64, 64);
        assert_eq!(after, [0u8; 64]);
    }

    #[test]
    fn bad_chains_complete_empty_and_device_keeps_working() {
        let mut s = setup();
        let mem = mem();
        let mut q = TestQueue::new(&mem, 0, 16);
        s.activate(&mem, &[&q], false);
        // Outside guest memory.
        q.add_chain(&[(0xffff_0000, 64, W)]);
        // Straddling the end of guest memory.
        q.add_chain(&[(MEM_SIZE as u64 - 16, 64, W)]);
        // No writable descriptor at all.
        q.add_chain(&[(0x10_000, 64, R)]);
        // Zero-length writable descriptor.
        q.add_chain(&[(0x10_000, 0, W)]);
        // A good one after them.
        q.add_chain(&[(0x10_000, 16, W)]);
        kick(&mut s);
        assert_eq!(q.used_idx(), 5);
        for i in 0..4 {
            assert_eq!(q.used_entry(i), (u32::from(i), 0));
        }
        assert_eq!(q.used_entry(4), (4, 16));
    }

    #[test]
    fn notify_before_activation_is_drained() {
        let mut s = setup();
        kick(&mut s);
        assert_eq!(s.em.run_with_timeout(0).unwrap(), 0);
        assert!(s.irq.read().is_err());
        // After a reset the queue is no longer processed.
        let mem = mem();
        let mut q = TestQueue::new(&mem, 0, 16);
        s.activate(&mem, &[&q], false);
        s.lock().reset();
        q.add_chain(&[(0x10_000, 16, W)]);
        kick(&mut s);
        assert_eq!(q.used_idx(), 0);
    }

    #[test]
    fn bogus_avail_index_needs_reset_without_spinning() {
        let mut s = setup();
        let mem = mem();
        let mut q = TestQueue::new(&mem, 0, 16);
        s.activate(&mem, &[&q], false);
        q.set_avail_idx(100);
        kick(&mut s);
        assert!(s.lock().interrupt().needs_reset());
        assert_eq!(q.used_idx(), 0);
        kick(&mut s);
        assert_eq!(q.used_idx(), 0);
    }

    #[test]
    fn driven_through_the_mmio_transport() {
        use crate::virtio::mmio::MmioTransport;
        use crate::virtio::test_utils::{mmio_read, mmio_write};

        let mut s = setup();
        let mem = mem();
        let mut q = TestQueue::new(&mem, 0, 16);
        let dev: Arc<std::sync::Mutex<dyn VirtioDevice>> = s.dev.clone();
        let mut t = MmioTransport::new(mem.clone(), dev, "rng").unwrap();
        mmio_configure(&mut t, VIRTIO_F_RING_EVENT_IDX as u32, &[&q]);
        q.add_chain(&[(0x10_000, 48, W)]);
        // The chain was queued before DRIVER_OK; activation kicks the queue.
        mmio_write(&mut t, 0x70, 0xf);
        s.settle();
        assert_eq!(q.used_entry(0), (0, 48));
        assert_eq!(s.irq.read().unwrap(), 1);
        assert_eq!(mmio_read(&mut t, 0x60), crate::virtio::INT_VRING);
    }

    #[test]
    fn unready_queue_is_refused() {
        let s = setup();
        let mut queue = Queue::new(16).unwrap();
        queue.set_ready(false);
        let ctx = ActivateContext {
            mem: mem(),
            queues: vec![queue],
            acked_features: VIRTIO_F_VERSION_1,
        };
        assert!(matches!(
            s.lock().activate(ctx),
            Err(ActivateError::QueueNotReady(0))
        ));
    }

    #[test]
    fn a_full_queue_is_served_in_turns() {
        let mut s = setup();
        let mem = mem();
        let mut q = TestQueue::new(&mem, 0, 256);
        s.activate(&mem, &[&q], false);
        let n = CHAINS_PER_EVENT as u16 + 5;
        for i in 0..u64::from(n) {
            q.add_chain(&[(0x10_000 + i * 64, 16, W)]);
        }
        s.lock().queue_events()[0].write(1).unwrap();
        // One turn of the loop serves one budget's worth.
        s.em.run_with_timeout(0).unwrap();
        assert_eq!(q.used_idx(), CHAINS_PER_EVENT as u16);
        // The device re-armed itself: the rest follows without a notify.
        s.settle();
        assert_eq!(q.used_idx(), n);
    }

    #[test]
    fn restored_device_goes_on_where_the_old_one_stopped() {
        let mem = mem();
        let mut q = TestQueue::new(&mem, 0, 16);
        let mut s = setup();
        let mut t = s.transport(&mem, "rng0");
        mmio_activate(&mut t, VIRTIO_F_RING_EVENT_IDX as u32, &[&q]);
        for i in 0..3 {
            q.add_chain(&[(0x10_000 + i * 0x100, 16, W)]);
        }
        s.settle();
        assert_eq!(q.used_idx(), 3);
        // Made available while the VM is paused: not served yet.
        q.add_chain(&[(0x20_000, 32, W)]);
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let snap = snapshot_through_json(&mut t, dir.as_path());
        let queues = snap.device.queues.as_ref().unwrap();
        assert_eq!((queues[0].next_avail, queues[0].next_used), (3, 3));
        assert_eq!(snap.device.extra, DeviceExtra::Rng);
        assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 0);

        let mut s2 = setup();
        let mut t2 = s2.transport(&mem, "rng0");
        t2.restore(&snap, dir.as_path()).unwrap();
        assert_eq!(mmio_read(&mut t2, 0x70), 0xf);
        s2.settle();
        assert_eq!(q.used_idx(), 3, "nothing is served before the kick");
        t2.kick();
        s2.settle();
        assert_eq!(q.used_idx(), 4);
        assert_eq!(q.used_entry(3), (3, 32));
        assert_ne!(read_guest(&mem, 0x20_000, 32), [0u8; 32]);
        q.add_chain(&[(0x30_000, 8, W)]);
        s2.kick(0);
        s2.settle();
        assert_eq!(q.used_entry(4), (4, 8));
    }
}
