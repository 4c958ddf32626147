//! The MCP proxy end to end over its Streamable HTTP front: a real `mcp-guard run` daemon (kernel
//! egress on, its own bpffs/cgroup root and listen port) in front of real third-party MCP
//! servers (`@modelcontextprotocol/server-everything`, `server-filesystem`, `mcp-server-time`),
//! driven by the official Python SDK client (`tests/clients/mcp_client.py`) and by raw HTTP
//! (`tests/clients/raw_http.py`) for what an SDK would never send.
//!
//! Root only. The peers come from `cargo xtask setup`; without them these tests fail (never
//! skip) and say so.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mcp_guard_tests::*;
use serde_json::{Value, json};

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
const FAST_SERVER: &str = env!("CARGO_BIN_EXE_mcp-fast-server");

/// The handshake revision most tests speak; every peer accepts it (see `every_revision_the_peers_speak_passes_through`).
const HANDSHAKE: &str = "2025-11-25";
const STATELESS: &str = "2026-07-28";

// ---------------------------------------------------------------------------------------------
// A daemon with its HTTP front
// ---------------------------------------------------------------------------------------------

/// A running daemon serving MCP on a loopback port of its own. Fields drop in order: the
/// daemon stops before the environment tears its cgroups and pins down.
struct Front {
    daemon: Daemon,
    env: TestEnv,
    peers: Peers,
    addr: SocketAddr,
}

impl Front {
    fn start(env: TestEnv, peers: Peers, servers: Value) -> Front {
        Front::start_with(env, peers, servers, |_| {})
    }

    /// Like [`Front::start`], letting `tweak` change the policy document first (limits).
    fn start_with(
        env: TestEnv,
        peers: Peers,
        servers: Value,
        tweak: impl FnOnce(&mut Value),
    ) -> Front {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
        let mut document = env.proxy_policy(addr, servers);
        tweak(&mut document);
        env.write_policy_document(&document);
        let daemon = env.start_daemon();
        Front {
            daemon,
            env,
            peers,
            addr,
        }
    }

    fn path(server: &str) -> String {
        format!("/servers/{server}/mcp")
    }

    fn url(&self, server: &str) -> String {
        format!("http://{}{}", self.addr, Front::path(server))
    }

    /// The SDK client over HTTP through mcp-guard.
    fn client(&self, server: &str, version: &str, script: &Value) -> ClientRun {
        mcp_client(
            &self.peers,
            Transport::Http(&self.url(server)),
            version,
            script,
        )
    }

    fn raw(&self, server: &str, args: &[&str]) -> Value {
        raw_http(&self.peers, &self.url(server), args)
    }

    /// `raw_http.py` opening a session on `server` (initialize at [`HANDSHAKE`]) and pinging in
    /// it: for servers whose session is refused, the output's `initialize` says why.
    fn initialize_then_ping(&self, server: &str) -> Value {
        self.raw(
            server,
            &[
                "--initialize",
                HANDSHAKE,
                "--body",
                r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#,
            ],
        )
    }

    /// Opens a session with the initialize handshake at `version` (then
    /// `notifications/initialized`) and returns its `Mcp-Session-Id`.
    fn open_session(&self, server: &str, version: &str) -> String {
        open_raw_session(&self.peers, &self.url(server), version)
    }

    /// Ends `session` of `server` with DELETE, which must succeed.
    fn delete_session(&self, server: &str, session: &str) {
        let path = Front::path(server);
        let deleted = http_request_head(self.addr, "DELETE", &path, &[("Mcp-Session-Id", session)])
            .expect("DELETE");
        assert!(
            (200..300).contains(&deleted.status),
            "DELETE: {} {:?}",
            deleted.status,
            deleted.headers
        );
    }

    /// POSTs `body` inside an existing session.
    fn in_session(&self, server: &str, session: &str, body: &Value) -> Value {
        post_in_session(&self.peers, &self.url(server), session, HANDSHAKE, body)
    }

    /// [`Self::in_session`] as raw HTTP from this process, for tests that send many requests:
    /// the whole answer, whatever its status.
    fn post_in_session(
        &self,
        server: &str,
        session: &str,
        body: &Value,
    ) -> std::io::Result<HttpAnswer> {
        let headers = [
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
            ("MCP-Protocol-Version", HANDSHAKE),
            ("Mcp-Session-Id", session),
        ];
        let path = Front::path(server);
        http_exchange(self.addr, "POST", &path, &headers, &body.to_string())
    }

    /// The URIs of the resource updates waiting for `session`'s agent (its GET stream, open
    /// for 2 s).
    fn updates_waiting(&self, server: &str, session: &str) -> Vec<Value> {
        let args = ["--method", "GET", "--session", session, "--timeout", "2"];
        let stream = self.raw(server, &args);
        let events = stream["events"].as_array();
        let events = events.unwrap_or_else(|| panic!("no events: {stream}"));
        let updates = events
            .iter()
            .filter(|event| event["data"]["method"] == "notifications/resources/updated");
        updates
            .map(|event| event["data"]["params"]["uri"].clone())
            .collect()
    }

    /// A new session of `server`, checked to list exactly `tools`; its id.
    fn session_listing(&self, server: &str, tools: &[&str]) -> String {
        let session = self.open_session(server, HANDSHAKE);
        let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
        let listed = response_message(&self.in_session(server, &session, &list));
        assert_eq!(tool_names(&listed["result"]), set(tools), "{listed}");
        session
    }

    /// Waits (a while, then fails) for the `end` record of `session`, and returns it.
    fn until_session_ended(&self, session: &str) -> Value {
        let ended = || {
            audit_records(&self.env.audit_path()).into_iter().find(|r| {
                r["kind"] == "session" && r["session"] == session && r["detail"]["event"] == "end"
            })
        };
        let mut record = None;
        assert!(
            poll_until(TIMEOUT, || {
                record = ended();
                record.is_some()
            }),
            "session {session} was not ended: {:#?}",
            audit_records(&self.env.audit_path())
        );
        record.unwrap()
    }

    /// The one server process of a session.
    fn session_pid(&self, server: &str, session: &str) -> i32 {
        let cgroup = self.env.session_cgroup(server, session);
        let mut pids = Vec::new();
        assert!(
            poll_until(TIMEOUT, || {
                pids = cgroup_pids(&cgroup);
                !pids.is_empty()
            }),
            "no process in the session cgroup {}; the server cgroups are {:?}",
            cgroup.display(),
            std::fs::read_dir(self.env.cgroup_root.join(server))
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
                .unwrap_or_default()
        );
        assert_eq!(
            pids.len(),
            1,
            "expected the server alone in {}: {pids:?}",
            cgroup.display()
        );
        pids[0]
    }
}

// ---------------------------------------------------------------------------------------------
// Reading answers
// ---------------------------------------------------------------------------------------------

fn tool<'a>(list_result: &'a Value, name: &str) -> &'a Value {
    list_result["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|tool| tool["name"] == name)
        .unwrap_or_else(|| panic!("no tool {name} in {list_result}"))
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// The text of the first content item of a tool result.
fn text(result: &Value) -> &str {
    result["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text content in {result}"))
}

/// Asserts a JSON-RPC error is mcp-guard's policy refusal naming `rule`.
fn assert_policy_denied(error: &Value, rule: &str) {
    assert_eq!(error["code"], -32010, "not a policy refusal: {error}");
    assert_eq!(
        error["data"]["rule"], rule,
        "refusal names another rule: {error}"
    );
    assert!(
        error["data"]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "refusal without a reason: {error}"
    );
}

fn assert_unknown_tool(error: &Value, name: &str) {
    assert_eq!(error["code"], -32602, "{error}");
    assert_eq!(error["message"], format!("Unknown tool: {name}"), "{error}");
}

/// The answer to request `id` in a batch answer.
fn answer_for(answers: &[Value], id: i64) -> &Value {
    let matching: Vec<&Value> = answers.iter().filter(|a| a["id"] == id).collect();
    assert_eq!(matching.len(), 1, "answers for id {id}: {answers:?}");
    matching[0]
}

/// A `get_current_time` result with the parts that move with the clock replaced: the
/// datetime (checked to be Tokyo's fixed offset) and the weekday (checked to be one).
fn time_shape(result: &Value) -> Value {
    fn normalise(object: &mut Value) {
        let datetime = object["datetime"].as_str().unwrap_or_default().to_string();
        assert!(
            datetime.ends_with("+09:00") && datetime.len() == 25,
            "not a Tokyo datetime: {object}"
        );
        object["datetime"] = json!("<datetime>");
        let weekdays = [
            "Monday",
            "Tuesday",
            "Wednesday",
            "Thursday",
            "Friday",
            "Saturday",
            "Sunday",
        ];
        assert!(
            object["day_of_week"]
                .as_str()
                .is_some_and(|d| weekdays.contains(&d)),
            "no weekday in {object}"
        );
        object["day_of_week"] = json!("<weekday>");
    }
    let mut shape = result.clone();
    normalise(&mut shape["structuredContent"]);
    let mut inner: Value = serde_json::from_str(text(result))
        .unwrap_or_else(|e| panic!("the text content is not the JSON time ({e}): {result}"));
    normalise(&mut inner);
    shape["content"][0]["text"] = inner;
    shape
}

// ---------------------------------------------------------------------------------------------
// 1. Allowed calls: the same answer as without mcp-guard
// ---------------------------------------------------------------------------------------------

/// server-everything `echo` and mcp-server-time `get_current_time`: the SDK client gets the
/// same initialize result, the same tool definition and the same call result through
/// mcp-guard's HTTP front and its stdio front as it gets talking to the server directly.
#[test]
fn allowed_calls_return_what_the_server_returns_directly() {
    let env = TestEnv::new("proxy-same", PROBE);
    let peers = Peers::require();
    let servers = json!({
        "everything": stdio_server(peers.everything(), vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        ]),
        "time": stdio_server(peers.time(), current_time_rules()),
    });
    let front = Front::start(env, peers, servers);
    let stdio_front = |server: &str| {
        front
            .env
            .stdio_front(server, AGENT, &front.env.control_socket)
    };

    // server-everything: echo.
    let script = json!([
        {"op": "list_tools"},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "same through mcp-guard"}},
    ]);
    let everything = front.peers.everything();
    let direct = mcp_client(
        &front.peers,
        Transport::Stdio(&everything),
        HANDSHAKE,
        &script,
    );
    let via_http = front.client("everything", HANDSHAKE, &script);
    let stdio_command = stdio_front("everything");
    let via_stdio = mcp_client(
        &front.peers,
        Transport::Stdio(&stdio_command),
        HANDSHAKE,
        &script,
    );
    assert_eq!(text(direct.ok(1)), "Echo: same through mcp-guard");
    for (front_name, run) in [("HTTP", &via_http), ("stdio", &via_stdio)] {
        assert_same_as_direct(front_name, run, &direct, &[(1, "echo")]);
    }

    // mcp-server-time: get_current_time in a zone without daylight saving time.
    let script = json!([
        {"op": "call_tool", "name": "get_current_time", "arguments": {"timezone": "Asia/Tokyo"}},
    ]);
    let time = front.peers.time();
    let direct = mcp_client(&front.peers, Transport::Stdio(&time), HANDSHAKE, &script);
    let via_http = front.client("time", HANDSHAKE, &script);
    let stdio_command = stdio_front("time");
    let via_stdio = mcp_client(
        &front.peers,
        Transport::Stdio(&stdio_command),
        HANDSHAKE,
        &script,
    );
    let expected = time_shape(direct.ok(0));
    assert_eq!(expected["structuredContent"]["timezone"], "Asia/Tokyo");
    for (front_name, run) in [("HTTP", &via_http), ("stdio", &via_stdio)] {
        assert_eq!(
            run.initialize["server_info"], direct.initialize["server_info"],
            "{front_name}"
        );
        assert_eq!(
            time_shape(run.ok(0)),
            expected,
            "get_current_time through the {front_name} front differs from direct"
        );
    }
}

/// A run through `front_name` against the same script run directly: the same initialize, a
/// `tools/list` (operation 0) of exactly the tools of `calls`, each defined as directly, and
/// each call (operation, tool) answered as directly.
fn assert_same_as_direct(
    front_name: &str,
    run: &ClientRun,
    direct: &ClientRun,
    calls: &[(usize, &str)],
) {
    for key in ["protocol_version", "server_info", "capabilities"] {
        assert_eq!(
            run.initialize[key], direct.initialize[key],
            "initialize {key} through the {front_name} front differs from direct"
        );
    }
    let listed: Vec<&str> = calls.iter().map(|(_, name)| *name).collect();
    assert_eq!(
        tool_names(run.ok(0)),
        set(&listed),
        "tools/list through the {front_name} front"
    );
    for (op, tool_name) in calls {
        assert_eq!(
            tool(run.ok(0), tool_name),
            tool(direct.ok(0), tool_name),
            "the {tool_name} definition through the {front_name} front differs from direct"
        );
        assert_eq!(
            run.ok(*op),
            direct.ok(*op),
            "{tool_name} through the {front_name} front differs from direct"
        );
    }
}

/// The official TypeScript SDK client, which most agents are built on, through both fronts to
/// server-everything: it connects (the HTTP front answers its GET stream and its JSON
/// answers), sees the filtered list, gets what it gets directly for allowed calls, and gets
/// refusals for the rest: an `arguments` constraint (-32010 naming the rule), and a hidden tool
/// and a missing one answered alike (-32602).
#[test]
fn the_typescript_sdk_client_gets_the_same_through_both_fronts() {
    let env = TestEnv::new("proxy-typescript", PROBE);
    let peers = Peers::require();
    let servers = json!({
        "everything": stdio_server(peers.everything(), vec![
            list_tools_rule(),
            allow("short-echo", json!({
                "roles": [DEVELOPER], "tools": ["echo"],
                "arguments": {"properties": {"message": {"maxLength": 20}}},
            })),
            allow("sum", json!({"roles": [DEVELOPER], "tools": ["get-sum"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let script = json!([
        {"op": "list_tools"},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "from TypeScript"}},
        {"op": "call_tool", "name": "get-sum", "arguments": {"a": 2, "b": 40}},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "a message longer than twenty"}},
        {"op": "call_tool", "name": "get-env", "arguments": {}},
        {"op": "call_tool", "name": "no-such-tool", "arguments": {}},
    ]);
    let everything = front.peers.everything();
    let direct = ts_client(&front.peers, Transport::Stdio(&everything), &script);
    let via_http = ts_client(
        &front.peers,
        Transport::Http(&front.url("everything")),
        &script,
    );
    let stdio_command = front
        .env
        .stdio_front("everything", AGENT, &front.env.control_socket);
    let via_stdio = ts_client(&front.peers, Transport::Stdio(&stdio_command), &script);

    assert_eq!(text(direct.ok(1)), "Echo: from TypeScript");
    assert!(tool_names(direct.ok(0)).contains("get-env"));
    for (front_name, run) in [("HTTP", &via_http), ("stdio", &via_stdio)] {
        assert_same_as_direct(front_name, run, &direct, &[(1, "echo"), (2, "get-sum")]);
        assert_policy_denied(run.error(3), "short-echo");
        assert_unknown_tool(run.error(4), "get-env");
        assert_unknown_tool(run.error(5), "no-such-tool");
    }
    // Both clients' refusals are on record, as the TypeScript client's calls.
    let refused: Vec<(Value, Value)> = audit_records(&front.env.audit_path())
        .into_iter()
        .filter(|r| r["decision"] == "deny")
        .map(|r| (r["tool"].clone(), r["rule"].clone()))
        .collect();
    for (tool_name, rule) in [
        ("echo", "short-echo"),
        ("get-env", "unknown-tool"),
        ("no-such-tool", "unknown-tool"),
    ] {
        let count = refused
            .iter()
            .filter(|(t, r)| *t == tool_name && *r == rule)
            .count();
        assert_eq!(count, 2, "{tool_name} refusals by {rule}: {refused:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Denied calls never reach the server
// ---------------------------------------------------------------------------------------------

/// server-filesystem over a temporary directory. Reads and writes are allowed, but a deny
/// rule refuses writes to `*.conf`: that write is answered -32010 naming the rule, and the
/// file does not exist afterwards. An allowed write (the control) does create its file, and
/// an allowed read returns the file's content.
#[test]
fn denied_write_is_refused_and_never_reaches_the_server() {
    let env = TestEnv::new("proxy-deny", PROBE);
    let peers = Peers::require();
    let root = env.files_dir(Some("hello from the test\n"));
    let servers = json!({
        "files": stdio_server(peers.filesystem(&root), vec![
            list_tools_rule(),
            allow("read-files", json!({"roles": [DEVELOPER], "tools": ["read_text_file", "list_directory"]})),
            allow("write-files", json!({"roles": [DEVELOPER], "tools": ["write_file"]})),
            deny("no-config-writes", json!({
                "tools": ["write_file"],
                "arguments": {
                    "type": "object",
                    "properties": {"path": {"type": "string", "pattern": "\\.conf$"}},
                    "required": ["path"],
                },
            })),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let path = |name: &str| root.join(name).display().to_string();
    let run = front.client(
        "files",
        HANDSHAKE,
        &json!([
            {"op": "call_tool", "name": "read_text_file", "arguments": {"path": path("readme.txt")}},
            {"op": "call_tool", "name": "write_file",
             "arguments": {"path": path("app.conf"), "content": "must never be written"}},
            {"op": "call_tool", "name": "write_file",
             "arguments": {"path": path("notes.txt"), "content": "written through mcp-guard"}},
            {"op": "call_tool", "name": "list_directory", "arguments": {"path": path("")}},
        ]),
    );

    assert_eq!(text(run.ok(0)), "hello from the test\n");
    assert_policy_denied(run.error(1), "no-config-writes");
    assert!(
        !root.join("app.conf").exists(),
        "the refused write reached the filesystem server: {} exists",
        root.join("app.conf").display()
    );
    assert_ne!(
        run.ok(2)["isError"],
        true,
        "the allowed write failed: {}",
        run.ok(2)
    );
    assert_eq!(
        std::fs::read_to_string(root.join("notes.txt"))
            .ok()
            .as_deref(),
        Some("written through mcp-guard"),
        "the allowed write did not reach the server"
    );
    let listing = text(run.ok(3));
    assert!(
        listing.contains("readme.txt")
            && listing.contains("notes.txt")
            && !listing.contains("app.conf"),
        "directory listing: {listing}"
    );
}

/// The brief's exact policy: reads allowed, `write_file` denied by an explicit rule without
/// argument conditions. mcp-guard hides a tool such a rule denies, so the write is refused as
/// an unknown tool (-32602), and it never reaches the server: the file does not exist.
#[test]
fn explicitly_denied_tool_is_hidden_and_never_reaches_the_server() {
    let env = TestEnv::new("proxy-hidden-write", PROBE);
    let peers = Peers::require();
    let root = env.files_dir(Some("read me\n"));
    let servers = json!({
        "files": stdio_server(peers.filesystem(&root), vec![
            list_tools_rule(),
            allow("read-files", json!({"roles": [DEVELOPER], "tools": ["read_text_file", "list_directory"]})),
            deny("no-writes", json!({"tools": ["write_file"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let target = root.join("written.txt");
    let run = front.client(
        "files",
        HANDSHAKE,
        &json!([
            {"op": "list_tools"},
            {"op": "call_tool", "name": "write_file",
             "arguments": {"path": target.display().to_string(), "content": "must never be written"}},
            {"op": "call_tool", "name": "read_text_file",
             "arguments": {"path": root.join("readme.txt").display().to_string()}},
        ]),
    );
    assert_eq!(
        tool_names(run.ok(0)),
        set(&["list_directory", "read_text_file"])
    );
    assert_unknown_tool(run.error(1), "write_file");
    assert_eq!(text(run.ok(2)), "read me\n");

    // The same write without an `id` is no notification (MCP names those notifications/...):
    // it is refused too, not passed on unjudged.
    let session = front.open_session("files", HANDSHAKE);
    let idless = json!({"jsonrpc": "2.0", "method": "tools/call",
        "params": {"name": "write_file",
                   "arguments": {"path": target.display().to_string(), "content": "must never be written"}}});
    let output = front.in_session("files", &session, &idless);
    assert_eq!(output["status"], 400, "an id-less tools/call: {output}");
    assert_eq!(output["body"]["error"]["code"], -32600, "{output}");
    assert!(
        !target.exists(),
        "the refused write reached the server: {} exists",
        target.display()
    );
}

/// An agent's notification that is not protocol plumbing is judged like a request of its
/// method: one no rule allows is refused (`-32010`, `"id": null`, the rule named) and never
/// reaches the server; one a rule allows goes on (`202`). Both decisions are on record;
/// plumbing such as `notifications/initialized` needs no rule.
#[test]
fn an_agents_notification_is_judged_by_the_rules() {
    let env = TestEnv::new("proxy-notifications-judged", PROBE);
    let peers = Peers::require();
    let servers = json!({
        "everything": stdio_server(peers.everything(), vec![
            list_tools_rule(),
            allow("roots-news", json!({"roles": [DEVELOPER], "methods": ["notifications/roots/*"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let session = front.open_session("everything", HANDSHAKE);
    let notify = |method: &str| {
        front.in_session(
            "everything",
            &session,
            &json!({"jsonrpc": "2.0", "method": method, "params": {}}),
        )
    };
    let refused = notify("notifications/custom/ping-the-server");
    assert_eq!(refused["status"], 200, "{refused}");
    let error = &refused["body"]["error"];
    assert_eq!(error["code"], -32010, "{refused}");
    assert_eq!(error["data"]["rule"], "default-deny", "{refused}");
    assert_eq!(refused["body"]["id"], Value::Null, "{refused}");
    let allowed = notify("notifications/roots/changed-elsewhere");
    assert_eq!(allowed["status"], 202, "{allowed}");

    let records = audit_records(&front.env.audit_path());
    let decision = |method: &str| -> Vec<(String, String)> {
        records
            .iter()
            .filter(|r| r["method"] == method && r.get("decision").is_some())
            .map(|r| (r["decision"].to_string(), r["rule"].to_string()))
            .collect()
    };
    assert_eq!(
        decision("notifications/custom/ping-the-server"),
        [("\"deny\"".to_owned(), "\"default-deny\"".to_owned())]
    );
    assert_eq!(
        decision("notifications/roots/changed-elsewhere"),
        [("\"allow\"".to_owned(), "\"roots-news\"".to_owned())]
    );
    assert!(
        decision("notifications/initialized").is_empty(),
        "plumbing is not judged: {records:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Filtered tools/list
// ---------------------------------------------------------------------------------------------

/// server-everything offers a dozen tools; the caller sees exactly those some rule lets them
/// call (an exact name, a glob) minus the one a deny rule hides, in JSON and in SSE answers.
/// Calls to tools they cannot see are "Unknown tool".
#[test]
fn tools_list_is_filtered_to_what_the_caller_may_call() {
    let env = TestEnv::new("proxy-filter", PROBE);
    let peers = Peers::require();
    let servers = json!({
        "everything": stdio_server(peers.everything(), vec![
            list_tools_rule(),
            allow("some-tools", json!({"roles": [DEVELOPER], "tools": ["echo", "get-sum", "get-tiny-*", "get-env"]})),
            deny("no-environment", json!({"tools": ["get-env"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let visible = set(&["echo", "get-sum", "get-tiny-image"]);

    let everything = front.peers.everything();
    let direct = mcp_client(
        &front.peers,
        Transport::Stdio(&everything),
        HANDSHAKE,
        &json!([{"op": "list_tools"}]),
    );
    let all = tool_names(direct.ok(0));
    assert!(
        all.is_superset(&visible)
            && all.contains("get-env")
            && all.contains("toggle-simulated-logging"),
        "server-everything no longer offers the tools this test filters: {all:?}"
    );

    let run = front.client(
        "everything",
        HANDSHAKE,
        &json!([
            {"op": "list_tools"},
            {"op": "call_tool", "name": "get-env", "arguments": {}},
            {"op": "call_tool", "name": "toggle-simulated-logging", "arguments": {}},
            {"op": "call_tool", "name": "get-sum", "arguments": {"a": 2, "b": 3}},
        ]),
    );
    assert_eq!(tool_names(run.ok(0)), visible, "filtered tools/list");
    assert_unknown_tool(run.error(1), "get-env");
    assert_unknown_tool(run.error(2), "toggle-simulated-logging");
    assert!(text(run.ok(3)).contains('5'), "get-sum: {}", run.ok(3));

    // The same list as an SSE answer (the agent accepts only text/event-stream).
    let session = front.open_session("everything", HANDSHAKE);
    let version = format!("MCP-Protocol-Version: {HANDSHAKE}");
    let list = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list"});
    let output = front.raw(
        "everything",
        &[
            "--session",
            &session,
            "--header",
            &version,
            "--header",
            "Accept: text/event-stream",
            "--body",
            &list.to_string(),
        ],
    );
    assert_eq!(output["status"], 200, "{output}");
    assert_eq!(output["content_type"], "text/event-stream", "{output}");
    let answer = response_message(&output);
    assert_eq!(answer["id"], 7, "{output}");
    assert_eq!(
        tool_names(&answer["result"]),
        visible,
        "filtered SSE tools/list"
    );
}

/// server-everything's resources, resource templates and prompts through the HTTP front: every
/// page of each list holds exactly what the server's page holds that the caller may use (by
/// URI, URI template and name: an allow glob minus a deny rule), which is exactly the one
/// static resource, template and two prompts expected. A read of a hidden resource and a get of
/// a hidden prompt are refused with -32010 naming the deny rule or `default-deny`, and are on
/// record as `deny`; the visible resource, a resource of the visible template and a visible
/// prompt are served.
#[test]
fn resource_template_and_prompt_lists_show_only_what_the_caller_may_use() {
    let env = TestEnv::new("proxy-resource-prompt-lists", PROBE);
    let peers = Peers::require();
    let lists = ["resources/list", "resources/templates/list", "prompts/list"];
    let servers = json!({
        "everything": stdio_server(peers.everything(), vec![
            allow("lists", json!({"roles": [DEVELOPER], "methods": lists})),
            allow("documents", json!({"roles": [DEVELOPER], "resources": [
                "demo://resource/static/document/s*", "demo://resource/dynamic/text/*"]})),
            deny("no-structure", json!({"resources": ["demo://resource/static/document/structure.md"]})),
            allow("prompts", json!({"roles": [DEVELOPER], "prompts": [
                "simple-prompt", "args-prompt", "completable-*"]})),
            deny("no-args-prompt", json!({"prompts": ["args-prompt"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let everything = front.peers.everything();
    let direct = |method: &str, params: Value| {
        let op = match method {
            "resources/list" => "list_resources",
            "resources/templates/list" => "list_resource_templates",
            _ => "list_prompts",
        };
        let mut step = json!({"op": op});
        if let Some(cursor) = params.get("cursor") {
            step["cursor"] = cursor.clone();
        }
        let run = mcp_client(
            &front.peers,
            Transport::Stdio(&everything),
            HANDSHAKE,
            &json!([step]),
        );
        json!({"result": run.ok(0)})
    };
    let session = front.open_session("everything", HANDSHAKE);
    let mut id = 100;
    let mut ask = |method: &str, params: Value| {
        id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        response_message(&front.in_session("everything", &session, &request))
    };

    // (list, its array, the key of an item, what the caller may use of it)
    let resource = "demo://resource/static/document/";
    let cases: [(&str, &str, &str, &[&str]); 3] = [
        (
            "resources/list",
            "resources",
            "uri",
            &["demo://resource/static/document/startup.md"],
        ),
        (
            "resources/templates/list",
            "resourceTemplates",
            "uriTemplate",
            &["demo://resource/dynamic/text/{resourceId}"],
        ),
        (
            "prompts/list",
            "prompts",
            "name",
            &["simple-prompt", "completable-prompt"],
        ),
    ];
    for (method, array, key, visible) in cases {
        let keys = |page: &Value| -> Vec<String> {
            let items = page[array].as_array();
            let items = items.unwrap_or_else(|| panic!("{method}: no {array} in {page}"));
            let names = items
                .iter()
                .map(|item| item[key].as_str().map(str::to_owned));
            names
                .collect::<Option<_>>()
                .unwrap_or_else(|| panic!("{method}: an item without {key}: {page}"))
        };
        let offered = list_pages(method, direct);
        let all: Vec<String> = offered.iter().flat_map(keys).collect();
        assert!(
            all.len() > visible.len() && visible.iter().all(|v| all.iter().any(|a| a == v)),
            "server-everything no longer offers what this test filters: {method} {all:?}"
        );
        let expected: Vec<Vec<String>> = offered
            .iter()
            .map(|page| {
                let usable = |k: &String| visible.contains(&k.as_str());
                keys(page).into_iter().filter(usable).collect()
            })
            .collect();
        let shown: Vec<Vec<String>> = list_pages(method, &mut ask).iter().map(keys).collect();
        assert_eq!(shown, expected, "{method}, page by page");
        assert_eq!(shown.concat(), visible, "{method}");
    }

    let startup = format!("{resource}startup.md");
    let read = |uri: &str| json!({"uri": uri});
    let served = ask("resources/read", read(&startup));
    assert_eq!(served["result"]["contents"][0]["uri"], startup, "{served}");
    let templated = "demo://resource/dynamic/text/1";
    let served = ask("resources/read", read(templated));
    assert_eq!(
        served["result"]["contents"][0]["uri"], templated,
        "{served}"
    );
    let served = ask("prompts/get", json!({"name": "simple-prompt"}));
    assert!(served["result"]["messages"].is_array(), "{served}");

    let structure = format!("{resource}structure.md");
    let architecture = format!("{resource}architecture.md");
    let city = json!({"city": "Paris"});
    let refusals = [
        (
            "resources/read",
            structure.as_str(),
            read(&structure),
            "no-structure",
        ),
        (
            "resources/read",
            architecture.as_str(),
            read(&architecture),
            "default-deny",
        ),
        (
            "prompts/get",
            "args-prompt",
            json!({"name": "args-prompt", "arguments": city}),
            "no-args-prompt",
        ),
        (
            "prompts/get",
            "resource-prompt",
            json!({"name": "resource-prompt"}),
            "default-deny",
        ),
    ];
    for (method, _, params, rule) in &refusals {
        let refused = ask(method, params.clone());
        assert_policy_denied(&refused["error"], rule);
    }
    let records = audit_records(&front.env.audit_path());
    for (method, target, _, rule) in &refusals {
        let decided: Vec<&Value> = records
            .iter()
            .filter(|r| r["method"] == *method && r["tool"] == *target)
            .collect();
        assert_eq!(decided.len(), 1, "{method} {target}: {records:#?}");
        assert_eq!(decided[0]["decision"], "deny", "{}", decided[0]);
        assert_eq!(decided[0]["rule"], *rule, "{}", decided[0]);
    }
}

/// Requests of one session on concurrent POSTs are answered as each finishes. A `rendezvous`
/// call to mcp-fast-server that can only end once a second one arrives is POSTed first; an
/// echo POSTed while it waits is answered, and the first POST is still unanswered then. The
/// second `rendezvous` ends both.
#[test]
fn concurrent_posts_of_one_session_are_answered_as_each_finishes() {
    let env = TestEnv::new("proxy-out-of-order", PROBE);
    let peers = Peers::require();
    let servers = json!({"fast": fast_server_calling(FAST_SERVER, &["echo", "rendezvous"])});
    let front = Front::start(env, peers, servers);
    let session = front.open_session("fast", HANDSHAKE);
    let call = |id: u64, name: &str, arguments: Value| {
        let request = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                             "params": {"name": name, "arguments": arguments}});
        response_message(&front.in_session("fast", &session, &request))
    };
    let meet = json!({"key": "http", "parties": 2});
    std::thread::scope(|scope| {
        let slow = scope.spawn(|| call(2, "rendezvous", meet.clone()));
        // The echo goes once the daemon has forwarded the first call.
        assert!(
            poll_until(TIMEOUT, || audit_records(&front.env.audit_path())
                .iter()
                .any(|r| r["tool"] == "rendezvous" && r["decision"] == "allow")),
            "the first call was never forwarded"
        );
        let echo = call(3, "echo", json!({"text": "overtakes"}));
        assert_eq!(text(&echo["result"]), "overtakes", "{echo}");
        assert!(
            !slow.is_finished(),
            "the first call was answered before the call that ends it"
        );
        let second = call(4, "rendezvous", meet.clone());
        let first = slow.join().expect("the first POST");
        let mut met = [text(&first["result"]), text(&second["result"])];
        met.sort();
        assert_eq!(met, ["met http as 1 of 2", "met http as 2 of 2"]);
    });
}

/// A rule's `when` reads the context of each request, not only the session's: get-sum is
/// allowed only while the workflow step is `review`. In one session, a request without the
/// step neither lists nor may call get-sum; with `MCP-Guard-Context: step=review` (header) or
/// `_meta["io.mcp-guard/context"]` it lists and calls it; the next request without it is
/// refused again, and another step is refused too.
#[test]
fn when_conditions_follow_the_context_of_each_request() {
    let front = everything_front(
        "proxy-when",
        vec![allow(
            "sum-in-review",
            json!({"roles": [DEVELOPER], "tools": ["get-sum"], "when": {"step": ["review"]}}),
        )],
    );
    let review = json!({"MCP-Guard-Context": "step=review"});
    let meta_review = json!({"io.mcp-guard/context": {"step": "review"}});
    let sum = json!({"a": 2, "b": 3});
    let run = front.client(
        "everything",
        HANDSHAKE,
        &json!([
            {"op": "list_tools"},
            {"op": "call_tool", "name": "get-sum", "arguments": sum},
            {"op": "list_tools", "headers": review},
            {"op": "call_tool", "name": "get-sum", "arguments": sum, "headers": review},
            {"op": "call_tool", "name": "get-sum", "arguments": sum, "meta": meta_review},
            {"op": "call_tool", "name": "get-sum", "arguments": sum},
            {"op": "call_tool", "name": "get-sum", "arguments": sum,
             "headers": {"MCP-Guard-Context": "step=draft"}},
        ]),
    );
    assert_eq!(tool_names(run.ok(0)), set(&["echo"]), "without a step");
    assert_unknown_tool(run.error(1), "get-sum");
    assert_eq!(
        tool_names(run.ok(2)),
        set(&["echo", "get-sum"]),
        "during review"
    );
    assert!(
        text(run.ok(3)).contains('5'),
        "header context: {}",
        run.ok(3)
    );
    assert!(
        text(run.ok(4)).contains('5'),
        "_meta context: {}",
        run.ok(4)
    );
    assert_unknown_tool(run.error(5), "get-sum");
    assert_unknown_tool(run.error(6), "get-sum");
}

/// When the server's tool list changes (mcp-fast-server's `unlock` adds `unlocked_tool` and
/// `forbidden_tool`, and says `notifications/tools/list_changed`), the agent hears of it on
/// its GET stream, and the list it asks for next is filtered again: the new tool a rule allows
/// is listed and callable, the one no rule allows is neither.
#[test]
fn a_changed_tool_list_is_announced_and_filtered_again() {
    let env = TestEnv::new("proxy-list-changed", PROBE);
    let peers = Peers::require();
    let servers = json!({
        "fast": stdio_server(vec![FAST_SERVER.to_string()], vec![
            list_tools_rule(),
            allow("tools", json!({"roles": [DEVELOPER], "tools": ["echo", "unlock", "unlocked_tool"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let session = front.open_session("fast", HANDSHAKE);
    let mut stream = http_request_head(
        front.addr,
        "GET",
        "/servers/fast/mcp",
        &[
            ("Accept", "text/event-stream"),
            ("Mcp-Session-Id", &session),
            ("MCP-Protocol-Version", HANDSHAKE),
        ],
    )
    .expect("open the agent's GET stream");
    assert_eq!(stream.status, 200);
    let call = |id: i64, method: &str, params: Value| {
        response_message(&front.in_session(
            "fast",
            &session,
            &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}),
        ))
    };

    let before = call(2, "tools/list", json!({}));
    assert_eq!(
        tool_names(&before["result"]),
        set(&["echo", "unlock"]),
        "{before}"
    );
    let unlocked = call(3, "tools/call", json!({"name": "unlock", "arguments": {}}));
    assert_eq!(text(&unlocked["result"]), "unlocked", "{unlocked}");
    stream
        .read_until_contains("notifications/tools/list_changed", TIMEOUT)
        .expect("the list change reaches the agent's GET stream");

    let after = call(4, "tools/list", json!({}));
    assert_eq!(
        tool_names(&after["result"]),
        set(&["echo", "unlock", "unlocked_tool"]),
        "{after}"
    );
    let allowed = call(
        5,
        "tools/call",
        json!({"name": "unlocked_tool", "arguments": {}}),
    );
    assert_eq!(text(&allowed["result"]), "unlocked_tool ran", "{allowed}");
    let hidden = call(
        6,
        "tools/call",
        json!({"name": "forbidden_tool", "arguments": {}}),
    );
    assert_unknown_tool(&hidden["error"], "forbidden_tool");
}

// ---------------------------------------------------------------------------------------------
// 4. Argument constraints
// ---------------------------------------------------------------------------------------------

/// A rule's `arguments` schema (echo's message at most 10 characters) refuses with -32010
/// naming the rule; arguments that break the tool's own `inputSchema` (learned from the
/// server) are refused with -32602 before they reach it.
#[test]
fn argument_constraints_and_input_schemas_are_enforced() {
    let env = TestEnv::new("proxy-args", PROBE);
    let peers = Peers::require();
    let servers = json!({
        "everything": stdio_server(peers.everything(), vec![
            list_tools_rule(),
            allow("short-echo", json!({
                "roles": [DEVELOPER],
                "tools": ["echo"],
                "arguments": {"type": "object", "properties": {"message": {"type": "string", "maxLength": 10}}},
            })),
            allow("sum", json!({"roles": [DEVELOPER], "tools": ["get-sum"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let run = front.client(
        "everything",
        HANDSHAKE,
        &json!([
            {"op": "call_tool", "name": "echo", "arguments": {"message": "short"}},
            {"op": "call_tool", "name": "echo", "arguments": {"message": "longer than ten characters"}},
            {"op": "call_tool", "name": "get-sum", "arguments": {"a": "one", "b": 2}},
            {"op": "call_tool", "name": "echo", "arguments": {}},
            {"op": "call_tool", "name": "get-sum", "arguments": {"a": 1, "b": 2}},
        ]),
    );
    assert_eq!(text(run.ok(0)), "Echo: short");
    let refused = run.error(1);
    assert_policy_denied(refused, "short-echo");
    assert!(
        refused["data"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("short-echo")),
        "{refused}"
    );
    // `a` must be a number (get-sum's inputSchema); the rule has no constraint on it.
    let wrong_type = run.error(2);
    assert_eq!(wrong_type["code"], -32602, "{wrong_type}");
    assert!(
        wrong_type["message"]
            .as_str()
            .is_some_and(|m| m.contains("inputSchema") && m.contains("/a")),
        "{wrong_type}"
    );
    // `message` is required by echo's inputSchema, not by the rule.
    let missing = run.error(3);
    assert_eq!(missing["code"], -32602, "{missing}");
    assert!(
        missing["message"]
            .as_str()
            .is_some_and(|m| m.contains("inputSchema") && m.contains("message")),
        "{missing}"
    );
    assert!(text(run.ok(4)).contains('3'), "get-sum: {}", run.ok(4));
}

// ---------------------------------------------------------------------------------------------
// 5. Batches
// ---------------------------------------------------------------------------------------------

/// One batch: an allowed call, a call a rule refuses, a call to a hidden tool and a
/// notification. The answer is an array of exactly three responses, each with its own
/// outcome.
#[test]
fn batch_with_mixed_verdicts_is_answered_element_by_element() {
    let env = TestEnv::new("proxy-batch", PROBE);
    let peers = Peers::require();
    let servers = json!({
        "everything": stdio_server(peers.everything(), vec![
            list_tools_rule(),
            allow("short-echo", json!({
                "roles": [DEVELOPER],
                "tools": ["echo"],
                "arguments": {"type": "object", "properties": {"message": {"type": "string", "maxLength": 10}}},
            })),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let batch = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
         "params": {"name": "echo", "arguments": {"message": "batched"}}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
         "params": {"name": "echo", "arguments": {"message": "far too long for the rule"}}},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
         "params": {"name": "get-env", "arguments": {}}},
        {"jsonrpc": "2.0", "method": "notifications/cancelled",
         "params": {"requestId": 999, "reason": "nothing to cancel"}},
    ]);
    let output = front.raw(
        "everything",
        &["--initialize", HANDSHAKE, "--body", &batch.to_string()],
    );
    assert_eq!(output["status"], 200, "{output}");
    let answer = response_message(&output);
    let answers = answer
        .as_array()
        .unwrap_or_else(|| panic!("a batch must be answered with an array: {output}"));
    assert_eq!(
        answers.len(),
        3,
        "one answer per request, none for the notification: {answer}"
    );

    let allowed = answer_for(answers, 1);
    assert_eq!(text(&allowed["result"]), "Echo: batched", "{allowed}");
    let refused = answer_for(answers, 2);
    assert!(refused.get("result").is_none(), "{refused}");
    assert_policy_denied(&refused["error"], "short-echo");
    let hidden = answer_for(answers, 3);
    assert!(hidden.get("result").is_none(), "{hidden}");
    assert_unknown_tool(&hidden["error"], "get-env");
}

// ---------------------------------------------------------------------------------------------
// 6. Policy reload
// ---------------------------------------------------------------------------------------------

/// A session sees `echo` only. The policy is rewritten to allow `get-sum` and the daemon gets
/// SIGHUP: the same session now lists and calls it, and so does a new one. A second reload
/// takes `echo` away again from the existing session. A file that is no policy is refused
/// on SIGHUP: the session keeps the policy in force, and the refusal is on record (`policy`
/// record, event `reject`, with its reason) and counted in
/// `mcp_guard_policy_reloads_total{result="refused"}`. Then the file is changed with no
/// signal: the daemon's watch reloads it, and `echo` is listed and callable again.
#[test]
fn policy_reload_changes_what_sessions_see_and_may_call() {
    let env = TestEnv::new("proxy-reload", PROBE);
    let peers = Peers::require();
    let everything = peers.everything();
    let servers_with =
        |rules: Vec<Value>| json!({"everything": stdio_server(everything.clone(), rules)});
    let echo = || allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]}));
    let sum = || allow("sum", json!({"roles": [DEVELOPER], "tools": ["get-sum"]}));
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let policy_with = |front: &Front, rules: Vec<Value>| {
        let mut document = front.env.proxy_policy(front.addr, servers_with(rules));
        document["daemon"]["metrics_listen"] = json!(metrics.to_string());
        document
    };
    let front = Front::start_with(
        env,
        peers,
        servers_with(vec![list_tools_rule(), echo()]),
        |document| document["daemon"]["metrics_listen"] = json!(metrics.to_string()),
    );
    let reloads = |result: &str| {
        metric(
            &scrape(metrics),
            "mcp_guard_policy_reloads_total",
            &[("result", result)],
        )
    };

    let session = front.open_session("everything", HANDSHAKE);
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
    let call_sum = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "get-sum", "arguments": {"a": 20, "b": 22}}});
    let call_echo = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": "still here"}}});
    let answer = |body: &Value| response_message(&front.in_session("everything", &session, body));

    assert_eq!(tool_names(&answer(&list)["result"]), set(&["echo"]));
    assert_unknown_tool(&answer(&call_sum)["error"], "get-sum");

    let reload = |rules: Vec<Value>| {
        let mark = front.daemon.log.mark();
        front.env.write_policy_document(&policy_with(&front, rules));
        front.daemon.sighup();
        front
            .daemon
            .wait_for_since(mark, TIMEOUT, "\"policy reloaded\"", |line| {
                message(line) == Some("policy reloaded")
            });
    };
    reload(vec![list_tools_rule(), echo(), sum()]);

    assert_eq!(
        tool_names(&answer(&list)["result"]),
        set(&["echo", "get-sum"])
    );
    let summed = answer(&call_sum);
    assert!(
        summed["result"]["content"][0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("42")),
        "get-sum after the reload, same session: {summed}"
    );
    let fresh = front.client(
        "everything",
        HANDSHAKE,
        &json!([
            {"op": "list_tools"},
            {"op": "call_tool", "name": "get-sum", "arguments": {"a": 1, "b": 1}},
        ]),
    );
    assert_eq!(tool_names(fresh.ok(0)), set(&["echo", "get-sum"]));
    assert!(text(fresh.ok(1)).contains('2'), "{}", fresh.ok(1));

    // Taking a tool away works on the live session too.
    reload(vec![list_tools_rule(), sum()]);
    assert_eq!(tool_names(&answer(&list)["result"]), set(&["get-sum"]));
    assert_unknown_tool(&answer(&call_echo)["error"], "echo");

    // A policy that does not load is refused: the one in force stays, and the refusal is
    // logged, recorded (`policy` record, event `reject`) and counted.
    let applied = reloads("applied");
    assert!(applied >= 2.0, "two reloads were applied: {applied}");
    let mark = front.daemon.log.mark();
    replace_file(&front.env.policy_path, b"{ not a policy");
    front.daemon.sighup();
    front
        .daemon
        .wait_for_since(mark, TIMEOUT, "\"policy reload refused\"", |line| {
            message(line).is_some_and(|m| m.starts_with("policy reload refused"))
        });
    assert_eq!(tool_names(&answer(&list)["result"]), set(&["get-sum"]));
    assert_eq!(
        text(&answer(&call_sum)["result"]),
        "The sum of 20 and 22 is 42.",
        "get-sum after the refused reload"
    );
    assert_unknown_tool(&answer(&call_echo)["error"], "echo");
    let rejections = || -> Vec<Value> {
        audit_records(&front.env.audit_path())
            .into_iter()
            .filter(|r| r["kind"] == "policy" && r["detail"]["event"] == "reject")
            .collect()
    };
    // The SIGHUP and the daemon's own watch of the file may each have reloaded it once.
    assert!(
        poll_until(TIMEOUT, || {
            let recorded = rejections().len();
            recorded >= 1 && reloads("refused") == recorded as f64
        }),
        "refused reloads: {} counted, on record: {:#?}",
        reloads("refused"),
        rejections()
    );
    for rejection in rejections() {
        assert_eq!(
            rejection["detail"]["path"],
            json!(front.env.policy_path),
            "{rejection}"
        );
        assert!(
            rejection["reason"]
                .as_str()
                .is_some_and(|reason| !reason.is_empty()),
            "a rejection without its reason: {rejection}"
        );
    }
    assert_eq!(
        reloads("applied"),
        applied,
        "a refused reload counted as applied"
    );
    assert!(
        front.daemon.log.lines()[mark..]
            .iter()
            .all(|line| message(line) != Some("policy reloaded")),
        "the broken policy was applied"
    );

    // A changed file is reloaded without a signal: echo, allowed again, is listed and
    // callable in the live session.
    let mark = front.daemon.log.mark();
    front
        .env
        .write_policy_document(&policy_with(&front, vec![list_tools_rule(), echo(), sum()]));
    let reloaded = |line: &Value| message(line) == Some("policy reloaded");
    front
        .daemon
        .wait_for_since(mark, TIMEOUT, "\"policy reloaded\"", reloaded);
    let lines = front.daemon.log.lines();
    let changed = lines[mark..]
        .iter()
        .position(|line| message(line) == Some("policy file changed"));
    let applied_at = lines[mark..].iter().position(reloaded);
    assert!(
        matches!((changed, applied_at), (Some(c), Some(a)) if c < a),
        "the reload was not the file watch's: {:#?}",
        &lines[mark..]
    );
    assert_eq!(
        tool_names(&answer(&list)["result"]),
        set(&["echo", "get-sum"])
    );
    assert_eq!(text(&answer(&call_echo)["result"]), "Echo: still here");
    assert_eq!(reloads("applied"), applied + 1.0);
    let last_policy_record = audit_records(&front.env.audit_path())
        .into_iter()
        .rfind(|r| r["kind"] == "policy")
        .unwrap();
    assert_eq!(
        last_policy_record["detail"]["event"], "load",
        "{last_policy_record}"
    );
}

/// Reloads while agents call. Three sessions call mcp-fast-server's `echo`, `add` and `unlock`
/// in turn, each on connections of its own, while the policy is rewritten and reloaded
/// (SIGHUP) eight times, alternating between one that allows only `echo` (rule `echo-only`)
/// and one that allows only `add` (rule `add-only`). Every call is answered 200 with a result
/// or a JSON-RPC error; `unlock`, which neither policy allows, is never answered with a
/// result and all its decisions are denials; every allow names the rule of its own tool;
/// each tool was both allowed and refused during the run (the reloads took effect under
/// load); every allowed call has its outcome record; the daemon logs no panic, and
/// `audit verify` passes.
#[test]
fn reloads_under_load_decide_every_call_by_one_policy_or_the_other() {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const RELOADS: usize = 8;
    // Answers each policy gets to decide before the next reload: at most three of them (one
    // per agent) were decided by the policy before; of the other nine, some agent's three in a
    // row were, which call each tool once.
    const ANSWERS_PER_POLICY: usize = 12;
    let servers = |tool: &str| {
        let only = allow(
            &format!("{tool}-only"),
            json!({"roles": [DEVELOPER], "tools": [tool]}),
        );
        let command = vec![FAST_SERVER.to_string()];
        json!({"fast": stdio_server(command, vec![list_tools_rule(), only])})
    };
    let env = TestEnv::new("proxy-reload-load", PROBE);
    let front = Front::start(env, Peers::require(), servers("echo"));
    let calls = [
        ("echo", json!({"text": "hi"})),
        ("add", json!({"a": 1, "b": 2})),
        ("unlock", json!({})),
    ];
    let stop = AtomicBool::new(false);
    let answered = AtomicUsize::new(0);
    let after_more_answers = || {
        let from = answered.load(Ordering::SeqCst);
        assert!(
            poll_until(TIMEOUT, || answered.load(Ordering::SeqCst)
                >= from + ANSWERS_PER_POLICY),
            "the agents stopped getting answers ({} since the last reload)",
            answered.load(Ordering::SeqCst) - from
        );
    };
    // Per tool: answers with a result, answers with an error.
    let agent = || {
        let session = front.open_session("fast", HANDSHAKE);
        let mut tally = BTreeMap::<(&str, bool), usize>::new();
        let mut id = 1;
        while !stop.load(Ordering::SeqCst) {
            for (tool, arguments) in &calls {
                id += 1;
                let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                                  "params": {"name": tool, "arguments": arguments}});
                let answer = front
                    .post_in_session("fast", &session, &body)
                    .unwrap_or_else(|e| panic!("{tool}: no answer: {e}"));
                assert_eq!(answer.status, 200, "{tool}: {answer:?}");
                let messages = answer_messages(&answer).unwrap_or_else(|e| panic!("{tool}: {e}"));
                let [message] = messages.as_slice() else {
                    panic!("{tool}: not one message: {answer:?}");
                };
                assert_eq!(message["id"], id, "{message}");
                let succeeded = message["result"].is_object();
                assert!(
                    succeeded || message["error"]["code"].is_i64(),
                    "{tool}: {message}"
                );
                *tally.entry((tool, succeeded)).or_default() += 1;
                answered.fetch_add(1, Ordering::SeqCst);
            }
        }
        tally
    };
    // Stops the agents however the reloads end: a failure here must not leave them calling,
    // and the scope waiting for them, for ever.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let tallies = std::thread::scope(|scope| {
        let agents: Vec<_> = (0..3).map(|_| scope.spawn(agent)).collect();
        let stopping = StopOnDrop(&stop);
        for reload in 0..RELOADS {
            after_more_answers();
            let tool = if reload % 2 == 0 { "add" } else { "echo" };
            let mark = front.daemon.log.mark();
            let document = front.env.proxy_policy(front.addr, servers(tool));
            front.env.write_policy_document(&document);
            front.daemon.sighup();
            front
                .daemon
                .wait_for_since(mark, TIMEOUT, "\"policy reloaded\"", |line| {
                    message(line) == Some("policy reloaded")
                });
        }
        after_more_answers();
        drop(stopping);
        agents
            .into_iter()
            .map(|agent| agent.join().expect("an agent"))
            .collect::<Vec<_>>()
    });
    let mut total = BTreeMap::<(&str, bool), usize>::new();
    for tally in &tallies {
        for (key, count) in tally {
            *total.entry(*key).or_default() += count;
        }
    }
    eprintln!("answers per (tool, succeeded): {total:?}");
    assert_eq!(total.get(&("unlock", true)), None, "unlock ran: {total:?}");
    for tool in ["echo", "add"] {
        for succeeded in [true, false] {
            assert!(
                total.get(&(tool, succeeded)).is_some_and(|&n| n > 0),
                "{tool} was never {}: {total:?}",
                if succeeded { "allowed" } else { "refused" }
            );
        }
    }

    let records = audit_records(&front.env.audit_path());
    let decided = |tool: &str, decision: &str| {
        records
            .iter()
            .filter(|r| r["kind"] == "call" && r["tool"] == tool && r["decision"] == decision)
            .collect::<Vec<_>>()
    };
    assert!(decided("unlock", "allow").is_empty(), "unlock was allowed");
    for tool in ["echo", "add"] {
        let allowed = decided(tool, "allow");
        let rule = format!("{tool}-only");
        assert!(
            allowed.iter().all(|r| r["rule"] == rule.as_str()),
            "{tool} allowed by another rule than {rule}"
        );
        assert_eq!(allowed.len(), total[&(tool, true)], "{tool}: allow records");
        let outcomes = records
            .iter()
            .filter(|r| {
                r["kind"] == "call" && r["tool"] == tool && r["outcome"]["kind"] == "result"
            })
            .count();
        assert_eq!(outcomes, allowed.len(), "{tool}: outcome records");
    }
    front.daemon.assert_no_panic();
    let verify = mcp_guard(&["audit", "verify", path_str(&front.env.audit_path())]);
    assert!(verify.status.success(), "{}", verify.report());
}

// ---------------------------------------------------------------------------------------------
// 7. Bad input
// ---------------------------------------------------------------------------------------------

/// Every kind of bad input gets its HTTP status and JSON-RPC error, nothing of it reaches a
/// server, and afterwards a session opened before all of it still works, as does a new one.
#[test]
fn bad_input_is_refused_and_the_daemon_keeps_serving() {
    let env = TestEnv::new("proxy-bad-input", PROBE);
    let peers = Peers::require();
    let servers = json!({
        "everything": stdio_server(peers.everything(), vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        ]),
    });
    let front = Front::start_with(env, peers, servers, |policy| {
        policy["daemon"]["max_message_bytes"] = json!(2048);
        policy["daemon"]["max_json_depth"] = json!(8);
        policy["daemon"]["max_batch_size"] = json!(3);
    });
    let session = front.open_session("everything", HANDSHAKE);
    let version = format!("MCP-Protocol-Version: {HANDSHAKE}");
    let in_session = ["--session", session.as_str(), "--header", version.as_str()];
    let list = |id: i64| json!({"jsonrpc": "2.0", "id": id, "method": "tools/list"}).to_string();
    let echo = |message: &str| {
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
               "params": {"name": "echo", "arguments": {"message": message}}})
        .to_string()
    };
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"echo","arguments":{{"message":"x","deep":{}1{}}}}}}}"#,
        "[".repeat(10),
        "]".repeat(10)
    );
    let oversized = echo(&"x".repeat(4096));
    let invalid_utf8 = {
        let mut bytes = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"message":""#.to_vec();
        bytes.extend_from_slice(&[0xff, 0xfe, 0xfd]);
        bytes.extend_from_slice(br#""}}}"#);
        base64(&bytes)
    };
    let over_batch = format!("[{},{},{},{}]", list(1), list(2), list(3), list(4));
    let stateless_call = echo("stateless");

    struct Case<'a> {
        what: &'a str,
        args: Vec<String>,
        status: u64,
        /// The JSON-RPC error code in the body, where the answer has one.
        code: Option<i64>,
    }
    let with_session = |args: &[&str]| -> Vec<String> {
        in_session
            .iter()
            .chain(args)
            .map(|a| a.to_string())
            .collect()
    };
    let strings = |args: &[&str]| -> Vec<String> { args.iter().map(|a| a.to_string()).collect() };
    let cases = vec![
        Case {
            what: "invalid JSON",
            args: with_session(&["--raw-body", r#"{"jsonrpc": "2.0", "id": 1, "method": "#]),
            status: 400,
            code: Some(-32700),
        },
        Case {
            what: "jsonrpc 1.0",
            args: with_session(&[
                "--raw-body",
                r#"{"jsonrpc":"1.0","id":1,"method":"tools/list"}"#,
            ]),
            status: 400,
            code: Some(-32600),
        },
        Case {
            what: "id null",
            args: with_session(&[
                "--raw-body",
                r#"{"jsonrpc":"2.0","id":null,"method":"tools/list"}"#,
            ]),
            status: 400,
            code: Some(-32600),
        },
        Case {
            what: "a request without an id",
            args: with_session(&["--raw-body", r#"{"jsonrpc":"2.0","method":"tools/list"}"#]),
            status: 400,
            code: Some(-32600),
        },
        Case {
            what: "an empty batch",
            args: with_session(&["--raw-body", "[]"]),
            status: 400,
            code: Some(-32600),
        },
        Case {
            what: "a body over max_message_bytes",
            args: with_session(&["--raw-body", &oversized]),
            status: 413,
            code: Some(-32600),
        },
        Case {
            what: "nesting past max_json_depth",
            args: with_session(&["--raw-body", &deep]),
            status: 400,
            code: Some(-32600),
        },
        Case {
            what: "invalid UTF-8",
            args: with_session(&["--body-base64", &invalid_utf8]),
            status: 400,
            code: Some(-32700),
        },
        Case {
            what: "a batch over max_batch_size",
            args: with_session(&["--raw-body", &over_batch]),
            status: 400,
            code: Some(-32600),
        },
        Case {
            what: "an unknown session",
            args: strings(&[
                "--session",
                "0123456789abcdef0123456789abcdef",
                "--header",
                &version,
                "--raw-body",
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            ]),
            status: 404,
            code: None,
        },
        Case {
            what: "no Mcp-Session-Id on a request that is not initialize",
            args: strings(&[
                "--raw-body",
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            ]),
            status: 400,
            code: None,
        },
        Case {
            what: "Accept: text/html",
            args: with_session(&[
                "--header",
                "Accept: text/html",
                "--raw-body",
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            ]),
            status: 406,
            code: None,
        },
        Case {
            what: "GET without text/event-stream in Accept",
            args: with_session(&["--method", "GET", "--header", "Accept: application/json"]),
            status: 406,
            code: Some(-32600),
        },
        Case {
            what: "an unsupported MCP-Protocol-Version",
            args: strings(&[
                "--session",
                &session,
                "--header",
                "MCP-Protocol-Version: 1999-01-01",
                "--raw-body",
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            ]),
            status: 400,
            code: Some(-32600),
        },
        Case {
            what: "Content-Type: text/plain",
            args: with_session(&[
                "--header",
                "Content-Type: text/plain",
                "--raw-body",
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            ]),
            status: 415,
            code: None,
        },
        Case {
            what: "2026-07-28 with Mcp-Method not matching the body",
            args: strings(&[
                "--envelope",
                STATELESS,
                "--header",
                "Mcp-Method: tools/list",
                "--body",
                &stateless_call,
            ]),
            status: 400,
            code: None,
        },
        Case {
            what: "2026-07-28 with Mcp-Name not matching the body",
            args: strings(&[
                "--envelope",
                STATELESS,
                "--header",
                "Mcp-Name: get-env",
                "--body",
                &stateless_call,
            ]),
            status: 400,
            code: None,
        },
        Case {
            what: "a 2026-07-28 batch",
            args: strings(&[
                "--header",
                "MCP-Protocol-Version: 2026-07-28",
                "--header",
                "Mcp-Method: tools/list",
                "--body",
                &format!("[{},{}]", list(1), list(2)),
            ]),
            status: 400,
            code: Some(-32600),
        },
        Case {
            what: "2026-07-28 with a protocol version in _meta other than the header's",
            args: strings(&[
                "--header",
                "MCP-Protocol-Version: 2026-07-28",
                "--header",
                "Mcp-Method: tools/list",
                "--body",
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2099-01-01"}}}"#,
            ]),
            status: 400,
            code: Some(-32600),
        },
        Case {
            what: "2026-07-28 without Mcp-Method",
            args: strings(&[
                "--header",
                "MCP-Protocol-Version: 2026-07-28",
                "--body",
                &stateless_call,
            ]),
            status: 400,
            code: None,
        },
    ];
    let mut wrong = Vec::new();
    for case in &cases {
        let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
        let output = front.raw("everything", &args);
        let body = &output["body"];
        let code_ok = case
            .code
            .is_none_or(|code| body["error"]["code"] == code && body["jsonrpc"] == "2.0");
        if output["status"] != case.status || !code_ok {
            wrong.push(format!(
                "  {}: expected HTTP {} {:?}, got {} {}",
                case.what, case.status, case.code, output["status"], body
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "bad input answered wrongly:\n{}",
        wrong.join("\n")
    );

    // Methods other than GET, POST and DELETE: 405, saying which are allowed.
    for method in ["PUT", "PATCH"] {
        let mut args = in_session.to_vec();
        args.extend([
            "--method",
            method,
            "--raw-body",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        ]);
        let output = front.raw("everything", &args);
        assert_eq!(output["status"], 405, "{method}: {output}");
        assert_eq!(
            output["headers"]["allow"], "GET, POST, DELETE",
            "{method}: {output}"
        );
    }

    // Duplicate ids in a batch: the duplicate gets its own error, the rest is answered.
    let duplicate = format!("[{},{}]", list(5), list(5));
    let mut args = in_session.to_vec();
    args.extend(["--raw-body", &duplicate]);
    let output = front.raw("everything", &args);
    assert_eq!(output["status"], 200, "{output}");
    let answers = response_message(&output);
    let answers = answers.as_array().unwrap_or_else(|| panic!("{output}"));
    assert_eq!(answers.len(), 2, "{output}");
    assert_eq!(
        answers
            .iter()
            .filter(|a| a["error"]["code"] == -32600)
            .count(),
        1,
        "the duplicate id must be refused: {output}"
    );
    assert_eq!(
        answers
            .iter()
            .filter(|a| a["result"]["tools"].is_array())
            .count(),
        1,
        "the first of the two must be answered: {output}"
    );

    // A server nobody configured.
    let output = raw_http(
        &front.peers,
        &format!("http://{}/servers/nope/mcp", front.addr),
        &["--initialize", HANDSHAKE, "--raw-body", &list(1)],
    );
    assert_eq!(output["initialize"]["status"], 404, "{output}");

    // Nothing of the refused stateless traffic started a server.
    let sessions: Vec<String> = std::fs::read_dir(front.env.cgroup_root.join("everything"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        sessions,
        vec![session.clone()],
        "refused requests must not start server sessions"
    );

    // Still serving: the old session and a new one.
    let output = front.in_session(
        "everything",
        &session,
        &serde_json::from_str(&echo("still serving")).unwrap(),
    );
    assert_eq!(output["status"], 200, "{output}");
    assert_eq!(
        text(&response_message(&output)["result"]),
        "Echo: still serving",
        "{output}"
    );
    let fresh = front.client(
        "everything",
        HANDSHAKE,
        &json!([{"op": "call_tool", "name": "echo", "arguments": {"message": "new session"}}]),
    );
    assert_eq!(text(fresh.ok(0)), "Echo: new session");
    assert!(!process_gone(front.daemon.pid()), "the daemon exited");
}

/// Standard base64 (the raw client takes invalid UTF-8 bodies that way).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The JSON-RPC messages of an HTTP answer's body: JSON (one message or a batch) or SSE
/// (`data:` lines). `Err` when the body is neither.
fn answer_messages(answer: &HttpAnswer) -> Result<Vec<Value>, String> {
    let json_body = |text: &str| -> Result<Vec<Value>, String> {
        match serde_json::from_str(text) {
            Ok(Value::Array(items)) => Ok(items),
            Ok(message) => Ok(vec![message]),
            Err(e) => Err(format!("not JSON ({e}): {text:?}")),
        }
    };
    match answer.header("content-type") {
        Some(kind) if kind.starts_with("text/event-stream") => {
            let mut messages = Vec::new();
            for line in answer.body.lines().filter_map(|l| l.strip_prefix("data:")) {
                if !line.trim().is_empty() {
                    messages.extend(json_body(line.trim())?);
                }
            }
            Ok(messages)
        }
        _ if answer.body.is_empty() => Ok(Vec::new()),
        _ => json_body(&answer.body),
    }
}

/// Seeded mutations of valid messages (see `Mutator`: other types, extremes, deep nesting,
/// missing and extra members, other methods and ids, batches, flipped and cut bytes, invalid
/// UTF-8), 1,200 of them, half in a session at 2025-11-25 and half as stateless 2026-07-28
/// requests whose `Mcp-Method`/`Mcp-Name` headers describe the message before it was mutated.
/// Each gets an HTTP status an agent can act on (never a 5xx, never a dropped connection) and,
/// where it has a body, only well-formed JSON-RPC messages. Afterwards the daemon still runs,
/// logged no panic, still serves a read the same as before, the files are exactly as they were
/// (no write or edit, all of which the policy denies or hides, reached the server), and the
/// audit log verifies. `MCP_GUARD_MUTATION_SEED` replays another sequence.
#[test]
fn mutated_messages_get_clear_answers_and_never_reach_a_denied_tool() {
    const MESSAGES: usize = 1200;
    let env = TestEnv::new("proxy-mutations", PROBE);
    let peers = Peers::require();
    let root = env.files_dir(Some("hello from the test\n"));
    let servers = json!({"files": read_only_files_server(&peers, &root)});
    let front = Front::start_with(env, peers, servers, |policy| {
        policy["daemon"]["max_message_bytes"] = json!(16384);
        policy["daemon"]["max_json_depth"] = json!(32);
        policy["daemon"]["max_batch_size"] = json!(4);
    });
    let files_before = tree_of(&root);
    let corpus = filesystem_corpus(&root);
    let (mut mutator, seed) = Mutator::from_env_or(0x6d63_702d_6775_6172);
    let path = Front::path("files");
    let mut session = front.open_session("files", HANDSHAKE);
    // Per mode: in a session, stateless.
    let mut statuses = [(); 2].map(|_| std::collections::BTreeMap::<u16, usize>::new());
    let mut sessions_reopened = 0;
    for n in 0..MESSAGES {
        let original = mutator.pick(&corpus).clone();
        let body = mutator.mutate(std::slice::from_ref(&original));
        let stateless = n % 2 == 1;
        let method = original["method"].as_str().unwrap_or("").to_owned();
        let name = original["params"]["name"].as_str().unwrap_or("").to_owned();
        let mut headers = vec![
            ("Content-Type", "application/json"),
            ("Accept", "application/json, text/event-stream"),
        ];
        if stateless {
            headers.push(("MCP-Protocol-Version", STATELESS));
            headers.push(("Mcp-Method", &method));
            if !name.is_empty() {
                headers.push(("Mcp-Name", &name));
            }
        } else {
            headers.push(("MCP-Protocol-Version", HANDSHAKE));
            headers.push(("Mcp-Session-Id", &session));
        }
        let what = || {
            format!(
                "message {n} of seed {seed} ({}): {:?}",
                if stateless {
                    "stateless"
                } else {
                    "in a session"
                },
                String::from_utf8_lossy(&body)
            )
        };
        let answer = http_exchange_bytes(front.addr, "POST", &path, &headers, &body)
            .unwrap_or_else(|e| panic!("no whole answer to {}: {e}", what()));

        *statuses[usize::from(stateless)]
            .entry(answer.status)
            .or_default() += 1;
        assert!(
            [200, 202, 400, 404, 413].contains(&answer.status),
            "status {} for {}: {answer:?}",
            answer.status,
            what()
        );
        let messages = answer_messages(&answer).unwrap_or_else(|e| panic!("{e}, for {}", what()));
        for message in &messages {
            if let Err(e) = check_jsonrpc_message(message) {
                panic!("{e}, for {}", what());
            }
        }
        match answer.status {
            202 => assert!(messages.is_empty(), "a 202 with a body for {}", what()),
            400 | 413 => assert!(
                messages.iter().all(|m| m["error"]["code"].is_i64()),
                "a {} that is no JSON-RPC error for {}: {answer:?}",
                answer.status,
                what()
            ),
            404 if !stateless => {
                // The session's server may have ended on what it was sent; the next messages
                // go to a new session.
                sessions_reopened += 1;
                session = front.open_session("files", HANDSHAKE);
            }
            _ => {}
        }
    }
    eprintln!(
        "seed {seed}: {MESSAGES} mutated messages, statuses in a session {:?}, stateless {:?}, \
         sessions reopened {sessions_reopened}",
        statuses[0], statuses[1]
    );
    for (mode, statuses) in ["in a session", "stateless"].iter().zip(&statuses) {
        for status in [200, 202, 400] {
            assert!(
                statuses.get(&status).is_some_and(|&count| count > 0),
                "no {status} among the answers {mode} (seed {seed}): {statuses:?}; the \
                 mutations did not reach every path"
            );
        }
    }

    assert!(!process_gone(front.daemon.pid()), "the daemon exited");
    front.daemon.assert_no_panic();
    assert_eq!(
        tree_of(&root),
        files_before,
        "a mutated message changed the files (seed {seed})"
    );
    let read = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "read_text_file", "arguments": {"path": root.join("readme.txt")}}});
    let fresh = front.open_session("files", HANDSHAKE);
    let output = front.in_session("files", &fresh, &read);
    assert_eq!(
        text(&response_message(&output)["result"]),
        "hello from the test\n",
        "{output}"
    );
    let verify = mcp_guard(&["audit", "verify", path_str(&front.env.audit_path())]);
    assert!(verify.status.success(), "{}", verify.report());
}

/// The other direction: a server that answers half of all requests with a mutation of its
/// answer (mcp-fast-server `--mutate-answers SEED`: other types and sizes anywhere, other ids,
/// answers turned into requests and notifications, batches, cut and flipped bytes). An agent
/// allowed to see only `echo`, `note://items/1` and no prompt sends 90 valid requests
/// (lists, an echo, a read, a ping). Every answer is a clear status with only well-formed
/// JSON-RPC in its body, and nothing hidden gets through a list however the server shaped
/// it: every tool listed is `echo`, every resource `note://items/1`, and no prompt is listed.
/// An answer that is invalid JSON-RPC, or no JSON, but names its request fails that request
/// at once (`-32011`) instead of at the request timeout. The daemon logs no panic and the
/// audit log verifies.
#[test]
fn a_server_sending_mutated_answers_gets_nothing_hidden_past_the_filter() {
    const REQUESTS: usize = 90;
    let env = TestEnv::new("proxy-mutated-server", PROBE);
    let peers = Peers::require();
    let seed = std::env::var("MCP_GUARD_MUTATION_SEED").unwrap_or_else(|_| "4242".into());
    let server = mutating_fast_server(FAST_SERVER, &seed);
    let front = Front::start(env, peers, json!({ "fast": server }));
    let mut session = front.open_session("fast", HANDSHAKE);
    let requests = mutated_server_requests();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut tally = MutatedServerTally::default();
    for n in 0..REQUESTS {
        let (method, params) = &requests[n % requests.len()];
        let body = json!({"jsonrpc": "2.0", "id": n, "method": method, "params": params});
        let what = format!("request {n} ({method}), server seed {seed}");
        let answer = front
            .post_in_session("fast", &session, &body)
            .unwrap_or_else(|e| panic!("no whole answer to {what}: {e}"));
        *statuses.entry(answer.status).or_default() += 1;
        assert!(
            [200, 404].contains(&answer.status),
            "status {} for {what}: {answer:?}",
            answer.status
        );
        let messages = answer_messages(&answer).unwrap_or_else(|e| panic!("{e}, for {what}"));
        for message in &messages {
            if let Err(e) = check_jsonrpc_message(message) {
                panic!("{e}, for {what}");
            }
            if message["id"] == json!(n) {
                tally.check(method, message, &what);
            }
        }
        if answer.status == 404 {
            // The session ended (a server line mcp-guard cannot take ends it); a new one.
            session = front.open_session("fast", HANDSHAKE);
        }
    }
    eprintln!("server seed {seed}: {REQUESTS} requests, statuses {statuses:?}, {tally:?}");
    tally.assert_both_seen(&seed);
    front.daemon.assert_no_panic();
    let verify = mcp_guard(&["audit", "verify", path_str(&front.env.audit_path())]);
    assert!(verify.status.success(), "{}", verify.report());
}

/// A client that opens a connection and never finishes a request's head (slowloris) is
/// disconnected after `daemon.header_read_timeout_seconds`, as is one that sends nothing, and
/// the front serves other agents meanwhile; so is a silent connection to the metrics endpoint.
/// A GET stream, a request whose answer goes on, keeps its connection past that time.
#[test]
fn connections_that_never_finish_a_request_head_are_closed() {
    let env = TestEnv::new("proxy-header-timeout", PROBE);
    let peers = Peers::require();
    let servers = json!({
        "fast": stdio_server(vec![FAST_SERVER.to_string()], vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        ]),
    });
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let front = Front::start_with(env, peers, servers, |document| {
        document["daemon"]["header_read_timeout_seconds"] = json!(1);
        document["daemon"]["metrics_listen"] = json!(metrics.to_string());
    });
    let connect_to = |addr| {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        // Far past the timeout: a read that ends by this is a connection left open.
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream
    };
    let connect = || connect_to(front.addr);
    let mut dribbling = connect();
    dribbling
        .write_all(b"POST /servers/fast/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    let mut silent = connect();
    let mut silent_on_metrics = connect_to(metrics);
    let session = front.session_listing("fast", &["echo"]);
    let args = ["--method", "GET", "--session", &session, "--timeout", "3"];
    let stream = front.raw("fast", &args);
    assert_eq!(stream["status"], 200, "{stream}");
    assert_eq!(
        stream["timed_out"], true,
        "the GET stream was closed within 3 s: {stream}"
    );
    let connections = [
        ("dribbling", &mut dribbling),
        ("silent", &mut silent),
        ("metrics endpoint's silent", &mut silent_on_metrics),
    ];
    for (what, stream) in connections {
        let mut answer = Vec::new();
        let read = std::io::Read::read_to_end(stream, &mut answer);
        assert!(
            read.is_ok(),
            "the {what} connection was left open: {read:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Protocol revisions
// ---------------------------------------------------------------------------------------------

/// Each peer completes the initialize handshake through mcp-guard at each handshake revision
/// it accepts directly (all three accept 2025-06-18 and 2025-11-25), agreeing on the same
/// revision, and serves a filtered tools/list in that session. mcp-server-time also speaks
/// 2026-07-28, and the SDK client reaches it statelessly through mcp-guard.
#[test]
fn every_revision_the_peers_speak_passes_through() {
    let env = TestEnv::new("proxy-revisions", PROBE);
    let peers = Peers::require();
    let root = env.files_dir(None);
    let servers = json!({
        "everything": stdio_server(peers.everything(), vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        ]),
        "files": stdio_server(peers.filesystem(&root), vec![
            list_tools_rule(),
            allow("list", json!({"roles": [DEVELOPER], "tools": ["list_directory"]})),
        ]),
        "time": stdio_server(peers.time(), current_time_rules()),
    });
    let front = Front::start(env, peers, servers);
    let direct_commands = [
        ("everything", front.peers.everything(), "echo"),
        ("files", front.peers.filesystem(&root), "list_directory"),
        ("time", front.peers.time(), "get_current_time"),
    ];
    let script = json!([{"op": "list_tools"}]);
    for (server, command, visible) in &direct_commands {
        for version in ["2025-06-18", HANDSHAKE] {
            let direct = mcp_client(&front.peers, Transport::Stdio(command), version, &script);
            assert_eq!(
                direct.initialize["protocol_version"], version,
                "{server} does not speak {version} directly; update this test and PEERS.md"
            );
            let guarded = front.client(server, version, &script);
            assert_eq!(
                guarded.initialize["protocol_version"], version,
                "{server} at {version} through mcp-guard: {}",
                guarded.initialize
            );
            assert_eq!(guarded.initialize["era"], "handshake");
            assert_eq!(
                tool_names(guarded.ok(0)),
                set(&[visible]),
                "{server} at {version}"
            );
        }
    }

    let time = front.client(
        "time",
        STATELESS,
        &json!([
            {"op": "list_tools"},
            {"op": "call_tool", "name": "get_current_time", "arguments": {"timezone": "Asia/Tokyo"}},
        ]),
    );
    assert_eq!(time.initialize["protocol_version"], STATELESS);
    assert_eq!(time.initialize["era"], "modern");
    assert_eq!(tool_names(time.ok(0)), set(&["get_current_time"]));
    assert_eq!(time.ok(1)["structuredContent"]["timezone"], "Asia/Tokyo");
}

/// Hand-made 2026-07-28 requests (no initialize, `_meta` envelope, routing headers) get valid
/// answers through mcp-guard from the two peers that speak the revision: mcp-server-time and
/// mcp-fast-server. server/discover passes, tools/list is filtered, an allowed call is
/// answered, a hidden tool is unknown, and the revision may come from `_meta` alone.
#[test]
fn stateless_2026_07_28_requests_are_answered() {
    let env = TestEnv::new("proxy-stateless", PROBE);
    let peers = Peers::require();
    let servers = json!({
        "time": stdio_server(peers.time(), current_time_rules()),
        "fast": stdio_server(vec![FAST_SERVER.to_string()], vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo", "add"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let request = |id: i64, method: &str, params: Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
    };
    let stateless = |server: &str, body: &str| {
        let output = front.raw(server, &["--envelope", STATELESS, "--body", body]);
        assert_eq!(output["status"], 200, "{server}: {output}");
        assert!(
            output["headers"].get("mcp-session-id").is_none(),
            "a stateless answer carries no session: {output}"
        );
        response_message(&output)
    };

    for (server, visible, call) in [
        (
            "time",
            set(&["get_current_time"]),
            json!({"name": "get_current_time", "arguments": {"timezone": "Asia/Tokyo"}}),
        ),
        (
            "fast",
            set(&["add", "echo"]),
            json!({"name": "echo", "arguments": {"text": "stateless"}}),
        ),
    ] {
        let discover = stateless(server, &request(1, "server/discover", json!({})));
        let versions = &discover["result"]["supportedVersions"];
        assert!(
            versions
                .as_array()
                .is_some_and(|v| v.contains(&json!(STATELESS))),
            "{server} server/discover: {discover}"
        );
        let list = stateless(server, &request(2, "tools/list", json!({})));
        assert_eq!(tool_names(&list["result"]), visible, "{server}: {list}");
        let called = stateless(server, &request(3, "tools/call", call));
        assert!(called.get("error").is_none(), "{server}: {called}");
        assert_ne!(called["result"]["isError"], true, "{server}: {called}");
        let hidden = stateless(
            server,
            &request(
                4,
                "tools/call",
                json!({"name": "write_note", "arguments": {"text": "x"}}),
            ),
        );
        assert_unknown_tool(&hidden["error"], "write_note");
    }
    // The revision in `_meta` alone (no MCP-Protocol-Version header) is enough.
    let meta_only = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": STATELESS,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "proxy-test", "version": "0"},
    }}});
    let output = front.raw(
        "fast",
        &[
            "--header",
            "Mcp-Method: tools/list",
            "--body",
            &meta_only.to_string(),
        ],
    );
    assert_eq!(output["status"], 200, "{output}");
    assert_eq!(
        tool_names(&response_message(&output)["result"]),
        set(&["add", "echo"]),
        "{output}"
    );
}

/// A stateless (2026-07-28) agent and server-everything, which only speaks the initialize-based
/// revisions: mcp-guard initialises the server on the agent's behalf, answers `server/discover`
/// from that, and the agent's list and calls work — filtered and enforced as usual.
#[test]
fn stateless_agents_reach_servers_that_predate_them() {
    let env = TestEnv::new("proxy-bridge", PROBE);
    let peers = Peers::require();
    let servers = json!({
        "everything": stdio_server(peers.everything(), vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let request = |id: i64, method: &str, params: Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
    };
    let stateless = |body: &str| {
        let output = front.raw("everything", &["--envelope", STATELESS, "--body", body]);
        assert_eq!(output["status"], 200, "{output}");
        response_message(&output)
    };
    let discover = stateless(&request(1, "server/discover", json!({})));
    assert_eq!(
        discover["result"]["supportedVersions"],
        json!([STATELESS]),
        "{discover}"
    );
    assert_eq!(
        discover["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
        "mcp-servers/everything",
        "{discover}"
    );
    let list = stateless(&request(2, "tools/list", json!({})));
    assert_eq!(tool_names(&list["result"]), set(&["echo"]), "{list}");
    assert_eq!(list["result"]["resultType"], "complete", "{list}");
    let called = stateless(&request(
        3,
        "tools/call",
        json!({"name": "echo", "arguments": {"message": "bridged"}}),
    ));
    assert_eq!(
        called["result"]["content"][0]["text"], "Echo: bridged",
        "{called}"
    );
    let hidden = stateless(&request(
        4,
        "tools/call",
        json!({"name": "get-env", "arguments": {}}),
    ));
    assert_unknown_tool(&hidden["error"], "get-env");

    // The official Python SDK client left to choose its revision (it probes for 2026-07-28
    // first, as an agent nobody here configured would) gets the same through the bridge.
    let sdk = front.client(
        "everything",
        "auto",
        &json!([
            {"op": "list_tools"},
            {"op": "call_tool", "name": "echo", "arguments": {"message": "from the SDK"}},
            {"op": "call_tool", "name": "get-env", "arguments": {}},
        ]),
    );
    assert_eq!(sdk.initialize["era"], "modern", "{}", sdk.initialize);
    assert_eq!(sdk.initialize["protocol_version"], STATELESS);
    assert_eq!(tool_names(sdk.ok(0)), set(&["echo"]));
    assert_eq!(sdk.ok(1)["content"][0]["text"], "Echo: from the SDK");
    assert_unknown_tool(sdk.error(2), "get-env");
}

// ---------------------------------------------------------------------------------------------
// 9. Session lifecycle over HTTP
// ---------------------------------------------------------------------------------------------

fn everything_front(tag: &str, extra_rules: Vec<Value>) -> Front {
    let env = TestEnv::new(tag, PROBE);
    let peers = Peers::require();
    let mut rules = vec![
        list_tools_rule(),
        allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
    ];
    rules.extend(extra_rules);
    let servers = json!({"everything": stdio_server(peers.everything(), rules)});
    Front::start(env, peers, servers)
}

/// GET without a session is refused (405, README's status table); GET with one opens the SSE
/// stream. DELETE ends
/// the session: its server process goes away, its cgroup is removed, and the session id is
/// unknown (404) afterwards.
#[test]
fn delete_ends_the_session_and_its_server_process() {
    let front = everything_front("proxy-delete", vec![]);
    let path = Front::path("everything");
    let session = front.open_session("everything", HANDSHAKE);
    let pid = front.session_pid("everything", &session);
    assert!(
        process_cmdline(pid).contains("server-everything"),
        "the session's process is not server-everything: {}",
        process_cmdline(pid)
    );

    let no_session =
        http_request_head(front.addr, "GET", &path, &[("Accept", "text/event-stream")])
            .expect("GET without a session");
    assert_eq!(
        no_session.status, 405,
        "GET without a session: {:?}",
        no_session.headers
    );
    assert_eq!(
        no_session.header("allow"),
        Some("POST"),
        "{:?}",
        no_session.headers
    );
    drop(no_session);
    let stream = http_request_head(
        front.addr,
        "GET",
        &path,
        &[
            ("Accept", "text/event-stream"),
            ("Mcp-Session-Id", &session),
        ],
    )
    .expect("GET with a session");
    assert_eq!(
        stream.status, 200,
        "GET with a session: {:?}",
        stream.headers
    );
    assert!(
        stream
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream")),
        "GET with a session is not an SSE stream: {:?}",
        stream.headers
    );
    drop(stream);

    front.delete_session("everything", &session);
    assert!(
        poll_until(TIMEOUT, || process_gone(pid)),
        "server-everything (pid {pid}) still exists after DELETE ended its session"
    );
    let after = front.in_session(
        "everything",
        &session,
        &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    );
    assert_eq!(
        after["status"], 404,
        "a request in the ended session: {after}"
    );
    let again = http_request_head(front.addr, "DELETE", &path, &[("Mcp-Session-Id", &session)])
        .expect("second DELETE");
    assert_eq!(again.status, 404, "DELETE of an ended session");
    let cgroup = front.env.session_cgroup("everything", &session);
    assert!(
        poll_until(TIMEOUT, || !cgroup.exists()),
        "the ended session's cgroup {} was never removed",
        cgroup.display()
    );
}

/// What a session's server started and left running (here a background `sleep` of the
/// server's wrapper script) ends with the session: everything in the session's cgroup is
/// killed, and the cgroup is removed.
#[test]
fn what_a_sessions_server_left_running_ends_with_the_session() {
    let env = TestEnv::new("proxy-leftover-process", PROBE);
    let peers = Peers::require();
    let pid_file = env.dir().join("leftover.pid");
    let command = leaving_a_sleep(&pid_file, FAST_SERVER);
    let servers = json!({"fast": stdio_server(command, vec![list_tools_rule()])});
    let front = Front::start(env, peers, servers);
    let session = front.open_session("fast", HANDSHAKE);
    let leftover = pid_from_file(&pid_file);
    assert!(
        !process_ended(leftover),
        "the sleep (pid {leftover}) never ran"
    );
    front.delete_session("fast", &session);
    assert_process_ends(
        leftover,
        TIMEOUT,
        "the server's leftover process outlived its session",
    );
    let cgroup = front.env.session_cgroup("fast", &session);
    assert!(
        poll_until(TIMEOUT, || !cgroup.exists()),
        "the ended session's cgroup {} was never removed",
        cgroup.display()
    );
}

/// An agent that still holds its GET stream when it sends DELETE (the SDKs' close order is
/// not guaranteed): the session ends all the same. The stream is closed by mcp-guard and the
/// server process goes away while the agent keeps the connection open.
#[test]
fn delete_with_an_open_get_stream_ends_the_stream_and_the_server() {
    let front = everything_front("proxy-delete-get", vec![]);
    let path = Front::path("everything");
    let session = front.open_session("everything", HANDSHAKE);
    let pid = front.session_pid("everything", &session);
    let stream = http_request_head(
        front.addr,
        "GET",
        &path,
        &[
            ("Accept", "text/event-stream"),
            ("Mcp-Session-Id", &session),
        ],
    )
    .expect("GET with a session");
    assert_eq!(stream.status, 200);

    front.delete_session("everything", &session);
    let gone = poll_until(TIMEOUT, || process_gone(pid));
    // The stream must end (EOF) rather than run into the safety net.
    let rest = stream.read_until_closed(TIMEOUT);
    assert!(
        gone,
        "server-everything (pid {pid}) still runs {TIMEOUT:?} after DELETE while the agent's \
         GET stream is open"
    );
    assert!(
        rest.is_ok(),
        "the GET stream of the deleted session was not closed by mcp-guard: {rest:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 10. Per-session processes in per-session guarded cgroups
// ---------------------------------------------------------------------------------------------

/// Two sessions of server-everything: two processes, each in `<cgroup root>/everything/<its
/// session id>`, each told its session (`MCP_GUARD_SESSION`), both guarded. A fetch each
/// server makes to an undeclared loopback listener is refused by the kernel, never arrives,
/// and the egress event names the session whose server made it.
#[test]
fn each_session_runs_in_its_own_guarded_cgroup() {
    let front = everything_front(
        "proxy-cgroups",
        vec![allow(
            "fetch",
            json!({"roles": [DEVELOPER], "tools": ["gzip-file-as-resource"]}),
        )],
    );
    let undeclared = Listener::tcp(LOCALHOST_V4);
    let first = front.open_session("everything", HANDSHAKE);
    let second = front.open_session("everything", HANDSHAKE);
    assert_ne!(first, second);

    let mut seen = Vec::new();
    for session in [&first, &second] {
        let pid = front.session_pid("everything", session);
        let expected = format!("/{}/everything/{session}", front.env.name);
        assert_eq!(
            process_cgroup(pid).as_deref(),
            Some(expected.as_str()),
            "/proc/{pid}/cgroup of session {session}'s server"
        );
        let environ = process_environ(pid);
        assert!(
            environ
                .iter()
                .any(|(k, v)| k == "MCP_GUARD_SESSION" && v == session.as_str()),
            "the server of session {session} was not told its session: {:?}",
            environ
                .iter()
                .filter(|(k, _)| k.starts_with("MCP_GUARD"))
                .collect::<Vec<_>>()
        );
        seen.push((session.clone(), pid));
    }
    assert_ne!(
        seen[0].1, seen[1].1,
        "two sessions share one server process"
    );
    assert_eq!(
        front.env.status()["guarded_cgroups"],
        2,
        "both session cgroups are guarded: {}",
        front.env.status()
    );

    for (session, pid) in &seen {
        let fetch = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "gzip-file-as-resource",
            "arguments": {"name": "x.gz", "data": format!("http://{}/from-{session}", undeclared.addr)},
        }});
        let output = front.in_session("everything", session, &fetch);
        assert_eq!(output["status"], 200, "{output}");
        let event =
            front
                .daemon
                .wait_for_event(&format!("the refused fetch of session {session}"), |e| {
                    as_u64(field(e, "tgid")) == Some(*pid as u64)
                        && as_u64(field(e, "port")) == Some(u64::from(undeclared.port()))
                });
        assert_eq!(field(&event, "verdict"), "refuse", "{event}");
        assert_eq!(field(&event, "server"), "everything", "{event}");
        assert_eq!(field(&event, "session"), session.as_str(), "{event}");
        let answer = response_message(&output);
        assert!(
            answer.get("error").is_some() || answer["result"]["isError"] == true,
            "the fetch cannot have succeeded: {answer}"
        );
    }
    assert!(
        undeclared.received().is_empty(),
        "a refused connect reached the listener: {:?}",
        undeclared.received()
    );
}

// ---------------------------------------------------------------------------------------------
// 11. Shared isolation and Streamable HTTP upstreams
// ---------------------------------------------------------------------------------------------

/// `"isolation": "shared"`: three agent sessions, one server process (in
/// `<cgroup root>/<server>/shared`), each session initialised and served, each call enforced.
/// A session's `logging/setLevel` is answered by mcp-guard and never reaches the process (the
/// fast server would answer it -32601), so no agent sets the level of every session's logs.
#[test]
fn shared_isolation_serves_every_session_from_one_process() {
    let env = TestEnv::new("proxy-shared", PROBE);
    let peers = Peers::require();
    let mut server = stdio_server(
        vec![FAST_SERVER.to_string()],
        vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
            allow(
                "log-level",
                json!({"roles": [DEVELOPER], "methods": ["logging/setLevel"]}),
            ),
        ],
    );
    server["isolation"] = json!("shared");
    let front = Front::start(env, peers, json!({ "fast": server }));
    let sessions: Vec<String> = (0..3)
        .map(|_| front.open_session("fast", HANDSHAKE))
        .collect();
    for (i, session) in sessions.iter().enumerate() {
        let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": format!("session {i}")}}});
        let answer = response_message(&front.in_session("fast", session, &call));
        assert_eq!(
            answer["result"]["content"][0]["text"],
            format!("session {i}"),
            "{answer}"
        );
        let hidden = json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call",
            "params": {"name": "write_note", "arguments": {"text": "x"}}});
        let refused = response_message(&front.in_session("fast", session, &hidden));
        assert_unknown_tool(&refused["error"], "write_note");
        let set_level = json!({"jsonrpc": "2.0", "id": 9, "method": "logging/setLevel",
            "params": {"level": "emergency"}});
        let answer = response_message(&front.in_session("fast", session, &set_level));
        assert_eq!(answer["result"], json!({}), "{answer}");
    }
    let shared = front.env.session_cgroup("fast", "shared");
    assert_eq!(
        cgroup_pids(&shared).len(),
        1,
        "one process serves every session of a shared server"
    );
    for session in &sessions {
        assert!(
            !front.env.session_cgroup("fast", session).exists(),
            "a shared server's session has no cgroup of its own"
        );
    }
}

/// A shared server's process that exits ends every session on it (`"reason": "server_exited"`,
/// then 404), and the next session starts a new shared process that answers.
#[test]
fn a_shared_server_that_exits_ends_its_sessions_and_the_next_starts_a_new_one() {
    let env = TestEnv::new("proxy-shared-exits", PROBE);
    let peers = Peers::require();
    let mut server = stdio_server(
        peers.time(),
        vec![
            list_tools_rule(),
            allow(
                "time",
                json!({"roles": [DEVELOPER], "tools": ["get_current_time"]}),
            ),
        ],
    );
    server["isolation"] = json!("shared");
    let front = Front::start(env, peers, json!({ "time": server }));
    let sessions: Vec<String> = (0..2)
        .map(|_| front.open_session("time", HANDSHAKE))
        .collect();
    let pid = front.session_pid("time", "shared");
    // SAFETY: kill(2) on a pid, no memory involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    for session in &sessions {
        assert_eq!(
            front.until_session_ended(session)["detail"]["reason"],
            "server_exited"
        );
        assert_eq!(front.in_session("time", session, &list)["status"], 404);
    }

    front.session_listing("time", &["get_current_time"]);
    assert_ne!(front.session_pid("time", "shared"), pid);
}

/// What a shared server's process started in a session of its own (`setsid`) does not
/// outlive that process: when the process exits, what it left in its cgroup is ended, and the
/// next session's new shared process runs and answers.
#[test]
fn what_a_shared_server_left_behind_ends_with_it() {
    let env = TestEnv::new("proxy-shared-leftovers", PROBE);
    let peers = Peers::require();
    let pid_file = env.dir().join("escaped.pid");
    let command = leaving_an_escaped_sleep(&pid_file, "1000", FAST_SERVER);
    let rules = vec![
        list_tools_rule(),
        allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
    ];
    let mut server = stdio_server(command, rules);
    server["isolation"] = json!("shared");
    let front = Front::start(env, peers, json!({ "fast": server }));
    let session = front.open_session("fast", HANDSHAKE);
    let escaped = pid_from_file(&pid_file);
    let cgroup = front.env.session_cgroup("fast", "shared");
    let mut server_pids = Vec::new();
    assert!(
        poll_until(TIMEOUT, || {
            let pids = cgroup_pids(&cgroup);
            server_pids = pids.iter().copied().filter(|&p| p != escaped).collect();
            pids.contains(&escaped) && server_pids.len() == 1
        }),
        "the shared cgroup holds the server and the escaped sleep {escaped}: {:?}",
        cgroup_pids(&cgroup)
    );
    // SAFETY: kill(2) on a pid, no memory involved.
    assert_eq!(unsafe { libc::kill(server_pids[0], libc::SIGKILL) }, 0);
    assert_eq!(
        front.until_session_ended(&session)["detail"]["reason"],
        "server_exited"
    );
    assert_process_ends(
        escaped,
        TIMEOUT,
        "the shared server's escaped sleep outlived it",
    );

    std::fs::remove_file(&pid_file).unwrap();
    front.session_listing("fast", &["echo"]);
    let next = pid_from_file(&pid_file);
    assert!(
        !process_ended(next),
        "the next shared process's sleep was ended with the old one's"
    );
}

/// Sessions opening on a shared server while its process is killed again and again: each
/// ends with the process it joined, or works on the next one. None is left open on a dead
/// process (one joining while the retirement looked for the sessions to end was missed).
#[test]
fn sessions_joining_a_shared_server_as_it_exits_end_with_it_or_use_the_next() {
    let env = TestEnv::new("proxy-shared-churn", PROBE);
    let peers = Peers::require();
    let rules = vec![
        list_tools_rule(),
        allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
    ];
    let mut server = stdio_server(vec![FAST_SERVER.to_owned()], rules);
    server["isolation"] = json!("shared");
    let front = Front::start_with(env, peers, json!({ "fast": server }), |document| {
        document["daemon"]["max_sessions_per_principal"] = json!(1000);
    });
    let cgroup = front.env.session_cgroup("fast", "shared");
    let churn = Duration::from_secs(4);
    let started = Instant::now();
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": HANDSHAKE, "capabilities": {},
            "clientInfo": {"name": "churn", "version": "1"}}})
    .to_string();
    let headers = [
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
    ];
    let path = Front::path("fast");
    let (sessions, kills) = std::thread::scope(|scope| {
        let openers: Vec<_> = (0..3)
            .map(|_| {
                scope.spawn(|| {
                    let mut opened = Vec::new();
                    while started.elapsed() < churn {
                        let answer =
                            http_exchange(front.addr, "POST", &path, &headers, &initialize);
                        let answer = answer.expect("POST initialize");
                        if let Some(id) = answer.header("mcp-session-id") {
                            opened.push(id.to_owned());
                        }
                    }
                    opened
                })
            })
            .collect();
        let mut kills = 0;
        while started.elapsed() < churn {
            for pid in cgroup_pids(&cgroup) {
                // SAFETY: kill(2) on a pid, no memory involved.
                if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                    kills += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let sessions: Vec<String> = openers
            .into_iter()
            .flat_map(|opener| opener.join().expect("opener"))
            .collect();
        (sessions, kills)
    });
    assert!(
        kills >= 10,
        "the shared process was killed only {kills} times"
    );
    assert!(
        sessions.len() >= 20,
        "only {} sessions opened",
        sessions.len()
    );
    let ended_sessions = || -> BTreeSet<String> {
        let records = audit_records(&front.env.audit_path());
        let ends = records
            .iter()
            .filter(|r| r["kind"] == "session" && r["detail"]["event"] == "end");
        ends.filter_map(|r| r["session"].as_str().map(str::to_owned))
            .collect()
    };
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "still here"}}});
    let works = |session: &str| {
        let answer = front.post_in_session("fast", session, &call);
        let answered = answer.as_ref().ok().map(HttpAnswer::json);
        answered.is_some_and(|a| a["result"]["content"][0]["text"] == "still here")
    };
    let mut ended = ended_sessions();
    for session in &sessions {
        assert!(
            poll_until(TIMEOUT, || {
                if ended.contains(session) || works(session) {
                    return true;
                }
                ended = ended_sessions();
                ended.contains(session)
            }),
            "session {session} (of {} opened, {kills} kills) is open and cannot call",
            sessions.len()
        );
    }
}

/// A shared server that confirms a subscription after the session that asked for it ended
/// (the agent's DELETE came while the server took its time) is told to unsubscribe again:
/// nobody is left to do it, and the process would send that resource's updates for nobody.
#[test]
fn a_subscription_confirmed_after_its_session_ended_is_undone_on_the_shared_server() {
    let env = TestEnv::new("proxy-shared-late-subscription", PROBE);
    let peers = Peers::require();
    let wire = env.dir().join("methods.txt");
    const SLOW_SUBSCRIBER: &str = r#"
import json, sys, time
wire = open(sys.argv[1], "a")
for line in sys.stdin:
    message = json.loads(line)
    method = message.get("method")
    if method:
        wire.write(method + "\n")
        wire.flush()
    if "id" not in message or method is None:
        continue
    if method == "initialize":
        result = {"protocolVersion": message["params"]["protocolVersion"],
                  "capabilities": {"resources": {"subscribe": True}},
                  "serverInfo": {"name": "slow-subscriber", "version": "0"}}
    elif method == "resources/subscribe":
        time.sleep(2)
        result = {}
    else:
        result = {}
    print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
"#;
    let command = vec![
        "python3".into(),
        "-c".into(),
        SLOW_SUBSCRIBER.into(),
        wire.display().to_string(),
    ];
    let rules = vec![
        allow(
            "subscribe",
            json!({"roles": [DEVELOPER], "methods": ["resources/subscribe"]}),
        ),
        allow(
            "read",
            json!({"roles": [DEVELOPER], "resources": ["demo://slow/*"]}),
        ),
    ];
    let mut server = stdio_server(command, rules);
    server["isolation"] = json!("shared");
    let front = Front::start(env, peers, json!({ "slow": server }));
    let session = front.open_session("slow", HANDSHAKE);
    let subscribe = json!({"jsonrpc": "2.0", "id": 2, "method": "resources/subscribe",
        "params": {"uri": "demo://slow/1"}});
    let methods = || std::fs::read_to_string(&wire).unwrap_or_default();
    std::thread::scope(|scope| {
        let subscribing = scope.spawn(|| front.post_in_session("slow", &session, &subscribe));
        assert!(
            poll_until(TIMEOUT, || methods().contains("resources/subscribe")),
            "the subscription did not reach the server: {}",
            methods()
        );
        front.delete_session("slow", &session);
        let _ = subscribing.join().expect("subscribing");
    });
    assert!(
        poll_until(TIMEOUT, || methods().contains("resources/unsubscribe")),
        "the server was not told to unsubscribe: {}",
        methods()
    );
}

/// The port a peer started with its stderr piped announces (`MCP_PEER_LISTENING <port>`).
fn announced_port(peer: &mut std::process::Child) -> String {
    port_announced_in(&collect_stderr(peer))
}

/// The port a peer announces (`MCP_PEER_LISTENING <port>`) on the stderr [`collect_stderr`]
/// collects.
fn port_announced_in(stderr: &Mutex<String>) -> String {
    let mut port = None;
    assert!(
        poll_until(TIMEOUT, || {
            port = stderr
                .lock()
                .unwrap()
                .lines()
                .find_map(|line| line.strip_prefix("MCP_PEER_LISTENING ").map(str::to_owned));
            port.is_some()
        }),
        "the peer did not announce its port: {}",
        stderr.lock().unwrap()
    );
    port.unwrap()
}

/// The fast server over Streamable HTTP on a free port, and that port.
fn start_fast_http_server() -> (std::process::Child, String) {
    let mut server = Command::new(FAST_SERVER)
        .args(["--http", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mcp-fast-server --http 0");
    let port = announced_port(&mut server);
    (server, port)
}

/// In `session` of `server`, `tools/list` (id 2) lists only `echo`, and calling it (id 3)
/// echoes `text`.
fn assert_lists_only_echo_and_echoes(front: &Front, server: &str, session: &str, text: &str) {
    let list = response_message(&front.in_session(
        server,
        session,
        &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    ));
    assert_eq!(tool_names(&list["result"]), set(&["echo"]), "{list}");
    let call = response_message(&front.in_session(
        server,
        session,
        &json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": text}}}),
    ));
    assert_eq!(call["result"]["content"][0]["text"], text, "{call}");
}

/// A server reached by `url` (Streamable HTTP upstream): mcp-guard keeps the server's session,
/// filters its list and enforces calls as for a stdio server.
#[test]
fn http_upstream_is_proxied_with_the_same_enforcement() {
    let env = TestEnv::new("proxy-http-upstream", PROBE);
    let peers = Peers::require();
    let (mut upstream, port) = start_fast_http_server();
    let servers = json!({
        "remote": url_server(&port, vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let session = front.open_session("remote", HANDSHAKE);
    assert_lists_only_echo_and_echoes(&front, "remote", &session, "over http");
    let hidden = response_message(&front.in_session(
        "remote",
        &session,
        &json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
            "params": {"name": "add", "arguments": {"a": 1, "b": 2}}}),
    ));
    assert_unknown_tool(&hidden["error"], "add");
    let _ = upstream.kill();
    let _ = upstream.wait();
}

/// A `url` server that keeps each POST's SSE stream open after the answer (a server SHOULD
/// close it; nothing makes it) still serves the agent: mcp-guard reads a stream up to its
/// answer and closes it. Before, `initialize`'s open stream held back every later POST, and
/// each call's stream stayed open until the session ended.
#[test]
fn a_url_server_that_keeps_answer_streams_open_still_serves_and_holds_none() {
    let env = TestEnv::new("proxy-http-held-streams", PROBE);
    let peers = Peers::require();
    let mut upstream = Command::new(FAST_SERVER)
        .args(["--http", "0", "--sse-held-open"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mcp-fast-server --http 0 --sse-held-open");
    let (_stdout, server_stderr) = collect_output(&mut upstream);
    let port = port_announced_in(&server_stderr);
    let servers = json!({
        "remote": url_server(&port, vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let session = front.open_session("remote", HANDSHAKE);
    assert_lists_only_echo_and_echoes(&front, "remote", &session, "held open");
    // The ping open_session sent, and the answers to initialize, tools/list and the call:
    // four streams, each closed by mcp-guard while the agent's session is still open.
    let closed = || {
        server_stderr
            .lock()
            .unwrap()
            .lines()
            .filter(|line| *line == "MCP_PEER_STREAM_CLOSED")
            .count()
    };
    assert!(
        poll_until(TIMEOUT, || closed() == 4),
        "streams closed by mcp-guard: {} of 4",
        closed()
    );
    front.delete_session("remote", &session);
    let _ = upstream.kill();
    let _ = upstream.wait();
}

/// Behind a `url`, the real server-everything (Streamable HTTP) sends what it sends on its
/// own (here: simulated log messages, outside any request) on the GET stream mcp-guard keeps
/// open to it; they reach the agent's GET stream. The agent's DELETE ends the server's
/// session too.
#[test]
fn http_upstream_streams_server_messages_and_ends_its_session() {
    let env = TestEnv::new("proxy-http-upstream-stream", PROBE);
    let peers = Peers::require();
    let command = peers.everything_http();
    let mut upstream = Command::new(&command[0])
        .args(&command[1..])
        .env("PORT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start server-everything streamableHttp");
    // It logs on stdout; the port is announced on stderr.
    let (server_says, announced) = collect_output(&mut upstream);
    let port = port_announced_in(&announced);
    let servers = json!({
        "remote": url_server(&port, vec![
            list_tools_rule(),
            allow("logging", json!({"roles": [DEVELOPER], "tools": ["toggle-simulated-logging"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let session = front.open_session("remote", HANDSHAKE);
    let mut stream = http_request_head(
        front.addr,
        "GET",
        "/servers/remote/mcp",
        &[
            ("Accept", "text/event-stream"),
            ("Mcp-Session-Id", &session),
            ("MCP-Protocol-Version", HANDSHAKE),
        ],
    )
    .expect("open the agent's GET stream");
    assert_eq!(stream.status, 200);
    let toggled = response_message(&front.in_session(
        "remote",
        &session,
        &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "toggle-simulated-logging", "arguments": {}}}),
    ));
    assert!(
        text(&toggled["result"]).contains("Started simulated"),
        "{toggled}"
    );
    let received = stream
        .read_until_contains("notifications/message", TIMEOUT)
        .expect("a log message from the server on the agent's GET stream");
    // server-everything picks the level at random; every message names it and the session.
    assert!(
        received.contains(r#""level":"#) && received.contains("SessionId"),
        "{received}"
    );

    let deleted = front.raw("remote", &["--session", &session, "--method", "DELETE"]);
    assert_eq!(deleted["status"], 204, "{deleted}");
    let ended = (0..)
        .map_while(|_| server_says.recv_timeout(TIMEOUT).ok())
        .any(|line| line.contains("Received session termination request"));
    assert!(
        ended,
        "server-everything never got the DELETE of its session"
    );
    let _ = upstream.kill();
    let _ = upstream.wait();
}

/// A server with `"user": "nobody"` runs as that user (uid, gid, no supplementary groups),
/// still inside its session's guarded cgroup, and answers as before. (The program is copied
/// where `nobody` may run it: the build directory need not be open to other users.)
#[test]
fn a_server_runs_as_the_user_the_policy_names() {
    use std::os::unix::fs::PermissionsExt;
    let env = TestEnv::new("proxy-run-as", PROBE);
    let peers = Peers::require();
    let shelf = tempfile::Builder::new()
        .prefix("mcp-guard-run-as")
        .tempdir_in("/tmp")
        .expect("a directory for the server program");
    std::fs::set_permissions(shelf.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = shelf.path().join("mcp-fast-server");
    std::fs::copy(FAST_SERVER, &program).expect("copy mcp-fast-server");
    let mut server = stdio_server(
        vec![program.display().to_string()],
        vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        ],
    );
    server["user"] = json!("nobody");
    let front = Front::start(env, peers, json!({"fast": server}));
    let session = front.open_session("fast", HANDSHAKE);
    let pid = front.session_pid("fast", &session);

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|rest| rest.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let (uid, gid) = (field("Uid:"), field("Gid:"));
    assert_eq!(uid, "65534 65534 65534 65534", "{status}");
    assert_eq!(gid, "65534 65534 65534 65534", "{status}");
    assert_eq!(field("Groups:"), "", "{status}");
    assert_eq!(
        process_cgroup(pid).as_deref(),
        Some(format!("/{}/fast/{session}", front.env.name).as_str()),
        "/proc/{pid}/cgroup"
    );
    let echoed = response_message(&front.in_session(
        "fast",
        &session,
        &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "as nobody"}}}),
    ));
    assert_eq!(
        echoed["result"]["content"][0]["text"], "as nobody",
        "{echoed}"
    );
}

/// Runs `openssl` with `args` in `dir`, quietly.
fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success(), "openssl {args:?} failed");
}

/// A private CA and a server certificate for 127.0.0.1 it signed, made in `dir` with the
/// openssl command line: (CA certificate, server certificate, server key).
fn private_ca_and_server_certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    const P256: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];
    let mut ca = vec![
        "req",
        "-x509",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=mcp-guard test CA",
    ];
    ca.extend(P256);
    ca.extend(["-keyout", "ca-key.pem", "-out", "ca.pem"]);
    openssl(dir, &ca);
    let mut request = vec!["req", "-nodes", "-subj", "/CN=127.0.0.1"];
    request.extend(P256);
    request.extend(["-keyout", "server-key.pem", "-out", "server.csr"]);
    openssl(dir, &request);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server-key.pem"),
    )
}

/// Replaces the file at `path` with a copy of `from` (see [`replace_file`]).
fn replace_with(path: &Path, from: &Path) {
    replace_file(path, &std::fs::read(from).unwrap());
}

/// With `daemon.tls` the HTTP front speaks only TLS: the Python SDK client, trusting the
/// front's CA, calls through it over `https://`; a plain-HTTP request to the same port gets no
/// HTTP answer, and is counted as a failed handshake. A renewed certificate (of another CA) written over the files is taken without
/// a restart: the next client, trusting only the new CA, gets through.
#[test]
fn the_http_front_serves_tls_and_takes_a_renewed_certificate() {
    let env = TestEnv::new("proxy-front-tls", PROBE);
    let peers = Peers::require();
    let (first, second) = (env.dir().join("first"), env.dir().join("second"));
    std::fs::create_dir_all(&first).unwrap();
    std::fs::create_dir_all(&second).unwrap();
    let (first_ca, first_cert, first_key) = private_ca_and_server_certificate(&first);
    let (second_ca, second_cert, second_key) = private_ca_and_server_certificate(&second);
    let (cert, key) = (env.dir().join("front.pem"), env.dir().join("front-key.pem"));
    replace_with(&cert, &first_cert);
    replace_with(&key, &first_key);
    let servers = json!({
        "fast": stdio_server(
            vec![FAST_SERVER.to_string()],
            vec![allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]}))],
        ),
    });
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let with_tls = |document: &mut Value, tls: bool| {
        if tls {
            document["daemon"]["tls"] = json!({"cert_file": cert, "key_file": key});
        }
        document["daemon"]["metrics_listen"] = json!(metrics.to_string());
    };
    let front = Front::start_with(env, peers, servers.clone(), |document| {
        with_tls(document, true)
    });
    let url = format!("https://{}{}", front.addr, Front::path("fast"));
    let echo = |ca_file: &Path, text_sent: &str| {
        let script = json!([{"op": "call_tool", "name": "echo", "arguments": {"text": text_sent}}]);
        let https = Transport::Https { url: &url, ca_file };
        let run = mcp_client(&front.peers, https, HANDSHAKE, &script);
        assert_eq!(text(run.ok(0)), text_sent);
    };
    echo(&first_ca, "over tls");

    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}).to_string();
    let plain = http_exchange(front.addr, "POST", &Front::path("fast"), &[], &body);
    assert!(
        plain.is_err(),
        "a plain-HTTP request was answered: {plain:?}"
    );
    let failures = |reason| {
        let labels = [("reason", reason)];
        metric(
            &scrape(metrics),
            "mcp_guard_tls_handshake_failures_total",
            &labels,
        )
    };
    // Counted once the daemon has dropped the connection, which the client may see first.
    assert!(
        poll_until(TIMEOUT, || failures("error") == 1.0),
        "the plain-HTTP request's failed handshake: counted {}",
        failures("error")
    );

    let mark = front.daemon.log.mark();
    replace_with(&cert, &second_cert);
    replace_with(&key, &second_key);
    front.daemon.wait_for_since(
        mark,
        TIMEOUT,
        "the reload with the renewed certificate",
        |line| message(line) == Some("policy reloaded"),
    );
    echo(&second_ca, "renewed");

    // Taking daemon.tls out of the policy turns TLS off for new connections, and putting it
    // back turns it on again: no restart.
    let reload_with_tls = |tls: bool, what: &str| {
        let mut document = front.env.proxy_policy(front.addr, servers.clone());
        with_tls(&mut document, tls);
        let mark = front.daemon.log.mark();
        front.env.write_policy_document(&document);
        front.daemon.wait_for_since(mark, TIMEOUT, what, |line| {
            message(line) == Some("policy reloaded")
        });
        mark
    };
    let mark = reload_with_tls(false, "the reload without daemon.tls");
    front
        .daemon
        .wait_for_since(mark, TIMEOUT, "the warning that TLS is off", |line| {
            message(line).is_some_and(|m| m.starts_with("daemon.tls was removed"))
        });
    let plain_url = format!("http://{}{}", front.addr, Front::path("fast"));
    let script =
        json!([{"op": "call_tool", "name": "echo", "arguments": {"text": "in the clear"}}]);
    let run = mcp_client(
        &front.peers,
        Transport::Http(&plain_url),
        HANDSHAKE,
        &script,
    );
    assert_eq!(text(run.ok(0)), "in the clear");
    reload_with_tls(true, "the reload with daemon.tls again");
    let plain = http_exchange(front.addr, "POST", &Front::path("fast"), &[], &body);
    assert!(
        plain.is_err(),
        "TLS is back, yet plain HTTP was answered: {plain:?}"
    );
    echo(&second_ca, "tls again");
}

/// The real `mcp-server-time` served over https (the Python SDK's Streamable HTTP under
/// uvicorn) behind an `https://` `url`, its certificate signed by a private CA: with that CA
/// in `tls_ca_file` the call goes through and gets the server's answer; without it (the
/// system's roots do not know the CA) the agent's initialize is refused with -32011 naming the
/// certificate problem — never a connection that skipped verification. The server answers
/// over SSE (with CRLF line endings), as the SDK's server does by default.
#[test]
fn https_upstream_is_verified_against_the_configured_ca() {
    let env = TestEnv::new("proxy-https-upstream", PROBE);
    let peers = Peers::require();
    let (ca, cert, key) = private_ca_and_server_certificate(env.dir());
    let command = peers.time_http(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let (mut upstream, port) = start_announcing(&command);
    let url = format!("https://127.0.0.1:{port}/mcp");
    let rules = current_time_rules();
    let servers = json!({
        "trusted": {"url": url, "tls_ca_file": ca, "rules": rules},
        "untrusted": {"url": url, "rules": rules},
    });
    let front = Front::start(env, peers, servers);

    let run = front.client(
        "trusted",
        HANDSHAKE,
        &json!([
            {"op": "list_tools"},
            {"op": "call_tool", "name": "get_current_time", "arguments": {"timezone": "UTC"}},
        ]),
    );
    assert_eq!(tool_names(run.ok(0)), set(&["get_current_time"]));
    let answer: Value = serde_json::from_str(text(run.ok(1))).expect("the time as JSON");
    assert_eq!(answer["timezone"], "UTC", "{answer}");

    let refused = front.initialize_then_ping("untrusted");
    // A `url` server is reached on the agent's first message: its initialize is answered
    // with -32011, naming why the server's certificate was not accepted.
    let error = &refused["initialize"]["response"]["error"];
    assert_eq!(error["code"], -32011, "{refused}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("invalid peer certificate: UnknownIssuer")),
        "{refused}"
    );
    let _ = upstream.kill();
    let _ = upstream.wait();
}

/// A `url` server that wants its own credentials (the real `mcp-server-time` behind a check of
/// `Authorization: Bearer <token>`, answering 401 otherwise, as a hosted MCP server wanting an
/// API key does) gets them from the policy's `headers`, read from a file the agent never sees:
/// the call goes through, and the agent's own Authorization header never reaches the server.
/// Without `headers` the agent's initialize is refused with -32011 naming the 401. When the
/// server's token changes and the file is replaced, the next session gets through with the new
/// token, and so does a session opened before the rotation.
#[test]
fn url_server_credentials_come_from_the_policy_never_from_the_agent() {
    let env = TestEnv::new("proxy-upstream-headers", PROBE);
    let peers = Peers::require();
    let accepted_token = env.dir().join("accepted-token");
    std::fs::write(&accepted_token, "first-secret\n").unwrap();
    let auth_log = env.dir().join("auth.log");
    let command = peers.time_http(&[
        "--require-bearer-file",
        accepted_token.to_str().unwrap(),
        "--auth-log",
        auth_log.to_str().unwrap(),
    ]);
    let (mut upstream, port) = start_announcing(&command);
    let url = format!("http://127.0.0.1:{port}/mcp");
    let secret = env.dir().join("server-secret");
    std::fs::write(&secret, "first-secret\n").unwrap();
    let rules = current_time_rules();
    let servers = json!({
        "with-key": {
            "url": url,
            "headers": {"Authorization": {"file": secret, "prefix": "Bearer "}},
            "rules": rules,
        },
        "without-key": {"url": url, "rules": rules},
        "redirected": {
            "url": redirect_everything_to(&url),
            "headers": {"Authorization": {"file": secret, "prefix": "Bearer "}},
            "rules": rules,
        },
    });
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let front = Front::start_with(env, peers, servers, |document| {
        document["daemon"]["metrics_listen"] = json!(metrics.to_string());
    });
    let rejected = |server: &str| {
        metric(
            &scrape(metrics),
            "mcp_guard_upstream_credentials_rejected_total",
            &[("server", server)],
        )
    };
    let call = |server: &str| {
        front.raw(
            server,
            &[
                "--header",
                "Authorization: Bearer the-agents-own-token",
                "--initialize",
                HANDSHAKE,
                "--body",
                r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get_current_time","arguments":{"timezone":"UTC"}}}"#,
            ],
        )
    };
    let time_of = |answer: &Value| -> Value {
        let text = response_message(answer)["result"]["content"][0]["text"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no time in {answer}"));
        serde_json::from_str(&text).expect("the time as JSON")
    };

    let answer = call("with-key");
    assert_eq!(time_of(&answer)["timezone"], "UTC", "{answer}");
    assert_eq!(rejected("with-key"), 0.0);
    // A session that stays open across the rotation below.
    let open_before = front.open_session("with-key", HANDSHAKE);

    let refused = call("without-key");
    let error = &refused["initialize"]["response"]["error"];
    assert_eq!(error["code"], -32011, "{refused}");
    assert!(
        error["message"].as_str().is_some_and(|m| m.contains("401")),
        "{refused}"
    );
    assert!(rejected("without-key") >= 1.0, "the 401 was not counted");

    // The server's token rotates: until the file is replaced, new sessions are refused.
    replace_file(&accepted_token, b"second-secret\n");
    let stale = call("with-key");
    assert_eq!(
        stale["initialize"]["response"]["error"]["code"], -32011,
        "{stale}"
    );
    assert!(
        rejected("with-key") >= 1.0,
        "the stale secret's 401 was not counted"
    );
    replace_file(&secret, b"second-secret\n");
    front
        .daemon
        .wait_for_message("key file changed", Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = call("with-key");
        if response_message(&answer)["result"].is_object() {
            assert_eq!(time_of(&answer)["timezone"], "UTC", "{answer}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated secret was not taken: {answer}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The session opened before the rotation sends the new secret too.
    let time_call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "get_current_time", "arguments": {"timezone": "UTC"}}});
    let answer = front.in_session("with-key", &open_before, &time_call);
    assert_eq!(time_of(&answer)["timezone"], "UTC", "{answer}");

    // A server that redirects elsewhere is refused: the redirect is not followed, so neither
    // the calls nor the server's credentials reach a host the policy does not name.
    let requests_seen = std::fs::read_to_string(&auth_log).unwrap().lines().count();
    let redirected = call("redirected");
    let error = &redirected["initialize"]["response"]["error"];
    assert_eq!(error["code"], -32011, "{redirected}");
    assert!(
        error["message"].as_str().is_some_and(|m| m.contains("307")),
        "{redirected}"
    );
    assert_eq!(
        std::fs::read_to_string(&auth_log).unwrap().lines().count(),
        requests_seen,
        "the redirect was followed"
    );

    let seen = std::fs::read_to_string(&auth_log).unwrap();
    let values: BTreeSet<&str> = seen
        .lines()
        .filter_map(|line| line.split_once(' ').map(|(_, value)| value))
        .collect();
    assert_eq!(
        values,
        BTreeSet::from(["Bearer first-secret", "Bearer second-secret", "-"]),
        "what the server was sent:\n{seen}"
    );
    // The secret is the server's: neither the audit log nor the daemon's log holds it.
    let audit = std::fs::read_to_string(front.env.audit_path()).unwrap();
    let log: Vec<String> = front
        .daemon
        .log
        .lines()
        .iter()
        .map(Value::to_string)
        .collect();
    for secret in ["first-secret", "second-secret"] {
        assert!(!audit.contains(secret), "{secret} in the audit log");
        assert!(
            !log.iter().any(|line| line.contains(secret)),
            "{secret} in the log"
        );
    }
    let _ = upstream.kill();
    let _ = upstream.wait();
}

/// A server's answer over `daemon.max_server_message_bytes` (64 KiB here) is dropped unread:
/// the call fails at once with -32011 naming the bound, and the session goes on, its next call
/// answered. Over stdio, server-filesystem reads a 200 KB file; over HTTP, the fast server as
/// a `url` server echoes 100 KB.
#[test]
fn a_server_answer_over_the_size_bound_fails_its_call_and_the_session_goes_on() {
    const BOUND: usize = 64 * 1024;
    let env = TestEnv::new("proxy-server-message-bound", PROBE);
    let peers = Peers::require();
    let root = env.files_dir(Some("small\n"));
    std::fs::write(root.join("big.txt"), "x".repeat(200_000)).unwrap();
    let (mut fast, port) = start_fast_http_server();
    let servers = json!({
        "files": stdio_server(peers.filesystem(&root), vec![
            list_tools_rule(),
            allow("read", json!({"roles": [DEVELOPER], "tools": ["read_text_file"]})),
        ]),
        "remote": url_server(&port, vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        ]),
    });
    let front = Front::start_with(env, peers, servers, |document| {
        document["daemon"]["max_server_message_bytes"] = json!(BOUND);
    });
    let assert_over_the_bound = |error: &Value| {
        assert_eq!(error["code"], -32011, "{error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("over daemon.max_server_message_bytes (65536)"),
            "{error}"
        );
    };

    let path = |name: &str| root.join(name).display().to_string();
    let files = front.client(
        "files",
        HANDSHAKE,
        &json!([
            {"op": "call_tool", "name": "read_text_file", "arguments": {"path": path("big.txt")}},
            {"op": "call_tool", "name": "read_text_file", "arguments": {"path": path("readme.txt")}},
        ]),
    );
    assert_over_the_bound(files.error(0));
    assert_eq!(text(files.ok(1)), "small\n");

    let big_echo = "y".repeat(100_000);
    let remote = front.client(
        "remote",
        HANDSHAKE,
        &json!([
            {"op": "call_tool", "name": "echo", "arguments": {"text": big_echo}},
            {"op": "call_tool", "name": "echo", "arguments": {"text": "small"}},
        ]),
    );
    assert_over_the_bound(remote.error(0));
    assert_eq!(text(remote.ok(1)), "small");

    // Both failures are on record as the server's, each with its call.
    let records = audit_records(&front.env.audit_path());
    let failed = records
        .iter()
        .filter(|r| r["outcome"]["kind"] == "transport_error" && r["outcome"]["code"] == -32011)
        .count();
    assert_eq!(failed, 2, "{records:#?}");
    let _ = fast.kill();
    let _ = fast.wait();
}

/// The URL of a server, on a thread of its own, that answers every request with a `307` to
/// `location`.
fn redirect_everything_to(location: &str) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let answer = format!(
        "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut body_length = 0;
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|read| read > 0) && line != "\r\n" {
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    body_length = value.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let _ = reader.read_exact(&mut vec![0; body_length]);
            let _ = (&stream).write_all(answer.as_bytes());
        }
    });
    format!("http://127.0.0.1:{port}/mcp")
}

/// A server that closes a call's event stream before the answer, to be polled (2025-11-25; the
/// Python SDK's `close_sse_stream` with an event store, twice in one call): mcp-guard resumes
/// the stream with a GET carrying `Last-Event-ID`, each time, and the agent gets the answer.
#[test]
fn a_call_whose_event_stream_the_server_closes_is_resumed() {
    let env = TestEnv::new("proxy-sse-polling", PROBE);
    let peers = Peers::require();
    let resumed = env.dir().join("resumed.txt");
    let command = peers.polling_http(&["--resume-log", resumed.to_str().unwrap()]);
    let (mut upstream, port) = start_announcing(&command);
    let servers = json!({
        "polling": url_server(&port, vec![
            list_tools_rule(),
            allow("slow", json!({"roles": [DEVELOPER], "tools": ["slow_echo"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let run = front.client(
        "polling",
        HANDSHAKE,
        &json!([
            {"op": "call_tool", "name": "slow_echo", "arguments": {"text": "polled", "pauses": 2}},
        ]),
    );
    assert_eq!(text(run.ok(0)), "polled");
    let resumptions = std::fs::read_to_string(&resumed).unwrap_or_default();
    assert_eq!(
        resumptions.lines().count(),
        2,
        "one resumption per closed stream: {resumptions:?}"
    );
    let _ = upstream.kill();
    let _ = upstream.wait();
}

/// The URIs of the resource updates a `url` server sent on its GET stream that reached the
/// agent, in order, up to `note://after`: the server (the Python SDK's, with an event store)
/// announces `note://before`, drops its GET stream and announces `note://missed/1` and `/2`
/// while mcp-guard has none open, then announces `note://after` on the stream mcp-guard opens
/// next; with the server's `resume_get_stream` as given. The second value: the resumptions the
/// server saw (the `Last-Event-ID` of each).
fn updates_across_a_dropped_get_stream(tag: &str, resume: bool) -> (Vec<Value>, String) {
    let env = TestEnv::new(tag, PROBE);
    let peers = Peers::require();
    let resumed = env.dir().join("resumed.txt");
    let command = peers.polling_http(&["--resume-log", resumed.to_str().unwrap()]);
    let (mut upstream, port) = start_announcing(&command);
    let mut server = url_server(
        &port,
        vec![
            allow(
                "announce",
                json!({"roles": [DEVELOPER],
                    "tools": ["announce", "drop_notification_stream"]}),
            ),
            // The agent sees a resource's updates only when it may read the resource.
            allow(
                "notes",
                json!({"roles": [DEVELOPER], "resources": ["note://*"]}),
            ),
        ],
    );
    server["resume_get_stream"] = json!(resume);
    let front = Front::start(env, peers, json!({ "polling": server }));
    let session = front.open_session("polling", HANDSHAKE);
    let call = |tool: &str, arguments: Value| {
        let body = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments}});
        let answer = response_message(&front.in_session("polling", &session, &body));
        assert!(answer["result"]["content"].is_array(), "{tool}: {answer}");
    };
    let mut seen = Vec::new();
    // Until mcp-guard's GET stream is open and has carried an event: the updates before it
    // was open went nowhere.
    let (before, after) = (json!("note://before"), json!("note://after"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.contains(&before) {
        assert!(Instant::now() < deadline, "no update reached the agent");
        call("announce", json!({"uri": "note://before"}));
        seen = front.updates_waiting("polling", &session);
    }
    call(
        "drop_notification_stream",
        json!({"uris": ["note://missed/1", "note://missed/2"]}),
    );
    while !seen.contains(&after) {
        assert!(
            Instant::now() < deadline,
            "nothing after the drop: {seen:?}"
        );
        // mcp-guard opens the stream again a second after the drop.
        call("announce", json!({"uri": "note://after"}));
        seen.extend(front.updates_waiting("polling", &session));
    }
    let _ = upstream.kill();
    let _ = upstream.wait();
    let after_before = seen.iter().skip_while(|uri| **uri != before).skip(1);
    let seen = after_before
        .take_while(|uri| **uri != after)
        .cloned()
        .collect();
    (seen, std::fs::read_to_string(&resumed).unwrap_or_default())
}

/// With `resume_get_stream`, a `url` server's GET stream that drops is resumed with
/// `Last-Event-ID`: the updates the server sent while it was down are replayed, in order,
/// before what comes after.
#[test]
fn a_dropped_get_stream_is_resumed_when_the_server_asks_for_it() {
    let (missed, resumptions) = updates_across_a_dropped_get_stream("proxy-get-resume", true);
    assert_eq!(missed, [json!("note://missed/1"), json!("note://missed/2")]);
    assert!(!resumptions.is_empty(), "the server saw no resumption");
}

/// By default a dropped GET stream is opened afresh, without `Last-Event-ID` (servers on the
/// TypeScript SDK 1.x mishandle a resumed one): what the server sent meanwhile is not replayed.
#[test]
fn a_dropped_get_stream_is_opened_afresh_by_default() {
    let (missed, resumptions) = updates_across_a_dropped_get_stream("proxy-get-afresh", false);
    assert_eq!(missed, Vec::<Value>::new());
    assert_eq!(resumptions, "", "mcp-guard resumed the stream");
}

// ---------------------------------------------------------------------------------------------
// 12. No unrecorded action
// ---------------------------------------------------------------------------------------------

/// Unmounts the small filesystem the audit log lives on, whatever happens.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// When the audit log cannot be written (its filesystem is full), calls are refused with
/// -32012 and never reach the server; once space is back, calls work again.
#[test]
fn calls_are_refused_while_the_audit_log_cannot_be_written() {
    let env = TestEnv::new("proxy-audit-full", PROBE);
    let peers = Peers::require();
    let audit_dir = env.dir().join("audit-fs");
    std::fs::create_dir_all(&audit_dir).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&audit_dir)
        .status()
        .expect("mount tmpfs");
    assert!(status.success(), "mount a small tmpfs for the audit log");
    let _mounted = Mounted(audit_dir.clone());
    let notes = env.dir().join("notes.txt");
    let servers = json!({
        "fast": stdio_server(
            vec![FAST_SERVER.to_string(), "--notes".into(), notes.display().to_string()],
            vec![
                list_tools_rule(),
                allow("notes", json!({"roles": [DEVELOPER], "tools": ["write_note"]})),
            ],
        ),
    });
    let audit_path = audit_dir.join("audit.jsonl");
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let front = Front::start_with(env, peers, servers, |document| {
        document["audit"]["path"] = json!(audit_path);
        document["daemon"]["metrics_listen"] = json!(metrics.to_string());
    });
    let failures = || metric(&scrape(metrics), "mcp_guard_audit_failures_total", &[]);
    let session = front.open_session("fast", HANDSHAKE);
    let note = |id: i64, text: &str| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": "write_note", "arguments": {"text": text}}})
    };
    let first = response_message(&front.in_session("fast", &session, &note(1, "recorded")));
    assert!(first.get("result").is_some(), "{first}");

    let filler = audit_dir.join("filler");
    // Fill the filesystem: dd stops with ENOSPC, which is the point.
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", filler.display()))
        .args(["bs=4k", "status=none"])
        .status();
    assert_eq!(failures(), 0.0);
    // The log's last page may still hold a record or two: calls go on, each under an
    // instruction of its own, until one's decision cannot be recorded. Whatever the server
    // was sent is the note of a call whose decision is on record.
    let instructions_decided = || -> BTreeSet<String> {
        audit_records(&audit_path)
            .iter()
            .filter(|r| r["tool"] == "write_note" && r["decision"].is_string())
            .filter_map(|r| r["instruction"].as_str().map(str::to_owned))
            .collect()
    };
    let unrecorded = (2..20)
        .find_map(|id| {
            let instruction = format!("full-disk-note-{id}");
            let mut call = note(id, &instruction);
            call["params"]["_meta"] = json!({"io.mcp-guard/instruction": instruction});
            let answer = response_message(&front.in_session("fast", &session, &call));
            if answer.get("result").is_some() {
                return None;
            }
            assert_eq!(answer["error"]["code"], -32012, "{answer}");
            (!instructions_decided().contains(&instruction)).then_some(instruction)
        })
        .expect("every call's decision was recorded on a full filesystem");
    let decided = instructions_decided();
    let written = std::fs::read_to_string(&notes).unwrap_or_default();
    for sent in written.lines().filter(|l| l.starts_with("full-disk-note-")) {
        assert!(
            decided.contains(sent),
            "a call whose decision is not on record reached the server: {sent:?} ({decided:?})"
        );
    }
    assert!(!written.lines().any(|l| l == unrecorded), "{written:?}");
    assert!(failures() >= 1.0, "the failed append was not counted");
    // Nor does a session start unrecorded: its server is stopped and the agent told why.
    let opening = front.initialize_then_ping("fast");
    assert_eq!(opening["initialize"]["status"], 503, "{opening}");
    assert_eq!(
        opening["initialize"]["response"]["error"]["code"], -32012,
        "{opening}"
    );

    std::fs::remove_file(&filler).unwrap();
    let again = response_message(&front.in_session("fast", &session, &note(3, "recorded again")));
    assert!(again.get("result").is_some(), "{again}");
    let written = std::fs::read_to_string(&notes).unwrap_or_default();
    assert!(written.contains("recorded again"), "{written:?}");
    let verify = Command::new(daemon_binary())
        .args(["audit", "verify"])
        .arg(&audit_path)
        .output()
        .expect("audit verify");
    assert!(
        verify.status.success(),
        "the log stays a valid chain across the failure: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// A server that breaks the protocol (a tools/list result without a `tools` array) gets its
/// answer refused, never passed on unfiltered. When it then exits while a request waits for
/// its answer, that request is refused with `-32011` and the session ends. Both refusals are
/// counted in `mcp_guard_upstream_errors_total{server="broken"}`.
#[test]
fn a_list_the_policy_cannot_filter_is_refused() {
    let env = TestEnv::new("proxy-bad-list", PROBE);
    let peers = Peers::require();
    const BROKEN_SERVER: &str = r#"
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message:
        continue
    if message["method"] == "initialize":
        result = {"protocolVersion": message["params"]["protocolVersion"], "capabilities": {"tools": {}},
                  "serverInfo": {"name": "broken", "version": "0"}}
    elif message["method"] == "tools/list":
        result = {"tools": "not a list", "secret_tool": {"name": "hidden"}}
    elif message["method"] == "logging/setLevel":
        sys.exit(3)
    else:
        result = {}
    print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
"#;
    let servers = json!({
        "broken": stdio_server(
            vec!["python3".into(), "-c".into(), BROKEN_SERVER.into()],
            vec![
                list_tools_rule(),
                allow("log-level", json!({"roles": [DEVELOPER], "methods": ["logging/setLevel"]})),
            ],
        ),
    });
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let front = Front::start_with(env, peers, servers, |document| {
        document["daemon"]["metrics_listen"] = json!(metrics.to_string());
    });
    let upstream_errors = || {
        metric(
            &scrape(metrics),
            "mcp_guard_upstream_errors_total",
            &[("server", "broken")],
        )
    };
    let session = front.open_session("broken", HANDSHAKE);
    assert_eq!(upstream_errors(), 0.0);
    let list = response_message(&front.in_session(
        "broken",
        &session,
        &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    ));
    assert_eq!(list["error"]["code"], -32011, "{list}");
    assert!(list.get("result").is_none(), "{list}");
    assert_eq!(upstream_errors(), 1.0);

    // The server exits while a request of the session waits for its answer.
    let set_level = json!({"jsonrpc": "2.0", "id": 3, "method": "logging/setLevel",
        "params": {"level": "debug"}});
    let exited = response_message(&front.in_session("broken", &session, &set_level));
    assert_eq!(exited["error"]["code"], -32011, "{exited}");
    assert_eq!(upstream_errors(), 2.0);
    assert_eq!(
        front.until_session_ended(&session)["detail"]["reason"],
        "server_exited"
    );
}

/// A server's `inputSchema` is the server's word, not to be trusted: validating against a
/// schema whose `$ref`s go round in a circle (a → b → a) never returned with the validator
/// mcp-guard used before (jsonschema 0.33; its process was killed), which would have taken the
/// whole daemon with it. Such a schema constrains nothing: calls to those tools (and to one
/// whose schema is a `$ref` to itself) are checked at once and forwarded, as is a call to a
/// tool with a sound schema, and the daemon serves on.
#[test]
fn a_tool_schema_whose_refs_go_round_in_a_circle_is_checked_and_the_daemon_serves_on() {
    let env = TestEnv::new("proxy-circular-schema", PROBE);
    let peers = Peers::require();
    const CIRCULAR_SERVER: &str = r##"
import json, sys
circle = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}
tools = [{"name": "circle", "inputSchema": circle},
         {"name": "itself", "inputSchema": {"$ref": "#"}},
         {"name": "sound", "inputSchema": {"type": "object"}}]
for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message:
        continue
    if message["method"] == "initialize":
        result = {"protocolVersion": message["params"]["protocolVersion"], "capabilities": {"tools": {}},
                  "serverInfo": {"name": "circular", "version": "0"}}
    elif message["method"] == "tools/list":
        result = {"tools": tools}
    elif message["method"] == "tools/call":
        result = {"content": [{"type": "text", "text": "called " + message["params"]["name"]}]}
    else:
        result = {}
    print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
"##;
    let servers = json!({
        "circular": stdio_server(
            vec!["python3".into(), "-c".into(), CIRCULAR_SERVER.into()],
            vec![
                list_tools_rule(),
                allow("all", json!({"roles": [DEVELOPER], "tools": ["circle", "itself", "sound"]})),
            ],
        ),
    });
    let front = Front::start(env, peers, servers);
    let session = front.open_session("circular", HANDSHAKE);
    let call = |id: i64, tool: &str| {
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": {"name": tool, "arguments": {"x": 1}}});
        response_message(&front.in_session("circular", &session, &body))
    };
    for (id, tool) in [(2, "circle"), (3, "itself"), (4, "sound")] {
        let answer = call(id, tool);
        let text = format!("called {tool}");
        assert_eq!(
            answer["result"]["content"][0]["text"],
            text.as_str(),
            "{answer}"
        );
    }
    assert!(!process_ended(front.daemon.pid()), "the daemon is down");
}

/// A session's server process that exits (killed here) ends the session: its `end` record says
/// `server_exited`, the agent's next request gets 404 (the Streamable HTTP signal to initialise
/// again, where every call would otherwise fail), and the new session gets a new process.
#[test]
fn a_session_whose_server_exits_ends_and_the_next_one_gets_a_new_server() {
    let env = TestEnv::new("proxy-server-exits", PROBE);
    let peers = Peers::require();
    let rules = vec![
        list_tools_rule(),
        allow(
            "time",
            json!({"roles": [DEVELOPER], "tools": ["get_current_time"]}),
        ),
    ];
    let servers = json!({"time": stdio_server(peers.time(), rules)});
    let front = Front::start(env, peers, servers);
    let session = front.open_session("time", HANDSHAKE);
    let pid = front.session_pid("time", &session);
    // SAFETY: kill(2) on a pid, no memory involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);

    assert_eq!(
        front.until_session_ended(&session)["detail"]["reason"],
        "server_exited"
    );
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let answer = front.in_session("time", &session, &list);
    assert_eq!(answer["status"], 404, "{answer}");

    let again = front.session_listing("time", &["get_current_time"]);
    assert_ne!(front.session_pid("time", &again), pid);
}

/// A reviewer runs `policy check` without the daemon's privileges: a secret file only root may
/// read (a server's credential, the front's TLS key, a JWKS) is a warning naming its field
/// (the daemon, as root, reads it), not an error; run as root, the same check reads them all
/// and says nothing of them.
#[test]
fn policy_check_by_a_user_who_may_not_read_a_secret_warns() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let open_to_all = |path: &Path| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap()
    };
    open_to_all(dir.path());
    // A copy the other user can reach, wherever the workspace is.
    let binary = dir.path().join("mcp-guard");
    copy_executable(&daemon_binary(), &binary);
    let root_only = |name: &str, from: &Path| {
        let path = dir.path().join(name);
        std::fs::copy(from, &path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    };
    let secret = dir.path().join("crm-token");
    std::fs::write(&secret, "s3cret").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let tls_testdata =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../mcp-guard/src/transport/testdata");
    let certificate = dir.path().join("front.pem");
    std::fs::copy(tls_testdata.join("front.pem"), &certificate).unwrap();
    open_to_all(&certificate);
    let tls_key = root_only("front-key.pem", &tls_testdata.join("front-key.pem"));
    let jwks = root_only("jwks.json", &identity_testdata("jwks.json"));
    let policy = dir.path().join("policy.json");
    let document = json!({
        "version": 1,
        "daemon": {
            "listen": "127.0.0.1:8443",
            "tls": {"cert_file": certificate, "key_file": tls_key},
        },
        "identity": {"jwt": {"issuers": [{
            "issuer": "https://issuer.example.com",
            "audiences": ["mcp-guard"],
            "keys": {"jwks_file": jwks},
            "algorithms": ["ES256"],
        }]}},
        "servers": {"crm": {
            "url": "https://crm.example.com/mcp",
            "headers": {"Authorization": {"file": secret, "prefix": "Bearer "}},
        }},
    });
    std::fs::write(&policy, document.to_string()).unwrap();
    open_to_all(&policy);

    // Whether `policy check` passed, and all it printed.
    let check = |command: &mut Command| {
        let output = command
            .args(["policy", "check"])
            .arg(&policy)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        (output.status.success(), said)
    };
    let (passed, said) = check(
        Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(&binary),
    );
    assert!(passed, "{said}");
    for field in [
        "servers.crm.headers.Authorization.file",
        "daemon.tls.key_file",
        "identity.jwt.issuers[0].keys.jwks_file",
    ] {
        let warned = said
            .lines()
            .any(|line| line.contains(field) && line.contains("this user may not read it"));
        assert!(warned, "no warning for {field}: {said}");
    }
    // What the reviewer may read is still checked.
    assert!(!said.contains("daemon.tls.cert_file"), "{said}");

    let (passed, said) = check(&mut Command::new(&binary));
    assert!(passed, "{said}");
    assert!(!said.contains("may not read"), "{said}");
}

/// A stdio server's secret comes from a file named in its `env` (server-everything's `get-env`
/// shows what its process got): the file's content, without its final newline, next to a
/// plain value. A variable whose source the daemon's environment lacks refuses the session,
/// naming the variable, and no process starts without it.
#[test]
fn stdio_server_secrets_come_from_files_named_in_env() {
    let env = TestEnv::new("proxy-env-secrets", PROBE);
    let peers = Peers::require();
    let secret = env.dir().join("crm-token");
    std::fs::write(&secret, "token-from-a-file\n").unwrap();
    let rules = vec![
        list_tools_rule(),
        allow("env", json!({"roles": [DEVELOPER], "tools": ["get-env"]})),
    ];
    let mut with_secret = stdio_server(peers.everything(), rules.clone());
    with_secret["env"] = json!({"CRM_TOKEN": {"file": secret}, "CRM_REGION": "eu-west"});
    let mut without = stdio_server(peers.everything(), rules);
    without["env"] = json!({"CRM_TOKEN": {"env": "MCP_GUARD_TEST_SURELY_UNSET"}});
    let servers = json!({"with-secret": with_secret, "without": without});
    let front = Front::start(env, peers, servers);

    let run = front.client(
        "with-secret",
        HANDSHAKE,
        &json!([{"op": "call_tool", "name": "get-env", "arguments": {}}]),
    );
    let environment: Value = serde_json::from_str(text(run.ok(0))).expect("get-env gives JSON");
    assert_eq!(
        environment["CRM_TOKEN"], "token-from-a-file",
        "{environment}"
    );
    assert_eq!(environment["CRM_REGION"], "eu-west", "{environment}");

    let refused = front.initialize_then_ping("without");
    assert_eq!(refused["initialize"]["status"], 502, "{refused}");
    assert_eq!(
        refused["initialize"]["response"]["error"]["code"], -32011,
        "{refused}"
    );
    let initialize = refused["initialize"].to_string();
    assert!(
        initialize.contains("env.CRM_TOKEN") && initialize.contains("MCP_GUARD_TEST_SURELY_UNSET"),
        "{refused}"
    );
    let sessions = std::fs::read_dir(front.env.cgroup_root.join("without"))
        .map(|dir| dir.flatten().map(|entry| entry.path()).collect::<Vec<_>>())
        .unwrap_or_default();
    for session in sessions.iter().filter(|path| path.is_dir()) {
        assert!(
            cgroup_pids(session).is_empty(),
            "a process started without its variable in {}",
            session.display()
        );
    }
}

/// What a `url` server receives in HTTP headers about each call: `MCP-Guard-Call-Id`,
/// `-Session`, `-Principal` and `-Instruction` as the audit log has them, `traceparent` in the
/// call's trace, and `baggage` with the agent's own entries kept and `mcp.instruction` added.
/// The real mcp-server-time logs the headers of every request it gets.
#[test]
fn a_url_server_reads_the_calls_identity_in_its_headers() {
    let env = TestEnv::new("proxy-upstream-identity-headers", PROBE);
    let peers = Peers::require();
    let header_log = env.dir().join("headers.jsonl");
    let (mut upstream, port) =
        start_announcing(&peers.time_http(&["--header-log", header_log.to_str().unwrap()]));
    let servers = json!({"time": url_server(&port, current_time_rules())});
    let front = Front::start(env, peers, servers);
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traceparent = format!("traceparent: {parent}");
    let answer = front.raw(
        "time",
        &[
            "--initialize",
            HANDSHAKE,
            "--header",
            "MCP-Guard-Instruction: instr-headers-1",
            "--header",
            &traceparent,
            "--header",
            "baggage: tenant=acme",
            "--body",
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get_current_time","arguments":{"timezone":"UTC"}}}"#,
        ],
    );
    assert!(response_message(&answer)["result"].is_object(), "{answer}");
    let session = answer["initialize"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    upstream.kill().ok();
    upstream.wait().ok();

    let records = audit_records(&front.env.audit_path());
    let decision = records
        .iter()
        .find(|r| r["tool"] == "get_current_time" && r["decision"] == "allow")
        .unwrap_or_else(|| panic!("no decision record of the call: {records:#?}"));
    let call_id = decision["call_id"].as_str().unwrap();
    let seen: Vec<Value> = std::fs::read_to_string(&header_log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let headers = &seen
        .iter()
        .find(|r| r["headers"]["mcp-guard-call-id"] == call_id)
        .unwrap_or_else(|| panic!("no request carried call id {call_id}: {seen:#?}"))["headers"];
    assert_eq!(headers["mcp-guard-session"], session.as_str(), "{headers}");
    assert_eq!(headers["mcp-guard-principal"], AGENT, "{headers}");
    assert_eq!(
        headers["mcp-guard-instruction"], "instr-headers-1",
        "{headers}"
    );
    assert_eq!(decision["instruction"], "instr-headers-1", "{decision}");
    let forwarded_parent = headers["traceparent"].as_str().unwrap();
    let parts: Vec<&str> = forwarded_parent.split('-').collect();
    assert_eq!(parts.len(), 4, "{headers}");
    assert_eq!(
        parts[1],
        decision["trace_id"].as_str().unwrap(),
        "{headers}"
    );
    assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "{headers}");
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "mcp-guard's span is the parent: {headers}"
    );
    assert_eq!(
        headers["baggage"], "tenant=acme,mcp.instruction=instr-headers-1",
        "{headers}"
    );
}

/// mcp-server-time's tools may be listed, and `get_current_time` called, by developers.
fn current_time_rules() -> Vec<Value> {
    vec![
        list_tools_rule(),
        allow(
            "current-time",
            json!({"roles": [DEVELOPER], "tools": ["get_current_time"]}),
        ),
    ]
}

/// mcp-server-time over Streamable HTTP on `port` (0: a free one), and the port it got.
fn start_time_http(peers: &Peers, port: &str) -> (std::process::Child, String) {
    start_announcing(&peers.time_http(&["--port", port]))
}

/// Starts a peer that announces its port on stderr (one of `tests/clients/`'s HTTP servers),
/// and the port.
fn start_announcing(command: &[String]) -> (std::process::Child, String) {
    let mut peer = Command::new(&command[0])
        .args(&command[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
    let port = announced_port(&mut peer);
    (peer, port)
}

/// A `url` server that restarts no longer knows the session mcp-guard had with it, and answers
/// 404 to its id (as the spec has it): a call that learns it gets -32011 (so may the GET stream
/// mcp-guard reopens), and mcp-guard ends the agent's session too (`"reason": "server_ended_session"`), so the agent's next request
/// gets 404 and it initialises again, reaching the new server, instead of failing call after
/// call.
#[test]
fn a_url_server_that_forgets_its_session_ends_the_agents_session() {
    let env = TestEnv::new("proxy-url-server-restarts", PROBE);
    let peers = Peers::require();
    // A port below the ephemeral range: one `bind(0)` gave could be taken by any outgoing
    // connection while the server restarts.
    let (mut first, port) = start_time_http(&peers, &free_loopback_port().to_string());
    let servers = json!({
        "time": url_server(&port, vec![
            list_tools_rule(),
            allow("time", json!({"roles": [DEVELOPER], "tools": ["get_current_time"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let session = front.open_session("time", HANDSHAKE);
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let listed = response_message(&front.in_session("time", &session, &list));
    assert_eq!(
        tool_names(&listed["result"]),
        set(&["get_current_time"]),
        "{listed}"
    );

    let _ = first.kill();
    let _ = first.wait();
    let (mut second, _) = start_time_http(&front.peers, &port);
    // Whichever reaches the new server first learns it: this call (-32011), or the GET stream
    // mcp-guard reopens after the old one dropped (then this request already gets 404).
    let answer = front.in_session("time", &session, &list);
    if answer["status"] != 404 {
        let refused = response_message(&answer);
        assert_eq!(refused["error"]["code"], -32011, "{refused}");
        assert!(
            refused["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("ended its session")),
            "{refused}"
        );
    }
    assert_eq!(
        front.until_session_ended(&session)["detail"]["reason"],
        "server_ended_session"
    );
    assert_eq!(front.in_session("time", &session, &list)["status"], 404);

    front.session_listing("time", &["get_current_time"]);
    let _ = second.kill();
    let _ = second.wait();
}

/// Concurrent first requests of one stateless session (an agent that sends its first calls in
/// parallel) open it once: the server takes half a second to start, and all six requests,
/// sent meanwhile under one session key, are answered by the one session they name; there is
/// one `start` record and one session open.
#[test]
fn concurrent_first_requests_of_a_stateless_session_open_it_once() {
    let env = TestEnv::new("proxy-stateless-concurrent-open", PROBE);
    let peers = Peers::require();
    let slow_start = format!("sleep 0.5; exec {FAST_SERVER}");
    let servers = json!({
        "fast": stdio_server(vec!["/bin/sh".into(), "-c".into(), slow_start], vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let call = |n: usize| {
        let body = json!({"jsonrpc": "2.0", "id": n, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": format!("call {n}")}}});
        let output = front.raw(
            "fast",
            &[
                "--envelope",
                STATELESS,
                "--header",
                "MCP-Guard-Session: parallel-key",
                "--body",
                &body.to_string(),
            ],
        );
        assert_eq!(output["status"], 200, "call {n}: {output}");
        response_message(&output)
    };
    let answers: Vec<Value> = std::thread::scope(|scope| {
        let calls: Vec<_> = (1..=6).map(|n| scope.spawn(move || call(n))).collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    for (n, answer) in (1..=6).zip(&answers) {
        assert_eq!(
            answer["result"]["content"][0]["text"],
            format!("call {n}"),
            "{answer}"
        );
    }
    let starts: Vec<Value> = audit_records(&front.env.audit_path())
        .into_iter()
        .filter(|r| r["kind"] == "session" && r["detail"]["event"] == "start")
        .collect();
    assert_eq!(starts.len(), 1, "{starts:#?}");
}

/// An agent's response reaches the server only as the answer to a request the server sent
/// it: one with an id the server never used (a guess at a request the server may send another
/// session, or one the policy refused) is accepted (202) and dropped, and what the server
/// received holds it nowhere; the session goes on.
#[test]
fn a_response_to_no_request_of_the_servers_is_not_forwarded() {
    let env = TestEnv::new("proxy-forged-response", PROBE);
    let peers = Peers::require();
    let wire = env.dir().join("wire.jsonl");
    let servers = json!({
        "fast": stdio_server(server_recording_to(&wire, FAST_SERVER), vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let session = front.open_session("fast", HANDSHAKE);
    let forged = json!({"jsonrpc": "2.0", "id": 77, "result": {"roots": [{"uri": "file:///"}]}});
    let accepted = front.in_session("fast", &session, &forged);
    assert_eq!(accepted["status"], 202, "{accepted}");
    let echo = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "after"}}});
    let answer = response_message(&front.in_session("fast", &session, &echo));
    assert_eq!(answer["result"]["content"][0]["text"], "after", "{answer}");
    let received = std::fs::read_to_string(&wire).unwrap_or_default();
    assert!(
        received.contains("\"after\""),
        "the call after it reached the server: {received}"
    );
    assert!(
        !received.contains("file:///"),
        "the forged response reached the server: {received}"
    );
}

/// A stateless agent's very first request may be a call: mcp-guard learns the tool list from a
/// stateless server with the agent's `_meta` envelope (the server refuses requests without it).
/// Session keys are scoped by server: the same key on another endpoint is another session.
#[test]
fn a_stateless_session_may_start_with_a_call() {
    let env = TestEnv::new("proxy-stateless-first-call", PROBE);
    let peers = Peers::require();
    let servers = json!({
        "time": stdio_server(peers.time(), current_time_rules()),
        "fast": stdio_server(vec![FAST_SERVER.to_string()], vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        ]),
    });
    let front = Front::start(env, peers, servers);
    let call = |server: &str, params: Value| {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params});
        let output = front.raw(
            server,
            &[
                "--envelope",
                STATELESS,
                "--header",
                "MCP-Guard-Session: shared-key",
                "--body",
                &body.to_string(),
            ],
        );
        assert_eq!(output["status"], 200, "{server}: {output}");
        response_message(&output)
    };
    let time = call(
        "time",
        json!({"name": "get_current_time", "arguments": {"timezone": "UTC"}}),
    );
    assert!(time.get("error").is_none(), "{time}");
    assert_ne!(time["result"]["isError"], true, "{time}");
    let echo = call(
        "fast",
        json!({"name": "echo", "arguments": {"text": "own session"}}),
    );
    assert_eq!(
        echo["result"]["content"][0]["text"], "own session",
        "the same key on another server's endpoint reached its own session: {echo}"
    );
}
