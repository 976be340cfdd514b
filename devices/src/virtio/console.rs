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
//! A snapshot keeps the guest output the backend had not taken yet (at
//! most [`CHUNK`] bytes) and how far a chain taken in pieces was taken; the
//! restored console writes it to its own backend first.
//!
//! This file is the device: queues, flow control and the event loop's view
//! of the backend. The backend itself (opening, reading, writing, losing
//! and reconnecting a socket) is in `endpoint.rs`, and the tests, which
//! drive both through a peer socket, in `tests.rs`.

mod endpoint;
#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, info, warn};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use self::endpoint::{Direction, Endpoint, Host};
use super::queue::{drain, ChainError, Drained, Handled};
use super::{
    read_config_bytes, watch, ActivateContext, ActivateError, DeviceState, Interrupt, VirtioDevice,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::snapshot::{
    restore_activation, BlobDir, ConsoleSnapshot, DeviceExtra, DeviceSnapshot, SnapshotError,
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
/// Most chains one queue event (or one readiness of the input) serves
/// before the device thread turns to the other devices: a guest that keeps
/// refilling its transmit queue towards a file or stdout, which never push
/// back, would otherwise hold that thread for as long as it likes. The
/// rest is served on the next turn of the loop.
pub const CHAINS_PER_EVENT: usize = 64;

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

/// The virtio console device.
pub struct Console {
    host: Host,
    interrupt: Arc<Interrupt>,
    queue_events: Vec<EventFd>,
    timer: TimerFd,
    timer_armed: bool,
    config: [u8; 12],
    state: DeviceState,

    /// Host to guest scratch buffer.
    rx_buf: Vec<u8>,
    /// The guest posted no receive buffer: input is not watched until it
    /// notifies the receive queue.
    rx_stalled: bool,
    /// Bytes of the chain at the head of the transmit queue already moved to
    /// `tx_buf` (chains longer than [`CHUNK`] are taken in pieces).
    tx_chain_offset: usize,
    /// EPOLLOUT cannot be watched on the output fd: retry on the timer.
    output_unpollable: bool,

    /// Longest the notifying vCPU thread waits for a reader that pushed
    /// back ([`VCPU_WAIT`]).
    vcpu_wait: Duration,

    /// Backend fds in the event loop, with the events watched.
    registered: Vec<(RawFd, EventSet)>,
}

impl Console {
    /// A console on `backend` that raises its interrupt through
    /// `interrupt_evt`. A socket backend connects now.
    pub fn new(backend: &ConsoleBackend, interrupt_evt: EventFd) -> Result<Console, ConsoleError> {
        Self::with_endpoint(Endpoint::open(backend)?, interrupt_evt)
    }

    /// A console on a connected stream that is not reconnected when lost.
    #[cfg(test)]
    fn from_stream(
        stream: std::os::unix::net::UnixStream,
        interrupt_evt: EventFd,
    ) -> Result<Console, ConsoleError> {
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
            host: Host::new(endpoint),
            interrupt: Arc::new(Interrupt::new(interrupt_evt)),
            queue_events,
            timer,
            timer_armed: false,
            config,
            state: DeviceState::Inactive,
            rx_buf: Vec::new(),
            rx_stalled: false,
            tx_chain_offset: 0,
            output_unpollable: false,
            vcpu_wait: VCPU_WAIT,
            registered: Vec::new(),
        })
    }

    fn activated(&self) -> bool {
        self.state.is_running()
    }

    fn has_pending_output(&self) -> bool {
        self.host.has_pending_output()
    }

    /// Moves guest output to the backend until the transmit queue is empty,
    /// the backend pushes back, or [`CHAINS_PER_EVENT`] chains were taken
    /// (then the queue event is re-armed, so the event loop comes back).
    fn process_tx(&mut self) {
        // Held-back output goes first: no chain is taken while the backend
        // has not taken the last one.
        if !self.host.flush_output() {
            return;
        }
        let Some(active) = self.state.running() else {
            return;
        };
        let (host, offset) = (&mut self.host, &mut self.tx_chain_offset);
        let drained = drain(active, TRANSMITQ, Some(CHAINS_PER_EVENT), |mem, chain| {
            take_output(host, offset, mem, chain)
        });
        if drained == Drained::Budget {
            if let Err(e) = self.queue_events[TRANSMITQ].write(1) {
                warn!("virtio-console: cannot re-arm the transmit queue event: {e}");
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
        while self.has_pending_output() && !self.host.output_broken && self.activated() {
            let Some(fd) = self.host.endpoint.output_fd() else {
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
            if ret < 0 {
                // Interrupted by a kick: the event loop takes over.
                return;
            }
            if ret == 0 {
                // Timed out: the deadline above decides (a timer may fire
                // a hair before the monotonic clock reaches it).
                continue;
            }
            self.process_tx();
        }
    }

    /// Moves backend input into the guest's receive buffers; called when
    /// the input fd is readable. At most [`CHAINS_PER_EVENT`] buffers are
    /// filled per call: input left over keeps the fd readable, and the
    /// event loop (level-triggered) comes back for it on its next turn.
    fn process_rx(&mut self) {
        if self.host.input_closed || !self.host.endpoint.connected() {
            return;
        }
        let Some(active) = self.state.running() else {
            return;
        };
        let may_block = self.host.endpoint.input_may_block();
        let (endpoint, rx_buf) = (&mut self.host.endpoint, &mut self.rx_buf);
        let mut failure = None;
        let drained = drain(active, RECEIVEQ, Some(CHAINS_PER_EVENT), |mem, chain| {
            let mut writer = match chain.writer(mem) {
                Ok(w) => w,
                Err(e) => return Handled::Malformed(ChainError::Malformed(e)),
            };
            let cap = writer.available_bytes().min(CHUNK);
            if cap == 0 {
                return Handled::Malformed(ChainError::NoWritable);
            }
            rx_buf.resize(cap, 0);
            loop {
                match endpoint.read(&mut rx_buf[..cap]) {
                    Ok(0) => {
                        failure = Some(io::Error::new(io::ErrorKind::UnexpectedEof, "end of file"));
                        return Handled::Stop;
                    }
                    Ok(n) => {
                        if let Err(e) = writer.write_all(&rx_buf[..n]) {
                            warn!("virtio-console: cannot write a receive chain: {e}");
                        }
                        // n <= CHUNK, which fits in u32.
                        let len = writer.bytes_written() as u32;
                        // An fd that may block is read once per readiness event.
                        return if may_block {
                            Handled::UsedAndStop(len)
                        } else {
                            Handled::Used(len)
                        };
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Handled::Stop,
                    Err(e) => {
                        failure = Some(e);
                        return Handled::Stop;
                    }
                }
            }
        });
        if drained == Drained::Empty {
            // No buffer left: input waits until the guest posts more.
            self.rx_stalled = true;
        }
        if let Some(e) = failure {
            self.host.failed(Direction::Input, e);
        }
    }

    fn on_timer(&mut self) {
        // The timer may have been re-armed since it fired; only read an
        // armed one (a disarmed timerfd would block the read forever).
        if matches!(self.timer.is_armed(), Ok(true)) {
            let _ = self.timer.wait();
        }
        self.host.endpoint.reconnect();
        if self.host.endpoint.connected() {
            // Held-back output goes first, then the queue resumes.
            self.process_tx();
        }
    }

    /// Brings the event loop's view of the backend fds and the timer in line
    /// with what the device needs now.
    fn sync_interest(&mut self, ops: &mut EventOps) {
        let mut desired: Vec<(RawFd, EventSet)> = Vec::with_capacity(2);
        if self.activated() && !self.rx_stalled && !self.host.input_closed {
            if let Some(fd) = self.host.endpoint.input_fd() {
                desired.push((fd, EventSet::IN));
            }
        }
        if self.has_pending_output() && !self.output_unpollable && !self.host.output_broken {
            if let Some(fd) = self.host.endpoint.output_fd() {
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
        self.host.closing.clear();

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
                            self.host.input_closed = true;
                        }
                        if set.contains(EventSet::OUT) {
                            debug!("virtio-console: output cannot be watched ({e}); retrying on a timer");
                            self.output_unpollable = true;
                        }
                    }
                },
            }
        }

        let want_timer = self.host.endpoint.wants_reconnect()
            || (self.output_unpollable && self.has_pending_output() && !self.host.output_broken);
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

/// The transmit handler: moves one chain into `host`'s output buffer, at
/// most [`CHUNK`] bytes at a time, writing each piece to the backend before
/// taking the next. When the backend pushes back in the middle of a chain,
/// the chain stays at the head of the queue and `offset` says where to
/// resume; when it pushes back after the last piece, the chain is used (its
/// bytes are in the host buffer) and draining stops there.
fn take_output(
    host: &mut Host,
    offset: &mut usize,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Handled {
    let mut reader = match chain.reader(mem) {
        Ok(r) => r,
        Err(e) => {
            *offset = 0;
            return Handled::Malformed(ChainError::Malformed(e));
        }
    };
    let total = reader.available_bytes();
    if total == 0 {
        *offset = 0;
        return Handled::Malformed(ChainError::NoReadable);
    }
    let start = (*offset).min(total);
    let mut rest = if start == 0 {
        reader
    } else {
        match reader.split_at(start) {
            Ok(rest) => rest,
            Err(e) => {
                *offset = 0;
                return Handled::Malformed(ChainError::Resume(e));
            }
        }
    };
    *offset = start;
    loop {
        let n = rest.available_bytes().min(CHUNK);
        host.tx_buf.resize(n, 0);
        host.tx_pos = 0;
        if let Err(e) = rest.read_exact(&mut host.tx_buf) {
            host.tx_buf.clear();
            *offset = 0;
            return Handled::Malformed(ChainError::Read(e));
        }
        *offset += n;
        if *offset >= total {
            *offset = 0;
            return if host.flush_output() {
                Handled::Used(0)
            } else {
                Handled::UsedAndStop(0)
            };
        }
        if !host.flush_output() {
            return Handled::Stop;
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
        index == TRANSMITQ && self.host.endpoint.is_socket()
    }

    /// Only the transmit queue of a socket console comes here.
    fn queue_notify(&mut self, index: usize) {
        debug_assert!(self.notified_in_vcpu(index));
        self.process_tx();
        self.wait_for_reader();
        // What is left for the event loop: output the socket would not take
        // (watch EPOLLOUT), a lost connection (close it, then reconnect), or
        // a queue found broken.
        if self.has_pending_output() || !self.host.closing.is_empty() || !self.activated() {
            let _ = self.queue_events[TRANSMITQ].write(1);
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.state
            .activate(ctx, &self.interrupt, "virtio-console", 2)?;
        self.rx_stalled = false;
        self.tx_chain_offset = 0;
        Ok(())
    }

    fn reset(&mut self) {
        // Guest output already taken stays pending and is still delivered.
        self.state.reset();
        self.rx_stalled = false;
        self.tx_chain_offset = 0;
    }

    /// Writes what the backend takes now of the guest output held; what
    /// it does not take (at most [`CHUNK`] bytes) is saved, with how far
    /// the chain at the head of the transmit queue was taken. Input is not
    /// held: it is read only into the guest's buffers.
    fn snapshot(&mut self, _blobs: &BlobDir) -> Result<DeviceSnapshot, SnapshotError> {
        self.host.flush_output();
        let pending_output = self.host.tx_buf.get(self.host.tx_pos..).unwrap_or_default();
        Ok(self.state.snapshot(DeviceExtra::Console(ConsoleSnapshot {
            pending_output: pending_output.to_vec(),
            tx_chain_offset: self.tx_chain_offset as u64,
        })))
    }

    /// The saved output is written to this console's backend once the
    /// transport's kick sets the transmit queue going.
    fn restore(
        &mut self,
        snap: &DeviceSnapshot,
        ctx: Option<ActivateContext>,
        blobs: &BlobDir,
    ) -> Result<(), SnapshotError> {
        let DeviceExtra::Console(c) = &snap.extra else {
            return Err(snap.extra.wrong(blobs, "console"));
        };
        let invalid = |reason: String| SnapshotError::Invalid {
            device: blobs.name(),
            reason,
        };
        if c.pending_output.len() > CHUNK {
            return Err(invalid(format!(
                "{} bytes of pending output; the console holds at most {CHUNK}",
                c.pending_output.len()
            )));
        }
        // Any offset is safe (`take_output` clamps it to the chain's
        // length), but only an activated device has a chain in progress.
        let offset = usize::try_from(c.tx_chain_offset)
            .ok()
            .filter(|&o| o == 0 || snap.queues.is_some())
            .ok_or_else(|| {
                invalid(format!(
                    "transmit chain offset {} without an activated device",
                    c.tx_chain_offset
                ))
            })?;
        restore_activation(self, snap, ctx, blobs, |d| &mut d.state)?;
        self.tx_chain_offset = offset;
        self.host.tx_buf = c.pending_output.clone();
        self.host.tx_pos = 0;
        Ok(())
    }
}

impl MutEventSubscriber for Console {
    fn init(&mut self, ops: &mut EventOps) {
        let fixed = [
            Events::with_data(&self.queue_events[RECEIVEQ], EV_RX_QUEUE, EventSet::IN),
            Events::with_data(&self.queue_events[TRANSMITQ], EV_TX_QUEUE, EventSet::IN),
            Events::with_data(&self.timer, EV_TIMER, EventSet::IN),
        ];
        watch(ops, "virtio-console", &fixed);
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
                if (failed || set.contains(EventSet::OUT)) && fd == self.host.endpoint.output_fd() {
                    self.process_tx();
                }
                if (failed || set.contains(EventSet::IN)) && fd == self.host.endpoint.input_fd() {
                    self.process_rx();
                }
            }
            EV_TIMER => self.on_timer(),
            other => warn!("virtio-console: unexpected event tag {other}"),
        }
        self.sync_interest(ops);
    }
}
