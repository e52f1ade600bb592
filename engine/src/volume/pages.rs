//! The bitmap page writer: every write of a bitmap page on the metadata device goes
//! through it — the Primary core's writes before an activity-log eviction, the resync's
//! lazy write-out, demotion, `invalidate`, a Secondary's failed writes, the clean stop.
//!
//! Why one writer. Page images are taken from the node's one bitmap under the volume
//! lock, so the image taken last is the newest. But two writers that each send their
//! image to the disk can land them in any order: an older image landing after a newer
//! one would erase a bit set in between (a write the peer missed) and a crash then
//! loses it. Here a page has at most one write in flight; an image staged while one is
//! in flight waits, and a later image of the same page replaces the waiting one (it is
//! at least as new in everything that matters: bits set stay set until a resync clears
//! them, and a clear reaches a page image only after a flush covered it). Whoever staged
//! an image is told when an image at least as new is durable: the core's eviction by its
//! metadata tag, a task by a oneshot channel.
//!
//! **The activity log waits for the pages.** The core writes the pages of an extent it
//! evicts only if they are dirty, then a transaction that makes the log forget the
//! extent. Another writer (the resync's write-out on a SyncTarget Primary, a demotion)
//! may have taken a page's dirty flag and still have its write in flight: the core,
//! finding the page clean, writes nothing for it. So a transaction of the core waits
//! until no page write is in flight or waiting ([`PageWriter::after_pages`]); the core
//! has one metadata write in flight at a time, and the other writers stage bursts, so
//! the wait ends. If a page write failed meanwhile, the transaction fails too, as the
//! core's own page write failing would fail it.
//!
//! The writer is sans IO: [`PageWriter::stage`] and [`PageWriter::done`] run under the
//! volume lock and return the writes to start ([`MetaJob`]s); the driver submits each as
//! a FUA metadata write and reports its end with `done`. Staging under the lock is what
//! makes "staged later" mean "taken later".
//!
//! Bounds: per page one image in flight and one waiting (4 KiB each); one held
//! transaction (the core's one metadata write); pages are the
//! bitmap's (one per 128 MiB of volume, e.g. 8,192 for 1 TiB). The waiters of one image
//! are those that staged it while it waited: at most one core eviction per page at a
//! time, and the tasks of the few page writers above.
//!
//! Contract: `done` for a page with no write in flight is a driver bug and panics.

use super::io::{MetaJob, MetaTag};
use std::collections::HashMap;
use tokio::sync::oneshot;

/// Who waits for a page image to be durable.
#[derive(Debug)]
pub(super) enum PageWaiter {
    /// The Primary core's metadata write `tag` (`Primary::meta_write_done`).
    Core(u64),
    /// A task: `true` when durable, `false` when the write failed.
    Task(oneshot::Sender<bool>),
}

#[derive(Debug)]
struct Waiting {
    data: Box<[u8; 4096]>,
    preflush: bool,
    waiters: Vec<PageWaiter>,
}

#[derive(Debug, Default)]
struct Slot {
    /// The waiters of the image being written.
    writing: Vec<PageWaiter>,
    /// The newest image staged since, if any.
    next: Option<Waiting>,
}

/// What a page write's end releases: its waiters, the page's next write, and the held
/// transactions (with whether they may go, `false`: a page write failed meanwhile).
#[derive(Debug, Default)]
pub(super) struct PageDone {
    pub(super) waiters: Vec<PageWaiter>,
    pub(super) next: Option<MetaJob>,
    pub(super) released: Vec<MetaJob>,
    pub(super) released_ok: bool,
}

/// See the module docs.
#[derive(Debug)]
pub(super) struct PageWriter {
    /// Byte offset of page 0 on the metadata device.
    base: u64,
    /// Pages in the bitmap.
    pages: u32,
    /// Pages with a write in flight.
    slots: HashMap<u32, Slot>,
    /// Transactions waiting for no page write in flight.
    held: Vec<MetaJob>,
    /// A page write failed while a transaction was held.
    held_failed: bool,
}

impl PageWriter {
    pub(super) fn new(base: u64, pages: u32) -> Self {
        PageWriter {
            base,
            pages,
            slots: HashMap::new(),
            held: Vec::new(),
            held_failed: false,
        }
    }

    /// The page a metadata write at byte `offset` is, if it is a bitmap page.
    pub(super) fn page_at(&self, offset: u64) -> Option<u32> {
        let rel = offset.checked_sub(self.base)?;
        let page = u32::try_from(rel / 4096).ok()?;
        (rel % 4096 == 0 && page < self.pages).then_some(page)
    }

    /// Stages the image `data` of page `page` for `waiter`: the write to start now, or
    /// `None` while the page has one in flight.
    pub(super) fn stage(
        &mut self,
        page: u32,
        data: Box<[u8; 4096]>,
        preflush: bool,
        waiter: PageWaiter,
    ) -> Option<MetaJob> {
        match self.slots.get_mut(&page) {
            Some(slot) => {
                match &mut slot.next {
                    Some(w) => {
                        w.data = data;
                        w.preflush |= preflush;
                        w.waiters.push(waiter);
                    }
                    None => {
                        slot.next = Some(Waiting {
                            data,
                            preflush,
                            waiters: vec![waiter],
                        });
                    }
                }
                None
            }
            None => {
                self.slots.insert(
                    page,
                    Slot {
                        writing: vec![waiter],
                        next: None,
                    },
                );
                Some(self.job(page, data, preflush))
            }
        }
    }

    /// A transaction of the core: `Some` (back) to write now, `None` while a page write
    /// is in flight or waiting — [`PageWriter::done`] releases it (see the module docs).
    pub(super) fn after_pages(&mut self, m: MetaJob) -> Option<MetaJob> {
        if self.slots.is_empty() {
            return Some(m);
        }
        self.held.push(m);
        None
    }

    /// The write of page `page` ended (`ok`): see [`PageDone`].
    pub(super) fn done(&mut self, page: u32, ok: bool) -> PageDone {
        let Some(slot) = self.slots.get_mut(&page) else {
            panic!("BUG: a bitmap page write ended for page {page}, which had none in flight");
        };
        if !ok && !self.held.is_empty() {
            self.held_failed = true;
        }
        let mut d = PageDone::default();
        match slot.next.take() {
            Some(w) => {
                d.waiters = std::mem::replace(&mut slot.writing, w.waiters);
                d.next = Some(self.job(page, w.data, w.preflush));
            }
            None => {
                d.waiters = self
                    .slots
                    .remove(&page)
                    .map(|s| s.writing)
                    .unwrap_or_default();
            }
        }
        if self.slots.is_empty() && !self.held.is_empty() {
            d.released = std::mem::take(&mut self.held);
            d.released_ok = !std::mem::take(&mut self.held_failed);
        }
        d
    }

    fn job(&self, page: u32, data: Box<[u8; 4096]>, preflush: bool) -> MetaJob {
        MetaJob {
            tag: MetaTag::Page(page),
            offset: self.base + u64::from(page) * 4096,
            data,
            preflush,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn img(b: u8) -> Box<[u8; 4096]> {
        Box::new([b; 4096])
    }

    fn core_tags(w: &[PageWaiter]) -> Vec<u64> {
        w.iter()
            .map(|w| match w {
                PageWaiter::Core(t) => *t,
                PageWaiter::Task(_) => u64::MAX,
            })
            .collect()
    }

    #[test]
    fn one_write_per_page_in_flight_and_the_newest_image_goes_next() {
        let mut pw = PageWriter::new(1 << 20, 4);
        assert_eq!(pw.page_at((1 << 20) + 3 * 4096), Some(3));
        assert_eq!(pw.page_at((1 << 20) + 4 * 4096), None, "past the bitmap");
        assert_eq!(pw.page_at((1 << 20) + 10), None, "not a page boundary");
        assert_eq!(pw.page_at(4096), None, "before the bitmap");
        let j = pw.stage(1, img(1), false, PageWaiter::Core(10)).unwrap();
        assert_eq!(
            (j.tag, j.offset, j.data[0]),
            (MetaTag::Page(1), (1 << 20) + 4096, 1)
        );
        // Another page is independent.
        assert!(pw.stage(2, img(7), false, PageWaiter::Core(20)).is_some());
        // Page 1 is busy: two later images wait, the newest replaces the older.
        assert!(pw.stage(1, img(2), false, PageWaiter::Core(11)).is_none());
        let (tx, mut rx) = oneshot::channel();
        assert!(pw.stage(1, img(3), true, PageWaiter::Task(tx)).is_none());
        let PageDone {
            waiters: ended,
            next,
            ..
        } = pw.done(1, true);
        assert_eq!(core_tags(&ended), vec![10]);
        let next = next.unwrap();
        assert_eq!(
            (next.data[0], next.preflush),
            (3, true),
            "the newest, preflush kept"
        );
        assert!(rx.try_recv().is_err(), "not durable yet");
        let PageDone {
            waiters: ended,
            next,
            ..
        } = pw.done(1, true);
        assert!(next.is_none());
        assert_eq!(core_tags(&ended), vec![11, u64::MAX]);
        // The page is idle again: the next image goes at once.
        assert!(pw.stage(1, img(4), false, PageWaiter::Core(12)).is_some());
    }

    fn tx(tag: u64) -> MetaJob {
        MetaJob {
            tag: MetaTag::Core(tag),
            offset: 0,
            data: img(9),
            preflush: true,
        }
    }

    /// A transaction waits until no page write is in flight or waiting, and fails if
    /// one of them failed meanwhile.
    #[test]
    fn a_transaction_waits_for_every_page_write_staged_before_it() {
        let mut pw = PageWriter::new(0, 4);
        assert_eq!(
            pw.after_pages(tx(1)).map(|m| m.tag),
            Some(MetaTag::Core(1)),
            "idle: at once"
        );
        // A task's page write is in flight (it took the page's dirty flag).
        let (tx0, _rx0) = oneshot::channel();
        assert!(pw.stage(0, img(1), false, PageWaiter::Task(tx0)).is_some());
        assert!(pw.after_pages(tx(2)).is_none(), "held");
        // Page 2 is staged too before page 0 ends: still held after page 0.
        assert!(pw.stage(2, img(1), false, PageWaiter::Core(5)).is_some());
        let d = pw.done(0, true);
        assert!(d.released.is_empty());
        let d = pw.done(2, true);
        assert_eq!(
            d.released.iter().map(|m| m.tag).collect::<Vec<_>>(),
            vec![MetaTag::Core(2)]
        );
        assert!(d.released_ok && d.released[0].preflush);
        // A failed page write fails the held transaction.
        assert!(pw.stage(1, img(1), false, PageWaiter::Core(6)).is_some());
        assert!(pw.after_pages(tx(3)).is_none());
        let d = pw.done(1, false);
        assert_eq!(d.released.len(), 1);
        assert!(!d.released_ok);
        // And the next one is not failed by it.
        assert!(pw.stage(1, img(1), false, PageWaiter::Core(7)).is_some());
        assert!(pw.after_pages(tx(4)).is_none());
        assert!(pw.done(1, true).released_ok);
    }

    #[test]
    #[should_panic(expected = "BUG")]
    fn an_end_without_a_write_is_a_driver_bug() {
        let mut pw = PageWriter::new(0, 4);
        let _ = pw.done(0, true);
    }
}
