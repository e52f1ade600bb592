//! Local IO without a task per op: the volume's data writes, discards, write-zeroes,
//! flushes, metadata writes and resync IO go to the store with a completion sink
//! ([`Completions`], implemented by [`Volume`]), and the store's reaper feeds the result
//! to the core (or the resync machines) from its own thread.
//!
//! What takes this path:
//! - a core's local write (Primary `SubmitLocal`, Receiver `SubmitLocal`) to a disk that
//!   is not detached: a data write with its buffer (the peer's buffer moved into the op,
//!   no `Arc`, its receive budget kept here until the write ends), a discard or a
//!   write-zeroes (the store runs their fallback chains, e.g. punch hole → zero range →
//!   `BLKZEROOUT`); a FUA discard / write-zeroes is two sink ops, the flush submitted by
//!   the first one's completion;
//! - the Primary's epoch flush and the Secondary's merged epoch flushes (one round at a
//!   time, `replica::FlushRounds`: the flushes requested while a round runs wait and the
//!   next round takes them all);
//! - the Primary core's metadata writes (activity log, bitmap pages), a preflush first
//!   when asked: two sink ops in a row, the second submitted by the first's completion;
//! - resync and verify IO (`Effect::SyncRead`, `Effect::SyncWrite`): a read into a
//!   pooled buffer that the completion hands back (its digest or all-zero scan is
//!   computed on the reaper's thread, before the volume lock), a thin request over a
//!   file's hole as a no-op (`SinkOp::Nop`: answered as zeroes, unread, and still
//!   delivered by the reaper, never inline), the peer's data or zeroes written.
//!
//! What still runs as a task (rare): writes to a detached disk (they fail without IO),
//! the durable plans the node asks for (`plan.rs`: the disk-failure record after a
//! failed local write among them, `Event::WriteFailed`), the lazy bitmap write-out and
//! the end of a resync run (`mod.rs`), and the fallbacks below.
//!
//! Bounds: the table of ops in flight on this path has [`IoTable`] slots, allocated
//! once: `2 × max-buffers + 64` for the cores (both together have at most `2 ×
//! max-buffers` writes in flight; flushes and metadata writes are a few) and 256 more
//! that only resync and verify IO may take (`SYNC_SLOTS`), so resync never takes a
//! core's slot. Resync IO in flight is at most 64 source reads (`Source` `max_reads`),
//! 64 reads of the peer's verify (`VerifyPeer`), or a target's requests being read or
//! written: ≤ 160 at 1 MiB requests (the controller keeps `max-buffers/2` = 40,960
//! blocks in flight), up to the target's `max_requests` (8192) at 4 KiB checksum
//! requests — as for a verify source's 4 KiB reads. Past 256 such ops the rest take the
//! task path below; by then the store's 128 permits (`queue_depth`) are all taken, and
//! the store itself would queue them in a task each. When the table (or its resync
//! share) is full, the op runs as a task on the store's async path; when the store
//! refuses it (closed, invalid) it completes as failed from a task — never inline, so a
//! completion never re-enters `feed` from inside `run`. When the store's `queue_depth`
//! permits are all taken the store itself queues the op in a task until one frees
//! (`store::handle`).
//!
//! Lock order: the table's mutex is a leaf (held for an insert or a take, nothing is
//! called under it). The store calls `done` / `read_done` after releasing the ring's
//! lock, so `feed` (volume lock) and new submissions (ring lock) from there cannot
//! deadlock; nothing waits for the reaper while holding the volume lock.
//!
//! Effects vectors: `fx_vec` / `recycle` keep up to 4 emptied `Vec<Effect>` per thread
//! (capacity ≤ 64 each), so a volume step that has effects allocates nothing.

use super::sync::{ReadData, ReadResult};
use super::{contract, Buf, Effect, Volume};
use crate::net::PeerData;
use crate::replica::{Event, LocalWrite, ReadFor, RunRead, Side};
use crate::request::WriteKind;
use crate::store::{
    AlignedBuf, Completions, SinkOp, Store, StoreError, StoreOp, WriteData, SECTOR_SIZE,
};
use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use tokio::sync::OwnedSemaphorePermit;

/// Slots of the table beyond `2 × max-buffers` for the cores (flushes, metadata writes).
const EXTRA_SLOTS: usize = 64;
/// Slots of the table for resync and verify IO (at most this many of them in the table).
const SYNC_SLOTS: usize = 256;
/// Emptied effect vectors kept per thread, and the largest capacity kept.
const SPARE_FX: usize = 4;
const SPARE_FX_CAP: usize = 64;

/// A sink op's result: a read's buffer, `None` for the other ops.
type IoResult = Result<Option<AlignedBuf>, StoreError>;

/// What a sink op was, for its completion.
pub(super) enum IoCtx {
    /// A core's local write, discard or write-zeroes.
    Local(LocalIo),
    /// The Primary core's local flush.
    PrimaryFlush { tag: u64 },
    /// A round of merged Secondary epoch flushes (`Inner::flushes`).
    ReceiverFlush,
    /// The data flush before metadata block `data` is written at `offset`.
    MetaPreflush {
        tag: MetaTag,
        offset: u64,
        data: Box<[u8; 4096]>,
    },
    /// A metadata block write (FUA).
    Meta { tag: MetaTag, offset: u64 },
}

/// A core's local write in flight: the peer data's receive budget is held until it
/// ends; with `then_flush` (a FUA discard / write-zeroes) its completion submits a flush
/// with the same context, `then_flush` cleared.
pub(super) struct LocalIo {
    w: LocalWrite,
    then_flush: bool,
    budget: Option<OwnedSemaphorePermit>,
}

/// Whose metadata write it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MetaTag {
    /// The Primary core's activity-log transaction `tag`.
    Core(u64),
    /// The page writer's write of bitmap page `page` (`pages.rs`).
    Page(u32),
}

/// A metadata write to start: 4 KiB `data` at byte `offset` of the metadata device, FUA,
/// after a flush of the data device when `preflush`.
#[derive(Debug)]
pub(super) struct MetaJob {
    pub(super) tag: MetaTag,
    pub(super) offset: u64,
    pub(super) data: Box<[u8; 4096]>,
    pub(super) preflush: bool,
}

/// What a resync or verify sink op was, for its completion.
pub(super) enum SyncIo {
    /// A read (`Effect::SyncRead`).
    Read(RunRead),
    /// A thin request over a hole of a file: a no-op, answered as zeroes unread.
    Hole {
        run: u64,
        tag: u64,
        purpose: ReadFor,
    },
    /// A write (`Effect::SyncWrite`): the peer's data, its receive budget held until it
    /// ends, or zeroes.
    Write {
        run: u64,
        tag: u64,
        sector: u64,
        len: u32,
        budget: Option<OwnedSemaphorePermit>,
    },
}

/// An op in the table: a core's, or resync IO (at most [`SYNC_SLOTS`] of those).
enum TableOp {
    Core(IoCtx),
    Sync(SyncIo),
}

impl From<IoCtx> for TableOp {
    fn from(c: IoCtx) -> Self {
        TableOp::Core(c)
    }
}

impl From<SyncIo> for TableOp {
    fn from(s: SyncIo) -> Self {
        TableOp::Sync(s)
    }
}

/// The sink ops in flight: a token is a slot index.
pub(super) struct IoTable {
    slots: Vec<Option<TableOp>>,
    free: Vec<usize>,
    /// Resync and verify ops in the table (≤ [`SYNC_SLOTS`]).
    sync: usize,
}

impl IoTable {
    /// A table for a volume of `max_buffers`.
    pub(super) fn new(max_buffers: usize) -> Self {
        let n = max_buffers
            .saturating_mul(2)
            .saturating_add(EXTRA_SLOTS + SYNC_SLOTS);
        IoTable {
            slots: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
            sync: 0,
        }
    }

    fn insert(&mut self, op: TableOp) -> Result<u64, TableOp> {
        let sync = matches!(op, TableOp::Sync(_));
        if sync && self.sync >= SYNC_SLOTS {
            return Err(op);
        }
        let Some(idx) = self.free.pop() else {
            return Err(op);
        };
        match self.slots.get_mut(idx) {
            Some(place) => {
                *place = Some(op);
                self.sync += usize::from(sync);
                Ok(idx as u64)
            }
            None => Err(op),
        }
    }

    fn take(&mut self, token: u64) -> Option<TableOp> {
        let idx = usize::try_from(token).ok()?;
        let op = self.slots.get_mut(idx)?.take()?;
        self.free.push(idx);
        if let TableOp::Sync(_) = op {
            self.sync = self.sync.saturating_sub(1);
        }
        Some(op)
    }
}

thread_local! {
    static SPARE: RefCell<Vec<Vec<Effect>>> = const { RefCell::new(Vec::new()) };
}

/// An empty effects vector, reused when this thread has one.
pub(super) fn fx_vec() -> Vec<Effect> {
    SPARE
        .try_with(|s| s.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Keeps an emptied effects vector for `fx_vec`.
pub(super) fn recycle(mut v: Vec<Effect>) {
    v.clear();
    if v.capacity() == 0 || v.capacity() > SPARE_FX_CAP {
        return;
    }
    let _ = SPARE.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            if s.len() < SPARE_FX {
                s.push(v);
            }
        }
    });
}

impl Completions for Volume {
    fn done(&self, token: u64, result: Result<(), StoreError>) {
        self.sink_done(token, result.map(|()| None));
    }

    fn read_done(&self, token: u64, result: Result<AlignedBuf, StoreError>) {
        self.sink_done(token, result.map(Some));
    }
}

/// A sink op on the async path (the table-full fallback, in a task).
async fn run_async(store: &Store, op: SinkOp) -> IoResult {
    let none = |r: Result<(), StoreError>| r.map(|()| None);
    match op {
        SinkOp::Write { offset, data, fua } => {
            let data = match data {
                WriteData::Shared(b) => b,
                WriteData::Owned(b) => Arc::new(b),
            };
            none(store.write(offset, data, fua).await)
        }
        SinkOp::Flush => none(store.flush().await),
        SinkOp::Read { offset, buf } => store.read_into(offset, buf).await.map(Some),
        SinkOp::Discard { offset, len } => none(store.discard(offset, len).await),
        SinkOp::WriteZeroes {
            offset,
            len,
            may_unmap,
        } => none(store.write_zeroes(offset, len, may_unmap).await),
        SinkOp::Nop => Ok(None),
    }
}

impl Volume {
    fn io_table(&self) -> std::sync::MutexGuard<'_, IoTable> {
        // Inserts and takes are single statements; a panic cannot tear the table.
        self.io_ops.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sink_done(&self, token: u64, result: IoResult) {
        let op = self.io_table().take(token);
        match op {
            Some(op) => self.op_done(op, result),
            None => panic!("BUG: a store completion for unknown volume op {token}"),
        }
    }

    /// A table op ended (or was refused): feed its core, or the resync machines.
    fn op_done(&self, op: TableOp, result: IoResult) {
        match op {
            TableOp::Core(ctx) => self.io_done(ctx, result.map(drop)),
            TableOp::Sync(io) => self.sync_io_done(io, result),
        }
    }

    /// A core's local write through a sink: a data write with its buffer, a discard or a
    /// write-zeroes. A disk that is detached (or a data write without its buffer, a bug)
    /// fails it without IO, from a task.
    pub(super) fn start_local_write(&self, w: LocalWrite, buf: Option<Buf>) {
        let LocalWrite {
            sector,
            len,
            kind,
            fua,
            ..
        } = w;
        if self.detached.load(Ordering::Relaxed) {
            return self.fail_local_write(w, false);
        }
        let offset = sector * SECTOR_SIZE as u64;
        let mut budget = None;
        // A data write is FUA itself; a FUA discard / write-zeroes flushes after it.
        let (op, then_flush) = match (kind, buf) {
            (WriteKind::Data, Some(data)) => {
                let data = match data {
                    Buf::Shared(b) => WriteData::Shared(b),
                    Buf::Owned(d) => {
                        let (b, permit) = d.into_parts();
                        budget = Some(permit);
                        WriteData::Owned(b)
                    }
                };
                (SinkOp::Write { offset, data, fua }, false)
            }
            (WriteKind::Data, None) => {
                tracing::error!("a write at sector {sector} has no data buffer");
                return self.fail_local_write(w, true);
            }
            (WriteKind::Discard, _) => {
                let len = u64::from(len);
                (SinkOp::Discard { offset, len }, fua)
            }
            (WriteKind::Zeroes { unmap }, _) => {
                let len = u64::from(len);
                (
                    SinkOp::WriteZeroes {
                        offset,
                        len,
                        may_unmap: unmap,
                    },
                    fua,
                )
            }
        };
        let ctx = IoCtx::Local(LocalIo {
            w,
            then_flush,
            budget,
        });
        self.submit_sink(&self.store, op, ctx);
    }

    /// The Primary core's flush, a merged Secondary flush round, a metadata write's
    /// preflush, or the flush after a FUA discard / write-zeroes, on the data device.
    pub(super) fn start_flush(&self, ctx: IoCtx) {
        self.submit_sink(&self.store, SinkOp::Flush, ctx);
    }

    /// A metadata block, FUA, on the metadata device (after its preflush, if any).
    pub(super) fn start_meta_write(&self, tag: MetaTag, offset: u64, data: &[u8; 4096]) {
        let buf = match AlignedBuf::from_pool(data.len()) {
            Ok(mut b) => {
                b.copy_from_slice(data);
                b
            }
            Err(e) => {
                tracing::error!("metadata buffer: {e}");
                let err = StoreError::Io {
                    op: StoreOp::Write,
                    errno: libc::ENOMEM,
                };
                return self.io_done_later(IoCtx::Meta { tag, offset }, Err(err));
            }
        };
        let op = SinkOp::Write {
            offset,
            data: WriteData::Owned(buf),
            fua: true,
        };
        self.submit_sink(&self.meta_store, op, IoCtx::Meta { tag, offset });
    }

    /// A resync or verify read into a pooled buffer (the read fills all of it). A thin
    /// request over a hole of a file backend is answered as zeroes without reading, by a
    /// no-op through the same sink.
    pub(super) fn start_sync_read(&self, r: RunRead) {
        let RunRead {
            run,
            tag,
            sector,
            len,
            purpose,
        } = r;
        let offset = sector * SECTOR_SIZE as u64;
        let thin = matches!(
            purpose,
            ReadFor::Source {
                zero_check: true,
                digest: false
            }
        );
        if thin && self.store.is_hole(offset, u64::from(len)) {
            let io = SyncIo::Hole { run, tag, purpose };
            return self.submit_sink(&self.store, SinkOp::Nop, io);
        }
        let io = SyncIo::Read(r);
        match AlignedBuf::from_pool(len as usize) {
            Ok(buf) => self.submit_sink(&self.store, SinkOp::Read { offset, buf }, io),
            Err(e) => self.io_done_later(io, Err(e.into())),
        }
    }

    /// A resync write of the peer's data, or of zeroes (`None`, deallocating). On a
    /// detached disk it fails without IO, from a task.
    pub(super) fn start_sync_write(
        &self,
        (run, tag): (u64, u64),
        sector: u64,
        len: u32,
        data: Option<PeerData>,
    ) {
        if self.detached.load(Ordering::Relaxed) {
            self.spawn_task(move |v| async move { v.resync_write_done(run, tag, false) });
            return;
        }
        let offset = sector * SECTOR_SIZE as u64;
        let (op, budget) = match data {
            Some(d) => {
                let (b, budget) = d.into_parts();
                let op = SinkOp::Write {
                    offset,
                    data: WriteData::Owned(b),
                    fua: false,
                };
                (op, Some(budget))
            }
            None => {
                let op = SinkOp::WriteZeroes {
                    offset,
                    len: u64::from(len),
                    may_unmap: true,
                };
                (op, None)
            }
        };
        let io = SyncIo::Write {
            run,
            tag,
            sector,
            len,
            budget,
        };
        self.submit_sink(&self.store, op, io);
    }

    fn submit_sink(&self, store: &Store, op: SinkOp, what: impl Into<TableOp>) {
        let Some(me) = self.me.upgrade() else { return };
        let token = match self.io_table().insert(what.into()) {
            Ok(t) => t,
            Err(what) => {
                // The table is full: the async path, in a task.
                let store = store.clone();
                self.rt.spawn(async move {
                    let r = run_async(&store, op).await;
                    me.op_done(what, r);
                });
                return;
            }
        };
        let sink: Arc<dyn Completions> = me;
        if let Err(e) = store.submit_to(op, &sink, token) {
            if let Some(what) = self.io_table().take(token) {
                self.io_done_later(what, Err(e));
            }
        }
    }

    /// Completes `what` from a task (never inline in `run`).
    fn io_done_later(&self, what: impl Into<TableOp>, result: IoResult) {
        let what = what.into();
        self.spawn_task(move |v| async move { v.op_done(what, result) });
    }

    /// A core's sink op ended: feed its core.
    fn io_done(&self, ctx: IoCtx, result: Result<(), StoreError>) {
        let ok = result.is_ok();
        match ctx {
            IoCtx::Local(mut l) => {
                if l.then_flush && ok {
                    l.then_flush = false;
                    return self.start_flush(IoCtx::Local(l));
                }
                drop(l.budget);
                self.local_write_ended(l.w, result);
            }
            IoCtx::PrimaryFlush { tag } => {
                if let Err(e) = &result {
                    tracing::warn!("local flush failed: {e}");
                }
                self.feed(|v, inner, fx| {
                    contract(inner.node.primary.local_flush_done(tag, ok));
                    v.drain(inner, fx);
                });
            }
            IoCtx::ReceiverFlush => {
                if let Err(e) = &result {
                    tracing::warn!("local flush failed: {e}");
                }
                self.feed(|v, inner, fx| {
                    Self::feed_local(inner, Event::FlushRoundDone { ok });
                    v.drain(inner, fx);
                });
            }
            IoCtx::MetaPreflush { tag, offset, data } => match result {
                Ok(()) => self.start_meta_write(tag, offset, &data),
                Err(e) => {
                    tracing::warn!("local flush failed: {e}");
                    self.io_done(IoCtx::Meta { tag, offset }, Err(e));
                }
            },
            IoCtx::Meta { tag, offset } => {
                if let Err(e) = &result {
                    tracing::error!("metadata write at byte {offset} failed: {e}");
                }
                self.feed(|v, inner, fx| {
                    match tag {
                        MetaTag::Core(tag) => contract(inner.node.primary.meta_write_done(tag, ok)),
                        MetaTag::Page(page) => Self::page_write_done(inner, fx, page, ok),
                    }
                    v.drain(inner, fx);
                });
            }
        }
    }

    /// A core's local write ended with `result`: a success feeds the core at once; a
    /// failure too ([`Event::WriteFailed`]: the node records it first, as a plan, and
    /// completes the write once that is durable — before a Secondary answers
    /// `P_NEG_ACK`: never UpToDate again without a resync).
    fn local_write_ended(&self, w: LocalWrite, result: Result<(), StoreError>) {
        let Err(e) = result else {
            return self.local_write_done(w, true);
        };
        let LocalWrite {
            sector, len, kind, ..
        } = w;
        tracing::warn!("local {kind:?} of {len} bytes at sector {sector} failed: {e}");
        self.local_write_failed(w, true);
    }

    /// A resync or verify read or write ended: feed the resync machines. The CPU work a
    /// read's purpose needs (a digest, the all-zero scan) is done here, on the thread
    /// that reaped it, before the volume's lock is taken.
    fn sync_io_done(&self, io: SyncIo, result: IoResult) {
        let (run, tag, purpose, read) = match io {
            SyncIo::Write {
                run,
                tag,
                sector,
                len,
                budget,
            } => {
                drop(budget);
                if let Err(e) = &result {
                    tracing::warn!("resync write of {len} bytes at sector {sector} failed: {e}");
                }
                return self.resync_write_done(run, tag, result.is_ok());
            }
            SyncIo::Hole { run, tag, purpose } => {
                let read = match result {
                    Ok(_) => ReadResult::Hole,
                    Err(_) => ReadResult::Failed,
                };
                (run, tag, purpose, read)
            }
            SyncIo::Read(RunRead {
                run,
                tag,
                sector,
                len,
                purpose,
            }) => {
                let read = match result {
                    Ok(Some(buf)) => ReadResult::Data(ReadData::new(buf, purpose)),
                    // A read always hands its buffer back.
                    Ok(None) => ReadResult::Failed,
                    Err(e) => {
                        tracing::warn!("resync read of {len} bytes at sector {sector} failed: {e}");
                        ReadResult::Failed
                    }
                };
                (run, tag, purpose, read)
            }
        };
        self.feed(|v, inner, fx| {
            v.sync_read_done(inner, (run, tag, purpose), read, fx);
        });
    }

    /// A resync write ended (`ok`): feed the target.
    fn resync_write_done(&self, run: u64, tag: u64, ok: bool) {
        self.feed(|v, inner, fx| v.sync_write_done(inner, run, tag, ok, fx));
    }

    /// A core's local write ended (`ok`): feed the node, then the resync machines.
    pub(super) fn local_write_done(&self, w: LocalWrite, ok: bool) {
        self.feed(|v, inner, fx| {
            inner.app_io_sectors += u64::from(w.len) / SECTOR_SIZE as u64;
            Self::feed_local(inner, Event::WriteDone { w, ok });
            v.drain(inner, fx);
            if matches!(w.side, Side::Peer { .. }) {
                v.wake_if_idle(inner);
            }
        });
    }

    /// A local write that is not submitted (a detached disk, which takes no more
    /// writes; `attempted`: a data write without its buffer) fails as a failed write
    /// does, from a task (it is refused while the effects of a drain run: feeding the
    /// node there would recurse once per write the drain released).
    fn fail_local_write(&self, w: LocalWrite, attempted: bool) {
        self.spawn_task(move |v| async move { v.local_write_failed(w, attempted) });
    }

    /// [`Event::WriteFailed`] (`attempted`: the write reached the disk).
    fn local_write_failed(&self, w: LocalWrite, attempted: bool) {
        self.feed(|v, inner, fx| {
            Self::feed_local(inner, Event::WriteFailed { w, attempted });
            v.drain(inner, fx);
            if matches!(w.side, Side::Peer { .. }) {
                v.wake_if_idle(inner);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hole() -> SyncIo {
        SyncIo::Hole {
            run: 1,
            tag: 2,
            purpose: ReadFor::Verify,
        }
    }

    /// Resync IO takes at most `SYNC_SLOTS` slots, so the cores' `2 × max-buffers + 64`
    /// stay theirs; a take gives the slot (and the resync share) back.
    #[test]
    fn resync_ops_take_at_most_their_share_of_the_table() {
        let max_buffers = 32;
        let core = 2 * max_buffers + EXTRA_SLOTS;
        let mut t = IoTable::new(max_buffers);
        let sync: Vec<u64> = (0..SYNC_SLOTS)
            .map(|_| t.insert(hole().into()).ok().expect("a resync slot"))
            .collect();
        assert!(t.insert(hole().into()).is_err(), "past the resync share");
        let cores: Vec<u64> = (0..core)
            .map(|_| {
                t.insert(IoCtx::ReceiverFlush.into())
                    .ok()
                    .expect("a core slot")
            })
            .collect();
        assert!(
            t.insert(IoCtx::ReceiverFlush.into()).is_err(),
            "the table is full"
        );
        assert!(matches!(t.take(sync[0]), Some(TableOp::Sync(_))));
        assert!(
            t.insert(IoCtx::ReceiverFlush.into()).is_ok(),
            "the freed slot"
        );
        assert!(t.insert(hole().into()).is_err(), "the table is full again");
        assert!(matches!(t.take(cores[0]), Some(TableOp::Core(_))));
        assert!(t.take(cores[0]).is_none(), "taken once");
        assert!(t.insert(hole().into()).is_ok(), "a resync op fits again");
    }
}
