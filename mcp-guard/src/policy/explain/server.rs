//! One server's settings in words: how it runs, its mode, and where its processes may
//! connect.

use ipnet::{IpNet, Ipv6Net};

use super::super::model::{
    DaemonSettings, Destination, EgressRule, Isolation, Mode, Protocol, ServerPolicy,
};
use super::super::ports::PortRange;
use super::doc::{Cite, Sentence, Statement};
use super::rules::names_phrase;

/// The port DNS resolvers listen on.
const DNS_PORT: u16 = 53;

/// The setting path of a server's field, such as `servers.crm.command`.
pub fn server_path(name: &str, field: &str) -> Cite {
    Cite::setting(format!("servers.{name}.{field}"))
}

/// How mcp-guard runs or reaches the server, and who its stdio front acts as.
pub fn how_it_runs(name: &str, server: &ServerPolicy, policy_mode: Mode) -> Vec<Statement> {
    let mut statements = Vec::new();
    if let Some(command) = &server.command {
        statements.push(spawned(name, command, server.isolation));
        statements.push(account_statement(name, server));
        if !server.env.is_empty() {
            let sentence = Sentence::new()
                .text("It is started with the environment variables ")
                .then(Sentence::codes(server.env.keys(), "and"))
                .text(" set (values not shown)");
            statements.push(Statement::new(sentence, server_path(name, "env")));
        }
    }
    if let Some(url) = &server.url {
        let sentence = Sentence::new()
            .text("mcp-guard forwards the requests it allows to the Streamable HTTP server at ")
            .code(url);
        statements.push(Statement::new(sentence, server_path(name, "url")));
        if !server.headers.is_empty() {
            let sentence = Sentence::new()
                .text("Every request to it carries the headers ")
                .then(Sentence::codes(server.headers.keys(), "and"))
                .text(", which agents never see (values not shown)");
            statements.push(Statement::new(sentence, server_path(name, "headers")));
        }
    }
    if let Some(cgroup) = &server.adopt_cgroup {
        let sentence = Sentence::new()
            .text("The processes of the existing cgroup ")
            .code(cgroup.display().to_string())
            .text(" are confined to the network destinations below");
        statements.push(Statement::new(sentence, server_path(name, "adopt_cgroup")));
    }
    statements.extend(unconfined_warning(name, server));
    if let Some(principal) = &server.principal {
        let sentence = Sentence::new()
            .text("Requests on its stdio front (")
            .code(format!("mcp-guard stdio --server {name}"))
            .text(") act as principal ")
            .code(principal)
            .text(" unless ")
            .code("--principal")
            .text(" names another");
        statements.push(Statement::new(sentence, server_path(name, "principal")));
    }
    statements.extend(mode_statement(name, server, policy_mode));
    if !server.write_tools.is_empty() {
        let sentence = Sentence::new()
            .code("policy suggest")
            .text(" counts ")
            .then(names_phrase("tool", &server.write_tools, "and"))
            .text(
                " as able to change something, where the server's own tool annotations say nothing",
            );
        statements.push(Statement::new(sentence, server_path(name, "write_tools")));
    }
    statements
}

fn spawned(name: &str, command: &[String], isolation: Isolation) -> Statement {
    let how_many = match isolation {
        Isolation::PerSession => " once per agent session (each session gets its own process)",
        Isolation::Shared => " once, as one process shared by every agent session",
    };
    let sentence = Sentence::new()
        .text("mcp-guard starts ")
        .code(command.join(" "))
        .text(how_many)
        .text(", inside a cgroup it owns, so the network limits below bind it from its first instruction");
    let mut statement = Statement::new(sentence, server_path(name, "command"));
    if isolation == Isolation::Shared {
        statement.cites.push(server_path(name, "isolation"));
    }
    statement
}

/// Who the spawned process runs as; a reviewer must see when that is the daemon's own
/// account (root, on a packaged install).
fn account_statement(name: &str, server: &ServerPolicy) -> Statement {
    let (sentence, field) = match (&server.user, &server.group) {
        (Some(user), group) => {
            let mut sentence = Sentence::new().text("It runs as user ").code(user);
            if let Some(group) = group {
                sentence = sentence.text(", group ").code(group);
            }
            (sentence, "user")
        }
        (None, Some(group)) => (
            Sentence::new()
                .text("It runs as the daemon's user, in group ")
                .code(group),
            "group",
        ),
        (None, None) => (
            Sentence::new()
                .text("It runs as the daemon's own user (root on a packaged install), as no ")
                .code("user")
                .text(" is set"),
            "user",
        ),
    };
    Statement::new(sentence, server_path(name, field))
}

/// A server mcp-guard neither spawns nor adopts has no processes mcp-guard confines; the
/// reviewer must not read its egress rules as binding the real server.
fn unconfined_warning(name: &str, server: &ServerPolicy) -> Option<Statement> {
    let exec = Sentence::new().code(format!("mcp-guard egress exec --server {name}"));
    let sentence = match (&server.command, &server.url, &server.adopt_cgroup) {
        (Some(_), _, _) | (_, _, Some(_)) => return None,
        (None, Some(_), None) => Sentence::new()
            .text("mcp-guard neither starts this server nor adopts its cgroup: the network limits below bind only processes started with ")
            .then(exec),
        (None, None, None) => Sentence::new()
            .text("The policy gives neither a command nor a URL, so MCP requests for this server fail; only its network limits take effect, on processes started with ")
            .then(exec),
    };
    Some(Statement::new(
        sentence,
        Cite::setting(format!("servers.{name}")),
    ))
}

/// The server's mode, when it is not simply the policy's `enforce`.
fn mode_statement(name: &str, server: &ServerPolicy, policy_mode: Mode) -> Option<Statement> {
    let mode = server.effective_mode(policy_mode);
    let (lead, cite) = match server.mode {
        Some(own) if own != policy_mode => (
            Sentence::new()
                .text("This server runs in ")
                .code(own.as_str())
                .text(" mode, not the policy's ")
                .code(policy_mode.as_str())
                .text(": "),
            server_path(name, "mode"),
        ),
        _ if mode == Mode::Enforce => return None,
        _ => (
            Sentence::new()
                .text("This server runs in the policy's ")
                .code(mode.as_str())
                .text(" mode: "),
            Cite::setting("mode"),
        ),
    };
    Some(Statement::new(lead.then(mode_consequence(mode)), cite))
}

/// What a mode means for requests and connections, as a clause.
pub fn mode_consequence(mode: Mode) -> Sentence {
    match mode {
        Mode::Enforce => Sentence::new()
            .text("what the rules do not allow is refused, over MCP and in the kernel"),
        Mode::Shadow => Sentence::new()
            .text("every request and connection is judged as in ")
            .code("enforce")
            .text(" mode, but nothing is refused; what would have been refused is recorded as ")
            .code("would_deny")
            .text(" (MCP) or ")
            .code("would_refuse")
            .text(" (network)"),
        Mode::Learn => Sentence::new()
            .text("nothing is refused; mcp-guard records what is used (methods, tools, resources, prompts, argument shapes and network destinations) for ")
            .code("mcp-guard policy suggest"),
    }
}

/// Where the server's processes may connect, one statement per egress rule, and what that
/// leaves refused.
pub fn network(name: &str, server: &ServerPolicy, daemon: &DaemonSettings) -> Vec<Statement> {
    if server.egress.is_empty() {
        let sentence = Sentence::new()
            .text("Its processes may reach nothing on the network: every connection they attempt is refused");
        return vec![Statement::new(sentence, server_path(name, "egress"))];
    }
    let mut statements: Vec<Statement> = server.egress.iter().map(egress_statement).collect();
    statements.push(Statement::new(
        Sentence::new().text("Every other destination is refused"),
        Cite::Builtin("default deny"),
    ));
    if server.egress.iter().any(|rule| rule.host.is_some()) {
        statements.push(host_resolution(daemon));
        if !allows_dns(&server.egress) {
            let sentence = Sentence::new()
                .text("No rule lets it reach a DNS resolver (UDP port 53), so the server itself may fail to resolve these names");
            statements.push(Statement::new(sentence, server_path(name, "egress")));
        }
    }
    statements
}

/// "Its processes may reach the host `api.example.com` over TCP on port 443".
pub fn egress_statement(rule: &EgressRule) -> Statement {
    let sentence = Sentence::new()
        .text("Its processes may reach ")
        .then(destination(rule))
        .text(" over ")
        .text(protocols(&rule.protocols))
        .text(" on ")
        .text(ports(&rule.ports));
    Statement::new(sentence, Cite::Egress(rule.id.clone())).with_note(rule.description.as_deref())
}

fn destination(rule: &EgressRule) -> Sentence {
    match rule.destination() {
        Some(Destination::Host(host)) => Sentence::new().text("the host ").code(host),
        Some(Destination::Cidr(net)) => cidr_phrase(net),
        // A loaded policy never has such a rule, and the kernel allows nothing for one.
        None => Sentence::new().text("no destination (the rule names no single destination)"),
    }
}

fn cidr_phrase(net: IpNet) -> Sentence {
    let written = net.to_string();
    let phrase = if net.prefix_len() == net.max_prefix_len() {
        Sentence::new()
            .text("the address ")
            .code(net.addr().to_string())
    } else if net.prefix_len() == 0 {
        let family = if matches!(net, IpNet::V4(_)) {
            "IPv4"
        } else {
            "IPv6"
        };
        Sentence::new()
            .text(format!("any {family} address ("))
            .code(written)
            .text(")")
    } else {
        Sentence::new().text("any address in ").code(written)
    };
    // The kernel judges a v4-mapped destination as its IPv4 address, so an IPv6 prefix
    // covering the mapped range covers every IPv4 address too.
    let mapped = "::ffff:0:0/96".parse::<Ipv6Net>().expect("a valid prefix");
    match net {
        IpNet::V6(v6) if v6.contains(&mapped) => phrase.text(", which includes every IPv4 address"),
        _ => phrase,
    }
}

fn protocols(protocols: &[Protocol]) -> String {
    let mut names: Vec<&str> = protocols
        .iter()
        .map(|protocol| match protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    Sentence::list(
        names.into_iter().map(|name| Sentence::new().text(name)),
        "and",
    )
    .plain()
}

fn ports(ranges: &[PortRange]) -> String {
    if ranges.contains(&PortRange::ALL) {
        return "any port".to_owned();
    }
    let single = ranges.len() == 1 && ranges[0].first() == ranges[0].last();
    let noun = if single { "port " } else { "ports " };
    let list = Sentence::list(
        ranges
            .iter()
            .map(|range| Sentence::new().text(range.to_string())),
        "and",
    );
    format!("{noun}{}", list.plain())
}

fn host_resolution(daemon: &DaemonSettings) -> Statement {
    let sentence = Sentence::new().text(format!(
        "Host names are resolved by mcp-guard, which allows the addresses they resolve to and resolves them again as the records expire (kept at least {} and at most {} seconds); the server resolves the names itself too, through a resolver it must be allowed to reach",
        daemon.dns_min_ttl_seconds, daemon.dns_max_ttl_seconds
    ));
    let mut statement = Statement::new(sentence, Cite::setting("daemon.dns_min_ttl_seconds"));
    statement
        .cites
        .push(Cite::setting("daemon.dns_max_ttl_seconds"));
    statement
}

/// Whether some rule lets the server reach a resolver over UDP, which resolvers use first.
fn allows_dns(rules: &[EgressRule]) -> bool {
    rules
        .iter()
        .any(|rule| rule.allows_port(DNS_PORT) && rule.allows_protocol(Protocol::Udp))
}
