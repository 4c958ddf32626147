//! `mcp-guard policy diff`: what a new policy grants or removes, in plain language.
//!
//! Changes are sorted into three lists per part of the policy (the whole policy, then each
//! server by name):
//! - **Grants**: new allow rules and destinations, widened ones, dropped or narrowed deny
//!   rules, roles gained, a switch to a mode that refuses nothing, and tools a caller may now
//!   call;
//! - **Removes**: the reverse;
//! - **Other changes**: anything that neither only widens nor only narrows (a rule whose reach
//!   changed in both directions, a setting, what is logged), shown as "was" and "now".
//!
//! Rules and destinations are matched by id, so a renamed rule shows as one dropped and one
//! new. The sentences are those of `policy explain`. The command exits 0 whether or not the
//! policies differ; with no difference it prints "No differences.".

use std::collections::BTreeSet;

use super::compile::CompiledPolicy;
use super::explain::access::{Side, tool_access};
use super::explain::doc::{Cite, Document, Sentence, Statement};
use super::explain::scope::{Scope, compare_egress, compare_rules};
use super::explain::{
    ExplainFormat, egress_statement, how_it_runs, identity, logging, mode_consequence, principals,
    rule_statement, server_path, server_section,
};
use super::model::{Effect, EgressRule, Mode, Policy, Rule, ServerPolicy};

/// Printed when the files differ only in what `policy explain` does not describe.
const NO_DESCRIBED_DIFFERENCES: &str = "No differences in what is allowed, refused or logged: \
the policies differ only in settings `policy explain` does not describe (daemon limits, paths \
and sockets).\n";

/// What `new` grants and removes compared with `old`, rendered deterministically.
pub fn diff(old: &Policy, new: &Policy, format: ExplainFormat) -> String {
    if old == new {
        return "No differences.\n".to_owned();
    }
    let mut doc = Document::default();
    doc.heading(1, Sentence::new().text("What the new policy changes"));
    let mut changed = policy_wide(&mut doc, old, new);
    // Policies from `Policy::load` always compile; without both, tool access is not compared.
    let compiled = CompiledPolicy::compile(old)
        .ok()
        .zip(CompiledPolicy::compile(new).ok());
    let sides = compiled.as_ref().map(|(old_rules, new_rules)| {
        (
            Side {
                policy: old,
                compiled: old_rules,
            },
            Side {
                policy: new,
                compiled: new_rules,
            },
        )
    });
    let names: BTreeSet<&String> = old.servers.keys().chain(new.servers.keys()).collect();
    for name in names {
        changed |= server_changes(&mut doc, name, old, new, sides);
    }
    if !changed {
        return NO_DESCRIBED_DIFFERENCES.to_owned();
    }
    doc.render(format)
}

/// The changes of one part of the policy, sorted by what they do to access.
#[derive(Default)]
struct Changes {
    grants: Vec<Statement>,
    removes: Vec<Statement>,
    other: Vec<Statement>,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.grants.is_empty() && self.removes.is_empty() && self.other.is_empty()
    }

    /// Files a change that widens access under grants, one that narrows it under removes.
    fn file(&mut self, widens: bool, statement: Statement) {
        match widens {
            true => self.grants.push(statement),
            false => self.removes.push(statement),
        }
    }

    /// Writes the part under `title`; false (and nothing written) when nothing changed.
    fn write(self, doc: &mut Document, title: Sentence) -> bool {
        if self.is_empty() {
            return false;
        }
        doc.heading(2, title);
        self.write_subsections(doc);
        true
    }

    /// Writes the lists under a heading already written (an added server's section).
    fn write_subsections(self, doc: &mut Document) {
        doc.section(3, Sentence::new().text("Grants"), self.grants);
        doc.section(3, Sentence::new().text("Removes"), self.removes);
        doc.section(3, Sentence::new().text("Other changes"), self.other);
    }
}

fn policy_wide(doc: &mut Document, old: &Policy, new: &Policy) -> bool {
    let mut changes = Changes::default();
    mode_change(
        Sentence::new().text("The policy"),
        old.mode,
        new.mode,
        Cite::setting("mode"),
        &mut changes,
    );
    principal_changes(old, new, &mut changes);
    changes
        .other
        .extend(setting_changes(identity(old), identity(new)));
    changes.other.extend(redaction_changes(old, new));
    let not_redaction =
        |statement: &Statement| statement.key() != Some(&Cite::setting("audit.redact"));
    let old_logging = logging(old).into_iter().filter(not_redaction).collect();
    let new_logging = logging(new).into_iter().filter(not_redaction).collect();
    changes
        .other
        .extend(setting_changes(old_logging, new_logging));
    changes.write(doc, Sentence::new().text("Whole policy"))
}

/// A change of mode: switching to one that refuses nothing grants what the rules refused.
fn mode_change(subject: Sentence, old: Mode, new: Mode, cite: Cite, changes: &mut Changes) {
    if old == new {
        return;
    }
    let sentence = subject
        .text(" now runs in ")
        .code(new.as_str())
        .text(" mode instead of ")
        .code(old.as_str())
        .text(": ")
        .then(mode_consequence(new));
    let statement = Statement::new(sentence, cite);
    match (old.lets_everything_through(), new.lets_everything_through()) {
        (false, true) => changes.grants.push(statement),
        (true, false) => changes.removes.push(statement),
        _ => changes.other.push(statement),
    }
}

/// Principals added or dropped, and roles each gains or loses.
fn principal_changes(old: &Policy, new: &Policy, changes: &mut Changes) {
    let (old_statements, new_statements) = (principals(old), principals(new));
    for (name, principal) in &new.principals {
        let Some(before) = old.principals.get(name) else {
            let statement = statement_for(
                &new_statements,
                &Cite::setting(format!("principals.{name}")),
            );
            changes
                .grants
                .extend(statement.map(|s| prefixed("New principal: ", s)));
            continue;
        };
        let cite = Cite::setting(format!("principals.{name}.roles"));
        let gained = missing_from(&principal.roles, &before.roles);
        let lost = missing_from(&before.roles, &principal.roles);
        for (widens, roles) in [(true, gained), (false, lost)] {
            if roles.is_empty() {
                continue;
            }
            let verb = if widens {
                " gains the role"
            } else {
                " loses the role"
            };
            let plural = if roles.len() == 1 { " " } else { "s " };
            let sentence = Sentence::new()
                .text("Principal ")
                .code(name)
                .text(verb)
                .text(plural)
                .then(Sentence::codes(roles, "and"));
            changes.file(widens, Statement::new(sentence, cite.clone()));
        }
    }
    for name in old
        .principals
        .keys()
        .filter(|name| !new.principals.contains_key(*name))
    {
        let statement = statement_for(
            &old_statements,
            &Cite::setting(format!("principals.{name}")),
        );
        changes
            .removes
            .extend(statement.map(|s| prefixed("Dropped principal: ", s)));
    }
}

fn missing_from<'a>(these: &'a [String], those: &[String]) -> Vec<&'a String> {
    these.iter().filter(|item| !those.contains(item)).collect()
}

fn statement_for(statements: &[Statement], key: &Cite) -> Option<Statement> {
    statements.iter().find(|s| s.key() == Some(key)).cloned()
}

/// Redacted fields added or removed, while arguments are stored in both policies (otherwise
/// the change of `store_arguments` says it all).
fn redaction_changes(old: &Policy, new: &Policy) -> Vec<Statement> {
    if !(old.audit.store_arguments && new.audit.store_arguments) {
        return Vec::new();
    }
    let lowercase = |fields: &[String]| -> BTreeSet<String> {
        fields
            .iter()
            .map(|field| field.to_ascii_lowercase())
            .collect()
    };
    let (before, after) = (lowercase(&old.audit.redact), lowercase(&new.audit.redact));
    let cite = Cite::setting("audit.redact");
    let no_longer = before.difference(&after).map(|field| {
        let sentence = Sentence::new()
            .text("Arguments are no longer redacted for the field ")
            .code(field);
        Statement::new(sentence, cite.clone())
    });
    let now = after.difference(&before).map(|field| {
        let sentence = Sentence::new()
            .text("Arguments are now redacted for the field ")
            .code(field);
        Statement::new(sentence, cite.clone())
    });
    no_longer.chain(now).collect()
}

/// Statements about settings, matched by what they cite: changed ones as "was" and "now",
/// and those said by one policy only.
fn setting_changes(old: Vec<Statement>, new: Vec<Statement>) -> Vec<Statement> {
    let mut changes = Vec::new();
    for before in &old {
        match new.iter().find(|after| after.key() == before.key()) {
            Some(after) if after.plain() != before.plain() => {
                let headline = Sentence::new().text("Changed");
                changes.push(was_now(headline, before.clone(), after.clone()));
            }
            Some(_) => {}
            None => changes.push(prefixed("No longer: ", before.clone())),
        }
    }
    for after in new
        .iter()
        .filter(|after| old.iter().all(|before| before.key() != after.key()))
    {
        changes.push(prefixed("Now: ", after.clone()));
    }
    changes
}

fn prefixed(lead: &str, mut statement: Statement) -> Statement {
    statement.sentence = Sentence::new().text(lead).then(statement.sentence);
    statement
}

fn was_now(headline: Sentence, before: Statement, after: Statement) -> Statement {
    Statement::uncited(headline)
        .with_details(vec![prefixed("Was: ", before), prefixed("Now: ", after)])
}

fn server_changes(
    doc: &mut Document,
    name: &str,
    old: &Policy,
    new: &Policy,
    sides: Option<(Side<'_>, Side<'_>)>,
) -> bool {
    let mut changes = Changes::default();
    if let Some((old_side, new_side)) = sides {
        let (gained, lost) = tool_access(name, old_side, new_side);
        changes.grants.extend(gained);
        changes.removes.extend(lost);
    }
    let title = Sentence::new().text("Server ").code(name);
    match (old.servers.get(name), new.servers.get(name)) {
        (None, Some(server)) => {
            server_section(doc, title.text(" (added)"), new, name, server);
            changes.grants.insert(
                0,
                Statement::new(
                    Sentence::new().text("The new policy guards this server; before, every request for it was refused"),
                    Cite::setting(format!("servers.{name}")),
                ),
            );
            changes.write_subsections(doc);
            true
        }
        (Some(server), None) => {
            removed_server(name, server, &mut changes);
            changes.write(doc, title.text(" (removed)"))
        }
        (Some(before), Some(after)) if before != after => {
            server_settings(name, (old, before), (new, after), &mut changes);
            rule_changes(&before.rules, &after.rules, &mut changes);
            egress_changes(&before.egress, &after.egress, &mut changes);
            changes.write(doc, title)
        }
        _ => false,
    }
}

fn removed_server(name: &str, server: &ServerPolicy, changes: &mut Changes) {
    let sentence = Sentence::new().text("The new policy drops this server: every request for it is refused, and mcp-guard no longer starts or confines its processes");
    let mut removes = vec![Statement::new(
        sentence,
        Cite::setting(format!("servers.{name}")),
    )];
    removes.extend(
        server
            .rules
            .iter()
            .filter(|rule| rule.effect == Effect::Allow)
            .map(|rule| prefixed("No longer: ", old_rule_statement(rule))),
    );
    removes.extend(
        server
            .egress
            .iter()
            .map(|rule| prefixed("No longer: ", egress_statement(rule))),
    );
    removes.append(&mut changes.removes);
    changes.removes = removes;
}

/// Description, how the server runs, and its own mode.
fn server_settings(
    name: &str,
    (old, before): (&Policy, &ServerPolicy),
    (new, after): (&Policy, &ServerPolicy),
    changes: &mut Changes,
) {
    if before.description != after.description {
        let describe = |server: &ServerPolicy| {
            let text = server.description.as_deref().unwrap_or("(none)");
            Statement::new(
                Sentence::new().text(format!("the description “{}”", text.trim())),
                server_path(name, "description"),
            )
        };
        let headline = Sentence::new().text("The description changed");
        changes
            .other
            .push(was_now(headline, describe(before), describe(after)));
    }
    let is_mode = |statement: &Statement| matches!(statement.key(), Some(Cite::Setting(path)) if path == "mode" || path.ends_with(".mode"));
    let without_mode = |statements: Vec<Statement>| -> Vec<Statement> {
        statements.into_iter().filter(|s| !is_mode(s)).collect()
    };
    changes.other.extend(setting_changes(
        without_mode(how_it_runs(name, before, old.mode)),
        without_mode(how_it_runs(name, after, new.mode)),
    ));
    if before.mode != after.mode {
        mode_change(
            Sentence::new().text("The server"),
            before.effective_mode(old.mode),
            after.effective_mode(new.mode),
            server_path(name, "mode"),
            changes,
        );
    }
}

/// A rule of the old policy, citing it as such.
fn old_rule_statement(rule: &Rule) -> Statement {
    let mut statement = rule_statement(rule);
    statement.cites = vec![Cite::OldRule(rule.id.clone())];
    statement
}

fn rule_changes(old: &[Rule], new: &[Rule], changes: &mut Changes) {
    let find = |rules: &'_ [Rule], id: &str| rules.iter().find(|rule| rule.id == id).cloned();
    for after in new {
        match find(old, &after.id) {
            None => {
                let lead = match after.effect {
                    Effect::Allow => "New rule: ",
                    Effect::Deny => "New refusal: ",
                };
                changes.file(
                    after.effect == Effect::Allow,
                    prefixed(lead, rule_statement(after)),
                );
            }
            Some(before) if &before != after => rule_changed(&before, after, changes),
            Some(_) => {}
        }
    }
    for before in old.iter().filter(|rule| find(new, &rule.id).is_none()) {
        let lead = match before.effect {
            Effect::Allow => "Rule dropped: ",
            Effect::Deny => "Refusal dropped: ",
        };
        changes.file(
            before.effect == Effect::Deny,
            prefixed(lead, old_rule_statement(before)),
        );
    }
}

fn rule_changed(before: &Rule, after: &Rule, changes: &mut Changes) {
    let (mut was, mut now) = (old_rule_statement(before), rule_statement(after));
    if before.description == after.description {
        (was.note, now.note) = (None, None);
    }
    let headline = |what: &str| Sentence::new().text("Rule ").code(&after.id).text(what);
    let allows = after.effect == Effect::Allow;
    let (headline, widens) = match (before.effect, after.effect, compare_rules(before, after)) {
        (Effect::Allow, Effect::Deny, _) => {
            (headline(" now refuses instead of allowing"), Some(false))
        }
        (Effect::Deny, Effect::Allow, _) => {
            (headline(" now allows instead of refusing"), Some(true))
        }
        (_, _, Scope::Wider) if allows => (headline(" allows more"), Some(true)),
        (_, _, Scope::Narrower) if allows => (headline(" allows less"), Some(false)),
        (_, _, Scope::Wider) => (headline(" refuses more"), Some(false)),
        (_, _, Scope::Narrower) => (headline(" refuses less"), Some(true)),
        (_, _, Scope::Same) => (
            headline(" is reworded; it applies to the same requests"),
            None,
        ),
        (_, _, Scope::Different) => (
            headline(" changes what it applies to; this may both grant and remove access"),
            None,
        ),
    };
    let statement = was_now(headline, was, now);
    match widens {
        Some(widens) => changes.file(widens, statement),
        None => changes.other.push(statement),
    }
}

fn egress_changes(old: &[EgressRule], new: &[EgressRule], changes: &mut Changes) {
    let find = |rules: &'_ [EgressRule], id: &str| rules.iter().find(|rule| rule.id == id).cloned();
    for after in new {
        match find(old, &after.id) {
            None => changes
                .grants
                .push(prefixed("New destination: ", egress_statement(after))),
            Some(before) if &before != after => egress_changed(&before, after, changes),
            Some(_) => {}
        }
    }
    for before in old.iter().filter(|rule| find(new, &rule.id).is_none()) {
        changes
            .removes
            .push(prefixed("Destination dropped: ", egress_statement(before)));
    }
}

fn egress_changed(before: &EgressRule, after: &EgressRule, changes: &mut Changes) {
    let headline = |what: &str| {
        Sentence::new()
            .text("Egress rule ")
            .code(&after.id)
            .text(what)
    };
    let statement = |headline| was_now(headline, egress_statement(before), egress_statement(after));
    match compare_egress(before, after) {
        Scope::Wider => changes.grants.push(statement(headline(" allows more"))),
        Scope::Narrower => changes.removes.push(statement(headline(" allows less"))),
        Scope::Same => changes.other.push(statement(headline(
            " is reworded; it allows the same destinations",
        ))),
        Scope::Different => changes.other.push(statement(headline(
            " changes its destinations; this may both grant and remove access",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::{Value, json};

    use super::*;

    fn policy(rules: Value, egress: Value) -> Policy {
        let policy = json!({
            "version": 1,
            "principals": { "alice": { "roles": ["support"] } },
            "servers": { "fs": { "command": ["mcp-fs"], "egress": egress, "rules": rules } }
        });
        Policy::from_json_str(&policy.to_string(), Path::new("test.json"))
            .unwrap()
            .policy
    }

    fn rule(id: &str, effect: &str, tools: &[&str]) -> Value {
        json!({ "id": id, "description": "d", "effect": effect, "roles": ["support"], "tools": tools })
    }

    /// The bullets under `heading` (`Grants`, `Removes`, `Other changes`) of the markdown diff.
    fn under(heading: &str, old: &Policy, new: &Policy) -> Vec<String> {
        let text = diff(old, new, ExplainFormat::Text);
        text.split(&format!("{heading}:\n\n"))
            .nth(1)
            .map(|rest| {
                rest.split("\n\n")
                    .next()
                    .unwrap_or("")
                    .lines()
                    .filter(|line| line.starts_with("- "))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn equal_policies_have_no_differences() {
        let same = policy(json!([rule("read", "allow", &["get"])]), json!([]));
        assert_eq!(
            diff(&same, &same, ExplainFormat::Markdown),
            "No differences.\n"
        );
    }

    #[test]
    fn a_new_allow_rule_grants_and_a_new_deny_rule_removes() {
        let old = policy(json!([rule("read", "allow", &["get", "put"])]), json!([]));
        let new = policy(
            json!([
                rule("read", "allow", &["get", "put"]),
                rule("search", "allow", &["search"]),
                rule("no-put", "deny", &["put"])
            ]),
            json!([]),
        );
        let grants = under("Grants", &old, &new);
        assert!(
            grants
                .iter()
                .any(|l| l
                    .starts_with("- New rule: Callers with role support may call the tool search")),
            "{grants:?}"
        );
        assert!(
            grants
                .iter()
                .any(|l| l.contains("may now call the tool search [rule search]")),
            "{grants:?}"
        );
        let removes = under("Removes", &old, &new);
        assert!(
            removes.iter().any(|l| l
                .starts_with("- New refusal: Callers with role support may not call the tool put")),
            "{removes:?}"
        );
        assert!(
            removes
                .iter()
                .any(|l| l
                    .contains("may no longer call the tool put [old rule read and rule no-put]")),
            "{removes:?}"
        );
    }

    #[test]
    fn dropping_a_refusal_grants_and_narrowing_a_rule_removes() {
        let old = policy(
            json!([
                rule("read", "allow", &["get", "put"]),
                rule("no-put", "deny", &["put"])
            ]),
            json!([]),
        );
        let new = policy(json!([rule("read", "allow", &["get"])]), json!([]));
        assert!(
            under("Grants", &old, &new)
                .iter()
                .any(|l| l.starts_with("- Refusal dropped:"))
        );
        assert!(
            under("Removes", &old, &new)
                .iter()
                .any(|l| l.starts_with("- Rule read allows less."))
        );
    }

    #[test]
    fn destinations_are_compared_by_id() {
        let old = policy(
            json!([]),
            json!([{ "id": "db", "cidr": "10.0.0.0/16", "ports": [5432] }]),
        );
        let wider = policy(
            json!([]),
            json!([{ "id": "db", "cidr": "10.0.0.0/8", "ports": [5432] }]),
        );
        let elsewhere = policy(
            json!([]),
            json!([{ "id": "api", "host": "api.example.com", "ports": [443] }]),
        );
        assert!(
            under("Grants", &old, &wider)
                .iter()
                .any(|l| l.starts_with("- Egress rule db allows more."))
        );
        assert!(
            under("Removes", &old, &elsewhere)
                .iter()
                .any(|l| l.starts_with("- Destination dropped:"))
        );
        assert!(
            under("Grants", &old, &elsewhere)
                .iter()
                .any(|l| l.starts_with("- New destination:"))
        );
    }

    #[test]
    fn a_switch_to_shadow_mode_grants_and_back_removes() {
        let enforce = policy(json!([]), json!([]));
        let mut shadow = enforce.clone();
        shadow.mode = Mode::Shadow;
        assert!(
            under("Grants", &enforce, &shadow)
                .iter()
                .any(|l| l.contains("now runs in shadow mode"))
        );
        assert!(
            under("Removes", &shadow, &enforce)
                .iter()
                .any(|l| l.contains("now runs in enforce mode"))
        );
    }

    #[test]
    fn settings_explain_does_not_describe_are_named_as_such() {
        let old = policy(json!([]), json!([]));
        let mut new = old.clone();
        new.daemon.max_batch_size = 8;
        assert_eq!(
            diff(&old, &new, ExplainFormat::Text),
            NO_DESCRIBED_DIFFERENCES
        );
    }
}
