//! The real MCP servers behind mcp-guard. Each agent session gets an `Upstream`: a connection
//! to a stdio server process (spawned per session, inside its guarded cgroup) that mcp-guard
//! talks JSON-RPC to with ids of its own, so pipelined requests are routed back to their
//! callers in whatever order the server answers.

pub mod headers;
pub mod http;
pub mod orphans;
pub mod progress;
pub mod stdio;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc, oneshot, watch};

use crate::answer_polling::AnswerPolling;
use crate::mcp::jsonrpc::{Id, Message};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("starting the server `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("the server closed its connection")]
    Closed,
    #[error("the server has no command to run")]
    NoCommand,
    #[error("{0}")]
    Unsupported(String),
    #[error("tls_ca_file {}: {reason}", path.display())]
    CaFile {
        path: std::path::PathBuf,
        reason: String,
    },
    /// One of the server's `env` values could not be read (never carries it).
    #[error("env.{name}: {source}")]
    Env {
        name: String,
        source: crate::policy::ValueSourceError,
    },
    /// One of the server's `headers` could not be read (never carries its value).
    #[error("headers.{name}: {source}")]
    Header {
        name: String,
        source: crate::policy::ValueSourceError,
    },
    #[error("the server did not answer {method} within {seconds} s")]
    TimedOut { method: String, seconds: u64 },
}

/// How long a request may wait for its answer unless the session says otherwise.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The least a request to a server process mcp-guard started is given until the process has
/// answered once: that wait includes the process's start-up (an `npx` or `uvx` cold start
/// takes seconds), which a `request_timeout_seconds` chosen for tool calls should not cover.
const START_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// The error code of a request its sender cancelled (LSP's `RequestCancelled`; MCP defines
/// none, and the canceller ignores the answer anyway).
const REQUEST_CANCELLED: i64 = -32800;

/// The result of a request: the server's `result`, or its `error` object.
pub type Outcome = Result<Value, Value>;

type Pending = Arc<Mutex<Waiting>>;

/// The requests whose callers wait for an answer (by the id mcp-guard gave each upstream).
#[derive(Default)]
struct Waiting {
    callers: HashMap<i64, oneshot::Sender<Outcome>>,
    /// The server's output has ended: a request sent now waits for nothing that can come.
    ended: bool,
}

/// A live connection to one server process.
pub struct Upstream {
    to_server: Outbound,
    pending: Pending,
    next_id: AtomicI64,
    /// The server process mcp-guard spawned, if any; stopped by `stop` or when dropped.
    process: std::sync::Mutex<Option<stdio::ServerProcess>>,
    /// A hung server must not hold an agent's call (and its audit span) open forever.
    request_timeout: Duration,
    /// True from spawning the server process until it first answers (see
    /// [`START_UP_TIMEOUT`]).
    starting: AtomicBool,
    /// How callers wait for this server's answers.
    answer_polling: AnswerPolling,
    /// The requests in flight that asked for progress.
    progress: progress::InFlight,
}

/// How messages reach the server.
enum Outbound {
    /// A POST each, from a task of its own.
    Post(http::Poster),
    /// Written to the server's stdin by the sender itself, one `write` per message under the
    /// lock (no hand-off to a writer task).
    Pipe(Mutex<stdio::LineWriter>),
}

impl Outbound {
    async fn send(&self, message: Value) -> Result<(), UpstreamError> {
        match self {
            Outbound::Post(poster) => {
                poster.send(message).await;
                Ok(())
            }
            Outbound::Pipe(writer) => {
                let mut line = serde_json::to_vec(&message).expect("a JSON value serialises");
                line.push(b'\n');
                writer.lock().await.send(&line).await
            }
        }
    }
}

/// Requests and notifications the server sends on its own (sampling, elicitation, roots,
/// progress, list changes), for the session to judge and deliver.
pub type ServerMessages = mpsc::Receiver<Message>;

impl Upstream {
    fn with_outbound(
        to_server: Outbound,
        router: &Router,
        process: Option<stdio::ServerProcess>,
    ) -> Upstream {
        Upstream {
            to_server,
            pending: Arc::clone(&router.pending),
            next_id: AtomicI64::new(1),
            starting: AtomicBool::new(process.is_some()),
            process: std::sync::Mutex::new(process),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            answer_polling: AnswerPolling::off(),
            progress: router.progress.clone(),
        }
    }

    /// Sets how long each request waits for its answer.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Upstream {
        self.request_timeout = timeout;
        self
    }

    /// Lets callers poll for this server's answers for up to `budget` before they sleep (see
    /// [`AnswerPolling`]).
    pub fn with_answer_polling(mut self, budget: Duration) -> Upstream {
        self.answer_polling = AnswerPolling::new(budget);
        self
    }

    /// Why the server's messages ended, for the session's `end` record: an HTTP server that
    /// ended the session it had with mcp-guard, or else a server process that exited.
    pub fn end_reason(&self) -> &'static str {
        match &self.to_server {
            Outbound::Post(poster) if poster.server_ended_the_session() => "server_ended_session",
            _ => "server_exited",
        }
    }

    /// Stops the server process now (its output then ends, which ends everything reading it).
    /// The process is kept, so that how it exited can still be learned.
    pub fn stop(&self) {
        if let Some(process) = self.process.lock().expect("process lock").as_mut() {
            process.kill();
        }
    }

    /// Sends a request and waits for its outcome.
    pub async fn call(
        &self,
        method: &str,
        params: Option<Value>,
    ) -> Result<Outcome, UpstreamError> {
        self.call_as(method, params, |_| {}, None).await
    }

    /// Like `call`; `assigned` learns the id mcp-guard gave the request upstream before the
    /// answer comes, so a cancellation from the agent can name it. The server's progress
    /// notifications about it go to `progress`, if it asks for progress.
    pub async fn call_as(
        &self,
        method: &str,
        mut params: Option<Value>,
        assigned: impl FnOnce(i64),
        progress: Option<progress::ProgressDestination>,
    ) -> Result<Outcome, UpstreamError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        assigned(id);
        let _progress_flows =
            progress.and_then(|to| self.progress.register(id, params.as_mut(), to));
        let (sender, receiver) = oneshot::channel();
        {
            let mut pending = self.pending.lock().await;
            if pending.ended {
                // Whether or not the message could still be written, nothing would route
                // its answer: the call would wait out its whole timeout.
                return Err(UpstreamError::Closed);
            }
            pending.callers.insert(id, sender);
        }
        let mut message = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if let Some(params) = params {
            message["params"] = params;
        }
        if let Err(error) = self.to_server.send(message).await {
            self.pending.lock().await.callers.remove(&id);
            return Err(error);
        }
        let answer = self.answer_polling.receive(receiver);
        let starting = self.starting.load(Ordering::Relaxed);
        let timeout = if starting {
            self.request_timeout.max(START_UP_TIMEOUT)
        } else {
            self.request_timeout
        };
        match tokio::time::timeout(timeout, answer).await {
            Ok(Some(answer)) => {
                // Written once, not by every answer: callers on other threads read it.
                if starting {
                    self.starting.store(false, Ordering::Relaxed);
                }
                Ok(answer)
            }
            Ok(None) => Err(UpstreamError::Closed),
            Err(_) => {
                self.give_up(id).await;
                Err(UpstreamError::TimedOut {
                    method: method.to_owned(),
                    seconds: timeout.as_secs(),
                })
            }
        }
    }

    /// Forgets a request that took too long and tells the server to stop working on it; a
    /// late answer is then dropped as one mcp-guard did not send.
    async fn give_up(&self, id: i64) {
        self.pending.lock().await.callers.remove(&id);
        let cancelled = json!({
            "requestId": id,
            "reason": "mcp-guard: no answer within the server's request_timeout_seconds",
        });
        // Best effort: a server that is gone needs no cancellation.
        let _ = self
            .notify("notifications/cancelled", Some(cancelled))
            .await;
    }

    /// Stops waiting for request `id`, which its sender cancelled: the server does not answer
    /// a cancelled request, so its caller gets a "cancelled" error now instead of waiting for
    /// the timeout; a late answer is dropped as one mcp-guard did not send.
    pub async fn abandon(&self, id: i64) {
        if let Some(waiter) = self.pending.lock().await.callers.remove(&id) {
            let error = json!({"code": REQUEST_CANCELLED, "message": "cancelled by the agent"});
            let _ = waiter.send(Err(error));
        }
    }

    pub async fn notify(&self, method: &str, params: Option<Value>) -> Result<(), UpstreamError> {
        let mut message = json!({"jsonrpc": "2.0", "method": method});
        if let Some(params) = params {
            message["params"] = params;
        }
        self.to_server.send(message).await
    }

    /// Answers a request the server sent (with the server's own id).
    pub async fn reply(&self, id: &Id, outcome: Outcome) -> Result<(), UpstreamError> {
        let message = match outcome {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err(error) => json!({"jsonrpc": "2.0", "id": id, "error": error}),
        };
        self.to_server.send(message).await
    }

    /// How the server process mcp-guard spawned exited (its output has ended), waiting for it
    /// up to `within`. `None`: no process, or it still runs (it is then stopped: the process
    /// is given up here).
    pub async fn exit_status(&self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut process = self.process.lock().expect("process lock").take()?;
        process.exit_status(within).await
    }

    /// Process id of the server, where mcp-guard spawned it.
    pub fn pid(&self) -> Option<u32> {
        self.process
            .lock()
            .expect("process lock")
            .as_ref()
            .and_then(|p| p.pid())
    }
}

/// What a caller whose answer was too large to read is told.
fn too_large(length: usize, max: usize) -> String {
    format!(
        "the server's answer is {length} bytes, over daemon.max_server_message_bytes ({max}); \
         it was dropped"
    )
}

/// A message of the server's that is not JSON but reads as an answer (its `id` next to
/// `"jsonrpc":"2.0"` at either end): that id, and what its caller is told. `None` for one
/// that names no request (a server's stray log output, a broken notification).
fn unreadable_answer(message: &[u8], error: &serde_json::Error) -> Option<(i64, String)> {
    let id = crate::mcp::lines::response_id(message, message)?;
    Some((
        id,
        format!("the server sent an answer that is not JSON ({error})"),
    ))
}

/// The error object a caller gets when the server could not answer: `problem` says why.
fn upstream_error(problem: &str) -> Value {
    json!({"code": crate::mcp::jsonrpc::codes::UPSTREAM_ERROR,
        "message": format!("upstream server: {problem}")})
}

/// Reads one message of the server: a response is handed to its waiting caller here, and an
/// invalid message dropped; anything else is returned, for the session.
async fn answer_or_pass_on(pending: &Pending, value: Value, label: &str) -> Option<Message> {
    let meant_as_answer = value.get("method").is_none();
    match crate::mcp::jsonrpc::message_from_value(value) {
        Ok(Message::Response(response)) => {
            answer_caller(pending, response, label).await;
            None
        }
        Ok(other) => Some(other),
        Err(e) => {
            tracing::warn!(server = %label, error = %e, "server sent an invalid JSON-RPC message; dropped");
            // An invalid answer to a request mcp-guard sent fails that request now, rather
            // than at request_timeout_seconds.
            if let (true, Some(Id::Number(id))) = (meant_as_answer, &e.id) {
                let problem = format!("the server sent an invalid answer: {}", e.message);
                fail_caller(pending, *id, &problem).await;
            }
            None
        }
    }
}

/// Answers the caller waiting for `id`, if any, with an upstream error saying `problem`.
async fn fail_caller(pending: &Pending, id: i64, problem: &str) {
    if let Some(waiter) = pending.lock().await.callers.remove(&id) {
        let _ = waiter.send(Err(upstream_error(problem)));
    }
}

/// Hands a response to the caller waiting for it; one mcp-guard did not send (or gave up on)
/// is dropped.
async fn answer_caller(pending: &Pending, response: crate::mcp::jsonrpc::Response, label: &str) {
    let waiter = match &response.id {
        Id::Number(n) => pending.lock().await.callers.remove(n),
        Id::String(_) => None,
    };
    match waiter {
        Some(waiter) => {
            let _ = waiter.send(response.outcome);
        }
        None => tracing::warn!(server = %label, id = %response.id,
            "server answered a request mcp-guard did not send; dropped"),
    }
}

/// Routes what the server sends (see [`Router`]). Ends (failing every waiting caller) when
/// the server's output ends, or when `ended` says the server ended the session (an HTTP server
/// that no longer knows its session id).
async fn route_server_output(
    mut from_server: mpsc::Receiver<Value>,
    router: Router,
    mut ended: watch::Receiver<bool>,
) {
    loop {
        let value = tokio::select! {
            // What the server said before it ended the session is routed first.
            biased;
            value = from_server.recv() => value,
            _ = ended.wait_for(|ended| *ended) => None,
        };
        let Some(value) = value else { break };
        if !router.route(value).await {
            break;
        }
    }
    if *ended.borrow() {
        router
            .fail_every_caller(http::SERVER_ENDED_THE_SESSION)
            .await;
    }
    router.end().await;
}

/// Where the server's messages go: responses to their waiting callers, progress to its
/// request (see [`progress`]), everything else to the session. Used by whatever reads the server's
/// output, with no task in between.
struct Router {
    pending: Pending,
    progress: progress::InFlight,
    to_session: mpsc::Sender<Message>,
    label: Arc<str>,
}

impl Router {
    /// A router with no caller waiting yet, passing on to `to_session`.
    fn new(to_session: mpsc::Sender<Message>, label: Arc<str>) -> Router {
        Router {
            pending: Arc::default(),
            progress: progress::InFlight::default(),
            to_session,
            label,
        }
    }

    /// Delivers what the server sent: one message, or each message of a JSON-RPC batch
    /// (which servers of revision 2025-03-26 may send); false once the session is gone.
    async fn route(&self, value: Value) -> bool {
        let Value::Array(batch) = value else {
            return self.route_one(value).await;
        };
        for message in batch {
            if !self.route_one(message).await {
                return false;
            }
        }
        true
    }

    async fn route_one(&self, value: Value) -> bool {
        let message = match answer_or_pass_on(&self.pending, value, &self.label).await {
            Some(Message::Notification(notification)) => {
                match self.progress.deliver(notification) {
                    Ok(()) => return true,
                    Err(other) => Message::Notification(other),
                }
            }
            Some(other) => other,
            None => return true,
        };
        self.to_session.send(message).await.is_ok()
    }

    /// Answers every waiting caller with an upstream error saying `why`.
    async fn fail_every_caller(&self, why: &str) {
        let error = upstream_error(why);
        for (_, waiter) in self.pending.lock().await.callers.drain() {
            let _ = waiter.send(Err(error.clone()));
        }
    }

    /// A message of the server's over `max` bytes was dropped unread: its caller, where it
    /// can be told (`id`, found at either end of the message, or the only caller waiting),
    /// gets an error now instead of waiting for `request_timeout_seconds`.
    async fn drop_too_large(&self, length: usize, max: usize, id: Option<i64>) {
        tracing::warn!(server = %self.label, length, max, "server sent a message over daemon.max_server_message_bytes; dropped");
        self.fail_caller_of(id, &too_large(length, max)).await;
    }

    /// A line of the server's that is not JSON was dropped: if it reads as the answer to a
    /// request mcp-guard sent (its `id` next to `"jsonrpc":"2.0"` at either end), that
    /// request fails now. A line without one (a server's stray log output) fails nothing.
    async fn drop_unreadable(&self, line: &[u8], error: &serde_json::Error) {
        tracing::warn!(server = %self.label, error = %error, "server wrote a line that is not JSON; dropped");
        if let Some((id, problem)) = unreadable_answer(line, error) {
            fail_caller(&self.pending, id, &problem).await;
        }
    }

    /// Fails the caller of a dropped message: the one it names (`id`) or, without one, the
    /// only caller waiting.
    async fn fail_caller_of(&self, id: Option<i64>, problem: &str) {
        let pending = &mut self.pending.lock().await.callers;
        let caller = match id {
            Some(id) => pending.remove(&id),
            None if pending.len() == 1 => pending.drain().next().map(|(_, waiter)| waiter),
            None => None,
        };
        if let Some(waiter) = caller {
            let _ = waiter.send(Err(upstream_error(problem)));
        }
    }

    /// The server's output ended: dropping the waiters tells every caller the server is gone,
    /// and a request sent from now on fails at once.
    async fn end(&self) {
        let mut pending = self.pending.lock().await;
        pending.ended = true;
        pending.callers.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sh -c script` as a server process, unconfined, labelled `label`.
    fn spawn_shell_script(script: &str, label: &str) -> (Upstream, ServerMessages) {
        let command = ["sh", "-c", script].map(String::from);
        let launch = stdio::Launch {
            command: &command,
            env: &Default::default(),
            account: None,
            cgroup: None,
            identity_env: Vec::new(),
            label: label.into(),
            max_message_bytes: 1 << 20,
            ends_with_this_process: false,
        };
        stdio::spawn(launch).unwrap()
    }

    /// A server process that takes longer to start than `request_timeout` answers its first
    /// request (the start-up allowance); its second, which it never answers, times out at
    /// `request_timeout` as every later request would.
    #[tokio::test]
    async fn a_slow_starting_server_is_waited_for_and_then_held_to_its_timeout() {
        let script = r#"sleep 1.5; read line; echo '{"jsonrpc":"2.0","id":1,"result":{}}'; read line; sleep 60"#;
        let (upstream, _server_messages) = spawn_shell_script(script, "slow/1");
        let upstream = upstream.with_request_timeout(Duration::from_secs(1));
        let first = upstream.call("initialize", Some(json!({}))).await;
        assert_eq!(first.unwrap(), Ok(json!({})));
        let second = upstream.call("tools/call", Some(json!({}))).await;
        assert!(
            matches!(&second, Err(UpstreamError::TimedOut { seconds: 1, .. })),
            "{second:?}"
        );
    }

    /// A server whose output has ended (here it closed its stdout and lives on, so a write
    /// to its stdin still succeeds) fails a request at once: nothing would route an answer,
    /// and the call would wait out its whole start-up timeout.
    #[tokio::test]
    async fn a_request_after_the_servers_output_ended_fails_at_once() {
        let (upstream, _server_messages) = spawn_shell_script("exec 1>&-; sleep 60", "mute/1");
        // Time for the reader to see the end of the output.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let call = upstream.call("initialize", Some(json!({})));
        let outcome = tokio::time::timeout(Duration::from_secs(10), call).await;
        assert!(
            matches!(outcome, Ok(Err(UpstreamError::Closed))),
            "{outcome:?}"
        );
        upstream.stop();
    }

    #[tokio::test]
    async fn progress_reaches_its_request_before_the_answer_that_follows_it_reaches_the_caller() {
        let (to_session, mut passed_on) = mpsc::channel(8);
        let router = Router::new(to_session, "test".into());
        let (answer, mut answered) = oneshot::channel();
        router.pending.lock().await.callers.insert(7, answer);
        let (route, mut routed) = mpsc::channel(8);
        let (outbox, _) = mpsc::channel(8);
        let mut params = json!({"_meta": {"progressToken": "p"}});
        let destination = progress::ProgressDestination {
            route: Some(route),
            outbox: outbox.downgrade(),
        };
        let _flows = router.progress.register(7, Some(&mut params), destination);
        let progress = json!({"jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": 7, "progress": 1}});
        assert!(router.route(progress).await);
        assert!(
            router
                .route(json!({"jsonrpc": "2.0", "id": 7, "result": {}}))
                .await
        );
        assert_eq!(answered.try_recv().unwrap(), Ok(json!({})));
        let delivered = routed
            .try_recv()
            .expect("on the route as soon as the answer is");
        assert_eq!(delivered["params"]["progressToken"], json!("p"));
        let other = json!({"jsonrpc": "2.0", "method": "notifications/message",
            "params": {"level": "info", "data": "x"}});
        assert!(router.route(other).await);
        assert!(
            matches!(passed_on.try_recv(), Ok(Message::Notification(n)) if n.method == "notifications/message"),
            "other notifications go to the session"
        );
    }

    /// A router with callers waiting for answers 7 and 8.
    async fn waiting_for_7_and_8() -> (
        Router,
        oneshot::Receiver<Result<Value, Value>>,
        oneshot::Receiver<Result<Value, Value>>,
    ) {
        let (to_session, _) = mpsc::channel(8);
        let router = Router::new(to_session, "test".into());
        let (seven, seven_answered) = oneshot::channel();
        let (eight, eight_answered) = oneshot::channel();
        router.pending.lock().await.callers.insert(7, seven);
        router.pending.lock().await.callers.insert(8, eight);
        (router, seven_answered, eight_answered)
    }

    fn failed_with(answered: &mut oneshot::Receiver<Result<Value, Value>>, words: &str) {
        let error = answered.try_recv().expect("answered now").unwrap_err();
        assert_eq!(error["code"], crate::mcp::jsonrpc::codes::UPSTREAM_ERROR);
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(words), "{message}");
    }

    #[tokio::test]
    async fn each_answer_of_a_batch_reaches_its_caller() {
        let (router, mut seven, mut eight) = waiting_for_7_and_8().await;
        let batch = json!([{"jsonrpc": "2.0", "id": 8, "result": {"n": 8}},
                           {"jsonrpc": "2.0", "id": 7, "error": {"code": 1, "message": "no"}}]);
        assert!(router.route(batch).await);
        assert_eq!(eight.try_recv().unwrap(), Ok(json!({"n": 8})));
        assert_eq!(
            seven.try_recv().unwrap(),
            Err(json!({"code": 1, "message": "no"}))
        );
    }

    #[tokio::test]
    async fn an_invalid_answer_fails_its_caller_at_once_and_no_other() {
        let (router, mut seven, mut eight) = waiting_for_7_and_8().await;
        let invalid = json!({"jsonrpc": "1.0", "id": 7, "result": {}});
        assert!(router.route(invalid).await);
        failed_with(&mut seven, "the server sent an invalid answer");
        assert!(eight.try_recv().is_err(), "8 still waits");
        // An invalid request of the server's that happens to use 8 as its id fails nothing.
        let request = json!({"jsonrpc": "2.0", "id": 8, "method": "x", "params": [1]});
        assert!(router.route(request).await);
        assert!(eight.try_recv().is_err(), "8 still waits");
    }

    #[tokio::test]
    async fn a_line_that_is_no_json_fails_the_caller_it_names_and_stray_output_none() {
        let (router, mut seven, mut eight) = waiting_for_7_and_8().await;
        let stray = b"Loading the model...";
        let error = serde_json::from_slice::<Value>(stray).unwrap_err();
        router.drop_unreadable(stray, &error).await;
        assert!(
            seven.try_recv().is_err() && eight.try_recv().is_err(),
            "both still wait"
        );
        let cut = br#"{"jsonrpc":"2.0","id":8,"result":{"content":[{"type":"te"#;
        let error = serde_json::from_slice::<Value>(cut).unwrap_err();
        router.drop_unreadable(cut, &error).await;
        failed_with(&mut eight, "not JSON");
        assert!(seven.try_recv().is_err(), "7 still waits");
    }
}
