import hashlib
import os
import shutil
import tempfile

machine.start()
src = tempfile.mkdtemp()
data = os.urandom(300 * 1024)
with open(os.path.join(src, "blob.bin"), "wb") as f:
    f.write(data)
os.makedirs(os.path.join(src, "tree/sub"))
with open(os.path.join(src, "tree/sub/note.txt"), "w") as f:
    f.write("note\n")
os.chmod(os.path.join(src, "tree/sub/note.txt"), 0o640)

machine.copy_from_host(os.path.join(src, "blob.bin"), "/root/in/blob.bin")
digest = machine.succeed("sha256sum /root/in/blob.bin").split()[0]
assert digest == hashlib.sha256(data).hexdigest()
machine.copy_from_host(os.path.join(src, "tree"), "/root/tree")
assert machine.succeed("cat /root/tree/sub/note.txt") == "note\n"
assert machine.succeed("stat -c %a /root/tree/sub/note.txt").strip() == "640"
machine.copy_from_host_via_shell(os.path.join(src, "tree/sub/note.txt"), "/root/via/shell.txt")
assert machine.succeed("cat /root/via/shell.txt") == "note\n"

machine.succeed("mkdir -p /root/out/deep && echo from-guest > /root/out/deep/f.txt")
machine.copy_from_vm("/root/out", "copied")
with open(os.path.join(driver.out_dir, "copied/out/deep/f.txt")) as f:
    assert f.read() == "from-guest\n"
machine.copy_from_machine("/root/in/blob.bin")
with open(os.path.join(driver.out_dir, "blob.bin"), "rb") as f:
    assert f.read() == data
machine.shutdown()

shutil.rmtree(src)
