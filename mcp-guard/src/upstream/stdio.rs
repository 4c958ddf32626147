//! stdio servers: mcp-guard spawns the command (inside the session's guarded cgroup when
//! kernel enforcement is on) and speaks newline-delimited JSON-RPC on its stdin/stdout. The
//! server's stderr goes to mcp-guard's log.
//!
//! Each answer crosses one task hand-off: a sender writes its message to the server's stdin
//! itself (one `write` per message, under a lock), and one task reads the server's stdout and
//! routes each message straight to its waiting caller or the session.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Mutex, mpsc};

use super::{Outbound, Router, ServerMessages, Upstream, UpstreamError};
use crate::egress::spawn::place_in_cgroup;
use crate::mcp::lines::{self, BoundedLines, Line};
use crate::policy::EnvValue;

/// What to run, and who it runs for.
pub struct Launch<'a> {
    pub command: &'a [String],
    pub env: &'a BTreeMap<String, EnvValue>,
    /// The uid and gid to run as; `None`: the daemon's.
    pub account: Option<crate::policy::Account>,
    /// The guarded cgroup to start in; `None` without kernel enforcement.
    pub cgroup: Option<&'a Path>,
    /// Identity the server can read (`MCP_GUARD_*` variables).
    pub identity_env: Vec<(&'static str, String)>,
    /// `server/session`, for logs.
    pub label: Arc<str>,
    /// Longest line of the server's output read (`daemon.max_server_message_bytes`).
    pub max_message_bytes: usize,
    /// Kill the server if the thread starting it ends (a stdio front with no daemon, whose
    /// single thread ends only with the process): with no cgroup, nothing else would stop a
    /// server that outlives its stdin once the front is killed.
    pub ends_with_this_process: bool,
}

/// The spawned process, leader of a process group of its own; the group is killed when the
/// session ends.
pub struct ServerProcess {
    child: Child,
    /// The group's id (the leader's pid). It stays valid after the leader is reaped while
    /// any process of the group lives, for no new process or group may take an id in use.
    group: Option<nix::unistd::Pid>,
}

impl ServerProcess {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the process, if it still runs, and what it started in the background that
    /// stayed in its process group (a wrapper script's `&` jobs): without a guarded cgroup,
    /// as for a stdio front with no daemon, nothing else would end those. How a process that
    /// had already exited did so stays known.
    pub fn kill(&mut self) {
        if let Some(group) = self.group {
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.start_kill();
    }

    /// How the process exited, waiting for it up to `within`; `None` if it still runs.
    pub async fn exit_status(
        &mut self,
        within: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()?
            .ok()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Closing stdin asks it to stop; this makes sure it does.
        self.kill();
    }
}

/// The server's `env`, read now (secrets from their files or the daemon's environment).
fn server_env(env: &BTreeMap<String, EnvValue>) -> Result<Vec<(&str, String)>, UpstreamError> {
    env.iter()
        .map(|(name, value)| {
            let read = value.read().map_err(|source| UpstreamError::Env {
                name: name.clone(),
                source,
            })?;
            Ok((name.as_str(), read))
        })
        .collect()
}

/// Starts the server and the tasks that carry its messages.
pub fn spawn(launch: Launch<'_>) -> Result<(Upstream, ServerMessages), UpstreamError> {
    let Some((program, args)) = launch.command.split_first() else {
        return Err(UpstreamError::NoCommand);
    };
    let spawn_error = |source| UpstreamError::Spawn {
        command: launch.command.join(" "),
        source,
    };
    let env = server_env(launch.env)?;
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(env)
        .envs(launch.identity_env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own, so that ending the session ends its background jobs too.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(account) = launch.account {
        // Dropped by the child before exec (supplementary groups too, when the daemon is
        // root). The cgroup move still works after it: cgroup.procs was opened by the daemon,
        // and the kernel checks the opener's credentials.
        command.uid(account.uid).gid(account.gid);
    }
    if let Some(cgroup) = launch.cgroup {
        place_in_cgroup(command.as_std_mut(), cgroup).map_err(spawn_error)?;
    }
    if launch.ends_with_this_process {
        kill_when_parent_dies(command.as_std_mut());
    }
    let mut child = command.spawn().map_err(spawn_error)?;
    let stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");

    let (session_sender, server_messages) = mpsc::channel(256);
    let label = launch.label;
    tokio::spawn(log_stderr(stderr, label.clone()));
    let router = Router::new(session_sender, label.clone());
    let writer = Mutex::new(LineWriter {
        stdin,
        unsent: Vec::new(),
        sent: 0,
        broken: false,
    });
    let group = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(nix::unistd::Pid::from_raw);
    let process = Some(ServerProcess { child, group });
    let upstream = Upstream::with_outbound(Outbound::Pipe(writer), &router, process);
    tokio::spawn(read_and_route(
        stdout,
        router,
        label,
        launch.max_message_bytes,
    ));
    Ok((upstream, server_messages))
}

/// Has the child killed when the thread that starts it ends (`PR_SET_PDEATHSIG`), and killed
/// at once if that happened before the setting took hold.
fn kill_when_parent_dies(command: &mut std::process::Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure makes two system calls (prctl, getppid) and, if the parent is
    // already gone, raises a signal; it allocates nothing and takes no locks, as required
    // between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent.as_raw() {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
}

/// The server's stdin. A sender whose task is cancelled mid-write leaves the rest of its
/// line in `unsent`, and the next sender finishes it first, so lines never interleave.
pub(super) struct LineWriter {
    stdin: ChildStdin,
    unsent: Vec<u8>,
    /// Bytes of `unsent` already written.
    sent: usize,
    /// A write failed: the server is gone (or its stdin closed).
    broken: bool,
}

impl LineWriter {
    /// Writes `line` (a message and its newline) after whatever an earlier sender left.
    pub(super) async fn send(&mut self, line: &[u8]) -> Result<(), UpstreamError> {
        if self.broken {
            return Err(UpstreamError::Closed);
        }
        self.unsent.extend_from_slice(line);
        while self.sent < self.unsent.len() {
            match self.stdin.write(&self.unsent[self.sent..]).await {
                Ok(written) if written > 0 => self.sent += written,
                _ => {
                    self.broken = true;
                    return Err(UpstreamError::Closed);
                }
            }
        }
        self.unsent.clear();
        self.sent = 0;
        Ok(())
    }
}

/// Reads the server's stdout, one JSON-RPC message per line, and routes each message as it
/// comes; when the output ends, every waiting caller learns the server is gone.
/// A line over `max_line_bytes` is dropped, and answered to its caller as a failure.
async fn read_and_route(
    stdout: tokio::process::ChildStdout,
    router: Router,
    label: Arc<str>,
    max_line_bytes: usize,
) {
    let mut lines = BoundedLines::new(BufReader::new(stdout), max_line_bytes);
    loop {
        match lines.next().await {
            Ok(Some(Line::Whole(line))) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(Some(Line::Whole(line))) => match serde_json::from_slice::<Value>(&line) {
                Ok(value) => {
                    if !router.route(value).await {
                        break;
                    }
                }
                Err(e) => router.drop_unreadable(&line, &e).await,
            },
            Ok(Some(Line::TooLong { length, head, tail })) => {
                let id = lines::response_id(&head, &tail);
                router.drop_too_large(length, max_line_bytes, id).await;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(server = %label, error = %e, "reading the server's stdout");
                break;
            }
        }
    }
    router.end().await;
}

/// Longest stderr line logged whole; a longer one is logged by its length and first bytes.
const MAX_STDERR_LINE_BYTES: usize = 16 * 1024;

async fn log_stderr(stderr: tokio::process::ChildStderr, label: Arc<str>) {
    let mut lines = BoundedLines::new(BufReader::new(stderr), MAX_STDERR_LINE_BYTES);
    while let Ok(Some(line)) = lines.next().await {
        match line {
            Line::Whole(line) => {
                let line = String::from_utf8_lossy(&line);
                tracing::debug!(server = %label, "server stderr: {line}");
            }
            Line::TooLong { length, head, .. } => {
                let head = String::from_utf8_lossy(&head);
                tracing::debug!(server = %label, length, "server stderr (a line of {length} bytes, cut): {head}");
            }
        }
    }
}
