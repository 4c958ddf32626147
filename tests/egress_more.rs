//! More kernel egress enforcement, end to end, against a real `mcp-guard run` daemon: adopted
//! cgroups (confined, then released by a reload), host-name rules, the Prometheus metrics, the
//! one-line refusal to start without privileges (and `--no-egress`), and `egress status`.
//!
//! Root only; these tests fail (never skip) when the programs cannot be loaded.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use mcp_guard_tests::*;
use serde_json::{Value, json};

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
const SERVER: &str = "web";

fn tcp(addr: SocketAddr) -> String {
    attempt("tcp", addr)
}

fn udp(addr: SocketAddr) -> String {
    attempt("udp", addr)
}

/// "policy reload refused" (the daemon may add an explanation after it).
fn is_reload_refusal(line: &Value) -> bool {
    message(line).is_some_and(|m| m.starts_with("policy reload refused"))
}

fn is_reload_outcome(line: &Value) -> bool {
    message(line) == Some("policy reloaded") || is_reload_refusal(line)
}

/// Writes `servers` as the new policy, sends SIGHUP and waits for the reload to be applied
/// (failing on a refusal, whether the SIGHUP or the daemon's own file watch triggered it).
fn reload(env: &TestEnv, daemon: &Daemon, servers: Value) {
    let mark = daemon.log.mark();
    env.write_policy(servers);
    daemon.sighup();
    let outcome = daemon.wait_for_since(mark, TIMEOUT, "the reload's outcome", |l| {
        is_reload_outcome(l)
    });
    assert_eq!(
        message(&outcome),
        Some("policy reloaded"),
        "reload refused: {outcome}"
    );
    assert!(
        !daemon.log.lines()[mark..].iter().any(is_reload_refusal),
        "a reload was refused: {}",
        daemon.log.summary(10, 10)
    );
}

/// The four link pins of the programs attached at cgroup `id`, as `egress status` names them.
fn program_links(id: u64) -> BTreeSet<String> {
    ["connect4", "connect6", "sendmsg4", "sendmsg6"]
        .iter()
        .map(|p| format!("{p}@{id}"))
        .collect()
}

fn status_programs(status: &Value) -> BTreeSet<String> {
    status["programs"]
        .as_array()
        .unwrap_or_else(|| panic!("egress status has no programs list: {status}"))
        .iter()
        .map(|p| {
            p.as_str()
                .unwrap_or_else(|| panic!("program {p} is not a string"))
                .to_string()
        })
        .collect()
}

fn status_count(status: &Value, key: &str) -> u64 {
    status[key]
        .as_u64()
        .unwrap_or_else(|| panic!("egress status has no numeric {key}: {status}"))
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|err| panic!("stat {}: {err}", path.display()))
        .ino()
}

// ---------------------------------------------------------------------------------------------

/// A cgroup mcp-guard does not own (a service's) is adopted by the policy: the process already
/// running in it is confined to the server's egress rules, and its events are attributed to the
/// server with no session and the adopted cgroup's id. A reload whose policy no longer adopts
/// the cgroup releases it: the programs attached to it are detached, its guard entry goes, and
/// the same process reaches what was refused a moment before.
#[test]
fn adopted_cgroup_is_confined_and_released() {
    // Declared first, dropped last: after the daemon and the test environment are gone, the
    // probe is killed and the cgroup removed.
    let adopted = ForeignCgroup::new("adopt");
    let declared = Listener::tcp(LOCALHOST_V4);
    let undeclared = Listener::tcp(LOCALHOST_V4);
    let env = TestEnv::new("adopt", PROBE);
    let rules = vec![rule(
        "svc-api",
        "127.0.0.1/32",
        &[declared.port()],
        &["tcp"],
    )];
    env.write_policy(json!({
        "svc": { "adopt_cgroup": adopted.path, "egress": rules },
    }));

    // The service runs before mcp-guard starts, as a systemd service would.
    let mut probe = env.interactive_probe_in_cgroup(&adopted.path);
    let (pid, cgroup_id) = probe.identity();
    let adopted_id = adopted.id();
    assert_eq!(
        cgroup_id,
        adopted_id,
        "the probe is not in the adopted cgroup {}: {}",
        adopted.path.display(),
        probe.ready
    );
    assert!(
        adopted.pids().contains(&(pid as i32)),
        "pid {pid} not in {}/cgroup.procs: {:?}",
        adopted.path.display(),
        adopted.pids()
    );

    let daemon = env.start_daemon();
    let to_declared = tcp(declared.addr);
    let to_undeclared = tcp(undeclared.addr);
    assert_eq!(probe.result(&to_declared), "ok", "declared, while adopted");
    declared.assert_reached_by(pid, &to_declared);
    assert_eq!(
        probe.result(&to_undeclared),
        "EPERM",
        "undeclared, while adopted"
    );
    undeclared.assert_not_reached_by(pid);

    for (port, verdict, rule) in [
        (declared.port(), "allow", "svc/egress/svc-api"),
        (undeclared.port(), "refuse", "default-deny"),
    ] {
        let event = daemon.wait_for_event(&format!("the adopted probe's {verdict}"), |e| {
            as_u64(field(e, "tgid")) == Some(pid)
                && as_u64(field(e, "port")) == Some(u64::from(port))
        });
        assert_eq!(field(&event, "server"), "svc", "{event}");
        assert_eq!(field(&event, "session"), "", "{event}");
        assert_eq!(
            as_u64(field(&event, "cgroup_id")),
            Some(adopted_id),
            "{event}"
        );
        assert_eq!(field(&event, "verdict"), verdict, "{event}");
        assert_eq!(field(&event, "rule"), rule, "{event}");
        assert_eq!(field(&event, "addr"), "127.0.0.1", "{event}");
        assert_eq!(field(&event, "protocol"), "tcp", "{event}");
    }

    let before = env.status();
    let programs = status_programs(&before);
    assert!(
        program_links(adopted_id).is_subset(&programs),
        "the programs are not attached to the adopted cgroup {adopted_id}: {before}"
    );
    assert!(
        program_links(inode(&env.cgroup_root)).is_subset(&programs),
        "the programs are not attached at the cgroup root: {before}"
    );
    // No session was opened: the adopted cgroup is the only guarded one.
    assert_eq!(status_count(&before, "guarded_cgroups"), 1, "{before}");

    // The same server, no longer adopting the cgroup (validation allows a server with neither
    // `command` nor `adopt_cgroup`: its sessions are started through the control socket).
    reload(
        &env,
        &daemon,
        json!({ "svc": { "egress": [rule("svc-api", "127.0.0.1/32", &[declared.port()], &["tcp"])] } }),
    );

    let after = env.status();
    let programs = status_programs(&after);
    let still: Vec<&String> = programs
        .iter()
        .filter(|p| p.ends_with(&format!("@{adopted_id}")))
        .collect();
    assert!(
        still.is_empty(),
        "programs still pinned for the released cgroup {adopted_id}: {still:?} ({after})"
    );
    assert!(
        program_links(inode(&env.cgroup_root)).is_subset(&programs),
        "releasing the adopted cgroup detached the programs at the cgroup root: {after}"
    );
    assert_eq!(
        status_count(&after, "guarded_cgroups"),
        0,
        "the released cgroup's guard entry is still there: {after}"
    );

    let mark = daemon.log.mark();
    assert_eq!(
        probe.result(&to_undeclared),
        "ok",
        "undeclared, after the cgroup was released"
    );
    undeclared.assert_reached_by(pid, &to_undeclared);
    assert_eq!(
        probe.result(&to_declared),
        "ok",
        "declared, after the cgroup was released"
    );

    // The server's rules still hold for its sessions; once that session's refusal is reported,
    // a report of the released process's attempts (made earlier) would be in too.
    let session = env.exec_probe("svc", Some("sess-after-release"), &[&to_undeclared]);
    session.assert_success();
    session.assert_results(&[(&to_undeclared, "EPERM")]);
    let (session_pid, _) = session.identity();
    daemon.wait_for_event("the session's refused connect", |e| {
        as_u64(field(e, "tgid")) == Some(session_pid)
    });
    let stray: Vec<String> = daemon.log.lines()[mark..]
        .iter()
        .filter(|l| message(l) == Some("egress") && as_u64(field(l, "tgid")) == Some(pid))
        .map(|l| l.to_string())
        .collect();
    assert!(
        stray.is_empty(),
        "events for the released cgroup's process:\n{}",
        stray.join("\n")
    );
}

/// A rule naming a host (`localhost`) is enforced as the addresses the name resolves to: the
/// declared port on 127.0.0.1 is reached and reported under the rule's name; another port on
/// the same address is refused.
#[test]
fn host_name_rules_resolve_to_addresses() {
    let allowed = Listener::tcp(LOCALHOST_V4);
    let other = Listener::tcp(LOCALHOST_V4);
    let env = TestEnv::new("host", PROBE);
    env.write_policy(json!({
        SERVER: { "egress": [
            { "id": "lh", "host": "localhost", "ports": [allowed.port()], "protocols": ["tcp"] },
            rule("dns", "127.0.0.53/32", &[53], &["udp"]),
        ] },
    }));
    let daemon = env.start_daemon();
    // The policy declares DNS (no "no rule allows DNS" warning) and localhost resolved (no
    // warning naming the host).
    let warnings: Vec<String> = daemon
        .log
        .lines()
        .iter()
        .filter(|l| {
            let text = message(l).unwrap_or_default().to_lowercase();
            l["level"] == "WARN"
                && (!field(l, "host").is_null() || text.contains("dns") || text.contains("resolve"))
        })
        .map(|l| l.to_string())
        .collect();
    assert!(
        warnings.is_empty(),
        "the daemon warned about DNS or host resolution:\n{}",
        warnings.join("\n")
    );

    let to_allowed = tcp(allowed.addr);
    let to_other = tcp(other.addr);
    let run = env.exec_probe(SERVER, Some("sess-host"), &[&to_allowed, &to_other]);
    run.assert_success();
    run.assert_results(&[(&to_allowed, "ok"), (&to_other, "EPERM")]);
    let (pid, cgroup_id) = run.identity();
    allowed.assert_reached_by(pid, &to_allowed);
    other.assert_not_reached_by(pid);

    for (port, verdict, rule) in [
        (allowed.port(), "allow", "web/egress/lh"),
        (other.port(), "refuse", "default-deny"),
    ] {
        let event = daemon.wait_for_event(&format!("the {verdict} to port {port}"), |e| {
            as_u64(field(e, "tgid")) == Some(pid)
                && as_u64(field(e, "port")) == Some(u64::from(port))
        });
        assert_eq!(field(&event, "verdict"), verdict, "{event}");
        assert_eq!(field(&event, "rule"), rule, "{event}");
        assert_eq!(field(&event, "addr"), "127.0.0.1", "{event}");
        assert_eq!(field(&event, "server"), SERVER, "{event}");
        assert_eq!(field(&event, "session"), "sess-host", "{event}");
        assert_eq!(
            as_u64(field(&event, "cgroup_id")),
            Some(cgroup_id),
            "{event}"
        );
    }
}

/// `/metrics` (parsed as Prometheus text by a real parser) counts the attempts by server,
/// verdict and protocol, exports the kernel's lost-event count, the guarded cgroups and allow
/// prefixes, and the build info; no label value carries an address, a port, a pid or a session.
#[test]
fn metrics_expose_egress_counters_and_kernel_losses() {
    let declared = Listener::tcp(LOCALHOST_V4);
    let declared_udp = Listener::udp(LOCALHOST_V4);
    let undeclared = Listener::tcp(LOCALHOST_V4);
    let undeclared6 = Listener::tcp(LOCALHOST_V6);
    let undeclared_udp = Listener::udp(LOCALHOST_V4);
    let env = TestEnv::new("metrics", PROBE);
    env.write_policy(server(
        SERVER,
        vec![
            rule("api", "127.0.0.1/32", &[declared.port()], &["tcp"]),
            rule("dgram", "127.0.0.1/32", &[declared_udp.port()], &["udp"]),
            rule("v6", "::1/128", &[1], &["tcp"]),
        ],
    ));
    // Distinct prefixes the policy declares: 127.0.0.1/32 and ::1/128.
    const DECLARED_PREFIXES: u64 = 2;
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_loopback_port()));
    let daemon = env.start_daemon_with(&["--metrics-listen", &metrics_addr.to_string()]);

    let session = "sess-metrics";
    let mut probe = env.interactive_probe(SERVER, Some(session));
    let (pid, _) = probe.identity();
    let allowed_tcp = vec![tcp(declared.addr); 3];
    let refused_tcp = vec![
        tcp(undeclared.addr),
        tcp(undeclared6.addr),
        tcp(undeclared.addr),
    ];
    let allowed_udp = vec![udp(declared_udp.addr); 2];
    let refused_udp = vec![udp(undeclared_udp.addr)];
    for (attempts, want) in [
        (&allowed_tcp, "ok"),
        (&refused_tcp, "EPERM"),
        (&allowed_udp, "ok"),
        (&refused_udp, "EPERM"),
    ] {
        for a in attempts {
            assert_eq!(probe.result(a), want, "{a}");
        }
    }
    let total = allowed_tcp.len() + refused_tcp.len() + allowed_udp.len() + refused_udp.len();
    let of_probe =
        |e: &Value| message(e) == Some("egress") && as_u64(field(e, "tgid")) == Some(pid);
    assert!(
        daemon.log.wait_until(TIMEOUT, |lines| {
            lines.iter().filter(|e| of_probe(e)).count() >= total
        }),
        "fewer than {total} egress events for pid {pid}: {:#?}",
        daemon.egress_events()
    );

    // The kernel gauges are refreshed by the daemon on its own schedule: scrape until they
    // show the live session and the allow-list (the timeout is only a safety net).
    let gauge = |scrape: &prometheus_parse::Scrape, name: &str| -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) => v,
                ref other => panic!("{name} is not a gauge: {other:?}"),
            })
    };
    let deadline = std::time::Instant::now() + TIMEOUT;
    let (text, scrape) = loop {
        let (status, text) = http_get(metrics_addr, "/metrics")
            .unwrap_or_else(|err| panic!("GET http://{metrics_addr}/metrics: {err}"));
        assert_eq!(status, 200, "GET /metrics answered {status}: {text}");
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("parse the metrics text");
        let ready = gauge(&scrape, "mcp_guard_egress_guarded_cgroups").is_some_and(|v| v >= 1.0)
            && gauge(&scrape, "mcp_guard_egress_allow_prefixes")
                .is_some_and(|v| v >= DECLARED_PREFIXES as f64);
        if ready || std::time::Instant::now() >= deadline {
            break (text, scrape);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };

    let sample = |name: &str, labels: &[(&str, &str)]| -> &prometheus_parse::Sample {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == name
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            })
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in /metrics:\n{text}"))
    };
    let counter = |name: &str, labels: &[(&str, &str)]| -> f64 {
        match sample(name, labels).value {
            prometheus_parse::Value::Counter(v) => v,
            ref other => panic!("{name}{labels:?} is not a counter: {other:?}\n{text}"),
        }
    };
    let attempts = "mcp_guard_egress_attempts_total";
    for (verdict, protocol, at_least) in [
        ("allow", "tcp", allowed_tcp.len()),
        ("refuse", "tcp", refused_tcp.len()),
        ("allow", "udp", allowed_udp.len()),
        ("refuse", "udp", refused_udp.len()),
    ] {
        let value = counter(
            attempts,
            &[
                ("server", SERVER),
                ("verdict", verdict),
                ("protocol", protocol),
            ],
        );
        assert!(
            value >= at_least as f64,
            "{attempts}{{server={SERVER},verdict={verdict},protocol={protocol}}} = {value}, \
             expected at least {at_least}:\n{text}"
        );
    }
    assert_eq!(
        counter("mcp_guard_egress_ringbuf_events_lost_total", &[]),
        0.0,
        "{text}"
    );
    let guarded = gauge(&scrape, "mcp_guard_egress_guarded_cgroups")
        .unwrap_or_else(|| panic!("no mcp_guard_egress_guarded_cgroups:\n{text}"));
    assert!(
        guarded >= 1.0,
        "guarded cgroups {guarded} with a session open:\n{text}"
    );
    let prefixes = gauge(&scrape, "mcp_guard_egress_allow_prefixes")
        .unwrap_or_else(|| panic!("no mcp_guard_egress_allow_prefixes:\n{text}"));
    assert!(
        prefixes >= DECLARED_PREFIXES as f64,
        "allow prefixes {prefixes}, the policy declares {DECLARED_PREFIXES}:\n{text}"
    );
    let build_info: Vec<&prometheus_parse::Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "mcp_guard_build_info")
        .collect();
    assert_eq!(build_info.len(), 1, "one build_info sample:\n{text}");
    let build_value = match build_info[0].value {
        prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("mcp_guard_build_info: {other:?}"),
    };
    assert_eq!(build_value, 1.0, "{text}");

    // Every metric is ours, and no label value is unbounded: no address, port, pid or session.
    let ports: Vec<String> = [
        &declared.addr,
        &declared_udp.addr,
        &undeclared.addr,
        &undeclared6.addr,
        &undeclared_udp.addr,
    ]
    .iter()
    .map(|a| a.port().to_string())
    .collect();
    let pid_text = pid.to_string();
    let mut unbounded = Vec::new();
    for s in &scrape.samples {
        assert!(
            s.metric.starts_with("mcp_guard_"),
            "metric {} lacks the mcp_guard_ prefix",
            s.metric
        );
        for (key, value) in s.labels.iter() {
            let looks_like_address = value.parse::<IpAddr>().is_ok()
                || value.parse::<SocketAddr>().is_ok()
                || value.contains("127.0.0.1")
                || value.contains("::1");
            let has_id = ports.iter().any(|p| value.contains(p.as_str()))
                || value.contains(&pid_text)
                || value.contains(session);
            if looks_like_address || has_id {
                unbounded.push(format!("{}{{{key}=\"{value}\"}}", s.metric));
            }
        }
    }
    assert!(
        unbounded.is_empty(),
        "label values carrying addresses, ports or ids: {unbounded:?}\n{text}"
    );
    let servers: HashSet<&str> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == attempts)
        .filter_map(|s| s.labels.get("server"))
        .collect();
    assert_eq!(
        servers,
        HashSet::from([SERVER]),
        "{attempts} has server labels outside the policy:\n{text}"
    );
}

/// Without the capabilities kernel enforcement needs, `mcp-guard run` stops with one line on
/// stderr naming what is missing and the way out (`--no-egress`); with `--no-egress` (as root)
/// it starts anyway and warns that kernel egress enforcement is off.
#[test]
fn without_privileges_the_daemon_stops_with_one_clear_line() {
    const NOBODY: u32 = 65534;
    let env = TestEnv::new("unpriv", PROBE);
    env.write_policy(server(
        SERVER,
        vec![rule("api", "127.0.0.1/32", &[80], &["tcp"])],
    ));

    // The unprivileged user needs to read the binary and the policy: copy both into a
    // directory it can traverse.
    let public = tempfile::Builder::new()
        .prefix("mcp-guard-test-unpriv.")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(public.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for dir in public.path().ancestors().skip(1) {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "{} is not traversable by other users (mode {mode:o}): set TMPDIR elsewhere",
            dir.display()
        );
    }
    let bin = public.path().join("mcp-guard");
    copy_executable(&env.daemon_bin, &bin);
    let policy = public.path().join("policy.json");
    std::fs::copy(&env.policy_path, &policy).expect("copy the policy");
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut cmd = Command::new(&bin);
    cmd.arg("run")
        .arg("--policy")
        .arg(&policy)
        .env("RUST_LOG", "info")
        .current_dir(public.path())
        .uid(NOBODY)
        .gid(NOBODY);
    let run = run_command(cmd, "mcp-guard run as uid 65534");
    assert!(
        !run.status.success(),
        "mcp-guard run without privileges exited {}; stderr:\n{}",
        run.status,
        run.stderr
    );
    let last = run
        .stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("mcp-guard run as nobody printed nothing on stderr"));
    assert!(
        last.starts_with("mcp-guard:"),
        "stderr's last line is not mcp-guard's one-line reason: {last:?}\n{}",
        run.stderr
    );
    for needed in ["CAP_BPF", "--no-egress"] {
        assert!(
            last.contains(needed),
            "the reason does not name {needed}: {last:?}"
        );
    }
    let reasons = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("mcp-guard:"))
        .count();
    assert_eq!(reasons, 1, "more than one reason line:\n{}", run.stderr);

    // As root with --no-egress: runs, and says loudly that nothing is enforced in the kernel.
    let daemon = env.start_daemon_with(&["--no-egress"]);
    let ready = daemon.wait_for_message("ready", TIMEOUT);
    assert_eq!(field(&ready, "egress"), false, "{ready}");
    let warning = daemon
        .log
        .lines()
        .into_iter()
        .find(|l| {
            l["level"] == "WARN"
                && message(l).is_some_and(|m| {
                    m.to_lowercase()
                        .contains("kernel egress enforcement is off")
                })
        })
        .unwrap_or_else(|| {
            panic!(
                "no WARN line saying kernel egress enforcement is off:\n{}",
                daemon.log.summary(20, 20)
            )
        });
    assert!(
        message(&warning).is_some_and(|m| m.contains("--no-egress")),
        "the warning does not say why: {warning}"
    );
    assert_eq!(
        env.status()["pinned"],
        false,
        "--no-egress pinned kernel programs"
    );
}

/// `mcp-guard egress status` reads the pins while a session runs: pinned, the four programs
/// attached at the cgroup root, at least the session's guarded cgroup, and at least the
/// policy's distinct prefixes in the allow-list.
#[test]
fn status_reports_guarded_cgroups_and_prefixes() {
    let declared = Listener::tcp(LOCALHOST_V4);
    let undeclared = Listener::tcp(LOCALHOST_V4);
    let env = TestEnv::new("status", PROBE);
    let rules = vec![
        rule("api", "127.0.0.1/32", &[declared.port()], &["tcp"]),
        rule("api6", "::1/128", &[declared.port()], &["tcp"]),
        rule("other", "127.0.0.2/32", &[443], &["tcp"]),
        rule("dns", "127.0.0.53/32", &[53], &["udp"]),
    ];
    let distinct_prefixes: HashSet<String> = rules
        .iter()
        .map(|r| r["cidr"].as_str().unwrap().to_string())
        .collect();
    env.write_policy(server(SERVER, rules));
    let _daemon = env.start_daemon();

    let mut probe = env.interactive_probe(SERVER, Some("sess-status"));
    assert_eq!(probe.result(&tcp(declared.addr)), "ok");
    assert_eq!(probe.result(&tcp(undeclared.addr)), "EPERM");

    let status = env.status();
    assert_eq!(status["pinned"], true, "{status}");
    let programs = status_programs(&status);
    assert_eq!(
        programs,
        program_links(inode(&env.cgroup_root)),
        "programs attached at the cgroup root {}: {status}",
        env.cgroup_root.display()
    );
    assert!(
        status_count(&status, "guarded_cgroups") >= 1,
        "a session is running: {status}"
    );
    assert!(
        status_count(&status, "allow_prefixes") >= distinct_prefixes.len() as u64,
        "the policy declares {} prefixes: {status}",
        distinct_prefixes.len()
    );
    assert_eq!(status_count(&status, "lost_events"), 0, "{status}");
}
