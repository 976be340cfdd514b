# An overlay disk whose layer's file system (skiff-vmm's TMPDIR, a small
# tmpfs here) fills up: the guest's writes fail with I/O errors, skiff-vmm
# and the guest go on, reads still work, and the base image is untouched
# (the harness compares its digest).
machine.start()
# 64 MiB written through the page cache to a disk whose layer has room for
# about 16: the flush fails.
status, out = machine.execute("dd if=/dev/urandom of=/dev/vda bs=1M count=64 conv=fsync 2>&1")
assert status != 0, f"64 MiB fitted into the layer: {out}"
assert "Input/output error" in out or "I/O error" in out, out
machine.succeed("dmesg | grep -q 'I/O error, dev vda'")
# The disk still reads, the guest and its VMM still answer.
machine.succeed("dd if=/dev/vda of=/dev/null bs=1M count=64")
assert machine.qmp_client.send("query-status")["status"] == "running"
machine.succeed("echo alive")
machine.shutdown()
