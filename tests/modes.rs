//! Shadow and learn modes end to end (issue 5): a real `mcp-guard run` daemon (HTTP front and
//! kernel egress on) in front of `@modelcontextprotocol/server-everything`, driven by the
//! official Python SDK client and raw HTTP. In `shadow` every judgement is made but a refusal
//! is only recorded (`would_deny`) and the call goes on; lists are not filtered; `learn`
//! records, besides, the caller's roles, a bounded summary of each call's arguments and the
//! server's whole tool catalogue. In both, the kernel lets the server's undeclared connections
//! through and reports them as `would_refuse`. A reload to `enforce` refuses again, on the MCP
//! side and in the kernel, within the sessions already open.
//!
//! Root only; the peers come from `cargo xtask setup`.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};

use mcp_guard_tests::*;
use serde_json::{Value, json};

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
const HANDSHAKE: &str = "2025-11-25";
const SERVER: &str = "everything";
/// The egress rule declaring the `declared` responder, by host name.
const DECLARED_RULE: &str = "declared-localhost";
/// Argument fields the policy's `audit.redact` names.
const REDACTED_FIELD: &str = "data";

/// A daemon serving `everything` in a given mode, with an HTTP responder its egress policy
/// declares (by host name) and one it does not. Fields drop in order: the daemon stops before
/// the environment tears its cgroups and pins down.
struct Guarded {
    daemon: Daemon,
    env: TestEnv,
    peers: Peers,
    addr: SocketAddr,
    metrics: SocketAddr,
    declared: HttpResponder,
    undeclared: HttpResponder,
}

impl Guarded {
    /// `mode`: the server's `mode`, or `None` for the default (`enforce`).
    fn start(tag: &str, mode: Option<&str>) -> Guarded {
        let env = TestEnv::new(tag, PROBE);
        let peers = Peers::require();
        let declared = HttpResponder::start(LOCALHOST_V4);
        let undeclared = HttpResponder::start(LOCALHOST_V4);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
        env.write_policy_document(&document(&env, &peers, addr, metrics, &declared, mode));
        let daemon = env.start_daemon();
        Guarded {
            daemon,
            env,
            peers,
            addr,
            metrics,
            declared,
            undeclared,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/servers/{SERVER}/mcp", self.addr)
    }

    fn client(&self, script: &Value) -> ClientRun {
        mcp_client(&self.peers, Transport::Http(&self.url()), HANDSHAKE, script)
    }

    /// The SDK client through the stdio front (`mcp-guard stdio`) as [`AGENT`], placed by the
    /// daemon.
    fn stdio_client(&self, script: &Value) -> ClientRun {
        let front = self
            .env
            .stdio_front(SERVER, AGENT, &self.env.control_socket);
        mcp_client(&self.peers, Transport::Stdio(&front), HANDSHAKE, script)
    }

    /// Rewrites the policy with the server in `mode` and waits for the daemon to apply it.
    fn reload(&self, mode: Option<&str>) {
        let mark = self.daemon.log.mark();
        let document = document(
            &self.env,
            &self.peers,
            self.addr,
            self.metrics,
            &self.declared,
            mode,
        );
        self.env.write_policy_document(&document);
        self.daemon.sighup();
        self.daemon
            .wait_for_since(mark, TIMEOUT, "\"policy reloaded\"", |line| {
                message(line) == Some("policy reloaded")
            });
    }

    fn records(&self) -> Vec<Value> {
        audit_records(&self.env.audit_path())
    }

    /// The egress records of connections to `port`, once `count` of them are in the log.
    fn egress_records_to(&self, port: u16, count: usize) -> Vec<Value> {
        let mut found = Vec::new();
        let arrived = poll_until(TIMEOUT, || {
            found = self
                .records()
                .into_iter()
                .filter(|r| r["kind"] == "egress" && r["port"] == port)
                .collect();
            found.len() >= count
        });
        assert!(
            arrived,
            "expected {count} egress records to port {port}, found {}: {found:#?}",
            found.len()
        );
        found
    }

    /// The `fetch` tool's call of `url` (server-everything downloads it).
    fn fetch(url: &str) -> Value {
        json!({"op": "call_tool", "name": "gzip-file-as-resource",
               "arguments": {"name": "fetched.gz", "data": url}})
    }
}

/// The policy: `everything` (in `mode`) may reach `declared` by the name `localhost`; the
/// developer may list tools, echo and fetch, but not echo a secret; `get-sum` is allowed to
/// nobody. Arguments named [`REDACTED_FIELD`] are redacted.
fn document(
    env: &TestEnv,
    peers: &Peers,
    addr: SocketAddr,
    metrics: SocketAddr,
    declared: &HttpResponder,
    mode: Option<&str>,
) -> Value {
    let mut server = json!({
        "command": peers.everything(),
        "egress": [{"id": DECLARED_RULE, "host": "localhost",
                    "ports": [declared.addr.port()], "protocols": ["tcp"]}],
        "rules": [
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
            allow("fetch", json!({"roles": [DEVELOPER], "tools": ["gzip-file-as-resource"]})),
            deny("no-secrets", json!({
                "tools": ["echo"],
                "arguments": {
                    "type": "object",
                    "required": ["message"],
                    "properties": {"message": {"type": "string", "pattern": "secret"}},
                },
            })),
        ],
    });
    if let Some(mode) = mode {
        server["mode"] = json!(mode);
    }
    let mut document = env.proxy_policy(addr, json!({ SERVER: server }));
    document["daemon"]["metrics_listen"] = json!(metrics.to_string());
    document["audit"]["redact"] = json!([REDACTED_FIELD]);
    document
}

fn text(result: &Value) -> &str {
    result["content"][0]["text"].as_str().unwrap_or_default()
}

fn tool_names(list_result: &Value) -> BTreeSet<String> {
    list_result["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect()
}

/// The decision record of the `nth` tools/call of `tool` (in log order), and its outcome
/// record (none for a call that was refused).
fn nth_call<'a>(records: &'a [Value], tool: &str, nth: usize) -> (&'a Value, Option<&'a Value>) {
    let decision = records
        .iter()
        .filter(|r| r["method"] == "tools/call" && r["tool"] == tool && !r["decision"].is_null())
        .nth(nth)
        .unwrap_or_else(|| panic!("fewer than {} decisions on {tool}", nth + 1));
    let outcome = records
        .iter()
        .find(|r| r["call_id"] == decision["call_id"] && !r["outcome"].is_null());
    (decision, outcome)
}

/// The outcome record of a call that went ahead.
fn forwarded<'a>(call: (&'a Value, Option<&'a Value>)) -> (&'a Value, &'a Value) {
    let (decision, outcome) = call;
    (
        decision,
        outcome
            .unwrap_or_else(|| panic!("no outcome record: the call was not forwarded: {decision}")),
    )
}

fn tools_list_outcomes(records: &[Value]) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["method"] == "tools/list" && !r["outcome"].is_null())
        .collect()
}

/// The tools a tools/list result offered, as `tools_seen` should record them.
fn expected_tools_seen(list_result: &Value) -> Value {
    let tools: Vec<Value> = list_result["tools"]
        .as_array()
        .expect("tools array")
        .iter()
        .map(|tool| {
            let mut seen = json!({"name": tool["name"]});
            for (hint, field) in [
                ("readOnlyHint", "read_only"),
                ("destructiveHint", "destructive"),
            ] {
                if let Some(value) = tool["annotations"][hint].as_bool() {
                    seen[field] = json!(value);
                }
            }
            seen
        })
        .collect();
    Value::Array(tools)
}

// ---------------------------------------------------------------------------------------------
// (a) shadow
// ---------------------------------------------------------------------------------------------

/// In shadow mode a call enforce would refuse (a deny rule, a tool no rule lets the caller
/// see, arguments that break the tool's inputSchema) reaches the server and returns its real
/// answer; its decision record says `would_deny` with the rule and reason enforce would have
/// given. tools/list is not filtered, and its outcome record lists every tool offered.
#[test]
fn shadow_mode_forwards_what_enforce_would_deny_and_records_why() {
    let guarded = Guarded::start("modes-shadow", Some("shadow"));
    let run = guarded.client(&json!([
        {"op": "list_tools"},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "the secret plan"}},
        {"op": "call_tool", "name": "get-sum", "arguments": {"a": 20, "b": 22}},
        {"op": "call_tool", "name": "echo", "arguments": {"message": 7}},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "hello"}},
    ]));

    // Unfiltered: no rule lets the developer see get-sum, yet it is listed.
    let listed = run.ok(0);
    let names = tool_names(listed);
    for tool in ["echo", "get-sum", "gzip-file-as-resource"] {
        assert!(names.contains(tool), "{tool} missing from {names:?}");
    }
    // The real answers of calls enforce would refuse.
    assert_eq!(text(run.ok(1)), "Echo: the secret plan");
    assert!(text(run.ok(2)).contains("42"), "get-sum: {}", run.ok(2));
    assert_eq!(text(run.ok(4)), "Echo: hello");

    let records = guarded.records();
    let (secret, secret_outcome) = forwarded(nth_call(&records, "echo", 0));
    assert_eq!(secret["decision"], "would_deny", "{secret}");
    assert_eq!(secret["rule"], "no-secrets", "{secret}");
    assert!(
        secret["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no-secrets")),
        "{secret}"
    );
    assert_eq!(secret["mode"], "shadow", "{secret}");
    assert_eq!(secret["roles"], json!([DEVELOPER]), "{secret}");
    assert!(
        secret.get("argument_shapes").is_none(),
        "shapes are learn-only: {secret}"
    );
    assert_eq!(secret_outcome["outcome"]["kind"], "result");
    assert_eq!(secret_outcome["mode"], "shadow", "{secret_outcome}");

    let (hidden, hidden_outcome) = forwarded(nth_call(&records, "get-sum", 0));
    assert_eq!(hidden["decision"], "would_deny", "{hidden}");
    assert_eq!(hidden["rule"], "unknown-tool", "{hidden}");
    assert_eq!(hidden_outcome["outcome"]["kind"], "result");

    let (malformed, malformed_outcome) = forwarded(nth_call(&records, "echo", 1));
    assert_eq!(malformed["decision"], "would_deny", "{malformed}");
    assert_eq!(malformed["rule"], "echo", "{malformed}");
    assert!(
        malformed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("inputSchema")),
        "{malformed}"
    );
    // It reached the server, which judged the arguments itself.
    assert!(
        malformed_outcome["outcome"]["kind"] != "transport_error",
        "{malformed_outcome}"
    );

    let (allowed, _) = nth_call(&records, "echo", 2);
    assert_eq!(allowed["decision"], "allow", "{allowed}");
    assert_eq!(allowed["rule"], "echo", "{allowed}");
    assert_eq!(allowed["mode"], "shadow", "{allowed}");

    let lists = tools_list_outcomes(&records);
    assert_eq!(lists.len(), 1, "{lists:#?}");
    assert_eq!(lists[0]["tools_seen"], expected_tools_seen(listed));
    assert!(
        lists[0]["tools_seen"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "echo", "read_only": true, "destructive": false})),
        "server-everything annotates echo as read-only: {}",
        lists[0]["tools_seen"]
    );

    let scrape = scrape(guarded.metrics);
    let would_deny = |rule: &str| {
        metric(
            &scrape,
            "mcp_guard_decisions_total",
            &[
                ("server", SERVER),
                ("decision", "would_deny"),
                ("rule", rule),
            ],
        )
    };
    assert_eq!(would_deny("no-secrets"), 1.0);
    assert_eq!(would_deny("unknown-tool"), 1.0);
    assert_eq!(would_deny("echo"), 1.0);

    // The stdio front runs the same pipeline, and records through the daemon.
    let run = guarded.stdio_client(&json!([
        {"op": "list_tools"},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "stdio secret"}},
    ]));
    assert!(tool_names(run.ok(0)).contains("get-sum"), "{}", run.ok(0));
    assert_eq!(text(run.ok(1)), "Echo: stdio secret");
    let records = guarded.records();
    let (stdio_secret, _) = forwarded(nth_call(&records, "echo", 3));
    assert_eq!(stdio_secret["decision"], "would_deny", "{stdio_secret}");
    assert_eq!(stdio_secret["rule"], "no-secrets", "{stdio_secret}");
    assert_eq!(stdio_secret["mode"], "shadow", "{stdio_secret}");
    assert_eq!(stdio_secret["roles"], json!([DEVELOPER]), "{stdio_secret}");
    assert_ne!(stdio_secret["session"], secret["session"]);
}

// ---------------------------------------------------------------------------------------------
// (b) learn
// ---------------------------------------------------------------------------------------------

/// Learn mode records, on each call's decision, the caller's roles and a bounded summary of
/// its arguments (short strings and numbers as they are, long or redacted strings as their
/// length), besides what shadow records.
#[test]
fn learn_mode_records_roles_argument_shapes_and_the_catalogue() {
    let guarded = Guarded::start("modes-learn", Some("learn"));
    let long = "x".repeat(100);
    let url = guarded.declared.url("/learn");
    let run = guarded.client(&json!([
        {"op": "list_tools"},
        {"op": "call_tool", "name": "get-sum", "arguments": {"a": 2, "b": 3}},
        {"op": "call_tool", "name": "echo", "arguments": {"message": long}},
        Guarded::fetch(&url),
        {"op": "call_tool", "name": "echo", "arguments": {"message": "a secret"}},
    ]));
    assert!(text(run.ok(1)).contains('5'), "{}", run.ok(1));
    assert_eq!(text(run.ok(2)), format!("Echo: {long}"));
    assert_ne!(
        run.ok(3)["isError"],
        true,
        "the fetch failed: {}",
        run.ok(3)
    );
    assert_eq!(text(run.ok(4)), "Echo: a secret");

    let records = guarded.records();
    let (sum, sum_outcome) = forwarded(nth_call(&records, "get-sum", 0));
    assert_eq!(sum["decision"], "would_deny", "{sum}");
    assert_eq!(sum["mode"], "learn", "{sum}");
    assert_eq!(sum["roles"], json!([DEVELOPER]), "{sum}");
    assert_eq!(sum["argument_shapes"], json!({"a": 2, "b": 3}), "{sum}");
    assert_eq!(sum_outcome["mode"], "learn", "{sum_outcome}");
    assert!(
        sum_outcome.get("argument_shapes").is_none() && sum_outcome.get("roles").is_none(),
        "shapes and roles are on decisions only: {sum_outcome}"
    );

    let (echo, _) = nth_call(&records, "echo", 0);
    assert_eq!(echo["decision"], "allow", "{echo}");
    assert_eq!(
        echo["argument_shapes"],
        json!({"message": {"type": "string", "length": 100}}),
        "{echo}"
    );

    let (fetch, _) = nth_call(&records, "gzip-file-as-resource", 0);
    let url_chars = url.chars().count();
    assert!(url_chars <= 64, "the URL must be short enough to be kept");
    assert_eq!(
        fetch["argument_shapes"],
        json!({"name": "fetched.gz", REDACTED_FIELD: {"type": "string", "length": url_chars}}),
        "a redacted field keeps only its length: {fetch}"
    );

    let (secret, _) = nth_call(&records, "echo", 1);
    assert_eq!(secret["decision"], "would_deny", "{secret}");
    assert_eq!(secret["rule"], "no-secrets", "{secret}");
    assert_eq!(secret["argument_shapes"], json!({"message": "a secret"}));

    // Decisions on other methods carry roles and mode but no shapes.
    let list_decision = records
        .iter()
        .find(|r| r["method"] == "tools/list" && !r["decision"].is_null())
        .expect("tools/list decision");
    assert_eq!(list_decision["roles"], json!([DEVELOPER]));
    assert!(list_decision.get("argument_shapes").is_none());
    let lists = tools_list_outcomes(&records);
    assert_eq!(lists[0]["tools_seen"], expected_tools_seen(run.ok(0)));

    let audit = guarded.env.audit_path();
    mcp_guard(&["audit", "verify", path_str(&audit)]).assert_success();
}

// ---------------------------------------------------------------------------------------------
// (c) the kernel in learn mode
// ---------------------------------------------------------------------------------------------

/// A server in learn mode reaches a destination no egress rule declares: the connect succeeds
/// (no EPERM), both for a probe in the server's cgroup and for the server's own fetch, and the
/// audit log has an egress record `would_refuse` in mode `learn`; the declared destination
/// is `allow`ed. Records of connections to an address resolved for a `host` rule name it.
#[test]
fn learn_mode_lets_undeclared_connections_through_and_reports_them() {
    let guarded = Guarded::start("modes-kernel", Some("learn"));
    let target = Listener::tcp(LOCALHOST_V4);
    let attempt = attempt(
        "tcp",
        SocketAddr::from((Ipv4Addr::LOCALHOST, target.port())),
    );
    let run = guarded.env.exec_probe(SERVER, None, &[&attempt]);
    run.assert_success().assert_results(&[(&attempt, "ok")]);
    let (pid, _) = run.identity();
    target.assert_reached_by(pid, &attempt);
    let records = guarded.egress_records_to(target.port(), 1);
    let record = &records[0];
    assert_eq!(record["verdict"], "would_refuse", "{record}");
    assert_eq!(record["mode"], "learn", "{record}");
    assert_eq!(record["rule"], "default-deny", "{record}");
    assert_eq!(record["pid"], pid, "{record}");
    guarded
        .daemon
        .wait_for_event("the probe's would_refuse connect", |e| {
            as_u64(field(e, "tgid")) == Some(pid) && field(e, "verdict") == "would_refuse"
        });

    let run = guarded.client(&json!([
        Guarded::fetch(&guarded.undeclared.url("/undeclared")),
        Guarded::fetch(&guarded.declared.url("/declared")),
    ]));
    assert_ne!(
        run.ok(0)["isError"],
        true,
        "undeclared fetch: {}",
        run.ok(0)
    );
    assert_ne!(run.ok(1)["isError"], true, "declared fetch: {}", run.ok(1));
    assert!(guarded.undeclared.wait_for_requests(1));

    let records = guarded.records();
    let (undeclared_call, _) = nth_call(&records, "gzip-file-as-resource", 0);
    let undeclared = guarded.egress_records_to(guarded.undeclared.addr.port(), 1);
    assert_eq!(
        undeclared[0]["verdict"], "would_refuse",
        "{}",
        undeclared[0]
    );
    assert_eq!(undeclared[0]["mode"], "learn");
    assert_eq!(undeclared[0]["call_id"], undeclared_call["call_id"]);
    // The address is one `localhost` resolved to, though no rule allows this port.
    assert_eq!(undeclared[0]["host"], "localhost", "{}", undeclared[0]);
    let declared = guarded.egress_records_to(guarded.declared.addr.port(), 1);
    assert_eq!(declared[0]["verdict"], "allow", "{}", declared[0]);
    assert_eq!(declared[0]["host"], "localhost", "{}", declared[0]);
    assert_eq!(
        declared[0]["rule"],
        format!("{SERVER}/egress/{DECLARED_RULE}")
    );
    assert_eq!(declared[0]["mode"], "learn");

    let scrape = scrape(guarded.metrics);
    assert!(
        metric(
            &scrape,
            "mcp_guard_egress_attempts_total",
            &[
                ("server", SERVER),
                ("verdict", "would_refuse"),
                ("protocol", "tcp")
            ],
        ) >= 2.0
    );
    assert_eq!(
        metric(
            &scrape,
            "mcp_guard_egress_attempts_total",
            &[("server", SERVER), ("verdict", "refuse")],
        ),
        0.0
    );

    // `audit trace` of the session shows the connection as would_refuse, in learn mode.
    let session = undeclared_call["session"].as_str().unwrap();
    let audit = guarded.env.audit_path();
    let trace = mcp_guard(&["audit", "trace", "--session", session, path_str(&audit)]);
    trace.assert_success();
    assert!(
        trace.stdout.contains("would_refuse") && trace.stdout.contains("[learn]"),
        "audit trace: {}",
        trace.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// (d) reload from learn to enforce
// ---------------------------------------------------------------------------------------------

/// One session, opened in learn mode: a secret echo and an undeclared fetch go through. After
/// a reload to enforce, in the same session (the same server process, in the same cgroup),
/// the echo is refused by its rule and the kernel refuses the fetch's connection.
#[test]
fn reload_from_learn_to_enforce_refuses_again_in_open_sessions() {
    let guarded = Guarded::start("modes-reload", Some("learn"));
    let url = guarded.url();
    let session = open_raw_session(&guarded.peers, &url, HANDSHAKE);
    let call = |id: i64, name: &str, arguments: Value| {
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                          "params": {"name": name, "arguments": arguments}});
        response_message(&post_in_session(
            &guarded.peers,
            &url,
            &session,
            HANDSHAKE,
            &body,
        ))
    };
    let echo_secret = || json!({"message": "the secret"});
    let fetch = |path: &str| json!({"name": "f.gz", "data": guarded.undeclared.url(path)});

    let echoed = call(1, "echo", echo_secret());
    assert_eq!(text(&echoed["result"]), "Echo: the secret", "{echoed}");
    let fetched = call(2, "gzip-file-as-resource", fetch("/before"));
    assert_ne!(fetched["result"]["isError"], true, "{fetched}");
    assert_eq!(
        guarded.egress_records_to(guarded.undeclared.addr.port(), 1)[0]["verdict"],
        "would_refuse"
    );
    // The session's cgroup is guarded record-only (the pinned map says so)...
    let status = guarded.env.status();
    assert_eq!(status["guarded_cgroups"], 1, "{status}");
    assert_eq!(status["record_only_cgroups"], 1, "{status}");

    guarded.reload(None);

    // ... and enforcing after the reload, still the same one cgroup.
    let status = guarded.env.status();
    assert_eq!(status["guarded_cgroups"], 1, "{status}");
    assert_eq!(status["record_only_cgroups"], 0, "{status}");

    let refused = call(3, "echo", echo_secret());
    assert_eq!(refused["error"]["code"], -32010, "{refused}");
    assert_eq!(refused["error"]["data"]["rule"], "no-secrets", "{refused}");
    let blocked = call(4, "gzip-file-as-resource", fetch("/after"));
    assert!(
        blocked["error"].is_object() || blocked["result"]["isError"] == true,
        "the fetch cannot have succeeded under enforce: {blocked}"
    );
    let records = guarded.egress_records_to(guarded.undeclared.addr.port(), 2);
    let after = records.last().unwrap();
    assert_eq!(after["verdict"], "refuse", "{after}");
    assert!(after.get("mode").is_none(), "enforce has no mode: {after}");
    assert_eq!(after["session"], session, "{after}");
    assert_eq!(records[0]["session"], session);
    assert!(
        !guarded
            .undeclared
            .request_lines()
            .iter()
            .any(|l| l.contains("/after")),
        "the refused connection reached the responder"
    );

    let all = guarded.records();
    let (before, _) = forwarded(nth_call(&all, "echo", 0));
    assert_eq!(before["decision"], "would_deny", "{before}");
    assert_eq!(before["mode"], "learn", "{before}");
    let (after, outcome) = nth_call(&all, "echo", 1);
    assert_eq!(after["decision"], "deny", "{after}");
    assert!(after.get("mode").is_none(), "enforce has no mode: {after}");
    assert!(
        outcome.is_none(),
        "a refused call has no outcome: {outcome:?}"
    );
}
