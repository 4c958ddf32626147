//! Who and why, per request: the instruction that started the work, the W3C trace context, and
//! a call id of mcp-guard's own; and how they travel downstream (`params._meta` keys, HTTP
//! headers, child environment) without clobbering anything the agent set.
//!
//! Sources, first found wins:
//! - instruction: `params._meta["io.mcp-guard/instruction"]`, header `MCP-Guard-Instruction`,
//!   W3C `baggage` entry `mcp.instruction`;
//! - trace: `params._meta["traceparent"]` / `["tracestate"]`, then the same HTTP headers; a new
//!   trace is started when none is valid;
//! - context (for rules' `when`): the session's, overlaid by header `MCP-Guard-Context`, overlaid
//!   by `params._meta["io.mcp-guard/context"]`.

pub mod jwt;
pub mod protected_resource;
pub mod refusals;

use serde_json::{Map, Value};

/// `params._meta` keys mcp-guard reads and writes.
pub mod meta_keys {
    pub const INSTRUCTION: &str = "io.mcp-guard/instruction";
    /// Context values for rules' `when` conditions, as an object of strings.
    pub const CONTEXT: &str = "io.mcp-guard/context";
    pub const SESSION: &str = "io.mcp-guard/session";
    pub const PRINCIPAL: &str = "io.mcp-guard/principal";
    pub const CALL_ID: &str = "io.mcp-guard/call-id";
    pub const SERVER: &str = "io.mcp-guard/server";
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
}

/// What the transport saw around the message (HTTP headers; nothing for stdio).
#[derive(Clone, Debug, Default)]
pub struct TransportHints {
    pub instruction: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub baggage: Option<String>,
    /// Context values of this request (header `MCP-Guard-Context`).
    pub context: std::collections::BTreeMap<String, String>,
    /// The caller's roles as this request's credentials and the policy in force give them
    /// (set by the HTTP front; `None`: the session's).
    pub roles: Option<Vec<String>>,
    /// The address the request came from (set by the HTTP front).
    pub client: Option<std::net::IpAddr>,
}

impl TransportHints {
    /// From HTTP request headers (names case-insensitive; `get` returns the value if present).
    pub fn from_headers<'a>(get: impl Fn(&str) -> Option<&'a str>) -> TransportHints {
        TransportHints {
            instruction: get("mcp-guard-instruction").map(str::to_owned),
            traceparent: get("traceparent").map(str::to_owned),
            tracestate: get("tracestate").map(str::to_owned),
            baggage: get("baggage").map(str::to_owned),
            context: get("mcp-guard-context")
                .map(parse_context_header)
                .unwrap_or_default(),
            roles: None,
            client: None,
        }
    }
}

/// `MCP-Guard-Context: key=value; key=value`; pairs without `=` are ignored.
pub fn parse_context_header(text: &str) -> std::collections::BTreeMap<String, String> {
    text.split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The context values a request carries: the transport's (a header), overlaid by the
/// request's own `params._meta["io.mcp-guard/context"]` (string values only).
pub fn request_context(
    params: Option<&Value>,
    hints: &TransportHints,
) -> std::collections::BTreeMap<String, String> {
    let mut context = hints.context.clone();
    let meta = params
        .and_then(|p| p.get("_meta"))
        .and_then(|m| m.get(meta_keys::CONTEXT))
        .and_then(Value::as_object);
    for (key, value) in meta.into_iter().flatten() {
        if let Some(value) = value.as_str() {
            context.insert(key.clone(), value.to_owned());
        }
    }
    context
}

/// W3C trace context of one hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: String,
    /// mcp-guard's own span id for this call (the parent of what the server does).
    pub span_id: String,
    pub flags: String,
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// `traceparent` for the next hop: same trace, mcp-guard's span as parent.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }

    /// Continues the agent's trace (if its traceparent is valid) with a new span, or starts one.
    pub fn continue_or_start(traceparent: Option<&str>, tracestate: Option<&str>) -> TraceContext {
        let parsed = traceparent.and_then(parse_traceparent);
        let (trace_id, flags) = parsed.unwrap_or_else(|| (random_hex(16), "01".to_owned()));
        TraceContext {
            trace_id,
            span_id: random_hex(8),
            flags,
            tracestate: tracestate.map(str::to_owned),
        }
    }
}

/// `(trace id, flags)` of a valid version-00 traceparent.
fn parse_traceparent(text: &str) -> Option<(String, String)> {
    let mut parts = text.trim().split('-');
    let (version, trace_id, parent_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = version == "00"
        && parts.next().is_none()
        && hex(trace_id, 32)
        && hex(parent_id, 16)
        && hex(flags, 2)
        && trace_id.bytes().any(|b| b != b'0')
        && parent_id.bytes().any(|b| b != b'0');
    valid.then(|| (trace_id.to_ascii_lowercase(), flags.to_owned()))
}

/// `bytes` (at most 16) random bytes as lowercase hex.
fn random_hex(bytes: usize) -> String {
    let mut hex = uuid::Uuid::new_v4().simple().to_string();
    hex.truncate(bytes.min(16) * 2);
    hex
}

/// The identity of one forwarded request.
#[derive(Clone, Debug)]
pub struct CallIdentity {
    pub call_id: String,
    pub instruction: Option<String>,
    pub trace: TraceContext,
    /// The address the request came from, where the transport has one.
    pub client: Option<std::net::IpAddr>,
}

impl CallIdentity {
    /// Reads instruction and trace from the request's `_meta`, then the transport's hints.
    pub fn for_request(params: Option<&Value>, hints: &TransportHints) -> CallIdentity {
        let meta = params
            .and_then(|p| p.get("_meta"))
            .and_then(Value::as_object);
        let meta_str = |key: &str| meta.and_then(|m| m.get(key)).and_then(Value::as_str);
        let instruction = meta_str(meta_keys::INSTRUCTION)
            .map(str::to_owned)
            .or_else(|| hints.instruction.clone())
            .or_else(|| baggage_value(hints.baggage.as_deref(), "mcp.instruction"));
        let trace = match meta_str(meta_keys::TRACEPARENT) {
            Some(parent) => {
                TraceContext::continue_or_start(Some(parent), meta_str(meta_keys::TRACESTATE))
            }
            None => TraceContext::continue_or_start(
                hints.traceparent.as_deref(),
                hints.tracestate.as_deref(),
            ),
        };
        CallIdentity {
            call_id: uuid::Uuid::new_v4().simple().to_string(),
            instruction,
            trace,
            client: hints.client,
        }
    }

    /// The identity of a request the server sends the agent during a call (sampling,
    /// elicitation, roots): a call id of its own, in the instruction and trace of the call
    /// that caused it when that one is known.
    pub fn caused_by(instruction: Option<String>, trace_id: Option<&str>) -> CallIdentity {
        let trace = match trace_id {
            Some(trace_id) => TraceContext {
                trace_id: trace_id.to_owned(),
                span_id: random_hex(8),
                flags: "01".to_owned(),
                tracestate: None,
            },
            None => TraceContext::continue_or_start(None, None),
        };
        CallIdentity {
            call_id: uuid::Uuid::new_v4().simple().to_string(),
            instruction,
            trace,
            client: None,
        }
    }

    /// Adds mcp-guard's keys to the forwarded request's `params._meta`: its own facts (call id,
    /// server, session, principal) replace whatever the agent put there; the agent's trace
    /// context and instruction are kept.
    pub fn stamp(&self, params: &mut Option<Value>, server: &str, session: &str, principal: &str) {
        let params = params.get_or_insert_with(|| Value::Object(Map::new()));
        let Some(params) = params.as_object_mut() else {
            return;
        };
        let meta = params
            .entry("_meta")
            .or_insert_with(|| Value::Object(Map::new()));
        let Some(meta) = meta.as_object_mut() else {
            return;
        };
        // mcp-guard's own facts always win: an agent must not name another principal or
        // session to the server.
        for (key, value) in [
            (meta_keys::CALL_ID, self.call_id.as_str()),
            (meta_keys::SERVER, server),
            (meta_keys::SESSION, session),
            (meta_keys::PRINCIPAL, principal),
        ] {
            meta.insert(key.to_owned(), Value::String(value.to_owned()));
        }
        // What the agent set of the rest (its own trace, the instruction) it keeps.
        let mut put = |key: &str, value: String| {
            meta.entry(key).or_insert(Value::String(value));
        };
        if let Some(instruction) = &self.instruction {
            put(meta_keys::INSTRUCTION, instruction.clone());
        }
        put(meta_keys::TRACEPARENT, self.trace.traceparent());
        if let Some(state) = &self.trace.tracestate {
            put(meta_keys::TRACESTATE, state.clone());
        }
    }
}

/// One entry of a W3C `baggage` header (`k=v,k2=v2;prop`), percent-decoding not needed for
/// the ids mcp-guard reads.
fn baggage_value(baggage: Option<&str>, key: &str) -> Option<String> {
    baggage?.split(',').find_map(|member| {
        let (k, v) = member.split(';').next()?.split_once('=')?;
        (k.trim() == key).then(|| v.trim().to_owned())
    })
}

/// HTTP headers for a forwarded request, read back from the `_meta` that `stamp` filled (so the
/// HTTP upstream needs nothing but the message).
pub fn downstream_headers(message: &Value) -> Vec<(&'static str, String)> {
    let Some(meta) = message
        .get("params")
        .and_then(|p| p.get("_meta"))
        .and_then(Value::as_object)
    else {
        return Vec::new();
    };
    let text = |key: &str| meta.get(key).and_then(Value::as_str).map(str::to_owned);
    let mut headers = Vec::new();
    let pairs = [
        ("traceparent", meta_keys::TRACEPARENT),
        ("tracestate", meta_keys::TRACESTATE),
        ("mcp-guard-call-id", meta_keys::CALL_ID),
        ("mcp-guard-session", meta_keys::SESSION),
        ("mcp-guard-principal", meta_keys::PRINCIPAL),
        ("mcp-guard-instruction", meta_keys::INSTRUCTION),
    ];
    for (header, key) in pairs {
        if let Some(value) = text(key) {
            headers.push((header, value));
        }
    }
    if let Some(instruction) = text(meta_keys::INSTRUCTION) {
        headers.push(("baggage", format!("mcp.instruction={instruction}")));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn continues_a_valid_trace_and_starts_one_otherwise() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = TraceContext::continue_or_start(Some(parent), None);
        assert_eq!(trace.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(trace.span_id, "00f067aa0ba902b7");
        assert_eq!(trace.span_id.len(), 16);
        for bad in [
            "",
            "00-0000-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let fresh = TraceContext::continue_or_start(Some(bad), None);
            assert_eq!(fresh.trace_id.len(), 32);
            assert_ne!(fresh.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
            // A started trace is one a W3C parser takes: lowercase hex, not all zeros.
            assert_eq!(
                parse_traceparent(&fresh.traceparent()),
                Some((fresh.trace_id.clone(), "01".to_owned())),
                "{}",
                fresh.traceparent()
            );
        }
    }

    #[test]
    fn instruction_comes_from_meta_then_header_then_baggage() {
        let hints = TransportHints {
            instruction: Some("from-header".into()),
            baggage: Some("a=b, mcp.instruction=from-baggage".into()),
            ..TransportHints::default()
        };
        let with_meta = json!({"_meta": {"io.mcp-guard/instruction": "from-meta"}});
        assert_eq!(
            CallIdentity::for_request(Some(&with_meta), &hints)
                .instruction
                .as_deref(),
            Some("from-meta")
        );
        assert_eq!(
            CallIdentity::for_request(None, &hints)
                .instruction
                .as_deref(),
            Some("from-header")
        );
        let only_baggage = TransportHints {
            instruction: None,
            ..hints
        };
        assert_eq!(
            CallIdentity::for_request(None, &only_baggage)
                .instruction
                .as_deref(),
            Some("from-baggage")
        );
    }

    #[test]
    fn stamping_keeps_the_agents_keys_and_feeds_headers() {
        let identity = CallIdentity::for_request(None, &TransportHints::default());
        let mut params =
            Some(json!({"name": "echo", "_meta": {"traceparent": "agent's", "progressToken": 7}}));
        identity.stamp(&mut params, "web", "s1", "alice");
        let meta = &params.as_ref().unwrap()["_meta"];
        assert_eq!(meta["traceparent"], "agent's");
        assert_eq!(meta["progressToken"], 7);
        assert_eq!(meta["io.mcp-guard/session"], "s1");
        assert_eq!(meta["io.mcp-guard/call-id"], identity.call_id.as_str());
        let message = json!({"params": params});
        let headers = downstream_headers(&message);
        assert!(headers.contains(&("mcp-guard-principal", "alice".to_owned())));
        assert!(!headers.contains(&("mcp-guard-principal", "someone-else".to_owned())));
    }
}
