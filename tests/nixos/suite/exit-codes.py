import datetime

machine.start()
assert machine.execute("exit 7") == (7, "")
assert machine.execute("echo out; exit 3") == (3, "out\n")
# Without check_return the status is not asked for.
assert machine.execute("echo hi; exit 5", check_return=False) == (-1, "hi\n")
# The guest-side timeout ends a command with 124.
# coreutils timeout gives 124; busybox's reports the signal (143).
assert machine.execute("sleep 10", timeout=1)[0] in (124, 143)
assert machine.execute("sleep 1", timeout=datetime.timedelta(seconds=30))[0] == 0
# set -euo pipefail applies.
machine.fail("false | true")
machine.fail("echo $SKIFF_UNSET_VARIABLE")
machine.fail("false; true")
assert machine.fail("echo partial; exit 1") == "partial\n"
try:
    machine.fail("true")
except Exception as e:
    assert str(e) == "command `true` unexpectedly succeeded", str(e)
else:
    raise AssertionError("fail() of a succeeding command did not raise")
try:
    machine.succeed("echo boom; exit 4")
except Exception as e:
    assert str(e) == "command `echo boom; exit 4` failed (exit code 4)", str(e)
    assert e.output == "boom\n"
else:
    raise AssertionError("succeed() of a failing command did not raise")
machine.sleep(1)
# Output is streamed to the log while the command runs.
machine.execute("for i in 1 2 3; do echo streamed-$i; sleep 0.3; done", stream=True)
# 2 MiB of output, binary-safe.
out = machine.succeed("head -c 2097152 /dev/zero | tr '\\0' x")
assert out == "x" * 2097152
machine.shutdown()
