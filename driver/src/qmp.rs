//! The driver's QMP client: one connection to the QMP socket of one
//! `skiff-vmm` run. Connecting waits for the socket to appear (the VMM
//! creates it while it starts), reads the greeting and negotiates
//! capabilities; then commands go out one at a time, each waiting for its
//! reply. A reader thread per connection sorts what arrives: replies go to
//! the command in flight, events to an [`Events`] queue. The queue is not
//! the connection's: a machine hands the same one to every connection it
//! opens, so its event stream survives a VMM restart.
//!
//! Invariants:
//! - At most one command is in flight per connection: its lock is held
//!   from the write until the reply (or the end of the wait).
//! - Each command carries a fresh `id`. A reply with another id answers a
//!   command that gave up waiting and is dropped; a reply without one (a
//!   server that echoes no ids, or input it could not parse) answers the
//!   command in flight.
//! - Every wait is driven by a [`Watcher`], ticked at least once a second:
//!   it owns the deadline and may stop the wait (interrupt, dead VMM). This
//!   module knows nothing of machines.
//! - Once the reader thread ends (end of file, a read error, a line that is
//!   not a JSON object), the connection is over: later commands fail at
//!   once, and events received before the end stay in the queue.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use thiserror::Error;

use crate::shell::{Stop, Watcher};

/// The longest a wait goes without asking its watcher whether to go on.
const TICK: Duration = Duration::from_millis(250);

/// How often a connect retries while the socket is not there yet.
const CONNECT_POLL: Duration = Duration::from_millis(20);

/// A QMP object: a reply, an event or the greeting.
pub type Object = Map<String, Value>;

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Ended {
    #[error("the VMM closed its QMP socket")]
    Eof,
    #[error("reading the QMP socket failed: {0}")]
    Io(String),
    #[error("the VMM sent a message that is not a JSON object: {0:?}")]
    Garbled(String),
}

/// Why a QMP request failed.
#[derive(Debug, Error)]
pub enum QmpError {
    /// The socket did not accept a connection before the watcher's
    /// deadline; `source` is the last attempt's error.
    #[error("cannot connect to the QMP socket {} within {} s: {source}", path.display(), waited.as_secs())]
    Connect {
        path: PathBuf,
        waited: Duration,
        source: io::Error,
    },
    /// The connection came up but the greeting did not.
    #[error("no QMP greeting on {}: {why}", path.display())]
    Greeting { path: PathBuf, why: String },
    /// The connection could not be set up on our side (socket options,
    /// the reader thread).
    #[error("setting up the QMP connection failed: {0}")]
    Setup(io::Error),
    /// The watcher stopped the wait for some reason other than its
    /// deadline.
    #[error("{0}")]
    Stopped(Stop),
    /// The command could not be written.
    #[error("QMP command {command}: writing to the socket failed: {source}")]
    Write { command: String, source: io::Error },
    /// The watcher's deadline passed before the reply came.
    #[error("QMP command {command} got no reply within {} s", waited.as_secs())]
    NoReply { command: String, waited: Duration },
    /// The connection ended before the reply came.
    #[error("QMP command {command} got no reply: {ended}")]
    Closed { command: String, ended: Ended },
    /// The VMM answered with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Api {
        command: String,
        class: String,
        desc: String,
    },
    /// The reply has neither `return` nor `error`.
    #[error("QMP command {command} got an unexpected reply: {reply}")]
    Protocol { command: String, reply: String },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn times_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

#[derive(Default)]
struct EventState {
    queue: VecDeque<Object>,
    /// Connections whose reader thread still runs.
    feeds: usize,
}

/// A queue of QMP events, fed by the reader threads of one or more
/// connections (one after another, as a machine's VMM restarts).
#[derive(Default)]
pub struct Events {
    state: Mutex<EventState>,
    arrived: Condvar,
}

impl Events {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Drops the events not yet taken.
    pub fn clear(&self) {
        lock(&self.state).queue.clear();
    }

    /// Whether nothing is queued and no connection feeds the queue: no
    /// event can come until a new connection is opened.
    pub fn idle(&self) -> bool {
        let s = lock(&self.state);
        s.queue.is_empty() && s.feeds == 0
    }

    /// Takes the oldest event, waiting for one as long as `watcher` lets
    /// it; returns why the watcher stopped otherwise (a deadline is
    /// [`Stop::Timeout`]).
    pub fn next(&self, watcher: &mut dyn Watcher) -> Result<Object, Stop> {
        let start = Instant::now();
        loop {
            {
                let mut s = lock(&self.state);
                if s.queue.is_empty() {
                    s = self
                        .arrived
                        .wait_timeout(s, TICK)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                if let Some(event) = s.queue.pop_front() {
                    return Ok(event);
                }
            }
            // Not under the lock: the watcher may look at the queue.
            watcher.tick(start.elapsed())?;
        }
    }

    fn push(&self, event: Object) {
        lock(&self.state).queue.push_back(event);
        self.arrived.notify_all();
    }

    fn attach(&self) {
        lock(&self.state).feeds += 1;
    }

    fn detach(&self) {
        let mut s = lock(&self.state);
        s.feeds = s.feeds.saturating_sub(1);
        drop(s);
        self.arrived.notify_all();
    }
}

#[derive(Default)]
struct InboxState {
    replies: VecDeque<Object>,
    ended: Option<Ended>,
}

/// The replies of one connection, from its reader thread.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    arrived: Condvar,
}

impl Inbox {
    /// The next reply, waiting at most `wait`: None if none came, the
    /// end of the connection once no reply is left.
    fn next(&self, wait: Duration) -> Result<Option<Object>, Ended> {
        let mut s = lock(&self.state);
        if s.replies.is_empty() && s.ended.is_none() {
            s = self
                .arrived
                .wait_timeout(s, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        match (s.replies.pop_front(), &s.ended) {
            (Some(reply), _) => Ok(Some(reply)),
            (None, Some(ended)) => Err(ended.clone()),
            (None, None) => Ok(None),
        }
    }

    fn push(&self, reply: Object) {
        lock(&self.state).replies.push_back(reply);
        self.arrived.notify_all();
    }

    fn end(&self, ended: Ended) {
        lock(&self.state).ended = Some(ended);
        self.arrived.notify_all();
    }
}

/// The write side of a connection, and the last command id used.
struct Writer {
    stream: UnixStream,
    last_id: u64,
}

/// One QMP connection, negotiated and ready for commands.
pub struct Client {
    writer: Mutex<Writer>,
    inbox: Arc<Inbox>,
}

impl Client {
    /// Connects to the socket at `path`, retrying while it is not there
    /// (or refuses) for as long as `watcher` lets it, reads the greeting
    /// and negotiates capabilities. Events go to `events`.
    pub fn connect(
        path: &Path,
        events: Arc<Events>,
        watcher: &mut dyn Watcher,
    ) -> Result<Client, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(source) => match watcher.tick(start.elapsed()) {
                    Ok(()) => std::thread::sleep(CONNECT_POLL),
                    Err(Stop::Timeout) => {
                        return Err(QmpError::Connect {
                            path: path.to_owned(),
                            waited: start.elapsed(),
                            source,
                        })
                    }
                    Err(stop) => return Err(QmpError::Stopped(stop)),
                },
            }
        };
        stream
            .set_read_timeout(Some(TICK))
            .map_err(QmpError::Setup)?;
        let mut reader = BufReader::new(stream.try_clone().map_err(QmpError::Setup)?);
        let no_greeting = |why: String| QmpError::Greeting {
            path: path.to_owned(),
            why,
        };
        // The server greets at once.
        let mut line = Vec::new();
        loop {
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => return Err(no_greeting("the socket closed".into())),
                Ok(_) => break,
                // What a timed-out read got so far stays in `line`.
                Err(e) if times_out(&e) => match watcher.tick(start.elapsed()) {
                    Ok(()) => {}
                    Err(Stop::Timeout) => {
                        return Err(no_greeting(format!(
                            "none within {} s",
                            start.elapsed().as_secs()
                        )))
                    }
                    Err(stop) => return Err(QmpError::Stopped(stop)),
                },
                Err(e) => return Err(no_greeting(e.to_string())),
            }
        }
        let text = String::from_utf8_lossy(&line);
        match serde_json::from_str::<Value>(text.trim()) {
            Ok(Value::Object(m)) if m.contains_key("QMP") => {}
            _ => {
                return Err(no_greeting(format!(
                    "unexpected greeting {:?}",
                    text.trim()
                )))
            }
        }
        reader
            .get_ref()
            .set_read_timeout(None)
            .map_err(QmpError::Setup)?;
        let inbox = Arc::new(Inbox::default());
        events.attach();
        let spawned = {
            let inbox = inbox.clone();
            let events = events.clone();
            std::thread::Builder::new()
                .name("qmp-reader".into())
                .spawn(move || read_messages(reader, &inbox, &events))
        };
        if let Err(e) = spawned {
            events.detach();
            return Err(QmpError::Setup(e));
        }
        let client = Client {
            writer: Mutex::new(Writer { stream, last_id: 0 }),
            inbox,
        };
        client.execute("qmp_capabilities", None, watcher)?;
        Ok(client)
    }

    /// Whether the connection is over (see the module's invariants).
    pub fn ended(&self) -> bool {
        lock(&self.inbox.state).ended.is_some()
    }

    /// Runs `command` with `arguments` (none if empty) and returns its
    /// `return` value. Waits for the reply as long as `watcher` lets it.
    pub fn execute(
        &self,
        command: &str,
        arguments: Option<Object>,
        watcher: &mut dyn Watcher,
    ) -> Result<Value, QmpError> {
        let mut w = lock(&self.writer);
        w.last_id += 1;
        let id = w.last_id;
        let mut msg = Object::new();
        msg.insert("execute".into(), command.into());
        if let Some(arguments) = arguments.filter(|a| !a.is_empty()) {
            msg.insert("arguments".into(), arguments.into());
        }
        msg.insert("id".into(), id.into());
        let mut line = Value::Object(msg).to_string().into_bytes();
        line.push(b'\n');
        // Replies still queued answer commands that gave up waiting.
        let ended = {
            let mut s = lock(&self.inbox.state);
            s.replies.clear();
            s.ended.clone()
        };
        let closed = |ended| QmpError::Closed {
            command: command.to_owned(),
            ended,
        };
        if let Some(ended) = ended {
            return Err(closed(ended));
        }
        if let Err(source) = w.stream.write_all(&line) {
            return Err(match lock(&self.inbox.state).ended.clone() {
                Some(ended) => closed(ended),
                None => QmpError::Write {
                    command: command.to_owned(),
                    source,
                },
            });
        }
        let start = Instant::now();
        loop {
            match self.inbox.next(TICK).map_err(closed)? {
                Some(reply) => match reply.get("id") {
                    Some(theirs) if theirs.as_u64() != Some(id) => continue,
                    _ => return answer(command, reply),
                },
                None => watcher.tick(start.elapsed()).map_err(|stop| match stop {
                    Stop::Timeout => QmpError::NoReply {
                        command: command.to_owned(),
                        waited: start.elapsed(),
                    },
                    stop => QmpError::Stopped(stop),
                })?,
            }
        }
    }
}

impl Drop for Client {
    /// Ends the connection; the reader thread still takes what was sent
    /// before, then ends.
    fn drop(&mut self) {
        let _ = lock(&self.writer).stream.shutdown(Shutdown::Both);
    }
}

/// A reply's `return` value, or its error.
fn answer(command: &str, mut reply: Object) -> Result<Value, QmpError> {
    if let Some(error) = reply.get("error") {
        let field = |name: &str| {
            error
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned()
        };
        return Err(QmpError::Api {
            command: command.to_owned(),
            class: field("class"),
            desc: field("desc"),
        });
    }
    match reply.remove("return") {
        Some(value) => Ok(value),
        None => Err(QmpError::Protocol {
            command: command.to_owned(),
            reply: Value::Object(reply).to_string(),
        }),
    }
}

/// The reader thread: sorts messages into `inbox` and `events` until the
/// connection ends.
fn read_messages(mut reader: BufReader<UnixStream>, inbox: &Inbox, events: &Events) {
    let mut line = Vec::new();
    let ended = loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break Ended::Eof,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Ended::Io(e.to_string()),
        }
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Value>(text) {
            Ok(Value::Object(m)) if m.contains_key("event") => events.push(m),
            Ok(Value::Object(m)) => inbox.push(m),
            _ => break Ended::Garbled(String::from_utf8_lossy(text).into_owned()),
        }
    };
    // Detach first: once a command sees the end, no connection feeds
    // the queue any more.
    events.detach();
    inbox.end(ended);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread::JoinHandle;

    /// Gives up after `0`; counts its ticks.
    struct Deadline(Duration, usize);

    impl Watcher for Deadline {
        fn tick(&mut self, waited: Duration) -> Result<(), Stop> {
            self.1 += 1;
            if waited >= self.0 {
                Err(Stop::Timeout)
            } else {
                Ok(())
            }
        }
    }

    fn patient() -> Deadline {
        Deadline(Duration::from_secs(20), 0)
    }

    /// A socket path in a directory of its own, removed on drop.
    struct SocketPath(PathBuf);

    impl std::ops::Deref for SocketPath {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for SocketPath {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn socket_path() -> SocketPath {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "skiff-qmp-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        SocketPath(dir.join("qmp"))
    }

    /// The server's side of one connection.
    struct Peer {
        reader: BufReader<UnixStream>,
        stream: UnixStream,
    }

    impl Peer {
        /// The next command; panics on end of file.
        fn command(&mut self) -> Object {
            let mut line = String::new();
            assert_ne!(self.reader.read_line(&mut line).unwrap(), 0, "EOF");
            assert!(line.ends_with('\n'), "{line:?}");
            match serde_json::from_str(&line).unwrap() {
                Value::Object(m) => m,
                other => panic!("{other}"),
            }
        }

        /// Sends `v` as QEMU does: one line, ending in CRLF.
        fn send(&mut self, v: Value) {
            self.stream
                .write_all(format!("{v}\r\n").as_bytes())
                .unwrap();
        }

        /// Reads a command named `name` and answers it with `ret`.
        fn answer(&mut self, name: &str, ret: Value) -> Object {
            let c = self.command();
            assert_eq!(c["execute"], name, "{c:?}");
            self.send(json!({"return": ret, "id": c["id"]}));
            c
        }
    }

    /// A server at `path` that accepts one client after `delay` and runs
    /// `script` on it (the greeting is sent first unless `greet` is false).
    fn serve(
        path: &Path,
        delay: Duration,
        greet: bool,
        script: impl FnOnce(&mut Peer) + Send + 'static,
    ) -> JoinHandle<()> {
        let path = path.to_owned();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let listener = UnixListener::bind(&path).unwrap();
            let (stream, _) = listener.accept().unwrap();
            let mut peer = Peer {
                reader: BufReader::new(stream.try_clone().unwrap()),
                stream,
            };
            if greet {
                peer.send(json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "test"}, "capabilities": []}}));
            }
            script(&mut peer);
        })
    }

    /// A negotiated client of a server running `script`; the server's
    /// own checks fail the test when it joins the handle.
    fn connected(
        script: impl FnOnce(&mut Peer) + Send + 'static,
    ) -> (Client, Arc<Events>, JoinHandle<()>) {
        let path = socket_path();
        let server = serve(&path, Duration::ZERO, true, move |p| {
            p.answer("qmp_capabilities", json!({}));
            script(p);
        });
        let events = Events::new();
        let client = Client::connect(&path, events.clone(), &mut patient()).unwrap();
        (client, events, server)
    }

    #[test]
    fn connect_waits_for_the_socket_then_negotiates() {
        let path = socket_path();
        let server = serve(&path, Duration::from_millis(200), true, |p| {
            let c = p.answer("qmp_capabilities", json!({}));
            assert_eq!(c.get("arguments"), None);
            assert_eq!(c["id"], 1);
            let c = p.answer(
                "query-status",
                json!({"status": "running", "running": true}),
            );
            assert_eq!(c["id"], 2);
        });
        let events = Events::new();
        let mut w = patient();
        let client = Client::connect(&path, events.clone(), &mut w).unwrap();
        assert!(
            w.1 > 0,
            "the watcher was not asked while the socket was missing"
        );
        let status = client
            .execute("query-status", None, &mut patient())
            .unwrap();
        assert_eq!(status, json!({"status": "running", "running": true}));
        server.join().unwrap();
    }

    #[test]
    fn arguments_go_out_and_errors_come_back_typed() {
        let (client, _, server) = connected(|p| {
            let c = p.command();
            assert_eq!(c["execute"], "human-monitor-command");
            assert_eq!(c["arguments"], json!({"command-line": "info status"}));
            p.send(json!({"return": "VM status: running\r\n", "id": c["id"]}));
            let c = p.command();
            p.send(json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": c["id"]}));
            // An empty argument object is left out.
            let c = p.answer("stop", json!({}));
            assert_eq!(c.get("arguments"), None);
        });
        let mut args = Object::new();
        args.insert("command-line".into(), "info status".into());
        let out = client
            .execute("human-monitor-command", Some(args), &mut patient())
            .unwrap();
        assert_eq!(out, "VM status: running\r\n");
        match client.execute("nope", None, &mut patient()) {
            Err(QmpError::Api {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "nope");
                assert_eq!(class, "CommandNotFound");
                assert_eq!(desc, "The command nope has not been found");
            }
            other => panic!("{other:?}"),
        }
        let out = client
            .execute("stop", Some(Object::new()), &mut patient())
            .unwrap();
        assert_eq!(out, json!({}));
        server.join().unwrap();
    }

    #[test]
    fn events_around_a_reply_go_to_the_queue_in_order() {
        let (client, events, server) = connected(|p| {
            let c = p.command();
            p.send(json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}));
            p.send(json!({"return": {}, "id": c["id"]}));
            p.send(json!({"event": "RESUME", "timestamp": {"seconds": 3, "microseconds": 4}}));
        });
        assert_eq!(
            client.execute("stop", None, &mut patient()).unwrap(),
            json!({})
        );
        let first = events.next(&mut patient()).unwrap();
        assert_eq!(first["event"], "STOP");
        let second = events.next(&mut patient()).unwrap();
        assert_eq!(second["event"], "RESUME");
        assert_eq!(second["timestamp"]["seconds"], 3);
        // Nothing more: the watcher's deadline ends the wait.
        let mut w = Deadline(Duration::from_millis(300), 0);
        assert_eq!(events.next(&mut w), Err(Stop::Timeout));
        server.join().unwrap();
    }

    #[test]
    fn a_stale_reply_is_dropped_and_an_id_less_one_accepted() {
        let (client, _, server) = connected(|p| {
            let c = p.command();
            assert_eq!(c["execute"], "query-status");
            // A late answer to an earlier command, then one without an id
            // (as the test stubs and a parse error send).
            p.send(json!({"return": "stale", "id": 999}));
            p.send(json!({"return": "fresh"}));
        });
        let out = client
            .execute("query-status", None, &mut patient())
            .unwrap();
        assert_eq!(out, "fresh");
        server.join().unwrap();
    }

    #[test]
    fn a_command_without_a_reply_times_out_and_the_next_one_works() {
        let (client, _, server) = connected(|p| {
            let slow = p.command();
            assert_eq!(slow["execute"], "slow");
            let next = p.command();
            // The slow reply comes late, before the next one's.
            p.send(json!({"return": "late", "id": slow["id"]}));
            p.send(json!({"return": "next", "id": next["id"]}));
        });
        let mut w = Deadline(Duration::from_millis(300), 0);
        match client.execute("slow", None, &mut w) {
            Err(QmpError::NoReply { command, .. }) => assert_eq!(command, "slow"),
            other => panic!("{other:?}"),
        }
        let out = client.execute("next", None, &mut patient()).unwrap();
        assert_eq!(out, "next");
        server.join().unwrap();
    }

    #[test]
    fn the_server_closing_ends_the_connection_but_not_its_events() {
        let (client, events, server) = connected(|p| {
            let _ = p.command();
            p.send(
                json!({"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}),
            );
            // The connection closes without a reply.
        });
        match client.execute("quit", None, &mut patient()) {
            Err(QmpError::Closed { command, ended }) => {
                assert_eq!(command, "quit");
                assert_eq!(ended, Ended::Eof);
            }
            other => panic!("{other:?}"),
        }
        assert!(client.ended());
        // The event sent before the end is still there; then nothing can
        // come any more.
        assert_eq!(events.next(&mut patient()).unwrap()["event"], "SHUTDOWN");
        assert!(events.idle());
        match client.execute("query-status", None, &mut patient()) {
            Err(QmpError::Closed {
                ended: Ended::Eof, ..
            }) => {}
            other => panic!("{other:?}"),
        }
        server.join().unwrap();
    }

    #[test]
    fn a_garbled_message_ends_the_connection() {
        let (client, _, server) = connected(|p| {
            let _ = p.command();
            p.stream.write_all(b"{\"return\": \r\n").unwrap();
            // The connection stays open until the client drops it.
            let mut rest = String::new();
            assert_eq!(p.reader.read_line(&mut rest).unwrap(), 0, "{rest:?}");
        });
        match client.execute("query-status", None, &mut patient()) {
            Err(QmpError::Closed {
                ended: Ended::Garbled(text),
                ..
            }) => assert_eq!(text, "{\"return\":"),
            other => panic!("{other:?}"),
        }
        assert!(client.ended());
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn connect_fails_without_a_socket_or_a_greeting() {
        // Nothing listens: the watcher's deadline ends the wait.
        let path = socket_path();
        let mut w = Deadline(Duration::from_millis(200), 0);
        match Client::connect(&path, Events::new(), &mut w) {
            Err(QmpError::Connect {
                path: p, source, ..
            }) => {
                assert_eq!(p, *path);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        // The watcher's other reasons come back as they are.
        struct Dead;
        impl Watcher for Dead {
            fn tick(&mut self, _: Duration) -> Result<(), Stop> {
                Err(Stop::VmExited)
            }
        }
        match Client::connect(&path, Events::new(), &mut Dead) {
            Err(QmpError::Stopped(Stop::VmExited)) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
        // A server that closes before greeting.
        let path = socket_path();
        let server = serve(&path, Duration::ZERO, false, |_| {});
        match Client::connect(&path, Events::new(), &mut patient()) {
            Err(QmpError::Greeting { why, .. }) => assert_eq!(why, "the socket closed"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        server.join().unwrap();
        // A server that greets with something else.
        let path = socket_path();
        let server = serve(&path, Duration::ZERO, false, |p| {
            p.send(json!({"hello": 1}));
        });
        match Client::connect(&path, Events::new(), &mut patient()) {
            Err(QmpError::Greeting { why, .. }) => {
                assert!(why.starts_with("unexpected greeting"), "{why}")
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        server.join().unwrap();
    }

    #[test]
    fn a_failed_negotiation_fails_the_connect() {
        let path = socket_path();
        let server = serve(&path, Duration::ZERO, true, |p| {
            let c = p.command();
            p.send(json!({"error": {"class": "GenericError", "desc": "no"}, "id": c["id"]}));
        });
        let events = Events::new();
        match Client::connect(&path, events.clone(), &mut patient()) {
            Err(QmpError::Api { command, .. }) => assert_eq!(command, "qmp_capabilities"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        server.join().unwrap();
        // The dropped connection's reader ends and stops feeding the queue.
        let t = Instant::now();
        while !events.idle() {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
