# skiff-vmm's QMP socket driven by qemu.qmp, QEMU's own Python client from
# PyPI, unmodified: negotiate, query-status, stop (the guest makes no
# progress), cont, system_powerdown through the ACPI power button, the
# POWERDOWN and SHUTDOWN events, and a clean exit.
import asyncio
import os
import time

from qemu.qmp import QMPClient

machine.start()
machine.wait_for_unit("multi-user.target")
# A ticker on the serial console shows whether the guest runs.
machine.succeed("(while :; do echo tick; sleep 0.2; done) >/dev/ttyS0 2>&1 &")
machine.wait_for_console_text("tick")


def ticks():
    return machine.get_console_log().count("tick")


async def next_event(listener, name, timeout=120):
    while True:
        event = await asyncio.wait_for(listener.get(), timeout)
        log.info(f"QMP event: {event}")
        if event["event"] == name:
            return event


async def session(path):
    qmp = QMPClient("skiff-qmp-test")
    await qmp.connect(path)
    status = await qmp.execute("query-status")
    assert status["status"] == "running" and status["running"] is True, status

    # qmp.events is the client's default listener: every event since connect.
    events = qmp.events
    assert await qmp.execute("stop") == {}
    await next_event(events, "STOP", 10)
    status = await qmp.execute("query-status")
    assert status["status"] == "paused" and status["running"] is False, status
    await asyncio.sleep(1)
    before = ticks()
    await asyncio.sleep(3)
    assert ticks() == before, f"the paused guest went on ticking ({before} -> {ticks()})"

    assert await qmp.execute("cont") == {}
    await next_event(events, "RESUME", 10)
    status = await qmp.execute("query-status")
    assert status["status"] == "running", status
    t0 = time.monotonic()
    while ticks() <= before + 3:
        assert time.monotonic() - t0 < 60, "the resumed guest does not tick"
        await asyncio.sleep(0.2)

    assert await qmp.execute("system_powerdown") == {}
    await next_event(events, "POWERDOWN", 10)
    shutdown = await next_event(events, "SHUTDOWN", 300)
    assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}, shutdown
    await qmp.disconnect()


asyncio.run(session(os.path.join(machine.state_dir, "qmp")))
machine.wait_for_shutdown()
assert machine._core.last_exit == 0, machine._core.last_exit
