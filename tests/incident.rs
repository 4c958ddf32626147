//! Issue 4's incident, reproduced end to end: agent sessions under different principals and
//! instructions make dozens of calls through a real MCP server (`server-everything` over
//! stdio) whose `gzip-file-as-resource` tool fetches a URL, so some calls make a real outbound
//! connection from the server process, to a destination the policy declares (allowed by the
//! kernel) or to one it does not (refused by the kernel). Then the audit log must answer "what
//! did instruction X cause, down to each network connection" (`mcp-guard audit trace`), prove
//! itself intact (`mcp-guard audit verify`) and fail to verify after any tampering; each record
//! must carry the caller's identity, and `/metrics` must count what happened.
//!
//! Every expectation is computed from what the test sent (and, for ids mcp-guard chose, from
//! a parse of the audit log that is independent of `audit trace`). Root only; the peers come
//! from `cargo xtask setup`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use mcp_guard_tests::*;
use serde_json::{Value, json};

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
const FAST_SERVER: &str = env!("CARGO_BIN_EXE_mcp-fast-server");

/// The handshake revision server-everything speaks (see PEERS.md).
const HANDSHAKE: &str = "2025-11-25";
const SERVER: &str = "everything";

/// Principals of the incident. The HTTP front attributes a session to `daemon.principal` as
/// it is when the session opens (bearer tokens are not there yet), so the test changes it
/// with a policy reload between two groups of sessions; `carol` uses the stdio front.
const ALICE: &str = "alice";
const BOB: &str = "bob";
const CAROL: &str = "carol";

/// The instructions behind the work.
const CRM_SYNC: &str = "instr-crm-sync-4711";
const REPORT: &str = "instr-weekly-report-88";
const CLEANUP: &str = "instr-cleanup-job-3";
/// The instruction of the stdio-front session.
const STDIO_WORK: &str = "instr-carol-stdio-9";

/// The egress rule that declares the fetchable listener.
const DECLARED_RULE: &str = "declared-http";

// ---------------------------------------------------------------------------------------------
// What the agents do
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// `echo`, allowed.
    Echo,
    /// `echo` of a secret: refused by the `no-secrets` rule, never reaches the server.
    Denied,
    /// `gzip-file-as-resource` of a URL on the declared listener: one allowed connection.
    FetchDeclared,
    /// `gzip-file-as-resource` of a URL on the undeclared listener: one refused connection.
    FetchUndeclared,
}

use Action::{Denied, Echo, FetchDeclared, FetchUndeclared};

impl Action {
    fn tool(self) -> &'static str {
        match self {
            Echo | Denied => "echo",
            FetchDeclared | FetchUndeclared => "gzip-file-as-resource",
        }
    }

    fn decision(self) -> &'static str {
        if self == Denied { "deny" } else { "allow" }
    }

    fn rule(self) -> &'static str {
        match self {
            Echo => "echo",
            Denied => "no-secrets",
            FetchDeclared | FetchUndeclared => "fetch",
        }
    }

    /// The kernel's verdict on the one connection the call makes, if it makes one.
    fn verdict(self) -> Option<&'static str> {
        match self {
            FetchDeclared => Some("allow"),
            FetchUndeclared => Some("refuse"),
            Echo | Denied => None,
        }
    }
}

/// How a request names its instruction.
#[derive(Clone, Copy, Debug)]
enum Carrier {
    /// `MCP-Guard-Instruction: ID`
    Header,
    /// W3C `baggage: ...,mcp.instruction=ID;...`
    Baggage,
    /// `params._meta["io.mcp-guard/instruction"]`
    Meta,
}

const CARRIERS: [Carrier; 3] = [Carrier::Header, Carrier::Baggage, Carrier::Meta];

#[derive(Clone, Copy, Debug)]
struct Step {
    instruction: &'static str,
    action: Action,
}

/// One agent session: a run of the SDK client through one script.
struct SessionPlan {
    /// Names the session in URLs it fetches and in failure messages.
    label: &'static str,
    principal: &'static str,
    steps: Vec<Step>,
}

fn plan(
    label: &'static str,
    principal: &'static str,
    steps: &[(&'static str, Action)],
) -> SessionPlan {
    SessionPlan {
        label,
        principal,
        steps: steps
            .iter()
            .map(|&(instruction, action)| Step {
                instruction,
                action,
            })
            .collect(),
    }
}

impl SessionPlan {
    /// What the audit log must show for this session's tools/call, in order: (instruction,
    /// tool, decision). Unique per plan, so the log's sessions can be told apart by it.
    fn signature(&self) -> Vec<(Option<String>, String, String)> {
        self.steps
            .iter()
            .map(|step| {
                (
                    Some(step.instruction.to_owned()),
                    step.action.tool().to_owned(),
                    step.action.decision().to_owned(),
                )
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// A daemon in front of server-everything, with the two destinations
// ---------------------------------------------------------------------------------------------

/// A running daemon (HTTP front on, kernel egress on) serving `everything`. Fields drop in
/// order: the daemon stops before the environment tears its cgroups and pins down.
struct Incident {
    daemon: Option<Daemon>,
    env: TestEnv,
    peers: Peers,
    addr: SocketAddr,
    /// The policy document in force (changed by [`Incident::reload_as`]).
    document: Value,
    /// Declared in the server's egress policy: fetches reach it.
    declared: HttpResponder,
    /// Not declared: the kernel refuses connections to it.
    undeclared: Listener,
}

impl Incident {
    /// `metrics` adds a `/metrics` listener on that address.
    fn start(tag: &str, metrics: Option<SocketAddr>) -> Incident {
        let env = TestEnv::new(tag, PROBE);
        let peers = Peers::require();
        let declared = HttpResponder::start(LOCALHOST_V4);
        let undeclared = Listener::tcp(LOCALHOST_V4);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
        let servers = json!({
            SERVER: {
                "command": peers.everything(),
                "egress": [rule(DECLARED_RULE, "127.0.0.1/32", &[declared.addr.port()], &["tcp"])],
                "rules": everything_rules(),
            }
        });
        let mut document = env.proxy_policy(addr, servers);
        document["principals"] = json!({
            ALICE: {"roles": [DEVELOPER]},
            BOB: {"roles": [DEVELOPER]},
            CAROL: {"roles": [DEVELOPER]},
        });
        document["daemon"]["principal"] = json!(ALICE);
        if let Some(metrics) = metrics {
            document["daemon"]["metrics_listen"] = json!(metrics.to_string());
        }
        env.write_policy_document(&document);
        let daemon = env.start_daemon();
        Incident {
            daemon: Some(daemon),
            env,
            peers,
            addr,
            document,
            declared,
            undeclared,
        }
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("the daemon was stopped")
    }

    fn url(&self) -> String {
        format!("http://{}/servers/{SERVER}/mcp", self.addr)
    }

    /// Sessions opened from now on are `principal`'s: the policy's `daemon.principal`
    /// changes, and the daemon reloads it. Open sessions keep their principal.
    fn reload_as(&mut self, principal: &str) {
        self.document["daemon"]["principal"] = json!(principal);
        let daemon = self.daemon.as_ref().expect("the daemon was stopped");
        let mark = daemon.log.mark();
        self.env.write_policy_document(&self.document);
        daemon.sighup();
        daemon.wait_for_since(mark, TIMEOUT, "\"policy reloaded\"", |line| {
            message(line) == Some("policy reloaded")
        });
    }

    /// The SDK client's script for `plan`: one tools/call per step, its instruction carried
    /// by header, baggage or `_meta` in turn (`rotation` shifts which comes first).
    fn script(&self, plan: &SessionPlan, rotation: usize) -> Value {
        let ops: Vec<Value> = plan
            .steps
            .iter()
            .enumerate()
            .map(|(i, step)| {
                let carrier = CARRIERS[(i + rotation) % CARRIERS.len()];
                self.operation(plan.label, i, *step, carrier)
            })
            .collect();
        Value::Array(ops)
    }

    fn operation(&self, label: &str, i: usize, step: Step, carrier: Carrier) -> Value {
        let path = format!("/{label}/{i}");
        let arguments = match step.action {
            Echo => json!({"message": format!("{label} step {i}")}),
            Denied => json!({"message": format!("the secret of {label} step {i}")}),
            FetchDeclared => json!({"name": "declared.gz", "data": self.declared.url(&path)}),
            FetchUndeclared => json!({
                "name": "undeclared.gz",
                "data": format!("http://{}{path}", self.undeclared.addr),
            }),
        };
        let mut op = json!({"op": "call_tool", "name": step.action.tool(), "arguments": arguments});
        let instruction = step.instruction;
        match carrier {
            Carrier::Header => op["headers"] = json!({"MCP-Guard-Instruction": instruction}),
            Carrier::Baggage => {
                op["headers"] = json!({
                    "baggage": format!("tenant=acme,mcp.instruction={instruction};origin=agent")
                })
            }
            Carrier::Meta => op["meta"] = json!({"io.mcp-guard/instruction": instruction}),
        }
        op
    }

    /// Runs every plan as its own SDK client session over HTTP, all at once.
    fn run_sessions(&self, plans: &[&SessionPlan], rotation: usize) -> Vec<ClientRun> {
        let url = self.url();
        std::thread::scope(|scope| {
            let handles: Vec<_> = plans
                .iter()
                .enumerate()
                .map(|(k, plan)| {
                    let script = self.script(plan, rotation + k);
                    let url = url.clone();
                    scope.spawn(move || {
                        mcp_client(&self.peers, Transport::Http(&url), HANDSHAKE, &script)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client thread"))
                .collect()
        })
    }

    /// The stdio front (`mcp-guard stdio --principal NAME`), placed by the running daemon.
    fn stdio_front(&self, principal: &str) -> Vec<String> {
        self.env
            .stdio_front(SERVER, principal, &self.env.control_socket)
    }

    /// Stops the daemon (SIGTERM, waiting for it to exit), so the log is complete and still.
    fn stop(&mut self) {
        drop(self.daemon.take());
    }

    fn audit_path(&self) -> PathBuf {
        self.env.audit_path()
    }
}

/// MCP rules of `everything`: echo and the fetching tool are allowed, echoing a secret is not.
fn everything_rules() -> Vec<Value> {
    vec![
        list_tools_rule(),
        allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        allow(
            "fetch",
            json!({"roles": [DEVELOPER], "tools": ["gzip-file-as-resource"]}),
        ),
        deny(
            "no-secrets",
            json!({
                "tools": ["echo"],
                "arguments": {
                    "type": "object",
                    "required": ["message"],
                    "properties": {"message": {"type": "string", "pattern": "secret"}},
                },
            }),
        ),
    ]
}

/// Checks each answer the client got against what its step should have caused.
fn check_answers(plan: &SessionPlan, run: &ClientRun) {
    for (i, step) in plan.steps.iter().enumerate() {
        let what = format!("{} step {i} ({:?})", plan.label, step.action);
        match step.action {
            Echo => {
                let result = run.ok(i);
                assert_eq!(
                    result["content"][0]["text"],
                    format!("Echo: {} step {i}", plan.label),
                    "{what}: {result}"
                );
            }
            Denied => {
                let error = run.error(i);
                assert_eq!(
                    error["code"], -32010,
                    "{what}: not a policy refusal: {error}"
                );
                assert_eq!(error["data"]["rule"], "no-secrets", "{what}: {error}");
            }
            FetchDeclared => {
                let result = run.ok(i);
                assert_ne!(
                    result["isError"], true,
                    "{what}: the fetch of the declared URL failed: {result}"
                );
            }
            FetchUndeclared => {
                let line = &run.results[i];
                assert!(
                    line["ok"] == false || line["result"]["isError"] == true,
                    "{what}: the fetch of the undeclared URL cannot have succeeded: {line}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the audit log (independently of `audit trace`)
// ---------------------------------------------------------------------------------------------

/// Every record of the log, in file order; fails on a line that is not JSON or a `seq` that
/// does not count up from 1.
fn read_records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("read the audit log {}: {err}", path.display()));
    let records: Vec<Value> = whole_lines(&text)
        .enumerate()
        .map(|(n, line)| {
            serde_json::from_str(line).unwrap_or_else(|err| {
                panic!("{}:{}: not JSON ({err}): {line}", path.display(), n + 1)
            })
        })
        .collect();
    for (n, record) in records.iter().enumerate() {
        assert_eq!(
            record["seq"].as_u64(),
            Some(n as u64 + 1),
            "{}:{}: seq does not count up from 1: {record}",
            path.display(),
            n + 1
        );
    }
    records
}

fn text_of(record: &Value, field: &str) -> Option<String> {
    record[field].as_str().map(str::to_owned)
}

/// One call as its decision and outcome records tell it.
#[derive(Clone, Debug)]
struct LoggedCall {
    call_id: String,
    decision_record: Value,
    decision_seq: u64,
    outcome_record: Option<Value>,
}

impl LoggedCall {
    fn field(&self, name: &str) -> Option<String> {
        text_of(&self.decision_record, name)
    }

    fn session(&self) -> String {
        self.field("session")
            .unwrap_or_else(|| panic!("call without a session: {}", self.decision_record))
    }

    fn outcome_kind(&self) -> Option<String> {
        self.outcome_record
            .as_ref()
            .and_then(|record| text_of(&record["outcome"], "kind"))
    }
}

/// The fields a call's decision and outcome records must agree on.
const CALL_IDENTITY_FIELDS: [&str; 8] = [
    "principal",
    "session",
    "instruction",
    "trace_id",
    "server",
    "method",
    "tool",
    "call_id",
];

/// The calls of the log by call id. Fails unless every call record is either a decision or
/// an outcome, every call has exactly one decision, at most one outcome, and the outcome comes
/// after its decision (higher `seq`) with the same identity.
fn logged_calls(records: &[Value]) -> BTreeMap<String, LoggedCall> {
    let mut calls: BTreeMap<String, LoggedCall> = BTreeMap::new();
    for record in records.iter().filter(|r| r["kind"] == "call") {
        let seq = record["seq"].as_u64().expect("seq");
        let call_id = text_of(record, "call_id")
            .unwrap_or_else(|| panic!("a call record without call_id: {record}"));
        let is_decision = !record["decision"].is_null();
        let is_outcome = !record["outcome"].is_null();
        assert!(
            is_decision != is_outcome,
            "a call record must be a decision or an outcome, not {}: {record}",
            if is_decision { "both" } else { "neither" }
        );
        if is_decision {
            let previous = calls.insert(
                call_id.clone(),
                LoggedCall {
                    call_id: call_id.clone(),
                    decision_record: record.clone(),
                    decision_seq: seq,
                    outcome_record: None,
                },
            );
            assert!(
                previous.is_none(),
                "call {call_id} has a second decision record (seq {seq}): {record}"
            );
            continue;
        }
        let call = calls.get_mut(&call_id).unwrap_or_else(|| {
            panic!("the outcome record (seq {seq}) of call {call_id} has no decision before it: {record}")
        });
        assert!(
            call.outcome_record.is_none(),
            "call {call_id} has a second outcome record (seq {seq}): {record}"
        );
        assert!(seq > call.decision_seq, "outcome before decision: {record}");
        assert_eq!(
            call.decision_record["decision"], "allow",
            "a refused call has an outcome (it must never have reached the server): {record}"
        );
        for field in CALL_IDENTITY_FIELDS {
            assert_eq!(
                record[field], call.decision_record[field],
                "call {call_id}: its outcome's {field} differs from its decision's:\n{}\n{record}",
                call.decision_record
            );
        }
        call.outcome_record = Some(record.clone());
    }
    calls
}

fn egress_records(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["kind"] == "egress").collect()
}

/// The egress records that name `call_id` among their calls.
fn egress_of<'a>(records: &'a [Value], call_id: &str) -> Vec<&'a Value> {
    egress_records(records)
        .into_iter()
        .filter(|r| {
            r["call_ids"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|id| id == call_id))
        })
        .collect()
}

/// Waits until the log holds `declared` connection records to the declared listener's port
/// and `undeclared` ones to the undeclared listener's (the kernel's events are recorded
/// after the calls that caused them may have returned).
fn wait_for_egress_records(incident: &Incident, declared: usize, undeclared: usize) {
    let ports = (
        u64::from(incident.declared.addr.port()),
        u64::from(incident.undeclared.port()),
    );
    let mut counts = (0, 0);
    let arrived = poll_until(TIMEOUT, || {
        counts = (0, 0);
        for record in audit_records(&incident.audit_path()) {
            if record["kind"] != "egress" {
                continue;
            }
            if record["port"].as_u64() == Some(ports.0) {
                counts.0 += 1;
            } else if record["port"].as_u64() == Some(ports.1) {
                counts.1 += 1;
            }
        }
        counts.0 >= declared && counts.1 >= undeclared
    });
    assert!(
        arrived,
        "the audit log holds {} records of connections to the declared listener and {} to the \
         undeclared one; the calls made {declared} and {undeclared}. Daemon log:\n{}",
        counts.0,
        counts.1,
        incident.daemon().log.summary(10, 30)
    );
}

// ---------------------------------------------------------------------------------------------
// 1. The incident: audit trace --instruction
// ---------------------------------------------------------------------------------------------

/// Five agent sessions (three of `alice`, then, after a policy reload makes the HTTP front
/// attribute new sessions to `bob`, two of `bob`) make 40 calls for three instructions, each
/// request naming its instruction by header, baggage or `_meta` in turn: echoes, a refused
/// echo of a secret, and fetches of the declared URL (the kernel allows the connection) and
/// of the undeclared one (refused). A sixth session, `carol`'s through the stdio front
/// (`mcp-guard stdio`, placed and recorded by the running daemon), works for a fourth
/// instruction, concurrently with `bob`'s.
///
/// For each instruction, `audit trace --instruction ID --json` must list exactly the calls
/// the log's own decision records attribute to it (its sessions, principals, decisions and
/// outcomes) and under each call exactly the connection it made, with the kernel's verdict
/// and `exact` attribution, and nothing of any other instruction; the text tree must name the
/// instruction, its sessions and principals and its calls.
#[test]
fn instruction_trace_lists_exactly_its_calls_and_connections() {
    let mut incident = Incident::start("incident-trace", None);
    let alice = [
        plan(
            "alice-a",
            ALICE,
            &[
                (CRM_SYNC, FetchDeclared),
                (CRM_SYNC, Echo),
                (REPORT, FetchUndeclared),
                (CRM_SYNC, FetchUndeclared),
                (REPORT, Echo),
                (CRM_SYNC, FetchDeclared),
                (REPORT, FetchDeclared),
                (CRM_SYNC, Denied),
            ],
        ),
        plan(
            "alice-b",
            ALICE,
            &[
                (CLEANUP, Echo),
                (CRM_SYNC, FetchDeclared),
                (CLEANUP, FetchUndeclared),
                (CRM_SYNC, Echo),
                (CLEANUP, FetchDeclared),
                (CRM_SYNC, FetchUndeclared),
                (CLEANUP, Echo),
                (REPORT, Denied),
            ],
        ),
        plan(
            "alice-c",
            ALICE,
            &[
                (REPORT, FetchDeclared),
                (CLEANUP, FetchDeclared),
                (REPORT, FetchUndeclared),
                (CLEANUP, Echo),
                (REPORT, Echo),
                (CLEANUP, FetchUndeclared),
                (REPORT, FetchDeclared),
                (CLEANUP, Denied),
            ],
        ),
    ];
    let bob = [
        plan(
            "bob-a",
            BOB,
            &[
                (CRM_SYNC, FetchUndeclared),
                (CLEANUP, FetchDeclared),
                (CRM_SYNC, FetchDeclared),
                (CRM_SYNC, Echo),
                (CLEANUP, FetchUndeclared),
                (CRM_SYNC, FetchDeclared),
                (CLEANUP, Echo),
                (CRM_SYNC, Echo),
            ],
        ),
        plan(
            "bob-b",
            BOB,
            &[
                (REPORT, Echo),
                (CLEANUP, FetchDeclared),
                (REPORT, FetchUndeclared),
                (CLEANUP, FetchUndeclared),
                (REPORT, FetchDeclared),
                (CLEANUP, Echo),
                (REPORT, Echo),
                (REPORT, FetchDeclared),
            ],
        ),
    ];
    let carol = plan(
        "carol-stdio",
        CAROL,
        &[
            (STDIO_WORK, FetchDeclared),
            (STDIO_WORK, Echo),
            (STDIO_WORK, FetchUndeclared),
        ],
    );
    let plans: Vec<&SessionPlan> = alice.iter().chain(bob.iter()).collect();
    let signatures: BTreeSet<_> = plans.iter().map(|p| p.signature()).collect();
    assert_eq!(signatures.len(), plans.len(), "plans must differ");
    let total_calls: usize = plans.iter().map(|p| p.steps.len()).sum();
    assert!(total_calls >= 30, "dozens of calls: {total_calls}");

    let alice_refs: Vec<&SessionPlan> = alice.iter().collect();
    let alice_runs = incident.run_sessions(&alice_refs, 0);
    incident.reload_as(BOB);
    let bob_refs: Vec<&SessionPlan> = bob.iter().collect();
    let (bob_runs, carol_run) = std::thread::scope(|scope| {
        let carol_script = incident.script(&carol, 2);
        // The stdio front has no headers: every request names its instruction in `_meta`.
        let carol_script = Value::Array(
            carol_script
                .as_array()
                .unwrap()
                .iter()
                .map(|op| {
                    let mut op = op.clone();
                    op.as_object_mut().unwrap().remove("headers");
                    op["meta"] = json!({"io.mcp-guard/instruction": STDIO_WORK});
                    op
                })
                .collect(),
        );
        let command = incident.stdio_front(CAROL);
        let peers = &incident.peers;
        let carol = scope
            .spawn(move || mcp_client(peers, Transport::Stdio(&command), HANDSHAKE, &carol_script));
        let bob_runs = incident.run_sessions(&bob_refs, 1);
        (bob_runs, carol.join().expect("carol's client"))
    });
    for (plan, run) in plans.iter().zip(alice_runs.iter().chain(bob_runs.iter())) {
        check_answers(plan, run);
    }
    check_answers(&carol, &carol_run);

    // The connections, as the listeners saw them: every declared fetch arrived, no refused one.
    let count = |plans: &[&SessionPlan], action: Action| -> usize {
        plans
            .iter()
            .flat_map(|p| p.steps.iter())
            .filter(|s| s.action == action)
            .count()
    };
    let all_plans: Vec<&SessionPlan> = plans.iter().copied().chain([&carol]).collect();
    let declared_fetches = count(&all_plans, FetchDeclared);
    let undeclared_fetches = count(&all_plans, FetchUndeclared);
    assert!(incident.declared.wait_for_requests(declared_fetches));
    let expected_paths: BTreeSet<String> = all_plans
        .iter()
        .flat_map(|p| {
            p.steps
                .iter()
                .enumerate()
                .filter(|(_, s)| s.action == FetchDeclared)
                .map(|(i, _)| format!("GET /{}/{i} HTTP/1.1", p.label))
        })
        .collect();
    let seen_paths = incident.declared.request_lines();
    assert_eq!(
        seen_paths.iter().cloned().collect::<BTreeSet<_>>(),
        expected_paths,
        "the declared listener's requests"
    );
    assert_eq!(seen_paths.len(), declared_fetches, "{seen_paths:?}");
    assert!(
        incident.undeclared.received().is_empty(),
        "a refused connection reached the undeclared listener: {:?}",
        incident.undeclared.received()
    );

    wait_for_egress_records(&incident, declared_fetches, undeclared_fetches);
    incident.stop();
    let audit = incident.audit_path();
    let records = read_records(&audit);
    let calls = logged_calls(&records);

    // The log's sessions, told apart by what they called (in seq order).
    let mut by_session: BTreeMap<String, Vec<&LoggedCall>> = BTreeMap::new();
    for call in calls.values() {
        if call.field("method").as_deref() == Some("tools/call") {
            by_session.entry(call.session()).or_default().push(call);
        }
    }
    for session_calls in by_session.values_mut() {
        session_calls.sort_by_key(|c| c.decision_seq);
    }
    // plan index → (session id, its calls in step order)
    let mapped: Vec<(String, Vec<&LoggedCall>)> = plans
        .iter()
        .map(|plan| session_of(plan, &by_session))
        .collect();
    let http_sessions: BTreeSet<String> = mapped.iter().map(|(s, _)| s.clone()).collect();

    // Each call's identity, decision, outcome and the connection it made, from the log itself.
    let http_runs = alice_runs.iter().chain(bob_runs.iter());
    for ((plan, run), (session, session_calls)) in plans.iter().zip(http_runs).zip(&mapped) {
        check_session(&incident, &records, plan, run, session, session_calls);
    }
    // No connection of an HTTP session is left unexplained.
    let fetches_of_http_sessions = count(&plans, FetchDeclared) + count(&plans, FetchUndeclared);
    let http_egress: Vec<&Value> = egress_records(&records)
        .into_iter()
        .filter(|r| {
            r["session"]
                .as_str()
                .is_some_and(|s| http_sessions.contains(s))
        })
        .collect();
    assert_eq!(
        http_egress.len(),
        fetches_of_http_sessions,
        "connections of the HTTP sessions: {http_egress:#?}"
    );

    // The whole log is intact.
    let verified = mcp_guard(&["audit", "verify", path_str(&audit)]);
    assert!(verified.status.success(), "{}", verified.report());

    // The trace of each instruction, against the log's own records.
    for instruction in [CRM_SYNC, REPORT, CLEANUP] {
        check_trace(&audit, &records, &calls, &plans, &mapped, instruction);
    }

    // Last, the stdio front's session (principal carol): the same must hold for it. Its
    // records reach the daemon's log over the control socket; its server process was placed
    // in a guarded cgroup by the daemon.
    let carol_mapped = session_of(&carol, &by_session);
    let mut all_sessions = http_sessions.clone();
    all_sessions.insert(carol_mapped.0.clone());
    assert_eq!(
        by_session.keys().cloned().collect::<BTreeSet<_>>(),
        all_sessions,
        "the log has tools/call records of sessions no client ran"
    );
    let carol_egress: Vec<&Value> = egress_records(&records)
        .into_iter()
        .filter(|r| r["session"].as_str() == Some(carol_mapped.0.as_str()))
        .collect();
    assert_eq!(
        carol_egress.len(),
        count(&[&carol], FetchDeclared) + count(&[&carol], FetchUndeclared),
        "connections recorded for the stdio-front session {}: {carol_egress:#?}\nall \
         connections outside the HTTP sessions: {:#?}",
        carol_mapped.0,
        egress_records(&records)
            .into_iter()
            .filter(|r| r["session"]
                .as_str()
                .is_none_or(|s| !http_sessions.contains(s)))
            .collect::<Vec<_>>()
    );
    check_session(
        &incident,
        &records,
        &carol,
        &carol_run,
        &carol_mapped.0,
        &carol_mapped.1,
    );
    check_trace(
        &audit,
        &records,
        &calls,
        &[&carol],
        std::slice::from_ref(&carol_mapped),
        STDIO_WORK,
    );
}

/// The one session of the log whose tools/call match `plan`'s steps, and those calls.
fn session_of<'a>(
    plan: &SessionPlan,
    by_session: &BTreeMap<String, Vec<&'a LoggedCall>>,
) -> (String, Vec<&'a LoggedCall>) {
    let signature = plan.signature();
    let matching: Vec<&String> = by_session
        .iter()
        .filter(|(_, calls)| {
            calls
                .iter()
                .map(|c| {
                    (
                        c.field("instruction"),
                        c.field("tool").unwrap_or_default(),
                        c.field("decision").unwrap_or_default(),
                    )
                })
                .collect::<Vec<_>>()
                == signature
        })
        .map(|(session, _)| session)
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "session {} ({:?}): expected exactly one session in the log with its calls; the \
         log's sessions and their calls:\n{}",
        plan.label,
        signature,
        by_session
            .iter()
            .map(|(s, calls)| format!(
                "  {s}: {:?}",
                calls
                    .iter()
                    .map(|c| (
                        c.field("principal"),
                        c.field("instruction"),
                        c.field("tool")
                    ))
                    .collect::<Vec<_>>()
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let session = matching[0].clone();
    let calls = by_session[&session].clone();
    (session, calls)
}

/// One session against the log: its start record names its principal; each call its
/// principal, rule, trace and outcome; each fetch exactly one connection record, with the
/// kernel's verdict, attributed exactly to that call and stamped with its instruction.
fn check_session(
    incident: &Incident,
    records: &[Value],
    plan: &SessionPlan,
    run: &ClientRun,
    session: &str,
    session_calls: &[&LoggedCall],
) {
    let start = records
        .iter()
        .find(|r| r["kind"] == "session" && r["session"] == session)
        .unwrap_or_else(|| panic!("no session record of {session} ({})", plan.label));
    assert_eq!(start["principal"], plan.principal, "{start}");
    assert_eq!(start["detail"]["event"], "start", "{start}");
    for ((i, step), call) in plan.steps.iter().enumerate().zip(session_calls) {
        let what = format!(
            "{} step {i} ({:?}), call {}",
            plan.label, step.action, call.call_id
        );
        assert_eq!(
            call.field("principal").as_deref(),
            Some(plan.principal),
            "{what}"
        );
        assert_eq!(call.field("server").as_deref(), Some(SERVER), "{what}");
        assert_eq!(
            call.field("rule").as_deref(),
            Some(step.action.rule()),
            "{what}"
        );
        assert!(
            call.field("trace_id").is_some_and(|t| t.len() == 32),
            "{what}: {}",
            call.decision_record
        );
        let expected_outcome = match step.action {
            Denied => None,
            Echo | FetchDeclared => Some("result"),
            FetchUndeclared if run.results[i]["ok"] == false => Some("error"),
            FetchUndeclared => Some("tool_error"),
        };
        assert_eq!(call.outcome_kind().as_deref(), expected_outcome, "{what}");
        let egress = egress_of(records, &call.call_id);
        let Some(verdict) = step.action.verdict() else {
            assert!(egress.is_empty(), "{what} made no connection: {egress:?}");
            continue;
        };
        let port = match step.action {
            FetchDeclared => incident.declared.addr.port(),
            _ => incident.undeclared.port(),
        };
        let in_session: Vec<&Value> = egress_records(records)
            .into_iter()
            .filter(|r| r["session"] == session && r["port"] == port)
            .collect();
        assert_eq!(
            egress.len(),
            1,
            "{what}: one connection record naming the call; the session's records of \
             connections to port {port}: {in_session:#?}"
        );
        let record = egress[0];
        assert_eq!(record["verdict"], verdict, "{what}: {record}");
        assert_eq!(record["port"], port, "{what}: {record}");
        assert_eq!(record["addr"], "127.0.0.1", "{what}: {record}");
        assert_eq!(record["attribution"], "exact", "{what}: {record}");
        assert_eq!(
            record["call_ids"],
            json!([call.call_id]),
            "{what}: {record}"
        );
        assert_eq!(record["call_id"], call.call_id.as_str(), "{what}: {record}");
        assert_eq!(record["instruction"], step.instruction, "{what}: {record}");
        assert_eq!(record["session"], session, "{what}: {record}");
        assert_eq!(record["server"], SERVER, "{what}: {record}");
        let rule = match verdict {
            "allow" => format!("{SERVER}/egress/{DECLARED_RULE}"),
            _ => "default-deny".to_owned(),
        };
        assert_eq!(record["rule"], rule.as_str(), "{what}: {record}");
    }
}

/// `audit trace --instruction ID` (JSON and text) against the log's own records.
fn check_trace(
    audit: &Path,
    records: &[Value],
    calls: &BTreeMap<String, LoggedCall>,
    plans: &[&SessionPlan],
    mapped: &[(String, Vec<&LoggedCall>)],
    instruction: &str,
) {
    // What the log says the instruction caused: its calls by session (seq order), with the
    // step each one was.
    let mut expected: BTreeMap<String, Vec<(&LoggedCall, Step, &'static str)>> = BTreeMap::new();
    for (plan, (session, session_calls)) in plans.iter().zip(mapped) {
        for (step, call) in plan.steps.iter().zip(session_calls) {
            if step.instruction == instruction {
                expected
                    .entry(session.clone())
                    .or_default()
                    .push((*call, *step, plan.principal));
            }
        }
    }
    let ours: BTreeSet<&str> = expected
        .values()
        .flatten()
        .map(|(call, ..)| call.call_id.as_str())
        .collect();
    let logged_ours: BTreeSet<&str> = calls
        .values()
        .filter(|c| c.field("instruction").as_deref() == Some(instruction))
        .map(|c| c.call_id.as_str())
        .collect();
    assert_eq!(
        ours, logged_ours,
        "{instruction}: the calls the clients made for it vs the log's"
    );
    let others: BTreeSet<&str> = calls
        .keys()
        .map(String::as_str)
        .filter(|id| !ours.contains(id))
        .collect();
    let expected_records = records
        .iter()
        .filter(|r| match r["kind"].as_str() {
            Some("call") => r["call_id"].as_str().is_some_and(|id| ours.contains(id)),
            Some("egress") => r["call_ids"].as_array().is_some_and(|ids| {
                ids.iter()
                    .any(|id| id.as_str().is_some_and(|id| ours.contains(id)))
            }),
            Some("session") => r["session"]
                .as_str()
                .is_some_and(|s| expected.contains_key(s)),
            _ => false,
        })
        .count();

    let run = mcp_guard(&[
        "audit",
        "trace",
        "--instruction",
        instruction,
        "--json",
        path_str(audit),
    ]);
    assert!(run.status.success(), "{}", run.report());
    let report: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|err| {
        panic!(
            "audit trace --json printed no JSON ({err}): {}",
            run.report()
        )
    });
    assert_eq!(
        report["query"],
        json!({"instruction": instruction}),
        "{report:#}"
    );
    assert_eq!(
        report["records"], expected_records,
        "{instruction}: records in the tree"
    );
    let nodes = report["instructions"].as_array().expect("instructions");
    assert_eq!(
        nodes.len(),
        1,
        "{instruction}: one instruction node: {report:#}"
    );
    assert_eq!(nodes[0]["instruction"], instruction);
    let sessions = nodes[0]["sessions"].as_array().expect("sessions");
    let listed: BTreeSet<String> = sessions
        .iter()
        .map(|s| s["session"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_eq!(
        listed,
        expected.keys().cloned().collect::<BTreeSet<_>>(),
        "{instruction}: sessions"
    );
    for node in sessions {
        let session = node["session"].as_str().unwrap();
        let steps = &expected[session];
        let what = format!("{instruction}, session {session}");
        assert_eq!(node["principal"], steps[0].2, "{what}");
        assert_eq!(node["server"], SERVER, "{what}");
        let events: Vec<&str> = node["events"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|e| e["detail"]["event"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(events, ["start", "end"], "{what}: session events");
        assert!(
            node["egress"].as_array().is_none_or(Vec::is_empty),
            "{what}: connections tied to none of its calls: {}",
            node["egress"]
        );
        let listed_calls = node["calls"].as_array().expect("calls");
        let listed_ids: Vec<&str> = listed_calls
            .iter()
            .map(|c| c["call_id"].as_str().unwrap_or("?"))
            .collect();
        let expected_ids: Vec<&str> = steps.iter().map(|(c, ..)| c.call_id.as_str()).collect();
        assert_eq!(listed_ids, expected_ids, "{what}: calls");
        for (listed, (call, step, principal)) in listed_calls.iter().zip(steps) {
            let what = format!("{what}, call {} ({:?})", call.call_id, step.action);
            assert_eq!(listed["principal"], *principal, "{what}");
            assert_eq!(listed["method"], "tools/call", "{what}");
            assert_eq!(listed["tool"], step.action.tool(), "{what}");
            assert_eq!(listed["decision"], step.action.decision(), "{what}");
            assert_eq!(listed["rule"], step.action.rule(), "{what}");
            assert_eq!(
                listed["trace_id"].as_str(),
                call.field("trace_id").as_deref(),
                "{what}"
            );
            assert_eq!(
                listed["outcome"]["kind"].as_str(),
                call.outcome_kind().as_deref(),
                "{what}"
            );
            let egress = listed["egress"].as_array().expect("egress");
            match step.action.verdict() {
                None => assert!(egress.is_empty(), "{what}: {egress:?}"),
                Some(verdict) => {
                    assert_eq!(egress.len(), 1, "{what}: {egress:?}");
                    assert_eq!(egress[0]["verdict"], verdict, "{what}");
                    assert_eq!(egress[0]["attribution"], "exact", "{what}");
                    assert_eq!(egress[0]["call_ids"], json!([call.call_id]), "{what}");
                    assert_eq!(egress[0]["addr"], "127.0.0.1", "{what}");
                }
            }
        }
    }
    for other in &others {
        assert!(
            !run.stdout.contains(other),
            "{instruction}: the trace names call {other} of another instruction"
        );
    }

    let text = mcp_guard(&[
        "audit",
        "trace",
        "--instruction",
        instruction,
        path_str(audit),
    ]);
    assert!(text.status.success(), "{}", text.report());
    let out = &text.stdout;
    assert!(
        out.lines().next() == Some(&format!("instruction {instruction}")),
        "text trace of {instruction}:\n{out}"
    );
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("instruction "))
            .count(),
        1,
        "text trace of {instruction} names another instruction:\n{out}"
    );
    for (session, steps) in &expected {
        let heading = format!(
            "  session {session}  principal {}  server {SERVER}",
            steps[0].2
        );
        assert!(
            out.lines().any(|l| l == heading),
            "text trace of {instruction} lacks {heading:?}:\n{out}"
        );
        for (call, step, _) in steps {
            let line = out
                .lines()
                .find(|l| l.contains(&format!("call {}", call.call_id)))
                .unwrap_or_else(|| panic!("text trace lacks call {}:\n{out}", call.call_id));
            assert!(
                line.contains(step.action.tool()) && line.contains(step.action.decision()),
                "{line}"
            );
        }
    }
    let connections = out
        .lines()
        .filter(|l| l.contains("connect 127.0.0.1:"))
        .count();
    let expected_connections = expected
        .values()
        .flatten()
        .filter(|(_, step, _)| step.action.verdict().is_some())
        .count();
    assert_eq!(
        connections, expected_connections,
        "text trace of {instruction}:\n{out}"
    );
    for other in &others {
        assert!(
            !out.contains(other),
            "text trace of {instruction} names call {other} of another instruction:\n{out}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. audit verify, and tampering
// ---------------------------------------------------------------------------------------------

/// After a run with every kind of record (policy, session, call decisions and outcomes,
/// egress), `audit verify` passes; every call's decision precedes its outcome. Then copies of
/// the log, each tampered with once (a byte changed in a value, in `hash`, in `prev`, in
/// `seq`, in the structure or a newline, and a sweep of positions through the whole file; a
/// line removed, swapped with the next, duplicated; the tail cut mid-line), each fail to
/// verify with `FILE:LINE:` naming the line tampered with.
#[test]
fn audit_log_verifies_and_detects_tampering() {
    let mut incident = Incident::start("incident-verify", None);
    let plans = [
        plan(
            "verify-a",
            ALICE,
            &[
                (CRM_SYNC, FetchDeclared),
                (CRM_SYNC, Echo),
                (CRM_SYNC, FetchUndeclared),
                (CRM_SYNC, Denied),
            ],
        ),
        plan(
            "verify-b",
            ALICE,
            &[(REPORT, Echo), (REPORT, FetchDeclared), (REPORT, Denied)],
        ),
    ];
    let refs: Vec<&SessionPlan> = plans.iter().collect();
    let runs = incident.run_sessions(&refs, 0);
    for (plan, run) in plans.iter().zip(&runs) {
        check_answers(plan, run);
    }
    wait_for_egress_records(&incident, 2, 1);
    incident.stop();
    let audit = incident.audit_path();
    let records = read_records(&audit);
    let kinds: BTreeSet<&str> = records.iter().filter_map(|r| r["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["call", "egress", "policy", "session"]),
        "every kind of record"
    );

    // Decisions before outcomes (logged_calls fails otherwise), outcomes exactly for the
    // calls that were allowed.
    let calls = logged_calls(&records);
    for call in calls.values() {
        let allowed = call.field("decision").as_deref() == Some("allow");
        assert_eq!(
            call.outcome_record.is_some(),
            allowed,
            "call {}: an outcome exactly when allowed: {}",
            call.call_id,
            call.decision_record
        );
    }
    let tool_calls = calls
        .values()
        .filter(|c| c.field("method").as_deref() == Some("tools/call"))
        .count();
    assert_eq!(tool_calls, 7, "tools/call in the log");

    let original = std::fs::read(&audit).expect("read the audit log");
    let verified = mcp_guard(&["audit", "verify", path_str(&audit)]);
    assert!(verified.status.success(), "{}", verified.report());
    let summary = verified.stdout.trim().to_owned();
    assert!(
        summary.starts_with(&format!(
            "ok: {} records, last seq {}",
            records.len(),
            records.len()
        )),
        "{summary}"
    );
    let head = summary
        .rsplit(' ')
        .next()
        .expect("the last hash")
        .to_owned();
    assert_eq!(
        Some(head.as_str()),
        records.last().unwrap()["hash"].as_str()
    );

    let lines: Vec<&[u8]> = original.split_inclusive(|b| *b == b'\n').collect();
    assert_eq!(lines.len(), records.len());
    let starts: Vec<usize> = lines
        .iter()
        .scan(0, |offset, line| {
            let start = *offset;
            *offset += line.len();
            Some(start)
        })
        .collect();
    let line_of = |offset: usize| starts.iter().rposition(|&s| s <= offset).unwrap() + 1;
    let copies = tempfile::tempdir().expect("tempdir");
    let checked = std::cell::Cell::new(0);
    let expect_break = |name: &str, bytes: &[u8], line: usize, extra: &[&str]| {
        let copy = copies.path().join(format!("{name}.jsonl"));
        std::fs::write(&copy, bytes).expect("write a tampered copy");
        let mut args = vec!["audit", "verify"];
        args.extend_from_slice(extra);
        args.push(path_str(&copy));
        let run = mcp_guard(&args);
        let prefix = format!("{}:{line}: ", copy.display());
        assert!(
            !run.status.success() && run.stderr.starts_with(&prefix),
            "{name}: expected a failure reported at {prefix:?}; {}",
            run.report()
        );
        checked.set(checked.get() + 1);
    };

    // One byte changed, at chosen places of chosen records.
    let record_lines = [
        1,
        records.iter().position(|r| r["kind"] == "session").unwrap() + 1,
        records.iter().position(|r| r["kind"] == "egress").unwrap() + 1,
        records
            .iter()
            .position(|r| r["kind"] == "call" && r["decision"] == "deny")
            .unwrap()
            + 1,
        records.len(),
    ];
    for line in record_lines {
        let text = std::str::from_utf8(lines[line - 1]).unwrap();
        let inside = |needle: &str| text.find(needle).map(|i| i + needle.len() + 1);
        let places = [
            ("seq", text.find("\"seq\":").map(|i| i + 6)),
            ("value-kind", inside("\"kind\":\"")),
            ("value-ts", inside("\"ts\":\"").map(|i| i + 20)),
            (
                "value-session-or-path",
                inside("\"session\":\"").or(inside("\"path\":\"")),
            ),
            ("prev", inside("\"prev\":\"").map(|i| i + 10)),
            ("hash", inside("\"hash\":\"").map(|i| i + 30)),
            ("hash-last-digit", Some(text.len() - 4)),
            ("opening-brace", Some(0)),
            ("closing-brace", Some(text.len() - 2)),
            ("newline", Some(text.len() - 1)),
        ];
        for (place, at) in places {
            let Some(at) = at else { continue };
            let mut bytes = original.clone();
            let offset = starts[line - 1] + at;
            bytes[offset] = changed(bytes[offset]);
            expect_break(&format!("byte-{place}-line{line}"), &bytes, line, &[]);
        }
    }
    // And a sweep through the whole file.
    let stride = (original.len() / 97).max(1);
    for offset in (stride / 2..original.len()).step_by(stride) {
        let mut bytes = original.clone();
        bytes[offset] = changed(bytes[offset]);
        expect_break(&format!("byte-at-{offset}"), &bytes, line_of(offset), &[]);
    }

    // Lines removed, swapped, duplicated.
    let join = |parts: Vec<&[u8]>| parts.concat();
    let middle = records.len() / 2;
    for removed in [1, middle] {
        let mut parts = lines.clone();
        parts.remove(removed - 1);
        expect_break(
            &format!("removed-line{removed}"),
            &join(parts),
            removed,
            &[],
        );
    }
    for first in [1, middle, records.len() - 1] {
        let mut parts = lines.clone();
        parts.swap(first - 1, first);
        expect_break(&format!("swapped-line{first}"), &join(parts), first, &[]);
    }
    {
        let mut parts = lines.clone();
        parts.insert(middle, lines[middle - 1]);
        expect_break("duplicated", &join(parts), middle + 1, &[]);
    }
    // The last line removed: the chain itself cannot show it, `--head` (the last hash an
    // earlier verify printed) does.
    {
        let mut parts = lines.clone();
        parts.pop();
        let copy = copies.path().join("removed-last.jsonl");
        std::fs::write(&copy, join(parts)).unwrap();
        let run = mcp_guard(&["audit", "verify", "--head", &head, path_str(&copy)]);
        assert!(
            !run.status.success() && run.stderr.starts_with(&format!("{}:", copy.display())),
            "the last record removed, verified with --head: {}",
            run.report()
        );
        checked.set(checked.get() + 1);
    }

    // The tail cut in the middle of a line: the last line, and an earlier one.
    for line in [records.len(), middle] {
        let cut = starts[line - 1] + lines[line - 1].len() / 2;
        expect_break(&format!("cut-line{line}"), &original[..cut], line, &[]);
    }
    let checked = checked.get();
    assert!(checked > 100, "{checked} tampered copies checked");
    eprintln!(
        "[incident] {checked} tampered copies of a {}-record log all failed to verify",
        records.len()
    );
}

/// A different byte: printable stays printable where it can, so the change is subtle.
fn changed(byte: u8) -> u8 {
    match byte {
        b'0'..=b'8' | b'a'..=b'e' | b'A'..=b'Y' => byte + 1,
        b'9' => b'0',
        b'f' | b'z' | b'Z' => b'a',
        other => other ^ 0x01,
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Identity in the records and downstream
// ---------------------------------------------------------------------------------------------

/// Calls through mcp-guard to `mcp-fast-server` (over stdio, per session; a `tee` in front
/// of it keeps the exact lines mcp-guard forwarded, and the wrapper writes the identity
/// environment it was started with). A call with a W3C `traceparent` header and an
/// instruction header, one with both in `_meta` (which wins over headers), one with neither:
/// the decision and outcome records carry the trace id, the instruction, the principal, the
/// session and one call id; the server received `_meta` with that call id, session,
/// principal, server and instruction, and a `traceparent` continuing the agent's trace.
#[test]
fn audit_records_carry_identity() {
    let env = TestEnv::new("incident-identity", PROBE);
    let peers = Peers::require();
    let wire = env.dir().join("wire.jsonl");
    let environ = env.dir().join("environ.txt");
    let command = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        format!(
            r#"env | grep '^MCP_GUARD_' > "$1"; {} | "$3""#,
            record_then_forward(r#""$2""#)
        ),
        "fast-recorded".into(),
        environ.display().to_string(),
        wire.display().to_string(),
        FAST_SERVER.into(),
    ];
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let servers = json!({
        "fast": stdio_server(command, vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
        ]),
    });
    env.write_policy_document(&env.proxy_policy(addr, servers));
    let daemon = env.start_daemon();

    let header_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let header_parent = format!("00-{header_trace}-00f067aa0ba902b7-01");
    let meta_trace = "0af7651916cd43dd8448eb211c80319c";
    let meta_parent = format!("00-{meta_trace}-b7ad6b7169203331-01");
    let script = json!([
        {"op": "call_tool", "name": "echo", "arguments": {"text": "by-header"},
         "headers": {"traceparent": header_parent, "MCP-Guard-Instruction": "instr-identity-header"}},
        {"op": "call_tool", "name": "echo", "arguments": {"text": "by-meta"},
         "headers": {"traceparent": header_parent, "MCP-Guard-Instruction": "instr-loses-to-meta"},
         "meta": {"traceparent": meta_parent, "io.mcp-guard/instruction": "instr-identity-meta"}},
        {"op": "call_tool", "name": "echo", "arguments": {"text": "anonymous"}},
    ]);
    let url = format!("http://{addr}/servers/fast/mcp");
    let run = mcp_client(&peers, Transport::Http(&url), HANDSHAKE, &script);
    for (i, text) in ["by-header", "by-meta", "anonymous"].iter().enumerate() {
        assert_eq!(run.ok(i)["content"][0]["text"], *text);
    }
    drop(daemon);

    let records = read_records(&env.audit_path());
    let calls = logged_calls(&records);
    let mut echoes: Vec<&LoggedCall> = calls
        .values()
        .filter(|c| c.field("method").as_deref() == Some("tools/call"))
        .collect();
    echoes.sort_by_key(|c| c.decision_seq);
    assert_eq!(echoes.len(), 3, "tools/call in the log");
    let starts: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "session" && r["detail"]["event"] == "start")
        .collect();
    assert_eq!(starts.len(), 1, "one session: {starts:?}");
    let session = starts[0]["session"]
        .as_str()
        .expect("session id")
        .to_owned();
    assert_eq!(starts[0]["principal"], AGENT);

    let expected = [
        (Some("instr-identity-header"), Some(header_trace)),
        (Some("instr-identity-meta"), Some(meta_trace)),
        (None, None),
    ];
    let ids: BTreeSet<&str> = echoes.iter().map(|c| c.call_id.as_str()).collect();
    assert_eq!(ids.len(), 3, "call ids are unique");
    for (call, (instruction, trace)) in echoes.iter().zip(expected) {
        let what = format!("call {}", call.call_id);
        assert!(!call.call_id.is_empty());
        let outcome = call.outcome_record.as_ref().expect("an outcome record");
        for record in [&call.decision_record, outcome] {
            assert_eq!(record["principal"], AGENT, "{what}: {record}");
            assert_eq!(record["session"], session.as_str(), "{what}: {record}");
            assert_eq!(record["server"], "fast", "{what}: {record}");
            assert_eq!(record["tool"], "echo", "{what}: {record}");
            assert_eq!(
                record["instruction"].as_str(),
                instruction,
                "{what}: {record}"
            );
            let trace_id = record["trace_id"].as_str().expect("a trace id");
            match trace {
                Some(trace) => assert_eq!(trace_id, trace, "{what}: {record}"),
                None => {
                    assert!(
                        trace_id.len() == 32
                            && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
                            && trace_id != header_trace
                            && trace_id != meta_trace,
                        "{what}: a new trace: {record}"
                    );
                }
            }
        }
        assert!(
            call.decision_record["latency"]["policy_us"].is_u64(),
            "{what}: {}",
            call.decision_record
        );
        // Arguments are kept as a digest unless the policy opts in to storing them.
        assert!(
            call.field("arguments_digest")
                .is_some_and(|d| d.starts_with("sha256:")),
            "{what}: {}",
            call.decision_record
        );
        assert!(
            call.decision_record.get("arguments").is_none(),
            "{what}: {}",
            call.decision_record
        );
        for stage in ["policy_us", "upstream_us", "total_us"] {
            assert!(
                outcome["latency"][stage].is_u64(),
                "{what}: {stage}: {outcome}"
            );
        }
    }

    // What the server received.
    let forwarded: Vec<Value> = std::fs::read_to_string(&wire)
        .unwrap_or_else(|err| panic!("read {}: {err}", wire.display()))
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["method"] == "tools/call")
        .collect();
    assert_eq!(
        forwarded.len(),
        3,
        "tools/call lines the server received: {forwarded:#?}"
    );
    for (i, (message, call)) in forwarded.iter().zip(&echoes).enumerate() {
        let meta = &message["params"]["_meta"];
        let what = format!("forwarded call {i}: {message}");
        assert_eq!(
            meta["io.mcp-guard/call-id"],
            call.call_id.as_str(),
            "{what}"
        );
        assert_eq!(meta["io.mcp-guard/session"], session.as_str(), "{what}");
        assert_eq!(meta["io.mcp-guard/principal"], AGENT, "{what}");
        assert_eq!(meta["io.mcp-guard/server"], "fast", "{what}");
        assert_eq!(
            meta["io.mcp-guard/instruction"].as_str(),
            expected[i].0,
            "{what}"
        );
        let traceparent = meta["traceparent"].as_str().expect("a traceparent");
        let trace_id = call.field("trace_id").unwrap();
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts.len(), 4, "{what}");
        assert_eq!(parts[1], trace_id, "{what}: the trace continues");
        match i {
            // The agent's own _meta traceparent is kept as it was.
            1 => assert_eq!(traceparent, meta_parent, "{what}"),
            // From the header: mcp-guard's span becomes the parent.
            0 => assert_ne!(parts[2], "00f067aa0ba902b7", "{what}"),
            _ => {}
        }
    }
    let log_text = std::fs::read_to_string(env.audit_path()).unwrap();
    for argument in ["by-header", "by-meta", "anonymous"] {
        assert!(
            !log_text.contains(argument),
            "the argument {argument:?} is in the audit log"
        );
    }
    let environment = std::fs::read_to_string(&environ).unwrap_or_default();
    for line in [
        format!("MCP_GUARD_SESSION={session}"),
        format!("MCP_GUARD_PRINCIPAL={AGENT}"),
        "MCP_GUARD_SERVER=fast".to_owned(),
    ] {
        assert!(
            environment.lines().any(|l| l == line),
            "the server process's environment lacks {line}: {environment}"
        );
    }

    // The trace id finds exactly its call.
    let traced = mcp_guard(&[
        "audit",
        "trace",
        "--trace",
        header_trace,
        "--json",
        path_str(&env.audit_path()),
    ]);
    assert!(traced.status.success(), "{}", traced.report());
    let report: Value = serde_json::from_str(&traced.stdout).expect("JSON");
    let found: Vec<&str> = report["instructions"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|i| i["sessions"].as_array().into_iter().flatten())
        .flat_map(|s| s["calls"].as_array().into_iter().flatten())
        .filter_map(|c| c["call_id"].as_str())
        .collect();
    assert_eq!(found, [echoes[0].call_id.as_str()], "{report:#}");
}

// ---------------------------------------------------------------------------------------------
// 4. Metrics
// ---------------------------------------------------------------------------------------------

/// Two sessions left open (raw initialize), one SDK session that lists tools, echoes, is
/// refused twice by a rule and once as an unknown tool, and fetches both URLs, then ends.
/// `mcp_guard_decisions_total` equals, label set by label set, the decision records of the
/// audit log, and the calls the test made; audit counters agree with the file; the latency
/// histogram has its three stages; active sessions follow opens and DELETEs; egress attempts
/// are counted by verdict; no label value holds an argument, an id or an address.
/// A server spawned for a session reads, in its environment, the instruction and the trace
/// context the agent gave when it opened the session (HTTP headers with `initialize`; a
/// stateless 2026-07-28 session's first request's `_meta`), as OpenTelemetry's carriers
/// `TRACEPARENT`, `TRACESTATE` and `BAGGAGE` and as `MCP_GUARD_INSTRUCTION`. A session opened
/// without them sets none.
#[test]
fn a_spawned_server_reads_the_opening_instruction_and_trace_in_its_environment() {
    let env = TestEnv::new("incident-spawn-env", PROBE);
    let peers = Peers::require();
    let environ = env.dir().join("environ");
    let command = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        r#"env | grep -E '^(MCP_GUARD_(SERVER|SESSION|PRINCIPAL|INSTRUCTION)|TRACEPARENT|TRACESTATE|BAGGAGE)=' > "$1.$MCP_GUARD_SESSION"; exec "$2""#.into(),
        "fast-env".into(),
        environ.display().to_string(),
        FAST_SERVER.into(),
    ];
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let servers = json!({"fast": stdio_server(command, vec![list_tools_rule()])});
    env.write_policy_document(&env.proxy_policy(addr, servers));
    let _daemon = env.start_daemon();
    let url = format!("http://{addr}/servers/fast/mcp");
    let environment_of = |session: &str| -> BTreeSet<String> {
        let path = format!("{}.{session}", environ.display());
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("the server of session {session} wrote no {path}: {err}"));
        text.lines().map(str::to_owned).collect()
    };
    let guard_set = |lines: &BTreeSet<String>| -> BTreeSet<String> {
        lines
            .iter()
            .filter(|l| !l.starts_with("MCP_GUARD_SERVER=") && !l.starts_with("MCP_GUARD_SESSION="))
            .filter(|l| !l.starts_with("MCP_GUARD_PRINCIPAL="))
            .cloned()
            .collect()
    };

    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let ping = r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#;
    let opened = raw_http(
        &peers,
        &url,
        &[
            "--initialize",
            HANDSHAKE,
            "--header",
            "MCP-Guard-Instruction: instr-spawn-42",
            "--header",
            &format!("traceparent: {parent}"),
            "--header",
            "tracestate: vendor=abc",
            "--body",
            ping,
        ],
    );
    let session = opened["initialize"]["session_id"]
        .as_str()
        .expect("a session id");
    assert_eq!(
        guard_set(&environment_of(session)),
        BTreeSet::from([
            "MCP_GUARD_INSTRUCTION=instr-spawn-42".to_owned(),
            "BAGGAGE=mcp.instruction=instr-spawn-42".to_owned(),
            format!("TRACEPARENT={parent}"),
            "TRACESTATE=vendor=abc".to_owned(),
        ])
    );

    let stateless_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {
        "io.mcp-guard/instruction": "instr-spawn-meta", "traceparent": stateless_parent}}});
    let stateless = raw_http(
        &peers,
        &url,
        &[
            "--envelope",
            "2026-07-28",
            "--header",
            "MCP-Guard-Session: spawn-env",
            "--body",
            &call.to_string(),
        ],
    );
    assert_eq!(stateless["status"], 200, "{stateless}");
    assert_eq!(
        guard_set(&environment_of("stateless-fast-spawn-env")),
        BTreeSet::from([
            "MCP_GUARD_INSTRUCTION=instr-spawn-meta".to_owned(),
            "BAGGAGE=mcp.instruction=instr-spawn-meta".to_owned(),
            format!("TRACEPARENT={stateless_parent}"),
        ])
    );

    let plain = raw_http(&peers, &url, &["--initialize", HANDSHAKE, "--body", ping]);
    let session = plain["initialize"]["session_id"]
        .as_str()
        .expect("a session id");
    let plain_env = environment_of(session);
    assert!(
        plain_env.contains(&format!("MCP_GUARD_SESSION={session}")),
        "{plain_env:?}"
    );
    assert_eq!(guard_set(&plain_env), BTreeSet::new());
}

#[test]
fn metrics_count_decisions_and_audit_records() {
    let metrics_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let incident = Incident::start("incident-metrics", Some(metrics_addr));
    let url = incident.url();
    let open_session = || {
        let ping = json!({"jsonrpc": "2.0", "id": "after-initialize", "method": "ping"});
        let output = raw_http(
            &incident.peers,
            &url,
            &["--initialize", HANDSHAKE, "--body", &ping.to_string()],
        );
        assert_eq!(output["status"], 200, "{output}");
        output["initialize"]["session_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id: {output}"))
            .to_owned()
    };
    let kept = [open_session(), open_session()];
    let instruction = "instr-metrics-label-check";
    let header = json!({"MCP-Guard-Instruction": instruction});
    let script = json!([
        {"op": "list_tools", "headers": header},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "argument-one"}, "headers": header},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "argument-two"}, "headers": header},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "argument-three"}, "headers": header},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "secret-one"}, "headers": header},
        {"op": "call_tool", "name": "echo", "arguments": {"message": "secret-two"}, "headers": header},
        {"op": "call_tool", "name": "get-sum", "arguments": {"a": 1, "b": 2}, "headers": header},
        {"op": "call_tool", "name": "gzip-file-as-resource",
         "arguments": {"name": "m.gz", "data": incident.declared.url("/metrics-run")}, "headers": header},
        {"op": "call_tool", "name": "gzip-file-as-resource",
         "arguments": {"name": "m.gz", "data": format!("http://{}/metrics-run", incident.undeclared.addr)},
         "headers": header},
        {"op": "call_tool", "name": "no-such-tool", "arguments": {}, "headers": header},
    ]);
    let run = mcp_client(&incident.peers, Transport::Http(&url), HANDSHAKE, &script);
    for i in [0, 1, 2, 3, 7] {
        run.ok(i);
    }
    for i in [4, 5] {
        assert_eq!(run.error(i)["data"]["rule"], "no-secrets");
    }
    assert_eq!(run.error(6)["message"], "Unknown tool: get-sum");
    assert_eq!(run.error(9)["message"], "Unknown tool: no-such-tool");

    // Settled: the SDK session ended, both connections were judged.
    let mut last = scrape(metrics_addr);
    let settled = poll_until(TIMEOUT, || {
        last = scrape(metrics_addr);
        metric(&last, "mcp_guard_active_sessions", &[]) == 2.0
            && metric(
                &last,
                "mcp_guard_egress_attempts_total",
                &[("verdict", "allow")],
            ) == 1.0
            && metric(
                &last,
                "mcp_guard_egress_attempts_total",
                &[("verdict", "refuse")],
            ) == 1.0
    });
    assert!(
        settled,
        "active sessions {} (expected 2), egress allow {} refuse {} (expected 1 and 1)",
        metric(&last, "mcp_guard_active_sessions", &[]),
        metric(
            &last,
            "mcp_guard_egress_attempts_total",
            &[("verdict", "allow")]
        ),
        metric(
            &last,
            "mcp_guard_egress_attempts_total",
            &[("verdict", "refuse")]
        ),
    );
    // Wait until the egress records are in the log too, so the log is still from here on, and
    // until the records in the file are counted (a record is counted once its flush is done,
    // after it is in the file).
    wait_for_egress_records(&incident, 1, 1);
    let lines_before = read_records(&incident.audit_path()).len();
    let mut scraped = scrape(metrics_addr);
    let counted = poll_until(TIMEOUT, || {
        scraped = scrape(metrics_addr);
        metric(&scraped, "mcp_guard_audit_records_written_total", &[]) >= lines_before as f64
    });
    assert!(
        counted,
        "mcp_guard_audit_records_written_total {} while the file has {lines_before} records",
        metric(&scraped, "mcp_guard_audit_records_written_total", &[])
    );
    let records = read_records(&incident.audit_path());

    // Decisions: label set by label set, as in the log.
    // The `tool` label is the tool's name for tools the server offers (get-sum too, which
    // this caller may not see) and `other` for a name the server does not know, so that label
    // values stay bounded whatever callers send.
    let tool_label = |record: &Value| match (text_of(record, "method"), text_of(record, "tool")) {
        (Some(method), Some(tool)) if method == "tools/call" => {
            if tool == "no-such-tool" {
                "other".to_owned()
            } else {
                tool
            }
        }
        _ => String::new(),
    };
    let mut from_log: BTreeMap<(String, String, String, String, String), f64> = BTreeMap::new();
    for record in records
        .iter()
        .filter(|r| r["kind"] == "call" && !r["decision"].is_null())
    {
        let key = (
            text_of(record, "server").unwrap_or_default(),
            text_of(record, "method").unwrap_or_default(),
            tool_label(record),
            text_of(record, "decision").unwrap_or_default(),
            text_of(record, "rule").unwrap_or_default(),
        );
        *from_log.entry(key).or_default() += 1.0;
    }
    let from_metrics: BTreeMap<(String, String, String, String, String), f64> = scraped
        .samples
        .iter()
        .filter(|s| s.metric == "mcp_guard_decisions_total")
        .map(|s| {
            let label = |k: &str| s.labels.get(k).unwrap_or("").to_owned();
            (
                (
                    label("server"),
                    label("method"),
                    label("tool"),
                    label("decision"),
                    label("rule"),
                ),
                sample_value(&s.value),
            )
        })
        .collect();
    assert_eq!(
        from_metrics, from_log,
        "mcp_guard_decisions_total vs the audit log"
    );
    let decisions = |method: &str, tool: &str, decision: &str, rule: &str| {
        metric(
            &scraped,
            "mcp_guard_decisions_total",
            &[
                ("server", SERVER),
                ("method", method),
                ("tool", tool),
                ("decision", decision),
                ("rule", rule),
            ],
        )
    };
    assert_eq!(decisions("tools/call", "echo", "allow", "echo"), 3.0);
    assert_eq!(decisions("tools/call", "echo", "deny", "no-secrets"), 2.0);
    assert_eq!(
        decisions("tools/call", "get-sum", "deny", "unknown-tool"),
        1.0
    );
    assert_eq!(
        decisions("tools/call", "other", "deny", "unknown-tool"),
        1.0,
        "a tool the server does not offer is counted as `other`"
    );
    assert_eq!(
        decisions("tools/call", "gzip-file-as-resource", "allow", "fetch"),
        2.0
    );
    assert_eq!(decisions("tools/list", "", "allow", "list-tools"), 1.0);
    let initializes: f64 = from_metrics
        .iter()
        .filter(|((_, method, ..), _)| method == "initialize")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(initializes, 3.0, "three sessions were initialised");

    // Audit counters.
    let written = metric(&scraped, "mcp_guard_audit_records_written_total", &[]);
    assert!(
        written >= lines_before as f64 && written <= records.len() as f64,
        "mcp_guard_audit_records_written_total {written}: the file had {lines_before} records \
         before the scrape and {} after",
        records.len()
    );
    for failures in [
        "mcp_guard_audit_failures_total",
        "mcp_guard_audit_flush_failures_total",
    ] {
        assert!(
            scraped.samples.iter().any(|s| s.metric == failures),
            "{failures} is exported"
        );
        assert_eq!(metric(&scraped, failures, &[]), 0.0, "{failures}");
    }
    // Records may still be written (and so not yet flushed) while the scrape runs.
    assert!(
        scraped
            .samples
            .iter()
            .any(|s| s.metric == "mcp_guard_audit_unflushed_bytes"),
        "mcp_guard_audit_unflushed_bytes is exported"
    );
    assert!(metric(&scraped, "mcp_guard_audit_unflushed_bytes", &[]) >= 0.0);

    // Latency histogram: every request's total, every forwarded request's upstream time.
    let all_decisions: f64 = from_metrics.values().sum();
    let allowed: f64 = from_metrics
        .iter()
        .filter(|((_, _, _, decision, _), _)| decision == "allow")
        .map(|(_, n)| n)
        .sum();
    let stage_count = |stage: &str| -> f64 {
        let histogram = scraped
            .samples
            .iter()
            .find(|s| {
                s.metric == "mcp_guard_request_duration_seconds"
                    && s.labels.get("server") == Some(SERVER)
                    && s.labels.get("stage") == Some(stage)
            })
            .unwrap_or_else(|| panic!("no mcp_guard_request_duration_seconds for stage {stage}"));
        let prometheus_parse::Value::Histogram(buckets) = &histogram.value else {
            panic!("not a histogram: {histogram:?}");
        };
        assert!(buckets.len() > 1, "{buckets:?}");
        metric(
            &scraped,
            "mcp_guard_request_duration_seconds_count",
            &[("server", SERVER), ("stage", stage)],
        )
    };
    assert_eq!(
        stage_count("total"),
        all_decisions,
        "total: one per request"
    );
    assert_eq!(
        stage_count("upstream"),
        allowed,
        "upstream: one per forwarded request"
    );
    let policy = stage_count("policy");
    assert!(policy > 0.0 && policy <= all_decisions, "policy: {policy}");

    // Active sessions follow a DELETE.
    let deleted = http_request_head(
        incident.addr,
        "DELETE",
        &format!("/servers/{SERVER}/mcp"),
        &[("Mcp-Session-Id", &kept[0])],
    )
    .expect("DELETE");
    assert!(
        (200..300).contains(&deleted.status),
        "DELETE: {}",
        deleted.status
    );
    drop(deleted);
    let mut active = 0.0;
    assert!(
        poll_until(TIMEOUT, || {
            active = metric(&scrape(metrics_addr), "mcp_guard_active_sessions", &[]);
            active == 1.0
        }),
        "mcp_guard_active_sessions {active} after one of two sessions ended"
    );

    // Label values are bounded: no argument, id or address.
    let mut forbidden: BTreeSet<String> = BTreeSet::from([
        "argument-".to_owned(),
        "secret-one".to_owned(),
        "secret-two".to_owned(),
        "metrics-run".to_owned(),
        "m.gz".to_owned(),
        "127.0.0.1".to_owned(),
        incident.declared.addr.port().to_string(),
        incident.undeclared.port().to_string(),
        incident.addr.port().to_string(),
        instruction.to_owned(),
    ]);
    for record in &records {
        for field in [
            "session",
            "call_id",
            "trace_id",
            "instruction",
            "arguments_digest",
        ] {
            if let Some(value) = text_of(record, field) {
                forbidden.insert(value);
            }
        }
    }
    forbidden.extend(kept.iter().cloned());
    let final_scrape = scrape(metrics_addr);
    for sample in final_scrape
        .samples
        .iter()
        .filter(|s| s.metric.starts_with("mcp_guard_"))
    {
        for (key, value) in sample.labels.iter() {
            if key == "le" {
                continue;
            }
            for bad in &forbidden {
                assert!(
                    !value.contains(bad.as_str()),
                    "{}{{{key}=\"{value}\"}} holds {bad:?}",
                    sample.metric
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Connections made while several calls, or none, were running
// ---------------------------------------------------------------------------------------------

/// An egress record names the calls of its session running when the kernel saw the
/// connection. One HTTP-front session of mcp-fast-server, which may reach a loopback listener,
/// connects there three ways: in a call running alone (`exact`: that call, its trace and
/// instruction); in two calls of two instructions that are both in the server when each
/// connects (`rendezvous`: neither connects before both arrived, nor is answered before both
/// connected), so both connections are `ambiguous`, list both calls and name no single call,
/// trace or instruction; and after its call was answered, when the agent's next notification
/// reaches the server (`connect_later`): `idle`, naming no call. `audit trace --session`
/// shows each connection under each call it names, and the idle one under the session.
#[test]
fn egress_records_name_every_call_running_and_none_when_idle() {
    let env = TestEnv::new("incident-attribution", PROBE);
    let peers = Peers::require();
    let listener = Listener::tcp(LOCALHOST_V4);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()));
    let mut fast = fast_server_calling(FAST_SERVER, &["rendezvous", "connect_later"]);
    fast["egress"] = json!([rule(
        "listener",
        "127.0.0.1/32",
        &[listener.port()],
        &["tcp"]
    )]);
    env.write_policy_document(&env.proxy_policy(addr, json!({ "fast": fast })));
    let daemon = env.start_daemon();
    let url = format!("http://{addr}/servers/fast/mcp");
    let session = open_raw_session(&peers, &url, HANDSHAKE);
    let post = |message: &Value| post_in_session(&peers, &url, &session, HANDSHAKE, message);
    let call = |id: u64, instruction: &str, name: &str, arguments: Value| -> String {
        let request = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
            "name": name, "arguments": arguments,
            "_meta": {"io.mcp-guard/instruction": instruction}}});
        let answer = response_message(&post(&request));
        let text = answer["result"]["content"][0]["text"].as_str();
        text.unwrap_or_else(|| panic!("{name}: {answer}"))
            .to_owned()
    };
    let to = listener.addr.to_string();

    let alone = json!({"key": "alone", "parties": 1, "connect": to});
    assert_eq!(
        call(2, "instr-alone", "rendezvous", alone),
        "met alone as 1 of 1"
    );
    let together = json!({"key": "together", "parties": 2, "connect": to});
    let mut met = std::thread::scope(|scope| {
        let first = scope.spawn(|| call(3, "instr-a", "rendezvous", together.clone()));
        let second = call(4, "instr-b", "rendezvous", together.clone());
        [first.join().expect("the first call"), second]
    });
    met.sort();
    assert_eq!(met, ["met together as 1 of 2", "met together as 2 of 2"]);
    let later = json!({"connect": to, "text": "later"});
    assert_eq!(
        call(5, "instr-later", "connect_later", later),
        format!("will connect to {to}")
    );
    let notification = json!({"jsonrpc": "2.0", "method": "notifications/roots/list_changed"});
    let posted = post(&notification);
    assert_eq!(posted["status"], 202, "{posted}");
    for sent in ["alone 1", "together 1", "together 2", "later"] {
        assert!(
            listener.wait_for(sent),
            "the server's `{sent}` never arrived: {:?}",
            listener.received()
        );
    }

    let port = u64::from(listener.port());
    let mut records = Vec::new();
    let mut egress: Vec<Value> = Vec::new();
    assert!(
        poll_until(TIMEOUT, || {
            records = audit_records(&env.audit_path());
            egress = records
                .iter()
                .filter(|r| r["kind"] == "egress" && r["port"].as_u64() == Some(port))
                .cloned()
                .collect();
            egress.len() == 4
        }),
        "{} connection records, not 4: {records:#?}\nDaemon log:\n{}",
        egress.len(),
        daemon.log.summary(10, 30)
    );
    let call_of = |instruction: &str| -> Value {
        let decided = records
            .iter()
            .find(|r| r["decision"] == "allow" && r["instruction"] == instruction);
        decided.unwrap_or_else(|| panic!("no call of {instruction}: {records:#?}"))["call_id"]
            .clone()
    };
    let (first, second) = (call_of("instr-a"), call_of("instr-b"));
    for record in &egress {
        assert_eq!(record["session"], session.as_str(), "{record}");
        assert_eq!(record["verdict"], "allow", "{record}");
    }

    let exact = &egress[0];
    assert_eq!(exact["attribution"], "exact", "{exact}");
    assert_eq!(
        exact["call_ids"],
        json!([call_of("instr-alone")]),
        "{exact}"
    );
    assert_eq!(exact["call_id"], call_of("instr-alone"), "{exact}");
    assert_eq!(exact["instruction"], "instr-alone", "{exact}");
    for ambiguous in &egress[1..3] {
        assert_eq!(ambiguous["attribution"], "ambiguous", "{ambiguous}");
        let mut named: Vec<Value> = ambiguous["call_ids"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        named.sort_by_key(Value::to_string);
        let mut both = vec![first.clone(), second.clone()];
        both.sort_by_key(Value::to_string);
        assert_eq!(named, both, "{ambiguous}");
        for single in ["call_id", "trace_id", "instruction"] {
            assert!(ambiguous.get(single).is_none(), "{single}: {ambiguous}");
        }
    }
    let idle = &egress[3];
    assert_eq!(idle["attribution"], "idle", "{idle}");
    assert_eq!(idle["call_ids"], json!([]), "{idle}");
    for single in ["call_id", "trace_id", "instruction"] {
        assert!(idle.get(single).is_none(), "{single}: {idle}");
    }

    let trace = mcp_guard(&[
        "audit",
        "trace",
        "--session",
        &session,
        path_str(&env.audit_path()),
    ]);
    assert!(trace.status.success(), "{}", trace.report());
    let connections: Vec<&str> = trace
        .stdout
        .lines()
        .filter(|line| line.contains(&format!("connect {to}")))
        .collect();
    let with = |label: &str| connections.iter().filter(|l| l.contains(label)).count();
    assert_eq!(
        (with("  exact  "), with("  idle  "), connections.len()),
        (1, 1, 6),
        "{connections:#?}"
    );
    for line in connections.iter().filter(|l| l.contains("ambiguous (")) {
        for id in [&first, &second] {
            assert!(line.contains(id.as_str().unwrap_or("?")), "{line}");
        }
    }
    assert_eq!(with("ambiguous ("), 4, "{connections:#?}");
}
