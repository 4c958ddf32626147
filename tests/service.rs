//! Issue 6: mcp-guard as a systemd service.
//!
//! - `dist/mcp-guard.service` passes `systemd-analyze verify`.
//! - The sd_notify protocol against a NOTIFY_SOCKET the test listens on: READY=1 only once the
//!   listeners answer, STATUS=, WATCHDOG=1 pings, RELOADING=1 (with MONOTONIC_USEC=) … READY=1
//!   around a SIGHUP, STOPPING=1 on SIGTERM, exit 0; spawned servers do not inherit the socket.
//! - Under journald (JOURNAL_STREAM naming stderr) log lines carry no timestamp.
//! - SIGTERM lets a call in flight finish (its answer arrives after the signal), then exit 0
//!   with a sound audit chain.
//! - kill -9 under load: the pinned programs keep refusing during the gap, the next daemon
//!   carries the chain on, and every call a client got an answer for has its decision and
//!   outcome records, once.
//! - `dist/grafana-dashboard.json` and `dist/prometheus.yml` name only metrics the daemon
//!   exports.
//!
//! Root only (real daemons, real kernel enforcement).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mcp_guard_tests::*;
use serde_json::{Value, json};

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
const FAST_SERVER: &str = env!("CARGO_BIN_EXE_mcp-fast-server");
const HANDSHAKE: &str = "2025-11-25";
const SERVER: &str = "fast";

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

// ---------------------------------------------------------------------------------------------
// A minimal MCP client over the daemon's HTTP front
// ---------------------------------------------------------------------------------------------

/// POSTs `message` to `/servers/{server}/mcp`; an error when no whole answer came back (the
/// daemon died, say).
fn post(
    addr: SocketAddr,
    server: &str,
    session: Option<&str>,
    message: &Value,
) -> std::io::Result<JsonAnswer> {
    let mut headers = vec![
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
        ("MCP-Protocol-Version", HANDSHAKE),
    ];
    if let Some(session) = session {
        headers.push(("Mcp-Session-Id", session));
    }
    let path = format!("/servers/{server}/mcp");
    Ok(http_exchange(addr, "POST", &path, &headers, &message.to_string())?.into())
}

fn rpc(id: u64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// An MCP session on the daemon's front (initialize, then initialized).
struct McpSession {
    addr: SocketAddr,
    server: String,
    id: String,
}

impl McpSession {
    fn open(addr: SocketAddr) -> std::io::Result<McpSession> {
        McpSession::open_on(addr, SERVER)
    }

    /// A session of `server`.
    fn open_on(addr: SocketAddr, server: &str) -> std::io::Result<McpSession> {
        let initialize = rpc(
            0,
            "initialize",
            json!({
                "protocolVersion": HANDSHAKE,
                "capabilities": {},
                "clientInfo": {"name": "service-test", "version": "0"},
            }),
        );
        let answer = post(addr, server, None, &initialize)?;
        let id = answer
            .header("mcp-session-id")
            .ok_or_else(|| {
                std::io::Error::other(format!("initialize: {} {}", answer.status, answer.body))
            })?
            .to_owned();
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        post(addr, server, Some(&id), &initialized)?;
        let server = server.to_owned();
        Ok(McpSession { addr, server, id })
    }

    /// `tools/call echo {text}`; the echoed text when the call was answered with a result.
    fn echo(&self, id: u64, text: &str) -> std::io::Result<Option<String>> {
        let call = rpc(
            id,
            "tools/call",
            json!({"name": "echo", "arguments": {"text": text}}),
        );
        let answer = post(self.addr, &self.server, Some(&self.id), &call)?;
        Ok(answer.body["result"]["content"][0]["text"]
            .as_str()
            .map(str::to_owned))
    }
}

/// A policy with the HTTP front on `listen`, `fast` (mcp-fast-server with `server_args`, one
/// process per session, reaching nothing) whose echo tool developers may call.
fn fast_policy(env: &TestEnv, listen: SocketAddr, server_args: &[&str]) -> Value {
    let mut command = vec![FAST_SERVER.to_owned()];
    command.extend(server_args.iter().map(|a| a.to_string()));
    let mut policy = env.proxy_policy(
        listen,
        json!({
            SERVER: stdio_server(command, vec![
                list_tools_rule(),
                allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
            ]),
        }),
    );
    policy["audit"]["store_arguments"] = json!(true);
    policy
}

/// `mcp-guard audit verify FILE` must pass.
fn assert_audit_verifies(env: &TestEnv) {
    let output = Command::new(&env.daemon_bin)
        .args(["audit", "verify"])
        .arg(env.audit_path())
        .output()
        .expect("run mcp-guard audit verify");
    assert!(
        output.status.success(),
        "audit verify failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// The unit file
// ---------------------------------------------------------------------------------------------

/// The unit as shipped, with ExecStart pointing at the built binary (verify checks that it
/// exists), passes `systemd-analyze verify` without a warning about it.
#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let binary = daemon_binary();
    let unit = std::fs::read_to_string(repo_file("dist/mcp-guard.service")).expect("unit file");
    for setting in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Delegate=yes",
        "WatchdogSec=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "--delegated-cgroup",
    ] {
        assert!(unit.contains(setting), "the unit lacks {setting}");
    }
    assert!(
        unit.contains("/usr/local/bin/mcp-guard run"),
        "ExecStart moved"
    );
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("mcp-guard.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/mcp-guard", binary.to_str().unwrap()),
    )
    .unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (from the systemd package; `cargo xtask setup` installs it)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "systemd-analyze verify failed ({}): {stderr}",
        output.status
    );
    assert!(
        !stderr.contains("mcp-guard.service"),
        "systemd-analyze verify warns about the unit: {stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// sd_notify
// ---------------------------------------------------------------------------------------------

/// The notifications the daemon sends, WATCHDOG=1 pings counted apart.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    watchdog_pings: usize,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        NotifySocket {
            socket,
            path,
            watchdog_pings: 0,
        }
    }

    fn receive(&mut self) -> String {
        let mut buffer = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buffer)
            .expect("a notification within the timeout");
        String::from_utf8(buffer[..n].to_vec()).expect("UTF-8 notification")
    }

    /// The next notification that is not a watchdog ping.
    fn next_state(&mut self) -> String {
        loop {
            let message = self.receive();
            if message == "WATCHDOG=1" {
                self.watchdog_pings += 1;
            } else {
                return message;
            }
        }
    }
}

fn assignments(message: &str) -> Vec<(&str, &str)> {
    message
        .lines()
        .map(|line| line.split_once('=').unwrap_or((line, "")))
        .collect()
}

fn has(message: &str, key: &str, value: &str) -> bool {
    assignments(message).contains(&(key, value))
}

#[test]
fn notify_protocol_ready_status_watchdog_reload_and_stopping() {
    let env = TestEnv::new("svc-notify", PROBE);
    let listen = loopback(free_loopback_port());
    let metrics = loopback(free_loopback_port());
    let mut policy = fast_policy(&env, listen, &[]);
    policy["daemon"]["metrics_listen"] = json!(metrics.to_string());
    env.write_policy_document(&policy);
    let mut notify = NotifySocket::bind(env.dir());
    let mut daemon = env.spawn_daemon_with_env(
        &[],
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            // 0.2 s: the daemon pings every 0.1 s.
            ("WATCHDOG_USEC", "200000"),
        ],
    );

    let ready = notify.next_state();
    // Readiness is only announced when there is something to talk to.
    assert!(
        TcpStream::connect(listen).is_ok(),
        "READY=1 came before the MCP front listened"
    );
    let (status, _) = http_get(metrics, "/metrics").expect("metrics answer once READY=1");
    assert_eq!(status, 200);
    assert!(
        Path::new(&env.control_socket).exists(),
        "READY=1 came before the control socket existed"
    );
    assert!(has(&ready, "READY", "1"), "first notification: {ready:?}");
    let status_line = assignments(&ready)
        .into_iter()
        .find(|(k, _)| *k == "STATUS")
        .map(|(_, v)| v.to_owned())
        .unwrap_or_else(|| panic!("READY=1 without STATUS=: {ready:?}"));
    assert!(
        status_line.contains("1 server") && status_line.contains(&listen.to_string()),
        "{status_line}"
    );

    // Pings keep coming while the daemon runs.
    while notify.watchdog_pings < 3 {
        let message = notify.receive();
        assert_eq!(message, "WATCHDOG=1", "unexpected notification");
        notify.watchdog_pings += 1;
    }

    // A server process the daemon spawns cannot speak for it.
    let session = McpSession::open(listen).expect("open a session");
    assert_eq!(session.echo(1, "hi").unwrap().as_deref(), Some("hi"));
    let server_dir = env.cgroup_root.join(SERVER);
    let server_pids: Vec<i32> = std::fs::read_dir(&server_dir)
        .expect("the server's cgroup")
        .flatten()
        .flat_map(|entry| cgroup_pids(&entry.path()))
        .collect();
    assert!(
        !server_pids.is_empty(),
        "no server process in {server_dir:?}"
    );
    for pid in server_pids {
        let environment = process_environ(pid);
        assert!(
            !environment
                .iter()
                .any(|(k, _)| k == "NOTIFY_SOCKET" || k == "WATCHDOG_USEC"),
            "server process {pid} inherited the notify socket"
        );
    }

    daemon.sighup();
    let reloading = notify.next_state();
    assert!(has(&reloading, "RELOADING", "1"), "{reloading:?}");
    let monotonic = assignments(&reloading)
        .into_iter()
        .find(|(k, _)| *k == "MONOTONIC_USEC")
        .map(|(_, v)| v.to_owned())
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC=: {reloading:?}"));
    assert!(
        monotonic.parse::<u64>().is_ok_and(|usec| usec > 0),
        "{reloading:?}"
    );
    let ready_again = notify.next_state();
    assert!(has(&ready_again, "READY", "1"), "{ready_again:?}");

    daemon.signal(libc::SIGTERM);
    let stopping = notify.next_state();
    assert!(has(&stopping, "STOPPING", "1"), "{stopping:?}");
    let status = daemon.wait_exit();
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert_audit_verifies(&env);
}

// ---------------------------------------------------------------------------------------------
// Logs under journald
// ---------------------------------------------------------------------------------------------

/// The first line of `mcp-guard run --no-egress --log-format text` whose stderr is a pipe,
/// with JOURNAL_STREAM naming that pipe (`journal`) or something else.
fn first_text_log_line(env: &TestEnv, journal: bool) -> String {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors, which are owned below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors from pipe2, owned once each.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let reader = std::fs::File::from(reader);
    let meta = reader.metadata().unwrap();
    let stream = if journal {
        format!("{}:{}", meta.dev(), meta.ino())
    } else {
        format!("{}:{}", meta.dev(), meta.ino() + 1)
    };
    let mut child = Command::new(&env.daemon_bin)
        .env("JOURNAL_STREAM", stream)
        .env("RUST_LOG", "info")
        .args(["run", "--no-egress", "--log-format", "text", "--policy"])
        .arg(&env.policy_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(writer))
        .spawn()
        .expect("spawn mcp-guard");
    let mut lines = BufReader::new(reader).lines();
    let first = lines
        .next()
        .expect("a log line")
        .expect("read the log line");
    let _ = child.kill();
    let _ = child.wait();
    first
}

#[test]
fn under_journald_log_lines_carry_no_timestamp() {
    let env = TestEnv::new("svc-journal", PROBE);
    env.write_policy(json!({}));
    let journal = first_text_log_line(&env, true);
    let level = journal.split_whitespace().next().unwrap_or_default();
    assert!(
        ["INFO", "WARN", "ERROR"].contains(&level),
        "a journald line starts with its level: {journal:?}"
    );
    assert!(
        !journal.contains('\u{1b}'),
        "no colour into the journal: {journal:?}"
    );
    // Elsewhere (JOURNAL_STREAM inherited, but stderr is another file) the timestamp stays.
    let elsewhere = first_text_log_line(&env, false);
    assert!(
        elsewhere.starts_with(|c: char| c.is_ascii_digit()),
        "a plain line starts with its timestamp: {elsewhere:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// SIGTERM drains
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_lets_a_call_in_flight_finish_then_exits_zero() {
    let env = TestEnv::new("svc-drain", PROBE);
    let listen = loopback(free_loopback_port());
    // Each call takes 5 s at the server: long enough to be in flight when SIGTERM comes, even
    // if this test is slow to see the decision record, and well within the 10 s grace.
    env.write_policy_document(&fast_policy(&env, listen, &["--call-delay-ms", "5000"]));
    let mut daemon = env.start_daemon();
    let session = McpSession::open(listen).expect("open a session");
    let session_id = session.id.clone();

    let call = thread::spawn(move || {
        let echoed = session.echo(7, "in flight");
        (echoed, Instant::now())
    });
    // The decision record is written before the call is forwarded: from then on it is in
    // flight.
    let audit = env.audit_path();
    assert!(
        poll_until(TIMEOUT, || audit_records(&audit)
            .iter()
            .any(|r| r["tool"] == "echo" && r["decision"] == "allow")),
        "the call was never decided"
    );
    let terminated_at = Instant::now();
    daemon.signal(libc::SIGTERM);

    let (echoed, answered_at) = call.join().unwrap();
    assert_eq!(
        echoed
            .expect("the call in flight got its answer")
            .as_deref(),
        Some("in flight")
    );
    assert!(answered_at > terminated_at);
    let status = daemon.wait_exit();
    assert!(status.success(), "exit after SIGTERM: {status}");

    assert_audit_verifies(&env);
    let records = audit_records(&audit);
    assert!(
        records
            .iter()
            .any(|r| r["tool"] == "echo" && r["outcome"]["kind"] == "result"),
        "no outcome record for the drained call"
    );
    assert!(
        records.iter().any(|r| r["kind"] == "session"
            && r["session"] == session_id.as_str()
            && r["detail"]["event"] == "end"),
        "the session's end is not on record"
    );
}

/// An agent's open GET stream is not a call in flight: on SIGTERM it is closed at once, so a
/// stop does not wait out `shutdown_grace_seconds` (60 here) for it. The stream reaches its
/// end well inside the test's safety timeout, and the daemon exits 0 without cutting
/// anything off.
#[test]
fn sigterm_closes_open_get_streams_at_once() {
    let env = TestEnv::new("svc-stream", PROBE);
    let listen = loopback(free_loopback_port());
    let mut policy = fast_policy(&env, listen, &[]);
    policy["daemon"]["shutdown_grace_seconds"] = json!(60);
    env.write_policy_document(&policy);
    let mut daemon = env.start_daemon();
    let session = McpSession::open(listen).expect("open a session");
    let stream = http_request_head(
        listen,
        "GET",
        &format!("/servers/{SERVER}/mcp"),
        &[
            ("Accept", "text/event-stream"),
            ("Mcp-Session-Id", &session.id),
            ("MCP-Protocol-Version", "2025-11-25"),
        ],
    )
    .expect("open the GET stream");
    assert_eq!(stream.status, 200);

    daemon.signal(libc::SIGTERM);
    stream
        .read_until_closed(TIMEOUT)
        .expect("the GET stream closed after SIGTERM");
    let status = daemon.wait_exit();
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(
        !daemon
            .log
            .lines()
            .iter()
            .any(|line| message(line).is_some_and(|m| m.contains("cut off"))),
        "the stop waited out its grace period: {}",
        daemon.log.summary(10, 30)
    );
}

/// SIGTERM stops every server process the daemon spawned for its sessions: mcp-fast-server
/// and a server that ignores SIGTERM and outlives its closed stdin (so only the daemon's kill
/// ends it). Each session's end is on record with reason `shutdown`, and no process is left
/// in the session cgroups.
#[test]
fn sigterm_stops_the_server_process_of_every_session() {
    let env = TestEnv::new("svc-children", PROBE);
    let listen = loopback(free_loopback_port());
    let pid_file = env.dir().join("lingering.pid");
    let mut policy = fast_policy(&env, listen, &[]);
    policy["servers"]["lingering"] =
        stdio_server(lingering_server(&pid_file), vec![list_tools_rule()]);
    env.write_policy_document(&policy);
    let mut daemon = env.start_daemon();
    let fast = McpSession::open(listen).expect("open a session of fast");
    assert_eq!(fast.echo(1, "before").unwrap().as_deref(), Some("before"));
    let lingering = McpSession::open_on(listen, "lingering").expect("open a session of lingering");
    let cgroups = [
        env.session_cgroup(SERVER, &fast.id),
        env.session_cgroup("lingering", &lingering.id),
    ];
    let fast_pids = cgroup_pids(&cgroups[0]);
    assert_eq!(fast_pids.len(), 1, "{fast_pids:?}");
    assert!(
        process_cmdline(fast_pids[0]).contains("mcp-fast-server"),
        "{}",
        process_cmdline(fast_pids[0])
    );
    let lingering_pid = pid_from_file(&pid_file);
    assert_eq!(cgroup_pids(&cgroups[1]), [lingering_pid]);

    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit();
    assert!(status.success(), "exit after SIGTERM: {status}");
    for pid in [fast_pids[0], lingering_pid] {
        assert!(
            poll_until(Duration::from_secs(20), || process_ended(pid)),
            "{} (pid {pid}) still runs after the daemon stopped",
            process_cmdline(pid)
        );
    }
    for cgroup in &cgroups {
        assert_eq!(cgroup_pids(cgroup), [0; 0], "{}", cgroup.display());
    }
    let records = audit_records(&env.audit_path());
    for session in [&fast.id, &lingering.id] {
        assert!(
            records.iter().any(|r| r["kind"] == "session"
                && r["session"] == session.as_str()
                && r["detail"]["event"] == "end"
                && r["detail"]["reason"] == "shutdown"),
            "no end record for {session}: {records:#?}"
        );
    }
}

/// `run --delegated-cgroup`, started inside a cgroup as systemd starts a `Delegate=yes` unit:
/// the daemon moves itself into the leaf `<unit>/daemon` (processes only in leaves), makes
/// `<unit>` its cgroup root (the policy's `cgroup_root` notwithstanding), places session
/// servers beside its leaf, and enforces there: a probe in a session of the server, which
/// declares no destination, is refused.
#[test]
fn a_delegated_cgroup_becomes_the_root_with_the_daemon_in_a_leaf() {
    let env = TestEnv::new("svc-delegated", PROBE);
    let listen = loopback(free_loopback_port());
    env.write_policy_document(&fast_policy(&env, listen, &[]));
    let unit = env.cgroup_root.join("unit.service");
    std::fs::create_dir_all(&unit).expect("create the unit's cgroup");
    let daemon = env.start_delegated_daemon(&unit);

    let relative =
        |path: &Path| format!("/{}", path.strip_prefix(cgroup2_mount()).unwrap().display());
    assert_eq!(
        process_cgroup(daemon.pid()).as_deref(),
        Some(relative(&unit.join("daemon")).as_str()),
        "the daemon's own cgroup"
    );

    let session = McpSession::open(listen).expect("open a session");
    let server_cgroup = unit.join(SERVER).join(&session.id);
    assert!(
        poll_until(TIMEOUT, || !cgroup_pids(&server_cgroup).is_empty()),
        "no server process in {}",
        server_cgroup.display()
    );

    let refused = attempt("tcp", listen);
    let run = env.exec_probe(SERVER, Some("sess-delegated"), &[&refused]);
    run.assert_results(&[(&refused, "EPERM")]);
    let (pid, _) = run.identity();
    let event = daemon.wait_for_event("the probe's refused connect", |e| {
        as_u64(field(e, "tgid")) == Some(pid)
    });
    assert_eq!(
        as_text(field(&event, "session")).as_deref(),
        Some("sess-delegated")
    );
}

// ---------------------------------------------------------------------------------------------
// kill -9 under load
// ---------------------------------------------------------------------------------------------

#[test]
fn kill9_under_load_keeps_enforcing_and_loses_no_acknowledged_record() {
    kill9_under_load("svc-crash", json!({}));
}

/// The same with `audit.durable_before: "interval"`: records are acknowledged once written, not
/// flushed, and a crash of mcp-guard (not of the machine) still loses none.
#[test]
fn kill9_under_load_loses_no_acknowledged_record_with_a_background_flush() {
    kill9_under_load(
        "svc-crash-interval",
        json!({"durable_before": "interval", "flush_interval_ms": 1000}),
    );
}

/// Clients call through the daemon under load, the daemon is killed (SIGKILL), and a new one
/// starts: the kernel refused an undeclared destination throughout, and every call that was
/// answered has its decision and outcome on record, in a chain that verifies.
fn kill9_under_load(tag: &str, audit: Value) {
    let env = TestEnv::new(tag, PROBE);
    let listen = loopback(free_loopback_port());
    let mut document = fast_policy(&env, listen, &[]);
    TestEnv::set_settings(&mut document, "audit", &audit);
    env.write_policy_document(&document);
    let mut daemon = env.start_daemon();
    let target = Listener::tcp(LOCALHOST_V4);
    let undeclared = attempt("tcp", SocketAddr::new(LOCALHOST_V4, target.port()));
    let mut probe = env.interactive_probe(SERVER, Some("crash-probe"));
    assert_eq!(probe.result(&undeclared), "EPERM", "with the daemon up");

    // Concurrent clients call until the daemon goes away; each answered call is remembered.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|worker| {
            let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
            thread::spawn(move || {
                let Ok(session) = McpSession::open(listen) else {
                    return;
                };
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let text = format!("w{worker}-{i}");
                    match session.echo(i, &text) {
                        Ok(Some(echoed)) => {
                            assert_eq!(echoed, text);
                            acknowledged.lock().unwrap().push(text);
                        }
                        Ok(None) | Err(_) => return,
                    }
                }
            })
        })
        .collect();
    assert!(
        poll_until(TIMEOUT, || acknowledged.lock().unwrap().len() >= 100),
        "the load never got going"
    );
    let status = daemon.kill9();
    assert!(!status.success(), "the daemon was killed: {status}");
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().expect("worker");
    }

    // Nobody is running the show, and the kernel still refuses.
    assert_eq!(probe.result(&undeclared), "EPERM", "with the daemon dead");

    let mut second = env.start_daemon();
    assert_eq!(probe.result(&undeclared), "EPERM", "under the new daemon");
    let after = McpSession::open(listen).expect("a session with the new daemon");
    assert_eq!(after.echo(1, "after").unwrap().as_deref(), Some("after"));
    second.signal(libc::SIGTERM);
    assert!(second.wait_exit().success());

    assert_audit_verifies(&env);
    let records = audit_records(&env.audit_path());
    let acknowledged = acknowledged.lock().unwrap().clone();
    let mut outcomes = BTreeSet::new();
    for record in &records {
        if record["kind"] == "call" && !record["outcome"].is_null() {
            outcomes.insert(record["call_id"].as_str().unwrap_or_default().to_owned());
        }
    }
    for text in &acknowledged {
        let decisions: Vec<&Value> = records
            .iter()
            .filter(|r| r["decision"] == "allow" && r["arguments"]["text"] == text.as_str())
            .collect();
        assert_eq!(
            decisions.len(),
            1,
            "call {text:?} was answered: it needs exactly one decision record"
        );
        let call_id = decisions[0]["call_id"].as_str().unwrap_or_default();
        assert!(
            outcomes.contains(call_id),
            "call {text:?} was answered but has no outcome record"
        );
    }
    // The second daemon's start is on record after the first one's calls.
    let loads = records
        .iter()
        .filter(|r| r["kind"] == "policy" && r["detail"]["event"] == "load")
        .count();
    assert!(loads >= 2, "both starts are on record");
}

// ---------------------------------------------------------------------------------------------
// Dashboards
// ---------------------------------------------------------------------------------------------

/// Every `mcp_guard_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("mcp_guard_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Every PromQL expression of the dashboard's panels.
fn dashboard_expressions(dashboard: &Value) -> Vec<String> {
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut expressions = Vec::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty(),
            "panel {} queries nothing",
            panel["title"]
        );
        for target in targets {
            expressions.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    expressions
}

#[test]
fn dashboards_name_only_metrics_the_daemon_exports() {
    let env = TestEnv::new("svc-metrics", PROBE);
    let listen = loopback(free_loopback_port());
    let metrics = loopback(free_loopback_port());
    let mut policy = fast_policy(&env, listen, &[]);
    policy["daemon"]["metrics_listen"] = json!(metrics.to_string());
    policy["daemon"]["max_sessions_per_principal"] = json!(1);
    env.write_policy_document(&policy);
    let daemon = env.start_daemon();
    // Labelled series exist only once something happened: a call, a refused call, a refused
    // connection, a reload, a refused session.
    let session = McpSession::open(listen).expect("open a session");
    assert!(
        McpSession::open(listen).is_err(),
        "a second session of the principal was opened past its limit of 1"
    );
    assert_eq!(session.echo(1, "x").unwrap().as_deref(), Some("x"));
    let refused = rpc(2, "resources/list", json!({}));
    post(listen, SERVER, Some(&session.id), &refused).expect("a refusal");
    let target = Listener::tcp(LOCALHOST_V4);
    let undeclared = attempt("tcp", SocketAddr::new(LOCALHOST_V4, target.port()));
    env.exec_probe(SERVER, Some("metrics-probe"), &[&undeclared])
        .assert_results(&[(&undeclared, "EPERM")]);
    assert!(
        poll_until(TIMEOUT, || {
            metric(
                &scrape(metrics),
                "mcp_guard_egress_attempts_total",
                &[("verdict", "refuse")],
            ) > 0.0
        }),
        "the refused connection never reached /metrics"
    );
    daemon.sighup();
    assert!(
        poll_until(TIMEOUT, || {
            metric(
                &scrape(metrics),
                "mcp_guard_policy_reloads_total",
                &[("result", "applied")],
            ) > 0.0
        }),
        "the reload never reached /metrics"
    );

    let scraped = scrape(metrics);
    let mut exported = BTreeSet::new();
    for sample in &scraped.samples {
        exported.insert(sample.metric.clone());
        if matches!(sample.value, prometheus_parse::Value::Histogram(_)) {
            for suffix in ["_bucket", "_sum", "_count"] {
                exported.insert(format!("{}{suffix}", sample.metric));
            }
        }
    }

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("dist/grafana-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut used = BTreeSet::new();
    for expression in dashboard_expressions(&dashboard) {
        used.extend(metric_names(&expression));
    }
    // The instance variable's query names a metric too.
    used.extend(metric_names(&dashboard["templating"].to_string()));
    let scrape_config =
        std::fs::read_to_string(repo_file("dist/prometheus.yml")).expect("prometheus.yml");
    used.extend(
        metric_names(&scrape_config)
            .into_iter()
            .filter(|name| name != "mcp_guard_"),
    );
    let alerts = std::fs::read_to_string(repo_file("dist/prometheus-alerts.yml"))
        .expect("prometheus-alerts.yml");
    let alerted = metric_names(&alerts);
    assert!(
        alerted.contains("mcp_guard_sessions_refused_total")
            && alerted.contains("mcp_guard_audit_failures_total"),
        "the alert rules miss a metric: {alerted:?}"
    );
    used.extend(alerted);
    for expected in [
        "mcp_guard_decisions_total",
        "mcp_guard_request_duration_seconds_bucket",
        "mcp_guard_egress_attempts_total",
        "mcp_guard_egress_ringbuf_events_lost_total",
        "mcp_guard_audit_failures_total",
        "mcp_guard_active_sessions",
        "mcp_guard_authentication_duration_seconds_bucket",
    ] {
        assert!(
            used.contains(expected),
            "the dashboard does not chart {expected}"
        );
    }
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboards name metrics the daemon does not export: {unknown:?}; it exports {exported:?}"
    );
}
