//! Operations that must not lose an acknowledged write (issue 10): a disk that failed a
//! write is never promoted without a resync, two `primary` commands racing on both
//! nodes make one Primary, a node restarted after a switchover does not take the
//! Primary role back, and a Primary whose disk fails goes on as a Diskless Primary.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use tandem_tests::loopdev::tandem;
use tandem_tests::mgmt::MgmtConn;
use tandem_tests::tools::{nbd_roundtrip, run_cmd, Fio};
use tandem_tests::{Cluster, ClusterOpts, Node, StatusExt, CONNECT_TIMEOUT};

fn sock(n: &Node) -> String {
    n.mgmt_socket().to_string_lossy().into_owned()
}

/// A tmpfs of `mib` MiB mounted for the life of the value (lazily unmounted on drop).
struct SmallFs {
    path: PathBuf,
}

impl SmallFs {
    fn mount(path: &Path, mib: u32) -> SmallFs {
        std::fs::create_dir_all(path).expect("mount point");
        run_cmd(
            std::process::Command::new("mount").args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "tmpfs",
                &path.to_string_lossy(),
            ]),
            std::time::Duration::from_secs(10),
            "mount",
        )
        .expect("run mount")
        .assert_success("mount a small tmpfs (the tests run as root)");
        SmallFs {
            path: path.to_path_buf(),
        }
    }
}

impl SmallFs {
    /// Gives the filesystem `mib` MiB (`mount -o remount,size=`), keeping its files.
    fn resize(&self, mib: u32) {
        run_cmd(
            std::process::Command::new("mount").args([
                "-o",
                &format!("remount,size={mib}m"),
                &self.path.to_string_lossy(),
            ]),
            std::time::Duration::from_secs(10),
            "remount",
        )
        .expect("run mount")
        .assert_success("remount the small tmpfs bigger");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Moves node `i`'s backing file onto `fs` (the config names the new path; the daemon
/// creates the file there) and returns the new path.
fn disk_on(c: &Cluster, i: usize, fs: &SmallFs) -> PathBuf {
    let old = c.node(i).disk().to_string_lossy().into_owned();
    let name = c
        .node(i)
        .disk()
        .file_name()
        .expect("disk file name")
        .to_owned();
    let new = fs.path.join(name);
    let text = c.config_text().replace(&old, &new.to_string_lossy());
    std::fs::write(c.config_path(), text).expect("config");
    new
}

/// A cluster (not started) whose Primary's disk is on a 24 MiB tmpfs holding an 8 MiB
/// filler file (16 MiB of room left): the tmpfs, the filler's path and the disk's path.
fn primary_on_small_fs(opts: ClusterOpts) -> (Cluster, SmallFs, PathBuf, PathBuf) {
    let c = Cluster::new(opts.autostart(false));
    let fs = SmallFs::mount(&c.dir().join("small"), 24);
    let filler = fs.path.join("filler");
    std::fs::write(&filler, vec![0x5a; 8 << 20]).expect("filler");
    let small = disk_on(&c, 0, &fs);
    (c, fs, filler, small)
}

/// Issue 10, failure 1: the Secondary's disk runs out of space under replicated writes.
/// The Primary acknowledges every write (its own disk has them) and goes on; the
/// Secondary records the failure (disk `Failed`, StandAlone, MDF_CONSISTENT cleared) and
/// the Primary shows it. After the Primary is lost, the Secondary refuses promotion —
/// also with `--force`, and, after a restart, as an Inconsistent disk without `--force`.
#[test]
fn a_secondary_whose_disk_failed_cannot_be_promoted() {
    let mut c = Cluster::new(ClusterOpts::new("safety-enospc").autostart(false));
    let fs = SmallFs::mount(&c.dir().join("small"), 24);
    // beta's backing file lives on the small tmpfs (the daemon creates it there).
    disk_on(&c, 1, &fs);
    c.start_all();
    c.wait_connected();
    let uri = c.node(0).nbd_unix_uri();
    // 48 MiB of data into a 24 MiB filesystem: the Secondary fails half way.
    let r = Fio::nbd(&uri)
        .arg("--rw=write")
        .arg("--bs=1M")
        .arg("--iodepth=4")
        .arg("--size=48M")
        .arg("--verify=crc32c")
        .run(c.dir());
    r.assert_ok();
    let beta = c
        .node(1)
        .wait_status(CONNECT_TIMEOUT, "Secondary disk Failed", |s| {
            s.opt_str("/disk") == Some("Failed")
        });
    assert!(beta.opt_str("/disk_failure").is_some(), "{beta}");
    c.node(1)
        .wait_status(CONNECT_TIMEOUT, "Secondary StandAlone", |s| {
            s.opt_str("/connection") == Some("StandAlone")
        });
    let alpha = c.node(0).status();
    assert_eq!(alpha.str_at("/role"), "Primary", "{alpha}");
    assert!(alpha.u64_at("/out_of_sync_bytes") > 0, "{alpha}");
    assert!(alpha.opt_str("/peer_disk_failure").is_some(), "{alpha}");

    // The Primary is lost; the operator tries to fail over to the Secondary.
    c.node_mut(0).kill9();
    let b = sock(c.node(1));
    for args in [
        &["primary", "--socket", &b][..],
        &["primary", "--force", "--socket", &b],
    ] {
        tandem(args).assert_refused(
            &format!("{args:?} on a node whose disk failed"),
            &["Failed"],
        );
    }
    // A restart re-attaches the disk: it comes back Inconsistent, still not promotable.
    c.node_mut(1).restart();
    let st = c.node(1).status();
    assert_eq!(st.str_at("/disk"), "Inconsistent", "{st}");
    tandem(&["primary", "--socket", &b])
        .assert_refused("promoting an Inconsistent disk", &["Inconsistent"]);
    assert_eq!(c.node(1).status().str_at("/role"), "Secondary");
    c.node_mut(1).stop();
    drop(fs);
}

/// Issue 10, failure 2: `primary` given to both connected nodes at the same instant.
/// Today's local check let both win; the cluster-wide request lets exactly one.
#[test]
fn racing_primary_commands_make_exactly_one_primary() {
    let mut c = Cluster::new(ClusterOpts::new("safety-race"));
    c.wait_connected();
    let socks = [sock(c.node(0)), sock(c.node(1))];
    for round in 0..12 {
        // Both Secondary.
        for s in &socks {
            tandem(&["secondary", "--socket", s]).assert_success("demote");
        }
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = socks
            .iter()
            .map(|s| {
                let mut conn = MgmtConn::connect(Path::new(s)).expect("mgmt connect");
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    conn.request_line(r#"{"cmd":"primary"}"#)
                        .expect("primary reply")
                })
            })
            .collect();
        let replies: Vec<serde_json::Value> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        let won: Vec<bool> = replies
            .iter()
            .map(|r| r.get("ok").and_then(serde_json::Value::as_bool) == Some(true))
            .collect();
        let roles: Vec<String> = (0..2)
            .map(|i| c.node(i).status().str_at("/role").to_string())
            .collect();
        let primaries = roles.iter().filter(|r| *r == "Primary").count();
        assert!(
            primaries <= 1,
            "round {round}: two Primaries: {roles:?}, replies {replies:?}"
        );
        assert!(
            won.iter().filter(|w| **w).count() <= 1,
            "round {round}: both promotions reported success: {replies:?}"
        );
        // A refusal says why (the peer's refusal or the crossing).
        for r in replies.iter().filter(|r| r.get("ok") != Some(&true.into())) {
            let e = r["error"].as_str().unwrap_or_default();
            assert!(
                e.contains("peer") || e.contains("Concurrent"),
                "round {round}: refusal without a reason: {r}"
            );
        }
        // Both still connected: nothing was broken by the race.
        for i in 0..2 {
            c.node(i).wait_connected();
        }
    }
    // The pair still replicates: make node 0 Primary and write.
    for s in &socks {
        tandem(&["secondary", "--socket", s]).assert_success("demote");
    }
    tandem(&["primary", "--socket", &socks[0]]).assert_success("promote alpha");
    nbd_roundtrip(&c.node(0).nbd_unix_uri(), 4 << 20);
    let size = c.node(0).status().u64_at("/size_bytes");
    c.stop_all();
    c.assert_replicas_identical(size);
}

/// Issue 10, failure 4: after a switchover (alpha demoted, beta promoted), alpha — whose
/// config still says `role = "primary"` — is restarted. It must stay Secondary and say
/// why, instead of promoting itself and refusing the Primary peer forever.
#[test]
fn restart_after_a_switchover_keeps_the_new_primary() {
    let mut c = Cluster::new(ClusterOpts::new("safety-switchover"));
    c.wait_connected();
    let (a, b) = (sock(c.node(0)), sock(c.node(1)));
    tandem(&["secondary", "--socket", &a]).assert_success("demote alpha");
    tandem(&["primary", "--socket", &b]).assert_success("promote beta");
    c.node_mut(0).stop();
    nbd_roundtrip(&c.node(1).nbd_unix_uri(), 4 << 20);
    c.node_mut(0).start();
    c.node(0).wait_connected();
    let st = c
        .node(0)
        .wait_status(CONNECT_TIMEOUT, "alpha decided its start role", |s| {
            s.opt_str("/startup_role").is_some()
        });
    assert_eq!(st.str_at("/role"), "Secondary", "{st}");
    assert!(
        st.str_at("/startup_role").contains("peer is Primary"),
        "{st}"
    );
    let bs = c.node(1).status();
    assert_eq!(bs.str_at("/role"), "Primary", "{bs}");
    assert_eq!(bs.str_at("/connection"), "Connected", "{bs}");
    // beta keeps serving writes, and they reach alpha.
    nbd_roundtrip(&c.node(1).nbd_unix_uri(), 4 << 20);
    let size = bs.u64_at("/size_bytes");
    c.stop_all();
    c.assert_replicas_identical(size);
}

/// The configured Primary starts alone (no peer within `wfc-timeout`): it promotes only
/// if its UUIDs say it wrote last without its peer.
#[test]
fn a_lone_configured_primary_promotes_only_if_it_wrote_last() {
    let mut c = Cluster::new(ClusterOpts::new("safety-wfc").autostart(false));
    // A short wfc-timeout for the test (default 10 s).
    let text = format!("{}\n[startup]\nwfc-timeout = 1\n", c.config_text());
    std::fs::write(c.config_path(), text).expect("config");
    c.node_mut(0).start();
    // A fresh pair: alpha never wrote without beta; it stays Secondary.
    let st = c
        .node(0)
        .wait_status(CONNECT_TIMEOUT, "alpha decided its start role", |s| {
            s.opt_str("/startup_role").is_some()
        });
    assert_eq!(st.str_at("/role"), "Secondary", "{st}");
    assert!(st.str_at("/startup_role").contains("wfc-timeout"), "{st}");
    // The operator promotes it; it writes alone (a new generation, bitmap UUID set).
    tandem(&["primary", "--socket", &sock(c.node(0))]).assert_success("promote alpha");
    nbd_roundtrip(&c.node(0).nbd_unix_uri(), 1 << 20);
    c.node_mut(0).stop();
    // Restarted alone again: its UUIDs say it was the last Primary.
    c.node_mut(0).start();
    let st = c
        .node(0)
        .wait_status(CONNECT_TIMEOUT, "alpha promoted alone", |s| {
            s.opt_str("/role") == Some("Primary")
        });
    assert!(st.str_at("/startup_role").contains("alone"), "{st}");
    c.node_mut(0).stop();
}

/// Issue 10, failure 1, the Primary's side with `on-io-error pass_on`: a write to the
/// Primary's own disk fails (its filesystem is full). The application gets the error,
/// the disk becomes Inconsistent, and while still connected the failed block is resynced
/// from the peer (which applied the write) once space is back; the replicas end equal.
#[test]
fn a_primary_s_failed_block_is_resynced_from_its_peer_while_connected() {
    use std::io::Write;
    let (mut c, fs, filler, small) =
        primary_on_small_fs(ClusterOpts::new("safety-passon").disk("on-io-error", "\"pass_on\""));
    c.start_all();
    c.wait_connected();
    let path = c.node(0).nbd_socket().expect("NBD socket").to_path_buf();
    let mut s = std::os::unix::net::UnixStream::connect(&path).expect("NBD connect");
    tandem_tests::nbd_raw::handshake_go(&mut s, "").expect("NBD handshake");
    // 1 MiB writes until one fails: 16 MiB of room is left on the tmpfs.
    let mut failed_at = None;
    for i in 0..40u64 {
        let data = vec![u8::try_from(i % 251).unwrap_or(0) | 1; 1 << 20];
        s.write_all(&tandem_tests::nbd_raw::request(
            tandem_tests::nbd_raw::CMD_WRITE,
            i,
            i << 20,
            1 << 20,
        ))
        .expect("send");
        s.write_all(&data).expect("data");
        let (err, _) = tandem_tests::nbd_raw::read_simple_reply(&mut s).expect("reply");
        if err != 0 {
            failed_at = Some(i);
            break;
        }
    }
    let failed_at = failed_at.expect("a write failed on the full filesystem");
    // Room again: the resync that follows can write the block.
    std::fs::remove_file(&filler).expect("remove the filler");
    drop(s);
    let st = c
        .node(0)
        .wait_status(CONNECT_TIMEOUT, "the failure recorded", |s| {
            !s["disk_failure"].is_null()
        });
    assert_eq!(st.str_at("/role"), "Primary", "{st}");
    let st = c
        .node(0)
        .wait_status(CONNECT_TIMEOUT * 2, "resynced from the peer", |s| {
            s.opt_str("/disk") == Some("UpToDate")
                && s.opt_str("/connection") == Some("Connected")
                && s.opt_u64("/out_of_sync_bytes") == Some(0)
                && !s["last_resync"].is_null()
        });
    assert!(
        st["last_resync"]["total_blocks"].as_u64().unwrap_or(0) >= 1,
        "the failed block was resynced: {st}"
    );
    assert_eq!(st.str_at("/role"), "Primary", "{st}");
    let size = st.u64_at("/size_bytes");
    c.stop_all();
    // alpha's image is on the small tmpfs: compare it with beta's.
    tandem_tests::assert_same_content(&small, c.node(1).disk(), Some(size));
    eprintln!("write {failed_at} failed; resynced: {}", st["last_resync"]);
    drop(fs);
}

/// One NBD request on a raw socket: writes `data` (WRITE) or reads `len` bytes (READ),
/// or flushes; returns the NBD error and the data read.
fn nbd_io(
    s: &mut std::os::unix::net::UnixStream,
    typ: u16,
    handle: u64,
    offset: u64,
    len: u32,
    data: &[u8],
) -> (u32, Vec<u8>) {
    use std::io::{Read, Write};
    use tandem_tests::nbd_raw;
    s.write_all(&nbd_raw::request(typ, handle, offset, len))
        .expect("send");
    if typ == nbd_raw::CMD_WRITE {
        s.write_all(data).expect("data");
    }
    let (err, h) = nbd_raw::read_simple_reply(s).expect("reply");
    assert_eq!(h, handle, "reply for another request");
    let mut out = Vec::new();
    if typ == nbd_raw::CMD_READ && err == 0 {
        out = vec![0u8; len as usize];
        s.read_exact(&mut out).expect("read data");
    }
    (err, out)
}

/// DRBD's diskless Primary (`on-io-error detach`, the default): the Primary's own disk
/// fills up (its backing file is on a small tmpfs). The write that hit the failure
/// fails; every later write succeeds, served by the peer (protocol C: acknowledged only
/// once the peer has it), reads of every block written before and after come back
/// right (from the peer), a flush succeeds, and status says `Diskless`; disconnected,
/// writes, flushes and reads fail, and `connect` brings the peer back. The peer marks
/// the blocks its Diskless Primary lacks. Restarted with room again, the node
/// attaches Inconsistent, takes a full resync from its peer, and the replicas end
/// byte-identical.
#[test]
fn a_primary_whose_disk_fails_goes_diskless_and_serves_through_its_peer() {
    use tandem_tests::nbd_raw::{CMD_READ, CMD_WRITE};
    const CMD_FLUSH: u16 = 3;
    const MIB: u32 = 1 << 20;
    const BLOCKS: u64 = 40;
    let (mut c, fs, filler, small) = primary_on_small_fs(ClusterOpts::new("safety-diskless"));
    c.start_all();
    c.wait_connected();
    let path = c.node(0).nbd_socket().expect("NBD socket").to_path_buf();
    let mut s = std::os::unix::net::UnixStream::connect(&path).expect("NBD connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    tandem_tests::nbd_raw::handshake_go(&mut s, "").expect("NBD handshake");
    let pattern = |i: u64| {
        let mut d = vec![u8::try_from(i % 251).unwrap_or(0) | 1; MIB as usize];
        d[..8].copy_from_slice(&i.to_le_bytes());
        d
    };
    // 40 MiB of 1 MiB writes; about 16 MiB of room is left on the tmpfs.
    let mut failed = Vec::new();
    for i in 0..BLOCKS {
        let (err, _) = nbd_io(&mut s, CMD_WRITE, i, i << 20, MIB, &pattern(i));
        if err != 0 {
            failed.push(i);
        }
    }
    assert!(!failed.is_empty(), "no write failed on the full filesystem");
    let first = failed[0];
    assert_eq!(
        failed,
        vec![first],
        "only the write that hit the failure may fail; later ones go to the peer"
    );
    let st = c
        .node(0)
        .wait_status(CONNECT_TIMEOUT, "alpha Diskless", |s| {
            s.opt_str("/disk") == Some("Diskless")
        });
    assert_eq!(st.str_at("/role"), "Primary", "{st}");
    assert_eq!(st.str_at("/connection"), "Connected", "{st}");
    assert!(st.opt_str("/disk_failure").is_some(), "{st}");
    // The application writes the failed block again: it succeeds now (on the peer).
    let (err, _) = nbd_io(&mut s, CMD_WRITE, 100, first << 20, MIB, &pattern(first));
    assert_eq!(err, 0, "rewrite of block {first} on the Diskless Primary");
    let (err, _) = nbd_io(&mut s, CMD_FLUSH, 101, 0, 0, &[]);
    assert_eq!(err, 0, "flush on the Diskless Primary");
    // Without its peer a Diskless Primary has no disk at all: writes, flushes and reads
    // fail. `connect` brings the peer back (no resync with a Diskless side).
    let a = sock(c.node(0));
    tandem(&["disconnect", "--socket", &a]).assert_success("disconnect");
    c.node(0)
        .wait_status(CONNECT_TIMEOUT, "alpha StandAlone", |s| {
            s.opt_str("/connection") == Some("StandAlone")
        });
    let (err, _) = nbd_io(&mut s, CMD_WRITE, 102, 0, MIB, &pattern(0));
    assert_ne!(
        err, 0,
        "a Diskless Primary acknowledged a write without its peer"
    );
    let (err, _) = nbd_io(&mut s, CMD_FLUSH, 103, 0, 0, &[]);
    assert_ne!(
        err, 0,
        "a Diskless Primary acknowledged a flush without its peer"
    );
    let (err, _) = nbd_io(&mut s, CMD_READ, 104, 0, MIB, &[]);
    assert_ne!(err, 0, "a Diskless Primary served a read without its peer");
    tandem(&["connect", "--socket", &a]).assert_success("connect the Diskless Primary");
    let st = c.node(0).wait_connected();
    assert_eq!(st.str_at("/disk"), "Diskless", "{st}");
    // Block 0's failed write may have reached neither disk: the application writes it
    // again, now through the peer.
    let (err, _) = nbd_io(&mut s, CMD_WRITE, 105, 0, MIB, &pattern(0));
    assert_eq!(err, 0, "a write after the reconnect");
    // Every block reads back right, from before and after the failure (from the peer).
    for i in 0..BLOCKS {
        let (err, got) = nbd_io(&mut s, CMD_READ, 200 + i, i << 20, MIB, &[]);
        assert_eq!(err, 0, "read of block {i} on the Diskless Primary");
        assert!(got == pattern(i), "block {i} read back wrong");
    }
    drop(s);
    // The peer knows its Primary is Diskless and marked what that one's disk lacks.
    let beta = c.node(1).status();
    assert_eq!(beta.str_at("/peer/disk"), "Diskless", "{beta}");
    let after = (BLOCKS - first) << 20;
    assert!(
        beta.u64_at("/out_of_sync_bytes") >= after,
        "the Secondary marks the writes of its Diskless Primary: {beta}"
    );
    // Stop the Diskless Primary, give it room, start it: it attaches Inconsistent (the
    // failure record) and takes a full resync from beta.
    c.node_mut(0).stop();
    std::fs::remove_file(&filler).expect("remove the filler");
    fs.resize(160);
    c.node_mut(0).start();
    let st = c
        .node(0)
        .wait_status(CONNECT_TIMEOUT * 4, "alpha resynced from beta", |s| {
            s.opt_str("/disk") == Some("UpToDate")
                && s.opt_str("/connection") == Some("Connected")
                && s.opt_u64("/out_of_sync_bytes") == Some(0)
                && !s["last_resync"].is_null()
        });
    let size = st.u64_at("/size_bytes");
    assert_eq!(
        st["last_resync"]["total_blocks"].as_u64(),
        Some(size / 4096),
        "a full sync: {st}"
    );
    c.stop_all();
    tandem_tests::assert_same_content(&small, c.node(1).disk(), Some(size));
    eprintln!("write {first} failed; resync: {}", st["last_resync"]);
    drop(fs);
}
