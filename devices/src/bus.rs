//! The interface between a device and the VMM's port-I/O and MMIO buses.

/// A device on a port-I/O or MMIO bus.
///
/// `offset` is relative to the base address the device was registered at.
/// `data` is what the guest accessed (1, 2, 4 or 8 bytes, little endian).
/// Both calls come from vCPU threads; the values are guest-controlled and a
/// device must treat any offset, size or value as possible.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}
