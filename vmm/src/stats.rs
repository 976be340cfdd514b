//! What a VM cost: how often its vCPUs left KVM_RUN for skiff-vmm, by kind,
//! and the CPU time of skiff-vmm's threads, with the share the vCPU threads
//! spent running the guest itself. Logged when the VM ends, so that a
//! benchmark can tell the guest's own work from the VMM's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Exits to userspace, counted by the vCPU threads.
#[derive(Debug, Default)]
pub struct ExitCounts {
    /// Port reads (KVM_EXIT_IO, in).
    pub port_reads: AtomicU64,
    /// Port writes (KVM_EXIT_IO, out).
    pub port_writes: AtomicU64,
    /// MMIO reads.
    pub mmio_reads: AtomicU64,
    /// MMIO writes.
    pub mmio_writes: AtomicU64,
    /// Everything else (signals, system events ...).
    pub other: AtomicU64,
}

impl ExitCounts {
    /// Counts one exit.
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// One line: the total, then each kind.
    pub fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let kinds = [
            ("port reads", get(&self.port_reads)),
            ("port writes", get(&self.port_writes)),
            ("MMIO reads", get(&self.mmio_reads)),
            ("MMIO writes", get(&self.mmio_writes)),
            ("other", get(&self.other)),
        ];
        let total: u64 = kinds.iter().map(|(_, n)| n).sum();
        let parts: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
        format!("{total} ({})", parts.join(", "))
    }
}

/// CPU time of one thread.
#[derive(Debug, Clone, PartialEq)]
pub struct ThreadTime {
    /// The thread's name (`vcpu0`, `devices` ...).
    pub name: String,
    /// User time, which for a vCPU thread includes the guest's.
    pub user: Duration,
    /// System time.
    pub system: Duration,
    /// Time spent running the guest (vCPU threads only).
    pub guest: Duration,
}

/// Parses `/proc/<pid>/task/<tid>/stat`; `tick` is the length of a clock
/// tick. None if the text does not have the expected shape.
pub fn parse_stat(text: &str, tick: Duration) -> Option<ThreadTime> {
    // The name is in parentheses and may itself hold spaces and ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_owned();
    // Fields after the name, numbered from 3 (state) as in proc(5).
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| -> Option<Duration> {
        let ticks: u32 = fields.get(n - 3)?.parse().ok()?;
        Some(tick * ticks)
    };
    Some(ThreadTime {
        name,
        user: field(14)?,
        system: field(15)?,
        guest: field(43)?,
    })
}

/// The length of the clock tick that /proc counts CPU time in.
pub fn clock_tick() -> Duration {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Duration::from_secs(1) / u32::try_from(hz).unwrap_or(100).max(1)
}

/// The CPU time of every thread of this process (threads that have
/// already ended are not listed).
pub fn thread_times() -> std::io::Result<Vec<ThreadTime>> {
    let tick = clock_tick();
    let mut times = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let path = entry?.path().join("stat");
        // A thread may end between the listing and the read.
        if let Ok(text) = std::fs::read_to_string(&path) {
            times.extend(parse_stat(&text, tick));
        }
    }
    times.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(times)
}

/// One line: the guest's share of the vCPU threads, then each thread's
/// user+system time.
pub fn summary(times: &[ThreadTime]) -> String {
    let secs = |d: Duration| format!("{:.2}s", d.as_secs_f64());
    let guest: Duration = times.iter().map(|t| t.guest).sum();
    let total: Duration = times.iter().map(|t| t.user + t.system).sum();
    let parts: Vec<String> = times
        .iter()
        .map(|t| format!("{} {}", t.name, secs(t.user + t.system)))
        .collect();
    format!(
        "{} in all, {} of it running the guest ({})",
        secs(total),
        secs(guest.min(total)),
        parts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(10);

    fn stat_line(name: &str, utime: u32, stime: u32, gtime: u32) -> String {
        // pid (comm) state, then fields 4..=52 with utime at 14, stime at
        // 15 and guest_time at 43.
        let mut fields: Vec<String> = (4..=52).map(|n| (n * 1000).to_string()).collect();
        fields[14 - 4] = utime.to_string();
        fields[15 - 4] = stime.to_string();
        fields[43 - 4] = gtime.to_string();
        format!("4242 ({name}) S {}\n", fields.join(" "))
    }

    #[test]
    fn a_stat_line_gives_user_system_and_guest_time() {
        let t = parse_stat(&stat_line("vcpu0", 250, 30, 200), TICK).unwrap();
        assert_eq!(t.name, "vcpu0");
        assert_eq!(t.user, Duration::from_millis(2500));
        assert_eq!(t.system, Duration::from_millis(300));
        assert_eq!(t.guest, Duration::from_millis(2000));
    }

    #[test]
    fn a_name_with_spaces_and_parentheses_is_kept_whole() {
        let t = parse_stat(&stat_line("odd) (name", 1, 2, 0), TICK).unwrap();
        assert_eq!(t.name, "odd) (name");
        assert_eq!(t.system, Duration::from_millis(20));
    }

    #[test]
    fn short_or_garbled_lines_are_refused() {
        assert_eq!(parse_stat("", TICK), None);
        assert_eq!(parse_stat("1 (x) S 1 2 3", TICK), None);
        assert_eq!(
            parse_stat(&stat_line("x", 1, 2, 3).replace("(x)", "x"), TICK),
            None
        );
        let bad = stat_line("x", 1, 2, 3).replace(" 2 ", " -2 ");
        assert_eq!(parse_stat(&bad, TICK), None);
    }

    #[test]
    fn this_process_lists_its_own_threads() {
        let times = thread_times().unwrap();
        assert!(!times.is_empty());
        assert!(times.iter().all(|t| !t.name.is_empty()));
    }

    #[test]
    fn summaries_name_each_thread_and_kind() {
        let times = vec![
            ThreadTime {
                name: "devices".into(),
                user: Duration::from_millis(100),
                system: Duration::from_millis(200),
                guest: Duration::ZERO,
            },
            ThreadTime {
                name: "vcpu0".into(),
                user: Duration::from_millis(9000),
                system: Duration::from_millis(1000),
                guest: Duration::from_millis(8500),
            },
        ];
        assert_eq!(
            summary(&times),
            "10.30s in all, 8.50s of it running the guest (devices 0.30s, vcpu0 10.00s)"
        );
        let exits = ExitCounts::default();
        ExitCounts::count(&exits.port_reads);
        ExitCounts::count(&exits.port_reads);
        ExitCounts::count(&exits.mmio_writes);
        assert_eq!(
            exits.summary(),
            "3 (port reads 2, port writes 0, MMIO reads 0, MMIO writes 1, other 0)"
        );
    }
}
