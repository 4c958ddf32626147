//! `mcp-guard policy diff`: what a new policy grants or removes, in plain language.

use super::Policy;
use super::explain::ExplainFormat;

/// What `new` grants and removes compared with `old`, rendered deterministically.
pub fn diff(old: &Policy, new: &Policy, format: ExplainFormat) -> String {
    let _ = (old, new, format);
    String::from("(policy diff is being written)\n")
}
