//! One MCP rule as one sentence: who, may or may not, do what, under which conditions.
//!
//! What a rule reaches is read from [`reach`], the function the compiler indexes rules with,
//! so the sentence says exactly which methods the rule can apply to: a rule with `tools`
//! applies to `tools/call` only, a rule with `arguments` to `tools/call` and `prompts/get`
//! only, and anything else to the methods its `methods` patterns match.

use std::collections::BTreeMap;

use super::super::compile::{Reach, reach};
use super::super::glob;
use super::super::methods::{self, NAMED_METHODS, Target};
use super::super::model::{Effect, Rule};
use super::doc::{Cite, Sentence, Statement};
use super::schema::describe_arguments;

/// Plain-language names of the methods a reviewer meets most.
const METHOD_PHRASES: [(&str, &str); 14] = [
    ("tools/call", "call any tool"),
    ("tools/list", "list tools"),
    ("resources/read", "read any resource"),
    ("resources/subscribe", "subscribe to any resource"),
    ("resources/unsubscribe", "unsubscribe from any resource"),
    ("resources/list", "list resources"),
    ("resources/templates/list", "list resource templates"),
    ("prompts/get", "get any prompt"),
    ("prompts/list", "list prompts"),
    ("completion/complete", "ask for argument completions"),
    ("logging/setLevel", "set the server's log level"),
    (
        "sampling/createMessage",
        "receive the server's requests to sample a language model",
    ),
    (
        "elicitation/create",
        "receive the server's requests for user input",
    ),
    (
        "roots/list",
        "receive the server's requests for their roots",
    ),
];

/// The rule as a statement citing it, with its description as the note and, when its
/// `arguments` say several things, one detail per condition.
pub fn rule_statement(rule: &Rule) -> Statement {
    let allows = rule.effect == Effect::Allow;
    let conjunction = if allows { "and" } else { "or" };
    let mut sentence = subject_and_modal(rule)
        .text(" ")
        .then(action(rule, conjunction));
    if !rule.when.is_empty() {
        sentence = sentence.text(", ").then(context_condition(rule));
    }
    let mut details = Vec::new();
    if let Some(schema) = &rule.arguments {
        let lead = match (allows, rule.when.is_empty()) {
            (true, true) => "only if ",
            (true, false) => "and only if ",
            (false, true) => "if ",
            (false, false) => "and if ",
        };
        let mut clauses = describe_arguments(schema);
        sentence = sentence.text(", ").text(lead);
        if clauses.len() == 1 {
            sentence = sentence.then(clauses.remove(0));
        } else {
            sentence = sentence.text("the arguments meet all of these conditions");
            details = clauses
                .into_iter()
                .map(|clause| Statement::uncited(clause.capitalized()))
                .collect();
        }
    }
    if hides_what_it_names(rule) {
        sentence = sentence.text("; what it names is also hidden from list answers");
    }
    Statement::new(sentence, Cite::Rule(rule.id.clone()))
        .with_note(Some(&rule.description))
        .with_details(details)
}

/// "Callers with role `x` may", "Nobody may", "Principal `p` may not".
fn subject_and_modal(rule: &Rule) -> Sentence {
    match (rule.effect, callers(rule)) {
        (Effect::Allow, Some(callers)) => callers.text(" may"),
        (Effect::Allow, None) => Sentence::new().text("Any caller may"),
        (Effect::Deny, Some(callers)) => callers.text(" may not"),
        (Effect::Deny, None) => Sentence::new().text("Nobody may"),
    }
}

/// Who the rule names, capitalised to start a sentence; `None` when it names nobody and so
/// applies to every caller.
pub fn callers(rule: &Rule) -> Option<Sentence> {
    let principals = rule.principals.as_deref().map(|names| {
        let noun = if names.len() == 1 {
            "Principal "
        } else {
            "Principals "
        };
        Sentence::new()
            .text(noun)
            .then(Sentence::codes(names, "and"))
    });
    let roles = rule.roles.as_deref().map(|roles| {
        let noun = if roles.len() == 1 { "role " } else { "roles " };
        let lead = if principals.is_some() {
            "callers with "
        } else {
            "Callers with "
        };
        Sentence::new()
            .text(lead)
            .text(noun)
            .then(Sentence::codes(roles, "or"))
    });
    match (principals, roles) {
        (Some(principals), Some(roles)) => Some(principals.text(" and ").then(roles)),
        (one, other) => one.or(other),
    }
}

/// What the rule lets (or forbids) the callers do, as verb phrases joined by `conjunction`.
pub fn action(rule: &Rule, conjunction: &str) -> Sentence {
    let phrases = match reach(rule) {
        Reach::Methods(patterns) => method_phrases(patterns),
        Reach::ArgumentMethods(methods) => methods.into_iter().map(method_phrase).collect(),
        Reach::Named(slots) => named_phrases(&slots, conjunction),
    };
    Sentence::list(phrases, conjunction)
}

fn method_phrases(patterns: &[String]) -> Vec<Sentence> {
    if patterns.iter().any(|pattern| pattern == "*") {
        return vec![Sentence::new().text(
            "do anything on this server (every MCP method, on any tool, resource or prompt)",
        )];
    }
    patterns
        .iter()
        .map(|pattern| method_phrase(pattern))
        .collect()
}

fn method_phrase(method: &str) -> Sentence {
    if glob::is_pattern(method) {
        return method_pattern_phrase(method);
    }
    if methods::is_plumbing(method) {
        return Sentence::new()
            .text("use ")
            .code(method)
            .text(" (protocol plumbing, which needs no rule)");
    }
    match METHOD_PHRASES.iter().find(|(known, _)| *known == method) {
        Some((_, phrase)) => Sentence::new()
            .text(*phrase)
            .text(" (")
            .code(method)
            .text(")"),
        None => Sentence::new().text("use the method ").code(method),
    }
}

/// A method pattern, with the methods mcp-guard knows that it matches, so that the reviewer
/// sees that `tools/*` includes calling any tool.
fn method_pattern_phrase(pattern: &str) -> Sentence {
    let known: Vec<&str> = methods::known_methods()
        .filter(|method| !methods::is_plumbing(method) && glob::matches(pattern, method))
        .collect();
    let phrase = Sentence::new()
        .text("use any method matching ")
        .code(pattern);
    if known.is_empty() {
        return phrase;
    }
    phrase
        .text(" (of the methods mcp-guard knows: ")
        .then(Sentence::codes(known, "and"))
        .text(")")
}

/// Phrases for a rule that names tools, resources or prompts: one per kind of thing, with
/// the verbs of the methods it reaches (`read`, `subscribe to`, ...).
fn named_phrases(slots: &[(usize, &[String])], conjunction: &str) -> Vec<Sentence> {
    // Per kind of thing, in NAMED_METHODS order: the verbs reached and the names.
    let mut by_target: BTreeMap<usize, (Vec<&str>, &[String])> = BTreeMap::new();
    for (slot, names) in slots {
        let (method, target) = NAMED_METHODS[*slot];
        let entry = by_target
            .entry(target_order(target))
            .or_insert((Vec::new(), names));
        entry.0.push(named_method_verb(method));
    }
    by_target
        .into_iter()
        .map(|(order, (verbs, names))| {
            let noun = TARGET_NOUNS[order];
            Sentence::new()
                .text(list_words(&verbs, conjunction))
                .text(" ")
                .then(names_phrase(noun, names, conjunction))
        })
        .collect()
}

const TARGET_NOUNS: [&str; 3] = ["tool", "resource", "prompt"];

fn target_order(target: Target) -> usize {
    match target {
        Target::Tool => 0,
        Target::Resource => 1,
        Target::Prompt => 2,
    }
}

fn named_method_verb(method: &str) -> &'static str {
    match method {
        "tools/call" => "call",
        "resources/read" => "read",
        "resources/subscribe" => "subscribe to",
        "resources/unsubscribe" => "unsubscribe from",
        _ => "get",
    }
}

fn list_words(words: &[&str], conjunction: &str) -> String {
    Sentence::list(
        words.iter().map(|word| Sentence::new().text(*word)),
        conjunction,
    )
    .plain()
}

/// "the tool `a`", "the tools `a` and `b`", "any tool matching `get_*`", "any tool", or
/// exact names and patterns together.
pub fn names_phrase(noun: &str, names: &[String], conjunction: &str) -> Sentence {
    let (patterns, literals): (Vec<&String>, Vec<&String>) =
        names.iter().partition(|name| glob::is_pattern(name));
    let literals = (!literals.is_empty()).then(|| {
        let plural = if literals.len() == 1 { "" } else { "s" };
        Sentence::new()
            .text(format!("the {noun}{plural} "))
            .then(Sentence::codes(literals, conjunction))
    });
    let patterns = (!patterns.is_empty()).then(|| {
        if patterns
            .iter()
            .any(|pattern| pattern.chars().all(|c| c == '*'))
        {
            Sentence::new().text(format!("any {noun}"))
        } else {
            Sentence::new()
                .text(format!("any {noun} matching "))
                .then(Sentence::codes(patterns, "or"))
        }
    });
    match (literals, patterns) {
        (Some(literals), Some(patterns)) => {
            literals.text(format!(" {conjunction} ")).then(patterns)
        }
        (one, other) => one.or(other).unwrap_or_default(),
    }
}

/// "only while the context value `step` is `review` or `approve`".
fn context_condition(rule: &Rule) -> Sentence {
    let lead = match rule.effect {
        Effect::Allow => "only while ",
        Effect::Deny => "while ",
    };
    let conditions = rule.when.iter().map(|(key, values)| {
        Sentence::new()
            .text("the context value ")
            .code(key)
            .text(" is ")
            .then(Sentence::codes(values, "or"))
    });
    Sentence::new()
        .text(lead)
        .then(Sentence::list(conditions, "and"))
}

/// A deny rule without `arguments` that reaches a method acting on a named thing also hides
/// that thing from list answers (see `CompiledPolicy::visible`).
fn hides_what_it_names(rule: &Rule) -> bool {
    if rule.effect != Effect::Deny || rule.arguments.is_some() {
        return false;
    }
    match reach(rule) {
        Reach::Named(slots) => !slots.is_empty(),
        Reach::Methods(patterns) => NAMED_METHODS.iter().any(|(method, _)| {
            patterns
                .iter()
                .any(|pattern| glob::matches(pattern, method))
        }),
        Reach::ArgumentMethods(_) => false,
    }
}
