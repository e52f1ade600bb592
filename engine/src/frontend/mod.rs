//! Frontends: how applications reach a volume.
//!
//! A frontend (NBD now, ublk next) turns its own requests into a [`BlockRequest`] and
//! hands it to a [`BlockTarget`] — the replicated volume in the daemon, an in-memory
//! target in frontend tests. The target owns replication semantics (docs/design.md §3);
//! the frontend owns its protocol, its sockets or queues, its threads, its buffers and
//! its bounds (in-flight requests per connection or queue).
//!
//! The seam is shaped for ublk, whose queue threads own their buffers and are not tokio
//! threads, and NBD sits on top of it unchanged in cost:
//!
//! - **Buffers belong to the frontend.** A read carries the caller's [`AlignedBuf`] (its
//!   length is the read's); the target fills it (the local disk reads straight into it,
//!   a read from the peer copies each ≤ 1 MiB reply into it) and gives it back in
//!   [`BlockReply::Data`], so a frontend can recycle it (a ublk queue its per-tag buffer,
//!   NBD a fresh one per READ as before). On an error the buffer may be dropped.
//! - **Every request names its queue** ([`BlockRequest::queue`]): ublk's hardware queue,
//!   one thread each; NBD connection `n` uses queue `n mod 64` (see
//!   [`nbd::server`]). The volume ignores it today; it is there for per-queue threads
//!   and per-queue stats without changing the seam again.
//! - **The target describes itself** in [`TargetInfo`]: logical block size (a block
//!   device's `BLKSSZGET`; for a file the O_DIRECT alignment the store probed, 512 or
//!   4096), physical block size (`BLKPBSZGET`; 4096 for a file), the largest READ/WRITE
//!   (32 MiB; the volume splits a write over 1 MiB into 1 MiB replicated writes, one copy
//!   each), discard granularity (the physical block) and the discard / write-zeroes
//!   limits (the volume's 128 MiB, DRBD's batch limit), and whether it has a volatile
//!   cache (flush needed) and FUA (the volume: both).
//!   A frontend advertises exactly that (NBD: `NBD_INFO_BLOCK_SIZE` and the transmission
//!   flags; ublk: its basic and discard parameters), refuses requests not aligned to the
//!   logical block size and READ/WRITEs over the limit with `EINVAL` before they reach
//!   the target, and splits a discard or write-zeroes over its limit (the kernel splits
//!   them for ublk; the NBD server does it itself: qemu sends 2 GiB discards).
//! - **Completion needs no runtime of the caller's.** The future [`BlockTarget::submit`]
//!   returns is `Send`, needs no tokio context, no timer and no task per request: a ublk
//!   queue thread can poll it with its own tiny executor and is woken from whichever
//!   thread finishes the IO (test
//!   `frontend::tests::a_volume_serves_a_thread_outside_any_runtime`). The volume keeps a
//!   handle to its runtime for what runs in the background: the store's completion
//!   reaper (`Store::set_runtime`) and the local half of a replicated write (a task, as
//!   for NBD). So from a foreign thread a read submits its io_uring op on that thread and
//!   costs two cross-thread wake-ups (the runtime's epoll sees the CQE, its reaper wakes
//!   the queue thread); a write one more (starting its local-write task). On the
//!   daemon's one runtime thread, as NBD runs, none of these cross threads. Letting a
//!   queue thread reap its own ring is the next step for ublk, not taken here.
//!
//! A frontend registers every client that has the target open for writing with the
//! target's [`Openers`] (DRBD's open count), so that `secondary` can refuse while the
//! device is held open.
//!
//! Offsets and lengths are bytes, multiples of [`TargetInfo::logical_block_size`] (512 or
//! 4096); a frontend refuses unaligned requests with `EINVAL` before they reach the target.

pub mod nbd;
pub mod openers;

#[cfg(test)]
mod tests;

pub use openers::{OpenGuard, Openers};

use crate::store::AlignedBuf;
use std::future::Future;
use std::sync::Arc;

/// The largest READ or WRITE any frontend or target handles, bytes (32 MiB, the largest
/// [`AlignedBuf`]); a target's own limit ([`TargetInfo::max_io_bytes`]) is at most this.
pub const MAX_IO_BYTES: u32 = 32 << 20;
const _: () = assert!(MAX_IO_BYTES as usize == crate::store::MAX_BUF_LEN);

/// One block request as a frontend submits it: which queue it came from, and what it is.
#[derive(Debug)]
pub struct BlockRequest {
    /// The frontend queue that submitted it (ublk: the hardware queue, one thread each;
    /// NBD: the connection number modulo 64). For per-queue threads and stats; a target
    /// may ignore it (the volume does today).
    pub queue: u16,
    /// The operation.
    pub io: BlockIo,
}

impl BlockRequest {
    /// A request from `queue`.
    pub fn new(queue: u16, io: BlockIo) -> Self {
        Self { queue, io }
    }
}

/// One block operation.
#[derive(Debug)]
pub enum BlockIo {
    /// Read `buf.len()` bytes at `offset` into `buf` (the caller's buffer, returned
    /// filled in [`BlockReply::Data`]).
    Read { offset: u64, buf: AlignedBuf },
    /// Write `data` at `offset`; `fua`: durable on every replica's disk before completion.
    Write {
        offset: u64,
        data: Arc<AlignedBuf>,
        fua: bool,
    },
    /// Make every completed write durable (a flush barrier on every replica).
    Flush,
    /// Discard (TRIM) `len` bytes at `offset`; reads afterwards return zeroes or old data.
    Discard { offset: u64, len: u64, fua: bool },
    /// Zero `len` bytes at `offset`; `may_unmap`: the range may be deallocated.
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    },
}

impl BlockIo {
    /// Bytes of data the operation moves or affects (0 for a flush).
    pub fn len(&self) -> u64 {
        match self {
            BlockIo::Read { buf, .. } => buf.len() as u64,
            BlockIo::Write { data, .. } => data.len() as u64,
            BlockIo::Flush => 0,
            BlockIo::Discard { len, .. } | BlockIo::WriteZeroes { len, .. } => *len,
        }
    }

    /// Whether it moves or affects no byte (a flush).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A successful completion.
#[derive(Debug)]
pub enum BlockReply {
    /// A read's buffer, filled.
    Data(AlignedBuf),
    /// A write, flush, discard or write-zeroes is done.
    Done,
}

/// Why a request failed; each maps to an errno for the frontend protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// Disk or replication failure.
    #[error("I/O error")]
    Io,
    /// Bad offset, length or alignment.
    #[error("invalid request")]
    Invalid,
    /// Writing to a volume that is not Primary.
    #[error("volume is read-only (not Primary)")]
    ReadOnly,
    /// The backing device is full (thin pool exhausted).
    #[error("no space left")]
    NoSpace,
    /// The volume is shutting down.
    #[error("volume is shutting down")]
    Shutdown,
    /// Too many requests in flight; the caller should retry later.
    #[error("too many requests in flight")]
    Busy,
}

impl BlockError {
    /// The positive errno value (as NBD and ublk report errors).
    pub fn errno(self) -> i32 {
        match self {
            BlockError::Io => libc::EIO,
            BlockError::Invalid => libc::EINVAL,
            BlockError::ReadOnly => libc::EPERM,
            BlockError::NoSpace => libc::ENOSPC,
            BlockError::Shutdown => libc::ESHUTDOWN,
            BlockError::Busy => libc::EAGAIN,
        }
    }
}

/// What a frontend needs to know about a target to advertise it (NBD: the export size,
/// the transmission flags and `NBD_INFO_BLOCK_SIZE`; ublk: its device parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetInfo {
    /// Exported size, bytes (a multiple of 512).
    pub size_bytes: u64,
    /// Whether writes are accepted (Primary).
    pub writable: bool,
    /// Alignment of every offset and length, bytes: a power of two, 512 or 4096.
    pub logical_block_size: u32,
    /// The unit a write should cover to avoid a read-modify-write below, bytes: a power
    /// of two ≥ the logical block size.
    pub physical_block_size: u32,
    /// Largest READ or WRITE accepted, bytes (a multiple of the logical block size).
    pub max_io_bytes: u32,
    /// The unit a discard can deallocate, bytes (a hint; any aligned range is accepted).
    pub discard_granularity: u32,
    /// Largest discard accepted in one request, bytes; 0: no discard.
    pub max_discard_bytes: u64,
    /// Largest write-zeroes accepted in one request, bytes; 0: no write-zeroes.
    pub max_write_zeroes_bytes: u64,
    /// Completed writes may sit in a volatile cache: a flush is needed to make them
    /// durable (the frontend advertises and passes flushes).
    pub volatile_cache: bool,
    /// Writes with `fua` are durable on completion (the frontend advertises FUA).
    pub fua: bool,
}

impl TargetInfo {
    /// A writable or read-only target of `size_bytes` with 512-byte logical and 4096-byte
    /// physical blocks, 32 MiB READ/WRITEs, unlimited discard and write-zeroes (up to
    /// `size_bytes`), a volatile cache and FUA: what a simple in-memory target is.
    pub fn simple(size_bytes: u64, writable: bool) -> Self {
        Self {
            size_bytes,
            writable,
            logical_block_size: 512,
            physical_block_size: 4096,
            max_io_bytes: MAX_IO_BYTES,
            discard_granularity: 4096,
            max_discard_bytes: u64::MAX,
            max_write_zeroes_bytes: u64::MAX,
            volatile_cache: true,
            fua: true,
        }
    }
}

/// A block device a frontend can serve.
///
/// Many requests may be in flight at once and complete in any order. The future of
/// [`BlockTarget::submit`] must not need the caller's runtime: no `tokio::spawn`, no tokio
/// timer, no runtime context on the polling thread (a ublk queue thread polls it with its
/// own executor; NBD awaits it inside its connection task).
pub trait BlockTarget: Send + Sync + 'static {
    /// Size, limits and capabilities, read at each client handshake.
    fn info(&self) -> TargetInfo;
    /// Serve one request. A request over the limits of [`TargetInfo`] or not aligned to
    /// its logical block size may be refused with [`BlockError::Invalid`].
    fn submit(
        &self,
        req: BlockRequest,
    ) -> impl Future<Output = Result<BlockReply, BlockError>> + Send;
    /// The registry a frontend registers its writers with (the volume refuses to demote
    /// while it is not empty); `None`: the target does not track them.
    fn openers(&self) -> Option<Arc<Openers>> {
        None
    }
}
