//! The sync decision against the kernel's: `tests/data/drbd84-captures/` holds real
//! exchanges between two kernel DRBD 8.4.11 resources (see the README there). For every
//! handshake in them this test takes both sides' `P_UUIDS` and `P_STATE`, runs
//! `uuid_compare` and `sync_handshake` from each side's point of view, and checks the
//! result against the connection state the kernel then announced (`WFBitMapS`,
//! `WFBitMapT` or `Connected`) and, for a SyncSource, against the `P_SYNC_UUID` it sent.
//! It also replays the resources' UUID life cycle across the captures: the UUIDs the
//! model computes after the initial full sync and a disconnect must be the ones the
//! kernel sent at the next connection.

mod capture;

use tandem_engine::state::uuid::{
    sync_handshake, AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, Handshake, HandshakeCtx,
    HandshakeOutcome, HandshakeSide, SplitBrainPolicy, UuidPacket, UuidSet, UUID_JUST_CREATED,
    UUID_NEW_BM_OFFSET,
};
use tandem_engine::state::{ConnState, DiskState};
use tandem_engine::wire::{ff, Command, Packet, StateBits, WireCtx};

// ---------------------------------------------------------------------------------------
// The captures, read, reassembled and decoded by the shared `capture/` module.

/// The packets of one direction of a capture, in order.
struct Direction {
    sport: u16,
    dport: u16,
    /// The first packet, if the stream was captured from its SYN.
    first: Option<Command>,
    packets: Vec<Packet>,
}

impl Direction {
    fn uuids(&self) -> Vec<UuidPacket> {
        self.packets
            .iter()
            .filter_map(|p| match p {
                Packet::Uuids(u) => Some(UuidPacket::from(*u)),
                _ => None,
            })
            .collect()
    }

    fn states(&self) -> Vec<StateBits> {
        self.packets
            .iter()
            .filter_map(|p| match p {
                Packet::State(w) => Some(StateBits::unpack(*w)),
                _ => None,
            })
            .collect()
    }

    fn sync_uuids(&self) -> Vec<u64> {
        self.packets
            .iter()
            .filter_map(|p| match p {
                Packet::SyncUuid(u) => Some(*u),
                _ => None,
            })
            .collect()
    }

    /// The after-sb policies this side announced in `P_PROTOCOL`.
    fn policy(&self) -> SplitBrainPolicy {
        let p = self
            .packets
            .iter()
            .find_map(|p| match p {
                Packet::Protocol { protocol, .. } => Some(protocol.clone()),
                _ => None,
            })
            .expect("P_PROTOCOL");
        SplitBrainPolicy {
            after_sb_0pri: AfterSb0Pri::from_wire(p.after_sb_0p).expect("after-sb-0pri"),
            after_sb_1pri: AfterSb1Pri::from_wire(p.after_sb_1p).expect("after-sb-1pri"),
            after_sb_2pri: AfterSb2Pri::from_wire(p.after_sb_2p).expect("after-sb-2pri"),
            ..SplitBrainPolicy::default()
        }
    }
}

struct Capture {
    name: &'static str,
    agreed: WireCtx,
    dirs: Vec<Direction>,
}

impl Capture {
    fn dir(&self, sport: u16, dport: u16) -> &Direction {
        self.dirs
            .iter()
            .find(|d| d.sport == sport && d.dport == dport)
            .unwrap_or_else(|| panic!("{}: no stream {sport}->{dport}", self.name))
    }

    /// The listening port of the node that accepted the (one) meta socket captured from
    /// its start: that node received `P_INITIAL_META` and holds RESOLVE_CONFLICTS.
    fn meta_acceptor(&self) -> u16 {
        let metas: Vec<&Direction> = self
            .dirs
            .iter()
            .filter(|d| d.first == Some(Command::P_INITIAL_META))
            .collect();
        assert_eq!(metas.len(), 1, "{}: one meta socket captured", self.name);
        metas[0].dport
    }

    fn ctx(&self, resolve_conflicts: bool) -> HandshakeCtx {
        HandshakeCtx {
            agreed_version: self.agreed.version(),
            wsame: self.agreed.has(ff::DRBD_FF_WSAME),
            resolve_conflicts,
        }
    }
}

/// Loads a capture with the shared decoder (which checks every byte of every stream)
/// and groups its packets by direction, in the order the streams were first seen.
fn load(name: &'static str) -> Capture {
    let cap = capture::load(name);
    let mut dirs = Vec::new();
    for s in &cap.streams {
        let label = s.label();
        let mut decoded = cap.packets.iter().filter(|p| p.stream == label).peekable();
        // The first packet counts only if the stream was captured from its SYN.
        let first = decoded
            .peek()
            .filter(|_| s.from_start)
            .map(|p| p.header.command);
        let packets: Vec<Packet> = decoded.map(|p| p.packet.clone()).collect();
        if packets.is_empty() {
            continue;
        }
        dirs.push(Direction {
            sport: s.src.1,
            dport: s.dst.1,
            first,
            packets,
        });
    }
    Capture {
        name,
        agreed: cap.agreed,
        dirs,
    }
}

// ---------------------------------------------------------------------------------------
// The decisions

/// A node as its own `P_UUIDS` and `P_STATE` describe it: what it decides with, and
/// what the peer receives.
fn side(u: &UuidPacket, s: &StateBits) -> HandshakeSide {
    let disk = DiskState::from_u32(u32::from(s.disk)).expect("a DRBD disk state");
    HandshakeSide::peer(u, s.role == 1, disk)
}

fn conn(s: &StateBits) -> ConnState {
    ConnState::from_u32(u32::from(s.conn)).expect("a DRBD connection state")
}

/// Runs the handshake for a node and checks it against the connection state the kernel
/// went to.
fn predict(
    cap: &Capture,
    me: HandshakeSide,
    peer: HandshakeSide,
    rc: bool,
    policy: &SplitBrainPolicy,
    kernel: ConnState,
) -> Handshake {
    let h = sync_handshake(&me, &peer, &cap.ctx(rc), policy);
    assert_eq!(
        h.outcome.conn_state(),
        Some(kernel),
        "{}: {} ({h:?})",
        cap.name,
        h.comparison
    );
    h
}

/// The two fresh-pair captures: connect (both just created: rule 10, Connected), then
/// `primary --force` on r0 (new current UUID, the old JUST_CREATED one as bitmap UUID),
/// which the kernel resolves as a full sync r0 → r1 (rules 30 / 20 and the disk states).
/// Returns r0's and r1's UUIDs after that sync, as the model computes them.
fn fresh_pair_then_forced_primary(name: &'static str, r1_port: u16) -> (UuidSet, UuidSet) {
    let cap = load(name);
    let r0 = cap.dir(7788, r1_port);
    let r1 = cap.dir(r1_port, 7788);
    // The meta socket goes to r1's port 7789: r1 holds RESOLVE_CONFLICTS.
    assert_eq!(cap.meta_acceptor(), 7789, "{name}");
    let (r0_rc, r1_rc) = (false, true);
    let (p0, p1) = (r0.policy(), r1.policy());
    assert_eq!(p0, SplitBrainPolicy::default(), "{name}: DRBD's defaults");
    let (u0, u1, s0, s1) = (r0.uuids(), r1.uuids(), r0.states(), r1.states());

    // 1. The first handshake: both JUST_CREATED, Inconsistent, Secondary.
    assert_eq!(u0[0].uuids, UuidSet::JUST_CREATED);
    assert_eq!(u1[0].uuids, UuidSet::JUST_CREATED);
    let h = predict(
        &cap,
        side(&u0[0], &s0[0]),
        side(&u1[0], &s1[0]),
        r0_rc,
        &p0,
        conn(&s0[1]),
    );
    assert_eq!((h.hg, h.comparison.rule), (0, 10));
    let h = predict(
        &cap,
        side(&u1[0], &s1[0]),
        side(&u0[0], &s0[0]),
        r1_rc,
        &p1,
        conn(&s1[1]),
    );
    assert_eq!(h.outcome, HandshakeOutcome::Connected);

    // 2. primary --force on r0: the model's promotion gives the UUIDs r0 sent.
    let mut r0_uuids = u0[0].uuids;
    assert!(r0_uuids.promote(u0[1].uuids.current & !1, true, true));
    assert_eq!(r0_uuids, u0[1].uuids, "{name}: forced promotion");
    // r1 decides on r0's new UUIDs and state (Primary, UpToDate): SyncTarget, full.
    let h = predict(
        &cap,
        side(&u1[1], &s1[1]),
        side(&u0[1], &s0[2]),
        r1_rc,
        &p1,
        conn(&s1[2]),
    );
    assert_eq!(conn(&s1[2]), ConnState::WFBitMapT);
    assert_eq!((h.comparison.hg, h.comparison.rule, h.hg), (-2, 20, -2));
    assert_eq!(h.outcome, HandshakeOutcome::SyncTarget { full: true });
    // r0 decides on r1's answer (WFBitMapT, Inconsistent): SyncSource, full. The kernel
    // did not announce WFBitMapS in a P_STATE here, but it sent the P_SYNC_UUID that
    // only a SyncSource sends.
    let h = sync_handshake(
        &side(&u0[1], &s0[2]),
        &side(&u1[1], &s1[2]),
        &cap.ctx(r0_rc),
        &p0,
    );
    assert_eq!((h.comparison.hg, h.comparison.rule, h.hg), (2, 30, 2));
    assert!(h.by_disk_states);
    assert_eq!(h.outcome, HandshakeOutcome::SyncSource { full: true });
    let sent = r0.sync_uuids();
    assert_eq!(sent.len(), 1, "{name}: one P_SYNC_UUID");
    assert!(
        r1.sync_uuids().is_empty(),
        "{name}: only the source sends one"
    );
    // Its bitmap UUID was JUST_CREATED, so the sync UUID is a random one, not
    // bitmap + 2^48.
    assert_eq!(r0_uuids.bitmap, UUID_JUST_CREATED);
    let as_received = r0_uuids;
    let sync = r0_uuids.start_sync_source(sent[0]);
    assert_eq!(sync, sent[0]);
    assert_ne!(sync, UUID_JUST_CREATED + UUID_NEW_BM_OFFSET);

    // The resync completes (the capture shows r1 UpToDate/UpToDate afterwards).
    let last = s1.last().expect("states");
    assert_eq!(
        (conn(last), last.disk, last.pdsk),
        (ConnState::Connected, 8, 8),
        "{name}"
    );
    let mut r1_uuids = u1[1].uuids;
    r1_uuids.start_sync_target(sync, false);
    r0_uuids.finish_sync_source();
    r1_uuids.finish_sync_target(&as_received, false);
    (r0_uuids, r1_uuids)
}

#[test]
fn handshake_sync_writes_and_bitmap_resync() {
    let (mut r0, r1) = fresh_pair_then_forced_primary("handshake-sync-writes.pcap", 32853);

    // bitmap-resync.pcap continues with the same two resources: r1 disconnects, the
    // Primary r0 writes alone and reconnects.
    let cap = load("bitmap-resync.pcap");
    // On the old connection r0 announced the new current UUID it made when it lost
    // r1's disk: the model's r0 after the initial sync, with a new current UUID, must be
    // exactly that (bit 0 set: Primary; the old current, bit 0 included, as bitmap UUID).
    let old = cap.dir(7788, 32853).uuids();
    assert_eq!(old.len(), 1);
    let y = old[0].uuids.current;
    assert!(r0.lost_peer_disk(y & !1, true, false, DiskState::UpToDate));
    assert_eq!(r0, old[0].uuids, "r0 after the disconnect");

    let new0 = cap.dir(7788, 58125);
    let new1 = cap.dir(58125, 7788);
    let (u0, u1, s0, s1) = (new0.uuids(), new1.uuids(), new0.states(), new1.states());
    assert_eq!(u0[0].uuids, r0, "r0 at the new handshake");
    // r1's UUIDs are the model's r1 after the full sync: bit 0 cleared on its own copies
    // of the sync UUID and of r0's current (it is Secondary).
    assert_eq!(u1[0].uuids, r1, "r1 at the new handshake");
    assert_eq!(u0[0].dirty_bits, 8, "the 8 blocks written alone");

    assert_eq!(cap.meta_acceptor(), 7789);
    let h = predict(
        &cap,
        side(&u0[0], &s0[0]),
        side(&u1[0], &s1[0]),
        false,
        &new0.policy(),
        conn(&s0[1]),
    );
    assert_eq!((h.hg, h.comparison.rule), (1, 70));
    assert_eq!(h.outcome, HandshakeOutcome::SyncSource { full: false });
    let h = predict(
        &cap,
        side(&u1[0], &s1[0]),
        side(&u0[0], &s0[0]),
        true,
        &new1.policy(),
        conn(&s1[1]),
    );
    assert_eq!((h.hg, h.comparison.rule), (-1, 50));
    assert_eq!(h.outcome, HandshakeOutcome::SyncTarget { full: false });

    // The sync UUID is r0's bitmap UUID + 2^48: deterministic, so it must match.
    let mut r0_model = u0[0].uuids;
    let sync = r0_model.start_sync_source(0);
    assert_eq!(new0.sync_uuids(), [sync]);
    assert_eq!(sync, 0x5c19_4811_0b29_c331);
}

#[test]
fn auth_verify_csums() {
    let (r0, r1) = fresh_pair_then_forced_primary("auth-verify-csums.pcap", 37435);
    // After the full sync both hold the same generation (bit 0 aside).
    assert_eq!(r0.current & !1, r1.current);
    assert_eq!((r0.bitmap, r1.bitmap), (0, 0));
    assert_eq!(r0.history[0] & !1, r1.history[0] & !1);
    assert_eq!(r0.history[1], UUID_JUST_CREATED);
}
