//! The Streamable HTTP front agents connect to: `/servers/{name}/mcp`.
//!
//! - POST carries JSON-RPC (one message or a batch). `initialize` opens a session and the
//!   answer carries `Mcp-Session-Id`; later requests must send it (unknown id: 404).
//! - Revision 2026-07-28 is stateless: no initialize, no session header. The session is the
//!   one named by `MCP-Guard-Session` (or `params._meta["io.mcp-guard/session"]`), else one per
//!   principal and server. `Mcp-Method` / `Mcp-Name` headers must match the body.
//! - GET opens the stream of server-initiated messages (SSE); DELETE ends the session.
//! - Answers are JSON, or SSE when the agent accepts only `text/event-stream`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::Stream;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::identity::TransportHints;
use crate::mcp::jsonrpc::{self, Incoming, Message, RpcError, codes};
use crate::mcp::revision::{self, Revision};
use crate::proxy::{AgentSession, Caller, Proxy};

const SESSION_HEADER: &str = "mcp-session-id";
const GUARD_SESSION_HEADER: &str = "mcp-guard-session";
const GUARD_CONTEXT_HEADER: &str = "mcp-guard-context";

/// What the front needs besides the proxy: how callers are identified until token identity
/// exists (the policy's `daemon.principal`).
#[derive(Clone)]
pub struct Front {
    pub proxy: Arc<Proxy>,
}

pub fn router(front: Front) -> Router {
    Router::new()
        .route("/servers/{name}/mcp", axum::routing::any(dispatch))
        .with_state(front)
}

pub async fn serve(listener: tokio::net::TcpListener, front: Front) -> std::io::Result<()> {
    axum::serve(listener, router(front)).await
}

async fn dispatch(
    State(front): State<Front>,
    Path(name): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !front.proxy.model().servers.contains_key(&name) {
        return rpc_error_response(
            StatusCode::NOT_FOUND,
            RpcError::new(
                None,
                codes::INVALID_REQUEST,
                format!("no MCP server named {name:?}"),
            ),
        );
    }
    match method {
        Method::POST => post(&front, &name, &headers, body).await,
        Method::GET => get(&front, &name, &headers).await,
        Method::DELETE => delete(&front, &name, &headers).await,
        _ => {
            let mut response = StatusCode::METHOD_NOT_ALLOWED.into_response();
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
            response
        }
    }
}

fn rpc_error_response(status: StatusCode, error: RpcError) -> Response {
    (status, axum::Json(error.to_value())).into_response()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn accepts(headers: &HeaderMap, media: &str) -> bool {
    header_str(headers, "accept").is_some_and(|accept| {
        accept
            .split(',')
            .map(|part| part.split(';').next().unwrap_or("").trim())
            .any(|m| m == media || m == "*/*")
    })
}

async fn post(front: &Front, server: &str, headers: &HeaderMap, body: Body) -> Response {
    let proxy = &front.proxy;
    if !accepts(headers, "application/json") && !accepts(headers, "text/event-stream") {
        return rpc_error_response(
            StatusCode::NOT_ACCEPTABLE,
            RpcError::new(
                None,
                codes::INVALID_REQUEST,
                "Accept must include application/json and/or text/event-stream",
            ),
        );
    }
    let content_type = header_str(headers, "content-type").unwrap_or("");
    if !content_type.trim_start().starts_with("application/json") {
        return rpc_error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RpcError::new(
                None,
                codes::INVALID_REQUEST,
                "Content-Type must be application/json",
            ),
        );
    }
    let bytes = match axum::body::to_bytes(body, proxy.limits.max_bytes).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return rpc_error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                RpcError::new(
                    None,
                    codes::INVALID_REQUEST,
                    format!(
                        "message exceeds the limit of {} bytes",
                        proxy.limits.max_bytes
                    ),
                ),
            );
        }
    };
    let incoming = match jsonrpc::parse(&bytes, &proxy.limits) {
        Ok(incoming) => incoming,
        Err(error) => return rpc_error_response(StatusCode::BAD_REQUEST, error),
    };
    let header_version = header_str(headers, "mcp-protocol-version");
    if let Some(version) = header_version
        && Revision::parse(version).is_none()
    {
        return rpc_error_response(
            StatusCode::BAD_REQUEST,
            RpcError::new(
                None,
                codes::INVALID_REQUEST,
                format!(
                    "unsupported MCP-Protocol-Version {version:?} (supported: {})",
                    revision::SUPPORTED.join(", ")
                ),
            ),
        );
    }
    let session =
        match find_or_open_session(front, server, headers, &incoming, header_version).await {
            Ok(session) => session,
            Err(response) => return response,
        };
    let opened_now = is_initialize(&incoming);
    let hints = TransportHints::from_headers(|name| header_str(headers, name));
    let answer = proxy.handle(&session, incoming, &hints).await;
    let mut response = match answer {
        None => StatusCode::ACCEPTED.into_response(),
        Some(answer) if accepts(headers, "application/json") => axum::Json(answer).into_response(),
        Some(answer) => sse_of_values(answer),
    };
    if opened_now && let Ok(value) = HeaderValue::from_str(&session.id) {
        response.headers_mut().insert(SESSION_HEADER, value);
    }
    response
}

fn is_initialize(incoming: &Incoming) -> bool {
    matches!(incoming, Incoming::Single(Message::Request(r)) if r.method == "initialize")
}

/// The session a POST belongs to, opening one for `initialize` or for stateless traffic.
async fn find_or_open_session(
    front: &Front,
    server: &str,
    headers: &HeaderMap,
    incoming: &Incoming,
    header_version: Option<&str>,
) -> Result<Arc<AgentSession>, Response> {
    let proxy = &front.proxy;
    if is_initialize(incoming) {
        return open(front, server, headers, None).await;
    }
    if let Some(id) = header_str(headers, SESSION_HEADER) {
        return match proxy.session(id).await {
            Some(session) if session.server == server => Ok(session),
            _ => Err(rpc_error_response(
                StatusCode::NOT_FOUND,
                RpcError::new(
                    None,
                    codes::INVALID_REQUEST,
                    "unknown or ended session; initialize again",
                ),
            )),
        };
    }
    let stateless = header_version
        .and_then(Revision::parse)
        .is_some_and(Revision::is_stateless)
        || revision::message_revision(incoming).is_some_and(Revision::is_stateless);
    if !stateless {
        return Err(rpc_error_response(
            StatusCode::BAD_REQUEST,
            RpcError::new(
                None,
                codes::INVALID_REQUEST,
                "missing Mcp-Session-Id header: send initialize first (or use protocol revision 2026-07-28)",
            ),
        ));
    }
    if let Err(problem) = revision::check_routing_headers(
        incoming,
        header_version,
        header_str(headers, "mcp-method"),
        header_str(headers, "mcp-name"),
    ) {
        return Err(rpc_error_response(
            StatusCode::BAD_REQUEST,
            RpcError::new(None, codes::INVALID_REQUEST, problem),
        ));
    }
    let caller = caller_for(front, headers);
    let key = header_str(headers, GUARD_SESSION_HEADER)
        .map(str::to_owned)
        .or_else(|| revision::meta_session(incoming))
        .unwrap_or_else(|| format!("{}-{server}", caller.principal));
    let id = format!("stateless-{}", sanitise(&key));
    if let Some(session) = proxy.session(&id).await {
        return Ok(session);
    }
    open(front, server, headers, Some(id)).await
}

async fn open(
    front: &Front,
    server: &str,
    headers: &HeaderMap,
    id: Option<String>,
) -> Result<Arc<AgentSession>, Response> {
    let caller = caller_for(front, headers);
    front
        .proxy
        .open_session(server, caller, id)
        .await
        .map_err(|e| {
            tracing::error!(server, error = %e, "opening a session");
            rpc_error_response(
                StatusCode::BAD_GATEWAY,
                RpcError::new(
                    None,
                    codes::UPSTREAM_ERROR,
                    format!("could not start the server: {e}"),
                ),
            )
        })
}

/// Session ids become cgroup names: keep them to a safe alphabet.
fn sanitise(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect()
}

/// The caller of this request: the listener's configured principal (token identity comes
/// later), with context values from `MCP-Guard-Context: key=value; key=value`.
fn caller_for(front: &Front, headers: &HeaderMap) -> Caller {
    let model = front.proxy.model();
    let principal = model
        .daemon
        .principal
        .clone()
        .unwrap_or_else(|| "anonymous".into());
    let roles = model
        .principals
        .get(&principal)
        .map(|p| p.roles.clone())
        .unwrap_or_default();
    let context: BTreeMap<String, String> = header_str(headers, GUARD_CONTEXT_HEADER)
        .map(|text| {
            text.split(';')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    Caller {
        principal,
        roles,
        context,
    }
}

/// The answer as a one-event SSE stream (a batch answer stays one JSON array).
fn sse_of_values(answer: Value) -> Response {
    let event: Result<Event, Infallible> =
        Ok(Event::default().event("message").data(answer.to_string()));
    Sse::new(futures_util::stream::iter([event])).into_response()
}

async fn get(front: &Front, server: &str, headers: &HeaderMap) -> Response {
    if !accepts(headers, "text/event-stream") {
        return rpc_error_response(
            StatusCode::NOT_ACCEPTABLE,
            RpcError::new(
                None,
                codes::INVALID_REQUEST,
                "GET needs Accept: text/event-stream",
            ),
        );
    }
    let Some(id) = header_str(headers, SESSION_HEADER) else {
        return rpc_error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            RpcError::new(
                None,
                codes::INVALID_REQUEST,
                "GET needs an Mcp-Session-Id (stateless revisions have no GET stream)",
            ),
        );
    };
    let Some(session) = front.proxy.session(id).await.filter(|s| s.server == server) else {
        return rpc_error_response(
            StatusCode::NOT_FOUND,
            RpcError::new(None, codes::INVALID_REQUEST, "unknown or ended session"),
        );
    };
    let Some(outbox) = session.take_outbox().await else {
        return rpc_error_response(
            StatusCode::CONFLICT,
            RpcError::new(
                None,
                codes::INVALID_REQUEST,
                "this session already has an open GET stream",
            ),
        );
    };
    let ended = tokio_stream::wrappers::WatchStream::new(session.ended());
    Sse::new(OutboxStream {
        outbox: Some(outbox),
        session: Arc::downgrade(&session),
        ended,
    })
    .keep_alive(axum::response::sse::KeepAlive::default())
    .into_response()
}

/// Server-initiated messages as SSE, until the session ends; gives the outbox back to the
/// session when the agent disconnects, so a new GET can pick up where this one stopped.
struct OutboxStream {
    outbox: Option<mpsc::Receiver<Value>>,
    /// Weak: an open stream must not keep an ended session (and its server process) alive.
    session: std::sync::Weak<AgentSession>,
    ended: tokio_stream::wrappers::WatchStream<bool>,
}

impl Stream for OutboxStream {
    type Item = Result<Event, Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use futures_util::StreamExt;
        while let std::task::Poll::Ready(state) = self.ended.poll_next_unpin(cx) {
            if state != Some(false) {
                self.outbox = None;
                return std::task::Poll::Ready(None);
            }
        }
        let Some(outbox) = self.outbox.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        outbox.poll_recv(cx).map(|message| {
            message.map(|value| Ok(Event::default().event("message").data(value.to_string())))
        })
    }
}

impl Drop for OutboxStream {
    fn drop(&mut self) {
        if let (Some(outbox), Some(session)) = (self.outbox.take(), self.session.upgrade()) {
            tokio::spawn(async move { session.return_outbox(outbox).await });
        }
    }
}

async fn delete(front: &Front, server: &str, headers: &HeaderMap) -> Response {
    let Some(id) = header_str(headers, SESSION_HEADER) else {
        return rpc_error_response(
            StatusCode::BAD_REQUEST,
            RpcError::new(
                None,
                codes::INVALID_REQUEST,
                "DELETE needs an Mcp-Session-Id",
            ),
        );
    };
    match front.proxy.session(id).await {
        Some(session) if session.server == server => {
            front.proxy.end_session(id).await;
            StatusCode::NO_CONTENT.into_response()
        }
        _ => rpc_error_response(
            StatusCode::NOT_FOUND,
            RpcError::new(None, codes::INVALID_REQUEST, "unknown or ended session"),
        ),
    }
}
