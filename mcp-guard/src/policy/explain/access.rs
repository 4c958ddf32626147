//! For `policy diff`: which tools each caller may call under one policy and not the other,
//! asked of the real evaluator rather than worked out again here.
//!
//! The tools are the exact names the server's rules mention (a pattern names no particular
//! tool); the callers are a caller with no role, every role and every principal either policy
//! knows. "May call" means what `tools/list` would show: some allow rule lets the caller call
//! it (its argument limits assumed met) in some context the rules test, and no deny rule
//! without argument limits refuses it there.

use std::collections::{BTreeMap, BTreeSet};

use super::super::compile::CompiledPolicy;
use super::super::decision::DecisionRequest;
use super::super::glob;
use super::super::model::{Effect, Policy, Rule};
use super::doc::{Cite, Sentence, Statement};
use super::rules::names_phrase;

/// Most context combinations tried per server; `when` conditions rarely need more.
const CONTEXT_LIMIT: usize = 64;

/// One policy as the comparison needs it.
#[derive(Clone, Copy)]
pub struct Side<'a> {
    pub policy: &'a Policy,
    pub compiled: &'a CompiledPolicy,
}

/// Who a row of the comparison is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Caller {
    NoRole,
    Role(String),
    Principal(String),
}

impl Caller {
    fn label(&self) -> Sentence {
        match self {
            Self::NoRole => Sentence::new()
                .text("A caller with no role, such as ")
                .code("anonymous")
                .text(","),
            Self::Role(role) => Sentence::new().text("Callers with role ").code(role),
            Self::Principal(name) => Sentence::new().text("Principal ").code(name),
        }
    }
}

/// What one policy says about one caller and one tool.
struct Verdict {
    callable: bool,
    /// The allow rule that lets the caller call it, or else the rule that refuses it.
    rule: Option<String>,
}

/// Tools gained and lost by one caller, each with the rules behind the change.
#[derive(Default)]
struct Change {
    gained: BTreeMap<String, Vec<Cite>>,
    lost: BTreeMap<String, Vec<Cite>>,
}

/// Statements of tools callers may now call, and of tools they may no longer call.
pub fn tool_access(server: &str, old: Side<'_>, new: Side<'_>) -> (Vec<Statement>, Vec<Statement>) {
    let rules: Vec<&Rule> = [old, new]
        .iter()
        .flat_map(|side| side.policy.servers.get(server))
        .flat_map(|server| &server.rules)
        .collect();
    let tools = literal_tools(&rules);
    let contexts = contexts(&rules);
    let mut changes: BTreeMap<Caller, Change> = BTreeMap::new();
    for caller in callers(old, new, &rules) {
        let change = changes.entry(caller.clone()).or_default();
        for tool in &tools {
            let before = verdict(old, server, &caller, tool, &contexts);
            let after = verdict(new, server, &caller, tool, &contexts);
            record(change, tool, &before, &after);
        }
    }
    leave_out_what_broader_rows_say(&mut changes, old, new);
    let mut gained = Vec::new();
    let mut lost = Vec::new();
    for (caller, change) in changes {
        if !change.gained.is_empty() {
            let lead = caller.label().text(" may now call ");
            gained.push(statement(lead, &change.gained));
        }
        if !change.lost.is_empty() {
            let lead = caller.label().text(" may no longer call ");
            lost.push(statement(lead, &change.lost));
        }
    }
    (gained, lost)
}

fn record(change: &mut Change, tool: &str, before: &Verdict, after: &Verdict) {
    let tool = tool.to_owned();
    match (before.callable, after.callable) {
        (false, true) => {
            let cites = after.rule.clone().map(Cite::Rule).into_iter().collect();
            change.gained.insert(tool, cites);
        }
        (true, false) => {
            let was = before.rule.clone().map(Cite::OldRule);
            let now = after
                .rule
                .clone()
                .map_or(Cite::Builtin("default deny"), Cite::Rule);
            change
                .lost
                .insert(tool, was.into_iter().chain([now]).collect());
        }
        _ => {}
    }
}

/// "`lead` the tools `a` and `b` [rules behind it]".
fn statement(lead: Sentence, tools: &BTreeMap<String, Vec<Cite>>) -> Statement {
    let names: Vec<String> = tools.keys().cloned().collect();
    let cites: BTreeSet<Cite> = tools.values().flatten().cloned().collect();
    let mut statement = Statement::uncited(lead.then(names_phrase("tool", &names, "and")));
    statement.cites = cites.into_iter().collect();
    statement
}

fn literal_tools(rules: &[&Rule]) -> BTreeSet<String> {
    rules
        .iter()
        .flat_map(|rule| rule.tools.iter().flatten())
        .filter(|name| !glob::is_pattern(name))
        .cloned()
        .collect()
}

/// The empty context, and every combination of values of each rule's `when`.
fn contexts(rules: &[&Rule]) -> Vec<BTreeMap<String, String>> {
    let mut contexts = BTreeSet::from([BTreeMap::new()]);
    for rule in rules {
        let mut combinations = vec![BTreeMap::new()];
        for (key, values) in &rule.when {
            combinations = combinations
                .iter()
                .flat_map(|partial| {
                    values.iter().map(move |value| {
                        let mut context = partial.clone();
                        context.insert(key.clone(), value.clone());
                        context
                    })
                })
                .take(CONTEXT_LIMIT)
                .collect();
        }
        contexts.extend(combinations);
    }
    contexts.into_iter().take(CONTEXT_LIMIT).collect()
}

fn callers(old: Side<'_>, new: Side<'_>, rules: &[&Rule]) -> BTreeSet<Caller> {
    let mut callers = BTreeSet::from([Caller::NoRole]);
    for side in [old, new] {
        for (name, principal) in &side.policy.principals {
            callers.insert(Caller::Principal(name.clone()));
            callers.extend(principal.roles.iter().cloned().map(Caller::Role));
        }
    }
    for rule in rules {
        callers.extend(rule.roles.iter().flatten().cloned().map(Caller::Role));
    }
    callers
}

fn verdict(
    side: Side<'_>,
    server: &str,
    caller: &Caller,
    tool: &str,
    contexts: &[BTreeMap<String, String>],
) -> Verdict {
    let role;
    let (principal, roles): (&str, &[String]) = match caller {
        Caller::NoRole => ("", &[]),
        Caller::Role(name) => {
            role = [name.clone()];
            ("", &role)
        }
        Caller::Principal(name) => (name, side.compiled.roles_of(name)),
    };
    let request = |context| {
        DecisionRequest::new(server, principal, roles, "tools/call")
            .with_name(tool)
            .with_context(context)
    };
    for context in contexts {
        let request = request(context);
        if side.compiled.visible(&request) {
            let decision = side.compiled.decide(&request);
            return Verdict {
                callable: true,
                rule: decision.rule.map(str::to_owned),
            };
        }
    }
    let decision = side.compiled.decide(&request(&contexts[0]));
    Verdict {
        callable: false,
        rule: (decision.effect == Effect::Deny)
            .then_some(decision.rule)
            .flatten()
            .map(str::to_owned),
    }
}

/// A tool a caller with no role gains or loses is not repeated for each role and principal
/// that gains or loses it too, nor a role's for each principal holding it.
fn leave_out_what_broader_rows_say(
    changes: &mut BTreeMap<Caller, Change>,
    old: Side<'_>,
    new: Side<'_>,
) {
    let said = |changes: &BTreeMap<Caller, Change>, caller: &Caller| {
        changes
            .get(caller)
            .map(|change| {
                let names = |tools: &BTreeMap<String, Vec<Cite>>| -> BTreeSet<String> {
                    tools.keys().cloned().collect()
                };
                (names(&change.gained), names(&change.lost))
            })
            .unwrap_or_default()
    };
    let (no_role_gained, no_role_lost) = said(changes, &Caller::NoRole);
    let rows: Vec<Caller> = changes.keys().cloned().collect();
    for caller in rows {
        let mut broader = vec![(no_role_gained.clone(), no_role_lost.clone())];
        if let Caller::Principal(name) = &caller {
            for side in [old, new] {
                for role in side.compiled.roles_of(name) {
                    broader.push(said(changes, &Caller::Role(role.clone())));
                }
            }
        }
        if caller == Caller::NoRole {
            continue;
        }
        let change = changes.get_mut(&caller).expect("a row of the table");
        for (gained, lost) in broader {
            change.gained.retain(|tool, _| !gained.contains(tool));
            change.lost.retain(|tool, _| !lost.contains(tool));
        }
    }
}
