//! The daemon's metadata life cycle (issue 4), with real daemons:
//!
//! - the out-of-sync bitmap of a Secondary outage is written at a clean stop and read back
//!   at the next start, exactly (not one bit more or less), and the stopped node's
//!   metadata is clean and not Primary (what `drbdmeta apply-al` then has nothing to do
//!   for);
//! - flex-external metadata: each node's metadata in its own file, the whole backing file
//!   exported, the same life cycle;
//! - a backing device without metadata is refused with the `create-md` command to run.

use std::path::Path;
use tandem_tests::loopdev::{dump_md_json, tandem};
use tandem_tests::tools::Fio;
use tandem_tests::{Cluster, ClusterOpts, StatusExt, CONNECT_TIMEOUT};

fn flags(md: &serde_json::Value) -> Vec<String> {
    md["flag_names"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes 8 MiB while the Secondary is away, stops both nodes cleanly, checks the
/// metadata, restarts the Primary alone: the same out-of-sync bytes.
fn outage_survives_restart(c: &mut Cluster, dump_args: &dyn Fn(&Path) -> Vec<String>) {
    c.wait_connected();
    let uri = c.primary().nbd_unix_uri();
    c.secondary_mut().stop();
    c.primary()
        .wait_status(CONNECT_TIMEOUT, "connection no longer Connected", |s| {
            s.opt_str("/connection").is_some_and(|c| c != "Connected")
        });
    Fio::randwrite_verify(&uri, "4k", "8M")
        .arg("--offset=4M")
        .run(c.dir())
        .assert_ok();
    let dirty = c.primary().status().u64_at("/out_of_sync_bytes");
    assert!(dirty > 0 && dirty <= 8 << 20, "out of sync: {dirty}");
    c.primary_mut().stop();

    let args = dump_args(c.primary().disk());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let md = dump_md_json(&args);
    assert_eq!(
        md["clean"], true,
        "a clean stop leaves clean metadata: {md}"
    );
    let f = flags(&md);
    assert!(
        !f.iter()
            .any(|x| x.contains("PRIMARY_IND") || x.contains("CRASHED")),
        "a cleanly stopped Primary is neither Primary nor crashed: {f:?}"
    );
    assert_eq!(
        md["bits_set"].as_u64().map(|b| b * 4096),
        Some(dirty),
        "the on-disk bitmap holds exactly the out-of-sync blocks: {md}"
    );
    c.primary_mut().start();
    let st = c.primary().status();
    assert_eq!(st.u64_at("/out_of_sync_bytes"), dirty, "{st}");
    assert_eq!(st["crashed_primary"], false, "{st}");
    c.primary_mut().stop();
}

#[test]
fn outage_bitmap_survives_a_clean_restart() {
    let mut c = Cluster::new(ClusterOpts::new("md-restart"));
    outage_survives_restart(&mut c, &|disk| vec![disk.to_string_lossy().into_owned()]);
}

#[test]
fn flex_external_metadata_exports_the_whole_disk_and_keeps_the_bitmap() {
    let mut c = Cluster::new(ClusterOpts::new("md-external").meta_external(true));
    let size = c.primary().status().u64_at("/size_bytes");
    assert_eq!(
        size,
        64 << 20,
        "with external metadata the whole disk is data"
    );
    for n in c.nodes() {
        assert!(
            n.disk().with_extension("md").is_file(),
            "no metadata file for {}",
            n.name()
        );
    }
    outage_survives_restart(&mut c, &|disk| {
        vec![
            disk.to_string_lossy().into_owned(),
            "--meta-device".into(),
            disk.with_extension("md").to_string_lossy().into_owned(),
        ]
    });
}

#[test]
fn a_disk_without_metadata_is_refused_with_the_command_to_run() {
    let mut c = Cluster::new(ClusterOpts::new("md-missing").autostart(false));
    let disk = c.primary().disk().to_path_buf();
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .expect("create an empty backing file");
    let n = c.primary_mut();
    n.spawn();
    let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
    while n.is_running() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = n.stop_status();
    assert!(!status.success(), "a disk without metadata must not start");
    let log = n.log_tail(20);
    assert!(
        log.contains("create-md") && log.contains(&*disk.to_string_lossy()),
        "the error names the device and the command: {log}"
    );
}

/// Writes 4 KiB of `byte` at offset 0 through a node's NBD socket.
fn write_block(uri: &str, byte: u8) {
    let out = tandem_tests::tools::nbdsh(
        uri,
        &format!("h.pwrite(bytes([{byte}]) * 4096, 0)\nh.flush()\nprint('written')\n"),
    );
    out.assert_success("nbdsh write");
    assert!(out.stdout.contains("written"), "{}", out.stdout);
}

fn first_block(path: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; 4096];
    std::fs::File::open(path)
        .expect("open backing file")
        .read_exact_at(&mut b, 0)
        .expect("read backing file");
    b
}

/// Split brain (issue 5's first piece, on the persisted generation UUIDs): both nodes
/// write as Primary while apart; when they meet, both handshakes see diverged
/// generations, drop the connection and stay StandAlone with the reason in status, and
/// neither replica is overwritten.
#[test]
fn split_brain_is_detected_and_nothing_is_overwritten() {
    let mut c = Cluster::new(ClusterOpts::new("split-brain"));
    c.wait_connected();
    c.secondary_mut().stop();
    write_block(&c.primary().nbd_unix_uri(), 0xaa);
    c.primary_mut().stop();

    c.secondary_mut().start();
    let beta_sock = c.secondary().mgmt_socket().to_string_lossy().into_owned();
    tandem(&["primary", "--socket", &beta_sock]).assert_success("promote beta");
    write_block(&c.secondary().nbd_unix_uri(), 0xbb);
    tandem(&["secondary", "--socket", &beta_sock]).assert_success("demote beta");

    c.primary_mut().start();
    for i in 0..2 {
        let st = c.node(i).wait_status(CONNECT_TIMEOUT, "split brain", |s| {
            s.get("split_brain").is_some_and(|v| !v.is_null())
                && s.opt_str("/connection") == Some("StandAlone")
        });
        assert!(
            st["split_brain"]
                .as_str()
                .is_some_and(|w| w.contains("split brain")),
            "{st}"
        );
    }
    c.stop_all();
    assert!(first_block(c.primary().disk()).iter().all(|&b| b == 0xaa));
    assert!(first_block(c.secondary().disk()).iter().all(|&b| b == 0xbb));
}
