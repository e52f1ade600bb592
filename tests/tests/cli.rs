//! The command line: `tandem up` refuses a bad config with a message that names the key,
//! and `tandem status --socket PATH --json` prints the same object as the management
//! socket. Every run is bounded ([`RUN_TIMEOUT`]): a daemon that starts on a bad config
//! instead of refusing it fails the test by timing out.

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tandem_tests::tools::{run_cmd, CmdOutput};
use tandem_tests::{tandem_bin, Cluster, ClusterOpts};

const RUN_TIMEOUT: Duration = Duration::from_secs(30);

fn tandem(args: &[&str]) -> CmdOutput {
    run_cmd(
        Command::new(tandem_bin()).args(args).env("NO_COLOR", "1"),
        RUN_TIMEOUT,
        &format!("tandem {}", args.join(" ")),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// `tandem up` on `config` for `node` must exit non-zero with `key` in its stderr.
fn assert_refused(config: &Path, node: &str, key: &str, what: &str) {
    let cfg = config.to_string_lossy();
    let out = tandem(&["up", "--config", &cfg, "--node", node]);
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "tandem up with {what} must exit non-zero, got {}\n--- stderr ---\n{}",
        out.status,
        out.stderr
    );
    assert!(
        out.stderr.to_lowercase().contains(&key.to_lowercase()),
        "tandem up with {what}: stderr must name `{key}`\n--- stderr ---\n{}",
        out.stderr
    );
}

/// A valid config (nodes not started) and a variant of it with `from` replaced by `to`.
fn config_variant(label: &str, from: &str, to: &str) -> (Cluster, std::path::PathBuf) {
    let c = Cluster::new(ClusterOpts::new(label).autostart(false));
    let text = c.config_text().to_string();
    assert!(text.contains(from), "{from:?} not in the config:\n{text}");
    let bad = c.dir().join("bad.toml");
    std::fs::write(&bad, text.replacen(from, to, 1)).expect("write bad config");
    (c, bad)
}

#[test]
fn up_refuses_unknown_protocol() {
    let (_c, bad) = config_variant("cli-proto", "protocol = \"C\"", "protocol = \"D\"");
    assert_refused(&bad, "alpha", "protocol", "protocol \"D\"");
}

#[test]
fn up_refuses_bad_size() {
    let (_c, bad) = config_variant("cli-size", "size = \"64MiB\"", "size = \"64 potatoes\"");
    assert_refused(&bad, "alpha", "size", "size \"64 potatoes\"");
}

#[test]
fn up_refuses_a_node_missing_from_the_config() {
    let c = Cluster::new(ClusterOpts::new("cli-node").autostart(false));
    assert_refused(
        c.config_path(),
        "gamma",
        "gamma",
        "--node gamma (not in the config)",
    );
}

#[test]
fn up_refuses_a_missing_config_file() {
    let c = Cluster::new(ClusterOpts::new("cli-nofile").autostart(false));
    let missing = c.dir().join("does-not-exist.toml");
    assert_refused(
        &missing,
        "alpha",
        "does-not-exist.toml",
        "a missing config file",
    );
}

#[test]
fn status_cli_prints_what_the_socket_says() {
    let c = Cluster::new(ClusterOpts::new("cli-status"));
    c.wait_connected();
    let sock = c.primary().mgmt_socket().to_string_lossy().to_string();
    // Counters may move between two reads; an idle pair is stable, so allow a few tries.
    let mut last = String::new();
    for _ in 0..5 {
        let before = c.primary().status();
        let out = tandem(&["status", "--socket", &sock, "--json"]);
        out.assert_success("tandem status --json");
        let cli: Value = serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "tandem status --json printed no JSON object ({e}):\n{}",
                out.stdout
            )
        });
        let after = c.primary().status();
        if cli == before || cli == after {
            return;
        }
        last = format!("cli: {cli}\nsocket before: {before}\nsocket after: {after}");
    }
    panic!("tandem status --json differs from the socket's status:\n{last}");
}

#[test]
fn status_cli_on_a_missing_socket_names_it() {
    let c = Cluster::new(ClusterOpts::new("cli-nosock").autostart(false));
    let sock = c.dir().join("nobody-here.sock");
    let out = tandem(&["status", "--socket", &sock.to_string_lossy(), "--json"]);
    assert!(
        out.status.code().is_some_and(|c| c != 0),
        "status on a missing socket must exit non-zero: {}",
        out.status
    );
    assert!(
        out.stderr.contains("nobody-here.sock"),
        "stderr must name the socket:\n{}",
        out.stderr
    );
}
