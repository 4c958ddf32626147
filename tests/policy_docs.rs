//! Golden tests of `mcp-guard policy explain` and `mcp-guard policy diff`: the real binary
//! runs on the example policies and its output must equal the files in `tests/golden/` byte
//! for byte.
//!
//! - `<policy>.explain.md` and `<policy>.explain.txt`: `policy explain examples/<policy>.json`
//!   in Markdown and in plain text;
//! - `<old>-<new>.diff.md`: `policy diff examples/<old>.json examples/<new>.json`.
//!
//! After an intended change of wording, regenerate them with
//! `UPDATE_GOLDEN=1 cargo test -p mcp-guard-tests --test policy_docs` and review the diff of
//! `tests/golden/` like code: it is what a compliance reviewer will read.
//!
//! Needs no root and no network.

use std::path::{Path, PathBuf};

use mcp_guard_tests::daemon_binary;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

/// Runs `mcp-guard policy ARGS...` from the workspace root; it must exit 0.
fn policy_command(args: &[&str]) -> String {
    let output = std::process::Command::new(daemon_binary())
        .current_dir(workspace_root())
        .arg("policy")
        .args(args)
        .output()
        .expect("running mcp-guard");
    assert!(
        output.status.success(),
        "mcp-guard policy {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// Compares `actual` with the golden file `name`, or rewrites it under `UPDATE_GOLDEN=1`.
fn assert_golden(name: &str, actual: &str) {
    let path = workspace_root().join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|value| value == "1") {
        std::fs::write(&path, actual).expect("writing the golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("{}: {err}; create it with UPDATE_GOLDEN=1", path.display()));
    if expected != actual {
        panic!(
            "{} differs from the output (- golden, + actual); if the change is intended, \
             rerun with UPDATE_GOLDEN=1 and review tests/golden/:\n{}",
            path.display(),
            line_diff(&expected, actual)
        );
    }
}

/// The differing lines of two texts, in order: a minimal line diff (longest common
/// subsequence), enough to see what changed.
fn line_diff(expected: &str, actual: &str) -> String {
    let (old, new): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    // common[i][j]: length of the longest common subsequence of old[i..] and new[j..].
    let mut common = vec![vec![0usize; new.len() + 1]; old.len() + 1];
    for i in (0..old.len()).rev() {
        for j in (0..new.len()).rev() {
            common[i][j] = if old[i] == new[j] {
                common[i + 1][j + 1] + 1
            } else {
                common[i + 1][j].max(common[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < old.len() || j < new.len() {
        if i < old.len() && j < new.len() && old[i] == new[j] {
            i += 1;
            j += 1;
        } else if j < new.len() && (i == old.len() || common[i][j + 1] >= common[i + 1][j]) {
            out.push_str(&format!("{:>4} + {}\n", j + 1, new[j]));
            j += 1;
        } else {
            out.push_str(&format!("{:>4} - {}\n", i + 1, old[i]));
            i += 1;
        }
    }
    if expected.ends_with('\n') != actual.ends_with('\n') {
        out.push_str("(the final newline differs)\n");
    }
    out
}

fn check_explain(policy: &str) {
    let file = format!("examples/{policy}.json");
    let markdown = policy_command(&["explain", &file]);
    assert_golden(&format!("{policy}.explain.md"), &markdown);
    let text = policy_command(&["explain", &file, "--format", "text"]);
    assert_golden(&format!("{policy}.explain.txt"), &text);
}

#[test]
fn explain_of_the_quick_start_policy() {
    check_explain("policy");
}

#[test]
fn explain_of_the_team_policy() {
    check_explain("team-policy");
}

#[test]
fn explain_of_the_tightened_team_policy() {
    check_explain("team-policy-tightened");
}

#[test]
fn diff_of_the_team_policy_and_its_tightened_copy() {
    let diff = policy_command(&[
        "diff",
        "examples/team-policy.json",
        "examples/team-policy-tightened.json",
    ]);
    assert_golden("team-policy-team-policy-tightened.diff.md", &diff);
}

#[test]
fn diff_of_a_policy_with_itself_says_so_and_exits_0() {
    let diff = policy_command(&["diff", "examples/policy.json", "examples/policy.json"]);
    assert_eq!(diff, "No differences.\n");
}

#[test]
fn the_line_diff_shows_what_changed() {
    assert_eq!(line_diff("a\nb\nc\n", "a\nx\nc\n"), "   2 + x\n   2 - b\n");
    assert_eq!(line_diff("a\n", "a"), "(the final newline differs)\n");
}
