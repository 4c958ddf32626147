//! Whole-policy tests: loading, parse errors with their JSON paths, every validation problem
//! with its exact path, and the published schema.

use std::path::Path;

use serde_json::{Value, json};

use super::*;
use crate::test_support::replace_file;

const EXAMPLE: &str = include_str!("../../../examples/policy.json");

fn load_value(value: Value) -> Result<LoadedPolicy, PolicyError> {
    Policy::from_json_str(&value.to_string(), Path::new("test.json"))
}

/// A valid policy with one server, to be broken one field at a time.
fn valid() -> Value {
    json!({
        "version": 1,
        "servers": {
            "fetch": {
                "command": ["node", "server.js"],
                "egress": [
                    { "id": "dns", "cidr": "127.0.0.53/32", "ports": [53], "protocols": ["udp", "tcp"] },
                    { "id": "api", "host": "api.example.com", "ports": [443, "8000-8100"] }
                ]
            }
        }
    })
}

fn problems_of(value: Value) -> Vec<Problem> {
    match load_value(value) {
        Err(PolicyError::Invalid { problems, .. }) => problems,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// The single problem a policy has; fails the test if it has more or fewer.
fn only_problem(value: Value) -> Problem {
    let problems = problems_of(value);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    problems.into_iter().next().unwrap()
}

fn assert_error_at(value: Value, path: &str, message_part: &str) {
    let problem = only_problem(value);
    assert_eq!(problem.severity, Severity::Error, "{problem}");
    assert_eq!(problem.path, path, "{problem}");
    assert!(problem.message.contains(message_part), "{problem}");
}

/// (json_path, message) of a parse error.
fn parse_failure(value: Value) -> (String, String) {
    parse_failure_of_text(&value.to_string())
}

fn parse_failure_of_text(text: &str) -> (String, String) {
    match Policy::from_json_str(text, Path::new("test.json")) {
        Err(PolicyError::Parse {
            json_path, message, ..
        }) => (json_path, message),
        other => panic!("expected Parse, got {other:?}"),
    }
}

fn fetch_rule(policy: &mut Value, index: usize) -> &mut Value {
    &mut policy["servers"]["fetch"]["egress"][index]
}

/// [`valid`] with principals and MCP rules, to be broken one field at a time.
fn valid_with_rules() -> Value {
    let mut policy = valid();
    policy["principals"] = json!({
        "alice@example.com": { "roles": ["support"], "description": "Support engineer" },
        "ci-bot": {}
    });
    policy["servers"]["fetch"]["rules"] = json!([
        {
            "id": "list",
            "description": "Anyone may list the tools.",
            "effect": "allow",
            "methods": ["tools/list"]
        },
        {
            "id": "reads",
            "description": "Support and the CI bot may read.",
            "effect": "allow",
            "principals": ["ci-bot"],
            "roles": ["support"],
            "tools": ["read_*"],
            "arguments": { "type": "object", "properties": { "path": { "type": "string" } } },
            "when": { "step": ["triage", "fix"] }
        }
    ]);
    policy
}

fn mcp_rule(policy: &mut Value, index: usize) -> &mut Value {
    &mut policy["servers"]["fetch"]["rules"][index]
}

fn only_warning(value: Value) -> Problem {
    let warnings = load_value(value).unwrap().warnings;
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    warnings.into_iter().next().unwrap()
}

// --- valid policies ---

#[test]
fn the_example_policy_loads_without_problems() {
    let loaded = Policy::from_json_str(EXAMPLE, Path::new("examples/policy.json")).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let policy = loaded.policy;
    assert_eq!(
        policy.daemon.metrics_listen,
        Some("127.0.0.1:9464".parse().unwrap())
    );
    assert_eq!(
        policy.daemon.control_socket,
        Path::new("/run/mcp-guard/control.sock")
    );
    assert!(policy.servers["time"].egress.is_empty());
    let everything = &policy.servers["everything"];
    assert_eq!(
        everything.command.as_deref().unwrap(),
        [
            "node",
            "target/mcp-peers/node_modules/@modelcontextprotocol/server-everything/dist/index.js",
            "stdio"
        ]
    );
    // Nothing declared: whatever the server tries to reach is refused by the kernel.
    assert!(everything.egress.is_empty());
    assert!(everything.rules.iter().any(|r| r.id == "short-echo"));
}

#[test]
fn the_example_policy_declares_principals_and_rules() {
    let policy = Policy::from_json_str(EXAMPLE, Path::new("examples/policy.json"))
        .unwrap()
        .policy;
    assert_eq!(
        policy.daemon.listen,
        Some("127.0.0.1:8080".parse().unwrap())
    );
    assert_eq!(policy.daemon.principal.as_deref(), Some("local-dev"));
    assert_eq!(policy.principals["local-dev"].roles, ["developer"]);
    let ids: Vec<&str> = policy.servers["everything"]
        .rules
        .iter()
        .map(|rule| rule.id.as_str())
        .collect();
    assert_eq!(ids, ["list-tools", "short-echo", "sum", "no-environment"]);
    assert!(CompiledPolicy::compile(&policy).is_ok());
}

#[test]
fn the_example_policy_loads_from_its_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policy.json");
    assert!(Policy::load(&path).is_ok());
}

#[test]
fn a_valid_policy_loads_with_typed_accessors() {
    let loaded = load_value(valid()).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let rules = &loaded.policy.servers["fetch"].egress;

    let dns = &rules[0];
    assert_eq!(
        dns.destination(),
        Some(Destination::Cidr("127.0.0.53/32".parse().unwrap()))
    );
    assert_eq!(dns.protocols, [Protocol::Udp, Protocol::Tcp]);

    let api = &rules[1];
    let ranges: Vec<_> = api.port_ranges().iter().map(PortRange::range).collect();
    assert_eq!(ranges, [443..=443, 8000..=8100]);
    assert!(api.allows_port(8050) && !api.allows_port(80));
    // Protocols default to TCP only.
    assert_eq!(api.protocols, [Protocol::Tcp]);
    assert!(!api.allows_protocol(Protocol::Udp));
}

#[test]
fn daemon_settings_default_when_absent() {
    let policy = load_value(json!({ "version": 1 })).unwrap().policy;
    assert_eq!(policy.daemon, DaemonSettings::default());
    assert_eq!(policy.daemon.bpffs, Path::new("/sys/fs/bpf/mcp-guard"));
    assert_eq!(
        policy.daemon.control_socket,
        Path::new("/run/mcp-guard/control.sock")
    );
    assert_eq!(policy.daemon.metrics_listen, None);
    assert_eq!(policy.daemon.cgroup_root, None);
    assert_eq!(
        (
            policy.daemon.dns_min_ttl_seconds,
            policy.daemon.dns_max_ttl_seconds
        ),
        (5, 300)
    );
    assert!(policy.servers.is_empty());
    assert!(policy.principals.is_empty());
    assert_eq!(policy.daemon.principal, None);
    assert_eq!(
        (
            policy.daemon.max_message_bytes,
            policy.daemon.max_batch_size,
            policy.daemon.max_json_depth
        ),
        (4 * 1024 * 1024, 64, 64)
    );
}

#[test]
fn a_policy_with_rules_loads_with_defaults_filled_in() {
    let loaded = load_value(valid_with_rules()).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let policy = loaded.policy;
    assert_eq!(
        policy.principals["alice@example.com"]
            .description
            .as_deref(),
        Some("Support engineer")
    );
    assert!(policy.principals["ci-bot"].roles.is_empty());
    let server = &policy.servers["fetch"];
    assert_eq!(server.isolation, Isolation::PerSession);
    let reads = &server.rules[1];
    assert_eq!(reads.effect, Effect::Allow);
    assert_eq!(reads.methods, ["*"]);
    assert_eq!(reads.tools.as_deref().unwrap(), ["read_*"]);
    assert_eq!(reads.when["step"], ["triage", "fix"]);
    assert!(reads.resources.is_none() && reads.prompts.is_none());
}

#[test]
fn a_bare_address_becomes_a_host_prefix() {
    let mut policy = valid();
    fetch_rule(&mut policy, 0)["cidr"] = json!("127.0.0.53");
    fetch_rule(&mut policy, 1)["cidr"] = json!("2001:db8::1");
    fetch_rule(&mut policy, 1)
        .as_object_mut()
        .unwrap()
        .remove("host");
    let loaded = load_value(policy).unwrap();
    let rules = &loaded.policy.servers["fetch"].egress;
    assert_eq!(rules[0].cidr.unwrap().to_string(), "127.0.0.53/32");
    assert_eq!(rules[1].cidr.unwrap().to_string(), "2001:db8::1/128");
}

#[test]
fn a_loaded_policy_serialises_back_to_an_equal_policy() {
    let policy = Policy::from_json_str(EXAMPLE, Path::new("example"))
        .unwrap()
        .policy;
    let text = serde_json::to_string(&policy).unwrap();
    let again = Policy::from_json_str(&text, Path::new("again"))
        .unwrap()
        .policy;
    assert_eq!(policy, again);
}

#[test]
fn a_policy_with_rules_serialises_back_to_an_equal_policy() {
    let mut value = valid_with_rules();
    value["servers"]["fetch"]["isolation"] = json!("shared");
    let policy = load_value(value).unwrap().policy;
    let text = serde_json::to_string(&policy).unwrap();
    assert_eq!(
        load_value(serde_json::from_str(&text).unwrap())
            .unwrap()
            .policy,
        policy
    );
}

// --- parse errors carry the JSON path ---

#[test]
fn an_unknown_field_is_refused_with_its_path() {
    let mut policy = valid();
    fetch_rule(&mut policy, 1)["port"] = json!(443);
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "servers.fetch.egress[1].port");
    assert!(message.starts_with("unknown field `port`"), "{message}");
}

#[test]
fn an_unknown_top_level_field_is_refused() {
    let mut policy = valid();
    policy["rules"] = json!([]);
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "rules");
    assert!(message.starts_with("unknown field `rules`"), "{message}");
}

#[test]
fn an_unknown_daemon_field_is_refused() {
    let mut policy = valid();
    policy["daemon"] = json!({ "metrics": "127.0.0.1:9464" });
    let (path, _) = parse_failure(policy);
    assert_eq!(path, "daemon.metrics");
}

#[test]
fn a_bad_port_is_refused_with_its_path() {
    let mut policy = valid();
    fetch_rule(&mut policy, 1)["ports"] = json!([443, "9000-8000"]);
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "servers.fetch.egress[1].ports[1]");
    assert!(message.contains("is empty"), "{message}");

    let mut policy = valid();
    fetch_rule(&mut policy, 1)["ports"] = json!([0]);
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "servers.fetch.egress[1].ports[0]");
    assert!(message.contains("out of range"), "{message}");
}

#[test]
fn a_wrong_type_is_refused_with_its_path() {
    let mut policy = valid();
    fetch_rule(&mut policy, 1)["ports"] = json!([true]);
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "servers.fetch.egress[1].ports[0]");
    assert!(
        message.starts_with("invalid type: boolean `true`, expected a port number"),
        "{message}"
    );
}

#[test]
fn an_unknown_protocol_is_refused_with_its_path() {
    let mut policy = valid();
    fetch_rule(&mut policy, 0)["protocols"] = json!(["udp", "icmp"]);
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "servers.fetch.egress[0].protocols[1]");
    assert!(message.contains("unknown variant `icmp`"), "{message}");
}

#[test]
fn host_bits_in_a_cidr_are_refused_with_its_path() {
    let mut policy = valid();
    fetch_rule(&mut policy, 0)["cidr"] = json!("10.0.0.1/8");
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "servers.fetch.egress[0].cidr");
    assert_eq!(
        message,
        "\"10.0.0.1/8\" has host bits set: write 10.0.0.0/8 for the whole network, \
         or 10.0.0.1/32 for that one address"
    );
}

#[test]
fn a_missing_required_field_names_its_parent() {
    let mut policy = valid();
    fetch_rule(&mut policy, 1)
        .as_object_mut()
        .unwrap()
        .remove("ports");
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "servers.fetch.egress[1]");
    assert_eq!(message, "missing field `ports`");
}

#[test]
fn a_missing_version_is_refused() {
    let (path, message) = parse_failure(json!({ "servers": {} }));
    assert_eq!(path, "");
    assert_eq!(message, "missing field `version`");
}

#[test]
fn a_parse_error_reports_line_and_column() {
    let text = "{\n  \"version\": 1,\n  \"servers\": { \"x\": { \"egres\": [] } }\n}";
    let error = Policy::from_json_str(text, Path::new("p.json")).unwrap_err();
    let PolicyError::Parse { line, .. } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(*line, 3);
    let shown = error.to_string();
    assert!(
        shown.starts_with("p.json:3:")
            && shown.contains(": servers.x.egres: unknown field `egres`"),
        "{shown}"
    );
}

#[test]
fn text_that_is_not_json_is_refused() {
    let (path, message) = parse_failure_of_text("{ \"version\": 1,");
    assert_eq!(path, "");
    assert!(message.contains("EOF"), "{message}");
}

#[test]
fn a_syntax_error_inside_an_object_names_that_object() {
    let (path, message) = parse_failure_of_text(
        "{ \"version\": 1, \"servers\": { \"fetch\": { \"command\": [\"x\"], } } }",
    );
    assert_eq!(path, "servers.fetch");
    assert!(message.starts_with("trailing comma"), "{message}");
}

#[test]
fn trailing_text_is_refused() {
    let (_, message) = parse_failure_of_text("{ \"version\": 1 } {}");
    assert!(message.contains("trailing characters"), "{message}");
}

#[test]
fn a_missing_file_is_an_io_error_naming_it() {
    let error = Policy::load(Path::new("/nonexistent/policy.json")).unwrap_err();
    assert!(matches!(error, PolicyError::Io { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with("/nonexistent/policy.json: cannot read policy")
    );
}

#[test]
fn an_unknown_rule_field_is_refused_with_its_path() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 1)["tool"] = json!(["x"]);
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "servers.fetch.rules[1].tool");
    assert!(message.starts_with("unknown field `tool`"), "{message}");
}

#[test]
fn a_rule_without_description_is_refused() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 0)
        .as_object_mut()
        .unwrap()
        .remove("description");
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "servers.fetch.rules[0]");
    assert_eq!(message, "missing field `description`");
}

#[test]
fn an_unknown_effect_is_refused() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 0)["effect"] = json!("permit");
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "servers.fetch.rules[0].effect");
    assert!(message.contains("unknown variant `permit`"), "{message}");
}

#[test]
fn an_unknown_isolation_is_refused() {
    let mut policy = valid_with_rules();
    policy["servers"]["fetch"]["isolation"] = json!("per_call");
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "servers.fetch.isolation");
    assert!(message.contains("unknown variant `per_call`"), "{message}");
}

#[test]
fn an_unknown_principal_field_is_refused() {
    let mut policy = valid_with_rules();
    policy["principals"]["ci-bot"]["role"] = json!("x");
    let (path, _) = parse_failure(policy);
    assert_eq!(path, "principals.ci-bot.role");
}

// --- semantic validation: each problem, with its exact path ---

#[test]
fn another_version_is_refused_before_its_fields_are_read() {
    let mut policy = valid();
    policy["version"] = json!(2);
    policy["rules"] = json!([]); // a field from the future must not hide the real reason
    assert_error_at(policy, "version", "unsupported policy version 2");
}

#[test]
fn validate_reports_a_wrong_version_on_a_built_policy() {
    let mut policy = load_value(valid()).unwrap().policy;
    policy.version = 0;
    let problems = policy.validate();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].path, "version");
}

#[test]
fn a_bad_server_name_is_refused() {
    let mut policy = valid();
    let server = policy["servers"]["fetch"].take();
    policy["servers"] = json!({ "bad name": server });
    assert_error_at(
        policy,
        "servers.bad name",
        "invalid server name \"bad name\"",
    );
}

#[test]
fn a_bad_rule_id_is_refused() {
    let mut policy = valid();
    fetch_rule(&mut policy, 1)["id"] = json!("api/v1");
    assert_error_at(
        policy,
        "servers.fetch.egress[1].id",
        "invalid rule id \"api/v1\"",
    );
}

#[test]
fn a_duplicate_rule_id_is_refused_at_the_second_use() {
    let mut policy = valid();
    fetch_rule(&mut policy, 1)["id"] = json!("dns");
    assert_error_at(
        policy,
        "servers.fetch.egress[1].id",
        "duplicate rule id \"dns\": also used by egress[0]",
    );
}

#[test]
fn the_same_rule_id_in_two_servers_is_fine() {
    let mut policy = valid();
    let copy = policy["servers"]["fetch"].clone();
    policy["servers"]["other"] = copy;
    assert!(load_value(policy).is_ok());
}

#[test]
fn a_rule_with_both_cidr_and_host_is_refused() {
    let mut policy = valid();
    fetch_rule(&mut policy, 1)["cidr"] = json!("192.0.2.0/24");
    assert_error_at(policy, "servers.fetch.egress[1]", "not both");
}

#[test]
fn a_rule_with_neither_cidr_nor_host_is_refused() {
    let mut policy = valid();
    fetch_rule(&mut policy, 1)
        .as_object_mut()
        .unwrap()
        .remove("host");
    assert_error_at(policy, "servers.fetch.egress[1]", "no destination");
}

#[test]
fn an_ipv4_mapped_cidr_is_refused() {
    let mut policy = valid();
    fetch_rule(&mut policy, 0)["cidr"] = json!("::ffff:127.0.0.0/104");
    assert_error_at(
        policy,
        "servers.fetch.egress[0].cidr",
        "write it as IPv4 (e.g. 127.0.0.0/8)",
    );
}

#[test]
fn a_malformed_host_is_refused() {
    let mut policy = valid();
    fetch_rule(&mut policy, 1)["host"] = json!("https://api.example.com");
    assert_error_at(
        policy,
        "servers.fetch.egress[1].host",
        "without scheme, port or path",
    );
}

#[test]
fn an_empty_port_list_is_refused() {
    let mut policy = valid();
    fetch_rule(&mut policy, 1)["ports"] = json!([]);
    assert_error_at(policy, "servers.fetch.egress[1].ports", "at least one port");
}

#[test]
fn an_empty_protocol_list_is_refused() {
    let mut policy = valid();
    fetch_rule(&mut policy, 1)["protocols"] = json!([]);
    assert_error_at(
        policy,
        "servers.fetch.egress[1].protocols",
        "at least one protocol",
    );
}

#[test]
fn a_duplicate_protocol_is_refused() {
    let mut policy = valid();
    fetch_rule(&mut policy, 0)["protocols"] = json!(["udp", "tcp", "udp"]);
    assert_error_at(
        policy,
        "servers.fetch.egress[0].protocols[2]",
        "duplicate protocol \"udp\"",
    );
}

#[test]
fn command_and_adopt_cgroup_together_are_refused() {
    let mut policy = valid();
    policy["servers"]["fetch"]["adopt_cgroup"] = json!("/sys/fs/cgroup/system.slice/x.service");
    assert_error_at(policy, "servers.fetch", "not both");
}

#[test]
fn an_empty_command_is_refused() {
    let mut policy = valid();
    policy["servers"]["fetch"]["command"] = json!([]);
    assert_error_at(policy, "servers.fetch.command", "must name a program");
}

#[test]
fn a_relative_adopt_cgroup_is_refused() {
    let mut policy = valid();
    let server = &mut policy["servers"]["fetch"];
    server.as_object_mut().unwrap().remove("command");
    server["url"] = json!("http://127.0.0.1:3001/mcp");
    server["adopt_cgroup"] = json!("system.slice/x.service");
    assert_error_at(
        policy,
        "servers.fetch.adopt_cgroup",
        "must be an absolute path",
    );
}

#[test]
fn an_adopted_server_loads() {
    let mut policy = valid();
    let server = &mut policy["servers"]["fetch"];
    server.as_object_mut().unwrap().remove("command");
    server["adopt_cgroup"] = json!("/sys/fs/cgroup/system.slice/x.service");
    server["url"] = json!("http://127.0.0.1:3001/mcp");
    let loaded = load_value(policy).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn a_bad_environment_variable_name_is_refused() {
    let mut policy = valid();
    policy["servers"]["fetch"]["env"] = json!({ "A=B": "1", "OK": "yes" });
    assert_error_at(
        policy,
        "servers.fetch.env.A=B",
        "invalid environment variable name",
    );
}

#[test]
fn relative_daemon_paths_are_refused() {
    let mut policy = valid();
    policy["daemon"] = json!({ "control_socket": "control.sock" });
    assert_error_at(policy, "daemon.control_socket", "must be an absolute path");
}

#[test]
fn dns_min_ttl_above_max_is_refused() {
    let mut policy = valid();
    policy["daemon"] = json!({ "dns_min_ttl_seconds": 600, "dns_max_ttl_seconds": 300 });
    assert_error_at(
        policy,
        "daemon.dns_min_ttl_seconds",
        "600 exceeds dns_max_ttl_seconds (300)",
    );
}

#[test]
fn a_zero_dns_min_ttl_is_refused() {
    let mut policy = valid();
    policy["daemon"] = json!({ "dns_min_ttl_seconds": 0 });
    assert_error_at(policy, "daemon.dns_min_ttl_seconds", "at least 1");
}

#[test]
fn metrics_on_the_mcp_listen_address_is_refused() {
    let mut policy = valid();
    policy["daemon"] = json!({ "listen": "127.0.0.1:8080", "metrics_listen": "127.0.0.1:8080" });
    assert_error_at(policy, "daemon.metrics_listen", "same address");
}

#[test]
fn a_duplicate_mcp_rule_id_is_refused_at_the_second_use() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 1)["id"] = json!("list");
    assert_error_at(
        policy,
        "servers.fetch.rules[1].id",
        "duplicate rule id \"list\": also used by rules[0]",
    );
}

#[test]
fn an_egress_rule_and_an_mcp_rule_may_share_an_id() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 0)["id"] = json!("dns");
    assert!(load_value(policy).is_ok());
}

#[test]
fn a_bad_mcp_rule_id_is_refused() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 0)["id"] = json!("list tools");
    assert_error_at(
        policy,
        "servers.fetch.rules[0].id",
        "invalid rule id \"list tools\"",
    );
}

#[test]
fn a_blank_rule_description_is_refused() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 0)["description"] = json!("  ");
    assert_error_at(
        policy,
        "servers.fetch.rules[0].description",
        "say what the rule is for",
    );
}

#[test]
fn an_unknown_principal_in_a_rule_is_refused() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 1)["principals"] = json!(["ci-bot", "carol"]);
    assert_error_at(
        policy,
        "servers.fetch.rules[1].principals[1]",
        "unknown principal \"carol\": declare it under `principals`",
    );
}

#[test]
fn an_unknown_daemon_principal_is_refused() {
    let mut policy = valid_with_rules();
    policy["daemon"] = json!({ "listen": "127.0.0.1:8080", "principal": "carol" });
    assert_error_at(policy, "daemon.principal", "unknown principal \"carol\"");
}

#[test]
fn a_daemon_principal_without_listen_is_a_warning() {
    let mut policy = valid_with_rules();
    policy["daemon"] = json!({ "principal": "ci-bot" });
    let warning = only_warning(policy);
    assert_eq!(warning.path, "daemon.principal");
    assert!(warning.message.contains("daemon.listen"), "{warning}");
}

#[test]
fn an_unknown_server_principal_is_refused() {
    let mut policy = valid_with_rules();
    policy["servers"]["fetch"]["principal"] = json!("carol");
    assert_error_at(
        policy,
        "servers.fetch.principal",
        "unknown principal \"carol\"",
    );
}

#[test]
fn a_known_server_principal_is_accepted() {
    let mut policy = valid_with_rules();
    policy["servers"]["fetch"]["principal"] = json!("alice@example.com");
    assert!(load_value(policy).unwrap().warnings.is_empty());
}

#[test]
fn a_bad_principal_name_is_refused() {
    let mut policy = valid_with_rules();
    policy["principals"]["bad name"] = json!({});
    assert_error_at(
        policy,
        "principals.bad name",
        "invalid principal name \"bad name\"",
    );
}

#[test]
fn bad_and_duplicate_roles_are_refused() {
    let mut policy = valid_with_rules();
    policy["principals"]["ci-bot"]["roles"] = json!(["ci", "ci"]);
    assert_error_at(
        policy,
        "principals.ci-bot.roles[1]",
        "duplicate role \"ci\"",
    );

    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 1)["roles"] = json!(["support", "on call"]);
    assert_error_at(
        policy,
        "servers.fetch.rules[1].roles[1]",
        "invalid role name \"on call\"",
    );
}

#[test]
fn empty_caller_lists_are_refused() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 1)["principals"] = json!([]);
    assert_error_at(
        policy,
        "servers.fetch.rules[1].principals",
        "leave it out to apply to every principal",
    );
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 1)["roles"] = json!([]);
    assert_error_at(policy, "servers.fetch.rules[1].roles", "applies to no role");
}

#[test]
fn empty_method_and_name_lists_are_refused() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 0)["methods"] = json!([]);
    assert_error_at(
        policy,
        "servers.fetch.rules[0].methods",
        "at least one method",
    );
    for field in ["tools", "resources", "prompts"] {
        let mut policy = valid_with_rules();
        mcp_rule(&mut policy, 1)[field] = json!([]);
        let path = format!("servers.fetch.rules[1].{field}");
        assert_error_at(policy, &path, "matches nothing");
    }
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 1)["tools"] = json!(["read_*", ""]);
    assert_error_at(policy, "servers.fetch.rules[1].tools[1]", "is empty");
}

#[test]
fn an_invalid_arguments_schema_is_refused_with_its_path() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 1)["arguments"] =
        json!({ "properties": { "path": { "type": "strin" } } });
    assert_error_at(
        policy,
        "servers.fetch.rules[1].arguments",
        "is not a valid JSON Schema",
    );

    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 1)["arguments"] = json!({ "maxLength": -1 });
    let problem = only_problem(policy);
    assert_eq!(problem.path, "servers.fetch.rules[1].arguments");
    assert!(problem.message.contains("(at /maxLength)"), "{problem}");
}

#[test]
fn an_arguments_schema_must_be_an_object() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 1)["arguments"] = json!(true);
    assert_error_at(
        policy,
        "servers.fetch.rules[1].arguments",
        "must be a JSON Schema object",
    );
}

#[test]
fn an_arguments_schema_may_not_reach_outside_the_policy() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 1)["arguments"] =
        json!({ "$ref": "https://example.com/schemas/arguments.json" });
    assert_error_at(
        policy,
        "servers.fetch.rules[1].arguments",
        "is not a valid JSON Schema",
    );
}

#[test]
fn a_rule_that_can_never_apply_is_refused() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 1)["methods"] = json!(["tools/list"]);
    assert_error_at(
        policy,
        "servers.fetch.rules[1]",
        "never applies: `tools` limits it to tools/call, and `arguments` to tools/call and \
         prompts/get, which `methods` does not match",
    );

    let mut policy = valid_with_rules();
    let rule = mcp_rule(&mut policy, 1);
    rule.as_object_mut().unwrap().remove("tools");
    rule["resources"] = json!(["file:///srv/*"]);
    assert_error_at(
        policy,
        "servers.fetch.rules[1]",
        "never applies: `resources` limits it to resources/read, resources/subscribe, \
         resources/unsubscribe, but `arguments` limits it to tools/call and prompts/get",
    );

    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 0)["arguments"] = json!({ "type": "object" });
    assert_error_at(
        policy,
        "servers.fetch.rules[0]",
        "never applies: `arguments` limits it to tools/call and prompts/get",
    );
}

#[test]
fn a_misspelt_method_is_a_warning() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 0)["methods"] = json!(["tools/lists", "tools/*"]);
    let warning = only_warning(policy);
    assert_eq!(warning.path, "servers.fetch.rules[0].methods[0]");
    assert!(warning.message.contains("not an MCP method"), "{warning}");
}

#[test]
fn a_pattern_matching_no_known_method_is_a_warning() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 0)["methods"] = json!(["tool/*"]);
    let warning = only_warning(policy);
    assert_eq!(warning.path, "servers.fetch.rules[0].methods[0]");
    assert!(
        warning.message.contains("matches no MCP method"),
        "{warning}"
    );
}

#[test]
fn a_plumbing_method_in_a_rule_is_a_warning() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 0)["methods"] = json!(["tools/list", "ping"]);
    let warning = only_warning(policy);
    assert_eq!(warning.path, "servers.fetch.rules[0].methods[1]");
    assert!(warning.message.contains("protocol plumbing"), "{warning}");
}

#[test]
fn a_when_condition_without_values_is_refused() {
    let mut policy = valid_with_rules();
    mcp_rule(&mut policy, 1)["when"] = json!({ "step": [] });
    assert_error_at(policy, "servers.fetch.rules[1].when.step", "lists no value");
}

#[test]
fn command_and_url_together_are_refused() {
    let mut policy = valid();
    policy["servers"]["fetch"]["url"] = json!("http://127.0.0.1:3001/mcp");
    assert_error_at(policy, "servers.fetch", "`command`");
}

#[test]
fn a_url_server_loads() {
    let mut policy = valid();
    let server = &mut policy["servers"]["fetch"];
    server.as_object_mut().unwrap().remove("command");
    server["url"] = json!("https://mcp.example.com/mcp");
    let loaded = load_value(policy).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(
        loaded.policy.servers["fetch"].url.as_deref(),
        Some("https://mcp.example.com/mcp")
    );
}

#[test]
fn a_bad_url_is_refused() {
    for (url, expected) in [
        ("file:///srv/mcp", "http or https"),
        ("127.0.0.1:3001/mcp", "is not a URL"),
        ("http://", "is not a URL"),
    ] {
        let mut policy = valid();
        let server = &mut policy["servers"]["fetch"];
        server.as_object_mut().unwrap().remove("command");
        server["url"] = json!(url);
        assert_error_at(policy, "servers.fetch.url", expected);
    }
}

#[test]
fn a_server_with_neither_command_nor_url_is_a_warning() {
    let mut policy = valid();
    policy["servers"]["fetch"]
        .as_object_mut()
        .unwrap()
        .remove("command");
    let warning = only_warning(policy);
    assert_eq!(warning.path, "servers.fetch");
    assert!(
        warning.message.contains("neither `command` nor `url`"),
        "{warning}"
    );
}

#[test]
fn shared_isolation_without_command_is_a_warning() {
    let mut policy = valid();
    let server = &mut policy["servers"]["fetch"];
    server.as_object_mut().unwrap().remove("command");
    server["url"] = json!("http://127.0.0.1:3001/mcp");
    server["isolation"] = json!("shared");
    let warning = only_warning(policy);
    assert_eq!(warning.path, "servers.fetch.isolation");
}

#[test]
fn zero_message_limits_are_refused() {
    for field in ["max_message_bytes", "max_batch_size", "max_json_depth"] {
        let mut policy = valid();
        policy["daemon"] = json!({ field: 0 });
        assert_error_at(policy, &format!("daemon.{field}"), "at least 1");
    }
}

#[test]
fn every_rule_problem_is_reported_in_file_order() {
    let mut policy = valid_with_rules();
    policy["daemon"] = json!({ "listen": "127.0.0.1:8080", "principal": "nobody" });
    mcp_rule(&mut policy, 0)["description"] = json!("");
    mcp_rule(&mut policy, 1)["id"] = json!("list");
    mcp_rule(&mut policy, 1)["principals"] = json!(["carol"]);
    mcp_rule(&mut policy, 1)["arguments"] = json!({ "type": 5 });
    let paths: Vec<String> = problems_of(policy).into_iter().map(|p| p.path).collect();
    assert_eq!(
        paths,
        [
            "daemon.principal",
            "servers.fetch.rules[0].description",
            "servers.fetch.rules[1].principals[0]",
            "servers.fetch.rules[1].arguments",
            "servers.fetch.rules[1].id",
        ]
    );
}

#[test]
fn compiling_an_invalid_built_policy_is_refused_with_paths() {
    let mut policy = load_value(valid_with_rules()).unwrap().policy;
    let rules = &mut policy.servers.get_mut("fetch").unwrap().rules;
    rules[1].id = "list".into();
    let error = CompiledPolicy::compile(&policy).unwrap_err();
    let PolicyError::Rejected { problems } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].path, "servers.fetch.rules[1].id");
    assert!(
        error
            .to_string()
            .starts_with("invalid policy: servers.fetch.rules[1].id: duplicate")
    );
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let mut policy = valid();
    policy["daemon"] = json!({ "dns_min_ttl_seconds": 600, "dns_max_ttl_seconds": 300 });
    fetch_rule(&mut policy, 1)["id"] = json!("dns");
    fetch_rule(&mut policy, 1)["ports"] = json!([]);
    let paths: Vec<String> = problems_of(policy).into_iter().map(|p| p.path).collect();
    assert_eq!(
        paths,
        [
            "daemon.dns_min_ttl_seconds",
            "servers.fetch.egress[1].ports",
            "servers.fetch.egress[1].id",
        ]
    );
}

#[test]
fn the_invalid_error_lists_every_error_on_one_line() {
    let mut policy = valid();
    fetch_rule(&mut policy, 0)["ports"] = json!([]);
    fetch_rule(&mut policy, 1)["ports"] = json!([]);
    let shown = load_value(policy).unwrap_err().to_string();
    assert_eq!(
        shown,
        "test.json: invalid policy: \
         servers.fetch.egress[0].ports: must list at least one port; \"*\" means every port; \
         servers.fetch.egress[1].ports: must list at least one port; \"*\" means every port"
    );
}

// --- warnings ---

#[test]
fn a_host_rule_without_dns_is_a_warning_not_an_error() {
    let mut policy = valid();
    fetch_rule(&mut policy, 0)["protocols"] = json!(["tcp"]);
    let loaded = load_value(policy).unwrap();
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    let warning = &loaded.warnings[0];
    assert_eq!(warning.severity, Severity::Warning);
    assert_eq!(warning.path, "servers.fetch.egress");
    assert!(warning.message.contains("no rule allows DNS"), "{warning}");
}

#[test]
fn a_wildcard_port_rule_counts_as_allowing_dns() {
    let mut policy = valid();
    fetch_rule(&mut policy, 0)["ports"] = json!(["*"]);
    assert!(load_value(policy).unwrap().warnings.is_empty());
}

#[test]
fn env_without_command_is_a_warning() {
    let mut policy = valid();
    let server = &mut policy["servers"]["fetch"];
    server.as_object_mut().unwrap().remove("command");
    server["url"] = json!("http://127.0.0.1:3001/mcp");
    server["adopt_cgroup"] = json!("/sys/fs/cgroup/x");
    server["env"] = json!({ "K": "V" });
    let loaded = load_value(policy).unwrap();
    assert_eq!(loaded.warnings.len(), 1);
    assert_eq!(loaded.warnings[0].path, "servers.fetch.env");
}

#[test]
fn warnings_ride_along_with_errors_in_invalid() {
    let mut policy = valid();
    fetch_rule(&mut policy, 0)["protocols"] = json!(["tcp"]);
    fetch_rule(&mut policy, 1)["ports"] = json!([]);
    let problems = problems_of(policy);
    let severities: Vec<_> = problems.iter().map(|p| p.severity).collect();
    assert_eq!(severities, [Severity::Error, Severity::Warning]);
}

#[test]
fn a_problem_displays_as_path_colon_message() {
    let problem = Problem::error("servers.fetch.egress[2].id", "duplicate rule id \"x\"");
    assert_eq!(
        problem.to_string(),
        "servers.fetch.egress[2].id: duplicate rule id \"x\""
    );
}

// --- audit ---

#[test]
fn audit_settings_default_when_absent() {
    let policy = load_value(valid()).unwrap().policy;
    assert_eq!(policy.audit, AuditSettings::default());
    assert_eq!(
        policy.audit.path,
        Path::new("/var/lib/mcp-guard/audit.jsonl")
    );
    assert_eq!(policy.audit.rotate_bytes, 104_857_600);
    assert!(!policy.audit.store_arguments);
    assert!(policy.audit.redact.is_empty());
    assert!(policy.audit.fsync);
}

#[test]
fn audit_settings_load_with_every_field() {
    let mut policy = valid();
    policy["audit"] = json!({
        "path": "/srv/audit/log.jsonl",
        "rotate_bytes": 0,
        "store_arguments": true,
        "redact": ["password", "token"],
        "fsync": true
    });
    let loaded = load_value(policy).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let audit = loaded.policy.audit;
    assert_eq!(audit.path, Path::new("/srv/audit/log.jsonl"));
    assert_eq!(audit.rotate_bytes, 0);
    assert!(audit.store_arguments);
    assert_eq!(audit.redact, ["password", "token"]);
}

#[test]
fn an_unknown_audit_field_is_refused_with_its_path() {
    let mut policy = valid();
    policy["audit"] = json!({ "rotate": 5 });
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "audit.rotate");
    assert!(message.contains("unknown field `rotate`"), "{message}");
}

#[test]
fn a_relative_audit_path_is_refused() {
    let mut policy = valid();
    policy["audit"] = json!({ "path": "audit.jsonl" });
    assert_error_at(policy, "audit.path", "must be an absolute path");
}

#[test]
fn an_audit_path_naming_a_directory_is_refused() {
    let mut policy = valid();
    policy["audit"] = json!({ "path": "/var/lib/mcp-guard/" });
    assert_error_at(policy, "audit.path", "names a directory");
}

#[test]
fn empty_and_duplicate_redacted_names_are_refused() {
    let mut policy = valid();
    policy["audit"] = json!({ "store_arguments": true, "redact": ["password", "", "Password"] });
    let problems = problems_of(policy);
    let found: Vec<(&str, Severity)> = problems
        .iter()
        .map(|problem| (problem.path.as_str(), problem.severity))
        .collect();
    assert_eq!(
        found,
        [
            ("audit.redact[1]", Severity::Error),
            ("audit.redact[2]", Severity::Error)
        ],
        "{problems:#?}"
    );
    assert!(problems[0].message.contains("is empty"));
    assert!(
        problems[1]
            .message
            .contains("duplicate field name \"Password\"")
    );
}

#[test]
fn redaction_without_stored_arguments_is_a_warning() {
    let mut policy = valid();
    policy["audit"] = json!({ "redact": ["password"] });
    let warning = only_warning(policy);
    assert_eq!(warning.path, "audit.redact");
    assert!(warning.message.contains("no effect"), "{warning}");
}

#[test]
fn audit_without_fsync_is_a_warning() {
    let mut policy = valid();
    policy["audit"] = json!({ "fsync": false });
    let warning = only_warning(policy);
    assert_eq!(warning.path, "audit.fsync");
    assert!(warning.message.contains("crash"), "{warning}");
}

#[test]
fn durable_before_interval_loads_with_its_interval() {
    let mut policy = valid();
    policy["audit"] = json!({ "durable_before": "interval", "flush_interval_ms": 250 });
    let loaded = load_value(policy).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(loaded.policy.audit.durable_before, DurableBefore::Interval);
    assert_eq!(loaded.policy.audit.flush_interval_ms, 250);
    assert!(!loaded.policy.audit.flushes_before_acknowledging());
}

#[test]
fn a_flush_interval_out_of_range_is_an_error_with_its_path() {
    for interval in [0, 60_001] {
        let mut policy = valid();
        policy["audit"] = json!({ "durable_before": "interval", "flush_interval_ms": interval });
        let error = load_value(policy).unwrap_err().to_string();
        assert!(error.contains("audit.flush_interval_ms"), "{error}");
        assert!(error.contains("1 to 60000 milliseconds"), "{error}");
    }
}

#[test]
fn a_flush_interval_without_durable_before_interval_is_a_warning() {
    let mut policy = valid();
    policy["audit"] = json!({ "flush_interval_ms": 100 });
    let warning = only_warning(policy);
    assert_eq!(warning.path, "audit.flush_interval_ms");
    assert!(warning.message.contains("\"interval\""), "{warning}");
}

#[test]
fn resume_get_stream_loads_with_a_url_and_warns_without_one() {
    let mut policy = valid();
    policy["servers"]["fetch"]["resume_get_stream"] = json!(true);
    let warning = only_warning(policy);
    assert_eq!(warning.path, "servers.fetch.resume_get_stream");
    let mut policy = valid();
    let fetch = &mut policy["servers"]["fetch"];
    fetch.as_object_mut().unwrap().remove("command");
    fetch["url"] = json!("http://127.0.0.1:8000/mcp");
    fetch["resume_get_stream"] = json!(true);
    let loaded = load_value(policy).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert!(loaded.policy.servers["fetch"].resume_get_stream);
}

/// A file only its owner may read, as a secret's should be.
fn write_secret(path: &Path, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn secret_files_others_may_read_are_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    write_secret(&token, "s3cret");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let warning = only_warning(url_server_with_headers(
        json!({"Authorization": {"file": token}}),
    ));
    assert_eq!(warning.path, "servers.fetch.headers.Authorization.file");
    assert!(warning.message.contains("mode 0644"), "{warning}");
    let mut policy = valid();
    policy["servers"]["fetch"]["env"] = json!({"TOKEN": {"file": token}});
    assert_eq!(only_warning(policy).path, "servers.fetch.env.TOKEN.file");
}

/// [`valid`] with `fetch` a `url` server carrying `headers`.
fn url_server_with_headers(headers: Value) -> Value {
    let mut policy = valid();
    let fetch = &mut policy["servers"]["fetch"];
    fetch.as_object_mut().unwrap().remove("command");
    fetch["url"] = json!("https://mcp.example.com/mcp");
    fetch["headers"] = headers;
    policy
}

#[test]
fn upstream_headers_load_from_a_value_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    write_secret(&token, "s3cret-token\n");
    let loaded = load_value(url_server_with_headers(json!({
        "Authorization": {"file": token, "prefix": "Bearer "},
        "X-Api-Version": {"value": "2025-01-01"},
        "X-Home": {"env": "HOME"},
    })))
    .unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let headers = &loaded.policy.servers["fetch"].headers;
    assert_eq!(
        headers["Authorization"].header_value().unwrap(),
        "Bearer s3cret-token",
        "the file's final newline is not part of the value"
    );
    assert_eq!(
        headers["X-Api-Version"].header_value().unwrap(),
        "2025-01-01"
    );
    assert_eq!(
        headers["X-Home"].header_value().unwrap(),
        std::env::var("HOME").unwrap()
    );
    // A changed secret file reloads the policy, as a changed key file does.
    assert!(loaded.policy.key_files().any(|path| path == token));
}

#[test]
fn upstream_headers_are_checked_with_their_paths() {
    let at = "servers.fetch.headers";
    assert_error_at(
        url_server_with_headers(json!({"Bad Name": {"value": "x"}})),
        &format!("{at}.Bad Name"),
        "not a valid HTTP header name",
    );
    for reserved in [
        "Mcp-Session-Id",
        "content-type",
        "MCP-Guard-Principal",
        "traceparent",
    ] {
        assert_error_at(
            url_server_with_headers(json!({reserved: {"value": "x"}})),
            &format!("{at}.{reserved}"),
            "mcp-guard sets itself",
        );
    }
    assert_error_at(
        url_server_with_headers(json!({"X-Key": {"value": "a", "env": "HOME"}})),
        &format!("{at}.X-Key"),
        "exactly one of",
    );
    assert_error_at(
        url_server_with_headers(json!({"X-Key": {"prefix": "Bearer "}})),
        &format!("{at}.X-Key"),
        "exactly one of",
    );
    assert_error_at(
        url_server_with_headers(json!({"X-Key": {"value": "line\r\nInjected: yes"}})),
        &format!("{at}.X-Key"),
        "line break",
    );
    assert_error_at(
        url_server_with_headers(json!({"X-Key": {"file": "/nonexistent/mcp-guard/token"}})),
        &format!("{at}.X-Key.file"),
        "/nonexistent/mcp-guard/token",
    );
    let relative = problems_of(url_server_with_headers(json!({"X-Key": {"file": "token"}})));
    assert!(
        relative
            .iter()
            .any(|p| p.path == format!("{at}.X-Key.file") && p.message.contains("absolute")),
        "{relative:#?}"
    );
    assert_error_at(
        url_server_with_headers(json!({"X-Key": {"env": "A=B"}})),
        &format!("{at}.X-Key.env"),
        "variable name",
    );
    let (json_path, message) =
        parse_failure(url_server_with_headers(json!({"X-Key": {"unknown": "x"}})));
    assert_eq!(json_path, format!("{at}.X-Key.unknown"));
    assert!(message.contains("unknown field"), "{message}");
}

#[test]
fn upstream_headers_warn_when_unset_or_without_a_url() {
    let warning = only_warning(url_server_with_headers(
        json!({"X-Key": {"env": "MCP_GUARD_TEST_SURELY_UNSET"}}),
    ));
    assert_eq!(warning.path, "servers.fetch.headers.X-Key.env");
    assert!(
        warning.message.contains("MCP_GUARD_TEST_SURELY_UNSET"),
        "{warning}"
    );

    let mut policy = valid();
    policy["servers"]["fetch"]["headers"] = json!({"X-Key": {"value": "x"}});
    let warning = only_warning(policy);
    assert_eq!(warning.path, "servers.fetch.headers");
}

#[test]
fn env_values_are_text_or_come_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("github-token");
    write_secret(&token, "ghp_example\n");
    let mut policy = valid();
    policy["servers"]["fetch"]["env"] = json!({
        "LOG_LEVEL": "info",
        "GITHUB_TOKEN": {"file": token},
        "HOME_AGAIN": {"env": "HOME"},
    });
    let loaded = load_value(policy).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let env = &loaded.policy.servers["fetch"].env;
    assert_eq!(env["LOG_LEVEL"], EnvValue::Text("info".into()));
    assert_eq!(env["GITHUB_TOKEN"].read().unwrap(), "ghp_example");
    assert_eq!(
        env["HOME_AGAIN"].read().unwrap(),
        std::env::var("HOME").unwrap()
    );
    assert!(loaded.policy.key_files().any(|path| path == token));
    // Text stays a plain string when the policy is written back.
    let written = serde_json::to_value(&loaded.policy).unwrap();
    assert_eq!(written["servers"]["fetch"]["env"]["LOG_LEVEL"], "info");
    assert_eq!(
        written["servers"]["fetch"]["env"]["GITHUB_TOKEN"],
        json!({"file": token})
    );
}

#[test]
fn env_values_that_cannot_be_read_are_reported_at_their_field() {
    let with_env = |env: Value| {
        let mut policy = valid();
        policy["servers"]["fetch"]["env"] = env;
        policy
    };
    assert_error_at(
        with_env(json!({"TOKEN": {"file": "/nonexistent/mcp-guard/token"}})),
        "servers.fetch.env.TOKEN.file",
        "/nonexistent/mcp-guard/token",
    );
    assert_error_at(
        with_env(json!({"TOKEN": {"file": "/nonexistent/a", "env": "HOME"}})),
        "servers.fetch.env.TOKEN",
        "exactly one of",
    );
    assert_error_at(
        with_env(json!({"TOKEN": "a\0b"})),
        "servers.fetch.env.TOKEN",
        "NUL",
    );
    let warning = only_warning(with_env(
        json!({"TOKEN": {"env": "MCP_GUARD_TEST_SURELY_UNSET"}}),
    ));
    assert_eq!(warning.path, "servers.fetch.env.TOKEN.env");
}

#[test]
fn answer_polling_on_one_worker_loads() {
    let mut policy = valid();
    policy["daemon"]["worker_threads"] = json!(1);
    policy["daemon"]["answer_poll_us"] = json!(200);
    let loaded = load_value(policy).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(loaded.policy.daemon.worker_threads, Some(1));
    assert_eq!(
        loaded.policy.daemon.answer_poll(),
        std::time::Duration::from_micros(200)
    );
}

#[test]
fn answer_polling_out_of_range_and_zero_workers_are_errors_with_their_paths() {
    let mut policy = valid();
    policy["daemon"]["answer_poll_us"] = json!(10_001);
    let error = load_value(policy).unwrap_err().to_string();
    assert!(error.contains("daemon.answer_poll_us"), "{error}");
    assert!(error.contains("0 to 10000 microseconds"), "{error}");
    let mut policy = valid();
    policy["daemon"]["worker_threads"] = json!(0);
    let error = load_value(policy).unwrap_err().to_string();
    assert!(error.contains("daemon.worker_threads"), "{error}");
}

#[test]
fn answer_polling_with_several_workers_is_a_warning() {
    let mut policy = valid();
    policy["daemon"]["answer_poll_us"] = json!(200);
    let warning = only_warning(policy);
    assert_eq!(warning.path, "daemon.answer_poll_us");
    assert!(warning.message.contains("worker_threads 1"), "{warning}");
}

#[test]
fn a_tiny_rotation_size_is_a_warning() {
    let mut policy = valid();
    policy["audit"] = json!({ "rotate_bytes": 4096 });
    let warning = only_warning(policy);
    assert_eq!(warning.path, "audit.rotate_bytes");
}

// --- schema ---

#[test]
fn the_schema_describes_servers_and_egress() {
    let schema = json_schema();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert!(schema["properties"]["servers"].is_object());
    assert_eq!(schema["properties"]["version"]["const"], 1);
    assert_eq!(schema["additionalProperties"], false);
    let text = schema.to_string();
    assert!(text.contains("\"egress\""));
    assert!(text.contains("Network destinations the server's processes may reach"));
    let rule = &schema["$defs"]["EgressRule"];
    assert_eq!(rule["additionalProperties"], false);
    let required: Vec<&str> = rule["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ["id", "ports"]);
}

#[test]
fn the_schema_describes_principals_and_rules() {
    let schema = json_schema();
    assert!(schema["properties"]["principals"].is_object());
    let rule = &schema["$defs"]["Rule"];
    assert_eq!(rule["additionalProperties"], false);
    let required: Vec<&str> = rule["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ["id", "description", "effect"]);
    for field in [
        "principals",
        "roles",
        "methods",
        "tools",
        "resources",
        "prompts",
        "arguments",
        "when",
    ] {
        let description = rule["properties"][field]["description"].as_str();
        assert!(description.is_some_and(|d| !d.is_empty()), "{field}");
    }
    let server = &schema["$defs"]["ServerPolicy"]["properties"];
    for field in ["url", "isolation", "principal", "rules"] {
        assert!(server[field].is_object(), "{field}");
    }
    let audit = &schema["$defs"]["AuditSettings"];
    assert_eq!(audit["additionalProperties"], false);
    for field in [
        "path",
        "rotate_bytes",
        "store_arguments",
        "redact",
        "fsync",
        "durable_before",
        "flush_interval_ms",
    ] {
        assert!(
            audit["properties"][field]["description"].is_string(),
            "{field}"
        );
    }
    let daemon = &schema["$defs"]["DaemonSettings"]["properties"];
    for field in [
        "principal",
        "max_message_bytes",
        "max_batch_size",
        "max_json_depth",
        "worker_threads",
        "answer_poll_us",
    ] {
        assert!(daemon[field]["description"].is_string(), "{field}");
    }
}

#[test]
fn the_example_policy_satisfies_the_published_schema() {
    let schema = jsonschema::validator_for(&json_schema()).unwrap();
    let example: Value = serde_json::from_str(EXAMPLE).unwrap();
    let errors: Vec<String> = schema
        .iter_errors(&example)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

// --- identity ---

fn identity_testdata(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/identity/testdata")
        .join(name)
        .display()
        .to_string()
}

/// [`valid`] with a JWT front trusting one issuer, whose keys come from `keys`.
fn valid_with_jwt(keys: Value, algorithms: Value) -> Value {
    let mut policy = valid();
    policy["identity"] = json!({
        "jwt": {
            "issuers": [{
                "issuer": "https://idp.example",
                "audiences": ["mcp-guard"],
                "keys": keys,
                "algorithms": algorithms,
            }]
        }
    });
    policy
}

fn valid_with_rsa_pem() -> Value {
    valid_with_jwt(
        json!({ "pem_file": identity_testdata("rsa_public.pem") }),
        json!(["RS256"]),
    )
}

fn jwt_issuer(policy: &mut Value) -> &mut Value {
    &mut policy["identity"]["jwt"]["issuers"][0]
}

#[test]
fn identity_settings_default_when_absent() {
    let policy = load_value(valid()).unwrap().policy;
    assert_eq!(policy.identity, IdentitySettings::default());
    assert!(policy.identity.jwt.is_none() && !policy.identity.trust_header);
}

#[test]
fn identity_jwt_loads_with_defaults_filled_in() {
    let loaded = load_value(valid_with_rsa_pem()).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let jwt = loaded.policy.identity.jwt.unwrap();
    assert_eq!(jwt.roles_claim, "roles");
    assert_eq!(jwt.principal_claim, "sub");
    assert_eq!(jwt.clock_skew_seconds, 60);
    assert_eq!(jwt.resource_metadata_url, None);
    assert_eq!(jwt.issuers[0].algorithms, [JwtAlgorithm::RS256]);
}

#[test]
fn identity_jwt_with_every_field_loads_and_serialises_back() {
    let mut policy = valid_with_jwt(
        json!({ "jwks_file": identity_testdata("jwks.json") }),
        json!(["RS256", "ES256"]),
    );
    let jwt = &mut policy["identity"]["jwt"];
    jwt["roles_claim"] = json!("realm_access.roles");
    jwt["principal_claim"] = json!("email");
    jwt["clock_skew_seconds"] = json!(5);
    jwt["resource_metadata_url"] =
        json!("https://mcp.example/.well-known/oauth-protected-resource");
    let loaded = load_value(policy).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let text = serde_json::to_string(&loaded.policy).unwrap();
    let again = Policy::from_json_str(&text, Path::new("again.json"))
        .unwrap()
        .policy;
    assert_eq!(again, loaded.policy);
}

#[test]
fn identity_unknown_fields_and_algorithms_are_refused_with_their_path() {
    let mut policy = valid_with_rsa_pem();
    jwt_issuer(&mut policy)["keys"]["x5u"] = json!("https://idp.example/keys");
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "identity.jwt.issuers[0].keys.x5u");
    assert!(message.contains("unknown field `x5u`"), "{message}");

    let policy = valid_with_jwt(
        json!({ "pem_file": identity_testdata("rsa_public.pem") }),
        json!(["RS256", "none"]),
    );
    let (path, message) = parse_failure(policy);
    assert_eq!(path, "identity.jwt.issuers[0].algorithms[1]");
    assert!(message.contains("unknown variant `none`"), "{message}");

    let mut policy = valid();
    policy["identity"] = json!({ "oauth": {} });
    assert_eq!(parse_failure(policy).0, "identity.oauth");
}

#[test]
fn identity_keys_need_exactly_one_source() {
    let none = valid_with_jwt(json!({}), json!(["RS256"]));
    assert_error_at(none, "identity.jwt.issuers[0].keys", "exactly one of");
    let both = valid_with_jwt(
        json!({
            "hs256_secret": "a shared secret of at least thirty-two bytes",
            "pem_file": identity_testdata("rsa_public.pem"),
        }),
        json!(["HS256"]),
    );
    assert_error_at(both, "identity.jwt.issuers[0].keys", "exactly one of");
}

#[test]
fn identity_key_files_that_cannot_be_read_or_parsed_are_refused_with_their_path() {
    let missing = valid_with_jwt(
        json!({ "pem_file": "/nonexistent/idp.pem" }),
        json!(["RS256"]),
    );
    assert_error_at(
        missing,
        "identity.jwt.issuers[0].keys.pem_file",
        "cannot read \"/nonexistent/idp.pem\"",
    );
    let relative = valid_with_jwt(json!({ "jwks_file": "idp/jwks.json" }), json!(["RS256"]));
    assert_error_at(
        relative,
        "identity.jwt.issuers[0].keys.jwks_file",
        "must be an absolute path",
    );
    // A PEM file given as JWKS, and a private key given as the public one.
    let not_json = valid_with_jwt(
        json!({ "jwks_file": identity_testdata("rsa_public.pem") }),
        json!(["RS256"]),
    );
    let problem = only_problem(not_json);
    assert_eq!(problem.path, "identity.jwt.issuers[0].keys.jwks_file");
    assert!(
        problem.message.contains("rsa_public.pem\": not JSON"),
        "{problem}"
    );
    let private = valid_with_jwt(
        json!({ "pem_file": identity_testdata("rsa_private.pem") }),
        json!(["RS256"]),
    );
    assert_error_at(
        private,
        "identity.jwt.issuers[0].keys.pem_file",
        "is a private key",
    );
}

#[test]
fn identity_algorithms_without_a_key_are_refused_or_warned() {
    // None of the listed algorithms can ever verify: an error.
    let secret_for_rsa = valid_with_jwt(
        json!({ "hs256_secret": "a shared secret of at least thirty-two bytes" }),
        json!(["RS256"]),
    );
    assert_error_at(
        secret_for_rsa,
        "identity.jwt.issuers[0].keys",
        "holds no key for RS256",
    );
    // One of them cannot: a warning.
    let rsa_and_ec = valid_with_jwt(
        json!({ "pem_file": identity_testdata("rsa_public.pem") }),
        json!(["RS256", "ES256"]),
    );
    let warning = only_warning(rsa_and_ec);
    assert_eq!(warning.path, "identity.jwt.issuers[0].algorithms[1]");
    assert!(warning.message.contains("verifies ES256"), "{warning}");
}

#[test]
fn identity_a_short_or_empty_hs256_secret_is_flagged() {
    let short = valid_with_jwt(json!({ "hs256_secret": "secret" }), json!(["HS256"]));
    let warning = only_warning(short);
    assert_eq!(warning.path, "identity.jwt.issuers[0].keys.hs256_secret");
    assert!(warning.message.contains("at least 32"), "{warning}");
    let empty = valid_with_jwt(json!({ "hs256_secret": "" }), json!(["HS256"]));
    assert_error_at(
        empty,
        "identity.jwt.issuers[0].keys.hs256_secret",
        "is empty",
    );
}

#[test]
fn identity_issuer_lists_are_checked_entry_by_entry() {
    let mut policy = valid_with_rsa_pem();
    let issuer = jwt_issuer(&mut policy).clone();
    policy["identity"]["jwt"]["issuers"] = json!([issuer, issuer]);
    assert_error_at(
        policy,
        "identity.jwt.issuers[1].issuer",
        "duplicate issuer \"https://idp.example\": also issuers[0]",
    );

    let mut policy = valid_with_rsa_pem();
    policy["identity"]["jwt"]["issuers"] = json!([]);
    assert_error_at(policy, "identity.jwt.issuers", "at least one issuer");

    let mut policy = valid_with_rsa_pem();
    jwt_issuer(&mut policy)["audiences"] = json!([]);
    assert_error_at(
        policy,
        "identity.jwt.issuers[0].audiences",
        "at least one audience",
    );

    let mut policy = valid_with_rsa_pem();
    jwt_issuer(&mut policy)["audiences"] = json!(["mcp-guard", "", "mcp-guard"]);
    let problems = problems_of(policy);
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "identity.jwt.issuers[0].audiences[1]",
            "identity.jwt.issuers[0].audiences[2]"
        ]
    );

    let mut policy = valid_with_rsa_pem();
    jwt_issuer(&mut policy)["issuer"] = json!("");
    assert_error_at(policy, "identity.jwt.issuers[0].issuer", "is empty");

    let mut policy = valid_with_rsa_pem();
    jwt_issuer(&mut policy)["algorithms"] = json!(["RS256", "RS256"]);
    assert_error_at(
        policy,
        "identity.jwt.issuers[0].algorithms[1]",
        "duplicate algorithm \"RS256\"",
    );

    let mut policy = valid_with_rsa_pem();
    jwt_issuer(&mut policy)["algorithms"] = json!([]);
    assert_error_at(
        policy,
        "identity.jwt.issuers[0].algorithms",
        "at least one algorithm",
    );
}

#[test]
fn identity_claims_skew_and_metadata_url_are_checked() {
    let mut policy = valid_with_rsa_pem();
    policy["identity"]["jwt"]["roles_claim"] = json!("");
    assert_error_at(policy, "identity.jwt.roles_claim", "is empty");

    let mut policy = valid_with_rsa_pem();
    policy["identity"]["jwt"]["clock_skew_seconds"] = json!(3600);
    assert_eq!(only_warning(policy).path, "identity.jwt.clock_skew_seconds");

    for bad in [
        "/.well-known/oauth-protected-resource",
        "ftp://mcp.example/meta",
        "https://mcp.example/a\"b",
    ] {
        let mut policy = valid_with_rsa_pem();
        policy["identity"]["jwt"]["resource_metadata_url"] = json!(bad);
        let problem = only_problem(policy);
        assert_eq!(
            problem.path, "identity.jwt.resource_metadata_url",
            "{bad}: {problem}"
        );
    }
}

/// A JWT policy whose front is a protected resource at `https://mcp.example`, with an
/// audience for it.
fn valid_protected_resource() -> Value {
    let mut policy = valid_with_rsa_pem();
    policy["identity"]["jwt"]["protected_resource"] =
        json!({ "public_url": "https://mcp.example" });
    jwt_issuer(&mut policy)["audiences"] = json!(["https://mcp.example/servers/fetch/mcp"]);
    policy
}

#[test]
fn identity_a_protected_resource_is_checked() {
    assert!(
        load_value(valid_protected_resource())
            .unwrap()
            .warnings
            .is_empty()
    );

    let mut policy = valid_protected_resource();
    policy["identity"]["jwt"]["resource_metadata_url"] =
        json!("https://mcp.example/.well-known/oauth-protected-resource");
    assert_error_at(
        policy,
        "identity.jwt.protected_resource",
        "not together with identity.jwt.resource_metadata_url",
    );

    for (bad, message) in [
        (
            "https://mcp.example/mcp-guard",
            "give scheme, host and port only, such as \"https://mcp.example\"",
        ),
        ("https://mcp.example/?a=b", "has a path, query or fragment"),
        ("https://user:pw@mcp.example", "carries credentials"),
        ("mcp.example", "is not a URL"),
    ] {
        let mut policy = valid_protected_resource();
        policy["identity"]["jwt"]["protected_resource"]["public_url"] = json!(bad);
        assert_error_at(
            policy,
            "identity.jwt.protected_resource.public_url",
            message,
        );
    }

    let mut policy = valid_protected_resource();
    policy["identity"]["jwt"]["protected_resource"]["authorization_servers"] =
        json!(["https://idp.example", "https://idp.example"]);
    assert_error_at(
        policy,
        "identity.jwt.protected_resource.authorization_servers[1]",
        "duplicate",
    );

    // Without a list, the issuers are the authorisation servers: they must be URLs.
    let mut policy = valid_protected_resource();
    jwt_issuer(&mut policy)["issuer"] = json!("idp-without-url");
    assert_error_at(
        policy.clone(),
        "identity.jwt.protected_resource.authorization_servers",
        "issuers[0].issuer \"idp-without-url\" is not an http(s) URL",
    );
    policy["identity"]["jwt"]["protected_resource"]["authorization_servers"] =
        json!(["https://login.example"]);
    assert!(load_value(policy).is_ok());

    let mut policy = valid_protected_resource();
    policy["identity"]["jwt"]["protected_resource"]["scopes_supported"] = json!(["mcp tools"]);
    assert_error_at(
        policy,
        "identity.jwt.protected_resource.scopes_supported[0]",
        "not an OAuth scope",
    );

    // No issuer would accept a token bound to a server of this front.
    let mut policy = valid_protected_resource();
    jwt_issuer(&mut policy)["audiences"] = json!(["mcp-guard"]);
    let warning = only_warning(policy);
    assert_eq!(warning.path, "identity.jwt.protected_resource");
    assert!(
        warning
            .message
            .contains("https://mcp.example/servers/NAME/mcp"),
        "{warning}"
    );
    let mut policy = valid_protected_resource();
    jwt_issuer(&mut policy)["audiences"] = json!(["https://mcp.example/"]);
    assert!(load_value(policy).unwrap().warnings.is_empty());
}

#[test]
fn trusted_proxies_are_prefixes_and_broad_ones_are_warned_about() {
    let mut policy = valid();
    policy["daemon"] = json!({ "listen": "127.0.0.1:8080", "trusted_proxies": ["10.0.0.0/8", "192.0.2.7", "2001:db8::/48"] });
    let loaded = load_value(policy).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert_eq!(loaded.policy.daemon.trusted_proxies.len(), 3);

    let mut policy = valid();
    policy["daemon"] = json!({ "listen": "127.0.0.1:8080", "trusted_proxies": ["10.0.0.1/8"] });
    let (path, message) = parse_failure(policy);
    assert!(
        path.starts_with("daemon.trusted_proxies"),
        "{path}: {message}"
    );
    assert!(message.contains("10.0.0.1/8"), "{message}");

    let mut policy = valid();
    policy["daemon"] = json!({ "listen": "127.0.0.1:8080", "trusted_proxies": ["0.0.0.0/0"] });
    let warning = only_warning(policy);
    assert_eq!(warning.path, "daemon.trusted_proxies[0]");
    assert!(warning.message.contains("list your proxies"), "{warning}");

    let mut policy = valid();
    policy["daemon"] = json!({ "trusted_proxies": ["10.0.0.0/8"] });
    assert_eq!(only_warning(policy).path, "daemon.trusted_proxies");
}

#[test]
fn identity_trust_header_is_a_warning_and_excludes_jwt() {
    let mut policy = valid();
    policy["identity"] = json!({ "trust_header": true });
    let warning = only_warning(policy);
    assert_eq!(warning.path, "identity.trust_header");
    assert!(
        warning.message.contains("for development only"),
        "{warning}"
    );

    let mut policy = valid_with_rsa_pem();
    policy["identity"]["trust_header"] = json!(true);
    assert_error_at(
        policy,
        "identity.trust_header",
        "together with identity.jwt",
    );
}

#[test]
fn identity_jwt_makes_daemon_principal_a_warning() {
    let mut policy = valid_with_rsa_pem();
    policy["principals"] = json!({ "agent": {} });
    policy["daemon"] = json!({ "listen": "127.0.0.1:8080", "principal": "agent" });
    let warning = only_warning(policy);
    assert_eq!(warning.path, "daemon.principal");
    assert!(warning.message.contains("identity.jwt"), "{warning}");
}

#[test]
fn identity_the_schema_describes_the_identity_section() {
    let schema = json_schema();
    let identity = &schema["$defs"]["IdentitySettings"];
    assert_eq!(identity["additionalProperties"], false);
    for field in ["jwt", "trust_header"] {
        assert!(
            identity["properties"][field]["description"].is_string(),
            "{field}"
        );
    }
    let keys = &schema["$defs"]["JwtKeys"];
    assert_eq!(keys["oneOf"].as_array().map(Vec::len), Some(3));
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut policy = valid_with_jwt(
        json!({ "jwks_file": identity_testdata("jwks.json") }),
        json!(["RS256", "ES256"]),
    );
    policy["identity"]["jwt"]["resource_metadata_url"] =
        json!("https://mcp.example/.well-known/oauth-protected-resource");
    let errors: Vec<String> = validator
        .iter_errors(&policy)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let mut both = policy.clone();
    jwt_issuer(&mut both)["keys"]["hs256_secret"] = json!("x");
    assert!(!validator.is_valid(&both));
    let mut no_algorithms = policy;
    jwt_issuer(&mut no_algorithms)["algorithms"] = json!([]);
    assert!(!validator.is_valid(&no_algorithms));
}

#[test]
fn a_server_account_must_exist_on_this_host() {
    let mut policy = valid();
    policy["servers"]["fetch"]["user"] = json!("no-such-user-mcp-guard");
    assert_error_at(
        policy.clone(),
        "servers.fetch.user",
        "no user named \"no-such-user-mcp-guard\"",
    );
    policy["servers"]["fetch"]["user"] = json!("nobody");
    policy["servers"]["fetch"]["group"] = json!("no-such-group-mcp-guard");
    assert_error_at(
        policy.clone(),
        "servers.fetch.group",
        "no group named \"no-such-group-mcp-guard\"",
    );
    policy["servers"]["fetch"]["group"] = json!("65534");
    let loaded = load_value(policy).expect("nobody with a numeric group");
    let account = loaded.policy.servers["fetch"].account().unwrap().unwrap();
    assert_eq!((account.uid, account.gid), (65534, 65534));
}

#[test]
fn watched_files_are_the_policy_file_and_its_key_files() {
    let dir = tempfile::tempdir().unwrap();
    let (policy_path, jwks) = (dir.path().join("policy.json"), dir.path().join("jwks.json"));
    std::fs::write(&jwks, r#"{"keys": []}"#).unwrap();
    let mut document = valid();
    document["identity"] = json!({"jwt": {"issuers": [{"issuer": "https://idp", "audiences": ["a"],
        "keys": {"jwks_file": jwks}, "algorithms": ["RS256"]}]}});
    std::fs::write(&policy_path, document.to_string()).unwrap();
    let policy: Policy = serde_json::from_value(document).unwrap();
    let watched = WatchedFiles::of(&policy_path, &policy);
    assert_eq!(watched.changed(), None);

    replace_file(&jwks, r#"{"keys": [ ]}"#);
    assert_eq!(watched.changed(), Some(jwks.as_path()));
    assert!(!watched.is_policy_file(&jwks));
    // Stamped before a reload: nothing changed since.
    let stamped = watched.restamped();
    assert_eq!(stamped.changed(), None);
    replace_file(&policy_path, &valid().to_string());
    let watched = stamped.for_policy(&policy_path, &policy);
    // A change after the stamps (while the reload read the file) is still seen.
    assert_eq!(watched.changed(), Some(policy_path.as_path()));
    assert!(watched.is_policy_file(&policy_path));
    // A policy without key files watches only itself.
    let without_keys = WatchedFiles::of(&policy_path, &serde_json::from_value(valid()).unwrap());
    std::fs::remove_file(&jwks).unwrap();
    assert_eq!(without_keys.changed(), None);
}

#[test]
fn a_front_reachable_from_other_hosts_without_tls_is_a_warning() {
    let mut policy = valid();
    policy["daemon"]["listen"] = json!("0.0.0.0:8080");
    let warning = only_warning(policy.clone());
    assert_eq!(warning.path, "daemon.listen");
    assert!(warning.message.contains("in the clear"), "{warning}");
    policy["daemon"]["listen"] = json!("[::1]:8080");
    let loaded = load_value(policy).unwrap();
    assert!(
        loaded.warnings.is_empty(),
        "loopback: {:?}",
        loaded.warnings
    );
}

#[test]
fn front_tls_files_are_read_by_the_check_and_problems_name_the_field() {
    use std::os::unix::fs::PermissionsExt;
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/transport/testdata");
    // A copy only its owner may read, as a private key should be (git keeps no such mode).
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("front-key.pem");
    std::fs::copy(testdata.join("front-key.pem"), &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut policy = valid();
    policy["daemon"]["listen"] = json!("127.0.0.1:8080");
    policy["daemon"]["tls"] = json!({"cert_file": testdata.join("front.pem"), "key_file": key});
    let loaded = load_value(policy.clone()).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let key_files: Vec<&Path> = loaded.policy.key_files().collect();
    assert_eq!(key_files.len(), 2, "the certificate and key are watched");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let warning = only_warning(policy.clone());
    assert_eq!(warning.path, "daemon.tls.key_file");
    assert!(
        warning.message.contains("readable by other users"),
        "{warning}"
    );

    policy["daemon"]["tls"]["key_file"] = json!(testdata.join("front.pem"));
    let problems = problems_of(policy.clone());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].path, "daemon.tls.key_file");
    policy["daemon"]["tls"]["cert_file"] = json!("relative.pem");
    let paths: Vec<String> = problems_of(policy).into_iter().map(|p| p.path).collect();
    assert!(
        paths.contains(&"daemon.tls.cert_file".to_owned()),
        "{paths:?}"
    );
}
