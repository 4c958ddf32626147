//! The MCP methods the policy knows about: which pass as protocol plumbing, which carry a
//! tool, resource or prompt name, and which carry arguments.

/// Methods every caller may use without a rule: without them no session could start, stay
/// alive or wind down, and they reach no tool, resource or prompt.
pub const PLUMBING_METHODS: [&str; 7] = [
    "initialize",
    "notifications/initialized",
    "ping",
    "notifications/cancelled",
    "notifications/progress",
    "server/discover",
    "notifications/roots/list_changed",
];

/// The kinds of thing a rule can name, by the rule field that names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Tool,
    Resource,
    Prompt,
}

impl Target {
    /// The rule field naming things of this kind.
    pub fn field(self) -> &'static str {
        match self {
            Self::Tool => "tools",
            Self::Resource => "resources",
            Self::Prompt => "prompts",
        }
    }
}

/// Methods that act on one named tool, resource or prompt, with the kind of thing they name.
/// A rule with `tools`, `resources` or `prompts` applies to these methods only. The position
/// in this list is the slot of the method's name index in a compiled policy.
pub const NAMED_METHODS: [(&str, Target); 5] = [
    ("tools/call", Target::Tool),
    ("resources/read", Target::Resource),
    ("resources/subscribe", Target::Resource),
    ("resources/unsubscribe", Target::Resource),
    ("prompts/get", Target::Prompt),
];

/// Methods whose `params.arguments` a rule's `arguments` schema judges.
pub const ARGUMENT_METHODS: [&str; 2] = ["tools/call", "prompts/get"];

/// Every other method of the MCP revisions mcp-guard speaks, client→server and
/// server→client; used only to warn about a method name that is probably a typo.
const OTHER_KNOWN_METHODS: [&str; 20] = [
    "tools/list",
    "resources/list",
    "resources/templates/list",
    "prompts/list",
    "completion/complete",
    "logging/setLevel",
    "sampling/createMessage",
    "elicitation/create",
    "roots/list",
    "notifications/message",
    "notifications/tools/list_changed",
    "notifications/resources/list_changed",
    "notifications/resources/updated",
    "notifications/prompts/list_changed",
    "notifications/elicitation/complete",
    "tasks/get",
    "tasks/result",
    "tasks/list",
    "tasks/cancel",
    "notifications/tasks/status",
];

/// True for the methods that pass without a rule (see [`PLUMBING_METHODS`]).
pub fn is_plumbing(method: &str) -> bool {
    PLUMBING_METHODS.contains(&method)
}

/// The slot of `method` in [`NAMED_METHODS`]; a `match` so that the hot path does not scan.
pub fn named_slot(method: &str) -> Option<usize> {
    match method {
        "tools/call" => Some(0),
        "resources/read" => Some(1),
        "resources/subscribe" => Some(2),
        "resources/unsubscribe" => Some(3),
        "prompts/get" => Some(4),
        _ => None,
    }
}

/// True for a method this build knows by name.
pub fn is_known(method: &str) -> bool {
    known_methods().any(|known| known == method)
}

/// Every method this build knows by name.
pub fn known_methods() -> impl Iterator<Item = &'static str> {
    PLUMBING_METHODS
        .into_iter()
        .chain(NAMED_METHODS.into_iter().map(|(method, _)| method))
        .chain(OTHER_KNOWN_METHODS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_slots_follow_the_named_method_list() {
        for (slot, (method, _)) in NAMED_METHODS.iter().enumerate() {
            assert_eq!(named_slot(method), Some(slot), "{method}");
        }
        assert_eq!(named_slot("tools/list"), None);
    }

    #[test]
    fn argument_methods_are_named_methods() {
        for method in ARGUMENT_METHODS {
            assert!(named_slot(method).is_some(), "{method}");
        }
    }
}
