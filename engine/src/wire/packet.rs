//! Whole packets: the length rules per command ([`payload_layout`]), [`decode`] of a
//! payload into a typed [`Packet`], and [`encode`] of a [`Packet`] with its header.
//!
//! Length rules follow DRBD 8.4's receivers: the data socket's `drbd_cmd_handler[]`
//! (`pkt_size` = fixed sub-header; a longer payload only where `expect_payload` is set),
//! the meta socket's `ack_receiver_tbl[]` (exact sizes), `receive_SyncParam`,
//! `receive_protocol`, `receive_bitmap`, `drbd_do_features`, `drbd_do_auth`,
//! `read_in_block` and `receive_DataRequest`.

use super::command::Command as C;
use super::command::Command;
use super::error::{Expected, WireError};
use super::header::Header;
use super::payload::*;
use super::{
    ff, WireCtx, DRBD_MAX_BATCH_BIO_SIZE, DRBD_MAX_BIO_SIZE, DRBD_SOCKET_BUFFER_SIZE,
    MAX_DIGEST_LEN, MAX_WSAME_DATA, RLE_VLI_BITS, SHARED_SECRET_MAX,
};

/// Commands whose payload is `p_data` + (digest) + data.
pub(crate) const DATA_COMMANDS: &[Command] = &[C::P_DATA, C::P_DATA_REPLY, C::P_RS_DATA_REPLY];
/// Commands whose payload is `p_trim` and no data.
pub(crate) const TRIM_COMMANDS: &[Command] = &[C::P_TRIM, C::P_ZEROES];
/// Commands whose payload is `p_block_ack` (all on the meta socket).
pub(crate) const ACK_COMMANDS: &[Command] = &[
    C::P_RECV_ACK,
    C::P_WRITE_ACK,
    C::P_RS_WRITE_ACK,
    C::P_SUPERSEDED,
    C::P_NEG_ACK,
    C::P_NEG_DREPLY,
    C::P_NEG_RS_DREPLY,
    C::P_OV_RESULT,
    C::P_RS_IS_IN_SYNC,
    C::P_RS_CANCEL,
    C::P_RETRY_WRITE,
];
/// Commands whose payload is `p_block_req` and nothing else.
pub(crate) const REQ_COMMANDS: &[Command] = &[
    C::P_DATA_REQUEST,
    C::P_RS_DATA_REQUEST,
    C::P_OV_REQUEST,
    C::P_RS_THIN_REQ,
];
/// Commands whose payload is `p_block_req` + a digest.
pub(crate) const REQ_DIGEST_COMMANDS: &[Command] = &[C::P_OV_REPLY, C::P_CSUM_RS_REQUEST];
/// Commands whose payload is `p_block_desc`.
pub(crate) const DESC_COMMANDS: &[Command] = &[C::P_OUT_OF_SYNC, C::P_RS_DEALLOCATED];
/// Commands whose payload is `p_protocol` (+ integrity_alg).
pub(crate) const PROTOCOL_COMMANDS: &[Command] = &[C::P_PROTOCOL, C::P_PROTOCOL_UPDATE];
/// Commands whose payload is a `p_rs_param*` (layout by agreed version).
pub(crate) const SYNC_PARAM_COMMANDS: &[Command] = &[C::P_SYNC_PARAM, C::P_SYNC_PARAM89];
/// Commands whose payload is `p_req_state`.
pub(crate) const REQ_STATE_COMMANDS: &[Command] = &[C::P_STATE_CHG_REQ, C::P_CONN_ST_CHG_REQ];
/// Commands whose payload is `p_req_state_reply`.
pub(crate) const REPLY_COMMANDS: &[Command] = &[C::P_STATE_CHG_REPLY, C::P_CONN_ST_CHG_REPLY];
/// Commands without payload.
pub(crate) const EMPTY_COMMANDS: &[Command] = &[
    C::P_UNPLUG_REMOTE,
    C::P_PING,
    C::P_PING_ACK,
    C::P_INITIAL_META,
    C::P_INITIAL_DATA,
];

/// A decoded DRBD 8.4 packet (without its header; the volume is in the [`Header`]).
///
/// Variants shared by several commands carry the command. For data packets only the
/// sub-header is here; `data_len` bytes of data follow it on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    /// `P_DATA`, `P_DATA_REPLY`, `P_RS_DATA_REPLY`: `p_data` + digest + `data_len` bytes.
    Data {
        /// One of [`DATA_COMMANDS`].
        cmd: Command,
        /// The `p_data` sub-header.
        head: DataHeader,
        /// The data-integrity digest ([`WireCtx::data_digest_len`] bytes; usually empty).
        digest: Vec<u8>,
        /// Data bytes following (a multiple of 512, ≤ 1 MiB).
        data_len: u32,
    },
    /// `P_WSAME`: `p_wsame` + digest + one logical block of `data_len` bytes, to be
    /// repeated over `size` bytes. Linux ≥ 5.18 no longer receives it: never send it to a
    /// kernel peer.
    WriteSame {
        /// The `p_data` part.
        head: DataHeader,
        /// Bytes affected.
        size: u32,
        /// The data-integrity digest.
        digest: Vec<u8>,
        /// The logical block's size (512..=4096).
        data_len: u32,
    },
    /// `P_TRIM`, `P_ZEROES`: `p_trim`, no data.
    Trim {
        /// One of [`TRIM_COMMANDS`].
        cmd: Command,
        /// The `p_data` part.
        head: DataHeader,
        /// Bytes affected: a non-zero multiple of 512, ≤ 128 MiB.
        size: u32,
    },
    /// `P_BARRIER`.
    Barrier(Barrier),
    /// `P_BARRIER_ACK`.
    BarrierAck(BarrierAck),
    /// A `p_block_ack` command (see [`ACK_COMMANDS`]).
    BlockAck {
        /// One of [`ACK_COMMANDS`].
        cmd: Command,
        /// The ack.
        ack: BlockAck,
    },
    /// A `p_block_req` command ([`REQ_COMMANDS`]) or one with a digest
    /// ([`REQ_DIGEST_COMMANDS`]).
    BlockReq {
        /// The command.
        cmd: Command,
        /// The request.
        req: BlockReq,
        /// 1..=64 digest bytes for `P_OV_REPLY` / `P_CSUM_RS_REQUEST`, empty otherwise.
        digest: Vec<u8>,
    },
    /// `P_OUT_OF_SYNC`, `P_RS_DEALLOCATED`.
    BlockDesc {
        /// One of [`DESC_COMMANDS`].
        cmd: Command,
        /// The range.
        desc: BlockDesc,
    },
    /// `P_CONNECTION_FEATURES` (always h80).
    Features(ConnectionFeatures),
    /// `P_PROTOCOL`, `P_PROTOCOL_UPDATE`.
    Protocol {
        /// One of [`PROTOCOL_COMMANDS`].
        cmd: Command,
        /// The settings.
        protocol: Protocol,
    },
    /// `P_SYNC_PARAM` (agreed ≤ 88) or `P_SYNC_PARAM89` (≥ 89); DRBD decodes either by
    /// the agreed version.
    SyncParam {
        /// One of [`SYNC_PARAM_COMMANDS`].
        cmd: Command,
        /// The parameters.
        param: SyncParam,
    },
    /// `P_UUIDS`.
    Uuids(Uuids),
    /// `P_SIZES`.
    Sizes(Sizes),
    /// `P_STATE`: the `union drbd_state` word ([`StateBits::unpack`] splits it).
    State(u32),
    /// `P_STATE_CHG_REQ`, `P_CONN_ST_CHG_REQ`.
    ReqState {
        /// One of [`REQ_STATE_COMMANDS`].
        cmd: Command,
        /// Mask and value.
        req: ReqState,
    },
    /// `P_STATE_CHG_REPLY`, `P_CONN_ST_CHG_REPLY`: `enum drbd_state_rv` (≥ 1 = success).
    ReqStateReply {
        /// One of [`REPLY_COMMANDS`].
        cmd: Command,
        /// The return code.
        retcode: i32,
    },
    /// `P_SYNC_UUID`: `p_rs_uuid`.
    SyncUuid(u64),
    /// `P_DELAY_PROBE`.
    DelayProbe(DelayProbe),
    /// `P_BITMAP`: little-endian bitmap words, ≤ 4096 − header bytes.
    Bitmap(Vec<u8>),
    /// `P_COMPRESSED_BITMAP`.
    CompressedBitmap(CompressedBitmap),
    /// `P_AUTH_CHALLENGE`: 64..=128 random bytes.
    AuthChallenge(Vec<u8>),
    /// `P_AUTH_RESPONSE`: the HMAC, 1..=64 bytes.
    AuthResponse(Vec<u8>),
    /// A packet without payload (see [`EMPTY_COMMANDS`]).
    Empty(Command),
}

impl Packet {
    /// The command this packet is sent with.
    pub fn command(&self) -> Command {
        match self {
            Packet::Data { cmd, .. }
            | Packet::Trim { cmd, .. }
            | Packet::BlockAck { cmd, .. }
            | Packet::BlockReq { cmd, .. }
            | Packet::BlockDesc { cmd, .. }
            | Packet::Protocol { cmd, .. }
            | Packet::SyncParam { cmd, .. }
            | Packet::ReqState { cmd, .. }
            | Packet::ReqStateReply { cmd, .. }
            | Packet::Empty(cmd) => *cmd,
            Packet::WriteSame { .. } => C::P_WSAME,
            Packet::Barrier(_) => C::P_BARRIER,
            Packet::BarrierAck(_) => C::P_BARRIER_ACK,
            Packet::Features(_) => C::P_CONNECTION_FEATURES,
            Packet::Uuids(_) => C::P_UUIDS,
            Packet::Sizes(_) => C::P_SIZES,
            Packet::State(_) => C::P_STATE,
            Packet::SyncUuid(_) => C::P_SYNC_UUID,
            Packet::DelayProbe(_) => C::P_DELAY_PROBE,
            Packet::Bitmap(_) => C::P_BITMAP,
            Packet::CompressedBitmap(_) => C::P_COMPRESSED_BITMAP,
            Packet::AuthChallenge(_) => C::P_AUTH_CHALLENGE,
            Packet::AuthResponse(_) => C::P_AUTH_RESPONSE,
        }
    }

    /// Data bytes that follow the encoded packet on the wire (0 except for data packets).
    pub fn data_len(&self) -> u32 {
        match self {
            Packet::Data { data_len, .. } | Packet::WriteSame { data_len, .. } => *data_len,
            _ => 0,
        }
    }
}

/// How a payload of a given header splits: `head` bytes to read and pass to [`decode`],
/// then `data` bytes the caller reads itself (into an aligned buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadLayout {
    /// Bytes of fixed sub-header + variable part (all of a non-data packet).
    pub head: usize,
    /// Data bytes after `head` (data packets only).
    pub data: usize,
}

/// The length rule of one command at one context.
#[derive(Clone, Copy, Debug)]
struct Rule {
    /// Fixed sub-header bytes (DRBD's `pkt_size`).
    fixed: usize,
    /// Inclusive bounds of the variable part after `fixed` (non-data packets).
    tail: (usize, usize),
    /// Inclusive bounds of the data part (data packets); must be a multiple of 512.
    data: Option<(u32, u32)>,
}

impl Rule {
    const fn exact(n: usize) -> Rule {
        Rule {
            fixed: n,
            tail: (0, 0),
            data: None,
        }
    }

    const fn tail(fixed: usize, min: usize, max: usize) -> Rule {
        Rule {
            fixed,
            tail: (min, max),
            data: None,
        }
    }

    const fn data(fixed: usize, min: u32, max: u32) -> Rule {
        Rule {
            fixed,
            tail: (0, 0),
            data: Some((min, max)),
        }
    }
}

fn rule(cmd: Command, ctx: &WireCtx) -> Result<Rule, WireError> {
    let v = ctx.version();
    let digest = ctx.data_digest_len();
    let bitmap_max = DRBD_SOCKET_BUFFER_SIZE - ctx.header_len();
    let r = match cmd {
        c if DATA_COMMANDS.contains(&c) => Rule::data(P_DATA_LEN + digest, 0, DRBD_MAX_BIO_SIZE),
        C::P_WSAME => Rule::data(P_TRIM_LEN + digest, 512, MAX_WSAME_DATA),
        c if TRIM_COMMANDS.contains(&c) => Rule::exact(P_TRIM_LEN),
        c if ACK_COMMANDS.contains(&c) => Rule::exact(P_BLOCK_ACK_LEN),
        c if REQ_COMMANDS.contains(&c) => Rule::exact(P_BLOCK_REQ_LEN),
        c if REQ_DIGEST_COMMANDS.contains(&c) => Rule::tail(P_BLOCK_REQ_LEN, 1, MAX_DIGEST_LEN),
        c if DESC_COMMANDS.contains(&c) => Rule::exact(P_BLOCK_DESC_LEN),
        c if EMPTY_COMMANDS.contains(&c) => Rule::exact(0),
        c if REQ_STATE_COMMANDS.contains(&c) => Rule::exact(P_REQ_STATE_LEN),
        c if REPLY_COMMANDS.contains(&c) => Rule::exact(P_REQ_STATE_REPLY_LEN),
        c if PROTOCOL_COMMANDS.contains(&c) => {
            if v >= 87 {
                Rule::tail(P_PROTOCOL_LEN, 1, SHARED_SECRET_MAX)
            } else {
                Rule::exact(P_PROTOCOL_LEN)
            }
        }
        c if SYNC_PARAM_COMMANDS.contains(&c) => match v {
            ..=87 => Rule::exact(P_RS_PARAM_LEN),
            88 => Rule::tail(P_RS_PARAM_LEN, 1, SHARED_SECRET_MAX),
            89..=94 => Rule::exact(P_RS_PARAM_89_LEN),
            _ => Rule::exact(P_RS_PARAM_95_LEN),
        },
        C::P_BARRIER => Rule::exact(P_BARRIER_LEN),
        C::P_BARRIER_ACK => Rule::exact(P_BARRIER_ACK_LEN),
        C::P_BITMAP => Rule::tail(0, 0, bitmap_max),
        // `receive_bitmap`: a compressed packet of ≤ 1 byte is "too small".
        C::P_COMPRESSED_BITMAP => Rule::tail(1, 1, bitmap_max - 1),
        C::P_UUIDS => Rule::exact(P_UUIDS_LEN),
        C::P_SIZES if ctx.has(ff::DRBD_FF_WSAME) => Rule::exact(P_SIZES_LEN + O_QLIM_LEN),
        C::P_SIZES => Rule::exact(P_SIZES_LEN),
        C::P_STATE => Rule::exact(P_STATE_LEN),
        C::P_SYNC_UUID => Rule::exact(P_RS_UUID_LEN),
        C::P_DELAY_PROBE => Rule::exact(P_DELAY_PROBE_LEN),
        C::P_CONNECTION_FEATURES => Rule::exact(P_CONNECTION_FEATURES_LEN),
        // 8.4 accepts CHALLENGE_LEN..=2×CHALLENGE_LEN (DRBD 9 exactly CHALLENGE_LEN).
        C::P_AUTH_CHALLENGE => Rule::tail(0, super::CHALLENGE_LEN, 2 * super::CHALLENGE_LEN),
        C::P_AUTH_RESPONSE => Rule::tail(0, 1, MAX_DIGEST_LEN),
        other => {
            let why = match other.value() {
                0x05 | 0x06 => "named in DRBD's enum but never sent",
                0x100 | 0x101 => "a marker value, never sent",
                _ => "DRBD 9 only",
            };
            return Err(WireError::Unsupported {
                cmd: other,
                value: other.value(),
                why,
            });
        }
    };
    Ok(r)
}

/// DRBD's `pkt_size` for a command: the fixed sub-header a receiver reads first (for
/// `P_SIZES` including `o_qlim` when `DRBD_FF_WSAME` is agreed; for data packets
/// including the data-integrity digest). `None` for commands 8.4 does not receive.
pub fn sub_header_len(cmd: Command, ctx: &WireCtx) -> Option<usize> {
    rule(cmd, ctx).ok().map(|r| r.fixed)
}

/// Checks a header's payload length against its command's rule and says how to read it.
/// Call this before reading any payload: it bounds what will be read.
pub fn payload_layout(hdr: &Header, ctx: &WireCtx) -> Result<PayloadLayout, WireError> {
    let cmd = hdr.command;
    let r = rule(cmd, ctx)?;
    let len = hdr.length as usize;
    let got = u64::from(hdr.length);
    if let Some((min, max)) = r.data {
        let Some(data) = len.checked_sub(r.fixed) else {
            return Err(WireError::PayloadSize {
                cmd,
                got,
                expected: Expected::AtLeast(r.fixed as u64),
            });
        };
        let ok =
            u32::try_from(data).is_ok_and(|d| d.is_multiple_of(512) && (min..=max).contains(&d));
        if !ok {
            return Err(WireError::DataLength {
                cmd,
                got: data as u64,
                min,
                max,
            });
        }
        return Ok(PayloadLayout {
            head: r.fixed,
            data,
        });
    }
    let (lo, hi) = (r.fixed + r.tail.0, r.fixed + r.tail.1);
    if !(lo..=hi).contains(&len) {
        let expected = if lo == hi {
            Expected::Exactly(lo as u64)
        } else {
            Expected::Between(lo as u64, hi as u64)
        };
        return Err(WireError::PayloadSize { cmd, got, expected });
    }
    Ok(PayloadLayout { head: len, data: 0 })
}

/// A non-zero multiple of 512 up to `max` (DRBD's rule for request and trim sizes).
fn check_extent(cmd: Command, field: &'static str, v: u32, max: u32) -> Result<(), WireError> {
    let problem = if v == 0 {
        "must not be 0"
    } else if !v.is_multiple_of(512) {
        "is not a multiple of 512"
    } else if v > max {
        if max == DRBD_MAX_BIO_SIZE {
            "exceeds DRBD_MAX_BIO_SIZE (1 MiB)"
        } else {
            "exceeds DRBD_MAX_BATCH_BIO_SIZE (128 MiB)"
        }
    } else {
        return Ok(());
    };
    Err(WireError::BadField {
        cmd,
        field,
        value: u64::from(v),
        problem,
    })
}

fn check_req(cmd: Command, req: &BlockReq) -> Result<(), WireError> {
    check_extent(cmd, "blksize", req.blksize, DRBD_MAX_BIO_SIZE)
}

fn check_wsame(size: u32, data_len: u32) -> Result<(), WireError> {
    check_extent(C::P_WSAME, "size", size, DRBD_MAX_BATCH_BIO_SIZE)?;
    if data_len > size {
        return Err(WireError::BadField {
            cmd: C::P_WSAME,
            field: "size",
            value: u64::from(size),
            problem: "is smaller than the block sent with it",
        });
    }
    Ok(())
}

fn check_compressed(bm: &CompressedBitmap) -> Result<(), WireError> {
    if bm.code_kind() != RLE_VLI_BITS {
        return Err(WireError::BadField {
            cmd: C::P_COMPRESSED_BITMAP,
            field: "encoding & 0x0f",
            value: u64::from(bm.code_kind()),
            problem: "is not RLE_VLI_Bits (2), the only bitmap code",
        });
    }
    Ok(())
}

fn to_u32(cmd: Command, n: usize) -> Result<u32, WireError> {
    u32::try_from(n).map_err(|_| WireError::Encode {
        cmd,
        problem: format!("length {n} overflows u32"),
    })
}

/// Decodes the `head` bytes of a packet whose header is `hdr` (see [`payload_layout`]):
/// for data packets the sub-header (+ digest) only, the data length comes from the header;
/// for all others the whole payload.
pub fn decode(hdr: &Header, head: &[u8], ctx: &WireCtx) -> Result<Packet, WireError> {
    let layout = payload_layout(hdr, ctx)?;
    let cmd = hdr.command;
    if head.len() != layout.head {
        return Err(WireError::HeadLength {
            cmd,
            got: head.len(),
            expected: layout.head,
        });
    }
    let mut r = Reader::new(head, cmd.name());
    let data_len = to_u32(cmd, layout.data)?;
    let pkt = match cmd {
        c if DATA_COMMANDS.contains(&c) => Packet::Data {
            cmd,
            head: DataHeader::get(&mut r)?,
            digest: r.take(ctx.data_digest_len())?.to_vec(),
            data_len,
        },
        C::P_WSAME => {
            let head = DataHeader::get(&mut r)?;
            let size = r.u32()?;
            check_wsame(size, data_len)?;
            Packet::WriteSame {
                head,
                size,
                digest: r.take(ctx.data_digest_len())?.to_vec(),
                data_len,
            }
        }
        c if TRIM_COMMANDS.contains(&c) => {
            let head = DataHeader::get(&mut r)?;
            let size = r.u32()?;
            check_extent(cmd, "size", size, DRBD_MAX_BATCH_BIO_SIZE)?;
            Packet::Trim { cmd, head, size }
        }
        c if ACK_COMMANDS.contains(&c) => Packet::BlockAck {
            cmd,
            ack: BlockAck::get(&mut r)?,
        },
        c if REQ_COMMANDS.contains(&c) || REQ_DIGEST_COMMANDS.contains(&c) => {
            let req = BlockReq::get(&mut r)?;
            check_req(cmd, &req)?;
            Packet::BlockReq {
                cmd,
                req,
                digest: r.rest().to_vec(),
            }
        }
        c if DESC_COMMANDS.contains(&c) => Packet::BlockDesc {
            cmd,
            desc: BlockDesc::get(&mut r)?,
        },
        c if EMPTY_COMMANDS.contains(&c) => Packet::Empty(cmd),
        c if REQ_STATE_COMMANDS.contains(&c) => Packet::ReqState {
            cmd,
            req: ReqState {
                mask: r.u32()?,
                val: r.u32()?,
            },
        },
        c if REPLY_COMMANDS.contains(&c) => Packet::ReqStateReply {
            cmd,
            retcode: i32::from_be_bytes(r.array()?),
        },
        c if PROTOCOL_COMMANDS.contains(&c) => {
            let mut p = Protocol {
                protocol: r.u32()?,
                after_sb_0p: r.u32()?,
                after_sb_1p: r.u32()?,
                after_sb_2p: r.u32()?,
                conn_flags: r.u32()?,
                two_primaries: r.u32()?,
                integrity_alg: AlgName::none(),
            };
            if ctx.version() >= 87 {
                p.integrity_alg = AlgName::get_var(r.rest(), cmd, "integrity_alg")?;
            }
            Packet::Protocol { cmd, protocol: p }
        }
        c if SYNC_PARAM_COMMANDS.contains(&c) => {
            let mut p = SyncParam {
                resync_rate: r.u32()?,
                ..SyncParam::default()
            };
            match ctx.version() {
                ..=87 => {}
                88 => p.verify_alg = AlgName::get_var(r.rest(), cmd, "verify_alg")?,
                v => {
                    p.verify_alg = AlgName::get_fixed(&r.array()?, cmd, "verify_alg")?;
                    p.csums_alg = AlgName::get_fixed(&r.array()?, cmd, "csums_alg")?;
                    if v >= 95 {
                        p.controller = Some(ResyncController {
                            c_plan_ahead: r.u32()?,
                            c_delay_target: r.u32()?,
                            c_fill_target: r.u32()?,
                            c_max_rate: r.u32()?,
                        });
                    }
                }
            }
            Packet::SyncParam { cmd, param: p }
        }
        C::P_BARRIER => Packet::Barrier(Barrier::get(&mut r)?),
        C::P_BARRIER_ACK => Packet::BarrierAck(BarrierAck::get(&mut r)?),
        C::P_BITMAP => Packet::Bitmap(r.rest().to_vec()),
        C::P_COMPRESSED_BITMAP => {
            let bm = CompressedBitmap {
                encoding: r.u8()?,
                code: r.rest().to_vec(),
            };
            check_compressed(&bm)?;
            Packet::CompressedBitmap(bm)
        }
        C::P_UUIDS => Packet::Uuids(Uuids::get(&mut r)?),
        C::P_SIZES => {
            let mut s = Sizes {
                d_size: r.u64()?,
                u_size: r.u64()?,
                c_size: r.u64()?,
                max_bio_size: r.u32()?,
                queue_order_type: r.u16()?,
                dds_flags: r.u16()?,
                qlim: None,
            };
            if ctx.has(ff::DRBD_FF_WSAME) {
                s.qlim = Some(QueueLimits::get(&mut r)?);
            }
            Packet::Sizes(s)
        }
        C::P_STATE => Packet::State(r.u32()?),
        C::P_SYNC_UUID => Packet::SyncUuid(r.u64()?),
        C::P_DELAY_PROBE => Packet::DelayProbe(DelayProbe {
            seq_num: r.u32()?,
            offset: r.u32()?,
        }),
        C::P_CONNECTION_FEATURES => Packet::Features(ConnectionFeatures::get(&mut r)?),
        C::P_AUTH_CHALLENGE => Packet::AuthChallenge(r.rest().to_vec()),
        C::P_AUTH_RESPONSE => Packet::AuthResponse(r.rest().to_vec()),
        // `rule` has already refused every other command.
        other => {
            return Err(WireError::Unsupported {
                cmd: other,
                value: other.value(),
                why: "no decoder",
            })
        }
    };
    Ok(pkt)
}

/// One complete packet found at the start of a buffer by [`decode_frame`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The header.
    pub header: Header,
    /// The decoded packet.
    pub packet: Packet,
    /// The data bytes of a data packet (empty otherwise).
    pub data: &'a [u8],
    /// Bytes the whole packet occupies (header + payload).
    pub len: usize,
}

/// Decodes the packet at the start of `buf` when all of it is there; `Ok(None)` if more
/// bytes are needed. The header and length rules are checked first, so a bad length is
/// an error, never a wait for bytes that would not make it valid.
pub fn decode_frame<'a>(buf: &'a [u8], ctx: &WireCtx) -> Result<Option<Frame<'a>>, WireError> {
    if buf.len() < ctx.header_len() {
        return Ok(None);
    }
    let header = Header::decode(buf, ctx)?;
    let layout = payload_layout(&header, ctx)?;
    let head_end = header.size() + layout.head;
    let end = head_end + layout.data;
    let (Some(head), Some(data)) = (buf.get(header.size()..head_end), buf.get(head_end..end))
    else {
        return Ok(None);
    };
    let packet = decode(&header, head, ctx)?;
    Ok(Some(Frame {
        header,
        packet,
        data,
        len: end,
    }))
}

fn allowed(cmd: Command, set: &[Command], variant: &str) -> Result<(), WireError> {
    if set.contains(&cmd) {
        Ok(())
    } else {
        Err(WireError::Encode {
            cmd,
            problem: format!("Packet::{variant} does not carry this command"),
        })
    }
}

fn encode_error(cmd: Command, problem: &str) -> WireError {
    WireError::Encode {
        cmd,
        problem: problem.to_owned(),
    }
}

/// Writes the payload bytes (for data packets the sub-header + digest) after `out`'s end.
fn put_payload(pkt: &Packet, ctx: &WireCtx, out: &mut Vec<u8>) -> Result<(), WireError> {
    match pkt {
        Packet::Data {
            cmd, head, digest, ..
        } => {
            allowed(*cmd, DATA_COMMANDS, "Data")?;
            head.put(out);
            out.extend_from_slice(digest);
        }
        Packet::WriteSame {
            head,
            size,
            digest,
            data_len,
        } => {
            check_wsame(*size, *data_len)?;
            head.put(out);
            out.extend_from_slice(&size.to_be_bytes());
            out.extend_from_slice(digest);
        }
        Packet::Trim { cmd, head, size } => {
            allowed(*cmd, TRIM_COMMANDS, "Trim")?;
            check_extent(*cmd, "size", *size, DRBD_MAX_BATCH_BIO_SIZE)?;
            head.put(out);
            out.extend_from_slice(&size.to_be_bytes());
        }
        Packet::Barrier(b) => b.put(out),
        Packet::BarrierAck(b) => b.put(out),
        Packet::BlockAck { cmd, ack } => {
            allowed(*cmd, ACK_COMMANDS, "BlockAck")?;
            ack.put(out);
        }
        Packet::BlockReq { cmd, req, digest } => {
            if REQ_DIGEST_COMMANDS.contains(cmd) {
                if digest.is_empty() {
                    return Err(encode_error(*cmd, "the digest is missing"));
                }
            } else {
                allowed(*cmd, REQ_COMMANDS, "BlockReq")?;
                if !digest.is_empty() {
                    return Err(encode_error(*cmd, "this command carries no digest"));
                }
            }
            check_req(*cmd, req)?;
            req.put(out);
            out.extend_from_slice(digest);
        }
        Packet::BlockDesc { cmd, desc } => {
            allowed(*cmd, DESC_COMMANDS, "BlockDesc")?;
            desc.put(out);
        }
        Packet::Features(f) => f.put(out),
        Packet::Protocol { cmd, protocol: p } => {
            allowed(*cmd, PROTOCOL_COMMANDS, "Protocol")?;
            for v in [
                p.protocol,
                p.after_sb_0p,
                p.after_sb_1p,
                p.after_sb_2p,
                p.conn_flags,
                p.two_primaries,
            ] {
                out.extend_from_slice(&v.to_be_bytes());
            }
            if ctx.version() >= 87 {
                p.integrity_alg.put_var(out);
            } else if !p.integrity_alg.is_empty() {
                return Err(encode_error(
                    *cmd,
                    "integrity_alg needs agreed protocol ≥ 87",
                ));
            }
        }
        Packet::SyncParam { cmd, param: p } => {
            allowed(*cmd, SYNC_PARAM_COMMANDS, "SyncParam")?;
            let v = ctx.version();
            if v < 88 && !p.verify_alg.is_empty() {
                return Err(encode_error(*cmd, "verify_alg needs agreed protocol ≥ 88"));
            }
            if v < 89 && !p.csums_alg.is_empty() {
                return Err(encode_error(*cmd, "csums_alg needs agreed protocol ≥ 89"));
            }
            if (v >= 95) != p.controller.is_some() {
                return Err(encode_error(
                    *cmd,
                    "the c_* controller fields are sent iff agreed protocol ≥ 95",
                ));
            }
            out.extend_from_slice(&p.resync_rate.to_be_bytes());
            match v {
                ..=87 => {}
                88 => p.verify_alg.put_var(out),
                _ => {
                    p.verify_alg.put_fixed(out);
                    p.csums_alg.put_fixed(out);
                    if let Some(c) = &p.controller {
                        for x in [
                            c.c_plan_ahead,
                            c.c_delay_target,
                            c.c_fill_target,
                            c.c_max_rate,
                        ] {
                            out.extend_from_slice(&x.to_be_bytes());
                        }
                    }
                }
            }
        }
        Packet::Uuids(u) => u.put(out),
        Packet::Sizes(s) => {
            if ctx.has(ff::DRBD_FF_WSAME) != s.qlim.is_some() {
                return Err(encode_error(
                    C::P_SIZES,
                    "o_qlim is sent iff DRBD_FF_WSAME is agreed",
                ));
            }
            out.extend_from_slice(&s.d_size.to_be_bytes());
            out.extend_from_slice(&s.u_size.to_be_bytes());
            out.extend_from_slice(&s.c_size.to_be_bytes());
            out.extend_from_slice(&s.max_bio_size.to_be_bytes());
            out.extend_from_slice(&s.queue_order_type.to_be_bytes());
            out.extend_from_slice(&s.dds_flags.to_be_bytes());
            if let Some(q) = &s.qlim {
                q.put(out);
            }
        }
        Packet::State(s) => out.extend_from_slice(&s.to_be_bytes()),
        Packet::ReqState { cmd, req } => {
            allowed(*cmd, REQ_STATE_COMMANDS, "ReqState")?;
            out.extend_from_slice(&req.mask.to_be_bytes());
            out.extend_from_slice(&req.val.to_be_bytes());
        }
        Packet::ReqStateReply { cmd, retcode } => {
            allowed(*cmd, REPLY_COMMANDS, "ReqStateReply")?;
            out.extend_from_slice(&retcode.to_be_bytes());
        }
        Packet::SyncUuid(u) => out.extend_from_slice(&u.to_be_bytes()),
        Packet::DelayProbe(d) => {
            out.extend_from_slice(&d.seq_num.to_be_bytes());
            out.extend_from_slice(&d.offset.to_be_bytes());
        }
        Packet::Bitmap(b) | Packet::AuthChallenge(b) | Packet::AuthResponse(b) => {
            out.extend_from_slice(b);
        }
        Packet::CompressedBitmap(bm) => {
            check_compressed(bm)?;
            out.push(bm.encoding);
            out.extend_from_slice(&bm.code);
        }
        Packet::Empty(cmd) => allowed(*cmd, EMPTY_COMMANDS, "Empty")?,
    }
    Ok(())
}

/// Appends `pkt` with its header (kind chosen as DRBD's `prepare_header` does) to `out`.
/// For data packets this writes header + sub-header (+ digest), with the header length
/// covering [`Packet::data_len`] more bytes that the caller appends (or writev's).
/// Everything written obeys the same rules [`decode`] enforces; on error `out` is left
/// as it was.
pub fn encode(
    pkt: &Packet,
    ctx: &WireCtx,
    volume: u16,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    let start = out.len();
    let r = encode_inner(pkt, ctx, volume, out, start);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

fn encode_inner(
    pkt: &Packet,
    ctx: &WireCtx,
    volume: u16,
    out: &mut Vec<u8>,
    start: usize,
) -> Result<(), WireError> {
    let cmd = pkt.command();
    let hl = ctx.header_len();
    out.resize(start + hl, 0);
    put_payload(pkt, ctx, out)?;
    let head_len = out.len() - start - hl;
    let total = (head_len as u64) + u64::from(pkt.data_len());
    let length = u32::try_from(total).map_err(|_| WireError::Encode {
        cmd,
        problem: format!("payload of {total} bytes overflows the header length"),
    })?;
    let header = Header::for_payload(cmd, volume, length, ctx)?;
    // The same length rules the receiver applies (digest sizes, data multiple of 512, …).
    let layout = payload_layout(&header, ctx)?;
    if layout.head != head_len {
        return Err(WireError::Encode {
            cmd,
            problem: format!(
                "{head_len} head bytes written, the layout needs {} (digest length?)",
                layout.head
            ),
        });
    }
    // Encoded after the payload, then moved into its place: no buffer of its own (an
    // `out` that is reused, like `net::link`'s scratch, allocates nothing here).
    let end = out.len();
    header.encode(out)?;
    if out.len() - end != hl {
        return Err(WireError::Encode {
            cmd,
            problem: "header size does not match the context".into(),
        });
    }
    out.copy_within(end.., start);
    out.truncate(end);
    Ok(())
}

/// Appends the header + `p_data` sub-header (+ digest) of a data packet whose
/// `data_len` data bytes the caller sends next. Same as [`encode`] of [`Packet::Data`]
/// without building the packet.
pub fn encode_data_header(
    cmd: Command,
    head: &DataHeader,
    digest: &[u8],
    data_len: u32,
    ctx: &WireCtx,
    volume: u16,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    allowed(cmd, DATA_COMMANDS, "Data")?;
    let start = out.len();
    let r = (|| {
        let sub = P_DATA_LEN + digest.len();
        let total = u64::from(to_u32(cmd, sub)?) + u64::from(data_len);
        let length = u32::try_from(total)
            .map_err(|_| encode_error(cmd, "payload overflows the header length"))?;
        let header = Header::for_payload(cmd, volume, length, ctx)?;
        let layout = payload_layout(&header, ctx)?;
        if layout.head != sub {
            return Err(encode_error(
                cmd,
                "digest length differs from the context's data digest",
            ));
        }
        header.encode(out)?;
        head.put(out);
        out.extend_from_slice(digest);
        Ok(())
    })();
    if r.is_err() {
        out.truncate(start);
    }
    r
}
