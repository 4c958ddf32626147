//! The declarative JSON policy (format version 1): how it is read, checked and described.
//!
//! Loading goes in three steps, each reporting the JSON path of what it refuses:
//! 1. a version probe, so a policy written for a newer mcp-guard is refused for its version
//!    rather than for fields this build does not know;
//! 2. parsing into [`Policy`], which refuses unknown fields, wrong types and malformed values
//!    (ports, CIDRs, protocols) at the first fault;
//! 3. semantic validation ([`Policy::validate`]), which collects every error and warning.
//!
//! A loaded policy is then compiled ([`CompiledPolicy::compile`]) into the structure the proxy
//! asks about each MCP operation ([`CompiledPolicy::decide`], [`CompiledPolicy::visible`]);
//! the [`compile`] module explains how a decision is made (deny overrides allow, default
//! deny).

mod cidr;
pub mod compile;
mod decision;
pub mod diff;
mod error;
pub mod explain;
mod glob;
mod methods;
mod model;
mod ports;
mod validate;
mod validate_rules;

#[cfg(test)]
mod decide_tests;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use schemars::generate::SchemaSettings;
use serde::Deserialize;

pub use cidr::{CidrError, parse_cidr};
pub use compile::CompiledPolicy;
pub use decision::{
    ArgumentFailure, Caller, Context, Decision, DecisionReason, DecisionRequest, NoContext,
    Operation,
};
pub use error::{PolicyError, Problem, Severity};
pub use glob::matches as glob_matches;
pub use methods::{PLUMBING_METHODS, is_plumbing};
pub use model::{
    Account, AuditSettings, DaemonSettings, Destination, DurableBefore, Effect, EgressRule,
    EnvValue, FrontTls, IdentitySettings, Isolation, JwtAlgorithm, JwtIssuer, JwtKeys, JwtSettings,
    Mode, POLICY_VERSION, Policy, Principal, ProtectedResource, Protocol,
    RESERVED_UPSTREAM_HEADERS, Rule, ServerPolicy, ValueSource, ValueSourceError,
};
pub use ports::{PortRange, PortRangeError};
pub(crate) use validate::{cleartext_front_warning, is_valid_name, is_valid_principal_name};

/// A policy that passed validation, with the warnings it raised (for the CLI to print).
#[derive(Debug, Clone)]
pub struct LoadedPolicy {
    pub policy: Policy,
    pub warnings: Vec<Problem>,
}

impl Policy {
    /// Reads, parses and validates the policy file at `path`.
    pub fn load(path: &Path) -> Result<LoadedPolicy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses and validates policy text; `origin` names where it came from in messages (a
    /// path, or a label such as `<stdin>`).
    pub fn from_json_str(text: &str, origin: &Path) -> Result<LoadedPolicy, PolicyError> {
        if let Some(problem) = unsupported_version(text) {
            return Err(invalid(origin, vec![problem]));
        }
        let policy = parse(text, origin)?;
        let problems = policy.validate();
        if problems.iter().any(Problem::is_error) {
            return Err(invalid(origin, problems));
        }
        Ok(LoadedPolicy {
            policy,
            warnings: problems,
        })
    }

    /// Every semantic problem in this policy, errors and warnings, in file order.
    pub fn validate(&self) -> Vec<Problem> {
        validate::validate(self)
    }

    /// The key files the policy names: those `identity.jwt`'s issuers are verified with
    /// (`pem_file`, `jwks_file`), the HTTP front's certificate and key (`daemon.tls`), and the
    /// files servers' `headers` and `env` values are read from (their credentials).
    pub fn key_files(&self) -> impl Iterator<Item = &Path> {
        let issuers = self.identity.jwt.iter().flat_map(|jwt| &jwt.issuers);
        let jwt_keys = issuers.flat_map(|issuer| {
            let keys = &issuer.keys;
            keys.pem_file.iter().chain(&keys.jwks_file)
        });
        let tls = self.daemon.tls.iter();
        let front = tls.flat_map(|tls| [&tls.cert_file, &tls.key_file]);
        let upstream_secrets = self
            .servers
            .values()
            .flat_map(|server| {
                let env = server.env.values().filter_map(|value| match value {
                    EnvValue::From(source) => Some(source),
                    EnvValue::Text(_) => None,
                });
                server.headers.values().chain(env)
            })
            .filter_map(|source| source.file.as_ref());
        jwt_keys
            .chain(front)
            .chain(upstream_secrets)
            .map(PathBuf::as_path)
    }
}

/// What tells a changed file from the one read: modification time, size and inode (an
/// editor that saves by renaming changes the inode). `None` while the file is missing.
pub type FileStamp = Option<(std::time::SystemTime, u64, u64)>;

pub fn file_stamp(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

/// The files a policy in force was read from: the policy file and the key files it names
/// (`identity.jwt` issuers' `pem_file` and `jwks_file`), as they were then. A change to any
/// of them is a reason to load the policy again, so that rotating an identity provider's keys
/// needs no signal.
pub struct WatchedFiles {
    files: Vec<(PathBuf, FileStamp)>,
}

impl WatchedFiles {
    /// `policy_path` and the key files of `policy`, as they are now.
    pub fn of(policy_path: &Path, policy: &Policy) -> WatchedFiles {
        WatchedFiles { files: Vec::new() }.for_policy(policy_path, policy)
    }

    /// The same files, as they are now. Taken before a reload reads them, so that a file
    /// replaced while the reload reads it is seen as changed at the next look.
    pub fn restamped(&self) -> WatchedFiles {
        let files = self
            .files
            .iter()
            .map(|(path, _)| (path.clone(), file_stamp(path)));
        WatchedFiles {
            files: files.collect(),
        }
    }

    /// The files of `policy` (`policy_path` and its key files): those watched here keep their
    /// stamps, the others are stamped now.
    pub fn for_policy(self, policy_path: &Path, policy: &Policy) -> WatchedFiles {
        let paths = std::iter::once(policy_path).chain(policy.key_files());
        let files = paths.map(|path| {
            let known = self.files.iter().find(|(watched, _)| watched == path);
            let stamp = known.map_or_else(|| file_stamp(path), |(_, stamp)| *stamp);
            (path.to_path_buf(), stamp)
        });
        WatchedFiles {
            files: files.collect(),
        }
    }

    /// The first of the files that changed since, if any: the policy file comes first.
    pub fn changed(&self) -> Option<&Path> {
        self.files
            .iter()
            .find(|(path, stamp)| file_stamp(path) != *stamp)
            .map(|(path, _)| path.as_path())
    }

    /// Whether `path` is the policy file (else it is a key file).
    pub fn is_policy_file(&self, path: &Path) -> bool {
        self.files.first().is_some_and(|(policy, _)| policy == path)
    }
}

/// The policy's JSON Schema (draft 2020-12), as published by `mcp-guard policy schema`.
pub fn json_schema() -> serde_json::Value {
    SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<Policy>()
        .to_value()
}

fn invalid(origin: &Path, problems: Vec<Problem>) -> PolicyError {
    PolicyError::Invalid {
        path: origin.to_owned(),
        problems,
    }
}

/// The version problem of a well-formed policy whose `version` is a number other than 1.
/// Anything else (no JSON, no version, a version of the wrong type) is left to the full parse,
/// which reports it with a position.
fn unsupported_version(text: &str) -> Option<Problem> {
    #[derive(Deserialize)]
    struct VersionProbe {
        version: Option<serde_json::Value>,
    }
    let probe: VersionProbe = serde_json::from_str(text).ok()?;
    validate::version_problem(probe.version?.as_u64()?)
}

fn parse(text: &str, origin: &Path) -> Result<Policy, PolicyError> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let policy = serde_path_to_error::deserialize(&mut deserializer)
        .map_err(|error| parse_error(origin, error.path().to_string(), error.into_inner()))?;
    // Trailing text after the policy object is a mistake (a pasted second copy, say).
    deserializer
        .end()
        .map_err(|error| parse_error(origin, String::new(), error))?;
    Ok(policy)
}

fn parse_error(origin: &Path, json_path: String, error: serde_json::Error) -> PolicyError {
    PolicyError::Parse {
        path: PathBuf::from(origin),
        line: error.line(),
        column: error.column(),
        json_path: tidy_json_path(&json_path),
        message: message_without_position(&error),
    }
}

/// serde_path_to_error writes the top level as "." and a key it has not read yet (the fault
/// is in the syntax where a key should start) as "?"; both are dropped, leaving the path of
/// the object the fault is in, or an empty path for the top level.
fn tidy_json_path(json_path: &str) -> String {
    let mut path = json_path;
    while let Some(parent) = path.strip_suffix(".?") {
        path = parent;
    }
    match path {
        "." | "?" => String::new(),
        _ => path.to_owned(),
    }
}

/// serde_json appends " at line L column C" to its messages; the position is reported in its
/// own fields, so it is cut from the text.
fn message_without_position(error: &serde_json::Error) -> String {
    let message = error.to_string();
    let position = format!(" at line {} column {}", error.line(), error.column());
    match message.strip_suffix(&position) {
        Some(bare) => bare.to_owned(),
        None => message,
    }
}
