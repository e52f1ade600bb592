//! Which `tandem` binary the tests run.
//!
//! `cargo test` does not build another package's binaries for this crate's tests, and a
//! binary left over from an earlier build would silently test old code. So, once per test
//! process, this module runs `cargo build -p tandem-engine --bin tandem` into the same
//! target dir and profile as the running test (a no-op of about a second when it is fresh),
//! unless `TANDEM_BIN` names the binary to use (scripts/test.sh builds it first and sets it).
//! The build is bounded by [`BUILD_TIMEOUT`].

use crate::tools::{run_cmd, CmdOutput};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// Upper bound for building the daemon from scratch on 2 cores (release, all dependencies).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);

static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The repository root (the workspace holding this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Path of the `tandem` binary, built on first use; panics with the build's output if the
/// build fails. The result (success or failure) is computed once per test process.
pub fn tandem_bin() -> &'static Path {
    match BIN.get_or_init(resolve) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn resolve() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TANDEM_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "TANDEM_BIN={} does not exist (unset it to let the harness build tandem)",
                p.display()
            ))
        };
    }
    // A test executable lives in `<target>/<profile>/deps/<name>-<hash>`; the daemon in
    // `<target>/<profile>/tandem`.
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test executable path {}", exe.display()))?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("unexpected test executable path {}", exe.display()))?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let bin = profile_dir.join("tandem");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", target_dir)
        .args(["build", "-p", "tandem-engine", "--bin", "tandem"]);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let what = format!(
        "cargo build -p tandem-engine --bin tandem ({profile}, target dir {})",
        target_dir.display()
    );
    eprintln!("harness: {what}");
    let out: CmdOutput = run_cmd(&mut cmd, BUILD_TIMEOUT, &what).map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "building the daemon failed: {what} exited with {}\n--- cargo stderr (tail) ---\n{}",
            out.status,
            tail_lines(&out.stderr, 60)
        ));
    }
    if !bin.is_file() {
        return Err(format!(
            "{what} succeeded but {} does not exist",
            bin.display()
        ));
    }
    Ok(bin)
}

/// The last `n` lines of `s`.
pub fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines.get(start..).unwrap_or_default().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
        assert_eq!(tail_lines("", 5), "");
    }

    #[test]
    fn workspace_root_has_the_workspace_manifest() {
        assert!(workspace_root().join("Cargo.toml").is_file());
        assert!(workspace_root().join("tests").is_dir());
    }
}
