//! The per-message pipeline between an agent and its server: authorise every operation
//! against the compiled policy, validate tool arguments, forward what is allowed, filter list
//! results to what the caller may use, and judge what the server sends on its own.
//!
//! Fails closed: a refusal, or any failure on the way (policy, parse, upstream), answers the
//! agent with a JSON-RPC error and nothing reaches the server.
//!
//! A server in `shadow` or `learn` mode (see [`Mode`]) gets every judgement made as under
//! `enforce`, but a refusal of the policy (a rule, a hidden tool, arguments its schema or the
//! rule refuses) is recorded as `would_deny` and the request goes on, and lists are not
//! filtered. What makes a message unprocessable (malformed, a failing server, an unwritable
//! audit log) is refused in every mode.

mod catalog;
pub mod opening;
pub mod record;
pub mod session;
pub mod shared;
mod slots;
mod visibility;

pub use slots::SessionLimit;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::audit::{AuditDecision, Latency};
use crate::egress::Egress;
use crate::identity::{CallIdentity, OpeningContext, TransportHints, stamp_notification};
use record::{DecisionFacts, Recorder};

/// Where server processes start: in a guarded cgroup of this daemon's egress enforcement, in
/// one a running daemon hands out over its control socket (the stdio front), or unconfined.
#[derive(Clone)]
pub enum Placement {
    Local(Arc<Mutex<Egress>>),
    Remote(std::path::PathBuf),
    /// No cgroup (a daemon run with `--no-egress`).
    Unconfined,
    /// No cgroup, and the server is killed if this process dies (a stdio front with no
    /// daemon). Only for a single-threaded runtime: the kernel sends that signal when the
    /// *thread* that started the server ends.
    UnconfinedEndingWithThisProcess,
}
use crate::mcp::jsonrpc::{
    self, Id, Incoming, Limits, Message, Notification, Request, RpcError, codes,
};
use crate::mcp::revision;
use crate::metrics::Metrics;
use crate::policy::{CompiledPolicy, DecisionRequest, Effect, Isolation, Mode, Policy};
use crate::upstream::UpstreamError;
pub use crate::upstream::progress::{ProgressRoute, ProgressThenAnswer};
pub use session::{AgentSession, CallSpan, Caller};
use visibility::{
    check_completion_reference, check_task_reference, could_use, task_created_by, task_named_in,
};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no server named {0:?} in the policy")]
    UnknownServer(String),
    #[error("server {0:?} has neither a command nor a url")]
    NotSpawnable(String),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Egress(#[from] crate::egress::EgressError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("placing the server process: {0}")]
    Placement(String),
    #[error("the account the server runs as: {0}")]
    Account(String),
    #[error("too many sessions: {0}")]
    TooManySessions(#[from] SessionLimit),
    #[error("the audit log cannot be written ({0})")]
    AuditUnavailable(#[from] record::RecordError),
    #[error("the daemon is stopping")]
    Stopping,
}

/// Methods that list things the policy filters, and the method that uses each listed item.
const LISTS: [(&str, &str, &str, &str); 4] = [
    ("tools/list", "tools", "tools/call", "name"),
    ("resources/list", "resources", "resources/read", "uri"),
    (
        "resources/templates/list",
        "resourceTemplates",
        "resources/read",
        "uriTemplate",
    ),
    ("prompts/list", "prompts", "prompts/get", "name"),
];

pub struct Proxy {
    policy: RwLock<Arc<CompiledPolicy>>,
    model: RwLock<Arc<Policy>>,
    placement: Placement,
    recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    sessions: Mutex<HashMap<String, Arc<AgentSession>>>,
    /// The sessions open or being opened, counted against the daemon's limits.
    session_slots: std::sync::Mutex<slots::SessionSlots>,
    /// Processes of servers with `"isolation": "shared"`, started with their first session.
    shared: Mutex<HashMap<String, Arc<shared::SharedServer>>>,
    /// Call spans of sessions that are not (or no longer) here: sessions of stdio fronts,
    /// which report their calls over the control socket, and ended sessions, whose late
    /// kernel events still need their calls. With when each was last touched.
    spans_elsewhere: std::sync::Mutex<HashMap<String, (session::CallSpans, Instant)>>,
    /// Session ids being looked up or opened by a front (see [`Proxy::opening`]).
    opening: opening::OpeningGates,
}

/// How long spans of a session that is not here are kept after their last change.
const SPANS_ELSEWHERE_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// The same for a session with a call still running: a long call's connections still need
/// it, but a front killed mid-call never reports its end.
const RUNNING_SPANS_ELSEWHERE_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

fn forget_old_spans(elsewhere: &mut HashMap<String, (session::CallSpans, Instant)>, now: Instant) {
    elsewhere.retain(|_, (spans, touched)| {
        let ttl = if spans.any_running() {
            RUNNING_SPANS_ELSEWHERE_TTL
        } else {
            SPANS_ELSEWHERE_TTL
        };
        now.saturating_duration_since(*touched) < ttl
    });
}

impl Proxy {
    pub fn new(
        policy: Policy,
        compiled: CompiledPolicy,
        placement: Placement,
        recorder: Recorder,
        metrics: Arc<Metrics>,
    ) -> Arc<Proxy> {
        let limits = Limits {
            max_bytes: policy.daemon.max_message_bytes,
            max_batch: policy.daemon.max_batch_size,
            max_depth: policy.daemon.max_json_depth,
        };
        Arc::new(Proxy {
            policy: RwLock::new(Arc::new(compiled)),
            model: RwLock::new(Arc::new(policy)),
            placement,
            recorder,
            metrics,
            limits,
            sessions: Mutex::new(HashMap::new()),
            session_slots: Default::default(),
            shared: Mutex::new(HashMap::new()),
            spans_elsewhere: std::sync::Mutex::new(HashMap::new()),
            opening: opening::OpeningGates::default(),
        })
    }

    pub fn policy(&self) -> Arc<CompiledPolicy> {
        self.policy.read().expect("policy lock").clone()
    }

    pub fn model(&self) -> Arc<Policy> {
        self.model.read().expect("policy lock").clone()
    }

    /// How the policy in force applies to `server` (read per message, so a reload changes
    /// it from the next message on). A server the policy does not name is enforced.
    pub fn mode_of(&self, server: &str) -> Mode {
        let model = self.model.read().expect("policy lock");
        model
            .servers
            .get(server)
            .map_or(Mode::Enforce, |s| s.effective_mode(model.mode))
    }

    /// Installs a new policy generation. Sessions forget the tool lists they learned, so the
    /// next list or call is filtered by the new rules.
    pub async fn replace_policy(&self, policy: Policy, compiled: CompiledPolicy) {
        *self.policy.write().expect("policy lock") = Arc::new(compiled);
        *self.model.write().expect("policy lock") = Arc::new(policy);
        for session in self.sessions.lock().await.values() {
            session.forget_catalog().await;
        }
    }

    pub async fn session(&self, id: &str) -> Option<Arc<AgentSession>> {
        self.sessions.lock().await.get(id).cloned()
    }

    /// Ends every session idle for longer than `max_idle` (see
    /// `daemon.session_idle_timeout_seconds`); returns how many it ended.
    pub async fn end_idle_sessions(&self, max_idle: std::time::Duration) -> usize {
        let now = session::monotonic_ns();
        let sessions: Vec<Arc<AgentSession>> =
            self.sessions.lock().await.values().cloned().collect();
        let mut ended = 0;
        for session in sessions {
            let Some(idle) = session.idle_for(now).await else {
                continue;
            };
            if idle > max_idle && self.end_this_session(&session, "idle").await {
                tracing::info!(session = %session.id, server = %session.server,
                    idle_seconds = idle.as_secs(), "ended an idle session");
                ended += 1;
            }
        }
        ended
    }

    /// Makes requests that may open the session `id` (one named by the agent, not given by
    /// mcp-guard) wait for each other: while the pass is held, the session is looked up and,
    /// if absent, opened once.
    pub async fn opening(&self, id: &str) -> opening::OpeningPass {
        self.opening.enter(id).await
    }

    /// Ends the session open under `id` (the agent's DELETE).
    pub async fn end_session(&self, id: &str) -> bool {
        self.end_session_where(id, |_| true, "delete").await
    }

    /// Ends `session` if it is still the one open under its id: an agent-named (stateless)
    /// id may have been ended and opened again meanwhile, and the new session is not this
    /// one's to end. `reason` goes into its `end` record.
    pub(crate) async fn end_this_session(&self, session: &Arc<AgentSession>, reason: &str) -> bool {
        self.end_session_where(&session.id, |open| Arc::ptr_eq(open, session), reason)
            .await
    }

    async fn end_session_where(
        &self,
        id: &str,
        is_it: impl Fn(&Arc<AgentSession>) -> bool,
        reason: &str,
    ) -> bool {
        let removed = {
            let mut sessions = self.sessions.lock().await;
            let removed = if sessions.get(id).is_some_and(is_it) {
                sessions.remove(id)
            } else {
                None
            };
            // Under the sessions lock: a kernel event attributed meanwhile finds the session's
            // calls either live or kept, never neither while its processes are being ended.
            if let Some(session) = &removed {
                self.keep_spans_of_ended(session);
            }
            removed
        };
        match removed {
            Some(session) => {
                self.give_back_slot(&session);
                session.end().await;
                self.recorder
                    .session_event_because(&session, "end", Some(reason))
                    .await;
                self.metrics.active_sessions.dec();
                true
            }
            None => false,
        }
    }

    /// Ends every session (daemon shutdown): children are stopped, cgroups released.
    pub async fn end_all_sessions(&self) {
        let sessions: Vec<_> = self.sessions.lock().await.drain().collect();
        for (_, session) in sessions {
            self.give_back_slot(&session);
            session.end().await;
            self.recorder
                .session_event_because(&session, "end", Some("shutdown"))
                .await;
            self.metrics.active_sessions.dec();
        }
        let mut shared = self.shared.lock().await;
        for (_, server) in shared.drain() {
            server.end().await;
        }
    }

    /// Starts a session of `server` for `caller`: spawns the server process in its own guarded
    /// cgroup. Refused when the daemon's or the caller's limit of open sessions is reached.
    ///
    /// The opening runs to its end in a task of its own: the caller (a client's request) may
    /// be dropped midway, and a session half opened (its slot taken, its start on record)
    /// would never be given back. One opened for a client that left ends as idle.
    pub async fn open_session(
        self: &Arc<Self>,
        server: &str,
        caller: Caller,
        id: Option<String>,
        opening: &OpeningContext,
    ) -> Result<Arc<AgentSession>, ProxyError> {
        let proxy = Arc::clone(self);
        let (server, opening) = (server.to_owned(), opening.clone());
        let opening = tokio::spawn(async move {
            proxy
                .open_session_to_the_end(&server, caller, id, &opening)
                .await
        });
        match opening.await {
            Ok(opened) => opened,
            Err(failed) if failed.is_panic() => std::panic::resume_unwind(failed.into_panic()),
            Err(_) => Err(ProxyError::Stopping),
        }
    }

    async fn open_session_to_the_end(
        self: &Arc<Self>,
        server: &str,
        caller: Caller,
        id: Option<String>,
        opening: &OpeningContext,
    ) -> Result<Arc<AgentSession>, ProxyError> {
        let principal = caller.principal.clone();
        if let Err(limit) = self.take_slot(&principal) {
            self.recorder
                .session_refused(server, &principal, &limit)
                .await;
            return Err(limit.into());
        }
        let opened = self.start_session(server, caller, id, opening).await;
        if opened.is_err() {
            self.slots().give_back(&principal);
        }
        opened
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, slots::SessionSlots> {
        self.session_slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a session slot for `principal`, counting a refusal.
    fn take_slot(&self, principal: &str) -> Result<(), SessionLimit> {
        let taken = self.slots().take(principal, &self.model().daemon);
        if let Err(limit) = &taken {
            self.metrics
                .sessions_refused
                .with_label_values(&[limit.reason()])
                .inc();
        }
        taken
    }

    fn give_back_slot(&self, session: &AgentSession) {
        self.slots().give_back(&session.caller().principal);
    }

    async fn start_session(
        self: &Arc<Self>,
        server: &str,
        caller: Caller,
        id: Option<String>,
        opening: &OpeningContext,
    ) -> Result<Arc<AgentSession>, ProxyError> {
        let model = self.model();
        let server_policy = model
            .servers
            .get(server)
            .ok_or_else(|| ProxyError::UnknownServer(server.to_owned()))?;
        let target = match (&server_policy.command, &server_policy.url) {
            (Some(command), _) => session::Target::Command(session::Program {
                command,
                env: &server_policy.env,
                account: server_policy
                    .account()
                    .map_err(|(field, reason)| ProxyError::Account(format!("{field}: {reason}")))?,
                max_message_bytes: model.daemon.max_server_message_bytes,
            }),
            (None, Some(url)) => session::Target::Url {
                url,
                options: crate::upstream::http::HttpOptions {
                    tls_ca_file: server_policy.tls_ca_file.as_deref(),
                    resume_get_stream: server_policy.resume_get_stream,
                    headers: &server_policy.headers,
                    max_message_bytes: model.daemon.max_server_message_bytes,
                },
            },
            (None, None) => return Err(ProxyError::NotSpawnable(server.to_owned())),
        };
        let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let launch = session::Launch {
            target,
            request_timeout: server_policy.request_timeout(),
            answer_poll: model.daemon.answer_poll(),
        };
        if let (Isolation::Shared, session::Target::Command(_)) =
            (server_policy.isolation, &launch.target)
        {
            return self.open_shared_session(server, id, caller, launch).await;
        }
        let session = session::start(
            self,
            server,
            id.clone(),
            caller,
            opening,
            launch,
            &self.placement,
        )
        .await?;
        self.admit_started(id, session).await
    }

    /// Puts a started session on record and in service. One whose start cannot be recorded
    /// is ended (its server process stopped) and refused: nothing runs unrecorded.
    async fn admit_started(
        &self,
        id: String,
        session: Arc<AgentSession>,
    ) -> Result<Arc<AgentSession>, ProxyError> {
        if let Err(e) = self.recorder.session_started(&session).await {
            tracing::error!(session = %session.id, error = %e, "audit: session start not written; session refused");
            session.end().await;
            return Err(e.into());
        }
        self.sessions.lock().await.insert(id, session.clone());
        self.metrics.active_sessions.inc();
        Ok(session)
    }

    /// A session on `server`'s shared process. It joins a process that is not retired, and is
    /// on record before that process can be: a session that joined a process which exited
    /// meanwhile would otherwise miss the retirement's ending of its sessions and stay open
    /// on a dead process.
    async fn open_shared_session(
        self: &Arc<Self>,
        server: &str,
        id: String,
        caller: Caller,
        launch: session::Launch<'_>,
    ) -> Result<Arc<AgentSession>, ProxyError> {
        loop {
            let shared = self.shared_server(server, launch).await?;
            let Some(_joining) = shared.admission().await else {
                // Retired since it was looked up: the next lookup starts a new process.
                continue;
            };
            let session = shared.join(server, id.clone(), caller.clone());
            return self.admit_started(id, session).await;
        }
    }

    async fn shared_server(
        self: &Arc<Self>,
        server: &str,
        launch: session::Launch<'_>,
    ) -> Result<Arc<shared::SharedServer>, ProxyError> {
        let mut shared = self.shared.lock().await;
        if let Some(existing) = shared.get(server) {
            return Ok(existing.clone());
        }
        let started = shared::SharedServer::start(self, server, launch, &self.placement).await?;
        shared.insert(server.to_owned(), started.clone());
        Ok(started)
    }

    /// A shared server's process exited: the next session of `server` starts a new one, and
    /// the sessions on the old one end, as a session whose own process exited does.
    pub(crate) async fn retire_shared_server(
        &self,
        server: &str,
        exited: &Arc<shared::SharedServer>,
    ) {
        {
            let mut shared = self.shared.lock().await;
            if shared.get(server).is_some_and(|s| Arc::ptr_eq(s, exited)) {
                // Under the lock, before a new process can start in the same cgroup.
                exited.end().await;
                shared.remove(server);
            }
        }
        // After this, no session joins it; those that did are in `sessions` by now.
        exited.close_admission().await;
        let on_it: Vec<Arc<AgentSession>> = self
            .sessions
            .lock()
            .await
            .values()
            .filter(|s| s.shared().is_some_and(|s| Arc::ptr_eq(s, exited)))
            .cloned()
            .collect();
        for session in &on_it {
            self.end_this_session(session, "server_exited").await;
        }
        tracing::warn!(
            server,
            sessions = on_it.len(),
            "the shared server process exited; its sessions are ended, the next starts a new one"
        );
    }

    /// Every session of `server` forgets its tool list (a shared server's list changed).
    pub(crate) async fn forget_catalogs_of(&self, server: &str) {
        for session in self.sessions.lock().await.values() {
            if session.server == server {
                session.forget_catalog().await;
            }
        }
    }

    /// A call of a session that runs elsewhere (a stdio front) started or ended.
    pub fn note_external_span(&self, session: &str, span: CallSpan) {
        let mut elsewhere = self.spans_elsewhere.lock().expect("spans lock");
        let (spans, touched) = elsewhere
            .entry(session.to_owned())
            .or_insert_with(|| (session::CallSpans::default(), Instant::now()));
        *touched = Instant::now();
        match span.ended_ns {
            None => spans.begin(span),
            Some(ended) => spans.end(&span.call_id, ended),
        }
    }

    fn keep_spans_of_ended(&self, session: &AgentSession) {
        let mut elsewhere = self.spans_elsewhere.lock().expect("spans lock");
        forget_old_spans(&mut elsewhere, Instant::now());
        elsewhere.insert(session.id.clone(), (session.take_spans(), Instant::now()));
    }

    /// Forgets the spans of sessions elsewhere that nothing has touched for long (called
    /// periodically: a daemon serving only stdio fronts ends no session of its own).
    pub fn forget_old_spans(&self) {
        let mut elsewhere = self.spans_elsewhere.lock().expect("spans lock");
        forget_old_spans(&mut elsewhere, Instant::now());
    }

    /// The calls of `session` that were running at `ts_ns` (CLOCK_MONOTONIC).
    pub async fn calls_at(&self, session: &str, ts_ns: u64) -> Vec<CallSpan> {
        {
            // Read under the sessions lock, under which an ending session's spans move to
            // `spans_elsewhere`: they are found in one place or the other.
            let sessions = self.sessions.lock().await;
            if let Some(live) = sessions.get(session) {
                return live.calls_at(ts_ns);
            }
        }
        let elsewhere = self.spans_elsewhere.lock().expect("spans lock");
        elsewhere
            .get(session)
            .map(|(spans, _)| spans.covering(ts_ns))
            .unwrap_or_default()
    }

    /// Notes, in arrival order and before handling starts, what the order of an agent's
    /// messages means to the pipeline: an `initialize` makes later requests wait for its
    /// answer. Fronts that handle messages concurrently call it as each message arrives.
    pub fn note_arrival(&self, session: &AgentSession, incoming: &Incoming) {
        let is_initialize =
            |message: &Message| matches!(message, Message::Request(r) if r.method == "initialize");
        let initializes = match incoming {
            Incoming::Single(message) => is_initialize(message),
            Incoming::Batch(items) => items.iter().flatten().any(is_initialize),
        };
        if initializes {
            session.note_initialize_sent();
        }
    }

    /// Handles what an agent sent: one message or a batch. Returns what to answer (`None` when
    /// it held no request).
    pub async fn handle(
        &self,
        session: &Arc<AgentSession>,
        incoming: Incoming,
        hints: &TransportHints,
    ) -> Option<Value> {
        let _busy = session.busy();
        match incoming {
            Incoming::Single(message) => self.handle_message(session, message, hints).await,
            Incoming::Batch(items) => {
                let answers = futures_util::future::join_all(items.into_iter().map(|item| async {
                    match item {
                        Ok(message) => self.handle_message(session, message, hints).await,
                        Err(error) => Some(error.to_value()),
                    }
                }))
                .await;
                let answers: Vec<Value> = answers.into_iter().flatten().collect();
                (!answers.is_empty()).then_some(Value::Array(answers))
            }
        }
    }

    async fn handle_message(
        &self,
        session: &Arc<AgentSession>,
        message: Message,
        hints: &TransportHints,
    ) -> Option<Value> {
        match message {
            Message::Request(request) => Some(self.handle_request(session, request, hints).await),
            Message::Notification(notification) => {
                if let Err(refusal) = self
                    .authorise_notification(session, &notification, hints)
                    .await
                {
                    return Some(refusal);
                }
                self.handle_notification(session, notification).await;
                None
            }
            Message::Response(response) => {
                if !session.answers_a_server_request(&response.id) {
                    tracing::warn!(session = %session.id, id = %response.id,
                        "the agent's response answers no request of the server's that it was sent; dropped");
                    return None;
                }
                if let Err(e) = session
                    .upstream()
                    .reply(&response.id, response.outcome)
                    .await
                {
                    tracing::warn!(session = %session.id, error = %e, "forwarding the agent's response");
                }
                None
            }
        }
    }

    async fn handle_request(
        &self,
        session: &Arc<AgentSession>,
        mut request: Request,
        hints: &TransportHints,
    ) -> Value {
        // A stateless (2026-07-28) request stands alone: its answer goes back on its own HTTP
        // response, so two of them may share an id.
        let _claimed = if revision::is_stateless_request(request.params.as_ref()) {
            None
        } else {
            match session.claim_request_id(&request.id) {
                Some(claimed) => Some(claimed),
                None => {
                    return RpcError::new(
                        Some(request.id.clone()),
                        codes::INVALID_REQUEST,
                        format!(
                            "request id {} is already in use by a request of this session that is not answered yet",
                            request.id
                        ),
                    )
                    .to_value();
                }
            }
        };
        let initializing = (request.method == "initialize").then(|| session.initializing());
        if initializing.is_none() && request.method != "ping" {
            session.after_initialize().await;
        }
        let started = Instant::now();
        let mut identity = CallIdentity::for_request(request.params.as_ref(), hints);
        if identity.instruction.is_none() {
            // Fetching a task's status or result is part of the instruction that started it.
            identity.instruction =
                task_named_in(&request).and_then(|t| session.task_instruction(t));
        }
        let context = crate::identity::request_context(request.params.as_ref(), hints);
        let caller = session
            .caller()
            .for_request(hints.roles.as_deref(), context);
        let mode = self.mode_of(&session.server);
        let verdict = match self.authorise(session, &request, &caller).await {
            // Shadow and learn record what enforce would have refused, and forward it.
            Err(refusal) if refusal.by_policy && mode.lets_everything_through() => Ok(Allowed {
                rule: refusal.rule,
                reason: refusal.error.message,
                decision: AuditDecision::WouldDeny,
            }),
            verdict => verdict,
        };
        let policy_us = started.elapsed().as_micros() as u64;
        let model = self.model();
        let answer = match verdict {
            Err(refusal) => {
                let tool_listed = self
                    .log_decision(
                        session,
                        &request,
                        &identity,
                        AuditDecision::Deny,
                        &refusal.rule,
                        policy_us,
                    )
                    .await;
                let facts = DecisionFacts {
                    decision: AuditDecision::Deny,
                    rule: &refusal.rule,
                    reason: &refusal.error.message,
                    policy_us,
                    mode,
                    redact: &model.audit.redact,
                    roles: &caller.roles,
                    tool_listed,
                };
                // Refused either way; an unwritable log is counted and logged by the writer.
                let _ = self
                    .recorder
                    .decision(session, &request, &identity, facts)
                    .await;
                refusal.error.to_value()
            }
            Ok(allowed) => {
                let tool_listed = self
                    .log_decision(
                        session,
                        &request,
                        &identity,
                        allowed.decision,
                        &allowed.rule,
                        policy_us,
                    )
                    .await;
                let facts = DecisionFacts {
                    decision: allowed.decision,
                    rule: &allowed.rule,
                    reason: &allowed.reason,
                    policy_us,
                    mode,
                    redact: &model.audit.redact,
                    roles: &caller.roles,
                    tool_listed,
                };
                // Nothing is forwarded before its decision is on record.
                if let Err(e) = self
                    .recorder
                    .decision(session, &request, &identity, facts)
                    .await
                {
                    return record::audit_unavailable(&request.id, &e);
                }
                let recorded = request.clone();
                identity.stamp(
                    &mut request.params,
                    &session.server,
                    &session.id,
                    &caller.principal,
                );
                let _running = session.begin_call(&identity);
                if let Err(e) = self.recorder.call_started(session, &identity).await {
                    return record::audit_unavailable(&recorded.id, &e);
                }
                let upstream_started = Instant::now();
                let answer = self.forward(session, request, &caller).await;
                if let Some(task_id) = task_created_by(&answer) {
                    session.note_task(task_id, identity.instruction.clone());
                }
                self.recorder.call_ended(session, &identity);
                let latency = Latency {
                    policy_us: Some(policy_us),
                    upstream_us: Some(upstream_started.elapsed().as_micros() as u64),
                    total_us: Some(started.elapsed().as_micros() as u64),
                };
                // Nor is an answer returned before its outcome is.
                match self
                    .recorder
                    .outcome(session, &recorded, &identity, &answer, latency, mode)
                    .await
                {
                    Ok(()) => answer,
                    Err(e) => record::audit_unavailable(&recorded.id, &e),
                }
            }
        };
        self.metrics
            .request_duration
            .with_label_values(&[&session.server, "total"])
            .observe(started.elapsed().as_secs_f64());
        answer
    }

    /// Decides one request; `Ok` when it may go on.
    async fn authorise(
        &self,
        session: &Arc<AgentSession>,
        request: &Request,
        caller: &Caller,
    ) -> Result<Allowed, Refusal> {
        let started = Instant::now();
        let policy = self.policy();
        let params = request.params.as_ref();
        let name = target_name(&request.method, params);
        let arguments = params.and_then(|p| p.get("arguments"));
        let decision_request = DecisionRequest {
            server: &session.server,
            principal: &caller.principal,
            roles: &caller.roles,
            method: &request.method,
            name,
            arguments,
            context: &caller.context,
        };
        if request.method == "tools/call" {
            let Some(tool) = name else {
                return Err(Refusal::invalid(
                    &request.id,
                    "tools/call needs params.name",
                ));
            };
            if !policy.visible(&DecisionRequest {
                arguments: None,
                ..decision_request
            }) {
                return Err(Refusal::unknown_tool(&request.id, tool));
            }
        }
        if request.method == "completion/complete" {
            check_completion_reference(&policy, &decision_request, request)?;
        }
        check_task_reference(session, request)?;
        let decision = policy.decide(&decision_request);
        let rule = rule_label(decision.rule, decision.effect);
        self.metrics
            .request_duration
            .with_label_values(&[&session.server, "policy"])
            .observe(started.elapsed().as_secs_f64());
        let reason = decision.reason.to_string();
        if decision.effect == Effect::Deny {
            return Err(Refusal {
                rule: rule.clone(),
                by_policy: true,
                error: RpcError::new(
                    Some(request.id.clone()),
                    codes::POLICY_DENIED,
                    format!("mcp-guard refused {}: {reason}", request.method),
                )
                .with_data(json!({"rule": rule, "reason": reason})),
            });
        }
        drop(policy);
        if request.method == "tools/call" {
            let tool = name.unwrap_or_default();
            let empty = json!({});
            let arguments = arguments.unwrap_or(&empty);
            let envelope = match self.stateless_envelope(session, request).await {
                Ok(envelope) => envelope,
                Err(e) => return Err(self.upstream_failed(session, &request.id, &e.to_string())),
            };
            match session
                .check_tool_arguments(self, tool, arguments, envelope.as_ref())
                .await
            {
                Ok(()) => {}
                Err(ToolCheck::Unknown) => return Err(Refusal::unknown_tool(&request.id, tool)),
                Err(ToolCheck::Invalid(problem)) => {
                    return Err(Refusal {
                        rule,
                        by_policy: true,
                        error: RpcError::new(
                            Some(request.id.clone()),
                            codes::INVALID_PARAMS,
                            format!("arguments of {tool} do not match its inputSchema: {problem}"),
                        )
                        .with_data(json!({"reason": problem})),
                    });
                }
                Err(ToolCheck::Upstream(error)) => {
                    return Err(self.upstream_failed(session, &request.id, &error));
                }
            }
        }
        Ok(Allowed {
            rule,
            reason,
            decision: AuditDecision::Allow,
        })
    }

    async fn forward(
        &self,
        session: &Arc<AgentSession>,
        request: Request,
        caller: &Caller,
    ) -> Value {
        if revision::is_stateless_request(request.params.as_ref()) && session.shared().is_none() {
            match session.upstream_era().await {
                Ok(session::UpstreamEra::Stateful { initialize }) => {
                    return self
                        .forward_bridged(session, request, &initialize, caller)
                        .await;
                }
                Ok(session::UpstreamEra::Stateless) => {}
                Err(e) => {
                    return self
                        .upstream_failed(session, &request.id, &e.to_string())
                        .error
                        .to_value();
                }
            }
        }
        self.forward_as_is(session, request, caller).await
    }

    /// For a stateless agent's request: makes sure the server is ready (a server of the older
    /// revisions gets initialised now), and gives the `_meta` envelope mcp-guard's own
    /// requests to a stateless server must carry.
    async fn stateless_envelope(
        &self,
        session: &Arc<AgentSession>,
        request: &Request,
    ) -> Result<Option<Value>, crate::upstream::UpstreamError> {
        if !revision::is_stateless_request(request.params.as_ref()) || session.shared().is_some() {
            return Ok(None);
        }
        match session.upstream_era().await? {
            session::UpstreamEra::Stateful { .. } => Ok(None),
            session::UpstreamEra::Stateless => Ok(request
                .params
                .as_ref()
                .and_then(|p| p.get("_meta"))
                .and_then(Value::as_object)
                .map(|meta| {
                    Value::Object(
                        meta.iter()
                            .filter(|(key, _)| key.starts_with("io.modelcontextprotocol/"))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    )
                })),
        }
    }

    /// A stateless agent's request to a server that only speaks the initialize-based
    /// revisions: `server/discover` is answered from the server's initialize result, and
    /// results get the `resultType` stateless agents expect.
    async fn forward_bridged(
        &self,
        session: &Arc<AgentSession>,
        request: Request,
        initialize: &Value,
        caller: &Caller,
    ) -> Value {
        if request.method == "server/discover" {
            let mut result = json!({
                "supportedVersions": ["2026-07-28"],
                "capabilities": initialize.get("capabilities").cloned().unwrap_or(json!({})),
                "resultType": "complete",
                "_meta": {"io.modelcontextprotocol/serverInfo":
                    initialize.get("serverInfo").cloned().unwrap_or(json!({}))},
            });
            if let Some(instructions) = initialize.get("instructions") {
                result["instructions"] = instructions.clone();
            }
            return jsonrpc::result_response(&request.id, result);
        }
        let is_list = LISTS.iter().any(|(m, ..)| *m == request.method);
        let mut answer = self.forward_as_is(session, request, caller).await;
        if let Some(result) = answer.get_mut("result").and_then(Value::as_object_mut) {
            result.entry("resultType").or_insert(json!("complete"));
            if is_list {
                // Lists are cacheable results in the stateless revision; an older server says
                // nothing about caching, so nothing may be cached.
                result.entry("ttlMs").or_insert(json!(0));
                result.entry("cacheScope").or_insert(json!("private"));
            }
        }
        answer
    }

    async fn forward_as_is(
        &self,
        session: &Arc<AgentSession>,
        request: Request,
        caller: &Caller,
    ) -> Value {
        let started = Instant::now();
        let outcome = match (session.shared(), request.method.as_str()) {
            // A shared process is initialised once; later sessions get the same answer.
            (Some(shared), "initialize") => shared.initialize(request.params).await,
            // The process logs for every session, and its logs reach none (see
            // `proxy::shared`): one agent's level must not change what it logs for all.
            (Some(_), "logging/setLevel") => Ok(Ok(json!({}))),
            // One subscription per URI on the process, whoever of its sessions asked.
            (Some(shared), "resources/subscribe" | "resources/unsubscribe") => {
                shared
                    .change_subscription(session, &request.id, &request.method, request.params)
                    .await
            }
            _ => {
                session
                    .call_upstream(&request.id, &request.method, request.params)
                    .await
            }
        };
        self.metrics
            .request_duration
            .with_label_values(&[&session.server, "upstream"])
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(mut result)) => {
                if session.shared().is_some() && request.method == "tasks/list" {
                    session.keep_own_tasks(&mut result);
                }
                match self
                    .filter_list(session, caller, &request.method, &mut result)
                    .await
                {
                    Ok(()) => jsonrpc::result_response(&request.id, result),
                    // A list the policy cannot filter is not passed on unfiltered.
                    Err(violation) => self
                        .upstream_failed(session, &request.id, &violation)
                        .error
                        .to_value(),
                }
            }
            Ok(Err(error)) => json!({"jsonrpc": "2.0", "id": request.id, "error": error}),
            Err(e) => self
                .upstream_failed(session, &request.id, &e.to_string())
                .error
                .to_value(),
        }
    }

    /// Keeps only the items `caller` may use (first page or later: each page is filtered).
    /// Errs when the server's answer is not a list of the expected shape (a protocol
    /// violation). The session learns every tool's schema from a tools/list page, visible or
    /// not: whether a caller may call a tool is the policy's question, asked per call.
    pub(super) async fn filter_list(
        &self,
        session: &Arc<AgentSession>,
        caller: &Caller,
        method: &str,
        result: &mut Value,
    ) -> Result<(), String> {
        let Some((_, field, use_method, key)) = LISTS.iter().find(|(m, ..)| *m == method) else {
            return Ok(());
        };
        let Some(items) = result.get_mut(*field).and_then(Value::as_array_mut) else {
            return Err(format!(
                "the server's {method} result has no `{field}` array"
            ));
        };
        if method == "tools/list" {
            session.learn_tools(items).await;
        }
        if self.mode_of(&session.server).lets_everything_through() {
            // The agent sees what it would see without mcp-guard.
            return Ok(());
        }
        let policy = self.policy();
        items.retain(|item| {
            item.get(*key)
                .and_then(Value::as_str)
                .is_some_and(|name| could_use(&policy, session, caller, use_method, name))
        });
        Ok(())
    }

    /// The refusal of a request because its server failed (`-32011`), counted in
    /// `mcp_guard_upstream_errors_total`.
    fn upstream_failed(&self, session: &AgentSession, id: &Id, error: &str) -> Refusal {
        self.metrics
            .upstream_errors
            .with_label_values(&[&session.server])
            .inc();
        Refusal::upstream(id, error)
    }

    /// The verdict on `method`, which names no tool, resource or prompt (an agent's
    /// notification, a server's request to the agent), as it goes on record in `mode`; with the
    /// rule and the reason.
    fn judge_unnamed(
        &self,
        server: &str,
        caller: &Caller,
        method: &str,
        mode: Mode,
    ) -> (AuditDecision, String, String) {
        let policy = self.policy();
        let decision = policy.decide(&DecisionRequest {
            server,
            principal: &caller.principal,
            roles: &caller.roles,
            method,
            name: None,
            arguments: None,
            context: &caller.context,
        });
        let verdict = match (decision.effect, mode.lets_everything_through()) {
            (Effect::Allow, _) => AuditDecision::Allow,
            (Effect::Deny, true) => AuditDecision::WouldDeny,
            (Effect::Deny, false) => AuditDecision::Deny,
        };
        (
            verdict,
            rule_label(decision.rule, decision.effect),
            decision.reason.to_string(),
        )
    }

    /// Judges an agent's notification other than protocol plumbing like a request of its
    /// method (a rule allows it by naming the method), and records the decision. A refused
    /// one is dropped, and the agent gets the refusal with `"id": null`: a notification has
    /// no id to answer. So is one whose allowing record cannot be written.
    async fn authorise_notification(
        &self,
        session: &Arc<AgentSession>,
        notification: &Notification,
        hints: &TransportHints,
    ) -> Result<(), Value> {
        if crate::policy::is_plumbing(&notification.method) {
            return Ok(());
        }
        let started = Instant::now();
        // The records of a call describe a request; a notification's has no id to keep.
        let judged = Request {
            id: Id::Number(0),
            method: notification.method.clone(),
            params: notification.params.clone(),
        };
        let identity = CallIdentity::for_request(judged.params.as_ref(), hints);
        let context = crate::identity::request_context(judged.params.as_ref(), hints);
        let caller = session
            .caller()
            .for_request(hints.roles.as_deref(), context);
        let mode = self.mode_of(&session.server);
        let (audit_decision, rule, reason) =
            self.judge_unnamed(&session.server, &caller, &judged.method, mode);
        let policy_us = started.elapsed().as_micros() as u64;
        let tool_listed = self
            .log_decision(
                session,
                &judged,
                &identity,
                audit_decision,
                &rule,
                policy_us,
            )
            .await;
        let model = self.model();
        let facts = DecisionFacts {
            decision: audit_decision,
            rule: &rule,
            reason: &reason,
            policy_us,
            mode,
            redact: &model.audit.redact,
            roles: &caller.roles,
            tool_listed,
        };
        let recorded = self
            .recorder
            .notification_decision(session, &judged, &identity, facts)
            .await;
        if audit_decision == AuditDecision::Deny {
            return Err(RpcError::new(
                None,
                codes::POLICY_DENIED,
                format!("mcp-guard refused {}: {reason}", judged.method),
            )
            .with_data(json!({"rule": rule, "reason": reason}))
            .to_value());
        }
        recorded.map_err(|e| {
            RpcError::new(
                None,
                codes::AUDIT_UNAVAILABLE,
                format!(
                    "mcp-guard refused {}: the audit log cannot be written ({e})",
                    judged.method
                ),
            )
            .to_value()
        })
    }

    async fn handle_notification(
        &self,
        session: &Arc<AgentSession>,
        mut notification: Notification,
    ) {
        let mut cancelled = None;
        if notification.method == "notifications/cancelled" {
            // Not a request of this agent in flight: nothing upstream to cancel.
            let Some(upstream_id) = point_cancellation_upstream(session, &mut notification) else {
                return;
            };
            cancelled = Some(upstream_id);
        }
        stamp_notification(
            &mut notification.params,
            &session.server,
            &session.id,
            &session.caller().principal,
        );
        if let Err(e) = session
            .upstream()
            .notify(&notification.method, notification.params)
            .await
        {
            tracing::warn!(session = %session.id, error = %e, "forwarding a notification");
        }
        if let Some(upstream_id) = cancelled {
            // The server will not answer it: the call ends now (outcome recorded, span closed),
            // not at the request timeout.
            session.upstream().abandon(upstream_id).await;
        }
    }

    /// Judges a request the server sent to the agent (sampling, elicitation, roots): refused
    /// ones never reach the agent, and the server gets the error. Every decision is on record
    /// (tied to the agent's calls running at the time) before the request goes on; one that
    /// cannot be recorded is refused.
    pub(crate) async fn authorise_server_request(
        &self,
        session: &AgentSession,
        request: &Request,
    ) -> Result<(), RpcError> {
        let started = Instant::now();
        let mode = self.mode_of(&session.server);
        let (verdict, rule, reason) =
            self.judge_unnamed(&session.server, session.caller(), &request.method, mode);
        self.metrics
            .decisions
            .with_label_values(&[
                &session.server,
                known_method(&request.method),
                "",
                verdict.as_str(),
                &rule,
            ])
            .inc();
        let refusal = |reason: &str| {
            RpcError::new(
                Some(request.id.clone()),
                codes::POLICY_DENIED,
                format!("mcp-guard refused {}: {reason}", request.method),
            )
            .with_data(json!({"rule": rule, "reason": reason}))
        };
        let recorded = self
            .record_server_request(session, request, verdict, &rule, &reason, started, mode)
            .await;
        match (verdict, recorded) {
            (AuditDecision::Deny, _) => Err(refusal(&reason)),
            (_, Err(e)) => Err(RpcError::new(
                Some(request.id.clone()),
                codes::AUDIT_UNAVAILABLE,
                format!("mcp-guard cannot record {}: {e}", request.method),
            )),
            (AuditDecision::WouldDeny, Ok(())) => {
                tracing::info!(
                    server = %session.server,
                    session = %session.id,
                    method = %request.method,
                    rule,
                    reason,
                    "server request would be refused; let through (shadow or learn mode)"
                );
                Ok(())
            }
            (AuditDecision::Allow, Ok(())) => Ok(()),
        }
    }

    /// The decision record of a server request, in the instruction and trace of the agent's
    /// call that caused it when exactly one was running.
    #[allow(clippy::too_many_arguments)]
    async fn record_server_request(
        &self,
        session: &AgentSession,
        request: &Request,
        decision: AuditDecision,
        rule: &str,
        reason: &str,
        started: Instant,
        mode: Mode,
    ) -> Result<(), record::RecordError> {
        let running: Vec<CallSpan> = session
            .calls_at(session::monotonic_ns())
            .into_iter()
            .filter(|span| span.ended_ns.is_none())
            .collect();
        let identity = match running.as_slice() {
            [cause] => CallIdentity::caused_by(cause.instruction.clone(), Some(&cause.trace_id)),
            _ => CallIdentity::caused_by(None, None),
        };
        let model = self.model();
        let facts = DecisionFacts {
            decision,
            rule,
            reason,
            policy_us: started.elapsed().as_micros() as u64,
            mode,
            redact: &model.audit.redact,
            roles: &session.caller().roles,
            tool_listed: false,
        };
        let causes = running.into_iter().map(|span| span.call_id).collect();
        self.recorder
            .server_request_decision(session, request, &identity, facts, causes)
            .await
    }

    /// Counts and traces a decision; whether its `tool` label names the tool (see
    /// [`Self::tool_label`]).
    async fn log_decision(
        &self,
        session: &AgentSession,
        request: &Request,
        identity: &CallIdentity,
        decision: AuditDecision,
        rule: &str,
        policy_us: u64,
    ) -> bool {
        let decision = decision.as_str();
        let method = known_method(&request.method);
        let tool_label = self.tool_label(session, request).await;
        self.metrics
            .decisions
            .with_label_values(&[&session.server, method, tool_label, decision, rule])
            .inc();
        let tool = target_name(&request.method, request.params.as_ref()).unwrap_or("");
        // Debug, not info: the audit log is the record of every decision; this is for tracing.
        tracing::debug!(
            target: "mcp_guard::decision",
            server = %session.server,
            session = %session.id,
            principal = %session.caller().principal,
            instruction = identity.instruction.as_deref().unwrap_or(""),
            trace_id = %identity.trace.trace_id,
            call_id = %identity.call_id,
            method = %request.method,
            tool,
            decision,
            rule,
            policy_us,
            "decision"
        );
        !matches!(tool_label, "" | UNLISTED_TOOL_LABEL)
    }
}

/// The `tool` label of a decision whose tool is neither named in the policy nor listed by
/// the server: whatever a caller sends must not become a label value.
const UNLISTED_TOOL_LABEL: &str = "other";

impl Proxy {
    /// The `tool` label of a decision: empty for methods other than tools/call; the tool's
    /// name when a rule names it exactly or the server listed it to this session (both bounded
    /// sets); else [`UNLISTED_TOOL_LABEL`].
    async fn tool_label<'r>(&self, session: &AgentSession, request: &'r Request) -> &'r str {
        if request.method != "tools/call" {
            return "";
        }
        let Some(tool) = target_name(&request.method, request.params.as_ref()) else {
            return "";
        };
        let named = self.policy().names_tool(&session.server, tool);
        if named || session.has_listed(tool).await {
            tool
        } else {
            UNLISTED_TOOL_LABEL
        }
    }
}

/// A request that may go on: the rule that allowed it (or, in shadow and learn modes, would
/// have refused it) and why.
struct Allowed {
    rule: String,
    reason: String,
    /// `Allow`, or `WouldDeny` for a refusal that shadow or learn mode let through.
    decision: AuditDecision,
}

/// A refusal: the rule behind it and the error for the agent.
struct Refusal {
    rule: String,
    /// A judgement of the policy (rules, visibility, argument validation), which shadow and
    /// learn modes only record; otherwise the message could not be processed (malformed, the
    /// server failed), which every mode refuses.
    by_policy: bool,
    error: RpcError,
}

impl Refusal {
    fn unknown_tool(id: &Id, tool: &str) -> Refusal {
        Refusal::unknown(id, "unknown-tool", "tool", tool)
    }

    /// A reference to a prompt, resource template or task the caller cannot see: answered as
    /// one the server does not have.
    fn unknown_reference(id: &Id, kind: &str, name: &str) -> Refusal {
        Refusal::unknown(id, "unknown-reference", kind, name)
    }

    /// Another session's task on a shared server, answered as unknown. This keeps sessions
    /// apart, which is no judgement of the policy: every mode refuses it, shadow and learn too.
    fn task_of_another_session(id: &Id, task_id: &str) -> Refusal {
        Refusal {
            by_policy: false,
            ..Refusal::unknown_reference(id, "task", task_id)
        }
    }

    /// `-32602 Unknown KIND: NAME`, as a server answers for what it does not have, under the
    /// audit `rule` saying why mcp-guard answered so.
    fn unknown(id: &Id, rule: &str, kind: &str, name: &str) -> Refusal {
        Refusal {
            rule: rule.into(),
            by_policy: true,
            error: RpcError::new(
                Some(id.clone()),
                codes::INVALID_PARAMS,
                format!("Unknown {kind}: {name}"),
            ),
        }
    }

    fn invalid(id: &Id, message: &str) -> Refusal {
        Refusal {
            rule: "invalid".into(),
            by_policy: false,
            error: RpcError::new(Some(id.clone()), codes::INVALID_PARAMS, message),
        }
    }

    fn upstream(id: &Id, error: &str) -> Refusal {
        Refusal {
            rule: "upstream-error".into(),
            by_policy: false,
            error: RpcError::new(
                Some(id.clone()),
                codes::UPSTREAM_ERROR,
                format!("the upstream server failed; the operation was refused: {error}"),
            ),
        }
    }
}

pub(crate) enum ToolCheck {
    /// Not in the (filtered) tool list.
    Unknown,
    Invalid(String),
    Upstream(String),
}

/// Rewrites a cancellation's `requestId` from the agent's id to the upstream one, which it
/// returns; `None` when that request is not in flight.
fn point_cancellation_upstream(
    session: &AgentSession,
    notification: &mut Notification,
) -> Option<i64> {
    let params = notification.params.as_mut()?.as_object_mut()?;
    let agent_id = match params.get("requestId")? {
        Value::String(s) => Id::String(s.clone()),
        Value::Number(n) => Id::Number(n.as_i64()?),
        _ => return None,
    };
    let upstream_id = session.upstream_id_of(&agent_id)?;
    params.insert("requestId".into(), json!(upstream_id));
    Some(upstream_id)
}

/// The rule id for logs and metrics: plumbing passes as `protocol`, and a refusal no rule
/// made is the `default-deny`.
/// The `rule` labels of decisions no policy rule made.
const BUILT_IN_RULES: [&str; 6] = [
    "protocol",
    "default-deny",
    "unknown-tool",
    "unknown-reference",
    "invalid",
    "upstream-error",
];

impl Proxy {
    /// Counts the decision a stdio front recorded through the daemon (its own metrics die
    /// with it). Labels are bounded by this daemon's policy whatever the record says: an
    /// unknown server is not counted, an unknown rule counts as `other`.
    pub fn count_recorded_decision(&self, record: &crate::audit::AuditRecord, tool_listed: bool) {
        let (Some(decision), Some(server), Some(method)) =
            (record.decision, &record.server, &record.method)
        else {
            return;
        };
        let policy = self.policy();
        if !policy.server_names().any(|name| name == server) {
            return;
        }
        let rule = record.rule.as_deref().unwrap_or("");
        let rule = if BUILT_IN_RULES.contains(&rule) || policy.has_rule(server, rule) {
            rule
        } else {
            "other"
        };
        let tool = match (method.as_str(), record.tool.as_deref()) {
            ("tools/call", Some(tool)) if tool_listed || policy.names_tool(server, tool) => tool,
            ("tools/call", _) => UNLISTED_TOOL_LABEL,
            _ => "",
        };
        self.metrics
            .decisions
            .with_label_values(&[server, known_method(method), tool, decision.as_str(), rule])
            .inc();
    }
}

fn rule_label(rule: Option<&str>, effect: Effect) -> String {
    match (rule, effect) {
        (Some(rule), _) => rule.to_owned(),
        (None, Effect::Allow) => "protocol".into(),
        (None, Effect::Deny) => "default-deny".into(),
    }
}

/// The tool, prompt or resource a request is about.
fn target_name<'a>(method: &str, params: Option<&'a Value>) -> Option<&'a str> {
    let key = match method {
        "tools/call" | "prompts/get" => "name",
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => "uri",
        _ => return None,
    };
    params?.get(key)?.as_str()
}

/// Method label for metrics: known MCP methods as they are, anything else as "other", so an
/// agent cannot grow the label set.
fn known_method(method: &str) -> &str {
    const KNOWN: [&str; 20] = [
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/read",
        "resources/templates/list",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "server/discover",
        "sampling/createMessage",
        "elicitation/create",
        "roots/list",
        "tasks/get",
        "tasks/list",
        "tasks/cancel",
    ];
    KNOWN
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spans_with(running: bool) -> session::CallSpans {
        let mut spans = session::CallSpans::default();
        spans.begin(session::CallSpan {
            call_id: "c".into(),
            instruction: None,
            trace_id: "t".into(),
            started_ns: 1,
            ended_ns: None,
        });
        if !running {
            spans.end("c", 2);
        }
        spans
    }

    #[test]
    fn spans_elsewhere_are_forgotten_after_their_ttl_and_running_ones_later() {
        let now = Instant::now();
        let ago = |seconds| now.checked_sub(Duration::from_secs(seconds)).unwrap();
        let mut elsewhere = HashMap::new();
        elsewhere.insert("fresh".to_owned(), (spans_with(false), ago(10)));
        elsewhere.insert("old".to_owned(), (spans_with(false), ago(61)));
        elsewhere.insert("long-call".to_owned(), (spans_with(true), ago(600)));
        elsewhere.insert("killed-front".to_owned(), (spans_with(true), ago(3601)));
        forget_old_spans(&mut elsewhere, now);
        let mut kept: Vec<&str> = elsewhere.keys().map(String::as_str).collect();
        kept.sort();
        assert_eq!(kept, ["fresh", "long-call"]);
    }
}
