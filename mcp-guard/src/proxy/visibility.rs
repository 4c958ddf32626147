//! What an agent may see beyond what it asked for by name: the prompts and resource
//! templates a completion names, the tasks of a shared server, and the notifications a server
//! sends on its own. Each is judged as the lists are (see `Proxy::filter_list`): nothing an
//! agent cannot use shows through another door.

use serde_json::Value;

use super::session::{AgentSession, Caller};
use super::{Proxy, Refusal};
use crate::audit::Reference;
use crate::mcp::jsonrpc::{Notification, Request};
use crate::policy::{CompiledPolicy, DecisionRequest};

impl Proxy {
    /// Whether the session's agent may see a message its server sent on its own: an update
    /// of a resource only when the agent could read that resource (as `resources/list` would
    /// show it to them), so that a resource hidden from them does not show through its
    /// updates; a task's status, on a shared server, only when the session created the task.
    /// One withheld is counted.
    pub(super) fn may_see(&self, session: &AgentSession, notification: &Notification) -> bool {
        let visible = match notification.method.as_str() {
            "notifications/tasks/status" => {
                session_may_see_task(session, notification.params.as_ref())
            }
            "notifications/resources/updated" => self.may_see_update(session, notification),
            _ => true,
        };
        if !visible {
            self.count_withheld(&session.server, &notification.method, 1);
        }
        visible
    }

    fn may_see_update(&self, session: &AgentSession, notification: &Notification) -> bool {
        if self.mode_of(&session.server).lets_everything_through() {
            return true;
        }
        let uri = notification.params.as_ref().and_then(|p| p.get("uri"));
        uri.and_then(Value::as_str).is_some_and(|uri| {
            could_use(
                &self.policy(),
                session,
                session.caller(),
                "resources/read",
                uri,
            )
        })
    }

    /// Counts a server notification kept from `sessions` agents (`method` is one of the few
    /// that ever are, so the label stays bounded).
    pub(super) fn count_withheld(&self, server: &str, method: &str, sessions: u64) {
        self.metrics
            .notifications_withheld
            .with_label_values(&[server, method])
            .inc_by(sessions);
    }
}

/// A completion names the prompt or resource template it completes an argument of
/// (`params.ref`); one the caller could not use is answered as unknown, so completion cannot
/// reveal what lists hide.
pub(super) fn check_completion_reference(
    policy: &CompiledPolicy,
    decision_request: &DecisionRequest<'_>,
    request: &Request,
) -> Result<(), Refusal> {
    let Some(reference) = completion_reference(request) else {
        return Err(Refusal::invalid(
            &request.id,
            "completion/complete needs params.ref: a ref/prompt with a name or a ref/resource with a uri",
        ));
    };
    let (use_method, kind, name) = match &reference {
        Reference::Prompt { name } => ("prompts/get", "prompt", name),
        Reference::Resource { uri } => ("resources/read", "resource", uri),
    };
    let visible = policy.visible(&DecisionRequest {
        method: use_method,
        name: Some(name),
        arguments: None,
        ..*decision_request
    });
    if visible {
        Ok(())
    } else {
        Err(Refusal::unknown_reference(&request.id, kind, name))
    }
}

/// The prompt or resource template a `completion/complete` names (`params.ref`).
pub(super) fn completion_reference(request: &Request) -> Option<Reference> {
    if request.method != "completion/complete" {
        return None;
    }
    let reference = request.params.as_ref()?.get("ref")?;
    let field = |key: &str| Some(reference.get(key)?.as_str()?.to_owned());
    match reference.get("type")?.as_str()? {
        "ref/prompt" => Some(Reference::Prompt {
            name: field("name")?,
        }),
        "ref/resource" => Some(Reference::Resource { uri: field("uri")? }),
        _ => None,
    }
}

/// The task methods that name one task (`params.taskId`).
const TASK_METHODS: [&str; 3] = ["tasks/get", "tasks/result", "tasks/cancel"];

/// The task a request names: `params.taskId` of `tasks/get`, `tasks/result`, `tasks/cancel`.
pub(super) fn task_named_in(request: &Request) -> Option<&str> {
    if !TASK_METHODS.contains(&request.method.as_str()) {
        return None;
    }
    request.params.as_ref()?.get("taskId")?.as_str()
}

/// The task an answer says its request created (`result.task.taskId`).
pub(super) fn task_created_by(answer: &Value) -> Option<&str> {
    answer.pointer("/result/task/taskId")?.as_str()
}

/// On a shared server, whose one task store holds every session's tasks, a session may name
/// only a task it created; another's is answered as unknown. (A session's own server process
/// holds only its tasks.)
pub(super) fn check_task_reference(
    session: &AgentSession,
    request: &Request,
) -> Result<(), Refusal> {
    if session.shared().is_none() || !TASK_METHODS.contains(&request.method.as_str()) {
        return Ok(());
    }
    let Some(task_id) = task_named_in(request) else {
        return Err(Refusal::invalid(
            &request.id,
            &format!("{} needs params.taskId", request.method),
        ));
    };
    if session.created_task(task_id) {
        Ok(())
    } else {
        Err(Refusal::task_of_another_session(&request.id, task_id))
    }
}

/// Whether a task's status notification is for this session: on a shared server, only for
/// the session that created the task.
fn session_may_see_task(session: &AgentSession, params: Option<&Value>) -> bool {
    if session.shared().is_none() {
        return true;
    }
    let task_id = params.and_then(|p| p.get("taskId")).and_then(Value::as_str);
    task_id.is_some_and(|task_id| session.created_task(task_id))
}

/// Whether `caller` could use the thing named `name` by `method` (`tools/call`,
/// `resources/read`, `prompts/get`) on the session's server, as a list shows it to them.
pub(super) fn could_use(
    policy: &CompiledPolicy,
    session: &AgentSession,
    caller: &Caller,
    method: &str,
    name: &str,
) -> bool {
    policy.visible(&DecisionRequest {
        server: &session.server,
        principal: &caller.principal,
        roles: &caller.roles,
        method,
        name: Some(name),
        arguments: None,
        context: &caller.context,
    })
}
