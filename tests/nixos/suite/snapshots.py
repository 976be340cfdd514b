# machine.snapshot(name) / machine.restore(name): a script resets a machine
# to a saved instant, RAM and overlay disk included, as often as it likes.
import time

SECTOR = "dd of=/dev/vda bs=512 seek=2048 conv=fsync 2>/dev/null"
READ = "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -c 6"

machine.start()
machine.succeed(f"echo one > /tmp/state && printf before | {SECTOR}")
machine.snapshot("clean")
# The machine runs on after the save.
machine.succeed(f"echo two > /tmp/state && touch /tmp/extra && printf after! | {SECTOR}")
assert machine.succeed(READ) == "after!"
for attempt in (1, 2):
    machine.restore("clean")
    assert machine.succeed("cat /tmp/state") == "one\n", attempt
    machine.fail("test -e /tmp/extra")
    # Read past the page cache: the overlay came back with the snapshot.
    assert machine.succeed(READ) == "before", attempt
    # The driver set the guest's clock right after the restore. `date +%s`
    # rounds down: the guest's time lies in [guest, guest + 1).
    before = time.time()
    guest = int(machine.succeed("date +%s"))
    after = time.time()
    assert before - 2 <= guest + 1 and guest <= after + 2, (before, guest, after)
    machine.succeed("touch /tmp/extra")

# Bad names and missing snapshots are refused, naming the problem.
for call, name, want in ((machine.snapshot, "../up", "snapshot name"),
                         (machine.restore, "missing", "no snapshot named")):
    try:
        call(name)
    except Exception as e:
        assert want in str(e), str(e)
    else:
        raise AssertionError(f"{call.__name__}({name!r}) was accepted")
machine.succeed("true")
machine.shutdown()
