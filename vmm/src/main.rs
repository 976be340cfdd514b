//! The `skiff-vmm` command line: parses flags into a [`VmConfig`], runs the
//! VM and turns its end into an exit status.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use skiff_vmm::config::DEFAULT_CMDLINE;
use skiff_vmm::config::{ConsoleConfig, DiskConfig, MonitorConfig};
use skiff_vmm::error::MAX_CPUS;
use skiff_vmm::exit::log_exit;
use skiff_vmm::memory::{MAX_MEMORY_MIB, MIN_MEMORY_MIB};
use skiff_vmm::{ExitStatus, SerialConfig, Vm, VmConfig};

const ENVIRONMENT: &str = "\
ENVIRONMENT:
  RUST_LOG  log filter (default: info), e.g. RUST_LOG=debug";

/// Boot a Linux kernel straight into KVM: no firmware, an 8250 console on
/// ttyS0, ACPI power management.
#[derive(Parser, Debug)]
#[command(name = "skiff-vmm", version, about, after_help = format!("{}\n{ENVIRONMENT}", ExitStatus::help_table()))]
struct Cli {
    /// Kernel to boot: an x86_64 bzImage or ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,

    /// Initial ramdisk (initrd/initramfs) to load.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_CPUS)))]
    cpus: u8,

    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(MIN_MEMORY_MIB..=MAX_MEMORY_MIB))]
    memory: u64,

    /// Where the serial console (ttyS0) goes: stdio, file=PATH or none.
    #[arg(long, value_name = "BACKEND", default_value = "stdio")]
    serial: SerialConfig,

    /// A virtio-blk disk: path=PATH[,readonly=on][,overlay=on][,id=NAME].
    /// Repeat for more disks; they appear as vda, vdb, ... in order.
    /// overlay=on keeps the guest's writes in a temporary copy-on-write
    /// layer (gone when the VM exits), so many VMs can share one image.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<DiskConfig>,

    /// The virtio console (guest /dev/hvc0): socket=PATH (connect to a unix
    /// socket someone listens on), stdio or file=PATH.
    #[arg(long, value_name = "BACKEND")]
    console: Option<ConsoleConfig>,

    /// Add a virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,

    /// Describe virtio devices on the kernel command line
    /// (virtio_mmio.device=) instead of in the ACPI DSDT.
    #[arg(long)]
    virtio_mmio_cmdline: bool,

    /// KVM device node to use.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    kvm_device: PathBuf,

    /// Listen for QMP clients on a unix socket at PATH (QEMU 7.2's
    /// protocol; any number of clients at once). Repeatable.
    #[arg(long, value_name = "PATH")]
    qmp: Vec<PathBuf>,

    /// A human monitor (HMP subset): PATH to listen on, or socket=PATH to
    /// connect to a unix socket someone listens on (as QEMU's
    /// `-monitor unix:PATH`). Repeatable.
    #[arg(long, value_name = "SPEC")]
    monitor: Vec<MonitorConfig>,

    /// Name of this VM in log lines.
    #[arg(long, value_name = "NAME", default_value = "vm")]
    name: String,
}

fn init_logging(name: &str) {
    let name = name.to_owned();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| {
            writeln!(
                buf,
                "[{} {:<5} skiff-vmm {}] {}",
                buf.timestamp_millis(),
                record.level(),
                name,
                record.args()
            )
        })
        .init();
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let config = VmConfig {
        name: cli.name.clone(),
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        cpus: cli.cpus,
        memory_mib: cli.memory,
        serial: cli.serial,
        kvm_device: cli.kvm_device,
        disks: cli.disk,
        console: cli.console,
        rng: cli.rng,
        virtio_cmdline: cli.virtio_mmio_cmdline,
        qmp: cli.qmp,
        monitor: cli.monitor,
    };
    let vm = Vm::new(config).context("cannot start the VM")?;
    let reason = vm.run().context("VM failed")?;
    log_exit(&reason);
    Ok(reason.exit_code())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.name);
    match run(cli) {
        Ok(code) => {
            let _ = std::io::stdout().flush();
            // vCPU threads may still be inside KVM_RUN: leave at once.
            std::process::exit(code);
        }
        Err(e) => {
            // The VMM's errors already carry their cause in their message:
            // print the context and the error, not the whole source chain.
            let msg: Vec<String> = e.chain().take(2).map(|c| c.to_string()).collect();
            log::error!("{}", msg.join(": "));
            ExitCode::from(ExitStatus::StartFailed.code() as u8)
        }
    }
}
