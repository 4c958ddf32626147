//! `mcp-guard audit verify` and `mcp-guard audit trace`, run as the real binary over logs the
//! library's writer produced, then tampered with the way an intruder or an accident would.
//!
//! Needs no root: nothing here touches the kernel.

use std::path::{Path, PathBuf};
use std::process::Output;

use mcp_guard::audit::{
    Attribution, AuditDecision, AuditLog, AuditRecord, Latency, Outcome, OutcomeKind, Protocol,
    RecordKind, Verdict,
};
use mcp_guard::policy::AuditSettings;
use mcp_guard_tests::daemon_binary;
use serde_json::Value;

fn mcp_guard(args: &[&str]) -> Output {
    std::process::Command::new(daemon_binary())
        .args(args)
        .output()
        .expect("running mcp-guard")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn text(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

/// Appends `records` through the real writer.
fn write_log(settings: &AuditSettings, records: Vec<AuditRecord>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let log = AuditLog::open(settings).unwrap();
        for record in records {
            log.append(record).await.unwrap();
        }
    });
}

fn settings(dir: &Path, rotate_bytes: u64) -> AuditSettings {
    AuditSettings {
        path: dir.join("audit.jsonl"),
        rotate_bytes,
        ..AuditSettings::default()
    }
}

/// Sessions `s0..s{sessions}`, session `sN` working for instruction `iN % instructions`; each
/// makes `calls` calls, each with a decision record, one egress connection (the second of
/// every session refused) and an outcome record.
fn workload(sessions: usize, instructions: usize, calls: usize) -> Vec<AuditRecord> {
    let mut records = Vec::new();
    for s in 0..sessions {
        records.push(AuditRecord {
            session: Some(format!("s{s}")),
            principal: Some(format!("user{}", s % 3)),
            server: Some("crm".into()),
            ..AuditRecord::event(RecordKind::Session, "start")
        });
    }
    for c in 0..calls {
        for s in 0..sessions {
            let instruction = format!("i{}", s % instructions);
            let call_id = format!("s{s}-c{c}");
            let base = AuditRecord {
                session: Some(format!("s{s}")),
                instruction: Some(instruction.clone()),
                call_id: Some(call_id.clone()),
                trace_id: Some(format!("t{s}")),
                ..AuditRecord::new(RecordKind::Call)
            };
            records.push(AuditRecord {
                principal: Some(format!("user{}", s % 3)),
                server: Some("crm".into()),
                method: Some("tools/call".into()),
                tool: Some("update_contact".into()),
                decision: Some(AuditDecision::Allow),
                rule: Some("writes".into()),
                latency: Some(Latency {
                    policy_us: Some(40),
                    ..Latency::default()
                }),
                arguments_digest: Some(format!("sha256:{:064x}", s * 1000 + c)),
                ..base.clone()
            });
            let refused = c == 1;
            records.push(AuditRecord {
                session: Some(format!("s{s}")),
                instruction: Some(instruction),
                addr: Some("10.1.2.3".parse().unwrap()),
                port: Some(if refused { 25 } else { 443 }),
                protocol: Some(Protocol::Tcp),
                verdict: Some(if refused {
                    Verdict::Refuse
                } else {
                    Verdict::Allow
                }),
                rule: (!refused).then(|| "crm-api".into()),
                attribution: Some(Attribution::Exact),
                call_ids: Some(vec![call_id]),
                pid: Some(4242),
                comm: Some("node".into()),
                ..AuditRecord::new(RecordKind::Egress)
            });
            records.push(AuditRecord {
                outcome: Some(Outcome {
                    kind: OutcomeKind::Result,
                    code: None,
                    message: None,
                }),
                latency: Some(Latency {
                    policy_us: None,
                    upstream_us: Some(2500),
                    total_us: Some(2600),
                }),
                ..base
            });
        }
    }
    records
}

/// A log of 4 sessions × 3 calls (40 records) in one file, and its lines.
fn one_file_log() -> (tempfile::TempDir, PathBuf, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path(), 0);
    write_log(&settings, workload(4, 2, 3));
    let lines = std::fs::read_to_string(&settings.path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    (dir, settings.path, lines)
}

fn rewrite(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Runs verify on `path`, expects failure at `line` with a problem starting `what`.
fn assert_break(path: &Path, line: usize, what: &str) {
    let output = mcp_guard(&["audit", "verify", text(path)]);
    let message = stderr(&output);
    assert!(!output.status.success(), "verify passed: {message}");
    assert_eq!(output.status.code(), Some(1));
    let prefix = format!("{}:{line}: {what}", path.display());
    assert!(
        message.starts_with(&prefix),
        "wanted {prefix:?}, got {message:?}"
    );
    assert_eq!(message.lines().count(), 1, "one line: {message:?}");
    assert!(stdout(&output).is_empty());
}

// --- verify ---

#[test]
fn verify_passes_an_untouched_log_and_names_its_head() {
    let (_dir, path, lines) = one_file_log();
    let output = mcp_guard(&["audit", "verify", text(&path)]);
    assert!(output.status.success(), "{}", stderr(&output));
    let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(
        stdout(&output).trim_end(),
        format!(
            "ok: 40 records, last seq 40, last hash {}",
            last["hash"].as_str().unwrap()
        )
    );
}

#[test]
fn verify_follows_the_chain_through_rotated_files_in_any_given_order() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path(), 4096);
    write_log(&settings, workload(10, 3, 4));
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert!(files.len() >= 3, "rotation happened: {files:?}");
    // As a shell glob would give them: lexical, the live file first.
    files.sort();
    let mut args = vec!["audit", "verify"];
    args.extend(files.iter().map(|path| text(path)));
    let output = mcp_guard(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).starts_with("ok: 130 records, last seq 130, "));
    // The directory stands for the same files.
    let output = mcp_guard(&["audit", "verify", text(dir.path())]);
    assert!(
        stdout(&output).starts_with("ok: 130 records"),
        "{}",
        stderr(&output)
    );
    // Leaving out the oldest file is noticed.
    let oldest = dir.path().join("audit.jsonl.1");
    let output = mcp_guard(&["audit", "verify", text(&dir.path().join("audit.jsonl.2"))]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("chain starts at seq"),
        "{}",
        stderr(&output)
    );
    assert!(oldest.exists());
}

#[test]
fn verify_fails_at_a_changed_byte() {
    let (_dir, path, mut lines) = one_file_log();
    // One digit of the port of a connection in the last third of the file.
    let target = lines
        .iter()
        .rposition(|line| line.contains("\"port\":443"))
        .unwrap();
    lines[target] = lines[target].replacen("\"port\":443", "\"port\":444", 1);
    rewrite(&path, &lines);
    assert_break(&path, target + 1, "hash mismatch");
}

#[test]
fn verify_fails_at_any_single_flipped_byte_of_a_record() {
    let (_dir, path, lines) = one_file_log();
    let original = std::fs::read(&path).unwrap();
    let line_start = lines[..9].iter().map(|l| l.len() + 1).sum::<usize>();
    // Every 7th byte of line 10, hash field included.
    for offset in (0..lines[9].len()).step_by(7) {
        let mut bytes = original.clone();
        bytes[line_start + offset] ^= 0x04;
        std::fs::write(&path, &bytes).unwrap();
        let output = mcp_guard(&["audit", "verify", text(&path)]);
        assert!(
            !output.status.success(),
            "byte {offset} of line 10 changed unnoticed"
        );
        assert!(
            stderr(&output).starts_with(&format!("{}:10: ", path.display())),
            "byte {offset}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn verify_fails_at_a_removed_line() {
    let (_dir, path, mut lines) = one_file_log();
    lines.remove(20);
    rewrite(&path, &lines);
    assert_break(&path, 21, "seq gap");
}

#[test]
fn verify_fails_at_swapped_lines() {
    let (_dir, path, mut lines) = one_file_log();
    lines.swap(5, 6);
    rewrite(&path, &lines);
    assert_break(&path, 6, "seq gap");
}

#[test]
fn verify_fails_at_an_inserted_copy_of_a_line() {
    let (_dir, path, mut lines) = one_file_log();
    let copy = lines[3].clone();
    lines.insert(8, copy);
    rewrite(&path, &lines);
    assert_break(&path, 9, "seq out of order");
}

#[test]
fn verify_fails_at_a_cut_tail() {
    let (_dir, path, _lines) = one_file_log();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 30]).unwrap();
    assert_break(&path, 40, "truncated");
}

#[test]
fn verify_with_a_head_notices_whole_lines_cut_from_the_end() {
    let (_dir, path, lines) = one_file_log();
    let head: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    let head = head["hash"].as_str().unwrap();
    rewrite(&path, &lines[..38]);
    let output = mcp_guard(&["audit", "verify", "--head", head, text(&path)]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("truncated"), "{}", stderr(&output));
}

#[test]
fn verify_of_a_missing_file_fails_with_one_line() {
    let output = mcp_guard(&["audit", "verify", "/nonexistent/audit.jsonl"]);
    assert!(!output.status.success());
    assert!(stderr(&output).starts_with("/nonexistent/audit.jsonl: cannot read"));
}

// --- trace ---

#[test]
fn trace_prints_an_instructions_tree_of_sessions_calls_and_connections() {
    let (dir, _path, _lines) = one_file_log();
    let output = mcp_guard(&["audit", "trace", "--instruction", "i1", text(dir.path())]);
    assert!(output.status.success(), "{}", stderr(&output));
    let tree = stdout(&output);
    let lines: Vec<&str> = tree.lines().collect();
    assert_eq!(lines[0], "instruction i1", "{tree}");
    // Sessions 1 and 3 work for i1; 0 and 2 for i0.
    let sessions: Vec<&str> = lines
        .iter()
        .filter(|line| line.starts_with("  session "))
        .copied()
        .collect();
    assert_eq!(sessions.len(), 2, "{tree}");
    assert!(
        sessions[0].starts_with("  session s1  principal user1  server crm"),
        "{tree}"
    );
    assert!(
        sessions[1].starts_with("  session s3  principal user0  server crm"),
        "{tree}"
    );
    assert!(
        !tree.contains("session s0") && !tree.contains("s2-c"),
        "{tree}"
    );
    let calls: Vec<&&str> = lines.iter().filter(|l| l.contains("  call ")).collect();
    assert_eq!(calls.len(), 6, "{tree}");
    assert!(
        calls[0].contains("call s1-c0  tools/call  update_contact  allow (rule writes)  -> result"),
        "{tree}"
    );
    assert!(
        calls[0].contains("policy 40µs, upstream 2.5ms, total 2.6ms"),
        "{tree}"
    );
    let connections: Vec<&&str> = lines.iter().filter(|l| l.contains("connect ")).collect();
    assert_eq!(connections.len(), 6, "{tree}");
    assert!(
        connections
            .iter()
            .any(|l| l.contains("connect 10.1.2.3:25  tcp  refuse  exact  node[4242]")),
        "{tree}"
    );
    assert!(
        connections
            .iter()
            .any(|l| l.contains("connect 10.1.2.3:443  tcp  allow (rule crm-api)  exact")),
        "{tree}"
    );
    // Connections are indented under their call.
    assert!(
        connections.iter().all(|l| l.starts_with("      ")),
        "{tree}"
    );
    assert!(lines.iter().any(|l| l.ends_with("session start")), "{tree}");
}

#[test]
fn trace_json_nests_instruction_sessions_calls_and_egress() {
    let (_dir, path, _lines) = one_file_log();
    let output = mcp_guard(&["audit", "trace", "--session", "s2", text(&path), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(report["query"], serde_json::json!({ "session": "s2" }));
    assert_eq!(report["records"], 1 + 3 * 3);
    let instructions = report["instructions"].as_array().unwrap();
    assert_eq!(instructions.len(), 1);
    assert_eq!(instructions[0]["instruction"], "i0");
    let session = &instructions[0]["sessions"][0];
    assert_eq!(session["session"], "s2");
    assert_eq!(session["principal"], "user2");
    assert_eq!(session["events"][0]["detail"]["event"], "start");
    let calls = session["calls"].as_array().unwrap();
    let ids: Vec<&str> = calls
        .iter()
        .map(|c| c["call_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["s2-c0", "s2-c1", "s2-c2"]);
    let refused = &calls[1];
    assert_eq!(refused["decision"], "allow");
    assert_eq!(refused["outcome"]["kind"], "result");
    assert_eq!(refused["latency"]["upstream_us"], 2500);
    assert_eq!(refused["egress"][0]["verdict"], "refuse");
    assert_eq!(refused["egress"][0]["port"], 25);
    assert_eq!(refused["egress"][0]["attribution"], "exact");
}

#[test]
fn trace_by_trace_id_finds_the_calls_and_their_connections() {
    let (_dir, path, _lines) = one_file_log();
    let output = mcp_guard(&["audit", "trace", "--trace", "t3", text(&path), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    let calls = report["instructions"][0]["sessions"][0]["calls"]
        .as_array()
        .unwrap();
    assert_eq!(calls.len(), 3);
    assert!(
        calls
            .iter()
            .all(|c| c["egress"].as_array().unwrap().len() == 1)
    );
}

#[test]
fn trace_of_an_unknown_id_exits_non_zero_with_a_reason() {
    let (_dir, path, _lines) = one_file_log();
    let output = mcp_guard(&["audit", "trace", "--instruction", "nope", text(&path)]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).is_empty());
    assert_eq!(
        stderr(&output).trim_end(),
        "mcp-guard: no audit record has instruction \"nope\""
    );
}

#[test]
fn trace_wants_exactly_one_selector() {
    let (_dir, path, _lines) = one_file_log();
    let none = mcp_guard(&["audit", "trace", text(&path)]);
    assert!(!none.status.success());
    let two = mcp_guard(&[
        "audit",
        "trace",
        "--instruction",
        "i1",
        "--session",
        "s1",
        text(&path),
    ]);
    assert!(!two.status.success());
    assert!(
        stderr(&two).contains("cannot be used with"),
        "{}",
        stderr(&two)
    );
}
