//! The monitors' screen, keyboard and pointer, as QEMU 7.2 gives them:
//! `screendump` (binary PPM, or PNG), `send-key`/`sendkey` with QEMU's key
//! names and numbers and its hold time, `input-send-event`, `query-mice`.
//!
//! Keys go through one timeline per VM: each key event, then the hold
//! time, in the order the commands came, on a thread of its own, so that a
//! command returns at once (as QEMU's does) and typing from any number of
//! commands arrives whole and in order. The devices' own queues never drop
//! an event (skiff_devices::virtio::input).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use skiff_devices::virtio::gpu::Screenshot;
use skiff_devices::virtio::input::{
    keys, InputEvent, InputKind, InputSender, ABS_MAX, ABS_X, ABS_Y, BTN_EXTRA, BTN_LEFT,
    BTN_MIDDLE, BTN_RIGHT, BTN_SIDE, EV_ABS, EV_KEY, EV_REL, REL_WHEEL,
};

use super::qemu::NO_CONSOLE;

/// QEMU's default hold time between key events (`kbd_default_delay_ms`).
pub const DEFAULT_HOLD_MS: u64 = 10;
/// Longest hold time a command may ask for.
const MAX_HOLD_MS: u64 = 10_000;
/// Key events that may wait on the timeline; past it `send-key` is
/// refused (QEMU drops them silently past its 1,024).
const MAX_TIMELINE_EVENTS: usize = 8192;

/// Image formats of `screendump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Binary PPM (P6), QEMU's default.
    Ppm,
    /// PNG.
    Png,
}

impl ImageFormat {
    /// `ppm` or `png`.
    pub fn parse(s: &str) -> Option<ImageFormat> {
        match s {
            "ppm" => Some(ImageFormat::Ppm),
            "png" => Some(ImageFormat::Png),
            _ => None,
        }
    }
}

/// Takes what the GPU's scanout shows (`None` before the guest set one).
pub type ScreenSource = Box<dyn Fn() -> Option<Screenshot> + Send + Sync>;

/// One key event and the time to wait after it.
struct Timed {
    events: [InputEvent; 2],
    hold: Duration,
}

/// The keyboard's thread: where key events go, and how many wait.
struct Timeline {
    tx: mpsc::Sender<Timed>,
    waiting: Arc<AtomicUsize>,
}

/// What the monitors reach of the VM's display and input devices.
#[derive(Default)]
pub struct Display {
    screen: Option<(ScreenSource, (u32, u32))>,
    keyboard: Option<InputSender>,
    tablet: Option<InputSender>,
    timeline: Mutex<Option<Timeline>>,
}

impl Display {
    /// A display showing `screen`, whose mode is `mode` (the size of a
    /// screenshot taken before the guest draws).
    pub fn with_screen(mut self, screen: ScreenSource, mode: (u32, u32)) -> Self {
        self.screen = Some((screen, mode));
        self
    }

    /// Adds an input device.
    pub fn with_input(mut self, input: InputSender) -> Self {
        match input.kind() {
            InputKind::Keyboard => self.keyboard = Some(input),
            InputKind::Tablet => self.tablet = Some(input),
        }
        self
    }

    /// Writes the screen to `path` in `format`, complete before returning.
    /// Before the guest sets up its display, the picture is black, of the
    /// display's mode.
    pub fn screendump(&self, path: &Path, format: ImageFormat) -> Result<(), String> {
        let (source, (width, height)) = self.screen.as_ref().ok_or(NO_CONSOLE)?;
        let shot = source().unwrap_or_else(|| Screenshot {
            width: *width,
            height: *height,
            rgb: vec![0; *width as usize * *height as usize * 3],
        });
        let bytes = encode(&shot, format)?;
        let mut f = std::fs::File::create(path)
            .map_err(|e| format!("failed to open file '{}': {e}", path.display()))?;
        f.write_all(&bytes)
            .and_then(|()| f.flush())
            .map_err(|e| format!("failed to write file '{}': {e}", path.display()))
    }

    /// Presses `keys` (Linux codes) in order, then releases them in
    /// reverse, `hold_ms` after each event, behind the keys already sent.
    pub fn send_keys(&self, keys: &[u16], hold_ms: Option<u64>) -> Result<(), String> {
        let keyboard = self
            .keyboard
            .as_ref()
            .ok_or("this VM has no keyboard (skiff-vmm --input keyboard)")?;
        let hold = Duration::from_millis(hold_ms.unwrap_or(DEFAULT_HOLD_MS).min(MAX_HOLD_MS));
        let key = |code: u16, down: bool| Timed {
            events: [
                InputEvent::new(EV_KEY, code, u32::from(down)),
                InputEvent::syn(),
            ],
            hold,
        };
        let mut timeline = crate::sync::lock(&self.timeline);
        let t = timeline.get_or_insert_with(|| start_timeline(keyboard.clone()));
        let n = keys.len() * 2;
        if t.waiting.load(Ordering::SeqCst) + n > MAX_TIMELINE_EVENTS {
            return Err(format!(
                "{MAX_TIMELINE_EVENTS} key events are waiting already: the guest is not taking them"
            ));
        }
        let timed = keys
            .iter()
            .map(|&k| key(k, true))
            .chain(keys.iter().rev().map(|&k| key(k, false)));
        for event in timed {
            t.waiting.fetch_add(1, Ordering::SeqCst);
            if t.tx.send(event).is_err() {
                t.waiting.fetch_sub(1, Ordering::SeqCst);
                return Err("the keyboard's thread has stopped".to_owned());
            }
        }
        Ok(())
    }

    /// Sends `events` (from `input-send-event`) to the device each goes
    /// to: keys to the keyboard, buttons and absolute moves to the tablet;
    /// each device's events end with one SYN_REPORT.
    pub fn send_events(&self, events: &[PointerOrKey]) -> Result<(), String> {
        let mut to_keyboard = Vec::new();
        let mut to_tablet = Vec::new();
        for e in events {
            match *e {
                PointerOrKey::Key { code, down } => {
                    to_keyboard.push(InputEvent::new(EV_KEY, code, u32::from(down)))
                }
                PointerOrKey::Button { code, down } => {
                    to_tablet.push(InputEvent::new(EV_KEY, code, u32::from(down)))
                }
                PointerOrKey::Wheel(delta) => {
                    to_tablet.push(InputEvent::new(EV_REL, REL_WHEEL, delta as u32))
                }
                PointerOrKey::Abs { axis, value } => {
                    to_tablet.push(InputEvent::new(EV_ABS, axis, value))
                }
            }
        }
        for (device, mut batch, what) in [
            (
                &self.keyboard,
                to_keyboard,
                "keyboard (skiff-vmm --input keyboard)",
            ),
            (&self.tablet, to_tablet, "tablet (skiff-vmm --input tablet)"),
        ] {
            if batch.is_empty() {
                continue;
            }
            let device = device
                .as_ref()
                .ok_or_else(|| format!("this VM has no {what}"))?;
            batch.push(InputEvent::syn());
            device.send(&batch).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// `query-mice`: the tablet, if there is one.
    pub fn mice(&self) -> Vec<(&'static str, bool)> {
        self.tablet
            .iter()
            .map(|t| (t.kind().name(), true))
            .collect()
    }
}

/// Starts the thread that plays key events with their hold times; it ends
/// when the display goes (the sender is dropped).
fn start_timeline(keyboard: InputSender) -> Timeline {
    let (tx, rx) = mpsc::channel::<Timed>();
    let waiting = Arc::new(AtomicUsize::new(0));
    let w = waiting.clone();
    let spawned = std::thread::Builder::new()
        .name("keyboard".into())
        .spawn(move || {
            crate::seccomp::enter_or_end(crate::seccomp::ThreadKind::Keyboard);
            for t in rx {
                if let Err(e) = keyboard.send(&t.events) {
                    log::warn!("keyboard: a key event was not sent: {e}");
                }
                w.fetch_sub(1, Ordering::SeqCst);
                std::thread::sleep(t.hold);
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the keyboard's thread: {e}");
    }
    Timeline { tx, waiting }
}

/// One `input-send-event` event, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointerOrKey {
    /// A keyboard key.
    Key {
        /// Linux key code.
        code: u16,
        /// Pressed.
        down: bool,
    },
    /// A tablet button.
    Button {
        /// Linux button code.
        code: u16,
        /// Pressed.
        down: bool,
    },
    /// The wheel turned by this many notches (up positive).
    Wheel(i32),
    /// An absolute move on one axis.
    Abs {
        /// ABS_X or ABS_Y.
        axis: u16,
        /// 0..=ABS_MAX.
        value: u32,
    },
}

/// A key given by QEMU name (`ret`) or number (`0x1c`, QEMU's qnum).
pub fn key_by_name_or_number(s: &str) -> Option<u16> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u16::from_str_radix(hex, 16)
            .ok()
            .and_then(keys::by_number)
            .map(|k| k.linux);
    }
    keys::by_name(s).map(|k| k.linux)
}

/// The keys of an HMP `sendkey` spec: `ctrl-alt-delete`, `shift-0x0c`,
/// `<` (QEMU's `less`); the first part that is no key is returned as the
/// error.
pub fn parse_key_combo(spec: &str) -> Result<Vec<u16>, String> {
    if spec == "<" {
        return Ok(vec![keys::by_name("less").map_or(86, |k| k.linux)]);
    }
    spec.split('-')
        .map(|part| {
            let part = if part == "<" { "less" } else { part };
            key_by_name_or_number(part).ok_or_else(|| part.to_owned())
        })
        .collect()
}

/// A tablet button by QEMU's `InputButton` name; the wheel's are
/// [`PointerOrKey::Wheel`] (on press only, as QEMU's virtio tablet does).
pub fn button(name: &str, down: bool) -> Option<PointerOrKey> {
    let code = match name {
        "left" => BTN_LEFT,
        "right" => BTN_RIGHT,
        "middle" => BTN_MIDDLE,
        "side" => BTN_SIDE,
        "extra" => BTN_EXTRA,
        "wheel-up" => return Some(PointerOrKey::Wheel(if down { 1 } else { 0 })),
        "wheel-down" => return Some(PointerOrKey::Wheel(if down { -1 } else { 0 })),
        _ => return None,
    };
    Some(PointerOrKey::Button { code, down })
}

/// An absolute axis by QEMU's `InputAxis` name, with its value checked.
pub fn abs(axis: &str, value: i64) -> Result<PointerOrKey, String> {
    let axis = match axis {
        "x" => ABS_X,
        "y" => ABS_Y,
        other => return Err(format!("the tablet has no axis '{other}'")),
    };
    match u32::try_from(value) {
        Ok(v) if v <= ABS_MAX => Ok(PointerOrKey::Abs { axis, value: v }),
        _ => Err(format!(
            "absolute value {value} is outside 0..{ABS_MAX} (QEMU's input range)"
        )),
    }
}

/// The screenshot as a PPM (`P6`, QEMU's `ppm_save`) or PNG file.
pub fn encode(shot: &Screenshot, format: ImageFormat) -> Result<Vec<u8>, String> {
    match format {
        ImageFormat::Ppm => {
            let mut out = format!("P6\n{} {}\n255\n", shot.width, shot.height).into_bytes();
            out.extend_from_slice(&shot.rgb);
            Ok(out)
        }
        ImageFormat::Png => {
            let mut out = Vec::new();
            let mut enc = png::Encoder::new(&mut out, shot.width, shot.height);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_compression(png::Compression::Fast);
            let mut w = enc
                .write_header()
                .map_err(|e| format!("cannot encode PNG: {e}"))?;
            w.write_image_data(&shot.rgb)
                .map_err(|e| format!("cannot encode PNG: {e}"))?;
            w.finish().map_err(|e| format!("cannot encode PNG: {e}"))?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn shot() -> Screenshot {
        Screenshot {
            width: 2,
            height: 1,
            rgb: vec![255, 0, 0, 0, 0, 255],
        }
    }

    #[test]
    fn ppm_is_qemus_and_png_decodes_to_the_same_pixels() {
        let ppm = encode(&shot(), ImageFormat::Ppm).unwrap();
        assert_eq!(ppm, b"P6\n2 1\n255\n\xff\x00\x00\x00\x00\xff");
        let png = encode(&shot(), ImageFormat::Png).unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(png))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (2, 1));
        assert_eq!(&buf[..info.buffer_size()], &shot().rgb[..]);
    }

    #[test]
    fn key_specs_as_hmp_takes_them() {
        assert_eq!(parse_key_combo("ctrl-alt-delete"), Ok(vec![29, 56, 111]));
        assert_eq!(parse_key_combo("shift-0x0C"), Ok(vec![42, 12]));
        assert_eq!(parse_key_combo("shift-0x0c"), Ok(vec![42, 12]));
        assert_eq!(parse_key_combo("<"), Ok(vec![86]));
        assert_eq!(parse_key_combo("shift-<"), Ok(vec![42, 86]));
        assert_eq!(parse_key_combo("ret"), Ok(vec![28]));
        assert_eq!(parse_key_combo("nokey"), Err("nokey".into()));
        assert_eq!(parse_key_combo("ctrl-0xzz"), Err("0xzz".into()));
        assert_eq!(parse_key_combo("Ret"), Err("Ret".into()));
        assert_eq!(parse_key_combo("ctrl--"), Err("".into()));
    }

    #[test]
    fn no_devices_no_screen() {
        let d = Display::default();
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let e = d
            .screendump(&dir.as_path().join("x.ppm"), ImageFormat::Ppm)
            .unwrap_err();
        assert_eq!(e, NO_CONSOLE);
        assert!(d
            .send_keys(&[28], None)
            .unwrap_err()
            .contains("no keyboard"));
        let e = d.send_events(&[abs("x", 5).unwrap()]).unwrap_err();
        assert!(e.contains("no tablet"), "{e}");
        assert!(d.mice().is_empty());
        assert!(abs("x", 0x8000).unwrap_err().contains("outside"));
        assert!(abs("z", 1).is_err());
        assert_eq!(button("nope", true), None);
    }

    #[test]
    fn screendump_before_the_guest_draws_is_black_of_the_mode() {
        let d = Display::default().with_screen(Box::new(|| None), (4, 3));
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let p = dir.as_path().join("s.ppm");
        d.screendump(&p, ImageFormat::Ppm).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(&data[..11], b"P6\n4 3\n255\n");
        assert_eq!(data.len(), 11 + 36);
        let e = d
            .screendump(Path::new("/nonexistent/dir/s.ppm"), ImageFormat::Png)
            .unwrap_err();
        assert!(e.contains("/nonexistent/dir/s.ppm"), "{e}");
    }

    #[test]
    fn keys_are_pressed_in_order_and_released_in_reverse() {
        use skiff_devices::virtio::input::Input;
        let kbd = Input::new(InputKind::Keyboard, EventFd::new(0).unwrap()).unwrap();
        let tablet = Input::new(InputKind::Tablet, EventFd::new(0).unwrap()).unwrap();
        let d = Display::default()
            .with_input(kbd.sender())
            .with_input(tablet.sender());
        d.send_keys(&[29, 56, 111], Some(0)).unwrap();
        d.send_keys(&[28], Some(0)).unwrap();
        // 4 keys, a press and a release each, with a SYN after every event.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while kbd.sender().pending() < 16 {
            assert!(std::time::Instant::now() < deadline, "the timeline stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(d.mice(), [("QEMU Virtio Tablet", true)]);
        d.send_events(&[
            abs("x", 100).unwrap(),
            button("left", true).unwrap(),
            PointerOrKey::Key {
                code: 30,
                down: true,
            },
        ])
        .unwrap();
        assert_eq!(tablet.sender().pending(), 3);
        assert_eq!(kbd.sender().pending(), 18);
    }
}
