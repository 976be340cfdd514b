//! The integration tests that boot real guests, as one test binary.
//!
//! Each test runs its guests in a batch (`skiff_tests::run_batch`): one
//! test host where `/dev/kvm` cannot run standard guests, directly
//! otherwise. One binary lets the test harness run as many batches at once
//! as the machine has cores (a test host is one emulated CPU, so one core),
//! where separate binaries would run one after another. The harness starts
//! tests in name order: the longest (backdoor_stress) sorts first, the
//! snapshot cache's (cache) third, after the short boot tests, and the
//! other long batches are split into tests of a few minutes each, so that
//! they share the cores evenly. `cargo test --test vm -- --test-threads=1`
//! runs them one at a time.

mod backdoor_stress;
mod boot;
mod cache;
mod driver;
mod exits;
mod faults;
mod hostile;
mod net;
mod nix;
mod qmp;
mod snapshot;
mod systemd;
mod virtio;
