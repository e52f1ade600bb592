//! Failed local writes of a SyncSource during one connection.
//!
//! A SyncSource clears a block's bit when the peer acknowledges the resync write of it
//! (`P_RS_WRITE_ACK`). If this node's own write to that block failed meanwhile, the
//! reply the peer wrote may hold data read *before* the failure left garbage here, and
//! the peer does not know of the failure (DRBD would have detached the disk; tandem's
//! Primary core marks the block and goes on). The two copies then differ with the bit
//! clear, so a resync ack never clears a block whose local write failed during the
//! connection; the next handshake resyncs it. The simulator found this (seed 30):
//! without the rule the replicas differ after a quiet end with every bit clear.
//! `sim::tests::clearing_locally_failed_blocks_on_a_resync_ack_is_caught` turns the rule
//! off (in this code, which the simulator and the daemon both run) and is caught.
//!
//! Bounds: [`FailedLocal::MAX`] ranges per connection. Past it the caller renews the
//! connection (the bits stay in the bitmap and the next handshake resyncs them) rather
//! than forget one.

use crate::request::{OutOfSync, BLOCK_SIZE, SECTOR};

/// This connection's failed local writes (see the module docs).
#[derive(Debug, Default, Clone)]
pub(crate) struct FailedLocal {
    ranges: Vec<(u64, u32)>,
    /// Deliberate bug: resync acks clear failed blocks too.
    #[cfg(test)]
    pub(crate) sabotage_ack_clears: bool,
}

impl FailedLocal {
    /// Failed ranges remembered per connection.
    pub(crate) const MAX: usize = 1024;

    /// A local write of `[sector, sector + len bytes)` failed. `false`: the list is full;
    /// renew the connection (the range is not remembered).
    pub(crate) fn record(&mut self, sector: u64, len: u32) -> bool {
        if self.ranges.len() >= Self::MAX {
            return false;
        }
        self.ranges.push((sector, len));
        true
    }

    /// A new connection starts with none.
    pub(crate) fn connection_lost(&mut self) {
        self.ranges.clear();
    }

    /// The blocks set in `oos` that no failed range touches: at the end of a run whose
    /// target is UpToDate there must be none (DRBD asserts `n_oos == rs_failed` in
    /// `drbd_resync_finished`). Free when `oos` is clear; otherwise one pass over its
    /// set bits, each checked against ≤ [`Self::MAX`] ranges.
    pub(crate) fn blocks_outside(&self, oos: &OutOfSync) -> u64 {
        let per_block = BLOCK_SIZE / u64::from(SECTOR);
        let touches = |block: u64, &(s, l): &(u64, u32)| {
            let end = s.saturating_add(u64::from(l / SECTOR));
            s < (block + 1) * per_block && end > block * per_block
        };
        let mut n = 0;
        let mut next = (oos.count() > 0).then(|| oos.next_set(0)).flatten();
        while let Some(block) = next {
            if !self.ranges.iter().any(|r| touches(block, r)) {
                n += 1;
            }
            next = oos.next_set(block + 1);
        }
        n
    }

    /// A resync ack says `[sector, sector + len bytes)` is in sync on the peer: clears
    /// its whole blocks in `oos`, except the failed blocks that were set. Returns how
    /// many bits it cleared.
    pub(crate) fn set_in_sync(&self, oos: &mut OutOfSync, sector: u64, len: u32) -> u64 {
        let sectors = |l: u32| u64::from(l / SECTOR);
        let per_block = BLOCK_SIZE / u64::from(SECTOR);
        let end = sector.saturating_add(sectors(len));
        // The failed blocks inside the ack's range that are set now (re-marking one twice,
        // for overlapping failed ranges, changes nothing).
        let keep: Vec<u64> = self
            .ranges
            .iter()
            .filter_map(|&(s, l)| {
                let (a, e) = (s.max(sector), s.saturating_add(sectors(l)).min(end));
                (a < e).then(|| a / per_block..=(e - 1) / per_block)
            })
            .flatten()
            .filter(|&b| oos.is_set(b))
            .collect();
        #[cfg(test)]
        let keep = if self.sabotage_ack_clears {
            Vec::new()
        } else {
            keep
        };
        let before = oos.count();
        oos.clear(sector, len);
        for b in keep {
            oos.mark_blocks(b, 1);
        }
        before - oos.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_keeps_the_failed_blocks_it_covers_and_clears_the_rest() {
        let mut oos = OutOfSync::new(1 << 16);
        oos.mark(0, 64 << 10); // blocks 0..16
        let mut f = FailedLocal::default();
        assert!(f.record(8 + 4, 512)); // inside block 1
        assert!(f.record(64, 8192)); // blocks 8, 9
                                     // A 32 KiB ack over blocks 0..8: block 1 stays.
        assert_eq!(f.set_in_sync(&mut oos, 0, 32 << 10), 7);
        assert!(oos.is_set(1) && !oos.is_set(0) && !oos.is_set(2));
        // Over blocks 8..16: 8 and 9 stay.
        assert_eq!(f.set_in_sync(&mut oos, 64, 32 << 10), 6);
        assert!(oos.is_set(8) && oos.is_set(9) && !oos.is_set(10));
        // Blocks 1, 8 and 9 are failed ones; 16 is not.
        oos.mark_blocks(16, 1);
        assert_eq!(f.blocks_outside(&oos), 1);
        assert_eq!(FailedLocal::default().blocks_outside(&oos), 4);
        oos.clear_blocks(16, 1);
        // A failed block that was already clear is not set by an ack.
        let mut clean = OutOfSync::new(1 << 16);
        assert_eq!(f.set_in_sync(&mut clean, 0, 4096 * 2), 0);
        assert_eq!(clean.count(), 0);
        // Overlapping failed ranges keep a block once.
        assert!(f.record(8, 4096)); // block 1 again
        oos.mark(0, 8192);
        assert_eq!(f.set_in_sync(&mut oos, 0, 8192), 1);
        assert!(oos.is_set(1) && !oos.is_set(0));
        // The next connection forgets them.
        f.connection_lost();
        assert_eq!(f.set_in_sync(&mut oos, 0, 128 << 10), 3);
        assert_eq!(oos.count(), 0);
    }

    #[test]
    fn the_list_is_bounded() {
        let mut f = FailedLocal::default();
        for i in 0..FailedLocal::MAX as u64 {
            assert!(f.record(i * 8, 4096));
        }
        assert!(!f.record(0, 4096));
        // Sabotage: the ack clears them.
        let mut oos = OutOfSync::new(1 << 16);
        oos.mark(0, 8192);
        f.sabotage_ack_clears = true;
        assert_eq!(f.set_in_sync(&mut oos, 0, 8192), 2);
    }
}
