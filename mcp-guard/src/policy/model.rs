//! The policy file's shape, version 1.
//!
//! These types mirror the JSON one to one: every struct refuses unknown fields, and every
//! field's doc comment becomes its description in the published JSON Schema. Value-level
//! syntax (ports, CIDRs, protocol names) is checked while parsing; rules that span fields or
//! entries are checked afterwards by [`super::validate`].
//!
//! New sections (the MCP authorisation rules, upstream URLs, isolation modes) are added as
//! further optional fields, so that a version 1 file stays valid.

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

    /// The MCP servers mcp-guard guards, by name. A name is 1-64 characters from
    /// `A-Z a-z 0-9 _ . -`; it appears in URLs (`/servers/{name}/mcp`), audit records and
    /// metric labels.
    #[serde(default)]
    #[schemars(extend("propertyNames" = { "pattern": NAME_PATTERN }))]
    pub servers: BTreeMap<String, ServerPolicy>,
}

/// Settings of the mcp-guard daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonSettings {
    /// Address of the MCP front (Streamable HTTP at `/servers/{name}/mcp`). Absent: no HTTP
    /// front.
    pub listen: Option<SocketAddr>,

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
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            listen: None,
            metrics_listen: None,
            control_socket: PathBuf::from("/run/mcp-guard/control.sock"),
            bpffs: PathBuf::from("/sys/fs/bpf/mcp-guard"),
            cgroup_root: None,
            dns_min_ttl_seconds: 5,
            dns_max_ttl_seconds: 300,
        }
    }
}

/// What mcp-guard knows and enforces about one MCP server.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerPolicy {
    /// Free text for people reading the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,

    /// Program and arguments of a stdio MCP server that mcp-guard spawns in a guarded cgroup.
    /// The program is looked up in `PATH`. Not together with `adopt_cgroup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub command: Option<Vec<String>>,

    /// Environment variables set for `command`, on top of the daemon's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,

    /// Absolute path of an existing cgroup v2 directory (e.g. a systemd service's) whose
    /// processes mcp-guard confines to `egress`, for servers it does not spawn. Not together
    /// with `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt_cgroup: Option<PathBuf>,

    /// Network destinations the server's processes may reach. Anything not listed is refused;
    /// an empty list (the default) means the server may reach nothing.
    #[serde(default)]
    pub egress: Vec<EgressRule>,
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
