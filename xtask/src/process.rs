//! Child processes: every command runs from the workspace root with cargo's bin directory on
//! PATH, streams its output, and a failure names the command that failed.

use std::{
    env,
    ffi::OsString,
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{Context, Result, bail};

/// The workspace root, fixed at compile time so xtask works from any directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one directory below the workspace root")
        .to_path_buf()
}

/// `$CARGO_HOME`, or `~/.cargo` as cargo and rustup default it.
pub fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME").filter(|home| !home.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(Path::new(&home).join(".cargo"))
}

/// A command ready to run from the workspace root. CI may start us with a minimal PATH, so
/// cargo's bin directory (rustup's proxies, bpf-linker) is put in front of it.
pub fn command(program: &str) -> Result<Command> {
    let mut command = Command::new(program);
    command
        .current_dir(workspace_root())
        .env("PATH", path_with_cargo_bin()?);
    Ok(command)
}

fn path_with_cargo_bin() -> Result<OsString> {
    let cargo_bin = cargo_home()?.join("bin");
    let inherited = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&inherited).collect();
    if !dirs.contains(&cargo_bin) {
        dirs.insert(0, cargo_bin);
    }
    env::join_paths(dirs).context("PATH contains a directory with ':' in its name")
}

/// The command line as a user would type it, for headers and error messages.
pub fn describe(command: &Command) -> String {
    let words = std::iter::once(command.get_program()).chain(command.get_args());
    words
        .map(|word| word.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `command` with inherited stdio, announcing it first so CI logs show what ran.
pub fn run(command: &mut Command) -> Result<()> {
    let shown = describe(command);
    println!("$ {shown}");
    let status = command
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `command` as a probe and returns its stdout; its stderr still reaches the user so a
/// failure explains itself.
pub fn stdout_of(command: &mut Command) -> Result<String> {
    let shown = describe(command);
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !output.status.success() {
        bail!("`{shown}` failed ({})", output.status);
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{shown}` printed non-UTF-8"))
}

/// Whether `command` runs and exits 0; its output is discarded because failure is an answer.
pub fn succeeds(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Like [`run`], but also returns a copy of stderr so the caller can explain a known failure
/// instead of only reporting the exit status.
pub fn run_keeping_stderr(command: &mut Command) -> Result<(ExitStatus, String)> {
    let shown = describe(command);
    println!("$ {shown}");
    let mut child = command
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    let stderr = tee_to_our_stderr(child.stderr.take().expect("stderr was piped"));
    let status = child
        .wait()
        .with_context(|| format!("could not wait for `{shown}`"))?;
    Ok((status, stderr))
}

fn tee_to_our_stderr(child_stderr: impl std::io::Read) -> String {
    let mut kept = String::new();
    let mut our_stderr = std::io::stderr().lock();
    for line in BufReader::new(child_stderr).lines().map_while(Result::ok) {
        // Losing a copy on our own stderr must not hide the child's exit status.
        let _ = writeln!(our_stderr, "{line}");
        kept.push_str(&line);
        kept.push('\n');
    }
    kept
}

/// Replaces xtask with `command`, so signals (Ctrl-C, systemd stop) reach it directly.
pub fn exec(command: &mut Command) -> Result<()> {
    let shown = describe(command);
    println!("$ {shown}");
    let error = command.exec();
    Err(error).with_context(|| format!("could not start `{shown}`"))
}

/// Fails with one line when not root: loading and attaching eBPF programs needs it.
pub fn require_root(task: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "`cargo xtask {task}` needs root to load eBPF programs into the kernel; run it as root"
        );
    }
    Ok(())
}
