//! The in-memory out-of-sync bitmap: one bit per 4 KiB block of the volume (DRBD's
//! `BM_BLOCK_SIZE`), 64 bits per word, with a running count of set bits.
//!
//! Memory: volume / 4 KiB / 8 bytes = 32 MiB per TiB, allocated once at construction,
//! plus one dirty flag per 4 KiB page of bitmap (a bit per 128 MiB of volume).
//! A write that is not known to be on the peer's disk sets the bits of every block it
//! touches (a partial block counts as the whole block). Bits are cleared by resync
//! ([`OutOfSync::clear`], only whole blocks, DRBD's `drbd_set_in_sync` rounding).
//!
//! On disk the bitmap is the same bits, little-endian, in 4 KiB pages (DRBD's format,
//! docs/drbd-reference.md §6): page `p` holds blocks `p × 32768 ..`. A page whose
//! bits changed since it was last written is *dirty*; only dirty pages are written back
//! (when an activity-log extent is evicted, and at a clean stop).
//!
//! **A bit cleared by a write that may still be in a volatile cache stays set on disk.**
//! A SyncTarget clears a block's bit when the resync write *completed*
//! ([`OutOfSync::clear_unflushed`]), which is before that data is durable. If a page
//! with the bit clear reached the disk first (an activity-log eviction writes pages
//! without a flush before them), a crash would lose the data and keep the bit clear: a
//! stale block the next resync never fetches. So such clears are remembered per page
//! until a flush issued after them completes ([`OutOfSync::begin_flush`] /
//! [`OutOfSync::flush_done`]), and a page's disk image ([`OutOfSync::page_bytes`]) is
//! its bits OR those clears. In memory the bits are clear at once (the walk, the
//! status and the exchange see the truth). Memory: one 4 KiB record per page with such
//! clears (a page covers 128 MiB; a resync between two flushes touches few), and at
//! most [`MAX_FLUSHES`] flushes in flight.

use super::{check_range, SECTOR};

/// Bytes covered by one bitmap bit.
pub const BLOCK_SIZE: u64 = 4096;

const SECTORS_PER_BLOCK: u64 = BLOCK_SIZE / SECTOR as u64;

/// Bytes of one on-disk bitmap page.
pub const PAGE_BYTES: usize = 4096;
/// Blocks (bits) per bitmap page: 128 MiB of volume.
pub const PAGE_BITS: u64 = PAGE_BYTES as u64 * 8;
const WORDS_PER_PAGE: usize = PAGE_BYTES / 8;

/// Flushes that may cover unflushed clears at once; past it a flush covers none (its
/// clears wait for the next one: more resync after a crash, never less).
pub(crate) const MAX_FLUSHES: usize = 64;

/// Cleared bits of some pages, by page.
type PageBits = std::collections::BTreeMap<u32, Box<[u64; WORDS_PER_PAGE]>>;

/// Page `page`'s record in `bits`, made empty if it has none.
fn page_record(bits: &mut PageBits, page: u32) -> &mut [u64; WORDS_PER_PAGE] {
    bits.entry(page)
        .or_insert_with(|| Box::new([0; WORDS_PER_PAGE]))
}

/// Out-of-sync blocks of one volume.
#[derive(Debug, Clone)]
pub struct OutOfSync {
    words: Vec<u64>,
    blocks: u64,
    /// Volume size in sectors (the last block may be partial).
    sectors: u64,
    set: u64,
    /// One bit per page: changed since last written.
    dirty: Vec<u64>,
    /// Bits cleared by writes not yet covered by a flush (see the module docs).
    unflushed: PageBits,
    /// Those a flush in flight covers, by flush id.
    flushing: Vec<(u64, PageBits)>,
    /// The next flush id.
    next_flush: u64,
    /// Deliberate bug: disk images leave the unflushed clears out.
    #[cfg(test)]
    pub(crate) sabotage_image_without_unflushed: bool,
}

impl OutOfSync {
    /// An all-clear bitmap for a volume of `sectors` 512-byte sectors.
    pub fn new(sectors: u64) -> Self {
        let blocks = sectors.div_ceil(SECTORS_PER_BLOCK);
        let words = usize::try_from(blocks.div_ceil(64)).unwrap_or(usize::MAX);
        let pages = words.div_ceil(WORDS_PER_PAGE);
        OutOfSync {
            words: vec![0; words],
            blocks,
            sectors,
            set: 0,
            dirty: vec![0; pages.div_ceil(64)],
            unflushed: PageBits::new(),
            flushing: Vec::new(),
            next_flush: 1,
            #[cfg(test)]
            sabotage_image_without_unflushed: false,
        }
    }

    /// A bitmap for `sectors` loaded from its on-disk pages (`disk`, little-endian; may
    /// be longer than needed, bits past the volume are ignored, missing bytes read as
    /// clear). Nothing is dirty afterwards.
    pub fn from_disk(sectors: u64, disk: &[u8]) -> Self {
        let mut bm = OutOfSync::new(sectors);
        for (i, w) in bm.words.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            if let Some(src) = disk.get(i * 8..i * 8 + 8) {
                b.copy_from_slice(src);
            }
            *w = u64::from_le_bytes(b);
        }
        // Clear bits past the last block.
        let tail = bm.blocks % 64;
        if tail != 0 {
            if let Some(last) = bm.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
        bm.set = bm.words.iter().map(|w| u64::from(w.count_ones())).sum();
        bm
    }

    /// Number of 4 KiB pages the bitmap occupies.
    pub fn pages(&self) -> u32 {
        u32::try_from(self.words.len().div_ceil(WORDS_PER_PAGE)).unwrap_or(u32::MAX)
    }

    /// Page `page` as it goes to disk (little-endian; zero past the end): its bits, and
    /// set again those cleared by writes no completed flush covers yet.
    pub fn page_bytes(&self, page: u32) -> Box<[u8; PAGE_BYTES]> {
        let mut out = Box::new([0u8; PAGE_BYTES]);
        let first = page as usize * WORDS_PER_PAGE;
        let words = self.words.get(first..).unwrap_or(&[]);
        let unflushed = std::iter::once(&self.unflushed)
            .chain(self.flushing.iter().map(|(_, p)| p))
            .filter_map(|p| p.get(&page));
        #[cfg(test)]
        let unflushed = unflushed.filter(|_| !self.sabotage_image_without_unflushed);
        let unflushed: Vec<&[u64; WORDS_PER_PAGE]> = unflushed.map(|b| &**b).collect();
        for (i, (dst, w)) in out.chunks_exact_mut(8).zip(words.iter()).enumerate() {
            let w = unflushed.iter().fold(*w, |w, u| w | u[i]);
            dst.copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Clears the bits of the blocks wholly inside the range, as [`OutOfSync::clear`],
    /// for data a local write just put on this disk (a resync reply): until a flush
    /// issued after this call completes, the disk image keeps them set (module docs).
    pub fn clear_unflushed(&mut self, sector: u64, len: u32) -> u64 {
        match self.whole_blocks(sector, len) {
            Some((first, end_block)) => self.clear_block_range(first, end_block - 1, true),
            None => 0,
        }
    }

    /// A flush of the data device is about to be issued: it will cover every clear made
    /// so far. Returns its id for [`OutOfSync::flush_done`]; `None` past
    /// [`MAX_FLUSHES`] in flight (the clears then wait for a later flush).
    pub fn begin_flush(&mut self) -> Option<u64> {
        if self.flushing.len() >= MAX_FLUSHES {
            return None;
        }
        let id = self.next_flush;
        self.next_flush += 1;
        let pages = std::mem::take(&mut self.unflushed);
        self.flushing.push((id, pages));
        Some(id)
    }

    /// The flush `id` completed (`ok`) or failed. Completed: its clears may reach the
    /// disk, and their pages become dirty so that they do. Failed: they wait for the next
    /// flush. An unknown id is ignored.
    pub fn flush_done(&mut self, id: u64, ok: bool) {
        let Some(i) = self.flushing.iter().position(|(f, _)| *f == id) else {
            return;
        };
        let (_, pages) = self.flushing.remove(i);
        for (page, bits) in pages {
            if ok {
                self.set_dirty(page);
            } else {
                let rec = page_record(&mut self.unflushed, page);
                for (r, b) in rec.iter_mut().zip(bits.iter()) {
                    *r |= b;
                }
            }
        }
    }

    /// Pages whose disk image still keeps clears set (waiting for a flush).
    pub fn unflushed_pages(&self) -> usize {
        let mut pages: Vec<u32> = self.unflushed.keys().copied().collect();
        pages.extend(self.flushing.iter().flat_map(|(_, p)| p.keys().copied()));
        pages.sort_unstable();
        pages.dedup();
        pages.len()
    }

    /// Whether a write-back has anything to do: a dirty page, or a clear that waits for a
    /// flush (whose page becomes dirty when it completes).
    pub fn needs_write_back(&self) -> bool {
        !self.unflushed.is_empty() || self.dirty.iter().any(|&d| d != 0)
    }

    /// Whether page `page` changed since it was last taken.
    pub fn is_dirty(&self, page: u32) -> bool {
        let p = page as usize;
        self.dirty
            .get(p / 64)
            .is_some_and(|d| d & (1 << (p % 64)) != 0)
    }

    /// Clears page `page`'s dirty flag; returns whether it was dirty (the caller then
    /// writes [`OutOfSync::page_bytes`]).
    pub fn take_dirty(&mut self, page: u32) -> bool {
        let p = page as usize;
        match self.dirty.get_mut(p / 64) {
            Some(d) if *d & (1 << (p % 64)) != 0 => {
                *d &= !(1 << (p % 64));
                true
            }
            _ => false,
        }
    }

    /// Marks page `page` dirty again (its write failed).
    pub fn set_dirty(&mut self, page: u32) {
        let p = page as usize;
        if let Some(d) = self.dirty.get_mut(p / 64) {
            *d |= 1 << (p % 64);
        }
    }

    /// Takes every dirty page (ascending), clearing their flags.
    pub fn take_all_dirty(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        for (i, d) in self.dirty.iter_mut().enumerate() {
            let mut bits = std::mem::take(d);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                out.extend(u32::try_from(i * 64 + b).ok());
            }
        }
        out
    }

    /// The blocks set here and clear in `known` (a bitmap the peer holds, word for word;
    /// missing words count as clear), as runs `(first block, count)` of at most
    /// `max_blocks` each, in block order. A SyncSource tells these to its target with
    /// `P_OUT_OF_SYNC` (see `replica::handshake`).
    pub fn runs_not_in(&self, known: &[u64], max_blocks: u64) -> Vec<(u64, u64)> {
        let max_blocks = max_blocks.max(1);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (w, &mine) in self.words.iter().enumerate() {
            let mut new = mine & !known.get(w).copied().unwrap_or(0);
            let Ok(base) = u64::try_from(w) else { break };
            while new != 0 {
                let bit = u64::from(new.trailing_zeros());
                new &= new - 1;
                let block = base * 64 + bit;
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == block && *count < max_blocks => {
                        *count += 1;
                    }
                    _ => runs.push((block, 1)),
                }
            }
        }
        runs
    }

    /// Sets the bits of blocks `[first, first + count)` (whole activity-log extents after
    /// a crash); clipped to the volume.
    pub fn mark_blocks(&mut self, first: u64, count: u64) {
        if count == 0 || first >= self.blocks {
            return;
        }
        let last = first.saturating_add(count - 1).min(self.blocks - 1);
        self.mark_block_range(first, last);
    }

    /// The volume's size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Number of 4 KiB blocks (bits).
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.set
    }

    /// Set bits × 4 KiB (what `drbdsetup status` reports as out-of-sync).
    pub fn bytes(&self) -> u64 {
        self.set * BLOCK_SIZE
    }

    /// The bitmap words (bit `i % 64` of word `i / 64` is block `i`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Whether block `block` is out of sync (false past the end).
    pub fn is_set(&self, block: u64) -> bool {
        let Ok(w) = usize::try_from(block / 64) else {
            return false;
        };
        self.words
            .get(w)
            .is_some_and(|x| x & (1 << (block % 64)) != 0)
    }

    /// The first set block at or after `from`, or `None` (resync's walk over the bitmap).
    /// Skips clear words 64 blocks at a time: a 1 TiB volume (2^28 bits) is at most
    /// 4 Mi word reads.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.blocks {
            return None;
        }
        let first = usize::try_from(from / 64).ok()?;
        // Bits below `from` in its own word do not count.
        let mut word = *self.words.get(first)? & (u64::MAX << (from % 64));
        let mut w = first;
        loop {
            if word != 0 {
                let block = u64::try_from(w).ok()? * 64 + u64::from(word.trailing_zeros());
                return (block < self.blocks).then_some(block);
            }
            w += 1;
            word = *self.words.get(w)?;
        }
    }

    /// Whether any block touched by `[sector, sector + len bytes)` is out of sync.
    pub fn any_in(&self, sector: u64, len: u32) -> bool {
        let Some((first, last)) = self.block_range(sector, len) else {
            return false;
        };
        (first..=last).any(|b| self.is_set(b))
    }

    /// Sets the bits of every block touched by `[sector, sector + len bytes)`; the range is
    /// clipped to the volume.
    pub fn mark(&mut self, sector: u64, len: u32) {
        let Some((first, last)) = self.block_range(sector, len) else {
            return;
        };
        self.mark_block_range(first, last);
    }

    /// A peer's range to mark (`P_OUT_OF_SYNC`), checked first: empty, not whole sectors,
    /// over `DRBD_MAX_BIO_SIZE` or past the volume is refused and marks nothing (DRBD's
    /// `drbd_set_out_of_sync` refuses the same); otherwise as [`Self::mark`].
    pub fn mark_checked(&mut self, sector: u64, len: u32) -> Result<(), &'static str> {
        if len > crate::wire::DRBD_MAX_BIO_SIZE {
            return Err("over 1 MiB");
        }
        check_range(sector, len, self.sectors)
            .ok_or("empty, not whole sectors or past the end of the volume")?;
        self.mark(sector, len);
        Ok(())
    }

    /// Clears the bits of the blocks *wholly* inside `[sector, sector + len bytes)` (DRBD's
    /// `drbd_set_in_sync`: start rounded up, end rounded down to 4 KiB; a range ending at
    /// the last sector of the volume also clears the partial last block). Returns the
    /// number of bits that were set and are now clear.
    pub fn clear(&mut self, sector: u64, len: u32) -> u64 {
        match self.whole_blocks(sector, len) {
            Some((first, end_block)) => self.clear_block_range(first, end_block - 1, false),
            None => 0,
        }
    }

    /// The blocks `[first, end)` wholly inside a range (see [`OutOfSync::clear`]), if any.
    fn whole_blocks(&self, sector: u64, len: u32) -> Option<(u64, u64)> {
        if len == 0 || self.blocks == 0 {
            return None;
        }
        let end = sector.checked_add(u64::from(len / SECTOR))?;
        let first = sector.div_ceil(SECTORS_PER_BLOCK);
        // Blocks that end at or before `end`; the volume's partial last block counts as
        // whole when the range reaches the volume's last sector.
        let end_block = if end >= self.sectors {
            self.blocks
        } else {
            end / SECTORS_PER_BLOCK
        };
        (first < end_block).then_some((first, end_block))
    }

    /// Clears the bits of blocks `[first, first + count)`, clipped to the volume; returns
    /// how many were set.
    pub fn clear_blocks(&mut self, first: u64, count: u64) -> u64 {
        if count == 0 || first >= self.blocks {
            return 0;
        }
        let last = first.saturating_add(count - 1).min(self.blocks - 1);
        self.clear_block_range(first, last, false)
    }

    /// OR-merges `words` (the peer's bitmap after the exchange, DRBD's
    /// `drbd_bm_merge_lel`) into this one; bits past the volume are ignored, missing words
    /// count as clear. Returns how many bits became set; their pages become dirty.
    pub fn merge_words(&mut self, words: &[u64]) -> u64 {
        let tail = self.blocks % 64;
        let last = self.words.len().saturating_sub(1);
        let mut added = 0;
        for (w, (mine, theirs)) in self.words.iter_mut().zip(words).enumerate() {
            let mut theirs = *theirs;
            if w == last && tail != 0 {
                theirs &= (1u64 << tail) - 1;
            }
            let new = theirs & !*mine;
            if new != 0 {
                added += u64::from(new.count_ones());
                *mine |= new;
                let page = w / WORDS_PER_PAGE;
                if let Some(d) = self.dirty.get_mut(page / 64) {
                    *d |= 1 << (page % 64);
                }
            }
        }
        self.set += added;
        added
    }

    /// Sets every bit (a full sync, DRBD's `drbd_bmio_set_n_write`).
    pub fn mark_all(&mut self) {
        self.mark_blocks(0, self.blocks);
    }

    /// Number of set bits among blocks `[first, first + count)`, clipped to the volume.
    pub fn count_blocks(&self, first: u64, count: u64) -> u64 {
        if count == 0 || first >= self.blocks {
            return 0;
        }
        let last = first.saturating_add(count - 1).min(self.blocks - 1);
        word_masks(first, last)
            .filter_map(|(w, mask)| self.words.get(w).map(|word| word & mask))
            .map(|bits| u64::from(bits.count_ones()))
            .sum()
    }

    /// Clears blocks `first..=last`; `unflushed`: the clears wait for a flush before
    /// they reach the disk image (recorded, the page not dirtied), else the page is dirty.
    fn clear_block_range(&mut self, first: u64, last: u64, unflushed: bool) -> u64 {
        let mut cleared = 0;
        for (w, mask) in word_masks(first, last) {
            let Some(word) = self.words.get_mut(w) else {
                continue;
            };
            let gone = mask & *word;
            if gone == 0 {
                continue;
            }
            cleared += u64::from(gone.count_ones());
            *word &= !mask;
            if unflushed {
                let page = u32::try_from(w / WORDS_PER_PAGE).unwrap_or(u32::MAX);
                page_record(&mut self.unflushed, page)[w % WORDS_PER_PAGE] |= gone;
            } else {
                self.set_word_dirty(w);
            }
        }
        self.set -= cleared;
        cleared
    }

    fn mark_block_range(&mut self, first: u64, last: u64) {
        for (w, mask) in word_masks(first, last) {
            if let Some(word) = self.words.get_mut(w) {
                let new = mask & !*word;
                if new != 0 {
                    self.set += u64::from(new.count_ones());
                    *word |= mask;
                    self.set_word_dirty(w);
                }
            }
        }
    }

    /// Marks the page holding word `w` dirty.
    fn set_word_dirty(&mut self, w: usize) {
        let page = w / WORDS_PER_PAGE;
        if let Some(d) = self.dirty.get_mut(page / 64) {
            *d |= 1 << (page % 64);
        }
    }

    /// First and last block touched by a range, clipped to the volume; `None` if empty.
    fn block_range(&self, sector: u64, len: u32) -> Option<(u64, u64)> {
        if len == 0 || self.blocks == 0 {
            return None;
        }
        let end_sector = sector.checked_add(u64::from(len.div_ceil(SECTOR)))?;
        let first = sector / SECTORS_PER_BLOCK;
        let last = ((end_sector - 1) / SECTORS_PER_BLOCK).min(self.blocks - 1);
        (first <= last).then_some((first, last))
    }
}

/// The words overlapping blocks `first..=last`, each with the mask of its bits in the
/// range: `(word index, mask)`. Stops at a word index that does not fit `usize`.
fn word_masks(first: u64, last: u64) -> impl Iterator<Item = (usize, u64)> {
    let mut b = first;
    std::iter::from_fn(move || {
        if b > last {
            return None;
        }
        let w = usize::try_from(b / 64).ok()?;
        let bit = b % 64;
        // Bits bit..=min(63, bit + (last - b)) of this word.
        let n = (64 - bit).min(last - b + 1);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        b += n;
        Some((w, mask))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bit_on_disk(bm: &OutOfSync, block: u64) -> bool {
        let page = bm.page_bytes(u32::try_from(block / PAGE_BITS).expect("page"));
        let b = usize::try_from(block % PAGE_BITS).expect("bit");
        page[b / 8] & (1 << (b % 8)) != 0
    }

    #[test]
    fn an_unflushed_clear_stays_set_on_disk_until_a_later_flush_completes() {
        // 2 pages' worth of blocks.
        let mut bm = OutOfSync::new(2 * PAGE_BITS * 8);
        bm.mark_blocks(0, 4);
        bm.mark_blocks(PAGE_BITS + 7, 1);
        assert!(bm.needs_write_back(), "dirty pages");
        let _ = bm.take_all_dirty();
        assert!(!bm.needs_write_back());
        // Cleared in memory at once, kept set in the disk image.
        assert_eq!(bm.clear_unflushed(0, 8192), 2);
        assert_eq!(bm.clear_unflushed(8 * (PAGE_BITS + 7), 4096), 1);
        assert_eq!(bm.count(), 2);
        assert!(!bm.is_set(0));
        assert!(bit_on_disk(&bm, 0) && bit_on_disk(&bm, 1) && bit_on_disk(&bm, PAGE_BITS + 7));
        assert_eq!(bm.unflushed_pages(), 2);
        assert!(bm.needs_write_back(), "clears waiting for a flush");
        // A flush issued before a clear does not cover it.
        let f1 = bm.begin_flush().expect("flush");
        assert_eq!(bm.clear_unflushed(16, 4096), 1);
        // A failed flush covers nothing.
        bm.flush_done(f1, false);
        assert!(bit_on_disk(&bm, 0));
        let f2 = bm.begin_flush().expect("flush");
        assert!(bit_on_disk(&bm, 0), "in flight is not done");
        bm.flush_done(f2, true);
        for b in [0, 1, 2, PAGE_BITS + 7] {
            assert!(!bit_on_disk(&bm, b), "block {b}");
        }
        assert!(bit_on_disk(&bm, 3));
        // Their pages are dirty so that the clears reach the disk.
        assert_eq!(bm.take_all_dirty(), vec![0, 1]);
        assert_eq!(bm.unflushed_pages(), 0);
        assert!(!bm.needs_write_back());
        bm.flush_done(f2, true); // unknown now: ignored
                                 // An ordinary clear (the peer has the data) is on disk at once.
        bm.clear(24, 4096);
        assert!(!bit_on_disk(&bm, 3));
    }

    #[test]
    fn flushes_in_flight_are_bounded() {
        let mut bm = OutOfSync::new(1 << 20);
        let ids: Vec<u64> = (0..MAX_FLUSHES).filter_map(|_| bm.begin_flush()).collect();
        assert_eq!(ids.len(), MAX_FLUSHES);
        bm.mark_blocks(5, 1);
        bm.clear_unflushed(40, 4096);
        assert_eq!(bm.begin_flush(), None);
        // The clear waits for a flush begun later.
        bm.flush_done(ids[0], true);
        assert!(bit_on_disk(&bm, 5));
        let f = bm.begin_flush().expect("flush");
        bm.flush_done(f, true);
        assert!(!bit_on_disk(&bm, 5));
    }

    #[test]
    fn partial_blocks_mark_whole_blocks_and_count_once() {
        let mut bm = OutOfSync::new(1024); // 512 KiB, 128 blocks
        assert_eq!(bm.blocks(), 128);
        bm.mark(7, 1024); // sectors 7..9: blocks 0 and 1
        assert!(bm.is_set(0) && bm.is_set(1) && !bm.is_set(2));
        assert_eq!(bm.count(), 2);
        bm.mark(8, 512); // block 1 again
        assert_eq!(bm.count(), 2);
        assert_eq!(bm.bytes(), 8192);
        assert!(bm.any_in(15, 512));
        assert!(!bm.any_in(16, 4096));
    }

    #[test]
    fn long_ranges_span_words_and_clip_at_the_end() {
        let mut bm = OutOfSync::new(1024 + 3); // 129 blocks, last one partial
        assert_eq!(bm.blocks(), 129);
        bm.mark(8 * 60, 200 * 4096); // blocks 60..=259, clipped to 128
        assert_eq!(bm.count(), 129 - 60);
        assert!(bm.is_set(128) && !bm.is_set(129) && !bm.is_set(59));
        assert_eq!(bm.words()[1], u64::MAX);
        bm.mark(u64::MAX - 1, 4096); // overflowing range: ignored, no panic
        bm.mark(0, 0);
        assert_eq!(bm.count(), 129 - 60);
    }

    #[test]
    fn pages_track_changes_and_round_trip_through_disk_bytes() {
        // 300 MiB: 76800 blocks, 3 pages (the last partial).
        let sectors = 300 * 2048;
        let mut bm = OutOfSync::new(sectors);
        assert_eq!(bm.pages(), 3);
        assert!(bm.take_all_dirty().is_empty());
        bm.mark(0, 4096); // page 0
        bm.mark((PAGE_BITS * 2 + 5) * 8, 8192); // page 2, blocks +5, +6
        assert!(bm.is_dirty(0) && !bm.is_dirty(1) && bm.is_dirty(2));
        bm.mark(0, 4096); // no change: page 0 stays as it was
        assert!(bm.take_dirty(0));
        assert!(!bm.take_dirty(0));
        bm.mark(0, 4096); // already set: not dirty again
        assert!(!bm.is_dirty(0));
        assert_eq!(bm.take_all_dirty(), vec![2]);
        let p2 = bm.page_bytes(2);
        assert_eq!(p2[0], 0b0110_0000);
        assert_eq!(p2[1..].iter().filter(|&&b| b != 0).count(), 0);
        let mut disk = Vec::new();
        for p in 0..bm.pages() {
            disk.extend_from_slice(&bm.page_bytes(p)[..]);
        }
        disk.extend_from_slice(&[0xff; 4096]); // a longer on-disk bitmap: ignored
        let mut back = OutOfSync::from_disk(sectors, &disk);
        assert_eq!(back.count(), 3);
        assert_eq!(back.words(), bm.words());
        assert!(back.take_all_dirty().is_empty());
        let mut m = OutOfSync::new(sectors);
        m.mark_blocks(76800 - 10, 1024); // clipped at the end
        assert_eq!(m.count(), 10);
        m.mark_blocks(u64::MAX, 5);
    }

    #[test]
    fn clear_takes_only_whole_blocks_and_the_partial_tail() {
        let mut bm = OutOfSync::new(8 * 10 + 3); // 11 blocks, the last one 3 sectors
        bm.mark(0, 11 * 4096);
        assert_eq!(bm.count(), 11);
        assert!(bm.take_all_dirty() == vec![0]);
        assert_eq!(bm.clear(4, 4096), 0); // straddles blocks 0 and 1: neither whole
        assert!(!bm.is_dirty(0));
        assert_eq!(bm.clear(4, 8192), 1); // sectors 4..20 hold block 1 whole
        assert!(!bm.is_set(1) && bm.is_set(0) && bm.is_set(2));
        assert!(bm.is_dirty(0));
        assert_eq!(bm.clear(80, 1536), 1); // the partial last block, to the volume's end
        assert!(!bm.is_set(10));
        assert_eq!(bm.clear_blocks(2, 3), 3);
        assert_eq!(bm.count_blocks(0, 100), 6);
        assert_eq!(bm.count(), 6);
        assert_eq!(bm.clear(u64::MAX - 3, 4096), 0);
        assert_eq!(bm.clear_blocks(u64::MAX, 2), 0);
        assert_eq!(bm.count_blocks(0, 0), 0);
    }

    #[test]
    fn next_set_walks_set_blocks_in_order() {
        let mut bm = OutOfSync::new(8 * 1000); // 1000 blocks, 16 words
        assert_eq!(bm.next_set(0), None);
        for b in [0u64, 63, 64, 130, 999] {
            bm.mark(b * 8, 4096);
        }
        let mut seen = Vec::new();
        let mut at = 0;
        while let Some(b) = bm.next_set(at) {
            seen.push(b);
            at = b + 1;
        }
        assert_eq!(seen, vec![0, 63, 64, 130, 999]);
        assert_eq!(bm.next_set(131), Some(999));
        assert_eq!(bm.next_set(1000), None);
        assert_eq!(bm.next_set(u64::MAX), None);
    }

    #[test]
    fn runs_not_in_a_known_bitmap_cross_words_and_are_capped() {
        let mut bm = OutOfSync::new(1000 * 8);
        bm.mark_blocks(3, 2); // known below
        bm.mark_blocks(60, 10); // crosses words 0 and 1
        bm.mark_blocks(200, 5);
        bm.mark_blocks(999, 1); // the last block
        let mut known = vec![0u64; 2];
        known[0] = 0b11 << 3;
        assert_eq!(
            bm.runs_not_in(&known, 256),
            vec![(60, 10), (200, 5), (999, 1)]
        );
        assert_eq!(
            bm.runs_not_in(&known, 4),
            vec![(60, 4), (64, 4), (68, 2)]
                .into_iter()
                .chain([(200, 4), (204, 1), (999, 1)])
                .collect::<Vec<_>>()
        );
        assert!(bm.runs_not_in(bm.words(), 256).is_empty(), "all known");
    }
}
