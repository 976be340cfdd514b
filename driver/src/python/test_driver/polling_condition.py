"""Polling conditions: checks that must keep holding while a script runs.

A condition registered with `polling_condition` is checked before every
command a machine runs (`Machine.execute`), at most once per
`seconds_interval`; a check that fails raises `PollingConditionError`,
which stops the script like any requested assertion. While a condition's
own check runs it is "entered", so the commands it runs do not re-check it.
"""

import time
from typing import Callable, Optional

from test_driver.errors import RequestedAssertionFailed
from test_driver.logger import Logger
from test_driver.machine import retry


class PollingConditionError(RequestedAssertionFailed):
    """A polling condition failed."""


class PollingCondition:
    """One condition, its interval and its description (by default the
    function's docstring, else its name)."""

    def __init__(
        self,
        condition: Callable[[], Optional[bool]],
        logger: Logger,
        seconds_interval: float = 2.0,
        description: Optional[str] = None,
    ) -> None:
        self.condition = condition
        self.logger = logger
        self.seconds_interval = seconds_interval
        self.description: str = description or (condition.__doc__ or condition.__name__).strip()
        self.last_called = float("-inf")
        self.entry_count = 0

    def check(self, force: bool = False) -> bool:
        """Runs the condition if it is due (or `force`); returns whether it
        holds. A condition that returns None holds; one that raises does
        not."""
        if (self.entered or not self.overdue) and not force:
            return True
        with self:
            with self.logger.nested(f"waiting for {self.description}"):
                try:
                    res = self.condition()
                except Exception:
                    res = False
                res = res is None or res
                if not res:
                    self.logger.log(f"{self.description} failed")
            self.last_called = time.monotonic()
            return bool(res)

    def maybe_raise(self) -> None:
        """Raises `PollingConditionError` if the condition is due and fails."""
        if not self.check():
            raise PollingConditionError(f"Polling condition failed: {self.description}")

    @property
    def overdue(self) -> bool:
        """Whether `seconds_interval` has passed since the last check."""
        return self.last_called + self.seconds_interval < time.monotonic()

    @property
    def entered(self) -> bool:
        """Whether the condition's own check is running."""
        return self.entry_count > 0

    def __enter__(self) -> None:
        self.entry_count += 1

    def __exit__(self, *exc: object) -> None:
        self.entry_count -= 1

    def wait(self, timeout: float = 900) -> None:
        """Checks the condition once a second until it holds; raises
        `RequestedAssertionFailed` after `timeout` seconds."""

        def condition(last_try: bool) -> bool:
            if last_try:
                raise RequestedAssertionFailed(
                    f"Timeout while waiting for polling condition: {self.description}"
                )
            return self.check(force=True)

        with self.logger.nested(f"waiting for {self.description}"):
            retry(condition, timeout=timeout)
