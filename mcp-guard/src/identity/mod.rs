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
    /// W3C baggage, as in the header: the agent's entries, and `mcp.instruction`.
    pub const BAGGAGE: &str = "baggage";
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
    /// A new trace drops the agent's `tracestate`, which belonged to the invalid parent (W3C
    /// trace context, section 4.3).
    pub fn continue_or_start(traceparent: Option<&str>, tracestate: Option<&str>) -> TraceContext {
        match traceparent.and_then(parse_traceparent) {
            Some((trace_id, flags)) => TraceContext {
                trace_id,
                span_id: random_hex(8),
                flags,
                tracestate: tracestate.map(str::to_owned),
            },
            None => TraceContext {
                trace_id: random_hex(16),
                span_id: random_hex(8),
                flags: "01".to_owned(),
                tracestate: None,
            },
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

/// What the agent said about the work when it opened a session (the instruction, its trace
/// context), for a server spawned for that session to read in its environment at start:
/// `MCP_GUARD_INSTRUCTION`, and OpenTelemetry's environment carriers `TRACEPARENT`,
/// `TRACESTATE` and `BAGGAGE` (`mcp.instruction=ID`). Only what the agent gave: a trace
/// mcp-guard would start for the opening request is not the agent's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpeningContext {
    pub instruction: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// The agent's baggage with `mcp.instruction` (see [`CallIdentity::baggage`]).
    pub baggage: Option<String>,
}

impl OpeningContext {
    /// From the first message of a session (its `_meta`) and the transport's hints, with the
    /// precedence of [`CallIdentity::for_request`]. An invalid `traceparent` is left out.
    pub fn of_request(params: Option<&Value>, hints: &TransportHints) -> OpeningContext {
        let claims = AgentClaims::read(params, hints);
        OpeningContext {
            instruction: claims.instruction,
            traceparent: claims.traceparent.map(str::to_owned),
            tracestate: claims.tracestate.map(str::to_owned),
            baggage: claims.baggage,
        }
    }

    /// The environment variables it sets (none for what the agent did not give).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = Vec::new();
        if let Some(instruction) = &self.instruction {
            env.push(("MCP_GUARD_INSTRUCTION", instruction.clone()));
        }
        if let Some(baggage) = &self.baggage {
            env.push(("BAGGAGE", baggage.clone()));
        }
        if let Some(parent) = &self.traceparent {
            env.push(("TRACEPARENT", parent.clone()));
        }
        if let Some(state) = &self.tracestate {
            env.push(("TRACESTATE", state.clone()));
        }
        env
    }
}

/// What the agent says about the work in one request: its `_meta` first, then the
/// transport's hints. A traceparent only when it is valid, a tracestate only with it.
struct AgentClaims<'a> {
    instruction: Option<String>,
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
    /// The agent's baggage with `mcp.instruction` (see [`CallIdentity::baggage`]).
    baggage: Option<String>,
}

impl<'a> AgentClaims<'a> {
    fn read(params: Option<&'a Value>, hints: &'a TransportHints) -> AgentClaims<'a> {
        let meta = params
            .and_then(|p| p.get("_meta"))
            .and_then(Value::as_object);
        let meta_str = |key: &str| meta.and_then(|m| m.get(key)).and_then(Value::as_str);
        let instruction = meta_str(meta_keys::INSTRUCTION)
            .map(str::to_owned)
            .or_else(|| hints.instruction.clone())
            .or_else(|| baggage_value(hints.baggage.as_deref(), "mcp.instruction"));
        let is_valid = |parent: &&str| parse_traceparent(parent).is_some();
        let meta_parent = meta_str(meta_keys::TRACEPARENT).filter(is_valid);
        let (traceparent, tracestate) = match meta_parent {
            Some(parent) => (Some(parent), meta_str(meta_keys::TRACESTATE)),
            None => (
                hints.traceparent.as_deref().filter(is_valid),
                hints.tracestate.as_deref(),
            ),
        };
        let agent_baggage = meta_str(meta_keys::BAGGAGE).or(hints.baggage.as_deref());
        AgentClaims {
            baggage: with_instruction(agent_baggage, instruction.as_deref()),
            instruction,
            traceparent,
            tracestate: traceparent.and(tracestate),
        }
    }
}

/// The identity of one forwarded request.
#[derive(Clone, Debug)]
pub struct CallIdentity {
    pub call_id: String,
    pub instruction: Option<String>,
    pub trace: TraceContext,
    /// W3C baggage for the next hop: the agent's (its `_meta` `baggage`, else the header),
    /// with `mcp.instruction` added where the agent's lacks it and there is an instruction.
    pub baggage: Option<String>,
    /// The address the request came from, where the transport has one.
    pub client: Option<std::net::IpAddr>,
}

impl CallIdentity {
    /// Reads instruction and trace from the request's `_meta`, then the transport's hints.
    pub fn for_request(params: Option<&Value>, hints: &TransportHints) -> CallIdentity {
        let claims = AgentClaims::read(params, hints);
        CallIdentity {
            call_id: uuid::Uuid::new_v4().simple().to_string(),
            trace: TraceContext::continue_or_start(claims.traceparent, claims.tracestate),
            instruction: claims.instruction,
            baggage: claims.baggage,
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
            baggage: with_instruction(None, instruction.as_deref()),
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
        insert_own_facts(meta, Some(&self.call_id), server, session, principal);
        // An invalid traceparent of the agent's is replaced by the trace this call is recorded
        // under (with its tracestate), so that the server and the audit log agree.
        let agent_parent_valid = meta
            .get(meta_keys::TRACEPARENT)
            .and_then(Value::as_str)
            .is_some_and(|parent| parse_traceparent(parent).is_some());
        if !agent_parent_valid {
            meta.remove(meta_keys::TRACEPARENT);
            meta.remove(meta_keys::TRACESTATE);
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
        if let Some(baggage) = &self.baggage {
            // The agent's own baggage with the instruction added: a superset of what it sent.
            meta.insert(
                meta_keys::BAGGAGE.to_owned(),
                Value::String(baggage.clone()),
            );
        }
    }
}

/// Puts mcp-guard's own facts into a forwarded message's `_meta`, over whatever the agent put
/// under those keys; without a call (a notification) the call id key is removed.
fn insert_own_facts(
    meta: &mut Map<String, Value>,
    call_id: Option<&str>,
    server: &str,
    session: &str,
    principal: &str,
) {
    match call_id {
        Some(call_id) => meta.insert(meta_keys::CALL_ID.to_owned(), call_id.into()),
        None => meta.remove(meta_keys::CALL_ID),
    };
    for (key, value) in [
        (meta_keys::SERVER, server),
        (meta_keys::SESSION, session),
        (meta_keys::PRINCIPAL, principal),
    ] {
        meta.insert(key.to_owned(), Value::String(value.to_owned()));
    }
}

/// A notification the agent sends on to the server: when it carries a `_meta`, mcp-guard's
/// server, session and principal replace whatever the agent put there (and a call id it named
/// is removed), so neither the server nor a `url` server's `MCP-Guard-*` headers can be told
/// another identity. A notification without `_meta` is passed on as it is.
pub fn stamp_notification(
    params: &mut Option<Value>,
    server: &str,
    session: &str,
    principal: &str,
) {
    let Some(meta) = params
        .as_mut()
        .and_then(|params| params.get_mut("_meta"))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    insert_own_facts(meta, None, server, session, principal);
}

/// One entry of a W3C `baggage` header (`k=v,k2=v2;prop`), percent-decoded.
fn baggage_value(baggage: Option<&str>, key: &str) -> Option<String> {
    baggage?.split(',').find_map(|member| {
        let (k, v) = member.split(';').next()?.split_once('=')?;
        (k.trim() == key).then(|| percent_decode(v.trim()))
    })
}

/// `baggage` with an `mcp.instruction` entry for `instruction`, unless it has one already.
fn with_instruction(baggage: Option<&str>, instruction: Option<&str>) -> Option<String> {
    let baggage = baggage.map(str::trim).filter(|b| !b.is_empty());
    let Some(instruction) = instruction else {
        return baggage.map(str::to_owned);
    };
    if baggage_value(baggage, "mcp.instruction").is_some() {
        return baggage.map(str::to_owned);
    }
    let entry = format!("mcp.instruction={}", baggage_encode(instruction));
    Some(match baggage {
        Some(agent) => format!("{agent},{entry}"),
        None => entry,
    })
}

/// Percent-encodes what a W3C baggage value may not hold as it is (controls, space, `"`,
/// `,`, `;`, `\`, `%` and non-ASCII).
fn baggage_encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        let plain = matches!(byte, 0x21 | 0x23..=0x24 | 0x26..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E);
        if plain {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| value.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
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
        ("baggage", meta_keys::BAGGAGE),
    ];
    for (header, key) in pairs {
        if let Some(value) = text(key) {
            headers.push((header, value));
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_notifications_meta_names_the_sessions_own_identity() {
        let mut spoofed = Some(json!({"progressToken": 1, "_meta": {
            "io.mcp-guard/principal": "admin", "io.mcp-guard/session": "other",
            "io.mcp-guard/call-id": "c-1", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}}));
        stamp_notification(&mut spoofed, "fs", "s-1", "alice");
        let stamped = spoofed.unwrap();
        assert_eq!(stamped["_meta"]["io.mcp-guard/principal"], "alice");
        assert_eq!(stamped["_meta"]["io.mcp-guard/session"], "s-1");
        assert_eq!(stamped["_meta"]["io.mcp-guard/server"], "fs");
        assert!(stamped["_meta"].get("io.mcp-guard/call-id").is_none());
        assert_eq!(stamped["progressToken"], 1);
        let headers = downstream_headers(&json!({"params": stamped}));
        assert!(headers.contains(&("mcp-guard-principal", "alice".to_owned())));
        assert!(!headers.iter().any(|(name, _)| *name == "mcp-guard-call-id"));

        let mut plain = Some(json!({"requestId": 3}));
        stamp_notification(&mut plain, "fs", "s-1", "alice");
        assert_eq!(plain, Some(json!({"requestId": 3})));
        let mut none = None;
        stamp_notification(&mut none, "fs", "s-1", "alice");
        assert_eq!(none, None);
    }

    #[test]
    fn the_opening_context_is_what_the_agent_gave_meta_first() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let hints = TransportHints {
            instruction: Some("from-header".into()),
            traceparent: Some("00-garbage".into()),
            tracestate: Some("dropped=with-its-parent".into()),
            ..TransportHints::default()
        };
        let header_only = OpeningContext::of_request(None, &hints);
        assert_eq!(
            header_only,
            OpeningContext {
                instruction: Some("from-header".into()),
                traceparent: None,
                tracestate: None,
                baggage: Some("mcp.instruction=from-header".into()),
            }
        );
        let params = json!({"_meta": {"traceparent": parent, "tracestate": "k=v",
                                      "io.mcp-guard/instruction": "from-meta"}});
        let opening = OpeningContext::of_request(Some(&params), &hints);
        assert_eq!(
            opening.env(),
            vec![
                ("MCP_GUARD_INSTRUCTION", "from-meta".to_owned()),
                ("BAGGAGE", "mcp.instruction=from-meta".to_owned()),
                ("TRACEPARENT", parent.to_owned()),
                ("TRACESTATE", "k=v".to_owned()),
            ]
        );
        assert!(OpeningContext::default().env().is_empty());
    }

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
        let agents = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut params =
            Some(json!({"name": "echo", "_meta": {"traceparent": agents, "progressToken": 7}}));
        identity.stamp(&mut params, "web", "s1", "alice");
        let meta = &params.as_ref().unwrap()["_meta"];
        assert_eq!(meta["traceparent"], agents);
        assert_eq!(meta["progressToken"], 7);
        assert_eq!(meta["io.mcp-guard/session"], "s1");
        assert_eq!(meta["io.mcp-guard/call-id"], identity.call_id.as_str());
        let message = json!({"params": params});
        let headers = downstream_headers(&message);
        assert!(headers.contains(&("mcp-guard-principal", "alice".to_owned())));
        assert!(!headers.contains(&("mcp-guard-principal", "someone-else".to_owned())));
    }

    #[test]
    fn an_invalid_traceparent_in_meta_gives_way_to_the_recorded_trace() {
        let params = json!({"_meta": {"traceparent": "00-not-a-trace", "tracestate": "k=v"}});
        let identity = CallIdentity::for_request(Some(&params), &TransportHints::default());
        assert_eq!(identity.trace.tracestate, None);
        let mut forwarded = Some(params);
        identity.stamp(&mut forwarded, "web", "s1", "alice");
        let meta = &forwarded.as_ref().unwrap()["_meta"];
        assert_eq!(meta["traceparent"], identity.trace.traceparent().as_str());
        assert!(meta.get("tracestate").is_none(), "{meta}");
    }

    #[test]
    fn the_agents_baggage_travels_on_with_the_instruction_added() {
        let hints = TransportHints {
            instruction: Some("job 7, step 2".into()),
            baggage: Some("tenant=acme, user.id=42;prop=1".into()),
            ..TransportHints::default()
        };
        let identity = CallIdentity::for_request(None, &hints);
        let expected = "tenant=acme, user.id=42;prop=1,mcp.instruction=job%207%2C%20step%202";
        assert_eq!(identity.baggage.as_deref(), Some(expected));
        // Read back, the encoded instruction is the instruction.
        assert_eq!(
            baggage_value(Some(expected), "mcp.instruction").as_deref(),
            Some("job 7, step 2")
        );
        let mut params = None;
        identity.stamp(&mut params, "web", "s1", "alice");
        let headers = downstream_headers(&json!({"params": params}));
        assert!(
            headers.contains(&("baggage", expected.to_owned())),
            "{headers:?}"
        );
        assert!(headers.contains(&("mcp-guard-instruction", "job 7, step 2".to_owned())));

        // An agent's baggage that names the instruction already is kept as it is.
        let named = TransportHints {
            baggage: Some("mcp.instruction=abc,tenant=acme".into()),
            ..TransportHints::default()
        };
        let identity = CallIdentity::for_request(None, &named);
        assert_eq!(identity.instruction.as_deref(), Some("abc"));
        assert_eq!(
            identity.baggage.as_deref(),
            Some("mcp.instruction=abc,tenant=acme")
        );
        let none = CallIdentity::for_request(None, &TransportHints::default());
        assert_eq!(none.baggage, None);
    }
}
