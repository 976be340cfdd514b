"""Machine: what each method asks the core to run, what it returns, and
the log blocks and error texts the upstream API promises."""

import datetime
import os
import unittest

from test_driver.errors import (
    MachineError,
    MachineExited,
    MachineNotRunning,
    NotSupported,
    QMPAPIError,
    RequestedAssertionFailed,
)
from test_driver.qmp import QMPAPIError as UpstreamQMPAPIError
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

    def test_wait_for_console_text_joins_the_lines_it_takes_and_only_those(self) -> None:
        self.machine.start()
        self.core.serial("abc", "def", "ghi")
        # Lines are joined without a separator, as upstream does.
        self.machine.wait_for_console_text("cde")
        # The first call took "abc" and "def": they do not match again.
        with self.assertRaises(RequestedAssertionFailed):
            self.machine.wait_for_console_text("abc", timeout=2)
        self.assertEqual(self.core.console_lines, [])
        self.core.serial("jkl")
        self.machine.wait_for_console_text("jkl")

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
    def test_start_and_shutdown_power_off(self) -> None:
        self.machine.start(allow_reboot=True)
        # The core connects QMP as part of its start.
        self.assertEqual(self.core.calls, ["start(True)"])
        self.assertTrue(self.machine.booted)
        self.machine.start()
        self.assertEqual(self.core.starts, 1)
        self.machine.shutdown()
        self.assertEqual(self.core.raw, [b"poweroff\n"])
        self.assertFalse(self.machine.booted)
        self.machine.shutdown()

    def test_qmp_client_sends_through_the_core(self) -> None:
        client = self.machine.qmp_client
        with self.assertRaises(MachineNotRunning):
            client.send("query-status")
        self.machine.start()
        self.core.qmp_results["query-status"] = lambda _: {"status": "running", "running": True}
        self.assertEqual(client.send("query-status"), {"status": "running", "running": True})
        client.send("set_link", {"name": "nic", "up": False}, timeout=5)
        self.assertEqual(
            self.core.qmp_sent,
            [("query-status", None, 60.0), ("set_link", {"name": "nic", "up": False}, 5.0)],
        )
        # The same client serves the next VMM run.
        self.core.exit(0)
        self.machine.start()
        self.assertIs(self.machine.qmp_client, client)
        self.assertEqual(client.send("stop"), {})

    def test_qmp_error_replies_raise_qmpapierror(self) -> None:
        self.assertIs(UpstreamQMPAPIError, QMPAPIError)
        self.machine.start()

        def refuse(_: object) -> object:
            raise QMPAPIError("server: QMP command nope failed: CommandNotFound: no")

        self.core.qmp_results["nope"] = refuse
        with self.assertRaises(QMPAPIError) as cm:
            self.machine.qmp_client.send("nope")
        self.assertIsInstance(cm.exception, MachineError)

    def test_crash_quits_through_qmp(self) -> None:
        self.machine.start()

        def quit(_: object) -> object:
            self.core.exit(0)
            return {}

        self.core.qmp_results["quit"] = quit
        self.machine.crash()
        self.assertEqual([c[0] for c in self.core.qmp_sent], ["quit"])
        self.assertIn("forced crash", fake_skiff.messages())
        self.assertNotIn("kill", self.core.calls)
        self.assertFalse(self.machine.booted)

    def test_crash_kills_when_qmp_fails(self) -> None:
        self.machine.start()

        def broken(_: object) -> object:
            raise MachineError("server: QMP command quit got no reply")

        self.core.qmp_results["quit"] = broken
        self.machine.crash()
        self.assertIn("kill", self.core.calls)
        self.assertFalse(self.machine.booted)

    def test_the_booted_override_lives_in_the_core(self) -> None:
        self.machine.start()
        self.machine.booted = False
        self.assertFalse(self.machine.booted)
        self.assertFalse(self.machine.is_up())
        # skiff-vmm still runs: shutdown still powers it off.
        self.assertTrue(self.core.running)
        self.machine.booted = True
        self.assertTrue(self.machine.booted)
        # Forgotten when skiff-vmm exits, and at the next start.
        self.machine.booted = False
        self.machine.shutdown()
        self.assertEqual(self.core.raw, [b"poweroff\n"])
        self.machine.start()
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
        self.core.event("RESUME")
        self.core.event("STOP")
        self.core.event("SHUTDOWN", guest=True, reason="guest-shutdown")
        event = self.machine.wait_for_qmp_event(lambda e: e["event"] == "STOP")
        self.assertEqual(event["event"], "STOP")
        # RESUME was dropped on the way; what followed STOP is still there,
        # also once skiff-vmm has exited.
        self.core.exit(0)
        event = self.machine.wait_for_qmp_event(lambda e: True)
        self.assertEqual(event["data"], {"guest": True, "reason": "guest-shutdown"})
        with self.assertRaisesRegex(RuntimeError, "QMP is not connected"):
            self.machine.wait_for_qmp_event(lambda e: True)

    def test_wait_for_qmp_event_times_out(self) -> None:
        self.machine.start()
        self.core.event("RESUME")
        with self.assertRaisesRegex(RequestedAssertionFailed, r"action timed out after 0\.00 seconds \(timeout=5\)"):
            self.machine.wait_for_qmp_event(lambda e: e["event"] == "STOP", timeout=5)
        self.assertEqual(self.core.events, [])

    def test_the_machine_keeps_no_machine_state(self) -> None:
        # Configuration only: whatever changes while a machine runs is the
        # core's.
        expected = {
            "_core", "_driver", "name", "out_dir", "state_dir", "shared_dir", "logger", "callbacks",
            "keep_vm_state", "keep_machine_state", "start_command", "monitor", "qmp_client",
            "process", "allow_reboot",
        }
        self.machine.start()
        self.machine.booted = False
        self.core.serial("x")
        self.machine.wait_for_console_text("x")
        self.machine.send_monitor_command("info status")
        self.core.event("STOP")
        self.machine.wait_for_qmp_event(lambda e: True)
        self.machine.shutdown()
        self.assertEqual(set(vars(self.machine)), expected)

    def test_send_console(self) -> None:
        self.machine.send_console("a\n")
        self.machine.send_console(b"\x04")
        self.assertEqual(self.core.console, [b"a\n", b"\x04"])

    def test_repr(self) -> None:
        self.assertEqual(repr(self.machine), "<Machine 'server'>")


class BlockTest(DriverTestCase):
    def test_block_and_unblock_set_the_first_vlan_card_down_and_up(self) -> None:
        self.machine.start()
        self.machine.block()
        self.machine.unblock()
        self.assertEqual(
            self.core.qmp_sent,
            [
                ("set_link", {"name": "virtio-net-pci.1", "up": False}, 60.0),
                ("set_link", {"name": "virtio-net-pci.1", "up": True}, 60.0),
            ],
        )
        self.assertIn("block(): set_link virtio-net-pci.1 off", fake_skiff.messages("begin"))
        self.assertIn("unblock(): set_link virtio-net-pci.1 on", fake_skiff.messages("begin"))
        # The shell is not the network: commands still run.
        self.machine.succeed("true")

    def test_the_first_card_whatever_its_vlan(self) -> None:
        self.core.vlans = [2, 1]
        self.machine.start()
        self.machine.block()
        self.assertEqual(self.core.qmp_sent[0][1], {"name": "virtio-net-pci.1", "up": False})

    def test_a_node_without_a_vlan_cannot_be_blocked(self) -> None:
        self.core.vlans = []
        self.machine.start()
        for method, name in ((self.machine.block, "block()"), (self.machine.unblock, "unblock()")):
            with self.assertRaises(MachineError) as cm:
                method()
            self.assertEqual(str(cm.exception), f'server: {name} needs a VLAN network card, and the node\'s "vlans" is empty')
        self.assertEqual(self.core.qmp_sent, [])

    def test_a_machine_that_does_not_run_cannot_be_blocked(self) -> None:
        with self.assertRaises(MachineNotRunning):
            self.machine.block()

    def test_polling_conditions_are_checked_first(self) -> None:
        self.machine.start()
        checked = []
        cond = self.driver.polling_condition(lambda: checked.append(1) or True, seconds_interval=0)
        with cond:
            self.machine.block()
        self.assertEqual(checked, [1])


class NotYetSupportedTest(DriverTestCase):
    def test_each_names_the_machine_and_what_is_missing(self) -> None:
        m = self.machine
        cases = [
            (m.screenshot, ("shot",), "screenshot() needs a display"),
            (m.get_screen_text, (), "get_screen_text() needs a display"),
            (m.get_screen_text_variants, (), "get_screen_text_variants() needs a display"),
            (m.wait_for_text, ("login",), "wait_for_text() needs a display"),
            (m.send_key, ("ret",), "send_key() needs a display"),
            (m.send_chars, ("abc",), "send_chars() needs a display"),
        ]
        for method, args, text in cases:
            with self.subTest(method.__name__):
                with self.assertRaises(NotSupported) as cm:
                    method(*args)
                self.assertIsInstance(cm.exception, MachineError)
                self.assertTrue(str(cm.exception).startswith("server: " + text), str(cm.exception))
                self.assertIn('give the node "display": true', str(cm.exception))
        with self.assertRaises(NotSupported) as cm:
            m.forward_port()
        self.assertIn("forward_port() needs a user-mode NIC, which skiff-vmm does not have yet", str(cm.exception))
        self.assertEqual(self.core.commands, [])


class DisplayTest(DriverTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.core.display = True
        # skiff-vmm's HMP prints nothing for a key or screendump it did.
        self.core.qmp_results["human-monitor-command"] = lambda _args: ""
        self.machine.start()

    def hmp_lines(self) -> "list[str]":
        return [a["command-line"] for c, a, _ in self.core.qmp_sent if c == "human-monitor-command"]

    def test_send_chars_types_upstreams_table(self) -> None:
        self.machine.send_chars("aZ !\n-_", delay=None)
        self.assertEqual(
            self.hmp_lines(),
            ["sendkey a", "sendkey shift-z", "sendkey spc", "sendkey shift-0x02", "sendkey ret",
             "sendkey 0x0C", "sendkey shift-0x0C"],
        )
        self.machine.send_key("ctrl-alt-delete", delay=None)
        self.assertEqual(self.hmp_lines()[-1], "sendkey ctrl-alt-delete")

    def test_a_refused_key_raises_with_the_monitors_words(self) -> None:
        self.core.qmp_results["human-monitor-command"] = lambda _args: "invalid parameter: nokey\r\n"
        with self.assertRaisesRegex(MachineError, "server: `sendkey nokey` failed: invalid parameter: nokey"):
            self.machine.send_key("nokey", delay=None)

    def test_screenshot_names_the_file_as_upstream(self) -> None:
        self.machine.screenshot("login")
        [args] = [a for c, a, _ in self.core.qmp_sent if c == "screendump"]
        self.assertEqual(args["format"], "png")
        self.assertEqual(args["filename"], os.path.abspath(os.path.join(self.machine.out_dir, "login.png")))

    def test_screen_text_is_the_vts_when_no_graphical_session_runs(self) -> None:
        class ByPrefix(dict):
            def get(self, command, default=None):
                if command.startswith("for s in /tmp/.X11-unix/X*"):
                    return (0, b"login: root\n~ #\n")
                return default

        self.core.results = ByPrefix()
        self.assertEqual(self.machine.get_screen_text(), "login: root\n~ #\n")
        self.assertEqual(self.machine.get_screen_text_variants(), ["login: root\n~ #\n"])
        self.machine.wait_for_text("~ #", timeout=5)
        with self.assertRaises(ValueError):
            self.machine.get_screen_text(source="guess")

    def test_wait_for_text_reads_ocr_variants_until_one_matches(self) -> None:
        class GraphicalSession(dict):
            def get(self, command, default=None):
                if command.startswith("for s in /tmp/.X11-unix/X*"):
                    return (3, b"")
                return default

        self.core.results = GraphicalSession()
        passes = []

        def ocr(variants):
            for text in ("xterm says hello", "negative"):
                passes.append(text)
                yield text

        self.machine._ocr = ocr
        self.machine.wait_for_text("says hello", timeout=5)
        self.assertEqual(passes, ["xterm says hello"])
        self.assertEqual(self.machine.get_screen_text_variants(), ["xterm says hello", "negative"])
        with self.assertRaisesRegex(MachineError, "no VT text"):
            self.machine.get_screen_text(source="vt")


if __name__ == "__main__":
    unittest.main()
