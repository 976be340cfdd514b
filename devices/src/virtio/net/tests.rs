//! The network card against a peer socket, driven through its queues and
//! its event loop as the guest and the VMM drive it: frames both ways, with
//! and without mergeable buffers, back-pressure both ways, the link, a
//! peer that goes away or sends garbage, and every malformed chain.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use vmm_sys_util::tempdir::TempDir;

use super::*;
use crate::snapshot::NetSnapshot;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::test_utils::{
    mem, mmio_activate, read_guest, snapshot_through_json, Looped, TestQueue, MEM_SIZE, R, W,
};
use crate::BusDevice;

const QUEUE_SIZE: u16 = 256;
const RXQ_ADDR: u64 = 0;
const TXQ_ADDR: u64 = 0x4000;
const BUF_BASE: u64 = 0x1_0000;
/// Longest a test waits for the card (wide: a loaded machine is slow).
const WAIT: Duration = Duration::from_secs(30);
const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x01, 0x02]);

struct Setup<'a> {
    looped: Looped<Net>,
    peer: UnixStream,
    mem: &'a GuestMemoryMmap,
    rx: TestQueue<'a>,
    tx: TestQueue<'a>,
    next_buf: u64,
}

impl<'a> Setup<'a> {
    /// A card on a socket pair, activated with `features` acked.
    fn new(mem: &'a GuestMemoryMmap, mergeable: bool) -> Self {
        Self::with_rx_queue(mem, mergeable, QUEUE_SIZE)
    }

    /// [`Setup::new`] with a receive queue of `rx_size` entries.
    fn with_rx_queue(mem: &'a GuestMemoryMmap, mergeable: bool, rx_size: u16) -> Self {
        let drop = if mergeable { 0 } else { VIRTIO_NET_F_MRG_RXBUF };
        Self::build(mem, drop, rx_size)
    }

    /// A card with every feature it offers acked but those in `drop`.
    fn without(mem: &'a GuestMemoryMmap, drop: u64) -> Self {
        Self::build(mem, drop, QUEUE_SIZE)
    }

    fn build(mem: &'a GuestMemoryMmap, drop: u64, rx_size: u16) -> Self {
        let (ours, peer) = UnixStream::pair().unwrap();
        let looped = Looped::new(|irq| Net::from_socket(ours, MAC, irq).unwrap());
        let rx = TestQueue::new(mem, RXQ_ADDR, rx_size);
        let tx = TestQueue::new(mem, TXQ_ADDR, QUEUE_SIZE);
        {
            let mut dev = looped.lock();
            let features = dev.features() & !drop;
            let queues = vec![rx.queue(), tx.queue()];
            dev.activate(ActivateContext {
                mem: mem.clone(),
                queues,
                acked_features: features,
            })
            .unwrap();
        }
        peer.set_read_timeout(Some(WAIT)).unwrap();
        let mut s = Setup {
            looped,
            peer,
            mem,
            rx,
            tx,
            next_buf: BUF_BASE,
        };
        s.settle();
        s
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let addr = self.next_buf;
        self.next_buf += (len as u64 + 0xfff) & !0xfff;
        assert!(self.next_buf <= MEM_SIZE as u64);
        addr
    }

    fn settle(&mut self) {
        self.looped.settle();
    }

    /// The guest sends `frame` (with a zero header) as one chain of two
    /// descriptors, header and frame.
    fn send(&mut self, frame: &[u8]) {
        let hdr = self.alloc(NET_HDR_LEN);
        let body = self.alloc(frame.len());
        self.mem.write_slice(frame, GuestAddress(body)).unwrap();
        self.tx
            .add_chain(&[(hdr, NET_HDR_LEN as u32, R), (body, frame.len() as u32, R)]);
    }

    /// The guest sends `frame` behind `header` (virtio-net's 12 bytes).
    fn send_with_header(&mut self, header: [u8; NET_HDR_LEN], frame: &[u8]) {
        let hdr = self.alloc(NET_HDR_LEN);
        let body = self.alloc(frame.len());
        self.mem.write_slice(&header, GuestAddress(hdr)).unwrap();
        self.mem.write_slice(frame, GuestAddress(body)).unwrap();
        self.tx
            .add_chain(&[(hdr, NET_HDR_LEN as u32, R), (body, frame.len() as u32, R)]);
    }

    fn kick_tx(&mut self) {
        self.looped.kick(TRANSMITQ);
        self.settle();
    }

    /// The guest posts a receive buffer of `len` bytes; returns its address.
    fn post(&mut self, len: usize) -> u64 {
        let addr = self.alloc(len);
        self.rx.add_chain(&[(addr, len as u32, W)]);
        addr
    }

    fn kick_rx(&mut self) {
        self.looped.kick(RECEIVEQ);
        self.settle();
    }

    /// The peer sends `frame`, framed.
    fn peer_send(&mut self, frame: &[u8]) {
        self.peer
            .write_all(&(frame.len() as u32).to_be_bytes())
            .unwrap();
        self.peer.write_all(frame).unwrap();
    }

    /// The next frame the peer receives.
    fn peer_recv(&mut self) -> Vec<u8> {
        let mut len = [0u8; 4];
        self.peer.read_exact(&mut len).unwrap();
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        self.peer.read_exact(&mut frame).unwrap();
        frame
    }

    /// Runs the event loop until `done` holds (the socket is read on its
    /// own readiness, which takes a turn or two of the loop).
    fn run_until(&mut self, mut done: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out");
            self.looped.em.run_with_timeout(10).unwrap();
        }
    }

    fn counters(&self) -> NetCounters {
        self.looped.lock().counters()
    }

    fn peer_has_nothing(&mut self) -> bool {
        self.peer.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let nothing =
            matches!(self.peer.read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        self.peer.set_nonblocking(false).unwrap();
        nothing
    }
}

/// An Ethernet frame of `len` bytes whose bytes say `tag` and their index.
fn frame(len: usize, tag: u8) -> Vec<u8> {
    (0..len).map(|i| tag ^ (i as u8)).collect()
}

#[test]
fn identity_and_config_space() {
    let m = mem();
    let s = Setup::new(&m, true);
    let dev = s.looped.lock();
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.queue_max_sizes(), &[256, 256]);
    let f = dev.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(f & bit, 0);
    }
    let mut config = [0u8; 8];
    dev.read_config(0, &mut config);
    assert_eq!(&config[..6], &MAC.0);
    assert_eq!(
        u16::from_le_bytes([config[6], config[7]]),
        VIRTIO_NET_S_LINK_UP
    );
    // Reads past the end are zeros, never a panic.
    let mut beyond = [0xffu8; 4];
    dev.read_config(u64::MAX - 1, &mut beyond);
    assert_eq!(beyond, [0; 4]);
}

#[test]
fn mac_addresses_parse_and_print() {
    let mac: MacAddr = "52:54:00:12:01:0A".parse().unwrap();
    assert_eq!(mac.0, [0x52, 0x54, 0, 0x12, 1, 0x0a]);
    assert_eq!(mac.to_string(), "52:54:00:12:01:0a");
    for bad in [
        "",
        "52:54:00:12:01",
        "52:54:00:12:01:02:03",
        "52-54-00-12-01-02",
        "5:54:00:12:01:02",
        "52:54:00:12:01:0g",
        "+2:54:00:12:01:02",
    ] {
        assert!(
            matches!(bad.parse::<MacAddr>(), Err(MacAddrError::Syntax(_))),
            "{bad}"
        );
    }
    assert!(matches!(
        "01:00:5e:00:00:01".parse::<MacAddr>(),
        Err(MacAddrError::Multicast(_))
    ));
}

#[test]
fn guest_frames_reach_the_peer_without_their_header() {
    let m = mem();
    let mut s = Setup::new(&m, true);
    let a = frame(60, 1);
    let b = frame(1514, 2);
    s.send(&a);
    s.send(&b);
    s.kick_tx();
    assert_eq!(s.peer_recv(), a);
    assert_eq!(s.peer_recv(), b);
    assert_eq!(s.tx.used(), vec![(0, 0), (2, 0)], "(head, length)");
    let c = s.counters();
    assert_eq!((c.tx_frames, c.tx_bytes, c.tx_dropped), (2, 60 + 1514, 0));
}

#[test]
fn malformed_transmit_chains_are_completed_empty_and_nothing_is_sent() {
    let m = mem();
    let mut s = Setup::new(&m, true);
    let buf = s.alloc(0x20000);
    // Shorter than a header and an Ethernet header.
    s.tx.add_chain(&[(buf, (NET_HDR_LEN + ETH_HLEN - 1) as u32, R)]);
    // A device-writable buffer in a transmit chain.
    s.tx.add_chain(&[(buf, 64, R), (buf + 64, 64, W)]);
    // Longer than a frame.
    s.tx.add_chain(&[(buf, (NET_HDR_LEN + MAX_FRAME_LEN + 1) as u32, R)]);
    // Outside guest memory, and straddling its end.
    s.tx.add_chain(&[(0xffff_0000_0000, 64, R)]);
    s.tx.add_chain(&[(MEM_SIZE as u64 - 16, 64, R)]);
    // A good one after them.
    let good = frame(100, 3);
    s.send(&good);
    s.kick_tx();
    assert_eq!(s.peer_recv(), good);
    assert!(s.peer_has_nothing());
    let used = s.tx.used();
    assert_eq!(used.len(), 6);
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert!(!s.looped.lock().interrupt().needs_reset());
    assert_eq!(s.counters().tx_frames, 1);
}

#[test]
fn peer_frames_reach_the_guest_in_one_buffer_each() {
    let m = mem();
    let mut s = Setup::new(&m, false);
    let bufs: Vec<u64> = (0..2).map(|_| s.post(1526)).collect();
    s.kick_rx();
    let a = frame(60, 4);
    let b = frame(1514, 5);
    s.peer_send(&a);
    s.peer_send(&b);
    s.run_until(|s| s.rx.used_idx() == 2);
    assert_eq!(s.rx.used(), vec![(0, 72), (1, 1526)]);
    for (addr, f) in bufs.iter().zip([&a, &b]) {
        let hdr = read_guest(&m, *addr, NET_HDR_LEN);
        assert_eq!(&hdr[..10], &[0; 10]);
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
        assert_eq!(read_guest(&m, addr + NET_HDR_LEN as u64, f.len()), **f);
    }
    let c = s.counters();
    assert_eq!((c.rx_frames, c.rx_bytes, c.rx_dropped), (2, 60 + 1514, 0));
}

#[test]
fn a_frame_spreads_over_mergeable_buffers_published_together() {
    let m = mem();
    let mut s = Setup::new(&m, true);
    let bufs: Vec<u64> = (0..4).map(|_| s.post(1024)).collect();
    s.kick_rx();
    let big = frame(3000, 6);
    let small = frame(100, 7);
    s.peer_send(&big);
    s.peer_send(&small);
    s.run_until(|s| s.rx.used_idx() == 4);
    // 12 + 3000 bytes over three buffers, then the small frame in the last.
    assert_eq!(s.rx.used(), vec![(0, 1024), (1, 1024), (2, 964), (3, 112)]);
    let hdr = read_guest(&m, bufs[0], NET_HDR_LEN);
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 3, "num_buffers");
    let mut got = read_guest(&m, bufs[0] + NET_HDR_LEN as u64, 1024 - NET_HDR_LEN);
    got.extend(read_guest(&m, bufs[1], 1024));
    got.extend(read_guest(&m, bufs[2], 964));
    assert_eq!(got, big);
    let hdr = read_guest(&m, bufs[3], NET_HDR_LEN);
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1);
    assert_eq!(read_guest(&m, bufs[3] + NET_HDR_LEN as u64, 100), small);
}

#[test]
fn a_frame_waits_whole_until_the_guest_has_buffers_enough() {
    let m = mem();
    let mut s = Setup::new(&m, true);
    s.post(1024);
    s.kick_rx();
    let big = frame(2000, 8);
    s.peer_send(&big);
    // Two turns of the loop: the frame is read and does not fit.
    for _ in 0..3 {
        s.looped.em.run_with_timeout(50).unwrap();
    }
    assert_eq!(s.rx.used_idx(), 0, "no part of a frame is published");
    let more = s.post(1024);
    s.kick_rx();
    s.run_until(|s| s.rx.used_idx() == 2);
    assert_eq!(s.rx.used(), vec![(0, 1024), (1, 2000 + 12 - 1024)]);
    assert_eq!(read_guest(&m, more, 988), big[1012..]);
}

#[test]
fn without_mergeable_buffers_a_frame_too_large_is_dropped() {
    let m = mem();
    let mut s = Setup::new(&m, false);
    let buf = s.post(1526);
    s.kick_rx();
    s.peer_send(&frame(4000, 9));
    // A runt, shorter than an Ethernet header, is dropped too.
    s.peer_send(&frame(10, 9));
    let ok = frame(200, 10);
    s.peer_send(&ok);
    s.run_until(|s| s.rx.used_idx() == 1);
    assert_eq!(s.rx.used(), vec![(0, 212)]);
    assert_eq!(read_guest(&m, buf + NET_HDR_LEN as u64, 200), ok);
    assert_eq!(s.counters().rx_dropped, 2);
}

#[test]
fn frames_wait_in_order_while_the_guest_has_no_buffers() {
    let m = mem();
    let mut s = Setup::new(&m, true);
    let frames: Vec<Vec<u8>> = (0..20).map(|i| frame(60 + i * 50, i as u8)).collect();
    for f in &frames {
        s.peer_send(f);
    }
    for _ in 0..3 {
        s.looped.em.run_with_timeout(50).unwrap();
    }
    assert_eq!(s.rx.used_idx(), 0);
    let mut bufs = Vec::new();
    for round in 0..2 {
        for _ in 0..10 {
            bufs.push(s.post(2048));
        }
        s.kick_rx();
        s.run_until(|s| s.rx.used_idx() == 10 * (round + 1));
    }
    for (buf, f) in bufs.iter().zip(&frames) {
        assert_eq!(read_guest(&m, buf + NET_HDR_LEN as u64, f.len()), *f);
    }
    assert_eq!(s.counters().rx_dropped, 0);
}

#[test]
fn a_device_readable_receive_buffer_is_completed_empty() {
    let m = mem();
    let mut s = Setup::new(&m, true);
    let bad = s.alloc(2048);
    s.rx.add_chain(&[(bad, 1024, W), (bad + 1024, 1024, R)]);
    let good = s.post(2048);
    s.kick_rx();
    let f = frame(300, 11);
    s.peer_send(&f);
    s.run_until(|s| s.rx.used_idx() == 2);
    assert_eq!(s.rx.used(), vec![(0, 0), (2, 312)], "(head, length)");
    assert_eq!(read_guest(&m, good + NET_HDR_LEN as u64, 300), f);
}

#[test]
fn the_link_goes_down_and_up() {
    let m = mem();
    let mut s = Setup::new(&m, true);
    let _ = s.looped.irq.read();
    s.looped.lock().set_link(false);
    assert_eq!(s.looped.irq.read().unwrap(), 1, "config interrupt");
    assert_ne!(
        s.looped.lock().interrupt().status() & crate::virtio::INT_CONFIG,
        0
    );
    let mut config = [0u8; 8];
    s.looped.lock().read_config(0, &mut config);
    assert_eq!(&config[6..], &[0, 0]);
    // Down: nothing passes either way.
    s.send(&frame(60, 12));
    s.kick_tx();
    assert_eq!(s.tx.used_idx(), 1);
    assert!(s.peer_has_nothing());
    s.post(2048);
    s.kick_rx();
    s.peer_send(&frame(60, 13));
    s.run_until(|s| s.counters().rx_dropped == 1);
    assert_eq!(s.rx.used_idx(), 0);
    assert_eq!(s.counters().tx_dropped, 1);
    // Up again.
    s.looped.lock().set_link(true);
    let f = frame(80, 14);
    s.peer_send(&f);
    s.run_until(|s| s.rx.used_idx() == 1);
    s.send(&f);
    s.kick_tx();
    assert_eq!(s.peer_recv(), f);
}

#[test]
fn a_peer_that_does_not_read_stops_the_transmit_queue_and_loses_nothing() {
    let m = mem();
    let mut s = Setup::new(&m, true);
    // Far more than the socket and the output buffer hold (two
    // descriptors a chain: the ring holds 128).
    let frames: Vec<Vec<u8>> = (0..120).map(|i| frame(60_000, i as u8)).collect();
    for f in &frames {
        s.send(f);
    }
    s.kick_tx();
    let stuck_at = s.tx.used_idx() as usize;
    assert!(stuck_at < frames.len(), "the device stopped taking chains");
    assert!(stuck_at > 0);
    // The peer reads; the device resumes on EPOLLOUT.
    let mut peer = s.peer.try_clone().unwrap();
    let count = frames.len();
    let reader = std::thread::spawn(move || {
        (0..count)
            .map(|_| {
                let mut len = [0u8; 4];
                peer.read_exact(&mut len).unwrap();
                let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
                peer.read_exact(&mut f).unwrap();
                f
            })
            .collect::<Vec<_>>()
    });
    // The last chains' frames are still in the output buffer when the
    // queue is empty: the loop runs until the peer has them all.
    s.run_until(|s| s.tx.used_idx() as usize == count && reader.is_finished());
    let got = reader.join().unwrap();
    assert!(got == frames, "frames lost or reordered");
    assert_eq!(s.counters().tx_dropped, 0);
}

#[test]
fn a_peer_that_closes_or_sends_garbage_is_dropped_and_the_card_lives() {
    let m = mem();
    let mut s = Setup::new(&m, true);
    s.post(2048);
    s.kick_rx();
    // An oversized length prefix: the connection is dropped.
    s.peer
        .write_all(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes())
        .unwrap();
    s.peer.write_all(&[0u8; 100]).unwrap();
    s.run_until(|s| !s.looped.lock().stream.connected());
    let mut b = [0u8; 1];
    assert_eq!(s.peer.read(&mut b).unwrap(), 0, "the card closed its end");
    // The guest goes on sending; frames are dropped and counted.
    s.send(&frame(60, 15));
    s.kick_tx();
    assert_eq!(s.tx.used_idx(), 1);
    assert_eq!(s.counters().tx_dropped, 1);
    assert!(!s.looped.lock().interrupt().needs_reset());
    assert_eq!(s.rx.used_idx(), 0);
}

#[test]
fn a_lost_switch_is_reconnected() {
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let path = dir.as_path().join("vlan1");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let config = NetConfig {
        backend: NetBackend::Stream(path.clone()),
        mac: MAC,
        id: Some("eth-test".into()),
    };
    let mut looped = Looped::new(|irq| Net::new(&config, irq).unwrap());
    let (first, _) = listener.accept().unwrap();
    assert_eq!(looped.lock().id(), "eth-test");
    drop(first);
    // The loss is seen on the socket, then the timer reconnects.
    let deadline = Instant::now() + WAIT;
    listener.set_nonblocking(true).unwrap();
    let second = loop {
        assert!(Instant::now() < deadline, "no reconnection");
        looped.em.run_with_timeout(50).unwrap();
        if let Ok((sock, _)) = listener.accept() {
            break sock;
        }
    };
    drop(second);
    looped.settle();
    // A missing socket is a clear error at start.
    let missing = NetConfig {
        backend: NetBackend::Stream(dir.as_path().join("absent")),
        ..config
    };
    let err = Net::new(&missing, EventFd::new(EFD_NONBLOCK).unwrap())
        .err()
        .unwrap();
    assert!(err.to_string().contains("absent"), "{err}");
}

#[test]
fn fuzz_entry_point() {
    assert_eq!(fuzz_queues(&[]), NetCounters::default());
    // Flags 0 (no mergeable buffers, link up); the peer sends one 64-byte
    // frame, which waits: the receive queue has no buffer.
    let mut input = vec![0u8];
    let peer: Vec<u8> = [&64u32.to_be_bytes()[..], &[0xab; 64]].concat();
    input.extend_from_slice(&(peer.len() as u16).to_le_bytes());
    input.extend_from_slice(&peer);
    // Guest memory: one transmit chain, descriptor 0 at 0x400 holding a
    // header and a 60-byte frame, offered by the available ring at 0x100.
    let mut memory = vec![0u8; 0x1000];
    memory[..8].copy_from_slice(&0x400u64.to_le_bytes());
    memory[8..12].copy_from_slice(&((NET_HDR_LEN + 60) as u32).to_le_bytes());
    memory[0x102..0x104].copy_from_slice(&1u16.to_le_bytes());
    input.extend_from_slice(&memory);
    let c = fuzz_queues(&input);
    assert_eq!((c.tx_frames, c.tx_bytes), (1, 60));
    assert_eq!(c.rx_frames, 0);
    // With a receive buffer (descriptor 0 of the receive queue, at 0x800,
    // device-writable) the frame is delivered.
    let at = 3 + peer.len();
    input[at + 0x200..at + 0x208].copy_from_slice(&0x800u64.to_le_bytes());
    input[at + 0x208..at + 0x20c].copy_from_slice(&2048u32.to_le_bytes());
    input[at + 0x20c..at + 0x20e].copy_from_slice(&W.to_le_bytes());
    input[at + 0x302..at + 0x304].copy_from_slice(&1u16.to_le_bytes());
    let c = fuzz_queues(&input);
    assert_eq!((c.rx_frames, c.rx_bytes), (1, 64));
    // Garbage of every length, with every feature combination.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for len in [
        1usize,
        3,
        17,
        0x150,
        0x400,
        FUZZ_MEM_SIZE,
        FUZZ_MEM_SIZE + 5000,
    ] {
        for _ in 0..20 {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            fuzz_queues(&data);
        }
    }
}

#[test]
fn a_connection_lost_while_the_socket_pushed_back_frees_the_transmit_queue() {
    let m = mem();
    let mut s = Setup::new(&m, true);
    let frames: Vec<Vec<u8>> = (0..60).map(|i| frame(60_000, i as u8)).collect();
    for f in &frames {
        s.send(f);
    }
    s.kick_tx();
    let stuck_at = s.tx.used_idx();
    assert!((stuck_at as usize) < frames.len());
    // The peer goes away on the receive side; no EPOLLOUT will come.
    s.peer.shutdown(std::net::Shutdown::Both).unwrap();
    s.run_until(|s| s.tx.used_idx() as usize == frames.len());
    let c = s.counters();
    assert!(c.tx_dropped > 0, "{c:?}");
    assert!(!s.looped.lock().interrupt().needs_reset());
}

#[test]
fn a_frame_larger_than_the_whole_receive_ring_is_dropped() {
    let m = mem();
    // 32 buffers of 1,526 bytes hold 48 KiB: a 60,000-byte frame never fits.
    let mut s = Setup::with_rx_queue(&m, true, 32);
    for _ in 0..32 {
        s.post(1526);
    }
    s.kick_rx();
    s.peer_send(&frame(60_000, 16));
    let small = frame(100, 17);
    s.peer_send(&small);
    // The frame takes the whole ring, then is dropped: the chains come back
    // empty, and receive goes on with the next frame once the guest posts
    // buffers again (as its driver does for used ones).
    s.run_until(|s| s.counters().rx_dropped == 1);
    assert_eq!(s.rx.used_idx(), 32);
    assert!(s.rx.used().iter().all(|&(_, len)| len == 0));
    let again = s.post(1526);
    s.kick_rx();
    s.run_until(|s| s.counters().rx_frames == 1);
    assert_eq!(s.rx.used().last().unwrap().1, 112);
    assert_eq!(read_guest(&m, again + NET_HDR_LEN as u64, 100), small);
}

#[test]
fn a_buffer_too_small_for_the_header_does_not_cost_frames() {
    let m = mem();
    let mut s = Setup::new(&m, false);
    let tiny = s.alloc(8);
    s.rx.add_chain(&[(tiny, 8, W)]);
    let good = s.post(1526);
    s.kick_rx();
    let f = frame(200, 18);
    s.peer_send(&f);
    s.run_until(|s| s.rx.used_idx() == 2);
    assert_eq!(s.rx.used()[1].1, 212);
    assert_eq!(read_guest(&m, good + NET_HDR_LEN as u64, 200), f);
    assert_eq!(s.counters().rx_dropped, 0);
}

/// A card with MAC `mac` on a new socket pair, behind a transport named
/// `net0`.
fn card_behind_transport(
    mem: &GuestMemoryMmap,
    mac: MacAddr,
) -> (Looped<Net>, MmioTransport, UnixStream) {
    let (ours, peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(WAIT)).unwrap();
    let looped = Looped::new(|irq| Net::from_socket(ours, mac, irq).unwrap());
    let t = looped.transport(mem, "net0");
    (looped, t, peer)
}

#[test]
fn the_link_and_the_queues_survive_a_snapshot() {
    let m = mem();
    let (looped, mut t, peer) = card_behind_transport(&m, MAC);
    let rx = TestQueue::new(&m, RXQ_ADDR, QUEUE_SIZE);
    let tx = TestQueue::new(&m, TXQ_ADDR, QUEUE_SIZE);
    let features =
        VIRTIO_F_RING_EVENT_IDX | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF;
    mmio_activate(&mut t, features as u32, &[&rx, &tx]);
    let mut s = Setup {
        looped,
        peer,
        mem: &m,
        rx,
        tx,
        next_buf: BUF_BASE,
    };
    s.settle();
    let a = frame(60, 1);
    s.send(&a);
    s.kick_tx();
    assert_eq!(s.peer_recv(), a);
    s.post(2048);
    s.kick_rx();
    s.peer_send(&frame(100, 2));
    s.run_until(|s| s.rx.used_idx() == 1);
    s.looped.lock().set_link(false);

    let dir = TempDir::new().unwrap();
    let snap = snapshot_through_json(&mut t, dir.as_path());
    assert_eq!(
        snap.device.extra,
        DeviceExtra::Net(NetSnapshot {
            mac: MAC.0,
            link_up: false
        })
    );
    let queues = snap.device.queues.as_ref().unwrap();
    assert_eq!(
        (queues[RECEIVEQ].next_avail, queues[RECEIVEQ].next_used),
        (1, 1)
    );
    assert_eq!(
        (queues[TRANSMITQ].next_avail, queues[TRANSMITQ].next_used),
        (1, 1)
    );

    // A card with another MAC address is refused.
    let other = MacAddr([0x52, 0x54, 0, 0x12, 1, 9]);
    let (_l, mut t_other, _p) = card_behind_transport(&m, other);
    let e = t_other.restore(&snap, dir.as_path()).unwrap_err();
    assert!(matches!(e, SnapshotError::Mac { .. }));
    assert_eq!(
        e.to_string(),
        "net0: snapshot's card has MAC address 52:54:00:12:01:02 where this card has 52:54:00:12:01:09"
    );

    // The same card on a new socket goes on where the old one stopped.
    let Setup {
        rx, tx, next_buf, ..
    } = s;
    let (looped, mut t2, peer) = card_behind_transport(&m, MAC);
    t2.restore(&snap, dir.as_path()).unwrap();
    t2.kick();
    let mut s = Setup {
        looped,
        peer,
        mem: &m,
        rx,
        tx,
        next_buf,
    };
    s.settle();
    let mut config = [0u8; 8];
    t2.read(0x100, &mut config);
    assert_eq!(&config[..6], &MAC.0);
    assert_eq!(&config[6..], &[0, 0], "the link is still down");
    assert!(!s.looped.lock().link_up());
    // Link down: a guest frame is taken (at next_avail 1) and dropped.
    s.send(&frame(60, 3));
    s.kick_tx();
    assert_eq!(s.tx.used(), vec![(0, 0), (2, 0)]);
    assert!(s.peer_has_nothing());
    s.looped.lock().set_link(true);
    let b = frame(70, 4);
    s.send(&b);
    s.kick_tx();
    assert_eq!(s.peer_recv(), b);
    assert_eq!(s.tx.used_entry(2), (4, 0));
    // The receive queue goes on at next_used 1.
    s.post(2048);
    s.kick_rx();
    let c = frame(80, 5);
    s.peer_send(&c);
    s.run_until(|s| s.rx.used_idx() == 2);
    assert_eq!(s.rx.used_entry(1), (1, (NET_HDR_LEN + 80) as u32));
}

/// A virtio-net header: `flags`, `gso_type`, `gso_size`, `csum_start`,
/// `csum_offset` (hdr_len 54, num_buffers 0).
fn net_header(flags: u8, gso_type: u8, gso_size: u16, start: u16, offset: u16) -> [u8; 12] {
    let mut h = [0u8; NET_HDR_LEN];
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&54u16.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&start.to_le_bytes());
    h[8..10].copy_from_slice(&offset.to_le_bytes());
    h
}

#[test]
fn offloads_are_offered() {
    let m = mem();
    let s = Setup::new(&m, true);
    let f = s.looped.lock().features();
    for bit in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
    ] {
        assert_ne!(f & bit, 0);
    }
}

#[test]
fn a_large_tcp_segment_leaves_as_checksummed_frames_of_the_mss() {
    let m = mem();
    let mut s = Setup::new(&m, true);
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
    let big = offload::tcp_frame(false, &data, 0x18);
    s.send_with_header(net_header(1, 1, 1448, 34, 16), &big);
    // A plain frame after it keeps its place.
    let after = frame(100, 9);
    s.send(&after);
    s.kick_tx();
    let mut joined = Vec::new();
    for i in 0..4 {
        let f = s.peer_recv();
        assert!(checksum_verified(&f), "segment {i}");
        assert!(f.len() <= 14 + 20 + 20 + 1448);
        joined.extend_from_slice(&f[54..]);
    }
    assert_eq!(joined, data);
    assert_eq!(s.peer_recv(), after);
    assert_eq!(s.tx.used(), vec![(0, 0), (2, 0)]);
    let c = s.counters();
    assert_eq!((c.tx_frames, c.tx_dropped), (5, 0));
}

#[test]
fn a_checksum_left_to_the_card_is_completed() {
    let m = mem();
    let mut s = Setup::new(&m, true);
    let mut f = offload::tcp_frame(true, b"hello over IPv6", 0x18);
    // The guest leaves the pseudo-header's sum in the field, as Linux does:
    // addresses, length and protocol, folded.
    let mut pseudo: u32 = f[22..54]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>()
        + (f.len() as u32 - 54)
        + 6;
    while pseudo > 0xffff {
        pseudo = (pseudo & 0xffff) + (pseudo >> 16);
    }
    f[70..72].copy_from_slice(&(pseudo as u16).to_be_bytes());
    assert!(!checksum_verified(&f));
    s.send_with_header(net_header(1, 0, 0, 54, 16), &f);
    s.kick_tx();
    let out = s.peer_recv();
    assert!(checksum_verified(&out));
    assert_eq!(out[..70], f[..70]);
}

#[test]
fn received_frames_are_marked_only_when_their_checksum_verifies() {
    let m = mem();
    let mut s = Setup::new(&m, true);
    let mut good = offload::tcp_frame(false, b"payload", 0x18);
    let mut scratch = Vec::new();
    let mut segs = Vec::new();
    let header = TxHeader::parse(&net_header(1, 1, 1448, 34, 16));
    offload::transmit(&header, u64::MAX, &mut good, &mut scratch, |f| {
        segs.push(f.to_vec())
    })
    .unwrap();
    let good = segs.remove(0);
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 0x40;
    let plain = frame(80, 4);
    let bufs: Vec<u64> = (0..3).map(|_| s.post(2048)).collect();
    s.kick_rx();
    for f in [&good, &bad, &plain] {
        s.peer_send(f);
    }
    s.run_until(|s| s.rx.used().len() == 3);
    let flags: Vec<u8> = bufs.iter().map(|b| read_guest(&m, *b, 1)[0]).collect();
    assert_eq!(flags, [HDR_F_DATA_VALID, 0, 0]);
    assert_eq!(read_guest(&m, bufs[1] + NET_HDR_LEN as u64, bad.len()), bad);
}

#[test]
fn offloads_the_driver_did_not_take_are_refused_and_not_vouched_for() {
    let m = mem();
    let mut s = Setup::without(&m, VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_GUEST_CSUM);
    let data = vec![7u8; 3000];
    let big = offload::tcp_frame(false, &data, 0x18);
    s.send_with_header(net_header(1, 1, 1448, 34, 16), &big);
    // Not a known segmentation type at all.
    s.send_with_header(net_header(0, 3, 1448, 34, 16), &big);
    let after = frame(64, 5);
    s.send(&after);
    s.kick_tx();
    assert_eq!(s.peer_recv(), after);
    assert!(s.peer_has_nothing());
    assert_eq!(s.tx.used(), vec![(0, 0), (2, 0), (4, 0)]);
    assert_eq!(s.counters().tx_frames, 1);
    assert!(!s.looped.lock().interrupt().needs_reset());

    let mut good = offload::tcp_frame(false, b"payload", 0x18);
    let mut segs = Vec::new();
    let header = TxHeader::parse(&net_header(1, 1, 1448, 34, 16));
    offload::transmit(&header, u64::MAX, &mut good, &mut Vec::new(), |f| {
        segs.push(f.to_vec())
    })
    .unwrap();
    let buf = s.post(2048);
    s.kick_rx();
    s.peer_send(&segs[0]);
    s.run_until(|s| s.rx.used().len() == 1);
    assert_eq!(read_guest(&m, buf, 1)[0], 0);
}

/// The segments a 14,480-byte send is cut into at 1,448 bytes (TCP over
/// IPv4, ACK and PSH), and the data.
fn ten_segments() -> (Vec<Vec<u8>>, Vec<u8>) {
    let data: Vec<u8> = (0..14_480u32).map(|i| (i % 251) as u8).collect();
    let mut big = offload::tcp_frame(false, &data, 0x18);
    let header = TxHeader::parse(&net_header(1, 1, 1448, 34, 16));
    let mut segs = Vec::new();
    offload::transmit(&header, u64::MAX, &mut big, &mut Vec::new(), |f| {
        segs.push(f.to_vec())
    })
    .unwrap();
    assert_eq!(segs.len(), 10);
    (segs, data)
}

#[test]
fn segments_read_together_reach_the_guest_joined() {
    let m = mem();
    let mut s = Setup::new(&m, true);
    let (segs, data) = ten_segments();
    let bufs: Vec<u64> = (0..12).map(|_| s.post(2048)).collect();
    s.kick_rx();
    // One write: the card reads them in one go.
    let mut wire = Vec::new();
    for f in &segs {
        wire.extend_from_slice(&(f.len() as u32).to_be_bytes());
        wire.extend_from_slice(f);
    }
    s.peer.write_all(&wire).unwrap();
    let total = NET_HDR_LEN + 54 + data.len();
    let chains = total.div_ceil(2048);
    s.run_until(|s| s.rx.used().len() == chains);
    let used = s.rx.used();
    let mut got = Vec::new();
    for (buf, (_, len)) in bufs.iter().zip(&used) {
        got.extend_from_slice(&read_guest(&m, *buf, *len as usize));
    }
    assert_eq!(got.len(), total);
    let h = &got[..NET_HDR_LEN];
    let le = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    assert_eq!(h[0], offload::HDR_F_NEEDS_CSUM);
    assert_eq!(h[1], 1, "GSO TCPv4");
    assert_eq!((le(2), le(4), le(6), le(8)), (54, 1448, 34, 16));
    assert_eq!(usize::from(le(10)), chains, "num_buffers");
    let frame = &got[NET_HDR_LEN..];
    assert_eq!(&frame[54..], &data[..]);
    assert_eq!(frame[..14], segs[0][..14]);
    let c = s.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (10, 0));
    assert_eq!(c.rx_bytes, segs.iter().map(|f| f.len() as u64).sum::<u64>());
}

#[test]
fn segments_are_not_joined_for_a_driver_that_cannot_take_them() {
    let (segs, _) = ten_segments();
    let mut wire = Vec::new();
    for f in &segs {
        wire.extend_from_slice(&(f.len() as u32).to_be_bytes());
        wire.extend_from_slice(f);
    }
    for drop in [
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        let m = mem();
        let mut s = Setup::without(&m, drop);
        let bufs: Vec<u64> = (0..10).map(|_| s.post(2048)).collect();
        s.kick_rx();
        s.peer.write_all(&wire).unwrap();
        s.run_until(|s| s.rx.used().len() == 10);
        for (buf, seg) in bufs.iter().zip(&segs) {
            let got = read_guest(&m, *buf, NET_HDR_LEN + seg.len());
            assert_eq!(got[1], 0, "no GSO without {drop:#x}");
            assert_eq!(&got[NET_HDR_LEN..], &seg[..]);
        }
    }
}
