# A Skiff VM and a QEMU VM (Debian's qemu-system-x86_64, -netdev stream)
# on one VLAN: Skiff's switch speaks QEMU's stream framing, so QEMU joins
# it as it would join another QEMU. The QEMU guest (same kernel and root
# file system, node 2 of VLAN 1) is driven through its backdoor shell with
# bench/qemu_backdoor.py; both sides ping and move 8 MiB over TCP, checked
# by SHA-256 at both ends.
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
from qemu_backdoor import Shell  # noqa: E402

guest = os.environ["SKIFF_GUEST"]
qemu = shutil.which("qemu-system-x86_64")
assert qemu, "qemu-system-x86_64 is not installed"
work = tempfile.mkdtemp(prefix="qemu-peer.")
shell_sock = os.path.join(work, "shell")
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(shell_sock)
listener.listen(1)
listener.settimeout(600)

start_all()
skiff.wait_for_unit("multi-user.target")
skiff.wait_for_unit("nginx.service")

peer_cmdline = (
    "console=ttyS0 panic=-1 root=/dev/vda rw skiff.hostname=peer "
    "skiff.ip=52:54:00:12:01:02,192.168.1.2/24,2001:db8:1::2/64 "
    "skiff.hosts=skiff@1.1,peer@1.2"
)
serial_log = os.path.join(skiff.out_dir, "qemu-peer-serial.log")
proc = subprocess.Popen(
    [qemu, "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", "768", "-smp", "1",
     "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
     "-serial", f"file:{serial_log}",
     "-kernel", f"{guest}/vmlinuz-microvm", "-initrd", f"{guest}/initrd.cpio.gz",
     "-append", peer_cmdline,
     # The Skiff VM holds a shared flock on the image, which on the test
     # host's 9p file system turns into a POSIX lock QEMU's own image
     # locking trips over; QEMU's snapshot=on keeps the image untouched.
     "-drive", f"id=root,file={guest}/rootfs.ext4,format=raw,if=none,snapshot=on,file.locking=off",
     "-device", "virtio-blk-device,drive=root",
     "-netdev", f"stream,id=vlan1,addr.type=unix,addr.path={vlan1.socket}",
     "-device", "virtio-net-device,netdev=vlan1,mac=52:54:00:12:01:02",
     "-device", "virtio-serial-device",
     "-chardev", f"socket,id=shell,path={shell_sock}",
     "-device", "virtconsole,chardev=shell"],
    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
)
conn = None
try:
    with subtest("the QEMU guest comes up on the VLAN"):
        conn, _ = listener.accept()
        peer = Shell(conn)
        peer.wait_banner()
        peer.wait_for_unit("multi-user.target", timeout=900)
        assert "192.168.1.2/24" in peer.succeed("ip -4 addr show eth1")

    with subtest("ping both ways"):
        skiff.succeed("ping -c 3 -W 5 192.168.1.2")
        peer.succeed("ping -c 3 -W 5 192.168.1.1")
        skiff.succeed("ping -6 -c 1 -W 5 2001:db8:1::2")

    with subtest("8 MiB over TCP each way, checked"):
        for src, dst, src_ip in [(peer, skiff, "192.168.1.2"), (None, peer, "192.168.1.1")]:
            make = "head -c 8388608 /dev/urandom > /var/www/html/blob && sha256sum < /var/www/html/blob"
            fetch = f"curl --fail --silent --max-time 300 http://{src_ip}/blob | sha256sum"
            want = (src.succeed(make) if src else skiff.succeed(make)).split()[0]
            got = dst.succeed(fetch).split()[0]
            assert got == want, f"{src_ip}: {got} != {want}"
finally:
    try:
        if conn is not None:
            conn.sendall(b"poweroff\n")
        proc.wait(timeout=120)
    except Exception:
        proc.kill()
        proc.wait()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode not in (0, None):
        skiff.log(f"QEMU exited with {proc.returncode}: {err[-2000:]}")
    listener.close()
    shutil.rmtree(work, ignore_errors=True)
