//! `cargo xtask install` and `uninstall` into a temporary `--root`: the binary, the unit (with
//! ExecStart pointing at the installed binary), the default policy (which `mcp-guard policy
//! check` accepts) and the docs land in a real layout; an existing policy is not overwritten;
//! uninstall leaves an edited policy and the audit log unless `--purge`. No root needed.

use std::path::{Path, PathBuf};
use std::process::Command;

use mcp_guard_tests::daemon_binary;

/// `cargo xtask <args>` from the workspace root, with the built daemon as `--binary` so that
/// nothing is compiled in release mode. Under `cargo xtask test` the running xtask binary is
/// named by `MCP_GUARD_XTASK` and run directly; otherwise it is built and run by cargo.
fn xtask(args: &[&str], root: &Path) {
    let mut command = match std::env::var_os("MCP_GUARD_XTASK") {
        Some(xtask) => Command::new(xtask),
        None => {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cargo = Command::new(cargo);
            cargo.args(["run", "--quiet", "--package", "xtask", "--"]);
            cargo
        }
    };
    command
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args(args)
        .arg("--root")
        .arg(root);
    // Cargo describes this test package to the test; none of that concerns the xtask build.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR" {
            command.env_remove(&*key);
        }
    }
    let output = command.output().expect("run cargo xtask");
    assert!(
        output.status.success(),
        "cargo xtask {args:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn install(root: &Path) {
    let binary = daemon_binary();
    xtask(&["install", "--binary", binary.to_str().unwrap()], root);
}

#[test]
fn install_then_uninstall_into_a_staging_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let at = |path: &str| -> PathBuf { root.join(path) };
    install(root);

    let binary = at("usr/local/bin/mcp-guard");
    let version = Command::new(&binary).arg("--version").output().unwrap();
    assert!(version.status.success(), "the installed binary runs");
    let unit = std::fs::read_to_string(at("etc/systemd/system/mcp-guard.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/mcp-guard run --policy /etc/mcp-guard/policy.json"),
        "{unit}"
    );
    let policy = at("etc/mcp-guard/policy.json");
    let check = Command::new(&binary)
        .args(["policy", "check"])
        .arg(&policy)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the default policy fails `policy check`: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let shipped: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&policy).unwrap()).unwrap();
    assert_eq!(
        shipped["servers"],
        serde_json::json!({}),
        "as shipped, the policy guards (and so allows) nothing"
    );
    for doc in [
        "README.md",
        "policy.json",
        "prometheus.yml",
        "prometheus-alerts.yml",
        "grafana-dashboard.json",
    ] {
        assert!(
            at("usr/local/share/doc/mcp-guard").join(doc).is_file(),
            "{doc}"
        );
    }

    // An edited policy survives a second install and an uninstall.
    let edited = "{\"version\": 1, \"servers\": {}}\n";
    std::fs::write(&policy, edited).unwrap();
    install(root);
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), edited);
    std::fs::create_dir_all(at("var/lib/mcp-guard")).unwrap();
    std::fs::write(at("var/lib/mcp-guard/audit.jsonl"), "").unwrap();

    xtask(&["uninstall"], root);
    assert!(!binary.exists());
    assert!(!at("etc/systemd/system/mcp-guard.service").exists());
    assert!(!at("usr/local/share/doc/mcp-guard").exists());
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), edited);
    assert!(at("var/lib/mcp-guard/audit.jsonl").exists());

    xtask(&["uninstall", "--purge"], root);
    assert!(!policy.exists());
    assert!(!at("var/lib/mcp-guard").exists());
}

/// `--prefix` moves the binary and docs, and the unit follows.
#[test]
fn the_unit_names_the_binary_under_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let binary = daemon_binary();
    xtask(
        &[
            "install",
            "--prefix",
            "/opt/mcp-guard",
            "--binary",
            binary.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(dir.path().join("opt/mcp-guard/bin/mcp-guard").is_file());
    let unit =
        std::fs::read_to_string(dir.path().join("etc/systemd/system/mcp-guard.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/opt/mcp-guard/bin/mcp-guard run"),
        "{unit}"
    );
    assert!(
        unit.contains("/opt/mcp-guard/share/doc/mcp-guard/README.md"),
        "{unit}"
    );
    // An unedited default policy goes with uninstall.
    xtask(&["uninstall", "--prefix", "/opt/mcp-guard"], dir.path());
    assert!(!dir.path().join("etc/mcp-guard/policy.json").exists());
}
