//! The VM's control plane: the run state machine (running, paused,
//! shutdown), QMP events, and the QMP and HMP monitors that drive them.
//!
//! The protocol code ([`qmp`], [`hmp`], [`stream`]) is pure: it acts on a
//! [`Controls`] and never touches KVM, so unit tests drive it with a fake.
//! [`RunControl`] is the real [`Controls`]: it parks and resumes vCPUs
//! through a [`VcpuPause`], presses the ACPI power button, and hands exit
//! requests to the main thread. [`server`] runs the sockets on a small
//! tokio runtime of its own.

pub mod display;
pub mod hmp;
pub mod json;
pub mod qemu;
pub mod qmp;
pub mod server;
pub mod stream;

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::cpu::dump::CpuDump;
use crate::cpu::pause::VcpuPause;
use crate::exit::ExitReason;

/// QMP `RunState` values Skiff can be in (`qapi/run-state.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// All vCPUs runnable.
    Running,
    /// Stopped by `stop`, or started with `-S`.
    Paused,
    /// Stopped after a completed `migrate` (QEMU's `postmigrate`); `cont`
    /// runs it again.
    Postmigrate,
    /// The VM is going away (guest power-off, `quit`, a host signal ...).
    Shutdown,
    /// The guest kernel panicked.
    GuestPanicked,
}

impl RunState {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Postmigrate => "postmigrate",
            RunState::Shutdown => "shutdown",
            RunState::GuestPanicked => "guest-panicked",
        }
    }

    /// `running` in query-status: true only when every vCPU may run.
    pub fn is_running(self) -> bool {
        self == RunState::Running
    }
}

/// QMP `ShutdownCause` values (`qapi/run-state.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownCause {
    /// A fatal VMM error.
    HostError,
    /// QMP or HMP `quit`.
    HostQmpQuit,
    /// QMP or HMP `system_reset`.
    HostQmpSystemReset,
    /// SIGTERM or SIGINT.
    HostSignal,
    /// The guest powered off (ACPI S5).
    GuestShutdown,
    /// The guest reset the machine (which ends skiff-vmm, as QEMU's
    /// `-no-reboot` does).
    GuestReset,
    /// The guest kernel panicked.
    GuestPanic,
}

impl ShutdownCause {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownCause::HostError => "host-error",
            ShutdownCause::HostQmpQuit => "host-qmp-quit",
            ShutdownCause::HostQmpSystemReset => "host-qmp-system-reset",
            ShutdownCause::HostSignal => "host-signal",
            ShutdownCause::GuestShutdown => "guest-shutdown",
            ShutdownCause::GuestReset => "guest-reset",
            ShutdownCause::GuestPanic => "guest-panic",
        }
    }

    /// Whether the guest caused it (the `guest` member of SHUTDOWN).
    pub fn by_guest(self) -> bool {
        matches!(
            self,
            ShutdownCause::GuestShutdown | ShutdownCause::GuestReset | ShutdownCause::GuestPanic
        )
    }
}

/// A QMP event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// vCPUs stopped.
    Stop,
    /// vCPUs resumed.
    Resume,
    /// The power button was pressed.
    Powerdown,
    /// The machine was reset and goes on (not emitted today: skiff-vmm
    /// always exits on a reset, as QEMU does under `-no-reboot`, which
    /// reports SHUTDOWN instead).
    Reset(ShutdownCause),
    /// The VM is about to exit.
    Shutdown(ShutdownCause),
    /// The guest kernel panicked; the VM powers off.
    GuestPanicked,
    /// A migration (snapshot) changed status: `setup`, `active`,
    /// `completed` or `failed`.
    Migration(&'static str),
}

#[derive(Serialize)]
struct Timestamp {
    seconds: i64,
    microseconds: i64,
}

#[derive(Serialize)]
struct EventMessage<'a> {
    timestamp: Timestamp,
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
}

impl Event {
    /// The event's QMP name.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Stop => "STOP",
            Event::Resume => "RESUME",
            Event::Powerdown => "POWERDOWN",
            Event::Reset(_) => "RESET",
            Event::Shutdown(_) => "SHUTDOWN",
            Event::GuestPanicked => "GUEST_PANICKED",
            Event::Migration(_) => "MIGRATION",
        }
    }

    fn data(&self) -> Option<Value> {
        match self {
            Event::Stop | Event::Resume | Event::Powerdown => None,
            Event::Reset(cause) | Event::Shutdown(cause) => Some(json!({
                "guest": cause.by_guest(),
                "reason": cause.as_str(),
            })),
            Event::GuestPanicked => Some(json!({"action": "poweroff"})),
            Event::Migration(status) => Some(json!({ "status": status })),
        }
    }

    /// The event as QEMU sends it, stamped with `now`, without the line end.
    pub fn to_line(&self, now: SystemTime) -> String {
        let timestamp = match now.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                microseconds: i64::from(d.subsec_micros()),
            },
            Err(_) => Timestamp {
                seconds: -1,
                microseconds: -1,
            },
        };
        json::to_line(&EventMessage {
            timestamp,
            event: self.name(),
            data: self.data(),
        })
    }
}

/// How many events a slow client may fall behind before it loses the
/// oldest ones.
const EVENT_BACKLOG: usize = 256;

/// Fans events out to every negotiated QMP client. Sending never blocks:
/// a client that does not read loses its oldest events, nothing else.
#[derive(Clone)]
pub struct EventHub {
    tx: broadcast::Sender<Arc<str>>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new()
    }
}

impl EventHub {
    /// A hub with no listeners.
    pub fn new() -> Self {
        EventHub {
            tx: broadcast::channel(EVENT_BACKLOG).0,
        }
    }

    /// Sends `event` (stamped now) to every current subscriber.
    pub fn emit(&self, event: &Event) {
        log::debug!("QMP event {}", event.name());
        let _ = self.tx.send(event.to_line(SystemTime::now()).into());
    }

    /// A receiver of every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.tx.subscribe()
    }
}

/// A `--disk`, as query-block describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Guest name: vda, vdb, ...
    pub device: String,
    /// The image file.
    pub path: String,
    /// Opened read-only.
    pub readonly: bool,
    /// Writes go to a temporary overlay.
    pub overlay: bool,
    /// Image size in bytes.
    pub size: u64,
}

/// A character device, as query-chardev describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevInfo {
    /// QEMU-style label (`serial0`, `compat_monitor0`, ...).
    pub label: String,
    /// QEMU-style filename (`stdio`, `unix:/path,server=on`, ...).
    pub filename: String,
}

/// Static facts about the VM that queries report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineInfo {
    /// `--name`.
    pub name: String,
    /// Number of vCPUs.
    pub cpus: u8,
    /// The disks.
    pub disks: Vec<DiskInfo>,
    /// The character devices.
    pub chardevs: Vec<ChardevInfo>,
}

/// What the monitors act on. Every method returns once its effect is
/// done, and emits the events it causes before returning, so that a
/// monitor sends them ahead of the command's reply, as QEMU does.
pub trait Controls: Send + Sync {
    /// The current run state.
    fn run_state(&self) -> RunState;
    /// Parks every vCPU (STOP when the VM was running).
    fn stop(&self);
    /// Resumes the vCPUs (RESUME when the VM was paused); fails with a
    /// QEMU error text when the VM cannot run again.
    fn cont(&self) -> Result<(), String>;
    /// A hard reset: skiff-vmm exits with status 3 (SHUTDOWN
    /// host-qmp-system-reset, as QEMU under `-no-reboot`).
    fn system_reset(&self);
    /// Presses the ACPI power button (POWERDOWN).
    fn system_powerdown(&self);
    /// Ends the VM (SHUTDOWN host-qmp-quit); the process exits with 0
    /// once the monitors have flushed.
    fn quit(&self);
    /// Static facts.
    fn info(&self) -> &MachineInfo;
    /// Host thread id of each vCPU (0 until its thread started).
    fn vcpu_thread_ids(&self) -> Vec<i64>;
    /// Plugs (`up`) or unplugs the network card called `name` (its id, or
    /// QEMU's `virtio-net-pci.N` for the N-th card from 1); fails with
    /// QEMU's text when no card has that name.
    fn set_link(&self, name: &str, up: bool) -> Result<(), String>;
    /// Saves the whole VM to `uri` (`file:DIR`, QEMU 8.2's file
    /// migration): pauses the vCPUs, writes the snapshot and leaves the VM
    /// stopped in `postmigrate`, with MIGRATION events; a failed save
    /// resumes a VM that was running. Fails with a message naming the
    /// problem.
    fn migrate(&self, uri: &str) -> Result<(), String>;
    /// The last migration, for `query-migrate`.
    fn migration(&self) -> Migration;
    /// The screen, keyboard and pointer (what the VM has of them).
    fn display(&self) -> &display::Display;
    /// Every vCPU's registers and local APIC (`info registers`, `info
    /// lapic`), read with the vCPUs parked for the moment it takes; a
    /// running VM goes on running, with no STOP or RESUME. Fails, saying
    /// why, once the VM is ending.
    fn cpu_dumps(&self) -> Result<Vec<CpuDump>, String>;
}

/// A migration's outcome, as `query-migrate` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Migration {
    /// None was asked for.
    #[default]
    None,
    /// Written, in `total_ms`.
    Completed { total_ms: u64 },
    /// Failed, saying why.
    Failed { error: String },
}

/// Writes a snapshot of the paused VM into a directory; returns a line
/// for the log (what was written) or why it failed.
pub type Snapshotter = Box<dyn Fn(&std::path::Path) -> Result<String, String> + Send + Sync>;

/// A network card the monitors can plug and unplug.
pub struct NetLink {
    /// The names `set_link` knows it by.
    pub names: Vec<String>,
    /// Sets its link state.
    pub set: Box<dyn Fn(bool) + Send + Sync>,
}

/// The names `set_link` accepts for card `index` (from 0) with id `id`:
/// the id, and `virtio-net-pci.N` (N from 1), the name the NixOS test
/// driver uses for a node's N-th VLAN card.
pub fn link_names(index: usize, id: &str) -> Vec<String> {
    vec![id.to_owned(), format!("virtio-net-pci.{}", index + 1)]
}

/// The run state machine behind the monitors.
pub struct RunControl {
    state: Mutex<RunState>,
    vcpus: Arc<dyn VcpuPause>,
    power_button: Box<dyn Fn() + Send + Sync>,
    exit: Box<dyn Fn(ExitReason) + Send + Sync>,
    events: EventHub,
    info: MachineInfo,
    links: Vec<NetLink>,
    snapshotter: Option<Snapshotter>,
    migration: Mutex<Migration>,
    display: display::Display,
}

impl RunControl {
    /// A running VM. `power_button` presses the ACPI power button; `exit`
    /// asks the main thread to end the VM.
    pub fn new(
        info: MachineInfo,
        vcpus: Arc<dyn VcpuPause>,
        events: EventHub,
        power_button: Box<dyn Fn() + Send + Sync>,
        exit: Box<dyn Fn(ExitReason) + Send + Sync>,
    ) -> Self {
        RunControl {
            state: Mutex::new(RunState::Running),
            vcpus,
            power_button,
            exit,
            events,
            info,
            links: Vec::new(),
            snapshotter: None,
            migration: Mutex::new(Migration::None),
            display: display::Display::default(),
        }
    }

    /// The screen and input devices the monitors drive.
    pub fn with_display(mut self, display: display::Display) -> Self {
        self.display = display;
        self
    }

    /// What `migrate` calls to write a snapshot.
    pub fn with_snapshotter(mut self, snapshotter: Snapshotter) -> Self {
        self.snapshotter = Some(snapshotter);
        self
    }

    /// A VM whose vCPUs start parked (`-S`): the state is `paused` and
    /// `cont` resumes them.
    pub fn starting_paused(self) -> Self {
        *crate::sync::lock(&self.state) = RunState::Paused;
        self
    }

    /// The network cards `set_link` acts on.
    pub fn with_links(mut self, links: Vec<NetLink>) -> Self {
        self.links = links;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        crate::sync::lock(&self.state)
    }

    /// Records that the VM is ending for `reason` and emits the events
    /// QEMU would (nothing when a monitor command already did).
    pub fn exiting(&self, reason: &ExitReason) {
        let mut state = self.lock();
        if *state == RunState::Shutdown {
            return;
        }
        let cause = match reason {
            ExitReason::PowerOff => ShutdownCause::GuestShutdown,
            ExitReason::Reset => ShutdownCause::GuestReset,
            ExitReason::Panic => {
                self.events.emit(&Event::GuestPanicked);
                if *state == RunState::Running {
                    self.events.emit(&Event::Stop);
                }
                ShutdownCause::GuestPanic
            }
            ExitReason::Crash(_) => ShutdownCause::HostError,
            ExitReason::Signal(_) => ShutdownCause::HostSignal,
            ExitReason::Quit => ShutdownCause::HostQmpQuit,
            ExitReason::HostReset => ShutdownCause::HostQmpSystemReset,
        };
        *state = RunState::Shutdown;
        self.events.emit(&Event::Shutdown(cause));
    }

    fn shut_down(&self, cause: ShutdownCause, reason: ExitReason) {
        let mut state = self.lock();
        if *state == RunState::Shutdown {
            return;
        }
        *state = RunState::Shutdown;
        self.events.emit(&Event::Shutdown(cause));
        drop(state);
        (self.exit)(reason);
    }
}

impl Controls for RunControl {
    fn run_state(&self) -> RunState {
        *self.lock()
    }

    fn stop(&self) {
        let mut state = self.lock();
        if *state == RunState::Running {
            self.vcpus.pause();
            *state = RunState::Paused;
            self.events.emit(&Event::Stop);
        }
    }

    fn cont(&self) -> Result<(), String> {
        let mut state = self.lock();
        match *state {
            RunState::Running => Ok(()),
            RunState::Paused | RunState::Postmigrate => {
                self.vcpus.resume();
                *state = RunState::Running;
                self.events.emit(&Event::Resume);
                Ok(())
            }
            RunState::Shutdown | RunState::GuestPanicked => {
                Err("Resetting the Virtual Machine is required".to_owned())
            }
        }
    }

    fn system_reset(&self) {
        self.shut_down(ShutdownCause::HostQmpSystemReset, ExitReason::HostReset);
    }

    fn system_powerdown(&self) {
        (self.power_button)();
        self.events.emit(&Event::Powerdown);
    }

    fn quit(&self) {
        self.shut_down(ShutdownCause::HostQmpQuit, ExitReason::Quit);
    }

    fn info(&self) -> &MachineInfo {
        &self.info
    }

    fn vcpu_thread_ids(&self) -> Vec<i64> {
        self.vcpus.thread_ids()
    }

    fn set_link(&self, name: &str, up: bool) -> Result<(), String> {
        let link = self
            .links
            .iter()
            .find(|l| l.names.iter().any(|n| n == name))
            .ok_or_else(|| format!("Device '{name}' not found"))?;
        (link.set)(up);
        Ok(())
    }

    fn migrate(&self, uri: &str) -> Result<(), String> {
        let dir = match uri.split_once(':') {
            Some(("file", "")) => return Err("file: needs a directory after it".into()),
            Some(("file", dir)) => std::path::PathBuf::from(dir),
            _ => {
                return Err(format!(
                    "'{uri}': skiff-vmm migrates to file:DIR only (a snapshot directory)"
                ))
            }
        };
        let Some(snapshotter) = &self.snapshotter else {
            return Err("this VM cannot be saved".into());
        };
        let mut state = self.lock();
        let was = *state;
        if matches!(was, RunState::Shutdown | RunState::GuestPanicked) {
            return Err(format!(
                "the VM is in state {}: nothing to save",
                was.as_str()
            ));
        }
        let started = std::time::Instant::now();
        self.events.emit(&Event::Migration("setup"));
        if was == RunState::Running {
            self.vcpus.pause();
            self.events.emit(&Event::Stop);
        }
        self.events.emit(&Event::Migration("active"));
        match snapshotter(&dir) {
            Ok(what) => {
                let total_ms = started.elapsed().as_millis() as u64;
                log::info!(
                    "migrate: saved to {} in {total_ms} ms: {what}",
                    dir.display()
                );
                *state = RunState::Postmigrate;
                *crate::sync::lock(&self.migration) = Migration::Completed { total_ms };
                self.events.emit(&Event::Migration("completed"));
                Ok(())
            }
            Err(error) => {
                log::warn!("migrate to {} failed: {error}", dir.display());
                *crate::sync::lock(&self.migration) = Migration::Failed {
                    error: error.clone(),
                };
                self.events.emit(&Event::Migration("failed"));
                if was == RunState::Running {
                    self.vcpus.resume();
                    self.events.emit(&Event::Resume);
                }
                Err(error)
            }
        }
    }

    fn migration(&self) -> Migration {
        crate::sync::lock(&self.migration).clone()
    }

    fn display(&self) -> &display::Display {
        &self.display
    }

    fn cpu_dumps(&self) -> Result<Vec<CpuDump>, String> {
        let state = self.lock();
        match *state {
            RunState::Running => {
                self.vcpus.park();
                let dumps = self.vcpus.dump();
                self.vcpus.resume();
                dumps
            }
            RunState::Shutdown => Err("the VM has shut down".to_owned()),
            _ => self.vcpus.dump(),
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A fake machine for protocol tests.

    use super::*;
    use skiff_devices::virtio::gpu::Screenshot;
    use skiff_devices::virtio::input::{Input, InputKind, InputSender};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts pauses, parks and resumes.
    #[derive(Default)]
    pub struct FakeVcpus {
        pub pauses: AtomicUsize,
        pub parks: AtomicUsize,
        pub resumes: AtomicUsize,
    }

    impl VcpuPause for FakeVcpus {
        fn pause(&self) {
            self.pauses.fetch_add(1, Ordering::SeqCst);
        }
        fn resume(&self) {
            self.resumes.fetch_add(1, Ordering::SeqCst);
        }
        fn thread_ids(&self) -> Vec<i64> {
            vec![1001, 1002]
        }
        fn park(&self) {
            self.parks.fetch_add(1, Ordering::SeqCst);
        }
        /// Two vCPUs: RIP 0x1000 + index, TSC deadline 1 ms ahead of the
        /// TSC at 1 GHz.
        fn dump(&self) -> Result<Vec<CpuDump>, String> {
            Ok((0..2)
                .map(|index| CpuDump {
                    index,
                    mp_state: 0,
                    regs: kvm_bindings::kvm_regs {
                        rip: 0x1000 + index as u64,
                        rflags: 0x202,
                        ..Default::default()
                    },
                    sregs: Default::default(),
                    lapic: Default::default(),
                    tsc: Some(5_000_000),
                    tsc_deadline: Some(6_000_000),
                    tsc_khz: Some(1_000_000),
                })
                .collect())
        }
    }

    /// A [`RunControl`] over fake vCPUs, with what it did recorded.
    pub struct Fake {
        pub control: RunControl,
        pub vcpus: Arc<FakeVcpus>,
        pub presses: Arc<AtomicUsize>,
        pub exits: Arc<Mutex<Vec<ExitReason>>>,
        pub events: EventHub,
        /// The link states set on the one card, `net0`, in order.
        pub links: Arc<Mutex<Vec<bool>>>,
    }

    pub fn info() -> MachineInfo {
        MachineInfo {
            name: "node1".into(),
            cpus: 2,
            disks: vec![DiskInfo {
                device: "vda".into(),
                path: "/img/root.raw".into(),
                readonly: true,
                overlay: false,
                size: 1 << 20,
            }],
            chardevs: vec![ChardevInfo {
                label: "serial0".into(),
                filename: "stdio".into(),
            }],
        }
    }

    pub fn fake() -> Fake {
        fake_with(display::Display::default())
    }

    /// A fake with a 2x1 screen (red, blue), a keyboard and a tablet;
    /// their senders show what the monitors sent.
    pub fn fake_with_display() -> (Fake, InputSender, InputSender) {
        let input = |kind| {
            Input::new(kind, vmm_sys_util::eventfd::EventFd::new(0).unwrap())
                .unwrap()
                .sender()
        };
        let (keyboard, tablet) = (input(InputKind::Keyboard), input(InputKind::Tablet));
        let screen = Screenshot {
            width: 2,
            height: 1,
            rgb: vec![255, 0, 0, 0, 0, 255],
        };
        let display = display::Display::default()
            .with_screen(Box::new(move || Some(screen.clone())), (2, 1))
            .with_input(keyboard.clone())
            .with_input(tablet.clone());
        (fake_with(display), keyboard, tablet)
    }

    pub fn fake_with(display: display::Display) -> Fake {
        let vcpus = Arc::new(FakeVcpus::default());
        let presses = Arc::new(AtomicUsize::new(0));
        let exits = Arc::new(Mutex::new(Vec::new()));
        let events = EventHub::new();
        let p = presses.clone();
        let e = exits.clone();
        let control = RunControl::new(
            info(),
            vcpus.clone(),
            events.clone(),
            Box::new(move || {
                p.fetch_add(1, Ordering::SeqCst);
            }),
            Box::new(move |r| e.lock().unwrap().push(r)),
        );
        let links = Arc::new(Mutex::new(Vec::new()));
        let l = links.clone();
        let control = control
            .with_display(display)
            .with_links(vec![NetLink {
                names: link_names(0, "net0"),
                set: Box::new(move |up| l.lock().unwrap().push(up)),
            }])
            // Saves nothing; a directory named "fail" fails.
            .with_snapshotter(Box::new(|dir| {
                if dir.ends_with("fail") {
                    Err("cannot create fail: refused".into())
                } else {
                    Ok("nothing".into())
                }
            }));
        Fake {
            control,
            vcpus,
            presses,
            exits,
            events,
            links,
        }
    }

    /// Event names received so far.
    pub fn names(rx: &mut broadcast::Receiver<Arc<str>>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(line) = rx.try_recv() {
            let v: Value = serde_json::from_str(&line).unwrap();
            out.push(v["event"].as_str().unwrap().to_owned());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn event_lines_look_like_qemu() {
        let t = UNIX_EPOCH + std::time::Duration::new(1_795_541_594, 434_688_123);
        assert_eq!(
            Event::Stop.to_line(t),
            r#"{"timestamp": {"seconds": 1795541594, "microseconds": 434688}, "event": "STOP"}"#
        );
        assert_eq!(
            Event::Shutdown(ShutdownCause::HostQmpQuit).to_line(t),
            r#"{"timestamp": {"seconds": 1795541594, "microseconds": 434688}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}"#
        );
        assert!(Event::Shutdown(ShutdownCause::GuestShutdown)
            .to_line(t)
            .contains(r#""data": {"guest": true, "reason": "guest-shutdown"}"#));
        assert!(Event::Reset(ShutdownCause::HostQmpSystemReset)
            .to_line(t)
            .contains(
                r#""event": "RESET", "data": {"guest": false, "reason": "host-qmp-system-reset"}"#
            ));
    }

    #[test]
    fn stop_and_cont_are_idempotent_and_truthful() {
        let f = fake();
        let mut rx = f.events.subscribe();
        assert_eq!(f.control.run_state(), RunState::Running);
        f.control.stop();
        f.control.stop();
        assert_eq!(f.control.run_state(), RunState::Paused);
        assert_eq!(f.vcpus.pauses.load(Ordering::SeqCst), 1);
        f.control.cont().unwrap();
        f.control.cont().unwrap();
        assert_eq!(f.control.run_state(), RunState::Running);
        assert_eq!(f.vcpus.resumes.load(Ordering::SeqCst), 1);
        assert_eq!(names(&mut rx), ["STOP", "RESUME"]);
    }

    /// MIGRATION events' statuses, and other events by name.
    fn with_status(rx: &mut broadcast::Receiver<Arc<str>>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(line) = rx.try_recv() {
            let v: Value = serde_json::from_str(&line).unwrap();
            out.push(match v["data"]["status"].as_str() {
                Some(status) => format!("MIGRATION {status}"),
                None => v["event"].as_str().unwrap().to_owned(),
            });
        }
        out
    }

    #[test]
    fn migrate_saves_and_leaves_the_vm_stopped_in_postmigrate() {
        let f = fake();
        let mut rx = f.events.subscribe();
        assert_eq!(f.control.migration(), Migration::None);
        f.control.migrate("file:/snap").unwrap();
        assert_eq!(f.control.run_state(), RunState::Postmigrate);
        assert!(!f.control.run_state().is_running());
        assert!(matches!(f.control.migration(), Migration::Completed { .. }));
        assert_eq!(
            with_status(&mut rx),
            [
                "MIGRATION setup",
                "STOP",
                "MIGRATION active",
                "MIGRATION completed"
            ]
        );
        // cont runs it again, as QEMU's does after a migration.
        f.control.cont().unwrap();
        assert_eq!(f.control.run_state(), RunState::Running);
        // A paused VM is saved without a second STOP.
        f.control.stop();
        let _ = with_status(&mut rx);
        f.control.migrate("file:/snap").unwrap();
        assert_eq!(
            with_status(&mut rx),
            ["MIGRATION setup", "MIGRATION active", "MIGRATION completed"]
        );
    }

    #[test]
    fn a_failed_or_bad_migrate_says_why_and_resumes_a_running_vm() {
        let f = fake();
        let mut rx = f.events.subscribe();
        let e = f.control.migrate("file:/fail").unwrap_err();
        assert!(e.contains("refused"), "{e}");
        assert_eq!(f.control.run_state(), RunState::Running);
        assert_eq!(
            with_status(&mut rx),
            [
                "MIGRATION setup",
                "STOP",
                "MIGRATION active",
                "MIGRATION failed",
                "RESUME"
            ]
        );
        assert!(matches!(f.control.migration(), Migration::Failed { .. }));
        for (uri, says) in [
            ("tcp:localhost:4444", "file:DIR only"),
            ("file:", "needs a directory"),
            ("/snap", "file:DIR only"),
        ] {
            let e = f.control.migrate(uri).unwrap_err();
            assert!(e.contains(says), "{uri}: {e}");
        }
        // Nothing happened for those.
        assert!(with_status(&mut rx).is_empty());
        f.control.quit();
        let e = f.control.migrate("file:/snap").unwrap_err();
        assert!(e.contains("shutdown"), "{e}");
    }

    #[test]
    fn quit_emits_shutdown_once_and_asks_for_exit() {
        let f = fake();
        let mut rx = f.events.subscribe();
        f.control.quit();
        assert_eq!(f.control.run_state(), RunState::Shutdown);
        // The main thread then reports the same exit: no second event.
        f.control.exiting(&ExitReason::Quit);
        f.control.quit();
        assert_eq!(names(&mut rx), ["SHUTDOWN"]);
        assert_eq!(*f.exits.lock().unwrap(), vec![ExitReason::Quit]);
        assert_eq!(
            f.control.cont(),
            Err("Resetting the Virtual Machine is required".into())
        );
    }

    #[test]
    fn guest_exits_map_to_qemu_causes() {
        for (reason, events, cause) in [
            (ExitReason::PowerOff, vec!["SHUTDOWN"], "guest-shutdown"),
            (ExitReason::Reset, vec!["SHUTDOWN"], "guest-reset"),
            (
                ExitReason::Panic,
                vec!["GUEST_PANICKED", "STOP", "SHUTDOWN"],
                "guest-panic",
            ),
            (ExitReason::Signal(15), vec!["SHUTDOWN"], "host-signal"),
            (
                ExitReason::Crash("x".into()),
                vec!["SHUTDOWN"],
                "host-error",
            ),
        ] {
            let f = fake();
            let mut rx = f.events.subscribe();
            f.control.exiting(&reason);
            let mut lines = Vec::new();
            while let Ok(l) = rx.try_recv() {
                lines.push(l);
            }
            let got: Vec<String> = lines
                .iter()
                .map(|l| {
                    serde_json::from_str::<Value>(l).unwrap()["event"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect();
            assert_eq!(got, events, "{reason:?}");
            let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
            assert_eq!(last["data"]["reason"], cause);
            assert_eq!(f.control.run_state(), RunState::Shutdown);
        }
    }

    #[test]
    fn powerdown_presses_the_button() {
        let f = fake();
        let mut rx = f.events.subscribe();
        f.control.system_powerdown();
        assert_eq!(f.presses.load(Ordering::SeqCst), 1);
        assert_eq!(names(&mut rx), ["POWERDOWN"]);
        assert_eq!(f.control.run_state(), RunState::Running);
    }

    #[test]
    fn system_reset_ends_the_vm_with_the_reset_status() {
        let f = fake();
        let mut rx = f.events.subscribe();
        f.control.system_reset();
        assert_eq!(*f.exits.lock().unwrap(), vec![ExitReason::HostReset]);
        assert_eq!(ExitReason::HostReset.exit_code(), 3);
        assert_eq!(names(&mut rx), ["SHUTDOWN"]);
    }
}
