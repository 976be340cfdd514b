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

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, info, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

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

/// The open backend.
enum Endpoint {
    Stdio {
        input: Option<File>,
        output: File,
    },
    File(File),
    /// `path` is `None` for a stream handed in ready-made, which is not
    /// reconnected.
    Socket {
        path: Option<PathBuf>,
        stream: Option<UnixStream>,
    },
}

fn not_connected() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "console socket is not connected",
    )
}

impl Endpoint {
    fn input_fd(&self) -> Option<RawFd> {
        match self {
            Endpoint::Stdio { input, .. } => input.as_ref().map(|f| f.as_raw_fd()),
            Endpoint::File(_) => None,
            Endpoint::Socket { stream, .. } => stream.as_ref().map(|s| s.as_raw_fd()),
        }
    }

    fn output_fd(&self) -> Option<RawFd> {
        match self {
            Endpoint::Stdio { output, .. } => Some(output.as_raw_fd()),
            Endpoint::File(f) => Some(f.as_raw_fd()),
            Endpoint::Socket { stream, .. } => stream.as_ref().map(|s| s.as_raw_fd()),
        }
    }

    fn connected(&self) -> bool {
        !matches!(self, Endpoint::Socket { stream: None, .. })
    }

    fn wants_reconnect(&self) -> bool {
        matches!(
            self,
            Endpoint::Socket {
                path: Some(_),
                stream: None
            }
        )
    }

    /// Whether a read on the input fd can block (stdin is not made
    /// non-blocking: that flag would be shared with other users of the
    /// terminal or pipe). Such an fd is read once per readiness event.
    fn input_may_block(&self) -> bool {
        matches!(self, Endpoint::Stdio { .. })
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Endpoint::Stdio { input: Some(f), .. } => f.read(buf),
            Endpoint::Socket {
                stream: Some(s), ..
            } => s.read(buf),
            Endpoint::Socket { stream: None, .. } => Err(not_connected()),
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "console backend has no input",
            )),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Endpoint::Stdio { output, .. } => output.write(buf),
            Endpoint::File(f) => f.write(buf),
            Endpoint::Socket {
                stream: Some(s), ..
            } => s.write(buf),
            Endpoint::Socket { stream: None, .. } => Err(not_connected()),
        }
    }
}

fn connect(path: &Path) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(path)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
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
        let endpoint = match backend {
            ConsoleBackend::Stdio => {
                // No stdin at all is not an error: the guest gets no input.
                let input = io::stdin()
                    .as_fd()
                    .try_clone_to_owned()
                    .ok()
                    .map(File::from);
                let output = io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .map(File::from)
                    .map_err(ConsoleError::Stdout)?;
                Endpoint::Stdio { input, output }
            }
            ConsoleBackend::File(path) => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| ConsoleError::OpenFile {
                        path: path.clone(),
                        source,
                    })?;
                Endpoint::File(f)
            }
            ConsoleBackend::Socket(path) => {
                let stream = connect(path).map_err(|source| ConsoleError::Connect {
                    path: path.clone(),
                    source,
                })?;
                Endpoint::Socket {
                    path: Some(path.clone()),
                    stream: Some(stream),
                }
            }
        };
        Self::with_endpoint(endpoint, interrupt_evt)
    }

    /// A console on a connected stream that is not reconnected when lost.
    #[cfg(test)]
    fn from_stream(stream: UnixStream, interrupt_evt: EventFd) -> Result<Console, ConsoleError> {
        stream
            .set_nonblocking(true)
            .map_err(ConsoleError::EventFd)?;
        let endpoint = Endpoint::Socket {
            path: None,
            stream: Some(stream),
        };
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
        match &mut self.endpoint {
            Endpoint::Socket { path, stream } => {
                if let Some(s) = stream.take() {
                    match path {
                        Some(p) => warn!(
                            "virtio-console: connection to {} lost ({e}); reconnecting every {} ms",
                            p.display(),
                            RECONNECT_INTERVAL.as_millis()
                        ),
                        None => warn!("virtio-console: connection lost ({e})"),
                    }
                    // Closed by sync_interest, after it leaves the event loop.
                    self.closing.push(s);
                }
            }
            _ if dir == Direction::Input => {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    info!("virtio-console: input reached end of file");
                } else {
                    warn!("virtio-console: reading input failed ({e}); no more input");
                }
                self.input_closed = true;
            }
            _ => {
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
        if let Endpoint::Socket {
            path: Some(path),
            stream: stream @ None,
        } = &mut self.endpoint
        {
            match connect(path) {
                Ok(s) => {
                    info!("virtio-console: reconnected to {}", path.display());
                    *stream = Some(s);
                }
                Err(e) => debug!(
                    "virtio-console: reconnecting to {} failed: {e}",
                    path.display()
                ),
            }
        }
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
        index == TRANSMITQ && matches!(self.endpoint, Endpoint::Socket { .. })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::{Deref, DerefMut};
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempdir::TempDir;

    use crate::virtio::test_utils::{mem, read_guest, Looped, TestQueue, MEM_SIZE, R, W};

    const QUEUE_SIZE: u16 = 256;
    const RXQ_ADDR: u64 = 0;
    const TXQ_ADDR: u64 = 0x4000;
    const BUF_BASE: u64 = 0x1_0000;

    /// The driver side: two test queues and a bump allocator for buffers.
    struct Guest<'a> {
        mem: &'a GuestMemoryMmap,
        rx: TestQueue<'a>,
        tx: TestQueue<'a>,
        next_buf: u64,
    }

    impl<'a> Guest<'a> {
        fn new(mem: &'a GuestMemoryMmap) -> Self {
            Guest {
                mem,
                rx: TestQueue::new(mem, RXQ_ADDR, QUEUE_SIZE),
                tx: TestQueue::new(mem, TXQ_ADDR, QUEUE_SIZE),
                next_buf: BUF_BASE,
            }
        }

        fn queue(&self, q: usize) -> &TestQueue<'a> {
            if q == RECEIVEQ {
                &self.rx
            } else {
                &self.tx
            }
        }

        fn alloc(&mut self, len: usize) -> u64 {
            let addr = self.next_buf;
            self.next_buf += (len as u64 + 0xfff) & !0xfff;
            assert!(self.next_buf <= MEM_SIZE as u64);
            addr
        }

        /// Adds a chain of `(addr, len, flags)` descriptors to queue `q`.
        fn add_chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) {
            if q == RECEIVEQ {
                self.rx.add_chain(descs);
            } else {
                self.tx.add_chain(descs);
            }
        }

        /// Queues `parts` for transmission as one chain, one descriptor each.
        fn send(&mut self, parts: &[&[u8]]) {
            let descs: Vec<(u64, u32, u16)> = parts
                .iter()
                .map(|p| {
                    let addr = self.alloc(p.len());
                    self.mem.write_slice(p, GuestAddress(addr)).unwrap();
                    (addr, p.len() as u32, R)
                })
                .collect();
            self.add_chain(TRANSMITQ, &descs);
        }

        /// Sends `chains` transmit chains of 8 KiB each, more than a unix
        /// socket holds; returns the bytes in order.
        fn send_many(&mut self, chains: u32) -> Vec<u8> {
            let mut sent = Vec::new();
            for c in 0..chains {
                let chunk: Vec<u8> = (0..8192u32).map(|i| ((i * 3 + c) % 251) as u8).collect();
                self.send(&[&chunk]);
                sent.extend_from_slice(&chunk);
            }
            sent
        }

        /// Posts a receive buffer; returns its address.
        fn post_rx(&mut self, len: u32) -> u64 {
            let addr = self.alloc(len as usize);
            self.add_chain(RECEIVEQ, &[(addr, len, W)]);
            addr
        }

        fn used_idx(&self, q: usize) -> u16 {
            self.queue(q).used_idx()
        }

        /// All used entries so far, as (head, len).
        fn used(&self, q: usize) -> Vec<(u32, u32)> {
            self.queue(q).used()
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            read_guest(self.mem, addr, len)
        }
    }

    /// The device on its own event loop.
    struct Dev(Looped<Console>);

    impl Deref for Dev {
        type Target = Looped<Console>;

        fn deref(&self) -> &Self::Target {
            &self.0
        }
    }

    impl DerefMut for Dev {
        fn deref_mut(&mut self) -> &mut Self::Target {
            &mut self.0
        }
    }

    impl Dev {
        fn new(make: impl FnOnce(EventFd) -> Console) -> Self {
            Dev(Looped::new(make))
        }

        fn on_stream(stream: UnixStream) -> Self {
            Dev::new(|irq| Console::from_stream(stream, irq).unwrap())
        }

        /// Activates as the transport does: hands over the queues, then
        /// kicks both queue eventfds.
        fn activate(&mut self, guest: &Guest, event_idx: bool) {
            self.0
                .activate(guest.mem, &[&guest.rx, &guest.tx], event_idx);
        }

        /// Runs the loop until `done`, for at most 5 s.
        fn run_until(&mut self, mut done: impl FnMut(&mut Dev) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !done(self) {
                assert!(Instant::now() < deadline, "timed out");
                self.em.run_with_timeout(10).unwrap();
            }
        }

        /// Runs the loop for about `ms` milliseconds.
        fn run_for(&mut self, ms: u64) {
            let end = Instant::now() + Duration::from_millis(ms);
            while Instant::now() < end {
                self.em.run_with_timeout(10).unwrap();
            }
        }

        fn connected(&self) -> bool {
            self.lock().endpoint.connected()
        }

        fn watched(&self) -> Vec<(RawFd, EventSet)> {
            self.lock().registered.clone()
        }
    }

    /// A reader thread takes `expected.len()` bytes from `peer` while the
    /// device runs until `used` transmit chains are used; the bytes must be
    /// `expected`, in order. Returns the peer, still connected.
    fn read_all_while_running(
        dev: &mut Dev,
        guest: &Guest,
        mut peer: UnixStream,
        expected: &[u8],
        used: u16,
    ) -> UnixStream {
        let total = expected.len();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; total];
            peer.read_exact(&mut got).unwrap();
            (got, peer)
        });
        dev.run_until(|_| guest.used_idx(TRANSMITQ) == used);
        dev.settle();
        let (got, peer) = reader.join().unwrap();
        assert!(got == expected, "output corrupted");
        peer
    }

    /// Reads whatever the peer has, without blocking.
    fn drain(peer: &mut UnixStream) -> Vec<u8> {
        peer.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match peer.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("peer read: {e}"),
            }
        }
        out
    }

    #[test]
    fn backend_strings() {
        assert_eq!("stdio".parse(), Ok(ConsoleBackend::Stdio));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(ConsoleBackend::File("/tmp/x".into()))
        );
        assert_eq!(
            "socket=a=b".parse(),
            Ok(ConsoleBackend::Socket("a=b".into()))
        );
        for b in [
            ConsoleBackend::Stdio,
            ConsoleBackend::File("f".into()),
            ConsoleBackend::Socket("/s".into()),
        ] {
            assert_eq!(b.to_string().parse(), Ok(b));
        }
        let e = "tcp=1.2.3.4".parse::<ConsoleBackend>().unwrap_err();
        assert!(e.to_string().contains("`tcp=1.2.3.4`"), "{e}");
        assert!(e.to_string().contains("socket=PATH"), "{e}");
        let e = "socket=".parse::<ConsoleBackend>().unwrap_err();
        assert_eq!(e, ParseConsoleBackendError::EmptyPath("socket=".into()));
        assert!(e.to_string().contains("`socket=`"), "{e}");
        assert!("stdout".parse::<ConsoleBackend>().is_err());
        assert!("".parse::<ConsoleBackend>().is_err());
    }

    #[test]
    fn identity_and_config() {
        let (a, _b) = UnixStream::pair().unwrap();
        let dev = Dev::on_stream(a);
        let c = dev.lock();
        assert_eq!(c.device_type(), 3);
        assert_eq!(c.queue_max_sizes(), &[256, 256]);
        assert_eq!(c.queue_events().len(), 2);
        let f = c.features();
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        // No SIZE, MULTIPORT or EMERG_WRITE.
        assert_eq!(f & 0b111, 0);
        let mut d = [0xffu8; 4];
        c.read_config(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
        c.read_config(0, &mut d);
        assert_eq!(d, [0; 4]);
        c.read_config(10, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn connect_failure_names_the_path() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("nobody-listens");
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let e = match Console::new(&ConsoleBackend::Socket(path.clone()), irq) {
            Err(e) => e,
            Ok(_) => panic!("connected to nothing"),
        };
        assert!(matches!(e, ConsoleError::Connect { .. }));
        assert!(e.to_string().contains(path.to_str().unwrap()), "{e}");
    }

    #[test]
    fn guest_output_arrives_in_order() {
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let (a, mut peer) = UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        let mut dev = Dev::on_stream(a);
        guest.send(&[b"hello "]);
        // Queued before activation: taken once activated.
        dev.kick(TRANSMITQ);
        dev.settle();
        assert_eq!(guest.used_idx(TRANSMITQ), 0);
        dev.activate(&guest, false);
        guest.send(&[b"wor", b"ld"]);
        // A device-writable descriptor in a transmit chain is ignored.
        let w = guest.alloc(16);
        let r = guest.alloc(3);
        mem.write_slice(b"!\n", GuestAddress(r)).unwrap();
        guest.add_chain(TRANSMITQ, &[(r, 2, R), (w, 16, W)]);
        dev.kick(TRANSMITQ);
        dev.settle();
        assert_eq!(drain(&mut peer), b"hello world!\n");
        assert_eq!(guest.used(TRANSMITQ), vec![(0, 0), (1, 0), (3, 0)]);
        assert!(dev.irq.read().unwrap() >= 1);
        // Only input is watched: no output pending.
        assert_eq!(dev.watched(), vec![(fd, EventSet::IN)]);
    }

    #[test]
    fn host_input_fills_posted_buffers_and_waits_for_more() {
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let (a, mut peer) = UnixStream::pair().unwrap();
        let mut dev = Dev::on_stream(a);
        let b0 = guest.post_rx(8);
        let b1 = guest.post_rx(8);
        peer.write_all(b"0123456789abcdefWXYZ").unwrap();
        // Not activated: input stays in the socket.
        dev.settle();
        assert_eq!(guest.used_idx(RECEIVEQ), 0);
        dev.activate(&guest, true);
        dev.settle();
        assert_eq!(guest.used(RECEIVEQ), vec![(0, 8), (1, 8)]);
        assert_eq!(guest.read(b0, 8), b"01234567");
        assert_eq!(guest.read(b1, 8), b"89abcdef");
        assert!(dev.irq.read().unwrap() >= 1);
        // No buffer left: the input fd is no longer watched, although
        // "WXYZ" is waiting (settle() checked that nothing spins).
        assert!(dev.watched().is_empty());
        peer.write_all(b"!").unwrap();
        dev.settle();
        assert_eq!(guest.used_idx(RECEIVEQ), 2);
        // A new buffer and a notify resume input.
        let b2 = guest.post_rx(64);
        dev.kick(RECEIVEQ);
        dev.settle();
        assert_eq!(guest.used(RECEIVEQ)[2], (2, 5));
        assert_eq!(guest.read(b2, 5), b"WXYZ!");
        // Buffers available again: input is watched.
        let b3 = guest.post_rx(64);
        dev.kick(RECEIVEQ);
        dev.settle();
        assert_eq!(dev.watched().len(), 1);
        peer.write_all(b"more").unwrap();
        dev.settle();
        assert_eq!(guest.used(RECEIVEQ)[3], (3, 4));
        assert_eq!(guest.read(b3, 4), b"more");
    }

    #[test]
    fn slow_peer_pushes_back_without_loss() {
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let (a, peer) = UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        let mut dev = Dev::on_stream(a);
        dev.activate(&guest, true);
        let mut expected = Vec::new();
        // One chain bigger than CHUNK, taken in pieces...
        let big: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
        guest.send(&[&big]);
        expected.extend_from_slice(&big);
        // ...and many small ones.
        for c in 0..100u32 {
            let chunk: Vec<u8> = (0..8192u32).map(|i| ((i * 7 + c) % 253) as u8).collect();
            guest.send(&[&chunk[..4096], &chunk[4096..]]);
            expected.extend_from_slice(&chunk);
        }
        dev.kick(TRANSMITQ);
        dev.settle();
        // The socket is full: the device stopped taking chains and waits
        // for EPOLLOUT, idle (settle() returned).
        let done = guest.used_idx(TRANSMITQ);
        assert!(
            done < 101,
            "all chains taken although the peer reads nothing"
        );
        assert_eq!(dev.watched(), vec![(fd, EventSet::IN | EventSet::OUT)]);
        // The peer starts reading: everything arrives, in order.
        let _peer = read_all_while_running(&mut dev, &guest, peer, &expected, 101);
        assert_eq!(dev.watched(), vec![(fd, EventSet::IN)]);
        assert!(guest.used(TRANSMITQ).iter().all(|&(_, len)| len == 0));
    }

    #[test]
    fn socket_output_is_taken_in_the_notifying_thread() {
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let (a, mut peer) = UnixStream::pair().unwrap();
        let mut dev = Dev::on_stream(a);
        {
            let c = dev.lock();
            assert!(c.notified_in_vcpu(TRANSMITQ));
            assert!(!c.notified_in_vcpu(RECEIVEQ));
        }
        dev.activate(&guest, true);
        dev.settle();
        let _ = dev.irq.read();
        guest.send(&[b"hello ", b"world\n"]);
        // What the transport does on a QueueNotify write: no event loop
        // runs, yet the chain is used and the bytes are on the socket.
        dev.lock().queue_notify(TRANSMITQ);
        assert_eq!(guest.used_idx(TRANSMITQ), 1);
        assert_eq!(drain(&mut peer), b"hello world\n");
        assert!(dev.irq.read().is_ok(), "no used-buffer interrupt");
        // Nothing was left for the event loop.
        assert_eq!(dev.em.run_with_timeout(0).unwrap(), 0);
    }

    #[test]
    fn notifying_thread_hands_a_full_socket_to_the_event_loop() {
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let (a, peer) = UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        let mut dev = Dev::on_stream(a);
        dev.activate(&guest, true);
        dev.settle();
        let expected = guest.send_many(100);
        dev.lock().queue_notify(TRANSMITQ);
        // The socket filled up: output is held and the event loop was
        // woken to watch EPOLLOUT.
        assert!(guest.used_idx(TRANSMITQ) < 100);
        dev.settle();
        assert_eq!(dev.watched(), vec![(fd, EventSet::IN | EventSet::OUT)]);
        let _peer = read_all_while_running(&mut dev, &guest, peer, &expected, 100);
        assert_eq!(dev.watched(), vec![(fd, EventSet::IN)]);
    }

    #[test]
    fn notifying_thread_waits_for_a_reader_that_makes_room() {
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let (a, mut peer) = UnixStream::pair().unwrap();
        let mut dev = Dev::on_stream(a);
        // A wait far longer than the reader needs, so a loaded machine
        // cannot make this test fail; poll returns as soon as there is room.
        dev.lock().vcpu_wait = Duration::from_secs(30);
        dev.activate(&guest, true);
        dev.settle();
        let expected = guest.send_many(100);
        let want = expected.len();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 65536];
            while got.len() < want {
                let n = peer.read(&mut buf).unwrap();
                assert!(n > 0, "the device closed the socket");
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let started = Instant::now();
        dev.lock().queue_notify(TRANSMITQ);
        // 800 KiB is more than the socket holds: the notifying thread waited
        // for the reader and moved every chain itself, leaving nothing to
        // the event loop.
        assert_eq!(guest.used_idx(TRANSMITQ), 100);
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(reader.join().unwrap() == expected, "output differs");
        dev.settle();
        assert!(!dev.lock().has_pending_output());
    }

    #[test]
    fn notifying_thread_gives_up_on_a_reader_that_does_not_read() {
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let (a, _peer) = UnixStream::pair().unwrap();
        let mut dev = Dev::on_stream(a);
        dev.activate(&guest, true);
        dev.settle();
        guest.send_many(100);
        let started = Instant::now();
        dev.lock().queue_notify(TRANSMITQ);
        // Bounded: the vCPU thread returns after VCPU_WAIT, output held.
        assert!(started.elapsed() >= VCPU_WAIT);
        assert!(started.elapsed() < VCPU_WAIT + Duration::from_secs(5));
        assert!(guest.used_idx(TRANSMITQ) < 100);
        assert!(dev.lock().has_pending_output());
    }

    #[test]
    fn file_output_stays_on_the_event_loop() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("out.log");
        let backend = ConsoleBackend::File(path.clone());
        let mut dev = Dev::new(|irq| Console::new(&backend, irq).unwrap());
        assert!(!dev.lock().notified_in_vcpu(TRANSMITQ));
        let mem = mem();
        let mut guest = Guest::new(&mem);
        dev.activate(&guest, true);
        dev.settle();
        guest.send(&[b"line\n"]);
        // The transport only wakes the event loop.
        dev.kick(TRANSMITQ);
        assert_eq!(guest.used_idx(TRANSMITQ), 0);
        dev.settle();
        assert_eq!(guest.used_idx(TRANSMITQ), 1);
        assert_eq!(std::fs::read(&path).unwrap(), b"line\n");
    }

    #[test]
    fn reconnects_after_the_peer_goes_away() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let backend = ConsoleBackend::Socket(path.clone());
        let mut dev = Dev::new(|irq| Console::new(&backend, irq).unwrap());
        let (mut conn, _) = listener.accept().unwrap();

        let mem = mem();
        let mut guest = Guest::new(&mem);
        guest.post_rx(64);
        dev.activate(&guest, false);
        guest.send(&[b"one "]);
        dev.kick(TRANSMITQ);
        dev.settle();
        assert_eq!(drain(&mut conn), b"one ");

        // The peer goes away, and nobody listens for a while. The device
        // sees end of file on its input and starts retrying.
        drop(conn);
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        dev.settle();
        assert!(!dev.connected());
        // Output while disconnected is held back, not dropped: at most one
        // chain is taken into the host buffer, the rest stays queued.
        guest.send(&[b"two "]);
        guest.send(&[b"three"]);
        dev.kick(TRANSMITQ);
        dev.run_for(350);
        assert!(!dev.connected());
        // "one " and the buffered "two "; "three" waits in the queue.
        assert_eq!(guest.used_idx(TRANSMITQ), 2);

        // Someone listens again: the device reconnects and delivers.
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut conn = None;
        dev.run_until(|_| {
            if conn.is_none() {
                conn = listener.accept().ok().map(|(c, _)| c);
            }
            conn.is_some()
        });
        let mut conn = conn.unwrap();
        dev.run_until(|d| d.connected() && guest.used_idx(TRANSMITQ) == 3);
        dev.settle();
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 9];
        conn.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"two three");
        // Input works on the new connection.
        conn.write_all(b"back").unwrap();
        dev.run_until(|_| guest.used_idx(RECEIVEQ) == 1);
        assert_eq!(guest.used(RECEIVEQ), vec![(0, 4)]);
        assert_eq!(guest.read(BUF_BASE, 4), b"back");
        // The retry timer is off again.
        assert!(!dev.lock().timer_armed);
    }

    #[test]
    fn write_failure_on_unreconnectable_stream_holds_output() {
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let (a, peer) = UnixStream::pair().unwrap();
        let mut dev = Dev::on_stream(a);
        dev.activate(&guest, false);
        drop(peer);
        guest.send(&[b"lost?"]);
        guest.send(&[b"kept"]);
        dev.kick(TRANSMITQ);
        dev.settle();
        // EPIPE: disconnected; the second chain is still queued.
        assert!(!dev.connected());
        assert!(guest.used_idx(TRANSMITQ) <= 1);
        assert!(dev.watched().is_empty());
    }

    #[test]
    fn malformed_chains_are_completed_empty() {
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let (a, mut peer) = UnixStream::pair().unwrap();
        let mut dev = Dev::on_stream(a);
        dev.activate(&guest, false);

        // Transmit: outside memory, straddling its end, only writable.
        guest.add_chain(TRANSMITQ, &[(0xffff_0000, 16, R)]);
        guest.add_chain(TRANSMITQ, &[(MEM_SIZE as u64 - 4, 16, R)]);
        let w = guest.alloc(16);
        guest.add_chain(TRANSMITQ, &[(w, 16, W)]);
        guest.send(&[b"still ", b"alive"]);
        dev.kick(TRANSMITQ);
        dev.settle();
        assert_eq!(drain(&mut peer), b"still alive");
        assert_eq!(guest.used(TRANSMITQ), vec![(0, 0), (1, 0), (2, 0), (3, 0)]);

        // Receive: outside memory, only readable, zero length.
        guest.add_chain(RECEIVEQ, &[(0xffff_0000, 16, W)]);
        let r = guest.alloc(16);
        guest.add_chain(RECEIVEQ, &[(r, 16, R)]);
        guest.add_chain(RECEIVEQ, &[(r, 0, W)]);
        let good = guest.post_rx(16);
        peer.write_all(b"ok").unwrap();
        dev.kick(RECEIVEQ);
        dev.settle();
        assert_eq!(guest.used(RECEIVEQ), vec![(0, 0), (1, 0), (2, 0), (3, 2)]);
        assert_eq!(guest.read(good, 2), b"ok");
    }

    #[test]
    fn bogus_avail_index_needs_reset_without_spinning() {
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let (a, _peer) = UnixStream::pair().unwrap();
        let mut dev = Dev::on_stream(a);
        dev.activate(&guest, true);
        // More entries than the queue holds.
        guest.tx.set_avail_idx(QUEUE_SIZE + 5);
        dev.kick(TRANSMITQ);
        dev.settle();
        assert!(dev.lock().interrupt().needs_reset());
        // Reset and a fresh activation bring it back.
        dev.lock().reset();
        let mem2 = self::mem();
        let mut guest2 = Guest::new(&mem2);
        dev.activate(&guest2, false);
        guest2.send(&[b"x"]);
        dev.kick(TRANSMITQ);
        dev.settle();
        assert_eq!(guest2.used_idx(TRANSMITQ), 1);
    }

    #[test]
    fn reset_stops_queue_processing() {
        let mem = mem();
        let mut guest = Guest::new(&mem);
        let (a, mut peer) = UnixStream::pair().unwrap();
        let mut dev = Dev::on_stream(a);
        dev.activate(&guest, false);
        guest.post_rx(16);
        dev.kick(RECEIVEQ);
        dev.settle();
        assert_eq!(dev.watched().len(), 1);
        dev.lock().reset();
        peer.write_all(b"ignored").unwrap();
        guest.send(&[b"ignored"]);
        dev.kick(TRANSMITQ);
        dev.settle();
        assert_eq!(guest.used_idx(RECEIVEQ), 0);
        assert_eq!(guest.used_idx(TRANSMITQ), 0);
        assert!(drain(&mut peer).is_empty());
        assert!(dev.watched().is_empty());
    }

    #[test]
    fn file_backend_appends() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("console.log");
        std::fs::write(&path, "old\n").unwrap();
        let backend: ConsoleBackend = format!("file={}", path.display()).parse().unwrap();
        let mut dev = Dev::new(|irq| Console::new(&backend, irq).unwrap());
        let mem = mem();
        let mut guest = Guest::new(&mem);
        guest.post_rx(16);
        dev.activate(&guest, false);
        guest.send(&[b"new\n"]);
        dev.kick(TRANSMITQ);
        dev.settle();
        assert_eq!(std::fs::read(&path).unwrap(), b"old\nnew\n");
        assert_eq!(guest.used_idx(RECEIVEQ), 0);
        // The file cannot be a missing directory.
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let bad = dir.as_path().join("no/such/dir");
        let e = Console::new(&ConsoleBackend::File(bad.clone()), irq)
            .err()
            .unwrap();
        assert!(e.to_string().contains(bad.to_str().unwrap()), "{e}");
    }

    #[test]
    fn stdio_backend_starts() {
        // Whatever stdin is under the test runner (a terminal, a pipe or
        // /dev/null), activation must not fail or spin.
        let mut dev = Dev::new(|irq| Console::new(&ConsoleBackend::Stdio, irq).unwrap());
        let mem = mem();
        let mut guest = Guest::new(&mem);
        guest.post_rx(16);
        dev.activate(&guest, false);
        dev.run_for(20);
        assert!(dev.connected());
    }
}
