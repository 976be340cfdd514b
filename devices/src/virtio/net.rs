//! virtio-net (device id 1): one network card on a unix stream socket that
//! speaks QEMU's `-netdev stream` framing (see `net/stream.rs`), usually a
//! port of Skiff's VLAN switch.
//!
//! Queue 0 (receiveq) takes frames from the socket to the guest, queue 1
//! (transmitq) from the guest to the socket. Features: the MAC address in
//! config space (`MAC`), the link state (`STATUS`, switched by
//! [`Net::set_link`], which the guest sees as carrier), mergeable receive
//! buffers (`MRG_RXBUF`), EVENT_IDX, and checksum and TCP segmentation
//! offload (`CSUM`, `GUEST_CSUM`, `HOST_TSO4`, `HOST_TSO6`), which the card
//! completes itself since the socket carries plain frames, and receive
//! segment joining (`GUEST_TSO4`, `GUEST_TSO6`) (`net/offload.rs`).
//!
//! Flow control never blocks a vCPU or the event loop and loses nothing it
//! does not count (frames in the output buffer when the connection is lost
//! count as dropped, an upper bound: some may have reached the peer):
//! * transmit: a chain's frame is copied into the socket's bounded output
//!   buffer. While that buffer is full the device takes no more chains (the
//!   guest's queue fills and its driver stops the interface) and resumes on
//!   EPOLLOUT. With the link down or the peer gone, frames are dropped and
//!   counted, as a card without a cable drops them.
//! * receive: frames are read from the socket only while the guest has
//!   receive buffers; without them the socket is left alone (the peer, a
//!   switch, queues or drops) until the guest posts more. A frame goes into
//!   one chain, or with mergeable buffers into as many as it needs, all
//!   published at once (`Handled::Part`); one too large for a chain without
//!   mergeable buffers is dropped and counted.
//!
//! Every chain is untrusted: a transmit chain shorter than the header, with
//! a device-writable buffer, or holding more than a frame, and a receive
//! chain with a device-readable buffer, are completed empty and logged by
//! the queue core (rate-limited), never a panic.
//!
//! A snapshot keeps the MAC address and the link state; frames in the
//! socket's buffers (output the peer has not taken, input not yet given to
//! the guest) are not saved and are lost, as a network may lose any frame.
//!
//! The tests, which drive the device through a peer socket, are in
//! `net/tests.rs`.

mod offload;
mod stream;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, info, warn};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use self::offload::{
    checksum_verified, coalesce, Joined, TxHeader, HDR_F_DATA_VALID, OFFLOAD_FEATURES,
};
pub use self::offload::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
};
use self::stream::{Io, Stream};
pub use self::stream::{ETH_HLEN, MAX_FRAME_LEN};
use super::queue::{drain, ChainError, Drained, Handled};
use super::{
    read_config_bytes, watch, ActivateContext, ActivateError, DeviceState, Interrupt, VirtioDevice,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::snapshot::{
    restore_activation, BlobDir, DeviceExtra, DeviceSnapshot, NetSnapshot, SnapshotError,
};

/// virtio device id of a network card.
pub const NET_DEVICE_ID: u32 = 1;
/// Largest size of each queue.
pub const NET_QUEUE_SIZE: u16 = 256;
/// The device has a MAC address in config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The driver may merge receive buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// The config space has a link status.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// Link status bit: up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// Bytes of the virtio-net header in front of every frame (virtio 1.x:
/// always with `num_buffers`).
pub const NET_HDR_LEN: usize = 12;
/// How often a lost socket connection is retried.
pub const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);
/// Most transmit chains taken per event, so that one busy card cannot
/// starve the other devices on the event loop.
pub const TX_CHAINS_PER_EVENT: usize = 256;
/// Most receive chains one frame may take (more means buffers too small
/// to be a network driver's); never more than the receive queue holds, or
/// the frame would wait forever for a ring that cannot hold it.
pub const MAX_RX_CHAINS_PER_FRAME: usize = 64;
/// Most rounds of [`Net::process_tx`] per event (a round ends where the
/// socket pushed back and then took everything): with a fast reader and a
/// fast guest, one event must still end.
const TX_ROUNDS_PER_EVENT: usize = 4;

const RECEIVEQ: usize = 0;
const TRANSMITQ: usize = 1;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;

// Event data tags.
const EV_RX_QUEUE: u32 = 0;
const EV_TX_QUEUE: u32 = 1;
const EV_SOCKET: u32 = 2;
const EV_TIMER: u32 = 3;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// Why a MAC address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacAddrError {
    /// Not six pairs of hex digits separated by colons.
    #[error(
        "'{0}' is not a MAC address (expected six pairs of hex digits such as 52:54:00:12:01:01)"
    )]
    Syntax(String),
    /// The group bit is set: a card's own address must be unicast.
    #[error("'{0}' is a multicast address; a network card needs a unicast one")]
    Multicast(String),
}

impl FromStr for MacAddr {
    type Err = MacAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || MacAddrError::Syntax(s.to_owned());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(syntax)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(syntax());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        if mac[0] & 1 != 0 {
            return Err(MacAddrError::Multicast(s.to_owned()));
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Where a card's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// A unix stream socket with QEMU's `-netdev stream` framing.
    Stream(PathBuf),
}

/// One network card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Where its frames go.
    pub backend: NetBackend,
    /// Its MAC address.
    pub mac: MacAddr,
    /// Its name for QMP `set_link` and log lines (the VMM gives `net0`,
    /// `net1` ... when none is set).
    pub id: Option<String>,
}

/// Why a card could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The stream socket could not be connected.
    #[error("cannot connect the network socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// An eventfd or timerfd could not be created.
    #[error("cannot create an eventfd or timerfd: {0}")]
    EventFd(io::Error),
}

/// Frames and bytes counted by a card since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames sent by the guest and passed on.
    pub tx_frames: u64,
    /// Their bytes (Ethernet frames, without headers).
    pub tx_bytes: u64,
    /// Frames sent by the guest and dropped (link down, peer gone).
    pub tx_dropped: u64,
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames from the peer dropped (link down, driver not ready, a frame
    /// too large for the guest's buffers, shorter than a header).
    pub rx_dropped: u64,
}

/// Where the frame being received stands, within one drain.
#[derive(Default)]
struct RxUnit {
    /// Bytes of header and frame written so far.
    written: usize,
    /// Chains taken so far.
    chains: usize,
    /// Where the first chain's `num_buffers` lies (its two bytes may lie
    /// in two descriptors).
    num_buffers_at: [Option<GuestAddress>; 2],
    /// The frames joined into the card's `rx_joined`, when this unit
    /// delivers a joined segment instead of the stream's next frame.
    joined: Option<Joined>,
}

/// The virtio network card.
pub struct Net {
    name: String,
    id: String,
    mac: MacAddr,
    link_up: bool,
    stream: Stream,
    interrupt: Arc<Interrupt>,
    queue_events: Vec<EventFd>,
    timer: TimerFd,
    timer_armed: bool,
    state: DeviceState,
    mergeable: bool,
    /// The offload features the driver acked.
    offloads: u64,
    /// Segments being built from a large transmit frame.
    tx_segment: Vec<u8>,
    /// No receive buffer left: the socket is not read until the guest
    /// posts some.
    rx_stalled: bool,
    /// The segment being received, joined from several frames.
    rx_joined: Vec<u8>,
    /// The socket fd the event loop watches, and for what.
    registered: Option<(RawFd, EventSet)>,
    counters: NetCounters,
    tx_frame: Vec<u8>,
}

impl Net {
    /// A card for `config` that raises its interrupt through
    /// `interrupt_evt`; connects its socket now.
    pub fn new(config: &NetConfig, interrupt_evt: EventFd) -> Result<Net, NetError> {
        let id = config.id.clone().unwrap_or_else(|| "net0".to_owned());
        let name = format!("virtio-net {id}");
        let stream = match &config.backend {
            NetBackend::Stream(path) => {
                Stream::connect(path, &name).map_err(|source| NetError::Connect {
                    path: path.clone(),
                    source,
                })?
            }
        };
        Self::with_stream(stream, id, config.mac, interrupt_evt)
    }

    /// A card on a connected socket that is not reconnected when lost.
    fn from_socket(
        sock: std::os::unix::net::UnixStream,
        mac: MacAddr,
        interrupt_evt: EventFd,
    ) -> Result<Net, NetError> {
        let stream = Stream::from_socket(sock, "virtio-net test").map_err(NetError::EventFd)?;
        Self::with_stream(stream, "test".to_owned(), mac, interrupt_evt)
    }

    fn with_stream(
        stream: Stream,
        id: String,
        mac: MacAddr,
        interrupt_evt: EventFd,
    ) -> Result<Net, NetError> {
        let queue_events = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(NetError::EventFd)?;
        let timer = TimerFd::new().map_err(|e| NetError::EventFd(e.into()))?;
        Ok(Net {
            name: format!("virtio-net {id}"),
            id,
            mac,
            link_up: true,
            stream,
            interrupt: Arc::new(Interrupt::new(interrupt_evt)),
            queue_events,
            timer,
            timer_armed: false,
            state: DeviceState::Inactive,
            mergeable: false,
            offloads: 0,
            tx_segment: Vec::new(),
            rx_stalled: false,
            rx_joined: Vec::new(),
            registered: None,
            counters: NetCounters::default(),
            tx_frame: Vec::new(),
        })
    }

    /// The card's id (`net0` ...).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the link is up.
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// Plugs or unplugs the cable: the guest sees the carrier change (a
    /// config change interrupt), and while down no frame passes either way.
    pub fn set_link(&mut self, up: bool) {
        if self.link_up == up {
            return;
        }
        self.link_up = up;
        info!("{}: link {}", self.name, if up { "up" } else { "down" });
        if self.state.is_running() {
            self.interrupt.signal_config();
        }
    }

    /// What the card counted so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    fn config_space(&self) -> [u8; 8] {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac.0);
        let status = if self.link_up {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        };
        config[6..].copy_from_slice(&status.to_le_bytes());
        config
    }

    /// Takes guest frames to the socket until the transmit queue is empty,
    /// the socket pushes back, or the per-event budget is spent.
    fn process_tx(&mut self) {
        for _ in 0..TX_ROUNDS_PER_EVENT {
            // Held-back output goes first; while the socket pushes back,
            // EPOLLOUT brings the device back here.
            if self.stream.flush() == Io::WouldBlock {
                return;
            }
            let Some(active) = self.state.running() else {
                return;
            };
            let (stream, frame, counters, segment) = (
                &mut self.stream,
                &mut self.tx_frame,
                &mut self.counters,
                &mut self.tx_segment,
            );
            let link_up = self.link_up;
            let offloads = self.offloads;
            let drained = drain(
                active,
                TRANSMITQ,
                Some(TX_CHAINS_PER_EVENT),
                |mem, chain| {
                    let header = match read_tx_frame(mem, chain, frame) {
                        Ok(h) => h,
                        Err(e) => return Handled::Malformed(e),
                    };
                    if !link_up || !stream.connected() {
                        counters.tx_dropped += 1;
                        return Handled::Used(0);
                    }
                    let mut send = |f: &[u8]| {
                        stream.push(f);
                        counters.tx_frames += 1;
                        counters.tx_bytes += f.len() as u64;
                    };
                    if let Err(e) = offload::transmit(&header, offloads, frame, segment, &mut send)
                    {
                        return Handled::Malformed(ChainError::Invalid(e));
                    }
                    if stream.output_full() && stream.flush() == Io::WouldBlock {
                        return Handled::UsedAndStop(0);
                    }
                    Handled::Used(0)
                },
            );
            match drained {
                // The socket pushed back: chains are left, with
                // notifications off. Once the output is out (now, or on
                // EPOLLOUT), the queue is taken up again.
                Drained::Stopped => continue,
                Drained::Budget => {
                    // Let other devices run; come back on the next turn.
                    if let Err(e) = self.queue_events[TRANSMITQ].write(1) {
                        warn!("{}: cannot re-arm the transmit queue event: {e}", self.name);
                    }
                }
                Drained::Empty | Drained::Retry | Drained::Broken => {}
            }
            self.stream.flush();
            return;
        }
        // Rounds spent: come back on the next turn of the event loop.
        if let Err(e) = self.queue_events[TRANSMITQ].write(1) {
            warn!("{}: cannot re-arm the transmit queue event: {e}", self.name);
        }
    }

    /// Reads the socket once and gives the guest every whole frame read,
    /// until its receive buffers run out.
    fn process_rx(&mut self) {
        if self.rx_stalled {
            return;
        }
        if self.stream.fill() == Io::Disconnected {
            return;
        }
        self.deliver_frames();
    }

    /// Gives the guest the frames already read, as long as it has buffers;
    /// drops them while the link is down or the driver is not ready.
    fn deliver_frames(&mut self) {
        let running = self.state.is_running();
        if !running || !self.link_up {
            while self.stream.frame().is_some() {
                self.stream.consume();
                self.counters.rx_dropped += 1;
            }
            return;
        }
        loop {
            let Some(active) = self.state.running() else {
                return;
            };
            let mode = RxMode {
                mergeable: self.mergeable,
                offloads: self.offloads,
                max_chains: usize::from(active.queues[RECEIVEQ].size())
                    .min(MAX_RX_CHAINS_PER_FRAME),
            };
            let (stream, counters, joined) =
                (&mut self.stream, &mut self.counters, &mut self.rx_joined);
            let mut unit = RxUnit::default();
            let drained = drain(active, RECEIVEQ, None, |mem, chain| {
                let handled = receive_into(mem, chain, stream, joined, counters, &mut unit, mode);
                if matches!(handled, Handled::Malformed(_)) {
                    // The chains of the frame so far are completed empty;
                    // the frame starts over in the next chain.
                    unit = RxUnit::default();
                }
                handled
            });
            match drained {
                Drained::Retry => continue,
                Drained::Empty => {
                    // Out of buffers with frames left: wait for the guest.
                    if self.stream.frame().is_some() {
                        self.rx_stalled = true;
                    }
                    return;
                }
                Drained::Stopped | Drained::Budget | Drained::Broken => return,
            }
        }
    }

    fn on_timer(&mut self) {
        // Only read an armed timer: a disarmed timerfd's read would block.
        if matches!(self.timer.is_armed(), Ok(true)) {
            let _ = self.timer.wait();
        }
        self.stream.reconnect();
    }

    /// Brings the event loop's view of the socket and the timer in line
    /// with what the card needs now.
    fn sync_interest(&mut self, ops: &mut EventOps) {
        let desired = self.stream.fd().and_then(|fd| {
            let mut set = EventSet::empty();
            if !self.rx_stalled {
                set |= EventSet::IN;
            }
            if self.stream.pending_output() > 0 {
                set |= EventSet::OUT;
            }
            (!set.is_empty()).then_some((fd, set))
        });
        if self.registered != desired {
            // A lost connection's fd leaves epoll before it is closed.
            if let Some((fd, set)) = self.registered.take() {
                if let Err(e) = ops.remove(Events::with_data_raw(fd, EV_SOCKET, set)) {
                    warn!("{}: cannot stop watching fd {fd}: {e}", self.name);
                }
            }
            if let Some((fd, set)) = desired {
                match ops.add(Events::with_data_raw(fd, EV_SOCKET, set)) {
                    Ok(()) => self.registered = desired,
                    Err(e) => error!("{}: cannot watch the socket: {e}", self.name),
                }
            }
        }
        self.stream.closing.clear();

        let want_timer = self.stream.wants_reconnect();
        if want_timer != self.timer_armed {
            let result = if want_timer {
                self.timer
                    .reset(RECONNECT_INTERVAL, Some(RECONNECT_INTERVAL))
            } else {
                self.timer.clear()
            };
            match result {
                Ok(()) => self.timer_armed = want_timer,
                Err(e) => error!("{}: cannot set the reconnect timer: {e}", self.name),
            }
        }
    }
}

/// Copies the frame of transmit chain `chain` into `frame` and returns its
/// header, checking the chain: device-readable buffers only, a header, at
/// most a frame (up to 64 KiB: a segment the card is to cut).
fn read_tx_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &mut Vec<u8>,
) -> Result<TxHeader, ChainError> {
    if chain.clone().any(|d| d.is_write_only()) {
        return Err(ChainError::Invalid("a transmit buffer is device-writable"));
    }
    let mut reader = chain.reader(mem).map_err(ChainError::Malformed)?;
    let total = reader.available_bytes();
    if total < NET_HDR_LEN + ETH_HLEN {
        return Err(ChainError::Invalid(
            "shorter than a header and an Ethernet frame header",
        ));
    }
    if total - NET_HDR_LEN > MAX_FRAME_LEN {
        return Err(ChainError::Invalid("longer than an Ethernet frame"));
    }
    let mut header = [0u8; NET_HDR_LEN];
    reader.read_exact(&mut header).map_err(ChainError::Read)?;
    frame.resize(total - NET_HDR_LEN, 0);
    reader.read_exact(frame).map_err(ChainError::Read)?;
    Ok(TxHeader::parse(&header))
}

/// What the driver negotiated for receiving, and the most chains a frame
/// may take.
#[derive(Clone, Copy)]
struct RxMode {
    mergeable: bool,
    /// The offload features acked.
    offloads: u64,
    max_chains: usize,
}

impl RxMode {
    /// Whether segments may be joined: the driver takes large segments
    /// (for either IP version; [`coalesce`] checks which), partial
    /// checksums, and buffers merged to hold them.
    fn joins(&self) -> bool {
        self.mergeable
            && self.offloads & VIRTIO_NET_F_GUEST_CSUM != 0
            && self.offloads & (VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6) != 0
    }
}

/// The receive handler: writes (part of) the next whole frame of `stream`
/// into `chain`, or the segment joined from its next frames into `joined`
/// (see [`coalesce`]). Without mergeable buffers a frame must fit one chain
/// (one that does not is dropped, and the chain offered to the next frame);
/// with them it continues into the next chains, and its first chain's
/// `num_buffers` is set once it is complete.
fn receive_into(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    stream: &mut Stream,
    joined: &mut Vec<u8>,
    counters: &mut NetCounters,
    unit: &mut RxUnit,
    mode: RxMode,
) -> Handled {
    let RxMode {
        mergeable,
        offloads,
        max_chains,
    } = mode;
    let guest_csum = offloads & VIRTIO_NET_F_GUEST_CSUM != 0;
    if chain.clone().any(|d| !d.is_write_only()) {
        return Handled::Malformed(ChainError::Invalid("a receive buffer is device-readable"));
    }
    let first = unit.chains == 0;
    if first {
        unit.num_buffers_at = locate(&chain, NUM_BUFFERS_OFFSET);
    }
    let mut writer = match chain.writer(mem) {
        Ok(w) => w,
        Err(e) => return Handled::Malformed(ChainError::Malformed(e)),
    };
    let room = writer.available_bytes();
    if first && room < NET_HDR_LEN {
        return Handled::Malformed(ChainError::Invalid(
            "a receive buffer is too small for the header",
        ));
    }
    // The frame to write: whole ones only; runts, and without mergeable
    // buffers frames too large for the chain, are dropped.
    loop {
        let Some(len) = stream.frame().map(<[u8]>::len) else {
            return Handled::Stop;
        };
        if len >= ETH_HLEN && (mergeable || NET_HDR_LEN + len <= room) {
            break;
        }
        stream.consume();
        counters.rx_dropped += 1;
    }
    if first && mode.joins() {
        unit.joined = coalesce(stream.frames(), offloads, MAX_FRAME_LEN, joined);
    }
    let frame = match unit.joined {
        Some(_) => joined.as_slice(),
        None => match stream.frame() {
            Some(f) => f,
            None => return Handled::Stop,
        },
    };
    let frame_len = frame.len();
    // The stream's frames this unit takes, and their bytes as received.
    let (frames, wire_bytes) = unit
        .joined
        .map_or((1, frame_len), |j| (j.frames, j.wire_bytes));
    let total = NET_HDR_LEN + frame_len;
    let mut wrote = 0usize;
    if first {
        let mut header = [0u8; NET_HDR_LEN];
        if let Some(j) = &unit.joined {
            header[..NUM_BUFFERS_OFFSET].copy_from_slice(&j.header);
        } else if guest_csum && checksum_verified(frame) {
            header[0] = HDR_F_DATA_VALID;
        }
        header[NUM_BUFFERS_OFFSET..].copy_from_slice(&1u16.to_le_bytes());
        if let Err(e) = writer.write_all(&header) {
            return Handled::Malformed(ChainError::Read(e));
        }
        wrote += NET_HDR_LEN;
        unit.written = NET_HDR_LEN;
    }
    let from = unit.written - NET_HDR_LEN;
    let n = (room - wrote).min(frame_len - from);
    if let Err(e) = writer.write_all(&frame[from..from + n]) {
        return Handled::Malformed(ChainError::Read(e));
    }
    wrote += n;
    unit.written += n;
    unit.chains += 1;
    // wrote <= room, a chain's length, which fits in u32.
    let wrote = wrote as u32;
    if unit.written < total {
        if unit.chains >= max_chains {
            for _ in 0..frames {
                stream.consume();
            }
            counters.rx_dropped += frames as u64;
            return Handled::Malformed(ChainError::Invalid(
                "receive buffers too small: a frame needs too many of them",
            ));
        }
        return Handled::Part(wrote);
    }
    if unit.chains > 1 {
        // unit.chains <= MAX_RX_CHAINS_PER_FRAME, which fits in u16.
        let count = (unit.chains as u16).to_le_bytes();
        for (addr, byte) in unit.num_buffers_at.iter().zip(count) {
            if let Some(addr) = addr {
                if let Err(e) = mem.write_slice(&[byte], *addr) {
                    warn!("virtio-net: cannot set num_buffers: {e}");
                }
            }
        }
    }
    counters.rx_frames += frames as u64;
    counters.rx_bytes += wire_bytes as u64;
    for _ in 0..frames {
        stream.consume();
    }
    *unit = RxUnit::default();
    Handled::Used(wrote)
}

/// Where bytes `offset` and `offset + 1` of the writable buffers of
/// `chain` lie in guest memory.
fn locate(chain: &DescriptorChain<&GuestMemoryMmap>, offset: usize) -> [Option<GuestAddress>; 2] {
    let mut found = [None, None];
    let mut start = 0usize;
    for desc in chain.clone().filter(|d| d.is_write_only()) {
        let len = desc.len() as usize;
        for (i, slot) in found.iter_mut().enumerate() {
            let at = offset + i;
            if slot.is_none() && at >= start && at < start + len {
                *slot = desc.addr().checked_add((at - start) as u64);
            }
        }
        start += len;
        if start > offset + 1 {
            break;
        }
    }
    found
}

/// Guest memory of [`fuzz_queues`].
pub const FUZZ_MEM_SIZE: usize = 0x1_0000;
/// Queue size of [`fuzz_queues`].
const FUZZ_QUEUE_SIZE: u16 = 16;

/// Drives a card's two queues from `data`: byte 0 holds the features
/// (bit 0 mergeable buffers, bit 1 EVENT_IDX) and the link (bit 2 down),
/// bytes 1-2 the length N (little-endian) of what the peer sends, which
/// follows (length prefixes included, good or not); the rest is guest
/// memory from address 0 (the transmit queue's descriptor table at 0, its
/// available ring at 0x100 and used ring at 0x140; the receive queue's at
/// 0x200, 0x300, 0x340). Every chain is taken, every frame offered. Must
/// never panic or loop; returns the card's counters.
pub fn fuzz_queues(data: &[u8]) -> NetCounters {
    use virtio_queue::{Queue, QueueT};

    let (Ok(mem), Ok((ours, mut peer))) = (
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), FUZZ_MEM_SIZE)]),
        std::os::unix::net::UnixStream::pair(),
    ) else {
        return NetCounters::default();
    };
    let flags = data.first().copied().unwrap_or(0);
    let peer_len = match data.get(1..3) {
        Some(n) => usize::from(u16::from_le_bytes([n[0], n[1]])),
        None => 0,
    };
    let rest = data.get(3..).unwrap_or_default();
    let (from_peer, guest) = rest.split_at(peer_len.min(rest.len()));
    let _ = mem.write_slice(&guest[..guest.len().min(FUZZ_MEM_SIZE)], GuestAddress(0));
    let Ok(evt) = EventFd::new(EFD_NONBLOCK) else {
        return NetCounters::default();
    };
    let Ok(mut net) = Net::from_socket(ours, MacAddr([0x52, 0x54, 0, 0, 0, 1]), evt) else {
        return NetCounters::default();
    };
    let mut queues = Vec::new();
    for base in [0x200u64, 0] {
        let Ok(mut q) = Queue::new(FUZZ_QUEUE_SIZE) else {
            return NetCounters::default();
        };
        q.set_size(FUZZ_QUEUE_SIZE);
        // Addresses below FUZZ_MEM_SIZE: they fit in u32.
        q.set_desc_table_address(Some(base as u32), Some(0));
        q.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
        q.set_used_ring_address(Some((base + 0x140) as u32), Some(0));
        q.set_event_idx(flags & 2 != 0);
        q.set_ready(true);
        let valid = q.is_valid(&mem);
        q.set_ready(valid);
        queues.push(q);
    }
    let mut features = net.features();
    if flags & 1 == 0 {
        features &= !VIRTIO_NET_F_MRG_RXBUF;
    }
    if net
        .activate(ActivateContext {
            mem: mem.clone(),
            queues,
            acked_features: features,
        })
        .is_err()
    {
        return net.counters();
    }
    let _ = peer.set_nonblocking(true);
    let _ = peer.write(from_peer);
    if flags & 4 != 0 {
        net.set_link(false);
    }
    net.process_tx();
    net.process_rx();
    // Frames left for more buffers stay; offering them again must end.
    net.rx_stalled = false;
    net.deliver_frames();
    net.counters()
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        NET_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[NET_QUEUE_SIZE, NET_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_EVENT_IDX
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_MRG_RXBUF
            | OFFLOAD_FEATURES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.mergeable = ctx.acked_features & VIRTIO_NET_F_MRG_RXBUF != 0;
        self.offloads = ctx.acked_features & OFFLOAD_FEATURES;
        let taken: Vec<&str> = [
            (VIRTIO_NET_F_CSUM, "checksum"),
            (VIRTIO_NET_F_HOST_TSO4, "TSO4"),
            (VIRTIO_NET_F_HOST_TSO6, "TSO6"),
            (VIRTIO_NET_F_GUEST_CSUM, "receive checksum"),
            (VIRTIO_NET_F_GUEST_TSO4, "receive TSO4"),
            (VIRTIO_NET_F_GUEST_TSO6, "receive TSO6"),
        ]
        .into_iter()
        .filter(|(bit, _)| self.offloads & bit != 0)
        .map(|(_, name)| name)
        .collect();
        info!(
            "{}: offloads the driver took: {}",
            self.name,
            if taken.is_empty() {
                "none".to_owned()
            } else {
                taken.join(", ")
            }
        );
        let name = self.name.clone();
        self.state.activate(ctx, &self.interrupt, &name, 2)?;
        self.rx_stalled = false;
        Ok(())
    }

    fn reset(&mut self) {
        self.state.reset();
        self.rx_stalled = false;
    }

    /// Writes what the socket takes now of the framed output; what it does
    /// not take, and frames read but not yet given to the guest, are not
    /// saved: they are lost with the old process, as a network may lose
    /// any frame (a unit of receive chains never spans two drains, so no
    /// frame is half given). The card's config space (MAC, link) is saved.
    fn snapshot(&mut self, _blobs: &BlobDir) -> Result<DeviceSnapshot, SnapshotError> {
        self.stream.flush();
        let left = self.stream.pending_output();
        if left > 0 {
            info!(
                "{}: {left} bytes of frames the socket did not take are not in the snapshot",
                self.name
            );
        }
        Ok(self.state.snapshot(DeviceExtra::Net(NetSnapshot {
            mac: self.mac.0,
            link_up: self.link_up,
        })))
    }

    /// The card must have the snapshot's MAC address (the guest has read
    /// it); the link is set as it was, without telling the guest (it saw
    /// it so already).
    fn restore(
        &mut self,
        snap: &DeviceSnapshot,
        ctx: Option<ActivateContext>,
        blobs: &BlobDir,
    ) -> Result<(), SnapshotError> {
        let DeviceExtra::Net(n) = &snap.extra else {
            return Err(snap.extra.wrong(blobs, "network"));
        };
        if n.mac != self.mac.0 {
            return Err(SnapshotError::Mac {
                device: blobs.name(),
                snapshot: MacAddr(n.mac),
                this: self.mac,
            });
        }
        restore_activation(self, snap, ctx, blobs, |d| &mut d.state)?;
        self.link_up = n.link_up;
        Ok(())
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let fixed = [
            Events::with_data(&self.queue_events[RECEIVEQ], EV_RX_QUEUE, EventSet::IN),
            Events::with_data(&self.queue_events[TRANSMITQ], EV_TX_QUEUE, EventSet::IN),
            Events::with_data(&self.timer, EV_TIMER, EventSet::IN),
        ];
        watch(ops, &self.name, &fixed);
        self.sync_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_RX_QUEUE => {
                // Always drained, so a notify before activation does not
                // keep the event loop awake.
                let _ = self.queue_events[RECEIVEQ].read();
                // New receive buffers: frames read before go first.
                self.rx_stalled = false;
                self.deliver_frames();
            }
            EV_TX_QUEUE => {
                let _ = self.queue_events[TRANSMITQ].read();
                self.process_tx();
            }
            EV_SOCKET => {
                let set = events.event_set();
                if set.contains(EventSet::OUT) {
                    self.process_tx();
                }
                if set.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
                    self.process_rx();
                }
                if !self.stream.connected() {
                    // Lost while the transmit queue may be waiting for
                    // EPOLLOUT with notifications off: take it up now (its
                    // frames are dropped and counted until reconnection).
                    self.process_tx();
                }
            }
            EV_TIMER => self.on_timer(),
            other => warn!("{}: unexpected event tag {other}", self.name),
        }
        self.counters.tx_dropped += self.stream.take_lost();
        self.sync_interest(ops);
    }
}
