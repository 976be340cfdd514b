//! skiff-vmm: a KVM microVM monitor that boots a Linux kernel straight into
//! 64-bit mode, with ACPI, an 8250 console, virtio-mmio devices (block,
//! console, rng) and QEMU-compatible monitors (QMP, HMP).
//!
//! Layers, top to bottom (a module imports only from layers below it):
//!
//! - [`vm`] (the main loop) and [`builder`] (the build steps of `Vm::new`);
//! - [`cpu`] (vCPU setup, run loop, pause), [`control`] (run state and the
//!   monitors), [`device_manager`], [`event_loop`], [`boot`], [`snapshot`]
//!   (saving and restoring a whole VM);
//! - [`error`], [`exit`], [`config`], [`layout`], [`memory`], [`bus`],
//!   [`stats`], [`sync`].

pub mod boot;
pub mod builder;
pub mod bus;
pub mod config;
pub mod control;
pub mod cpu;
pub mod device_manager;
pub mod error;
pub mod event_loop;
pub mod exit;
pub mod layout;
pub mod memory;
pub mod seccomp;
pub mod snapshot;
pub mod stats;
pub mod sync;
pub mod vm;

pub use config::{SerialConfig, VmConfig};
pub use error::VmError;
pub use exit::{ExitReason, ExitStatus};
pub use vm::Vm;
