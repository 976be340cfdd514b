//! Parses arbitrary descriptor chains as virtio-blk requests: guest memory
//! and the descriptor table come from the input; parsing must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    skiff_devices::virtio::block::fuzz_parse(data);
});
