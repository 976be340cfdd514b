"""Machine: what each method asks the core to run, what it returns, and
the log blocks and error texts the upstream API promises."""

import datetime
import unittest

from test_driver.errors import MachineError, MachineExited, NotSupported, RequestedAssertionFailed
from tests import fake_skiff
from tests.helpers import DriverTestCase


class ExecuteTest(DriverTestCase):
    def test_execute_connects_and_passes_the_guest_timeout(self) -> None:
        self.assertFalse(self.machine.booted)
        self.assertEqual(self.machine.execute("true"), (0, ""))
        self.assertTrue(self.machine.is_up())
        # Connecting is the core's job, done once.
        self.assertEqual(self.core.calls, ["connect", "start(False)"])
        self.machine.execute("a", timeout=None)
        self.machine.execute("b", timeout=datetime.timedelta(minutes=2))
        self.machine.execute("c", timeout=2.5, stream=True)
        self.assertEqual(
            self.core.commands,
            [
                ("true", True, True, 900, False),
                ("a", True, True, None, False),
                ("b", True, True, 120, False),
                ("c", True, True, 3, True),
            ],
        )

    def test_execute_results(self) -> None:
        self.core.results["x"] = (9, b"caf\xc3\xa9 \xff\n")
        self.assertEqual(self.machine.execute("x"), (9, "café \ufffd\n"))
        self.core.results["y"] = (5, b"hi\n")
        self.assertEqual(self.machine.execute("y", check_return=False), (-1, "hi\n"))
        self.assertEqual(self.machine.execute("poweroff", check_output=False), (-2, ""))

    def test_succeed_joins_outputs_without_a_timeout(self) -> None:
        self.core.results["echo one"] = (0, b"one\n")
        self.core.results["echo two"] = (0, b"two\n")
        self.assertEqual(self.machine.succeed("echo one", "echo two"), "one\ntwo\n")
        self.assertEqual([c[3] for c in self.core.commands], [None, None])
        self.assertIn("must succeed: echo one", fake_skiff.messages("begin"))

    def test_succeed_failure_names_machine_command_and_output(self) -> None:
        self.core.results["echo some output; exit 2"] = (2, b"some output\n")
        with self.assertRaises(RequestedAssertionFailed) as cm:
            self.machine.succeed("echo some output; exit 2", "never run")
        e = cm.exception
        self.assertEqual(str(e), "command `echo some output; exit 2` failed (exit code 2)")
        self.assertEqual((e.machine, e.command, e.output), ("server", "echo some output; exit 2", "some output\n"))  # type: ignore[attr-defined]
        self.assertIn(("log", "output: some output\n", "server"), fake_skiff.events)
        self.assertNotIn("never run", self.core.ran())

    def test_fail(self) -> None:
        self.core.results["false"] = (1, b"partial\n")
        self.assertEqual(self.machine.fail("false", "false"), "partial\npartial\n")
        with self.assertRaises(RequestedAssertionFailed) as cm:
            self.machine.fail("true")
        self.assertEqual(str(cm.exception), "command `true` unexpectedly succeeded")
        self.assertEqual(cm.exception.machine, "server")  # type: ignore[attr-defined]

    def test_wait_until_succeeds_returns_the_last_output(self) -> None:
        tries = []

        def flaky(command: str) -> tuple:
            tries.append(command)
            return (0, b"yes\n") if len(tries) == 3 else (1, b"")

        self.core.results["test -e /ready"] = flaky
        self.assertEqual(self.machine.wait_until_succeeds("test -e /ready", timeout=60), "yes\n")
        self.assertEqual(len(tries), 3)
        # Each try gets the whole budget as its guest-side timeout.
        self.assertEqual({c[3] for c in self.core.commands}, {60})
        self.assertIn("waiting for success: test -e /ready", fake_skiff.messages("begin"))

    def test_wait_until_succeeds_times_out(self) -> None:
        self.core.results["false"] = (1, b"")
        with self.assertRaisesRegex(RequestedAssertionFailed, r"action timed out after 4\.00 seconds \(timeout=4\)"):
            self.machine.wait_until_succeeds("false", timeout=4)
        self.assertEqual(len(self.core.commands), 5)

    def test_wait_until_fails_and_attempt_timeout(self) -> None:
        self.core.results["false"] = (1, b"out\n")
        self.assertEqual(self.machine.wait_until_fails("false", attempt_timeout=7), "out\n")
        self.assertEqual(self.core.commands[0][3], 7)
        with self.assertRaisesRegex(RequestedAssertionFailed, "action timed out"):
            self.machine.wait_until_fails("true", timeout=datetime.timedelta(seconds=3))

    def test_sleep_runs_in_the_guest(self) -> None:
        self.machine.sleep(1)
        self.machine.sleep(datetime.timedelta(milliseconds=1500))
        self.assertEqual(self.core.ran(), ["sleep 1", "sleep 1.5"])

    def test_callbacks_run_before_each_command(self) -> None:
        seen = []
        self.machine.callbacks.append(lambda: seen.append(len(self.core.commands)))
        self.machine.succeed("a", "b")
        self.assertEqual(seen, [0, 1])


class SystemdTest(DriverTestCase):
    def show(self, unit: str, prop: str) -> str:
        return f'systemctl --no-pager show "{unit}" --property="{prop}"'

    def test_systemctl_for_a_user(self) -> None:
        self.machine.systemctl("start it's", user="alice")
        self.assertEqual(
            self.core.ran(),
            ["su -l alice --shell /bin/sh -c $'XDG_RUNTIME_DIR=/run/user/`id -u` systemctl --user start it\\'s'"],
        )

    def test_start_and_stop_job_do_not_raise(self) -> None:
        self.core.results["systemctl stop x"] = (5, b"")
        self.assertEqual(self.machine.stop_job("x"), (5, ""))
        self.assertEqual(self.machine.start_job("x"), (0, ""))

    def test_get_unit_info(self) -> None:
        self.core.results['systemctl --no-pager show "a.service"'] = (0, b"ActiveState=active\nId=a.service\nnot a pair\n")
        self.assertEqual(self.machine.get_unit_info("a.service"), {"ActiveState": "active", "Id": "a.service"})
        with self.assertRaises(RequestedAssertionFailed) as cm:
            self.core.results[
                "su -l nosuchuser --shell /bin/sh -c $'XDG_RUNTIME_DIR=/run/user/`id -u` "
                'systemctl --user --no-pager show "x.service"\''
            ] = (1, b"")
            self.machine.get_unit_info("x.service", user="nosuchuser")
        self.assertEqual(
            str(cm.exception),
            'retrieving systemctl info for unit "x.service" under user "nosuchuser" failed with exit code 1',
        )

    def test_get_unit_property(self) -> None:
        self.core.results[self.show("a", "SubState")] = (0, b"SubState=running\n")
        self.assertEqual(self.machine.get_unit_property("a", "SubState"), "running")
        self.core.results[self.show("a", "Id")] = (0, b"garbage\n")
        with self.assertRaisesRegex(RequestedAssertionFailed, 'is not of the form "Id=value"'):
            self.machine.get_unit_property("a", "Id")

    def test_require_unit_state_keeps_upstreams_text(self) -> None:
        self.core.results[self.show("nginx.service", "ActiveState")] = (0, b"ActiveState=inactive\n")
        with self.assertRaises(RequestedAssertionFailed) as cm:
            self.machine.require_unit_state("nginx.service")
        self.assertEqual(
            str(cm.exception),
            "Expected unit 'nginx.service' to to be in state 'active' but it is in state 'inactive'",
        )

    def test_wait_for_unit(self) -> None:
        states = iter([b"activating", b"activating", b"active"])
        self.core.results[self.show("a", "ActiveState")] = lambda _: (0, b"ActiveState=" + next(states) + b"\n")
        self.machine.wait_for_unit("a")
        self.assertIn("waiting for unit a", fake_skiff.messages("begin"))

    def test_wait_for_unit_stops_at_failed_and_at_inactive_without_jobs(self) -> None:
        self.core.results[self.show("doomed", "ActiveState")] = (0, b"ActiveState=failed\n")
        with self.assertRaisesRegex(RequestedAssertionFailed, 'unit "doomed" reached state "failed"'):
            self.machine.wait_for_unit("doomed")
        self.core.results[self.show("off", "ActiveState")] = (0, b"ActiveState=inactive\n")
        self.core.results["systemctl list-jobs --full 2>&1"] = (0, b"No jobs running.\n")
        self.core.results['systemctl --no-pager show "off"'] = (0, b"ActiveState=inactive\n")
        with self.assertRaisesRegex(RequestedAssertionFailed, 'unit "off" is inactive and there are no pending jobs'):
            self.machine.wait_for_unit("off", timeout=30)


class WaitingTest(DriverTestCase):
    def test_wait_for_file_and_ports(self) -> None:
        self.machine.wait_for_file("/run/flag")
        self.machine.wait_for_open_port(80)
        self.machine.wait_for_open_unix_socket("/run/s", is_datagram=True)
        self.core.results["nc -z localhost 81"] = (1, b"")
        self.machine.wait_for_closed_port(81)
        self.assertEqual(
            self.core.ran(),
            ["test -e /run/flag", "nc -z localhost 80", "nc -z -uU /run/s", "nc -z localhost 81"],
        )

    def test_wait_for_console_text_sees_earlier_lines(self) -> None:
        self.machine.start()
        self.core.serial("boot", "Run /init as init process", "after")
        self.machine.wait_for_console_text("Run /init")
        # What followed the match is still there for the next call.
        self.machine.wait_for_console_text("after")
        self.assertEqual(self.machine.get_console_log(), "boot\nRun /init as init process\nafter")

    def test_wait_for_console_text_times_out(self) -> None:
        self.machine.start()
        with self.assertRaisesRegex(RequestedAssertionFailed, r"action timed out after 3\.\d\d seconds \(timeout=3\)"):
            self.machine.wait_for_console_text("never", timeout=3)

    def test_wait_for_console_text_fails_when_the_vm_exits(self) -> None:
        self.machine.start()
        self.core.exit(1)
        with self.assertRaises(MachineExited) as cm:
            self.machine.wait_for_console_text("never")
        self.assertEqual(str(cm.exception), "server: the VM exited (status 1) while waiting for 'never' on the console")


class LifecycleTest(DriverTestCase):
    def test_start_opens_qmp_and_shutdown_powers_off(self) -> None:
        self.machine.start(allow_reboot=True)
        self.assertEqual(self.core.calls, ["start(True)"])
        self.assertTrue(self.machine.booted)
        assert self.machine.qmp_client is not None
        self.assertTrue(self.machine.qmp_client.path.endswith("vm-state-server/qmp"))
        self.machine.start()
        self.assertEqual(self.core.starts, 1)
        self.machine.shutdown()
        self.assertEqual(self.core.raw, [b"poweroff\n"])
        self.assertFalse(self.machine.booted)
        self.machine.shutdown()

    def test_crash_quits_through_qmp(self) -> None:
        self.machine.start()
        qmp = self.machine.qmp_client
        assert qmp is not None
        real_send = qmp.send

        def send(cmd: str, args: object = None, timeout: float = 60.0) -> object:
            if cmd == "quit":
                self.core.exit(0)
            return real_send(cmd, args, timeout)

        qmp.send = send  # type: ignore[method-assign]
        self.machine.crash()
        self.assertEqual(qmp.sent, [("quit", None)])
        self.assertIn("forced crash", fake_skiff.messages())
        self.assertFalse(self.machine.booted)

    def test_the_booted_override(self) -> None:
        self.machine.start()
        self.machine.booted = False
        self.assertFalse(self.machine.booted)
        self.assertFalse(self.machine.is_up())
        self.machine.booted = True
        self.assertTrue(self.machine.booted)

    def test_reboot_disconnects(self) -> None:
        self.machine.start(allow_reboot=True)
        self.machine.reboot()
        self.assertEqual(self.core.commands[-1], ("systemctl reboot 2>/dev/null || reboot", False, False, 900, False))
        self.assertFalse(self.machine.connected)

    def test_monitor_commands_go_through_qmp(self) -> None:
        self.machine.start()
        self.assertEqual(self.machine.send_monitor_command("info status"), "ran info status")

    def test_wait_for_qmp_event_needs_qmp(self) -> None:
        with self.assertRaisesRegex(RuntimeError, "QMP is not connected"):
            self.machine.wait_for_qmp_event(lambda e: True)
        self.machine.start()
        assert self.machine.qmp_client is not None
        self.machine.qmp_client.events.put({"event": "RESUME"})
        self.machine.qmp_client.events.put({"event": "STOP"})
        self.assertEqual(self.machine.wait_for_qmp_event(lambda e: e["event"] == "STOP"), {"event": "STOP"})

    def test_send_console(self) -> None:
        self.machine.send_console("a\n")
        self.machine.send_console(b"\x04")
        self.assertEqual(self.core.console, [b"a\n", b"\x04"])

    def test_repr(self) -> None:
        self.assertEqual(repr(self.machine), "<Machine 'server'>")


class NotYetSupportedTest(DriverTestCase):
    def test_each_names_the_machine_and_what_is_missing(self) -> None:
        m = self.machine
        cases = [
            (m.screenshot, ("shot",), "screenshot() needs a display (virtio-gpu)"),
            (m.get_screen_text, (), "get_screen_text() needs a display (virtio-gpu)"),
            (m.get_screen_text_variants, (), "get_screen_text_variants() needs a display"),
            (m.wait_for_text, ("login",), "wait_for_text() needs a display"),
            (m.send_key, ("ret",), "send_key() needs a keyboard and a display"),
            (m.send_chars, ("abc",), "send_chars() needs a keyboard and a display"),
            (m.block, (), "block() needs virtio-net"),
            (m.unblock, (), "unblock() needs virtio-net"),
            (m.forward_port, (), "forward_port() needs a user-mode NIC"),
        ]
        for method, args, text in cases:
            with self.subTest(method.__name__):
                with self.assertRaises(NotSupported) as cm:
                    method(*args)
                self.assertIsInstance(cm.exception, MachineError)
                self.assertTrue(str(cm.exception).startswith("server: " + text), str(cm.exception))
                self.assertIn("which skiff-vmm does not have yet", str(cm.exception))
        self.assertEqual(self.core.commands, [])


if __name__ == "__main__":
    unittest.main()
