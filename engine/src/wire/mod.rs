//! The DRBD packet codec: headers, commands and payloads of DRBD protocol 86–101 (the
//! DRBD 8.4 dialect), as bytes ⇄ typed values. Pure: no IO, no async, no allocation
//! beyond the decoded values; never panics on any input (fuzzed by
//! [`crate::fuzz::packet`]).
//!
//! What it owns, with the numbers (sources in `docs/drbd-reference.md` §1–2):
//! - Headers ([`header`]): `p_header80` (8 bytes, magic 0x83740267, u16 length),
//!   `p_header95` (8 bytes, magic 0x835a, u32 length), `p_header100` (16 bytes, magic
//!   0x8620ec20, volume, pad 0). Before the feature exchange every packet is h80; after
//!   it, h100 if the agreed version is ≥ 100.
//! - Commands ([`Command`]): every value of DRBD's `enum drbd_packet`, DRBD 9-only ones
//!   known but refused.
//! - Payloads ([`payload`], [`Packet`]): every struct a DRBD 8.4 peer sends, big-endian
//!   except the opaque `block_id` (echoed as read) and `p_barrier.barrier` (native-endian
//!   on the sender, echoed raw: kept from `from_ne_bytes`, never byte-swapped).
//! - Length rules ([`payload_layout`]): exact sizes for fixed structs (DRBD's meta socket
//!   reconnects on any mismatch), data ≤ [`DRBD_MAX_BIO_SIZE`] (1 MiB) and a multiple of
//!   512, trim/zeroes ≤ [`DRBD_MAX_BATCH_BIO_SIZE`] (128 MiB), bitmap packets ≤
//!   [`DRBD_SOCKET_BUFFER_SIZE`] (4096) including the header, strings NUL-terminated in
//!   ≤ [`SHARED_SECRET_MAX`] (64) bytes, digests ≤ [`MAX_DIGEST_LEN`] (64) bytes, auth
//!   challenges 64..=128 bytes. So a receiver never reads more than 1 MiB + 92 bytes for
//!   one packet, and knows the bound before reading the payload.
//!
//! Streaming use (what the network layer does):
//! 1. read [`WireCtx::header_len`] bytes, [`Header::decode`];
//! 2. [`payload_layout`] says how many `head` bytes to read (all of a control packet, the
//!    `p_data` sub-header (+ digest) of a data packet) and how many `data` bytes follow;
//! 3. read `head`, [`decode`] it; read the data straight into an aligned buffer.
//!
//! Encoding: [`encode`] appends header + payload (for data packets header + sub-header,
//! with the header length covering `data_len`, so the caller appends or writev's the data).
//!
//! **The byte formats here are DRBD's wire protocol. They must not change without a
//! protocol version or feature-flag bump** (and a kernel DRBD peer cannot be bumped).

pub mod bitmap_xfer;
pub mod command;
pub mod error;
pub mod header;
pub mod packet;
pub mod payload;

#[cfg(test)]
mod golden_tests;

pub use bitmap_xfer::{BitmapError, BitmapReceiver, BitmapSender, XferStats};
pub use command::{Command, Socket};
pub use error::{Expected, WireError};
pub use header::{Header, HeaderKind};
pub use packet::{
    decode, decode_frame, encode, encode_data_header, payload_layout, sub_header_len, Frame,
    Packet, PayloadLayout,
};
pub use payload::*;

/// `DRBD_MAGIC`, the magic of `p_header80`.
pub(crate) const DRBD_MAGIC: u32 = 0x8374_0267;
/// `DRBD_MAGIC_BIG`, the 16-bit magic of `p_header95`.
pub(crate) const DRBD_MAGIC_BIG: u16 = 0x835a;
/// `DRBD_MAGIC_100`, the magic of `p_header100`.
pub(crate) const DRBD_MAGIC_100: u32 = 0x8620_ec20;

/// Oldest protocol version DRBD 8.4 (and tandem) speaks.
pub(crate) const PRO_VERSION_MIN: u32 = 86;
/// Newest protocol version of DRBD 8.4 (and tandem).
pub(crate) const PRO_VERSION_MAX: u32 = 101;
/// The version DRBD assumes before the feature exchange (h80 headers only).
pub(crate) const PRO_VERSION_PRE_FEATURES: u32 = 80;

/// Largest payload a `p_header80` is used for when h95 is available (32 KiB).
pub(crate) const DRBD_MAX_SIZE_H80_PACKET: u32 = 1 << 15;
/// Largest data payload of one packet / one resync request (1 MiB).
pub const DRBD_MAX_BIO_SIZE: u32 = 1 << 20;
/// Largest bio DRBD sends at agreed 95..=99 (128 KiB).
pub(crate) const DRBD_MAX_BIO_SIZE_P95: u32 = 1 << 17;
/// Largest trim / zeroes / write-same extent (64/2 × 4 MiB = 128 MiB).
pub(crate) const DRBD_MAX_BATCH_BIO_SIZE: u32 = 128 << 20;
/// Bitmap packets, header included, fit in this (4096).
pub(crate) const DRBD_SOCKET_BUFFER_SIZE: usize = 4096;
/// Size of DRBD's algorithm-name fields, NUL included (64).
pub(crate) const SHARED_SECRET_MAX: usize = 64;
/// Bytes of an auth challenge DRBD sends (64); 8.4 accepts up to twice that.
pub(crate) const CHALLENGE_LEN: usize = 64;
/// Largest digest accepted (64 bytes, SHA-512/HMAC-SHA-512; crc32c is 4, sha256 32).
pub(crate) const MAX_DIGEST_LEN: usize = 64;
/// Largest write-same data block (one logical block, at most 4096).
pub(crate) const MAX_WSAME_DATA: u32 = 4096;

/// `dp_flags` bits of `p_data` (`DP_*`). Before 95 only `DP_RW_SYNC` is sent.
pub mod dp {
    /// No longer used.
    pub const DP_HARDBARRIER: u32 = 1;
    /// REQ_SYNC.
    pub const DP_RW_SYNC: u32 = 2;
    /// Sent while resyncing: answer P_RS_WRITE_ACK, both sides mark in sync.
    pub const DP_MAY_SET_IN_SYNC: u32 = 4;
    /// Obsolete.
    pub const DP_UNPLUG: u32 = 8;
    /// REQ_FUA.
    pub const DP_FUA: u32 = 16;
    /// REQ_PREFLUSH.
    pub const DP_FLUSH: u32 = 32;
    /// Discard.
    pub const DP_DISCARD: u32 = 64;
    /// Protocol B write (agreed ≥ 100).
    pub const DP_SEND_RECEIVE_ACK: u32 = 128;
    /// Protocol C write (agreed ≥ 100).
    pub const DP_SEND_WRITE_ACK: u32 = 256;
    /// Write-same.
    pub const DP_WSAME: u32 = 512;
    /// Write-zeroes (`DP_DISCARD|DP_ZEROES` = zeroes with unmap).
    pub const DP_ZEROES: u32 = 1024;
}

/// `p_connection_features.feature_flags` bits (`DRBD_FF_*`). Agreed = ours & peer's.
pub mod ff {
    /// `P_TRIM`.
    pub const DRBD_FF_TRIM: u32 = 1;
    /// `P_RS_THIN_REQ` / `P_RS_DEALLOCATED`.
    pub const DRBD_FF_THIN_RESYNC: u32 = 2;
    /// `P_WSAME`, 128 MiB batch bios, and `o_qlim` appended to `P_SIZES`.
    pub const DRBD_FF_WSAME: u32 = 4;
    /// `P_ZEROES`.
    pub const DRBD_FF_WZEROES: u32 = 8;
    /// DRBD 9.
    pub const DRBD_FF_RESYNC_DAGTAG: u32 = 16;
    /// DRBD 9.
    pub const DRBD_FF_2PC_V2: u32 = 32;
    /// DRBD 9.
    pub const DRBD_FF_RS_SKIP_UUID: u32 = 64;
    /// DRBD 9.
    pub const DRBD_FF_RESYNC_WITHOUT_REPLICATION: u32 = 128;
    /// DRBD 9.
    pub const DRBD_FF_BM_BLOCK_SHIFT: u32 = 256;
    /// DRBD 9.
    pub const DRBD_FF_RECONCILE_RECONNECT: u32 = 512;
    /// What in-tree DRBD 8.4 offers: TRIM | THIN_RESYNC | WSAME | WZEROES (0x0f).
    pub const PRO_FEATURES_84: u32 =
        DRBD_FF_TRIM | DRBD_FF_THIN_RESYNC | DRBD_FF_WSAME | DRBD_FF_WZEROES;
}

/// `uuid_flags` bits of `P_UUIDS`.
pub mod uuid_flags {
    /// Discard my data.
    pub const UUID_FLAG_DISCARD_MY_DATA: u64 = 1;
    /// Crashed while Primary.
    pub const UUID_FLAG_CRASHED_PRIMARY: u64 = 2;
    /// My disk is Inconsistent.
    pub const UUID_FLAG_INCONSISTENT: u64 = 4;
    /// Skip the initial sync (agreed ≥ 90).
    pub const UUID_FLAG_SKIP_INITIAL_SYNC: u64 = 8;
}

/// `p_protocol.conn_flags`: discard my data.
pub const CF_DISCARD_MY_DATA: u32 = 1;
/// `p_protocol.conn_flags`: dry run.
pub const CF_DRY_RUN: u32 = 2;
/// `p_sizes.dds_flags`: forced resize.
pub const DDS_FLAG_FORCED: u16 = 1;
/// `p_sizes.dds_flags`: no resync after resize.
pub const DDS_FLAG_NO_RESYNC: u16 = 2;
/// `block_id` of resync requests and their acks (`ID_SYNCER`, all ones).
pub const ID_SYNCER: u64 = u64::MAX;
/// `P_OV_RESULT` block_id (be64): the block is in sync.
pub const ID_IN_SYNC: u64 = 4711;
/// `P_OV_RESULT` block_id (be64): the block is out of sync.
pub const ID_OUT_OF_SYNC: u64 = 4712;
/// `p_compressed_bm.encoding & 0x0f`: the only bitmap code, RLE + VLI bits.
pub const RLE_VLI_BITS: u8 = 2;

/// What both sides agreed on, which decides the header kind and some payload layouts.
///
/// Before the feature exchange use [`WireCtx::pre_features`] (agreed 80: h80 only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WireCtx {
    version: u32,
    features: u32,
    data_digest_len: usize,
}

impl WireCtx {
    /// The context before `P_CONNECTION_FEATURES` has been exchanged.
    pub const fn pre_features() -> Self {
        WireCtx {
            version: PRO_VERSION_PRE_FEATURES,
            features: 0,
            data_digest_len: 0,
        }
    }

    /// An agreed context: `version` in 86..=101, `features` the agreed `DRBD_FF_*` bits.
    pub fn new(version: u32, features: u32) -> Result<Self, WireError> {
        if !(PRO_VERSION_MIN..=PRO_VERSION_MAX).contains(&version) {
            return Err(WireError::BadContext(format!(
                "agreed protocol {version} is outside {PRO_VERSION_MIN}..={PRO_VERSION_MAX}"
            )));
        }
        Ok(WireCtx {
            version,
            features,
            data_digest_len: 0,
        })
    }

    /// The same context with a `data-integrity-alg` digest of `len` bytes on every
    /// P_DATA / P_DATA_REPLY / P_RS_DATA_REPLY / P_WSAME (0 = none; at most 64).
    pub fn with_data_digest(self, len: usize) -> Result<Self, WireError> {
        if len > MAX_DIGEST_LEN {
            return Err(WireError::BadContext(format!(
                "data digest of {len} bytes is longer than {MAX_DIGEST_LEN}"
            )));
        }
        Ok(WireCtx {
            data_digest_len: len,
            ..self
        })
    }

    /// The agreed protocol version (80 before the feature exchange).
    pub const fn version(&self) -> u32 {
        self.version
    }

    /// The agreed `DRBD_FF_*` bits.
    pub const fn features(&self) -> u32 {
        self.features
    }

    /// True if every bit of `flag` was agreed.
    pub const fn has(&self, flag: u32) -> bool {
        self.features & flag == flag
    }

    /// Bytes of the data-integrity digest on data packets.
    pub const fn data_digest_len(&self) -> usize {
        self.data_digest_len
    }

    /// True before the feature exchange.
    pub const fn is_pre_features(&self) -> bool {
        self.version < PRO_VERSION_MIN
    }

    /// Bytes to read for a header: 16 at agreed ≥ 100, else 8 (DRBD's `drbd_header_size`).
    pub const fn header_len(&self) -> usize {
        if self.version >= 100 {
            header::H100_LEN
        } else {
            header::H80_LEN
        }
    }

    /// The largest bio DRBD sends at this version: 32 KiB below 95, 128 KiB at 95..=99,
    /// 1 MiB from 100. (The receiver accepts up to 1 MiB regardless; the peer's
    /// `P_SIZES.max_bio_size` also bounds what may be sent.)
    pub const fn max_bio_size(&self) -> u32 {
        if self.version >= 100 {
            DRBD_MAX_BIO_SIZE
        } else if self.version >= 95 {
            DRBD_MAX_BIO_SIZE_P95
        } else {
            DRBD_MAX_SIZE_H80_PACKET
        }
    }
}

/// DRBD's feature agreement (`drbd_do_features`): a peer `protocol_max` of 0 means its
/// `protocol_min`; fail if the ranges do not overlap; agreed version = min of the maxima;
/// agreed features = ours & theirs.
pub fn agree(ours: &ConnectionFeatures, theirs: &ConnectionFeatures) -> Result<WireCtx, WireError> {
    let peer_max = if theirs.protocol_max == 0 {
        theirs.protocol_min
    } else {
        theirs.protocol_max
    };
    if ours.protocol_max < theirs.protocol_min || ours.protocol_min > peer_max {
        return Err(WireError::NoCommonVersion {
            our_min: ours.protocol_min,
            our_max: ours.protocol_max,
            peer_min: theirs.protocol_min,
            peer_max,
        });
    }
    WireCtx::new(
        ours.protocol_max.min(peer_max),
        ours.feature_flags & theirs.feature_flags,
    )
}
