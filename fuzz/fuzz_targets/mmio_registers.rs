//! Drives the virtio-mmio transport (in front of a virtio-rng device) with
//! arbitrary register reads and writes, over guest memory filled with the
//! input: no sequence may panic.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use skiff_devices::virtio::mmio::MmioTransport;
use skiff_devices::virtio::rng::Rng;
use skiff_devices::BusDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 0x10000;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let _ = mem.write_slice(&data[..data.len().min(MEM_SIZE)], GuestAddress(0));
    let rng = Arc::new(Mutex::new(Rng::new(EventFd::new(EFD_NONBLOCK).unwrap()).unwrap()));
    let mut t = MmioTransport::new(mem, rng, "fuzz").unwrap();
    // Each access: 1 byte kind/size, 2 bytes offset, 4 bytes value.
    for op in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) & 0x1fff);
        let size = [1usize, 2, 4, 8][usize::from(op[0] & 3)];
        let value = [op[3], op[4], op[5], op[6], 0, 0, 0, 0];
        if op[0] & 0x80 != 0 {
            t.write(offset, &value[..size]);
        } else {
            let mut buf = [0u8; 8];
            t.read(offset, &mut buf[..size]);
        }
    }
});
