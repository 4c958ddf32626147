//! The policy-wide parts in words: how it is applied, who the callers are, and what is
//! logged.

use std::collections::{BTreeMap, BTreeSet};

use super::super::methods::PLUMBING_METHODS;
use super::super::model::{
    AuditSettings, DurableBefore, JwtIssuer, JwtSettings, Mode, Policy, ProtectedResource,
};
use super::doc::{Cite, Sentence, Statement};
use super::server::mode_consequence;

/// The list methods whose answers are filtered to the caller.
const LIST_METHODS: [&str; 4] = [
    "tools/list",
    "resources/list",
    "resources/templates/list",
    "prompts/list",
];

/// How decisions are made, for every server: mode, default deny, deny overrides allow,
/// plumbing and list filtering.
pub fn how_decisions_are_made(policy: &Policy) -> Vec<Statement> {
    let mode = Statement::new(
        Sentence::new()
            .text("The policy runs in ")
            .code(policy.mode.as_str())
            .text(" mode: ")
            .then(mode_consequence(policy.mode)),
        Cite::setting("mode"),
    );
    let overrides = policy
        .servers
        .iter()
        .filter(|(_, server)| server.mode.is_some_and(|own| own != policy.mode))
        .map(|(name, server)| {
            let own = server.mode.unwrap_or(Mode::Enforce);
            Statement::new(
                Sentence::new()
                    .text("Server ")
                    .code(name)
                    .text(" runs in ")
                    .code(own.as_str())
                    .text(" mode instead"),
                Cite::setting(format!("servers.{name}.mode")),
            )
        });
    let mut statements = vec![mode];
    statements.extend(overrides);
    statements.extend([
        Statement::new(
            Sentence::new().text("Any MCP operation no rule allows is refused, and so is any network connection no egress rule allows; requests for a server this policy does not name are refused"),
            Cite::Builtin("default deny"),
        ),
        Statement::new(
            Sentence::new().text("Where a deny rule and an allow rule both apply, the deny rule wins"),
            Cite::Builtin("deny overrides allow"),
        ),
        Statement::new(
            Sentence::new()
                .text("Protocol plumbing passes without a rule on every server this policy names: ")
                .then(Sentence::codes(PLUMBING_METHODS, "and")),
            Cite::Builtin("protocol plumbing"),
        ),
        Statement::new(
            Sentence::new()
                .text("List answers (")
                .then(Sentence::codes(LIST_METHODS, "and"))
                .text(") show each caller only what an allow rule lets them use and no deny rule without argument conditions refuses; listing itself needs a rule"),
            Cite::Builtin("list filtering"),
        ),
        Statement::new(
            Sentence::new()
                .text("A rule that names neither principals nor roles applies to any caller, including ")
                .code("anonymous")
                .text(" and other callers nobody identified"),
            Cite::Builtin("rule matching"),
        ),
    ]);
    statements
}

/// The principals and their roles.
pub fn principals(policy: &Policy) -> Vec<Statement> {
    policy
        .principals
        .iter()
        .map(|(name, principal)| {
            let holds = match principal.roles.as_slice() {
                [] => Sentence::new().text(" holds no role"),
                [role] => Sentence::new().text(" holds the role ").code(role),
                roles => Sentence::new()
                    .text(" holds the roles ")
                    .then(Sentence::codes(roles, "and")),
            };
            Statement::new(
                Sentence::new().text("Principal ").code(name).then(holds),
                Cite::setting(format!("principals.{name}")),
            )
            .with_note(principal.description.as_deref())
        })
        .collect()
}

/// Per role any principal holds or any rule names: who holds it. A role no principal holds
/// can only come from a token, or else the rules naming it apply to nobody.
pub fn roles(policy: &Policy) -> Vec<Statement> {
    let mut holders: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, principal) in &policy.principals {
        for role in &principal.roles {
            holders.entry(role).or_default().push(name);
        }
    }
    let named_by_rules: BTreeSet<&str> = policy
        .servers
        .values()
        .flat_map(|server| &server.rules)
        .flat_map(|rule| rule.roles.iter().flatten())
        .map(String::as_str)
        .collect();
    for role in named_by_rules {
        holders.entry(role).or_default();
    }
    holders
        .into_iter()
        .map(|(role, principals)| {
            let lead = Sentence::new().text("Role ").code(role);
            let (sentence, cite) = match (principals.is_empty(), &policy.identity.jwt) {
                (false, _) => (
                    lead.text(" is held by ")
                        .then(Sentence::codes(principals, "and")),
                    Cite::setting("principals"),
                ),
                (true, Some(jwt)) => (
                    lead.text(" is held by no principal listed here: only the ")
                        .code(&jwt.roles_claim)
                        .text(" claim of a token can grant it"),
                    Cite::setting("identity.jwt.roles_claim"),
                ),
                (true, None) => (
                    lead.text(" is held by no principal, and no token can grant it, so the rules naming it apply to nobody"),
                    Cite::setting("principals"),
                ),
            };
            Statement::new(sentence, cite)
        })
        .collect()
}

/// Where agents connect and how callers are identified.
pub fn identity(policy: &Policy) -> Vec<Statement> {
    let mut statements = vec![http_front(policy)];
    let identity = &policy.identity;
    if let Some(jwt) = &identity.jwt {
        statements.extend(
            jwt.issuers
                .iter()
                .enumerate()
                .map(|(index, issuer)| issuer_statement(index, issuer)),
        );
        statements.push(claims_statement(jwt));
        statements.push(refused_tokens_statement(jwt));
        statements.push(refused_tokens_in_all_statement(jwt));
        if let Some(front) = &jwt.protected_resource {
            statements.push(protected_resource_statement(jwt, front));
        }
    } else {
        if identity.trust_header {
            statements.push(Statement::new(
                Sentence::new()
                    .text("Development mode: the principal is taken from the request header ")
                    .code("MCP-Guard-Principal")
                    .text(", which any caller can set to any principal; do not use this in production"),
                Cite::setting("identity.trust_header"),
            ));
        }
        statements.push(default_principal(policy));
    }
    statements.push(Statement::new(
        Sentence::new()
            .text("Requests on a server's stdio front (")
            .code("mcp-guard stdio")
            .text(") act as the principal given with ")
            .code("--principal")
            .text(", else the server's ")
            .code("principal")
            .text(", else ")
            .code("anonymous"),
        Cite::Builtin("stdio front"),
    ));
    statements
}

fn http_front(policy: &Policy) -> Statement {
    let sentence = match policy.daemon.listen {
        Some(address) => Sentence::new()
            .text("Agents reach the servers over Streamable HTTP at ")
            .code(format!("http://{address}/servers/{{name}}/mcp")),
        None => Sentence::new()
            .text("There is no HTTP front: agents reach servers only through their stdio fronts"),
    };
    let mut statement = Statement::new(sentence, Cite::setting("daemon.listen"));
    if !policy.daemon.trusted_proxies.is_empty() {
        let proxies: Vec<String> = policy
            .daemon
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        statement.details.push(Statement::new(
            Sentence::new()
                .text("A request through ")
                .then(Sentence::codes(proxies, "or"))
                .text(" is taken to come from the address its ")
                .code("Forwarded")
                .text(" or ")
                .code("X-Forwarded-For")
                .text(" names, in the audit log and for the budget of refused tokens"),
            Cite::setting("daemon.trusted_proxies"),
        ));
    }
    statement
}

fn refused_tokens_statement(jwt: &JwtSettings) -> Statement {
    let sentence = match jwt.refused_tokens_per_minute {
        0 => Sentence::new()
            .text("Every token is checked, however many from the same address were refused"),
        limit => Sentence::new()
            .text("An address whose tokens were refused ")
            .text(limit.to_string())
            .text(" times within a minute gets HTTP 429 for tokens not accepted before, unchecked, until the minute is over"),
    };
    Statement::new(
        sentence,
        Cite::setting("identity.jwt.refused_tokens_per_minute"),
    )
}

fn refused_tokens_in_all_statement(jwt: &JwtSettings) -> Statement {
    let sentence = match jwt.refused_tokens_per_minute_all_addresses {
        0 => Sentence::new()
            .text("Tokens are checked however many were refused from all addresses together"),
        limit => Sentence::new()
            .text("Once tokens from all addresses together were refused ")
            .text(limit.to_string())
            .text(" times within a minute, every token not accepted before gets HTTP 429, unchecked, until the minute is over"),
    };
    Statement::new(
        sentence,
        Cite::setting("identity.jwt.refused_tokens_per_minute_all_addresses"),
    )
}

fn issuer_statement(index: usize, issuer: &JwtIssuer) -> Statement {
    let path = format!("identity.jwt.issuers[{index}]");
    let algorithms: Vec<&str> = issuer.algorithms.iter().map(|a| a.as_str()).collect();
    let keys = &issuer.keys;
    let verified_with = match (&keys.hs256_secret, &keys.pem_file, &keys.jwks_file) {
        (Some(_), _, _) => Sentence::new().text("the HTTP front's inline HS256 secret"),
        (_, Some(file), _) => Sentence::new()
            .text("the public keys in ")
            .code(file.display().to_string()),
        (_, _, Some(file)) => Sentence::new()
            .text("the key set in ")
            .code(file.display().to_string()),
        (None, None, None) => Sentence::new().text("no key"),
    };
    let sentence = Sentence::new()
        .text("Callers on the HTTP front must present a bearer JWT issued by ")
        .code(&issuer.issuer)
        .text(" for the audience ")
        .then(Sentence::codes(&issuer.audiences, "or"))
        .text(", signed with ")
        .then(Sentence::codes(algorithms, "or"))
        .text(" and verified with ")
        .then(verified_with)
        .text("; a request without a valid token is answered HTTP 401");
    let mut statement = Statement::new(sentence, Cite::setting(&path));
    if keys.hs256_secret.is_some() {
        statement.details.push(Statement::new(
            Sentence::new()
                .text("Whoever can read this policy file can mint tokens for this issuer"),
            Cite::setting(format!("{path}.keys.hs256_secret")),
        ));
    }
    statement
}

fn claims_statement(jwt: &JwtSettings) -> Statement {
    let sentence = Sentence::new()
        .text("A token's ")
        .code(&jwt.principal_claim)
        .text(" claim names the principal and its ")
        .code(&jwt.roles_claim)
        .text(" claim the roles, to which the roles listed here for that principal are added; clocks may differ by up to ")
        .text(jwt.clock_skew_seconds.to_string())
        .text(" seconds");
    let mut statement = Statement::new(sentence, Cite::setting("identity.jwt.principal_claim"));
    statement
        .cites
        .push(Cite::setting("identity.jwt.roles_claim"));
    statement
}

fn protected_resource_statement(jwt: &JwtSettings, front: &ProtectedResource) -> Statement {
    let sentence = Sentence::new()
        .text("OAuth clients are told to get their tokens from ")
        .then(Sentence::codes(front.authorization_servers(jwt), "or"))
        .text(", each token for one server (")
        .code(front.resource_of("NAME"))
        .text("); a token meant for one server behind ")
        .code(front.origin())
        .text(" is refused at the others");
    Statement::new(sentence, Cite::setting("identity.jwt.protected_resource"))
}

fn default_principal(policy: &Policy) -> Statement {
    let which = if policy.identity.trust_header {
        "Requests on the HTTP front without that header act as "
    } else {
        "Every request on the HTTP front acts as "
    };
    let sentence = match &policy.daemon.principal {
        Some(principal) => Sentence::new()
            .text(which)
            .text("principal ")
            .code(principal),
        None => Sentence::new()
            .text(which)
            .code("anonymous")
            .text(", to which only rules naming neither principals nor roles apply"),
    };
    Statement::new(sentence, Cite::setting("daemon.principal"))
}

/// The audit log and the metrics endpoint.
pub fn logging(policy: &Policy) -> Vec<Statement> {
    let audit = &policy.audit;
    let mut statements = vec![Statement::new(
        Sentence::new()
            .text("Every decision with the rule that made it, the outcome of each allowed operation, session events, policy loads and every network connection a guarded server attempts are appended to ")
            .code(audit.path.display().to_string())
            .text(", with the principal, session, instruction and trace of each; the records are hash-chained, so ")
            .code("mcp-guard audit verify")
            .text(" finds a changed, removed or reordered record"),
        Cite::setting("audit.path"),
    )];
    statements.push(arguments_statement(policy));
    statements.extend(redaction_statement(policy));
    statements.push(durability_statement(audit));
    statements.push(Statement::new(
        rotation(audit.rotate_bytes),
        Cite::setting("audit.rotate_bytes"),
    ));
    statements.push(metrics(policy));
    statements
}

fn durability_statement(audit: &AuditSettings) -> Statement {
    let (text, setting) = match (audit.fsync, audit.durable_before) {
        (false, _) => (
            "Records are not flushed to disk before the operations they record go on: a crash of the machine may lose the last ones".to_string(),
            "audit.fsync",
        ),
        (true, DurableBefore::Forward) => (
            "Each record is flushed to disk before the operation it records goes on".to_string(),
            "audit.fsync",
        ),
        (true, DurableBefore::Answer) => (
            "Each record is flushed to disk before the operation it records goes on, except that an allowed call's decision is only written before the call is forwarded, and flushed with its outcome before the answer is returned: a crash of the machine may lose the decision of a call whose answer was never returned".to_string(),
            "audit.durable_before",
        ),
        (true, DurableBefore::Interval) => (
            format!("Each record is written to the log before the operation it records goes on, and flushed to disk at most {} ms later: a crash of the machine may lose the records of that last interval", audit.flush_interval_ms),
            "audit.durable_before",
        ),
    };
    Statement::new(Sentence::new().text(text), Cite::setting(setting))
}

fn arguments_statement(policy: &Policy) -> Statement {
    let sentence = if policy.audit.store_arguments {
        Sentence::new().text("Tool and prompt arguments are stored in the records")
    } else {
        Sentence::new().text("Tool and prompt arguments are not stored: the records keep only a SHA-256 digest of them")
    };
    Statement::new(sentence, Cite::setting("audit.store_arguments"))
}

fn redaction_statement(policy: &Policy) -> Option<Statement> {
    let audit = &policy.audit;
    let sentence = match (audit.store_arguments, audit.redact.is_empty()) {
        (true, true) => {
            Sentence::new().text("No argument field is redacted: every value is stored as sent")
        }
        (true, false) => Sentence::new()
            .text("The values of argument fields named ")
            .then(Sentence::codes(&audit.redact, "or"))
            .text(" (at any depth, ignoring ASCII case) are replaced by ")
            .code("[redacted]"),
        (false, false) => Sentence::new()
            .text("The fields listed to redact (")
            .then(Sentence::codes(&audit.redact, "and"))
            .text(") matter only once arguments are stored"),
        (false, true) => return None,
    };
    Some(Statement::new(sentence, Cite::setting("audit.redact")))
}

fn rotation(rotate_bytes: u64) -> Sentence {
    if rotate_bytes == 0 {
        return Sentence::new().text("The log file is never rotated");
    }
    Sentence::new()
        .text("The log file is rotated at ")
        .text(byte_size(rotate_bytes))
        .text(" into numbered files beside it (")
        .code("<path>.1")
        .text(", ")
        .code("<path>.2")
        .text(", ...; higher is newer), and the hash chain continues across them")
}

/// Bytes in the largest binary unit that divides them, as the policy author likely wrote them.
fn byte_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    UNITS
        .iter()
        .find(|(size, _)| bytes.is_multiple_of(*size))
        .map_or(format!("{bytes} bytes"), |(size, unit)| {
            format!("{} {unit}", bytes / size)
        })
}

fn metrics(policy: &Policy) -> Statement {
    let sentence = match policy.daemon.metrics_listen {
        Some(address) => Sentence::new()
            .text("Prometheus metrics are served at ")
            .code(format!("http://{address}/metrics"))
            .text("; their labels carry server, rule and method names, never arguments or ids"),
        None => Sentence::new().text("No metrics endpoint is served"),
    };
    Statement::new(sentence, Cite::setting("daemon.metrics_listen"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_use_the_unit_that_divides_them() {
        assert_eq!(byte_size(100 * 1024 * 1024), "100 MiB");
        assert_eq!(byte_size(2 << 30), "2 GiB");
        assert_eq!(byte_size(1000), "1000 bytes");
    }
}
