# A VT login in the style of nixos/tests/login.nix, on the virtio-gpu
# screen with the virtio keyboard: a getty on tty1, the login prompt read
# off the screen, a user and password typed, a command typed at the prompt
# and its result checked over the backdoor, then Alt-F2 to the next VT.
# (The test image masks the VT gettys, so the script unmasks tty1's.)
machine.start()
machine.wait_for_unit("multi-user.target")
machine.succeed("echo root:skiff-login | chpasswd")
machine.succeed("systemctl unmask getty@tty1.service && systemctl start getty@tty1.service")

with subtest("log in on tty1"):
    machine.wait_for_text("login: ", timeout=300)
    machine.send_chars("root\n")
    machine.wait_for_text("Password: ", timeout=120)
    machine.send_chars("skiff-login\n")
    machine.wait_until_succeeds("pgrep -t tty1 -u root bash", timeout=120)

with subtest("a command typed at the prompt runs"):
    machine.send_chars("echo logged-in-$((6 * 7)) > /tmp/login-ok\n")
    machine.wait_for_file("/tmp/login-ok", timeout=120)
    assert machine.succeed("cat /tmp/login-ok") == "logged-in-42\n"
    machine.wait_for_text("logged-in-", timeout=60)

with subtest("Alt-F2 switches to the second VT"):
    machine.send_key("alt-f2")
    machine.wait_until_succeeds("test $(cat /sys/class/tty/tty0/active) = tty2", timeout=60)
    machine.succeed("systemctl unmask getty@tty2.service autovt@tty2.service; systemctl start getty@tty2.service")
    machine.wait_for_text("login: ", timeout=120)
    text = machine.get_screen_text()
    assert "logged-in-" not in text, text
    machine.screenshot("tty2")

machine.shutdown()
