# skiff-vmm's QMP socket driven by qemu.qmp, QEMU's own Python client from
# PyPI, unmodified: negotiate, query-status, stop (the guest makes no
# progress), cont, system_powerdown through the ACPI power button, the
# POWERDOWN and SHUTDOWN events, and a clean exit; with the node's display,
# screendump (PPM and PNG files of QEMU's shapes for the mode), send-key
# and query-mice.
import asyncio
import os
import struct
import time

from qemu.qmp import ExecuteError, QMPClient

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

    # The screen, as QEMU 7.2 writes it for a 1024x768 mode: a binary PPM
    # of exactly header + 3 bytes a pixel, and a PNG of that size.
    ppm = os.path.join(machine.out_dir, "qmp-screen.ppm")
    assert await qmp.execute("screendump", {"filename": ppm}) == {}
    with open(ppm, "rb") as f:
        data = f.read()
    header = b"P6\n1024 768\n255\n"
    assert data.startswith(header) and len(data) == len(header) + 1024 * 768 * 3, data[:20]
    png = os.path.join(machine.out_dir, "qmp-screen.png")
    assert await qmp.execute("screendump", {"filename": png, "format": "png"}) == {}
    with open(png, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1024, 768), head
    keys = [{"type": "qcode", "data": "shift"}, {"type": "number", "data": 0x1E}]
    assert await qmp.execute("send-key", {"keys": keys, "hold-time": 20}) == {}
    try:
        await qmp.execute("send-key", {"keys": [{"type": "qcode", "data": "nokey"}]})
    except ExecuteError as e:
        assert "nokey" in str(e), e
    else:
        raise AssertionError("send-key took an unknown key")
    mice = await qmp.execute("query-mice")
    assert mice == [{"index": 2, "name": "QEMU Virtio Tablet", "current": True, "absolute": True}], mice

    assert await qmp.execute("system_powerdown") == {}
    await next_event(events, "POWERDOWN", 10)
    shutdown = await next_event(events, "SHUTDOWN", 300)
    assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}, shutdown
    try:
        await qmp.disconnect()
    except EOFError:
        # skiff-vmm exits right after SHUTDOWN, as QEMU does; the socket
        # may close before the client says goodbye.
        log.info("QMP: the socket closed first (skiff-vmm exited after SHUTDOWN)")


asyncio.run(session(os.path.join(machine.state_dir, "qmp")))
machine.wait_for_shutdown()
assert machine._core.last_exit == 0, machine._core.last_exit
