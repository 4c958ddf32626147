//! The policy file's shape, version 1.
//!
//! These types mirror the JSON one to one: every struct refuses unknown fields, and every
//! field's doc comment becomes its description in the published JSON Schema. Value-level
//! syntax (ports, CIDRs, protocol names) is checked while parsing; rules that span fields or
//! entries are checked afterwards by [`super::validate`].
//!
//! New sections are added as further optional fields, so that a version 1 file stays valid.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::cidr;
use super::ports::PortRange;

/// The only policy format version this build understands.
pub const POLICY_VERSION: u32 = 1;

/// What server names and rule ids look like, for the schema; [`super::validate`] enforces it.
const NAME_PATTERN: &str = "^[A-Za-z0-9_.-]{1,64}$";

/// What principal and role names look like, for the schema; [`super::validate`] enforces it.
/// Wider than [`NAME_PATTERN`] so that names from identity providers (`alice@example.com`,
/// `spiffe:team:svc`) fit unchanged.
const PRINCIPAL_PATTERN: &str = "^[A-Za-z0-9_.@:-]{1,128}$";

/// An mcp-guard policy: daemon settings and, per MCP server, what it may do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "mcp-guard policy")]
pub struct Policy {
    /// Policy format version. Must be 1.
    #[schemars(extend("const" = 1))]
    pub version: u32,

    /// Settings of the mcp-guard daemon itself. Every field has a default.
    #[serde(default)]
    pub daemon: DaemonSettings,

    /// The principals (people, agents, services) mcp-guard knows by name, with their roles.
    /// Rules name principals and roles; requests are attributed to a principal by the front
    /// they arrive on (`daemon.principal`, a server's `principal`). A name is 1-128 characters
    /// from `A-Z a-z 0-9 _ . @ : -`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("propertyNames" = { "pattern": PRINCIPAL_PATTERN }))]
    pub principals: BTreeMap<String, Principal>,

    /// The MCP servers mcp-guard guards, by name. A name is 1-64 characters from
    /// `A-Z a-z 0-9 _ . -`; it appears in URLs (`/servers/{name}/mcp`), audit records and
    /// metric labels.
    #[serde(default)]
    #[schemars(extend("propertyNames" = { "pattern": NAME_PATTERN }))]
    pub servers: BTreeMap<String, ServerPolicy>,

    /// The tamper-evident audit log: where it is written, when it rotates, and what it keeps
    /// of tool arguments. Every field has a default.
    #[serde(default)]
    pub audit: AuditSettings,

    /// Who callers on the Streamable HTTP front are: bearer JWTs verified locally, or (for
    /// development only) a header the caller sets. Absent: every request on the front is
    /// attributed to `daemon.principal`.
    #[serde(default)]
    pub identity: IdentitySettings,

    /// How the policy is applied: `enforce` (the default) refuses what the rules do not allow;
    /// `shadow` evaluates every rule and records `would_deny` but lets everything through;
    /// `learn` lets everything through and records what was used, for
    /// `mcp-guard policy suggest`. A server's own `mode` overrides this one.
    #[serde(default, skip_serializing_if = "Mode::is_default")]
    pub mode: Mode,
}

/// How a policy, or one server's part of it, is applied.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Refuse what the rules do not allow, over MCP and in the kernel.
    #[default]
    Enforce,
    /// Decide as `enforce` would, record `would_deny` (and `would_refuse` for network
    /// connections), but let everything through.
    Shadow,
    /// Let everything through and record what was used: methods, tools, resources, prompts,
    /// argument shapes, the servers' tool catalogues and every network destination.
    Learn,
}

impl Mode {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Shadow => "shadow",
            Self::Learn => "learn",
        }
    }

    /// True when nothing is refused: the kernel and the proxy only record.
    pub fn lets_everything_through(self) -> bool {
        self != Self::Enforce
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the HTTP front identifies its callers. With neither `jwt` nor `trust_header`, every
/// request is attributed to `daemon.principal`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct IdentitySettings {
    /// Every request on the HTTP front must carry `Authorization: Bearer <JWT>`, verified
    /// locally against the issuers listed here; the token names the principal and its roles.
    /// A request without a valid token is answered HTTP 401. Not together with
    /// `trust_header`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSettings>,

    /// Development only: take the principal from the request header `MCP-Guard-Principal`
    /// (roles from `principals`), which any caller can set to anything. Requests without the
    /// header are attributed to `daemon.principal`. The daemon warns at start-up while this is
    /// on. Default false.
    pub trust_header: bool,
}

/// Bearer JWTs on the HTTP front (RFC 7519), verified without calling the identity provider:
/// signature with the issuer's keys, `iss`, `aud`, `exp` and `nbf`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    /// The identity providers whose tokens are accepted, each chosen by the token's `iss`.
    /// At least one.
    #[schemars(length(min = 1))]
    pub issuers: Vec<JwtIssuer>,

    /// The claim holding the caller's roles: a string (roles separated by spaces) or an array
    /// of strings. A dotted path such as `realm_access.roles` reaches into nested objects; a
    /// claim whose name itself contains dots (`https://example.com/roles`) is found first.
    /// Roles named in `principals` for the token's principal are added. Absent from a token:
    /// no roles from it. Default `roles`.
    #[serde(default = "default_roles_claim")]
    #[schemars(length(min = 1))]
    pub roles_claim: String,

    /// The claim naming the principal (a string of 1-128 characters from
    /// `A-Z a-z 0-9 _ . @ : -`; a token whose principal is not is refused). Dotted paths as
    /// for `roles_claim`. Default `sub`.
    #[serde(default = "default_principal_claim")]
    #[schemars(length(min = 1))]
    pub principal_claim: String,

    /// Clock difference, in seconds, tolerated when checking `exp` and `nbf`. Default 60.
    #[serde(default = "default_clock_skew_seconds")]
    pub clock_skew_seconds: u64,

    /// URL of this resource's OAuth protected-resource metadata (RFC 9728), sent in the
    /// `resource_metadata` parameter of every 401 answer so that clients can find the
    /// authorisation server. An absolute `http` or `https` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(url)]
    pub resource_metadata_url: Option<String>,

    /// The HTTP front as an OAuth 2.0 protected resource (RFC 9728): mcp-guard serves each
    /// server's protected-resource metadata itself, names it in every 401 challenge, and
    /// refuses a token meant for another server behind this front. Not together with
    /// `resource_metadata_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected_resource: Option<ProtectedResource>,

    /// How many bearer tokens from one client address (an IPv4 address, an IPv6 /64) may be
    /// refused after a signature check within a minute. Beyond, that address's tokens not
    /// accepted before are answered 429 without a check until the minute is over (tokens
    /// accepted before still pass), so that forged tokens cannot keep the daemon's CPUs busy
    /// with signature checks. 0: no limit. Default 60.
    #[serde(default = "default_refused_tokens_per_minute")]
    pub refused_tokens_per_minute: u32,

    /// How many bearer tokens from all client addresses together may be refused after a
    /// signature check within a minute. Beyond, no token not accepted before is checked, from
    /// any address, until the minute is over: they are answered 429 (tokens accepted before
    /// still pass). It bounds the CPU a sender with many addresses can make the daemon spend
    /// on signature checks, at the price of new tokens waiting out the minute during such an
    /// attack. 0: no limit. Default 6000 (100 a second, a few percent of one CPU).
    #[serde(default = "default_refused_tokens_per_minute_all_addresses")]
    pub refused_tokens_per_minute_all_addresses: u32,
}

fn default_refused_tokens_per_minute() -> u32 {
    60
}

fn default_refused_tokens_per_minute_all_addresses() -> u32 {
    6000
}

/// What mcp-guard publishes about itself as an OAuth 2.0 protected resource (RFC 9728), so
/// that an MCP client that gets a 401 can find the authorisation server, and ask it for a
/// token meant for the server it calls (RFC 8707 `resource`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProtectedResource {
    /// Where agents reach the HTTP front, as they write it: `https://mcp.example.com` or
    /// `http://127.0.0.1:8080` (scheme, host and port only; no path). Server S's resource
    /// identifier is `<public_url>/servers/S/mcp`, and its metadata is served at
    /// `/.well-known/oauth-protected-resource/servers/S/mcp`.
    #[schemars(url)]
    pub public_url: String,

    /// The authorisation servers (their issuer identifiers, `http(s)` URLs) clients are sent
    /// to. Default: every `issuers[].issuer`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("items" = { "type": "string", "format": "uri" }, "uniqueItems" = true))]
    pub authorization_servers: Vec<String>,

    /// OAuth scopes clients may ask for (`scopes_supported` in the metadata). mcp-guard
    /// decides by principal and roles, not scopes; this only tells clients what to request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("items" = { "type": "string", "minLength": 1 }, "uniqueItems" = true))]
    pub scopes_supported: Vec<String>,
}

fn default_roles_claim() -> String {
    "roles".to_owned()
}

fn default_principal_claim() -> String {
    "sub".to_owned()
}

fn default_clock_skew_seconds() -> u64 {
    60
}

/// One identity provider whose tokens the HTTP front accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtIssuer {
    /// The exact `iss` of this provider's tokens, such as `https://idp.example.com/realms/x`.
    #[schemars(length(min = 1))]
    pub issuer: String,

    /// Audiences accepted: a token's `aud` (a string or an array) must contain one of them.
    /// At least one.
    #[schemars(length(min = 1), extend("items" = { "type": "string", "minLength": 1 }, "uniqueItems" = true))]
    pub audiences: Vec<String>,

    /// The keys that verify this provider's signatures. Read when the policy is loaded (and
    /// again at each reload; a changed key file reloads the policy); a file that cannot be
    /// read or parsed makes the policy invalid.
    pub keys: JwtKeys,

    /// Signature algorithms accepted from this provider; a token signed with another is
    /// refused, whatever its key. At least one.
    #[schemars(length(min = 1), extend("uniqueItems" = true))]
    pub algorithms: Vec<JwtAlgorithm>,
}

/// Where an issuer's verification keys come from. Give exactly one field.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("oneOf" = [
    { "required": ["hs256_secret"] },
    { "required": ["pem_file"] },
    { "required": ["jwks_file"] },
]))]
pub struct JwtKeys {
    /// The shared secret of HS256, inline (its UTF-8 bytes are the key). Prefer a public key:
    /// whoever reads the policy can mint tokens with this. At least 32 bytes is advised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret: Option<String>,

    /// A PEM file of one or more public keys (`PUBLIC KEY` or `RSA PUBLIC KEY` blocks): RSA
    /// keys verify RS256, P-256 keys ES256. Must be an absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pem_file: Option<PathBuf>,

    /// A JSON Web Key Set file (RFC 7517), such as a copy of the provider's `jwks_uri`: RSA
    /// keys verify RS256, P-256 keys ES256, `oct` keys HS256; keys marked for encryption or of
    /// other types are skipped. A token's `kid` picks the key. Must be an absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
}

/// A JWS signature algorithm (RFC 7518) mcp-guard verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum JwtAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256, with an RSA public key.
    RS256,
    /// ECDSA on P-256 with SHA-256, with an EC public key.
    ES256,
    /// HMAC with SHA-256, with the shared `hs256_secret` (or an `oct` key of a JWKS).
    HS256,
}

impl JwtAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::ES256 => "ES256",
            Self::HS256 => "HS256",
        }
    }
}

impl std::fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings of the audit log: an append-only file of JSON lines, one record per decision,
/// outcome, session event, policy event and network connection, chained by SHA-256 hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// The file records are appended to. Its directory is created if missing. Rotated files
    /// sit beside it as `<path>.1`, `<path>.2`, ... (higher is newer). Must be an absolute
    /// path. Default `/var/lib/mcp-guard/audit.jsonl`.
    pub path: PathBuf,

    /// Size in bytes at which the file is rotated (renamed to `<path>.N`, and a fresh file
    /// started); the hash chain continues across files. 0 never rotates. Default 104857600
    /// (100 MiB).
    pub rotate_bytes: u64,

    /// Store tool and prompt arguments in the records, with the fields named in `redact`
    /// replaced. Default false: only a SHA-256 digest of the arguments is recorded.
    pub store_arguments: bool,

    /// Names of argument fields whose values are replaced by `"[redacted]"` wherever they
    /// occur, at any depth, when `store_arguments` is on. Names compare without regard to
    /// ASCII case.
    #[schemars(extend("items" = { "type": "string", "minLength": 1 }, "uniqueItems" = true))]
    pub redact: Vec<String>,

    /// Flush every record to the disk (fdatasync) before the operation it records goes on.
    /// Records are committed in groups, so this costs one flush per group, not per record.
    /// Off, a crash of the machine may lose the last records. Default true.
    pub fsync: bool,

    /// With `fsync` on, what a call's decision record must be before the call is forwarded.
    /// `"forward"` (default): flushed to the disk, like every record. `"answer"`: written to
    /// the file (the kernel has it, so a crash of mcp-guard loses nothing) but flushed only
    /// with the call's outcome record, by one flush before the answer is returned: a call then
    /// waits for one flush instead of two. What a crash of the machine can then lose: the
    /// decision record of a call that was forwarded but whose answer was never returned.
    /// Denials, and every other record, are always flushed before anything goes on.
    /// `"interval"`: every record is written to the file before what it records goes on (a
    /// crash of mcp-guard loses nothing), and a background flush makes it durable at most
    /// `flush_interval_ms` later; no call waits for the disk. What a crash of the machine can
    /// then lose: the records of the last `flush_interval_ms`. No effect with `fsync` off.
    pub durable_before: DurableBefore,

    /// With `durable_before: "interval"`, the longest a written record waits for the
    /// background flush, in milliseconds (1 to 60000). Default 10.
    #[schemars(range(min = 1, max = 60000))]
    pub flush_interval_ms: u64,
}

impl AuditSettings {
    /// Whether an append waits for a flush before it is acknowledged (some appends, with
    /// `durable_before: "answer"`).
    pub fn flushes_before_acknowledging(&self) -> bool {
        self.fsync && self.durable_before != DurableBefore::Interval
    }
}

/// When a forwarded call's decision record is flushed to the disk (`audit.durable_before`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DurableBefore {
    /// Before the call is forwarded.
    #[default]
    Forward,
    /// Written before the call is forwarded, flushed (with the outcome record) before its
    /// answer is returned.
    Answer,
    /// Written before the call is forwarded, like every record; flushed in the background at
    /// most `flush_interval_ms` later.
    Interval,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/var/lib/mcp-guard/audit.jsonl"),
            rotate_bytes: 100 * 1024 * 1024,
            store_arguments: false,
            redact: Vec::new(),
            fsync: true,
            durable_before: DurableBefore::Forward,
            flush_interval_ms: 10,
        }
    }
}

/// A principal known to the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Principal {
    /// Roles the principal holds; rules may name a role instead of every principal holding it.
    /// A role is 1-128 characters from `A-Z a-z 0-9 _ . @ : -`.
    #[serde(default)]
    #[schemars(extend("items" = { "type": "string", "pattern": PRINCIPAL_PATTERN }, "uniqueItems" = true))]
    pub roles: Vec<String>,

    /// Free text for people reading the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Settings of the mcp-guard daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonSettings {
    /// Address of the MCP front (Streamable HTTP at `/servers/{name}/mcp`). Absent: no HTTP
    /// front.
    pub listen: Option<SocketAddr>,

    /// Principal that requests arriving on `listen` are attributed to when `identity` sets no
    /// other source (no `jwt`; with `trust_header`, requests without the header). Must name an
    /// entry of `principals`. Absent: such requests are attributed to `anonymous`, so only
    /// rules that name neither principals nor roles apply to them.
    #[schemars(pattern(PRINCIPAL_PATTERN))]
    pub principal: Option<String>,

    /// Largest MCP message, in bytes, the fronts accept (an HTTP body, a stdio line); a larger
    /// one is refused without being parsed. Default 4 MiB.
    #[schemars(range(min = 1))]
    pub max_message_bytes: usize,

    /// Largest message, in bytes, mcp-guard reads from a server (a stdio line, an HTTP body, an
    /// SSE event); a larger one is dropped unread, and the call it answers fails. Default
    /// 16 MiB.
    #[schemars(range(min = 1))]
    pub max_server_message_bytes: usize,

    /// Most requests a JSON-RPC batch may hold; a larger batch is refused whole. Default 64.
    #[schemars(range(min = 1))]
    pub max_batch_size: usize,

    /// Deepest nesting of arrays and objects a message may have (the message itself is level
    /// 1); deeper messages are refused, so that no parser recursion is unbounded. Default 64.
    #[schemars(range(min = 1))]
    pub max_json_depth: usize,

    /// TLS on the HTTP front: agents then connect with `https://`. Absent: plain HTTP (for a
    /// front bound to loopback, or behind a TLS-terminating proxy). Bearer tokens must not
    /// cross a network in the clear.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<FrontTls>,

    /// How long, in seconds, a client of the HTTP front may take to send a request's head
    /// once the connection waits for one (its first request, or the next on a kept-alive
    /// connection). A connection past it is closed, so that clients that send nothing, or
    /// dribble headers, cannot hold connections for ever. At least 1. Default 30.
    #[schemars(range(min = 1))]
    pub header_read_timeout_seconds: u32,

    /// Address of the Prometheus `/metrics` endpoint. Absent: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,

    /// Unix socket on which the daemon accepts control requests (from `mcp-guard stdio` and
    /// the CLI). Must be an absolute path.
    pub control_socket: PathBuf,

    /// Directory in a BPF filesystem where the eBPF programs and maps are pinned, so that
    /// enforcement outlives a daemon restart. Must be an absolute path.
    pub bpffs: PathBuf,

    /// cgroup v2 directory under which mcp-guard creates the cgroups of the servers it spawns,
    /// and where the eBPF programs are attached. Absent: `mcp-guard` under the cgroup v2 mount
    /// point. Must be an absolute path.
    pub cgroup_root: Option<PathBuf>,

    /// Shortest time, in seconds, an address resolved from an egress rule's `host` is kept
    /// before the name is resolved again, whatever the DNS record's TTL says. At least 1, and
    /// at most `dns_max_ttl_seconds`.
    #[schemars(range(min = 1))]
    pub dns_min_ttl_seconds: u32,

    /// Longest time, in seconds, an address resolved from an egress rule's `host` is kept
    /// before the name is resolved again, whatever the DNS record's TTL says.
    pub dns_max_ttl_seconds: u32,

    /// On SIGTERM, how long, in seconds, calls already in flight may take to finish once the
    /// daemon stops accepting new ones; whatever is still running then is cut off. Default 10.
    /// Keep systemd's `TimeoutStopSec` above it.
    pub shutdown_grace_seconds: u32,

    /// How long, in seconds, an agent session on the HTTP front may stay idle (no request in
    /// flight, no GET stream open, nothing sent) before mcp-guard ends it: its server process
    /// stops and an `end` record with `"reason": "idle"` is written. Agents that vanish
    /// without a `DELETE` would otherwise keep a server process each for ever; an agent that
    /// comes back gets 404 and initialises again, as Streamable HTTP prescribes. 0 never ends
    /// idle sessions. Default 3600.
    pub session_idle_timeout_seconds: u64,

    /// Most agent sessions the HTTP front keeps open at once, over all servers and callers.
    /// Each `per_session` server is a process: without a bound, agents could start them until
    /// the host runs out of memory. A session beyond it is refused (HTTP 503, `-32013`).
    /// Default 1024.
    #[schemars(range(min = 1))]
    pub max_sessions: usize,

    /// Most agent sessions one principal may keep open at once on the HTTP front, so that one
    /// caller cannot take every session the daemon allows. A session beyond it is refused
    /// (HTTP 429, `-32013`). Default 128.
    #[schemars(range(min = 1))]
    pub max_sessions_per_principal: usize,

    /// Threads that run the daemon's work (tokio workers), read when the daemon starts.
    /// Absent: one per CPU (or `TOKIO_WORKER_THREADS` from the environment). One suits a
    /// small host shared with the servers it guards, and lets `answer_poll_us` work.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub worker_threads: Option<usize>,

    /// How long, in microseconds, a call may poll for its server's answer (and the stdio
    /// front for the daemon's acknowledgement of a record) before its thread sleeps, and how
    /// long after answering an agent its connection polls for the agent's next request. On a
    /// virtual machine whose idle CPUs halt at once, each sleep costs a wake-up through the
    /// hypervisor; polling spares it for what comes within this time, and costs that much CPU
    /// at most per call and per answer. Servers whose answers usually take longer are not
    /// polled for. Takes effect with one worker thread: in the stdio front, and in the daemon
    /// with `worker_threads` 1. 0 (the default) never polls; at most 10000.
    #[serde(skip_serializing_if = "is_zero")]
    #[schemars(range(max = 10000))]
    pub answer_poll_us: u32,

    /// Proxies in front of the HTTP front (load balancers, TLS terminators), as address
    /// prefixes such as `10.0.0.0/8` or bare addresses. A request from one of them is taken to
    /// come from the address its RFC 7239 `Forwarded` (`for=`) or, without it,
    /// `X-Forwarded-For` names: the right-most entry that is not itself a trusted proxy. That address is the call records' `client_addr` and what the
    /// budget of refused tokens counts. Empty (the default): the connection's own address,
    /// whatever headers say.
    #[serde(
        default,
        deserialize_with = "cidr::deserialize_list",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(with = "Vec<String>")]
    pub trusted_proxies: Vec<IpNet>,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// The HTTP front's certificate and key. Read when the policy is loaded and again at every
/// reload (a changed file reloads the policy), so a renewed certificate needs no restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FrontTls {
    /// PEM file of the front's certificate, followed by its intermediate certificates. Must be
    /// an absolute path.
    pub cert_file: PathBuf,

    /// PEM file of the certificate's private key (PKCS #8, PKCS #1 or SEC 1). Must be an
    /// absolute path, readable by the daemon only.
    pub key_file: PathBuf,
}

impl DaemonSettings {
    /// `header_read_timeout_seconds` as a duration.
    pub fn header_read_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.header_read_timeout_seconds.into())
    }

    /// `answer_poll_us` as a duration.
    pub fn answer_poll(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.answer_poll_us.into())
    }
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            listen: None,
            principal: None,
            max_message_bytes: 4 * 1024 * 1024,
            max_server_message_bytes: 16 * 1024 * 1024,
            max_batch_size: 64,
            max_json_depth: 64,
            tls: None,
            header_read_timeout_seconds: 30,
            metrics_listen: None,
            control_socket: PathBuf::from("/run/mcp-guard/control.sock"),
            bpffs: PathBuf::from("/sys/fs/bpf/mcp-guard"),
            cgroup_root: None,
            dns_min_ttl_seconds: 5,
            dns_max_ttl_seconds: 300,
            shutdown_grace_seconds: 10,
            session_idle_timeout_seconds: 3600,
            max_sessions: 1024,
            max_sessions_per_principal: 128,
            worker_threads: None,
            answer_poll_us: 0,
            trusted_proxies: Vec::new(),
        }
    }
}

/// What mcp-guard knows and enforces about one MCP server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerPolicy {
    /// Free text for people reading the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,

    /// Program and arguments of a stdio MCP server that mcp-guard spawns in a guarded cgroup.
    /// The program is looked up in `PATH`. Not together with `adopt_cgroup` or `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub command: Option<Vec<String>>,

    /// Endpoint of an upstream MCP server speaking Streamable HTTP (`http://` or `https://`),
    /// to which mcp-guard forwards what the policy allows. Not together with `command`; may go
    /// with `adopt_cgroup` to confine the server's processes as well.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(url)]
    pub url: Option<String>,

    /// PEM file of CA certificates an `https://` `url` server's certificate may chain to, on
    /// top of the system's trusted roots (for servers with certificates of a private CA).
    /// Must be an absolute path; read when a session opens. Only with `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,

    /// Resume the server's GET stream after it drops with `Last-Event-ID` (the id of the last
    /// event it carried), so that the server replays what it sent meanwhile. Off by default:
    /// servers on the TypeScript SDK 1.x (server-everything among them) register a resumed GET
    /// stream under the wrong key and then drop everything they send on their own. Turn it on
    /// for servers whose resumption works (the Python SDK's, with an event store). Only with
    /// `url`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume_get_stream: bool,

    /// HTTP headers mcp-guard adds to every request it makes to the `url` server (POST, GET
    /// and DELETE), by header name: the server's own credentials (an API key, a bearer token)
    /// held by mcp-guard, so the agent never sees them. Each value comes from exactly one of
    /// `value`, `file` or `env`, and is read when a session opens. Headers mcp-guard sets
    /// itself (MCP's, content negotiation, trace context, `MCP-Guard-*`) may not be named.
    /// Only with `url`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, ValueSource>,

    /// How many processes of `command` run: `per_session` (the default) spawns one per agent
    /// session, so sessions cannot see each other's state; `shared` spawns one for everyone.
    /// Only meaningful with `command`.
    #[serde(default, skip_serializing_if = "Isolation::is_default")]
    pub isolation: Isolation,

    /// Principal that requests arriving on this server's stdio front (`mcp-guard stdio`) are
    /// attributed to. Must name an entry of `principals`. Absent: such requests have no
    /// principal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(PRINCIPAL_PATTERN))]
    pub principal: Option<String>,

    /// User `command` runs as: a name or a numeric uid. Its primary group is the group
    /// unless `group` says otherwise; supplementary groups are dropped. Absent: the daemon's
    /// user, which for a daemon run as root means a compromised server could move itself out
    /// of its guarded cgroup (root owns the cgroup files), so set it. Only with `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub user: Option<String>,

    /// Group `command` runs as: a name or a numeric gid. Absent: `user`'s primary group (or
    /// the daemon's group without `user`). Only with `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub group: Option<String>,

    /// Environment variables set for `command`, on top of the daemon's environment: each a
    /// string, or where a secret comes from (`{"file": ...}`, `{"env": ...}`), read when the
    /// process starts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, EnvValue>,

    /// Absolute path of an existing cgroup v2 directory (e.g. a systemd service's) whose
    /// processes mcp-guard confines to `egress`, for servers it does not spawn. Not together
    /// with `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt_cgroup: Option<PathBuf>,

    /// Network destinations the server's processes may reach. Anything not listed is refused;
    /// an empty list (the default) means the server may reach nothing.
    #[serde(default)]
    pub egress: Vec<EgressRule>,

    /// What callers may do with the server over MCP. A request is allowed when some rule
    /// allows it and no rule denies it; anything no rule allows is denied. Protocol plumbing
    /// (`initialize`, `ping`, progress and cancellation notifications, ...) needs no rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,

    /// Longest time, in seconds, mcp-guard waits for the server's answer to one request.
    /// When it passes, the agent gets a JSON-RPC error (-32011), the server gets
    /// `notifications/cancelled` for the request, and the outcome is recorded as a transport
    /// error; the session goes on. At least 1. Default 300. Until a server process mcp-guard
    /// started has answered once, its requests are given at least 30 s: that wait includes
    /// the process's start-up.
    #[serde(
        default = "default_request_timeout_seconds",
        skip_serializing_if = "is_default_request_timeout"
    )]
    #[schemars(range(min = 1))]
    pub request_timeout_seconds: u64,

    /// This server's mode, overriding the policy's `mode` (see there). Absent: the policy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,

    /// Tool names or glob patterns (as in a rule's `methods`) of tools that change something
    /// (write, delete, send, pay). The scope report of `policy suggest` counts a tool as
    /// write-capable when the server's `annotations` say so (`readOnlyHint` false or
    /// `destructiveHint` true) or, where the server says nothing, when it is listed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("items" = { "type": "string", "minLength": 1 }, "uniqueItems" = true))]
    pub write_tools: Vec<String>,
}

const DEFAULT_REQUEST_TIMEOUT_SECONDS: u64 = 300;

fn default_request_timeout_seconds() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_SECONDS
}

fn is_default_request_timeout(seconds: &u64) -> bool {
    *seconds == DEFAULT_REQUEST_TIMEOUT_SECONDS
}

impl Default for ServerPolicy {
    fn default() -> Self {
        Self {
            description: None,
            command: None,
            url: None,
            tls_ca_file: None,
            resume_get_stream: false,
            headers: BTreeMap::new(),
            isolation: Isolation::default(),
            principal: None,
            user: None,
            group: None,
            env: BTreeMap::new(),
            adopt_cgroup: None,
            egress: Vec::new(),
            rules: Vec::new(),
            request_timeout_seconds: DEFAULT_REQUEST_TIMEOUT_SECONDS,
            mode: None,
            write_tools: Vec::new(),
        }
    }
}

/// The value of one of a server's `env` variables: the text itself, or where it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum EnvValue {
    Text(String),
    From(ValueSource),
}

impl EnvValue {
    /// The variable's value now (no environment variable may hold a NUL).
    pub fn read(&self) -> Result<String, ValueSourceError> {
        let value = match self {
            Self::Text(text) => text.clone(),
            Self::From(source) => source.read()?,
        };
        if value.contains('\0') {
            return Err(ValueSourceError::Nul);
        }
        Ok(value)
    }
}

impl From<&str> for EnvValue {
    fn from(text: &str) -> EnvValue {
        EnvValue::Text(text.to_owned())
    }
}

/// Where a value of a server's `headers` or `env` comes from: exactly one of `value`, `file`
/// and `env`, after `prefix`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValueSource {
    /// The value itself. For what is not secret: whoever may read the policy reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,

    /// Absolute path of a file holding the value (whitespace around it, such as a final
    /// newline, is ignored), readable by the daemon only. Read when the policy is checked and
    /// when a session opens; a header's file again whenever it changes (a rotated token
    /// reaches open sessions at once), an `env` value's when the next process starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,

    /// Name of an environment variable of the daemon holding the value (systemd's
    /// `Environment=` or `EnvironmentFile=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,

    /// Text put before the value, such as `Bearer `.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// Why a [`ValueSource`]'s value cannot be had, or cannot be used where it goes. Never carries
/// the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueSourceError {
    #[error("give exactly one of `value`, `file` and `env`")]
    Source,
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// The file exists but this process may not read it: a reviewer running `policy check`
    /// without the daemon's privileges, for a secret only the daemon may read.
    #[error("{}: this user may not read it; the daemon's user must be able to", path.display())]
    FileNotPermitted { path: PathBuf },
    #[error("environment variable {0} is not set")]
    EnvUnset(String),
    #[error("the value is empty")]
    Empty,
    #[error("the value has a control character or a line break, which no header value may hold")]
    NotAHeaderValue,
    #[error("the value contains a NUL character")]
    Nul,
}

impl ValueSourceError {
    /// The field of the header's entry at fault (empty: the entry as a whole).
    pub fn field(&self) -> &'static str {
        match self {
            Self::File { .. } | Self::FileNotPermitted { .. } => "file",
            Self::EnvUnset(_) => "env",
            Self::Source | Self::Empty | Self::NotAHeaderValue | Self::Nul => "",
        }
    }
}

impl ValueSource {
    /// The value now: `prefix` and what its source holds (not empty).
    pub fn read(&self) -> Result<String, ValueSourceError> {
        let held = match (&self.value, &self.file, &self.env) {
            (Some(value), None, None) => value.clone(),
            (None, Some(path), None) => std::fs::read_to_string(path)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::PermissionDenied => {
                        ValueSourceError::FileNotPermitted { path: path.clone() }
                    }
                    _ => ValueSourceError::File {
                        path: path.clone(),
                        reason: e.to_string(),
                    },
                })?
                .trim()
                .to_owned(),
            (None, None, Some(name)) => {
                std::env::var(name).map_err(|_| ValueSourceError::EnvUnset(name.clone()))?
            }
            _ => return Err(ValueSourceError::Source),
        };
        if held.is_empty() {
            return Err(ValueSourceError::Empty);
        }
        Ok(format!("{}{held}", self.prefix))
    }

    /// The value as an HTTP header's: [`ValueSource::read`], refused when it holds what no
    /// header value may (RFC 9110: visible characters, spaces and tabs, and obs-text).
    pub fn header_value(&self) -> Result<String, ValueSourceError> {
        let value = self.read()?;
        if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(ValueSourceError::NotAHeaderValue);
        }
        Ok(value)
    }
}

/// Headers of a request to a `url` server that mcp-guard sets itself, so a server's `headers`
/// may not name them (lower case; `mcp-guard-*` as well).
pub const RESERVED_UPSTREAM_HEADERS: &[&str] = &[
    "accept",
    "baggage",
    "connection",
    "content-length",
    "content-type",
    "host",
    "last-event-id",
    "mcp-method",
    "mcp-name",
    "mcp-protocol-version",
    "mcp-session-id",
    "te",
    "traceparent",
    "tracestate",
    "transfer-encoding",
    "upgrade",
];

/// The uid and gid a server's `command` runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
}

impl ServerPolicy {
    /// The account `command` runs as, from `user` and `group` resolved on this host; `None`
    /// when neither is given (the daemon's own). `Err`: the field that cannot be resolved
    /// (`user` or `group`) and why.
    pub fn account(&self) -> Result<Option<Account>, (&'static str, String)> {
        if self.user.is_none() && self.group.is_none() {
            return Ok(None);
        }
        let (uid, primary_gid) = match &self.user {
            Some(user) => resolve_user(user).map_err(|reason| ("user", reason))?,
            None => (
                nix::unistd::getuid().as_raw(),
                nix::unistd::getgid().as_raw(),
            ),
        };
        let gid = match &self.group {
            Some(group) => resolve_group(group).map_err(|reason| ("group", reason))?,
            None => primary_gid,
        };
        Ok(Some(Account { uid, gid }))
    }

    /// How long one request to this server may take.
    pub fn request_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.request_timeout_seconds)
    }

    /// The mode this server runs in under `policy_mode`, the policy's own.
    pub fn effective_mode(&self, policy_mode: Mode) -> Mode {
        self.mode.unwrap_or(policy_mode)
    }
}

/// How many server processes mcp-guard spawns for a `command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// One process per agent session, ended with the session.
    #[default]
    PerSession,
    /// One process for every session, kept while the daemon runs.
    Shared,
}

impl Isolation {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// One MCP authorisation rule of a server.
///
/// A rule applies to a request when every condition it gives holds: the caller is one of
/// `principals` or holds one of `roles`, the method matches `methods`, the tool, resource or
/// prompt matches `tools`, `resources` or `prompts`, the context matches `when`, and the
/// arguments satisfy `arguments`. A condition left out holds for every request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Identifier of the rule, unique within the server; 1-64 characters from
    /// `A-Z a-z 0-9 _ . -`. Refusals, audit records and metrics name the rule that decided.
    #[schemars(pattern(NAME_PATTERN))]
    pub id: String,

    /// What the rule is for, in words; shown to people reading audit records and refusals.
    #[schemars(length(min = 1))]
    pub description: String,

    /// `allow` or `deny`. A deny rule that applies overrides every allow rule.
    pub effect: Effect,

    /// Principals the rule applies to, by name (entries of the top-level `principals`).
    /// With `roles` as well, a caller matching either list is enough; with neither, the
    /// rule applies to every caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1), extend("items" = { "type": "string", "pattern": PRINCIPAL_PATTERN }))]
    pub principals: Option<Vec<String>>,

    /// Roles the rule applies to: a caller holding any of them matches. With `principals`
    /// as well, a caller matching either list is enough; with neither, the rule applies to
    /// every caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1), extend("items" = { "type": "string", "pattern": PRINCIPAL_PATTERN }))]
    pub roles: Option<Vec<String>>,

    /// JSON-RPC methods the rule applies to, such as `tools/list`, or glob patterns such as
    /// `resources/*`. In a pattern `*` matches any run of characters (`/` included) and `?`
    /// any one character. Default: `["*"]`, every method.
    #[serde(default = "default_methods")]
    #[schemars(length(min = 1))]
    pub methods: Vec<String>,

    /// Tool names or glob patterns (as in `methods`). Restricts the rule to `tools/call` of
    /// a matching tool (`params.name`); a tool is listed by `tools/list` to callers some rule
    /// lets call it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub tools: Option<Vec<String>>,

    /// Resource URIs or glob patterns (as in `methods`), such as `file:///srv/docs/*`.
    /// Restricts the rule to `resources/read`, `resources/subscribe` and
    /// `resources/unsubscribe` of a matching URI (`params.uri`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub resources: Option<Vec<String>>,

    /// Prompt names or glob patterns (as in `methods`). Restricts the rule to `prompts/get`
    /// of a matching prompt (`params.name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub prompts: Option<Vec<String>>,

    /// A JSON Schema (draft 2020-12 unless `$schema` says otherwise) the request's
    /// `params.arguments` must satisfy; absent arguments count as `{}`. Restricts the rule to
    /// `tools/call` and `prompts/get`. `format` is asserted; `$ref` may only point inside the
    /// schema. For a deny rule, the schema describes the arguments that are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<serde_json::Map<String, serde_json::Value>>")]
    pub arguments: Option<serde_json::Value>,

    /// Conditions on context values carried with the session or the request (such as a
    /// workflow step): every key listed must be present with one of the values listed for it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("additionalProperties" = { "type": "array", "items": { "type": "string" }, "minItems": 1 }))]
    pub when: BTreeMap<String, Vec<String>>,
}

fn default_methods() -> Vec<String> {
    vec!["*".to_owned()]
}

/// What a rule does to the requests it applies to, and what a decision came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// The request goes on to the server.
    Allow,
    /// The request is refused and never reaches the server.
    Deny,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

impl std::fmt::Display for Effect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One destination a server may reach: an address prefix or a host name, with ports and
/// protocols. Give exactly one of `cidr` and `host`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("oneOf" = [{ "required": ["cidr"] }, { "required": ["host"] }]))]
pub struct EgressRule {
    /// Identifier of the rule, unique within the server; 1-64 characters from
    /// `A-Z a-z 0-9 _ . -`. Egress events and audit records name the rule that matched.
    #[schemars(pattern(NAME_PATTERN))]
    pub id: String,

    /// Free text for people reading the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,

    /// Destination address prefix, such as `10.0.0.0/8` or `2001:db8::/32`; a bare address
    /// means that one host. Host bits must be zero. Not together with `host`.
    #[serde(
        default,
        deserialize_with = "cidr::deserialize_optional",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub cidr: Option<IpNet>,

    /// Destination DNS name, such as `api.example.com`. mcp-guard resolves it and allows the
    /// addresses it resolves to, re-resolving as records expire. The server resolves the name
    /// itself, so its DNS resolver must be allowed by another rule. Not together with `cidr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,

    /// Destination ports: numbers, inclusive ranges such as `"8000-8100"`, or `"*"` for every
    /// port. At least one.
    #[schemars(length(min = 1))]
    pub ports: Vec<PortRange>,

    /// Transport protocols allowed to the destination. Default: `["tcp"]`.
    #[serde(default = "default_protocols")]
    #[schemars(length(min = 1), extend("uniqueItems" = true))]
    pub protocols: Vec<Protocol>,
}

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Tcp]
}

/// Where an [`EgressRule`] allows traffic to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// An address prefix (a single address is a /32 or /128).
    Cidr(IpNet),
    /// A DNS name, resolved by mcp-guard to the addresses it allows.
    Host(String),
}

impl EgressRule {
    /// The rule's destination, or `None` if the rule names both a CIDR and a host or neither.
    /// A policy from [`super::Policy::load`] never has such a rule; code that meets one anyway
    /// must allow nothing for it.
    pub fn destination(&self) -> Option<Destination> {
        match (&self.cidr, &self.host) {
            (Some(net), None) => Some(Destination::Cidr(*net)),
            (None, Some(host)) => Some(Destination::Host(host.clone())),
            _ => None,
        }
    }

    pub fn port_ranges(&self) -> &[PortRange] {
        &self.ports
    }

    /// True when one of the rule's port ranges contains `port`.
    pub fn allows_port(&self, port: u16) -> bool {
        self.ports.iter().any(|range| range.contains(port))
    }

    pub fn allows_protocol(&self, protocol: Protocol) -> bool {
        self.protocols.contains(&protocol)
    }
}

/// A transport protocol.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP, judged at `connect()`.
    Tcp,
    /// UDP, judged at `connect()` and for each datagram sent without one.
    Udp,
}

/// A user name or numeric uid: its uid and primary gid.
fn resolve_user(user: &str) -> Result<(u32, u32), String> {
    let found = match user.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => nix::unistd::User::from_name(user),
    };
    match found {
        Ok(Some(entry)) => Ok((entry.uid.as_raw(), entry.gid.as_raw())),
        Ok(None) => match user.parse::<u32>() {
            // A bare uid need not have a passwd entry; its group is then its own number.
            Ok(uid) => Ok((uid, uid)),
            Err(_) => Err(format!("no user named \"{user}\" on this host")),
        },
        Err(e) => Err(format!("looking up user \"{user}\": {e}")),
    }
}

/// A group name or numeric gid: its gid.
fn resolve_group(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(entry)) => Ok(entry.gid.as_raw()),
        Ok(None) => Err(format!("no group named \"{group}\" on this host")),
        Err(e) => Err(format!("looking up group \"{group}\": {e}")),
    }
}
