//! `skiff switch`: one VLAN switch run by hand, for VMs started outside a
//! test (skiff-vmm with `--net stream=PATH`, or QEMU with `-netdev
//! stream,addr.type=unix,addr.path=PATH`). It runs until SIGINT or SIGTERM,
//! then logs its counters and exits 0.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::Switch;

#[derive(Args, Clone)]
pub struct SwitchArgs {
    /// The unix socket VMs connect to (created; a stale one is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Write every frame the switch receives to this pcap file.
    #[arg(long, value_name = "FILE")]
    pcap: Option<PathBuf>,
    /// The VLAN number the log lines name.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vlan: u32,
}

/// Runs the switch until a signal; returns the exit status.
pub fn run(args: &SwitchArgs) -> Result<u8> {
    // Before the switch starts, so an early signal still stops it cleanly.
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    let switch = Switch::new(args.vlan, &args.socket)
        .pcap(args.pcap.clone())
        .start()?;
    let _ = signals.forever().next();
    switch.stop();
    Ok(0)
}
