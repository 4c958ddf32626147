//! `cargo xtask install` and `uninstall`: mcp-guard as a packaged service would lay it out.
//!
//! | what | where |
//! |---|---|
//! | binary | `<root><prefix>/bin/mcp-guard` |
//! | systemd unit | `<root>/etc/systemd/system/mcp-guard.service` (ExecStart points at the binary) |
//! | policy | `<root>/etc/mcp-guard/policy.json`: `dist/policy.json`, which refuses everything until edited; an existing policy is never overwritten |
//! | docs | `<root><prefix>/share/doc/mcp-guard/`: README, the default policy, the Prometheus scrape config and the Grafana dashboard |
//!
//! `--root` stages the tree somewhere else (a package build, a test); paths inside the files
//! are the ones the installed system sees (`<prefix>/...`). Uninstalling removes what install
//! put there, except a policy that was edited and the audit log (`/var/lib/mcp-guard`), which
//! only `--purge` removes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::process::{self, command, workspace_root};

const UNIT: &str = "dist/mcp-guard.service";
const POLICY: &str = "dist/policy.json";
/// Files copied into the documentation directory, from the workspace root.
const DOCS: [&str; 5] = [
    "README.md",
    "dist/policy.json",
    "dist/prometheus.yml",
    "dist/prometheus-alerts.yml",
    "dist/grafana-dashboard.json",
];
/// The binary path the shipped unit names; replaced by the installed one.
const UNIT_BINARY: &str = "/usr/local/bin/mcp-guard";
const UNIT_DOCS: &str = "/usr/local/share/doc/mcp-guard";

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// Where the binary and docs go, as the installed system sees it.
    #[arg(long, default_value = "/usr/local")]
    prefix: PathBuf,
    /// Stage the whole tree under this directory instead of `/`.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Install this mcp-guard binary instead of building one with `cargo build --release`.
    #[arg(long)]
    binary: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct UninstallArgs {
    #[arg(long, default_value = "/usr/local")]
    prefix: PathBuf,
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Also remove the policy (edited or not) and the audit log under /var/lib/mcp-guard.
    #[arg(long)]
    purge: bool,
}

/// Paths as the installed system sees them (`system`) and as they are written (`staged`).
struct Layout {
    root: PathBuf,
    prefix: PathBuf,
}

impl Layout {
    fn new(root: &Path, prefix: &Path) -> Result<Layout> {
        if !prefix.is_absolute() {
            bail!(
                "--prefix must be an absolute path, not {}",
                prefix.display()
            );
        }
        Ok(Layout {
            root: root.to_owned(),
            prefix: prefix.to_owned(),
        })
    }

    /// `<root>` + an absolute system path.
    fn staged(&self, system: &Path) -> PathBuf {
        self.root
            .join(system.strip_prefix("/").expect("system paths are absolute"))
    }

    fn binary(&self) -> PathBuf {
        self.prefix.join("bin/mcp-guard")
    }

    fn docs(&self) -> PathBuf {
        self.prefix.join("share/doc/mcp-guard")
    }

    fn unit(&self) -> PathBuf {
        PathBuf::from("/etc/systemd/system/mcp-guard.service")
    }

    fn policy(&self) -> PathBuf {
        PathBuf::from("/etc/mcp-guard/policy.json")
    }

    fn state(&self) -> PathBuf {
        PathBuf::from("/var/lib/mcp-guard")
    }
}

pub fn install(args: &InstallArgs) -> Result<()> {
    let layout = Layout::new(&args.root, &args.prefix)?;
    let source_binary = match &args.binary {
        Some(binary) => binary.clone(),
        None => build_release_binary()?,
    };
    let root = workspace_root();

    let binary = layout.staged(&layout.binary());
    copy(&source_binary, &binary, 0o755)?;

    let unit_text = fs::read_to_string(root.join(UNIT)).context("reading the unit")?;
    let unit_text = unit_text
        .replace(UNIT_BINARY, &layout.binary().to_string_lossy())
        .replace(UNIT_DOCS, &layout.docs().to_string_lossy());
    write(&layout.staged(&layout.unit()), &unit_text, 0o644)?;

    let policy = layout.staged(&layout.policy());
    if policy.exists() {
        println!("install: kept the existing {}", policy.display());
    } else {
        copy(&root.join(POLICY), &policy, 0o640)?;
    }

    let docs = layout.staged(&layout.docs());
    for doc in DOCS {
        let source = root.join(doc);
        let name = source.file_name().expect("a file name");
        copy(&source, &docs.join(name), 0o644)?;
    }
    println!(
        "install: done. Edit {} (it refuses everything as shipped), check it with \
         `mcp-guard policy check`, then `systemctl daemon-reload && systemctl enable --now \
         mcp-guard`.",
        layout.policy().display()
    );
    Ok(())
}

pub fn uninstall(args: &UninstallArgs) -> Result<()> {
    let layout = Layout::new(&args.root, &args.prefix)?;
    for path in [layout.binary(), layout.unit()] {
        remove_file(&layout.staged(&path))?;
    }
    let docs = layout.staged(&layout.docs());
    if docs.exists() {
        fs::remove_dir_all(&docs).with_context(|| format!("removing {}", docs.display()))?;
        println!("uninstall: removed {}", docs.display());
    }
    let policy = layout.staged(&layout.policy());
    let shipped = fs::read(workspace_root().join(POLICY)).context("reading dist/policy.json")?;
    let unedited = fs::read(&policy).is_ok_and(|installed| installed == shipped);
    if args.purge || unedited {
        remove_file(&policy)?;
        remove_empty_dir(policy.parent().expect("a directory"))?;
    } else if policy.exists() {
        println!(
            "uninstall: kept the edited {} (--purge removes it)",
            policy.display()
        );
    }
    let state = layout.staged(&layout.state());
    if args.purge && state.exists() {
        fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
        println!("uninstall: removed {} (the audit log)", state.display());
    } else if state.exists() {
        println!(
            "uninstall: kept the audit log in {} (--purge removes it)",
            state.display()
        );
    }
    println!(
        "uninstall: done. Kernel enforcement stays pinned until `mcp-guard egress teardown` \
         (run it before uninstalling to take mcp-guard off the host completely)."
    );
    Ok(())
}

fn build_release_binary() -> Result<PathBuf> {
    process::run(command("cargo")?.args(["build", "--release", "-p", "mcp-guard"]))?;
    Ok(crate::target_dir().join("release").join("mcp-guard"))
}

fn create_parent(path: &Path) -> Result<()> {
    let parent = path.parent().expect("a file has a directory");
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    create_parent(to)?;
    // Through a temporary name, so a running binary is replaced, not overwritten in place.
    let staged = to.with_extension("xtask-new");
    fs::copy(from, &staged)
        .with_context(|| format!("copying {} to {}", from.display(), staged.display()))?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(mode))?;
    fs::rename(&staged, to).with_context(|| format!("installing {}", to.display()))?;
    println!("install: {}", to.display());
    Ok(())
}

fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    create_parent(to)?;
    fs::write(to, text).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    println!("install: {}", to.display());
    Ok(())
}

fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {
            println!("uninstall: removed {}", path.display());
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("removing {}", path.display())),
    }
}

fn remove_empty_dir(path: &Path) -> Result<()> {
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::DirectoryNotEmpty
            ) =>
        {
            Ok(())
        }
        Err(error) => Err(error).with_context(|| format!("removing {}", path.display())),
    }
}
