//! Whether a changed rule reaches more or less than before, for `policy diff`.
//!
//! The comparison is conservative: a change is called wider (or narrower) only when every
//! request the old rule applied to is provably still covered by the new one (or the other
//! way round). Anything it cannot prove, such as two different argument schemas or two
//! unrelated glob patterns, is reported as a change in both directions, never guessed.

use std::collections::BTreeMap;

use super::super::compile::{Reach, reach};
use super::super::glob;
use super::super::methods::NAMED_METHODS;
use super::super::model::{EgressRule, Rule};

/// How a rule's reach changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Reaches exactly the same requests (it may still be worded differently).
    Same,
    /// Reaches everything it did and possibly more.
    Wider,
    /// Reaches nothing it did not reach before, and possibly less.
    Narrower,
    /// Neither of the above could be shown.
    Different,
}

impl Scope {
    fn from_covers(new_covers_old: bool, old_covers_new: bool) -> Self {
        match (new_covers_old, old_covers_new) {
            (true, true) => Self::Same,
            (true, false) => Self::Wider,
            (false, true) => Self::Narrower,
            (false, false) => Self::Different,
        }
    }
}

/// How the requests `new` applies to compare with those `old` applied to, whatever their
/// effect, id and description.
pub fn compare_rules(old: &Rule, new: &Rule) -> Scope {
    Scope::from_covers(rule_covers(new, old), rule_covers(old, new))
}

/// How the destinations `new` allows compare with those `old` allowed.
pub fn compare_egress(old: &EgressRule, new: &EgressRule) -> Scope {
    Scope::from_covers(egress_covers(new, old), egress_covers(old, new))
}

/// True when every request `narrow` applies to, `wide` applies to as well.
fn rule_covers(wide: &Rule, narrow: &Rule) -> bool {
    callers_cover(wide, narrow)
        && reach_covers(&reach(wide), &reach(narrow))
        && when_covers(&wide.when, &narrow.when)
        && (wide.arguments.is_none() || wide.arguments == narrow.arguments)
}

fn callers_cover(wide: &Rule, narrow: &Rule) -> bool {
    let names_anyone = |rule: &Rule| rule.principals.is_none() && rule.roles.is_none();
    let subset = |small: &Option<Vec<String>>, large: &Option<Vec<String>>| {
        small
            .iter()
            .flatten()
            .all(|name| large.iter().flatten().any(|other| other == name))
    };
    names_anyone(wide)
        || (!names_anyone(narrow)
            && subset(&narrow.principals, &wide.principals)
            && subset(&narrow.roles, &wide.roles))
}

fn reach_covers(wide: &Reach<'_>, narrow: &Reach<'_>) -> bool {
    let any_method = |patterns: &[String], method: &str| {
        patterns
            .iter()
            .any(|pattern| pattern_covers(pattern, method))
    };
    match (wide, narrow) {
        (Reach::Methods(wide), Reach::Methods(narrow)) => {
            narrow.iter().all(|method| any_method(wide, method))
        }
        (Reach::Methods(wide), Reach::ArgumentMethods(narrow)) => {
            narrow.iter().all(|method| any_method(wide, method))
        }
        (Reach::Methods(wide), Reach::Named(slots)) => slots
            .iter()
            .all(|(slot, _)| any_method(wide, NAMED_METHODS[*slot].0)),
        (Reach::ArgumentMethods(wide), Reach::ArgumentMethods(narrow)) => {
            narrow.iter().all(|method| wide.contains(method))
        }
        (Reach::ArgumentMethods(wide), Reach::Named(slots)) => slots
            .iter()
            .all(|(slot, _)| wide.contains(&NAMED_METHODS[*slot].0)),
        (Reach::Named(wide), Reach::Named(narrow)) => narrow.iter().all(|(slot, names)| {
            wide.iter().any(|(wide_slot, wide_names)| {
                wide_slot == slot && names.iter().all(|name| any_method(wide_names, name))
            })
        }),
        _ => false,
    }
}

/// True when every name `narrow` matches, `wide` matches too; sure answers only: equal
/// patterns, `*`, a literal the pattern matches, or a longer prefix under a `prefix*`.
fn pattern_covers(wide: &str, narrow: &str) -> bool {
    if wide == narrow || wide.chars().all(|c| c == '*') {
        return true;
    }
    if !glob::is_pattern(narrow) {
        return glob::matches(wide, narrow);
    }
    match wide.strip_suffix('*') {
        Some(prefix) if !glob::is_pattern(prefix) => narrow.starts_with(prefix),
        _ => false,
    }
}

/// Fewer context conditions, or more values per key, reach more.
fn when_covers(
    wide: &BTreeMap<String, Vec<String>>,
    narrow: &BTreeMap<String, Vec<String>>,
) -> bool {
    wide.iter().all(|(key, wide_values)| {
        narrow
            .get(key)
            .is_some_and(|values| values.iter().all(|value| wide_values.contains(value)))
    })
}

fn egress_covers(wide: &EgressRule, narrow: &EgressRule) -> bool {
    let destination = match (&wide.cidr, &narrow.cidr, &wide.host, &narrow.host) {
        (Some(wide), Some(narrow), _, _) => wide.contains(narrow),
        (_, _, Some(wide), Some(narrow)) => wide.eq_ignore_ascii_case(narrow),
        _ => false,
    };
    let ports = narrow.ports.iter().all(|range| {
        wide.ports
            .iter()
            .any(|outer| outer.first() <= range.first() && range.last() <= outer.last())
    });
    let protocols = narrow
        .protocols
        .iter()
        .all(|protocol| wide.protocols.contains(protocol));
    destination && ports && protocols
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rule(fields: serde_json::Value) -> Rule {
        let mut rule = json!({ "id": "r", "description": "d", "effect": "allow" });
        rule.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        serde_json::from_value(rule).unwrap()
    }

    fn egress(fields: serde_json::Value) -> EgressRule {
        let mut rule = json!({ "id": "e" });
        rule.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        serde_json::from_value(rule).unwrap()
    }

    #[test]
    fn more_tools_roles_or_context_values_widen_a_rule() {
        let old = rule(json!({ "roles": ["support"], "tools": ["get_ticket"] }));
        let more_tools = rule(json!({ "roles": ["support"], "tools": ["get_ticket", "search"] }));
        let glob = rule(json!({ "roles": ["support"], "tools": ["get_*"] }));
        let more_roles = rule(json!({ "roles": ["support", "ops"], "tools": ["get_ticket"] }));
        let anyone = rule(json!({ "tools": ["get_ticket"] }));
        for new in [&more_tools, &glob, &more_roles, &anyone] {
            assert_eq!(compare_rules(&old, new), Scope::Wider, "{new:?}");
            assert_eq!(compare_rules(new, &old), Scope::Narrower, "{new:?}");
        }
        let step = rule(json!({ "tools": ["x"], "when": { "step": ["review"] } }));
        let steps = rule(json!({ "tools": ["x"], "when": { "step": ["review", "approve"] } }));
        let always = rule(json!({ "tools": ["x"] }));
        assert_eq!(compare_rules(&step, &steps), Scope::Wider);
        assert_eq!(compare_rules(&steps, &always), Scope::Wider);
    }

    #[test]
    fn argument_limits_narrow_and_unrelated_changes_are_different() {
        let free = rule(json!({ "tools": ["echo"] }));
        let limited = rule(json!({ "tools": ["echo"], "arguments": { "maxProperties": 1 } }));
        assert_eq!(compare_rules(&free, &limited), Scope::Narrower);
        let other = rule(json!({ "tools": ["other"] }));
        assert_eq!(compare_rules(&free, &other), Scope::Different);
        let reordered = rule(json!({ "roles": ["b", "a"], "tools": ["echo"] }));
        let ordered = rule(json!({ "roles": ["a", "b"], "tools": ["echo"] }));
        assert_eq!(compare_rules(&ordered, &reordered), Scope::Same);
    }

    #[test]
    fn method_patterns_cover_named_rules() {
        let everything = rule(json!({ "methods": ["*"] }));
        let tools = rule(json!({ "methods": ["tools/*"] }));
        let one_tool = rule(json!({ "tools": ["echo"] }));
        assert_eq!(compare_rules(&one_tool, &tools), Scope::Wider);
        assert_eq!(compare_rules(&tools, &everything), Scope::Wider);
        assert_eq!(compare_rules(&everything, &one_tool), Scope::Narrower);
    }

    #[test]
    fn egress_rules_compare_by_destination_ports_and_protocols() {
        let narrow = egress(json!({ "cidr": "10.1.0.0/16", "ports": [443] }));
        let wider_net = egress(json!({ "cidr": "10.0.0.0/8", "ports": [443] }));
        let more_ports = egress(json!({ "cidr": "10.1.0.0/16", "ports": ["400-500"] }));
        let udp_too =
            egress(json!({ "cidr": "10.1.0.0/16", "ports": [443], "protocols": ["tcp", "udp"] }));
        for wide in [&wider_net, &more_ports, &udp_too] {
            assert_eq!(compare_egress(&narrow, wide), Scope::Wider, "{wide:?}");
        }
        let host = egress(json!({ "host": "api.example.com", "ports": [443] }));
        assert_eq!(compare_egress(&narrow, &host), Scope::Different);
    }
}
