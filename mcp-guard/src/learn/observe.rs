//! What audit logs show was used: per server, per caller, the methods, tools, resources and
//! prompts that were forwarded (with their argument shapes), the tool catalogue the server
//! offered, and the network destinations its processes reached.
//!
//! Lines are read as a private, lenient view of a record rather than as
//! [`crate::audit::StoredRecord`]: the learn-mode fields (`roles`, `mode`, `argument_shapes`,
//! `tools_seen`, `host`, the `would_refuse` verdict) are read whether or not the record type of
//! this build knows them, and logs written by older builds still count.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::LearnError;
use super::constraints::ArgumentStats;
use crate::audit::record::{Reference, ToolSeen};
use crate::policy::{Protocol, is_plumbing};

/// Who a learned rule is for. Rules go to roles where the records name exactly one role, so
/// that the suggestion keeps the policy's role structure; a caller holding several roles (which
/// rules cannot combine) or none is named as a principal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    Role(String),
    Principal(String),
    /// A caller nobody identified (empty principal): only a rule naming no one matches it.
    Anyone,
}

impl Subject {
    fn of(principal: &str, roles: &[String]) -> Subject {
        match (principal, roles) {
            (_, [role]) => Subject::Role(role.clone()),
            ("", _) => Subject::Anyone,
            (principal, _) => Subject::Principal(principal.to_owned()),
        }
    }

    /// Words for descriptions and the report: `role developer`.
    pub fn label(&self) -> String {
        match self {
            Self::Role(role) => format!("role {role}"),
            Self::Principal(principal) => format!("principal {principal}"),
            Self::Anyone => "unidentified callers".to_owned(),
        }
    }

    /// The name that goes into rule ids.
    pub fn id_part(&self) -> &str {
        match self {
            Self::Role(name) | Self::Principal(name) => name,
            Self::Anyone => "anyone",
        }
    }
}

/// How often something was used, and when first and last (record timestamps, RFC 3339 UTC,
/// which sort as text).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub count: u64,
    pub first: String,
    pub last: String,
}

impl Usage {
    fn add(&mut self, ts: &str) {
        self.count += 1;
        if self.first.is_empty() || ts < self.first.as_str() {
            self.first = ts.to_owned();
        }
        if ts > self.last.as_str() {
            self.last = ts.to_owned();
        }
    }

    fn merge(&mut self, other: &Usage) {
        self.count += other.count;
        if self.first.is_empty() || (!other.first.is_empty() && other.first < self.first) {
            self.first.clone_from(&other.first);
        }
        if other.last > self.last {
            self.last.clone_from(&other.last);
        }
    }

    /// "4 calls, first seen 2026-11-26, last seen 2026-11-27" (dates only: the day is what a
    /// reviewer weighs; the exact times are in the log).
    pub fn describe(&self, unit: &str) -> String {
        let plural = if self.count == 1 { "" } else { "s" };
        format!(
            "{} {unit}{plural}, first seen {}, last seen {}",
            self.count,
            date(&self.first),
            date(&self.last)
        )
    }
}

/// The usage of several things together.
pub fn total_usage<'a>(usages: impl IntoIterator<Item = &'a Usage>) -> Usage {
    let mut total = Usage::default();
    for usage in usages {
        total.merge(usage);
    }
    total
}

fn date(ts: &str) -> &str {
    ts.get(..10).unwrap_or(ts)
}

/// A tool or prompt that was called, and what its arguments looked like.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NamedUsage {
    pub usage: Usage,
    pub arguments: ArgumentStats,
}

/// What one caller did on one server.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallerUsage {
    /// The principals seen acting as this caller.
    pub principals: BTreeSet<String>,
    /// The roles those principals held.
    pub roles: BTreeSet<String>,
    /// Methods that name no tool, resource or prompt (`tools/list`, `completion/complete`,
    /// server→client requests, ...). Protocol plumbing is left out: it needs no rule.
    pub methods: BTreeMap<String, Usage>,
    pub tools: BTreeMap<String, NamedUsage>,
    pub prompts: BTreeMap<String, NamedUsage>,
    /// Resource URI → the methods used on it (`resources/read`, `resources/subscribe`, ...).
    pub resources: BTreeMap<String, BTreeMap<String, Usage>>,
    /// The prompts and resource templates whose arguments `completion/complete` completed
    /// (counted in `methods` too).
    pub completed: BTreeMap<Reference, Usage>,
}

/// What learn makes of the hints a server gave about a tool in `tools/list`.
impl ToolSeen {
    /// Whether the server said anything about the tool's effects.
    pub fn hints_given(&self) -> bool {
        self.read_only.is_some() || self.destructive.is_some()
    }

    /// Whether the tool may change something, by the hints: MCP's `readOnlyHint` defaults to
    /// false, so only a tool declared read-only (and not destructive) is not write-capable.
    pub fn writes(&self) -> bool {
        self.destructive == Some(true) || self.read_only != Some(true)
    }
}

/// A network destination as the kernel's records show it: the declared host name its address
/// was resolved from, when known, else the address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Destination {
    Host(String),
    Addr(IpAddr),
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Host(host) => f.write_str(host),
            Self::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

/// Everything seen of one server.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerUsage {
    pub callers: BTreeMap<Subject, CallerUsage>,
    /// The tools the server offered (learn and shadow modes record them before filtering).
    pub tools_seen: BTreeMap<String, ToolSeen>,
    /// Destinations reached (allowed, or let through in learn or shadow mode), by protocol
    /// and port.
    pub egress: BTreeMap<Destination, BTreeMap<(Protocol, u16), Usage>>,
    /// Connections the kernel refused: not used, so not learned.
    pub egress_refused: u64,
    /// The modes the server's records were written in (`enforce` for records without one).
    pub modes: BTreeSet<String>,
}

/// What a set of audit logs shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observations {
    pub files: Vec<PathBuf>,
    pub records: u64,
    pub first: Option<String>,
    pub last: Option<String>,
    pub servers: BTreeMap<String, ServerUsage>,
    /// Lines that were not records (a torn last line, say), as `FILE:LINE: why`.
    pub skipped: Vec<String>,
    /// Roles of principals, for records written before call records carried `roles`.
    known_roles: BTreeMap<String, Vec<String>>,
}

/// The fields of a record this module reads; everything else is ignored.
#[derive(Debug, Deserialize)]
struct Line {
    ts: String,
    kind: String,
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    tool: Option<String>,
    #[serde(default)]
    reference: Option<Reference>,
    #[serde(default)]
    decision: Option<String>,
    #[serde(default)]
    roles: Option<Vec<String>>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    arguments_digest: Option<String>,
    #[serde(default)]
    argument_shapes: Option<Map<String, Value>>,
    #[serde(default)]
    tools_seen: Option<Vec<ToolSeen>>,
    #[serde(default)]
    addr: Option<IpAddr>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    protocol: Option<Protocol>,
    #[serde(default)]
    verdict: Option<String>,
    #[serde(default)]
    host: Option<String>,
}

impl Observations {
    /// Empty observations. `known_roles` (principal → roles, from the policy in force) stands
    /// in for the `roles` of call records written before records carried them.
    pub fn new(known_roles: BTreeMap<String, Vec<String>>) -> Self {
        Self {
            known_roles,
            ..Self::default()
        }
    }

    /// Reads the log files (or directories) named on the command line, in chain order.
    pub fn read(&mut self, arguments: &[PathBuf]) -> Result<(), LearnError> {
        let files = crate::audit::chain_order(arguments).map_err(LearnError::AuditFiles)?;
        for path in &files {
            self.read_file(path)?;
        }
        self.files.extend(files);
        Ok(())
    }

    fn read_file(&mut self, path: &Path) -> Result<(), LearnError> {
        let unreadable = |source| LearnError::AuditRead {
            path: path.to_owned(),
            source,
        };
        let mut reader = BufReader::with_capacity(1 << 20, File::open(path).map_err(unreadable)?);
        let mut line = Vec::with_capacity(4096);
        let mut number = 0u64;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line).map_err(unreadable)? == 0 {
                return Ok(());
            }
            number += 1;
            if let Err(error) = self.add_line(&line) {
                self.skipped
                    .push(format!("{}:{number}: skipped: {error}", path.display()));
            }
        }
    }

    /// Adds one line of a log.
    pub fn add_line(&mut self, line: &[u8]) -> Result<(), serde_json::Error> {
        let line: Line = serde_json::from_slice(line)?;
        self.add(line);
        Ok(())
    }

    /// True when no call or egress record of any server was seen.
    pub fn is_empty(&self) -> bool {
        self.servers.values().all(|server| {
            server.callers.is_empty() && server.egress.is_empty() && server.egress_refused == 0
        })
    }

    fn add(&mut self, line: Line) {
        self.records += 1;
        if self.first.as_ref().is_none_or(|first| line.ts < *first) {
            self.first = Some(line.ts.clone());
        }
        if self.last.as_ref().is_none_or(|last| line.ts > *last) {
            self.last = Some(line.ts.clone());
        }
        let Some(server_name) = line.server.clone() else {
            return;
        };
        match line.kind.as_str() {
            "call" => self.add_call(server_name, line),
            "egress" => self.add_egress(server_name, line),
            _ => {}
        }
    }

    fn add_call(&mut self, server_name: String, line: Line) {
        let roles = match &line.roles {
            Some(roles) => roles.clone(),
            None => line
                .principal
                .as_ref()
                .and_then(|principal| self.known_roles.get(principal))
                .cloned()
                .unwrap_or_default(),
        };
        let server = self.servers.entry(server_name).or_default();
        server.modes.insert(mode_of(&line));
        for tool in line.tools_seen.into_iter().flatten() {
            server.tools_seen.insert(tool.name.clone(), tool);
        }
        // Only decision records of forwarded calls count: an outcome record repeats its
        // decision's call, and a refused call was not used.
        let forwarded = matches!(line.decision.as_deref(), Some("allow" | "would_deny"));
        let Some(method) = line.method.as_deref() else {
            return;
        };
        if !forwarded || is_plumbing(method) {
            return;
        }
        let principal = line.principal.as_deref().unwrap_or("");
        let caller = server
            .callers
            .entry(Subject::of(principal, &roles))
            .or_default();
        if !principal.is_empty() {
            caller.principals.insert(principal.to_owned());
        }
        caller.roles.extend(roles);
        // A decision record has a digest exactly when the call had arguments; without either,
        // the call's arguments were none at all, which is a shape too.
        let shapes = match (line.argument_shapes, &line.arguments_digest) {
            (Some(shapes), _) => Some(shapes),
            (None, None) => Some(Map::new()),
            (None, Some(_)) => None,
        };
        caller.add(method, line.tool.as_deref(), &line.ts, shapes.as_ref());
        if let Some(reference) = line.reference {
            caller.completed.entry(reference).or_default().add(&line.ts);
        }
    }

    fn add_egress(&mut self, server_name: String, line: Line) {
        let server = self.servers.entry(server_name).or_default();
        server.modes.insert(mode_of(&line));
        let (Some(addr), Some(port)) = (line.addr, line.port) else {
            return;
        };
        match line.verdict.as_deref() {
            Some("allow" | "would_refuse") => {}
            Some("refuse") => {
                server.egress_refused += 1;
                return;
            }
            _ => return,
        }
        let destination = match line.host {
            Some(host) => Destination::Host(host),
            // An IPv4-mapped address is the IPv4 destination (the kernel judges it so).
            None => Destination::Addr(addr.to_canonical()),
        };
        let protocol = line.protocol.unwrap_or(Protocol::Tcp);
        server
            .egress
            .entry(destination)
            .or_default()
            .entry((protocol, port))
            .or_default()
            .add(&line.ts);
    }
}

fn mode_of(line: &Line) -> String {
    line.mode.clone().unwrap_or_else(|| "enforce".to_owned())
}

impl CallerUsage {
    fn add(
        &mut self,
        method: &str,
        name: Option<&str>,
        ts: &str,
        shapes: Option<&Map<String, Value>>,
    ) {
        let named = |map: &mut BTreeMap<String, NamedUsage>, name: &str| {
            let entry = map.entry(name.to_owned()).or_default();
            entry.usage.add(ts);
            entry.arguments.add(shapes);
        };
        match (method, name) {
            ("tools/call", Some(tool)) => named(&mut self.tools, tool),
            ("prompts/get", Some(prompt)) => named(&mut self.prompts, prompt),
            ("resources/read" | "resources/subscribe" | "resources/unsubscribe", Some(uri)) => self
                .resources
                .entry(uri.to_owned())
                .or_default()
                .entry(method.to_owned())
                .or_default()
                .add(ts),
            // A named method without its name was refused as invalid; nothing to learn.
            ("tools/call" | "prompts/get", None) => {}
            (method, _) => self.methods.entry(method.to_owned()).or_default().add(ts),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Observations from record lines, as a log would hold them.
    pub(crate) fn observe(lines: &[Value]) -> Observations {
        let mut observations = Observations::new(BTreeMap::new());
        for line in lines {
            observations
                .add_line(line.to_string().as_bytes())
                .expect("a record");
        }
        observations
    }

    #[test]
    fn forwarded_calls_count_per_role_and_refused_ones_do_not() {
        let observations = observe(&[
            serde_json::json!({"ts": "2026-01-02T00:00:00Z", "kind": "call", "principal": "alice",
                "roles": ["dev"], "server": "s", "method": "tools/call", "tool": "echo",
                "decision": "allow", "mode": "learn", "argument_shapes": {"m": "hi"}}),
            serde_json::json!({"ts": "2026-01-03T00:00:00Z", "kind": "call", "principal": "alice",
                "roles": ["dev"], "server": "s", "method": "tools/call", "tool": "echo",
                "outcome": {"kind": "result"}, "mode": "learn"}),
            serde_json::json!({"ts": "2026-01-01T00:00:00Z", "kind": "call", "principal": "bob",
                "roles": ["dev"], "server": "s", "method": "tools/call", "tool": "rm",
                "decision": "deny"}),
            serde_json::json!({"ts": "2026-01-04T00:00:00Z", "kind": "call", "principal": "bob",
                "server": "s", "method": "initialize", "decision": "allow"}),
            serde_json::json!({"ts": "2026-01-05T00:00:00Z", "kind": "call", "principal": "carol",
                "roles": ["a", "b"], "server": "s", "method": "tools/list", "decision": "would_deny"}),
        ]);
        let server = &observations.servers["s"];
        let dev = &server.callers[&Subject::Role("dev".into())];
        assert_eq!(dev.tools["echo"].usage.count, 1);
        assert_eq!(dev.tools["echo"].arguments.shaped_calls(), 1);
        assert!(!dev.tools.contains_key("rm"), "a denied call was not used");
        assert_eq!(dev.principals, BTreeSet::from(["alice".to_owned()]));
        let carol = &server.callers[&Subject::Principal("carol".into())];
        assert_eq!(carol.methods["tools/list"].count, 1);
        assert_eq!(server.callers.len(), 2, "plumbing makes no caller");
        assert_eq!(
            server.modes,
            BTreeSet::from(["enforce".to_owned(), "learn".to_owned()])
        );
        assert_eq!(observations.first.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(observations.records, 5);
    }

    #[test]
    fn egress_is_learned_by_host_or_address_and_refusals_are_not() {
        let observations = observe(&[
            serde_json::json!({"ts": "t1", "kind": "egress", "server": "s", "addr": "10.0.0.1",
                "port": 443, "protocol": "tcp", "verdict": "would_refuse", "host": "api.example.com"}),
            serde_json::json!({"ts": "t2", "kind": "egress", "server": "s", "addr": "::ffff:127.0.0.53",
                "port": 53, "protocol": "udp", "verdict": "allow"}),
            serde_json::json!({"ts": "t3", "kind": "egress", "server": "s", "addr": "10.9.9.9",
                "port": 22, "protocol": "tcp", "verdict": "refuse"}),
        ]);
        let server = &observations.servers["s"];
        assert_eq!(server.egress.len(), 2);
        assert!(
            server
                .egress
                .contains_key(&Destination::Host("api.example.com".into()))
        );
        let dns = &server.egress[&Destination::Addr("127.0.0.53".parse().unwrap())];
        assert_eq!(dns[&(Protocol::Udp, 53)].count, 1);
        assert_eq!(server.egress_refused, 1);
    }

    #[test]
    fn the_catalogue_and_roles_of_older_records_are_read() {
        let mut observations = Observations::new(BTreeMap::from([(
            "alice".to_owned(),
            vec!["dev".to_owned()],
        )]));
        let lines = [
            serde_json::json!({"ts": "t", "kind": "call", "server": "s", "method": "tools/list",
                "outcome": {"kind": "result"}, "tools_seen": [{"name": "echo", "read_only": true},
                {"name": "rm", "destructive": true}, {"name": "plain"}]}),
            serde_json::json!({"ts": "t", "kind": "call", "principal": "alice", "server": "s",
                "method": "tools/call", "tool": "echo", "decision": "allow"}),
        ];
        for line in lines {
            observations.add_line(line.to_string().as_bytes()).unwrap();
        }
        let server = &observations.servers["s"];
        assert!(!server.tools_seen["echo"].writes());
        assert!(server.tools_seen["rm"].writes());
        assert!(!server.tools_seen["plain"].hints_given());
        assert!(server.callers.contains_key(&Subject::Role("dev".into())));
        assert!(observations.add_line(b"{\"torn").is_err());
    }
}
