//! Semantic validation of a server's MCP rules: names, references to principals, patterns,
//! `arguments` schemas, and rules that could never apply. Part of [`super::validate`], so
//! that `mcp-guard policy check` refuses exactly what [`super::CompiledPolicy::compile`]
//! would.

use std::collections::HashMap;

use super::compile::{compile_arguments_schema, names_of, reach};
use super::error::Problem;
use super::glob;
use super::methods::{self, ARGUMENT_METHODS, NAMED_METHODS, Target};
use super::model::Rule;
use super::validate::{
    NAME_RULE, PRINCIPAL_NAME_RULE, Principals, check_principal_ref, is_valid_name,
    is_valid_principal_name,
};

const TARGETS: [Target; 3] = [Target::Tool, Target::Resource, Target::Prompt];

pub(super) fn check_rules(
    server_path: &str,
    rules: &[Rule],
    principals: &Principals,
    problems: &mut Vec<Problem>,
) {
    let mut first_index_of_id: HashMap<&str, usize> = HashMap::new();
    for (index, rule) in rules.iter().enumerate() {
        let path = format!("{server_path}.rules[{index}]");
        check_rule(&path, rule, principals, problems);
        if let Some(first) = first_index_of_id.get(rule.id.as_str()) {
            problems.push(Problem::error(
                format!("{path}.id"),
                format!(
                    "duplicate rule id \"{}\": also used by rules[{first}]",
                    rule.id
                ),
            ));
        } else {
            first_index_of_id.insert(&rule.id, index);
        }
    }
}

fn check_rule(path: &str, rule: &Rule, principals: &Principals, problems: &mut Vec<Problem>) {
    if !is_valid_name(&rule.id) {
        problems.push(Problem::error(
            format!("{path}.id"),
            format!("invalid rule id \"{}\": {NAME_RULE}", rule.id),
        ));
    }
    if rule.description.trim().is_empty() {
        problems.push(Problem::error(
            format!("{path}.description"),
            "is empty: say what the rule is for, for whoever reads a refusal or an audit record",
        ));
    }
    check_callers(path, rule, principals, problems);
    check_methods(&format!("{path}.methods"), &rule.methods, problems);
    for target in TARGETS {
        if let Some(names) = names_of(rule, target) {
            check_names(&format!("{path}.{}", target.field()), names, problems);
        }
    }
    if let Some(schema) = &rule.arguments
        && let Err(message) = compile_arguments_schema(schema)
    {
        problems.push(Problem::error(format!("{path}.arguments"), message));
    }
    check_when(path, rule, problems);
    if reach(rule).is_empty() && !rule.methods.is_empty() {
        problems.push(Problem::error(path, never_applies(rule)));
    }
}

fn check_callers(path: &str, rule: &Rule, principals: &Principals, problems: &mut Vec<Problem>) {
    if let Some(names) = &rule.principals {
        let list_path = format!("{path}.principals");
        if names.is_empty() {
            problems.push(empty_list(&list_path, "principal"));
        }
        for (index, name) in names.iter().enumerate() {
            check_principal_ref(&format!("{list_path}[{index}]"), name, principals, problems);
        }
    }
    if let Some(roles) = &rule.roles {
        let list_path = format!("{path}.roles");
        if roles.is_empty() {
            problems.push(empty_list(&list_path, "role"));
        }
        for (index, role) in roles.iter().enumerate() {
            if !is_valid_principal_name(role) {
                problems.push(Problem::error(
                    format!("{list_path}[{index}]"),
                    format!("invalid role name \"{role}\": {PRINCIPAL_NAME_RULE}"),
                ));
            }
        }
    }
}

/// An empty list would make the rule apply to nothing, while leaving the field out makes it
/// apply to everything: too easy to confuse to let through.
fn empty_list(path: &str, what: &str) -> Problem {
    Problem::error(
        path,
        format!(
            "is empty, so the rule applies to no {what}: leave it out to apply to every {what}"
        ),
    )
}

fn check_methods(path: &str, patterns: &[String], problems: &mut Vec<Problem>) {
    if patterns.is_empty() {
        problems.push(Problem::error(
            path,
            "must list at least one method; \"*\" means every method",
        ));
    }
    for (index, method) in patterns.iter().enumerate() {
        let item_path = format!("{path}[{index}]");
        if method.is_empty() {
            problems.push(Problem::error(item_path, "is empty"));
        } else if methods::is_plumbing(method) {
            problems.push(Problem::warning(
                item_path,
                format!(
                    "\"{method}\" is protocol plumbing, which passes without rules: the rule \
                     has no effect on it"
                ),
            ));
        } else if !glob::is_pattern(method) && !methods::is_known(method) {
            problems.push(Problem::warning(
                item_path,
                format!(
                    "\"{method}\" is not an MCP method mcp-guard knows: check the spelling \
                     (such as \"tools/call\")"
                ),
            ));
        } else if glob::is_pattern(method)
            && !methods::known_methods().any(|known| glob::matches(method, known))
        {
            problems.push(Problem::warning(
                item_path,
                format!(
                    "pattern \"{method}\" matches no MCP method mcp-guard knows: check the \
                     spelling (such as \"tools/*\")"
                ),
            ));
        }
    }
}

/// A tool, resource or prompt list: at least one entry, none empty.
fn check_names(path: &str, names: &[String], problems: &mut Vec<Problem>) {
    if names.is_empty() {
        problems.push(Problem::error(
            path,
            "is empty, so the rule matches nothing: list names or patterns (\"*\" for all), \
             or leave the field out",
        ));
    }
    for (index, name) in names.iter().enumerate() {
        if name.is_empty() {
            problems.push(Problem::error(format!("{path}[{index}]"), "is empty"));
        }
    }
}

fn check_when(path: &str, rule: &Rule, problems: &mut Vec<Problem>) {
    for (key, values) in &rule.when {
        let key_path = format!("{path}.when.{key}");
        if key.is_empty() {
            problems.push(Problem::error(&key_path, "the context key is empty"));
        }
        if values.is_empty() {
            problems.push(Problem::error(
                &key_path,
                "lists no value, so the rule never applies: list the values it applies for",
            ));
        }
    }
}

/// Why a rule whose name lists and `arguments` leave it no method can never apply.
fn never_applies(rule: &Rule) -> String {
    let fields: Vec<String> = TARGETS
        .into_iter()
        .filter(|target| names_of(rule, *target).is_some())
        .map(|target| format!("`{}`", target.field()))
        .collect();
    let arguments_methods = ARGUMENT_METHODS.join(" and ");
    if fields.is_empty() {
        return format!(
            "never applies: `arguments` limits it to {arguments_methods}, which `methods` does \
             not match"
        );
    }
    let named: Vec<&str> = NAMED_METHODS
        .iter()
        .filter(|(_, target)| names_of(rule, *target).is_some())
        .map(|(method, _)| *method)
        .collect();
    let limits = format!("{} limits it to {}", fields.join(" and "), named.join(", "));
    let takes_arguments = named.iter().any(|method| ARGUMENT_METHODS.contains(method));
    match (rule.arguments.is_some(), takes_arguments) {
        (true, false) => {
            format!("never applies: {limits}, but `arguments` limits it to {arguments_methods}")
        }
        (true, true) => format!(
            "never applies: {limits}, and `arguments` to {arguments_methods}, which `methods` \
             does not match"
        ),
        (false, _) => format!("never applies: {limits}, which `methods` does not match"),
    }
}
