//! The QMP protocol as QEMU 7.2 speaks it: greeting, capabilities
//! negotiation, request validation with QEMU's error texts, command
//! dispatch and reply shapes. Pure: it acts on a [`Controls`] and returns
//! the lines to send, so it is tested without KVM or sockets.

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::display::{self, ImageFormat, PointerOrKey};
use super::json::to_line;
use super::qemu::{package, QEMU_VERSION};
use super::stream::Input;
use super::{hmp, Controls, Migration};
use skiff_devices::virtio::input::keys;

/// QMP error classes (`qapi/error.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Almost everything.
    GenericError,
    /// Unknown command, or any command before negotiation.
    CommandNotFound,
    /// A device is not active.
    DeviceNotActive,
    /// No such device.
    DeviceNotFound,
    /// KVM lacks a capability.
    KvmMissingCap,
}

impl ErrorClass {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KvmMissingCap => "KVMMissingCap",
        }
    }
}

/// A failed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// Its class.
    pub class: ErrorClass,
    /// QEMU's text.
    pub desc: String,
}

impl QmpError {
    fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    fn not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

#[derive(Serialize)]
struct VersionTriple {
    micro: u32,
    minor: u32,
    major: u32,
}

#[derive(Serialize)]
struct VersionInfo {
    qemu: VersionTriple,
    package: String,
}

fn version_info() -> VersionInfo {
    let (major, minor, micro) = QEMU_VERSION;
    VersionInfo {
        qemu: VersionTriple {
            micro,
            minor,
            major,
        },
        package: package(),
    }
}

#[derive(Serialize)]
struct GreetingBody {
    version: VersionInfo,
    capabilities: [&'static str; 0],
}

#[derive(Serialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

/// The greeting sent on connect. No capabilities are offered: out-of-band
/// execution is not implemented, and qemu.qmp enables `oob` whenever a
/// server offers it.
pub fn greeting() -> String {
    to_line(&Greeting {
        qmp: GreetingBody {
            version: version_info(),
            capabilities: [],
        },
    })
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    class: &'a str,
    desc: &'a str,
}

#[derive(Serialize)]
struct Failure<'a> {
    error: ErrorBody<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

/// A reply line (without the line end). A successful result is given as
/// JSON text, so that its members keep the order QEMU sends them in.
pub fn reply(result: &Result<String, QmpError>, id: Option<&Value>) -> String {
    match result {
        Ok(ret) => match id {
            Some(id) => format!("{{\"return\": {ret}, \"id\": {}}}", to_line(id)),
            None => format!("{{\"return\": {ret}}}"),
        },
        Err(e) => to_line(&Failure {
            error: ErrorBody {
                class: e.class.as_str(),
                desc: &e.desc,
            },
            id,
        }),
    }
}

/// Argument types, with the names QEMU's error messages use.
#[derive(Debug, Clone, Copy)]
enum ArgType {
    Str,
    Int,
    Bool,
    /// An array of enum values.
    EnumList(&'static [&'static str]),
    /// One enum value.
    Enum(&'static [&'static str]),
    /// An array, its elements checked by the command.
    List,
}

struct Arg {
    name: &'static str,
    ty: ArgType,
    optional: bool,
}

const fn req(name: &'static str, ty: ArgType) -> Arg {
    Arg {
        name,
        ty,
        optional: false,
    }
}

const fn opt(name: &'static str, ty: ArgType) -> Arg {
    Arg {
        name,
        ty,
        optional: true,
    }
}

const QMP_CAPABILITIES: &[&str] = &["oob"];
const SCREENDUMP_FORMATS: &[&str] = &["ppm", "png"];

/// Every command: its name and arguments, in QEMU's declaration order.
const COMMANDS: &[(&str, &[Arg])] = &[
    (
        "qmp_capabilities",
        &[opt("enable", ArgType::EnumList(QMP_CAPABILITIES))],
    ),
    ("query-version", &[]),
    ("query-commands", &[]),
    ("query-status", &[]),
    ("query-name", &[]),
    ("query-kvm", &[]),
    ("query-cpus-fast", &[]),
    ("query-block", &[]),
    ("query-chardev", &[]),
    ("stop", &[]),
    ("cont", &[]),
    ("system_reset", &[]),
    ("system_powerdown", &[]),
    ("quit", &[]),
    (
        "human-monitor-command",
        &[
            req("command-line", ArgType::Str),
            opt("cpu-index", ArgType::Int),
        ],
    ),
    (
        "screendump",
        &[
            req("filename", ArgType::Str),
            opt("device", ArgType::Str),
            opt("head", ArgType::Int),
            opt("format", ArgType::Enum(SCREENDUMP_FORMATS)),
        ],
    ),
    (
        "send-key",
        &[req("keys", ArgType::List), opt("hold-time", ArgType::Int)],
    ),
    (
        "input-send-event",
        &[
            opt("device", ArgType::Str),
            opt("head", ArgType::Int),
            req("events", ArgType::List),
        ],
    ),
    ("query-mice", &[]),
    (
        "set_link",
        &[req("name", ArgType::Str), req("up", ArgType::Bool)],
    ),
    (
        "migrate",
        &[
            req("uri", ArgType::Str),
            opt("detach", ArgType::Bool),
            opt("resume", ArgType::Bool),
        ],
    ),
    ("query-migrate", &[]),
];

/// Names of the commands this server implements.
pub fn command_names() -> impl Iterator<Item = &'static str> {
    COMMANDS.iter().map(|(name, _)| *name)
}

fn type_error(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

fn check_enum(value: &str, allowed: &[&str], name: &str) -> Result<(), QmpError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(QmpError::generic(format!(
            "Parameter '{name}' does not accept value '{value}'"
        )))
    }
}

fn check_type(name: &str, ty: ArgType, v: &Value) -> Result<(), QmpError> {
    match ty {
        ArgType::Str if v.is_string() => Ok(()),
        ArgType::Str => Err(type_error(name, "string")),
        ArgType::Int if v.is_i64() => Ok(()),
        ArgType::Int => Err(type_error(name, "integer")),
        ArgType::Bool if v.is_boolean() => Ok(()),
        ArgType::Bool => Err(type_error(name, "boolean")),
        ArgType::Enum(allowed) => match v.as_str() {
            Some(s) => check_enum(s, allowed, name),
            None => Err(type_error(name, "string")),
        },
        ArgType::List if v.is_array() => Ok(()),
        ArgType::List => Err(type_error(name, "array")),
        ArgType::EnumList(allowed) => {
            let items = v.as_array().ok_or_else(|| type_error(name, "array"))?;
            for (i, item) in items.iter().enumerate() {
                let s = item
                    .as_str()
                    .ok_or_else(|| type_error(&format!("{name}[{i}]"), "string"))?;
                // QEMU 7.2 names a list element "null" here.
                check_enum(s, allowed, "null")?;
            }
            Ok(())
        }
    }
}

/// Validates `args` against `spec` as QEMU's generated unmarshallers do:
/// members in declaration order (missing, then wrong type), then anything
/// left over.
fn check_args(args: &Map<String, Value>, spec: &[Arg]) -> Result<(), QmpError> {
    for arg in spec {
        match args.get(arg.name) {
            None if arg.optional => {}
            None => {
                return Err(QmpError::generic(format!(
                    "Parameter '{}' is missing",
                    arg.name
                )))
            }
            Some(v) => check_type(arg.name, arg.ty, v)?,
        }
    }
    if let Some(extra) = args.keys().find(|k| !spec.iter().any(|a| a.name == *k)) {
        return Err(QmpError::generic(format!(
            "Parameter '{extra}' is unexpected"
        )));
    }
    Ok(())
}

/// Checks the request envelope (QEMU's `qmp_dispatch_check_obj`) and
/// returns the command name.
fn check_envelope(req: &Map<String, Value>) -> Result<&str, QmpError> {
    let mut command = None;
    for (key, value) in req {
        match key.as_str() {
            "execute" => {
                command = Some(value.as_str().ok_or_else(|| {
                    QmpError::generic("QMP input member 'execute' must be a string")
                })?);
            }
            "arguments" if !value.is_object() => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ))
            }
            "arguments" | "id" => {}
            // `exec-oob` is only known to a monitor with oob enabled.
            other => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{other}' is unexpected"
                )))
            }
        }
    }
    command.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))
}

/// What handling one input produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The reply line (without the line end).
    pub reply: String,
    /// The client just completed negotiation: events flow from now on.
    pub negotiated: bool,
}

/// One client's protocol state.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
}

impl Session {
    /// A client that has just been greeted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `qmp_capabilities` succeeded (events are delivered then).
    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// Handles one input message.
    pub fn handle(&mut self, input: Input, machine: &dyn Controls) -> Outcome {
        let was = self.negotiated;
        let reply = match input {
            Input::Error(desc) => reply(&Err(QmpError::generic(desc)), None),
            Input::Value(Value::Object(req)) => {
                let id = req.get("id");
                reply(&self.execute(&req, machine), id)
            }
            Input::Value(_) => reply(
                &Err(QmpError::generic("QMP input must be a JSON object")),
                None,
            ),
        };
        Outcome {
            reply,
            negotiated: self.negotiated && !was,
        }
    }

    fn execute(
        &mut self,
        req: &Map<String, Value>,
        machine: &dyn Controls,
    ) -> Result<String, QmpError> {
        let name = check_envelope(req)?;
        let empty = Map::new();
        let args = req
            .get("arguments")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let spec = COMMANDS.iter().find(|(n, _)| *n == name);
        if !self.negotiated && name != "qmp_capabilities" {
            return Err(QmpError::not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        let Some((_, spec)) = spec else {
            return Err(QmpError::not_found(format!(
                "The command {name} has not been found"
            )));
        };
        check_args(args, spec)?;
        if name == "qmp_capabilities" {
            if self.negotiated {
                return Err(QmpError::not_found(
                    "Capabilities negotiation is already complete, command ignored",
                ));
            }
            if let Some(cap) = args
                .get("enable")
                .and_then(Value::as_array)
                .and_then(|caps| caps.first())
                .and_then(Value::as_str)
            {
                return Err(QmpError::generic(format!("Capability {cap} not available")));
            }
            self.negotiated = true;
            return Ok("{}".to_owned());
        }
        run_command(name, args, machine)
    }
}

#[derive(Serialize)]
struct StatusInfo {
    status: &'static str,
    singlestep: bool,
    running: bool,
}

fn query_cpus_fast(machine: &dyn Controls) -> Value {
    let tids = machine.vcpu_thread_ids();
    let cpus: Vec<Value> = (0..usize::from(machine.info().cpus))
        .map(|i| {
            json!({
                "thread-id": tids.get(i).copied().unwrap_or(0),
                "props": {"core-id": i, "thread-id": 0, "socket-id": 0},
                "qom-path": format!("/machine/unattached/device[{i}]"),
                "cpu-index": i,
                "target": "x86_64",
            })
        })
        .collect();
    Value::Array(cpus)
}

/// query-block's BlockInfo, the members a client can use (QEMU's
/// BlockDeviceInfo has more, such as throttling and cache settings, which
/// are given their defaults here).
fn query_block(machine: &dyn Controls) -> Value {
    let disks: Vec<Value> = machine
        .info()
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            json!({
                "io-status": "ok",
                "device": d.device,
                "locked": false,
                "removable": false,
                "qdev": format!("/machine/peripheral-anon/device[{i}]/virtio-backend"),
                "type": "unknown",
                "inserted": {
                    "iops_rd": 0, "detect_zeroes": "off", "image": {
                        "virtual-size": d.size, "filename": d.path, "format": "raw",
                        "actual-size": d.size, "dirty-flag": false,
                    },
                    "iops_wr": 0, "ro": d.readonly, "node-name": format!("#block{:03}", i * 2 + 1),
                    "backing_file_depth": 0, "drv": "raw", "iops": 0, "bps_wr": 0,
                    "write_threshold": 0, "encrypted": false, "bps": 0, "bps_rd": 0,
                    "cache": {"no-flush": false, "direct": false, "writeback": true},
                    "file": d.path,
                },
            })
        })
        .collect();
    Value::Array(disks)
}

fn query_chardev(machine: &dyn Controls) -> Value {
    let devs: Vec<Value> = machine
        .info()
        .chardevs
        .iter()
        .map(|c| json!({"frontend-open": true, "filename": c.filename, "label": c.label}))
        .collect();
    Value::Array(devs)
}

/// A `KeyValue` (`{"type": "qcode", "data": "ret"}` or `{"type":
/// "number", "data": 28}`) at `at`, as a Linux key code.
fn key_value(v: &Value, at: &str) -> Result<u16, QmpError> {
    let data = v
        .get("data")
        .ok_or_else(|| QmpError::generic(format!("Parameter '{at}.data' is missing")))?;
    match v.get("type").and_then(Value::as_str) {
        Some("qcode") => {
            let name = data
                .as_str()
                .ok_or_else(|| type_error(&format!("{at}.data"), "string"))?;
            keys::by_name(name).map(|k| k.linux).ok_or_else(|| {
                QmpError::generic(format!(
                    "Parameter '{at}.data' does not accept value '{name}'"
                ))
            })
        }
        Some("number") => {
            let n = data
                .as_i64()
                .ok_or_else(|| type_error(&format!("{at}.data"), "integer"))?;
            u16::try_from(n)
                .ok()
                .and_then(keys::by_number)
                .map(|k| k.linux)
                .ok_or_else(|| {
                    QmpError::generic(format!("Parameter '{at}.data': {n:#x} is no key number"))
                })
        }
        Some(other) => Err(QmpError::generic(format!(
            "Parameter '{at}.type' does not accept value '{other}'"
        ))),
        None => Err(QmpError::generic(format!(
            "Parameter '{at}.type' is missing"
        ))),
    }
}

/// An `InputEvent` of `input-send-event` at `at`.
fn input_event(v: &Value, at: &str) -> Result<PointerOrKey, QmpError> {
    let data = v
        .get("data")
        .ok_or_else(|| QmpError::generic(format!("Parameter '{at}.data' is missing")))?;
    let down = || {
        data.get("down").and_then(Value::as_bool).ok_or_else(|| {
            QmpError::generic(format!(
                "Parameter '{at}.data.down' is missing or not a boolean"
            ))
        })
    };
    match v.get("type").and_then(Value::as_str) {
        Some("key") => {
            let key = data.get("key").ok_or_else(|| {
                QmpError::generic(format!("Parameter '{at}.data.key' is missing"))
            })?;
            Ok(PointerOrKey::Key {
                code: key_value(key, &format!("{at}.data.key"))?,
                down: down()?,
            })
        }
        Some("btn") => {
            let name = data
                .get("button")
                .and_then(Value::as_str)
                .unwrap_or_default();
            display::button(name, down()?).ok_or_else(|| {
                QmpError::generic(format!(
                    "Parameter '{at}.data.button' does not accept value '{name}'"
                ))
            })
        }
        Some("abs") => {
            let axis = data.get("axis").and_then(Value::as_str).unwrap_or_default();
            let value = data.get("value").and_then(Value::as_i64).ok_or_else(|| {
                QmpError::generic(format!(
                    "Parameter '{at}.data.value' is missing or not an integer"
                ))
            })?;
            display::abs(axis, value).map_err(QmpError::generic)
        }
        Some("rel") => Err(QmpError::generic(
            "this VM has no relative pointer: move the tablet with abs events",
        )),
        Some(other) => Err(QmpError::generic(format!(
            "Parameter '{at}.type' does not accept value '{other}'"
        ))),
        None => Err(QmpError::generic(format!(
            "Parameter '{at}.type' is missing"
        ))),
    }
}

fn run_command(
    name: &str,
    args: &Map<String, Value>,
    machine: &dyn Controls,
) -> Result<String, QmpError> {
    let arg_str = |n: &str| args.get(n).and_then(Value::as_str).unwrap_or_default();
    let empty = || "{}".to_owned();
    Ok(match name {
        "query-version" => to_line(&version_info()),
        "query-commands" => to_line(&Value::Array(
            command_names().map(|n| json!({ "name": n })).collect(),
        )),
        "query-status" => {
            let state = machine.run_state();
            to_line(&StatusInfo {
                status: state.as_str(),
                singlestep: false,
                running: state.is_running(),
            })
        }
        "query-name" => to_line(&json!({"name": machine.info().name})),
        "query-kvm" => r#"{"enabled": true, "present": true}"#.to_owned(),
        "query-cpus-fast" => to_line(&query_cpus_fast(machine)),
        "query-block" => to_line(&query_block(machine)),
        "query-chardev" => to_line(&query_chardev(machine)),
        "stop" => {
            machine.stop();
            empty()
        }
        "cont" => {
            machine.cont().map_err(QmpError::generic)?;
            empty()
        }
        "system_reset" => {
            machine.system_reset();
            empty()
        }
        "system_powerdown" => {
            machine.system_powerdown();
            empty()
        }
        "quit" => {
            machine.quit();
            empty()
        }
        "human-monitor-command" => {
            let mut current = 0;
            if let Some(cpu) = args.get("cpu-index").and_then(Value::as_i64) {
                if cpu < 0 || cpu >= i64::from(machine.info().cpus) {
                    return Err(QmpError::generic(
                        "Parameter 'cpu-index' expects a CPU number",
                    ));
                }
                current = cpu as usize;
            }
            to_line(&hmp::execute_on(arg_str("command-line"), machine, current))
        }
        "screendump" => {
            if args.get("head").and_then(Value::as_i64).unwrap_or(0) != 0 {
                return Err(QmpError::generic("skiff-vmm's display has one head, head 0"));
            }
            let format = match args.get("format").and_then(Value::as_str) {
                Some(f) => ImageFormat::parse(f).unwrap_or(ImageFormat::Ppm),
                None => ImageFormat::Ppm,
            };
            machine
                .display()
                .screendump(std::path::Path::new(arg_str("filename")), format)
                .map_err(QmpError::generic)?;
            empty()
        }
        "send-key" => {
            let keys = args.get("keys").and_then(Value::as_array);
            let codes = keys
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(i, k)| key_value(k, &format!("keys[{i}]")))
                .collect::<Result<Vec<u16>, QmpError>>()?;
            if codes.is_empty() {
                return Err(QmpError::generic("Parameter 'keys' must not be empty"));
            }
            let hold = match args.get("hold-time").and_then(Value::as_i64) {
                Some(ms) => Some(u64::try_from(ms).map_err(|_| {
                    QmpError::generic("Parameter 'hold-time' must not be negative")
                })?),
                None => None,
            };
            machine
                .display()
                .send_keys(&codes, hold)
                .map_err(QmpError::generic)?;
            empty()
        }
        "input-send-event" => {
            if !machine.run_state().is_running() {
                return Err(QmpError::generic("VM not running"));
            }
            if args.get("head").and_then(Value::as_i64).unwrap_or(0) != 0 {
                return Err(QmpError::generic("skiff-vmm's display has one head, head 0"));
            }
            let events = args
                .get("events")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(i, e)| input_event(e, &format!("events[{i}]")))
                .collect::<Result<Vec<_>, QmpError>>()?;
            machine
                .display()
                .send_events(&events)
                .map_err(QmpError::generic)?;
            empty()
        }
        "query-mice" => to_line(&Value::Array(
            machine
                .display()
                .mice()
                .into_iter()
                .enumerate()
                .map(|(i, (name, absolute))| {
                    json!({"index": i + 2, "name": name, "current": i == 0, "absolute": absolute})
                })
                .collect(),
        )),
        "set_link" => {
            let up = args.get("up").and_then(Value::as_bool).unwrap_or_default();
            machine
                .set_link(arg_str("name"), up)
                .map_err(|desc| QmpError {
                    class: ErrorClass::DeviceNotFound,
                    desc,
                })?;
            empty()
        }
        "migrate" => {
            if args.get("resume").and_then(Value::as_bool) == Some(true) {
                return Err(QmpError::generic(
                    "skiff-vmm cannot resume a migration: start it again",
                ));
            }
            machine.migrate(arg_str("uri")).map_err(QmpError::generic)?;
            empty()
        }
        "query-migrate" => to_line(&match machine.migration() {
            Migration::None => json!({}),
            Migration::Completed { total_ms } => {
                json!({"status": "completed", "total-time": total_ms})
            }
            Migration::Failed { error } => {
                json!({"status": "failed", "error-desc": error})
            }
        }),
        other => {
            return Err(QmpError::not_found(format!(
                "The command {other} has not been found"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{fake, names};
    use super::super::RunState;
    use super::*;
    use crate::exit::ExitReason;

    fn input(text: &str) -> Input {
        Input::Value(serde_json::from_str(text).unwrap())
    }

    fn run(session: &mut Session, m: &dyn Controls, text: &str) -> Value {
        serde_json::from_str(&session.handle(input(text), m).reply).unwrap()
    }

    fn negotiated(m: &dyn Controls) -> Session {
        let mut s = Session::new();
        let out = s.handle(input(r#"{"execute":"qmp_capabilities"}"#), m);
        assert_eq!(out.reply, r#"{"return": {}}"#);
        assert!(out.negotiated);
        s
    }

    fn error(v: &Value) -> (&str, &str) {
        (
            v["error"]["class"].as_str().unwrap(),
            v["error"]["desc"].as_str().unwrap(),
        )
    }

    #[test]
    fn greeting_offers_no_capabilities() {
        let g = greeting();
        let expect = format!(
            r#"{{"QMP": {{"version": {{"qemu": {{"micro": 0, "minor": 2, "major": 7}}, "package": "skiff-vmm {}"}}, "capabilities": []}}}}"#,
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(g, expect);
    }

    #[test]
    fn commands_before_negotiation_are_refused() {
        let f = fake();
        let mut s = Session::new();
        let out = s.handle(input(r#"{"execute":"query-status","id":1}"#), &f.control);
        assert_eq!(
            out.reply,
            r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1}"#
        );
        // Even unknown commands get the negotiation text.
        let v = run(&mut s, &f.control, r#"{"execute":"frob"}"#);
        assert_eq!(
            error(&v),
            (
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        );
        // A stop before negotiation has no effect.
        run(&mut s, &f.control, r#"{"execute":"stop"}"#);
        assert_eq!(f.control.run_state(), RunState::Running);
        assert!(!s.is_negotiated());
    }

    #[test]
    fn negotiation() {
        let f = fake();
        let mut s = Session::new();
        let v = run(
            &mut s,
            &f.control,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":"x"}"#,
        );
        assert_eq!(error(&v), ("GenericError", "Capability oob not available"));
        assert_eq!(v["id"], "x");
        let v = run(
            &mut s,
            &f.control,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}"#,
        );
        assert_eq!(
            error(&v),
            (
                "GenericError",
                "Parameter 'null' does not accept value 'foo'"
            )
        );
        let v = run(
            &mut s,
            &f.control,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}"#,
        );
        assert_eq!(
            error(&v),
            (
                "GenericError",
                "Invalid parameter type for 'enable', expected: array"
            )
        );
        let v = run(
            &mut s,
            &f.control,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":[1]}}"#,
        );
        assert_eq!(
            error(&v),
            (
                "GenericError",
                "Invalid parameter type for 'enable[0]', expected: string"
            )
        );
        assert!(!s.is_negotiated());
        let out = s.handle(
            input(r#"{"execute":"qmp_capabilities","arguments":{"enable":[]},"id":"a"}"#),
            &f.control,
        );
        assert_eq!(out.reply, r#"{"return": {}, "id": "a"}"#);
        assert!(out.negotiated);
        let out = s.handle(input(r#"{"execute":"qmp_capabilities"}"#), &f.control);
        assert!(!out.negotiated);
        assert_eq!(
            out.reply,
            r#"{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#
        );
    }

    #[test]
    fn envelope_errors() {
        let f = fake();
        let mut s = negotiated(&f.control);
        for (text, desc, has_id) in [
            ("[1, 2]", "QMP input must be a JSON object", false),
            ("\"query-status\"", "QMP input must be a JSON object", false),
            (
                r#"{"execute": 1, "id": 7}"#,
                "QMP input member 'execute' must be a string",
                true,
            ),
            (
                r#"{"execute": "stop", "arguments": [], "id": 7}"#,
                "QMP input member 'arguments' must be an object",
                true,
            ),
            (
                r#"{"execute": "stop", "arguments": null, "id": 7}"#,
                "QMP input member 'arguments' must be an object",
                true,
            ),
            (
                r#"{"execute": "stop", "foo": 1, "id": 7}"#,
                "QMP input member 'foo' is unexpected",
                true,
            ),
            (
                r#"{"exec-oob": "stop", "id": 7}"#,
                "QMP input member 'exec-oob' is unexpected",
                true,
            ),
            (r#"{"id": 7}"#, "QMP input lacks member 'execute'", true),
            ("{}", "QMP input lacks member 'execute'", false),
        ] {
            let v = run(&mut s, &f.control, text);
            assert_eq!(error(&v), ("GenericError", desc), "{text}");
            assert_eq!(v.get("id").is_some(), has_id, "{text}");
        }
        assert_eq!(f.control.run_state(), RunState::Running);
    }

    #[test]
    fn parse_errors_have_no_id() {
        let f = fake();
        let mut s = negotiated(&f.control);
        let out = s.handle(
            Input::Error("JSON parse error, expecting value".into()),
            &f.control,
        );
        assert_eq!(
            out.reply,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#
        );
    }

    #[test]
    fn unknown_commands() {
        let f = fake();
        let mut s = negotiated(&f.control);
        let v = run(
            &mut s,
            &f.control,
            r#"{"execute":"no-such","id":{"a":[1]}}"#,
        );
        assert_eq!(
            error(&v),
            ("CommandNotFound", "The command no-such has not been found")
        );
        assert_eq!(v["id"], json!({"a": [1]}));
        // As in the NixOS driver's self-test: no id sent, none returned.
        let v = run(&mut s, &f.control, r#"{"execute":"blockdev-add"}"#);
        assert!(v.get("id").is_none());
        assert_eq!(error(&v).0, "CommandNotFound");
    }

    #[test]
    fn argument_errors_name_the_argument() {
        let f = fake();
        let mut s = negotiated(&f.control);
        for (text, desc) in [
            (
                r#"{"execute":"stop","arguments":{"x":1}}"#,
                "Parameter 'x' is unexpected",
            ),
            (
                r#"{"execute":"human-monitor-command"}"#,
                "Parameter 'command-line' is missing",
            ),
            (
                r#"{"execute":"human-monitor-command","arguments":{"command-line":1}}"#,
                "Invalid parameter type for 'command-line', expected: string",
            ),
            (
                r#"{"execute":"human-monitor-command","arguments":{"command-line":"info status","cpu-index":"0"}}"#,
                "Invalid parameter type for 'cpu-index', expected: integer",
            ),
            (
                r#"{"execute":"human-monitor-command","arguments":{"command-line":"info status","cpu-index":1.5}}"#,
                "Invalid parameter type for 'cpu-index', expected: integer",
            ),
            (
                r#"{"execute":"human-monitor-command","arguments":{"command-line":"info status","cpu-index":9}}"#,
                "Parameter 'cpu-index' expects a CPU number",
            ),
            // Missing members are reported before unexpected ones.
            (
                r#"{"execute":"human-monitor-command","arguments":{"zzz":1}}"#,
                "Parameter 'command-line' is missing",
            ),
            (
                r#"{"execute":"set_link","arguments":{"name":"n","up":"off"}}"#,
                "Invalid parameter type for 'up', expected: boolean",
            ),
            (
                r#"{"execute":"screendump","arguments":{"filename":"/tmp/x","format":"bmp"}}"#,
                "Parameter 'format' does not accept value 'bmp'",
            ),
        ] {
            let v = run(&mut s, &f.control, text);
            assert_eq!(error(&v), ("GenericError", desc), "{text}");
        }
        assert_eq!(f.control.run_state(), RunState::Running);
    }

    #[test]
    fn stop_cont_and_status() {
        let f = fake();
        let mut rx = f.events.subscribe();
        let mut s = negotiated(&f.control);
        let status = |s: &mut Session| run(s, &f.control, r#"{"execute":"query-status"}"#);
        assert_eq!(
            s.handle(input(r#"{"execute":"query-status"}"#), &f.control)
                .reply,
            r#"{"return": {"status": "running", "singlestep": false, "running": true}}"#
        );
        let out = s.handle(input(r#"{"execute":"stop","id":13}"#), &f.control);
        assert_eq!(out.reply, r#"{"return": {}, "id": 13}"#);
        assert_eq!(
            status(&mut s)["return"],
            json!({"status": "paused", "singlestep": false, "running": false})
        );
        run(&mut s, &f.control, r#"{"execute":"stop"}"#);
        run(&mut s, &f.control, r#"{"execute":"cont"}"#);
        run(&mut s, &f.control, r#"{"execute":"cont"}"#);
        assert_eq!(status(&mut s)["return"]["status"], "running");
        assert_eq!(names(&mut rx), ["STOP", "RESUME"]);
    }

    #[test]
    fn quit_reset_powerdown() {
        let f = fake();
        let mut rx = f.events.subscribe();
        let mut s = negotiated(&f.control);
        assert_eq!(
            run(&mut s, &f.control, r#"{"execute":"system_powerdown"}"#),
            json!({"return": {}})
        );
        assert_eq!(names(&mut rx), ["POWERDOWN"]);
        assert_eq!(
            run(&mut s, &f.control, r#"{"execute":"quit","id":20}"#),
            json!({"return": {}, "id": 20})
        );
        assert_eq!(names(&mut rx), ["SHUTDOWN"]);
        assert_eq!(*f.exits.lock().unwrap(), vec![ExitReason::Quit]);
        assert_eq!(
            run(&mut s, &f.control, r#"{"execute":"query-status"}"#)["return"],
            json!({"status": "shutdown", "singlestep": false, "running": false})
        );
        let v = run(&mut s, &f.control, r#"{"execute":"cont"}"#);
        assert_eq!(
            error(&v),
            ("GenericError", "Resetting the Virtual Machine is required")
        );

        let f = fake();
        let mut s = negotiated(&f.control);
        run(&mut s, &f.control, r#"{"execute":"system_reset"}"#);
        assert_eq!(*f.exits.lock().unwrap(), vec![ExitReason::HostReset]);
    }

    #[test]
    fn queries() {
        let f = fake();
        let mut s = negotiated(&f.control);
        let q = |s: &mut Session, c: &str| {
            run(s, &f.control, &format!(r#"{{"execute":"{c}"}}"#))["return"].clone()
        };
        let v = q(&mut s, "query-version");
        assert_eq!(v["qemu"], json!({"major": 7, "minor": 2, "micro": 0}));
        assert!(v["package"].as_str().unwrap().starts_with("skiff-vmm "));
        let cmds = q(&mut s, "query-commands");
        let cmds: Vec<&str> = cmds
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        // qemu.qmp's legacy client relies on these.
        for needed in ["query-status", "stop", "cont", "system_powerdown", "quit"] {
            assert!(cmds.contains(&needed), "{needed}");
        }
        assert_eq!(q(&mut s, "query-name"), json!({"name": "node1"}));
        assert_eq!(
            q(&mut s, "query-kvm"),
            json!({"enabled": true, "present": true})
        );
        let cpus = q(&mut s, "query-cpus-fast");
        assert_eq!(cpus.as_array().unwrap().len(), 2);
        assert_eq!(cpus[1]["cpu-index"], 1);
        assert_eq!(cpus[1]["thread-id"], 1002);
        assert_eq!(cpus[1]["target"], "x86_64");
        // One socket of single-threaded cores, the members QEMU 7.2 gives.
        assert_eq!(
            cpus[1]["props"],
            json!({"core-id": 1, "thread-id": 0, "socket-id": 0})
        );
        let block = q(&mut s, "query-block");
        assert_eq!(block[0]["device"], "vda");
        assert_eq!(block[0]["inserted"]["ro"], true);
        assert_eq!(block[0]["inserted"]["file"], "/img/root.raw");
        assert_eq!(block[0]["inserted"]["image"]["virtual-size"], 1 << 20);
        assert_eq!(
            q(&mut s, "query-chardev"),
            json!([{"label": "serial0", "filename": "stdio", "frontend-open": true}])
        );
    }

    #[test]
    fn human_monitor_command() {
        let f = fake();
        let mut s = negotiated(&f.control);
        let hmp = |s: &mut Session, line: &str| {
            run(
                s,
                &f.control,
                &json!({"execute": "human-monitor-command", "arguments": {"command-line": line}})
                    .to_string(),
            )["return"]
                .clone()
        };
        assert_eq!(hmp(&mut s, "info status"), "VM status: running\r\n");
        assert_eq!(hmp(&mut s, "stop"), "");
        assert_eq!(hmp(&mut s, "info status"), "VM status: paused\r\n");
        assert_eq!(hmp(&mut s, "cont"), "");
        assert_eq!(
            hmp(&mut s, "frobnicate 1"),
            "unknown command: 'frobnicate'\r\n"
        );
        assert_eq!(
            hmp(&mut s, "screendump /tmp/x.ppm"),
            "Error: There is no console to take a screendump from\r\n"
        );
    }

    #[test]
    fn migrate_to_a_file_and_query_migrate() {
        let f = fake();
        let mut s = negotiated(&f.control);
        assert_eq!(
            run(&mut s, &f.control, r#"{"execute":"query-migrate"}"#),
            json!({"return": {}})
        );
        let v = run(
            &mut s,
            &f.control,
            r#"{"execute":"migrate","arguments":{"uri":"file:/snap"}}"#,
        );
        assert_eq!(v, json!({"return": {}}));
        let v = run(&mut s, &f.control, r#"{"execute":"query-migrate"}"#);
        assert_eq!(v["return"]["status"], "completed");
        assert!(v["return"]["total-time"].is_u64());
        let v = run(&mut s, &f.control, r#"{"execute":"query-status"}"#);
        assert_eq!(v["return"]["status"], "postmigrate");
        assert_eq!(v["return"]["running"], false);
        let v = run(
            &mut s,
            &f.control,
            r#"{"execute":"migrate","arguments":{"uri":"file:/fail"}}"#,
        );
        assert_eq!(error(&v).0, "GenericError");
        let v = run(&mut s, &f.control, r#"{"execute":"query-migrate"}"#);
        assert_eq!(v["return"]["status"], "failed");
        assert!(v["return"]["error-desc"]
            .as_str()
            .unwrap()
            .contains("refused"));
        let v = run(
            &mut s,
            &f.control,
            r#"{"execute":"migrate","arguments":{}}"#,
        );
        assert!(error(&v).1.contains("uri"), "{v}");
        assert_eq!(hmp::execute("migrate file:/snap", &f.control), "");
        assert!(hmp::execute("info migrate", &f.control).contains("completed"));
        assert_eq!(
            hmp::execute("migrate", &f.control),
            "migrate: uri expected\r\n"
        );
    }

    #[test]
    fn screendump_without_a_display_and_set_link() {
        let f = fake();
        let mut s = negotiated(&f.control);
        let v = run(
            &mut s,
            &f.control,
            r#"{"execute":"screendump","arguments":{"filename":"/tmp/s.ppm"}}"#,
        );
        assert_eq!(
            error(&v),
            (
                "GenericError",
                "There is no console to take a screendump from"
            )
        );
        // The fake machine has one card, net0 (virtio-net-pci.1).
        for (name, up) in [("virtio-net-pci.1", false), ("net0", true)] {
            let v = run(
                &mut s,
                &f.control,
                &format!(r#"{{"execute":"set_link","arguments":{{"name":"{name}","up":{up}}}}}"#),
            );
            assert_eq!(v["return"], serde_json::json!({}), "{v}");
        }
        assert_eq!(*f.links.lock().unwrap(), vec![false, true]);
        let v = run(
            &mut s,
            &f.control,
            r#"{"execute":"set_link","arguments":{"name":"virtio-net-pci.2","up":false}}"#,
        );
        assert_eq!(
            error(&v),
            ("DeviceNotFound", "Device 'virtio-net-pci.2' not found")
        );
    }

    #[test]
    fn screen_keys_and_pointer() {
        let (f, keyboard, tablet) = super::super::testing::fake_with_display();
        let m = &f.control;
        let mut s = negotiated(m);
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let ppm = dir.as_path().join("a.ppm");
        let cmd = format!(
            r#"{{"execute":"screendump","arguments":{{"filename":"{}"}}}}"#,
            ppm.display()
        );
        assert_eq!(run(&mut s, m, &cmd), json!({"return": {}}));
        assert_eq!(
            std::fs::read(&ppm).unwrap(),
            b"P6\n2 1\n255\n\xff\x00\x00\x00\x00\xff"
        );
        let png = dir.as_path().join("a.png");
        let cmd = format!(
            r#"{{"execute":"screendump","arguments":{{"filename":"{}","format":"png"}}}}"#,
            png.display()
        );
        assert_eq!(run(&mut s, m, &cmd), json!({"return": {}}));
        assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");

        let r = run(
            &mut s,
            m,
            r#"{"execute":"send-key","arguments":{"keys":[{"type":"qcode","data":"ctrl"},{"type":"number","data":56},{"type":"qcode","data":"delete"}],"hold-time":0}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while keyboard.pending() < 12 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for (args, want) in [
            (
                r#"{"keys":[{"type":"qcode","data":"nokey"}]}"#,
                "Parameter 'keys[0].data' does not accept value 'nokey'",
            ),
            (
                r#"{"keys":[{"type":"number","data":0}]}"#,
                "Parameter 'keys[0].data': 0x0 is no key number",
            ),
            (r#"{"keys":[]}"#, "Parameter 'keys' must not be empty"),
            (
                r#"{"keys":"ret"}"#,
                "Invalid parameter type for 'keys', expected: array",
            ),
            (
                r#"{"keys":[{"type":"qcode","data":"a"}],"hold-time":-1}"#,
                "Parameter 'hold-time' must not be negative",
            ),
        ] {
            let r = run(
                &mut s,
                m,
                &format!(r#"{{"execute":"send-key","arguments":{args}}}"#),
            );
            assert_eq!(r["error"]["desc"], want, "{args}");
        }

        let r = run(
            &mut s,
            m,
            r#"{"execute":"input-send-event","arguments":{"events":[{"type":"abs","data":{"axis":"x","value":16384}},{"type":"abs","data":{"axis":"y","value":0}},{"type":"btn","data":{"down":true,"button":"left"}}]}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        assert_eq!(tablet.pending(), 4);
        for (events, want) in [
            (
                r#"[{"type":"abs","data":{"axis":"x","value":40000}}]"#,
                "outside 0..32767",
            ),
            (
                r#"[{"type":"rel","data":{"axis":"x","value":4}}]"#,
                "no relative pointer",
            ),
            (
                r#"[{"type":"btn","data":{"down":true,"button":"fourth"}}]"#,
                "'events[0].data.button' does not accept value 'fourth'",
            ),
            (
                r#"[{"type":"key","data":{"down":true}}]"#,
                "'events[0].data.key' is missing",
            ),
            (
                r#"[{"type":"touch","data":{}}]"#,
                "'events[0].type' does not accept value 'touch'",
            ),
        ] {
            let r = run(
                &mut s,
                m,
                &format!(r#"{{"execute":"input-send-event","arguments":{{"events":{events}}}}}"#),
            );
            let desc = r["error"]["desc"].as_str().unwrap();
            assert!(desc.contains(want), "{events}: {desc}");
        }
        m.stop();
        let r = run(
            &mut s,
            m,
            r#"{"execute":"input-send-event","arguments":{"events":[]}}"#,
        );
        assert_eq!(r["error"]["desc"], "VM not running");
        assert_eq!(
            run(&mut s, m, r#"{"execute":"query-mice"}"#),
            json!({"return": [{"index": 2, "name": "QEMU Virtio Tablet", "current": true, "absolute": true}]})
        );
        // Without devices: QEMU's texts.
        let f = super::super::testing::fake();
        let mut s = negotiated(&f.control);
        assert_eq!(
            run(&mut s, &f.control, r#"{"execute":"query-mice"}"#),
            json!({"return": []})
        );
        let r = run(
            &mut s,
            &f.control,
            r#"{"execute":"screendump","arguments":{"filename":"/tmp/x"}}"#,
        );
        assert_eq!(
            r["error"]["desc"],
            "There is no console to take a screendump from"
        );
    }
}
