//! One process per node and per backing device (issue 10, item 3), with real daemons:
//!
//! - a second `tandem up` of a running node fails at once, naming the running pid, and
//!   changes nothing: the running node's metadata keeps its UUIDs and flags (no new
//!   current UUID, no crashed-primary flag), its management socket still answers and
//!   replication still works (writes through NBD, identical replicas);
//! - the metadata commands (`create-md --force`, `apply-al`, `dump-md`) refuse a device a
//!   running node holds; `dump-md --force` still reads it;
//! - a node process with another disk but the same management socket is refused, and so
//!   is a start where a foreign server listens on the management socket path;
//! - stale socket files (their server killed with -9) are still replaced on restart;
//! - (item 5) `secondary` is refused while an NBD client has a writable export open
//!   ("held open", naming the clients), goes through once they disconnect, ignores
//!   clients of the read-only export, and `--force` demotes anyway (the client's next
//!   write gets EPERM).
//!
//! Every run of the CLI is bounded (`loopdev::TIMEOUT`): a second daemon that starts
//! instead of refusing fails the test by timing out.

use serde_json::Value;
use tandem_tests::loopdev::tandem;
use tandem_tests::tools::Fio;
use tandem_tests::{nbd_raw, Cluster, ClusterOpts, StatusExt};

fn dump_forced(disk: &str) -> Value {
    let out = tandem(&["dump-md", "--force", "--json", disk]);
    out.assert_success("tandem dump-md --force --json on a running node");
    serde_json::from_str(&out.stdout).expect("dump-md JSON")
}

#[test]
fn a_second_up_of_a_running_node_is_refused_and_changes_nothing() {
    let mut c = Cluster::new(ClusterOpts::new("excl-second-up"));
    c.wait_connected();
    let pid = c.primary().pid().expect("alpha runs").to_string();
    let disk = c.primary().disk().to_string_lossy().into_owned();
    let cfg = c.config_path().to_string_lossy().into_owned();
    let before = c.primary().status();
    let md_before = dump_forced(&disk);

    // The same node again, from the same config.
    let out = tandem(&["up", "--config", &cfg, "--node", "alpha"]);
    out.assert_refused("a second `tandem up` of alpha", &["already running", &pid]);

    // The metadata commands refuse the device too (drbdmeta refuses a device in use).
    for args in [
        vec!["apply-al", disk.as_str()],
        vec!["create-md", "--force", disk.as_str()],
        vec!["dump-md", disk.as_str()],
    ] {
        let out = tandem(&args);
        out.assert_refused(&format!("tandem {args:?}"), &["in use", &pid]);
    }

    // Nothing changed: same UUIDs and flags, no crashed-primary, the socket answers.
    let after = c.primary().status();
    assert_eq!(after["uuids"], before["uuids"], "{after}");
    assert_eq!(after["crashed_primary"], false, "{after}");
    assert_eq!(after.str_at("/role"), "Primary", "{after}");
    let md_after = dump_forced(&disk);
    for key in ["current_uuid", "flags", "history_uuids", "bits_set"] {
        assert_eq!(
            md_after[key], md_before[key],
            "metadata field {key} changed\nbefore {md_before}\nafter {md_after}"
        );
    }

    // Replication still works: writes through NBD, then identical replicas.
    c.wait_connected();
    Fio::randwrite_verify(&c.primary().nbd_unix_uri(), "4k", "4M")
        .run(c.dir())
        .assert_ok();
    let size = c.primary().status().u64_at("/size_bytes");
    c.stop_all();
    c.assert_replicas_identical(size);
}

#[test]
fn another_disk_with_the_same_mgmt_socket_is_refused_and_stale_sockets_are_replaced() {
    let mut c = Cluster::new(ClusterOpts::new("excl-same-sock"));
    c.wait_connected();
    let pid = c.primary().pid().expect("alpha runs").to_string();
    // The same node name and management socket, another backing file.
    let other_disk = c.dir().join("alpha-other.img");
    let text = c.config_text().replace(
        &*c.primary().disk().to_string_lossy(),
        &other_disk.to_string_lossy(),
    );
    assert!(text.contains("alpha-other.img"), "config rewrite: {text}");
    let other_cfg = c.dir().join("other.toml");
    std::fs::write(&other_cfg, &text).expect("write other.toml");
    let out = tandem(&[
        "up",
        "--config",
        &other_cfg.to_string_lossy(),
        "--node",
        "alpha",
    ]);
    out.assert_refused(
        "a second alpha with another disk",
        &["already running", &pid],
    );
    assert!(
        !other_disk.exists(),
        "the refused process must not create its disk"
    );
    assert_eq!(c.primary().status().str_at("/role"), "Primary");

    // kill -9 leaves the socket files (and the lock file) behind: a restart replaces the
    // dead sockets and takes the lock again.
    c.primary_mut().kill9();
    assert!(
        c.primary().mgmt_socket().exists(),
        "kill -9 leaves the socket file"
    );
    c.primary_mut().start();
    c.wait_connected();
    c.primary().wait_nbd_ready();
}

#[test]
fn a_live_listener_on_the_mgmt_socket_path_is_never_replaced() {
    let mut c = Cluster::new(ClusterOpts::new("excl-squat").autostart(false));
    let path = c.primary().mgmt_socket().to_path_buf();
    let squatter = std::os::unix::net::UnixListener::bind(&path).expect("bind squatter");
    let cfg = c.config_path().to_string_lossy().into_owned();
    let out = tandem(&["up", "--config", &cfg, "--node", "alpha"]);
    out.assert_refused(
        "tandem up with a live listener on its mgmt-socket",
        &["is in use", &std::process::id().to_string(), "mgmt-socket"],
    );
    // The squatter's socket is still there and still accepts.
    let _probe =
        std::os::unix::net::UnixStream::connect(&path).expect("the live socket was replaced");
    squatter.accept().expect("the squatter still accepts");
    drop(squatter);
    // Its server gone, the file is stale (ECONNREFUSED): a start replaces it.
    c.primary_mut().start();
}

/// An NBD client on the node's Unix socket, in the transmission phase.
fn nbd_unix_client(node: &tandem_tests::Node) -> std::os::unix::net::UnixStream {
    let path = node.nbd_socket().expect("nbd-socket");
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect NBD socket");
    s.set_read_timeout(Some(nbd_raw::IO_TIMEOUT))
        .expect("timeout");
    s.set_write_timeout(Some(nbd_raw::IO_TIMEOUT))
        .expect("timeout");
    nbd_raw::handshake_go(&mut s, "").expect("NBD handshake");
    s
}

/// Writes one 4 KiB block at offset 0; returns the NBD error (0: success).
fn nbd_write(s: &mut (impl std::io::Read + std::io::Write), handle: u64) -> u32 {
    s.write_all(&nbd_raw::request(nbd_raw::CMD_WRITE, handle, 0, 4096))
        .expect("send WRITE header");
    s.write_all(&[0xa5; 4096]).expect("send WRITE payload");
    let (error, h) = nbd_raw::read_simple_reply(s).expect("WRITE reply");
    assert_eq!(h, handle, "reply handle");
    error
}

fn disconnect(mut s: impl std::io::Write) {
    let _ = s.write_all(&nbd_raw::request(nbd_raw::CMD_DISC, 0, 0, 0));
}

#[test]
fn secondary_is_refused_while_an_nbd_client_holds_the_export_open() {
    let c = Cluster::new(ClusterOpts::new("held-open").nbd_tcp(true));
    c.wait_connected();
    let sock = c.primary().mgmt_socket().to_string_lossy().into_owned();
    let mut unix = nbd_unix_client(c.primary());
    let mut tcp = nbd_raw::connect(c.primary().nbd_addr().expect("nbd-listen")).expect("tcp");
    nbd_raw::handshake_go(&mut tcp, "").expect("NBD handshake over TCP");
    assert_eq!(nbd_write(&mut unix, 1), 0, "a write as Primary succeeds");
    let st = c.primary().status();
    assert_eq!(st["open_writers"], 2, "{st}");

    let out = tandem(&["secondary", "--socket", &sock]);
    out.assert_refused(
        "secondary while two NBD clients hold the export open",
        &[
            "held open by 2 writers",
            "NBD client unix ",
            "NBD client tcp 127.0.0.1:",
        ],
    );
    assert_eq!(c.primary().status().str_at("/role"), "Primary");
    // The same over the management socket, as JSON.
    let mut m = tandem_tests::mgmt::MgmtConn::connect(c.primary().mgmt_socket()).expect("mgmt");
    let r = m.request_line(r#"{"cmd":"secondary"}"#).expect("reply");
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains("held open")),
        "{r}"
    );
    assert_eq!(nbd_write(&mut unix, 2), 0, "the clients still write");

    // Both disconnect: the demotion goes through (right after, without a pause).
    disconnect(unix);
    disconnect(tcp);
    tandem(&["secondary", "--socket", &sock]).assert_success("secondary after the clients left");
    let st = c.primary().status();
    assert_eq!(st.str_at("/role"), "Secondary", "{st}");
    assert_eq!(st["open_writers"], 0, "{st}");

    // A client of the read-only export (connected while Secondary) does not count.
    let ro = nbd_unix_client(c.primary());
    tandem(&["primary", "--socket", &sock]).assert_success("promote");
    tandem(&["secondary", "--socket", &sock])
        .assert_success("secondary with only a read-only client");
    disconnect(ro);

    // --force demotes under an open writer, whose next write fails with EPERM.
    tandem(&["primary", "--socket", &sock]).assert_success("promote again");
    let mut w = nbd_unix_client(c.primary());
    let out = tandem(&["secondary", "--socket", &sock]);
    out.assert_refused(
        "secondary with one writer",
        &["held open by 1 writer: NBD client unix "],
    );
    tandem(&["secondary", "--force", "--socket", &sock]).assert_success("secondary --force");
    assert_eq!(c.primary().status().str_at("/role"), "Secondary");
    assert_eq!(nbd_write(&mut w, 3), 1, "EPERM (1) after a forced demotion");
    disconnect(w);
}
