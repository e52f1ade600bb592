//! The harness's own clients checked against a real, independent NBD server (`nbdkit
//! memory`): if these fail, a failure in the tandem tests says nothing about tandem.
//! They need no tandem binary, so they run (and pass) before the daemon exists.

use std::net::TcpStream;
use std::time::Duration;
use tandem_tests::nbd_raw::{self, Outcome};
use tandem_tests::tools::{self, Fio, Nbdkit};
use tandem_tests::TempDir;

#[test]
fn fio_verify_roundtrip_against_nbdkit() {
    let dir = TempDir::new("self-fio");
    let k = Nbdkit::memory_unix(dir.path(), "32M");
    let r = Fio::randwrite_verify(&k.uri(), "4k", "16M").run(dir.path());
    r.assert_ok();
    assert_eq!(r.bytes_written(), 16 << 20);
    assert_eq!(
        r.bytes_read(),
        16 << 20,
        "verification read everything back"
    );

    let r = Fio::randwrite_verify(&k.uri(), "4k", "16M")
        .arg("--bsrange=4k-256k")
        .run(dir.path());
    r.assert_ok();
}

#[test]
fn fio_failure_is_reported() {
    let dir = TempDir::new("self-fio-fail");
    let uri = format!("nbd+unix:///?socket={}", dir.join("nothing-here").display());
    let r = Fio::randwrite_verify(&uri, "4k", "1M")
        .timeout(Duration::from_secs(60))
        .run(dir.path());
    assert!(
        !r.status.success() || r.job_errors().iter().any(|&e| e != 0),
        "fio against a missing socket must fail: {r:?}"
    );
    let caught = std::panic::catch_unwind(|| {
        r.assert_ok();
    });
    assert!(caught.is_err(), "assert_ok must reject a failed run");
}

#[test]
fn nbdsh_and_qemu_img_against_nbdkit() {
    let dir = TempDir::new("self-tools");
    let k = Nbdkit::memory_unix(dir.path(), "32M");
    tools::nbd_roundtrip(&k.uri(), 1 << 20);
    let t = Nbdkit::memory_tcp("32M");
    tools::nbd_roundtrip(&t.uri(), 2 << 20);

    let gen = dir.join("gen.img");
    tools::random_file(&gen, 8 << 20, 1);
    let g = gen.to_string_lossy().to_string();
    let uri = k.uri();
    tools::qemu_img(&["convert", "-n", "-f", "raw", "-O", "raw", &g, &uri])
        .assert_success("qemu-img convert into nbdkit");
    tools::qemu_img(&["compare", "-f", "raw", "-F", "raw", &g, &uri])
        .assert_success("qemu-img compare with nbdkit");
    // And compare must be able to fail: a different image differs.
    let other = dir.join("other.img");
    tools::random_file(&other, 8 << 20, 2);
    let out = tools::qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &other.to_string_lossy(),
        &uri,
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare must report a difference: {out:?}"
    );
}

#[test]
fn raw_nbd_client_against_nbdkit() {
    let k = Nbdkit::memory_tcp("32M");
    let mut s: TcpStream = nbd_raw::connect(k.addr.expect("tcp")).expect("connect");
    let size = nbd_raw::handshake_go(&mut s, "").expect("handshake");
    assert_eq!(size, 32 << 20);
    let block = nbd_raw::read_block(&mut s, 7).expect("read");
    assert_eq!(block.len(), 4096);
    // A request with a bad magic: a server must not carry on as if it were valid.
    use std::io::Write;
    s.write_all(&nbd_raw::request_with_magic(
        0xdead_beef,
        nbd_raw::CMD_READ,
        8,
        0,
        4096,
    ))
    .expect("send");
    let out = nbd_raw::await_outcome(&mut s, Duration::from_secs(10));
    assert_eq!(out, Outcome::Closed, "nbdkit closes on a bad magic");
}

/// The tshark helpers on real kernel DRBD 8.4 traffic (the project's copy of the
/// captures): the names the tshark test expects are the dissector's.
#[test]
fn tshark_helpers_on_the_kernel_drbd_capture() {
    let pcap = tandem_tests::workspace_root()
        .join("tests/data/drbd84-captures/handshake-sync-writes.pcap");
    assert!(pcap.is_file(), "{} is missing", pcap.display());
    let cmds = tools::drbd_commands(&pcap);
    for want in [
        "P_DATA",
        "P_WRITE_ACK",
        "P_BARRIER",
        "P_BARRIER_ACK",
        "P_CONNECTION_FEATURES",
        "P_PROTOCOL",
        "P_SIZES",
        "P_UUIDS",
        "P_STATE",
    ] {
        assert!(cmds.iter().any(|c| c == want), "{want} not in {cmds:?}");
    }
    assert_eq!(cmds.iter().filter(|c| *c == "P_DATA").count(), 16);
    assert_eq!(tools::tshark_problems(&pcap), "");
}
