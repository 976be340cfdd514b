//! Parking and resuming vCPU threads, as Firecracker does it: the
//! controller sets `immediate_exit` in the vCPU's `kvm_run` (through a
//! mapping of its own) and sends the thread a real-time signal, so
//! `KVM_RUN` returns at once wherever the thread is; the thread then parks
//! on a condition variable until it is resumed.
//!
//! Ordering that makes this race free: a vCPU thread clears
//! `immediate_exit` *before* it looks at the pause flag, and the
//! controller raises the flag *before* it sets `immediate_exit`. Either
//! the thread sees the flag, or its next `KVM_RUN` sees `immediate_exit`.
//!
//! While paused, the guest's kvmclock is frozen as QEMU freezes it
//! (KVM_GET_CLOCK on stop, KVM_SET_CLOCK on resume), and each vCPU tells
//! the guest it was stopped by the host (KVM_KVMCLOCK_CTRL), which keeps
//! the guest's soft-lockup watchdog quiet.

use std::any::Any;
use std::os::fd::RawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kvm_bindings::{kvm_clock_data, kvm_run};
use kvm_ioctls::{VcpuFd, VmFd};
use log::debug;

use super::dump::{self, CpuDump};
use crate::snapshot::{self, vcpu::VcpuState, SnapshotError};
use crate::sync::lock;

/// Parks and resumes the vCPU threads.
pub trait VcpuPause: Send + Sync {
    /// Kicks every vCPU out of the guest and returns once all are parked.
    fn pause(&self);
    /// Lets the parked vCPUs run again.
    fn resume(&self);
    /// Host thread id of each vCPU.
    fn thread_ids(&self) -> Vec<i64>;
    /// Kicks every vCPU out of the guest and returns once all are parked,
    /// leaving the guest's clock running: a look at their state, not a
    /// stop. [`VcpuPause::resume`] lets them run again.
    fn park(&self);
    /// The registers and local APIC of every vCPU, which must be parked
    /// ([`VcpuPause::pause`] or [`VcpuPause::park`]).
    fn dump(&self) -> Result<Vec<CpuDump>, String>;
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal only has to interrupt KVM_RUN.
}

/// Installs the (empty) handler for [`kick_signal`]; without a handler
/// the signal would end the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// A second mapping of a vCPU's `kvm_run` page, for the controller.
pub struct RunMapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is only accessed through `set_immediate_exit`, a
// volatile byte store into memory the kernel shares with the vCPU thread;
// the pointer stays valid until `drop` unmaps it.
unsafe impl Send for RunMapping {}
// SAFETY: as above; concurrent byte stores of the same value are benign.
unsafe impl Sync for RunMapping {}

impl RunMapping {
    /// Maps the `kvm_run` area of the vCPU file descriptor `fd`
    /// (`mmap_size` from KVM_GET_VCPU_MMAP_SIZE).
    pub fn new(fd: RawFd, mmap_size: usize) -> std::io::Result<Self> {
        if mmap_size < std::mem::size_of::<kvm_run>() {
            return Err(std::io::Error::other("KVM's vCPU mmap size is too small"));
        }
        // SAFETY: a fresh shared mapping of a KVM vCPU fd, checked for
        // failure; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mmap_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RunMapping {
            addr,
            len: mmap_size,
        })
    }

    fn set_immediate_exit(&self) {
        let offset = std::mem::offset_of!(kvm_run, immediate_exit);
        // SAFETY: `addr` maps at least size_of::<kvm_run>() bytes (checked
        // in `new`), so the byte at `offset` is inside the mapping.
        unsafe {
            std::ptr::write_volatile(self.addr.cast::<u8>().add(offset), 1);
        }
    }
}

impl Drop for RunMapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly what mmap returned and nothing
        // uses the mapping after this.
        unsafe {
            libc::munmap(self.addr, self.len);
        }
    }
}

struct Kick {
    thread: libc::pthread_t,
    run: RunMapping,
}

#[derive(Default)]
struct Shared {
    /// A pause is requested (or in force).
    pause: bool,
    /// Work for the parked vCPU threads (a snapshot's save, a dump).
    job: Option<JobRequest>,
    /// vCPU threads waiting in `checkpoint`.
    parked: usize,
    /// vCPU threads still running guest code (not ended).
    alive: usize,
    /// Host thread id of each vCPU.
    tids: Vec<i64>,
}

/// What each parked vCPU thread runs on its own `VcpuFd` (a `VcpuFd`
/// belongs to its thread), given its index.
type Job = Arc<dyn Fn(&mut VcpuFd, usize) -> Box<dyn Any + Send> + Send + Sync>;

/// A request to the parked vCPU threads: each runs the job and puts what
/// it returns into its slot.
struct JobRequest {
    job: Job,
    results: Vec<Option<Box<dyn Any + Send>>>,
}

/// Pause/resume control over all vCPU threads of a VM.
pub struct VcpuManager {
    shared: Mutex<Shared>,
    cond: Condvar,
    kicks: Mutex<Vec<Kick>>,
    vm: Arc<VmFd>,
    clock: Mutex<Option<kvm_clock_data>>,
}

impl VcpuManager {
    /// Control over `count` vCPUs of `vm`, none registered yet.
    pub fn new(vm: Arc<VmFd>, count: usize) -> Self {
        VcpuManager {
            shared: Mutex::new(Shared {
                alive: count,
                tids: vec![0; count],
                ..Shared::default()
            }),
            cond: Condvar::new(),
            kicks: Mutex::new(Vec::with_capacity(count)),
            vm,
            clock: Mutex::new(None),
        }
    }

    /// The guest clock as it stood when the vCPUs were paused (what
    /// resuming sets it back to), if they are.
    pub fn paused_clock(&self) -> Option<u64> {
        lock(&self.clock).as_ref().map(|c| c.clock)
    }

    /// Has the vCPUs park before they first enter the guest (`-S`), as
    /// if paused; [`VcpuPause::resume`] lets them run.
    pub fn start_paused(&self) {
        lock(&self.shared).pause = true;
    }

    /// Records a vCPU thread (its pthread and a mapping of its `kvm_run`),
    /// so that [`VcpuPause::pause`] can kick it.
    pub fn register(&self, thread: libc::pthread_t, run: RunMapping) {
        lock(&self.kicks).push(Kick { thread, run });
    }

    /// Called by vCPU thread `index` when it starts.
    pub fn started(&self, index: usize) {
        // SAFETY: gettid has no preconditions.
        let tid = i64::from(unsafe { libc::gettid() });
        if let Some(t) = lock(&self.shared).tids.get_mut(index) {
            *t = tid;
        }
    }

    /// Called by vCPU thread `index` after every return from `KVM_RUN`:
    /// clears `immediate_exit`, then parks while a pause is requested,
    /// saving its state when a snapshot asks for it.
    pub fn checkpoint(&self, index: usize, vcpu: &mut VcpuFd) {
        vcpu.set_kvm_immediate_exit(0);
        fence(Ordering::SeqCst);
        let mut shared = lock(&self.shared);
        if !shared.pause {
            return;
        }
        if let Err(e) = vcpu.kvmclock_ctrl() {
            // EINVAL until the guest has set up kvmclock.
            debug!("KVM_KVMCLOCK_CTRL: {e}");
        }
        shared.parked += 1;
        self.cond.notify_all();
        while shared.pause {
            if let Some(req) = shared.job.as_mut() {
                if let Some(slot @ None) = req.results.get_mut(index) {
                    *slot = Some((req.job)(vcpu, index));
                    self.cond.notify_all();
                    continue;
                }
            }
            shared = self
                .cond
                .wait(shared)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        shared.parked -= 1;
    }

    /// The state of every vCPU, which must all be parked (after
    /// [`VcpuPause::pause`]); `msrs` are the MSRs to save. Each vCPU
    /// thread reads its own, once the access it last exited for is done.
    pub fn save_vcpus(&self, msrs: Vec<u32>) -> Result<Vec<VcpuState>, SnapshotError> {
        let msrs = Arc::new(msrs);
        self.on_parked(move |vcpu, index| {
            snapshot::vcpu::complete_pending_io(vcpu);
            snapshot::vcpu::save(vcpu, index, &msrs)
        })?
        .into_iter()
        .collect()
    }

    /// Runs `job` on every parked vCPU's own thread and returns what each
    /// returned, in vCPU order.
    fn on_parked<T: Send + 'static>(
        &self,
        job: impl Fn(&mut VcpuFd, usize) -> T + Send + Sync + 'static,
    ) -> Result<Vec<T>, SnapshotError> {
        let mut shared = lock(&self.shared);
        if !shared.pause {
            return Err(SnapshotError::Invalid("the vCPUs are not paused".into()));
        }
        // vCPUs started paused (-S) may not have reached their first
        // checkpoint yet.
        while shared.parked < shared.alive {
            shared = self
                .cond
                .wait(shared)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if shared.alive < shared.tids.len() {
            return Err(SnapshotError::Invalid(
                "a vCPU has stopped for good: the VM is ending".into(),
            ));
        }
        let count = shared.tids.len();
        shared.job = Some(JobRequest {
            job: Arc::new(move |vcpu, index| Box::new(job(vcpu, index)) as Box<dyn Any + Send>),
            results: (0..count).map(|_| None).collect(),
        });
        self.cond.notify_all();
        loop {
            let done = shared
                .job
                .as_ref()
                .is_some_and(|r| r.results.iter().all(Option::is_some));
            if done {
                break;
            }
            shared = self
                .cond
                .wait(shared)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let req = shared.job.take().expect("a job is pending");
        Ok(req
            .results
            .into_iter()
            .map(|r| {
                *r.expect("every vCPU answered")
                    .downcast::<T>()
                    .expect("the job's own result type")
            })
            .collect())
    }

    /// Kicks every vCPU and waits until all are parked.
    fn kick_and_wait(&self) {
        lock(&self.shared).pause = true;
        for kick in lock(&self.kicks).iter() {
            kick.run.set_immediate_exit();
            fence(Ordering::SeqCst);
            // SAFETY: the vCPU threads never end (they park forever when
            // the VM stops), so the pthread handle stays valid; the signal
            // has a handler installed.
            let ret = unsafe { libc::pthread_kill(kick.thread, kick_signal()) };
            if ret != 0 {
                debug!("cannot kick a vCPU thread: errno {ret}");
            }
        }
        let mut shared = lock(&self.shared);
        while shared.parked < shared.alive {
            shared = self
                .cond
                .wait(shared)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Called by a vCPU thread that stops running the guest for good.
    pub fn gone(&self) {
        let mut shared = lock(&self.shared);
        shared.alive = shared.alive.saturating_sub(1);
        self.cond.notify_all();
    }
}

impl VcpuPause for VcpuManager {
    fn pause(&self) {
        self.kick_and_wait();
        match self.vm.get_clock() {
            Ok(c) => *lock(&self.clock) = Some(c),
            Err(e) => debug!("KVM_GET_CLOCK: {e}"),
        }
    }

    fn resume(&self) {
        if let Some(saved) = lock(&self.clock).take() {
            let clock = kvm_clock_data {
                clock: saved.clock,
                ..Default::default()
            };
            if let Err(e) = self.vm.set_clock(&clock) {
                debug!("KVM_SET_CLOCK: {e}");
            }
        }
        lock(&self.shared).pause = false;
        self.cond.notify_all();
    }

    fn thread_ids(&self) -> Vec<i64> {
        lock(&self.shared).tids.clone()
    }

    fn park(&self) {
        self.kick_and_wait();
    }

    fn dump(&self) -> Result<Vec<CpuDump>, String> {
        self.on_parked(|vcpu, index| dump::read(vcpu, index))
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect()
    }
}
