machine.start()
# Boot messages printed before the call still match.
machine.wait_for_console_text("Run /init as init process", timeout=120)
machine.succeed("echo skiff-marker-4711 >&2")
machine.wait_for_console_text("skiff-marker-47[0-9]+")
assert "skiff-marker-4711" in machine.get_console_log()
try:
    machine.wait_for_console_text("never-printed-text", timeout=3)
except Exception as e:
    assert "action timed out" in str(e), str(e)
else:
    raise AssertionError("wait_for_console_text did not time out")
serial_stdout_off()
machine.succeed("echo not-echoed-to-the-terminal >&2")
serial_stdout_on()
log.info("a line from the script")
machine.log("a line about the machine")
with log.nested("a nested block"):
    pass
machine.shutdown()
