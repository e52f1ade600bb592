//! The README's main job: `tandem demo` starts two replicating nodes from its embedded
//! config, prints how to reach the Primary, serves real NBD clients, and stops both nodes
//! cleanly on SIGTERM (as on Ctrl-C).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tandem_tests::tempdir::TempDir;
use tandem_tests::tools::{nbd_roundtrip, send_signal};
use tandem_tests::{tandem_bin, wait_until};

#[test]
fn demo_replicates_and_stops_cleanly() {
    let dir = TempDir::new("demo");
    let mut child = Command::new(tandem_bin())
        .args(["demo", "--size", "64MiB", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tandem demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The demo prints its instructions once both nodes are up (or a start-up error).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut printed = Vec::new();
    while !printed.iter().any(|l: &String| l.contains("Ctrl-C stops")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "demo printed no instructions within 30 s; got:\n{}",
                    printed.join("\n")
                );
            }
        }
    }
    let text = printed.join("\n");
    assert!(
        text.contains("replication: Connected"),
        "demo nodes did not connect:\n{text}"
    );
    let socket = dir.join("demo.nbd");
    assert!(
        text.contains(&socket.display().to_string()),
        "demo must say where its NBD socket is:\n{text}"
    );

    let uri = format!("nbd+unix:///demo?socket={}", socket.display());
    nbd_roundtrip(&uri, 1 << 20);

    send_signal(child.id(), "TERM").expect("signal the demo");
    wait_until(Duration::from_secs(20), "demo exits after SIGTERM", || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    let status = child.wait().expect("wait demo");
    assert!(status.success(), "demo exited with {status}");
    let log = std::fs::read_to_string(dir.join("alpha.log")).expect("alpha log");
    assert!(
        log.contains("stopped cleanly"),
        "alpha did not stop cleanly:\n{log}"
    );
}
