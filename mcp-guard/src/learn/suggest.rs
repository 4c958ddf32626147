//! The minimal policy that allows exactly what was observed.
//!
//! Per server and caller: one rule for the list and other unnamed methods used, one for the
//! tools called whose arguments cannot be narrowed, one per tool whose arguments can (with the
//! schema from [`super::constraints`]), and the same for prompts; resources by the methods used
//! on them. Egress: one rule per destination reached (its host name where the address came
//! from a declared name, else the single address), its ports merged. Every rule says what it
//! allows and how often and when that was seen.
//!
//! With the policy in force, everything but the rules, egress and mode is kept as it is
//! (daemon, identity, audit, principals, each server's launch settings and `write_tools`), and
//! so are its deny rules: what someone decided to forbid stays forbidden. Without it, the
//! skeleton has defaults and servers with nowhere to forward to, for the user to fill in.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use super::observe::{
    CallerUsage, Destination, NamedUsage, Observations, ServerUsage, Subject, Usage, total_usage,
};
use crate::audit::Reference;
use crate::policy::{
    Effect, EgressRule, Mode, POLICY_VERSION, Policy, PortRange, Principal, Protocol, Rule,
    ServerPolicy,
};

/// Rule ids: 1-64 characters from `A-Z a-z 0-9 _ . -`.
const MAX_ID_LEN: usize = 64;

/// Every learned description starts so, which tells a reviewer where the rule came from.
const LEARNED: &str = "Learned from the audit log:";

/// The suggested policy: `current`'s settings (or defaults) with rules and egress learned
/// from `observations`, in `enforce` mode.
pub fn suggest(observations: &Observations, current: Option<&Policy>) -> Policy {
    let mut policy = current.cloned().unwrap_or_else(skeleton);
    policy.mode = Mode::Enforce;
    let names: BTreeSet<String> = policy
        .servers
        .keys()
        .chain(observations.servers.keys())
        .cloned()
        .collect();
    for name in names {
        let server = policy.servers.entry(name.clone()).or_default();
        learn_server(server, observations.servers.get(&name));
    }
    declare_principals(&mut policy, observations, current.is_none());
    policy
}

/// A policy with every setting at its default (parsed, so that new defaulted fields need no
/// change here).
fn skeleton() -> Policy {
    serde_json::from_value(serde_json::json!({ "version": POLICY_VERSION }))
        .expect("a policy of just its version is valid")
}

fn learn_server(server: &mut ServerPolicy, usage: Option<&ServerUsage>) {
    server.mode = None;
    server.rules.retain(|rule| rule.effect == Effect::Deny);
    let mut ids = RuleIds::new(server.rules.iter().map(|rule| rule.id.clone()));
    server.egress = Vec::new();
    let Some(usage) = usage else {
        return;
    };
    for (subject, caller) in &usage.callers {
        server.rules.extend(caller_rules(subject, caller, &mut ids));
    }
    let mut egress_ids = RuleIds::new(std::iter::empty());
    for (destination, by_port) in &usage.egress {
        server
            .egress
            .extend(egress_rules(destination, by_port, &mut egress_ids));
    }
}

/// Principals the rules name must be declared. Without a policy in force, every principal
/// seen is declared with the roles it held, since nothing else would give them those roles.
fn declare_principals(policy: &mut Policy, observations: &Observations, all: bool) {
    let mut roles_of: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut named: BTreeSet<&str> = BTreeSet::new();
    for caller_map in observations.servers.values().map(|s| &s.callers) {
        for (subject, caller) in caller_map {
            if let Subject::Principal(principal) = subject {
                named.insert(principal);
            }
            for principal in &caller.principals {
                roles_of
                    .entry(principal)
                    .or_default()
                    .extend(caller.roles.iter().map(String::as_str));
            }
        }
    }
    for (principal, roles) in roles_of {
        if (all || named.contains(principal)) && !policy.principals.contains_key(principal) {
            policy.principals.insert(
                principal.to_owned(),
                Principal {
                    roles: roles.into_iter().map(str::to_owned).collect(),
                    description: Some(
                        "Seen in the audit log; declared by `policy suggest` with the roles it \
                         held there."
                            .to_owned(),
                    ),
                },
            );
        }
    }
}

/// The rules allowing what one caller did on one server.
fn caller_rules(subject: &Subject, caller: &CallerUsage, ids: &mut RuleIds) -> Vec<Rule> {
    let who = subject.id_part();
    let label = subject.label();
    let mut rules = Vec::new();
    if !caller.methods.is_empty() {
        let rule = Rule {
            methods: caller.methods.keys().cloned().collect(),
            ..base_rule(
                ids.claim(&["learned", who, "methods"]),
                format!(
                    "{LEARNED} lets {label} use {}.",
                    listed(&caller.methods, "call")
                ),
                subject,
            )
        };
        rules.push(rule);
    }
    rules.extend(named_rules(subject, &caller.tools, Named::Tool, ids));
    rules.extend(named_rules(subject, &caller.prompts, Named::Prompt, ids));
    rules.extend(resource_rules(subject, &caller.resources, ids));
    rules.extend(completed_rules(subject, caller, ids));
    rules
}

/// What completing an argument needs beyond `completion/complete` itself: mcp-guard completes
/// only a prompt the caller may get and a resource template it may read (as the lists show
/// them). One rule each for the prompts and the templates completed that no other learned
/// rule already lets the caller use.
fn completed_rules(subject: &Subject, caller: &CallerUsage, ids: &mut RuleIds) -> Vec<Rule> {
    let mut prompts = BTreeMap::new();
    let mut templates = BTreeMap::new();
    for (reference, usage) in &caller.completed {
        match reference {
            Reference::Prompt { name } if !caller.prompts.contains_key(name) => {
                prompts.insert(name.clone(), usage.clone());
            }
            Reference::Resource { uri } if !read_learned(caller, uri) => {
                templates.insert(uri.clone(), usage.clone());
            }
            _ => {}
        }
    }
    let (who, label) = (subject.id_part(), subject.label());
    let mut rules = Vec::new();
    if !prompts.is_empty() {
        rules.push(Rule {
            methods: vec![Named::Prompt.method().to_owned()],
            prompts: Some(prompts.keys().cloned().collect()),
            ..base_rule(
                ids.claim(&["learned", who, "completed-prompts"]),
                format!(
                    "{LEARNED} lets {label} get the prompts it completed arguments of, which \
                     completion needs: {}.",
                    listed(&prompts, "completion")
                ),
                subject,
            )
        });
    }
    if !templates.is_empty() {
        rules.push(Rule {
            methods: vec!["resources/read".to_owned()],
            resources: Some(templates.keys().cloned().collect()),
            ..base_rule(
                ids.claim(&["learned", who, "completed-templates"]),
                format!(
                    "{LEARNED} lets {label} see the resource templates it completed arguments \
                     of, which completion needs (the template itself, not the resources it \
                     names): {}.",
                    listed(&templates, "completion")
                ),
                subject,
            )
        });
    }
    rules
}

/// Whether the caller's learned resource rules already let it read `uri`.
fn read_learned(caller: &CallerUsage, uri: &str) -> bool {
    caller
        .resources
        .get(uri)
        .is_some_and(|methods| methods.contains_key("resources/read"))
}

/// Tools or prompts: the kind of named thing a rule is learned for.
#[derive(Debug, Clone, Copy)]
enum Named {
    Tool,
    Prompt,
}

impl Named {
    fn method(self) -> &'static str {
        match self {
            Self::Tool => "tools/call",
            Self::Prompt => "prompts/get",
        }
    }

    /// The id part of the rule for the ones without argument constraints.
    fn group(self) -> &'static str {
        match self {
            Self::Tool => "tools",
            Self::Prompt => "prompts",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Tool => "call",
            Self::Prompt => "get the prompt",
        }
    }

    fn set(self, rule: &mut Rule, names: Vec<String>) {
        match self {
            Self::Tool => rule.tools = Some(names),
            Self::Prompt => rule.prompts = Some(names),
        }
    }
}

/// One rule for every tool (or prompt) whose arguments can be narrowed, and one for the rest.
fn named_rules(
    subject: &Subject,
    used: &BTreeMap<String, NamedUsage>,
    kind: Named,
    ids: &mut RuleIds,
) -> Vec<Rule> {
    let (who, label) = (subject.id_part(), subject.label());
    let mut free = BTreeMap::new();
    let mut rules = Vec::new();
    for (name, usage) in used {
        let Some(schema) = usage.arguments.schema() else {
            free.insert(name.clone(), usage.usage.clone());
            continue;
        };
        let mut rule = Rule {
            methods: vec![kind.method().to_owned()],
            arguments: Some(schema),
            ..base_rule(
                ids.claim(&["learned", who, name]),
                format!(
                    "{LEARNED} lets {label} {} {name} ({}), with arguments limited to the \
                     values observed.",
                    kind.verb(),
                    usage.usage.describe("call")
                ),
                subject,
            )
        };
        kind.set(&mut rule, vec![name.clone()]);
        rules.push(rule);
    }
    if !free.is_empty() {
        let mut rule = Rule {
            methods: vec![kind.method().to_owned()],
            ..base_rule(
                ids.claim(&["learned", who, kind.group()]),
                format!(
                    "{LEARNED} lets {label} {} {}.",
                    kind.verb(),
                    listed(&free, "call")
                ),
                subject,
            )
        };
        kind.set(&mut rule, free.into_keys().collect());
        // The group goes first: it is the one a reviewer reads to see the caller's tools.
        rules.insert(0, rule);
    }
    rules
}

/// Resources grouped by the methods used on them, so that a URI only read cannot be
/// subscribed to.
fn resource_rules(
    subject: &Subject,
    resources: &BTreeMap<String, BTreeMap<String, Usage>>,
    ids: &mut RuleIds,
) -> Vec<Rule> {
    let mut by_methods: BTreeMap<Vec<String>, BTreeMap<String, Usage>> = BTreeMap::new();
    for (uri, methods) in resources {
        by_methods
            .entry(methods.keys().cloned().collect())
            .or_default()
            .insert(uri.clone(), total_usage(methods.values()));
    }
    by_methods
        .into_iter()
        .map(|(methods, uris)| Rule {
            description: format!(
                "{LEARNED} lets {} use {} on {}.",
                subject.label(),
                methods.join(", "),
                listed(&uris, "time")
            ),
            resources: Some(uris.keys().cloned().collect()),
            methods,
            ..base_rule(
                ids.claim(&["learned", subject.id_part(), "resources"]),
                String::new(),
                subject,
            )
        })
        .collect()
}

/// An allow rule for `subject` with every condition but the caller left out.
fn base_rule(id: String, description: String, subject: &Subject) -> Rule {
    let (principals, roles) = match subject {
        Subject::Role(role) => (None, Some(vec![role.clone()])),
        Subject::Principal(principal) => (Some(vec![principal.clone()]), None),
        Subject::Anyone => (None, None),
    };
    Rule {
        id,
        description,
        effect: Effect::Allow,
        principals,
        roles,
        methods: vec!["*".to_owned()],
        tools: None,
        resources: None,
        prompts: None,
        arguments: None,
        when: BTreeMap::new(),
    }
}

/// "echo (4 calls, first seen ..., last seen ...); get-sum (1 call, ...)".
fn listed(used: &BTreeMap<String, Usage>, unit: &str) -> String {
    used.iter()
        .map(|(name, usage)| format!("{name} ({})", usage.describe(unit)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The rules allowing what was reached at one destination. Protocols with the same ports share
/// a rule; a destination reached on UDP 53 and TCP 443 gets two, so that neither port is
/// opened for the other protocol.
fn egress_rules(
    destination: &Destination,
    by_port: &BTreeMap<(Protocol, u16), Usage>,
    ids: &mut RuleIds,
) -> Vec<EgressRule> {
    let mut per_protocol: BTreeMap<Protocol, (BTreeSet<u16>, Vec<&Usage>)> = BTreeMap::new();
    for ((protocol, port), usage) in by_port {
        let entry = per_protocol.entry(*protocol).or_default();
        entry.0.insert(*port);
        entry.1.push(usage);
    }
    let mut by_ports: BTreeMap<BTreeSet<u16>, (Vec<Protocol>, Vec<&Usage>)> = BTreeMap::new();
    for (protocol, (ports, usages)) in per_protocol {
        let entry = by_ports.entry(ports).or_default();
        entry.0.push(protocol);
        entry.1.extend(usages);
    }
    let split = by_ports.len() > 1;
    let name = destination.to_string();
    by_ports
        .into_iter()
        .map(|(ports, (protocols, usages))| {
            let protocol_names: Vec<&str> = protocols.iter().map(|p| protocol_name(*p)).collect();
            let id = if split {
                ids.claim(&["learned", &name, &protocol_names.join("-")])
            } else {
                ids.claim(&["learned", &name])
            };
            let port_list: Vec<String> = ports.iter().map(u16::to_string).collect();
            let (cidr, host) = match destination {
                Destination::Host(host) => (None, Some(host.clone())),
                Destination::Addr(addr) => (Some(ipnet::IpNet::from(*addr)), None),
            };
            EgressRule {
                id,
                description: Some(format!(
                    "{LEARNED} reached {name} on {} {} ({}).",
                    protocol_names.join("/"),
                    port_list.join(", "),
                    total_usage(usages).describe("time")
                )),
                cidr,
                host,
                ports: ports.into_iter().filter_map(PortRange::single).collect(),
                protocols,
            }
        })
        .collect()
}

pub(super) fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// Hands out rule ids, unique within a server and deterministic: the readable id when it is
/// valid and free, else its valid prefix with a hash of the whole, so that names differing
/// only in characters ids cannot hold (or past the length limit) stay apart.
struct RuleIds {
    taken: BTreeSet<String>,
}

impl RuleIds {
    fn new(taken: impl Iterator<Item = String>) -> Self {
        Self {
            taken: taken.collect(),
        }
    }

    fn claim(&mut self, parts: &[&str]) -> String {
        let wanted = parts.join("-");
        let clean: String = wanted
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let mut id = if clean == wanted && clean.len() <= MAX_ID_LEN {
            clean.clone()
        } else {
            hashed(&clean, &wanted)
        };
        let mut attempt = 1;
        while self.taken.contains(&id) {
            id = hashed(&clean, &format!("{wanted}#{attempt}"));
            attempt += 1;
        }
        self.taken.insert(id.clone());
        id
    }
}

/// `clean` cut to leave room for `-` and 8 hex digits of `whole`'s SHA-256.
fn hashed(clean: &str, whole: &str) -> String {
    let digest = hex::encode(Sha256::digest(whole.as_bytes()));
    let keep = clean.len().min(MAX_ID_LEN - 9);
    format!("{}-{}", &clean[..keep], &digest[..8])
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::learn::observe::tests::observe;
    use crate::policy::{CompiledPolicy, DecisionRequest};

    fn call(ts: &str, principal: &str, roles: &[&str], tool: &str, shapes: Value) -> Value {
        json!({"ts": ts, "kind": "call", "principal": principal, "roles": roles, "server": "s",
            "method": "tools/call", "tool": tool, "decision": "allow", "mode": "learn",
            "argument_shapes": shapes})
    }

    fn method(principal: &str, roles: &[&str], method: &str) -> Value {
        json!({"ts": "2026-02-01T10:00:00Z", "kind": "call", "principal": principal,
            "roles": roles, "server": "s", "method": method, "decision": "allow"})
    }

    fn workflow() -> Vec<Value> {
        vec![
            method("alice", &["dev"], "tools/list"),
            call(
                "2026-02-01T10:00:01Z",
                "alice",
                &["dev"],
                "echo",
                json!({"message": {"type": "string", "length": 300}}),
            ),
            call(
                "2026-02-03T10:00:01Z",
                "alice",
                &["dev"],
                "echo",
                json!({"message": "hi"}),
            ),
            call(
                "2026-02-01T10:00:02Z",
                "alice",
                &["dev"],
                "get-sum",
                json!({"a": 2, "b": 3}),
            ),
            call(
                "2026-02-01T10:00:03Z",
                "alice",
                &["dev"],
                "get-sum",
                json!({"a": 5, "b": -1}),
            ),
            json!({"ts": "2026-02-01T10:00:04Z", "kind": "call", "principal": "alice",
                "roles": ["dev"], "server": "s", "method": "resources/read",
                "tool": "file:///srv/a.txt", "decision": "allow"}),
            call(
                "2026-02-01T10:00:05Z",
                "carol",
                &[],
                "echo",
                json!({"message": "x"}),
            ),
            json!({"ts": "2026-02-01T10:00:06Z", "kind": "egress", "server": "s",
                "addr": "127.0.0.53", "port": 53, "protocol": "udp", "verdict": "would_refuse"}),
            json!({"ts": "2026-02-01T10:00:06Z", "kind": "egress", "server": "s",
                "addr": "127.0.0.53", "port": 53, "protocol": "tcp", "verdict": "would_refuse"}),
            json!({"ts": "2026-02-01T10:00:07Z", "kind": "egress", "server": "s",
                "addr": "93.184.216.34", "port": 443, "protocol": "tcp",
                "verdict": "would_refuse", "host": "example.com"}),
            json!({"ts": "2026-02-01T10:00:08Z", "kind": "egress", "server": "s",
                "addr": "10.1.1.1", "port": 8443, "protocol": "tcp", "verdict": "refuse"}),
        ]
    }

    fn current() -> Policy {
        serde_json::from_value(json!({
            "version": 1,
            "mode": "learn",
            "daemon": {"listen": "127.0.0.1:8080", "principal": "alice"},
            "principals": {"alice": {"roles": ["dev"]}},
            "servers": {
                "s": {"command": ["server-everything"], "write_tools": ["rm*"],
                      "rules": [
                        {"id": "no-rm", "description": "never", "effect": "deny", "tools": ["rm"]},
                        {"id": "all", "description": "all", "effect": "allow"}]},
                "idle": {"url": "http://127.0.0.1:9/mcp", "mode": "shadow"}
            }
        }))
        .unwrap()
    }

    /// Whether `policy` allows `request`: (principal, roles, method, name, arguments).
    fn allows(
        policy: &CompiledPolicy,
        (principal, roles, method, name, arguments): &(&str, &[&str], &str, Option<&str>, Value),
    ) -> bool {
        let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
        let mut request = DecisionRequest::new("s", principal, &roles, method);
        if let Some(name) = name {
            request = request.with_name(name);
        }
        if !arguments.is_null() {
            request = request.with_arguments(arguments);
        }
        policy.decide(&request).is_allowed()
    }

    #[test]
    fn the_suggestion_keeps_the_settings_and_allows_exactly_what_was_used() {
        let current = current();
        let policy = suggest(&observe(&workflow()), Some(&current));
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(policy.daemon, current.daemon);
        let s = &policy.servers["s"];
        assert_eq!(s.command, current.servers["s"].command);
        assert_eq!(s.write_tools, ["rm*"]);
        let ids: Vec<&str> = s.rules.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "no-rm",
                "learned-dev-methods",
                "learned-dev-tools",
                "learned-dev-get-sum",
                "learned-dev-resources",
                "learned-carol-echo"
            ]
        );
        assert_eq!(policy.servers["idle"].mode, None);
        assert!(policy.servers["idle"].rules.is_empty());
        // carol held no role, so her rule names her, and she is declared.
        assert_eq!(policy.principals["carol"].roles, Vec::<String>::new());
        assert!(!policy.principals.contains_key("bob"));

        let compiled = CompiledPolicy::compile(&policy).expect("the suggestion is valid");
        let dev: &[&str] = &["dev"];
        let none: &[&str] = &[];
        let (call, read) = ("tools/call", "resources/read");
        let allowed = [
            ("alice", dev, "tools/list", None, Value::Null),
            (
                "alice",
                dev,
                call,
                Some("echo"),
                json!({"message": "anything"}),
            ),
            ("alice", dev, call, Some("get-sum"), json!({"a": 2, "b": 3})),
            ("alice", dev, read, Some("file:///srv/a.txt"), Value::Null),
            ("carol", none, call, Some("echo"), json!({"message": "x"})),
        ];
        let refused = [
            (
                "alice",
                dev,
                call,
                Some("get-sum"),
                json!({"a": 99, "b": 3}),
            ),
            ("alice", dev, call, Some("get-env"), Value::Null),
            (
                "alice",
                dev,
                "resources/subscribe",
                Some("file:///srv/a.txt"),
                Value::Null,
            ),
            ("alice", dev, "prompts/list", None, Value::Null),
            ("carol", none, call, Some("echo"), json!({"message": "y"})),
            ("carol", none, "tools/list", None, Value::Null),
            ("alice", dev, call, Some("rm"), Value::Null),
        ];
        for request in &allowed {
            assert!(allows(&compiled, request), "refused: {request:?}");
        }
        for request in &refused {
            assert!(!allows(&compiled, request), "allowed: {request:?}");
        }
    }

    /// A completion needs the prompt or template it names to be usable: the suggestion lets
    /// the caller use the ones it completed, and only those, without repeating a rule it
    /// already learned.
    #[test]
    fn completed_prompts_and_templates_stay_completable() {
        let completion = |reference: Value| {
            json!({"ts": "2026-02-01T10:00:00Z", "kind": "call", "principal": "alice",
                "roles": ["dev"], "server": "s", "method": "completion/complete",
                "reference": reference, "decision": "allow", "mode": "learn"})
        };
        let fetched = json!({"ts": "2026-02-01T10:00:01Z", "kind": "call", "principal": "alice",
            "roles": ["dev"], "server": "s", "method": "prompts/get", "tool": "fetched",
            "decision": "allow", "mode": "learn"});
        let lines = [
            completion(json!({"type": "ref/prompt", "name": "only-completed"})),
            completion(json!({"type": "ref/prompt", "name": "fetched"})),
            fetched,
            completion(json!({"type": "ref/resource", "uri": "demo://item/{id}"})),
            completion(json!({"type": "ref/resource", "uri": "demo://item/{id}"})),
        ];
        let policy = suggest(&observe(&lines), Some(&current()));
        let rules = &policy.servers["s"].rules;
        let ids: Vec<&str> = rules.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "no-rm",
                "learned-dev-methods",
                "learned-dev-prompts",
                "learned-dev-completed-prompts",
                "learned-dev-completed-templates"
            ]
        );
        assert_eq!(rules[3].prompts, Some(vec!["only-completed".to_owned()]));
        assert!(
            rules[4]
                .description
                .contains("demo://item/{id} (2 completions"),
            "{}",
            rules[4].description
        );
        let compiled = CompiledPolicy::compile(&policy).expect("the suggestion is valid");
        let dev: &[&str] = &["dev"];
        let (get, read) = ("prompts/get", "resources/read");
        let allowed = [
            ("alice", dev, "completion/complete", None, Value::Null),
            ("alice", dev, get, Some("only-completed"), Value::Null),
            ("alice", dev, get, Some("fetched"), Value::Null),
            ("alice", dev, read, Some("demo://item/{id}"), Value::Null),
        ];
        let refused = [
            ("alice", dev, get, Some("never-completed"), Value::Null),
            ("alice", dev, read, Some("demo://item/7"), Value::Null),
            (
                "alice",
                dev,
                "resources/subscribe",
                Some("demo://item/{id}"),
                Value::Null,
            ),
        ];
        for request in &allowed {
            assert!(allows(&compiled, request), "refused: {request:?}");
        }
        for request in &refused {
            assert!(!allows(&compiled, request), "allowed: {request:?}");
        }
    }

    #[test]
    fn every_learned_rule_says_what_it_allows_and_how_often() {
        let policy = suggest(&observe(&workflow()), Some(&current()));
        let rules = &policy.servers["s"].rules;
        let tools = rules.iter().find(|r| r.id == "learned-dev-tools").unwrap();
        assert_eq!(tools.tools.as_deref(), Some(&["echo".to_owned()][..]));
        assert_eq!(
            tools.description,
            "Learned from the audit log: lets role dev call echo (2 calls, first seen \
             2026-02-01, last seen 2026-02-03)."
        );
        let sum = rules
            .iter()
            .find(|r| r.id == "learned-dev-get-sum")
            .unwrap();
        assert_eq!(
            sum.arguments,
            Some(json!({"type": "object", "properties": {
                "a": {"minimum": 2, "maximum": 5}, "b": {"minimum": -1, "maximum": 3}},
                "required": ["a", "b"]}))
        );
    }

    #[test]
    fn egress_rules_merge_ports_and_keep_host_names() {
        let policy = suggest(&observe(&workflow()), Some(&current()));
        let egress = serde_json::to_value(&policy.servers["s"].egress).unwrap();
        assert_eq!(egress[0]["id"], "learned-example.com");
        assert_eq!(egress[0]["host"], "example.com");
        assert_eq!(egress[0]["ports"], json!([443]));
        assert_eq!(egress[1]["id"], "learned-127.0.0.53");
        assert_eq!(egress[1]["cidr"], "127.0.0.53/32");
        assert_eq!(egress[1]["protocols"], json!(["tcp", "udp"]));
        assert_eq!(
            egress.as_array().unwrap().len(),
            2,
            "a refused connection was not used"
        );
        assert!(
            egress[0]["description"]
                .as_str()
                .unwrap()
                .contains("(1 time, first seen 2026-02-01")
        );
    }

    #[test]
    fn without_a_policy_principals_and_servers_come_from_the_records() {
        let policy = suggest(&observe(&workflow()), None);
        assert_eq!(policy.principals["alice"].roles, ["dev"]);
        assert!(policy.servers["s"].command.is_none());
        let problems = policy.validate();
        assert!(problems.iter().all(|p| !p.is_error()), "{problems:?}");
    }

    #[test]
    fn rule_ids_are_valid_unique_and_deterministic() {
        let mut ids = RuleIds::new(["learned-dev-tools".to_owned()].into_iter());
        let taken = ids.claim(&["learned", "dev", "tools"]);
        assert_ne!(taken, "learned-dev-tools");
        let odd = ids.claim(&["learned", "a@b", "x y"]);
        let other = ids.claim(&["learned", "a:b", "x y"]);
        assert_ne!(odd, other);
        let long = ids.claim(&["learned", &"r".repeat(80), "tool"]);
        for id in [&taken, &odd, &other, &long] {
            assert!(id.len() <= MAX_ID_LEN, "{id}");
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)),
                "{id}"
            );
        }
        let mut again = RuleIds::new(["learned-dev-tools".to_owned()].into_iter());
        assert_eq!(again.claim(&["learned", "dev", "tools"]), taken);
    }
}
