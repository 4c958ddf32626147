//! cgroup v2 plumbing: where the hierarchy is mounted, mcp-guard's own subtree, one cgroup per
//! server session, and the id the kernel reports for each.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo): mount one with `mount -t cgroup2 none /sys/fs/cgroup` or run with --no-egress"
    )]
    NoCgroup2,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not inside the cgroup v2 hierarchy mounted at {mount}")]
    NotCgroup2 { path: PathBuf, mount: PathBuf },
    #[error("cgroup name {0:?} is not a single path component")]
    BadName(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The cgroup v2 mount point, read from /proc/self/mountinfo (hybrid hosts have it at
/// /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_error(Path::new("/proc/self/mountinfo")))?;
    cgroup2_mount_in(&mountinfo).ok_or(CgroupError::NoCgroup2)
}

fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source ...
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        let mount_point = before.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal `\NNN`.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.by_ref().take(3).collect();
            if let Ok(byte) = u8::from_str_radix(&digits, 8) {
                out.push(byte as char);
                continue;
            }
            out.push('\\');
            out.push_str(&digits);
        } else {
            out.push(c);
        }
    }
    out
}

/// The leaf the daemon moves itself into inside a delegated subtree.
pub const DAEMON_LEAF: &str = "daemon";

/// For a daemon started in a cgroup delegated to it (systemd `Delegate=yes`): moves the whole
/// process into `<own cgroup>/daemon` and returns `<own cgroup>`, to be the cgroup root.
///
/// systemd's rule for delegated subtrees is that processes live only in leaves, so the daemon
/// cannot stay in the cgroup whose children are the server cgroups. Started again in its own
/// leaf (re-exec), it stays there and the parent is the root.
pub fn enter_delegated_subtree() -> Result<PathBuf, CgroupError> {
    let mount = cgroup2_mount()?;
    let own = own_cgroup(&mount)?;
    let root = if own.file_name().is_some_and(|name| name == DAEMON_LEAF) {
        own.parent().map(Path::to_owned).unwrap_or(own)
    } else {
        own
    };
    let leaf = root.join(DAEMON_LEAF);
    ensure_dir(&leaf)?;
    let procs = leaf.join("cgroup.procs");
    // "0" is the writing process, all its threads with it.
    fs::write(&procs, "0").map_err(io_error(&procs))?;
    Ok(root)
}

/// This process's cgroup v2 directory, from /proc/self/cgroup (`0::/system.slice/x.service`).
fn own_cgroup(mount: &Path) -> Result<PathBuf, CgroupError> {
    let file = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(file).map_err(io_error(file))?;
    let relative = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or(CgroupError::NoCgroup2)?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

/// The cgroup id the kernel reports (`bpf_get_current_cgroup_id`) is the inode number of the
/// cgroup's directory in cgroupfs.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    Ok(fs::metadata(path).map_err(io_error(path))?.ino())
}

/// A cgroup directory, created if missing.
pub fn ensure_dir(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(path).map_err(io_error(path))
}

/// Checks that `name` can be used as one cgroup directory name.
pub fn checked_name(name: &str) -> Result<&str, CgroupError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.starts_with("cgroup.")
        && name.len() <= 200;
    if ok {
        Ok(name)
    } else {
        Err(CgroupError::BadName(name.to_owned()))
    }
}

/// The pids in a cgroup (not its descendants).
pub fn procs(path: &Path) -> Result<Vec<u32>, CgroupError> {
    let procs_file = path.join("cgroup.procs");
    let text = fs::read_to_string(&procs_file).map_err(io_error(&procs_file))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// True when neither the cgroup nor any descendant holds a process.
pub fn is_populated(path: &Path) -> Result<bool, CgroupError> {
    let events_file = path.join("cgroup.events");
    let text = fs::read_to_string(&events_file).map_err(io_error(&events_file))?;
    Ok(text.lines().any(|l| l.trim() == "populated 1"))
}

/// Direct child cgroups of `path`.
pub fn children(path: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let mut dirs = Vec::new();
    for entry in fs::read_dir(path).map_err(io_error(path))? {
        let entry = entry.map_err(io_error(path))?;
        if entry.file_type().map_err(io_error(path))?.is_dir() {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Removes a cgroup subtree, killing whatever still runs in it (`cgroup.kill`, Linux 5.14+).
pub fn remove_tree(path: &Path) -> Result<(), CgroupError> {
    if !path.exists() {
        return Ok(());
    }
    kill_all(path)?;
    remove_empty_tree(path)
}

/// Sends SIGKILL to every process in the cgroup subtree at `path` (`cgroup.kill`), without
/// waiting for them to be gone.
pub fn kill_processes(path: &Path) -> Result<(), CgroupError> {
    let kill_file = path.join("cgroup.kill");
    fs::write(&kill_file, "1").map_err(io_error(&kill_file))
}

fn kill_all(path: &Path) -> Result<(), CgroupError> {
    kill_processes(path)?;
    // cgroup.kill is asynchronous: wait (bounded) for the processes to be gone.
    for _ in 0..200 {
        if !is_populated(path)? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Removes a subtree that holds no processes (rmdir works on empty cgroups only, bottom-up).
pub fn remove_empty_tree(path: &Path) -> Result<(), CgroupError> {
    for child in children(path)? {
        remove_empty_tree(&child)?;
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CgroupError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Checks that `path` lies inside the cgroup v2 mount.
pub fn check_inside_cgroup2(path: &Path, mount: &Path) -> Result<(), CgroupError> {
    if path.starts_with(mount) {
        Ok(())
    } else {
        Err(CgroupError::NotCgroup2 {
            path: path.to_owned(),
            mount: mount.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu\n\
                      40 25 0:35 / /sys/fs/cgroup/unified rw,relatime shared:16 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount_in("22 1 0:20 / /proc rw - proc proc rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        assert_eq!(unescape_mountinfo(r"/mnt/my\040cgroup"), "/mnt/my cgroup");
    }

    #[test]
    fn refuses_names_that_escape_or_shadow_control_files() {
        for bad in ["", ".", "..", "a/b", "cgroup.procs"] {
            assert!(checked_name(bad).is_err(), "{bad:?}");
        }
        assert!(checked_name("session-1").is_ok());
    }
}
