//! The switch end to end over real unix sockets, with plain blocking
//! clients standing in for VMs. Each test uses its own temp directory and
//! waits at most a few seconds for anything.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::frame::{encode, MAX_FRAME};
use super::pcap::read as pcap_read;
use super::*;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(100);
const BROADCAST: Mac = [0xff; 6];

/// A fresh directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        let d = std::env::temp_dir().join(format!("skiff-sw-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    fn sock(&self) -> PathBuf {
        self.0.join("s")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mac(n: u8) -> Mac {
    [0x52, 0x54, 0x00, 0x12, 0x01, n]
}

fn frame(dst: Mac, src: Mac, payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload_len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f.extend((0..payload_len).map(|i| (i as u8) ^ seed));
    f
}

/// Polls until `cond` holds on the switch's counters.
fn wait_for(sw: &SwitchHandle, what: &str, cond: impl Fn(&Counters) -> bool) {
    let t = Instant::now();
    loop {
        let c = sw.counters();
        if cond(&c) {
            return;
        }
        assert!(t.elapsed() < WAIT, "timed out waiting for {what}: {c}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn connected(c: &Counters) -> usize {
    c.ports.iter().filter(|p| p.connected).count()
}

struct Client(UnixStream);

impl Client {
    fn send(&mut self, f: &[u8]) {
        self.0.write_all(&encode(f)).unwrap();
    }

    fn recv(&mut self) -> Vec<u8> {
        self.0.set_read_timeout(Some(WAIT)).unwrap();
        let mut len = [0; 4];
        self.0.read_exact(&mut len).expect("a frame");
        let mut f = vec![0; u32::from_be_bytes(len) as usize];
        self.0.read_exact(&mut f).unwrap();
        f
    }

    /// Nothing arrives for a moment.
    fn quiet(&mut self) {
        self.0.set_read_timeout(Some(QUIET)).unwrap();
        let mut b = [0; 1];
        match self.0.read(&mut b) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            r => panic!("expected nothing, got {r:?}"),
        }
    }

    /// The switch closed the connection.
    fn closed(&mut self) {
        self.0.set_read_timeout(Some(WAIT)).unwrap();
        let mut b = [0; 64];
        match self.0.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            r => panic!("expected the connection closed, got {r:?}"),
        }
    }
}

/// A switch and `n` connected clients, all registered as ports.
fn setup(sw: Switch, n: usize) -> (SwitchHandle, Vec<Client>) {
    let sw = sw.start().unwrap();
    let clients = (0..n).map(|_| join(&sw)).collect();
    (sw, clients)
}

fn join(sw: &SwitchHandle) -> Client {
    let before = connected(&sw.counters());
    let c = Client(UnixStream::connect(sw.socket()).unwrap());
    wait_for(sw, "the port", |c| connected(c) == before + 1);
    c
}

#[test]
fn broadcast_and_unknown_unicast_flood_to_all_other_ports() {
    let dir = TempDir::new("flood");
    let (sw, mut c) = setup(Switch::new(1, dir.sock()), 3);
    let b = frame(BROADCAST, mac(1), 50, 1);
    c[0].send(&b);
    assert_eq!(c[1].recv(), b);
    assert_eq!(c[2].recv(), b);
    // Multicast and a unicast nobody has sent from flood too.
    let m = frame([0x33, 0x33, 0, 0, 0, 1], mac(1), 60, 2);
    let u = frame(mac(9), mac(1), 70, 3);
    c[0].send(&m);
    c[0].send(&u);
    for cl in &mut c[1..] {
        assert_eq!(cl.recv(), m);
        assert_eq!(cl.recv(), u);
    }
    c[0].quiet();
    let counters = sw.stop();
    let p1 = counters.port(1).unwrap();
    assert_eq!((p1.frames_in, p1.bytes_in), (3, 64 + 74 + 84));
    assert_eq!(p1.mac, Some(mac(1)));
    for p in 2..=3 {
        let p = counters.port(p).unwrap();
        assert_eq!((p.frames_out, p.bytes_out, p.drops), (3, 64 + 74 + 84, 0));
    }
    assert!(!counters.total().connected);
    assert!(!dir.sock().exists(), "the socket is removed");
}

#[test]
fn a_reply_goes_only_to_the_learned_port() {
    let dir = TempDir::new("learn");
    let (sw, mut c) = setup(Switch::new(1, dir.sock()), 3);
    let ask = frame(BROADCAST, mac(1), 28, 1);
    c[0].send(&ask);
    assert_eq!(c[1].recv(), ask);
    assert_eq!(c[2].recv(), ask);
    let reply = frame(mac(1), mac(2), 28, 2);
    c[1].send(&reply);
    assert_eq!(c[0].recv(), reply);
    c[2].quiet();
    // Both ends are learned now.
    let back = frame(mac(2), mac(1), 100, 3);
    c[0].send(&back);
    assert_eq!(c[1].recv(), back);
    c[2].quiet();
    // A frame to an address on its own port goes nowhere.
    c[0].send(&frame(mac(1), mac(1), 10, 4));
    for cl in &mut c {
        cl.quiet();
    }
    let counters = sw.stop();
    assert_eq!(counters.port(3).unwrap().frames_out, 1);
}

#[test]
fn an_address_on_two_ports_floods() {
    let dir = TempDir::new("twomac");
    let (_sw, mut c) = setup(Switch::new(1, dir.sock()), 3);
    // Ports 1 and 2 share an address, as two NICs of one node would.
    let a = frame(BROADCAST, mac(1), 20, 1);
    c[0].send(&a);
    assert_eq!(c[1].recv(), a);
    assert_eq!(c[2].recv(), a);
    c[1].send(&a);
    assert_eq!(c[0].recv(), a);
    assert_eq!(c[2].recv(), a);
    let to = frame(mac(1), mac(3), 20, 2);
    c[2].send(&to);
    assert_eq!(c[0].recv(), to);
    assert_eq!(c[1].recv(), to);
}

#[test]
fn a_disconnected_port_is_forgotten() {
    let dir = TempDir::new("gone");
    let (sw, mut c) = setup(Switch::new(1, dir.sock()), 3);
    let hello = frame(BROADCAST, mac(3), 20, 1);
    c[2].send(&hello);
    assert_eq!(c[0].recv(), hello);
    assert_eq!(c[1].recv(), hello);
    drop(c.pop());
    wait_for(&sw, "the port to close", |c| connected(c) == 2);
    // Frames for the departed address flood again; the rest still work.
    let f = frame(mac(3), mac(1), 20, 2);
    c[0].send(&f);
    assert_eq!(c[1].recv(), f);
    // A newcomer joins and hears broadcasts.
    let mut d = join(&sw);
    let b = frame(BROADCAST, mac(2), 20, 3);
    c[1].send(&b);
    assert_eq!(c[0].recv(), b);
    assert_eq!(d.recv(), b);
    let counters = sw.stop();
    assert_eq!(counters.ports.len(), 4);
    assert!(!counters.port(3).unwrap().connected);
}

#[test]
fn a_port_that_never_reads_does_not_stall_the_others() {
    let dir = TempDir::new("full");
    let (sw, mut c) = setup(Switch::new(1, dir.sock()).queue_frames(4), 3);
    // c[2] never reads: its socket buffer fills, then its queue.
    let mut sent = 0u64;
    let t = Instant::now();
    while sw.counters().port(3).unwrap().drops == 0 {
        assert!(t.elapsed() < WAIT, "no drops after {sent} frames");
        let f = frame(BROADCAST, mac(1), 1500, sent as u8);
        c[0].send(&f);
        assert_eq!(c[1].recv(), f, "frame {sent}");
        sent += 1;
    }
    for i in 0..20u8 {
        let f = frame(BROADCAST, mac(1), 1000, i);
        c[0].send(&f);
        assert_eq!(c[1].recv(), f);
        sent += 1;
    }
    let counters = sw.stop();
    let (p1, p2, p3) = (
        counters.port(1).unwrap(),
        counters.port(2).unwrap(),
        counters.port(3).unwrap(),
    );
    assert_eq!(p1.frames_in, sent);
    assert_eq!((p2.frames_out, p2.drops), (sent, 0));
    assert!(p3.drops > 0);
    assert!(p3.frames_out + p3.drops <= sent);
}

#[test]
fn a_bad_length_prefix_drops_only_that_connection() {
    let dir = TempDir::new("bad");
    let sw = Switch::new(1, dir.sock()).start().unwrap();
    let mut good = join(&sw);
    let mut other = join(&sw);
    for bad in [MAX_FRAME as u32 + 1, 0, 5, u32::MAX] {
        let mut evil = join(&sw);
        // A good frame first: it still goes through.
        let f = frame(BROADCAST, mac(7), 30, 1);
        let mut bytes = encode(&f);
        bytes.extend_from_slice(&bad.to_be_bytes());
        bytes.extend_from_slice(&[0xab; 64]);
        evil.0.write_all(&bytes).unwrap();
        assert_eq!(good.recv(), f);
        assert_eq!(other.recv(), f);
        evil.closed();
        wait_for(&sw, "the bad port to go", |c| connected(c) == 2);
        let g = frame(mac(2), mac(1), 30, 2);
        good.send(&g);
        assert_eq!(other.recv(), g);
    }
    let counters = sw.stop();
    assert_eq!(counters.ports.len(), 6);
}

#[test]
fn frames_split_across_reads_and_batched_in_one() {
    let dir = TempDir::new("split");
    let (_sw, mut c) = setup(Switch::new(1, dir.sock()), 2);
    let f = frame(BROADCAST, mac(1), 200, 1);
    let w = encode(&f);
    // Cut inside the prefix and inside the frame, with pauses so the
    // switch sees separate reads.
    for part in [&w[..2], &w[2..9], &w[9..100], &w[100..]] {
        c[0].0.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(c[1].recv(), f);
    // Many frames in one write, the largest included.
    let frames: Vec<Vec<u8>> = (0..20u8)
        .map(|i| frame(BROADCAST, mac(1), 46 + usize::from(i) * 70, i))
        .chain([frame(BROADCAST, mac(1), MAX_FRAME - 14, 99)])
        .collect();
    let all: Vec<u8> = frames.iter().flat_map(|f| encode(f)).collect();
    c[0].0.write_all(&all).unwrap();
    for f in &frames {
        assert_eq!(&c[1].recv(), f);
    }
}

#[test]
fn vlan_tagged_frames_pass_unchanged() {
    let dir = TempDir::new("dot1q");
    let (_sw, mut c) = setup(Switch::new(1, dir.sock()), 3);
    let tagged = |dst: Mac, src: Mac, vid: u16| {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&vid.to_be_bytes());
        f.extend_from_slice(&[0x08, 0x06]);
        f.extend_from_slice(&[0x5a; 28]);
        f
    };
    let b = tagged(BROADCAST, mac(1), 42);
    c[0].send(&b);
    assert_eq!(c[1].recv(), b);
    assert_eq!(c[2].recv(), b);
    let u = tagged(mac(1), mac(2), 42);
    c[1].send(&u);
    assert_eq!(c[0].recv(), u);
    c[2].quiet();
}

#[test]
fn the_capture_holds_every_frame_once() {
    let dir = TempDir::new("pcap");
    let file = dir.0.join("vlan1.pcap");
    let sw = Switch::new(1, dir.sock()).pcap(file.clone());
    let (sw, mut c) = setup(sw, 3);
    let start = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let frames = [
        frame(BROADCAST, mac(1), 28, 1),
        frame(mac(1), mac(2), 1486, 2),
        frame(mac(2), mac(1), 0, 3),
    ];
    c[0].send(&frames[0]);
    for cl in &mut c[1..] {
        assert_eq!(cl.recv(), frames[0]);
    }
    c[1].send(&frames[1]);
    assert_eq!(c[0].recv(), frames[1]);
    c[0].send(&frames[2]);
    assert_eq!(c[1].recv(), frames[2]);
    sw.stop();
    let recs = pcap_read::parse(&std::fs::read(&file).unwrap());
    assert_eq!(recs.len(), frames.len());
    let mut last = (0, 0);
    for (r, f) in recs.iter().zip(&frames) {
        assert_eq!(r.orig_len as usize, f.len());
        assert_eq!(&r.data, f);
        assert!(u64::from(r.secs) >= start && u64::from(r.secs) < start + 60);
        assert!((r.secs, r.micros) >= last);
        last = (r.secs, r.micros);
    }
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = TempDir::new("stale");
    drop(std::os::unix::net::UnixListener::bind(dir.sock()).unwrap());
    assert!(dir.sock().exists());
    let sw = Switch::new(1, dir.sock()).start().unwrap();
    match Switch::new(2, dir.sock()).start() {
        Err(SwitchError::InUse { .. }) => {}
        r => panic!("expected InUse, got {:?}", r.map(|_| ())),
    }
    let mut a = join(&sw);
    let mut b = join(&sw);
    let f = frame(BROADCAST, mac(1), 20, 1);
    a.send(&f);
    assert_eq!(b.recv(), f);
    drop(sw);
    assert!(!dir.sock().exists());
    b.closed();
}
