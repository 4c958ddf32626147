//! The real MCP peers of the integration tests: third-party servers and the official Python
//! SDK (which also gives the tests their client), installed from npm and PyPI into
//! `target/mcp-peers/` (or `$MCP_GUARD_PEERS_DIR`) so that tests run what agents run in
//! production, not mocks. Every package is pinned, transitively: npm from
//! `tests/clients/package-lock.json` through `npm ci`, PyPI from `tests/clients/requirements.txt`.
//! `tests/clients/PEERS.md` lists the entry points inside the directory and what each peer speaks.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use crate::process::{self, command, workspace_root};

/// Overrides where the peers are installed; a relative path is taken from the workspace root.
const PEERS_DIR_ENV: &str = "MCP_GUARD_PEERS_DIR";

/// A package at the exact version the tests were written against.
pub struct Pin {
    pub name: &'static str,
    pub version: &'static str,
}

/// Direct npm dependencies; `tests/clients/package.json` pins the same versions and its lockfile
/// pins the rest (express, zod, ...). The TypeScript SDK is the servers' own dependency and the
/// tests' TypeScript client (`tests/clients/ts_client.mjs`); pinned here so that it stays.
pub const NPM_PEERS: [Pin; 3] = [
    Pin {
        name: "@modelcontextprotocol/sdk",
        version: "1.32.2",
    },
    Pin {
        name: "@modelcontextprotocol/server-everything",
        version: "2026.8.31",
    },
    Pin {
        name: "@modelcontextprotocol/server-filesystem",
        version: "2026.8.31",
    },
];

/// Direct PyPI dependencies; `tests/clients/requirements.txt` pins these and every dependency.
pub const PYTHON_PEERS: [Pin; 2] = [
    Pin {
        name: "mcp",
        version: "2.3.0",
    },
    Pin {
        name: "mcp-server-time",
        version: "2026.10.19",
    },
];

/// `$MCP_GUARD_PEERS_DIR`, or `<workspace>/target/mcp-peers` (gitignored, like all of target/).
pub fn peers_dir() -> PathBuf {
    let root = workspace_root();
    match env::var_os(PEERS_DIR_ENV).filter(|dir| !dir.is_empty()) {
        Some(dir) => root.join(dir),
        None => root.join("target").join("mcp-peers"),
    }
}

/// `name version, name version` for progress lines.
pub fn describe(pins: &[Pin]) -> String {
    pins.iter()
        .map(|pin| format!("{} {}", pin.name, pin.version))
        .collect::<Vec<_>>()
        .join(", ")
}

fn manifest(file: &str) -> PathBuf {
    workspace_root().join("tests").join("clients").join(file)
}

/// Installs the npm servers into `<dir>/node_modules`; `Ok(false)` when they already are, at
/// the pinned versions from the current lockfile.
pub fn ensure_npm_peers(dir: &Path) -> Result<bool> {
    let lockfile = read(&manifest("package-lock.json"))?;
    let stamp = stamp_text(&NPM_PEERS, &lockfile);
    let stamp_path = dir.join("npm.stamp");
    if read_stamp(&stamp_path).as_deref() == Some(stamp.as_str()) && npm_versions_match(dir) {
        return Ok(false);
    }
    // A failed install must not leave a stamp that still claims the old one.
    remove_stamp(&stamp_path)?;
    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    for file in ["package.json", "package-lock.json"] {
        copy(&manifest(file), &dir.join(file))?;
    }
    let mut npm = command("npm")?;
    npm.arg("ci")
        .arg("--prefix")
        .arg(dir)
        .args(["--no-audit", "--no-fund"]);
    process::run(&mut npm)
        .context("installing the npm MCP servers needs Node.js 18+, npm and the npm registry")?;
    if !npm_versions_match(dir) {
        bail!(
            "`npm ci` in {} did not install {}; is tests/clients/package-lock.json in step \
             with package.json?",
            dir.display(),
            describe(&NPM_PEERS)
        );
    }
    write(&stamp_path, &stamp)?;
    Ok(true)
}

/// Each pinned package's own package.json names its version; checking it (not only the stamp)
/// catches a node_modules someone changed by hand.
fn npm_versions_match(dir: &Path) -> bool {
    NPM_PEERS.iter().all(|pin| {
        let package_json = dir.join("node_modules").join(pin.name).join("package.json");
        fs::read_to_string(package_json).is_ok_and(|text| names_version(&text, pin.version))
    })
}

/// Whether a package.json declares `"version": "<version>"` (npm writes that exact spacing).
fn names_version(package_json: &str, version: &str) -> bool {
    package_json.contains(&format!("\"version\": \"{version}\""))
}

/// Creates `<dir>/venv` with the pinned SDK and mcp-server-time; `Ok(false)` when it already
/// holds them for the current requirements.
pub fn ensure_python_peers(dir: &Path) -> Result<bool> {
    let requirements_path = manifest("requirements.txt");
    let requirements = read(&requirements_path)?;
    let stamp = stamp_text(&PYTHON_PEERS, &requirements);
    let stamp_path = dir.join("venv.stamp");
    let venv = dir.join("venv");
    let python = venv.join("bin").join("python");
    if read_stamp(&stamp_path).as_deref() == Some(stamp.as_str())
        && python_versions(&python).as_deref() == Some(expected_python_versions().as_str())
    {
        return Ok(false);
    }
    remove_stamp(&stamp_path)?;
    // A venv from another interpreter or a half-done install is cheaper to rebuild than to fix.
    if venv.exists() {
        fs::remove_dir_all(&venv)
            .with_context(|| format!("could not remove {}", venv.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    create_venv(&venv)?;
    process::run(
        command(&python.to_string_lossy())?
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
            ])
            .arg("--requirement")
            .arg(&requirements_path),
    )?;
    let installed = python_versions(&python);
    if installed.as_deref() != Some(expected_python_versions().as_str()) {
        bail!(
            "the venv in {} has {:?} after `pip install`, expected {}",
            venv.display(),
            installed.unwrap_or_default(),
            describe(&PYTHON_PEERS)
        );
    }
    write(&stamp_path, &stamp)?;
    Ok(true)
}

fn create_venv(venv: &Path) -> Result<()> {
    let mut python3 = command("python3")?;
    python3.args(["-m", "venv"]).arg(venv);
    let (status, stderr) = process::run_keeping_stderr(&mut python3)
        .context("installing the Python MCP peers needs python3 (3.10 or newer)")?;
    if status.success() {
        return Ok(());
    }
    if stderr.contains("ensurepip") {
        bail!(
            "python3 cannot create virtual environments here; on Debian or Ubuntu install the \
             python3-venv package"
        );
    }
    bail!("`{}` failed ({status})", process::describe(&python3))
}

/// The installed versions of the pinned Python packages, one per line, as the venv's own
/// interpreter reports them; `None` when it cannot run or a package is missing.
fn python_versions(python: &Path) -> Option<String> {
    let names = PYTHON_PEERS
        .iter()
        .map(|pin| format!("'{}'", pin.name))
        .collect::<Vec<_>>()
        .join(", ");
    let script = format!(
        "from importlib.metadata import version\n\
         for name in ({names},):\n    print(name, version(name))"
    );
    let output = command(&python.to_string_lossy())
        .ok()?
        .args(["-c", &script])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn expected_python_versions() -> String {
    PYTHON_PEERS
        .iter()
        .map(|pin| format!("{} {}\n", pin.name, pin.version))
        .collect()
}

/// What an installation was made from: the pins and a fingerprint of the lock or requirements
/// file, so editing either triggers a reinstall.
fn stamp_text(pins: &[Pin], manifest_text: &str) -> String {
    let mut stamp: String = pins
        .iter()
        .map(|pin| format!("{} {}\n", pin.name, pin.version))
        .collect();
    stamp.push_str(&format!(
        "manifest fnv1a64 {:016x}\n",
        fnv1a64(manifest_text.as_bytes())
    ));
    stamp
}

/// FNV-1a: stable across Rust releases (unlike `DefaultHasher`) and enough to notice an edit.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("could not read {}", path.display()))
}

fn read_stamp(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

fn remove_stamp(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("could not remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("could not write {}", path.display()))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(|_| ())
        .with_context(|| format!("could not copy {} to {}", from.display(), to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_pin_the_same_versions() {
        let package_json = read(&manifest("package.json")).unwrap();
        let lockfile = read(&manifest("package-lock.json")).unwrap();
        for pin in &NPM_PEERS {
            let entry = format!("\"{}\": \"{}\"", pin.name, pin.version);
            assert!(package_json.contains(&entry), "package.json lacks {entry}");
            let locked = format!(
                "\"node_modules/{}\": {{\n      \"version\": \"{}\"",
                pin.name, pin.version
            );
            assert!(
                lockfile.contains(&locked),
                "package-lock.json does not lock {entry}"
            );
        }
        let requirements = read(&manifest("requirements.txt")).unwrap();
        for pin in &PYTHON_PEERS {
            let line = format!("{}=={}", pin.name, pin.version);
            assert!(
                requirements
                    .lines()
                    .any(|candidate| candidate.trim() == line),
                "requirements.txt lacks {line}"
            );
        }
    }

    #[test]
    fn stamp_changes_with_the_manifest() {
        assert_eq!(
            stamp_text(&PYTHON_PEERS, "a==1\n"),
            stamp_text(&PYTHON_PEERS, "a==1\n")
        );
        assert_ne!(
            stamp_text(&PYTHON_PEERS, "a==1\n"),
            stamp_text(&PYTHON_PEERS, "a==2\n")
        );
    }

    #[test]
    fn fnv1a64_matches_the_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn version_is_read_from_package_json() {
        let package_json = "{\n  \"name\": \"x\",\n  \"version\": \"2026.8.31\",\n}";
        assert!(names_version(package_json, "2026.8.31"));
        assert!(!names_version(package_json, "2026.8.3"));
    }
}
