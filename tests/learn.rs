//! Issue 5's learning loop end to end: a real `mcp-guard run` daemon with
//! `@modelcontextprotocol/server-everything` in `learn` mode, driven by the official Python SDK
//! client through a workflow that uses a few of the server's many tools, reads one resource
//! and makes the server fetch from two destinations. Then `mcp-guard policy suggest` over that
//! audit log must write a policy that `policy check` accepts and that, run by a fresh daemon in
//! `enforce` mode, lets the same workflow through with no refusal at all (MCP or kernel), while
//! a tool the workflow never used is refused by the proxy, arguments it never sent are refused
//! by the learned constraints, and a destination it never reached is refused by the kernel
//! (EPERM, shown with the egress probe under `mcp-guard egress exec`).
//!
//! Root only; the peers come from `cargo xtask setup`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use mcp_guard_tests::*;
use serde_json::{Value, json};

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
/// The handshake revision server-everything speaks (see PEERS.md).
const HANDSHAKE: &str = "2025-11-25";
const SERVER: &str = "everything";
/// A resource of server-everything's dynamic text template.
const RESOURCE: &str = "demo://resource/dynamic/text/1";

/// Where the server's fetches go. `declared` is named by host in the learn policy (so its
/// records carry `host`), `contacted` is declared nowhere (learn mode lets it through as
/// `would_refuse`), and `never` (on the declared address, another port) is not contacted
/// while learning.
struct Destinations {
    declared: HttpResponder,
    contacted: HttpResponder,
    never: HttpResponder,
}

impl Destinations {
    fn start() -> Destinations {
        Destinations {
            declared: HttpResponder::start(LOCALHOST_V4),
            // Not an address `localhost` resolves to, so its records carry no host name.
            contacted: HttpResponder::start(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))),
            never: HttpResponder::start(LOCALHOST_V4),
        }
    }
}

/// The learn policy: no MCP rules at all (learn mode lets everything through and records it),
/// and one egress rule by host name so that the kernel's records name the host.
fn learn_policy(env: &TestEnv, peers: &Peers, listen: SocketAddr, to: &Destinations) -> Value {
    let server = json!({
        "command": peers.everything(),
        "mode": "learn",
        "egress": [{"id": "reports", "host": "localhost",
                    "ports": [to.declared.addr.port()], "protocols": ["tcp"]}],
    });
    env.proxy_policy(listen, json!({ SERVER: server }))
}

fn fetch(url: &str) -> Value {
    json!({"op": "call_tool", "name": "gzip-file-as-resource",
           "arguments": {"name": "fetched.gz", "data": url}})
}

/// The workflow: list the tools, use three of them (one of which fetches twice), read a
/// resource.
fn workflow(to: &Destinations) -> Value {
    json!([
        {"op": "list_tools"},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "hello"}},
        {"op": "call_tool", "name": "get-sum", "arguments": {"a": 2, "b": 3}},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "world"}},
        {"op": "call_tool", "name": "get-sum", "arguments": {"a": 5, "b": 8}},
        {"op": "read_resource", "uri": RESOURCE},
        fetch(&to.declared.url("/report")),
        fetch(&to.contacted.url("/data")),
    ])
}

/// Every operation of the workflow succeeded, and the fetches reached their destinations.
fn check_workflow(run: &ClientRun, what: &str) {
    for i in 0..run.results.len() {
        let result = run.ok(i);
        assert_ne!(result["isError"], true, "{what}: operation {i}: {result}");
    }
}

/// Waits until the log at `path` holds an egress record to each of `ports`.
fn wait_for_egress(path: &Path, ports: &[u16]) -> Vec<Value> {
    let mut records = Vec::new();
    let arrived = poll_until(TIMEOUT, || {
        records = audit_records(path);
        ports.iter().all(|port| {
            records
                .iter()
                .any(|r| r["kind"] == "egress" && r["port"] == *port)
        })
    });
    assert!(
        arrived,
        "no egress record to each of {ports:?} in {}: {records:#?}",
        path.display()
    );
    records
}

/// The learned rule of `server` with this id.
fn rule<'a>(policy: &'a Value, id: &str) -> &'a Value {
    policy["servers"][SERVER]["rules"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["id"] == id))
        .unwrap_or_else(|| panic!("no rule {id} in {policy:#}"))
}

#[test]
fn a_suggested_policy_allows_the_learned_workflow_and_nothing_else() {
    let env = TestEnv::new("learn-suggest", PROBE);
    let peers = Peers::require();
    let to = Destinations::start();
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let url = format!("http://{listen}/servers/{SERVER}/mcp");
    let ports = [to.declared.addr.port(), to.contacted.addr.port()];

    // 1. Learn.
    env.write_policy_document(&learn_policy(&env, &peers, listen, &to));
    let learn_policy_path = env.dir().join("learn-policy.json");
    std::fs::copy(&env.policy_path, &learn_policy_path).expect("keep the learn policy");
    let daemon = env.start_daemon();
    let run = mcp_client(&peers, Transport::Http(&url), HANDSHAKE, &workflow(&to));
    check_workflow(&run, "learn mode");
    let exposed = run.ok(0)["tools"].as_array().expect("tools").len();
    assert!(
        exposed > 3,
        "server-everything offers many tools: {exposed}"
    );
    let learned = wait_for_egress(&env.audit_path(), &ports);
    assert!(
        learned
            .iter()
            .any(|r| r["port"] == ports[1] && r["verdict"] == "would_refuse"),
        "learn mode lets the undeclared fetch through as would_refuse"
    );
    drop(daemon);

    // 2. Suggest: the policy to --out and the JSON report on stdout, then the policy on stdout
    // and the text report on stderr. The two never share a stream.
    let suggested_path = env.dir().join("suggested.json");
    let audit_path = env.audit_path();
    let suggest = |extra: &[&str]| {
        let mut args = vec!["policy", "suggest", "--audit", path_str(&audit_path)];
        args.extend(["--policy", path_str(&learn_policy_path)]);
        args.extend(extra);
        let run = mcp_guard(&args);
        assert!(run.status.success(), "{}", run.report());
        run
    };
    let json_run = suggest(&["--out", path_str(&suggested_path), "--json"]);
    let report: Value = serde_json::from_str(&json_run.stdout)
        .unwrap_or_else(|e| panic!("the JSON report on stdout ({e}): {}", json_run.report()));
    check_report(&report, exposed, &ports);
    let suggested: Value =
        serde_json::from_str(&std::fs::read_to_string(&suggested_path).unwrap()).unwrap();
    let text_run = suggest(&[]);
    let on_stdout: Value = serde_json::from_str(&text_run.stdout).expect("the policy on stdout");
    assert_eq!(
        on_stdout, suggested,
        "the same suggestion, deterministically"
    );
    let used = format!("tools: used 3 of {exposed} exposed");
    assert!(text_run.stderr.contains(&used), "{}", text_run.stderr);
    eprintln!("{}", text_run.stderr);
    let check = mcp_guard(&["policy", "check", path_str(&suggested_path)]);
    assert!(check.status.success(), "policy check: {}", check.report());
    check_suggestion(&suggested, &peers);

    // 3. Enforce the suggestion with a fresh daemon and a fresh log.
    let mut enforced = suggested.clone();
    let enforce_log = env.dir().join("enforce.jsonl");
    enforced["audit"]["path"] = json!(enforce_log);
    env.write_policy_document(&enforced);
    let daemon = env.start_daemon();
    let run = mcp_client(&peers, Transport::Http(&url), HANDSHAKE, &workflow(&to));
    check_workflow(&run, "enforce mode on the suggestion");
    assert_eq!(
        run.ok(0)["tools"].as_array().map(Vec::len),
        Some(3),
        "tools/list shows only the learned tools: {}",
        run.ok(0)
    );
    let records = wait_for_egress(&enforce_log, &ports);
    for record in &records {
        assert_ne!(
            record["decision"], "deny",
            "the workflow was refused: {record}"
        );
        assert_ne!(record["decision"], "would_deny", "{record}");
        assert!(
            record["verdict"].is_null() || record["verdict"] == "allow",
            "the kernel refused the workflow: {record}"
        );
        assert!(record["mode"].is_null(), "enforce mode: {record}");
    }

    // 4. What the workflow never did is refused.
    let refused = mcp_client(
        &peers,
        Transport::Http(&url),
        HANDSHAKE,
        &json!([
            {"op": "call_tool", "name": "get-env", "arguments": {}},
            {"op": "call_tool", "name": "echo", "arguments": {"message": "never said"}},
            fetch(&to.never.url("/exfiltrate")),
            {"op": "list_prompts"},
        ]),
    );
    let unknown = refused.error(0);
    assert_eq!(unknown["code"], -32602, "{unknown}");
    assert!(
        unknown["message"]
            .as_str()
            .unwrap_or_default()
            .contains("get-env"),
        "{unknown}"
    );
    for i in [1, 2, 3] {
        let error = refused.error(i);
        assert_eq!(error["code"], -32010, "operation {i}: {error}");
    }
    assert!(
        refused.error(1)["data"]["rule"] == "learned-developer-echo",
        "an unseen argument value breaks the learned constraint: {}",
        refused.error(1)
    );
    assert!(to.never.request_lines().is_empty(), "the fetch never ran");
    let records = audit_records(&enforce_log);
    assert!(
        records.iter().any(|r| r["tool"] == "get-env"
            && r["decision"] == "deny"
            && r["rule"] == "unknown-tool"),
        "the refusal of get-env is on record"
    );

    // The kernel: the learned destination is reachable from the server's cgroup, the one never
    // contacted is not.
    let never = attempt("tcp", to.never.addr);
    let contacted = attempt("tcp", to.contacted.addr);
    let probe = env.exec_probe(SERVER, None, &[&contacted, &never]);
    probe
        .assert_success()
        .assert_results(&[(&contacted, "ok"), (&never, "EPERM")]);
    drop(daemon);
}

/// The scope report: the workflow used 3 of the exposed tools, learn mode allowed them all, the
/// suggestion allows the 3; both destinations are reported as used.
fn check_report(report: &Value, exposed: usize, ports: &[u16]) {
    let server = &report["servers"][0];
    assert_eq!(server["server"], SERVER, "{report:#}");
    assert_eq!(server["basis"], "learn_mode", "{report:#}");
    assert_eq!(server["tools_exposed"], exposed, "{report:#}");
    let caller = &server["callers"][0];
    assert_eq!(caller["caller"], json!({"role": DEVELOPER}), "{report:#}");
    let tools = &caller["tools"];
    assert_eq!(tools["used"], 3, "{tools:#}");
    assert_eq!(tools["allowed_before"], exposed, "{tools:#}");
    assert_eq!(tools["allowed_after"], 3, "{tools:#}");
    assert_eq!(
        tools["used_tools"],
        json!({"echo": 2, "get-sum": 2, "gzip-file-as-resource": 2})
    );
    let removed = (exposed - 3) * 100;
    let rounded = (removed * 2 + exposed) / (2 * exposed);
    assert_eq!(tools["removed_percent"], rounded, "{tools:#}");
    // gzip-file-as-resource is the one the server does not declare read-only.
    let write = &caller["write_tools"];
    assert_eq!(write["used"], 1, "{write:#}");
    assert_eq!(write["allowed_after"], 1, "{write:#}");
    assert_eq!(caller["resources_used"], json!([RESOURCE]), "{caller:#}");
    let used = server["egress"]["used"].as_array().expect("egress used");
    for port in ports {
        assert!(
            used.iter()
                .any(|u| u["port"] == *port && u["protocol"] == "tcp"),
            "port {port} not reported as used: {used:#?}"
        );
    }
    assert!(
        used.iter()
            .any(|u| u["destination"] == "localhost" && u["port"] == ports[0]),
        "the declared destination is known by its host name: {used:#?}"
    );
}

/// The suggestion keeps the launch settings, enforces, and has one rule per narrowed tool.
fn check_suggestion(policy: &Value, peers: &Peers) {
    let server = &policy["servers"][SERVER];
    assert_eq!(server["command"], json!(peers.everything()));
    assert!(server.get("mode").is_none(), "{server:#}");
    assert!(
        policy.get("mode").is_none(),
        "enforce is the default: {policy:#}"
    );
    assert_eq!(
        rule(policy, "learned-developer-echo")["arguments"]["properties"]["message"],
        json!({"enum": ["hello", "world"]})
    );
    assert_eq!(
        rule(policy, "learned-developer-get-sum")["arguments"]["properties"]["a"],
        json!({"minimum": 2, "maximum": 5})
    );
    assert_eq!(
        rule(policy, "learned-developer-resources")["resources"],
        json!([RESOURCE])
    );
    let lists = rule(policy, "learned-developer-methods");
    assert_eq!(lists["methods"], json!(["tools/list"]), "{lists:#}");
    assert!(
        lists["description"]
            .as_str()
            .unwrap_or_default()
            .contains("tools/list (1 call, first seen"),
        "{lists:#}"
    );
    let egress = server["egress"].as_array().expect("egress");
    assert!(
        egress.iter().any(|r| r["host"] == "localhost"),
        "{egress:#?}"
    );
    assert!(
        egress.iter().any(|r| r["cidr"] == "127.0.0.2/32"),
        "{egress:#?}"
    );
}
