//! Developer and CI tasks for mcp-guard (`cargo xtask <task>`): toolchain setup, build, run,
//! tests and benchmarks. Work that needs root or a special toolchain lives here so the
//! workspace itself builds with a plain `cargo build`.

mod install;
mod peers;
mod process;
mod setup;

use std::{env, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::process::{command, workspace_root};

/// The kernel programs only build for bpfel (aya-build does that from mcp-guard/build.rs); on
/// the host their `no_std` binary cannot link or unwind, so host-wide cargo runs leave it out.
const EBPF_PACKAGE: &str = "mcp-guard-ebpf";
const HOST_PACKAGES: [&str; 3] = ["--workspace", "--exclude", EBPF_PACKAGE];

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, run, test and benchmark mcp-guard"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks to build the eBPF programs (idempotent)
    Setup,
    /// Set up, then build the workspace (the eBPF object comes with mcp-guard's build)
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run the daemon (as root) on examples/policy.json
    Run {
        /// Extra arguments for `mcp-guard run`
        #[arg(last = true)]
        daemon_args: Vec<String>,
    },
    /// Set up, lint, and run every test, including the kernel tests (as root)
    Test {
        /// Extra arguments for `cargo test`, e.g. `-- --test egress -- --nocapture`
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Check formatting and run clippy with warnings denied
    Lint,
    /// Set up and run a benchmark
    #[command(subcommand)]
    Bench(Bench),
    /// Install the binary, systemd unit, default policy and docs (`--root` stages elsewhere)
    Install(install::InstallArgs),
    /// Remove what `install` put in place; an edited policy and the audit log stay unless
    /// `--purge`
    Uninstall(install::UninstallArgs),
}

#[derive(Subcommand)]
enum Bench {
    /// Cost the eBPF hooks add to connect(), and ring-buffer throughput
    Egress {
        /// Extra arguments for the egress-bench binary
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
    /// Policy decision time at 10, 1,000 and 10,000 rules
    Policy {
        /// Extra arguments for the policy-bench binary, e.g. `-- --json`
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
    /// Bearer JWT verification per request (HS256, RS256, ES256): a token's first use and
    /// the uses after
    Identity {
        /// Extra arguments for the identity-bench binary, e.g. `-- --tokens 2000 --json`
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
    /// tools/call latency and throughput through mcp-guard vs direct (as root): Streamable
    /// HTTP and stdio, a fast upstream and server-everything
    Proxy {
        /// Extra arguments for the proxy-bench binary, e.g. `-- --rounds 30 --json`
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
    /// Audit records per second with fsync on (concurrency 1, 32, 256), and `audit trace`
    /// time over 1,000,000 records
    Audit {
        /// Extra arguments for the audit-bench binary, e.g. `-- --dir /var/lib/x --json`
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run_task(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line, causes included, so CI logs show the reason without a backtrace.
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::setup(),
        Task::Build { release } => build(release),
        Task::Run { daemon_args } => run_daemon(&daemon_args),
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::Lint => lint(),
        Task::Bench(Bench::Egress { bench_args }) => bench_binary("egress-bench", &bench_args),
        Task::Bench(Bench::Policy { bench_args }) => bench_binary("policy-bench", &bench_args),
        Task::Bench(Bench::Identity { bench_args }) => bench_binary("identity-bench", &bench_args),
        Task::Bench(Bench::Proxy { bench_args }) => bench_proxy(&bench_args),
        // audit-bench builds the release mcp-guard it times (tests/lib.rs `daemon_binary`).
        Task::Bench(Bench::Audit { bench_args }) => bench_binary("audit-bench", &bench_args),
        Task::Install(args) => install::install(&args),
        Task::Uninstall(args) => install::uninstall(&args),
    }
}

fn stage(title: &str) {
    println!("==> {title}");
}

fn build(release: bool) -> Result<()> {
    setup::setup()?;
    stage("build");
    let mut cargo = command("cargo")?;
    cargo.arg("build").args(HOST_PACKAGES);
    if release {
        cargo.arg("--release");
    }
    process::run(&mut cargo)
}

fn run_daemon(daemon_args: &[String]) -> Result<()> {
    process::require_root("run")?;
    setup::setup()?;
    stage("build mcp-guard");
    process::run(command("cargo")?.args(["build", "--release", "-p", "mcp-guard"]))?;
    stage("run mcp-guard");
    let root = workspace_root();
    let daemon = target_dir().join("release").join("mcp-guard");
    process::exec(
        command(&daemon.to_string_lossy())?
            .arg("run")
            .arg("--policy")
            .arg(root.join("examples").join("policy.json"))
            .args(daemon_args),
    )
}

/// Where cargo puts build output: `CARGO_TARGET_DIR` (relative to the workspace root, where we
/// run cargo) or the workspace's `target/`.
fn target_dir() -> PathBuf {
    let root = workspace_root();
    match env::var_os("CARGO_TARGET_DIR").filter(|dir| !dir.is_empty()) {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

fn test(cargo_test_args: &[String]) -> Result<()> {
    // Checked first: without root the kernel tests would fail only after a long build.
    process::require_root("test")?;
    stage("setup");
    setup::setup()?;
    lint()?;
    stage("test");
    // The install tests run this very binary rather than `cargo run -p xtask`, which would
    // wait on the build directory lock this `cargo test` holds.
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    process::run(
        command("cargo")?
            .arg("test")
            .args(HOST_PACKAGES)
            .args(cargo_test_args)
            .env("MCP_GUARD_XTASK", xtask),
    )
}

fn lint() -> Result<()> {
    stage("rustfmt");
    process::run(command("cargo")?.args(["fmt", "--all", "--", "--check"]))?;
    stage("clippy");
    process::run(command("cargo")?.arg("clippy").args(HOST_PACKAGES).args([
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    stage("clippy (eBPF programs)");
    // Checked on the host like aya-template does: `panic=abort` because `no_std` cannot unwind,
    // and only the binary target, since host tests of kernel code need a nightly-only flag.
    process::run(command("cargo")?.args([
        "clippy",
        "--package",
        EBPF_PACKAGE,
        "--",
        "-D",
        "warnings",
        "-C",
        "panic=abort",
    ]))
}

/// Sets up, then runs one bench binary of the tests crate in release mode.
fn bench_binary(name: &str, bench_args: &[String]) -> Result<()> {
    setup::setup()?;
    stage(&format!("bench {}", name.trim_end_matches("-bench")));
    process::run(
        command("cargo")?
            .args([
                "run",
                "--release",
                "-p",
                "mcp-guard-tests",
                "--bin",
                name,
                "--",
            ])
            .args(bench_args),
    )
}

fn bench_proxy(bench_args: &[String]) -> Result<()> {
    // Checked first: without root the daemon cannot start, and we would find out only after
    // a long build.
    process::require_root("bench proxy")?;
    // Also installs the real MCP peers (server-everything) into target/mcp-peers.
    setup::setup()?;
    stage("build (release): mcp-guard, mcp-fast-server, proxy-bench");
    // proxy-bench finds mcp-guard and mcp-fast-server beside itself in target/release.
    process::run(command("cargo")?.args([
        "build",
        "--release",
        "-p",
        "mcp-guard",
        "--bin",
        "mcp-guard",
        "-p",
        "mcp-guard-tests",
        "--bin",
        "mcp-fast-server",
        "--bin",
        "proxy-bench",
    ]))?;
    stage("bench proxy");
    let bench = target_dir().join("release").join("proxy-bench");
    process::run(
        command(&bench.to_string_lossy())?
            .arg("--peers")
            .arg(peers::peers_dir())
            .args(bench_args),
    )
}
