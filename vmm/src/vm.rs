//! A built VM and its main loop. [`Vm::new`] (in `builder.rs`) builds it;
//! [`Vm::run`] starts the threads and waits for the VM to end:
//!
//! - `devices`: the event loop (`event_loop.rs`): every virtio device's
//!   queues, the serial port's input, held serial output and the
//!   coalesced ring's safety net (timerfds), SIGTERM/SIGINT;
//! - `monitors`: the QMP/HMP sockets (`control/server.rs`, on a tokio
//!   runtime of its own, kept apart from the device loop so that a slow
//!   monitor client never delays a device);
//! - `vcpuN`: the vCPU run loops (`cpu/vcpu.rs`);
//! - the main thread, here: waits on [`MainChannel`] for the VM's end,
//!   then shuts down.

use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Cap, IoEventAddress, VcpuFd, VmFd};
use log::{debug, info, warn};
use skiff_devices::legacy::{Ged, Serial};
use skiff_devices::EventFdTrigger;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::Bus;
use crate::config::VmConfig;
use crate::control::server::{self, Protocol, Socket};
use crate::control::{EventHub, MachineInfo, NetLink, RunControl, Snapshotter};
use crate::cpu::coalesced::CoalescedRing;
use crate::cpu::pause::{self, RunMapping, VcpuManager};
use crate::cpu::vcpu::{replay, VcpuContext};
use crate::device_manager::NamedTransport as Transport;
use crate::error::{setup_err, VmError};
use crate::event_loop::{
    self, LoopPause, LoopPauseHandle, PendingOutput, SerialInput, SignalSource,
};
use crate::exit::ExitReason;
use crate::layout::SERIAL_PORT;
use crate::memory::GuestRam;
use crate::seccomp;
use crate::snapshot::{
    self, HostCpu, MachineShape, NamedTransport, SnapshotError, VmSnapshot, VmState,
};
use crate::stats::{self, ExitCounts};
use crate::sync::lock;

/// How the VM's end reaches the main thread, and the flags the threads
/// share about it.
pub(crate) struct MainChannel {
    tx: Sender<ExitReason>,
    rx: Receiver<ExitReason>,
    /// Set once the VM is ending: vCPUs stop entering the guest.
    pub(crate) stopping: Arc<AtomicBool>,
    /// Set while a flush of held serial output is due (so a vCPU thread
    /// writes `output_held` once per flush, not once per byte).
    pub(crate) output_due: Arc<AtomicBool>,
    /// Written when the serial port starts holding output back; the event
    /// loop's [`PendingOutput`] flushes it soon after.
    pub(crate) output_held: EventFd,
}

impl MainChannel {
    pub(crate) fn new() -> std::io::Result<Self> {
        let (tx, rx) = channel();
        Ok(MainChannel {
            tx,
            rx,
            stopping: Arc::new(AtomicBool::new(false)),
            output_due: Arc::new(AtomicBool::new(false)),
            output_held: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// A sender for another thread.
    pub(crate) fn sender(&self) -> Sender<ExitReason> {
        self.tx.clone()
    }
}

/// A built VM, ready to run.
pub struct Vm {
    pub(crate) config: VmConfig,
    /// The VM was restored from a snapshot (`--incoming`): its queues are
    /// kicked before the vCPUs run.
    pub(crate) restored: bool,
    /// The virtio transports, for `migrate`.
    pub(crate) transports: Vec<Transport>,
    /// The MSRs a snapshot saves on this host.
    pub(crate) msrs_to_save: Vec<u32>,
    pub(crate) vcpus: Vec<VcpuFd>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) serial_input: Option<Arc<Mutex<SerialInput>>>,
    pub(crate) device_subscribers: Vec<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>>,
    pub(crate) main: MainChannel,
    pub(crate) monitors: Vec<(Protocol, Socket)>,
    pub(crate) info: MachineInfo,
    /// The network cards, for the monitors' `set_link`.
    pub(crate) links: Vec<NetLink>,
    /// The screen and input devices, for the monitors.
    pub(crate) display: Option<crate::control::display::Display>,
    pub(crate) ged: Arc<Mutex<Ged<EventFdTrigger>>>,
    pub(crate) vcpu_mmap_size: usize,
    pub(crate) vm: Arc<VmFd>,
    // Never unmapped: KVM's memory slots, the device thread and the vCPU
    // threads (which `run` leaves behind for the process exit) all use it.
    pub(crate) _mem: ManuallyDrop<GuestRam>,
}

impl Vm {
    /// Has KVM queue the guest's writes to the serial transmit register
    /// instead of leaving KVM_RUN for each (see [`CoalescedRing`]); None
    /// where KVM cannot, and every write then exits as usual.
    fn coalesce_serial_output(&self) -> Option<Arc<Mutex<CoalescedRing>>> {
        if !self.vm.check_extension(Cap::CoalescedPio) {
            debug!("KVM has no KVM_CAP_COALESCED_PIO: every serial write exits");
            return None;
        }
        let ring = match CoalescedRing::map(self.vcpus.first()?.as_raw_fd()) {
            Ok(ring) => ring,
            Err(e) => {
                debug!("cannot map KVM's coalesced I/O ring ({e}): every serial write exits");
                return None;
            }
        };
        // Only the transmit register (the divisor latch's low byte while
        // DLAB is set): the guest reads no state back from a write there.
        let thr = IoEventAddress::Pio(u64::from(SERIAL_PORT));
        if let Err(e) = self.vm.register_coalesced_mmio(thr, 1) {
            debug!("KVM_REGISTER_COALESCED_MMIO for the serial port: {e}");
            return None;
        }
        Some(Arc::new(Mutex::new(ring)))
    }

    /// Runs the VM until it stops; returns why. The vCPU threads are left
    /// parked or running: the caller is expected to exit the process.
    pub fn run(mut self) -> Result<ExitReason, VmError> {
        match &self.config.incoming {
            Some(dir) => info!(
                "restored from {} with {} vCPU(s), {} MiB",
                dir.display(),
                self.config.cpus,
                self.config.memory_mib
            ),
            None => info!(
                "booting {} with {} vCPU(s), {} MiB",
                self.config.kernel.display(),
                self.config.cpus,
                self.config.memory_mib
            ),
        }
        pause::install_kick_handler().map_err(setup_err("the vCPU kick signal"))?;
        seccomp::init(self.config.seccomp, &self.config.name).map_err(|e| VmError::Setup {
            what: "the seccomp filters",
            detail: e.to_string(),
        })?;
        let coalesced = self.coalesce_serial_output();

        let mut subscribers: Vec<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>> =
            Vec::new();
        if let Some(input) = self.serial_input.take() {
            subscribers.push(input);
        }
        let held = self
            .main
            .output_held
            .try_clone()
            .map_err(setup_err("the serial output eventfd"))?;
        subscribers.push(Arc::new(Mutex::new(
            PendingOutput::new(
                self.serial.clone(),
                coalesced.clone(),
                self.pio.clone(),
                self.mmio.clone(),
                held,
                self.main.output_due.clone(),
            )
            .map_err(setup_err("the serial output timers"))?,
        )));
        subscribers.push(Arc::new(Mutex::new(
            SignalSource::new(self.main.sender()).map_err(setup_err("signal handling"))?,
        )));
        let (loop_pause, loop_handle) =
            LoopPause::new().map_err(setup_err("the device thread's pause event"))?;
        subscribers.push(Arc::new(Mutex::new(loop_pause)));
        subscribers.append(&mut self.device_subscribers);
        event_loop::spawn(subscribers).map_err(setup_err("the device thread"))?;
        let vcpus = Arc::new(VcpuManager::new(self.vm.clone(), self.vcpus.len()));
        if self.config.paused {
            vcpus.start_paused();
        }
        if self.restored {
            // Anything the guest made available while it was saved, and
            // interrupts it had not yet taken.
            for (_, transport) in &self.transports {
                lock(transport).kick();
            }
        }
        let exits = Arc::new(ExitCounts::default());
        for (index, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let run = RunMapping::new(vcpu.as_raw_fd(), self.vcpu_mmap_size)
                .map_err(setup_err("a vCPU's kvm_run mapping"))?;
            let ctx = VcpuContext {
                index,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                coalesced: coalesced.clone(),
                stopping: self.main.stopping.clone(),
                events: self.main.sender(),
                vcpus: vcpus.clone(),
                exits: exits.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || ctx.run(vcpu))
                .map_err(setup_err("a vCPU thread"))?;
            vcpus.register(handle.as_pthread_t(), run);
        }

        let snapshotter = self.snapshotter(vcpus.clone(), loop_handle);
        let events = EventHub::new();
        let ged = self.ged.clone();
        let exit_tx = Mutex::new(self.main.sender());
        let mut control = RunControl::new(
            std::mem::take(&mut self.info),
            vcpus,
            events.clone(),
            Box::new(move || {
                if let Err(e) = lock(&ged).press_power_button() {
                    warn!("cannot raise the power button interrupt: {e}");
                }
            }),
            Box::new(move |reason| {
                let _ = lock(&exit_tx).send(reason);
            }),
        )
        .with_links(std::mem::take(&mut self.links))
        .with_display(self.display.take().unwrap_or_default())
        .with_snapshotter(snapshotter);
        if self.config.paused {
            control = control.starting_paused();
        }
        let control = Arc::new(control);
        let monitors = std::mem::take(&mut self.monitors);
        let server = if monitors.is_empty() {
            None
        } else {
            Some(
                server::start(monitors, control.clone(), events)
                    .map_err(setup_err("the monitor thread"))?,
            )
        };

        // Everything else happens on other threads; this one waits for the
        // end, confined last.
        seccomp::enter_or_end(seccomp::ThreadKind::Main);
        let reason = self.main.rx.recv().map_err(|_| VmError::Setup {
            what: "the VM event channel",
            detail: "all senders are gone".into(),
        })?;
        self.main.stopping.store(true, Ordering::SeqCst);
        control.exiting(&reason);
        if let Some(server) = server {
            server.finish(MONITOR_FLUSH_TIMEOUT);
        }
        let queued = coalesced.as_ref().map_or(0, |ring| {
            replay(ring, &self.pio, &self.mmio);
            lock(ring).taken()
        });
        info!(
            "vCPU exits to skiff-vmm: {}; serial writes KVM queued without an exit: {queued}",
            exits.summary()
        );
        match stats::thread_times() {
            Ok(times) => info!("CPU time: {}", stats::summary(&times)),
            Err(e) => debug!("cannot read the threads' CPU time: {e}"),
        }
        let _ = lock(&self.serial).flush();
        let _ = std::io::stdout().flush();
        Ok(reason)
    }
}

impl Vm {
    /// What `migrate file:DIR` runs once the vCPUs are paused: saves the
    /// devices first (a device's quiescing may raise an interrupt, which
    /// must be in the saved irqchip state), then the VM's and each vCPU's
    /// KVM state, then guest memory, and the state file last, so a
    /// directory with a state file holds a whole snapshot.
    fn snapshotter(&self, vcpus: Arc<VcpuManager>, devices: LoopPauseHandle) -> Snapshotter {
        let transports = self.transports.clone();
        let serial = self.serial.clone();
        let ged = self.ged.clone();
        let vm = self.vm.clone();
        let mem: GuestMemoryMmap = (*self._mem).clone();
        let msrs = self.msrs_to_save.clone();
        let machine = MachineShape {
            memory_mib: self.config.memory_mib,
            cpus: self.config.cpus,
            devices: transports.iter().map(|(name, _)| name.clone()).collect(),
        };
        Box::new(move |dir: &Path| {
            let save = || -> Result<String, SnapshotError> {
                std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Io {
                    what: "cannot create the snapshot directory",
                    path: dir.to_owned(),
                    source,
                })?;
                // From the first device's state to the last byte of guest
                // memory, no device may run.
                let _hold = devices.hold().map_err(SnapshotError::Invalid)?;
                let mut virtio = Vec::with_capacity(transports.len());
                for (name, transport) in &transports {
                    let state =
                        lock(transport)
                            .snapshot(dir)
                            .map_err(|source| SnapshotError::Device {
                                device: name.clone(),
                                source,
                            })?;
                    virtio.push(NamedTransport {
                        name: name.clone(),
                        state,
                    });
                }
                let serial = lock(&serial).snapshot();
                let ged = lock(&ged).snapshot();
                let mut vm_state = VmState::save(&vm)?;
                // The clock stood still from the pause on, as a resume
                // would have it.
                if let Some(clock) = vcpus.paused_clock() {
                    vm_state.clock.clock = clock;
                }
                let vcpu_states = vcpus.save_vcpus(msrs.clone())?;
                let written = snapshot::write_memory(dir, &mem)?;
                snapshot::write_state(
                    dir,
                    &VmSnapshot {
                        machine: machine.clone(),
                        host: HostCpu::current(),
                        memory_regions: snapshot::memory_regions(&mem),
                        vm: vm_state,
                        vcpus: vcpu_states,
                        serial,
                        ged,
                        virtio,
                    },
                )?;
                Ok(format!(
                    "{} MiB of memory ({} MiB not zero), {} vCPU(s), {} virtio device(s)",
                    machine.memory_mib,
                    written >> 20,
                    machine.cpus,
                    machine.devices.len()
                ))
            };
            save().map_err(|e| e.to_string())
        })
    }
}

/// How long monitor clients get to receive their last replies and events
/// when the VM ends.
const MONITOR_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
