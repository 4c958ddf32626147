//! `egress-probe`: the process the egress tests run inside a guarded cgroup.
//!
//! Every attempt is reported as one JSON line on stdout:
//! `{"attempt":"tcp:127.0.0.1:8080","pid":123,"cgroup_id":4567,"cgroup":"/x/y","result":"EPERM"}`
//! where `result` is `"ok"` or the errno name the kernel returned, so a refusal by the eBPF
//! programs (EPERM) can be told apart from an absent listener (ECONNREFUSED).
//!
//! Attempts:
//! - `tcp:127.0.0.1:8080`, `tcp:[::1]:8080`, `tcp:[::ffff:127.0.0.1]:8080` — TCP connect(); the
//!   v4-mapped form uses an AF_INET6 socket, so the kernel runs the connect6 hook;
//! - `udp:127.0.0.1:9999`, `udp:[::1]:9999` — one datagram with sendto() on an unconnected
//!   socket, which is judged by the sendmsg hooks;
//! - `udpc:127.0.0.1:9999` — connect() on a UDP socket, then send().
//!
//! A successful TCP connect or datagram carries a token (`egress-probe pid=N attempt=A`) so the
//! listener on the other side can prove the attempt really arrived.
//!
//! Modes:
//! - `egress-probe ATTEMPT...` — make each attempt in order;
//! - `egress-probe --interactive` — print a `{"role":"ready",...}` line, then read attempts from
//!   stdin one per line and answer each (so a test chooses when each attempt happens);
//! - `egress-probe --fork-exec ATTEMPT...` — print a `{"role":"parent",...}` line, fork, and exec
//!   this binary again in the child with the attempts; the child's lines follow.
//!
//! Exit status: 0 when every attempt was made (whatever its result), 2 on a usage error.

use std::ffi::CString;
use std::io::{self, BufRead, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use serde_json::{Value, json};

/// Safety net only: a loopback connect is answered at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--").collect();
    let code = match args.first().map(String::as_str) {
        None | Some("--help") | Some("-h") => {
            eprintln!(
                "usage: egress-probe [--interactive | --fork-exec] ATTEMPT...\n\
                 ATTEMPT: tcp:ADDR:PORT | udp:ADDR:PORT | udpc:ADDR:PORT (IPv6 as [ADDR])"
            );
            2
        }
        Some("--interactive") => interactive(),
        Some("--fork-exec") => fork_exec(&args[1..]),
        Some(_) => {
            for attempt in &args {
                emit(&run_attempt(attempt));
            }
            0
        }
    };
    std::process::exit(code);
}

fn interactive() -> i32 {
    emit(&identity("ready"));
    let stdin = io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let attempt = line.trim();
        match attempt {
            "" => continue,
            "exit" | "quit" => break,
            _ => emit(&run_attempt(attempt)),
        }
    }
    0
}

fn fork_exec(attempts: &[String]) -> i32 {
    if attempts.is_empty() {
        eprintln!("egress-probe: --fork-exec needs at least one attempt");
        return 2;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => {
            eprintln!("egress-probe: cannot find own executable: {err}");
            return 2;
        }
    };
    // Everything exec needs is prepared before fork: the child only calls execv and _exit.
    let path = CString::new(exe.as_os_str().as_bytes()).expect("executable path has no NUL");
    let mut argv: Vec<CString> = vec![CString::new("egress-probe").unwrap()];
    argv.extend(
        attempts
            .iter()
            .map(|a| CString::new(a.as_bytes()).expect("attempt has no NUL")),
    );
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());

    emit(&identity("parent"));
    // SAFETY: this process is single-threaded here; the child only calls async-signal-safe
    // functions (execv, _exit) on data prepared above.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!("egress-probe: fork: {}", io::Error::last_os_error());
        return 2;
    }
    if pid == 0 {
        unsafe {
            libc::execv(path.as_ptr(), argv_ptrs.as_ptr());
            libc::_exit(127);
        }
    }
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waiting for our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            eprintln!("egress-probe: waitpid: {}", io::Error::last_os_error());
            return 2;
        }
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        eprintln!("egress-probe: child ended abnormally (status {status})");
        2
    }
}

fn emit(line: &Value) {
    let mut out = io::stdout().lock();
    // A closed stdout means the test is gone; nothing left to report to.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The fields every line carries: who made the attempt, and from which cgroup.
fn identity(role: &str) -> Value {
    let (cgroup, cgroup_id) = match own_cgroup() {
        Ok((path, id)) => (Value::from(path), Value::from(id)),
        Err(err) => (Value::from(format!("error: {err}")), Value::Null),
    };
    json!({
        "role": role,
        "pid": std::process::id(),
        "cgroup": cgroup,
        "cgroup_id": cgroup_id,
    })
}

fn run_attempt(attempt: &str) -> Value {
    let mut line = identity("attempt");
    line["attempt"] = Value::from(attempt);
    let (result, detail) = match parse_attempt(attempt) {
        Err(err) => ("invalid".to_string(), Some(err)),
        Ok((kind, addr)) => match make_attempt(kind, addr, attempt) {
            Ok(()) => ("ok".to_string(), None),
            Err(err) => (errno_name(&err), Some(err.to_string())),
        },
    };
    line["result"] = Value::from(result);
    if let Some(detail) = detail {
        line["detail"] = Value::from(detail);
    }
    line
}

#[derive(Clone, Copy)]
enum Kind {
    Tcp,
    UdpUnconnected,
    UdpConnected,
}

fn parse_attempt(attempt: &str) -> Result<(Kind, SocketAddr), String> {
    let (proto, addr) = attempt
        .split_once(':')
        .ok_or_else(|| format!("attempt {attempt:?} is not PROTO:ADDR:PORT"))?;
    let kind = match proto {
        "tcp" => Kind::Tcp,
        "udp" => Kind::UdpUnconnected,
        "udpc" => Kind::UdpConnected,
        other => return Err(format!("unknown protocol {other:?} (tcp|udp|udpc)")),
    };
    let addr: SocketAddr = addr
        .parse()
        .map_err(|err| format!("bad address {addr:?}: {err}"))?;
    Ok((kind, addr))
}

fn make_attempt(kind: Kind, addr: SocketAddr, attempt: &str) -> io::Result<()> {
    let token = format!(
        "egress-probe pid={} attempt={attempt}\n",
        std::process::id()
    );
    match kind {
        Kind::Tcp => {
            // std picks the socket family from the address: a v4-mapped IPv6 address gets an
            // AF_INET6 socket (dual-stack by default), exactly the bypass the hooks must close.
            let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
            // The connect is what is judged; the token is a courtesy for the listener.
            let _ = stream.write_all(token.as_bytes());
            let _ = stream.shutdown(std::net::Shutdown::Write);
            Ok(())
        }
        Kind::UdpUnconnected => {
            let socket = unconnected_udp(addr)?;
            socket.send_to(token.as_bytes(), addr)?;
            Ok(())
        }
        Kind::UdpConnected => {
            let socket = unconnected_udp(addr)?;
            socket.connect(addr)?;
            socket.send(token.as_bytes())?;
            Ok(())
        }
    }
}

fn unconnected_udp(dest: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = match dest {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    UdpSocket::bind(local)
}

/// `(path inside the cgroup2 hierarchy, cgroup id)`. The cgroup id the kernel reports
/// (`bpf_get_current_cgroup_id`) is the inode number of the cgroup's directory.
fn own_cgroup() -> Result<(String, u64), String> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|err| format!("read /proc/self/cgroup: {err}"))?;
    let path = cgroups
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or("no cgroup v2 line (0::) in /proc/self/cgroup")?
        .to_string();
    let mount = cgroup2_mount()?;
    let dir = format!(
        "{}/{}",
        mount.trim_end_matches('/'),
        path.trim_start_matches('/')
    );
    let meta = std::fs::metadata(&dir).map_err(|err| format!("stat {dir}: {err}"))?;
    Ok((path, meta.ino()))
}

fn cgroup2_mount() -> Result<String, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|err| format!("read /proc/self/mountinfo: {err}"))?;
    for line in mountinfo.lines() {
        // `id parent major:minor root mountpoint options... - fstype source super-options`
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mountpoint) = left.split_whitespace().nth(4)
        {
            return Ok(unescape_mountinfo(mountpoint));
        }
    }
    Err("no cgroup2 mount in /proc/self/mountinfo".into())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(code) = u8::from_str_radix(digits, 8) {
                out.push(code);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn errno_name(err: &io::Error) -> String {
    if err.kind() == io::ErrorKind::TimedOut && err.raw_os_error().is_none() {
        return "ETIMEDOUT".into();
    }
    let Some(errno) = err.raw_os_error() else {
        return format!("error: {err}");
    };
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EINVAL => "EINVAL",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::EAGAIN => "EAGAIN",
        libc::ENOBUFS => "ENOBUFS",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::ENOTCONN => "ENOTCONN",
        libc::EISCONN => "EISCONN",
        libc::EDESTADDRREQ => "EDESTADDRREQ",
        libc::EINTR => "EINTR",
        other => return format!("errno{other}"),
    };
    name.into()
}
