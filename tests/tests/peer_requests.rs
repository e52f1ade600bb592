//! A peer's cluster-wide state change requests, as a kernel DRBD 8.4 node sends them
//! (issue 10): a scripted peer built from the engine's own codec and handshake does the
//! 8.4 handshake with a real `tandem` node, then sends `P_STATE_CHG_REQ` /
//! `P_CONN_ST_CHG_REQ` and reads the `P_STATE_CHG_REPLY` codes; it also answers the
//! node's own promotion request. The node plays `beta`; the script plays `alpha`. The same
//! script checks handshake decisions a kernel peer relies on: DRBD's UUID corrections of
//! a missed end of resync (rule 34) and of a lost `P_SYNC_UUID` (rule 71), on metadata
//! that `drbdmeta set-gi` wrote.

use std::time::Duration;
use tandem_engine::net::handshake::{self, LocalParams};
use tandem_engine::resync::RateConfig;
use tandem_engine::state::change::{promote_request, StateRv};
use tandem_engine::state::uuid::{HandshakeSide, SplitBrainPolicy, UuidSet, UUID_JUST_CREATED};
use tandem_engine::state::{ConnState, DiskState, Protocol, Role};
use tandem_engine::wire::{self, Command, Header, Packet, ReqState, StateBits, WireCtx};
use tandem_tests::loopdev::tandem;
use tandem_tests::{Cluster, ClusterOpts, StatusExt, CONNECT_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every read of the script.
const IO: Duration = Duration::from_secs(20);

struct Peer {
    data: TcpStream,
    meta: TcpStream,
    ctx: WireCtx,
}

async fn send(s: &mut TcpStream, ctx: &WireCtx, pkt: &Packet) {
    let mut out = Vec::new();
    wire::encode(pkt, ctx, 0, &mut out).expect("encode");
    s.write_all(&out).await.expect("send");
}

/// The next packet on `s` (data parts are read and dropped).
async fn recv(s: &mut TcpStream, ctx: &WireCtx) -> Packet {
    let read = async {
        let mut h = vec![0u8; ctx.header_len()];
        s.read_exact(&mut h).await.expect("header");
        let hdr = Header::decode(&h, ctx).expect("header decodes");
        let layout = wire::payload_layout(&hdr, ctx).expect("layout");
        let mut head = vec![0u8; layout.head];
        s.read_exact(&mut head).await.expect("payload");
        let mut data = vec![0u8; layout.data];
        s.read_exact(&mut data).await.expect("data");
        wire::decode(&hdr, &head, ctx).expect("packet decodes")
    };
    tokio::time::timeout(IO, read)
        .await
        .expect("a packet in time")
}

/// The next reply on the meta socket, answering pings on the way.
async fn reply(p: &mut Peer) -> i32 {
    loop {
        match recv(&mut p.meta, &p.ctx).await {
            Packet::ReqStateReply { retcode, .. } => return retcode,
            Packet::Empty(Command::P_PING) => {
                let ctx = p.ctx;
                send(&mut p.meta, &ctx, &Packet::Empty(Command::P_PING_ACK)).await;
            }
            _ => {}
        }
    }
}

fn state_word(role: Role, conn: ConnState, disk: DiskState) -> u32 {
    let b = |v: u32| u8::try_from(v).unwrap_or(0);
    StateBits {
        role: b(role.as_u32()),
        conn: b(conn.as_u32()),
        disk: b(disk.as_u32()),
        ..StateBits::default()
    }
    .pack()
    .expect("state word")
}

/// Connects to `port` as the active node and does the 8.4 handshake as a Secondary with
/// a `disk` of `sectors` and generation `uuids`.
async fn connect(port: u16, sectors: u64, disk: DiskState, uuids: UuidSet) -> Peer {
    let pre = WireCtx::pre_features();
    let mut data = TcpStream::connect(("127.0.0.1", port)).await.expect("data");
    send(&mut data, &pre, &Packet::Empty(Command::P_INITIAL_DATA)).await;
    let mut meta = TcpStream::connect(("127.0.0.1", port)).await.expect("meta");
    send(&mut meta, &pre, &Packet::Empty(Command::P_INITIAL_META)).await;
    let local = LocalParams {
        protocol: Protocol::C,
        size_sectors: sectors,
        side: HandshakeSide {
            uuids,
            dirty_bits: 0,
            primary: false,
            disk,
            crashed_primary: false,
            discard_my_data: false,
        },
        resolve_conflicts: false,
        policy: SplitBrainPolicy::default(),
        csums: false,
        verify: false,
        rate: RateConfig::TANDEM,
    };
    let params = tokio::time::timeout(IO, handshake::run(&mut data, local))
        .await
        .expect("handshake in time")
        .expect("handshake");
    Peer {
        data,
        meta,
        ctx: params.ctx,
    }
}

async fn request(p: &mut Peer, cmd: Command, mask: u32, val: u32) -> i32 {
    let ctx = p.ctx;
    send(
        &mut p.data,
        &ctx,
        &Packet::ReqState {
            cmd,
            req: ReqState { mask, val },
        },
    )
    .await;
    reply(p).await
}

/// Whether the node closes `s` (reads until EOF or an error) within [`IO`].
async fn closed_in_time(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(IO, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// beta's size in sectors and port, and a runtime for the script.
fn script_for(c: &Cluster) -> (u64, u16, tokio::runtime::Runtime) {
    let sectors = c.node(1).status().u64_at("/size_bytes") / 512;
    let port = c.node(1).address().port();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (sectors, port, rt)
}

/// `current:bitmap:history0:history1` in hex, as status shows the UUIDs.
fn parse_uuids(s: &str) -> UuidSet {
    let v: Vec<u64> = s
        .split(':')
        .map(|x| u64::from_str_radix(x, 16).expect("hex UUID"))
        .collect();
    assert_eq!(v.len(), 4, "{s}");
    UuidSet {
        current: v[0],
        bitmap: v[1],
        history: [v[2], v[3]],
    }
}

fn conn_request(c: ConnState) -> (u32, u32) {
    let mask = StateBits {
        conn: 0x1f,
        ..StateBits::default()
    };
    let val = StateBits {
        conn: u8::try_from(c.as_u32()).unwrap_or(0),
        ..StateBits::default()
    };
    (mask.pack().expect("mask"), val.pack().expect("val"))
}

#[test]
fn a_kernel_style_peer_s_state_change_requests_are_answered_with_drbd_s_codes() {
    let mut c = Cluster::new(ClusterOpts::new("peer-requests").autostart(false));
    c.node_mut(1).start();
    let (sectors, port, rt) = script_for(&c);
    let sock = c.node(1).mgmt_socket().to_string_lossy().into_owned();
    rt.block_on(async {
        let fresh = UuidSet::JUST_CREATED;
        // An UpToDate just-created disk, like beta's: Connected, no resync.
        let mut p = connect(port, sectors, DiskState::UpToDate, fresh).await;
        c.node(1).wait_connected();

        // The peer's promotion: granted; beta now counts it as Primary and refuses its
        // own promotion locally.
        let (mask, val) = promote_request(false);
        let rv = request(&mut p, Command::P_STATE_CHG_REQ, mask, val).await;
        assert_eq!(StateRv::from_code(rv), StateRv::Success);
        c.node(1).wait_status(CONNECT_TIMEOUT, "peer Primary", |s| {
            s.opt_str("/peer/role") == Some("Primary")
        });
        tandem(&["primary", "--socket", &sock])
            .assert_refused("beta's promotion next to a Primary peer", &[]);

        // The peer demotes (its P_STATE says so); beta's own promotion now asks the
        // script, which refuses it: beta stays Secondary and says why.
        let ctx = p.ctx;
        let word = state_word(Role::Secondary, ConnState::Connected, DiskState::UpToDate);
        send(&mut p.data, &ctx, &Packet::State(word)).await;
        c.node(1)
            .wait_status(CONNECT_TIMEOUT, "peer Secondary", |s| {
                s.opt_str("/peer/role") == Some("Secondary")
            });
        let sock2 = sock.clone();
        let promote = std::thread::spawn(move || tandem(&["primary", "--socket", &sock2]));
        let asked = loop {
            match recv(&mut p.data, &ctx).await {
                Packet::ReqState { cmd, req } => break (cmd, req),
                _ => continue,
            }
        };
        assert_eq!(asked.0, Command::P_STATE_CHG_REQ);
        assert_eq!((asked.1.mask, asked.1.val), promote_request(false));
        send(
            &mut p.meta,
            &ctx,
            &Packet::ReqStateReply {
                cmd: Command::P_STATE_CHG_REPLY,
                retcode: StateRv::TwoPrimaries.code(),
            },
        )
        .await;
        promote.join().expect("thread").assert_refused(
            "promotion against the peer's refusal",
            &["Multiple primaries"],
        );
        assert_eq!(c.node(1).status().str_at("/role"), "Secondary");

        // Asked again, the script grants it: beta is Primary; the script's own
        // promotion is then refused with SS_TWO_PRIMARIES.
        let sock2 = sock.clone();
        let promote = std::thread::spawn(move || tandem(&["primary", "--socket", &sock2]));
        loop {
            if let Packet::ReqState { .. } = recv(&mut p.data, &ctx).await {
                break;
            }
        }
        send(
            &mut p.meta,
            &ctx,
            &Packet::ReqStateReply {
                cmd: Command::P_STATE_CHG_REPLY,
                retcode: StateRv::Success.code(),
            },
        )
        .await;
        promote
            .join()
            .expect("thread")
            .assert_success("promotion granted");
        assert_eq!(c.node(1).status().str_at("/role"), "Primary");
        let rv = request(&mut p, Command::P_STATE_CHG_REQ, mask, val).await;
        assert_eq!(StateRv::from_code(rv), StateRv::TwoPrimaries);
        // An online verify request is fine; an invalidate-remote of a Primary is not.
        let (m, v) = conn_request(ConnState::VerifyS);
        assert_eq!(
            StateRv::from_code(request(&mut p, Command::P_CONN_ST_CHG_REQ, m, v).await),
            StateRv::Success
        );
        let (m, v) = conn_request(ConnState::StartingSyncS);
        assert_eq!(
            StateRv::from_code(request(&mut p, Command::P_STATE_CHG_REQ, m, v).await),
            StateRv::NotSupported
        );
        tandem(&["secondary", "--socket", &sock]).assert_success("demote beta");

        // The peer's invalidate-remote (StartingSyncS there): beta becomes the target of
        // a full resync: granted, then every block is out of sync, the disk Inconsistent,
        // and the connection is renewed (the handshake runs the resync).
        let rv = request(&mut p, Command::P_STATE_CHG_REQ, m, v).await;
        assert_eq!(StateRv::from_code(rv), StateRv::Success);
        let st = c
            .node(1)
            .wait_status(CONNECT_TIMEOUT, "beta invalidated", |s| {
                s.opt_str("/disk") == Some("Inconsistent")
            });
        assert_eq!(
            st.u64_at("/out_of_sync_bytes"),
            st.u64_at("/size_bytes"),
            "{st}"
        );
        // The renewal closes the script's sockets.
        let closed = closed_in_time(&mut p.data).await;
        assert!(closed, "the connection was not renewed");

        // The peer comes back with beta's generation and an Inconsistent disk (a pair
        // that never synced): Connected, no resync. Its forced promotion is granted and
        // declares its disk UpToDate: beta renews the connection for the resync.
        let uuids = parse_uuids(c.node(1).status().str_at("/uuids"));
        let mut p = connect(port, sectors, DiskState::Inconsistent, uuids).await;
        let st = c.node(1).wait_connected();
        assert_eq!(st.str_at("/disk"), "Inconsistent", "{st}");
        let (mask, val) = promote_request(true);
        let rv = request(&mut p, Command::P_STATE_CHG_REQ, mask, val).await;
        assert_eq!(StateRv::from_code(rv), StateRv::Success);
        let closed = closed_in_time(&mut p.data).await;
        assert!(closed, "no renewal for the resync after a forced promotion");
        let log = c.node(1).log_tail(40);
        assert!(log.contains("resync with this node is due"), "{log}");
    });
    c.node_mut(1).stop();
}

/// `P_OUT_OF_SYNC` on a live connection, as a kernel peer in DRBD's Ahead mode sends it
/// instead of a write: beta marks the range, as DRBD's `receive_out_of_sync` does, and
/// stays connected (before, it dropped the connection as for an unknown packet); a range
/// past the end of the volume is the peer's protocol error.
#[test]
fn out_of_sync_on_a_live_connection_is_marked() {
    let mut c = Cluster::new(ClusterOpts::new("peer-oos").autostart(false));
    c.node_mut(1).start();
    let (sectors, port, rt) = script_for(&c);
    rt.block_on(async {
        let fresh = UuidSet::JUST_CREATED;
        let mut p = connect(port, sectors, DiskState::UpToDate, fresh).await;
        c.node(1).wait_connected();
        let ctx = p.ctx;
        let oos = |sector, blksize| Packet::BlockDesc {
            cmd: Command::P_OUT_OF_SYNC,
            desc: wire::BlockDesc {
                sector,
                blksize,
                pad: 0,
            },
        };
        send(&mut p.data, &ctx, &oos(8, 8192)).await;
        c.node(1)
            .wait_status(CONNECT_TIMEOUT, "two blocks out of sync", |s| {
                s.opt_u64("/out_of_sync_bytes") == Some(8192)
            });
        assert_eq!(c.node(1).status().str_at("/connection"), "Connected");
        send(&mut p.data, &ctx, &oos(sectors, 4096)).await;
        assert!(
            closed_in_time(&mut p.data).await,
            "a range past the end must drop the connection"
        );
    });
    let log = c.node(1).log_tail(40);
    assert!(log.contains("P_OUT_OF_SYNC at sector 8"), "{log}");
}

/// The next `P_STATE` on the data socket (other packets are skipped).
async fn next_state(p: &mut Peer) -> StateBits {
    loop {
        if let Packet::State(word) = recv(&mut p.data, &p.ctx).await {
            return StateBits::unpack(word);
        }
    }
}

/// Starts beta on metadata from `tandem create-md` (what an operator prepares a device
/// with): a just-created, Inconsistent disk.
fn start_inconsistent_beta(c: &mut Cluster) {
    c.node_mut(1).start();
    c.node_mut(1).stop();
    let disk = c.node(1).disk().to_string_lossy().into_owned();
    tandem(&["create-md", &disk, "--force"]).assert_success("tandem create-md");
    c.node_mut(1).start();
    assert_eq!(c.node(1).status().str_at("/disk"), "Inconsistent");
}

/// `new-current-uuid --clear-bitmap` on a connected pair whose metadata was just created
/// skips the initial sync: beta and the script both Inconsistent, beta starts the pair's
/// first generation, sends it in `P_UUIDS` with the skip-initial-sync flag (8), then a
/// `P_STATE` with both disks UpToDate. Without the flag, a connected node refuses a new
/// generation, and the skip is refused once the metadata is no longer just created.
#[test]
fn new_current_uuid_clear_bitmap_skips_the_initial_sync_of_a_new_pair() {
    let mut c = Cluster::new(ClusterOpts::new("skip-sync").autostart(false));
    start_inconsistent_beta(&mut c);
    let (sectors, port, rt) = script_for(&c);
    let sock = c.node(1).mgmt_socket().to_string_lossy().into_owned();
    rt.block_on(async {
        let fresh = UuidSet::JUST_CREATED;
        let mut p = connect(port, sectors, DiskState::Inconsistent, fresh).await;
        c.node(1).wait_connected();
        tandem(&["new-current-uuid", "--socket", &sock])
            .assert_refused("a new generation while connected", &["StandAlone"]);
        tandem(&["new-current-uuid", "--clear-bitmap", "--socket", &sock])
            .assert_success("skip the initial sync");
        let announced = loop {
            if let Packet::Uuids(u) = recv(&mut p.data, &p.ctx).await {
                break u;
            }
        };
        assert_eq!(
            announced.uuid_flags & wire::uuid_flags::UUID_FLAG_SKIP_INITIAL_SYNC,
            wire::uuid_flags::UUID_FLAG_SKIP_INITIAL_SYNC,
            "{announced:?}"
        );
        assert_ne!(announced.current & !1, UUID_JUST_CREATED);
        let state = next_state(&mut p).await;
        let up = u8::try_from(DiskState::UpToDate.as_u32()).unwrap_or(0);
        assert_eq!((state.disk, state.pdsk), (up, up), "{state:?}");
        let st = c.node(1).status();
        assert_eq!(parse_uuids(st.str_at("/uuids")).current, announced.current);
        assert_eq!(st.u64_at("/out_of_sync_bytes"), 0, "{st}");
        assert_eq!(st.str_at("/disk"), "UpToDate", "{st}");
        assert_eq!(st.str_at("/peer/disk"), "UpToDate", "{st}");
        tandem(&["new-current-uuid", "--clear-bitmap", "--socket", &sock])
            .assert_refused("a second skip", &["just created"]);
    });
    c.node_mut(1).stop();
}

/// The peer's side of a skipped initial sync: a just-created, Inconsistent beta adopts
/// the generation of a `P_UUIDS` with flag 8 (and ignores one without it): both disks
/// are UpToDate, which its `P_STATE` says once that is durable.
#[test]
fn a_peer_s_skipped_initial_sync_is_adopted() {
    let mut c = Cluster::new(ClusterOpts::new("skip-sync-peer").autostart(false));
    start_inconsistent_beta(&mut c);
    let (sectors, port, rt) = script_for(&c);
    rt.block_on(async {
        let fresh = UuidSet::JUST_CREATED;
        let mut p = connect(port, sectors, DiskState::Inconsistent, fresh).await;
        c.node(1).wait_connected();
        let ctx = p.ctx;
        let uuids = |current: u64, uuid_flags: u64| {
            Packet::Uuids(wire::Uuids {
                current,
                bitmap: 0,
                history: [0, 0],
                dirty_bits: 0,
                uuid_flags,
            })
        };
        // Without the flag: ignored outside the handshake.
        send(&mut p.data, &ctx, &uuids(0xAB00_0000_0000_0000, 0)).await;
        let skip = wire::uuid_flags::UUID_FLAG_SKIP_INITIAL_SYNC;
        send(&mut p.data, &ctx, &uuids(0xCD00_0000_0000_0000, skip)).await;
        let up = u8::try_from(DiskState::UpToDate.as_u32()).unwrap_or(0);
        loop {
            let state = next_state(&mut p).await;
            if state.pdsk == up {
                assert_eq!(state.disk, up, "{state:?}");
                break;
            }
        }
        let st = c.node(1).status();
        assert_eq!(
            parse_uuids(st.str_at("/uuids")).current & !1,
            0xCD00_0000_0000_0000,
            "{st}"
        );
        assert_eq!(st.str_at("/disk"), "UpToDate", "{st}");
        assert_eq!(st.str_at("/peer/disk"), "UpToDate", "{st}");
        assert_eq!(st.u64_at("/out_of_sync_bytes"), 0, "{st}");
    });
    c.node_mut(1).stop();
}

/// Writes `uuids` into beta's metadata with `drbdmeta set-gi` (peer slot 0, alpha;
/// consistent, was UpToDate, activity log clean), starts beta, connects the script as an
/// UpToDate Secondary alpha with `alpha`, does the bitmap exchange (beta is SyncSource)
/// and returns the `P_SYNC_UUID` beta sends, with the tail of beta's log.
fn sync_uuid_from(name: &str, uuids: UuidSet, alpha: UuidSet) -> (u64, String) {
    let mut c = Cluster::new(ClusterOpts::new(name).autostart(false));
    c.node_mut(1).start();
    c.node_mut(1).stop();
    let disk = c.node(1).disk().to_string_lossy().into_owned();
    tandem(&["create-md", &disk, "--force"]).assert_success("tandem create-md");
    let minor = tandem_tests::loopdev::Minor::new();
    let [h0, h1] = uuids.history;
    let gi = format!(
        "{:X}:{:X}:{h0:X}:{h1:X}:1:1:0:0:1:0:0:0",
        uuids.current, uuids.bitmap
    );
    tandem_tests::loopdev::drbdmeta(&minor, &disk, "internal", &["set-gi", "--node-id=0", &gi])
        .assert_success("drbdmeta set-gi");
    c.node_mut(1).start();
    let st = c.node(1).status();
    assert_eq!(st.str_at("/disk"), "UpToDate", "{st}");
    assert_eq!(parse_uuids(st.str_at("/uuids")), uuids, "{st}");
    let (sectors, port, rt) = script_for(&c);
    let sync_uuid = rt.block_on(async {
        let mut p = connect(port, sectors, DiskState::UpToDate, alpha).await;
        // beta's bitmap comes first, then alpha's (empty) one, then P_SYNC_UUID.
        let ctx = p.ctx;
        let bits = sectors / 8;
        let words = vec![0u64; usize::try_from(bits.div_ceil(64)).expect("words")];
        let mut tx = wire::BitmapSender::new(&words, bits, &ctx, true).expect("sender");
        while let Some(pkt) = tx.next_packet() {
            send(&mut p.data, &ctx, &pkt).await;
        }
        loop {
            if let Packet::SyncUuid(u) = recv(&mut p.data, &ctx).await {
                break u;
            }
        }
    });
    let log = c.node(1).log_tail(40);
    c.node_mut(1).stop();
    (sync_uuid, log)
}

/// DRBD's rule 34 on a live daemon: beta (the SyncSource) missed the end of the last
/// resync — its bitmap UUID is still set, and the peer already rotated it into history.
/// The handshake corrects beta's UUIDs first (as a kernel DRBD node does), so the run's
/// `P_SYNC_UUID` is a new one, not the stale bitmap UUID + 2^48, and beta logs DRBD's line.
/// Before the correction moved into `replica::Node::agree`, the daemon ignored it.
#[test]
fn a_missed_end_of_resync_is_corrected_before_the_sync_uuid() {
    const A: u64 = 0xA000_0000_0000_0000;
    const B: u64 = 0xB000_0000_0000_0000;
    const C: u64 = 0xC000_0000_0000_0000;
    let beta = UuidSet {
        current: A,
        bitmap: B,
        history: [C, 0],
    };
    // alpha finished the resync: B rotated into its history.
    let alpha = UuidSet {
        current: A,
        bitmap: 0,
        history: [B, C],
    };
    let (sync_uuid, log) = sync_uuid_from("rule-34", beta, alpha);
    assert_ne!(
        sync_uuid,
        B + (1 << 48),
        "the stale bitmap UUID was not corrected"
    );
    assert!(
        log.contains("missed the resync finished event, corrected myself"),
        "{log}"
    );
}

/// DRBD's rule 71 on a live daemon: beta's last `P_SYNC_UUID` (its history generation
/// plus 2^48, now its bitmap UUID) never reached alpha, which is still at that history
/// generation. The correction takes the sync UUID back (bitmap ← history\[0\]), so this
/// run's sync UUID is that generation plus 2^48 again, not plus 2^49 as the old daemon
/// sent.
#[test]
fn a_lost_sync_uuid_is_taken_back_before_the_next_one() {
    const P: u64 = 0xD000_0000_0000_0000;
    const X: u64 = 0xE000_0000_0000_0000;
    let beta = UuidSet {
        current: X,
        bitmap: P + (1 << 48),
        history: [P, 0],
    };
    let alpha = UuidSet {
        current: P,
        bitmap: 0,
        history: [0, 0],
    };
    let (sync_uuid, log) = sync_uuid_from("rule-71", beta, alpha);
    assert_eq!(
        sync_uuid,
        P + (1 << 48),
        "the lost sync UUID was not taken back"
    );
    assert!(
        log.contains("did not get through, corrected myself"),
        "{log}"
    );
}
