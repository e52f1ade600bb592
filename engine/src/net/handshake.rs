//! The handshake on the data socket: features, protocol, sync parameters, sizes, UUIDs,
//! state (drbd-protocol.md §3, steps 3–8), with DRBD's checks on what the peer sends.
//! What the two sides' UUIDs and states decide is not decided here: the replica does it
//! ([`super::Replica::agree`], `replica::Node::agree` in the daemon), so the daemon and
//! the simulator run one decision.

use super::{read_control, send_packet, NetError};
use crate::state::uuid::{
    HandshakeCtx, HandshakeOutcome, HandshakeSide, SplitBrainPolicy, UuidPacket,
};
use crate::state::{ConnState, DiskState, Protocol, Role};
use crate::wire::{self, ff, AlgName, Command, ConnectionFeatures, Packet, StateBits, WireCtx};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Feature bits tandem offers: `P_TRIM`, `P_ZEROES`, `P_RS_THIN_REQ` /
/// `P_RS_DEALLOCATED` (thin resync: zero ranges travel as a length, not as data), and
/// `DRBD_FF_WSAME` — the last only for what it also means: `P_SIZES` carries the queue
/// limits (`o_qlim`), as every DRBD 8.4.11+ and 9 node sends them and as Wireshark's
/// dissector expects. tandem never sends `P_WSAME`, and Linux ≥ 5.18 sends none; one that
/// arrives is refused as unexpected.
pub const OFFERED_FEATURES: u32 =
    ff::DRBD_FF_TRIM | ff::DRBD_FF_WZEROES | ff::DRBD_FF_WSAME | ff::DRBD_FF_THIN_RESYNC;
/// Largest bio tandem receives (DRBD_MAX_BIO_SIZE).
pub const MAX_BIO_SIZE: u32 = wire::DRBD_MAX_BIO_SIZE;
/// What this node says about itself in the handshake.
#[derive(Debug, Clone, Copy)]
pub struct LocalParams {
    /// Wire protocol.
    pub protocol: Protocol,
    /// Exported size, sectors.
    pub size_sectors: u64,
    /// This node as its `P_UUIDS` and `P_STATE` say: generation UUIDs, out-of-sync
    /// blocks, role, disk, the crashed-Primary and discard-my-data flags (the replica's
    /// `Node::hello`).
    pub side: HandshakeSide,
    /// This node accepted the meta socket, so it holds DRBD's `RESOLVE_CONFLICTS` (what
    /// breaks ties in the sync decision; it is not "the higher address").
    pub resolve_conflicts: bool,
    /// The after-split-brain policies.
    pub policy: SplitBrainPolicy,
    /// `csums-alg` (crc32c) configured.
    pub csums: bool,
    /// `verify-alg` (crc32c) configured.
    pub verify: bool,
    /// Resync rate settings sent in `P_SYNC_PARAM`.
    pub rate: crate::resync::RateConfig,
}

/// What the handshake agreed and learned about the peer.
#[derive(Debug, Clone)]
pub struct PeerParams {
    /// Agreed version and features.
    pub ctx: WireCtx,
    /// The peer's role.
    pub role: Role,
    /// The peer's disk state.
    pub disk: DiskState,
    /// The peer's largest accepted bio, bytes.
    pub max_bio_size: u32,
    /// The peer as DRBD's sync handshake sees it: its `P_UUIDS` (UUIDs, changes, flags)
    /// and its role and disk from `P_STATE` (a Negotiating disk resolved).
    pub side: HandshakeSide,
    /// The peer's `csums-alg` is crc32c too.
    pub csums: bool,
    /// The peer's `verify-alg` is crc32c too.
    pub verify: bool,
}

impl LocalParams {
    /// This node's role in its `P_STATE`.
    fn role(&self) -> Role {
        if self.side.primary {
            Role::Primary
        } else {
            Role::Secondary
        }
    }

    /// The facts of the connection `ctx` that DRBD's sync handshake weighs.
    pub fn handshake_ctx(&self, ctx: &WireCtx) -> HandshakeCtx {
        HandshakeCtx {
            agreed_version: ctx.version(),
            wsame: ctx.has(ff::DRBD_FF_WSAME),
            resolve_conflicts: self.resolve_conflicts,
        }
    }
}

/// What the replica decided from both sides of the handshake ([`super::Replica::agree`]).
#[derive(Debug, Clone)]
pub struct Agreed {
    /// `Connected`, or which side is SyncSource and whether fully. Split brain and
    /// unrelated data never get here: they are refused unless a policy resolved them.
    pub sync: HandshakeOutcome,
    /// How a split brain was resolved, if there was one.
    pub split_brain_resolved: Option<String>,
}

/// Runs the handshake on the data socket (the decision is the replica's:
/// [`super::Replica::agree`]).
pub async fn run(data: &mut TcpStream, local: LocalParams) -> Result<PeerParams, NetError> {
    let pre = WireCtx::pre_features();
    let ours = ConnectionFeatures::drbd84(OFFERED_FEATURES);
    send_packet(data, &Packet::Features(ours), &pre).await?;
    // A socket pair that does not even answer with its features (a squatter's fake
    // P_INITIAL pair) is given up quickly, so the real peer's pair is tried next.
    let first = tokio::time::timeout(super::FIRST_PACKET_TIMEOUT, read_control(data, &pre))
        .await
        .map_err(|_| NetError::Timeout("no P_CONNECTION_FEATURES from the peer"))??;
    let theirs = match first {
        (_, Packet::Features(f)) => f,
        (hdr, _) => {
            return Err(NetError::Protocol(format!(
                "expected P_CONNECTION_FEATURES, got {}",
                hdr.command.name()
            )))
        }
    };
    let ctx = wire::agree(&ours, &theirs).map_err(|e| NetError::Refused(e.to_string()))?;
    tracing::info!(
        "peer speaks protocol {}..{}; agreed {} with features {:#x}",
        theirs.protocol_min,
        theirs.protocol_max,
        ctx.version(),
        ctx.features()
    );

    let mut out = Vec::with_capacity(512);
    let no_alg = AlgName::new("").map_err(NetError::Wire)?;
    let alg = |on: bool| AlgName::new(if on { crate::resync::DIGEST_ALG } else { "" });
    let protocol = wire::Protocol {
        protocol: local.protocol.as_u32(),
        after_sb_0p: 0,
        after_sb_1p: 0,
        after_sb_2p: 0,
        conn_flags: 0,
        two_primaries: 0,
        integrity_alg: no_alg.clone(),
    };
    wire::encode(
        &Packet::Protocol {
            cmd: Command::P_PROTOCOL,
            protocol,
        },
        &ctx,
        0,
        &mut out,
    )?;
    let controller = (ctx.version() >= 95).then_some(wire::ResyncController {
        c_plan_ahead: local.rate.c_plan_ahead,
        c_delay_target: local.rate.c_delay_target,
        c_fill_target: local.rate.c_fill_target,
        c_max_rate: local.rate.c_max_rate,
    });
    let sync_cmd = if ctx.version() >= 89 {
        Command::P_SYNC_PARAM89
    } else {
        Command::P_SYNC_PARAM
    };
    let param = wire::SyncParam {
        resync_rate: local.rate.resync_rate,
        verify_alg: alg(local.verify).map_err(NetError::Wire)?,
        csums_alg: alg(local.csums).map_err(NetError::Wire)?,
        controller,
    };
    wire::encode(
        &Packet::SyncParam {
            cmd: sync_cmd,
            param,
        },
        &ctx,
        0,
        &mut out,
    )?;
    let sizes = wire::Sizes {
        d_size: local.size_sectors,
        u_size: 0,
        c_size: local.size_sectors,
        max_bio_size: MAX_BIO_SIZE,
        queue_order_type: 0,
        dds_flags: 0,
        qlim: ctx.has(ff::DRBD_FF_WSAME).then_some(wire::QueueLimits {
            physical_block_size: 4096,
            logical_block_size: 512,
            alignment_offset: 0,
            io_min: 4096,
            io_opt: 0,
            discard_enabled: 1,
            discard_zeroes_data: 1,
            write_same_capable: 0,
            pad: 0,
        }),
    };
    wire::encode(&Packet::Sizes(sizes), &ctx, 0, &mut out)?;
    // Flags 1 (discard-my-data), 2 (crashed Primary) and 4 (Inconsistent), as DRBD's
    // `_drbd_send_uuids` sets them.
    let uuids = wire::Uuids::from(local.side.packet());
    wire::encode(&Packet::Uuids(uuids), &ctx, 0, &mut out)?;
    let state = StateBits {
        role: b(local.role().as_u32()),
        peer: b(Role::Unknown.as_u32()),
        conn: b(ConnState::WFReportParams.as_u32()),
        disk: b(local.side.disk.as_u32()),
        pdsk: b(DiskState::DUnknown.as_u32()),
        ..StateBits::default()
    };
    wire::encode(&Packet::State(state.pack()?), &ctx, 0, &mut out)?;
    data.write_all(&out).await?;

    let mut got_protocol = false;
    let mut peer_algs = (false, false);
    let mut got_sizes = None;
    let mut peer_uuids = None;
    let peer_state = loop {
        match read_control(data, &ctx).await? {
            (_, Packet::Protocol { protocol: p, .. }) => {
                if p.protocol != local.protocol.as_u32() {
                    return Err(NetError::Refused(format!(
                        "peer uses protocol {}, this node {} (set the same `protocol` on both)",
                        Protocol::from_u32(p.protocol)
                            .map_or_else(|| p.protocol.to_string(), |x| x.to_string()),
                        local.protocol
                    )));
                }
                if p.two_primaries != 0 {
                    return Err(NetError::Refused(
                        "peer allows two primaries; tandem does not".into(),
                    ));
                }
                if !p.integrity_alg.is_empty() {
                    return Err(NetError::Refused(format!(
                        "peer wants data-integrity-alg {}; tandem does not support it",
                        p.integrity_alg.as_str()
                    )));
                }
                got_protocol = true;
            }
            (_, Packet::SyncParam { param, .. }) => {
                let is_ours = |a: &AlgName| a.as_str() == crate::resync::DIGEST_ALG;
                // DRBD refuses differing algorithms (receive_SyncParam); tandem simply
                // uses a digest only when both sides name crc32c.
                peer_algs = (is_ours(&param.csums_alg), is_ours(&param.verify_alg));
            }
            (_, Packet::Uuids(u)) => {
                peer_uuids = Some(UuidPacket::from(u));
            }
            (_, Packet::Sizes(s)) => {
                let peer_size = if s.c_size != 0 {
                    s.c_size.min(s.d_size.max(s.c_size))
                } else {
                    s.d_size
                };
                if peer_size < local.size_sectors {
                    return Err(NetError::Refused(format!(
                        "peer's disk has {peer_size} sectors, this node exports {}; give the peer \
                         a disk at least as large",
                        local.size_sectors
                    )));
                }
                got_sizes = Some(s);
            }
            (_, Packet::State(word)) => break StateBits::unpack(word),
            (_, Packet::Empty(Command::P_UNPLUG_REMOTE)) => {}
            (hdr, _) => {
                return Err(NetError::Protocol(format!(
                    "unexpected {} during the handshake",
                    hdr.command.name()
                )));
            }
        }
    };
    let Some(sizes) = got_sizes else {
        return Err(NetError::Protocol(
            "peer sent P_STATE before P_SIZES".into(),
        ));
    };
    if !got_protocol {
        return Err(NetError::Protocol(
            "peer sent P_STATE before P_PROTOCOL".into(),
        ));
    }
    let role = Role::from_u32(u32::from(peer_state.role)).unwrap_or(Role::Unknown);
    let disk = DiskState::from_u32(u32::from(peer_state.disk)).unwrap_or(DiskState::DUnknown);
    if role == Role::Primary && local.side.primary {
        return Err(NetError::Refused(
            "both nodes are Primary; demote one (tandem secondary)".into(),
        ));
    }
    let Some(peer_uuids) = peer_uuids else {
        return Err(NetError::Protocol(
            "peer sent P_STATE before P_UUIDS".into(),
        ));
    };
    Ok(PeerParams {
        ctx,
        role,
        disk,
        max_bio_size: sizes.max_bio_size.clamp(4096, MAX_BIO_SIZE),
        side: HandshakeSide::peer(&peer_uuids, role == Role::Primary, disk),
        csums: peer_algs.0,
        verify: peer_algs.1,
    })
}

/// A state enum's number as the bitfield byte (every DRBD state value fits 5 bits).
fn b(v: u32) -> u8 {
    u8::try_from(v).unwrap_or(0)
}
