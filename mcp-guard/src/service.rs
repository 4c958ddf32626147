//! systemd integration: the sd_notify(3) protocol, implemented directly (one datagram per
//! state change) rather than through libsystemd, so the daemon links nothing new.
//!
//! With `Type=notify` systemd considers the service started only when it sends `READY=1`, which
//! the daemon does once the kernel programs are attached, the policy is loaded and every
//! listener is bound. Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("NOTIFY_SOCKET={value:?}: {reason}")]
    BadSocket { value: String, reason: String },
    #[error("sending {state:?} to NOTIFY_SOCKET: {source}")]
    Send {
        state: String,
        source: std::io::Error,
    },
}

/// The service manager's notification socket and watchdog, as the environment announced them.
#[derive(Debug, Default)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
}

/// The variables sd_notify(3) reads. They are removed from the environment once read, as
/// `sd_notify(unset_environment=1)` does, so that MCP server processes the daemon spawns do
/// not inherit them and cannot speak for it.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
const WATCHDOG_PID: &str = "WATCHDOG_PID";

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, then removes them from the
    /// environment.
    ///
    /// # Safety
    /// Changes the process environment: call it before any other thread exists (the first
    /// thing `main` does, before the async runtime starts).
    pub unsafe fn take_from_env() -> Result<Notifier, ServiceError> {
        let socket = std::env::var(NOTIFY_SOCKET).ok();
        let watchdog_usec = std::env::var(WATCHDOG_USEC).ok();
        let watchdog_pid = std::env::var(WATCHDOG_PID).ok();
        for name in [NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID] {
            // SAFETY: the caller guarantees no other thread reads or writes the environment.
            unsafe { std::env::remove_var(name) };
        }
        let target = socket
            .filter(|value| !value.is_empty())
            .map(|value| Target::connect(&value))
            .transpose()?;
        Ok(Notifier {
            target,
            watchdog: watchdog_interval(
                watchdog_usec.as_deref(),
                watchdog_pid.as_deref(),
                std::process::id(),
            ),
        })
    }

    /// Whether a service manager is listening.
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1`: half the manager's timeout, so that one late ping is
    /// not yet a missed one. `None` when no watchdog is set for this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.target.as_ref().and(self.watchdog)
    }

    /// Sends `state` (newline-separated `KEY=VALUE` assignments) to the manager.
    pub fn notify(&self, state: &str) -> Result<(), ServiceError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        target
            .socket
            .send_to_addr(state.as_bytes(), &target.addr)
            .map(drop)
            .map_err(|source| ServiceError::Send {
                state: state.to_owned(),
                source,
            })
    }

    /// `READY=1` with a `STATUS=` line.
    pub fn ready(&self, status: &str) -> Result<(), ServiceError> {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC=` sd_notify(3) requires beside it, so that the
    /// manager can tell this reload from an earlier one.
    pub fn reloading(&self) -> Result<(), ServiceError> {
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the policy",
            monotonic_usec()
        ))
    }

    /// `STOPPING=1` with a `STATUS=` line.
    pub fn stopping(&self, status: &str) -> Result<(), ServiceError> {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
    }

    /// `STATUS=` alone.
    pub fn status(&self, status: &str) -> Result<(), ServiceError> {
        self.notify(&format!("STATUS={}", one_line(status)))
    }

    /// `WATCHDOG=1`: the daemon's main loop is alive.
    pub fn watchdog(&self) -> Result<(), ServiceError> {
        self.notify("WATCHDOG=1")
    }
}

impl Target {
    /// `/path` is a socket in the filesystem; `@name` one in the abstract namespace.
    fn connect(value: &str) -> Result<Target, ServiceError> {
        let bad = |reason: String| ServiceError::BadSocket {
            value: value.to_owned(),
            reason,
        };
        let addr = if let Some(name) = value.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes())
        } else if value.starts_with('/') {
            SocketAddr::from_pathname(value)
        } else {
            return Err(bad("neither an absolute path nor an @abstract name".into()));
        }
        .map_err(|e| bad(e.to_string()))?;
        let socket = UnixDatagram::unbound().map_err(|e| bad(e.to_string()))?;
        Ok(Target { socket, addr })
    }
}

/// Half of `WATCHDOG_USEC`, when the watchdog is meant for `own_pid` (a `WATCHDOG_PID` naming
/// another process means the manager watches that one, e.g. a wrapper that exec'd us).
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&usec| usec > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

fn monotonic_usec() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|now| now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

/// A status is one assignment: a newline in it would start another.
fn one_line(status: &str) -> String {
    status.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_pings_at_half_the_interval_and_only_for_its_process() {
        let half = Some(Duration::from_secs(5));
        assert_eq!(watchdog_interval(Some("10000000"), None, 7), half);
        assert_eq!(watchdog_interval(Some("10000000"), Some("7"), 7), half);
        assert_eq!(watchdog_interval(Some("10000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }

    #[test]
    fn notifications_reach_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let name = format!("mcp-guard-test-notify-{}", std::process::id());
        let abstract_listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        for (value, socket) in [
            (path.display().to_string(), &listener),
            (format!("@{name}"), &abstract_listener),
        ] {
            let notifier = Notifier {
                target: Some(Target::connect(&value).unwrap()),
                watchdog: None,
            };
            notifier.ready("serving\nsomething").unwrap();
            let mut buffer = [0u8; 256];
            let n = socket.recv(&mut buffer).unwrap();
            assert_eq!(&buffer[..n], b"READY=1\nSTATUS=serving something");
            notifier.reloading().unwrap();
            let n = socket.recv(&mut buffer).unwrap();
            let text = std::str::from_utf8(&buffer[..n]).unwrap();
            assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
        }
        assert!(Target::connect("relative/path").is_err());
    }

    #[test]
    fn without_a_manager_notifying_does_nothing() {
        let notifier = Notifier::default();
        assert!(!notifier.is_active());
        notifier.ready("x").unwrap();
        assert_eq!(notifier.watchdog_interval(), None);
    }
}
