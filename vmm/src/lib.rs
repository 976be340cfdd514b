//! skiff-vmm: a KVM microVM monitor that boots a Linux kernel straight into
//! 64-bit mode, with ACPI, an 8250 console and (soon) virtio-mmio devices.

pub mod boot;
pub mod bus;
pub mod config;
pub mod control;
pub mod cpu;
pub mod device_manager;
pub mod event_loop;
pub mod memory;
pub mod stats;
pub mod vm;

pub use config::{SerialConfig, VmConfig};
pub use vm::{ExitReason, Vm, VmError};
