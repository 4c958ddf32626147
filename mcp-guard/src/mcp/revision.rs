//! MCP protocol revisions. 2025-06-18 and 2025-11-25 are stateful (initialize handshake,
//! `Mcp-Session-Id`); 2026-07-28 is stateless: no initialize, `server/discover`, protocol data in
//! each request's `params._meta`, and `Mcp-Method` / `Mcp-Name` routing headers that must agree
//! with the body.

use serde_json::Value;

use super::jsonrpc::{Incoming, Message};

/// Revisions mcp-guard speaks, oldest first.
pub const SUPPORTED: [&str; 4] = ["2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28"];

/// Keys of `params._meta` that carry the protocol version in stateless requests.
const META_VERSION_KEYS: [&str; 2] = ["io.modelcontextprotocol/protocolVersion", "protocolVersion"];
/// `params._meta` key an agent may use to name its session in stateless traffic.
pub const META_SESSION_KEY: &str = "io.mcp-guard/session";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Revision {
    V2025_03_26,
    V2025_06_18,
    V2025_11_25,
    V2026_07_28,
}

impl Revision {
    pub fn parse(text: &str) -> Option<Revision> {
        match text.trim() {
            "2025-03-26" => Some(Revision::V2025_03_26),
            "2025-06-18" => Some(Revision::V2025_06_18),
            "2025-11-25" => Some(Revision::V2025_11_25),
            "2026-07-28" => Some(Revision::V2026_07_28),
            _ => None,
        }
    }

    pub fn is_stateless(self) -> bool {
        self >= Revision::V2026_07_28
    }
}

fn single_request(incoming: &Incoming) -> Option<(&str, Option<&Value>)> {
    match incoming {
        Incoming::Single(Message::Request(r)) => Some((&r.method, r.params.as_ref())),
        Incoming::Single(Message::Notification(n)) => Some((&n.method, n.params.as_ref())),
        _ => None,
    }
}

fn meta(incoming: &Incoming) -> Option<&serde_json::Map<String, Value>> {
    let (_, params) = single_request(incoming)?;
    params?.get("_meta")?.as_object()
}

/// Whether a request carries the stateless revisions' `_meta` envelope (the agent speaks
/// 2026-07-28 or later, whatever transport it came on).
pub fn is_stateless_request(params: Option<&Value>) -> bool {
    params
        .and_then(|p| p.get("_meta"))
        .and_then(|meta| {
            META_VERSION_KEYS
                .iter()
                .find_map(|key| meta.get(*key)?.as_str())
        })
        .and_then(Revision::parse)
        .is_some_and(Revision::is_stateless)
}

/// The revision a stateless request names in its `_meta`.
pub fn message_revision(incoming: &Incoming) -> Option<Revision> {
    let meta = meta(incoming)?;
    META_VERSION_KEYS
        .iter()
        .find_map(|key| meta.get(*key)?.as_str())
        .and_then(Revision::parse)
}

/// The session an agent names in `_meta` (stateless traffic).
pub fn meta_session(incoming: &Incoming) -> Option<String> {
    Some(meta(incoming)?.get(META_SESSION_KEY)?.as_str()?.to_owned())
}

/// The routing headers of a stateless request must be present and agree with the body: an
/// intermediary that routes on them must see what the server will execute.
pub fn check_routing_headers(
    incoming: &Incoming,
    protocol_version: Option<&str>,
    mcp_method: Option<&str>,
    mcp_name: Option<&str>,
) -> Result<(), String> {
    if let Incoming::Batch(_) = incoming {
        // The stateless revision has no batches, and one pair of routing headers cannot
        // describe several messages.
        return Err(
            "a stateless (2026-07-28) request cannot be a JSON-RPC batch: send each message \
             in a POST of its own, with its own Mcp-Method and Mcp-Name"
                .to_owned(),
        );
    }
    let Some((method, params)) = single_request(incoming) else {
        return Ok(());
    };
    let meta_version = meta(incoming).and_then(|meta| {
        META_VERSION_KEYS
            .iter()
            .find_map(|key| meta.get(*key)?.as_str())
    });
    if let (Some(header), Some(body)) = (protocol_version, meta_version)
        && header != body
    {
        return Err(format!(
            "MCP-Protocol-Version header {header:?} does not match params._meta protocol version {body:?}"
        ));
    }
    match mcp_method {
        None => {
            return Err(format!(
                "missing Mcp-Method header (body method is {method:?})"
            ));
        }
        Some(header) if header != method => {
            return Err(format!(
                "Mcp-Method header {header:?} does not match body method {method:?}"
            ));
        }
        Some(_) => {}
    }
    let name_key = match method {
        "tools/call" | "prompts/get" => "name",
        "resources/read" => "uri",
        _ => return Ok(()),
    };
    let body_name = params.and_then(|p| p.get(name_key)).and_then(Value::as_str);
    match (mcp_name, body_name) {
        (Some(header), Some(body)) if header == body => Ok(()),
        (None, _) => Err(format!("missing Mcp-Name header for {method}")),
        (Some(header), body) => Err(format!(
            "Mcp-Name header {header:?} does not match params.{name_key} {body:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::jsonrpc::{Limits, parse};

    fn incoming(text: &str) -> Incoming {
        parse(text.as_bytes(), &Limits::default()).unwrap()
    }

    #[test]
    fn revisions_parse_and_only_the_newest_is_stateless() {
        assert!(Revision::parse("2026-07-28").unwrap().is_stateless());
        assert!(!Revision::parse("2025-11-25").unwrap().is_stateless());
        assert!(Revision::parse("2024-11-05").is_none());
    }

    #[test]
    fn routing_headers_must_match_the_body() {
        let call =
            incoming(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}"#);
        let check = |method, name| check_routing_headers(&call, None, method, name);
        assert!(check(Some("tools/call"), Some("echo")).is_ok());
        assert!(check(Some("tools/list"), Some("echo")).is_err());
        assert!(check(Some("tools/call"), Some("write")).is_err());
        assert!(check(None, Some("echo")).is_err());
        assert!(check(Some("tools/call"), None).is_err());
        let list = incoming(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#,
        );
        assert!(check_routing_headers(&list, Some("2026-07-28"), Some("tools/list"), None).is_ok());
        assert!(
            check_routing_headers(&list, Some("2025-11-25"), Some("tools/list"), None).is_err()
        );
    }

    #[test]
    fn a_stateless_batch_is_refused_whatever_its_headers() {
        let batch = incoming(
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"method":"tools/list"}]"#,
        );
        let refused = check_routing_headers(&batch, Some("2026-07-28"), Some("tools/list"), None)
            .unwrap_err();
        assert!(refused.contains("cannot be a JSON-RPC batch"), "{refused}");
    }

    #[test]
    fn meta_carries_revision_and_session() {
        let call = incoming(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.mcp-guard/session":"s1"}}}"#,
        );
        assert_eq!(message_revision(&call), Some(Revision::V2026_07_28));
        assert_eq!(meta_session(&call).as_deref(), Some("s1"));
    }
}
