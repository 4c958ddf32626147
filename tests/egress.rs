//! Kernel egress enforcement, end to end: a real `mcp-guard run` daemon loads its eBPF programs
//! at a per-test cgroup root, `mcp-guard egress exec` places `egress-probe` in a guarded cgroup,
//! and the probe's connects and datagrams to loopback listeners are allowed or refused (EPERM)
//! as the policy declares.
//!
//! Root only; these tests fail (never skip) when the programs cannot be loaded.

use std::net::SocketAddr;

use mcp_guard_tests::*;
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_egress-probe");
const SERVER: &str = "web";

/// Loopback listeners the `web` server's policy declares, and as many it does not.
struct World {
    /// 127.0.0.1, TCP, rule `loopback`.
    tcp4: Listener,
    /// ::1, TCP, rule `v6`.
    tcp6: Listener,
    /// 127.0.0.1, UDP, rule `udp4`.
    udp4: Listener,
    /// ::1, UDP, rule `udp6`.
    udp6: Listener,
    undeclared_tcp4: Listener,
    undeclared_tcp6: Listener,
    undeclared_udp4: Listener,
    undeclared_udp6: Listener,
}

impl World {
    fn new() -> World {
        World {
            tcp4: Listener::tcp(LOCALHOST_V4),
            tcp6: Listener::tcp(LOCALHOST_V6),
            udp4: Listener::udp(LOCALHOST_V4),
            udp6: Listener::udp(LOCALHOST_V6),
            undeclared_tcp4: Listener::tcp(LOCALHOST_V4),
            undeclared_tcp6: Listener::tcp(LOCALHOST_V6),
            undeclared_udp4: Listener::udp(LOCALHOST_V4),
            undeclared_udp6: Listener::udp(LOCALHOST_V6),
        }
    }

    fn rules(&self) -> Vec<Value> {
        vec![
            rule("loopback", "127.0.0.1/32", &[self.tcp4.port()], &["tcp"]),
            rule("v6", "::1/128", &[self.tcp6.port()], &["tcp"]),
            rule("udp4", "127.0.0.1/32", &[self.udp4.port()], &["udp"]),
            rule("udp6", "::1/128", &[self.udp6.port()], &["udp"]),
        ]
    }

    /// The policy without the rule `id`.
    fn rules_without(&self, id: &str) -> Vec<Value> {
        self.rules().into_iter().filter(|r| r["id"] != id).collect()
    }
}

fn tcp(addr: SocketAddr) -> String {
    attempt("tcp", addr)
}
fn udp(addr: SocketAddr) -> String {
    attempt("udp", addr)
}
fn udpc(addr: SocketAddr) -> String {
    attempt("udpc", addr)
}

/// A test environment with the world's policy written and the daemon ready.
fn start(tag: &str, world: &World) -> (TestEnv, Daemon) {
    let env = TestEnv::new(tag, PROBE);
    env.write_policy(server(SERVER, world.rules()));
    let daemon = env.start_daemon();
    (env, daemon)
}

/// The probe ran inside this test's cgroup subtree (`/<cgroup root name>/...`).
fn assert_guarded(env: &TestEnv, line: &Value) {
    let cgroup = line["cgroup"].as_str().unwrap_or_default();
    assert!(
        cgroup.starts_with(&format!("/{}/", env.name)),
        "the probe is not in a cgroup under {}: {line}",
        env.cgroup_root.display()
    );
    let (_, cgroup_id) = identity(line);
    assert_ne!(
        cgroup_id,
        own_cgroup_id(),
        "the guarded probe shares the test's cgroup"
    );
}

/// The cgroup id of the test process (unguarded).
fn own_cgroup_id() -> u64 {
    use std::os::unix::fs::MetadataExt;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("cgroup v2 line");
    let dir = cgroup2_mount().join(path.trim_start_matches('/'));
    std::fs::metadata(dir).unwrap().ino()
}

/// "policy reload refused" (the daemon may add an explanation after it).
fn is_reload_refusal(line: &Value) -> bool {
    message(line).is_some_and(|m| m.starts_with("policy reload refused"))
}

fn is_reload_outcome(line: &Value) -> bool {
    message(line) == Some("policy reloaded") || is_reload_refusal(line)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------------------------------------

/// (a) A guarded child reaches every declared loopback destination (TCP v4/v6, unconnected UDP
/// v4/v6, connected UDP), and each listener really received the probe's token.
#[test]
fn guarded_child_reaches_declared_destinations() {
    let world = World::new();
    let (env, _daemon) = start("reach", &world);

    let attempts = vec![
        tcp(world.tcp4.addr),
        tcp(world.tcp6.addr),
        udp(world.udp4.addr),
        udp(world.udp6.addr),
        udpc(world.udp4.addr),
    ];
    let run = env.exec_probe(SERVER, Some("sess-reach"), &strs(&attempts));
    run.assert_success();
    assert_guarded(&env, &run.lines[0]);
    let expected: Vec<(&str, &str)> = attempts.iter().map(|a| (a.as_str(), "ok")).collect();
    run.assert_results(&expected);

    let (pid, _) = run.identity();
    world.tcp4.assert_reached_by(pid, &attempts[0]);
    world.tcp6.assert_reached_by(pid, &attempts[1]);
    world.udp4.assert_reached_by(pid, &attempts[2]);
    world.udp6.assert_reached_by(pid, &attempts[3]);
    world.udp4.assert_reached_by(pid, &attempts[4]);
}

/// (b) Undeclared destinations are refused with EPERM: TCP v4, TCP v6, a v4-mapped IPv6 address
/// whose port is not declared for IPv4, UDP v4/v6 datagrams (sendmsg hooks), connected UDP, and
/// TCP to a port declared only for UDP. A v4-mapped connect to the declared IPv4 port succeeds:
/// the connect6 hook judges `::ffff:127.0.0.1` as 127.0.0.1.
#[test]
fn undeclared_destinations_are_refused_with_eperm() {
    let world = World::new();
    let (env, _daemon) = start("refuse", &world);

    let tcp_to_udp_only_port = tcp(SocketAddr::new(LOCALHOST_V4, world.udp4.port()));
    let refused = vec![
        tcp(world.undeclared_tcp4.addr),
        tcp(world.undeclared_tcp6.addr),
        tcp(v4_mapped(world.undeclared_tcp4.addr)),
        udp(world.undeclared_udp4.addr),
        udp(world.undeclared_udp6.addr),
        udpc(world.undeclared_udp4.addr),
        tcp_to_udp_only_port,
    ];
    let mapped_declared = tcp(v4_mapped(world.tcp4.addr));
    let declared = tcp(world.tcp4.addr);

    let mut attempts = refused.clone();
    attempts.push(mapped_declared.clone());
    attempts.push(declared.clone());
    let run = env.exec_probe(SERVER, Some("sess-refuse"), &strs(&attempts));
    run.assert_success();
    assert_guarded(&env, &run.lines[0]);

    let mut expected: Vec<(&str, &str)> = refused.iter().map(|a| (a.as_str(), "EPERM")).collect();
    expected.push((&mapped_declared, "ok"));
    expected.push((&declared, "ok"));
    run.assert_results(&expected);

    let (pid, _) = run.identity();
    world.tcp4.assert_reached_by(pid, &mapped_declared);
    world.tcp4.assert_reached_by(pid, &declared);
    for listener in [
        &world.undeclared_tcp4,
        &world.undeclared_tcp6,
        &world.undeclared_udp4,
        &world.undeclared_udp6,
    ] {
        listener.assert_not_reached_by(pid);
    }
}

/// (c) Processes outside the guarded cgroups are untouched while the programs are attached: the
/// test process itself and an unguarded probe reach the destinations a guarded one may not, and
/// the daemon reports no event for them.
#[test]
fn unguarded_process_is_unaffected() {
    let world = World::new();
    let (env, daemon) = start("unguarded", &world);

    // The test process itself.
    let me = format!("unguarded test pid={}", std::process::id());
    let targets = [
        (true, world.undeclared_tcp4.addr, &world.undeclared_tcp4),
        (true, world.undeclared_tcp6.addr, &world.undeclared_tcp6),
        (
            true,
            v4_mapped(world.undeclared_tcp4.addr),
            &world.undeclared_tcp4,
        ),
        (false, world.undeclared_udp4.addr, &world.undeclared_udp4),
        (false, world.undeclared_udp6.addr, &world.undeclared_udp6),
    ];
    for (is_tcp, dest, listener) in targets {
        let payload = format!("{me} dest={dest}");
        send_unguarded(is_tcp, dest, &payload)
            .unwrap_or_else(|err| panic!("unguarded send to {dest} failed: {err}"));
        assert!(
            listener.wait_for(&payload),
            "{dest} never received the unguarded {payload:?}; got {:?}",
            listener.received()
        );
    }

    // The same probe binary, outside the guarded subtree.
    let attempts = vec![
        tcp(world.undeclared_tcp4.addr),
        tcp(world.undeclared_tcp6.addr),
        tcp(v4_mapped(world.undeclared_tcp4.addr)),
        udp(world.undeclared_udp4.addr),
        udp(world.undeclared_udp6.addr),
        udpc(world.undeclared_udp4.addr),
    ];
    let run = env.unguarded_probe(&strs(&attempts));
    run.assert_success();
    let expected: Vec<(&str, &str)> = attempts.iter().map(|a| (a.as_str(), "ok")).collect();
    run.assert_results(&expected);
    let (unguarded_pid, unguarded_cgroup) = run.identity();
    assert_eq!(unguarded_cgroup, own_cgroup_id());
    world
        .undeclared_tcp4
        .assert_reached_by(unguarded_pid, &attempts[0]);
    world
        .undeclared_tcp6
        .assert_reached_by(unguarded_pid, &attempts[1]);
    world
        .undeclared_udp4
        .assert_reached_by(unguarded_pid, &attempts[3]);
    world
        .undeclared_udp6
        .assert_reached_by(unguarded_pid, &attempts[4]);

    // A guarded attempt afterwards: once its event is in, any event for the unguarded attempts
    // (made earlier, on the same ring buffer) would be too.
    let guarded_attempt = tcp(world.undeclared_tcp4.addr);
    let guarded = env.exec_probe(SERVER, Some("sess-unguarded"), &[&guarded_attempt]);
    guarded.assert_results(&[(&guarded_attempt, "EPERM")]);
    let (guarded_pid, _) = guarded.identity();
    daemon.wait_for_event("the guarded probe's refused connect", |e| {
        as_u64(field(e, "tgid")) == Some(guarded_pid)
    });
    let me = u64::from(std::process::id());
    let stray: Vec<String> = daemon
        .egress_events()
        .iter()
        .filter(|e| [Some(me), Some(unguarded_pid)].contains(&as_u64(field(e, "tgid"))))
        .map(|e| e.to_string())
        .collect();
    assert!(
        stray.is_empty(),
        "events for unguarded processes:\n{}",
        stray.join("\n")
    );
}

/// One attempt and the event it must produce.
struct ExpectedEvent {
    attempt: String,
    hook: &'static str,
    family: Option<&'static str>,
    protocol: &'static str,
    addr: &'static str,
    port: u16,
    verdict: &'static str,
    rule: &'static str,
}

/// (d) Every attempt from the guarded probe is reported with the probe's cgroup id (which is
/// the guarded cgroup here), its tgid/tid/comm, the server and session it was started for, the
/// hook, family, protocol, destination (a v4-mapped one as the IPv4 dotted quad), the verdict
/// and the rule that decided it.
#[test]
fn events_carry_cgroup_id_tgid_and_verdicts() {
    let world = World::new();
    let (env, daemon) = start("events", &world);
    let session = "sess-events";

    let ev =
        |attempt: String, hook, family, protocol, addr, port, verdict, rule| -> ExpectedEvent {
            ExpectedEvent {
                attempt,
                hook,
                family,
                protocol,
                addr,
                port,
                verdict,
                rule,
            }
        };
    let expected = vec![
        ev(
            tcp(world.tcp4.addr),
            "connect4",
            Some("ipv4"),
            "tcp",
            "127.0.0.1",
            world.tcp4.port(),
            "allow",
            "web/egress/loopback",
        ),
        ev(
            tcp(world.undeclared_tcp4.addr),
            "connect4",
            Some("ipv4"),
            "tcp",
            "127.0.0.1",
            world.undeclared_tcp4.port(),
            "refuse",
            "default-deny",
        ),
        ev(
            tcp(world.tcp6.addr),
            "connect6",
            Some("ipv6"),
            "tcp",
            "::1",
            world.tcp6.port(),
            "allow",
            "web/egress/v6",
        ),
        ev(
            tcp(world.undeclared_tcp6.addr),
            "connect6",
            Some("ipv6"),
            "tcp",
            "::1",
            world.undeclared_tcp6.port(),
            "refuse",
            "default-deny",
        ),
        // A v4-mapped destination arrives through connect6 and is judged (and shown) as IPv4.
        ev(
            tcp(v4_mapped(world.tcp4.addr)),
            "connect6",
            None,
            "tcp",
            "127.0.0.1",
            world.tcp4.port(),
            "allow",
            "web/egress/loopback",
        ),
        ev(
            tcp(v4_mapped(world.undeclared_tcp4.addr)),
            "connect6",
            None,
            "tcp",
            "127.0.0.1",
            world.undeclared_tcp4.port(),
            "refuse",
            "default-deny",
        ),
        ev(
            udp(world.udp4.addr),
            "sendmsg4",
            Some("ipv4"),
            "udp",
            "127.0.0.1",
            world.udp4.port(),
            "allow",
            "web/egress/udp4",
        ),
        ev(
            udp(world.undeclared_udp6.addr),
            "sendmsg6",
            Some("ipv6"),
            "udp",
            "::1",
            world.undeclared_udp6.port(),
            "refuse",
            "default-deny",
        ),
        ev(
            udp(world.udp6.addr),
            "sendmsg6",
            Some("ipv6"),
            "udp",
            "::1",
            world.udp6.port(),
            "allow",
            "web/egress/udp6",
        ),
        ev(
            udpc(world.undeclared_udp4.addr),
            "connect4",
            Some("ipv4"),
            "udp",
            "127.0.0.1",
            world.undeclared_udp4.port(),
            "refuse",
            "default-deny",
        ),
    ];

    // The probe stays alive while its events are checked: attribution of a process that has
    // already exited is the next test's subject.
    let mut probe = env.interactive_probe(SERVER, Some(session));
    assert_guarded(&env, &probe.ready);
    let (pid, cgroup_id) = probe.identity();
    let mut wrong_results = Vec::new();
    for want in &expected {
        let line = probe.attempt(&want.attempt);
        let result = if want.verdict == "allow" {
            "ok"
        } else {
            "EPERM"
        };
        if line["result"] != result {
            wrong_results.push(format!("  {}: expected {result}, got {line}", want.attempt));
        }
    }
    assert!(
        wrong_results.is_empty(),
        "unexpected results:\n{}",
        wrong_results.join("\n")
    );

    let mut wrong = Vec::new();
    for want in &expected {
        let event = daemon.wait_for_event(&want.attempt, |e| {
            as_u64(field(e, "tgid")) == Some(pid)
                && field(e, "hook") == want.hook
                && as_u64(field(e, "port")) == Some(u64::from(want.port))
                && field(e, "protocol") == want.protocol
        });
        let mut check = |name: &str, ok: bool, want_text: String| {
            if !ok {
                wrong.push(format!(
                    "  {}: {name} expected {want_text}, event {event}",
                    want.attempt
                ));
            }
        };
        check(
            "cgroup_id",
            as_u64(field(&event, "cgroup_id")) == Some(cgroup_id),
            cgroup_id.to_string(),
        );
        check(
            "guarded_cgroup_id",
            as_u64(field(&event, "guarded_cgroup_id")) == Some(cgroup_id),
            cgroup_id.to_string(),
        );
        check(
            "tid",
            as_u64(field(&event, "tid")) == Some(pid),
            pid.to_string(),
        );
        check(
            "comm",
            field(&event, "comm") == "egress-probe",
            "egress-probe".into(),
        );
        check("server", field(&event, "server") == SERVER, SERVER.into());
        check(
            "session",
            field(&event, "session") == session,
            session.into(),
        );
        if let Some(family) = want.family {
            check("family", field(&event, "family") == family, family.into());
        }
        check("addr", field(&event, "addr") == want.addr, want.addr.into());
        check(
            "verdict",
            field(&event, "verdict") == want.verdict,
            want.verdict.into(),
        );
        check("rule", field(&event, "rule") == want.rule, want.rule.into());
    }
    assert!(
        wrong.is_empty(),
        "egress events with wrong fields:\n{}",
        wrong.join("\n")
    );
}

/// The events of a process that exits (and whose session therefore ends) right after its
/// attempts are still attributed to its server and session: the daemon reads the ring buffer
/// asynchronously, so it must not forget a session's owner before its events are read.
#[test]
fn events_of_an_exited_process_keep_their_server_and_session() {
    let world = World::new();
    let (env, daemon) = start("exited", &world);
    let session = "sess-exited";
    const ROUNDS: usize = 20;
    let declared = tcp(world.tcp4.addr);
    let undeclared = tcp(world.undeclared_tcp4.addr);
    let mut attempts = Vec::new();
    for _ in 0..ROUNDS {
        attempts.push(declared.clone());
        attempts.push(undeclared.clone());
    }
    let run = env.exec_probe(SERVER, Some(session), &strs(&attempts));
    run.assert_success();
    let (pid, cgroup_id) = run.identity();
    assert_eq!(run.lines.len(), attempts.len(), "one line per attempt");
    for line in &run.lines {
        let want = if line["attempt"] == declared.as_str() {
            "ok"
        } else {
            "EPERM"
        };
        assert_eq!(line["result"], want, "{line}");
    }

    // Every attempt is reported; wait for all of them, then look at them.
    let of_probe =
        |e: &Value| message(e) == Some("egress") && as_u64(field(e, "tgid")) == Some(pid);
    let all_in = daemon.log.wait_until(TIMEOUT, |lines| {
        lines.iter().filter(|e| of_probe(e)).count() >= attempts.len()
    });
    assert!(
        all_in,
        "fewer than {} egress events for pid {pid}: {:#?}",
        attempts.len(),
        daemon.egress_events()
    );
    let events: Vec<Value> = daemon
        .egress_events()
        .into_iter()
        .filter(|e| as_u64(field(e, "tgid")) == Some(pid))
        .collect();
    let unattributed: Vec<String> = events
        .iter()
        .filter(|e| field(e, "server") != SERVER || field(e, "session") != session)
        .map(|e| e.to_string())
        .collect();
    assert!(
        unattributed.is_empty(),
        "{} of {} events of the exited probe lost their server/session:\n{}",
        unattributed.len(),
        events.len(),
        unattributed.join("\n")
    );
    for event in &events {
        assert_eq!(
            as_u64(field(event, "cgroup_id")),
            Some(cgroup_id),
            "{event}"
        );
    }
}

/// (e) A policy reload that removes a destination takes effect for new connects: from a process
/// already running in the guarded cgroup and from a freshly exec'd one, while the destinations
/// still declared stay reachable.
#[test]
fn policy_reload_removing_a_destination_refuses_new_connects() {
    let world = World::new();
    let (env, daemon) = start("reload", &world);
    let removed = tcp(world.tcp4.addr);
    let kept = tcp(world.tcp6.addr);

    let mut running = env.interactive_probe(SERVER, Some("sess-reload"));
    assert_guarded(&env, &running.ready);
    assert_eq!(running.result(&removed), "ok", "before the reload");
    assert_eq!(running.result(&kept), "ok", "before the reload");

    // Marked before the write: the daemon may also notice the changed file on its own.
    let mark = daemon.log.mark();
    env.write_policy(server(SERVER, world.rules_without("loopback")));
    daemon.sighup();
    let outcome = daemon.wait_for_since(mark, TIMEOUT, "the reload's outcome", |l| {
        is_reload_outcome(l)
    });
    assert_eq!(
        message(&outcome),
        Some("policy reloaded"),
        "reload refused: {outcome}"
    );
    // Whatever triggered it (the SIGHUP or the daemon watching the file), no later reload may
    // have been refused either.
    assert!(
        !daemon.log.lines()[mark..].iter().any(is_reload_refusal),
        "a reload was refused: {}",
        daemon.log.summary(10, 10)
    );

    let (pid, _) = running.identity();
    assert_eq!(
        running.result(&removed),
        "EPERM",
        "running process after the reload"
    );
    assert_eq!(
        running.result(&kept),
        "ok",
        "running process after the reload"
    );
    let event = daemon.wait_for_event("the refused connect after the reload", |e| {
        as_u64(field(e, "tgid")) == Some(pid)
            && as_u64(field(e, "port")) == Some(u64::from(world.tcp4.port()))
            && field(e, "verdict") == "refuse"
    });
    assert_eq!(field(&event, "rule"), "default-deny", "{event}");

    let fresh = env.exec_probe(SERVER, Some("sess-reload-2"), &[&removed, &kept]);
    fresh.assert_success();
    fresh.assert_results(&[(&removed, "EPERM"), (&kept, "ok")]);
}

/// A reload with an invalid policy is refused and the previous policy stays in force.
#[test]
fn invalid_policy_reload_is_refused_and_previous_policy_stays() {
    let world = World::new();
    let (env, daemon) = start("badreload", &world);
    let declared = tcp(world.tcp4.addr);
    let undeclared = tcp(world.undeclared_tcp4.addr);

    // A rule with neither cidr nor host is invalid.
    let broken = serde_json::json!([{ "id": "broken", "ports": [1], "protocols": ["tcp"] }]);
    let mark = daemon.log.mark();
    env.write_policy(serde_json::json!({ SERVER: { "egress": broken } }));
    daemon.sighup();
    let outcome = daemon.wait_for_since(mark, TIMEOUT, "the reload's outcome", |l| {
        is_reload_outcome(l)
    });
    assert!(
        is_reload_refusal(&outcome),
        "an invalid policy was accepted: {outcome}"
    );
    assert!(
        !field(&outcome, "error").is_null(),
        "the refusal names no error: {outcome}"
    );

    let run = env.exec_probe(SERVER, Some("sess-badreload"), &[&declared, &undeclared]);
    run.assert_success();
    run.assert_results(&[(&declared, "ok"), (&undeclared, "EPERM")]);
}

/// A valid policy the kernel side cannot install is refused as a whole: here it widens the
/// server's allow-list to the undeclared listener and adopts a cgroup that does not exist. The
/// reload is refused, and a session started after it is still refused the undeclared
/// destination (the new allow-list never came into force for anyone).
#[test]
fn a_reload_whose_cgroup_to_adopt_is_missing_leaves_the_allow_lists_as_they_were() {
    let world = World::new();
    let (env, daemon) = start("badadopt", &world);
    let declared = tcp(world.tcp4.addr);
    let undeclared = tcp(world.undeclared_tcp4.addr);

    let mut widened = world.rules();
    let port = world.undeclared_tcp4.addr.port();
    widened.push(rule("widened", "127.0.0.1/32", &[port], &["tcp"]));
    let missing = env
        .cgroup_root
        .with_file_name(format!("{}-missing", env.name));
    let mut document = server(SERVER, widened);
    document["adopted"] = serde_json::json!({ "adopt_cgroup": missing, "egress": [] });
    let mark = daemon.log.mark();
    env.write_policy(document);
    daemon.sighup();
    let outcome = daemon.wait_for_since(mark, TIMEOUT, "the reload's outcome", |l| {
        is_reload_outcome(l)
    });
    assert!(
        is_reload_refusal(&outcome),
        "a policy adopting a missing cgroup was accepted: {outcome}"
    );

    let run = env.exec_probe(SERVER, Some("sess-badadopt"), &[&declared, &undeclared]);
    run.assert_success();
    run.assert_results(&[(&declared, "ok"), (&undeclared, "EPERM")]);
}

/// (f) Killing the daemon (SIGKILL) leaves the pinned programs enforcing: a probe already in
/// its guarded cgroup is still refused undeclared destinations and still reaches declared ones;
/// `egress status` shows the pins; a new daemon on the same directories re-uses the pinned
/// programs, keeps the running probe confined, confines a fresh exec and reports its events.
#[test]
fn killed_daemon_leaves_pins_enforcing_and_a_new_daemon_reuses_them() {
    let world = World::new();
    let (env, mut daemon) = start("restart", &world);
    let declared = tcp(world.tcp4.addr);
    let undeclared = vec![
        tcp(world.undeclared_tcp4.addr),
        tcp(world.undeclared_tcp6.addr),
        tcp(v4_mapped(world.undeclared_tcp4.addr)),
        udp(world.undeclared_udp4.addr),
        udp(world.undeclared_udp6.addr),
    ];

    let mut running = env.interactive_probe(SERVER, Some("sess-restart"));
    assert_guarded(&env, &running.ready);
    let (pid, _) = running.identity();
    assert_eq!(running.result(&declared), "ok", "with the daemon up");
    assert_eq!(
        running.result(&undeclared[0]),
        "EPERM",
        "with the daemon up"
    );

    let status = daemon.kill9();
    assert!(!status.success(), "the daemon was killed: {status}");

    for attempt in &undeclared {
        assert_eq!(
            running.result(attempt),
            "EPERM",
            "{attempt} with the daemon dead"
        );
    }
    assert_eq!(running.result(&declared), "ok", "with the daemon dead");
    world.tcp4.assert_reached_by(pid, &declared);

    let pins = env.status();
    assert_eq!(
        pins["pinned"], true,
        "egress status with the daemon dead: {pins}"
    );
    assert!(
        pins["programs"].as_array().is_some_and(|p| !p.is_empty()),
        "egress status lists no programs: {pins}"
    );

    let second = env.spawn_daemon();
    second.wait_for_message("reusing pinned programs", TIMEOUT);
    second.wait_for_message("ready", TIMEOUT);

    for attempt in &undeclared {
        assert_eq!(
            running.result(attempt),
            "EPERM",
            "{attempt} from the old probe under the new daemon"
        );
    }
    assert_eq!(
        running.result(&declared),
        "ok",
        "old probe under the new daemon"
    );

    let mut attempts = undeclared.clone();
    attempts.push(declared.clone());
    let fresh = env.exec_probe(SERVER, Some("sess-restart-2"), &strs(&attempts));
    fresh.assert_success();
    assert_guarded(&env, &fresh.lines[0]);
    let mut expected: Vec<(&str, &str)> =
        undeclared.iter().map(|a| (a.as_str(), "EPERM")).collect();
    expected.push((&declared, "ok"));
    fresh.assert_results(&expected);

    let (fresh_pid, fresh_cgroup) = fresh.identity();
    let event = second.wait_for_event("the fresh probe's refused connect", |e| {
        as_u64(field(e, "tgid")) == Some(fresh_pid)
            && as_u64(field(e, "port")) == Some(u64::from(world.undeclared_tcp4.port()))
            && field(e, "hook") == "connect4"
    });
    assert_eq!(field(&event, "verdict"), "refuse", "{event}");
    assert_eq!(
        as_u64(field(&event, "cgroup_id")),
        Some(fresh_cgroup),
        "{event}"
    );
}

/// (g) A child the probe forks, which then execs the probe again, stays in the guarded cgroup
/// and is confined the same way; its events carry its own tgid and the same cgroup id.
#[test]
fn forked_and_execed_child_stays_confined() {
    let world = World::new();
    let (env, daemon) = start("fork", &world);
    let undeclared = tcp(world.undeclared_tcp4.addr);
    let undeclared_udp = udp(world.undeclared_udp6.addr);
    let declared = tcp(world.tcp4.addr);

    let run = env.exec_probe(
        SERVER,
        Some("sess-fork"),
        &["--fork-exec", &undeclared, &undeclared_udp, &declared],
    );
    run.assert_success();
    let parent = run.role("parent");
    assert_guarded(&env, parent);
    let (parent_pid, parent_cgroup) = identity(parent);
    let (child_pid, child_cgroup) = identity(run.line(&undeclared));
    assert_ne!(
        child_pid, parent_pid,
        "the attempts came from the forked child"
    );
    assert_eq!(
        child_cgroup, parent_cgroup,
        "the forked child left the guarded cgroup"
    );
    for line in run.lines.iter().filter(|l| l["role"] == "attempt") {
        assert_eq!(identity(line), (child_pid, child_cgroup), "{line}");
    }
    run.assert_results(&[
        (&undeclared, "EPERM"),
        (&undeclared_udp, "EPERM"),
        (&declared, "ok"),
    ]);
    world.tcp4.assert_reached_by(child_pid, &declared);
    world.undeclared_tcp4.assert_not_reached_by(child_pid);

    let event = daemon.wait_for_event("the forked child's refused connect", |e| {
        as_u64(field(e, "tgid")) == Some(child_pid)
            && as_u64(field(e, "port")) == Some(u64::from(world.undeclared_tcp4.port()))
    });
    assert_eq!(field(&event, "verdict"), "refuse", "{event}");
    assert_eq!(
        as_u64(field(&event, "cgroup_id")),
        Some(parent_cgroup),
        "{event}"
    );
    assert_eq!(field(&event, "comm"), "egress-probe", "{event}");
}

/// (h) `mcp-guard egress teardown` removes the pin directory and the cgroup subtree (after the
/// daemon was killed, so the pins were still there).
#[test]
fn teardown_removes_pins_and_cgroups() {
    let world = World::new();
    let (env, mut daemon) = start("teardown", &world);
    let undeclared = tcp(world.undeclared_tcp4.addr);
    let run = env.exec_probe(SERVER, Some("sess-teardown"), &[&undeclared]);
    run.assert_results(&[(&undeclared, "EPERM")]);

    daemon.kill9();
    assert!(
        env.bpffs.is_dir(),
        "{} missing before teardown",
        env.bpffs.display()
    );
    assert!(
        std::fs::read_dir(&env.bpffs).unwrap().next().is_some(),
        "{} is empty before teardown",
        env.bpffs.display()
    );
    assert!(
        env.cgroup_root.is_dir(),
        "{} missing before teardown",
        env.cgroup_root.display()
    );
    assert_eq!(env.status()["pinned"], true);

    let out = env.teardown();
    assert!(
        out.status.success(),
        "mcp-guard egress teardown failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !env.bpffs.exists(),
        "teardown left the pin directory {}",
        env.bpffs.display()
    );
    assert!(
        !env.cgroup_root.exists(),
        "teardown left the cgroup root {}",
        env.cgroup_root.display()
    );
}

/// (h) A daemon finding pinned programs that differ from its own (an earlier version's)
/// replaces them: here one pinned link of the guarded root is swapped, with the daemon down,
/// for a link to a one-instruction program that allows every connect, as an older build that
/// let everything through would. Meanwhile the running probe's undeclared connect goes
/// through; the next daemon says it replaced pinned programs, the older program is gone from
/// the kernel, and the same probe is refused again.
#[test]
fn a_new_daemon_replaces_the_pinned_programs_of_an_earlier_version() {
    let world = World::new();
    let (env, mut daemon) = start("replace", &world);
    let undeclared = tcp(world.undeclared_tcp4.addr);
    let mut running = env.interactive_probe(SERVER, Some("sess-replace"));
    assert_guarded(&env, &running.ready);
    assert_eq!(running.result(&undeclared), "EPERM", "with our programs");
    let status = daemon.kill9();
    assert!(!status.success(), "the daemon was killed: {status}");

    let pin = connect4_link_pin(&env);
    let older = raw_bpf::allow_all_connect4();
    let cgroup = std::fs::File::open(&env.cgroup_root).expect("open the cgroup root");
    let link = raw_bpf::link_create(&older, &cgroup);
    std::fs::remove_file(&pin).expect("remove the pinned connect4 link");
    raw_bpf::pin(&link, &pin);
    let older_id = raw_bpf::prog_id(&older);
    // The pin now holds the only reference to the older program.
    drop((older, link));
    // Unpinning a link only schedules its release on a kernel workqueue: until that has run,
    // the replaced link of our program stays attached beside the older one and still refuses.
    let mut last = String::new();
    assert!(
        poll_until(TIMEOUT, || {
            last = running.result(&undeclared);
            last == "ok"
        }),
        "the older program lets every connect through: still {last}"
    );

    let second = env.spawn_daemon();
    second.wait_for_message("replaced pinned programs of an earlier version", TIMEOUT);
    second.wait_for_message("ready", TIMEOUT);
    assert!(
        poll_until(TIMEOUT, || !raw_bpf::prog_exists(older_id)),
        "the older program (id {older_id}) is still loaded"
    );
    assert_eq!(
        running.result(&undeclared),
        "EPERM",
        "the same probe under the new daemon"
    );
}

/// The pinned link of the connect4 program on the test's guarded root.
fn connect4_link_pin(env: &TestEnv) -> std::path::PathBuf {
    let links = env.bpffs.join("links");
    std::fs::read_dir(&links)
        .expect("the links directory")
        .map(|entry| entry.unwrap().path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("connect4@"))
        })
        .unwrap_or_else(|| panic!("no connect4 link pinned in {}", links.display()))
}

/// Just enough of bpf(2) to stand in for an earlier build's program: load a cgroup connect4
/// program, link it to a cgroup, pin the link, and look programs up by id.
mod raw_bpf {
    use std::ffi::CString;
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;

    fn bpf<T>(command: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
        // SAFETY: `attr` is a zero-padded bpf_attr prefix for `command`, valid for the call.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                command,
                attr as *mut T as *mut libc::c_void,
                std::mem::size_of::<T>() as libc::c_uint,
            )
        };
        if result < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(result)
        }
    }

    fn owned(fd: libc::c_long) -> OwnedFd {
        // SAFETY: a file descriptor bpf(2) just returned, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }

    /// `r0 = 1; exit`: allow.
    pub fn allow_all_connect4() -> OwnedFd {
        let insns: [u64; 2] = [
            // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 1 (little-endian layout).
            0xb7 | (1u64 << 32),
            // BPF_JMP | BPF_EXIT.
            0x95,
        ];
        let license = CString::new("GPL").unwrap();
        let mut attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            expected_attach_type: BPF_CGROUP_INET4_CONNECT,
            ..ProgLoad::default()
        };
        attr.prog_name[..7].copy_from_slice(b"older_c");
        owned(bpf(BPF_PROG_LOAD, &mut attr).expect("load the stand-in program"))
    }

    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        rest: [u64; 4],
    }

    pub fn link_create(program: &OwnedFd, cgroup: &File) -> OwnedFd {
        let mut attr = LinkCreate {
            prog_fd: program.as_raw_fd() as u32,
            target_fd: cgroup.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_INET4_CONNECT,
            flags: 0,
            rest: [0; 4],
        };
        owned(bpf(BPF_LINK_CREATE, &mut attr).expect("link the stand-in program"))
    }

    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }

    pub fn pin(link: &OwnedFd, path: &Path) {
        let path = CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut attr = ObjPin {
            pathname: path.as_ptr() as u64,
            bpf_fd: link.as_raw_fd() as u32,
            file_flags: 0,
        };
        bpf(BPF_OBJ_PIN, &mut attr).expect("pin the stand-in link");
    }

    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }

    pub fn prog_id(program: &OwnedFd) -> u32 {
        // bpf_prog_info starts with `type` and `id`; the rest stays zero.
        let mut info = [0u32; 64];
        let mut attr = InfoByFd {
            bpf_fd: program.as_raw_fd() as u32,
            info_len: std::mem::size_of_val(&info) as u32,
            info: info.as_mut_ptr() as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).expect("read the stand-in program's id");
        info[1]
    }

    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }

    /// Whether a program with this id is still loaded.
    pub fn prog_exists(id: u32) -> bool {
        let mut attr = GetFdById {
            id,
            next_id: 0,
            open_flags: 0,
        };
        match bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) {
            Ok(fd) => {
                drop(owned(fd));
                true
            }
            Err(error) => error.raw_os_error() != Some(libc::ENOENT),
        }
    }
}
