"""The NixOS test driver's Python API on Skiff machines.

Names, parameters, defaults, return values, log lines and exception texts
follow nixpkgs' nixos/lib/test-driver (the stable 24.11-25.11 API, with the
2026 spellings accepted too). The Rust module _skiff runs the VMs, the
backdoor shell and the logs.
"""

import base64
import datetime
import io
import json
import os
import queue
import socket
import threading
import re
import shlex
import sys
import time
import traceback
from contextlib import contextmanager

import _skiff

MachineError = _skiff.MachineError


class RequestedAssertionFailed(AssertionError):
    """A check the test script asked for did not hold."""


class PollingConditionError(RequestedAssertionFailed):
    pass


def _seconds(value, what="timeout"):
    """A duration as seconds: int/float, datetime.timedelta or None."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds or a datetime.timedelta, not {value!r}")
    return float(value)


def _guest_timeout(value):
    """The seconds passed to the guest's `timeout` (None: no wrapper)."""
    s = _seconds(value)
    if s is None:
        return None
    return max(1, int(s + 0.999))


class Logger:
    """The `log` global: the driver's logger (terminal, JSON events, JUnit)."""

    def log(self, message, attributes={}):
        _skiff.log(str(message), attributes.get("machine"))

    info = log

    def debug(self, message, attributes={}):
        _skiff.log(str(message), attributes.get("machine"))

    def warning(self, message, attributes={}):
        _skiff.warning(str(message), attributes.get("machine"))

    def error(self, message, attributes={}):
        _skiff.error(str(message), attributes.get("machine"))
        sys.exit(1)

    def log_test_error(self, message, attributes={}):
        _skiff.error(str(message), attributes.get("machine"))

    def log_serial(self, message, machine):
        _skiff.log(f"# {message}", machine)

    def print_serial_logs(self, enable):
        _skiff.set_serial_stdout(bool(enable))

    def set_log_level(self, level):
        pass

    @contextmanager
    def nested(self, message, attributes={}):
        machine = attributes.get("machine")
        _skiff.begin_nested(str(message), machine)
        start = time.monotonic()
        try:
            yield
        finally:
            _skiff.end_nested(str(message), time.monotonic() - start, machine)

    @contextmanager
    def subtest(self, name, attributes={}):
        _skiff.subtest_begin(name)
        try:
            yield
        except BaseException as e:
            _skiff.subtest_end(str(e) or type(e).__name__)
            raise
        else:
            _skiff.subtest_end(None)


log = Logger()


def retry(fn, timeout=900, *, timeout_seconds=None):
    """Calls fn(False) once a second until it returns true, then once more
    as fn(True); raises when the time is up."""
    if timeout_seconds is not None:
        timeout = timeout_seconds
    limit = _seconds(timeout)
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if fn(False):
            return
        if _skiff.interrupted():
            raise MachineError("the driver was interrupted")
        time.sleep(min(1.0, max(0.0, limit - (time.monotonic() - start))))
    if not fn(True):
        raise RequestedAssertionFailed(
            f"action timed out after {time.monotonic() - start:.2f} seconds (timeout={timeout})"
        )


class PollingCondition:
    def __init__(self, condition, logger, seconds_interval=2.0, description=None):
        self.condition = condition
        self.logger = logger
        self.seconds_interval = seconds_interval
        self.description = description or (condition.__doc__ or condition.__name__).strip()
        self.last_called = float("-inf")
        self.entry_count = 0

    def check(self, force=False):
        if (self.entered or not self.overdue) and not force:
            return True
        with self:
            with self.logger.nested(f"waiting for {self.description}"):
                try:
                    res = self.condition()
                except Exception:
                    res = False
                res = res is None or res
                if not res:
                    self.logger.log(f"{self.description} failed")
            self.last_called = time.monotonic()
            return res

    def maybe_raise(self):
        if not self.check():
            raise PollingConditionError(f"Polling condition failed: {self.description}")

    @property
    def overdue(self):
        return self.last_called + self.seconds_interval < time.monotonic()

    @property
    def entered(self):
        return self.entry_count > 0

    def __enter__(self):
        self.entry_count += 1

    def __exit__(self, *exc):
        self.entry_count -= 1

    def wait(self, timeout=900):
        def condition(last_try):
            if last_try:
                raise RequestedAssertionFailed(
                    f"Timeout while waiting for polling condition: {self.description}"
                )
            return self.check(force=True)

        with self.logger.nested(f"waiting for {self.description}"):
            retry(condition, timeout=timeout)


class QMPAPIError(MachineError):
    """An error reply from the VMM's QMP socket."""


class QMPSession:
    """A QMP client for one VMM run: the greeting and negotiation, then
    commands with their replies; events are queued for wait_for_qmp_event."""

    def __init__(self, path, timeout=300.0, alive=None, progress=None):
        """Connects to `path`, waiting for the socket to appear for as long
        as `alive()` holds (the VMM creates it while it starts, which on a
        loaded host takes seconds), at most `timeout` seconds; `progress`
        gets a line every 15 s of waiting."""
        start = time.monotonic()
        reported = start
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError as e:
                self.sock.close()
                now = time.monotonic()
                if alive is not None and not alive():
                    raise MachineError(
                        f"skiff-vmm exited before its QMP socket {path} came up"
                    )
                if now - start > timeout:
                    raise MachineError(
                        f"cannot connect to the QMP socket {path} within {timeout:.0f} s: {e}"
                    )
                if progress is not None and now - reported >= 15:
                    reported = now
                    progress(f"waiting for skiff-vmm's QMP socket ({now - start:.0f}s)")
                time.sleep(0.02)
        # The greeting comes at once; a VMM that never sends it is stuck.
        self.sock.settimeout(60)
        self.file = self.sock.makefile("rb")
        self.events = queue.Queue()
        self.replies = queue.Queue()
        self.lock = threading.Lock()
        try:
            greeting = json.loads(self.file.readline())
        except (OSError, ValueError) as e:
            self.sock.close()
            raise MachineError(f"no QMP greeting on {path}: {e}")
        self.sock.settimeout(None)
        if "QMP" not in greeting:
            raise MachineError(f"unexpected QMP greeting: {greeting}")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.send("qmp_capabilities")

    def _read(self):
        try:
            for line in self.file:
                msg = json.loads(line)
                (self.events if "event" in msg else self.replies).put(msg)
        except (OSError, ValueError):
            pass
        self.replies.put(None)

    def send(self, cmd, args=None, timeout=60.0):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        with self.lock:
            try:
                self.sock.sendall(json.dumps(msg).encode() + b"\n")
                reply = self.replies.get(timeout=timeout)
            except (OSError, queue.Empty) as e:
                raise MachineError(f"QMP command {cmd} got no reply: {e}")
        if reply is None:
            self.replies.put(None)
            raise MachineError(f"the VMM closed its QMP socket during {cmd}")
        if "error" in reply:
            err = reply["error"]
            raise QMPAPIError(f"QMP command {cmd} failed: {err.get('class')}: {err.get('desc')}")
        return reply.get("return")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def _not_here(machine, what, needs):
    return MachineError(f"{machine.name}: {what} needs {needs}, which skiff-vmm does not have yet")


CHAR_TO_KEY = {}


class Machine:
    """A VM of the test, with the NixOS driver's Machine API."""

    def __init__(self, core, driver):
        self._core = core
        self._driver = driver
        self.name = core.name
        self.out_dir = driver.out_dir
        self.state_dir = core.state_dir
        self.shared_dir = os.path.join(driver.state_dir, "shared-xchg")
        self.logger = log
        self.callbacks = []
        self.keep_vm_state = driver.keep_state
        self.keep_machine_state = driver.keep_state
        self.start_command = None
        self.monitor = None
        self.qmp_client = None
        self._qmp_pid = None
        self.process = None
        self.allow_reboot = False
        self._console_buf = ""
        self._booted_override = None

    def __repr__(self):
        return f"<Machine '{self.name}'>"

    # -- state ---------------------------------------------------------
    @property
    def booted(self):
        if self._booted_override is not None:
            return self._booted_override
        return self._core.booted

    @booted.setter
    def booted(self, value):
        # systemd-shutdown style tests set this to skip the final sync.
        self._booted_override = None if value else False

    @property
    def connected(self):
        return self._core.connected

    @property
    def pid(self):
        return self._core.pid

    @property
    def shell(self):
        return self._core if self._core.connected else None

    @property
    def full_console_log(self):
        return self._core.console_log()

    def is_up(self):
        return self.booted and self.connected

    def log(self, msg):
        log.log(msg, {"machine": self.name})

    def nested(self, msg, attrs={}):
        attrs = dict(attrs)
        attrs["machine"] = self.name
        return log.nested(msg, attrs)

    def run_callbacks(self):
        for cb in self.callbacks:
            cb()

    # -- lifecycle -----------------------------------------------------
    def start(self, allow_reboot=False):
        if self._core.booted:
            return
        self._booted_override = None
        self._console_buf = ""
        self.allow_reboot = allow_reboot
        self.log("starting vm")
        self._core.start(allow_reboot)
        self._connect_qmp()

    def _connect_qmp(self):
        if self.qmp_client is not None:
            self.qmp_client.close()
        # booted stays true while skiff-vmm restarts after a guest reboot;
        # the new one opens the socket at the same path.
        self.qmp_client = QMPSession(
            os.path.join(self.state_dir, "qmp"),
            alive=lambda: self._core.booted,
            progress=self.log,
        )
        self._qmp_pid = self._core.pid

    def _qmp(self):
        """The QMP session of the running VMM (a new one after a reboot)."""
        if not self._core.booted:
            raise MachineError(f"{self.name}: the machine is not running")
        if self.qmp_client is None or self._qmp_pid != self._core.pid:
            self._connect_qmp()
        return self.qmp_client

    def connect(self):
        if self.connected:
            return
        self._core.connect()

    def wait_for_shutdown(self):
        if not self._core.booted:
            return
        with self.nested("waiting for the VM to power off"):
            start = time.monotonic()
            while self._core.wait_exit(15.0) is None:
                if _skiff.interrupted():
                    raise MachineError("the driver was interrupted")
                self.log(f"waiting for the VM to power off ({time.monotonic() - start:.0f}s)")
        self._booted_override = None

    def shutdown(self):
        if not self._core.booted:
            return
        self._core.send_shell_raw(b"poweroff\n")
        self.wait_for_shutdown()

    def crash(self):
        if not self._core.booted:
            return
        self.log("forced crash")
        try:
            self._qmp().send("quit")
        except MachineError as e:
            self.log(f"QMP quit failed ({e}); killing skiff-vmm")
            self._core.kill()
        self.wait_for_shutdown()

    def reboot(self):
        """Reboots the guest (it must have been started with
        allow_reboot=True, else skiff-vmm exits as QEMU does with
        -no-reboot). Writable overlay disks start over after the reboot."""
        self.execute("systemctl reboot 2>/dev/null || reboot", check_return=False, check_output=False)
        self._core.disconnect()

    def release(self):
        self._core.release()
        if self.qmp_client is not None:
            self.qmp_client.close()

    # -- commands ------------------------------------------------------
    def _run_polling_conditions(self):
        self._driver.run_polling_conditions()

    def execute(self, command, check_return=True, check_output=True, timeout=900, *, stream=False):
        """Runs `command` under bash with `set -euo pipefail`; returns
        (status, stdout). stream=True logs the output while it arrives."""
        self._run_polling_conditions()
        self.run_callbacks()
        self.connect()
        status, out = self._core.execute(
            command, bool(check_return), bool(check_output), _guest_timeout(timeout), bool(stream)
        )
        if not check_output:
            return (-2, "")
        if not check_return:
            return (-1, out.decode())
        return (status, out.decode(errors="replace"))

    def succeed(self, *commands, timeout=None):
        output = ""
        for command in commands:
            with self.nested(f"must succeed: {command}"):
                status, out = self.execute(command, timeout=timeout)
                if status != 0:
                    self.log(f"output: {out}")
                    raise _command_failed(self, command, out, f"command `{command}` failed (exit code {status})")
                output += out
        return output

    def fail(self, *commands, timeout=None):
        output = ""
        for command in commands:
            with self.nested(f"must fail: {command}"):
                status, out = self.execute(command, timeout=timeout)
                if status == 0:
                    raise _command_failed(self, command, out, f"command `{command}` unexpectedly succeeded")
                output += out
        return output

    def _wait_until(self, command, timeout, attempt_timeout, want_success):
        output = ""
        budget = attempt_timeout if attempt_timeout is not None else timeout

        def check(_last_try):
            nonlocal output
            status, output = self.execute(command, timeout=budget)
            return (status == 0) == want_success

        verb = "success" if want_success else "failure"
        with self.nested(f"waiting for {verb}: {command}"):
            retry(check, timeout)
            return output

    def wait_until_succeeds(self, command, timeout=900, *, attempt_timeout=None):
        return self._wait_until(command, timeout, attempt_timeout, True)

    def wait_until_fails(self, command, timeout=900, *, attempt_timeout=None):
        return self._wait_until(command, timeout, attempt_timeout, False)

    def sleep(self, secs):
        self.succeed(f"sleep {_seconds(secs, 'secs'):g}")

    # -- systemd -------------------------------------------------------
    def systemctl(self, q, user=None):
        if user is not None:
            q = q.replace("'", "\\'")
            return self.execute(
                f"su -l {user} --shell /bin/sh -c "
                "$'XDG_RUNTIME_DIR=/run/user/`id -u` "
                f"systemctl --user {q}'"
            )
        return self.execute(f"systemctl {q}")

    def start_job(self, jobname, user=None):
        return self.systemctl(f"start {jobname}", user)

    def stop_job(self, jobname, user=None):
        return self.systemctl(f"stop {jobname}", user)

    def get_unit_info(self, unit, user=None):
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

    def get_unit_property(self, unit, property, user=None):
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

    def require_unit_state(self, unit, require_state="active"):
        with self.nested(f"checking if unit '{unit}' has reached state '{require_state}'"):
            state = self.get_unit_property(unit, "ActiveState")
            if state != require_state:
                raise RequestedAssertionFailed(
                    f"Expected unit '{unit}' to to be in state '{require_state}' but it is in state '{state}'"
                )

    def wait_for_unit(self, unit, user=None, timeout=900):
        def check_active(_last_try):
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
    def wait_for_file(self, filename, timeout=900):
        def check(_last_try):
            status, _ = self.execute(f"test -e {filename}")
            return status == 0

        with self.nested(f"waiting for file '{filename}'"):
            retry(check, timeout)

    def wait_for_open_port(self, port, addr="localhost", timeout=900):
        def check(_last_try):
            status, _ = self.execute(f"nc -z {addr} {port}")
            return status == 0

        with self.nested(f"waiting for TCP port {port} on {addr}"):
            retry(check, timeout)

    def wait_for_closed_port(self, port, addr="localhost", timeout=900):
        def check(_last_try):
            status, _ = self.execute(f"nc -z {addr} {port}")
            return status != 0

        with self.nested(f"waiting for TCP port {port} on {addr} to be closed"):
            retry(check, timeout)

    def wait_for_open_unix_socket(self, addr, is_datagram=False, timeout=900):
        flags = "-uU" if is_datagram else "-U"

        def check(_last_try):
            status, _ = self.execute(f"nc -z {flags} {addr}")
            return status == 0

        with self.nested(f"waiting for UNIX socket {addr}"):
            retry(check, timeout)

    def get_console_log(self):
        return self._core.console_log()

    def wait_for_console_text(self, regex, timeout=None):
        """Waits until `regex` matches the serial console output since the
        machine started (text printed before the call counts, unless an
        earlier call consumed it). Stops at the first match."""
        limit = _seconds(timeout)
        with self.nested(f"waiting for {regex} to appear on console"):
            start = time.monotonic()
            last_report = start
            while True:
                lines = self._core.take_console_lines()
                for line in lines:
                    self._console_buf += line
                    if re.search(regex, self._console_buf):
                        # What followed the match stays for the next call.
                        return
                if not lines:
                    if re.search(regex, self._console_buf):
                        return
                    now = time.monotonic()
                    if limit is not None and now - start >= limit:
                        raise RequestedAssertionFailed(
                            f"action timed out after {now - start:.2f} seconds (timeout={timeout})"
                        )
                    if _skiff.interrupted():
                        raise MachineError("the driver was interrupted")
                    if not self._core.booted and not self._core.take_console_lines():
                        raise MachineError(
                            f"{self.name}: the VM exited (status {self._core.last_exit}) "
                            f"while waiting for {regex!r} on the console"
                        )
                    if now - last_report >= 15:
                        last_report = now
                        self.log(f"waiting for {regex!r} on the console ({now - start:.0f}s)")
                    time.sleep(0.05)

    def wait_for_qmp_event(self, event_filter, timeout=600):
        """The first QMP event (since the machine started) for which
        event_filter(event) is true; other events are dropped."""
        if self.qmp_client is None:
            raise RuntimeError("QMP is not connected")
        limit = _seconds(timeout)
        start = time.monotonic()
        while True:
            left = limit - (time.monotonic() - start)
            if left <= 0:
                raise RequestedAssertionFailed(
                    f"action timed out after {time.monotonic() - start:.2f} seconds (timeout={timeout})"
                )
            try:
                event = self.qmp_client.events.get(timeout=min(left, 1.0))
            except queue.Empty:
                if _skiff.interrupted():
                    raise MachineError("the driver was interrupted")
                continue
            if event_filter(event):
                return event

    # -- files ---------------------------------------------------------
    def _push_bytes(self, data, guest_cmd):
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

    def copy_from_host_via_shell(self, source, target):
        with open(source, "rb") as f:
            data = f.read()
        self.succeed("mkdir -p $(dirname " + shlex.quote(target) + ")")
        self._push_bytes(data, "cat > " + shlex.quote(target))

    def copy_from_host(self, source, target):
        """Copies a host file or directory into the guest as `cp -r` would
        (through the shell: skiff guests have no shared folder). Mode bits
        are kept; the owner becomes root."""
        source = os.fspath(source)
        if not os.path.exists(source):
            raise MachineError(f"{self.name}: copy_from_host: {source} does not exist")
        name = os.path.basename(os.path.normpath(source))

        def as_root(info):
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            return info

        import tarfile

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(source, arcname=name, filter=as_root)
        tmp = "/tmp/.skiff-copy-" + str(os.getpid())
        q = shlex.quote(target)
        self.succeed(f"rm -rf {tmp}; mkdir -p {tmp} $(dirname {q})")
        self._push_bytes(buf.getvalue(), f"tar -xzf - -C {tmp}")
        self.succeed(f"cp -r {tmp}/{shlex.quote(name)} {q}; rm -rf {tmp}")

    def copy_from_machine(self, source, target_dir=""):
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
    def send_console(self, chars):
        self._core.send_console(chars.encode() if isinstance(chars, str) else bytes(chars))

    def console_interact(self):
        self.log("Terminal is ready (there is no initial prompt); press Ctrl-D to stop")
        while True:
            chunk = sys.stdin.buffer.read1(1) if hasattr(sys.stdin.buffer, "read1") else sys.stdin.buffer.read(1)
            if not chunk or chunk == b"\x04":
                return
            self.send_console(chunk)

    def shell_interact(self, address=None):
        """A simple line shell on the backdoor: each line runs as a command."""
        self.connect()
        self.log("Terminal is ready: each line runs in the guest; Ctrl-D ends")
        for line in sys.stdin:
            status, out = self.execute(line.rstrip("\n"))
            sys.stdout.write(out)
            if status != 0:
                sys.stdout.write(f"(exit code {status})\n")
            sys.stdout.flush()

    # -- things skiff-vmm cannot do yet --------------------------------
    def send_monitor_command(self, command):
        """Runs a human monitor (HMP) command through QMP's
        human-monitor-command and returns its output."""
        self._run_polling_conditions()
        with self.nested(f"sending monitor command: {command}"):
            return self._qmp().send("human-monitor-command", {"command-line": command})

    def block(self):
        raise _not_here(self, "block()", "virtio-net")

    def unblock(self):
        raise _not_here(self, "unblock()", "virtio-net")

    def forward_port(self, host_port=8080, guest_port=80):
        raise _not_here(self, "forward_port()", "a user-mode NIC")

    def screenshot(self, filename):
        raise _not_here(self, "screenshot()", "a display (virtio-gpu)")

    def get_screen_text(self):
        raise _not_here(self, "get_screen_text()", "a display (virtio-gpu)")

    def get_screen_text_variants(self):
        raise _not_here(self, "get_screen_text_variants()", "a display (virtio-gpu)")

    def wait_for_text(self, regex, timeout=900):
        raise _not_here(self, "wait_for_text()", "a display (virtio-gpu)")

    def send_key(self, key, delay=0.01, log=True):
        raise _not_here(self, "send_key()", "a keyboard and a display")

    def send_chars(self, chars, delay=0.01):
        raise _not_here(self, "send_chars()", "a keyboard and a display")

    # -- virtual consoles and X (plain shell commands) -----------------
    def get_tty_text(self, tty):
        status, output = self.execute(
            f"fold -w$(stty -F /dev/tty{tty} size | awk '{{print $2}}') /dev/vcs{tty}"
        )
        return output

    def wait_until_tty_matches(self, tty, regexp, timeout=900):
        matcher = re.compile(regexp)

        def check(last_try):
            text = self.get_tty_text(tty)
            if last_try:
                self.log(f"Last chance to match /{regexp}/ on TTY{tty}, which currently contains: {text}")
            return len(matcher.findall(text)) > 0

        with self.nested(f"waiting for {regexp} to appear on tty {tty}"):
            retry(check, timeout)

    def dump_tty_contents(self, tty):
        self.execute(f"fold -w 80 /dev/vcs{tty} | systemd-cat")

    def wait_for_x(self, timeout=900):
        def check(_last_try):
            status, _ = self.execute(
                'journalctl -b SYSLOG_IDENTIFIER=systemd | grep "Reached target Current graphical"'
            )
            if status != 0:
                return False
            status, _ = self.execute("[ -e /tmp/.X11-unix/X0 ]")
            return status == 0

        with self.nested("waiting for the X11 server"):
            retry(check, timeout)

    def get_window_names(self):
        return self.succeed(
            r"xwininfo -root -tree | sed 's/.*0x[0-9a-f]* \"\([^\"]*\)\".*/\1/; t; d'"
        ).splitlines()

    def wait_for_window(self, regexp, timeout=900):
        pattern = re.compile(regexp)

        def check(last_try):
            names = self.get_window_names()
            if last_try:
                self.log(f"Last chance to match {regexp} on the window list, which currently contains: {', '.join(names)}")
            return any(pattern.search(n) for n in names)

        with self.nested("waiting for a window to appear"):
            retry(check, timeout)

    def switch_root(self):
        self.wait_for_unit("initrd.target")
        self.execute(
            "systemctl isolate --no-block initrd-switch-root.target 2>/dev/null >/dev/null",
            check_return=False,
            check_output=False,
        )
        self._core.disconnect()
        self.connect()


BaseMachine = Machine


def _extract(tar, dest):
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


def _command_failed(machine, command, output, message):
    e = RequestedAssertionFailed(message)
    e.machine = machine.name
    e.command = command
    e.output = output
    return e


class _Assertions:
    """`t`: unittest.TestCase's assertion methods (t.assertEqual, t.assertIn,
    ...), raising RequestedAssertionFailed. unittest is imported on first
    use: it is the driver's largest import and most scripts never use `t`."""

    _case = None

    def __getattr__(self, name):
        if _Assertions._case is None:
            import unittest

            class Case(unittest.TestCase):
                failureException = RequestedAssertionFailed

                def runTest(self):
                    pass

            _Assertions._case = Case()
        return getattr(_Assertions._case, name)


class _Debug:
    def breakpoint(self):
        pass


class Driver:
    def __init__(self, test_name, out_dir, state_dir, cores, script, script_name):
        self.test_name = test_name
        self.out_dir = out_dir
        self.state_dir = state_dir
        self.keep_state = False
        self.tests = script
        self.script_name = script_name
        self.logger = log
        self.polling_conditions = []
        self.global_timeout = None
        self.vlans = []
        os.makedirs(os.path.join(state_dir, "shared-xchg"), exist_ok=True)
        self.machines = [Machine(c, self) for c in cores]
        self._py_names = {c.name: c.python_name for c in cores}

    def run_polling_conditions(self):
        for condition in self.polling_conditions:
            condition.maybe_raise()

    def start_all(self):
        with log.nested("start all VMs"):
            for m in self.machines:
                m.start()

    def join_all(self):
        with log.nested("wait for all VMs to finish"):
            for m in self.machines:
                m.wait_for_shutdown()

    def subtest(self, name):
        return log.subtest(name)

    def polling_condition(self, fun_=None, *, seconds_interval=2.0, description=None):
        driver = self

        class Poll:
            def __init__(self, fun):
                self.condition = PollingCondition(fun, log, seconds_interval, description)

            def __enter__(self):
                driver.polling_conditions.append(self.condition)

            def __exit__(self, *exc):
                driver.polling_conditions.pop()

            def __call__(self):
                return self.condition.check(force=True)

            def wait(self, timeout=900):
                self.condition.wait(timeout)

        if fun_ is None:
            return Poll
        return Poll(fun_)

    def serial_stdout_on(self):
        _skiff.set_serial_stdout(True)

    def serial_stdout_off(self):
        _skiff.set_serial_stdout(False)

    def create_machine(self, *args, **kwargs):
        raise MachineError(
            "create_machine() builds a machine from a QEMU start script; "
            "with skiff, add the node to the test description instead"
        )

    def test_symbols(self):
        symbols = {
            "start_all": self.start_all,
            "test_script": self.test_script,
            "run_tests": self.run_tests,
            "machines": self.machines,
            "machines_qemu": self.machines,
            "machines_nspawn": [],
            "vlans": self.vlans,
            "driver": self,
            "log": log,
            "os": os,
            "create_machine": self.create_machine,
            "subtest": self.subtest,
            "run_tests": self.run_tests,
            "join_all": self.join_all,
            "retry": retry,
            "serial_stdout_off": self.serial_stdout_off,
            "serial_stdout_on": self.serial_stdout_on,
            "polling_condition": self.polling_condition,
            "Machine": Machine,
            "BaseMachine": BaseMachine,
            "t": _Assertions(),
            "debug": _Debug(),
        }
        for m in self.machines:
            symbols[self._py_names[m.name]] = m
        if len(self.machines) == 1:
            symbols["machine"] = self.machines[0]
        return symbols

    def test_script(self):
        compiled = compile(self.tests, self.script_name, "exec")
        exec(compiled, self._symbols, None)

    def run_tests(self):
        self.test_script()
        for m in self.machines:
            if m.is_up():
                m.execute("sync")

    def release(self):
        for m in self.machines:
            try:
                m.release()
            except Exception as e:
                _skiff.error(f"releasing {m.name}: {e}")


def _report_assertion(e, script_name, script):
    """The script's own frames and the error, each line prefixed `!!! `."""
    lines = script.splitlines()
    out = ["Traceback (most recent call last):"]
    for frame in traceback.extract_tb(e.__traceback__):
        if frame.filename == script_name:
            out.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}')
            if frame.lineno and frame.lineno <= len(lines):
                out.append("    " + lines[frame.lineno - 1].strip())
    out.append("")
    out.append(f"{type(e).__name__}: {e}")
    machine = getattr(e, "machine", None)
    if machine is not None:
        out.append(f"machine: {machine}")
        out.append(f"command: {e.command}")
        output = e.output.rstrip("\n")
        out.append("output:" + ("\n" + output if output else " (none)"))
    _skiff.error("\n".join(out))


def main(test_name, script, script_name, out_dir, state_dir, interactive, cores):
    driver = Driver(test_name, out_dir, state_dir, cores, script, script_name)
    symbols = driver.test_symbols()
    driver._symbols = symbols
    exposed = ", ".join(k for k in symbols if k not in driver._py_names.values())
    log.log(f"additionally exposed symbols: {exposed}")
    try:
        if interactive:
            import code
            import readline  # noqa: F401  (line editing in the REPL)
            import signal

            signal.signal(signal.SIGINT, signal.default_int_handler)
            code.interact(
                banner="skiff interactive test driver: machines are defined, none started; "
                "test_script() runs the script, Ctrl-D leaves",
                local=symbols,
                exitmsg="",
            )
            return 0
        start = time.monotonic()
        try:
            driver.run_tests()
        except RequestedAssertionFailed as e:
            _report_assertion(e, script_name, script)
            _skiff.log(f"test script failed after {time.monotonic() - start:.2f}s")
            return 1
        except MachineError as e:
            _skiff.error("".join(traceback.format_exception(e)).rstrip())
            return 1
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
        except BaseException as e:
            _skiff.error("".join(traceback.format_exception(e)).rstrip())
            return 1
        _skiff.log(f"test script finished in {time.monotonic() - start:.2f}s")
        return 0
    finally:
        driver.release()
