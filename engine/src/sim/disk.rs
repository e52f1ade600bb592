//! An in-memory disk with a volatile write-back cache.
//!
//! Two images: `cache` (what reads return: every completed write, applied at its completion
//! time, so concurrently submitted writes land in completion order, which the simulator
//! randomises) and `durable` (what would survive a power loss). A write becomes durable
//! when a flush submitted after its completion completes, or at once if it was FUA. A
//! flush may also make later writes durable (a real cache may write back any time); the
//! checkers only rely on the guarantee. Every sector remembers which write (request id)
//! put its content in each image, which lets the checkers compare versions instead of
//! scanning bytes. A power loss is [`Disk::crash`]: `cache := durable`.

use crate::request::SECTOR;

const SECTOR_BYTES: usize = SECTOR as usize;

/// Content written by a failed write (a real disk leaves the range undefined).
const GARBAGE: u8 = 0xEE;

/// One replica's disk.
#[derive(Debug, Clone)]
pub(crate) struct Disk {
    pub(crate) cache: Vec<u8>,
    pub(crate) durable: Vec<u8>,
    pub(crate) cache_ver: Vec<u64>,
    pub(crate) durable_ver: Vec<u64>,
    /// Completion number of the oldest write in the sector not yet durable; 0 = clean.
    dirty_since: Vec<u64>,
    /// The sectors with a non-zero `dirty_since`, so that a flush visits only those
    /// (every activity-log transaction brings one: a scan of the disk was most of the
    /// simulator's time in debug builds).
    dirty: Vec<usize>,
    /// Writes completed so far; a flush covers those completed before it was submitted.
    pub(crate) completions: u64,
}

impl Disk {
    pub(crate) fn new(sectors: usize) -> Self {
        Disk {
            cache: vec![0; sectors * SECTOR_BYTES],
            durable: vec![0; sectors * SECTOR_BYTES],
            cache_ver: vec![0; sectors],
            durable_ver: vec![0; sectors],
            dirty_since: vec![0; sectors],
            dirty: Vec::new(),
            completions: 0,
        }
    }

    /// Applies a write at its completion. `data` None = zeroes (discard, write-zeroes).
    pub(crate) fn complete_write(
        &mut self,
        sector: usize,
        data: Option<&[u8]>,
        len: usize,
        ver: u64,
        fua: bool,
        fail: bool,
    ) {
        self.completions += 1;
        let bytes = sector * SECTOR_BYTES..sector * SECTOR_BYTES + len;
        let dst = &mut self.cache[bytes.clone()];
        match (fail, data) {
            (true, _) => dst.fill(GARBAGE),
            (false, Some(d)) => dst.copy_from_slice(d),
            (false, None) => dst.fill(0),
        }
        let durable_now = fua && !fail;
        if durable_now {
            self.durable[bytes.clone()].copy_from_slice(&self.cache[bytes]);
        }
        for s in sector..sector + len / SECTOR_BYTES {
            self.cache_ver[s] = ver;
            if durable_now {
                self.durable_ver[s] = ver;
                // Still listed in `dirty` if it was: a flush drops it there.
                self.dirty_since[s] = 0;
            } else if self.dirty_since[s] == 0 {
                self.dirty_since[s] = self.completions;
                self.dirty.push(s);
            }
        }
    }

    /// Applies a resync write at its completion: `data` (None = zeroes) whose sectors carry
    /// the versions `vers` they had on the disk they were read from.
    pub(crate) fn complete_copy(
        &mut self,
        sector: usize,
        data: Option<&[u8]>,
        vers: &[u64],
        fail: bool,
    ) {
        let len = vers.len() * SECTOR_BYTES;
        self.complete_write(sector, data, len, 0, false, fail);
        for (s, &v) in (sector..sector + vers.len()).zip(vers) {
            self.cache_ver[s] = v;
        }
    }

    /// A flush submitted when `completions` was `covers` completed.
    pub(crate) fn flush(&mut self, covers: u64) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.retain(|&s| {
            let d = self.dirty_since[s];
            if d != 0 && d <= covers {
                let b = s * SECTOR_BYTES..(s + 1) * SECTOR_BYTES;
                self.durable[b.clone()].copy_from_slice(&self.cache[b]);
                self.durable_ver[s] = self.cache_ver[s];
                self.dirty_since[s] = 0;
            }
            self.dirty_since[s] != 0
        });
        self.dirty = dirty;
    }

    /// Power loss: everything not durable is gone (writes in flight are the caller's to
    /// drop: they never complete).
    pub(crate) fn crash(&mut self) {
        self.cache.copy_from_slice(&self.durable);
        self.cache_ver.copy_from_slice(&self.durable_ver);
        self.dirty_since.fill(0);
        self.dirty.clear();
    }

    /// Sector `s` holds the content of write `ver` in the images where `holds` says so
    /// (by its bytes): it is labelled `ver` there. A checksum resync keeps equal data
    /// under an older version, and two zero writes look alike; the simulator relabels
    /// once the replicas are equal (a switchover), so that the new Primary's disk is
    /// checked by version like one that took every write itself.
    pub(crate) fn relabel(&mut self, s: usize, ver: u64, holds: impl Fn(&[u8]) -> bool) {
        if holds(self.cache_sector(s)) {
            self.cache_ver[s] = ver;
        }
        if holds(self.durable_sector(s)) {
            self.durable_ver[s] = ver;
        }
    }

    pub(crate) fn cache_sector(&self, s: usize) -> &[u8] {
        &self.cache[s * SECTOR_BYTES..(s + 1) * SECTOR_BYTES]
    }

    pub(crate) fn durable_sector(&self, s: usize) -> &[u8] {
        &self.durable[s * SECTOR_BYTES..(s + 1) * SECTOR_BYTES]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_covers_only_writes_completed_before_it_and_a_crash_keeps_the_durable_image() {
        let mut d = Disk::new(4);
        d.complete_write(0, Some(&[1; 512]), 512, 1, false, false);
        let covers = d.completions;
        d.complete_write(1, Some(&[2; 512]), 512, 2, false, false);
        d.flush(covers);
        assert_eq!(d.durable_ver[..2], [1, 0]);
        assert_eq!(d.durable_sector(0), &[1; 512][..]);
        d.complete_write(2, None, 1024, 3, true, false);
        assert_eq!(d.durable_ver, [1, 0, 3, 3]);
        d.complete_write(3, Some(&[4; 512]), 512, 4, true, true);
        assert_eq!(d.cache_sector(3), &[GARBAGE; 512][..]);
        assert_eq!(d.durable_ver[3], 3);
        d.complete_write(0, Some(&[5; 512]), 512, 5, false, false);
        d.crash();
        assert_eq!(d.cache_ver, [1, 0, 3, 3]);
        assert_eq!(d.cache_sector(0), &[1; 512][..]);
        assert_eq!(d.cache_sector(3), d.durable_sector(3));
        d.complete_write(1, Some(&[6; 512]), 512, 6, false, false);
        d.flush(d.completions);
        assert_eq!(d.durable_ver, [1, 6, 3, 3]);
    }
}
