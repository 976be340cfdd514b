//! The embedded interpreter: a `_skiff` module with the Rust side of each
//! machine and the logger, and the `test_driver` package, which builds the
//! NixOS test API on them and runs the script.
//!
//! The package's sources are compiled in (one `include_str!` per module,
//! listed in [`PACKAGE`]) and served to the interpreter by a meta-path
//! finder, so `import test_driver.machine` works from a test script as it
//! does upstream, tracebacks show the package's source lines, and nothing
//! is read from disk at run time.

use std::ffi::CStr;
use std::path::Path;
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyModule};
use serde_json::Value;

use crate::machine::{interrupted, Machine, MachineError as RustMachineError};
use crate::network::Vlan;
use crate::qmp::QmpError;
use crate::report::logger;

/// The Python class, in `test_driver.errors`, of a machine error: one
/// per kind a script may want to tell apart, all subclasses of
/// `MachineError`.
fn error_class(e: &RustMachineError) -> &'static str {
    if e.is_interrupted() {
        return "DriverInterrupted";
    }
    match e {
        RustMachineError::Host { .. } | RustMachineError::Spawn { .. } => "HostError",
        RustMachineError::NotRunning { .. } => "MachineNotRunning",
        RustMachineError::Exited { .. } | RustMachineError::ExitedBeforeQmp { .. } => {
            "MachineExited"
        }
        RustMachineError::ConnectTimeout { .. } => "ConnectTimeout",
        RustMachineError::Interrupted { .. } => "DriverInterrupted",
        RustMachineError::Shell { .. } | RustMachineError::Command { .. } => "GuestShellError",
        RustMachineError::Qmp {
            source: QmpError::Api { .. },
            ..
        } => "QMPAPIError",
        RustMachineError::Qmp { .. } => "QMPError",
    }
}

/// A machine error as the Python exception of its kind, with the
/// machine's name as an attribute, and the exit status for
/// `MachineExited`, the error's class and description for `QMPAPIError`.
/// Falls back to RuntimeError if the package is not loaded.
fn err(e: RustMachineError) -> PyErr {
    Python::attach(|py| {
        let message = e.to_string();
        let make = || -> PyResult<PyErr> {
            let class = py.import("test_driver.errors")?.getattr(error_class(&e))?;
            let value = class.call1((&message,))?;
            let machine = match &e {
                RustMachineError::Host { machine, .. }
                | RustMachineError::Spawn { machine, .. }
                | RustMachineError::NotRunning { machine, .. }
                | RustMachineError::Exited { machine, .. }
                | RustMachineError::ConnectTimeout { machine, .. }
                | RustMachineError::Interrupted { machine }
                | RustMachineError::Shell { machine, .. }
                | RustMachineError::Command { machine, .. }
                | RustMachineError::ExitedBeforeQmp { machine, .. }
                | RustMachineError::Qmp { machine, .. } => machine,
            };
            value.setattr("machine", machine)?;
            match &e {
                RustMachineError::Exited { status, .. }
                | RustMachineError::ExitedBeforeQmp { status, .. } => {
                    value.setattr("status", status)?;
                }
                RustMachineError::Qmp {
                    source: QmpError::Api { class, desc, .. },
                    ..
                } => {
                    value.setattr("class_name", class)?;
                    value.setattr("description", desc)?;
                }
                _ => {}
            }
            Ok(PyErr::from_value(value))
        };
        make().unwrap_or_else(|_| PyRuntimeError::new_err(message.clone()))
    })
}

/// A Python object as JSON, through Python's own `json` module (what it
/// cannot encode is its TypeError).
fn to_json(value: &Bound<'_, PyAny>) -> PyResult<Value> {
    let text: String = value
        .py()
        .import("json")?
        .call_method1("dumps", (value,))?
        .extract()?;
    serde_json::from_str(&text).map_err(|e| PyTypeError::new_err(e.to_string()))
}

/// JSON as the Python object `json.loads` makes of it.
fn from_json<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?
        .call_method1("loads", (value.to_string(),))
}

fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}

/// The Rust side of one machine, as `_skiff.MachineCore` (the `_core` of
/// a Python `Machine`).
#[pyclass(frozen, name = "MachineCore", module = "_skiff")]
struct MachineCore {
    machine: Machine,
    python_name: String,
}

#[pymethods]
impl MachineCore {
    #[getter]
    fn name(&self) -> &str {
        self.machine.name()
    }

    #[getter]
    fn python_name(&self) -> &str {
        &self.python_name
    }

    #[getter]
    fn pid(&self) -> Option<i32> {
        self.machine.pid()
    }

    /// Whether the machine counts as booted for the script: it runs, and
    /// the script has not set `booted = False` since it started.
    #[getter]
    fn booted(&self) -> bool {
        self.machine.booted()
    }

    /// What the script's `booted = value` sets; see `booted`.
    fn set_booted(&self, value: bool) {
        self.machine.set_booted(value)
    }

    /// Whether skiff-vmm runs (a restart after a guest reboot counts),
    /// whatever the script set `booted` to.
    #[getter]
    fn running(&self) -> bool {
        self.machine.running()
    }

    #[getter]
    fn connected(&self) -> bool {
        self.machine.connected()
    }

    #[getter]
    fn state_dir(&self) -> String {
        self.machine.state_dir().display().to_string()
    }

    /// The VLANs of the machine's network cards, in card order (card k
    /// is eth<k> in the guest, `virtio-net-pci.<k>` for QMP `set_link`).
    #[getter]
    fn vlans(&self) -> Vec<u8> {
        self.machine.vlans()
    }

    /// Whether the machine has a screen, keyboard and tablet (the node's
    /// `display`).
    #[getter]
    fn display(&self) -> bool {
        self.machine.has_display()
    }

    #[getter]
    fn last_exit(&self) -> Option<i32> {
        self.machine.last_exit()
    }

    /// Seconds the shell has spent waiting for the guest.
    #[getter]
    fn guest_wait(&self) -> f64 {
        self.machine.guest_wait().as_secs_f64()
    }

    fn start(&self, py: Python<'_>, allow_reboot: bool) -> PyResult<i32> {
        py.detach(|| self.machine.start(allow_reboot)).map_err(err)
    }

    #[pyo3(signature = (timeout=None))]
    fn connect(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<f64> {
        let t = timeout.map(seconds);
        py.detach(|| self.machine.connect(t)).map_err(err)
    }

    #[pyo3(signature = (command, check_return=true, check_output=true, timeout=None, stream=false))]
    fn execute<'py>(
        &self,
        py: Python<'py>,
        command: &str,
        check_return: bool,
        check_output: bool,
        timeout: Option<u64>,
        stream: bool,
    ) -> PyResult<(i32, Bound<'py, PyBytes>)> {
        let (status, out) = py
            .detach(|| {
                self.machine
                    .execute(command, check_return, check_output, timeout, stream)
            })
            .map_err(err)?;
        Ok((status, PyBytes::new(py, &out)))
    }

    fn send_shell_raw(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        py.detach(|| self.machine.send_shell_raw(data)).map_err(err)
    }

    fn send_console(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        py.detach(|| self.machine.send_console(data)).map_err(err)
    }

    fn disconnect(&self) {
        self.machine.disconnect()
    }

    /// Waits for the VMM to end; None on timeout.
    #[pyo3(signature = (timeout=None))]
    fn wait_exit(&self, py: Python<'_>, timeout: Option<f64>) -> Option<i32> {
        let t = timeout.map(seconds);
        py.detach(|| self.machine.wait_exit(t))
    }

    fn kill(&self) {
        self.machine.signal(libc::SIGKILL)
    }

    /// Saves the running machine as snapshot `name`; returns the seconds
    /// it took.
    fn save_snapshot(&self, py: Python<'_>, name: &str) -> PyResult<f64> {
        py.detach(|| self.machine.save_snapshot(name)).map_err(err)
    }

    /// Replaces the machine's VMM with one restored from snapshot `name`;
    /// returns the seconds until its shell answered.
    fn restore_snapshot(&self, py: Python<'_>, name: &str) -> PyResult<f64> {
        py.detach(|| self.machine.restore_snapshot(name))
            .map_err(err)
    }

    fn release(&self, py: Python<'_>) {
        py.detach(|| self.machine.release())
    }

    /// Runs QMP `command` with `arguments` (a dict, or None) and returns
    /// the reply's "return" value; waits at most `timeout` seconds for it.
    /// An error reply raises QMPAPIError, a failed connection QMPError.
    #[pyo3(signature = (command, arguments=None, timeout=60.0))]
    fn qmp<'py>(
        &self,
        py: Python<'py>,
        command: &str,
        arguments: Option<Bound<'py, PyAny>>,
        timeout: f64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let arguments = match arguments.filter(|a| !a.is_none()) {
            None => None,
            Some(a) => match to_json(&a)? {
                Value::Object(m) => Some(m),
                _ => {
                    return Err(PyTypeError::new_err(format!(
                        "QMP arguments must be a dict, not {}",
                        a.get_type().name()?
                    )))
                }
            },
        };
        let reply = py
            .detach(|| self.machine.qmp(command, arguments, seconds(timeout)))
            .map_err(err)?;
        from_json(py, &reply)
    }

    /// The oldest QMP event since the start not yet taken, as a dict;
    /// waits at most `timeout` seconds for one (None then). Raises
    /// MachineNotRunning when no VMM runs and no event is left.
    fn qmp_event<'py>(&self, py: Python<'py>, timeout: f64) -> PyResult<Option<Bound<'py, PyAny>>> {
        let event = py
            .detach(|| self.machine.qmp_event(seconds(timeout)))
            .map_err(err)?;
        event.map(|e| from_json(py, &Value::Object(e))).transpose()
    }

    /// The oldest serial line not yet taken (None if there is none).
    fn take_console_line(&self) -> Option<String> {
        self.machine.take_console_line()
    }

    fn console_log(&self) -> String {
        self.machine.console_log()
    }

    fn __repr__(&self) -> String {
        format!("<MachineCore '{}'>", self.machine.name())
    }
}

#[pyfunction]
#[pyo3(signature = (msg, machine=None))]
fn log(msg: &str, machine: Option<&str>) {
    logger().log(machine, msg)
}

#[pyfunction]
#[pyo3(signature = (msg, machine=None))]
fn warning(msg: &str, machine: Option<&str>) {
    logger().warning(machine, msg)
}

#[pyfunction]
#[pyo3(signature = (msg, machine=None))]
fn error(msg: &str, machine: Option<&str>) {
    logger().error(machine, msg)
}

#[pyfunction]
#[pyo3(signature = (msg, machine=None))]
fn begin_nested(msg: &str, machine: Option<&str>) {
    logger().begin_nested(machine, msg)
}

#[pyfunction]
#[pyo3(signature = (msg, seconds, machine=None))]
fn end_nested(msg: &str, seconds: f64, machine: Option<&str>) {
    logger().end_nested(machine, msg, seconds)
}

#[pyfunction]
fn subtest_begin(name: &str) {
    logger().subtest_begin(name)
}

#[pyfunction]
#[pyo3(signature = (failure=None))]
fn subtest_end(failure: Option<&str>) {
    logger().subtest_end(failure)
}

#[pyfunction]
fn set_serial_stdout(on: bool) {
    logger().set_serial_stdout(on)
}

#[pyfunction(name = "interrupted")]
fn py_interrupted() -> bool {
    interrupted()
}

/// Builds `_skiff` and registers it in `sys.modules`.
fn skiff_module(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    let m = PyModule::new(py, "_skiff")?;
    m.add_class::<MachineCore>()?;
    m.add_function(wrap_pyfunction!(log, &m)?)?;
    m.add_function(wrap_pyfunction!(warning, &m)?)?;
    m.add_function(wrap_pyfunction!(error, &m)?)?;
    m.add_function(wrap_pyfunction!(begin_nested, &m)?)?;
    m.add_function(wrap_pyfunction!(end_nested, &m)?)?;
    m.add_function(wrap_pyfunction!(subtest_begin, &m)?)?;
    m.add_function(wrap_pyfunction!(subtest_end, &m)?)?;
    m.add_function(wrap_pyfunction!(set_serial_stdout, &m)?)?;
    m.add_function(wrap_pyfunction!(py_interrupted, &m)?)?;
    py.import("sys")?
        .getattr("modules")?
        .set_item("_skiff", &m)?;
    Ok(m)
}

/// The `test_driver` package: (module, file name, source, is a package).
/// Every `.py` file under `test_driver/` is listed; a unit test checks it.
const PACKAGE: &[(&str, &str, &str, bool)] = &[
    (
        "test_driver",
        "test_driver/__init__.py",
        include_str!("test_driver/__init__.py"),
        true,
    ),
    (
        "test_driver.errors",
        "test_driver/errors.py",
        include_str!("test_driver/errors.py"),
        false,
    ),
    (
        "test_driver.logger",
        "test_driver/logger.py",
        include_str!("test_driver/logger.py"),
        false,
    ),
    (
        "test_driver.qmp",
        "test_driver/qmp.py",
        include_str!("test_driver/qmp.py"),
        false,
    ),
    (
        "test_driver.machine",
        "test_driver/machine.py",
        include_str!("test_driver/machine.py"),
        false,
    ),
    (
        "test_driver.vlan",
        "test_driver/vlan.py",
        include_str!("test_driver/vlan.py"),
        false,
    ),
    (
        "test_driver.polling_condition",
        "test_driver/polling_condition.py",
        include_str!("test_driver/polling_condition.py"),
        false,
    ),
    (
        "test_driver.driver",
        "test_driver/driver.py",
        include_str!("test_driver/driver.py"),
        false,
    ),
];

/// Installs the finder that serves [`PACKAGE`]. The file names are not
/// `<...>`, so that `linecache` asks the loader for source lines.
const FINDER_PY: &CStr = c"
import importlib.abc
import importlib.util
import sys


class CompiledInFinder(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    def __init__(self, modules):
        # name -> (file name, source, is a package)
        self.modules = modules

    def find_spec(self, name, path=None, target=None):
        if name not in self.modules:
            return None
        filename, _, is_package = self.modules[name]
        spec = importlib.util.spec_from_loader(
            name, self, origin=filename, is_package=is_package
        )
        # Sets __file__, which tracebacks and scripts may look at.
        spec.has_location = True
        return spec

    def is_package(self, name):
        return self.modules[name][2]

    def get_source(self, name):
        return self.modules[name][1]

    def get_code(self, name):
        filename, source, _ = self.modules[name]
        return compile(source, filename, 'exec', dont_inherit=True)


def install(modules):
    sys.meta_path.insert(0, CompiledInFinder(modules))
";

/// Makes the compiled-in `test_driver` package importable (once per
/// interpreter).
fn install_package(py: Python<'_>) -> PyResult<()> {
    let sys = py.import("sys")?;
    if sys.getattr("modules")?.contains("_skiff_finder")? {
        return Ok(());
    }
    let finder = PyModule::from_code(py, FINDER_PY, c"_skiff_finder.py", c"_skiff_finder")?;
    let modules = PyDict::new(py);
    for (name, file, source, is_package) in PACKAGE {
        modules.set_item(name, (file, source, is_package))?;
    }
    finder.getattr("install")?.call1((modules,))?;
    Ok(())
}

/// Where a script's syntax is wrong.
#[derive(Debug)]
pub struct SyntaxProblem(pub String);

/// Compiles `script` without running it; a syntax error comes back with
/// its line and column.
pub fn check_syntax(script: &str, name: &str) -> Result<(), SyntaxProblem> {
    Python::attach(|py| {
        let builtins = py
            .import("builtins")
            .map_err(|e| SyntaxProblem(e.to_string()))?;
        match builtins
            .getattr("compile")
            .and_then(|c| c.call1((script, name, "exec")))
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let v = e.value(py);
                let get = |a: &str| {
                    v.getattr(a)
                        .ok()
                        .filter(|x| !x.is_none())
                        .map(|x| x.to_string())
                };
                let msg = get("msg").unwrap_or_else(|| e.to_string());
                let line = get("lineno").unwrap_or_else(|| "?".into());
                let col = get("offset").unwrap_or_else(|| "?".into());
                let text = get("text").unwrap_or_default();
                Err(SyntaxProblem(format!(
                    "{name}, line {line}, column {col}: {} : {msg}\n    {}",
                    e.get_type(py)
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|_| "SyntaxError".into()),
                    text.trim_end()
                )))
            }
        }
    })
}

/// What the script run needs.
pub struct RunSpec<'a> {
    pub test_name: &'a str,
    pub script: &'a str,
    pub script_name: &'a str,
    pub out_dir: &'a Path,
    pub state_dir: &'a Path,
    pub interactive: bool,
    /// (machine, pythonized name) in node order.
    pub machines: Vec<(Machine, String)>,
    /// The VLANs with a switch, ascending.
    pub vlans: Vec<Vlan>,
}

/// Runs the test script (or the REPL); returns the exit status.
pub fn run(spec: RunSpec<'_>) -> anyhow::Result<i32> {
    Python::attach(|py| -> anyhow::Result<i32> {
        skiff_module(py)?;
        install_package(py)?;
        let module = py.import("test_driver.driver")?;
        let cores: Vec<Py<MachineCore>> = spec
            .machines
            .into_iter()
            .map(|(machine, python_name)| {
                Py::new(
                    py,
                    MachineCore {
                        machine,
                        python_name,
                    },
                )
            })
            .collect::<PyResult<_>>()?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("test_name", spec.test_name)?;
        kwargs.set_item("script", spec.script)?;
        kwargs.set_item("script_name", spec.script_name)?;
        kwargs.set_item("out_dir", spec.out_dir.display().to_string())?;
        kwargs.set_item("state_dir", spec.state_dir.display().to_string())?;
        kwargs.set_item("interactive", spec.interactive)?;
        kwargs.set_item("cores", cores)?;
        // (number, socket directory, socket) each.
        let vlans: Vec<(u8, String, String)> = spec
            .vlans
            .iter()
            .map(|v| {
                (
                    v.nr,
                    v.socket_dir.display().to_string(),
                    v.socket.display().to_string(),
                )
            })
            .collect();
        kwargs.set_item("vlans", vlans)?;
        let status = module.getattr("main")?.call((), Some(&kwargs));
        flush_std_streams(py);
        let status = status.map_err(|e| {
            e.print(py);
            flush_std_streams(py);
            anyhow::anyhow!("the Python driver failed")
        })?;
        Ok(status.extract()?)
    })
}

/// Flushes Python's sys.stdout and sys.stderr: the embedded interpreter is
/// never finalized, so what a script printed into a pipe or a file would
/// otherwise be lost with their buffers.
fn flush_std_streams(py: Python<'_>) {
    if let Ok(sys) = py.import("sys") {
        for name in ["stdout", "stderr"] {
            if let Ok(stream) = sys.getattr(name) {
                let _ = stream.call_method0("flush");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets the interpreter up once for all tests. Tests run in parallel
    /// threads; the Once is entered without the GIL, so a thread waiting
    /// here does not block the one setting up.
    fn setup() {
        static SETUP: std::sync::Once = std::sync::Once::new();
        SETUP.call_once(|| {
            Python::attach(|py| {
                skiff_module(py).unwrap();
                install_package(py).unwrap();
            })
        });
    }

    /// Every module of the package is compiled in, and nothing else.
    #[test]
    fn package_lists_every_module() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/python/test_driver");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .expect("read test_driver/")
            .filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().into_owned();
                name.ends_with(".py").then(|| format!("test_driver/{name}"))
            })
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = PACKAGE.iter().map(|(_, f, _, _)| f.to_string()).collect();
        listed.sort();
        assert_eq!(on_disk, listed);
        for (name, file, _, is_package) in PACKAGE {
            let expected = if *is_package {
                format!("{}/__init__.py", name.replace('.', "/"))
            } else {
                format!("{}.py", name.replace('.', "/"))
            };
            assert_eq!(*file, expected);
        }
    }

    /// The python3 executable of the interpreter skiff embeds: the one
    /// whose library skiff is linked against (found from inside it), not
    /// whichever python3 comes first on PATH.
    fn embedded_python() -> std::path::PathBuf {
        Python::attach(|py| {
            let sys = py.import("sys").unwrap();
            let get = |name: &str| -> String {
                sys.getattr(name)
                    .and_then(|v| v.str())
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            };
            let (major, minor): (u8, u8) = sys
                .getattr("version_info")
                .and_then(|v| Ok((v.get_item(0)?.extract()?, v.get_item(1)?.extract()?)))
                .unwrap();
            let prefix = Path::new(&get("base_prefix")).join("bin");
            [
                prefix.join(format!("python{major}.{minor}")),
                prefix.join(format!("python{major}")),
                std::path::PathBuf::from(get("executable")),
            ]
            .into_iter()
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "no python{major}.{minor} executable in {}",
                    prefix.display()
                )
            })
        })
    }

    /// The package's Python unit tests (src/python/tests, against a fake
    /// `_skiff`) pass. CI runs only `cargo test`, so they run from here.
    #[test]
    fn python_unit_tests_pass() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/python");
        let python = embedded_python();
        let out = std::process::Command::new(&python)
            // -B: no __pycache__ in the source tree.
            .args(["-B", "-m", "unittest", "discover", "-s", "tests", "-t", "."])
            .current_dir(&dir)
            .env_remove("PYTHONPATH")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{} -m unittest in {} failed:\n{text}",
            python.display(),
            dir.display()
        );
        // An empty discovery also "succeeds".
        assert!(text.contains("\nOK"), "no Python tests ran:\n{text}");
        assert!(
            !text.contains("Ran 0 tests"),
            "no Python tests ran:\n{text}"
        );
    }

    /// The embedded interpreter imports every module of the package from
    /// the compiled-in sources.
    #[test]
    fn package_imports_in_the_embedded_interpreter() {
        setup();
        Python::attach(|py| {
            for (name, file, _, _) in PACKAGE {
                let m = py
                    .import(*name)
                    .unwrap_or_else(|e| panic!("import {name}: {e}"));
                let f: String = m.getattr("__file__").unwrap().extract().unwrap();
                assert_eq!(f, *file);
            }
            let driver = py.import("test_driver.driver").unwrap();
            assert!(driver.hasattr("main").unwrap());
        })
    }

    /// Each kind of machine error reaches Python as its own subclass of
    /// `test_driver.errors.MachineError`, with its text and machine name.
    #[test]
    fn machine_errors_become_their_python_classes() {
        use crate::shell::{ShellError, Stop};
        let m = || "box".to_string();
        let cases = [
            (
                RustMachineError::Host {
                    machine: m(),
                    message: "no room".into(),
                },
                "HostError",
                "box: no room",
            ),
            (
                RustMachineError::NotRunning {
                    machine: m(),
                    what: "the machine is not running",
                },
                "MachineNotRunning",
                "box: the machine is not running",
            ),
            (
                RustMachineError::Exited {
                    machine: m(),
                    status: 1,
                    doing: "waiting".into(),
                    serial: "last".into(),
                },
                "MachineExited",
                "box: skiff-vmm exited with status 1 (",
            ),
            (
                RustMachineError::ConnectTimeout {
                    machine: m(),
                    timeout: Duration::from_secs(20),
                    serial: String::new(),
                    vcpus: String::new(),
                },
                "ConnectTimeout",
                "box: the guest root shell did not come up within 20 s",
            ),
            (
                RustMachineError::Interrupted { machine: m() },
                "DriverInterrupted",
                "box: the driver was interrupted",
            ),
            (
                RustMachineError::Command {
                    machine: m(),
                    command: "true".into(),
                    source: ShellError::Stopped(Stop::Interrupted),
                    vcpus: String::new(),
                },
                "DriverInterrupted",
                "box: running `true`: the driver was interrupted",
            ),
            (
                RustMachineError::Command {
                    machine: m(),
                    command: "true".into(),
                    source: ShellError::Closed,
                    vcpus: String::new(),
                },
                "GuestShellError",
                "box: running `true`: the guest shell closed the connection",
            ),
        ];
        let qmp = |source| RustMachineError::Qmp {
            machine: m(),
            source,
        };
        let cases = cases.into_iter().chain([
            (
                RustMachineError::ExitedBeforeQmp {
                    machine: m(),
                    status: 1,
                    socket: "/run/box/qmp".into(),
                    serial: String::new(),
                },
                "MachineExited",
                "box: skiff-vmm exited before its QMP socket /run/box/qmp came up (status 1,",
            ),
            (
                qmp(QmpError::Api {
                    command: "nope".into(),
                    class: "CommandNotFound".into(),
                    desc: "The command nope has not been found".into(),
                }),
                "QMPAPIError",
                "box: QMP command nope failed: CommandNotFound: The command nope has not been found",
            ),
            (
                qmp(QmpError::Closed {
                    command: "quit".into(),
                    ended: crate::qmp::Ended::Eof,
                }),
                "QMPError",
                "box: QMP command quit got no reply: the VMM closed its QMP socket",
            ),
            (
                qmp(QmpError::Stopped(Stop::Interrupted)),
                "DriverInterrupted",
                "box: the driver was interrupted",
            ),
        ]);
        setup();
        Python::attach(|py| {
            let base = py
                .import("test_driver.errors")
                .unwrap()
                .getattr("MachineError")
                .unwrap();
            for (e, class, text) in cases {
                let e = err(e).into_value(py).into_bound(py);
                let name = e.get_type().name().unwrap().to_string();
                assert_eq!(name, class);
                assert!(e.is_instance(&base).unwrap(), "{class}");
                assert!(e.to_string().starts_with(text), "{e}");
                let machine: String = e.getattr("machine").unwrap().extract().unwrap();
                assert_eq!(machine, "box");
                let attr =
                    |name: &str| -> String { e.getattr(name).unwrap().str().unwrap().to_string() };
                match class {
                    "MachineExited" => assert_eq!(attr("status"), "1"),
                    "QMPAPIError" => {
                        assert_eq!(attr("class_name"), "CommandNotFound");
                        assert_eq!(attr("description"), "The command nope has not been found");
                    }
                    _ => {}
                }
            }
        })
    }

    /// QMP arguments and replies cross the border as Python objects, by
    /// way of JSON.
    #[test]
    fn json_crosses_the_border() {
        setup();
        Python::attach(|py| {
            let v: Value = serde_json::json!({"a": [1, 2.5, null, true], "b": {"c": "d\u{e9}"}});
            let obj = from_json(py, &v).unwrap();
            assert!(obj.is_instance_of::<PyDict>());
            assert_eq!(to_json(&obj).unwrap(), v);
            let unencodable = py.eval(c"object()", None, None).unwrap();
            assert!(to_json(&unencodable)
                .unwrap_err()
                .is_instance_of::<PyTypeError>(py));
        })
    }
}
