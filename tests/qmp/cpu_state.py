#!/usr/bin/env python3
"""Checks skiff-vmm's `info registers` and `info lapic` (through QMP's
human-monitor-command) against a booting Linux guest with one vCPU:

- waits (up to --wait seconds) until the guest's kernel has switched its
  local APIC timer to TSC-deadline mode, as Linux does on a CPU that has
  one;
- then the APIC is software-enabled, the TSC-deadline line gives a
  deadline and the vCPU's TSC, `info registers -a` shows the vCPU in the
  kernel's 64-bit code (RIP in the kernel's upper half, long mode in
  EFER), and a second look shows the TSC moved on: the VM kept running;
- a look reports no STOP or RESUME event and leaves the VM running;
- a bad vCPU number is refused with a message naming it.

    cpu_state.py SOCKET [--wait SECS]

Prints what it saw; exits 1 on the first failed check.
"""

import argparse
import re
import sys
import time

from qmp_shapes import Session


def hmp(s, line, cpu=None):
    args = {"command-line": line}
    if cpu is not None:
        args["cpu-index"] = cpu
    r = s.call("human-monitor-command", args)
    if "return" not in r:
        fail(f"{line}: {r}")
    return r["return"]


def fail(why):
    print(f"cpu-state: FAILED: {why}")
    sys.exit(1)


def check(ok, why, text):
    if not ok:
        fail(f"{why}:\n{text}")


def tsc_of(lapic):
    m = re.search(r"TSC deadline\t 0x([0-9a-f]+) TSC 0x([0-9a-f]+): due", lapic)
    return m and (int(m.group(1), 16), int(m.group(2), 16))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("--wait", type=float, default=300)
    a = ap.parse_args()
    s = Session(a.socket)
    s.read_msg()
    s.call("qmp_capabilities")

    started = time.monotonic()
    while True:
        lapic = hmp(s, "info lapic")
        if "tsc-deadline" in lapic and tsc_of(lapic):
            break
        if time.monotonic() - started > a.wait:
            fail(f"the guest's LAPIC timer is not in TSC-deadline mode after {a.wait:.0f} s:\n{lapic}")
        time.sleep(1)
    print(f"cpu-state: TSC-deadline timer after {time.monotonic() - started:.0f} s")
    print(lapic.replace("\r\n", "\n"))

    check(lapic.startswith("dumping local APIC state for CPU 0"), "no header", lapic)
    check("APIC enabled" in lapic, "the APIC is not software-enabled", lapic)
    check(re.search(r"LVTT\t 0x000[0-9a-f]{5} ", lapic) is not None, "no LVTT line", lapic)
    check(re.search(r"vCPU (halted|runnable), interrupts (enabled|disabled)", lapic) is not None,
          "no vCPU state line", lapic)
    _, tsc1 = tsc_of(lapic)

    regs = hmp(s, "info registers -a")
    print(regs.replace("\r\n", "\n"))
    check(regs.startswith("\r\nCPU#0\r\nRAX="), "no CPU#0 block", regs)
    rip = re.search(r"RIP=([0-9a-f]{16}) ", regs)
    check(rip is not None and int(rip.group(1), 16) >= 0xffff_8000_0000_0000,
          "RIP is not in the kernel's upper half", regs)
    efer = re.search(r"EFER=([0-9a-f]{16})", regs)
    check(efer is not None and int(efer.group(1), 16) & 0x400, "EFER.LMA is clear", regs)
    one = hmp(s, "info registers", cpu=0)
    check(one.startswith("RAX=") and "CPU#" not in one,
          "info registers for the current vCPU is not one bare block", one)

    time.sleep(1)
    second = tsc_of(hmp(s, "info lapic"))
    check(second is not None and second[1] > tsc1,
          f"the TSC did not move on between two looks ({tsc1:#x}, then {second})", "")
    print(f"cpu-state: the TSC moved on by {second[1] - tsc1} cycles between two looks")

    status = s.call("query-status")
    check(status.get("return", {}).get("running") is True, "the VM is not running after the looks",
          str(status))
    check(not any(e["event"] in ("STOP", "RESUME") for e in s.events),
          "a look emitted STOP or RESUME", str(s.events))

    bad = hmp(s, "info registers 5")
    check(bad.startswith("invalid vCPU '5'"), "vCPU 5 of 1 was not refused", bad)
    print("cpu-state: all checks passed")


if __name__ == "__main__":
    main()
