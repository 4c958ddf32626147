//! The generated policies of `cargo xtask bench policy` and of the test that deciding does not
//! allocate: `rule_count` rules in one server, the worst case for the per-server index, in a
//! mix modelled on a real deployment (see `tests/bin/policy_bench.rs`), and the ways a
//! decision through them can go.

use std::path::Path;

use mcp_guard::policy::{CompiledPolicy, DecisionRequest, Effect, Policy};
use serde_json::{Value, json};

pub const SERVER: &str = "crm";
const TEAMS: usize = 10;
const PRINCIPALS: usize = 50;

/// The policy of `rule_count` generated rules, parsed, validated and compiled.
pub fn compiled(rule_count: usize) -> Result<CompiledPolicy, String> {
    let text = policy_json(rule_count).to_string();
    let loaded =
        Policy::from_json_str(&text, Path::new("<generated>")).map_err(|e| e.to_string())?;
    CompiledPolicy::compile(&loaded.policy).map_err(|e| e.to_string())
}

/// The principal `agent-{k}` holds role `team-{k % TEAMS}`.
fn principal_for_team(team: usize) -> String {
    format!("agent-{team}")
}

/// Rule `i` of the generated policy, by its position in a cycle of twenty.
fn rule(i: usize) -> Value {
    let team = format!("team-{}", i % TEAMS);
    let service = i % 37;
    let (id, description) = (format!("r{i}"), format!("generated rule {i}"));
    let mut rule = match i % 20 {
        0 => {
            json!({ "effect": "deny", "roles": [team], "tools": [format!("svc{service}_danger_{i}")] })
        }
        1 => json!({ "effect": "deny", "tools": [format!("*_admin_{i}")] }),
        2 | 3 => json!({ "effect": "allow", "roles": [team], "tools": [format!("svc{i}_read_*")] }),
        4 => json!({
            "effect": "allow",
            "roles": [team],
            "tools": [format!("svc{service}_write_{i}")],
            "arguments": {
                "type": "object",
                "properties": {
                    "path": { "type": "string", "pattern": "^/srv/", "maxLength": 256 },
                    "mode": { "enum": ["append", "replace"] }
                },
                "required": ["path"]
            }
        }),
        5 => {
            json!({ "effect": "allow", "roles": [team], "methods": ["tools/list", "resources/*"] })
        }
        6 => {
            json!({ "effect": "allow", "roles": [team], "resources": [format!("file:///srv/{i}/*")] })
        }
        7 => json!({
            "effect": "allow",
            "roles": [team],
            "tools": [format!("svc{service}_deploy_{i}")],
            "when": { "step": ["release", "hotfix"] }
        }),
        8 => json!({
            "effect": "allow",
            "principals": [format!("agent-{}", i % PRINCIPALS)],
            "tools": [format!("svc{service}_op_{i}")]
        }),
        _ => {
            json!({ "effect": "allow", "roles": [team], "tools": [format!("svc{service}_op_{i}")] })
        }
    };
    let object = rule.as_object_mut().expect("a rule is an object");
    object.insert("id".into(), id.into());
    object.insert("description".into(), description.into());
    rule
}

pub fn policy_json(rule_count: usize) -> Value {
    let principals: serde_json::Map<String, Value> = (0..PRINCIPALS)
        .map(|k| {
            let roles = json!({ "roles": [format!("team-{}", k % TEAMS)] });
            (format!("agent-{k}"), roles)
        })
        .collect();
    json!({
        "version": 1,
        "principals": principals,
        "servers": {
            SERVER: {
                "url": "http://127.0.0.1:9/mcp",
                "rules": (0..rule_count).map(rule).collect::<Vec<_>>()
            }
        }
    })
}

/// One operation to decide, owning what a [`DecisionRequest`] borrows.
pub struct Operation {
    principal: String,
    roles: Vec<String>,
    method: &'static str,
    pub name: String,
    arguments: Option<Value>,
    context: Vec<(String, String)>,
}

impl Operation {
    /// A `tools/call` of `name` by the team's principal, without context.
    fn for_team(team: usize, name: String, arguments: Option<Value>) -> Self {
        let principal = principal_for_team(team);
        Operation {
            roles: vec![format!("team-{team}")],
            principal,
            method: "tools/call",
            name,
            arguments,
            context: Vec::new(),
        }
    }

    fn with_method(self, method: &'static str) -> Self {
        Operation { method, ..self }
    }

    fn with_context(mut self, key: &str, value: &str) -> Self {
        self.context.push((key.into(), value.into()));
        self
    }

    pub fn request(&self) -> DecisionRequest<'_> {
        let request = DecisionRequest::new(SERVER, &self.principal, &self.roles, self.method)
            .with_name(&self.name)
            .with_context(&self.context);
        match &self.arguments {
            Some(arguments) => request.with_arguments(arguments),
            None => request,
        }
    }
}

/// A way a decision can go, with the operations that go that way.
pub struct DecisionPath {
    pub label: &'static str,
    pub expected: Effect,
    pub operations: Vec<Operation>,
}

impl DecisionPath {
    pub fn requests(&self) -> Vec<DecisionRequest<'_>> {
        self.operations.iter().map(Operation::request).collect()
    }

    /// Whether every operation of the path is decided as the path claims, or the first that
    /// is not.
    pub fn check(&self, policy: &CompiledPolicy) -> Result<(), String> {
        for operation in &self.operations {
            let decision = policy.decide(&operation.request());
            if decision.effect != self.expected {
                return Err(format!(
                    "{}: {} was decided {:?}: {}",
                    self.label, operation.name, decision.effect, decision.reason
                ));
            }
        }
        Ok(())
    }
}

/// Up to this many operations per path, rotated through while timing.
const OPERATIONS_PER_PATH: usize = 64;

pub fn decision_paths(rule_count: usize) -> Vec<DecisionPath> {
    let rules_where = |kind: &[usize]| {
        (0..rule_count)
            .filter(|i| kind.contains(&(i % 20)))
            .take(OPERATIONS_PER_PATH)
            .collect::<Vec<_>>()
    };
    let path = |label, expected, operations| DecisionPath {
        label,
        expected,
        operations,
    };
    let arguments = json!({ "path": "/srv/reports/q3.csv", "mode": "append" });
    // Calls of the tools whose rules hold a `when` condition, during workflow step `step`.
    let deploys_during = |step: &str| {
        rules_where(&[7])
            .into_iter()
            .map(|i| {
                let name = format!("svc{}_deploy_{i}", i % 37);
                Operation::for_team(i % TEAMS, name, None).with_context("step", step)
            })
            .collect()
    };
    vec![
        path(
            "allow: exact tool",
            Effect::Allow,
            rules_where(&[9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
                .into_iter()
                .map(|i| Operation::for_team(i % TEAMS, format!("svc{}_op_{i}", i % 37), None))
                .collect(),
        ),
        path(
            "allow: tool pattern",
            Effect::Allow,
            rules_where(&[2, 3])
                .into_iter()
                .map(|i| Operation::for_team(i % TEAMS, format!("svc{i}_read_accounts"), None))
                .collect(),
        ),
        path(
            "allow: arguments schema",
            Effect::Allow,
            rules_where(&[4])
                .into_iter()
                .map(|i| {
                    let name = format!("svc{}_write_{i}", i % 37);
                    Operation::for_team(i % TEAMS, name, Some(arguments.clone()))
                })
                .collect(),
        ),
        path(
            "allow: resources/read",
            Effect::Allow,
            rules_where(&[6])
                .into_iter()
                .map(|i| {
                    let uri = format!("file:///srv/{i}/report.txt");
                    Operation::for_team(i % TEAMS, uri, None).with_method("resources/read")
                })
                .collect(),
        ),
        path(
            "allow: when condition",
            Effect::Allow,
            deploys_during("release"),
        ),
        path("deny: when unmet", Effect::Deny, deploys_during("review")),
        path(
            "deny: deny rule",
            Effect::Deny,
            rules_where(&[0])
                .into_iter()
                .map(|i| Operation::for_team(i % TEAMS, format!("svc{}_danger_{i}", i % 37), None))
                .collect(),
        ),
        path(
            "deny: no rule (default)",
            Effect::Deny,
            (0..OPERATIONS_PER_PATH)
                .map(|k| Operation::for_team(k % TEAMS, format!("svc{}_unknown_{k}", k % 37), None))
                .collect(),
        ),
    ]
}
