//! What the proxy asks the policy ([`DecisionRequest`]) and what it gets back ([`Decision`]).
//!
//! Everything here borrows: a decision names the rule and the request parts it is about
//! without copying them, so that deciding allocates nothing. Only a refusal for arguments
//! carries owned text (the schema error), built when that refusal happens.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;

use super::model::Effect;

/// Context values carried with a session or a request (such as a workflow step), which rules
/// test with `when`.
///
/// Implemented for maps of strings, for arrays, vectors and slice references of
/// `(key, value)` pairs, and for [`NoContext`];
/// a proxy that keeps context in two places (the session and the request's `_meta`) can
/// implement it on a struct that looks in both. `Sync`, so that a [`DecisionRequest`] can be
/// held across an `.await` in a task that moves between threads.
pub trait Context: Sync {
    /// The value of `key`, if the session or the request carries one.
    fn value(&self, key: &str) -> Option<&str>;
}

/// No context values at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoContext;

impl Context for NoContext {
    fn value(&self, _key: &str) -> Option<&str> {
        None
    }
}

/// The value of `key` in a list of pairs (the first, if listed twice).
fn value_in_pairs<'p, K: AsRef<str>, V: AsRef<str>>(
    pairs: &'p [(K, V)],
    key: &str,
) -> Option<&'p str> {
    pairs
        .iter()
        .find(|(k, _)| k.as_ref() == key)
        .map(|(_, v)| v.as_ref())
}

impl<K: AsRef<str> + Sync, V: AsRef<str> + Sync, const N: usize> Context for [(K, V); N] {
    fn value(&self, key: &str) -> Option<&str> {
        value_in_pairs(self, key)
    }
}

impl<K: AsRef<str> + Sync, V: AsRef<str> + Sync> Context for &[(K, V)] {
    fn value(&self, key: &str) -> Option<&str> {
        value_in_pairs(self, key)
    }
}

impl<K: AsRef<str> + Sync, V: AsRef<str> + Sync> Context for Vec<(K, V)> {
    fn value(&self, key: &str) -> Option<&str> {
        value_in_pairs(self, key)
    }
}

impl<V: AsRef<str> + Sync, S: BuildHasher + Sync> Context for HashMap<String, V, S> {
    fn value(&self, key: &str) -> Option<&str> {
        self.get(key).map(AsRef::as_ref)
    }
}

impl<V: AsRef<str> + Sync> Context for BTreeMap<String, V> {
    fn value(&self, key: &str) -> Option<&str> {
        self.get(key).map(AsRef::as_ref)
    }
}

/// One MCP operation to authorise.
#[derive(Clone, Copy)]
pub struct DecisionRequest<'a> {
    /// The server the operation is for (a key of the policy's `servers`).
    pub server: &'a str,
    /// Who is asking: a principal name, or `""` for a caller nobody identified, who then
    /// matches only rules naming neither principals nor roles.
    pub principal: &'a str,
    /// The caller's roles. They are an input rather than looked up from `principal`, because
    /// they may come from a token's claims; for a configured principal use
    /// [`super::CompiledPolicy::roles_of`].
    pub roles: &'a [String],
    /// The JSON-RPC method, e.g. `tools/call` (for a server→client request such as
    /// `sampling/createMessage`, that method).
    pub method: &'a str,
    /// `params.name` of `tools/call` and `prompts/get`, `params.uri` of `resources/read`,
    /// `resources/subscribe` and `resources/unsubscribe`; `None` for other methods.
    pub name: Option<&'a str>,
    /// `params.arguments` of `tools/call` and `prompts/get`; `None` when absent (judged as
    /// `{}`).
    pub arguments: Option<&'a serde_json::Value>,
    /// Context values for rules' `when` conditions.
    pub context: &'a dyn Context,
}

impl<'a> DecisionRequest<'a> {
    /// A request without name, arguments or context; add them with the `with_*` methods.
    pub fn new(server: &'a str, principal: &'a str, roles: &'a [String], method: &'a str) -> Self {
        Self {
            server,
            principal,
            roles,
            method,
            name: None,
            arguments: None,
            context: &NoContext,
        }
    }

    pub fn with_name(self, name: &'a str) -> Self {
        Self {
            name: Some(name),
            ..self
        }
    }

    pub fn with_arguments(self, arguments: &'a serde_json::Value) -> Self {
        Self {
            arguments: Some(arguments),
            ..self
        }
    }

    pub fn with_context(self, context: &'a dyn Context) -> Self {
        Self { context, ..self }
    }

    pub(super) fn operation(&self) -> Operation<'a> {
        Operation {
            method: self.method,
            name: self.name,
        }
    }
}

impl fmt::Debug for DecisionRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecisionRequest")
            .field("server", &self.server)
            .field("principal", &self.principal)
            .field("roles", &self.roles)
            .field("method", &self.method)
            .field("name", &self.name)
            .field("arguments", &self.arguments)
            .finish_non_exhaustive()
    }
}

/// The policy's answer for one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'a> {
    pub effect: Effect,
    /// Id of the rule that decided: the rule that allowed or denied, or the allow rule whose
    /// `arguments` the request failed. `None` for protocol plumbing, an unknown server and
    /// the default deny.
    pub rule: Option<&'a str>,
    /// Why, in words (see its `Display`).
    pub reason: DecisionReason<'a>,
}

impl Decision<'_> {
    pub fn is_allowed(&self) -> bool {
        self.effect == Effect::Allow
    }
}

/// Why a [`Decision`] came out as it did. `Display` renders one plain sentence for refusals,
/// logs and audit records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionReason<'a> {
    /// The method is protocol plumbing, which needs no rule.
    Plumbing { method: &'a str },
    /// The policy has no server of that name.
    UnknownServer { server: &'a str },
    /// A rule applied: a deny rule (which overrides allow rules), or else an allow rule.
    Rule {
        rule: &'a str,
        effect: Effect,
        operation: Operation<'a>,
        caller: Caller<'a>,
    },
    /// No deny rule applied, and the only allow rules that otherwise matched refused the
    /// arguments; `failure` is the first constraint the first such rule found broken.
    ArgumentsRejected {
        rule: &'a str,
        operation: Operation<'a>,
        failure: ArgumentFailure,
    },
    /// No rule applied: denied by default.
    NoRuleAllows {
        operation: Operation<'a>,
        principal: &'a str,
    },
}

impl fmt::Display for DecisionReason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Plumbing { method } => {
                write!(f, "{method} is protocol plumbing, which needs no rule")
            }
            Self::UnknownServer { server } => write!(f, "the policy has no server `{server}`"),
            Self::Rule {
                rule,
                effect,
                operation,
                caller,
            } => {
                let verb = match effect {
                    Effect::Allow => "allows",
                    Effect::Deny => "denies",
                };
                write!(f, "rule `{rule}` {verb} {operation} {caller}")
            }
            Self::ArgumentsRejected { rule, failure, .. } => {
                write!(f, "arguments do not satisfy rule `{rule}`: {failure}")
            }
            Self::NoRuleAllows {
                operation,
                principal,
            } => {
                write!(f, "no rule allows {operation} ")?;
                if principal.is_empty() {
                    f.write_str("for an unidentified caller")?;
                } else {
                    write!(f, "for principal {principal}")?;
                }
                f.write_str(" (default deny)")
            }
        }
    }
}

/// The method and, where it has one, the tool, prompt or resource an operation is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operation<'a> {
    pub method: &'a str,
    pub name: Option<&'a str>,
}

impl fmt::Display for Operation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name {
            Some(name) => write!(f, "{} {name}", self.method),
            None => f.write_str(self.method),
        }
    }
}

/// How the caller matched a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    /// The rule names neither principals nor roles.
    Anyone,
    /// The rule names the caller's principal.
    Principal(&'a str),
    /// The rule names one of the caller's roles.
    Role(&'a str),
}

impl fmt::Display for Caller<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Anyone => f.write_str("for any caller"),
            Self::Principal(principal) => write!(f, "for principal {principal}"),
            Self::Role(role) => write!(f, "for role {role}"),
        }
    }
}

/// The first constraint of a rule's `arguments` schema that a request broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgumentFailure {
    /// JSON Pointer into the arguments (`/path`), empty for the arguments as a whole.
    pub instance_path: String,
    /// The validator's message, shortened if long (it may quote the argument).
    pub message: String,
}

impl fmt::Display for ArgumentFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.instance_path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.instance_path, self.message)
        }
    }
}
