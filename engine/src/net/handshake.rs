//! The handshake on the data socket: features, protocol, sync parameters, sizes, UUIDs,
//! state (drbd-protocol.md §3, steps 3–8), with DRBD's checks on what the peer sends.

use super::{read_control, send_packet, NetError};
use crate::state::uuid::{
    real_peer_disk, sync_handshake, HandshakeCtx, HandshakeOutcome, HandshakeSide,
    SplitBrainPolicy, UuidPacket, UuidSet,
};
use crate::state::{ConnState, DiskState, Protocol, Role};
use crate::wire::{self, ff, AlgName, Command, ConnectionFeatures, Packet, StateBits, WireCtx};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Feature bits tandem offers: `P_TRIM`, `P_ZEROES`, and `DRBD_FF_WSAME` — the last only
/// for what it also means: `P_SIZES` carries the queue limits (`o_qlim`), as every DRBD
/// 8.4.11+ and 9 node sends them and as Wireshark's dissector expects. tandem never sends
/// `P_WSAME`, and Linux ≥ 5.18 sends none; one that arrives is refused as unexpected.
/// (THIN_RESYNC comes with resync.)
pub const OFFERED_FEATURES: u32 = ff::DRBD_FF_TRIM | ff::DRBD_FF_WZEROES | ff::DRBD_FF_WSAME;
/// Largest bio tandem receives (DRBD_MAX_BIO_SIZE).
pub const MAX_BIO_SIZE: u32 = wire::DRBD_MAX_BIO_SIZE;
/// What this node says about itself in the handshake.
#[derive(Debug, Clone, Copy)]
pub struct LocalParams {
    /// Wire protocol.
    pub protocol: Protocol,
    /// Role now.
    pub role: Role,
    /// Local disk state.
    pub disk: DiskState,
    /// Exported size, sectors.
    pub size_sectors: u64,
    /// Out-of-sync 4 KiB blocks.
    pub dirty_bits: u64,
    /// Generation UUIDs, as the metadata holds them.
    pub uuids: UuidSet,
    /// This node crashed while Primary (P_UUIDS flag 2).
    pub crashed_primary: bool,
    /// This node accepted the meta socket, so it holds DRBD's `RESOLVE_CONFLICTS` (what
    /// breaks ties in the sync decision; it is not "the higher address").
    pub resolve_conflicts: bool,
}

/// What the handshake agreed and learned about the peer.
#[derive(Debug, Clone, Copy)]
pub struct PeerParams {
    /// Agreed version and features.
    pub ctx: WireCtx,
    /// The peer's role.
    pub role: Role,
    /// The peer's disk state.
    pub disk: DiskState,
    /// The peer's largest accepted bio, bytes.
    pub max_bio_size: u32,
    /// Out-of-sync 4 KiB blocks the peer reported (P_UUIDS dirty_bits).
    pub dirty_bits: u64,
    /// What DRBD's sync handshake decided from both sides' UUIDs (`Connected`, or which
    /// side would be SyncSource and whether fully). Split brain and unrelated data never
    /// get here: the handshake refuses them.
    pub sync: HandshakeOutcome,
}

/// Runs the handshake on the data socket.
pub async fn run(data: &mut TcpStream, local: LocalParams) -> Result<PeerParams, NetError> {
    let pre = WireCtx::pre_features();
    let ours = ConnectionFeatures::drbd84(OFFERED_FEATURES);
    send_packet(data, &Packet::Features(ours), &pre).await?;
    let theirs = match read_control(data, &pre).await? {
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
        c_plan_ahead: 20,
        c_delay_target: 10,
        c_fill_target: 100,
        c_max_rate: 102_400,
    });
    let sync_cmd = if ctx.version() >= 89 {
        Command::P_SYNC_PARAM89
    } else {
        Command::P_SYNC_PARAM
    };
    let param = wire::SyncParam {
        resync_rate: 250,
        verify_alg: no_alg.clone(),
        csums_alg: no_alg,
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
    let uuids = wire::Uuids {
        current: local.uuids.current,
        bitmap: local.uuids.bitmap,
        history: local.uuids.history,
        dirty_bits: local.dirty_bits,
        uuid_flags: if local.crashed_primary {
            wire::uuid_flags::UUID_FLAG_CRASHED_PRIMARY
        } else {
            0
        },
    };
    wire::encode(&Packet::Uuids(uuids), &ctx, 0, &mut out)?;
    let state = StateBits {
        role: b(local.role.as_u32()),
        peer: b(Role::Unknown.as_u32()),
        conn: b(ConnState::WFReportParams.as_u32()),
        disk: b(local.disk.as_u32()),
        pdsk: b(DiskState::DUnknown.as_u32()),
        ..StateBits::default()
    };
    wire::encode(&Packet::State(state.pack()?), &ctx, 0, &mut out)?;
    data.write_all(&out).await?;

    let mut got_protocol = false;
    let mut got_sizes = None;
    let mut dirty_bits = 0;
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
            (_, Packet::SyncParam { .. }) => {}
            (_, Packet::Uuids(u)) => {
                dirty_bits = u.dirty_bits;
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
                        "peer's disk has {peer_size} sectors, this node exports {}; give the peer a disk at least as large",
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
    if role == Role::Primary && local.role == Role::Primary {
        return Err(NetError::Refused(
            "both nodes are Primary; demote one (tandem secondary)".into(),
        ));
    }
    let Some(peer_uuids) = peer_uuids else {
        return Err(NetError::Protocol(
            "peer sent P_STATE before P_UUIDS".into(),
        ));
    };
    let sync = decide(&local, &peer_uuids, role, disk, &ctx)?;
    Ok(PeerParams {
        ctx,
        role,
        disk,
        max_bio_size: sizes.max_bio_size.clamp(4096, MAX_BIO_SIZE),
        dirty_bits,
        sync,
    })
}

/// DRBD's sync handshake on both sides' UUIDs (`drbd_sync_handshake`, policy: disconnect
/// on every split brain). A split brain or unrelated data is refused with
/// [`NetError::SplitBrain`]: nothing is overwritten, the node goes StandAlone.
fn decide(
    local: &LocalParams,
    peer: &UuidPacket,
    peer_role: Role,
    peer_disk: DiskState,
    ctx: &WireCtx,
) -> Result<HandshakeOutcome, NetError> {
    let me = HandshakeSide {
        uuids: local.uuids,
        dirty_bits: local.dirty_bits,
        primary: local.role == Role::Primary,
        disk: local.disk,
        crashed_primary: local.crashed_primary,
        discard_my_data: false,
    };
    let them = HandshakeSide::peer(
        peer,
        peer_role == Role::Primary,
        real_peer_disk(peer_disk, peer.flags),
    );
    let hs = sync_handshake(
        &me,
        &them,
        &HandshakeCtx {
            agreed_version: ctx.version(),
            wsame: ctx.has(ff::DRBD_FF_WSAME),
            resolve_conflicts: local.resolve_conflicts,
        },
        &SplitBrainPolicy::default(),
    );
    match hs.outcome {
        HandshakeOutcome::Disconnect(reason) => Err(NetError::SplitBrain(format!(
            "{reason} (UUIDs here {}, peer {}; rule {}, {})",
            local.uuids, peer.uuids, hs.comparison.rule, hs.hg
        ))),
        other => Ok(other),
    }
}

/// A state enum's number as the bitfield byte (every DRBD state value fits 5 bits).
fn b(v: u32) -> u8 {
    u8::try_from(v).unwrap_or(0)
}
