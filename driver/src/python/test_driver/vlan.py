"""`VLan`: one virtual network of the test, as a script sees it (`vlans`,
`vlan1`, `vlan2`, ...).

skiff's Rust side runs one userspace switch per VLAN that any node is on:
it starts them before the script runs and stops them after every machine
is released, whatever way the run ends. A `VLan` only names one: its
number and where its socket is. Upstream's socket directory holds
vde_switch's control socket; skiff's holds a socket that speaks QEMU's
`-netdev stream` framing instead, so it is not a VDE switch.

Invariant: a `VLan` holds configuration only, never switch state.
"""

from pathlib import Path


class VLan:
    """VLAN `nr`, whose switch listens on `socket` in `socket_dir`."""

    nr: int
    socket_dir: Path
    socket: Path

    def __init__(self, nr: int, socket_dir: Path, socket: Path) -> None:
        self.nr = nr
        self.socket_dir = socket_dir
        self.socket = socket

    def __repr__(self) -> str:
        return f"<Vlan Nr. {self.nr}>"
