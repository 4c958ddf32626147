//! What can go wrong when loading a policy, and how each problem is reported.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy file could not be read.
    #[error("{}: cannot read policy: {source}", path.display())]
    Io {
        /// The file that was to be read.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The text is not JSON, or does not have the policy's shape (unknown field, wrong type,
    /// missing required field, malformed port or CIDR).
    #[error("{}:{line}:{column}: {}{message}", path.display(), path_prefix(json_path))]
    Parse {
        /// Where the text came from (a file path, or a label such as `<stdin>`).
        path: PathBuf,
        /// 1-based line of the fault in the text.
        line: usize,
        /// 1-based column of the fault in the text.
        column: usize,
        /// JSON path of the field at fault, e.g. `servers.fetch.egress[1].ports[0]`; empty when
        /// the fault is in the top-level object or the text is not JSON at all.
        json_path: String,
        /// What is wrong, without the position (which is in the fields above).
        message: String,
    },

    /// The policy parsed but breaks at least one rule. `problems` lists every problem found,
    /// warnings included, so a `policy check` can show them all at once.
    #[error("{}: invalid policy: {}", path.display(), join_errors(problems))]
    Invalid {
        /// Where the text came from, as for [`PolicyError::Parse`].
        path: PathBuf,
        problems: Vec<Problem>,
    },

    /// A policy handed to [`super::CompiledPolicy::compile`] breaks at least one rule (only a
    /// policy built in code can: one loaded from a file was validated as it was read).
    #[error("invalid policy: {}", join_errors(problems))]
    Rejected {
        /// The errors found, each with its JSON path.
        problems: Vec<Problem>,
    },
}

fn path_prefix(json_path: &str) -> String {
    if json_path.is_empty() {
        String::new()
    } else {
        format!("{json_path}: ")
    }
}

fn join_errors(problems: &[Problem]) -> String {
    problems
        .iter()
        .filter(|problem| problem.severity == Severity::Error)
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// How much a [`Problem`] matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The policy is refused.
    Error,
    /// The policy loads, but probably does not do what its author meant.
    Warning,
}

/// One finding of semantic validation, located by the JSON path of the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// JSON path such as `servers.fetch.egress[2].id`; empty for the policy as a whole.
    pub path: String,
    /// What is wrong and, where it helps, how to fix it.
    pub message: String,
    pub severity: Severity,
}

impl Problem {
    pub fn error(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            severity: Severity::Error,
        }
    }

    pub fn warning(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            severity: Severity::Warning,
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}
