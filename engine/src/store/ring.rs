//! The store's ring: submitted from the caller's task, reaped inside the tokio runtime.
//!
//! Submission: `Ring::submit` locks the ring (a `std::sync::Mutex` held for the push and
//! one `io_uring_enter`, no await inside), parks the op in a free slot and submits it, so
//! the kernel starts the IO in the caller's own thread — no hand-off to another thread.
//! Each op carries one of `queue_depth` semaphore permits (taken by the handle before it
//! locks), so ops in the ring + on the ioctl helper never exceed `queue_depth`, the SQ
//! (`queue_depth` entries) never overflows and the CQ (twice that) cannot either.
//!
//! Completion: an eventfd is registered with the ring (`IORING_REGISTER_EVENTFD`), so
//! the kernel signals it for every CQE. One reaper task per store (started in the
//! caller's runtime by the first submit — or in the store's home runtime when the caller
//! is a thread outside any runtime, such as a ublk queue thread — restarted if that
//! runtime dropped it) waits on
//! it through `tokio::io::unix::AsyncFd`, i.e. tokio's own epoll: a completion wakes a
//! runtime worker exactly as a readable socket does, the reaper drains the CQ under the
//! lock, then releases it and delivers each result: a caller's `oneshot`, which
//! schedules the caller's task on that same worker, or a [`Completions`] sink, called
//! right there (it may lock its owner and submit again: nothing holds the ring's lock).
//! Results wait for delivery in a list of `queue_depth` places (two such lists swap, so
//! delivering allocates nothing). Per op that is one wake-up (the completion), where
//! the former dedicated IO thread cost three (caller → IO thread, completion → IO thread,
//! IO thread → worker).
//!
//! Ownership: an op's buffer (`AlignedBuf` for reads; for writes an `Arc<AlignedBuf>`
//! shared with others, or an `AlignedBuf` the op owns, `WriteData`) lives
//! in the slot `slots[user_data]` from the SQE push until its CQE is reaped; a caller that
//! dropped its future only loses the result. Short transfers are resubmitted for the rest
//! at most [`MAX_SHORT_RETRIES`] times, `EINTR`/`EAGAIN` likewise; `EOPNOTSUPP` on a
//! fallocate moves to the next step of the op's fallback chain, whose `BLKDISCARD` /
//! `BLKZEROOUT` steps run on a helper thread (spawned on first need, channel bounded by
//! the same permits) because those ioctls block.
//!
//! Shutdown: `Ring::close` sets `closed` under the lock (later submits are refused), then
//! reaps by itself — `io_uring_enter` waits of at most 10 ms, bounded in total by the
//! caller's timeout — so it works even when no runtime runs the reaper any more; then it
//! joins the helper and wakes the reaper so it ends. The ring and the buffers are freed
//! only when nothing is in flight; otherwise the buffers are leaked, never freed early.

use super::buf::AlignedBuf;
use super::device::{range_ioctl, RangeIoctl, MAX_SHORT_RETRIES};
use super::error::{StoreError, StoreOp};
use io_uring::{opcode, squeue, types, IoUring};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

/// Where an awaited op's result goes.
pub(crate) type Done<T> = oneshot::Sender<Result<T, StoreError>>;

/// Receives the results of ops submitted with a sink ([`crate::store::Store::submit_to`]).
/// Registered once by its owner (an `Arc` clone per op, no allocation) and called once
/// per op with the token the op was submitted with — `read_done` for a read (with the
/// filled buffer), `done` for every other op — on the thread that reaped it (the reaper
/// task's runtime worker; the ioctl helper thread for a `BLKDISCARD` / `BLKZEROOUT`
/// step; the closing thread in `Store::close`) — never under the ring's lock, so it may
/// submit again.
pub trait Completions: Send + Sync {
    /// Op `token` (a write, flush, discard, write-zeroes or no-op) ended with `result`.
    fn done(&self, token: u64, result: Result<(), StoreError>);
    /// Read `token` ended: its buffer, filled, or why it failed (the buffer is dropped).
    fn read_done(&self, token: u64, result: Result<AlignedBuf, StoreError>);
}

/// What an op hands back: nothing, or a read's buffer; each goes to its own sink call.
pub(crate) trait SinkResult: Sized {
    fn to_sink(sink: &dyn Completions, token: u64, result: Result<Self, StoreError>);
}

impl SinkResult for () {
    fn to_sink(sink: &dyn Completions, token: u64, result: Result<(), StoreError>) {
        sink.done(token, result);
    }
}

impl SinkResult for AlignedBuf {
    fn to_sink(sink: &dyn Completions, token: u64, result: Result<AlignedBuf, StoreError>) {
        sink.read_done(token, result);
    }
}

/// Where an op's result goes: a waiting caller, or a sink.
pub(crate) enum Reply<T = ()> {
    Waiter(Done<T>),
    Sink(Arc<dyn Completions>, u64),
}

impl<T: SinkResult> Reply<T> {
    fn send(self, result: Result<T, StoreError>) {
        match self {
            // A send error means the caller dropped its future: nothing to do.
            Reply::Waiter(tx) => {
                let _ = tx.send(result);
            }
            Reply::Sink(sink, token) => T::to_sink(&*sink, token, result),
        }
    }
}

/// A write's data: shared with other users (the peer's send queue) or the op's own
/// (freed, or given back to its pool, when the op ends).
#[derive(Debug)]
pub enum WriteData {
    /// Shared read-only.
    Shared(Arc<AlignedBuf>),
    /// Owned by the op.
    Owned(AlignedBuf),
}

impl std::ops::Deref for WriteData {
    type Target = AlignedBuf;
    fn deref(&self) -> &AlignedBuf {
        match self {
            WriteData::Shared(b) => b,
            WriteData::Owned(b) => b,
        }
    }
}

/// An op's result waiting to be delivered once the ring's lock is released.
enum Finished {
    Read(Reply<AlignedBuf>, Result<AlignedBuf, StoreError>),
    Other(Reply, Result<(), StoreError>),
}

impl Finished {
    fn deliver(self) {
        match self {
            Finished::Read(reply, r) => reply.send(r),
            Finished::Other(reply, r) => reply.send(r),
        }
    }
}

/// One step of a discard / write-zeroes fallback chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// `IORING_OP_FALLOCATE` with this mode.
    Fallocate(i32),
    /// A blocking ioctl on the helper thread.
    Ioctl(RangeIoctl),
}

/// A request as the ring receives it.
pub(crate) enum Request {
    Read {
        offset: u64,
        buf: AlignedBuf,
        done: Reply<AlignedBuf>,
    },
    Write {
        offset: u64,
        buf: WriteData,
        fua: bool,
        done: Reply,
    },
    Flush {
        done: Reply,
    },
    /// `IORING_OP_NOP`: no IO, completed through the reaper like any op.
    Nop {
        done: Reply,
    },
    /// Discard or write-zeroes: try `steps` in order while they fail with EOPNOTSUPP.
    Range {
        op: StoreOp,
        offset: u64,
        len: u64,
        steps: &'static [Step],
        done: Reply,
    },
}

impl Request {
    /// Ends a request that was never submitted with `err`.
    pub(crate) fn fail(self, err: StoreError) {
        match self {
            Request::Read { done, .. } => done.send(Err(err)),
            Request::Write { done, .. }
            | Request::Flush { done }
            | Request::Nop { done }
            | Request::Range { done, .. } => done.send(Err(err)),
        }
    }
}

/// A request and its share of the queue depth.
pub(crate) struct Envelope {
    pub(crate) req: Request,
    pub(crate) permit: OwnedSemaphorePermit,
}

/// A store's ring and everything that touches it; shared by the handles and the reaper
/// task. Field order matters: `worker` (which owns the `IoUring`) is dropped before the
/// eventfd registered with it.
pub(crate) struct Ring {
    worker: Mutex<Worker>,
    /// Registered with the ring (`IORING_REGISTER_EVENTFD`): the kernel signals it for
    /// every CQE. Non-blocking, so tokio's epoll can watch it.
    eventfd: OwnedFd,
    /// No new requests: in-flight ops finish, then the ring is freed.
    pub(crate) closed: AtomicBool,
    /// A reaper task is alive (cleared by the task itself when it ends, also when its
    /// runtime drops it).
    reaper: AtomicBool,
    /// Where a submit from a thread outside any runtime starts the reaper
    /// (`Store::set_runtime`).
    home: std::sync::OnceLock<tokio::runtime::Handle>,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .field("reaper", &self.reaper.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Ring {
    /// Set up a ring with `queue_depth` SQ entries (twice that in the CQ) for `file`.
    pub(crate) fn new(file: Arc<File>, queue_depth: u32) -> io::Result<Self> {
        // SAFETY: plain syscall with no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let eventfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let ring = IoUring::builder().build(queue_depth)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let qd = queue_depth as usize;
        Ok(Self {
            worker: Mutex::new(Worker {
                ring,
                file,
                queue_depth: qd,
                slots: (0..qd).map(|_| None).collect(),
                free: (0..qd).rev().collect(),
                in_ring: 0,
                helper: None,
                cqes: Vec::with_capacity(qd),
                finished: Vec::with_capacity(qd),
                spare: Vec::with_capacity(qd),
                #[cfg(test)]
                refuse_push: false,
            }),
            eventfd,
            closed: AtomicBool::new(false),
            reaper: AtomicBool::new(false),
            home: std::sync::OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Worker> {
        // A panic while holding the lock cannot leave a slot half-updated in a way that
        // frees a buffer early (slots are filled before the push, emptied after the CQE).
        self.worker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Submit `env` from the calling task or thread: push its SQE and `io_uring_enter`
    /// it, so the kernel starts the IO before this returns. The first call starts the
    /// reaper task in the current runtime, or from a thread outside any runtime in the
    /// home one (`set_home`). Refused with `Closed` after [`Ring::close`].
    pub(crate) fn submit(self: &Arc<Self>, env: Envelope) -> Result<(), Envelope> {
        if !self.reaper.load(Ordering::Acquire) {
            self.start_reaper();
        }
        let mut w = self.lock();
        // Checked under the lock: `close` sets it under the lock too, so nothing is
        // submitted after close started waiting for the ring to empty.
        if self.closed.load(Ordering::SeqCst) {
            return Err(env);
        }
        w.start(env);
        w.submit();
        // A request that failed at once (no free slot, a refused SQE push, no helper
        // thread: none happens in practice) is delivered by the reaper, which the kick
        // wakes, never from inside this call: a sink's completion never runs inside the
        // submit that started it (the volume relies on it, `volume/io.rs`).
        let failed_now = !w.finished.is_empty();
        drop(w);
        if failed_now {
            self.kick();
        }
        Ok(())
    }

    /// Releases the lock, then delivers the results that finished under it (a sink may
    /// submit again, which takes the lock). The list's memory is reused: two lists of
    /// `queue_depth` places swap, so a delivery allocates nothing.
    fn deliver(&self, mut w: MutexGuard<'_, Worker>) {
        if w.finished.is_empty() {
            return;
        }
        let spare = std::mem::take(&mut w.spare);
        let mut list = std::mem::replace(&mut w.finished, spare);
        drop(w);
        for f in list.drain(..) {
            f.deliver();
        }
        // Give the emptied list back as the spare, unless a concurrent delivery already
        // did (then this one is dropped; the worker keeps at most two lists).
        let mut w = self.lock();
        if w.spare.capacity() < list.capacity() {
            w.spare = list;
        }
    }

    /// Test hook: make every SQE push fail (`on`) or work again.
    #[cfg(test)]
    pub(crate) fn refuse_pushes(&self, on: bool) {
        self.lock().refuse_push = on;
    }

    /// The runtime the store's tasks run in: the caller's, or from a thread outside any
    /// runtime the one given to [`Ring::set_home`], if any.
    pub(crate) fn runtime(&self) -> Option<tokio::runtime::Handle> {
        tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| self.home.get().cloned())
    }

    /// The runtime a submit from outside any runtime starts the reaper in (the first
    /// call wins).
    pub(crate) fn set_home(&self, rt: &tokio::runtime::Handle) {
        let _ = self.home.set(rt.clone());
    }

    /// Start a reaper task in [`Ring::runtime`] unless one is alive.
    fn start_reaper(self: &Arc<Self>) {
        let Some(rt) = self.runtime() else {
            // `close` reaps what is in flight in any case.
            tracing::error!(
                "store used outside a tokio runtime and given none (Store::set_runtime); \
                 completions wait for close"
            );
            return;
        };
        if self
            .reaper
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            rt.spawn(reap_loop(Arc::clone(self)));
        }
    }

    /// Reap every CQE there is and submit what that resubmitted.
    fn reap_now(&self) {
        let mut w = self.lock();
        w.reap();
        w.submit();
        self.deliver(w);
    }

    /// Write the eventfd (wakes the reaper so it can notice `closed`).
    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one`, a live local, to the eventfd we own; an
        // eventfd write of 8 bytes is the documented interface. A failure (counter
        // overflow, impossible here) only costs a wake-up.
        let _ = unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    /// Reset the eventfd counter. Returns false if it was already zero.
    fn drain_eventfd(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into `v`, a live local, from the non-blocking eventfd we
        // own.
        let n = unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                std::ptr::from_mut(&mut v).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        n > 0
    }

    /// Stop taking requests and reap until nothing is in the kernel's hands, for at most
    /// `timeout`. Returns false on timeout (the ops left stay owned by their slots: the
    /// reaper, if alive, keeps reaping them, and a ring dropped with ops in flight leaks
    /// their buffers instead of freeing them).
    pub(crate) fn close(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        {
            let _w = self.lock();
            self.closed.store(true, Ordering::SeqCst);
        }
        let mut emptied = false;
        while Instant::now() < deadline {
            let mut w = self.lock();
            w.reap();
            w.submit();
            if w.in_ring == 0 {
                emptied = true;
                self.deliver(w);
                break;
            }
            // Wait (briefly, holding the lock: at most 10 ms of a reaper that wants it)
            // for the next CQE; the loop bounds the total.
            let ts = types::Timespec::new().nsec(10_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = w.ring.submitter().submit_with_args(1, &args);
            self.deliver(w);
        }
        // The helper finishes its queued ioctls and completes them itself.
        let helper = self.lock().helper.take();
        if let Some(h) = helper {
            drop(h.tx);
            let _ = h.handle.join();
        }
        // Let the reaper see `closed` and end.
        self.kick();
        emptied
    }
}

/// Lets tokio watch a ring's eventfd.
struct EventFd(Arc<Ring>);

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.eventfd.as_raw_fd()
    }
}

/// Clears `Ring::reaper` however the reaper ends (including its runtime dropping it).
struct ReaperAlive(Arc<Ring>);

impl Drop for ReaperAlive {
    fn drop(&mut self) {
        self.0.reaper.store(false, Ordering::Release);
    }
}

/// The reaper task: waits on the eventfd through tokio's own epoll, so a completion
/// wakes the worker like a readable socket would, and completes the callers' futures
/// from there (a wake-up on the same worker, no thread hop).
async fn reap_loop(ring: Arc<Ring>) {
    let alive = ReaperAlive(Arc::clone(&ring));
    // SAFETY: `EventFd` holds an `Arc<Ring>`, which owns the eventfd and closes it only
    // when the last `Arc` goes, i.e. after this `AsyncFd` (which holds one) is dropped;
    // `as_raw_fd` always returns that same descriptor.
    let registered =
        unsafe { AsyncFd::register_with_interest(EventFd(Arc::clone(&ring)), Interest::READABLE) };
    let afd = match registered {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the store ring's eventfd");
            return;
        }
    };
    loop {
        let Ok(mut guard) = afd.readable().await else {
            tracing::error!("store ring eventfd watch failed");
            break;
        };
        // Reset the counter, then forget the readiness: a CQE posted after the read
        // writes the eventfd again, which is a new edge for epoll.
        let signalled = ring.drain_eventfd();
        guard.clear_ready();
        if signalled {
            ring.reap_now();
        }
        if ring.closed.load(Ordering::SeqCst) && ring.lock().in_ring == 0 {
            break;
        }
    }
    drop(afd);
    drop(alive);
}
/// An op owned by the ring.
struct Slot {
    req: Request,
    permit: OwnedSemaphorePermit,
    /// Bytes already transferred (reads and writes).
    done_bytes: usize,
    /// Submissions after the first (short transfers, EINTR, EAGAIN).
    retries: u32,
    /// Index into the fallback chain (range ops).
    step: usize,
}

impl Slot {
    fn op(&self) -> StoreOp {
        match &self.req {
            Request::Read { .. } => StoreOp::Read,
            Request::Write { .. } => StoreOp::Write,
            Request::Flush { .. } => StoreOp::Flush,
            Request::Nop { .. } => StoreOp::Nop,
            Request::Range { op, .. } => *op,
        }
    }

    /// The op's result, to deliver once the lock is released; the permit is released
    /// now so a caller that reacts to the completion by submitting again finds a free
    /// one. A write's own buffer is freed (or pooled) here.
    fn finish(self, result: Result<(), StoreError>) -> Finished {
        let Slot { req, permit, .. } = self;
        drop(permit);
        match req {
            Request::Read { buf, done, .. } => Finished::Read(done, result.map(|()| buf)),
            Request::Write { done, .. }
            | Request::Flush { done }
            | Request::Nop { done }
            | Request::Range { done, .. } => Finished::Other(done, result),
        }
    }
}

/// What a CQE means for its op.
enum Next {
    Resubmit,
    Finish(Result<(), StoreError>),
}

struct HelperJob {
    which: RangeIoctl,
    op: StoreOp,
    offset: u64,
    len: u64,
    done: Reply,
    permit: OwnedSemaphorePermit,
}

struct Helper {
    tx: SyncSender<HelperJob>,
    handle: JoinHandle<()>,
}

/// The ring and its ops; always used under `Ring::worker`'s mutex.
struct Worker {
    ring: IoUring,
    file: Arc<File>,
    queue_depth: usize,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// SQEs pushed whose CQE is not reaped yet.
    in_ring: usize,
    helper: Option<Helper>,
    cqes: Vec<(u64, i32)>,
    /// Results to deliver when the lock is released (`Ring::deliver`), and the list
    /// that takes their place meanwhile; both hold `queue_depth`, the most ops there are.
    finished: Vec<Finished>,
    spare: Vec<Finished>,
    /// Test hook: every SQE push fails (the path no real ring takes).
    #[cfg(test)]
    refuse_push: bool,
}

impl Worker {
    /// Hand pushed SQEs to the kernel (which starts the IO inside this call).
    fn submit(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        if let Err(e) = self.ring.submit() {
            match e.raw_os_error() {
                // The SQEs stay queued and go with the next submit (every reap submits).
                Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) => {}
                _ => tracing::error!(error = %e, "io_uring_enter failed on the store ring"),
            }
        }
    }

    /// Push one SQE, submitting first if the SQ is full (it cannot be: at most
    /// `queue_depth` ops exist and the SQ has that many entries).
    ///
    /// # Safety
    /// Every buffer and fd the entry references must stay valid until its CQE is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> Result<(), ()> {
        #[cfg(test)]
        if self.refuse_push {
            return Err(());
        }
        for _ in 0..2 {
            // SAFETY: the caller guarantees the entry's buffers and fds outlive its CQE.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            let _ = self.ring.submit();
        }
        Err(())
    }

    fn start(&mut self, env: Envelope) {
        let slot = Slot {
            req: env.req,
            permit: env.permit,
            done_bytes: 0,
            retries: 0,
            step: 0,
        };
        match self.free.pop() {
            Some(idx) => self.issue(idx, slot),
            // Unreachable: callers hold one of `queue_depth` permits, one per slot.
            None => {
                let op = slot.op();
                let f = slot.finish(Err(StoreError::Io {
                    op,
                    errno: libc::EBUSY,
                }));
                self.finished.push(f);
            }
        }
    }

    /// Submit (or resubmit) `slot` under index `idx`, or hand it to the helper.
    fn issue(&mut self, idx: usize, mut slot: Slot) {
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = match &mut slot.req {
            Request::Read { offset, buf, .. } => {
                let rest = buf.get_mut(slot.done_bytes..).unwrap_or_default();
                let Ok(len) = u32::try_from(rest.len()) else {
                    return self.finish_free(idx, slot, Err(invalid_len(StoreOp::Read)));
                };
                opcode::Read::new(fd, rest.as_mut_ptr(), len)
                    .offset(*offset + slot.done_bytes as u64)
                    .build()
            }
            Request::Write {
                offset, buf, fua, ..
            } => {
                let rest = buf.get(slot.done_bytes..).unwrap_or_default();
                let Ok(len) = u32::try_from(rest.len()) else {
                    return self.finish_free(idx, slot, Err(invalid_len(StoreOp::Write)));
                };
                opcode::Write::new(fd, rest.as_ptr(), len)
                    .offset(*offset + slot.done_bytes as u64)
                    .rw_flags(if *fua { libc::RWF_DSYNC } else { 0 })
                    .build()
            }
            Request::Flush { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Request::Nop { .. } => opcode::Nop::new().build(),
            Request::Range {
                op,
                offset,
                len,
                steps,
                ..
            } => match steps.get(slot.step) {
                Some(Step::Fallocate(mode)) => opcode::Fallocate::new(fd, *len)
                    .offset(*offset)
                    .mode(*mode)
                    .build(),
                Some(Step::Ioctl(which)) => {
                    let (which, op, offset, len) = (*which, *op, *offset, *len);
                    self.free.push(idx);
                    return self.hand_to_helper(slot, which, op, offset, len);
                }
                None => {
                    let op = *op;
                    return self.finish_free(
                        idx,
                        slot,
                        Err(StoreError::Unsupported {
                            op,
                            errno: libc::EOPNOTSUPP,
                        }),
                    );
                }
            },
        };
        let entry = entry.user_data(idx as u64);
        // Park the slot first: from the push on, the kernel may use its buffer.
        let Some(place) = self.slots.get_mut(idx) else {
            let f = slot.finish(Err(StoreError::Io {
                op: StoreOp::Read,
                errno: libc::EFAULT,
            }));
            return self.finished.push(f);
        };
        *place = Some(slot);
        // SAFETY: the entry references the fd (kept open by `self.file` until the worker
        // is dropped, after every CQE is reaped) and, for reads and writes, the heap
        // buffer owned by `slots[idx]`. That slot is only taken out when the CQE with
        // user_data `idx` is reaped (or right below, if the push failed and the kernel
        // never saw the entry); moving the `AlignedBuf`/`Arc` never moves its heap block.
        if unsafe { self.push(&entry) }.is_ok() {
            self.in_ring += 1;
        } else if let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) {
            let op = slot.op();
            self.finish_free(
                idx,
                slot,
                Err(StoreError::Io {
                    op,
                    errno: libc::EBUSY,
                }),
            );
        }
    }

    fn finish_free(&mut self, idx: usize, slot: Slot, result: Result<(), StoreError>) {
        self.free.push(idx);
        let f = slot.finish(result);
        self.finished.push(f);
    }

    fn hand_to_helper(
        &mut self,
        slot: Slot,
        which: RangeIoctl,
        op: StoreOp,
        offset: u64,
        len: u64,
    ) {
        let Slot { req, permit, .. } = slot;
        let Request::Range { done, .. } = req else {
            return;
        };
        if self.helper.is_none() {
            match spawn_helper(Arc::clone(&self.file), self.queue_depth) {
                Ok(h) => self.helper = Some(h),
                Err(e) => {
                    drop(permit);
                    return self
                        .finished
                        .push(Finished::Other(done, Err(StoreError::Setup(e))));
                }
            }
        }
        let job = HelperJob {
            which,
            op,
            offset,
            len,
            done,
            permit,
        };
        if let Some(h) = &self.helper {
            // Cannot be full: jobs hold permits and the channel has one place per permit.
            match h.tx.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => {
                    drop(job.permit);
                    let err = Err(StoreError::Io {
                        op,
                        errno: libc::EBUSY,
                    });
                    self.finished.push(Finished::Other(job.done, err));
                }
            }
        }
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &cqes {
            self.complete(user_data, res);
        }
        self.cqes = cqes;
    }

    fn complete(&mut self, user_data: u64, res: i32) {
        let Some(idx) = usize::try_from(user_data)
            .ok()
            .filter(|&i| i < self.slots.len())
        else {
            tracing::error!(user_data, "completion for an unknown store op");
            return;
        };
        let Some(mut slot) = self.slots.get_mut(idx).and_then(Option::take) else {
            tracing::error!(user_data, "completion for an empty store slot");
            return;
        };
        self.in_ring = self.in_ring.saturating_sub(1);
        match advance(&mut slot, res) {
            Next::Resubmit => self.issue(idx, slot),
            Next::Finish(result) => self.finish_free(idx, slot, result),
        }
    }
}

impl Drop for Worker {
    /// After a clean [`Ring::close`] nothing is in the kernel's hands. If the ring is
    /// dropped with ops in flight (close timed out, or a bug), the kernel may still write
    /// into their buffers after the ring fd closes (it cancels asynchronously), so those
    /// are leaked, never freed; their callers (waiters and sinks) get `Closed`.
    fn drop(&mut self) {
        for f in self.finished.drain(..) {
            f.deliver();
        }
        if self.in_ring == 0 {
            return;
        }
        tracing::error!(
            in_flight = self.in_ring,
            "store ring dropped with ops in flight; leaking their buffers"
        );
        for slot in self.slots.iter_mut().filter_map(Option::take) {
            match slot.req {
                Request::Read { buf, done, .. } => {
                    std::mem::forget(buf);
                    done.send(Err(StoreError::Closed));
                }
                Request::Write { buf, done, .. } => {
                    std::mem::forget(buf);
                    done.send(Err(StoreError::Closed));
                }
                Request::Flush { done } | Request::Nop { done } | Request::Range { done, .. } => {
                    done.send(Err(StoreError::Closed));
                }
            }
        }
    }
}

fn invalid_len(op: StoreOp) -> StoreError {
    StoreError::invalid(op, "length does not fit the ring's u32")
}

/// Decide what a CQE result means for `slot`, updating its progress.
fn advance(slot: &mut Slot, res: i32) -> Next {
    let op = slot.op();
    if res < 0 {
        let errno = -res;
        if (errno == libc::EINTR || errno == libc::EAGAIN) && slot.retries < MAX_SHORT_RETRIES {
            slot.retries += 1;
            return Next::Resubmit;
        }
        if errno == libc::EOPNOTSUPP {
            if let Request::Range { steps, .. } = &slot.req {
                if slot.step + 1 < steps.len() {
                    slot.step += 1;
                    return Next::Resubmit;
                }
            }
        }
        return Next::Finish(Err(StoreError::from_errno(op, errno)));
    }
    let total = match &slot.req {
        Request::Read { buf, .. } => buf.len(),
        Request::Write { buf, .. } => buf.len(),
        Request::Flush { .. } | Request::Nop { .. } | Request::Range { .. } => {
            return Next::Finish(Ok(()))
        }
    };
    // `res` is non-negative here.
    let n = usize::try_from(res).unwrap_or(0);
    slot.done_bytes = slot.done_bytes.saturating_add(n).min(total);
    if slot.done_bytes >= total {
        return Next::Finish(Ok(()));
    }
    if n == 0 || slot.retries >= MAX_SHORT_RETRIES {
        return Next::Finish(Err(StoreError::Short {
            op,
            done: slot.done_bytes,
            len: total,
            attempts: slot.retries + 1,
        }));
    }
    slot.retries += 1;
    Next::Resubmit
}

fn spawn_helper(file: Arc<File>, queue_depth: usize) -> io::Result<Helper> {
    let (tx, rx) = sync_channel::<HelperJob>(queue_depth);
    let handle = std::thread::Builder::new()
        .name("tandem-store-io".into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                let HelperJob {
                    which,
                    op,
                    offset,
                    len,
                    done,
                    permit,
                } = job;
                let result = range_ioctl(&file, which, offset, len)
                    .map_err(|errno| StoreError::from_errno(op, errno));
                // Release the queue slot before waking the caller (see Slot::finish).
                drop(permit);
                done.send(result);
            }
        })?;
    Ok(Helper { tx, handle })
}
