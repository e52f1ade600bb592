//! Where DRBD 9 metadata lives on a device: DRBD's placement formulas, pure arithmetic.
//!
//! Two kinds, the two DRBD 9 supports besides the legacy fixed 128 MiB index:
//!
//! ```text
//! internal (flex-internal, index -1/-3), at the end of the data device:
//!   [ data ........ ][ bitmap ][ activity log ][ superblock 4 KiB ]
//!                    ^ md_offset + bm_offset    ^ md_offset + al_offset   ^ md_offset
//!   md_offset  = (capacity & ~4 KiB) - 4 KiB          (the last aligned 4 KiB block)
//!   al_offset  = -al_size_sect                        (sectors, relative to md_offset)
//!   bm_offset  = -md_size_sect + 8
//!   md_size_sect = bitmap_bytes(capacity) / 512 + 8 + al_size_sect
//!
//! flex-external, a separate metadata device, used whole:
//!   [ superblock 4 KiB ][ activity log ][ bitmap ........ ]
//!   md_offset = 0, al_offset = 8, bm_offset = 8 + al_size_sect, md_size_sect = capacity
//! ```
//!
//! (kernel `drbd_md_set_sector_offsets`, `drbd_capacity_to_on_disk_bm_sect`; drbdmeta
//! `re_initialize_md_offsets`, `bm_bytes`, `v07_style_md_get_byte_offset`.)
//!
//! Bounds: one bitmap bit covers 4 KiB, one bitmap byte 32 KiB, so a 1 TiB device has a
//! 32 MiB bitmap (`md_size_sect` 65608 with the default 32 KiB activity log) and the
//! largest device DRBD supports, 1 PiB ([`MAX_DATA_SECTORS`]), a 32 GiB one. Internal
//! metadata sizes its bitmap for the *whole* device, so the device itself must be at most
//! 1 PiB; a flex-external metadata device must be at least 1 MiB (the kernel's minimum for
//! attaching) and at most 2 TiB, because `md_size_sect` is a 32-bit sector count. Only one
//! bitmap slot (DRBD's `max-peers` 1) is laid out: tandem replicates to one peer.

use super::al::AlGeometry;

/// Bytes per sector, the unit of every on-disk offset in the superblock.
pub const SECTOR: u64 = 512;
/// The superblock, an AL transaction and a bitmap page are all one 4 KiB block.
pub const BLOCK: u64 = 4096;
/// Sectors per 4 KiB block (`MD_4kB_SECT`).
pub(crate) const BLOCK_SECT: u64 = BLOCK / SECTOR;
/// Bytes of data per bitmap bit (`BM_BLOCK_SIZE`); the only value DRBD 9.x accepts.
pub(crate) const BYTES_PER_BIT: u32 = 4096;
/// Sectors of data per bitmap bit.
pub const SECT_PER_BIT: u64 = BYTES_PER_BIT as u64 / SECTOR;
/// Bytes of data per bitmap byte (32 KiB).
pub const BYTES_PER_BM_BYTE: u64 = BYTES_PER_BIT as u64 * 8;
/// A bitmap page: the unit of bitmap IO (DRBD writes the bitmap in 4 KiB pages).
pub(crate) const BM_PAGE: u64 = BLOCK;
/// Largest data area DRBD supports with flexible metadata: 1 PiB (2^38 bits of 4 KiB;
/// the kernel's `DRBD_MAX_SECTORS_FLEX` comment, drbdmeta's `MD_BM_MAX_BYTE_FLEX`).
pub(crate) const MAX_DATA_SECTORS: u64 = 1 << 41;
/// Smallest metadata device the kernel attaches (`min_md_device_sectors`, 1 MiB).
pub const MIN_META_BYTES: u64 = 1 << 20;
/// Largest flex-external metadata device: `md_size_sect` is a u32 sector count.
pub(crate) const MAX_EXTERNAL_META_BYTES: u64 = (u32::MAX as u64) * SECTOR;

/// Where the metadata is, relative to the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKind {
    /// At the end of the data device (`meta-disk internal`, DRBD's flex-internal).
    Internal,
    /// On a separate device or file of its own (`meta-disk M flex-external`... in
    /// drbd.conf: `meta-disk /dev/M;` with `flexible-meta-disk`).
    FlexExternal,
}

impl MetaKind {
    /// DRBD's meta-disk index: -3 (`DRBD_MD_INDEX_FLEX_INT`) or -2 (`…_FLEX_EXT`).
    pub fn drbd_index(self) -> i32 {
        match self {
            MetaKind::Internal => -3,
            MetaKind::FlexExternal => -2,
        }
    }

    /// The word drbdmeta takes for it: `internal` or `flex-external`.
    pub fn drbdmeta_name(self) -> &'static str {
        match self {
            MetaKind::Internal => "internal",
            MetaKind::FlexExternal => "flex-external",
        }
    }
}

/// Why a layout cannot be computed for a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The device cannot hold the metadata (and, for internal metadata, some data).
    #[error("too small: {0}")]
    TooSmall(String),
    /// The device is beyond what DRBD's metadata can describe.
    #[error("too large: {0}")]
    TooLarge(String),
}

/// Bits in the bitmap of a data area of `sectors` sectors: one per started 4 KiB.
pub(crate) fn bitmap_bits(sectors: u64) -> u64 {
    sectors.div_ceil(SECT_PER_BIT)
}

/// Bytes of bitmap for `sectors` sectors, as DRBD sizes it on disk for one peer slot:
/// bits rounded up to 64 (32/64-bit interoperability), then bytes rounded up to 4 KiB
/// (drbdmeta `bm_bytes`, kernel `drbd_capacity_to_on_disk_bm_sect`). `None` beyond
/// [`MAX_DATA_SECTORS`] (drbdmeta asserts there).
pub fn bitmap_bytes(sectors: u64) -> Option<u64> {
    if sectors > MAX_DATA_SECTORS {
        return None;
    }
    // ≤ 2^41 sectors: every step below stays far from u64 overflow.
    let bits = bitmap_bits(sectors).next_multiple_of(64);
    Some((bits / 8).next_multiple_of(BLOCK))
}

/// The computed position of every metadata part on the metadata device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Internal or flex-external.
    pub kind: MetaKind,
    /// Size of the device that holds the metadata, bytes.
    pub meta_bytes: u64,
    /// Byte offset of the superblock on the metadata device.
    pub md_offset: u64,
    /// Byte offset of activity-log block 0.
    pub al_offset: u64,
    /// Byte offset of the first bitmap byte.
    pub bm_offset: u64,
    /// `md_size_sect` as stored in the superblock.
    pub md_size_sect: u32,
    /// `al_offset` as stored in the superblock: sectors relative to the superblock.
    pub al_offset_sect: i32,
    /// `bm_offset` as stored in the superblock: sectors relative to the superblock.
    pub bm_offset_sect: i32,
    /// The activity-log ring's geometry.
    pub al: AlGeometry,
    /// Bytes reserved for the bitmap on disk (a multiple of 4 KiB for internal metadata).
    pub bm_area_bytes: u64,
    /// Most data sectors this metadata can describe on this device (the exported size is
    /// further limited by the last agreed size and the peer).
    pub max_data_sectors: u64,
}

impl Layout {
    /// Internal metadata at the end of a device of `device_bytes` bytes (a multiple of
    /// 512).
    pub fn internal(device_bytes: u64, al: AlGeometry) -> Result<Layout, LayoutError> {
        let cap_sect = device_bytes / SECTOR;
        let bm_bytes = bitmap_bytes(cap_sect).ok_or_else(|| {
            LayoutError::TooLarge(format!(
                "{device_bytes} bytes is more than DRBD's 1 PiB ({} bytes) limit for a \
                 device with internal metadata",
                MAX_DATA_SECTORS * SECTOR
            ))
        })?;
        let al_sect = al.bytes() / SECTOR;
        // ≤ 32 GiB of bitmap + 16 GiB of AL: fits u64 trivially; u32 checked below.
        let md_size = bm_bytes / SECTOR + BLOCK_SECT + al_sect;
        let md_size_sect = u32::try_from(md_size).map_err(|_| {
            LayoutError::TooLarge(format!("metadata of {md_size} sectors exceeds 2^32"))
        })?;
        let md_offset_sect = (cap_sect & !(BLOCK_SECT - 1)).checked_sub(BLOCK_SECT);
        let first = md_offset_sect.and_then(|o| (o + BLOCK_SECT).checked_sub(md_size));
        let (Some(md_offset_sect), Some(first)) = (md_offset_sect, first) else {
            return Err(LayoutError::TooSmall(format!(
                "{device_bytes} bytes cannot hold {} bytes of internal metadata",
                md_size * SECTOR
            )));
        };
        if first == 0 || device_bytes < MIN_META_BYTES {
            return Err(LayoutError::TooSmall(format!(
                "{device_bytes} bytes leaves {} bytes for data after {} bytes of internal \
                 metadata (the device must be at least {MIN_META_BYTES} bytes and hold data)",
                first * SECTOR,
                md_size * SECTOR
            )));
        }
        let al_offset_sect = i32::try_from(al_sect)
            .map(|s| -s)
            .map_err(|_| LayoutError::TooLarge(format!("AL of {al_sect} sectors")))?;
        let bm_offset_sect = i32::try_from(md_size - BLOCK_SECT)
            .map(|s| -s)
            .map_err(|_| LayoutError::TooLarge(format!("metadata of {md_size} sectors")))?;
        let md_offset = md_offset_sect * SECTOR;
        Ok(Layout {
            kind: MetaKind::Internal,
            meta_bytes: device_bytes,
            md_offset,
            al_offset: md_offset - al_sect * SECTOR,
            bm_offset: first * SECTOR,
            md_size_sect,
            al_offset_sect,
            bm_offset_sect,
            al,
            bm_area_bytes: bm_bytes,
            max_data_sectors: first.min(MAX_DATA_SECTORS),
        })
    }

    /// Flex-external metadata filling a device of `meta_bytes` bytes, for a data device
    /// of `data_bytes` bytes.
    pub fn flex_external(
        meta_bytes: u64,
        data_bytes: u64,
        al: AlGeometry,
    ) -> Result<Layout, LayoutError> {
        if meta_bytes > MAX_EXTERNAL_META_BYTES {
            return Err(LayoutError::TooLarge(format!(
                "{meta_bytes} bytes is more than the {MAX_EXTERNAL_META_BYTES} bytes a \
                 flex-external metadata device can have (md_size_sect is 32 bits; 1 PiB of \
                 data needs only 32 GiB of bitmap)"
            )));
        }
        // ≤ 2^32 sectors: no overflow below.
        let md_size = meta_bytes / SECTOR;
        let al_sect = al.bytes() / SECTOR;
        let bm_start = BLOCK_SECT + al_sect;
        // At least one bitmap page after superblock and AL, and the kernel's 1 MiB.
        if meta_bytes < MIN_META_BYTES || md_size < bm_start + BLOCK_SECT {
            return Err(LayoutError::TooSmall(format!(
                "{meta_bytes} bytes cannot hold a 4 KiB superblock, a {} byte activity log \
                 and a bitmap (a metadata device must be at least {MIN_META_BYTES} bytes)",
                al.bytes()
            )));
        }
        let md_size_sect = u32::try_from(md_size)
            .map_err(|_| LayoutError::TooLarge(format!("{md_size} sectors")))?;
        let al_offset_sect = 8;
        let bm_offset_sect = i32::try_from(bm_start)
            .map_err(|_| LayoutError::TooLarge(format!("AL of {al_sect} sectors")))?;
        let bm_area_bytes = (md_size - bm_start) * SECTOR;
        // drbdmeta `max_usable_sectors` / kernel `BM_EXT_TO_SECT`: whole 64-bit words of
        // bitmap, 8 sectors per bit.
        let covered = (bm_area_bytes * 8 / 64 * 64) * SECT_PER_BIT;
        Ok(Layout {
            kind: MetaKind::FlexExternal,
            meta_bytes,
            md_offset: 0,
            al_offset: BLOCK,
            bm_offset: bm_start * SECTOR,
            md_size_sect,
            al_offset_sect,
            bm_offset_sect,
            al,
            bm_area_bytes,
            max_data_sectors: covered.min(data_bytes / SECTOR).min(MAX_DATA_SECTORS),
        })
    }

    /// Byte offset of the superblock on the metadata device.
    pub fn superblock_offset(&self) -> u64 {
        self.md_offset
    }

    /// Byte offset of on-disk activity-log block `block` (as given by
    /// [`super::al::al_block_of`]); `None` outside the ring.
    pub fn al_block_offset(&self, block: u32) -> Option<u64> {
        (block < self.al.blocks()).then(|| self.al_offset + u64::from(block) * BLOCK)
    }

    /// Byte offset of bitmap page `page` (4 KiB pages from the bitmap's start); `None`
    /// beyond the reserved bitmap area.
    pub fn bm_page_offset(&self, page: u64) -> Option<u64> {
        let start = page.checked_mul(BM_PAGE)?;
        (start.checked_add(BM_PAGE)? <= self.bm_area_bytes).then(|| self.bm_offset + start)
    }

    /// Bytes of on-disk bitmap that describe `data_sectors` sectors (whole 4 KiB pages),
    /// or `None` if the bitmap area cannot cover them.
    pub fn bitmap_bytes_for(&self, data_sectors: u64) -> Option<u64> {
        bitmap_bytes(data_sectors).filter(|b| *b <= self.bm_area_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn al(stripes: u32, size_4k: u32) -> AlGeometry {
        AlGeometry::new(stripes, size_4k).expect("valid geometry")
    }

    #[test]
    fn one_tebibyte_matches_the_research_example() {
        let l = Layout::internal(1 << 40, al(1, 8)).expect("fits");
        assert_eq!(l.md_size_sect, 65608);
        assert_eq!(l.bm_area_bytes, 32 << 20);
        assert_eq!(l.max_data_sectors, (1 << 31) - 65608);
        assert_eq!(l.al_offset_sect, -64);
        assert_eq!(l.bm_offset_sect, -65600);
        assert_eq!(l.md_offset, (1 << 40) - 4096);
        assert_eq!(l.al_offset, (1 << 40) - 4096 - 32768);
        assert_eq!(l.bm_offset, (1 << 40) - 65608 * 512);
    }

    /// The `# md_offset`, `# al_offset`, `# bm_offset` and `# md_size_sect` lines of
    /// `drbdmeta --force 0 v09 /dev/loopN internal dump-md` (drbd-utils 9.22) after
    /// `create-md 1` on loop devices over sparse files of these sizes.
    #[test]
    fn internal_matches_drbdmeta_dump_md() {
        // (device bytes, stripes, stripe 4k, md_size_sect, md_offset, al_offset, bm_offset)
        let cases: [(u64, u32, u32, u32, u64, u64, u64); 5] = [
            (1 << 30, 1, 8, 136, 1073737728, 1073704960, 1073672192),
            (
                (1 << 30) + 12345 * 512,
                1,
                8,
                144,
                1080057856,
                1080025088,
                1079988224,
            ),
            (1 << 30, 4, 16, 584, 1073737728, 1073475584, 1073442816),
            (100 << 20, 1, 8, 80, 104853504, 104820736, 104816640),
            (
                (3 << 40) + (5 << 20),
                1,
                8,
                196688,
                3298540122112,
                3298540089344,
                3298439421952,
            ),
        ];
        for (bytes, s, z, md_size, md_off, al_off, bm_off) in cases {
            let l = Layout::internal(bytes, al(s, z)).expect("fits");
            assert_eq!(
                (l.md_size_sect, l.md_offset, l.al_offset, l.bm_offset),
                (md_size, md_off, al_off, bm_off),
                "{bytes} bytes, {s}x{z}"
            );
            assert_eq!(l.max_data_sectors, bm_off / 512);
        }
    }

    #[test]
    fn flex_external_matches_drbdmeta_dump_md() {
        // 128 MiB meta device, default AL: drbdmeta prints md_offset 0, al_offset 4096,
        // bm_offset 36864, md_size_sect 262144.
        let l = Layout::flex_external(128 << 20, 1 << 45, al(1, 8)).expect("fits");
        assert_eq!((l.md_offset, l.al_offset, l.bm_offset), (0, 4096, 36864));
        assert_eq!(l.md_size_sect, 262144);
        assert_eq!((l.al_offset_sect, l.bm_offset_sect), (8, 72));
        assert_eq!(l.bm_area_bytes, (128 << 20) - 36864);
        // Every bitmap byte covers 32 KiB = 64 sectors: (128 MiB - 36 KiB) * 64 sectors,
        // about 4 TiB, less than the 32 TiB data device.
        let covered = ((128u64 << 20) - 36864) / 8 * 8 * 64;
        assert_eq!(l.max_data_sectors, covered);
        // A small data device limits the data area instead.
        let small = Layout::flex_external(128 << 20, 10 << 20, al(1, 8)).expect("fits");
        assert_eq!(small.max_data_sectors, (10 << 20) / 512);
        // Striped AL: 2 x 32 KiB.
        let st = Layout::flex_external(4 << 20, 1 << 30, al(2, 8)).expect("fits");
        assert_eq!(
            (st.al_offset, st.bm_offset, st.bm_offset_sect),
            (4096, 69632, 136)
        );
    }

    #[test]
    fn bitmap_bytes_rounds_like_drbd() {
        assert_eq!(bitmap_bytes(0), Some(0));
        assert_eq!(bitmap_bytes(1), Some(4096));
        // One page of 32768 bits covers 128 MiB = 262144 sectors.
        assert_eq!(bitmap_bytes(262144), Some(4096));
        assert_eq!(bitmap_bytes(262144 + 1), Some(8192));
        assert_eq!(bitmap_bytes(MAX_DATA_SECTORS), Some(32 << 30));
        assert_eq!(bitmap_bytes(MAX_DATA_SECTORS + 1), None);
        assert_eq!(bitmap_bits(9), 2);
    }

    #[test]
    fn limits_are_refused_with_a_reason() {
        let a = al(1, 8);
        // 1 PiB exactly is fine; one sector more is not.
        let pib = MAX_DATA_SECTORS * SECTOR;
        let l = Layout::internal(pib, a).expect("1 PiB fits");
        assert_eq!(l.bm_area_bytes, 32 << 30);
        assert!(matches!(
            Layout::internal(pib + 512, a),
            Err(LayoutError::TooLarge(_))
        ));
        assert!(matches!(
            Layout::internal(512 * 1024, a),
            Err(LayoutError::TooSmall(_))
        ));
        assert!(matches!(
            Layout::internal(0, a),
            Err(LayoutError::TooSmall(_))
        ));
        assert!(matches!(
            Layout::flex_external(MAX_EXTERNAL_META_BYTES + 512, 1 << 40, a),
            Err(LayoutError::TooLarge(_))
        ));
        assert!(matches!(
            Layout::flex_external(64 << 10, 1 << 40, a),
            Err(LayoutError::TooSmall(_))
        ));
        // A 32 MiB AL does not fit a 1 MiB metadata device.
        assert!(matches!(
            Layout::flex_external(1 << 20, 1 << 40, al(1, 8192)),
            Err(LayoutError::TooSmall(_))
        ));
    }

    #[test]
    fn page_and_block_offsets_stay_inside() {
        let l = Layout::internal(1 << 30, al(2, 8)).expect("fits");
        assert_eq!(l.al_block_offset(0), Some(l.al_offset));
        assert_eq!(l.al_block_offset(15), Some(l.al_offset + 15 * 4096));
        assert_eq!(l.al_block_offset(16), None);
        assert_eq!(l.bm_page_offset(0), Some(l.bm_offset));
        assert_eq!(l.bm_page_offset(7), Some(l.bm_offset + 7 * 4096));
        assert_eq!(l.bm_page_offset(8), None); // 32 KiB of bitmap for 1 GiB
        assert_eq!(l.bm_page_offset(u64::MAX), None);
        // The bitmap ends where the AL begins, the AL where the superblock begins.
        assert_eq!(l.bm_offset + l.bm_area_bytes, l.al_offset);
        assert_eq!(l.al_offset + l.al.bytes(), l.md_offset);
        assert_eq!(l.bitmap_bytes_for(l.max_data_sectors), Some(32768));
        assert_eq!(l.bitmap_bytes_for(1 << 40), None);
    }
}
