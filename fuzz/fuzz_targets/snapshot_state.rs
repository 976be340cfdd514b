//! A snapshot's state file is untrusted input: whatever its bytes, parsing
//! it (header, checksum, JSON payload) returns a snapshot or an error,
//! never a panic or an allocation the header alone asked for. The fuzzer
//! gets a valid header for its bytes half the time, so the payload parser
//! is reached past the checksum, and each device state it holds is
//! restored into a real transport.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use skiff_vmm::snapshot::{parse_state, FORMAT_VERSION, MAGIC};

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz/state");
    let _ = parse_state(path, data);
    if let Some((&first, payload)) = data.split_first() {
        if first & 1 == 1 {
            use sha2::Digest;
            let mut framed = Vec::with_capacity(52 + payload.len());
            framed.extend_from_slice(MAGIC);
            framed.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            framed.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            framed.extend_from_slice(&sha2::Sha256::digest(payload));
            framed.extend_from_slice(payload);
            if let Ok(snapshot) = parse_state(path, &framed) {
                // Whatever parsed must also be checked, and each device
                // state restored into a real transport, without a panic.
                let _ = snapshot.check_fits(&snapshot.machine.clone());
                for t in &snapshot.virtio {
                    let _ = skiff_devices::snapshot::fuzz_restore(&t.state);
                }
            }
        }
    }
});
