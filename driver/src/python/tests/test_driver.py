"""Driver and main(): the globals a script sees, how a run ends, and the
report of a failed assertion."""

import ast
import inspect
import unittest
from pathlib import Path

import test_driver.driver as driver_module
from test_driver.driver import main
from test_driver.errors import NotSupported, RequestedAssertionFailed
from tests import fake_skiff
from tests.fake_skiff import FakeCore
from tests.helpers import DriverTestCase

UPSTREAM_SYMBOLS = {
    "start_all",
    "test_script",
    "run_tests",
    "machines",
    "machines_qemu",
    "machines_nspawn",
    "vlans",
    "driver",
    "log",
    "os",
    "create_machine",
    "subtest",
    "join_all",
    "retry",
    "serial_stdout_off",
    "serial_stdout_on",
    "polling_condition",
    "Machine",
    "BaseMachine",
    "t",
    "debug",
}


class SymbolsTest(DriverTestCase):
    node_names = ["node-a", "node-b"]

    def test_two_machines_are_bound_by_python_name_and_there_is_no_machine(self) -> None:
        symbols = self.driver.test_symbols()
        self.assertEqual(set(symbols), UPSTREAM_SYMBOLS | {"node_a", "node_b"})
        self.assertIs(symbols["node_a"], self.driver.machines[0])
        self.assertEqual([m.name for m in symbols["machines"]], ["node-a", "node-b"])

    def test_one_machine_is_also_machine(self) -> None:
        driver = self.make_driver("pass", [FakeCore("web-1")])
        symbols = driver.test_symbols()
        self.assertEqual(set(symbols), UPSTREAM_SYMBOLS | {"web_1", "machine"})
        self.assertIs(symbols["machine"], symbols["web_1"])

    def test_the_symbol_table_has_no_duplicate_key(self) -> None:
        tree = ast.parse(inspect.getsource(driver_module))
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
                self.assertEqual(len(keys), len(set(keys)), f"duplicate keys in {keys}")

    def test_t_raises_requested_assertion_failed(self) -> None:
        t = self.driver.test_symbols()["t"]
        t.assertIn("a", "abc")
        with self.assertRaises(RequestedAssertionFailed):
            t.assertEqual(1, 2)

    def test_start_all_and_join_all(self) -> None:
        self.driver.start_all()
        self.assertTrue(all(m.booted for m in self.driver.machines))
        self.assertIn("start all VMs", fake_skiff.messages("begin"))
        for core in self.cores:
            core.exit(0)
        self.driver.join_all()

    def test_create_machine_is_refused(self) -> None:
        with self.assertRaisesRegex(NotSupported, "add the node to the test description"):
            self.driver.create_machine("run-x-vm")

    def test_serial_stdout(self) -> None:
        self.driver.serial_stdout_off()
        self.assertFalse(fake_skiff.serial_stdout)
        self.driver.serial_stdout_on()
        self.assertTrue(fake_skiff.serial_stdout)

    def test_release_logs_errors_and_releases_every_machine(self) -> None:
        def broken() -> None:
            raise OSError("stuck")

        self.cores[0].release = broken  # type: ignore[method-assign]
        self.driver.release()
        self.assertEqual(fake_skiff.messages("error"), ["releasing node-a: stuck"])
        self.assertEqual(self.cores[1].calls, ["release"])


class VlanSymbolsTest(DriverTestCase):
    node_names = ["client", "vlan2"]
    VLANS = [(1, "/s/vlan1", "/s/vlan1/socket"), (2, "/s/vlan2", "/s/vlan2/socket")]

    def test_each_vlan_is_in_vlans_and_a_global_of_its_own(self) -> None:
        driver = self.make_driver("pass")
        self.assertEqual(driver.vlans, [])
        self.assertNotIn("vlan1", driver.test_symbols())
        driver = driver_module.Driver("t", self.tmp, self.tmp, self.cores, "pass", "<t:script>", self.VLANS)
        symbols = driver.test_symbols()
        self.assertEqual(set(symbols), UPSTREAM_SYMBOLS | {"client", "vlan1", "vlan2"})
        vlans = symbols["vlans"]
        self.assertIs(vlans, driver.vlans)
        self.assertEqual([v.nr for v in vlans], [1, 2])
        self.assertIs(symbols["vlan1"], vlans[0])
        # A VLAN wins over a machine of the same name, as upstream.
        self.assertIs(symbols["vlan2"], vlans[1])
        self.assertEqual(vlans[1].socket_dir, Path("/s/vlan2"))
        self.assertEqual(vlans[1].socket, Path("/s/vlan2/socket"))
        self.assertEqual(repr(vlans[0]), "<Vlan Nr. 1>")

    def test_main_passes_the_vlans_to_the_script(self) -> None:
        script = "assert [v.nr for v in vlans] == [1, 2]\nassert str(vlan2.socket_dir) == '/s/vlan2'\n"
        self.assertEqual(main("t", script, "<t:script>", self.tmp, self.tmp, False, self.cores, self.VLANS), 0)
        exposed = fake_skiff.messages()[0].split(": ", 1)[1].split(", ")
        self.assertIn("vlan1", exposed)
        self.assertEqual(main("t", "assert vlans == []\n", "<t:script>", self.tmp, self.tmp, False, self.cores), 0)


class MainTest(DriverTestCase):
    def run_main(self, script: str) -> int:
        return main("t", script, "<t:script>", self.tmp, self.tmp, False, self.cores)

    def test_a_passing_script_syncs_and_finishes(self) -> None:
        self.assertEqual(self.run_main("machine.succeed('true')\n"), 0)
        self.assertEqual(self.core.ran(), ["true", "sync"])
        logged = fake_skiff.messages()
        self.assertTrue(logged[0].startswith("additionally exposed symbols: start_all, test_script, run_tests,"))
        self.assertNotIn("server", logged[0].split(": ", 1)[1].split(", "))
        self.assertTrue(logged[-1].startswith("test script finished in "))
        self.assertEqual(self.core.calls[-1], "release")

    def test_a_failed_command_reports_the_script_frame_machine_command_and_output(self) -> None:
        self.core.results["echo some output here; exit 3"] = (3, b"some output here\n")
        script = "with subtest('breaks'):\n    server.succeed('echo some output here; exit 3')\nserver.succeed('echo never reached')\n"
        self.assertEqual(self.run_main(script), 1)
        self.assertNotIn("echo never reached", self.core.ran())
        [report] = fake_skiff.messages("error")
        self.assertEqual(
            report.splitlines(),
            [
                "Traceback (most recent call last):",
                '  File "<t:script>", line 2, in <module>',
                "    server.succeed('echo some output here; exit 3')",
                "",
                "RequestedAssertionFailed: command `echo some output here; exit 3` failed (exit code 3)",
                "machine: server",
                "command: echo some output here; exit 3",
                "output:",
                "some output here",
            ],
        )
        self.assertIn(("subtest_end", "command `echo some output here; exit 3` failed (exit code 3)", None), fake_skiff.events)
        self.assertTrue(fake_skiff.messages()[-1].startswith("test script failed after "))

    def test_a_failed_assertion_without_a_command(self) -> None:
        self.assertEqual(self.run_main("t.assertEqual(1, 2)\n"), 1)
        report = fake_skiff.messages("error")[0]
        self.assertIn("RequestedAssertionFailed: 1 != 2", report)
        self.assertNotIn("machine:", report)

    def test_machine_errors_and_other_exceptions_show_the_traceback(self) -> None:
        for script, text in (("server.screenshot('x')\n", "NotSupported: server: screenshot() needs a display"), ("1 / 0\n", "ZeroDivisionError")):
            with self.subTest(script):
                fake_skiff.reset()
                self.assertEqual(self.run_main(script), 1)
                [report] = fake_skiff.messages("error")
                self.assertTrue(report.startswith("Traceback (most recent call last):"), report)
                self.assertIn('File "<t:script>", line 1', report)
                self.assertTrue(report.endswith(text) or text in report, report)

    def test_sys_exit_gives_its_status(self) -> None:
        self.assertEqual(self.run_main("import sys\nsys.exit(3)\n"), 3)
        self.assertEqual(self.run_main("import sys\nsys.exit('no')\n"), 1)

    def test_the_package_is_importable_from_a_script(self) -> None:
        self.assertEqual(self.run_main("import test_driver.machine\nassert test_driver.machine.Machine is Machine\n"), 0)

    def test_a_machine_set_not_booted_gets_no_final_sync(self) -> None:
        self.assertEqual(self.run_main("machine.succeed('true')\nmachine.booted = False\n"), 0)
        self.assertEqual(self.core.ran(), ["true"])


if __name__ == "__main__":
    unittest.main()
