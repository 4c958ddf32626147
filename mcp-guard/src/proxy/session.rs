//! One agent session: who the caller is, the server process that serves only them, the tools
//! they may see, and the channel for what the server sends on its own.

use std::collections::BTreeMap;

use crate::policy::Account;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};

use super::catalog::ToolCatalog;
use super::shared::SharedServer;
use super::{Placement, Proxy, ProxyError, ToolCheck};
use crate::control;
use crate::egress::Egress;
use crate::identity::CallIdentity;
use crate::mcp::jsonrpc::{Id, Message};
use crate::upstream::progress::{ProgressDestination, ProgressRoute, SessionRoutes};
use crate::upstream::{self, ServerMessages, Upstream};
use std::collections::HashMap;
use std::path::PathBuf;

/// Who is calling: the principal, their roles, and context values (e.g. a workflow step)
/// that rules' `when` conditions read.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    pub principal: String,
    pub roles: Vec<String>,
    pub context: BTreeMap<String, String>,
}

impl Caller {
    /// This caller for one request: the roles the request's own credentials give, where the
    /// front has them (a bearer token, judged anew with the policy in force), else the
    /// session's; and the session's context values overlaid by the request's.
    pub fn for_request(
        &self,
        roles: Option<&[String]>,
        context: BTreeMap<String, String>,
    ) -> std::borrow::Cow<'_, Caller> {
        let same_roles = roles.is_none_or(|roles| roles == self.roles.as_slice());
        if same_roles && context.is_empty() {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut caller = self.clone();
        if let Some(roles) = roles {
            caller.roles = roles.to_vec();
        }
        caller.context.extend(context);
        std::borrow::Cow::Owned(caller)
    }
}

/// How many server-initiated messages wait for the agent to collect them.
const AGENT_OUTBOX: usize = 256;

pub struct AgentSession {
    pub id: String,
    pub server: String,
    caller: Caller,
    upstream: Arc<Upstream>,
    /// Set when the server process serves every session of its server.
    shared: Option<Arc<SharedServer>>,
    catalog: Mutex<Option<ToolCatalog>>,
    /// Server-initiated messages the policy let through, for the agent.
    outbox: Mutex<Option<mpsc::Receiver<Value>>>,
    /// The guarded cgroup of the server process, released when the session ends.
    cgroup: Option<PlacedCgroup>,
    /// Calls forwarded recently or still running: what a network connection of the server
    /// process is attributed to.
    calls: std::sync::Mutex<CallSpans>,
    ended: tokio::sync::watch::Sender<bool>,
    /// The agent's id of each request in flight → the id it has upstream.
    upstream_ids: std::sync::Mutex<HashMap<Id, i64>>,
    /// The ids of the agent's requests being handled (decision to answer): answers, progress
    /// and cancellations are routed by id, so one may not be reused while its first use runs.
    ids_in_use: std::sync::Mutex<std::collections::HashSet<Id>>,
    /// The server's ids of its requests passed on to the agent and not answered yet: the only
    /// responses of the agent's that are forwarded (see [`AgentSession::await_agents_answer`]).
    server_requests_out: std::sync::Mutex<std::collections::HashSet<Id>>,
    /// Which revision era the server speaks, learned at the first stateless request.
    era: tokio::sync::OnceCell<UpstreamEra>,
    /// What the idle timeout looks at: when the agent last did something, and how many of
    /// its messages are being handled now.
    activity: SessionActivity,
    /// Where the agent's `initialize` is: requests sent after it wait for its answer.
    handshake: tokio::sync::watch::Sender<Handshake>,
    /// Routes of requests whose answer streams on its own (an HTTP front's POST, the stdio
    /// front's writes), for their progress notifications.
    progress_routes: SessionRoutes,
    /// Where the server's progress about a request without a route goes: the outbox.
    to_outbox: mpsc::WeakSender<Value>,
    /// The tasks this session's calls created.
    tasks: std::sync::Mutex<SessionTasks>,
}

/// How many tasks a session's record keeps: an agent that creates tasks without end must not
/// grow the daemon without end. The oldest are forgotten first (on a shared server, a task
/// forgotten is then unknown to its creator too).
const MAX_TASKS_PER_SESSION: usize = 10_000;

/// The tasks a session's calls created (by task id), with the instruction that started each.
#[derive(Default)]
struct SessionTasks {
    instructions: HashMap<String, Option<String>>,
    /// Task ids, oldest first.
    order: std::collections::VecDeque<String>,
}

impl SessionTasks {
    fn note(&mut self, task_id: &str, instruction: Option<String>) {
        if self
            .instructions
            .insert(task_id.to_owned(), instruction)
            .is_none()
        {
            self.order.push_back(task_id.to_owned());
        }
        while self.order.len() > MAX_TASKS_PER_SESSION {
            if let Some(oldest) = self.order.pop_front() {
                self.instructions.remove(&oldest);
            }
        }
    }
}

/// The server process a session talks to, and what holds it.
pub(super) struct SessionServer {
    pub(super) upstream: Arc<Upstream>,
    pub(super) shared: Option<Arc<SharedServer>>,
    pub(super) cgroup: Option<PlacedCgroup>,
}

/// The initialize handshake of a session, as far as mcp-guard has seen it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handshake {
    NotStarted,
    /// `initialize` sent, not yet answered: other requests wait (a server must see its
    /// `initialize` first, and the pipelined requests of an agent are handled concurrently).
    InProgress,
    Done,
}

/// Marks the handshake done when dropped, however handling the `initialize` ended.
pub struct Initializing<'a> {
    handshake: &'a tokio::sync::watch::Sender<Handshake>,
}

impl Drop for Initializing<'_> {
    fn drop(&mut self) {
        self.handshake.send_replace(Handshake::Done);
    }
}

struct SessionActivity {
    last_ns: AtomicU64,
    in_flight: AtomicUsize,
}

/// Marks a session busy while an agent's message is handled.
pub struct Busy<'a> {
    activity: &'a SessionActivity,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.activity
            .last_ns
            .store(monotonic_ns(), Ordering::Relaxed);
        self.activity.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a server speaks, as seen by a stateless (2026-07-28) agent.
#[derive(Clone, Debug)]
pub enum UpstreamEra {
    /// It answers `server/discover`: requests pass as they are.
    Stateless,
    /// It only speaks the initialize-based revisions: mcp-guard initialised it on the agent's
    /// behalf (this is its answer) and bridges.
    Stateful { initialize: Value },
}

/// A session cgroup and who gave it out.
pub(super) enum PlacedCgroup {
    /// From this daemon's egress enforcement.
    Local {
        egress: Arc<Mutex<Egress>>,
        cgroup_id: u64,
    },
    /// From a running daemon; it releases the cgroup when this connection closes.
    Remote { _connection: tokio::net::UnixStream },
}

/// A forwarded call and when it ran, on the kernel's clock (CLOCK_MONOTONIC), so a network
/// connection the kernel stamped can be matched to the calls running at that instant even
/// when its event is read later.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CallSpan {
    pub call_id: String,
    pub instruction: Option<String>,
    pub trace_id: String,
    pub started_ns: u64,
    /// `None` while the call is in flight.
    pub ended_ns: Option<u64>,
}

impl CallSpan {
    fn covers(&self, ts_ns: u64) -> bool {
        self.started_ns <= ts_ns && self.ended_ns.is_none_or(|end| ts_ns <= end)
    }
}

/// How long a finished call stays available for attributing late-read kernel events.
const CALL_SPAN_RETENTION_NS: u64 = 60_000_000_000;
/// At most this many finished calls are kept per session (the reader drains every 10 ms, so
/// only a burst far beyond this could find a call already forgotten).
const MAX_ENDED_SPANS: usize = 4096;

/// A session's calls: the few running now, and the recently finished ones oldest first, so
/// ending a call costs the number of calls in flight, not the number made recently.
#[derive(Default)]
pub struct CallSpans {
    running: Vec<CallSpan>,
    ended: std::collections::VecDeque<CallSpan>,
}

impl CallSpans {
    pub fn begin(&mut self, span: CallSpan) {
        self.running.push(span);
    }

    pub fn end(&mut self, call_id: &str, now: u64) {
        if let Some(index) = self.running.iter().position(|c| c.call_id == call_id) {
            let mut call = self.running.swap_remove(index);
            call.ended_ns = Some(now);
            self.ended.push_back(call);
        }
        while self.ended.front().is_some_and(|c| {
            self.ended.len() > MAX_ENDED_SPANS
                || c.ended_ns
                    .is_some_and(|end| now.saturating_sub(end) >= CALL_SPAN_RETENTION_NS)
        }) {
            self.ended.pop_front();
        }
    }

    /// Ends every call still running at `now` (its session ended: its answer goes nowhere).
    pub fn end_all(&mut self, now: u64) {
        for mut call in self.running.drain(..) {
            call.ended_ns = Some(now);
            self.ended.push_back(call);
        }
    }

    pub fn any_running(&self) -> bool {
        !self.running.is_empty()
    }

    pub fn covering(&self, ts_ns: u64) -> Vec<CallSpan> {
        self.running
            .iter()
            .chain(self.ended.iter())
            .filter(|c| c.covers(ts_ns))
            .cloned()
            .collect()
    }
}

/// Marks a call as running until dropped (whatever way the forwarding ends).
pub struct CallGuard<'a> {
    session: &'a AgentSession,
    call_id: String,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        let now = monotonic_ns();
        let mut calls = self.session.calls.lock().expect("calls lock");
        calls.end(&self.call_id, now);
    }
}

/// A span for a call starting now.
pub fn span_of(identity: &CallIdentity) -> CallSpan {
    CallSpan {
        call_id: identity.call_id.clone(),
        instruction: identity.instruction.clone(),
        trace_id: identity.trace.trace_id.clone(),
        started_ns: monotonic_ns(),
        ended_ns: None,
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the kernel's event timestamps.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// A request id of the agent's in use (see [`AgentSession::claim_request_id`]).
pub struct ClaimedId<'a> {
    session: &'a AgentSession,
    id: Id,
}

impl Drop for ClaimedId<'_> {
    fn drop(&mut self) {
        self.session
            .ids_in_use
            .lock()
            .expect("ids lock")
            .remove(&self.id);
    }
}

pub(super) async fn start(
    proxy: &Arc<Proxy>,
    server: &str,
    id: String,
    caller: Caller,
    opening: &crate::identity::OpeningContext,
    launch: Launch<'_>,
    placement: &Placement,
) -> Result<Arc<AgentSession>, ProxyError> {
    let label: Arc<str> = Arc::from(format!("{server}/{id}"));
    let (request_timeout, answer_poll) = (launch.request_timeout, launch.answer_poll);
    let (upstream, server_messages, placed) = match launch.target {
        Target::Url { url, options } => {
            let rejected = proxy
                .metrics
                .upstream_credentials_rejected
                .with_label_values(&[server]);
            let (upstream, server_messages) =
                upstream::http::connect(url, options, label, rejected)?;
            (upstream, server_messages, None)
        }
        Target::Command(program) => {
            let mut identity_env = vec![
                ("MCP_GUARD_SERVER", server.to_owned()),
                ("MCP_GUARD_SESSION", id.clone()),
                ("MCP_GUARD_PRINCIPAL", caller.principal.clone()),
            ];
            identity_env.extend(opening.env());
            spawn_placed(placement, server, &id, program, identity_env, label).await?
        }
    };
    let upstream = upstream
        .with_request_timeout(request_timeout)
        .with_answer_polling(answer_poll);
    Ok(assemble(
        proxy,
        server,
        id,
        caller,
        upstream,
        server_messages,
        placed,
    ))
}

/// How a session's server is reached, how long each request to it may take, and how long
/// a call polls for its answer before sleeping (`daemon.answer_poll_us`).
#[derive(Clone, Copy)]
pub struct Launch<'a> {
    pub target: Target<'a>,
    pub request_timeout: std::time::Duration,
    pub answer_poll: std::time::Duration,
}

/// A stdio server's program: what runs, with which environment, as whom.
#[derive(Clone, Copy)]
pub struct Program<'a> {
    pub command: &'a [String],
    pub env: &'a BTreeMap<String, crate::policy::EnvValue>,
    /// Who the process runs as (`user`/`group`); `None`: the daemon's account.
    pub account: Option<Account>,
    /// Longest line of its output read (`daemon.max_server_message_bytes`).
    pub max_message_bytes: usize,
}

#[derive(Clone, Copy)]
pub enum Target<'a> {
    Command(Program<'a>),
    Url {
        url: &'a str,
        options: upstream::http::HttpOptions<'a>,
    },
}

fn assemble(
    proxy: &Arc<Proxy>,
    server: &str,
    id: String,
    caller: Caller,
    upstream: Upstream,
    server_messages: ServerMessages,
    cgroup: Option<PlacedCgroup>,
) -> Arc<AgentSession> {
    let process = SessionServer {
        upstream: Arc::new(upstream),
        shared: None,
        cgroup,
    };
    let (session, to_agent) = AgentSession::open(id, server, caller, process);
    tokio::spawn(relay_server_messages(
        Arc::downgrade(proxy),
        Arc::downgrade(&session),
        server_messages,
        to_agent,
    ));
    session
}

impl SessionActivity {
    fn fresh() -> SessionActivity {
        SessionActivity {
            last_ns: AtomicU64::new(monotonic_ns()),
            in_flight: AtomicUsize::new(0),
        }
    }
}

impl AgentSession {
    /// A session before its first message (no catalog, no calls, handshake not started),
    /// and the sender of its outbox, for whatever passes the server's messages on to it.
    pub(super) fn open(
        id: String,
        server: &str,
        caller: Caller,
        process: SessionServer,
    ) -> (Arc<Self>, mpsc::Sender<Value>) {
        let (to_agent, outbox) = mpsc::channel(AGENT_OUTBOX);
        let to_outbox = to_agent.downgrade();
        let session = Self {
            id,
            server: server.to_owned(),
            caller,
            upstream: process.upstream,
            shared: process.shared,
            catalog: Mutex::new(None),
            outbox: Mutex::new(Some(outbox)),
            cgroup: process.cgroup,
            calls: std::sync::Mutex::new(CallSpans::default()),
            ended: tokio::sync::watch::Sender::new(false),
            upstream_ids: std::sync::Mutex::new(HashMap::new()),
            ids_in_use: std::sync::Mutex::new(std::collections::HashSet::new()),
            server_requests_out: std::sync::Mutex::new(std::collections::HashSet::new()),
            era: tokio::sync::OnceCell::new(),
            activity: SessionActivity::fresh(),
            handshake: tokio::sync::watch::Sender::new(Handshake::NotStarted),
            progress_routes: SessionRoutes::default(),
            to_outbox,
            tasks: std::sync::Mutex::new(SessionTasks::default()),
        };
        (Arc::new(session), to_agent)
    }

    /// Notes that the agent sent `initialize`, in the order its messages arrived (before any
    /// of them is handled), so that requests sent after it wait for its answer.
    pub fn note_initialize_sent(&self) {
        self.handshake.send_if_modified(|state| {
            let starts = *state == Handshake::NotStarted;
            if starts {
                *state = Handshake::InProgress;
            }
            starts
        });
    }

    /// Handling of the agent's `initialize` begins; the handshake is done when the guard goes.
    pub fn initializing(&self) -> Initializing<'_> {
        self.note_initialize_sent();
        Initializing {
            handshake: &self.handshake,
        }
    }

    /// Waits while the agent's `initialize` is unanswered (returns at once otherwise).
    pub async fn after_initialize(&self) {
        let mut state = self.handshake.subscribe();
        let _ = state
            .wait_for(|state| *state != Handshake::InProgress)
            .await;
    }

    /// Marks the session busy until the guard is dropped (then idle from that moment).
    pub fn busy(&self) -> Busy<'_> {
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy {
            activity: &self.activity,
        }
    }

    /// How long the session has been idle at `now_ns`: `None` while a message is being
    /// handled or a GET stream holds the session's outbox (an agent listening is not idle).
    pub async fn idle_for(&self, now_ns: u64) -> Option<std::time::Duration> {
        if self.activity.in_flight.load(Ordering::Relaxed) > 0 || self.outbox.lock().await.is_none()
        {
            return None;
        }
        let last = self.activity.last_ns.load(Ordering::Relaxed);
        Some(std::time::Duration::from_nanos(now_ns.saturating_sub(last)))
    }

    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    pub fn shared(&self) -> Option<&Arc<SharedServer>> {
        self.shared.as_ref()
    }

    /// Records a forwarded call as running until the guard is dropped.
    pub fn begin_call(&self, identity: &CallIdentity) -> CallGuard<'_> {
        self.calls
            .lock()
            .expect("calls lock")
            .begin(span_of(identity));
        CallGuard {
            session: self,
            call_id: identity.call_id.clone(),
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, SessionTasks> {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes a task a call of this session created, and the instruction behind that call
    /// (on a shared server, the server hands over the statuses that came before).
    pub(super) fn note_task(&self, task_id: &str, instruction: Option<String>) {
        match self.shared() {
            Some(shared) => shared.task_created(self, task_id, instruction),
            None => self.remember_task(task_id, instruction),
        }
    }

    /// Records the task in the session's own list (see [`Self::note_task`]).
    pub(super) fn remember_task(&self, task_id: &str, instruction: Option<String>) {
        self.tasks().note(task_id, instruction);
    }

    /// Whether a call of this session created the task `task_id`.
    pub(super) fn created_task(&self, task_id: &str) -> bool {
        self.tasks().instructions.contains_key(task_id)
    }

    /// The instruction behind the call that created the task `task_id`.
    pub(super) fn task_instruction(&self, task_id: &str) -> Option<String> {
        self.tasks().instructions.get(task_id).cloned().flatten()
    }

    /// Keeps in a `tasks/list` result only the tasks this session created.
    pub(super) fn keep_own_tasks(&self, result: &mut Value) {
        let tasks = self.tasks();
        if let Some(listed) = result.get_mut("tasks").and_then(Value::as_array_mut) {
            listed.retain(|task| {
                let id = task.get("taskId").and_then(Value::as_str);
                id.is_some_and(|id| tasks.instructions.contains_key(id))
            });
        }
    }

    /// The session's call spans, taken when it ends (kept elsewhere for late kernel events).
    /// Calls still in flight end with it: their guards end them in the emptied live record,
    /// so the copy kept would otherwise stay running, and be kept, for an hour.
    pub fn take_spans(&self) -> CallSpans {
        let mut spans = std::mem::take(&mut *self.calls.lock().expect("calls lock"));
        spans.end_all(monotonic_ns());
        spans
    }

    /// Notes that the server's request `id` goes to the agent, whose response to it is then
    /// forwarded; `false` when too many are waiting for the agent's answer already.
    fn await_agents_answer(&self, id: &Id) -> bool {
        let mut out = self
            .server_requests_out
            .lock()
            .expect("server requests lock");
        out.len() < MAX_SERVER_REQUESTS_OUT && out.insert(id.clone())
    }

    /// Whether the agent's response answers a request of the server's that was passed on to
    /// it (once: a second response to it is not). Any other response (a guessed id, one for
    /// a request the policy refused, anything on a shared server, whose requests reach no
    /// agent) must not reach the server.
    pub fn answers_a_server_request(&self, id: &Id) -> bool {
        self.server_requests_out
            .lock()
            .expect("server requests lock")
            .remove(id)
    }

    /// Claims `id` for one of the agent's requests until the claim is dropped; `None` while
    /// another request of this session holds it.
    pub fn claim_request_id(&self, id: &Id) -> Option<ClaimedId<'_>> {
        let fresh = self.ids_in_use.lock().expect("ids lock").insert(id.clone());
        fresh.then(|| ClaimedId {
            session: self,
            id: id.clone(),
        })
    }

    /// Sends the agent's request upstream, remembering its upstream id while it runs.
    pub async fn call_upstream(
        &self,
        agent_id: &Id,
        method: &str,
        params: Option<Value>,
    ) -> Result<upstream::Outcome, upstream::UpstreamError> {
        let progress = ProgressDestination {
            route: self.progress_routes.route_for(params.as_ref()),
            outbox: self.to_outbox.clone(),
        };
        let remember_id = |upstream_id| {
            self.upstream_ids
                .lock()
                .expect("ids lock")
                .insert(agent_id.clone(), upstream_id);
        };
        let outcome = self
            .upstream
            .call_as(method, params, remember_id, Some(progress))
            .await;
        self.upstream_ids.lock().expect("ids lock").remove(agent_id);
        outcome
    }

    /// The era the server speaks, probed once: `server/discover` answered means stateless;
    /// otherwise mcp-guard initialises the server itself (2025-11-25) so a stateless agent can
    /// use a server that predates it.
    pub async fn upstream_era(&self) -> Result<UpstreamEra, upstream::UpstreamError> {
        self.era
            .get_or_try_init(|| async {
                let envelope = json!({"_meta": {
                    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                    "io.modelcontextprotocol/clientCapabilities": {},
                }});
                if let Ok(_discovered) = self
                    .upstream
                    .call("server/discover", Some(envelope))
                    .await?
                {
                    return Ok(UpstreamEra::Stateless);
                }
                let params = json!({
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "mcp-guard", "version": env!("CARGO_PKG_VERSION")},
                });
                let initialize = match self.upstream.call("initialize", Some(params)).await? {
                    Ok(result) => result,
                    Err(error) => error,
                };
                self.upstream
                    .notify("notifications/initialized", None)
                    .await?;
                Ok(UpstreamEra::Stateful { initialize })
            })
            .await
            .cloned()
    }

    /// The upstream id of the agent's request `agent_id`, while it runs.
    pub fn upstream_id_of(&self, agent_id: &Id) -> Option<i64> {
        self.upstream_ids
            .lock()
            .expect("ids lock")
            .get(agent_id)
            .copied()
    }

    /// The calls that were running at `ts_ns` (CLOCK_MONOTONIC).
    pub fn calls_at(&self, ts_ns: u64) -> Vec<CallSpan> {
        self.calls.lock().expect("calls lock").covering(ts_ns)
    }

    /// The stream of server-initiated messages for the agent (one taker: the GET stream or
    /// the stdio front).
    pub async fn take_outbox(&self) -> Option<mpsc::Receiver<Value>> {
        self.outbox.lock().await.take()
    }

    /// Routes the server's progress notifications about this session's request with `token`
    /// to the returned route until it is dropped, ahead of the request's answer; None when
    /// the token is already routed (another request in flight uses it: its notifications go
    /// to the outbox).
    pub fn route_progress(&self, token: &Value) -> Option<ProgressRoute> {
        self.progress_routes.open(token)
    }

    /// Gives the outbox back when its taker goes (a GET stream that closed).
    pub async fn return_outbox(&self, outbox: mpsc::Receiver<Value>) {
        *self.outbox.lock().await = Some(outbox);
    }

    pub(super) async fn forget_catalog(&self) {
        *self.catalog.lock().await = None;
    }

    /// Remembers the tools of a tools/list page (later pages add to earlier ones).
    pub(super) async fn learn_tools(&self, tools: &[Value]) {
        let learned = ToolCatalog::from_tools(tools);
        let mut catalog = self.catalog.lock().await;
        match catalog.as_mut() {
            Some(existing) => existing.extend(learned),
            None => *catalog = Some(learned),
        }
    }

    /// Whether the server listed `tool` to this session (without asking the server now).
    pub(super) async fn has_listed(&self, tool: &str) -> bool {
        self.catalog
            .lock()
            .await
            .as_ref()
            .is_some_and(|catalog| catalog.contains(tool))
    }

    /// Checks a tools/call against the tool's own inputSchema, fetching the tool list from the
    /// server first if this session has not seen it.
    pub(super) async fn check_tool_arguments(
        self: &Arc<Self>,
        proxy: &Proxy,
        tool: &str,
        arguments: &Value,
        envelope: Option<&Value>,
    ) -> Result<(), ToolCheck> {
        if let Some(verdict) = self.check_known(tool, arguments).await {
            return verdict;
        }
        self.fetch_tool_list(proxy, envelope).await?;
        self.check_known(tool, arguments)
            .await
            .unwrap_or(Err(ToolCheck::Unknown))
    }

    async fn check_known(&self, tool: &str, arguments: &Value) -> Option<Result<(), ToolCheck>> {
        let catalog = self.catalog.lock().await;
        let verdict = catalog.as_ref()?.check(tool, arguments)?;
        Some(verdict.map_err(ToolCheck::Invalid))
    }

    /// Reads every page of the server's tools/list, filtered as the agent would see it.
    /// `envelope`: the stateless `_meta` keys the agent's request carried, sent along to a
    /// server that speaks the stateless revision (it refuses requests without them).
    async fn fetch_tool_list(
        self: &Arc<Self>,
        proxy: &Proxy,
        envelope: Option<&Value>,
    ) -> Result<(), ToolCheck> {
        self.forget_catalog().await;
        let mut cursor: Option<String> = None;
        // Bounded: a server that pages forever must not hold the call forever.
        for _ in 0..100 {
            let mut params = json!({});
            if let Some(cursor) = &cursor {
                params["cursor"] = json!(cursor);
            }
            if let Some(envelope) = envelope {
                params["_meta"] = envelope.clone();
            }
            let params = (params != json!({})).then_some(params);
            let mut result = match self.upstream.call("tools/list", params).await {
                Ok(Ok(result)) => result,
                Ok(Err(error)) => return Err(ToolCheck::Upstream(error.to_string())),
                Err(e) => return Err(ToolCheck::Upstream(e.to_string())),
            };
            cursor = result
                .get("nextCursor")
                .and_then(Value::as_str)
                .map(str::to_owned);
            proxy
                .filter_list(self, &self.caller, "tools/list", &mut result)
                .await
                .map_err(ToolCheck::Upstream)?;
            if cursor.is_none() {
                break;
            }
        }
        if self.catalog.lock().await.is_none() {
            self.learn_tools(&[]).await;
        }
        Ok(())
    }

    /// Stops the session's own server process, closes the agent's stream and releases the
    /// cgroup (the periodic sweep removes it once the process has gone). A shared process
    /// stays for the other sessions.
    pub async fn end(&self) {
        // Ended first: a subscription a shared server confirms from now on is not kept.
        self.ended.send_replace(true);
        match &self.shared {
            None => self.upstream.stop(),
            Some(shared) => shared.leave_subscriptions(&self.id),
        }
        release(self.cgroup.as_ref()).await;
    }

    pub fn has_ended(&self) -> bool {
        *self.ended.borrow()
    }

    /// Becomes true when the session ends: streams to the agent close.
    pub fn ended(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ended.subscribe()
    }
}

/// Starts a stdio server process in a cgroup `<server>/<cgroup_name>` from `placement`,
/// giving the cgroup back if the process cannot start.
pub(super) async fn spawn_placed(
    placement: &Placement,
    server: &str,
    cgroup_name: &str,
    program: Program<'_>,
    identity_env: Vec<(&'static str, String)>,
    label: Arc<str>,
) -> Result<(Upstream, ServerMessages, Option<PlacedCgroup>), ProxyError> {
    let (cgroup_path, placed) = place(placement, server, cgroup_name).await?;
    let launch = upstream::stdio::Launch {
        command: program.command,
        env: program.env,
        account: program.account,
        cgroup: cgroup_path.as_deref(),
        identity_env,
        label,
        max_message_bytes: program.max_message_bytes,
        ends_with_this_process: matches!(placement, Placement::UnconfinedEndingWithThisProcess),
    };
    match upstream::stdio::spawn(launch) {
        Ok((upstream, server_messages)) => Ok((upstream, server_messages, placed)),
        Err(e) => {
            release(placed.as_ref()).await;
            Err(e.into())
        }
    }
}

/// Gets a guarded cgroup for the session's server process.
async fn place(
    placement: &Placement,
    server: &str,
    id: &str,
) -> Result<(Option<PathBuf>, Option<PlacedCgroup>), ProxyError> {
    match placement {
        Placement::Unconfined | Placement::UnconfinedEndingWithThisProcess => Ok((None, None)),
        Placement::Local(egress) => {
            let cgroup = egress.lock().await.open_session(server, Some(id))?;
            let placed = PlacedCgroup::Local {
                egress: egress.clone(),
                cgroup_id: cgroup.cgroup_id,
            };
            Ok((Some(cgroup.path), Some(placed)))
        }
        Placement::Remote(socket) => {
            // The front's end (however it ends) ends the session: nothing its server left
            // running outlives it.
            let (answer, connection) =
                control::open_session(socket, server, Some(id), true).await?;
            let path = answer.cgroup.ok_or(ProxyError::Placement(
                "the daemon answered without a cgroup".into(),
            ))?;
            Ok((
                Some(path),
                Some(PlacedCgroup::Remote {
                    _connection: connection,
                }),
            ))
        }
    }
}

pub(super) async fn release(placed: Option<&PlacedCgroup>) {
    let Some(PlacedCgroup::Local { egress, cgroup_id }) = placed else {
        return;
    };
    let mut egress = egress.lock().await;
    if let Err(e) = egress.kill_session_processes(*cgroup_id) {
        tracing::warn!(cgroup_id, error = %e, "stopping what is left in the session cgroup");
    }
    if let Err(e) = egress.release_session(*cgroup_id) {
        tracing::warn!(cgroup_id, error = %e, "releasing the session cgroup");
    }
}

/// Judges what the server sends on its own and passes the allowed part to the agent. When
/// the server's output ends while the session is open (its process exited, or an HTTP server
/// ended its session), ends the session:
/// every later call would fail, and an agent that gets 404 for its session starts a new one
/// (with a new server process); a stdio front sees its outbox close and exits.
async fn relay_server_messages(
    proxy: Weak<Proxy>,
    session: Weak<AgentSession>,
    mut server_messages: ServerMessages,
    to_agent: mpsc::Sender<Value>,
) {
    relay_until_the_server_ends(&proxy, &session, &mut server_messages, &to_agent).await;
    drop(to_agent);
    if let (Some(proxy), Some(session)) = (proxy.upgrade(), session.upgrade()) {
        let reason = session.upstream.end_reason();
        if proxy.end_this_session(&session, reason).await {
            tracing::warn!(session = %session.id, server = %session.server, reason,
                "the session's server went away; the session is ended");
        }
    }
}

async fn relay_until_the_server_ends(
    proxy: &Weak<Proxy>,
    session: &Weak<AgentSession>,
    server_messages: &mut ServerMessages,
    to_agent: &mpsc::Sender<Value>,
) {
    while let Some(message) = server_messages.recv().await {
        let (Some(proxy), Some(session)) = (proxy.upgrade(), session.upgrade()) else {
            break;
        };
        match message {
            Message::Request(request) => {
                if let Err(refusal) = proxy.authorise_server_request(&session, &request).await {
                    let _ = session
                        .upstream
                        .reply(&request.id, Err(refusal.to_value()["error"].clone()))
                        .await;
                    continue;
                }
                // Noted before it is sent: the agent may answer at once.
                let awaited = session.await_agents_answer(&request.id);
                if !awaited
                    || to_agent
                        .try_send(Message::Request(request.clone()).to_value())
                        .is_err()
                {
                    if awaited {
                        // Not sent after all: no answer of the agent's is due.
                        session.answers_a_server_request(&request.id);
                    }
                    // Nobody collects (no GET stream open) or too much is waiting: the server
                    // must not wait forever for an answer that cannot come.
                    let error = json!({"code": crate::mcp::jsonrpc::codes::INTERNAL_ERROR,
                        "message": "the agent has no open stream for server requests"});
                    let _ = session.upstream.reply(&request.id, Err(error)).await;
                }
            }
            Message::Notification(notification) => {
                if notification.method == "notifications/tools/list_changed" {
                    // The next tools/list or call re-learns, filtered by the policy.
                    session.forget_catalog().await;
                }
                if !proxy.may_see(&session, &notification) {
                    continue;
                }
                let value = Message::Notification(notification).to_value();
                // Best effort: never block the server's output on an agent that is not reading.
                if to_agent.try_send(value).is_err() {
                    tracing::debug!(session = %session.id, "notification for the agent dropped: no open stream");
                }
            }
            Message::Response(_) => {}
        }
    }
}

/// Requests of the server's that may wait for the agent's answer at once, per session.
const MAX_SERVER_REQUESTS_OUT: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn span(call_id: &str, started_ns: u64) -> CallSpan {
        CallSpan {
            call_id: call_id.into(),
            instruction: None,
            trace_id: "t".into(),
            started_ns,
            ended_ns: None,
        }
    }

    fn ids(spans: Vec<CallSpan>) -> Vec<String> {
        spans.into_iter().map(|c| c.call_id).collect()
    }

    #[test]
    fn a_sessions_task_record_keeps_the_newest_tasks_up_to_its_bound() {
        let mut tasks = SessionTasks::default();
        tasks.note("first", Some("i-1".into()));
        tasks.note("first", Some("i-2".into()));
        assert_eq!(tasks.order.len(), 1, "noted again, not twice");
        assert_eq!(tasks.instructions["first"].as_deref(), Some("i-2"));
        for i in 0..MAX_TASKS_PER_SESSION {
            tasks.note(&format!("t{i}"), None);
        }
        assert_eq!(tasks.instructions.len(), MAX_TASKS_PER_SESSION);
        assert!(!tasks.instructions.contains_key("first"), "the oldest went");
        assert!(tasks.instructions.contains_key("t0"));
    }

    #[test]
    fn ended_calls_still_cover_their_time_and_are_pruned_by_age_and_count() {
        let mut calls = CallSpans::default();
        calls.running.push(span("a", 10));
        calls.running.push(span("b", 20));
        calls.end("a", 30);
        assert_eq!(ids(calls.covering(25)), ["b", "a"]);
        assert_eq!(ids(calls.covering(35)), ["b"]);
        calls.end("b", 30 + CALL_SPAN_RETENTION_NS);
        assert_eq!(ids(calls.covering(25)), ["b"], "a expired, b just ended");
        for i in 0..(MAX_ENDED_SPANS as u64 + 10) {
            calls.running.push(span("x", 100 + i));
            calls.end("x", 100 + i);
        }
        assert_eq!(calls.ended.len(), MAX_ENDED_SPANS);
    }

    #[test]
    fn calls_in_flight_when_their_session_ends_end_with_it() {
        let mut calls = CallSpans::default();
        calls.running.push(span("done", 10));
        calls.end("done", 20);
        calls.running.push(span("in-flight", 30));
        calls.end_all(50);
        assert!(!calls.any_running());
        assert_eq!(
            ids(calls.covering(40)),
            ["in-flight"],
            "it covers up to the end"
        );
        assert!(calls.covering(60).is_empty(), "and nothing after it");
    }
}
