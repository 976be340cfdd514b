//! The guests' network configuration from the kernel command line
//! (tests/guest/net-config: skiff.hostname=, skiff.ip=, skiff.hosts=), run
//! by tests/guest/net-config-test.sh against a fake sysfs, procfs and /etc,
//! and in network namespaces where the machine allows them. Needs no KVM and
//! no built fixture.

use std::path::Path;
use std::process::Command;

#[test]
fn net_config_script() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/net-config-test.sh");
    let out = Command::new("sh")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}{stderr}",
        script.display(),
        out.status
    );
    assert!(stdout.contains("all passed"), "{stdout}{stderr}");
}
