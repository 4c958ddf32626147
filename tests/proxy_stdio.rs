//! The proxy's stdio front, `mcp-guard stdio --server NAME --policy FILE`: what an agent
//! launches instead of the server. With a daemon on the host the server process is placed in
//! a guarded cgroup through the daemon's control socket; without one the front still enforces
//! the policy and says on stderr that kernel enforcement is off.
//!
//! Root only (the daemon loads its eBPF programs). The real peers come from
//! `cargo xtask setup`; without them these tests fail (never skip) and say so.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;

use mcp_guard_tests::*;
use serde_json::{Value, json};

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
const FAST_SERVER: &str = env!("CARGO_BIN_EXE_mcp-fast-server");
const HANDSHAKE: &str = "2025-11-25";

/// The policy with `servers`; the HTTP front is not used here.
fn write_policy(env: &TestEnv, servers: Value) {
    let unused = std::net::SocketAddr::from(([127, 0, 0, 1], free_loopback_port()));
    env.write_policy_document(&env.proxy_policy(unused, servers));
}

/// The policy with mcp-server-time as `time`: its tools listed, `get_current_time` allowed to
/// developers (rule `time`), and `rules` besides.
fn write_time_policy(env: &TestEnv, peers: &Peers, rules: Vec<Value>) {
    let mut all = vec![
        list_tools_rule(),
        allow(
            "time",
            json!({"roles": [DEVELOPER], "tools": ["get_current_time"]}),
        ),
    ];
    all.extend(rules);
    write_policy(env, json!({"time": stdio_server(peers.time(), all)}));
}

/// The policy with server-everything as `everything`, its tools listed and `rules` besides.
fn write_everything_policy(env: &TestEnv, peers: &Peers, rules: Vec<Value>) {
    write_everything_policy_in_mode(env, peers, rules, "enforce");
}

/// [`write_everything_policy`], with the server in `mode`.
fn write_everything_policy_in_mode(env: &TestEnv, peers: &Peers, rules: Vec<Value>, mode: &str) {
    let mut all = vec![list_tools_rule()];
    all.extend(rules);
    let mut server = stdio_server(peers.everything(), all);
    server["mode"] = json!(mode);
    write_policy(env, json!({ "everything": server }));
}

fn text(result: &Value) -> &str {
    result["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text content in {result}"))
}

/// With the daemon running, the SDK client talks to server-filesystem through `mcp-guard
/// stdio`: the allowed read returns the file, the write a rule refuses is answered -32010
/// naming the rule and never happens, a tool nobody allowed is unknown. The daemon records
/// the front's decisions as its own: arguments kept as the daemon's policy says
/// (`store_arguments` with `content` redacted), and each decision counted in its `/metrics`.
#[test]
fn stdio_front_enforces_the_policy() {
    let env = TestEnv::new("stdio-front-policy", PROBE);
    let peers = Peers::require();
    let root = env.files_dir(Some("through the stdio front\n"));
    write_policy(
        &env,
        json!({
            "files": stdio_server(peers.filesystem(&root), vec![
                list_tools_rule(),
                allow("read-files", json!({"roles": [DEVELOPER], "tools": ["read_text_file"]})),
                allow("write-files", json!({"roles": [DEVELOPER], "tools": ["write_file"]})),
                deny("no-config-writes", json!({
                    "tools": ["write_file"],
                    "arguments": {"type": "object",
                                  "properties": {"path": {"type": "string", "pattern": "\\.conf$"}},
                                  "required": ["path"]},
                })),
            ]),
        }),
    );
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_loopback_port()));
    edit_policy(&env, |document| {
        document["daemon"]["metrics_listen"] = json!(metrics.to_string());
        document["audit"]["store_arguments"] = json!(true);
        document["audit"]["redact"] = json!(["content"]);
    });
    let _daemon = env.start_daemon();
    let command = env.stdio_front("files", AGENT, &env.control_socket);
    let path = |name: &str| root.join(name).display().to_string();
    let run = mcp_client(
        &peers,
        Transport::Stdio(&command),
        HANDSHAKE,
        &json!([
            {"op": "list_tools"},
            {"op": "call_tool", "name": "read_text_file", "arguments": {"path": path("readme.txt")}},
            {"op": "call_tool", "name": "write_file",
             "arguments": {"path": path("app.conf"), "content": "must never be written"}},
            {"op": "call_tool", "name": "move_file",
             "arguments": {"source": path("readme.txt"), "destination": path("moved.txt")}},
            {"op": "call_tool", "name": "no_such_tool", "arguments": {}},
        ]),
    );
    let names: Vec<&str> = run.ok(0)["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.contains(&"read_text_file") && names.contains(&"write_file"),
        "{names:?}"
    );
    assert_eq!(text(run.ok(1)), "through the stdio front\n");
    let refused = run.error(2);
    assert_eq!(refused["code"], -32010, "{refused}");
    assert_eq!(refused["data"]["rule"], "no-config-writes", "{refused}");
    assert!(
        !root.join("app.conf").exists(),
        "the refused write happened"
    );
    let hidden = run.error(3);
    assert_eq!(hidden["code"], -32602, "{hidden}");
    assert_eq!(hidden["message"], "Unknown tool: move_file", "{hidden}");
    assert!(
        root.join("readme.txt").exists() && !root.join("moved.txt").exists(),
        "the refused move happened"
    );

    let records = audit_records(&env.audit_path());
    let write = records
        .iter()
        .find(|r| r["tool"] == "write_file" && r.get("decision").is_some())
        .unwrap_or_else(|| panic!("no decision record of the write: {records:#?}"));
    assert_eq!(
        write["arguments"],
        json!({"path": path("app.conf"), "content": "[redacted]"}),
        "{write}"
    );
    let scraped = scrape(metrics);
    let decisions = |tool: &str, decision: &str, rule: &str| {
        metric(
            &scraped,
            "mcp_guard_decisions_total",
            &[
                ("server", "files"),
                ("method", "tools/call"),
                ("tool", tool),
                ("decision", decision),
                ("rule", rule),
            ],
        )
    };
    assert_eq!(decisions("read_text_file", "allow", "read-files"), 1.0);
    assert_eq!(decisions("write_file", "deny", "no-config-writes"), 1.0);
    // move_file is named by no rule, but the server listed it (the front says so): a label
    // value of its own, as for the daemon's own sessions. A name the server never listed is
    // not.
    assert_eq!(decisions("move_file", "deny", "unknown-tool"), 1.0);
    assert_eq!(decisions("other", "deny", "unknown-tool"), 1.0);
}

/// With the daemon running, the server behind the stdio front runs in a guarded session
/// cgroup the daemon hands out: its fetch of an undeclared loopback address is refused by
/// the kernel, never arrives, and the daemon's egress event names the server and a session.
#[test]
fn stdio_front_places_the_server_in_a_guarded_cgroup() {
    let env = TestEnv::new("stdio-front-cgroup", PROBE);
    let peers = Peers::require();
    write_everything_policy(
        &env,
        &peers,
        vec![allow(
            "fetch",
            json!({"roles": [DEVELOPER], "tools": ["gzip-file-as-resource"]}),
        )],
    );
    let daemon = env.start_daemon();
    let undeclared = Listener::tcp(LOCALHOST_V4);
    let command = env.stdio_front("everything", AGENT, &env.control_socket);
    let run = mcp_client(
        &peers,
        Transport::Stdio(&command),
        HANDSHAKE,
        &json!([
            {"op": "call_tool", "name": "gzip-file-as-resource",
             "arguments": {"name": "x.gz", "data": format!("http://{}/via-stdio", undeclared.addr)}},
        ]),
    );
    let outcome = &run.results[0];
    assert!(
        outcome["ok"] == false || outcome["result"]["isError"] == true,
        "the fetch cannot have succeeded: {outcome}"
    );
    let event = daemon.wait_for_event("the stdio front server's refused fetch", |e| {
        as_u64(field(e, "port")) == Some(u64::from(undeclared.port()))
    });
    assert_eq!(field(&event, "verdict"), "refuse", "{event}");
    assert_eq!(field(&event, "server"), "everything", "{event}");
    assert!(
        field(&event, "session")
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "the egress event is not attributed to a session: {event}"
    );
    assert!(
        undeclared.received().is_empty(),
        "a refused connect arrived: {:?}",
        undeclared.received()
    );
    assert!(
        !run.run.stderr.contains("kernel egress enforcement is OFF"),
        "the stdio front did not use the running daemon:\n{}",
        run.run.stderr
    );

    // The front has no log of its own: its decision and outcome records are in the daemon's.
    let session = field(&event, "session")
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let records = audit_records(&env.audit_path());
    let of_fetch: Vec<&Value> = records
        .iter()
        .filter(|r| r["session"] == session.as_str() && r["tool"] == "gzip-file-as-resource")
        .collect();
    assert_eq!(
        of_fetch.len(),
        2,
        "a decision and an outcome record of the front's call in the daemon's log: {of_fetch:?}"
    );
    assert_eq!(of_fetch[0]["decision"], "allow", "{of_fetch:?}");
    assert!(of_fetch[1]["outcome"].is_object(), "{of_fetch:?}");
    // The daemon logs an egress event before its record is appended.
    assert!(
        poll_until(TIMEOUT, || audit_records(&env.audit_path()).iter().any(
            |r| r["kind"] == "egress"
                && r["session"] == session.as_str()
                && r["verdict"] == "refuse"
        )),
        "the refused connection is on record for the front's session"
    );
}

/// Without a daemon (no control socket), the stdio front warns on stderr that kernel egress
/// enforcement is off, and still enforces the policy.
#[test]
fn stdio_front_without_a_daemon_still_enforces_the_policy() {
    let env = TestEnv::new("stdio-front-alone", PROBE);
    let peers = Peers::require();
    write_everything_policy(
        &env,
        &peers,
        vec![allow(
            "echo",
            json!({"roles": [DEVELOPER], "tools": ["echo"]}),
        )],
    );
    let missing_socket = env.dir().join("no-daemon.sock");
    let command = env.stdio_front("everything", AGENT, &missing_socket);
    let run = mcp_client(
        &peers,
        Transport::Stdio(&command),
        HANDSHAKE,
        &json!([
            {"op": "call_tool", "name": "echo", "arguments": {"message": "alone"}},
            {"op": "call_tool", "name": "get-env", "arguments": {}},
        ]),
    );
    assert!(
        run.run.stderr.contains("kernel egress enforcement is OFF"),
        "no warning that kernel enforcement is off:\n{}",
        run.run.stderr
    );
    assert_eq!(text(run.ok(0)), "Echo: alone");
    assert_eq!(run.error(1)["message"], "Unknown tool: get-env");
}

/// The stdio front at the revisions besides the default one, with the SDK client: at
/// 2025-06-18 (initialize handshake) and at 2026-07-28 (stateless, `server/discover`),
/// mcp-server-time through `mcp-guard stdio` agrees on the revision, lists only the allowed
/// tool, answers the allowed call, and the client gets the same refusals as over HTTP: `-32010`
/// naming the deny rule for a call its arguments refuse (which never reaches the server: no
/// outcome on record), `Unknown tool` for a hidden one. The decisions are on record.
#[test]
fn stdio_front_serves_each_revision_the_sdk_speaks() {
    let env = TestEnv::new("stdio-front-revisions", PROBE);
    let peers = Peers::require();
    write_time_policy(
        &env,
        &peers,
        vec![deny(
            "not-in-europe",
            json!({
                "tools": ["get_current_time"],
                "arguments": {"type": "object",
                              "properties": {"timezone": {"type": "string", "pattern": "^Europe/"}},
                              "required": ["timezone"]},
            }),
        )],
    );
    let _daemon = env.start_daemon();
    let command = env.stdio_front("time", AGENT, &env.control_socket);
    let script = json!([
        {"op": "list_tools"},
        {"op": "call_tool", "name": "get_current_time", "arguments": {"timezone": "Asia/Tokyo"}},
        {"op": "call_tool", "name": "get_current_time", "arguments": {"timezone": "Europe/Paris"}},
        {"op": "call_tool", "name": "convert_time", "arguments": {
            "source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}},
    ]);
    for (version, era) in [("2025-06-18", "handshake"), ("2026-07-28", "modern")] {
        let run = mcp_client(&peers, Transport::Stdio(&command), version, &script);
        let what = format!("at {version}: {}", run.run.report());
        assert_eq!(run.initialize["protocol_version"], version, "{what}");
        assert_eq!(run.initialize["era"], era, "{what}");
        let names: Vec<&str> = run.ok(0)["tools"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect();
        assert_eq!(names, ["get_current_time"], "{what}");
        assert_eq!(
            run.ok(1)["structuredContent"]["timezone"],
            "Asia/Tokyo",
            "{what}"
        );
        let refused = run.error(2);
        assert_eq!(refused["code"], -32010, "{what}");
        assert_eq!(refused["data"]["rule"], "not-in-europe", "{what}");
        let hidden = run.error(3);
        assert_eq!(hidden["code"], -32602, "{what}");
        assert_eq!(hidden["message"], "Unknown tool: convert_time", "{what}");
    }

    let records = audit_records(&env.audit_path());
    let decisions = |decision: &str, rule: &str| {
        records
            .iter()
            .filter(|r| {
                r["tool"] == "get_current_time" && r["decision"] == decision && r["rule"] == rule
            })
            .count()
    };
    assert_eq!(decisions("allow", "time"), 2, "{records:#?}");
    assert_eq!(decisions("deny", "not-in-europe"), 2, "{records:#?}");
    let outcomes = records
        .iter()
        .filter(|r| r["tool"] == "get_current_time" && r["outcome"]["kind"] == "result")
        .count();
    assert_eq!(
        outcomes, 2,
        "only the allowed calls reach the server: {records:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Raw lines on the stdio front
// ---------------------------------------------------------------------------------------------

/// `mcp-guard stdio` driven line by line.
/// An agent that pipelines `initialize`, `notifications/initialized` and `tools/list` without
/// waiting (the front handles messages concurrently) still has its server see `initialize`
/// first: the real `mcp-server-time` (Python SDK, which refuses requests before it is
/// initialised) answers both requests, and the audit log shows `tools/list` decided only
/// after `initialize` was answered.
#[test]
fn requests_sent_after_initialize_wait_for_its_answer() {
    let env = TestEnv::new("stdio-front-handshake", PROBE);
    let peers = Peers::require();
    write_time_policy(&env, &peers, vec![]);
    let _daemon = env.start_daemon();
    let mut front = RawStdio::spawn(&env.stdio_front("time", AGENT, &env.control_socket));
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": HANDSHAKE, "capabilities": {},
        "clientInfo": {"name": "stdio-pipelined", "version": "0"}}});
    let lines = [
        initialize.to_string(),
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.to_owned(),
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#.to_owned(),
    ];
    front.send(lines.join("\n").as_bytes());
    let mut answers = front.responses(2, "the initialize and tools/list answers");
    answers.sort_by_key(|answer| answer["id"].as_i64());
    assert_eq!(
        answers[0]["result"]["protocolVersion"], HANDSHAKE,
        "{answers:?}"
    );
    let tools = answers[1]["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("tools/list failed: {answers:?}"));
    assert!(
        tools.iter().any(|tool| tool["name"] == "get_current_time"),
        "{answers:?}"
    );

    let records = audit_records(&env.audit_path());
    let seq_of = |found: Option<&Value>| found.and_then(|r| r["seq"].as_u64());
    let initialized = seq_of(
        records
            .iter()
            .find(|r| r["method"] == "initialize" && r.get("outcome").is_some()),
    );
    let listed = seq_of(
        records
            .iter()
            .find(|r| r["method"] == "tools/list" && r.get("decision").is_some()),
    );
    assert!(
        matches!((initialized, listed), (Some(i), Some(l)) if i < l),
        "tools/list was decided before initialize was answered: {records:#?}"
    );
}

/// With `audit.durable_before: "answer"` (one flush per call, before the answer), calls through
/// the HTTP front and through a stdio front recording via the daemon are answered, every
/// forwarded call has its decision and its outcome on record, and `audit verify` passes.
#[test]
fn durable_before_answer_keeps_every_record() {
    every_call_is_answered_and_on_record(
        "stdio-front-durable-answer",
        json!({"fsync": true, "durable_before": "answer"}),
        json!({}),
    );
}

/// With `audit.durable_before: "interval"` (records written before what they record goes on,
/// flushed in the background), the same.
#[test]
fn durable_before_interval_keeps_every_record() {
    every_call_is_answered_and_on_record(
        "stdio-front-durable-interval",
        json!({"fsync": true, "durable_before": "interval", "flush_interval_ms": 5}),
        json!({}),
    );
}

/// With one worker thread and answer polling (`daemon.worker_threads` 1 and
/// `daemon.answer_poll_us`, which the stdio fronts read from the same policy), the same; and the
/// daemon says it runs one worker thread.
#[test]
fn answer_polling_on_one_worker_keeps_every_call_answered_and_on_record() {
    every_call_is_answered_and_on_record(
        "stdio-front-answer-polling",
        json!({"fsync": true, "durable_before": "interval"}),
        json!({"worker_threads": 1, "answer_poll_us": 500}),
    );
}

/// The same without fsync, where the daemon answers a stdio front's records on the
/// connection's own task instead of a task each.
#[test]
fn without_fsync_every_call_is_answered_and_on_record() {
    every_call_is_answered_and_on_record(
        "stdio-front-no-fsync",
        json!({"fsync": false}),
        json!({}),
    );
}

/// Two calls through the HTTP front and two through a stdio front (the Python SDK client),
/// then a burst of pipelined calls on a second stdio front: every call is answered with its
/// own text, has a decision and an outcome in the daemon's log, and `audit verify` passes.
/// `audit` and `daemon` are set in the policy's sections of those names.
fn every_call_is_answered_and_on_record(tag: &str, audit: Value, daemon: Value) {
    const BURST: i64 = 8;
    let env = TestEnv::new(tag, PROBE);
    let peers = Peers::require();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_loopback_port()));
    let mut document = env.proxy_policy(
        listen,
        json!({"fast": stdio_server(vec![FAST_SERVER.to_string()], vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        ])}),
    );
    TestEnv::set_settings(&mut document, "audit", &audit);
    TestEnv::set_settings(&mut document, "daemon", &daemon);
    env.write_policy_document(&document);
    let running = env.start_daemon();
    if let Some(workers) = daemon.get("worker_threads") {
        let ready = running.wait_for_message("ready", TIMEOUT);
        assert_eq!(&ready["fields"]["worker_threads"], workers, "{ready}");
    }
    let script = |front: &str| {
        json!([
            {"op": "call_tool", "name": "echo", "arguments": {"text": format!("{front} 1")}},
            {"op": "call_tool", "name": "echo", "arguments": {"text": format!("{front} 2")}},
        ])
    };
    let url = format!("http://{listen}/servers/fast/mcp");
    let over_http = mcp_client(&peers, Transport::Http(&url), HANDSHAKE, &script("http"));
    let command = env.stdio_front("fast", AGENT, &env.control_socket);
    let over_stdio = mcp_client(
        &peers,
        Transport::Stdio(&command),
        HANDSHAKE,
        &script("stdio"),
    );
    for (run, front) in [(&over_http, "http"), (&over_stdio, "stdio")] {
        for i in 0..2 {
            assert_eq!(text(run.ok(i)), format!("{front} {}", i + 1));
        }
    }

    let mut pipelined = RawStdio::spawn(&command);
    pipelined.handshake("pipelined");
    let burst: Vec<String> = (2..2 + BURST)
        .map(|id| {
            json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                   "params": {"name": "echo", "arguments": {"text": format!("burst {id}")}}})
            .to_string()
        })
        .collect();
    pipelined.send(burst.join("\n").as_bytes());
    let answers = pipelined.responses(BURST as usize, "the pipelined answers");
    for answer in &answers {
        let id = answer["id"].as_i64().expect("an answer to a request");
        assert_eq!(
            answer["result"]["content"][0]["text"],
            format!("burst {id}"),
            "{answers:?}"
        );
    }
    drop(pipelined);

    let records = audit_records(&env.audit_path());
    let forwarded: Vec<&Value> = records
        .iter()
        .filter(|r| r["tool"] == "echo" && r["decision"] == "allow")
        .collect();
    assert_eq!(forwarded.len(), 4 + BURST as usize, "{records:#?}");
    for decision in forwarded {
        assert!(
            records
                .iter()
                .any(|r| r["call_id"] == decision["call_id"] && r["outcome"]["kind"] == "result"),
            "no outcome for {decision}"
        );
    }
    let verify = mcp_guard(&["audit", "verify", path_str(&env.audit_path())]);
    assert!(verify.status.success(), "{}", verify.report());
}

/// A stdio front follows its policy file as the daemon does: once the file allows echo only
/// to another role, the agent's next echo is refused as an unknown tool; a policy that does
/// not load is refused on stderr and the one in force stays.
#[test]
fn stdio_front_reloads_its_policy_when_the_file_changes() {
    let env = TestEnv::new("stdio-front-reload", PROBE);
    let servers = |roles: Value| {
        json!({"fast": stdio_server(vec![FAST_SERVER.to_string()], vec![
            list_tools_rule(),
            allow("echo", json!({"roles": roles, "tools": ["echo"]})),
        ])})
    };
    write_policy(&env, servers(json!([DEVELOPER])));
    // No daemon: the front runs standalone, with the policy file as its only source.
    let missing = env.dir().join("no-daemon.sock");
    let mut front = RawStdio::spawn(&env.stdio_front("fast", AGENT, &missing));
    front.handshake("stdio-reload");
    let echo = |id: i64| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": "echo", "arguments": {"text": "hi"}}})
        .to_string()
    };
    front.send(echo(2).as_bytes());
    let allowed = front.responses(1, "the first echo");
    assert_eq!(
        allowed[0]["result"]["content"][0]["text"], "hi",
        "{allowed:?}"
    );

    write_policy(&env, servers(json!(["auditor"])));
    assert!(
        poll_until(TIMEOUT, || front.stderr_text().contains("policy reloaded")),
        "the front did not reload: {}",
        front.stderr_text()
    );
    front.send(echo(3).as_bytes());
    let refused = front.responses(1, "the echo after the reload");
    assert_eq!(refused[0]["error"]["code"], -32602, "{refused:?}");

    std::fs::write(&env.policy_path, "{ not a policy").unwrap();
    assert!(
        poll_until(TIMEOUT, || front
            .stderr_text()
            .contains("policy reload refused")),
        "the broken policy was not refused: {}",
        front.stderr_text()
    );
    front.send(echo(4).as_bytes());
    let still = front.responses(1, "the echo after the refused reload");
    assert_eq!(still[0]["error"]["code"], -32602, "{still:?}");
}

struct RawStdio {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl RawStdio {
    fn spawn(command: &[String]) -> RawStdio {
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mcp-guard stdio");
        let (lines, stderr) = collect_output(&mut child);
        RawStdio {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(bytes)
            .and_then(|_| stdin.write_all(b"\n"))
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|err| panic!("write to mcp-guard stdio: {err}; {}", self.state()));
    }

    fn state(&mut self) -> String {
        thread::sleep(std::time::Duration::from_millis(100));
        format!(
            "exit: {:?}; stderr:\n{}",
            self.child.try_wait().ok().flatten(),
            self.stderr.lock().unwrap()
        )
    }

    /// `initialize` (id 1) as `client`, then `notifications/initialized`; the initialize answer.
    fn handshake(&mut self, client: &str) -> Value {
        let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": HANDSHAKE, "capabilities": {},
            "clientInfo": {"name": client, "version": "0"}}});
        self.send(initialize.to_string().as_bytes());
        let answer = self.responses(1, "the initialize answer").remove(0);
        self.send(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        answer
    }

    /// How the front exited, waiting for it up to `timeout` (a safety net); fails the test,
    /// saying what the front was waited for `after`, if it still runs then.
    /// Closes the front's stdin, as an agent that is done does, and expects it to exit 0
    /// within `timeout`.
    fn close_input_and_exit_cleanly(&mut self, timeout: std::time::Duration) {
        self.stdin.take();
        let status = self.exit_status(timeout, "its stdin closed");
        assert!(status.success(), "{status:?}: {}", self.stderr_text());
    }

    fn exit_status(
        &mut self,
        timeout: std::time::Duration,
        after: &str,
    ) -> std::process::ExitStatus {
        let mut status = None;
        assert!(
            poll_until(timeout, || {
                status = self.child.try_wait().ok().flatten();
                status.is_some()
            }),
            "the front still runs after {after}: {}",
            self.stderr_text()
        );
        status.unwrap()
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The next `count` responses (notifications from the server are skipped).
    fn responses(&mut self, count: usize, what: &str) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < count {
            let value = self.next_message(what, &out);
            if value.get("result").is_some() || value.get("error").is_some() {
                out.push(value);
            }
        }
        out
    }

    /// The answer to request `id`, `method` with `params`, sent alone.
    fn request(&mut self, id: u64, method: &str, params: Value) -> Value {
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        self.send(request.to_string().as_bytes());
        let answer = self.responses(1, method).remove(0);
        assert_eq!(answer["id"], id, "the answer to another request: {answer}");
        answer
    }

    /// The answer to a `completion/complete` of argument `name` (typed so far: `value`) of
    /// `reference`.
    fn complete(&mut self, id: u64, reference: Value, name: &str, value: &str) -> Value {
        let params = json!({"ref": reference, "argument": {"name": name, "value": value}});
        self.request(id, "completion/complete", params)
    }

    /// Every page of the list `method` (request ids from 1000 on).
    fn list_pages(&mut self, method: &str) -> Vec<Value> {
        let mut id = 1000;
        list_pages(method, |method, params| {
            id += 1;
            self.request(id, method, params)
        })
    }

    /// Every message written up to and including the first that `last` picks.
    fn messages_until(&mut self, what: &str, last: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let value = self.next_message(what, &out);
            let done = last(&value);
            out.push(value);
            if done {
                return out;
            }
        }
    }

    /// The next line on stdout, as JSON; a panic naming `what` was awaited, and `so_far`,
    /// when none comes.
    fn next_message(&mut self, what: &str, so_far: &[Value]) -> Value {
        match self.lines.recv_timeout(TIMEOUT) {
            Ok(line) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}")),
            Err(err) => {
                let why = match err {
                    RecvTimeoutError::Timeout => format!("nothing within {TIMEOUT:?}"),
                    RecvTimeoutError::Disconnected => "stdout closed".to_string(),
                };
                panic!(
                    "waiting for {what}: {why}; got {so_far:?} so far; {}",
                    self.state()
                );
            }
        }
    }
}

impl Drop for RawStdio {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The processes `pid` started that still run (its threads' children).
fn children_of(pid: u32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|children| {
            children
                .split_whitespace()
                .filter_map(|child| child.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// When the server process a stdio front started exits (killed here), the front does what the
/// server would have done for the agent: it exits, non-zero, saying why on stderr, instead of
/// answering every later call with an error.
#[test]
fn stdio_front_exits_when_its_server_exits() {
    let env = TestEnv::new("stdio-front-server-exits", PROBE);
    let peers = Peers::require();
    write_policy(
        &env,
        json!({"time": stdio_server(peers.time(), vec![list_tools_rule()])}),
    );
    let missing = env.dir().join("no-daemon.sock");
    let mut front = RawStdio::spawn(&env.stdio_front("time", AGENT, &missing));
    front.handshake("stdio-server-exits");
    let server = children_of(front.child.id());
    assert_eq!(server.len(), 1, "the front runs one server: {server:?}");
    // SAFETY: kill(2) on a pid, no memory involved.
    assert_eq!(unsafe { libc::kill(server[0], libc::SIGKILL) }, 0);

    let status = front.exit_status(TIMEOUT, "its server exited");
    // What a shell reports for a process SIGKILL ended: the agent sees the server's death.
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "{status:?}");
    assert!(
        front
            .stderr_text()
            .contains("mcp-guard: the server process exited (signal: 9"),
        "{}",
        front.stderr_text()
    );
}

/// When the agent closes the front's stdin, the front stops its server and exits, even a
/// server that ignores SIGTERM and keeps running after its own stdin closes.
#[test]
fn closing_stdin_stops_the_fronts_server_process() {
    let env = TestEnv::new("stdio-front-stdin-closed", PROBE);
    let pid_file = env.dir().join("lingering.pid");
    write_policy(
        &env,
        json!({"lingering": stdio_server(lingering_server(&pid_file), vec![list_tools_rule()])}),
    );
    let missing = env.dir().join("no-daemon.sock");
    let mut front = RawStdio::spawn(&env.stdio_front("lingering", AGENT, &missing));
    front.handshake("stdio-stdin-closed");
    let listed = front.request(2, "tools/list", json!({}));
    assert_eq!(listed["result"]["tools"], json!([]), "{listed}");
    let server = pid_from_file(&pid_file);
    assert_eq!(children_of(front.child.id()), [server]);

    let deadline = std::time::Duration::from_secs(20);
    front.close_input_and_exit_cleanly(deadline);
    assert_process_ends(
        server,
        deadline,
        "the server did not end when the front's stdin closed",
    );
}

/// A stdio front placed through the daemon ends what its server left running (a wrapper's
/// background `sleep`) when it exits, as the daemon's own sessions do, and the session
/// cgroup is removed.
#[test]
fn a_placed_stdio_fronts_exit_ends_what_its_server_left_running() {
    let (env, _daemon, mut front, placed) = placed_front("stdio-front-leftover", |pid_file| {
        leaving_a_sleep(pid_file, FAST_SERVER)
    });
    front.close_input_and_exit_cleanly(TIMEOUT);
    placed.assert_ended(&env);
}

/// A stdio front running standalone (no daemon, so no cgroup) ends what its server left
/// running in the background when it exits: the server leads a process group of its own,
/// which the front kills.
#[test]
fn a_standalone_stdio_fronts_exit_ends_what_its_server_left_running() {
    let (_env, mut front, leftover) = standalone_front("stdio-front-alone-leftover", |pid_file| {
        leaving_a_sleep(pid_file, FAST_SERVER)
    });
    assert!(!process_ended(leftover), "the background sleep runs");
    front.close_input_and_exit_cleanly(TIMEOUT);
    assert!(
        front
            .stderr_text()
            .contains("kernel egress enforcement is OFF"),
        "the front ran with a daemon: {}",
        front.stderr_text()
    );
    assert_process_ends(
        leftover,
        TIMEOUT,
        "the server's background sleep outlived the front",
    );
}

/// Without the daemon's cgroup, a process the server starts in a session of its own escapes
/// its process group; the standalone front adopts it (child subreaper) as its parent exits,
/// and kills it when the front ends.
#[test]
fn a_standalone_stdio_fronts_exit_ends_what_its_server_started_in_a_session_of_its_own() {
    let (_env, mut front, escaped) = standalone_front("stdio-front-alone-escaped", |pid_file| {
        leaving_an_escaped_sleep(pid_file, "1000", FAST_SERVER)
    });
    let front_pid = front.child.id();
    assert!(
        poll_until(TIMEOUT, || children_of(front_pid).contains(&escaped)),
        "the escaped sleep (pid {escaped}) was not adopted by the front (pid {front_pid}): {:?}",
        std::fs::read_to_string(format!("/proc/{escaped}/stat"))
    );
    // Adopted as soon as its subshell exits, which may be before it has called setsid.
    assert!(
        poll_until(TIMEOUT, || session_of(escaped) == Some(escaped)),
        "the sleep did not start a session of its own, so it did not escape the server's group"
    );
    front.close_input_and_exit_cleanly(TIMEOUT);
    assert_process_ends(escaped, TIMEOUT, "the escaped sleep outlived the front");
}

/// What a standalone front adopts and what then exits is reaped while the front runs, not
/// left as a zombie for the session's life.
#[test]
fn a_standalone_stdio_front_reaps_what_its_server_left_as_it_exits() {
    let (_env, mut front, short) = standalone_front("stdio-front-alone-reaps", |pid_file| {
        leaving_an_escaped_sleep(pid_file, "0.5", FAST_SERVER)
    });
    let proc_entry = std::path::PathBuf::from(format!("/proc/{short}"));
    assert!(
        poll_until(TIMEOUT, || !proc_entry.exists()),
        "the exited sleep (pid {short}) was not reaped while the front ran: {:?}",
        std::fs::read_to_string(proc_entry.join("stat"))
    );
    let listed = front.request(2, "tools/list", json!({}));
    assert!(listed["result"]["tools"].is_array(), "{listed}");
    front.close_input_and_exit_cleanly(TIMEOUT);
}

/// A standalone front killed with SIGKILL stops nothing itself, and there is no daemon to kill
/// a cgroup: its server, one that ignores SIGTERM and outlives its stdin, dies with it (the
/// parent-death signal the front set on it).
#[test]
fn a_killed_standalone_fronts_server_dies_with_it() {
    let (_env, mut front, server) = standalone_front("stdio-front-alone-killed", lingering_server);
    assert_eq!(children_of(front.child.id()), [server]);
    front.child.kill().expect("SIGKILL the front");
    front.child.wait().expect("reap the front");
    assert_process_ends(server, TIMEOUT, "the server outlived its killed front");
}

/// A stdio front with no daemon to reach, in front of the fast server started by `command`
/// (given a pid file to write), after its handshake; with the pid the command wrote.
fn standalone_front(
    tag: &str,
    command: impl FnOnce(&std::path::Path) -> Vec<String>,
) -> (TestEnv, RawStdio, i32) {
    let env = TestEnv::new(tag, PROBE);
    let pid_file = env.dir().join("written.pid");
    write_policy(
        &env,
        json!({"fast": stdio_server(command(&pid_file), vec![list_tools_rule()])}),
    );
    let missing_socket = env.dir().join("no-daemon.sock");
    let mut front = RawStdio::spawn(&env.stdio_front("fast", AGENT, &missing_socket));
    front.handshake(tag);
    let written = pid_from_file(&pid_file);
    (env, front, written)
}

/// A stdio front that is killed (SIGKILL: it stops nothing itself) still takes its session
/// with it: the daemon sees the front's placement connection close and kills what runs in
/// the session cgroup. Here that is a server that ignores SIGTERM and runs on after its stdin
/// closes, so nothing but that kill ends it.
#[test]
fn a_killed_stdio_fronts_server_is_ended_by_the_daemon() {
    let (env, _daemon, mut front, placed) = placed_front("stdio-front-killed", lingering_server);
    front.child.kill().expect("SIGKILL the front");
    front.child.wait().expect("reap the front");
    placed.assert_ended(&env);
}

/// The records a placed stdio front relays to the daemon name the front's process and user as
/// the kernel gave them to the daemon (the control socket's peer credentials), and
/// `audit trace` shows them; records the daemon writes itself carry none.
#[test]
fn records_relayed_by_a_stdio_front_name_the_front_process() {
    let (env, _daemon, mut front, _placed) = placed_front("stdio-front-peer", |pid_file| {
        leaving_a_sleep(pid_file, FAST_SERVER)
    });
    let listed = front.request(2, "tools/list", json!({}));
    assert!(listed["result"]["tools"].is_array(), "{listed}");
    let front_pid = front.child.id();
    front.stdin.take();
    front.exit_status(TIMEOUT, "its stdin closed");
    let records = audit_records(&env.audit_path());
    let relayed: Vec<&Value> = records
        .iter()
        .filter(|r| !r["front_pid"].is_null())
        .collect();
    assert!(
        relayed
            .iter()
            .any(|r| r["kind"] == "call" && r["method"] == "tools/list"),
        "the front's call is not among the records naming it: {records:#?}"
    );
    for record in &relayed {
        assert_eq!(record["front_pid"], front_pid, "{record}");
        assert_eq!(record["front_uid"], 0, "{record}");
    }
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "policy" && r["front_pid"].is_null()),
        "the daemon's own policy record: {records:#?}"
    );
    let session = relayed[0]["session"]
        .as_str()
        .expect("a session")
        .to_owned();
    let trace = mcp_guard(&[
        "audit",
        "trace",
        "--session",
        &session,
        path_str(&env.audit_path()),
    ]);
    assert!(
        trace
            .stdout
            .contains(&format!("via stdio front pid {front_pid} uid 0")),
        "{}",
        trace.report()
    );
}

/// The processes of a placed stdio front's session and the cgroup they run in.
struct PlacedSession {
    pids: Vec<i32>,
    cgroup: std::path::PathBuf,
}

impl PlacedSession {
    fn assert_ended(&self, env: &TestEnv) {
        for &pid in &self.pids {
            assert_process_ends(pid, TIMEOUT, "a process of the session outlived its front");
        }
        assert!(
            poll_until(TIMEOUT, || !self.cgroup.exists()),
            "the session cgroup {} was never removed",
            self.cgroup.display()
        );
        let verify = mcp_guard(&["audit", "verify", path_str(&env.audit_path())]);
        assert!(verify.status.success(), "{}", verify.report());
    }
}

/// A daemon, and a stdio front placed through it whose server is `command(pid_file)`, a
/// command that writes a pid to `pid_file` (a process it leaves running, or its own). That
/// process and the front's server run in the session's guarded cgroup.
fn placed_front(
    tag: &str,
    command: impl FnOnce(&std::path::Path) -> Vec<String>,
) -> (TestEnv, Daemon, RawStdio, PlacedSession) {
    let env = TestEnv::new(tag, PROBE);
    let pid_file = env.dir().join("session.pid");
    write_policy(
        &env,
        json!({"fast": stdio_server(command(&pid_file), vec![list_tools_rule()])}),
    );
    let daemon = env.start_daemon();
    let mut front = RawStdio::spawn(&env.stdio_front("fast", AGENT, &env.control_socket));
    front.handshake(tag);
    let written = pid_from_file(&pid_file);
    let server = children_of(front.child.id());
    assert_eq!(server.len(), 1, "the front runs one server: {server:?}");
    let cgroup = process_cgroup(server[0]).expect("the server's cgroup");
    assert_eq!(
        process_cgroup(written).as_deref(),
        Some(cgroup.as_str()),
        "pid {written} runs in the server's session cgroup"
    );
    let root = env.cgroup_root.strip_prefix(cgroup2_mount()).unwrap();
    assert!(
        cgroup.starts_with(&format!("/{}", root.display())),
        "the server was placed under the daemon's cgroup root: {cgroup}"
    );
    let cgroup = cgroup2_mount().join(cgroup.trim_start_matches('/'));
    let mut pids = vec![server[0], written];
    pids.dedup();
    (env, daemon, front, PlacedSession { pids, cgroup })
}

/// The stdio front's side of the HTTP front's mutation test: 600 seeded mutations of valid
/// messages (see `Mutator`), one line each, to a front placed through the daemon in front of
/// server-filesystem, each followed by a `ping` whose answer is awaited. Each line's requests
/// carry an id of its own (unless a mutation changed it), and every line that is still a
/// readable request with that id is answered under it, sooner or later: nothing is dropped
/// or left waiting (a request whose `params` was an array once was: server-filesystem drops
/// such a message unanswered). Every line the front writes is a well-formed JSON-RPC message,
/// the front answers every ping (it never stops reading or exits), logs no panic, the files are exactly as they were (no write or edit,
/// which the policy denies, reached the server), a read still returns the file, and the
/// audit log verifies. `MCP_GUARD_MUTATION_SEED` replays another sequence.
#[test]
fn mutated_lines_get_clear_answers_and_never_reach_a_denied_tool() {
    const LINES: usize = 600;
    let env = TestEnv::new("stdio-front-mutations", PROBE);
    let peers = Peers::require();
    let root = env.files_dir(Some("hello from the test\n"));
    write_policy(
        &env,
        json!({"files": read_only_files_server(&peers, &root)}),
    );
    let daemon = env.start_daemon();
    let files_before = tree_of(&root);
    let corpus = filesystem_corpus(&root);
    let (mut mutator, seed) = Mutator::from_env_or(0x7374_6469_6f2d_6d75);
    let mut front = RawStdio::spawn(&env.stdio_front("files", AGENT, &env.control_socket));
    front.handshake("stdio-mutations");
    let mut answered = 0;
    let mut awaited = BTreeSet::new();
    let mut answered_ids = BTreeSet::new();
    for n in 0..LINES {
        let own_id = format!("line-{n}");
        let line = mutator.mutate(&with_id(&corpus, &own_id));
        if must_be_answered(&line, &own_id) {
            awaited.insert(own_id);
        }
        front.send(&line);
        let probe = format!("probe-{n}");
        let ping = json!({"jsonrpc": "2.0", "id": probe, "method": "ping"});
        front.send(ping.to_string().as_bytes());
        let what = format!(
            "the ping after line {n} of seed {seed}: {:?}",
            String::from_utf8_lossy(&line)
        );
        let messages = front.messages_until(&what, |m| m["id"] == probe.as_str());
        // A batch is answered with an array of answers on one line.
        let flattened = messages.iter().flat_map(|m| match m {
            Value::Array(answers) => answers.iter().collect(),
            one => vec![one],
        });
        for message in flattened {
            if let Err(e) = check_jsonrpc_message(message) {
                panic!(
                    "{e}, after line {n} of seed {seed}: {:?}",
                    String::from_utf8_lossy(&line)
                );
            }
            if let Some(id) = message["id"].as_str() {
                answered_ids.insert(id.to_owned());
            }
        }
        answered += messages.len() - 1;
    }
    eprintln!(
        "seed {seed}: {LINES} mutated lines, {answered} other messages written meanwhile, {} \
         lines that must be answered under their id",
        awaited.len()
    );
    assert!(
        answered > 0,
        "no mutated line was answered at all (seed {seed})"
    );
    assert!(
        !awaited.is_empty(),
        "no mutated line kept its id (seed {seed})"
    );
    // Answers come in any order: those still missing may yet come.
    while let Some(missing) = awaited.difference(&answered_ids).next().cloned() {
        let message = front.next_message(&format!("the answer to {missing} (seed {seed})"), &[]);
        let answers = match message {
            Value::Array(answers) => answers,
            one => vec![one],
        };
        for answer in answers {
            if let Some(id) = answer["id"].as_str() {
                answered_ids.insert(id.to_owned());
            }
        }
    }
    // Answers to mutated requests may still come (answers come in any order): the read's is
    // the one with its id.
    let read = json!({"jsonrpc": "2.0", "id": "read", "method": "tools/call",
        "params": {"name": "read_text_file", "arguments": {"path": root.join("readme.txt")}}});
    front.send(read.to_string().as_bytes());
    let read = front
        .messages_until("the read", |m| m["id"] == "read")
        .pop()
        .unwrap();
    assert_eq!(text(&read["result"]), "hello from the test\n", "{read}");
    assert!(
        !front.stderr_text().contains("panicked"),
        "the front panicked: {}",
        front.stderr_text()
    );
    assert_eq!(
        tree_of(&root),
        files_before,
        "a mutated line changed the files (seed {seed})"
    );
    drop(front);
    daemon.assert_no_panic();
    let verify = mcp_guard(&["audit", "verify", path_str(&env.audit_path())]);
    assert!(verify.status.success(), "{}", verify.report());
}

/// The HTTP front's mutated-server test through a stdio front placed by the daemon (see
/// `mutating_fast_server`): 60 valid requests, each answered under its id with well-formed
/// JSON-RPC (a server's mutated request or notification that reaches the agent is well-formed
/// too), no list shows anything the agent may not see, an unusable answer that names its
/// request fails it at once, the front keeps serving, nothing panics, and the log verifies.
#[test]
fn a_server_sending_mutated_answers_gets_nothing_hidden_past_the_stdio_front() {
    const REQUESTS: usize = 60;
    let env = TestEnv::new("stdio-front-mutated-server", PROBE);
    let seed = std::env::var("MCP_GUARD_MUTATION_SEED").unwrap_or_else(|_| "4343".into());
    write_policy(
        &env,
        json!({"fast": mutating_fast_server(FAST_SERVER, &seed)}),
    );
    let daemon = env.start_daemon();
    let mut front = RawStdio::spawn(&env.stdio_front("fast", AGENT, &env.control_socket));
    front.handshake("stdio-mutated-server");
    let requests = mutated_server_requests();
    let mut tally = MutatedServerTally::default();
    for n in 0..REQUESTS {
        let (method, params) = &requests[n % requests.len()];
        let id = format!("request-{n}");
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        front.send(request.to_string().as_bytes());
        let what = format!("request {n} ({method}), server seed {seed}");
        let messages = front.messages_until(&what, |m| m["id"] == id.as_str());
        for message in &messages {
            if let Err(e) = check_jsonrpc_message(message) {
                panic!("{e}, for {what}");
            }
        }
        tally.check(method, messages.last().unwrap(), &what);
    }
    eprintln!("server seed {seed}: {REQUESTS} requests, {tally:?}");
    tally.assert_both_seen(&seed);
    assert!(
        !front.stderr_text().contains("panicked"),
        "the front panicked: {}",
        front.stderr_text()
    );
    drop(front);
    daemon.assert_no_panic();
    let verify = mcp_guard(&["audit", "verify", path_str(&env.audit_path())]);
    assert!(verify.status.success(), "{}", verify.report());
}

/// `corpus` with every request's id set to `id`.
fn with_id(corpus: &[Value], id: &str) -> Vec<Value> {
    let mut corpus = corpus.to_vec();
    for message in corpus.iter_mut().filter(|m| m.get("id").is_some()) {
        message["id"] = json!(id);
    }
    corpus
}

/// Whether the front must answer `line` under `id`: the line is JSON the front reads (nesting
/// and batch size within the default limits of 64), and it, or an element of it as a batch,
/// is a request with that id. Any such request is answered, with a result or an error.
fn must_be_answered(line: &[u8], id: &str) -> bool {
    fn depth(value: &Value) -> usize {
        match value {
            Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            Value::Object(members) => 1 + members.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    let Ok(value) = serde_json::from_slice::<Value>(line) else {
        return false;
    };
    let is_request = |message: &Value| message["id"] == id && message["method"].is_string();
    depth(&value) <= 64
        && match &value {
            Value::Array(items) => items.len() <= 64 && items.iter().any(is_request),
            one => is_request(one),
        }
}

/// A resource the agent may not read does not show through its updates: the policy lets the
/// agent subscribe to any URI but read only `demo://visible/*`, and server-everything sends
/// `notifications/resources/updated` for each URI subscribed to, in the order subscribed. The
/// hidden URI's update, sent first, never reaches the agent; the visible one's does.
#[test]
fn resource_updates_reach_the_agent_only_for_resources_it_may_read() {
    let updates = resource_updates_through_the_front("enforce");
    assert_eq!(updates, [json!("demo://visible/1")]);
}

/// In `shadow` mode the agent sees what it would see without mcp-guard: both updates.
#[test]
fn in_shadow_mode_every_resource_update_reaches_the_agent() {
    let updates = resource_updates_through_the_front("shadow");
    assert_eq!(
        updates,
        [json!("demo://hidden/1"), json!("demo://visible/1")]
    );
}

/// The URIs of the resource updates a stdio front writes, with the server in `mode`, after
/// subscribing to a hidden and then a visible URI and turning updates on; read up to the
/// visible one's.
fn resource_updates_through_the_front(mode: &str) -> Vec<Value> {
    let env = TestEnv::new(&format!("stdio-front-resource-updates-{mode}"), PROBE);
    let peers = Peers::require();
    write_everything_policy_in_mode(&env, &peers, subscribe_any_read_visible_rules(), mode);
    let _daemon = env.start_daemon();
    let mut front = RawStdio::spawn(&env.stdio_front("everything", AGENT, &env.control_socket));
    front.handshake("stdio-resource-updates");
    for (id, uri) in [(2, "demo://hidden/1"), (3, "demo://visible/1")] {
        let subscribe = json!({"jsonrpc": "2.0", "id": id, "method": "resources/subscribe",
            "params": {"uri": uri}});
        front.send(subscribe.to_string().as_bytes());
        let answer = front.responses(1, "the subscribe answer").remove(0);
        assert_eq!(answer["result"], json!({}), "{answer}");
    }
    let toggle = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
        "params": {"name": "toggle-subscriber-updates", "arguments": {}}});
    front.send(toggle.to_string().as_bytes());
    let updated_uri = |message: &Value| {
        (message["method"] == "notifications/resources/updated")
            .then(|| message["params"]["uri"].clone())
    };
    let messages = front.messages_until("the visible resource's update", |message| {
        updated_uri(message) == Some(json!("demo://visible/1"))
    });
    messages.iter().filter_map(updated_uri).collect()
}

/// `completion/complete` completes only what the caller could use: with completion allowed,
/// the visible prompt's and resource template's arguments are completed by the server, while
/// a hidden prompt or template is answered as unknown (rule `unknown-reference`) and a
/// completion without a reference is invalid.
#[test]
fn completion_reveals_nothing_that_lists_hide() {
    let (env, _daemon, mut front) = completion_front("enforce");
    let mut complete = |id, reference, name, value| front.complete(id, reference, name, value);
    let prompt = |name: &str| json!({"type": "ref/prompt", "name": name});
    let template = |kind: &str| json!({"type": "ref/resource", "uri": format!("demo://resource/dynamic/{kind}/{{resourceId}}")});

    let visible = complete(2, prompt("completable-prompt"), "department", "E");
    assert_eq!(
        visible["result"]["completion"]["values"],
        json!(["Engineering"]),
        "{visible}"
    );
    let visible = complete(3, template("text"), "resourceId", "7");
    assert_eq!(
        visible["result"]["completion"]["values"],
        json!(["7"]),
        "{visible}"
    );

    let hidden = complete(4, prompt("args-prompt"), "city", "B");
    assert_eq!(hidden["error"]["code"], -32602, "{hidden}");
    assert_eq!(
        hidden["error"]["message"], "Unknown prompt: args-prompt",
        "{hidden}"
    );
    let hidden = complete(5, template("blob"), "resourceId", "7");
    assert_eq!(hidden["error"]["code"], -32602, "{hidden}");
    assert_eq!(
        hidden["error"]["message"], "Unknown resource: demo://resource/dynamic/blob/{resourceId}",
        "{hidden}"
    );
    let without = complete(6, Value::Null, "department", "E");
    assert_eq!(without["error"]["code"], -32602, "{without}");

    let records = audit_records(&env.audit_path());
    let rules: Vec<(&Value, &Value)> = records
        .iter()
        .filter(|r| r["method"] == "completion/complete" && r.get("decision").is_some())
        .map(|r| (&r["decision"], &r["rule"]))
        .collect();
    let (allow, deny) = (json!("allow"), json!("deny"));
    let (unknown, invalid) = (json!("unknown-reference"), json!("invalid"));
    assert_eq!(
        rules,
        [
            (&allow, &json!("complete")),
            (&allow, &json!("complete")),
            (&deny, &unknown),
            (&deny, &unknown),
            (&deny, &invalid),
        ],
        "{records:#?}"
    );
}

/// In `shadow` mode a completion for a hidden prompt goes to the server, as it would without
/// mcp-guard, and is on record as what `enforce` would have refused.
#[test]
fn in_shadow_mode_a_hidden_completion_goes_on_and_is_recorded_as_would_deny() {
    let (env, _daemon, mut front) = completion_front("shadow");
    let hidden = json!({"type": "ref/prompt", "name": "args-prompt"});
    let answer = front.complete(2, hidden, "city", "B");
    assert!(
        answer["result"]["completion"]["values"].is_array(),
        "{answer}"
    );
    let records = audit_records(&env.audit_path());
    let decision = records
        .iter()
        .find(|r| r["method"] == "completion/complete" && r.get("decision").is_some())
        .unwrap_or_else(|| panic!("no decision record: {records:#?}"));
    assert_eq!(decision["decision"], "would_deny", "{decision}");
    assert_eq!(decision["rule"], "unknown-reference", "{decision}");
}

/// A policy learned from completions completes them again, and nothing else: in `learn`
/// mode the agent completes arguments of a prompt and a resource template that the rules do
/// not cover; under the policy `policy suggest` makes of that log, the same completions are
/// answered by the server, while a template the agent never completed is unknown.
#[test]
fn a_policy_learned_from_completions_completes_them_again() {
    let (env, daemon, mut front) = completion_front("learn");
    let prompt = json!({"type": "ref/prompt", "name": "args-prompt"});
    let template = |kind: &str| json!({"type": "ref/resource", "uri": format!("demo://resource/dynamic/{kind}/{{resourceId}}")});
    // The prompt `args-prompt` and the blob template, each completed by the server.
    let completes_both = |front: &mut RawStdio| {
        let prompted = front.complete(2, prompt.clone(), "city", "B");
        assert!(
            prompted["result"]["completion"]["values"].is_array(),
            "{prompted}"
        );
        let templated = front.complete(3, template("blob"), "resourceId", "7");
        assert_eq!(
            templated["result"]["completion"]["values"],
            json!(["7"]),
            "{templated}"
        );
    };
    completes_both(&mut front);
    let records = audit_records(&env.audit_path());
    assert!(
        records.iter().any(|r| r["reference"] == prompt),
        "no record names the completed prompt: {records:#?}"
    );
    drop(front);
    drop(daemon);

    let suggested_path = env.dir().join("suggested.json");
    let suggest = mcp_guard(&[
        "policy",
        "suggest",
        "--audit",
        path_str(&env.audit_path()),
        "--policy",
        path_str(&env.policy_path),
        "--out",
        path_str(&suggested_path),
    ]);
    assert!(suggest.status.success(), "{}", suggest.report());
    let mut enforced: Value =
        serde_json::from_str(&std::fs::read_to_string(&suggested_path).unwrap()).unwrap();
    let enforce_log = env.dir().join("enforce.jsonl");
    enforced["audit"]["path"] = json!(enforce_log);
    env.write_policy_document(&enforced);
    let _daemon = env.start_daemon();
    let mut front = RawStdio::spawn(&env.stdio_front("everything", AGENT, &env.control_socket));
    front.handshake("stdio-completion-enforced");

    completes_both(&mut front);
    let never = front.complete(4, template("text"), "resourceId", "7");
    assert_eq!(never["error"]["code"], -32602, "{never}");
    assert_eq!(
        never["error"]["message"], "Unknown resource: demo://resource/dynamic/text/{resourceId}",
        "{never}"
    );
}

/// A stdio front on server-everything with the server in `mode`, whose policy allows
/// completion, the prompt `completable-prompt` and the text resource template only.
fn completion_front(mode: &str) -> (TestEnv, Daemon, RawStdio) {
    let env = TestEnv::new(&format!("stdio-front-completion-{mode}"), PROBE);
    let peers = Peers::require();
    let rules = vec![
        allow(
            "complete",
            json!({"roles": [DEVELOPER], "methods": ["completion/complete"]}),
        ),
        allow(
            "prompt",
            json!({"roles": [DEVELOPER], "prompts": ["completable-prompt"]}),
        ),
        allow(
            "text",
            json!({"roles": [DEVELOPER],
            "resources": ["demo://resource/dynamic/text/*"]}),
        ),
    ];
    write_everything_policy_in_mode(&env, &peers, rules, mode);
    let daemon = env.start_daemon();
    let mut front = RawStdio::spawn(&env.stdio_front("everything", AGENT, &env.control_socket));
    front.handshake("stdio-completion");
    (env, daemon, front)
}

/// Bad lines on the stdio front each get a JSON-RPC error, with their own id where it could
/// be read (wrong `jsonrpc`) and a null id otherwise (invalid JSON, nesting past the limit,
/// a line over the size limit, invalid UTF-8), and the front keeps serving: the allowed call
/// after them is answered.
#[test]
fn stdio_front_answers_bad_lines_and_keeps_serving() {
    let env = TestEnv::new("stdio-front-bad-lines", PROBE);
    let peers = Peers::require();
    write_everything_policy(
        &env,
        &peers,
        vec![allow(
            "echo",
            json!({"roles": [DEVELOPER], "tools": ["echo"]}),
        )],
    );
    edit_policy(&env, |document| {
        document["daemon"]["max_json_depth"] = json!(8);
        document["daemon"]["max_message_bytes"] = json!(2048);
        document["daemon"]["max_batch_size"] = json!(2);
    });
    let _daemon = env.start_daemon();
    let mut front = RawStdio::spawn(&env.stdio_front("everything", AGENT, &env.control_socket));

    let answer = front.handshake("stdio-raw");
    assert_eq!(answer["result"]["protocolVersion"], HANDSHAKE, "{answer}");

    // One at a time, so each answer is known to belong to its line.
    let ping = |id: i64| json!({"jsonrpc": "2.0", "id": id, "method": "ping"}).to_string();
    let cases: [(&str, Vec<u8>, Value, i64); 8] = [
        (
            "invalid JSON",
            br#"{"jsonrpc":"2.0","id":2,"method":"#.to_vec(),
            Value::Null,
            -32700,
        ),
        (
            "jsonrpc 1.0",
            br#"{"jsonrpc":"1.0","id":3,"method":"tools/list"}"#.to_vec(),
            json!(3),
            -32600,
        ),
        (
            "nesting past max_json_depth",
            format!(
                r#"{{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{{"name":"echo","arguments":{{"message":"x","deep":{}1{}}}}}}}"#,
                "[".repeat(10),
                "]".repeat(10)
            )
            .into_bytes(),
            Value::Null,
            -32600,
        ),
        (
            "a line over max_message_bytes",
            json!({"jsonrpc": "2.0", "id": 6, "method": "tools/call",
                   "params": {"name": "echo", "arguments": {"message": "x".repeat(4096)}}})
            .to_string()
            .into_bytes(),
            Value::Null,
            -32600,
        ),
        (
            "invalid UTF-8",
            {
                let mut bytes =
                    br#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"echo","arguments":{"message":""#
                        .to_vec();
                bytes.extend_from_slice(&[0xff, 0xfe, 0xfd]);
                bytes.extend_from_slice(br#""}}}"#);
                bytes
            },
            Value::Null,
            -32700,
        ),
        (
            "a request without an id",
            br#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"echo","arguments":{"message":"x"}}}"#.to_vec(),
            Value::Null,
            -32600,
        ),
        ("an empty batch", b"[]".to_vec(), Value::Null, -32600),
        (
            "a batch over max_batch_size",
            format!("[{},{},{}]", ping(7), ping(8), ping(9)).into_bytes(),
            Value::Null,
            -32600,
        ),
    ];
    for (what, line, id, code) in cases {
        front.send(&line);
        let answer = front.responses(1, what).remove(0);
        assert_eq!(answer["error"]["code"], code, "{what}: {answer}");
        assert_eq!(answer["id"], id, "{what}: {answer}");
    }

    // A batch is answered element by element: the first ping, and the duplicate's refusal.
    front.send(format!("[{},{}]", ping(10), ping(10)).as_bytes());
    let answer = front
        .messages_until("a batch with a duplicate id", Value::is_array)
        .pop()
        .unwrap();
    let answers = answer
        .as_array()
        .unwrap_or_else(|| panic!("not a batch: {answer}"));
    let codes: Vec<&Value> = answers.iter().map(|a| &a["error"]["code"]).collect();
    assert_eq!(codes, [&Value::Null, &json!(-32600)], "{answer}");
    assert!(answers.iter().all(|a| a["id"] == 10), "{answer}");

    let call = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": "still serving"}}});
    front.send(call.to_string().as_bytes());
    let answer = front.responses(1, "the echo after the bad lines").remove(0);
    assert_eq!(answer["id"], 9, "{answer}");
    assert_eq!(text(&answer["result"]), "Echo: still serving", "{answer}");
}

/// An id is the agent's handle on a request until it is answered (progress, cancellation and
/// the answer are routed by it): a second request reusing it meanwhile is refused with
/// -32600 and never reaches the server, and once the first is answered the id may be used again.
#[test]
fn a_request_id_in_use_is_refused_until_its_request_is_answered() {
    let env = TestEnv::new("stdio-front-id-in-use", PROBE);
    let peers = Peers::require();
    write_everything_policy(
        &env,
        &peers,
        vec![allow(
            "long",
            json!({"roles": [DEVELOPER], "tools": ["trigger-long-running-operation", "echo"]}),
        )],
    );
    let _daemon = env.start_daemon();
    let mut front = RawStdio::spawn(&env.stdio_front("everything", AGENT, &env.control_socket));
    front.handshake("stdio-raw");
    let long = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "trigger-long-running-operation", "arguments": {"duration": 2, "steps": 1}}});
    let echo = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": "same id"}}});
    front.send(long.to_string().as_bytes());
    front.send(echo.to_string().as_bytes());
    let answers = front.responses(2, "the refusal, then the long call's answer");
    assert_eq!(answers[0]["error"]["code"], -32600, "{answers:?}");
    assert!(
        answers[0]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("already in use")),
        "{answers:?}"
    );
    assert!(
        text(&answers[1]["result"]).contains("Long running operation completed"),
        "{answers:?}"
    );
    front.send(echo.to_string().as_bytes());
    let again = front.responses(1, "the echo once the id is free").remove(0);
    assert_eq!(text(&again["result"]), "Echo: same id", "{again}");
}

/// The control socket is its owner's only (0600). A request line on it over its limit (an
/// agent's message, a server's, and 64 KiB for the record around them) is refused in its turn
/// without being held, and the connection goes on: the request after it is answered.
#[test]
fn the_control_socket_refuses_a_line_over_its_limit_and_keeps_serving() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    let env = TestEnv::new("control-socket-line-limit", PROBE);
    let peers = Peers::require();
    write_everything_policy(&env, &peers, vec![]);
    edit_policy(&env, |document| {
        document["daemon"]["max_message_bytes"] = json!(1024);
        document["daemon"]["max_server_message_bytes"] = json!(1024);
    });
    let _daemon = env.start_daemon();
    // Only the daemon's user (and root) may reach it.
    let mode = std::fs::metadata(&env.control_socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");

    let mut socket = std::os::unix::net::UnixStream::connect(&env.control_socket).unwrap();
    let mut lines = "x".repeat(200_000);
    lines.push('\n');
    lines.push_str("{\"op\": \"no_such_op\"}\n");
    socket.write_all(lines.as_bytes()).unwrap();
    let mut answers = BufReader::new(&socket).lines();
    let mut answer =
        || -> Value { serde_json::from_str(&answers.next().expect("an answer").unwrap()).unwrap() };
    let over = answer();
    assert_eq!(over["ok"], false, "{over}");
    let limit = 1024 + 1024 + 64 * 1024;
    assert_eq!(
        over["error"],
        format!("a request of 200000 bytes, over the control socket's limit of {limit}"),
        "{over}"
    );
    let next = answer();
    assert_eq!(next["ok"], false, "{next}");
    assert!(
        next["error"]
            .as_str()
            .is_some_and(|e| e.contains("no_such_op")),
        "the request after the long line was not read as its own: {next}"
    );
}

/// Rewrites the test's policy file with `edit` applied to it.
fn edit_policy(env: &TestEnv, edit: impl FnOnce(&mut Value)) {
    let mut document: Value =
        serde_json::from_str(&std::fs::read_to_string(&env.policy_path).unwrap()).unwrap();
    edit(&mut document);
    env.write_policy_document(&document);
}

/// `resources/list` is filtered page by page. mcp-fast-server offers 21 resources in pages of
/// 5; through the stdio front each page holds exactly the resources of the server's page that
/// the caller may read (an allow glob, minus a deny rule), with the server's cursor, so a page
/// with nothing left to show still leads to the next, and all pages together are exactly the
/// readable ones. A read of the denied resource and of one no rule covers is refused with
/// -32010 naming the deny rule and `default-deny`, and is on record as `deny`; an allowed
/// read returns the resource.
#[test]
fn every_page_of_a_resource_list_shows_only_what_the_caller_may_read() {
    let env = TestEnv::new("stdio-front-resource-pages", PROBE);
    let server = vec![FAST_SERVER.to_string(), "--resources".into(), "20".into()];
    write_policy(
        &env,
        json!({"fast": stdio_server(server.clone(), vec![
            allow("list", json!({"roles": [DEVELOPER], "methods": ["resources/list"]})),
            allow("items", json!({"roles": [DEVELOPER], "resources": ["note://items/?"]})),
            deny("no-item-3", json!({"resources": ["note://items/3"]})),
        ])}),
    );
    let _daemon = env.start_daemon();
    let mut direct = RawStdio::spawn(&server);
    direct.handshake("resource-pages-direct");
    let offered = direct.list_pages("resources/list");
    let mut front = RawStdio::spawn(&env.stdio_front("fast", AGENT, &env.control_socket));
    front.handshake("resource-pages");
    let shown = front.list_pages("resources/list");

    let resources = |page: &Value| -> Vec<Value> {
        let listed = page["resources"].as_array();
        listed
            .unwrap_or_else(|| panic!("no resources in {page}"))
            .clone()
    };
    let readable = |resource: &Value| {
        let uri = resource["uri"].as_str().unwrap_or_default();
        uri.len() == "note://items/0".len()
            && uri.starts_with("note://items/")
            && uri != "note://items/3"
    };
    let expected: Vec<Vec<Value>> = offered
        .iter()
        .map(|page| resources(page).into_iter().filter(readable).collect())
        .collect();
    assert_eq!(offered.len(), 5, "the server's pages: {offered:?}");
    assert!(
        expected.iter().any(Vec::is_empty),
        "no page without a readable resource: {offered:?}"
    );
    let pages: Vec<Vec<Value>> = shown.iter().map(resources).collect();
    assert_eq!(pages, expected, "through the front: {shown:?}");
    let cursors = |pages: &[Value]| -> Vec<Value> {
        pages
            .iter()
            .map(|page| page["nextCursor"].clone())
            .collect()
    };
    assert_eq!(cursors(&shown), cursors(&offered));
    let uris: Vec<Value> = pages.iter().flatten().map(|r| r["uri"].clone()).collect();
    let readable_uris: Vec<Value> = [0, 1, 2, 4, 5, 6, 7, 8, 9]
        .iter()
        .map(|i| json!(format!("note://items/{i}")))
        .collect();
    assert_eq!(uris, readable_uris);

    let mut read = |id, uri: &str| front.request(id, "resources/read", json!({"uri": uri}));
    let allowed = read(2, "note://items/4");
    assert_eq!(
        allowed["result"]["contents"][0]["text"], "item 4",
        "{allowed}"
    );
    for (id, uri, rule) in [
        (3, "note://items/3", "no-item-3"),
        (4, "note://items/15", "default-deny"),
    ] {
        let refused = read(id, uri);
        assert_eq!(refused["error"]["code"], -32010, "{uri}: {refused}");
        assert_eq!(refused["error"]["data"]["rule"], rule, "{uri}: {refused}");
    }
    let records = audit_records(&env.audit_path());
    let reads: Vec<(&Value, &Value, &Value)> = records
        .iter()
        .filter(|r| r["method"] == "resources/read" && r.get("decision").is_some())
        .map(|r| (&r["tool"], &r["decision"], &r["rule"]))
        .collect();
    let (allow, deny) = (json!("allow"), json!("deny"));
    assert_eq!(
        reads,
        [
            (&json!("note://items/4"), &allow, &json!("items")),
            (&json!("note://items/3"), &deny, &json!("no-item-3")),
            (&json!("note://items/15"), &deny, &json!("default-deny")),
        ],
        "{records:#?}"
    );
}

/// Pipelined requests are answered as each finishes, not in the order they came. A
/// `rendezvous` call that can only end once a second one arrives is sent first, an echo right
/// behind it: the echo is answered while the first call is still waiting in the server (a
/// front that answered in order would never answer it). The second `rendezvous` then ends
/// both.
#[test]
fn pipelined_requests_are_answered_as_each_finishes() {
    let env = TestEnv::new("stdio-front-out-of-order", PROBE);
    write_policy(
        &env,
        json!({"fast": fast_server_calling(FAST_SERVER, &["echo", "rendezvous"])}),
    );
    let _daemon = env.start_daemon();
    let mut front = RawStdio::spawn(&env.stdio_front("fast", AGENT, &env.control_socket));
    front.handshake("out-of-order");
    let call = |id: u64, name: &str, arguments: Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": name, "arguments": arguments}})
        .to_string()
    };
    let meet = json!({"key": "stdio", "parties": 2});
    let lines = [
        call(2, "rendezvous", meet.clone()),
        call(3, "echo", json!({"text": "overtakes"})),
    ];
    front.send(lines.join("\n").as_bytes());
    let first = front.responses(1, "the echo's answer").remove(0);
    assert_eq!(first["id"], 3, "{first}");
    assert_eq!(text(&first["result"]), "overtakes", "{first}");

    front.send(call(4, "rendezvous", meet).as_bytes());
    let rest = front.responses(2, "both rendezvous answers");
    let mut ids: Vec<&Value> = rest.iter().map(|answer| &answer["id"]).collect();
    ids.sort_by_key(|id| id.as_i64());
    assert_eq!(ids, [&json!(2), &json!(4)], "{rest:?}");
    let mut met: Vec<&str> = rest.iter().map(|answer| text(&answer["result"])).collect();
    met.sort();
    assert_eq!(
        met,
        ["met stdio as 1 of 2", "met stdio as 2 of 2"],
        "{rest:?}"
    );
}
