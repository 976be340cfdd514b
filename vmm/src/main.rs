//! The `skiff-vmm` command line: parses flags into a [`VmConfig`], runs the
//! VM and turns its end into an exit status.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use skiff_vmm::exit::log_exit;
use skiff_vmm::{ExitStatus, Vm, VmConfig};

const ENVIRONMENT: &str = "\
ENVIRONMENT:
  RUST_LOG             log filter (default: info), e.g. RUST_LOG=debug
  SKIFF_SECCOMP        the --seccomp mode when the option is not given
  SKIFF_SECCOMP_PROBE  debug builds only: the thread (vcpu0, devices, monitors,
                       keyboard, main) that makes one forbidden system call
                       right after installing its seccomp filter";

/// Boot a Linux kernel straight into KVM: no firmware, an 8250 console on
/// ttyS0, ACPI power management.
#[derive(Parser, Debug)]
#[command(name = "skiff-vmm", version, about, after_help = format!("{}\n{ENVIRONMENT}", ExitStatus::help_table()))]
struct Cli {
    #[command(flatten)]
    vm: VmConfig,
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

fn run(config: VmConfig) -> anyhow::Result<i32> {
    let start = std::time::Instant::now();
    let what = if config.incoming.is_some() {
        "snapshot restored"
    } else {
        "VM built, kernel loaded"
    };
    let vm = Vm::new(config).context("cannot start the VM")?;
    // The set-up time alone (a restore's cost before the guest runs).
    log::info!("{what} in {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
    let reason = vm.run().context("VM failed")?;
    log_exit(&reason);
    Ok(reason.exit_code())
}

fn main() -> ExitCode {
    // Before anything allocates on another thread.
    skiff_vmm::seccomp::one_allocator_arena();
    let cli = Cli::parse();
    if let Err(msg) = cli.vm.check() {
        // A usage error, as clap's own: exit status 2.
        Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, msg)
            .exit();
    }
    init_logging(&cli.vm.name);
    match run(cli.vm) {
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
