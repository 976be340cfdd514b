//! The monitor sockets: a current-thread tokio runtime on a thread of its
//! own serves every QMP and HMP connection. Each connection is a task; a
//! client that floods, stops reading or disconnects mid-reply only stalls
//! or ends its own task. Commands run on this thread and return once done
//! (a `stop` waits for the vCPUs to park), so replies follow their events.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, watch};

use super::qmp::{greeting, Session};
use super::stream::JsonStream;
use super::{hmp, Controls, EventHub};

/// Longest HMP command line; longer lines are cut (QEMU's readline keeps
/// a few KiB too).
const MAX_HMP_LINE: usize = 4096;
const READ_CHUNK: usize = 4096;

/// Which protocol a socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// QMP (JSON).
    Qmp,
    /// The human monitor (text).
    Hmp,
}

/// A socket prepared before the VM starts, so that a bad path is reported
/// as a start-up error.
#[derive(Debug)]
pub enum Socket {
    /// A listening socket at a path (removed again when the VMM exits).
    Listen(std::os::unix::net::UnixListener, PathBuf),
    /// A connection the VMM made to someone else's listening socket.
    Connected(std::os::unix::net::UnixStream),
}

/// Binds a listening unix socket at `path`, replacing a stale socket
/// there (as QEMU does) but never another kind of file.
pub fn listen(path: &Path) -> io::Result<Socket> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    // Only the owner may connect: whoever reaches the monitor controls
    // the VM. (The driver also puts its sockets in a 0700 directory.)
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(Socket::Listen(listener, path.to_owned()))
}

/// Connects to a listening unix socket at `path`.
pub fn connect(path: &Path) -> io::Result<Socket> {
    std::os::unix::net::UnixStream::connect(path).map(Socket::Connected)
}

/// The running server.
pub struct Server {
    closing: watch::Sender<bool>,
    done: std::sync::mpsc::Receiver<()>,
    paths: Vec<PathBuf>,
}

impl Server {
    /// Stops accepting, lets every connection finish the command it is
    /// running and send the events still queued for it, then closes them;
    /// waits at most `timeout` for that. Removes the listening sockets.
    pub fn finish(self, timeout: Duration) {
        let _ = self.closing.send(true);
        if self.done.recv_timeout(timeout).is_err() {
            debug!("monitor connections did not close within {timeout:?}");
        }
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Starts serving `sockets` on a new thread.
pub fn start(
    sockets: Vec<(Protocol, Socket)>,
    machine: Arc<dyn Controls>,
    events: EventHub,
) -> io::Result<Server> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (closing, closing_rx) = watch::channel(false);
    let (done_tx, done) = std::sync::mpsc::channel();
    let paths = sockets
        .iter()
        .filter_map(|(_, s)| match s {
            Socket::Listen(_, p) => Some(p.clone()),
            Socket::Connected(_) => None,
        })
        .collect();
    // Nonblocking mode is needed before tokio takes the sockets over.
    for (_, s) in &sockets {
        match s {
            Socket::Listen(l, _) => l.set_nonblocking(true)?,
            Socket::Connected(c) => c.set_nonblocking(true)?,
        }
    }
    std::thread::Builder::new()
        .name("monitors".into())
        .spawn(move || {
            crate::seccomp::enter_or_end(crate::seccomp::ThreadKind::Monitors);
            runtime.block_on(serve(sockets, machine, events, closing_rx));
            let _ = done_tx.send(());
        })?;
    Ok(Server {
        closing,
        done,
        paths,
    })
}

#[derive(Clone)]
struct Ctx {
    machine: Arc<dyn Controls>,
    events: EventHub,
    closing: watch::Receiver<bool>,
    // Every connection task holds a clone; when all are gone, the
    // receiver sees the channel close.
    _alive: mpsc::Sender<()>,
}

async fn serve(
    sockets: Vec<(Protocol, Socket)>,
    machine: Arc<dyn Controls>,
    events: EventHub,
    mut closing: watch::Receiver<bool>,
) {
    let (alive, mut all_gone) = mpsc::channel(1);
    let ctx = Ctx {
        machine,
        events,
        closing: closing.clone(),
        _alive: alive,
    };
    for (proto, socket) in sockets {
        match socket {
            Socket::Listen(l, path) => match tokio::net::UnixListener::from_std(l) {
                Ok(l) => {
                    tokio::spawn(accept_loop(l, path, proto, ctx.clone()));
                }
                Err(e) => warn!("monitor socket {}: {e}", path.display()),
            },
            Socket::Connected(s) => match tokio::net::UnixStream::from_std(s) {
                Ok(s) => {
                    tokio::spawn(client(s, proto, ctx.clone()));
                }
                Err(e) => warn!("monitor connection: {e}"),
            },
        }
    }
    drop(ctx);
    while !*closing.borrow_and_update() {
        if closing.changed().await.is_err() {
            break;
        }
    }
    // Wait for the connections to flush and close.
    let _ = all_gone.recv().await;
}

async fn accept_loop(listener: tokio::net::UnixListener, path: PathBuf, proto: Protocol, ctx: Ctx) {
    let mut closing = ctx.closing.clone();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    debug!("{proto:?} client connected on {}", path.display());
                    tokio::spawn(client(stream, proto, ctx.clone()));
                }
                Err(e) => {
                    warn!("monitor socket {}: accept failed: {e}", path.display());
                    // Out of file descriptors or similar: do not spin.
                    tokio::task::yield_now().await;
                }
            },
            r = closing.changed() => {
                if r.is_err() || *closing.borrow() {
                    return;
                }
            }
        }
    }
}

async fn client(stream: tokio::net::UnixStream, proto: Protocol, ctx: Ctx) {
    let (rd, wr) = stream.into_split();
    let result = match proto {
        Protocol::Qmp => qmp_client(rd, wr, &ctx).await,
        Protocol::Hmp => hmp_client(rd, wr, &ctx).await,
    };
    if let Err(e) = result {
        debug!("{proto:?} client gone: {e}");
    }
}

async fn write_line<W: AsyncWrite + Unpin>(w: &mut W, line: &str) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(line.len() + 2);
    bytes.extend_from_slice(line.as_bytes());
    bytes.extend_from_slice(b"\r\n");
    w.write_all(&bytes).await
}

/// The next event for a negotiated client (never resolves before
/// negotiation).
async fn next_event(rx: &mut Option<broadcast::Receiver<Arc<str>>>) -> Arc<str> {
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    loop {
        match rx.recv().await {
            Ok(line) => return line,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                debug!("a slow QMP client lost {n} events");
            }
            Err(broadcast::error::RecvError::Closed) => return std::future::pending().await,
        }
    }
}

/// Sends every event already queued for this client.
async fn flush_events<W: AsyncWrite + Unpin>(
    rx: &mut Option<broadcast::Receiver<Arc<str>>>,
    w: &mut W,
) -> io::Result<()> {
    let Some(rx) = rx else { return Ok(()) };
    loop {
        match rx.try_recv() {
            Ok(line) => write_line(w, &line).await?,
            Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => return Ok(()),
        }
    }
}

fn is_closing(closing: &watch::Receiver<bool>) -> bool {
    *closing.borrow()
}

async fn qmp_client<R, W>(mut rd: R, mut wr: W, ctx: &Ctx) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut closing = ctx.closing.clone();
    write_line(&mut wr, &greeting()).await?;
    let mut session = Session::new();
    let mut input = JsonStream::new();
    let mut events = None;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        // Commands are answered one at a time, in order; the events a
        // command causes go out before its reply.
        while let Some(msg) = input.next_input() {
            let out = session.handle(msg, &*ctx.machine);
            if out.negotiated {
                events = Some(ctx.events.subscribe());
            }
            flush_events(&mut events, &mut wr).await?;
            write_line(&mut wr, &out.reply).await?;
        }
        if is_closing(&closing) {
            flush_events(&mut events, &mut wr).await?;
            return wr.shutdown().await;
        }
        tokio::select! {
            r = rd.read(&mut buf) => match r? {
                0 => return Ok(()),
                n => input.feed(&buf[..n]),
            },
            line = next_event(&mut events) => write_line(&mut wr, &line).await?,
            r = closing.changed() => {
                if r.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

async fn hmp_client<R, W>(mut rd: R, mut wr: W, ctx: &Ctx) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut closing = ctx.closing.clone();
    wr.write_all(format!("{}{}", hmp::banner(), hmp::PROMPT).as_bytes())
        .await?;
    let mut line = Vec::new();
    let mut after_cr = false;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        if is_closing(&closing) {
            return wr.shutdown().await;
        }
        let n = tokio::select! {
            r = rd.read(&mut buf) => match r? {
                0 => return Ok(()),
                n => n,
            },
            r = closing.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                continue;
            }
        };
        for &b in &buf[..n] {
            let end = match b {
                b'\n' if after_cr => {
                    after_cr = false;
                    continue;
                }
                b'\n' => true,
                b'\r' => {
                    after_cr = true;
                    true
                }
                _ => {
                    after_cr = false;
                    false
                }
            };
            if !end {
                if line.len() < MAX_HMP_LINE {
                    line.push(b);
                }
                continue;
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            line.clear();
            let mut out = hmp::execute(&text, &*ctx.machine);
            out.push_str(hmp::PROMPT);
            wr.write_all(out.as_bytes()).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::fake;
    use super::*;
    use serde_json::Value;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixStream;

    struct Harness {
        dir: PathBuf,
        server: Option<Server>,
        fake: Arc<super::super::testing::Fake>,
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            if let Some(s) = self.server.take() {
                s.finish(Duration::from_secs(1));
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn harness(name: &str) -> Harness {
        let dir = std::env::temp_dir().join(format!("skiff-ctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = Arc::new(fake());
        let machine: Arc<dyn Controls> = Arc::new(FakeRef(f.clone()));
        let server = start(
            vec![
                (Protocol::Qmp, listen(&dir.join("qmp")).unwrap()),
                (Protocol::Hmp, listen(&dir.join("mon")).unwrap()),
            ],
            machine,
            f.events.clone(),
        )
        .unwrap();
        Harness {
            dir,
            server: Some(server),
            fake: f,
        }
    }

    /// Shares the fake between the server and the test.
    struct FakeRef(Arc<super::super::testing::Fake>);

    impl Controls for FakeRef {
        fn run_state(&self) -> super::super::RunState {
            self.0.control.run_state()
        }
        fn stop(&self) {
            self.0.control.stop()
        }
        fn cont(&self) -> Result<(), String> {
            self.0.control.cont()
        }
        fn system_reset(&self) {
            self.0.control.system_reset()
        }
        fn system_powerdown(&self) {
            self.0.control.system_powerdown()
        }
        fn quit(&self) {
            self.0.control.quit()
        }
        fn info(&self) -> &super::super::MachineInfo {
            self.0.control.info()
        }
        fn vcpu_thread_ids(&self) -> Vec<i64> {
            self.0.control.vcpu_thread_ids()
        }
        fn set_link(&self, name: &str, up: bool) -> Result<(), String> {
            self.0.control.set_link(name, up)
        }
        fn migrate(&self, uri: &str) -> Result<(), String> {
            self.0.control.migrate(uri)
        }
        fn migration(&self) -> super::super::Migration {
            self.0.control.migration()
        }
        fn display(&self) -> &super::super::display::Display {
            self.0.control.display()
        }
        fn cpu_dumps(&self) -> Result<Vec<crate::cpu::dump::CpuDump>, String> {
            self.0.control.cpu_dumps()
        }
    }

    struct Client {
        reader: BufReader<UnixStream>,
        writer: UnixStream,
    }

    impl Client {
        fn connect(path: &Path) -> Client {
            let s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            Client {
                writer: s.try_clone().unwrap(),
                reader: BufReader::new(s),
            }
        }

        fn line(&mut self) -> String {
            let mut l = String::new();
            self.reader.read_line(&mut l).unwrap();
            assert!(l.ends_with("\r\n"), "{l:?}");
            l.truncate(l.len() - 2);
            l
        }

        fn json(&mut self) -> Value {
            serde_json::from_str(&self.line()).unwrap()
        }

        fn send(&mut self, bytes: &[u8]) {
            self.writer.write_all(bytes).unwrap();
        }

        fn negotiate(&mut self) {
            assert!(self.line().starts_with(r#"{"QMP": "#));
            self.send(br#"{"execute":"qmp_capabilities"}"#);
            assert_eq!(self.line(), r#"{"return": {}}"#);
        }

        /// Reads HMP output up to and including the prompt.
        fn until_prompt(&mut self) -> String {
            let mut out = Vec::new();
            let mut b = [0u8; 1];
            while !out.ends_with(b"(qemu) ") {
                self.reader.read_exact(&mut b).unwrap();
                out.push(b[0]);
            }
            String::from_utf8(out).unwrap()
        }
    }

    #[test]
    fn qmp_session_over_a_socket() {
        let h = harness("qmp");
        let mut c = Client::connect(&h.dir.join("qmp"));
        c.negotiate();
        // No newline after the request, as qemu.qmp sends it.
        c.send(br#"{"execute":"stop","id":13}"#);
        let ev = c.json();
        assert_eq!(ev["event"], "STOP");
        assert!(ev["timestamp"]["seconds"].as_i64().unwrap() > 0);
        assert_eq!(c.line(), r#"{"return": {}, "id": 13}"#);
        // Two requests in one write, the second split across writes.
        c.send(br#"{"execute":"query-status","id":1}{"execute":"cont","#);
        assert_eq!(
            c.line(),
            r#"{"return": {"status": "paused", "singlestep": false, "running": false}, "id": 1}"#
        );
        c.send(br#""id":2}"#);
        assert_eq!(c.json()["event"], "RESUME");
        assert_eq!(c.line(), r#"{"return": {}, "id": 2}"#);
        c.send(b"{\"execute\": }\n");
        assert_eq!(
            c.line(),
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#
        );
    }

    #[test]
    fn events_reach_every_negotiated_client_only() {
        let h = harness("multi");
        let mut a = Client::connect(&h.dir.join("qmp"));
        let mut b = Client::connect(&h.dir.join("qmp"));
        let mut late = Client::connect(&h.dir.join("qmp"));
        a.negotiate();
        b.negotiate();
        assert!(late.line().starts_with(r#"{"QMP""#));
        a.send(br#"{"execute":"system_powerdown"}"#);
        assert_eq!(a.json()["event"], "POWERDOWN");
        assert_eq!(a.line(), r#"{"return": {}}"#);
        assert_eq!(b.json()["event"], "POWERDOWN");
        // The client that never negotiated got nothing; after negotiating
        // it sees only later events.
        late.send(br#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(late.line(), r#"{"return": {}}"#);
        b.send(br#"{"execute":"stop"}"#);
        assert_eq!(b.json()["event"], "STOP");
        assert_eq!(late.json()["event"], "STOP");
        assert_eq!(a.json()["event"], "STOP");
    }

    #[test]
    fn a_vanishing_or_flooding_client_harms_no_one() {
        let h = harness("flood");
        {
            // Sends a command and leaves before reading the reply.
            let mut gone = Client::connect(&h.dir.join("qmp"));
            gone.send(br#"{"execute":"qmp_capabilities"}{"execute":"query-commands"}"#);
        }
        // Floods garbage and never reads: its replies back up in its own
        // socket only.
        let mut flood = Client::connect(&h.dir.join("qmp"));
        flood.writer.set_nonblocking(true).unwrap();
        let junk = vec![b'}'; 64 * 1024];
        for _ in 0..64 {
            let _ = flood.writer.write(&junk);
        }
        let mut ok = Client::connect(&h.dir.join("qmp"));
        ok.negotiate();
        ok.send(br#"{"execute":"query-status","id":"x"}"#);
        assert_eq!(ok.json()["return"]["status"], "running");
        let mut mon = Client::connect(&h.dir.join("mon"));
        mon.until_prompt();
        mon.send(b"info status\n");
        assert_eq!(mon.until_prompt(), "VM status: running\r\n(qemu) ");
    }

    /// 100 clients at once each get their own session; one of them
    /// writing 10 MB of garbage (read to the end, answered with parse
    /// errors) changes nothing for the others, and the monitor still
    /// answers afterwards.
    #[test]
    fn a_hundred_clients_and_ten_megabytes_of_garbage() {
        let h = harness("hundred");
        let mut clients: Vec<Client> = (0..100)
            .map(|_| Client::connect(&h.dir.join("qmp")))
            .collect();
        for c in &mut clients {
            c.negotiate();
        }
        let garbage = std::thread::spawn({
            let path = h.dir.join("qmp");
            move || {
                let mut c = Client::connect(&path);
                c.negotiate();
                // Non-JSON bytes, a brace that never closes, and a
                // megabyte string: all the parser's error paths, 10 MB.
                let mut junk = Vec::with_capacity(10 << 20);
                let mut x: u32 = 1;
                while junk.len() < 10 << 20 {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    junk.push(match x >> 29 {
                        0 => b'{',
                        1 => b'}',
                        2 => b'"',
                        3 => b'\n',
                        _ => (x >> 16) as u8,
                    });
                }
                let writer = c.writer.try_clone().unwrap();
                let drain = std::thread::spawn(move || {
                    let mut sink = Vec::new();
                    let _ = c.reader.read_to_end(&mut sink);
                    sink
                });
                let mut w = writer;
                w.write_all(&junk).unwrap();
                w.shutdown(std::net::Shutdown::Write).unwrap();
                drain.join().unwrap()
            }
        });
        for (i, c) in clients.iter_mut().enumerate() {
            c.send(format!(r#"{{"execute":"query-status","id":{i}}}"#).as_bytes());
        }
        for (i, c) in clients.iter_mut().enumerate() {
            let v = c.json();
            assert_eq!(v["id"], i, "{v}");
            assert_eq!(v["return"]["status"], "running", "{v}");
        }
        let replies = garbage.join().unwrap();
        let replies = String::from_utf8_lossy(&replies);
        assert!(
            replies.contains("JSON parse error"),
            "{}",
            &replies[..replies.len().min(500)]
        );
        let mut after = Client::connect(&h.dir.join("qmp"));
        after.negotiate();
        after.send(br#"{"execute":"query-status","id":"after"}"#);
        assert_eq!(after.json()["return"]["status"], "running");
    }

    #[test]
    fn hmp_session_over_a_socket() {
        let h = harness("hmp");
        let mut m = Client::connect(&h.dir.join("mon"));
        assert_eq!(
            m.until_prompt(),
            "QEMU 7.2.0 monitor - type 'help' for more information\r\n(qemu) "
        );
        m.send(b"stop\r\ninfo status\n");
        assert_eq!(m.until_prompt(), "(qemu) ");
        assert_eq!(m.until_prompt(), "VM status: paused\r\n(qemu) ");
        m.send(b"\n");
        assert_eq!(m.until_prompt(), "(qemu) ");
        m.send(b"frobnicate\n");
        assert_eq!(m.until_prompt(), "unknown command: 'frobnicate'\r\n(qemu) ");
        let long = vec![b'x'; 3 * MAX_HMP_LINE];
        m.send(&long);
        m.send(b"\n");
        assert!(m.until_prompt().starts_with("unknown command: 'xxx"));
        assert_eq!(h.fake.control.run_state(), super::super::RunState::Paused);
    }

    #[test]
    fn quit_sends_shutdown_then_reply_then_eof() {
        let mut h = harness("quit");
        let mut a = Client::connect(&h.dir.join("qmp"));
        let mut other = Client::connect(&h.dir.join("qmp"));
        a.negotiate();
        other.negotiate();
        a.send(br#"{"execute":"quit","id":20}"#);
        let ev = a.json();
        assert_eq!(ev["event"], "SHUTDOWN");
        assert_eq!(ev["data"]["reason"], "host-qmp-quit");
        assert_eq!(a.line(), r#"{"return": {}, "id": 20}"#);
        // The main thread then finishes the server.
        h.server.take().unwrap().finish(Duration::from_secs(2));
        let mut rest = String::new();
        assert_eq!(a.reader.read_to_string(&mut rest).unwrap(), 0);
        assert_eq!(other.json()["event"], "SHUTDOWN");
        let mut rest = String::new();
        other.reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "");
        // Listening sockets are removed.
        assert!(!h.dir.join("qmp").exists());
    }

    #[test]
    fn listen_replaces_stale_sockets_only() {
        let dir = std::env::temp_dir().join(format!("skiff-ctl-listen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s");
        drop(listen(&sock).unwrap());
        assert!(listen(&sock).is_ok());
        // Only the owner may connect.
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let file = dir.join("f");
        std::fs::write(&file, "keep").unwrap();
        assert!(listen(&file).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
        assert!(connect(&dir.join("none")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
