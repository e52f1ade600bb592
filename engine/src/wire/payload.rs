//! The payload structs of DRBD 8.4 packets, field for field as `drbd_protocol.h` lays
//! them out (offsets in the doc of each struct; all big-endian except `p_barrier.barrier`
//! and the echo of it in `p_barrier_ack`, which are native-endian on the sender).
//!
//! Pads and reserved fields are kept as read, not checked for zero: DRBD does not clear
//! some of them (its send buffer is reused) and does not check them, and keeping them
//! makes re-encoding byte-exact.

use super::error::WireError;
use super::SHARED_SECRET_MAX;

/// `sizeof(struct p_data)`.
pub(crate) const P_DATA_LEN: usize = 24;
/// `sizeof(struct p_trim)` (= `p_wsame`).
pub(crate) const P_TRIM_LEN: usize = 28;
/// `sizeof(struct p_block_ack)`.
pub(crate) const P_BLOCK_ACK_LEN: usize = 24;
/// `sizeof(struct p_block_req)`.
pub(crate) const P_BLOCK_REQ_LEN: usize = 24;
/// `sizeof(struct p_block_desc)`.
pub(crate) const P_BLOCK_DESC_LEN: usize = 16;
/// `sizeof(struct p_barrier)`.
pub(crate) const P_BARRIER_LEN: usize = 8;
/// `sizeof(struct p_barrier_ack)`.
pub(crate) const P_BARRIER_ACK_LEN: usize = 8;
/// `sizeof(struct p_connection_features)`.
pub(crate) const P_CONNECTION_FEATURES_LEN: usize = 72;
/// `sizeof(struct p_protocol)` without the integrity_alg string.
pub(crate) const P_PROTOCOL_LEN: usize = 24;
/// `sizeof(struct p_rs_param)` (agreed ≤ 88) without the verify_alg string.
pub(crate) const P_RS_PARAM_LEN: usize = 4;
/// `sizeof(struct p_rs_param_89)` (agreed 89..=94).
pub(crate) const P_RS_PARAM_89_LEN: usize = 132;
/// `sizeof(struct p_rs_param_95)` (agreed ≥ 95).
pub(crate) const P_RS_PARAM_95_LEN: usize = 148;
/// `sizeof(struct p_uuids)`.
pub(crate) const P_UUIDS_LEN: usize = 48;
/// `sizeof(struct p_sizes)`.
pub(crate) const P_SIZES_LEN: usize = 32;
/// `sizeof(struct o_qlim)`, appended to `p_sizes` iff `DRBD_FF_WSAME` is agreed.
pub(crate) const O_QLIM_LEN: usize = 24;
/// `sizeof(struct p_state)`.
pub(crate) const P_STATE_LEN: usize = 4;
/// `sizeof(struct p_req_state)`.
pub(crate) const P_REQ_STATE_LEN: usize = 8;
/// `sizeof(struct p_req_state_reply)`.
pub(crate) const P_REQ_STATE_REPLY_LEN: usize = 4;
/// `sizeof(struct p_rs_uuid)`.
pub(crate) const P_RS_UUID_LEN: usize = 8;
/// `sizeof(struct p_delay_probe93)`.
pub(crate) const P_DELAY_PROBE_LEN: usize = 8;

// Each struct's last field ends exactly at its size (offset of the last field + width).
const _: () = assert!(20 + 4 == P_DATA_LEN); // dp_flags at 20
const _: () = assert!(P_DATA_LEN + 4 == P_TRIM_LEN); // size at 24
const _: () = assert!(20 + 4 == P_BLOCK_ACK_LEN); // seq_num at 20
const _: () = assert!(20 + 4 == P_BLOCK_REQ_LEN); // pad at 20
const _: () = assert!(12 + 4 == P_BLOCK_DESC_LEN); // pad at 12
const _: () = assert!(4 + 4 == P_BARRIER_LEN);
const _: () = assert!(4 + 4 == P_BARRIER_ACK_LEN);
const _: () = assert!(16 + 7 * 8 == P_CONNECTION_FEATURES_LEN); // 8.4: reserved[7] at 16
const _: () = assert!(24 + 6 * 8 == P_CONNECTION_FEATURES_LEN); // DRBD 9: reserved[6] at 24
const _: () = assert!(6 * 4 == P_PROTOCOL_LEN);
const _: () = assert!(4 + 2 * SHARED_SECRET_MAX == P_RS_PARAM_89_LEN);
const _: () = assert!(P_RS_PARAM_89_LEN + 4 * 4 == P_RS_PARAM_95_LEN);
const _: () = assert!(40 + 8 == P_UUIDS_LEN); // uuid_flags at 40
const _: () = assert!(30 + 2 == P_SIZES_LEN); // dds_flags at 30
const _: () = assert!(23 + 1 == O_QLIM_LEN); // pad at 23
const _: () = assert!(4 + 4 == P_REQ_STATE_LEN);
const _: () = assert!(4 + 4 == P_DELAY_PROBE_LEN);

/// A bounds-checked big-endian reader over a payload.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                what: self.what,
                have: self.buf.len(),
                need: n,
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn ne32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_ne_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// `struct p_data` (24 bytes): 0 sector, 8 block_id, 16 seq_num, 20 dp_flags. Also the
/// first 24 bytes of `p_trim` / `p_wsame`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataHeader {
    /// Start, in 512-byte sectors.
    pub sector: u64,
    /// Opaque request handle, echoed by the peer in its ack.
    pub block_id: u64,
    /// Sequence number (two-primaries conflict ordering).
    pub seq_num: u32,
    /// `DP_*` bits ([`super::dp`]).
    pub dp_flags: u32,
}

impl DataHeader {
    pub(crate) fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(DataHeader {
            sector: r.u64()?,
            block_id: r.u64()?,
            seq_num: r.u32()?,
            dp_flags: r.u32()?,
        })
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.sector.to_be_bytes());
        out.extend_from_slice(&self.block_id.to_be_bytes());
        out.extend_from_slice(&self.seq_num.to_be_bytes());
        out.extend_from_slice(&self.dp_flags.to_be_bytes());
    }
}

/// `struct p_block_ack` (24 bytes): 0 sector, 8 block_id (echoed), 16 blksize, 20 seq_num.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockAck {
    /// Start, in sectors.
    pub sector: u64,
    /// The request's block_id, echoed (`P_OV_RESULT`: 4711 / 4712).
    pub block_id: u64,
    /// Bytes acknowledged.
    pub blksize: u32,
    /// Sequence number.
    pub seq_num: u32,
}

impl BlockAck {
    pub(crate) fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(BlockAck {
            sector: r.u64()?,
            block_id: r.u64()?,
            blksize: r.u32()?,
            seq_num: r.u32()?,
        })
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.sector.to_be_bytes());
        out.extend_from_slice(&self.block_id.to_be_bytes());
        out.extend_from_slice(&self.blksize.to_be_bytes());
        out.extend_from_slice(&self.seq_num.to_be_bytes());
    }
}

/// `struct p_block_req` (24 bytes): 0 sector, 8 block_id, 16 blksize, 20 pad.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockReq {
    /// Start, in sectors.
    pub sector: u64,
    /// Opaque handle echoed in the reply (`ID_SYNCER` for resync).
    pub block_id: u64,
    /// Bytes requested: a non-zero multiple of 512, ≤ 1 MiB.
    pub blksize: u32,
    /// Padding as sent.
    pub pad: u32,
}

impl BlockReq {
    pub(crate) fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(BlockReq {
            sector: r.u64()?,
            block_id: r.u64()?,
            blksize: r.u32()?,
            pad: r.u32()?,
        })
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.sector.to_be_bytes());
        out.extend_from_slice(&self.block_id.to_be_bytes());
        out.extend_from_slice(&self.blksize.to_be_bytes());
        out.extend_from_slice(&self.pad.to_be_bytes());
    }
}

/// `struct p_block_desc` (16 bytes): 0 sector, 8 blksize, 12 pad.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockDesc {
    /// Start, in sectors.
    pub sector: u64,
    /// Bytes described.
    pub blksize: u32,
    /// Padding as sent.
    pub pad: u32,
}

impl BlockDesc {
    pub(crate) fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(BlockDesc {
            sector: r.u64()?,
            blksize: r.u32()?,
            pad: r.u32()?,
        })
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.sector.to_be_bytes());
        out.extend_from_slice(&self.blksize.to_be_bytes());
        out.extend_from_slice(&self.pad.to_be_bytes());
    }
}

/// `struct p_barrier` (8 bytes): 0 barrier (OPAQUE, sender's native byte order), 4 pad.
///
/// `barrier` is read with `from_ne_bytes` and written with `to_ne_bytes`: the value the
/// peer sent goes back byte for byte in `P_BARRIER_ACK`. Never byte-swap it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Barrier {
    /// Epoch number handle, native-endian.
    pub barrier: u32,
    /// Padding as sent.
    pub pad: u32,
}

impl Barrier {
    pub(crate) fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Barrier {
            barrier: r.ne32()?,
            pad: r.u32()?,
        })
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.barrier.to_ne_bytes());
        out.extend_from_slice(&self.pad.to_be_bytes());
    }
}

/// `struct p_barrier_ack` (8 bytes): 0 barrier (echo of `p_barrier.barrier`, raw),
/// 4 set_size (writes in the epoch, big-endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BarrierAck {
    /// The barrier handle exactly as received, native-endian.
    pub barrier: u32,
    /// Number of writes in the epoch.
    pub set_size: u32,
}

impl BarrierAck {
    pub(crate) fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(BarrierAck {
            barrier: r.ne32()?,
            set_size: r.u32()?,
        })
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.barrier.to_ne_bytes());
        out.extend_from_slice(&self.set_size.to_be_bytes());
    }
}

/// `struct p_connection_features` (72 bytes): 0 protocol_min, 4 feature_flags,
/// 8 protocol_max, then 8.4's `_pad` + `reserved[7]` which DRBD 9 reads as
/// 12 sender_node_id, 16 receiver_node_id, 20 `_pad`, 24 `reserved[6]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionFeatures {
    /// Oldest protocol version spoken.
    pub protocol_min: u32,
    /// `DRBD_FF_*` bits offered.
    pub feature_flags: u32,
    /// Newest protocol version spoken (0 means = protocol_min).
    pub protocol_max: u32,
    /// DRBD 9's sender node id (8.4: pad), as sent.
    pub sender_node_id: u32,
    /// DRBD 9's receiver node id (8.4: reserved), as sent.
    pub receiver_node_id: u32,
    /// Bytes 20..72, as sent (zero from DRBD).
    pub reserved: [u8; 52],
}

impl ConnectionFeatures {
    /// What a DRBD 8.4 node sends with these feature bits: 86..=101, everything else 0.
    pub const fn drbd84(feature_flags: u32) -> Self {
        ConnectionFeatures {
            protocol_min: super::PRO_VERSION_MIN,
            feature_flags,
            protocol_max: super::PRO_VERSION_MAX,
            sender_node_id: 0,
            receiver_node_id: 0,
            reserved: [0; 52],
        }
    }

    pub(crate) fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(ConnectionFeatures {
            protocol_min: r.u32()?,
            feature_flags: r.u32()?,
            protocol_max: r.u32()?,
            sender_node_id: r.u32()?,
            receiver_node_id: r.u32()?,
            reserved: r.array()?,
        })
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.protocol_min.to_be_bytes());
        out.extend_from_slice(&self.feature_flags.to_be_bytes());
        out.extend_from_slice(&self.protocol_max.to_be_bytes());
        out.extend_from_slice(&self.sender_node_id.to_be_bytes());
        out.extend_from_slice(&self.receiver_node_id.to_be_bytes());
        out.extend_from_slice(&self.reserved);
    }
}

/// A crypto algorithm name as DRBD carries it (`integrity_alg`, `verify_alg`,
/// `csums_alg`): at most 63 printable ASCII bytes, so that it fits a 64-byte field with
/// its NUL. Empty means "none".
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AlgName(String);

impl AlgName {
    /// Validates a name (0..=63 printable ASCII bytes, no NUL).
    pub fn new(name: &str) -> Result<Self, WireError> {
        if name.len() < SHARED_SECRET_MAX && name.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(AlgName(name.to_owned()))
        } else {
            Err(WireError::BadAlgName(name.chars().take(80).collect()))
        }
    }

    /// The empty name ("no algorithm").
    pub const fn none() -> Self {
        AlgName(String::new())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for the empty name.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses name bytes (before the NUL).
    fn from_bytes(b: &[u8], cmd: super::Command, field: &'static str) -> Result<Self, WireError> {
        if b.len() >= SHARED_SECRET_MAX || !b.iter().all(u8::is_ascii_graphic) {
            return Err(WireError::BadString {
                cmd,
                field,
                problem: "is not 0..=63 printable ASCII characters before its NUL",
            });
        }
        // All bytes are ASCII, so this is valid UTF-8.
        Ok(AlgName(b.iter().map(|&c| char::from(c)).collect()))
    }

    /// Decodes a variable-length string field: name bytes + exactly one NUL, at the end
    /// (what DRBD sends: `strlen + 1` bytes). `b` is 1..=64 bytes (checked by the layout).
    pub(crate) fn get_var(
        b: &[u8],
        cmd: super::Command,
        field: &'static str,
    ) -> Result<Self, WireError> {
        match b.split_last() {
            Some((0, name)) if !name.contains(&0) => Self::from_bytes(name, cmd, field),
            Some((0, _)) => Err(WireError::BadString {
                cmd,
                field,
                problem: "has bytes after its first NUL",
            }),
            _ => Err(WireError::BadString {
                cmd,
                field,
                problem: "is not NUL-terminated",
            }),
        }
    }

    /// Appends name + NUL (`strlen + 1` bytes).
    pub(crate) fn put_var(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.0.as_bytes());
        out.push(0);
    }

    /// Decodes a fixed `char[64]` field: name, NUL, zero padding (DRBD memsets the
    /// field before `strcpy`).
    pub(crate) fn get_fixed(
        b: &[u8; SHARED_SECRET_MAX],
        cmd: super::Command,
        field: &'static str,
    ) -> Result<Self, WireError> {
        let Some(nul) = b.iter().position(|&c| c == 0) else {
            return Err(WireError::BadString {
                cmd,
                field,
                problem: "is not NUL-terminated within its 64 bytes",
            });
        };
        let (name, pad) = b.split_at(nul);
        if pad.iter().any(|&c| c != 0) {
            return Err(WireError::BadString {
                cmd,
                field,
                problem: "has non-zero bytes after its NUL",
            });
        }
        Self::from_bytes(name, cmd, field)
    }

    /// Appends the fixed `char[64]` form.
    pub(crate) fn put_fixed(&self, out: &mut Vec<u8>) {
        let mut a = [0u8; SHARED_SECRET_MAX];
        let n = self.0.len().min(SHARED_SECRET_MAX - 1);
        if let (Some(dst), Some(src)) = (a.get_mut(..n), self.0.as_bytes().get(..n)) {
            dst.copy_from_slice(src);
        }
        out.extend_from_slice(&a);
    }
}

/// `struct p_protocol` (24 bytes: protocol, after_sb_0p, after_sb_1p, after_sb_2p,
/// conn_flags, two_primaries) + from agreed 87 the NUL-terminated `integrity_alg`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Protocol {
    /// Wire protocol: 1 = A, 2 = B, 3 = C.
    pub protocol: u32,
    /// after-sb-0pri policy.
    pub after_sb_0p: u32,
    /// after-sb-1pri policy.
    pub after_sb_1p: u32,
    /// after-sb-2pri policy.
    pub after_sb_2p: u32,
    /// `CF_DISCARD_MY_DATA` | `CF_DRY_RUN`.
    pub conn_flags: u32,
    /// allow-two-primaries.
    pub two_primaries: u32,
    /// data-integrity-alg (must be empty below agreed 87, where it is not sent).
    pub integrity_alg: AlgName,
}

/// The dynamic resync controller settings of `p_rs_param_95` (agreed ≥ 95).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResyncController {
    /// c-plan-ahead, 0.1 s units (0 disables the controller).
    pub c_plan_ahead: u32,
    /// c-delay-target, 0.1 s units.
    pub c_delay_target: u32,
    /// c-fill-target, sectors.
    pub c_fill_target: u32,
    /// c-max-rate, KiB/s.
    pub c_max_rate: u32,
}

/// `P_SYNC_PARAM` / `P_SYNC_PARAM89`, whose layout DRBD picks by the agreed version (not
/// by the command): ≤ 87 `p_rs_param` (4 bytes); 88 `p_rs_param` + NUL-terminated
/// verify_alg; 89..=94 `p_rs_param_89` (132: 0 resync_rate, 4 `verify_alg[64]`,
/// 68 `csums_alg[64]`); ≥ 95 `p_rs_param_95` (148: + 132 c_plan_ahead, 136 c_delay_target,
/// 140 c_fill_target, 144 c_max_rate).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncParam {
    /// resync-rate, KiB/s.
    pub resync_rate: u32,
    /// verify-alg (agreed ≥ 88).
    pub verify_alg: AlgName,
    /// csums-alg (agreed ≥ 89).
    pub csums_alg: AlgName,
    /// Controller settings: `Some` iff agreed ≥ 95.
    pub controller: Option<ResyncController>,
}

/// `struct p_uuids` (48 bytes): 0 current, 8 bitmap, 16 `history[0]`, 24 `history[1]`,
/// 32 dirty_bits, 40 uuid_flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Uuids {
    /// Current data generation UUID (bit 0: was Primary).
    pub current: u64,
    /// Bitmap UUID (0 when no bitmap is in use).
    pub bitmap: u64,
    /// History UUIDs.
    pub history: [u64; 2],
    /// Number of set bitmap bits.
    pub dirty_bits: u64,
    /// `UUID_FLAG_*` bits.
    pub uuid_flags: u64,
}

impl Uuids {
    pub(crate) fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Uuids {
            current: r.u64()?,
            bitmap: r.u64()?,
            history: [r.u64()?, r.u64()?],
            dirty_bits: r.u64()?,
            uuid_flags: r.u64()?,
        })
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        for v in [
            self.current,
            self.bitmap,
            self.history[0],
            self.history[1],
            self.dirty_bits,
            self.uuid_flags,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

/// `struct o_qlim` (24 bytes): 0 physical_block_size, 4 logical_block_size,
/// 8 alignment_offset, 12 io_min, 16 io_opt, 20 discard_enabled, 21 discard_zeroes_data,
/// 22 write_same_capable, 23 pad. The u8 flags are kept raw (0/1 from DRBD).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueLimits {
    /// Physical block size, bytes.
    pub physical_block_size: u32,
    /// Logical block size, bytes.
    pub logical_block_size: u32,
    /// Alignment offset, bytes.
    pub alignment_offset: u32,
    /// Minimum IO size, bytes.
    pub io_min: u32,
    /// Optimal IO size, bytes.
    pub io_opt: u32,
    /// Discard supported (0/1).
    pub discard_enabled: u8,
    /// Discard returns zeroes (0/1).
    pub discard_zeroes_data: u8,
    /// Write-same supported (0/1).
    pub write_same_capable: u8,
    /// Padding as sent.
    pub pad: u8,
}

impl QueueLimits {
    pub(crate) fn get(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(QueueLimits {
            physical_block_size: r.u32()?,
            logical_block_size: r.u32()?,
            alignment_offset: r.u32()?,
            io_min: r.u32()?,
            io_opt: r.u32()?,
            discard_enabled: r.u8()?,
            discard_zeroes_data: r.u8()?,
            write_same_capable: r.u8()?,
            pad: r.u8()?,
        })
    }

    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        for v in [
            self.physical_block_size,
            self.logical_block_size,
            self.alignment_offset,
            self.io_min,
            self.io_opt,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&[
            self.discard_enabled,
            self.discard_zeroes_data,
            self.write_same_capable,
            self.pad,
        ]);
    }
}

/// `struct p_sizes` (32 bytes): 0 d_size, 8 u_size, 16 c_size (sectors), 24 max_bio_size,
/// 28 queue_order_type, 30 dds_flags; + `o_qlim` iff `DRBD_FF_WSAME` is agreed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sizes {
    /// Backing device's maximum capacity, sectors.
    pub d_size: u64,
    /// User-set size, sectors.
    pub u_size: u64,
    /// Current exported size, sectors (0 when the sender wants a reply).
    pub c_size: u64,
    /// Largest bio the sender accepts, bytes.
    pub max_bio_size: u32,
    /// Unused by DRBD.
    pub queue_order_type: u16,
    /// `DDS_FLAG_*` bits.
    pub dds_flags: u16,
    /// Queue limits: `Some` iff `DRBD_FF_WSAME` is agreed.
    pub qlim: Option<QueueLimits>,
}

/// Bit layout of DRBD's `union drbd_state` as sent in `P_STATE` (`cpu_to_be32(state.i)`;
/// the bitfield order is mirrored on big-endian hosts, so the integer is portable):
/// `role | peer<<2 | conn<<4 | disk<<9 | pdsk<<13 | susp<<17 | aftr_isp<<18 |
/// peer_isp<<19 | user_isp<<20 | susp_nod<<21 | susp_fen<<22`. Bits 23.. (DRBD 9's quorum
/// and later) are kept in `upper`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateBits {
    /// 2 bits: 0 Unknown, 1 Primary, 2 Secondary.
    pub role: u8,
    /// 2 bits: the peer's role.
    pub peer: u8,
    /// 5 bits: connection state (0 StandAlone … 10 Connected … 23 Behind).
    pub conn: u8,
    /// 4 bits: disk state (0 Diskless … 8 UpToDate).
    pub disk: u8,
    /// 4 bits: the peer's disk state.
    pub pdsk: u8,
    /// IO suspended.
    pub susp: bool,
    /// Resync paused by a dependency.
    pub aftr_isp: bool,
    /// Resync paused by the peer.
    pub peer_isp: bool,
    /// Resync paused by the user.
    pub user_isp: bool,
    /// IO suspended: no data.
    pub susp_nod: bool,
    /// IO suspended: fencing.
    pub susp_fen: bool,
    /// Bits 23..=31, shifted down (unused by 8.4).
    pub upper: u16,
}

const STATE_FIELDS: [(u32, u32); 5] = [(0, 2), (2, 2), (4, 5), (9, 4), (13, 4)];

impl StateBits {
    /// Splits a state word into fields. Total: every u32 has a representation.
    pub fn unpack(word: u32) -> Self {
        let field = |(shift, width): (u32, u32)| -> u8 {
            // Masked to ≤ 5 bits, so it always fits a u8.
            u8::try_from((word >> shift) & ((1 << width) - 1)).unwrap_or(0)
        };
        let [role, peer, conn, disk, pdsk] = STATE_FIELDS;
        let bit = |n: u32| word & (1 << n) != 0;
        StateBits {
            role: field(role),
            peer: field(peer),
            conn: field(conn),
            disk: field(disk),
            pdsk: field(pdsk),
            susp: bit(17),
            aftr_isp: bit(18),
            peer_isp: bit(19),
            user_isp: bit(20),
            susp_nod: bit(21),
            susp_fen: bit(22),
            upper: u16::try_from(word >> 23).unwrap_or(0),
        }
    }

    /// Packs the fields into a state word; fails if a field exceeds its bit width.
    pub fn pack(&self) -> Result<u32, WireError> {
        let vals = [self.role, self.peer, self.conn, self.disk, self.pdsk];
        let names = ["role", "peer", "conn", "disk", "pdsk"];
        let mut word = 0u32;
        for ((&(shift, width), v), name) in STATE_FIELDS.iter().zip(vals).zip(names) {
            if u32::from(v) >= 1 << width {
                return Err(WireError::BadField {
                    cmd: super::Command::P_STATE,
                    field: name,
                    value: u64::from(v),
                    problem: "does not fit its bit field of union drbd_state",
                });
            }
            word |= u32::from(v) << shift;
        }
        if self.upper >= 1 << 9 {
            return Err(WireError::BadField {
                cmd: super::Command::P_STATE,
                field: "upper",
                value: u64::from(self.upper),
                problem: "does not fit bits 23..=31",
            });
        }
        for (n, b) in [
            (17, self.susp),
            (18, self.aftr_isp),
            (19, self.peer_isp),
            (20, self.user_isp),
            (21, self.susp_nod),
            (22, self.susp_fen),
        ] {
            word |= u32::from(b) << n;
        }
        Ok(word | (u32::from(self.upper) << 23))
    }
}

/// DRBD's name of a role value.
pub fn role_name(v: u8) -> Option<&'static str> {
    ["Unknown", "Primary", "Secondary"]
        .get(usize::from(v))
        .copied()
}

/// DRBD 8.4's name of a connection state value.
pub fn conn_name(v: u8) -> Option<&'static str> {
    [
        "StandAlone",
        "Disconnecting",
        "Unconnected",
        "Timeout",
        "BrokenPipe",
        "NetworkFailure",
        "ProtocolError",
        "TearDown",
        "WFConnection",
        "WFReportParams",
        "Connected",
        "StartingSyncS",
        "StartingSyncT",
        "WFBitMapS",
        "WFBitMapT",
        "WFSyncUUID",
        "SyncSource",
        "SyncTarget",
        "VerifyS",
        "VerifyT",
        "PausedSyncS",
        "PausedSyncT",
        "Ahead",
        "Behind",
    ]
    .get(usize::from(v))
    .copied()
}

/// DRBD's name of a disk state value.
pub fn disk_name(v: u8) -> Option<&'static str> {
    [
        "Diskless",
        "Attaching",
        "Failed",
        "Negotiating",
        "Inconsistent",
        "Outdated",
        "DUnknown",
        "Consistent",
        "UpToDate",
    ]
    .get(usize::from(v))
    .copied()
}

/// `struct p_req_state` (8 bytes): 0 mask, 4 val (both `union drbd_state` words).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReqState {
    /// Which state bits to change.
    pub mask: u32,
    /// Their new values.
    pub val: u32,
}

/// `struct p_delay_probe93` (8 bytes): 0 seq_num, 4 offset (µs). Ignored by receivers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DelayProbe {
    /// Sequence number matching the two probes.
    pub seq_num: u32,
    /// Microseconds after the reference point.
    pub offset: u32,
}

/// `struct p_compressed_bm`: 1 encoding byte + code bytes (not decoded here).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompressedBitmap {
    /// `encoding & 0x0f` = code (2 = RLE_VLI_Bits), `(encoding >> 4) & 7` = pad bits,
    /// `encoding & 0x80` = first run is set bits.
    pub encoding: u8,
    /// The VLI bitstream.
    pub code: Vec<u8>,
}

impl CompressedBitmap {
    /// The code (`encoding & 0x0f`); DRBD knows only [`super::RLE_VLI_BITS`].
    pub fn code_kind(&self) -> u8 {
        self.encoding & 0x0f
    }

    /// Trailing zero bits in the last code byte.
    pub fn pad_bits(&self) -> u8 {
        (self.encoding >> 4) & 7
    }

    /// True if the first run is of set bits.
    pub fn first_run_set(&self) -> bool {
        self.encoding & 0x80 != 0
    }
}
