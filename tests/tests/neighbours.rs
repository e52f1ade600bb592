//! Neighbours on the network (issue 10, item 6): whoever can reach a node's ports must not
//! be able to lock out the real peer or clients, make the log grow without bound, or make
//! the daemon's memory grow beyond its budget.
//!
//! Each test runs real daemons on 127.0.0.1 and real sockets; every attacker loop is
//! bounded in count and time. The bounds the tests rely on are the documented ones
//! (docs/operations.md "Limits"): squatters on the replication port are evicted (16
//! waiting sockets, 8 per source, the oldest goes), a silent accepted pair is replaced by
//! a newer one, repeated warnings are rate-limited (5 lines per call site per 10 s), a
//! permanently refused peer goes StandAlone with the reason in status, an idle NBD or
//! management client gives its slot to a new one, and NBD data in flight is bounded by a
//! budget shared by all connections (256 MiB by default).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_tests::drbd_raw::{self, P_INITIAL_DATA, P_INITIAL_META};
use tandem_tests::mgmt::MgmtConn;
use tandem_tests::nbd_raw;
use tandem_tests::{try_wait_until, Cluster, ClusterOpts, StatusExt};

/// Lines at warning level or above in `text`.
fn loud_lines(text: &str) -> usize {
    text.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .count()
}

/// True while the daemon has not closed `s`.
fn alive(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    let r = match s.peek(&mut b) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    };
    let _ = s.set_nonblocking(false);
    r
}

/// A squatter on a replication port until `stop` or `limit`: keeps 14 idle sockets open
/// (reopening those the daemon closes; two slots stay free so that its fake pairs get
/// in), opens a silent fake `P_INITIAL_DATA` / `P_INITIAL_META` pair every second (each
/// kept 15 s), and opens and closes up to 4000 sockets that send garbage (the log flood).
fn squat(addr: SocketAddr, stop: &AtomicBool, limit: Duration) -> usize {
    let started = Instant::now();
    let mut idle: Vec<TcpStream> = Vec::new();
    let mut fakes: Vec<(Instant, TcpStream, TcpStream)> = Vec::new();
    let mut last_fake: Option<Instant> = None;
    let mut churn = 0usize;
    let connect = || TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
        idle.retain(alive);
        while idle.len() < 14 {
            match connect() {
                Some(s) => idle.push(s),
                None => break,
            }
        }
        if last_fake.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_fake = Some(Instant::now());
            if let (Some(mut d), Some(mut m)) = (connect(), connect()) {
                let _ = d.write_all(&drbd_raw::h80(P_INITIAL_DATA, 0));
                let _ = m.write_all(&drbd_raw::h80(P_INITIAL_META, 0));
                fakes.push((Instant::now(), d, m));
            }
        }
        fakes.retain(|f| f.0.elapsed() < Duration::from_secs(15));
        for _ in 0..20 {
            if churn >= 4000 {
                break;
            }
            if let Some(mut s) = connect() {
                let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
                churn += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    churn
}

/// Idle sockets, fake `P_INITIAL` pairs and a flood of garbage connections on the
/// listening node's replication port: the real peer still connects, and the log stays
/// small.
#[test]
fn replication_squatters_do_not_keep_the_peer_out() {
    let mut c = Cluster::new(ClusterOpts::new("nb-repl"));
    c.wait_connected();
    // The node with the lower address only listens (the other connects to it).
    let victim = if c.node(0).address() < c.node(1).address() {
        0
    } else {
        1
    };
    let other = 1 - victim;
    c.node_mut(other).stop();
    c.node(victim)
        .wait_status(tandem_tests::CONNECT_TIMEOUT, "waiting for its peer", |s| {
            s.opt_str("/connection").is_some_and(|c| c != "Connected")
        });
    let addr = c.node(victim).address();
    let offset = c.node(victim).log_len();
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        std::thread::spawn(move || squat(addr, &stop, Duration::from_secs(40)))
    };
    std::thread::sleep(Duration::from_secs(2));
    c.node_mut(other).start();
    let t0 = Instant::now();
    // Well below the 10 s handshake timeout: a fake pair that holds the listener for its
    // handshake (as it did) keeps the peer out for at least that long, every time.
    let connected = try_wait_until(Duration::from_secs(6), || {
        c.node(victim)
            .try_status()
            .is_ok_and(|s| s.opt_str("/connection") == Some("Connected"))
    });
    let took = t0.elapsed();
    // The flood goes on for a while after the peer is in (refused as "already connected").
    while t0.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let churn = attacker.join().expect("attacker thread");
    let log = c.node(victim).log_since(offset);
    let loud = loud_lines(&log);
    eprintln!(
        "peer connected: {connected} after {took:?}; {churn} garbage connections; \
         {loud} warning lines, {} bytes of log",
        log.len()
    );
    assert!(
        connected,
        "the real peer did not connect within 6 s while squatters held the port\n{}",
        c.node(victim).log_report()
    );
    assert!(
        loud <= 150,
        "{loud} warning lines during the attack ({churn} garbage connections): not \
         rate-limited\n{}",
        c.node(victim).log_tail(40)
    );
    if churn > 1000 {
        assert!(
            log.contains("more like it"),
            "a rate-limited line says how many were left out"
        );
    }
    c.wait_connected();
}

/// A peer whose disk is smaller: the node refuses it once, goes StandAlone with the
/// reason in status, and neither log fills up.
#[test]
fn refused_peer_goes_standalone_with_the_reason() {
    let mut c = Cluster::new(ClusterOpts::new("nb-size").autostart(false));
    // No `size` in the config (it would refuse the small disk at start): alpha gets a
    // 64 MiB disk, beta 32 MiB, each with fresh (Inconsistent) metadata, both Secondary.
    let config: String = c
        .config_text()
        .lines()
        .filter(|l| !l.starts_with("size = "))
        .map(|l| l.replace(r#"role = "primary""#, r#"role = "secondary""#) + "\n")
        .collect();
    std::fs::write(c.config_path(), config).expect("rewrite config");
    for (i, mib) in [(0, 64u64), (1, 32)] {
        let disk = c.node(i).disk().to_path_buf();
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(mib << 20))
            .expect("create a disk");
        let out = tandem_tests::tools::run_cmd(
            std::process::Command::new(tandem_tests::tandem_bin())
                .arg("create-md")
                .arg(&disk),
            Duration::from_secs(30),
            "tandem create-md",
        )
        .expect("run tandem create-md");
        out.assert_success("tandem create-md");
    }
    c.start_all();
    let st = c.node(0).wait_status(
        Duration::from_secs(20),
        "StandAlone with a connection_error about the size",
        |s| {
            s.opt_str("/connection") == Some("StandAlone")
                && s.opt_str("/connection_error")
                    .is_some_and(|e| e.contains("sectors"))
        },
    );
    eprintln!("alpha: {}", st["connection_error"]);
    assert!(st.opt_u64("/connection_error_at").is_some(), "{st}");
    let offsets = [c.node(0).log_len(), c.node(1).log_len()];
    std::thread::sleep(Duration::from_secs(10));
    let alpha = loud_lines(&c.node(0).log_since(offsets[0]));
    let beta = loud_lines(&c.node(1).log_since(offsets[1]));
    eprintln!("warning lines in 10 s: alpha {alpha}, beta {beta}");
    assert!(
        alpha <= 2,
        "alpha logged {alpha} warnings in 10 s\n{}",
        c.node(0).log_tail(30)
    );
    assert!(
        beta <= 8,
        "beta logged {beta} warnings in 10 s\n{}",
        c.node(1).log_tail(30)
    );
    let st = c.node(0).status();
    assert_eq!(st.str_at("/connection"), "StandAlone", "{st}");
    let b = c.node(1).status();
    assert!(
        b.opt_str("/connection_error").is_some(),
        "beta says why it is not connected: {b}"
    );
}

/// Appends an `[nbd]` section to the cluster's config (before the nodes start).
fn nbd_section(c: &Cluster, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(c.config_path())
        .expect("open config");
    writeln!(f, "\n[nbd]\n{text}").expect("append [nbd]");
}

/// One NBD client that completes the handshake and reads the first block.
fn nbd_client_reads(addr: SocketAddr) -> anyhow::Result<()> {
    let mut s = nbd_raw::connect(addr)?;
    nbd_raw::handshake_go(&mut s, "r0")?;
    nbd_raw::read_block(&mut s, 7)?;
    Ok(())
}

/// 64 idle NBD clients on the TCP export: a new client is served once they have been idle
/// for `idle-timeout` (2 s here).
#[test]
fn idle_nbd_clients_do_not_lock_out_the_export() {
    let mut c = Cluster::new(
        ClusterOpts::new("nb-nbd-idle")
            .nbd_tcp(true)
            .autostart(false),
    );
    nbd_section(&c, "idle-timeout = 2");
    c.start_all();
    c.wait_connected();
    let addr = c.primary().nbd_addr().expect("TCP export");
    let mut squatters = Vec::new();
    for _ in 0..64 {
        if let Ok(mut s) = nbd_raw::connect(addr) {
            if nbd_raw::handshake_go(&mut s, "r0").is_ok() {
                squatters.push(s);
            }
        }
    }
    eprintln!("{} idle clients hold the export", squatters.len());
    let t0 = Instant::now();
    let mut last = String::new();
    let served = try_wait_until(Duration::from_secs(12), || match nbd_client_reads(addr) {
        Ok(()) => true,
        Err(e) => {
            last = format!("{e:#}");
            false
        }
    });
    eprintln!("new client served: {served} after {:?}", t0.elapsed());
    assert!(
        served,
        "a new NBD client was not served within 12 s (idle-timeout 2 s): {last}\n{}",
        c.primary().log_tail(20)
    );
    drop(squatters);
}

/// The daemon's resident memory, KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// 16 NBD clients each ask for four 32 MiB READs and read no reply: the daemon's memory
/// stays within the shared budget (256 MiB) plus a margin, not 16 × 64 MiB, and falls
/// back once they are gone.
#[test]
fn unread_nbd_replies_stay_within_the_shared_budget() {
    let mut c = Cluster::new(ClusterOpts::new("nb-nbd-mem").nbd_tcp(true));
    c.wait_connected();
    let pid = c.primary_mut().pid().expect("primary runs");
    let addr = c.primary().nbd_addr().expect("TCP export");
    let base = rss_kib(pid);
    let mut clients = Vec::new();
    for i in 0..16u64 {
        let mut s = nbd_raw::connect(addr).expect("connect");
        nbd_raw::handshake_go(&mut s, "r0").expect("handshake");
        for j in 0..4u64 {
            let offset = (j % 2) * (32 << 20);
            s.write_all(&nbd_raw::request(0, i * 4 + j, offset, 32 << 20))
                .expect("send READ");
        }
        clients.push(s);
    }
    // Let the reads run into the full sockets; watch the peak.
    let mut peak = base;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let grown_mib = peak.saturating_sub(base) / 1024;
    eprintln!(
        "RSS before {} MiB, peak {} MiB (+{grown_mib} MiB)",
        base / 1024,
        peak / 1024
    );
    // Read a little from one client: the daemon is still serving.
    let mut b = [0u8; 16];
    clients[0].read_exact(&mut b).expect("a reply starts");
    drop(clients);
    let mut after = rss_kib(pid);
    let fell = try_wait_until(Duration::from_secs(10), || {
        after = rss_kib(pid);
        after.saturating_sub(base) < 96 << 10
    });
    eprintln!("RSS after the clients left: {} MiB", after / 1024);
    assert!(
        grown_mib < 256 + 128,
        "RSS grew by {grown_mib} MiB with 16 slow readers (budget 256 MiB)"
    );
    assert!(
        fell,
        "RSS stayed at {} MiB after the clients left (before: {} MiB)",
        after / 1024,
        base / 1024
    );
    tandem_tests::tools::nbd_roundtrip(&c.primary().nbd_unix_uri(), 0);
}

/// 32 idle management clients: `status` still answers at once (the client idle longest
/// gives its slot).
#[test]
fn idle_mgmt_clients_do_not_lock_out_status() {
    let c = Cluster::new(ClusterOpts::new("nb-mgmt"));
    let sock: &Path = c.primary().mgmt_socket();
    let _ = c.primary().status();
    let squatters: Vec<MgmtConn> = (0..32)
        .map(|_| MgmtConn::connect(sock).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let mut last = String::new();
    let ok = try_wait_until(Duration::from_secs(5), || match c.primary().try_status() {
        Ok(_) => true,
        Err(e) => {
            last = format!("{e:#}");
            false
        }
    });
    eprintln!("status answered: {ok} after {:?}", t0.elapsed());
    assert!(
        ok,
        "status not answered within 5 s with 32 idle clients: {last}"
    );
    drop(squatters);
}
