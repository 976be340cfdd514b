import time

machine.start()
with subtest("retry"):
    tries = []
    retry(lambda last: tries.append(last) or len(tries) >= 3, timeout=30)
    assert tries == [False, False, False], tries
    retry(lambda last: True, timeout_seconds=5)
    t0 = time.monotonic()
    try:
        retry(lambda last: False, timeout=3)
    except Exception as e:
        assert "action timed out" in str(e)
    else:
        raise AssertionError("retry did not time out")
    assert time.monotonic() - t0 >= 3

with subtest("wait_until"):
    machine.succeed("(sleep 2; touch /tmp/ready) >/dev/null 2>&1 &")
    machine.wait_for_file("/tmp/ready", timeout=60)
    assert machine.wait_until_succeeds("test -e /tmp/ready && echo yes") == "yes\n"
    machine.succeed("(sleep 2; rm /tmp/ready) >/dev/null 2>&1 &")
    machine.wait_until_fails("test -e /tmp/ready")
    t0 = time.monotonic()
    try:
        machine.wait_until_succeeds("false", timeout=4)
    except Exception as e:
        assert "action timed out" in str(e), str(e)
    else:
        raise AssertionError("wait_until_succeeds did not time out")
    took = time.monotonic() - t0
    # Raised after its timeout, not before.
    assert 4 <= took < 60, took

with subtest("assertions"):
    t.assertEqual(machine.succeed("echo 1").strip(), "1")
    t.assertIn("Linux", machine.succeed("uname -s"))
    try:
        t.assertEqual(1, 2)
    except AssertionError as e:
        assert type(e).__name__ == "RequestedAssertionFailed"

with subtest("polling conditions"):
    machine.succeed("touch /tmp/alive")

    @polling_condition(seconds_interval=0)
    def alive():
        "the alive file exists"
        machine.succeed("test -e /tmp/alive")

    with alive:
        machine.succeed("true")
        machine.succeed("rm /tmp/alive")
        try:
            machine.succeed("true")
        except Exception as e:
            assert "Polling condition failed: the alive file exists" in str(e), str(e)
        else:
            raise AssertionError("a failing polling condition did not raise")
    machine.succeed("true")

with subtest("monitor and QMP events"):
    assert "VM status: running" in machine.send_monitor_command("info status")
    machine.send_monitor_command("stop")
    assert machine.wait_for_qmp_event(lambda e: e["event"] == "STOP", timeout=30)["event"] == "STOP"
    assert "VM status: paused" in machine.send_monitor_command("info status")
    machine.send_monitor_command("cont")
    machine.wait_for_qmp_event(lambda e: e["event"] == "RESUME", timeout=30)
    assert machine.succeed("echo resumed") == "resumed\n"

with subtest("block and unblock the node's card"):
    # The node is on VLAN 1 by default: its card is eth1, plugged.
    machine.succeed("grep -qx up /sys/class/net/eth1/operstate")
    machine.block()
    machine.wait_until_succeeds("grep -qx down /sys/class/net/eth1/operstate", timeout=30)
    machine.unblock()
    machine.wait_until_succeeds("grep -qx up /sys/class/net/eth1/operstate", timeout=30)

with subtest("not available yet"):
    for call in (
        lambda: machine.screenshot("shot"),
        lambda: machine.send_key("ret"),
        lambda: machine.send_chars("abc"),
        lambda: machine.get_screen_text(),
        lambda: machine.wait_for_text("login"),
        lambda: machine.forward_port(),
    ):
        try:
            call()
        except Exception as e:
            assert "needs" in str(e), str(e)
        else:
            raise AssertionError("a display/monitor method did not raise")
machine.shutdown()
