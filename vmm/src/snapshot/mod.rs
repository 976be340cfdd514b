//! Saving a whole VM to a directory and restoring it in a new process,
//! QEMU-style: QMP/HMP `migrate file:DIR` writes it, `skiff-vmm
//! --incoming file:DIR` (with the same devices on its command line) runs
//! it again.
//!
//! A snapshot directory holds two files:
//! - `state`: a header (magic, format version, payload length, SHA-256 of
//!   the payload) and the payload, a JSON [`VmSnapshot`]: the machine's
//!   shape, the host CPU it ran on, the VM's KVM state ([`VmState`]), every
//!   vCPU's ([`vcpu::VcpuState`]) and every device's;
//! - `memory`: guest RAM, its regions one after another, written sparsely
//!   (pages of zeros are holes). A restore maps it `MAP_PRIVATE`, so it
//!   costs no copy, any number of VMs restored from one snapshot share its
//!   clean pages, and the file is never written.
//!
//! A device may add files of its own (a disk overlay's contents).
//!
//! Everything read back is untrusted: the header and checksum are checked
//! before the payload is parsed, the payload is bounded, and a snapshot
//! that does not fit this VM (another format, host CPU, memory size, vCPU
//! count or device set) is refused with a message that says what differs.

pub mod vcpu;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use skiff_devices::snapshot::{GedSnapshot, SerialSnapshot, TransportSnapshot};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use self::vcpu::VcpuState;

/// The state file's first bytes.
pub const MAGIC: &[u8; 8] = b"SKIFFVM\n";
/// The state format this build writes and reads; any change to
/// [`VmSnapshot`] or what it holds bumps it. Snapshots are build
/// artefacts: another version is refused, not converted.
pub const FORMAT_VERSION: u32 = 1;
/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Largest payload read back (the state of 8 vCPUs and every device is
/// well under 1 MiB).
pub const MAX_PAYLOAD: u64 = 16 << 20;
/// Header: magic, version (u32 LE), payload length (u64 LE), SHA-256.
const HEADER_LEN: usize = 8 + 4 + 8 + 32;
/// Pages of guest memory are written unless they hold only zeros.
const PAGE: usize = 4096;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Why a snapshot could not be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file of the snapshot could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A VM-wide KVM call failed.
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// A vCPU's KVM call failed.
    #[error("vCPU {index}: {what} failed: {source}")]
    Vcpu {
        index: usize,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// KVM would not read or take a vCPU's MSRs.
    #[error("vCPU {index}: {detail}")]
    Msrs { index: usize, detail: String },
    /// The state file is not a snapshot of this format.
    #[error("{}: {detail}", path.display())]
    Format { path: PathBuf, detail: String },
    /// The snapshot does not fit this VM or host.
    #[error("the snapshot does not fit this VM: {0}")]
    Mismatch(String),
    /// A value in the snapshot is out of range.
    #[error("the snapshot is invalid: {0}")]
    Invalid(String),
    /// A device refused its saved state, or could not save it.
    #[error("{device}: {source}")]
    Device {
        device: String,
        source: skiff_devices::snapshot::SnapshotError,
    },
}

/// The VM-wide KVM state: the PIT, the kvmclock and the interrupt
/// controllers.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

fn vm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

impl VmState {
    /// Reads the VM's state (its vCPUs paused).
    pub fn save(vm: &VmFd) -> Result<VmState, SnapshotError> {
        let pit = vm.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?;
        let mut clock = vm.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?;
        // Only the clock value is restored; the flags say how it was read.
        clock.flags = 0;
        let chip = |chip_id| -> Result<kvm_irqchip, SnapshotError> {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c).map_err(vm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmState {
            pit,
            clock,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Puts the state into a fresh VM (irqchip and PIT created), in
    /// Firecracker's order: PIT, clock, irqchips.
    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        for (chip, id) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != id {
                return Err(SnapshotError::Invalid(format!(
                    "irqchip {} where chip {id} belongs",
                    chip.chip_id
                )));
            }
        }
        vm.set_pit2(&self.pit).map_err(vm_err("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(vm_err("KVM_SET_CLOCK"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(vm_err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

/// What the snapshot must agree on with the VM restoring it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    pub memory_mib: u64,
    pub cpus: u8,
    /// The virtio devices in guest order, by name (vda, eth1, hvc0, rng).
    pub devices: Vec<String>,
}

/// The host CPU a snapshot ran on: vendor and family/model/stepping
/// (CPUID leaves 0 and 1). Restoring on another CPU model is refused:
/// the guest's CPUID and MSRs came from this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    pub vendor: String,
    pub signature: u32,
}

impl HostCpu {
    /// This host's.
    pub fn current() -> HostCpu {
        let (leaf0, leaf1) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
        let mut vendor = Vec::with_capacity(12);
        for r in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        HostCpu {
            vendor: String::from_utf8_lossy(&vendor).into_owned(),
            signature: leaf1.eax,
        }
    }
}

/// A named virtio device's saved transport and device state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamedTransport {
    pub name: String,
    pub state: TransportSnapshot,
}

/// Everything in a snapshot's state file.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub machine: MachineShape,
    pub host: HostCpu,
    /// Sizes of the guest RAM regions, in order, as in the memory file.
    pub memory_regions: Vec<(u64, u64)>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    pub ged: GedSnapshot,
    pub virtio: Vec<NamedTransport>,
}

impl VmSnapshot {
    /// Refuses a snapshot taken on another host CPU, or of another shape
    /// than `machine`, saying what differs.
    pub fn check_fits(&self, machine: &MachineShape) -> Result<(), SnapshotError> {
        let host = HostCpu::current();
        if self.host != host {
            return Err(SnapshotError::Mismatch(format!(
                "it was taken on a {} CPU with signature {:#x}, this host has a {} CPU with signature {:#x}",
                self.host.vendor, self.host.signature, host.vendor, host.signature
            )));
        }
        if self.machine.memory_mib != machine.memory_mib {
            return Err(SnapshotError::Mismatch(format!(
                "it has {} MiB of memory, this VM {} MiB (--memory)",
                self.machine.memory_mib, machine.memory_mib
            )));
        }
        if self.machine.cpus != machine.cpus || self.vcpus.len() != usize::from(machine.cpus) {
            return Err(SnapshotError::Mismatch(format!(
                "it has {} vCPU(s), this VM {} (--cpus)",
                self.vcpus.len(),
                machine.cpus
            )));
        }
        if self.machine.devices != machine.devices
            || self.virtio.len() != machine.devices.len()
            || self
                .virtio
                .iter()
                .zip(&machine.devices)
                .any(|(t, name)| &t.name != name)
        {
            return Err(SnapshotError::Mismatch(format!(
                "its virtio devices are [{}], this VM's [{}]",
                self.machine.devices.join(", "),
                machine.devices.join(", ")
            )));
        }
        Ok(())
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_owned();
    move |source| SnapshotError::Io { what, path, source }
}

/// Writes `snapshot` as `dir/state` (written to a temporary name, then
/// renamed, so a reader never sees half a file).
pub fn write_state(dir: &Path, snapshot: &VmSnapshot) -> Result<(), SnapshotError> {
    let payload = serde_json::to_vec(snapshot)
        .map_err(|e| SnapshotError::Invalid(format!("cannot encode the state: {e}")))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut f = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
    f.write_all(&out).map_err(io_err("cannot write", &tmp))?;
    f.sync_all().map_err(io_err("cannot sync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err("cannot rename into", &path))?;
    Ok(())
}

/// Parses a state file's bytes: header, checksum, then the payload.
pub fn parse_state(path: &Path, bytes: &[u8]) -> Result<VmSnapshot, SnapshotError> {
    let format = |detail: String| SnapshotError::Format {
        path: path.to_owned(),
        detail,
    };
    if bytes.len() < HEADER_LEN {
        return Err(format(format!(
            "{} bytes, shorter than a snapshot header: truncated or not a snapshot",
            bytes.len()
        )));
    }
    if &bytes[..8] != MAGIC {
        return Err(format("not a skiff-vmm snapshot (bad magic)".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(format(format!(
            "snapshot format version {version}, this skiff-vmm reads version {FORMAT_VERSION} only"
        )));
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD {
        return Err(format(format!(
            "the header announces a {len}-byte state, more than {MAX_PAYLOAD}"
        )));
    }
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(format(format!(
            "the state is {} bytes, the header says {len}: truncated or corrupted",
            payload.len()
        )));
    }
    if Sha256::digest(payload).as_slice() != &bytes[20..52] {
        return Err(format("checksum mismatch: the state is corrupted".into()));
    }
    serde_json::from_slice(payload).map_err(|e| format(format!("cannot decode the state: {e}")))
}

/// Reads and checks `dir/state`.
pub fn read_state(dir: &Path) -> Result<VmSnapshot, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let f = File::open(&path).map_err(io_err("cannot open the snapshot state", &path))?;
    let mut bytes = Vec::new();
    f.take(MAX_PAYLOAD + HEADER_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("cannot read", &path))?;
    parse_state(&path, &bytes)
}

/// The (start, length) of each guest RAM region.
pub fn memory_regions(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// Writes guest RAM to `dir/memory`, regions one after another; pages
/// holding only zeros are left as holes. Returns the bytes written.
pub fn write_memory(dir: &Path, mem: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    // A new file, never one a running restored VM may have mapped.
    let _ = std::fs::remove_file(&path);
    let f = File::create(&path).map_err(io_err("cannot create", &path))?;
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region.as_ptr();
        // SAFETY: `host` is the start of this region's live mapping of
        // `len` bytes, owned by `mem` for the duration of this borrow; the
        // vCPUs are paused, so nothing writes to it while it is read (a
        // device thread writing a used ring would only make the snapshot
        // stale, not the read unsound: the bytes are plain data).
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            // A slice comparison is one memcmp, fast even unoptimized.
            if page == &ZERO_PAGE[..page.len()] {
                continue;
            }
            f.write_all_at(page, offset + (i * PAGE) as u64)
                .map_err(io_err("cannot write", &path))?;
            written += page.len() as u64;
        }
        offset += len as u64;
    }
    f.set_len(offset).map_err(io_err("cannot size", &path))?;
    f.sync_all().map_err(io_err("cannot sync", &path))?;
    Ok(written)
}

/// Opens `dir/memory` for a restore and checks that it holds `total`
/// bytes (a shorter file would fault the guest at its end).
pub fn open_memory(dir: &Path, total: u64) -> Result<File, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let f = File::open(&path).map_err(io_err("cannot open the snapshot memory", &path))?;
    let len = f.metadata().map_err(io_err("cannot stat", &path))?.len();
    if len != total {
        return Err(SnapshotError::Format {
            path,
            detail: format!("{len} bytes of memory, the VM has {total}: truncated or another VM's"),
        });
    }
    Ok(f)
}

#[cfg(test)]
mod tests;
