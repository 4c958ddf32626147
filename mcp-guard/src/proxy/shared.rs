//! Servers with `"isolation": "shared"`: one process serves every agent session of its
//! server. What it sends on its own is fanned out to the sessions that may see it, and what
//! one process holds for all (tasks, resource subscriptions) is kept apart per session.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};

use super::session::{
    AgentSession, Caller, Launch, PlacedCgroup, SessionServer, Target, release, spawn_placed,
};
use super::{Placement, Proxy, ProxyError};
use crate::mcp::jsonrpc::{Id, Message};
use crate::upstream::{self, ServerMessages, Upstream};

/// A server process that serves every session of its server (`"isolation": "shared"`): one
/// process, one `initialize` (later sessions get its answer), notifications fanned out to the
/// sessions that may see them. It cannot ask one particular agent anything, so its own requests (sampling,
/// elicitation, roots) are refused.
pub struct SharedServer {
    upstream: Arc<Upstream>,
    cgroup: Option<PlacedCgroup>,
    initialize: tokio::sync::OnceCell<upstream::Outcome>,
    subscribers: std::sync::Mutex<Vec<Subscriber>>,
    /// URI → the sessions subscribed to its updates. The process holds one subscription per
    /// URI for all of them: it is told when the first session subscribes and when the last
    /// one leaves.
    resource_subscribers: std::sync::Mutex<HashMap<String, HashSet<String>>>,
    /// Held while the process is told of a subscription change, so that changes do not
    /// interleave (a session subscribing while the last other one leaves).
    subscription_changes: Mutex<()>,
    /// Task statuses no session could be given yet: the server may send a task's first
    /// status before the answer that creates it, and until that answer nobody owns the task.
    early_task_statuses: std::sync::Mutex<EarlyTaskStatuses>,
    /// Whether the process is retired (it exited). Read-held while a session joins and is put
    /// on record (joins overlap: each writes its start record), so that the retirement either
    /// finds that session among those to end or the session finds the process retired and
    /// joins the next one.
    retired: tokio::sync::RwLock<bool>,
}

/// At most this many early task statuses are held; the oldest goes first.
const MAX_EARLY_TASK_STATUSES: usize = 64;
/// An early task status whose task no session noted within this long is dropped.
const EARLY_TASK_STATUS_LIFETIME: Duration = Duration::from_secs(30);

/// Task statuses that came before their task's creation answer, oldest first.
#[derive(Default)]
struct EarlyTaskStatuses(VecDeque<EarlyTaskStatus>);

struct EarlyTaskStatus {
    task_id: String,
    received: Instant,
    message: Value,
}

impl EarlyTaskStatuses {
    /// Holds `message`, the status of `task_id`, dropping the expired and the oldest beyond
    /// the bound.
    fn hold(&mut self, task_id: &str, message: Value) {
        let now = Instant::now();
        self.0
            .retain(|early| now.duration_since(early.received) < EARLY_TASK_STATUS_LIFETIME);
        if self.0.len() >= MAX_EARLY_TASK_STATUSES {
            self.0.pop_front();
        }
        self.0.push_back(EarlyTaskStatus {
            task_id: task_id.to_owned(),
            received: now,
            message,
        });
    }

    /// Takes the statuses held for `task_id`, oldest first.
    fn take(&mut self, task_id: &str) -> Vec<Value> {
        let (theirs, others) = std::mem::take(&mut self.0)
            .into_iter()
            .partition::<VecDeque<_>, _>(|early| early.task_id == task_id);
        self.0 = others;
        theirs.into_iter().map(|early| early.message).collect()
    }
}

impl SharedServer {
    /// Stops the process and ends whatever it left in its cgroup, which is given back: what
    /// a shared process started does not outlive it either.
    pub(super) async fn end(&self) {
        self.upstream.stop();
        release(self.cgroup.as_ref()).await;
    }

    /// Starts the shared process for `server` in the cgroup `<server>/shared`.
    pub(super) async fn start(
        proxy: &Arc<Proxy>,
        server: &str,
        launch: Launch<'_>,
        placement: &Placement,
    ) -> Result<Arc<SharedServer>, ProxyError> {
        let Target::Command(program) = launch.target else {
            return Err(ProxyError::NotSpawnable(server.to_owned()));
        };
        let identity_env = vec![
            ("MCP_GUARD_SERVER", server.to_owned()),
            ("MCP_GUARD_SESSION", "shared".to_owned()),
        ];
        let label = Arc::from(format!("{server}/shared"));
        let (upstream, server_messages, placed) =
            spawn_placed(placement, server, "shared", program, identity_env, label).await?;
        let upstream = upstream
            .with_request_timeout(launch.request_timeout)
            .with_answer_polling(launch.answer_poll);
        let shared = Arc::new(SharedServer {
            upstream: Arc::new(upstream),
            cgroup: placed,
            initialize: tokio::sync::OnceCell::new(),
            subscribers: std::sync::Mutex::new(Vec::new()),
            resource_subscribers: std::sync::Mutex::new(HashMap::new()),
            subscription_changes: Mutex::new(()),
            early_task_statuses: Default::default(),
            retired: tokio::sync::RwLock::new(false),
        });
        tokio::spawn(fan_out_server_messages(
            Arc::downgrade(proxy),
            server.to_owned(),
            Arc::downgrade(&shared),
            server_messages,
        ));
        Ok(shared)
    }

    /// Leave to join the process, held until the joining session is on record; `None` once
    /// the process is retired.
    pub(super) async fn admission(&self) -> Option<tokio::sync::RwLockReadGuard<'_, bool>> {
        let retired = self.retired.read().await;
        (!*retired).then_some(retired)
    }

    /// Retires the process for good: no session joins it after this returns.
    pub(super) async fn close_admission(&self) {
        *self.retired.write().await = true;
    }

    /// A new session on the shared process.
    pub(super) fn join(
        self: &Arc<Self>,
        server: &str,
        id: String,
        caller: Caller,
    ) -> Arc<AgentSession> {
        let process = SessionServer {
            upstream: self.upstream.clone(),
            shared: Some(self.clone()),
            cgroup: None,
        };
        let (session, to_agent) = AgentSession::open(id, server, caller, process);
        let mut subscribers = self.subscribers.lock().expect("subscribers lock");
        // Also here, not only when a notification is fanned out: a server that never sends
        // one would otherwise keep an entry for every session that ever joined.
        subscribers.retain(|s| !s.to_agent.is_closed());
        subscribers.push(Subscriber {
            session: Arc::downgrade(&session),
            to_agent,
        });
        drop(subscribers);
        session
    }

    /// `session`'s `resources/subscribe` or `resources/unsubscribe` of the URI in `params`:
    /// sent on to the process only when no other session is subscribed to that URI, and
    /// answered `{}` here otherwise, so that one session's unsubscribe does not end the
    /// updates the others asked for.
    pub(super) async fn change_subscription(
        &self,
        session: &AgentSession,
        agent_id: &Id,
        method: &str,
        params: Option<Value>,
    ) -> Result<upstream::Outcome, upstream::UpstreamError> {
        let uri = params.as_ref().and_then(|p| p.get("uri"));
        let Some(uri) = uri.and_then(Value::as_str).map(str::to_owned) else {
            // Malformed: the server says what is wrong with it.
            return session.call_upstream(agent_id, method, params).await;
        };
        let _one_change_at_a_time = self.subscription_changes.lock().await;
        let others_subscribed = self.subscribed_to(&uri).iter().any(|id| *id != session.id);
        let outcome = if others_subscribed {
            Ok(json!({}))
        } else {
            session.call_upstream(agent_id, method, params).await?
        };
        if outcome.is_err() {
            return Ok(outcome);
        }
        let nobody_left_to_undo_it = {
            let mut subscribers = self.resource_subscribers();
            let sessions = subscribers.entry(uri.clone()).or_default();
            if method == "resources/subscribe" {
                // A session that ended meanwhile has left its subscriptions already.
                if !session.has_ended() {
                    sessions.insert(session.id.clone());
                }
            } else {
                sessions.remove(&session.id);
            }
            let nobody_subscribed = sessions.is_empty();
            if nobody_subscribed {
                subscribers.remove(&uri);
            }
            method == "resources/subscribe" && !others_subscribed && nobody_subscribed
        };
        if nobody_left_to_undo_it {
            // The process subscribed for a session that ended meanwhile, after that session
            // left its subscriptions: undone here, or the process would send updates for
            // nobody until it exits.
            let params = Some(json!({"uri": uri}));
            let _ = self.upstream.call("resources/unsubscribe", params).await;
        }
        Ok(outcome)
    }

    fn resource_subscribers(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<String>>> {
        self.resource_subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The sessions subscribed to `uri`'s updates.
    fn subscribed_to(&self, uri: &str) -> HashSet<String> {
        self.resource_subscribers()
            .get(uri)
            .cloned()
            .unwrap_or_default()
    }

    /// Drops an ending session's subscriptions. The process is told to unsubscribe from the
    /// URIs no session wants any more, in the background (the session's end does not wait
    /// for the server), unless a session subscribed again meanwhile.
    pub(super) fn leave_subscriptions(self: &Arc<Self>, session: &str) {
        let mut unwanted = Vec::new();
        self.resource_subscribers().retain(|uri, sessions| {
            if sessions.remove(session) && sessions.is_empty() {
                unwanted.push(uri.clone());
            }
            !sessions.is_empty()
        });
        if unwanted.is_empty() {
            return;
        }
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let _one_change_at_a_time = shared.subscription_changes.lock().await;
            for uri in unwanted {
                if shared.subscribed_to(&uri).is_empty() {
                    let params = Some(json!({"uri": uri}));
                    let _ = shared.upstream.call("resources/unsubscribe", params).await;
                }
            }
        });
    }

    /// Notes that `session` created the task `task_id`, and gives it the task's statuses
    /// that came before the answer creating it.
    pub(super) fn task_created(
        &self,
        session: &AgentSession,
        task_id: &str,
        instruction: Option<String>,
    ) {
        let held = {
            // Under this lock, so that a status does not slip in between: the fan-out either
            // sees the task as the session's or holds the status for this to hand over.
            let mut early = self.early_task_statuses();
            session.remember_task(task_id, instruction);
            early.take(task_id)
        };
        if held.is_empty() {
            return;
        }
        let subscribers = self.subscribers.lock().expect("subscribers lock");
        let outbox = subscribers
            .iter()
            .find(|subscriber| std::ptr::eq(subscriber.session.as_ptr(), session));
        for message in held {
            if let Some(outbox) = outbox {
                let _ = outbox.to_agent.try_send(message);
            }
        }
    }

    fn early_task_statuses(&self) -> std::sync::MutexGuard<'_, EarlyTaskStatuses> {
        self.early_task_statuses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The server's answer to the first `initialize`, sent once.
    pub(super) async fn initialize(
        &self,
        params: Option<Value>,
    ) -> Result<upstream::Outcome, upstream::UpstreamError> {
        let outcome = self
            .initialize
            .get_or_try_init(|| self.upstream.call("initialize", params))
            .await?;
        Ok(outcome.clone())
    }
}

/// A session on a shared server, and its outbox.
struct Subscriber {
    session: Weak<AgentSession>,
    to_agent: mpsc::Sender<Value>,
}

impl Subscriber {
    fn created_task(&self, task_id: &str) -> bool {
        (self.session.upgrade()).is_some_and(|session| session.created_task(task_id))
    }
}

/// Passes what a shared server sends on its own to every session on it that may see it (not its progress,
/// which reaches the session it is about: see [`crate::upstream::progress`]). When its output ends
/// while it is in use (its process exited), retires it (see [`Proxy::retire_shared_server`]).
async fn fan_out_server_messages(
    proxy: Weak<Proxy>,
    server: String,
    shared: Weak<SharedServer>,
    mut server_messages: ServerMessages,
) {
    fan_out_until_the_server_ends(&proxy, &server, &shared, &mut server_messages).await;
    if let (Some(proxy), Some(shared)) = (proxy.upgrade(), shared.upgrade()) {
        proxy.retire_shared_server(&server, &shared).await;
    }
}

async fn fan_out_until_the_server_ends(
    proxy: &Weak<Proxy>,
    server: &str,
    shared: &Weak<SharedServer>,
    server_messages: &mut ServerMessages,
) {
    while let Some(message) = server_messages.recv().await {
        let (Some(proxy), Some(shared)) = (proxy.upgrade(), shared.upgrade()) else {
            break;
        };
        match message {
            Message::Request(request) => {
                let error = json!({"code": crate::mcp::jsonrpc::codes::METHOD_NOT_FOUND,
                    "message": "a shared server cannot send requests to one particular agent"});
                let _ = shared.upstream.reply(&request.id, Err(error)).await;
            }
            Message::Notification(notification) => {
                if notification.method == "notifications/tools/list_changed" {
                    proxy.forget_catalogs_of(server).await;
                }
                if notification.method == "notifications/message" {
                    // A shared process's log cannot say whose work it is about, and may
                    // name what one agent did: it goes to mcp-guard's log, not to every agent.
                    let params = notification.params.unwrap_or_default();
                    tracing::debug!(server, %params, "log message of a shared server");
                    proxy.count_withheld(server, &notification.method, 1);
                    continue;
                }
                // A resource's updates go to the sessions that subscribed to it.
                let uri = notification.params.as_ref().and_then(|p| p.get("uri"));
                let subscribed = match uri.and_then(Value::as_str) {
                    Some(uri) if notification.method == "notifications/resources/updated" => {
                        Some(shared.subscribed_to(uri))
                    }
                    _ => None,
                };
                // A task's status waits for its task's creator, who may not be known yet.
                let task_status = (notification.method == "notifications/tasks/status")
                    .then(|| notification.params.as_ref()?.get("taskId")?.as_str())
                    .flatten();
                let mut early = task_status.map(|_| shared.early_task_statuses());
                let mut subscribers = shared.subscribers.lock().expect("subscribers lock");
                subscribers.retain(|s| !s.to_agent.is_closed());
                let value = Message::Notification(notification.clone()).to_value();
                if let (Some(task_id), Some(early)) = (task_status, &mut early)
                    && !subscribers.iter().any(|s| s.created_task(task_id))
                {
                    // Its creator is one of these sessions; the others are kept from it.
                    let others = subscribers.len().saturating_sub(1) as u64;
                    proxy.count_withheld(server, &notification.method, others);
                    early.hold(task_id, value);
                    continue;
                }
                for subscriber in subscribers.iter() {
                    let may_see = subscriber.session.upgrade().is_some_and(|session| {
                        subscribed
                            .as_ref()
                            .is_none_or(|ids| ids.contains(&session.id))
                            && proxy.may_see(&session, &notification)
                    });
                    if may_see {
                        let _ = subscriber.to_agent.try_send(value.clone());
                    }
                }
            }
            Message::Response(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(task_id: &str, n: u64) -> Value {
        json!({"method": "notifications/tasks/status", "params": {"taskId": task_id, "n": n}})
    }

    #[test]
    fn early_task_statuses_are_handed_over_per_task_in_order() {
        let mut early = EarlyTaskStatuses::default();
        early.hold("a", status("a", 1));
        early.hold("b", status("b", 1));
        early.hold("a", status("a", 2));
        assert_eq!(early.take("a"), [status("a", 1), status("a", 2)]);
        assert!(early.take("a").is_empty(), "handed over once");
        assert_eq!(early.take("b"), [status("b", 1)]);
    }

    #[test]
    fn early_task_statuses_keep_only_the_newest() {
        let mut early = EarlyTaskStatuses::default();
        for n in 0..(MAX_EARLY_TASK_STATUSES as u64 + 5) {
            early.hold("a", status("a", n));
        }
        let held = early.take("a");
        assert_eq!(held.len(), MAX_EARLY_TASK_STATUSES);
        assert_eq!(held[0], status("a", 5), "the oldest went first");
    }
}
