//! Starts a server process inside its guarded cgroup before it runs any code of its own.
//!
//! The parent opens the cgroup's `cgroup.procs`; the forked child writes "0" to it (cgroup v2:
//! "move the writer") between fork and exec. Only async-signal-safe calls happen in the child,
//! and exec fails if the move fails, so no code of the server ever runs unconfined.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;

/// Arranges for the command's child to join the cgroup at `cgroup_path` before exec.
/// Works for `std::process::Command` and, through `as_std_mut`, for tokio's.
pub fn place_in_cgroup(command: &mut std::process::Command, cgroup_path: &Path) -> io::Result<()> {
    let procs: OwnedFd = OpenOptions::new()
        .write(true)
        .open(cgroup_path.join("cgroup.procs"))?
        .into();
    // SAFETY: the closure only calls write(2) on an fd opened above; it allocates nothing and
    // takes no locks, as required between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let written = libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1);
            if written == 1 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
    Ok(())
}

/// The cgroup v2 path of a process relative to the hierarchy root (`0::/path` in
/// /proc/PID/cgroup).
pub fn cgroup_of(pid: u32) -> io::Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or_else(|| io::Error::other(format!("process {pid} has no cgroup v2 entry")))
}
