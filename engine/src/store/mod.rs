//! Backing storage: one backing device (regular file or block device) driven by io_uring.
//!
//! Design (numbers are the bounds):
//! - [`Store::open`] opens the path `O_RDWR | O_DIRECT | O_CLOEXEC`, learns its kind
//!   (`fstat`), size (`st_size` / `BLKGETSIZE64`) and logical block size (`BLKSSZGET`;
//!   for files the smallest O_DIRECT read that works, 512 or 4096) — see `device.rs`.
//! - One dedicated IO thread per store owns the `IoUring` (`queue_depth + 1` SQ entries,
//!   `queue_depth` ∈ 1..=4096, default 128) — see `ring.rs`. Handles send requests over a
//!   bounded `sync_channel(queue_depth)` after taking one of `queue_depth` semaphore
//!   permits, so at most `queue_depth` requests are queued or in flight per store and a
//!   full queue makes callers wait asynchronously instead of blocking a tokio worker.
//! - The thread wakes on completions and on new requests alike: an `IORING_OP_READ` on
//!   an eventfd is always armed; submitters write the eventfd only when the thread
//!   announced it may sleep (one write per sleep, not per request).
//! - Buffers belong to the in-flight op until its CQE is reaped; dropping a caller's
//!   future never frees memory the kernel still uses.
//! - Every op is validated (aligned to the logical block size, inside the device, data
//!   length ≤ 32 MiB) and refused with [`StoreError::Invalid`] before submission. Short
//!   transfers are resubmitted for the remainder at most 4 times, then fail as
//!   [`StoreError::Short`]; kernel errors keep their errno ([`StoreError::NoSpace`] for
//!   ENOSPC/EDQUOT, [`StoreError::Io`] for EIO, …).
//! - Discard / write-zeroes use `IORING_OP_FALLOCATE` (`PUNCH_HOLE`/`ZERO_RANGE` with
//!   `KEEP_SIZE`); on block devices `EOPNOTSUPP` falls back to `BLKDISCARD` /
//!   `BLKZEROOUT` on one helper thread per store (started on first need, bounded by the
//!   same permits), because those ioctls block.
//! - Close (explicit or last handle dropped) finishes queued and in-flight ops, joins the
//!   helper, reaps the eventfd read, then frees the ring; waiting is bounded by
//!   [`CLOSE_TIMEOUT`] (30 s), after which the thread is detached, never killed.
//!
//! Cost, measured with `store::tests::bench_4k_randwrite` (ignored test, release build)
//! against `fio --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k` on the same
//! preallocated 1 GiB file on ext4/virtio, 2 vCPUs shared with other jobs (load 3–8, so
//! ranges, interleaved runs): QD1 p50 64–98 µs vs fio 54–89 µs (about +10–20 µs: two
//! thread wake-ups per op, caller→IO thread and IO thread→task; ~1.7 context switches per
//! op vs fio's 1); QD32 21–48 k IOPS vs fio 18–65 k (0.7–1.1×). CPU per op: QD1 30–50 µs
//! vs 24–36 µs, QD32 8.5–18 µs vs 7–11 µs. `IORING_SETUP_COOP_TASKRUN|SINGLE_ISSUER`
//! (and `DEFER_TASKRUN`) showed no difference above that noise, so the ring uses none.

mod buf;
mod device;
mod error;
mod handle;
mod ring;

#[cfg(test)]
mod tests;

pub use buf::{AlignedBuf, BufError, BUF_ALIGN, MAX_BUF_LEN, SECTOR_SIZE};
pub use device::{DeviceKind, StoreInfo};
pub use error::{StoreError, StoreOp};
pub use handle::{Store, StoreOptions, CLOSE_TIMEOUT, DEFAULT_QUEUE_DEPTH, MAX_QUEUE_DEPTH};
