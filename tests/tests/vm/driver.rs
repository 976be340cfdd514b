//! `skiff test` end to end: NixOS-style test scripts (tests/nixos/) run
//! through the driver against real guests, in the test host or directly.

use std::path::Path;

use skiff_tests::{assert_clean, cache_dir, exit_of, fixtures, run_batch, scratch_dir, skiff_run};

fn read_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub(crate) fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

#[test]
fn suite_failures_and_a_silent_guest() {
    fixtures();
    let dir = scratch_dir("driver-busybox");
    let suite = crate::cache::suite();
    assert_eq!(suite.len(), 10, "{suite:?}");
    let specs = vec![
        skiff_run(
            "suite",
            &format!("{} --jobs 4", suite.join(" ")),
            &dir.join("suite"),
            900,
        ),
        skiff_run(
            "fails",
            "tests/nixos/failing/fails.json",
            &dir.join("fails"),
            300,
        ),
        skiff_run(
            "no-backdoor",
            "tests/nixos/failing/no-backdoor.json",
            &dir.join("no-backdoor"),
            300,
        ),
    ];
    let o = run_batch("driver-busybox", 3072, &specs);

    // Ten tests, four at a time, all passed, in the summary table.
    let suite = &o[0];
    assert_eq!(exit_of(suite), 0, "{}", suite.serial);
    assert!(
        suite.serial.contains("10 test(s), 4 at a time"),
        "{}",
        suite.serial
    );
    assert!(
        suite.serial.contains("10 passed, 0 failed") && suite.serial.contains("with --jobs 4"),
        "{}",
        suite.serial
    );
    for name in [
        "hello",
        "exit-codes",
        "files",
        "console",
        "subtests",
        "two-nodes",
        "reboot",
        "crash",
        "snapshots",
        "display",
    ] {
        assert!(
            suite
                .serial
                .lines()
                .any(|l| l.starts_with(name) && l.contains("passed")),
            "{name} is not in the summary as passed:\n{}",
            suite.serial
        );
        let junit = read(&dir.join("suite").join(name).join("junit.xml"));
        assert!(junit.contains("failures=\"0\""), "{name}: {junit}");
    }
    let subtests = read(&dir.join("suite/subtests/junit.xml"));
    for case in ["retry", "wait_until", "assertions", "polling conditions"] {
        assert!(subtests.contains(&format!("name=\"{case}\"")), "{subtests}");
    }
    assert!(dir.join("suite/files/copied/out/deep/f.txt").is_file());
    assert_clean(suite);

    // A failing command stops the run: non-zero status, the script's frame,
    // the machine, the command and its output, a JUnit failure.
    let fails = &o[1];
    assert_eq!(exit_of(fails), 1, "{}", fails.serial);
    for text in [
        "!!! Traceback (most recent call last):",
        "client.succeed('echo some output here; exit 3')",
        "!!! RequestedAssertionFailed: command `echo some output here; exit 3` failed (exit code 3)",
        "!!! machine: client",
        "!!! some output here",
        "Test \"breaks\" failed with error",
    ] {
        assert!(fails.serial.contains(text), "missing {text:?} in:\n{}", fails.serial);
    }
    assert!(!fails.serial.contains("never reached"), "{}", fails.serial);
    let junit = read(&dir.join("fails/junit.xml"));
    assert!(junit.contains("name=\"passes\""), "{junit}");
    assert!(
        junit.contains("name=\"breaks\"") && junit.contains("failures=\"2\""),
        "{junit}"
    );
    let events = read(&dir.join("fails/events.jsonl"));
    assert!(events.lines().all(|l| l.starts_with('{')), "{events}");
    assert!(events.contains("\"kind\":\"failed\""), "{events}");
    assert!(dir.join("fails/client.serial.log").is_file());
    assert_clean(fails);

    // A guest that never reaches the backdoor: a timeout naming it, with the
    // end of its serial console.
    let silent = &o[2];
    assert_eq!(exit_of(silent), 1, "{}", silent.serial);
    assert!(
        silent
            .serial
            .contains("silent: the guest root shell did not come up within 20 s"),
        "{}",
        silent.serial
    );
    assert!(
        silent.serial.contains("last serial lines:") && silent.serial.contains("action=sleep"),
        "{}",
        silent.serial
    );
    assert_clean(silent);
}

#[test]
fn every_machine_method_against_a_systemd_guest() {
    fixtures();
    assert!(
        cache_dir().join("guest/rootfs.ext4").is_file(),
        "rootfs.ext4 is missing: run tests/guest/build"
    );
    let dir = scratch_dir("driver-systemd");
    let o = run_batch(
        "driver-systemd",
        3072,
        &[
            skiff_run("api", "tests/nixos/api.json", &dir.join("api"), 1500),
            skiff_run("login", "tests/nixos/login.json", &dir.join("login"), 1500),
        ],
    );
    let login = &o[1];
    assert_eq!(exit_of(login), 0, "{}", login.serial);
    for text in [
        "screen text read from the VT (/dev/vcs), exactly",
        "test script finished in",
    ] {
        assert!(
            login.serial.contains(text),
            "missing {text:?}:\n{}",
            login.serial
        );
    }
    let png = read_bytes(&dir.join("login/tty2.png"));
    assert!(png.starts_with(b"\x89PNG"), "tty2.png is no PNG");
    assert_clean(login);
    let api = &o[0];
    assert_eq!(exit_of(api), 0, "{}", api.serial);
    assert!(
        api.serial.contains("test script finished in"),
        "{}",
        api.serial
    );
    // The detached child holding stdout was reported with its command.
    assert!(
        api.serial
            .contains("command `(sleep 12; echo late) &` has not closed its stdout after 10 s"),
        "{}",
        api.serial
    );
    let junit = read(&dir.join("api/junit.xml"));
    for case in [
        "commands",
        "systemd units",
        "waiting",
        "a detached child holding stdout",
        "failures are reported",
        "lifecycle",
    ] {
        assert!(junit.contains(&format!("name=\"{case}\"")), "{junit}");
    }
    assert!(junit.contains("failures=\"0\""), "{junit}");
    assert_clean(api);
}

#[test]
fn an_xterm_on_the_x11_screen() {
    fixtures();
    assert!(
        cache_dir().join("guest/rootfs-x11.ext4").is_file(),
        "rootfs-x11.ext4 is missing: run tests/guest/build"
    );
    let dir = scratch_dir("driver-x11");
    let o = run_batch(
        "driver-x11",
        3072,
        &[skiff_run(
            "xterm",
            "tests/nixos/xterm.json",
            &dir.join("xterm"),
            2400,
        )],
    );
    let xterm = &o[0];
    assert_eq!(exit_of(xterm), 0, "{}", xterm.serial);
    for text in [
        "screen text read by OCR (tesseract)",
        "test script finished in",
    ] {
        assert!(
            xterm.serial.contains(text),
            "missing {text:?}:\n{}",
            xterm.serial
        );
    }
    let junit = read(&dir.join("xterm/junit.xml"));
    for case in [
        "an xterm opens and has the focus",
        "text typed into the xterm runs",
        "the screen",
    ] {
        assert!(junit.contains(&format!("name=\"{case}\"")), "{junit}");
    }
    assert!(junit.contains("failures=\"0\""), "{junit}");

    // The screenshot is the screen's size and shows the full-screen xterm:
    // mostly its white background, with dark text on it.
    let png = read_bytes(&dir.join("xterm/xterm.png"));
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let mut reader = decoder.read_info().expect("xterm.png decodes");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader
        .next_frame(&mut pixels)
        .expect("xterm.png has a frame");
    assert_eq!((frame.width, frame.height), (640, 480));
    assert_eq!(frame.color_type, png::ColorType::Rgb, "{frame:?}");
    let luma: Vec<u32> = pixels[..frame.buffer_size()]
        .chunks_exact(3)
        .map(|p| (u32::from(p[0]) + u32::from(p[1]) + u32::from(p[2])) / 3)
        .collect();
    let light = luma.iter().filter(|&&l| l > 200).count();
    let dark = luma.iter().filter(|&&l| l < 60).count();
    assert!(
        light > luma.len() / 2 && dark > 400,
        "xterm.png: {light} light and {dark} dark pixels of {}",
        luma.len()
    );
    assert_clean(xterm);
}
