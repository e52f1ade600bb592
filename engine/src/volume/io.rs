//! Local IO without a task per op: the volume's data writes, flushes and metadata writes
//! go to the store with a completion sink ([`Completions`], implemented by [`Volume`]),
//! and the store's reaper feeds the result to the core from its own thread.
//!
//! What takes this path (the IO of every application and peer write):
//! - a core's local data write (Primary `SubmitLocal`, Receiver `SubmitLocal`) with its
//!   buffer, on a disk that is not detached: one `Store::submit_to`, the peer's buffer
//!   moved into the op (no `Arc`), its receive budget kept here until the write ends;
//! - the Primary's epoch flush and the Secondary's merged epoch flushes (one round at a
//!   time: the flushes requested while a round runs wait in `Inner::flush_waiting` and
//!   the next round takes them all, as `merged_flushes` did);
//! - the Primary core's metadata writes (activity log, bitmap pages), a preflush first
//!   when asked: two sink ops in a row, the second submitted by the first's completion.
//!
//! What still runs as a task (rare, or a chain that waits): discard and write-zeroes
//! (fallback chains, a flush after a FUA one), writes to a detached disk, resync IO
//! (`sync.rs`), the disk-failure record after a failed write (`record_disk_failure`,
//! blocking metadata IO), and the fallbacks below.
//!
//! Bounds: the table of ops in flight on this path has [`IoTable`] slots, `2 ×
//! max-buffers + 64`, allocated once (both cores together have at most `2 × max-buffers`
//! writes in flight; flushes and metadata writes are a few). When it is full, or the store
//! refuses the op (closed, invalid), the op runs as a task on the old async path (a full
//! table) or completes as failed from a task (a refusal) — never inline, so a completion
//! never re-enters `feed` from inside `run`. When the store's `queue_depth` permits are
//! all taken the store itself queues the op in a task until one frees (`store::handle`).
//!
//! Lock order: the table's mutex is a leaf (held for an insert or a take, nothing is
//! called under it). The store calls `done` after releasing the ring's lock, so `feed`
//! (volume lock) and new submissions (ring lock) from there cannot deadlock; nothing
//! waits for the reaper while holding the volume lock.
//!
//! Effects vectors: `fx_vec` / `recycle` keep up to 4 emptied `Vec<Effect>` per thread
//! (capacity ≤ 64 each), so a volume step that has effects allocates nothing.

use super::{contract, Buf, Effect, Inner, LocalWrite, Side, Volume};
use crate::request::WriteKind;
use crate::store::{
    AlignedBuf, Completions, SinkOp, Store, StoreError, StoreOp, WriteData, SECTOR_SIZE,
};
use std::cell::RefCell;
use std::sync::{Arc, PoisonError};
use tokio::sync::OwnedSemaphorePermit;

/// Slots of the table beyond `2 × max-buffers` (flushes, metadata writes).
const EXTRA_SLOTS: usize = 64;
/// Emptied effect vectors kept per thread, and the largest capacity kept.
const SPARE_FX: usize = 4;
const SPARE_FX_CAP: usize = 64;

/// What a sink op was, for its completion.
pub(super) enum IoCtx {
    /// A core's local data write; the peer data's receive budget is held until it ends.
    Write {
        side: Side,
        sector: u64,
        len: u32,
        budget: Option<OwnedSemaphorePermit>,
    },
    /// The Primary core's local flush.
    PrimaryFlush { tag: u64 },
    /// A round of merged Secondary epoch flushes (`Inner::flush_batch`).
    ReceiverFlush,
    /// The data flush before metadata block `data` is written at `offset`.
    MetaPreflush {
        tag: u64,
        offset: u64,
        data: Box<[u8; 4096]>,
    },
    /// A metadata block write (FUA).
    Meta { tag: u64, offset: u64 },
}

/// The sink ops in flight: a token is a slot index.
pub(super) struct IoTable {
    slots: Vec<Option<IoCtx>>,
    free: Vec<usize>,
}

impl IoTable {
    /// A table for a volume of `max_buffers`.
    pub(super) fn new(max_buffers: usize) -> Self {
        let n = max_buffers.saturating_mul(2).saturating_add(EXTRA_SLOTS);
        IoTable {
            slots: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
        }
    }

    fn insert(&mut self, ctx: IoCtx) -> Result<u64, IoCtx> {
        let Some(idx) = self.free.pop() else {
            return Err(ctx);
        };
        match self.slots.get_mut(idx) {
            Some(place) => {
                *place = Some(ctx);
                Ok(idx as u64)
            }
            None => Err(ctx),
        }
    }

    fn take(&mut self, token: u64) -> Option<IoCtx> {
        let idx = usize::try_from(token).ok()?;
        let ctx = self.slots.get_mut(idx)?.take()?;
        self.free.push(idx);
        Some(ctx)
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
        let ctx = self.io_table().take(token);
        match ctx {
            Some(ctx) => self.io_done(ctx, result),
            None => panic!("BUG: a store completion for unknown volume op {token}"),
        }
    }

    fn read_done(&self, token: u64, _result: Result<AlignedBuf, StoreError>) {
        panic!("BUG: a store read completion for volume op {token}; the volume submits none");
    }
}

impl Volume {
    fn io_table(&self) -> std::sync::MutexGuard<'_, IoTable> {
        // Inserts and takes are single statements; a panic cannot tear the table.
        self.io_ops.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A core's local write: through a sink when it is a data write with its buffer to a
    /// disk in service, else the async path in a task.
    pub(super) fn start_local_write(&self, w: LocalWrite) {
        let detached = self.detached.load(std::sync::atomic::Ordering::Relaxed);
        let (side, sector, len, fua, data) = match w {
            LocalWrite {
                side,
                sector,
                len,
                kind: WriteKind::Data,
                fua,
                buf: Some(b),
            } if !detached => (side, sector, len, fua, b),
            w => return self.spawn_local_write(w),
        };
        let (data, budget) = match data {
            Buf::Shared(b) => (WriteData::Shared(b), None),
            Buf::Owned(d) => {
                let (b, budget) = d.into_parts();
                (WriteData::Owned(b), Some(budget))
            }
        };
        let op = SinkOp::Write {
            offset: sector * SECTOR_SIZE as u64,
            data,
            fua,
        };
        let ctx = IoCtx::Write {
            side,
            sector,
            len,
            budget,
        };
        self.submit_sink(&self.store, op, ctx);
    }

    /// The Primary core's flush, a merged Secondary flush round, or a metadata write's
    /// preflush, on the data device.
    pub(super) fn start_flush(&self, ctx: IoCtx) {
        self.submit_sink(&self.store, SinkOp::Flush, ctx);
    }

    /// A metadata block, FUA, on the metadata device (after its preflush, if any).
    pub(super) fn start_meta_write(&self, tag: u64, offset: u64, data: &[u8; 4096]) {
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

    fn submit_sink(&self, store: &Store, op: SinkOp, ctx: IoCtx) {
        let Some(me) = self.me.upgrade() else { return };
        let token = match self.io_table().insert(ctx) {
            Ok(t) => t,
            Err(ctx) => {
                // The table is full: the async path, in a task.
                let store = store.clone();
                self.rt.spawn(async move {
                    let r = match op {
                        SinkOp::Write { offset, data, fua } => {
                            let data = match data {
                                WriteData::Shared(b) => b,
                                WriteData::Owned(b) => Arc::new(b),
                            };
                            store.write(offset, data, fua).await
                        }
                        SinkOp::Flush => store.flush().await,
                        // The volume submits no other sink op (yet).
                        _ => Err(StoreError::Closed),
                    };
                    me.io_done(ctx, r);
                });
                return;
            }
        };
        let sink: Arc<dyn Completions> = me;
        if let Err(e) = store.submit_to(op, &sink, token) {
            if let Some(ctx) = self.io_table().take(token) {
                self.io_done_later(ctx, Err(e));
            }
        }
    }

    /// Completes `ctx` from a task (never inline in `run`).
    fn io_done_later(&self, ctx: IoCtx, result: Result<(), StoreError>) {
        let Some(me) = self.me.upgrade() else { return };
        self.rt.spawn(async move { me.io_done(ctx, result) });
    }

    /// A sink op ended: feed its core.
    fn io_done(&self, ctx: IoCtx, result: Result<(), StoreError>) {
        let ok = result.is_ok();
        match ctx {
            IoCtx::Write {
                side,
                sector,
                len,
                budget,
            } => {
                drop(budget);
                let Err(e) = result else {
                    return self.local_write_done(side, sector, len, true);
                };
                tracing::warn!("local write of {len} bytes at sector {sector} failed: {e}");
                let Some(me) = self.me.upgrade() else { return };
                // Recorded before the write completes (see `spawn_local_write`).
                self.rt.spawn(async move {
                    me.record_disk_failure(side, sector, len, true).await;
                    me.local_write_done(side, sector, len, false);
                });
            }
            IoCtx::PrimaryFlush { tag } => {
                if let Err(e) = &result {
                    tracing::warn!("local flush failed: {e}");
                }
                self.feed(|v, inner, fx| {
                    contract(inner.primary.local_flush_done(tag, ok));
                    v.drain_primary(inner, fx);
                });
            }
            IoCtx::ReceiverFlush => {
                if let Err(e) = &result {
                    tracing::warn!("local flush failed: {e}");
                }
                self.feed(|v, inner, fx| Self::flush_round_done(v, inner, fx, ok));
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
                    contract(inner.primary.meta_write_done(tag, ok));
                    v.drain_primary(inner, fx);
                });
            }
        }
    }

    /// A merged flush round ended: report every flush it covered, oldest first; start
    /// the next round if more were requested meanwhile.
    fn flush_round_done(&self, inner: &mut Inner, fx: &mut Vec<Effect>, ok: bool) {
        for token in inner.flush_batch.drain(..) {
            contract(inner.receiver.local_flush_done(token, ok));
        }
        self.drain_receiver(inner, fx);
        if Self::next_flush_round(inner) {
            fx.push(Effect::FlushRound);
        }
    }

    /// Takes the waiting flushes as the next round (`flush_running` stays set); false
    /// (and `flush_running` cleared) when none waits. The two lists swap, so a round
    /// allocates nothing.
    pub(super) fn next_flush_round(inner: &mut Inner) -> bool {
        if inner.flush_waiting.is_empty() {
            inner.flush_running = false;
            return false;
        }
        std::mem::swap(&mut inner.flush_waiting, &mut inner.flush_batch);
        inner.flush_running = true;
        true
    }

    /// A core's local write ended (`ok`): feed the core, then the resync machines.
    pub(super) fn local_write_done(&self, side: Side, sector: u64, len: u32, ok: bool) {
        self.feed(|v, inner, fx| {
            inner.app_io_sectors += u64::from(len) / SECTOR_SIZE as u64;
            match side {
                Side::Primary(tag) => {
                    Self::sync_write_ended(inner, Some(tag), None);
                    if !ok {
                        v.local_write_failed(inner, sector, len);
                    }
                    contract(inner.primary.local_done(tag, ok));
                    v.drain_primary(inner, fx);
                }
                Side::Receiver(token) => {
                    Self::sync_write_ended(inner, None, Some(token));
                    contract(inner.receiver.local_done(token, ok));
                    v.drain_receiver(inner, fx);
                }
            }
            v.drain_sync(inner, fx);
        });
    }

    /// The async path of a local write (discard, write-zeroes, a detached disk).
    fn spawn_local_write(&self, w: LocalWrite) {
        let Some(v) = self.me.upgrade() else { return };
        let LocalWrite {
            side,
            sector,
            len,
            kind,
            fua,
            buf,
        } = w;
        self.rt.spawn(async move {
            // A detached disk takes no more writes (`on-io-error detach`).
            let detached = v.detached.load(std::sync::atomic::Ordering::Relaxed);
            let ok = !detached && v.local_io(sector, len, kind, fua, buf).await;
            if !ok {
                // Recorded before the write completes (and before a Secondary answers
                // P_NEG_ACK): never UpToDate again without a resync.
                v.record_disk_failure(side, sector, len, !detached).await;
            }
            v.local_write_done(side, sector, len, ok);
        });
    }
}
