//! How a VM ends: reboot, kernel panic, triple fault, SIGTERM and a
//! system call outside a thread's seccomp allow-list each give skiff-vmm's
//! documented exit status and log line.

use skiff_tests::{fixtures, run_batch, scratch_dir, shell_quote, skiff_vmm, VmSpec};
use skiff_vmm::seccomp::SeccompMode;
use skiff_vmm::VmConfig;

/// The busybox guest on `kernel` with `cmdline`; the rest as skiff-vmm's
/// defaults (one vCPU, 256 MiB, serial on stdout).
fn guest(kernel: &std::path::Path, cmdline: &str) -> VmConfig {
    VmConfig {
        initrd: Some(fixtures().initrd),
        cmdline: cmdline.into(),
        ..VmConfig::new(kernel)
    }
}

/// A minimal ELF "kernel" that loads an empty IDT and raises #BP: the CPU
/// escalates to a double and then a triple fault.
fn triple_fault_elf(path: &std::path::Path) {
    // xor eax,eax; push rax; push rax; lidt [rsp]; int3; hlt
    let code: &[u8] = &[0x31, 0xc0, 0x50, 0x50, 0x0f, 0x01, 0x1c, 0x24, 0xcc, 0xf4];
    let load = 0x10_0000u64;
    let offset = 64 + 56;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&load.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    elf.extend_from_slice(&(offset as u64).to_le_bytes());
    elf.extend_from_slice(&load.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&load.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    assert_eq!(elf.len(), offset);
    elf.extend_from_slice(code);
    std::fs::write(path, elf).unwrap();
}

/// `config` run with `SKIFF_SECCOMP_PROBE=thread`: in a debug build, that
/// thread makes one system call outside its list (getppid) right after it
/// installs its filter.
fn probed(name: &str, thread: &str, config: VmConfig) -> VmSpec {
    let mut spec = VmSpec::raw(name, vec![format!("SKIFF_SECCOMP_PROBE={thread}")]);
    spec.args.push(skiff_vmm().display().to_string());
    spec.args.extend(config.to_args());
    spec.program = Some("env".into());
    spec
}

#[test]
fn reboot_panic_triple_fault_and_sigterm_give_documented_statuses() {
    let f = fixtures();
    let dir = scratch_dir("exits-input");
    let bad_kernel = dir.join("triple-fault.elf");
    triple_fault_elf(&bad_kernel);
    let mut sigterm = VmSpec::new(
        "sigterm",
        guest(&f.microvm, "console=ttyS0 skiff.action=sleep"),
    );
    sigterm.sigterm_after = Some("skiff-guest: init ready".into());
    let specs = vec![
        VmSpec::new(
            "reboot-microvm",
            guest(&f.microvm, "console=ttyS0 skiff.action=reboot"),
        ),
        VmSpec::new(
            "reboot-kbd-debian",
            guest(&f.debian, "console=ttyS0 reboot=k skiff.action=reboot"),
        ),
        VmSpec::new(
            "panic-microvm",
            guest(&f.microvm, "console=ttyS0 panic=-1 skiff.action=panic"),
        ),
        VmSpec::new(
            "panic-debian",
            guest(&f.debian, "console=ttyS0 panic=-1 skiff.action=panic"),
        ),
        VmSpec::new("triple-fault", VmConfig::new(&bad_kernel)),
        sigterm,
        // The main thread confines itself last, once the guest runs.
        probed(
            "seccomp-main",
            "main",
            guest(&f.microvm, "console=ttyS0 skiff.action=sleep"),
        ),
        probed(
            "seccomp-vcpu",
            "vcpu0",
            guest(&f.microvm, "console=ttyS0 skiff.action=sleep"),
        ),
        VmSpec::shell(
            "seccomp-log",
            format!(
                "SKIFF_SECCOMP_PROBE=devices {} {}; echo \"status=$?\"; \
                 dmesg | grep 'type=1326' | grep 'comm=\"devices\"' | grep ' syscall=110 '",
                shell_quote(&skiff_vmm().display().to_string()),
                VmConfig {
                    seccomp: SeccompMode::Log,
                    ..guest(&f.microvm, "console=ttyS0 skiff.action=poweroff")
                }
                .to_args()
                .iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
            ),
            300,
        ),
    ];
    let o = run_batch("exits", 2048, &specs);

    for reboot in &o[..2] {
        assert_eq!(reboot.status, Some(3), "reboot:\n{}", reboot.describe());
        assert!(
            reboot.serial.contains("skiff-guest: init ready"),
            "{}",
            reboot.describe()
        );
        assert!(
            reboot.log.contains("guest requested a reset"),
            "{}",
            reboot.describe()
        );
    }
    for panic in &o[2..4] {
        assert_eq!(panic.status, Some(4), "panic:\n{}", panic.describe());
        assert!(
            panic.serial.contains("Kernel panic"),
            "{}",
            panic.describe()
        );
        assert!(
            panic.log.contains("guest kernel panicked"),
            "{}",
            panic.describe()
        );
    }
    let tf = &o[4];
    assert_eq!(tf.status, Some(5), "triple fault:\n{}", tf.describe());
    assert!(tf.log.contains("triple fault"), "{}", tf.describe());
    assert!(
        tf.log.contains("rip=0x"),
        "registers in the log:\n{}",
        tf.describe()
    );
    let st = &o[5];
    assert_eq!(st.status, Some(0), "SIGTERM:\n{}", st.describe());
    assert!(st.log.contains("stopped by SIGTERM"), "{}", st.describe());

    for (probe, thread) in o[6..8].iter().zip(["main", "vcpu0"]) {
        assert_eq!(probe.status, Some(5), "seccomp:\n{}", probe.describe());
        let line = format!(
            "] seccomp: thread {thread} made system call 110 (getppid), which its filter forbids; \
             the VM ends with status 5"
        );
        assert!(probe.log.contains(&line), "{}", probe.describe());
    }
    // In log mode the call goes through, the kernel records it, and the
    // guest runs to its power-off.
    let log = &o[8];
    assert_eq!(log.status, Some(0), "seccomp log:\n{}", log.describe());
    assert!(
        log.serial.contains("skiff-guest: init ready") && log.serial.contains("status=0"),
        "{}",
        log.describe()
    );
    assert!(
        log.serial.contains("audit: type=1326") && log.serial.contains("comm=\"devices\""),
        "the kernel's record of the call:\n{}",
        log.describe()
    );
}
