"""Shared set-up: a Driver over fake cores, with the clock faked.

`DriverTestCase` gives each test a fresh `Driver` whose machines run on
`FakeCore`s (which also play QMP), and a `FakeClock` as the `time` of
test_driver.machine, so that waits and retries finish at once while their
arithmetic stays real.
"""

import shutil
import tempfile
import unittest
from typing import List, Optional
from unittest import mock

import test_driver.machine as machine_module
from test_driver.driver import Driver
from test_driver.machine import Machine
from tests import fake_skiff
from tests.fake_skiff import FakeClock, FakeCore


class DriverTestCase(unittest.TestCase):
    node_names: List[str] = ["server"]
    script = "pass"

    def setUp(self) -> None:
        fake_skiff.reset()
        self.tmp = tempfile.mkdtemp(prefix="skiff-driver-test-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.clock = FakeClock()
        patcher = mock.patch.object(machine_module, "time", self.clock)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.cores = [FakeCore(n, state_dir=f"{self.tmp}/vm-state-{n}") for n in self.node_names]
        self.driver = self.make_driver(self.script)
        self.machine: Machine = self.driver.machines[0]
        self.core: FakeCore = self.cores[0]

    def make_driver(self, script: str, cores: Optional[List[FakeCore]] = None) -> Driver:
        return Driver("t", self.tmp, self.tmp, cores if cores is not None else self.cores, script, "<t:script>")
