//! Aligned IO buffers.
//!
//! Backing devices are opened `O_DIRECT`, which needs the buffer address, the length and
//! the file offset aligned to the logical block size. [`AlignedBuf`] is a heap block
//! aligned to [`BUF_ALIGN`] (4096, enough for 512- and 4096-byte devices) whose length is a
//! multiple of [`SECTOR_SIZE`]. It is owned and moved into IO operations for their whole
//! lifetime (the io_uring rule: a buffer lives until its completion is reaped); writes that
//! go to the local disk and the peer at once share it read-only as `Arc<AlignedBuf>`.
//!
//! Bound: one buffer is at most [`MAX_BUF_LEN`] (32 MiB, the NBD maximum request size
//! tandem advertises); allocation of a larger one is refused, never attempted.
//!
//! **Pool.** The data paths that take a buffer per request — an NBD WRITE's payload or
//! READ's reply, a peer's `P_DATA`, a resync or verify read — take it from [`BufPool`]
//! ([`AlignedBuf::from_pool`], the process-wide pool) instead of the allocator. The pool
//! keeps freed buffers by size class: the powers of two from [`POOL_MIN_CLASS`] (4 KiB) to
//! [`POOL_MAX_CLASS`] (1 MiB, DRBD's largest bio); a request takes the smallest class
//! that holds it (a 12 KiB write uses a 16 KiB block, its `len()` is 12 KiB). A pooled
//! buffer goes back to its pool when it is dropped; the pool keeps at most
//! [`POOL_CAP_BYTES`] (8 MiB) of free blocks: past that, blocks of other classes are
//! freed to make room (largest first, so a resync's 1 MiB blocks do not keep the 4 KiB
//! writes after it out), and a block whose own class fills the pool is freed. Buffers
//! over 1 MiB and buffers made by [`AlignedBuf::new`] (any size) are never pooled. A
//! buffer taken from the pool is not zeroed: it holds another request's bytes until the
//! caller overwrites them, so the callers are the paths that fill the whole buffer (a
//! socket read, a disk read) before anyone sees it.
//! One `std::sync::Mutex` per pool, held for a push or a pop.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fmt;
use std::ptr::NonNull;
use std::sync::{Mutex, PoisonError};

/// Freed memory glibc keeps for reuse instead of returning it to the kernel, bytes.
pub const ALLOC_TRIM_THRESHOLD: usize = 256 << 20;
/// Allocations from this size up are mmapped (and unmapped on free), bytes: above the
/// largest IO buffer, so none is.
pub const ALLOC_MMAP_THRESHOLD: usize = 64 << 20;

/// Makes glibc reuse freed IO buffers. By default an allocation of 128 KiB or more (a
/// 1 MiB resync reply, a large write) is an `mmap` and its free a `munmap`: every buffer
/// then costs 256 page faults with kernel zeroing, and the unmap a TLB shootdown. In a
/// full resync that was about 40% of both daemons' CPU; with these two settings a 2 GiB
/// resync on tmpfs took 3.0–3.7 s and 1.2 CPU-s per daemon instead of 7.1 s and 2.5 CPU-s.
/// The memory kept is bounded by the peak in use (the daemon's buffer budgets) plus
/// [`ALLOC_TRIM_THRESHOLD`]. Call once at start-up, before threads allocate.
pub fn tune_allocator() {
    for (param, value) in [
        (libc::M_MMAP_THRESHOLD, ALLOC_MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, ALLOC_TRIM_THRESHOLD),
    ] {
        let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only reads its two integer arguments and changes glibc's
        // allocation thresholds; it is thread-safe (it takes the arena locks) and every
        // allocation made before or after stays valid.
        let ok = unsafe { libc::mallopt(param, value) };
        if ok != 1 {
            tracing::warn!("mallopt({param}, {value}) failed; IO buffers stay mmapped");
        }
    }
}

/// Gives freed heap memory back to the kernel (`malloc_trim(0)`): after a burst of large
/// buffers (e.g. many NBD clients' 32 MiB reads) the daemon's RSS falls back instead of
/// staying at the peak up to [`ALLOC_TRIM_THRESHOLD`] per arena. Callers rate-limit it
/// (it walks every arena).
pub fn release_free_memory() {
    // SAFETY: malloc_trim only returns free pages of glibc's heaps to the kernel; it takes
    // the arena locks itself and leaves every live allocation untouched.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Alignment of every IO buffer, bytes.
pub const BUF_ALIGN: usize = 4096;
/// Unit of IO lengths and offsets, bytes (DRBD's sector).
pub const SECTOR_SIZE: usize = 512;
/// Largest single buffer, bytes.
pub const MAX_BUF_LEN: usize = 32 << 20;

/// Why a buffer could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BufError {
    /// The length is 0, not a multiple of 512 or above 32 MiB.
    #[error("buffer length {0} is not a non-zero multiple of 512 up to 32 MiB")]
    BadLength(usize),
    /// The allocator had no memory.
    #[error("out of memory for a {0}-byte IO buffer")]
    NoMemory(usize),
}

/// Smallest pooled block, bytes.
const POOL_MIN_CLASS: usize = 4096;
/// Largest pooled block, bytes (DRBD's largest bio, the volume's largest write).
const POOL_MAX_CLASS: usize = 1 << 20;
/// Free bytes the process-wide pool keeps at most.
const POOL_CAP_BYTES: usize = 8 << 20;
/// Size classes: 4 KiB, 8 KiB, …, 1 MiB.
const CLASSES: usize = (POOL_MAX_CLASS / POOL_MIN_CLASS).trailing_zeros() as usize + 1;

static IO_POOL: BufPool = BufPool::new(POOL_CAP_BYTES);

/// A free block kept by a pool.
struct FreeBlock(NonNull<u8>);

// SAFETY: a free block is a heap allocation nothing else references (its AlignedBuf was
// dropped); the pool owns it exclusively, like a Box, so it may move between threads.
unsafe impl Send for FreeBlock {}

/// A bounded pool of free IO blocks by size class (see the module doc).
pub(crate) struct BufPool {
    cap_bytes: usize,
    inner: Mutex<PoolLists>,
}

struct PoolLists {
    bytes: usize,
    free: [Vec<FreeBlock>; CLASSES],
}

impl BufPool {
    /// An empty pool that keeps at most `cap_bytes` of free blocks.
    pub(crate) const fn new(cap_bytes: usize) -> Self {
        BufPool {
            cap_bytes,
            inner: Mutex::new(PoolLists {
                bytes: 0,
                free: [const { Vec::new() }; CLASSES],
            }),
        }
    }

    /// A buffer of `len` bytes (the rules of [`AlignedBuf::new`]): a free block of the
    /// smallest class that holds it, else a new one of that class; over
    /// [`POOL_MAX_CLASS`] an unpooled exact one. Its contents are unspecified (see the
    /// module doc).
    pub(crate) fn take(&'static self, len: usize) -> Result<AlignedBuf, BufError> {
        let Some(class) = class_of(len) else {
            return AlignedBuf::new(len);
        };
        if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BufError::BadLength(len));
        }
        let cap = POOL_MIN_CLASS << class;
        let reused = {
            let mut g = self.lock();
            let block = g.free.get_mut(class).and_then(Vec::pop);
            if block.is_some() {
                g.bytes -= cap;
            }
            block
        };
        let ptr = match reused {
            Some(FreeBlock(ptr)) => ptr,
            None => alloc_block(cap)?,
        };
        Ok(AlignedBuf {
            ptr,
            len,
            cap,
            pool: Some(self),
        })
    }

    /// Free bytes held now.
    pub(crate) fn free_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Keeps the block `ptr` of `cap` bytes; false (the caller frees it) when `cap` is not
    /// a class or blocks of its own class fill the pool. Blocks of other classes make
    /// room, largest first: the sizes in use now win over a burst's (a resync's 1 MiB
    /// replies must not keep the 4 KiB writes that follow out of the pool).
    fn put(&self, ptr: NonNull<u8>, cap: usize) -> bool {
        let Some(class) = class_of(cap).filter(|&c| POOL_MIN_CLASS << c == cap) else {
            return false;
        };
        if cap > self.cap_bytes {
            return false;
        }
        let mut g = self.lock();
        while g.bytes + cap > self.cap_bytes {
            let victim = (0..CLASSES)
                .rev()
                .filter(|&c| c != class)
                .find_map(|c| Some((c, g.free.get_mut(c)?.pop()?)));
            let Some((c, FreeBlock(old))) = victim else {
                return false;
            };
            let old_cap = POOL_MIN_CLASS << c;
            g.bytes -= old_cap;
            free_block(old, old_cap);
        }
        let Some(list) = g.free.get_mut(class) else {
            return false;
        };
        if list.capacity() == 0 {
            // Once per class: room for the most blocks the cap allows, so no push grows it.
            list.reserve_exact(self.cap_bytes / cap);
        }
        list.push(FreeBlock(ptr));
        g.bytes += cap;
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolLists> {
        // The lists are consistent between statements; a panic cannot leave them torn.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for BufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufPool")
            .field("cap_bytes", &self.cap_bytes)
            .field("free_bytes", &self.free_bytes())
            .finish()
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        let lists = self.inner.get_mut().unwrap_or_else(PoisonError::into_inner);
        for (class, list) in lists.free.iter_mut().enumerate() {
            for FreeBlock(ptr) in list.drain(..) {
                free_block(ptr, POOL_MIN_CLASS << class);
            }
        }
    }
}

/// The size class (index) whose block holds `len` bytes, if one does.
fn class_of(len: usize) -> Option<usize> {
    if len > POOL_MAX_CLASS {
        return None;
    }
    let block = len.max(POOL_MIN_CLASS).next_power_of_two();
    Some((block / POOL_MIN_CLASS).trailing_zeros() as usize)
}

/// A zeroed heap block of `cap` bytes aligned to [`BUF_ALIGN`]; `cap` is non-zero.
fn alloc_block(cap: usize) -> Result<NonNull<u8>, BufError> {
    let layout = Layout::from_size_align(cap, BUF_ALIGN).map_err(|_| BufError::BadLength(cap))?;
    // SAFETY: the layout has a non-zero size (every caller checks) and a valid
    // power-of-two alignment; a null return is handled below.
    let raw = unsafe { alloc_zeroed(layout) };
    NonNull::new(raw).ok_or(BufError::NoMemory(cap))
}

/// Frees a block made by [`alloc_block`] with the same `cap`.
fn free_block(ptr: NonNull<u8>, cap: usize) {
    // The same layout as in `alloc_block`, which succeeded, so this cannot fail.
    if let Ok(layout) = Layout::from_size_align(cap, BUF_ALIGN) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout, and its one
        // owner (an AlignedBuf or a pool list) gives it up here, once.
        unsafe { dealloc(ptr.as_ptr(), layout) };
    }
}

/// A 4096-aligned heap buffer for direct IO: zeroed when made by [`AlignedBuf::new`],
/// holding earlier bytes when taken from a pool.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Bytes of the heap block (≥ `len`; a size class for pooled buffers).
    cap: usize,
    /// Where the block goes back when dropped.
    pool: Option<&'static BufPool>,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Box<[u8]>); no interior
// mutability, so moving it across threads and sharing `&AlignedBuf` is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: see above; `&AlignedBuf` only gives `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes; `len` must be a non-zero multiple of 512, ≤ 32 MiB.
    pub fn new(len: usize) -> Result<Self, BufError> {
        if len == 0 || !len.is_multiple_of(SECTOR_SIZE) || len > MAX_BUF_LEN {
            return Err(BufError::BadLength(len));
        }
        let ptr = alloc_block(len)?;
        Ok(Self {
            ptr,
            len,
            cap: len,
            pool: None,
        })
    }

    /// A buffer of `len` bytes from the process-wide pool (see the module doc): no
    /// allocation when a free block of its class is there. Its contents are unspecified;
    /// the caller overwrites all `len` bytes before anyone reads them.
    pub fn from_pool(len: usize) -> Result<Self, BufError> {
        IO_POOL.take(len)
    }

    /// A buffer holding a copy of `data` (whose length must satisfy [`AlignedBuf::new`]).
    pub fn from_slice(data: &[u8]) -> Result<Self, BufError> {
        let mut buf = Self::new(data.len())?;
        buf.as_mut_slice().copy_from_slice(data);
        Ok(buf)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty buffers cannot be made.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to `len` initialised (zeroed at allocation) bytes owned by self,
        // valid for the lifetime of &self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for submitting IO; valid while `self` is alive and not moved out of.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw mutable pointer for submitting reads into the buffer.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool {
            if pool.put(self.ptr, self.cap) {
                return;
            }
        }
        free_block(self.ptr, self.cap);
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_bounded() {
        let b = AlignedBuf::new(4096).expect("alloc");
        assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(
            AlignedBuf::new(0).expect_err("must be refused"),
            BufError::BadLength(0)
        );
        assert_eq!(
            AlignedBuf::new(100).expect_err("must be refused"),
            BufError::BadLength(100)
        );
        assert_eq!(
            AlignedBuf::new(MAX_BUF_LEN + 512).expect_err("must be refused"),
            BufError::BadLength(MAX_BUF_LEN + 512)
        );
        let c = AlignedBuf::from_slice(&[7u8; 1024]).expect("copy");
        assert_eq!(&c[..], &[7u8; 1024][..]);
    }

    fn pool(cap: usize) -> &'static BufPool {
        Box::leak(Box::new(BufPool::new(cap)))
    }

    #[test]
    fn pool_reuses_blocks_by_class() {
        let p = pool(1 << 20);
        let mut a = p.take(4096).expect("take");
        a[0] = 42;
        let addr = a.as_ptr() as usize;
        assert_eq!(addr % BUF_ALIGN, 0);
        drop(a);
        assert_eq!(p.free_bytes(), 4096);
        // The same block comes back, with its old bytes (not zeroed).
        let b = p.take(4096).expect("take again");
        assert_eq!(b.as_ptr() as usize, addr);
        assert_eq!(b[0], 42);
        assert_eq!(p.free_bytes(), 0);
        drop(b);
        // A 12 KiB request takes a 16 KiB block: the 4 KiB one stays free.
        let c = p.take(12 << 10).expect("12 KiB");
        assert_eq!(c.len(), 12 << 10);
        assert_ne!(c.as_ptr() as usize, addr);
        drop(c);
        assert_eq!(p.free_bytes(), 4096 + (16 << 10));
        let d = p.take(16 << 10).expect("16 KiB");
        assert_eq!(p.free_bytes(), 4096);
        drop(d);
        assert_eq!(p.take(100).map(|_| ()), Err(BufError::BadLength(100)));
        assert_eq!(p.take(0).map(|_| ()), Err(BufError::BadLength(0)));
    }

    #[test]
    fn pool_keeps_at_most_its_cap() {
        let p = pool(8192);
        let bufs: Vec<_> = (0..3).map(|_| p.take(4096).expect("take")).collect();
        drop(bufs);
        assert_eq!(p.free_bytes(), 8192, "the third block is freed, not kept");
        // A block larger than the whole cap is freed.
        let big = p.take(1 << 20).expect("1 MiB");
        drop(big);
        assert_eq!(p.free_bytes(), 8192);
        // A block of another class takes the room of the largest blocks kept.
        let p = pool(32 << 10);
        drop(p.take(32 << 10).expect("32 KiB"));
        assert_eq!(p.free_bytes(), 32 << 10);
        drop(p.take(4096).expect("4 KiB"));
        assert_eq!(p.free_bytes(), 4096, "the 32 KiB block made room");
    }

    #[test]
    fn wrong_size_buffers_are_not_pooled() {
        let p = pool(64 << 20);
        // Over the largest class: an exact, unpooled buffer.
        let big = p.take(POOL_MAX_CLASS + 4096).expect("big");
        assert_eq!(big.len(), POOL_MAX_CLASS + 4096);
        drop(big);
        assert_eq!(p.free_bytes(), 0);
        // Buffers from `new` never go to a pool, whatever their size.
        drop(AlignedBuf::new(4096).expect("new"));
        assert_eq!(p.free_bytes(), 0);
        // A block whose size is not a class is refused by `put`.
        let odd = AlignedBuf::new(12 << 10).expect("odd");
        assert!(!p.put(odd.ptr, odd.cap));
        drop(odd);
        assert_eq!(p.free_bytes(), 0);
    }
}
