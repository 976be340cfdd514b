//! The device event loop: one thread (`devices`) running an event-manager
//! epoll loop. Its subscribers:
//!
//! - every virtio device (queue notifications through ioeventfds, backend
//!   sockets and files);
//! - [`SerialInput`]: the VMM's stdin into the UART's receive FIFO;
//! - [`PendingOutput`]: output that waits for a timer, namely serial
//!   output the UART holds back (an unfinished line, such as a prompt)
//!   and guest writes KVM queued in the coalesced ring that no exit
//!   followed;
//! - [`SignalSource`]: SIGTERM and SIGINT, which end the VM;
//! - [`LoopPause`]: holds the whole loop still while a snapshot is taken
//!   (no device may move a ring between its saved state and guest memory).
//!
//! The main thread thus only waits for the VM's end, and every timer of
//! the VMM is a timerfd on this loop.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use log::{debug, warn};
use skiff_devices::legacy::Serial;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::bus::Bus;
use crate::cpu::coalesced::CoalescedRing;
use crate::cpu::vcpu::replay;
use crate::exit::ExitReason;
use crate::sync::lock;

const INPUT: u32 = 0;
const RETRY: u32 = 1;
/// How long to wait before offering input again when the guest's receive
/// FIFO is full.
const FIFO_FULL_RETRY: Duration = Duration::from_millis(10);

/// Feeds bytes from an input file descriptor (the VMM's stdin) into the
/// serial port's receive FIFO, never more than it has room for.
pub struct SerialInput {
    serial: Arc<Mutex<Serial>>,
    input: std::fs::File,
    retry: TimerFd,
    pending: Vec<u8>,
}

impl SerialInput {
    /// Reads from `input` (which it takes over) into `serial`.
    pub fn new(serial: Arc<Mutex<Serial>>, input: std::fs::File) -> std::io::Result<Self> {
        Ok(SerialInput {
            serial,
            input,
            retry: TimerFd::new()?,
            pending: Vec::new(),
        })
    }

    fn input_fd(&self) -> RawFd {
        self.input.as_raw_fd()
    }

    /// Offers pending bytes to the guest; true when all were taken.
    fn flush_pending(&mut self) -> bool {
        let taken = lock(&self.serial).enqueue_input(&self.pending);
        self.pending.drain(..taken);
        self.pending.is_empty()
    }

    fn wait_for_room(&mut self, ops: &mut EventOps) {
        // Stop reading input until the guest has drained its FIFO.
        let _ = ops.remove(Events::with_data_raw(self.input_fd(), INPUT, EventSet::IN));
        if let Err(e) = self.retry.reset(FIFO_FULL_RETRY, None) {
            warn!("serial input: cannot arm retry timer: {e}");
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data_raw(self.input_fd(), INPUT, EventSet::IN)) {
            // Regular files and /dev/null cannot be polled: no input then.
            debug!("serial input: stdin cannot be polled ({e}), the guest gets no input");
            return;
        }
        if let Err(e) = ops.add(Events::with_data(&self.retry, RETRY, EventSet::IN)) {
            warn!("serial input: cannot watch retry timer: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            INPUT => {
                let mut buf = [0u8; 256];
                match self.input.read(&mut buf) {
                    Ok(0) => {
                        let _ = ops.remove(events);
                    }
                    Ok(n) => {
                        self.pending.extend_from_slice(&buf[..n]);
                        if !self.flush_pending() {
                            self.wait_for_room(ops);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        warn!("serial input: read failed, input stops: {e}");
                        let _ = ops.remove(events);
                    }
                }
            }
            RETRY => {
                let _ = self.retry.wait();
                if self.flush_pending() {
                    let _ = ops.add(Events::with_data_raw(self.input_fd(), INPUT, EventSet::IN));
                } else if let Err(e) = self.retry.reset(FIFO_FULL_RETRY, None) {
                    warn!("serial input: cannot arm retry timer: {e}");
                }
            }
            _ => {}
        }
    }
}

/// How long held serial output waits for the rest of its line, and how
/// often the coalesced ring is looked at while it holds writes.
pub const OUTPUT_INTERVAL: Duration = Duration::from_millis(20);

/// The longest KVM's coalesced write queue goes unchecked while the guest
/// is quiet.
pub const QUEUE_CHECK_MAX: Duration = Duration::from_millis(640);

const HELD: u32 = 0;
const FLUSH: u32 = 1;
const CHECK: u32 = 2;

/// Output that waits for a timer, so that no thread wakes while the guest
/// is quiet:
///
/// - the UART holds back an unfinished line; when it starts holding, the
///   vCPU thread sets `due` and writes `held` (once per flush), and the
///   held bytes go out [`OUTPUT_INTERVAL`] later unless the line ends
///   first;
/// - guest writes KVM queued in the coalesced ring reach their device on
///   the vCPU's next exit; as a safety net for writes no exit followed,
///   the ring is replayed every [`OUTPUT_INTERVAL`] while it holds some,
///   backing off to [`QUEUE_CHECK_MAX`] while it holds none.
pub struct PendingOutput {
    serial: Arc<Mutex<Serial>>,
    ring: Option<Arc<Mutex<CoalescedRing>>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    held: EventFd,
    due: Arc<AtomicBool>,
    flush: TimerFd,
    check: TimerFd,
    check_every: Duration,
}

impl PendingOutput {
    /// Flushes `serial` when `held` is written (and `due` set), and
    /// replays `ring` (if KVM coalesces serial writes) to the buses.
    pub fn new(
        serial: Arc<Mutex<Serial>>,
        ring: Option<Arc<Mutex<CoalescedRing>>>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        held: EventFd,
        due: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        Ok(PendingOutput {
            serial,
            ring,
            pio,
            mmio,
            held,
            due,
            flush: TimerFd::new()?,
            check: TimerFd::new()?,
            check_every: OUTPUT_INTERVAL,
        })
    }

    /// Replays the ring; how many writes it held.
    fn replay(&self) -> u64 {
        self.ring
            .as_ref()
            .map_or(0, |ring| replay(ring, &self.pio, &self.mmio))
    }

    fn arm(timer: &mut TimerFd, after: Duration, what: &str) {
        if let Err(e) = timer.reset(after, None) {
            warn!("cannot arm the {what} timer: {e}");
        }
    }
}

impl MutEventSubscriber for PendingOutput {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, data, what) in [
            (self.held.as_raw_fd(), HELD, "held serial output"),
            (self.flush.as_raw_fd(), FLUSH, "serial flush timer"),
            (self.check.as_raw_fd(), CHECK, "coalesced ring timer"),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                warn!("cannot watch the {what}: {e}");
            }
        }
        if self.ring.is_some() {
            Self::arm(&mut self.check, self.check_every, "coalesced ring");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            HELD => {
                let _ = self.held.read();
                if !self.flush.is_armed().unwrap_or(false) {
                    Self::arm(&mut self.flush, OUTPUT_INTERVAL, "serial flush");
                }
            }
            FLUSH => {
                let _ = self.flush.wait();
                // Cleared first: output held from here on asks again.
                self.due.store(false, Ordering::SeqCst);
                // Queued writes reach the UART before its held output goes.
                self.replay();
                if let Err(e) = lock(&self.serial).flush() {
                    debug!("serial output: {e}");
                }
            }
            CHECK => {
                let _ = self.check.wait();
                self.check_every = if self.replay() > 0 {
                    OUTPUT_INTERVAL
                } else {
                    (self.check_every * 2).min(QUEUE_CHECK_MAX)
                };
                Self::arm(&mut self.check, self.check_every, "coalesced ring");
            }
            _ => {}
        }
    }
}

/// SIGTERM and SIGINT, turned into the end of the VM: the signal handler
/// (async-signal-safe, from signal-hook) writes a byte to a socket pair
/// per signal, and this subscriber sends [`ExitReason::Signal`].
pub struct SignalSource {
    pipes: Vec<(i32, UnixStream)>,
    exit: Sender<ExitReason>,
}

impl SignalSource {
    /// Installs the handlers; the VM ends through `exit`.
    pub fn new(exit: Sender<ExitReason>) -> std::io::Result<Self> {
        let mut pipes = Vec::new();
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            let (read, write) = UnixStream::pair()?;
            read.set_nonblocking(true)?;
            write.set_nonblocking(true)?;
            signal_hook::low_level::pipe::register(sig, write)?;
            pipes.push((sig, read));
        }
        Ok(SignalSource { pipes, exit })
    }
}

impl MutEventSubscriber for SignalSource {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, (_, read)) in self.pipes.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data_raw(
                read.as_raw_fd(),
                i as u32,
                EventSet::IN,
            )) {
                warn!("cannot watch for signals: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let Some((sig, read)) = self.pipes.get_mut(events.data() as usize) else {
            return;
        };
        let mut buf = [0u8; 16];
        while matches!(read.read(&mut buf), Ok(n) if n > 0) {}
        let _ = self.exit.send(ExitReason::Signal(*sig));
    }
}

#[derive(Default)]
struct PauseState {
    /// A holder wants the loop stopped.
    requested: bool,
    /// The loop thread is stopped in [`LoopPause`].
    parked: bool,
}

type PauseShared = Arc<(Mutex<PauseState>, std::sync::Condvar)>;

/// A subscriber that stops the device thread on request: its event makes
/// the thread wait inside the loop's dispatch, so no other subscriber runs
/// until the [`LoopHold`] is dropped. Events that arrive meanwhile wait in
/// epoll (level-triggered) and are served afterwards.
pub struct LoopPause {
    evt: EventFd,
    shared: PauseShared,
}

/// Stops the device loop that the matching [`LoopPause`] runs in.
#[derive(Clone)]
pub struct LoopPauseHandle {
    evt: Arc<EventFd>,
    shared: PauseShared,
}

/// The device loop is stopped while this lives.
pub struct LoopHold<'a> {
    handle: &'a LoopPauseHandle,
}

/// How long [`LoopPauseHandle::hold`] waits for the loop to stop.
const HOLD_TIMEOUT: Duration = Duration::from_secs(30);

impl LoopPause {
    /// A pause subscriber and the handle that triggers it.
    pub fn new() -> std::io::Result<(LoopPause, LoopPauseHandle)> {
        let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?;
        let shared: PauseShared = Arc::default();
        let handle = LoopPauseHandle {
            evt: Arc::new(evt.try_clone()?),
            shared: shared.clone(),
        };
        Ok((LoopPause { evt, shared }, handle))
    }
}

impl LoopPauseHandle {
    /// Stops the device loop and returns once it is stopped, or fails
    /// when the loop does not get there within 30 s (a device stuck in a
    /// backend call).
    pub fn hold(&self) -> Result<LoopHold<'_>, String> {
        let (state, cond) = &*self.shared;
        let mut s = lock(state);
        s.requested = true;
        self.evt
            .write(1)
            .map_err(|e| format!("cannot signal the device thread: {e}"))?;
        let deadline = std::time::Instant::now() + HOLD_TIMEOUT;
        while !s.parked {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                s.requested = false;
                return Err(format!(
                    "the device thread did not stop within {} s",
                    HOLD_TIMEOUT.as_secs()
                ));
            }
            s = cond
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(LoopHold { handle: self })
    }
}

impl Drop for LoopHold<'_> {
    fn drop(&mut self) {
        let (state, cond) = &*self.handle.shared;
        lock(state).requested = false;
        cond.notify_all();
    }
}

impl MutEventSubscriber for LoopPause {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            warn!("cannot watch the device thread's pause event: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        let (state, cond) = &*self.shared;
        let mut s = lock(state);
        if !s.requested {
            return;
        }
        s.parked = true;
        cond.notify_all();
        while s.requested {
            s = cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked = false;
    }
}

/// Starts the device event loop thread with the given subscribers.
pub fn spawn(
    subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    for s in subscribers {
        manager.add_subscriber(s);
    }
    std::thread::Builder::new()
        .name("devices".into())
        .spawn(move || {
            crate::seccomp::enter_or_end(crate::seccomp::ThreadKind::Devices);
            loop {
                if let Err(e) = manager.run() {
                    warn!("device event loop: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_devices::legacy::SerialOutput;
    use skiff_devices::{BusDevice, EventFdTrigger};
    use std::io::Write;
    use std::time::Instant;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn run_until(
        manager: &mut EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
        limit: Duration,
        mut done: impl FnMut() -> bool,
    ) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if done() {
                return true;
            }
            let _ = manager.run_with_timeout(10);
        }
        done()
    }

    #[test]
    fn held_serial_output_goes_out_after_the_interval() {
        let out = Shared::default();
        let due = Arc::new(AtomicBool::new(false));
        let held = EventFd::new(EFD_NONBLOCK).unwrap();
        let notify = {
            let due = due.clone();
            let held = held.try_clone().unwrap();
            move || {
                if !due.swap(true, Ordering::SeqCst) {
                    let _ = held.write(1);
                }
            }
        };
        let serial = Arc::new(Mutex::new(Serial::new(
            EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            SerialOutput::writer(Box::new(out.clone())).notify_held(notify),
        )));
        let pending = PendingOutput::new(
            serial.clone(),
            None,
            Arc::new(Bus::new()),
            Arc::new(Bus::new()),
            held,
            due.clone(),
        )
        .unwrap();
        let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        manager.add_subscriber(Arc::new(Mutex::new(pending)));

        // A prompt: no newline, so the UART holds it back.
        for b in b"login: " {
            serial.lock().unwrap().write(0, &[*b]);
        }
        assert!(due.load(Ordering::SeqCst), "holding must ask for a flush");
        assert!(out.0.lock().unwrap().is_empty());
        let started = Instant::now();
        let flushed = run_until(&mut manager, Duration::from_secs(5), || {
            out.0.lock().unwrap().as_slice() == b"login: "
        });
        assert!(flushed, "held output never went out");
        assert!(started.elapsed() >= OUTPUT_INTERVAL / 2);
        assert!(!due.load(Ordering::SeqCst), "a flush clears the request");

        // The next held output asks again and goes out too.
        serial.lock().unwrap().write(0, b"x");
        assert!(due.load(Ordering::SeqCst));
        assert!(run_until(&mut manager, Duration::from_secs(5), || {
            out.0.lock().unwrap().as_slice() == b"login: x"
        }));
    }

    #[test]
    fn sigterm_ends_the_vm_through_the_loop() {
        let (tx, rx) = std::sync::mpsc::channel();
        let source = SignalSource::new(tx).unwrap();
        let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        manager.add_subscriber(Arc::new(Mutex::new(source)));
        // SAFETY: raise() only delivers the signal to this thread; the
        // handler signal-hook installed writes a byte to a socket.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        let mut got = None;
        run_until(&mut manager, Duration::from_secs(5), || {
            got = rx.try_recv().ok();
            got.is_some()
        });
        assert_eq!(got, Some(ExitReason::Signal(libc::SIGTERM)));
    }

    /// Counts its eventfd's events.
    struct Counter {
        evt: EventFd,
        seen: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.evt.read();
            self.seen.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_hold_stops_every_subscriber_until_dropped() {
        let (pause, handle) = LoopPause::new().unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Counter {
            evt: evt.try_clone().unwrap(),
            seen: seen.clone(),
        };
        spawn(vec![
            Arc::new(Mutex::new(pause)),
            Arc::new(Mutex::new(counter)),
        ])
        .unwrap();
        let wait_for = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while seen.load(Ordering::SeqCst) < n {
                assert!(Instant::now() < deadline, "the loop never served the event");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        evt.write(1).unwrap();
        wait_for(1);
        {
            let _hold = handle.hold().unwrap();
            evt.write(1).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(
                seen.load(Ordering::SeqCst),
                1,
                "a subscriber ran while held"
            );
        }
        // Released: the event that waited is served.
        wait_for(2);
        // And the loop can be held again.
        drop(handle.hold().unwrap());
    }
}
