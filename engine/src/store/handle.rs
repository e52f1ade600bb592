//! [`Store`]: the cheap, cloneable handle callers use.
//!
//! It validates every request against the device (alignment to the logical block size,
//! inside the device, data length ≤ [`MAX_BUF_LEN`]) before anything is queued, takes one
//! of `queue_depth` semaphore permits (async back-pressure: a full queue makes the caller
//! wait, never blocks a tokio worker), submits the request to the ring from the calling
//! task and awaits a `tokio::sync::oneshot` that the ring's reaper completes.
//!
//! [`Store::submit_to`] is the path without a future: an op ([`SinkOp`]: read, write,
//! flush, discard, write-zeroes — their fallback chains included — or a no-op) whose
//! result the reaper hands to a [`Completions`] sink the caller registered, a read's with
//! its filled buffer (no task, no `oneshot`, no allocation per op). It takes a permit
//! without waiting; when all `queue_depth` are taken it falls back to one task per such
//! op that waits for a permit, then submits (the callers bound how many ops they have
//! outstanding, so those tasks are bounded too: the volume's by its table,
//! `volume/io.rs`). Closing (explicit or by dropping the last handle) waits at most
//! [`CLOSE_TIMEOUT`] for the in-flight ops.

use super::buf::{AlignedBuf, MAX_BUF_LEN};
use super::device::{self, DeviceKind, RangeIoctl, StoreInfo};
use super::error::{StoreError, StoreOp};
use super::ring::{Completions, Done, Envelope, Reply, Request, Ring, Step, WriteData};
use std::fmt;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, Semaphore, TryAcquireError};

/// Default ring size and in-flight bound.
pub const DEFAULT_QUEUE_DEPTH: u32 = 128;
/// Largest accepted `queue_depth`.
pub const MAX_QUEUE_DEPTH: u32 = 4096;
/// How long closing waits for in-flight ops. Ops still in flight after that stay owned by
/// the ring (the reaper task, if alive, still completes them); a ring dropped with ops in
/// flight leaks their buffers rather than free memory the kernel may still write.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

// Fallback chains, tried in order while a step fails with EOPNOTSUPP. On block devices
// PUNCH_HOLE is a write-zeroes that may unmap (kernel ≥ 4.9) and ZERO_RANGE one that
// may not; the ioctls run off the ring because they block.
const FILE_DISCARD: &[Step] = &[Step::Fallocate(PUNCH)];
const FILE_ZERO_UNMAP: &[Step] = &[Step::Fallocate(PUNCH), Step::Fallocate(ZERO)];
const FILE_ZERO: &[Step] = &[Step::Fallocate(ZERO)];
const BLK_DISCARD: &[Step] = &[Step::Fallocate(PUNCH), Step::Ioctl(RangeIoctl::Discard)];
const BLK_ZERO_UNMAP: &[Step] = &[
    Step::Fallocate(PUNCH),
    Step::Fallocate(ZERO),
    Step::Ioctl(RangeIoctl::ZeroOut),
];
const BLK_ZERO: &[Step] = &[Step::Fallocate(ZERO), Step::Ioctl(RangeIoctl::ZeroOut)];

/// An op whose result goes to a [`Completions`] sink ([`Store::submit_to`]): a read's to
/// [`Completions::read_done`] with its buffer, every other's to [`Completions::done`].
#[derive(Debug)]
pub enum SinkOp {
    /// Write `data` at `offset` (`RWF_DSYNC` with `fua`).
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes; an owned buffer is freed (or pooled) when the op ends.
        data: WriteData,
        /// Durable on completion.
        fua: bool,
    },
    /// `fdatasync`.
    Flush,
    /// Read `buf.len()` bytes at `offset` into `buf`, handed back filled (as
    /// [`Store::read_into`]).
    Read {
        /// Byte offset.
        offset: u64,
        /// Where the bytes go; dropped if the read fails.
        buf: AlignedBuf,
    },
    /// Discard `len` bytes at `offset` (as [`Store::discard`], its fallback chain
    /// included).
    Discard {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Make `len` bytes at `offset` read as zeroes (as [`Store::write_zeroes`]).
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// The range may be deallocated.
        may_unmap: bool,
    },
    /// No IO (`IORING_OP_NOP`): its `Ok(())` reaches the sink from the reaper, like any
    /// completion — a result the caller has without IO, delivered later and off its
    /// own stack, without a task.
    Nop,
}

/// How to open a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Create a regular file of this size if the path does not exist. An existing file or
    /// device is never truncated or grown; if it is smaller, `open` fails with
    /// [`StoreError::TooSmall`]. Must be a non-zero multiple of 512.
    pub create_size_bytes: Option<u64>,
    /// Ring entries and the bound on requests queued or in flight, 1..=4096.
    pub queue_depth: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            create_size_bytes: None,
            queue_depth: DEFAULT_QUEUE_DEPTH,
        }
    }
}

/// A backing device driven by io_uring. Clones share the device; it is closed when
/// [`Store::close`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    info: StoreInfo,
    file: Arc<File>,
    ring: Arc<Ring>,
    permits: Arc<Semaphore>,
    #[cfg(test)]
    queue_depth: usize,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("info", &self.inner.info)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Store {
    /// Open `path` (a regular file or a block device) `O_RDWR | O_DIRECT | O_CLOEXEC` and
    /// set up its ring. May be called outside a runtime. The IO methods' futures need no
    /// runtime context, but their completions arrive through a tokio runtime: the
    /// current one, or the one given to [`Store::set_runtime`].
    pub fn open(path: impl AsRef<Path>, options: &StoreOptions) -> Result<Store, StoreError> {
        let qd = options.queue_depth;
        if !(1..=MAX_QUEUE_DEPTH).contains(&qd) {
            return Err(StoreError::invalid(
                StoreOp::Open,
                format!("queue_depth {qd} is outside 1..={MAX_QUEUE_DEPTH}"),
            ));
        }
        let (file, info) = device::open_device(path.as_ref(), options.create_size_bytes)?;
        let file = Arc::new(file);
        let ring = Arc::new(Ring::new(Arc::clone(&file), qd).map_err(StoreError::Setup)?);
        Ok(Store {
            inner: Arc::new(Inner {
                info,
                file,
                ring,
                permits: Arc::new(Semaphore::new(qd as usize)),
                #[cfg(test)]
                queue_depth: qd as usize,
            }),
        })
    }

    /// Path, kind, size and logical block size of the device.
    pub fn info(&self) -> &StoreInfo {
        &self.inner.info
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.inner.info.size_bytes
    }

    /// The alignment every offset and length must have, bytes.
    pub fn logical_block_size(&self) -> u32 {
        self.inner.info.logical_block_size
    }

    /// The device's physical block size, bytes (see [`StoreInfo::physical_block_size`]).
    pub fn physical_block_size(&self) -> u32 {
        self.inner.info.physical_block_size
    }

    /// The runtime whose epoll watches this store's completions when an op is submitted
    /// from a thread outside any tokio runtime (a ublk queue thread). Without it such an
    /// op waits for a runtime thread to start the reaper; inside a runtime the current
    /// one is used. The first call wins.
    pub fn set_runtime(&self, rt: &tokio::runtime::Handle) {
        self.inner.ring.set_home(rt);
    }

    /// File or block device.
    pub fn kind(&self) -> DeviceKind {
        self.inner.info.kind
    }

    /// Whether [`Store::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.ring.closed.load(Ordering::SeqCst)
    }

    /// Read `len` bytes at `offset` into a new buffer.
    pub async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, StoreError> {
        self.check_data(StoreOp::Read, offset, len)?;
        self.read_into(offset, AlignedBuf::new(len)?).await
    }

    /// Read `buf.len()` bytes at `offset` into the caller's `buf` (no allocation) and
    /// give it back filled. The buffer belongs to the op until it completes; on an error
    /// it is dropped.
    pub async fn read_into(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, StoreError> {
        self.check_data(StoreOp::Read, offset, buf.len())?;
        self.call(|done| Request::Read {
            offset,
            buf,
            done: Reply::Waiter(done),
        })
        .await
    }

    /// Write `data` at `offset`; with `fua` the data is durable when this returns
    /// (`RWF_DSYNC`). The store keeps a reference to `data` until the kernel is done.
    pub async fn write(
        &self,
        offset: u64,
        data: Arc<AlignedBuf>,
        fua: bool,
    ) -> Result<(), StoreError> {
        self.check_data(StoreOp::Write, offset, data.len())?;
        self.call(|done| Request::Write {
            offset,
            buf: WriteData::Shared(data),
            fua,
            done: Reply::Waiter(done),
        })
        .await
    }

    /// Make every write completed before this call durable (`fdatasync` semantics).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(|done| Request::Flush {
            done: Reply::Waiter(done),
        })
        .await
    }

    /// Submit `op` now, from this thread, without a future: its result goes to
    /// `sink.done(token, …)` (`sink.read_done(token, …)` for a read) exactly once, on the
    /// thread that reaps it (see [`Completions`]). With no free permit the op waits for
    /// one in a task of the current (or the home, [`Store::set_runtime`]) runtime. An
    /// `Err` (invalid request, store closed, no runtime to wait in) means the op was not
    /// taken and the sink will not be called for it.
    pub fn submit_to(
        &self,
        op: SinkOp,
        sink: &Arc<dyn Completions>,
        token: u64,
    ) -> Result<(), StoreError> {
        self.check_open()?;
        let req = self.sink_request(op, Arc::clone(sink), token)?;
        match Arc::clone(&self.inner.permits).try_acquire_owned() {
            Ok(permit) => self
                .inner
                .ring
                .submit(Envelope { req, permit })
                .map_err(|_| StoreError::Closed),
            Err(TryAcquireError::Closed) => Err(StoreError::Closed),
            Err(TryAcquireError::NoPermits) => {
                let rt = self.inner.ring.runtime().ok_or(StoreError::Closed)?;
                let store = self.clone();
                rt.spawn(async move { store.submit_when_free(req).await });
                Ok(())
            }
        }
    }

    /// The request of a sink op, validated as its awaited form is.
    fn sink_request(
        &self,
        op: SinkOp,
        sink: Arc<dyn Completions>,
        token: u64,
    ) -> Result<Request, StoreError> {
        Ok(match op {
            SinkOp::Write { offset, data, fua } => {
                self.check_data(StoreOp::Write, offset, data.len())?;
                Request::Write {
                    offset,
                    buf: data,
                    fua,
                    done: Reply::Sink(sink, token),
                }
            }
            SinkOp::Flush => Request::Flush {
                done: Reply::Sink(sink, token),
            },
            SinkOp::Nop => Request::Nop {
                done: Reply::Sink(sink, token),
            },
            SinkOp::Read { offset, buf } => {
                self.check_data(StoreOp::Read, offset, buf.len())?;
                Request::Read {
                    offset,
                    buf,
                    done: Reply::Sink(sink, token),
                }
            }
            SinkOp::Discard { offset, len } => {
                self.check_range(StoreOp::Discard, offset, len)?;
                Request::Range {
                    op: StoreOp::Discard,
                    offset,
                    len,
                    steps: self.discard_steps(),
                    done: Reply::Sink(sink, token),
                }
            }
            SinkOp::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => {
                self.check_range(StoreOp::WriteZeroes, offset, len)?;
                Request::Range {
                    op: StoreOp::WriteZeroes,
                    offset,
                    len,
                    steps: self.zero_steps(may_unmap),
                    done: Reply::Sink(sink, token),
                }
            }
        })
    }

    /// Test hook: every SQE push of the ring fails (`on`) or works again.
    #[cfg(test)]
    pub(crate) fn refuse_pushes(&self, on: bool) {
        self.inner.ring.refuse_pushes(on);
    }

    /// Ops queued or in flight (permits taken).
    #[cfg(test)]
    pub(crate) fn ops_in_flight(&self) -> usize {
        self.inner.queue_depth - self.inner.permits.available_permits()
    }

    /// The queue-full fallback of [`Store::submit_to`]: waits for a permit, then submits.
    async fn submit_when_free(&self, req: Request) {
        let Ok(permit) = Arc::clone(&self.inner.permits).acquire_owned().await else {
            return req.fail(StoreError::Closed);
        };
        if let Err(env) = self.inner.ring.submit(Envelope { req, permit }) {
            env.req.fail(StoreError::Closed);
        }
    }

    /// Discard `len` bytes at `offset`. On files the range reads as zeroes afterwards
    /// (punch hole); on block devices it does when the device supports write-zeroes with
    /// unmap, otherwise `BLKDISCARD` is used and the content is unspecified.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.range(StoreOp::Discard, offset, len, self.discard_steps())
            .await
    }

    fn discard_steps(&self) -> &'static [Step] {
        match self.kind() {
            DeviceKind::File => FILE_DISCARD,
            DeviceKind::BlockDevice => BLK_DISCARD,
        }
    }

    /// Make `len` bytes at `offset` read as zeroes; `may_unmap` lets the range be
    /// deallocated (punch hole) instead of kept allocated (zero range).
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), StoreError> {
        let steps = self.zero_steps(may_unmap);
        self.range(StoreOp::WriteZeroes, offset, len, steps).await
    }

    fn zero_steps(&self, may_unmap: bool) -> &'static [Step] {
        match (self.kind(), may_unmap) {
            (DeviceKind::File, true) => FILE_ZERO_UNMAP,
            (DeviceKind::File, false) => FILE_ZERO,
            (DeviceKind::BlockDevice, true) => BLK_ZERO_UNMAP,
            (DeviceKind::BlockDevice, false) => BLK_ZERO,
        }
    }

    /// Whether the range is a hole of a regular file (reads as zeroes): resync answers
    /// it without reading. Always `false` for block devices (thin LVs report nothing
    /// through `SEEK_DATA`; their zeroes are found by reading).
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.inner.info.kind == DeviceKind::File && device::is_hole(&self.inner.file, offset, len)
    }

    /// Blocking `pread` of `len` bytes at `offset` on the same O_DIRECT fd (start-up
    /// metadata; do not call from an async task on a hot path).
    pub fn read_blocking(&self, offset: u64, len: usize) -> Result<AlignedBuf, StoreError> {
        self.check_open()?;
        self.check_data(StoreOp::Read, offset, len)?;
        let mut buf = AlignedBuf::new(len)?;
        device::pread_full(&self.inner.file, &mut buf, offset)?;
        Ok(buf)
    }

    /// Blocking `pwritev2` of `data` at `offset` (`RWF_DSYNC` when `fua`).
    pub fn write_blocking(
        &self,
        offset: u64,
        data: &AlignedBuf,
        fua: bool,
    ) -> Result<(), StoreError> {
        self.check_open()?;
        self.check_data(StoreOp::Write, offset, data.len())?;
        device::pwrite_full(&self.inner.file, data, offset, fua)
    }

    /// Blocking `fdatasync`.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.check_open()?;
        device::fdatasync(&self.inner.file)
    }

    /// Stop accepting requests and wait (at most [`CLOSE_TIMEOUT`]) for the ops in
    /// flight to finish. Blocks the calling thread. Later calls on any clone
    /// return [`StoreError::Closed`]. Idempotent; a concurrent second call returns
    /// without waiting.
    pub fn close(&self) {
        self.inner.close();
    }

    #[cfg(test)]
    pub(crate) async fn range_ioctl_for_test(
        &self,
        which: RangeIoctl,
        offset: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        const DISCARD: &[Step] = &[Step::Ioctl(RangeIoctl::Discard)];
        const ZEROOUT: &[Step] = &[Step::Ioctl(RangeIoctl::ZeroOut)];
        let (op, steps) = match which {
            RangeIoctl::Discard => (StoreOp::Discard, DISCARD),
            RangeIoctl::ZeroOut => (StoreOp::WriteZeroes, ZEROOUT),
        };
        self.range(op, offset, len, steps).await
    }

    async fn range(
        &self,
        op: StoreOp,
        offset: u64,
        len: u64,
        steps: &'static [Step],
    ) -> Result<(), StoreError> {
        self.check_range(op, offset, len)?;
        self.call(|done| Request::Range {
            op,
            offset,
            len,
            steps,
            done: Reply::Waiter(done),
        })
        .await
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.is_closed() {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    fn check_data(&self, op: StoreOp, offset: u64, len: usize) -> Result<(), StoreError> {
        if len > MAX_BUF_LEN {
            return Err(StoreError::invalid(
                op,
                format!("length {len} is above the {MAX_BUF_LEN}-byte limit"),
            ));
        }
        self.check_range(op, offset, len as u64)
    }

    fn check_range(&self, op: StoreOp, offset: u64, len: u64) -> Result<(), StoreError> {
        let lbs = u64::from(self.inner.info.logical_block_size);
        let size = self.inner.info.size_bytes;
        if len == 0 {
            return Err(StoreError::invalid(op, "length 0"));
        }
        if !offset.is_multiple_of(lbs) || !len.is_multiple_of(lbs) {
            return Err(StoreError::invalid(
                op,
                format!(
                    "offset {offset} or length {len} is not a multiple of the {lbs}-byte \
                     logical block"
                ),
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(StoreError::invalid(
                op,
                format!("range {offset}+{len} is beyond the {size}-byte device"),
            )),
        }
    }

    /// Queue one request and await its completion.
    async fn call<T>(&self, build: impl FnOnce(Done<T>) -> Request) -> Result<T, StoreError> {
        self.check_open()?;
        let permit = Arc::clone(&self.inner.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let (done, result) = oneshot::channel();
        let env = Envelope {
            req: build(done),
            permit,
        };
        if self.inner.ring.submit(env).is_err() {
            return Err(StoreError::Closed);
        }
        // The ring drops the sender without sending only when it is dropped itself.
        result.await.map_err(|_| StoreError::Closed)?
    }
}

impl Inner {
    fn close(&self) {
        if self.ring.closed.load(Ordering::SeqCst) {
            return;
        }
        self.permits.close();
        if !self.ring.close(CLOSE_TIMEOUT) {
            tracing::warn!(
                path = %self.info.path.display(),
                timeout_s = CLOSE_TIMEOUT.as_secs(),
                "store still has ops in flight after close; leaving them to the ring"
            );
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.close();
    }
}
