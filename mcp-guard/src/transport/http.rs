//! The Streamable HTTP front agents connect to: `/servers/{name}/mcp`.
//!
//! - POST carries JSON-RPC (one message or a batch). `initialize` opens a session and the
//!   answer carries `Mcp-Session-Id`; later requests must send it (unknown id: 404).
//! - Revision 2026-07-28 is stateless: no initialize, no session header. The session is the
//!   one named by `MCP-Guard-Session` (or `params._meta["io.mcp-guard/session"]`), else one per
//!   principal and server. `Mcp-Method` / `Mcp-Name` headers must match the body.
//! - GET opens the stream of server-initiated messages (SSE); DELETE ends the session.
//! - Answers are JSON, or SSE when the agent accepts only `text/event-stream`. A request
//!   with a `progressToken` is answered as SSE when the agent accepts it: the server's
//!   progress notifications for it, then the answer, on the request's own stream (on the GET
//!   stream they could reach the agent after the answer, which ends the request for it).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Extension;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt as _;
use futures_util::stream::Stream;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::identity::jwt::{AuthError, VerifiedIdentity, Verifier};
use crate::identity::protected_resource::METADATA_PREFIX;
use crate::identity::{OpeningContext, TransportHints};
use crate::mcp::jsonrpc::{self, Incoming, Message, RpcError, codes};
use crate::mcp::revision::{self, Revision};
use crate::proxy::{AgentSession, Caller, ProgressRoute, Proxy, ProxyError, SessionLimit};

const SESSION_HEADER: &str = "mcp-session-id";
const GUARD_SESSION_HEADER: &str = "mcp-guard-session";
const GUARD_CONTEXT_HEADER: &str = "mcp-guard-context";
const GUARD_PRINCIPAL_HEADER: &str = "mcp-guard-principal";

/// What the front serves from: the proxy (and through it the policy, whose `identity`
/// section says how callers are identified).
#[derive(Clone)]
pub struct Front {
    pub proxy: Arc<Proxy>,
    /// Turns true when the daemon stops: GET streams then close at once (they are not calls
    /// in flight, and would otherwise hold the stop for its whole grace period).
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

pub fn router(front: Front) -> Router {
    Router::new()
        .route("/servers/{name}/mcp", axum::routing::any(dispatch))
        .route(
            &format!("{METADATA_PREFIX}/servers/{{name}}/mcp"),
            axum::routing::get(protected_resource_metadata).options(metadata_preflight),
        )
        .with_state(front)
}

/// `server`'s OAuth protected-resource metadata (RFC 9728), with `identity.jwt.protected_resource`
/// (404 otherwise). Served without authentication, as clients read it to learn how to
/// authenticate, and for any well-formed server name: a document for a name the policy lacks
/// tells an unauthenticated caller as little as the 401 at that name's endpoint does.
async fn protected_resource_metadata(
    State(front): State<Front>,
    Path(name): Path<String>,
) -> Response {
    let model = front.proxy.model();
    let document = model.identity.jwt.as_ref().and_then(|jwt| {
        let resource = jwt.protected_resource.as_ref()?;
        crate::policy::is_valid_name(&name).then(|| resource.metadata(jwt, &name))
    });
    let mut response = match document {
        Some(document) => axum::Json(document).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    };
    allow_any_origin(&mut response);
    response
}

/// The CORS preflight of a browser-based client (such as the MCP Inspector) reading metadata.
async fn metadata_preflight() -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    allow_any_origin(&mut response);
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("mcp-protocol-version"),
    );
    response
}

/// Metadata is public: any web page may read it.
fn allow_any_origin(response: &mut Response) {
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
}

async fn dispatch(
    State(front): State<Front>,
    Path(name): Path<String>,
    connection: Option<Extension<ConnectInfo<SocketAddr>>>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // The policy in force is read once here and not held through the request (a GET stream
    // would keep its generation alive).
    let (client, known) = {
        let model = front.proxy.model();
        let client = connection.map(|Extension(ConnectInfo(peer))| {
            super::forwarded::client_address(peer.ip(), &model.daemon.trusted_proxies, &headers)
        });
        (client, model.servers.contains_key(&name))
    };
    if !known {
        // Unauthenticated callers learn nothing, not even which server names exist.
        if let Err(unauthenticated) = caller_for(&front, &name, &headers, client) {
            return *unauthenticated;
        }
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
        Method::POST => post(&front, &name, &headers, client, body).await,
        Method::GET => get(&front, &name, &headers, client).await,
        Method::DELETE => delete(&front, &name, &headers, client).await,
        _ => with_allow(
            StatusCode::METHOD_NOT_ALLOWED.into_response(),
            ALLOWED_METHODS,
        ),
    }
}

/// The methods of an MCP endpoint, for the `Allow` header every 405 must carry (RFC 9110
/// section 15.5.6).
const ALLOWED_METHODS: &str = "GET, POST, DELETE";

fn with_allow(mut response: Response, methods: &'static str) -> Response {
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(methods));
    response
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

async fn post(
    front: &Front,
    server: &str,
    headers: &HeaderMap,
    client: Option<IpAddr>,
    body: Body,
) -> Response {
    let proxy = &front.proxy;
    let caller = match caller_for(front, server, headers, client) {
        Ok(caller) => caller,
        Err(refusal) => return *refusal,
    };
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
    let (principal, roles) = (caller.principal.clone(), caller.roles.clone());
    let mut hints = TransportHints::from_headers(|name| header_str(headers, name));
    hints.client = client;
    let session = match find_or_open_session(
        front,
        server,
        headers,
        &hints,
        &incoming,
        header_version,
        caller,
    )
    .await
    {
        Ok(session) => session,
        Err(response) => return response,
    };
    let opened_now = is_initialize(&incoming);
    // Roles as of this request (its token, the policy in force), for the session's principal;
    // a session attributed to a configured principal that a reload renamed keeps its own.
    if principal == session.caller().principal {
        hints.roles = Some(roles);
    }
    let progress = incoming
        .progress_token()
        .filter(|_| accepts(headers, "text/event-stream"))
        .and_then(|token| session.route_progress(&token));
    let mut response = match progress {
        Some(route) => answer_with_progress(proxy, &session, incoming, hints, route),
        None => match handle_to_completion(proxy.clone(), session.clone(), incoming, hints).await {
            Ok(None) => StatusCode::ACCEPTED.into_response(),
            Ok(Some(answer)) if accepts(headers, "application/json") => {
                axum::Json(answer).into_response()
            }
            Ok(Some(answer)) => sse_of_values(answer),
            Err(response) => return *response,
        },
    };
    if opened_now && let Ok(value) = HeaderValue::from_str(&session.id) {
        response.headers_mut().insert(SESSION_HEADER, value);
    }
    response
}

/// Runs the pipeline to its end even when the agent drops the connection first (the server's
/// answer awaited, the outcome recorded, the call's span closed): Streamable HTTP says a
/// disconnection is not a cancellation; an agent that wants the work stopped sends
/// `notifications/cancelled`. The pipeline runs in the connection's own task, and moves to a
/// task of its own only if that one is dropped, so an ordinary request costs no hand-off. A
/// panic in the pipeline is answered 500, and the daemon serves on.
async fn handle_to_completion(
    proxy: Arc<Proxy>,
    session: Arc<AgentSession>,
    incoming: Incoming,
    hints: TransportHints,
) -> Result<Option<Value>, Box<Response>> {
    let handling =
        async move { crate::catch_panic(proxy.handle(&session, incoming, &hints)).await };
    FinishOnDrop(Some(Box::pin(handling)))
        .await
        .map_err(pipeline_panicked)
}

fn pipeline_panicked(message: String) -> Box<Response> {
    tracing::error!(panic = %message, "the request pipeline failed");
    Box::new(rpc_error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        RpcError::new(
            None,
            codes::INTERNAL_ERROR,
            "mcp-guard failed handling the request",
        ),
    ))
}

/// A future that, dropped before it completes, finishes in a task of its own.
struct FinishOnDrop<F: Future + Send + 'static>(Option<Pin<Box<F>>>)
where
    F::Output: Send;

impl<F: Future + Send + 'static> Future for FinishOnDrop<F>
where
    F::Output: Send,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<F::Output> {
        let running = self.0.as_mut().expect("polled after completion");
        let output = std::task::ready!(running.as_mut().poll(context));
        self.0 = None;
        Poll::Ready(output)
    }
}

impl<F: Future + Send + 'static> Drop for FinishOnDrop<F>
where
    F::Output: Send,
{
    fn drop(&mut self) {
        if let Some(unfinished) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(unfinished);
        }
    }
}

fn is_initialize(incoming: &Incoming) -> bool {
    matches!(incoming, Incoming::Single(Message::Request(r)) if r.method == "initialize")
}

/// The session a POST belongs to, opening one for `initialize` or for stateless traffic. A
/// session serves only the principal that opened it.
async fn find_or_open_session(
    front: &Front,
    server: &str,
    headers: &HeaderMap,
    hints: &TransportHints,
    incoming: &Incoming,
    header_version: Option<&str>,
    caller: Caller,
) -> Result<Arc<AgentSession>, Response> {
    let proxy = &front.proxy;
    let opening = || {
        let first = match incoming {
            Incoming::Single(Message::Request(request)) => request.params.as_ref(),
            _ => None,
        };
        OpeningContext::of_request(first, hints)
    };
    if is_initialize(incoming) {
        return open(front, server, caller, None, &opening()).await;
    }
    if let Some(id) = header_str(headers, SESSION_HEADER) {
        return match proxy.session(id).await {
            Some(session) if session.server == server && is_owner(front, &session, &caller) => {
                Ok(session)
            }
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
    let key = header_str(headers, GUARD_SESSION_HEADER)
        .map(str::to_owned)
        .or_else(|| revision::meta_session(incoming))
        .unwrap_or_else(|| format!("{}-{server}", caller.principal));
    // Scoped by server: the same key on another server's endpoint is another session.
    let id = format!("stateless-{server}-{}", sanitise(&key));
    // Concurrent first requests under one key wait for the one that opens the session.
    let _opening = proxy.opening(&id).await;
    if let Some(session) = proxy.session(&id).await {
        if !is_owner(front, &session, &caller) {
            return Err(rpc_error_response(
                StatusCode::FORBIDDEN,
                RpcError::new(
                    None,
                    codes::INVALID_REQUEST,
                    "this session belongs to another principal",
                ),
            ));
        }
        return Ok(session);
    }
    open(front, server, caller, Some(id), &opening()).await
}

async fn open(
    front: &Front,
    server: &str,
    caller: Caller,
    id: Option<String>,
    opening: &OpeningContext,
) -> Result<Arc<AgentSession>, Response> {
    front
        .proxy
        .open_session(server, caller, id, opening)
        .await
        .map_err(|e| match e {
            ProxyError::TooManySessions(limit) => {
                tracing::warn!(server, error = %limit, "session refused");
                let status = match limit {
                    SessionLimit::Principal { .. } => StatusCode::TOO_MANY_REQUESTS,
                    SessionLimit::Daemon { .. } => StatusCode::SERVICE_UNAVAILABLE,
                };
                let message = format!(
                    "too many sessions: {limit}; end one (DELETE) or wait for an idle one to expire"
                );
                rpc_error_response(
                    status,
                    RpcError::new(None, codes::TOO_MANY_SESSIONS, message),
                )
            }
            ProxyError::AuditUnavailable(e) => rpc_error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                RpcError::new(
                    None,
                    codes::AUDIT_UNAVAILABLE,
                    format!("mcp-guard refused the session: the audit log cannot be written ({e})"),
                ),
            ),
            e => {
                tracing::error!(server, error = %e, "opening a session");
                rpc_error_response(
                    StatusCode::BAD_GATEWAY,
                    RpcError::new(
                        None,
                        codes::UPSTREAM_ERROR,
                        format!("could not start the server: {e}"),
                    ),
                )
            }
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

/// The bearer token's identity, timed in `mcp_guard_authentication_duration_seconds`.
fn authenticate(
    front: &Front,
    verifier: &Verifier,
    server: &str,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Result<VerifiedIdentity, AuthError> {
    let _timer = front.proxy.metrics.authentication_duration.start_timer();
    verifier.authenticate(server, header_str(headers, "authorization"), client)
}

/// The caller of this request, or the answer refusing it:
/// - with `identity.jwt`, the principal and roles of the bearer token (401 without a valid
///   one, or with one meant for another server than `server`; 429 when `client`, the address
///   the request came from, has had too many tokens refused; 503 when the policy's keys could
///   not be loaded);
/// - with `identity.trust_header`, the principal the `MCP-Guard-Principal` header names;
/// - otherwise (and without that header) the policy's `daemon.principal`.
///
/// Roles the policy's `principals` gives the principal are added to the token's. Context
/// values come from `MCP-Guard-Context: key=value; key=value`.
fn caller_for(
    front: &Front,
    server: &str,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Result<Caller, Box<Response>> {
    let model = front.proxy.model();
    let (principal, mut roles) = match Verifier::for_policy(&model) {
        Some(Ok(verifier)) => match authenticate(front, &verifier, server, headers, client) {
            Ok(identity) => (identity.principal, identity.roles),
            Err(error) => {
                // Counted, not audited: unauthenticated senders must not be able to grow the
                // audit log.
                front
                    .proxy
                    .metrics
                    .auth_failures
                    .with_label_values(&[error.kind()])
                    .inc();
                tracing::debug!(reason = %error, "request refused: no valid bearer token");
                return Err(Box::new(unauthorised(&verifier, &error, server)));
            }
        },
        Some(Err(_)) => {
            return Err(Box::new(rpc_error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                RpcError::new(
                    None,
                    codes::INTERNAL_ERROR,
                    "tokens cannot be verified: the policy's identity keys could not be loaded",
                ),
            )));
        }
        None => {
            let claimed =
                header_str(headers, GUARD_PRINCIPAL_HEADER).filter(|_| model.identity.trust_header);
            match claimed {
                Some(name) if !crate::policy::is_valid_principal_name(name) => {
                    return Err(Box::new(rpc_error_response(
                        StatusCode::BAD_REQUEST,
                        RpcError::new(
                            None,
                            codes::INVALID_REQUEST,
                            "MCP-Guard-Principal is not a valid principal name",
                        ),
                    )));
                }
                Some(name) => (name.to_owned(), Vec::new()),
                None => (
                    model
                        .daemon
                        .principal
                        .clone()
                        .unwrap_or_else(|| "anonymous".into()),
                    Vec::new(),
                ),
            }
        }
    };
    if let Some(declared) = model.principals.get(&principal) {
        for role in &declared.roles {
            if !roles.contains(role) {
                roles.push(role.clone());
            }
        }
    }
    let context: BTreeMap<String, String> = header_str(headers, GUARD_CONTEXT_HEADER)
        .map(crate::identity::parse_context_header)
        .unwrap_or_default();
    Ok(Caller {
        principal,
        roles,
        context,
    })
}

/// 401 with the Bearer challenge (and the protected-resource metadata URL, if configured); 429
/// with `Retry-After` for an address that has had too many tokens refused (or while all have).
fn unauthorised(verifier: &Verifier, error: &AuthError, server: &str) -> Response {
    if let AuthError::TooManyRefused(seconds) | AuthError::TooManyRefusedInAll(seconds) = error {
        let mut response = rpc_error_response(
            StatusCode::TOO_MANY_REQUESTS,
            RpcError::new(None, codes::INVALID_REQUEST, error.to_string()),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(*seconds));
        return response;
    }
    let mut response = rpc_error_response(
        StatusCode::UNAUTHORIZED,
        RpcError::new(
            None,
            codes::INVALID_REQUEST,
            format!("authentication failed: {error}"),
        ),
    );
    if let Ok(challenge) = HeaderValue::from_str(&verifier.challenge(error, server)) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, challenge);
    }
    response
}

/// Whether `caller` may use `session`. Where principals come from the requests (a bearer
/// token, or the development header), a session answers only the principal that opened it: a
/// valid token of someone else does not reach it. A configured `daemon.principal` binds
/// nothing, so that open sessions outlive a reload that changes it.
fn is_owner(front: &Front, session: &AgentSession, caller: &Caller) -> bool {
    let identity = &front.proxy.model().identity;
    let per_request = identity.jwt.is_some() || identity.trust_header;
    !per_request || session.caller().principal == caller.principal
}

/// The answer to a request with a progress token as SSE: each progress notification the
/// server sends for it as it comes, then the answer. The pipeline runs as for any request
/// (to completion, even if the agent goes); a panic becomes an internal error event.
fn answer_with_progress(
    proxy: &Arc<Proxy>,
    session: &Arc<AgentSession>,
    incoming: Incoming,
    hints: TransportHints,
    route: ProgressRoute,
) -> Response {
    let request_id = match &incoming {
        Incoming::Single(Message::Request(request)) => Some(request.id.clone()),
        Incoming::Single(_) | Incoming::Batch(_) => None,
    };
    let answer =
        handle_to_completion(proxy.clone(), session.clone(), incoming, hints).map(|outcome| {
            outcome.unwrap_or_else(|_panicked| {
                Some(RpcError::new(request_id, codes::INTERNAL_ERROR, "internal error").to_value())
            })
        });
    let messages = route.ahead_of(Box::pin(answer));
    let events = futures_util::stream::unfold(Some(messages), |state| async move {
        let mut messages = state?;
        let (message, more) = messages.next_message().await?;
        let event: Result<Event, Infallible> =
            Ok(Event::default().event("message").data(message.to_string()));
        Some((event, more.then_some(messages)))
    });
    Sse::new(events).into_response()
}

/// The answer as a one-event SSE stream (a batch answer stays one JSON array).
fn sse_of_values(answer: Value) -> Response {
    let event: Result<Event, Infallible> =
        Ok(Event::default().event("message").data(answer.to_string()));
    Sse::new(futures_util::stream::iter([event])).into_response()
}

async fn get(front: &Front, server: &str, headers: &HeaderMap, client: Option<IpAddr>) -> Response {
    let caller = match caller_for(front, server, headers, client) {
        Ok(caller) => caller,
        Err(refusal) => return *refusal,
    };
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
        // Without a session, only POST is served here.
        return with_allow(
            rpc_error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                RpcError::new(
                    None,
                    codes::INVALID_REQUEST,
                    "GET needs an Mcp-Session-Id (stateless revisions have no GET stream)",
                ),
            ),
            "POST",
        );
    };
    let Some(session) = front
        .proxy
        .session(id)
        .await
        .filter(|s| s.server == server && is_owner(front, s, &caller))
    else {
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
    let stopping = tokio_stream::wrappers::WatchStream::new(front.stopping.clone());
    Sse::new(OutboxStream {
        outbox: Some(outbox),
        session: Arc::downgrade(&session),
        ended,
        stopping,
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
    stopping: tokio_stream::wrappers::WatchStream<bool>,
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
        while let std::task::Poll::Ready(state) = self.stopping.poll_next_unpin(cx) {
            if state != Some(false) {
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

async fn delete(
    front: &Front,
    server: &str,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Response {
    let caller = match caller_for(front, server, headers, client) {
        Ok(caller) => caller,
        Err(refusal) => return *refusal,
    };
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
        Some(session) if session.server == server && is_owner(front, &session, &caller) => {
            front.proxy.end_session(id).await;
            StatusCode::NO_CONTENT.into_response()
        }
        _ => rpc_error_response(
            StatusCode::NOT_FOUND,
            RpcError::new(None, codes::INVALID_REQUEST, "unknown or ended session"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::FinishOnDrop;
    use tokio::sync::oneshot;

    /// What the pipeline relies on when an agent disconnects: the work goes on after the
    /// connection's task drops it, and finishes.
    #[tokio::test]
    async fn a_dropped_future_finishes_in_a_task_of_its_own() {
        let (go, wait) = oneshot::channel::<()>();
        let (done, finished) = oneshot::channel::<&str>();
        let work = FinishOnDrop(Some(Box::pin(async move {
            let _ = wait.await;
            let _ = done.send("finished");
        })));
        // Dropped while waiting: the agent's connection went away mid-call.
        let dropped = tokio::time::timeout(std::time::Duration::from_millis(10), work).await;
        assert!(
            dropped.is_err(),
            "the work cannot finish before it is let go"
        );
        go.send(()).expect("the work is still waiting");
        assert_eq!(finished.await, Ok("finished"));
    }

    #[tokio::test]
    async fn a_future_that_completes_gives_its_output() {
        assert_eq!(FinishOnDrop(Some(Box::pin(async { 7 }))).await, 7);
    }
}
