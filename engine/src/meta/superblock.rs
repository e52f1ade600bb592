//! The DRBD 9 metadata superblock (`struct meta_data_on_disk_9`): a 4096-byte, big-endian
//! block; encode, decode, and validation against the device it was read from.
//!
//! Layout (drbd-headers `drbd_meta_data.h`; offsets in bytes):
//!
//! - 0: u64 effective_size (la-size-sect, the last agreed size)
//! - 8: u64 current_uuid
//! - 16: u64 members (DRBD ≥ 9.2; reserved before)
//! - 24: u64 reserved\[3\]
//! - 48: u64 device_uuid
//! - 56: u32 flags (`MDF_*`)
//! - 60: u32 magic (`DRBD_MD_MAGIC_09` 0x8374026d; same place as v07/v08)
//! - 64: u32 md_size_sect
//! - 68: s32 al_offset (sectors, relative to the superblock)
//! - 72: u32 al_nr_extents
//! - 76: s32 bm_offset (sectors, relative to the superblock)
//! - 80: u32 bm_bytes_per_bit (4096)
//! - 84: u32 la_peer_max_bio_size
//! - 88: u32 bm_max_peers
//! - 92: s32 node_id (-1: not yet known)
//! - 96: u32 al_stripes
//! - 100: u32 al_stripe_size_4k
//! - 104: u32 reserved\[2\]
//! - 112: peers\[32\] × 32 bytes: u64 bitmap_uuid, u64 bitmap_dagtag, u32 flags, s32 bitmap_index,
//!   u32 reserved\[2\]
//! - 1136: u64 history_uuids\[32\]
//! - 1392..4096: zero
//!
//! Decoding never fails on content ([`Superblock::decode`] takes any 4096 bytes); deciding
//! whether the content is usable is [`Superblock::validate`], which checks what the kernel
//! (`drbd_md_decode`, `check_activity_log_stripe_size`, `check_offsets_and_sizes`) and
//! drbdmeta (`is_valid_md`) check, against the real device sizes, and returns the
//! [`Layout`] the rest of tandem then uses: no offset is ever taken from disk unchecked.
//! Reserved fields are written as zero, as drbdmeta and the kernel do.

use super::al::AlGeometry;
use super::layout::{Layout, LayoutError, MetaKind, BYTES_PER_BIT, SECTOR};

/// Size of the superblock on disk.
pub const SUPERBLOCK_BYTES: usize = 4096;
/// Peer slots (`DRBD_PEERS_MAX`) and history UUIDs (`HISTORY_UUIDS`) in the superblock.
pub(crate) const PEERS: usize = 32;

/// `DRBD_MAGIC` (0x83740267) + 2: DRBD 0.6.
pub(crate) const MAGIC_06: u32 = 0x8374_0269;
/// `DRBD_MAGIC` + 3: DRBD 0.7.
pub(crate) const MAGIC_07: u32 = 0x8374_026a;
/// `DRBD_MAGIC` + 4: DRBD 8.0–8.4, clean.
pub(crate) const MAGIC_08: u32 = 0x8374_026b;
/// `DRBD_MAGIC` + 5: DRBD 8.4 while attached or after a crash.
pub(crate) const MAGIC_84_UNCLEAN: u32 = 0x8374_026c;
/// `DRBD_MAGIC` + 6: DRBD 9 (`v09`), the format tandem reads and writes.
pub(crate) const MAGIC_09: u32 = 0x8374_026d;

/// The current UUID of metadata no node has used yet (drbdmeta create-md).
pub const UUID_JUST_CREATED: u64 = 4;

/// Device flags (`md.flags`, `enum mdf_flag`).
pub mod mdf {
    /// The data is consistent (not in the middle of a resync as its target).
    pub const CONSISTENT: u32 = 1 << 0;
    /// The node is (or was, when it crashed) Primary.
    pub const PRIMARY_IND: u32 = 1 << 1;
    /// DRBD 8.4 only: was connected.
    pub(crate) const CONNECTED_IND: u32 = 1 << 2;
    /// DRBD 8.4 only: a full sync is pending.
    pub(crate) const FULL_SYNC: u32 = 1 << 3;
    /// The data was UpToDate.
    pub const WAS_UP_TO_DATE: u32 = 1 << 4;
    /// DRBD 8.4 only: the peer was outdated.
    pub(crate) const PEER_OUT_DATED: u32 = 1 << 5;
    /// The node crashed while Primary (set at the next attach).
    pub(crate) const CRASHED_PRIMARY: u32 = 1 << 6;
    /// The activity log is clean: nothing to apply, the bitmap is authoritative.
    pub const AL_CLEAN: u32 = 1 << 7;
    /// The activity log is disabled (`al-updates no`, or during a resize).
    pub(crate) const AL_DISABLED: u32 = 1 << 8;
    /// DRBD 9: a Primary lost quorum.
    pub(crate) const PRIMARY_LOST_QUORUM: u32 = 1 << 9;
    /// DRBD 9: had quorum.
    pub(crate) const HAVE_QUORUM: u32 = 1 << 10;

    /// Name of each device flag bit, as the kernel's enum names it.
    pub(crate) const NAMES: [(u32, &str); 11] = [
        (CONSISTENT, "consistent"),
        (PRIMARY_IND, "primary-ind"),
        (CONNECTED_IND, "connected-ind"),
        (FULL_SYNC, "full-sync"),
        (WAS_UP_TO_DATE, "was-up-to-date"),
        (PEER_OUT_DATED, "peer-out-dated"),
        (CRASHED_PRIMARY, "crashed-primary"),
        (AL_CLEAN, "al-clean"),
        (AL_DISABLED, "al-disabled"),
        (PRIMARY_LOST_QUORUM, "primary-lost-quorum"),
        (HAVE_QUORUM, "have-quorum"),
    ];
}

/// Per-peer flags (`peers[i].flags`).
pub(crate) mod mdf_peer {
    /// Connected to this peer.
    pub(crate) const CONNECTED: u32 = 1 << 0;
    /// The peer's disk is outdated.
    pub(crate) const OUTDATED: u32 = 1 << 1;
    /// Fencing is configured for this peer.
    pub(crate) const FENCING: u32 = 1 << 2;
    /// A full sync to this peer is pending.
    pub(crate) const FULL_SYNC: u32 = 1 << 3;
    /// This peer was seen with a disk.
    pub(crate) const DEVICE_SEEN: u32 = 1 << 4;
    /// This node id exists in the configuration.
    pub(crate) const NODE_EXISTS: u32 = 1 << 16;

    /// Name of each peer flag bit, as drbdmeta's `dump-md` prints it.
    pub(crate) const NAMES: [(u32, &str); 6] = [
        (CONNECTED, "connected"),
        (OUTDATED, "<=outdated"),
        (FENCING, "fencing"),
        (FULL_SYNC, "full-sync"),
        (DEVICE_SEEN, "seen"),
        (NODE_EXISTS, "exists"),
    ];
}

/// Largest node id (`DRBD_NODE_ID_MAX` − 1).
pub(crate) const MAX_NODE_ID: i32 = 31;

/// Offsets of the fields inside the 4096-byte block.
mod off {
    pub(crate) const EFFECTIVE_SIZE: usize = 0;
    pub(crate) const CURRENT_UUID: usize = 8;
    pub(crate) const MEMBERS: usize = 16;
    pub(crate) const DEVICE_UUID: usize = 48;
    pub(crate) const FLAGS: usize = 56;
    pub(crate) const MAGIC: usize = 60;
    pub(crate) const MD_SIZE_SECT: usize = 64;
    pub(crate) const AL_OFFSET: usize = 68;
    pub(crate) const AL_NR_EXTENTS: usize = 72;
    pub(crate) const BM_OFFSET: usize = 76;
    pub(crate) const BM_BYTES_PER_BIT: usize = 80;
    pub(crate) const LA_PEER_MAX_BIO_SIZE: usize = 84;
    pub(crate) const BM_MAX_PEERS: usize = 88;
    pub(crate) const NODE_ID: usize = 92;
    pub(crate) const AL_STRIPES: usize = 96;
    pub(crate) const AL_STRIPE_SIZE_4K: usize = 100;
    pub(crate) const PEERS: usize = 112;
    pub(crate) const PEER_LEN: usize = 32;
    pub(crate) const HISTORY: usize = 1136;
}

/// One peer slot of the superblock (`struct peer_dev_md_on_disk_9`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSlot {
    /// The UUID the bitmap for this peer started at (0: no bitmap in use).
    pub bitmap_uuid: u64,
    /// DRBD 9's data generation tag of that bitmap.
    pub bitmap_dagtag: u64,
    /// `mdf_peer` flags.
    pub flags: u32,
    /// Which bitmap slot this peer uses, -1 for none.
    pub bitmap_index: i32,
}

impl PeerSlot {
    /// An unused slot, as create-md writes it.
    pub const UNUSED: PeerSlot = PeerSlot {
        bitmap_uuid: 0,
        bitmap_dagtag: 0,
        flags: 0,
        bitmap_index: -1,
    };
}

/// The decoded superblock. Field names follow `meta_data_on_disk_9`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Last agreed size of the replicated device, sectors (`la-size-sect`).
    pub effective_size: u64,
    /// The current data generation UUID.
    pub current_uuid: u64,
    /// DRBD ≥ 9.2's member mask (meaningful only with its flag); kept as read.
    pub members: u64,
    /// A random id of the backing device (0 until the kernel sets one).
    pub device_uuid: u64,
    /// [`mdf`] flags.
    pub flags: u32,
    /// The magic; [`MAGIC_09`] for anything tandem accepts.
    pub magic: u32,
    /// Sectors of the whole metadata area.
    pub md_size_sect: u32,
    /// Activity log start, sectors relative to the superblock.
    pub al_offset: i32,
    /// The `al-extents` last used (informational; the kernel takes it from its config).
    pub al_nr_extents: u32,
    /// Bitmap start, sectors relative to the superblock.
    pub bm_offset: i32,
    /// Bytes of data per bitmap bit; 4096.
    pub bm_bytes_per_bit: u32,
    /// The peer's last max BIO size, bytes.
    pub la_peer_max_bio_size: u32,
    /// Bitmap slots (`max-peers`); tandem uses exactly 1.
    pub bm_max_peers: u32,
    /// This node's id, -1 until first attached.
    pub node_id: i32,
    /// AL stripes (0 with `al_stripe_size_4k` 0 means the legacy 1 × 32 KiB).
    pub al_stripes: u32,
    /// AL stripe size in 4 KiB blocks.
    pub al_stripe_size_4k: u32,
    /// Peer slots by node id.
    pub peers: [PeerSlot; PEERS],
    /// History UUIDs, newest first.
    pub history_uuids: [u64; PEERS],
}

/// Why a superblock is not usable tandem metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    /// No DRBD magic at all: never initialised, or not this kind of metadata.
    #[error("no DRBD metadata (superblock magic {magic:#010x})")]
    NoMetadata {
        /// The magic found.
        magic: u32,
    },
    /// DRBD 0.6/0.7/8.x metadata.
    #[error("this is {format} metadata (magic {magic:#010x}); tandem reads DRBD 9 (v09) metadata")]
    OldFormat {
        /// The magic found.
        magic: u32,
        /// drbdmeta's name of the format (`v08`, `v08 (8.4, unclean)`, …).
        format: &'static str,
    },
    /// v09 magic, but a field is impossible for this device.
    #[error("{problem}")]
    Invalid {
        /// What is wrong, with the values.
        problem: String,
        /// What to do about it.
        fix: &'static str,
    },
}

/// Fix for metadata whose fields do not fit the device: it was written for another device
/// (size) or damaged.
const FIX_RECREATE: &str = "if the device was resized, resize it back; otherwise recreate the \
    metadata with `tandem create-md --force` (this forgets the UUIDs and the bitmap, so the \
                            next connection does a full sync)";
/// Fix for metadata tandem does not support but DRBD does.
const FIX_ONE_PEER: &str = "tandem uses exactly one bitmap slot: recreate the metadata with \
                            `tandem create-md` or `drbdmeta … v09 … create-md 1`";

fn be64(b: &[u8; SUPERBLOCK_BYTES], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

fn be32(b: &[u8; SUPERBLOCK_BYTES], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

fn bes32(b: &[u8; SUPERBLOCK_BYTES], at: usize) -> i32 {
    i32::from_be_bytes(be32(b, at).to_be_bytes())
}

fn put(b: &mut [u8; SUPERBLOCK_BYTES], at: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(at..at + v.len()) {
        d.copy_from_slice(v);
    }
}

/// drbdmeta's name for a magic, if it is one of DRBD's.
pub(crate) fn magic_format(magic: u32) -> Option<&'static str> {
    match magic {
        MAGIC_06 => Some("DRBD 0.6 (v06)"),
        MAGIC_07 => Some("DRBD 0.7 (v07)"),
        MAGIC_08 => Some("DRBD 8 (v08)"),
        MAGIC_84_UNCLEAN => Some("DRBD 8.4 (v08, unclean: the node crashed or is attached)"),
        MAGIC_09 => Some("DRBD 9 (v09)"),
        _ => None,
    }
}

/// The sizes a superblock is validated against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Internal or flex-external.
    pub kind: MetaKind,
    /// Bytes of the device holding the metadata.
    pub meta_bytes: u64,
    /// Bytes of the data device (equal to `meta_bytes` for internal metadata).
    pub data_bytes: u64,
}

impl Superblock {
    /// The superblock `create-md` writes (drbdmeta `v09_md_initialize` with one peer
    /// slot): just-created UUID, only `AL_CLEAN` set, size 0, every peer slot unused.
    pub fn created(layout: &Layout, node_id: i32, al_extents: u32) -> Superblock {
        Superblock {
            effective_size: 0,
            current_uuid: UUID_JUST_CREATED,
            members: 0,
            device_uuid: 0,
            flags: mdf::AL_CLEAN,
            magic: MAGIC_09,
            md_size_sect: layout.md_size_sect,
            al_offset: layout.al_offset_sect,
            al_nr_extents: al_extents,
            bm_offset: layout.bm_offset_sect,
            bm_bytes_per_bit: BYTES_PER_BIT,
            la_peer_max_bio_size: 0,
            bm_max_peers: 1,
            node_id,
            al_stripes: layout.al.stripes(),
            al_stripe_size_4k: layout.al.stripe_size_4k(),
            peers: [PeerSlot::UNUSED; PEERS],
            history_uuids: [0; PEERS],
        }
    }

    /// Decodes any 4096 bytes; never fails on content (see [`Superblock::validate`]).
    pub fn decode(block: &[u8; SUPERBLOCK_BYTES]) -> Superblock {
        let mut peers = [PeerSlot::UNUSED; PEERS];
        for (i, p) in peers.iter_mut().enumerate() {
            let at = off::PEERS + i * off::PEER_LEN;
            *p = PeerSlot {
                bitmap_uuid: be64(block, at),
                bitmap_dagtag: be64(block, at + 8),
                flags: be32(block, at + 16),
                bitmap_index: bes32(block, at + 20),
            };
        }
        let mut history_uuids = [0; PEERS];
        for (i, h) in history_uuids.iter_mut().enumerate() {
            *h = be64(block, off::HISTORY + 8 * i);
        }
        Superblock {
            effective_size: be64(block, off::EFFECTIVE_SIZE),
            current_uuid: be64(block, off::CURRENT_UUID),
            members: be64(block, off::MEMBERS),
            device_uuid: be64(block, off::DEVICE_UUID),
            flags: be32(block, off::FLAGS),
            magic: be32(block, off::MAGIC),
            md_size_sect: be32(block, off::MD_SIZE_SECT),
            al_offset: bes32(block, off::AL_OFFSET),
            al_nr_extents: be32(block, off::AL_NR_EXTENTS),
            bm_offset: bes32(block, off::BM_OFFSET),
            bm_bytes_per_bit: be32(block, off::BM_BYTES_PER_BIT),
            la_peer_max_bio_size: be32(block, off::LA_PEER_MAX_BIO_SIZE),
            bm_max_peers: be32(block, off::BM_MAX_PEERS),
            node_id: bes32(block, off::NODE_ID),
            al_stripes: be32(block, off::AL_STRIPES),
            al_stripe_size_4k: be32(block, off::AL_STRIPE_SIZE_4K),
            peers,
            history_uuids,
        }
    }

    /// Encodes into a fresh 4096-byte block (reserved bytes zero).
    pub fn encode(&self) -> [u8; SUPERBLOCK_BYTES] {
        let mut b = [0u8; SUPERBLOCK_BYTES];
        put(
            &mut b,
            off::EFFECTIVE_SIZE,
            &self.effective_size.to_be_bytes(),
        );
        put(&mut b, off::CURRENT_UUID, &self.current_uuid.to_be_bytes());
        put(&mut b, off::MEMBERS, &self.members.to_be_bytes());
        put(&mut b, off::DEVICE_UUID, &self.device_uuid.to_be_bytes());
        put(&mut b, off::FLAGS, &self.flags.to_be_bytes());
        put(&mut b, off::MAGIC, &self.magic.to_be_bytes());
        put(&mut b, off::MD_SIZE_SECT, &self.md_size_sect.to_be_bytes());
        put(&mut b, off::AL_OFFSET, &self.al_offset.to_be_bytes());
        put(
            &mut b,
            off::AL_NR_EXTENTS,
            &self.al_nr_extents.to_be_bytes(),
        );
        put(&mut b, off::BM_OFFSET, &self.bm_offset.to_be_bytes());
        put(
            &mut b,
            off::BM_BYTES_PER_BIT,
            &self.bm_bytes_per_bit.to_be_bytes(),
        );
        put(
            &mut b,
            off::LA_PEER_MAX_BIO_SIZE,
            &self.la_peer_max_bio_size.to_be_bytes(),
        );
        put(&mut b, off::BM_MAX_PEERS, &self.bm_max_peers.to_be_bytes());
        put(&mut b, off::NODE_ID, &self.node_id.to_be_bytes());
        put(&mut b, off::AL_STRIPES, &self.al_stripes.to_be_bytes());
        put(
            &mut b,
            off::AL_STRIPE_SIZE_4K,
            &self.al_stripe_size_4k.to_be_bytes(),
        );
        for (i, p) in self.peers.iter().enumerate() {
            let at = off::PEERS + i * off::PEER_LEN;
            put(&mut b, at, &p.bitmap_uuid.to_be_bytes());
            put(&mut b, at + 8, &p.bitmap_dagtag.to_be_bytes());
            put(&mut b, at + 16, &p.flags.to_be_bytes());
            put(&mut b, at + 20, &p.bitmap_index.to_be_bytes());
        }
        for (i, h) in self.history_uuids.iter().enumerate() {
            put(&mut b, off::HISTORY + 8 * i, &h.to_be_bytes());
        }
        b
    }

    /// Whether the activity log is clean (v09 magic and `MDF_AL_CLEAN`): the bitmap alone
    /// says what may differ from the peer. The kernel refuses to attach otherwise.
    pub fn is_clean(&self) -> bool {
        self.magic == MAGIC_09 && self.flags & mdf::AL_CLEAN != 0
    }

    /// The AL geometry, the kernel's way: both fields 0 mean the legacy 1 × 32 KiB ring.
    pub fn al_geometry(&self) -> Result<AlGeometry, SuperblockError> {
        let (stripes, size) = match (self.al_stripes, self.al_stripe_size_4k) {
            (0, 0) => (1, 8),
            other => other,
        };
        AlGeometry::new(stripes, size).map_err(|why| SuperblockError::Invalid {
            problem: format!(
                "invalid activity log striping: al-stripes {} × al-stripe-size-4k {} ({why})",
                self.al_stripes, self.al_stripe_size_4k
            ),
            fix: FIX_RECREATE,
        })
    }

    /// Checks everything the kernel and drbdmeta check before trusting a superblock, for
    /// metadata at `placement`, and returns the layout its offsets describe.
    pub fn validate(&self, placement: &Placement) -> Result<Layout, SuperblockError> {
        if self.magic != MAGIC_09 {
            return Err(match magic_format(self.magic) {
                Some(format) => SuperblockError::OldFormat {
                    magic: self.magic,
                    format,
                },
                None => SuperblockError::NoMetadata { magic: self.magic },
            });
        }
        let invalid = |problem: String, fix| Err(SuperblockError::Invalid { problem, fix });
        if self.bm_bytes_per_bit != BYTES_PER_BIT {
            return invalid(
                format!(
                    "bm-byte-per-bit is {} (DRBD 9.x and tandem use {BYTES_PER_BIT})",
                    self.bm_bytes_per_bit
                ),
                FIX_RECREATE,
            );
        }
        if self.bm_max_peers != 1 {
            return invalid(
                format!("max-peers is {} (bitmap slots)", self.bm_max_peers),
                FIX_ONE_PEER,
            );
        }
        if !(-1..=MAX_NODE_ID).contains(&self.node_id) {
            return invalid(
                format!("node-id {} is outside -1..={MAX_NODE_ID}", self.node_id),
                FIX_RECREATE,
            );
        }
        for (id, p) in self.peers.iter().enumerate() {
            let own = i32::try_from(id).is_ok_and(|id| id == self.node_id);
            let ok = p.bitmap_index == -1 || (p.bitmap_index == 0 && !own);
            if !ok {
                return invalid(
                    format!(
                        "peer[{id}] has bitmap-index {} (node-id {}, 1 bitmap slot)",
                        p.bitmap_index, self.node_id
                    ),
                    FIX_RECREATE,
                );
            }
        }
        let al = self.al_geometry()?;
        let expected = match placement.kind {
            MetaKind::Internal => Layout::internal(placement.meta_bytes, al),
            // The kernel accepts a metadata device that grew after create-md (capacity ≥
            // md_size_sect): the recorded size, not the device's, bounds the bitmap.
            MetaKind::FlexExternal => {
                let recorded = u64::from(self.md_size_sect) * SECTOR;
                if recorded > placement.meta_bytes {
                    return invalid(
                        format!(
                            "md_size_sect {} ({recorded} bytes) is larger than the \
                             {}-byte metadata device",
                            self.md_size_sect, placement.meta_bytes
                        ),
                        FIX_RECREATE,
                    );
                }
                Layout::flex_external(recorded, placement.data_bytes, al)
            }
        };
        let layout = expected.map_err(|e| SuperblockError::Invalid {
            problem: match e {
                LayoutError::TooSmall(s) | LayoutError::TooLarge(s) => format!(
                    "the {} metadata recorded here does not fit this device: {s}",
                    placement.kind.drbdmeta_name()
                ),
            },
            fix: FIX_RECREATE,
        })?;
        if (self.md_size_sect, self.al_offset, self.bm_offset)
            != (
                layout.md_size_sect,
                layout.al_offset_sect,
                layout.bm_offset_sect,
            )
        {
            return invalid(
                format!(
                    "offsets do not match {} metadata on a {}-byte device: md_size_sect {}, \
                     al_offset {}, bm_offset {} (expected {}, {}, {})",
                    placement.kind.drbdmeta_name(),
                    placement.meta_bytes,
                    self.md_size_sect,
                    self.al_offset,
                    self.bm_offset,
                    layout.md_size_sect,
                    layout.al_offset_sect,
                    layout.bm_offset_sect
                ),
                FIX_RECREATE,
            );
        }
        if self.effective_size > layout.max_data_sectors {
            return invalid(
                format!(
                    "la-size-sect {} is larger than the {} sectors this device and its \
                     metadata can hold (was the device shrunk?)",
                    self.effective_size, layout.max_data_sectors
                ),
                FIX_RECREATE,
            );
        }
        Ok(layout)
    }
}

/// Names of the set bits of `flags` per `names`; unknown bits as `0x…=?` (drbdmeta style).
pub(crate) fn flag_names(flags: u32, names: &[(u32, &'static str)]) -> Vec<String> {
    (0..32)
        .map(|i| 1u32 << i)
        .filter(|bit| flags & bit != 0)
        .map(|bit| {
            names
                .iter()
                .find(|(b, _)| *b == bit)
                .map_or_else(|| format!("{bit:#x}=?"), |(_, n)| (*n).to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn internal(bytes: u64) -> Placement {
        Placement {
            kind: MetaKind::Internal,
            meta_bytes: bytes,
            data_bytes: bytes,
        }
    }

    fn created(bytes: u64) -> Superblock {
        let al = AlGeometry::new(1, 8).expect("default");
        let l = Layout::internal(bytes, al).expect("fits");
        Superblock::created(&l, -1, 1237)
    }

    /// The superblock drbdmeta 9.22 wrote with `--force 0 v09 /dev/loop0 internal
    /// create-md 1` on a 1 GiB loop device: the first 112 bytes (the rest are the 32
    /// unused peer slots, bitmap-index -1, and zero history UUIDs).
    const DRBDMETA_1G_HEAD: [u8; 112] = [
        0, 0, 0, 0, 0, 0, 0, 0, /* effective_size */
        0, 0, 0, 0, 0, 0, 0, 4, /* current_uuid */
        0, 0, 0, 0, 0, 0, 0, 0, /* members */
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, /* device_uuid */
        0, 0, 0, 0x80, /* flags */
        0x83, 0x74, 0x02, 0x6d, /* magic */
        0, 0, 0, 136, /* md_size_sect */
        0xff, 0xff, 0xff, 0xc0, /* al_offset -64 */
        0, 0, 1, 1, /* al_nr_extents 257 */
        0xff, 0xff, 0xff, 0x80, /* bm_offset -128 */
        0, 0, 0x10, 0, /* bm_bytes_per_bit */
        0, 0, 0, 0, /* la_peer_max_bio_size */
        0, 0, 0, 1, /* bm_max_peers */
        0xff, 0xff, 0xff, 0xff, /* node_id */
        0, 0, 0, 1, /* al_stripes */
        0, 0, 0, 8, /* al_stripe_size_4k */
        0, 0, 0, 0, 0, 0, 0, 0, /* reserved */
    ];

    fn drbdmeta_1g() -> [u8; SUPERBLOCK_BYTES] {
        let mut b = [0u8; SUPERBLOCK_BYTES];
        b[..112].copy_from_slice(&DRBDMETA_1G_HEAD);
        for i in 0..PEERS {
            b[112 + 32 * i + 20..112 + 32 * i + 24].copy_from_slice(&[0xff; 4]);
        }
        b
    }

    #[test]
    fn decodes_drbdmeta_create_md_and_reencodes_it_byte_for_byte() {
        let block = drbdmeta_1g();
        let sb = Superblock::decode(&block);
        assert_eq!(sb.magic, MAGIC_09);
        assert_eq!(sb.current_uuid, UUID_JUST_CREATED);
        assert_eq!(sb.flags, mdf::AL_CLEAN);
        assert_eq!(
            (sb.md_size_sect, sb.al_offset, sb.bm_offset),
            (136, -64, -128)
        );
        assert_eq!(sb.al_nr_extents, 257);
        assert_eq!(sb.node_id, -1);
        assert!(sb.peers.iter().all(|p| *p == PeerSlot::UNUSED));
        assert!(sb.is_clean());
        assert_eq!(sb.encode(), block);
        let layout = sb.validate(&internal(1 << 30)).expect("valid");
        assert_eq!(layout.md_offset, 1073737728);
        // tandem's create-md writes the same block, except for al-extents.
        let mut ours = created(1 << 30);
        ours.al_nr_extents = 257;
        assert_eq!(ours.encode(), block);
    }

    #[test]
    fn round_trips_every_field() {
        let mut sb = created(1 << 30);
        sb.effective_size = 2096000;
        sb.current_uuid = 0x0123_4567_89ab_cdef;
        sb.members = 0x5;
        sb.device_uuid = 0xfedc_ba98_7654_3210;
        sb.flags = mdf::CONSISTENT | mdf::PRIMARY_IND | mdf::WAS_UP_TO_DATE;
        sb.node_id = 3;
        sb.la_peer_max_bio_size = 1 << 20;
        sb.peers[1] = PeerSlot {
            bitmap_uuid: 0x1111,
            bitmap_dagtag: 0x2222,
            flags: mdf_peer::CONNECTED | mdf_peer::NODE_EXISTS,
            bitmap_index: 0,
        };
        for (i, h) in sb.history_uuids.iter_mut().enumerate() {
            *h = 0x100 + i as u64;
        }
        let block = sb.encode();
        assert_eq!(Superblock::decode(&block), sb);
        assert_eq!(&block[60..64], &[0x83, 0x74, 0x02, 0x6d]);
        assert_eq!(&block[112 + 32 + 20..112 + 32 + 24], &[0, 0, 0, 0]);
        assert_eq!(block[1136 + 7], 0x00);
        assert_eq!(block[1136 + 8 * 31 + 7], 0x1f);
        assert!(block[1392..].iter().all(|b| *b == 0));
        sb.validate(&internal(1 << 30)).expect("valid");
    }

    fn problem(sb: &Superblock, p: &Placement) -> String {
        match sb.validate(p) {
            Err(SuperblockError::Invalid { problem, .. }) => problem,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn magics_are_told_apart() {
        let mut sb = created(1 << 30);
        for (magic, word) in [
            (MAGIC_08, "v08"),
            (MAGIC_84_UNCLEAN, "unclean"),
            (MAGIC_07, "v07"),
        ] {
            sb.magic = magic;
            let e = sb.validate(&internal(1 << 30)).expect_err("old");
            assert!(matches!(e, SuperblockError::OldFormat { .. }), "{e:?}");
            assert!(e.to_string().contains(word), "{e}");
        }
        sb.magic = 0;
        assert_eq!(
            sb.validate(&internal(1 << 30)),
            Err(SuperblockError::NoMetadata { magic: 0 })
        );
    }

    #[test]
    fn hostile_fields_are_refused_with_the_reason() {
        let p = internal(1 << 30);
        let base = created(1 << 30);
        type Breaker = Box<dyn Fn(&mut Superblock)>;
        let cases: Vec<(Breaker, &str)> = vec![
            (Box::new(|s| s.bm_bytes_per_bit = 0), "bm-byte-per-bit"),
            (Box::new(|s| s.bm_max_peers = 2), "max-peers"),
            (Box::new(|s| s.bm_max_peers = u32::MAX), "max-peers"),
            (Box::new(|s| s.node_id = 32), "node-id"),
            (Box::new(|s| s.node_id = -2), "node-id"),
            (Box::new(|s| s.peers[5].bitmap_index = 1), "bitmap-index"),
            (
                Box::new(|s| {
                    s.node_id = 5;
                    s.peers[5].bitmap_index = 0;
                }),
                "bitmap-index",
            ),
            (Box::new(|s| s.al_stripes = 0), "striping"),
            (
                Box::new(|s| {
                    s.al_stripes = 1;
                    s.al_stripe_size_4k = 7;
                }),
                "striping",
            ),
            (
                Box::new(|s| {
                    s.al_stripes = u32::MAX;
                    s.al_stripe_size_4k = u32::MAX;
                }),
                "striping",
            ),
            (Box::new(|s| s.md_size_sect = 144), "offsets"),
            (Box::new(|s| s.al_offset = 8), "offsets"),
            (Box::new(|s| s.bm_offset = i32::MIN), "offsets"),
            (Box::new(|s| s.effective_size = u64::MAX), "la-size-sect"),
            (Box::new(|s| s.effective_size = 2097016 + 1), "la-size-sect"),
            // Valid on a 1 GiB device, but striped 2 x 8: the offsets no longer agree.
            (Box::new(|s| s.al_stripes = 2), "offsets"),
        ];
        for (i, (break_it, word)) in cases.iter().enumerate() {
            let mut sb = base.clone();
            break_it(&mut sb);
            let why = problem(&sb, &p);
            assert!(why.contains(word), "case {i}: {why}");
        }
        // The largest la-size that fits is accepted.
        let mut sb = base.clone();
        sb.effective_size = 2097016;
        sb.validate(&p).expect("fits exactly");
        // Legacy 0/0 striping means 1 x 8 (kernel check_activity_log_stripe_size).
        sb.al_stripes = 0;
        sb.al_stripe_size_4k = 0;
        sb.validate(&p).expect("legacy AL");
    }

    #[test]
    fn internal_metadata_does_not_fit_a_resized_device() {
        let sb = created(1 << 30);
        // Grown by 1 GiB: the superblock is not where it was, and the sizes disagree.
        let why = problem(&sb, &internal(2 << 30));
        assert!(why.contains("offsets"), "{why}");
        let why = problem(&sb, &internal(64 << 10));
        assert!(why.contains("does not fit"), "{why}");
    }

    #[test]
    fn flex_external_uses_the_recorded_size() {
        let al = AlGeometry::new(1, 8).expect("default");
        let l = Layout::flex_external(128 << 20, 1 << 40, al).expect("fits");
        let sb = Superblock::created(&l, 0, 1237);
        let p = Placement {
            kind: MetaKind::FlexExternal,
            meta_bytes: 128 << 20,
            data_bytes: 1 << 40,
        };
        assert_eq!(sb.validate(&p), Ok(l));
        // A metadata device that grew is fine (the kernel accepts it too)…
        let grown = Placement {
            meta_bytes: 256 << 20,
            ..p
        };
        assert_eq!(sb.validate(&grown).map(|l| l.md_size_sect), Ok(262144));
        // …one that shrank is not.
        let shrunk = Placement {
            meta_bytes: 64 << 20,
            ..p
        };
        assert!(problem(&sb, &shrunk).contains("larger than"));
        // Internal metadata read as flex-external is refused (its md_size_sect is far
        // too small for an external layout).
        let int = created(128 << 20);
        assert!(problem(&int, &p).contains("does not fit"));
    }

    #[test]
    fn flag_names_are_drbd_names() {
        assert_eq!(
            flag_names(mdf::AL_CLEAN | mdf::PRIMARY_IND | (1 << 20), &mdf::NAMES),
            ["primary-ind", "al-clean", "0x100000=?"]
        );
        assert_eq!(
            flag_names(mdf_peer::NODE_EXISTS | mdf_peer::OUTDATED, &mdf_peer::NAMES),
            ["<=outdated", "exists"]
        );
    }
}
