"""`Driver`: the machines of one test, the globals a test script sees, and
`main`, which runs the script (or the interactive REPL) and reports how
it ended.

How a run ends:
- `RequestedAssertionFailed`: only the script's own frames and the error
  (plus the machine, command and output of a failed command), each line
  prefixed `!!! `; status 1.
- `MachineError` and any other exception: the whole traceback; status 1.
- `SystemExit`: its status.
Every machine is released however the run ends.
"""

import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import _skiff
from test_driver.errors import MachineError, NotSupported, RequestedAssertionFailed
from test_driver.logger import Logger, log
from test_driver.machine import BaseMachine, Machine, retry
from test_driver.polling_condition import PollingCondition
from test_driver.vlan import VLan


class _Assertions:
    """`t`: unittest.TestCase's assertion methods (t.assertEqual, t.assertIn,
    ...), raising RequestedAssertionFailed. unittest is imported on first
    use: it is the driver's largest import and most scripts never use `t`."""

    _case = None

    def __getattr__(self, name: str) -> Any:
        if _Assertions._case is None:
            import unittest

            class Case(unittest.TestCase):
                failureException = RequestedAssertionFailed

                def runTest(self) -> None:
                    pass

            _Assertions._case = Case()
        return getattr(_Assertions._case, name)


class _Debug:
    """`debug`: upstream's debug hook; its breakpoint does nothing here."""

    def breakpoint(self) -> None:
        pass


class Driver:
    """The machines of one test and the globals its script sees.

    `cores` are the Rust sides of the machines, in node order; each has a
    `name` and the `python_name` it is bound to in the script. `vlans`
    are the VLANs whose switches run, as (number, socket directory,
    socket), ascending.
    """

    def __init__(
        self,
        test_name: str,
        out_dir: str,
        state_dir: str,
        cores: Sequence[Any],
        script: str,
        script_name: str,
        vlans: Sequence[Tuple[int, str, str]] = (),
    ) -> None:
        self.test_name = test_name
        self.out_dir = out_dir
        self.state_dir = state_dir
        self.keep_state = False
        self.tests = script
        self.script_name = script_name
        self.logger: Logger = log
        self.polling_conditions: List[PollingCondition] = []
        self.global_timeout: Optional[float] = None
        self.vlans: List[VLan] = [VLan(nr, Path(d), Path(s)) for nr, d, s in vlans]
        os.makedirs(os.path.join(state_dir, "shared-xchg"), exist_ok=True)
        self.machines: List[Machine] = [Machine(c, self) for c in cores]
        self._py_names: Dict[str, str] = {c.name: c.python_name for c in cores}
        self._symbols: Dict[str, Any] = {}

    def run_polling_conditions(self) -> None:
        """Checks every active polling condition that is due; a failing
        one raises `PollingConditionError`."""
        for condition in self.polling_conditions:
            condition.maybe_raise()

    def start_all(self) -> None:
        """Starts every machine, in node order, without waiting for the
        guests to boot."""
        with log.nested("start all VMs"):
            for m in self.machines:
                m.start()

    def join_all(self) -> None:
        """Waits until every machine has powered off."""
        with log.nested("wait for all VMs to finish"):
            for m in self.machines:
                m.wait_for_shutdown()

    def subtest(self, name: str) -> Any:
        """`with subtest("name"):` — a log block and a JUnit test case; an
        exception inside fails the case and is re-raised."""
        return log.subtest(name)

    def polling_condition(
        self,
        fun_: Optional[Callable[[], Optional[bool]]] = None,
        *,
        seconds_interval: float = 2.0,
        description: Optional[str] = None,
    ) -> Any:
        """Decorates a check that must keep holding: `with cond:` makes
        every command check it first (at most once per
        `seconds_interval`), and a failure raises `PollingConditionError`.
        `cond()` checks it now; `cond.wait(timeout)` waits until it holds.
        Usable bare (`@polling_condition`) or with arguments."""
        driver = self

        class Poll:
            def __init__(self, fun: Callable[[], Optional[bool]]) -> None:
                self.condition = PollingCondition(fun, log, seconds_interval, description)

            def __enter__(self) -> None:
                driver.polling_conditions.append(self.condition)

            def __exit__(self, *exc: object) -> None:
                driver.polling_conditions.pop()

            def __call__(self) -> bool:
                return self.condition.check(force=True)

            def wait(self, timeout: float = 900) -> None:
                self.condition.wait(timeout)

        if fun_ is None:
            return Poll
        return Poll(fun_)

    def serial_stdout_on(self) -> None:
        """Echoes the guests' serial lines into the log (the default)."""
        _skiff.set_serial_stdout(True)

    def serial_stdout_off(self) -> None:
        """Stops echoing the guests' serial lines into the log (they are
        still written to <machine>.serial.log)."""
        _skiff.set_serial_stdout(False)

    def create_machine(self, *args: Any, **kwargs: Any) -> Machine:
        """Not available: upstream builds a machine from a QEMU start
        script; with skiff, add the node to the test description."""
        raise NotSupported(
            "create_machine() builds a machine from a QEMU start script; "
            "with skiff, add the node to the test description instead"
        )

    def test_symbols(self) -> Dict[str, Any]:
        """The globals of the test script: the upstream symbols, each
        machine under its Python name, `machine` when there is just one,
        and each VLAN as `vlan<N>` (which wins over a machine of that
        name, as upstream)."""
        symbols: Dict[str, Any] = {
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
        for v in self.vlans:
            symbols[f"vlan{v.nr}"] = v
        return symbols

    def test_script(self) -> None:
        """Runs the test script with the test symbols as its globals."""
        compiled = compile(self.tests, self.script_name, "exec")
        exec(compiled, self._symbols, None)

    def run_tests(self) -> None:
        """Runs the test script, then `sync` on every machine still up."""
        self.test_script()
        for m in self.machines:
            if m.is_up():
                m.execute("sync")

    def release(self) -> None:
        """Releases every machine (kills its skiff-vmm); errors are logged,
        not raised, so that every machine is released."""
        for m in self.machines:
            try:
                m.release()
            except Exception as e:
                _skiff.error(f"releasing {m.name}: {e}")


def _report_assertion(e: BaseException, script_name: str, script: str) -> None:
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
        out.append(f"command: {getattr(e, 'command', None)}")
        output = getattr(e, "output", "").rstrip("\n")
        out.append("output:" + ("\n" + output if output else " (none)"))
    _skiff.error("\n".join(out))


def main(
    test_name: str,
    script: str,
    script_name: str,
    out_dir: str,
    state_dir: str,
    interactive: bool,
    cores: Sequence[Any],
    vlans: Sequence[Tuple[int, str, str]] = (),
) -> int:
    """Runs the test script (or, with `interactive`, a REPL with the test
    symbols and no machine started); returns the exit status."""
    driver = Driver(test_name, out_dir, state_dir, cores, script, script_name, vlans)
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
