//! A built VM and its main loop. [`Vm::new`] (in `builder.rs`) builds it;
//! [`Vm::run`] starts the threads and waits for the VM to end:
//!
//! - `devices`: the event loop (`event_loop.rs`) running every virtio
//!   device's queues and the serial port's input;
//! - `signals`: turns SIGTERM/SIGINT into an exit;
//! - the monitor thread (`control/server.rs`, a tokio runtime of its own);
//! - `vcpuN`: the vCPU run loops (`cpu/vcpu.rs`);
//! - the main thread, here: waits on [`MainChannel`] for the exit, and in
//!   the meantime flushes held serial output and replays writes KVM queued
//!   in the coalesced ring that no exit followed.

use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Cap, IoEventAddress, VcpuFd, VmFd};
use log::{debug, info, warn};
use skiff_devices::legacy::{Ged, Serial};
use skiff_devices::EventFdTrigger;

use crate::bus::Bus;
use crate::config::VmConfig;
use crate::control::server::{self, Protocol, Socket};
use crate::control::{EventHub, MachineInfo, RunControl};
use crate::cpu::coalesced::CoalescedRing;
use crate::cpu::pause::{self, RunMapping, VcpuManager};
use crate::cpu::vcpu::{replay, VcpuContext};
use crate::error::{setup_err, VmError};
use crate::event_loop::{self, SerialInput};
use crate::exit::{ExitReason, MainEvent};
use crate::layout::SERIAL_PORT;
use crate::memory::GuestRam;
use crate::stats::{self, ExitCounts};
use crate::sync::lock;

/// The main thread's inbox, and the flags its senders share.
pub(crate) struct MainChannel {
    tx: Sender<MainEvent>,
    rx: Receiver<MainEvent>,
    /// Set once the VM is ending: vCPUs stop entering the guest.
    pub(crate) stopping: Arc<AtomicBool>,
    /// Set while a flush of held serial output is due (one wake-up of the
    /// main thread per [`OUTPUT_INTERVAL`] at most, none while quiet).
    pub(crate) output_due: Arc<AtomicBool>,
}

impl MainChannel {
    pub(crate) fn new() -> Self {
        let (tx, rx) = channel();
        MainChannel {
            tx,
            rx,
            stopping: Arc::new(AtomicBool::new(false)),
            output_due: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A sender for another thread.
    pub(crate) fn sender(&self) -> Sender<MainEvent> {
        self.tx.clone()
    }
}

/// A built VM, ready to run.
pub struct Vm {
    pub(crate) config: VmConfig,
    pub(crate) vcpus: Vec<VcpuFd>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) serial_input: Option<Arc<Mutex<SerialInput>>>,
    pub(crate) device_subscribers: Vec<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>>,
    pub(crate) main: MainChannel,
    pub(crate) monitors: Vec<(Protocol, Socket)>,
    pub(crate) info: MachineInfo,
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
        let mut subscribers: Vec<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>> =
            Vec::new();
        if let Some(input) = self.serial_input.take() {
            subscribers.push(input);
        }
        subscribers.append(&mut self.device_subscribers);
        event_loop::spawn(subscribers).map_err(setup_err("the device thread"))?;

        let signals_tx = self.main.sender();
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])
        .map_err(setup_err("signal handling"))?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    let _ = signals_tx.send(ExitReason::Signal(sig).into());
                }
            })
            .map_err(setup_err("the signal thread"))?;

        info!(
            "booting {} with {} vCPU(s), {} MiB",
            self.config.kernel.display(),
            self.config.cpus,
            self.config.memory_mib
        );
        pause::install_kick_handler().map_err(setup_err("the vCPU kick signal"))?;
        let coalesced = self.coalesce_serial_output();
        let vcpus = Arc::new(VcpuManager::new(self.vm.clone(), self.vcpus.len()));
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

        let events = EventHub::new();
        let ged = self.ged.clone();
        let exit_tx = Mutex::new(self.main.sender());
        let control = Arc::new(RunControl::new(
            std::mem::take(&mut self.info),
            vcpus,
            events.clone(),
            Box::new(move || {
                if let Err(e) = lock(&ged).press_power_button() {
                    warn!("cannot raise the power button interrupt: {e}");
                }
            }),
            Box::new(move |reason| {
                let _ = lock(&exit_tx).send(reason.into());
            }),
        ));
        let monitors = std::mem::take(&mut self.monitors);
        let server = if monitors.is_empty() {
            None
        } else {
            Some(
                server::start(monitors, control.clone(), events)
                    .map_err(setup_err("the monitor thread"))?,
            )
        };

        let gone = || VmError::Setup {
            what: "the VM event channel",
            detail: "all senders are gone".into(),
        };
        // The main thread wakes only when there is something to do:
        // - held serial output (a prompt) is written out OUTPUT_INTERVAL
        //   after the serial port says it holds some;
        // - writes the guest queued in the coalesced ring and never
        //   followed with another exit (a guest's own exits replay the ring
        //   first) reach their device on a safety-net tick, every
        //   OUTPUT_INTERVAL while it finds writes there, backing off to
        //   QUEUE_CHECK_MAX while it finds none.
        let mut flush_at: Option<Instant> = None;
        let mut check_every = OUTPUT_INTERVAL;
        let mut check_at = Instant::now() + check_every;
        let reason = loop {
            let wake = flush_at.map_or(check_at, |f| f.min(check_at));
            match self
                .main
                .rx
                .recv_timeout(wake.saturating_duration_since(Instant::now()))
            {
                Ok(MainEvent::Exit(reason)) => break reason,
                Ok(MainEvent::OutputHeld) => {
                    flush_at.get_or_insert_with(|| Instant::now() + OUTPUT_INTERVAL);
                }
                Err(RecvTimeoutError::Timeout) => {
                    let now = Instant::now();
                    let flush = flush_at.is_some_and(|f| f <= now);
                    if flush {
                        flush_at = None;
                        // Cleared first: output held from here on asks again.
                        self.main.output_due.store(false, Ordering::SeqCst);
                    }
                    // One replay serves both: queued writes reach the UART
                    // before its held output is written out.
                    let found = coalesced
                        .as_ref()
                        .map_or(0, |ring| replay(ring, &self.pio, &self.mmio));
                    if flush {
                        let _ = lock(&self.serial).flush();
                    }
                    if found > 0 {
                        check_every = OUTPUT_INTERVAL;
                        check_at = now + check_every;
                    } else if check_at <= now {
                        check_every = (check_every * 2).min(QUEUE_CHECK_MAX);
                        check_at = now + check_every;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(gone()),
            }
        };
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

/// How long held serial output waits for the rest of its line, and how
/// often the main thread looks for queued writes while it finds some.
const OUTPUT_INTERVAL: Duration = Duration::from_millis(20);

/// The longest the main thread leaves KVM's coalesced write queue
/// unchecked while the guest is quiet.
const QUEUE_CHECK_MAX: Duration = Duration::from_millis(640);

/// How long monitor clients get to receive their last replies and events
/// when the VM ends.
const MONITOR_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
