//! What one audit record says.
//!
//! The pipeline fills an [`AuditRecord`]; the writer adds `seq`, `ts`, `prev` and `hash` (see
//! [`super::chain`]). Every optional field is left out of the line when it is `None`, so a
//! record carries only what applies to it. The field order of the struct is the order of the
//! line, and it is part of the format: the hash covers the exact bytes written.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::policy::{Mode, Protocol};

/// `prev` of the first record ever written: 64 zeros.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    /// An MCP operation: its decision, or its outcome.
    Call,
    /// A network connection attempt by a server process, as the kernel reported it.
    Egress,
    /// An agent session starting or ending.
    Session,
    /// A policy loaded, reloaded or rejected.
    Policy,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Call => "call",
            Self::Egress => "egress",
            Self::Session => "session",
            Self::Policy => "policy",
        }
    }
}

/// What the policy decided about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditDecision {
    Allow,
    Deny,
    /// Shadow mode: the policy would have denied the call, but it went ahead.
    WouldDeny,
}

impl AuditDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::WouldDeny => "would_deny",
        }
    }
}

/// How a forwarded call ended. The four kinds are kept apart because they mean different
/// things to whoever reads the log: the server answered, the server refused (JSON-RPC error),
/// the tool ran and failed (`isError`), or the server could not be reached at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    Result,
    Error,
    ToolError,
    TransportError,
}

impl OutcomeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Result => "result",
            Self::Error => "error",
            Self::ToolError => "tool_error",
            Self::TransportError => "transport_error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub kind: OutcomeKind,
    /// The JSON-RPC error code, for `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where a call's time went, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    /// Deciding (policy evaluation and argument validation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_us: Option<u64>,
    /// Waiting for the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_us: Option<u64>,
    /// From the request's arrival to the response leaving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_us: Option<u64>,
}

/// What the kernel did with a connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Refuse,
    /// Shadow or learn mode: no egress rule allows it, so enforce would have refused it, but
    /// it went ahead.
    WouldRefuse,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Refuse => "refuse",
            Self::WouldRefuse => "would_refuse",
        }
    }
}

/// A tool as the server offered it in a tools/list page, before any filtering, with the
/// hints its `annotations` gave (absent when the server gave none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSeen {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destructive: Option<bool>,
}

/// What a `completion/complete` completes an argument of: its `params.ref`, as MCP spells
/// it (`{"type": "ref/prompt", "name": …}` or `{"type": "ref/resource", "uri": …}`, the
/// resource template's URI template).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Reference {
    #[serde(rename = "ref/prompt")]
    Prompt { name: String },
    #[serde(rename = "ref/resource")]
    Resource { uri: String },
}

/// How an egress record was tied to calls: the session had exactly one call in flight
/// (`exact`), several (`ambiguous`: `call_ids` lists every candidate), or none (`idle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attribution {
    Exact,
    Ambiguous,
    Idle,
}

impl Attribution {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Ambiguous => "ambiguous",
            Self::Idle => "idle",
        }
    }
}

/// One audit record as the pipeline hands it to [`super::AuditLog::append`].
///
/// Build it with struct update syntax:
/// `AuditRecord { tool: Some(name), ..AuditRecord::new(RecordKind::Call) }`.
///
/// Egress records carry the `session` and, when the session has one, the session's current
/// `instruction` at the time of the event; `call_ids` names the calls that were in flight.
/// `audit trace` relies on both (see [`super::trace`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub kind: RecordKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// The address the agent's request came from (HTTP front).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<String>,
    /// The process id of the stdio front that relayed the record to the daemon, from the
    /// control socket's peer credentials: the kernel's word, which the front cannot set. The
    /// agent is the process that started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub front_pid: Option<i32>,
    /// The user id that stdio front ran as (same source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub front_uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instruction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The task a call created (its outcome: `result.task.taskId`) or names (`tasks/get`,
    /// `tasks/result`, `tasks/cancel`: `params.taskId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The prompt or resource template a `completion/complete` completes an argument of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<AuditDecision>,
    /// The MCP rule that decided a call, or the egress rule that allowed a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    /// `sha256:<hex>`; see [`super::arguments`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments_digest: Option<String>,
    /// Only when the policy's `audit.store_arguments` is on, redacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,

    // Egress: what the kernel reported and whom it was attributed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// The kernel hook that saw the attempt (`connect4`, `sendmsg6`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<Attribution>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_ids: Option<Vec<String>>,

    /// The caller's roles, sorted, on call decision records (absent when there are none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    /// The server's mode when it is `shadow` or `learn` (absent under `enforce`), on call
    /// decision and outcome records and on egress records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Learn mode, decisions on `tools/call` and `prompts/get`: a bounded summary of each
    /// top-level argument (see [`crate::learn::shape`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argument_shapes: Option<Map<String, Value>>,
    /// Shadow and learn modes, outcomes of `tools/list`: every tool the server offered on
    /// that page, before filtering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools_seen: Option<Vec<ToolSeen>>,
    /// Egress: the policy `host` whose resolution gave this destination address, when it is
    /// one mcp-guard resolved for the server's egress rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,

    /// Free-form facts of session and policy records, e.g. `{"event": "start"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Map<String, Value>>,
}

impl AuditRecord {
    /// A record of `kind` with every optional field empty.
    pub fn new(kind: RecordKind) -> Self {
        Self {
            kind,
            principal: None,
            client_addr: None,
            front_pid: None,
            front_uid: None,
            session: None,
            instruction: None,
            trace_id: None,
            call_id: None,
            server: None,
            method: None,
            tool: None,
            task_id: None,
            reference: None,
            decision: None,
            rule: None,
            reason: None,
            outcome: None,
            latency: None,
            arguments_digest: None,
            arguments: None,
            addr: None,
            port: None,
            protocol: None,
            verdict: None,
            hook: None,
            pid: None,
            comm: None,
            cgroup_id: None,
            attribution: None,
            call_ids: None,
            roles: None,
            mode: None,
            argument_shapes: None,
            tools_seen: None,
            host: None,
            detail: None,
        }
    }

    /// A session or policy record whose `detail` is `{"event": event}`.
    pub fn event(kind: RecordKind, event: &str) -> Self {
        let mut detail = Map::new();
        detail.insert("event".into(), Value::String(event.into()));
        Self {
            detail: Some(detail),
            ..Self::new(kind)
        }
    }
}

/// A record as read back from the log: the pipeline's fields plus what the writer added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    pub seq: u64,
    pub ts: String,
    pub prev: String,
    #[serde(flatten)]
    pub record: AuditRecord,
    pub hash: String,
}
