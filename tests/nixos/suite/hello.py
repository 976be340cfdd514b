# The one machine is bound under its name and as `machine`.
assert machine is vm and machines == [vm], machines
assert repr(vm) == "<Machine 'vm'>"
assert not vm.booted
vm.start()
assert vm.booted
assert vm.succeed("echo hello") == "hello\n"
assert vm.succeed("echo one", "echo two") == "one\ntwo\n"
# Quotes, newlines and bash features survive the framing.
assert vm.succeed("echo 'a b' \"c\"\necho $((6 * 7))") == "a b c\n42\n"
assert vm.succeed("nproc").strip() == "2"
assert vm.is_up()
vm.shutdown()
assert not vm.booted
