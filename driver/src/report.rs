//! The run's log: a terminal log in the NixOS driver's format (with a
//! timestamp in front), a JSON-lines event log and a JUnit XML report with
//! one test case per subtest.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// One finished subtest, for the JUnit report.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    seconds: f64,
    failure: Option<String>,
}

struct Inner {
    events: Option<File>,
    cases: Vec<Case>,
    open_subtests: Vec<(String, Instant)>,
}

/// The log of one test run. One per process ([`logger`]).
pub struct Logger {
    start: Instant,
    color: bool,
    serial_stdout: AtomicBool,
    test_name: Mutex<String>,
    out_dir: Mutex<Option<PathBuf>>,
    inner: Mutex<Inner>,
}

#[derive(Serialize)]
struct Event<'a> {
    /// Seconds since the Unix epoch.
    time: f64,
    /// Seconds since the driver started.
    elapsed: f64,
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    machine: Option<&'a str>,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    seconds: Option<f64>,
}

/// The process's logger.
pub fn logger() -> &'static Logger {
    static L: OnceLock<Logger> = OnceLock::new();
    L.get_or_init(|| Logger {
        start: Instant::now(),
        // SAFETY: isatty only inspects the descriptor.
        color: unsafe { libc::isatty(2) } == 1 && std::env::var_os("NO_COLOR").is_none(),
        serial_stdout: AtomicBool::new(true),
        test_name: Mutex::new(String::from("test")),
        out_dir: Mutex::new(None),
        inner: Mutex::new(Inner {
            events: None,
            cases: Vec::new(),
            open_subtests: Vec::new(),
        }),
    })
}

fn clock() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let s = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        now.subsec_millis()
    )
}

/// Escapes text for XML attributes and content.
pub fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // XML 1.0 forbids most control characters.
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\r' | '\t') => {
                let _ = write!(o, "\\x{:02x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o
}

impl Logger {
    /// Starts the event log under `out_dir` for test `name`.
    pub fn open(&self, name: &str, out_dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(out_dir)?;
        let f = File::create(out_dir.join("events.jsonl"))?;
        *self.test_name.lock().unwrap_or_else(|e| e.into_inner()) = name.to_owned();
        *self.out_dir.lock().unwrap_or_else(|e| e.into_inner()) = Some(out_dir.to_owned());
        self.lock().events = Some(f);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seconds since the driver started.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    }

    fn emit(
        &self,
        inner: &mut Inner,
        kind: &str,
        machine: Option<&str>,
        message: &str,
        seconds: Option<f64>,
    ) {
        if let Some(f) = inner.events.as_mut() {
            let ev = Event {
                time: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64(),
                elapsed: self.elapsed(),
                kind,
                machine,
                message,
                seconds,
            };
            if let Ok(mut line) = serde_json::to_string(&ev) {
                line.push('\n');
                let _ = f.write_all(line.as_bytes());
            }
        }
    }

    fn terminal(&self, line: &str) {
        // One write per line.
        let text = format!("{} {line}\n", self.paint("2", &clock()));
        let _ = io::stderr().lock().write_all(text.as_bytes());
    }

    fn prefixed(machine: Option<&str>, msg: &str) -> String {
        match machine {
            Some(m) => format!("{m}: {msg}"),
            None => msg.to_owned(),
        }
    }

    /// A plain log line.
    pub fn log(&self, machine: Option<&str>, msg: &str) {
        let mut inner = self.lock();
        self.terminal(&Self::prefixed(machine, msg));
        self.emit(&mut inner, "log", machine, msg, None);
    }

    /// A warning (yellow).
    pub fn warning(&self, machine: Option<&str>, msg: &str) {
        let mut inner = self.lock();
        self.terminal(&self.paint("33", &Self::prefixed(machine, msg)));
        self.emit(&mut inner, "warning", machine, msg, None);
    }

    /// An error (red, every line prefixed `!!! `).
    pub fn error(&self, machine: Option<&str>, msg: &str) {
        let mut inner = self.lock();
        for l in Self::prefixed(machine, msg).lines() {
            self.terminal(&self.paint("31", &format!("!!! {l}")));
        }
        self.emit(&mut inner, "error", machine, msg, None);
    }

    /// Opens a nested block.
    pub fn begin_nested(&self, machine: Option<&str>, msg: &str) {
        let mut inner = self.lock();
        self.terminal(&self.paint("32", &Self::prefixed(machine, msg)));
        self.emit(&mut inner, "begin", machine, msg, None);
    }

    /// Closes a nested block that took `secs`.
    pub fn end_nested(&self, machine: Option<&str>, msg: &str, secs: f64) {
        let mut inner = self.lock();
        self.terminal(&Self::prefixed(
            machine,
            &format!("(finished: {msg}, in {secs:.2} seconds)"),
        ));
        self.emit(&mut inner, "end", machine, msg, Some(secs));
    }

    /// A line of a machine's serial console.
    pub fn serial(&self, machine: &str, line: &str) {
        if self.serial_stdout.load(Ordering::Relaxed) {
            let _inner = self.lock();
            self.terminal(&self.paint("2", &format!("{machine} # {line}")));
        }
    }

    /// Echo serial lines to the terminal or not.
    pub fn set_serial_stdout(&self, on: bool) {
        self.serial_stdout.store(on, Ordering::Relaxed);
    }

    /// A subtest begins (a JUnit test case).
    pub fn subtest_begin(&self, name: &str) {
        let msg = format!("subtest: {name}");
        let mut inner = self.lock();
        self.terminal(&self.paint("32", &msg));
        self.emit(&mut inner, "subtest_begin", None, name, None);
        inner.open_subtests.push((name.to_owned(), Instant::now()));
    }

    /// The innermost subtest ends, failed with `failure` or passed.
    pub fn subtest_end(&self, failure: Option<&str>) {
        let mut inner = self.lock();
        let Some((name, started)) = inner.open_subtests.pop() else {
            return;
        };
        let seconds = started.elapsed().as_secs_f64();
        match failure {
            Some(f) => {
                self.terminal(&self.paint(
                    "31",
                    &format!("!!! Test \"{name}\" failed with error: \"{f}\""),
                ));
                self.emit(&mut inner, "subtest_failed", None, &name, Some(seconds));
            }
            None => {
                self.terminal(&format!(
                    "(finished: subtest: {name}, in {seconds:.2} seconds)"
                ));
                self.emit(&mut inner, "subtest_passed", None, &name, Some(seconds));
            }
        }
        inner.cases.push(Case {
            name,
            seconds,
            failure: failure.map(str::to_owned),
        });
    }

    /// Ends the run: writes `junit.xml` (one case per subtest, and one for
    /// the script as a whole) and the final event.
    pub fn finish(&self, failure: Option<&str>) -> io::Result<()> {
        let mut inner = self.lock();
        // Subtests still open when the run stopped failed with it.
        while let Some((name, started)) = inner.open_subtests.pop() {
            inner.cases.push(Case {
                name,
                seconds: started.elapsed().as_secs_f64(),
                failure: Some(failure.unwrap_or("the test stopped").to_owned()),
            });
        }
        let total = self.elapsed();
        self.emit(
            &mut inner,
            if failure.is_some() {
                "failed"
            } else {
                "passed"
            },
            None,
            failure.unwrap_or("test script finished"),
            Some(total),
        );
        let name = self
            .test_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(dir) = self
            .out_dir
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return Ok(());
        };
        let mut cases = inner.cases.clone();
        cases.push(Case {
            name: "test script".to_owned(),
            seconds: total,
            failure: failure.map(str::to_owned),
        });
        std::fs::write(dir.join("junit.xml"), junit_xml(&name, &cases))
    }
}

fn junit_xml(suite: &str, cases: &[Case]) -> String {
    let failures = cases.iter().filter(|c| c.failure.is_some()).count();
    let total: f64 = cases.last().map(|c| c.seconds).unwrap_or(0.0);
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites><testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" time=\"{total:.3}\">",
        xml_escape(suite),
        cases.len()
    );
    for c in cases {
        let _ = write!(
            x,
            "  <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
            xml_escape(suite),
            xml_escape(&c.name),
            c.seconds
        );
        match &c.failure {
            Some(f) => {
                let first = f.lines().next().unwrap_or_default();
                let _ = writeln!(
                    x,
                    "><failure message=\"{}\">{}</failure></testcase>",
                    xml_escape(first),
                    xml_escape(f)
                );
            }
            None => x.push_str("/>\n"),
        }
    }
    x.push_str("</testsuite></testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_lists_cases_and_escapes() {
        let x = junit_xml(
            "t<1>",
            &[
                Case {
                    name: "a & b".into(),
                    seconds: 1.0,
                    failure: None,
                },
                Case {
                    name: "c".into(),
                    seconds: 2.0,
                    failure: Some("command `x` failed\nline2 \u{1}".into()),
                },
            ],
        );
        assert!(
            x.contains("name=\"t&lt;1&gt;\" tests=\"2\" failures=\"1\""),
            "{x}"
        );
        assert!(x.contains("name=\"a &amp; b\""));
        assert!(x.contains("<failure message=\"command `x` failed\">"));
        assert!(x.contains("line2 \\x01"));
    }
}
