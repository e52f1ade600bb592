//! Harness for tandem's integration tests: real `tandem` processes on 127.0.0.1 with file
//! backends, driven by real clients (fio's nbd engine, qemu-img, nbdsh, tcpdump, tshark).
//!
//! What it owns and why:
//! - [`tandem_bin`]: which `tandem` binary the tests run (built once per test process, so a
//!   test never runs a stale daemon) — [`bin`].
//! - [`Cluster`] / [`Node`]: a temp dir, free loopback ports, the shared TOML config, the
//!   daemons as child processes with their stderr in a log file, start / SIGTERM / kill -9 /
//!   restart, status over the management socket — [`cluster`], [`mgmt`].
//! - [`tools`]: external programs run with a time limit and their output captured; a
//!   missing program panics with the Debian package that provides it.
//! - [`compare`]: byte-for-byte comparison of replicas that names the first differing
//!   4 KiB block.
//! - [`nbd_raw`] / [`drbd_raw`]: just enough of the NBD and DRBD framing to send hostile
//!   bytes on purpose.
//!
//! Bounds: every wait in this crate has a deadline (the `*_TIMEOUT` constants below, scaled
//! by `TANDEM_TIMEOUT_SCALE` for slow machines); every child process is killed when its
//! owner is dropped; every read from a daemon is limited in size. Deadlines only turn a hang
//! into a failure with a message — no test asserts how long something took.

pub mod bin;
pub mod cluster;
pub mod compare;
pub mod drbd_raw;
pub mod logs;
pub mod loopdev;
pub mod mgmt;
pub mod nbd_raw;
pub mod tempdir;
pub mod tools;

pub use bin::{tandem_bin, workspace_root};
pub use cluster::{Cluster, ClusterOpts, Node, Protocol, StatusExt};
pub use compare::{assert_same_content, first_difference, Difference};
pub use tempdir::TempDir;

use std::time::{Duration, Instant};

/// How long a node may take from spawn to answering `status` on its management socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long two nodes may take to reach `Connected` (handshake, initial sync of ≤ 64 MiB,
/// reconnect backoff of a few seconds).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a node may take to exit after SIGTERM (it drains in-flight IO first).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for one external tool run (qemu-img, nbdsh, tshark) on ≤ 64 MiB.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(180);
/// Upper bound for one fio job; jobs are sized to take a few seconds on 2 cores.
pub const FIO_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the daemon may take to write the log line that explains a refusal.
pub const LOG_TIMEOUT: Duration = Duration::from_secs(15);

/// Interval between two polls of a condition: short enough not to slow tests, long enough
/// not to load the 2 cores the daemons need.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// `d` multiplied by `TANDEM_TIMEOUT_SCALE` (a positive number, default 1), for machines
/// slower than the 2-core CI machine.
pub fn scaled(d: Duration) -> Duration {
    let scale = std::env::var("TANDEM_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 100.0)
        .unwrap_or(1.0);
    d.mul_f64(scale)
}

/// Polls `cond` until it returns true or `timeout` (scaled) passes; returns whether it did.
pub fn try_wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + scaled(timeout);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `cond` until it returns true; panics naming `what` after `timeout` (scaled).
pub fn wait_until(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(
        try_wait_until(timeout, cond),
        "timed out after {:?} waiting for {what}",
        scaled(timeout)
    );
}

/// Polls `f` until it returns `Some`; panics naming `what` after `timeout` (scaled).
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let mut found = None;
    let ok = try_wait_until(timeout, || {
        found = f();
        found.is_some()
    });
    match found {
        Some(v) if ok => v,
        _ => panic!("timed out after {:?} waiting for {what}", scaled(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_when_condition_holds() {
        let mut n = 0;
        wait_until(Duration::from_secs(5), "three polls", || {
            n += 1;
            n >= 3
        });
        assert_eq!(n, 3);
    }

    #[test]
    #[should_panic(expected = "waiting for never")]
    fn wait_until_panics_on_timeout() {
        wait_until(Duration::from_millis(120), "never", || false);
    }

    #[test]
    fn wait_for_returns_value() {
        let mut n = 0;
        let v = wait_for(Duration::from_secs(5), "a value", || {
            n += 1;
            (n == 2).then_some(42)
        });
        assert_eq!(v, 42);
    }
}
