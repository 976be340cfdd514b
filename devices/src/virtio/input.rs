//! virtio-input (device id 18): a keyboard and an absolute pointer (a
//! tablet), fed from the host (QMP `send-key`, `input-send-event`).
//!
//! Two queues: the event queue (0), which the driver keeps filled with
//! 8-byte device-writable buffers, one evdev event each, and the status
//! queue (1), on which the driver sends LED changes back. The
//! configuration space answers the driver's `select`/`subsel` questions
//! (name, ids, event bitmaps, axis ranges) the way QEMU's virtio-keyboard
//! and virtio-tablet do, so a guest sees the same devices.
//!
//! Invariants: events from the host are never dropped and never reordered.
//! They wait in a bounded host-side queue ([`InputSender`], refused with
//! [`InputError::Full`] past [`MAX_PENDING_EVENTS`]) until the driver
//! returns buffers; a burst of typing is delivered whole however fast it
//! was sent. Everything the driver writes (select values, status events,
//! chains) is untrusted: unknown selects answer size 0, a chain too short
//! for an event is completed empty and logged.

pub mod keys;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::{drain, ChainError, Handled};
use super::{
    watch, ActivateContext, ActivateError, DeviceState, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::snapshot::{
    restore_activation, BlobDir, DeviceExtra, DeviceSnapshot, InputSnapshot, SnapshotError,
};

/// virtio device id of an input device.
pub const INPUT_DEVICE_ID: u32 = 18;
/// Largest size of each queue.
pub const INPUT_QUEUE_SIZE: u16 = 64;
/// Host events waiting for the driver's buffers, at most: a minute of
/// fast typing (each key is 4 events).
pub const MAX_PENDING_EVENTS: usize = 16 * 1024;
/// Status events taken per turn of the event loop.
const STATUS_PER_EVENT: usize = 64;

/// evdev event types.
pub const EV_SYN: u16 = 0x00;
/// A key or button.
pub const EV_KEY: u16 = 0x01;
/// A relative axis (the wheel).
pub const EV_REL: u16 = 0x02;
/// An absolute axis.
pub const EV_ABS: u16 = 0x03;
/// An LED.
pub const EV_LED: u16 = 0x11;
/// Key autorepeat.
pub const EV_REP: u16 = 0x14;
/// SYN_REPORT: the end of a group of events.
pub const SYN_REPORT: u16 = 0;
/// Pointer buttons.
pub const BTN_LEFT: u16 = 0x110;
/// Right button.
pub const BTN_RIGHT: u16 = 0x111;
/// Middle button.
pub const BTN_MIDDLE: u16 = 0x112;
/// Side button.
pub const BTN_SIDE: u16 = 0x113;
/// Extra button.
pub const BTN_EXTRA: u16 = 0x114;
/// Absolute axes.
pub const ABS_X: u16 = 0x00;
/// Vertical axis.
pub const ABS_Y: u16 = 0x01;
/// The wheel.
pub const REL_WHEEL: u16 = 0x08;
/// Largest absolute coordinate (QEMU's `INPUT_EVENT_ABS_MAX`).
pub const ABS_MAX: u32 = 0x7fff;

/// Configuration selects (`virtio_input_config_select`).
const CFG_UNSET: u8 = 0x00;
const CFG_ID_NAME: u8 = 0x01;
const CFG_ID_SERIAL: u8 = 0x02;
const CFG_ID_DEVIDS: u8 = 0x03;
const CFG_PROP_BITS: u8 = 0x10;
const CFG_EV_BITS: u8 = 0x11;
const CFG_ABS_INFO: u8 = 0x12;
/// Offset of the answer in the configuration space.
const CONFIG_UNION: usize = 8;
/// Size of the configuration space.
const CONFIG_SIZE: usize = CONFIG_UNION + 128;
/// The bus a virtual device sits on (`BUS_VIRTUAL`).
const BUS_VIRTUAL: u16 = 0x06;
/// LEDs a keyboard has.
const LED_NUML: u16 = 0;
const LED_CAPSL: u16 = 1;
const LED_SCROLLL: u16 = 2;

/// One evdev event, as it travels on the event and status queues
/// (`virtio_input_event`: le16 type, le16 code, le32 value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputEvent {
    /// EV_KEY, EV_ABS, ...
    pub kind: u16,
    /// The key, button or axis.
    pub code: u16,
    /// 1 pressed / 0 released, a coordinate, ...
    pub value: u32,
}

impl InputEvent {
    /// An event.
    pub const fn new(kind: u16, code: u16, value: u32) -> Self {
        InputEvent { kind, code, value }
    }

    /// The SYN_REPORT that ends a group.
    pub const fn syn() -> Self {
        InputEvent::new(EV_SYN, SYN_REPORT, 0)
    }

    fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&self.kind.to_le_bytes());
        b[2..4].copy_from_slice(&self.code.to_le_bytes());
        b[4..8].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    fn from_bytes(b: [u8; 8]) -> Self {
        InputEvent {
            kind: u16::from_le_bytes([b[0], b[1]]),
            code: u16::from_le_bytes([b[2], b[3]]),
            value: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

/// Which device this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A PC keyboard with every key QEMU names, autorepeat and three LEDs.
    Keyboard,
    /// An absolute pointer: X and Y in 0..=[`ABS_MAX`], five buttons and a
    /// wheel.
    Tablet,
}

impl InputKind {
    /// The name the guest sees (QEMU's, so that guest configuration
    /// written for QEMU's devices matches).
    pub fn name(self) -> &'static str {
        match self {
            InputKind::Keyboard => "QEMU Virtio Keyboard",
            InputKind::Tablet => "QEMU Virtio Tablet",
        }
    }

    /// The evdev codes this device sends for event type `kind`.
    fn codes(self, kind: u16) -> Vec<u16> {
        match (self, kind) {
            (InputKind::Keyboard, EV_KEY) => keys::KEYS.iter().map(|k| k.linux).collect(),
            (InputKind::Keyboard, EV_LED) => vec![LED_NUML, LED_CAPSL, LED_SCROLLL],
            (InputKind::Tablet, EV_KEY) => {
                vec![BTN_LEFT, BTN_RIGHT, BTN_MIDDLE, BTN_SIDE, BTN_EXTRA]
            }
            (InputKind::Tablet, EV_REL) => vec![REL_WHEEL],
            (InputKind::Tablet, EV_ABS) => vec![ABS_X, ABS_Y],
            _ => Vec::new(),
        }
    }

    /// Whether this device sends `event` (SYN always).
    pub fn accepts(self, event: &InputEvent) -> bool {
        match event.kind {
            EV_SYN => event.code == SYN_REPORT,
            EV_ABS => self.codes(EV_ABS).contains(&event.code) && event.value <= ABS_MAX,
            kind => self.codes(kind).contains(&event.code),
        }
    }

    /// The answer to `select`/`subsel`: the bytes of the union (their
    /// count is `size`).
    fn answer(self, select: u8, subsel: u8) -> Vec<u8> {
        match (select, subsel) {
            (CFG_ID_NAME, 0) => self.name().as_bytes().to_vec(),
            (CFG_ID_DEVIDS, 0) => {
                let product: u16 = match self {
                    InputKind::Keyboard => 1,
                    InputKind::Tablet => 3,
                };
                [BUS_VIRTUAL, 0x0627, product, 1]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect()
            }
            (CFG_EV_BITS, kind) => {
                let kind = u16::from(kind);
                if self == InputKind::Keyboard && kind == EV_REP {
                    // Present, with no codes: the kernel repeats keys.
                    return vec![0];
                }
                bitmap(&self.codes(kind))
            }
            (CFG_ABS_INFO, axis) if self.codes(EV_ABS).contains(&u16::from(axis)) => {
                // min, max, fuzz, flat, res
                [0, ABS_MAX, 0, 0, 0]
                    .iter()
                    .flat_map(|v: &u32| v.to_le_bytes())
                    .collect()
            }
            // No serial, no properties, and nothing for an unknown select:
            // size 0, "not supported".
            (CFG_UNSET | CFG_ID_SERIAL | CFG_PROP_BITS, _) => Vec::new(),
            _ => Vec::new(),
        }
    }
}

/// An evdev bitmap of `codes`: bit n is byte n / 8, bit n % 8, as long as
/// the highest code needs (empty for no codes).
fn bitmap(codes: &[u16]) -> Vec<u8> {
    let Some(&max) = codes.iter().max() else {
        return Vec::new();
    };
    let mut b = vec![0u8; usize::from(max) / 8 + 1];
    for &c in codes {
        b[usize::from(c) / 8] |= 1 << (c % 8);
    }
    b
}

/// Why host events could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The guest takes events slower than they come.
    #[error(
        "the {device}'s queue is full ({MAX_PENDING_EVENTS} events wait for the guest to take them)"
    )]
    Full {
        /// The device's name.
        device: &'static str,
    },
    /// An event this device cannot send.
    #[error("the {device} has no event of type {kind:#x} code {code:#x} (value {value})")]
    Unsupported {
        /// The device's name.
        device: &'static str,
        /// The event's type.
        kind: u16,
        /// Its code.
        code: u16,
        /// Its value.
        value: u32,
    },
    /// An eventfd could not be created.
    #[error("cannot create an input eventfd: {0}")]
    EventFd(std::io::Error),
}

/// What the host side and the device share: the events waiting for the
/// guest, and the eventfd that wakes the device's event loop.
struct Shared {
    pending: Mutex<VecDeque<InputEvent>>,
    evt: EventFd,
}

fn lock(m: &Mutex<VecDeque<InputEvent>>) -> MutexGuard<'_, VecDeque<InputEvent>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The host's end of an input device: sends events to the guest from any
/// thread (the monitors').
#[derive(Clone)]
pub struct InputSender {
    kind: InputKind,
    shared: Arc<Shared>,
}

impl InputSender {
    /// Which device this sends to.
    pub fn kind(&self) -> InputKind {
        self.kind
    }

    /// Queues `events` for the guest, all or none, in order; the caller
    /// ends each group with [`InputEvent::syn`]. Refused if one is not an
    /// event of this device or the queue has no room for all of them.
    pub fn send(&self, events: &[InputEvent]) -> Result<(), InputError> {
        let device = self.kind.name();
        if let Some(e) = events.iter().find(|e| !self.kind.accepts(e)) {
            return Err(InputError::Unsupported {
                device,
                kind: e.kind,
                code: e.code,
                value: e.value,
            });
        }
        {
            let mut pending = lock(&self.shared.pending);
            if pending.len() + events.len() > MAX_PENDING_EVENTS {
                return Err(InputError::Full { device });
            }
            pending.extend(events.iter().copied());
        }
        if let Err(e) = self.shared.evt.write(1) {
            warn!("{device}: cannot wake the device: {e}");
        }
        Ok(())
    }

    /// Events waiting for the guest.
    pub fn pending(&self) -> usize {
        lock(&self.shared.pending).len()
    }
}

/// Event data tags.
const EVENT_QUEUE: u32 = 0;
const STATUS_QUEUE: u32 = 1;
const HOST_EVENTS: u32 = 2;

/// A virtio input device.
pub struct Input {
    kind: InputKind,
    interrupt: Arc<Interrupt>,
    queue_events: Vec<EventFd>,
    shared: Arc<Shared>,
    state: DeviceState,
    select: u8,
    subsel: u8,
    /// The LEDs the driver last set (bit n = LED n).
    leds: u32,
}

impl Input {
    /// An input device of `kind` raising its interrupt through
    /// `interrupt_evt`.
    pub fn new(kind: InputKind, interrupt_evt: EventFd) -> Result<Input, InputError> {
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(InputError::EventFd);
        Ok(Input {
            kind,
            interrupt: Arc::new(Interrupt::new(interrupt_evt)),
            queue_events: vec![evt()?, evt()?],
            shared: Arc::new(Shared {
                pending: Mutex::new(VecDeque::new()),
                evt: evt()?,
            }),
            state: DeviceState::Inactive,
            select: CFG_UNSET,
            subsel: 0,
            leds: 0,
        })
    }

    /// The host's end, for the monitors.
    pub fn sender(&self) -> InputSender {
        InputSender {
            kind: self.kind,
            shared: self.shared.clone(),
        }
    }

    /// The LEDs the driver set (bit 0 Num Lock, 1 Caps Lock, 2 Scroll Lock).
    pub fn leds(&self) -> u32 {
        self.leds
    }

    /// Moves waiting host events into the driver's buffers, as many as
    /// there are buffers for.
    fn deliver(&mut self) {
        let Some(active) = self.state.running() else {
            return;
        };
        let mut pending = lock(&self.shared.pending);
        if pending.is_empty() {
            return;
        }
        drain(active, 0, None, |mem, chain| {
            let Some(event) = pending.front().copied() else {
                return Handled::Stop;
            };
            let mut writer = match chain.writer(mem) {
                Ok(w) => w,
                Err(e) => return Handled::Malformed(ChainError::Malformed(e)),
            };
            if writer.available_bytes() < 8 {
                return Handled::Malformed(ChainError::Invalid(
                    "an event buffer holds fewer than 8 bytes",
                ));
            }
            if let Err(e) = writer.write_all(&event.to_bytes()) {
                warn!("{}: cannot write an event: {e}", self.kind.name());
                return Handled::Malformed(ChainError::Invalid(
                    "an event buffer cannot be written",
                ));
            }
            pending.pop_front();
            if pending.is_empty() {
                Handled::UsedAndStop(8)
            } else {
                Handled::Used(8)
            }
        });
    }

    /// Takes the driver's status events (LEDs) and returns their buffers.
    fn take_status(&mut self) {
        let Some(active) = self.state.running() else {
            return;
        };
        let name = self.kind.name();
        let leds = &mut self.leds;
        let drained = drain(active, 1, Some(STATUS_PER_EVENT), |mem, chain| {
            let mut reader = match chain.reader(mem) {
                Ok(r) => r,
                Err(e) => return Handled::Malformed(ChainError::Malformed(e)),
            };
            let mut b = [0u8; 8];
            if reader.read_exact(&mut b).is_err() {
                return Handled::Malformed(ChainError::Invalid(
                    "a status buffer holds fewer than 8 bytes",
                ));
            }
            let e = InputEvent::from_bytes(b);
            if e.kind == EV_LED && e.code < 32 {
                if e.value != 0 {
                    *leds |= 1 << e.code;
                } else {
                    *leds &= !(1 << e.code);
                }
                debug!(
                    "{name}: LED {} {}",
                    e.code,
                    if e.value != 0 { "on" } else { "off" }
                );
            }
            Handled::Used(0)
        });
        if drained == super::queue::Drained::Budget {
            if let Err(e) = self.queue_events[1].write(1) {
                warn!("{name}: cannot re-arm the status queue: {e}");
            }
        }
    }
}

impl VirtioDevice for Input {
    fn device_type(&self) -> u32 {
        INPUT_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[INPUT_QUEUE_SIZE, INPUT_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let answer = self.kind.answer(self.select, self.subsel);
        let mut config = [0u8; CONFIG_SIZE];
        config[0] = self.select;
        config[1] = self.subsel;
        // Every answer fits the 128-byte union (the largest, the key
        // bitmap, is 29 bytes).
        let n = answer.len().min(CONFIG_SIZE - CONFIG_UNION);
        config[2] = n as u8;
        config[CONFIG_UNION..CONFIG_UNION + n].copy_from_slice(&answer[..n]);
        super::read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only select and subsel are the driver's to write.
        for (i, &b) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(0) => self.select = b,
                Some(1) => self.subsel = b,
                _ => {}
            }
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.state
            .activate(ctx, &self.interrupt, self.kind.name(), 2)
    }

    fn reset(&mut self) {
        // Events the host sent stay queued for the next driver: a guest
        // rebinding its driver loses no typing.
        self.state.reset();
        self.select = CFG_UNSET;
        self.subsel = 0;
        self.leds = 0;
    }

    fn snapshot(&mut self, _blobs: &BlobDir) -> Result<DeviceSnapshot, SnapshotError> {
        let pending = lock(&self.shared.pending)
            .iter()
            .map(|e| (e.kind, e.code, e.value))
            .collect();
        Ok(self.state.snapshot(DeviceExtra::Input(InputSnapshot {
            keyboard: self.kind == InputKind::Keyboard,
            pending,
            select: self.select,
            subsel: self.subsel,
            leds: self.leds,
        })))
    }

    fn restore(
        &mut self,
        snap: &DeviceSnapshot,
        ctx: Option<ActivateContext>,
        blobs: &BlobDir,
    ) -> Result<(), SnapshotError> {
        let DeviceExtra::Input(s) = &snap.extra else {
            return Err(snap.extra.wrong(blobs, "input"));
        };
        if s.keyboard != (self.kind == InputKind::Keyboard) {
            return Err(SnapshotError::Invalid {
                device: blobs.name(),
                reason: format!("the snapshot's input device is not a {}", self.kind.name()),
            });
        }
        let events: Vec<InputEvent> = s
            .pending
            .iter()
            .map(|&(kind, code, value)| InputEvent::new(kind, code, value))
            .collect();
        if events.len() > MAX_PENDING_EVENTS || events.iter().any(|e| !self.kind.accepts(e)) {
            return Err(SnapshotError::Invalid {
                device: blobs.name(),
                reason: "the waiting input events are not this device's".to_owned(),
            });
        }
        restore_activation(self, snap, ctx, blobs, |d| &mut d.state)?;
        *lock(&self.shared.pending) = events.into();
        self.select = s.select;
        self.subsel = s.subsel;
        self.leds = s.leds;
        Ok(())
    }
}

impl MutEventSubscriber for Input {
    fn init(&mut self, ops: &mut EventOps) {
        let name = self.kind.name();
        watch(
            ops,
            name,
            &[
                Events::with_data(&self.queue_events[0], EVENT_QUEUE, EventSet::IN),
                Events::with_data(&self.queue_events[1], STATUS_QUEUE, EventSet::IN),
                Events::with_data(&self.shared.evt, HOST_EVENTS, EventSet::IN),
            ],
        );
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            EVENT_QUEUE => {
                let _ = self.queue_events[0].read();
                self.deliver();
            }
            STATUS_QUEUE => {
                let _ = self.queue_events[1].read();
                self.take_status();
            }
            HOST_EVENTS => {
                let _ = self.shared.evt.read();
                self.deliver();
            }
            other => warn!("{}: unexpected event tag {other}", self.kind.name()),
        }
    }
}

#[cfg(test)]
mod tests;
