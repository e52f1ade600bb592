//! Opening a backing device and the synchronous syscalls around it.
//!
//! Owns everything that is a plain syscall on the backing fd: `open`, `fstat`, the block
//! ioctls (`BLKGETSIZE64`, `BLKSSZGET`, `BLKPBSZGET`, `BLKDISCARD`, `BLKZEROOUT`), the
//! O_DIRECT alignment probe for regular files, and blocking `pread`/`pwritev2` for
//! start-up metadata. The
//! ring thread ([`super::ring`]) does the data path.
//!
//! Bounds: a device is refused when its size is 0, not a multiple of 512 or above
//! `i64::MAX` (fallocate takes a signed offset), or when its logical block size is not a
//! power of two in 512..=4096 (4096 is [`BUF_ALIGN`], the alignment every
//! [`AlignedBuf`] has). A short blocking transfer is retried at most
//! [`MAX_SHORT_RETRIES`] times.

use super::buf::{AlignedBuf, BUF_ALIGN, SECTOR_SIZE};
use super::error::{StoreError, StoreOp};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// How often a short read or write is resubmitted for its remainder before it is an error.
pub(crate) const MAX_SHORT_RETRIES: u32 = 4;

/// What kind of backing device a store drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A regular file on a file system that supports O_DIRECT.
    File,
    /// A block device (disk, partition, LV, loop device, …).
    BlockDevice,
}

/// Facts about an opened backing device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    /// The path it was opened by.
    pub path: PathBuf,
    /// File or block device.
    pub kind: DeviceKind,
    /// Size in bytes (a multiple of 512).
    pub size_bytes: u64,
    /// Alignment every offset and length must have: `BLKSSZGET` for block devices, the
    /// smallest O_DIRECT transfer that works (512 or 4096) for files.
    pub logical_block_size: u32,
    /// The unit below which a write costs the device a read-modify-write: `BLKPBSZGET`
    /// for block devices (the logical size if that fails or is smaller), 4096 for files
    /// (the page and file system block an O_DIRECT write of less only partly covers).
    /// A power of two in `logical_block_size..=65536`.
    pub physical_block_size: u32,
}

/// The physical block size of regular files (see [`StoreInfo::physical_block_size`]).
pub(crate) const FILE_PHYSICAL_BLOCK_SIZE: u32 = 4096;
/// Largest physical block size reported; larger or odd values become the logical size.
const MAX_PHYSICAL_BLOCK_SIZE: u32 = 65536;

// Linux ioctl numbers for the block layer (include/uapi/linux/fs.h), which libc does not
// all export. The encoding of direction and size differs on a few architectures.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
mod ioc {
    pub(crate) const NONE: u32 = 1;
    pub(crate) const READ: u32 = 2;
    pub(crate) const DIR_SHIFT: u32 = 29;
}
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
mod ioc {
    pub(crate) const NONE: u32 = 0;
    pub(crate) const READ: u32 = 2;
    pub(crate) const DIR_SHIFT: u32 = 30;
}

const fn blk_ioc(dir: u32, nr: u32, size: u32) -> u32 {
    (dir << ioc::DIR_SHIFT) | (size << 16) | (0x12 << 8) | nr
}

/// `_IOR(0x12, 114, size_t)`: size in bytes as u64.
const BLKGETSIZE64: u32 = blk_ioc(ioc::READ, 114, 8);
/// `_IO(0x12, 123)`: physical block size as an unsigned int.
const BLKPBSZGET: u32 = blk_ioc(ioc::NONE, 123, 0);
/// `_IO(0x12, 119)`: discard a `[start, len]` u64 range.
const BLKDISCARD: u32 = blk_ioc(ioc::NONE, 119, 0);
/// `_IO(0x12, 127)`: zero a `[start, len]` u64 range.
const BLKZEROOUT: u32 = blk_ioc(ioc::NONE, 127, 0);

/// The ioctl request type differs between libcs (`c_ulong` on glibc, `c_int` on musl).
#[allow(clippy::cast_possible_wrap, clippy::cast_lossless)]
fn req(code: u32) -> libc::Ioctl {
    code as libc::Ioctl
}

/// A blocking range ioctl the ring cannot do (run on the store's helper thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RangeIoctl {
    /// `BLKDISCARD`.
    Discard,
    /// `BLKZEROOUT`.
    ZeroOut,
}

/// Run `BLKDISCARD` or `BLKZEROOUT` on `[offset, offset+len)`; `Err(errno)` on failure.
pub(crate) fn range_ioctl(
    file: &File,
    which: RangeIoctl,
    offset: u64,
    len: u64,
) -> Result<(), i32> {
    let code = match which {
        RangeIoctl::Discard => BLKDISCARD,
        RangeIoctl::ZeroOut => BLKZEROOUT,
    };
    let range: [u64; 2] = [offset, len];
    // SAFETY: the fd is open for the lifetime of `file`; BLKDISCARD/BLKZEROOUT read exactly
    // a `u64[2]` from the pointer, which points to `range`, alive until the call returns.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), req(code), range.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(last_errno())
    }
}

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn bad(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::BadDevice {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn open_err(path: &Path, source: io::Error) -> StoreError {
    StoreError::Open {
        path: path.to_path_buf(),
        source,
    }
}

/// Open (and if asked, create) the backing device `O_RDWR | O_DIRECT | O_CLOEXEC` and
/// learn its kind, size and logical block size.
/// The physical block size of a device whose logical one is `lbs`: the kernel's for a
/// block device, [`FILE_PHYSICAL_BLOCK_SIZE`] for a file; `lbs` when the value is not a
/// power of two in `lbs..=`[`MAX_PHYSICAL_BLOCK_SIZE`].
fn physical_block_size(file: &File, kind: DeviceKind, lbs: u32) -> u32 {
    let pbs = match kind {
        DeviceKind::BlockDevice => blk_physical_block_size(file).unwrap_or(lbs),
        DeviceKind::File => FILE_PHYSICAL_BLOCK_SIZE,
    };
    if pbs.is_power_of_two() && (lbs..=MAX_PHYSICAL_BLOCK_SIZE).contains(&pbs) {
        pbs
    } else {
        lbs
    }
}

pub(crate) fn open_device(
    path: &Path,
    create_size_bytes: Option<u64>,
) -> Result<(File, StoreInfo), StoreError> {
    if let Some(size) = create_size_bytes {
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE as u64) || i64::try_from(size).is_err() {
            return Err(StoreError::invalid(
                StoreOp::Open,
                format!("create_size_bytes {size} is not a non-zero multiple of 512"),
            ));
        }
    }
    // std always adds O_CLOEXEC.
    let mut existing = OpenOptions::new();
    existing.read(true).write(true).custom_flags(libc::O_DIRECT);
    let file = match existing.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound && create_size_bytes.is_some() => {
            let size = create_size_bytes.unwrap_or(0);
            let mut create = OpenOptions::new();
            create
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_DIRECT);
            match create.open(path) {
                Ok(f) => {
                    f.set_len(size).map_err(|e| open_err(path, e))?;
                    f
                }
                // Someone created it between our two opens: use theirs, size rules apply.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    existing.open(path).map_err(|e| open_err(path, e))?
                }
                Err(e) => return Err(open_err(path, e)),
            }
        }
        Err(e) => return Err(open_err(path, e)),
    };
    let meta = file.metadata().map_err(|e| open_err(path, e))?;
    let ft = meta.file_type();
    let (kind, size, lbs) = if ft.is_block_device() {
        (
            DeviceKind::BlockDevice,
            blk_size(&file).map_err(|e| bad(path, format!("BLKGETSIZE64 failed: {e}")))?,
            blk_logical_block_size(&file)
                .map_err(|e| bad(path, format!("BLKSSZGET failed: {e}")))?,
        )
    } else if ft.is_file() {
        (
            DeviceKind::File,
            meta.len(),
            probe_file_alignment(path, &file)?,
        )
    } else {
        return Err(bad(path, "neither a regular file nor a block device"));
    };
    if size == 0 || !size.is_multiple_of(SECTOR_SIZE as u64) {
        return Err(bad(
            path,
            format!("size {size} is not a non-zero multiple of 512 bytes"),
        ));
    }
    if i64::try_from(size).is_err() {
        return Err(bad(path, format!("size {size} is above i64::MAX")));
    }
    if !lbs.is_power_of_two() || !(SECTOR_SIZE..=BUF_ALIGN).contains(&(lbs as usize)) {
        return Err(bad(
            path,
            format!("logical block size {lbs} is not a power of two in 512..=4096"),
        ));
    }
    if let Some(wanted) = create_size_bytes {
        if size < wanted {
            return Err(StoreError::TooSmall {
                path: path.to_path_buf(),
                size,
                wanted,
            });
        }
    }
    let pbs = physical_block_size(&file, kind, lbs);
    Ok((
        file,
        StoreInfo {
            path: path.to_path_buf(),
            kind,
            size_bytes: size,
            logical_block_size: lbs,
            physical_block_size: pbs,
        },
    ))
}

fn blk_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `size`,
    // alive and exclusively borrowed for the call; the fd is open for `file`'s lifetime.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            req(BLKGETSIZE64),
            std::ptr::from_mut(&mut size),
        )
    };
    if rc == 0 {
        Ok(size)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn blk_logical_block_size(file: &File) -> io::Result<u32> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to `lbs`, alive
    // and exclusively borrowed for the call; the fd is open for `file`'s lifetime.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            std::ptr::from_mut(&mut lbs),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(lbs).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn blk_physical_block_size(file: &File) -> io::Result<u32> {
    let mut pbs: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one unsigned int through the pointer, which points to
    // `pbs`, alive and exclusively borrowed for the call; the fd is open for `file`'s
    // lifetime.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            req(BLKPBSZGET),
            std::ptr::from_mut(&mut pbs),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pbs)
}

/// The smallest O_DIRECT read size and alignment that works on this file's file system:
/// a 512-byte read at offset 0, else a 4096-byte one. Reading past the end is fine (it
/// returns 0 bytes after the alignment checks), so this works for any file size. It
/// also proves O_DIRECT works at all here.
fn probe_file_alignment(path: &Path, file: &File) -> Result<u32, StoreError> {
    let mut first_err = None;
    for lbs in [512u32, 4096] {
        let mut buf = AlignedBuf::new(lbs as usize)?;
        match pread_once(file, &mut buf, 0) {
            Ok(_) => return Ok(lbs),
            Err(errno) => {
                first_err.get_or_insert(errno);
                if errno != libc::EINVAL {
                    break;
                }
            }
        }
    }
    let errno = first_err.unwrap_or(libc::EINVAL);
    Err(bad(
        path,
        format!(
            "O_DIRECT reads fail with 512- and 4096-byte alignment: {}",
            io::Error::from_raw_os_error(errno)
        ),
    ))
}

/// Whether `[offset, offset + len)` of a regular file is one hole (`SEEK_DATA` finds no
/// data before its end): it reads as zeroes without being read. `false` whenever the file
/// system cannot say (no `SEEK_DATA`), so the caller reads.
pub(crate) fn is_hole(file: &File, offset: u64, len: u64) -> bool {
    let Ok(off) = libc::off_t::try_from(offset) else {
        return false;
    };
    // SAFETY: lseek only reads its integer arguments; the fd is open for `file`'s
    // lifetime. It moves the file position, which no IO of this crate uses (all IO is
    // positional: pread/pwrite/io_uring with explicit offsets).
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if rc < 0 {
        // ENXIO: no data at or after `offset` (a hole to the end of the file).
        return last_errno() == libc::ENXIO;
    }
    u64::try_from(rc).is_ok_and(|data| data >= offset.saturating_add(len))
}

/// One `pread` into the whole of `buf` at `offset`; bytes read or errno.
fn pread_once(file: &File, buf: &mut [u8], offset: u64) -> Result<usize, i32> {
    let off = libc::off_t::try_from(offset).map_err(|_| libc::EINVAL)?;
    // SAFETY: `buf` is a valid, exclusively borrowed slice of `buf.len()` bytes for the
    // whole (synchronous) call; the fd is open for `file`'s lifetime.
    let rc = unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off) };
    usize::try_from(rc).map_err(|_| last_errno())
}

/// Fill `buf` from `offset` with blocking `pread`s, retrying EINTR and short reads
/// (at most [`MAX_SHORT_RETRIES`] extra calls).
pub(crate) fn pread_full(file: &File, buf: &mut AlignedBuf, offset: u64) -> Result<(), StoreError> {
    let len = buf.len();
    let mut done = 0usize;
    let mut attempts = 0u32;
    while done < len {
        attempts += 1;
        let pos = offset + done as u64;
        let rest = buf.get_mut(done..).unwrap_or_default();
        match pread_once(file, rest, pos) {
            Ok(n) if n > 0 => done += n,
            Ok(_) => {}
            Err(libc::EINTR) | Err(libc::EAGAIN) => {}
            Err(errno) => return Err(StoreError::from_errno(StoreOp::Read, errno)),
        }
        if done < len && attempts > MAX_SHORT_RETRIES {
            return Err(StoreError::Short {
                op: StoreOp::Read,
                done,
                len,
                attempts,
            });
        }
    }
    Ok(())
}

/// Write all of `buf` at `offset` with blocking `pwritev2` (`RWF_DSYNC` when `fua`),
/// retrying EINTR and short writes (at most [`MAX_SHORT_RETRIES`] extra calls).
pub(crate) fn pwrite_full(
    file: &File,
    buf: &AlignedBuf,
    offset: u64,
    fua: bool,
) -> Result<(), StoreError> {
    let len = buf.len();
    let flags = if fua { libc::RWF_DSYNC } else { 0 };
    let mut done = 0usize;
    let mut attempts = 0u32;
    while done < len {
        attempts += 1;
        let rest = buf.get(done..).unwrap_or_default();
        let off = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| StoreError::invalid(StoreOp::Write, "offset above i64::MAX"))?;
        let iov = libc::iovec {
            iov_base: rest.as_ptr().cast_mut().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: one iovec describing `rest`, a live borrowed slice, for the whole
        // (synchronous) call; the kernel only reads from it for a write; fd open.
        let rc = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, off, flags) };
        match usize::try_from(rc) {
            Ok(n) => done += n,
            Err(_) => match last_errno() {
                libc::EINTR | libc::EAGAIN => {}
                errno => return Err(StoreError::from_errno(StoreOp::Write, errno)),
            },
        }
        if done < len && attempts > MAX_SHORT_RETRIES {
            return Err(StoreError::Short {
                op: StoreOp::Write,
                done,
                len,
                attempts,
            });
        }
    }
    Ok(())
}

/// Blocking `fdatasync`.
pub(crate) fn fdatasync(file: &File) -> Result<(), StoreError> {
    file.sync_data()
        .map_err(|e| StoreError::from_errno(StoreOp::Flush, e.raw_os_error().unwrap_or(libc::EIO)))
}
