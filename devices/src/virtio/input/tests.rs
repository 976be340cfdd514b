//! virtio-input against a driver played through mock queues: the
//! configuration space as Linux reads it at probe, host events delivered
//! whole and in order however few buffers the driver gives, LEDs, bad
//! chains, and a snapshot in the middle of a burst.

use super::*;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::virtio::test_utils::{
    mem, mmio_activate, read_guest, snapshot_through_json, Looped, TestQueue, R, W,
};

type Setup = Looped<Input>;

fn setup(kind: InputKind) -> Setup {
    Looped::new(|irq| Input::new(kind, irq).unwrap())
}

/// Asks the configuration space for `select`/`subsel` as Linux does (byte
/// writes, then `size`, then the union); returns the answer.
fn ask(d: &mut Input, select: u8, subsel: u8) -> Vec<u8> {
    d.write_config(0, &[select]);
    d.write_config(1, &[subsel]);
    let mut size = [0u8];
    d.read_config(2, &mut size);
    let mut answer = vec![0u8; usize::from(size[0])];
    d.read_config(8, &mut answer);
    answer
}

fn has(bitmap: &[u8], code: u16) -> bool {
    bitmap
        .get(usize::from(code / 8))
        .is_some_and(|b| b & (1 << (code % 8)) != 0)
}

#[test]
fn keyboard_config_reads_as_qemus() {
    let s = setup(InputKind::Keyboard);
    let mut d = s.lock();
    assert_eq!(d.device_type(), 18);
    assert_eq!(d.queue_max_sizes(), &[64, 64]);
    assert_eq!(ask(&mut d, CFG_ID_NAME, 0), b"QEMU Virtio Keyboard");
    assert_eq!(ask(&mut d, CFG_ID_SERIAL, 0), b"");
    assert_eq!(
        ask(&mut d, CFG_ID_DEVIDS, 0),
        [6, 0, 0x27, 0x06, 1, 0, 1, 0]
    );
    let keys = ask(&mut d, CFG_EV_BITS, EV_KEY as u8);
    // KEY_MEDIA (226) is the highest: 29 bytes.
    assert_eq!(keys.len(), 29);
    // udev calls it a keyboard only if KEY_ESC..KEY_D are all there.
    for code in 1..=31 {
        assert!(has(&keys, code), "key {code}");
    }
    assert!(!has(&keys, 0));
    assert!(!has(&keys, BTN_LEFT));
    assert_eq!(ask(&mut d, CFG_EV_BITS, EV_REP as u8).len(), 1);
    assert_eq!(ask(&mut d, CFG_EV_BITS, EV_LED as u8), [0b111]);
    assert_eq!(ask(&mut d, CFG_EV_BITS, EV_ABS as u8), b"");
    assert_eq!(ask(&mut d, CFG_EV_BITS, EV_REL as u8), b"");
    assert_eq!(ask(&mut d, CFG_ABS_INFO, 0), b"");
    assert_eq!(ask(&mut d, CFG_PROP_BITS, 0), b"");
    // Unknown selects, and a select the driver writes past the union.
    assert_eq!(ask(&mut d, 0x7f, 3), b"");
    d.write_config(200, &[1, 2, 3]);
    let mut all = [0u8; 4];
    d.read_config(0, &mut all);
    assert_eq!(all, [0x7f, 3, 0, 0]);
}

#[test]
fn tablet_config_has_two_axes_buttons_and_a_wheel() {
    let s = setup(InputKind::Tablet);
    let mut d = s.lock();
    assert_eq!(ask(&mut d, CFG_ID_NAME, 0), b"QEMU Virtio Tablet");
    assert_eq!(ask(&mut d, CFG_ID_DEVIDS, 0)[4], 3);
    let keys = ask(&mut d, CFG_EV_BITS, EV_KEY as u8);
    for b in [BTN_LEFT, BTN_RIGHT, BTN_MIDDLE, BTN_SIDE, BTN_EXTRA] {
        assert!(has(&keys, b));
    }
    // No key below BTN_MISC: the VT keyboard handler leaves it alone.
    assert!((0..0x100).all(|c| !has(&keys, c)));
    assert_eq!(ask(&mut d, CFG_EV_BITS, EV_ABS as u8), [0b11]);
    assert_eq!(ask(&mut d, CFG_EV_BITS, EV_REL as u8), [0, 1]);
    assert_eq!(ask(&mut d, CFG_EV_BITS, EV_REP as u8), b"");
    let x = ask(&mut d, CFG_ABS_INFO, ABS_X as u8);
    assert_eq!(x.len(), 20);
    assert_eq!(&x[4..8], &0x7fffu32.to_le_bytes());
    assert_eq!(ask(&mut d, CFG_ABS_INFO, 5), b"");
}

/// Posts `n` 8-byte event buffers from `base` on `q`.
fn post_buffers(q: &mut TestQueue, base: u64, n: u64) {
    for i in 0..n {
        q.add_chain(&[(base + i * 8, 8, W)]);
    }
}

/// The events the device wrote into the buffers of the used entries
/// taken since the last call (buffers posted by [`post_buffers`]).
fn received(q: &mut TestQueue, mem: &GuestMemoryMmap, base: u64) -> Vec<InputEvent> {
    q.take_used()
        .into_iter()
        .map(|(head, len)| {
            assert_eq!(len, 8, "entry of head {head}");
            let b = read_guest(mem, base + u64::from(head) * 8, 8);
            InputEvent::from_bytes(b.try_into().unwrap())
        })
        .collect()
}

fn key(code: u16, down: bool) -> [InputEvent; 2] {
    [
        InputEvent::new(EV_KEY, code, u32::from(down)),
        InputEvent::syn(),
    ]
}

#[test]
fn a_burst_arrives_whole_and_in_order_through_few_buffers() {
    let mut s = setup(InputKind::Keyboard);
    let mem = mem();
    let mut events = TestQueue::new(&mem, 0, 64);
    let status = TestQueue::new(&mem, 0x4000, 16);
    s.activate(&mem, &[&events, &status], false);
    s.settle();
    let tx = s.lock().sender();
    // 100 keys typed at once: 400 events, against 8 buffers at a time.
    let mut sent = Vec::new();
    for i in 0..100u16 {
        let code = 16 + i % 10;
        sent.extend(key(code, true));
        sent.extend(key(code, false));
    }
    tx.send(&sent).unwrap();
    s.settle();
    assert_eq!(events.used_idx(), 0, "no buffers yet");
    assert_eq!(tx.pending(), 400);
    let base = 0x10_000;
    let mut got = Vec::new();
    while got.len() < sent.len() {
        // The driver refills the ring with the same 8 slots.
        events.next_desc = 0;
        post_buffers(&mut events, base, 8);
        s.kick(0);
        s.settle();
        let more = received(&mut events, &mem, base);
        assert!(!more.is_empty(), "stalled after {} events", got.len());
        got.extend(more);
    }
    assert_eq!(got, sent);
    assert_eq!(tx.pending(), 0);
    assert!(s.irq.read().is_ok());
}

#[test]
fn events_sent_before_the_driver_are_kept_for_it() {
    let mut s = setup(InputKind::Keyboard);
    let tx = s.lock().sender();
    tx.send(&key(28, true)).unwrap();
    s.settle();
    let mem = mem();
    let mut events = TestQueue::new(&mem, 0, 64);
    let status = TestQueue::new(&mem, 0x4000, 16);
    post_buffers(&mut events, 0x10_000, 4);
    s.activate(&mem, &[&events, &status], false);
    s.settle();
    assert_eq!(received(&mut events, &mem, 0x10_000), key(28, true));
    // And after a reset, for the next driver.
    s.lock().reset();
    tx.send(&key(28, false)).unwrap();
    s.settle();
    let mut events = TestQueue::new(&mem, 0x8000, 64);
    post_buffers(&mut events, 0x20_000, 4);
    s.activate(&mem, &[&events, &status], false);
    s.settle();
    assert_eq!(received(&mut events, &mem, 0x20_000), key(28, false));
}

#[test]
fn the_host_queue_is_bounded_and_events_are_checked() {
    let s = setup(InputKind::Keyboard);
    let tx = s.lock().sender();
    let many = vec![InputEvent::syn(); MAX_PENDING_EVENTS];
    tx.send(&many).unwrap();
    let e = tx.send(&key(30, true)).unwrap_err();
    assert!(e.to_string().contains("queue is full"), "{e}");
    assert_eq!(tx.pending(), MAX_PENDING_EVENTS);

    let s = setup(InputKind::Tablet);
    let tx = s.lock().sender();
    // A keyboard key, an axis value out of range, a wheel on the wrong
    // axis: refused whole.
    for bad in [
        InputEvent::new(EV_KEY, 30, 1),
        InputEvent::new(EV_ABS, ABS_X, ABS_MAX + 1),
        InputEvent::new(EV_REL, 0, 1),
    ] {
        let e = tx.send(&[InputEvent::syn(), bad]).unwrap_err();
        assert!(
            e.to_string().contains("QEMU Virtio Tablet has no event"),
            "{e}"
        );
    }
    assert_eq!(tx.pending(), 0);
    tx.send(&[
        InputEvent::new(EV_ABS, ABS_X, ABS_MAX),
        InputEvent::new(EV_ABS, ABS_Y, 0),
        InputEvent::new(EV_KEY, BTN_LEFT, 1),
        InputEvent::new(EV_REL, REL_WHEEL, u32::MAX),
        InputEvent::syn(),
    ])
    .unwrap();
    assert_eq!(tx.pending(), 5);
}

#[test]
fn short_buffers_are_completed_empty_and_the_event_waits() {
    let mut s = setup(InputKind::Keyboard);
    let mem = mem();
    let mut events = TestQueue::new(&mem, 0, 64);
    let status = TestQueue::new(&mem, 0x4000, 16);
    s.activate(&mem, &[&events, &status], false);
    let tx = s.lock().sender();
    tx.send(&key(2, true)).unwrap();
    // Too short, read-only, outside memory: each completed empty.
    events.add_chain(&[(0x10_000, 4, W)]);
    events.add_chain(&[(0x10_000, 8, R)]);
    events.add_chain(&[(0xffff_0000, 8, W)]);
    events.add_chain(&[(0x11_000, 8, W)]);
    events.add_chain(&[(0x11_008, 8, W)]);
    s.kick(0);
    s.settle();
    let used = events.take_used();
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        [0, 0, 0, 8, 8]
    );
    assert_eq!(
        InputEvent::from_bytes(read_guest(&mem, 0x11_000, 8).try_into().unwrap()),
        key(2, true)[0]
    );
    assert!(s.lock().state.is_running());
}

#[test]
fn the_driver_sets_leds_on_the_status_queue() {
    let mut s = setup(InputKind::Keyboard);
    let mem = mem();
    let events = TestQueue::new(&mem, 0, 64);
    let mut status = TestQueue::new(&mem, 0x4000, 16);
    s.activate(&mem, &[&events, &status], false);
    s.settle();
    let write =
        |addr: u64, e: InputEvent| mem.write_slice(&e.to_bytes(), GuestAddress(addr)).unwrap();
    write(0x20_000, InputEvent::new(EV_LED, LED_CAPSL, 1));
    write(0x20_008, InputEvent::new(EV_LED, LED_NUML, 1));
    write(0x20_010, InputEvent::new(EV_LED, LED_CAPSL, 0));
    // Not an LED, and a code too large to hold: ignored.
    write(0x20_018, InputEvent::new(EV_LED, 40, 1));
    write(0x20_020, InputEvent::new(EV_KEY, 30, 1));
    for i in 0..5 {
        status.add_chain(&[(0x20_000 + i * 8, 8, R)]);
    }
    // Too short.
    status.add_chain(&[(0x20_000, 2, R)]);
    s.kick(1);
    s.settle();
    assert_eq!(status.used_idx(), 6);
    assert_eq!(s.lock().leds(), 1 << LED_NUML);
}

#[test]
fn a_snapshot_keeps_the_rest_of_a_burst() {
    let mem = mem();
    let mut events = TestQueue::new(&mem, 0, 64);
    let status = TestQueue::new(&mem, 0x4000, 16);
    let mut s = setup(InputKind::Keyboard);
    let mut t = s.transport(&mem, "keyboard");
    mmio_activate(&mut t, 0, &[&events, &status]);
    let tx = s.lock().sender();
    let mut sent = Vec::new();
    for code in [30, 48, 46] {
        sent.extend(key(code, true));
        sent.extend(key(code, false));
    }
    tx.send(&sent).unwrap();
    post_buffers(&mut events, 0x10_000, 5);
    s.kick(0);
    s.settle();
    let mut got = received(&mut events, &mem, 0x10_000);
    assert_eq!(got.len(), 5);
    s.lock().write_config(0, &[CFG_EV_BITS, EV_LED as u8]);
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let snap = snapshot_through_json(&mut t, dir.as_path());
    let DeviceExtra::Input(extra) = &snap.device.extra else {
        panic!("{:?}", snap.device.extra);
    };
    assert_eq!(extra.pending.len(), 7);

    // A tablet refuses the keyboard's state.
    let s3 = setup(InputKind::Tablet);
    let mut t3 = s3.transport(&mem, "keyboard");
    let e = t3.restore(&snap, dir.as_path()).unwrap_err();
    assert!(e.to_string().contains("not a QEMU Virtio Tablet"), "{e}");

    let mut s2 = setup(InputKind::Keyboard);
    let mut t2 = s2.transport(&mem, "keyboard");
    t2.restore(&snap, dir.as_path()).unwrap();
    let mut size = [0u8];
    s2.lock().read_config(2, &mut size);
    assert_eq!(size, [1], "the select survives");
    events.next_desc = 0;
    post_buffers(&mut events, 0x10_000, 8);
    t2.kick();
    s2.settle();
    got.extend(received(&mut events, &mem, 0x10_000));
    assert_eq!(got, sent);
}
