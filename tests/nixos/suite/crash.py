machine.start()
machine.succeed("true")
machine.crash()
assert not machine.booted
machine.wait_for_shutdown()
# A crashed machine starts again; execute() boots it implicitly.
assert machine.succeed("echo again") == "again\n"
machine.send_console("\n")
machine.shutdown()
machine.shutdown()
