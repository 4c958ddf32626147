//! `audit trace`: everything an instruction, a session or a trace caused, as a tree
//! instruction → sessions → calls → network connections.
//!
//! It has to answer within a second over a million records, so it never parses a line it
//! does not need. The files are read in large chunks and searched for the exact bytes the
//! writer puts down for the wanted field (`"instruction":"X"`); only lines holding them are
//! parsed, and then the field itself is compared (the bytes may also occur in stored
//! arguments).
//!
//! That first pass finds the calls, and the egress records stamped with the instruction (the
//! pipeline stamps each egress record with its session's current instruction). It misses an
//! egress record stamped with another instruction of the same session while it was in flight
//! with one of our calls (an `ambiguous` record names both calls), and the session's own
//! start and end records, which carry no instruction. So a second pass reads the lines of the
//! sessions the first one found, keeping their session records and the egress records whose
//! `call_ids` name a call already found. It searches for each session's bytes as the first
//! pass does when there are a few sessions (the usual case); with many, it looks at the
//! `"session":"` value of every line and compares it with the set without parsing. A
//! `--session` query needs only the first pass.
//!
//! An egress record appears under every call its `call_ids` names that the query found; one
//! that names none of them (idle, or attributed only to other instructions' calls while
//! stamped with ours) appears under its session.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use memchr::memmem;
use serde::Serialize;
use serde_json::{Map, Value};

use super::record::Attribution;
use super::record::{
    AuditDecision, AuditRecord, Latency, Mode, Outcome, Protocol, RecordKind, StoredRecord, Verdict,
};

/// Files are read this much at a time.
const CHUNK_BYTES: usize = 8 << 20;
/// Up to this many sessions, the second pass searches for each session's bytes; beyond, it
/// looks at the session of every line.
const MAX_SESSION_NEEDLES: usize = 16;

/// What to trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceQuery {
    Instruction(String),
    Session(String),
    #[serde(rename = "trace_id")]
    Trace(String),
}

impl TraceQuery {
    /// The record field the query compares.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Instruction(_) => "instruction",
            Self::Session(_) => "session",
            Self::Trace(_) => "trace_id",
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Self::Instruction(id) | Self::Session(id) | Self::Trace(id) => id,
        }
    }

    fn matches(&self, record: &AuditRecord) -> bool {
        let value = match self {
            Self::Instruction(_) => &record.instruction,
            Self::Session(_) => &record.session,
            Self::Trace(_) => &record.trace_id,
        };
        value.as_deref() == Some(self.id())
    }
}

/// The answer to a [`TraceQuery`].
#[derive(Debug, Clone, Serialize)]
pub struct TraceReport {
    pub query: TraceQuery,
    /// How many records the tree holds.
    pub records: usize,
    pub instructions: Vec<InstructionNode>,
    /// Lines that held the wanted bytes but were not records (a truncated tail, say).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstructionNode {
    /// None for calls that came with no instruction.
    pub instruction: Option<String>,
    pub sessions: Vec<SessionNode>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionNode {
    pub session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The session's own records (start, end).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<SessionEvent>,
    pub calls: Vec<CallNode>,
    /// Connections tied to none of the calls listed here.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressNode>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionEvent {
    pub seq: u64,
    pub ts: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Map<String, Value>>,
}

/// A call, from all the records that name its `call_id` (its decision, its outcome).
#[derive(Debug, Clone, Serialize)]
pub struct CallNode {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    /// seq and time of the first record of the call.
    pub seq: u64,
    pub ts: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// Where the agent's request came from (HTTP front).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<String>,
    /// The stdio front that relayed the call's records: its pid and uid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub front_pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub front_uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<AuditDecision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `shadow` or `learn` when the server ran in that mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments_digest: Option<String>,
    pub egress: Vec<EgressNode>,
    #[serde(skip)]
    instruction: Option<String>,
    #[serde(skip)]
    session: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EgressNode {
    pub seq: u64,
    pub ts: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<std::net::IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<Attribution>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_ids: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
}

/// Runs `query` over `files` (in any order: the tree is ordered by `seq`).
pub fn trace(files: &[PathBuf], query: &TraceQuery) -> io::Result<TraceReport> {
    let mut unreadable = Vec::new();
    let mut found: Vec<StoredRecord> = Vec::new();
    let needle = field_needle(query.field(), query.id());
    scan(
        files,
        &needle,
        |path, line, _| match serde_json::from_slice::<StoredRecord>(line) {
            Ok(stored) if query.matches(&stored.record) => found.push(stored),
            Ok(_) => {}
            Err(error) => unreadable.push(format!("{}: skipped a line: {error}", path.display())),
        },
    )?;

    if !matches!(query, TraceQuery::Session(_)) {
        let sessions: HashSet<String> = found
            .iter()
            .filter_map(|stored| stored.record.session.clone())
            .collect();
        let calls: HashSet<String> = found
            .iter()
            .filter(|stored| stored.record.kind == RecordKind::Call)
            .filter_map(|stored| stored.record.call_id.clone())
            .collect();
        let seen: HashSet<u64> = found.iter().map(|stored| stored.seq).collect();
        if !sessions.is_empty() {
            let related = session_records(files, &sessions, &calls, &seen, &mut unreadable)?;
            found.extend(related);
        }
    }
    found.sort_by_key(|stored| stored.seq);
    found.dedup_by_key(|stored| stored.seq);
    let records = found.len();
    Ok(TraceReport {
        query: query.clone(),
        records,
        instructions: build_tree(found),
        unreadable,
    })
}

/// The bytes the writer puts down for `"field": id` (serde_json, compact).
fn field_needle(field: &str, id: &str) -> Vec<u8> {
    let mut needle = format!("\"{field}\":").into_bytes();
    serde_json::to_writer(&mut needle, id).expect("a string serialises");
    needle
}

/// The second pass: session records of `sessions`, and their egress records naming one of
/// `calls`, except the records already `seen`.
fn session_records(
    files: &[PathBuf],
    sessions: &HashSet<String>,
    calls: &HashSet<String>,
    seen: &HashSet<u64>,
    unreadable: &mut Vec<String>,
) -> io::Result<Vec<StoredRecord>> {
    let mut related = Vec::new();
    let mut consider = |path: &Path, line: &[u8]| {
        let stored = match serde_json::from_slice::<StoredRecord>(line) {
            Ok(stored) => stored,
            Err(error) => {
                unreadable.push(format!("{}: skipped a line: {error}", path.display()));
                return;
            }
        };
        let in_sessions = stored
            .record
            .session
            .as_ref()
            .is_some_and(|session| sessions.contains(session));
        let wanted = match stored.record.kind {
            RecordKind::Session => true,
            RecordKind::Egress => stored
                .record
                .call_ids
                .iter()
                .flatten()
                .any(|call| calls.contains(call)),
            RecordKind::Call | RecordKind::Policy => false,
        };
        if in_sessions && wanted && !seen.contains(&stored.seq) {
            related.push(stored);
        }
    };
    if sessions.len() <= MAX_SESSION_NEEDLES {
        // One search per session; a line found twice (a session's bytes also in another's
        // arguments) is dropped by the caller's dedup.
        let needles: Vec<Vec<u8>> = sessions
            .iter()
            .map(|session| field_needle("session", session))
            .collect();
        scan_in_chunks(files, &needles, CHUNK_BYTES, |path, line, _| {
            consider(path, line)
        })?;
        return Ok(related);
    }
    const SESSION_FIELD: &[u8] = b"\"session\":\"";
    scan(files, SESSION_FIELD, |path, line, hit| {
        // The first `"session":"` of a line is the record's own field when it has one: it
        // precedes `arguments` and `detail`, the only places the bytes could occur otherwise.
        let value = &line[hit + SESSION_FIELD.len()..];
        let Some(end) = memchr::memchr(b'"', value) else {
            return;
        };
        let value = &value[..end];
        // A value without escapes is its own text; one with escapes is left to the parser.
        let candidate = value.contains(&b'\\')
            || std::str::from_utf8(value).is_ok_and(|session| sessions.contains(session));
        if candidate {
            consider(path, line);
        }
    })?;
    Ok(related)
}

/// Calls `on_line(file, line, offset)` for each line of `files` that contains `needle`, with
/// the offset of its first occurrence in the line. Lines are found around the occurrences,
/// so lines without one cost nothing but the search.
fn scan(
    files: &[PathBuf],
    needle: &[u8],
    on_line: impl FnMut(&Path, &[u8], usize),
) -> io::Result<()> {
    scan_in_chunks(files, &[needle], CHUNK_BYTES, on_line)
}

/// [`scan`] for several needles at once: each is searched for in turn in every chunk, so a
/// line holding two of them is reported twice.
fn scan_in_chunks<N: AsRef<[u8]>>(
    files: &[PathBuf],
    needles: &[N],
    chunk_bytes: usize,
    mut on_line: impl FnMut(&Path, &[u8], usize),
) -> io::Result<()> {
    let finders: Vec<memmem::Finder> = needles
        .iter()
        .map(|needle| memmem::Finder::new(needle.as_ref()))
        .collect();
    let mut buffer = vec![0u8; chunk_bytes];
    for path in files {
        let mut file = File::open(path).map_err(|error| {
            io::Error::new(error.kind(), format!("{}: {error}", path.display()))
        })?;
        let mut filled = 0;
        loop {
            if filled == buffer.len() {
                // A line longer than the buffer.
                buffer.resize(buffer.len() * 2, 0);
            }
            let read = file.read(&mut buffer[filled..])?;
            let at_end = read == 0;
            filled += read;
            // Only whole lines are searched; the rest waits for the next read.
            let whole = if at_end {
                filled
            } else {
                match memchr::memrchr(b'\n', &buffer[..filled]) {
                    Some(newline) => newline + 1,
                    None => continue,
                }
            };
            let region = &buffer[..whole];
            for finder in &finders {
                let mut from = 0;
                while from < whole {
                    let Some(found) = finder.find(&region[from..]) else {
                        break;
                    };
                    let hit = from + found;
                    let start =
                        memchr::memrchr(b'\n', &region[from..hit]).map_or(from, |i| from + i + 1);
                    let end = memchr::memchr(b'\n', &region[hit..]).map_or(whole, |i| hit + i);
                    on_line(path, &region[start..end], hit - start);
                    from = end + 1;
                }
            }
            buffer.copy_within(whole..filled, 0);
            filled -= whole;
            if at_end {
                break;
            }
        }
    }
    Ok(())
}

/// Groups `records` (sorted by seq) into the tree.
fn build_tree(records: Vec<StoredRecord>) -> Vec<InstructionNode> {
    let mut calls: Vec<CallNode> = Vec::new();
    let mut call_index: HashMap<String, usize> = HashMap::new();
    let mut loose_egress: Vec<(Option<String>, Option<String>, EgressNode)> = Vec::new();
    let mut events: HashMap<Option<String>, Vec<SessionEvent>> = HashMap::new();
    let mut session_facts: HashMap<Option<String>, (Option<String>, Option<String>)> =
        HashMap::new();
    let mut session_order: Vec<Option<String>> = Vec::new();
    let mut sessions_seen: HashSet<Option<String>> = HashSet::new();

    for stored in records {
        let record = stored.record;
        let session = record.session.clone();
        if sessions_seen.insert(session.clone()) {
            session_order.push(session.clone());
        }
        let facts = session_facts.entry(session.clone()).or_default();
        fill(&mut facts.0, &record.principal);
        fill(&mut facts.1, &record.server);
        match record.kind {
            RecordKind::Call => {
                let index = match record.call_id.as_ref().and_then(|id| call_index.get(id)) {
                    Some(&index) => index,
                    None => {
                        if let Some(id) = &record.call_id {
                            call_index.insert(id.clone(), calls.len());
                        }
                        calls.push(CallNode::new(stored.seq, stored.ts));
                        calls.len() - 1
                    }
                };
                calls[index].absorb(record);
            }
            RecordKind::Egress => {
                let node = EgressNode::new(stored.seq, stored.ts, &record);
                let mut attached = false;
                for id in record.call_ids.iter().flatten() {
                    if let Some(&index) = call_index.get(id) {
                        calls[index].egress.push(node.clone());
                        attached = true;
                    }
                }
                if !attached {
                    loose_egress.push((record.instruction, session, node));
                }
            }
            RecordKind::Session | RecordKind::Policy => {
                events.entry(session).or_default().push(SessionEvent {
                    seq: stored.seq,
                    ts: stored.ts,
                    detail: record.detail,
                });
            }
        }
    }

    // Calls and loose connections in seq order, so that first appearances order the
    // instructions and, within each, the sessions.
    let mut items: Vec<(u64, Option<String>, Option<String>, Item)> = calls
        .into_iter()
        .map(|call| {
            let (instruction, session) = (call.instruction.clone(), call.session.clone());
            (call.seq, instruction, session, Item::Call(Box::new(call)))
        })
        .chain(
            loose_egress
                .into_iter()
                .map(|(instruction, session, egress)| {
                    (egress.seq, instruction, session, Item::Egress(egress))
                }),
        )
        .collect();
    items.sort_by_key(|(seq, ..)| *seq);
    let mut tree = Tree {
        instructions: Vec::new(),
        events,
        session_facts,
    };
    for (_, instruction, session, item) in items {
        let node = tree.session_node(instruction, session);
        match item {
            Item::Call(call) => node.calls.push(*call),
            Item::Egress(egress) => node.egress.push(egress),
        }
    }
    // A session known only from its own records (a --session query of an idle session).
    for session in session_order {
        let listed = tree
            .instructions
            .iter()
            .any(|node| node.sessions.iter().any(|s| s.session == session));
        if !listed && tree.events.contains_key(&session) {
            tree.session_node(None, session);
        }
    }
    tree.instructions
}

enum Item {
    Call(Box<CallNode>),
    Egress(EgressNode),
}

struct Tree {
    instructions: Vec<InstructionNode>,
    events: HashMap<Option<String>, Vec<SessionEvent>>,
    /// (principal, server) of each session, from the first records that name them.
    session_facts: HashMap<Option<String>, (Option<String>, Option<String>)>,
}

impl Tree {
    /// The node of `session` under `instruction`, created (at the end) when new.
    fn session_node(
        &mut self,
        instruction: Option<String>,
        session: Option<String>,
    ) -> &mut SessionNode {
        let position = match self
            .instructions
            .iter()
            .position(|node| node.instruction == instruction)
        {
            Some(position) => position,
            None => {
                self.instructions.push(InstructionNode {
                    instruction,
                    sessions: Vec::new(),
                });
                self.instructions.len() - 1
            }
        };
        let sessions = &mut self.instructions[position].sessions;
        let index = match sessions.iter().position(|node| node.session == session) {
            Some(index) => index,
            None => {
                let (principal, server) = self
                    .session_facts
                    .get(&session)
                    .cloned()
                    .unwrap_or_default();
                sessions.push(SessionNode {
                    events: self.events.get(&session).cloned().unwrap_or_default(),
                    session,
                    principal,
                    server,
                    calls: Vec::new(),
                    egress: Vec::new(),
                });
                sessions.len() - 1
            }
        };
        &mut sessions[index]
    }
}

fn fill<T: Clone>(slot: &mut Option<T>, value: &Option<T>) {
    if slot.is_none() {
        slot.clone_from(value);
    }
}

impl CallNode {
    fn new(seq: u64, ts: String) -> Self {
        Self {
            call_id: None,
            seq,
            ts,
            principal: None,
            client_addr: None,
            front_pid: None,
            front_uid: None,
            trace_id: None,
            server: None,
            method: None,
            tool: None,
            decision: None,
            rule: None,
            reason: None,
            mode: None,
            outcome: None,
            latency: None,
            arguments_digest: None,
            egress: Vec::new(),
            instruction: None,
            session: None,
        }
    }

    /// Takes what `record` adds: identifying fields from the first record that has them, the
    /// outcome and latency from the last.
    fn absorb(&mut self, record: AuditRecord) {
        fill(&mut self.call_id, &record.call_id);
        fill(&mut self.principal, &record.principal);
        fill(&mut self.client_addr, &record.client_addr);
        fill(&mut self.front_pid, &record.front_pid);
        fill(&mut self.front_uid, &record.front_uid);
        fill(&mut self.trace_id, &record.trace_id);
        fill(&mut self.server, &record.server);
        fill(&mut self.method, &record.method);
        fill(&mut self.tool, &record.tool);
        fill(&mut self.decision, &record.decision);
        fill(&mut self.rule, &record.rule);
        fill(&mut self.reason, &record.reason);
        fill(&mut self.mode, &record.mode);
        fill(&mut self.arguments_digest, &record.arguments_digest);
        fill(&mut self.instruction, &record.instruction);
        fill(&mut self.session, &record.session);
        if record.outcome.is_some() {
            self.outcome = record.outcome;
        }
        if let Some(latency) = record.latency {
            let merged = self.latency.get_or_insert_with(Latency::default);
            merged.policy_us = latency.policy_us.or(merged.policy_us);
            merged.upstream_us = latency.upstream_us.or(merged.upstream_us);
            merged.total_us = latency.total_us.or(merged.total_us);
        }
    }
}

impl EgressNode {
    fn new(seq: u64, ts: String, record: &AuditRecord) -> Self {
        Self {
            seq,
            ts,
            addr: record.addr,
            port: record.port,
            protocol: record.protocol,
            host: record.host.clone(),
            verdict: record.verdict,
            rule: record.rule.clone(),
            mode: record.mode,
            attribution: record.attribution,
            call_ids: record.call_ids.clone(),
            hook: record.hook.clone(),
            pid: record.pid,
            comm: record.comm.clone(),
        }
    }
}

impl TraceReport {
    /// The indented text tree `audit trace` prints (without [`Self::unreadable`]).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for instruction in &self.instructions {
            match &instruction.instruction {
                Some(id) => writeln!(out, "instruction {id}"),
                None => writeln!(out, "(no instruction)"),
            }
            .expect("writing to a String");
            for session in &instruction.sessions {
                write_session(&mut out, session);
            }
        }
        out
    }
}

fn write_session(out: &mut String, session: &SessionNode) {
    let mut line = format!(
        "  session {}",
        session.session.as_deref().unwrap_or("(none)")
    );
    if let Some(principal) = &session.principal {
        write!(line, "  principal {principal}").expect("writing to a String");
    }
    if let Some(server) = &session.server {
        write!(line, "  server {server}").expect("writing to a String");
    }
    let mut lines = vec![line];
    // Session events, calls and loose connections interleaved by seq.
    let mut entries: Vec<(u64, String)> = Vec::new();
    for event in &session.events {
        let what = event
            .detail
            .as_ref()
            .map(|detail| {
                detail
                    .get("event")
                    .and_then(Value::as_str)
                    .map_or_else(|| Value::Object(detail.clone()).to_string(), str::to_owned)
            })
            .unwrap_or_default();
        entries.push((event.seq, format!("    {}  session {what}", event.ts)));
    }
    for call in &session.calls {
        let mut text = format!("    {}  {}", call.ts, call_summary(call));
        for egress in &call.egress {
            write!(text, "\n      {}", egress_summary(egress)).expect("writing to a String");
        }
        entries.push((call.seq, text));
    }
    for egress in &session.egress {
        entries.push((egress.seq, format!("    {}", egress_summary(egress))));
    }
    entries.sort_by_key(|(seq, _)| *seq);
    lines.extend(entries.into_iter().map(|(_, text)| text));
    for line in lines {
        out.push_str(&line);
        out.push('\n');
    }
}

fn call_summary(call: &CallNode) -> String {
    let mut parts = vec![format!(
        "call {}",
        call.call_id.as_deref().unwrap_or("(no id)")
    )];
    if let Some(method) = &call.method {
        parts.push(method.clone());
    }
    if let Some(tool) = &call.tool {
        parts.push(tool.clone());
    }
    if let Some(client) = &call.client_addr {
        parts.push(format!("from {client}"));
    }
    if let (Some(pid), Some(uid)) = (call.front_pid, call.front_uid) {
        parts.push(format!("via stdio front pid {pid} uid {uid}"));
    }
    if let Some(decision) = call.decision {
        let mut text = decision.as_str().to_owned();
        if let Some(rule) = &call.rule {
            write!(text, " (rule {rule})").expect("writing to a String");
        }
        parts.push(text);
    }
    if let Some(mode) = call.mode {
        parts.push(format!("[{mode}]"));
    }
    if let Some(outcome) = &call.outcome {
        let mut text = format!("-> {}", outcome.kind.as_str());
        if let Some(code) = outcome.code {
            write!(text, " {code}").expect("writing to a String");
        }
        if let Some(message) = &outcome.message {
            write!(text, ": {message}").expect("writing to a String");
        }
        parts.push(text);
    }
    if let Some(latency) = &call.latency {
        let timings: Vec<String> = [
            ("policy", latency.policy_us),
            ("upstream", latency.upstream_us),
            ("total", latency.total_us),
        ]
        .into_iter()
        .filter_map(|(name, us)| us.map(|us| format!("{name} {}", duration(us))))
        .collect();
        if !timings.is_empty() {
            parts.push(format!("[{}]", timings.join(", ")));
        }
    }
    if let Some(reason) = &call.reason {
        parts.push(format!("reason: {reason}"));
    }
    parts.join("  ")
}

fn egress_summary(egress: &EgressNode) -> String {
    let destination = match (egress.addr, egress.port) {
        (Some(addr), Some(port)) => SocketAddr::new(addr, port).to_string(),
        (Some(addr), None) => addr.to_string(),
        _ => "?".into(),
    };
    let mut parts = vec![egress.ts.clone(), format!("connect {destination}")];
    if let Some(host) = &egress.host {
        parts.push(format!("({host})"));
    }
    if let Some(protocol) = egress.protocol {
        parts.push(
            match protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            }
            .into(),
        );
    }
    if let Some(verdict) = egress.verdict {
        let mut text = verdict.as_str().to_owned();
        if let Some(rule) = &egress.rule {
            write!(text, " (rule {rule})").expect("writing to a String");
        }
        parts.push(text);
    }
    if let Some(mode) = egress.mode {
        parts.push(format!("[{mode}]"));
    }
    if let Some(attribution) = egress.attribution {
        let mut text = attribution.as_str().to_owned();
        if attribution == Attribution::Ambiguous
            && let Some(calls) = &egress.call_ids
        {
            write!(text, " ({})", calls.join(", ")).expect("writing to a String");
        }
        parts.push(text);
    }
    if let Some(comm) = &egress.comm {
        parts.push(match egress.pid {
            Some(pid) => format!("{comm}[{pid}]"),
            None => comm.clone(),
        });
    }
    parts.join("  ")
}

fn duration(us: u64) -> String {
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..1_000_000 => format!("{:.1}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_needle_is_the_field_as_the_writer_writes_it() {
        assert_eq!(
            field_needle("instruction", "i-1"),
            br#""instruction":"i-1""#
        );
        assert_eq!(field_needle("session", "a\"b"), br#""session":"a\"b""#);
    }

    #[test]
    fn scan_finds_each_matching_line_once_across_chunk_edges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut text = String::new();
        for i in 0..1000 {
            let tag = if i % 7 == 0 { "xx" } else { "yy" };
            // Several occurrences per line must still give one call.
            text.push_str(&format!("{i} {tag} {tag} {}\n", "z".repeat(i % 50)));
        }
        text.push_str("last xx"); // no newline: still a line
        std::fs::write(&path, &text).unwrap();
        let expected: Vec<String> = text
            .lines()
            .filter(|line| line.contains("xx"))
            .map(str::to_owned)
            .collect();
        // Chunks shorter than a line, about a line, and holding everything.
        for chunk in [16, 64, 1 << 20] {
            let mut lines = Vec::new();
            scan_in_chunks(
                std::slice::from_ref(&path),
                &[b"xx"],
                chunk,
                |_, line, hit| {
                    assert_eq!(&line[hit..hit + 2], b"xx");
                    lines.push(String::from_utf8(line.to_vec()).unwrap());
                },
            )
            .unwrap();
            assert_eq!(lines, expected, "chunk {chunk}");
        }
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(84), "84µs");
        assert_eq!(duration(3_250), "3.2ms");
        assert_eq!(duration(1_500_000), "1.50s");
    }
}
