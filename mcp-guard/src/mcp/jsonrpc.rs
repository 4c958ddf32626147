//! JSON-RPC 2.0 as MCP uses it: parsing agent input under limits (size, nesting, batch size),
//! telling requests, notifications and responses apart, and building error responses.
//!
//! Parsing never trusts the input: invalid UTF-8, invalid JSON, a wrong `jsonrpc`, a missing
//! method, an id that is neither string nor integer, duplicate ids in a batch, and nesting past
//! the limit each become a JSON-RPC error the agent can read — never a panic.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Standard and mcp-guard error codes.
pub mod codes {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The policy refused the operation; `data` names the rule and the reason.
    pub const POLICY_DENIED: i64 = -32010;
    /// The upstream server failed or broke the protocol; the operation was refused.
    pub const UPSTREAM_ERROR: i64 = -32011;
    /// The audit log cannot be written; mcp-guard refuses to act unrecorded.
    pub const AUDIT_UNAVAILABLE: i64 = -32012;
    /// A session could not be opened: the daemon's or the principal's limit of open sessions
    /// is reached.
    pub const TOO_MANY_SESSIONS: i64 = -32013;
}

/// A request id: MCP allows strings and integers (never null).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Id {
    Number(i64),
    String(String),
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Number(n) => write!(f, "{n}"),
            Id::String(s) => write!(f, "{s:?}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub id: Id,
    pub method: String,
    pub params: Option<Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Notification {
    pub method: String,
    pub params: Option<Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    pub id: Id,
    /// `Ok(result)` or `Err(error object)`.
    pub outcome: Result<Value, Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Request(Request),
    Notification(Notification),
    Response(Response),
}

/// What one HTTP body or stdio line holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Incoming {
    Single(Message),
    /// Each element is judged on its own: a bad element gets its own error.
    Batch(Vec<Result<Message, RpcError>>),
}

impl Incoming {
    /// The `progressToken` of a single request that asks for progress.
    pub fn progress_token(&self) -> Option<Value> {
        let Incoming::Single(Message::Request(request)) = self else {
            return None;
        };
        requested_progress_token(request.params.as_ref()).cloned()
    }
}

/// The `progressToken` a request's params ask progress under (`_meta.progressToken`).
pub fn requested_progress_token(params: Option<&Value>) -> Option<&Value> {
    params?.get("_meta")?.get("progressToken")
}

/// Limits on agent input.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_batch: usize,
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_bytes: 4 * 1024 * 1024,
            max_batch: 64,
            max_depth: 64,
        }
    }
}

/// A JSON-RPC error to send back, with the id it answers (None → `null`).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message} ({code})")]
pub struct RpcError {
    pub id: Option<Id>,
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(id: Option<Id>, code: i64, message: impl Into<String>) -> RpcError {
        RpcError {
            id,
            code,
            message: message.into(),
            data: None,
        }
    }

    pub fn with_data(mut self, data: Value) -> RpcError {
        self.data = Some(data);
        self
    }

    /// The error response object.
    pub fn to_value(&self) -> Value {
        let mut error = Map::new();
        error.insert("code".into(), json!(self.code));
        error.insert("message".into(), json!(self.message));
        if let Some(data) = &self.data {
            error.insert("data".into(), data.clone());
        }
        json!({"jsonrpc": "2.0", "id": self.id, "error": error})
    }
}

/// The refusal of an agent's message of `length` bytes, over the limit, unparsed.
pub fn too_large(length: usize, limits: &Limits) -> RpcError {
    RpcError::new(
        None,
        codes::INVALID_REQUEST,
        format!(
            "message of {length} bytes exceeds the limit of {} bytes",
            limits.max_bytes
        ),
    )
}

/// Parses one body or line from an agent.
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Incoming, RpcError> {
    if bytes.len() > limits.max_bytes {
        return Err(too_large(bytes.len(), limits));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        RpcError::new(
            None,
            codes::PARSE_ERROR,
            format!("message is not valid UTF-8: {e}"),
        )
    })?;
    check_depth(text, limits.max_depth)?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| RpcError::new(None, codes::PARSE_ERROR, format!("invalid JSON: {e}")))?;
    match value {
        Value::Array(items) => parse_batch(items, limits),
        single => Ok(Incoming::Single(message_from_agent(single)?)),
    }
}

/// Classifies one message of an agent. A message without an `id` is a notification, which
/// has no answer and so no place for a refusal; MCP names every notification
/// `notifications/...`, so anything else without an `id` (say a `tools/call`) is refused
/// rather than passed on unjudged.
fn message_from_agent(value: Value) -> Result<Message, RpcError> {
    let message = message_from_value(value)?;
    if let Message::Notification(notification) = &message
        && !notification.method.starts_with("notifications/")
    {
        return Err(RpcError::new(
            None,
            codes::INVALID_REQUEST,
            format!(
                "{} has no \"id\": a request needs one (only notifications/... are sent without)",
                notification.method
            ),
        ));
    }
    Ok(message)
}

fn parse_batch(items: Vec<Value>, limits: &Limits) -> Result<Incoming, RpcError> {
    if items.is_empty() {
        return Err(RpcError::new(None, codes::INVALID_REQUEST, "empty batch"));
    }
    if items.len() > limits.max_batch {
        return Err(RpcError::new(
            None,
            codes::INVALID_REQUEST,
            format!(
                "batch of {} messages exceeds the limit of {}",
                items.len(),
                limits.max_batch
            ),
        ));
    }
    let mut seen = HashSet::new();
    let messages = items
        .into_iter()
        .map(|item| {
            let message = message_from_agent(item)?;
            if let Message::Request(request) = &message
                && !seen.insert(request.id.clone())
            {
                return Err(RpcError::new(
                    Some(request.id.clone()),
                    codes::INVALID_REQUEST,
                    format!("duplicate request id {} in batch", request.id),
                ));
            }
            Ok(message)
        })
        .collect();
    Ok(Incoming::Batch(messages))
}

/// Rejects nesting deeper than `max_depth` before serde builds it (deep input would otherwise
/// cost stack and memory). Counts brackets outside strings.
fn check_depth(text: &str, max_depth: usize) -> Result<(), RpcError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for byte in text.bytes() {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(RpcError::new(
                        None,
                        codes::INVALID_REQUEST,
                        format!("JSON nesting exceeds the limit of {max_depth}"),
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Classifies one JSON value as a request, notification or response.
pub fn message_from_value(value: Value) -> Result<Message, RpcError> {
    let Value::Object(mut object) = value else {
        return Err(RpcError::new(
            None,
            codes::INVALID_REQUEST,
            "a JSON-RPC message must be an object",
        ));
    };
    let id = match object.remove("id") {
        None => None,
        Some(raw) => Some(id_from_value(raw)?),
    };
    if object.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return Err(RpcError::new(
            id,
            codes::INVALID_REQUEST,
            "\"jsonrpc\" must be \"2.0\"",
        ));
    }
    let params = object.remove("params");
    if let Err(message) = check_mcp_params(params.as_ref()) {
        return Err(RpcError::new(id, codes::INVALID_REQUEST, message));
    }
    match (object.remove("method"), id) {
        (Some(Value::String(method)), Some(id)) => {
            Ok(Message::Request(Request { id, method, params }))
        }
        (Some(Value::String(method)), None) => {
            Ok(Message::Notification(Notification { method, params }))
        }
        (Some(_), id) => Err(RpcError::new(
            id,
            codes::INVALID_REQUEST,
            "\"method\" must be a string",
        )),
        (None, Some(id)) => response_from_object(id, object),
        (None, None) => Err(RpcError::new(
            None,
            codes::INVALID_REQUEST,
            "message has neither \"method\" nor \"id\"",
        )),
    }
}

/// MCP narrows JSON-RPC: `params`, where present, is an object (never an array), and so is
/// its `_meta`. A server built on an MCP SDK drops a message that breaks this without
/// answering, and mcp-guard could not put its identity keys into it; so it is refused here
/// rather than left to wait for the server's request timeout.
fn check_mcp_params(params: Option<&Value>) -> Result<(), &'static str> {
    match params {
        None => Ok(()),
        Some(Value::Object(params)) => match params.get("_meta") {
            None | Some(Value::Object(_)) => Ok(()),
            Some(_) => Err("\"params._meta\" must be an object"),
        },
        Some(_) => Err("\"params\" must be an object (MCP has no positional parameters)"),
    }
}

fn response_from_object(id: Id, mut object: Map<String, Value>) -> Result<Message, RpcError> {
    match (object.remove("result"), object.remove("error")) {
        (Some(result), None) => Ok(Message::Response(Response {
            id,
            outcome: Ok(result),
        })),
        (None, Some(error)) if error.is_object() => Ok(Message::Response(Response {
            id,
            outcome: Err(error),
        })),
        _ => Err(RpcError::new(
            Some(id),
            codes::INVALID_REQUEST,
            "a response needs exactly one of \"result\" or an \"error\" object",
        )),
    }
}

fn id_from_value(raw: Value) -> Result<Id, RpcError> {
    match raw {
        Value::String(s) => Ok(Id::String(s)),
        Value::Number(n) => n.as_i64().map(Id::Number).ok_or_else(|| {
            RpcError::new(
                None,
                codes::INVALID_REQUEST,
                "\"id\" must be a string or an integer",
            )
        }),
        _ => Err(RpcError::new(
            None,
            codes::INVALID_REQUEST,
            "\"id\" must be a string or an integer (null is not allowed)",
        )),
    }
}

impl Message {
    pub fn to_value(&self) -> Value {
        match self {
            Message::Request(r) => with_params(
                json!({"jsonrpc": "2.0", "id": r.id, "method": r.method}),
                &r.params,
            ),
            Message::Notification(n) => {
                with_params(json!({"jsonrpc": "2.0", "method": n.method}), &n.params)
            }
            Message::Response(r) => match &r.outcome {
                Ok(result) => json!({"jsonrpc": "2.0", "id": r.id, "result": result}),
                Err(error) => json!({"jsonrpc": "2.0", "id": r.id, "error": error}),
            },
        }
    }

    pub fn method(&self) -> Option<&str> {
        match self {
            Message::Request(r) => Some(&r.method),
            Message::Notification(n) => Some(&n.method),
            Message::Response(_) => None,
        }
    }
}

fn with_params(mut value: Value, params: &Option<Value>) -> Value {
    if let Some(params) = params {
        value["params"] = params.clone();
    }
    value
}

/// A successful response.
pub fn result_response(id: &Id, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_one(text: &str) -> Result<Message, RpcError> {
        match parse(text.as_bytes(), &Limits::default())? {
            Incoming::Single(m) => Ok(m),
            Incoming::Batch(_) => panic!("batch"),
        }
    }

    #[test]
    fn classifies_requests_notifications_and_responses() {
        let request =
            parse_one(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#).unwrap();
        assert!(matches!(
            request,
            Message::Request(Request {
                id: Id::Number(1),
                ..
            })
        ));
        let note = parse_one(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert!(matches!(note, Message::Notification(_)));
        let response = parse_one(r#"{"jsonrpc":"2.0","id":"a","result":{}}"#).unwrap();
        assert!(matches!(
            response,
            Message::Response(Response { outcome: Ok(_), .. })
        ));
    }

    #[test]
    fn a_request_without_an_id_is_refused_not_taken_for_a_notification() {
        let error = parse_one(r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"x"}}"#)
            .unwrap_err();
        assert_eq!(error.code, codes::INVALID_REQUEST);
        assert_eq!(error.id, None);
        assert!(
            error.message.contains("tools/call has no \"id\""),
            "{}",
            error.message
        );
        let batch = parse(
            br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"resources/read"}]"#,
            &Limits::default(),
        )
        .unwrap();
        let Incoming::Batch(items) = batch else {
            panic!("not a batch")
        };
        assert!(items[0].is_ok());
        assert_eq!(items[1].as_ref().unwrap_err().code, codes::INVALID_REQUEST);
        let cancelled =
            parse_one(r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{}}"#);
        assert!(matches!(cancelled, Ok(Message::Notification(_))));
    }

    #[test]
    fn bad_input_becomes_json_rpc_errors() {
        let cases = [
            ("not json", codes::PARSE_ERROR),
            (
                r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#,
                codes::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","id":null,"method":"x"}"#,
                codes::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1.5,"method":"x"}"#,
                codes::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":7}"#,
                codes::INVALID_REQUEST,
            ),
            (r#"{"jsonrpc":"2.0"}"#, codes::INVALID_REQUEST),
            (r#"[]"#, codes::INVALID_REQUEST),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"x","params":3}"#,
                codes::INVALID_REQUEST,
            ),
            // MCP's params are named: an SDK server drops these unanswered.
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":[[1]]}"#,
                codes::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"notifications/progress","params":[]}"#,
                codes::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":{"_meta":5}}"#,
                codes::INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":{"_meta":null}}"#,
                codes::INVALID_REQUEST,
            ),
        ];
        for (text, code) in cases {
            let err = parse(text.as_bytes(), &Limits::default()).unwrap_err();
            assert_eq!(err.code, code, "{text}");
        }
    }

    #[test]
    fn invalid_utf8_oversize_and_deep_nesting_are_refused() {
        let limits = Limits {
            max_bytes: 64,
            max_batch: 2,
            max_depth: 3,
        };
        assert_eq!(
            parse(b"\xff\xfe", &limits).unwrap_err().code,
            codes::PARSE_ERROR
        );
        let big = format!(r#"{{"jsonrpc":"2.0","method":"{}"}}"#, "x".repeat(100));
        assert!(
            parse(big.as_bytes(), &limits)
                .unwrap_err()
                .message
                .contains("exceeds")
        );
        let deep = r#"{"a":[[[1]]]}"#;
        assert!(
            parse(deep.as_bytes(), &limits)
                .unwrap_err()
                .message
                .contains("nesting")
        );
        // Brackets inside strings do not count.
        let quoted = r#"{"jsonrpc":"2.0","method":"notifications/[[[[[["}"#;
        assert!(parse(quoted.as_bytes(), &limits).is_ok());
    }

    #[test]
    fn batches_are_judged_per_element_and_duplicates_refused() {
        let text = r#"[{"jsonrpc":"2.0","id":1,"method":"a"},{"jsonrpc":"2.0","id":1,"method":"b"},{"bad":true}]"#;
        let Incoming::Batch(items) = parse(text.as_bytes(), &Limits::default()).unwrap() else {
            panic!("not a batch")
        };
        assert!(items[0].is_ok());
        assert!(items[1].as_ref().unwrap_err().message.contains("duplicate"));
        assert!(items[2].is_err());
        let limits = Limits {
            max_batch: 1,
            ..Limits::default()
        };
        assert!(parse(text.as_bytes(), &limits).is_err());
    }

    #[test]
    fn round_trips_to_values() {
        let text = r#"{"jsonrpc":"2.0","id":"x","method":"tools/call","params":{"name":"echo"}}"#;
        let message = parse_one(text).unwrap();
        assert_eq!(
            message.to_value(),
            serde_json::from_str::<Value>(text).unwrap()
        );
        let error = RpcError::new(Some(Id::Number(3)), codes::POLICY_DENIED, "denied")
            .with_data(json!({"rule": "r"}));
        assert_eq!(error.to_value()["error"]["data"]["rule"], "r");
    }
}
