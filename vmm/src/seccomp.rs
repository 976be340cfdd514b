//! Seccomp filters: one allow-list per kind of thread.
//!
//! skiff-vmm runs code nobody trusts (the guest) and parses what it writes,
//! so each of its threads may make only the system calls its own work
//! needs. [`init`] compiles every list (seccompiler) and installs the
//! SIGSYS handler on the main thread before any other thread starts; each
//! thread then calls [`enter`] first thing, before it touches the guest,
//! and the main thread last, once every other thread runs.
//!
//! What a forbidden call does depends on [`SeccompMode`]: `kill` (the
//! default) traps it, and the handler writes one log line naming the
//! thread and the call and ends the process with status 5 at once; `log`
//! lets it through and the kernel records it (`dmesg`: `audit: type=1326
//! ... comm="vcpu0" ... syscall=N`); `off` installs nothing.
//!
//! The lists were built from the code and checked by running the whole VM
//! test suite with `--seccomp log` (boot, restore, migrate, screendump,
//! keyboard, every device, the hostile guest), collecting what the
//! kernel recorded. Nothing may start a program, open a file it was not
//! given (bar the main and monitor threads, which write snapshots and
//! screenshots and read /proc), or create threads (bar the monitor thread,
//! which starts the keyboard's).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use thiserror::Error;

use crate::exit::ExitStatus;

/// `--seccomp`: what a thread's forbidden system call does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// No filter.
    Off,
    /// Allowed, and recorded by the kernel's audit log.
    Log,
    /// The VM ends with status 5 and a log line naming the call.
    #[default]
    Kill,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            "kill" => Ok(SeccompMode::Kill),
            _ => Err(format!("'{s}': expected off, log or kill")),
        }
    }
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SeccompMode::Off => "off",
            SeccompMode::Log => "log",
            SeccompMode::Kill => "kill",
        })
    }
}

/// The kinds of skiff-vmm's threads, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// Builds the VM, then waits for its end and tears it down.
    Main,
    /// Runs one vCPU; device register accesses and queue notifications
    /// that come back to it run device code here too.
    Vcpu,
    /// The device event loop: queues, backends, timers, signals.
    Devices,
    /// QMP and HMP clients (tokio), snapshots, screenshots.
    Monitors,
    /// Plays key events with their hold times (started by a monitor
    /// command, so it runs under the monitor's filter as well).
    Keyboard,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Devices,
        ThreadKind::Monitors,
        ThreadKind::Keyboard,
    ];

    /// The system calls this kind of thread may make.
    pub fn allowed(self) -> Vec<i64> {
        let mut calls = BASE.to_vec();
        match self {
            ThreadKind::Main => calls.extend_from_slice(MAIN),
            ThreadKind::Vcpu => {
                calls.extend_from_slice(FILE_IO);
                calls.extend_from_slice(SOCKET_IO);
                calls.extend_from_slice(DEVICE_WORK);
            }
            ThreadKind::Devices => {
                calls.extend_from_slice(FILE_IO);
                calls.extend_from_slice(SOCKET_IO);
                calls.extend_from_slice(DEVICE_WORK);
                calls.extend_from_slice(EVENT_LOOP);
            }
            ThreadKind::Monitors => {
                calls.extend_from_slice(FILE_IO);
                calls.extend_from_slice(SOCKET_IO);
                calls.extend_from_slice(EVENT_LOOP);
                calls.extend_from_slice(MONITORS);
            }
            ThreadKind::Keyboard => {}
        }
        calls.sort_unstable();
        calls.dedup();
        calls
    }
}

/// Every thread: memory, locks, signals, time, reading and writing the
/// descriptors it holds, and leaving.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_ioctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Reading, writing and syncing files at an offset (disk images, snapshot
/// files).
const FILE_IO: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
];

/// Talking on a connected socket.
const SOCKET_IO: &[i64] = &[
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_getsockopt,
];

/// Device code, on the vCPU threads and the device thread, beyond file and
/// socket I/O: vectored disk I/O, the network and console sockets'
/// reconnection, timers.
const DEVICE_WORK: &[i64] = &[
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_epoll_ctl,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// An epoll loop (the device thread's event manager, tokio).
const EVENT_LOOP: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_ctl,
];

/// The monitor thread, beyond file and socket I/O: accepting clients,
/// snapshots (`migrate`: a directory of files written, synced and renamed
/// into place; overlay layers), screenshots, and the keyboard's thread.
const MONITORS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_openat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_getdents64,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_timerfd_settime,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_seccomp,
    libc::SYS_sched_getaffinity,
];

/// The main thread once the VM runs: the end (the serial output replayed,
/// the threads' CPU times read from /proc, sockets and files removed).
const MAIN: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_getdents64,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
];

/// Why the filters could not be set up.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// A list did not compile (a bug in the lists).
    #[error("cannot compile the {thread:?} thread's seccomp filter: {source}")]
    Compile {
        /// The thread kind.
        thread: ThreadKind,
        /// seccompiler's error.
        source: seccompiler::BackendError,
    },
    /// The kernel refused a filter.
    #[error("cannot install the seccomp filter of thread {thread}: {source}")]
    Install {
        /// The thread's name.
        thread: String,
        /// seccompiler's error.
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    /// [`init`] ran twice with different modes.
    #[error("seccomp is already set up in {0} mode")]
    AlreadySet(SeccompMode),
}

/// The compiled filters, set once per process by [`init`].
struct Filters {
    mode: SeccompMode,
    programs: BTreeMap<ThreadKind, BpfProgram>,
    /// The VM's name, for the SIGSYS handler's log line.
    vm_name: String,
    /// A debug build's `SKIFF_SECCOMP_PROBE`: the thread that makes one
    /// forbidden call right after installing its filter.
    probe: Option<String>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

thread_local! {
    /// This thread's name as the handler prints it (the handler may not
    /// allocate or take locks).
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// The call a probe makes: harmless when let through, in no list.
const PROBE_CALL: i64 = libc::SYS_getppid;

/// The filter `kind`'s threads get in `mode` (none when off).
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Kill => SeccompAction::Trap,
    };
    let rules = kind.allowed().into_iter().map(|nr| (nr, vec![])).collect();
    let compile = |e| SeccompError::Compile {
        thread: kind,
        source: e,
    };
    let filter =
        SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch()).map_err(compile)?;
    filter.try_into().map(Some).map_err(compile)
}

fn arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    {
        TargetArch::x86_64
    }
    #[cfg(target_arch = "aarch64")]
    {
        TargetArch::aarch64
    }
}

/// Makes every thread allocate from glibc's main arena. By default glibc
/// gives each thread a heap of its own, and the first time it gives memory
/// of such a heap back it reads `/proc/sys/vm/overcommit_memory` (openat),
/// which the device and vCPU threads' filters forbid: a device thread that
/// freed a large buffer ended the VM with status 5. The main arena grows
/// and shrinks with brk instead. Call first thing in `main`, before any
/// thread starts (a thread that allocated before keeps its own heap).
pub fn one_allocator_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tunable of glibc's allocator, which
    // takes its own lock; a failure (status 0) leaves the default.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Compiles every thread's filter and, in kill mode, installs the SIGSYS
/// handler. Call once, on the main thread, before any of the VM's threads
/// start. `vm_name` goes into the handler's log line.
pub fn init(mode: SeccompMode, vm_name: &str) -> Result<(), SeccompError> {
    if let Some(f) = FILTERS.get() {
        return if f.mode == mode {
            Ok(())
        } else {
            Err(SeccompError::AlreadySet(f.mode))
        };
    }
    let mut programs = BTreeMap::new();
    for kind in ThreadKind::ALL {
        if let Some(p) = program(kind, mode)? {
            programs.insert(kind, p);
        }
    }
    if mode == SeccompMode::Kill {
        install_handler()?;
    }
    let probe = if cfg!(debug_assertions) {
        std::env::var("SKIFF_SECCOMP_PROBE").ok()
    } else {
        None
    };
    let _ = FILTERS.set(Filters {
        mode,
        programs,
        vm_name: vm_name.to_owned(),
        probe,
    });
    Ok(())
}

/// Installs `kind`'s filter on the calling thread (nothing when [`init`]
/// did not run or the mode is off). Filters stack: a thread this one
/// starts later runs under this filter and its own.
pub fn enter(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    let Some(program) = filters.programs.get(&kind) else {
        return Ok(());
    };
    let current = std::thread::current();
    let name = current.name().unwrap_or("unnamed").to_owned();
    let mut saved = [0u8; 16];
    let n = name.len().min(saved.len());
    saved[..n].copy_from_slice(&name.as_bytes()[..n]);
    THREAD_NAME.with(|t| t.set(saved));
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
        thread: name.clone(),
        source,
    })?;
    log::debug!(
        "seccomp filter ({} mode) installed on thread {name}",
        filters.mode
    );
    if filters.probe.as_deref() == Some(name.as_str()) {
        log::warn!("SKIFF_SECCOMP_PROBE: thread {name} makes a forbidden system call");
        // SAFETY: getppid takes no arguments and cannot fail.
        unsafe { libc::syscall(PROBE_CALL) };
    }
    Ok(())
}

/// [`enter`], and on failure a log line and the process's end with status
/// 5: a thread that cannot be confined must not go on to serve the guest.
pub fn enter_or_end(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        log::error!("{e}; ending the VM");
        std::process::exit(ExitStatus::Crash.code());
    }
}

/// The name of system call `nr` on this architecture ("?" if unknown).
pub fn syscall_name(nr: i64) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(|i| SYSCALL_NAMES.split(' ').nth(i))
        .filter(|n| *n != "-")
        .unwrap_or("?")
}

fn install_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action.sa_mask` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialized and its handler is an
    // `extern "C"` function with the SA_SIGINFO signature that only makes
    // async-signal-safe calls (clock_gettime, write, _exit).
    let ret = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The start of the kernel's siginfo for SIGSYS (`_sigsys` in
/// <asm-generic/siginfo.h>): the call's address, number and audit arch.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A fixed buffer to format into without allocating (a signal handler
/// may not); what does not fit is cut.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler,
    // and for SIGSYS its layout starts as `SigsysInfo`.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let thread = THREAD_NAME.with(|t| t.get());
    let len = thread.iter().position(|b| *b == 0).unwrap_or(thread.len());
    let thread = std::str::from_utf8(&thread[..len]).unwrap_or("?");
    let vm = FILTERS.get().map_or("vm", |f| f.vm_name.as_str());
    let status = ExitStatus::Crash.code();
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    let _ = write!(line, "[");
    write_utc_now(&mut line);
    let _ = writeln!(
        line,
        " ERROR skiff-vmm {vm}] seccomp: thread {thread} made system call {nr} ({}), which its filter forbids; the VM ends with status {status}",
        syscall_name(i64::from(nr))
    );
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is
    // valid for `line.len` bytes.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(status);
    }
}

/// The time now as env_logger writes it (`2026-12-04T06:12:02.123Z`),
/// with clock_gettime only.
fn write_utc_now(line: &mut Line) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    let _ = write!(line, "{}", Utc::from_unix(ts.tv_sec, ts.tv_nsec));
}

/// A UTC time of day and civil date.
struct Utc {
    date: (i64, u32, u32),
    secs_of_day: i64,
    millis: i64,
}

impl Utc {
    fn from_unix(secs: i64, nanos: i64) -> Utc {
        let days = secs.div_euclid(86_400);
        // Civil from days (H. Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Utc {
            date: (year, month, day),
            secs_of_day: secs.rem_euclid(86_400),
            millis: nanos / 1_000_000,
        }
    }
}

impl std::fmt::Display for Utc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (y, m, d) = self.date;
        let s = self.secs_of_day;
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            s / 3600,
            s / 60 % 60,
            s % 60,
            self.millis
        )
    }
}

/// x86-64 system call names by number, from Linux's asm/unistd_64.h ("-"
/// where no call has the number).
#[cfg(target_arch = "x86_64")]
const SYSCALL_NAMES: &str =
    "read write open close stat fstat lstat poll lseek mmap mprotect munmap brk rt_sigaction \
     rt_sigprocmask rt_sigreturn ioctl pread64 pwrite64 readv writev access pipe select \
     sched_yield mremap msync mincore madvise shmget shmat shmctl dup dup2 pause nanosleep \
     getitimer alarm setitimer getpid sendfile socket connect accept sendto recvfrom sendmsg \
     recvmsg shutdown bind listen getsockname getpeername socketpair setsockopt getsockopt \
     clone fork vfork execve exit wait4 kill uname semget semop semctl shmdt msgget msgsnd \
     msgrcv msgctl fcntl flock fsync fdatasync truncate ftruncate getdents getcwd chdir \
     fchdir rename mkdir rmdir creat link unlink symlink readlink chmod fchmod chown fchown \
     lchown umask gettimeofday getrlimit getrusage sysinfo times ptrace getuid syslog getgid \
     setuid setgid geteuid getegid setpgid getppid getpgrp setsid setreuid setregid \
     getgroups setgroups setresuid getresuid setresgid getresgid getpgid setfsuid setfsgid \
     getsid capget capset rt_sigpending rt_sigtimedwait rt_sigqueueinfo rt_sigsuspend \
     sigaltstack utime mknod uselib personality ustat statfs fstatfs sysfs getpriority \
     setpriority sched_setparam sched_getparam sched_setscheduler sched_getscheduler \
     sched_get_priority_max sched_get_priority_min sched_rr_get_interval mlock munlock \
     mlockall munlockall vhangup modify_ldt pivot_root _sysctl prctl arch_prctl adjtimex \
     setrlimit chroot sync acct settimeofday mount umount2 swapon swapoff reboot sethostname \
     setdomainname iopl ioperm create_module init_module delete_module get_kernel_syms \
     query_module quotactl nfsservctl getpmsg putpmsg afs_syscall tuxcall security gettid \
     readahead setxattr lsetxattr fsetxattr getxattr lgetxattr fgetxattr listxattr \
     llistxattr flistxattr removexattr lremovexattr fremovexattr tkill time futex \
     sched_setaffinity sched_getaffinity set_thread_area io_setup io_destroy io_getevents \
     io_submit io_cancel get_thread_area lookup_dcookie epoll_create epoll_ctl_old \
     epoll_wait_old remap_file_pages getdents64 set_tid_address restart_syscall semtimedop \
     fadvise64 timer_create timer_settime timer_gettime timer_getoverrun timer_delete \
     clock_settime clock_gettime clock_getres clock_nanosleep exit_group epoll_wait \
     epoll_ctl tgkill utimes vserver mbind set_mempolicy get_mempolicy mq_open mq_unlink \
     mq_timedsend mq_timedreceive mq_notify mq_getsetattr kexec_load waitid add_key \
     request_key keyctl ioprio_set ioprio_get inotify_init inotify_add_watch \
     inotify_rm_watch migrate_pages openat mkdirat mknodat fchownat futimesat newfstatat \
     unlinkat renameat linkat symlinkat readlinkat fchmodat faccessat pselect6 ppoll unshare \
     set_robust_list get_robust_list splice tee sync_file_range vmsplice move_pages \
     utimensat epoll_pwait signalfd timerfd_create eventfd fallocate timerfd_settime \
     timerfd_gettime accept4 signalfd4 eventfd2 epoll_create1 dup3 pipe2 inotify_init1 \
     preadv pwritev rt_tgsigqueueinfo perf_event_open recvmmsg fanotify_init fanotify_mark \
     prlimit64 name_to_handle_at open_by_handle_at clock_adjtime syncfs sendmmsg setns \
     getcpu process_vm_readv process_vm_writev kcmp finit_module sched_setattr sched_getattr \
     renameat2 seccomp getrandom memfd_create kexec_file_load bpf execveat userfaultfd \
     membarrier mlock2 copy_file_range preadv2 pwritev2 pkey_mprotect pkey_alloc pkey_free \
     statx io_pgetevents rseq - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - \
     - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - \
     - - - - - - - - - - - - - - pidfd_send_signal io_uring_setup io_uring_enter \
     io_uring_register open_tree move_mount fsopen fsconfig fsmount fspick pidfd_open clone3 \
     close_range openat2 pidfd_getfd faccessat2 process_madvise epoll_pwait2 mount_setattr \
     quotactl_fd landlock_create_ruleset landlock_add_rule landlock_restrict_self \
     memfd_secret process_mrelease futex_waitv set_mempolicy_home_node";

#[cfg(not(target_arch = "x86_64"))]
const SYSCALL_NAMES: &str = "";

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the ignored test `child` of this test binary in a new process
    /// with `SKIFF_SECCOMP_CHILD=mode`; returns its status and stderr.
    fn run_child(mode: &str) -> (Option<i32>, String) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "seccomp::tests::child",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("SKIFF_SECCOMP_CHILD", mode)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    #[test]
    #[ignore = "run in a child process by the tests below"]
    fn child() {
        let mode = std::env::var("SKIFF_SECCOMP_CHILD").unwrap();
        if let Some(mode) = mode.strip_suffix("+churn") {
            return churn_child(mode.parse().unwrap());
        }
        let mode: SeccompMode = mode.parse().unwrap();
        init(mode, "unit").unwrap();
        std::thread::Builder::new()
            .name("devices".into())
            .spawn(|| {
                enter(ThreadKind::Devices).unwrap();
                // SAFETY: getppid takes no arguments.
                let ppid = unsafe { libc::syscall(PROBE_CALL) };
                println!("the forbidden call returned {ppid}");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// A device thread under its filter that allocates and frees large
    /// buffers, as a network card joining segments does.
    /// (`SKIFF_SECCOMP_CHURN_ARENAS=1` leaves glibc's per-thread heaps, to
    /// see the failure [`one_allocator_arena`] prevents.)
    fn churn_child(mode: SeccompMode) {
        if std::env::var_os("SKIFF_SECCOMP_CHURN_ARENAS").is_none() {
            one_allocator_arena();
        }
        init(mode, "unit").unwrap();
        std::thread::Builder::new()
            .name("devices".into())
            .spawn(|| {
                enter(ThreadKind::Devices).unwrap();
                for round in 0..4u8 {
                    let bufs: Vec<Vec<u8>> = (0..64).map(|i| vec![round ^ i; 100 << 10]).collect();
                    let sum: u64 = bufs.iter().map(|b| u64::from(b[b.len() - 1])).sum();
                    drop(bufs);
                    std::hint::black_box(sum);
                }
                println!("the device thread allocated and freed 25 MiB");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn a_device_thread_may_free_large_buffers_under_its_filter() {
        let (status, text) = run_child("kill+churn");
        assert_eq!(status, Some(0), "{text}");
        assert!(text.contains("allocated and freed"), "{text}");
    }

    #[test]
    fn kill_mode_ends_the_process_with_status_5_naming_the_thread_and_call() {
        let (status, text) = run_child("kill");
        assert_eq!(status, Some(5), "{text}");
        assert!(
            text.contains(
                " ERROR skiff-vmm unit] seccomp: thread devices made system call 110 (getppid), \
                 which its filter forbids; the VM ends with status 5"
            ),
            "{text}"
        );
        assert!(!text.contains("the forbidden call returned"), "{text}");
    }

    #[test]
    fn log_mode_lets_the_call_through() {
        let (status, text) = run_child("log");
        assert_eq!(status, Some(0), "{text}");
        let ppid = std::process::id();
        assert!(
            text.contains(&format!("the forbidden call returned {ppid}")),
            "{text}"
        );
    }

    #[test]
    fn off_mode_installs_no_filter() {
        for kind in ThreadKind::ALL {
            assert!(program(kind, SeccompMode::Off).unwrap().is_none());
        }
        let (status, text) = run_child("off");
        assert_eq!(status, Some(0), "{text}");
    }

    #[test]
    fn every_list_compiles_and_keeps_the_dangerous_calls_out() {
        for mode in [SeccompMode::Log, SeccompMode::Kill] {
            for kind in ThreadKind::ALL {
                assert!(program(kind, mode).unwrap().is_some(), "{kind:?}");
            }
        }
        let never = [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_mount,
            libc::SYS_setuid,
            libc::SYS_kill,
            libc::SYS_bpf,
            libc::SYS_init_module,
            libc::SYS_reboot,
            PROBE_CALL,
        ];
        for kind in ThreadKind::ALL {
            let allowed = kind.allowed();
            for nr in never {
                assert!(
                    !allowed.contains(&nr),
                    "{kind:?} allows {}",
                    syscall_name(nr)
                );
            }
            let may = |nr| allowed.contains(&nr);
            // Only the monitor thread starts threads; only it and the main
            // thread open files by name.
            let monitors = kind == ThreadKind::Monitors;
            assert_eq!(may(libc::SYS_clone3), monitors, "{kind:?}");
            assert_eq!(may(libc::SYS_clone), monitors, "{kind:?}");
            assert_eq!(
                may(libc::SYS_openat),
                monitors || kind == ThreadKind::Main,
                "{kind:?}"
            );
            // Only device code makes sockets (a backend reconnecting).
            assert_eq!(
                may(libc::SYS_socket),
                matches!(kind, ThreadKind::Vcpu | ThreadKind::Devices),
                "{kind:?}"
            );
        }
        let mut base = BASE.to_vec();
        base.sort_unstable();
        base.dedup();
        assert_eq!(ThreadKind::Keyboard.allowed(), base);
    }

    #[test]
    fn system_calls_are_named_by_number() {
        assert_eq!(syscall_name(0), "read");
        assert_eq!(syscall_name(libc::SYS_execve), "execve");
        assert_eq!(syscall_name(libc::SYS_getppid), "getppid");
        assert_eq!(syscall_name(libc::SYS_clone3), "clone3");
        assert_eq!(syscall_name(libc::SYS_futex_waitv), "futex_waitv");
        assert_eq!(syscall_name(400), "?");
        assert_eq!(syscall_name(100_000), "?");
        assert_eq!(syscall_name(-1), "?");
    }

    #[test]
    fn the_handler_writes_times_as_the_logger_does() {
        assert_eq!(Utc::from_unix(0, 0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Utc::from_unix(1_796_365_035, 508_000_000).to_string(),
            "2026-12-04T06:17:15.508Z"
        );
        assert_eq!(
            Utc::from_unix(951_825_600, 999_999_999).to_string(),
            "2000-02-29T12:00:00.999Z"
        );
        assert_eq!(
            Utc::from_unix(-1, 0).to_string(),
            "1969-12-31T23:59:59.000Z"
        );
    }

    #[test]
    fn modes_parse_and_print() {
        for mode in [SeccompMode::Off, SeccompMode::Log, SeccompMode::Kill] {
            assert_eq!(mode.to_string().parse::<SeccompMode>(), Ok(mode));
        }
        assert_eq!(
            "strict".parse::<SeccompMode>(),
            Err("'strict': expected off, log or kill".into())
        );
    }
}
