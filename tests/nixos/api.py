# The NixOS test driver API against a systemd guest (Debian root on
# virtio-blk, backdoor.service on hvc0), in the style of nixpkgs'
# nixos/tests. Each failure path is checked too.
import datetime
import time


def raises(text, call):
    """call() must raise an exception whose message contains text."""
    try:
        call()
    except Exception as e:
        assert text in str(e), f"expected {text!r} in {str(e)!r}"
        return e
    raise AssertionError(f"expected an exception containing {text!r}")


start_all()
server.wait_for_unit("multi-user.target")
assert machine is server and server.is_up()

with subtest("commands"):
    assert server.succeed("echo one", "echo two") == "one\ntwo\n"
    # coreutils' timeout in the guest ends a command with 124.
    assert server.execute("sleep 30", timeout=2)[0] == 124
    assert server.execute("true", timeout=datetime.timedelta(minutes=1)) == (0, "")
    assert server.execute("echo x; exit 9", check_return=False) == (-1, "x\n")
    server.fail("false", "exit 3", "false | true")
    raises("command `true` unexpectedly succeeded", lambda: server.fail("true"))
    raises("command `exit 5` failed (exit code 5)", lambda: server.succeed("exit 5"))
    server.sleep(1)

with subtest("systemd units"):
    server.wait_for_unit("nginx.service")
    assert server.get_unit_info("nginx.service")["ActiveState"] == "active"
    assert server.get_unit_property("nginx.service", "SubState") == "running"
    server.require_unit_state("nginx.service", "active")
    status, out = server.systemctl("is-active nginx.service")
    assert (status, out) == (0, "active\n"), (status, out)
    server.wait_for_open_port(80)
    assert "nginx" in server.succeed("curl -sI http://localhost/").lower()
    assert server.stop_job("nginx.service")[0] == 0
    server.wait_for_closed_port(80, timeout=60)
    raises("to to be in state 'active' but it is in state 'inactive'",
           lambda: server.require_unit_state("nginx.service"))
    raises('unit "nginx.service" is inactive and there are no pending jobs',
           lambda: server.wait_for_unit("nginx.service", timeout=30))
    assert server.start_job("nginx.service")[0] == 0
    server.wait_for_job("nginx.service")
    server.succeed("systemd-run --unit=doomed.service --property=Type=oneshot false || true")
    raises('unit "doomed.service" reached state "failed"',
           lambda: server.wait_for_unit("doomed.service", timeout=30))
    server.wait_for_open_unix_socket("/run/systemd/private")
    raises('retrieving systemctl info for unit "x.service" under user "nosuchuser"',
           lambda: server.get_unit_info("x.service", user="nosuchuser"))

with subtest("waiting"):
    server.succeed("(sleep 3; touch /run/flag) >/dev/null 2>&1 &")
    server.wait_for_file("/run/flag")
    server.succeed("(sleep 2; rm /run/flag) >/dev/null 2>&1 &")
    server.wait_until_fails("test -e /run/flag", timeout=60)
    assert server.wait_until_succeeds("echo ok") == "ok\n"
    t0 = time.monotonic()
    raises("action timed out", lambda: server.wait_until_succeeds("false", timeout=5))
    took = time.monotonic() - t0
    assert 5 <= took < 60, f"wait_until_succeeds(timeout=5) gave up after {took:.1f}s"
    t0 = time.monotonic()
    raises("action timed out", lambda: server.wait_until_fails("true", timeout=datetime.timedelta(seconds=3)))
    assert time.monotonic() - t0 >= 3
    server.succeed("echo api-console-marker > /dev/kmsg")
    server.wait_for_console_text("api-console-marker", timeout=60)
    assert "api-console-marker" in server.get_console_log()

with subtest("a detached child holding stdout"):
    # Upstream hangs here silently; skiff warns after 10 s with the command.
    assert server.succeed("(sleep 12; echo late) &") == "late\n"

with subtest("failures are reported"):
    e = raises("failed (exit code 2)", lambda: server.succeed("echo some output; exit 2"))
    assert e.machine == "server" and e.output == "some output\n"

with subtest("lifecycle"):
    server.crash()
    assert not server.booted
    server.start(allow_reboot=True)
    server.wait_for_unit("multi-user.target")
    boot1 = server.succeed("cat /proc/sys/kernel/random/boot_id")
    server.reboot()
    server.wait_for_unit("multi-user.target")
    assert server.succeed("cat /proc/sys/kernel/random/boot_id") != boot1
    server.shutdown()
    assert not server.booted
