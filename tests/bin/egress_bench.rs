//! `cargo xtask bench egress`: what the egress hooks add to `connect()` on loopback, and how
//! many events per second the ring buffer carries without loss.
//!
//! Latency: this process moves itself between three cgroups in interleaved rounds (so drift
//! and noise hit every configuration alike): an unguarded cgroup outside mcp-guard's subtree
//! (no program runs), and two guarded session cgroups whose servers have allow-lists of 10 and
//! of 10,000 prefixes. Each sample times one `connect()` call (socket creation and close are
//! outside the timed region), TCP to a loopback listener and UDP (no handshake, so the hook's
//! share is visible). Reported: median and p99 per configuration, and the ratio and the added
//! nanoseconds against unguarded.
//!
//! Throughput: from a guarded cgroup, UDP connects paced at each target rate for a few
//! seconds; reported: attempts made, events received by the daemon's reader, events the
//! kernel counted as lost.
//!
//! Needs root. Flags: `--rounds N` (20), `--per-round N` (1000), `--seconds S` (3),
//! `--rates R,R,..` (20000,50000,100000,0; 0 = as fast as possible), `--json`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use mcp_guard::egress::{AllowEntry, Egress, EgressLayout, ServerEgress, cgroup};
use mcp_guard_tests::bench::{parse_number, percentile};

struct Options {
    rounds: usize,
    per_round: usize,
    seconds: f64,
    rates: Vec<u64>,
    json: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        rounds: 20,
        per_round: 1000,
        seconds: 3.0,
        rates: vec![20_000, 50_000, 100_000, 0],
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--rounds" => options.rounds = parse_number(&value()?)?,
            "--per-round" => options.per_round = parse_number(&value()?)?,
            "--seconds" => options.seconds = parse_number(&value()?)?,
            "--rates" => {
                options.rates = value()?
                    .split(',')
                    .map(parse_number)
                    .collect::<Result<_, _>>()?
            }
            "--json" => options.json = true,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(options)
}

fn main() {
    if let Err(error) = run() {
        eprintln!("egress-bench: {error}");
        std::process::exit(1);
    }
}

/// Where the bench lives on the host, removed at the end.
struct BenchHost {
    layout: EgressLayout,
    baseline: PathBuf,
    home_cgroup: PathBuf,
}

impl Drop for BenchHost {
    fn drop(&mut self) {
        let _ = move_self_to(&self.home_cgroup);
        let _ = mcp_guard::egress::teardown(&self.layout);
        let _ = std::fs::remove_dir(&self.baseline);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let options = parse_options()?;
    if !nix_is_root() {
        return Err("needs root (it loads eBPF programs and moves itself between cgroups)".into());
    }
    let mount = cgroup::cgroup2_mount()?;
    let unique = format!("mcpg-bench-{}", std::process::id());
    let host = BenchHost {
        layout: EgressLayout::new(
            PathBuf::from(format!("/sys/fs/bpf/{unique}")),
            Some(mount.join(&unique)),
        )?,
        baseline: mount.join(format!("{unique}-baseline")),
        home_cgroup: mount.join(own_cgroup()?.trim_start_matches('/')),
    };
    std::fs::create_dir_all(&host.baseline)?;

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || accept_forever(listener));
    let target = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (mut egress, _) = Egress::start(host.layout.clone())?;
    egress.apply(&BTreeMap::from([
        ("small".to_owned(), allow_list(10, port)),
        ("large".to_owned(), allow_list(10_000, port)),
    ]))?;
    let small = egress.open_session("small", Some("bench"))?;
    let large = egress.open_session("large", Some("bench"))?;
    let received = Arc::new(AtomicU64::new(0));
    start_event_counter(&runtime, &mut egress, received.clone())?;

    let configs = [
        ("unguarded", host.baseline.clone()),
        ("guarded, 10 prefixes", small.path.clone()),
        ("guarded, 10000 prefixes", large.path.clone()),
    ];
    let latency = measure_latency(&configs, target, &options)?;
    move_self_to(&small.path)?;
    let throughput = measure_throughput(&egress, &received, target, &options)?;
    move_self_to(&host.home_cgroup)?;
    report(&latency, &throughput, &options);
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn own_cgroup() -> std::io::Result<String> {
    mcp_guard::egress::spawn::cgroup_of(std::process::id())
}

fn move_self_to(cgroup_dir: &Path) -> std::io::Result<()> {
    std::fs::write(cgroup_dir.join("cgroup.procs"), "0")
}

fn accept_forever(listener: TcpListener) {
    for stream in listener.incoming() {
        drop(stream);
    }
}

/// `count` prefixes: the loopback listener plus distinct /32s in 10.0.0.0/8.
fn allow_list(count: u32, port: u16) -> ServerEgress {
    let mut wanted = ServerEgress::default();
    wanted.rule_names.insert(1, "bench/egress/loopback".into());
    wanted.rule_names.insert(2, "bench/egress/filler".into());
    wanted.entries.push(entry(Ipv4Addr::LOCALHOST, port, 1));
    for i in 1..count {
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + i);
        wanted.entries.push(entry(addr, 443, 2));
    }
    wanted
}

fn entry(addr: Ipv4Addr, port: u16, rule_id: u32) -> AllowEntry {
    AllowEntry {
        net: IpNet::V4(Ipv4Net::new(addr, 32).expect("valid /32")),
        ports: port..=port,
        tcp: true,
        udp: true,
        rule_id,
    }
}

fn start_event_counter(
    runtime: &tokio::runtime::Runtime,
    egress: &mut Egress,
    received: Arc<AtomicU64>,
) -> Result<(), Box<dyn std::error::Error>> {
    let reader = egress.event_reader().ok_or("event reader already taken")?;
    let (sender, mut receiver) = tokio::sync::mpsc::channel(65_536);
    runtime.spawn(async move {
        let _ = reader.run(sender).await;
    });
    runtime.spawn(async move {
        while receiver.recv().await.is_some() {
            received.fetch_add(1, Ordering::Relaxed);
        }
    });
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind {
    Tcp,
    Udp,
}

struct LatencyRow {
    kind: &'static str,
    config: &'static str,
    samples: Vec<u64>,
}

fn measure_latency(
    configs: &[(&'static str, PathBuf)],
    target: SocketAddrV4,
    options: &Options,
) -> Result<Vec<LatencyRow>, Box<dyn std::error::Error>> {
    let mut rows = Vec::new();
    for (kind, kind_name) in [(Kind::Tcp, "tcp"), (Kind::Udp, "udp")] {
        let mut samples: Vec<Vec<u64>> = vec![Vec::new(); configs.len()];
        for _ in 0..options.rounds {
            for (i, (_, cgroup_dir)) in configs.iter().enumerate() {
                move_self_to(cgroup_dir)?;
                for _ in 0..options.per_round {
                    samples[i].push(time_connect(kind, target)?);
                }
            }
        }
        for ((config, _), mut samples) in configs.iter().zip(samples) {
            samples.sort_unstable();
            rows.push(LatencyRow {
                kind: kind_name,
                config,
                samples,
            });
        }
    }
    Ok(rows)
}

/// Nanoseconds spent in one connect() to `target`.
fn time_connect(kind: Kind, target: SocketAddrV4) -> std::io::Result<u64> {
    let socket_type = match kind {
        Kind::Tcp => libc::SOCK_STREAM,
        Kind::Udp => libc::SOCK_DGRAM,
    };
    // SAFETY: plain socket calls on an fd this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, socket_type | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Close with RST: no TIME_WAIT, so ephemeral ports never run out over many samples.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
        let addr = sockaddr_in(target);
        let started = Instant::now();
        let rc = libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let elapsed = started.elapsed();
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(error);
        }
        Ok(elapsed.as_nanos() as u64)
    }
}

fn sockaddr_in(target: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: target.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*target.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

struct ThroughputRow {
    target_rate: u64,
    achieved_rate: f64,
    attempts: u64,
    received: u64,
    lost: u64,
}

fn measure_throughput(
    egress: &Egress,
    received: &AtomicU64,
    target: SocketAddrV4,
    options: &Options,
) -> Result<Vec<ThroughputRow>, Box<dyn std::error::Error>> {
    let mut rows = Vec::new();
    for &rate in &options.rates {
        wait_until_quiet(received);
        let lost_before = egress.lost_events()?;
        let received_before = received.load(Ordering::Relaxed);
        let (attempts, elapsed) = paced_udp_connects(target, rate, options.seconds)?;
        let lost = egress.lost_events()? - lost_before;
        // The reader may lag a little behind the generator: wait until it has everything the
        // kernel did not drop (bounded, in case an event never comes).
        let expected = attempts - lost;
        let deadline = Instant::now() + Duration::from_secs(10);
        while received.load(Ordering::Relaxed) - received_before < expected
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        rows.push(ThroughputRow {
            target_rate: rate,
            achieved_rate: attempts as f64 / elapsed.as_secs_f64(),
            attempts,
            received: received.load(Ordering::Relaxed) - received_before,
            lost,
        });
    }
    Ok(rows)
}

/// Waits until events from earlier phases have all been counted (the reader drains on a timer).
fn wait_until_quiet(received: &AtomicU64) {
    let mut last = received.load(Ordering::Relaxed);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = received.load(Ordering::Relaxed);
        if now == last {
            return;
        }
        last = now;
    }
}

/// UDP connects at `rate` per second (0: unpaced) for `seconds`; returns count and duration.
fn paced_udp_connects(
    target: SocketAddrV4,
    rate: u64,
    seconds: f64,
) -> std::io::Result<(u64, Duration)> {
    let total = if rate == 0 {
        u64::MAX
    } else {
        (rate as f64 * seconds) as u64
    };
    let run_for = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut attempts = 0;
    while attempts < total {
        if rate != 0 {
            let due = started + Duration::from_secs_f64(attempts as f64 / rate as f64);
            while Instant::now() < due {
                std::hint::spin_loop();
            }
        } else if started.elapsed() >= run_for {
            break;
        }
        time_connect(Kind::Udp, target)?;
        attempts += 1;
    }
    Ok((attempts, started.elapsed()))
}

fn report(latency: &[LatencyRow], throughput: &[ThroughputRow], options: &Options) {
    let baseline = |kind: &str| {
        latency
            .iter()
            .find(|r| r.kind == kind && r.config == "unguarded")
            .map(|r| (percentile(&r.samples, 50), percentile(&r.samples, 99)))
            .unwrap_or((1, 1))
    };
    if options.json {
        let rows: Vec<_> = latency
            .iter()
            .map(|r| {
                let (base50, base99) = baseline(r.kind);
                let (p50, p99) = (percentile(&r.samples, 50), percentile(&r.samples, 99));
                serde_json::json!({
                    "kind": r.kind, "config": r.config, "samples": r.samples.len(),
                    "p50_ns": p50, "p99_ns": p99,
                    "p50_ratio": p50 as f64 / base50 as f64,
                    "p99_ratio": p99 as f64 / base99 as f64,
                    "p50_added_ns": p50 as i64 - base50 as i64,
                })
            })
            .collect();
        let rates: Vec<_> = throughput
            .iter()
            .map(|t| {
                serde_json::json!({
                    "target_per_s": t.target_rate, "achieved_per_s": t.achieved_rate,
                    "attempts": t.attempts, "received": t.received, "lost": t.lost,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"connect_latency": rows, "ring_buffer": rates})
        );
        return;
    }
    println!(
        "connect() on loopback: {} samples per configuration, in {} interleaved rounds",
        options.rounds * options.per_round,
        options.rounds
    );
    println!(
        "{:<5} {:<25} {:>9} {:>9} {:>10} {:>10} {:>12}",
        "kind", "configuration", "p50 ns", "p99 ns", "p50 ratio", "p99 ratio", "p50 added ns"
    );
    for r in latency {
        let (base50, base99) = baseline(r.kind);
        let (p50, p99) = (percentile(&r.samples, 50), percentile(&r.samples, 99));
        println!(
            "{:<5} {:<25} {:>9} {:>9} {:>10.3} {:>10.3} {:>12}",
            r.kind,
            r.config,
            p50,
            p99,
            p50 as f64 / base50 as f64,
            p99 as f64 / base99 as f64,
            p50 as i64 - base50 as i64
        );
    }
    println!();
    println!(
        "ring buffer: UDP connects from a guarded cgroup, {} s per rate",
        options.seconds
    );
    println!(
        "{:>12} {:>12} {:>10} {:>10} {:>8}",
        "target /s", "achieved /s", "attempts", "received", "lost"
    );
    for t in throughput {
        let target = if t.target_rate == 0 {
            "max".to_owned()
        } else {
            t.target_rate.to_string()
        };
        println!(
            "{:>12} {:>12.0} {:>10} {:>10} {:>8}",
            target, t.achieved_rate, t.attempts, t.received, t.lost
        );
    }
}
