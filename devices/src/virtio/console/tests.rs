//! The console against a peer socket, a file and stdio, driven through its
//! queues and its event loop as the guest and the VMM drive it: ordering,
//! flow control both ways, the vCPU-thread output path, reconnection and
//! broken drivers.

use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use super::*;
use crate::snapshot::TransportSnapshot;
use crate::virtio::test_utils::{
    mem, mmio_activate, read_guest, snapshot_through_json, Looped, TestQueue, MEM_SIZE, R, W,
};

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
        self.lock().host.endpoint.connected()
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
    // The device runs until the reader has every byte, not just until the
    // chains are used: a used chain's bytes may still wait in the device
    // for the socket to drain, and only the running loop sends them.
    dev.run_until(|_| guest.used_idx(TRANSMITQ) == used && reader.is_finished());
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
    // One budget's worth: more than that is left to the event loop.
    let chains = CHAINS_PER_EVENT as u16;
    let expected = guest.send_many(chains.into());
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
    // 512 KiB is more than the socket holds: the notifying thread waited
    // for the reader and moved every chain itself, leaving nothing to
    // the event loop.
    assert_eq!(guest.used_idx(TRANSMITQ), chains);
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
    let backend = ConsoleBackend::File(path.clone());
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

#[test]
fn a_busy_transmit_queue_is_served_in_turns() {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("out.log");
    let backend = ConsoleBackend::File(path.clone());
    let mut dev = Dev::new(|irq| Console::new(&backend, irq).unwrap());
    let mem = mem();
    let mut guest = Guest::new(&mem);
    dev.activate(&guest, true);
    dev.settle();
    // Under half the ring: the mock queue's used ring follows its
    // available ring closely enough that more entries would overlap.
    let n = CHAINS_PER_EVENT as u16 + 5;
    let mut sent = Vec::new();
    for i in 0..n {
        let byte = b'a' + (i % 26) as u8;
        guest.send(&[&[byte]]);
        sent.push(byte);
    }
    dev.kick(TRANSMITQ);
    // One turn of the loop serves one budget's worth; a file never pushes
    // back, so only the budget stopped it.
    dev.em.run_with_timeout(0).unwrap();
    assert_eq!(guest.used_idx(TRANSMITQ), CHAINS_PER_EVENT as u16);
    // The device re-armed its queue event: the rest follows without a
    // notify, in order.
    dev.settle();
    assert_eq!(guest.used_idx(TRANSMITQ), n);
    assert_eq!(std::fs::read(&path).unwrap(), sent);
}

#[test]
fn a_flood_of_input_is_served_in_turns() {
    let mem = mem();
    let mut guest = Guest::new(&mem);
    let (a, mut peer) = UnixStream::pair().unwrap();
    let mut dev = Dev::on_stream(a);
    let n = CHAINS_PER_EVENT as u16 + 5;
    let bufs: Vec<u64> = (0..n).map(|_| guest.post_rx(1)).collect();
    dev.activate(&guest, true);
    dev.settle();
    let input: Vec<u8> = (0..n).map(|i| b'A' + (i % 26) as u8).collect();
    peer.write_all(&input).unwrap();
    // One readiness of the input fills one budget's worth of buffers.
    dev.em.run_with_timeout(1000).unwrap();
    assert_eq!(guest.used_idx(RECEIVEQ), CHAINS_PER_EVENT as u16);
    // The input is still readable, so the loop comes back for the rest.
    dev.settle();
    assert_eq!(guest.used_idx(RECEIVEQ), n);
    let got: Vec<u8> = bufs.iter().flat_map(|&b| guest.read(b, 1)).collect();
    assert_eq!(got, input);
}

#[test]
fn output_held_at_the_snapshot_reaches_the_restored_consoles_peer() {
    let mem = mem();
    let mut guest = Guest::new(&mem);
    let (a, mut peer) = UnixStream::pair().unwrap();
    let mut dev = Dev::on_stream(a);
    let mut t = dev.transport(&mem, "hvc0");
    mmio_activate(
        &mut t,
        VIRTIO_F_RING_EVENT_IDX as u32,
        &[&guest.rx, &guest.tx],
    );
    dev.settle();
    // A chain larger than the socket holds, taken in pieces, then more;
    // the peer reads nothing.
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 249) as u8).collect();
    guest.send(&[&big]);
    let mut sent = big.clone();
    sent.extend(guest.send_many(8));
    dev.kick(TRANSMITQ);
    dev.settle();
    assert_eq!(guest.used_idx(TRANSMITQ), 0, "the big chain is not done");

    let dir = TempDir::new().unwrap();
    let snap = snapshot_through_json(&mut t, dir.as_path());
    let DeviceExtra::Console(c) = &snap.device.extra else {
        panic!("{:?}", snap.device.extra);
    };
    assert!(!c.pending_output.is_empty() && c.pending_output.len() <= CHUNK);
    assert!(c.tx_chain_offset > 0 && c.tx_chain_offset < big.len() as u64);
    let queues = snap.device.queues.as_ref().unwrap();
    assert_eq!(
        queues[TRANSMITQ].next_avail, 0,
        "the chain stays at the head"
    );
    // What the old peer got is a prefix; the rest must come from the new
    // console, nothing lost, nothing twice.
    drop(t);
    drop(dev);
    let got = drain(&mut peer);
    assert_eq!(got[..], sent[..got.len()]);
    assert_eq!(
        got.len() + c.pending_output.len(),
        c.tx_chain_offset as usize,
        "the chain's bytes taken so far went to the peer or are pending"
    );

    let (b, peer2) = UnixStream::pair().unwrap();
    let mut dev2 = Dev::on_stream(b);
    let mut t2 = dev2.transport(&mem, "hvc0");
    t2.restore(&snap, dir.as_path()).unwrap();
    t2.kick();
    let peer2 = read_all_while_running(&mut dev2, &guest, peer2, &sent[got.len()..], 9);
    // Completed from next_used 0 on, in order.
    let heads: Vec<u32> = guest.used(TRANSMITQ).iter().map(|u| u.0).collect();
    assert_eq!(heads, (0..9).collect::<Vec<u32>>());
    drop(peer2);
}

#[test]
fn a_restore_refuses_impossible_console_state() {
    let mem = mem();
    let guest = Guest::new(&mem);
    let (a, _peer) = UnixStream::pair().unwrap();
    let dev = Dev::on_stream(a);
    let mut t = dev.transport(&mem, "hvc0");
    let dir = TempDir::new().unwrap();
    let inactive = snapshot_through_json(&mut t, dir.as_path());
    mmio_activate(&mut t, 0, &[&guest.rx, &guest.tx]);
    let active = snapshot_through_json(&mut t, dir.as_path());
    let with = |snap: &TransportSnapshot, pending: usize, offset: u64| {
        let mut snap = snap.clone();
        snap.device.extra = DeviceExtra::Console(ConsoleSnapshot {
            pending_output: vec![b'x'; pending],
            tx_chain_offset: offset,
        });
        snap
    };
    let restore = |snap: &TransportSnapshot| {
        let (b, _peer) = UnixStream::pair().unwrap();
        let dev = Dev::on_stream(b);
        let mut t = dev.transport(&mem, "hvc0");
        let result = t.restore(snap, dir.as_path());
        let held = dev.lock().host.tx_buf.len();
        (result, held)
    };
    let (r, held) = restore(&with(&active, CHUNK + 1, 0));
    let e = r.unwrap_err();
    assert!(
        e.to_string().contains("65537 bytes of pending output"),
        "{e}"
    );
    assert_eq!(held, 0);
    let e = restore(&with(&inactive, 10, 5)).0.unwrap_err();
    assert!(
        e.to_string()
            .starts_with("hvc0: invalid snapshot: transmit chain offset 5"),
        "{e}"
    );
    // Within bounds, inactive or not: output a reset left behind is kept.
    assert_eq!(restore(&with(&inactive, CHUNK, 0)).1, CHUNK);
    assert_eq!(restore(&with(&active, 1, u64::from(u32::MAX))).1, 1);
}
