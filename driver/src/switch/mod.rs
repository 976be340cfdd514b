//! The VLAN switch: one userspace Ethernet switch per VLAN, listening on a
//! unix stream socket. Each connection is a port and speaks QEMU's
//! `-netdev stream` framing ([`frame`]), so skiff-vmm's `--net stream=PATH`
//! and QEMU's `-netdev stream,addr.type=unix,addr.path=PATH` both join it.
//!
//! Invariants:
//! - Every well-formed frame goes through, 802.1Q-tagged or not. Frames to
//!   broadcast, multicast or not-yet-learned addresses flood to every other
//!   port; a unicast frame to an address learned on one port goes to that
//!   port only (and nowhere when that is the port it came from). An address
//!   seen on two live ports at once (NixOS gives two NICs of one node on
//!   one VLAN the same MAC) floods from then on, as the hub NixOS uses would.
//!   A port's learned addresses are forgotten when it disconnects; an
//!   address that went to flooding stays flooded for the switch's life
//!   (correct, only less selective).
//! - No port can stall another: forwarding never waits. Each port has a
//!   bounded queue drained by its own writer; a frame for a full queue is
//!   dropped and counted against that port.
//! - A bad length prefix drops only that connection, with a log line.
//! - With a capture file, every frame received is written to it exactly
//!   once, in the order the switch handled them.
//! - The switch runs on its own thread with a single-threaded tokio
//!   runtime, so callers stay synchronous; [`SwitchHandle::stop`] (or
//!   dropping the handle) ends it, removes its socket and returns the
//!   per-port counters.

mod frame;
mod pcap;
mod standalone;
#[cfg(test)]
mod tests;

pub use standalone::{run as run_standalone, SwitchArgs};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use skiff_vmm::config::MacAddr;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::oneshot;

use crate::report::logger;
use frame::{Decoder, FrameError, HEADER_LEN};
use pcap::PcapWriter;

/// Frames a port's queue holds before the switch drops frames for it.
pub const DEFAULT_QUEUE_FRAMES: usize = 256;
/// Addresses the switch learns at most; past that, unknown ones flood.
const MAX_STATIONS: usize = 4096;
/// Frames a writer sends before it flushes and updates its counters.
const WRITE_BATCH: usize = 64;
/// How often buffered capture records reach the file.
const PCAP_FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Pause after a failed accept (out of descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// An Ethernet address.
pub type Mac = [u8; 6];
/// A frame with its length prefix, as it travels on every port.
type Wire = Arc<[u8]>;

/// Why a switch could not start. The I/O error is part of the message
/// (not a `source`), so a plain `to_string()` tells the whole story.
#[derive(Debug, Error)]
pub enum SwitchError {
    #[error("{label}: cannot listen on {}: {error}", path.display())]
    Listen {
        label: String,
        path: PathBuf,
        error: io::Error,
    },
    #[error("{label}: {} is in use by a running switch", path.display())]
    InUse { label: String, path: PathBuf },
    #[error("{label}: cannot create the capture file {}: {error}", path.display())]
    Pcap {
        label: String,
        path: PathBuf,
        error: io::Error,
    },
    #[error("{label}: cannot start the switch thread: {error}")]
    Thread { label: String, error: io::Error },
}

/// What to start: a switch for VLAN `vlan` on a socket path.
#[derive(Debug, Clone)]
pub struct Switch {
    vlan: u32,
    socket: PathBuf,
    pcap: Option<PathBuf>,
    queue_frames: usize,
}

impl Switch {
    /// A switch for VLAN `vlan` (its log lines say `vlan<N>`) listening on
    /// `socket`.
    pub fn new(vlan: u32, socket: impl Into<PathBuf>) -> Self {
        Switch {
            vlan,
            socket: socket.into(),
            pcap: None,
            queue_frames: DEFAULT_QUEUE_FRAMES,
        }
    }

    /// Also write every frame to this pcap file (`None`: no capture).
    pub fn pcap(mut self, file: impl Into<Option<PathBuf>>) -> Self {
        self.pcap = file.into();
        self
    }

    /// Frames each port's queue holds (at least 1).
    #[cfg_attr(not(test), expect(dead_code, reason = "the default suits VMs"))]
    pub fn queue_frames(mut self, frames: usize) -> Self {
        self.queue_frames = frames.max(1);
        self
    }

    /// Binds the socket, creates the capture file and starts switching on
    /// a background thread. A stale socket file (nothing listening) is
    /// replaced.
    pub fn start(self) -> Result<SwitchHandle, SwitchError> {
        let label = format!("vlan{}", self.vlan);
        let listen_err = |error| SwitchError::Listen {
            label: label.clone(),
            path: self.socket.clone(),
            error,
        };
        let std_listener = bind(&label, &self.socket)?;
        std_listener.set_nonblocking(true).map_err(listen_err)?;
        let ident = socket_ident(&self.socket);
        let pcap = match &self.pcap {
            Some(p) => Some(PcapWriter::create(p).map_err(|error| {
                let _ = std::fs::remove_file(&self.socket);
                SwitchError::Pcap {
                    label: label.clone(),
                    path: p.clone(),
                    error,
                }
            })?),
            None => None,
        };
        let thread_err = |error| {
            let _ = std::fs::remove_file(&self.socket);
            SwitchError::Thread {
                label: label.clone(),
                error,
            }
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(thread_err)?;
        let listener = {
            let _guard = rt.enter();
            UnixListener::from_std(std_listener).map_err(listen_err)?
        };
        let capturing = pcap.is_some();
        let shared = Arc::new(Shared {
            label: label.clone(),
            queue_frames: self.queue_frames,
            fabric: Mutex::new(Fabric {
                next_id: 1,
                ports: BTreeMap::new(),
                all: Vec::new(),
                stations: HashMap::new(),
                pcap,
            }),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = {
            let shared = shared.clone();
            let socket = self.socket.clone();
            std::thread::Builder::new()
                .name(format!("switch-{label}"))
                .spawn(move || {
                    rt.block_on(serve(&shared, listener, stop_rx, capturing));
                    // Ends every port task.
                    drop(rt);
                    shared.finish();
                    if ident.is_some() && socket_ident(&socket) == ident {
                        let _ = std::fs::remove_file(&socket);
                    }
                })
                .map_err(thread_err)?
        };
        let mut msg = format!("switch listening on {}", self.socket.display());
        if let Some(p) = &self.pcap {
            msg += &format!(", capturing to {}", p.display());
        }
        shared.log(&msg);
        Ok(SwitchHandle {
            shared,
            socket: self.socket,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

/// Binds `path`, replacing a socket file nobody listens on.
fn bind(label: &str, path: &Path) -> Result<std::os::unix::net::UnixListener, SwitchError> {
    let err = |error| SwitchError::Listen {
        label: label.to_owned(),
        path: path.to_owned(),
        error,
    };
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        match StdUnixStream::connect(path) {
            Ok(_) => {
                return Err(SwitchError::InUse {
                    label: label.to_owned(),
                    path: path.to_owned(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(err)?;
            }
            Err(_) => {}
        }
    }
    std::os::unix::net::UnixListener::bind(path).map_err(err)
}

/// The socket file's identity, to remove it only if it is still ours.
fn socket_ident(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// A running switch. Dropping it stops the switch too.
pub struct SwitchHandle {
    shared: Arc<Shared>,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl SwitchHandle {
    /// The socket VMs connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The counters so far, one entry per port that ever connected.
    pub fn counters(&self) -> Counters {
        self.shared.counters()
    }

    /// Stops the switch, logs its summary line and returns its counters.
    pub fn stop(mut self) -> Counters {
        self.shutdown();
        let c = self.counters();
        self.shared.log(&format!("switch stopped: {c}"));
        c
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                logger().error(Some(&self.shared.label), "the switch thread panicked");
            }
        }
    }
}

impl Drop for SwitchHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Counters of a switch: one entry per port, in connection order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub ports: Vec<PortCounters>,
}

/// One port's counters. Byte counts are frame bytes, without the length
/// prefix. `drops` counts frames meant for this port that it never got:
/// its queue was full, or it disconnected with frames still queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Numbered from 1 in connection order.
    pub port: u64,
    /// The first source address the port sent.
    pub mac: Option<Mac>,
    pub connected: bool,
    pub frames_in: u64,
    pub bytes_in: u64,
    pub frames_out: u64,
    pub bytes_out: u64,
    pub drops: u64,
}

impl Counters {
    /// The sums over all ports (`port` 0, no address).
    pub fn total(&self) -> PortCounters {
        let mut t = PortCounters::default();
        for p in &self.ports {
            t.frames_in += p.frames_in;
            t.bytes_in += p.bytes_in;
            t.frames_out += p.frames_out;
            t.bytes_out += p.bytes_out;
            t.drops += p.drops;
            t.connected |= p.connected;
        }
        t
    }

    /// Port `port`'s counters.
    #[cfg_attr(not(test), expect(dead_code, reason = "for the test runner"))]
    pub fn port(&self, port: u64) -> Option<&PortCounters> {
        self.ports.iter().find(|p| p.port == port)
    }
}

impl fmt::Display for Counters {
    /// One line: the totals, then each port.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.total();
        write!(
            f,
            "{} port(s); in {} frames/{} bytes, out {} frames/{} bytes, {} dropped",
            self.ports.len(),
            t.frames_in,
            t.bytes_in,
            t.frames_out,
            t.bytes_out,
            t.drops
        )?;
        for p in &self.ports {
            write!(f, "; port {}", p.port)?;
            if let Some(m) = &p.mac {
                write!(f, " {}", MacAddr(*m))?;
            }
            if p.connected {
                f.write_str(" (connected)")?;
            }
            write!(
                f,
                ": in {}/{}, out {}/{}, dropped {}",
                p.frames_in, p.bytes_in, p.frames_out, p.bytes_out, p.drops
            )?;
        }
        Ok(())
    }
}

/// A port's live counters, shared by its tasks and the summary.
#[derive(Default)]
struct PortStats {
    port: u64,
    mac: OnceLock<Mac>,
    connected: AtomicBool,
    frames_in: AtomicU64,
    bytes_in: AtomicU64,
    frames_out: AtomicU64,
    bytes_out: AtomicU64,
    drops: AtomicU64,
}

impl PortStats {
    fn snapshot(&self) -> PortCounters {
        PortCounters {
            port: self.port,
            mac: self.mac.get().copied(),
            connected: self.connected.load(Relaxed),
            frames_in: self.frames_in.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            frames_out: self.frames_out.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            drops: self.drops.load(Relaxed),
        }
    }

    /// `port N` or `port N (mac)`, for log lines.
    fn name(&self) -> String {
        match self.mac.get() {
            Some(m) => format!("port {} ({})", self.port, MacAddr(*m)),
            None => format!("port {}", self.port),
        }
    }
}

/// Where frames to an address go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Station {
    Port(u64),
    /// Seen on more than one live port: flood.
    Shared,
}

/// A live port, as forwarding sees it.
struct Port {
    tx: mpsc::Sender<Wire>,
    stats: Arc<PortStats>,
}

/// The forwarding state, under one lock.
struct Fabric {
    next_id: u64,
    /// Connected ports.
    ports: BTreeMap<u64, Port>,
    /// Every port that ever connected, for the counters.
    all: Vec<Arc<PortStats>>,
    stations: HashMap<Mac, Station>,
    pcap: Option<PcapWriter<File>>,
}

struct Shared {
    label: String,
    queue_frames: usize,
    fabric: Mutex<Fabric>,
}

fn is_group(m: &Mac) -> bool {
    m[0] & 1 == 1
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Fabric> {
        self.fabric.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log(&self, msg: &str) {
        logger().log(Some(&self.label), msg);
    }

    fn warn(&self, msg: &str) {
        logger().warning(Some(&self.label), msg);
    }

    fn counters(&self) -> Counters {
        Counters {
            ports: self.lock().all.iter().map(|s| s.snapshot()).collect(),
        }
    }

    fn add_port(&self) -> (Arc<PortStats>, mpsc::Receiver<Wire>) {
        let (tx, rx) = mpsc::channel(self.queue_frames);
        let mut fab = self.lock();
        let stats = Arc::new(PortStats {
            port: fab.next_id,
            connected: AtomicBool::new(true),
            ..PortStats::default()
        });
        fab.next_id += 1;
        fab.all.push(stats.clone());
        fab.ports.insert(
            stats.port,
            Port {
                tx,
                stats: stats.clone(),
            },
        );
        (stats, rx)
    }

    fn remove_port(&self, stats: &PortStats) {
        let mut fab = self.lock();
        fab.ports.remove(&stats.port);
        fab.stations.retain(|_, s| *s != Station::Port(stats.port));
        stats.connected.store(false, Relaxed);
    }

    /// Handles one frame (`wire`: prefix and bytes) received on `from`.
    fn forward(&self, fab: &mut Fabric, from: &PortStats, wire: &[u8]) {
        let frame = &wire[HEADER_LEN..];
        from.frames_in.fetch_add(1, Relaxed);
        from.bytes_in.fetch_add(frame.len() as u64, Relaxed);
        if let Some(p) = fab.pcap.as_mut() {
            if let Err(e) = p.write(SystemTime::now(), frame) {
                self.warn(&format!("capture stopped: {e}"));
                fab.pcap = None;
            }
        }
        let dst: Mac = frame[0..6].try_into().expect("frames hold a header");
        let src: Mac = frame[6..12].try_into().expect("frames hold a header");
        if !is_group(&src) {
            from.mac.get_or_init(|| src);
            self.learn(fab, src, from.port);
        }
        let to = match fab.stations.get(&dst) {
            Some(Station::Port(p)) if !is_group(&dst) => Some(*p),
            _ => None,
        };
        let wire: Wire = Arc::from(wire);
        match to {
            // The destination sits behind the port it came from.
            Some(p) if p == from.port => {}
            Some(p) => {
                if let Some(port) = fab.ports.get(&p) {
                    port.send(wire);
                }
            }
            None => {
                for (id, port) in &fab.ports {
                    if *id != from.port {
                        port.send(wire.clone());
                    }
                }
            }
        }
    }

    fn learn(&self, fab: &mut Fabric, src: Mac, port: u64) {
        match fab.stations.get(&src).copied() {
            Some(Station::Port(p)) if p == port => {}
            // A port's entries go when it does: `other` is live.
            Some(Station::Port(other)) => {
                fab.stations.insert(src, Station::Shared);
                self.log(&format!(
                    "{} is on ports {other} and {port}; frames to it flood",
                    MacAddr(src)
                ));
            }
            Some(Station::Shared) => {}
            None if fab.stations.len() >= MAX_STATIONS => {}
            None => {
                fab.stations.insert(src, Station::Port(port));
            }
        }
    }

    fn flush_pcap(&self) {
        let mut fab = self.lock();
        if let Some(p) = fab.pcap.as_mut() {
            if let Err(e) = p.flush() {
                self.warn(&format!("capture stopped: {e}"));
                fab.pcap = None;
            }
        }
    }

    /// After the runtime is gone: every port is closed, the capture
    /// complete.
    fn finish(&self) {
        self.flush_pcap();
        let mut fab = self.lock();
        for port in fab.ports.values() {
            port.stats.connected.store(false, Relaxed);
        }
        fab.ports.clear();
        fab.stations.clear();
        fab.pcap = None;
    }
}

impl Port {
    fn send(&self, wire: Wire) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(wire) {
            self.stats.drops.fetch_add(1, Relaxed);
        }
    }
}

/// Accepts ports until told to stop.
async fn serve(
    shared: &Arc<Shared>,
    listener: UnixListener,
    mut stop: oneshot::Receiver<()>,
    capturing: bool,
) {
    if capturing {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(PCAP_FLUSH_EVERY);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                t.tick().await;
                shared.flush_pcap();
            }
        });
    }
    loop {
        tokio::select! {
            // Sent, or the handle is gone.
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let (stats, rx) = shared.add_port();
                    shared.log(&format!("{} connected", stats.name()));
                    tokio::spawn(run_port(shared.clone(), stats, stream, rx));
                }
                Err(e) => {
                    shared.warn(&format!("accepting a port: {e}"));
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

/// Why a port ended.
enum Closed {
    Eof,
    MidFrame(usize),
    Bad(FrameError),
    Read(io::Error),
    Write(io::Error),
    Removed,
}

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Closed::Eof => f.write_str("disconnected"),
            Closed::MidFrame(n) => write!(f, "disconnected in the middle of a frame ({n} bytes)"),
            Closed::Bad(e) => write!(f, "dropped: {e}"),
            Closed::Read(e) => write!(f, "dropped: read: {e}"),
            Closed::Write(e) => write!(f, "dropped: write: {e}"),
            Closed::Removed => f.write_str("removed"),
        }
    }
}

/// One port, from connection to disconnection.
async fn run_port(
    shared: Arc<Shared>,
    stats: Arc<PortStats>,
    stream: UnixStream,
    mut rx: mpsc::Receiver<Wire>,
) {
    let (rd, wr) = stream.into_split();
    let why = tokio::select! {
        why = read_port(&shared, &stats, rd) => why,
        why = write_port(&stats, wr, &mut rx) => why,
    };
    shared.remove_port(&stats);
    rx.close();
    let mut left = 0;
    while rx.try_recv().is_ok() {
        left += 1;
    }
    stats.drops.fetch_add(left, Relaxed);
    let msg = format!("{} {why}", stats.name());
    match why {
        Closed::Eof | Closed::Removed => shared.log(&msg),
        _ => shared.warn(&msg),
    }
}

/// Reads frames off a port and forwards them, until the port ends.
async fn read_port(shared: &Shared, stats: &PortStats, mut rd: OwnedReadHalf) -> Closed {
    let mut dec = Decoder::new();
    loop {
        match rd.read_buf(dec.buffer()).await {
            Ok(0) if dec.pending() == 0 => return Closed::Eof,
            Ok(0) => return Closed::MidFrame(dec.pending()),
            Ok(_) => {}
            Err(e) => return Closed::Read(e),
        }
        let mut fab = shared.lock();
        loop {
            match dec.next_frame() {
                Ok(Some(wire)) => shared.forward(&mut fab, stats, wire),
                Ok(None) => break,
                Err(e) => return Closed::Bad(e),
            }
        }
    }
}

/// Sends a port its queued frames, until the port ends.
async fn write_port(
    stats: &PortStats,
    wr: OwnedWriteHalf,
    rx: &mut mpsc::Receiver<Wire>,
) -> Closed {
    let mut w = BufWriter::with_capacity(64 * 1024, wr);
    while let Some(first) = rx.recv().await {
        let (mut frames, mut bytes) = (0, 0);
        let mut next = Some(first);
        while let Some(wire) = next {
            if let Err(e) = w.write_all(&wire).await {
                return Closed::Write(e);
            }
            frames += 1;
            bytes += (wire.len() - HEADER_LEN) as u64;
            next = if frames < WRITE_BATCH as u64 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if let Err(e) = w.flush().await {
            return Closed::Write(e);
        }
        stats.frames_out.fetch_add(frames, Relaxed);
        stats.bytes_out.fetch_add(bytes, Relaxed);
    }
    Closed::Removed
}
