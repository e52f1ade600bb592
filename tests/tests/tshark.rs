//! An independent check of the wire format: tandem's own replication traffic, captured on
//! loopback with tcpdump from before the nodes start (so the handshake is in it), decoded
//! by Wireshark's DRBD dissector (`tshark --enable-heuristic drbd_tcp`). Every packet type
//! of a connect + replicated writes + flushes must be there, and the dissector must find
//! nothing malformed. Needs root (or CAP_NET_RAW) for tcpdump, as CI has.
//!
//! Size: 4 MiB of 4 KiB writes with a flush every 32 writes (so epochs close and
//! `P_BARRIER` / `P_BARRIER_ACK` travel).

use tandem_tests::tools::{self, Capture, Fio};
use tandem_tests::{Cluster, ClusterOpts, StatusExt, CONNECT_TIMEOUT};

#[test]
fn wireshark_decodes_tandem_replication_traffic() {
    let mut c = Cluster::new(ClusterOpts::new("tshark").autostart(false));
    let ports = c.replication_ports();
    let filter = ports
        .iter()
        .map(|p| format!("tcp port {p}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let pcap = c.dir().join("replication.pcap");
    let cap = Capture::start("lo", &pcap, &filter);

    c.start_all();
    c.wait_connected();
    let uri = c.primary().nbd_unix_uri();
    Fio::randwrite_verify(&uri, "4k", "4M")
        .arg("--iodepth=8")
        .arg("--fsync=32")
        .arg("--end_fsync=1")
        .run(c.dir())
        .assert_ok();
    c.primary()
        .wait_status(CONNECT_TIMEOUT, "nothing in flight", |s| {
            s.opt_u64("/in_flight_writes") == Some(0)
        });
    c.stop_all();
    let tcpdump_said = cap.stop();
    eprintln!("tcpdump: {}", tcpdump_said.trim());

    let cmds = tools::drbd_commands(&pcap);
    let missing: Vec<&str> = [
        "P_CONNECTION_FEATURES",
        "P_PROTOCOL",
        "P_SIZES",
        "P_UUIDS",
        "P_STATE",
        "P_DATA",
        "P_WRITE_ACK",
        "P_BARRIER",
        "P_BARRIER_ACK",
    ]
    .into_iter()
    .filter(|want| !cmds.iter().any(|c| c == want))
    .collect();
    let mut seen: Vec<&String> = cmds.iter().collect();
    seen.sort();
    seen.dedup();
    assert!(
        missing.is_empty(),
        "Wireshark did not see {missing:?} in tandem's traffic; it saw {seen:?} \
         ({} PDUs; capture kept in the failure's temp dir if TANDEM_KEEP_TMP is set)",
        cmds.len()
    );
    // 4 MiB of 4 KiB writes are 1024 P_DATA. Wireshark's heuristic DRBD dissector does
    // not reassemble every PDU that spans TCP segments (the captures' README notes the
    // same for kernel traffic), so it sees most but not all of them; every one it does
    // see must decode (the malformed check below).
    let data = cmds.iter().filter(|c| *c == "P_DATA").count();
    assert!(
        data >= 512,
        "4 MiB of 4 KiB writes are 1024 P_DATA; Wireshark decoded only {data}"
    );

    let problems = tools::tshark_problems(&pcap);
    assert!(
        problems.trim().is_empty(),
        "Wireshark flags malformed packets or expert errors in tandem's traffic:\n{problems}"
    );
}
