"""A stand-in for `_skiff`, the Rust module skiff embeds, for unit tests.

It records what the package logs, and `FakeCore` plays one machine's Rust
core: it "runs" commands and QMP commands by looking up scripted results,
keeps the state the real core keeps (running, booted as the script set
it, connected, the serial lines not yet taken, the QMP events), and
records every call, so a test can check both what a Machine method
returns and what it asked the core to do. Only the methods and attributes
the package uses exist here; a new one used by the package shows up as an
AttributeError in the tests.
"""

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from test_driver.errors import MachineNotRunning


# (kind, message, machine) of every log call, in order.
events: List[Tuple[str, str, Optional[str]]] = []
interrupt = False
serial_stdout = True


def reset() -> None:
    global interrupt, serial_stdout
    events.clear()
    interrupt = False
    serial_stdout = True


def log(msg: str, machine: Optional[str] = None) -> None:
    events.append(("log", msg, machine))


def warning(msg: str, machine: Optional[str] = None) -> None:
    events.append(("warning", msg, machine))


def error(msg: str, machine: Optional[str] = None) -> None:
    events.append(("error", msg, machine))


def begin_nested(msg: str, machine: Optional[str] = None) -> None:
    events.append(("begin", msg, machine))


def end_nested(msg: str, seconds: float, machine: Optional[str] = None) -> None:
    events.append(("end", msg, machine))


def subtest_begin(name: str) -> None:
    events.append(("subtest", name, None))


def subtest_end(failure: Optional[str] = None) -> None:
    events.append(("subtest_end", failure or "", None))


def set_serial_stdout(on: bool) -> None:
    global serial_stdout
    serial_stdout = on


def interrupted() -> bool:
    return interrupt


def messages(kind: str = "log") -> List[str]:
    """The messages logged with `kind`."""
    return [m for k, m, _ in events if k == kind]


Result = Union[Tuple[int, bytes], Callable[[str], Tuple[int, bytes]]]


def _monitor(args: Optional[Dict[str, Any]]) -> Any:
    assert args is not None
    return f"ran {args['command-line']}"


class FakeCore:
    """One machine's core. `results` maps a command to (status, stdout) or
    to a function of the command giving them; other commands succeed with
    no output. `qmp_results` maps a QMP command to a function of its
    arguments giving the "return" value (or raising); other QMP commands
    return {}."""

    def __init__(
        self,
        name: str,
        python_name: Optional[str] = None,
        state_dir: str = "/nonexistent",
        vlans: Optional[List[int]] = None,
        display: bool = False,
    ) -> None:
        self.name = name
        self.display = display
        self.python_name = python_name or name.replace("-", "_")
        self.state_dir = state_dir
        # The VLANs of its cards, in order (a description's default).
        self.vlans: List[int] = [1] if vlans is None else vlans
        self.pid: Optional[int] = None
        self.running = False
        self.marked_down = False
        self.connected = False
        self.last_exit: Optional[int] = None
        self.results: Dict[str, Result] = {}
        # (command, check_return, check_output, timeout, stream)
        self.commands: List[Tuple[str, bool, bool, Optional[int], bool]] = []
        self.calls: List[str] = []
        self.raw: List[bytes] = []
        self.console: List[bytes] = []
        self.console_lines: List[str] = []
        self.all_lines: List[str] = []
        self.starts = 0
        self.qmp_results: Dict[str, Callable[[Optional[Dict[str, Any]]], Any]] = {
            "human-monitor-command": _monitor
        }
        # (command, arguments, timeout)
        self.qmp_sent: List[Tuple[str, Optional[Dict[str, Any]], float]] = []
        self.events: List[Dict[str, Any]] = []

    # What a test does to the machine.
    def exit(self, status: int) -> None:
        """skiff-vmm ends with `status`."""
        self.running = False
        self.marked_down = False
        self.connected = False
        self.pid = None
        self.last_exit = status

    def event(self, name: str, **data: Any) -> None:
        """skiff-vmm sends the QMP event `name`."""
        event: Dict[str, Any] = {"event": name, "timestamp": {"seconds": 1, "microseconds": 0}}
        if data:
            event["data"] = data
        self.events.append(event)

    def serial(self, *lines: str) -> None:
        """The guest prints `lines` on its serial console."""
        self.console_lines.extend(lines)
        self.all_lines.extend(lines)

    def ran(self) -> List[str]:
        """The commands run so far."""
        return [c[0] for c in self.commands]

    # The core's interface, as the package uses it.
    @property
    def booted(self) -> bool:
        return self.running and not self.marked_down

    def set_booted(self, value: bool) -> None:
        self.marked_down = not value

    def start(self, allow_reboot: bool) -> int:
        self.calls.append(f"start({allow_reboot})")
        if not self.running:
            self.starts += 1
            self.running = True
            self.marked_down = False
            self.pid = 1000 + self.starts
            self.console_lines = []
            self.all_lines = []
            self.events = []
        assert self.pid is not None
        return self.pid

    def connect(self, timeout: Optional[float] = None) -> float:
        self.calls.append("connect")
        if not self.running:
            self.start(False)
        self.connected = True
        return 0.0

    def execute(
        self,
        command: str,
        check_return: bool = True,
        check_output: bool = True,
        timeout: Optional[int] = None,
        stream: bool = False,
    ) -> Tuple[int, bytes]:
        self.connect()
        self.commands.append((command, check_return, check_output, timeout, stream))
        result = self.results.get(command, (0, b""))
        status, out = result(command) if callable(result) else result
        if not check_output:
            return (-2, b"")
        if not check_return:
            return (-1, out)
        return (status, out)

    def send_shell_raw(self, data: bytes) -> None:
        self.connect()
        self.raw.append(data)
        if data == b"poweroff\n":
            self.exit(0)

    def send_console(self, data: bytes) -> None:
        self.console.append(data)

    def disconnect(self) -> None:
        self.calls.append("disconnect")
        self.connected = False

    def wait_exit(self, timeout: Optional[float] = None) -> Optional[int]:
        if self.running:
            return None
        return self.last_exit if self.last_exit is not None else 0

    def kill(self) -> None:
        self.calls.append("kill")
        self.exit(137)

    def release(self) -> None:
        self.calls.append("release")
        if self.running:
            self.exit(137)

    def qmp(self, command: str, arguments: Optional[Dict[str, Any]] = None, timeout: float = 60.0) -> Any:
        if not self.running:
            raise MachineNotRunning(f"{self.name}: the machine is not running")
        self.qmp_sent.append((command, arguments, timeout))
        reply = self.qmp_results.get(command)
        return reply(arguments) if reply is not None else {}

    def qmp_event(self, timeout: float) -> Optional[Dict[str, Any]]:
        if not self.running and not self.events:
            raise MachineNotRunning(f"{self.name}: QMP is not connected")
        return self.events.pop(0) if self.events else None

    def take_console_line(self) -> Optional[str]:
        return self.console_lines.pop(0) if self.console_lines else None

    def console_log(self) -> str:
        return "\n".join(self.all_lines)


class FakeClock:
    """time.monotonic and time.sleep without waiting: sleep moves the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: List[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
