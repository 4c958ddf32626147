//! The stdio front: an agent that launches its MCP server itself launches
//! `mcp-guard stdio --server NAME --policy FILE` instead. mcp-guard starts the real server and
//! runs every message through the same pipeline as the HTTP front; newline-delimited JSON-RPC
//! on stdin/stdout, diagnostics on stderr.
//!
//! Requests are handled concurrently (pipelined requests may be answered in any order). Each
//! answer is written to stdout whole, with one `write`, under a lock, so lines never
//! interleave.
//!
//! When stdin and stdout are pipes or sockets (as an agent sets them up), they are read and
//! written directly by the runtime's event loop: tokio's own stdin and stdout hand every read
//! and write to a blocking thread, a thread hop each way per message.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

use crate::answer_polling::{Linger, Lingering};
use crate::identity::TransportHints;
use crate::mcp::jsonrpc;
use crate::mcp::lines::{BoundedLines, Line};
use crate::policy::{CompiledPolicy, Policy, WatchedFiles};
use crate::proxy::{AgentSession, ProgressRoute, Proxy};

/// Why the stdio front stopped serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The agent closed stdin.
    AgentDone,
    /// The server process exited on its own, with this status where it could be learned.
    ServerExited(Option<std::process::ExitStatus>),
}

/// How long the front waits for a server whose output ended to exit, to learn its status.
const SERVER_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves one agent on stdin/stdout until stdin ends, or until the server process exits (its
/// messages to the agent end; the session ends with it): then, as the server itself would
/// have, the front answers what is in flight and stops, saying how the server exited.
pub async fn serve(proxy: Arc<Proxy>, session: Arc<AgentSession>) -> io::Result<Ending> {
    let linger = Arc::new(Linger::new(proxy.model().daemon.answer_poll()));
    let stdout = Arc::new(Mutex::new(Output::stdout(linger.clone())));
    let mut forwarder = session.take_outbox().await.map(|mut outbox| {
        let stdout = stdout.clone();
        tokio::spawn(async move {
            while let Some(message) = outbox.recv().await {
                if stdout.lock().await.send(&message).await.is_err() {
                    return ForwarderEnd::AgentGone;
                }
            }
            ForwarderEnd::ServerEnded
        })
    });
    let mut handlers = tokio::task::JoinSet::new();
    let stdin = BufReader::with_capacity(64 * 1024, Lingering::new(Input::stdin(), linger));
    // A line over the limit is refused, as it would be whole, without being held.
    let mut stdin = BoundedLines::new(stdin, proxy.limits.max_bytes);
    let mut server_exited = false;
    loop {
        // Raw bytes, not text: a line that is not UTF-8 gets a JSON-RPC error, not an exit.
        let read = tokio::select! {
            read = stdin.next() => read?,
            end = until_finished(&mut forwarder) => {
                server_exited = end == ForwarderEnd::ServerEnded;
                break;
            }
        };
        let line = match read {
            None => break,
            Some(Line::Whole(line)) => line,
            Some(Line::TooLong { length, .. }) => {
                let refusal = jsonrpc::too_large(length, &proxy.limits).to_value();
                // A closed stdout: the agent is gone, and stdin ends next.
                let _ = stdout.lock().await.send(&refusal).await;
                continue;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = jsonrpc::parse(&line, &proxy.limits);
        if let Ok(incoming) = &parsed {
            proxy.note_arrival(&session, incoming);
        }
        let proxy = proxy.clone();
        let session = session.clone();
        let stdout = stdout.clone();
        handlers.spawn(async move {
            let answer = match parsed {
                Ok(incoming) => {
                    let hints = current_roles(&proxy, &session);
                    let progress = incoming
                        .progress_token()
                        .and_then(|token| session.route_progress(&token));
                    let handling = proxy.handle(&session, incoming, &hints);
                    match progress {
                        Some(route) => with_progress_first(handling, route, &stdout).await,
                        None => handling.await,
                    }
                }
                Err(error) => Some(error.to_value()),
            };
            if let Some(answer) = answer {
                // A closed stdout: the agent is gone, and stdin ends next.
                let _ = stdout.lock().await.send(&answer).await;
            }
        });
        // Reap finished handlers as we go, so the set does not grow with the session.
        while handlers.try_join_next().is_some() {}
    }
    // The agent closed stdin (or the server exited): answer what is in flight, then stop.
    while handlers.join_next().await.is_some() {}
    if let Some(forwarder) = forwarder {
        forwarder.abort();
    }
    let ending = if server_exited {
        Ending::ServerExited(session.upstream().exit_status(SERVER_EXIT_WAIT).await)
    } else {
        Ending::AgentDone
    };
    proxy.end_all_sessions().await;
    drop(session);
    Ok(ending)
}

impl Ending {
    /// The status the front exits with: the server's own when it exited on its own (a
    /// signal's number plus 128, as a shell reports it; 1 when unknown), so that the agent
    /// sees what it would have seen without mcp-guard.
    pub fn exit_code(self) -> u8 {
        use std::os::unix::process::ExitStatusExt;
        match self {
            Ending::AgentDone => 0,
            Ending::ServerExited(Some(status)) => match (status.code(), status.signal()) {
                (Some(code), _) => u8::try_from(code).unwrap_or(1),
                (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(1),
                (None, None) => 1,
            },
            Ending::ServerExited(None) => 1,
        }
    }
}

/// Runs `handling` (a request with a progress token) while writing the server's progress
/// notifications for it to stdout as they come, and any still on their way before the answer
/// is written: relayed like other server messages, the last one could follow the answer, which
/// ends the request for the agent.
async fn with_progress_first(
    handling: impl std::future::Future<Output = Option<Value>>,
    route: ProgressRoute,
    stdout: &Mutex<Output>,
) -> Option<Value> {
    let handling = std::pin::pin!(handling);
    let mut messages = route.ahead_of(handling);
    while let Some((message, more)) = messages.next_message().await {
        if !more {
            return Some(message);
        }
        let _ = stdout.lock().await.send(&message).await;
    }
    None
}

/// Why the task copying the server's own messages to stdout stopped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ForwarderEnd {
    /// The session's messages ended: the server process exited.
    ServerEnded,
    /// stdout is closed: the agent went away.
    AgentGone,
}

/// Resolves once `task` has finished; never, without one.
async fn until_finished(task: &mut Option<tokio::task::JoinHandle<ForwarderEnd>>) -> ForwarderEnd {
    match task {
        Some(handle) => handle.await.unwrap_or(ForwarderEnd::AgentGone),
        None => std::future::pending().await,
    }
}

/// The front's principal's roles as the policy in force gives them (the front has no
/// credentials of its own to carry roles), so a reload that changes them applies at once.
fn current_roles(proxy: &Proxy, session: &AgentSession) -> TransportHints {
    let roles = proxy
        .policy()
        .roles_of(&session.caller().principal)
        .to_vec();
    TransportHints {
        roles: Some(roles),
        ..TransportHints::default()
    }
}

/// Keeps the front's policy current, as the daemon keeps its own: the file is read again on
/// SIGHUP or when it (or a key file it names) changes. A policy that does not load is refused
/// with a line on stderr, and the one in force stays.
pub async fn follow_policy(proxy: Arc<Proxy>, path: PathBuf) {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .inspect_err(|e| tracing::warn!(error = %e, "SIGHUP will not reload the policy"))
        .ok();
    let mut poll = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut watched = WatchedFiles::of(&path, &proxy.model());
    loop {
        tokio::select! {
            Some(()) = async {
                match hangup.as_mut() {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = poll.tick() => {
                if watched.changed().is_none() {
                    continue;
                }
            }
        }
        let stamped = watched.restamped();
        reload(&proxy, &path).await;
        watched = stamped.for_policy(&path, &proxy.model());
    }
}

async fn reload(proxy: &Proxy, path: &std::path::Path) {
    let loaded = Policy::load(path).and_then(|loaded| {
        let compiled = CompiledPolicy::compile(&loaded.policy)?;
        Ok((loaded.policy, compiled))
    });
    match loaded {
        Ok((policy, compiled)) => {
            proxy.replace_policy(policy, compiled).await;
            tracing::info!(policy = %path.display(), "policy reloaded");
        }
        Err(e) => tracing::error!(policy = %path.display(), error = %e,
            "policy reload refused; the previous policy stays in force"),
    }
}

/// Where answers go: stdout, and a reused buffer each line is serialised into.
struct Output {
    sink: Box<dyn AsyncWrite + Send + Unpin>,
    line: Vec<u8>,
}

impl Output {
    /// stdout, noting each answer in `linger`, which the reader of stdin shares.
    fn stdout(linger: Arc<Linger>) -> Output {
        let sink: Box<dyn AsyncWrite + Send + Unpin> = match Pollable::dup(&io::stdout()) {
            Some(pipe) => Box::new(Lingering::new(pipe, linger)),
            None => Box::new(Lingering::new(tokio::io::stdout(), linger)),
        };
        Output {
            sink,
            line: Vec::with_capacity(4096),
        }
    }

    /// Writes `message` and its newline with one write (two only when the pipe is full).
    async fn send(&mut self, message: &Value) -> io::Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, message).map_err(io::Error::other)?;
        self.line.push(b'\n');
        self.sink.write_all(&self.line).await?;
        self.sink.flush().await
    }
}

/// What requests come from.
enum Input {
    Pollable(Pollable),
    Std(tokio::io::Stdin),
}

impl Input {
    fn stdin() -> Input {
        match Pollable::dup(&io::stdin()) {
            Some(pipe) => Input::Pollable(pipe),
            None => Input::Std(tokio::io::stdin()),
        }
    }
}

impl AsyncRead for Input {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Input::Pollable(pipe) => std::pin::Pin::new(pipe).poll_read(cx, buf),
            Input::Std(stdin) => std::pin::Pin::new(stdin).poll_read(cx, buf),
        }
    }
}

/// A pipe or socket on the runtime's event loop (a copy of stdin's or stdout's descriptor,
/// made non-blocking).
struct Pollable(AsyncFd<OwnedFd>);

impl Pollable {
    /// `None` when `fd` is not a pipe or socket (a terminal, a file): tokio's blocking-thread
    /// stdin and stdout serve those, and their flags are left alone.
    fn dup(fd: &impl AsFd) -> Option<Pollable> {
        use nix::sys::stat::{SFlag, fstat};
        let mode = SFlag::from_bits_truncate(fstat(fd.as_fd()).ok()?.st_mode);
        if !(mode.contains(SFlag::S_IFIFO) || mode.contains(SFlag::S_IFSOCK)) {
            return None;
        }
        let owned = fd.as_fd().try_clone_to_owned().ok()?;
        // The flag is the open file description's, shared with the original descriptor:
        // mcp-guard is the only reader of its stdin and writer of its stdout.
        let flags = nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_GETFL).ok()?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_SETFL(flags)).ok()?;
        // SAFETY: `owned` is an open descriptor the AsyncFd owns (and closes) from here on.
        unsafe { AsyncFd::register(owned) }.ok().map(Pollable)
    }
}

impl AsyncRead for Pollable {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        loop {
            let mut ready = std::task::ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match ready.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_fd(), unfilled).map_err(io::Error::from)
            }) {
                Ok(Ok(read)) => {
                    buf.advance(read);
                    return std::task::Poll::Ready(Ok(()));
                }
                Ok(Err(error)) => return std::task::Poll::Ready(Err(error)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Pollable {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        loop {
            let mut ready = std::task::ready!(self.0.poll_write_ready(cx))?;
            match ready.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(result) => return std::task::Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::Ending;

    #[test]
    fn the_front_exits_as_its_server_did() {
        // wait(2) statuses: an exit code in the second byte, a signal in the first.
        let exited = |code: i32| Ending::ServerExited(Some(ExitStatus::from_raw(code << 8)));
        let killed = |signal: i32| Ending::ServerExited(Some(ExitStatus::from_raw(signal)));
        assert_eq!(Ending::AgentDone.exit_code(), 0);
        assert_eq!(exited(0).exit_code(), 0);
        assert_eq!(exited(3).exit_code(), 3);
        assert_eq!(killed(libc::SIGKILL).exit_code(), 137);
        assert_eq!(killed(libc::SIGTERM).exit_code(), 143);
        assert_eq!(Ending::ServerExited(None).exit_code(), 1);
    }
}
