//! The subset of QEMU's human monitor (HMP) that test tools use, with
//! QEMU's texts: `info status|version|name|kvm|migrate`, `info registers
//! [-a|N]` and `info lapic [N]` (N: a vCPU index, which is also its APIC
//! ID here; `info lapic` adds the TSC-deadline timer's state and whether
//! the vCPU is halted), `stop`, `cont`,
//! `system_powerdown`, `system_reset`, `quit`, `help`, `set_link`,
//! `migrate file:DIR`, `screendump` (PPM, or PNG with `-f png`) and
//! `sendkey`. Output lines end in CRLF, as QEMU's do; the
//! monitor socket adds the `(qemu) ` prompt.

use super::display::{parse_key_combo, ImageFormat};
use super::qemu::{package, QEMU_VERSION};
use super::{Controls, Migration, RunState};

/// The banner a monitor client gets before the first prompt.
pub fn banner() -> String {
    let (major, minor, micro) = QEMU_VERSION;
    format!("QEMU {major}.{minor}.{micro} monitor - type 'help' for more information\r\n")
}

/// The prompt after each command's output.
pub const PROMPT: &str = "(qemu) ";

const HELP: &[(&str, &str, &str)] = &[
    ("cont|c", "", "resume emulation"),
    ("help|?", "[cmd]", "show the help"),
    (
        "info",
        "[subcommand]",
        "show various information about the system state",
    ),
    (
        "migrate",
        "uri",
        "migrate to URI (file:DIR saves a snapshot of the VM in DIR)",
    ),
    ("quit|q", "", "quit the emulator"),
    (
        "screendump",
        "filename [-f format] [device [head]]",
        "save screen to a file",
    ),
    ("sendkey", "keys [hold_ms]", "send keys to the VM"),
    (
        "set_link",
        "name on|off",
        "change the link status of a network adapter",
    ),
    ("stop|s", "", "stop emulation"),
    ("system_powerdown", "", "send system power down event"),
    ("system_reset", "", "reset the system"),
];

const INFO_HELP: &[(&str, &str)] = &[
    ("kvm", "show KVM information"),
    (
        "lapic [apic-id]",
        "show the local APIC state of a vCPU (default: the current one)",
    ),
    ("migrate", "show migration status"),
    ("name", "show the current VM name"),
    (
        "registers [-a|vcpu]",
        "show the cpu registers (-a: all vCPUs; default: the current one)",
    ),
    ("status", "show the current VM status (running|paused)"),
    ("version", "show the version of QEMU"),
];

fn help_text(only: Option<&str>) -> String {
    let mut out = String::new();
    for (names, args, text) in HELP {
        if only.is_some_and(|o| !names.split('|').any(|n| n == o)) {
            continue;
        }
        let usage = if args.is_empty() {
            (*names).to_owned()
        } else {
            format!("{names} {args}")
        };
        out.push_str(&format!("{usage} -- {text}\r\n"));
    }
    out
}

fn info_help() -> String {
    INFO_HELP
        .iter()
        .map(|(name, text)| format!("info {name}  -- {text}\r\n"))
        .collect()
}

fn error(desc: &str) -> String {
    format!("Error: {desc}\r\n")
}

/// Splits a command line into its command name and the rest, as QEMU's
/// `get_command_name` does: the name runs up to the first blank.
fn split_command(line: &str) -> (&str, &str) {
    let line = line.trim_start();
    match line.find(|c: char| c.is_ascii_whitespace()) {
        Some(i) => (&line[..i], line[i..].trim_start()),
        None => (line, ""),
    }
}

fn status_line(state: RunState) -> String {
    let mut s = format!(
        "VM status: {}",
        if state.is_running() {
            "running"
        } else {
            "paused"
        }
    );
    if !state.is_running() && state != RunState::Paused {
        s.push_str(&format!(" ({})", state.as_str()));
    }
    s.push_str("\r\n");
    s
}

/// The vCPUs `info registers` or `info lapic` asked for: `arg` is empty
/// (the current one), `-a` (all, where `all` allows it) or an index.
fn chosen_cpus(arg: &str, all: bool, current: usize, cpus: u8) -> Result<Option<usize>, String> {
    match arg {
        "" => Ok(Some(current)),
        "-a" if all => Ok(None),
        n => match n.parse::<usize>() {
            Ok(i) if i < usize::from(cpus) => Ok(Some(i)),
            _ => Err(format!(
                "invalid vCPU '{n}': expected {}a number from 0 to {}\r\n",
                if all { "-a or " } else { "" },
                cpus.saturating_sub(1)
            )),
        },
    }
}

/// `info registers` and `info lapic`.
fn cpu_info(
    arg: &str,
    all: bool,
    current: usize,
    machine: &dyn Controls,
    text: fn(&crate::cpu::dump::CpuDump) -> String,
) -> String {
    let chosen = match chosen_cpus(arg, all, current, machine.info().cpus) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let dumps = match machine.cpu_dumps() {
        Ok(d) => d,
        Err(e) => return error(&e),
    };
    match chosen {
        Some(i) => dumps
            .iter()
            .find(|d| d.index == i)
            .map(text)
            .unwrap_or_else(|| error(&format!("vCPU {i} did not answer"))),
        None => dumps
            .iter()
            .map(|d| format!("\r\nCPU#{}\r\n{}", d.index, text(d)))
            .collect(),
    }
}

fn info(sub: &str, args: &str, current: usize, machine: &dyn Controls) -> String {
    match sub {
        "registers" | "r" => cpu_info(
            args,
            true,
            current,
            machine,
            crate::cpu::dump::registers_text,
        ),
        "lapic" => cpu_info(args, false, current, machine, crate::cpu::dump::lapic_text),
        "" => info_help(),
        "status" => status_line(machine.run_state()),
        "version" => {
            let (major, minor, micro) = QEMU_VERSION;
            format!("{major}.{minor}.{micro} ({})\r\n", package())
        }
        "name" => format!("{}\r\n", machine.info().name),
        "kvm" => "kvm support: enabled\r\n".to_owned(),
        "migrate" => match machine.migration() {
            Migration::None => String::new(),
            Migration::Completed { total_ms } => {
                format!("Migration status: completed\r\ntotal time: {total_ms} ms\r\n")
            }
            Migration::Failed { error } => {
                format!("Migration status: failed ({error})\r\n")
            }
        },
        other => format!("unknown command: 'info {other}'\r\n"),
    }
}

/// Runs one HMP command line and returns its output (possibly empty).
/// `quit` ends the VM; the caller's connection closes when it exits.
pub fn execute(line: &str, machine: &dyn Controls) -> String {
    execute_on(line, machine, 0)
}

/// [`execute`] with vCPU `current` as the monitor's current CPU (QMP's
/// `cpu-index`), the one `info registers` and `info lapic` show.
pub fn execute_on(line: &str, machine: &dyn Controls, current: usize) -> String {
    let (cmd, rest) = split_command(line);
    let no_args = |name: &str, run: &dyn Fn() -> String| {
        if rest.is_empty() {
            run()
        } else {
            format!("{name}: extraneous characters at the end of line\r\n")
        }
    };
    match cmd {
        "" => String::new(),
        "help" | "?" => {
            let (what, _) = split_command(rest);
            help_text((!what.is_empty()).then_some(what))
        }
        "info" | "i" => {
            let (sub, more) = split_command(rest);
            let (arg, _) = split_command(more);
            info(sub, arg, current, machine)
        }
        "stop" | "s" => no_args("stop", &|| {
            machine.stop();
            String::new()
        }),
        "cont" | "c" => no_args("cont", &|| match machine.cont() {
            Ok(()) => String::new(),
            Err(e) => error(&e),
        }),
        "system_powerdown" => no_args("system_powerdown", &|| {
            machine.system_powerdown();
            String::new()
        }),
        "system_reset" => no_args("system_reset", &|| {
            machine.system_reset();
            String::new()
        }),
        "quit" | "q" => no_args("quit", &|| {
            machine.quit();
            String::new()
        }),
        "screendump" => screendump(rest, machine),
        "sendkey" => sendkey(rest, machine),
        "migrate" => {
            let (uri, _) = split_command(rest);
            if uri.is_empty() {
                "migrate: uri expected\r\n".to_owned()
            } else {
                match machine.migrate(uri) {
                    Ok(()) => String::new(),
                    Err(e) => error(&e),
                }
            }
        }
        "set_link" => {
            let (name, more) = split_command(rest);
            let (up, _) = split_command(more);
            if name.is_empty() {
                "set_link: string expected\r\n".to_owned()
            } else if up != "on" && up != "off" {
                "Expected 'on' or 'off'\r\n".to_owned()
            } else {
                match machine.set_link(name, up == "on") {
                    Ok(()) => String::new(),
                    Err(desc) => error(&desc),
                }
            }
        }
        other => format!("unknown command: '{other}'\r\n"),
    }
}

/// `screendump filename [-f ppm|png] [device [head]]`.
fn screendump(rest: &str, machine: &dyn Controls) -> String {
    let words: Vec<&str> = rest.split_ascii_whitespace().collect();
    let (file, more) = match words.split_first() {
        Some((file, more)) => (*file, more),
        None => return "screendump: filename expected\r\n".to_owned(),
    };
    let (format, more) = match more {
        ["-f", f, more @ ..] => match ImageFormat::parse(f) {
            Some(format) => (format, more),
            None => return error(&format!("Parameter 'format' does not accept value '{f}'")),
        },
        ["-f"] => return "screendump: format expected after -f\r\n".to_owned(),
        more => (ImageFormat::Ppm, more),
    };
    if let [_, head, ..] = more {
        if *head != "0" {
            return error("skiff-vmm's display has one head, head 0");
        }
    }
    match machine
        .display()
        .screendump(std::path::Path::new(file), format)
    {
        Ok(()) => String::new(),
        Err(e) => error(&e),
    }
}

/// `sendkey keys [hold_ms]`: keys joined by `-`, each a QEMU key name or
/// a `0x` number.
fn sendkey(rest: &str, machine: &dyn Controls) -> String {
    let (spec, more) = split_command(rest);
    if spec.is_empty() {
        return "sendkey: string expected\r\n".to_owned();
    }
    let (hold, _) = split_command(more);
    let hold = if hold.is_empty() {
        None
    } else {
        match hold.parse::<u64>() {
            Ok(ms) => Some(ms),
            Err(_) => return format!("'{hold}' is not a number\r\n"),
        }
    };
    match parse_key_combo(spec) {
        Ok(keys) => match machine.display().send_keys(&keys, hold) {
            Ok(()) => String::new(),
            Err(e) => error(&e),
        },
        Err(bad) => format!("invalid parameter: {bad}\r\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fake, names};
    use super::*;
    use crate::exit::ExitReason;
    use std::sync::atomic::Ordering;

    #[test]
    fn banner_and_prompt_as_qemu() {
        assert_eq!(
            banner(),
            "QEMU 7.2.0 monitor - type 'help' for more information\r\n"
        );
        assert_eq!(PROMPT, "(qemu) ");
    }

    #[test]
    fn info_registers_and_lapic_park_a_running_vm_without_stopping_it() {
        let f = fake();
        let mut rx = f.events.subscribe();
        let m = &f.control;
        let one = execute("info registers", m);
        assert!(one.starts_with("RAX="), "{one}");
        assert!(one.contains("RIP=0000000000001000 "), "{one}");
        assert!(!one.contains("CPU#"));
        let on_1 = execute_on("info registers", m, 1);
        assert!(on_1.contains("RIP=0000000000001001 "), "{on_1}");
        assert_eq!(execute("info registers 1", m), on_1);
        let all = execute("info registers -a", m);
        assert!(all.starts_with("\r\nCPU#0\r\nRAX="), "{all}");
        assert!(all.contains("\r\nCPU#1\r\nRAX="), "{all}");
        let lapic = execute("info lapic", m);
        assert!(lapic.starts_with("dumping local APIC state for CPU 0 "));
        // 1,000,000 cycles at 1 GHz.
        assert!(lapic.contains("due in 1000 us"), "{lapic}");
        assert!(execute("info lapic 1", m).contains("for CPU 1 "));
        // Each look parks the vCPUs and lets them go again, with no
        // STOP/RESUME and the guest's clock left alone (no pause).
        assert_eq!(f.vcpus.parks.load(Ordering::SeqCst), 6);
        assert_eq!(f.vcpus.resumes.load(Ordering::SeqCst), 6);
        assert_eq!(f.vcpus.pauses.load(Ordering::SeqCst), 0);
        assert!(names(&mut rx).is_empty());
        assert_eq!(execute("info status", m), "VM status: running\r\n");
        // A stopped VM is looked at as it is.
        execute("stop", m);
        assert!(execute("info lapic", m).contains("TSC deadline"));
        assert_eq!(f.vcpus.parks.load(Ordering::SeqCst), 6);
        assert_eq!(execute("info status", m), "VM status: paused\r\n");
    }

    #[test]
    fn info_registers_and_lapic_name_a_bad_vcpu() {
        let f = fake();
        let m = &f.control;
        assert_eq!(
            execute("info registers 2", m),
            "invalid vCPU '2': expected -a or a number from 0 to 1\r\n"
        );
        assert_eq!(
            execute("info lapic -a", m),
            "invalid vCPU '-a': expected a number from 0 to 1\r\n"
        );
        assert_eq!(f.vcpus.parks.load(Ordering::SeqCst), 0);
        assert!(execute("info", m).contains("info lapic [apic-id]  -- show the local APIC"));
        m.quit();
        assert_eq!(
            execute("info registers", m),
            "Error: the VM has shut down\r\n"
        );
    }

    #[test]
    fn status_stop_cont() {
        let f = fake();
        let mut rx = f.events.subscribe();
        let m = &f.control;
        assert_eq!(execute("info status", m), "VM status: running\r\n");
        assert_eq!(execute("stop", m), "");
        assert_eq!(execute("  info   status  ", m), "VM status: paused\r\n");
        assert_eq!(execute("c", m), "");
        assert_eq!(execute("info status", m), "VM status: running\r\n");
        assert_eq!(names(&mut rx), ["STOP", "RESUME"]);
        assert_eq!(
            execute("stop now", m),
            "stop: extraneous characters at the end of line\r\n"
        );
        assert_eq!(m.run_state(), RunState::Running);
    }

    #[test]
    fn powerdown_and_quit() {
        let f = fake();
        let mut rx = f.events.subscribe();
        assert_eq!(execute("system_powerdown", &f.control), "");
        assert_eq!(execute("quit", &f.control), "");
        assert_eq!(names(&mut rx), ["POWERDOWN", "SHUTDOWN"]);
        assert_eq!(*f.exits.lock().unwrap(), vec![ExitReason::Quit]);
        assert_eq!(
            execute("info status", &f.control),
            "VM status: paused (shutdown)\r\n"
        );
        assert_eq!(
            execute("cont", &f.control),
            "Error: Resetting the Virtual Machine is required\r\n"
        );
    }

    #[test]
    fn unknown_and_unavailable_commands() {
        let f = fake();
        let m = &f.control;
        assert_eq!(
            execute("frobnicate", m),
            "unknown command: 'frobnicate'\r\n"
        );
        assert_eq!(execute("info frob", m), "unknown command: 'info frob'\r\n");
        assert_eq!(execute("", m), "");
        assert_eq!(execute("   ", m), "");
        assert_eq!(
            execute("screendump /tmp/shot.ppm", m),
            "Error: There is no console to take a screendump from\r\n"
        );
        assert_eq!(
            execute("screendump", m),
            "screendump: filename expected\r\n"
        );
        assert!(execute("sendkey ctrl-alt-delete", m).starts_with("Error: "));
        assert_eq!(execute("sendkey", m), "sendkey: string expected\r\n");
        assert_eq!(execute("set_link virtio-net-pci.1 off", m), "");
        assert_eq!(execute("set_link net0 on", m), "");
        assert_eq!(
            execute("set_link virtio-net-pci.2 off", m),
            "Error: Device 'virtio-net-pci.2' not found\r\n"
        );
        assert_eq!(
            execute("set_link virtio-net-pci.1 maybe", m),
            "Expected 'on' or 'off'\r\n"
        );
        assert_eq!(execute("set_link", m), "set_link: string expected\r\n");
        assert_eq!(*f.links.lock().unwrap(), vec![false, true]);
    }

    #[test]
    fn info_and_help() {
        let f = fake();
        let m = &f.control;
        assert_eq!(execute("info kvm", m), "kvm support: enabled\r\n");
        assert_eq!(execute("info name", m), "node1\r\n");
        assert!(execute("info version", m).starts_with("7.2.0 (skiff-vmm "));
        assert!(execute("info", m).contains("info status"));
        let help = execute("help", m);
        assert!(help.contains("system_powerdown  -- ") || help.contains("system_powerdown -- "));
        assert_eq!(execute("help stop", m), "stop|s -- stop emulation\r\n");
        assert!(help.lines().all(|l| !l.is_empty()));
    }

    #[test]
    fn screendump_and_sendkey_with_devices() {
        let (f, keyboard, _) = super::super::testing::fake_with_display();
        let m = &f.control;
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let p = dir.as_path().join("shot.png");
        assert_eq!(
            execute(&format!("screendump {} -f png", p.display()), m),
            ""
        );
        assert_eq!(&std::fs::read(&p).unwrap()[1..4], b"PNG");
        let p = dir.as_path().join("shot.ppm");
        assert_eq!(execute(&format!("screendump {}", p.display()), m), "");
        assert!(std::fs::read(&p).unwrap().starts_with(b"P6\n2 1\n"));
        assert_eq!(
            execute(&format!("screendump {} -f gif", p.display()), m),
            "Error: Parameter 'format' does not accept value 'gif'\r\n"
        );
        assert_eq!(execute("sendkey ctrl-alt-delete 0", m), "");
        assert_eq!(execute("sendkey shift-0x0C", m), "");
        assert_eq!(execute("sendkey nokey", m), "invalid parameter: nokey\r\n");
        assert_eq!(execute("sendkey ret soon", m), "'soon' is not a number\r\n");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // 3 + 2 keys, pressed and released, each event with its SYN.
        while keyboard.pending() < 20 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
