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

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fmt;
use std::ptr::NonNull;

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

/// A zero-initialised, 4096-aligned heap buffer for direct IO.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
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
        let layout =
            Layout::from_size_align(len, BUF_ALIGN).map_err(|_| BufError::BadLength(len))?;
        // SAFETY: the layout has a non-zero size (checked above) and a valid power-of-two
        // alignment; a null return is handled below.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(BufError::NoMemory(len))?;
        Ok(Self { ptr, len })
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
        // The same layout as in `new`, which succeeded, so this cannot fail.
        if let Ok(layout) = Layout::from_size_align(self.len, BUF_ALIGN) {
            // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is
            // freed only here, once.
            unsafe { dealloc(self.ptr.as_ptr(), layout) };
        }
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
}
