machine.start(allow_reboot=True)
first = machine.succeed("cat /proc/sys/kernel/random/boot_id")
machine.reboot()
second = machine.succeed("cat /proc/sys/kernel/random/boot_id")
assert first != second, (first, second)
machine.shutdown()
# Without allow_reboot a reboot ends the VM, as QEMU's -no-reboot does.
machine.start()
machine.reboot()
machine.wait_for_shutdown()
assert not machine.booted
