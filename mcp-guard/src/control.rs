//! The daemon's local control socket: a front that launches a server process itself (the stdio
//! front, `mcp-guard egress exec`) asks here for a guarded session cgroup, then places its child
//! in it before exec. One JSON object per line each way.
//!
//! The connection stays open while the session lives; when it closes, the daemon removes the
//! session cgroup once it is empty. Only root and the daemon's own user may connect
//! (peer credentials are checked, and the socket file is mode 0600).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::UCred;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, oneshot};

use crate::answer_polling::{AnswerPolling, Linger, Lingering};
use crate::audit::{AuditLog, AuditRecord};
use crate::egress::{Egress, SessionCgroup};
use crate::mcp::lines::{BoundedLines, Line};
use crate::metrics::Metrics;
use crate::policy::{AuditSettings, DurableBefore};
use crate::proxy::{CallSpan, Proxy};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connecting to the mcp-guard daemon at {path}: {source} (is `mcp-guard run` running?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("daemon refused: {0}")]
    Refused(String),
    #[error("malformed control message: {0}")]
    Malformed(#[from] serde_json::Error),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// A guarded cgroup for a new session of `server`.
    OpenSession {
        server: String,
        #[serde(default)]
        session: Option<String>,
        /// The session ends with this connection: when it closes, whatever still runs in the
        /// session's cgroup is killed (a stdio front's placement: the front stops its server
        /// when it exits, and a front that is killed cannot). Without it (`egress exec`),
        /// what still runs stays confined until it exits.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        ends_with_connection: bool,
    },
    /// An audit record from a front that runs outside the daemon (the stdio front): the log
    /// has one writer, the daemon. Answered once the record is durable.
    ///
    /// `span`, with a call's decision record, says the call starts (noted only once the
    /// record is written); with its outcome record, that it ended (noted either way). So a
    /// call costs the front two round trips, not four.
    Audit {
        record: Box<AuditRecord>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        span: Option<CallSpan>,
        /// The front's server listed the record's tool to its session: the daemon's metrics
        /// may name it (see `DecisionFacts::tool_listed`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        tool_listed: bool,
    },
    /// A call of such a front's session started (no `ended_ns`) or ended: the daemon needs it
    /// to attribute the session's network connections to calls.
    CallSpan { session: String, span: CallSpan },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

impl Response {
    fn refused(error: String) -> Response {
        Response {
            ok: false,
            error: Some(error),
            session: None,
            cgroup: None,
            cgroup_id: None,
        }
    }

    fn accepted() -> Response {
        Response {
            ok: true,
            error: None,
            session: None,
            cgroup: None,
            cgroup_id: None,
        }
    }

    fn opened(session: &SessionCgroup) -> Response {
        Response {
            ok: true,
            error: None,
            session: Some(session.session.clone()),
            cgroup: Some(session.path.clone()),
            cgroup_id: Some(session.cgroup_id),
        }
    }
}

/// Binds the socket (replacing a stale one from an earlier daemon), owner-only.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let bind_error = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_error)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_error(e)),
    }
    // Created 0600 rather than chmod-ed after: in between, any local user could connect.
    // (The umask is the process's; nothing else here creates files while the daemon starts.)
    let umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(umask);
    let listener = bound.map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(listener)
}

/// What the control socket serves from.
#[derive(Clone)]
pub struct ControlContext {
    pub egress: Arc<Mutex<Egress>>,
    pub metrics: Arc<Metrics>,
    pub audit: AuditLog,
    pub proxy: Arc<Proxy>,
}

/// Accepts clients until the listener fails.
pub async fn serve(listener: UnixListener, context: ControlContext) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                crate::transport::serve::pause_after_failed_accept(&e, "control socket").await;
                continue;
            }
        };
        let context = context.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_client(stream, context).await {
                tracing::warn!(error = %e, "control client");
            }
        });
    }
}

/// Whether a client may use the socket: root and the daemon's own user only.
fn peer_is_permitted(peer: Option<&UCred>) -> bool {
    let own_uid = nix::unistd::geteuid().as_raw();
    peer.is_some_and(|cred| cred.uid() == 0 || cred.uid() == own_uid)
}

/// The longest request line a control client may send: an audit record carries at most an
/// agent's message (its arguments, where they are stored) and a server's (a tool list
/// observed in learn mode), with room for the record around them.
fn max_request_bytes(daemon: &crate::policy::DaemonSettings) -> usize {
    daemon
        .max_message_bytes
        .saturating_add(daemon.max_server_message_bytes)
        .saturating_add(64 * 1024)
}

/// Serves one client. Requests are handled concurrently (so a front's audit records share
/// flushes) and answered in the order they came.
async fn serve_client(stream: UnixStream, context: ControlContext) -> Result<(), ControlError> {
    let peer = stream.peer_cred().ok();
    let permitted = peer_is_permitted(peer.as_ref());
    let (read, write) = stream.into_split();
    // A stdio front's next call's decision record often follows the answer to its last one
    // within microseconds: polled for, like the outcome record below.
    let model = context.proxy.model();
    let daemon = &model.daemon;
    let linger = Arc::new(Linger::new(daemon.answer_poll()));
    let reader = BufReader::new(Lingering::new(read, linger.clone()));
    let request_limit = max_request_bytes(daemon);
    let mut lines = BoundedLines::new(reader, request_limit);
    let mut write = Lingering::new(write, linger);
    let opened: Arc<std::sync::Mutex<Vec<OpenedCgroup>>> = Arc::default();
    let calls = Arc::new(CallsInFlight::default());
    // While one of the client's calls is in flight, its outcome record is due as soon as the
    // server answers: the next line is polled for rather than slept for.
    let polling = AnswerPolling::new(daemon.answer_poll());
    let mut answers = futures_util::stream::FuturesOrdered::new();
    let mut reading = true;
    while reading || !answers.is_empty() {
        let next = async {
            tokio::select! {
                line = lines.next(), if reading => ClientEvent::Line(line),
                Some(response) = futures_util::StreamExt::next(&mut answers) => {
                    ClientEvent::Answered(response)
                }
            }
        };
        let event = if calls.any() {
            polling.wait(next).await
        } else {
            next.await
        };
        match event {
            ClientEvent::Line(line) => match line? {
                Some(Line::TooLong { length, .. }) => {
                    let refusal = Response::refused(format!(
                        "a request of {length} bytes, over the control socket's limit of \
                         {request_limit}"
                    ));
                    let refused: Answering = Box::pin(std::future::ready(refusal));
                    answers.push_back(refused);
                }
                Some(Line::Whole(line)) => {
                    let request = serde_json::from_slice::<Request>(&line);
                    // A flush holds its thread until the disk is done, and the client's other
                    // requests must go on being written meanwhile: a request that may flush is
                    // answered in a task of its own, any other here, with no hand-off.
                    let may_flush = permitted
                        && request
                            .as_ref()
                            .is_ok_and(|r| may_flush(r, context.audit.settings()));
                    let context = context.clone();
                    let opened = opened.clone();
                    let calls = calls.clone();
                    let answering = async move {
                        if permitted {
                            answer(request, &context, peer, &opened, &calls).await
                        } else {
                            Response::refused(
                                "permission denied: only root or the daemon's user may connect"
                                    .into(),
                            )
                        }
                    };
                    let answering: Answering = if may_flush {
                        Box::pin(in_a_task(answering))
                    } else {
                        Box::pin(in_place(answering))
                    };
                    answers.push_back(answering);
                }
                None => reading = false,
            },
            ClientEvent::Answered(response) => {
                let mut text = serde_json::to_string(&response)?;
                text.push('\n');
                write.write_all(text.as_bytes()).await?;
            }
        }
    }
    // The client is gone: its sessions end once their processes have, at once for sessions
    // that end with their connection.
    let opened = std::mem::take(&mut *opened.lock().expect("opened lock"));
    let mut egress = context.egress.lock().await;
    for OpenedCgroup {
        cgroup_id,
        ends_with_connection,
    } in opened
    {
        if ends_with_connection && let Err(e) = egress.kill_session_processes(cgroup_id) {
            tracing::warn!(cgroup_id, error = %e, "stopping what is left in the session cgroup");
        }
        if let Err(e) = egress.release_session(cgroup_id) {
            tracing::warn!(cgroup_id, error = %e, "closing session cgroup");
        }
    }
    Ok(())
}

/// A session cgroup a client opened, and what its connection's end means for it.
struct OpenedCgroup {
    cgroup_id: u64,
    ends_with_connection: bool,
}

type Answering = std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>;

/// What a client's connection brings next: a request, or the answer to an earlier one.
enum ClientEvent {
    Line(std::io::Result<Option<Line>>),
    Answered(Response),
}

/// Calls of one client whose decision is on record and whose end is not yet known.
#[derive(Default)]
struct CallsInFlight(AtomicUsize);

impl CallsInFlight {
    fn started(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Never below none: a front may report the end of a call whose start it did not.
    fn ended(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |calls| {
                calls.checked_sub(1)
            });
    }

    fn any(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }
}

async fn in_a_task(
    answering: impl std::future::Future<Output = Response> + Send + 'static,
) -> Response {
    tokio::spawn(answering)
        .await
        .unwrap_or_else(|e| handler_failed(&e.to_string()))
}

async fn in_place(answering: impl std::future::Future<Output = Response> + Send) -> Response {
    crate::catch_panic(answering)
        .await
        .unwrap_or_else(|panic| handler_failed(&format!("panicked: {panic}")))
}

fn handler_failed(error: &str) -> Response {
    tracing::error!(error, "control request handler failed");
    Response::refused("internal error".into())
}

/// Whether answering `request` may flush the audit log. A call's decision record is only
/// written with `durable_before: "answer"` (its outcome's flush covers it); every other record
/// is flushed when `fsync` is on, unless a background flush does it (`"interval"`); the other
/// requests append nothing.
fn may_flush(request: &Request, settings: &AuditSettings) -> bool {
    match request {
        Request::Audit { span, .. } if settings.flushes_before_acknowledging() => {
            let decides_a_call = span.as_ref().is_some_and(|span| span.ended_ns.is_none());
            !decides_a_call || settings.durable_before == DurableBefore::Forward
        }
        _ => false,
    }
}

async fn answer(
    request: Result<Request, serde_json::Error>,
    context: &ControlContext,
    peer: Option<UCred>,
    opened: &std::sync::Mutex<Vec<OpenedCgroup>>,
    calls: &CallsInFlight,
) -> Response {
    match request {
        Ok(Request::OpenSession {
            server,
            session,
            ends_with_connection,
        }) => {
            let mut egress = context.egress.lock().await;
            match egress.open_session(&server, session.as_deref()) {
                Ok(session) => {
                    opened.lock().expect("opened lock").push(OpenedCgroup {
                        cgroup_id: session.cgroup_id,
                        ends_with_connection,
                    });
                    context.metrics.egress_sessions_opened.inc();
                    tracing::info!(server = %session.server, session = %session.session,
                        cgroup_id = session.cgroup_id, "session cgroup opened");
                    Response::opened(&session)
                }
                Err(e) => Response::refused(e.to_string()),
            }
        }
        Ok(Request::Audit {
            mut record,
            span,
            tool_listed,
        }) => {
            // The daemon's own settings decide what its log keeps of the arguments.
            if let Some(arguments) = record.arguments.take() {
                record.set_arguments(context.audit.settings(), &arguments);
            }
            // Who relayed it is the kernel's word, whatever the front put there.
            record.front_pid = peer.and_then(|cred| cred.pid());
            record.front_uid = peer.map(|cred| cred.uid());
            let session = record.session.clone();
            let noted = |span: CallSpan| match &session {
                Some(session) => context.proxy.note_external_span(session, span),
                None => tracing::warn!("a call span without a session; ignored"),
            };
            // An ended call is ended whatever happens to its record; a call whose decision
            // is not on record does not start.
            let span = match span {
                Some(span) if span.ended_ns.is_some() => {
                    calls.ended();
                    noted(span);
                    None
                }
                span => span,
            };
            // Counted as the daemon counts its own: when decided, whatever the log says.
            context.proxy.count_recorded_decision(&record, tool_listed);
            // A record that starts a call is its decision record, written as the daemon's own.
            let appended = match span {
                Some(_) => context.audit.append_decision(*record).await,
                None => context.audit.append(*record).await,
            };
            match appended {
                Ok(_) => {
                    if let Some(span) = span {
                        calls.started();
                        noted(span);
                    }
                    Response::accepted()
                }
                Err(e) => Response::refused(format!("audit log: {e}")),
            }
        }
        Ok(Request::CallSpan { session, span }) => {
            if span.ended_ns.is_some() {
                calls.ended();
            }
            context.proxy.note_external_span(&session, span);
            Response::accepted()
        }
        Err(e) => Response::refused(format!("bad request: {e}")),
    }
}

/// Client side: asks the daemon at `socket` for a session cgroup. The returned stream must be
/// kept open for as long as the session runs; with `ends_with_connection`, what still runs in
/// the cgroup is killed once it closes.
pub async fn open_session(
    socket: &Path,
    server: &str,
    session: Option<&str>,
    ends_with_connection: bool,
) -> Result<(Response, UnixStream), ControlError> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ControlError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    let request = Request::OpenSession {
        server: server.to_owned(),
        session: session.map(str::to_owned),
        ends_with_connection,
    };
    let mut text = serde_json::to_string(&request)?;
    text.push('\n');
    stream.write_all(text.as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(&mut stream).read_line(&mut line).await?;
    let response: Response = serde_json::from_str(&line)?;
    if !response.ok {
        return Err(ControlError::Refused(
            response.error.unwrap_or_else(|| "no reason given".into()),
        ));
    }
    Ok((response, stream))
}

/// A connection for sending audit records and call spans to the daemon (the stdio front).
/// Requests are pipelined: many may be in flight, answered in order.
pub struct AuditClient {
    sender: Mutex<tokio::net::unix::OwnedWriteHalf>,
    waiting: Arc<std::sync::Mutex<std::collections::VecDeque<oneshot::Sender<Response>>>>,
    /// How the daemon's answers are waited for (`daemon.answer_poll_us`).
    answer_polling: AnswerPolling,
}

impl AuditClient {
    pub async fn connect(
        socket: &Path,
        answer_poll: Duration,
    ) -> Result<AuditClient, ControlError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ControlError::Connect {
                path: socket.to_owned(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let waiting: Arc<std::sync::Mutex<std::collections::VecDeque<oneshot::Sender<Response>>>> =
            Arc::default();
        tokio::spawn(route_answers(BufReader::new(read), waiting.clone()));
        Ok(AuditClient {
            sender: Mutex::new(write),
            waiting,
            answer_polling: AnswerPolling::new(answer_poll),
        })
    }

    /// Sends one record; returns once the daemon has made it durable. With `span`, the
    /// daemon also learns that the record's call started or ended (see [`Request::Audit`]).
    pub async fn append(
        &self,
        record: AuditRecord,
        span: Option<CallSpan>,
        tool_listed: bool,
    ) -> Result<(), ControlError> {
        self.request(&Request::Audit {
            record: Box::new(record),
            span,
            tool_listed,
        })
        .await
    }

    /// Tells the daemon a call of `session` started or ended.
    pub async fn call_span(&self, session: &str, span: CallSpan) -> Result<(), ControlError> {
        self.request(&Request::CallSpan {
            session: session.to_owned(),
            span,
        })
        .await
    }

    async fn request(&self, request: &Request) -> Result<(), ControlError> {
        let mut text = serde_json::to_string(request)?;
        text.push('\n');
        let (answered, answer) = oneshot::channel();
        {
            // Queued and written under one lock, so answers come back in the queue's order.
            let mut sender = self.sender.lock().await;
            self.waiting
                .lock()
                .expect("waiting lock")
                .push_back(answered);
            sender.write_all(text.as_bytes()).await?;
        }
        let response = self
            .answer_polling
            .receive(answer)
            .await
            .ok_or_else(|| ControlError::Refused("the daemon closed the connection".into()))?;
        if response.ok {
            Ok(())
        } else {
            Err(ControlError::Refused(
                response.error.unwrap_or_else(|| "no reason given".into()),
            ))
        }
    }
}

async fn route_answers(
    read: BufReader<tokio::net::unix::OwnedReadHalf>,
    waiting: Arc<std::sync::Mutex<std::collections::VecDeque<oneshot::Sender<Response>>>>,
) {
    let mut lines = read.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(response) = serde_json::from_str::<Response>(&line) else {
            break;
        };
        let Some(waiter) = waiting.lock().expect("waiting lock").pop_front() else {
            break;
        };
        let _ = waiter.send(response);
    }
    // Dropping the waiters tells every caller the daemon is gone.
    waiting.lock().expect("waiting lock").clear();
}

#[cfg(test)]
mod tests {
    use super::{CallsInFlight, Request, may_flush};
    use crate::audit::{AuditRecord, RecordKind};
    use crate::policy::{AuditSettings, DurableBefore};
    use crate::proxy::CallSpan;

    fn record(ended_ns: Option<Option<u64>>) -> Request {
        Request::Audit {
            record: Box::new(AuditRecord::new(RecordKind::Call)),
            span: ended_ns.map(|ended_ns| CallSpan {
                call_id: "c".into(),
                instruction: None,
                trace_id: "t".into(),
                started_ns: 1,
                ended_ns,
            }),
            tool_listed: false,
        }
    }

    #[test]
    fn calls_in_flight_count_starts_and_ends_and_never_go_below_none() {
        let calls = CallsInFlight::default();
        assert!(!calls.any());
        calls.ended();
        calls.started();
        calls.started();
        calls.ended();
        assert!(calls.any());
        calls.ended();
        assert!(!calls.any());
    }

    /// `egress exec`'s request, written before `ends_with_connection` existed, still reads
    /// as a session that outlives its connection; a stdio front's says it ends with it.
    #[test]
    fn a_session_ends_with_its_connection_only_when_asked() {
        let read = |line: &str| match serde_json::from_str::<Request>(line).unwrap() {
            Request::OpenSession {
                ends_with_connection,
                ..
            } => ends_with_connection,
            other => panic!("not an open_session: {other:?}"),
        };
        assert!(!read(
            r#"{"op":"open_session","server":"web","session":"demo"}"#
        ));
        assert!(read(
            r#"{"op":"open_session","server":"web","ends_with_connection":true}"#
        ));
        let sent = Request::OpenSession {
            server: "web".into(),
            session: None,
            ends_with_connection: false,
        };
        assert_eq!(
            serde_json::to_string(&sent).unwrap(),
            r#"{"op":"open_session","server":"web","session":null}"#
        );
    }

    /// Only a request that may flush gets a task of its own (a flush holds its thread).
    #[test]
    fn only_appends_that_flush_are_answered_in_a_task() {
        let decision = record(Some(None));
        let outcome = record(Some(Some(2)));
        let other_record = record(None);
        let span = Request::CallSpan {
            session: "s".into(),
            span: CallSpan {
                call_id: "c".into(),
                instruction: None,
                trace_id: "t".into(),
                started_ns: 1,
                ended_ns: None,
            },
        };
        let open = Request::OpenSession {
            server: "s".into(),
            session: None,
            ends_with_connection: true,
        };
        let settings = |fsync, durable_before| AuditSettings {
            fsync,
            durable_before,
            ..AuditSettings::default()
        };
        let forward = settings(true, DurableBefore::Forward);
        let answer = settings(true, DurableBefore::Answer);
        let interval = settings(true, DurableBefore::Interval);
        let no_fsync = settings(false, DurableBefore::Forward);
        for request in [&decision, &outcome, &other_record] {
            assert!(may_flush(request, &forward));
            assert!(!may_flush(request, &interval));
            assert!(!may_flush(request, &no_fsync));
        }
        assert!(!may_flush(&decision, &answer));
        assert!(may_flush(&outcome, &answer));
        assert!(may_flush(&other_record, &answer));
        for request in [&span, &open] {
            for settings in [&forward, &answer, &interval, &no_fsync] {
                assert!(!may_flush(request, settings));
            }
        }
    }
}
