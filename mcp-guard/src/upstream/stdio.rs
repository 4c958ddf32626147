//! stdio servers: mcp-guard spawns the command (inside the session's guarded cgroup when
//! kernel enforcement is on) and speaks newline-delimited JSON-RPC on its stdin/stdout. The
//! server's stderr goes to mcp-guard's log.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, mpsc};

use super::{ServerMessages, Upstream, UpstreamError, route_server_output};
use crate::egress::spawn::place_in_cgroup;

/// What to run, and who it runs for.
pub struct Launch<'a> {
    pub command: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    /// The guarded cgroup to start in; `None` without kernel enforcement.
    pub cgroup: Option<&'a Path>,
    /// Identity the server can read (`MCP_GUARD_*` variables).
    pub identity_env: Vec<(&'static str, String)>,
    /// `server/session`, for logs.
    pub label: Arc<str>,
}

/// The spawned process; killed when the session ends.
pub struct ServerProcess {
    child: Child,
}

impl ServerProcess {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Closing stdin asks it to stop; this makes sure it does.
        let _ = self.child.start_kill();
    }
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
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(launch.env)
        .envs(launch.identity_env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(cgroup) = launch.cgroup {
        place_in_cgroup(command.as_std_mut(), cgroup).map_err(spawn_error)?;
    }
    let mut child = command.spawn().map_err(spawn_error)?;
    let stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");

    let (to_server, outgoing) = mpsc::channel::<Value>(256);
    let (incoming_sender, incoming) = mpsc::channel::<Value>(256);
    let (session_sender, server_messages) = mpsc::channel(256);
    let pending = Arc::new(Mutex::new(Default::default()));
    tokio::spawn(write_lines(stdin, outgoing));
    tokio::spawn(read_lines(stdout, incoming_sender, launch.label.clone()));
    tokio::spawn(log_stderr(stderr, launch.label.clone()));
    tokio::spawn(route_server_output(
        incoming,
        Arc::clone(&pending),
        session_sender,
        launch.label,
    ));
    let upstream = Upstream::new(to_server, pending, Some(ServerProcess { child }));
    Ok((upstream, server_messages))
}

async fn write_lines(mut stdin: tokio::process::ChildStdin, mut outgoing: mpsc::Receiver<Value>) {
    while let Some(message) = outgoing.recv().await {
        let mut line = message.to_string();
        line.push('\n');
        if stdin.write_all(line.as_bytes()).await.is_err() {
            break;
        }
    }
}

async fn read_lines(
    stdout: tokio::process::ChildStdout,
    incoming: mpsc::Sender<Value>,
    label: Arc<str>,
) {
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) if line.trim().is_empty() => continue,
            Ok(Some(line)) => match serde_json::from_str::<Value>(&line) {
                Ok(value) => {
                    if incoming.send(value).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(server = %label, error = %e, "server wrote a line that is not JSON on stdout; dropped")
                }
            },
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(server = %label, error = %e, "reading the server's stdout");
                break;
            }
        }
    }
}

async fn log_stderr(stderr: tokio::process::ChildStderr, label: Arc<str>) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::debug!(server = %label, "server stderr: {line}");
    }
}
