//! `cargo xtask setup`: installs, idempotently, what a fresh machine lacks to build the eBPF
//! half — the nightly's rust-src (aya-build runs `-Z build-std=core`) and a bpf-linker built
//! against the nightly's own LLVM — and, later, the real MCP servers the tests talk to.

use crate::peers;
use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::process::{self, cargo_home, command};

const NIGHTLY: &str = "nightly";

pub fn setup() -> Result<()> {
    ensure_nightly_with_rust_src()?;
    ensure_bpf_linker()?;
    ensure_systemd_analyze()?;
    setup_mcp_peers()
}

/// `systemd-analyze verify` checks the shipped unit (tests/service.rs). It comes with Debian's
/// `systemd` package, which installs and runs fine where systemd is not PID 1.
fn ensure_systemd_analyze() -> Result<()> {
    const STEP: &str = "systemd-analyze (Debian package systemd)";
    if process::succeeds(command("systemd-analyze")?.arg("--version")) {
        report(STEP, Outcome::AlreadyPresent);
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("systemd-analyze is missing: install the `systemd` package (as root)");
    }
    let apt = || -> Result<Command> {
        let mut apt = command("apt-get")?;
        apt.env("DEBIAN_FRONTEND", "noninteractive");
        Ok(apt)
    };
    process::run(apt()?.args(["update", "-q"]))?;
    process::run(apt()?.args(["install", "-y", "-q", "--no-install-recommends", "systemd"]))?;
    report(STEP, Outcome::Installed);
    Ok(())
}

enum Outcome {
    AlreadyPresent,
    Installed,
}

fn report(step: &str, outcome: Outcome) {
    let outcome = match outcome {
        Outcome::AlreadyPresent => "already present",
        Outcome::Installed => "installed",
    };
    println!("setup: {step}: {outcome}");
}

fn rustup() -> Result<Command> {
    let mut rustup = command("rustup")?;
    // A probe of a missing toolchain must answer "missing", not silently install a full one.
    rustup.env("RUSTUP_AUTO_INSTALL", "0");
    Ok(rustup)
}

fn ensure_nightly_with_rust_src() -> Result<()> {
    let step = "nightly toolchain with rust-src";
    match installed_nightly_components()? {
        None => {
            process::run(rustup()?.args([
                "toolchain",
                "install",
                NIGHTLY,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
            report(step, Outcome::Installed);
        }
        Some(components) if !lists_rust_src(&components) => {
            process::run(rustup()?.args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
            report(step, Outcome::Installed);
        }
        Some(_) => report(step, Outcome::AlreadyPresent),
    }
    Ok(())
}

/// The nightly's installed components, or `None` when there is no nightly toolchain (rustup
/// refuses to list components of a toolchain it does not have).
fn installed_nightly_components() -> Result<Option<String>> {
    let output = rustup()?
        .args(["component", "list", "--toolchain", NIGHTLY, "--installed"])
        .output()
        .context("could not start `rustup`; install it from https://rustup.rs")?;
    if !output.status.success() {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&output.stdout).into_owned()))
}

fn lists_rust_src(components: &str) -> bool {
    components
        .lines()
        .any(|line| line.split_whitespace().next() == Some("rust-src"))
}

/// bpf-linker must link the same LLVM major as the nightly that emits the bitcode. No distro
/// ships a matching LLVM, but the nightly carries its own libLLVM, so build against that.
fn ensure_bpf_linker() -> Result<()> {
    let major = nightly_llvm_major()?;
    let prefix = cargo_home()?.join("mcp-guard-llvm");
    let step = format!("bpf-linker for LLVM {major}");
    if bpf_linker_runs() && stamped_llvm_major(&prefix) == Some(major) {
        report(&step, Outcome::AlreadyPresent);
        return Ok(());
    }
    link_nightly_libllvm(&prefix, major)?;
    install_bpf_linker(&prefix, major)?;
    if !bpf_linker_runs() {
        bail!("bpf-linker was installed but `rustup run {NIGHTLY} bpf-linker --version` fails");
    }
    stamp_llvm_major(&prefix, major)?;
    report(&step, Outcome::Installed);
    Ok(())
}

fn nightly_llvm_major() -> Result<u32> {
    let version = process::stdout_of(rustup()?.args(["run", NIGHTLY, "rustc", "-vV"]))?;
    parse_llvm_major(&version)
}

/// Reads the major from the `LLVM version: 22.1.4` line of `rustc -vV`.
fn parse_llvm_major(rustc_verbose_version: &str) -> Result<u32> {
    let version = rustc_verbose_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .context("`rustc -vV` of the nightly has no `LLVM version:` line")?;
    let major = version.trim().split('.').next().unwrap_or_default();
    major.parse().with_context(|| {
        format!(
            "unexpected LLVM version `{}` in `rustc -vV`",
            version.trim()
        )
    })
}

/// bpf-linker finds the nightly's libLLVM only through the library path rustup sets for the
/// toolchain, which is also how aya-build runs it.
fn bpf_linker_runs() -> bool {
    rustup().is_ok_and(|mut rustup| {
        process::succeeds(rustup.args(["run", NIGHTLY, "bpf-linker", "--version"]))
    })
}

fn stamp_path(prefix: &Path) -> PathBuf {
    prefix.join("llvm-major")
}

/// The LLVM major the installed bpf-linker was built for; `--version` does not tell.
fn stamped_llvm_major(prefix: &Path) -> Option<u32> {
    let stamp = fs::read_to_string(stamp_path(prefix)).ok()?;
    stamp.trim().parse().ok()
}

fn stamp_llvm_major(prefix: &Path, major: u32) -> Result<()> {
    let path = stamp_path(prefix);
    fs::write(&path, format!("{major}\n"))
        .with_context(|| format!("could not write {}", path.display()))
}

/// Makes `<prefix>/lib/libLLVM.so` point at the nightly's libLLVM, the layout bpf-linker's
/// build expects under `LLVM_PREFIX`.
fn link_nightly_libllvm(prefix: &Path, major: u32) -> Result<()> {
    let sysroot =
        process::stdout_of(rustup()?.args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))?;
    let libllvm = find_libllvm(&Path::new(sysroot.trim()).join("lib"), major)?;
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir)
        .with_context(|| format!("could not create {}", lib_dir.display()))?;
    let link = lib_dir.join("libLLVM.so");
    if fs::symlink_metadata(&link).is_ok() {
        fs::remove_file(&link).with_context(|| format!("could not replace {}", link.display()))?;
    }
    symlink(&libllvm, &link)
        .with_context(|| format!("could not link {} to {}", link.display(), libllvm.display()))
}

/// The one real `libLLVM.so.<major>…` file in the nightly's lib directory (the
/// `libLLVM-<major>-rust-….so` beside it is a linker script, not a library).
fn find_libllvm(sysroot_lib: &Path, major: u32) -> Result<PathBuf> {
    let entries = fs::read_dir(sysroot_lib)
        .with_context(|| format!("could not list {}", sysroot_lib.display()))?;
    let candidates: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| is_libllvm_of_major(&entry.file_name().to_string_lossy(), major))
        .map(|entry| entry.path())
        .collect();
    match candidates.as_slice() {
        [libllvm] => Ok(libllvm.clone()),
        [] => bail!(
            "no libLLVM.so.{major}* in {}; the nightly has no LLVM to build bpf-linker against",
            sysroot_lib.display()
        ),
        _ => bail!(
            "several libLLVM.so.{major}* in {}, expected one",
            sysroot_lib.display()
        ),
    }
}

/// `libLLVM.so.22.1-rust-…` is major 22, but `libLLVM.so.2…` must not match major 2.
fn is_libllvm_of_major(file_name: &str, major: u32) -> bool {
    file_name
        .strip_prefix(&format!("libLLVM.so.{major}"))
        .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

fn install_bpf_linker(prefix: &Path, major: u32) -> Result<()> {
    let feature = format!("llvm-{major}");
    let mut install = command("cargo")?;
    install
        .args(["install", "bpf-linker", "--locked", "--no-default-features"])
        .args(["--features", &feature])
        // We only get here when the installed bpf-linker is unusable, but cargo would skip a
        // reinstall with unchanged features, e.g. after a nightly update renamed its libLLVM.
        .arg("--force")
        .env("LLVM_PREFIX", prefix);
    let (status, stderr) = process::run_keeping_stderr(&mut install)?;
    if status.success() {
        return Ok(());
    }
    if names_missing_feature(&stderr) {
        bail!(
            "bpf-linker has no `{feature}` feature for the nightly's LLVM {major}; \
             use a nightly whose LLVM major bpf-linker supports, or a newer bpf-linker"
        );
    }
    bail!("`{}` failed ({status})", process::describe(&install))
}

/// Cargo's wording for an unknown feature, old ("does not have feature") and new.
fn names_missing_feature(cargo_stderr: &str) -> bool {
    cargo_stderr.contains("does not contain this feature")
        || cargo_stderr.contains("does not have feature")
        || cargo_stderr.contains("does not have these features")
}

/// Installs the real MCP servers (npm and PyPI packages) and the Python SDK client that the
/// integration tests run behind mcp-guard, pinned, into `target/mcp-peers` (or
/// `$MCP_GUARD_PEERS_DIR`), so a fresh machine gets them from `cargo xtask setup` too.
fn setup_mcp_peers() -> Result<()> {
    let dir = peers::peers_dir();
    let outcome = |installed| {
        if installed {
            Outcome::Installed
        } else {
            Outcome::AlreadyPresent
        }
    };
    let npm = peers::ensure_npm_peers(&dir)?;
    report(
        &format!("npm MCP servers ({})", peers::describe(&peers::NPM_PEERS)),
        outcome(npm),
    );
    let python = peers::ensure_python_peers(&dir)?;
    report(
        &format!(
            "Python MCP venv ({})",
            peers::describe(&peers::PYTHON_PEERS)
        ),
        outcome(python),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_comes_from_rustc_verbose_version() {
        let version = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\n\
                       host: x86_64-unknown-linux-gnu\n\
                       LLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(version).unwrap(), 22);
    }

    #[test]
    fn rustc_without_llvm_line_is_an_error() {
        assert!(parse_llvm_major("rustc 1.97.0-nightly\n").is_err());
    }

    #[test]
    fn libllvm_file_matches_only_its_major() {
        assert!(is_libllvm_of_major(
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            22
        ));
        assert!(is_libllvm_of_major("libLLVM.so.22", 22));
        assert!(!is_libllvm_of_major(
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            2
        ));
        assert!(!is_libllvm_of_major(
            "libLLVM-22-rust-1.97.0-nightly.so",
            22
        ));
    }

    #[test]
    fn rust_src_is_found_in_component_list() {
        assert!(lists_rust_src("cargo-x86_64-unknown-linux-gnu\nrust-src\n"));
        assert!(!lists_rust_src(
            "cargo-x86_64-unknown-linux-gnu\nrust-std-x86_64\n"
        ));
    }

    #[test]
    fn both_cargo_wordings_of_an_unknown_feature_are_recognised() {
        assert!(names_missing_feature(
            "the package 'bpf-linker' does not contain this feature: llvm-99"
        ));
        assert!(names_missing_feature(
            "Package `bpf-linker v0.13.0` does not have feature `llvm-99`."
        ));
        assert!(!names_missing_feature("error: linking with `cc` failed"));
    }
}
