//! The writer, verify and trace together, on real files.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::*;
use crate::policy::{AuditSettings, DurableBefore};

fn settings(dir: &Path) -> AuditSettings {
    AuditSettings {
        path: dir.join("audit.jsonl"),
        ..AuditSettings::default()
    }
}

fn call(tool: &str) -> AuditRecord {
    AuditRecord {
        tool: Some(tool.into()),
        method: Some("tools/call".into()),
        decision: Some(AuditDecision::Allow),
        ..AuditRecord::new(RecordKind::Call)
    }
}

async fn append_calls(log: &AuditLog, count: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 0..count {
        seqs.push(log.append(call(&format!("tool{i}"))).await.unwrap());
    }
    seqs
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn parsed(line: &str) -> StoredRecord {
    serde_json::from_str(line).unwrap()
}

fn verify_log(dir: &Path) -> Result<VerifySummary, ChainBreak> {
    verify(
        &chain_order(&[dir.to_owned()]).unwrap(),
        &VerifyOptions::default(),
    )
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

// --- the writer ---

#[tokio::test]
async fn records_are_numbered_from_one_and_chained_from_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&settings(dir.path())).unwrap();
    assert_eq!(append_calls(&log, 3).await, [1, 2, 3]);
    let lines = lines(&dir.path().join("audit.jsonl"));
    assert_eq!(lines.len(), 3);
    let records: Vec<StoredRecord> = lines.iter().map(|line| parsed(line)).collect();
    assert_eq!(records[0].prev, GENESIS_PREV);
    assert_eq!(records[1].prev, records[0].hash);
    assert_eq!(records[2].prev, records[1].hash);
    assert_eq!(records[2].record.tool.as_deref(), Some("tool2"));
    // RFC 3339, UTC, microseconds.
    let ts = &records[0].ts;
    assert_eq!(ts.len(), "2026-11-01T14:37:22.123456Z".len(), "{ts}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
    assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok());
    // Fields in the documented order, absent ones left out, hash last.
    assert!(lines[0].starts_with(r#"{"seq":1,"ts":""#), "{}", lines[0]);
    assert!(
        lines[0].contains(
            r#""kind":"call","method":"tools/call","tool":"tool0","decision":"allow","hash":""#
        ),
        "{}",
        lines[0]
    );
    assert!(!lines[0].contains("null"));
    assert_eq!(log.records_written(), 3);
    assert_eq!(verify_log(dir.path()).unwrap().last_seq, 3);
}

#[tokio::test]
async fn the_chain_continues_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let first = AuditLog::open(&settings(dir.path())).unwrap();
    append_calls(&first, 2).await;
    drop(first);
    let second = AuditLog::open(&settings(dir.path())).unwrap();
    assert_eq!(append_calls(&second, 2).await, [3, 4]);
    let lines = lines(&dir.path().join("audit.jsonl"));
    assert_eq!(parsed(&lines[2]).prev, parsed(&lines[1]).hash);
    let summary = verify_log(dir.path()).unwrap();
    assert_eq!((summary.records, summary.last_seq), (4, 4));
    assert_eq!(summary.last_hash, parsed(&lines[3]).hash);
}

#[tokio::test]
async fn rotation_renames_to_numbered_files_and_the_chain_runs_through_them() {
    let dir = tempfile::tempdir().unwrap();
    let settings = AuditSettings {
        rotate_bytes: 1000,
        ..settings(dir.path())
    };
    let log = AuditLog::open(&settings).unwrap();
    append_calls(&log, 20).await;
    drop(log);
    let files = chain_order(&[dir.path().to_owned()]).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    for (index, file) in files[..files.len() - 1].iter().enumerate() {
        assert_eq!(*file, files::rotated_path(&settings.path, index as u64 + 1));
        assert!(std::fs::metadata(file).unwrap().len() >= 1000);
    }
    assert_eq!(files.last().unwrap(), &settings.path);
    let summary = verify(&files, &VerifyOptions::default()).unwrap();
    assert_eq!((summary.records, summary.last_seq), (20, 20));

    // Reopened, the chain goes on from wherever the last record is.
    let log = AuditLog::open(&settings).unwrap();
    assert_eq!(append_calls(&log, 1).await, [21]);
    drop(log);
    assert_eq!(verify_log(dir.path()).unwrap().last_seq, 21);
}

#[tokio::test]
async fn after_a_rotation_with_no_live_file_the_chain_continues_from_the_rotated_one() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let log = AuditLog::open(&settings).unwrap();
    append_calls(&log, 3).await;
    drop(log);
    // As if the daemon stopped between renaming the file and creating the next.
    std::fs::rename(&settings.path, files::rotated_path(&settings.path, 1)).unwrap();
    let log = AuditLog::open(&settings).unwrap();
    assert_eq!(append_calls(&log, 1).await, [4]);
    drop(log);
    assert_eq!(verify_log(dir.path()).unwrap().records, 4);
}

type Appending = tokio::task::JoinHandle<Result<u64, AuditError>>;

/// Spawns `count` appends at once, each a task of its own, of calls to `tool<i>`.
fn spawn_appends(log: &AuditLog, tool: &str, count: usize) -> Vec<Appending> {
    (0..count)
        .map(|i| {
            let (log, record) = (log.clone(), call(&format!("{tool}{i}")));
            tokio::spawn(async move { log.append(record).await })
        })
        .collect()
}

/// How the appends went, in the order they were spawned.
async fn results_of(tasks: Vec<Appending>) -> Vec<Result<u64, AuditError>> {
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

/// The seqs the appends got, in ascending order; every one must have succeeded.
async fn seqs_of(tasks: Vec<Appending>) -> Vec<u64> {
    let mut seqs: Vec<u64> = results_of(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    seqs.sort_unstable();
    seqs
}

/// Waits until `count` appends are queued behind the running flush.
async fn until_queued(log: &AuditLog, count: usize) {
    while log.queued() < count {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn concurrent_appends_get_distinct_consecutive_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&settings(dir.path())).unwrap();
    let seqs = seqs_of(spawn_appends(&log, "t", 200)).await;
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>());
    assert_eq!(verify_log(dir.path()).unwrap().records, 200);
}

// On the multi-threaded runtime, as in the daemon: the next flush runs on a blocking thread,
// which must be able to call `block_in_place`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_written_during_a_flush_share_the_next_flush() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let log = AuditLog::open(&settings).unwrap();
    let running = log.hold_flush();
    let tasks = spawn_appends(&log, "t", 50);
    // Each queues for the next flush, which writes them all with one write.
    until_queued(&log, 50).await;
    assert!(tasks.iter().all(|task| !task.is_finished()));
    assert!(lines(&settings.path).is_empty());
    drop(running);
    assert_eq!(seqs_of(tasks).await, (1..=50).collect::<Vec<u64>>());
    assert_eq!(log.flushes(), 1);
    assert_eq!(verify_log(dir.path()).unwrap().records, 50);
}

#[tokio::test]
async fn append_all_commits_its_records_in_order_with_one_flush() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&settings(dir.path())).unwrap();
    append_calls(&log, 1).await;
    let records: Vec<_> = (0..5).map(|i| call(&format!("batch{i}"))).collect();
    assert_eq!(log.append_all(&records).await.unwrap(), 2);
    assert_eq!(log.flushes(), 2);
    let lines = lines(&dir.path().join("audit.jsonl"));
    assert!(lines[5].contains("batch4"), "{}", lines[5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_on_the_multi_threaded_runtime_are_all_committed_in_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&settings(dir.path())).unwrap();
    let seqs = seqs_of(spawn_appends(&log, "t", 300)).await;
    assert_eq!(seqs, (1..=300).collect::<Vec<u64>>());
    assert_eq!(verify_log(dir.path()).unwrap().records, 300);
}

#[tokio::test]
async fn opening_cuts_a_torn_last_line_and_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let log = AuditLog::open(&settings).unwrap();
    append_calls(&log, 3).await;
    drop(log);
    let whole = lines(&settings.path);
    // A crash in the middle of writing the third record.
    let len = std::fs::metadata(&settings.path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&settings.path)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let log = AuditLog::open(&settings).unwrap();
    assert_eq!(log.torn_bytes_cut(), whole[2].len() as u64 + 1 - 10);
    assert_eq!(lines(&settings.path), whole[..2]);
    assert_eq!(log.append(call("after")).await.unwrap(), 3);
    drop(log);
    assert_eq!(verify_log(dir.path()).unwrap().records, 3);
    // A sound file is left alone.
    let log = AuditLog::open(&settings).unwrap();
    assert_eq!(log.torn_bytes_cut(), 0);
}

#[tokio::test]
async fn opening_refuses_a_cut_last_line_that_was_given_a_newline() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let log = AuditLog::open(&settings).unwrap();
    append_calls(&log, 3).await;
    drop(log);
    let text = std::fs::read_to_string(&settings.path).unwrap();
    std::fs::write(&settings.path, format!("{}\n", &text[..text.len() - 10])).unwrap();
    let error = AuditLog::open(&settings).err().expect("refused");
    assert!(
        matches!(&error, AuditError::Damaged { path, line: 3, .. } if *path == settings.path),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("mcp-guard audit verify"),
        "{error}"
    );
}

#[tokio::test]
async fn opening_refuses_to_continue_from_an_edited_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let log = AuditLog::open(&settings).unwrap();
    append_calls(&log, 2).await;
    drop(log);
    let mut lines = lines(&settings.path);
    lines[1] = lines[1].replace("tool1", "tool9");
    write_lines(&settings.path, &lines);
    let error = AuditLog::open(&settings).err().expect("refused");
    assert!(
        error.to_string().contains("audit.jsonl:2: hash mismatch"),
        "{error}"
    );
}

#[tokio::test]
async fn a_failed_write_fails_its_appends_leaves_no_trace_and_the_next_write_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let log = AuditLog::open(&settings).unwrap();
    append_calls(&log, 2).await;
    log.fail_next_writes(2);
    for _ in 0..2 {
        let error = log.append(call("lost")).await.unwrap_err();
        assert!(matches!(error, AuditError::Write { .. }), "{error:?}");
        assert!(error.to_string().contains("No space left"), "{error}");
        assert!(log.failing());
    }
    assert_eq!(log.failures(), 2);
    // The half-written group is gone, and the chain goes on from the last durable record.
    assert_eq!(log.append(call("kept")).await.unwrap(), 3);
    assert!(!log.failing());
    drop(log);
    let lines = lines(&settings.path);
    assert_eq!(lines.len(), 3);
    assert!(!lines.iter().any(|line| line.contains("lost")));
    assert_eq!(verify_log(dir.path()).unwrap().records, 3);
}

#[tokio::test]
async fn a_failed_flush_fails_the_appends_waiting_for_it_and_the_next_flush_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let log = AuditLog::open(&settings).unwrap();
    append_calls(&log, 1).await;
    log.fail_next_flushes(1);
    let error = log.append(call("unsure")).await.unwrap_err();
    assert!(matches!(error, AuditError::Write { .. }), "{error:?}");
    assert!(error.to_string().contains("Input/output error"), "{error}");
    assert!(log.failing());
    assert_eq!(log.failures(), 1);
    assert_eq!(log.flush_failures(), 1);
    // Written but not known durable: the chain runs through it, and the next flush covers it.
    assert_eq!(log.append(call("after")).await.unwrap(), 3);
    assert!(!log.failing());
    assert_eq!(log.flushes(), 2);
    drop(log);
    assert_eq!(verify_log(dir.path()).unwrap().records, 3);
}

/// Overwrites the file's bytes from `from` on with zeros: what a reboot may find where
/// writeback failed and the kernel dropped the pages.
fn lose_bytes_after(path: &Path, from: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[from..].fill(0);
    std::fs::write(path, bytes).unwrap();
}

fn file_len(path: &Path) -> usize {
    std::fs::metadata(path).unwrap().len() as usize
}

#[tokio::test]
async fn after_a_failed_flush_what_it_may_have_lost_is_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let log = AuditLog::open(&settings).unwrap();
    append_calls(&log, 1).await;
    let durable = file_len(&settings.path);
    log.fail_next_flushes(1);
    log.append(call("unsure")).await.unwrap_err();
    // Linux marks the pages clean after a failed writeback: a later flush succeeds without
    // writing them. Here they are gone from the file outright.
    lose_bytes_after(&settings.path, durable);
    assert_eq!(log.append(call("after")).await.unwrap(), 3);
    drop(log);
    let lines = lines(&settings.path);
    assert_eq!(parsed(&lines[1]).record.tool.as_deref(), Some("unsure"));
    assert_eq!(verify_log(dir.path()).unwrap().records, 3);
}

#[tokio::test]
async fn flushes_failing_for_long_refuse_writes_until_a_flush_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let log = AuditLog::open(&settings).unwrap();
    log.fail_next_flushes(usize::MAX);
    // Each append writes and fails to flush, until the bytes kept to write again reach the
    // cap; then the write itself is refused (the flush it tries first fails too).
    let mut attempts = 0;
    let error = loop {
        attempts += 1;
        assert!(attempts < 100, "no write was refused");
        let error = log.append(call("unsure")).await.unwrap_err();
        if error
            .to_string()
            .contains("since the last successful flush")
        {
            break error;
        }
        assert!(error.to_string().contains("Input/output error"), "{error}");
    };
    assert!(
        error.to_string().contains("refusing to write more"),
        "{error}"
    );
    let written = file_len(&settings.path);
    log.append(call("refused")).await.unwrap_err();
    assert_eq!(file_len(&settings.path), written);
    // The disk recovers: the next append flushes what was kept, then its own record.
    log.fail_next_flushes(0);
    lose_bytes_after(&settings.path, 0);
    let seq = log.append(call("after")).await.unwrap();
    assert!(!log.failing());
    drop(log);
    assert_eq!(verify_log(dir.path()).unwrap().records, seq);
    assert!(
        !lines(&settings.path)
            .iter()
            .any(|l| l.contains("\"refused\""))
    );
}

/// Three appends queued behind a running flush, then handed to the next one.
async fn queue_three_then_flush(log: &AuditLog) -> Vec<Result<u64, AuditError>> {
    let running = log.hold_flush();
    let tasks = spawn_appends(log, "queued", 3);
    until_queued(log, 3).await;
    drop(running);
    results_of(tasks).await
}

#[tokio::test]
async fn a_failed_write_of_a_queued_group_fails_every_append_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let log = AuditLog::open(&settings).unwrap();
    log.fail_next_writes(1);
    for result in queue_three_then_flush(&log).await {
        let error = result.unwrap_err();
        assert!(error.to_string().contains("No space left"), "{error}");
    }
    assert_eq!(log.failures(), 3);
    assert_eq!(log.append(call("kept")).await.unwrap(), 1);
    drop(log);
    assert!(!lines(&settings.path).iter().any(|l| l.contains("queued")));
    assert_eq!(verify_log(dir.path()).unwrap().records, 1);
}

#[tokio::test]
async fn a_failed_flush_of_a_queued_group_fails_every_append_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let log = AuditLog::open(&settings).unwrap();
    log.fail_next_flushes(1);
    for result in queue_three_then_flush(&log).await {
        let error = result.unwrap_err();
        assert!(error.to_string().contains("Input/output error"), "{error}");
    }
    assert_eq!(log.failures(), 3);
    // Written, not known durable: the chain runs through them.
    assert_eq!(log.append(call("after")).await.unwrap(), 4);
    drop(log);
    assert_eq!(verify_log(dir.path()).unwrap().records, 4);
}

fn outcome_of(tool: &str) -> AuditRecord {
    AuditRecord {
        decision: None,
        outcome: Some(Outcome {
            kind: OutcomeKind::Result,
            code: None,
            message: None,
        }),
        ..call(tool)
    }
}

#[tokio::test]
async fn by_default_a_decision_record_is_flushed_before_append_decision_returns() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    assert_eq!(settings.durable_before, DurableBefore::Forward);
    let log = AuditLog::open(&settings).unwrap();
    assert_eq!(log.append_decision(call("read")).await.unwrap(), 1);
    assert_eq!(log.flushes(), 1);
    assert_eq!(log.append(outcome_of("read")).await.unwrap(), 2);
    assert_eq!(log.flushes(), 2);
    drop(log);
    assert_eq!(verify_log(dir.path()).unwrap().records, 2);
}

#[tokio::test]
async fn durable_before_answer_writes_the_decision_and_flushes_it_with_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let settings = AuditSettings {
        durable_before: DurableBefore::Answer,
        ..settings(dir.path())
    };
    let log = AuditLog::open(&settings).unwrap();
    assert_eq!(log.append_decision(call("read")).await.unwrap(), 1);
    // In the file (a crash of the process loses nothing), not yet flushed.
    assert_eq!(lines(&settings.path).len(), 1);
    assert_eq!(log.flushes(), 0);
    // The outcome's one flush covers both records.
    assert_eq!(log.append(outcome_of("read")).await.unwrap(), 2);
    assert_eq!(log.flushes(), 1);
    // Records other than a call's decision are flushed as always.
    assert_eq!(log.append(call("denied")).await.unwrap(), 3);
    assert_eq!(log.flushes(), 2);
    assert_eq!(log.records_written(), 3);
    drop(log);
    let lines = lines(&settings.path);
    assert_eq!(
        parsed(&lines[0]).record.decision,
        Some(AuditDecision::Allow)
    );
    assert!(parsed(&lines[1]).record.outcome.is_some());
    assert_eq!(verify_log(dir.path()).unwrap().records, 3);
}

#[tokio::test]
async fn durable_before_answer_flushes_a_file_before_rotating_it_away() {
    let dir = tempfile::tempdir().unwrap();
    let settings = AuditSettings {
        durable_before: DurableBefore::Answer,
        rotate_bytes: 1,
        ..settings(dir.path())
    };
    let log = AuditLog::open(&settings).unwrap();
    log.append_decision(call("read")).await.unwrap();
    // The next flush goes to the next file, so the rotation flushed this one.
    assert_eq!(log.flushes(), 1);
    log.append(outcome_of("read")).await.unwrap();
    drop(log);
    assert_eq!(verify_log(dir.path()).unwrap().records, 2);
}

#[tokio::test]
async fn durable_before_answer_fails_a_decision_that_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let settings = AuditSettings {
        durable_before: DurableBefore::Answer,
        ..settings(dir.path())
    };
    let log = AuditLog::open(&settings).unwrap();
    log.fail_next_writes(1);
    let error = log.append_decision(call("lost")).await.unwrap_err();
    assert!(error.to_string().contains("No space left"), "{error}");
    assert!(log.failing());
    assert_eq!(log.append_decision(call("kept")).await.unwrap(), 1);
    log.append(outcome_of("kept")).await.unwrap();
    drop(log);
    assert!(!lines(&settings.path).iter().any(|l| l.contains("lost")));
    assert_eq!(verify_log(dir.path()).unwrap().records, 2);
}

fn flushed_every(dir: &Path, interval_ms: u64) -> AuditSettings {
    AuditSettings {
        durable_before: DurableBefore::Interval,
        flush_interval_ms: interval_ms,
        ..settings(dir)
    }
}

/// Waits (a while, then fails) until the background flusher has flushed `count` times.
async fn until_flushed(log: &AuditLog, count: u64) {
    until_counted("flushes", || log.flushes(), count).await;
}

/// The log file's lines once its length is what the unflushed-bytes gauge counts (a while,
/// then fails). While flushes fail, each retry truncates the file and writes it again, and a
/// read in between sees less than there is.
async fn lines_as_the_gauge_counts(log: &AuditLog, path: &Path) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let content = std::fs::read_to_string(path).unwrap();
        if content.len() as i64 == log.unflushed_bytes() {
            return content.lines().map(str::to_owned).collect();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the file holds {} bytes, the gauge counts {}",
            content.len(),
            log.unflushed_bytes()
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Waits (a while, then fails) until the background flusher has failed `count` flushes.
async fn until_flush_failures(log: &AuditLog, count: u64) {
    until_counted("failed flushes", || log.flush_failures(), count).await;
}

async fn until_counted(what: &str, counted: impl Fn() -> u64, count: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while counted() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "{} {what}, waiting for {count}",
            counted()
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn durable_before_interval_acknowledges_records_once_written() {
    let dir = tempfile::tempdir().unwrap();
    // An interval no test outlasts: every flush below would be one an append waited for.
    let settings = flushed_every(dir.path(), 60_000);
    let log = AuditLog::open(&settings).unwrap();
    assert_eq!(log.append_decision(call("read")).await.unwrap(), 1);
    assert_eq!(log.append(outcome_of("read")).await.unwrap(), 2);
    assert_eq!(log.append(call("denied")).await.unwrap(), 3);
    assert_eq!(log.append_all(&[call("a"), call("b")]).await.unwrap(), 4);
    assert_eq!(lines(&settings.path).len(), 5);
    assert_eq!(log.flushes(), 0);
    assert_eq!(log.records_written(), 5);
    // Everything written is still to be flushed, and the gauge says how much.
    let written = std::fs::metadata(&settings.path).unwrap().len();
    assert_eq!(log.unflushed_bytes(), written as i64);
    drop(log);
    assert_eq!(verify_log(dir.path()).unwrap().records, 5);
}

#[tokio::test]
async fn durable_before_interval_counts_a_failed_flush_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let counters = AuditCounters::default();
    let flush_failures = counters.flush_failures.clone();
    // No background flush comes before the close: the close's flush is the only one.
    let log = AuditLog::open_with_counters(&flushed_every(dir.path(), 60_000), counters).unwrap();
    append_calls(&log, 2).await;
    log.fail_next_flushes(1);
    drop(log);
    assert_eq!(flush_failures.get(), 1, "the final flush failed unseen");
}

#[tokio::test]
async fn durable_before_interval_flushes_in_the_background_once_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&flushed_every(dir.path(), 20)).unwrap();
    // In one append: three apart could straddle the first flush on a loaded machine.
    log.append_all(&[call("a"), call("b"), call("c")])
        .await
        .unwrap();
    until_flushed(&log, 1).await;
    // Nothing written since: no flush is due, however long the flusher waits.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(log.flushes(), 1);
    assert_eq!(log.unflushed_bytes(), 0, "all of it was flushed");
    append_calls(&log, 1).await;
    until_flushed(&log, 2).await;
    drop(log);
    assert_eq!(verify_log(dir.path()).unwrap().records, 4);
}

#[tokio::test]
async fn durable_before_interval_refuses_appends_after_a_failed_flush_until_one_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let settings = flushed_every(dir.path(), 10);
    let log = AuditLog::open(&settings).unwrap();
    // The disk fails every flush until told otherwise.
    log.fail_next_flushes(usize::MAX);
    assert_eq!(log.append(call("written")).await.unwrap(), 1);
    let error = loop {
        match log.append(call("before the failure")).await {
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(2)).await,
            Err(error) => break error,
        }
    };
    assert!(error.to_string().contains("Input/output error"), "{error}");
    assert!(log.failing());
    assert!(log.flush_failures() >= 1);
    // What no flush made durable is what the gauge shows.
    let written = lines_as_the_gauge_counts(&log, &settings.path).await.len();
    assert!(log.append(call("refused")).await.is_err());
    assert_eq!(
        lines_as_the_gauge_counts(&log, &settings.path).await.len(),
        written,
        "a refused record was written"
    );
    // Nothing was ever flushed, and the kernel may have dropped all of it. A kernel drops
    // pages at a failed flush, never between the flusher's rewrite and its flush: so the
    // disk recovers only after a retry begun after the loss has failed too. Counted from the
    // loss's end, the retry that may have rewritten before it is the first failure, the next
    // retry (begun after that failure) the second.
    lose_bytes_after(&settings.path, 0);
    let failed = log.flush_failures();
    until_flush_failures(&log, failed + 2).await;
    // The disk recovers: the next retry writes it all again and flushes, and appends go on.
    log.fail_next_flushes(0);
    until_flushed(&log, 1).await;
    log.append(call("after")).await.unwrap();
    assert!(!log.failing());
    drop(log);
    let lines = lines(&settings.path);
    assert!(!lines.iter().any(|line| line.contains("\"refused\"")));
    assert_eq!(
        parsed(lines.last().unwrap()).record.tool.as_deref(),
        Some("after")
    );
    assert_eq!(verify_log(dir.path()).unwrap().records, lines.len() as u64);
}

#[tokio::test]
async fn a_full_disk_fails_every_append_and_is_counted() {
    // /dev/full takes the open and refuses every write with ENOSPC.
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    std::os::unix::fs::symlink("/dev/full", &settings.path).unwrap();
    let log = AuditLog::open(&settings).unwrap();
    for _ in 0..3 {
        let error = log.append(call("x")).await.unwrap_err();
        assert!(error.to_string().contains("No space left"), "{error}");
        assert!(log.failing());
    }
    assert_eq!(log.failures(), 3);
    assert_eq!(log.records_written(), 0);
}

#[tokio::test]
async fn a_second_writer_of_the_same_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let first = AuditLog::open(&settings).unwrap();
    let error = AuditLog::open(&settings).err().expect("refused");
    assert!(matches!(error, AuditError::InUse { .. }), "{error:?}");
    assert!(error.to_string().contains("only one writer"), "{error}");
    append_calls(&first, 1).await;
    drop(first);
    // Once the first lets go, the log opens again.
    let second = AuditLog::open(&settings).unwrap();
    assert_eq!(append_calls(&second, 1).await, [2]);
}

// --- verify ---

/// A log of `count` records in one file, and its lines.
async fn sample_log(count: usize) -> (tempfile::TempDir, PathBuf, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path());
    let log = AuditLog::open(&settings).unwrap();
    append_calls(&log, count).await;
    drop(log);
    let lines = lines(&settings.path);
    (dir, settings.path, lines)
}

fn break_of(path: &Path) -> ChainBreak {
    verify(&[path.to_owned()], &VerifyOptions::default()).unwrap_err()
}

#[tokio::test]
async fn verify_reports_a_changed_byte_as_a_hash_mismatch_at_its_line() {
    let (_dir, path, mut lines) = sample_log(5).await;
    lines[2] = lines[2].replacen("tool2", "tool7", 1);
    write_lines(&path, &lines);
    let found = break_of(&path);
    assert_eq!(found.line, Some(3));
    assert!(found.problem.starts_with("hash mismatch"), "{found}");
    assert!(
        found
            .to_string()
            .starts_with(&format!("{}:3: ", path.display()))
    );
}

#[tokio::test]
async fn verify_reports_a_removed_line_as_a_seq_gap() {
    let (_dir, path, mut lines) = sample_log(5).await;
    lines.remove(2);
    write_lines(&path, &lines);
    let found = break_of(&path);
    assert_eq!(found.line, Some(3));
    assert!(found.problem.starts_with("seq gap"), "{found}");
    assert!(found.problem.contains("record 3 is missing"), "{found}");
}

#[tokio::test]
async fn verify_reports_swapped_lines() {
    let (_dir, path, mut lines) = sample_log(5).await;
    lines.swap(1, 2);
    write_lines(&path, &lines);
    let found = break_of(&path);
    assert_eq!(found.line, Some(2));
    assert!(found.problem.contains("out of order"), "{found}");
}

#[tokio::test]
async fn verify_reports_a_record_replaced_with_a_rehashed_one_as_a_prev_mismatch() {
    let (dir, path, lines) = sample_log(3).await;
    // A record for the same seq, forged with a correct hash of its own, but not chained.
    let forged_dir = dir.path().join("forged");
    let log = AuditLog::open(&settings(&forged_dir)).unwrap();
    append_calls(&log, 2).await;
    drop(log);
    let forged = self::lines(&forged_dir.join("audit.jsonl"));
    let mut tampered = lines.clone();
    tampered[1] = forged[1].clone();
    write_lines(&path, &tampered);
    let found = break_of(&path);
    assert_eq!(found.line, Some(2));
    assert!(found.problem.starts_with("prev mismatch"), "{found}");
}

#[tokio::test]
async fn verify_reports_a_cut_tail_as_truncated() {
    let (_dir, path, lines) = sample_log(4).await;
    let text = lines.join("\n") + "\n";
    std::fs::write(&path, &text[..text.len() - 20]).unwrap();
    let found = break_of(&path);
    assert_eq!(found.line, Some(4));
    assert!(found.problem.starts_with("truncated"), "{found}");

    // Cut, then a newline added: the last line still does not parse.
    std::fs::write(&path, format!("{}\n", &text[..text.len() - 20])).unwrap();
    let found = break_of(&path);
    assert_eq!(found.line, Some(4));
    assert!(found.problem.starts_with("truncated"), "{found}");
}

#[tokio::test]
async fn verify_notices_whole_records_cut_from_the_end_only_against_a_head() {
    let (_dir, path, lines) = sample_log(4).await;
    let head = parsed(&lines[3]).hash;
    write_lines(&path, &lines[..3]);
    // The chain alone cannot tell: what is left is a sound, shorter chain.
    assert!(verify(std::slice::from_ref(&path), &VerifyOptions::default()).is_ok());
    let options = VerifyOptions {
        head: Some(head),
        ..VerifyOptions::default()
    };
    let found = verify(std::slice::from_ref(&path), &options).unwrap_err();
    assert!(found.problem.starts_with("truncated"), "{found}");
}

#[tokio::test]
async fn verify_wants_the_chain_from_its_start_unless_partial() {
    let dir = tempfile::tempdir().unwrap();
    let settings = AuditSettings {
        rotate_bytes: 600,
        ..settings(dir.path())
    };
    let log = AuditLog::open(&settings).unwrap();
    append_calls(&log, 10).await;
    drop(log);
    let files = chain_order(&[dir.path().to_owned()]).unwrap();
    let without_first = &files[1..];
    let found = verify(without_first, &VerifyOptions::default()).unwrap_err();
    assert_eq!(found.line, Some(1));
    assert!(found.problem.contains("chain starts at seq"), "{found}");
    let partial = VerifyOptions {
        partial: true,
        ..VerifyOptions::default()
    };
    assert_eq!(verify(without_first, &partial).unwrap().last_seq, 10);
    // Files in the wrong order break the chain where they meet.
    let mut reversed = files.clone();
    reversed.reverse();
    assert!(verify(&reversed, &VerifyOptions::default()).is_err());
}

#[tokio::test]
async fn verify_of_an_empty_log_is_ok() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, "").unwrap();
    let summary = verify(&[path], &VerifyOptions::default()).unwrap();
    assert_eq!(
        summary.to_string(),
        format!("ok: 0 records, last seq 0, last hash {GENESIS_PREV}")
    );
}

// --- trace ---

/// Two instructions over three sessions; egress exact, ambiguous across instructions, and
/// idle.
async fn incident_log(dir: &Path) -> PathBuf {
    let settings = AuditSettings {
        store_arguments: true,
        redact: vec!["password".into()],
        ..settings(dir)
    };
    let log = AuditLog::open(&settings).unwrap();
    let session_start = |session: &str, principal: &str| AuditRecord {
        session: Some(session.into()),
        principal: Some(principal.into()),
        server: Some("crm".into()),
        ..AuditRecord::event(RecordKind::Session, "start")
    };
    let decision = |session: &str, instruction: &str, id: &str, tool: &str, decision| {
        let mut record = AuditRecord {
            session: Some(session.into()),
            instruction: Some(instruction.into()),
            trace_id: Some(format!("trace-{instruction}")),
            call_id: Some(id.into()),
            server: Some("crm".into()),
            method: Some("tools/call".into()),
            tool: Some(tool.into()),
            client_addr: Some("192.0.2.10".into()),
            decision: Some(decision),
            rule: Some("writes".into()),
            latency: Some(Latency {
                policy_us: Some(42),
                ..Latency::default()
            }),
            ..AuditRecord::new(RecordKind::Call)
        };
        // Stored arguments that mention the other instruction must not confuse the search.
        record.set_arguments(
            &settings,
            &json!({ "note": { "instruction": "inst-B" }, "password": "x" }),
        );
        record
    };
    let outcome = |session: &str, instruction: &str, id: &str| AuditRecord {
        session: Some(session.into()),
        instruction: Some(instruction.into()),
        call_id: Some(id.into()),
        outcome: Some(Outcome {
            kind: OutcomeKind::Result,
            code: None,
            message: None,
        }),
        latency: Some(Latency {
            policy_us: None,
            upstream_us: Some(3100),
            total_us: Some(3300),
        }),
        ..AuditRecord::new(RecordKind::Call)
    };
    let egress = |session: &str, instruction: &str, calls: &[&str], port: u16| AuditRecord {
        session: Some(session.into()),
        instruction: Some(instruction.into()),
        addr: Some("10.0.0.5".parse().unwrap()),
        port: Some(port),
        protocol: Some(Protocol::Tcp),
        verdict: Some(if port == 443 {
            Verdict::Allow
        } else {
            Verdict::Refuse
        }),
        rule: (port == 443).then(|| "crm-api".into()),
        attribution: Some(match calls.len() {
            0 => Attribution::Idle,
            1 => Attribution::Exact,
            _ => Attribution::Ambiguous,
        }),
        call_ids: (!calls.is_empty()).then(|| calls.iter().map(|c| c.to_string()).collect()),
        ..AuditRecord::new(RecordKind::Egress)
    };
    let records = vec![
        session_start("s1", "alice"),
        session_start("s2", "bob"),
        decision("s1", "inst-A", "c1", "update_contact", AuditDecision::Allow),
        decision("s2", "inst-B", "c2", "export", AuditDecision::Allow),
        egress("s1", "inst-A", &["c1"], 443),
        outcome("s1", "inst-A", "c1"),
        decision("s1", "inst-B", "c3", "update_contact", AuditDecision::Allow),
        decision("s1", "inst-A", "c4", "delete_contact", AuditDecision::Deny),
        // In flight with c3 (inst-B) and c4 (inst-A); stamped with inst-B.
        egress("s1", "inst-B", &["c3", "c4"], 8080),
        egress("s2", "inst-B", &["c2"], 443),
        egress("s1", "inst-A", &[], 25),
        session_start("s3", "alice"),
        decision("s3", "inst-A", "c5", "update_contact", AuditDecision::Allow),
        AuditRecord {
            session: Some("s1".into()),
            ..AuditRecord::event(RecordKind::Session, "end")
        },
    ];
    for record in records {
        log.append(record).await.unwrap();
    }
    settings.path
}

fn call_ids(session: &trace::SessionNode) -> Vec<&str> {
    session
        .calls
        .iter()
        .map(|call| call.call_id.as_deref().unwrap())
        .collect()
}

#[tokio::test]
async fn trace_of_an_instruction_finds_its_calls_and_every_connection_they_made() {
    let dir = tempfile::tempdir().unwrap();
    let path = incident_log(dir.path()).await;
    let report = trace(&[path], &TraceQuery::Instruction("inst-A".into())).unwrap();
    assert_eq!(report.instructions.len(), 1, "{report:#?}");
    let instruction = &report.instructions[0];
    assert_eq!(instruction.instruction.as_deref(), Some("inst-A"));
    let sessions: Vec<_> = instruction
        .sessions
        .iter()
        .map(|s| s.session.as_deref().unwrap())
        .collect();
    assert_eq!(sessions, ["s1", "s3"]);
    let s1 = &instruction.sessions[0];
    assert_eq!(s1.principal.as_deref(), Some("alice"));
    assert_eq!(call_ids(s1), ["c1", "c4"]);
    let events: Vec<_> = s1
        .events
        .iter()
        .map(|e| e.detail.as_ref().unwrap()["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["start", "end"]);
    // c1: decision and outcome merged, its exact connection under it.
    let c1 = &s1.calls[0];
    assert_eq!(c1.decision, Some(AuditDecision::Allow));
    assert_eq!(c1.outcome.as_ref().unwrap().kind, OutcomeKind::Result);
    let latency = c1.latency.unwrap();
    assert_eq!(
        (latency.policy_us, latency.upstream_us, latency.total_us),
        (Some(42), Some(3100), Some(3300))
    );
    assert_eq!(c1.egress.len(), 1);
    assert_eq!(c1.egress[0].port, Some(443));
    // The ambiguous connection, stamped with the other instruction, is found through c4.
    let c4 = &s1.calls[1];
    assert_eq!(c4.decision, Some(AuditDecision::Deny));
    assert_eq!(c4.egress.len(), 1);
    assert_eq!(c4.egress[0].attribution, Some(Attribution::Ambiguous));
    // The idle connection stamped with inst-A sits under its session.
    assert_eq!(s1.egress.len(), 1);
    assert_eq!(s1.egress[0].port, Some(25));
    // Where the call came from, in JSON and in the text tree.
    assert_eq!(c1.client_addr.as_deref(), Some("192.0.2.10"));
    // Nothing of inst-B's calls.
    let text = report.to_text();
    assert!(
        text.contains("update_contact  from 192.0.2.10  allow"),
        "{text}"
    );
    assert!(!text.contains("c2") && !text.contains("call c3"), "{text}");
    assert_eq!(report.records, 10, "{report:#?}");
}

#[tokio::test]
async fn trace_of_a_session_groups_its_calls_by_instruction() {
    let dir = tempfile::tempdir().unwrap();
    let path = incident_log(dir.path()).await;
    let report = trace(&[path], &TraceQuery::Session("s1".into())).unwrap();
    let groups: Vec<_> = report
        .instructions
        .iter()
        .map(|node| {
            (
                node.instruction.as_deref().unwrap(),
                call_ids(&node.sessions[0]),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [("inst-A", vec!["c1", "c4"]), ("inst-B", vec!["c3"])]
    );
    // The ambiguous connection appears under both candidate calls.
    let c3 = &report.instructions[1].sessions[0].calls[0];
    assert_eq!(c3.egress[0].port, Some(8080));
}

#[tokio::test]
async fn trace_of_a_trace_id_and_its_json_form() {
    let dir = tempfile::tempdir().unwrap();
    let path = incident_log(dir.path()).await;
    let report = trace(&[path], &TraceQuery::Trace("trace-inst-B".into())).unwrap();
    let json: Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["query"], json!({ "trace_id": "trace-inst-B" }));
    let sessions = json["instructions"][0]["sessions"].as_array().unwrap();
    let calls: Vec<&str> = sessions
        .iter()
        .flat_map(|s| s["calls"].as_array().unwrap())
        .map(|c| c["call_id"].as_str().unwrap())
        .collect();
    assert_eq!(calls, ["c2", "c3"]);
    let c2 = &sessions[0]["calls"][0];
    assert_eq!(c2["tool"], "export");
    assert_eq!(c2["egress"][0]["verdict"], "allow");
    assert_eq!(c2["egress"][0]["addr"], "10.0.0.5");
}

#[tokio::test]
async fn trace_of_an_unknown_id_finds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = incident_log(dir.path()).await;
    let report = trace(&[path], &TraceQuery::Instruction("inst".into())).unwrap();
    assert_eq!(report.records, 0);
    assert!(report.instructions.is_empty());
}

#[tokio::test]
async fn trace_across_many_sessions_finds_their_other_instructions_connections_too() {
    // More sessions than the second pass searches for one by one.
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&settings(dir.path())).unwrap();
    let sessions = 40;
    for s in 0..sessions {
        let session = Some(format!("s{s}"));
        log.append(AuditRecord {
            session: session.clone(),
            ..AuditRecord::event(RecordKind::Session, "start")
        })
        .await
        .unwrap();
        for (suffix, instruction) in [("a", "inst-Z"), ("b", "other")] {
            log.append(AuditRecord {
                session: session.clone(),
                instruction: Some(instruction.into()),
                call_id: Some(format!("s{s}-{suffix}")),
                ..call("write")
            })
            .await
            .unwrap();
        }
        // In flight with both calls; stamped with the other instruction.
        log.append(AuditRecord {
            session: session.clone(),
            instruction: Some("other".into()),
            attribution: Some(Attribution::Ambiguous),
            call_ids: Some(vec![format!("s{s}-a"), format!("s{s}-b")]),
            port: Some(443),
            ..AuditRecord::new(RecordKind::Egress)
        })
        .await
        .unwrap();
    }
    drop(log);
    let path = dir.path().join("audit.jsonl");
    let report = trace(&[path], &TraceQuery::Instruction("inst-Z".into())).unwrap();
    assert_eq!(report.instructions.len(), 1);
    let found = &report.instructions[0].sessions;
    assert_eq!(found.len(), sessions);
    for session in found {
        assert_eq!(session.events.len(), 1);
        assert_eq!(session.calls.len(), 1);
        assert_eq!(session.calls[0].egress.len(), 1);
    }
    assert_eq!(report.records, sessions * 3);
}
