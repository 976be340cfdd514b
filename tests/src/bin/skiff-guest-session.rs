//! Starts a VMM whose virtio console connects to a socket this program
//! listens on, waits for the guest's backdoor shell, runs checks through
//! it with the NixOS framing, powers the guest off and reports.
//!
//! ```text
//! skiff-guest-session --socket PATH [--shell bash|sh] [--timeout SECS]
//!     [--check NAME[=ARG]]... -- VMM [ARGS...]
//! ```
//! Checks: `systemd` (systemctl is-system-running --wait), `stress[=MIB]`
//! (1,000 commands, then MIB (default 64) MiB of output compared by SHA-256),
//! `disk-write=DEV:MIB` (writes a known pattern with dd, then syncs),
//! `write-fails=DEV` (a write to DEV must fail), `cmd=COMMAND` (runs it,
//! must succeed; `cmd:LABEL=COMMAND` reports it as `cmd:LABEL`), and
//! `migrate=DIR`: saves the VM with QMP `migrate file:DIR` (the VMM's
//! arguments must have `--qmp=PATH`), quits it, starts the same VMM with
//! `--incoming=file:DIR`, and goes on with the next checks in the restored
//! guest. `clones=DIR:N` saves the VM the same way and starts N VMMs at
//! once, all restoring that one snapshot (each with its own console and
//! QMP socket): each clone must have reseeded its RNG for the new VM
//! generation id (kernel log) and give bytes of `/dev/urandom` no other
//! clone gives; each clone's clock, set from the host's over the backdoor
//! as the driver does, must then keep within 2 s of the host's; the
//! clones' summed PSS and each one's RSS are reported. The first clone
//! goes on with the next checks, the others are powered off. Lines `CHECK <name> ok|FAIL ...` go to stderr; the exit status
//! is 0 only if every check passed and the VMM exited with 0.

use std::os::unix::net::UnixListener;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use skiff_tests::backdoor::Backdoor;
use skiff_vmm::stats::{clock_tick, parse_stat};

fn log(msg: &str) {
    eprintln!("skiff-guest-session: {msg}");
}

fn check(name: &str, arg: Option<&str>, b: &mut Backdoor) -> Result<String, String> {
    let run = |b: &mut Backdoor, cmd: &str, t: u32| {
        b.execute(cmd, Some(t)).map_err(|e| format!("`{cmd}`: {e}"))
    };
    match name {
        "systemd" => {
            let (_, out) = run(b, "systemctl is-system-running --wait || true", 600)?;
            let state = String::from_utf8_lossy(&out).trim().to_owned();
            match state.as_str() {
                "running" => Ok(state),
                "degraded" => {
                    let (_, failed) = run(b, "systemctl --failed --no-legend --plain || true", 60)?;
                    Ok(format!(
                        "degraded; failed units:\n{}",
                        String::from_utf8_lossy(&failed)
                    ))
                }
                _ => {
                    let (_, jobs) = run(b, "systemctl list-jobs --no-legend || true", 60)?;
                    Err(format!(
                        "state '{state}'; jobs:\n{}",
                        String::from_utf8_lossy(&jobs)
                    ))
                }
            }
        }
        "stress" => {
            let mib: u64 = match arg {
                Some(a) => a.parse().map_err(|_| format!("stress={a}: expected MiB"))?,
                None => 64,
            };
            let start = Instant::now();
            for i in 0..1000u32 {
                let (status, out) = run(b, &format!("echo line-{i}; exit {}", i % 7), 60)?;
                let want = format!("line-{i}\n");
                if status != (i % 7) as i32 || out != want.as_bytes() {
                    return Err(format!(
                        "command {i}: status {status} output {:?}, expected {} {want:?}",
                        String::from_utf8_lossy(&out),
                        i % 7
                    ));
                }
            }
            let small = start.elapsed();
            let (status, sum) = run(
                b,
                &format!(
                    "head -c {} /dev/urandom > /tmp/big && sha256sum /tmp/big | cut -d' ' -f1",
                    mib << 20
                ),
                600,
            )?;
            if status != 0 {
                return Err(format!("creating {mib} MiB failed with {status}"));
            }
            let want = String::from_utf8_lossy(&sum).trim().to_owned();
            let t = Instant::now();
            let (status, big) = run(b, "cat /tmp/big", 900)?;
            let got = format!("{:x}", Sha256::digest(&big));
            if status != 0 || big.len() as u64 != mib << 20 || got != want {
                return Err(format!(
                    "{mib} MiB output: status {status}, {} bytes, sha256 {got}, guest says {want}",
                    big.len()
                ));
            }
            Ok(format!(
                "1000 commands in {small:.1?}; {mib} MiB intact in {:.1?}",
                t.elapsed()
            ))
        }
        "disk-write" => {
            let (dev, mib) = arg
                .and_then(|a| a.split_once(':'))
                .ok_or("disk-write needs DEV:MIB")?;
            let cmd = format!(
                "yes skiff-disk-pattern | head -c $(({mib} * 1048576)) | dd of={dev} bs=1M iflag=fullblock 2>/dev/null && sync && echo written"
            );
            let (status, out) = run(b, &cmd, 900)?;
            if status != 0 {
                return Err(format!(
                    "dd failed with {status}: {}",
                    String::from_utf8_lossy(&out)
                ));
            }
            Ok(format!("{mib} MiB written to {dev}"))
        }
        "write-fails" => {
            let dev = arg.ok_or("write-fails needs DEV")?;
            let (status, _) = run(
                b,
                &format!("dd if=/dev/zero of={dev} bs=4096 count=1 conv=fsync 2>&1"),
                120,
            )?;
            if status == 0 {
                return Err(format!("a write to {dev} succeeded"));
            }
            Ok(format!("write to {dev} failed with status {status}"))
        }
        _ if name == "cmd" || name.starts_with("cmd:") => {
            let cmd = arg.ok_or("cmd needs a command")?;
            let (status, out) = run(b, cmd, 600)?;
            let out = String::from_utf8_lossy(&out).into_owned();
            if status != 0 {
                return Err(format!("status {status}: {out}"));
            }
            Ok(out.trim_end().to_owned())
        }
        _ => Err(format!("unknown check '{name}'")),
    }
}

/// If process `pid` (a child) has exited, its CPU time while it was alive
/// (user, system, and the guest's share), read from /proc before it is
/// reaped; None while it runs.
fn exited_cpu_time(pid: u32) -> Option<String> {
    // SAFETY: an all-zero siginfo_t is a valid value to be filled in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid siginfo_t for waitid to write; WNOWAIT
    // leaves the child to be reaped by Child::try_wait.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: waitid filled `info` (si_pid stays 0 while the child runs).
    if r != 0 || unsafe { info.si_pid() } == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let t = parse_stat(&stat, clock_tick())?;
    Some(format!(
        "user {:.2} s, system {:.2} s, guest {:.2} s",
        t.user.as_secs_f64(),
        t.system.as_secs_f64(),
        t.guest.as_secs_f64()
    ))
}

/// Sends QMP `commands` (one JSON object each) on `socket` after the
/// greeting and capabilities negotiation; returns each command's reply
/// line (events in between are skipped), or the first error.
fn qmp(socket: &str, commands: &[String]) -> Result<Vec<String>, String> {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("QMP {socket}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(600)))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut writer = stream;
    let read_reply = |reader: &mut BufReader<std::os::unix::net::UnixStream>| loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return Err("QMP closed the connection".to_owned()),
            Ok(_) => {}
            Err(e) => return Err(format!("QMP read: {e}")),
        }
        if line.contains("\"return\"") || line.contains("\"error\"") || line.contains("\"QMP\"") {
            return Ok(line.trim_end().to_owned());
        }
    };
    read_reply(&mut reader)?;
    let mut replies = Vec::new();
    for c in std::iter::once(r#"{"execute":"qmp_capabilities"}"#.to_owned())
        .chain(commands.iter().cloned())
    {
        writer
            .write_all(format!("{c}\n").as_bytes())
            .map_err(|e| format!("QMP write: {e}"))?;
        let reply = read_reply(&mut reader)?;
        if reply.contains("\"error\"") {
            return Err(format!("{c}: {reply}"));
        }
        replies.push(reply);
    }
    Ok(replies.split_off(1))
}

/// Waits up to `limit` for `child` to exit; kills it after that.
fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return s.code(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                return child.wait().ok().and_then(|s| s.code());
            }
        }
    }
}

/// Saves the VM with QMP `migrate file:DIR`, checks that it is left in
/// `postmigrate`, and quits it; returns how long the save took.
fn save_and_quit(
    dir: &str,
    vmm: &[String],
    child: &mut std::process::Child,
) -> Result<Duration, String> {
    let socket = qmp_socket(vmm)?;
    let t = Instant::now();
    qmp(
        &socket,
        &[format!(
            r#"{{"execute":"migrate","arguments":{{"uri":"file:{dir}"}}}}"#
        )],
    )?;
    let saved = t.elapsed();
    let status = qmp(&socket, &[r#"{"execute":"query-status"}"#.to_owned()])?;
    if !status[0].contains("postmigrate") {
        return Err(format!("after migrate, query-status says {}", status[0]));
    }
    let _ = qmp(&socket, &[r#"{"execute":"quit"}"#.to_owned()]);
    let code = wait_bounded(child, Duration::from_secs(60));
    if code != Some(0) {
        return Err(format!("the saved VMM exited with {code:?} after quit"));
    }
    Ok(saved)
}

fn qmp_socket(vmm: &[String]) -> Result<String, String> {
    vmm.iter()
        .find_map(|a| a.strip_prefix("--qmp="))
        .map(str::to_owned)
        .ok_or_else(|| "migrate and clones need the VMM's --qmp=PATH".to_owned())
}

/// One VM restored by the `clones` check.
struct Clone {
    child: std::process::Child,
    backdoor: Backdoor,
    /// Its console listener (None: the session's own).
    _listener: Option<UnixListener>,
    socket: String,
}

/// Seconds since the epoch on the host.
fn host_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A `/proc/PID/smaps_rollup` field, in KiB.
fn smaps_kib(pid: u32, field: &str) -> Result<u64, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map_err(|e| format!("/proc/{pid}/smaps_rollup: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("/proc/{pid}/smaps_rollup has no {field}"))
}

/// The `clones=DIR:N` check (see the top of this file). On success the
/// first clone replaces the session's VMM and backdoor.
fn clones(
    arg: &str,
    vmm: &[String],
    session_socket: &str,
    child: &mut std::process::Child,
    listener: &UnixListener,
    shell: &str,
    b: &mut Backdoor,
) -> Result<String, String> {
    let (dir, n) = arg
        .rsplit_once(':')
        .and_then(|(d, n)| Some((d, n.parse::<usize>().ok()?)))
        .filter(|&(_, n)| n >= 2)
        .ok_or_else(|| format!("clones={arg}: expected DIR:N with N at least 2"))?;
    let saved = save_and_quit(dir, vmm, child)?;
    // Start every clone before attaching to any: they restore at once.
    let t = Instant::now();
    let mut started = Vec::new();
    for k in 0..n {
        let (socket, own) = if k == 0 {
            (session_socket.to_owned(), None)
        } else {
            let socket = format!("{session_socket}.{k}");
            let _ = std::fs::remove_file(&socket);
            let l = UnixListener::bind(&socket).map_err(|e| format!("listen on {socket}: {e}"))?;
            (socket, Some(l))
        };
        let args: Vec<String> = vmm[1..]
            .iter()
            .map(|a| {
                if k == 0 {
                    a.clone()
                } else if let Some(q) = a.strip_prefix("--qmp=") {
                    format!("--qmp={q}.{k}")
                } else {
                    a.replace(session_socket, &socket)
                }
            })
            .collect();
        let c = Command::new(&vmm[0])
            .args(&args)
            .arg(format!("--incoming=file:{dir}"))
            .spawn()
            .map_err(|e| format!("cannot start clone {k}: {e}"))?;
        started.push((c, own, socket));
    }
    let mut all = Vec::new();
    let mut failed = None;
    for (k, (mut c, own, socket)) in started.into_iter().enumerate() {
        let l = own.as_ref().unwrap_or(listener);
        match Backdoor::reattach(l, shell, Duration::from_secs(300)) {
            Ok(backdoor) if failed.is_none() => all.push(Clone {
                child: c,
                backdoor,
                _listener: own,
                socket,
            }),
            Ok(_) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Err(e) => {
                failed = Some(format!("clone {k}'s console: {e}"));
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    if let Some(e) = failed {
        for mut c in all {
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
        return Err(e);
    }
    let result = check_clones(&mut all, t);
    // The first clone goes on as the session's VM; the others end.
    let mut others = all.split_off(1);
    let first = all.pop().expect("at least two clones");
    *child = first.child;
    *b = first.backdoor;
    let mut ended = Vec::new();
    for (k, mut c) in others.drain(..).enumerate() {
        let _ = c.backdoor.poweroff();
        let code = wait_bounded(&mut c.child, Duration::from_secs(120));
        let _ = std::fs::remove_file(&c.socket);
        ended.push(format!("clone {} exited with {code:?}", k + 1));
        if code != Some(0) && result.is_ok() {
            return Err(format!("clone {} exited with {code:?}", k + 1));
        }
    }
    result.map(|r| {
        format!(
            "saved in {} ms; {n} clones: {r}; {}",
            saved.as_millis(),
            ended.join(", ")
        )
    })
}

/// What the `clones` check checks once every clone answers.
fn check_clones(all: &mut [Clone], started: Instant) -> Result<String, String> {
    let run = |c: &mut Clone, k: usize, cmd: &str| -> Result<String, String> {
        let (status, out) = c
            .backdoor
            .execute(cmd, Some(120))
            .map_err(|e| format!("clone {k}, `{cmd}`: {e}"))?;
        let out = String::from_utf8_lossy(&out).trim().to_owned();
        if status != 0 {
            return Err(format!("clone {k}, `{cmd}`: status {status}: {out}"));
        }
        Ok(out)
    };
    let mut answered = Vec::new();
    for (k, c) in all.iter_mut().enumerate() {
        run(c, k, "true")?;
        answered.push(started.elapsed().as_millis());
    }
    // The reseed is the guest's answer to the GED's notification; wait
    // for it before reading random bytes.
    let reseeded = "for i in $(seq 1 300); do \
         dmesg | grep -q 'crng reseeded due to virtual machine fork' && break; sleep 0.1; done; \
         dmesg | grep -c 'crng reseeded due to virtual machine fork'";
    let mut random = Vec::new();
    for (k, c) in all.iter_mut().enumerate() {
        let count = run(c, k, &format!("{reseeded} || true"))?;
        if count != "1" {
            return Err(format!(
                "clone {k}: the kernel log has {count} lines 'crng reseeded due to virtual machine fork', expected 1"
            ));
        }
        random.push(run(
            c,
            k,
            "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'",
        )?);
    }
    for i in 0..random.len() {
        for j in i + 1..random.len() {
            if random[i] == random[j] {
                return Err(format!(
                    "clones {i} and {j} read the same /dev/urandom bytes {}",
                    random[i]
                ));
            }
        }
    }
    // The clock: each clone's is behind by the time since the save; set
    // it from the host's, as the driver does, then see it keep time.
    let mut behind = Vec::new();
    for (k, c) in all.iter_mut().enumerate() {
        let guest: i64 = run(c, k, "date +%s")?
            .parse()
            .map_err(|e| format!("clone {k}: date +%s: {e}"))?;
        behind.push(host_now() as i64 - guest);
        run(c, k, &format!("date -u -s @{} >/dev/null", host_now()))?;
    }
    std::thread::sleep(Duration::from_secs(3));
    let mut drift = Vec::new();
    for (k, c) in all.iter_mut().enumerate() {
        let guest: i64 = run(c, k, "date +%s")?
            .parse()
            .map_err(|e| format!("clone {k}: date +%s: {e}"))?;
        let d = guest - host_now() as i64;
        if d.abs() > 2 {
            return Err(format!(
                "clone {k}: date +%s is {d} s off the host's 3 s after it was set"
            ));
        }
        drift.push(d);
    }
    let mut pss = Vec::new();
    let mut rss = Vec::new();
    for c in all.iter() {
        pss.push(smaps_kib(c.child.id(), "Pss")?);
        rss.push(smaps_kib(c.child.id(), "Rss")?);
    }
    Ok(format!(
        "answered at {answered:?} ms after they started; each reseeded once; urandom {random:?}; \
         clocks {behind:?} s behind before set, {drift:?} s off after; \
         pss_kib {pss:?} sum {}; rss_kib {rss:?}",
        pss.iter().sum::<u64>()
    ))
}

/// The `migrate=DIR` check: saves the VM, ends it, starts the same VMM
/// restoring it, and reattaches to the guest's shell. Returns what it saw.
fn migrate_and_restore(
    dir: &str,
    vmm: &[String],
    child: &mut std::process::Child,
    listener: &UnixListener,
    shell: &str,
    b: &mut Backdoor,
) -> Result<String, String> {
    let saved = save_and_quit(dir, vmm, child)?;
    let t = Instant::now();
    *child = Command::new(&vmm[0])
        .args(&vmm[1..])
        .arg(format!("--incoming=file:{dir}"))
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", vmm[0]))?;
    *b = Backdoor::reattach(listener, shell, Duration::from_secs(120))
        .map_err(|e| format!("the restored VMM's console: {e}"))?;
    let (status, out) = b
        .execute("echo restored", Some(60))
        .map_err(|e| format!("first command after restore: {e}"))?;
    if status != 0 || out != b"restored\n" {
        return Err(format!(
            "first command after restore: status {status}, output {:?}",
            String::from_utf8_lossy(&out)
        ));
    }
    Ok(format!(
        "saved in {} ms; restored and answered a command {} ms after the VMM started",
        saved.as_millis(),
        t.elapsed().as_millis()
    ))
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut socket = None;
    let mut shell = "bash".to_owned();
    let mut timeout = 600u64;
    let mut checks: Vec<String> = Vec::new();
    let mut vmm: Vec<String> = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => socket = args.next(),
            "--shell" => shell = args.next().unwrap_or_default(),
            "--timeout" => timeout = args.next().and_then(|t| t.parse().ok()).unwrap_or(timeout),
            "--check" => checks.extend(args.next()),
            "--" => {
                vmm = args.by_ref().collect();
            }
            other => {
                log(&format!("unknown argument {other}"));
                return ExitCode::from(2);
            }
        }
    }
    let (Some(socket), Some(program)) = (socket, vmm.first().cloned()) else {
        log("usage: skiff-guest-session --socket PATH [--check NAME[=ARG]]... -- VMM [ARGS...]");
        return ExitCode::from(2);
    };
    let _ = std::fs::remove_file(&socket);
    let listener = match UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            log(&format!("cannot listen on {socket}: {e}"));
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    let mut child = match Command::new(&program).args(&vmm[1..]).spawn() {
        Ok(c) => c,
        Err(e) => {
            log(&format!("cannot start {program}: {e}"));
            return ExitCode::from(2);
        }
    };
    let mut ok = true;
    match Backdoor::accept(&listener, &shell, Duration::from_secs(timeout)) {
        Ok(mut b) => {
            log(&format!("backdoor ready after {:.1?}", start.elapsed()));
            for c in &checks {
                let (name, arg) = match c.split_once('=') {
                    Some((n, a)) => (n, Some(a)),
                    None => (c.as_str(), None),
                };
                let t = Instant::now();
                let result = if name == "migrate" {
                    let dir = arg.unwrap_or_default();
                    migrate_and_restore(dir, &vmm, &mut child, &listener, &shell, &mut b)
                } else if name == "clones" {
                    let arg = arg.unwrap_or_default();
                    clones(arg, &vmm, &socket, &mut child, &listener, &shell, &mut b)
                } else {
                    check(name, arg, &mut b)
                };
                match result {
                    Ok(detail) => log(&format!("CHECK {name} ok ({:.1?}): {detail}", t.elapsed())),
                    Err(detail) => {
                        ok = false;
                        log(&format!(
                            "CHECK {name} FAIL ({:.1?}): {detail}",
                            t.elapsed()
                        ));
                    }
                }
            }
            if let Err(e) = b.poweroff() {
                log(&format!("cannot send poweroff: {e}"));
            }
        }
        Err(e) => {
            ok = false;
            log(&format!("no backdoor shell: {e}"));
            let _ = child.kill();
        }
    }
    // Wait for the VMM, bounded.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut cpu = None;
    let status = loop {
        if cpu.is_none() {
            cpu = exited_cpu_time(child.id());
        }
        match child.try_wait() {
            Ok(Some(s)) => break s.code(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                log("the VMM did not exit after poweroff; killing it");
                let _ = child.kill();
                break child.wait().ok().and_then(|s| s.code());
            }
        }
    };
    log(&format!("vmm exit status {status:?}"));
    if let Some(cpu) = cpu {
        log(&format!("vmm cpu: {cpu}"));
    }
    let _ = std::fs::remove_file(&socket);
    if ok && status == Some(0) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
