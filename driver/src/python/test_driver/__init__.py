"""The NixOS test driver's Python API on Skiff machines.

This package mirrors nixpkgs' nixos/lib/test-driver/src/test_driver: the
same module names (errors, logger, polling_condition, qmp, machine,
vlan, driver) and, where a test script can see it, the same names, parameters,
defaults, return values, log lines and exception texts (the stable
24.11-25.11 API, with the 2026 spellings accepted too).

Invariants:
- The Rust module `_skiff` owns the machines (the skiff-vmm processes,
  serial consoles, backdoor shells and QMP connections, and the reboot
  and reconnect policy) and the log; this package only builds the script
  API on top of it, with no machine I/O and no machine state of its own.
- skiff compiles these sources in and serves them to its embedded
  interpreter, so `import test_driver.machine` works in a test script; the
  unit tests in ../tests import them from the source tree with a fake
  `_skiff` instead.
- Importing this package has no side effects; `test_driver.driver.main`
  runs a test.
"""
