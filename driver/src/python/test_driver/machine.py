"""`Machine`: one node of the test, with the NixOS driver's Machine API.

A Machine is a thin layer over its Rust core (`_skiff`'s machine object):
the core starts and stops skiff-vmm, reads the serial console, connects
the backdoor shell and runs commands on it, and holds the QMP connection;
this class adds the API a test script sees (log blocks, retries, systemd
helpers, file copies). Every command goes through `execute`, which first
checks the driver's polling conditions and the machine's callbacks.

Invariant: the machine's state (running or not, the script's `booted =
False`, the shell, QMP, the serial lines not yet waited for) lives in the
core only; nothing here outlives a method call but configuration.

Also here, as upstream has them here: `retry`, the one-try-per-second
polling helper behind every `wait_*` method, and the duration helpers
that accept seconds or a `datetime.timedelta`.
"""

import base64
import datetime
import io
import os
import re
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import _skiff
from test_driver.errors import (
    DriverInterrupted,
    MachineError,
    MachineExited,
    MachineNotRunning,
    NotSupported,
    RequestedAssertionFailed,
)
from test_driver.logger import Logger, log
from test_driver.qmp import QMPSession

if TYPE_CHECKING:
    import tarfile
    from contextlib import AbstractContextManager

    from test_driver.driver import Driver

Duration = Union[int, float, datetime.timedelta]


def _seconds(value: Optional[Duration], what: str = "timeout") -> Optional[float]:
    """A duration as seconds: int/float, datetime.timedelta or None."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds or a datetime.timedelta, not {value!r}")
    return float(value)


def _guest_timeout(value: Optional[Duration]) -> Optional[int]:
    """The seconds passed to the guest's `timeout` (None: no wrapper)."""
    s = _seconds(value)
    if s is None:
        return None
    return max(1, int(s + 0.999))


def retry(
    fn: Callable[[bool], Any],
    timeout: Duration = 900,
    *,
    timeout_seconds: Optional[Duration] = None,
) -> None:
    """Calls `fn(False)` once a second until it returns a true value; when
    `timeout` seconds (an int, float or timedelta) pass first, calls
    `fn(True)` once more and raises `RequestedAssertionFailed` ("action
    timed out ...") unless that last try succeeds. `timeout_seconds` is the
    2026 spelling of `timeout`. A driver being stopped raises
    `MachineError`."""
    if timeout_seconds is not None:
        timeout = timeout_seconds
    limit = _seconds(timeout)
    assert limit is not None
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if fn(False):
            return
        if _skiff.interrupted():
            raise DriverInterrupted("the driver was interrupted")
        time.sleep(min(1.0, max(0.0, limit - (time.monotonic() - start))))
    if not fn(True):
        raise RequestedAssertionFailed(
            f"action timed out after {time.monotonic() - start:.2f} seconds (timeout={timeout})"
        )


# Characters `send_chars` types, as HMP `sendkey` specs (upstream's table).
CHAR_TO_KEY: Dict[str, str] = {
    **{c: f"shift-{c.lower()}" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"},
    "-": "0x0C", "_": "shift-0x0C", "=": "0x0D", "+": "shift-0x0D",
    "[": "0x1A", "{": "shift-0x1A", "]": "0x1B", "}": "shift-0x1B",
    ";": "0x27", ":": "shift-0x27", "'": "0x28", '"': "shift-0x28",
    "`": "0x29", "~": "shift-0x29", "\\": "0x2B", "|": "shift-0x2B",
    ",": "0x33", "<": "shift-0x33", ".": "0x34", ">": "shift-0x34",
    "/": "0x35", "?": "shift-0x35", " ": "spc", "\n": "ret",
    "!": "shift-0x02", "@": "shift-0x03", "#": "shift-0x04", "$": "shift-0x05",
    "%": "shift-0x06", "^": "shift-0x07", "&": "shift-0x08", "*": "shift-0x09",
    "(": "shift-0x0A", ")": "shift-0x0B",
}


class _NoContext:
    """A context manager that does nothing (a key sent without a log
    block)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _not_here(machine: "Machine", what: str, needs: str) -> NotSupported:
    return NotSupported(f"{machine.name}: {what} needs {needs}, which skiff-vmm does not have yet")


def _command_failed(
    machine: "Machine", command: str, output: str, message: str
) -> RequestedAssertionFailed:
    """The error of a failed `succeed`/`fail`: the driver's report shows
    its machine, command and output."""
    e = RequestedAssertionFailed(message)
    e.machine = machine.name  # type: ignore[attr-defined]
    e.command = command  # type: ignore[attr-defined]
    e.output = output  # type: ignore[attr-defined]
    return e


def _extract(tar: "tarfile.TarFile", dest: str) -> None:
    """Extracts a guest-made archive; nothing may land outside dest."""
    import tarfile

    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = os.path.realpath(dest)
    for member in tar.getmembers():
        target = os.path.realpath(os.path.join(dest, member.name))
        if os.path.commonpath([root, target]) != root or member.isdev():
            raise MachineError(f"refusing to extract {member.name!r} from the guest's archive")
        if (member.issym() or member.islnk()) and os.path.isabs(member.linkname):
            raise MachineError(f"refusing to extract the absolute link {member.name!r}")
    tar.extractall(dest)


class Machine:
    """A VM of the test, with the NixOS driver's Machine API.

    `core` is the Rust side of the machine (process, console, shell,
    QMP); `driver` supplies the output and state directories and the
    polling conditions.
    """

    def __init__(self, core: Any, driver: "Driver") -> None:
        self._core = core
        self._driver = driver
        self.name: str = core.name
        self.out_dir: str = driver.out_dir
        self.state_dir: str = core.state_dir
        self.shared_dir = os.path.join(driver.state_dir, "shared-xchg")
        self.logger: Logger = log
        self.callbacks: List[Callable[[], None]] = []
        self.keep_vm_state: bool = driver.keep_state
        self.keep_machine_state: bool = driver.keep_state
        self.start_command: Optional[str] = None
        self.monitor: Optional[Any] = None
        # Stateless: it sends through the core, to whichever VMM runs.
        self.qmp_client = QMPSession(core)
        self.process: Optional[Any] = None
        self.allow_reboot = False

    def __repr__(self) -> str:
        return f"<Machine '{self.name}'>"

    # -- state ---------------------------------------------------------
    @property
    def booted(self) -> bool:
        """Whether skiff-vmm runs for this machine (a restart after a guest
        reboot counts as running). A script may set it to False, as
        systemd-shutdown style tests do, to skip the final `sync`; that
        holds until the machine is started again or skiff-vmm exits."""
        return bool(self._core.booted)

    @booted.setter
    def booted(self, value: bool) -> None:
        self._core.set_booted(bool(value))

    @property
    def connected(self) -> bool:
        """Whether the backdoor shell of the running VMM is connected."""
        return bool(self._core.connected)

    @property
    def pid(self) -> Optional[int]:
        """skiff-vmm's pid while it runs."""
        return self._core.pid

    @property
    def shell(self) -> Optional[Any]:
        """Something true while the backdoor shell is connected."""
        return self._core if self._core.connected else None

    @property
    def full_console_log(self) -> str:
        """The serial console since the last start."""
        return self._core.console_log()

    def is_up(self) -> bool:
        """Whether the machine is booted and its shell connected."""
        return self.booted and self.connected

    def log(self, msg: str) -> None:
        """Logs `msg`, attributed to this machine."""
        log.log(msg, {"machine": self.name})

    def nested(self, msg: str, attrs: Dict[str, str] = {}) -> "AbstractContextManager[None]":
        """A log block attributed to this machine (plus `attrs`)."""
        attrs = dict(attrs)
        attrs["machine"] = self.name
        return log.nested(msg, attrs)

    def run_callbacks(self) -> None:
        """Runs the machine's callbacks (before every command)."""
        for cb in self.callbacks:
            cb()

    # -- lifecycle -----------------------------------------------------
    def start(self, allow_reboot: bool = False) -> None:
        """Starts skiff-vmm unless it runs, and returns once its QMP socket
        answers; it does not wait for the guest (the first command does).
        Without `allow_reboot`, a guest reboot ends the VM, as QEMU's
        `-no-reboot` does; with it, skiff-vmm is started again (and QMP
        reconnected)."""
        if self._core.running:
            return
        self.allow_reboot = allow_reboot
        self.log("starting vm")
        self._core.start(allow_reboot)

    def connect(self) -> None:
        """Waits until the guest's backdoor root shell is up (starting the
        machine if needed). Every command connects this way first."""
        if self.connected:
            return
        self._core.connect()

    def wait_for_shutdown(self) -> None:
        """Waits, without a timeout, until skiff-vmm exits (the guest
        powered off, crashed, or rebooted without `allow_reboot`). A line
        every 15 s says it still waits. The exit counts as seen: the next
        command starts the machine again (one nobody waited for fails it)."""
        if not self._core.running:
            self._core.wait_exit(0.0)
            return
        with self.nested("waiting for the VM to power off"):
            start = time.monotonic()
            while self._core.wait_exit(15.0) is None:
                if _skiff.interrupted():
                    raise DriverInterrupted("the driver was interrupted")
                self.log(f"waiting for the VM to power off ({time.monotonic() - start:.0f}s)")

    def shutdown(self) -> None:
        """Powers the guest off (`poweroff` on the backdoor shell) and waits
        for skiff-vmm to exit. Does nothing if the machine is not running."""
        if not self._core.running:
            return
        self._core.send_shell_raw(b"poweroff\n")
        self.wait_for_shutdown()

    def crash(self) -> None:
        """Stops the VM at once, as pulling the plug would (QMP `quit`, or
        SIGKILL if QMP fails), and waits for skiff-vmm to exit."""
        if not self._core.running:
            return
        self.log("forced crash")
        try:
            self.qmp_client.send("quit")
        except MachineError as e:
            self.log(f"QMP quit failed ({e}); killing skiff-vmm")
            self._core.kill()
        self.wait_for_shutdown()

    def snapshot(self, name: str) -> None:
        """Beyond upstream: saves the running machine as snapshot `name`
        (skiff-vmm's QMP `migrate` to a file in the machine's state
        directory; an earlier snapshot of that name is replaced) and lets
        it run on. `restore(name)` brings the machine back to this instant,
        e.g. to start each subtest from the same state. The machine's disks
        must be overlays or read-only."""
        with self.nested(f"saving snapshot {name!r}"):
            self._core.save_snapshot(name)

    def restore(self, name: str) -> None:
        """Beyond upstream: ends the running skiff-vmm (as `crash()` would)
        and starts one restored from snapshot `name`: memory, devices and
        overlay disks as they were when `snapshot(name)` saved them, with a
        new VM generation id (the guest reseeds its RNG) and the guest's
        clock set to the host's. Returns once the guest's shell answers.
        Network cards reconnect to their switches; peers see the link as it
        was at the save."""
        with self.nested(f"restoring snapshot {name!r}"):
            self._core.restore_snapshot(name)

    def reboot(self) -> None:
        """Reboots the guest (it must have been started with
        allow_reboot=True, else skiff-vmm exits as QEMU does with
        -no-reboot). Writable overlay disks start over after the reboot.
        The next command waits for the new boot's shell."""
        self.execute("systemctl reboot 2>/dev/null || reboot", check_return=False, check_output=False)
        self._core.disconnect()

    def release(self) -> None:
        """Kills skiff-vmm and closes QMP; the driver calls this at the end
        of the run."""
        self._core.release()

    # -- commands ------------------------------------------------------
    def _run_polling_conditions(self) -> None:
        self._driver.run_polling_conditions()

    def execute(
        self,
        command: str,
        check_return: bool = True,
        check_output: bool = True,
        timeout: Optional[Duration] = 900,
        *,
        stream: bool = False,
    ) -> Tuple[int, str]:
        """Runs `command` in the guest under bash with `set -euo pipefail`
        and returns `(status, stdout)`, stdout decoded as UTF-8.

        The command runs under the guest's `timeout` (seconds or a
        timedelta; None: no limit), so one that takes too long ends with
        status 124. The call waits until the command's stdout is closed: a
        background process that keeps it open keeps the call waiting (skiff
        warns after 10 s). Stderr goes to the serial console.

        `check_return=False` does not ask for the status and returns
        `(-1, stdout)`; `check_output=False` reads nothing and returns
        `(-2, "")` at once (for commands that end the shell, such as
        `poweroff`). `stream=True` logs the output while it arrives.
        Polling conditions and callbacks run first, and the machine is
        started and connected if it is not.
        """
        self._run_polling_conditions()
        self.run_callbacks()
        # The core connects (starting the machine if needed) itself: one
        # connect, in one place.
        status, out = self._core.execute(
            command, bool(check_return), bool(check_output), _guest_timeout(timeout), bool(stream)
        )
        if not check_output:
            return (-2, "")
        if not check_return:
            return (-1, out.decode())
        return (status, out.decode(errors="replace"))

    def succeed(self, *commands: str, timeout: Optional[Duration] = None) -> str:
        """Runs each command in turn and returns their stdouts joined. A
        non-zero status logs the output and raises
        `RequestedAssertionFailed` ("command `...` failed (exit code N)"),
        carrying `machine`, `command` and `output`. Unlike `execute`, there
        is no timeout unless `timeout` is given."""
        output = ""
        for command in commands:
            with self.nested(f"must succeed: {command}"):
                status, out = self.execute(command, timeout=timeout)
                if status != 0:
                    self.log(f"output: {out}")
                    raise _command_failed(
                        self, command, out, f"command `{command}` failed (exit code {status})"
                    )
                output += out
        return output

    def fail(self, *commands: str, timeout: Optional[Duration] = None) -> str:
        """Like `succeed`, but each command must fail: a zero status raises
        `RequestedAssertionFailed` ("command `...` unexpectedly
        succeeded"). Returns the stdouts joined."""
        output = ""
        for command in commands:
            with self.nested(f"must fail: {command}"):
                status, out = self.execute(command, timeout=timeout)
                if status == 0:
                    raise _command_failed(self, command, out, f"command `{command}` unexpectedly succeeded")
                output += out
        return output

    def _wait_until(
        self,
        command: str,
        timeout: Duration,
        attempt_timeout: Optional[Duration],
        want_success: bool,
    ) -> str:
        output = ""
        budget = attempt_timeout if attempt_timeout is not None else timeout

        def check(_last_try: bool) -> bool:
            nonlocal output
            status, output = self.execute(command, timeout=budget)
            return (status == 0) == want_success

        verb = "success" if want_success else "failure"
        with self.nested(f"waiting for {verb}: {command}"):
            retry(check, timeout)
            return output

    def wait_until_succeeds(
        self, command: str, timeout: Duration = 900, *, attempt_timeout: Optional[Duration] = None
    ) -> str:
        """Runs `command` once a second until it succeeds and returns its
        stdout; raises `RequestedAssertionFailed` ("action timed out ...")
        after `timeout` seconds. Each try runs under the guest's `timeout`
        with the whole budget, or `attempt_timeout` if given."""
        return self._wait_until(command, timeout, attempt_timeout, True)

    def wait_until_fails(
        self, command: str, timeout: Duration = 900, *, attempt_timeout: Optional[Duration] = None
    ) -> str:
        """Like `wait_until_succeeds`, but repeats the command until it
        fails."""
        return self._wait_until(command, timeout, attempt_timeout, False)

    def sleep(self, secs: Duration) -> None:
        """Sleeps `secs` seconds in guest time (`sleep` in the guest)."""
        self.succeed(f"sleep {_seconds(secs, 'secs'):g}")

    # -- systemd -------------------------------------------------------
    def systemctl(self, q: str, user: Optional[str] = None) -> Tuple[int, str]:
        """Runs `systemctl q` and returns `(status, stdout)`; with `user`,
        runs `systemctl --user q` in that user's login session."""
        if user is not None:
            q = q.replace("'", "\\'")
            return self.execute(
                f"su -l {user} --shell /bin/sh -c "
                "$'XDG_RUNTIME_DIR=/run/user/`id -u` "
                f"systemctl --user {q}'"
            )
        return self.execute(f"systemctl {q}")

    def start_job(self, jobname: str, user: Optional[str] = None) -> Tuple[int, str]:
        """`systemctl start jobname`; returns `(status, stdout)` and does
        not raise."""
        return self.systemctl(f"start {jobname}", user)

    def stop_job(self, jobname: str, user: Optional[str] = None) -> Tuple[int, str]:
        """`systemctl stop jobname`; returns `(status, stdout)` and does
        not raise."""
        return self.systemctl(f"stop {jobname}", user)

    def get_unit_info(self, unit: str, user: Optional[str] = None) -> Dict[str, str]:
        """The unit's properties, as `systemctl show` lists them, as a
        dict. A failing `systemctl` raises `RequestedAssertionFailed`."""
        status, lines = self.systemctl(f'--no-pager show "{unit}"', user)
        if status != 0:
            under = f' under user "{user}"' if user is not None else ""
            raise RequestedAssertionFailed(
                f'retrieving systemctl info for unit "{unit}"{under} failed with exit code {status}'
            )
        info = {}
        for line in lines.split("\n"):
            m = re.match(r"^([^=]+)=(.*)$", line)
            if m:
                info[m.group(1)] = m.group(2)
        return info

    def get_unit_property(self, unit: str, property: str, user: Optional[str] = None) -> str:
        """The value of one property of the unit (`systemctl show
        --property`). A failing `systemctl`, or output that is not
        `property=value`, raises `RequestedAssertionFailed`."""
        status, lines = self.systemctl(f'--no-pager show "{unit}" --property="{property}"', user)
        if status != 0:
            under = f' under user "{user}"' if user is not None else ""
            raise RequestedAssertionFailed(
                f'retrieving systemctl property "{property}" for unit "{unit}"{under} failed with exit code {status}'
            )
        invalid = f'systemctl show output for unit "{unit}" property "{property}" is not of the form "{property}=value": {lines!r}'
        m = re.match(r"^([^=]+)=(.*)$", lines.rstrip("\n"))
        if not m or m.group(1) != property:
            raise RequestedAssertionFailed(invalid)
        return m.group(2)

    def require_unit_state(self, unit: str, require_state: str = "active") -> None:
        """Checks once that the unit's ActiveState is `require_state`;
        raises `RequestedAssertionFailed` if not."""
        with self.nested(f"checking if unit '{unit}' has reached state '{require_state}'"):
            state = self.get_unit_property(unit, "ActiveState")
            if state != require_state:
                raise RequestedAssertionFailed(
                    f"Expected unit '{unit}' to to be in state '{require_state}' but it is in state '{state}'"
                )

    def wait_for_unit(self, unit: str, user: Optional[str] = None, timeout: Duration = 900) -> None:
        """Waits until the unit is active. Raises at once when it reaches
        "failed", or is inactive with no job pending, and after `timeout`
        seconds otherwise."""

        def check_active(_last_try: bool) -> bool:
            state = self.get_unit_property(unit, "ActiveState", user)
            if state == "failed":
                raise RequestedAssertionFailed(f'unit "{unit}" reached state "{state}"')
            if state == "inactive":
                status, jobs = self.systemctl("list-jobs --full 2>&1", user)
                if "No jobs" in jobs:
                    info = self.get_unit_info(unit, user)
                    if info["ActiveState"] == state:
                        raise RequestedAssertionFailed(
                            f'unit "{unit}" is inactive and there are no pending jobs'
                        )
            return state == "active"

        with_user = f" with user {user}" if user is not None else ""
        with self.nested(f"waiting for unit {unit}{with_user}"):
            retry(check_active, timeout)

    wait_for_job = wait_for_unit

    # -- waiting on guest state ---------------------------------------
    def wait_for_file(self, filename: str, timeout: Duration = 900) -> None:
        """Waits until `filename` exists in the guest (`test -e`; the name
        is not quoted)."""

        def check(_last_try: bool) -> bool:
            status, _ = self.execute(f"test -e {filename}")
            return status == 0

        with self.nested(f"waiting for file '{filename}'"):
            retry(check, timeout)

    def wait_for_open_port(self, port: int, addr: str = "localhost", timeout: Duration = 900) -> None:
        """Waits until something listens on TCP `port` at `addr` in the
        guest (`nc -z`)."""

        def check(_last_try: bool) -> bool:
            status, _ = self.execute(f"nc -z {addr} {port}")
            return status == 0

        with self.nested(f"waiting for TCP port {port} on {addr}"):
            retry(check, timeout)

    def wait_for_closed_port(self, port: int, addr: str = "localhost", timeout: Duration = 900) -> None:
        """Waits until nothing listens on TCP `port` at `addr` in the
        guest."""

        def check(_last_try: bool) -> bool:
            status, _ = self.execute(f"nc -z {addr} {port}")
            return status != 0

        with self.nested(f"waiting for TCP port {port} on {addr} to be closed"):
            retry(check, timeout)

    def wait_for_open_unix_socket(self, addr: str, is_datagram: bool = False, timeout: Duration = 900) -> None:
        """Waits until something listens on the UNIX socket `addr` in the
        guest (a datagram socket with `is_datagram`)."""
        flags = "-uU" if is_datagram else "-U"

        def check(_last_try: bool) -> bool:
            status, _ = self.execute(f"nc -z {flags} {addr}")
            return status == 0

        with self.nested(f"waiting for UNIX socket {addr}"):
            retry(check, timeout)

    def get_console_log(self) -> str:
        """The serial console since the last start, lines joined by
        newlines."""
        return self._core.console_log()

    def wait_for_console_text(self, regex: str, timeout: Optional[Duration] = None) -> None:
        """Waits until `regex` matches the serial console lines this call
        takes, joined without separators. The lines come from a queue that
        starts empty at each start and that only this method drains, so
        text printed before the call counts unless an earlier call took
        it; lines after the matching one stay for the next call. Without
        `timeout` it waits until the VM exits."""
        limit = _seconds(timeout)
        with self.nested(f"waiting for {regex} to appear on console"):
            console = ""
            start = time.monotonic()
            last_report = start
            while True:
                # Read before taking: lines printed before an exit count.
                exited = not self._core.running
                line = self._core.take_console_line()
                if line is not None:
                    console += line
                    if re.search(regex, console):
                        return
                    continue
                now = time.monotonic()
                if limit is not None and now - start >= limit:
                    raise RequestedAssertionFailed(
                        f"action timed out after {now - start:.2f} seconds (timeout={timeout})"
                    )
                if _skiff.interrupted():
                    raise DriverInterrupted("the driver was interrupted")
                if exited:
                    raise MachineExited(
                        f"{self.name}: the VM exited (status {self._core.last_exit}) "
                        f"while waiting for {regex!r} on the console"
                    )
                if now - last_report >= 15:
                    last_report = now
                    self.log(f"waiting for {regex!r} on the console ({now - start:.0f}s)")
                time.sleep(0.05)

    def wait_for_qmp_event(
        self, event_filter: Callable[[Dict[str, Any]], bool], timeout: Duration = 600
    ) -> Dict[str, Any]:
        """The first QMP event (since the machine started, across reboot
        restarts) for which event_filter(event) is true; other events are
        dropped. Raises `RequestedAssertionFailed` after `timeout` seconds,
        `RuntimeError` if QMP is not connected (the machine does not run
        and no event is left), `MachineExited` if skiff-vmm exits while
        no event is left."""
        limit = _seconds(timeout)
        assert limit is not None
        start = time.monotonic()
        while True:
            left = max(0.0, limit - (time.monotonic() - start))
            try:
                event = self._core.qmp_event(left)
            except MachineNotRunning as e:
                raise RuntimeError("QMP is not connected") from e
            if event is None:
                raise RequestedAssertionFailed(
                    f"action timed out after {time.monotonic() - start:.2f} seconds (timeout={timeout})"
                )
            if event_filter(event):
                return event

    # -- files ---------------------------------------------------------
    def _push_bytes(self, data: bytes, guest_cmd: str) -> None:
        """Sends `data` to the guest in pieces and feeds it to `guest_cmd`
        (which reads stdin). The pieces stay under the kernel's limit for
        one argument."""
        tmp = "/tmp/.skiff-xfer-" + str(os.getpid())
        self.succeed(f"rm -f {tmp}; : > {tmp}")
        enc = base64.b64encode(data).decode()
        step = 96 * 1024
        for i in range(0, len(enc), step):
            self.succeed(f"printf %s {enc[i:i + step]} >> {tmp}")
        self.succeed(f"base64 -d < {tmp} | {guest_cmd}; rm -f {tmp}")

    def copy_from_host_via_shell(self, source: str, target: str) -> None:
        """Copies the host file `source` to `target` in the guest, through
        the shell as base64."""
        with open(source, "rb") as f:
            data = f.read()
        self.succeed("mkdir -p $(dirname " + shlex.quote(target) + ")")
        self._push_bytes(data, "cat > " + shlex.quote(target))

    def copy_from_host(self, source: Union[str, "os.PathLike[str]"], target: str) -> None:
        """Copies a host file or directory into the guest as `cp -r` would
        (through the shell: skiff guests have no shared folder). Mode bits
        are kept; the owner becomes root."""
        source = os.fspath(source)
        if not os.path.exists(source):
            raise MachineError(f"{self.name}: copy_from_host: {source} does not exist")
        name = os.path.basename(os.path.normpath(source))

        import tarfile

        def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            return info

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(source, arcname=name, filter=as_root)
        tmp = "/tmp/.skiff-copy-" + str(os.getpid())
        q = shlex.quote(target)
        self.succeed(f"rm -rf {tmp}; mkdir -p {tmp} $(dirname {q})")
        self._push_bytes(buf.getvalue(), f"tar -xzf - -C {tmp}")
        self.succeed(f"cp -r {tmp}/{shlex.quote(name)} {q}; rm -rf {tmp}")

    def copy_from_machine(self, source: str, target_dir: str = "") -> None:
        """Copies a guest file or directory to <out_dir>/<target_dir>/."""
        src = source.rstrip("/") or "/"
        status, data = self._core.execute(
            "tar -czf - -C " + shlex.quote(os.path.dirname(src) or "/") + " " + shlex.quote(os.path.basename(src)),
            True,
            True,
            None,
            False,
        )
        if status != 0:
            raise RequestedAssertionFailed(f"copying {source} from the VM failed (exit code {status})")
        dest = os.path.abspath(os.path.join(self.out_dir, target_dir))
        os.makedirs(dest, exist_ok=True)
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            _extract(tar, dest)

    copy_from_vm = copy_from_machine

    # -- console and interaction --------------------------------------
    def send_console(self, chars: Union[str, bytes]) -> None:
        """Writes `chars` to the guest's serial console input."""
        self._core.send_console(chars.encode() if isinstance(chars, str) else bytes(chars))

    def console_interact(self) -> None:
        """Connects the terminal's stdin to the serial console until
        Ctrl-D (guest output shows in the log)."""
        self.log("Terminal is ready (there is no initial prompt); press Ctrl-D to stop")
        while True:
            chunk = sys.stdin.buffer.read1(1) if hasattr(sys.stdin.buffer, "read1") else sys.stdin.buffer.read(1)
            if not chunk or chunk == b"\x04":
                return
            self.send_console(chunk)

    def shell_interact(self, address: Optional[str] = None) -> None:
        """A simple line shell on the backdoor: each line runs as a command."""
        self.connect()
        self.log("Terminal is ready: each line runs in the guest; Ctrl-D ends")
        for line in sys.stdin:
            status, out = self.execute(line.rstrip("\n"))
            sys.stdout.write(out)
            if status != 0:
                sys.stdout.write(f"(exit code {status})\n")
            sys.stdout.flush()

    # -- monitor, network, and what skiff-vmm cannot do yet -----------
    def send_monitor_command(self, command: str) -> str:
        """Runs a human monitor (HMP) command through QMP's
        human-monitor-command and returns its output."""
        self._run_polling_conditions()
        with self.nested(f"sending monitor command: {command}"):
            return self.qmp_client.send("human-monitor-command", {"command-line": command})

    def _set_first_link(self, what: str, up: bool) -> None:
        """QMP `set_link` on the first VLAN card (`virtio-net-pci.1`,
        eth1 in the guest), as upstream's HMP `set_link` does."""
        if not self._core.vlans:
            raise MachineError(f'{self.name}: {what} needs a VLAN network card, and the node\'s "vlans" is empty')
        self._run_polling_conditions()
        state = "on" if up else "off"
        with self.nested(f"{what}: set_link virtio-net-pci.1 {state}"):
            self.qmp_client.send("set_link", {"name": "virtio-net-pci.1", "up": up})

    def block(self) -> None:
        """Unplugs the machine's cable: takes its first VLAN card (eth1)
        down. The driver's own connection to the guest does not use the
        network, so commands still run."""
        self._set_first_link("block()", False)

    def unblock(self) -> None:
        """Undoes `block()`: brings the first VLAN card (eth1) back up."""
        self._set_first_link("unblock()", True)

    def forward_port(self, host_port: int = 8080, guest_port: int = 80) -> None:
        """Not available: skiff-vmm has no user-mode network card yet."""
        raise _not_here(self, "forward_port()", "a user-mode NIC")

    # -- screen and keyboard ------------------------------------------
    def _needs_display(self, what: str) -> None:
        if not self._core.display:
            raise NotSupported(
                f'{self.name}: {what} needs a display: give the node "display": true '
                "(a virtio-gpu screen, a keyboard and a tablet)"
            )

    def _hmp(self, command: str, log: bool = True) -> None:
        """Runs an HMP command whose success prints nothing; its output is
        its error, raised naming the machine and the command. Without
        `log`, no log block of its own (one per typed key is noise)."""
        if log:
            out = self.send_monitor_command(command)
        else:
            self._run_polling_conditions()
            out = self.qmp_client.send("human-monitor-command", {"command-line": command})
        if out.strip():
            raise MachineError(f"{self.name}: `{command}` failed: {out.strip()}")

    def screenshot(self, filename: str) -> None:
        """Saves the screen as a PNG: `filename` (".png" added when it has
        no extension) in the output directory unless it names a directory.
        skiff-vmm writes the PNG itself (upstream converts a PPM with
        pnmtopng)."""
        self._needs_display("screenshot()")
        if "." not in filename:
            filename += ".png"
        if "/" not in filename:
            filename = os.path.join(self.out_dir, filename)
        with self.nested(f"making screenshot {filename}", {"image": os.path.basename(filename)}):
            self._run_polling_conditions()
            self.qmp_client.send("screendump", {"filename": os.path.abspath(filename), "format": "png"})

    def _vt_text(self) -> Optional[str]:
        """The exact text of the VT on the screen (from /dev/vcsN, folded
        at its width, blanks kept as upstream's `get_tty_text` keeps
        them), or None when a graphical session (X11 or Wayland) may own
        the screen."""
        status, out = self.execute(
            "for s in /tmp/.X11-unix/X* /run/user/*/wayland-*; do [ ! -e \"$s\" ] || exit 3; done; "
            "t=$(cat /sys/class/tty/tty0/active) && n=${t#tty} && "
            "set -- $(od -An -tu1 -N2 /dev/vcsa$n) && fold -w \"$2\" /dev/vcs$n",
            check_output=True,
        )
        if status == 3:
            return None
        if status != 0:
            raise MachineError(f"{self.name}: cannot read the text of the VT on the screen: {out.strip()}")
        return out

    def _ocr(self, variants: bool) -> Iterator[str]:
        """OCR of a screenshot with tesseract, as upstream does it; Debian's
        tesseract has no legacy engine, so only the LSTM model (--oem 1)
        runs, on the picture and, for the variants, on its negative. The
        variants come one at a time, from one screenshot: a caller that has
        what it looks for stops before the next OCR run."""
        import shutil
        import subprocess
        import tempfile

        if shutil.which("tesseract") is None:
            raise MachineError(
                f"{self.name}: reading text off a graphical screen needs tesseract (Debian: apt install tesseract-ocr)"
            )
        # ImageMagick's converter: 7's `magick`, Debian's own name for 6's
        # (not shadowed by another `convert` earlier in PATH), or `convert`.
        convert = next((t for t in ("magick", "convert-im6.q16", "convert") if shutil.which(t)), None)
        if convert is None:
            raise MachineError(
                f"{self.name}: reading text off a graphical screen needs ImageMagick's convert (Debian: apt install imagemagick)"
            )
        with tempfile.TemporaryDirectory(prefix="skiff-ocr-") as tmp:
            png = os.path.join(tmp, "screen.png")
            self.qmp_client.send("screendump", {"filename": png, "format": "png"})
            for negate in ((False, True) if variants else (False,)):
                tiff = os.path.join(tmp, f"screen-{int(negate)}.tiff")
                magick = ["-filter", "Catrom", "-density", "72", "-resample", "300", "-contrast", "-normalize",
                          "-despeckle", "-type", "grayscale", "-sharpen", "1", "-posterize", "3"]
                magick += ["-negate"] if negate else []
                magick += ["-gamma", "100", "-blur", "1x65535"]
                r = subprocess.run([convert, *magick, png, f"tiff:{tiff}"], capture_output=True)
                if r.returncode != 0:
                    raise MachineError(f"{self.name}: convert failed: {r.stderr.decode(errors='replace')}")
                r = subprocess.run(["tesseract", tiff, "-", "-c", "debug_file=/dev/null", "--psm", "11", "--oem", "1"],
                                   capture_output=True)
                if r.returncode != 0:
                    raise MachineError(f"{self.name}: tesseract failed: {r.stderr.decode(errors='replace')}")
                yield r.stdout.decode("utf-8", errors="replace")

    def _screen_texts(self, variants: bool, source: str, say: bool = True) -> Iterator[str]:
        """The screen's text variants, one at a time; `say` logs where
        they come from."""
        if source not in ("auto", "vt", "ocr"):
            raise ValueError(f"source must be 'auto', 'vt' or 'ocr', not {source!r}")
        if source != "ocr":
            text = self._vt_text()
            if text is not None:
                if say:
                    self.log("screen text read from the VT (/dev/vcs), exactly")
                yield text
                return
            if source == "vt":
                raise MachineError(f"{self.name}: a graphical session owns the screen: there is no VT text to read")
        if say:
            self.log("screen text read by OCR (tesseract)")
        yield from self._ocr(variants)

    def _screen_text(self, variants: bool, source: str, say: bool = True) -> List[str]:
        """The screen's text variants; `say` logs where they came from."""
        return list(self._screen_texts(variants, source, say))

    def get_screen_text_variants(self, source: str = "auto") -> List[str]:
        """The text on the screen. Beyond upstream: while a VT is on the
        screen (no X11 or Wayland session), its exact text from /dev/vcs,
        as the one variant; otherwise OCR variants (tesseract's LSTM model
        on the screenshot and on its negative). `source` forces "vt" or
        "ocr". The log says which was used."""
        self._needs_display("get_screen_text_variants()")
        with self.nested("getting screen text variants"):
            return self._screen_text(True, source)

    def get_screen_text(self, source: str = "auto") -> str:
        """The text on the screen: see `get_screen_text_variants`."""
        self._needs_display("get_screen_text()")
        with self.nested("getting screen text"):
            return self._screen_text(False, source)[0]

    def wait_for_text(self, regex: str, timeout: Duration = 900) -> None:
        """Waits until `regex` matches the text on the screen (see
        `get_screen_text_variants`)."""
        self._needs_display("wait_for_text()")
        pattern = re.compile(regex)

        tries = [0]

        def check(last_try: bool) -> bool:
            # Where the text comes from is said on the first try and the
            # last. The variants are read one by one, up to the first that
            # matches (each OCR run takes seconds).
            texts = self._screen_texts(True, "auto", say=tries[0] == 0 or last_try)
            tries[0] += 1
            first = None
            for text in texts:
                if pattern.search(text):
                    texts.close()
                    return True
                first = text if first is None else first
            if last_try:
                self.log(f"Last chance to match /{regex}/ on the screen, which currently contains: {first!r}")
            return False

        with self.nested(f"waiting for {regex} to appear on screen"):
            retry(check, timeout)

    def send_key(self, key: str, delay: Optional[float] = 0.01, log: bool = True) -> None:
        """Presses and releases `key`: a character of upstream's table
        (`A`, `!`, `\n`) or a QEMU key spec (`ctrl-alt-delete`, `alt-f2`),
        then sleeps `delay` seconds. An unknown key raises, naming it."""
        self._needs_display("send_key()")
        key = CHAR_TO_KEY.get(key, key)
        context = self.nested(f"sending key {key!r}") if log else _NoContext()
        with context:
            self._hmp(f"sendkey {key}", log)
            if delay is not None:
                time.sleep(delay)

    def send_chars(self, chars: str, delay: Optional[float] = 0.01) -> None:
        """Types `chars`, one `send_key` each. Every key reaches the guest,
        in order, however small `delay` is (skiff-vmm queues them)."""
        self._needs_display("send_chars()")
        with self.nested(f"sending keys {chars!r}"):
            for char in chars:
                self.send_key(char, delay, log=False)

    # -- virtual consoles and X (plain shell commands) -----------------
    def get_tty_text(self, tty: str) -> str:
        """The text on virtual console `tty` (from /dev/vcsN)."""
        status, output = self.execute(
            f"fold -w$(stty -F /dev/tty{tty} size | awk '{{print $2}}') /dev/vcs{tty}"
        )
        return output

    def wait_until_tty_matches(self, tty: str, regexp: str, timeout: Duration = 900) -> None:
        """Waits until `regexp` matches the text on virtual console `tty`."""
        matcher = re.compile(regexp)

        def check(last_try: bool) -> bool:
            text = self.get_tty_text(tty)
            if last_try:
                self.log(f"Last chance to match /{regexp}/ on TTY{tty}, which currently contains: {text}")
            return len(matcher.findall(text)) > 0

        with self.nested(f"waiting for {regexp} to appear on tty {tty}"):
            retry(check, timeout)

    def dump_tty_contents(self, tty: str) -> None:
        """Writes the text on virtual console `tty` to the guest's journal."""
        self.execute(f"fold -w 80 /dev/vcs{tty} | systemd-cat")

    def wait_for_x(self, timeout: Duration = 900) -> None:
        """Waits until the guest's X11 server is up."""

        # Upstream's check: a user manager reached graphical-session.target
        # ("Current graphical user session"), and the socket is there. The
        # target is named as systemd's StatusUnitFormat= names it: by its
        # description (NixOS) or as "NAME - DESCRIPTION" (Debian's default).
        def check(_last_try: bool) -> bool:
            status, _ = self.execute(
                "journalctl -b SYSLOG_IDENTIFIER=systemd | "
                'grep -E "Reached target (graphical-session.target - )?Current graphical"'
            )
            if status != 0:
                return False
            status, _ = self.execute("[ -e /tmp/.X11-unix/X0 ]")
            return status == 0

        with self.nested("waiting for the X11 server"):
            retry(check, timeout)

    def get_window_names(self) -> List[str]:
        """The names of the guest's X11 windows."""
        return self.succeed(
            r"xwininfo -root -tree | sed 's/.*0x[0-9a-f]* \"\([^\"]*\)\".*/\1/; t; d'"
        ).splitlines()

    def wait_for_window(self, regexp: str, timeout: Duration = 900) -> None:
        """Waits until an X11 window's name matches `regexp`."""
        pattern = re.compile(regexp)

        def check(last_try: bool) -> bool:
            names = self.get_window_names()
            if last_try:
                self.log(f"Last chance to match {regexp} on the window list, which currently contains: {', '.join(names)}")
            return any(pattern.search(n) for n in names)

        with self.nested("waiting for a window to appear"):
            retry(check, timeout)

    def switch_root(self) -> None:
        """Moves the guest from its initrd (initrd.target) to the real root
        (initrd-switch-root.target) and reconnects to the new shell."""
        self.wait_for_unit("initrd.target")
        self.execute(
            "systemctl isolate --no-block initrd-switch-root.target 2>/dev/null >/dev/null",
            check_return=False,
            check_output=False,
        )
        self._core.disconnect()
        self.connect()


BaseMachine = Machine
