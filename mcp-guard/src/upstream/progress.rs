//! How the server's progress notifications find the request they are about.
//!
//! mcp-guard gives every forwarded request that asks for progress a token of its own (the
//! request's upstream id): agents choose their tokens, and two sessions on a shared server, or
//! two requests of one session, may choose the same. Whatever reads the server's output looks
//! the token up among the requests in flight, puts the agent's own token back, and delivers
//! the notification to the request's route or its session's outbox itself, before it reads
//! on: the answer, which comes after it on the same output, then cannot overtake it. Progress
//! about no request in flight (late, or a token mcp-guard never sent) reaches no agent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::mcp::jsonrpc::{Message, Notification, requested_progress_token};

/// How many progress notifications wait on one route for the agent to collect them.
const ROUTE_CAPACITY: usize = 256;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The key of a progress token (a string or a number in JSON).
fn token_key(token: &Value) -> String {
    token.to_string()
}

/// Where the progress notifications about one request go.
#[derive(Clone)]
pub struct ProgressDestination {
    /// The request's own route, if it has one (see [`SessionRoutes::open`]).
    pub route: Option<mpsc::Sender<Value>>,
    /// Its session's outbox, when it has no route or the route is full. Weak: the outbox
    /// closes when the session's relay goes, whatever is in flight.
    pub outbox: mpsc::WeakSender<Value>,
}

/// A request in flight upstream that asked for progress.
struct InFlightRequest {
    /// The token the agent gave.
    agent_token: Value,
    to: ProgressDestination,
}

/// The requests of one server connection that asked for progress, by mcp-guard's token.
#[derive(Clone, Default)]
pub(super) struct InFlight(Arc<Mutex<HashMap<i64, InFlightRequest>>>);

impl InFlight {
    /// Gives request `id`'s progress token (if it has one) the value `id`, and sends its
    /// progress to `to` until the returned guard is dropped.
    pub(super) fn register(
        &self,
        id: i64,
        params: Option<&mut Value>,
        to: ProgressDestination,
    ) -> Option<InFlightGuard> {
        let token = params?.get_mut("_meta")?.get_mut("progressToken")?;
        let agent_token = std::mem::replace(token, Value::from(id));
        lock(&self.0).insert(id, InFlightRequest { agent_token, to });
        Some(InFlightGuard {
            in_flight: self.clone(),
            id,
        })
    }

    /// Delivers a progress notification to its request, under the agent's token; gives
    /// back any other notification.
    pub(super) fn deliver(&self, mut notification: Notification) -> Result<(), Notification> {
        if notification.method != "notifications/progress" {
            return Err(notification);
        }
        let params = notification.params.as_ref();
        let id = params
            .and_then(|p| p.get("progressToken"))
            .and_then(Value::as_i64);
        let request = id.and_then(|id| {
            lock(&self.0)
                .get(&id)
                .map(|r| (r.agent_token.clone(), r.to.clone()))
        });
        let Some((agent_token, to)) = request else {
            tracing::debug!("progress about no request in flight; dropped");
            return Ok(());
        };
        if let Some(params) = notification.params.as_mut() {
            params["progressToken"] = agent_token;
        }
        let value = Message::Notification(notification).to_value();
        let unrouted = match &to.route {
            Some(route) => match route.try_send(value) {
                Ok(()) => return Ok(()),
                Err(unsent) => unsent.into_inner(),
            },
            None => value,
        };
        // Best effort, like every notification: never block the server's output on an agent
        // that is not reading.
        if let Some(outbox) = to.outbox.upgrade() {
            let _ = outbox.try_send(unrouted);
        }
        Ok(())
    }
}

/// Keeps a request's progress flowing to it; dropped when its call ends.
pub(super) struct InFlightGuard {
    in_flight: InFlight,
    id: i64,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        lock(&self.in_flight.0).remove(&self.id);
    }
}

type RouteMap = HashMap<String, mpsc::Sender<Value>>;

/// The routes of one agent session's requests, by the agent's progress token.
#[derive(Default)]
pub struct SessionRoutes(Arc<Mutex<RouteMap>>);

impl SessionRoutes {
    /// Routes the progress notifications about the request with `token` to the returned
    /// route until it is dropped; None when the token is already routed (another request in
    /// flight uses it: its notifications go to the outbox).
    pub fn open(&self, token: &Value) -> Option<ProgressRoute> {
        let key = token_key(token);
        let mut routes = lock(&self.0);
        if routes.contains_key(&key) {
            return None;
        }
        let (sender, notifications) = mpsc::channel(ROUTE_CAPACITY);
        routes.insert(key.clone(), sender);
        Some(ProgressRoute {
            routes: Arc::downgrade(&self.0),
            key,
            notifications,
        })
    }

    /// The route of the request whose params carry `_meta.progressToken`, if it has one.
    pub fn route_for(&self, params: Option<&Value>) -> Option<mpsc::Sender<Value>> {
        let token = requested_progress_token(params)?;
        lock(&self.0).get(&token_key(token)).cloned()
    }
}

/// A request's own route for its progress notifications; dropping it removes the route.
pub struct ProgressRoute {
    routes: Weak<Mutex<RouteMap>>,
    key: String,
    notifications: mpsc::Receiver<Value>,
}

impl ProgressRoute {
    /// The messages for the agent while `answer` (the request's handling) runs: its progress
    /// notifications as they come, then the answer.
    pub fn ahead_of<F>(self, answer: F) -> ProgressThenAnswer<F> {
        ProgressThenAnswer {
            answer: Some(answer),
            route: self,
            last: None,
        }
    }
}

impl Drop for ProgressRoute {
    fn drop(&mut self) {
        if let Some(routes) = self.routes.upgrade() {
            lock(&*routes).remove(&self.key);
        }
    }
}

/// See [`ProgressRoute::ahead_of`].
pub struct ProgressThenAnswer<F> {
    answer: Option<F>,
    route: ProgressRoute,
    last: Option<Value>,
}

impl<F: std::future::Future<Output = Option<Value>> + Unpin> ProgressThenAnswer<F> {
    /// The next message for the agent, and whether more follow; None once all went (or a
    /// request without an answer ended).
    pub async fn next_message(&mut self) -> Option<(Value, bool)> {
        if let Some(answer) = self.answer.as_mut() {
            tokio::select! {
                biased;
                Some(progress) = self.route.notifications.recv() => return Some((progress, true)),
                answer = answer => {
                    self.answer = None;
                    self.last = answer;
                }
            }
        }
        // Delivered before the answer was read: all of them are here by now.
        if let Ok(progress) = self.route.notifications.try_recv() {
            return Some((progress, true));
        }
        self.last.take().map(|answer| (answer, false))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn progress(token: Value, step: u64) -> Notification {
        Notification {
            method: "notifications/progress".into(),
            params: Some(json!({"progressToken": token, "progress": step})),
        }
    }

    fn outbox() -> (mpsc::Sender<Value>, mpsc::Receiver<Value>) {
        mpsc::channel(8)
    }

    #[tokio::test]
    async fn progress_delivered_before_the_answer_goes_out_ahead_of_it() {
        let routes = SessionRoutes::default();
        let route = routes.open(&json!("t")).unwrap();
        let mut messages = route.ahead_of(Box::pin(async { Some(json!({"id": 1})) }));
        let sender = routes
            .route_for(Some(&json!({"_meta": {"progressToken": "t"}})))
            .unwrap();
        for step in [1, 2] {
            sender
                .try_send(Message::Notification(progress(json!("t"), step)).to_value())
                .unwrap();
        }
        let mut order = Vec::new();
        while let Some((message, more)) = messages.next_message().await {
            order.push((message["params"]["progress"].clone(), more));
        }
        assert_eq!(
            order,
            [(json!(1), true), (json!(2), true), (Value::Null, false)]
        );
    }

    #[test]
    fn a_token_in_use_is_not_routed_twice_and_a_dropped_route_frees_it() {
        let routes = SessionRoutes::default();
        let first = routes.open(&json!(1)).unwrap();
        assert!(routes.open(&json!(1)).is_none());
        let params = json!({"_meta": {"progressToken": 1}});
        assert!(routes.route_for(Some(&params)).is_some());
        assert!(
            routes
                .route_for(Some(&json!({"_meta": {"progressToken": "1"}})))
                .is_none(),
            "a string is not the number"
        );
        drop(first);
        assert!(routes.route_for(Some(&params)).is_none());
        assert!(routes.open(&json!(1)).is_some());
    }

    #[test]
    fn the_server_sees_mcp_guards_token_and_the_agent_gets_its_own_back() {
        let in_flight = InFlight::default();
        let (to_agent, mut agent) = outbox();
        let to = ProgressDestination {
            route: None,
            outbox: to_agent.downgrade(),
        };
        let mut params = json!({"name": "slow", "_meta": {"progressToken": "agent's"}});
        let guard = in_flight.register(41, Some(&mut params), to).unwrap();
        assert_eq!(params["_meta"]["progressToken"], json!(41));
        assert!(in_flight.deliver(progress(json!(41), 1)).is_ok());
        let delivered = agent.try_recv().unwrap();
        assert_eq!(delivered["params"]["progressToken"], json!("agent's"));
        assert_eq!(delivered["params"]["progress"], json!(1));
        drop(guard);
        assert!(in_flight.deliver(progress(json!(41), 2)).is_ok());
        assert!(agent.try_recv().is_err(), "the call ended: dropped");
    }

    #[test]
    fn two_requests_with_the_same_agent_token_each_get_their_own_progress() {
        let in_flight = InFlight::default();
        let (to_a, mut a) = outbox();
        let (to_b, mut b) = outbox();
        let (route, mut routed) = mpsc::channel(8);
        let mut params_a = json!({"_meta": {"progressToken": 1}});
        let mut params_b = json!({"_meta": {"progressToken": 1}});
        let to = |outbox: &mpsc::Sender<Value>, route| ProgressDestination {
            route,
            outbox: outbox.downgrade(),
        };
        let _a = in_flight.register(7, Some(&mut params_a), to(&to_a, Some(route)));
        let _b = in_flight.register(8, Some(&mut params_b), to(&to_b, None));
        in_flight.deliver(progress(json!(8), 5)).unwrap();
        in_flight.deliver(progress(json!(7), 6)).unwrap();
        in_flight.deliver(progress(json!(9), 7)).unwrap();
        assert_eq!(routed.try_recv().unwrap()["params"]["progress"], json!(6));
        assert_eq!(b.try_recv().unwrap()["params"]["progress"], json!(5));
        assert!(a.try_recv().is_err() && b.try_recv().is_err() && routed.try_recv().is_err());
    }

    #[test]
    fn requests_without_a_token_and_other_notifications_are_left_alone() {
        let in_flight = InFlight::default();
        let (to_agent, _agent) = outbox();
        let to = ProgressDestination {
            route: None,
            outbox: to_agent.downgrade(),
        };
        let mut params = json!({"name": "echo"});
        assert!(in_flight.register(1, Some(&mut params), to).is_none());
        assert_eq!(params, json!({"name": "echo"}));
        let list_changed = Notification {
            method: "notifications/tools/list_changed".into(),
            params: None,
        };
        assert!(in_flight.deliver(list_changed).is_err());
    }
}
