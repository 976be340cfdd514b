"""A QMP client for one skiff-vmm run.

The session reads the greeting, negotiates capabilities, then sends one
command at a time and returns its reply. A reader thread sorts what
arrives: replies go to the waiting command, events to a queue that
`Machine.wait_for_qmp_event` drains. A session belongs to one VMM process;
after a guest reboot restarts skiff-vmm, the machine opens a new one.
"""

import json
import queue
import socket
import threading
import time
from typing import Any, Callable, Dict, Optional

from test_driver.errors import MachineError, MachineExited


class QMPAPIError(MachineError):
    """An error reply from the VMM's QMP socket."""


class QMPSession:
    """A QMP client for one VMM run: the greeting and negotiation, then
    commands with their replies; events are queued for wait_for_qmp_event."""

    def __init__(
        self,
        path: str,
        timeout: float = 300.0,
        alive: Optional[Callable[[], bool]] = None,
        progress: Optional[Callable[[str], None]] = None,
    ) -> None:
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
                    raise MachineExited(f"skiff-vmm exited before its QMP socket {path} came up")
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
        self.events: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self.replies: "queue.Queue[Optional[Dict[str, Any]]]" = queue.Queue()
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

    def _read(self) -> None:
        try:
            for line in self.file:
                msg = json.loads(line)
                (self.events if "event" in msg else self.replies).put(msg)
        except (OSError, ValueError):
            pass
        # A closed socket wakes the waiting command (and any later one).
        self.replies.put(None)

    def send(self, cmd: str, args: Optional[Dict[str, Any]] = None, timeout: float = 60.0) -> Any:
        """Runs QMP command `cmd` with `args`; returns its "return" value.
        An error reply raises `QMPAPIError`; no reply within `timeout`
        seconds, or a closed socket, raises `MachineError`."""
        msg: Dict[str, Any] = {"execute": cmd}
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

    def close(self) -> None:
        """Closes the socket (the reader thread then ends)."""
        try:
            self.sock.close()
        except OSError:
            pass
