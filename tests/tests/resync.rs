//! Resync with real daemons (issue 5): what travels after an outage, split brain and
//! its resolutions, invalidate, pause/resume, and the initial sync of a new pair.
//!
//! Every test ends by stopping both nodes and comparing the backing files byte for byte.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use tandem_tests::loopdev::tandem;
use tandem_tests::nbd_raw;
use tandem_tests::{Cluster, ClusterOpts, Node, StatusExt, CONNECT_TIMEOUT};

/// Writes `blocks` (4 KiB block numbers) through a node's NBD socket, each with bytes
/// derived from `seed` and the block, and flushes.
fn write_blocks(node: &Node, blocks: &[u64], seed: u8) {
    let path = node
        .nbd_socket()
        .expect("the node exports over a Unix socket");
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect NBD");
    nbd_raw::handshake_go(&mut s, "").expect("NBD handshake");
    for (i, &b) in blocks.iter().enumerate() {
        let mut data = vec![0u8; 4096];
        for (j, x) in data.iter_mut().enumerate() {
            *x = b.to_le_bytes()[0] ^ j.to_le_bytes()[0].wrapping_mul(31) ^ seed;
        }
        s.write_all(&nbd_raw::request(
            nbd_raw::CMD_WRITE,
            i as u64,
            b * 4096,
            4096,
        ))
        .expect("send write");
        s.write_all(&data).expect("send data");
        let mut reply = [0u8; 16];
        s.read_exact(&mut reply).expect("reply");
        assert_eq!(&reply[4..8], &[0, 0, 0, 0], "write of block {b} failed");
    }
    s.write_all(&nbd_raw::request(3, 0, 0, 0)).expect("flush"); // NBD_CMD_FLUSH
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).expect("flush reply");
    s.write_all(&nbd_raw::request(nbd_raw::CMD_DISC, 0, 0, 0))
        .expect("disconnect");
}

/// `count` distinct pseudo-random block numbers below `blocks`.
fn random_blocks(count: usize, blocks: u64, seed: u64) -> Vec<u64> {
    let mut x = seed | 1;
    let mut set = std::collections::BTreeSet::new();
    while set.len() < count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        set.insert(x % blocks);
    }
    set.into_iter().collect()
}

fn block(path: &Path, b: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    std::fs::File::open(path)
        .expect("open replica")
        .read_exact_at(&mut v, b * 4096)
        .expect("read replica");
    v
}

fn sock(n: &Node) -> String {
    n.mgmt_socket().to_string_lossy().into_owned()
}

/// Waits until a node is Connected, UpToDate, with nothing out of sync.
fn wait_in_sync(n: &Node) -> serde_json::Value {
    n.wait_status(CONNECT_TIMEOUT * 4, "Connected, UpToDate, in sync", |s| {
        s.opt_str("/connection") == Some("Connected")
            && s.opt_str("/disk") == Some("UpToDate")
            && s.opt_str("/peer/disk") == Some("UpToDate")
            && s.opt_u64("/out_of_sync_bytes") == Some(0)
    })
}

/// A connected pair whose resync runs at a fixed `rate_kib` KiB/s (`c-plan-ahead 0`),
/// slow enough for a test to act while it runs.
fn slow_resync_pair(label: &str, size: &str, rate_kib: u32) -> Cluster {
    let c = Cluster::new(
        ClusterOpts::new(label)
            .size(size)
            .disk("c-plan-ahead", "0")
            .disk("resync-rate", &rate_kib.to_string()),
    );
    c.wait_connected();
    c
}

/// `invalidate` on the Secondary, then waits until it is SyncTarget.
fn invalidate_secondary(c: &Cluster) {
    tandem(&["invalidate", "--socket", &sock(c.secondary())]).assert_success("invalidate");
    c.secondary()
        .wait_status(CONNECT_TIMEOUT, "SyncTarget", |s| {
            s.opt_str("/connection") == Some("SyncTarget")
        });
}

/// Issue 5's outage test: disconnect, write a known random set of blocks, reconnect:
/// the bytes both nodes put on the wire for the resync are within 5% of the dirty
/// blocks, and the replicas end byte-identical.
#[test]
fn outage_resync_moves_only_the_dirty_blocks() {
    let mut c = Cluster::new(ClusterOpts::new("rs-outage").size("256MiB"));
    c.wait_connected();
    let size = c.primary().status().u64_at("/size_bytes");
    c.secondary_mut().stop();
    let blocks = random_blocks(2000, size / 4096, 0x5eed);
    write_blocks(c.primary(), &blocks, 7);
    let dirty = c.primary().status().u64_at("/out_of_sync_bytes");
    assert_eq!(
        dirty,
        blocks.len() as u64 * 4096,
        "exactly the written blocks are out of sync"
    );
    let tx_before = c.primary().status().u64_at("/net_tx_bytes");
    let sent_before = c.primary().status().u64_at("/resync_bytes_sent");

    c.secondary_mut().start();
    let p = wait_in_sync(c.primary());
    let s = wait_in_sync(c.secondary());
    let resync_data = p.u64_at("/resync_bytes_sent") - sent_before;
    assert_eq!(
        resync_data, dirty,
        "the resync sent exactly the dirty blocks"
    );
    let wire = p.u64_at("/net_tx_bytes") - tx_before + s.u64_at("/net_tx_bytes");
    eprintln!(
        "outage: {} dirty blocks ({dirty} bytes), {wire} bytes on the wire ({:.2}%)",
        blocks.len(),
        wire as f64 * 100.0 / dirty as f64
    );
    assert!(
        wire * 100 <= dirty * 105,
        "{wire} bytes on the wire for {dirty} dirty bytes: more than 5% overhead"
    );
    assert_eq!(s["last_resync"]["total_blocks"], blocks.len() as u64, "{s}");
    c.stop_all();
    c.assert_replicas_identical(size);
}

/// Both promoted while apart, both written: detected, reported, nothing overwritten;
/// `connect --discard-my-data` on one side then makes it the SyncTarget of exactly the
/// blocks both sides changed.
#[test]
fn split_brain_is_resolved_by_discard_my_data() {
    let mut c = Cluster::new(ClusterOpts::new("rs-sb-manual").size("64MiB"));
    c.wait_connected();
    let size = c.primary().status().u64_at("/size_bytes");
    let (a, b) = (sock(c.primary()), sock(c.secondary()));
    for s in [&a, &b] {
        tandem(&["disconnect", "--socket", s]).assert_success("disconnect");
    }
    tandem(&["primary", "--socket", &b]).assert_success("promote the other side");
    write_blocks(c.primary(), &[1, 2, 3], 0xa);
    write_blocks(c.secondary(), &[3, 4], 0xb);
    tandem(&["secondary", "--socket", &b]).assert_success("demote");
    for s in [&a, &b] {
        tandem(&["connect", "--socket", s]).assert_success("connect");
    }
    for i in 0..2 {
        let st = c.node(i).wait_status(CONNECT_TIMEOUT, "split brain", |s| {
            s.get("split_brain").is_some_and(|v| !v.is_null())
                && s.opt_str("/connection") == Some("StandAlone")
        });
        assert_eq!(st.u64_at("/resync_bytes_sent"), 0, "nothing moved: {st}");
    }
    let (pa, pb) = (
        c.primary().disk().to_path_buf(),
        c.secondary().disk().to_path_buf(),
    );
    assert_ne!(
        block(&pa, 3),
        block(&pb, 3),
        "each side keeps its own block 3"
    );
    let events = |s: &str| {
        let out = tandem(&["events", "--socket", s]);
        out.assert_success("events");
        out.stdout
    };
    assert!(
        events(&b).contains("\"event\":\"split-brain\""),
        "split brain is an event"
    );

    tandem(&["connect", "--discard-my-data", "--socket", &b]).assert_success("discard");
    tandem(&["connect", "--socket", &a]).assert_success("connect");
    wait_in_sync(c.primary());
    let st = wait_in_sync(c.secondary());
    assert_eq!(
        st["last_resync"]["total_blocks"], 4,
        "blocks 1-4 (both sides' changes) resynced: {st}"
    );
    assert!(
        st["split_brain_resolved"]
            .as_str()
            .is_some_and(|w| w.contains("discard-my-data")),
        "{st}"
    );
    let ev = events(&b);
    for kind in ["split-brain-resolved", "resync-started", "resync-finished"] {
        assert!(
            ev.contains(&format!("\"event\":\"{kind}\"")),
            "{kind}: {ev}"
        );
    }
    c.stop_all();
    c.assert_replicas_identical(size);
}

/// One after-sb policy: both nodes Secondary (0pri) or one Primary (1pri) when they
/// meet. `loser` is the node index whose changes the policy discards.
fn policy_case(key: &str, policy: &str, one_primary: bool, writes: [&[u64]; 2], loser: usize) {
    let label = format!("rs-sb-{policy}");
    let mut c = Cluster::new(
        ClusterOpts::new(&label)
            .size("64MiB")
            .net(key, &format!("\"{policy}\"")),
    );
    c.wait_connected();
    let size = c.primary().status().u64_at("/size_bytes");
    let socks = [sock(c.node(0)), sock(c.node(1))];
    for s in &socks {
        tandem(&["disconnect", "--socket", s]).assert_success("disconnect");
    }
    // Node 0 (the initial Primary) wrote first; node 1 is promoted later: it is the
    // younger Primary.
    write_blocks(c.node(0), writes[0], 0x10);
    if !one_primary {
        tandem(&["secondary", "--socket", &socks[0]]).assert_success("demote 0");
    }
    tandem(&["primary", "--socket", &socks[1]]).assert_success("promote 1");
    write_blocks(c.node(1), writes[1], 0x20);
    tandem(&["secondary", "--socket", &socks[1]]).assert_success("demote 1");
    let winner_img = c.node(1 - loser).disk().to_path_buf();
    let expected: Vec<Vec<u8>> = (0..8).map(|b| block(&winner_img, b)).collect();
    for s in &socks {
        tandem(&["connect", "--socket", s]).assert_success("connect");
    }
    let st = wait_in_sync(c.node(loser));
    wait_in_sync(c.node(1 - loser));
    assert!(
        st["split_brain_resolved"]
            .as_str()
            .is_some_and(|w| w.contains("policy") && w.contains("this node's")),
        "{policy}: node {loser} should have lost: {st}"
    );
    c.stop_all();
    c.assert_replicas_identical(size);
    let loser_img = c.node(loser).disk().to_path_buf();
    for (b, want) in expected.iter().enumerate() {
        assert_eq!(&block(&loser_img, b as u64), want, "{policy}: block {b}");
    }
}

#[test]
fn after_sb_0pri_discard_younger_primary() {
    policy_case(
        "after-sb-0pri",
        "discard-younger-primary",
        false,
        [&[1], &[2]],
        1,
    );
}

#[test]
fn after_sb_0pri_discard_older_primary() {
    policy_case(
        "after-sb-0pri",
        "discard-older-primary",
        false,
        [&[1], &[2]],
        0,
    );
}

#[test]
fn after_sb_0pri_discard_zero_changes() {
    // Node 1 was promoted but wrote nothing: its (empty) changes are discarded.
    policy_case(
        "after-sb-0pri",
        "discard-zero-changes",
        false,
        [&[1, 2], &[]],
        1,
    );
}

#[test]
fn after_sb_0pri_discard_least_changes() {
    policy_case(
        "after-sb-0pri",
        "discard-least-changes",
        false,
        [&[1, 2, 3], &[4]],
        1,
    );
}

#[test]
fn after_sb_1pri_discard_secondary() {
    // Node 0 is still Primary when they meet: the Secondary (node 1) loses.
    policy_case(
        "after-sb-1pri",
        "discard-secondary",
        true,
        [&[1], &[2, 3, 4]],
        1,
    );
}

/// `invalidate` on the Secondary: a full resync from the peer, every block.
#[test]
fn invalidate_resyncs_the_whole_device() {
    let mut c = Cluster::new(ClusterOpts::new("rs-invalidate").size("64MiB"));
    c.wait_connected();
    let size = c.primary().status().u64_at("/size_bytes");
    write_blocks(c.primary(), &[0, 100, 1000], 3);
    // Behind tandem's back: damage the Secondary's copy.
    std::fs::OpenOptions::new()
        .write(true)
        .open(c.secondary().disk())
        .expect("open")
        .write_all_at(&[0xee; 4096], 100 * 4096)
        .expect("corrupt");
    let refused = tandem(&["invalidate", "--socket", &sock(c.primary())]);
    assert!(
        !refused.status.success() && refused.stderr.contains("Secondary"),
        "invalidate refuses a Primary: {}",
        refused.stderr
    );
    tandem(&["invalidate", "--socket", &sock(c.secondary())]).assert_success("invalidate");
    let st = wait_in_sync(c.secondary());
    assert_eq!(
        st["last_resync"]["total_blocks"].as_u64(),
        Some(size / 4096),
        "a full resync: {st}"
    );
    c.stop_all();
    c.assert_replicas_identical(size);
}

/// `invalidate` on the old Primary after a switchover, on the connection where it was
/// SyncSource: the source of that finished run stays until the connection ends and must
/// not refuse it (DRBD's rule is the connection's state; the simulator's seed 98 found
/// the refusal "a resync is running").
#[test]
fn invalidate_on_the_old_source_after_a_switchover() {
    let mut c = Cluster::new(ClusterOpts::new("rs-inv-switch").size("8MiB"));
    c.wait_connected();
    let size = c.primary().status().u64_at("/size_bytes");
    // An 8 MiB resync ends within milliseconds: wait for its record, not its state.
    tandem(&["invalidate", "--socket", &sock(c.secondary())]).assert_success("invalidate");
    c.secondary()
        .wait_status(CONNECT_TIMEOUT, "the full resync into the Secondary", |s| {
            s.pointer("/last_resync/total_blocks")
                .and_then(serde_json::Value::as_u64)
                == Some(size / 4096)
        });
    wait_in_sync(c.secondary());
    let (a, b) = (sock(c.primary()), sock(c.secondary()));
    tandem(&["secondary", "--socket", &a]).assert_success("demote the old source");
    c.secondary()
        .wait_status(CONNECT_TIMEOUT, "peer Secondary", |s| {
            s.opt_str("/peer/role") == Some("Secondary")
        });
    tandem(&["primary", "--socket", &b]).assert_success("promote the old target");
    tandem(&["invalidate", "--socket", &a]).assert_success("invalidate the old source");
    let st = wait_in_sync(c.primary());
    assert_eq!(
        st["last_resync"]["total_blocks"].as_u64(),
        Some(size / 4096),
        "a full resync into the old source: {st}"
    );
    c.stop_all();
    c.assert_replicas_identical(size);
}

/// `pause-sync` holds a running resync (nothing moves), `resume-sync` lets it finish.
#[test]
fn pause_and_resume_sync() {
    // Slow enough to catch it running: 16 MiB/s (4 s for the volume).
    let mut c = slow_resync_pair("rs-pause", "64MiB", 16384);
    let size = c.primary().status().u64_at("/size_bytes");
    let sec = sock(c.secondary());
    invalidate_secondary(&c);
    tandem(&["pause-sync", "--socket", &sec]).assert_success("pause");
    // Let requests in flight drain, then nothing may move.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let a = c.secondary().status();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let b = c.secondary().status();
    assert_eq!(a["resync"]["paused"], true, "{a}");
    assert_eq!(
        a["resync"]["out_of_sync_bytes"], b["resync"]["out_of_sync_bytes"],
        "a paused resync moves nothing"
    );
    assert!(b.u64_at("/out_of_sync_bytes") > 0, "{b}");
    tandem(&["resume-sync", "--socket", &sec]).assert_success("resume");
    // The rest at full speed.
    wait_in_sync(c.secondary());
    c.stop_all();
    c.assert_replicas_identical(size);
}

/// Online verify: one block corrupted behind tandem's back on the Secondary is reported,
/// exactly, by `tandem verify` on either side; a disconnect/connect of the Primary then
/// resyncs exactly that block and the replicas are identical again.
#[test]
fn verify_finds_exactly_the_corrupted_block_and_the_next_resync_repairs_it() {
    let mut c = Cluster::new(
        ClusterOpts::new("rs-verify")
            .size("64MiB")
            .net("verify-alg", "\"crc32c\""),
    );
    c.wait_connected();
    let size = c.primary().status().u64_at("/size_bytes");
    write_blocks(c.primary(), &[10, 11, 12, 5000], 9);
    const BAD: u64 = 11;
    std::fs::OpenOptions::new()
        .write(true)
        .open(c.secondary().disk())
        .expect("open")
        .write_all_at(&[0x5a; 4096], BAD * 4096)
        .expect("corrupt");
    for n in [c.primary(), c.secondary()] {
        let out = tandem(&["verify", "--json", "--socket", &sock(n)]);
        out.assert_success("verify");
        let r: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("json");
        assert_eq!(r["finished"], true, "{r}");
        assert_eq!(r["total_blocks"].as_u64(), Some(size / 4096), "{r}");
        assert_eq!(r["out_of_sync_blocks"], 1, "{r}");
        assert_eq!(r["ranges"], serde_json::json!([[BAD * 8, 8]]), "{r}");
    }
    // Both sides marked it.
    for n in [c.primary(), c.secondary()] {
        assert_eq!(n.status().u64_at("/out_of_sync_bytes"), 4096);
    }
    let p = sock(c.primary());
    tandem(&["disconnect", "--socket", &p]).assert_success("disconnect");
    tandem(&["connect", "--socket", &p]).assert_success("connect");
    let st = wait_in_sync(c.secondary());
    assert_eq!(st["last_resync"]["total_blocks"], 1, "{st}");
    wait_in_sync(c.primary());
    c.stop_all();
    c.assert_replicas_identical(size);
}

/// Application writes during a resync (docs/design.md §3: neither may overwrite the other's
/// newer data): fio writes and verifies on the Primary while a full resync runs to the
/// Secondary; at the end both replicas are identical.
#[test]
fn application_writes_during_resync_end_identical() {
    // 32 MiB/s, so that the resync (8 s) outlasts the writes.
    let mut c = slow_resync_pair("rs-appwrites", "256MiB", 32768);
    let size = c.primary().status().u64_at("/size_bytes");
    invalidate_secondary(&c);
    tandem_tests::tools::Fio::randwrite_verify(&c.primary().nbd_unix_uri(), "4k-64k", "240M")
        .arg("--io_size=48M")
        .run(c.dir())
        .assert_ok();
    let st = c.secondary().status();
    assert_eq!(
        st.str_at("/connection"),
        "SyncTarget",
        "test premise: the resync still runs when the writes end: {st}"
    );
    wait_in_sync(c.secondary());
    wait_in_sync(c.primary());
    c.stop_all();
    c.assert_replicas_identical(size);
}

/// Reads one 4 KiB block through a node's NBD socket.
fn read_block(node: &Node, b: u64) -> Vec<u8> {
    let path = node
        .nbd_socket()
        .expect("the node exports over a Unix socket");
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect NBD");
    nbd_raw::handshake_go(&mut s, "").expect("NBD handshake");
    s.write_all(&nbd_raw::request(nbd_raw::CMD_READ, 1, b * 4096, 4096))
        .expect("send read");
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).expect("reply");
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "read of block {b} failed");
    let mut data = vec![0u8; 4096];
    s.read_exact(&mut data).expect("data");
    let _ = s.write_all(&nbd_raw::request(nbd_raw::CMD_DISC, 0, 0, 0));
    data
}

/// A SyncTarget may become Primary while its peer is UpToDate (docs/design.md §3 "Reads"):
/// blocks not yet resynced are read from the peer, its own writes replicate, and the
/// resync finishes with identical replicas.
#[test]
fn a_sync_target_primary_reads_unsynced_blocks_from_the_peer() {
    // 8 MiB/s: the resync lasts ~8 s, the reads come long before.
    let mut c = slow_resync_pair("rs-target-primary", "64MiB", 8192);
    let size = c.primary().status().u64_at("/size_bytes");
    let far = size / 4096 - 10;
    write_blocks(c.primary(), &[far, far + 1], 0x44);
    let want = block(c.primary().disk(), far);
    let (a, b) = (sock(c.primary()), sock(c.secondary()));
    // The Secondary's copy of `far` is stale behind tandem's back: only a read from the
    // peer returns the right data.
    std::fs::OpenOptions::new()
        .write(true)
        .open(c.secondary().disk())
        .expect("open")
        .write_all_at(&[0x77; 4096], far * 4096)
        .expect("damage");
    invalidate_secondary(&c);
    tandem(&["secondary", "--socket", &a]).assert_success("demote the source");
    let refused = tandem(&["primary", "--socket", &b]);
    if !refused.status.success() {
        // The demotion's P_STATE may not have arrived yet.
        c.secondary()
            .wait_status(CONNECT_TIMEOUT, "peer Secondary", |s| {
                s.opt_str("/peer/role") == Some("Secondary")
            });
        tandem(&["primary", "--socket", &b]).assert_success("promote the SyncTarget");
    }
    let st = c.secondary().status();
    assert_eq!(st.str_at("/role"), "Primary", "{st}");
    assert_eq!(st.str_at("/connection"), "SyncTarget", "{st}");
    assert!(
        block(c.secondary().disk(), far) != want,
        "test premise: block {far} is not resynced yet"
    );
    assert_eq!(read_block(c.secondary(), far), want, "read from the peer");
    write_blocks(c.secondary(), &[far + 1, 7], 0x55);
    assert_eq!(
        block(c.primary().disk(), far + 1),
        block(c.secondary().disk(), far + 1),
        "the SyncTarget Primary's write replicated"
    );
    wait_in_sync(c.secondary());
    c.stop_all();
    c.assert_replicas_identical(size);
}

/// Thin resync (`rs-discard-granularity`): ranges the SyncSource holds as holes travel as
/// `P_RS_DEALLOCATED` without being read, and become holes on the SyncTarget; only the
/// ranges with data move data.
#[test]
fn thin_resync_sends_holes_as_deallocated() {
    use std::os::unix::fs::MetadataExt;
    let mut c = Cluster::new(
        ClusterOpts::new("rs-thin")
            .size("64MiB")
            .disk("rs-discard-granularity", "65536"),
    );
    c.wait_connected();
    let size = c.primary().status().u64_at("/size_bytes");
    write_blocks(c.primary(), &[0, 300, 9000], 1);
    // The Secondary's data area fully allocated with garbage, behind tandem's back.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(c.secondary().disk())
        .expect("open");
    for chunk in 0..size / (1 << 20) {
        f.write_all_at(&vec![0xcc; 1 << 20], chunk << 20)
            .expect("fill");
    }
    f.sync_all().expect("sync");
    let allocated = |p: &Path| std::fs::metadata(p).expect("stat").blocks() * 512;
    assert!(
        allocated(c.secondary().disk()) >= (size >> 20) << 20,
        "test premise: allocated"
    );
    tandem(&["invalidate", "--socket", &sock(c.secondary())]).assert_success("invalidate");
    wait_in_sync(c.secondary());
    let p = c.primary().status();
    // Three 64 KiB ranges hold data. A request the controller's step cuts shorter than
    // the granularity goes as a plain request (DRBD's rule too) and moves its zeroes.
    let moved = p.u64_at("/resync_bytes_sent");
    assert!(
        (3 * 65536..1 << 20).contains(&moved),
        "{moved} bytes of data moved for 3 × 64 KiB of data in 64 MiB: {p}"
    );
    assert!(
        p.u64_at("/resync_hole_reads_skipped") >= size / 65536 - 3 - 8,
        "the holes were not read: {p}"
    );
    let after = allocated(c.secondary().disk());
    assert!(
        after < 8 << 20,
        "the target punched the deallocated ranges: {after} bytes still allocated"
    );
    c.stop_all();
    c.assert_replicas_identical(size);
}

/// A resync interrupted by a disconnect, and then by a restart of the SyncTarget, goes on
/// from where it stopped: each new run covers only what was left, and the end is
/// identical replicas.
#[test]
fn an_interrupted_resync_resumes_where_it_stopped() {
    // 16 MiB/s: ~4 s for the volume.
    let mut c = slow_resync_pair("rs-resume", "64MiB", 16384);
    let size = c.primary().status().u64_at("/size_bytes");
    let sec = sock(c.secondary());
    let total = size.div_ceil(4096);
    tandem(&["invalidate", "--socket", &sec]).assert_success("invalidate");
    let progressed = |below: u64| {
        move |s: &serde_json::Value| {
            s.opt_str("/connection") == Some("SyncTarget")
                && s.opt_u64("/resync/out_of_sync_bytes")
                    .is_some_and(|b| b < below * 4096)
        }
    };
    c.secondary()
        .wait_status(CONNECT_TIMEOUT, "a quarter done", progressed(total * 3 / 4));
    // 1. Disconnect and connect again.
    tandem(&["disconnect", "--socket", &sec]).assert_success("disconnect");
    let left = c.secondary().status().u64_at("/out_of_sync_bytes") / 4096;
    assert!(left < total * 3 / 4 && left > 0, "{left} of {total} left");
    tandem(&["connect", "--socket", &sec]).assert_success("connect");
    let st = c
        .secondary()
        .wait_status(CONNECT_TIMEOUT, "SyncTarget again", |s| {
            s.opt_str("/connection") == Some("SyncTarget")
        });
    let again = st.u64_at("/resync/total_bytes") / 4096;
    assert!(
        again <= left,
        "the second run covers {again} blocks, {left} were left (of {total})"
    );
    c.secondary()
        .wait_status(CONNECT_TIMEOUT, "half done", progressed(total / 2));
    // 2. A clean restart of the SyncTarget in the middle of the run.
    c.secondary_mut().stop();
    c.secondary_mut().start();
    let st = c.secondary().status();
    assert_eq!(st.str_at("/disk"), "Inconsistent", "{st}");
    let left = st.u64_at("/out_of_sync_bytes") / 4096;
    assert!(
        left > 0 && left < total / 2,
        "after the restart {left} of {total} blocks are left"
    );
    let st = wait_in_sync(c.secondary());
    assert!(
        st["last_resync"]["total_blocks"]
            .as_u64()
            .is_some_and(|t| t <= left),
        "the last run covered only what was left ({left}): {st}"
    );
    c.stop_all();
    c.assert_replicas_identical(size);
}
