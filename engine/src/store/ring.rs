//! The store's IO thread: the only owner of its `IoUring`.
//!
//! Requests come over a bounded `sync_channel(queue_depth)`; each carries a semaphore
//! permit, so requests queued + in the ring + on the ioctl helper never exceed
//! `queue_depth` and neither the channel nor the ring can overflow (the ring has
//! `queue_depth + 1` SQ entries — one for the eventfd read — and twice that in CQ entries).
//!
//! Wake-ups: an `IORING_OP_READ` on an eventfd is always armed, so `submit_and_wait(1)`
//! returns for a completion *or* for a new request. Submitters write the eventfd only when
//! the thread announced it may sleep (`Shared::sleeping`), a Dekker handshake with SeqCst
//! fences on both sides: the thread sets `sleeping` and then re-checks the channel, the
//! submitter sends and then swaps `sleeping` off — at least one of them sees the other.
//!
//! Ownership: an op's buffer (`AlignedBuf` for reads, `Arc<AlignedBuf>` for writes) lives
//! in the slot `slots[user_data]` from the SQE push until its CQE is reaped; a caller that
//! dropped its future only loses the result. Short transfers are resubmitted for the rest
//! at most [`MAX_SHORT_RETRIES`] times, `EINTR`/`EAGAIN` likewise; `EOPNOTSUPP` on a
//! fallocate moves to the next step of the op's fallback chain, whose `BLKDISCARD` /
//! `BLKZEROOUT` steps run on a helper thread (spawned on first need, channel bounded by
//! the same permits) because those ioctls block.
//!
//! Shutdown: once `Shared::closed` is set (or every sender is gone) the thread keeps
//! taking what is already queued, waits for every CQE, joins the helper, completes its own
//! eventfd read, and only then drops the ring and the buffers.

use super::buf::AlignedBuf;
use super::device::{range_ioctl, RangeIoctl, MAX_SHORT_RETRIES};
use super::error::{StoreError, StoreOp};
use io_uring::{opcode, squeue, types, IoUring};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

/// Where an op's result goes.
pub(crate) type Done<T> = oneshot::Sender<Result<T, StoreError>>;

/// `user_data` of the eventfd read; slot indices are below `MAX_QUEUE_DEPTH`.
const EVENTFD_TOKEN: u64 = u64::MAX;

/// One step of a discard / write-zeroes fallback chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// `IORING_OP_FALLOCATE` with this mode.
    Fallocate(i32),
    /// A blocking ioctl on the helper thread.
    Ioctl(RangeIoctl),
}

/// A request as the IO thread receives it.
pub(crate) enum Request {
    Read {
        offset: u64,
        buf: AlignedBuf,
        done: Done<AlignedBuf>,
    },
    Write {
        offset: u64,
        buf: Arc<AlignedBuf>,
        fua: bool,
        done: Done<()>,
    },
    Flush {
        done: Done<()>,
    },
    /// Discard or write-zeroes: try `steps` in order while they fail with EOPNOTSUPP.
    Range {
        op: StoreOp,
        offset: u64,
        len: u64,
        steps: &'static [Step],
        done: Done<()>,
    },
}

/// A request and its share of the queue depth.
pub(crate) struct Envelope {
    pub(crate) req: Request,
    pub(crate) permit: OwnedSemaphorePermit,
}

/// State shared by the handles and the IO thread.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The thread may be (about to be) blocked in `io_uring_enter`; a submitter that
    /// swaps it from true to false owes the thread an eventfd write.
    sleeping: AtomicBool,
    /// No new requests: finish what is queued and in flight, then exit.
    pub(crate) closed: AtomicBool,
    eventfd: OwnedFd,
}

impl Shared {
    pub(crate) fn new() -> io::Result<Self> {
        // Blocking (no EFD_NONBLOCK): io_uring would complete a read on a non-blocking
        // eventfd with EAGAIN instead of waiting; our writes never block (the counter
        // stays far below its 2^64-2 limit because writes are coalesced).
        // SAFETY: plain syscall with no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let eventfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Self {
            sleeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            eventfd,
        })
    }

    /// Called after sending a request or setting `closed`: wake the thread if it may sleep.
    pub(crate) fn wake(&self) {
        // Order our channel send / `closed` store before reading `sleeping` (the thread
        // orders its `sleeping` store before re-checking them the same way).
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.kick();
        }
    }

    /// Write the eventfd unconditionally.
    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one`, a live local, to the eventfd we own; an
        // eventfd write of 8 bytes is the documented interface. A failure (impossible
        // short of a counter overflow) only costs a wake-up, which the thread's
        // completions or the next request provide.
        let _ = unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// An op owned by the IO thread.
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
            Request::Range { op, .. } => *op,
        }
    }

    /// Complete the caller's future; the permit is released first so a caller that
    /// reacts to the completion by submitting again finds a free one.
    fn finish(self, result: Result<(), StoreError>) {
        let Slot { req, permit, .. } = self;
        drop(permit);
        // A send error means the caller dropped its future: nothing to do.
        match req {
            Request::Read { buf, done, .. } => {
                let _ = done.send(result.map(|()| buf));
            }
            Request::Write { done, .. } | Request::Flush { done } | Request::Range { done, .. } => {
                let _ = done.send(result);
            }
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
    done: Done<()>,
    permit: OwnedSemaphorePermit,
}

struct Helper {
    tx: SyncSender<HelperJob>,
    handle: JoinHandle<()>,
}

/// The IO thread's state.
struct Worker {
    ring: IoUring,
    file: Arc<File>,
    shared: Arc<Shared>,
    rx: Receiver<Envelope>,
    queue_depth: usize,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// SQEs pushed whose CQE is not reaped yet, eventfd read excluded.
    in_ring: usize,
    /// Target of the eventfd read; the kernel writes it while `efd_armed`.
    efd_buf: Box<u64>,
    efd_armed: bool,
    helper: Option<Helper>,
    cqes: Vec<(u64, i32)>,
}

/// Start the IO thread for `file`. Returns once the ring is set up (or failed to be).
/// The second value is disconnected exactly when the thread has finished.
pub(crate) fn spawn(
    file: Arc<File>,
    shared: Arc<Shared>,
    rx: Receiver<Envelope>,
    queue_depth: u32,
) -> Result<(JoinHandle<()>, Receiver<()>), StoreError> {
    let (setup_tx, setup_rx) = sync_channel::<io::Result<()>>(1);
    let (exit_tx, exit_rx) = sync_channel::<()>(1);
    let handle = std::thread::Builder::new()
        .name("tandem-store".into())
        .spawn(move || {
            let worker = match Worker::new(file, shared, rx, queue_depth) {
                Ok(w) => {
                    let _ = setup_tx.send(Ok(()));
                    w
                }
                Err(e) => {
                    let _ = setup_tx.send(Err(e));
                    return;
                }
            };
            worker.run();
            // Dropped last, after the worker (ring, buffers, helper) is gone.
            drop(exit_tx);
        })
        .map_err(StoreError::Setup)?;
    match setup_rx.recv() {
        Ok(Ok(())) => Ok((handle, exit_rx)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(StoreError::Setup(e))
        }
        Err(_) => {
            let _ = handle.join();
            Err(StoreError::Setup(io::Error::other(
                "IO thread died during setup",
            )))
        }
    }
}

impl Worker {
    fn new(
        file: Arc<File>,
        shared: Arc<Shared>,
        rx: Receiver<Envelope>,
        queue_depth: u32,
    ) -> io::Result<Self> {
        let ring = IoUring::builder().build(queue_depth + 1)?;
        let qd = queue_depth as usize;
        Ok(Self {
            ring,
            file,
            shared,
            rx,
            queue_depth: qd,
            slots: (0..qd).map(|_| None).collect(),
            free: (0..qd).rev().collect(),
            in_ring: 0,
            efd_buf: Box::new(0),
            efd_armed: false,
            helper: None,
            cqes: Vec::with_capacity(qd + 1),
        })
    }

    fn run(mut self) {
        let mut disconnected = false;
        loop {
            if !self.efd_armed {
                self.arm_eventfd();
            }
            // Intake: as many requests as there are free slots.
            let mut drained = false;
            while !self.free.is_empty() {
                match self.rx.try_recv() {
                    Ok(env) => self.start(env),
                    Err(TryRecvError::Empty) => {
                        drained = true;
                        break;
                    }
                    Err(TryRecvError::Disconnected) => {
                        drained = true;
                        disconnected = true;
                        break;
                    }
                }
            }
            let closing = disconnected || self.shared.closed.load(Ordering::SeqCst);
            if closing && drained && self.in_ring == 0 {
                break;
            }
            if self.free.is_empty() {
                // Every slot is in the ring: a completion will come; new requests must
                // wait for a slot anyway, so no wake-up is needed for them.
                self.submit_and_wait();
            } else {
                self.shared.sleeping.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                match self.rx.try_recv() {
                    Ok(env) => {
                        self.shared.sleeping.store(false, Ordering::SeqCst);
                        self.start(env);
                        continue;
                    }
                    // Every handle is gone (only after a close that timed out): no
                    // request can come, but in-flight ops still need waiting for.
                    Err(TryRecvError::Disconnected) => disconnected = true,
                    Err(TryRecvError::Empty) => {}
                }
                if self.in_ring == 0 && (disconnected || self.shared.closed.load(Ordering::SeqCst))
                {
                    // Nothing in flight would wake us: go round to the exit check.
                    self.shared.sleeping.store(false, Ordering::SeqCst);
                    continue;
                }
                self.submit_and_wait();
                self.shared.sleeping.store(false, Ordering::SeqCst);
            }
            self.reap();
        }
        self.shutdown();
    }

    /// Submit pending SQEs and block until at least one CQE is there.
    fn submit_and_wait(&mut self) {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) => match e.raw_os_error() {
                // Interrupted, or completions must be reaped first: reap and go round.
                Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) => {}
                _ => {
                    tracing::error!(error = %e, "io_uring_enter failed on the store ring");
                    // Do not spin on a persistent failure.
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            },
        }
    }

    fn arm_eventfd(&mut self) {
        let ptr: *mut u8 = std::ptr::from_mut::<u64>(&mut self.efd_buf).cast();
        let entry = opcode::Read::new(
            types::Fd(self.shared.eventfd.as_raw_fd()),
            ptr,
            8, // size_of::<u64>()
        )
        .build()
        .user_data(EVENTFD_TOKEN);
        // SAFETY: the SQE references `efd_buf` (a heap u64 owned by the worker, not
        // touched by us while armed, freed only after `shutdown` reaped this read) and the
        // eventfd (owned by `shared`, which the worker keeps alive past the ring).
        if unsafe { self.push(&entry) }.is_ok() {
            self.efd_armed = true;
        }
    }

    /// Push one SQE, submitting first if the SQ is full (it cannot be: at most
    /// `queue_depth + 1` ops exist and the SQ has at least that many entries).
    ///
    /// # Safety
    /// Every buffer and fd the entry references must stay valid until its CQE is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> Result<(), ()> {
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
            // Unreachable: intake only receives while a slot is free.
            None => {
                let op = slot.op();
                slot.finish(Err(StoreError::Io {
                    op,
                    errno: libc::EBUSY,
                }));
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
            return slot.finish(Err(StoreError::Io {
                op: StoreOp::Read,
                errno: libc::EFAULT,
            }));
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
        slot.finish(result);
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
                    let _ = done.send(Err(StoreError::Setup(e)));
                    return;
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
                    let _ = job.done.send(Err(StoreError::Io {
                        op,
                        errno: libc::EBUSY,
                    }));
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
        if user_data == EVENTFD_TOKEN {
            self.efd_armed = false;
            if res < 0 && res != -libc::ECANCELED {
                tracing::warn!(errno = -res, "store eventfd read failed; re-arming");
            }
            return;
        }
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

    fn shutdown(mut self) {
        // The helper finishes its queued ioctls and completes them itself.
        if let Some(h) = self.helper.take() {
            drop(h.tx);
            let _ = h.handle.join();
        }
        // Complete our own eventfd read so the kernel no longer references efd_buf.
        if self.efd_armed {
            self.shared.kick();
            let mut rounds = 0u32;
            while self.efd_armed {
                self.submit_and_wait();
                self.reap();
                rounds += 1;
                if rounds > 1000 {
                    // Never observed; Drop leaks the buffer the kernel may still use.
                    tracing::error!("store eventfd read did not complete; leaking its buffer");
                    break;
                }
            }
        }
        // Everything is reaped: dropping the ring, slots and fd is now safe.
    }
}

impl Drop for Worker {
    /// After a clean [`Worker::shutdown`] nothing is in the kernel's hands. If the thread
    /// unwinds from a bug instead, the kernel may still write into in-flight buffers after
    /// the ring fd closes (the kernel cancels asynchronously), so those are leaked, never
    /// freed; their callers are completed with `Closed` by dropping the senders.
    fn drop(&mut self) {
        if self.in_ring == 0 && !self.efd_armed {
            return;
        }
        tracing::error!(
            in_flight = self.in_ring,
            "store IO thread unwinding; leaking in-flight buffers"
        );
        for slot in self.slots.iter_mut().filter_map(Option::take) {
            match slot.req {
                Request::Read { buf, .. } => std::mem::forget(buf),
                Request::Write { buf, .. } => std::mem::forget(buf),
                Request::Flush { .. } | Request::Range { .. } => {}
            }
        }
        if self.efd_armed {
            std::mem::forget(std::mem::take(&mut self.efd_buf));
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
        Request::Flush { .. } | Request::Range { .. } => return Next::Finish(Ok(())),
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
                let _ = done.send(result);
            }
        })?;
    Ok(Helper { tx, handle })
}
