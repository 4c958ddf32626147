//! `cargo xtask bench audit`: how fast the audit log takes records with fsync on, and how
//! long `mcp-guard audit trace` takes over a million records.
//!
//! Appends: a fresh log (fsync on, group commit) and N tasks appending call records as fast as
//! the log acknowledges them, for a few seconds per concurrency level; reported: records per
//! second, and the median and p99 time an append waits for its record to be durable. Each level
//! runs twice: with the default `durable_before: "forward"` (an append waits for the flush that
//! covers its record) and with `"interval"` (an append waits for its write; a background thread
//! flushes every 10 ms).
//!
//! Trace: a log of 1,000,000 realistic records (10,000 agent sessions, 10,000 instructions,
//! each instruction worked on by two sessions; per session a start and an end, 32 calls each
//! with a decision record, an egress record and an outcome record, and two idle connections),
//! written by the real writer with the default 100 MiB rotation, so the trace reads several
//! files. Then the real `mcp-guard audit trace --instruction X DIR` process is timed (start to
//! exit, output captured), median of `--runs` runs after one warm-up run (so the files are in
//! the page cache, as on a host that writes them); `audit verify` over the same files is timed
//! once for reference.
//!
//! The log goes under `--dir` (default: the system temp directory), which should be on the
//! disk the daemon would use: on tmpfs, fsync costs nothing and the append numbers flatter.
//! Flags: `--seconds S` (3), `--concurrency C,C,..` (1,32,256), `--records N` (1000000),
//! `--sessions N` (10000), `--runs N` (5), `--dir PATH`, `--keep` (leave the generated log
//! there, and say where), `--json`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_guard::audit::{
    Attribution, AuditDecision, AuditLog, AuditRecord, Latency, Outcome, OutcomeKind, Protocol,
    RecordKind, Verdict,
};
use mcp_guard::policy::{AuditSettings, DurableBefore};
use mcp_guard_tests::bench::parse_number;
use serde_json::{Value, json};

struct Options {
    seconds: f64,
    concurrency: Vec<usize>,
    records: usize,
    sessions: usize,
    runs: usize,
    dir: Option<PathBuf>,
    keep: bool,
    json: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        seconds: 3.0,
        concurrency: vec![1, 32, 256],
        records: 1_000_000,
        sessions: 10_000,
        runs: 5,
        dir: None,
        keep: false,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => options.seconds = parse_number(&value()?)?,
            "--concurrency" => {
                options.concurrency = value()?
                    .split(',')
                    .map(parse_number)
                    .collect::<Result<_, _>>()?
            }
            "--records" => options.records = parse_number(&value()?)?,
            "--sessions" => options.sessions = parse_number(&value()?)?,
            "--runs" => options.runs = parse_number(&value()?)?,
            "--dir" => options.dir = Some(PathBuf::from(value()?)),
            "--keep" => options.keep = true,
            "--json" => options.json = true,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if options.sessions == 0 || options.records < options.sessions || options.runs == 0 {
        return Err("--records must be at least --sessions, and both and --runs above 0".into());
    }
    Ok(options)
}

fn main() {
    if let Err(error) = run() {
        eprintln!("audit-bench: {error}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let options = parse_options()?;
    let parent = options.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let work = tempfile::Builder::new()
        .prefix("audit-bench.")
        .tempdir_in(&parent)
        .map_err(|e| format!("{}: {e}", parent.display()))?;
    let on_tmpfs = is_tmpfs(work.path());
    if on_tmpfs && !options.json {
        eprintln!(
            "audit-bench: warning: {} is on tmpfs, where fsync costs nothing; use --dir on a disk",
            parent.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;

    let mut appends = Vec::new();
    for &concurrency in &options.concurrency {
        for durable_before in [DurableBefore::Forward, DurableBefore::Interval] {
            let dir = work.path().join(format!("append-{concurrency}"));
            let result = runtime.block_on(bench_appends(
                &dir,
                concurrency,
                durable_before,
                options.seconds,
            ))?;
            if !options.json {
                eprintln!(
                    "appends at concurrency {concurrency}, {}: {:.0} records/s",
                    durable_before_name(durable_before),
                    result.per_second
                );
            }
            appends.push(result);
            std::fs::remove_dir_all(&dir).map_err(|e| e.to_string())?;
        }
    }

    let binary = mcp_guard_tests::daemon_binary();
    let log_dir = work.path().join("trace");
    let started = Instant::now();
    let target = runtime.block_on(generate_log(&log_dir, options.records, options.sessions))?;
    let generate_seconds = started.elapsed().as_secs_f64();
    let (files, bytes) = log_size(&log_dir)?;
    if !options.json {
        eprintln!(
            "generated {} records in {files} files ({:.0} MB) in {generate_seconds:.1} s",
            options.records,
            bytes as f64 / 1e6
        );
    }
    let trace = time_trace(&binary, &log_dir, &target, options.runs)?;
    let verify_seconds = time_verify(&binary, &log_dir)?;

    let report = Report {
        dir: parent,
        on_tmpfs,
        appends,
        records: options.records,
        sessions: options.sessions,
        files,
        bytes,
        trace,
        verify_seconds,
    };
    if options.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_json()).expect("JSON")
        );
    } else {
        report.print_table();
    }
    if options.keep {
        let kept = work.keep();
        eprintln!(
            "audit-bench: kept the log in {}",
            kept.join("trace").display()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Appends
// ---------------------------------------------------------------------------------------------

struct AppendResult {
    concurrency: usize,
    durable_before: DurableBefore,
    records: u64,
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

async fn bench_appends(
    dir: &Path,
    concurrency: usize,
    durable_before: DurableBefore,
    seconds: f64,
) -> Result<AppendResult, String> {
    let settings = AuditSettings {
        path: dir.join("audit.jsonl"),
        fsync: true,
        durable_before,
        ..AuditSettings::default()
    };
    let log = AuditLog::open(&settings).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let log = log.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut generator = Generator::new(task as u64 + 1);
            let mut n = 0u64;
            while Instant::now() < deadline {
                let record = generator.decision(task, task, n);
                n += 1;
                let sent = Instant::now();
                log.append(record).await.map_err(|e| e.to_string())?;
                latencies.push(sent.elapsed());
            }
            Ok::<_, String>(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(result) = tasks.join_next().await {
        latencies.extend(result.map_err(|e| e.to_string())??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let records = latencies.len() as u64;
    Ok(AppendResult {
        concurrency,
        durable_before,
        records,
        per_second: records as f64 / elapsed,
        p50: percentile(&latencies, 50),
        p99: percentile(&latencies, 99),
    })
}

/// The policy's spelling of `durable_before`.
fn durable_before_name(durable_before: DurableBefore) -> String {
    serde_json::to_value(durable_before)
        .ok()
        .and_then(|name| name.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) * pct).div_ceil(100)]
}

// ---------------------------------------------------------------------------------------------
// The million-record log
// ---------------------------------------------------------------------------------------------

/// Sessions writing at the same time, so their records interleave as on a busy host.
const ACTIVE_SESSIONS: usize = 200;
const SERVERS: [&str; 5] = ["crm", "billing", "tickets", "docs", "warehouse"];
const TOOLS: [&str; 8] = [
    "update_contact",
    "create_invoice",
    "search_tickets",
    "read_document",
    "list_orders",
    "send_email",
    "export_report",
    "close_ticket",
];

/// A small deterministic generator (xorshift), so every run writes the same log.
struct Generator(u64);

impl Generator {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn hex(&mut self, digits: usize) -> String {
        let mut text = String::with_capacity(digits);
        while text.len() < digits {
            text.push_str(&format!("{:016x}", self.next()));
        }
        text.truncate(digits);
        text
    }

    /// A call's decision record, as the pipeline writes it before forwarding.
    fn decision(&mut self, session: usize, instruction: usize, call: u64) -> AuditRecord {
        let denied = self.next().is_multiple_of(20);
        AuditRecord {
            principal: Some(format!("user{}@example.com", session % 500)),
            session: Some(session_id(session)),
            instruction: Some(instruction_id(instruction)),
            trace_id: Some(self.hex(32)),
            call_id: Some(format!("{}-{call}", session_id(session))),
            server: Some(SERVERS[session % SERVERS.len()].into()),
            method: Some("tools/call".into()),
            tool: Some(TOOLS[(self.next() % TOOLS.len() as u64) as usize].into()),
            decision: Some(if denied {
                AuditDecision::Deny
            } else {
                AuditDecision::Allow
            }),
            rule: Some(
                if denied {
                    "no-bulk-export"
                } else {
                    "agent-writes"
                }
                .into(),
            ),
            reason: denied.then(|| "arguments match the rule's deny schema".into()),
            latency: Some(Latency {
                policy_us: Some(20 + self.next() % 60),
                ..Latency::default()
            }),
            arguments_digest: Some(format!("sha256:{}", self.hex(64))),
            ..AuditRecord::new(RecordKind::Call)
        }
    }

    fn outcome(&mut self, decision: &AuditRecord) -> AuditRecord {
        let upstream = 800 + self.next() % 20_000;
        let failed = self.next().is_multiple_of(25);
        AuditRecord {
            principal: decision.principal.clone(),
            session: decision.session.clone(),
            instruction: decision.instruction.clone(),
            trace_id: decision.trace_id.clone(),
            call_id: decision.call_id.clone(),
            server: decision.server.clone(),
            method: decision.method.clone(),
            tool: decision.tool.clone(),
            outcome: Some(Outcome {
                kind: if failed {
                    OutcomeKind::ToolError
                } else {
                    OutcomeKind::Result
                },
                code: None,
                message: failed.then(|| "upstream said: record is locked".into()),
            }),
            latency: Some(Latency {
                policy_us: decision.latency.and_then(|l| l.policy_us),
                upstream_us: Some(upstream),
                total_us: Some(upstream + 150),
            }),
            ..AuditRecord::new(RecordKind::Call)
        }
    }

    fn egress(&mut self, session: usize, instruction: usize, calls: Vec<String>) -> AuditRecord {
        let refused = self.next().is_multiple_of(15);
        let (port, protocol) = match self.next() % 4 {
            0 => (53, Protocol::Udp),
            1 => (5432, Protocol::Tcp),
            _ => (443, Protocol::Tcp),
        };
        let attribution = match calls.len() {
            0 => Attribution::Idle,
            1 => Attribution::Exact,
            _ => Attribution::Ambiguous,
        };
        AuditRecord {
            principal: Some(format!("user{}@example.com", session % 500)),
            session: Some(session_id(session)),
            instruction: Some(instruction_id(instruction)),
            server: Some(SERVERS[session % SERVERS.len()].into()),
            rule: (!refused).then(|| "crm-api".into()),
            addr: Some(
                std::net::Ipv4Addr::from(0x0a00_0000 | (self.next() as u32 & 0xffff)).into(),
            ),
            port: Some(if refused { 25 } else { port }),
            protocol: Some(protocol),
            verdict: Some(if refused {
                Verdict::Refuse
            } else {
                Verdict::Allow
            }),
            hook: Some("connect4".into()),
            pid: Some(10_000 + session as u32),
            comm: Some("node".into()),
            cgroup_id: Some(100_000 + session as u64),
            attribution: Some(attribution),
            call_ids: (!calls.is_empty()).then_some(calls),
            ..AuditRecord::new(RecordKind::Egress)
        }
    }
}

/// Ids that look like real ones (a random-looking tail) and never collide (the index).
fn session_id(session: usize) -> String {
    let tail = (session as u64).wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32;
    format!("sess-{session:05}-{tail:08x}")
}

fn instruction_id(instruction: usize) -> String {
    let tail = (instruction as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    format!("instr-{instruction:05}-{tail:08x}")
}

/// Everything session `session` records, in order; its calls alternate between instruction
/// `session` and instruction `session + 1`, so each instruction is worked on by two sessions.
fn session_records(session: usize, sessions: usize, per_session: usize) -> Vec<AuditRecord> {
    let mut generator = Generator::new(session as u64 + 7);
    let mut records = Vec::with_capacity(per_session);
    let start = AuditRecord {
        principal: Some(format!("user{}@example.com", session % 500)),
        session: Some(session_id(session)),
        server: Some(SERVERS[session % SERVERS.len()].into()),
        ..AuditRecord::event(RecordKind::Session, "start")
    };
    records.push(start);
    // Three records per call, plus start, end and two idle connections: 32 calls for the
    // default 100 records per session.
    let calls = (per_session.saturating_sub(4) / 3).max(1);
    let mut previous_call = None;
    for call in 0..calls {
        let instruction = (session + call % 2) % sessions;
        let decision = generator.decision(session, instruction, call as u64);
        let call_id = decision.call_id.clone().expect("set");
        // Every eighth connection happens while the previous call is still in flight.
        let candidates = match (&previous_call, call % 8) {
            (Some(previous), 0) => vec![previous, &call_id].into_iter().cloned().collect(),
            _ => vec![call_id.clone()],
        };
        let egress = generator.egress(session, instruction, candidates);
        let outcome = generator.outcome(&decision);
        records.extend([decision, egress, outcome]);
        previous_call = Some(call_id);
        if call == calls / 2 || call + 1 == calls {
            records.push(generator.egress(session, instruction, Vec::new()));
        }
    }
    while records.len() + 1 < per_session {
        records.push(generator.egress(session, session, Vec::new()));
    }
    records.push(AuditRecord {
        session: Some(session_id(session)),
        ..AuditRecord::event(RecordKind::Session, "end")
    });
    records
}

/// Writes the log; returns the instruction to trace (one in the middle of the log).
async fn generate_log(dir: &Path, records: usize, sessions: usize) -> Result<String, String> {
    let settings = AuditSettings {
        path: dir.join("audit.jsonl"),
        fsync: false,
        ..AuditSettings::default()
    };
    let log = Arc::new(AuditLog::open(&settings).map_err(|e| e.to_string())?);
    let per_session = records / sessions;
    let mut remainder = records % sessions;
    let mut tasks = tokio::task::JoinSet::new();
    for session in 0..sessions {
        if tasks.len() >= ACTIVE_SESSIONS {
            tasks
                .join_next()
                .await
                .expect("a task")
                .map_err(|e| e.to_string())??;
        }
        let extra = usize::from(remainder > 0);
        remainder = remainder.saturating_sub(1);
        let log = Arc::clone(&log);
        tasks.spawn(async move {
            for record in session_records(session, sessions, per_session + extra) {
                log.append(record).await.map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.map_err(|e| e.to_string())??;
    }
    Ok(instruction_id(sessions / 2))
}

fn log_size(dir: &Path) -> Result<(usize, u64), String> {
    let mut files = 0;
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.file_name().to_string_lossy().ends_with(".lock") {
            continue;
        }
        let metadata = entry.metadata().map_err(|e| e.to_string())?;
        files += 1;
        bytes += metadata.len();
    }
    Ok((files, bytes))
}

// ---------------------------------------------------------------------------------------------
// Timing the real commands
// ---------------------------------------------------------------------------------------------

struct TraceResult {
    instruction: String,
    runs: Vec<Duration>,
    matched_records: u64,
    calls: usize,
    connections: usize,
}

fn time_trace(
    binary: &Path,
    dir: &Path,
    instruction: &str,
    runs: usize,
) -> Result<TraceResult, String> {
    let command = |json: bool| {
        let mut command = Command::new(binary);
        command
            .args(["audit", "trace", "--instruction", instruction])
            .arg(dir);
        if json {
            command.arg("--json");
        }
        command
    };
    // Warm-up, and what the trace finds.
    let output = command(true).output().map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!(
            "audit trace failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let report: Value = serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())?;
    let calls: Vec<&Value> = report["instructions"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|node| node["sessions"].as_array().into_iter().flatten())
        .flat_map(|session| session["calls"].as_array().into_iter().flatten())
        .collect();
    let connections = calls
        .iter()
        .map(|call| call["egress"].as_array().map_or(0, Vec::len))
        .sum();
    let mut times = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let output = command(false).output().map_err(|e| e.to_string())?;
        times.push(started.elapsed());
        if !output.status.success() {
            return Err("audit trace failed".into());
        }
    }
    Ok(TraceResult {
        instruction: instruction.to_owned(),
        runs: times,
        matched_records: report["records"].as_u64().unwrap_or(0),
        calls: calls.len(),
        connections,
    })
}

fn time_verify(binary: &Path, dir: &Path) -> Result<f64, String> {
    let started = Instant::now();
    let output = Command::new(binary)
        .args(["audit", "verify"])
        .arg(dir)
        .output()
        .map_err(|e| e.to_string())?;
    let elapsed = started.elapsed().as_secs_f64();
    if !output.status.success() {
        return Err(format!(
            "audit verify failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(elapsed)
}

fn is_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type == libc::TMPFS_MAGIC
    }
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

struct Report {
    dir: PathBuf,
    on_tmpfs: bool,
    appends: Vec<AppendResult>,
    records: usize,
    sessions: usize,
    files: usize,
    bytes: u64,
    trace: TraceResult,
    verify_seconds: f64,
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn median(durations: &[Duration]) -> Duration {
    let mut sorted = durations.to_vec();
    sorted.sort_unstable();
    sorted[sorted.len() / 2]
}

impl Report {
    fn print_table(&self) {
        println!(
            "audit appends, fsync on, group commit ({}{})",
            self.dir.display(),
            if self.on_tmpfs { ", tmpfs!" } else { "" }
        );
        println!(
            "{:>12} {:>15} {:>12} {:>12} {:>12}",
            "concurrency", "durable_before", "records/s", "p50 ms", "p99 ms"
        );
        for result in &self.appends {
            println!(
                "{:>12} {:>15} {:>12.0} {:>12.3} {:>12.3}",
                result.concurrency,
                durable_before_name(result.durable_before),
                result.per_second,
                millis(result.p50),
                millis(result.p99)
            );
        }
        println!();
        let runs: Vec<String> = self
            .trace
            .runs
            .iter()
            .map(|run| format!("{:.0}", millis(*run)))
            .collect();
        println!(
            "audit trace --instruction {} over {} records ({} sessions, {} files, {:.0} MB)",
            self.trace.instruction,
            self.records,
            self.sessions,
            self.files,
            self.bytes as f64 / 1e6
        );
        println!(
            "  median {:.0} ms of {} runs [{} ms]; found {} records: {} calls, {} connections",
            millis(median(&self.trace.runs)),
            self.trace.runs.len(),
            runs.join(", "),
            self.trace.matched_records,
            self.trace.calls,
            self.trace.connections
        );
        println!(
            "audit verify over the same files: {:.2} s",
            self.verify_seconds
        );
    }

    fn to_json(&self) -> Value {
        json!({
            "dir": self.dir,
            "on_tmpfs": self.on_tmpfs,
            "appends": self.appends.iter().map(|result| json!({
                "concurrency": result.concurrency,
                "durable_before": result.durable_before,
                "records": result.records,
                "records_per_second": result.per_second.round(),
                "p50_ms": millis(result.p50),
                "p99_ms": millis(result.p99),
            })).collect::<Vec<_>>(),
            "trace": {
                "records_in_log": self.records,
                "sessions": self.sessions,
                "files": self.files,
                "bytes": self.bytes,
                "instruction": self.trace.instruction,
                "median_ms": millis(median(&self.trace.runs)),
                "runs_ms": self.trace.runs.iter().map(|run| millis(*run)).collect::<Vec<_>>(),
                "matched_records": self.trace.matched_records,
                "calls": self.trace.calls,
                "connections": self.trace.connections,
            },
            "verify_seconds": self.verify_seconds,
        })
    }
}
