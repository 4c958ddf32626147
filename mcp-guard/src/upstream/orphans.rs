//! What a stdio server leaves behind when no cgroup holds it (a stdio front without the
//! daemon). Killing the server's process group ends its background jobs, but not a process
//! that left the group: one started with `setsid`, or a daemon that double-forks. So the front
//! makes itself the "child subreaper" of its descendants (prctl(2)): a process whose parent
//! exits is re-parented to the front instead of to init. The front reaps those as they exit
//! (or they would linger as zombies for the session's life) and kills the rest at its end.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, thiserror::Error)]
pub enum OrphansError {
    #[error("becoming the subreaper of the server's processes: {0}")]
    Subreaper(#[from] nix::Error),
    #[error("listening for SIGCHLD: {0}")]
    ChildSignal(#[from] std::io::Error),
}

/// This process's descendants, adopted when their parents exit.
pub struct Adopted {
    exits: tokio::signal::unix::Signal,
}

/// Makes this process the subreaper of every process it starts from now on, and of theirs.
pub fn adopt_orphans() -> Result<Adopted, OrphansError> {
    nix::sys::prctl::set_child_subreaper(true)?;
    Ok(Adopted {
        exits: signal(SignalKind::child())?,
    })
}

impl Adopted {
    /// Reaps adopted processes as they exit, for as long as this process runs. `own` is the
    /// child this process started itself (the server): its exit status belongs to whoever
    /// waits for it, so it is left alone.
    pub async fn reap_as_they_exit(mut self, own: Option<u32>) {
        let own = own.and_then(|pid| i32::try_from(pid).ok());
        while self.exits.recv().await.is_some() {
            for child in children() {
                if child.exited && Some(child.pid) != own {
                    let _ = waitpid(Pid::from_raw(child.pid), Some(WaitPidFlag::WNOHANG));
                }
            }
        }
    }
}

/// Kills every process this one still has as a child, own or adopted, and reaps them, until
/// none is left (each killed process's own children are adopted as it dies, and killed in
/// the next turn) or `within` has passed. Returns the pids still there at the end.
pub async fn end_all(within: Duration) -> Vec<i32> {
    let deadline = Instant::now() + within;
    loop {
        let left = children();
        if left.is_empty() || Instant::now() >= deadline {
            return left.into_iter().map(|child| child.pid).collect();
        }
        for child in &left {
            let pid = Pid::from_raw(child.pid);
            if !child.exited {
                let _ = kill(pid, Signal::SIGKILL);
            }
            let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A child process of this one, as /proc shows it.
#[derive(Debug, PartialEq, Eq)]
struct Child {
    pid: i32,
    /// It has exited and waits to be reaped (a zombie).
    exited: bool,
}

/// This process's children: every process whose parent it is, found by their /proc entries
/// (the kernel keeps no list of a process's children outside its threads' own).
fn children() -> Vec<Child> {
    let this = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (parent, state) = parent_and_state(&stat)?;
            (parent == this).then_some(Child {
                pid,
                exited: state == 'Z',
            })
        })
        .collect()
}

/// The parent pid and state letter of a `/proc/PID/stat` line: `pid (comm) S ppid ...`. The
/// command name may itself hold spaces and parentheses, so fields are counted from its last `)`.
fn parent_and_state(stat: &str) -> Option<(u32, char)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((parent, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_parent_and_state_even_with_an_odd_command_name() {
        assert_eq!(
            parent_and_state("4242 (sleep) S 17 4242 4242 0 -1 4194560"),
            Some((17, 'S'))
        );
        assert_eq!(
            parent_and_state("4243 (a) Z (b) Z 99 1 1 0"),
            Some((99, 'Z'))
        );
        assert_eq!(parent_and_state("4244 no command"), None);
    }

    #[test]
    fn a_child_of_this_process_is_found_and_an_exited_one_is_seen_as_exited() {
        let mut running = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep");
        let mut done = std::process::Command::new("true")
            .spawn()
            .expect("start true");
        let done_pid = done.id() as i32;
        let running_pid = running.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !children().contains(&Child {
            pid: done_pid,
            exited: true,
        }) {
            assert!(Instant::now() < deadline, "true never showed as exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(children().contains(&Child {
            pid: running_pid,
            exited: false,
        }));
        running.kill().expect("kill sleep");
        running.wait().expect("reap sleep");
        done.wait().expect("reap true");
        assert!(
            !children()
                .iter()
                .any(|c| c.pid == running_pid || c.pid == done_pid)
        );
    }
}
