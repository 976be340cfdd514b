//! KVM's coalesced I/O ring (KVM_CAP_COALESCED_PIO): guest writes to a
//! registered port are queued by KVM in a page it shares with the VMM
//! instead of leaving `KVM_RUN`, and the VMM replays them later.
//!
//! The serial port's transmit register is registered: a Linux guest logging
//! to ttyS0 then leaves `KVM_RUN` once per status read instead of twice per
//! byte (or once per 16 bytes instead of 17 with the FIFO), and a guest's
//! console output is the largest source of exits in a boot.
//!
//! Ordering: the queue is replayed, under its lock, before a vCPU handles
//! any exit, so a device sees the queued writes before any later access of
//! the same vCPU (a status read, a divisor-latch switch). The main thread
//! also replays it periodically and at the end, so a guest that writes and
//! then never touches the port again still has its output delivered.

use std::os::fd::RawFd;
use std::sync::atomic::{fence, Ordering};

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};

/// One queued write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedWrite {
    /// True for a port write, false for MMIO.
    pub pio: bool,
    /// Port or guest-physical address.
    pub addr: u64,
    len: usize,
    data: [u8; 8],
}

impl QueuedWrite {
    /// The bytes written.
    pub fn data(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

/// The ring page, mapped from a vCPU file descriptor (it is one page per
/// VM, whichever vCPU maps it).
pub struct CoalescedRing {
    page: *mut u8,
    page_size: usize,
    /// Whether `page` is our mapping (unmapped on drop).
    mapped: bool,
    /// Writes taken from the ring so far.
    taken: u64,
}

// SAFETY: the page is shared with the kernel, which only appends entries
// and advances `last`; every access from this side goes through `&mut
// self` (callers share the ring behind a Mutex), with volatile accesses and
// fences, so moving or sharing the handle between threads is sound.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above; `&self` methods touch no memory.
unsafe impl Sync for CoalescedRing {}

const ENTRY: usize = std::mem::size_of::<kvm_coalesced_mmio>();
const HEADER: usize = std::mem::size_of::<kvm_coalesced_mmio_ring>();

impl CoalescedRing {
    /// Maps the ring page of the VM that `vcpu_fd` belongs to.
    pub fn map(vcpu_fd: RawFd) -> std::io::Result<Self> {
        // SAFETY: sysconf with a valid name has no side effects.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => return Err(std::io::Error::last_os_error()),
        };
        let offset = libc::off_t::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * page_size as libc::off_t;
        // SAFETY: a fresh shared mapping of a KVM vCPU fd at the offset KVM
        // documents for the ring, checked for failure; no existing memory
        // is affected.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu_fd,
                offset,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(CoalescedRing {
            page: page.cast(),
            page_size,
            mapped: true,
            taken: 0,
        })
    }

    /// A ring over memory the caller owns (tests).
    ///
    /// # Safety
    /// `page` must be valid for reads and writes of `page_size` bytes, at
    /// least 8-byte aligned, for as long as the ring is used.
    #[cfg(test)]
    unsafe fn over(page: *mut u8, page_size: usize) -> Self {
        CoalescedRing {
            page,
            page_size,
            mapped: false,
            taken: 0,
        }
    }

    /// How many entries the ring holds (KVM_COALESCED_MMIO_MAX).
    fn slots(&self) -> u32 {
        ((self.page_size - HEADER) / ENTRY) as u32
    }

    fn first_ptr(&self) -> *mut u32 {
        self.page.cast()
    }

    fn last_ptr(&self) -> *mut u32 {
        // SAFETY: `last` follows `first` inside the page header.
        unsafe { self.page.cast::<u32>().add(1) }
    }

    /// Takes the oldest queued write, if any.
    pub fn pop(&mut self) -> Option<QueuedWrite> {
        let slots = self.slots();
        // SAFETY: both indices lie in the header of the mapped page; the
        // kernel writes `last` concurrently, hence volatile.
        let (first, last) = unsafe {
            (
                std::ptr::read_volatile(self.first_ptr()),
                std::ptr::read_volatile(self.last_ptr()),
            )
        };
        if first == last {
            return None;
        }
        if first >= slots || last >= slots {
            // Only the kernel and this code write the indices; a bad one
            // means the page is not what we think. Drop the queue.
            log::warn!("coalesced I/O ring indices out of range ({first}, {last}); reset");
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile(self.first_ptr(), last.min(slots - 1)) };
            return None;
        }
        // The kernel fills an entry before it publishes it through `last`.
        fence(Ordering::Acquire);
        // SAFETY: `first < slots`, so the entry lies inside the page; it is
        // plain old data that the kernel no longer writes (it is between
        // `first` and `last`).
        let raw: kvm_coalesced_mmio = unsafe {
            std::ptr::read_volatile(
                self.page
                    .add(HEADER + first as usize * ENTRY)
                    .cast::<kvm_coalesced_mmio>(),
            )
        };
        // The entry is copied out before the slot is handed back.
        fence(Ordering::Release);
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(self.first_ptr(), (first + 1) % slots) };
        self.taken += 1;
        let len = (raw.len as usize).min(raw.data.len());
        // SAFETY: `pio` and `pad` are the same u32 in the union.
        let pio = unsafe { raw.__bindgen_anon_1.pio } != 0;
        Some(QueuedWrite {
            pio,
            addr: raw.phys_addr,
            len,
            data: raw.data,
        })
    }

    /// How many writes were taken from the ring so far.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// Replays every queued write through `write`, oldest first.
    pub fn drain(&mut self, mut write: impl FnMut(&QueuedWrite)) {
        while let Some(w) = self.pop() {
            write(&w);
        }
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: `page`/`page_size` are exactly what mmap returned and
            // nothing uses the mapping after this.
            unsafe {
                libc::munmap(self.page.cast(), self.page_size);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    /// A page laid out like KVM's ring, filled from the kernel's side.
    struct FakeKernel {
        page: Vec<u64>,
    }

    impl FakeKernel {
        fn new() -> Self {
            FakeKernel {
                page: vec![0; PAGE / 8],
            }
        }

        fn ring(&mut self) -> CoalescedRing {
            // SAFETY: the Vec outlives the ring in every test and is 8-byte
            // aligned and PAGE bytes long.
            unsafe { CoalescedRing::over(self.page.as_mut_ptr().cast(), PAGE) }
        }

        fn bytes(&mut self) -> *mut u8 {
            self.page.as_mut_ptr().cast()
        }

        fn index(&mut self, which: usize) -> u32 {
            // SAFETY: the header's two u32 lie in the page.
            unsafe { self.bytes().cast::<u32>().add(which).read() }
        }

        fn set_index(&mut self, which: usize, v: u32) {
            // SAFETY: as above.
            unsafe { self.bytes().cast::<u32>().add(which).write(v) }
        }

        /// Appends a write as KVM does: fill the slot at `last`, advance.
        fn push(&mut self, pio: bool, addr: u64, data: &[u8], len: u32) {
            let slots = ((PAGE - HEADER) / ENTRY) as u32;
            let last = self.index(1);
            let mut e = kvm_coalesced_mmio {
                phys_addr: addr,
                len,
                ..Default::default()
            };
            e.__bindgen_anon_1.pio = u32::from(pio);
            e.data[..data.len()].copy_from_slice(data);
            // SAFETY: `last < slots`, so the slot is inside the page.
            unsafe {
                self.bytes()
                    .add(HEADER + last as usize * ENTRY)
                    .cast::<kvm_coalesced_mmio>()
                    .write(e)
            };
            self.set_index(1, (last + 1) % slots);
        }
    }

    #[test]
    fn empty_ring_yields_nothing() {
        let mut k = FakeKernel::new();
        let mut ring = k.ring();
        ring.drain(|_| panic!("nothing was queued"));
        assert_eq!(ring.taken(), 0);
    }

    #[test]
    fn writes_come_back_in_order_with_their_bytes() {
        let mut k = FakeKernel::new();
        for b in b"hello" {
            k.push(true, 0x3f8, &[*b], 1);
        }
        k.push(false, 0xd000_0050, &[1, 2, 3, 4], 4);
        let mut ring = k.ring();
        let mut seen = Vec::new();
        ring.drain(|w| seen.push((w.pio, w.addr, w.data().to_vec())));
        assert_eq!(seen.len(), 6);
        let text: Vec<u8> = seen[..5].iter().map(|(_, _, d)| d[0]).collect();
        assert_eq!(text, b"hello");
        assert!(seen[..5].iter().all(|(pio, a, _)| *pio && *a == 0x3f8));
        assert_eq!(seen[5], (false, 0xd000_0050, vec![1, 2, 3, 4]));
        assert_eq!(ring.pop(), None);
        assert_eq!(ring.taken(), 6);
    }

    #[test]
    fn the_ring_wraps_around() {
        let mut k = FakeKernel::new();
        let slots = ((PAGE - HEADER) / ENTRY) as u32;
        k.set_index(0, slots - 2);
        k.set_index(1, slots - 2);
        for b in 0..5u8 {
            k.push(true, 0x3f8, &[b], 1);
        }
        assert_eq!(k.index(1), 3);
        let mut got = Vec::new();
        k.ring().drain(|w| got.push(w.data()[0]));
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert_eq!(k.index(0), 3);
    }

    #[test]
    fn a_bad_length_is_clamped_to_the_entry() {
        let mut k = FakeKernel::new();
        k.push(true, 0x3f8, &[7; 8], 4096);
        let w = k.ring().pop().unwrap();
        assert_eq!(w.data(), &[7; 8]);
    }

    #[test]
    fn out_of_range_indices_reset_the_ring() {
        let mut k = FakeKernel::new();
        k.set_index(0, 9999);
        k.set_index(1, 3);
        let mut ring = k.ring();
        assert_eq!(ring.pop(), None);
        assert_eq!(ring.pop(), None);
        assert_eq!(k.index(0), 3);
    }
}
