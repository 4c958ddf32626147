//! Streamable HTTP servers: each message mcp-guard sends is a POST to the server's URL; what
//! comes back (a JSON message or batch, or an SSE stream of messages) feeds the same router
//! as a stdio server's output. The server's `Mcp-Session-Id` and negotiated protocol version
//! are kept per agent session and sent on every later POST.

use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{Mutex, RwLock, mpsc};

use super::{ServerMessages, Upstream, UpstreamError, route_server_output};
use crate::mcp::jsonrpc::codes;

/// Per-session state the server gave us.
#[derive(Default)]
struct ServerSession {
    id: Option<String>,
    protocol_version: Option<String>,
}

struct Connection {
    client: reqwest::Client,
    url: String,
    session: RwLock<ServerSession>,
    incoming: mpsc::Sender<Value>,
    label: Arc<str>,
}

/// Connects (lazily: the first POST is the agent's first message) to the server at `url`.
pub fn connect(url: &str, label: Arc<str>) -> Result<(Upstream, ServerMessages), UpstreamError> {
    if !url.starts_with("http://") {
        return Err(UpstreamError::Unsupported(format!(
            "{url}: only http:// upstream URLs are supported in this build"
        )));
    }
    let client = reqwest::Client::builder()
        .build()
        .map_err(|e| UpstreamError::Unsupported(e.to_string()))?;
    let (to_server, outgoing) = mpsc::channel::<Value>(256);
    let (incoming_sender, incoming) = mpsc::channel::<Value>(256);
    let (session_sender, server_messages) = mpsc::channel(256);
    let pending = Arc::new(Mutex::new(Default::default()));
    let connection = Arc::new(Connection {
        client,
        url: url.to_owned(),
        session: RwLock::new(ServerSession::default()),
        incoming: incoming_sender,
        label: label.clone(),
    });
    tokio::spawn(post_each(connection, outgoing));
    tokio::spawn(route_server_output(
        incoming,
        Arc::clone(&pending),
        session_sender,
        label,
    ));
    Ok((Upstream::new(to_server, pending, None), server_messages))
}

/// Sends every outgoing message as its own POST, concurrently (pipelined requests are
/// answered in any order), except that nothing else starts until `initialize` is answered:
/// later POSTs need the session id it returns.
async fn post_each(connection: Arc<Connection>, mut outgoing: mpsc::Receiver<Value>) {
    while let Some(message) = outgoing.recv().await {
        let is_initialize = message.get("method").and_then(Value::as_str) == Some("initialize");
        let connection = connection.clone();
        if is_initialize {
            post(&connection, message).await;
        } else {
            tokio::spawn(async move { post(&connection, message).await });
        }
    }
}

async fn post(connection: &Connection, message: Value) {
    let request_id = message.get("id").cloned();
    let is_initialize = message.get("method").and_then(Value::as_str) == Some("initialize");
    let mut request = connection
        .client
        .post(&connection.url)
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
        Err(e) => return fail(connection, request_id, &format!("POST failed: {e}")).await,
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

/// Feeds each SSE `data:` payload to the router as it arrives.
async fn read_event_stream(
    connection: &Connection,
    response: reqwest::Response,
    is_initialize: bool,
) {
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else { break };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let data: Vec<&str> = event
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if data.is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(&data.join("\n")) {
                Ok(value) => deliver(connection, value, is_initialize).await,
                Err(e) => tracing::warn!(server = %connection.label, error = %e,
                    "server sent an SSE event that is not JSON; dropped"),
            }
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
