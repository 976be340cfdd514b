# skiff-vmm killed under a running test: the next command fails the test
# with the reason (the VMM's status) and the last console lines, and the
# other tests of the same --jobs run go on.
import os
import signal

machine.start()
machine.succeed("echo vmm-killed-console-line > /dev/ttyS0")
os.kill(machine.pid, signal.SIGKILL)
machine.succeed("echo never reached")
