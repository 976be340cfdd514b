# Many VM starts and stops in one driver process: file descriptors,
# threads and memory of the driver must not grow with them. Each round
# starts skiff-vmm, waits for its monitor and stops it (crash()); every
# tenth round also runs a command in the guest. SKIFF_STARTS sets the
# rounds (default 100), SKIFF_STARTS_BOOT_EVERY how often one boots to the
# shell (default 10; 0: never, for a host whose KVM cannot run the guest).
import os
import time

ROUNDS = int(os.environ.get("SKIFF_STARTS", "60"))
BOOT_EVERY = int(os.environ.get("SKIFF_STARTS_BOOT_EVERY", "10"))


def usage():
    # A stopped VMM's reaper thread ends just after the stop returns.
    time.sleep(1)
    fds = len(os.listdir("/proc/self/fd"))
    threads = len(os.listdir("/proc/self/task"))
    with open("/proc/self/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    return fds, threads, rss


def round_trip(boot):
    machine.start()
    if boot:
        machine.succeed("true")
    else:
        machine.qmp_client.send("query-status")
    machine.crash()


# Warm up: the first rounds load what later ones reuse.
for i in range(10):
    round_trip(BOOT_EVERY > 0 and i % BOOT_EVERY == 0)
before = usage()
started = time.monotonic()
for i in range(ROUNDS):
    round_trip(BOOT_EVERY > 0 and i % BOOT_EVERY == 0)
after = usage()
took = time.monotonic() - started
print(
    f"starts: {ROUNDS} rounds in {took:.1f} s ({len(range(0, ROUNDS, BOOT_EVERY)) if BOOT_EVERY else 0} to the shell); "
    f"fds {before[0]} -> {after[0]}, threads {before[1]} -> {after[1]}, "
    f"RSS {before[2]} -> {after[2]} KiB"
)
assert after[0] <= before[0], f"file descriptors grew: {before[0]} -> {after[0]}"
assert after[1] <= before[1], f"threads grew: {before[1]} -> {after[1]}"
assert after[2] - before[2] < 8 * 1024, f"RSS grew by {after[2] - before[2]} KiB"

# A guest that stops answering: the command fails a minute after its own
# timeout, and the failure says what the guest's vCPUs were doing (skiff-vmm's
# info registers and info lapic, read while the VM is stopped).
if BOOT_EVERY > 0:
    machine.start()
    machine.succeed("true")
    machine.qmp_client.send("stop")
    began = time.monotonic()
    try:
        machine.execute("true", timeout=1)
        raise AssertionError("a command in a stopped VM returned")
    except AssertionError:
        raise
    except Exception as e:
        report = str(e)
    for text in ["running `true`", "vCPU state (info registers, info lapic):", "CPU#0:",
                 "RIP=", "LVTT", "TSC deadline", "APIC ID"]:
        assert text in report, f"{text!r} missing from the hung guest's report:\n{report}"
    print(f"starts: a stopped guest's command failed after {time.monotonic() - began:.0f} s, "
          f"naming its vCPU state")
    print(report)
    machine.crash()
