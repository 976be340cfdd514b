//! Builds a VM from a [`VmConfig`] and runs it until the guest powers off,
//! resets, panics or crashes, or the VMM is asked to stop.

use std::fs::File;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use log::{debug, error, info, warn};
use skiff_devices::legacy::{
    AcpiPmPort, Ged, PvPanic, Serial, SerialOutput, ACPI_PM_PORT_LEN, GED_PORT_LEN, I8042,
    PVPANIC_PORT_LEN, SERIAL_PORT_LEN,
};
use skiff_devices::virtio::block::{Block, BlockConfig};
use skiff_devices::virtio::console::{Console, ConsoleBackend};
use skiff_devices::virtio::rng::Rng;
use skiff_devices::{EventFdTrigger, GuestPowerEvent, PowerEventSink};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::acpi::{
    self, ACPI_PM_PORT, GED_IRQ, GED_PORT, PVPANIC_PORT, SERIAL_IRQ, SERIAL_PORT,
};
use crate::boot::{self, BootError};
use crate::bus::Bus;
use crate::config::{ConsoleConfig, MonitorConfig};
use crate::config::{SerialConfig, VmConfig};
use crate::control::server::{self, Protocol, Socket};
use crate::control::{ChardevInfo, DiskInfo, EventHub, MachineInfo, RunControl};
use crate::cpu::coalesced::CoalescedRing;
use crate::cpu::pause::{self, RunMapping, VcpuManager};
use crate::cpu::{self, CpuError};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::event_loop::{self, SerialInput};
use crate::memory::{self, MemoryError, KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::stats::{self, ExitCounts};

/// Most vCPUs a VM may have (APIC ids fit in the MADT's byte fields).
pub const MAX_CPUS: u8 = 254;
const I8042_PORT: u64 = 0x60;
const I8042_PORT_LEN: u64 = 5;

/// Errors that stop a VM from starting.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device cannot be opened.
    #[error("cannot open {path}: {source} (is KVM enabled, kvm_intel or kvm_amd loaded, and the device accessible to this user?)")]
    KvmOpen {
        /// The device.
        path: std::path::PathBuf,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// KVM is too old, not KVM at all, or lacks a capability.
    #[error("{path} is unusable: {detail}")]
    KvmUnusable {
        /// The device.
        path: std::path::PathBuf,
        /// Why.
        detail: String,
    },
    /// A KVM ioctl failed while building the VM.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// errno.
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
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A virtio device's backend (disk image, console socket ...).
    #[error("{0}")]
    Device(String),
    /// Wiring a virtio device into the VM.
    #[error(transparent)]
    DeviceWiring(#[from] DeviceError),
    /// A QMP or monitor socket.
    #[error("cannot set up the monitor socket {path}: {source}")]
    Monitor {
        /// The socket path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Platform wiring (buses, eventfds, threads).
    #[error("cannot set up {what}: {detail}")]
    Setup {
        /// What.
        what: &'static str,
        /// Why.
        detail: String,
    },
}

fn setup_err(what: &'static str) -> impl Fn(std::io::Error) -> VmError {
    move |e| VmError::Setup {
        what,
        detail: e.to_string(),
    }
}

enum VirtioDev {
    Block(Arc<Mutex<Block>>),
    Console(Arc<Mutex<Console>>),
    Rng(Arc<Mutex<Rng>>),
}

/// Opens every virtio device's backend, in guest order: disks (vda, vdb,
/// ...), then the console, then the rng. Done before KVM is touched so that
/// a missing image is reported as such on any machine.
fn create_virtio_devices(config: &VmConfig) -> Result<Vec<(String, VirtioDev)>, VmError> {
    let irq = || EventFd::new(EFD_NONBLOCK).map_err(setup_err("a device interrupt"));
    let mut out = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let name = format!("vd{}", (b'a' + (i % 26) as u8) as char);
        let block = Block::new(
            &BlockConfig {
                path: disk.path.clone(),
                readonly: disk.readonly,
                overlay: disk.overlay,
                id: disk.id.clone(),
            },
            irq()?,
        )
        .map_err(|e| VmError::Device(format!("disk {name}: {e}")))?;
        out.push((name, VirtioDev::Block(Arc::new(Mutex::new(block)))));
    }
    if let Some(console) = &config.console {
        if *console == ConsoleConfig::Stdio && config.serial == SerialConfig::Stdio {
            return Err(VmError::Device(
                "--console stdio and --serial stdio would both read stdin: give one of them file=PATH or none".into(),
            ));
        }
        let backend = match console {
            ConsoleConfig::Stdio => ConsoleBackend::Stdio,
            ConsoleConfig::File(p) => ConsoleBackend::File(p.clone()),
            ConsoleConfig::Socket(p) => ConsoleBackend::Socket(p.clone()),
        };
        let dev =
            Console::new(&backend, irq()?).map_err(|e| VmError::Device(format!("console: {e}")))?;
        out.push((
            "hvc0".to_owned(),
            VirtioDev::Console(Arc::new(Mutex::new(dev))),
        ));
    }
    if config.rng {
        let dev = Rng::new(irq()?).map_err(|e| VmError::Device(format!("rng: {e}")))?;
        out.push(("rng".to_owned(), VirtioDev::Rng(Arc::new(Mutex::new(dev)))));
    }
    Ok(out)
}

/// Opens the QMP and HMP sockets (before the VM starts, so that a bad
/// path is a start-up error).
fn monitor_sockets(config: &VmConfig) -> Result<Vec<(Protocol, Socket)>, VmError> {
    let err = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| VmError::Monitor { path, source }
    };
    let mut out = Vec::new();
    for path in &config.qmp {
        out.push((Protocol::Qmp, server::listen(path).map_err(err(path))?));
    }
    for m in &config.monitor {
        let socket = match m {
            MonitorConfig::Listen(p) => server::listen(p).map_err(err(p))?,
            MonitorConfig::Connect(p) => server::connect(p).map_err(err(p))?,
        };
        out.push((Protocol::Hmp, socket));
    }
    Ok(out)
}

/// What the monitors' queries report about this VM.
fn machine_info(config: &VmConfig) -> MachineInfo {
    let disks = config
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| DiskInfo {
            device: format!("vd{}", (b'a' + (i % 26) as u8) as char),
            path: d.path.display().to_string(),
            readonly: d.readonly,
            overlay: d.overlay,
            size: std::fs::metadata(&d.path).map(|m| m.len()).unwrap_or(0),
        })
        .collect();
    let file = |p: &std::path::Path| format!("file:{}", p.display());
    let mut chardevs = vec![ChardevInfo {
        label: "serial0".into(),
        filename: match &config.serial {
            SerialConfig::Stdio => "stdio".into(),
            SerialConfig::File(p) => file(p),
            SerialConfig::None => "null".into(),
        },
    }];
    if let Some(c) = &config.console {
        chardevs.push(ChardevInfo {
            label: "console0".into(),
            filename: match c {
                ConsoleConfig::Stdio => "stdio".into(),
                ConsoleConfig::File(p) => file(p),
                ConsoleConfig::Socket(p) => format!("unix:{}", p.display()),
            },
        });
    }
    let monitors = config
        .qmp
        .iter()
        .map(|p| format!("unix:{},server=on", p.display()))
        .chain(config.monitor.iter().map(|m| match m {
            MonitorConfig::Listen(p) => format!("unix:{},server=on", p.display()),
            MonitorConfig::Connect(p) => format!("unix:{}", p.display()),
        }));
    for (i, filename) in monitors.enumerate() {
        chardevs.push(ChardevInfo {
            label: format!("compat_monitor{i}"),
            filename,
        });
    }
    MachineInfo {
        name: config.name.clone(),
        cpus: config.cpus,
        disks,
        chardevs,
    }
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset (reboot).
    Reset,
    /// The guest kernel reported a panic.
    Panic,
    /// A vCPU hit something it cannot go on from.
    Crash(String),
    /// The VMM received a termination signal.
    Signal(i32),
    /// A monitor client sent `quit`.
    Quit,
    /// A monitor client sent `system_reset`: skiff-vmm does not reboot
    /// in place, so it ends as on a guest reset.
    HostReset,
}

impl ExitReason {
    /// The process exit status for this reason (documented in `--help`).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::Signal(_) | ExitReason::Quit => 0,
            ExitReason::Reset | ExitReason::HostReset => 3,
            ExitReason::Panic => 4,
            ExitReason::Crash(_) => 5,
        }
    }
}

/// What wakes the main thread.
enum MainEvent {
    /// The VM ends.
    Exit(ExitReason),
    /// The serial port started holding back an unfinished line: write it
    /// out within [`OUTPUT_INTERVAL`] unless the line ends first.
    OutputHeld,
}

impl From<ExitReason> for MainEvent {
    fn from(reason: ExitReason) -> Self {
        MainEvent::Exit(reason)
    }
}

/// A built VM, ready to run.
pub struct Vm {
    config: VmConfig,
    vcpus: Vec<VcpuFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<Serial>>,
    serial_input: Option<Arc<Mutex<SerialInput>>>,
    device_subscribers: Vec<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>>,
    stopping: Arc<AtomicBool>,
    events_tx: Sender<MainEvent>,
    events_rx: std::sync::mpsc::Receiver<MainEvent>,
    /// Set while a flush of held serial output is due (one wake-up of the
    /// main thread per [`OUTPUT_INTERVAL`] at most, none while quiet).
    output_due: Arc<AtomicBool>,
    monitors: Vec<(Protocol, Socket)>,
    info: MachineInfo,
    ged: Arc<Mutex<Ged<EventFdTrigger>>>,
    vcpu_mmap_size: usize,
    vm: Arc<VmFd>,
    // Never unmapped: KVM's memory slots, the device thread and the vCPU
    // threads (which `run` leaves behind for the process exit) all use it.
    _mem: ManuallyDrop<memory::GuestRam>,
}

fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmError> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        VmError::KvmUnusable {
            path: path.to_owned(),
            detail: "the path contains a NUL byte".into(),
        }
    })?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|source| VmError::KvmOpen {
        path: path.to_owned(),
        source,
    })?;
    let unusable = |detail: String| VmError::KvmUnusable {
        path: path.to_owned(),
        detail,
    };
    let version = kvm.get_api_version();
    if version < 0 {
        return Err(unusable(format!(
            "it does not answer KVM_GET_API_VERSION ({}): not a KVM device",
            std::io::Error::last_os_error()
        )));
    }
    if version != KVM_API_VERSION as i32 {
        return Err(unusable(format!(
            "KVM API version {version}, expected {KVM_API_VERSION}"
        )));
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(unusable(format!("{name} is not supported")));
        }
    }
    Ok(kvm)
}

fn serial_output(
    config: &SerialConfig,
    due: Arc<AtomicBool>,
    events: Sender<MainEvent>,
) -> Result<SerialOutput, VmError> {
    let notify = move || {
        if !due.swap(true, Ordering::SeqCst) {
            let _ = events.send(MainEvent::OutputHeld);
        }
    };
    Ok(match config {
        SerialConfig::None => SerialOutput::sink(),
        SerialConfig::Stdio => {
            SerialOutput::writer(Box::new(std::io::stdout())).notify_held(notify)
        }
        SerialConfig::File(path) => {
            let f = File::create(path).map_err(|source| VmError::SerialFile {
                path: path.clone(),
                source,
            })?;
            SerialOutput::writer(Box::new(f)).notify_held(notify)
        }
    })
}

impl Vm {
    /// Builds the VM: KVM objects, memory, platform devices, the loaded
    /// kernel and configured vCPUs. Nothing runs yet.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        if config.cpus == 0 || config.cpus > MAX_CPUS {
            return Err(VmError::Cpus(config.cpus));
        }
        let mem_size = config.memory_mib << 20;
        for (what, path) in [
            ("kernel image", Some(&config.kernel)),
            ("initrd", config.initrd.as_ref()),
        ] {
            if let Some(path) = path {
                File::open(path).map_err(|source| BootError::Read {
                    what,
                    path: path.clone(),
                    source,
                })?;
            }
        }
        let mem = memory::create_guest_memory(config.memory_mib)?;

        // Guest images go in before KVM is touched: bad input is reported
        // the same way on any machine.
        let kernel = boot::load_kernel(&mem, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(path) => Some(boot::load_initrd(&mem, path, &kernel, mem_size)?),
            None => None,
        };
        // Checked now, written again once the devices are known.
        boot::write_cmdline(&mem, &config.cmdline, &kernel)?;
        cpu::write_boot_tables(&mem)?;
        let virtio_devices = create_virtio_devices(&config)?;
        let monitors = monitor_sockets(&config)?;
        let info = machine_info(&config);
        debug!(
            "kernel entry {:#x}, initrd {:?}, {} MiB, {} vCPUs",
            kernel.entry.0, initrd, config.memory_mib, config.cpus
        );

        let kvm = open_kvm(&config.kvm_device)?;
        let kvm_err = |what| move |source| VmError::Kvm { what, source };
        let vcpu_mmap_size = kvm
            .get_vcpu_mmap_size()
            .map_err(kvm_err("KVM_GET_VCPU_MMAP_SIZE"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.set_tss_address(KVM_TSS_START as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmError::Setup {
                    what: "guest memory",
                    detail: e.to_string(),
                })?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // Vm never unmaps (it outlives the VmFd: see `Vm::_mem`; on an
            // error below, the VmFd is dropped first); regions never overlap.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        // Platform devices.
        let (events_tx, events_rx) = channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let sink: PowerEventSink = {
            let tx = events_tx.clone();
            let stopping = stopping.clone();
            Arc::new(move |event| {
                let reason = match event {
                    GuestPowerEvent::PowerOff => ExitReason::PowerOff,
                    GuestPowerEvent::Reset => ExitReason::Reset,
                    GuestPowerEvent::Panic => ExitReason::Panic,
                };
                stopping.store(true, Ordering::SeqCst);
                let _ = tx.send(reason.into());
            })
        };
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(setup_err("the serial IRQ"))?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let output_due = Arc::new(AtomicBool::new(false));
        let serial = Arc::new(Mutex::new(Serial::new(
            EventFdTrigger::new(serial_irq),
            serial_output(&config.serial, output_due.clone(), events_tx.clone())?,
        )));
        let mut pio = Bus::new();
        let bus_err = |e: crate::bus::BusError| VmError::Setup {
            what: "the I/O port bus",
            detail: e.to_string(),
        };
        pio.insert(u64::from(SERIAL_PORT), SERIAL_PORT_LEN, serial.clone())
            .map_err(bus_err)?;
        pio.insert(
            I8042_PORT,
            I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042::new(sink.clone()))),
        )
        .map_err(bus_err)?;
        pio.insert(
            u64::from(ACPI_PM_PORT),
            ACPI_PM_PORT_LEN,
            Arc::new(Mutex::new(AcpiPmPort::new(sink.clone()))),
        )
        .map_err(bus_err)?;
        pio.insert(
            u64::from(PVPANIC_PORT),
            PVPANIC_PORT_LEN,
            Arc::new(Mutex::new(PvPanic::new(sink))),
        )
        .map_err(bus_err)?;
        let ged_irq = EventFd::new(EFD_NONBLOCK).map_err(setup_err("the GED IRQ"))?;
        vm.register_irqfd(&ged_irq, GED_IRQ)
            .map_err(kvm_err("KVM_IRQFD (GED)"))?;
        let ged = Arc::new(Mutex::new(Ged::new(EventFdTrigger::new(ged_irq))));
        pio.insert(u64::from(GED_PORT), GED_PORT_LEN, ged.clone())
            .map_err(bus_err)?;

        let serial_input = if config.serial == SerialConfig::Stdio {
            let stdin = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .map(File::from)
                .map_err(setup_err("serial input"))?;
            Some(Arc::new(Mutex::new(
                SerialInput::new(serial.clone(), stdin).map_err(setup_err("serial input"))?,
            )))
        } else {
            None
        };

        // virtio devices on the MMIO bus.
        let mut mmio = Bus::new();
        let mut devices = DeviceManager::new();
        for (name, dev) in virtio_devices {
            match dev {
                VirtioDev::Block(d) => devices.add_virtio(&vm, &mem, &mut mmio, d, &name),
                VirtioDev::Console(d) => devices.add_virtio(&vm, &mem, &mut mmio, d, &name),
                VirtioDev::Rng(d) => devices.add_virtio(&vm, &mem, &mut mmio, d, &name),
            }?;
        }
        let mut cmdline = config.cmdline.clone();
        let dsdt_devices = if config.virtio_cmdline {
            for entry in devices.cmdline_entries() {
                cmdline.push(' ');
                cmdline.push_str(entry);
            }
            Vec::new()
        } else {
            devices.dsdt().to_vec()
        };
        let cmdline_size = boot::write_cmdline(&mem, &cmdline, &kernel)?;
        boot::write_zero_page(&mem, &kernel, cmdline_size, initrd, mem_size)?;
        acpi::write_tables(&mem, config.cpus, &dsdt_devices)?;

        // vCPUs.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_deadline = vm.check_extension(Cap::TscDeadlineTimer);
        let mut vcpus = Vec::with_capacity(config.cpus.into());
        for index in 0..config.cpus {
            let vcpu = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            cpu::configure_vcpu(
                &vcpu,
                index,
                config.cpus,
                &supported,
                tsc_deadline,
                kernel.entry,
            )?;
            vcpus.push(vcpu);
        }

        Ok(Vm {
            config,
            vcpus,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            device_subscribers: devices.take_subscribers(),
            serial,
            serial_input,
            stopping,
            events_tx,
            events_rx,
            output_due,
            monitors,
            info,
            ged,
            vcpu_mmap_size,
            vm: Arc::new(vm),
            _mem: ManuallyDrop::new(mem),
        })
    }

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

        let signals_tx = self.events_tx.clone();
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
                stopping: self.stopping.clone(),
                events: self.events_tx.clone(),
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
        let exit_tx = Mutex::new(self.events_tx.clone());
        let control = Arc::new(RunControl::new(
            std::mem::take(&mut self.info),
            vcpus,
            events.clone(),
            Box::new(move || {
                if let Err(e) = crate::bus::lock(&ged).press_power_button() {
                    warn!("cannot raise the power button interrupt: {e}");
                }
            }),
            Box::new(move |reason| {
                let _ = crate::bus::lock(&exit_tx).send(reason.into());
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
                .events_rx
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
                        self.output_due.store(false, Ordering::SeqCst);
                    }
                    // One replay serves both: queued writes reach the UART
                    // before its held output is written out.
                    let found = coalesced
                        .as_ref()
                        .map_or(0, |ring| replay(ring, &self.pio, &self.mmio));
                    if flush {
                        let _ = crate::bus::lock(&self.serial).flush();
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
        self.stopping.store(true, Ordering::SeqCst);
        control.exiting(&reason);
        if let Some(server) = server {
            server.finish(MONITOR_FLUSH_TIMEOUT);
        }
        let queued = coalesced.as_ref().map_or(0, |ring| {
            replay(ring, &self.pio, &self.mmio);
            crate::bus::lock(ring).taken()
        });
        info!(
            "vCPU exits to skiff-vmm: {}; serial writes KVM queued without an exit: {queued}",
            exits.summary()
        );
        match stats::thread_times() {
            Ok(times) => info!("CPU time: {}", stats::summary(&times)),
            Err(e) => debug!("cannot read the threads' CPU time: {e}"),
        }
        let _ = crate::bus::lock(&self.serial).flush();
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

/// Replays the writes KVM queued in `ring` to the devices they address,
/// oldest first; returns how many there were.
fn replay(ring: &Mutex<CoalescedRing>, pio: &Bus, mmio: &Bus) -> u64 {
    let mut ring = crate::bus::lock(ring);
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

/// How long monitor clients get to receive their last replies and events
/// when the VM ends.
const MONITOR_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

struct VcpuContext {
    index: usize,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    coalesced: Option<Arc<Mutex<CoalescedRing>>>,
    stopping: Arc<AtomicBool>,
    events: Sender<MainEvent>,
    vcpus: Arc<VcpuManager>,
    exits: Arc<ExitCounts>,
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
    fn run(self, mut vcpu: VcpuFd) {
        self.vcpus.started(self.index);
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
                    let _ = self.events.send(reason.into());
                    break;
                }
                Next::Crash(what) => {
                    let msg = format!(
                        "vCPU {}: {what}; {}",
                        self.index,
                        cpu::describe_registers(&vcpu)
                    );
                    self.stopping.store(true, Ordering::SeqCst);
                    let _ = self.events.send(ExitReason::Crash(msg).into());
                    break;
                }
            }
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            // Parks here while the VM is paused.
            self.vcpus.checkpoint(&mut vcpu);
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
                // Port 0x80 is the POST/delay port: writes are expected.
                if !self.pio.write(u64::from(port), data) && port != 0x80 {
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

/// Logs `reason` the way operators expect to read it.
pub fn log_exit(reason: &ExitReason) {
    match reason {
        ExitReason::PowerOff => info!("guest powered off"),
        ExitReason::Reset => info!("guest requested a reset (reboot); exiting with status 3"),
        ExitReason::Quit => info!("quit requested on a monitor"),
        ExitReason::HostReset => {
            info!("system_reset requested on a monitor; exiting with status 3")
        }
        ExitReason::Panic => error!("guest kernel panicked (pvpanic); exiting with status 4"),
        ExitReason::Crash(msg) => error!("guest crashed: {msg}"),
        ExitReason::Signal(sig) => {
            let name_of = match *sig {
                signal_hook::consts::SIGTERM => "SIGTERM",
                signal_hook::consts::SIGINT => "SIGINT",
                _ => "a signal",
            };
            warn!("stopped by {name_of}")
        }
    }
}
