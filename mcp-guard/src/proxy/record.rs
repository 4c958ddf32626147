//! What the pipeline writes to the audit log: a decision record before a call is forwarded,
//! an outcome record before its answer is returned, and session start/end. Each carries the
//! caller's identity (principal, session, instruction, trace, call id).
//!
//! Fails closed: when a record cannot be written, the call is refused rather than performed
//! (or answered) unrecorded.

use std::sync::Arc;

use serde_json::Value;

use super::AgentSession;
use super::CallSpan;
use super::SessionLimit;
use super::session::{monotonic_ns, span_of};
use crate::audit::{
    AuditDecision, AuditError, AuditLog, AuditRecord, Latency, Outcome, OutcomeKind, RecordKind,
    ToolSeen,
};
use crate::control::{AuditClient, ControlError};
use crate::identity::CallIdentity;
use crate::learn::shape::summarize_arguments;
use crate::mcp::jsonrpc::{Id, Request, RpcError, codes};
use crate::policy::{AuditSettings, Mode};

/// The audit log as the pipeline uses it.
#[derive(Clone, Default)]
pub struct Recorder {
    sink: Sink,
}

#[derive(Clone, Default)]
enum Sink {
    /// No daemon to record to (a standalone stdio front).
    #[default]
    Nowhere,
    /// The daemon's own log.
    Local(AuditLog),
    /// The daemon's log, through its control socket (the stdio front).
    Daemon(Arc<AuditClient>),
}

/// Why a record was not written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Daemon(#[from] ControlError),
}

/// The verdict on one call, as recorded.
pub struct DecisionFacts<'a> {
    pub decision: AuditDecision,
    pub rule: &'a str,
    pub reason: &'a str,
    pub policy_us: u64,
    /// The server's mode when the call was judged.
    pub mode: Mode,
    /// The policy's `audit.redact` names, which learn mode's argument summaries honour.
    pub redact: &'a [String],
    /// The roles the call was judged with (this request's, which may differ from those the
    /// session opened with).
    pub roles: &'a [String],
    /// The server listed the call's tool to this session, so a daemon counting the decision
    /// for a front may use the tool's name as a label value (a bounded set).
    pub tool_listed: bool,
}

impl Recorder {
    /// Records to the daemon's own log.
    pub fn local(log: AuditLog) -> Recorder {
        Recorder {
            sink: Sink::Local(log),
        }
    }

    /// Records to a running daemon's log over its control socket.
    pub fn daemon(client: AuditClient) -> Recorder {
        Recorder {
            sink: Sink::Daemon(Arc::new(client)),
        }
    }

    async fn append(&self, record: AuditRecord) -> Result<(), RecordError> {
        self.append_with_span(record, None, false).await
    }

    /// The daemon is another process, which learns of calls with their records.
    fn is_elsewhere(&self) -> bool {
        matches!(self.sink, Sink::Daemon(_))
    }

    /// `span` and `tool_listed` only travel where the daemon is another process (see
    /// [`Self::call_started`] and [`DecisionFacts::tool_listed`]).
    async fn append_with_span(
        &self,
        record: AuditRecord,
        span: Option<CallSpan>,
        tool_listed: bool,
    ) -> Result<(), RecordError> {
        match &self.sink {
            Sink::Nowhere => Ok(()),
            Sink::Local(log) => Ok(log.append(record).await.map(|_| ())?),
            Sink::Daemon(client) => Ok(client.append(record, span, tool_listed).await?),
        }
    }

    /// How arguments are kept: the log's settings where mcp-guard writes it itself. Records
    /// that travel to the daemon carry the arguments as they are, over its local socket, and
    /// the daemon keeps them as its own policy says (digest, or stored with fields redacted).
    fn settings(&self) -> AuditSettings {
        match &self.sink {
            Sink::Local(log) => log.settings().clone(),
            Sink::Daemon(_) => AuditSettings {
                store_arguments: true,
                redact: Vec::new(),
                ..AuditSettings::default()
            },
            Sink::Nowhere => AuditSettings::default(),
        }
    }

    pub async fn decision(
        &self,
        session: &AgentSession,
        request: &Request,
        identity: &CallIdentity,
        facts: DecisionFacts<'_>,
    ) -> Result<(), RecordError> {
        let mut record = decision_record(session, request, identity, &facts);
        let roles = facts.roles;
        if !roles.is_empty() {
            let mut sorted = roles.to_vec();
            sorted.sort();
            record.roles = Some(sorted);
        }
        let arguments = request.params.as_ref().and_then(|p| p.get("arguments"));
        if let Some(arguments) = arguments {
            record.set_arguments(&self.settings(), arguments);
        }
        if facts.mode == Mode::Learn
            && matches!(request.method.as_str(), "tools/call" | "prompts/get")
        {
            record.argument_shapes = Some(summarize_arguments(arguments, facts.redact));
        }
        let goes_on = facts.decision != AuditDecision::Deny;
        if let (true, Sink::Local(log)) = (goes_on, &self.sink) {
            // Flushed before forwarding, or (`audit.durable_before: "answer"`) with the
            // outcome record before the answer.
            return Ok(log.append_decision(record).await.map(|_| ())?);
        }
        // A call that goes on starts with its decision record (one round trip to a daemon
        // that is another process, instead of two); the daemon, seeing it start a call,
        // writes it as its own decision records.
        let span = (goes_on && self.is_elsewhere()).then(|| span_of(identity));
        self.append_with_span(record, span, facts.tool_listed).await
    }

    /// The decision on an agent's notification that is not protocol plumbing (`notification`
    /// holds its method and params). A notification has no answer and so no outcome: it
    /// opens no call span, and its record is durable before it is forwarded.
    pub async fn notification_decision(
        &self,
        session: &AgentSession,
        notification: &Request,
        identity: &CallIdentity,
        facts: DecisionFacts<'_>,
    ) -> Result<(), RecordError> {
        let record = decision_record(session, notification, identity, &facts);
        self.append(record).await
    }

    /// The decision on a request the server sent the agent (sampling, elicitation, roots).
    /// `call_ids` names the agent's calls that were running when it came: what caused it.
    pub async fn server_request_decision(
        &self,
        session: &AgentSession,
        request: &Request,
        identity: &CallIdentity,
        facts: DecisionFacts<'_>,
        call_ids: Vec<String>,
    ) -> Result<(), RecordError> {
        let mut record = decision_record(session, request, identity, &facts);
        record.call_ids = (!call_ids.is_empty()).then_some(call_ids);
        self.append(record).await
    }

    pub async fn outcome(
        &self,
        session: &AgentSession,
        request: &Request,
        identity: &CallIdentity,
        answer: &Value,
        latency: Latency,
        mode: Mode,
    ) -> Result<(), RecordError> {
        let mut record = call_record(session, request, identity, mode);
        record.outcome = Some(outcome_of(answer));
        record.latency = Some(latency);
        if let Some(created) = super::visibility::task_created_by(answer) {
            record.task_id = Some(created.to_owned());
        }
        if mode.lets_everything_through() && request.method == "tools/list" {
            // Lists are not filtered in these modes: the answer holds every tool offered.
            record.tools_seen = tools_seen(answer);
        }
        // The call's end travels with its outcome record (see `call_ended`).
        let span = self.is_elsewhere().then(|| CallSpan {
            ended_ns: Some(monotonic_ns()),
            ..span_of(identity)
        });
        self.append_with_span(record, span, false).await
    }

    /// Where the daemon is another process, it must learn of a call before the call is
    /// forwarded, so that a connection the call makes finds it. The span went with the
    /// call's decision record, which [`Self::decision`] sent and the daemon noted before
    /// acknowledging it; nothing is left to do here.
    pub async fn call_started(
        &self,
        _session: &AgentSession,
        _identity: &CallIdentity,
    ) -> Result<(), RecordError> {
        Ok(())
    }

    /// ... and of its end: that goes with the call's outcome record, which
    /// [`Self::outcome`] sends right after this.
    pub fn call_ended(&self, _session: &AgentSession, _identity: &CallIdentity) {}

    /// The `start` record of a session, which must be written before the session serves.
    pub async fn session_started(&self, session: &AgentSession) -> Result<(), RecordError> {
        self.append(session_record(session, "start", None)).await
    }

    /// A session record whose `detail` also says why (`"reason": "idle"`).
    pub async fn session_event_because(
        &self,
        session: &AgentSession,
        event: &str,
        reason: Option<&str>,
    ) {
        let record = session_record(session, event, reason);
        if let Err(e) = self.append(record).await {
            tracing::error!(session = %session.id, error = %e, "audit: session record not written");
        }
    }

    /// A session of `server` that `principal` could not open: `limit` was reached.
    pub async fn session_refused(&self, server: &str, principal: &str, limit: &SessionLimit) {
        let mut record = AuditRecord::event(RecordKind::Session, "refused");
        if let Some(detail) = record.detail.as_mut() {
            detail.insert("reason".into(), limit.reason().into());
        }
        record.principal = Some(principal.to_owned());
        record.server = Some(server.to_owned());
        record.reason = Some(limit.to_string());
        if let Err(e) = self.append(record).await {
            tracing::error!(server, error = %e, "audit: session record not written");
        }
    }
}

/// A call record with what the decision says: verdict, rule, reason and the policy's time.
fn decision_record(
    session: &AgentSession,
    request: &Request,
    identity: &CallIdentity,
    facts: &DecisionFacts<'_>,
) -> AuditRecord {
    let mut record = call_record(session, request, identity, facts.mode);
    record.decision = Some(facts.decision);
    record.rule = Some(facts.rule.to_owned());
    record.reason = Some(facts.reason.to_owned());
    record.latency = Some(Latency {
        policy_us: Some(facts.policy_us),
        upstream_us: None,
        total_us: None,
    });
    record
}

fn call_record(
    session: &AgentSession,
    request: &Request,
    identity: &CallIdentity,
    mode: Mode,
) -> AuditRecord {
    let mut record = AuditRecord::new(RecordKind::Call);
    record.mode = mode.lets_everything_through().then_some(mode);
    record.principal = Some(session.caller().principal.clone());
    record.client_addr = identity.client.map(|address| address.to_string());
    record.session = Some(session.id.clone());
    record.instruction = identity.instruction.clone();
    record.trace_id = Some(identity.trace.trace_id.clone());
    record.call_id = Some(identity.call_id.clone());
    record.server = Some(session.server.clone());
    record.method = Some(request.method.clone());
    record.tool = super::target_name(&request.method, request.params.as_ref()).map(str::to_owned);
    record.task_id = super::visibility::task_named_in(request).map(str::to_owned);
    record.reference = super::visibility::completion_reference(request);
    record
}

/// A session record: `event` (start, end), and why where `reason` says.
fn session_record(session: &AgentSession, event: &str, reason: Option<&str>) -> AuditRecord {
    let mut record = AuditRecord::event(RecordKind::Session, event);
    if let (Some(reason), Some(detail)) = (reason, record.detail.as_mut()) {
        detail.insert("reason".into(), reason.into());
    }
    record.principal = Some(session.caller().principal.clone());
    record.session = Some(session.id.clone());
    record.server = Some(session.server.clone());
    record
}

/// The tools of a tools/list answer with their read-only and destructive hints; `None` when
/// the answer is not a list of tools.
fn tools_seen(answer: &Value) -> Option<Vec<ToolSeen>> {
    let tools = answer.get("result")?.get("tools")?.as_array()?;
    Some(
        tools
            .iter()
            .filter_map(|tool| {
                let hint = |name: &str| {
                    tool.get("annotations")
                        .and_then(|a| a.get(name))
                        .and_then(Value::as_bool)
                };
                Some(ToolSeen {
                    name: tool.get("name")?.as_str()?.to_owned(),
                    read_only: hint("readOnlyHint"),
                    destructive: hint("destructiveHint"),
                })
            })
            .collect(),
    )
}

/// Transport failure, JSON-RPC error and a tool's own `isError` are kept apart.
fn outcome_of(answer: &Value) -> Outcome {
    if let Some(error) = answer.get("error") {
        let code = error.get("code").and_then(Value::as_i64);
        let kind = if code == Some(codes::UPSTREAM_ERROR) {
            OutcomeKind::TransportError
        } else {
            OutcomeKind::Error
        };
        return Outcome {
            kind,
            code,
            message: error
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned),
        };
    }
    let tool_error = answer
        .get("result")
        .and_then(|r| r.get("isError"))
        .and_then(Value::as_bool)
        == Some(true);
    Outcome {
        kind: if tool_error {
            OutcomeKind::ToolError
        } else {
            OutcomeKind::Result
        },
        code: None,
        message: None,
    }
}

/// The refusal sent when the audit log cannot be written.
pub fn audit_unavailable(id: &Id, error: &RecordError) -> Value {
    RpcError::new(
        Some(id.clone()),
        codes::AUDIT_UNAVAILABLE,
        format!("mcp-guard refused the call: the audit log cannot be written ({error})"),
    )
    .to_value()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outcomes_keep_transport_rpc_and_tool_errors_apart() {
        let transport = json!({"error": {"code": codes::UPSTREAM_ERROR, "message": "gone"}});
        assert_eq!(outcome_of(&transport).kind, OutcomeKind::TransportError);
        let rpc = json!({"error": {"code": -32602, "message": "bad"}});
        assert_eq!(outcome_of(&rpc).kind, OutcomeKind::Error);
        assert_eq!(outcome_of(&rpc).code, Some(-32602));
        let tool = json!({"result": {"isError": true, "content": []}});
        assert_eq!(outcome_of(&tool).kind, OutcomeKind::ToolError);
        let ok = json!({"result": {"content": []}});
        assert_eq!(outcome_of(&ok).kind, OutcomeKind::Result);
    }

    #[test]
    fn tools_seen_keeps_names_and_the_hints_given() {
        let answer = json!({"result": {"tools": [
            {"name": "read", "annotations": {"readOnlyHint": true}},
            {"name": "wipe", "annotations": {"readOnlyHint": false, "destructiveHint": true}},
            {"name": "plain", "inputSchema": {"type": "object"}},
            {"no": "name"},
        ]}});
        let seen = tools_seen(&answer).unwrap();
        let line = serde_json::to_value(&seen).unwrap();
        assert_eq!(
            line,
            json!([
                {"name": "read", "read_only": true},
                {"name": "wipe", "read_only": false, "destructive": true},
                {"name": "plain"},
            ])
        );
        assert_eq!(tools_seen(&json!({"error": {"code": 1}})), None);
    }
}
