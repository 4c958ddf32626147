//! The `mcp-guard` binary: parses the command line and turns every failure into one line on
//! stderr and a non-zero exit.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use mcp_guard::cli::{
    Cli, Command, EgressCommand, ExecArgs, PathArgs, PinArgs, PolicyCommand, StdioArgs,
};
use mcp_guard::daemon::{self, Overrides, RunOptions};
use mcp_guard::egress::{self, EgressLayout, PinLayout, spawn};
use mcp_guard::metrics::Metrics;
use mcp_guard::policy::{CompiledPolicy, DaemonSettings, Policy, PolicyError};
use mcp_guard::proxy::record::Recorder;
use mcp_guard::proxy::{Caller, Placement, Proxy};
use mcp_guard::transport::stdio::Ending;
use mcp_guard::upstream::orphans;
use mcp_guard::{control, logging};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("mcp-guard: {}", mcp_guard::error_chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run(args) => {
            // SAFETY: no other thread exists yet; the runtime starts below.
            let service = unsafe { mcp_guard::service::Notifier::take_from_env() }?;
            let options = RunOptions {
                policy_path: args.policy,
                no_egress: args.no_egress,
                overrides: Overrides {
                    listen: args.listen,
                    audit_path: args.audit_path,
                    ..overrides(&args.paths, args.metrics_listen)
                },
                delegated_cgroup: args.delegated_cgroup,
                service,
            };
            let loaded = daemon::starting_policy(&options.policy_path)?;
            runtime_with(loaded.policy.daemon.worker_threads)?
                .block_on(daemon::run(options, loaded))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Egress(EgressCommand::Exec(args)) => runtime()?.block_on(exec(args)),
        Command::Egress(EgressCommand::Status(args)) => {
            let settings = daemon_settings(&args)?;
            let state = egress::kernel::pinned_state(&PinLayout {
                root: settings.bpffs,
            })?;
            println!("{}", serde_json::to_string_pretty(&state)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Egress(EgressCommand::Teardown(args)) => {
            let settings = daemon_settings(&args)?;
            let layout = EgressLayout::new(settings.bpffs, settings.cgroup_root)?;
            egress::teardown(&layout)?;
            eprintln!(
                "mcp-guard: removed pins under {} and cgroups under {}",
                layout.pins.root.display(),
                layout.cgroup_root.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCommand::Check { file }) => Ok(check_policy(&file)),
        Command::Stdio(args) => {
            // One session, one agent: a single-threaded runtime passes each message between
            // the agent, the pipeline and the server without waking another thread.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(stdio_front(args))
        }
        Command::Audit(command) => Ok(mcp_guard::audit::command::run(command)),
        Command::Policy(PolicyCommand::Explain { file, format }) => {
            let policy = Policy::load(&file)?.policy;
            print!("{}", mcp_guard::policy::explain::explain(&policy, format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCommand::Diff { old, new, format }) => {
            let old = Policy::load(&old)?.policy;
            let new = Policy::load(&new)?.policy;
            print!("{}", mcp_guard::policy::diff::diff(&old, &new, format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCommand::Suggest(args)) => {
            mcp_guard::learn::command::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCommand::Schema) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&mcp_guard::policy::json_schema())?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A multi-threaded runtime with `workers` threads; `None`: tokio's default (one per CPU, or
/// `TOKIO_WORKER_THREADS`).
fn runtime_with(workers: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers.filter(|workers| *workers > 0) {
        builder.worker_threads(workers);
    }
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

fn overrides(paths: &PathArgs, metrics_listen: Option<std::net::SocketAddr>) -> Overrides {
    Overrides {
        bpffs: paths.bpffs.clone(),
        cgroup_root: paths.cgroup_root.clone(),
        control_socket: paths.control_socket.clone(),
        metrics_listen,
        listen: None,
        audit_path: None,
    }
}

/// The daemon paths from `--policy` (if given) with command-line overrides on top.
fn daemon_settings(args: &PinArgs) -> Result<DaemonSettings> {
    let mut settings = match &args.policy {
        Some(path) => Policy::load(path)?.policy.daemon,
        None => DaemonSettings::default(),
    };
    overrides(&args.paths, None).apply(&mut settings);
    Ok(settings)
}

/// Prints every problem with its JSON path; exit 0 when the policy is usable.
fn check_policy(file: &Path) -> ExitCode {
    match Policy::load(file) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                eprintln!("{}: {warning}", file.display());
            }
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(PolicyError::Invalid { path, problems }) => {
            for problem in &problems {
                eprintln!("{}: {problem}", path.display());
            }
            ExitCode::FAILURE
        }
        Err(other) => {
            eprintln!("mcp-guard: {other}");
            ExitCode::FAILURE
        }
    }
}

/// How long a standalone stdio front waits, at its end, for what its server left running to
/// die of SIGKILL (a process in uninterruptible sleep dies only when that sleep ends).
const LEFTOVERS_KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The stdio front: the agent's stdin/stdout, the policy's server behind it.
async fn stdio_front(args: StdioArgs) -> Result<ExitCode> {
    let loaded = Policy::load(&args.policy)?;
    for warning in &loaded.warnings {
        eprintln!("mcp-guard: {}: {warning}", args.policy.display());
    }
    let policy = loaded.policy;
    let compiled = CompiledPolicy::compile(&policy)?;
    let server = policy.servers.get(&args.server).with_context(|| {
        format!(
            "no server named {:?} in {}",
            args.server,
            args.policy.display()
        )
    })?;
    let principal = args
        .principal
        .clone()
        .or_else(|| server.principal.clone())
        .unwrap_or_else(|| "anonymous".into());
    let roles = compiled.roles_of(&principal).to_vec();
    let socket = args
        .control_socket
        .clone()
        .unwrap_or_else(|| policy.daemon.control_socket.clone());
    let standalone = !socket.exists();
    let (placement, recorder, adopted) = if standalone {
        eprintln!(
            "mcp-guard: no daemon at {}: kernel egress enforcement is OFF and no audit records are written for this server (the policy is still enforced)",
            socket.display()
        );
        // No cgroup will hold the server: what it starts must be ended by this process.
        let adopted = orphans::adopt_orphans()?;
        (
            Placement::UnconfinedEndingWithThisProcess,
            Recorder::default(),
            Some(adopted),
        )
    } else {
        let recorder = Recorder::daemon(
            control::AuditClient::connect(&socket, policy.daemon.answer_poll()).await?,
        );
        (Placement::Remote(socket), recorder, None)
    };
    let proxy = Proxy::new(
        policy.clone(),
        compiled,
        placement,
        recorder,
        Metrics::new(),
    );
    let caller = Caller {
        principal,
        roles,
        context: Default::default(),
    };
    // The session opens before the agent's first message; the server inherits this front's
    // environment, where the agent that launched it may have set the instruction and trace.
    let opening = mcp_guard::identity::OpeningContext::default();
    let session = proxy
        .open_session(&args.server, caller, None, &opening)
        .await?;
    if let Some(adopted) = adopted {
        tokio::spawn(adopted.reap_as_they_exit(session.upstream().pid()));
    }
    tokio::spawn(mcp_guard::transport::stdio::follow_policy(
        proxy.clone(),
        args.policy.clone(),
    ));
    let ending = mcp_guard::transport::stdio::serve(proxy, session).await?;
    if let Ending::ServerExited(status) = ending {
        let how = status.map_or_else(|| "with an unknown status".to_owned(), |s| s.to_string());
        eprintln!("mcp-guard: the server process exited ({how})");
    }
    if standalone {
        let left = orphans::end_all(LEFTOVERS_KILL_WAIT).await;
        if !left.is_empty() {
            eprintln!(
                "mcp-guard: processes the server left did not end within {} s of SIGKILL: {left:?}",
                LEFTOVERS_KILL_WAIT.as_secs()
            );
        }
    }
    Ok(ExitCode::from(ending.exit_code()))
}

/// Runs a command as a confined session of a server, with the daemon's help.
async fn exec(args: ExecArgs) -> Result<ExitCode> {
    // What the command leaves running stays confined until it exits, as the command may mean
    // it to outlive itself.
    let (session, _keep_session_open) = control::open_session(
        &args.control_socket,
        &args.server,
        args.session.as_deref(),
        false,
    )
    .await?;
    let cgroup = session
        .cgroup
        .context("the daemon answered without a cgroup path")?;
    let mut command = std::process::Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("MCP_GUARD_SERVER", &args.server)
        .env(
            "MCP_GUARD_SESSION",
            session.session.as_deref().unwrap_or(""),
        );
    spawn::place_in_cgroup(&mut command, &cgroup)
        .with_context(|| format!("opening {}", cgroup.display()))?;
    let program = args.command[0].clone();
    let status = tokio::task::spawn_blocking(move || command.status())
        .await?
        .with_context(|| format!("starting {program}"))?;
    Ok(exit_code_of(status))
}

fn exit_code_of(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(signal)) => ExitCode::from(128u8.wrapping_add(signal as u8)),
        _ => ExitCode::FAILURE,
    }
}
