//! Feeds arbitrary bytes to the QMP input framing and request dispatcher,
//! split into reads at input-chosen points, against a machine that does
//! nothing: no input may panic, and every reply must be one line of ASCII
//! JSON (an object with `return` or `error`). The same bytes also go to the
//! HMP command executor as lines.
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use skiff_vmm::control::qmp::Session;
use skiff_vmm::control::stream::JsonStream;
use skiff_vmm::control::display::Display;
use skiff_vmm::control::{hmp, Controls, MachineInfo, Migration, RunState};

struct Idle {
    state: Mutex<RunState>,
    info: MachineInfo,
    /// No screen and no input devices: key and event arguments are
    /// parsed and checked, then refused, and no file is written.
    display: Display,
}

impl Controls for Idle {
    fn run_state(&self) -> RunState {
        *self.state.lock().unwrap()
    }
    fn stop(&self) {
        let mut s = self.state.lock().unwrap();
        if *s == RunState::Running {
            *s = RunState::Paused;
        }
    }
    fn cont(&self) -> Result<(), String> {
        let mut s = self.state.lock().unwrap();
        match *s {
            RunState::Shutdown => Err("Resetting the Virtual Machine is required".into()),
            _ => {
                *s = RunState::Running;
                Ok(())
            }
        }
    }
    fn system_reset(&self) {
        *self.state.lock().unwrap() = RunState::Shutdown;
    }
    fn system_powerdown(&self) {}
    fn quit(&self) {
        *self.state.lock().unwrap() = RunState::Shutdown;
    }
    fn info(&self) -> &MachineInfo {
        &self.info
    }
    fn vcpu_thread_ids(&self) -> Vec<i64> {
        vec![1; usize::from(self.info.cpus)]
    }
    fn set_link(&self, name: &str, _up: bool) -> Result<(), String> {
        match name {
            "net0" | "virtio-net-pci.1" => Ok(()),
            _ => Err(format!("Device '{name}' not found")),
        }
    }
    fn migrate(&self, uri: &str) -> Result<(), String> {
        // Parsed, never written.
        match uri.strip_prefix("file:") {
            Some(dir) if !dir.is_empty() => {
                *self.state.lock().unwrap() = RunState::Postmigrate;
                Ok(())
            }
            _ => Err(format!("'{uri}': file:DIR only")),
        }
    }
    fn migration(&self) -> Migration {
        Migration::None
    }
    fn display(&self) -> &Display {
        &self.display
    }
}

fn check_reply(line: &str) {
    assert!(line.is_ascii() && !line.contains('\n'), "{line:?}");
    let v: serde_json::Value = serde_json::from_str(line).expect("reply is JSON");
    let obj = v.as_object().expect("reply is an object");
    assert!(obj.contains_key("return") != obj.contains_key("error"), "{line}");
}

fuzz_target!(|data: &[u8]| {
    let machine = Idle {
        state: Mutex::new(RunState::Running),
        info: MachineInfo {
            name: "fuzz".into(),
            cpus: 2,
            ..MachineInfo::default()
        },
        display: Display::default(),
    };
    // The first byte picks the read size, so messages split anywhere.
    let (chunk, input) = match data.split_first() {
        Some((c, rest)) => (usize::from(*c).max(1), rest),
        None => return,
    };
    let mut stream = JsonStream::new();
    let mut session = Session::new();
    for piece in input.chunks(chunk) {
        stream.feed(piece);
        while let Some(msg) = stream.next_input() {
            check_reply(&session.handle(msg, &machine).reply);
        }
    }
    for line in String::from_utf8_lossy(input).split(['\n', '\r']) {
        let out = hmp::execute(line, &machine);
        assert!(out.is_empty() || out.ends_with("\r\n"), "{out:?}");
    }
});
