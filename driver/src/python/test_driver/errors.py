"""The driver's exception classes, as a test script can catch them.

Two families, named as upstream names them:
- `RequestedAssertionFailed`: a check the script asked for did not hold
  (`succeed`, `fail`, `wait_*`, `t.assert*`). The driver reports it with
  only the script's own frames, each line prefixed `!!! `. It subclasses
  `AssertionError` so that `except AssertionError` catches it too.
- `MachineError`: the driver or a machine failed, not the test (the VM
  died, a guest shell never came up, a feature skiff-vmm lacks). The
  driver reports it with the full traceback. skiff raises a subclass per
  kind of failure, so a script can catch, say, `MachineExited` alone;
  catching `MachineError` still catches them all.

skiff's Rust side raises these classes too: it maps each kind of its
machine errors to one of them by name, so this module is their one
definition.
"""

class RequestedAssertionFailed(AssertionError):
    """A check the test script asked for did not hold.

    Raised by `succeed`, `fail`, the `wait_*` methods on timeout and the
    `t.assert*` helpers. A failed command also carries `machine`, `command`
    and `output` attributes.
    """


class MachineError(Exception):
    """The driver or a machine failed, not the test: the run cannot go on
    as the script meant. The subclasses below say which way; errors from
    skiff's Rust side also carry the `machine` name as an attribute."""


class HostError(MachineError):
    """The host could not set a machine up or start skiff-vmm (state
    directory, sockets, log files, the skiff-vmm binary)."""


class MachineNotRunning(MachineError):
    """The request needs a running machine, or a connected guest shell,
    and there is none."""


class MachineExited(MachineError):
    """skiff-vmm exited while the driver waited on it; the message ends
    with the last serial lines, and `status` is its exit status."""


class ConnectTimeout(MachineError):
    """The guest's backdoor root shell did not come up within the node's
    connect_timeout."""


class GuestShellError(MachineError):
    """The backdoor shell connection failed (closed, garbled output, no
    answer)."""


class DriverInterrupted(MachineError):
    """The driver is being stopped (SIGTERM, SIGINT, the global timeout)."""


class NotSupported(MachineError):
    """The method needs hardware the machine does not have (a display the
    node did not ask for, a user-mode network card skiff-vmm has not yet),
    or a QEMU start script."""


class QMPError(MachineError):
    """The VMM's QMP socket failed: it did not come up, sent no greeting,
    closed, or left a command without a reply in time."""


class QMPAPIError(MachineError):
    """The VMM answered a QMP command with an error. `class_name` and
    `description` are the reply's `class` and `desc`."""
