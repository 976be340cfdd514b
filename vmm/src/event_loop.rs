//! The device event loop: one thread running an event-manager epoll loop
//! over the devices' backend file descriptors (for now the serial port's
//! input).

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use log::{debug, warn};
use skiff_devices::legacy::Serial;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

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
        .spawn(move || loop {
            if let Err(e) = manager.run() {
                warn!("device event loop: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        })
}
