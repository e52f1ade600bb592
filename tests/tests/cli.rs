//! The command line: `tandem up` refuses a bad config with a message that names the key,
//! and `tandem status --socket PATH --json` prints the same object as the management
//! socket. Every run is bounded ([`RUN_TIMEOUT`]): a daemon that starts on a bad config
//! instead of refusing it fails the test by timing out. A command whose stdout reader went
//! away (EPIPE) exits 0 without a panic, and a daemon whose log (stderr) is a closed pipe
//! keeps running.

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

/// The write end of a pipe whose read end is already closed: every write to it fails
/// with EPIPE (a FIFO opened by both ends, then the reader closed).
fn closed_pipe(dir: &Path, name: &str) -> std::fs::File {
    let fifo = dir.join(name);
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo {}", fifo.display());
    let path = fifo.clone();
    // Opening a FIFO blocks until the other end opens: the reader opens in a thread.
    let reader = std::thread::spawn(move || std::fs::File::open(path));
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("open the FIFO for writing");
    drop(
        reader
            .join()
            .expect("reader thread")
            .expect("open the FIFO for reading"),
    );
    writer
}

/// Runs `tandem ARGS` with stdout the write end of a closed pipe; returns how it exited
/// and its stderr. Bounded by [`RUN_TIMEOUT`].
fn run_into_closed_pipe(dir: &Path, args: &[&str]) -> (std::process::ExitStatus, String) {
    use std::io::Read as _;
    let out = closed_pipe(dir, &format!("out-{}.fifo", tandem_tests::tools::unique()));
    let mut child = Command::new(tandem_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tandem");
    let deadline = std::time::Instant::now() + tandem_tests::scaled(RUN_TIMEOUT);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tandem {args:?} with a closed stdout did not exit within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status, err)
}

/// `tandem status | head -1` and `tandem events --follow | head -1` (issue 10, item 8):
/// a reader that closed stdout ends the command quietly with status 0, no panic.
#[test]
fn cli_commands_exit_quietly_when_stdout_is_closed() {
    let c = Cluster::new(ClusterOpts::new("cli-epipe"));
    let sock = c.primary().mgmt_socket().to_string_lossy().to_string();
    for args in [
        vec!["status", "--socket", &sock],
        vec!["status", "--json", "--socket", &sock],
        vec!["events", "--socket", &sock],
        vec!["events", "--follow", "--socket", &sock],
    ] {
        let (status, stderr) = run_into_closed_pipe(c.dir(), &args);
        assert!(
            !stderr.contains("panicked"),
            "tandem {args:?} panicked on a closed stdout:\n{stderr}"
        );
        assert_eq!(
            status.code(),
            Some(0),
            "tandem {args:?} on a closed stdout exits 0 ({status})\n{stderr}"
        );
    }
}

/// A daemon whose stderr (its log) is a closed pipe keeps running and stops cleanly: a
/// log line that cannot be written is dropped, not a panic.
#[test]
fn a_node_with_a_closed_stderr_runs_and_stops_cleanly() {
    let c = Cluster::new(ClusterOpts::new("cli-closed-log").autostart(false));
    let cfg = c.config_path().to_string_lossy().to_string();
    let mut child = Command::new(tandem_bin())
        .args(["up", "--config", &cfg, "--node", "alpha"])
        .stdin(std::process::Stdio::null())
        .stdout(closed_pipe(c.dir(), "up-out.fifo"))
        .stderr(closed_pipe(c.dir(), "up-err.fifo"))
        .spawn()
        .expect("spawn tandem up");
    let ready = tandem_tests::try_wait_until(tandem_tests::START_TIMEOUT, || {
        matches!(child.try_wait(), Ok(None)) && c.primary().try_status().is_ok()
    });
    if !ready {
        let _ = child.kill();
        let st = child.wait();
        panic!("tandem up with a closed stderr did not come up (exit: {st:?})");
    }
    tandem_tests::tools::send_signal(child.id(), "TERM").expect("SIGTERM");
    let deadline = std::time::Instant::now() + tandem_tests::scaled(tandem_tests::STOP_TIMEOUT);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tandem up did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "clean stop exits 0, got {status}");
}
