//! Servers with `"isolation": "shared"`: one process serves every agent session of its
//! server. What it sends on its own is fanned out to the sessions that may see it, and what
//! one process holds for all (tasks, resource subscriptions) is kept apart per session.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};

use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};

use super::session::{
    AgentSession, Caller, Launch, PlacedCgroup, SessionServer, Target, spawn_placed,
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
    _cgroup: Option<PlacedCgroup>,
    initialize: tokio::sync::OnceCell<upstream::Outcome>,
    subscribers: std::sync::Mutex<Vec<Subscriber>>,
    /// URI → the sessions subscribed to its updates. The process holds one subscription per
    /// URI for all of them: it is told when the first session subscribes and when the last
    /// one leaves.
    resource_subscribers: std::sync::Mutex<HashMap<String, HashSet<String>>>,
    /// Held while the process is told of a subscription change, so that changes do not
    /// interleave (a session subscribing while the last other one leaves).
    subscription_changes: Mutex<()>,
}

impl SharedServer {
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
            _cgroup: placed,
            initialize: tokio::sync::OnceCell::new(),
            subscribers: std::sync::Mutex::new(Vec::new()),
            resource_subscribers: std::sync::Mutex::new(HashMap::new()),
            subscription_changes: Mutex::new(()),
        });
        tokio::spawn(fan_out_server_messages(
            Arc::downgrade(proxy),
            server.to_owned(),
            Arc::downgrade(&shared),
            server_messages,
        ));
        Ok(shared)
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
        self.subscribers
            .lock()
            .expect("subscribers lock")
            .push(Subscriber {
                session: Arc::downgrade(&session),
                to_agent,
            });
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
        if outcome.is_ok() {
            let mut subscribers = self.resource_subscribers();
            let sessions = subscribers.entry(uri.clone()).or_default();
            if method == "resources/subscribe" {
                sessions.insert(session.id.clone());
            } else {
                sessions.remove(&session.id);
            }
            if sessions.is_empty() {
                subscribers.remove(&uri);
            }
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
                    proxy.count_withheld(server, &notification.method);
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
                let mut subscribers = shared.subscribers.lock().expect("subscribers lock");
                subscribers.retain(|s| !s.to_agent.is_closed());
                let value = Message::Notification(notification.clone()).to_value();
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
