"""retry() and the duration helpers: tries, timing and the timeout text."""

import datetime
import unittest
from unittest import mock

import test_driver.machine as machine_module
from test_driver.errors import DriverInterrupted, MachineError, RequestedAssertionFailed
from test_driver.machine import _guest_timeout, _seconds, retry
from tests import fake_skiff
from tests.fake_skiff import FakeClock


class RetryTest(unittest.TestCase):
    def setUp(self) -> None:
        fake_skiff.reset()
        self.clock = FakeClock()
        patcher = mock.patch.object(machine_module, "time", self.clock)
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_returns_at_the_first_success_without_a_last_try(self) -> None:
        tries = []
        retry(lambda last: tries.append(last) or len(tries) >= 3, timeout=30)
        self.assertEqual(tries, [False, False, False])
        self.assertEqual(self.clock.slept, [1.0, 1.0])

    def test_timeout_makes_one_last_try_then_raises(self) -> None:
        tries = []
        with self.assertRaises(RequestedAssertionFailed) as cm:
            retry(lambda last: tries.append(last) and False, timeout=3)
        self.assertEqual(tries, [False, False, False, True])
        self.assertEqual(str(cm.exception), "action timed out after 3.00 seconds (timeout=3)")

    def test_a_successful_last_try_does_not_raise(self) -> None:
        retry(lambda last: last, timeout=2)

    def test_the_last_sleep_ends_at_the_timeout(self) -> None:
        with self.assertRaises(RequestedAssertionFailed):
            retry(lambda last: False, timeout=2.5)
        self.assertEqual(self.clock.slept, [1.0, 1.0, 0.5])

    def test_timeout_seconds_and_timedelta(self) -> None:
        with self.assertRaises(RequestedAssertionFailed) as cm:
            retry(lambda last: False, timeout=900, timeout_seconds=2)
        self.assertIn("(timeout=2)", str(cm.exception))
        with self.assertRaises(RequestedAssertionFailed) as cm:
            retry(lambda last: False, timeout=datetime.timedelta(seconds=4))
        self.assertIn("after 4.00 seconds", str(cm.exception))

    def test_an_interrupted_driver_stops_the_wait(self) -> None:
        fake_skiff.interrupt = True
        with self.assertRaisesRegex(DriverInterrupted, "the driver was interrupted") as cm:
            retry(lambda last: False, timeout=60)
        self.assertIsInstance(cm.exception, MachineError)

    def test_a_timeout_that_is_not_a_duration_is_refused(self) -> None:
        for bad in ("10", True, [1]):
            with self.assertRaises(TypeError):
                retry(lambda last: False, timeout=bad)  # type: ignore[arg-type]


class DurationTest(unittest.TestCase):
    def test_seconds(self) -> None:
        self.assertIsNone(_seconds(None))
        self.assertEqual(_seconds(3), 3.0)
        self.assertEqual(_seconds(datetime.timedelta(minutes=1, milliseconds=500)), 60.5)

    def test_guest_timeout_rounds_up_to_whole_seconds(self) -> None:
        self.assertIsNone(_guest_timeout(None))
        self.assertEqual(_guest_timeout(900), 900)
        self.assertEqual(_guest_timeout(2.1), 3)
        self.assertEqual(_guest_timeout(0), 1)
        self.assertEqual(_guest_timeout(datetime.timedelta(minutes=1)), 60)


if __name__ == "__main__":
    unittest.main()
