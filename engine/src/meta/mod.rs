//! On-disk metadata, DRBD 9 (`v09`) compatible: superblock, activity log, bitmap.
//!
//! After a crash a node must know exactly which regions may differ from its peer — no
//! more (or resync takes hours), no less (or data silently diverges). DRBD keeps that
//! knowledge in a small metadata area, and tandem keeps it in the same format so that
//! `drbdmeta` can read and repair tandem's metadata and tandem can attach metadata
//! `drbdmeta` created (docs/metadata.md has the format and the procedures).
//!
//! - [`layout`]: where superblock, activity log and bitmap are, by DRBD's formulas (pure)
//! - [`superblock`]: the 4 KiB `meta_data_on_disk_9` codec and its validation (pure)
//! - [`al`]: the activity-log transaction format, ring placement, replay, runtime LRU
//! - [`disk`]: [`MetaDevice`]: metadata on a [`crate::store::Store`]: create, open, bitmap IO,
//!   apply-al, the daemon's attach / role flags / UUIDs / clean stop
//! - [`tool`]: the offline commands `create-md`, `dump-md`, `apply-al` and their output
//!
//! At run time the sans-IO [`crate::request::Primary`] drives the activity log and asks
//! for its metadata writes (transactions, evicted extents' bitmap pages) as outputs; the
//! volume driver executes them. The invariant they keep, and the simulator checks after
//! every crash: every block that may differ from the peer is set in the on-disk bitmap or
//! inside an extent the on-disk log names.
//!
//! Bounds: the superblock is one 4 KiB block; the activity log is 8 blocks by default and
//! at most 8192 blocks (32 MiB, drbdmeta's own buffer: the kernel allows 16 GiB rings,
//! which drbdmeta cannot replay, so tandem refuses them); the bitmap is one bit
//! per 4 KiB of data, 32 MiB per TiB, 32 GiB for DRBD's 1 PiB limit, and is always read
//! and written in chunks of at most [`disk::BITMAP_CHUNK`] (1 MiB). Only one bitmap slot
//! (DRBD's `max-peers 1`) is supported: tandem replicates to one peer.

pub mod al;
pub mod disk;
pub mod layout;
pub mod superblock;
pub mod tool;

pub use disk::{ApplyAlReport, CreateOptions, MetaDevice, MetaLocation, SbChange};
pub use layout::{Layout, MetaKind};
pub use superblock::Superblock;

use crate::store::StoreError;

/// Why a metadata operation failed. Every message says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// No DRBD magic where the superblock belongs.
    #[error(
        "no tandem/DRBD 9 metadata on {device} (superblock magic {magic:#x} at byte \
         {offset}): run `tandem create-md {create_args}` to create it"
    )]
    NotFound {
        /// The metadata device.
        device: String,
        /// The magic found instead.
        magic: u32,
        /// Byte offset of the superblock.
        offset: u64,
        /// The arguments of the create-md command that would create it.
        create_args: String,
    },
    /// DRBD 0.7/8 metadata.
    #[error(
        "{device} holds {format} metadata; tandem reads DRBD 9 (v09) metadata: convert it \
         with drbdmeta (after a clean `drbdadm down`: `drbdmeta --force <minor> v09 {device} \
         {kind} create-md 1` converts it in place and keeps its UUIDs), or create new \
         metadata with `tandem create-md --force`"
    )]
    OldFormat {
        /// The metadata device.
        device: String,
        /// Which format.
        format: &'static str,
        /// `internal` or `flex-external`.
        kind: &'static str,
    },
    /// v09 magic, but a field that cannot be right for this device.
    #[error("invalid DRBD 9 metadata on {device}: {problem}; {fix}")]
    Invalid {
        /// The metadata device.
        device: String,
        /// What is wrong, with the values.
        problem: String,
        /// What to do.
        fix: &'static str,
    },
    /// The device cannot hold metadata (of this geometry).
    #[error("cannot put {kind} metadata on {device}: {problem}")]
    Unfit {
        /// The device.
        device: String,
        /// `internal` or `flex-external`.
        kind: &'static str,
        /// Why, with the sizes.
        problem: String,
    },
    /// create-md found metadata and was not forced.
    #[error(
        "{device} already holds {what}; refusing to overwrite it: pass --force to create \
         new metadata (its UUIDs and bitmap are lost and the next connection does a full \
         sync)"
    )]
    Exists {
        /// The metadata device.
        device: String,
        /// What was found.
        what: String,
    },
    /// The activity log has not been applied.
    #[error(
        "the metadata on {device} is unclean (the node crashed or is still running): run \
         `tandem apply-al {args}` first{force_hint}"
    )]
    Unclean {
        /// The metadata device.
        device: String,
        /// The arguments for apply-al.
        args: String,
        /// `, or pass --force to …` where forcing is possible.
        force_hint: &'static str,
    },
    /// apply-al cannot tell which regions a crashed Primary wrote.
    #[error(
        "the activity log on {device} is unusable ({reason}) and the node was Primary, so \
         the regions it wrote last are unknown and the metadata stays unclean: if the peer \
         has good data, recreate this node's metadata with `tandem create-md --force` so it \
         takes a full sync from the peer"
    )]
    AlUnusable {
        /// The metadata device.
        device: String,
        /// What replay found.
        reason: String,
    },
    /// A command-line value is outside DRBD's limits.
    #[error("{0}")]
    Usage(String),
    /// The device is in use (a running node holds its lock, or it is claimed exclusively).
    #[error(
        "{reason}; refusing to touch it while in use: stop the node that uses it first \
         (its mgmt socket answers `tandem status`){hint}"
    )]
    InUse {
        /// Which device, by whom.
        reason: String,
        /// `, or pass --force to …` where forcing is possible.
        hint: &'static str,
    },
    /// An IO on the metadata device failed.
    #[error("{device}: {what} at byte {offset}: {source}")]
    Io {
        /// The device.
        device: String,
        /// What was being read or written.
        what: &'static str,
        /// Byte offset of the IO.
        offset: u64,
        /// The store's error.
        #[source]
        source: StoreError,
    },
}
