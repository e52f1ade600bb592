//! Errors of the backing store.
//!
//! Every failure the kernel reports keeps its errno, so callers can tell "the thin pool is
//! full" ([`StoreError::NoSpace`]) from "the disk failed" ([`StoreError::Io`]) from "this
//! device cannot do that" ([`StoreError::Unsupported`]); requests that are wrong before
//! they reach the kernel are [`StoreError::Invalid`] and are never submitted.

use super::buf::BufError;
use std::fmt;
use std::path::PathBuf;

/// Which store operation an error belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOp {
    /// Opening or probing the backing device.
    Open,
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// A cache flush (fdatasync).
    Flush,
    /// A discard (punch hole / BLKDISCARD).
    Discard,
    /// A write-zeroes (zero range / BLKZEROOUT).
    WriteZeroes,
    /// A no-op (`IORING_OP_NOP`, [`crate::store::SinkOp::Nop`]).
    Nop,
}

impl fmt::Display for StoreOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreOp::Open => "open",
            StoreOp::Read => "read",
            StoreOp::Write => "write",
            StoreOp::Flush => "flush",
            StoreOp::Discard => "discard",
            StoreOp::WriteZeroes => "write-zeroes",
            StoreOp::Nop => "no-op",
        })
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request is malformed for this device (unaligned, out of range, too long); it was
    /// not submitted and the store is unaffected.
    #[error("invalid {op} request: {reason}")]
    Invalid {
        /// The operation.
        op: StoreOp,
        /// What is wrong with it.
        reason: String,
    },
    /// The device has no space left (`ENOSPC`, `EDQUOT`): a full file system or thin pool.
    #[error("{op}: no space left on the backing device ({})", errno_text(*.errno))]
    NoSpace {
        /// The operation.
        op: StoreOp,
        /// The errno the kernel returned.
        errno: i32,
    },
    /// The device does not support the operation (`EOPNOTSUPP`), after every fallback.
    #[error("{op}: not supported by the backing device ({})", errno_text(*.errno))]
    Unsupported {
        /// The operation.
        op: StoreOp,
        /// The errno the kernel returned.
        errno: i32,
    },
    /// Any other kernel error (`EIO` above all).
    #[error("{op}: I/O error on the backing device ({})", errno_text(*.errno))]
    Io {
        /// The operation.
        op: StoreOp,
        /// The errno the kernel returned.
        errno: i32,
    },
    /// A read or write kept transferring less than asked (or nothing) within the retry bound.
    #[error("{op}: short transfer, {done} of {len} bytes after {attempts} attempts")]
    Short {
        /// The operation.
        op: StoreOp,
        /// Bytes transferred.
        done: usize,
        /// Bytes asked for.
        len: usize,
        /// Submissions made.
        attempts: u32,
    },
    /// The store was closed (or its IO thread is gone); the request was not done.
    #[error("the store is closed")]
    Closed,
    /// The backing path could not be opened or created.
    #[error("cannot open backing device {}: {source}", .path.display())]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An existing backing device is smaller than `create_size_bytes`.
    #[error(
        "backing device {} is {size} bytes, smaller than the {wanted} bytes asked for",
        .path.display()
    )]
    TooSmall {
        /// The path.
        path: PathBuf,
        /// Its size, bytes.
        size: u64,
        /// The size asked for, bytes.
        wanted: u64,
    },
    /// The backing path is not usable (wrong file type, size, block size, no O_DIRECT).
    #[error("backing device {} is unusable: {reason}", .path.display())]
    BadDevice {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The IO thread or its ring could not be set up.
    #[error("cannot start the store's io_uring thread: {0}")]
    Setup(std::io::Error),
    /// An IO buffer could not be allocated.
    #[error(transparent)]
    Buf(#[from] BufError),
}

impl StoreError {
    /// The error for a negative io_uring result or a failed syscall's errno.
    pub(crate) fn from_errno(op: StoreOp, errno: i32) -> Self {
        match errno {
            libc::ENOSPC | libc::EDQUOT => StoreError::NoSpace { op, errno },
            libc::EOPNOTSUPP => StoreError::Unsupported { op, errno },
            _ => StoreError::Io { op, errno },
        }
    }

    pub(crate) fn invalid(op: StoreOp, reason: impl Into<String>) -> Self {
        StoreError::Invalid {
            op,
            reason: reason.into(),
        }
    }

    /// The errno the kernel reported, when the failure came from the kernel.
    pub fn errno(&self) -> Option<i32> {
        match self {
            StoreError::NoSpace { errno, .. }
            | StoreError::Unsupported { errno, .. }
            | StoreError::Io { errno, .. } => Some(*errno),
            StoreError::Open { source, .. } | StoreError::Setup(source) => source.raw_os_error(),
            StoreError::Invalid { .. } => Some(libc::EINVAL),
            StoreError::Short { .. } => Some(libc::EIO),
            StoreError::Closed
            | StoreError::TooSmall { .. }
            | StoreError::BadDevice { .. }
            | StoreError::Buf(_) => None,
        }
    }
}

fn errno_text(errno: i32) -> String {
    format!(
        "errno {errno}: {}",
        std::io::Error::from_raw_os_error(errno)
    )
}
