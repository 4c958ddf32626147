//! `mcp-guard policy explain`: the policy in plain language, for a compliance reviewer.
//!
//! Every sentence ends with where it comes from: `[rule id]` for an MCP rule of the server
//! it is listed under, `[egress rule id]` for a network rule, the JSON path of a setting
//! (`[audit.store_arguments]`), or the name of behaviour built into mcp-guard (`[default
//! deny]`). The output depends on nothing but the policy: maps are sorted, rules keep their
//! file order (readers follow it), and nothing is timestamped, so it can be kept under
//! version control and reviewed like code.
//!
//! The parts are built as a [`doc::Document`] and rendered as Markdown or plain text; `policy
//! diff` ([`super::diff`]) compares the same statements.

pub(crate) mod access;
pub(crate) mod doc;
mod rules;
mod schema;
pub(crate) mod scope;
mod server;
mod settings;

#[cfg(test)]
mod tests;

use super::model::{Effect, Policy, ServerPolicy};
use doc::{Cite, Document, Sentence, Statement};

pub(crate) use rules::rule_statement;
pub(crate) use server::{egress_statement, how_it_runs, mode_consequence, network, server_path};
pub(crate) use settings::{how_decisions_are_made, identity, logging, principals, roles};

/// Output of `policy explain` and `policy diff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExplainFormat {
    /// Markdown, for a review document or a pull request.
    Markdown,
    /// Plain text, for a terminal.
    Text,
}

/// The whole policy, rendered deterministically.
pub fn explain(policy: &Policy, format: ExplainFormat) -> String {
    document(policy).render(format)
}

fn document(policy: &Policy) -> Document {
    let mut doc = Document::default();
    doc.heading(1, Sentence::new().text("What this policy allows"));
    doc.bullets(how_decisions_are_made(policy));
    doc.section(2, Sentence::new().text("Who the callers are"), who(policy));
    for (name, server) in &policy.servers {
        let title = Sentence::new().text("Server ").code(name);
        server_section(&mut doc, title, policy, name, server);
    }
    doc.section(2, Sentence::new().text("What is logged"), logging(policy));
    doc
}

fn who(policy: &Policy) -> Vec<Statement> {
    let mut statements = identity(policy);
    statements.extend(principals(policy));
    statements.extend(roles(policy));
    statements
}

/// A server's part: its description, how it runs, what it may and may not do, and where it
/// may connect. Also used by `policy diff` for servers that appear or disappear.
pub(crate) fn server_section(
    doc: &mut Document,
    title: Sentence,
    policy: &Policy,
    name: &str,
    server: &ServerPolicy,
) {
    doc.heading(2, title);
    if let Some(description) = &server.description {
        doc.paragraph(Statement::new(
            Sentence::new().text(format!("Described as “{}”", description.trim())),
            server_path(name, "description"),
        ));
    }
    doc.section(
        3,
        Sentence::new().text("How it runs"),
        how_it_runs(name, server, policy.mode),
    );
    doc.heading(3, Sentence::new().text("May do"));
    doc.bullets(allowed(name, server));
    doc.heading(3, Sentence::new().text("Refused"));
    doc.bullets(refused(server));
    doc.section(
        3,
        Sentence::new().text("Network"),
        network(name, server, &policy.daemon),
    );
}

fn rules_with(server: &ServerPolicy, effect: Effect) -> impl Iterator<Item = Statement> {
    server
        .rules
        .iter()
        .filter(move |rule| rule.effect == effect)
        .map(rule_statement)
}

fn allowed(name: &str, server: &ServerPolicy) -> Vec<Statement> {
    let statements: Vec<Statement> = rules_with(server, Effect::Allow).collect();
    if !statements.is_empty() {
        return statements;
    }
    vec![Statement::new(
        Sentence::new()
            .text("No rule allows anything: every request other than protocol plumbing is refused"),
        server_path(name, "rules"),
    )]
}

fn refused(server: &ServerPolicy) -> Vec<Statement> {
    let mut statements = vec![Statement::new(
        Sentence::new().text("Everything not allowed above is refused"),
        Cite::Builtin("default deny"),
    )];
    let deny_rules: Vec<Statement> = rules_with(server, Effect::Deny).collect();
    if !deny_rules.is_empty() {
        statements.push(Statement::new(
            Sentence::new().text("What the rules below refuse stays refused even where an allow rule above would let it through"),
            Cite::Builtin("deny overrides allow"),
        ));
    }
    statements.extend(deny_rules);
    statements
}
