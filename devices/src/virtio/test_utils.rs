//! The driver's side of virtqueues, for the device and transport tests.
//!
//! One guest memory layout ([`mem`], [`MEM_SIZE`]), one queue a test fills
//! the way a guest driver would ([`TestQueue`]: write descriptors, publish
//! heads on the available ring, read back the used ring), one device on its
//! own event loop ([`Looped`]), the virtio-mmio handshake
//! ([`mmio_configure`]) and a snapshot carried as a file would carry it
//! ([`snapshot_through_json`]). Every virtio test uses these, so that a fix
//! to how the tests play the driver is made once.
//!
//! Nothing here checks the device: a test may publish anything, including
//! chains and indexes no correct driver would, and the assertions stay in
//! the tests.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::MmioTransport;
use super::{ActivateContext, VirtioDevice};
use crate::snapshot::TransportSnapshot;
use crate::BusDevice;

/// Size of the guest memory of every test: addresses at or past it are
/// outside guest memory.
pub const MEM_SIZE: usize = 0x100_0000;

/// Descriptor flags: device-readable (no flag).
pub const R: u16 = 0;
/// Descriptor flags: device-writable.
pub const W: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor flags: the chain goes on at `next`.
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// A fresh guest memory of [`MEM_SIZE`] bytes at address 0.
pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Reads `len` bytes of guest memory at `addr`.
pub fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// A split virtqueue in guest memory, driven from the driver's side.
///
/// The descriptor table, available ring and used ring lie one after the
/// other from the queue's base address (as `MockSplitQueue` lays them out).
/// [`TestQueue::add_chain`] takes descriptor table slots in order and wraps
/// to slot 0 when a chain would not fit; [`TestQueue::store`] and
/// [`TestQueue::publish`] write any descriptor and any head, for chains no
/// correct driver would make.
pub struct TestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    size: u16,
    /// The descriptor table slot the next [`TestQueue::add_chain`] uses.
    pub next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl<'a> TestQueue<'a> {
    /// A queue of `size` entries whose descriptor table starts at `base`.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let q = TestQueue {
            mem,
            vq: MockSplitQueue::create(mem, GuestAddress(base), size),
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        // The used ring's flags and index.
        mem.write_obj(0u32, GuestAddress(q.used_addr())).unwrap();
        q
    }

    /// Copies all of guest memory into `into`, as a VM restored from a
    /// snapshot taken now gets it, and returns this queue over that copy,
    /// the driver's state included.
    pub fn fork<'b>(&self, into: &'b GuestMemoryMmap) -> TestQueue<'b> {
        // Creating the mock queue zeroes its indexes: the copy comes after.
        let forked = TestQueue {
            mem: into,
            vq: MockSplitQueue::create(into, self.vq.start(), self.size),
            size: self.size,
            next_desc: self.next_desc,
            avail_idx: self.avail_idx,
            used_seen: self.used_seen,
        };
        into.write_slice(&read_guest(self.mem, 0, MEM_SIZE), GuestAddress(0))
            .unwrap();
        forked
    }

    /// The device's view of this queue, configured and ready.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_ready(true);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.desc_table_addr());
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail_addr());
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used_addr());
        q.set_used_ring_address(lo, hi);
        q
    }

    /// Guest address of the descriptor table.
    pub fn desc_table_addr(&self) -> u64 {
        self.vq.desc_table_addr().0
    }

    /// Guest address of the available ring.
    pub fn avail_addr(&self) -> u64 {
        self.vq.avail_addr().0
    }

    /// Guest address of the used ring: after the available ring and its
    /// `used_event`, 4-aligned, as a driver lays it out. (`MockSplitQueue`
    /// puts its own used ring `size` bytes past the available ring's start,
    /// where, past half the ring, available and used entries overlap; the
    /// tests do not use it.)
    pub fn used_addr(&self) -> u64 {
        (self.avail_addr() + 4 + 2 * u64::from(self.size) + 2 + 3) & !3
    }

    /// Guest address of `used_event`, where an EVENT_IDX driver says after
    /// which used entry it wants an interrupt.
    pub fn used_event_addr(&self) -> GuestAddress {
        GuestAddress(self.avail_addr() + 4 + 2 * u64::from(self.size))
    }

    /// Writes descriptor `index` of the table as given.
    pub fn store(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.vq
            .desc_table()
            .store(
                index,
                RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
            )
            .unwrap();
    }

    /// Offers the chain at `head` on the available ring.
    pub fn publish(&mut self, head: u16) {
        let avail = self.vq.avail();
        avail
            .ring()
            .ref_at(usize::from(self.avail_idx % self.size))
            .unwrap()
            .store(head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        avail.idx().store(self.avail_idx);
    }

    /// Overwrites the available index, as a broken driver would.
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.vq.avail().idx().store(idx);
    }

    /// Writes one chain of `(addr, len, flags)` descriptors (NEXT is added
    /// to all but the last) at the next free table slots and publishes it;
    /// returns its head.
    pub fn add_chain(&mut self, parts: &[(u64, u32, u16)]) -> u16 {
        let n = parts.len() as u16;
        if self.next_desc + n > self.size {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in parts.iter().enumerate() {
            let index = head + i as u16;
            let last = i + 1 == parts.len();
            let (flags, next) = if last {
                (flags, 0)
            } else {
                (flags | NEXT, index + 1)
            };
            self.store(index, addr, len, flags, next);
        }
        self.next_desc += n;
        self.publish(head);
        head
    }

    /// The used index the device published.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used_addr() + 2))
            .unwrap()
    }

    /// Used ring entry `i` (counted from the start, modulo the size), as
    /// (head, len).
    pub fn used_entry(&self, i: u16) -> (u32, u32) {
        let at = self.used_addr() + 4 + 8 * u64::from(i % self.size);
        let id = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    /// Every used entry so far, as (head, len).
    pub fn used(&self) -> Vec<(u32, u32)> {
        (0..self.used_idx()).map(|i| self.used_entry(i)).collect()
    }

    /// The used entries added since the last call, as (head, len).
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx = self.used_idx();
        let mut out = Vec::new();
        while self.used_seen != idx {
            out.push(self.used_entry(self.used_seen));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// Writes register `offset` of a virtio-mmio window.
pub fn mmio_write(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// Reads register `offset` of a virtio-mmio window.
pub fn mmio_read(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut d = [0u8; 4];
    t.read(offset, &mut d);
    u32::from_le_bytes(d)
}

/// Plays a driver's virtio-mmio handshake up to, not including, DRIVER_OK:
/// ACKNOWLEDGE, DRIVER, the features `features` (VERSION_1 is always
/// accepted), FEATURES_OK, then `queues` in index order, each made ready.
pub fn mmio_configure(t: &mut MmioTransport, features: u32, queues: &[&TestQueue]) {
    mmio_write(t, 0x70, 1);
    mmio_write(t, 0x70, 3);
    mmio_write(t, 0x24, 1);
    mmio_write(t, 0x20, 1); // VERSION_1
    mmio_write(t, 0x24, 0);
    mmio_write(t, 0x20, features);
    mmio_write(t, 0x70, 0xb);
    for (i, q) in queues.iter().enumerate() {
        mmio_write(t, 0x30, i as u32);
        mmio_write(t, 0x38, u32::from(q.size));
        mmio_write(t, 0x80, q.desc_table_addr() as u32);
        mmio_write(t, 0x90, q.avail_addr() as u32);
        mmio_write(t, 0xa0, q.used_addr() as u32);
        mmio_write(t, 0x44, 1);
    }
}

/// Plays the whole handshake of [`mmio_configure`], then sets DRIVER_OK.
pub fn mmio_activate(t: &mut MmioTransport, features: u32, queues: &[&TestQueue]) {
    mmio_configure(t, features, queues);
    mmio_write(t, 0x70, 0xf);
}

/// Snapshots `t` (its device's files go to `dir`) and returns what a
/// restore would read: the snapshot written as JSON and read back.
pub fn snapshot_through_json(t: &mut MmioTransport, dir: &Path) -> TransportSnapshot {
    let snap = t.snapshot(dir).unwrap();
    let json = serde_json::to_string(&snap).unwrap();
    let back: TransportSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snap);
    back
}

/// A device registered with its own event loop, as the VMM runs it.
pub struct Looped<D> {
    /// The device, shared with the event loop.
    pub dev: Arc<Mutex<D>>,
    /// The event loop.
    pub em: EventManager<Arc<Mutex<D>>>,
    /// The device's interrupt eventfd (the irqfd in the VMM).
    pub irq: EventFd,
}

impl<D: VirtioDevice + MutEventSubscriber + 'static> Looped<D> {
    /// Builds the device with `make`, which gets the interrupt eventfd, and
    /// registers it with a new event loop.
    pub fn new(make: impl FnOnce(EventFd) -> D) -> Self {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = Arc::new(Mutex::new(make(irq.try_clone().unwrap())));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        Looped { dev, em, irq }
    }

    /// The device.
    pub fn lock(&self) -> MutexGuard<'_, D> {
        self.dev.lock().unwrap()
    }

    /// A virtio-mmio transport named `name` for the device.
    pub fn transport(&self, mem: &GuestMemoryMmap, name: &str) -> MmioTransport {
        let dev: Arc<Mutex<dyn VirtioDevice>> = self.dev.clone();
        MmioTransport::new(mem.clone(), dev, name).unwrap()
    }

    /// Activates as the transport does: hands over guest memory and
    /// `queues` (with EVENT_IDX as given), then kicks every queue eventfd.
    pub fn activate(&self, mem: &GuestMemoryMmap, queues: &[&TestQueue], event_idx: bool) {
        let queues = queues
            .iter()
            .map(|tq| {
                let mut q = tq.queue();
                q.set_event_idx(event_idx);
                q
            })
            .collect();
        let mut dev = self.lock();
        let acked_features = dev.features();
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues,
            acked_features,
        })
        .unwrap();
        for evt in dev.queue_events() {
            evt.write(1).unwrap();
        }
    }

    /// Notifies queue `q` through its eventfd, as the ioeventfd does.
    pub fn kick(&self, q: usize) {
        self.lock().queue_events()[q].write(1).unwrap();
    }

    /// Runs the loop until nothing is ready; fails if that never happens
    /// (the device would be spinning).
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never went idle");
    }
}
