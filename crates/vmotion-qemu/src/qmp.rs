//! A blocking QMP client.
//!
//! QMP is line-delimited JSON over a socket: the server greets (`{"QMP": ...}`), the
//! client sends `qmp_capabilities`, then each `{"execute", "arguments", "id"}` gets one
//! reply, `{"return": ...}` or `{"error": {"class", "desc"}}`, carrying the same `id`.
//! Asynchronous `{"event": ...}` messages may arrive at any time in between; [`Qmp`]
//! keeps the last [`Qmp::MAX_EVENTS`] of them for [`Qmp::events`].

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::error::{Error, Result};

/// How long [`Qmp`] waits for a reply unless told otherwise ([`Qmp::set_timeout`]).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often [`Qmp::wait_migration`] and [`Qmp::wait_status`] poll.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A synchronous QMP client over a Unix socket.
///
/// Every read has a deadline ([`Qmp::set_timeout`], 30 s by default); a reply that does
/// not come in time is an [`Error::Timeout`] naming the command. A reply to an earlier,
/// timed-out command is recognised by its `id` and skipped.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Bytes of a message not yet complete when a read timed out.
    partial: Vec<u8>,
    greeting: Value,
    events: Vec<Value>,
    next_id: u64,
    timeout: Duration,
}

impl Qmp {
    /// How many asynchronous events [`Qmp::events`] keeps (the oldest go first).
    pub const MAX_EVENTS: usize = 1024;

    /// Connects to the QMP socket at `path`, reads the greeting and negotiates
    /// capabilities.
    pub fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .map_err(|e| Error::io(format!("connecting to QMP at {}", path.display()), e))?;
        Self::from_stream(stream)
    }

    /// Takes a connected stream, reads the greeting and sends `qmp_capabilities`.
    pub fn from_stream(stream: UnixStream) -> Result<Self> {
        let writer = stream
            .try_clone()
            .map_err(|e| Error::io("cloning the QMP socket", e))?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            greeting: Value::Null,
            events: Vec::new(),
            next_id: 1,
            timeout: DEFAULT_TIMEOUT,
        };
        let deadline = Instant::now() + qmp.timeout;
        qmp.greeting = loop {
            let message = qmp.read_message(deadline, "waiting for the QMP greeting")?;
            if message.get("QMP").is_some() {
                break message;
            }
            // A client that connects while QEMU starts can see an event (e.g. RESUME)
            // before the greeting.
            if message.get("event").is_some() {
                qmp.push_event(message);
                continue;
            }
            return Err(Error::Protocol {
                what: format!("expected the QMP greeting, got {message}"),
            });
        };
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// The server's greeting (`{"QMP": {"version": ..., "capabilities": ...}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Sets how long each command waits for its reply.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The asynchronous events received so far (at most [`Qmp::MAX_EVENTS`], oldest
    /// first), e.g. `{"event": "MIGRATION", "data": {"status": "completed"}, ...}`.
    ///
    /// Events are read only while a command waits for its reply: run a command (e.g.
    /// [`Qmp::query_status`]) to collect the ones sent since. QEMU sends `MIGRATION`
    /// (status change) events only with the migration capability `events` on
    /// ([`Qmp::set_capabilities`]).
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// Takes the events received so far, leaving none.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Runs `command` and returns its `return` value; a QMP `error` becomes
    /// [`Error::Command`] with its class and description.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| Error::io(format!("sending QMP command {command}"), e))?;

        let deadline = Instant::now() + self.timeout;
        let what = format!("waiting for the reply to QMP command {command}");
        loop {
            let mut reply = self.read_message(deadline, &what)?;
            if reply.get("event").is_some() {
                self.push_event(reply);
                continue;
            }
            // Only replies to requests QEMU could not parse lack an id; any other id
            // answers an earlier command that timed out.
            if reply.get("id").is_some_and(|got| *got != json!(id)) {
                continue;
            }
            if let Some(value) = reply.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = reply.get("error") {
                let field = |name| {
                    error
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned()
                };
                return Err(Error::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(Error::Protocol {
                what: format!("unexpected reply to {command}: {reply}"),
            });
        }
    }

    /// `query-status`: the run state, e.g. "running", "paused", "inmigrate",
    /// "postmigrate", "finish-migrate".
    pub fn query_status(&mut self) -> Result<String> {
        let status = self.execute("query-status", None)?;
        status
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Error::Protocol {
                what: format!("query-status returned no status: {status}"),
            })
    }

    /// Polls `query-status` until it reports `want`.
    pub fn wait_status(&mut self, want: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.query_status()?;
            if status == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "after {timeout:?} waiting for run state {want} (last: {status})"
                    ),
                    log_tail: String::new(),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// `query-migrate`: the whole object (`status`, `ram`, `downtime`, `error-desc`, ...;
    /// on a destination listening on TCP also `socket-address`).
    pub fn query_migrate(&mut self) -> Result<Value> {
        self.execute("query-migrate", None)
    }

    /// The `status` of `query-migrate`; `None` before any migration.
    pub fn migration_status(&mut self) -> Result<Option<String>> {
        Ok(self
            .query_migrate()?
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_owned))
    }

    /// Polls `query-migrate` every 50 ms until the migration is `completed`, `failed` or
    /// `cancelled`, and returns that last `query-migrate` object (a failed migration is
    /// not an error here: look at `status` and `error-desc`).
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate()?;
            let status = info.get("status").and_then(Value::as_str).unwrap_or("none");
            if matches!(status, "completed" | "failed" | "cancelled") {
                return Ok(info);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "after {timeout:?} waiting for the migration to end (last status: {status})"
                    ),
                    log_tail: String::new(),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// `migrate-set-capabilities`, e.g. `&[("events", true)]`.
    pub fn set_capabilities(&mut self, capabilities: &[(&str, bool)]) -> Result<()> {
        let list: Vec<Value> = capabilities
            .iter()
            .map(|(name, state)| json!({ "capability": name, "state": state }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .map(drop)
    }

    /// `migrate-set-parameters`, e.g. `json!({"max-bandwidth": 1u64 << 34})`.
    pub fn set_parameters(&mut self, parameters: Value) -> Result<()> {
        self.execute("migrate-set-parameters", Some(parameters))
            .map(drop)
    }

    /// `migrate` to `uri` (`unix:/path`, `tcp:host:port`, `fd:name`, `exec:cmd`). It
    /// returns once the migration started; [`Qmp::wait_migration`] waits for its end.
    pub fn migrate(&mut self, uri: &str) -> Result<()> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// `migrate-incoming` on `uri` (the QEMU must run with `-incoming defer`). With
    /// `tcp:127.0.0.1:0` QEMU picks a port: `query-migrate` reports it under
    /// `socket-address`.
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<()> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// `stop`: pauses the guest.
    pub fn stop(&mut self) -> Result<()> {
        self.execute("stop", None).map(drop)
    }

    /// `cont`: resumes the guest.
    pub fn cont(&mut self) -> Result<()> {
        self.execute("cont", None).map(drop)
    }

    /// Keeps `event`, dropping the oldest beyond [`Qmp::MAX_EVENTS`].
    fn push_event(&mut self, event: Value) {
        if self.events.len() == Self::MAX_EVENTS {
            self.events.remove(0);
        }
        self.events.push(event);
    }

    /// Reads one message (one line of JSON) by `deadline`.
    fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Value> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: what.to_owned(),
                    log_tail: String::new(),
                });
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(deadline - now))
                .map_err(|e| Error::io("setting the QMP read timeout", e))?;
            // `read_until` keeps what it read before a timeout in `partial`; the next
            // call completes the line.
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => {
                    return Err(Error::io(
                        format!("{what}: QMP connection closed"),
                        io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return serde_json::from_slice(&line).map_err(|e| Error::Protocol {
                        what: format!(
                            "{what}: not JSON ({e}): {}",
                            String::from_utf8_lossy(&line).trim()
                        ),
                    });
                }
                // EOF in the middle of a line: the next read says so.
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Error::io(what.to_owned(), e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake QMP server on the other end of a socket pair: greets, then answers each
    /// request line with `reply(request)` (several lines allowed).
    fn fake_server(
        reply: impl Fn(&Value) -> Vec<Value> + Send + 'static,
    ) -> (UnixStream, thread::JoinHandle<()>) {
        let (client, server) = UnixStream::pair().unwrap();
        let handle = thread::spawn(move || {
            let mut writer = server.try_clone().unwrap();
            let greeting = json!({"QMP": {"version": {}, "capabilities": []}});
            writeln!(writer, "{greeting}").unwrap();
            for line in BufReader::new(server).lines() {
                let request: Value = serde_json::from_str(&line.unwrap()).unwrap();
                for answer in reply(&request) {
                    // "\r\n", as QEMU ends its lines.
                    write!(writer, "{answer}\r\n").unwrap();
                }
            }
        });
        (client, handle)
    }

    #[test]
    fn replies_are_matched_by_id_and_events_are_kept_aside() {
        let (client, _server) = fake_server(|request| {
            let id = request["id"].clone();
            match request["execute"].as_str().unwrap() {
                "query-status" => vec![
                    json!({"event": "STOP", "data": {}}),
                    json!({"return": {"status": "stale"}, "id": 999}),
                    json!({"return": {"status": "paused", "running": false}, "id": id}),
                ],
                "migrate" => vec![json!({
                    "error": {"class": "GenericError", "desc": "no such socket"}, "id": id
                })],
                _ => vec![json!({"return": {}, "id": id})],
            }
        });
        let mut qmp = Qmp::from_stream(client).unwrap();
        assert!(qmp.greeting().get("QMP").is_some());
        assert_eq!(qmp.query_status().unwrap(), "paused");
        assert_eq!(qmp.events().len(), 1);
        assert_eq!(qmp.events()[0]["event"], "STOP");

        let err = qmp.migrate("unix:/nonexistent").unwrap_err();
        assert!(matches!(&err, Error::Command { class, .. } if class == "GenericError"));
        assert_eq!(
            err.to_string(),
            "QMP command migrate failed: no such socket (GenericError)"
        );
        assert_eq!(qmp.take_events().len(), 1);
        assert!(qmp.events().is_empty());
    }

    #[test]
    fn a_missing_reply_times_out_naming_the_command() {
        let (client, _server) = fake_server(|request| match request["execute"].as_str() {
            Some("qmp_capabilities") => vec![json!({"return": {}, "id": request["id"]})],
            _ => vec![],
        });
        let mut qmp = Qmp::from_stream(client).unwrap();
        qmp.set_timeout(Duration::from_millis(100));
        let err = qmp.execute("query-migrate", None).unwrap_err();
        assert!(
            err.to_string().contains("QMP command query-migrate"),
            "{err}"
        );
        assert!(matches!(err, Error::Timeout { .. }));
    }

    #[test]
    fn wait_migration_returns_the_final_state() {
        let polls = std::sync::atomic::AtomicU32::new(0);
        let (client, _server) = fake_server(move |request| {
            let id = request["id"].clone();
            if request["execute"] == "query-migrate" {
                let n = polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let status = if n < 2 { "active" } else { "completed" };
                vec![json!({"return": {"status": status}, "id": id})]
            } else {
                vec![json!({"return": {}, "id": id})]
            }
        });
        let mut qmp = Qmp::from_stream(client).unwrap();
        let done = qmp.wait_migration(Duration::from_secs(5)).unwrap();
        assert_eq!(done["status"], "completed");
    }

    #[test]
    fn an_event_before_the_greeting_is_kept() {
        let (client, mut server) = UnixStream::pair().unwrap();
        let reader = server.try_clone().unwrap();
        let _server = thread::spawn(move || {
            writeln!(server, "{}", json!({"event": "RESUME", "timestamp": {}})).unwrap();
            writeln!(server, "{}", json!({"QMP": {"version": {}}})).unwrap();
            let mut line = String::new();
            BufReader::new(reader).read_line(&mut line).unwrap();
            writeln!(server, "{}", json!({"return": {}, "id": 1})).unwrap();
        });
        let qmp = Qmp::from_stream(client).unwrap();
        assert_eq!(qmp.events()[0]["event"], "RESUME");
    }

    #[test]
    fn a_server_that_is_not_qmp_is_refused() {
        let (client, mut server) = UnixStream::pair().unwrap();
        writeln!(server, "{{\"hello\": 1}}").unwrap();
        let err = Qmp::from_stream(client).unwrap_err();
        assert!(
            err.to_string().contains("expected the QMP greeting"),
            "{err}"
        );
    }
}
