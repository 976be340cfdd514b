# X11 in the style of nixos/tests/xterm.nix: Xorg (modesetting, 2D) on the
# virtio-gpu screen with a window manager; an xterm opened over the backdoor;
# text typed with the virtio keyboard runs in it; a screenshot of it; and a
# string it shows read back off the screen by OCR. The test harness checks
# the screenshot's pixels. The screen is 640x480: one OCR pass (ImageMagick
# and tesseract as upstream runs them) over 1024x768 takes about 5 s on a
# real CPU but 7 minutes under the test host's emulated one.
machine.start()
machine.wait_for_x(timeout=900)

with subtest("an xterm opens and has the focus"):
    machine.succeed("DISPLAY=:0 xterm -title testterm -class testterm -fullscreen >&2 &")
    machine.wait_for_window("testterm", timeout=300)
    assert "testterm" in machine.get_window_names(), machine.get_window_names()
    machine.wait_until_succeeds(
        "DISPLAY=:0 xdotool getwindowfocus getwindowname 2>/dev/null | grep -qx testterm", timeout=120
    )
    # The xterm's shell reads a line (readline holds its terminal raw):
    # keys sent from now on reach it.
    machine.wait_until_succeeds(
        "t=$(ps -o tty= -p $(pgrep -P $(pgrep -x xterm))) && stty -F /dev/$t -a | grep -q -- -icanon",
        timeout=300,
    )

with subtest("text typed into the xterm runs"):
    machine.send_chars("echo $((1 + 1)) > /tmp/xterm_out\n")
    machine.wait_for_file("/tmp/xterm_out", timeout=120)
    assert machine.succeed("cat /tmp/xterm_out") == "2\n"

with subtest("the screen"):
    machine.send_chars("clear; echo SKIFFXTERM$((40 + 2))\n")
    machine.wait_for_text("SKIFFXTERM42", timeout=900)
    machine.screenshot("xterm")

machine.shutdown()
