//! The policy compiled for deciding: per server, its rules indexed by the principals and roles
//! they name, by method and by tool, prompt or resource name, so that a decision visits only
//! the rules that can apply and allocates nothing.
//!
//! # How a decision is made
//!
//! 1. Protocol plumbing ([`super::PLUMBING_METHODS`]: `initialize`, `ping`, cancellation and
//!    progress notifications, ...) is allowed without looking at rules, on a known server.
//! 2. A server the policy does not name: denied.
//! 3. Otherwise the server's rules are judged. A rule *applies* when the caller matches
//!    (`principals` or `roles`, either being enough; neither given: anyone), the method matches
//!    `methods`, the name matches `tools`, `resources` or `prompts` (if the rule gives any),
//!    the context matches `when`, and the arguments satisfy `arguments` (if given).
//!    - If a deny rule applies, the request is denied, naming the first such rule in file
//!      order: **deny overrides allow**.
//!    - Else if an allow rule applies, it is allowed, naming the first such rule.
//!    - Else it is denied by default. If some allow rule matched in everything but its
//!      `arguments`, the refusal quotes the first constraint the arguments broke.
//!
//! A rule with `tools`, `resources` or `prompts` applies only to the methods that act on one
//! such thing (`tools/call`; `resources/read`, `resources/subscribe`, `resources/unsubscribe`;
//! `prompts/get`); a rule with `arguments` only to `tools/call` and `prompts/get`. So
//! `tools/list` and the other list methods need a rule of their own, and what they return is
//! filtered with [`CompiledPolicy::visible`].
//!
//! [`super::Policy::validate`] refuses rules that could never apply, and it compiles every
//! `arguments` schema and pattern the way this module does, so a policy that passes
//! `mcp-guard policy check` always compiles.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::LazyLock;

use serde_json::Value;

use super::decision::{
    ArgumentFailure, Caller, Decision, DecisionReason, DecisionRequest, Operation,
};
use super::error::{PolicyError, Problem};
use super::glob::{self, PatternIndex};
use super::methods::{self, ARGUMENT_METHODS, NAMED_METHODS, Target};
use super::model::{Effect, Policy, Rule, ServerPolicy};

/// A policy ready for deciding: built once per policy generation and shared (in an `Arc`) by
/// every connection, so it is immutable, `Send` and `Sync`.
#[derive(Debug)]
pub struct CompiledPolicy {
    servers: BTreeMap<String, ServerRules>,
    roles_of_principal: HashMap<String, Vec<String>>,
}

impl CompiledPolicy {
    /// Validates `policy` and compiles it. Every problem is reported, with its JSON path.
    pub fn compile(policy: &Policy) -> Result<CompiledPolicy, PolicyError> {
        let mut problems = policy.validate();
        problems.retain(Problem::is_error);
        if !problems.is_empty() {
            return Err(PolicyError::Rejected { problems });
        }
        let mut servers = BTreeMap::new();
        for (name, server) in &policy.servers {
            match ServerRules::compile(name, server) {
                Ok(rules) => {
                    servers.insert(name.clone(), rules);
                }
                Err(mut found) => problems.append(&mut found),
            }
        }
        if !problems.is_empty() {
            return Err(PolicyError::Rejected { problems });
        }
        let roles_of_principal = policy
            .principals
            .iter()
            .map(|(name, principal)| (name.clone(), principal.roles.clone()))
            .collect();
        Ok(CompiledPolicy {
            servers,
            roles_of_principal,
        })
    }

    /// Decides one operation (see the module documentation for how).
    pub fn decide<'a>(&'a self, request: &DecisionRequest<'a>) -> Decision<'a> {
        let server = match self.scope(request) {
            Scope::Rules(server) => server,
            Scope::Decided(decision) => return decision,
        };
        let operation = request.operation();
        let check = ArgumentCheck::Validate;
        if let Found::Applies(rule, caller) = server.search(&server.deny, request, check) {
            return rule.decision(operation, caller);
        }
        match server.search(&server.allow, request, check) {
            Found::Applies(rule, caller) => rule.decision(operation, caller),
            Found::ArgumentsFailed(rule) => Decision {
                effect: Effect::Deny,
                rule: Some(&rule.id),
                reason: DecisionReason::ArgumentsRejected {
                    rule: &rule.id,
                    operation,
                    failure: rule.argument_failure(request),
                },
            },
            Found::Nothing => Decision {
                effect: Effect::Deny,
                rule: None,
                reason: DecisionReason::NoRuleAllows {
                    operation,
                    principal: request.principal,
                },
            },
        }
    }

    /// Whether a tool, resource or prompt should appear in list results for this caller:
    /// some allow rule could let them use it (its `arguments`, if any, assumed satisfied), and
    /// no deny rule without `arguments` applies to it. A deny rule with `arguments` refuses
    /// only some calls, so it does not hide the thing. `when` conditions are judged on the
    /// context given, so a tool reserved for a workflow step is listed only during that step.
    ///
    /// `request.method` is the method that would use the thing (`tools/call`,
    /// `resources/read`, `prompts/get`), `request.name` its name or URI.
    pub fn visible(&self, request: &DecisionRequest<'_>) -> bool {
        let server = match self.scope(request) {
            Scope::Rules(server) => server,
            Scope::Decided(decision) => return decision.is_allowed(),
        };
        let check = ArgumentCheck::Optimistic;
        !matches!(
            server.search(&server.deny, request, check),
            Found::Applies(..)
        ) && matches!(
            server.search(&server.allow, request, check),
            Found::Applies(..)
        )
    }

    /// Whether a rule of `server` names the tool `tool` exactly (not through a pattern):
    /// such names are a bounded set the policy's author wrote down, fit for metric labels.
    pub fn names_tool(&self, server: &str, tool: &str) -> bool {
        let Some(rules) = self.servers.get(server) else {
            return false;
        };
        rules.tools_named.contains(tool)
    }

    /// Whether `server` has a rule with this id.
    pub fn has_rule(&self, server: &str, id: &str) -> bool {
        self.servers
            .get(server)
            .is_some_and(|rules| rules.rules.iter().any(|rule| rule.id == id))
    }

    /// The names of the servers the policy guards, in order.
    pub fn server_names(&self) -> impl Iterator<Item = &str> {
        self.servers.keys().map(String::as_str)
    }

    /// The roles the policy gives `principal`; empty for a principal it does not name.
    pub fn roles_of(&self, principal: &str) -> &[String] {
        self.roles_of_principal
            .get(principal)
            .map_or(&[], Vec::as_slice)
    }

    /// The rules that decide the request, unless it is decided without them.
    fn scope<'a>(&'a self, request: &DecisionRequest<'a>) -> Scope<'a> {
        let Some(server) = self.servers.get(request.server) else {
            // Checked before plumbing: nothing passes to a server the policy does not know.
            return Scope::Decided(Decision {
                effect: Effect::Deny,
                rule: None,
                reason: DecisionReason::UnknownServer {
                    server: request.server,
                },
            });
        };
        if methods::is_plumbing(request.method) {
            return Scope::Decided(Decision {
                effect: Effect::Allow,
                rule: None,
                reason: DecisionReason::Plumbing {
                    method: request.method,
                },
            });
        }
        Scope::Rules(server)
    }
}

/// What decides a request: its server's rules, or a decision made without them (an unknown
/// server, protocol plumbing).
enum Scope<'a> {
    Rules(&'a ServerRules),
    Decided(Decision<'a>),
}

/// Where a rule can apply, derived from its `methods`, name lists and `arguments`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reach<'r> {
    /// No name list and no `arguments`: every method matching these patterns.
    Methods(&'r [String]),
    /// `arguments` but no name list: these methods (a subset of [`ARGUMENT_METHODS`]).
    ArgumentMethods(Vec<&'static str>),
    /// A name list: per slot of [`NAMED_METHODS`] the rule can apply to, the name patterns.
    Named(Vec<(usize, &'r [String])>),
}

impl Reach<'_> {
    /// True when the rule can apply to no request at all.
    pub(super) fn is_empty(&self) -> bool {
        match self {
            Self::Methods(patterns) => patterns.is_empty(),
            Self::ArgumentMethods(methods) => methods.is_empty(),
            Self::Named(slots) => slots.is_empty(),
        }
    }
}

pub(super) fn reach(rule: &Rule) -> Reach<'_> {
    let method_matches = |method: &str| {
        rule.methods
            .iter()
            .any(|pattern| glob::matches(pattern, method))
    };
    let takes_arguments =
        |method: &str| rule.arguments.is_none() || ARGUMENT_METHODS.contains(&method);
    if [Target::Tool, Target::Resource, Target::Prompt]
        .into_iter()
        .any(|target| names_of(rule, target).is_some())
    {
        let slots = NAMED_METHODS
            .iter()
            .enumerate()
            .filter(|(_, (method, _))| takes_arguments(method) && method_matches(method))
            .filter_map(|(slot, (_, target))| Some((slot, names_of(rule, *target)?)))
            .collect();
        Reach::Named(slots)
    } else if rule.arguments.is_some() {
        Reach::ArgumentMethods(
            ARGUMENT_METHODS
                .into_iter()
                .filter(|method| method_matches(method))
                .collect(),
        )
    } else {
        Reach::Methods(&rule.methods)
    }
}

/// The rule's name list for `target` (`tools`, `resources` or `prompts`).
pub(super) fn names_of(rule: &Rule, target: Target) -> Option<&[String]> {
    match target {
        Target::Tool => rule.tools.as_deref(),
        Target::Resource => rule.resources.as_deref(),
        Target::Prompt => rule.prompts.as_deref(),
    }
}

/// Compiles a rule's `arguments` schema; the error is a message for a [`Problem`].
///
/// Formats are asserted because an author writing `"format": "uri"` in a security policy
/// means it as a constraint, not an annotation. This build of the validator resolves no
/// remote or file `$ref`, so compiling a policy never reaches outside it.
pub(super) fn compile_arguments_schema(schema: &Value) -> Result<jsonschema::Validator, String> {
    if !schema.is_object() {
        return Err("must be a JSON Schema object, such as {\"type\": \"object\"}".to_owned());
    }
    jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
        .map_err(|error| {
            let at = error.instance_path().to_string();
            if at.is_empty() {
                format!("is not a valid JSON Schema: {error}")
            } else {
                format!("is not a valid JSON Schema: {error} (at {at})")
            }
        })
}

/// How a rule's `arguments` is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArgumentCheck {
    /// Against the request's arguments.
    Validate,
    /// As the caller would like it: an allow rule's constraint counts as met, a deny rule
    /// with a constraint as not applying. For deciding visibility, where there are no
    /// arguments yet.
    Optimistic,
}

/// One server's rules, with an index for each effect so that deny rules can be searched
/// first and alone.
#[derive(Debug)]
struct ServerRules {
    rules: Vec<CompiledRule>,
    deny: RuleIndex,
    allow: RuleIndex,
    /// The tool names its rules give exactly (not through a pattern).
    tools_named: HashSet<Box<str>>,
}

/// Rules by whom and where they can apply; values are positions in [`ServerRules::rules`].
///
/// A rule is filed under each principal and role it names (or under anyone), so a request
/// meets only the rules its caller can match: with thousands of rules, most name a caller,
/// and those of other callers would otherwise all be judged for every request that reaches
/// their method (`"methods": ["resources/*"]` for every team, say).
#[derive(Debug, Default)]
struct RuleIndex {
    /// Rules naming neither principals nor roles.
    anyone: TargetIndex,
    by_principal: HashMap<Box<str>, TargetIndex>,
    by_role: HashMap<Box<str>, TargetIndex>,
}

impl RuleIndex {
    fn insert(&mut self, rule: &Rule, position: u32) {
        if rule.principals.is_none() && rule.roles.is_none() {
            self.anyone.insert(rule, position);
            return;
        }
        let callers = [
            (&mut self.by_principal, &rule.principals),
            (&mut self.by_role, &rule.roles),
        ];
        for (index, names) in callers {
            for name in names.iter().flatten() {
                index
                    .entry(name.as_str().into())
                    .or_default()
                    .insert(rule, position);
            }
        }
    }

    /// Visits every rule that can apply to the request, possibly more than once.
    fn for_each_candidate(&self, request: &DecisionRequest<'_>, mut visit: impl FnMut(u32)) {
        let (method, name) = (request.method, request.name);
        self.anyone.for_each_candidate(method, name, &mut visit);
        if let Some(index) = self.by_principal.get(request.principal) {
            index.for_each_candidate(method, name, &mut visit);
        }
        for role in request.roles {
            if let Some(index) = self.by_role.get(role.as_str()) {
                index.for_each_candidate(method, name, &mut visit);
            }
        }
    }
}

/// Rules by where they can apply (method, and tool, resource or prompt name).
#[derive(Debug, Default)]
struct TargetIndex {
    /// Rules without a name list, by method (exact or pattern).
    by_method: PatternIndex<u32>,
    /// Rules with a name list, per slot of [`NAMED_METHODS`], by name (exact or pattern).
    by_name: [PatternIndex<u32>; NAMED_METHODS.len()],
}

impl TargetIndex {
    fn insert(&mut self, rule: &Rule, position: u32) {
        match reach(rule) {
            Reach::Methods(patterns) => {
                for pattern in patterns {
                    self.by_method.insert(pattern, position);
                }
            }
            Reach::ArgumentMethods(methods) => {
                for method in methods {
                    self.by_method.insert(method, position);
                }
            }
            Reach::Named(slots) => {
                for (slot, names) in slots {
                    for name in names {
                        self.by_name[slot].insert(name, position);
                    }
                }
            }
        }
    }

    /// Visits every rule that can apply to `method` on `name`, possibly more than once.
    fn for_each_candidate(&self, method: &str, name: Option<&str>, mut visit: impl FnMut(u32)) {
        self.by_method.for_each_match(method, &mut visit);
        if let (Some(slot), Some(name)) = (methods::named_slot(method), name) {
            self.by_name[slot].for_each_match(name, visit);
        }
    }
}

/// The tool names `server`'s rules give exactly: such names are a bounded set the policy's
/// author wrote down.
fn tools_named(server: &ServerPolicy) -> HashSet<Box<str>> {
    server
        .rules
        .iter()
        .filter_map(|rule| rule.tools.as_deref())
        .flatten()
        .filter(|name| !glob::is_pattern(name))
        .map(|name| name.as_str().into())
        .collect()
}

/// The outcome of searching one effect's rules.
enum Found<'r> {
    /// The first rule (in file order) that applies, and how the caller matched it.
    Applies(&'r CompiledRule, Caller<'r>),
    /// None applies, but this one (the first such) matched in all but its `arguments`.
    ArgumentsFailed(&'r CompiledRule),
    Nothing,
}

impl ServerRules {
    fn compile(server_name: &str, server: &ServerPolicy) -> Result<Self, Vec<Problem>> {
        let mut compiled = ServerRules {
            rules: Vec::with_capacity(server.rules.len()),
            deny: RuleIndex::default(),
            allow: RuleIndex::default(),
            tools_named: tools_named(server),
        };
        let mut problems = Vec::new();
        for (position, rule) in server.rules.iter().enumerate() {
            let path = format!("servers.{server_name}.rules[{position}]");
            let Ok(position) = u32::try_from(position) else {
                problems.push(Problem::error(&path, "too many rules in one server"));
                break;
            };
            match CompiledRule::compile(&path, rule) {
                Ok(rule) => compiled.rules.push(rule),
                Err(problem) => problems.push(problem),
            }
            match rule.effect {
                Effect::Deny => compiled.deny.insert(rule, position),
                Effect::Allow => compiled.allow.insert(rule, position),
            }
        }
        if problems.is_empty() {
            Ok(compiled)
        } else {
            Err(problems)
        }
    }

    /// The first rule of `index` (in file order) that applies to `request`.
    fn search<'r>(
        &'r self,
        index: &RuleIndex,
        request: &DecisionRequest<'_>,
        check: ArgumentCheck,
    ) -> Found<'r> {
        let mut applies: Option<(u32, Caller<'r>)> = None;
        let mut arguments_failed: Option<u32> = None;
        index.for_each_candidate(request, |position| {
            // Only an earlier rule can change the answer; this also skips repeats.
            if applies.is_some_and(|(first, _)| first <= position) {
                return;
            }
            match self.rules[position as usize].judge(request, check) {
                Judgement::Applies(caller) => applies = Some((position, caller)),
                Judgement::ArgumentsFail => {
                    if arguments_failed.is_none_or(|first| position < first) {
                        arguments_failed = Some(position);
                    }
                }
                Judgement::DoesNotApply => {}
            }
        });
        match (applies, arguments_failed) {
            (Some((position, caller)), _) => Found::Applies(&self.rules[position as usize], caller),
            (None, Some(position)) => Found::ArgumentsFailed(&self.rules[position as usize]),
            (None, None) => Found::Nothing,
        }
    }
}

/// How one rule judged one request.
enum Judgement<'r> {
    Applies(Caller<'r>),
    /// Everything matched but the arguments.
    ArgumentsFail,
    DoesNotApply,
}

/// A rule as the evaluator needs it: method and name are in the index, the rest is here.
#[derive(Debug)]
struct CompiledRule {
    id: String,
    effect: Effect,
    principals: Option<NameSet>,
    roles: Option<NameSet>,
    when: Vec<(String, NameSet)>,
    arguments: Option<jsonschema::Validator>,
}

/// What a request with no `arguments` is judged as.
static NO_ARGUMENTS: LazyLock<Value> = LazyLock::new(|| Value::Object(serde_json::Map::new()));

impl CompiledRule {
    fn compile(path: &str, rule: &Rule) -> Result<Self, Problem> {
        let arguments = rule
            .arguments
            .as_ref()
            .map(compile_arguments_schema)
            .transpose()
            .map_err(|message| Problem::error(format!("{path}.arguments"), message))?;
        Ok(CompiledRule {
            id: rule.id.clone(),
            effect: rule.effect,
            principals: rule.principals.as_deref().map(NameSet::new),
            roles: rule.roles.as_deref().map(NameSet::new),
            when: rule
                .when
                .iter()
                .map(|(key, values)| (key.clone(), NameSet::new(values)))
                .collect(),
            arguments,
        })
    }

    /// Cheapest conditions first: the arguments schema is judged last, and only when the
    /// caller and the context match.
    fn judge(&self, request: &DecisionRequest<'_>, check: ArgumentCheck) -> Judgement<'_> {
        let Some(caller) = self.caller(request.principal, request.roles) else {
            return Judgement::DoesNotApply;
        };
        if !self.context_matches(request) {
            return Judgement::DoesNotApply;
        }
        let Some(schema) = &self.arguments else {
            return Judgement::Applies(caller);
        };
        let satisfied = match check {
            ArgumentCheck::Validate => schema.is_valid(request.arguments.unwrap_or(&NO_ARGUMENTS)),
            ArgumentCheck::Optimistic => self.effect == Effect::Allow,
        };
        match (satisfied, self.effect) {
            (true, _) => Judgement::Applies(caller),
            (false, Effect::Allow) => Judgement::ArgumentsFail,
            (false, Effect::Deny) => Judgement::DoesNotApply,
        }
    }

    fn caller(&self, principal: &str, roles: &[String]) -> Option<Caller<'_>> {
        if self.principals.is_none() && self.roles.is_none() {
            return Some(Caller::Anyone);
        }
        if let Some(name) = self.principals.as_ref().and_then(|set| set.get(principal)) {
            return Some(Caller::Principal(name));
        }
        let rule_roles = self.roles.as_ref()?;
        roles
            .iter()
            .find_map(|role| rule_roles.get(role))
            .map(Caller::Role)
    }

    fn context_matches(&self, request: &DecisionRequest<'_>) -> bool {
        self.when.iter().all(|(key, allowed)| {
            request
                .context
                .value(key)
                .is_some_and(|value| allowed.get(value).is_some())
        })
    }

    fn decision<'a>(&'a self, operation: Operation<'a>, caller: Caller<'a>) -> Decision<'a> {
        Decision {
            effect: self.effect,
            rule: Some(&self.id),
            reason: DecisionReason::Rule {
                rule: &self.id,
                effect: self.effect,
                operation,
                caller,
            },
        }
    }

    /// The first constraint the request's arguments break (the refusal path: allocates).
    fn argument_failure(&self, request: &DecisionRequest<'_>) -> ArgumentFailure {
        let arguments = request.arguments.unwrap_or(&NO_ARGUMENTS);
        let error = self
            .arguments
            .as_ref()
            .and_then(|schema| schema.iter_errors(arguments).next());
        match error {
            Some(error) => ArgumentFailure {
                instance_path: error.instance_path().to_string(),
                message: shortened(error.to_string()),
            },
            // The schema passed on a second look; refuse all the same (fail closed).
            None => ArgumentFailure {
                instance_path: String::new(),
                message: "the arguments were refused".to_owned(),
            },
        }
    }
}

/// Validator messages quote the offending value, which may be megabytes of argument.
fn shortened(mut message: String) -> String {
    const LIMIT: usize = 200;
    if message.len() > LIMIT {
        let mut end = LIMIT;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// A set of names (principals, roles, context values), built once. Small sets are scanned,
/// which beats hashing for the handful of names most rules give.
#[derive(Debug)]
enum NameSet {
    Few(Vec<String>),
    Many(HashSet<String>),
}

impl NameSet {
    const SCAN_LIMIT: usize = 8;

    fn new(names: &[String]) -> Self {
        if names.len() <= Self::SCAN_LIMIT {
            Self::Few(names.to_vec())
        } else {
            Self::Many(names.iter().cloned().collect())
        }
    }

    /// The set's own copy of `name`, if it holds it.
    fn get(&self, name: &str) -> Option<&str> {
        match self {
            Self::Few(names) => names.iter().find(|n| *n == name).map(String::as_str),
            Self::Many(names) => names.get(name).map(String::as_str),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compiled_policy_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CompiledPolicy>();
    }

    #[test]
    fn long_messages_are_shortened_on_a_character_boundary() {
        let message = "é".repeat(150);
        let short = shortened(message);
        assert!(short.ends_with('…'));
        assert!(short.len() <= 203);
        assert_eq!(shortened("short".to_owned()), "short");
    }

    #[test]
    fn name_sets_answer_alike_small_or_large() {
        let few: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let many: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
        assert_eq!(NameSet::new(&few).get("b"), Some("b"));
        assert_eq!(NameSet::new(&few).get("c"), None);
        assert_eq!(NameSet::new(&many).get("n17"), Some("n17"));
        assert_eq!(NameSet::new(&many).get("n20"), None);
    }
}
