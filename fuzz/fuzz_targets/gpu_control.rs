//! Drives virtio-gpu's control and cursor queues with guest memory from the
//! input: descriptor chains of any shape, any command with any rectangle,
//! resource id and backing; the device must never panic, loop, or hold
//! more host memory than its bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    skiff_devices::virtio::gpu::fuzz_control(data);
});
