//! The daemon's local control socket: a front that launches a server process itself (the stdio
//! front, `mcp-guard egress exec`) asks here for a guarded session cgroup, then places its child
//! in it before exec. One JSON object per line each way.
//!
//! The connection stays open while the session lives; when it closes, the daemon removes the
//! session cgroup once it is empty. Only root and the daemon's own user may connect
//! (peer credentials are checked, and the socket file is mode 0600).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

use crate::audit::{AuditLog, AuditRecord};
use crate::egress::{Egress, SessionCgroup};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connecting to the mcp-guard daemon at {path}: {source} (is `mcp-guard run` running?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("daemon refused: {0}")]
    Refused(String),
    #[error("malformed control message: {0}")]
    Malformed(#[from] serde_json::Error),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// A guarded cgroup for a new session of `server`.
    OpenSession {
        server: String,
        #[serde(default)]
        session: Option<String>,
    },
    /// An audit record from a front that runs outside the daemon (the stdio front): the log
    /// has one writer, the daemon. Answered once the record is durable.
    Audit { record: Box<AuditRecord> },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

impl Response {
    fn refused(error: String) -> Response {
        Response {
            ok: false,
            error: Some(error),
            session: None,
            cgroup: None,
            cgroup_id: None,
        }
    }

    fn accepted() -> Response {
        Response {
            ok: true,
            error: None,
            session: None,
            cgroup: None,
            cgroup_id: None,
        }
    }

    fn opened(session: &SessionCgroup) -> Response {
        Response {
            ok: true,
            error: None,
            session: Some(session.session.clone()),
            cgroup: Some(session.path.clone()),
            cgroup_id: Some(session.cgroup_id),
        }
    }
}

/// Binds the socket (replacing a stale one from an earlier daemon), owner-only.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let bind_error = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_error)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(listener)
}

/// Accepts clients until the listener fails.
pub async fn serve(
    listener: UnixListener,
    egress: Arc<Mutex<Egress>>,
    metrics: Arc<Metrics>,
    audit: AuditLog,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::error!(error = %e, "control socket accept failed");
                continue;
            }
        };
        let egress = egress.clone();
        let metrics = metrics.clone();
        let audit = audit.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_client(stream, egress, metrics, audit).await {
                tracing::warn!(error = %e, "control client");
            }
        });
    }
}

fn peer_is_permitted(stream: &UnixStream) -> bool {
    let own_uid = nix::unistd::geteuid().as_raw();
    stream
        .peer_cred()
        .is_ok_and(|cred| cred.uid() == 0 || cred.uid() == own_uid)
}

async fn serve_client(
    stream: UnixStream,
    egress: Arc<Mutex<Egress>>,
    metrics: Arc<Metrics>,
    audit: AuditLog,
) -> Result<(), ControlError> {
    let permitted = peer_is_permitted(&stream);
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut opened: Vec<u64> = Vec::new();
    while let Some(line) = lines.next_line().await? {
        let response = if !permitted {
            Response::refused(
                "permission denied: only root or the daemon's user may connect".into(),
            )
        } else {
            match serde_json::from_str::<Request>(&line) {
                Ok(Request::OpenSession { server, session }) => {
                    let mut egress = egress.lock().await;
                    match egress.open_session(&server, session.as_deref()) {
                        Ok(session) => {
                            opened.push(session.cgroup_id);
                            metrics.egress_sessions_opened.inc();
                            tracing::info!(server = %session.server, session = %session.session,
                                cgroup_id = session.cgroup_id, "session cgroup opened");
                            Response::opened(&session)
                        }
                        Err(e) => Response::refused(e.to_string()),
                    }
                }
                Ok(Request::Audit { record }) => match audit.append(*record).await {
                    Ok(_) => Response::accepted(),
                    Err(e) => Response::refused(format!("audit log: {e}")),
                },
                Err(e) => Response::refused(format!("bad request: {e}")),
            }
        };
        let mut text = serde_json::to_string(&response)?;
        text.push('\n');
        write.write_all(text.as_bytes()).await?;
    }
    // The client is gone: its sessions end once their processes have.
    let mut egress = egress.lock().await;
    for cgroup_id in opened {
        if let Err(e) = egress.release_session(cgroup_id) {
            tracing::warn!(cgroup_id, error = %e, "closing session cgroup");
        }
    }
    Ok(())
}

/// Client side: asks the daemon at `socket` for a session cgroup. The returned stream must be
/// kept open for as long as the session runs.
pub async fn open_session(
    socket: &Path,
    server: &str,
    session: Option<&str>,
) -> Result<(Response, UnixStream), ControlError> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ControlError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    let request = Request::OpenSession {
        server: server.to_owned(),
        session: session.map(str::to_owned),
    };
    let mut text = serde_json::to_string(&request)?;
    text.push('\n');
    stream.write_all(text.as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(&mut stream).read_line(&mut line).await?;
    let response: Response = serde_json::from_str(&line)?;
    if !response.ok {
        return Err(ControlError::Refused(
            response.error.unwrap_or_else(|| "no reason given".into()),
        ));
    }
    Ok((response, stream))
}

/// A connection for sending audit records to the daemon (the stdio front's audit log).
pub struct AuditClient {
    connection: Mutex<(
        BufReader<tokio::net::unix::OwnedReadHalf>,
        tokio::net::unix::OwnedWriteHalf,
    )>,
}

impl AuditClient {
    pub async fn connect(socket: &Path) -> Result<AuditClient, ControlError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ControlError::Connect {
                path: socket.to_owned(),
                source,
            })?;
        let (read, write) = stream.into_split();
        Ok(AuditClient {
            connection: Mutex::new((BufReader::new(read), write)),
        })
    }

    /// Sends one record; returns once the daemon has made it durable.
    pub async fn append(&self, record: AuditRecord) -> Result<(), ControlError> {
        let request = Request::Audit {
            record: Box::new(record),
        };
        let mut text = serde_json::to_string(&request)?;
        text.push('\n');
        let mut connection = self.connection.lock().await;
        let (read, write) = &mut *connection;
        write.write_all(text.as_bytes()).await?;
        let mut line = String::new();
        if read.read_line(&mut line).await? == 0 {
            return Err(ControlError::Refused(
                "the daemon closed the connection".into(),
            ));
        }
        let response: Response = serde_json::from_str(&line)?;
        if response.ok {
            Ok(())
        } else {
            Err(ControlError::Refused(
                response.error.unwrap_or_else(|| "no reason given".into()),
            ))
        }
    }
}
