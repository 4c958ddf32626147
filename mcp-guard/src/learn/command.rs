//! `mcp-guard policy suggest`: reads the audit logs, writes the suggested policy, prints the
//! scope report.
//!
//! The policy and the report never share a stream, so either can be piped:
//! - the policy goes to `--out FILE`, or else to stdout;
//! - the text report goes to stderr;
//! - with `--json`, the report is JSON: on stdout when `--out` took the policy, else on
//!   stderr (stdout holds the policy).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use super::LearnError;
use super::observe::{Observations, Subject};
use super::scope::{self, Compared, ScopeReport};
use super::suggest::suggest;
use crate::cli::SuggestArgs;
use crate::policy::{CompiledPolicy, LoadedPolicy, Policy};

pub fn run(args: &SuggestArgs) -> Result<(), LearnError> {
    let current = args.policy.as_deref().map(Policy::load).transpose()?;
    let mut observations = Observations::new(known_roles(current.as_ref()));
    observations.read(&args.audit)?;
    if observations.is_empty() {
        let files: Vec<String> = args.audit.iter().map(|p| p.display().to_string()).collect();
        return Err(LearnError::NothingObserved {
            files: files.join(", "),
        });
    }
    let before = current.as_ref().map(|loaded| &loaded.policy);
    let suggestion = suggest(&observations, before);
    let report = scope_report(&observations, args, before, &suggestion)?;
    write_policy(&suggestion, args.out.as_deref())?;
    write_report(&report, args)
}

/// Principal → roles from the policy in force, for records that do not carry `roles`.
fn known_roles(current: Option<&LoadedPolicy>) -> BTreeMap<String, Vec<String>> {
    current.map_or_else(BTreeMap::new, |loaded| {
        loaded
            .policy
            .principals
            .iter()
            .map(|(name, principal)| (name.clone(), principal.roles.clone()))
            .collect()
    })
}

fn scope_report(
    observations: &Observations,
    args: &SuggestArgs,
    before: Option<&Policy>,
    suggestion: &Policy,
) -> Result<ScopeReport, LearnError> {
    let after_compiled = CompiledPolicy::compile(suggestion).map_err(LearnError::Suggestion)?;
    // A policy that loaded compiles (validation compiles what the compiler does).
    let before_compiled = before.map(CompiledPolicy::compile).transpose()?;
    let compared = Compared {
        before: before.zip(before_compiled.as_ref()),
        after: (suggestion, &after_compiled),
    };
    let notes = notes(observations, before, suggestion);
    Ok(scope::report(
        observations,
        &compared,
        args.policy.clone(),
        notes,
    ))
}

/// What the user must know or do before enforcing the suggestion.
fn notes(observations: &Observations, before: Option<&Policy>, suggestion: &Policy) -> Vec<String> {
    let mut notes = Vec::new();
    if before.is_none() {
        notes.push(
            "no --policy: the suggestion has default daemon, identity and audit settings, and \
             servers without `command` or `url`; fill those in (or pass the policy in force \
             with --policy) before running it"
                .to_owned(),
        );
    }
    for (name, usage) in &observations.servers {
        if !usage.modes.contains("learn") && !usage.modes.contains("shadow") {
            notes.push(format!(
                "server {name}: no learn- or shadow-mode records: only what the policy then in \
                 force let through could be observed, and argument constraints need learn mode"
            ));
        }
        for subject in usage.callers.keys() {
            if let Subject::Principal(principal) = subject {
                notes.push(format!(
                    "server {name}: principal {principal} held no single role, so its rules \
                     name the principal"
                ));
            }
        }
    }
    if let Some(before) = before {
        for name in before.servers.keys() {
            if !observations.servers.contains_key(name) {
                notes.push(format!(
                    "server {name}: no records: the suggestion allows it no MCP operation and \
                     no network destination"
                ));
            }
        }
    }
    for problem in suggestion.validate() {
        notes.push(format!("suggested policy: {problem}"));
    }
    notes.extend(observations.skipped.iter().cloned());
    notes
}

fn write_policy(policy: &Policy, out: Option<&Path>) -> Result<(), LearnError> {
    let mut text = serde_json::to_string_pretty(policy)?;
    text.push('\n');
    match out {
        Some(path) => std::fs::write(path, text).map_err(|source| LearnError::Write {
            path: path.to_owned(),
            source,
        }),
        None => Ok(std::io::stdout().lock().write_all(text.as_bytes())?),
    }
}

fn write_report(report: &ScopeReport, args: &SuggestArgs) -> Result<(), LearnError> {
    if !args.json {
        return Ok(std::io::stderr()
            .lock()
            .write_all(report.to_text().as_bytes())?);
    }
    let mut text = serde_json::to_string_pretty(report)?;
    text.push('\n');
    if args.out.is_some() {
        std::io::stdout().lock().write_all(text.as_bytes())?;
    } else {
        std::io::stderr().lock().write_all(text.as_bytes())?;
    }
    Ok(())
}
