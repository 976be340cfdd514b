"""The driver's exception classes, as a test script can catch them.

Two families, named as upstream names them:
- `RequestedAssertionFailed`: a check the script asked for did not hold
  (`succeed`, `fail`, `wait_*`, `t.assert*`). The driver reports it with
  only the script's own frames, each line prefixed `!!! `. It subclasses
  `AssertionError` so that `except AssertionError` catches it too.
- `MachineError`: the driver or a machine failed, not the test (the VM
  died, a guest shell never came up, a feature skiff-vmm lacks). The
  driver reports it with the full traceback.
"""

import _skiff

MachineError = _skiff.MachineError


class RequestedAssertionFailed(AssertionError):
    """A check the test script asked for did not hold.

    Raised by `succeed`, `fail`, the `wait_*` methods on timeout and the
    `t.assert*` helpers. A failed command also carries `machine`, `command`
    and `output` attributes.
    """
