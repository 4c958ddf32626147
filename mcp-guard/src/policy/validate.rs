//! Semantic validation: the rules a parsed policy must follow that its JSON shape cannot
//! express. Every problem is collected, not just the first, so that one `policy check` run
//! shows an author everything to fix.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;

use super::cidr::is_ipv4_mapped;
use super::error::Problem;
use super::model::{
    AuditSettings, DaemonSettings, DurableBefore, EgressRule, EnvValue, FrontTls, IdentitySettings,
    Isolation, JwtIssuer, JwtKeys, JwtSettings, POLICY_VERSION, Policy, Principal,
    ProtectedResource, Protocol, RESERVED_UPSTREAM_HEADERS, ServerPolicy, ValueSource,
    ValueSourceError,
};
use super::validate_rules::check_rules;

pub(super) const NAME_RULE: &str = "use 1-64 characters from A-Z a-z 0-9 _ . -";
pub(super) const PRINCIPAL_NAME_RULE: &str = "use 1-128 characters from A-Z a-z 0-9 _ . @ : -";
const DNS_PORT: u16 = 53;

/// The principals a policy declares, by name.
pub(super) type Principals = BTreeMap<String, Principal>;

/// Every problem in `policy`, errors and warnings, in the order of the file.
pub fn validate(policy: &Policy) -> Vec<Problem> {
    let mut problems = Vec::new();
    problems.extend(version_problem(u64::from(policy.version)));
    check_daemon(&policy.daemon, &policy.principals, &mut problems);
    check_principals(&policy.principals, &mut problems);
    for (name, server) in &policy.servers {
        check_server(name, server, &policy.principals, &mut problems);
    }
    check_audit(&policy.audit, &mut problems);
    check_identity(&policy.identity, &policy.daemon, &mut problems);
    problems
}

/// Also used before parsing, so that a newer policy is refused for its version rather than for
/// the fields this build does not know.
pub(super) fn version_problem(version: u64) -> Option<Problem> {
    (version != u64::from(POLICY_VERSION)).then(|| {
        Problem::error(
            "version",
            format!("unsupported policy version {version}: this mcp-guard reads version {POLICY_VERSION}"),
        )
    })
}

fn check_daemon(daemon: &DaemonSettings, principals: &Principals, problems: &mut Vec<Problem>) {
    if let Some(principal) = &daemon.principal {
        check_principal_ref("daemon.principal", principal, principals, problems);
        if daemon.listen.is_none() {
            problems.push(Problem::warning(
                "daemon.principal",
                "has no effect without daemon.listen: it names who requests on the HTTP front \
                 act as",
            ));
        }
    }
    check_limits(daemon, problems);
    check_absolute("daemon.control_socket", &daemon.control_socket, problems);
    check_absolute("daemon.bpffs", &daemon.bpffs, problems);
    if let Some(cgroup_root) = &daemon.cgroup_root {
        check_absolute("daemon.cgroup_root", cgroup_root, problems);
    }
    check_dns_ttls(daemon, problems);
    check_answer_polling(daemon, problems);
    check_trusted_proxies(daemon, problems);
    if let Some(tls) = &daemon.tls {
        check_front_tls(daemon, tls, problems);
    }
    if let Some(warning) = daemon
        .listen
        .and_then(|listen| cleartext_front_warning(listen, daemon))
    {
        problems.push(Problem::warning("daemon.listen", warning));
    }
    if daemon.listen.is_some() && daemon.listen == daemon.metrics_listen {
        problems.push(Problem::error(
            "daemon.metrics_listen",
            "is the same address as daemon.listen: the metrics endpoint needs its own",
        ));
    }
}

/// Prefixes shorter than this span whole provider networks: trusting them lets far too many
/// hosts say where requests come from.
const NARROWEST_SENSIBLE_PROXY_PREFIX: (u8, u8) = (8, 32);

fn check_trusted_proxies(daemon: &DaemonSettings, problems: &mut Vec<Problem>) {
    if !daemon.trusted_proxies.is_empty() && daemon.listen.is_none() {
        problems.push(Problem::warning(
            "daemon.trusted_proxies",
            "has no effect without daemon.listen: only the HTTP front reads X-Forwarded-For",
        ));
    }
    for (index, net) in daemon.trusted_proxies.iter().enumerate() {
        let shortest = match net {
            ipnet::IpNet::V4(_) => NARROWEST_SENSIBLE_PROXY_PREFIX.0,
            ipnet::IpNet::V6(_) => NARROWEST_SENSIBLE_PROXY_PREFIX.1,
        };
        if net.prefix_len() < shortest {
            problems.push(Problem::warning(
                format!("daemon.trusted_proxies[{index}]"),
                format!(
                    "{net} trusts every host in it to say where a request comes from: any of \
                     them can put another address in the audit log and spend another's budget \
                     of refused tokens; list your proxies' addresses"
                ),
            ));
        }
    }
}

/// Past this, polling would burn a CPU for a whole tool call rather than spare a wake-up.
const MAX_ANSWER_POLL_US: u32 = 10_000;

fn check_answer_polling(daemon: &DaemonSettings, problems: &mut Vec<Problem>) {
    if daemon.worker_threads == Some(0) {
        problems.push(Problem::error(
            "daemon.worker_threads",
            "must be at least 1",
        ));
    }
    if daemon.answer_poll_us > MAX_ANSWER_POLL_US {
        problems.push(Problem::error(
            "daemon.answer_poll_us",
            format!(
                "is {}: must be 0 to {MAX_ANSWER_POLL_US} microseconds",
                daemon.answer_poll_us
            ),
        ));
    } else if daemon.answer_poll_us > 0 && daemon.worker_threads != Some(1) {
        problems.push(Problem::warning(
            "daemon.answer_poll_us",
            "takes effect in the daemon only with daemon.worker_threads 1 (stdio fronts poll \
             either way)",
        ));
    }
}

/// Below this, rotation would start a new file every few seconds under load.
const AUDIT_MIN_SENSIBLE_ROTATE_BYTES: u64 = 1024 * 1024;

fn check_audit(audit: &AuditSettings, problems: &mut Vec<Problem>) {
    check_absolute("audit.path", &audit.path, problems);
    // Rotated files are named after the file, so the path must name one.
    if audit.path.file_name().is_none() || audit.path.as_os_str().to_string_lossy().ends_with('/') {
        problems.push(Problem::error(
            "audit.path",
            format!(
                "\"{}\" names a directory: give a file name",
                audit.path.display()
            ),
        ));
    }
    if audit.rotate_bytes != 0 && audit.rotate_bytes < AUDIT_MIN_SENSIBLE_ROTATE_BYTES {
        problems.push(Problem::warning(
            "audit.rotate_bytes",
            format!(
                "{} bytes rotates very often, leaving many small files; 0 never rotates",
                audit.rotate_bytes
            ),
        ));
    }
    for (index, name) in audit.redact.iter().enumerate() {
        let path = format!("audit.redact[{index}]");
        if name.is_empty() {
            problems.push(Problem::error(&path, "is empty: name an argument field"));
        } else if audit.redact[..index]
            .iter()
            .any(|earlier| earlier.eq_ignore_ascii_case(name))
        {
            problems.push(Problem::error(
                &path,
                format!("duplicate field name \"{name}\" (names compare without case)"),
            ));
        }
    }
    if !audit.store_arguments && !audit.redact.is_empty() {
        problems.push(Problem::warning(
            "audit.redact",
            "has no effect while audit.store_arguments is false: arguments are recorded only \
             as a digest",
        ));
    }
    if !audit.fsync {
        problems.push(Problem::warning(
            "audit.fsync",
            "is off: records are acknowledged before they reach the disk, so a crash of the \
             machine can lose the last ones",
        ));
        if audit.durable_before != DurableBefore::Forward {
            problems.push(Problem::warning(
                "audit.durable_before",
                "has no effect while audit.fsync is false: no record is flushed",
            ));
        }
    }
    if !(1..=AUDIT_MAX_FLUSH_INTERVAL_MS).contains(&audit.flush_interval_ms) {
        problems.push(Problem::error(
            "audit.flush_interval_ms",
            format!(
                "is {}: must be 1 to {AUDIT_MAX_FLUSH_INTERVAL_MS} milliseconds",
                audit.flush_interval_ms
            ),
        ));
    } else if audit.flush_interval_ms != AuditSettings::default().flush_interval_ms
        && audit.durable_before != DurableBefore::Interval
    {
        problems.push(Problem::warning(
            "audit.flush_interval_ms",
            "has no effect unless audit.durable_before is \"interval\"",
        ));
    }
}

/// Past a minute, "interval" is no longer a bound on what a crash of the machine loses.
const AUDIT_MAX_FLUSH_INTERVAL_MS: u64 = 60_000;

/// RFC 7518 section 3.2: an HS256 key must have at least 256 bits.
const HS256_MIN_SECRET_BYTES: usize = 32;

/// Past this, an expired token stays good long enough to matter.
const JWT_MAX_SENSIBLE_SKEW_SECONDS: u64 = 300;

fn check_identity(
    identity: &IdentitySettings,
    daemon: &DaemonSettings,
    problems: &mut Vec<Problem>,
) {
    if identity.trust_header {
        if identity.jwt.is_some() {
            problems.push(Problem::error(
                "identity.trust_header",
                "cannot be on together with identity.jwt: a header any caller can set would \
                 undo token verification",
            ));
        } else {
            problems.push(Problem::warning(
                "identity.trust_header",
                "is on: the HTTP front takes the principal from the MCP-Guard-Principal header, \
                 which any caller can set to anyone; for development only",
            ));
        }
    }
    let Some(jwt) = &identity.jwt else {
        return;
    };
    if daemon.principal.is_some() {
        problems.push(Problem::warning(
            "daemon.principal",
            "has no effect while identity.jwt is set: callers on the HTTP front are who their \
             tokens say",
        ));
    }
    check_jwt(jwt, problems);
}

fn check_jwt(jwt: &JwtSettings, problems: &mut Vec<Problem>) {
    if jwt.issuers.is_empty() {
        problems.push(Problem::error(
            "identity.jwt.issuers",
            "must list at least one issuer",
        ));
    }
    for (index, issuer) in jwt.issuers.iter().enumerate() {
        let path = format!("identity.jwt.issuers[{index}]");
        if let Some(first) = jwt.issuers[..index]
            .iter()
            .position(|earlier| earlier.issuer == issuer.issuer)
        {
            problems.push(Problem::error(
                format!("{path}.issuer"),
                format!(
                    "duplicate issuer \"{}\": also issuers[{first}]; put every key of an \
                     issuer in one entry",
                    issuer.issuer
                ),
            ));
        }
        check_issuer(&path, issuer, problems);
    }
    for (field, claim) in [
        ("roles_claim", &jwt.roles_claim),
        ("principal_claim", &jwt.principal_claim),
    ] {
        if claim.trim().is_empty() {
            problems.push(Problem::error(
                format!("identity.jwt.{field}"),
                "is empty: name a claim, e.g. \"sub\" or \"realm_access.roles\"",
            ));
        }
    }
    if jwt.clock_skew_seconds > JWT_MAX_SENSIBLE_SKEW_SECONDS {
        problems.push(Problem::warning(
            "identity.jwt.clock_skew_seconds",
            format!(
                "{} seconds accepts tokens that long after they expire; clocks synchronised by \
                 NTP need a few seconds",
                jwt.clock_skew_seconds
            ),
        ));
    }
    if let Some(url) = &jwt.resource_metadata_url {
        let reason = check_url(url).err().or_else(|| {
            // It goes into a quoted string of the WWW-Authenticate header as it is.
            url.chars()
                .any(|c| !c.is_ascii_graphic() || c == '"' || c == '\\')
                .then(|| format!("\"{url}\" contains characters a URL must escape"))
        });
        if let Some(reason) = reason {
            problems.push(Problem::error("identity.jwt.resource_metadata_url", reason));
        }
    }
    if let Some(front) = &jwt.protected_resource {
        check_protected_resource(jwt, front, problems);
    }
}

fn check_protected_resource(
    jwt: &JwtSettings,
    front: &ProtectedResource,
    problems: &mut Vec<Problem>,
) {
    const PATH: &str = "identity.jwt.protected_resource";
    if jwt.resource_metadata_url.is_some() {
        problems.push(Problem::error(
            PATH,
            "not together with identity.jwt.resource_metadata_url: with protected_resource, \
             mcp-guard serves the metadata and names it in its challenges itself",
        ));
    }
    let public_url_is_valid = match check_origin_url(&front.public_url) {
        Ok(()) => true,
        Err(reason) => {
            problems.push(Problem::error(format!("{PATH}.public_url"), reason));
            false
        }
    };
    for (index, server) in front.authorization_servers.iter().enumerate() {
        let path = format!("{PATH}.authorization_servers[{index}]");
        if let Err(reason) = check_url(server) {
            problems.push(Problem::error(path, reason));
        } else if front.authorization_servers[..index].contains(server) {
            problems.push(Problem::error(path, format!("duplicate \"{server}\"")));
        }
    }
    if front.authorization_servers.is_empty() {
        for (index, issuer) in jwt.issuers.iter().enumerate() {
            if check_url(&issuer.issuer).is_err() {
                problems.push(Problem::error(
                    format!("{PATH}.authorization_servers"),
                    format!(
                        "is empty, so clients would be sent to every issuer, but \
                         issuers[{index}].issuer \"{}\" is not an http(s) URL: list the \
                         authorisation servers' URLs",
                        issuer.issuer
                    ),
                ));
            }
        }
    }
    for (index, scope) in front.scopes_supported.iter().enumerate() {
        let path = format!("{PATH}.scopes_supported[{index}]");
        if scope.is_empty() || scope.contains(|c: char| c.is_whitespace() || c == '"') {
            problems.push(Problem::error(
                path,
                format!("\"{scope}\" is not an OAuth scope (no spaces or quotes)"),
            ));
        } else if front.scopes_supported[..index].contains(scope) {
            problems.push(Problem::error(path, format!("duplicate scope \"{scope}\"")));
        }
    }
    if public_url_is_valid
        && !jwt
            .issuers
            .iter()
            .any(|issuer| issuer.audiences.iter().any(|a| front.names_this_front(a)))
    {
        problems.push(Problem::warning(
            PATH,
            format!(
                "clients that follow this metadata ask for tokens meant for one server, such as \
                 {} (RFC 8707 `resource`), but no issuer lists such an audience (or {}): their \
                 tokens are refused unless the authorisation server ignores `resource` and \
                 issues one of the listed audiences",
                front.resource_of("NAME"),
                front.origin()
            ),
        ));
    }
}

/// A URL made of scheme, host and port only (a trailing `/` allowed).
fn check_origin_url(text: &str) -> Result<(), String> {
    check_url(text)?;
    let url = url::Url::parse(text).map_err(|error| error.to_string())?;
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "\"{text}\" has a path, query or fragment: give scheme, host and port only, such \
             as \"{}\" (servers are at /servers/NAME/mcp under it)",
            url.origin().ascii_serialization()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("\"{text}\" carries credentials"));
    }
    Ok(())
}

fn check_issuer(path: &str, issuer: &JwtIssuer, problems: &mut Vec<Problem>) {
    if issuer.issuer.is_empty() {
        problems.push(Problem::error(
            format!("{path}.issuer"),
            "is empty: give the exact `iss` of the provider's tokens",
        ));
    }
    if issuer.audiences.is_empty() {
        problems.push(Problem::error(
            format!("{path}.audiences"),
            "must list at least one audience: a token for any service would do otherwise",
        ));
    }
    for (index, audience) in issuer.audiences.iter().enumerate() {
        let audience_path = format!("{path}.audiences[{index}]");
        if audience.is_empty() {
            problems.push(Problem::error(&audience_path, "is empty"));
        } else if issuer.audiences[..index].contains(audience) {
            problems.push(Problem::error(
                &audience_path,
                format!("duplicate audience \"{audience}\""),
            ));
        }
    }
    if issuer.algorithms.is_empty() {
        problems.push(Problem::error(
            format!("{path}.algorithms"),
            "must list at least one algorithm (\"RS256\", \"ES256\", \"HS256\")",
        ));
    }
    for (index, algorithm) in issuer.algorithms.iter().enumerate() {
        if issuer.algorithms[..index].contains(algorithm) {
            problems.push(Problem::error(
                format!("{path}.algorithms[{index}]"),
                format!("duplicate algorithm \"{algorithm}\""),
            ));
        }
    }
    if check_key_source(&format!("{path}.keys"), &issuer.keys, problems)
        && !any_only_the_daemon_may_read(
            &key_files(&format!("{path}.keys"), &issuer.keys),
            problems,
        )
    {
        check_keys_load(path, issuer, problems);
    }
}

/// The files an issuer's keys come from, with their policy paths.
fn key_files<'a>(path: &str, keys: &'a JwtKeys) -> Vec<(String, &'a Path)> {
    [("pem_file", &keys.pem_file), ("jwks_file", &keys.jwks_file)]
        .into_iter()
        .filter_map(|(field, file)| Some((format!("{path}.{field}"), file.as_deref()?)))
        .collect()
}

/// Whether any of `files` is one this user may not read, though the daemon may: each such
/// file is a warning, and what reading it would check is left to the daemon. The daemon runs
/// as root, and as root (even without `CAP_DAC_OVERRIDE`, as its unit runs it) a file it may
/// not read stays an error: this is for a reviewer running `policy check` without the
/// daemon's privileges, as with a secret of `headers` or `env`.
fn any_only_the_daemon_may_read(files: &[(String, &Path)], problems: &mut Vec<Problem>) -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    let mut any = false;
    for (at, file) in files {
        if let Err(e) = std::fs::File::open(file)
            && e.kind() == std::io::ErrorKind::PermissionDenied
        {
            problems.push(Problem::warning(
                at,
                format!(
                    "{}: this user may not read it, so it is not checked here; the daemon \
                     reads it with its own privileges, and refuses a policy whose file it \
                     cannot use",
                    file.display()
                ),
            ));
            any = true;
        }
    }
    any
}

/// The shape of `keys`; true when it names exactly one usable source.
fn check_key_source(path: &str, keys: &JwtKeys, problems: &mut Vec<Problem>) -> bool {
    let given = [
        keys.hs256_secret.is_some(),
        keys.pem_file.is_some(),
        keys.jwks_file.is_some(),
    ]
    .into_iter()
    .filter(|given| *given)
    .count();
    if given != 1 {
        problems.push(Problem::error(
            path,
            "give exactly one of `hs256_secret`, `pem_file` and `jwks_file`",
        ));
        return false;
    }
    if let Some(secret) = &keys.hs256_secret {
        if secret.is_empty() {
            problems.push(Problem::error(format!("{path}.hs256_secret"), "is empty"));
            return false;
        }
        if secret.len() < HS256_MIN_SECRET_BYTES {
            problems.push(Problem::warning(
                format!("{path}.hs256_secret"),
                format!(
                    "is {} bytes long: HS256 needs at least {HS256_MIN_SECRET_BYTES} to resist \
                     guessing",
                    secret.len()
                ),
            ));
        }
    }
    for (field, file) in [("pem_file", &keys.pem_file), ("jwks_file", &keys.jwks_file)] {
        if let Some(file) = file
            && !file.is_absolute()
        {
            check_absolute(&format!("{path}.{field}"), file, problems);
            return false;
        }
    }
    true
}

/// Reads the issuer's keys as the HTTP front will, so that a file that cannot be read or
/// parsed refuses the policy (at start and at reload) instead of every request later.
fn check_keys_load(path: &str, issuer: &JwtIssuer, problems: &mut Vec<Problem>) {
    let keys = match crate::identity::jwt::load_keys(&issuer.keys) {
        Ok(keys) => keys,
        Err(error) => {
            problems.push(Problem::error(
                format!("{path}.keys.{}", error.field),
                error.message,
            ));
            return;
        }
    };
    let verifiable: Vec<bool> = issuer
        .algorithms
        .iter()
        .map(|algorithm| keys.iter().any(|key| key.algorithm == *algorithm))
        .collect();
    if !issuer.algorithms.is_empty() && !verifiable.contains(&true) {
        let listed: Vec<&str> = issuer.algorithms.iter().map(|a| a.as_str()).collect();
        problems.push(Problem::error(
            format!("{path}.keys"),
            format!(
                "holds no key for {}: RSA keys verify RS256, P-256 keys ES256, and \
                 hs256_secret (or an `oct` JWK) HS256",
                listed.join(" or ")
            ),
        ));
        return;
    }
    for (index, algorithm) in issuer.algorithms.iter().enumerate() {
        if !verifiable[index] {
            problems.push(Problem::warning(
                format!("{path}.algorithms[{index}]"),
                format!("no key of this issuer verifies {algorithm}: such tokens are refused"),
            ));
        }
    }
}

/// A zero limit would refuse every message (or session), which no author means.
fn check_limits(daemon: &DaemonSettings, problems: &mut Vec<Problem>) {
    let limits = [
        ("daemon.max_message_bytes", daemon.max_message_bytes),
        (
            "daemon.max_server_message_bytes",
            daemon.max_server_message_bytes,
        ),
        ("daemon.max_batch_size", daemon.max_batch_size),
        ("daemon.max_json_depth", daemon.max_json_depth),
        ("daemon.max_sessions", daemon.max_sessions),
        (
            "daemon.header_read_timeout_seconds",
            daemon.header_read_timeout_seconds as usize,
        ),
        (
            "daemon.max_sessions_per_principal",
            daemon.max_sessions_per_principal,
        ),
    ];
    for (path, value) in limits {
        if value == 0 {
            problems.push(Problem::error(path, "must be at least 1"));
        }
    }
}

fn check_principals(principals: &Principals, problems: &mut Vec<Problem>) {
    for (name, principal) in principals {
        let path = format!("principals.{name}");
        if !is_valid_principal_name(name) {
            problems.push(Problem::error(
                &path,
                format!("invalid principal name \"{name}\": {PRINCIPAL_NAME_RULE}"),
            ));
        }
        for (index, role) in principal.roles.iter().enumerate() {
            let role_path = format!("{path}.roles[{index}]");
            if !is_valid_principal_name(role) {
                problems.push(Problem::error(
                    &role_path,
                    format!("invalid role name \"{role}\": {PRINCIPAL_NAME_RULE}"),
                ));
            } else if principal.roles[..index].contains(role) {
                problems.push(Problem::error(
                    &role_path,
                    format!("duplicate role \"{role}\""),
                ));
            }
        }
    }
}

/// `principal` must be declared: a typo would otherwise attribute requests to a principal
/// no rule can name, and the resulting denials would be hard to trace back to it.
pub(super) fn check_principal_ref(
    path: &str,
    principal: &str,
    principals: &Principals,
    problems: &mut Vec<Problem>,
) {
    if !principals.contains_key(principal) {
        problems.push(Problem::error(
            path,
            format!("unknown principal \"{principal}\": declare it under `principals`"),
        ));
    }
}

fn check_dns_ttls(daemon: &DaemonSettings, problems: &mut Vec<Problem>) {
    if daemon.dns_min_ttl_seconds == 0 {
        // A zero floor lets a record with TTL 0 make the daemon re-resolve without pause.
        problems.push(Problem::error(
            "daemon.dns_min_ttl_seconds",
            "must be at least 1",
        ));
    }
    if daemon.dns_min_ttl_seconds > daemon.dns_max_ttl_seconds {
        problems.push(Problem::error(
            "daemon.dns_min_ttl_seconds",
            format!(
                "{} exceeds dns_max_ttl_seconds ({})",
                daemon.dns_min_ttl_seconds, daemon.dns_max_ttl_seconds
            ),
        ));
    }
}

/// The daemon runs from `/` under systemd, so a relative path would not mean what the author
/// saw when writing it.
/// Why an HTTP front on `listen` is worth a warning: reachable from other hosts, and without
/// TLS, what agents send (their bearer tokens among it) crosses the network in the clear.
pub fn cleartext_front_warning(
    listen: std::net::SocketAddr,
    daemon: &DaemonSettings,
) -> Option<String> {
    (!listen.ip().is_loopback() && daemon.tls.is_none()).then(|| {
        format!(
            "{listen} is reachable from other hosts and daemon.tls is not set: agents' requests, \
             bearer tokens included, cross the network in the clear; set daemon.tls, or \
             terminate TLS in front of mcp-guard and bind loopback"
        )
    })
}

/// Reads the front's certificate and key as the daemon will, so that a file that cannot be
/// read, or a key that is not the certificate's, makes the policy invalid.
fn check_front_tls(daemon: &DaemonSettings, tls: &FrontTls, problems: &mut Vec<Problem>) {
    if daemon.listen.is_none() {
        problems.push(Problem::warning(
            "daemon.tls",
            "has no effect without daemon.listen: it secures the HTTP front",
        ));
    }
    check_absolute("daemon.tls.cert_file", &tls.cert_file, problems);
    check_absolute("daemon.tls.key_file", &tls.key_file, problems);
    let files = [
        ("daemon.tls.cert_file".to_owned(), tls.cert_file.as_path()),
        ("daemon.tls.key_file".to_owned(), tls.key_file.as_path()),
    ];
    if any_only_the_daemon_may_read(&files, problems) {
        return;
    }
    match crate::transport::tls::load_certified_key(tls) {
        Ok(_) => warn_if_others_may_read("daemon.tls.key_file", &tls.key_file, problems),
        Err(error) => problems.push(Problem::error(error.field_path(), error.reason())),
    }
}

fn check_absolute(path: &str, value: &Path, problems: &mut Vec<Problem>) {
    if !value.is_absolute() {
        problems.push(Problem::error(
            path,
            format!("must be an absolute path, not \"{}\"", value.display()),
        ));
    }
}

fn check_server(
    name: &str,
    server: &ServerPolicy,
    principals: &Principals,
    problems: &mut Vec<Problem>,
) {
    let path = format!("servers.{name}");
    if !is_valid_name(name) {
        problems.push(Problem::error(
            &path,
            format!("invalid server name \"{name}\": {NAME_RULE}"),
        ));
    }
    check_launch(&path, server, problems);
    if let Some(principal) = &server.principal {
        check_principal_ref(
            &format!("{path}.principal"),
            principal,
            principals,
            problems,
        );
    }
    check_env(&path, server, problems);
    check_egress(&path, &server.egress, problems);
    check_rules(&path, &server.rules, principals, problems);
    check_write_tools(&path, &server.write_tools, problems);
    if server.request_timeout_seconds == 0 {
        problems.push(Problem::error(
            format!("{path}.request_timeout_seconds"),
            "must be at least 1",
        ));
    }
}

fn check_write_tools(server_path: &str, patterns: &[String], problems: &mut Vec<Problem>) {
    for (index, pattern) in patterns.iter().enumerate() {
        if pattern.is_empty() {
            problems.push(Problem::error(
                format!("{server_path}.write_tools[{index}]"),
                "is empty",
            ));
        }
    }
}

/// A server is spawned by mcp-guard (`command`) or reached over HTTP (`url`); either way its
/// processes may instead be adopted from where they already run (`adopt_cgroup`).
fn check_launch(path: &str, server: &ServerPolicy, problems: &mut Vec<Problem>) {
    if server.command.is_some() && server.adopt_cgroup.is_some() {
        problems.push(Problem::error(
            path,
            "give either `command` (mcp-guard spawns the server) or `adopt_cgroup` \
             (the server already runs in that cgroup), not both",
        ));
    }
    if server.command.is_some() && server.url.is_some() {
        problems.push(Problem::error(
            path,
            "give either `command` (a stdio server mcp-guard spawns) or `url` (a Streamable \
             HTTP server that already runs), not both",
        ));
    }
    // Not an error: a server declared only for its egress rules (its processes adopted, or
    // placed by `mcp-guard exec`) is confined all the same.
    if server.command.is_none() && server.url.is_none() {
        problems.push(Problem::warning(
            path,
            "has neither `command` nor `url`, so mcp-guard has nowhere to forward MCP \
             requests for it: only its egress rules take effect",
        ));
    }
    if server.command.is_none() && server.isolation == Isolation::Shared {
        problems.push(Problem::warning(
            format!("{path}.isolation"),
            "has no effect without `command`: only processes mcp-guard spawns are isolated",
        ));
    }
    if let Some(command) = &server.command {
        check_command(&format!("{path}.command"), command, problems);
    }
    if let Some(url) = &server.url
        && let Err(reason) = check_url(url)
    {
        problems.push(Problem::error(format!("{path}.url"), reason));
    }
    if let Some(cgroup) = &server.adopt_cgroup {
        check_absolute(&format!("{path}.adopt_cgroup"), cgroup, problems);
    }
    if (server.user.is_some() || server.group.is_some()) && server.command.is_none() {
        problems.push(Problem::warning(
            path,
            "`user` and `group` have no effect without `command`: only processes mcp-guard \
             spawns run as them",
        ));
    }
    if let Err((field, reason)) = server.account() {
        problems.push(Problem::error(format!("{path}.{field}"), reason));
    }
    if server.resume_get_stream && server.url.is_none() {
        problems.push(Problem::warning(
            format!("{path}.resume_get_stream"),
            "has no effect without `url`",
        ));
    }
    check_upstream_headers(path, server, problems);
    if let Some(ca_file) = &server.tls_ca_file {
        check_absolute(&format!("{path}.tls_ca_file"), ca_file, problems);
        if !server
            .url
            .as_deref()
            .is_some_and(|url| url.starts_with("https://"))
        {
            problems.push(Problem::warning(
                format!("{path}.tls_ca_file"),
                "has no effect without an `https://` `url`",
            ));
        }
    }
}

/// A `url` server's `headers`: valid names that mcp-guard does not set itself, and values
/// that can be read now (a variable the daemon's environment may still have is a warning).
fn check_upstream_headers(path: &str, server: &ServerPolicy, problems: &mut Vec<Problem>) {
    if !server.headers.is_empty() && server.url.is_none() {
        problems.push(Problem::warning(
            format!("{path}.headers"),
            "has no effect without `url`",
        ));
    }
    for (name, header) in &server.headers {
        let at = format!("{path}.headers.{name}");
        let lower = name.to_ascii_lowercase();
        if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            problems.push(Problem::error(&at, "is not a valid HTTP header name"));
            continue;
        }
        if RESERVED_UPSTREAM_HEADERS.contains(&lower.as_str()) || lower.starts_with("mcp-guard-") {
            problems.push(Problem::error(
                &at,
                "is a header mcp-guard sets itself on requests to the server",
            ));
            continue;
        }
        if check_value_source(&at, header, problems) {
            report_unreadable(&at, header.header_value(), problems);
        }
    }
}

/// The shape of a `headers` or `env` value's source: an absolute `file`, a usable variable
/// name. Whether its value can be read is [`report_unreadable`]'s, asked only when this
/// found nothing wrong (`true`), so that one mistake is reported once.
fn check_value_source(at: &str, source: &ValueSource, problems: &mut Vec<Problem>) -> bool {
    let before = problems.len();
    if let Some(file) = &source.file {
        check_absolute(&format!("{at}.file"), file, problems);
        warn_if_others_may_read(&format!("{at}.file"), file, problems);
    }
    if let Some(variable) = &source.env
        && (variable.is_empty() || variable.contains(['=', '\0']))
    {
        problems.push(Problem::error(
            format!("{at}.env"),
            "must be a non-empty variable name without `=` or NUL",
        ));
    }
    problems.len() == before
}

/// A secret in a file any local user may read is no secret: warned about, as ssh does for
/// its keys. (A warning, not an error: the daemon's unit may run with a umask that fixes it.)
fn warn_if_others_may_read(at: &str, file: &Path, problems: &mut Vec<Problem>) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(metadata) = std::fs::metadata(file) else {
        return;
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o044 != 0 {
        problems.push(Problem::warning(
            at,
            format!(
                "{} is readable by other users (mode {mode:04o}): a secret should be readable \
                 by the daemon's user only (chmod 600)",
                file.display()
            ),
        ));
    }
}

/// A value read now (from the policy, a file or the environment), reported at the field at
/// fault. A variable missing here, or a file this user may not read, is a warning: the daemon's
/// environment and privileges may differ from those of whoever runs `policy check`.
fn report_unreadable(
    at: &str,
    read: Result<String, ValueSourceError>,
    problems: &mut Vec<Problem>,
) {
    match read {
        Ok(_) => {}
        Err(ValueSourceError::EnvUnset(variable)) => problems.push(Problem::warning(
            format!("{at}.env"),
            format!(
                "{variable} is not set here; the daemon cannot start sessions of this server \
                 while its environment lacks it"
            ),
        )),
        // The daemon reads it with its own privileges (and refuses the session if it cannot).
        Err(error @ ValueSourceError::FileNotPermitted { .. }) => {
            problems.push(Problem::warning(format!("{at}.file"), error.to_string()))
        }
        Err(error) => {
            let field = match error.field() {
                "" => at.to_owned(),
                field => format!("{at}.{field}"),
            };
            problems.push(Problem::error(field, error.to_string()));
        }
    }
}

/// An upstream endpoint must be an absolute `http` or `https` URL with a host.
fn check_url(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|error| format!("\"{text}\" is not a URL: {error}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "\"{text}\": the scheme must be http or https, not {}",
            url.scheme()
        ));
    }
    if url.host().is_none() {
        return Err(format!("\"{text}\" has no host"));
    }
    Ok(())
}

fn check_command(path: &str, command: &[String], problems: &mut Vec<Problem>) {
    match command.first() {
        None => problems.push(Problem::error(path, "must name a program to run")),
        Some(program) if program.is_empty() => {
            problems.push(Problem::error(
                format!("{path}[0]"),
                "program name is empty",
            ));
        }
        Some(_) => {}
    }
    // exec(2) takes C strings: a NUL would cut the argument short.
    for (index, argument) in command.iter().enumerate() {
        if argument.contains('\0') {
            problems.push(Problem::error(
                format!("{path}[{index}]"),
                "contains a NUL character",
            ));
        }
    }
}

fn check_env(path: &str, server: &ServerPolicy, problems: &mut Vec<Problem>) {
    if server.command.is_none() && !server.env.is_empty() {
        problems.push(Problem::warning(
            format!("{path}.env"),
            "has no effect: environment variables apply only to a server mcp-guard spawns \
             with `command`",
        ));
    }
    for (key, value) in &server.env {
        let key_path = format!("{path}.env.{key}");
        if key.is_empty() || key.contains(['=', '\0']) {
            problems.push(Problem::error(
                &key_path,
                "invalid environment variable name: it must be non-empty and contain no '=' \
                 or NUL character",
            ));
        }
        let well_formed = match value {
            EnvValue::From(source) => check_value_source(&key_path, source, problems),
            EnvValue::Text(_) => true,
        };
        if well_formed {
            report_unreadable(&key_path, value.read(), problems);
        }
    }
}

fn check_egress(server_path: &str, rules: &[EgressRule], problems: &mut Vec<Problem>) {
    let mut first_index_of_id: HashMap<&str, usize> = HashMap::new();
    for (index, rule) in rules.iter().enumerate() {
        let path = format!("{server_path}.egress[{index}]");
        check_rule(&path, rule, problems);
        if let Some(first) = first_index_of_id.get(rule.id.as_str()) {
            problems.push(Problem::error(
                format!("{path}.id"),
                format!(
                    "duplicate rule id \"{}\": also used by egress[{first}]",
                    rule.id
                ),
            ));
        } else {
            first_index_of_id.insert(&rule.id, index);
        }
    }
    problems.extend(missing_dns_warning(server_path, rules));
}

fn check_rule(path: &str, rule: &EgressRule, problems: &mut Vec<Problem>) {
    if !is_valid_name(&rule.id) {
        problems.push(Problem::error(
            format!("{path}.id"),
            format!("invalid rule id \"{}\": {NAME_RULE}", rule.id),
        ));
    }
    check_destination(path, rule, problems);
    if rule.ports.is_empty() {
        problems.push(Problem::error(
            format!("{path}.ports"),
            "must list at least one port; \"*\" means every port",
        ));
    }
    check_protocols(&format!("{path}.protocols"), &rule.protocols, problems);
}

fn check_destination(path: &str, rule: &EgressRule, problems: &mut Vec<Problem>) {
    match (&rule.cidr, &rule.host) {
        (Some(_), Some(_)) => problems.push(Problem::error(
            path,
            "give exactly one of `cidr` and `host`, not both: make two rules if both are meant",
        )),
        (None, None) => problems.push(Problem::error(
            path,
            "no destination: give one of `cidr` or `host`",
        )),
        _ => {}
    }
    if let Some(net) = &rule.cidr
        && is_ipv4_mapped(net)
    {
        let v4 = format!("{}/{}", net.addr().to_canonical(), net.prefix_len() - 96);
        problems.push(Problem::error(
            format!("{path}.cidr"),
            format!(
                "{net} is an IPv4-mapped IPv6 prefix, which never matches: destinations \
                 ::ffff:a.b.c.d are judged as the IPv4 address, so write it as IPv4 (e.g. {v4})"
            ),
        ));
    }
    if let Some(host) = &rule.host
        && let Err(reason) = check_host_name(host)
    {
        problems.push(Problem::error(format!("{path}.host"), reason));
    }
}

fn check_protocols(path: &str, protocols: &[Protocol], problems: &mut Vec<Problem>) {
    if protocols.is_empty() {
        problems.push(Problem::error(
            path,
            "must list at least one protocol (\"tcp\", \"udp\")",
        ));
    }
    for (index, protocol) in protocols.iter().enumerate() {
        if protocols[..index].contains(protocol) {
            problems.push(Problem::error(
                format!("{path}[{index}]"),
                format!("duplicate protocol \"{}\"", protocol_name(*protocol)),
            ));
        }
    }
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// A server allowed to reach a host name resolves that name itself, through its own resolver;
/// unless the policy also lets it reach a DNS server, the name never resolves and the rule is
/// dead. UDP is what resolvers use first, so a TCP-only port 53 rule does not count.
fn missing_dns_warning(server_path: &str, rules: &[EgressRule]) -> Option<Problem> {
    let has_host_rule = rules.iter().any(|rule| rule.host.is_some());
    let allows_dns = rules
        .iter()
        .any(|rule| rule.allows_port(DNS_PORT) && rule.allows_protocol(Protocol::Udp));
    (has_host_rule && !allows_dns).then(|| {
        Problem::warning(
            format!("{server_path}.egress"),
            "has `host` rules but no rule allows DNS (udp port 53): the server resolves host \
             names itself, so declare its resolver, e.g. {\"id\": \"dns\", \"cidr\": \
             \"127.0.0.53\", \"ports\": [53], \"protocols\": [\"udp\", \"tcp\"]}",
        )
    })
}

/// Principal and role names come from people and, later, identity providers, so they allow
/// the characters of e-mail addresses and URNs, but nothing that needs quoting in a log line.
pub(crate) fn is_valid_principal_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b':' | b'-'))
}

/// Server names and rule ids end up in URLs, metric labels and kernel-side rule tables, so
/// they are kept short and plain.
pub(crate) fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Checks that `host` is a name mcp-guard can resolve to addresses: a DNS name in
/// letters-digits-hyphen form (RFC 1123), optionally with a final dot.
fn check_host_name(host: &str) -> Result<(), String> {
    if host.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "\"{host}\" is an IP address: put addresses in `cidr`"
        ));
    }
    if host.contains('*') {
        return Err(format!(
            "\"{host}\": wildcards are not supported, because mcp-guard must resolve each name \
             to addresses; list the names one by one"
        ));
    }
    if host.contains([':', '/']) {
        return Err(format!(
            "\"{host}\" is not a host name: give the bare name, without scheme, port or path \
             (ports go in `ports`)"
        ));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 {
        return Err(format!(
            "\"{host}\" is not a valid DNS name: it must have 1-253 characters"
        ));
    }
    if let Some(label) = name.split('.').find(|label| !is_valid_label(label)) {
        return Err(format!(
            "\"{host}\" is not a valid DNS name: label \"{label}\" must have 1-63 characters \
             from A-Z a-z 0-9 -, and not start or end with -"
        ));
    }
    // RFC 3696: an all-numeric top-level label would be taken for part of an IPv4 address.
    if name.rsplit('.').next().is_some_and(is_all_digits) {
        return Err(format!(
            "\"{host}\" is not a valid DNS name: its last label is all digits"
        ));
    }
    Ok(())
}

fn is_valid_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

fn is_all_digits(label: &str) -> bool {
    label.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_alphabet() {
        for good in ["fetch", "a", "my-server_2.prod", &"x".repeat(64)] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "has space", "slash/y", "ünïcode", &"x".repeat(65)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn principal_names_allow_email_and_urn_characters() {
        for good in [
            "alice",
            "alice@example.com",
            "spiffe:team:svc",
            &"p".repeat(128),
        ] {
            assert!(is_valid_principal_name(good), "{good}");
        }
        for bad in ["", "a b", "a/b", "ünï", &"p".repeat(129)] {
            assert!(!is_valid_principal_name(bad), "{bad}");
        }
    }

    #[test]
    fn upstream_urls_must_be_http_with_a_host() {
        assert_eq!(check_url("http://127.0.0.1:3001/mcp"), Ok(()));
        assert_eq!(check_url("https://mcp.example.com/mcp"), Ok(()));
        assert!(
            check_url("ftp://example.com/")
                .unwrap_err()
                .contains("http or https")
        );
        assert!(
            check_url("example.com/mcp")
                .unwrap_err()
                .contains("is not a URL")
        );
        assert!(check_url("http://").is_err());
    }

    #[test]
    fn ordinary_host_names_are_accepted() {
        for host in [
            "api.example.com",
            "registry.npmjs.org.",
            "localhost",
            "xn--bcher-kva.example",
            "a-b.c0",
        ] {
            assert_eq!(check_host_name(host), Ok(()), "{host}");
        }
    }

    #[test]
    fn malformed_host_names_are_refused_with_a_reason() {
        let cases = [
            ("192.0.2.1", "is an IP address"),
            ("::1", "is an IP address"),
            ("*.example.com", "wildcards are not supported"),
            ("https://api.example.com", "without scheme, port or path"),
            ("api.example.com:443", "without scheme, port or path"),
            ("", "1-253 characters"),
            (".", "1-253 characters"),
            ("a..b", "label \"\""),
            ("-a.example", "label \"-a\""),
            ("under_score.example", "label \"under_score\""),
            ("1.2.3", "last label is all digits"),
        ];
        for (host, expected) in cases {
            let reason = check_host_name(host).unwrap_err();
            assert!(reason.contains(expected), "{host}: {reason}");
        }
        let long_label = format!("{}.example", "a".repeat(64));
        assert!(check_host_name(&long_label).is_err());
        let long_name = vec!["a".repeat(63); 5].join(".");
        assert!(check_host_name(&long_name).unwrap_err().contains("1-253"));
    }
}
