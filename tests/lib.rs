//! Harness for the integration tests that drive a real `mcp-guard` daemon against the real
//! kernel: unique per-test bpffs/cgroup/socket locations, the daemon process and its JSON log,
//! loopback listeners that record what reached them, and the `egress-probe` run inside guarded
//! cgroups through `mcp-guard egress exec`.
//!
//! Every test gets its own pin directory, cgroup subtree and control socket, so tests run in
//! parallel; [`TestEnv`]'s `Drop` kills whatever is left in the subtree and tears everything
//! down even when the test failed. The tests need root and a kernel that loads the programs:
//! they fail (never skip) otherwise.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Generous safety net for anything the tests wait on; never a performance threshold.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Prefix of every directory the tests create, so stale ones from a killed run can be found.
const PREFIX: &str = "mcp-guard-test-";

/// The parent under which per-test pin directories live.
const BPFFS_PARENT: &str = "/sys/fs/bpf";

// ---------------------------------------------------------------------------------------------
// Environment checks and the daemon binary
// ---------------------------------------------------------------------------------------------

/// The kernel tests must fail, not skip, when they cannot do their job.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the egress tests load eBPF programs and create cgroups: run them as root \
         (e.g. `sudo -E cargo test -p mcp-guard-tests`)"
    );
}

/// `target/<profile>`: the directory holding the test binary's `deps/` and the package binaries.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent directory");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

/// The `mcp-guard` binary, built once per test process (`cargo build` is quick when up to
/// date). `MCP_GUARD_BIN` overrides it, for a runner that has already built it.
pub fn daemon_binary() -> PathBuf {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(build_daemon)
        .clone()
        .unwrap_or_else(|err| panic!("{err}"))
}

fn build_daemon() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("MCP_GUARD_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().expect("profile dir has a parent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args([
            "build",
            "-p",
            "mcp-guard",
            "--bin",
            "mcp-guard",
            "--target-dir",
        ])
        .arg(target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    // Cargo describes the test package to the test process; none of that concerns this build.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
            || key == "CARGO_PRIMARY_PACKAGE"
            || key == "CARGO_TARGET_TMPDIR"
        {
            cmd.env_remove(&*key);
        }
    }
    let output = cmd
        .output()
        .map_err(|err| format!("cannot run cargo to build mcp-guard: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "`cargo build -p mcp-guard` failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let bin = profile_dir.join("mcp-guard");
    if !bin.exists() {
        return Err(format!(
            "cargo built mcp-guard but {} is missing",
            bin.display()
        ));
    }
    Ok(bin)
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on
/// unified ones).
pub fn cgroup2_mount() -> PathBuf {
    mcp_guard::egress::cgroup::cgroup2_mount()
        .unwrap_or_else(|e| panic!("the egress tests need a cgroup v2 mount: {e}"))
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

/// Once per test process: make sure bpffs is mounted at /sys/fs/bpf (tests run daemons in
/// parallel, and two of them mounting it at once would stack two filesystems there), and remove
/// what killed earlier runs left behind.
fn prepare_host() {
    static PREPARED: OnceLock<()> = OnceLock::new();
    PREPARED.get_or_init(|| {
        let parent = Path::new(BPFFS_PARENT);
        if !is_bpffs(parent) {
            let _ = std::fs::create_dir_all(parent);
            let c_path = CString::new(BPFFS_PARENT).unwrap();
            let fstype = CString::new("bpf").unwrap();
            // SAFETY: valid NUL-terminated strings; no mount data.
            let rc = unsafe {
                libc::mount(
                    fstype.as_ptr(),
                    c_path.as_ptr(),
                    fstype.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc != 0 && !is_bpffs(parent) {
                panic!(
                    "cannot mount bpffs at {BPFFS_PARENT}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        remove_stale(parent);
        remove_stale(&cgroup2_mount());
    });
}

/// Removes `mcp-guard-test-*` entries whose creating test process is gone.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        // `<tag>-<pid>-<n>`
        let mut parts = rest.rsplit('-');
        let _n = parts.next();
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        if is_cgroup_dir(&path) {
            kill_cgroup_tree(&path);
            remove_cgroup_tree(&path);
        } else {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-test environment
// ---------------------------------------------------------------------------------------------

/// One test's private locations: pin directory, cgroup subtree, control socket, policy file.
pub struct TestEnv {
    pub name: String,
    pub bpffs: PathBuf,
    pub cgroup_root: PathBuf,
    pub control_socket: PathBuf,
    pub policy_path: PathBuf,
    pub probe: PathBuf,
    pub daemon_bin: PathBuf,
    dir: tempfile::TempDir,
}

impl TestEnv {
    /// `tag` names the test in the directories it creates; `probe` is
    /// `env!("CARGO_BIN_EXE_egress-probe")` of the calling test.
    pub fn new(tag: &str, probe: &str) -> TestEnv {
        require_root();
        let daemon_bin = daemon_binary();
        prepare_host();
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{tag}-{}-{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("mcp-guard-test.")
            .tempdir()
            .expect("tempdir");
        TestEnv {
            bpffs: Path::new(BPFFS_PARENT).join(&name),
            cgroup_root: cgroup2_mount().join(&name),
            control_socket: dir.path().join("control.sock"),
            policy_path: dir.path().join("policy.json"),
            probe: PathBuf::from(probe),
            daemon_bin,
            name,
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh directory `files` in this environment, by its canonical path (what
    /// server-filesystem compares the paths it is given with), holding `readme.txt` with
    /// `readme` when given.
    pub fn files_dir(&self, readme: Option<&str>) -> PathBuf {
        let root = self.dir().join("files");
        std::fs::create_dir(&root).expect("creating the files directory");
        let root = std::fs::canonicalize(&root).expect("resolving the files directory");
        if let Some(readme) = readme {
            std::fs::write(root.join("readme.txt"), readme).expect("writing readme.txt");
        }
        root
    }

    /// The whole policy document for `servers` (a JSON object `name → {"egress": [...]}`),
    /// with this environment's locations in the `daemon` section.
    pub fn policy(&self, servers: Value) -> Value {
        json!({
            "version": 1,
            "daemon": {
                "bpffs": self.bpffs,
                "cgroup_root": self.cgroup_root,
                "control_socket": self.control_socket,
                "metrics_listen": null,
            },
            "audit": { "path": self.audit_path() },
            "servers": servers,
        })
    }

    /// This test's audit log (each test has its own: one writer per log).
    pub fn audit_path(&self) -> PathBuf {
        self.dir().join("audit.jsonl")
    }

    /// Writes the policy atomically (a reload never reads half a file).
    pub fn write_policy(&self, servers: Value) {
        let text = serde_json::to_string_pretty(&self.policy(servers)).unwrap();
        let tmp = self.policy_path.with_extension("json.tmp");
        std::fs::write(&tmp, text).expect("write policy");
        std::fs::rename(&tmp, &self.policy_path).expect("rename policy");
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.daemon_bin);
        cmd.env("RUST_LOG", "info");
        cmd
    }

    /// Starts `mcp-guard run` on the policy written with [`TestEnv::write_policy`] and waits
    /// until it logs "ready". Fails the test if it exits first (e.g. cannot load the programs).
    pub fn start_daemon(&self) -> Daemon {
        let daemon = self.spawn_daemon();
        daemon.wait_for_message("ready", TIMEOUT);
        daemon
    }

    /// Starts `mcp-guard run` without waiting for anything.
    pub fn spawn_daemon(&self) -> Daemon {
        self.spawn_daemon_with(&[])
    }

    /// Like [`TestEnv::start_daemon`], with `extra` appended to the `mcp-guard run` command
    /// line (e.g. `--metrics-listen ADDR`, `--no-egress`).
    pub fn start_daemon_with(&self, extra: &[&str]) -> Daemon {
        let daemon = self.spawn_daemon_with(extra);
        daemon.wait_for_message("ready", TIMEOUT);
        daemon
    }

    /// Like [`TestEnv::spawn_daemon`], with `extra` appended to the `mcp-guard run` command line.
    pub fn spawn_daemon_with(&self, extra: &[&str]) -> Daemon {
        self.spawn_daemon_with_env(extra, &[])
    }

    /// Like [`TestEnv::spawn_daemon_with`], with `env` added to the daemon's environment (e.g.
    /// systemd's `NOTIFY_SOCKET`).
    pub fn spawn_daemon_with_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut cmd = self.run_command();
        cmd.envs(env.iter().copied())
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .args(extra);
        self.spawn(cmd)
    }

    /// Starts `mcp-guard run --delegated-cgroup` inside the cgroup `unit`, as systemd starts
    /// a unit with `Delegate=yes`, and waits until it is ready.
    pub fn start_delegated_daemon(&self, unit: &Path) -> Daemon {
        let mut cmd = self.run_command();
        cmd.arg("--delegated-cgroup");
        mcp_guard::egress::spawn::place_in_cgroup(&mut cmd, unit)
            .unwrap_or_else(|err| panic!("place the daemon in {}: {err}", unit.display()));
        let daemon = self.spawn(cmd);
        daemon.wait_for_message("ready", TIMEOUT);
        daemon
    }

    /// `mcp-guard stdio` for `server` on this environment's policy, as an agent would launch
    /// it, acting as `principal` and reaching the daemon at `control_socket` (where no daemon
    /// listens, the front runs standalone).
    pub fn stdio_front(&self, server: &str, principal: &str, control_socket: &Path) -> Vec<String> {
        vec![
            self.daemon_bin.display().to_string(),
            "stdio".into(),
            "--server".into(),
            server.into(),
            "--policy".into(),
            self.policy_path.display().to_string(),
            "--principal".into(),
            principal.into(),
            "--control-socket".into(),
            control_socket.display().to_string(),
        ]
    }

    /// `mcp-guard run` on this environment's policy, pins and control socket, logging JSON.
    fn run_command(&self) -> Command {
        assert!(
            self.policy_path.exists(),
            "write_policy before starting the daemon"
        );
        let mut cmd = self.command();
        cmd.arg("run")
            .arg("--policy")
            .arg(&self.policy_path)
            .args(["--log-format", "json"])
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--control-socket")
            .arg(&self.control_socket);
        cmd
    }

    fn spawn(&self, mut cmd: Command) -> Daemon {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {}: {err}", self.daemon_bin.display()));
        let log = Log::collect(child.stderr.take().unwrap());
        Daemon {
            child: Mutex::new(Some(child)),
            log,
        }
    }

    /// `mcp-guard egress status --bpffs DIR`, parsed.
    pub fn status(&self) -> Value {
        let output = self
            .command()
            .args(["egress", "status", "--bpffs"])
            .arg(&self.bpffs)
            .output()
            .expect("run mcp-guard egress status");
        assert!(
            output.status.success(),
            "mcp-guard egress status failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
            panic!(
                "egress status printed no JSON ({err}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// `mcp-guard egress teardown --bpffs DIR --cgroup-root DIR`.
    pub fn teardown(&self) -> Output {
        self.teardown_command()
            .output()
            .expect("run mcp-guard egress teardown")
    }

    fn teardown_command(&self) -> Command {
        let mut cmd = self.command();
        cmd.args(["egress", "teardown", "--bpffs"])
            .arg(&self.bpffs)
            .arg("--cgroup-root")
            .arg(&self.cgroup_root);
        cmd
    }

    fn exec_command(&self, server: &str, session: Option<&str>, probe_args: &[&str]) -> Command {
        let mut cmd = self.command();
        cmd.args(["egress", "exec", "--control-socket"])
            .arg(&self.control_socket)
            .args(["--server", server]);
        if let Some(session) = session {
            cmd.args(["--session", session]);
        }
        cmd.arg("--").arg(&self.probe).args(probe_args);
        cmd
    }

    /// Runs `mcp-guard egress exec ... -- egress-probe ARGS` to completion and parses its lines.
    pub fn exec_probe(&self, server: &str, session: Option<&str>, probe_args: &[&str]) -> ProbeRun {
        let mut cmd = self.exec_command(server, session, probe_args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        run_to_completion(cmd, &format!("egress exec -- egress-probe {probe_args:?}"))
    }

    /// Runs the probe directly, outside any guarded cgroup.
    pub fn unguarded_probe(&self, probe_args: &[&str]) -> ProbeRun {
        let mut cmd = Command::new(&self.probe);
        cmd.args(probe_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        run_to_completion(cmd, &format!("egress-probe {probe_args:?}"))
    }

    /// Starts `egress-probe --interactive` directly (no `mcp-guard egress exec`) inside the
    /// existing cgroup `cgroup`: the child moves itself there between fork and exec, so even
    /// its ready line is written from that cgroup. For cgroups mcp-guard adopts.
    pub fn interactive_probe_in_cgroup(&self, cgroup: &Path) -> InteractiveProbe {
        use std::os::fd::{AsRawFd, OwnedFd};
        use std::os::unix::process::CommandExt;
        let procs: OwnedFd = std::fs::OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .unwrap_or_else(|err| panic!("open {}/cgroup.procs: {err}", cgroup.display()))
            .into();
        let mut cmd = Command::new(&self.probe);
        cmd.arg("--interactive")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure only calls write(2) on an fd opened above (async-signal-safe).
        unsafe {
            cmd.pre_exec(move || {
                let written = libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1);
                if written == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        InteractiveProbe::spawn(cmd)
    }

    /// Starts `mcp-guard egress exec ... -- egress-probe --interactive` and waits for its
    /// "ready" line (so the probe is running inside its guarded cgroup).
    pub fn interactive_probe(&self, server: &str, session: Option<&str>) -> InteractiveProbe {
        let mut cmd = self.exec_command(server, session, &["--interactive"]);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        InteractiveProbe::spawn(cmd)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Whatever still runs in the subtree (probes, exec wrappers' children) goes first:
        // a populated cgroup cannot be removed.
        if self.cgroup_root.exists() {
            kill_cgroup_tree(&self.cgroup_root);
        }
        if self.cgroup_root.exists() || self.bpffs.exists() {
            match self.teardown_command().output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "[harness] mcp-guard egress teardown failed for {} ({}): {}",
                    self.name,
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(err) => eprintln!("[harness] cannot run mcp-guard egress teardown: {err}"),
            }
        }
        // Belt and braces, so a broken teardown does not leak into later runs.
        if self.cgroup_root.exists() {
            remove_cgroup_tree(&self.cgroup_root);
        }
        if self.bpffs.exists()
            && let Err(err) = std::fs::remove_dir_all(&self.bpffs)
        {
            eprintln!("[harness] cannot remove {}: {err}", self.bpffs.display());
        }
    }
}

/// A cgroup outside any test's cgroup root (`<cgroup2 mount>/mcp-guard-test-foreign-<tag>-<pid>-<n>`),
/// standing for a service's cgroup that mcp-guard adopts. `Drop` kills what runs in it and
/// removes it; a killed test run's leftovers are removed by the next run's `prepare_host`.
pub struct ForeignCgroup {
    pub path: PathBuf,
}

impl ForeignCgroup {
    pub fn new(tag: &str) -> ForeignCgroup {
        require_root();
        prepare_host();
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            cgroup2_mount().join(format!("{PREFIX}foreign-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir(&path)
            .unwrap_or_else(|err| panic!("create cgroup {}: {err}", path.display()));
        ForeignCgroup { path }
    }

    /// The cgroup id the kernel reports for processes in it: its directory's inode number.
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path)
            .unwrap_or_else(|err| panic!("stat {}: {err}", self.path.display()))
            .ino()
    }

    /// The pids in the cgroup right now.
    pub fn pids(&self) -> Vec<i32> {
        read_pids(&self.path.join("cgroup.procs"))
    }
}

impl Drop for ForeignCgroup {
    fn drop(&mut self) {
        if self.path.exists() {
            kill_cgroup_tree(&self.path);
            remove_cgroup_tree(&self.path);
        }
    }
}

fn is_cgroup_dir(path: &Path) -> bool {
    path.join("cgroup.procs").exists()
}

/// Kills every process in the cgroup subtree and waits (bounded) until it is empty.
fn kill_cgroup_tree(root: &Path) {
    let kill_file = root.join("cgroup.kill");
    if std::fs::write(&kill_file, "1").is_err() {
        for dir in cgroup_dirs(root) {
            for pid in read_pids(&dir.join("cgroup.procs")) {
                // SAFETY: plain signal delivery.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let populated = std::fs::read_to_string(root.join("cgroup.events"))
            .map(|events| events.lines().any(|l| l == "populated 1"))
            .unwrap_or(false);
        if !populated {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("[harness] {} still populated after kill", root.display());
}

/// The cgroup directories of a subtree, deepest first.
fn cgroup_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
        out.push(dir);
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

fn remove_cgroup_tree(root: &Path) {
    for dir in cgroup_dirs(root) {
        if let Err(err) = std::fs::remove_dir(&dir) {
            eprintln!("[harness] cannot remove cgroup {}: {err}", dir.display());
        }
    }
}

fn read_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Policy helpers
// ---------------------------------------------------------------------------------------------

/// One egress rule: `{"id", "cidr", "ports", "protocols"}`.
pub fn rule(id: &str, cidr: &str, ports: &[u16], protocols: &[&str]) -> Value {
    json!({ "id": id, "cidr": cidr, "ports": ports, "protocols": protocols })
}

/// `{"<server>": {"egress": rules}}`.
pub fn server(name: &str, rules: Vec<Value>) -> Value {
    json!({ name: { "egress": rules } })
}

/// `kind:addr` as the probe understands it: `tcp:127.0.0.1:80`, `udp:[::1]:53`.
pub fn attempt(kind: &str, addr: SocketAddr) -> String {
    format!("{kind}:{addr}")
}

/// The IPv4-mapped IPv6 form of a v4 socket address (`[::ffff:a.b.c.d]:port`).
pub fn v4_mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        SocketAddr::V6(_) => panic!("{addr} is not an IPv4 address"),
    }
}

pub const LOCALHOST_V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const LOCALHOST_V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

// ---------------------------------------------------------------------------------------------
// The daemon and its JSON log
// ---------------------------------------------------------------------------------------------

/// `fields.<name>` of a tracing-subscriber JSON line (or a top-level key, if flattened).
pub fn field<'a>(line: &'a Value, name: &str) -> &'a Value {
    line.get("fields")
        .and_then(|f| f.get(name))
        .or_else(|| line.get(name))
        .unwrap_or(&Value::Null)
}

pub fn message(line: &Value) -> Option<&str> {
    field(line, "message").as_str()
}

/// A number, or a string holding one (loggers differ on how they render u64).
pub fn as_u64(value: &Value) -> Option<u64> {
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
}

pub fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

#[derive(Default)]
struct LogState {
    lines: Vec<Value>,
    closed: bool,
}

/// The daemon's stderr, one parsed JSON object per line (non-JSON lines as `{"raw": line}`),
/// collected by a background thread.
#[derive(Clone)]
pub struct Log {
    state: Arc<(Mutex<LogState>, Condvar)>,
}

impl Log {
    fn collect(stderr: impl Read + Send + 'static) -> Log {
        let log = Log {
            state: Arc::default(),
        };
        let writer = log.clone();
        let echo = std::env::var_os("MCP_GUARD_TEST_ECHO").is_some();
        thread::spawn(move || {
            let reader = BufReader::new(stderr);
            for line in reader.split(b'\n') {
                let Ok(line) = line else { break };
                let text = String::from_utf8_lossy(&line).into_owned();
                if echo {
                    eprintln!("[daemon] {text}");
                }
                if text.trim().is_empty() {
                    continue;
                }
                let value = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
                let (lock, cvar) = &*writer.state;
                lock.lock().unwrap().lines.push(value);
                cvar.notify_all();
            }
            let (lock, cvar) = &*writer.state;
            lock.lock().unwrap().closed = true;
            cvar.notify_all();
        });
        log
    }

    pub fn lines(&self) -> Vec<Value> {
        self.state.0.lock().unwrap().lines.clone()
    }

    /// How many lines have arrived; pass to [`Log::wait_for_since`] to look only at later ones.
    pub fn mark(&self) -> usize {
        self.state.0.lock().unwrap().lines.len()
    }

    /// The first line at index >= `since` matching `pred`, waiting up to `timeout`.
    /// `None` if the timeout passes or the daemon's stderr closes without one.
    pub fn wait_for_since(
        &self,
        since: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.state;
        let mut state = lock.lock().unwrap();
        loop {
            if let Some(found) = state.lines.iter().skip(since).find(|l| pred(l)) {
                return Some(found.clone());
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                return None;
            }
            state = cvar.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// Waits until `pred` holds for all the lines so far (e.g. "N events arrived"); false if
    /// the timeout passes or the daemon's stderr closes first.
    pub fn wait_until(&self, timeout: Duration, pred: impl Fn(&[Value]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.state;
        let mut state = lock.lock().unwrap();
        loop {
            if pred(&state.lines) {
                return true;
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                return false;
            }
            state = cvar.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// The first and last lines (each cut to a readable length), for a failure message: a
    /// fatal error is on the first line, even when a verifier log follows it.
    pub fn summary(&self, head: usize, tail: usize) -> String {
        let lines = self.lines();
        let render = |l: &Value| {
            let text = match l.get("raw").and_then(Value::as_str) {
                Some(raw) => raw.to_string(),
                None => l.to_string(),
            };
            match text.char_indices().nth(400) {
                Some((cut, _)) => format!("{}…", &text[..cut]),
                None => text,
            }
        };
        if lines.len() <= head + tail {
            return lines.iter().map(render).collect::<Vec<_>>().join("\n");
        }
        let mut out: Vec<String> = lines[..head].iter().map(render).collect();
        out.push(format!("[… {} lines …]", lines.len() - head - tail));
        out.extend(lines[lines.len() - tail..].iter().map(render));
        out.join("\n")
    }
}

/// A running `mcp-guard run`. Dropping it stops the daemon (SIGTERM, then SIGKILL); the pins
/// and cgroups are [`TestEnv`]'s to remove.
pub struct Daemon {
    child: Mutex<Option<Child>>,
    pub log: Log,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        let child = self.child.lock().unwrap();
        child.as_ref().expect("daemon already reaped").id() as i32
    }

    /// Fails the test if the daemon's log mentions a panic.
    pub fn assert_no_panic(&self) {
        let panicked = self
            .log
            .lines()
            .into_iter()
            .find(|line| line.to_string().contains("panic"));
        assert!(
            panicked.is_none(),
            "the daemon logged a panic: {panicked:?}"
        );
    }

    /// Waits for a line with `fields.message == msg`; fails the test with the log otherwise.
    pub fn wait_for_message(&self, msg: &str, timeout: Duration) -> Value {
        self.wait_for_since(0, timeout, &format!("message {msg:?}"), |l| {
            message(l) == Some(msg)
        })
    }

    /// Like [`Log::wait_for_since`], but fails the test (with the daemon's log) on a miss.
    pub fn wait_for_since(
        &self,
        since: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(found) = self.log.wait_for_since(since, timeout, pred) {
            return found;
        }
        let state = match self.child_status() {
            Some(status) => format!("the daemon exited ({status})"),
            None => format!("still running after {timeout:?}"),
        };
        panic!(
            "mcp-guard never logged {what}: {state}. Its log:\n{}",
            self.log.summary(20, 20)
        );
    }

    fn child_status(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap();
        child.as_mut()?.try_wait().ok().flatten()
    }

    /// Every `egress` event logged so far.
    pub fn egress_events(&self) -> Vec<Value> {
        self.log
            .lines()
            .into_iter()
            .filter(|l| message(l) == Some("egress"))
            .collect()
    }

    /// Waits for the egress event `pred` picks out; fails with every event seen otherwise.
    pub fn wait_for_event(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(found) = self
            .log
            .wait_for_since(0, TIMEOUT, |l| message(l) == Some("egress") && pred(l))
        {
            return found;
        }
        let events: Vec<String> = self.egress_events().iter().map(|e| e.to_string()).collect();
        panic!(
            "no egress event for {what}. Events logged ({}):\n{}\nLog tail:\n{}",
            events.len(),
            events.join("\n"),
            self.log.summary(10, 20)
        );
    }

    /// SIGHUP (policy reload).
    pub fn sighup(&self) {
        // SAFETY: plain signal delivery to our own child.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGHUP) };
        assert_eq!(rc, 0, "kill -HUP: {}", std::io::Error::last_os_error());
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) without waiting for anything.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain signal delivery to our own child.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill -{signal}: {}", std::io::Error::last_os_error());
    }

    /// Waits for the daemon to exit and reaps it; fails the test (with its log) if it is still
    /// running after [`TIMEOUT`].
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        let mut slot = self.child.lock().unwrap();
        let child = slot.as_mut().expect("daemon already reaped");
        loop {
            if let Some(status) = child.try_wait().expect("wait for the daemon") {
                slot.take();
                return status;
            }
            if Instant::now() >= deadline {
                drop(slot);
                panic!(
                    "mcp-guard still running after {TIMEOUT:?}. Its log:\n{}",
                    self.log.summary(20, 20)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap: the daemon gets no chance to clean anything up.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .get_mut()
            .unwrap()
            .take()
            .expect("daemon already reaped");
        let _ = child.kill();
        child.wait().expect("wait for killed daemon")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut child) = self.child.get_mut().ok().and_then(Option::take) else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // SAFETY: plain signal delivery to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Probe runs
// ---------------------------------------------------------------------------------------------

/// A finished probe run: exit status, raw output and the parsed JSON lines.
pub struct ProbeRun {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub lines: Vec<Value>,
}

impl ProbeRun {
    fn describe(&self) -> String {
        format!(
            "{} exited {}\nstdout:\n{}\nstderr:\n{}",
            self.what, self.status, self.stdout, self.stderr
        )
    }

    pub fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "{}", self.describe());
        self
    }

    /// The line answering `attempt` (the first, if it was made more than once).
    pub fn line(&self, attempt: &str) -> &Value {
        self.lines
            .iter()
            .find(|l| l["attempt"] == attempt)
            .unwrap_or_else(|| panic!("no line for attempt {attempt:?}: {}", self.describe()))
    }

    pub fn result(&self, attempt: &str) -> &str {
        self.line(attempt)["result"]
            .as_str()
            .unwrap_or("<no result>")
    }

    /// The line with `"role": role` (`parent` in --fork-exec mode).
    pub fn role(&self, role: &str) -> &Value {
        self.lines
            .iter()
            .find(|l| l["role"] == role)
            .unwrap_or_else(|| panic!("no {role:?} line: {}", self.describe()))
    }

    /// Asserts each attempt got the expected result, reporting all mismatches at once.
    pub fn assert_results(&self, expected: &[(&str, &str)]) {
        let wrong: Vec<String> = expected
            .iter()
            .filter(|(attempt, want)| self.result(attempt) != *want)
            .map(|(attempt, want)| {
                format!("  {attempt}: expected {want}, got {}", self.line(attempt))
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "unexpected results:\n{}\n{}",
            wrong.join("\n"),
            self.describe()
        );
    }

    /// `(pid, cgroup_id)` of the process that wrote the first line.
    pub fn identity(&self) -> (u64, u64) {
        let first = self
            .lines
            .first()
            .unwrap_or_else(|| panic!("the probe printed nothing: {}", self.describe()));
        identity(first)
    }
}

/// `(pid, cgroup_id)` of a probe line.
pub fn identity(line: &Value) -> (u64, u64) {
    let pid = line["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid in {line}"));
    let cgroup_id = line["cgroup_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cgroup_id in {line}"));
    (pid, cgroup_id)
}

fn parse_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| json!({ "raw": l })))
        .collect()
}

fn run_to_completion(cmd: Command, what: &str) -> ProbeRun {
    run_to_completion_within(cmd, what, TIMEOUT)
}

fn run_to_completion_within(mut cmd: Command, what: &str, timeout: Duration) -> ProbeRun {
    let child = cmd
        .spawn()
        .unwrap_or_else(|err| panic!("spawn {what}: {err}"));
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(timeout) {
        Ok(output) => output.expect("wait for probe"),
        Err(_) => {
            // SAFETY: plain signal delivery to our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{what} did not finish within {timeout:?}; killed it");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ProbeRun {
        what: what.to_string(),
        status: output.status,
        lines: parse_lines(&stdout),
        stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs any command to completion (stdout and stderr captured, killed after [`TIMEOUT`]);
/// `lines` holds whatever of its stdout parses as JSON lines.
pub fn run_command(mut cmd: Command, what: &str) -> ProbeRun {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_to_completion(cmd, what)
}

/// Like [`run_command`], with its own safety net instead of [`TIMEOUT`] (for clients that run
/// a whole script of operations).
pub fn run_command_within(mut cmd: Command, what: &str, timeout: Duration) -> ProbeRun {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_to_completion_within(cmd, what, timeout)
}

/// The command that starts `server` (a program taking no arguments) so that every line it is
/// sent is kept in `wire` first (see [`record_then_forward`]).
pub fn server_recording_to(wire: &Path, server: &str) -> Vec<String> {
    vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        format!(r#"{} | "$2""#, record_then_forward(r#""$1""#)),
        "fast-recorded".to_owned(),
        wire.display().to_string(),
        server.to_owned(),
    ]
}

/// Copies an executable to `to` (mode 755) for exec'ing there. Another process copies it: a
/// file this multi-threaded process held open for writing could be inherited by a child that
/// another test forks meanwhile, and exec'ing the copy would then fail with ETXTBSY.
pub fn copy_executable(from: &Path, to: &Path) {
    let mut install = Command::new("install");
    install.arg("-m").arg("755").arg(from).arg(to);
    let copied = run_command(install, "install an executable");
    assert!(
        copied.status.success(),
        "install {} {}: {}",
        from.display(),
        to.display(),
        copied.stderr
    );
}

/// A `/bin/sh` loop that appends each line it reads to the file named by `file` (a shell
/// word, such as `"$1"`) and then passes the line on: put before a server (`LOOP | server`) to
/// keep what the server was sent. The file is written first, so what the server has received
/// is in it, also when the server's cgroup is killed right after (`tee` passes a line on
/// before it writes it to its files).
pub fn record_then_forward(file: &str) -> String {
    format!(
        r#"while IFS= read -r line; do printf '%s\n' "$line" >> {file}; printf '%s\n' "$line"; done"#
    )
}

/// A loopback TCP port that is free now, for a daemon to bind later. It is taken below the
/// kernel's ephemeral range, so that no other socket (an outgoing connection, another test's
/// `bind(0)`) can be given it in between: a port `bind(0)` had just handed out and released
/// was seen taken again before the daemon started. Within this process ports are handed out in
/// turn, from a start that differs per process.
pub fn free_loopback_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const LOWEST: usize = 10_000;
    let Some(ephemeral_low) = ephemeral_port_range_start().filter(|&low| low > LOWEST + 1000)
    else {
        return TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("bind an ephemeral loopback port")
            .port();
    };
    let span = ephemeral_low - LOWEST;
    let start = std::process::id() as usize * 7919 % span;
    for _ in 0..span {
        let port = LOWEST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(port).expect("below the ephemeral range");
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOWEST} and {ephemeral_low}");
}

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
fn ephemeral_port_range_start() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `GET path` over plain HTTP/1.1 (`Connection: close`): the status code and the body
/// (de-chunked if the server chunked it).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let answer = http_exchange(addr, "GET", path, &[("Accept", "text/plain")], "")?;
    Ok((answer.status, answer.body))
}

/// One HTTP answer: status, headers (names lower-cased, in order) and the body text.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, or `null` when it is not (an empty 202, say).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// An HTTP answer with its body parsed as JSON (`null` when it is not JSON).
#[derive(Debug)]
pub struct JsonAnswer {
    pub status: u16,
    pub body: Value,
    pub http: HttpAnswer,
}

impl JsonAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.http.header(name)
    }
}

impl From<HttpAnswer> for JsonAnswer {
    fn from(http: HttpAnswer) -> Self {
        JsonAnswer {
            status: http.status,
            body: http.json(),
            http,
        }
    }
}

/// Sends one request on its own connection (`Connection: close`, `Content-Length`) and reads
/// the whole answer, de-chunked. An error when no whole answer came back (the server died, a
/// body shorter than its `Content-Length`).
pub fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<HttpAnswer> {
    http_exchange_bytes(addr, method, path, headers, body.as_bytes())
}

/// [`http_exchange`] with a body of any bytes (invalid UTF-8 included).
pub fn http_exchange_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpAnswer> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    exchange_on(stream, addr, method, path, headers, body)
}

/// [`http_exchange`] from the local address `from` (another loopback address, such as
/// 127.0.0.2, is another client to the server).
pub fn http_exchange_from(
    from: IpAddr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<HttpAnswer> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let stream = runtime.block_on(async {
        let socket = match from {
            IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(from, 0))?;
        socket.connect(addr).await?.into_std()
    })?;
    stream.set_nonblocking(false)?;
    exchange_on(stream, addr, method, path, headers, body.as_bytes())
}

fn exchange_on(
    mut stream: TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpAnswer> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut request = request.into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let bad = |what: &str| std::io::Error::other(format!("{what} in HTTP response: {text:?}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let has = |name: &str, what: &str| {
        headers
            .iter()
            .any(|(n, v)| n == name && v.to_ascii_lowercase().contains(what))
    };
    let body = if has("transfer-encoding", "chunked") {
        dechunk(body).ok_or_else(|| bad("bad chunked body"))?
    } else {
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        if length.is_some_and(|length| body.len() < length) {
            return Err(bad("short body"));
        }
        body.to_owned()
    };
    Ok(HttpAnswer {
        status,
        headers,
        body,
    })
}

/// The content of a chunked body; `None` when it is malformed or cut short.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after[size..].strip_prefix("\r\n")?;
    }
}

/// A long-lived `egress-probe --interactive` inside a guarded cgroup: each
/// [`InteractiveProbe::attempt`] is made when the test asks for it.
pub struct InteractiveProbe {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// The probe's `{"role":"ready"}` line: its pid and cgroup.
    pub ready: Value,
}

/// Reads a piped child's output in the background: stdout line by line into a channel, stderr
/// into a buffer that grows as the child writes.
pub fn collect_output(child: &mut Child) -> (Receiver<String>, Arc<Mutex<String>>) {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (lines, collect_stderr(child))
}

/// Reads a piped child's stderr in the background into a buffer that grows as the child
/// writes (kept draining, so the child never writes to a closed pipe).
pub fn collect_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
    let stderr = Arc::new(Mutex::new(String::new()));
    let sink = stderr.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr_pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    stderr
}

impl InteractiveProbe {
    fn spawn(mut cmd: Command) -> InteractiveProbe {
        let mut child = cmd.spawn().expect("spawn mcp-guard egress exec");
        let stdin = child.stdin.take();
        let (lines, stderr) = collect_output(&mut child);
        let mut probe = InteractiveProbe {
            child,
            stdin,
            lines,
            stderr,
            ready: Value::Null,
        };
        probe.ready = probe.next_line("the probe's ready line");
        assert_eq!(
            probe.ready["role"], "ready",
            "unexpected first line {}",
            probe.ready
        );
        probe
    }

    fn next_line(&mut self, what: &str) -> Value {
        match self.lines.recv_timeout(TIMEOUT) {
            Ok(line) => serde_json::from_str(&line).unwrap_or_else(|_| json!({ "raw": line })),
            Err(err) => {
                let exited = self.child.try_wait().ok().flatten();
                let why = match err {
                    RecvTimeoutError::Timeout => format!("nothing within {TIMEOUT:?}"),
                    RecvTimeoutError::Disconnected => "stdout closed".to_string(),
                };
                panic!(
                    "interactive probe: waiting for {what}: {why}; exec process: {exited:?}; \
                     stderr:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
        }
    }

    /// `(pid, cgroup_id)` of the probe process.
    pub fn identity(&self) -> (u64, u64) {
        identity(&self.ready)
    }

    /// Makes one attempt now and returns its line.
    pub fn attempt(&mut self, attempt: &str) -> Value {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{attempt}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|err| {
                panic!(
                    "write to interactive probe: {err}; stderr:\n{}",
                    self.stderr.lock().unwrap()
                )
            });
        let line = self.next_line(attempt);
        assert_eq!(line["attempt"], attempt, "probe answered another attempt");
        line
    }

    /// Makes one attempt and returns its result (`ok`, `EPERM`, ...).
    pub fn result(&mut self, attempt: &str) -> String {
        let line = self.attempt(attempt);
        line["result"]
            .as_str()
            .unwrap_or_else(|| panic!("no result in {line}"))
            .to_string()
    }
}

impl Drop for InteractiveProbe {
    fn drop(&mut self) {
        // EOF on stdin ends the probe; the exec wrapper then exits with its code.
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Loopback listeners that record what reached them
// ---------------------------------------------------------------------------------------------

/// A loopback TCP or UDP listener on an ephemeral port that records every connection's first
/// bytes (TCP) or every datagram (UDP), so a test can prove an attempt really arrived.
pub struct Listener {
    pub addr: SocketAddr,
    received: Arc<(Mutex<Vec<String>>, Condvar)>,
    stop: Arc<AtomicBool>,
    tcp: bool,
}

impl Listener {
    pub fn tcp(ip: IpAddr) -> Listener {
        let listener = TcpListener::bind((ip, 0)).expect("bind TCP listener");
        let addr = listener.local_addr().unwrap();
        let received: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, stopped) = (received.clone(), stop.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                let sink = sink.clone();
                thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut buf = Vec::new();
                    let _ = stream.read_to_end(&mut buf);
                    let (lock, cvar) = &*sink;
                    lock.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf).into_owned());
                    cvar.notify_all();
                });
            }
        });
        Listener {
            addr,
            received,
            stop,
            tcp: true,
        }
    }

    pub fn udp(ip: IpAddr) -> Listener {
        let socket = UdpSocket::bind((ip, 0)).expect("bind UDP socket");
        let addr = socket.local_addr().unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let received: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, stopped) = (received.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stopped.load(Ordering::SeqCst) {
                if let Ok((n, _)) = socket.recv_from(&mut buf) {
                    let (lock, cvar) = &*sink;
                    lock.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                    cvar.notify_all();
                }
            }
        });
        Listener {
            addr,
            received,
            stop,
            tcp: false,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn received(&self) -> Vec<String> {
        self.received.0.lock().unwrap().clone()
    }

    /// Waits until something containing `needle` arrived.
    pub fn wait_for(&self, needle: &str) -> bool {
        let deadline = Instant::now() + TIMEOUT;
        let (lock, cvar) = &*self.received;
        let mut seen = lock.lock().unwrap();
        loop {
            if seen.iter().any(|s| s.contains(needle)) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            seen = cvar.wait_timeout(seen, deadline - now).unwrap().0;
        }
    }

    /// Asserts that the probe's token for `attempt` from `pid` arrived here.
    pub fn assert_reached_by(&self, pid: u64, attempt: &str) {
        let token = format!("egress-probe pid={pid} attempt={attempt}");
        assert!(
            self.wait_for(&token),
            "listener {} never received {token:?}; it received {:?}",
            self.addr,
            self.received()
        );
    }

    /// Asserts that nothing from `pid` arrived (call after the attempt was answered: a refused
    /// connect or datagram never reaches the socket).
    pub fn assert_not_reached_by(&self, pid: u64) {
        let token = format!("egress-probe pid={pid} ");
        let seen = self.received();
        assert!(
            !seen.iter().any(|s| s.contains(&token)),
            "listener {} received {token:?} although the attempt was refused: {seen:?}",
            self.addr
        );
    }

    /// Sends `payload` from this (unguarded) test process: TCP connect + write, or a datagram.
    pub fn send_unguarded(&self, payload: &str) -> std::io::Result<()> {
        send_unguarded(self.tcp, self.addr, payload)
    }
}

/// Sends `payload` to `dest` from the test process itself (outside any guarded cgroup).
pub fn send_unguarded(tcp: bool, dest: SocketAddr, payload: &str) -> std::io::Result<()> {
    if tcp {
        let mut stream = TcpStream::connect_timeout(&dest, TIMEOUT)?;
        stream.write_all(payload.as_bytes())?;
        stream.shutdown(std::net::Shutdown::Write)
    } else {
        let local: SocketAddr = if dest.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        UdpSocket::bind(local)?.send_to(payload.as_bytes(), dest)?;
        Ok(())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if self.tcp {
            // Wake the accept loop so it sees the flag.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        }
    }
}

impl ProbeRun {
    /// Exit status, stdout and stderr, for a failure message.
    pub fn report(&self) -> String {
        self.describe()
    }
}

/// A loopback HTTP/1.1 server for MCP servers to fetch from: every request is answered
/// `200 OK` with a small text body and `Connection: close`, and the connection is closed, so
/// each fetch is a connection of its own (one `connect()` for the kernel to judge, never a
/// pooled one). Records each request line (`GET /path HTTP/1.1`).
pub struct HttpResponder {
    pub addr: SocketAddr,
    requests: Arc<(Mutex<Vec<String>>, Condvar)>,
    stop: Arc<AtomicBool>,
}

impl HttpResponder {
    pub fn start(ip: IpAddr) -> HttpResponder {
        let listener = TcpListener::bind((ip, 0)).expect("bind HTTP responder");
        let addr = listener.local_addr().unwrap();
        let requests: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, stopped) = (requests.clone(), stop.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let sink = sink.clone();
                thread::spawn(move || {
                    let _ = answer_one_request(stream, &sink);
                });
            }
        });
        HttpResponder {
            addr,
            requests,
            stop,
        }
    }

    /// `http://ADDR/path` (`path` starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The request lines received so far, in arrival order.
    pub fn request_lines(&self) -> Vec<String> {
        self.requests.0.lock().unwrap().clone()
    }

    /// Waits (up to [`TIMEOUT`], a safety net) until at least `n` requests arrived.
    pub fn wait_for_requests(&self, n: usize) -> bool {
        let deadline = Instant::now() + TIMEOUT;
        let (lock, cvar) = &*self.requests;
        let mut seen = lock.lock().unwrap();
        loop {
            if seen.len() >= n {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            seen = cvar.wait_timeout(seen, deadline - now).unwrap().0;
        }
    }
}

fn answer_one_request(
    stream: TcpStream,
    sink: &Arc<(Mutex<Vec<String>>, Condvar)>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The rest of the head; a GET has no body.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
            break;
        }
    }
    {
        let (lock, cvar) = &**sink;
        lock.lock()
            .unwrap()
            .push(request_line.trim_end().to_string());
        cvar.notify_all();
    }
    let body = "fetched from the test's HTTP responder\n";
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)
}

impl Drop for HttpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

// ---------------------------------------------------------------------------------------------
// The MCP proxy: real peers, the official SDK client, raw HTTP
// ---------------------------------------------------------------------------------------------

/// The principal the proxy tests' HTTP front attributes requests to (`daemon.principal`).
pub const AGENT: &str = "agent";
/// The role [`AGENT`] holds in [`TestEnv::proxy_policy`].
pub const DEVELOPER: &str = "developer";

/// Safety net for one client run: a whole script of operations, each of which the client
/// also bounds on its own. Never a performance threshold.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Where `cargo xtask setup` installs the real MCP peers: `$MCP_GUARD_PEERS_DIR` (relative to
/// the workspace root), else `<workspace>/target/mcp-peers`.
pub fn peers_dir() -> PathBuf {
    match std::env::var_os("MCP_GUARD_PEERS_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target").join("mcp-peers"),
    }
}

/// `tests/clients/<name>`: the Python drivers (`mcp_client.py`, `raw_http.py`).
pub fn client_script(name: &str) -> PathBuf {
    workspace_root().join("tests").join("clients").join(name)
}

/// The real third-party MCP servers and the Python SDK the proxy tests run. Missing peers fail
/// the test (they are never skipped): `cargo xtask setup` installs them.
pub struct Peers {
    pub dir: PathBuf,
    /// The peers venv's interpreter (it has the `mcp` SDK the client drivers import).
    pub python: PathBuf,
    /// Node.js, absolute, for the npm servers.
    pub node: PathBuf,
}

impl Peers {
    pub fn require() -> Peers {
        let dir = peers_dir();
        let peers = Peers {
            python: dir.join("venv").join("bin").join("python"),
            node: find_program("node").unwrap_or_else(|| {
                panic!(
                    "node is not on PATH: the npm MCP servers need Node.js 18+ \
                     (then run `cargo xtask setup`)"
                )
            }),
            dir,
        };
        let needed = [
            peers.python.clone(),
            peers.time_binary(),
            peers.everything_entry(),
            peers.filesystem_entry(),
            client_script("mcp_client.py"),
            client_script("raw_http.py"),
            client_script("oauth_server.py"),
            client_script("ts_client.mjs"),
        ];
        let missing: Vec<String> = needed
            .iter()
            .filter(|path| !path.exists())
            .map(|path| path.display().to_string())
            .collect();
        assert!(
            missing.is_empty(),
            "the real MCP peers are not installed (missing: {}): run `cargo xtask setup`, which \
             installs @modelcontextprotocol/server-everything, server-filesystem, mcp-server-time \
             and the Python SDK into {}",
            missing.join(", "),
            peers.dir.display()
        );
        peers
    }

    fn everything_entry(&self) -> PathBuf {
        self.dir
            .join("node_modules/@modelcontextprotocol/server-everything/dist/index.js")
    }

    fn filesystem_entry(&self) -> PathBuf {
        self.dir
            .join("node_modules/@modelcontextprotocol/server-filesystem/dist/index.js")
    }

    fn time_binary(&self) -> PathBuf {
        self.dir.join("venv").join("bin").join("mcp-server-time")
    }

    /// `@modelcontextprotocol/server-everything` over Streamable HTTP on 127.0.0.1 (its
    /// `streamableHttp` transport, pinned to loopback by `listen_localhost.mjs`); run it with
    /// `PORT=0` and read `MCP_PEER_LISTENING <port>` from its stderr.
    pub fn everything_http(&self) -> Vec<String> {
        vec![
            self.node.display().to_string(),
            "--import".into(),
            client_script("listen_localhost.mjs").display().to_string(),
            self.everything_entry().display().to_string(),
            "streamableHttp".into(),
        ]
    }

    /// `@modelcontextprotocol/server-everything` over stdio.
    pub fn everything(&self) -> Vec<String> {
        vec![
            self.node.display().to_string(),
            self.everything_entry().display().to_string(),
            "stdio".into(),
        ]
    }

    /// `@modelcontextprotocol/server-filesystem` serving `root` (its only allowed directory).
    pub fn filesystem(&self, root: &Path) -> Vec<String> {
        vec![
            self.node.display().to_string(),
            self.filesystem_entry().display().to_string(),
            root.display().to_string(),
        ]
    }

    /// `mcp-server-time` (PyPI) served over Streamable HTTP by `time_http_server.py` (see
    /// PEERS.md), on a free port it announces as `MCP_PEER_LISTENING <port>` on stderr.
    pub fn time_http(&self, extra: &[&str]) -> Vec<String> {
        self.python_script("time_http_server.py", extra)
    }

    /// A Python SDK server that closes a call's event stream mid-call, to be polled
    /// (`polling_http_server.py`, see PEERS.md); it announces its port like `time_http`.
    pub fn polling_http(&self, extra: &[&str]) -> Vec<String> {
        self.python_script("polling_http_server.py", extra)
    }

    /// An OAuth authorization server built on the Python SDK's own routes
    /// (`oauth_server.py`, see PEERS.md): it approves every request for one subject and signs
    /// RS256 tokens meant for the resource the client names; it prints `{"issuer": ...}` on
    /// stdout once it listens.
    pub fn oauth_server(&self, extra: &[&str]) -> Vec<String> {
        self.python_script("oauth_server.py", extra)
    }

    /// One of `tests/clients/`'s Python scripts, run by the peers' venv, with `extra` arguments.
    fn python_script(&self, script: &str, extra: &[&str]) -> Vec<String> {
        let mut command = vec![
            self.dir.join("venv/bin/python").display().to_string(),
            client_script(script).display().to_string(),
        ];
        command.extend(extra.iter().map(|arg| arg.to_string()));
        command
    }

    /// `mcp-server-time` (PyPI) over stdio, local time zone UTC.
    pub fn time(&self) -> Vec<String> {
        vec![
            self.time_binary().display().to_string(),
            "--local-timezone".into(),
            "UTC".into(),
        ]
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

impl TestEnv {
    /// A whole policy for the proxy tests: this environment's `daemon` locations, the MCP front
    /// on `listen`, its callers attributed to [`AGENT`] (role [`DEVELOPER`]), and `servers`.
    pub fn proxy_policy(&self, listen: SocketAddr, servers: Value) -> Value {
        let mut document = self.policy(servers);
        document["daemon"]["listen"] = json!(listen.to_string());
        document["daemon"]["principal"] = json!(AGENT);
        document["principals"] = json!({ AGENT: { "roles": [DEVELOPER] } });
        document
    }

    /// Sets each field of `fields` (an object) in `document`'s `section` (`audit`, `daemon`).
    pub fn set_settings(document: &mut Value, section: &str, fields: &Value) {
        for (field, value) in fields.as_object().expect("settings") {
            document[section][field] = value.clone();
        }
    }

    /// Writes a whole policy document atomically (a reload never reads half a file).
    pub fn write_policy_document(&self, document: &Value) {
        let text = serde_json::to_string_pretty(document).unwrap();
        let tmp = self.policy_path.with_extension("json.tmp");
        std::fs::write(&tmp, text).expect("write policy");
        std::fs::rename(&tmp, &self.policy_path).expect("rename policy");
    }

    /// `<cgroup root>/<server>/<session>`: where the daemon runs a session's server process.
    pub fn session_cgroup(&self, server: &str, session: &str) -> PathBuf {
        self.cgroup_root.join(server).join(session)
    }
}

/// How the SDK client reaches its server.
pub enum Transport<'a> {
    /// Streamable HTTP at this URL.
    Http(&'a str),
    /// Streamable HTTP over TLS at this `https://` URL, trusting the CA certificate in the file.
    Https { url: &'a str, ca_file: &'a Path },
    /// Streamable HTTP at this URL, authenticated by the SDK's OAuth client (`--oauth`): it
    /// finds the authorisation server from the server's 401 and gets a token on its own.
    OAuth(&'a str),
    /// A stdio server started by the client: program and arguments.
    Stdio(&'a [String]),
}

/// What `mcp_client.py` printed: the connect line and one line per operation of the script.
pub struct ClientRun {
    pub initialize: Value,
    pub results: Vec<Value>,
    pub run: ProbeRun,
}

/// The names of the tools in a `tools/list` result; fails the test when it has no tool list.
pub fn tool_names(list_result: &Value) -> BTreeSet<String> {
    list_result["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("no tools in {list_result}"))
        .iter()
        .map(|tool| tool["name"].as_str().expect("tool name").to_string())
        .collect()
}

/// Every page of the list `method` (`resources/list`, `prompts/list`, ...), first to last: the
/// `result` of each, following each page's `nextCursor`. `ask` sends one request (method,
/// params) and returns its JSON-RPC answer. Fails the test on an error answer, or past 100
/// pages.
pub fn list_pages(method: &str, mut ask: impl FnMut(&str, Value) -> Value) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut params = json!({});
    loop {
        let answer = ask(method, params.clone());
        let page = answer
            .get("result")
            .cloned()
            .unwrap_or_else(|| panic!("{method} page {}: {answer}", pages.len() + 1));
        let next = page.get("nextCursor").cloned();
        pages.push(page);
        match next {
            Some(cursor) => params = json!({"cursor": cursor}),
            None => return pages,
        }
        assert!(pages.len() < 100, "{method}: over 100 pages: {pages:?}");
    }
}

impl ClientRun {
    /// The `result` of operation `i`; fails the test if that operation failed.
    pub fn ok(&self, i: usize) -> &Value {
        let line = &self.results[i];
        assert_eq!(
            line["ok"],
            true,
            "operation {i} failed: {line}\n{}",
            self.run.report()
        );
        &line["result"]
    }

    /// The JSON-RPC `error` of operation `i`; fails the test if that operation succeeded.
    pub fn error(&self, i: usize) -> &Value {
        let line = &self.results[i];
        assert_eq!(
            line["ok"],
            false,
            "operation {i} was expected to fail: {line}\n{}",
            self.run.report()
        );
        &line["error"]
    }
}

/// Runs the official Python SDK client (`tests/clients/mcp_client.py`) through `script` (a
/// JSON list of operations) at `protocol_version`, printing only the fields the server sent
/// (`--wire-fields`) and with no tools/list of its own before calls
/// (`--no-output-validation`), so that every operation is exactly one request on the wire.
/// Fails the test unless the client connected and answered every operation.
pub fn mcp_client(
    peers: &Peers,
    transport: Transport<'_>,
    protocol_version: &str,
    script: &Value,
) -> ClientRun {
    let (file, ops) = script_file(script);
    let mut cmd = Command::new(&peers.python);
    cmd.arg(client_script("mcp_client.py"))
        .args(["--protocol-version", protocol_version])
        .args(["--wire-fields", "--no-output-validation", "--timeout", "30"])
        .arg("--script")
        .arg(file.path());
    let what = format!(
        "mcp_client.py {} at {protocol_version}",
        transport_arguments(&mut cmd, transport)
    );
    client_run(cmd, &what, ops)
}

/// Adds the client drivers' (`mcp_client.py`, `ts_client.mjs`) options for `transport`, last
/// (`--command` takes the rest of the line), and says how the driver reaches the server.
fn transport_arguments(cmd: &mut Command, transport: Transport<'_>) -> String {
    match transport {
        Transport::Http(url) => {
            cmd.args(["--transport", "http", "--url", url]);
            format!("over HTTP to {url}")
        }
        Transport::OAuth(url) => {
            cmd.args(["--transport", "http", "--url", url, "--oauth"]);
            format!("with OAuth over HTTP to {url}")
        }
        Transport::Https { url, ca_file } => {
            cmd.args(["--transport", "http", "--url", url, "--ca-file"])
                .arg(ca_file);
            format!("over HTTPS to {url}")
        }
        Transport::Stdio(command) => {
            cmd.args(["--transport", "stdio", "--command"])
                .args(command);
            format!("over stdio to `{}`", command.join(" "))
        }
    }
}

/// Runs the official TypeScript SDK client (`tests/clients/ts_client.mjs`, the SDK from the
/// peers' node_modules) through `script`, over Streamable HTTP or stdio (it negotiates the
/// SDK's own latest revision). Fails the test unless it connected and answered every
/// operation.
pub fn ts_client(peers: &Peers, transport: Transport<'_>, script: &Value) -> ClientRun {
    let (file, ops) = script_file(script);
    let mut cmd = Command::new(&peers.node);
    cmd.arg(client_script("ts_client.mjs"))
        .arg("--peers")
        .arg(&peers.dir)
        .args(["--timeout", "30", "--script"])
        .arg(file.path());
    if let Transport::Https { .. } = transport {
        panic!("ts_client.mjs speaks plain HTTP and stdio only");
    }
    let what = format!("ts_client.mjs {}", transport_arguments(&mut cmd, transport));
    client_run(cmd, &what, ops)
}

/// A client driver's script in a file of its own, and its number of operations.
fn script_file(script: &Value) -> (tempfile::NamedTempFile, usize) {
    let mut file = tempfile::NamedTempFile::new().expect("script file");
    file.write_all(script.to_string().as_bytes())
        .expect("write script");
    (file, script.as_array().map_or(0, Vec::len))
}

/// Runs a client driver (`mcp_client.py`, `ts_client.mjs`) to its end: its connect line and
/// one line for each of the `ops` operations.
fn client_run(cmd: Command, what: &str, ops: usize) -> ClientRun {
    let run = run_command_within(cmd, what, CLIENT_TIMEOUT);
    let initialize = run
        .lines
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("{what} printed nothing:\n{}", run.report()));
    assert!(
        run.status.success() && initialize["op"] == "initialize" && initialize["ok"] == true,
        "{what} did not connect:\n{}",
        run.report()
    );
    let results: Vec<Value> = run.lines[1..].to_vec();
    assert_eq!(
        results.len(),
        ops,
        "{what} answered {} of {ops} operations:\n{}",
        results.len(),
        run.report()
    );
    ClientRun {
        initialize,
        results,
        run,
    }
}

/// Runs `tests/clients/raw_http.py --url URL ARGS...` and returns what it printed (status,
/// headers, body or SSE events). Fails the test when no HTTP response arrived.
pub fn raw_http(peers: &Peers, url: &str, args: &[&str]) -> Value {
    let mut cmd = Command::new(&peers.python);
    cmd.arg(client_script("raw_http.py"))
        .args(["--url", url])
        .args(args);
    let what = format!("raw_http.py {url} {args:?}");
    let run = run_command_within(cmd, &what, CLIENT_TIMEOUT);
    let output = run
        .lines
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("{what} printed nothing:\n{}", run.report()));
    assert!(
        run.status.success() && output["status"].is_u64(),
        "{what}: no HTTP response:\n{}",
        run.report()
    );
    output
}

/// The JSON-RPC answer in a `raw_http.py` output: the JSON body, or the first SSE event that
/// is a response (or a batch of them).
pub fn response_message(output: &Value) -> Value {
    if !output["body"].is_null() {
        return output["body"].clone();
    }
    output["events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|event| &event["data"])
        .find(|data| data.is_array() || data.get("result").is_some() || data.get("error").is_some())
        .cloned()
        .unwrap_or(Value::Null)
}

/// Opens a session at `url` with the initialize handshake at `version` (then
/// `notifications/initialized` and a ping inside the session) through `raw_http.py`, and
/// returns its `Mcp-Session-Id`. For tests that keep one session across daemon-side changes.
pub fn open_raw_session(peers: &Peers, url: &str, version: &str) -> String {
    let ping = json!({"jsonrpc": "2.0", "id": "after-initialize", "method": "ping"});
    let output = raw_http(
        peers,
        url,
        &["--initialize", version, "--body", &ping.to_string()],
    );
    let initialize = &output["initialize"];
    assert_eq!(initialize["status"], 200, "initialize: {output}");
    assert_eq!(
        initialize["response"]["result"]["protocolVersion"], version,
        "initialize: {output}"
    );
    assert_eq!(
        initialize["initialized_status"], 202,
        "notifications/initialized: {output}"
    );
    assert_eq!(output["status"], 200, "ping in the new session: {output}");
    initialize["session_id"]
        .as_str()
        .unwrap_or_else(|| panic!("initialize answered without Mcp-Session-Id: {output}"))
        .to_string()
}

/// POSTs `body` at `url` inside the session `session` opened at `version`; what
/// `raw_http.py` printed.
pub fn post_in_session(
    peers: &Peers,
    url: &str,
    session: &str,
    version: &str,
    body: &Value,
) -> Value {
    let version = format!("MCP-Protocol-Version: {version}");
    raw_http(
        peers,
        url,
        &[
            "--session",
            session,
            "--header",
            &version,
            "--body",
            &body.to_string(),
        ],
    )
}

/// Every record of the audit log at `path`, in file order (none while it does not exist).
pub fn audit_records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    whole_lines(&text)
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("{}: not JSON ({err}): {line}", path.display()))
        })
        .collect()
}

/// The lines of a log that its writer has finished: a read that meets an append half done
/// sees a last line with no newline yet, which is left out.
pub fn whole_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive('\n')
        .filter_map(|line| line.strip_suffix('\n'))
}

/// The status line and headers of an HTTP/1.1 response, with the connection still open (to
/// read an SSE stream further, or to drop it).
pub struct HttpHead {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
}

impl HttpHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Reads the response (an SSE stream, say) until what arrived contains `needle`; what
    /// arrived so far. `timeout` is a safety net, as for [`HttpHead::read_until_closed`].
    pub fn read_until_contains(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> std::io::Result<String> {
        match self.read_until(timeout, |seen| {
            String::from_utf8_lossy(seen).contains(needle)
        })? {
            (seen, true) => Ok(String::from_utf8_lossy(&seen).into_owned()),
            (seen, false) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "closed before {needle:?}: {}",
                    String::from_utf8_lossy(&seen)
                ),
            )),
        }
    }

    /// Reads until `done` says what arrived is enough (`true` with it) or the connection
    /// closes (`false`); a `TimedOut` error once `timeout` passes.
    fn read_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[u8]) -> bool,
    ) -> std::io::Result<(Vec<u8>, bool)> {
        let deadline = Instant::now() + timeout;
        self.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return Ok((seen, false)),
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    if done(&seen) {
                        return Ok((seen, true));
                    }
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(err) => return Err(err),
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "nothing conclusive within {timeout:?}; received: {:?}",
                        String::from_utf8_lossy(&seen)
                    ),
                ));
            }
        }
    }

    /// Reads the rest of the response until the server ends it: the connection closes or the
    /// chunked body's last chunk arrives. An SSE stream that keeps sending (keep-alive
    /// comments) never times out on its own, so `timeout` (a safety net) bounds the whole
    /// read: an error of kind `TimedOut` if it passes first.
    pub fn read_until_closed(mut self, timeout: Duration) -> std::io::Result<String> {
        // A chunked body ends with the zero-length chunk; the connection itself may stay open
        // for keep-alive.
        let (rest, _) = self.read_until(timeout, |seen| seen.ends_with(b"0\r\n\r\n"))?;
        Ok(String::from_utf8_lossy(&rest).into_owned())
    }
}

/// Sends `method path` with `headers` (no body) and reads only the response head.
pub fn http_request_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpHead> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    Ok(HttpHead {
        status,
        headers,
        reader,
    })
}

/// The pids in a cgroup right now (empty if it does not exist).
pub fn cgroup_pids(cgroup: &Path) -> Vec<i32> {
    read_pids(&cgroup.join("cgroup.procs"))
}

/// Polls `condition` until it holds or `timeout` (a safety net) passes.
pub fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `pid` no longer exists (a zombie still does: its parent has not reaped it).
pub fn process_gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `pid` no longer runs: gone, or a zombie (it has ended; its parent, or init once the
/// parent exited, has yet to reap it).
pub fn process_ended(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // `pid (comm) S ...`: the state follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// Waits up to `timeout` for process `pid` to end (exit or be killed); fails the test naming
/// `what` it is and, if it still runs, its command line.
pub fn assert_process_ends(pid: i32, timeout: std::time::Duration, what: &str) {
    assert!(
        poll_until(timeout, || process_ended(pid)),
        "{what} (pid {pid}): it still runs as `{}`",
        process_cmdline(pid)
    );
}

/// A minimal MCP server (python3, handshake revisions) that outlives its input: it answers
/// `initialize`, `tools/list` (no tools) and anything else with `{}`, writes its pid to
/// `pid_file` first, ignores SIGTERM, and keeps running after stdin closes. Only SIGKILL
/// stops it, so a test that sees it gone knows it was killed.
pub fn lingering_server(pid_file: &Path) -> Vec<String> {
    const SCRIPT: &str = r#"
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message:
        continue
    if message.get("method") == "initialize":
        result = {"protocolVersion": message["params"]["protocolVersion"],
                  "capabilities": {"tools": {}}, "serverInfo": {"name": "lingering", "version": "0"}}
    elif message.get("method") == "tools/list":
        result = {"tools": []}
    else:
        result = {}
    print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
while True:
    time.sleep(3600)
"#;
    vec![
        "python3".into(),
        "-c".into(),
        SCRIPT.into(),
        pid_file.display().to_string(),
    ]
}

/// `server` run by a wrapper script that first starts a background `sleep` (detached from the
/// server's stdio) and writes its pid to `pid_file`: a process the server leaves running.
pub fn leaving_a_sleep(pid_file: &Path, server: &str) -> Vec<String> {
    vec![
        "/bin/sh".to_string(),
        "-c".into(),
        r#"sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > "$1"; exec "$2""#.into(),
        "leaves-a-sleep".into(),
        pid_file.display().to_string(),
        server.into(),
    ]
}

/// A command that starts `sleep SECONDS` in a session of its own (`setsid`), from a subshell
/// that exits at once (so the sleep leaves both its parent and the server's process group, as
/// a daemonising server's helper would), writes the sleep's pid to `pid_file`, then runs
/// `server`.
pub fn leaving_an_escaped_sleep(pid_file: &Path, seconds: &str, server: &str) -> Vec<String> {
    vec![
        "/bin/sh".to_string(),
        "-c".into(),
        r#"(setsid sleep "$3" </dev/null >/dev/null 2>&1 & echo $! > "$1"); exec "$2""#.into(),
        "leaves-an-escaped-sleep".into(),
        pid_file.display().to_string(),
        server.into(),
        seconds.into(),
    ]
}

/// The session id of a running process (`/proc/PID/stat`), or `None` once it is gone.
pub fn session_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp session ...`: fields counted from the last `)`.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_ascii_whitespace().nth(3)?.parse().ok()
}

/// The pid a process wrote to `pid_file` (waits for the file, then fails the test).
pub fn pid_from_file(pid_file: &Path) -> i32 {
    let mut pid = None;
    assert!(
        poll_until(TIMEOUT, || {
            pid = std::fs::read_to_string(pid_file)
                .ok()
                .and_then(|text| text.trim().parse().ok());
            pid.is_some()
        }),
        "no pid in {}",
        pid_file.display()
    );
    pid.unwrap()
}

/// `/proc/<pid>/cgroup`'s cgroup v2 path (`0::/a/b` → `/a/b`).
pub fn process_cgroup(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
}

/// The environment of a process, as `KEY=VALUE` pairs.
pub fn process_environ(pid: i32) -> Vec<(String, String)> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            entry
                .split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// `/proc/<pid>/cmdline`, arguments joined by spaces.
pub fn process_cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
        .trim()
        .to_string()
}

/// An MCP rule: `{"id", "description", "effect"}` plus `conditions` (`roles`, `methods`,
/// `tools`, `arguments`, ...).
pub fn mcp_rule(id: &str, effect: &str, description: &str, conditions: Value) -> Value {
    let mut rule = json!({"id": id, "description": description, "effect": effect});
    for (key, value) in conditions.as_object().expect("conditions object") {
        rule[key] = value.clone();
    }
    rule
}

/// Replaces the file at `path` with `contents` as deployment tools do: a new file renamed over
/// it, so that a reader sees the old file or the new one, never half of it.
pub fn replace_file(path: &Path, contents: &[u8]) {
    let next = path.with_extension("next");
    std::fs::write(&next, contents).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// What the bench binaries (`tests/bin/*_bench.rs`) share.
pub mod policy_mix;

pub mod bench {
    /// A flag's number, or the line saying it is not one.
    pub fn parse_number<T: std::str::FromStr>(text: &str) -> Result<T, String> {
        text.parse().map_err(|_| format!("not a number: {text}"))
    }

    /// The sample at `pct` percent of `sorted` (nearest rank, rounding down; never past the
    /// last). `sorted` must not be empty.
    pub fn percentile(sorted: &[u64], pct: usize) -> u64 {
        sorted[(sorted.len() * pct / 100).min(sorted.len() - 1)]
    }
}

/// A file of mcp-guard's identity test data (`mcp-guard/src/identity/testdata`): the key pairs
/// and JWKS the bearer-token tests and the identity bench sign and verify with.
pub fn identity_testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../mcp-guard/src/identity/testdata")
        .join(name)
}

/// A JWT of `claims` signed with the test key of `alg`: RS256 and ES256 with the private keys
/// of the JWKS entries `rsa-1` and `ec-1` (their `kid` in the header), HS256 with
/// `hs256_secret`.
pub fn sign_test_token(
    alg: jsonwebtoken::Algorithm,
    claims: &Value,
    hs256_secret: &str,
) -> Result<String, String> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let read = |name: &str| {
        std::fs::read(identity_testdata(name))
            .map_err(|e| format!("{}: {e}", identity_testdata(name).display()))
    };
    let (key, kid) = match alg {
        Algorithm::RS256 => (
            EncodingKey::from_rsa_pem(&read("rsa_private.pem")?).map_err(|e| e.to_string())?,
            Some("rsa-1"),
        ),
        Algorithm::ES256 => (
            EncodingKey::from_ec_pem(&read("ec_private.pem")?).map_err(|e| e.to_string())?,
            Some("ec-1"),
        ),
        Algorithm::HS256 => (EncodingKey::from_secret(hs256_secret.as_bytes()), None),
        other => return Err(format!("no test key for {other:?}")),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| e.to_string())
}

/// An allow rule (see [`mcp_rule`]).
pub fn allow(id: &str, conditions: Value) -> Value {
    mcp_rule(id, "allow", "allowed in this test", conditions)
}

/// Rules for server-everything's resource updates: the developer may turn them on, subscribe
/// to any URI, and read only `demo://visible/*`.
pub fn subscribe_any_read_visible_rules() -> Vec<Value> {
    vec![
        allow(
            "toggle",
            json!({"roles": [DEVELOPER], "tools": ["toggle-subscriber-updates"]}),
        ),
        allow(
            "subscribe",
            json!({"roles": [DEVELOPER], "methods": ["resources/subscribe"]}),
        ),
        allow(
            "read-visible",
            json!({"roles": [DEVELOPER], "resources": ["demo://visible/*"]}),
        ),
    ]
}

/// A deny rule (see [`mcp_rule`]).
pub fn deny(id: &str, conditions: Value) -> Value {
    mcp_rule(id, "deny", "denied in this test", conditions)
}

/// [`DEVELOPER`]s may list tools (the list is filtered to what they may call).
pub fn list_tools_rule() -> Value {
    allow(
        "list-tools",
        json!({"roles": [DEVELOPER], "methods": ["tools/list"]}),
    )
}

/// A stdio MCP server spawned per session, reaching nothing on the network.
pub fn stdio_server(command: Vec<String>, rules: Vec<Value>) -> Value {
    json!({"command": command, "egress": [], "rules": rules})
}

/// mcp-fast-server (`binary`: the test's `CARGO_BIN_EXE_mcp-fast-server`) spawned per session,
/// reaching nothing: [`DEVELOPER`]s may list its tools and call `tools` (rule `tools`).
pub fn fast_server_calling(binary: &str, tools: &[&str]) -> Value {
    let rules = vec![
        list_tools_rule(),
        allow("tools", json!({"roles": [DEVELOPER], "tools": tools})),
    ];
    stdio_server(vec![binary.to_owned()], rules)
}

/// A Streamable HTTP MCP server at `http://127.0.0.1:{port}/mcp`.
pub fn url_server(port: impl std::fmt::Display, rules: Vec<Value>) -> Value {
    json!({"url": format!("http://127.0.0.1:{port}/mcp"), "rules": rules})
}

/// `/metrics` of a daemon, parsed by a real Prometheus text-format parser.
pub fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let (status, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text")
}

/// A counter's, gauge's or untyped sample's value.
pub fn sample_value(value: &prometheus_parse::Value) -> f64 {
    match value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("not a single value: {other:?}"),
    }
}

/// The one sample of `metric` with `labels`, or 0 when absent.
pub fn metric(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| sample_value(&s.value))
        .collect();
    assert!(matching.len() <= 1, "{metric} {labels:?}: several samples");
    matching.first().copied().unwrap_or(0.0)
}

/// Runs the `mcp-guard` CLI with `args` and collects what it printed.
pub fn mcp_guard(args: &[&str]) -> ProbeRun {
    let mut cmd = Command::new(daemon_binary());
    cmd.args(args);
    run_command(cmd, &format!("mcp-guard {}", args.join(" ")))
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

// ---------------------------------------------------------------------------------------------
// Mutated messages: bad input an agent could send, derived from good input
// ---------------------------------------------------------------------------------------------

/// Derives malformed and odd messages from valid ones, deterministically from a seed (so a
/// failure can be replayed): values replaced with other types, extremes and deep nesting at
/// any place in the message, keys removed or added, methods and ids swapped, messages batched,
/// and the serialised bytes flipped, cut, spliced or made invalid UTF-8.
pub struct Mutator {
    state: u64,
}

/// Methods a mutated message may be given instead of its own (`initialize` left out: a new
/// session per message would only measure process start-up).
const MUTATED_METHODS: &[&str] = &[
    "tools/call",
    "tools/list",
    "resources/read",
    "resources/list",
    "resources/templates/list",
    "resources/subscribe",
    "prompts/get",
    "prompts/list",
    "completion/complete",
    "logging/setLevel",
    "ping",
    "server/discover",
    "notifications/cancelled",
    "notifications/progress",
    "notifications/initialized",
    "notifications/roots/list_changed",
    "sampling/createMessage",
    "",
    "rpc.discover",
    "tools/call/../list",
];

impl Mutator {
    /// The seed is `MCP_GUARD_MUTATION_SEED` when set (to replay a failure), else `default`.
    pub fn from_env_or(default: u64) -> (Mutator, u64) {
        let seed = std::env::var("MCP_GUARD_MUTATION_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default);
        (Mutator::from_seed(seed), seed)
    }

    pub fn from_seed(seed: u64) -> Mutator {
        // splitmix64 of the seed: neighbouring seeds give unrelated sequences, and the state
        // is never 0 (where xorshift stays).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Mutator {
            state: (z ^ (z >> 31)) | 1,
        }
    }

    /// xorshift64*: small, fast, and the same sequence on every machine.
    fn next(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// One to three mutations of `message`, then its bytes (mutated themselves one time in
    /// five), and one time in eight several such messages as a batch.
    pub fn mutate(&mut self, corpus: &[Value]) -> Vec<u8> {
        if self.chance(12) {
            let count = 1 + self.below(6);
            let batch: Vec<Value> = (0..count).map(|_| self.mutated_value(corpus)).collect();
            return self.maybe_mangled(Value::Array(batch).to_string().into_bytes());
        }
        let message = self.mutated_value(corpus);
        self.maybe_mangled(message.to_string().into_bytes())
    }

    fn mutated_value(&mut self, corpus: &[Value]) -> Value {
        let mut message = self.pick(corpus).clone();
        for _ in 0..1 + self.below(3) {
            self.mutate_value(&mut message);
        }
        message
    }

    fn maybe_mangled(&mut self, bytes: Vec<u8>) -> Vec<u8> {
        if self.chance(20) {
            self.mangle(bytes)
        } else {
            bytes
        }
    }

    fn mutate_value(&mut self, message: &mut Value) {
        match self.below(6) {
            0 => message["method"] = json!(*self.pick(MUTATED_METHODS)),
            1 => {
                let id = self.odd_value(1);
                match message.as_object_mut() {
                    Some(object) if self.chance(20) => {
                        object.remove("id");
                    }
                    Some(object) => {
                        object.insert("id".into(), id);
                    }
                    None => {}
                }
            }
            2 if self.chance(50) => message["jsonrpc"] = self.odd_value(1),
            _ => {
                let depth = self.below(5);
                let value = self.odd_value(0);
                // Mostly inside `params`, where the pipeline reads most; the envelope has
                // its own cases above.
                let in_params = self.chance(75);
                match message.get_mut("params") {
                    Some(params) if in_params => self.replace_somewhere(params, depth, value),
                    _ => self.replace_somewhere(message, depth, value),
                }
            }
        }
    }

    /// Replaces, removes or adds a member somewhere at most `depth` levels down.
    fn replace_somewhere(&mut self, node: &mut Value, depth: usize, value: Value) {
        match node {
            Value::Object(object) if !object.is_empty() => {
                let keys: Vec<String> = object.keys().cloned().collect();
                let key = self.pick(&keys).clone();
                if depth > 0 && (object[&key].is_object() || object[&key].is_array()) {
                    return self.replace_somewhere(&mut object[&key], depth - 1, value);
                }
                match self.below(4) {
                    0 => {
                        object.remove(&key);
                    }
                    1 => {
                        let extra = *self.pick(&[
                            "_meta",
                            "cursor",
                            "progressToken",
                            "id",
                            "name",
                            "uri",
                            "arguments",
                        ]);
                        object.insert(extra.into(), value);
                    }
                    _ => {
                        object.insert(key, value);
                    }
                }
            }
            Value::Array(items) if !items.is_empty() => {
                let at = self.below(items.len());
                if depth > 0 {
                    self.replace_somewhere(&mut items[at], depth - 1, value);
                } else {
                    items[at] = value;
                }
            }
            other => *other = value,
        }
    }

    /// A value of an unexpected type or size; `for_id` leans towards what ids could be.
    fn odd_value(&mut self, for_id: usize) -> Value {
        let nested = |depth: usize| -> Value {
            let mut value = json!(1);
            for _ in 0..depth {
                value = json!([value]);
            }
            value
        };
        match self.below(16 - for_id * 4) {
            0 => Value::Null,
            1 => json!(true),
            2 => json!(-1),
            3 => json!(1.5),
            4 => json!(u64::MAX),
            5 => serde_json::from_str("1e308").unwrap(),
            6 => json!(""),
            7 => json!("\u{0}\u{202e}é😀"),
            8 => json!([]),
            9 => json!({}),
            10 => json!("x".repeat(1 + self.below(20_000))),
            11 => nested(2 + self.below(200)),
            12 => json!({"__proto__": {"admin": true}, "constructor": null}),
            13 => json!("../../../../etc/passwd"),
            14 => json!({"name": "write_file", "arguments": {"path": "/tmp/x", "content": "x"}}),
            _ => json!(7),
        }
    }

    /// Byte-level damage: a flipped byte, a cut, a splice, invalid UTF-8 or a NUL.
    fn mangle(&mut self, mut bytes: Vec<u8>) -> Vec<u8> {
        if bytes.is_empty() {
            return bytes;
        }
        let at = self.below(bytes.len());
        match self.below(5) {
            0 => bytes[at] ^= 1 << self.below(8),
            1 => bytes.truncate(at),
            2 => {
                let end = (at + 1 + self.below(40)).min(bytes.len());
                let chunk = bytes[at..end].to_vec();
                let to = self.below(bytes.len());
                bytes.splice(to..to, chunk);
            }
            3 => bytes.insert(at, *self.pick(&[0xff, 0xc0, 0xed, 0x80])),
            _ => bytes.insert(at, 0),
        }
        bytes
    }
}

/// The valid messages the mutation tests start from: calls of tools the policy allows, hides
/// and denies (server-filesystem over `root`), lists, reads, completions, cancellations and
/// progress, and an answer to a request the server never sent.
pub fn filesystem_corpus(root: &Path) -> Vec<Value> {
    let path = |name: &str| root.join(name).display().to_string();
    let call = |id: i64, name: &str, arguments: Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": name, "arguments": arguments}})
    };
    let request = |id: i64, method: &str, params: Value| json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    vec![
        call(1, "read_text_file", json!({"path": path("readme.txt")})),
        call(2, "list_directory", json!({"path": path("")})),
        call(
            3,
            "write_file",
            json!({"path": path("written.txt"), "content": "must not be"}),
        ),
        call(
            4,
            "edit_file",
            json!({"path": path("readme.txt"), "edits": [{"oldText": "hello", "newText": "owned"}]}),
        ),
        request(5, "tools/list", json!({})),
        request(6, "resources/list", json!({"cursor": "abc"})),
        request(7, "prompts/get", json!({"name": "p", "arguments": {}})),
        request(
            8,
            "resources/read",
            json!({"uri": format!("file://{}", path("readme.txt"))}),
        ),
        request(
            9,
            "completion/complete",
            json!({"ref": {"type": "ref/prompt", "name": "p"},
                                                 "argument": {"name": "a", "value": "b"}}),
        ),
        request(10, "ping", json!({"_meta": {"progressToken": 10}})),
        json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
               "params": {"requestId": 1, "reason": "mutated"}}),
        json!({"jsonrpc": "2.0", "method": "notifications/progress",
               "params": {"progressToken": 1, "progress": 1}}),
        json!({"jsonrpc": "2.0", "id": 11, "result": {"roots": []}}),
    ]
}

/// server-filesystem over `root` as `files`, for the mutation tests: reads allowed, every
/// tool that writes denied.
pub fn read_only_files_server(peers: &Peers, root: &Path) -> Value {
    stdio_server(
        peers.filesystem(root),
        vec![
            list_tools_rule(),
            allow(
                "read-files",
                json!({"roles": [DEVELOPER], "tools": ["read_text_file", "list_directory"]}),
            ),
            deny(
                "no-writes",
                json!({"tools": ["write_file", "edit_file", "create_directory", "move_file"]}),
            ),
        ],
    )
}

/// What `root` holds (names and contents, recursively): a write that reached the filesystem
/// server changes it.
pub fn tree_of(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)
            .expect("read a directory of the tree")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path.clone());
                found.push((path, Vec::new()));
            } else {
                let content = std::fs::read(&path).unwrap_or_default();
                found.push((path, content));
            }
        }
    }
    found.sort();
    found
}

/// mcp-fast-server (`binary`) answering half of all requests with a mutation of its answer
/// (`--mutate-answers seed`), with six `note://items/<i>` resources, behind rules that let the
/// agent see only `echo`, `note://items/1` and no prompt. A mutated answer may carry another
/// id, so its request is never answered: each waits 1 s at most.
pub fn mutating_fast_server(binary: &str, seed: &str) -> Value {
    let command = vec![
        binary.to_string(),
        "--resources".into(),
        "6".into(),
        "--mutate-answers".into(),
        seed.into(),
    ];
    let mut server = stdio_server(
        command,
        vec![
            list_tools_rule(),
            allow("echo", json!({"roles": [DEVELOPER], "tools": ["echo"]})),
            allow(
                "other-lists",
                json!({"roles": [DEVELOPER], "methods": ["resources/list", "prompts/list", "ping"]}),
            ),
            allow(
                "item-1",
                json!({"roles": [DEVELOPER], "resources": ["note://items/1"]}),
            ),
        ],
    );
    server["request_timeout_seconds"] = json!(1);
    server
}

/// The requests the mutated-server tests send, in turn: method and params.
pub fn mutated_server_requests() -> Vec<(&'static str, Value)> {
    vec![
        ("tools/list", json!({})),
        (
            "tools/call",
            json!({"name": "echo", "arguments": {"text": "hi"}}),
        ),
        ("resources/list", json!({})),
        ("prompts/list", json!({})),
        ("resources/read", json!({"uri": "note://items/1"})),
        ("ping", json!({})),
    ]
}

/// What the agent got from a [`mutating_fast_server`]: lists answered (each checked to show
/// only what the agent may see) and calls failed at once on an unusable answer.
#[derive(Debug, Default)]
pub struct MutatedServerTally {
    pub lists: usize,
    pub failed_at_once: usize,
}

impl MutatedServerTally {
    /// Takes the answer to a request of `method`; fails the test (saying `what`) if a list
    /// shows a tool, resource or prompt the agent may not see.
    pub fn check(&mut self, method: &str, answer: &Value, what: &str) {
        let error = answer["error"]["message"].as_str().unwrap_or_default();
        if error.contains("sent an invalid answer") || error.contains("answer that is not JSON") {
            self.failed_at_once += 1;
        }
        let shown = |field: &str, key: &str| -> Option<Vec<Value>> {
            let items = answer["result"].get(field)?.as_array()?;
            Some(items.iter().map(|item| item[key].clone()).collect())
        };
        let (shown, only) = match method {
            "tools/list" => (shown("tools", "name"), json!("echo")),
            "resources/list" => (shown("resources", "uri"), json!("note://items/1")),
            "prompts/list" => (shown("prompts", "name"), Value::Null),
            _ => return,
        };
        if let Some(shown) = shown {
            self.lists += 1;
            assert!(
                shown.iter().all(|name| *name == only),
                "{what} showed {shown:?}; only {only} may be shown: {answer}"
            );
        }
    }

    /// Fails the test unless some list was answered and some call failed at once.
    pub fn assert_both_seen(&self, seed: &str) {
        assert!(self.lists > 0, "no list was answered at all (seed {seed})");
        assert!(
            self.failed_at_once > 0,
            "no unusable answer failed its request at once (seed {seed})"
        );
    }
}

/// Whether `message` is a well-formed JSON-RPC 2.0 message from mcp-guard to an agent: a
/// response (an id, and a result or an error with an integer code and a message), a request
/// or a notification. `Err` says what is wrong.
pub fn check_jsonrpc_message(message: &Value) -> Result<(), String> {
    if message["jsonrpc"] != "2.0" {
        return Err(format!("no \"jsonrpc\": \"2.0\": {message}"));
    }
    if message.get("method").is_some() {
        return match message["method"].is_string() {
            true => Ok(()),
            false => Err(format!("a method that is not a string: {message}")),
        };
    }
    if message.get("id").is_none() {
        return Err(format!("a response without an id: {message}"));
    }
    match (message.get("result"), message.get("error")) {
        (Some(_), None) => Ok(()),
        (None, Some(error)) if error["code"].is_i64() && error["message"].is_string() => Ok(()),
        _ => Err(format!(
            "neither one result nor one well-formed error: {message}"
        )),
    }
}
