//! `cargo xtask bench proxy`: what mcp-guard adds to a `tools/call`, against the same server
//! reached directly, over Streamable HTTP and stdio, at concurrency 1 and 32.
//!
//! Configurations (each is one MCP session, opened once and reused for the whole run):
//!
//! | name                    | client talks to                     | which reaches                  |
//! |-------------------------|-------------------------------------|--------------------------------|
//! | `http-direct`           | mcp-fast-server `--http`            |                                |
//! | `http-guard-url`        | mcp-guard HTTP front                | the same fast server, by `url` |
//! | `http-guard-stdio`      | mcp-guard HTTP front                | a fast server it spawns        |
//! | `stdio-direct`          | mcp-fast-server on stdio            |                                |
//! | `stdio-guard`           | `mcp-guard stdio` on stdio          | a fast server it spawns        |
//! | `everything-direct`     | server-everything on stdio          |                                |
//! | `everything-stdio-guard`| `mcp-guard stdio` on stdio          | server-everything it spawns    |
//! | `everything-http-guard` | mcp-guard HTTP front                | server-everything it spawns    |
//!
//! Every guarded configuration is compared with a direct one ("baseline"): the same transport
//! to the same server where there is one (`http-guard-url`, `stdio-guard`,
//! `everything-stdio-guard`); for the HTTP front in front of a stdio server, the direct
//! configuration with the same server (`http-guard-stdio` against `http-direct`, what an agent
//! that speaks HTTP would otherwise talk to; `everything-http-guard` against
//! `everything-direct`, as server-everything is measured on stdio).
//!
//! The daemon runs as in production: `mcp-guard run` on a generated policy (tools/list and
//! tools/call of `echo` allowed for the daemon's principal), kernel egress enforcement on (its
//! own bpffs directory and cgroup subtree, torn down at the end), its default log level, stderr
//! into a file, and its audit log durable (fsync) in the bench's temporary directory on the
//! disk. The stdio front is started as an agent would, and places its server through the
//! daemon's control socket.
//!
//! Each session is initialised properly (`initialize`, `notifications/initialized`, a
//! `tools/list`), then warmed up with `--warmup` calls at concurrency 1 and as many at the
//! highest concurrency. Measurement runs in rounds; each round runs every (configuration,
//! concurrency) cell once, in an order rotated per round, so that drift hits all alike. At
//! concurrency N, N tasks keep one request each in flight on the one session (over HTTP the
//! client's connection pool then holds N keep-alive connections; over stdio the requests are
//! pipelined on the pipe and matched by id). Each sample times one call, from just before the
//! request is written to the parsed response; throughput is calls over the wall time of the
//! cell's blocks. For configurations served by the daemon's HTTP front, the daemon's own
//! `mcp_guard_request_duration_seconds` (total, policy and upstream stages) is read before and
//! after every block, giving the mean time spent inside the daemon per call.
//!
//! The client is single-threaded (a current-thread tokio runtime; reqwest with keep-alive for
//! HTTP), so that on a small machine it takes as little CPU from the daemon and the servers as
//! possible; it is the same client in every configuration.
//!
//! After every round the bench itself appends 50 record-sized lines (600 bytes) to a file in
//! the audit log's directory, each followed by `fdatasync`, and reports their p50 and p99: what
//! the disk alone costs one durable record in this run, to set against the added latency.
//! It also times 50 one-way wake-ups of a thread asleep on a socket, woken by a write from
//! the other CPU (each thread pinned to one), 100 µs apart so that the sleeper's CPU goes idle
//! for about as long as a hop's does inside a guarded call: what every extra hop on a guarded
//! path pays before any work is done. On a KVM guest the line names `guest_halt_poll_ns` (the `haltpoll` cpuidle
//! driver), which decides that cost: at 0 an idle CPU halts and its wake-up goes through the
//! hypervisor. `--halt-poll-ns N` sets it for the run and puts the old value back at the end
//! (not when the bench is killed).
//!
//! Targets (for comparison, not assertions): at most 100 µs added at p50 and 500 µs at p99.
//!
//! Needs root. Flags: `--rounds N` (12), `--calls N` per round and cell at concurrency 1 (500),
//! `--concurrent-calls N` per round and cell at higher concurrency (2000), `--warmup N` (500),
//! `--concurrency A,B,..` (1,32), `--only NAME,NAME,..`, `--no-real` (leave out
//! server-everything), `--daemon-log LEVEL` (`RUST_LOG` for the daemon and the stdio fronts;
//! default: theirs), `--no-audit-fsync` (the audit log, in the bench's temporary directory on
//! the disk, is durable by default), `--durable-before forward|answer|interval` (the policy's
//! `audit.durable_before`, with `interval` at the default 10 ms; left out of the policy unless
//! given, so an older `--guard` runs),
//! `--halt-poll-ns N`, `--worker-threads N` and `--answer-poll-us N` (the policy's
//! `daemon.worker_threads` and `daemon.answer_poll_us`, left out unless given), `--jwt
//! hs256|rs256|es256` (the HTTP front authenticates the bench with a bearer JWT signed by
//! that algorithm's test key: `identity.jwt` in the policy), `--session-opens N` (after the
//! calls, open N sessions per target and concurrency with `initialize`, each ended with
//! `DELETE`: directly at the fast server, through the daemon to a fast server started per
//! session, and to one shared by every session; text output only), `--json`. Binaries: `--guard PATH` and `--fast-server
//! PATH` (default: next to this one), `--peers DIR` (default `$MCP_GUARD_PEERS_DIR` or
//! `target/mcp-peers`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcp_guard_tests::bench::parse_number;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

const PROTOCOL_VERSION: &str = "2025-11-25";
const PRINCIPAL: &str = "bench";
const ECHO_TEXT: &str = "hello";
const TARGET_ADDED_P50_US: f64 = 100.0;
const TARGET_ADDED_P99_US: f64 = 500.0;
/// Generous safety net for start-up and for any one call; never a performance threshold.
const TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

struct Options {
    rounds: usize,
    calls: usize,
    concurrent_calls: usize,
    warmup: usize,
    concurrency: Vec<usize>,
    only: Option<Vec<String>>,
    real: bool,
    daemon_log: Option<String>,
    audit_fsync: bool,
    durable_before: Option<String>,
    halt_poll_ns: Option<u64>,
    /// `daemon.worker_threads` and `daemon.answer_poll_us`, left out of the policy unless given.
    worker_threads: Option<usize>,
    answer_poll_us: Option<u32>,
    /// Bearer JWTs on the HTTP front, signed with this algorithm's test key.
    jwt: Option<jsonwebtoken::Algorithm>,
    /// Sessions opened per target and concurrency in the session-opening measurement; 0: none.
    session_opens: usize,
    json: bool,
    guard: PathBuf,
    fast_server: PathBuf,
    peers: PathBuf,
}

fn parse_options() -> Result<Options, String> {
    let here = std::env::current_exe()
        .map_err(|e| format!("where am I: {e}"))?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut options = Options {
        rounds: 12,
        calls: 500,
        concurrent_calls: 2000,
        warmup: 500,
        concurrency: vec![1, 32],
        only: None,
        real: true,
        daemon_log: None,
        audit_fsync: true,
        durable_before: None,
        halt_poll_ns: None,
        worker_threads: None,
        answer_poll_us: None,
        jwt: None,
        session_opens: 0,
        json: false,
        guard: here.join("mcp-guard"),
        fast_server: here.join("mcp-fast-server"),
        peers: default_peers_dir(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--rounds" => options.rounds = parse_number(&value()?)?,
            "--calls" => options.calls = parse_number(&value()?)?,
            "--concurrent-calls" => options.concurrent_calls = parse_number(&value()?)?,
            "--warmup" => options.warmup = parse_number(&value()?)?,
            "--concurrency" => {
                options.concurrency = value()?
                    .split(',')
                    .map(parse_number)
                    .collect::<Result<_, _>>()?
            }
            "--only" => options.only = Some(value()?.split(',').map(str::to_owned).collect()),
            "--no-real" => options.real = false,
            "--daemon-log" => options.daemon_log = Some(value()?),
            "--no-audit-fsync" => options.audit_fsync = false,
            "--durable-before" => {
                let when = value()?;
                if !["forward", "answer", "interval"].contains(&when.as_str()) {
                    return Err(format!(
                        "--durable-before: {when:?} is not forward, answer or interval"
                    ));
                }
                options.durable_before = Some(when);
            }
            "--halt-poll-ns" => options.halt_poll_ns = Some(parse_number(&value()?)?),
            "--worker-threads" => options.worker_threads = Some(parse_number(&value()?)?),
            "--answer-poll-us" => options.answer_poll_us = Some(parse_number(&value()?)?),
            "--jwt" => options.jwt = Some(parse_jwt_algorithm(&value()?)?),
            "--session-opens" => options.session_opens = parse_number(&value()?)?,
            "--json" => options.json = true,
            "--guard" => options.guard = PathBuf::from(value()?),
            "--fast-server" => options.fast_server = PathBuf::from(value()?),
            "--peers" => options.peers = PathBuf::from(value()?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if options.rounds == 0 || options.calls == 0 || options.concurrent_calls == 0 {
        return Err("--rounds, --calls and --concurrent-calls must be at least 1".into());
    }
    if options.concurrency.is_empty() || options.concurrency.contains(&0) {
        return Err("--concurrency needs positive numbers".into());
    }
    if options.session_opens > 0 && options.json {
        return Err("--session-opens reports in text only; leave out --json".into());
    }
    Ok(options)
}

fn parse_jwt_algorithm(text: &str) -> Result<jsonwebtoken::Algorithm, String> {
    match text.to_ascii_uppercase().as_str() {
        "HS256" => Ok(jsonwebtoken::Algorithm::HS256),
        "RS256" => Ok(jsonwebtoken::Algorithm::RS256),
        "ES256" => Ok(jsonwebtoken::Algorithm::ES256),
        _ => Err(format!("--jwt: {text:?} is not hs256, rs256 or es256")),
    }
}

/// Where `cargo xtask setup` installs the real peers (the same rule as xtask's).
fn default_peers_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf();
    match std::env::var_os("MCP_GUARD_PEERS_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => root.join(dir),
        None => root.join("target").join("mcp-peers"),
    }
}

fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("proxy-bench: {error}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(error) = runtime.block_on(run(options)) {
        eprintln!("proxy-bench: {error}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Configurations
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    HttpDirect,
    HttpGuardUrl,
    HttpGuardStdio,
    StdioDirect,
    StdioGuard,
    EverythingDirect,
    EverythingStdioGuard,
    EverythingHttpGuard,
}

struct Config {
    kind: Kind,
    name: &'static str,
    path: &'static str,
    baseline: Option<&'static str>,
    /// Server-everything rather than the fast server.
    real: bool,
    /// The policy's server name, where the daemon's HTTP front serves the configuration.
    daemon_server: Option<&'static str>,
}

const CONFIGS: [Config; 8] = [
    Config {
        kind: Kind::HttpDirect,
        name: "http-direct",
        path: "client -> fast server (HTTP)",
        baseline: None,
        real: false,
        daemon_server: None,
    },
    Config {
        kind: Kind::HttpGuardUrl,
        name: "http-guard-url",
        path: "client -> mcp-guard HTTP -> fast server (HTTP url)",
        baseline: Some("http-direct"),
        real: false,
        daemon_server: Some("fast-http"),
    },
    Config {
        kind: Kind::HttpGuardStdio,
        name: "http-guard-stdio",
        path: "client -> mcp-guard HTTP -> fast server (stdio child)",
        baseline: Some("http-direct"),
        real: false,
        daemon_server: Some("fast-stdio"),
    },
    Config {
        kind: Kind::StdioDirect,
        name: "stdio-direct",
        path: "client -> fast server (stdio)",
        baseline: None,
        real: false,
        daemon_server: None,
    },
    Config {
        kind: Kind::StdioGuard,
        name: "stdio-guard",
        path: "client -> mcp-guard stdio -> fast server (stdio child)",
        baseline: Some("stdio-direct"),
        real: false,
        daemon_server: None,
    },
    Config {
        kind: Kind::EverythingDirect,
        name: "everything-direct",
        path: "client -> server-everything (stdio)",
        baseline: None,
        real: true,
        daemon_server: None,
    },
    Config {
        kind: Kind::EverythingStdioGuard,
        name: "everything-stdio-guard",
        path: "client -> mcp-guard stdio -> server-everything (stdio child)",
        baseline: Some("everything-direct"),
        real: true,
        daemon_server: None,
    },
    Config {
        kind: Kind::EverythingHttpGuard,
        name: "everything-http-guard",
        path: "client -> mcp-guard HTTP -> server-everything (stdio child)",
        baseline: Some("everything-direct"),
        real: true,
        daemon_server: Some("everything"),
    },
];

fn selected_configs(options: &Options) -> Result<Vec<&'static Config>, String> {
    if let Some(only) = &options.only
        && let Some(unknown) = only
            .iter()
            .find(|name| !CONFIGS.iter().any(|c| c.name == name.as_str()))
    {
        let known: Vec<_> = CONFIGS.iter().map(|c| c.name).collect();
        return Err(format!(
            "--only: no configuration {unknown:?} (known: {})",
            known.join(", ")
        ));
    }
    Ok(CONFIGS
        .iter()
        .filter(|c| options.real || !c.real)
        .filter(|c| {
            options
                .only
                .as_ref()
                .is_none_or(|only| only.iter().any(|name| name == c.name))
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// The host: fast HTTP server, daemon, policy; torn down on drop
// ---------------------------------------------------------------------------------------------

struct Host {
    dir: tempfile::TempDir,
    guard: PathBuf,
    policy: PathBuf,
    control_socket: PathBuf,
    bpffs: PathBuf,
    cgroup_root: PathBuf,
    fast_server: PathBuf,
    fast_port: u16,
    guard_port: u16,
    metrics_addr: SocketAddr,
    everything: Option<Vec<String>>,
    daemon_log: Option<String>,
    audit_fsync: bool,
    durable_before: Option<String>,
    worker_threads: Option<usize>,
    answer_poll_us: Option<u32>,
    jwt: Option<jsonwebtoken::Algorithm>,
    /// The `Authorization` value the bench's HTTP sessions to the daemon send, with `--jwt`.
    authorization: Option<String>,
    http_server: Option<std::process::Child>,
    daemon: Option<std::process::Child>,
}

impl Host {
    fn daemon_url(&self, server: &str) -> String {
        format!("http://127.0.0.1:{}/servers/{server}/mcp", self.guard_port)
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn guard_command(&self) -> std::process::Command {
        let mut command = std::process::Command::new(&self.guard);
        if let Some(level) = &self.daemon_log {
            command.env("RUST_LOG", level);
        }
        command
    }

    /// Stops the daemon and removes its kernel state; idempotent.
    fn teardown(&mut self) -> Result<(), String> {
        if let Some(mut daemon) = self.daemon.take() {
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while daemon.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        if let Some(mut server) = self.http_server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        if !self.bpffs.exists() && !self.cgroup_root.exists() {
            return Ok(());
        }
        let output = self
            .guard_command()
            .args(["egress", "teardown", "--bpffs"])
            .arg(&self.bpffs)
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .output()
            .map_err(|e| format!("running mcp-guard egress teardown: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mcp-guard egress teardown failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Err(error) = self.teardown() {
            eprintln!("proxy-bench: {error}");
        }
    }
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding a port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

fn cgroup2_mount() -> Result<PathBuf, String> {
    mcp_guard::egress::cgroup::cgroup2_mount().map_err(|e| e.to_string())
}

fn require_file(path: &Path, what: &str, hint: &str) -> Result<(), String> {
    if path.is_file() {
        Ok(())
    } else {
        Err(format!("{what} not found at {} ({hint})", path.display()))
    }
}

/// How to start server-everything on stdio: node and the package's entry point.
fn everything_command(peers: &Path) -> Result<Vec<String>, String> {
    let entry = peers
        .join("node_modules")
        .join("@modelcontextprotocol")
        .join("server-everything")
        .join("dist")
        .join("index.js");
    require_file(
        &entry,
        "server-everything",
        "run `cargo xtask setup`, or pass --no-real",
    )?;
    let node = std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("node"))
                .find(|node| node.is_file())
        })
        .ok_or("node is not on PATH (server-everything needs Node.js); or pass --no-real")?;
    Ok(vec![
        node.to_string_lossy().into_owned(),
        entry.to_string_lossy().into_owned(),
        "stdio".into(),
    ])
}

/// The policy: every server allows tools/list and tools/call of `echo` to the bench principal.
fn policy(host: &Host) -> Value {
    let rules = json!([
        {"id": "list", "description": "The bench may list tools.", "effect": "allow",
         "principals": [PRINCIPAL], "methods": ["tools/list"]},
        {"id": "echo", "description": "The bench may call echo.", "effect": "allow",
         "principals": [PRINCIPAL], "tools": ["echo"]},
    ]);
    let fast_command = vec![host.fast_server.to_string_lossy().into_owned()];
    let mut servers = json!({
        "fast-http": {
            "description": "mcp-fast-server over Streamable HTTP (the same process http-direct uses).",
            "url": format!("http://127.0.0.1:{}/mcp", host.fast_port),
            "principal": PRINCIPAL,
            "rules": rules,
        },
        "fast-stdio": {
            "description": "mcp-fast-server on stdio, one process per session.",
            "command": fast_command,
            "principal": PRINCIPAL,
            "rules": rules,
        },
        "fast-shared": {
            "description": "mcp-fast-server on stdio, one process for every session.",
            "command": fast_command,
            "isolation": "shared",
            "principal": PRINCIPAL,
            "rules": rules,
        },
    });
    if let Some(everything) = &host.everything {
        servers["everything"] = json!({
            "description": "server-everything on stdio, one process per session.",
            "command": everything,
            "principal": PRINCIPAL,
            "rules": rules,
        });
    }
    // On the disk, not tmpfs, so that a durable log costs what it costs in production.
    let mut audit = json!({
        "path": host.dir.path().join("audit.jsonl"),
        "fsync": host.audit_fsync,
    });
    if let Some(when) = &host.durable_before {
        audit["durable_before"] = json!(when);
    }
    let mut daemon = json!({
        "listen": format!("127.0.0.1:{}", host.guard_port),
        "metrics_listen": host.metrics_addr,
        "principal": PRINCIPAL,
        "control_socket": host.control_socket,
        "bpffs": host.bpffs,
        "cgroup_root": host.cgroup_root,
    });
    if let Some(workers) = host.worker_threads {
        daemon["worker_threads"] = json!(workers);
    }
    if let Some(micros) = host.answer_poll_us {
        daemon["answer_poll_us"] = json!(micros);
    }
    let mut policy = json!({
        "version": 1,
        "daemon": daemon,
        "principals": {PRINCIPAL: {"roles": ["bench"]}},
        "servers": servers,
        "audit": audit,
    });
    if let Some(alg) = host.jwt {
        // The HTTP front's caller comes from the token; the daemon's principal would only draw
        // a warning.
        policy["daemon"]
            .as_object_mut()
            .unwrap()
            .remove("principal");
        policy["identity"] = jwt_identity(alg);
    }
    policy
}

const JWT_ISSUER: &str = "https://idp.bench";
const JWT_AUDIENCE: &str = "mcp-guard-bench";
const JWT_SECRET: &str = "the bench's shared secret, thirty-two bytes or more";

/// `identity.jwt` trusting the test key of `alg` (the JWKS of the identity tests for RS256
/// and ES256).
fn jwt_identity(alg: jsonwebtoken::Algorithm) -> Value {
    let keys = match alg {
        jsonwebtoken::Algorithm::HS256 => json!({"hs256_secret": JWT_SECRET}),
        _ => json!({"jwks_file": mcp_guard_tests::identity_testdata("jwks.json")}),
    };
    json!({"jwt": {"issuers": [{
        "issuer": JWT_ISSUER,
        "audiences": [JWT_AUDIENCE],
        "keys": keys,
        "algorithms": [format!("{alg:?}")],
    }]}})
}

/// `Bearer <token>` for the bench principal, valid for a day.
fn bench_token(alg: jsonwebtoken::Algorithm) -> Result<String, String> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({
        "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": PRINCIPAL,
        "iat": now, "exp": now + 86_400,
    });
    Ok(format!(
        "Bearer {}",
        mcp_guard_tests::sign_test_token(alg, &claims, JWT_SECRET)?
    ))
}

fn start_host(options: &Options) -> Result<Host, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("run as root: the daemon loads eBPF programs and creates cgroups".into());
    }
    require_file(
        &options.guard,
        "mcp-guard",
        "build it with `cargo build --release -p mcp-guard`, or pass --guard",
    )?;
    require_file(
        &options.fast_server,
        "mcp-fast-server",
        "build it with `cargo build --release -p mcp-guard-tests --bins`, or pass --fast-server",
    )?;
    let everything = options
        .real
        .then(|| everything_command(&options.peers))
        .transpose()?;
    let tag = format!("mcpg-bench-{}", std::process::id());
    let dir = tempfile::Builder::new()
        .prefix("mcp-guard-proxy-bench.")
        .tempdir()
        .map_err(|e| format!("creating a temporary directory: {e}"))?;
    let mut host = Host {
        guard: options.guard.clone(),
        policy: dir.path().join("policy.json"),
        control_socket: dir.path().join("control.sock"),
        bpffs: Path::new("/sys/fs/bpf").join(&tag),
        cgroup_root: cgroup2_mount()?.join(&tag),
        fast_server: options.fast_server.clone(),
        fast_port: 0,
        guard_port: free_port()?,
        metrics_addr: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        everything,
        daemon_log: options.daemon_log.clone(),
        audit_fsync: options.audit_fsync,
        durable_before: options.durable_before.clone(),
        worker_threads: options.worker_threads,
        answer_poll_us: options.answer_poll_us,
        jwt: options.jwt,
        authorization: options.jwt.map(bench_token).transpose()?,
        http_server: None,
        daemon: None,
        dir,
    };

    // The fast server over HTTP, for http-direct and the daemon's `url` upstream. Its stdin is
    // closed at once; it keeps serving HTTP until killed.
    let mut server = std::process::Command::new(&host.fast_server)
        .args(["--http", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", host.fast_server.display()))?;
    let stderr = server.stderr.take().expect("stderr is piped");
    host.http_server = Some(server);
    host.fast_port = read_listening_port(stderr)?;

    std::fs::write(
        &host.policy,
        serde_json::to_vec_pretty(&policy(&host)).expect("policy serialises"),
    )
    .map_err(|e| format!("writing the policy: {e}"))?;
    let log = std::fs::File::create(host.log_path("daemon"))
        .map_err(|e| format!("creating the daemon log: {e}"))?;
    let daemon = host
        .guard_command()
        .arg("run")
        .arg("--policy")
        .arg(&host.policy)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", host.guard_port))
        .arg("--metrics-listen")
        .arg(host.metrics_addr.to_string())
        .arg("--bpffs")
        .arg(&host.bpffs)
        .arg("--cgroup-root")
        .arg(&host.cgroup_root)
        .arg("--control-socket")
        .arg(&host.control_socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", host.guard.display()))?;
    host.daemon = Some(daemon);
    wait_for_daemon(&mut host)?;
    Ok(host)
}

/// The port mcp-fast-server announces on stderr (`MCP_PEER_LISTENING <port>`); the rest of its
/// stderr is drained in the background.
fn read_listening_port(stderr: std::process::ChildStderr) -> Result<u16, String> {
    use std::io::BufRead;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sender = Some(sender);
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(port) = line.strip_prefix("MCP_PEER_LISTENING ")
                && let Some(sender) = sender.take()
            {
                let _ = sender.send(port.trim().parse::<u16>().ok());
            }
        }
    });
    match receiver.recv_timeout(TIMEOUT) {
        Ok(Some(port)) => Ok(port),
        _ => Err("mcp-fast-server --http did not announce its port".into()),
    }
}

fn wait_for_daemon(host: &mut Host) -> Result<(), String> {
    let deadline = Instant::now() + TIMEOUT;
    let address = SocketAddr::from(([127, 0, 0, 1], host.guard_port));
    loop {
        let daemon = host.daemon.as_mut().expect("daemon started");
        if let Ok(Some(status)) = daemon.try_wait() {
            return Err(format!(
                "mcp-guard run exited ({status}) before it was ready:\n{}",
                tail(&host.log_path("daemon"), 20)
            ));
        }
        if host.control_socket.exists()
            && TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "mcp-guard run was not ready within {TIMEOUT:?}:\n{}",
                tail(&host.log_path("daemon"), 20)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// The client: one MCP session over HTTP or stdio
// ---------------------------------------------------------------------------------------------

struct Session {
    transport: Transport,
    next_id: AtomicU64,
    /// `params` of the measured tools/call, serialised once.
    call_params: String,
    /// The text a successful echo answers with.
    expected_text: String,
}

enum Transport {
    Http(HttpSession),
    Stdio(StdioSession),
}

struct HttpSession {
    client: reqwest::Client,
    url: String,
    session_id: Option<String>,
}

struct StdioSession {
    to_stdin: mpsc::UnboundedSender<String>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    child: Child,
}

impl Session {
    async fn request(&self, method: &str, params: &str) -> Result<Value, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body =
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{params}}}"#);
        let answer = match &self.transport {
            Transport::Http(http) => http.post(body).await?.ok_or("no answer (HTTP 202)")?,
            Transport::Stdio(stdio) => stdio.request(id, body).await?,
        };
        if answer.get("id").and_then(Value::as_u64) != Some(id) {
            return Err(format!("answer to request {id} has another id: {answer}"));
        }
        match answer.get("result") {
            Some(_) => Ok(answer),
            None => Err(format!("{method} failed: {answer}")),
        }
    }

    async fn notify(&self, method: &str) -> Result<(), String> {
        let body = format!(r#"{{"jsonrpc":"2.0","method":"{method}"}}"#);
        match &self.transport {
            Transport::Http(http) => http.post(body).await.map(|_| ()),
            Transport::Stdio(stdio) => stdio.send(body),
        }
    }

    /// The measured operation: one `tools/call` of echo, checked to have succeeded.
    async fn call(&self) -> Result<(), String> {
        let answer = self.request("tools/call", &self.call_params).await?;
        if answer["result"].get("isError") == Some(&Value::Bool(true)) {
            return Err(format!("echo reported an error: {answer}"));
        }
        Ok(())
    }

    /// One call whose answer is checked in full, to prove the path works end to end.
    async fn checked_call(&self) -> Result<(), String> {
        let answer = self.request("tools/call", &self.call_params).await?;
        let text = &answer["result"]["content"][0]["text"];
        if text.as_str() != Some(self.expected_text.as_str()) {
            return Err(format!(
                "echo answered {answer}, expected the text {:?}",
                self.expected_text
            ));
        }
        Ok(())
    }

    async fn close(self) {
        match self.transport {
            Transport::Http(http) => {
                if let Some(id) = &http.session_id {
                    let _ = delete_session(&http.client, &http.url, id).await;
                }
            }
            Transport::Stdio(StdioSession {
                to_stdin,
                mut child,
                ..
            }) => {
                // Closing stdin is how an MCP client ends a stdio session.
                drop(to_stdin);
                if tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }
        }
    }
}

/// A keep-alive HTTP client; `authorization` goes with every request when given.
fn http_client(authorization: Option<&str>) -> Result<reqwest::Client, String> {
    // reqwest is built without a TLS provider (see tests/Cargo.toml); Err when one is already
    // installed, which serves as well.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(value) = authorization {
        let value = reqwest::header::HeaderValue::from_str(value)
            .map_err(|e| format!("the Authorization header: {e}"))?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .timeout(TIMEOUT)
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))
}

impl HttpSession {
    /// POSTs one message; the JSON answer (an SSE answer's first event), `None` for 202.
    async fn post(&self, body: String) -> Result<Option<Value>, String> {
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", PROTOCOL_VERSION)
            .body(body);
        if let Some(id) = &self.session_id {
            request = request.header("mcp-session-id", id);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("POST {}: {e}", self.url))?;
        let status = response.status();
        if status == reqwest::StatusCode::ACCEPTED {
            return Ok(None);
        }
        let is_sse = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/event-stream"));
        let bytes = response
            .bytes()
            .await
            .map_err(|e| format!("reading the answer from {}: {e}", self.url))?;
        if !status.is_success() {
            return Err(format!(
                "POST {}: HTTP {status}: {}",
                self.url,
                String::from_utf8_lossy(&bytes)
            ));
        }
        let json = if is_sse {
            let text = String::from_utf8_lossy(&bytes);
            let data = text
                .lines()
                .find_map(|line| line.strip_prefix("data:"))
                .ok_or("an SSE answer without data")?;
            serde_json::from_str(data.trim())
        } else {
            serde_json::from_slice(&bytes)
        };
        json.map(Some)
            .map_err(|e| format!("the answer from {} is not JSON: {e}", self.url))
    }
}

impl StdioSession {
    fn spawn(command: &[String], env: &[(&str, &str)], stderr: &Path) -> Result<Self, String> {
        let stderr =
            std::fs::File::create(stderr).map_err(|e| format!("creating {stderr:?}: {e}"))?;
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", command.join(" ")))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (to_stdin, lines) = mpsc::unbounded_channel();
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>> = Arc::default();
        tokio::spawn(write_lines(stdin, lines));
        tokio::spawn(read_answers(stdout, pending.clone(), to_stdin.downgrade()));
        Ok(StdioSession {
            to_stdin,
            pending,
            child,
        })
    }

    fn send(&self, line: String) -> Result<(), String> {
        self.to_stdin
            .send(line)
            .map_err(|_| "the server's stdin is closed".to_owned())
    }

    async fn request(&self, id: u64, line: String) -> Result<Value, String> {
        let (sender, receiver) = oneshot::channel();
        self.pending.lock().expect("pending").insert(id, sender);
        self.send(line)?;
        receiver
            .await
            .map_err(|_| "the server closed stdout before answering".to_owned())
    }
}

/// Writes queued lines to the server's stdin, as many per write as are waiting.
async fn write_lines(
    mut stdin: tokio::process::ChildStdin,
    mut lines: mpsc::UnboundedReceiver<String>,
) {
    let mut buffer = String::new();
    while let Some(line) = lines.recv().await {
        buffer.clear();
        buffer.push_str(&line);
        buffer.push('\n');
        while let Ok(line) = lines.try_recv() {
            buffer.push_str(&line);
            buffer.push('\n');
        }
        if stdin.write_all(buffer.as_bytes()).await.is_err() {
            break;
        }
    }
}

/// Routes each answer to its waiting request by id. Requests from the server (none are
/// expected: the client declares no capabilities) are refused so it never waits;
/// notifications are ignored.
async fn read_answers(
    stdout: tokio::process::ChildStdout,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    // Weak, so that dropping the session's sender closes the server's stdin.
    to_stdin: mpsc::WeakUnboundedSender<String>,
) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let id = message.get("id");
        if message.get("method").is_some() {
            if let Some(id) = id {
                let refusal = json!({"jsonrpc": "2.0", "id": id,
                    "error": {"code": -32601, "message": "the bench client offers nothing"}});
                if let Some(to_stdin) = to_stdin.upgrade() {
                    let _ = to_stdin.send(refusal.to_string());
                }
            }
            continue;
        }
        let waiter = id
            .and_then(Value::as_u64)
            .and_then(|id| pending.lock().expect("pending").remove(&id));
        if let Some(waiter) = waiter {
            let _ = waiter.send(message);
        }
    }
    // Dropping the waiters fails every request still waiting.
    pending.lock().expect("pending").clear();
}

/// Opens the configuration's session and initialises it as an MCP client does.
async fn open(config: &Config, host: &Host) -> Result<Session, String> {
    let stdio_guard = |server: &str| {
        vec![
            host.guard.to_string_lossy().into_owned(),
            "stdio".into(),
            "--server".into(),
            server.into(),
            "--policy".into(),
            host.policy.to_string_lossy().into_owned(),
            "--control-socket".into(),
            host.control_socket.to_string_lossy().into_owned(),
        ]
    };
    let fast = vec![host.fast_server.to_string_lossy().into_owned()];
    let everything = || host.everything.clone().unwrap_or_default();
    let log_env: Vec<(&str, &str)> = host
        .daemon_log
        .as_deref()
        .map(|level| vec![("RUST_LOG", level)])
        .unwrap_or_default();
    let stderr = host.log_path(config.name);
    let transport = match config.kind {
        Kind::HttpDirect => {
            http_transport(format!("http://127.0.0.1:{}/mcp", host.fast_port), None)?
        }
        Kind::HttpGuardUrl | Kind::HttpGuardStdio | Kind::EverythingHttpGuard => http_transport(
            host.daemon_url(config.daemon_server.expect("a daemon server")),
            host.authorization.as_deref(),
        )?,
        Kind::StdioDirect => Transport::Stdio(StdioSession::spawn(&fast, &[], &stderr)?),
        Kind::StdioGuard => Transport::Stdio(StdioSession::spawn(
            &stdio_guard("fast-stdio"),
            &log_env,
            &stderr,
        )?),
        Kind::EverythingDirect => {
            Transport::Stdio(StdioSession::spawn(&everything(), &[], &stderr)?)
        }
        Kind::EverythingStdioGuard => Transport::Stdio(StdioSession::spawn(
            &stdio_guard("everything"),
            &log_env,
            &stderr,
        )?),
    };
    let (argument, expected_text) = if config.real {
        ("message", format!("Echo: {ECHO_TEXT}"))
    } else {
        ("text", ECHO_TEXT.to_owned())
    };
    let mut session = Session {
        transport,
        next_id: AtomicU64::new(1),
        call_params: json!({"name": "echo", "arguments": {argument: ECHO_TEXT}}).to_string(),
        expected_text,
    };
    initialize(&mut session)
        .await
        .map_err(|e| format!("{}: {e}", config.name))?;
    Ok(session)
}

fn http_transport(url: String, authorization: Option<&str>) -> Result<Transport, String> {
    Ok(Transport::Http(HttpSession {
        client: http_client(authorization)?,
        url,
        session_id: None,
    }))
}

/// The bench's `initialize` request, with id 0.
fn initialize_request() -> String {
    json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "proxy-bench", "version": env!("CARGO_PKG_VERSION")},
    }})
    .to_string()
}

/// POSTs `initialize` to `url`: the session id the server gave in its header, and the
/// answer's text. Sent by hand, as the session id comes back in a header.
async fn post_initialize(client: &reqwest::Client, url: &str) -> Result<(String, String), String> {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(initialize_request())
        .send()
        .await
        .map_err(|e| format!("initialize at {url}: {e}"))?;
    let session_id = response
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| format!("initialize at {url}: {e}"))?;
    match session_id {
        Some(id) if status.is_success() => Ok((id, text)),
        _ => Err(format!(
            "initialize at {url}: HTTP {status} without a session: {text}"
        )),
    }
}

/// Ends the HTTP session `id` with `DELETE`.
async fn delete_session(client: &reqwest::Client, url: &str, id: &str) -> Result<(), String> {
    client
        .delete(url)
        .header("mcp-session-id", id)
        .header("mcp-protocol-version", PROTOCOL_VERSION)
        .send()
        .await
        .map(drop)
        .map_err(|e| format!("DELETE at {url}: {e}"))
}

async fn initialize(session: &mut Session) -> Result<(), String> {
    let answer = match &mut session.transport {
        Transport::Http(http) => {
            let (id, text) = post_initialize(&http.client, &http.url).await?;
            http.session_id = Some(id);
            text
        }
        Transport::Stdio(stdio) => {
            tokio::time::timeout(TIMEOUT, stdio.request(0, initialize_request()))
                .await
                .map_err(|_| "initialize: no answer".to_owned())??
                .to_string()
        }
    };
    if !answer.contains("\"result\"") {
        return Err(format!("initialize failed: {answer}"));
    }
    session.notify("notifications/initialized").await?;
    let tools = session.request("tools/list", "{}").await?;
    let listed = tools["result"]["tools"]
        .as_array()
        .is_some_and(|tools| tools.iter().any(|tool| tool["name"] == "echo"));
    if !listed {
        return Err(format!("tools/list does not offer echo: {tools}"));
    }
    session.checked_call().await
}

// ---------------------------------------------------------------------------------------------
// Measurement
// ---------------------------------------------------------------------------------------------

/// The daemon's own time per stage, read from its metrics.
#[derive(Clone, Copy, Default)]
struct StageTimes {
    total: (f64, f64),
    policy: (f64, f64),
    upstream: (f64, f64),
}

impl StageTimes {
    fn minus(self, earlier: StageTimes) -> StageTimes {
        let d = |a: (f64, f64), b: (f64, f64)| (a.0 - b.0, a.1 - b.1);
        StageTimes {
            total: d(self.total, earlier.total),
            policy: d(self.policy, earlier.policy),
            upstream: d(self.upstream, earlier.upstream),
        }
    }

    fn plus(self, other: StageTimes) -> StageTimes {
        let s = |a: (f64, f64), b: (f64, f64)| (a.0 + b.0, a.1 + b.1);
        StageTimes {
            total: s(self.total, other.total),
            policy: s(self.policy, other.policy),
            upstream: s(self.upstream, other.upstream),
        }
    }

    /// Mean seconds → µs of a (sum, count) pair.
    fn mean_us((sum, count): (f64, f64)) -> Option<f64> {
        (count > 0.0).then(|| sum / count * 1e6)
    }
}

/// Reads `mcp_guard_request_duration_seconds` sums and counts of one server.
async fn stage_times(
    client: &reqwest::Client,
    metrics: SocketAddr,
    server: &str,
) -> Result<StageTimes, String> {
    let text = client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .map_err(|e| format!("reading the daemon's metrics: {e}"))?
        .text()
        .await
        .map_err(|e| format!("reading the daemon's metrics: {e}"))?;
    let mut times = StageTimes::default();
    let server_label = format!("server=\"{server}\"");
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("mcp_guard_request_duration_seconds_") else {
            continue;
        };
        let (is_sum, rest) = if let Some(rest) = rest.strip_prefix("sum{") {
            (true, rest)
        } else if let Some(rest) = rest.strip_prefix("count{") {
            (false, rest)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        if !labels.split(',').any(|label| label == server_label) {
            continue;
        }
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let stage = labels
            .split(',')
            .find_map(|label| label.strip_prefix("stage=\""))
            .map(|s| s.trim_end_matches('"'));
        let slot = match stage {
            Some("total") => &mut times.total,
            Some("policy") => &mut times.policy,
            Some("upstream") => &mut times.upstream,
            _ => continue,
        };
        if is_sum {
            slot.0 = value;
        } else {
            slot.1 = value;
        }
    }
    Ok(times)
}

/// One (configuration, concurrency) cell and everything measured in it.
struct Cell {
    config: usize,
    concurrency: usize,
    latencies_ns: Vec<u64>,
    wall: Duration,
    round_p50_ns: Vec<u64>,
    daemon: StageTimes,
}

/// Runs `calls` calls with `concurrency` in flight; per-call latencies and the wall time.
async fn block(
    session: &Arc<Session>,
    concurrency: usize,
    calls: usize,
) -> Result<(Vec<u64>, Duration), String> {
    let started = Instant::now();
    if concurrency == 1 {
        let mut latencies = Vec::with_capacity(calls);
        for _ in 0..calls {
            let sent = Instant::now();
            session.call().await?;
            latencies.push(sent.elapsed().as_nanos() as u64);
        }
        return Ok((latencies, started.elapsed()));
    }
    let remaining = Arc::new(AtomicUsize::new(calls));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let session = session.clone();
        let remaining = remaining.clone();
        workers.spawn(async move {
            let mut latencies = Vec::with_capacity(calls / concurrency + 1);
            while remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                let sent = Instant::now();
                session.call().await?;
                latencies.push(sent.elapsed().as_nanos() as u64);
            }
            Ok::<_, String>(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(calls);
    while let Some(done) = workers.join_next().await {
        latencies.extend(done.map_err(|e| format!("a worker failed: {e}"))??);
    }
    Ok((latencies, started.elapsed()))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn run(options: Options) -> Result<(), String> {
    let configs = selected_configs(&options)?;
    if configs.is_empty() {
        return Err("no configuration selected".into());
    }
    // Put back when the run ends, however it ends.
    let _halt_poll = options.halt_poll_ns.map(halt_poll::set).transpose()?;
    let mut host = start_host(&options)?;
    eprintln!(
        "proxy-bench: daemon on 127.0.0.1:{} (egress on, cgroups under {}), fast server on 127.0.0.1:{}; logs in {}",
        host.guard_port,
        host.cgroup_root.display(),
        host.fast_port,
        host.dir.path().display()
    );
    let outcome = measure(&options, &configs, &host).await;
    if outcome.is_err() {
        // Keep the logs for whoever investigates.
        let kept = host.dir.path().to_path_buf();
        eprintln!(
            "proxy-bench: daemon log tail:\n{}",
            tail(&host.log_path("daemon"), 20)
        );
        let dir = std::mem::replace(
            &mut host.dir,
            tempfile::tempdir().map_err(|e| e.to_string())?,
        );
        let _ = dir.keep();
        eprintln!("proxy-bench: logs kept in {}", kept.display());
    }
    let (cells, probes) = outcome?;
    let openings = if options.session_opens > 0 {
        measure_session_opening(&options, &host).await?
    } else {
        Vec::new()
    };
    let started = Instant::now();
    host.teardown()?;
    eprintln!(
        "proxy-bench: daemon stopped, egress torn down ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    report(&options, &configs, &cells, &probes);
    report_session_opening(&openings);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Session opening: `initialize` answered, then `DELETE`
// ---------------------------------------------------------------------------------------------

/// Where sessions are opened, the first being the direct baseline.
const OPENING_TARGETS: [(&str, &str); 3] = [
    ("open-direct", "client -> fast server (HTTP)"),
    (
        "open-guard-per-session",
        "client -> mcp-guard HTTP -> a fast server started per session",
    ),
    (
        "open-guard-shared",
        "client -> mcp-guard HTTP -> one shared fast server",
    ),
];

/// One (target, concurrency) cell: the `initialize` latencies and the wall time of the cell.
struct Opening {
    target: &'static str,
    concurrency: usize,
    samples: Vec<u64>,
    wall: Duration,
}

/// Opens `--session-opens` sessions per target and concurrency: each `initialize` is timed to
/// its answer, and the session is then ended with `DELETE`, so that only opening is measured
/// and no session is left open. Targets rotate per concurrency, so drift hits all alike.
async fn measure_session_opening(options: &Options, host: &Host) -> Result<Vec<Opening>, String> {
    let direct = http_client(None)?;
    let guarded = http_client(host.authorization.as_deref())?;
    let urls = [
        format!("http://127.0.0.1:{}/mcp", host.fast_port),
        host.daemon_url("fast-stdio"),
        host.daemon_url("fast-shared"),
    ];
    let mut openings = Vec::new();
    for (turn, &concurrency) in options.concurrency.iter().enumerate() {
        for step in 0..OPENING_TARGETS.len() {
            let index = (turn + step) % OPENING_TARGETS.len();
            let client = if index == 0 { &direct } else { &guarded };
            let started = Instant::now();
            let mut samples =
                open_sessions(client, &urls[index], concurrency, options.session_opens).await?;
            samples.sort_unstable();
            openings.push(Opening {
                target: OPENING_TARGETS[index].0,
                concurrency,
                samples,
                wall: started.elapsed(),
            });
            eprintln!(
                "proxy-bench: {} at concurrency {concurrency}: {} sessions opened",
                OPENING_TARGETS[index].0, options.session_opens
            );
        }
    }
    Ok(openings)
}

/// `total` sessions opened and ended by `concurrency` tasks; the `initialize` latencies.
async fn open_sessions(
    client: &reqwest::Client,
    url: &str,
    concurrency: usize,
    total: usize,
) -> Result<Vec<u64>, String> {
    let left = Arc::new(AtomicUsize::new(total));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, left) = (client.clone(), url.to_owned(), left.clone());
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    samples.push(open_and_end_session(&client, &url).await?);
                }
                Ok::<_, String>(samples)
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(total);
    for task in tasks {
        samples.extend(task.await.map_err(|e| format!("an opening task: {e}"))??);
    }
    Ok(samples)
}

/// Opens a session with `initialize` and ends it with `DELETE`; nanoseconds to the answer.
async fn open_and_end_session(client: &reqwest::Client, url: &str) -> Result<u64, String> {
    let started = Instant::now();
    let (session, answer) = post_initialize(client, url).await?;
    let elapsed = started.elapsed().as_nanos() as u64;
    if !answer.contains("\"result\"") {
        return Err(format!("initialize at {url} failed: {answer}"));
    }
    delete_session(client, url, &session).await?;
    Ok(elapsed)
}

fn report_session_opening(openings: &[Opening]) {
    if openings.is_empty() {
        return;
    }
    println!();
    println!("session opening: latency to the initialize answer; sessions/s includes each DELETE");
    println!(
        "{:<24}{:>6}{:>10}{:>10}{:>12}{:>9}{:>9}",
        "target", "conc", "p50 us", "p99 us", "sessions/s", "x p50", "x p99"
    );
    for opening in openings {
        let p50 = percentile(&opening.samples, 0.50);
        let p99 = percentile(&opening.samples, 0.99);
        let per_second = opening.samples.len() as f64 / opening.wall.as_secs_f64();
        let direct = openings
            .iter()
            .find(|o| o.target == OPENING_TARGETS[0].0 && o.concurrency == opening.concurrency);
        let ratio = |of: u64, base: f64| format!("{:.2}", of as f64 / base.max(1.0));
        let (x50, x99) = match direct {
            Some(d) if d.target != opening.target => (
                ratio(p50, percentile(&d.samples, 0.50) as f64),
                ratio(p99, percentile(&d.samples, 0.99) as f64),
            ),
            _ => (String::new(), String::new()),
        };
        println!(
            "{:<24}{:>6}{:>10.1}{:>10.1}{:>12.0}{:>9}{:>9}",
            opening.target,
            opening.concurrency,
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            per_second,
            x50,
            x99
        );
    }
    for (name, path) in OPENING_TARGETS {
        println!("  {name:<24}{path}");
    }
}

/// Appends of one audit-record-sized line, each followed by `fdatasync`, per round: what the
/// disk itself costs a durable record, measured in the audit log's own directory.
const DISK_SAMPLES_PER_ROUND: usize = 50;
const DISK_RECORD_BYTES: usize = 600;

/// Times `samples` append + `fdatasync` of a record-sized line to `file`.
fn disk_samples(
    file: &mut std::fs::File,
    samples: usize,
    out: &mut Vec<u64>,
) -> Result<(), String> {
    use std::io::Write as _;
    let mut line = vec![b'x'; DISK_RECORD_BYTES - 1];
    line.push(b'\n');
    for _ in 0..samples {
        let started = Instant::now();
        file.write_all(&line)
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("disk probe: {e}"))?;
        out.push(started.elapsed().as_nanos() as u64);
    }
    Ok(())
}

/// What the machine itself costs, measured between the rounds beside the calls.
#[derive(Default)]
struct MachineProbes {
    /// Append + `fdatasync` of one record-sized line: one durable record.
    disk_ns: Vec<u64>,
    /// One wake-up of a thread asleep on the other CPU: what each extra hop (agent → guard,
    /// guard → server and back) pays before any work is done.
    wake_ns: Vec<u64>,
}

const WAKE_SAMPLES_PER_ROUND: usize = 50;
/// About as long as a guarded call leaves a hop's CPU idle (the server's or the agent's turn),
/// so the sleeping thread's CPU goes idle as it does inside a call.
const WAKE_GAP: Duration = Duration::from_micros(100);

/// Times `samples` one-way wake-ups: a thread pinned to the first CPU writes its clock reading
/// to a socket that a thread pinned to the second CPU sleeps on; the sleeper's clock on waking,
/// less the reading, is one sample. With one CPU both run there unpinned.
fn wake_samples(samples: usize, out: &mut Vec<u64>) -> Result<(), String> {
    use std::io::{Read as _, Write as _};
    let (mut waker, mut sleeper) =
        std::os::unix::net::UnixStream::pair().map_err(|e| format!("wake probe: {e}"))?;
    let two_cpus = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    let base = Instant::now();
    std::thread::scope(|scope| {
        let sleeping = scope.spawn(move || -> Result<Vec<u64>, String> {
            if two_cpus {
                pin_to_cpu(1)?;
            }
            let mut woken = Vec::with_capacity(samples);
            let mut reading = [0u8; 8];
            for _ in 0..samples {
                sleeper
                    .read_exact(&mut reading)
                    .map_err(|e| format!("wake probe: {e}"))?;
                let now = base.elapsed().as_nanos() as u64;
                woken.push(now.saturating_sub(u64::from_le_bytes(reading)));
            }
            Ok(woken)
        });
        let waking = scope.spawn(move || -> Result<(), String> {
            if two_cpus {
                pin_to_cpu(0)?;
            }
            for _ in 0..samples {
                std::thread::sleep(WAKE_GAP);
                let now = base.elapsed().as_nanos() as u64;
                waker
                    .write_all(&now.to_le_bytes())
                    .map_err(|e| format!("wake probe: {e}"))?;
            }
            Ok(())
        });
        waking
            .join()
            .map_err(|_| "wake probe: the waker panicked")??;
        out.extend(
            sleeping
                .join()
                .map_err(|_| "wake probe: the sleeper panicked")??,
        );
        Ok(())
    })
}

fn pin_to_cpu(cpu: usize) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity only read and
    // write the set passed by reference, for the calling thread (pid 0).
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result != 0 {
        return Err(format!(
            "wake probe: pinning to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The guest's halt polling (Linux `haltpoll` cpuidle driver, on KVM guests): how long an idle
/// CPU polls for work before it halts. At 0 every idle CPU halts, and waking it goes through
/// the hypervisor, which dominates a hop on such a machine.
mod halt_poll {
    const PARAMETER: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

    /// The setting, where the machine has one.
    pub fn current() -> Option<u64> {
        std::fs::read_to_string(PARAMETER).ok()?.trim().parse().ok()
    }

    /// Sets it for the bench's run; dropping this puts the old value back.
    pub struct Override {
        previous: u64,
    }

    pub fn set(ns: u64) -> Result<Override, String> {
        let previous = current().ok_or_else(|| {
            format!("--halt-poll-ns: {PARAMETER} is missing (not a guest with the haltpoll driver)")
        })?;
        std::fs::write(PARAMETER, ns.to_string())
            .map_err(|e| format!("--halt-poll-ns: writing {PARAMETER}: {e}"))?;
        Ok(Override { previous })
    }

    impl Drop for Override {
        fn drop(&mut self) {
            if let Err(e) = std::fs::write(PARAMETER, self.previous.to_string()) {
                eprintln!(
                    "proxy-bench: could not restore {PARAMETER} to {}: {e}",
                    self.previous
                );
            }
        }
    }
}

async fn measure(
    options: &Options,
    configs: &[&'static Config],
    host: &Host,
) -> Result<(Vec<Cell>, MachineProbes), String> {
    let mut disk_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(host.dir.path().join("disk-probe.jsonl"))
        .map_err(|e| format!("disk probe: {e}"))?;
    let mut probes = MachineProbes::default();
    let metrics_client = http_client(None)?;
    let highest = *options.concurrency.iter().max().expect("some concurrency");
    let mut sessions = Vec::new();
    for config in configs {
        let started = Instant::now();
        let session = Arc::new(open(config, host).await?);
        block(&session, 1, options.warmup)
            .await
            .map_err(|e| format!("{}: warm-up: {e}", config.name))?;
        if highest > 1 {
            block(&session, highest, options.warmup.max(highest))
                .await
                .map_err(|e| format!("{}: warm-up: {e}", config.name))?;
        }
        eprintln!(
            "proxy-bench: {} ready ({:.1} s with warm-up)",
            config.name,
            started.elapsed().as_secs_f64()
        );
        sessions.push(session);
    }

    let mut cells: Vec<Cell> = (0..configs.len())
        .flat_map(|config| {
            options.concurrency.iter().map(move |&concurrency| Cell {
                config,
                concurrency,
                latencies_ns: Vec::new(),
                wall: Duration::ZERO,
                round_p50_ns: Vec::new(),
                daemon: StageTimes::default(),
            })
        })
        .collect();
    let started = Instant::now();
    for round in 0..options.rounds {
        for step in 0..cells.len() {
            let count = cells.len();
            let cell = &mut cells[(step + round) % count];
            let config = configs[cell.config];
            let session = &sessions[cell.config];
            let calls = if cell.concurrency == 1 {
                options.calls
            } else {
                options.concurrent_calls
            };
            let before = match config.daemon_server {
                Some(server) => {
                    Some(stage_times(&metrics_client, host.metrics_addr, server).await?)
                }
                None => None,
            };
            let (mut latencies, wall) = block(session, cell.concurrency, calls)
                .await
                .map_err(|e| format!("{} at concurrency {}: {e}", config.name, cell.concurrency))?;
            if let (Some(before), Some(server)) = (before, config.daemon_server) {
                let after = stage_times(&metrics_client, host.metrics_addr, server).await?;
                cell.daemon = cell.daemon.plus(after.minus(before));
            }
            latencies.sort_unstable();
            cell.round_p50_ns.push(percentile(&latencies, 0.5));
            cell.latencies_ns.extend(latencies);
            cell.wall += wall;
        }
        disk_samples(&mut disk_file, DISK_SAMPLES_PER_ROUND, &mut probes.disk_ns)?;
        wake_samples(WAKE_SAMPLES_PER_ROUND, &mut probes.wake_ns)?;
        eprintln!(
            "proxy-bench: round {}/{} done ({:.1} s)",
            round + 1,
            options.rounds,
            started.elapsed().as_secs_f64()
        );
    }
    let closing = Instant::now();
    for (config, session) in configs.iter().zip(sessions) {
        let started = Instant::now();
        if let Ok(session) = Arc::try_unwrap(session) {
            session.close().await;
        }
        let took = started.elapsed();
        if took > Duration::from_millis(500) {
            eprintln!(
                "proxy-bench: closing {} took {:.1} s",
                config.name,
                took.as_secs_f64()
            );
        }
    }
    eprintln!(
        "proxy-bench: sessions closed ({:.1} s)",
        closing.elapsed().as_secs_f64()
    );
    for cell in &mut cells {
        cell.latencies_ns.sort_unstable();
    }
    probes.disk_ns.sort_unstable();
    probes.wake_ns.sort_unstable();
    Ok((cells, probes))
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

struct Row {
    name: &'static str,
    path: &'static str,
    concurrency: usize,
    samples: usize,
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
    calls_per_s: f64,
    /// p50 of each round, in order: drift over the run shows here.
    round_p50_us: Vec<f64>,
    baseline: Option<&'static str>,
    /// (added p50 µs, added p99 µs, ratio p50, ratio p99) against the baseline.
    added: Option<(f64, f64, f64, f64)>,
    /// Mean µs inside the daemon per call: total, policy, upstream.
    daemon: Option<(f64, f64, f64)>,
}

fn rows(configs: &[&'static Config], cells: &[Cell]) -> Vec<Row> {
    let us = |ns: u64| ns as f64 / 1000.0;
    let find = |name: &str, concurrency: usize| {
        cells
            .iter()
            .find(|c| configs[c.config].name == name && c.concurrency == concurrency)
    };
    let mut rows = Vec::new();
    for cell in cells {
        let config = configs[cell.config];
        let sorted = &cell.latencies_ns;
        let (p50, p99) = (us(percentile(sorted, 0.5)), us(percentile(sorted, 0.99)));
        let added = config
            .baseline
            .and_then(|name| find(name, cell.concurrency))
            .map(|base| {
                let b50 = us(percentile(&base.latencies_ns, 0.5));
                let b99 = us(percentile(&base.latencies_ns, 0.99));
                (p50 - b50, p99 - b99, p50 / b50, p99 / b99)
            });
        let daemon = config.daemon_server.and_then(|_| {
            Some((
                StageTimes::mean_us(cell.daemon.total)?,
                StageTimes::mean_us(cell.daemon.policy)?,
                StageTimes::mean_us(cell.daemon.upstream)?,
            ))
        });
        let mean = sorted.iter().sum::<u64>() as f64 / sorted.len().max(1) as f64 / 1000.0;
        rows.push(Row {
            name: config.name,
            path: config.path,
            concurrency: cell.concurrency,
            samples: sorted.len(),
            p50_us: p50,
            p99_us: p99,
            mean_us: mean,
            calls_per_s: sorted.len() as f64 / cell.wall.as_secs_f64().max(1e-9),
            round_p50_us: cell.round_p50_ns.iter().map(|&ns| us(ns)).collect(),
            baseline: config.baseline,
            added,
            daemon,
        });
    }
    rows.sort_by_key(|row| row.concurrency);
    rows
}

fn report(options: &Options, configs: &[&'static Config], cells: &[Cell], probes: &MachineProbes) {
    let rows = rows(configs, cells);
    let disk_ns = &probes.disk_ns;
    let disk_us = |p| percentile(disk_ns, p) as f64 / 1000.0;
    let wake_us = |p| percentile(&probes.wake_ns, p) as f64 / 1000.0;
    let halt_poll_ns = halt_poll::current();
    if options.json {
        let results: Vec<Value> = rows
            .iter()
            .map(|row| {
                let mut entry = json!({
                    "config": row.name,
                    "path": row.path,
                    "concurrency": row.concurrency,
                    "samples": row.samples,
                    "p50_us": round2(row.p50_us),
                    "p99_us": round2(row.p99_us),
                    "mean_us": round2(row.mean_us),
                    "calls_per_s": row.calls_per_s.round(),
                    "round_p50_us": row.round_p50_us.iter().map(|&p| round2(p)).collect::<Vec<_>>(),
                    "baseline": row.baseline,
                });
                if let Some((a50, a99, r50, r99)) = row.added {
                    entry["added_p50_us"] = json!(round2(a50));
                    entry["added_p99_us"] = json!(round2(a99));
                    entry["ratio_p50"] = json!(round2(r50));
                    entry["ratio_p99"] = json!(round2(r99));
                    entry["within_targets"] =
                        json!(a50 <= TARGET_ADDED_P50_US && a99 <= TARGET_ADDED_P99_US);
                }
                if let Some((total, policy, upstream)) = row.daemon {
                    entry["daemon_mean_us"] = json!({
                        "total": round2(total),
                        "policy": round2(policy),
                        "upstream": round2(upstream),
                        "own": round2(total - upstream),
                    });
                }
                entry
            })
            .collect();
        let document = json!({
            "settings": {
                "rounds": options.rounds,
                "calls_per_round": options.calls,
                "concurrent_calls_per_round": options.concurrent_calls,
                "warmup": options.warmup,
                "concurrency": options.concurrency,
                "daemon_log": options.daemon_log,
                "audit_fsync": options.audit_fsync,
                "audit_durable_before": options.durable_before,
                "daemon_worker_threads": options.worker_threads,
                "daemon_answer_poll_us": options.answer_poll_us,
                "jwt": options.jwt.map(|alg| format!("{alg:?}")),
                "workspace_at_run": source_revision(),
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            },
            "targets": {"added_p50_us": TARGET_ADDED_P50_US, "added_p99_us": TARGET_ADDED_P99_US},
            "disk_append_fdatasync_us": {
                "p50": round2(disk_us(0.5)),
                "p99": round2(disk_us(0.99)),
                "samples": disk_ns.len(),
                "record_bytes": DISK_RECORD_BYTES,
            },
            "cross_cpu_wake_us": {
                "p50": round2(wake_us(0.5)),
                "p99": round2(wake_us(0.99)),
                "samples": probes.wake_ns.len(),
            },
            "guest_halt_poll_ns": halt_poll_ns,
            "results": results,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&document).expect("JSON serialises")
        );
        return;
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tools/call latency, mcp-guard vs direct ({} rounds; {} calls per round at concurrency 1, {} above; {} CPUs)",
        options.rounds,
        options.calls,
        options.concurrent_calls,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "targets: added <= {TARGET_ADDED_P50_US} us at p50, <= {TARGET_ADDED_P99_US} us at p99\n"
    );
    let _ = writeln!(
        out,
        "{:<23} {:>4} {:>9} {:>9} {:>9} {:>17}  {:<18} {:>9} {:>9} {:>6} {:>6}  \
         daemon us/call (own = total - upstream)",
        "config",
        "conc",
        "p50 us",
        "p99 us",
        "calls/s",
        "round p50 range",
        "vs",
        "+p50 us",
        "+p99 us",
        "x p50",
        "x p99",
    );
    let mut last_concurrency = None;
    for row in &rows {
        if last_concurrency.is_some_and(|c| c != row.concurrency) {
            out.push('\n');
        }
        last_concurrency = Some(row.concurrency);
        let (vs, added) = match (row.baseline, row.added) {
            (Some(base), Some((a50, a99, r50, r99))) => {
                let mark = if a50 <= TARGET_ADDED_P50_US && a99 <= TARGET_ADDED_P99_US {
                    ""
                } else {
                    " *"
                };
                (
                    base,
                    format!("{a50:>9.1} {a99:>9.1} {r50:>6.2} {r99:>6.2}{mark}"),
                )
            }
            _ => ("", format!("{:>9} {:>9} {:>6} {:>6}", "", "", "", "")),
        };
        let daemon = row
            .daemon
            .map(|(total, policy, upstream)| {
                format!(
                    "total {total:.1}, upstream {upstream:.1}, own {:.1} (policy {policy:.1})",
                    total - upstream
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<23} {:>4} {:>9.1} {:>9.1} {:>9.0} {:>17}  {:<18} {}  {}",
            row.name,
            row.concurrency,
            row.p50_us,
            row.p99_us,
            row.calls_per_s,
            {
                let min = row
                    .round_p50_us
                    .iter()
                    .copied()
                    .fold(f64::INFINITY, f64::min);
                let max = row.round_p50_us.iter().copied().fold(0.0, f64::max);
                format!("{min:.1}-{max:.1}")
            },
            vs,
            added,
            daemon
        );
    }
    let _ = writeln!(
        out,
        "\ndisk: append of a {DISK_RECORD_BYTES}-byte line + fdatasync in the audit log's directory, \
         {} samples across the rounds: p50 {:.1} us, p99 {:.1} us{}",
        disk_ns.len(),
        disk_us(0.5),
        disk_us(0.99),
        match (options.audit_fsync, options.durable_before.as_deref()) {
            (false, _) => " (the daemon's log ran without fsync)",
            (true, Some("answer")) => {
                " (the daemon's log: durable_before \"answer\", one flush per call)"
            }
            (true, Some("interval")) => {
                " (the daemon's log: durable_before \"interval\", flushed in the background)"
            }
            (true, _) => "",
        }
    );
    let _ = writeln!(
        out,
        "wake-up: a thread asleep on a socket, woken by a write from the other CPU, {} samples \
         across the rounds: p50 {:.1} us, p99 {:.1} us{}",
        probes.wake_ns.len(),
        wake_us(0.5),
        wake_us(0.99),
        match halt_poll_ns {
            Some(ns) => format!(" (guest_halt_poll_ns {ns})"),
            None => String::new(),
        }
    );
    if options.worker_threads.is_some() || options.answer_poll_us.is_some() {
        let _ = writeln!(
            out,
            "daemon: worker_threads {}, answer_poll_us {}",
            options
                .worker_threads
                .map_or("default".to_owned(), |n| n.to_string()),
            options.answer_poll_us.unwrap_or(0)
        );
    }
    let _ = writeln!(
        out,
        "\n* over a target. Paths:\n{}",
        configs
            .iter()
            .map(|c| format!("  {:<23} {}", c.name, c.path))
            .collect::<Vec<_>>()
            .join("\n")
    );
    print!("{out}");
}

/// `git describe` of the workspace when the bench ran, so figures name their code (exact when
/// run through `cargo xtask bench proxy`, which builds just before).
fn source_revision() -> Option<String> {
    let output = std::process::Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR")])
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}
