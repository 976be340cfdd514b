"""The `log` global: the driver's logger.

Every method hands its text to the Rust logger in `_skiff`, which writes
the terminal lines, `events.jsonl` and the JUnit report; nothing is
buffered here, so Python and Rust lines keep their order. The method names
and the `attributes` dict (only its "machine" key is used) follow
upstream's AbstractLogger, so scripts that call `log.info(...)` or
`with log.nested(...)` work unchanged.
"""

import sys
import time
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional

import _skiff

Attributes = Mapping[str, str]


class Logger:
    """The driver's logger (terminal, JSON events, JUnit)."""

    def log(self, message: object, attributes: Attributes = {}) -> None:
        """Logs a line, attributed to `attributes["machine"]` if given."""
        _skiff.log(str(message), attributes.get("machine"))

    info = log

    def debug(self, message: object, attributes: Attributes = {}) -> None:
        """Logs a line (skiff has no separate debug level)."""
        _skiff.log(str(message), attributes.get("machine"))

    def warning(self, message: object, attributes: Attributes = {}) -> None:
        """Logs a warning."""
        _skiff.warning(str(message), attributes.get("machine"))

    def error(self, message: object, attributes: Attributes = {}) -> None:
        """Logs an error and ends the run with status 1, as upstream's
        composite logger does."""
        _skiff.error(str(message), attributes.get("machine"))
        sys.exit(1)

    def log_test_error(self, message: object, attributes: Attributes = {}) -> None:
        """Logs an error without ending the run."""
        _skiff.error(str(message), attributes.get("machine"))

    def log_serial(self, message: str, machine: str) -> None:
        """Logs a line of `machine`'s serial console."""
        _skiff.log(f"# {message}", machine)

    def print_serial_logs(self, enable: bool) -> None:
        """Turns the echo of serial lines into the log on or off."""
        _skiff.set_serial_stdout(bool(enable))

    def set_log_level(self, level: object) -> None:
        """Accepted for upstream compatibility; skiff logs everything."""

    @contextmanager
    def nested(self, message: object, attributes: Attributes = {}) -> Iterator[None]:
        """A log block: its lines are indented and its duration is logged
        when it ends."""
        machine: Optional[str] = attributes.get("machine")
        _skiff.begin_nested(str(message), machine)
        start = time.monotonic()
        try:
            yield
        finally:
            _skiff.end_nested(str(message), time.monotonic() - start, machine)

    @contextmanager
    def subtest(self, name: str, attributes: Attributes = {}) -> Iterator[None]:
        """A JUnit test case; an exception inside marks it failed and is
        re-raised."""
        _skiff.subtest_begin(name)
        try:
            yield
        except BaseException as e:
            _skiff.subtest_end(str(e) or type(e).__name__)
            raise
        else:
            _skiff.subtest_end(None)


log = Logger()
