//! Frontends: how applications reach a volume.
//!
//! A frontend (NBD now, ublk later) turns its own requests into [`BlockIo`] and hands them
//! to a [`BlockTarget`] — the replicated volume in the daemon, an in-memory target in
//! frontend tests. The target owns replication semantics (docs/design.md §3); the frontend only
//! owns its protocol, its sockets and its bounds (in-flight requests per connection).
//!
//! A frontend registers every client that has the target open for writing with the
//! target's [`Openers`] (DRBD's open count), so that `secondary` can refuse while the
//! device is held open.
//!
//! Offsets and lengths are bytes, multiples of [`crate::store::SECTOR_SIZE`]; a frontend
//! refuses unaligned requests with `EINVAL` before they reach the target.

pub mod nbd;
pub mod openers;

pub use openers::{OpenGuard, Openers};

use crate::store::AlignedBuf;
use std::future::Future;
use std::sync::Arc;

/// One block request.
#[derive(Debug)]
pub enum BlockIo {
    /// Read `len` bytes at `offset`.
    Read { offset: u64, len: u32 },
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

/// A successful completion.
#[derive(Debug)]
pub enum BlockReply {
    /// The data of a read.
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

/// What a frontend needs to know about a target to advertise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetInfo {
    /// Exported size, bytes (a multiple of 512).
    pub size_bytes: u64,
    /// Whether writes are accepted (Primary).
    pub writable: bool,
    /// Whether discard / write-zeroes are supported.
    pub discard: bool,
}

/// A block device a frontend can serve.
pub trait BlockTarget: Send + Sync + 'static {
    /// Size and capabilities, read at each client handshake.
    fn info(&self) -> TargetInfo;
    /// Serve one request; many may be in flight at once and complete in any order.
    fn submit(&self, io: BlockIo) -> impl Future<Output = Result<BlockReply, BlockError>> + Send;
    /// The registry a frontend registers its writers with (the volume refuses to demote
    /// while it is not empty); `None`: the target does not track them.
    fn openers(&self) -> Option<Arc<Openers>> {
        None
    }
}
