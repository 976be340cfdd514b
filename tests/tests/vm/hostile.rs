//! A hostile guest (tests/guest/hostile): for 60 s it writes random values
//! to every register of every virtio device through /dev/mem, sets up
//! queues of random sizes on random ring addresses and notifies them, and
//! floods the console, with every device skiff-vmm has (disk, network card
//! on a switch, console, rng, GPU, keyboard, tablet). skiff-vmm must stay
//! up and answer its monitor (or end with a documented status, never a
//! crash), and a second VM on the same switch at the same time boots and
//! powers off as usual.

use skiff_tests::{fixtures, run_batch, skiff_driver, skiff_vmm, VmSpec};
use skiff_vmm::config::{
    BlockConfig, ConsoleBackend, GpuConfig, InputKind, MacAddr, NetBackend, NetConfig,
};
use skiff_vmm::VmConfig;

const ATTACK_S: u64 = 60;

fn quote(args: &[String]) -> String {
    args.iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_hostile_guest_leaves_skiff_vmm_and_its_neighbour_standing() {
    let f = fixtures();
    let d = std::path::PathBuf::from("/tmp/skiff-hostile");
    let net = |mac: [u8; 6]| NetConfig {
        backend: NetBackend::Stream(d.join("vlan1")),
        mac: MacAddr(mac),
        id: None,
    };
    let disk = |name: &str| BlockConfig {
        path: d.join(name),
        readonly: false,
        overlay: false,
        id: None,
    };
    let hostile = VmConfig {
        initrd: Some(f.initrd.clone()),
        cmdline: format!("console=ttyS0 panic=0 skiff.action=hostile skiff.hostile={ATTACK_S}"),
        memory_mib: 256,
        disks: vec![disk("hostile.img")],
        nets: vec![net([0x52, 0x54, 0, 0x12, 1, 1])],
        console: Some(ConsoleBackend::File(d.join("hvc0.out"))),
        rng: true,
        gpu: Some(GpuConfig::default()),
        inputs: vec![InputKind::Keyboard, InputKind::Tablet],
        qmp: vec![d.join("qmp")],
        name: "hostile".into(),
        ..VmConfig::new(&f.microvm)
    };
    let bystander = VmConfig {
        initrd: Some(f.initrd.clone()),
        cmdline: "console=ttyS0 panic=-1 skiff.action=poweroff".into(),
        memory_mib: 256,
        disks: vec![disk("bystander.img")],
        nets: vec![net([0x52, 0x54, 0, 0x12, 1, 2])],
        rng: true,
        name: "bystander".into(),
        ..VmConfig::new(&f.microvm)
    };
    let vmm = skiff_vmm().display().to_string();
    let script = format!(
        r#"d={d}
rm -rf "$d"; mkdir -p "$d"
truncate -s 64M "$d/hostile.img"; truncate -s 16M "$d/bystander.img"
'{skiff}' switch --socket "$d/vlan1" > "$d/switch.log" 2>&1 & sw=$!
i=0; while [ ! -S "$d/vlan1" ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i + 1)); done
'{vmm}' {hostile} > "$d/hostile.log" 2>&1 & h=$!
i=0; while ! grep -q 'skiff-hostile: attacking' "$d/hostile.log" && kill -0 $h 2>/dev/null && [ $i -lt 300 ]; do sleep 1; i=$((i + 1)); done
echo "attack started after ${{i}}s"
'{vmm}' {bystander} > "$d/bystander.log" 2>&1; echo "bystander-status=$?"
i=0; while ! grep -q 'skiff-hostile: done' "$d/hostile.log" && kill -0 $h 2>/dev/null && [ $i -lt {wait_s} ]; do sleep 1; i=$((i + 1)); done
threads() {{
    for t in /proc/$h/task/*; do
        [ -r "$t/stat" ] && echo "thread $(cat $t/comm 2>/dev/null): $(cut -d' ' -f3,14,15 $t/stat 2>/dev/null) wchan=$(cat $t/wchan 2>/dev/null)"
    done
}}
echo "threads of the hostile skiff-vmm (state, utime, stime):"; threads
python3 -u - "$d/qmp" <<'EOF'
import json, socket, sys
try:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(sys.argv[1])
    f = s.makefile("rwb")
    def cmd(c):
        f.write(json.dumps({{"execute": c}}).encode() + b"\n"); f.flush()
        while True:
            r = json.loads(f.readline())
            if "event" not in r:
                return r
    json.loads(f.readline())
    cmd("qmp_capabilities")
    print("qmp-status=" + cmd("query-status")["return"]["status"])
    cmd("quit")
except Exception as e:
    print(f"qmp-failed={{e!r}}")
EOF
i=0; while kill -0 $h 2>/dev/null && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
if kill -0 $h 2>/dev/null; then
    echo "hostile-hung: skiff-vmm still runs 60 s after quit"; threads
    kill -KILL $h
fi
wait $h; echo "hostile-status=$?"
kill -INT $sw; wait $sw; echo "switch-status=$?"
echo "--- hostile: skiff-vmm's log and the guest's serial (progress lines cut)"
grep -v '^skiff-hostile: ' "$d/hostile.log" | tail -n 60
grep '^skiff-hostile: [a-z]' "$d/hostile.log"
grep '^skiff-hostile: [0-9]' "$d/hostile.log" | tail -n 1
echo "guest errors skiff-vmm logged: $(grep -c ' WARN ' "$d/hostile.log")"
echo "--- bystander"; tail -n 15 "$d/bystander.log"
echo "--- switch"; tail -n 5 "$d/switch.log"
echo "hvc0 bytes: $(wc -c < "$d/hvc0.out")"
rm -rf "$d"
"#,
        d = d.display(),
        skiff = skiff_driver().display(),
        hostile = quote(&hostile.to_args()),
        bystander = quote(&bystander.to_args()),
        wait_s = 2 * ATTACK_S + 120,
    );
    let out = run_batch("hostile", 2048, &[VmSpec::shell("hostile", script, 1800)]);
    let o = &out[0];
    let text = &o.serial;
    let report = o.describe();
    // The attack really ran, on every kind of device.
    let attacking = text
        .lines()
        .find_map(|l| l.strip_prefix("skiff-hostile: attacking "))
        .unwrap_or_else(|| panic!("the hostile guest never attacked:\n{report}"));
    let devices: usize = attacking
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        devices >= 7,
        "only {devices} devices found: {attacking}\n{report}"
    );
    // It ran to the end, with queues set up on random rings, and
    // skiff-vmm saw the errors.
    let done = text
        .lines()
        .find_map(|l| l.strip_prefix("skiff-hostile: done: "))
        .unwrap_or_else(|| panic!("the attack did not run to its end:\n{report}"));
    let queues: u32 = done
        .split(" queue setups")
        .next()
        .and_then(|p| p.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(queues >= 20, "only {queues} queue setups: {done}\n{report}");
    assert!(
        !text.contains("guest errors skiff-vmm logged: 0\n"),
        "skiff-vmm logged no guest error:\n{report}"
    );
    // skiff-vmm stood: it answered its monitor and quit cleanly, or ended
    // with a documented status of its own (the guest may well panic).
    assert!(
        !text.contains("panicked at"),
        "skiff-vmm panicked:\n{report}"
    );
    assert!(!text.contains("hostile-hung"), "skiff-vmm hung:\n{report}");
    let status = text
        .lines()
        .find_map(|l| l.strip_prefix("hostile-status="))
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or_else(|| panic!("no hostile status:\n{report}"));
    if text.contains("qmp-status=") {
        assert_eq!(status, 0, "quit through QMP, yet:\n{report}");
    } else {
        assert!(
            [3, 4, 5].contains(&status),
            "skiff-vmm neither answered QMP nor ended with a documented status ({status}):\n{report}"
        );
    }
    // The neighbour and the switch were unaffected.
    assert!(text.contains("bystander-status=0"), "{report}");
    let bystander = text.split("--- bystander").nth(1).unwrap_or("");
    assert!(bystander.contains("skiff-guest: init ready"), "{report}");
    assert!(text.contains("switch-status=0"), "{report}");
}
