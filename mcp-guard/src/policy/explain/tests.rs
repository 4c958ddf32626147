//! The explanation checked against the evaluator: for the key sentences, the decisions they
//! describe are asked of [`CompiledPolicy`], so that the prose cannot drift from the
//! semantics.

use std::path::Path;

use serde_json::{Value, json};

use super::super::{CompiledPolicy, DecisionRequest, Effect, Policy};
use super::{ExplainFormat, explain};

fn load(policy: Value) -> Policy {
    Policy::from_json_str(&policy.to_string(), Path::new("test.json"))
        .unwrap()
        .policy
}

/// One server `fs` with `rules`; alice is in support, bob a developer.
fn policy_with(rules: Value) -> Policy {
    load(json!({
        "version": 1,
        "principals": {
            "alice": { "roles": ["support"] },
            "bob": { "roles": ["developer"] }
        },
        "servers": { "fs": { "command": ["mcp-fs"], "rules": rules } }
    }))
}

fn markdown(policy: &Policy) -> String {
    explain(policy, ExplainFormat::Markdown)
}

fn assert_says(text: &str, sentence: &str) {
    assert!(text.contains(sentence), "missing {sentence:?} in:\n{text}");
}

/// Decides `tools/call` of `tool` for a configured principal.
fn call(
    policy: &CompiledPolicy,
    principal: &str,
    tool: &str,
    arguments: &Value,
    context: &[(&str, &str)],
) -> (Effect, Option<String>) {
    let request = DecisionRequest::new("fs", principal, policy.roles_of(principal), "tools/call")
        .with_name(tool)
        .with_arguments(arguments)
        .with_context(&context);
    let decision = policy.decide(&request);
    (decision.effect, decision.rule.map(str::to_owned))
}

#[test]
fn an_argument_limit_says_the_field_may_be_absent_and_it_may() {
    let policy = policy_with(json!([{
        "id": "short-echo", "description": "d", "effect": "allow", "roles": ["developer"],
        "tools": ["echo"],
        "arguments": { "type": "object", "properties": { "message": { "type": "string", "maxLength": 5 } } }
    }]));
    assert_says(
        &markdown(&policy),
        "Callers with role `developer` may call the tool `echo`, only if `message` is either \
         absent or is a string and has at most 5 characters [rule `short-echo`].",
    );
    let compiled = CompiledPolicy::compile(&policy).unwrap();
    let allowed = (Effect::Allow, Some("short-echo".to_owned()));
    assert_eq!(call(&compiled, "bob", "echo", &json!({}), &[]), allowed);
    assert_eq!(
        call(
            &compiled,
            "bob",
            "echo",
            &json!({ "message": "12345" }),
            &[]
        ),
        allowed
    );
    assert_eq!(
        call(
            &compiled,
            "bob",
            "echo",
            &json!({ "message": "123456" }),
            &[]
        )
        .0,
        Effect::Deny
    );
    assert_eq!(
        call(&compiled, "alice", "echo", &json!({}), &[]).0,
        Effect::Deny
    );
}

#[test]
fn a_deny_rule_with_an_optional_field_also_refuses_calls_without_it() {
    let policy = policy_with(json!([
        { "id": "all", "description": "d", "effect": "allow", "tools": ["*"] },
        { "id": "no-etc", "description": "d", "effect": "deny", "tools": ["write_file"],
          "arguments": { "properties": { "path": { "type": "string", "pattern": "^/etc/" } } } }
    ]));
    assert_says(
        &markdown(&policy),
        "Nobody may call the tool `write_file`, if `path` is either absent or is a string and \
         contains a match for the regular expression `^/etc/` [rule `no-etc`].",
    );
    let compiled = CompiledPolicy::compile(&policy).unwrap();
    let write = |arguments: Value| call(&compiled, "bob", "write_file", &arguments, &[]);
    let refused = (Effect::Deny, Some("no-etc".to_owned()));
    assert_eq!(write(json!({})), refused);
    assert_eq!(write(json!({ "path": "/etc/x" })), refused);
    assert_eq!(
        write(json!({ "path": "/srv/x" })),
        (Effect::Allow, Some("all".to_owned()))
    );
}

#[test]
fn context_conditions_and_deny_overrides_are_as_described() {
    let policy = policy_with(json!([
        { "id": "write", "description": "d", "effect": "allow", "roles": ["developer"],
          "tools": ["write_file"], "when": { "step": ["edit", "review"] } },
        { "id": "no-move", "description": "d", "effect": "deny", "tools": ["move_file"] },
        { "id": "everything", "description": "d", "effect": "allow", "principals": ["alice"] }
    ]));
    let text = markdown(&policy);
    assert_says(
        &text,
        "Callers with role `developer` may call the tool `write_file`, only while the context \
         value `step` is `edit` or `review` [rule `write`].",
    );
    assert_says(
        &text,
        "Nobody may call the tool `move_file`; what it names is also hidden from list answers \
         [rule `no-move`].",
    );
    assert_says(&text, "Principal `alice` may do anything on this server");
    let compiled = CompiledPolicy::compile(&policy).unwrap();
    let no_arguments = json!({});
    assert_eq!(
        call(
            &compiled,
            "bob",
            "write_file",
            &no_arguments,
            &[("step", "review")]
        )
        .0,
        Effect::Allow
    );
    assert_eq!(
        call(
            &compiled,
            "bob",
            "write_file",
            &no_arguments,
            &[("step", "publish")]
        )
        .0,
        Effect::Deny
    );
    assert_eq!(
        call(&compiled, "bob", "write_file", &no_arguments, &[]).0,
        Effect::Deny
    );
    // "anything" for alice, yet the deny rule wins and hides the tool.
    assert_eq!(
        call(&compiled, "alice", "move_file", &no_arguments, &[]),
        (Effect::Deny, Some("no-move".to_owned()))
    );
    let request = DecisionRequest::new("fs", "alice", compiled.roles_of("alice"), "tools/call")
        .with_name("move_file");
    assert!(!compiled.visible(&request));
}

#[test]
fn a_method_pattern_lists_the_known_methods_it_reaches() {
    let policy = policy_with(json!([
        { "id": "tools", "description": "d", "effect": "allow", "methods": ["tools/*"] }
    ]));
    assert_says(
        &markdown(&policy),
        "Any caller may use any method matching `tools/*` (of the methods mcp-guard knows: \
         `tools/call` and `tools/list`) [rule `tools`].",
    );
    let compiled = CompiledPolicy::compile(&policy).unwrap();
    assert_eq!(
        call(&compiled, "", "anything", &json!({}), &[]).0,
        Effect::Allow
    );
    let list = DecisionRequest::new("fs", "", &[], "tools/list");
    assert!(compiled.decide(&list).is_allowed());
    let read = DecisionRequest::new("fs", "", &[], "resources/read").with_name("file:///x");
    assert!(!compiled.decide(&read).is_allowed());
}

#[test]
fn a_rule_with_names_reaches_only_the_methods_acting_on_them() {
    let policy = policy_with(json!([
        { "id": "docs", "description": "d", "effect": "allow", "roles": ["support"],
          "resources": ["file:///srv/docs/*"], "prompts": ["summarize"] }
    ]));
    assert_says(
        &markdown(&policy),
        "Callers with role `support` may read, subscribe to and unsubscribe from any resource \
         matching `file:///srv/docs/*` and get the prompt `summarize` [rule `docs`].",
    );
    let compiled = CompiledPolicy::compile(&policy).unwrap();
    let roles = compiled.roles_of("alice");
    let list = DecisionRequest::new("fs", "alice", roles, "resources/list");
    assert!(
        !compiled.decide(&list).is_allowed(),
        "listing needs its own rule"
    );
    let subscribe = DecisionRequest::new("fs", "alice", roles, "resources/subscribe")
        .with_name("file:///srv/docs/a.md");
    assert!(compiled.decide(&subscribe).is_allowed());
}

#[test]
fn every_bullet_cites_its_source_and_the_output_is_stable() {
    let policy =
        load(serde_json::from_str(include_str!("../../../../examples/policy.json")).unwrap());
    let text = markdown(&policy);
    assert_eq!(text, markdown(&policy));
    for line in text.lines().filter(|line| line.starts_with("- ")) {
        assert!(
            line.contains(" [") && line.contains("]."),
            "uncited: {line}"
        );
    }
    let plain = explain(&policy, ExplainFormat::Text);
    assert!(!plain.contains('`') || policy_mentions_backticks(&policy));
    assert!(!plain.lines().any(|line| line.starts_with('#')));
}

/// The example's descriptions quote commands in backticks, which the text keeps verbatim.
fn policy_mentions_backticks(policy: &Policy) -> bool {
    policy.servers.values().any(|server| {
        server
            .description
            .as_deref()
            .is_some_and(|d| d.contains('`'))
    })
}

#[test]
fn roles_nobody_holds_are_pointed_out() {
    let policy = policy_with(json!([
        { "id": "audit", "description": "d", "effect": "allow", "roles": ["auditor"],
          "methods": ["tools/list"] }
    ]));
    assert_says(
        &markdown(&policy),
        "Role `auditor` is held by no principal, and no token can grant it, so the rules naming \
         it apply to nobody [`principals`].",
    );
}

#[test]
fn each_audit_durability_says_what_a_crash_of_the_machine_can_lose() {
    let with_audit = |audit: Value| {
        markdown(&load(json!({
            "version": 1,
            "servers": { "fs": { "command": ["mcp-fs"], "rules": [] } },
            "audit": audit
        })))
    };
    assert_says(
        &with_audit(json!({})),
        "Each record is flushed to disk before the operation it records goes on [`audit.fsync`].",
    );
    assert_says(
        &with_audit(json!({ "durable_before": "answer" })),
        "a crash of the machine may lose the decision of a call whose answer was never returned \
         [`audit.durable_before`].",
    );
    assert_says(
        &with_audit(json!({ "durable_before": "interval", "flush_interval_ms": 25 })),
        "flushed to disk at most 25 ms later: a crash of the machine may lose the records of that \
         last interval [`audit.durable_before`].",
    );
    assert_says(
        &with_audit(json!({ "fsync": false })),
        "a crash of the machine may lose the last ones [`audit.fsync`].",
    );
}

#[test]
fn server_credentials_are_named_never_shown() {
    let policy = load(json!({
        "version": 1,
        "servers": { "crm": {
            "url": "https://crm.example.com/mcp",
            "headers": {
                "Authorization": { "value": "Bearer do-not-print", "prefix": "" },
                "X-Api-Key": { "env": "CRM_API_KEY" }
            }
        } }
    }));
    let text = markdown(&policy);
    assert_says(
        &text,
        "Every request to it carries the headers `Authorization` and `X-Api-Key`, which agents never see (values not shown)",
    );
    assert!(!text.contains("do-not-print"), "{text}");
}

#[test]
fn a_protected_resource_says_where_tokens_come_from_and_that_they_are_bound_to_a_server() {
    let mut document = json!({
        "version": 1,
        "identity": { "jwt": {
            "issuers": [{
                "issuer": "https://idp.example", "audiences": ["https://mcp.example/"],
                "keys": { "hs256_secret": "a shared secret of at least thirty-two bytes" },
                "algorithms": ["HS256"],
            }],
            "protected_resource": { "public_url": "https://mcp.example" },
        } },
        "servers": { "fs": { "command": ["mcp-fs"], "rules": [] } }
    });
    assert_says(
        &markdown(&load(document.clone())),
        "OAuth clients are told to get their tokens from `https://idp.example`, each token for \
         one server (`https://mcp.example/servers/NAME/mcp`); a token meant for one server \
         behind `https://mcp.example` is refused at the others \
         [`identity.jwt.protected_resource`].",
    );
    document["identity"]["jwt"]
        .as_object_mut()
        .unwrap()
        .remove("protected_resource");
    assert!(!markdown(&load(document)).contains("OAuth clients"));
}

#[test]
fn trusted_proxies_say_whose_address_a_request_is_taken_to_have() {
    let policy = load(json!({
        "version": 1,
        "daemon": { "listen": "127.0.0.1:8080", "trusted_proxies": ["10.0.0.0/8", "192.0.2.7"] },
        "servers": { "fs": { "command": ["mcp-fs"], "rules": [] } }
    }));
    assert_says(
        &markdown(&policy),
        "A request through `10.0.0.0/8` or `192.0.2.7/32` is taken to come from the address its \
         `Forwarded` or `X-Forwarded-For` names, in the audit log and for the budget of refused tokens \
         [`daemon.trusted_proxies`].",
    );
}
