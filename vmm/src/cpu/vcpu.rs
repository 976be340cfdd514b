//! A vCPU thread's run loop: `KVM_RUN`, the exit taxonomy (port and MMIO
//! accesses to the buses, system events, crashes), and the pause
//! checkpoint of [`super::pause`] between runs. The thread reports how the
//! VM ends to the main thread as an [`ExitReason`] and then parks forever:
//! the process exits under it.
//!
//! Writes KVM queued in the coalesced ring ([`super::coalesced`]) are
//! replayed to their devices before each exit's own access, so devices
//! see the guest's accesses in program order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::debug;

use super::coalesced::CoalescedRing;
use super::pause::VcpuManager;
use crate::bus::Bus;
use crate::exit::ExitReason;
use crate::layout::POST_PORT;
use crate::stats::ExitCounts;
use crate::sync::lock;

/// What a vCPU thread needs besides its `VcpuFd`.
pub(crate) struct VcpuContext {
    pub(crate) index: usize,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) coalesced: Option<Arc<Mutex<CoalescedRing>>>,
    pub(crate) stopping: Arc<AtomicBool>,
    pub(crate) events: Sender<ExitReason>,
    pub(crate) vcpus: Arc<VcpuManager>,
    pub(crate) exits: Arc<ExitCounts>,
}

/// What a vCPU exit asks of the run loop.
enum Next {
    Continue,
    Stop(ExitReason),
    Crash(String),
    /// KVM_EXIT_INTERNAL_ERROR: the details are read from `kvm_run` once
    /// the exit's borrow of the vCPU has ended.
    InternalError,
}

impl VcpuContext {
    /// Runs `vcpu` until the VM ends, then parks the thread for good.
    pub(crate) fn run(self, mut vcpu: VcpuFd) {
        crate::seccomp::enter_or_end(crate::seccomp::ThreadKind::Vcpu);
        self.vcpus.started(self.index);
        // A VM started paused (-S) parks here, before its first entry.
        self.vcpus.checkpoint(self.index, &mut vcpu);
        loop {
            let next = match vcpu.run() {
                Ok(exit) => self.handle_exit(exit),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Continue,
                Err(e) => Next::Crash(format!("KVM_RUN failed: {e}")),
            };
            let next = match next {
                Next::InternalError => Next::Crash(describe_internal_error(&mut vcpu)),
                n => n,
            };
            match next {
                Next::Continue | Next::InternalError => {}
                Next::Stop(reason) => {
                    self.stopping.store(true, Ordering::SeqCst);
                    let _ = self.events.send(reason);
                    break;
                }
                Next::Crash(what) => {
                    let msg = format!(
                        "vCPU {}: {what}; {}",
                        self.index,
                        super::describe_registers(&vcpu)
                    );
                    self.stopping.store(true, Ordering::SeqCst);
                    let _ = self.events.send(ExitReason::Crash(msg));
                    break;
                }
            }
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            // Parks here while the VM is paused.
            self.vcpus.checkpoint(self.index, &mut vcpu);
        }
        self.vcpus.gone();
        // The process exits once the main thread has seen the event; keep
        // this vCPU out of the guest until then.
        loop {
            std::thread::park();
        }
    }

    fn handle_exit(&self, exit: VcpuExit<'_>) -> Next {
        // Writes the guest queued before this exit reach their devices
        // before the exit's own access does.
        if let Some(ring) = &self.coalesced {
            replay(ring, &self.pio, &self.mmio);
        }
        let counter = match &exit {
            VcpuExit::IoIn(..) => &self.exits.port_reads,
            VcpuExit::IoOut(..) => &self.exits.port_writes,
            VcpuExit::MmioRead(..) => &self.exits.mmio_reads,
            VcpuExit::MmioWrite(..) => &self.exits.mmio_writes,
            _ => &self.exits.other,
        };
        ExitCounts::count(counter);
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                Next::Continue
            }
            VcpuExit::IoOut(port, data) => {
                // Writes to the POST/delay port are expected.
                if !self.pio.write(u64::from(port), data) && port != POST_PORT {
                    debug!("vCPU {}: write to unhandled port {port:#x}", self.index);
                }
                Next::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio.read(addr, data) {
                    debug!("vCPU {}: read from unhandled MMIO {addr:#x}", self.index);
                    data.fill(0xff);
                }
                Next::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !self.mmio.write(addr, data) {
                    debug!("vCPU {}: write to unhandled MMIO {addr:#x}", self.index);
                }
                Next::Continue
            }
            VcpuExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(ExitReason::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Next::Stop(ExitReason::Reset),
                KVM_SYSTEM_EVENT_CRASH => Next::Stop(ExitReason::Panic),
                other => Next::Crash(format!("unknown KVM system event {other}")),
            },
            VcpuExit::Shutdown => Next::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into()),
            VcpuExit::InternalError => Next::InternalError,
            VcpuExit::FailEntry(reason, cpu) => Next::Crash(format!(
                "KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})"
            )),
            VcpuExit::Hlt => Next::Crash("halted with the in-kernel LAPIC off (KVM_EXIT_HLT)".into()),
            VcpuExit::Intr => Next::Continue,
            other => Next::Crash(format!("unhandled vCPU exit {other:?}")),
        }
    }
}

fn describe_internal_error(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM
    // fills the `internal` member of the union; it is plain old data.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let data: Vec<String> = internal.data[..n]
        .iter()
        .map(|d| format!("{d:#x}"))
        .collect();
    let what = match internal.suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event failure",
        4 => "unexpected exit reason",
        _ => "unknown",
    };
    format!(
        "KVM internal error {} ({what}), data [{}]",
        internal.suberror,
        data.join(", ")
    )
}

/// Replays the writes KVM queued in `ring` to the devices they address,
/// oldest first; returns how many there were.
pub(crate) fn replay(ring: &Mutex<CoalescedRing>, pio: &Bus, mmio: &Bus) -> u64 {
    let mut ring = lock(ring);
    let before = ring.taken();
    ring.drain(|w| {
        let handled = if w.pio {
            pio.write(w.addr, w.data())
        } else {
            mmio.write(w.addr, w.data())
        };
        if !handled {
            debug!("queued write to unhandled address {:#x}", w.addr);
        }
    });
    ring.taken() - before
}
