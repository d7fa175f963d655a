//! A small asynchronous QMP (QEMU Machine Protocol) client.
//!
//! QMP is JSON, one message per line, over a unix socket: the server greets
//! (`{"QMP": {...}}`), the client enters command mode with
//! `qmp_capabilities`, then sends `{"execute": NAME, "arguments": {...},
//! "id": N}` and gets `{"return": ..., "id": N}` or `{"error": {"class": ...,
//! "desc": ...}, "id": N}` back; asynchronous events
//! (`{"event": NAME, "data": {...}, "timestamp": {...}}`) arrive at any time.
//!
//! [`Qmp`] runs one reader task per connection that routes replies to their
//! caller by `id` and broadcasts events; [`parse_message`] is the pure parser
//! (property-tested against arbitrary bytes: it never panics).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{broadcast, oneshot};

/// Longest line accepted from QEMU (replies such as `query-qmp-schema` are big).
pub const MAX_LINE: usize = 16 << 20;

/// What can go wrong talking QMP.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// The socket could not be opened, read or written.
    #[error("QMP I/O failed while trying to {context}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU sent something that is not a QMP message.
    #[error("malformed QMP message: {0}")]
    Malformed(String),
    /// QEMU answered a command with an error.
    #[error("QMP command {command} failed ({class}): {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class, e.g. `GenericError`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The connection closed (QEMU exited) before the reply came.
    #[error("the QMP connection closed (QEMU exited?)")]
    Disconnected,
    /// No reply within the deadline.
    #[error("no reply to QMP command {0} in time")]
    Timeout(String),
}

/// One message from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting, with QEMU's version object.
    Greeting(Value),
    /// A successful reply.
    Return {
        /// The command id, if the command had one.
        id: Option<Value>,
        /// The returned value.
        value: Value,
    },
    /// A failed command.
    Error {
        /// The command id, if the command had one.
        id: Option<Value>,
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
    /// An asynchronous event.
    Event(Event),
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name, e.g. `SHUTDOWN`, `STOP`, `RESUME`.
    pub name: String,
    /// Event data (an empty object when absent).
    pub data: Value,
}

fn malformed(what: impl Into<String>) -> QmpError {
    QmpError::Malformed(what.into())
}

/// Parses one line from a QMP server.
pub fn parse_message(line: &[u8]) -> Result<Message, QmpError> {
    let v: Value = serde_json::from_slice(line).map_err(|e| malformed(e.to_string()))?;
    let Value::Object(mut o) = v else {
        return Err(malformed("not a JSON object"));
    };
    let id = o.remove("id");
    if let Some(g) = o.remove("QMP") {
        return Ok(Message::Greeting(g));
    }
    if let Some(value) = o.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(err) = o.remove("error") {
        let Value::Object(err) = err else {
            return Err(malformed("error is not an object"));
        };
        let field = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        return Ok(Message::Error {
            id,
            class: field("class"),
            desc: field("desc"),
        });
    }
    if let Some(name) = o.remove("event") {
        let Value::String(name) = name else {
            return Err(malformed("event name is not a string"));
        };
        let data = o
            .remove("data")
            .unwrap_or_else(|| Value::Object(Map::new()));
        return Ok(Message::Event(Event { name, data }));
    }
    Err(malformed("neither greeting, return, error nor event"))
}

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>>;

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<Event>,
    next_id: AtomicU64,
    version: Value,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and enters
    /// command mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Io {
                context: "connect to the QMP socket",
                source,
            })?;
        Self::handshake(stream).await
    }

    /// Runs the QMP handshake on a connected stream.
    pub async fn handshake(stream: UnixStream) -> Result<Qmp, QmpError> {
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let first = tokio::time::timeout(Duration::from_secs(30), read_line(&mut reader))
            .await
            .map_err(|_| QmpError::Timeout("greeting".into()))??
            .ok_or(QmpError::Disconnected)?;
        let version = match parse_message(&first)? {
            Message::Greeting(g) => g.get("version").cloned().unwrap_or(Value::Null),
            other => return Err(malformed(format!("expected a greeting, got {other:?}"))),
        };
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events, _) = broadcast::channel(256);
        let task = tokio::spawn(read_loop(reader, pending.clone(), events.clone()));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            events,
            next_id: AtomicU64::new(1),
            version,
            reader: task,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// QEMU's version object from the greeting.
    pub fn version(&self) -> &Value {
        &self.version
    }

    /// Subscribes to events from now on. The stream ends when QEMU closes
    /// the connection.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Runs `command` with `arguments` and returns its result (30 s deadline).
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_within(command, arguments, Duration::from_secs(30))
            .await
    }

    /// Runs `command`, waiting at most `deadline` for the reply.
    pub async fn execute_within(
        &self,
        command: &str,
        arguments: Option<Value>,
        deadline: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match lock(&self.pending).as_mut() {
            Some(p) => p.insert(id, tx),
            None => return Err(QmpError::Disconnected),
        };
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        let sent = self.writer.lock().await.write_all(&line).await;
        if let Err(source) = sent {
            self.forget(id);
            return Err(QmpError::Io {
                context: "send a QMP command",
                source,
            });
        }
        let reply = match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(QmpError::Disconnected),
            Err(_) => {
                self.forget(id);
                Err(QmpError::Timeout(command.to_string()))
            }
        };
        reply.map_err(|e| match e {
            QmpError::Command { class, desc, .. } => QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            },
            e => e,
        })
    }

    fn forget(&self, id: u64) {
        if let Some(p) = lock(&self.pending).as_mut() {
            p.remove(&id);
        }
    }
}

/// Reads one `\n`-terminated line (without it); `None` at end of stream.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<Option<Vec<u8>>, QmpError> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await.map_err(|source| QmpError::Io {
            context: "read from the QMP socket",
            source,
        })?;
        if buf.is_empty() {
            return Ok((!line.is_empty()).then_some(line));
        }
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..i]);
            r.consume(i + 1);
            return Ok(Some(line));
        }
        let n = buf.len();
        line.extend_from_slice(buf);
        r.consume(n);
        if line.len() > MAX_LINE {
            return Err(malformed(format!("a line longer than {MAX_LINE} bytes")));
        }
    }
}

async fn read_loop<R: tokio::io::AsyncBufRead + Unpin>(
    mut reader: R,
    pending: Pending,
    events: broadcast::Sender<Event>,
) {
    loop {
        let line = match read_line(&mut reader).await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "QMP connection failed");
                break;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let msg = match parse_message(&line) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a QMP message");
                continue;
            }
        };
        let (id, result) = match msg {
            Message::Event(ev) => {
                let _ = events.send(ev);
                continue;
            }
            Message::Greeting(_) => continue,
            Message::Return { id, value } => (id, Ok(value)),
            Message::Error { id, class, desc } => (
                id,
                Err(QmpError::Command {
                    command: String::new(),
                    class,
                    desc,
                }),
            ),
        };
        let Some(id) = id.as_ref().and_then(Value::as_u64) else {
            continue;
        };
        let waiter = lock(&pending).as_mut().and_then(|p| p.remove(&id));
        if let Some(w) = waiter {
            let _ = w.send(result);
        }
    }
    // Fail every waiting command; later ones fail at once.
    lock(&pending).take();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn parses_every_kind_of_message() {
        let g =
            parse_message(br#"{"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}}"#)
                .unwrap();
        assert!(matches!(g, Message::Greeting(v) if v["version"]["qemu"]["major"] == 7));
        assert_eq!(
            parse_message(br#"{"return": {}, "id": 3}"#).unwrap(),
            Message::Return {
                id: Some(json!(3)),
                value: json!({})
            }
        );
        assert_eq!(
            parse_message(br#"{"error": {"class": "GenericError", "desc": "nope"}, "id": 4}"#)
                .unwrap(),
            Message::Error {
                id: Some(json!(4)),
                class: "GenericError".into(),
                desc: "nope".into()
            }
        );
        assert_eq!(
            parse_message(br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-reset"}}"#).unwrap(),
            Message::Event(Event { name: "SHUTDOWN".into(), data: json!({"guest": true, "reason": "guest-reset"}) })
        );
        assert_eq!(
            parse_message(br#"{"event": "STOP"}"#).unwrap(),
            Message::Event(Event {
                name: "STOP".into(),
                data: json!({})
            })
        );
        for bad in [
            &b"[]"[..],
            b"{}",
            b"{\"event\": 5}",
            b"{\"error\": 1}",
            b"not json",
            b"",
        ] {
            assert!(
                parse_message(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_message(&bytes);
        }

        #[test]
        fn json_shaped_garbage_never_panics(s in r#"\{("(QMP|return|error|event|id|data|class|desc)": ?(1|"x"|\{\}|\[\]|null|\{"class": ?"a"\}),? ?){0,4}\}"#) {
            let _ = parse_message(s.as_bytes());
        }

        #[test]
        fn replies_keep_their_id(id in any::<u64>(), n in any::<i64>()) {
            let line = json!({"return": n, "id": id}).to_string();
            prop_assert_eq!(parse_message(line.as_bytes()).unwrap(), Message::Return { id: Some(json!(id)), value: json!(n) });
        }
    }

    /// A fake QMP server on a socketpair: greets, answers commands in reverse
    /// order of arrival, interleaves an event and a garbage line.
    #[tokio::test]
    async fn routes_replies_by_id_and_broadcasts_events() {
        let (client, server) = UnixStream::pair().unwrap();
        let srv = tokio::spawn(async move {
            let (r, mut w) = server.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, \"minor\": 2, \"micro\": 0}}, \"capabilities\": []}}\n").await.unwrap();
            let caps = read_line(&mut r).await.unwrap().unwrap();
            let caps: Value = serde_json::from_slice(&caps).unwrap();
            assert_eq!(caps["execute"], "qmp_capabilities");
            w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", caps["id"]).as_bytes())
                .await
                .unwrap();
            let a: Value =
                serde_json::from_slice(&read_line(&mut r).await.unwrap().unwrap()).unwrap();
            let b: Value =
                serde_json::from_slice(&read_line(&mut r).await.unwrap().unwrap()).unwrap();
            w.write_all(b"garbage\n{\"event\": \"STOP\", \"timestamp\": {}}\n")
                .await
                .unwrap();
            for m in [b, a] {
                let reply = if m["execute"] == "bad" {
                    json!({"error": {"class": "CommandNotFound", "desc": "no such command"}, "id": m["id"]})
                } else {
                    json!({"return": {"status": "running"}, "id": m["id"]})
                };
                w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
            }
            // Then hang up.
            let mut rest = Vec::new();
            drop(w);
            let _ = r.read_to_end(&mut rest).await;
        });
        let qmp = Qmp::handshake(client).await.unwrap();
        assert_eq!(qmp.version()["qemu"]["major"], 7);
        let mut events = qmp.events();
        let (ok, bad) = tokio::join!(
            qmp.execute("query-status", None),
            qmp.execute("bad", Some(json!({"x": 1})))
        );
        assert_eq!(ok.unwrap()["status"], "running");
        let err = bad.unwrap_err();
        assert!(
            matches!(&err, QmpError::Command { command, class, .. } if command == "bad" && class == "CommandNotFound"),
            "{err}"
        );
        assert_eq!(events.recv().await.unwrap().name, "STOP");
        // The server hung up: commands fail instead of hanging.
        let after = qmp.execute("query-status", None).await.unwrap_err();
        assert!(
            matches!(after, QmpError::Disconnected | QmpError::Io { .. }),
            "{after}"
        );
        drop(qmp);
        srv.await.unwrap();
    }
}
