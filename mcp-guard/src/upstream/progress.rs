//! A request's own route for the server's progress notifications about it (a request whose
//! answer streams back on its own, like an HTTP front's POST).
//!
//! Whatever reads the server's output delivers a progress notification to its route itself,
//! before it reads on: the answer, which comes after it on the same output, then cannot reach
//! the caller ahead of it. (Handed to the session's relay like other server messages, the last
//! notification could still be queued there when the caller already had the answer.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::mcp::jsonrpc::{Message, Notification};

/// How many progress notifications wait on one route for the agent to collect them.
const ROUTE_CAPACITY: usize = 256;

type RouteMap = HashMap<String, mpsc::Sender<Value>>;

/// The routes of one server connection, by progress token.
#[derive(Clone, Default)]
pub(super) struct Routes(Arc<Mutex<RouteMap>>);

impl Routes {
    /// Routes the notifications for `token` to the returned route until it is dropped; None
    /// when the token is already routed (another request in flight uses it: its
    /// notifications keep going to the session).
    pub(super) fn open(&self, token: &Value) -> Option<ProgressRoute> {
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

    /// Delivers `notification` to its request's route; gives it back when it has none (not
    /// progress, a token nobody routes, or a route that is full).
    pub(super) fn deliver(&self, notification: Notification) -> Result<(), Notification> {
        let Some(route) = self.route_of(&notification) else {
            return Err(notification);
        };
        match route.try_send(Message::Notification(notification.clone()).to_value()) {
            Ok(()) => Ok(()),
            Err(_) => Err(notification),
        }
    }

    fn route_of(&self, notification: &Notification) -> Option<mpsc::Sender<Value>> {
        if notification.method != "notifications/progress" {
            return None;
        }
        let token = notification.params.as_ref()?.get("progressToken")?;
        lock(&self.0).get(&token_key(token)).cloned()
    }
}

fn lock(routes: &Mutex<RouteMap>) -> MutexGuard<'_, RouteMap> {
    routes.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The key of a progress token (a string or a number in JSON).
fn token_key(token: &Value) -> String {
    token.to_string()
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
            lock(&routes).remove(&self.key);
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

    #[tokio::test]
    async fn progress_delivered_before_the_answer_goes_out_ahead_of_it() {
        let routes = Routes::default();
        let route = routes.open(&json!("t")).unwrap();
        let mut messages = route.ahead_of(Box::pin(async { Some(json!({"id": 1})) }));
        routes.deliver(progress(json!("t"), 1)).unwrap();
        routes.deliver(progress(json!("t"), 2)).unwrap();
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
    fn a_notification_without_a_route_is_given_back() {
        let routes = Routes::default();
        let _route = routes.open(&json!(7)).unwrap();
        assert!(
            routes.deliver(progress(json!(8), 1)).is_err(),
            "other token"
        );
        assert!(
            routes.deliver(progress(json!("7"), 1)).is_err(),
            "a string is not the number"
        );
        let list_changed = Notification {
            method: "notifications/tools/list_changed".into(),
            params: Some(json!({"progressToken": 7})),
        };
        assert!(routes.deliver(list_changed).is_err(), "not progress");
        assert!(routes.deliver(progress(json!(7), 1)).is_ok());
    }

    #[test]
    fn a_token_in_use_is_not_routed_twice_and_a_dropped_route_frees_it() {
        let routes = Routes::default();
        let first = routes.open(&json!(1)).unwrap();
        assert!(routes.open(&json!(1)).is_none());
        drop(first);
        assert!(routes.open(&json!(1)).is_some());
        assert!(
            routes.deliver(progress(json!(1), 1)).is_err(),
            "dropped at once"
        );
    }
}
