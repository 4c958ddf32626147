//! The scope report: per server and caller, the surface exposed, allowed and used, and what
//! the suggested policy removes — the figures practitioners quote ("used 3 of 13 tools
//! (23 %)", "write-capable tools allowed: 5 → 1, 80 % removed").
//!
//! "Allowed before" is what the policy in force lets the caller call among the tools the
//! server exposed, judged by the compiled policy as the proxy judges list visibility; without
//! a policy in force, or for a server that ran in learn mode (where everything passed), it is
//! every exposed tool. "Allowed after" is judged the same way on the suggestion.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use super::observe::{CallerUsage, Observations, ServerUsage, Subject};
use super::suggest::protocol_name;
use crate::audit::record::ToolSeen;
use crate::policy::{
    CompiledPolicy, DecisionRequest, Destination, EgressRule, Mode, Policy, ServerPolicy,
    glob_matches,
};

#[derive(Debug, Clone, Serialize)]
pub struct ScopeReport {
    pub audit: AuditSpan,
    /// The policy in force that was compared against (`--policy`).
    pub policy: Option<PathBuf>,
    pub servers: Vec<ServerScope>,
    /// What the user must know or fill in: missing launch settings, skipped lines, servers
    /// never used, validation warnings of the suggestion.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditSpan {
    pub files: Vec<PathBuf>,
    pub records: u64,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
}

/// What "allowed before" was judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// The rules of the policy in force.
    Policy,
    /// The server ran in learn mode: everything passed.
    LearnMode,
    /// No policy in force was given: everything exposed counts as allowed.
    NoPolicy,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerScope {
    pub server: String,
    /// The modes the server's records were written in.
    pub modes_observed: Vec<String>,
    pub basis: Basis,
    /// Tools the server offered (`tools_seen`); None when no `tools/list` of it was recorded
    /// in learn or shadow mode.
    pub tools_exposed: Option<usize>,
    pub callers: Vec<CallerScope>,
    pub egress: EgressScope,
}

#[derive(Debug, Clone, Serialize)]
pub struct CallerScope {
    pub caller: Subject,
    pub principals: Vec<String>,
    pub tools: Surface,
    /// Tools that may change something: by the server's annotations, else the server's
    /// `write_tools` in the policy.
    pub write_tools: Surface,
    /// Methods that name no tool, resource or prompt (list methods and the like).
    pub methods_used: Vec<String>,
    pub resources_used: Vec<String>,
    pub prompts_used: Vec<String>,
}

/// One kind of surface (tools, write-capable tools) for one caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Surface {
    pub exposed: Option<usize>,
    pub allowed_before: usize,
    pub used: usize,
    pub allowed_after: usize,
    /// `used` as a share of `exposed`, rounded.
    pub used_percent: Option<u32>,
    /// The share of `allowed_before` the suggestion no longer allows, rounded.
    pub removed_percent: Option<u32>,
    /// Name → calls.
    pub used_tools: BTreeMap<String, u64>,
    /// Allowed before and not after.
    pub removed_tools: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EgressScope {
    /// The egress rules of the policy in force (empty unless `basis` is `policy`).
    pub allowed_before: Vec<String>,
    pub used: Vec<DestinationUse>,
    pub allowed_after: Vec<String>,
    /// Connections the kernel refused (enforce mode): not learned.
    pub refused: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DestinationUse {
    pub destination: String,
    pub protocol: &'static str,
    pub port: u16,
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
}

/// The policies compared: the one in force (if given) and the suggestion, each compiled.
pub struct Compared<'a> {
    pub before: Option<(&'a Policy, &'a CompiledPolicy)>,
    pub after: (&'a Policy, &'a CompiledPolicy),
}

/// Builds the report. `notes` are carried into it as they are.
pub fn report(
    observations: &Observations,
    compared: &Compared<'_>,
    policy_path: Option<PathBuf>,
    notes: Vec<String>,
) -> ScopeReport {
    let empty = ServerUsage::default();
    let servers = compared
        .after
        .0
        .servers
        .keys()
        .map(|name| {
            let usage = observations.servers.get(name).unwrap_or(&empty);
            server_scope(name, usage, compared)
        })
        .collect();
    ScopeReport {
        audit: AuditSpan {
            files: observations.files.clone(),
            records: observations.records,
            first_seen: observations.first.clone(),
            last_seen: observations.last.clone(),
        },
        policy: policy_path,
        servers,
        notes,
    }
}

fn server_scope(name: &str, usage: &ServerUsage, compared: &Compared<'_>) -> ServerScope {
    let before_server = compared
        .before
        .and_then(|(policy, _)| Some((policy, policy.servers.get(name)?)));
    let basis = match (compared.before, before_server) {
        (None, _) => Basis::NoPolicy,
        (Some(_), Some((policy, server))) if server.effective_mode(policy.mode) == Mode::Learn => {
            Basis::LearnMode
        }
        (Some(_), _) => Basis::Policy,
    };
    // The suggestion keeps the server's `write_tools`; without a policy there are none.
    let write_labels = compared
        .after
        .0
        .servers
        .get(name)
        .map_or(&[][..], |s| &s.write_tools[..]);
    let callers = usage
        .callers
        .iter()
        .map(|(subject, caller)| {
            let judge = Judge {
                server: name,
                subject,
                caller,
            };
            let before = |tool: &str| match (basis, compared.before) {
                (Basis::Policy, Some((_, compiled))) => judge.allows(compiled, tool),
                _ => true,
            };
            let after = |tool: &str| judge.allows(compared.after.1, tool);
            let universe: BTreeSet<&str> = usage
                .tools_seen
                .keys()
                .chain(caller.tools.keys())
                .map(String::as_str)
                .collect();
            let writes = |tool: &str| writes(usage.tools_seen.get(tool), tool, write_labels);
            let exposed = (!usage.tools_seen.is_empty()).then_some(usage.tools_seen.len());
            let write_exposed =
                exposed.map(|_| usage.tools_seen.keys().filter(|t| writes(t)).count());
            let write_universe = universe.iter().copied().filter(|t| writes(t)).collect();
            CallerScope {
                caller: subject.clone(),
                principals: caller.principals.iter().cloned().collect(),
                tools: surface(&universe, exposed, caller, &before, &after),
                write_tools: surface(&write_universe, write_exposed, caller, &before, &after),
                methods_used: caller.methods.keys().cloned().collect(),
                resources_used: caller.resources.keys().cloned().collect(),
                prompts_used: caller.prompts.keys().cloned().collect(),
            }
        })
        .collect();
    ServerScope {
        server: name.to_owned(),
        modes_observed: usage.modes.iter().cloned().collect(),
        basis,
        tools_exposed: (!usage.tools_seen.is_empty()).then_some(usage.tools_seen.len()),
        callers,
        egress: egress_scope(
            usage,
            before_server
                .filter(|_| basis == Basis::Policy)
                .map(|(_, s)| s),
            compared.after.0.servers.get(name),
        ),
    }
}

/// Whether a tool may change something: the server's annotations where it gave any, else the
/// policy's `write_tools` labels.
fn writes(seen: Option<&ToolSeen>, tool: &str, labels: &[String]) -> bool {
    match seen {
        Some(seen) if seen.hints_given() => seen.writes(),
        _ => labels.iter().any(|pattern| glob_matches(pattern, tool)),
    }
}

/// Asks a compiled policy about one caller, as the proxy would when filtering `tools/list`.
struct Judge<'a> {
    server: &'a str,
    subject: &'a Subject,
    caller: &'a CallerUsage,
}

impl Judge<'_> {
    /// Whether some principal seen as this caller, holding the caller's roles, may call
    /// `tool` (its arguments assumed acceptable).
    fn allows(&self, policy: &CompiledPolicy, tool: &str) -> bool {
        let roles: Vec<String> = match self.subject {
            Subject::Role(role) => vec![role.clone()],
            _ => self.caller.roles.iter().cloned().collect(),
        };
        let anonymous = [String::new()];
        let principals: Vec<&String> = if self.caller.principals.is_empty() {
            anonymous.iter().collect()
        } else {
            self.caller.principals.iter().collect()
        };
        principals.into_iter().any(|principal| {
            policy.visible(
                &DecisionRequest::new(self.server, principal, &roles, "tools/call").with_name(tool),
            )
        })
    }
}

fn surface(
    universe: &BTreeSet<&str>,
    exposed: Option<usize>,
    caller: &CallerUsage,
    before: &dyn Fn(&str) -> bool,
    after: &dyn Fn(&str) -> bool,
) -> Surface {
    let used_tools: BTreeMap<String, u64> = universe
        .iter()
        .filter_map(|tool| Some(((*tool).to_owned(), caller.tools.get(*tool)?.usage.count)))
        .collect();
    let allowed_before: Vec<&str> = universe.iter().copied().filter(|t| before(t)).collect();
    let allowed_after = universe.iter().filter(|t| after(t)).count();
    let removed_tools: Vec<String> = allowed_before
        .iter()
        .filter(|t| !after(t))
        .map(|t| (*t).to_owned())
        .collect();
    Surface {
        exposed,
        allowed_before: allowed_before.len(),
        used: used_tools.len(),
        allowed_after,
        used_percent: exposed.and_then(|exposed| percent(used_tools.len(), exposed)),
        removed_percent: percent(removed_tools.len(), allowed_before.len()),
        used_tools,
        removed_tools,
    }
}

/// `part` of `whole` in whole percent, rounded half up; None for an empty whole.
fn percent(part: usize, whole: usize) -> Option<u32> {
    (whole > 0).then(|| ((part * 200 + whole) / (2 * whole)) as u32)
}

fn egress_scope(
    usage: &ServerUsage,
    before: Option<&ServerPolicy>,
    after: Option<&ServerPolicy>,
) -> EgressScope {
    let rules = |server: Option<&ServerPolicy>| -> Vec<String> {
        server.map_or_else(Vec::new, |s| {
            s.egress.iter().map(egress_rule_text).collect()
        })
    };
    let used = usage
        .egress
        .iter()
        .flat_map(|(destination, by_port)| {
            by_port
                .iter()
                .map(move |((protocol, port), seen)| DestinationUse {
                    destination: destination.to_string(),
                    protocol: protocol_name(*protocol),
                    port: *port,
                    count: seen.count,
                    first_seen: seen.first.clone(),
                    last_seen: seen.last.clone(),
                })
        })
        .collect();
    EgressScope {
        allowed_before: rules(before),
        used,
        allowed_after: rules(after),
        refused: usage.egress_refused,
    }
}

/// `api.example.com tcp 443`, `10.0.0.0/8 tcp/udp 53, 8000-8100`.
fn egress_rule_text(rule: &EgressRule) -> String {
    let destination = match rule.destination() {
        Some(Destination::Host(host)) => host,
        Some(Destination::Cidr(net)) if net.prefix_len() == net.max_prefix_len() => {
            net.addr().to_string()
        }
        Some(Destination::Cidr(net)) => net.to_string(),
        None => "(invalid)".to_owned(),
    };
    let protocols: Vec<&str> = rule.protocols.iter().map(|p| protocol_name(*p)).collect();
    let ports: Vec<String> = rule.ports.iter().map(ToString::to_string).collect();
    format!("{destination} {} {}", protocols.join("/"), ports.join(", "))
}

impl ScopeReport {
    /// The report as text for a terminal.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let span = match (&self.audit.first_seen, &self.audit.last_seen) {
            (Some(first), Some(last)) => format!(", {first} to {last}"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "scope report: {} records in {} audit file(s){span}",
            self.audit.records,
            self.audit.files.len()
        );
        if let Some(policy) = &self.policy {
            let _ = writeln!(
                out,
                "compared with the policy in force: {}",
                policy.display()
            );
        }
        for server in &self.servers {
            write_server(&mut out, server);
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }
}

fn write_server(out: &mut String, server: &ServerScope) {
    let modes = if server.modes_observed.is_empty() {
        "no records".to_owned()
    } else {
        format!("records in {} mode", server.modes_observed.join(", "))
    };
    let basis = match server.basis {
        Basis::Policy => "allowed before: the policy's rules",
        Basis::LearnMode => "allowed before: everything (learn mode)",
        Basis::NoPolicy => "allowed before: everything exposed (no --policy)",
    };
    let exposed = server.tools_exposed.map_or_else(
        || "tools exposed: unknown (no tools/list recorded in learn or shadow mode)".to_owned(),
        |n| format!("{n} tools exposed"),
    );
    let _ = writeln!(
        out,
        "\nserver {} ({modes}; {exposed}; {basis})",
        server.server
    );
    if server.callers.is_empty() {
        let _ = writeln!(out, "  no calls: the suggestion allows no MCP operation");
    }
    for caller in &server.callers {
        let principals = if caller.principals.is_empty() {
            String::new()
        } else {
            format!(" (principals: {})", caller.principals.join(", "))
        };
        let _ = writeln!(out, "  {}{principals}", caller.caller.label());
        let _ = writeln!(out, "    tools: {}", surface_text(&caller.tools));
        if !caller.tools.used_tools.is_empty() {
            let used: Vec<String> = caller
                .tools
                .used_tools
                .iter()
                .map(|(tool, calls)| format!("{tool} ({calls})"))
                .collect();
            let _ = writeln!(out, "      used: {}", used.join(", "));
        }
        if !caller.tools.removed_tools.is_empty() {
            let _ = writeln!(
                out,
                "      removed: {}",
                caller.tools.removed_tools.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "    write-capable tools: {}",
            surface_text(&caller.write_tools)
        );
        let _ = writeln!(
            out,
            "    other methods: {}; resources: {}; prompts: {}",
            list_or_none(&caller.methods_used),
            list_or_none(&caller.resources_used),
            list_or_none(&caller.prompts_used)
        );
    }
    write_egress(out, &server.egress, server.basis);
}

/// "used 3 of 13 (23 %); allowed 13 → 3, 77 % removed".
fn surface_text(surface: &Surface) -> String {
    let used = match (surface.exposed, surface.used_percent) {
        (Some(exposed), Some(percent)) => {
            format!("used {} of {exposed} exposed ({percent} %)", surface.used)
        }
        (Some(exposed), None) => format!("used {} of {exposed} exposed", surface.used),
        (None, _) => format!("used {}", surface.used),
    };
    let removed = surface
        .removed_percent
        .map_or_else(String::new, |percent| format!(", {percent} % removed"));
    format!(
        "{used}; allowed {} → {}{removed}",
        surface.allowed_before, surface.allowed_after
    )
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

fn write_egress(out: &mut String, egress: &EgressScope, basis: Basis) {
    let destinations: BTreeSet<&str> = egress.used.iter().map(|u| u.destination.as_str()).collect();
    let before = match basis {
        Basis::Policy => format!("{} rule(s)", egress.allowed_before.len()),
        Basis::LearnMode => "everything (learn mode)".to_owned(),
        Basis::NoPolicy => "unknown (no --policy)".to_owned(),
    };
    let _ = writeln!(
        out,
        "  egress: used {} destination(s); allowed {before} → {} rule(s); {} refused connection(s) not learned",
        destinations.len(),
        egress.allowed_after.len(),
        egress.refused
    );
    for used in &egress.used {
        let _ = writeln!(
            out,
            "    {} {} {}: {} time(s)",
            used.destination, used.protocol, used.port, used.count
        );
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::learn::observe::tests::observe;
    use crate::learn::suggest::suggest;

    fn catalogue() -> serde_json::Value {
        json!({"ts": "2026-03-01T00:00:00Z", "kind": "call", "server": "s", "method": "tools/list",
            "mode": "learn", "outcome": {"kind": "result"}, "tools_seen": [
                {"name": "read", "read_only": true},
                {"name": "write", "read_only": false},
                {"name": "wipe", "destructive": true},
                {"name": "send"},
                {"name": "look"}]})
    }

    fn used(tool: &str) -> serde_json::Value {
        json!({"ts": "2026-03-01T00:00:01Z", "kind": "call", "principal": "alice",
            "roles": ["dev"], "server": "s", "method": "tools/call", "tool": tool,
            "decision": "allow", "mode": "learn", "argument_shapes": {}})
    }

    fn policy(mode: &str) -> Policy {
        serde_json::from_value(
            json!({"version": 1, "principals": {"alice": {"roles": ["dev"]}},
            "servers": {"s": {"mode": mode, "write_tools": ["send"], "egress": [
                {"id": "web", "host": "example.com", "ports": [443]}],
              "rules": [{"id": "some", "description": "d", "effect": "allow", "roles": ["dev"],
                "tools": ["read", "write", "wipe"]}]}}}),
        )
        .unwrap()
    }

    fn scope_of(before: &Policy) -> ScopeReport {
        let observations = observe(&[catalogue(), used("read"), used("write")]);
        let after = suggest(&observations, Some(before));
        let (before_compiled, after_compiled) = (
            CompiledPolicy::compile(before).unwrap(),
            CompiledPolicy::compile(&after).unwrap(),
        );
        let compared = Compared {
            before: Some((before, &before_compiled)),
            after: (&after, &after_compiled),
        };
        report(&observations, &compared, None, Vec::new())
    }

    #[test]
    fn learn_mode_counts_every_exposed_tool_as_allowed_before() {
        let report = scope_of(&policy("learn"));
        let server = &report.servers[0];
        assert_eq!(server.basis, Basis::LearnMode);
        let dev = &server.callers[0];
        assert_eq!(dev.caller, Subject::Role("dev".into()));
        assert_eq!(
            (
                dev.tools.exposed,
                dev.tools.allowed_before,
                dev.tools.used,
                dev.tools.allowed_after
            ),
            (Some(5), 5, 2, 2)
        );
        assert_eq!(dev.tools.used_percent, Some(40));
        assert_eq!(dev.tools.removed_percent, Some(60));
        assert_eq!(dev.tools.removed_tools, ["look", "send", "wipe"]);
        // write, wipe by their hints; send by the policy's label; read is read-only and look
        // has no hint and no label.
        assert_eq!(
            (
                dev.write_tools.exposed,
                dev.write_tools.allowed_before,
                dev.write_tools.used,
                dev.write_tools.allowed_after
            ),
            (Some(3), 3, 1, 1)
        );
        assert_eq!(dev.write_tools.removed_percent, Some(67));
        let text = report.to_text();
        assert!(
            text.contains("tools: used 2 of 5 exposed (40 %); allowed 5 → 2, 60 % removed"),
            "{text}"
        );
        assert!(
            text.contains(
                "write-capable tools: used 1 of 3 exposed (33 %); allowed 3 → 1, 67 % removed"
            ),
            "{text}"
        );
        assert!(
            text.contains("allowed everything (learn mode) → 0 rule(s)"),
            "{text}"
        );
    }

    #[test]
    fn in_enforce_mode_allowed_before_is_what_the_policy_lets_the_caller_call() {
        let report = scope_of(&policy("enforce"));
        let server = &report.servers[0];
        assert_eq!(server.basis, Basis::Policy);
        let dev = &server.callers[0];
        assert_eq!((dev.tools.allowed_before, dev.tools.allowed_after), (3, 2));
        assert_eq!(dev.tools.removed_tools, ["wipe"]);
        assert_eq!(dev.tools.removed_percent, Some(33));
        assert_eq!(server.egress.allowed_before, ["example.com tcp 443"]);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json["servers"][0]["callers"][0]["caller"],
            json!({"role": "dev"})
        );
        assert_eq!(
            json["servers"][0]["callers"][0]["tools"]["used_tools"],
            json!({"read": 1, "write": 1})
        );
    }

    #[test]
    fn percentages_round_half_up() {
        assert_eq!(percent(3, 13), Some(23));
        assert_eq!(percent(4, 5), Some(80));
        assert_eq!(percent(1, 8), Some(13));
        assert_eq!(percent(0, 0), None);
    }
}
