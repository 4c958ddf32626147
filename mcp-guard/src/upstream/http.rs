//! Streamable HTTP servers: each message mcp-guard sends is a POST to the server's URL; what
//! comes back (a JSON message or batch, or an SSE stream of messages) feeds the same router
//! as a stdio server's output. A response that nothing of its stream preceded is handed to its
//! waiting caller by the task that read it, with no hand-off to the router's task. The
//! server's `Mcp-Session-Id` and negotiated protocol version are kept per agent session and
//! sent on every later POST.
//!
//! A POST's event stream that ends before the answer is resumed when the server gave its
//! events ids (2025-11-25 lets a server close it to be polled): a GET with `Last-Event-ID`, after
//! the server's `retry` time, replays what was sent meanwhile and carries the rest. Without an
//! event id, the call fails at once rather than wait for its timeout.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{RwLock, mpsc, watch};

use super::headers::ServerHeaders;
use crate::policy::ValueSource;

use super::{
    Outbound, Pending, Router, ServerMessages, Upstream, UpstreamError, answer_or_pass_on,
    route_server_output, too_large, upstream_error,
};

/// A client for one session's server: TLS with the `ring` provider, installed once for the
/// process (reqwest asks for a process default when built without its own).
fn client_trusting(tls_ca_file: Option<&Path>) -> Result<reqwest::Client, UpstreamError> {
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        // Err only when another provider is already installed, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    // A redirect is not followed: the policy names the server, and a redirect elsewhere would
    // carry the server's `headers` (its credentials) and the agent's calls to a host nobody
    // declared. The 3xx is the server's answer, and refuses the call like any other failure.
    let mut builder = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    if let Some(path) = tls_ca_file {
        let pem = std::fs::read(path).map_err(|source| UpstreamError::CaFile {
            path: path.to_owned(),
            reason: source.to_string(),
        })?;
        let certificates =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| UpstreamError::CaFile {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        if certificates.is_empty() {
            return Err(UpstreamError::CaFile {
                path: path.to_owned(),
                reason: "no PEM certificate in it".into(),
            });
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder
        .build()
        .map_err(|e| UpstreamError::Unsupported(crate::error_chain(&e)))
}

/// Per-session state the server gave us.
#[derive(Default)]
struct ServerSession {
    id: Option<String>,
    protocol_version: Option<String>,
}

struct Connection {
    client: reqwest::Client,
    /// The server's `headers`, sent with every request.
    headers: ServerHeaders,
    /// Counts the server's 401 and 403 answers (`mcp_guard_upstream_credentials_rejected_total`).
    credentials_rejected: prometheus::IntCounter,
    /// Parsed once: every request reuses it.
    url: reqwest::Url,
    session: RwLock<ServerSession>,
    incoming: mpsc::Sender<Value>,
    /// The requests whose callers wait for an answer (shared with the router).
    pending: Pending,
    label: Arc<str>,
    /// Held for writing while `initialize` and then `notifications/initialized` are posted:
    /// a POST sent after them waits, as it needs the session id the first one returns.
    handshake: Arc<RwLock<()>>,
    listening: AtomicBool,
    /// Resume a dropped GET stream with `Last-Event-ID` (the server's `resume_get_stream`).
    resume_get_stream: bool,
    /// Largest body or event read; a larger one is dropped, and its call fails.
    max_message_bytes: usize,
    stop_listening: watch::Sender<bool>,
    /// Set when the agent's session ends (the `Poster` is dropped): POSTs still running stop.
    agent_session_ended: watch::Sender<bool>,
    /// Set when the server answers 404 to a request carrying its session id: it ended the
    /// session (it expired, or the server restarted), and so does the agent's.
    server_session_ended: watch::Sender<bool>,
}

/// How a session's server is reached beyond its URL (the server's policy settings).
#[derive(Debug, Clone, Copy)]
pub struct HttpOptions<'a> {
    /// PEM certificates an `https://` server's certificate may chain to, besides the
    /// system's roots.
    pub tls_ca_file: Option<&'a Path>,
    /// Resume a dropped GET stream with `Last-Event-ID`.
    pub resume_get_stream: bool,
    /// Headers sent with every request (the server's credentials).
    pub headers: &'a BTreeMap<String, ValueSource>,
    /// Largest body or event read (`daemon.max_server_message_bytes`).
    pub max_message_bytes: usize,
}

/// Connects (lazily: the first POST is the agent's first message) to the server at `url`;
/// its 401 and 403 answers are counted in `credentials_rejected`.
pub fn connect(
    url: &str,
    options: HttpOptions<'_>,
    label: Arc<str>,
    credentials_rejected: prometheus::IntCounter,
) -> Result<(Upstream, ServerMessages), UpstreamError> {
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(UpstreamError::Unsupported(format!(
            "{url}: upstream URLs must be http:// or https://"
        )));
    }
    let parsed =
        reqwest::Url::parse(url).map_err(|e| UpstreamError::Unsupported(format!("{url}: {e}")))?;
    let client = client_trusting(options.tls_ca_file)?;
    let headers = ServerHeaders::read(options.headers)?;
    let (incoming_sender, incoming) = mpsc::channel::<Value>(256);
    let (session_sender, server_messages) = mpsc::channel(256);
    let router = Router::new(session_sender, label.clone());
    let connection = Arc::new(Connection {
        client,
        headers,
        credentials_rejected,
        url: parsed,
        session: RwLock::new(ServerSession::default()),
        incoming: incoming_sender,
        pending: Arc::clone(&router.pending),
        label,
        handshake: Arc::new(RwLock::new(())),
        listening: AtomicBool::new(false),
        resume_get_stream: options.resume_get_stream,
        max_message_bytes: options.max_message_bytes,
        stop_listening: watch::Sender::new(false),
        agent_session_ended: watch::Sender::new(false),
        server_session_ended: watch::Sender::new(false),
    });
    let ended = connection.server_session_ended.subscribe();
    let upstream = Upstream::with_outbound(Outbound::Post(Poster { connection }), &router, None);
    tokio::spawn(route_server_output(incoming, router, ended));
    Ok((upstream, server_messages))
}

/// Sends every outgoing message as its own POST, concurrently (pipelined requests are
/// answered in any order), except that nothing else starts until `initialize` is answered:
/// later POSTs need the session id it returns. Once the session is initialised, a GET stream
/// carries what the server sends on its own; when the agent's session ends (the `Upstream`,
/// and with it this, is dropped), the stream stops and the server's session is ended with
/// `DELETE`.
pub(super) struct Poster {
    connection: Arc<Connection>,
}

impl Poster {
    /// Starts the POST of `message` in a task of its own; its answer is routed when it comes.
    pub(super) async fn send(&self, message: Value) {
        let connection = Arc::clone(&self.connection);
        let method = message.get("method").and_then(Value::as_str);
        if matches!(method, Some("initialize" | "notifications/initialized")) {
            // Taken before returning, so that whatever is sent next waits for this answer.
            let handshake = Arc::clone(&connection.handshake).write_owned().await;
            let opens_stream = method == Some("notifications/initialized");
            tokio::spawn(async move {
                until_stopped(&connection, post(&connection, message)).await;
                drop(handshake);
                if opens_stream {
                    start_listening(&connection).await;
                }
            });
            return;
        }
        tokio::spawn(async move {
            let posting = async {
                drop(connection.handshake.read().await);
                post(&connection, message).await;
            };
            until_stopped(&connection, posting).await;
        });
    }

    /// Whether the server ended its session (it answered 404 to the session's id).
    pub(super) fn server_ended_the_session(&self) -> bool {
        *self.connection.server_session_ended.borrow()
    }
}

impl Drop for Poster {
    fn drop(&mut self) {
        self.connection.stop_listening.send_replace(true);
        self.connection.agent_session_ended.send_replace(true);
        // Outside a runtime (the daemon is exiting) there is nobody to send it; the server's
        // session then ends when the server does.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(end_server_session(Arc::clone(&self.connection)));
        }
    }
}

/// Runs `work` (a POST and the reading of its answer) until the agent's session ends: a POST
/// the server never answers, or whose event stream it never closes, must not outlive the
/// session with its task and connection.
async fn until_stopped(connection: &Connection, work: impl std::future::Future<Output = ()>) {
    let mut stop = connection.agent_session_ended.subscribe();
    tokio::select! {
        () = work => {}
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
}

/// Opens the GET stream once the session has an id (a server without sessions gets none).
async fn start_listening(connection: &Arc<Connection>) {
    if connection.session.read().await.id.is_none()
        || connection.listening.swap(true, Ordering::AcqRel)
    {
        return;
    }
    let stopped = connection.stop_listening.subscribe();
    tokio::spawn(listen(Arc::clone(connection), stopped));
}

/// Keeps a GET stream open for what the server sends outside any request (notifications,
/// its own requests), reconnecting after a drop, until `stop`. A server that offers no
/// stream (405) is not asked again.
///
/// By default a dropped stream is opened again without `Last-Event-ID`: server-everything
/// (SDK 1.x) registers a resumed GET stream under the wrong key and then drops every message
/// it sends on its own, so resuming it would lose more than the gap. With `resume_get_stream`
/// it is resumed after the last event it carried; a resumption that brings no event (the
/// server did not know the id, or refused) is followed by a fresh stream.
async fn listen(connection: Arc<Connection>, mut stop: watch::Receiver<bool>) {
    let mut decoder = SseDecoder::new(connection.max_message_bytes);
    loop {
        let resume_after = decoder
            .last_event_id
            .clone()
            .filter(|_| connection.resume_get_stream);
        let request = event_stream_request(&connection, resume_after.as_deref()).await;
        let response = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            response = request.send() => response,
        };
        match response {
            Ok(response) if response.status() == reqwest::StatusCode::METHOD_NOT_ALLOWED => {
                return;
            }
            Ok(response) if response.status() == reqwest::StatusCode::NOT_FOUND => {
                tracing::warn!(server = %connection.label,
                    "the server no longer knows its session (HTTP 404 to its GET stream): \
                     ending the agent's session");
                connection.end_with_the_server_session();
                return;
            }
            Ok(response) if response.status().is_success() => {
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => return,
                    _ = read_event_stream(&connection, response, &mut decoder, None) => {}
                }
            }
            Ok(response) => {
                connection.count_if_credentials_rejected(response.status());
                tracing::debug!(server = %connection.label,
                    status = %response.status(), "the server refused a GET stream");
            }
            Err(e) => tracing::debug!(server = %connection.label,
                error = %crate::error_chain(&e), "GET stream failed"),
        }
        if resume_after.is_some() && decoder.last_event_id == resume_after {
            tracing::debug!(server = %connection.label,
                "resuming the GET stream brought no event: opening a fresh one next");
            decoder.last_event_id = None;
        }
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            () = tokio::time::sleep(decoder.reconnect_after()) => {}
        }
    }
}

/// A GET for the session's event stream; with `last_event_id`, the stream the server is to
/// resume after that event.
async fn event_stream_request(
    connection: &Connection,
    last_event_id: Option<&str>,
) -> reqwest::RequestBuilder {
    let mut request = connection
        .client
        .get(connection.url.clone())
        .headers(connection.headers.current())
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    connection.in_the_session(request).await.0
}

/// Tells the server its session is over (best effort: a server that is gone has ended it).
async fn end_server_session(connection: Arc<Connection>) {
    let Some(id) = connection.session.read().await.id.clone() else {
        return;
    };
    let request = connection
        .client
        .delete(connection.url.clone())
        .headers(connection.headers.current())
        .header("mcp-session-id", id)
        .timeout(std::time::Duration::from_secs(5));
    if let Err(e) = request.send().await {
        tracing::debug!(server = %connection.label, error = %crate::error_chain(&e),
            "ending the server's session");
    }
}

async fn post(connection: &Connection, message: Value) {
    let request_id = message.get("id").cloned();
    let is_initialize = message.get("method").and_then(Value::as_str) == Some("initialize");
    let mut request = connection
        .client
        .post(connection.url.clone())
        .headers(connection.headers.current())
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json");
    // The identity mcp-guard stamped into `_meta` travels as headers too (traceparent,
    // baggage, MCP-Guard-*), for servers and proxies that read headers.
    for (name, value) in crate::identity::downstream_headers(&message) {
        request = request.header(name, value);
    }
    let (request, in_a_session) = connection
        .in_the_session(request.body(message.to_string()))
        .await;
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => {
            return fail(
                connection,
                request_id,
                &format!("POST failed: {}", crate::error_chain(&e)),
            )
            .await;
        }
    };
    let status = response.status();
    if is_initialize
        && let Some(id) = response
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
    {
        connection.session.write().await.id = Some(id.to_owned());
    }
    if status == reqwest::StatusCode::ACCEPTED {
        return;
    }
    if status == reqwest::StatusCode::NOT_FOUND && in_a_session {
        tracing::warn!(server = %connection.label,
            "the server no longer knows its session (HTTP 404): ending the agent's session");
        // The answer reaches the router before the end does (it routes what is queued first).
        fail(connection, request_id, SERVER_ENDED_THE_SESSION).await;
        connection.end_with_the_server_session();
        return;
    }
    if !status.is_success() {
        connection.count_if_credentials_rejected(status);
        return fail(connection, request_id, &format!("HTTP {status}")).await;
    }
    let is_sse = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream"));
    if is_sse {
        let mut decoder = SseDecoder::new(connection.max_message_bytes);
        let awaited = request_id.as_ref().map(|id| Awaited { id, is_initialize });
        let answered = read_event_stream(connection, response, &mut decoder, awaited).await;
        if let (false, Some(awaited)) = (answered, awaited) {
            resume_until_answered(connection, decoder, awaited).await;
        }
    } else {
        match body_within(response, connection.max_message_bytes).await {
            Ok(Err(length)) => {
                tracing::warn!(server = %connection.label, length,
                    "server answered with a body over daemon.max_server_message_bytes; dropped");
                let problem = too_large(length, connection.max_message_bytes);
                fail(connection, request_id, &problem).await
            }
            Ok(Ok(body)) => match serde_json::from_slice::<Value>(&body) {
                Ok(value) => {
                    deliver(connection, value, is_initialize, None, &mut Direct::new()).await;
                }
                Err(e) => {
                    fail(
                        connection,
                        request_id,
                        &format!("response is not JSON: {e}"),
                    )
                    .await
                }
            },
            Err(e) => {
                fail(
                    connection,
                    request_id,
                    &format!("reading the response: {e}"),
                )
                .await
            }
        }
    }
}

/// The body of `response`, or `Err` with how long it is (or was found to be, so far) when
/// that is over `max` bytes: no more than `max` is held.
async fn body_within(
    mut response: reqwest::Response,
    max: usize,
) -> Result<Result<Vec<u8>, usize>, reqwest::Error> {
    if let Some(length) = response.content_length()
        && length > max as u64
    {
        return Ok(Err(usize::try_from(length).unwrap_or(usize::MAX)));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > max {
            return Ok(Err(body.len() + chunk.len()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Ok(body))
}

/// The answer a POST's event stream is to bring.
#[derive(Clone, Copy)]
struct Awaited<'a> {
    id: &'a Value,
    is_initialize: bool,
}

/// Feeds each SSE event's data to the router as it arrives, until the stream ends or brings
/// the answer `awaited` is for; whether it brought it.
async fn read_event_stream(
    connection: &Connection,
    response: reqwest::Response,
    decoder: &mut SseDecoder,
    awaited: Option<Awaited<'_>>,
) -> bool {
    let is_initialize = awaited.is_some_and(|awaited| awaited.is_initialize);
    let awaited_id = awaited.map(|awaited| awaited.id);
    let mut answered = false;
    let mut direct = Direct::new();
    decoder.start_stream();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else { break };
        for event in decoder.feed(&chunk) {
            let data = match event {
                SseEvent::Data(data) => data,
                SseEvent::TooLarge(length) => {
                    tracing::warn!(server = %connection.label, length,
                        "server sent an SSE event over daemon.max_server_message_bytes; dropped");
                    // A POST's stream carries its answer: the call fails now, rather than
                    // wait for one that was dropped.
                    if let Some(id) = awaited_id {
                        let problem = too_large(length, connection.max_message_bytes);
                        fail(connection, Some(id.clone()), &problem).await;
                        answered = true;
                    }
                    continue;
                }
            };
            match serde_json::from_str::<Value>(&data) {
                Ok(value) => {
                    answered |=
                        deliver(connection, value, is_initialize, awaited_id, &mut direct).await;
                }
                Err(e) => {
                    tracing::warn!(server = %connection.label, error = %e,
                        "server sent an SSE event that is not JSON; dropped");
                    // An event that reads as the awaited answer fails its call now; any
                    // other (a broken notification) leaves the answer to come.
                    if let Some((id, problem)) = super::unreadable_answer(data.as_bytes(), &e)
                        && awaited_id.and_then(Value::as_i64) == Some(id)
                    {
                        fail(connection, awaited_id.cloned(), &problem).await;
                        answered = true;
                    }
                }
            }
            if answered {
                // A POST's stream has served its purpose once it brought the answer (a
                // server SHOULD close it then). One that does not must not hold the POST's
                // task and connection, nor `initialize`'s hold on every later POST.
                return true;
            }
        }
    }
    answered
}

/// Resumed streams in a row that may bring no event before a call is given up.
const MAX_QUIET_RESUMES: u32 = 3;

/// Resumes a POST's event stream that ended before its answer, for as long as the server
/// keeps bringing events; fails the call when the stream cannot be resumed.
async fn resume_until_answered(
    connection: &Connection,
    mut decoder: SseDecoder,
    awaited: Awaited<'_>,
) {
    let mut stop = connection.stop_listening.subscribe();
    let mut quiet = 0;
    let problem = loop {
        if !connection.awaits(awaited.id).await {
            // Cancelled by the agent or given up on: nobody wants the rest.
            return;
        }
        let Some(last_event_id) = decoder.last_event_id.clone() else {
            break "the server's event stream ended before its answer".to_owned();
        };
        if quiet == MAX_QUIET_RESUMES {
            break format!(
                "the server's event stream ended before its answer, and {MAX_QUIET_RESUMES} \
                 resumptions in a row brought nothing"
            );
        }
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            () = tokio::time::sleep(decoder.reconnect_after()) => {}
        }
        let request = event_stream_request(connection, Some(&last_event_id)).await;
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                if read_event_stream(connection, response, &mut decoder, Some(awaited)).await {
                    return;
                }
            }
            Ok(response) => {
                break format!("resuming its event stream: HTTP {}", response.status());
            }
            Err(e) => tracing::debug!(server = %connection.label,
                error = %crate::error_chain(&e), "resuming an event stream failed"),
        }
        quiet = if decoder.last_event_id.as_ref() == Some(&last_event_id) {
            quiet + 1
        } else {
            0
        };
    };
    if connection.awaits(awaited.id).await {
        fail(connection, Some(awaited.id.clone()), &problem).await;
    }
}

/// What the calls of an agent session get when the server ended the session it had with
/// mcp-guard.
pub(super) const SERVER_ENDED_THE_SESSION: &str = "the server ended its session (HTTP 404)";

impl Connection {
    fn count_if_credentials_rejected(&self, status: reqwest::StatusCode) {
        if matches!(
            status,
            reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN
        ) {
            self.credentials_rejected.inc();
        }
    }

    /// `request` with the session id and protocol version the server gave, if any; and
    /// whether it had given a session id.
    async fn in_the_session(
        &self,
        mut request: reqwest::RequestBuilder,
    ) -> (reqwest::RequestBuilder, bool) {
        let session = self.session.read().await;
        if let Some(id) = &session.id {
            request = request.header("mcp-session-id", id);
        }
        if let Some(version) = &session.protocol_version {
            request = request.header("mcp-protocol-version", version);
        }
        (request, session.id.is_some())
    }

    /// The server ended its session: stop listening to it, and end the agent's session (the
    /// router stops, and the session's relay with it).
    fn end_with_the_server_session(&self) {
        self.stop_listening.send_replace(true);
        self.server_session_ended.send_replace(true);
    }

    /// Delivers one message of the server: a response straight to its waiting caller where
    /// `direct` allows, with no hand-off to the router's task; anything else to the router.
    async fn route(&self, message: Value, direct: &mut Direct) {
        let message = if direct.0 && is_response(&message) {
            match answer_or_pass_on(&self.pending, message, &self.label).await {
                None => return,
                Some(other) => other.to_value(),
            }
        } else {
            message
        };
        direct.0 = false;
        let _ = self.incoming.send(message).await;
    }

    /// Whether a caller still waits for the answer to request `id`.
    async fn awaits(&self, id: &Value) -> bool {
        match id.as_i64() {
            Some(id) => self.pending.lock().await.callers.contains_key(&id),
            None => false,
        }
    }
}

/// Splits a `text/event-stream` body into the data of its events, as the format defines it:
/// lines end in CRLF, LF or CR (servers differ: Starlette's use CRLF), a blank line ends an
/// event, and several `data` lines are joined with LF. Works on bytes, so neither a line
/// ending nor a UTF-8 character split across chunks is misread. Keeps the last event id and
/// the server's reconnection time, which resuming the stream needs. An event without data
/// (a priming event that only sets an id) is not passed on. An event over `max_event_bytes`
/// is not held: the rest of it is only counted.
struct SseDecoder {
    line: Vec<u8>,
    data: Vec<String>,
    after_cr: bool,
    last_event_id: Option<String>,
    retry: Option<Duration>,
    max_event_bytes: usize,
    /// Bytes of the event so far (past `max_event_bytes`: it is too large), and of its line
    /// so far.
    event_bytes: usize,
    line_bytes: usize,
}

/// What an SSE event brought.
#[derive(Debug, PartialEq, Eq)]
enum SseEvent {
    Data(String),
    /// An event over the bound, dropped: how long it was.
    TooLarge(usize),
}

impl SseDecoder {
    fn new(max_event_bytes: usize) -> SseDecoder {
        SseDecoder {
            line: Vec::new(),
            data: Vec::new(),
            after_cr: false,
            last_event_id: None,
            retry: None,
            max_event_bytes,
            event_bytes: 0,
            line_bytes: 0,
        }
    }

    /// Every event `bytes` completes.
    fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &byte in bytes {
            let after_cr = std::mem::take(&mut self.after_cr);
            match byte {
                b'\n' if after_cr => {}
                b'\r' | b'\n' => {
                    self.after_cr = byte == b'\r';
                    self.end_line(&mut events);
                }
                _ => self.take(byte),
            }
        }
        events
    }

    fn too_large(&self) -> bool {
        self.event_bytes > self.max_event_bytes
    }

    fn take(&mut self, byte: u8) {
        self.event_bytes += 1;
        self.line_bytes += 1;
        if self.too_large() {
            // What the event held so far goes (nothing, once it has).
            self.line = Vec::new();
            self.data = Vec::new();
        } else {
            self.line.push(byte);
        }
    }

    fn end_line(&mut self, events: &mut Vec<SseEvent>) {
        let blank = std::mem::take(&mut self.line_bytes) == 0;
        if self.too_large() {
            if blank {
                events.push(SseEvent::TooLarge(self.event_bytes));
                self.event_bytes = 0;
            }
            return;
        }
        let line = std::mem::take(&mut self.line);
        if blank {
            self.event_bytes = 0;
            let data = self.data.join("\n");
            self.data.clear();
            if !data.is_empty() {
                events.push(SseEvent::Data(data));
            }
            return;
        }
        let line = String::from_utf8_lossy(&line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (&*line, ""),
        };
        // `event` and comments (an empty field name) carry nothing mcp-guard uses.
        match field {
            "data" => self.data.push(value.to_owned()),
            "id" if !value.contains('\0') => {
                self.last_event_id = (!value.is_empty()).then(|| value.to_owned());
            }
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry = value.parse().ok().map(Duration::from_millis);
            }
            _ => {}
        }
    }

    /// Forgets what a stream that ended cut off (half a line, an event without its blank
    /// line), keeping the last event id and the reconnection time for the next stream.
    fn start_stream(&mut self) {
        self.line.clear();
        self.data.clear();
        self.after_cr = false;
        self.event_bytes = 0;
        self.line_bytes = 0;
    }

    /// How long to wait before opening the stream again: the server's `retry`, else 1 s.
    fn reconnect_after(&self) -> Duration {
        self.retry.unwrap_or(Duration::from_secs(1))
    }
}

/// Hands the server's message or batch to the router; whether it held the answer to
/// `awaited_id`.
async fn deliver(
    connection: &Connection,
    value: Value,
    is_initialize: bool,
    awaited_id: Option<&Value>,
    direct: &mut Direct,
) -> bool {
    let messages = match value {
        Value::Array(items) => items,
        single => vec![single],
    };
    let mut answered = false;
    for message in messages {
        answered |= awaited_id.is_some_and(|id| answers(&message, id));
        if is_initialize
            && let Some(version) = message
                .get("result")
                .and_then(|r| r.get("protocolVersion"))
                .and_then(Value::as_str)
        {
            connection.session.write().await.protocol_version = Some(version.to_owned());
        }
        connection.route(message, direct).await;
    }
    answered
}

/// Whether a response may still go straight to its caller: until a stream (a POST's answer,
/// an event stream) has sent anything through the router, where it could still be queued, a
/// response of that stream cannot overtake it. (A progress notification must reach the
/// session before the answer it precedes.)
struct Direct(bool);

impl Direct {
    fn new() -> Direct {
        Direct(true)
    }
}

fn is_response(message: &Value) -> bool {
    message.get("method").is_none() && message.get("id").is_some()
}

/// Whether `message` is the response to the request with `id`.
fn answers(message: &Value, id: &Value) -> bool {
    message.get("id") == Some(id)
        && (message.get("result").is_some() || message.get("error").is_some())
}

/// Answers the waiting caller with an error when the server could not.
async fn fail(connection: &Connection, request_id: Option<Value>, problem: &str) {
    tracing::warn!(server = %connection.label, problem, "upstream HTTP request failed");
    if let Some(id) = request_id {
        let error = json!({"jsonrpc": "2.0", "id": id, "error": upstream_error(problem)});
        let _ = connection.incoming.send(error).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde_json::json;

    use super::{Connection, Direct, SseDecoder, SseEvent, answers};

    /// A connection to nowhere, with the router's queue and one caller waiting for id 7.
    fn waiting_connection() -> (
        Connection,
        tokio::sync::mpsc::Receiver<serde_json::Value>,
        tokio::sync::oneshot::Receiver<super::super::Outcome>,
    ) {
        let (incoming, queued) = tokio::sync::mpsc::channel(8);
        let (answer, answered) = tokio::sync::oneshot::channel();
        let waiting = super::super::Waiting {
            callers: [(7, answer)].into_iter().collect(),
            ended: false,
        };
        let pending = std::sync::Arc::new(tokio::sync::Mutex::new(waiting));
        let connection = Connection {
            client: super::client_trusting(None).unwrap(),
            headers: super::ServerHeaders::read(&BTreeMap::new()).unwrap(),
            credentials_rejected: prometheus::IntCounter::new("rejected", "test").unwrap(),
            url: reqwest::Url::parse("http://127.0.0.1:9/mcp").unwrap(),
            session: Default::default(),
            incoming,
            pending,
            label: "test".into(),
            handshake: Default::default(),
            listening: Default::default(),
            resume_get_stream: false,
            max_message_bytes: usize::MAX,
            stop_listening: tokio::sync::watch::Sender::new(false),
            agent_session_ended: tokio::sync::watch::Sender::new(false),
            server_session_ended: tokio::sync::watch::Sender::new(false),
        };
        (connection, queued, answered)
    }

    /// Reads a POST's event stream whose body is `sse`, awaiting `awaited`; whether it
    /// settled the call.
    async fn read_whole(
        connection: &Connection,
        sse: &'static str,
        awaited: super::Awaited<'_>,
    ) -> bool {
        let response = reqwest::Response::from(
            hyper::Response::builder()
                .header("content-type", "text/event-stream")
                .body(sse)
                .unwrap(),
        );
        let mut decoder = SseDecoder::new(usize::MAX);
        super::read_event_stream(connection, response, &mut decoder, Some(awaited)).await
    }

    #[tokio::test]
    async fn an_event_that_reads_as_the_awaited_answer_but_is_no_json_fails_the_call_now() {
        let (connection, mut queued, _answered) = waiting_connection();
        let awaited = super::Awaited {
            id: &json!(7),
            is_initialize: false,
        };
        let broken = "data: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"content\":[{\"te\n\n";
        let answered = read_whole(&connection, broken, awaited).await;
        assert!(answered, "the call was failed: it waits no more");
        let failure = queued.try_recv().expect("the call's failure");
        assert_eq!(failure["id"], 7);
        let message = failure["error"]["message"].as_str().unwrap();
        assert!(message.contains("not JSON"), "{message}");

        // A broken event that names no answer (a notification) leaves the answer to come.
        let (connection, mut queued, _answered) = waiting_connection();
        let stray = "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/mess\n\n";
        let answered = read_whole(&connection, stray, awaited).await;
        assert!(!answered, "the answer may still come");
        assert!(queued.try_recv().is_err(), "nothing failed");
    }

    #[tokio::test]
    async fn a_response_that_nothing_preceded_goes_straight_to_its_caller() {
        let (connection, mut queued, answered) = waiting_connection();
        let response = json!({"jsonrpc": "2.0", "id": 7, "result": {"ok": true}});
        connection.route(response, &mut Direct::new()).await;
        assert_eq!(answered.await.unwrap(), Ok(json!({"ok": true})));
        assert!(
            queued.try_recv().is_err(),
            "nothing goes through the router"
        );
    }

    #[tokio::test]
    async fn a_response_after_a_notification_of_its_stream_follows_it_through_the_router() {
        let (connection, mut queued, mut answered) = waiting_connection();
        let mut direct = Direct::new();
        let progress = json!({"jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": 1, "progress": 1}});
        let response = json!({"jsonrpc": "2.0", "id": 7, "result": {}});
        connection.route(progress.clone(), &mut direct).await;
        connection.route(response.clone(), &mut direct).await;
        assert_eq!(queued.try_recv().unwrap(), progress);
        assert_eq!(queued.try_recv().unwrap(), response);
        assert!(
            answered.try_recv().is_err(),
            "the router answers it, after the progress"
        );
    }

    /// The data of `events`, which must all have been read whole.
    fn data(events: Vec<SseEvent>) -> Vec<String> {
        events
            .into_iter()
            .map(|event| match event {
                SseEvent::Data(data) => data,
                SseEvent::TooLarge(length) => panic!("an event of {length} bytes was dropped"),
            })
            .collect()
    }

    #[test]
    fn an_event_over_the_bound_is_counted_not_held_and_the_next_is_read() {
        let mut decoder = SseDecoder::new(32);
        let big = format!("id: 1\ndata: {}\n\n", "x".repeat(100));
        let mut events = Vec::new();
        for piece in big.as_bytes().chunks(7) {
            events.extend(decoder.feed(piece));
            assert!(decoder.line.len() <= 32 && decoder.data.concat().len() <= 32);
        }
        assert_eq!(events, [SseEvent::TooLarge(big.trim_end().len() - 1)]);
        assert_eq!(
            decoder.feed(b"data: {\"small\":1}\n\n"),
            [SseEvent::Data("{\"small\":1}".into())]
        );
    }

    #[test]
    fn events_end_at_blank_lines_whatever_the_line_endings() {
        let mut decoder = SseDecoder::new(usize::MAX);
        let stream =
            b"event: message\r\ndata: {\"a\":1}\r\n\r\n: keep-alive\n\ndata: x\rdata: y\r\r";
        assert_eq!(data(decoder.feed(stream)), ["{\"a\":1}", "x\ny"]);
    }

    #[test]
    fn ids_and_retry_are_kept_and_events_without_data_are_not_passed_on() {
        let mut decoder = SseDecoder::new(usize::MAX);
        assert_eq!(decoder.reconnect_after(), Duration::from_secs(1));
        // A priming event (2025-11-25): an id and a retry time, no message.
        let priming = b"id: s1-0\r\nretry: 250\r\ndata: \r\n\r\n";
        assert!(decoder.feed(priming).is_empty());
        assert_eq!(decoder.last_event_id.as_deref(), Some("s1-0"));
        assert_eq!(decoder.reconnect_after(), Duration::from_millis(250));
        let events = decoder.feed(b"id: s1-1\ndata: {}\n\nretry: soon\nid: a\0b\n\n");
        assert_eq!(data(events), ["{}"]);
        // A retry that is not a number and an id with NUL are ignored.
        assert_eq!(decoder.last_event_id.as_deref(), Some("s1-1"));
        assert_eq!(decoder.reconnect_after(), Duration::from_millis(250));
        decoder.feed(b"id\n\n");
        assert_eq!(decoder.last_event_id, None);
    }

    #[test]
    fn a_new_stream_forgets_what_the_last_one_cut_off_but_not_its_id() {
        let mut decoder = SseDecoder::new(usize::MAX);
        assert!(
            decoder
                .feed(b"id: 4\nretry: 50\n\ndata: {\"cut\"")
                .is_empty()
        );
        decoder.start_stream();
        assert_eq!(data(decoder.feed(b"data: {}\n\n")), ["{}"]);
        assert_eq!(decoder.last_event_id.as_deref(), Some("4"));
        assert_eq!(decoder.reconnect_after(), Duration::from_millis(50));
    }

    #[test]
    fn only_a_result_or_an_error_with_the_id_answers_a_request() {
        let id = json!(7);
        assert!(answers(
            &json!({"jsonrpc": "2.0", "id": 7, "result": {}}),
            &id
        ));
        assert!(answers(
            &json!({"jsonrpc": "2.0", "id": 7, "error": {"code": 1}}),
            &id
        ));
        assert!(!answers(
            &json!({"jsonrpc": "2.0", "id": 8, "result": {}}),
            &id
        ));
        // The server's own request that happens to reuse the number.
        assert!(!answers(
            &json!({"jsonrpc": "2.0", "id": 7, "method": "ping"}),
            &id
        ));
    }

    #[test]
    fn chunks_may_split_line_endings_and_characters() {
        let mut decoder = SseDecoder::new(usize::MAX);
        let stream = "data: {\"t\":\"caf\u{e9}\"}\r\n\r\n".as_bytes();
        let mut events = Vec::new();
        for byte in stream {
            events.extend(decoder.feed(std::slice::from_ref(byte)));
        }
        assert_eq!(data(events), ["{\"t\":\"caf\u{e9}\"}"]);
    }
}
