# One of the load run's thirty tests (the harness writes their descriptions):
# a busybox guest boots, answers a command and powers off.
machine.start()
assert machine.succeed("echo $((6 * 7))") == "42\n"
machine.shutdown()
