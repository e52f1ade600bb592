//! The Primary's metadata device: an activity-log ring and one bitmap area in memory,
//! written only by whole 4 KiB blocks, durable at completion (FUA), and what the daemon
//! does with it when it attaches after a crash.
//!
//! Layout (both orders are drawn, so a mixed-up offset shows): the ring of
//! `geo.blocks()` blocks (8 or 15 here) and the bitmap pages (one page covers 128 MiB, so the
//! simulator's 1 MiB volume needs one), back to back from byte 0. `create` is create-md:
//! an initialised ring and a zero bitmap.
//!
//! A block write that is interrupted (crash) or fails (EIO) leaves each of its eight
//! 512-byte sectors old or new (a torn write; `mask` says which are new). Sectors that
//! read back with an error are not modelled: a real bitmap area that cannot be read
//! means a full resync, which needs no simulation.

use crate::meta::al::{initialized_ring, replay, AlGeometry};
use crate::request::{OutOfSync, BLOCK_SIZE, PAGE_BYTES, SECTOR};

/// Where the ring and the bitmap are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MetaLayout {
    pub(crate) geo: AlGeometry,
    pub(crate) ring_offset: u64,
    pub(crate) bitmap_offset: u64,
    /// Bitmap pages.
    pub(crate) pages: u64,
}

impl MetaLayout {
    /// The ring first or the bitmap first.
    pub(crate) fn new(geo: AlGeometry, pages: u64, bitmap_first: bool) -> Self {
        let bitmap_bytes = pages * PAGE_BYTES as u64;
        let (ring_offset, bitmap_offset) = if bitmap_first {
            (bitmap_bytes, 0)
        } else {
            (0, geo.bytes())
        };
        MetaLayout {
            geo,
            ring_offset,
            bitmap_offset,
            pages,
        }
    }

    fn bytes(&self) -> u64 {
        self.geo.bytes() + self.pages * PAGE_BYTES as u64
    }
}

/// What an attach after a crash found.
#[derive(Debug, Clone)]
pub(crate) struct Attach {
    /// The bitmap to load: the on-disk bitmap plus every hot extent's blocks.
    pub(crate) bitmap: OutOfSync,
    /// The bitmap as it was on disk, before the hot extents were applied.
    pub(crate) on_disk: OutOfSync,
    /// Hot extents of the replayed ring.
    pub(crate) hot: Vec<u32>,
    /// Bits the hot extents added.
    pub(crate) added: u64,
}

/// The device.
#[derive(Debug, Clone)]
pub(crate) struct MetaDev {
    pub(crate) layout: MetaLayout,
    bytes: Vec<u8>,
}

impl MetaDev {
    /// create-md.
    pub(crate) fn create(layout: MetaLayout) -> Result<Self, String> {
        let len = usize::try_from(layout.bytes()).map_err(|e| e.to_string())?;
        let mut d = MetaDev {
            layout,
            bytes: vec![0; len],
        };
        d.init_ring()?;
        Ok(d)
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, String> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.bytes.len() as u64)
            .ok_or_else(|| format!("metadata write at byte {offset} is past the device"))?;
        if !offset.is_multiple_of(BLOCK_SIZE) {
            return Err(format!(
                "metadata write at byte {offset} is not 4 KiB aligned"
            ));
        }
        Ok(usize::try_from(offset).map_err(|e| e.to_string())?
            ..usize::try_from(end).map_err(|e| e.to_string())?)
    }

    /// Checks that a write names a block of the ring or the bitmap.
    pub(crate) fn check(&self, offset: u64) -> Result<(), String> {
        self.range(offset, BLOCK_SIZE).map(|_| ())
    }

    /// Writes the sectors of `data` whose bit is set in `mask` (0xff: the whole block).
    pub(crate) fn write(&mut self, offset: u64, data: &[u8; 4096], mask: u8) -> Result<(), String> {
        let r = self.range(offset, BLOCK_SIZE)?;
        let dst = &mut self.bytes[r];
        let sector = SECTOR as usize;
        for (i, (d, s)) in dst
            .chunks_exact_mut(sector)
            .zip(data.chunks_exact(sector))
            .enumerate()
        {
            if mask & (1 << i) != 0 {
                d.copy_from_slice(s);
            }
        }
        Ok(())
    }

    /// The bitmap on the device, as an attach would read it before applying the
    /// activity log.
    pub(crate) fn bitmap(&self, sectors: u64) -> Result<OutOfSync, String> {
        let l = self.layout;
        let area = self.range(l.bitmap_offset, l.pages * PAGE_BYTES as u64)?;
        Ok(OutOfSync::from_disk(sectors, &self.bytes[area]))
    }

    /// A clean stop's last step (the daemon's `mark_clean`): the ring re-initialised, so
    /// that the next attach applies no activity log.
    pub(crate) fn mark_clean(&mut self) -> Result<(), String> {
        self.init_ring()
    }

    fn init_ring(&mut self) -> Result<(), String> {
        let l = self.layout;
        let r = self.range(l.ring_offset, l.geo.bytes())?;
        self.bytes[r].copy_from_slice(&initialized_ring(&l.geo));
        Ok(())
    }

    /// What the daemon does at attach after a crash of a Primary (drbdmeta's `apply-al`):
    /// replay the ring, set the hot extents' blocks (extents of `2^extent_shift` bytes)
    /// in the on-disk bitmap, write that bitmap back, then re-initialise the ring so the
    /// next Primary starts at transaction 0. The write-back and the re-initialisation
    /// are modelled as atomic (no crash in between).
    pub(crate) fn attach(&mut self, sectors: u64, extent_shift: u32) -> Result<Attach, String> {
        let l = self.layout;
        let ring = self.range(l.ring_offset, l.geo.bytes())?;
        let replayed = replay(&self.bytes[ring], &l.geo)
            .map_err(|e| format!("activity log replay after the crash: {e}"))?;
        let area = self.range(l.bitmap_offset, l.pages * PAGE_BYTES as u64)?;
        let on_disk = OutOfSync::from_disk(sectors, &self.bytes[area]);
        let mut bitmap = on_disk.clone();
        let per = 1u64 << (extent_shift - 12);
        for &e in &replayed.hot {
            bitmap.mark_blocks(u64::from(e) * per, per);
        }
        let added = bitmap.count() - on_disk.count();
        for p in 0..bitmap.pages() {
            let off = l.bitmap_offset + u64::from(p) * PAGE_BYTES as u64;
            self.write(off, &bitmap.page_bytes(p), 0xff)?;
        }
        self.init_ring()?;
        Ok(Attach {
            bitmap,
            on_disk,
            hot: replayed.hot,
            added,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn attach_applies_hot_extents_and_torn_writes_mix_sectors() {
        use crate::meta::al::{encode_transaction, AlTransaction, LC_FREE};
        let layout = MetaLayout::new(AlGeometry::default_ring(), 1, true);
        assert_eq!((layout.bitmap_offset, layout.ring_offset), (0, 4096));
        let mut d = MetaDev::create(layout).unwrap();
        let sectors = 262_144; // 128 MiB: one full bitmap page
        let a = d.attach(sectors, 13).unwrap();
        assert_eq!((a.hot.len(), a.added, a.bitmap.count()), (0, 0, 0));
        // A torn bitmap page: only sector 0 of it is new.
        let mut page = [0u8; 4096];
        page[0] = 0b11; // blocks 0 and 1
        page[600] = 0x80; // block 4807, in sector 1
        d.write(0, &page, 0b01).unwrap();
        // Transaction 0 in ring block 0: extent 5 (8 KiB extents: blocks 10, 11).
        let mut context = vec![LC_FREE; 67];
        context[1] = 1; // blocks 2, 3
        let tr = AlTransaction {
            tr_number: 0,
            updates: vec![(0, 5)],
            context_start: 0,
            context_size: 67,
            context,
        };
        d.write(4096, &encode_transaction(&tr), 0xff).unwrap();
        let a = d.attach(sectors, 13).unwrap();
        assert_eq!(a.on_disk.count(), 2);
        assert_eq!(a.hot, vec![1, 5]);
        assert_eq!(a.added, 4);
        assert!([0, 1, 2, 3, 10, 11].iter().all(|&b| a.bitmap.is_set(b)));
        // Written back, and the ring is initialised again.
        let b = d.attach(sectors, 13).unwrap();
        assert_eq!((b.on_disk.count(), b.hot.len()), (6, 0));
        assert!(d.write(4096 * 9, &page, 0xff).is_err());
        assert!(d.write(100, &page, 0xff).is_err());
    }
}
