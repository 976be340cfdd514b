//! Drives virtio-net's transmit and receive queues with guest memory and a
//! peer's bytes from the input: descriptor chains of any shape, frames and
//! length prefixes of any size; the card must never panic or loop.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    skiff_devices::virtio::net::fuzz_queues(data);
});
