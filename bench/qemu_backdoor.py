#!/usr/bin/env python3
"""A minimal NixOS-style test driver for one QEMU guest, the baseline that
bench/driver-vs-qemu compares `skiff test` with.

It listens on a unix socket that QEMU's virtio console connects to, starts
QEMU, waits for `Spawning backdoor root shell...` and then speaks the
backdoor framing the NixOS driver (and skiff) use, byte for byte as skiff
sends it:

    [timeout T] bash -c 'set -euo pipefail; CMD' | (base64 -w 0; echo)
    echo ${PIPESTATUS[0]}

`wait_for_unit` polls `systemctl --no-pager show "UNIT" --property="ActiveState"`
once a second as the NixOS driver does; `shutdown` writes `poweroff` raw and
waits for QEMU to exit. QEMU's serial output (ttyS0) goes to --serial-log.

    qemu_backdoor.py --socket PATH --serial-log PATH [--commands N] -- QEMU-COMMAND...

Without --commands it runs the script
    start; wait_for_unit("multi-user.target"); succeed("true"); shutdown
With --commands N it runs succeed("true") N more times after the first one,
timing each with time.perf_counter, before the shutdown.

Prints one JSON object on stdout: wall-clock times (time.time()) of the
harness start (after its imports), QEMU's start, the backdoor banner, multi-user.target active and QEMU's
exit, QEMU's exit status, and with --commands the per-call seconds, the
seconds spent blocked waiting for the guest during the loop and the CPU
seconds this process used during it.
"""

import argparse
import base64
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time

T_START = time.time()
BANNER = b"Spawning backdoor root shell..."


class BackdoorError(Exception):
    pass


def command_line(command, timeout=None):
    """The line the NixOS driver (and skiff's driver/src/shell.rs, whose
    tests compare the two) sends to run `command`."""
    prefix = f"timeout {timeout}" if timeout is not None else ""
    return f"{prefix} bash -c {shlex.quote(f'set -euo pipefail; {command}')} | (base64 -w 0; echo)\n"


class Shell:
    def __init__(self, conn):
        self.conn = conn
        self.buf = b""
        self.waited = 0.0

    def _fill(self):
        t = time.perf_counter()
        chunk = self.conn.recv(65536)
        self.waited += time.perf_counter() - t
        if not chunk:
            raise BackdoorError("the guest shell closed the connection")
        self.buf += chunk

    def wait_banner(self):
        while BANNER not in self.buf:
            self.buf = self.buf[-4096:]
            self._fill()
        end = self.buf.index(BANNER) + len(BANNER)
        while self.buf[end:end + 1] in (b"\r", b"\n"):
            end += 1
        self.buf = self.buf[end:]

    def read_line(self):
        searched = 0
        while True:
            i = self.buf.find(b"\n", searched)
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 1:]
                return line
            searched = len(self.buf)
            self._fill()

    def execute(self, command, timeout=900):
        """(status, output) as the NixOS driver's Machine.execute."""
        self.conn.sendall(command_line(command, timeout).encode())
        out = base64.b64decode(self.read_line().strip())
        self.conn.sendall(b"echo ${PIPESTATUS[0]}\n")
        status = int(self.read_line().strip())
        return status, out.decode(errors="replace")

    def succeed(self, command, timeout=None):
        status, out = self.execute(command, timeout=timeout)
        if status != 0:
            raise BackdoorError(f"command `{command}` failed (exit code {status}): {out}")
        return out

    def get_unit_property(self, unit, prop):
        status, out = self.execute(f'systemctl --no-pager show "{unit}" --property="{prop}"')
        m = re.match(r"^([^=]+)=(.*)$", out.rstrip("\n"))
        if status != 0 or not m or m.group(1) != prop:
            raise BackdoorError(f"systemctl show {unit} {prop}: status {status}, {out!r}")
        return m.group(2)

    def wait_for_unit(self, unit, timeout=900):
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            state = self.get_unit_property(unit, "ActiveState")
            if state == "failed":
                raise BackdoorError(f'unit "{unit}" reached state "failed"')
            if state == "inactive":
                _, jobs = self.execute("systemctl list-jobs --full 2>&1")
                if "No jobs" in jobs and self.get_unit_property(unit, "ActiveState") == state:
                    raise BackdoorError(f'unit "{unit}" is inactive and there are no pending jobs')
            if state == "active":
                return
            time.sleep(1.0)
        raise BackdoorError(f"unit {unit} not active after {timeout} s")


def exited_cpu_time(pid, timeout):
    """Waits for child `pid` to exit without reaping it and returns its
    CPU time while it was alive in seconds: user, system and the guest's
    share (read from /proc while it is a zombie)."""
    end = time.monotonic() + timeout
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > end:
            raise subprocess.TimeoutExpired(f"pid {pid}", timeout)
        time.sleep(0.05)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    hz = os.sysconf("SC_CLK_TCK")
    # proc(5) numbers fields from 1; the list starts at field 3.
    return {k: int(fields[n - 3]) / hz for k, n in (("user", 14), ("system", 15), ("guest", 43))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--serial-log", required=True)
    ap.add_argument("--commands", type=int, default=0)
    ap.add_argument("--connect-timeout", type=float, default=600)
    ap.add_argument("qemu", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    qemu = args.qemu[1:] if args.qemu[:1] == ["--"] else args.qemu
    if not qemu:
        ap.error("no QEMU command after --")

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.socket)
    listener.listen(1)
    log = open(args.serial_log, "wb")
    proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    t_spawn = time.time()

    def drain():
        for line in proc.stdout:
            log.write(line)
            log.flush()

    threading.Thread(target=drain, daemon=True).start()
    result = {"t_start": T_START, "t_spawn": t_spawn}
    try:
        listener.settimeout(args.connect_timeout)
        conn, _ = listener.accept()
        conn.settimeout(args.connect_timeout)
        shell = Shell(conn)
        shell.wait_banner()
        result["t_banner"] = time.time()
        conn.settimeout(960)
        shell.wait_for_unit("multi-user.target")
        result["t_unit"] = time.time()
        shell.succeed("true")
        if args.commands:
            times = []
            waited0 = shell.waited
            cpu0 = time.process_time()
            loop_start = time.perf_counter()
            for _ in range(args.commands):
                t = time.perf_counter()
                shell.succeed("true")
                times.append(time.perf_counter() - t)
                if len(times) % 50 == 0:
                    print(f"qemu_backdoor: {len(times)} commands", file=sys.stderr, flush=True)
            result["loop_seconds"] = time.perf_counter() - loop_start
            result["loop_cpu"] = time.process_time() - cpu0
            result["loop_guest_wait"] = shell.waited - waited0
            result["call_seconds"] = times
        conn.sendall(b"poweroff\n")
        result["cpu"] = exited_cpu_time(proc.pid, timeout=300)
        result["status"] = proc.wait(timeout=300)
        result["t_exit"] = time.time()
    except (BackdoorError, OSError, ValueError, subprocess.TimeoutExpired) as e:
        proc.kill()
        proc.wait()
        print(f"qemu_backdoor: {type(e).__name__}: {e}", file=sys.stderr)
        result["error"] = str(e)
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result and result.get("status") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
