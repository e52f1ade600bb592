//! The in-memory out-of-sync bitmap: one bit per 4 KiB block of the volume (DRBD's
//! `BM_BLOCK_SIZE`), 64 bits per word, with a running count of set bits.
//!
//! Memory: volume / 4 KiB / 8 bytes = 32 MiB per TiB, allocated once at construction.
//! A write that is not known to be on the peer's disk sets the bits of every block it
//! touches (a partial block counts as the whole block). Nothing here clears bits yet:
//! that is resync's job, later.

use super::SECTOR;

/// Bytes covered by one bitmap bit.
pub const BLOCK_SIZE: u64 = 4096;

const SECTORS_PER_BLOCK: u64 = BLOCK_SIZE / SECTOR as u64;

/// Out-of-sync blocks of one volume.
#[derive(Debug, Clone)]
pub struct OutOfSync {
    words: Vec<u64>,
    blocks: u64,
    set: u64,
}

impl OutOfSync {
    /// An all-clear bitmap for a volume of `sectors` 512-byte sectors.
    pub fn new(sectors: u64) -> Self {
        let blocks = sectors.div_ceil(SECTORS_PER_BLOCK);
        let words = usize::try_from(blocks.div_ceil(64)).unwrap_or(usize::MAX);
        OutOfSync {
            words: vec![0; words],
            blocks,
            set: 0,
        }
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
        let mut b = first;
        while b <= last {
            let Ok(w) = usize::try_from(b / 64) else {
                return;
            };
            let bit = b % 64;
            // Bits bit..=min(63, bit + (last - b)) of this word.
            let n = (64 - bit).min(last - b + 1);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            if let Some(word) = self.words.get_mut(w) {
                let new = mask & !*word;
                self.set += u64::from(new.count_ones());
                *word |= mask;
            }
            b += n;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
