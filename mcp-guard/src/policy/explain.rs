//! `mcp-guard policy explain`: the policy in plain language, for a compliance reviewer.

use super::Policy;

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
    let _ = (policy, format);
    String::from("(policy explain is being written)\n")
}
