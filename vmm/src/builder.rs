//! Builds a VM from a [`VmConfig`] in named steps, as a recipe:
//!
//! 1. open everything the user named, before KVM is touched, so that bad
//!    input is reported the same way on any machine: guest memory, the
//!    kernel, initrd and command line ([`load_guest_images`]), the virtio
//!    devices' backends ([`create_virtio_devices`]) and the monitor
//!    sockets ([`monitor_sockets`]);
//! 2. [`create_vm`]: the KVM VM with its irqchip and PIT;
//! 3. [`register_memory`]: guest RAM as KVM memory slots;
//! 4. [`attach_legacy_devices`]: serial, i8042, ACPI PM, pvpanic, GED;
//! 5. [`attach_virtio_devices`]: the virtio-mmio transports;
//! 6. [`write_boot_data`]: command line, zero page and ACPI tables, which
//!    describe the devices of steps 4 and 5, and the VM generation id;
//! 7. [`create_vcpus`]: configured for a 64-bit Linux entry.
//!
//! A restore (`--incoming file:DIR`) follows the same recipe with the
//! snapshot in place of the kernel: step 1 reads and checks the snapshot
//! and maps its memory file as guest RAM instead of loading images;
//! step 6 is skipped (the boot data is in the restored memory); step 7
//! creates the vCPUs bare, and [`restore_state`] then puts the saved
//! device, VM and vCPU state in, devices first; last, [`new_generation`]
//! gives the restored guest a new VM generation id, so no two VMs
//! restored from one snapshot share their random numbers.
//!
//! Nothing runs until [`Vm::run`].

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use log::debug;
use skiff_devices::legacy::{SerialOutput, VmGenId, GED_EVENT_VMGENID};
use skiff_devices::virtio::block::Block;
use skiff_devices::virtio::console::{Console, ConsoleBackend};
use skiff_devices::virtio::gpu::Gpu;
use skiff_devices::virtio::input::Input;
use skiff_devices::virtio::net::{Net, NetConfig};
use skiff_devices::virtio::rng::Rng;
use skiff_devices::{GuestPowerEvent, PowerEventSink};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::{self, acpi, BootError, LoadedInitrd, LoadedKernel};
use crate::bus::Bus;
use crate::config::MAX_CPUS;
use crate::config::{net_id, MonitorConfig, SerialConfig, VmConfig};
use crate::control::display::Display;
use crate::control::server::{self, Protocol, Socket};
use crate::control::{link_names, ChardevInfo, DiskInfo, MachineInfo, NetLink};
use crate::cpu;
use crate::device_manager::{self, DeviceManager, LegacyDevices, VirtioHandle};
use crate::error::{setup_err, VmError};
use crate::event_loop::SerialInput;
use crate::exit::ExitReason;
use crate::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::memory::{self, GuestRam, VMGENID_START};
use crate::snapshot::{self, MachineShape, VmSnapshot};
use crate::sync::lock;
use crate::vm::{MainChannel, Vm};

/// The kernel and initrd as loaded into guest memory.
struct GuestImages {
    kernel: LoadedKernel,
    initrd: Option<LoadedInitrd>,
}

/// The virtio devices wired into the VM, and what the boot data says of
/// them.
struct VirtioDevices {
    mmio: Bus,
    manager: DeviceManager,
}

impl Vm {
    /// Builds the VM: KVM objects, memory, platform devices, the loaded
    /// kernel and configured vCPUs. Nothing runs yet.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        if config.cpus == 0 || config.cpus > MAX_CPUS {
            return Err(VmError::Cpus(config.cpus));
        }
        // 1. Everything the user named, before KVM is touched.
        let opened = create_virtio_devices(&config)?;
        let (mem, source) = match &config.incoming {
            None => {
                let mem = memory::create_guest_memory(config.memory_mib)?;
                let images = load_guest_images(&mem, &config)?;
                debug!(
                    "kernel entry {:#x}, initrd {:?}, {} MiB, {} vCPUs",
                    images.kernel.entry.0, images.initrd, config.memory_mib, config.cpus
                );
                (mem, Source::Boot(images))
            }
            Some(dir) => {
                let (mem, snapshot) = open_snapshot(dir, &config, &opened.virtio)?;
                (mem, Source::Snapshot(dir.clone(), Box::new(snapshot)))
            }
        };
        let monitors = monitor_sockets(&config)?;
        let info = machine_info(&config, opened.disks);
        let virtio = opened.virtio;

        let kvm = open_kvm(&config.kvm_device)?;
        let vm = create_vm(&kvm)?;
        register_memory(&vm, &mem)?;
        let main = MainChannel::new().map_err(setup_err("the main thread's channel"))?;
        let legacy = attach_legacy_devices(&vm, &config, &main)?;
        let virtio = attach_virtio_devices(&vm, &mem, virtio)?;
        let vcpus = match &source {
            Source::Boot(images) => {
                write_boot_data(&mem, &config, images, &virtio.manager)?;
                create_vcpus(&kvm, &vm, config.cpus, Some(&images.kernel))?
            }
            Source::Snapshot(dir, snapshot) => {
                let vcpus = create_vcpus(&kvm, &vm, config.cpus, None)?;
                restore_state(dir, snapshot, &vm, &vcpus, &legacy, &virtio.manager)?;
                new_generation(&mem, &legacy)?;
                vcpus
            }
        };
        let msrs_to_save = snapshot::vcpu::msrs_to_save(&kvm)?;
        let vcpu_mmap_size = kvm
            .get_vcpu_mmap_size()
            .map_err(kvm_err("KVM_GET_VCPU_MMAP_SIZE"))?;

        let serial_input = if config.serial == SerialConfig::Stdio {
            let stdin = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .map(File::from)
                .map_err(setup_err("serial input"))?;
            Some(Arc::new(Mutex::new(
                SerialInput::new(legacy.serial.clone(), stdin)
                    .map_err(setup_err("serial input"))?,
            )))
        } else {
            None
        };
        let mut manager = virtio.manager;
        Ok(Vm {
            restored: matches!(source, Source::Snapshot(..)),
            transports: manager.transports().to_vec(),
            msrs_to_save,
            config,
            vcpus,
            pio: Arc::new(legacy.pio),
            mmio: Arc::new(virtio.mmio),
            device_subscribers: manager.take_subscribers(),
            serial: legacy.serial,
            serial_input,
            main,
            monitors,
            info,
            links: opened.links,
            display: Some(opened.display),
            ged: legacy.ged,
            vcpu_mmap_size,
            vm: Arc::new(vm),
            _mem: std::mem::ManuallyDrop::new(mem),
        })
    }
}

/// Where the guest's first state comes from.
enum Source {
    /// A kernel boot.
    Boot(GuestImages),
    /// A snapshot directory and what its state file holds.
    Snapshot(std::path::PathBuf, Box<VmSnapshot>),
}

/// Step 1 of a restore: reads and checks the snapshot in `dir` against
/// this VM's shape (memory, vCPUs, the virtio devices just opened) and
/// maps its memory file as guest RAM.
fn open_snapshot(
    dir: &std::path::Path,
    config: &VmConfig,
    devices: &[VirtioHandle],
) -> Result<(GuestRam, VmSnapshot), VmError> {
    let snapshot = snapshot::read_state(dir)?;
    snapshot.check_fits(&MachineShape {
        memory_mib: config.memory_mib,
        cpus: config.cpus,
        devices: devices.iter().map(|d| d.name().to_owned()).collect(),
    })?;
    let expected: Vec<(u64, u64)> = memory::ram_ranges(config.memory_mib << 20)
        .iter()
        .map(|&(start, len)| (start.0, len as u64))
        .collect();
    if snapshot.memory_regions != expected {
        return Err(snapshot::SnapshotError::Invalid(format!(
            "memory regions {:?}, a {} MiB VM has {expected:?}",
            snapshot.memory_regions, config.memory_mib
        ))
        .into());
    }
    let total = expected.iter().map(|r| r.1).sum();
    let file = snapshot::open_memory(dir, total)?;
    let mem =
        memory::create_guest_memory_from_file(config.memory_mib, &file, config.incoming_memory)?;
    Ok((mem, snapshot))
}

/// The last step of a restore: the saved state of the devices (first:
/// restoring a device may raise its interrupt, which the saved irqchip
/// state then overrides as it stood), the VM (PIT, clock, irqchips) and
/// each vCPU, into the freshly built VM.
fn restore_state(
    dir: &std::path::Path,
    snapshot: &VmSnapshot,
    vm: &VmFd,
    vcpus: &[VcpuFd],
    legacy: &LegacyDevices,
    virtio: &DeviceManager,
) -> Result<(), VmError> {
    let device_err = |device: &str| {
        let device = device.to_owned();
        move |source| snapshot::SnapshotError::Device { device, source }
    };
    for ((name, transport), saved) in virtio.transports().iter().zip(&snapshot.virtio) {
        lock(transport)
            .restore(&saved.state, dir)
            .map_err(device_err(name))?;
    }
    lock(&legacy.serial)
        .restore(&snapshot.serial)
        .map_err(device_err("the serial port"))?;
    lock(&legacy.ged)
        .restore(&snapshot.ged)
        .map_err(device_err("the GED"))?;
    snapshot.vm.restore(vm)?;
    for (index, (vcpu, state)) in vcpus.iter().zip(&snapshot.vcpus).enumerate() {
        snapshot::vcpu::restore(vcpu, index, state)?;
    }
    Ok(())
}

/// After a restore: a new VM generation id in guest memory, announced
/// through the GED once the restored interrupt controller is in place
/// (the guest takes the interrupt when its vCPUs run).
fn new_generation(mem: &GuestRam, legacy: &LegacyDevices) -> Result<(), VmError> {
    VmGenId::new(GuestAddress(VMGENID_START))?.write_to(&**mem)?;
    lock(&legacy.ged)
        .notify(GED_EVENT_VMGENID)
        .map_err(setup_err("the GED's interrupt for the new generation id"))?;
    debug!("new VM generation id; the guest is notified through the GED");
    Ok(())
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Step 1: loads the kernel and initrd and checks the command line (it is
/// written again in step 6, once the devices are known), and writes the
/// boot GDT and page tables.
fn load_guest_images(mem: &GuestRam, config: &VmConfig) -> Result<GuestImages, VmError> {
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
    let kernel = boot::load_kernel(mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(
            mem,
            path,
            &kernel,
            config.memory_mib << 20,
        )?),
        None => None,
    };
    boot::write_cmdline(mem, &config.cmdline, &kernel)?;
    cpu::write_boot_tables(mem)?;
    Ok(GuestImages { kernel, initrd })
}

/// The guest's name for the `index`th disk: vda, vdb, ...
pub fn disk_name(index: usize) -> String {
    format!("vd{}", (b'a' + (index % 26) as u8) as char)
}

/// Maps a device backend's error to [`VmError::Device`] for `device`.
fn device_err<E>(device: impl Into<String>) -> impl FnOnce(E) -> VmError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let device = device.into();
    move |e| VmError::Device {
        device,
        source: Box::new(e),
    }
}

/// What step 1 opened: the virtio devices in guest order, what the
/// monitors report of the disks, the network cards they switch, and the
/// screen and input devices they drive.
struct OpenedDevices {
    virtio: Vec<VirtioHandle>,
    disks: Vec<DiskInfo>,
    links: Vec<NetLink>,
    display: Display,
}

/// Step 1: opens every virtio device's backend, in guest order: disks
/// (vda, vdb, ...), then the network cards, the console, the rng, the
/// GPU, the input devices.
fn create_virtio_devices(config: &VmConfig) -> Result<OpenedDevices, VmError> {
    let irq = || EventFd::new(EFD_NONBLOCK).map_err(setup_err("a device interrupt"));
    let mut out = Vec::new();
    let mut disks = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let name = disk_name(i);
        let block = Block::new(disk, irq()?).map_err(device_err(format!("disk {name}")))?;
        disks.push(DiskInfo {
            device: name.clone(),
            path: disk.path.display().to_string(),
            readonly: disk.readonly,
            overlay: disk.overlay,
            size: block.capacity_sectors() * 512,
        });
        out.push(VirtioHandle::new(name, block));
    }
    config.check().map_err(VmError::Config)?;
    let mut links = Vec::new();
    for (i, net) in config.nets.iter().enumerate() {
        let id = net_id(&config.nets, i);
        let card = Net::new(
            &NetConfig {
                id: Some(id.clone()),
                ..net.clone()
            },
            irq()?,
        )
        .map_err(device_err(format!("network card {id}")))?;
        let card = Arc::new(Mutex::new(card));
        let handle = card.clone();
        links.push(NetLink {
            names: link_names(i, &id),
            set: Box::new(move |up| lock(&handle).set_link(up)),
        });
        out.push(VirtioHandle::shared(id, card));
    }
    if let Some(console) = &config.console {
        if *console == ConsoleBackend::Stdio && config.serial == SerialConfig::Stdio {
            return Err(VmError::Conflict(
                "--console stdio and --serial stdio would both read stdin: give one of them file=PATH or none",
            ));
        }
        let dev = Console::new(console, irq()?).map_err(device_err("console"))?;
        out.push(VirtioHandle::new("hvc0", dev));
    }
    if config.rng {
        let dev = Rng::new(irq()?).map_err(device_err("rng"))?;
        out.push(VirtioHandle::new("rng", dev));
    }
    let mut display = Display::default();
    if let Some(mode) = config.gpu {
        let gpu = Arc::new(Mutex::new(
            Gpu::new(mode, irq()?).map_err(device_err("gpu"))?,
        ));
        let screen = gpu.clone();
        display = display.with_screen(
            Box::new(move || lock(&screen).screenshot()),
            (mode.width, mode.height),
        );
        out.push(VirtioHandle::shared("gpu", gpu));
    }
    for &kind in &config.inputs {
        let name = crate::config::input_arg(kind);
        let dev = Input::new(kind, irq()?).map_err(device_err(name))?;
        display = display.with_input(dev.sender());
        out.push(VirtioHandle::new(name, dev));
    }
    Ok(OpenedDevices {
        virtio: out,
        disks,
        links,
        display,
    })
}

/// Step 1: opens the QMP and HMP sockets (before the VM starts, so that a
/// bad path is a start-up error).
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
fn machine_info(config: &VmConfig, disks: Vec<DiskInfo>) -> MachineInfo {
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
                ConsoleBackend::Stdio => "stdio".into(),
                ConsoleBackend::File(p) => file(p),
                ConsoleBackend::Socket(p) => format!("unix:{}", p.display()),
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

/// Opens the KVM device and checks that it is a KVM this VMM can use.
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

/// Step 2: the VM, with KVM's real-mode helpers placed in the MMIO gap,
/// the in-kernel irqchip (PIC, IOAPIC, LAPICs) and the PIT.
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.set_tss_address(KVM_TSS_START as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// Step 3: each region of guest RAM becomes a KVM memory slot.
fn register_memory(vm: &VmFd, mem: &GuestRam) -> Result<(), VmError> {
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
        // error in a later step, the VmFd is dropped first, as `Vm::new`
        // declares `mem` before it); regions never overlap.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Step 4: the legacy devices. The guest's power requests end the VM
/// through the main thread's channel.
fn attach_legacy_devices(
    vm: &VmFd,
    config: &VmConfig,
    main: &MainChannel,
) -> Result<LegacyDevices, VmError> {
    let power: PowerEventSink = {
        let tx = main.sender();
        let stopping = main.stopping.clone();
        Arc::new(move |event| {
            let reason = match event {
                GuestPowerEvent::PowerOff => ExitReason::PowerOff,
                GuestPowerEvent::Reset => ExitReason::Reset,
                GuestPowerEvent::Panic => ExitReason::Panic,
            };
            stopping.store(true, Ordering::SeqCst);
            let _ = tx.send(reason);
        })
    };
    let held = main
        .output_held
        .try_clone()
        .map_err(setup_err("the serial output eventfd"))?;
    let output = serial_output(&config.serial, main.output_due.clone(), held)?;
    Ok(device_manager::attach_legacy(vm, output, power)?)
}

/// Where the serial port's output goes. Output it holds back (an
/// unfinished line) makes it ask, once, for a flush: it sets `due` and
/// writes `held`, which the event loop's `PendingOutput` watches.
fn serial_output(
    config: &SerialConfig,
    due: Arc<AtomicBool>,
    held: EventFd,
) -> Result<SerialOutput, VmError> {
    let notify = move || {
        if !due.swap(true, Ordering::SeqCst) {
            let _ = held.write(1);
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

/// Step 5: the virtio devices, each on its window of the MMIO bus.
fn attach_virtio_devices(
    vm: &VmFd,
    mem: &GuestRam,
    devices: Vec<VirtioHandle>,
) -> Result<VirtioDevices, VmError> {
    let mut mmio = Bus::new();
    let mut manager = DeviceManager::new();
    for handle in devices {
        manager.add_virtio(vm, mem, &mut mmio, handle)?;
    }
    Ok(VirtioDevices { mmio, manager })
}

/// Step 6: the final command line (with `virtio_mmio.device=` entries when
/// asked for instead of DSDT objects), the zero page and the ACPI tables.
fn write_boot_data(
    mem: &GuestRam,
    config: &VmConfig,
    images: &GuestImages,
    devices: &DeviceManager,
) -> Result<(), VmError> {
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
    let cmdline_size = boot::write_cmdline(mem, &cmdline, &images.kernel)?;
    boot::write_zero_page(
        mem,
        &images.kernel,
        cmdline_size,
        images.initrd,
        config.memory_mib << 20,
    )?;
    acpi::write_tables(mem, config.cpus, &dsdt_devices)?;
    VmGenId::new(GuestAddress(VMGENID_START))?.write_to(&**mem)?;
    Ok(())
}

/// Step 7: the vCPUs, each with its CPUID, MSRs, registers and LAPIC set
/// for the kernel's 64-bit entry point; bare (for a restore) without a
/// kernel.
fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    count: u8,
    kernel: Option<&LoadedKernel>,
) -> Result<Vec<VcpuFd>, VmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = vm.check_extension(Cap::TscDeadlineTimer);
    let mut vcpus = Vec::with_capacity(count.into());
    for index in 0..count {
        let vcpu = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        if let Some(kernel) = kernel {
            cpu::configure_vcpu(&vcpu, index, count, &supported, tsc_deadline, kernel.entry)?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_named_in_order() {
        assert_eq!(disk_name(0), "vda");
        assert_eq!(disk_name(1), "vdb");
        assert_eq!(disk_name(25), "vdz");
    }
}
