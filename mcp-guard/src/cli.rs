//! The command line: `run`, `egress exec|status|teardown`,
//! `policy check|schema|suggest|explain|diff`,
//! `audit verify|trace`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;
use crate::policy::explain::ExplainFormat;

#[derive(Debug, Parser)]
#[command(
    name = "mcp-guard",
    version,
    about = "Enforcement layer for the Model Context Protocol"
)]
pub struct Cli {
    /// Diagnostics on stderr: human-readable text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: the MCP HTTP front, kernel egress enforcement, the audit log, the
    /// control socket and metrics.
    Run(RunArgs),
    /// Kernel egress enforcement: run a command confined, inspect or remove what is pinned.
    #[command(subcommand)]
    Egress(EgressCommand),
    /// Validate the policy file and print its JSON Schema.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Stand in for a stdio MCP server: an agent launches this instead of the server, and
    /// every message goes through the policy. The server process is placed in a guarded cgroup
    /// by the running daemon when there is one.
    Stdio(StdioArgs),
    /// Check the audit log's hash chain, and trace what an instruction, session or trace
    /// caused.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Args)]
pub struct StdioArgs {
    /// The server, as named in the policy (its `command` is what gets started).
    #[arg(long)]
    pub server: String,
    /// The policy file.
    #[arg(long, default_value = "/etc/mcp-guard/policy.json")]
    pub policy: PathBuf,
    /// The principal to act as (default: the server's `principal` in the policy).
    #[arg(long)]
    pub principal: Option<String>,
    /// The running daemon's control socket (default: the policy's `daemon.control_socket`).
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The policy file (JSON, "version": 1).
    #[arg(long, default_value = "/etc/mcp-guard/policy.json")]
    pub policy: PathBuf,
    /// Run without kernel egress enforcement (MCP servers may then reach anything).
    #[arg(long)]
    pub no_egress: bool,
    #[command(flatten)]
    pub paths: PathArgs,
    /// Serve Prometheus metrics here (overrides the policy's daemon.metrics_listen).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the MCP Streamable HTTP front here (overrides the policy's daemon.listen).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Append audit records to this file (overrides the policy's audit.path).
    #[arg(long)]
    pub audit_path: Option<PathBuf>,
    /// The daemon was started in a cgroup delegated to it (systemd `Delegate=yes`): move into
    /// `<that cgroup>/daemon` and create the server cgroups beside it (overrides
    /// --cgroup-root and the policy's daemon.cgroup_root).
    #[arg(long, conflicts_with = "cgroup_root")]
    pub delegated_cgroup: bool,
}

/// Paths that override the policy's `daemon` section.
#[derive(Debug, Args, Clone, Default)]
pub struct PathArgs {
    /// Where programs and maps are pinned (bpffs).
    #[arg(long)]
    pub bpffs: Option<PathBuf>,
    /// mcp-guard's cgroup subtree (default: <cgroup2 mount>/mcp-guard).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// The daemon's control socket.
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum EgressCommand {
    /// Run COMMAND confined as a session of SERVER: the running daemon creates a guarded
    /// cgroup and the command starts inside it.
    Exec(ExecArgs),
    /// Show what is pinned: programs, guarded cgroups, allow-list size, lost events (JSON).
    Status(PinArgs),
    /// Remove all kernel enforcement: detach programs, unpin maps, remove the cgroup subtree
    /// (killing what still runs in it).
    Teardown(PinArgs),
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The server (as named in the policy) whose egress rules confine the command.
    #[arg(long)]
    pub server: String,
    /// Session name (default: one the daemon makes up).
    #[arg(long)]
    pub session: Option<String>,
    /// The daemon's control socket.
    #[arg(long, default_value = "/run/mcp-guard/control.sock")]
    pub control_socket: PathBuf,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// Read the paths from this policy's daemon section.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    #[command(flatten)]
    pub paths: PathArgs,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file; every problem is printed with its JSON path.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Print the policy's JSON Schema.
    Schema,
    /// Write the minimal policy that would have allowed exactly what learn-mode (or any)
    /// audit logs recorded, and print the scope report: what was exposed, what was used, and
    /// what the suggestion removes.
    Suggest(SuggestArgs),
    /// Render a policy in plain language for a reviewer: who may do what on which server,
    /// under which conditions, which network destinations each server may reach, what is
    /// refused by default and what is logged. Every sentence names its rule id.
    Explain {
        /// The policy file.
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = ExplainFormat::Markdown)]
        format: ExplainFormat,
    },
    /// What NEW grants or removes compared with OLD, in the same plain language as `explain`.
    Diff {
        /// The policy in force.
        old: PathBuf,
        /// The policy proposed.
        new: PathBuf,
        #[arg(long, value_enum, default_value_t = ExplainFormat::Markdown)]
        format: ExplainFormat,
    },
}

#[derive(Debug, Args)]
pub struct SuggestArgs {
    /// The audit log's files (or its directory), as for `audit verify`.
    #[arg(long = "audit", required = true, num_args = 1..)]
    pub audit: Vec<PathBuf>,
    /// The policy in force: the suggestion keeps its daemon, identity and audit settings, its
    /// principals and roles, its servers' launch settings and its deny rules, and the report
    /// compares against it. Without it, the suggestion has defaults to fill in.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Write the suggested policy here (default: stdout; the report is then on stderr).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the scope report as JSON instead of text: on stdout with --out, else on stderr.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute every hash and link of the chain; print `ok: N records, last seq S, last hash
    /// H`, or the first broken record as `FILE:LINE: what` (and exit 1).
    Verify(AuditVerifyArgs),
    /// Print the tree instruction → sessions → calls → network connections for one
    /// instruction, session or trace.
    Trace(AuditTraceArgs),
}

#[derive(Debug, Args)]
pub struct AuditVerifyArgs {
    /// The log's files in chain order: rotated files first, oldest first, then the live file
    /// (`audit.jsonl.1 audit.jsonl.2 audit.jsonl`). Files of one log are put in that order
    /// whatever order they are given in, so `audit.jsonl*` works; a directory stands for the
    /// `*.jsonl` logs in it with their rotated files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Accept a chain that starts after seq 1 (older rotated files archived or deleted).
    #[arg(long)]
    pub partial: bool,
    /// The hash of a record known to be in the log (from an earlier verify): fail unless the
    /// chain reaches it, which shows that no whole records were cut from the end.
    #[arg(long, value_name = "HASH")]
    pub head: Option<String>,
}

#[derive(Debug, Args)]
pub struct AuditTraceArgs {
    #[command(flatten)]
    pub of: TraceSelector,
    /// The log's files (or its directory), as for `audit verify`.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print nested JSON objects instead of the text tree.
    #[arg(long)]
    pub json: bool,
}

/// What `audit trace` follows: exactly one of these.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct TraceSelector {
    /// The id of the user instruction or scheduled job.
    #[arg(long, value_name = "ID")]
    pub instruction: Option<String>,
    /// The agent session id.
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,
    /// The W3C trace id.
    #[arg(long, value_name = "ID")]
    pub trace: Option<String>,
}
