//! The errors that stop a VM from starting or running. One type for the
//! builder and the run loop, at the bottom of the crate's layers, so both
//! name it without importing each other.

use crate::boot::{acpi, BootError};
use crate::config::MAX_CPUS;
use crate::cpu::CpuError;
use crate::device_manager::DeviceError;
use crate::memory::MemoryError;
use crate::snapshot::SnapshotError;

/// Errors that stop a VM from starting.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device cannot be opened.
    #[error("cannot open {path}: {source} (is KVM enabled, kvm_intel or kvm_amd loaded, and the device accessible to this user?)")]
    KvmOpen {
        path: std::path::PathBuf,
        source: kvm_ioctls::Error,
    },
    /// KVM is too old, not KVM at all, or lacks a capability.
    #[error("{path} is unusable: {detail}")]
    KvmUnusable {
        path: std::path::PathBuf,
        detail: String,
    },
    /// A KVM ioctl failed while building the VM.
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// Bad vCPU count.
    #[error("--cpus must be between 1 and {MAX_CPUS}, got {0}")]
    Cpus(u8),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// vCPU setup.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// The serial output file.
    #[error("cannot open serial output {path}: {source}")]
    SerialFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A virtio device's backend (disk image, console socket ...).
    #[error("{device}: {source}")]
    Device {
        /// The device as the user knows it ("disk vda", "console").
        device: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Two options that cannot go together.
    #[error("{0}")]
    Conflict(&'static str),
    /// A rule between options ([`crate::config::VmConfig::check`]).
    #[error("{0}")]
    Config(String),
    /// Wiring a virtio device into the VM.
    #[error(transparent)]
    DeviceWiring(#[from] DeviceError),
    /// A QMP or monitor socket.
    #[error("cannot set up the monitor socket {path}: {source}")]
    Monitor {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A snapshot to restore (`--incoming`) is unreadable, invalid or
    /// does not fit this VM.
    #[error("cannot restore the snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The VM generation id could not be made or placed.
    #[error(transparent)]
    VmGenId(#[from] skiff_devices::legacy::VmGenIdError),
    /// Platform wiring (buses, eventfds, threads).
    #[error("cannot set up {what}: {detail}")]
    Setup { what: &'static str, detail: String },
}

/// Maps an I/O error while setting up `what` to [`VmError::Setup`].
pub(crate) fn setup_err(what: &'static str) -> impl Fn(std::io::Error) -> VmError {
    move |e| VmError::Setup {
        what,
        detail: e.to_string(),
    }
}
