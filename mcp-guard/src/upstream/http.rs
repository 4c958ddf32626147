//! Streamable HTTP servers: each message mcp-guard sends is a POST to the server's URL; what
//! comes back (a JSON message or batch, or an SSE stream of messages) feeds the same router
//! as a stdio server's output. The server's `Mcp-Session-Id` and negotiated protocol version
//! are kept per agent session and sent on every later POST.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{Mutex, RwLock, mpsc, watch};

use super::{Outbound, ServerMessages, Upstream, UpstreamError, route_server_output};
use crate::mcp::jsonrpc::codes;

/// A client for one session's server: TLS with the `ring` provider, installed once for the
/// process (reqwest asks for a process default when built without its own).
fn client_trusting(tls_ca_file: Option<&Path>) -> Result<reqwest::Client, UpstreamError> {
    static PROVIDER: std::sync::Once = std::sync::Once::new();
    PROVIDER.call_once(|| {
        // Err only when another provider is already installed, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    let mut builder = reqwest::Client::builder();
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
    /// Parsed once: every request reuses it.
    url: reqwest::Url,
    session: RwLock<ServerSession>,
    incoming: mpsc::Sender<Value>,
    label: Arc<str>,
    /// Held for writing while `initialize` and then `notifications/initialized` are posted:
    /// a POST sent after them waits, as it needs the session id the first one returns.
    handshake: Arc<RwLock<()>>,
    listening: AtomicBool,
    stop_listening: watch::Sender<bool>,
}

/// Connects (lazily: the first POST is the agent's first message) to the server at `url`.
/// An `https://` server's certificate must chain to the system's roots or to one of the PEM
/// certificates in `tls_ca_file`.
pub fn connect(
    url: &str,
    tls_ca_file: Option<&Path>,
    label: Arc<str>,
) -> Result<(Upstream, ServerMessages), UpstreamError> {
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(UpstreamError::Unsupported(format!(
            "{url}: upstream URLs must be http:// or https://"
        )));
    }
    let parsed =
        reqwest::Url::parse(url).map_err(|e| UpstreamError::Unsupported(format!("{url}: {e}")))?;
    let client = client_trusting(tls_ca_file)?;
    let (incoming_sender, incoming) = mpsc::channel::<Value>(256);
    let (session_sender, server_messages) = mpsc::channel(256);
    let pending = Arc::new(Mutex::new(Default::default()));
    let connection = Arc::new(Connection {
        client,
        url: parsed,
        session: RwLock::new(ServerSession::default()),
        incoming: incoming_sender,
        label: label.clone(),
        handshake: Arc::new(RwLock::new(())),
        listening: AtomicBool::new(false),
        stop_listening: watch::Sender::new(false),
    });
    tokio::spawn(route_server_output(
        incoming,
        Arc::clone(&pending),
        session_sender,
        label,
    ));
    Ok((
        Upstream::with_outbound(Outbound::Post(Poster { connection }), pending, None),
        server_messages,
    ))
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
                post(&connection, message).await;
                drop(handshake);
                if opens_stream {
                    start_listening(&connection).await;
                }
            });
            return;
        }
        tokio::spawn(async move {
            drop(connection.handshake.read().await);
            post(&connection, message).await;
        });
    }
}

impl Drop for Poster {
    fn drop(&mut self) {
        self.connection.stop_listening.send_replace(true);
        // Outside a runtime (the daemon is exiting) there is nobody to send it; the server's
        // session then ends when the server does.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(end_server_session(Arc::clone(&self.connection)));
        }
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
async fn listen(connection: Arc<Connection>, mut stop: watch::Receiver<bool>) {
    const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
    loop {
        let mut request = connection
            .client
            .get(connection.url.clone())
            .header("accept", "text/event-stream");
        {
            let session = connection.session.read().await;
            if let Some(id) = &session.id {
                request = request.header("mcp-session-id", id);
            }
            if let Some(version) = &session.protocol_version {
                request = request.header("mcp-protocol-version", version);
            }
        }
        let response = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            response = request.send() => response,
        };
        match response {
            Ok(response) if response.status() == reqwest::StatusCode::METHOD_NOT_ALLOWED => {
                return;
            }
            Ok(response) if response.status().is_success() => {
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => return,
                    () = read_event_stream(&connection, response, false) => {}
                }
            }
            Ok(response) => tracing::debug!(server = %connection.label,
                status = %response.status(), "the server refused a GET stream"),
            Err(e) => tracing::debug!(server = %connection.label,
                error = %crate::error_chain(&e), "GET stream failed"),
        }
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            () = tokio::time::sleep(RETRY_AFTER) => {}
        }
    }
}

/// Tells the server its session is over (best effort: a server that is gone has ended it).
async fn end_server_session(connection: Arc<Connection>) {
    let Some(id) = connection.session.read().await.id.clone() else {
        return;
    };
    let request = connection
        .client
        .delete(connection.url.clone())
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
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json");
    // The identity mcp-guard stamped into `_meta` travels as headers too (traceparent,
    // baggage, MCP-Guard-*), for servers and proxies that read headers.
    for (name, value) in crate::identity::downstream_headers(&message) {
        request = request.header(name, value);
    }
    let mut request = request.body(message.to_string());
    {
        let session = connection.session.read().await;
        if let Some(id) = &session.id {
            request = request.header("mcp-session-id", id);
        }
        if let Some(version) = &session.protocol_version {
            request = request.header("mcp-protocol-version", version);
        }
    }
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
    if !status.is_success() {
        return fail(connection, request_id, &format!("HTTP {status}")).await;
    }
    let is_sse = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream"));
    if is_sse {
        read_event_stream(connection, response, is_initialize).await;
    } else {
        match response.bytes().await {
            Ok(body) => match serde_json::from_slice::<Value>(&body) {
                Ok(value) => deliver(connection, value, is_initialize).await,
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

/// Feeds each SSE event's data to the router as it arrives.
async fn read_event_stream(
    connection: &Connection,
    response: reqwest::Response,
    is_initialize: bool,
) {
    let mut body = response.bytes_stream();
    let mut decoder = SseDecoder::default();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else { break };
        for data in decoder.feed(&chunk) {
            match serde_json::from_str::<Value>(&data) {
                Ok(value) => deliver(connection, value, is_initialize).await,
                Err(e) => tracing::warn!(server = %connection.label, error = %e,
                    "server sent an SSE event that is not JSON; dropped"),
            }
        }
    }
}

/// Splits a `text/event-stream` body into the data of its events, as the format defines it:
/// lines end in CRLF, LF or CR (servers differ: Starlette's use CRLF), a blank line ends an
/// event, and several `data` lines are joined with LF. Works on bytes, so neither a line
/// ending nor a UTF-8 character split across chunks is misread.
#[derive(Default)]
struct SseDecoder {
    line: Vec<u8>,
    data: Vec<String>,
    after_cr: bool,
}

impl SseDecoder {
    /// The data of every event `bytes` completes.
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &byte in bytes {
            let after_cr = std::mem::take(&mut self.after_cr);
            match byte {
                b'\n' if after_cr => {}
                b'\r' | b'\n' => {
                    self.after_cr = byte == b'\r';
                    self.end_line(&mut events);
                }
                _ => self.line.push(byte),
            }
        }
        events
    }

    fn end_line(&mut self, events: &mut Vec<String>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if !self.data.is_empty() {
                events.push(self.data.join("\n"));
                self.data.clear();
            }
            return;
        }
        // Other fields (event, id, retry) and comments carry nothing mcp-guard forwards.
        let line = String::from_utf8_lossy(&line);
        if let Some(value) = line.strip_prefix("data:") {
            self.data
                .push(value.strip_prefix(' ').unwrap_or(value).to_owned());
        } else if line == "data" {
            self.data.push(String::new());
        }
    }
}

async fn deliver(connection: &Connection, value: Value, is_initialize: bool) {
    let messages = match value {
        Value::Array(items) => items,
        single => vec![single],
    };
    for message in messages {
        if is_initialize
            && let Some(version) = message
                .get("result")
                .and_then(|r| r.get("protocolVersion"))
                .and_then(Value::as_str)
        {
            connection.session.write().await.protocol_version = Some(version.to_owned());
        }
        let _ = connection.incoming.send(message).await;
    }
}

/// Answers the waiting caller with an error when the server could not.
async fn fail(connection: &Connection, request_id: Option<Value>, problem: &str) {
    tracing::warn!(server = %connection.label, problem, "upstream HTTP request failed");
    if let Some(id) = request_id {
        let error = json!({"jsonrpc": "2.0", "id": id, "error": {
            "code": codes::UPSTREAM_ERROR,
            "message": format!("upstream server: {problem}"),
        }});
        let _ = connection.incoming.send(error).await;
    }
}

#[cfg(test)]
mod tests {
    use super::SseDecoder;

    #[test]
    fn events_end_at_blank_lines_whatever_the_line_endings() {
        let mut decoder = SseDecoder::default();
        let stream =
            b"event: message\r\ndata: {\"a\":1}\r\n\r\n: keep-alive\n\ndata: x\rdata: y\r\r";
        assert_eq!(decoder.feed(stream), ["{\"a\":1}", "x\ny"]);
    }

    #[test]
    fn chunks_may_split_line_endings_and_characters() {
        let mut decoder = SseDecoder::default();
        let stream = "data: {\"t\":\"caf\u{e9}\"}\r\n\r\n".as_bytes();
        let mut events = Vec::new();
        for byte in stream {
            events.extend(decoder.feed(std::slice::from_ref(byte)));
        }
        assert_eq!(events, ["{\"t\":\"caf\u{e9}\"}"]);
    }
}
