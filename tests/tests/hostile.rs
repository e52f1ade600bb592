//! Hostile input on every port a node opens: the replication port, the NBD port and the
//! management socket. After each attack the node must still be alive, still answer
//! status, still serve its volume (an nbdsh write + read-back through the Primary's export
//! succeeds) and still be (or get back) Connected to its peer — and its log must contain a
//! line, written after the attack, that explains the refusal (docs/design.md §9: a malformed
//! packet drops that connection with a logged reason, never the process). The refusal
//! vocabulary is `tandem_tests::logs::REFUSAL_WORDS`.
//!
//! Sizes: at most 1 MiB is sent per attack; "oversized" means a header that *claims* 1–2 GiB.

use rand::RngCore;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;
use tandem_tests::drbd_raw::{self, P_INITIAL_DATA};
use tandem_tests::mgmt::MgmtConn;
use tandem_tests::nbd_raw::{self, Outcome};
use tandem_tests::tools;
use tandem_tests::{Cluster, ClusterOpts, StatusExt};

/// How long an attacker waits for the daemon's reaction before giving up on it.
const REACTION: Duration = Duration::from_secs(15);

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

fn connected_cluster(label: &str) -> Cluster {
    let c = Cluster::new(ClusterOpts::new(label).nbd_tcp(true));
    c.wait_connected();
    c
}

/// The checks after every attack: both nodes alive and answering, the export serving IO,
/// the nodes Connected (again).
fn assert_survived(c: &mut Cluster, what: &str) {
    for i in 0..2 {
        c.node_mut(i).assert_running(&format!("after {what}"));
    }
    let st = c.primary().status();
    assert_eq!(st.str_at("/role"), "Primary", "after {what}: {st}");
    let _ = c.secondary().status();
    let offset = (rand::random::<u64>() % 8192) * 4096; // inside the first 32 MiB
    tools::nbd_roundtrip(&c.primary().nbd_unix_uri(), offset);
    c.wait_connected();
}

// ---------------------------------------------------------------------------------------
// Replication port. Whether a node keeps listening while Connected is its own business, so
// the attacks land while alpha is alone (beta stopped cleanly): alpha then listens for its
// peer for sure. Afterwards beta comes back and must connect through the same listener.

/// Runs `attack` against alpha's replication port while beta is down, then checks the
/// refusal in alpha's log, alpha's health, and that beta reconnects.
fn replication_attack(label: &str, what: &str, attack: impl FnOnce(SocketAddr)) {
    let mut c = connected_cluster(label);
    c.secondary_mut().stop();
    c.primary().wait_status(
        tandem_tests::CONNECT_TIMEOUT,
        "alpha waiting for its peer",
        |s| s.opt_str("/connection").is_some_and(|c| c != "Connected"),
    );
    let addr = c.primary().address();
    let offset = c.primary().log_len();
    attack(addr);
    let line = c.primary().wait_refusal(offset, what);
    eprintln!("alpha refused {what}: {line}");
    c.primary_mut().assert_running(&format!("after {what}"));
    tools::nbd_roundtrip(&c.primary().nbd_unix_uri(), 0);
    c.secondary_mut().start();
    assert_survived(&mut c, what);
}

/// Sends `bytes`, then keeps the connection open until the daemon closes it or
/// [`REACTION`] passes (the refusal is then looked for in the log).
fn send_and_hold(addr: SocketAddr, bytes: &[u8], half_close: bool) {
    let mut s = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => panic!("connect to the replication port {addr}: {e}"),
    };
    // The daemon may close before we finish sending: that is a refusal too.
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    let _ = nbd_raw::await_outcome(&mut s, REACTION);
    nbd_raw::close(s);
}

#[test]
fn replication_port_random_bytes() {
    replication_attack(
        "hostile-repl-rand",
        "random bytes on the replication port",
        |a| {
            let mut junk = random_bytes(4096);
            // Never a valid DRBD magic by chance.
            if let Some(first) = junk.first_mut() {
                *first = 0x00;
            }
            send_and_hold(a, &junk, false);
        },
    );
}

#[test]
fn replication_port_truncated_header() {
    replication_attack(
        "hostile-repl-trunc",
        "a truncated h80 header (5 of 8 bytes, then EOF)",
        |a| {
            let h = drbd_raw::h80(P_INITIAL_DATA, 0);
            send_and_hold(a, h.get(..5).unwrap_or_default(), true);
        },
    );
}

#[test]
fn replication_port_initial_packet_with_junk_payload() {
    replication_attack(
        "hostile-repl-junk",
        "an h80 P_INITIAL_DATA header (83 74 02 67 ff f2) claiming a 256-byte payload of junk",
        |a| {
            let mut msg = drbd_raw::h80(P_INITIAL_DATA, 256).to_vec();
            msg.extend(random_bytes(256));
            send_and_hold(a, &msg, false);
        },
    );
}

#[test]
fn replication_port_header_claiming_2gib_h95() {
    replication_attack(
        "hostile-repl-big95",
        "an h95 header claiming a 2 GiB payload",
        |a| {
            let mut msg = drbd_raw::h95(P_INITIAL_DATA, 0x8000_0000).to_vec();
            msg.extend(random_bytes(1024));
            send_and_hold(a, &msg, false);
        },
    );
}

#[test]
fn replication_port_header_claiming_2gib_h100() {
    replication_attack(
        "hostile-repl-big100",
        "an h100 P_DATA header claiming a 2 GiB payload",
        |a| {
            let mut msg = drbd_raw::h100(0, 0x0000, 0x8000_0000).to_vec();
            msg.extend(random_bytes(1024));
            send_and_hold(a, &msg, false);
        },
    );
}

/// Past the feature exchange (agreed protocol ≥ 100, so h100 headers): a `P_DATA` header
/// claiming a 2 GiB payload must be refused by its length, not waited for.
#[test]
fn replication_oversized_packet_after_feature_exchange() {
    replication_attack(
        "hostile-repl-big-late",
        "an h100 P_DATA claiming 2 GiB after a valid feature exchange",
        |a| {
            let (mut data, meta, their_max) =
                drbd_raw::connect_past_features(a).expect("DRBD handshake up to the features");
            assert!(
                their_max >= 100,
                "the daemon offers protocol_max {their_max}; this attack needs h100"
            );
            let mut msg = drbd_raw::h100(0, drbd_raw::P_DATA, 0x8000_0000).to_vec();
            msg.extend(random_bytes(4096));
            let _ = data.write_all(&msg);
            // Whatever the daemon sent after its features (P_PROTOCOL, ...) is read and
            // dropped; what matters is that it hangs up within the deadline.
            let mut closed = false;
            for _ in 0..8 {
                match nbd_raw::await_outcome(&mut data, REACTION) {
                    Outcome::Closed => {
                        closed = true;
                        break;
                    }
                    Outcome::Replied(_) => continue,
                    Outcome::Silent => break,
                }
            }
            assert!(
                closed,
                "the daemon kept a data socket that announced a 2 GiB packet"
            );
            nbd_raw::close(data);
            nbd_raw::close(meta);
        },
    );
}

// ---------------------------------------------------------------------------------------
// NBD TCP port (the Primary's export stays Connected to its peer throughout).

/// Runs `attack` (given alpha's NBD TCP address) and checks refusal + health.
fn nbd_attack(label: &str, what: &str, attack: impl FnOnce(SocketAddr)) {
    let mut c = connected_cluster(label);
    let addr = c.primary().nbd_addr().expect("nbd-listen configured");
    let offset = c.primary().log_len();
    attack(addr);
    let line = c.primary().wait_refusal(offset, what);
    eprintln!("alpha refused {what}: {line}");
    assert_survived(&mut c, what);
}

/// A connection in the transmission phase, after proving it works with one READ.
fn nbd_transmission(addr: SocketAddr) -> TcpStream {
    let mut s = nbd_raw::connect(addr).expect("connect to the NBD port");
    let size = nbd_raw::handshake_go(&mut s, "").expect("NBD handshake with NBD_OPT_GO");
    assert!(size >= 32 << 20, "export size {size}");
    nbd_raw::read_block(&mut s, 1).expect("a READ works before the attack");
    s
}

/// The daemon must not go on as if the request were valid: it closes the connection, or
/// answers with an error (and no data). Silence means it waits for more hostile bytes.
fn assert_refused(outcome: &Outcome, what: &str) {
    match outcome {
        Outcome::Closed => {}
        Outcome::Replied(bytes) => {
            let mut r = bytes.as_slice();
            match nbd_raw::read_simple_reply(&mut r) {
                Ok((error, _)) => assert_ne!(error, 0, "{what}: the server replied success"),
                Err(e) => panic!(
                    "{what}: the server answered {} bytes that are not an error reply: {e}",
                    bytes.len()
                ),
            }
        }
        Outcome::Silent => {
            panic!("{what}: the server neither answered nor closed within {REACTION:?}")
        }
    }
}

#[test]
fn nbd_random_bytes_before_handshake() {
    nbd_attack(
        "hostile-nbd-pre",
        "random bytes instead of the NBD handshake",
        |a| {
            let mut s = nbd_raw::connect(a).expect("connect");
            // Client flags with every unknown bit set, then junk.
            let mut junk = vec![0xff, 0xff, 0xff, 0xff];
            junk.extend(random_bytes(252));
            let _ = s.write_all(&junk);
            let out = nbd_raw::await_outcome(&mut s, REACTION);
            // The greeting may arrive first; what matters is that the server hangs up.
            let closed = match out {
                Outcome::Closed => true,
                Outcome::Replied(_) => {
                    matches!(nbd_raw::await_outcome(&mut s, REACTION), Outcome::Closed)
                }
                Outcome::Silent => false,
            };
            assert!(
                closed,
                "the server kept a connection whose handshake was garbage"
            );
        },
    );
}

#[test]
fn nbd_random_bytes_after_handshake() {
    nbd_attack(
        "hostile-nbd-post",
        "random bytes in the transmission phase",
        |a| {
            let mut s = nbd_transmission(a);
            let mut junk = vec![0xde, 0xad, 0xbe, 0xef];
            junk.extend(random_bytes(1020));
            let _ = s.write_all(&junk);
            let out = nbd_raw::await_outcome(&mut s, REACTION);
            assert_refused(&out, "random bytes after the handshake");
        },
    );
}

#[test]
fn nbd_request_with_bad_magic() {
    nbd_attack(
        "hostile-nbd-magic",
        "an NBD request with a bad magic",
        |a| {
            let mut s = nbd_transmission(a);
            let req = nbd_raw::request_with_magic(0x1234_5678, nbd_raw::CMD_READ, 2, 0, 4096);
            s.write_all(&req).expect("send request");
            let out = nbd_raw::await_outcome(&mut s, REACTION);
            assert_refused(&out, "a request with a bad magic");
        },
    );
}

#[test]
fn nbd_write_claiming_1gib() {
    nbd_attack("hostile-nbd-1g", "an NBD WRITE of length 1 GiB", |a| {
        let mut s = nbd_transmission(a);
        let req = nbd_raw::request(nbd_raw::CMD_WRITE, 3, 0, 1 << 30);
        s.write_all(&req).expect("send request");
        // Some payload, as a real client would start streaming it.
        let _ = s.write_all(&random_bytes(64 << 10));
        let out = nbd_raw::await_outcome(&mut s, REACTION);
        assert_refused(&out, "a 1 GiB WRITE");
    });
}

// ---------------------------------------------------------------------------------------
// Management socket.

#[test]
fn mgmt_bad_lines_get_errors_and_the_connection_stays_usable() {
    let mut c = connected_cluster("hostile-mgmt");
    let sock = c.primary().mgmt_socket().to_path_buf();
    let mut conn = MgmtConn::connect(&sock).expect("connect to the management socket");
    let attacks: [(&str, Vec<u8>); 4] = [
        ("a garbage line", b"this is not json".to_vec()),
        ("invalid JSON", br#"{"cmd": "status""#.to_vec()),
        ("an unknown command", br#"{"cmd":"self-destruct"}"#.to_vec()),
        (
            "binary junk (NUL, invalid UTF-8)",
            vec![0, 0xff, 0xfe, b'{', 0x80, 0, b'}'],
        ),
    ];
    for (what, mut line) in attacks {
        let offset = c.primary().log_len();
        line.push(b'\n');
        conn.send_raw(&line).expect("send a bad line");
        let reply = conn
            .read_line()
            .unwrap_or_else(|e| panic!("no reply to {what}: {e:#}"))
            .unwrap_or_else(|| panic!("the daemon closed the connection after {what}"));
        let v: serde_json::Value = serde_json::from_str(&reply)
            .unwrap_or_else(|e| panic!("reply to {what} is not JSON ({e}): {reply:?}"));
        assert_eq!(
            v.get("ok"),
            Some(&serde_json::Value::Bool(false)),
            "{what}: {v}"
        );
        assert!(
            v.get("error")
                .and_then(|e| e.as_str())
                .is_some_and(|e| !e.is_empty()),
            "{what}: the error reply must say what is wrong: {v}"
        );
        // The same connection still works.
        let st = conn
            .status()
            .unwrap_or_else(|e| panic!("status after {what}: {e:#}"));
        assert_eq!(st.str_at("/node"), "alpha");
        let line = c.primary().wait_refusal(offset, what);
        eprintln!("alpha refused {what}: {line}");
        assert_survived(&mut c, what);
    }
}

/// Whether `e` is a read/write deadline, i.e. the daemon stayed silent.
fn is_timeout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        })
    })
}

#[test]
fn mgmt_oversized_line_closes_only_that_connection() {
    let mut c = connected_cluster("hostile-mgmt-big");
    let sock = c.primary().mgmt_socket().to_path_buf();
    let offset = c.primary().log_len();
    let mut conn = MgmtConn::connect(&sock).expect("connect to the management socket");
    let mut line = vec![b'x'; 1 << 20];
    line.push(b'\n');
    // The daemon may close mid-send (EPIPE / reset): that is the expected refusal.
    let _ = conn.send_raw(&line);
    match conn.read_line() {
        Ok(None) => {}
        Err(e) => assert!(
            !is_timeout(&e),
            "the daemon neither answered nor closed after a 1 MiB line: {e:#}"
        ),
        Ok(Some(reply)) => {
            let v: serde_json::Value = serde_json::from_str(&reply).unwrap_or_default();
            assert_ne!(
                v.get("ok"),
                Some(&serde_json::Value::Bool(true)),
                "a 1 MiB line was accepted: {reply}"
            );
            // An error reply is fine as long as the connection is then closed.
            let next = conn.read_line();
            assert!(
                matches!(&next, Ok(None)) || next.as_ref().is_err_and(|e| !is_timeout(e)),
                "the connection stayed open after a 1 MiB line: {next:?}"
            );
        }
    }
    let line = c.primary().wait_refusal(offset, "a 1 MiB management line");
    eprintln!("alpha refused a 1 MiB line: {line}");
    // Other connections are unaffected.
    let st = MgmtConn::connect(&sock)
        .and_then(|mut m| m.status())
        .expect("a new connection answers status");
    assert_eq!(st.str_at("/role"), "Primary");
    assert_survived(&mut c, "a 1 MiB management line");
}
