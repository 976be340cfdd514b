"""PollingCondition and the polling_condition global: when a condition is
checked, what counts as holding, and the errors a failure raises."""

import unittest
from typing import List, Optional

from test_driver.errors import RequestedAssertionFailed
from test_driver.logger import log
from test_driver.polling_condition import PollingCondition, PollingConditionError
from tests import fake_skiff
from tests.helpers import DriverTestCase


class PollingConditionTest(unittest.TestCase):
    def setUp(self) -> None:
        fake_skiff.reset()

    def test_the_description_comes_from_the_docstring_or_the_name(self) -> None:
        def documented() -> None:
            """  the file exists """

        def plain() -> None:
            pass

        self.assertEqual(PollingCondition(documented, log).description, "the file exists")
        self.assertEqual(PollingCondition(plain, log).description, "plain")
        self.assertEqual(PollingCondition(plain, log, description="given").description, "given")

    def test_none_holds_false_and_exceptions_do_not(self) -> None:
        results: List[Optional[bool]] = [None, True, False]

        def cond() -> Optional[bool]:
            "cond"
            if not results:
                raise OSError("gone")
            return results.pop(0)

        c = PollingCondition(cond, log, seconds_interval=0)
        self.assertEqual([c.check(force=True) for _ in range(4)], [True, True, False, False])
        self.assertEqual(fake_skiff.messages().count("cond failed"), 2)

    def test_a_condition_is_checked_once_per_interval(self) -> None:
        calls = []
        c = PollingCondition(lambda: calls.append(1), log, seconds_interval=3600)
        self.assertTrue(c.check())
        self.assertTrue(c.check())
        self.assertEqual(len(calls), 1)
        c.check(force=True)
        self.assertEqual(len(calls), 2)

    def test_maybe_raise(self) -> None:
        def alive() -> bool:
            "the alive file exists"
            return False

        with self.assertRaises(PollingConditionError) as cm:
            PollingCondition(alive, log, seconds_interval=0).maybe_raise()
        self.assertEqual(str(cm.exception), "Polling condition failed: the alive file exists")
        self.assertIsInstance(cm.exception, RequestedAssertionFailed)


class PollingConditionGlobalTest(DriverTestCase):
    def test_commands_check_active_conditions_but_not_their_own(self) -> None:
        self.core.results["test -e /tmp/alive"] = (0, b"")

        @self.driver.polling_condition(seconds_interval=0)
        def alive() -> None:
            "the alive file exists"
            self.machine.succeed("test -e /tmp/alive")

        self.machine.succeed("true")
        self.assertEqual(self.core.ran(), ["true"])
        with alive:
            self.machine.succeed("true")
            # The condition ran its command once; that command did not
            # check the condition again.
            self.assertEqual(self.core.ran(), ["true", "test -e /tmp/alive", "true"])
            self.core.results["test -e /tmp/alive"] = (1, b"")
            with self.assertRaisesRegex(PollingConditionError, "Polling condition failed: the alive file exists"):
                self.machine.succeed("true")
        self.assertEqual(self.driver.polling_conditions, [])
        self.machine.succeed("true")

    def test_bare_decorator_call_and_wait(self) -> None:
        results = [False, False, True]

        @self.driver.polling_condition
        def ready() -> bool:
            return results.pop(0)

        self.assertFalse(ready())
        ready.wait(timeout=30)
        self.assertEqual(results, [])

    def test_wait_times_out_with_the_description(self) -> None:
        @self.driver.polling_condition(description="never")
        def never() -> bool:
            return False

        with self.assertRaisesRegex(RequestedAssertionFailed, "Timeout while waiting for polling condition: never"):
            never.wait(timeout=3)


if __name__ == "__main__":
    unittest.main()
