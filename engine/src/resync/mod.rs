//! The resync core: sans-IO state machines for bitmap-based resync, checksum resync and
//! online verify, with DRBD's dynamic rate controller (docs/drbd-reference.md §6, §9).
//!
//! Like [`crate::request`], nothing here owns a socket, a file, a clock or a data buffer.
//! A driver calls a method per event (a controller step every 100 ms, a packet from the
//! peer, a local read or write completion, an application write starting or ending) and
//! drains the outputs (send this packet, read or write this range, let that application
//! write go). Data stays in the driver's buffers, keyed by the tags the outputs carry.
//!
//! - [`Controller`]: sectors to request per 100 ms step (DRBD: `drbd_rs_controller`,
//!   `drbd_rs_number_requests`)
//! - [`MinRateThrottle`]: hold resync back to `c-min-rate` while the application uses the disk
//!   (DRBD: `drbd_rs_c_min_rate_throttle`)
//! - [`Target`]: the SyncTarget: walks its bitmap, requests, writes replies, acks (DRBD:
//!   `make_resync_request`, `receive_RSDataReply`, `e_end_resync_block`, `got_IsInSync`,
//!   `got_NegRSDReply`, `receive_rs_deallocated`)
//! - [`Source`]: the SyncSource: reads, compares digests, replies (DRBD: `receive_DataRequest`,
//!   `w_e_end_rsdata_req`, `w_e_end_csum_rs_req`, `got_BlockAck` (`ID_SYNCER`))
//! - [`VerifySource`], [`VerifyPeer`]: online verify (DRBD: `make_ov_request`, `w_e_end_ov_req`,
//!   `w_e_end_ov_reply`, `got_OVResult`)
//!
//! Directions (who sends what):
//!
//! ```text
//! SyncTarget                                   SyncSource
//!   P_RS_DATA_REQUEST / P_RS_THIN_REQ   ──data──▶  read
//!   P_CSUM_RS_REQUEST (+ digest)        ──data──▶  read + digest
//!   write, clear bits       ◀──data── P_RS_DATA_REPLY (+ data)
//!   write zeroes            ◀──data── P_RS_DEALLOCATED (thin request, all-zero range)
//!   clear bits              ◀──meta── P_RS_IS_IN_SYNC  (digests equal; source clears too)
//!   count failure           ◀──meta── P_NEG_RS_DREPLY  (source read failed)
//!   P_RS_WRITE_ACK (after the write)    ──meta──▶  clear bits
//!   P_NEG_ACK (local write failed)      ──meta──▶  count failure
//! VerifySource                                 VerifyPeer
//!   P_OV_REQUEST                        ──data──▶  read + digest
//!   read + digest, compare  ◀──data── P_OV_REPLY (+ digest)
//!   P_OV_RESULT (4711 in sync / 4712 not) ──meta──▶  mark out of sync
//! ```
//!
//! Digests (`csums-alg`, `verify-alg`): only DRBD's `"crc32c"` — the kernel crypto API's
//! crc32c, i.e. the standard CRC-32C (Castagnoli, init and final XOR all ones) stored
//! little-endian: [`DIGEST_LEN`] = 4 bytes on the wire after the `p_block_req`, one digest
//! over the whole request (up to 1 MiB), computed by the driver with [`Digest::of`].
//!
//! Bounds: the target keeps at most `max_requests` requests in flight (and the controller
//! at most `max-buffers/2` blocks unanswered), tracks at most `max_app_writes` application
//! writes and `MAX_FAILED_RANGES` failed ranges; the source queues at most `max_queue`
//! requests and reads at most `max_reads` at once (the driver stops reading the data
//! socket while [`Source::can_accept`] is false); verify likewise. Requests are at most
//! the peer's max bio size (≤ [`crate::wire::DRBD_MAX_BIO_SIZE`], 1 MiB) and never cross a
//! 16 MiB resync extent ([`EXTENT_BLOCKS`]).

//! Driving it (what the connection/volume driver does):
//!
//! - At the end of the bitmap exchange, the SyncTarget builds a [`Target`] over the merged
//!   bitmap (`start_block` = the persisted [`Target::resume_position`], 0 the first time)
//!   and the SyncSource a [`Source`]; both call `tick` every [`SLEEP_TIME_MS`] with a
//!   [`TickInput`] (monotonic ms, the count of non-resync IO sectors on the backing device,
//!   socket congestion).
//! - Sends: every output with a packet ([`TargetOutput::packet`], …) goes to the socket
//!   the command belongs to (requests and data on the data socket, acks on the meta
//!   socket). A `P_RS_DATA_REPLY` is the packet plus the read's buffer.
//! - Receives: [`Inbound::from_packet`] says which input a packet is; resync acks are
//!   those with `block_id` = `ID_SYNCER`, the others stay with the write pipeline.
//! - Local IO: `ReadForDigest`/`ReadLocal`/`WriteZeroes` and the tag returned by
//!   [`Target::data_reply`] are submitted to the backing device and reported back with
//!   their tag.
//! - Application writes: every write to the local disk that is not resync's is reported to
//!   the local machine (`app_write_begin`/`app_write_end`), on the target with the life
//!   spans given in `target.rs`. A write the target holds is submitted on
//!   [`TargetOutput::AppWriteReady`]. Writes acked with `P_RS_WRITE_ACK`
//!   (`DP_MAY_SET_IN_SYNC`) clear bits through [`Target::set_in_sync`]; blocks that go out
//!   of sync during the run are reported with [`Target::mark_out_of_sync`].
//! - Neither machine owns a bitmap: the node has one (the driver's), and every call that
//!   reads or changes it borrows it. The driver writes the target's cleared bits lazily,
//!   and on disconnect keeps [`Target::resume_position`]. On [`TargetOutput::Finished`]
//!   with `left_blocks` 0 the disk becomes UpToDate. [`SourceOutput::SetInSync`] says
//!   what to clear on the source's side. The runs of a node (ids, held writes, the end,
//!   a connection loss) are `replica::SyncRuns`'s.
//! - `pause-sync`/`resume-sync`: [`Target::pause`], [`Target::resume`]; status:
//!   [`Target::progress`], [`Source::stats`], [`VerifySource::progress`].

pub mod controller;
mod packets;
mod slab;
mod source;
mod target;
mod verify;

#[cfg(test)]
mod harness_tests;

pub use controller::{
    Controller, MinRateThrottle, RateConfig, RateConfigError, Step, SyncMarks, SLEEP_TIME_MS,
};
pub use packets::Inbound;
pub use source::{ReadOutcome, RequestKind, Source, SourceConfig, SourceOutput, SourceStats};
#[cfg(test)]
pub(crate) use target::TargetSabotage;
pub use target::{
    ResyncSummary, Target, TargetConfig, TargetOutput, TargetProgress, MAX_FAILED_RANGES,
};
pub use verify::{
    VerifyConfig, VerifyOutput, VerifyPeer, VerifyProgress, VerifySource, MAX_REPORTED_RANGES,
};

pub use crate::request::Error;

use crate::request::{BLOCK_SIZE, SECTOR};

/// Name of the only digest algorithm (`csums-alg`, `verify-alg`), as DRBD spells it.
pub const DIGEST_ALG: &str = "crc32c";

/// Digest bytes on the wire (crc32c).
pub(crate) const DIGEST_LEN: usize = 4;

/// log2 of the resync extent in bytes (DRBD's `BM_EXT_SHIFT`, 16 MiB).
pub(crate) const EXTENT_SHIFT: u32 = 24;

/// Bitmap blocks per resync extent (4096 × 4 KiB = 16 MiB).
pub(crate) const EXTENT_BLOCKS: u64 = 1 << (EXTENT_SHIFT - 12);

/// Sectors per bitmap block.
const SECT_PER_BLOCK: u64 = BLOCK_SIZE / SECTOR as u64;

/// Sectors per resync extent.
const EXTENT_SECTORS: u64 = EXTENT_BLOCKS * SECT_PER_BLOCK;

/// A crc32c digest as it travels after `p_block_req` in `P_CSUM_RS_REQUEST` and
/// `P_OV_REPLY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; DIGEST_LEN]);

impl Digest {
    /// The digest of `data` (the kernel's `crypto_shash` "crc32c": CRC-32C, seed !0,
    /// final !crc, little-endian).
    pub fn of(data: &[u8]) -> Digest {
        Digest(crc32c::crc32c(data).to_le_bytes())
    }

    /// What DRBD's verify peer sends when its read failed (`memset(digest, 0, …)`).
    pub const READ_FAILED: Digest = Digest([0; DIGEST_LEN]);

    /// The digest from a packet's digest bytes: exactly [`DIGEST_LEN`] bytes, else the peer
    /// uses another algorithm (a protocol error).
    pub fn from_wire(bytes: &[u8]) -> Result<Digest, Error> {
        <[u8; DIGEST_LEN]>::try_from(bytes)
            .map(Digest)
            .map_err(|_| Error::Protocol("digest is not a 4-byte crc32c"))
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// What the driver tells a request-issuing machine at every controller step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TickInput {
    /// Monotonic milliseconds (any origin; only differences matter).
    pub now_ms: u64,
    /// Cumulative sectors of non-resync IO on the local backing device (application reads
    /// and writes, and on a Secondary the peer's replicated writes): the c-min-rate check.
    pub app_io_sectors: u64,
    /// Application IO is waiting (for an activity-log slot, or held by resync).
    pub app_waiting: bool,
    /// The data socket's send queue is over half its buffer (DRBD stops issuing then).
    pub congested: bool,
}

/// First and last resync extent touched by `[sector, sector + len bytes)`.
fn extents(sector: u64, len: u32) -> (u64, u64) {
    let end = sector + u64::from(len.div_ceil(SECTOR)).max(1) - 1;
    (sector / EXTENT_SECTORS, end / EXTENT_SECTORS)
}

/// Whether `[a, a + alen)` and `[b, b + blen)` (sectors, lengths in bytes) overlap.
fn overlaps(a: u64, alen: u32, b: u64, blen: u32) -> bool {
    a < b + u64::from(blen / SECTOR) && b < a + u64::from(alen / SECTOR)
}

/// Checks a peer's request range: a non-zero multiple of 512, at most 1 MiB, inside
/// `sectors` (DRBD's `receive_DataRequest` checks). Returns the end sector.
fn check_peer_range(sector: u64, len: u32, sectors: u64) -> Result<u64, Error> {
    if len == 0 || !len.is_multiple_of(SECTOR) || len > crate::wire::DRBD_MAX_BIO_SIZE {
        return Err(Error::Protocol("resync request size"));
    }
    let end = sector
        .checked_add(u64::from(len / SECTOR))
        .ok_or(Error::Protocol("resync request range"))?;
    if end > sectors {
        return Err(Error::Protocol("resync request beyond the device"));
    }
    Ok(end)
}

/// Per-extent counters (how many application writes, or resync requests, touch each
/// 16 MiB extent), so the common "nothing there" answer is one hash lookup.
#[derive(Debug, Clone, Default)]
struct ExtentCounts(std::collections::HashMap<u64, u32>);

impl ExtentCounts {
    fn add(&mut self, sector: u64, len: u32) {
        let (a, b) = extents(sector, len);
        for e in a..=b {
            *self.0.entry(e).or_insert(0) += 1;
        }
    }

    fn remove(&mut self, sector: u64, len: u32) {
        let (a, b) = extents(sector, len);
        for e in a..=b {
            if let Some(n) = self.0.get_mut(&e) {
                *n -= 1;
                if *n == 0 {
                    self.0.remove(&e);
                }
            }
        }
    }

    fn any(&self, sector: u64, len: u32) -> bool {
        let (a, b) = extents(sector, len);
        (a..=b).any(|e| self.0.contains_key(&e))
    }

    fn has_extent(&self, e: u64) -> bool {
        self.0.contains_key(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_the_kernels_crc32c_little_endian() {
        // CRC-32C check value of "123456789" is 0xe3069283 (RFC 3720 B.4); the kernel's
        // shash stores ~crc little-endian, which is the standard value's LE bytes.
        assert_eq!(Digest::of(b"123456789").0, [0x83, 0x92, 0x06, 0xe3]);
        // 32 zero bytes: 0x8a9136aa (RFC 3720 B.4).
        assert_eq!(Digest::of(&[0u8; 32]).0, 0x8a91_36aa_u32.to_le_bytes());
        assert!(Digest::from_wire(&[1, 2, 3]).is_err());
        assert_eq!(
            Digest::from_wire(&[1, 2, 3, 4]).expect("4 bytes"),
            Digest([1, 2, 3, 4])
        );
    }

    #[test]
    fn ranges_and_extents() {
        assert_eq!(extents(0, 4096), (0, 0));
        assert_eq!(extents(EXTENT_SECTORS - 8, 8192), (0, 1));
        assert!(overlaps(0, 4096, 7, 512));
        assert!(!overlaps(0, 4096, 8, 512));
        assert!(check_peer_range(0, 0, 100).is_err());
        assert!(check_peer_range(0, 513, 100).is_err());
        assert!(check_peer_range(96, 4096, 100).is_err());
        assert!(check_peer_range(u64::MAX - 1, 4096, u64::MAX).is_err());
        assert!(check_peer_range(0, 2 << 20, u64::MAX).is_err());
        assert_eq!(check_peer_range(92, 4096, 100), Ok(100));
        let mut c = ExtentCounts::default();
        c.add(EXTENT_SECTORS - 8, 8192);
        assert!(c.has_extent(0) && c.has_extent(1) && c.any(EXTENT_SECTORS, 512));
        c.remove(EXTENT_SECTORS - 8, 8192);
        assert!(!c.any(0, 1 << 20));
    }
}
