//! virtio-console (device id 3) with a single port, which the guest sees as
//! `/dev/hvc0`.
//!
//! Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq)
//! guest output to the host. The backend is the VMM's stdio, an output file,
//! or a unix stream socket the VMM connects to (and reconnects to when the
//! peer goes away).
//!
//! Flow control, both ways, never drops bytes and never spins:
//! * guest to host: a transmit chain is copied into a bounded host buffer
//!   (at most [`CHUNK`] bytes) and written to the backend. When the backend
//!   cannot take more (EAGAIN, or the socket is disconnected), the device
//!   stops taking chains, so the guest blocks, and resumes on EPOLLOUT or
//!   reconnection. With a socket backend, the transmit queue is served in
//!   the vCPU thread that notifies it (see `notified_in_vcpu`); the event
//!   loop takes over when the socket pushes back for longer than
//!   [`VCPU_WAIT`]: until then that thread sleeps in `poll` (the guest's
//!   vCPU would only spin, interrupts off, waiting for the buffer).
//! * host to guest: input is read only into a receive buffer the guest
//!   posted. Without one, the input fd is dropped from the event loop until
//!   the guest notifies the receive queue.
//!
//! This file is the device: queues, flow control and the event loop's view
//! of the backend. The backend itself (opening, reading, writing, losing
//! and reconnecting a socket) is in `endpoint.rs`, and the tests, which
//! drive both through a peer socket, in `tests.rs`.

mod endpoint;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, info, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use self::endpoint::Endpoint;
use super::{
    read_config_bytes, ActivateContext, ActivateError, Interrupt, VirtioDevice,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};

/// virtio device id of a console.
pub const CONSOLE_DEVICE_ID: u32 = 3;
/// Largest size of each queue.
pub const CONSOLE_QUEUE_SIZE: u16 = 256;
/// Most bytes moved between the backend and one descriptor chain at a time;
/// also the bound on guest output held in the host.
pub const CHUNK: usize = 64 * 1024;
/// Longest a notifying vCPU thread waits for a socket reader that pushed
/// back before the event loop takes over (see `Console::wait_for_reader`).
pub const VCPU_WAIT: Duration = Duration::from_millis(50);
/// How often a lost socket connection is retried.
pub const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);

const RECEIVEQ: usize = 0;
const TRANSMITQ: usize = 1;

// Event data tags.
const EV_RX_QUEUE: u32 = 0;
const EV_TX_QUEUE: u32 = 1;
const EV_BACKEND: u32 = 2;
const EV_TIMER: u32 = 3;

/// Where the console's bytes go and come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleBackend {
    /// Output to the VMM's stdout, input from its stdin (if it can be polled).
    Stdio,
    /// Output appended to a file (created if missing); no input.
    File(PathBuf),
    /// A unix stream socket the VMM connects to; both directions.
    Socket(PathBuf),
}

/// A console backend string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseConsoleBackendError {
    /// Not one of the known forms.
    #[error("invalid console backend `{0}`: expected `stdio`, `file=PATH` or `socket=PATH`")]
    Unknown(String),
    /// `file=` or `socket=` without a path.
    #[error("invalid console backend `{0}`: the path after `=` is empty")]
    EmptyPath(String),
}

impl FromStr for ConsoleBackend {
    type Err = ParseConsoleBackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "stdio" {
            return Ok(ConsoleBackend::Stdio);
        }
        let Some((kind, path)) = s.split_once('=') else {
            return Err(ParseConsoleBackendError::Unknown(s.to_owned()));
        };
        let make = match kind {
            "file" => ConsoleBackend::File,
            "socket" => ConsoleBackend::Socket,
            _ => return Err(ParseConsoleBackendError::Unknown(s.to_owned())),
        };
        if path.is_empty() {
            return Err(ParseConsoleBackendError::EmptyPath(s.to_owned()));
        }
        Ok(make(PathBuf::from(path)))
    }
}

impl fmt::Display for ConsoleBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleBackend::Stdio => f.write_str("stdio"),
            ConsoleBackend::File(p) => write!(f, "file={}", p.display()),
            ConsoleBackend::Socket(p) => write!(f, "socket={}", p.display()),
        }
    }
}

/// Why the console could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The socket backend could not connect.
    #[error("cannot connect the console to socket {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file backend could not be opened.
    #[error("cannot open console output file {}: {source}", path.display())]
    OpenFile {
        /// The file path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The VMM's stdout could not be duplicated.
    #[error("cannot use the VMM's standard output for the console: {0}")]
    Stdout(io::Error),
    /// An eventfd or timerfd could not be created.
    #[error("cannot create the console's eventfds: {0}")]
    EventFd(io::Error),
}

/// Pops the next chain; `Err` when the driver published an avail index the
/// queue cannot hold (a broken or hostile driver).
fn pop_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) {
    if let Err(e) = queue.add_used(mem, head, len) {
        error!("virtio-console: cannot complete descriptor chain {head}: {e}");
    }
}

fn notify_guest(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        Ok(true) => interrupt.signal_used(),
        Err(e) => {
            warn!("virtio-console: cannot read used_event ({e}); signalling anyway");
            interrupt.signal_used();
        }
    }
}

/// Which side of the backend failed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Input,
    Output,
}

/// The virtio console device.
pub struct Console {
    endpoint: Endpoint,
    interrupt: Arc<Interrupt>,
    queue_events: Vec<EventFd>,
    timer: TimerFd,
    timer_armed: bool,
    config: [u8; 12],
    mem: Option<GuestMemoryMmap>,
    /// Empty until activated.
    queues: Vec<Queue>,
    /// Set when the driver broke a queue; nothing is processed until reset.
    broken: bool,

    /// Host to guest scratch buffer.
    rx_buf: Vec<u8>,
    /// The guest posted no receive buffer: input is not watched until it
    /// notifies the receive queue.
    rx_stalled: bool,
    /// No (more) input: end of file, or an fd epoll cannot watch.
    input_closed: bool,

    /// Guest output not yet written to the backend, from `tx_pos` on.
    tx_buf: Vec<u8>,
    tx_pos: usize,
    /// Bytes of the chain at the head of the transmit queue already moved to
    /// `tx_buf` (chains longer than [`CHUNK`] are taken in pieces).
    tx_chain_offset: usize,
    /// EPOLLOUT cannot be watched on the output fd: retry on the timer.
    output_unpollable: bool,
    /// A stdio or file output failed for good: guest output is discarded.
    output_broken: bool,

    /// Longest the notifying vCPU thread waits for a reader that pushed
    /// back ([`VCPU_WAIT`]).
    vcpu_wait: Duration,

    /// Backend fds in the event loop, with the events watched.
    registered: Vec<(RawFd, EventSet)>,
    /// Lost connections, closed once out of the event loop.
    closing: Vec<UnixStream>,
}

impl Console {
    /// A console on `backend` that raises its interrupt through
    /// `interrupt_evt`. A socket backend connects now.
    pub fn new(backend: &ConsoleBackend, interrupt_evt: EventFd) -> Result<Console, ConsoleError> {
        Self::with_endpoint(Endpoint::open(backend)?, interrupt_evt)
    }

    /// A console on a connected stream that is not reconnected when lost.
    #[cfg(test)]
    fn from_stream(stream: UnixStream, interrupt_evt: EventFd) -> Result<Console, ConsoleError> {
        let endpoint = Endpoint::from_stream(stream).map_err(ConsoleError::EventFd)?;
        Self::with_endpoint(endpoint, interrupt_evt)
    }

    fn with_endpoint(endpoint: Endpoint, interrupt_evt: EventFd) -> Result<Console, ConsoleError> {
        let queue_events = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ConsoleError::EventFd)?;
        let timer = TimerFd::new().map_err(|e| ConsoleError::EventFd(e.into()))?;
        let mut config = [0u8; 12];
        // cols, rows: 0 (unknown); max_nr_ports: 1; emerg_wr: 0.
        config[4..8].copy_from_slice(&1u32.to_le_bytes());
        Ok(Console {
            endpoint,
            interrupt: Arc::new(Interrupt::new(interrupt_evt)),
            queue_events,
            timer,
            timer_armed: false,
            config,
            mem: None,
            queues: Vec::new(),
            broken: false,
            rx_buf: Vec::new(),
            rx_stalled: false,
            input_closed: false,
            tx_buf: Vec::new(),
            tx_pos: 0,
            tx_chain_offset: 0,
            output_unpollable: false,
            output_broken: false,
            vcpu_wait: VCPU_WAIT,
            registered: Vec::new(),
            closing: Vec::new(),
        })
    }

    fn activated(&self) -> bool {
        !self.queues.is_empty() && !self.broken
    }

    fn has_pending_output(&self) -> bool {
        self.tx_pos < self.tx_buf.len()
    }

    fn queue_broken(&mut self, which: &str, e: virtio_queue::Error) {
        error!("virtio-console: {which} queue is broken ({e}); device needs reset");
        self.broken = true;
        self.interrupt.set_needs_reset();
    }

    /// Reacts to a failed or closed backend.
    fn backend_failed(&mut self, dir: Direction, e: io::Error) {
        if self.endpoint.is_socket() {
            if let Some(s) = self.endpoint.disconnect(&e) {
                // Closed by sync_interest, after it leaves the event loop.
                self.closing.push(s);
            }
            return;
        }
        match dir {
            Direction::Input => {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    info!("virtio-console: input reached end of file");
                } else {
                    warn!("virtio-console: reading input failed ({e}); no more input");
                }
                self.input_closed = true;
            }
            Direction::Output => {
                error!("virtio-console: writing output failed ({e}); guest output is discarded from now on");
                self.output_broken = true;
            }
        }
    }

    /// Writes pending guest output. True when nothing is left pending.
    fn flush_output(&mut self) -> bool {
        while self.has_pending_output() {
            if self.output_broken {
                break;
            }
            if !self.endpoint.connected() {
                return false;
            }
            match self.endpoint.write(&self.tx_buf[self.tx_pos..]) {
                Ok(0) => self.backend_failed(Direction::Output, io::ErrorKind::WriteZero.into()),
                Ok(n) => self.tx_pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => self.backend_failed(Direction::Output, e),
            }
        }
        self.tx_buf.clear();
        self.tx_pos = 0;
        true
    }

    /// Moves guest output to the backend until the transmit queue is empty
    /// or the backend pushes back.
    fn process_tx(&mut self) {
        let mut used_any = false;
        let mut notifications_enabled = true;
        loop {
            if !self.flush_output() || !self.activated() {
                break;
            }
            let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queues.get_mut(TRANSMITQ))
            else {
                break;
            };
            if notifications_enabled {
                if let Err(e) = queue.disable_notification(mem) {
                    warn!("virtio-console: cannot disable transmit notifications: {e}");
                }
                notifications_enabled = false;
            }
            let chain = match pop_chain(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    notifications_enabled = true;
                    match queue.enable_notification(mem) {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(e) => {
                            warn!("virtio-console: cannot enable transmit notifications: {e}");
                            break;
                        }
                    }
                }
                Err(e) => {
                    self.queue_broken("transmit", e);
                    break;
                }
            };
            let head = chain.head_index();
            let mut reader = match chain.reader(mem) {
                Ok(r) => r,
                Err(e) => {
                    warn!("virtio-console: transmit chain {head} is malformed ({e}); skipped");
                    self.tx_chain_offset = 0;
                    add_used(queue, mem, head, 0);
                    used_any = true;
                    continue;
                }
            };
            let total = reader.available_bytes();
            if total == 0 {
                warn!(
                    "virtio-console: transmit chain {head} has no device-readable buffer; skipped"
                );
                self.tx_chain_offset = 0;
                add_used(queue, mem, head, 0);
                used_any = true;
                continue;
            }
            let start = self.tx_chain_offset.min(total);
            let mut rest = if start == 0 {
                reader
            } else {
                match reader.split_at(start) {
                    Ok(rest) => rest,
                    Err(e) => {
                        warn!("virtio-console: transmit chain {head} cannot be resumed ({e}); skipped");
                        self.tx_chain_offset = 0;
                        add_used(queue, mem, head, 0);
                        used_any = true;
                        continue;
                    }
                }
            };
            let n = rest.available_bytes().min(CHUNK);
            self.tx_buf.resize(n, 0);
            self.tx_pos = 0;
            if let Err(e) = rest.read_exact(&mut self.tx_buf) {
                warn!("virtio-console: cannot read transmit chain {head} ({e}); skipped");
                self.tx_buf.clear();
                self.tx_chain_offset = 0;
                add_used(queue, mem, head, 0);
                used_any = true;
                continue;
            }
            if start + n >= total {
                self.tx_chain_offset = 0;
                add_used(queue, mem, head, 0);
                used_any = true;
            } else {
                // Leave the chain at the head of the queue; the rest comes
                // once this piece is written.
                self.tx_chain_offset = start + n;
                queue.go_to_previous_position();
            }
        }
        if used_any {
            if let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queues.get_mut(TRANSMITQ)) {
                notify_guest(queue, mem, &self.interrupt);
            }
        }
    }

    /// Called in the notifying vCPU's thread when the socket pushed back:
    /// waits up to [`VCPU_WAIT`] for the reader to make room, moving output
    /// as it does, before the event loop takes over. The guest's hvc driver
    /// spins with interrupts off until its buffer is used, so that vCPU can
    /// do nothing else in the meantime; sleeping here instead of spinning in
    /// the guest leaves the CPU to the reader, which on a single-CPU or busy
    /// host is what the guest waits for. A kick (pause, shutdown) ends the
    /// wait at once (the signal interrupts `poll`).
    fn wait_for_reader(&mut self) {
        let deadline = std::time::Instant::now() + self.vcpu_wait;
        while self.has_pending_output() && !self.output_broken && self.activated() {
            let Some(fd) = self.endpoint.output_fd() else {
                return;
            };
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
            // SAFETY: `pfd` is a valid pollfd for the duration of the call
            // and the count passed is 1; `fd` is the open socket this device
            // owns (it is not closed while `self` is borrowed).
            let ret = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ret <= 0 {
                // Timed out, or interrupted by a kick: the event loop takes
                // over.
                return;
            }
            self.process_tx();
        }
    }

    /// Moves backend input into the guest's receive buffers; called when
    /// the input fd is readable.
    fn process_rx(&mut self) {
        if self.input_closed || !self.endpoint.connected() || !self.activated() {
            return;
        }
        let may_block = self.endpoint.input_may_block();
        let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queues.get_mut(RECEIVEQ)) else {
            return;
        };
        let mut used_any = false;
        let mut failure = None;
        let mut broken = None;
        loop {
            let chain = match pop_chain(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => match queue.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.rx_stalled = true;
                        break;
                    }
                    Err(e) => {
                        warn!("virtio-console: cannot enable receive notifications: {e}");
                        self.rx_stalled = true;
                        break;
                    }
                },
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(mem) {
                Ok(w) => w,
                Err(e) => {
                    warn!("virtio-console: receive chain {head} is malformed ({e}); skipped");
                    add_used(queue, mem, head, 0);
                    used_any = true;
                    continue;
                }
            };
            let cap = writer.available_bytes().min(CHUNK);
            if cap == 0 {
                warn!(
                    "virtio-console: receive chain {head} has no device-writable buffer; skipped"
                );
                add_used(queue, mem, head, 0);
                used_any = true;
                continue;
            }
            self.rx_buf.resize(cap, 0);
            match self.endpoint.read(&mut self.rx_buf[..cap]) {
                Ok(0) => {
                    queue.go_to_previous_position();
                    failure = Some(io::Error::new(io::ErrorKind::UnexpectedEof, "end of file"));
                    break;
                }
                Ok(n) => {
                    if let Err(e) = writer.write_all(&self.rx_buf[..n]) {
                        warn!("virtio-console: cannot write receive chain {head}: {e}");
                    }
                    // n <= CHUNK, which fits in u32.
                    add_used(queue, mem, head, writer.bytes_written() as u32);
                    used_any = true;
                    if may_block {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => queue.go_to_previous_position(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    queue.go_to_previous_position();
                    break;
                }
                Err(e) => {
                    queue.go_to_previous_position();
                    failure = Some(e);
                    break;
                }
            }
        }
        if used_any {
            notify_guest(queue, mem, &self.interrupt);
        }
        if let Some(e) = broken {
            self.queue_broken("receive", e);
        }
        if let Some(e) = failure {
            self.backend_failed(Direction::Input, e);
        }
    }

    fn on_timer(&mut self) {
        // The timer may have been re-armed since it fired; only read an
        // armed one (a disarmed timerfd would block the read forever).
        if matches!(self.timer.is_armed(), Ok(true)) {
            let _ = self.timer.wait();
        }
        self.endpoint.reconnect();
        if self.endpoint.connected() {
            // Held-back output goes first, then the queue resumes.
            self.process_tx();
        }
    }

    /// Brings the event loop's view of the backend fds and the timer in line
    /// with what the device needs now.
    fn sync_interest(&mut self, ops: &mut EventOps) {
        let mut desired: Vec<(RawFd, EventSet)> = Vec::with_capacity(2);
        if self.activated() && !self.rx_stalled && !self.input_closed {
            if let Some(fd) = self.endpoint.input_fd() {
                desired.push((fd, EventSet::IN));
            }
        }
        if self.has_pending_output() && !self.output_unpollable && !self.output_broken {
            if let Some(fd) = self.endpoint.output_fd() {
                match desired.iter_mut().find(|(f, _)| *f == fd) {
                    Some(d) => d.1 |= EventSet::OUT,
                    None => desired.push((fd, EventSet::OUT)),
                }
            }
        }

        // Unregister first: a lost connection's fd must leave epoll before
        // it is closed.
        for (fd, set) in std::mem::take(&mut self.registered) {
            if desired.iter().any(|(f, _)| *f == fd) {
                self.registered.push((fd, set));
            } else if let Err(e) = ops.remove(Events::with_data_raw(fd, EV_BACKEND, set)) {
                warn!("virtio-console: cannot stop watching fd {fd}: {e}");
            }
        }
        self.closing.clear();

        for (fd, set) in desired {
            match self.registered.iter_mut().find(|(f, _)| *f == fd) {
                Some(r) if r.1 == set => {}
                Some(r) => match ops.modify(Events::with_data_raw(fd, EV_BACKEND, set)) {
                    Ok(()) => r.1 = set,
                    Err(e) => {
                        warn!("virtio-console: cannot change the events watched on fd {fd}: {e}")
                    }
                },
                None => match ops.add(Events::with_data_raw(fd, EV_BACKEND, set)) {
                    Ok(()) => self.registered.push((fd, set)),
                    Err(e) => {
                        // Regular files and /dev/null cannot be polled.
                        if set.contains(EventSet::IN) {
                            info!("virtio-console: input cannot be watched ({e}); the guest gets no input");
                            self.input_closed = true;
                        }
                        if set.contains(EventSet::OUT) {
                            debug!("virtio-console: output cannot be watched ({e}); retrying on a timer");
                            self.output_unpollable = true;
                        }
                    }
                },
            }
        }

        let want_timer = self.endpoint.wants_reconnect()
            || (self.output_unpollable && self.has_pending_output() && !self.output_broken);
        if want_timer && !self.timer_armed {
            match self
                .timer
                .reset(RECONNECT_INTERVAL, Some(RECONNECT_INTERVAL))
            {
                Ok(()) => self.timer_armed = true,
                Err(e) => error!("virtio-console: cannot arm the retry timer: {e}"),
            }
        } else if !want_timer && self.timer_armed {
            if let Err(e) = self.timer.clear() {
                warn!("virtio-console: cannot disarm the retry timer: {e}");
            }
            self.timer_armed = false;
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        CONSOLE_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[CONSOLE_QUEUE_SIZE, CONSOLE_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Guest output to a socket is moved in the notifying vCPU's thread.
    /// The guest's hvc driver busy-waits, interrupts off, until the device
    /// has used each buffer it sends; taking the buffer before the vCPU
    /// re-enters the guest ends that wait at once instead of after the
    /// event loop's thread has been scheduled (on a busy or single-CPU
    /// host, a scheduler time slice per buffer). Socket writes never block
    /// (the stream is non-blocking); stdout and files stay on the event loop.
    fn notified_in_vcpu(&self, index: usize) -> bool {
        index == TRANSMITQ && self.endpoint.is_socket()
    }

    /// Only the transmit queue of a socket console comes here.
    fn queue_notify(&mut self, index: usize) {
        debug_assert!(self.notified_in_vcpu(index));
        self.process_tx();
        self.wait_for_reader();
        // What is left for the event loop: output the socket would not take
        // (watch EPOLLOUT), a lost connection (close it, then reconnect), or
        // a queue found broken.
        if self.has_pending_output() || !self.closing.is_empty() || !self.activated() {
            let _ = self.queue_events[TRANSMITQ].write(1);
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 2 {
            return Err(ActivateError::Other(format!(
                "virtio-console needs 2 queues, got {}",
                ctx.queues.len()
            )));
        }
        if let Some(i) = ctx.queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        self.mem = Some(ctx.mem);
        self.queues = ctx.queues;
        self.broken = false;
        self.rx_stalled = false;
        self.tx_chain_offset = 0;
        Ok(())
    }

    fn reset(&mut self) {
        // Guest output already taken stays pending and is still delivered.
        self.queues.clear();
        self.mem = None;
        self.broken = false;
        self.rx_stalled = false;
        self.tx_chain_offset = 0;
    }
}

impl MutEventSubscriber for Console {
    fn init(&mut self, ops: &mut EventOps) {
        let fixed = [
            Events::with_data(&self.queue_events[RECEIVEQ], EV_RX_QUEUE, EventSet::IN),
            Events::with_data(&self.queue_events[TRANSMITQ], EV_TX_QUEUE, EventSet::IN),
            Events::with_data(&self.timer, EV_TIMER, EventSet::IN),
        ];
        for ev in fixed {
            if let Err(e) = ops.add(ev) {
                error!("virtio-console: cannot watch fd {}: {e}", ev.fd());
            }
        }
        self.sync_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_RX_QUEUE => {
                // Always drained, so a notify before activation does not keep
                // the event loop awake.
                let _ = self.queue_events[RECEIVEQ].read();
                // New receive buffers: watch the input again.
                self.rx_stalled = false;
            }
            EV_TX_QUEUE => {
                let _ = self.queue_events[TRANSMITQ].read();
                self.process_tx();
            }
            EV_BACKEND => {
                let set = events.event_set();
                let fd = Some(events.fd());
                let failed = set.intersects(EventSet::ERROR | EventSet::HANG_UP);
                if (failed || set.contains(EventSet::OUT)) && fd == self.endpoint.output_fd() {
                    self.process_tx();
                }
                if (failed || set.contains(EventSet::IN)) && fd == self.endpoint.input_fd() {
                    self.process_rx();
                }
            }
            EV_TIMER => self.on_timer(),
            other => warn!("virtio-console: unexpected event tag {other}"),
        }
        self.sync_interest(ops);
    }
}
