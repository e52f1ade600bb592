//! The handshake on the data socket: features, protocol, sync parameters, sizes, UUIDs,
//! state (drbd-protocol.md §3, steps 3–8), with DRBD's checks on what the peer sends.

use super::{read_control, send_packet, NetError};
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
/// `UUID_JUST_CREATED`: the current UUID of fresh metadata (no generation history yet;
/// on-disk UUIDs come with the metadata issue).
pub const UUID_JUST_CREATED: u64 = 4;

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
    /// Generation UUIDs from the metadata: current, bitmap, history (P_UUIDS).
    pub uuids: [u64; 4],
    /// P_UUIDS flags (2 = this node crashed while Primary).
    pub uuid_flags: u64,
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
        current: local.uuids[0],
        bitmap: local.uuids[1],
        history: [local.uuids[2], local.uuids[3]],
        dirty_bits: local.dirty_bits,
        uuid_flags: local.uuid_flags,
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
            (_, Packet::Uuids(u)) => dirty_bits = u.dirty_bits,
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
    Ok(PeerParams {
        ctx,
        role,
        disk,
        max_bio_size: sizes.max_bio_size.clamp(4096, MAX_BIO_SIZE),
        dirty_bits,
    })
}

/// A state enum's number as the bitfield byte (every DRBD state value fits 5 bits).
fn b(v: u32) -> u8 {
    u8::try_from(v).unwrap_or(0)
}
