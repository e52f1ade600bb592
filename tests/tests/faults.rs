//! Faults: kill -9 of either node in the middle of a write job, and restart; a Secondary
//! that stops answering (SIGSTOP) and comes back; a Secondary whose disk hangs (its
//! backing file on an ext4 loop mount frozen with `fsfreeze`: needs root, as the suite
//! runs) while it still answers pings, or holds the writes it received when the
//! Primary dies (protocol B).
//!
//! The fio job is 32 MiB of verified 4 KiB random writes limited to 2000 IOPS (about 4 s
//! on any machine that runs the suite), so the kill lands while writes are being issued:
//! the kill is triggered once 4 MiB have been replicated, and the test checks fio was still
//! running then. Nothing here asserts a duration; every wait has a deadline.

use std::time::Duration;
use tandem_tests::loopdev::tandem;
use tandem_tests::tools::{self, Fio};
use tandem_tests::{scaled, Cluster, ClusterOpts, Protocol, StatusExt, CONNECT_TIMEOUT};

/// Bytes that must have been replicated before the kill.
const KILL_AFTER: u64 = 4 << 20;

fn rate_limited_job(uri: &str) -> Fio {
    Fio::randwrite_verify(uri, "4k", "32M").arg("--rate_iops=2000")
}

/// A connected pair with a rate-limited fio job running on the Primary that has already
/// replicated [`KILL_AFTER`] bytes: the starting point of the kill tests.
fn cluster_under_writes(label: &str) -> (Cluster, tools::FioRun) {
    let c = Cluster::new(ClusterOpts::new(label));
    c.wait_connected();
    let uri = c.primary().nbd_unix_uri();
    let fio = rate_limited_job(&uri).spawn(c.dir());
    c.primary()
        .wait_status(CONNECT_TIMEOUT, "4 MiB replicated", |s| {
            s.opt_u64("/bytes_replicated")
                .is_some_and(|b| b >= KILL_AFTER)
        });
    (c, fio)
}

/// Kill -9 of the Secondary under writes: the Primary goes on alone (fio sees no error,
/// verification passes), counts what the Secondary misses, and reconnects when the
/// Secondary comes back.
#[test]
fn secondary_kill9_during_writes_then_reconnect() {
    let (mut c, mut fio) = cluster_under_writes("kill-secondary");
    assert!(
        fio.is_running(),
        "fio finished before the kill; the test would not test a kill under writes"
    );
    c.secondary_mut().kill9();
    c.primary()
        .wait_status(CONNECT_TIMEOUT, "connection no longer Connected", |s| {
            s.opt_str("/connection").is_some_and(|c| c != "Connected")
        });

    let r = fio.wait();
    r.assert_ok();

    let st = c.primary().status();
    assert_eq!(st.str_at("/role"), "Primary", "{st}");
    assert_ne!(st.str_at("/connection"), "Connected", "{st}");
    assert!(
        st.u64_at("/out_of_sync_bytes") > 0,
        "writes made while the Secondary was down must be out of sync: {st}"
    );
    c.primary_mut().assert_running("after losing its peer");

    c.secondary_mut().start();
    c.wait_connected();
    let st = c.primary().status();
    assert_eq!(st.str_at("/connection"), "Connected", "{st}");
    assert_eq!(st.str_at("/peer/role"), "Secondary", "{st}");
}

/// Secondary outage (docs/design.md §3 "Disconnected"): writes made while the peer is away
/// complete on the Primary and their blocks are counted out of sync; when the peer
/// returns, the resync moves exactly those blocks (the resync tests measure that) and the
/// peer is UpToDate again; writes after the reconnect replicate again.
#[test]
fn secondary_outage_is_tracked_and_resynced_after_reconnect() {
    let mut c = Cluster::new(ClusterOpts::new("outage-secondary"));
    c.wait_connected();
    let uri = c.primary().nbd_unix_uri();

    Fio::randwrite_verify(&uri, "4k", "8M")
        .arg("--offset=0")
        .run(c.dir())
        .assert_ok();
    c.secondary_mut().stop();
    c.primary()
        .wait_status(CONNECT_TIMEOUT, "connection no longer Connected", |s| {
            s.opt_str("/connection").is_some_and(|c| c != "Connected")
        });
    // Writes the Secondary does not see.
    Fio::randwrite_verify(&uri, "4k", "8M")
        .arg("--offset=16M")
        .run(c.dir())
        .assert_ok();
    let dirty = c.primary().status().u64_at("/out_of_sync_bytes");
    assert!(dirty > 0, "writes while disconnected must be out of sync");
    assert!(
        dirty <= 8 << 20,
        "only the 8 MiB written while disconnected may be out of sync, got {dirty}"
    );

    c.secondary_mut().start();
    let st = c
        .primary()
        .wait_status(CONNECT_TIMEOUT, "Connected again and resynced", |s| {
            s.opt_str("/connection") == Some("Connected")
                && s.opt_u64("/out_of_sync_bytes") == Some(0)
                && s.opt_str("/peer/disk") == Some("UpToDate")
        });
    assert!(
        st.u64_at("/resync_bytes_sent") >= dirty,
        "the resync sent the out-of-sync blocks: {st}"
    );
    let before = st.u64_at("/bytes_replicated");
    Fio::randwrite_verify(&uri, "4k", "4M")
        .arg("--offset=32M")
        .run(c.dir())
        .assert_ok();
    let after = c.primary().status().u64_at("/bytes_replicated");
    assert!(
        after >= before + (4 << 20),
        "writes after the reconnect replicate ({before} -> {after})"
    );
    c.stop_all();
    let (a, b) = (
        c.primary().disk().to_path_buf(),
        c.secondary().disk().to_path_buf(),
    );
    let region = |p: &std::path::Path, off: u64, len: usize| {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(p).expect("open replica");
        f.seek(SeekFrom::Start(off)).expect("seek");
        let mut v = vec![0u8; len];
        f.read_exact(&mut v).expect("read");
        v
    };
    assert!(
        region(&a, 0, 8 << 20) == region(&b, 0, 8 << 20),
        "data written while connected differs"
    );
    assert!(
        region(&a, 32 << 20, 4 << 20) == region(&b, 32 << 20, 4 << 20),
        "data written after the reconnect differs"
    );
    assert!(
        region(&a, 16 << 20, 8 << 20) == region(&b, 16 << 20, 8 << 20),
        "the outage's writes reached the Secondary by resync"
    );
}

/// Kill -9 of the Primary under writes, then restart: it comes back as Primary, the
/// Secondary sees the loss, the two reconnect and the export serves IO again.
#[test]
fn primary_kill9_during_writes_then_restart() {
    let (mut c, mut fio) = cluster_under_writes("kill-primary");
    assert!(fio.is_running(), "fio finished before the kill");
    c.primary_mut().kill9();
    // fio loses its server. What fio does next is fio's business: its nbd engine may
    // retry a dead socket in a loop, writing error lines without end, so it is stopped
    // here rather than waited for.
    drop(fio);

    c.secondary()
        .wait_status(CONNECT_TIMEOUT, "Secondary notices the loss", |s| {
            s.opt_str("/connection").is_some_and(|c| c != "Connected")
        });
    c.secondary_mut()
        .assert_running("after its Primary was killed");

    c.primary_mut().start();
    c.wait_connected();
    let st = c.primary().status();
    assert_eq!(st.str_at("/role"), "Primary", "{st}");
    assert_eq!(st.str_at("/peer/role"), "Secondary", "{st}");
    tools::nbd_roundtrip(&c.primary().nbd_unix_uri(), 40 << 20);
}

/// `timeout` of the SIGSTOP test, tenths of a second (2 s). `ping-int` stays at its
/// default 10 s, so a node that only noticed a silent peer by the idle ping would stall
/// the application for 10.5 s.
const STOP_TIMEOUT_DS: u64 = 20;
/// DRBD's default `ping-timeout`, 0.5 s.
const PING_TIMEOUT_MS: u64 = 500;

/// A Secondary that stops answering (SIGSTOP: its kernel still ACKs TCP, so neither a
/// reset nor TCP_USER_TIMEOUT tells the Primary): the Primary declares it dead within
/// `timeout + ping-timeout` of the write it left waiting — DRBD's meaning of `timeout` —
/// and goes on alone; fio's longest write (QD1) shows the stall. Status shows the peer
/// gone and the blocks it missed; after SIGCONT the pair reconnects, resyncs, and the
/// replicas are identical.
#[test]
fn stopped_secondary_is_declared_dead_within_timeout() {
    let mut c = Cluster::new(
        ClusterOpts::new("sigstop-secondary").net("timeout", &STOP_TIMEOUT_DS.to_string()),
    );
    c.wait_connected();
    let uri = c.primary().nbd_unix_uri();
    // QD1 at 500 IOPS: 2048 verified writes, about 4 s without the stall.
    let mut fio = Fio::randwrite_verify(&uri, "4k", "8M")
        .arg("--iodepth=1")
        .arg("--rate_iops=500")
        .spawn(c.dir());
    c.primary()
        .wait_status(CONNECT_TIMEOUT, "1 MiB replicated", |s| {
            s.opt_u64("/bytes_replicated").is_some_and(|b| b >= 1 << 20)
        });
    assert!(fio.is_running(), "fio finished before the stop");
    let pid = c.secondary().pid().expect("secondary running");
    tools::send_signal(pid, "STOP").expect("SIGSTOP the Secondary");

    let st = c
        .primary()
        .wait_status(CONNECT_TIMEOUT, "the stopped peer dropped", |s| {
            s.opt_str("/connection").is_some_and(|c| c != "Connected")
                && s.opt_u64("/out_of_sync_bytes").is_some_and(|b| b > 0)
        });
    assert_eq!(st.str_at("/role"), "Primary", "{st}");
    let r = fio.wait();
    r.assert_ok();
    let stall = longest_write(&r);
    let bound = Duration::from_millis(STOP_TIMEOUT_DS * 100 + PING_TIMEOUT_MS)
        + scaled(Duration::from_millis(2500));
    eprintln!("longest write while the Secondary was stopped: {stall:?} (bound {bound:?})");
    assert!(
        stall <= bound,
        "a write waited {stall:?} for the stopped peer; timeout + ping-timeout + margin is \
         {bound:?}\n{}",
        c.primary().log_tail(20)
    );

    tools::send_signal(pid, "CONT").expect("SIGCONT the Secondary");
    resynced_and_identical(&mut c);
}

/// A frozen filesystem under a file: writes to it block in the kernel until it is thawed.
/// The Secondary's backing file is bind-mounted from an ext4 image on a loop device.
/// Dropped: thawed and unmounted (before the cluster, whose node could not die while a
/// write of it is blocked on the frozen filesystem).
struct FrozenDisk {
    mnt: std::path::PathBuf,
    target: std::path::PathBuf,
    frozen: bool,
}

fn sh(cmd: &str) {
    let out = tools::run_cmd(
        std::process::Command::new("/bin/sh").args(["-c", cmd]),
        Duration::from_secs(30),
        cmd,
    )
    .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    out.assert_success(cmd);
}

impl FrozenDisk {
    /// Moves `disk` (a stopped node's backing file) onto a fresh ext4 filesystem in `dir`
    /// and bind-mounts it back in place.
    fn new(dir: &std::path::Path, disk: &std::path::Path) -> FrozenDisk {
        let img = dir.join("fs.img");
        let mnt = dir.join("fs");
        // Built first, so that a failure below still unmounts what was mounted.
        let f = FrozenDisk {
            mnt: mnt.clone(),
            target: disk.to_path_buf(),
            frozen: false,
        };
        sh(&format!(
            "truncate -s 160M {img} && mkfs.ext4 -q -F {img} && mkdir -p {mnt} && mount -o loop \
             {img} {mnt}",
            img = img.display(),
            mnt = mnt.display()
        ));
        sh(&format!(
            "cp --sparse=always {disk} {mnt}/disk.img && mount --bind {mnt}/disk.img {disk}",
            disk = disk.display(),
            mnt = mnt.display()
        ));
        f
    }

    fn freeze(&mut self, on: bool) {
        let flag = if on { "-f" } else { "-u" };
        sh(&format!("fsfreeze {flag} {}", self.mnt.display()));
        self.frozen = on;
    }
}

impl Drop for FrozenDisk {
    fn drop(&mut self) {
        if self.frozen {
            let _ = std::process::Command::new("fsfreeze")
                .arg("-u")
                .arg(&self.mnt)
                .status();
        }
        for p in [&self.target, &self.mnt] {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(p)
                .status();
        }
    }
}

/// A connected pair with timeout 1 s and ko-count 3 (a write is dropped 3 s after it was
/// sent) whose Secondary's backing file is on a filesystem the test can freeze. The
/// disk is declared after the cluster, so it is thawed and unmounted first.
fn ko_count_pair(label: &str) -> (Cluster, FrozenDisk) {
    tools::require("fsfreeze");
    tools::require("mkfs.ext4");
    let mut c = Cluster::new(
        ClusterOpts::new(label)
            .net("timeout", "10")
            .net("ko-count", "3"),
    );
    c.wait_connected();
    c.secondary_mut().stop();
    let disk = c.secondary().disk().to_path_buf();
    let fs = FrozenDisk::new(c.dir(), &disk);
    c.secondary_mut().start();
    c.wait_connected();
    (c, fs)
}

/// `ko-count`: a Secondary that answers pings but whose disk hangs (its filesystem is
/// frozen) is dropped once a write has waited `ko-count × timeout` (DRBD's request
/// timer); the Primary completes the write alone. Thawed, the pair reconnects and
/// resyncs. Before ko-count the write waited as long as the disk hung.
#[test]
fn secondary_with_hung_disk_is_dropped_after_ko_count_timeouts() {
    let (mut c, mut fs) = ko_count_pair("ko-count");
    let uri = c.primary().nbd_unix_uri();
    fs.freeze(true);
    let r = Fio::randwrite_verify(&uri, "4k", "64k")
        .arg("--iodepth=1")
        .timeout(Duration::from_secs(60))
        .run(c.dir());
    r.assert_ok();
    let stall = longest_write(&r);
    let log = c.primary().log_tail(40);
    eprintln!("longest write with the Secondary's disk frozen: {stall:?}");
    assert!(
        log.contains("ko-count (3)"),
        "the Primary must drop the peer for ko-count:\n{log}"
    );
    assert!(
        stall <= Duration::from_secs(3) + scaled(Duration::from_secs(3)),
        "a write waited {stall:?}; ko-count × timeout is 3 s\n{log}"
    );
    let st = c.primary().status();
    assert_ne!(st.str_at("/connection"), "Connected", "{st}");
    assert!(st.u64_at("/out_of_sync_bytes") > 0, "{st}");

    fs.freeze(false);
    resynced_and_identical(&mut c);
}

/// A Primary's writes while the bitmaps cross reach the target. The Secondary's disk is
/// frozen with a replicated write stuck on it, so after the ko-count drop the next
/// connection's target waits for that write before it answers the Primary's bitmap
/// (≤ 30 s); meanwhile the Primary writes a second region, marked after its bitmap was
/// sent. DRBD tells such blocks by `P_OUT_OF_SYNC` before `P_SYNC_UUID`; without that
/// they stayed out of sync on a Connected pair that no resync repaired (CI saw it once
/// as a timeout of the test above, when the thaw came late).
#[test]
fn writes_while_the_bitmaps_cross_are_resynced() {
    let (mut c, mut fs) = ko_count_pair("exchange-writes");
    let uri = c.primary().nbd_unix_uri();
    let before = c.primary().log_len();
    fs.freeze(true);
    // One write: stuck on the Secondary's disk, dropped after ko-count × timeout.
    Fio::randwrite_verify(&uri, "4k", "4k")
        .arg("--iodepth=1")
        .timeout(Duration::from_secs(60))
        .run(c.dir())
        .assert_ok();
    let sent = "send bitmap stats";
    tandem_tests::wait_until(CONNECT_TIMEOUT, "the Primary sent its bitmap again", || {
        c.primary().log_since(before).contains(sent)
    });
    let exchanged = c.primary().log_len();
    Fio::randwrite_verify(&uri, "4k", "256k")
        .arg("--offset=1M")
        .timeout(Duration::from_secs(60))
        .run(c.dir())
        .assert_ok();
    let during = c.primary().log_since(exchanged);
    assert!(
        !during.contains("connected to beta"),
        "the writes must fall inside the exchange (the target waits for its stuck write):\n\
         {during}"
    );
    fs.freeze(false);
    resynced_and_identical(&mut c);
    let log = c.primary().log_since(exchanged);
    assert!(log.contains("told by P_OUT_OF_SYNC"), "{log}");
}

/// Protocol B: a write the Secondary received (`P_RECV_ACK`, the application told it is
/// done) survives the Primary's death, also while the Secondary held it behind an
/// epoch's drain. The Secondary's disk is frozen, so the first write sticks on it and the
/// next ones wait behind its epoch's barrier; the Primary is killed, the disk thawed, the
/// Secondary promoted: fio's verify finds every write on it. Before, the Secondary
/// dropped the writes it held when the connection went (DRBD 8.4 submits on receipt).
#[test]
fn protocol_b_writes_held_by_the_secondary_survive_the_primary_s_death() {
    tools::require("fsfreeze");
    tools::require("mkfs.ext4");
    let mut c = Cluster::new(ClusterOpts::new("held-writes").protocol(Protocol::B));
    c.wait_connected();
    c.secondary_mut().stop();
    let disk = c.secondary().disk().to_path_buf();
    let mut fs = FrozenDisk::new(c.dir(), &disk);
    c.secondary_mut().start();
    c.wait_connected();
    let job = |uri: &str| {
        Fio::randwrite_verify(uri, "4k", "256k")
            .arg("--iodepth=1")
            .timeout(Duration::from_secs(60))
    };
    fs.freeze(true);
    job(&c.primary().nbd_unix_uri()).run(c.dir()).assert_ok();
    let held = c.secondary().status().u64_at("/peer_writes_held");
    assert!(
        held > 0,
        "the Secondary must hold writes behind its frozen disk"
    );
    c.primary_mut().kill9();
    c.secondary()
        .wait_status(CONNECT_TIMEOUT, "Secondary notices the loss", |s| {
            s.opt_str("/connection").is_some_and(|c| c != "Connected")
        });
    fs.freeze(false);
    let sock = c.secondary().mgmt_socket().to_string_lossy().into_owned();
    tandem_tests::wait_until(CONNECT_TIMEOUT, "the Secondary promoted", || {
        tandem(&["primary", "--socket", &sock]).status.success()
    });
    job(&c.secondary().nbd_unix_uri())
        .arg("--verify_only")
        .run(c.dir())
        .assert_ok();
}

/// Waits until the Primary is Connected again with nothing out of sync and its peer
/// UpToDate, then stops both nodes and compares the replicas.
fn resynced_and_identical(c: &mut Cluster) {
    c.primary()
        .wait_status(CONNECT_TIMEOUT, "Connected again and resynced", |s| {
            s.opt_str("/connection") == Some("Connected")
                && s.opt_u64("/out_of_sync_bytes") == Some(0)
                && s.opt_str("/peer/disk") == Some("UpToDate")
        });
    let size = c.primary().status().u64_at("/size_bytes");
    c.stop_all();
    c.assert_replicas_identical(size);
}

/// The longest completion latency of fio's writes (its JSON report's clat max).
fn longest_write(r: &tools::FioResult) -> Duration {
    let max_ns = r
        .json
        .as_ref()
        .and_then(|j| j.pointer("/jobs/0/write/clat_ns/max"))
        .and_then(serde_json::Value::as_f64)
        .expect("fio's write clat max");
    Duration::from_secs_f64(max_ns / 1e9)
}
