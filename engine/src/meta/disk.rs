//! [`MetaDevice`]: DRBD 9 metadata on a [`Store`] — create, open, bitmap and activity-log
//! IO, and `apply-al`.
//!
//! The offline tools (`tandem create-md`/`dump-md`/`apply-al`) use the `*_blocking`
//! methods (plain `pread`/`pwrite` on the store's O_DIRECT fd, no runtime needed); the
//! daemon uses the async ones, which go through the store's io_uring.
//!
//! Every offset comes from a validated [`Layout`], never from disk unchecked. Bounds:
//! bitmap IO moves at most [`BITMAP_CHUNK`] (1 MiB) per request, so even the 32 GiB bitmap
//! of a 1 PiB device never sits in one buffer unless the caller asks for it;
//! `apply-al` reads a ring of at most 32 MiB ([`al::AL_MAX_BLOCKS`], drbdmeta's buffer)
//! and touches only the bitmap chunks that hold hot extents.
//!
//! Write ordering, stricter than drbdmeta's (which writes with O_DIRECT but never
//! flushes): create-md first destroys an old superblock, then writes bitmap and activity
//! log, flushes, and writes the new superblock last with FUA, so a crash leaves either
//! no metadata or complete metadata; apply-al writes the bitmap, flushes, re-initialises
//! the ring, flushes, and only then marks the superblock clean with FUA, so a crash
//! leaves it unclean and apply-al simply runs again.

use super::al::{self, AlGeometry, AL_EXTENTS_DEFAULT, AL_EXTENTS_MAX, AL_EXTENTS_MIN};
use super::layout::{bitmap_bytes, Layout, LayoutError, MetaKind, BLOCK};
use super::superblock::{
    magic_format, mdf, mdf_peer, Placement, Superblock, SuperblockError, MAGIC_09, SUPERBLOCK_BYTES,
};
use super::MetaError;
use crate::store::{AlignedBuf, Store};
use std::sync::Arc;

/// Most bitmap bytes moved by one read or write.
pub(crate) const BITMAP_CHUNK: usize = 1 << 20;
/// Bitmap bits of one 4 MiB activity-log extent.
const BITS_PER_EXTENT: u64 = al::BITS_PER_EXTENT;

/// Where the metadata is, and what it describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaLocation {
    /// At the end of the data device the store opened.
    Internal,
    /// The store is a separate metadata device for a data device of `data_bytes` bytes.
    FlexExternal {
        /// Size of the data device.
        data_bytes: u64,
    },
}

impl MetaLocation {
    /// Internal or flex-external.
    pub fn kind(self) -> MetaKind {
        match self {
            MetaLocation::Internal => MetaKind::Internal,
            MetaLocation::FlexExternal { .. } => MetaKind::FlexExternal,
        }
    }

    fn placement(self, meta_bytes: u64) -> Placement {
        Placement {
            kind: self.kind(),
            meta_bytes,
            data_bytes: match self {
                MetaLocation::Internal => meta_bytes,
                MetaLocation::FlexExternal { data_bytes } => data_bytes,
            },
        }
    }
}

/// What `create-md` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateOptions {
    /// This node's id, 0..=31, or -1 to leave it to the first attach (drbdmeta's default).
    pub node_id: i32,
    /// `al-extents` recorded in the superblock (67..=65534, within the ring's capacity).
    pub al_extents: u32,
    /// The activity-log ring.
    pub al: AlGeometry,
    /// Overwrite metadata that is already there.
    pub force: bool,
}

impl CreateOptions {
    /// drbdmeta's defaults (node id -1, a 1 × 32 KiB ring) with DRBD's default
    /// `al-extents` 1237 (drbdmeta records an arbitrary 257).
    pub fn new(al: AlGeometry) -> CreateOptions {
        CreateOptions {
            node_id: -1,
            al_extents: AL_EXTENTS_DEFAULT,
            al,
            force: false,
        }
    }
}

/// What `apply-al` found and did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApplyAlReport {
    /// The superblock was clean before.
    pub was_clean: bool,
    /// `MDF_PRIMARY_IND` was set: hot extents had to go into the bitmap.
    pub primary: bool,
    /// Valid ring slots (update or initialized).
    pub valid_slots: u32,
    /// Slots with a bad magic or crc.
    pub corrupt_slots: u32,
    /// Valid update transactions.
    pub updates: u32,
    /// The active set at the newest transaction (sorted extent numbers).
    pub hot_extents: Vec<u32>,
    /// Extents whose bits were set (hot extents that start inside the bitmap in use,
    /// [`MetaDevice::bitmap_bytes`]), if the node was Primary.
    pub applied_extents: u64,
    /// Hot extents that start beyond the bitmap in use (nothing to set).
    pub skipped_extents: Vec<u32>,
    /// Bits that were clear and are now set.
    pub bits_newly_set: u64,
    /// The ring was re-initialised.
    pub reinitialized: bool,
    /// A replay error that did not matter because the node was not Primary.
    pub ignored_error: Option<String>,
}

/// What [`MetaDevice::attach_blocking`] found.
#[derive(Debug)]
pub struct Attach {
    /// The on-disk bitmap of the data area (whole pages; bits past the data are
    /// meaningless and ignored by the loader).
    pub bitmap: Vec<u8>,
    /// What apply-al did, when it ran: the metadata was not clean (the node stopped
    /// without a clean stop).
    pub apply: Option<ApplyAlReport>,
    /// The peer slot asked for a full sync (`MDF_PEER_FULL_SYNC`, set when a Primary's
    /// disk failed and was detached): every bit of the data area was set, on disk, and
    /// the flag cleared.
    pub full_sync: bool,
}

impl Attach {
    /// It stopped while Primary: the activity log was applied and the superblock now
    /// says `MDF_CRASHED_PRIMARY`.
    pub fn crashed_primary(&self) -> bool {
        self.apply.as_ref().is_some_and(|r| r.primary)
    }
}

/// A change of the superblock's state: what the daemon records as roles, disk states
/// and generations change. [`MetaDevice::change_blocking`] writes it at once;
/// [`MetaDevice::stage`] applies it in memory for a writer that makes it durable later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SbChange {
    /// Set or clear `MDF_PRIMARY_IND` (promotion / demotion). On promotion it must be on
    /// disk before the first write as Primary: it is what makes the next attach after a
    /// crash apply the activity log.
    Primary(bool),
    /// Whether the data is consistent (`MDF_CONSISTENT`, with `MDF_WAS_UP_TO_DATE`). A
    /// SyncTarget clears it before the first resync write, so a restart in the middle of
    /// a resync comes back Inconsistent (and may not be promoted); the end of a complete
    /// resync sets it again.
    Consistent(bool),
    /// The failure record of a disk whose write failed: `MDF_CONSISTENT` (and
    /// `MDF_WAS_UP_TO_DATE`) cleared, and with `full_sync` the peer slot's
    /// `MDF_PEER_FULL_SYNC` set, so that the next attach marks every block out of sync
    /// (see [`MetaDevice::attach_blocking`]). A detached Primary asks for that: the bitmap
    /// of what it missed while diskless lives only in memory.
    Failure {
        /// Ask for a full sync at the next attach.
        full_sync: bool,
    },
    /// Clear `MDF_CRASHED_PRIMARY`: the resync after the crash is complete.
    ClearCrashedPrimary,
    /// New generation UUIDs (current, the peer slot's bitmap UUID, history[0..2]): a new
    /// generation must be on disk before anything is written in it.
    Uuids(crate::state::uuid::UuidSet),
}

impl SbChange {
    fn apply(&self, sb: &mut Superblock) {
        match *self {
            SbChange::Primary(true) => sb.flags |= mdf::PRIMARY_IND,
            SbChange::Primary(false) => sb.flags &= !mdf::PRIMARY_IND,
            SbChange::Consistent(true) => sb.flags |= mdf::CONSISTENT | mdf::WAS_UP_TO_DATE,
            SbChange::Consistent(false) => sb.flags &= !(mdf::CONSISTENT | mdf::WAS_UP_TO_DATE),
            SbChange::Failure { full_sync } => {
                sb.flags &= !(mdf::CONSISTENT | mdf::WAS_UP_TO_DATE);
                if full_sync {
                    sb.peers[0].flags |= mdf_peer::FULL_SYNC;
                }
            }
            SbChange::ClearCrashedPrimary => sb.flags &= !mdf::CRASHED_PRIMARY,
            SbChange::Uuids(u) => {
                sb.current_uuid = u.current;
                sb.peers[0].bitmap_uuid = u.bitmap;
                sb.history_uuids[..u.history.len()].copy_from_slice(&u.history);
            }
        }
    }
}

/// DRBD 9 metadata on an open store.
#[derive(Debug)]
pub struct MetaDevice {
    store: Store,
    name: String,
    location: MetaLocation,
    layout: Layout,
    sb: Superblock,
}

fn io_err<'a>(
    name: &'a str,
    what: &'static str,
    offset: u64,
) -> impl FnOnce(crate::store::StoreError) -> MetaError + 'a {
    move |source| MetaError::Io {
        device: name.to_string(),
        what,
        offset,
        source,
    }
}

fn to_usize(n: u64) -> usize {
    // Callers pass lengths bounded by BITMAP_CHUNK or the 32 MiB ring.
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl MetaDevice {
    fn sb_error(e: SuperblockError, name: &str, location: MetaLocation, offset: u64) -> MetaError {
        let kind = location.kind();
        match e {
            SuperblockError::NoMetadata { magic } => MetaError::NotFound {
                device: name.to_string(),
                magic,
                offset,
                create_args: match kind {
                    MetaKind::Internal => name.to_string(),
                    MetaKind::FlexExternal => format!("DEVICE --meta-device {name}"),
                },
            },
            SuperblockError::OldFormat { format, .. } => MetaError::OldFormat {
                device: name.to_string(),
                format,
                kind: kind.drbdmeta_name(),
            },
            SuperblockError::Invalid { problem, fix } => MetaError::Invalid {
                device: name.to_string(),
                problem,
                fix,
            },
        }
    }

    fn superblock_offset_for(store: &Store, location: MetaLocation) -> u64 {
        match location {
            // The last 4 KiB-aligned block; a device under 4 KiB has none (offset 0 then
            // fails validation as too small).
            MetaLocation::Internal => (store.size_bytes() & !(BLOCK - 1)).saturating_sub(BLOCK),
            MetaLocation::FlexExternal { .. } => 0,
        }
    }

    fn read_superblock_at(store: &Store, name: &str, offset: u64) -> Result<Superblock, MetaError> {
        let buf = store
            .read_blocking(offset, SUPERBLOCK_BYTES)
            .map_err(io_err(name, "reading the superblock", offset))?;
        let mut block = [0u8; SUPERBLOCK_BYTES];
        block.copy_from_slice(&buf[..SUPERBLOCK_BYTES]);
        Ok(Superblock::decode(&block))
    }

    /// Reads and validates the superblock of metadata at `location` on `store`.
    pub fn open(store: Store, location: MetaLocation) -> Result<MetaDevice, MetaError> {
        let name = store.info().path.display().to_string();
        let meta_bytes = store.size_bytes();
        if meta_bytes < BLOCK {
            return Err(MetaError::Unfit {
                device: name,
                kind: location.kind().drbdmeta_name(),
                problem: format!("{meta_bytes} bytes cannot even hold a 4 KiB superblock"),
            });
        }
        let offset = Self::superblock_offset_for(&store, location);
        let sb = Self::read_superblock_at(&store, &name, offset)?;
        let layout = sb
            .validate(&location.placement(meta_bytes))
            .map_err(|e| Self::sb_error(e, &name, location, offset))?;
        Ok(MetaDevice {
            store,
            name,
            location,
            layout,
            sb,
        })
    }

    /// `create-md`: writes fresh metadata (zeroed bitmap, initialised activity log, the
    /// superblock drbdmeta would write) and returns it opened. Refuses to overwrite any
    /// DRBD metadata already there unless `opts.force`.
    pub fn create(
        store: Store,
        location: MetaLocation,
        opts: &CreateOptions,
    ) -> Result<MetaDevice, MetaError> {
        let name = store.info().path.display().to_string();
        let kind = location.kind();
        check_create_options(opts)?;
        let meta_bytes = store.size_bytes();
        let layout = match location {
            MetaLocation::Internal => Layout::internal(meta_bytes, opts.al),
            MetaLocation::FlexExternal { data_bytes } => {
                Layout::flex_external(meta_bytes, data_bytes, opts.al)
            }
        }
        .map_err(|e| MetaError::Unfit {
            device: name.clone(),
            kind: kind.drbdmeta_name(),
            problem: match e {
                LayoutError::TooSmall(s) | LayoutError::TooLarge(s) => s,
            },
        })?;
        if opts.al_extents > layout.al.max_al_extents() {
            return Err(MetaError::Usage(format!(
                "--al-extents {} is more than a {}-block activity log can describe ({}); \
                 use a larger --al-stripe-size or fewer extents",
                opts.al_extents,
                layout.al.blocks(),
                layout.al.max_al_extents()
            )));
        }
        let old = Self::read_superblock_at(&store, &name, layout.md_offset)?;
        if let Some(format) = magic_format(old.magic) {
            if !opts.force {
                let what = if old.magic == MAGIC_09 {
                    format!(
                        "{format} metadata (current-uuid {:#018X}, la-size-sect {})",
                        old.current_uuid, old.effective_size
                    )
                } else {
                    format!("{format} metadata")
                };
                return Err(MetaError::Exists { device: name, what });
            }
            // Destroy the old superblock first: a crash below must not leave it pointing
            // at a bitmap that is being zeroed.
            let zero =
                AlignedBuf::new(SUPERBLOCK_BYTES).map_err(|e| MetaError::Usage(e.to_string()))?;
            store
                .write_blocking(layout.md_offset, &zero, true)
                .map_err(io_err(&name, "wiping the old superblock", layout.md_offset))?;
        }
        let dev = MetaDevice {
            sb: Superblock::created(&layout, opts.node_id, opts.al_extents),
            store,
            name,
            location,
            layout,
        };
        dev.zero_bitmap_blocking()?;
        dev.initialize_al_blocking()?;
        dev.flush_blocking()?;
        dev.put_superblock_blocking(&dev.sb)?;
        Ok(dev)
    }

    /// The superblock as last read or written.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Where everything is.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The store the metadata is on.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The metadata device's path, for messages.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// Internal or flex-external, and the data size it was opened for.
    pub fn location(&self) -> MetaLocation {
        self.location
    }

    /// Bytes of on-disk bitmap in use: the bitmap for the last agreed size, in whole
    /// 4 KiB pages (drbdmeta's `bm_bytes`). 0 while the size was never agreed.
    pub fn bitmap_bytes(&self) -> u64 {
        // validate() guarantees effective_size ≤ max_data_sectors ≤ 1 PiB.
        bitmap_bytes(self.sb.effective_size).unwrap_or(0)
    }

    fn check_bitmap_range(&self, offset: u64, len: usize) -> Result<u64, MetaError> {
        let len = len as u64;
        let end = offset.checked_add(len);
        if !offset.is_multiple_of(BLOCK)
            || !len.is_multiple_of(BLOCK)
            || end.is_none_or(|e| e > self.layout.bm_area_bytes)
        {
            return Err(MetaError::Usage(format!(
                "bitmap IO of {len} bytes at bitmap byte {offset} is not whole 4 KiB pages \
                 inside the {}-byte bitmap of {}",
                self.layout.bm_area_bytes, self.name
            )));
        }
        Ok(self.layout.bm_offset + offset)
    }

    /// Reads bitmap bytes `[offset, offset + out.len())` (whole 4 KiB pages), at most
    /// [`BITMAP_CHUNK`] per IO.
    pub fn read_bitmap_blocking(&self, offset: u64, out: &mut [u8]) -> Result<(), MetaError> {
        let mut at = self.check_bitmap_range(offset, out.len())?;
        for chunk in out.chunks_mut(BITMAP_CHUNK) {
            let buf = self.store.read_blocking(at, chunk.len()).map_err(io_err(
                &self.name,
                "reading the bitmap",
                at,
            ))?;
            chunk.copy_from_slice(&buf[..chunk.len()]);
            at += chunk.len() as u64;
        }
        Ok(())
    }

    /// Writes bitmap bytes at `offset` (whole 4 KiB pages), at most [`BITMAP_CHUNK`] per
    /// IO; with `fua` each chunk is durable when this returns.
    pub fn write_bitmap_blocking(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), MetaError> {
        let mut at = self.check_bitmap_range(offset, data.len())?;
        for chunk in data.chunks(BITMAP_CHUNK) {
            let buf = AlignedBuf::from_slice(chunk).map_err(|e| MetaError::Usage(e.to_string()))?;
            self.store.write_blocking(at, &buf, fua).map_err(io_err(
                &self.name,
                "writing the bitmap",
                at,
            ))?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    /// Async [`Self::read_bitmap_blocking`], through the store's ring.
    pub async fn read_bitmap(&self, offset: u64, out: &mut [u8]) -> Result<(), MetaError> {
        let mut at = self.check_bitmap_range(offset, out.len())?;
        for chunk in out.chunks_mut(BITMAP_CHUNK) {
            let buf = self.store.read(at, chunk.len()).await.map_err(io_err(
                &self.name,
                "reading the bitmap",
                at,
            ))?;
            chunk.copy_from_slice(&buf[..chunk.len()]);
            at += chunk.len() as u64;
        }
        Ok(())
    }

    /// Async write of bitmap pages starting at page `first_page` (4 KiB pages from the
    /// bitmap's start); `data` is whole pages.
    pub async fn write_bitmap_pages(
        &self,
        first_page: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), MetaError> {
        let offset = first_page.saturating_mul(BLOCK);
        let mut at = self.check_bitmap_range(offset, data.len())?;
        for chunk in data.chunks(BITMAP_CHUNK) {
            let buf = AlignedBuf::from_slice(chunk).map_err(|e| MetaError::Usage(e.to_string()))?;
            self.store
                .write(at, Arc::new(buf), fua)
                .await
                .map_err(io_err(&self.name, "writing the bitmap", at))?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    /// Async write of one activity-log transaction to on-disk ring block `block` (see
    /// [`al::al_block_of`]), with FUA: the transaction is durable when this returns.
    pub async fn write_al_block(&self, block: u32, data: &[u8; 4096]) -> Result<(), MetaError> {
        let at = self.layout.al_block_offset(block).ok_or_else(|| {
            MetaError::Usage(format!(
                "activity-log block {block} is outside the {}-block ring of {}",
                self.layout.al.blocks(),
                self.name
            ))
        })?;
        let buf = AlignedBuf::from_slice(data).map_err(|e| MetaError::Usage(e.to_string()))?;
        self.store
            .write(at, Arc::new(buf), true)
            .await
            .map_err(io_err(
                &self.name,
                "writing an activity-log transaction",
                at,
            ))
    }

    /// Validates `sb` for this device and writes it with FUA (async, for the daemon).
    pub async fn write_superblock(&mut self, sb: Superblock) -> Result<(), MetaError> {
        self.check_superblock(&sb)?;
        let buf =
            AlignedBuf::from_slice(&sb.encode()).map_err(|e| MetaError::Usage(e.to_string()))?;
        let at = self.layout.md_offset;
        self.store
            .write(at, Arc::new(buf), true)
            .await
            .map_err(io_err(&self.name, "writing the superblock", at))?;
        self.sb = sb;
        Ok(())
    }

    /// Validates `sb` for this device and writes it with FUA.
    pub fn write_superblock_blocking(&mut self, sb: Superblock) -> Result<(), MetaError> {
        self.check_superblock(&sb)?;
        self.put_superblock_blocking(&sb)?;
        self.sb = sb;
        Ok(())
    }

    /// A superblock is only written if it would open again with the same layout
    /// (drbdmeta's `md_cpu_to_disk` validates too).
    fn check_superblock(&self, sb: &Superblock) -> Result<(), MetaError> {
        let layout = sb
            .validate(&self.location.placement(self.store.size_bytes()))
            .map_err(|e| Self::sb_error(e, &self.name, self.location, self.layout.md_offset))?;
        if layout != self.layout {
            return Err(MetaError::Usage(format!(
                "refusing to write a superblock that moves the metadata of {}",
                self.name
            )));
        }
        Ok(())
    }

    fn put_superblock_blocking(&self, sb: &Superblock) -> Result<(), MetaError> {
        let buf =
            AlignedBuf::from_slice(&sb.encode()).map_err(|e| MetaError::Usage(e.to_string()))?;
        let at = self.layout.md_offset;
        self.store.write_blocking(at, &buf, true).map_err(io_err(
            &self.name,
            "writing the superblock",
            at,
        ))
    }

    fn flush_blocking(&self) -> Result<(), MetaError> {
        self.store
            .flush_blocking()
            .map_err(io_err(&self.name, "flushing", 0))
    }

    /// Zeroes the whole reserved bitmap area, 1 MiB per write.
    fn zero_bitmap_blocking(&self) -> Result<(), MetaError> {
        let zero = AlignedBuf::new(BITMAP_CHUNK).map_err(|e| MetaError::Usage(e.to_string()))?;
        let mut done = 0u64;
        while done < self.layout.bm_area_bytes {
            let len = (self.layout.bm_area_bytes - done).min(BITMAP_CHUNK as u64);
            let at = self.layout.bm_offset + done;
            let res = if len == BITMAP_CHUNK as u64 {
                self.store.write_blocking(at, &zero, false)
            } else {
                let part =
                    AlignedBuf::new(to_usize(len)).map_err(|e| MetaError::Usage(e.to_string()))?;
                self.store.write_blocking(at, &part, false)
            };
            res.map_err(io_err(&self.name, "zeroing the bitmap", at))?;
            done += len;
        }
        Ok(())
    }

    /// Writes the ring create-md writes: every block an initialised transaction.
    fn initialize_al_blocking(&self) -> Result<(), MetaError> {
        let ring = al::initialized_ring(&self.layout.al);
        let mut at = self.layout.al_offset;
        for chunk in ring.chunks(BITMAP_CHUNK) {
            let buf = AlignedBuf::from_slice(chunk).map_err(|e| MetaError::Usage(e.to_string()))?;
            self.store.write_blocking(at, &buf, false).map_err(io_err(
                &self.name,
                "initialising the activity log",
                at,
            ))?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    /// Reads the whole activity-log ring (at most 32 MiB: [`al::AL_MAX_BLOCKS`]).
    pub fn read_al_blocking(&self) -> Result<Vec<u8>, MetaError> {
        let total = self.layout.al.bytes();
        let mut ring = Vec::with_capacity(to_usize(total));
        let mut at = self.layout.al_offset;
        while (ring.len() as u64) < total {
            let len = (total - ring.len() as u64).min(BITMAP_CHUNK as u64);
            let buf = self.store.read_blocking(at, to_usize(len)).map_err(io_err(
                &self.name,
                "reading the activity log",
                at,
            ))?;
            ring.extend_from_slice(&buf[..to_usize(len)]);
            at += len;
        }
        Ok(ring)
    }

    /// Set bits in the bitmap in use ([`Self::bitmap_bytes`]), counted as drbdmeta's
    /// `dump-md` counts `bits-set`, reading 1 MiB at a time.
    pub fn count_bits_blocking(&self) -> Result<u64, MetaError> {
        let total = self.bitmap_bytes();
        let mut buf = vec![0u8; to_usize(total.min(BITMAP_CHUNK as u64))];
        let mut done = 0u64;
        let mut bits = 0u64;
        while done < total {
            let len = to_usize((total - done).min(BITMAP_CHUNK as u64));
            let chunk = &mut buf[..len];
            self.read_bitmap_blocking(done, chunk)?;
            bits += chunk.iter().map(|b| u64::from(b.count_ones())).sum::<u64>();
            done += len as u64;
        }
        Ok(bits)
    }

    /// `apply-al`, with drbdmeta's `meta_apply_al` semantics for v09: replay the ring;
    /// if the node was Primary (`MDF_PRIMARY_IND`) set every bit of each hot 4 MiB extent;
    /// re-initialise the ring if it held updates or could not be read; set
    /// `MDF_AL_CLEAN` and write the superblock (always, as drbdmeta does for v09).
    /// `MDF_PRIMARY_IND` stays set (the next attach turns it into `CRASHED_PRIMARY`).
    /// An unusable ring on a Primary is an error and changes nothing (drbdmeta exits 1
    /// or 2 there).
    ///
    /// The bits are set exactly as drbd-utils 9.22's `apply_al` sets them, so the two
    /// produce identical bitmaps: an extent's 128 bitmap bytes are set whole, clipped to
    /// the bitmap in use ([`Self::bitmap_bytes`], the last agreed size rounded up to
    /// 4 KiB), and an extent that starts beyond it is skipped. So the bits of the last
    /// extent past the agreed size (and of whole extents in the 4 KiB padding) may be
    /// set; they describe no data, and whoever loads the bitmap must ignore bits past the
    /// agreed size. drbd-utils ≥ 9.33 (commit 84a261cd, drbdmeta master) differs: it
    /// skips a hot extent whose bytes end exactly at the end of that 4 KiB-aligned
    /// bitmap (`on_disk_word32_pos_e >= bm_bytes`, an off-by-one), losing the bits of
    /// the device's last extent whenever it is hot; tandem does not copy that.
    pub fn apply_al_blocking(&mut self) -> Result<ApplyAlReport, MetaError> {
        let ring = self.read_al_blocking()?;
        let geo = self.layout.al;
        let mut report = ApplyAlReport {
            was_clean: self.sb.is_clean(),
            primary: self.sb.flags & mdf::PRIMARY_IND != 0,
            ..ApplyAlReport::default()
        };
        match al::replay(&ring, &geo) {
            Err(e) => {
                if report.primary {
                    return Err(MetaError::AlUnusable {
                        device: self.name.clone(),
                        reason: e.to_string(),
                    });
                }
                report.ignored_error = Some(e.to_string());
                report.reinitialized = true;
            }
            Ok(r) => {
                report.valid_slots = r.valid;
                report.corrupt_slots = r.corrupt;
                report.updates = r.updates;
                report.hot_extents = r.hot;
                report.reinitialized = r.updates > 0;
                if r.updates > 0 && report.primary {
                    self.set_hot_extents_blocking(&mut report)?;
                    self.flush_blocking()?;
                }
            }
        }
        if report.reinitialized {
            self.initialize_al_blocking()?;
            self.flush_blocking()?;
        }
        let mut sb = self.sb.clone();
        sb.flags |= mdf::AL_CLEAN;
        self.write_superblock_blocking(sb)?;
        Ok(report)
    }

    /// The daemon's attach, before it serves IO (what `drbdadm attach` does with
    /// `drbdmeta apply-al` first):
    ///
    /// 1. If the metadata is not clean, apply the activity log exactly as `apply-al`
    ///    (hot extents of a node that was Primary → bits set on disk).
    /// 2. Re-initialise the ring, so transaction numbers restart at 0 and nothing older
    ///    can be taken for newer.
    /// 3. Write the superblock: unclean (`MDF_AL_CLEAN` cleared — a crash from now on
    ///    needs apply-al), `MDF_CRASHED_PRIMARY` if step 1 found a Primary, not Primary
    ///    (promotion sets that again), `la-size` = `data_sectors`, `al-extents`.
    /// 4. Read the bitmap of the data area.
    /// 5. If the peer slot says `MDF_PEER_FULL_SYNC` (a detached Primary's failure
    ///    record, [`SbChange::Failure`]): set every bit of the data area,
    ///    write the bitmap, then clear the flag.
    ///
    /// Every step is durable before the next: a crash in between repeats the attach.
    pub fn attach_blocking(
        &mut self,
        data_sectors: u64,
        al_extents: u32,
    ) -> Result<Attach, MetaError> {
        if data_sectors == 0 || data_sectors > self.layout.max_data_sectors {
            return Err(MetaError::Usage(format!(
                "a data area of {data_sectors} sectors does not fit the metadata of {} \
                 (at most {} sectors)",
                self.name, self.layout.max_data_sectors
            )));
        }
        if al_extents > self.layout.al.max_al_extents() {
            return Err(MetaError::Usage(format!(
                "al-extents {al_extents} is more than the activity log of {} can describe \
                 ({}); lower al-extents or recreate the metadata with a larger --al-stripe-size",
                self.name,
                self.layout.al.max_al_extents()
            )));
        }
        let apply = if self.sb.is_clean() {
            None
        } else {
            Some(self.apply_al_blocking()?)
        };
        let crashed_primary = apply.as_ref().is_some_and(|r| r.primary);
        self.initialize_al_blocking()?;
        self.flush_blocking()?;
        let mut sb = self.sb.clone();
        sb.flags &= !(mdf::AL_CLEAN | mdf::PRIMARY_IND);
        if crashed_primary {
            sb.flags |= mdf::CRASHED_PRIMARY;
        }
        sb.effective_size = data_sectors;
        sb.al_nr_extents = al_extents;
        self.write_superblock_blocking(sb)?;
        let mut bitmap = vec![0u8; to_usize(self.bitmap_bytes())];
        self.read_bitmap_blocking(0, &mut bitmap)?;
        let full_sync = self.sb.peers[0].flags & mdf_peer::FULL_SYNC != 0;
        if full_sync {
            set_all_bits(&mut bitmap, data_sectors);
            self.write_bitmap_blocking(0, &bitmap, true)?;
            let mut sb = self.sb.clone();
            sb.peers[0].flags &= !mdf_peer::FULL_SYNC;
            self.write_superblock_blocking(sb)?;
        }
        Ok(Attach {
            bitmap,
            apply,
            full_sync,
        })
    }

    /// A clean stop, after the caller wrote every dirty bitmap page and flushed the data:
    /// re-initialises the ring and marks the metadata clean and not Primary
    /// (`drbdmeta apply-al` then has nothing to do). Blocking, once, at the end.
    pub fn mark_clean_blocking(&mut self) -> Result<(), MetaError> {
        self.initialize_al_blocking()?;
        self.flush_blocking()?;
        let mut sb = self.sb.clone();
        sb.flags |= mdf::AL_CLEAN;
        sb.flags &= !mdf::PRIMARY_IND;
        self.write_superblock_blocking(sb)
    }

    /// Records whether the data is consistent (`MDF_CONSISTENT`, with
    /// `MDF_WAS_UP_TO_DATE`), durably (see [`SbChange::Consistent`]).
    pub fn set_consistent_blocking(&mut self, consistent: bool) -> Result<(), MetaError> {
        self.change_blocking(&[SbChange::Consistent(consistent)])
    }

    /// Applies `changes` to a copy of the superblock and writes it (FUA) if it differs.
    pub fn change_blocking(&mut self, changes: &[SbChange]) -> Result<(), MetaError> {
        let mut sb = self.sb.clone();
        for c in changes {
            c.apply(&mut sb);
        }
        if sb == self.sb {
            return Ok(());
        }
        self.write_superblock_blocking(sb)
    }

    /// Applies `changes` to the superblock in memory only and returns whether it changed.
    /// From then on [`Self::superblock`] and the flag queries say the new state; the
    /// caller makes it durable by writing [`Self::superblock_image`] (the daemon's
    /// metadata writer does, off its locks).
    pub fn stage(&mut self, changes: &[SbChange]) -> bool {
        let before = self.sb.clone();
        for c in changes {
            c.apply(&mut self.sb);
        }
        self.sb != before
    }

    /// The superblock as it goes to disk: its byte offset and its encoded 4 KiB block.
    pub fn superblock_image(&self) -> (u64, Box<[u8; SUPERBLOCK_BYTES]>) {
        (self.layout.md_offset, Box::new(self.sb.encode()))
    }

    /// Whether the peer slot asks for a full sync at the next attach.
    pub fn full_sync_pending(&self) -> bool {
        self.sb.peers[0].flags & mdf_peer::FULL_SYNC != 0
    }

    /// Whether the superblock says the last Primary crashed (`MDF_CRASHED_PRIMARY`): set
    /// by the attach that applied a crashed Primary's log, kept across restarts until
    /// the resync that follows completes ([`SbChange::ClearCrashedPrimary`]).
    pub fn is_crashed_primary(&self) -> bool {
        self.sb.flags & mdf::CRASHED_PRIMARY != 0
    }

    /// Whether the superblock says the data is consistent (`MDF_CONSISTENT`).
    pub fn is_consistent(&self) -> bool {
        self.sb.flags & mdf::CONSISTENT != 0
    }

    /// Gives the store back.
    pub fn into_store(self) -> Store {
        self.store
    }

    /// Sets the bits of `report.hot_extents` that start inside the bitmap in use, one
    /// read-modify-write per 1 MiB bitmap chunk that holds any.
    fn set_hot_extents_blocking(&self, report: &mut ApplyAlReport) -> Result<(), MetaError> {
        let in_use = self.bitmap_bytes();
        let extent_bytes = BITS_PER_EXTENT / 8;
        let (inside, beyond): (Vec<u32>, Vec<u32>) = report
            .hot_extents
            .iter()
            .partition(|e| u64::from(**e) * extent_bytes < in_use);
        report.skipped_extents = beyond;
        report.applied_extents = inside.len() as u64;
        let extents_per_chunk = BITMAP_CHUNK as u64 / extent_bytes;
        let mut buf = vec![0u8; BITMAP_CHUNK];
        let mut rest = inside.as_slice();
        while let Some(first) = rest.first() {
            let chunk_no = u64::from(*first) / extents_per_chunk;
            let n = rest
                .iter()
                .take_while(|e| u64::from(**e) / extents_per_chunk == chunk_no)
                .count();
            let (group, tail) = rest.split_at(n);
            rest = tail;
            let start = chunk_no * BITMAP_CHUNK as u64;
            // A multiple of 4 KiB: in_use is, and so is start.
            let len = to_usize((in_use - start).min(BITMAP_CHUNK as u64));
            let chunk = &mut buf[..len];
            self.read_bitmap_blocking(start, chunk)?;
            // Extent numbers relative to the chunk (< extents_per_chunk, fits u32).
            let base = chunk_no * extents_per_chunk;
            let rebased: Vec<u32> = group
                .iter()
                .map(|e| u32::try_from(u64::from(*e) - base).unwrap_or(u32::MAX))
                .collect();
            report.bits_newly_set += al::apply_hot_extents(chunk, &rebased);
            self.write_bitmap_blocking(start, chunk, false)?;
        }
        Ok(())
    }
}

/// `create-md`'s option limits, DRBD's (the ring's are [`AlGeometry::new`]'s).
fn check_create_options(opts: &CreateOptions) -> Result<(), MetaError> {
    if !(-1..=super::superblock::MAX_NODE_ID).contains(&opts.node_id) {
        return Err(MetaError::Usage(format!(
            "--node-id {} is outside 0..=31",
            opts.node_id
        )));
    }
    if !(AL_EXTENTS_MIN..=AL_EXTENTS_MAX).contains(&opts.al_extents) {
        return Err(MetaError::Usage(format!(
            "--al-extents {} is outside DRBD's {AL_EXTENTS_MIN}..={AL_EXTENTS_MAX}",
            opts.al_extents
        )));
    }
    Ok(())
}

/// Sets the bit of every 4 KiB block of a data area of `data_sectors` sectors in an
/// on-disk bitmap (little-endian words: block `i` is bit `i % 8` of byte `i / 8`); bits
/// past the data area stay as they are.
fn set_all_bits(bitmap: &mut [u8], data_sectors: u64) {
    let blocks = data_sectors.div_ceil(8);
    let full = usize::try_from(blocks / 8)
        .unwrap_or(usize::MAX)
        .min(bitmap.len());
    for b in &mut bitmap[..full] {
        *b = 0xff;
    }
    let rest = blocks % 8;
    if rest != 0 {
        if let Some(b) = bitmap.get_mut(full) {
            *b |= (1u8 << rest) - 1;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::meta::al::{encode_transaction, AlTransaction};
    use crate::meta::layout::SECTOR;
    use crate::store::StoreOptions;

    use crate::store::testdir::TempDir;

    /// A sparse file of `bytes` bytes opened as a store.
    fn store(dir: &TempDir, name: &str, bytes: u64) -> Store {
        let opts = StoreOptions {
            create_size_bytes: Some(bytes),
            ..StoreOptions::default()
        };
        Store::open(dir.path(name), &opts).expect("open store")
    }

    fn default_opts() -> CreateOptions {
        CreateOptions::new(AlGeometry::default_ring())
    }

    #[test]
    fn create_then_open_round_trips() {
        let dir = TempDir::new("create");
        let s = store(&dir, "d", 1 << 30);
        let mut opts = default_opts();
        opts.node_id = 2;
        let created = MetaDevice::create(s.clone(), MetaLocation::Internal, &opts).unwrap();
        let dev = MetaDevice::open(s, MetaLocation::Internal).unwrap();
        assert_eq!(dev.superblock(), created.superblock());
        assert_eq!(dev.layout(), created.layout());
        let sb = dev.superblock();
        assert_eq!(
            (sb.node_id, sb.al_nr_extents, sb.flags),
            (2, 1237, mdf::AL_CLEAN)
        );
        assert_eq!(dev.layout().md_size_sect, 136);
        assert_eq!(dev.bitmap_bytes(), 0, "no size agreed yet");
        assert_eq!(dev.count_bits_blocking().unwrap(), 0);
        // The ring is initialised: it replays to nothing.
        let ring = dev.read_al_blocking().unwrap();
        let r = al::replay(&ring, &dev.layout().al).unwrap();
        assert_eq!((r.valid, r.updates, r.corrupt), (8, 0, 0));
    }

    #[test]
    fn create_refuses_existing_metadata_without_force() {
        let dir = TempDir::new("exists");
        let s = store(&dir, "d", 64 << 20);
        MetaDevice::create(s.clone(), MetaLocation::Internal, &default_opts()).unwrap();
        let e = MetaDevice::create(s.clone(), MetaLocation::Internal, &default_opts()).unwrap_err();
        assert!(matches!(e, MetaError::Exists { .. }), "{e}");
        assert!(e.to_string().contains("--force"), "{e}");
        // Forced: fresh metadata, the old bitmap content gone.
        let mut dev = MetaDevice::open(s.clone(), MetaLocation::Internal).unwrap();
        let mut sb = dev.superblock().clone();
        sb.effective_size = dev.layout().max_data_sectors;
        dev.write_superblock_blocking(sb).unwrap();
        dev.write_bitmap_blocking(0, &[0xff; 4096], false).unwrap();
        assert_eq!(dev.count_bits_blocking().unwrap(), 4096 * 8);
        let mut opts = default_opts();
        opts.force = true;
        let fresh = MetaDevice::create(s, MetaLocation::Internal, &opts).unwrap();
        assert_eq!(fresh.superblock().effective_size, 0);
        let mut page = [1u8; 4096];
        fresh.read_bitmap_blocking(0, &mut page).unwrap();
        assert!(page.iter().all(|b| *b == 0));
    }

    #[test]
    fn create_checks_its_options_and_the_device() {
        let dir = TempDir::new("opts");
        let s = store(&dir, "d", 64 << 20);
        let mut o = default_opts();
        o.al_extents = 66;
        assert!(matches!(
            MetaDevice::create(s.clone(), MetaLocation::Internal, &o),
            Err(MetaError::Usage(_))
        ));
        // 8 blocks describe at most 7 × 919 = 6433 extents.
        o.al_extents = 6434;
        let e = MetaDevice::create(s.clone(), MetaLocation::Internal, &o).unwrap_err();
        assert!(e.to_string().contains("6433"), "{e}");
        o.al_extents = 1237;
        o.node_id = 32;
        assert!(matches!(
            MetaDevice::create(s, MetaLocation::Internal, &o),
            Err(MetaError::Usage(_))
        ));
        let tiny = store(&dir, "tiny", 512 << 10);
        let e = MetaDevice::create(tiny, MetaLocation::Internal, &default_opts()).unwrap_err();
        assert!(matches!(e, MetaError::Unfit { .. }), "{e}");
    }

    #[test]
    fn open_says_what_is_wrong_and_what_to_do() {
        let dir = TempDir::new("open");
        let s = store(&dir, "d", 64 << 20);
        let e = MetaDevice::open(s.clone(), MetaLocation::Internal).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, MetaError::NotFound { magic: 0, .. }), "{msg}");
        assert!(msg.contains("tandem create-md"), "{msg}");
        // v08 metadata at the superblock's place.
        let mut block = AlignedBuf::new(4096).unwrap();
        block[60..64].copy_from_slice(&super::super::superblock::MAGIC_08.to_be_bytes());
        let at = (64 << 20) - 4096;
        s.write_blocking(at, &block, false).unwrap();
        let msg = MetaDevice::open(s.clone(), MetaLocation::Internal)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("DRBD 8") && msg.contains("drbdmeta"), "{msg}");
        // create-md does not overwrite it unasked.
        let e = MetaDevice::create(s.clone(), MetaLocation::Internal, &default_opts()).unwrap_err();
        assert!(e.to_string().contains("DRBD 8 (v08) metadata"), "{e}");
        // Internal metadata opened as flex-external: no superblock at byte 0.
        let mut forced = default_opts();
        forced.force = true;
        MetaDevice::create(s.clone(), MetaLocation::Internal, &forced).unwrap();
        let e = MetaDevice::open(
            s,
            MetaLocation::FlexExternal {
                data_bytes: 1 << 30,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("--meta-device"), "{e}");
    }

    #[test]
    fn flex_external_round_trips() {
        let dir = TempDir::new("ext");
        let meta = store(&dir, "m", 4 << 20);
        let loc = MetaLocation::FlexExternal {
            data_bytes: 1 << 30,
        };
        let al = AlGeometry::new(2, 8).unwrap();
        let dev = MetaDevice::create(meta.clone(), loc, &CreateOptions::new(al)).unwrap();
        let l = *dev.layout();
        assert_eq!((l.md_offset, l.al_offset, l.bm_offset), (0, 4096, 69632));
        assert_eq!(l.max_data_sectors, (1 << 30) / SECTOR);
        let again = MetaDevice::open(meta.clone(), loc).unwrap();
        assert_eq!(again.layout(), &l);
        // A data device larger than the bitmap covers is limited by the bitmap.
        let big = MetaDevice::open(
            meta,
            MetaLocation::FlexExternal {
                data_bytes: 1 << 50,
            },
        )
        .unwrap();
        assert_eq!(big.layout().max_data_sectors, l.bm_area_bytes * 64);
    }

    #[test]
    fn bitmap_io_stays_inside_the_bitmap() {
        let dir = TempDir::new("bmio");
        let s = store(&dir, "d", 1 << 30);
        let dev = MetaDevice::create(s, MetaLocation::Internal, &default_opts()).unwrap();
        let area = dev.layout().bm_area_bytes;
        assert_eq!(area, 32768);
        let mut buf = vec![0u8; 4096];
        assert!(dev.read_bitmap_blocking(area, &mut buf).is_err());
        assert!(dev.read_bitmap_blocking(100, &mut buf).is_err());
        assert!(dev.read_bitmap_blocking(u64::MAX - 4095, &mut buf).is_err());
        assert!(dev
            .write_bitmap_blocking(area - 4096, &[0; 8192], false)
            .is_err());
        let data: Vec<u8> = (0..area).map(|i| (i * 7 % 251) as u8).collect();
        dev.write_bitmap_blocking(0, &data, true).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_bitmap_blocking(0, &mut back).unwrap();
        assert_eq!(back, data);
        // The superblock and the AL next to the bitmap are untouched.
        MetaDevice::open(dev.store().clone(), MetaLocation::Internal).unwrap();
        let ring = dev.read_al_blocking().unwrap();
        assert_eq!(al::replay(&ring, &dev.layout().al).unwrap().valid, 8);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn async_bitmap_al_and_superblock_writes() {
        let dir = TempDir::new("async");
        let s = store(&dir, "d", 1 << 30);
        let mut dev = MetaDevice::create(s, MetaLocation::Internal, &default_opts()).unwrap();
        let pages = vec![0xa5u8; 8192];
        dev.write_bitmap_pages(3, &pages, true).await.unwrap();
        assert!(dev.write_bitmap_pages(7, &pages, true).await.is_err());
        let mut back = vec![0u8; 8192];
        dev.read_bitmap(3 * 4096, &mut back).await.unwrap();
        assert_eq!(back, pages);
        let t = AlTransaction {
            tr_number: 5,
            updates: vec![(0, 42)],
            context_start: 0,
            context_size: 1237,
            context: vec![42],
        };
        let geo = dev.layout().al;
        dev.write_al_block(al::al_block_of(&geo, 5), &encode_transaction(&t))
            .await
            .unwrap();
        assert!(dev
            .write_al_block(8, &encode_transaction(&t))
            .await
            .is_err());
        let r = al::replay(&dev.read_al_blocking().unwrap(), &geo).unwrap();
        assert_eq!((r.hot.as_slice(), r.updates), (&[42u32][..], 1));
        let mut sb = dev.superblock().clone();
        sb.flags &= !mdf::AL_CLEAN;
        sb.current_uuid = 0x1234_5678_9abc_def0;
        dev.write_superblock(sb.clone()).await.unwrap();
        let reopened = MetaDevice::open(dev.store().clone(), MetaLocation::Internal).unwrap();
        assert_eq!(reopened.superblock(), &sb);
        // A superblock that would not open again is not written.
        let mut bad = sb;
        bad.md_size_sect += 8;
        assert!(dev.write_superblock(bad).await.is_err());
    }

    /// Writes `t` into the ring at its place.
    fn put_tr(dev: &MetaDevice, t: &AlTransaction) {
        let block = al::al_block_of(&dev.layout().al, t.tr_number);
        let at = dev.layout().al_block_offset(block).unwrap();
        let buf = AlignedBuf::from_slice(&encode_transaction(t)).unwrap();
        dev.store().write_blocking(at, &buf, false).unwrap();
    }

    /// A transaction whose context says slots `0..updates.len()` hold the updates'
    /// extents and every other slot of 67 is free.
    fn tr(n: u32, updates: &[(u16, u32)]) -> AlTransaction {
        let mut context = vec![al::LC_FREE; 67];
        for &(slot, e) in updates {
            context[usize::from(slot)] = e;
        }
        AlTransaction {
            tr_number: n,
            updates: updates.to_vec(),
            context_start: 0,
            context_size: 67,
            context,
        }
    }

    /// A crashed Primary: size agreed, PRIMARY_IND, AL not clean.
    fn crashed(dev: &mut MetaDevice, la_size: u64, primary: bool) {
        let mut sb = dev.superblock().clone();
        sb.effective_size = la_size;
        sb.flags = mdf::CONSISTENT | if primary { mdf::PRIMARY_IND } else { 0 };
        dev.write_superblock_blocking(sb).unwrap();
    }

    fn bitmap(dev: &MetaDevice) -> Vec<u8> {
        let mut b = vec![0u8; usize::try_from(dev.layout().bm_area_bytes).unwrap()];
        dev.read_bitmap_blocking(0, &mut b).unwrap();
        b
    }

    fn extent_bits(bm: &[u8], e: usize) -> u32 {
        bm[e * 128..(e + 1) * 128]
            .iter()
            .map(|b| b.count_ones())
            .sum()
    }

    /// Runs the real runtime activity log over `writes` (one extent each, retired at
    /// once) and writes its transactions into the ring; returns the extents it holds.
    fn run_log(dev: &MetaDevice, al_extents: u32, first_tr: u32, writes: &[u32]) -> Vec<u32> {
        let mut log = al::ActivityLog::new(dev.layout().al, al_extents, first_tr).unwrap();
        for &e in writes {
            let begun = log.begin(e, e);
            assert_ne!(begun, al::Begin::NoRoom);
            if let Some(p) = log.prepare() {
                let at = dev.layout().al_block_offset(p.ring_block).unwrap();
                let buf = AlignedBuf::from_slice(&p.block[..]).unwrap();
                dev.store().write_blocking(at, &buf, false).unwrap();
                log.committed();
            }
            log.put(e, e);
        }
        log.active_extents()
    }

    #[test]
    fn apply_al_sets_hot_extents_of_a_crashed_primary() {
        let dir = TempDir::new("apply");
        let s = store(&dir, "d", 1 << 30);
        let mut dev = MetaDevice::create(s, MetaLocation::Internal, &default_opts()).unwrap();
        let la = dev.layout().max_data_sectors; // 2097016: the last extent is partial
        crashed(&mut dev, la, true);
        // 67 slots, 200 distinct extents: evictions, and the 8-block ring wraps many
        // times. The last write is the device's last extent (255).
        let mut writes: Vec<u32> = (0..200).map(|i| (i * 37) % 255).collect();
        writes.push(255);
        let active = run_log(&dev, 67, 1000, &writes);
        assert_eq!(active.len(), 67);
        assert!(active.contains(&255));
        // Tear the oldest transaction in the ring (the newest carries the whole context).
        let geo = dev.layout().al;
        let ring = dev.read_al_blocking().unwrap();
        let oldest = (0..geo.blocks())
            .min_by_key(|b| {
                let o = *b as usize * 4096;
                u32::from_be_bytes(ring[o + 4..o + 8].try_into().unwrap())
            })
            .unwrap();
        let at = dev.layout().al_block_offset(oldest).unwrap();
        dev.store()
            .write_blocking(at, &AlignedBuf::new(4096).unwrap(), false)
            .unwrap();
        let r = dev.apply_al_blocking().unwrap();
        assert!(r.primary && !r.was_clean);
        assert_eq!(r.corrupt_slots, 1);
        assert_eq!(r.hot_extents, active);
        assert_eq!(r.applied_extents, 67);
        let bm = bitmap(&dev);
        for &e in &active {
            assert_eq!(extent_bits(&bm, e as usize), 1024, "extent {e}");
        }
        // Extent 255 is set whole, as drbdmeta 9.22 does, although only 1007 of its
        // bits are inside the 2097016 agreed sectors (262127 bits); its bytes end exactly
        // at the end of the 32 KiB bitmap, where drbdmeta >= 9.33 would skip it.
        assert_eq!(dev.bitmap_bytes(), 256 * 128);
        let total: u32 = bm.iter().map(|b| b.count_ones()).sum();
        assert_eq!(total, 67 * 1024);
        assert_eq!(r.bits_newly_set, u64::from(total));
        assert_eq!(dev.count_bits_blocking().unwrap(), u64::from(total));
        // Clean now, PRIMARY_IND kept, ring re-initialised.
        let sb = dev.superblock();
        assert_eq!(sb.flags, mdf::CONSISTENT | mdf::PRIMARY_IND | mdf::AL_CLEAN);
        let reopened = MetaDevice::open(dev.store().clone(), MetaLocation::Internal).unwrap();
        assert_eq!(reopened.superblock().flags, sb.flags);
        let r2 = al::replay(&dev.read_al_blocking().unwrap(), &geo).unwrap();
        assert_eq!((r2.updates, r2.valid), (0, 8));
        // A second apply-al changes nothing.
        let again = dev.apply_al_blocking().unwrap();
        assert_eq!((again.updates, again.bits_newly_set), (0, 0));
        assert_eq!(bitmap(&dev), bm);
    }

    #[test]
    fn apply_al_of_a_secondary_only_cleans() {
        let dir = TempDir::new("secondary");
        let s = store(&dir, "d", 256 << 20);
        let mut dev = MetaDevice::create(s, MetaLocation::Internal, &default_opts()).unwrap();
        let la = dev.layout().max_data_sectors;
        crashed(&mut dev, la, false);
        put_tr(&dev, &tr(1, &[(0, 3)]));
        let r = dev.apply_al_blocking().unwrap();
        assert_eq!((r.updates, r.hot_extents.as_slice()), (1, &[3u32][..]));
        assert_eq!(r.bits_newly_set, 0);
        assert!(r.reinitialized);
        assert_eq!(dev.count_bits_blocking().unwrap(), 0);
        assert_eq!(dev.superblock().flags, mdf::CONSISTENT | mdf::AL_CLEAN);
    }

    #[test]
    fn apply_al_skips_extents_beyond_the_agreed_size() {
        let dir = TempDir::new("beyond");
        let s = store(&dir, "d", 1 << 30);
        let mut dev = MetaDevice::create(s, MetaLocation::Internal, &default_opts()).unwrap();
        // 100 MiB agreed: extents 0..=24 hold data, the bitmap in use is 4 KiB (extents
        // 0..=31); 25 and 31 lie in its padding and are set (as drbdmeta does), 32 and
        // 4000 start beyond it and are skipped.
        crashed(&mut dev, 100 << 11, true);
        assert_eq!(dev.bitmap_bytes(), 4096);
        put_tr(
            &dev,
            &tr(7, &[(0, 24), (1, 25), (2, 31), (3, 32), (4, 4000)]),
        );
        let r = dev.apply_al_blocking().unwrap();
        assert_eq!(r.skipped_extents, vec![32, 4000]);
        assert_eq!(r.applied_extents, 3);
        assert_eq!(r.bits_newly_set, 3 * 1024);
        let bm = bitmap(&dev);
        for e in [24, 25, 31] {
            assert_eq!(extent_bits(&bm, e), 1024);
        }
        assert_eq!(bm.iter().map(|b| b.count_ones()).sum::<u32>(), 3 * 1024);
    }

    #[test]
    fn apply_al_refuses_an_unusable_log_of_a_primary() {
        let dir = TempDir::new("unusable");
        let s = store(&dir, "d", 256 << 20);
        let mut dev = MetaDevice::create(s, MetaLocation::Internal, &default_opts()).unwrap();
        let la = dev.layout().max_data_sectors;
        crashed(&mut dev, la, true);
        // Zero the whole ring: not one valid block.
        let zero = AlignedBuf::new(32768).unwrap();
        let at = dev.layout().al_offset;
        dev.store().write_blocking(at, &zero, false).unwrap();
        let e = dev.apply_al_blocking().unwrap_err();
        assert!(matches!(e, MetaError::AlUnusable { .. }), "{e}");
        assert!(e.to_string().contains("create-md --force"), "{e}");
        let still = MetaDevice::open(dev.store().clone(), MetaLocation::Internal).unwrap();
        assert!(!still.superblock().is_clean(), "left unclean");
        // Not Primary: the error is ignored, the ring re-initialised, the metadata clean.
        crashed(&mut dev, la, false);
        let r = dev.apply_al_blocking().unwrap();
        assert!(r.ignored_error.is_some() && r.reinitialized);
        assert!(dev.superblock().is_clean());
        let ring = dev.read_al_blocking().unwrap();
        assert_eq!(al::replay(&ring, &dev.layout().al).unwrap().valid, 8);
    }

    #[test]
    fn a_failure_record_with_full_sync_marks_every_block_at_the_next_attach() {
        let dir = TempDir::new("fullsync");
        let s = store(&dir, "d", 64 << 20);
        let mut dev =
            MetaDevice::create(s.clone(), MetaLocation::Internal, &default_opts()).unwrap();
        dev.set_consistent_blocking(true).unwrap();
        // 1001 sectors: 126 blocks, the last one partial.
        let a = dev.attach_blocking(1001, AL_EXTENTS_DEFAULT).unwrap();
        assert!(!a.full_sync && a.bitmap.iter().all(|b| *b == 0));
        dev.change_blocking(&[SbChange::Failure { full_sync: true }])
            .unwrap();
        assert!(dev.full_sync_pending() && !dev.is_consistent());
        let mut dev = MetaDevice::open(s.clone(), MetaLocation::Internal).unwrap();
        assert!(dev.full_sync_pending() && !dev.is_consistent());
        let a = dev.attach_blocking(1001, AL_EXTENTS_DEFAULT).unwrap();
        assert!(a.full_sync);
        assert!(
            !dev.full_sync_pending(),
            "the flag is cleared once the bits are set"
        );
        assert_eq!(dev.count_bits_blocking().unwrap(), 126);
        let oos = crate::request::OutOfSync::from_disk(1001, &a.bitmap);
        assert_eq!(oos.count(), 126);
        // The next attach finds the bits, not the flag; still Inconsistent.
        let mut dev = MetaDevice::open(s, MetaLocation::Internal).unwrap();
        let a = dev.attach_blocking(1001, AL_EXTENTS_DEFAULT).unwrap();
        assert!(!a.full_sync && !dev.is_consistent());
        assert_eq!(
            crate::request::OutOfSync::from_disk(1001, &a.bitmap).count(),
            126
        );
        // Without full_sync the record only clears MDF_CONSISTENT.
        dev.set_consistent_blocking(true).unwrap();
        dev.change_blocking(&[SbChange::Failure { full_sync: false }])
            .unwrap();
        assert!(!dev.full_sync_pending() && !dev.is_consistent());
    }
}
