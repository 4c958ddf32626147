//! What flows beside an agent's own requests passes through the same pipeline (issue 3):
//! requests the server sends the agent (`sampling/createMessage`, `elicitation/create`,
//! `roots/list`) reach the agent only when a rule allows their method, and a refused one is
//! answered to the server with mcp-guard's error; progress notifications reach the agent;
//! an agent's cancellation reaches the server under the id mcp-guard gave the request
//! upstream; and a server that takes longer than `request_timeout_seconds` is given up on
//! (-32011 to the agent, `notifications/cancelled` to the server) without ending the session.
//! How long things last: a call whose agent disconnects still ends on record, and a session
//! idle past `daemon.session_idle_timeout_seconds` is ended (one with a GET stream open is
//! not idle).
//!
//! Against the real `@modelcontextprotocol/server-everything`, driven by the official Python
//! SDK client (`tests/clients/mcp_client.py`, whose `configure` op registers the sampling,
//! elicitation and roots callbacks and reports each invocation), through the daemon's
//! Streamable HTTP front and through `mcp-guard stdio`.
//!
//! Root only (the daemon loads its eBPF programs). The peers come from `cargo xtask setup`;
//! without them these tests fail (never skip) and say so.

use std::net::{Ipv4Addr, SocketAddr};

use mcp_guard_tests::*;
use serde_json::{Value, json};

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
const HANDSHAKE: &str = "2025-11-25";

/// The server-everything tools these tests call.
const TOOLS: [&str; 5] = [
    "echo",
    "trigger-sampling-request",
    "trigger-elicitation-request",
    "get-roots-list",
    "trigger-long-running-operation",
];

/// What the test's sampling callback answers, and the model it names.
const SAMPLED_TEXT: &str = "sampled by the agent's model";
const SAMPLING_MODEL: &str = "mcp-guard-tests";

// ---------------------------------------------------------------------------------------------
// A daemon in front of server-everything
// ---------------------------------------------------------------------------------------------

/// A running daemon with its MCP front and `/metrics` on loopback ports of their own. Fields
/// drop in order: the daemon stops before the environment tears its cgroups and pins down.
struct Guard {
    daemon: Daemon,
    env: TestEnv,
    peers: Peers,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Guard {
    /// `servers` maps a server name to the extra rules it gets beside listing and calling
    /// [`TOOLS`]; every server is server-everything over stdio, one process per session.
    /// `tweak` may change each server's entry (e.g. `request_timeout_seconds`).
    fn start(tag: &str, servers: &[(&str, Vec<Value>)], tweak: impl Fn(&str, &mut Value)) -> Guard {
        let env = TestEnv::new(tag, PROBE);
        let peers = Peers::require();
        let mut entries = serde_json::Map::new();
        for (name, extra_rules) in servers {
            let mut rules = vec![
                list_tools_rule(),
                allow("tools", json!({"roles": [DEVELOPER], "tools": TOOLS})),
            ];
            rules.extend(extra_rules.iter().cloned());
            let mut entry = stdio_server(peers.everything(), rules);
            tweak(name, &mut entry);
            entries.insert(name.to_string(), entry);
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
        let mut document = env.proxy_policy(addr, Value::Object(entries));
        document["daemon"]["metrics_listen"] = json!(metrics.to_string());
        env.write_policy_document(&document);
        let daemon = env.start_daemon();
        Guard {
            daemon,
            env,
            peers,
            addr,
            metrics,
        }
    }

    /// The SDK client over Streamable HTTP through mcp-guard.
    fn client(&self, server: &str, script: &Value) -> ClientRun {
        let url = format!("http://{}/servers/{server}/mcp", self.addr);
        mcp_client(&self.peers, Transport::Http(&url), HANDSHAKE, script)
    }

    /// The SDK client through `mcp-guard stdio`, as an agent would launch it (the server runs
    /// in a cgroup the daemon hands out; records go to the daemon's audit log).
    fn stdio_client(&self, server: &str, script: &Value) -> ClientRun {
        let command = self
            .env
            .stdio_front(server, AGENT, &self.env.control_socket);
        mcp_client(&self.peers, Transport::Stdio(&command), HANDSHAKE, script)
    }

    /// [`Guard::start`] with server-everything as `everything`, one process shared by every
    /// session (`"isolation": "shared"`), and `rules` besides the usual ones.
    fn start_shared(tag: &str, rules: Vec<Value>) -> Guard {
        Guard::start(tag, &[("everything", rules)], |_, entry| {
            entry["isolation"] = json!("shared");
        })
    }

    /// Opens a session on `everything` with a raw `initialize` and sends `body` in it: the
    /// session's id and the answer to `body`.
    fn open_raw_session(&self, body: &str) -> (String, Value) {
        let url = format!("http://{}/servers/everything/mcp", self.addr);
        let opened = raw_http(
            &self.peers,
            &url,
            &["--initialize", HANDSHAKE, "--body", body],
        );
        let session = opened["initialize"]["session_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {opened}"))
            .to_owned();
        (session, response_message(&opened))
    }

    /// The answer to `body`, sent raw in `session` on `everything`.
    fn in_raw_session(&self, session: &str, body: &str) -> Value {
        let url = format!("http://{}/servers/everything/mcp", self.addr);
        let version = format!("MCP-Protocol-Version: {HANDSHAKE}");
        let args = ["--session", session, "--header", &version, "--body", body];
        response_message(&raw_http(&self.peers, &url, &args))
    }

    /// `mcp_guard_decisions_total` for `server` and `method` with this decision and rule.
    fn decisions(&self, server: &str, method: &str, decision: &str, rule: &str) -> f64 {
        metric(
            &scrape(self.metrics),
            "mcp_guard_decisions_total",
            &[
                ("server", server),
                ("method", method),
                ("decision", decision),
                ("rule", rule),
            ],
        )
    }

    fn audit(&self) -> Vec<Value> {
        audit_records(&self.env.audit_path())
    }
}

// ---------------------------------------------------------------------------------------------
// Reading answers and records
// ---------------------------------------------------------------------------------------------

/// The outcome records (`kind` call with an `outcome`) of `tool`, in order.
/// The outcome kinds of the calls of `tools`, tool by tool, each in log order.
fn outcome_kinds<'a>(records: &'a [Value], tools: &[&str]) -> Vec<&'a Value> {
    tools
        .iter()
        .flat_map(|tool| outcomes(records, tool))
        .map(|r| &r["outcome"]["kind"])
        .collect()
}

fn outcomes<'a>(records: &'a [Value], tool: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["kind"] == "call" && r["tool"] == tool && r.get("outcome").is_some())
        .collect()
}

/// Records naming a server→client method.
fn server_request_records<'a>(records: &'a [Value], method: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["method"] == method).collect()
}

/// The server's `method` requests are on record, one decision per server, each tied to the
/// agent's `tool` call that was running when it came (its `call_ids`, its instruction and
/// trace): `expected` lists (server, decision, rule).
fn assert_server_requests_recorded(
    records: &[Value],
    method: &str,
    tool: &str,
    expected: &[(&str, &str, &str)],
) {
    let found = server_request_records(records, method);
    assert_eq!(found.len(), expected.len(), "{records:#?}");
    for (record, (server, decision, rule)) in found.iter().zip(expected) {
        assert_eq!(record["kind"], "call", "{record}");
        assert_eq!(record["server"], *server, "{record}");
        assert_eq!(record["decision"], *decision, "{record}");
        assert_eq!(record["rule"], *rule, "{record}");
        let cause = records
            .iter()
            .find(|r| {
                r["server"] == *server
                    && r["tool"] == tool
                    && r.get("decision").is_some()
                    && r["session"] == record["session"]
            })
            .unwrap_or_else(|| panic!("no {tool} call on {server}: {records:#?}"));
        assert_eq!(record["call_ids"], json!([cause["call_id"]]), "{record}");
        assert_eq!(record["trace_id"], cause["trace_id"], "{record}");
        assert_ne!(record["call_id"], cause["call_id"], "{record}");
    }
}

/// The texts of a tool result's content, joined by newlines.
fn text(result: &Value) -> String {
    result["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no content in {result}"))
        .iter()
        .filter_map(|item| item["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every callback invocation the client reported, over all its lines, in order.
fn callbacks(run: &ClientRun) -> Vec<Value> {
    run.results
        .iter()
        .flat_map(|line| line["callbacks"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The invocations of one callback (`sampling`, `elicitation`, `roots`).
fn invocations(run: &ClientRun, callback: &str) -> Vec<Value> {
    callbacks(run)
        .into_iter()
        .filter(|c| c["callback"] == callback)
        .collect()
}

/// The client's `configure` op registering every callback the tests use.
fn configure_callbacks() -> Value {
    json!({
        "op": "configure",
        "sampling": SAMPLED_TEXT,
        "elicitation": {"name": "Ada Lovelace", "check": true},
        "roots": [{"uri": "file:///srv/guarded-project", "name": "guarded-project"}],
    })
}

/// Asserts `error_text` (what server-everything reports of the error it got) is mcp-guard's
/// policy refusal of `method`.
fn assert_refused_upstream(error_text: &str, method: &str) {
    assert!(
        error_text.contains("-32010")
            && error_text.contains(&format!("mcp-guard refused {method}")),
        "the server did not get mcp-guard's refusal of {method}: {error_text}"
    );
}

/// A request server-everything sends the agent from inside one of its tools.
struct ServerRequest {
    method: &'static str,
    /// The tool that makes the server send it: the script's first call.
    tool: &'static str,
    /// The agent's callback that answers it.
    callback: &'static str,
}

/// The refused half of a server→client request test, and the audit of both halves. On server
/// `closed` the agent's callback was never invoked, the tool reported mcp-guard's refusal of the
/// method, the script's next call (an `echo`) still worked, and the refusal was counted under
/// `denied_by`. Both sessions' calls are on record with what the agent got (a result on `open`,
/// where `allowed_by` let the request through; a tool error on `closed`), and so are the
/// server's requests.
fn assert_refused_and_on_record(
    guard: &Guard,
    closed: &ClientRun,
    request: ServerRequest,
    (allowed_by, denied_by): (&str, &str),
) {
    assert!(
        invocations(closed, request.callback).is_empty(),
        "a refused {} reached the agent: {:?}",
        request.method,
        callbacks(closed)
    );
    let result = closed.ok(1);
    assert_eq!(result["isError"], true, "{result}");
    assert_refused_upstream(&text(result), request.method);
    assert_eq!(text(closed.ok(2)), "Echo: still here");
    assert_eq!(
        guard.decisions("closed", request.method, "deny", denied_by),
        1.0
    );

    let records = guard.audit();
    assert_eq!(
        outcome_kinds(&records, &[request.tool]),
        [&json!("result"), &json!("tool_error")],
        "{records:#?}"
    );
    assert_server_requests_recorded(
        &records,
        request.method,
        request.tool,
        &[("open", "allow", allowed_by), ("closed", "deny", denied_by)],
    );
}

fn rule_for(id: &str, method: &str) -> Value {
    allow(id, json!({"roles": [DEVELOPER], "methods": [method]}))
}

// ---------------------------------------------------------------------------------------------
// Server→client requests
// ---------------------------------------------------------------------------------------------

/// `sampling/createMessage`: where a rule allows it, the server's request reaches the agent's
/// sampling callback and the sampled text comes back in the tool result; where no rule does,
/// the callback is never invoked, the server gets mcp-guard's -32010 (which the tool reports),
/// and the refusal is counted under `default-deny`.
#[test]
fn sampling_reaches_the_agent_only_when_a_rule_allows_it() {
    let guard = Guard::start(
        "server-req-sampling",
        &[
            ("open", vec![rule_for("sampling", "sampling/createMessage")]),
            ("closed", vec![]),
        ],
        |_, _| {},
    );
    let script = json!([
        configure_callbacks(),
        {"op": "call_tool", "name": "trigger-sampling-request",
         "arguments": {"prompt": "summarise the incident", "maxTokens": 50}},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "still here"}},
    ]);

    let open = guard.client("open", &script);
    let result = open.ok(1);
    assert_ne!(result["isError"], true, "{result}");
    let sampled = text(result);
    assert!(
        sampled.contains(SAMPLED_TEXT) && sampled.contains(SAMPLING_MODEL),
        "the tool result lacks the agent's sampled message: {sampled}"
    );
    let asked = invocations(&open, "sampling");
    assert_eq!(asked.len(), 1, "{:?}", callbacks(&open));
    assert_eq!(
        asked[0]["params"]["messages"][0]["content"]["text"],
        "Resource trigger-sampling-request context: summarise the incident",
        "the agent got another request than the server sent: {}",
        asked[0]
    );
    assert_eq!(asked[0]["params"]["maxTokens"], 50, "{}", asked[0]);
    assert_eq!(
        guard.decisions("open", "sampling/createMessage", "allow", "sampling"),
        1.0
    );

    let closed = guard.client("closed", &script);
    assert_eq!(
        guard.decisions("closed", "sampling/createMessage", "allow", "sampling"),
        0.0
    );
    assert_refused_and_on_record(
        &guard,
        &closed,
        ServerRequest {
            method: "sampling/createMessage",
            tool: "trigger-sampling-request",
            callback: "sampling",
        },
        ("sampling", "default-deny"),
    );
}

/// `elicitation/create`: where a rule allows it, the agent's elicitation callback answers and
/// the server reports the accepted content; where a deny rule names the method, the callback
/// is never invoked, the server gets the -32010 naming that rule, and the refusal is counted
/// under it.
#[test]
fn elicitation_reaches_the_agent_only_when_a_rule_allows_it() {
    let guard = Guard::start(
        "server-req-elicitation",
        &[
            ("open", vec![rule_for("elicitation", "elicitation/create")]),
            (
                "closed",
                vec![deny(
                    "no-elicitation",
                    json!({"methods": ["elicitation/create"]}),
                )],
            ),
        ],
        |_, _| {},
    );
    let script = json!([
        configure_callbacks(),
        {"op": "call_tool", "name": "trigger-elicitation-request", "arguments": {}},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "still here"}},
    ]);

    let open = guard.client("open", &script);
    let result = open.ok(1);
    assert_ne!(result["isError"], true, "{result}");
    let reported = text(result);
    assert!(
        reported.contains("- Name: Ada Lovelace") && reported.contains("- Agreed to terms: true"),
        "the server did not get the agent's answer: {reported}"
    );
    let asked = invocations(&open, "elicitation");
    assert_eq!(asked.len(), 1, "{:?}", callbacks(&open));
    assert_eq!(
        asked[0]["params"]["message"], "Please provide inputs for the following fields:",
        "{}",
        asked[0]
    );
    assert_eq!(
        asked[0]["params"]["requestedSchema"]["required"],
        json!(["name"]),
        "{}",
        asked[0]
    );
    assert_eq!(
        guard.decisions("open", "elicitation/create", "allow", "elicitation"),
        1.0
    );

    let closed = guard.client("closed", &script);
    assert_refused_and_on_record(
        &guard,
        &closed,
        ServerRequest {
            method: "elicitation/create",
            tool: "trigger-elicitation-request",
            callback: "elicitation",
        },
        ("elicitation", "no-elicitation"),
    );
}

/// `roots/list`: server-everything asks for the roots on its own shortly after initialize,
/// and again from `get-roots-list` while it has none. Where a rule allows the method, every
/// request counted as allowed reached the agent's roots callback and the tool lists the
/// agent's root; where none does, no request reached the agent and the server has no roots.
#[test]
fn roots_list_reaches_the_agent_only_when_a_rule_allows_it() {
    let guard = Guard::start(
        "server-req-roots",
        &[
            ("open", vec![rule_for("roots", "roots/list")]),
            ("closed", vec![]),
        ],
        |_, _| {},
    );
    let script = json!([
        configure_callbacks(),
        // Past the server's own roots/list after initialize, so that one is judged too.
        {"op": "sleep", "ms": 1000},
        {"op": "call_tool", "name": "get-roots-list", "arguments": {}},
    ]);

    let open = guard.client("open", &script);
    let listed = text(open.ok(2));
    assert!(
        listed.contains("Current MCP Roots (1 total)")
            && listed.contains("guarded-project")
            && listed.contains("file:///srv/guarded-project"),
        "the server did not get the agent's roots: {listed}"
    );
    let asked = invocations(&open, "roots").len();
    assert!(asked >= 1, "{:?}", callbacks(&open));
    assert_eq!(
        guard.decisions("open", "roots/list", "allow", "roots"),
        asked as f64,
        "every allowed roots/list reaches the agent"
    );

    let closed = guard.client("closed", &script);
    assert!(
        invocations(&closed, "roots").is_empty(),
        "a refused roots/list reached the agent: {:?}",
        callbacks(&closed)
    );
    let listed = text(closed.ok(2));
    assert!(
        listed.contains("no roots are currently configured"),
        "the server got roots although roots/list was refused: {listed}"
    );
    assert!(
        guard.decisions("closed", "roots/list", "deny", "default-deny") >= 1.0,
        "the refused roots/list is not counted"
    );
    assert_eq!(
        guard.decisions("closed", "roots/list", "allow", "roots"),
        0.0
    );
}

/// Through `mcp-guard stdio` the same judgements hold: sampling allowed by a rule reaches the
/// agent, elicitation without one does not, and progress notifications come through.
#[test]
fn the_stdio_front_judges_server_requests_the_same_way() {
    let guard = Guard::start(
        "server-req-stdio",
        &[(
            "everything",
            vec![rule_for("sampling", "sampling/createMessage")],
        )],
        |_, _| {},
    );
    let run = guard.stdio_client(
        "everything",
        &json!([
            configure_callbacks(),
            {"op": "call_tool", "name": "trigger-sampling-request",
             "arguments": {"prompt": "over stdio"}},
            {"op": "call_tool", "name": "trigger-elicitation-request", "arguments": {}},
            {"op": "call_tool", "name": "trigger-long-running-operation",
             "arguments": {"duration": 1, "steps": 3}, "progress": true},
        ]),
    );
    let sampled = text(run.ok(1));
    assert!(sampled.contains(SAMPLED_TEXT), "{sampled}");
    assert_eq!(
        invocations(&run, "sampling").len(),
        1,
        "{:?}",
        callbacks(&run)
    );

    let refused = run.ok(2);
    assert_eq!(refused["isError"], true, "{refused}");
    assert_refused_upstream(&text(refused), "elicitation/create");
    assert!(
        invocations(&run, "elicitation").is_empty(),
        "{:?}",
        callbacks(&run)
    );

    assert_eq!(
        text(run.ok(3)),
        "Long running operation completed. Duration: 1 seconds, Steps: 3."
    );
    assert_progress(&run.results[3], 3);

    // The stdio front records to the daemon's log.
    let records = guard.audit();
    assert_eq!(
        outcome_kinds(
            &records,
            &["trigger-sampling-request", "trigger-elicitation-request"]
        ),
        [&json!("result"), &json!("tool_error")],
        "{records:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Progress, cancellation, timeouts
// ---------------------------------------------------------------------------------------------

/// Asserts an op's line holds `steps` progress notifications, 1..=steps of `steps`, in order.
fn assert_progress(line: &Value, steps: u64) {
    let received = line["progress"]
        .as_array()
        .unwrap_or_else(|| panic!("no progress recorded: {line}"));
    let expected: Vec<Value> = (1..=steps)
        .map(|i| json!({"progress": i as f64, "total": steps as f64, "message": null}))
        .collect();
    assert_eq!(received, &expected, "{line}");
}

/// The warning the daemon logs when a server answers a request mcp-guard no longer waits for.
const LATE_ANSWER: &str = "server answered a request mcp-guard did not send; dropped";

fn late_answers(daemon: &Daemon) -> Vec<Value> {
    daemon
        .log
        .lines()
        .into_iter()
        .filter(|l| message(l) == Some(LATE_ANSWER))
        .collect()
}

/// A call made with a progressToken gets every notifications/progress the server sends for
/// it, in order, through the HTTP front, and then its result.
#[test]
fn progress_notifications_reach_the_agent() {
    let guard = Guard::start("server-req-progress", &[("everything", vec![])], |_, _| {});
    let run = guard.client(
        "everything",
        &json!([
            {"op": "call_tool", "name": "trigger-long-running-operation",
             "arguments": {"duration": 2, "steps": 4}, "progress": true},
        ]),
    );
    assert_eq!(
        text(run.ok(0)),
        "Long running operation completed. Duration: 2 seconds, Steps: 4."
    );
    assert_progress(&run.results[0], 4);

    // On the wire: the call's own POST is answered as SSE, its progress first, then the result.
    let url = format!("http://{}/servers/everything/mcp", guard.addr);
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "trigger-long-running-operation", "arguments": {"duration": 1, "steps": 2},
        "_meta": {"progressToken": "p-1"}}});
    let raw = raw_http(
        &guard.peers,
        &url,
        &["--initialize", HANDSHAKE, "--body", &call.to_string()],
    );
    assert_eq!(raw["content_type"], "text/event-stream", "{raw}");
    let (progress, last) = progress_then_answer(&raw);
    let step = |i: u64| (json!("p-1"), json!(i), json!(2));
    assert_eq!(progress, [step(1), step(2)], "{raw}");
    assert_eq!(last["id"], 2, "the answer comes last: {raw}");
    assert!(last["result"].is_object(), "{raw}");
}

/// The progress and the answer a raw POST's SSE stream carried: (token, progress, total) of
/// each progress notification, then the last message.
fn progress_then_answer(raw: &Value) -> (Vec<(Value, Value, Value)>, Value) {
    let messages: Vec<&Value> = raw["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events: {raw}"))
        .iter()
        .map(|event| &event["data"])
        .collect();
    let progress = messages
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .map(|m| {
            let params = &m["params"];
            let field = |name: &str| params[name].clone();
            (field("progressToken"), field("progress"), field("total"))
        })
        .collect();
    let last = (*messages
        .last()
        .unwrap_or_else(|| panic!("no answer: {raw}")))
    .clone();
    (progress, last)
}

/// Two agents on one shared server process call at the same time with the same progress
/// token. Each gets the progress about its own call, under its own token, on its own POST,
/// and none of the other's: mcp-guard sends the server a token of its own per request and
/// puts the agent's back.
#[test]
fn progress_on_a_shared_server_reaches_only_the_call_it_is_about() {
    let guard = Guard::start_shared("server-req-shared-progress", vec![]);
    let url = format!("http://{}/servers/everything/mcp", guard.addr);
    let call = |steps: u64| {
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "trigger-long-running-operation",
            "arguments": {"duration": 1, "steps": steps},
            "_meta": {"progressToken": "same"}}})
        .to_string()
    };
    let (two, three) = std::thread::scope(|scope| {
        let run = |body: String| {
            let (peers, url) = (&guard.peers, &url);
            scope.spawn(move || raw_http(peers, url, &["--initialize", HANDSHAKE, "--body", &body]))
        };
        let (two, three) = (run(call(2)), run(call(3)));
        (two.join().unwrap(), three.join().unwrap())
    });
    for (raw, steps) in [(two, 2u64), (three, 3)] {
        let (progress, answer) = progress_then_answer(&raw);
        let expected: Vec<(Value, Value, Value)> = (1..=steps)
            .map(|i| (json!("same"), json!(i), json!(steps)))
            .collect();
        assert_eq!(progress, expected, "{raw}");
        assert_eq!(answer["id"], 2, "the answer comes last: {raw}");
        assert!(
            answer["result"]["content"][0]["text"]
                .as_str()
                .is_some_and(|t| t.ends_with(&format!("Steps: {steps}."))),
            "{raw}"
        );
    }
}

/// On a shared server too, a resource the agent may not read does not show through its
/// updates. The session subscribes to a hidden and a visible URI (the policy lets it subscribe
/// to any, read only `demo://visible/*`) and turns on server-everything's updates; what its GET
/// stream then carries holds the visible resource's update and not the hidden one's.
#[test]
fn a_shared_servers_resource_updates_reach_only_sessions_that_may_read_them() {
    let rules = subscribe_any_read_visible_rules();
    let guard = Guard::start_shared("server-req-shared-updates", rules);
    let subscribe = |id, uri| request(id, "resources/subscribe", json!({"uri": uri}));
    let (session, _) = guard.open_raw_session(&subscribe(2, "demo://hidden/1"));
    let in_session = |body: &str| {
        let answer = guard.in_raw_session(&session, body);
        assert!(answer["result"].is_object(), "{body}: {answer}");
    };
    in_session(&subscribe(3, "demo://visible/1"));
    let toggle = json!({"name": "toggle-subscriber-updates", "arguments": {}});
    in_session(&request(4, "tools/call", toggle));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let messages = waiting_messages(&guard, &session);
    assert_eq!(
        uris_updated(&messages),
        [json!("demo://visible/1")],
        "{messages:#?}"
    );
    // The server logged each subscription ("Received Subscribe Resource request for URI:
    // demo://hidden/1"): a shared process's log, which cannot say whose work it is about,
    // reaches no agent.
    let logs = messages
        .iter()
        .filter(|message| message["method"] == "notifications/message");
    assert_eq!(logs.count(), 0, "{messages:#?}");
    // Both kinds of withholding are counted, by server and method.
    let metrics = scrape(guard.metrics);
    let withheld = |method| {
        let labels = [("server", "everything"), ("method", method)];
        metric(&metrics, "mcp_guard_notifications_withheld_total", &labels)
    };
    assert!(withheld("notifications/resources/updated") >= 1.0);
    assert!(
        withheld("notifications/message") >= 2.0,
        "one per subscription"
    );
}

/// A JSON-RPC request's text.
fn request(id: u64, method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
}

/// The messages a session's GET stream brings on `everything`: what came while no stream was
/// open (the outbox keeps it), read until 2 s pass without data.
fn waiting_messages(guard: &Guard, session: &str) -> Vec<Value> {
    let url = format!("http://{}/servers/everything/mcp", guard.addr);
    let args = ["--method", "GET", "--session", session, "--timeout", "2"];
    let stream = raw_http(&guard.peers, &url, &args);
    let events = stream["events"].as_array();
    let events = events.unwrap_or_else(|| panic!("no events: {stream}"));
    events.iter().map(|event| event["data"].clone()).collect()
}

/// The URIs of the `notifications/resources/updated` among `messages`, each once:
/// server-everything sends its updates again every 5 s, which a slow read also catches.
fn uris_updated(messages: &[Value]) -> Vec<Value> {
    let mut uris: Vec<Value> = messages
        .iter()
        .filter(|message| message["method"] == "notifications/resources/updated")
        .map(|message| message["params"]["uri"].clone())
        .collect();
    uris.sort_by_key(Value::to_string);
    uris.dedup();
    uris
}

/// A shared server holds one subscription per URI for all its sessions. Sessions A and B
/// subscribe to the same resource, A unsubscribes: B still gets the resource's updates, and A
/// no longer does.
#[test]
fn one_sessions_unsubscribe_on_a_shared_server_leaves_the_others_subscribed() {
    let mut rules = subscribe_any_read_visible_rules();
    rules.push(allow(
        "unsubscribe",
        json!({"roles": [DEVELOPER], "methods": ["resources/unsubscribe"]}),
    ));
    let guard = Guard::start_shared("server-req-shared-unsubscribe", rules);
    let visible = json!({"uri": "demo://visible/1"});
    let subscribe = request(2, "resources/subscribe", visible.clone());
    let (a, subscribed_a) = guard.open_raw_session(&subscribe);
    let (b, subscribed_b) = guard.open_raw_session(&subscribe);
    for answer in [subscribed_a, subscribed_b] {
        assert_eq!(answer["result"], json!({}), "{answer}");
    }
    let unsubscribed = guard.in_raw_session(&a, &request(3, "resources/unsubscribe", visible));
    assert_eq!(unsubscribed["result"], json!({}), "{unsubscribed}");
    let toggle = json!({"name": "toggle-subscriber-updates", "arguments": {}});
    let toggled = guard.in_raw_session(&b, &request(3, "tools/call", toggle));
    assert!(toggled["result"].is_object(), "{toggled}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let updated = |session| uris_updated(&waiting_messages(&guard, session));
    assert_eq!(updated(&b), [json!("demo://visible/1")]);
    assert_eq!(updated(&a), Vec::<Value>::new());
}

/// A shared server keeps every session's tasks in one store; through mcp-guard each session
/// sees only its own. Session A starts a task (server-everything's simulate-research-query);
/// session B cannot get it, fetch its result or see it in `tasks/list` (answered as an
/// unknown task, rule `unknown-reference`), while A can do all three. A's later task calls,
/// sent without an instruction, are on record under the instruction that started the task,
/// with its `task_id`, so `audit trace --instruction` shows them.
#[test]
fn a_shared_servers_tasks_are_seen_only_by_the_session_that_created_them() {
    let rules = vec![
        allow(
            "research",
            json!({"roles": [DEVELOPER], "tools": ["simulate-research-query"]}),
        ),
        allow(
            "tasks",
            json!({"roles": [DEVELOPER], "methods": ["tasks/*"]}),
        ),
    ];
    let guard = Guard::start_shared("server-req-shared-tasks", rules);
    let research = json!({"name": "simulate-research-query", "arguments": {"topic": "tasks"},
        "task": {"ttl": 60000}, "_meta": {"io.mcp-guard/instruction": "research-1"}});
    let (a, created) = guard.open_raw_session(&request(2, "tools/call", research));
    let task_id = created["result"]["task"]["taskId"]
        .as_str()
        .unwrap_or_else(|| panic!("no task created: {created}"))
        .to_owned();
    let get = |id| request(id, "tasks/get", json!({"taskId": task_id}));
    let result = |id| request(id, "tasks/result", json!({"taskId": task_id}));
    let list = |id| request(id, "tasks/list", json!({}));
    let listed = |answer: &Value| -> Vec<Value> {
        let tasks = answer["result"]["tasks"].as_array();
        let tasks = tasks.unwrap_or_else(|| panic!("no task list: {answer}"));
        tasks.iter().map(|task| task["taskId"].clone()).collect()
    };

    let (b, refused) = guard.open_raw_session(&get(2));
    let unknown = format!("Unknown task: {task_id}");
    assert_eq!(refused["error"]["code"], -32602, "{refused}");
    assert_eq!(refused["error"]["message"], unknown.as_str(), "{refused}");
    let refused = guard.in_raw_session(&b, &result(3));
    assert_eq!(refused["error"]["message"], unknown.as_str(), "{refused}");
    assert!(!listed(&guard.in_raw_session(&b, &list(4))).contains(&json!(task_id)));

    let status = guard.in_raw_session(&a, &get(3));
    assert_eq!(status["result"]["taskId"], task_id.as_str(), "{status}");
    assert!(listed(&guard.in_raw_session(&a, &list(4))).contains(&json!(task_id)));
    let report = guard.in_raw_session(&a, &result(5));
    assert!(report["result"]["content"].is_array(), "{report}");
    // Every status of the task reached A, the first one too, which the server sends before
    // the answer that creates the task; none reached B.
    let statuses = |session| -> Vec<Value> {
        let messages = waiting_messages(&guard, session);
        let statuses = messages
            .iter()
            .filter(|message| message["method"] == "notifications/tasks/status");
        statuses
            .map(|status| status["params"]["statusMessage"].clone())
            .collect()
    };
    let of_a = statuses(&a);
    assert!(of_a.contains(&json!("Gathering sources...")), "{of_a:?}");
    assert_eq!(statuses(&b), Vec::<Value>::new());

    let records = guard.audit();
    let refusals = records
        .iter()
        .filter(|r| r["rule"] == "unknown-reference" && r["decision"] == "deny")
        .count();
    assert_eq!(refusals, 2, "{records:#?}");
    let created = outcomes(&records, "simulate-research-query");
    assert_eq!(created.len(), 1, "{records:#?}");
    assert_eq!(created[0]["task_id"], task_id.as_str(), "{records:#?}");
    let of_a = |method: &str| -> Vec<(Value, Value)> {
        let records = records.iter().filter(|r| r["session"] == a.as_str());
        records
            .filter(|r| r["method"] == method && r.get("decision").is_some())
            .map(|r| (r["instruction"].clone(), r["task_id"].clone()))
            .collect()
    };
    let under_the_instruction = vec![(json!("research-1"), json!(task_id))];
    assert_eq!(of_a("tasks/get"), under_the_instruction, "{records:#?}");
    assert_eq!(of_a("tasks/result"), under_the_instruction, "{records:#?}");
    let audit = guard.env.audit_path();
    let trace = mcp_guard(&[
        "audit",
        "trace",
        "--instruction",
        "research-1",
        path_str(&audit),
    ]);
    assert!(trace.status.success(), "{}", trace.report());
    for method in ["simulate-research-query", "tasks/get", "tasks/result"] {
        assert!(trace.stdout.contains(method), "{method}: {}", trace.stdout);
    }
}

/// Shadow and learn modes let through what the policy would refuse, but not another session's
/// task on a shared server: keeping sessions apart is no judgement of the policy. In shadow
/// mode, with no rule for research or tasks, A's task is created and fetched (recorded
/// `would_deny`, forwarded); B naming it is answered as an unknown task and recorded `deny`,
/// as in enforce mode.
#[test]
fn shadow_mode_still_keeps_a_shared_servers_tasks_apart() {
    let guard = Guard::start(
        "server-req-shared-tasks-shadow",
        &[("everything", vec![])],
        |_, entry| {
            entry["isolation"] = json!("shared");
            entry["mode"] = json!("shadow");
        },
    );
    let research = json!({"name": "simulate-research-query", "arguments": {"topic": "tasks"},
        "task": {"ttl": 60000}});
    let (a, created) = guard.open_raw_session(&request(2, "tools/call", research));
    let task_id = created["result"]["task"]["taskId"]
        .as_str()
        .unwrap_or_else(|| panic!("no task created: {created}"))
        .to_owned();
    let named = |id, method| request(id, method, json!({"taskId": task_id}));
    let unknown = format!("Unknown task: {task_id}");
    let (b, refused) = guard.open_raw_session(&named(2, "tasks/get"));
    assert_eq!(refused["error"]["code"], -32602, "{refused}");
    assert_eq!(refused["error"]["message"], unknown.as_str(), "{refused}");
    let refused = guard.in_raw_session(&b, &named(3, "tasks/result"));
    assert_eq!(refused["error"]["message"], unknown.as_str(), "{refused}");
    let status = guard.in_raw_session(&a, &named(3, "tasks/get"));
    assert_eq!(status["result"]["taskId"], task_id.as_str(), "{status}");

    let records = guard.audit();
    let decisions = |session: &str| -> Vec<(Value, Value, Value)> {
        let records = records.iter().filter(|r| r["session"] == session);
        records
            .filter(|r| r["kind"] == "call" && r.get("decision").is_some())
            .filter(|r| r["method"] != "initialize")
            .map(|r| {
                (
                    r["method"].clone(),
                    r["decision"].clone(),
                    r["rule"].clone(),
                )
            })
            .collect()
    };
    let refused_to_b = [("tasks/get", "deny"), ("tasks/result", "deny")]
        .map(|(method, decision)| (json!(method), json!(decision), json!("unknown-reference")));
    assert_eq!(decisions(&b), refused_to_b, "{records:#?}");
    let of_a = decisions(&a);
    assert_eq!(of_a.len(), 2, "{records:#?}");
    assert!(
        of_a.iter().all(|(_, decision, _)| decision == "would_deny"),
        "A's calls were let through as shadow mode does: {of_a:?}"
    );
}

/// The agent abandons a long-running call (the SDK sends notifications/cancelled naming the
/// agent's request id). mcp-guard forwards the cancellation under the id it gave the request
/// upstream, and ends the call then: its outcome is recorded as cancelled, before anything
/// else the session does. The server honours it: it never answers the call (an answer would
/// be logged as one mcp-guard no longer waits for), even after the operation's own end; and
/// the session goes on.
#[test]
fn a_cancelled_call_is_cancelled_upstream_and_ends() {
    let guard = Guard::start("server-req-cancel", &[("everything", vec![])], |_, _| {});
    let run = guard.client(
        "everything",
        &json!([
            {"op": "cancel_tool", "name": "trigger-long-running-operation",
             "arguments": {"duration": 3, "steps": 3}, "after_ms": 700},
            // Past the operation's own end: a server that missed the cancellation answers.
            {"op": "sleep", "ms": 4000},
            {"op": "call_tool", "name": "echo", "arguments": {"message": "after the cancel"}},
        ]),
    );
    assert_eq!(run.ok(0)["cancelled"], true, "{}", run.results[0]);
    assert_eq!(text(run.ok(2)), "Echo: after the cancel");

    let records = guard.audit();
    let cancelled = outcomes(&records, "trigger-long-running-operation");
    assert_eq!(cancelled.len(), 1, "{records:#?}");
    let outcome = &cancelled[0]["outcome"];
    assert_eq!(outcome["kind"], "error", "{outcome}");
    assert!(
        outcome["message"]
            .as_str()
            .is_some_and(|m| m.contains("cancelled by the agent")),
        "{outcome}"
    );
    let echo_decision = records
        .iter()
        .find(|r| r["tool"] == "echo" && r.get("decision").is_some())
        .unwrap_or_else(|| panic!("no decision record for echo: {records:#?}"));
    let seq = |record: &Value| record["seq"].as_u64().expect("seq");
    assert!(
        seq(cancelled[0]) < seq(echo_decision),
        "the cancelled call ended only after the session went on: {records:#?}"
    );
    assert_eq!(
        late_answers(&guard.daemon),
        Vec::<Value>::new(),
        "the server answered the cancelled call: the cancellation did not reach it"
    );
}

/// `request_timeout_seconds: 1` and an operation of 4 s: the agent gets -32011 saying the
/// server did not answer in time, before the operation's last progress; the outcome is
/// recorded as a transport error; mcp-guard cancelled the request upstream, so the server
/// never answers it; and the next call in the same session is answered.
#[test]
fn a_call_over_the_request_timeout_gets_32011_and_the_session_goes_on() {
    let guard = Guard::start(
        "server-req-timeout",
        &[("everything", vec![])],
        |_, entry| {
            entry["request_timeout_seconds"] = json!(1);
        },
    );
    let run = guard.client(
        "everything",
        &json!([
            {"op": "call_tool", "name": "trigger-long-running-operation",
             "arguments": {"duration": 4, "steps": 4}, "progress": true},
            // Past the operation's own end: a server that missed the cancellation answers.
            {"op": "sleep", "ms": 4500},
            {"op": "call_tool", "name": "echo", "arguments": {"message": "after the timeout"}},
        ]),
    );
    let error = run.error(0);
    assert_eq!(error["code"], -32011, "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("did not answer tools/call within 1 s")),
        "{error}"
    );
    let progress = run.results[0]["progress"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", run.results[0]));
    assert!(
        progress.len() < 4,
        "the error came only after the operation finished: {}",
        run.results[0]
    );
    assert_eq!(text(run.ok(2)), "Echo: after the timeout");

    let records = guard.audit();
    let timed_out = outcomes(&records, "trigger-long-running-operation");
    assert_eq!(timed_out.len(), 1, "{records:#?}");
    assert_eq!(
        timed_out[0]["outcome"]["kind"], "transport_error",
        "{records:#?}"
    );
    assert_eq!(timed_out[0]["outcome"]["code"], -32011, "{records:#?}");
    let echoed = outcomes(&records, "echo");
    assert_eq!(echoed.len(), 1, "{records:#?}");
    assert_eq!(echoed[0]["outcome"]["kind"], "result", "{records:#?}");
    assert_eq!(
        late_answers(&guard.daemon),
        Vec::<Value>::new(),
        "the server answered the timed-out call: mcp-guard's cancellation did not reach it"
    );
}

/// An agent that drops its HTTP connection while a call runs has not cancelled it (Streamable
/// HTTP: a disconnection is not a cancellation): the call runs to its end and its outcome is
/// recorded, so the log never holds a decision without an outcome; the session goes on.
#[test]
fn a_call_whose_agent_disconnects_still_ends_with_its_outcome_on_record() {
    let guard = Guard::start(
        "server-req-disconnect",
        &[("everything", vec![])],
        |_, _| {},
    );
    let url = format!("http://{}/servers/everything/mcp", guard.addr);
    let session = open_raw_session(&guard.peers, &url, HANDSHAKE);
    let call = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "trigger-long-running-operation", "arguments": {"duration": 2, "steps": 2}}});
    let body = call.to_string();
    {
        let mut stream = std::net::TcpStream::connect(guard.addr).expect("connect to the front");
        let request = format!(
            "POST /servers/everything/mcp HTTP/1.1\r\nHost: {}\r\n\
             Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
             Mcp-Session-Id: {session}\r\nMCP-Protocol-Version: {HANDSHAKE}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            guard.addr,
            body.len()
        );
        std::io::Write::write_all(&mut stream, request.as_bytes()).expect("send the call");
        // Gone before the server answers: the decision is on record, the call upstream.
        assert!(
            poll_until(TIMEOUT, || guard
                .audit()
                .iter()
                .any(|r| r["tool"] == "trigger-long-running-operation"
                    && r.get("decision").is_some())),
            "no decision record for the call"
        );
    }
    assert!(
        poll_until(TIMEOUT, || !outcomes(
            &guard.audit(),
            "trigger-long-running-operation"
        )
        .is_empty()),
        "the call of the agent that went away has no outcome record: {:#?}",
        guard.audit()
    );
    let records = guard.audit();
    let ended = outcomes(&records, "trigger-long-running-operation");
    assert_eq!(ended.len(), 1, "{records:#?}");
    assert_eq!(ended[0]["outcome"]["kind"], "result", "{records:#?}");
    let echo = json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": "still here"}}});
    let answer = post_in_session(&guard.peers, &url, &session, HANDSHAKE, &echo);
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(
        text(&response_message(&answer)["result"]),
        "Echo: still here",
        "{answer}"
    );
}

/// `daemon.session_idle_timeout_seconds: 2`: a session nobody uses is ended (its `end` record
/// says `idle`, and the agent's next request gets 404, the Streamable HTTP signal to
/// initialise again); a session whose agent holds a GET stream open is listening, not idle,
/// and is ended only once the stream closes.
#[test]
fn idle_sessions_end_but_listening_ones_do_not() {
    let guard = Guard::start("server-req-idle", &[("everything", vec![])], |_, _| {});
    let mut document: Value =
        serde_json::from_str(&std::fs::read_to_string(&guard.env.policy_path).unwrap()).unwrap();
    document["daemon"]["session_idle_timeout_seconds"] = json!(2);
    guard.env.write_policy_document(&document);
    guard.daemon.signal(libc::SIGHUP);
    guard.daemon.wait_for_message("policy reloaded", TIMEOUT);

    let url = format!("http://{}/servers/everything/mcp", guard.addr);
    let idle = open_raw_session(&guard.peers, &url, HANDSHAKE);
    let listening = open_raw_session(&guard.peers, &url, HANDSHAKE);
    let stream = http_request_head(
        guard.addr,
        "GET",
        "/servers/everything/mcp",
        &[
            ("Accept", "text/event-stream"),
            ("Mcp-Session-Id", &listening),
            ("MCP-Protocol-Version", HANDSHAKE),
        ],
    )
    .expect("open the GET stream");
    assert_eq!(stream.status, 200, "GET stream of {listening}");

    let ended = |session: &str| {
        guard.audit().into_iter().find(|r| {
            r["kind"] == "session" && r["session"] == session && r["detail"]["event"] == "end"
        })
    };
    assert!(
        poll_until(TIMEOUT, || ended(&idle).is_some()),
        "the idle session {idle} was not ended: {:#?}",
        guard.audit()
    );
    assert_eq!(ended(&idle).unwrap()["detail"]["reason"], "idle");
    let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
    let answer = post_in_session(&guard.peers, &url, &idle, HANDSHAKE, &ping);
    assert_eq!(answer["status"], 404, "{answer}");
    // Well past the timeout, the listening session is still there.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert!(ended(&listening).is_none(), "{:#?}", guard.audit());
    let answer = post_in_session(&guard.peers, &url, &listening, HANDSHAKE, &ping);
    assert_eq!(answer["status"], 200, "{answer}");

    drop(stream);
    assert!(
        poll_until(TIMEOUT, || ended(&listening).is_some()),
        "the session whose stream closed was not ended: {:#?}",
        guard.audit()
    );
}
