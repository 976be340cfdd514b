//! What the human monitor's `info registers` and `info lapic` show of a
//! vCPU, in QEMU's layout: read by the vCPU's own thread while it is
//! parked (a `VcpuFd` belongs to its thread), formatted anywhere.
//!
//! Beyond QEMU's text, `info lapic` gives the TSC-deadline timer's state
//! (the deadline, the vCPU's TSC and how far apart they are) and whether
//! the vCPU is halted: what tells a guest that waits for a timer interrupt
//! from one whose interrupt never comes.

use kvm_bindings::{kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use super::{lapic_reg, APIC_LVT0, APIC_LVT1, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};

/// KVM_MP_STATE_HALTED.
const MP_STATE_HALTED: u32 = 3;

// Local APIC register offsets.
const APIC_ID: usize = 0x20;
const APIC_TPR: usize = 0x80;
const APIC_APR: usize = 0x90;
const APIC_PPR: usize = 0xa0;
const APIC_LDR: usize = 0xd0;
const APIC_DFR: usize = 0xe0;
const APIC_SPIV: usize = 0xf0;
const APIC_ISR: usize = 0x100;
const APIC_TMR: usize = 0x180;
const APIC_IRR: usize = 0x200;
const APIC_ESR: usize = 0x280;
const APIC_ICR: usize = 0x300;
const APIC_ICR2: usize = 0x310;
const APIC_LVTT: usize = 0x320;
const APIC_LVTTHMR: usize = 0x330;
const APIC_LVTPC: usize = 0x340;
const APIC_LVTERR: usize = 0x370;
const APIC_TMICT: usize = 0x380;
const APIC_TMCCT: usize = 0x390;
const APIC_TDCR: usize = 0x3e0;

/// One vCPU's registers, local APIC and timer MSRs.
#[derive(Clone)]
pub struct CpuDump {
    /// vCPU index.
    pub index: usize,
    /// KVM's MP state (3: halted).
    pub mp_state: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub lapic: kvm_lapic_state,
    /// IA32_TSC as the guest reads it.
    pub tsc: Option<u64>,
    /// IA32_TSC_DEADLINE (0: disarmed).
    pub tsc_deadline: Option<u64>,
    /// The vCPU's TSC frequency.
    pub tsc_khz: Option<u32>,
}

/// Reads vCPU `index`'s state; the vCPU must be out of `KVM_RUN`.
pub fn read(vcpu: &VcpuFd, index: usize) -> Result<CpuDump, String> {
    let err = |what: &'static str| move |e: kvm_ioctls::Error| format!("vCPU {index}: {what}: {e}");
    let mp_state = vcpu.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(err("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    let lapic = vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    let mut msrs = Msrs::from_entries(&[
        kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        },
        kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_TSC_DEADLINE,
            ..Default::default()
        },
    ])
    .map_err(|e| format!("vCPU {index}: MSR list: {e:?}"))?;
    let read = vcpu.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
    let value = |i: usize| (i < read).then(|| msrs.as_slice()[i].data);
    Ok(CpuDump {
        index,
        mp_state: mp_state.mp_state,
        regs,
        sregs,
        lapic,
        tsc: value(0),
        tsc_deadline: value(1),
        tsc_khz: vcpu.get_tsc_khz().ok(),
    })
}

fn reg32(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    lapic_reg(&lapic.regs, offset)
}

/// The vectors set in a 256-bit register (ISR, TMR, IRR): eight 32-bit
/// words, 16 bytes apart.
fn vectors(lapic: &kvm_lapic_state, base: usize) -> Vec<u32> {
    (0..256u32)
        .filter(|&v| reg32(lapic, base + (v as usize / 32) * 16) & (1 << (v % 32)) != 0)
        .collect()
}

fn delivery_mode(mode: u32) -> &'static str {
    match mode {
        0 => "Fixed",
        1 => "LowPrio",
        2 => "SMI",
        4 => "NMI",
        5 => "INIT",
        6 => "SIPI",
        7 => "ExtINT",
        _ => "...",
    }
}

fn lvt_line(name: &str, lvt: u32, timer: bool) -> String {
    let timer_mode = if !timer {
        ""
    } else {
        match (lvt >> 17) & 3 {
            0 => "one-shot",
            1 => "periodic",
            2 => "tsc-deadline",
            _ => "reserved",
        }
    };
    let mode = (lvt >> 8) & 7;
    let mut s = format!(
        "{name}\t 0x{lvt:08x} {} {:<5} {:<6}{:<6}{:<11} ",
        if lvt & (1 << 13) != 0 {
            "active-lo"
        } else {
            "active-hi"
        },
        if lvt & (1 << 15) != 0 {
            "level"
        } else {
            "edge"
        },
        if lvt & (1 << 16) != 0 { "masked" } else { "" },
        if lvt & (1 << 12) != 0 { "pending" } else { "" },
        timer_mode,
    );
    if mode == 4 {
        s.push_str("NMI\r\n");
    } else {
        s.push_str(&format!("{} (vec {})\r\n", delivery_mode(mode), lvt & 0xff));
    }
    s
}

fn vector_line(name: &str, set: &[u32], level: &[u32]) -> String {
    let mut s = format!("{name}\t ");
    if set.is_empty() {
        s.push_str("(none)");
    }
    for v in set {
        let tag = if level.contains(v) { "(level)" } else { "" };
        s.push_str(&format!("{v}{tag} "));
    }
    s.push_str("\r\n");
    s
}

/// The TSC-deadline timer: armed or not, and when it is due.
fn deadline_line(d: &CpuDump) -> String {
    match (d.tsc_deadline, d.tsc) {
        (Some(0), _) => "TSC deadline\t 0 (disarmed)\r\n".to_owned(),
        (Some(deadline), Some(tsc)) => {
            let ahead = i128::from(deadline) - i128::from(tsc);
            let when = match d.tsc_khz {
                Some(khz) if khz > 0 => {
                    let us = ahead * 1000 / i128::from(khz);
                    if us >= 0 {
                        format!("due in {us} us")
                    } else {
                        format!("due {} us ago", -us)
                    }
                }
                _ => format!("{ahead} cycles ahead"),
            };
            format!("TSC deadline\t 0x{deadline:016x} TSC 0x{tsc:016x}: {when}\r\n")
        }
        _ => "TSC deadline\t (unavailable)\r\n".to_owned(),
    }
}

/// `info lapic`, for one vCPU.
pub fn lapic_text(d: &CpuDump) -> String {
    let l = &d.lapic;
    let mut s = format!("dumping local APIC state for CPU {:<2}\r\n\r\n", d.index);
    for (name, offset) in [
        ("LVT0", APIC_LVT0),
        ("LVT1", APIC_LVT1),
        ("LVTPC", APIC_LVTPC),
        ("LVTERR", APIC_LVTERR),
        ("LVTTHMR", APIC_LVTTHMR),
    ] {
        s.push_str(&lvt_line(name, reg32(l, offset), false));
    }
    s.push_str(&lvt_line("LVTT", reg32(l, APIC_LVTT), true));
    let dcr = reg32(l, APIC_TDCR) & 0xb;
    // Divide configuration: bits 0, 1 and 3 give 2^(n+1), 0b111 divides by 1.
    let n = (dcr & 3) | ((dcr >> 1) & 4);
    let divide = if n == 7 { 1 } else { 2u32 << n };
    s.push_str(&format!(
        "Timer\t DCR=0x{dcr:x} (divide by {divide}) initial_count = {} current_count = {}\r\n",
        reg32(l, APIC_TMICT),
        reg32(l, APIC_TMCCT)
    ));
    s.push_str(&deadline_line(d));
    let spiv = reg32(l, APIC_SPIV);
    s.push_str(&format!(
        "SPIV\t 0x{spiv:08x} APIC {}, focus={}, spurious vec {}\r\n",
        if spiv & (1 << 8) != 0 {
            "enabled"
        } else {
            "disabled"
        },
        if spiv & (1 << 9) != 0 { "on" } else { "off" },
        spiv & 0xff
    ));
    let icr = reg32(l, APIC_ICR);
    s.push_str(&format!(
        "ICR\t 0x{icr:08x} {} {} {} {}\r\n",
        if icr & (1 << 11) != 0 {
            "logical"
        } else {
            "physical"
        },
        if icr & (1 << 15) != 0 {
            "level"
        } else {
            "edge"
        },
        if icr & (1 << 14) != 0 {
            "assert"
        } else {
            "de-assert"
        },
        match (icr >> 18) & 3 {
            0 => "no-shorthand",
            1 => "self",
            2 => "all-self",
            _ => "all",
        }
    ));
    s.push_str(&format!("ICR2\t 0x{:08x}\r\n", reg32(l, APIC_ICR2)));
    s.push_str(&format!("ESR\t 0x{:08x}\r\n", reg32(l, APIC_ESR)));
    let level = vectors(l, APIC_TMR);
    s.push_str(&vector_line("ISR", &vectors(l, APIC_ISR), &level));
    s.push_str(&vector_line("IRR", &vectors(l, APIC_IRR), &level));
    s.push_str(&format!(
        "\r\nAPR 0x{:02x} TPR 0x{:02x} DFR 0x{:02x} LDR 0x{:02x} PPR 0x{:02x}\r\n",
        reg32(l, APIC_APR) & 0xff,
        reg32(l, APIC_TPR) & 0xff,
        reg32(l, APIC_DFR) >> 28,
        reg32(l, APIC_LDR) >> 24,
        reg32(l, APIC_PPR) & 0xff,
    ));
    s.push_str(&format!(
        "APIC ID 0x{:x}, vCPU {}, interrupts {}\r\n",
        reg32(l, APIC_ID) >> 24,
        if d.mp_state == MP_STATE_HALTED {
            "halted"
        } else {
            "runnable"
        },
        if d.regs.rflags & (1 << 9) != 0 {
            "enabled (IF=1)"
        } else {
            "disabled (IF=0)"
        }
    ));
    s
}

fn segment_line(name: &str, seg: &kvm_segment) -> String {
    let flags = (u32::from(seg.type_) << 8)
        | (u32::from(seg.s) << 12)
        | (u32::from(seg.dpl) << 13)
        | (u32::from(seg.present) << 15)
        | (u32::from(seg.avl) << 20)
        | (u32::from(seg.l) << 21)
        | (u32::from(seg.db) << 22)
        | (u32::from(seg.g) << 23);
    format!(
        "{name:<3}={:04x} {:016x} {:08x} {flags:08x}\r\n",
        seg.selector, seg.base, seg.limit
    )
}

/// `info registers`, for one vCPU.
pub fn registers_text(d: &CpuDump) -> String {
    let r = &d.regs;
    let sr = &d.sregs;
    let f = r.rflags;
    let flag = |bit: u32, c: char| if f & (1 << bit) != 0 { c } else { '-' };
    let mut s = format!(
        "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}\r\n",
        r.rax, r.rbx, r.rcx, r.rdx
    );
    s.push_str(&format!(
        "RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}\r\n",
        r.rsi, r.rdi, r.rbp, r.rsp
    ));
    s.push_str(&format!(
        "R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}\r\n",
        r.r8, r.r9, r.r10, r.r11
    ));
    s.push_str(&format!(
        "R12={:016x} R13={:016x} R14={:016x} R15={:016x}\r\n",
        r.r12, r.r13, r.r14, r.r15
    ));
    s.push_str(&format!(
        "RIP={:016x} RFL={:08x} [{}{}{}{}{}{}{}] CPL={} HLT={}\r\n",
        r.rip,
        f,
        flag(10, 'D'),
        flag(11, 'O'),
        flag(7, 'S'),
        flag(6, 'Z'),
        flag(4, 'A'),
        flag(2, 'P'),
        flag(0, 'C'),
        sr.cs.selector & 3,
        u8::from(d.mp_state == MP_STATE_HALTED),
    ));
    for (name, seg) in [
        ("ES", &sr.es),
        ("CS", &sr.cs),
        ("SS", &sr.ss),
        ("DS", &sr.ds),
        ("FS", &sr.fs),
        ("GS", &sr.gs),
        ("LDT", &sr.ldt),
        ("TR", &sr.tr),
    ] {
        s.push_str(&segment_line(name, seg));
    }
    s.push_str(&format!(
        "GDT=     {:016x} {:08x}\r\nIDT=     {:016x} {:08x}\r\n",
        sr.gdt.base, sr.gdt.limit, sr.idt.base, sr.idt.limit
    ));
    s.push_str(&format!(
        "CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x}\r\n",
        sr.cr0, sr.cr2, sr.cr3, sr.cr4
    ));
    s.push_str(&format!("EFER={:016x}\r\n", sr.efer));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(l: &mut kvm_lapic_state, offset: usize, value: u32) {
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            l.regs[offset + i] = *b as std::os::raw::c_char;
        }
    }

    fn dump() -> CpuDump {
        let mut lapic = kvm_lapic_state::default();
        set(&mut lapic, APIC_LVTT, 0x0004_00ec); // TSC deadline, vector 236
        set(&mut lapic, APIC_LVT0, 0x0001_0700); // masked ExtINT
        set(&mut lapic, APIC_LVT1, 0x0000_0400); // NMI
        set(&mut lapic, APIC_SPIV, 0x1ff);
        set(&mut lapic, APIC_TDCR, 0xb); // divide by 1
        set(&mut lapic, APIC_IRR + 7 * 16, 1 << (236 - 224)); // 236 pending
        set(&mut lapic, APIC_ISR + 16, 1 << (34 - 32)); // 34 in service
        set(&mut lapic, APIC_TMR + 16, 1 << (34 - 32)); // level-triggered
        let mut regs = kvm_regs {
            rip: 0xffff_ffff_8100_1234,
            rflags: 0x246,
            ..Default::default()
        };
        regs.rax = 0xdead;
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0x10;
        sregs.cs.type_ = 0xb;
        sregs.cs.s = 1;
        sregs.cs.present = 1;
        sregs.cs.l = 1;
        sregs.efer = 0xd01;
        CpuDump {
            index: 1,
            mp_state: MP_STATE_HALTED,
            regs,
            sregs,
            lapic,
            tsc: Some(1_000_000_000),
            tsc_deadline: Some(1_000_000_000 + 2_600_000),
            tsc_khz: Some(2_600_000),
        }
    }

    #[test]
    fn lapic_text_names_timer_mode_vectors_and_deadline() {
        let text = lapic_text(&dump());
        assert!(text.starts_with("dumping local APIC state for CPU 1 \r\n\r\n"));
        // QEMU's columns: "edge" in 5, then the empty masked and pending
        // columns of 6 each.
        let lvtt = format!(
            "LVTT\t 0x000400ec active-hi edge{}tsc-deadline Fixed (vec 236)\r\n",
            " ".repeat(14)
        );
        assert!(text.contains(&lvtt), "{text}");
        assert!(text.contains("LVT0\t 0x00010700 active-hi edge  masked"));
        assert!(text.contains("ExtINT (vec 0)\r\n"));
        assert!(text.contains("NMI\r\n"));
        assert!(text.contains("DCR=0xb (divide by 1)"));
        assert!(text.contains("SPIV\t 0x000001ff APIC enabled, focus=off, spurious vec 255\r\n"));
        assert!(text.contains("ISR\t 34(level) \r\n"));
        assert!(text.contains("IRR\t 236 \r\n"));
        // 2.6 million cycles at 2.6 GHz: one millisecond.
        assert!(text.contains("due in 1000 us"), "{text}");
        assert!(text.contains("vCPU halted, interrupts enabled (IF=1)"));
    }

    #[test]
    fn deadline_in_the_past_or_disarmed() {
        let mut d = dump();
        d.tsc_deadline = Some(1_000_000_000 - 5_200_000);
        assert!(lapic_text(&d).contains("due 2000 us ago"));
        d.tsc_deadline = Some(0);
        assert!(lapic_text(&d).contains("TSC deadline\t 0 (disarmed)"));
        d.tsc_deadline = Some(5);
        d.tsc_khz = None;
        assert!(lapic_text(&d).contains("-999999995 cycles ahead"));
        d.tsc = None;
        assert!(lapic_text(&d).contains("TSC deadline\t (unavailable)"));
    }

    #[test]
    fn divide_configuration_decodes_as_the_sdm_says() {
        let mut d = dump();
        for (dcr, by) in [
            (0x0, 2),
            (0x1, 4),
            (0x2, 8),
            (0x3, 16),
            (0x8, 32),
            (0xa, 128),
        ] {
            set(&mut d.lapic, APIC_TDCR, dcr);
            assert!(
                lapic_text(&d).contains(&format!("(divide by {by})")),
                "{dcr:#x}"
            );
        }
    }

    #[test]
    fn registers_text_in_qemu_layout() {
        let text = registers_text(&dump());
        assert!(text.starts_with("RAX=000000000000dead RBX="));
        assert!(text.contains("RIP=ffffffff81001234 RFL=00000246 [---Z-P-] CPL=0 HLT=1\r\n"));
        assert!(text.contains("CS =0010 0000000000000000 00000000 00209b00\r\n"));
        assert!(text.contains("EFER=0000000000000d01\r\n"));
    }
}
