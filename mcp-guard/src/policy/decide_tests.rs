//! Decision tests: every matching dimension, the combining rule (deny overrides allow,
//! default deny), plumbing, visibility, and the indexed evaluator against a plain reference
//! evaluator on generated policies.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{Value, json};

use super::compile::reach;
use super::*;

/// A policy with one server, `fs`, holding `rules`; alice is in support, bob a developer,
/// carol has no role.
fn compiled(rules: Value) -> CompiledPolicy {
    let policy = json!({
        "version": 1,
        "principals": {
            "alice": { "roles": ["support"] },
            "bob": { "roles": ["developer"] },
            "carol": {}
        },
        "servers": { "fs": { "command": ["mcp-fs"], "rules": rules } }
    });
    let loaded = Policy::from_json_str(&policy.to_string(), Path::new("test.json")).unwrap();
    CompiledPolicy::compile(&loaded.policy).unwrap()
}

fn allow(id: &str, rest: Value) -> Value {
    rule(id, "allow", rest)
}

fn deny(id: &str, rest: Value) -> Value {
    rule(id, "deny", rest)
}

fn rule(id: &str, effect: &str, rest: Value) -> Value {
    let mut rule =
        json!({ "id": id, "description": format!("{effect} for the test"), "effect": effect });
    rule.as_object_mut()
        .unwrap()
        .extend(rest.as_object().unwrap().clone());
    rule
}

/// The decision as owned values: effect, rule id, reason text.
type Outcome = (Effect, Option<String>, String);

fn outcome(policy: &CompiledPolicy, request: &DecisionRequest<'_>) -> Outcome {
    let decision = policy.decide(request);
    (
        decision.effect,
        decision.rule.map(str::to_owned),
        decision.reason.to_string(),
    )
}

/// Decides `method` (on `name`, if given) for a configured principal with its own roles.
fn ask(policy: &CompiledPolicy, principal: &str, method: &str, name: Option<&str>) -> Outcome {
    let mut request = DecisionRequest::new("fs", principal, policy.roles_of(principal), method);
    request.name = name;
    outcome(policy, &request)
}

fn call(policy: &CompiledPolicy, principal: &str, tool: &str) -> Outcome {
    ask(policy, principal, "tools/call", Some(tool))
}

fn call_with(policy: &CompiledPolicy, principal: &str, tool: &str, arguments: &Value) -> Outcome {
    let request = DecisionRequest::new("fs", principal, policy.roles_of(principal), "tools/call")
        .with_name(tool)
        .with_arguments(arguments);
    outcome(policy, &request)
}

fn allowed_by(rule: &str) -> impl Fn(&Outcome) -> bool + '_ {
    move |(effect, id, _)| *effect == Effect::Allow && id.as_deref() == Some(rule)
}

fn assert_allowed_by(outcome: Outcome, rule: &str) {
    assert!(allowed_by(rule)(&outcome), "{outcome:?}");
}

fn assert_denied_by(outcome: Outcome, rule: Option<&str>) {
    assert_eq!(
        (outcome.0, outcome.1.as_deref()),
        (Effect::Deny, rule),
        "{outcome:?}"
    );
}

fn visible(policy: &CompiledPolicy, principal: &str, method: &str, name: &str) -> bool {
    let request =
        DecisionRequest::new("fs", principal, policy.roles_of(principal), method).with_name(name);
    policy.visible(&request)
}

// --- the default and the plumbing ---

#[test]
fn without_rules_everything_is_denied_by_default() {
    let policy = compiled(json!([]));
    let outcome = call(&policy, "alice", "write_file");
    assert_denied_by(outcome.clone(), None);
    assert_eq!(
        outcome.2,
        "no rule allows tools/call write_file for principal alice (default deny)"
    );
    let (effect, _, reason) = ask(&policy, "", "tools/list", None);
    assert_eq!(effect, Effect::Deny);
    assert_eq!(
        reason,
        "no rule allows tools/list for an unidentified caller (default deny)"
    );
}

#[test]
fn protocol_plumbing_passes_without_rules() {
    let policy = compiled(json!([]));
    for method in PLUMBING_METHODS {
        let (effect, rule, reason) = ask(&policy, "", method, None);
        assert_eq!((effect, rule), (Effect::Allow, None), "{method}");
        assert_eq!(
            reason,
            format!("{method} is protocol plumbing, which needs no rule")
        );
    }
}

#[test]
fn protocol_plumbing_cannot_be_denied_by_a_rule() {
    let policy = compiled(json!([deny("nothing", json!({ "methods": ["*"] }))]));
    assert_eq!(ask(&policy, "alice", "ping", None).0, Effect::Allow);
    assert_denied_by(ask(&policy, "alice", "tools/list", None), Some("nothing"));
}

#[test]
fn every_other_method_needs_an_allow() {
    let policy = compiled(json!([]));
    for method in [
        "tools/call",
        "tools/list",
        "resources/read",
        "resources/list",
        "resources/templates/list",
        "prompts/get",
        "prompts/list",
        "completion/complete",
        "logging/setLevel",
        "resources/subscribe",
        "sampling/createMessage",
        "elicitation/create",
        "roots/list",
        "vendor/custom",
    ] {
        assert_denied_by(ask(&policy, "alice", method, None), None);
    }
}

#[test]
fn an_unknown_server_is_denied_even_for_plumbing() {
    let policy = compiled(json!([allow("all", json!({}))]));
    for method in ["tools/call", "initialize"] {
        let request = DecisionRequest::new("nope", "alice", &[], method);
        let (effect, rule, reason) = outcome(&policy, &request);
        assert_eq!((effect, rule), (Effect::Deny, None));
        assert_eq!(reason, "the policy has no server `nope`");
        assert!(!policy.visible(&request));
    }
}

// --- matching dimensions ---

#[test]
fn methods_match_exactly_or_by_pattern() {
    let policy = compiled(json!([
        allow("list-tools", json!({ "methods": ["tools/list"] })),
        allow("resources", json!({ "methods": ["resources/*"] })),
    ]));
    let outcome = ask(&policy, "carol", "tools/list", None);
    assert_eq!(
        outcome.2,
        "rule `list-tools` allows tools/list for any caller"
    );
    assert_allowed_by(outcome, "list-tools");
    assert_allowed_by(ask(&policy, "carol", "resources/list", None), "resources");
    assert_allowed_by(
        ask(&policy, "carol", "resources/templates/list", None),
        "resources",
    );
    assert_denied_by(ask(&policy, "carol", "prompts/list", None), None);
    assert_denied_by(ask(&policy, "carol", "tools/call", Some("x")), None);
}

#[test]
fn the_default_methods_are_every_method() {
    let policy = compiled(json!([allow("all", json!({}))]));
    for method in ["tools/list", "vendor/custom", "sampling/createMessage"] {
        assert_allowed_by(ask(&policy, "carol", method, None), "all");
    }
    assert_allowed_by(call(&policy, "carol", "anything"), "all");
}

#[test]
fn tools_match_exactly_or_by_pattern_and_only_for_tools_call() {
    let policy = compiled(json!([allow(
        "reads",
        json!({ "tools": ["read_file", "list_*", "stat?"] })
    )]));
    assert_allowed_by(call(&policy, "carol", "read_file"), "reads");
    assert_allowed_by(call(&policy, "carol", "list_directory"), "reads");
    assert_allowed_by(call(&policy, "carol", "stats"), "reads");
    assert_denied_by(call(&policy, "carol", "stat"), None);
    assert_denied_by(call(&policy, "carol", "write_file"), None);
    // A name list restricts the rule to the methods acting on one such thing.
    assert_denied_by(ask(&policy, "carol", "tools/list", None), None);
    assert_denied_by(
        ask(&policy, "carol", "prompts/get", Some("read_file")),
        None,
    );
    assert_denied_by(ask(&policy, "carol", "tools/call", None), None);
}

#[test]
fn resources_match_by_uri_for_read_and_subscriptions() {
    let policy = compiled(json!([allow(
        "docs",
        json!({ "resources": ["file:///srv/docs/*"] })
    )]));
    for method in [
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
    ] {
        assert_allowed_by(
            ask(&policy, "carol", method, Some("file:///srv/docs/a/b.md")),
            "docs",
        );
    }
    assert_denied_by(
        ask(
            &policy,
            "carol",
            "resources/read",
            Some("file:///etc/passwd"),
        ),
        None,
    );
    assert_denied_by(call(&policy, "carol", "file:///srv/docs/x"), None);
    assert_denied_by(ask(&policy, "carol", "resources/list", None), None);
}

#[test]
fn prompts_match_by_name_for_prompts_get() {
    let policy = compiled(json!([allow("prompts", json!({ "prompts": ["summar*"] }))]));
    assert_allowed_by(
        ask(&policy, "carol", "prompts/get", Some("summarise")),
        "prompts",
    );
    assert_denied_by(
        ask(&policy, "carol", "prompts/get", Some("translate")),
        None,
    );
    assert_denied_by(call(&policy, "carol", "summarise"), None);
}

#[test]
fn methods_and_name_lists_combine() {
    let policy = compiled(json!([allow(
        "subscribe-only",
        json!({ "methods": ["resources/subscribe", "resources/unsubscribe"], "resources": ["*"] })
    )]));
    assert_allowed_by(
        ask(&policy, "carol", "resources/subscribe", Some("file:///a")),
        "subscribe-only",
    );
    assert_denied_by(
        ask(&policy, "carol", "resources/read", Some("file:///a")),
        None,
    );
}

#[test]
fn principals_match_by_name() {
    let policy = compiled(json!([allow("alice", json!({ "principals": ["alice"] }))]));
    let outcome = call(&policy, "alice", "x");
    assert_eq!(
        outcome.2,
        "rule `alice` allows tools/call x for principal alice"
    );
    assert_allowed_by(outcome, "alice");
    assert_denied_by(call(&policy, "bob", "x"), None);
    assert_denied_by(call(&policy, "", "x"), None);
}

#[test]
fn roles_match_the_roles_given_not_the_configured_ones() {
    let policy = compiled(json!([allow("devs", json!({ "roles": ["developer"] }))]));
    let outcome = call(&policy, "bob", "x");
    assert_eq!(
        outcome.2,
        "rule `devs` allows tools/call x for role developer"
    );
    assert_allowed_by(outcome, "devs");
    assert_denied_by(call(&policy, "alice", "x"), None);
    // Roles are an input (later from token claims): carol has none configured.
    let token_roles = vec!["auditor".to_owned(), "developer".to_owned()];
    let request = DecisionRequest::new("fs", "carol", &token_roles, "tools/call").with_name("x");
    assert_allowed_by(outcome_of(&policy, &request), "devs");
    let request = DecisionRequest::new("fs", "bob", &[], "tools/call").with_name("x");
    assert_denied_by(outcome_of(&policy, &request), None);
}

fn outcome_of(policy: &CompiledPolicy, request: &DecisionRequest<'_>) -> Outcome {
    outcome(policy, request)
}

#[test]
fn principals_or_roles_either_is_enough() {
    let policy = compiled(json!([allow(
        "either",
        json!({ "principals": ["carol"], "roles": ["support"] })
    )]));
    assert_eq!(
        call(&policy, "carol", "x").2,
        "rule `either` allows tools/call x for principal carol"
    );
    assert_eq!(
        call(&policy, "alice", "x").2,
        "rule `either` allows tools/call x for role support"
    );
    assert_denied_by(call(&policy, "bob", "x"), None);
}

#[test]
fn when_conditions_need_every_key_with_an_allowed_value() {
    let policy = compiled(json!([allow(
        "triage-reads",
        json!({ "tools": ["read_*"], "when": { "step": ["triage", "fix"], "ticket": ["T-1"] } })
    )]));
    let decide_with = |context: &dyn Context| {
        let request = DecisionRequest::new("fs", "carol", &[], "tools/call")
            .with_name("read_log")
            .with_context(context);
        outcome(&policy, &request).0
    };
    assert_eq!(
        decide_with(&[("step", "fix"), ("ticket", "T-1")]),
        Effect::Allow
    );
    assert_eq!(
        decide_with(&[("step", "deploy"), ("ticket", "T-1")]),
        Effect::Deny
    );
    assert_eq!(decide_with(&[("step", "fix")]), Effect::Deny);
    assert_eq!(decide_with(&NoContext), Effect::Deny);
    let map: HashMap<String, String> = [("step", "triage"), ("ticket", "T-1")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
    assert_eq!(decide_with(&map), Effect::Allow);
    let tree: BTreeMap<String, String> = map.into_iter().collect();
    assert_eq!(decide_with(&tree), Effect::Allow);
}

// --- arguments ---

fn srv_reads() -> Value {
    allow(
        "srv-reads",
        json!({
            "tools": ["read_file"],
            "arguments": {
                "type": "object",
                "properties": { "path": { "type": "string", "pattern": "^/srv/" } },
                "required": ["path"]
            }
        }),
    )
}

#[test]
fn arguments_that_satisfy_the_schema_are_allowed() {
    let policy = compiled(json!([srv_reads()]));
    assert_allowed_by(
        call_with(&policy, "carol", "read_file", &json!({ "path": "/srv/a" })),
        "srv-reads",
    );
}

#[test]
fn arguments_that_break_the_schema_are_refused_naming_the_constraint() {
    let policy = compiled(json!([srv_reads()]));
    let (effect, rule, reason) = call_with(
        &policy,
        "carol",
        "read_file",
        &json!({ "path": "/etc/passwd" }),
    );
    assert_eq!((effect, rule.as_deref()), (Effect::Deny, Some("srv-reads")));
    assert_eq!(
        reason,
        "arguments do not satisfy rule `srv-reads`: /path: \"/etc/passwd\" does not match \"^/srv/\""
    );
    // Absent arguments are judged as {}.
    let (_, _, reason) = call(&policy, "carol", "read_file");
    assert_eq!(
        reason,
        "arguments do not satisfy rule `srv-reads`: \"path\" is a required property"
    );
}

#[test]
fn an_argument_refusal_quotes_long_values_shortened() {
    let policy = compiled(json!([srv_reads()]));
    let long = format!("/etc/{}", "x".repeat(10_000));
    let (_, _, reason) = call_with(&policy, "carol", "read_file", &json!({ "path": long }));
    assert!(reason.len() < 400, "{}", reason.len());
}

#[test]
fn another_allow_rule_makes_an_argument_failure_irrelevant() {
    let policy = compiled(json!([
        srv_reads(),
        allow(
            "support-reads-all",
            json!({ "roles": ["support"], "tools": ["read_*"] })
        ),
    ]));
    let etc = json!({ "path": "/etc/passwd" });
    assert_allowed_by(
        call_with(&policy, "alice", "read_file", &etc),
        "support-reads-all",
    );
    assert_denied_by(
        call_with(&policy, "bob", "read_file", &etc),
        Some("srv-reads"),
    );
}

#[test]
fn an_argument_failure_is_reported_only_when_the_rest_matched() {
    let policy = compiled(json!([allow(
        "support-srv",
        json!({ "roles": ["support"], "tools": ["read_file"], "arguments": { "required": ["path"] } })
    )]));
    // bob is not in support: the default deny, not the arguments, is the reason.
    assert_denied_by(call(&policy, "bob", "read_file"), None);
    assert_denied_by(call(&policy, "alice", "read_file"), Some("support-srv"));
}

#[test]
fn a_deny_rule_with_arguments_denies_only_matching_arguments() {
    let policy = compiled(json!([
        allow("all-tools", json!({ "tools": ["*"] })),
        deny(
            "no-etc-writes",
            json!({
                "tools": ["write_file"],
                "arguments": { "properties": { "path": { "pattern": "^/etc/" } }, "required": ["path"] }
            })
        ),
    ]));
    let etc = json!({ "path": "/etc/shadow" });
    let outcome = call_with(&policy, "carol", "write_file", &etc);
    assert_eq!(
        outcome.2,
        "rule `no-etc-writes` denies tools/call write_file for any caller"
    );
    assert_denied_by(outcome, Some("no-etc-writes"));
    assert_allowed_by(
        call_with(&policy, "carol", "write_file", &json!({ "path": "/tmp/x" })),
        "all-tools",
    );
}

#[test]
fn prompt_arguments_are_judged_too() {
    let policy = compiled(json!([allow(
        "short-topics",
        json!({ "prompts": ["explain"], "arguments": { "properties": { "topic": { "maxLength": 5 } } } })
    )]));
    let judge = |arguments: Value| {
        let request = DecisionRequest::new("fs", "carol", &[], "prompts/get")
            .with_name("explain")
            .with_arguments(&arguments);
        outcome(&policy, &request).0
    };
    assert_eq!(judge(json!({ "topic": "rust" })), Effect::Allow);
    assert_eq!(judge(json!({ "topic": "borrowck" })), Effect::Deny);
}

#[test]
fn formats_in_an_arguments_schema_are_asserted() {
    let policy = compiled(json!([allow(
        "fetch-uris",
        json!({ "tools": ["fetch"], "arguments": { "properties": { "url": { "format": "uri" } } } })
    )]));
    let ok = json!({ "url": "https://example.com/" });
    let bad = json!({ "url": "not a uri" });
    assert_eq!(call_with(&policy, "carol", "fetch", &ok).0, Effect::Allow);
    assert_eq!(call_with(&policy, "carol", "fetch", &bad).0, Effect::Deny);
}

// --- combining ---

#[test]
fn deny_overrides_allow_wherever_it_is_in_the_file() {
    let policy = compiled(json!([
        allow("everything", json!({ "tools": ["*"] })),
        deny(
            "no-deletes",
            json!({ "roles": ["support"], "tools": ["delete_*"] })
        ),
    ]));
    let outcome = call(&policy, "alice", "delete_file");
    assert_eq!(
        outcome.2,
        "rule `no-deletes` denies tools/call delete_file for role support"
    );
    assert_denied_by(outcome, Some("no-deletes"));
    assert_allowed_by(call(&policy, "bob", "delete_file"), "everything");
    assert_allowed_by(call(&policy, "alice", "read_file"), "everything");
}

#[test]
fn the_first_applying_rule_in_file_order_is_named() {
    let policy = compiled(json!([
        allow("specific", json!({ "tools": ["read_file"] })),
        allow("broad", json!({ "methods": ["tools/*"] })),
        deny("deny-1", json!({ "tools": ["rm"] })),
        deny("deny-2", json!({ "tools": ["rm*"] })),
    ]));
    assert_allowed_by(call(&policy, "carol", "read_file"), "specific");
    assert_allowed_by(call(&policy, "carol", "cat"), "broad");
    assert_denied_by(call(&policy, "carol", "rm"), Some("deny-1"));
    assert_denied_by(call(&policy, "carol", "rmdir"), Some("deny-2"));
}

#[test]
fn server_to_client_requests_need_an_allow_too() {
    let policy = compiled(json!([allow(
        "sampling",
        json!({ "methods": ["sampling/createMessage"] })
    )]));
    assert_allowed_by(
        ask(&policy, "carol", "sampling/createMessage", None),
        "sampling",
    );
    assert_denied_by(ask(&policy, "carol", "elicitation/create", None), None);
    assert_denied_by(ask(&policy, "carol", "roots/list", None), None);
}

// --- visibility ---

#[test]
fn a_tool_some_rule_allows_is_visible_and_others_are_not() {
    let policy = compiled(json!([
        allow(
            "reads",
            json!({ "roles": ["support"], "tools": ["read_*"] })
        ),
        allow("list", json!({ "methods": ["tools/list"] })),
    ]));
    assert!(visible(&policy, "alice", "tools/call", "read_file"));
    assert!(!visible(&policy, "alice", "tools/call", "write_file"));
    assert!(!visible(&policy, "bob", "tools/call", "read_file"));
}

#[test]
fn a_tool_allowed_only_with_argument_constraints_is_visible() {
    let policy = compiled(json!([srv_reads()]));
    assert!(visible(&policy, "carol", "tools/call", "read_file"));
}

#[test]
fn a_deny_with_arguments_does_not_hide_but_an_unconditional_deny_does() {
    let policy = compiled(json!([
        allow("all-tools", json!({ "tools": ["*"] })),
        deny(
            "no-etc-writes",
            json!({ "tools": ["write_file"], "arguments": { "required": ["path"] } })
        ),
        deny("no-deletes", json!({ "tools": ["delete_file"] })),
    ]));
    assert!(visible(&policy, "carol", "tools/call", "write_file"));
    assert!(!visible(&policy, "carol", "tools/call", "delete_file"));
    assert!(visible(&policy, "carol", "tools/call", "read_file"));
}

#[test]
fn visibility_covers_resources_and_prompts() {
    let policy = compiled(json!([
        allow("docs", json!({ "resources": ["file:///srv/*"] })),
        allow("prompts", json!({ "prompts": ["summarise"] })),
    ]));
    assert!(visible(
        &policy,
        "carol",
        "resources/read",
        "file:///srv/a.md"
    ));
    assert!(!visible(
        &policy,
        "carol",
        "resources/read",
        "file:///etc/hosts"
    ));
    assert!(visible(&policy, "carol", "prompts/get", "summarise"));
    assert!(!visible(&policy, "carol", "prompts/get", "translate"));
}

#[test]
fn visibility_respects_when_conditions() {
    let policy = compiled(json!([allow(
        "triage",
        json!({ "tools": ["read_log"], "when": { "step": ["triage"] } })
    )]));
    let with_step = |step: &str| {
        let context = [("step", step)];
        let request = DecisionRequest::new("fs", "carol", &[], "tools/call")
            .with_name("read_log")
            .with_context(&context);
        policy.visible(&request)
    };
    assert!(with_step("triage"));
    assert!(!with_step("deploy"));
}

// --- the compiled policy's other answers ---

#[test]
fn server_names_and_roles_come_from_the_policy() {
    let policy = json!({
        "version": 1,
        "principals": { "alice": { "roles": ["support", "oncall"] } },
        "servers": {
            "zeta": { "command": ["z"] },
            "alpha": { "url": "http://127.0.0.1:9/mcp" }
        }
    });
    let policy = Policy::from_json_str(&policy.to_string(), Path::new("t"))
        .unwrap()
        .policy;
    let compiled = CompiledPolicy::compile(&policy).unwrap();
    assert_eq!(
        compiled.server_names().collect::<Vec<_>>(),
        ["alpha", "zeta"]
    );
    assert_eq!(compiled.roles_of("alice"), ["support", "oncall"]);
    assert!(compiled.roles_of("mallory").is_empty());
}

// --- the index against a reference evaluator ---

/// The combining rule written as plainly as possible, straight from the rule model.
fn reference_decision(rules: &[Rule], request: &DecisionRequest<'_>) -> (Effect, Option<String>) {
    let judged: Vec<(&Rule, Option<bool>)> = rules
        .iter()
        .map(|rule| (rule, reference_applies(rule, request)))
        .collect();
    let first = |effect: Effect, arguments_ok: bool| {
        judged
            .iter()
            .find(|(rule, verdict)| rule.effect == effect && *verdict == Some(arguments_ok))
            .map(|(rule, _)| rule.id.clone())
    };
    if let Some(id) = first(Effect::Deny, true) {
        return (Effect::Deny, Some(id));
    }
    if let Some(id) = first(Effect::Allow, true) {
        return (Effect::Allow, Some(id));
    }
    (Effect::Deny, first(Effect::Allow, false))
}

/// Visibility written plainly: some allow rule matches in all but its `arguments`, and no deny
/// rule without `arguments` applies.
fn reference_visible(rules: &[Rule], request: &DecisionRequest<'_>) -> bool {
    let matches = |rule: &Rule| reference_applies(rule, request).is_some();
    let hidden = rules
        .iter()
        .any(|rule| rule.effect == Effect::Deny && rule.arguments.is_none() && matches(rule));
    let usable = rules
        .iter()
        .any(|rule| rule.effect == Effect::Allow && matches(rule));
    usable && !hidden
}

/// `None`: the rule does not apply whatever the arguments; `Some(ok)`: it applies if `ok`.
/// A deny rule with failing arguments counts as not applying.
fn reference_applies(rule: &Rule, request: &DecisionRequest<'_>) -> Option<bool> {
    let caller_ok = (rule.principals.is_none() && rule.roles.is_none())
        || rule
            .principals
            .as_ref()
            .is_some_and(|p| p.iter().any(|p| p == request.principal))
        || rule
            .roles
            .as_ref()
            .is_some_and(|r| r.iter().any(|r| request.roles.contains(r)));
    let method_ok = rule.methods.iter().any(|m| glob_matches(m, request.method));
    let lists = [
        (rule.tools.as_ref(), &["tools/call"][..]),
        (
            rule.resources.as_ref(),
            &[
                "resources/read",
                "resources/subscribe",
                "resources/unsubscribe",
            ][..],
        ),
        (rule.prompts.as_ref(), &["prompts/get"][..]),
    ];
    let named = lists.iter().any(|(list, _)| list.is_some());
    let name_ok = !named
        || lists.iter().any(|(list, methods)| {
            list.is_some_and(|list| {
                methods.contains(&request.method)
                    && request
                        .name
                        .is_some_and(|name| list.iter().any(|p| glob_matches(p, name)))
            })
        });
    let when_ok = rule.when.iter().all(|(key, values)| {
        request
            .context
            .value(key)
            .is_some_and(|v| values.iter().any(|x| x == v))
    });
    let arguments_method_ok =
        rule.arguments.is_none() || ["tools/call", "prompts/get"].contains(&request.method);
    if !(caller_ok && method_ok && name_ok && when_ok && arguments_method_ok) {
        return None;
    }
    let Some(schema) = &rule.arguments else {
        return Some(true);
    };
    let empty = json!({});
    let ok = jsonschema::is_valid(schema, request.arguments.unwrap_or(&empty));
    match (ok, rule.effect) {
        (false, Effect::Deny) => None,
        _ => Some(ok),
    }
}

/// xorshift64*: deterministic, dependency-free choices for generated policies.
struct Choices(u64);

impl Choices {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn some<T: Clone>(&mut self, items: &[T], percent: u64) -> Option<Vec<T>> {
        self.chance(percent).then(|| {
            (0..1 + self.next() % 2)
                .map(|_| self.pick(items).clone())
                .collect()
        })
    }
}

const TOOLS: [&str; 7] = [
    "read_file",
    "read_dir",
    "write_file",
    "delete_file",
    "list_dir",
    "search",
    "日本",
];
const TOOL_PATTERNS: [&str; 8] = [
    "read_*",
    "*_file",
    "*",
    "?ead_file",
    "list_dir",
    "search",
    "*_d*",
    "日?",
];
const URIS: [&str; 3] = [
    "file:///srv/a.txt",
    "file:///srv/b/c.txt",
    "file:///etc/hosts",
];
const URI_PATTERNS: [&str; 4] = ["file:///srv/*", "file:///srv/a.txt", "*", "*.txt"];
const METHOD_PATTERNS: [&str; 8] = [
    "*",
    "tools/*",
    "tools/call",
    "tools/list",
    "resources/*",
    "resources/read",
    "prompts/get",
    "*/list",
];
const METHODS: [&str; 8] = [
    "tools/call",
    "tools/list",
    "resources/read",
    "resources/subscribe",
    "resources/list",
    "prompts/get",
    "prompts/list",
    "completion/complete",
];

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn generated_rule(choices: &mut Choices, index: usize) -> Rule {
    let arguments = choices
        .chance(40)
        .then(|| json!({ "properties": { "n": { "maximum": 5 } } }));
    let mut when = BTreeMap::new();
    if choices.chance(15) {
        when.insert(
            "step".to_owned(),
            strings(&["a", "b"])[..1 + index % 2].to_vec(),
        );
    }
    Rule {
        id: format!("r{index}"),
        description: "generated".to_owned(),
        effect: if choices.chance(10) {
            Effect::Deny
        } else {
            Effect::Allow
        },
        principals: choices.some(&strings(&["alice", "bob", "carol"]), 25),
        roles: choices.some(&strings(&["support", "developer"]), 25),
        methods: choices
            .some(&strings(&METHOD_PATTERNS), 60)
            .unwrap_or_else(|| vec!["*".to_owned()]),
        tools: choices.some(&strings(&TOOL_PATTERNS), 50),
        resources: choices.some(&strings(&URI_PATTERNS), 15),
        prompts: choices.some(&strings(&TOOLS), 10),
        arguments,
        when,
    }
}

fn generated_policy(choices: &mut Choices, rule_count: usize) -> Policy {
    let mut rules = Vec::new();
    while rules.len() < rule_count {
        let rule = generated_rule(choices, rules.len());
        // Rules that can never apply are refused by validation; the generator skips them.
        if !reach(&rule).is_empty() {
            rules.push(rule);
        }
    }
    let text = json!({
        "version": 1,
        "principals": {
            "alice": { "roles": ["support"] },
            "bob": { "roles": ["developer"] },
            "carol": {}
        },
        "servers": { "fs": { "command": ["x"] } }
    });
    let mut policy = Policy::from_json_str(&text.to_string(), Path::new("t"))
        .unwrap()
        .policy;
    policy.servers.get_mut("fs").unwrap().rules = rules;
    policy
}

#[test]
fn the_indexed_evaluator_agrees_with_the_reference_on_generated_policies() {
    let mut choices = Choices(0x9e37_79b9_7f4a_7c15);
    let arguments = [
        json!({ "n": 3 }),
        json!({ "n": 9 }),
        json!({ "n": 7 }),
        json!({}),
    ];
    let contexts: [&[(&str, &str)]; 3] = [&[], &[("step", "a")], &[("step", "b")]];
    // How often each kind of outcome came up, so the test shows it exercised them all.
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for round in 0..20 {
        let policy = generated_policy(&mut choices, 2 + round * 2);
        let rules = &policy.servers["fs"].rules;
        let compiled = CompiledPolicy::compile(&policy).unwrap();
        for _ in 0..600 {
            let principal = *choices.pick(&["alice", "bob", "carol", ""]);
            let method = *choices.pick(&METHODS);
            let name = match method {
                "resources/read" | "resources/subscribe" => Some(*choices.pick(&URIS)),
                "tools/call" | "prompts/get" => Some(*choices.pick(&TOOLS)),
                _ => None,
            };
            let context: &&[(&str, &str)] = choices.pick(&contexts);
            // Roles are an input (a token's claims may give others than the policy's): half
            // the requests carry the configured ones, half a random few, unknown ones too.
            let roles = match choices.some(&strings(&["support", "developer", "auditor"]), 50) {
                Some(roles) => roles,
                None => compiled.roles_of(principal).to_vec(),
            };
            let mut request =
                DecisionRequest::new("fs", principal, &roles, method).with_context(context);
            request.name = name;
            request.arguments = choices.chance(70).then(|| choices.pick(&arguments));
            let decision = compiled.decide(&request);
            let kind = match &decision.reason {
                DecisionReason::Rule {
                    effect: Effect::Allow,
                    ..
                } => "allow",
                DecisionReason::Rule { .. } => "deny by rule",
                DecisionReason::ArgumentsRejected { .. } => "arguments rejected",
                _ => "default deny",
            };
            *seen.entry(kind).or_default() += 1;
            let got = (decision.effect, decision.rule.map(str::to_owned));
            assert_eq!(got, reference_decision(rules, &request), "{request:?}");
            let visible = compiled.visible(&request);
            assert_eq!(visible, reference_visible(rules, &request), "{request:?}");
            *seen
                .entry(if visible { "visible" } else { "hidden" })
                .or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(seen.values().all(|&count| count >= 30), "{seen:?}");
}
