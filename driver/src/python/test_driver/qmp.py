"""`machine.qmp_client`: QMP commands to a machine's VMM.

skiff's Rust core owns the QMP connection: it connects when it starts
skiff-vmm (greeting, capabilities), reconnects when a guest reboot
restarts skiff-vmm, sends one command at a time and queues the events
that `Machine.wait_for_qmp_event` takes. This module keeps upstream's
names for what a test script sees: `QMPSession.send` and `QMPAPIError`.

Invariant: a `QMPSession` holds no state but its machine's core, so one
session serves every VMM run of the machine.
"""

from typing import Any, Dict, Optional

from test_driver.errors import QMPAPIError, QMPError

__all__ = ["QMPAPIError", "QMPError", "QMPSession"]


class QMPSession:
    """The QMP client of one machine (`machine.qmp_client`)."""

    def __init__(self, core: Any) -> None:
        self._core = core

    def send(self, cmd: str, args: Optional[Dict[str, Any]] = None, timeout: float = 60.0) -> Any:
        """Runs QMP command `cmd` with `args` and returns the reply's
        "return" value. An error reply raises `QMPAPIError`; no reply
        within `timeout` seconds, or a failed connection, raises
        `QMPError`; a machine that is not running, `MachineNotRunning`."""
        return self._core.qmp(cmd, args, float(timeout))

    def __repr__(self) -> str:
        return f"<QMPSession '{self._core.name}'>"
