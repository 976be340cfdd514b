# The screen and keyboard: a shell on the first VT (tty1) is on the
# virtio-gpu screen; keys typed through the virtio keyboard reach it, every
# one and in order; the screen text is the VT's own; screenshots are real
# pictures of it; the tablet moves.
import os
import struct

# Every character upstream's send_chars table has, and the letters and
# digits, typed into `cat` on the VT.
TYPED = "The quick brown fox: 0123456789 !@#$%^&*() -_=+[]{};:'\",.<>/?`~|\\ JUMPS"

machine.start()
machine.wait_for_text("skiff-vt-ready", timeout=300)

machine.send_chars("echo typed-$((6 * 7)) > /tmp/typed\n")
machine.wait_until_succeeds("grep -qx typed-42 /tmp/typed", timeout=120)

# The shell's line editor holds the VT raw (-icanon) while it reads a
# command and sets it canonical while one runs (busybox runs cat inside a
# forked shell, so there is no process named cat to look for). Keys that
# arrive while the VT is still raw reach cat unprocessed (a literal ^D
# instead of an end of file), so type only once it is canonical, and know
# that cat ended when it is raw again.
RAW = "stty -F /dev/tty1 -a | grep -q -- -icanon"
machine.wait_until_succeeds(RAW, timeout=120)
machine.send_chars("cat > /tmp/chars\n")
machine.wait_until_fails(RAW, timeout=120)
machine.send_chars(TYPED + "\n", delay=0)
machine.send_key("ctrl-d")
machine.wait_until_succeeds(f"test -s /tmp/chars && {RAW}", timeout=120)
got = machine.succeed("cat /tmp/chars")
assert got == TYPED + "\n", f"typed {TYPED!r}, the guest got {got!r}"

text = machine.get_screen_text()
assert "echo typed-$((6 * 7)) > /tmp/typed" in text, text
assert "JUMPS" in text, text
assert machine.get_screen_text_variants() == [text]

# A screenshot in the output directory, named as upstream names it.
machine.screenshot("vt")
png = os.path.join(machine.out_dir, "vt.png")
with open(png, "rb") as f:
    head = f.read(24)
assert head[:8] == b"\x89PNG\r\n\x1a\n", head
assert struct.unpack(">II", head[16:24]) == (1024, 768), head

# A PPM straight from QMP: the text is drawn (light pixels on black).
ppm = os.path.join(machine.out_dir, "vt.ppm")
machine.qmp_client.send("screendump", {"filename": ppm})
with open(ppm, "rb") as f:
    data = f.read()
assert data.startswith(b"P6\n1024 768\n255\n"), data[:20]
pixels = data[len(b"P6\n1024 768\n255\n"):]
lit = sum(1 for i in range(0, len(pixels), 3) if pixels[i] > 128)
assert 1000 < lit < 1024 * 768 // 2, lit

# The guest sees both devices; the tablet's absolute move arrives as an
# EV_ABS event with the value sent.
devices = machine.succeed("cat /proc/bus/input/devices")
assert "QEMU Virtio Keyboard" in devices and "QEMU Virtio Tablet" in devices, devices
mice = machine.qmp_client.send("query-mice")
assert mice == [{"index": 2, "name": "QEMU Virtio Tablet", "current": True, "absolute": True}], mice
event = machine.succeed(
    "for d in /sys/class/input/event*; do grep -q Tablet $d/device/name && basename $d; done"
).strip()
machine.succeed(f"(dd if=/dev/input/{event} of=/tmp/ev bs=24 count=2 2>/dev/null &) ; sleep 1")
machine.qmp_client.send(
    "input-send-event", {"events": [{"type": "abs", "data": {"axis": "x", "value": 1234}}]}
)
machine.wait_until_succeeds("test $(stat -c %s /tmp/ev) -ge 48", timeout=60)
# struct input_event: 16 bytes of time, then type, code, value.
raw = machine.succeed("od -An -tu2 -j16 -N8 /tmp/ev").split()
assert raw[:3] == ["3", "0", "1234"], raw

# A key name the monitor does not know is refused, naming it.
try:
    machine.send_key("no-such-key")
except Exception as e:
    assert "invalid parameter: no" in str(e), str(e)
else:
    raise AssertionError("an unknown key was accepted")
machine.shutdown()
