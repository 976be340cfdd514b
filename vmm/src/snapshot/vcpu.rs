//! One vCPU's KVM state, saved and restored in the orders KVM needs
//! (../shared notes on snapshots, after Firecracker's `vcpu.rs`):
//!
//! - save: MP state first (it makes KVM accept pending APIC events), then
//!   registers, special registers, XSAVE, XCRs, debug registers, LAPIC, TSC
//!   frequency, CPUID, MSRs, and the vCPU events last;
//! - restore: CPUID, MP state, registers, special registers (which set the
//!   APIC base), XSAVE, XCRs, debug registers, LAPIC (after the special
//!   registers and before the MSRs: the TSC-deadline MSR only takes with a
//!   configured LAPIC), the MSRs with TSC_DEADLINE in a second, last call
//!   (after the TSC), then the vCPU events (SET_REGS clears pending
//!   exceptions), then KVM_KVMCLOCK_CTRL so the guest does not count the
//!   gap as a soft lockup.
//!
//! Saving must happen with the vCPU out of `KVM_RUN` and any port or MMIO
//! access it exited for completed (see [`complete_pending_io`]).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::SnapshotError;

// MSR_IA32_TSC_DEADLINE is restored after the TSC, in a call of its own.
use crate::cpu::{MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};
/// MSR_IA32_MCG_CTL: not restorable on every host; dropped, as
/// Firecracker does.
const MSR_IA32_MCG_CTL: u32 = 0x17b;

/// MSR ranges worth saving (inclusive): what a Linux guest sets and
/// expects back. Everything KVM lists inside them is saved.
const SAVED_MSR_RANGES: &[(u32, u32)] = &[
    (0x10, 0x10),               // TSC
    (0x1b, 0x1b),               // APIC base
    (0x3a, 0x3b),               // feature control, TSC adjust
    (0x48, 0x49),               // SPEC_CTRL, PRED_CMD
    (0x122, 0x122),             // TSX_CTRL
    (0x174, 0x176),             // SYSENTER
    (0x179, 0x17a),             // MCG_CAP, MCG_STATUS
    (0x1a0, 0x1a0),             // MISC_ENABLE
    (0x1d9, 0x1d9),             // DEBUGCTL
    (0x200, 0x2ff),             // MTRRs, PAT
    (0x400, 0x47f),             // machine-check banks
    (0x6e0, 0x6e0),             // TSC_DEADLINE
    (0x800, 0x8ff),             // x2APIC
    (0xda0, 0xda0),             // XSS
    (0xc000_0080, 0xc000_0084), // EFER, STAR, LSTAR, CSTAR, SYSCALL_MASK
    (0xc000_0100, 0xc000_0103), // FS/GS/KERNEL_GS base, TSC_AUX
    // KVM's paravirtual range: kvmclock, async page faults, steal time,
    // PV EOI, poll control.
    (0x4b56_4d00, 0x4b56_4dff),
    // The old kvmclock MSRs.
    (0x11, 0x12),
];

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// TSC frequency in kHz, when KVM reports one.
    pub tsc_khz: Option<u32>,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .field("cpuid", &self.cpuid.len())
            .finish_non_exhaustive()
    }
}

/// The MSRs to save on this host: KVM's list, filtered by
/// [`SAVED_MSR_RANGES`].
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|source| SnapshotError::Kvm {
            what: "KVM_GET_MSR_INDEX_LIST",
            source,
        })?;
    Ok(list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| i != MSR_IA32_MCG_CTL)
        .filter(|&i| {
            SAVED_MSR_RANGES
                .iter()
                .any(|&(lo, hi)| (lo..=hi).contains(&i))
        })
        .collect())
}

/// Lets KVM finish the port or MMIO access the vCPU last exited for: the
/// value a read returned only reaches the guest's registers on the next
/// `KVM_RUN`. With `immediate_exit` set, that run completes the access and
/// returns at once, without running guest code.
pub fn complete_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

fn kvm_err(index: usize, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Vcpu {
        index,
        what,
        source,
    }
}

/// Reads vCPU `index`'s state; `msr_indices` from [`msrs_to_save`].
pub fn save(vcpu: &VcpuFd, index: usize, msr_indices: &[u32]) -> Result<VcpuState, SnapshotError> {
    let mp_state = vcpu
        .get_mp_state()
        .map_err(kvm_err(index, "KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm_err(index, "KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err(index, "KVM_GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(kvm_err(index, "KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm_err(index, "KVM_GET_XCRS"))?;
    let debug_regs = vcpu
        .get_debug_regs()
        .map_err(kvm_err(index, "KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm_err(index, "KVM_GET_LAPIC"))?;
    let tsc_khz = vcpu.get_tsc_khz().ok();
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err(index, "KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let mut msrs = Vec::with_capacity(msr_indices.len());
    for chunk in msr_indices.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut list = Msrs::from_entries(&entries).map_err(|_| SnapshotError::Msrs {
            index,
            detail: "too many MSRs".into(),
        })?;
        let read = vcpu
            .get_msrs(&mut list)
            .map_err(kvm_err(index, "KVM_GET_MSRS"))?;
        if read != entries.len() {
            return Err(SnapshotError::Msrs {
                index,
                detail: format!(
                    "KVM read {read} of {} MSRs (stopped at {:#x})",
                    entries.len(),
                    entries[read.min(entries.len() - 1)].index
                ),
            });
        }
        msrs.extend_from_slice(list.as_slice());
    }
    // A TSC deadline of 0 means the timer interrupt is due or was just
    // taken; arm it for now, so the restored guest gets it (Firecracker's
    // fix for timer interrupts lost over a snapshot).
    let tsc = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data);
    if let (Some(tsc), Some(deadline)) = (
        tsc,
        msrs.iter_mut().find(|m| m.index == MSR_IA32_TSC_DEADLINE),
    ) {
        if deadline.data == 0 {
            deadline.data = tsc;
        }
    }
    let vcpu_events = vcpu
        .get_vcpu_events()
        .map_err(kvm_err(index, "KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        tsc_khz,
        msrs,
        vcpu_events,
    })
}

/// Sets `msrs` on vCPU `index`, all or nothing.
fn set_msrs(vcpu: &VcpuFd, index: usize, msrs: &[kvm_msr_entry]) -> Result<(), SnapshotError> {
    for chunk in msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let list = Msrs::from_entries(chunk).map_err(|_| SnapshotError::Msrs {
            index,
            detail: "too many MSRs".into(),
        })?;
        let set = vcpu
            .set_msrs(&list)
            .map_err(kvm_err(index, "KVM_SET_MSRS"))?;
        if set != chunk.len() {
            return Err(SnapshotError::Msrs {
                index,
                detail: format!(
                    "KVM took {set} of {} MSRs; it refused MSR {:#x} (a snapshot from another host CPU?)",
                    chunk.len(),
                    chunk[set].index
                ),
            });
        }
    }
    Ok(())
}

/// Puts `state` into vCPU `index`, freshly created and never run.
pub fn restore(vcpu: &VcpuFd, index: usize, state: &VcpuState) -> Result<(), SnapshotError> {
    if state.cpuid.is_empty() || state.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(SnapshotError::Invalid(format!(
            "vCPU {index}: {} CPUID entries",
            state.cpuid.len()
        )));
    }
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|_| SnapshotError::Invalid(format!("vCPU {index}: CPUID entries do not fit")))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_err(index, "KVM_SET_CPUID2"))?;
    if let Some(khz) = state.tsc_khz {
        // A host with another TSC frequency: KVM scales the guest's TSC
        // where the CPU can; where it cannot, the guest's clock still runs
        // from kvmclock.
        if let Err(e) = vcpu.set_tsc_khz(khz) {
            log::debug!("vCPU {index}: KVM_SET_TSC_KHZ {khz}: {e}");
        }
    }
    vcpu.set_mp_state(state.mp_state)
        .map_err(kvm_err(index, "KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs)
        .map_err(kvm_err(index, "KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(kvm_err(index, "KVM_SET_SREGS"))?;
    let xsave_size = state
        .cpuid
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map_or(0, |e| e.ecx as usize);
    if xsave_size > std::mem::size_of::<kvm_xsave>() {
        return Err(SnapshotError::Invalid(format!(
            "vCPU {index}: its CPUID asks for a {xsave_size}-byte XSAVE area (AMX?), more than KVM_SET_XSAVE takes"
        )));
    }
    // SAFETY: the vCPU's CPUID (just set) enables no XSAVE feature whose
    // area reaches past the 4 KiB of `kvm_xsave` (checked above: leaf 0xD's
    // ECX is the size for every supported feature), so KVM reads no more
    // than the struct holds.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(kvm_err(index, "KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs)
        .map_err(kvm_err(index, "KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debug_regs)
        .map_err(kvm_err(index, "KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic)
        .map_err(kvm_err(index, "KVM_SET_LAPIC"))?;
    let (deferred, first): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) = state
        .msrs
        .iter()
        .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    set_msrs(vcpu, index, &first)?;
    set_msrs(vcpu, index, &deferred)?;
    vcpu.set_vcpu_events(&state.vcpu_events)
        .map_err(kvm_err(index, "KVM_SET_VCPU_EVENTS"))?;
    if let Err(e) = vcpu.kvmclock_ctrl() {
        // EINVAL where the guest has not set up kvmclock.
        log::debug!("vCPU {index}: KVM_KVMCLOCK_CTRL: {e}");
    }
    Ok(())
}
