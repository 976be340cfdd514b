"""A stand-in for `_skiff`, the Rust module skiff embeds, for unit tests.

It records what the package logs, and `FakeCore` plays one machine's Rust
core: it "runs" commands by looking up scripted results, keeps the
booted/connected state the real core keeps, and records every call, so a
test can check both what a Machine method returns and what it asked the
core to do. Only the methods and attributes the package uses exist here;
a new one used by the package shows up as an AttributeError in the tests.
"""

from typing import Any, Callable, Dict, List, Optional, Tuple, Union


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


class FakeCore:
    """One machine's core. `results` maps a command to (status, stdout) or
    to a function of the command giving them; other commands succeed with
    no output."""

    def __init__(self, name: str, python_name: Optional[str] = None, state_dir: str = "/nonexistent") -> None:
        self.name = name
        self.python_name = python_name or name.replace("-", "_")
        self.state_dir = state_dir
        self.pid: Optional[int] = None
        self.booted = False
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

    # What a test does to the machine.
    def exit(self, status: int) -> None:
        """skiff-vmm ends with `status`."""
        self.booted = False
        self.connected = False
        self.pid = None
        self.last_exit = status

    def serial(self, *lines: str) -> None:
        """The guest prints `lines` on its serial console."""
        self.console_lines.extend(lines)
        self.all_lines.extend(lines)

    def ran(self) -> List[str]:
        """The commands run so far."""
        return [c[0] for c in self.commands]

    # The core's interface, as the package uses it.
    def start(self, allow_reboot: bool) -> int:
        self.calls.append(f"start({allow_reboot})")
        if not self.booted:
            self.starts += 1
            self.booted = True
            self.pid = 1000 + self.starts
            self.console_lines = []
            self.all_lines = []
        assert self.pid is not None
        return self.pid

    def connect(self, timeout: Optional[float] = None) -> float:
        self.calls.append("connect")
        if not self.booted:
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
        if self.booted:
            return None
        return self.last_exit if self.last_exit is not None else 0

    def kill(self) -> None:
        self.calls.append("kill")
        self.exit(137)

    def release(self) -> None:
        self.calls.append("release")
        if self.booted:
            self.exit(137)

    def take_console_lines(self) -> List[str]:
        lines, self.console_lines = self.console_lines, []
        return lines

    def console_log(self) -> str:
        return "\n".join(self.all_lines)


class FakeQMP:
    """Stands in for test_driver.qmp.QMPSession: answers every command with
    an empty return and records it."""

    def __init__(self, path: str, **_: Any) -> None:
        import queue

        self.path = path
        self.sent: List[Tuple[str, Any]] = []
        self.events: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self.closed = False

    def send(self, cmd: str, args: Any = None, timeout: float = 60.0) -> Any:
        self.sent.append((cmd, args))
        if cmd == "human-monitor-command":
            return f"ran {args['command-line']}"
        return {}

    def close(self) -> None:
        self.closed = True


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
