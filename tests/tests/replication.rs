//! Replication end to end: two `tandem` processes on 127.0.0.1 (alpha Primary, beta
//! Secondary, file backends of 64 MiB), real clients writing through the Primary's NBD
//! export, then both nodes stopped cleanly and their backing files compared byte for byte
//! over the exported size. Sizes: 32 MiB of writes per fio job, 32 MiB images.

use serde_json::Value;
use tandem_tests::tools::{self, Fio};
use tandem_tests::{Cluster, ClusterOpts, Protocol, StatusExt, CONNECT_TIMEOUT};

/// Waits until the Primary has nothing in flight, nothing out of sync and a peer whose disk
/// is UpToDate, so a clean stop cannot race the last writes; returns that status.
fn quiescent(c: &Cluster) -> Value {
    c.primary().wait_status(
        CONNECT_TIMEOUT,
        "no write in flight, nothing out of sync, peer UpToDate",
        |s| {
            s.opt_str("/connection") == Some("Connected")
                && s.opt_u64("/in_flight_writes") == Some(0)
                && s.opt_u64("/out_of_sync_bytes") == Some(0)
                && s.opt_str("/peer/disk") == Some("UpToDate")
        },
    )
}

/// Both nodes' status after connecting: the roles, states and names of the contract.
fn check_connected_status(c: &Cluster, protocol: Protocol) {
    let p = c.primary().status();
    assert_eq!(p.str_at("/resource"), "r0", "{p}");
    assert_eq!(p.str_at("/node"), "alpha", "{p}");
    assert_eq!(p.str_at("/role"), "Primary", "{p}");
    assert_eq!(p.str_at("/disk"), "UpToDate", "{p}");
    assert_eq!(p.str_at("/connection"), "Connected", "{p}");
    assert_eq!(p.str_at("/protocol"), protocol.as_str(), "{p}");
    assert_eq!(p.str_at("/peer/node"), "beta", "{p}");
    assert_eq!(p.str_at("/peer/role"), "Secondary", "{p}");
    assert_eq!(p.str_at("/peer/disk"), "UpToDate", "{p}");
    assert!(p.u64_at("/size_bytes") >= 32 << 20, "{p}");

    let s = c.secondary().status();
    assert_eq!(s.str_at("/node"), "beta", "{s}");
    assert_eq!(s.str_at("/role"), "Secondary", "{s}");
    assert_eq!(s.str_at("/disk"), "UpToDate", "{s}");
    assert_eq!(s.str_at("/connection"), "Connected", "{s}");
    assert_eq!(s.str_at("/peer/node"), "alpha", "{s}");
    assert_eq!(s.str_at("/peer/role"), "Primary", "{s}");
    assert_eq!(
        s.u64_at("/size_bytes"),
        p.u64_at("/size_bytes"),
        "both nodes export the same size"
    );
}

/// fio 4 KiB random writes (QD32) and then mixed 4–256 KiB random writes, both verified,
/// against the Primary; every byte replicated; replicas identical after a clean stop.
fn fio_then_compare(label: &str, protocol: Protocol) {
    let mut c = Cluster::new(ClusterOpts::new(label).protocol(protocol));
    c.wait_connected();
    check_connected_status(&c, protocol);
    let before = c.primary().status().u64_at("/bytes_replicated");

    let uri = c.primary().nbd_unix_uri();
    let r4k = Fio::randwrite_verify(&uri, "4k", "32M").run(c.dir());
    r4k.assert_ok();
    let mixed = Fio::randwrite_verify(&uri, "4k-256k", "32M").run(c.dir());
    mixed.assert_ok();
    let written = r4k.bytes_written() + mixed.bytes_written();

    let st = quiescent(&c);
    assert_eq!(st.str_at("/role"), "Primary", "{st}");
    assert_eq!(st.u64_at("/out_of_sync_bytes"), 0, "{st}");
    let replicated = st.u64_at("/bytes_replicated").saturating_sub(before);
    assert!(
        replicated >= written,
        "fio wrote {written} bytes but bytes_replicated grew by {replicated}: {st}"
    );
    let size = st.u64_at("/size_bytes");

    c.stop_all();
    c.assert_replicas_identical(size);
}

#[test]
fn protocol_c_fio_randwrite_replicas_identical() {
    fio_then_compare("repl-c", Protocol::C);
}

#[test]
fn protocol_b_fio_randwrite_replicas_identical() {
    fio_then_compare("repl-b", Protocol::B);
}

#[test]
fn protocol_a_fio_randwrite_replicas_identical() {
    fio_then_compare("repl-a", Protocol::A);
}

/// Protocol A completes a write once it is in the socket, long before its epoch is
/// barrier-acked; with a small `max-buffers` (32: at most 64 writes may wait for their
/// barrier ack) a QD32 writer outruns the acks. The writes must wait for room, never
/// fail (the bench saw EIO here before the driver waited).
#[test]
fn protocol_a_writer_outrunning_the_barrier_acks_waits_instead_of_failing() {
    let mut c = Cluster::new(
        ClusterOpts::new("repl-a-room")
            .protocol(Protocol::A)
            .net("max-buffers", "32"),
    );
    c.wait_connected();
    let uri = c.primary().nbd_unix_uri();
    Fio::randwrite_verify(&uri, "4k", "64M")
        .run(c.dir())
        .assert_ok();
    let size = quiescent(&c).u64_at("/size_bytes");
    c.stop_all();
    c.assert_replicas_identical(size);
}

/// `qemu-img convert` of a random 32 MiB image into the export, `qemu-img compare` of the
/// image with the export, then the Secondary's backing file holds the image and both
/// replicas are identical after a clean stop.
#[test]
fn qemu_img_convert_and_compare() {
    let mut c = Cluster::new(ClusterOpts::new("repl-qemu"));
    c.wait_connected();
    let uri = c.primary().nbd_unix_uri();

    let seed: u64 = rand::random();
    eprintln!("random image seed {seed}");
    let gen = c.dir().join("gen.img");
    let image_len: u64 = 32 << 20;
    tools::random_file(&gen, image_len, seed);
    let g = gen.to_string_lossy().to_string();

    tools::qemu_img(&["convert", "-n", "-f", "raw", "-O", "raw", &g, &uri])
        .assert_success("qemu-img convert into the export");
    tools::qemu_img(&["compare", "-f", "raw", "-F", "raw", &g, &uri])
        .assert_success("qemu-img compare image vs export");

    let st = quiescent(&c);
    assert!(st.u64_at("/bytes_replicated") > 0, "{st}");
    let size = st.u64_at("/size_bytes");
    c.stop_all();
    c.assert_replicas_identical(size);
    // Not just equal to each other: the Secondary's disk holds the image itself.
    tandem_tests::assert_same_content(&gen, c.secondary().disk(), Some(image_len));
}
