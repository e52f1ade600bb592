//! Exclusive use of a backing device (and of a node's lock file): one process at a time.
//!
//! [`DeviceLock::acquire`] takes a non-blocking `flock(LOCK_EX | LOCK_NB)` on the path —
//! a backing file, a block device node, a metadata file or a lock file — and, for a block
//! device, also opens it `O_EXCL`: the kernel's exclusive claim, which also fails while the
//! device is mounted or claimed by device-mapper, DRBD or any other exclusive opener,
//! whatever path named it. Both are held until the [`DeviceLock`] is dropped (the daemon
//! holds its locks for its whole life); the kernel drops them when the process dies, so a
//! `kill -9` leaves nothing stale behind.
//!
//! A lock held by another process is refused with that process's pid, read from
//! `/proc/locks` (which lists every `FLOCK` holder by `major:minor:inode`); at most
//! [`MAX_PROC_LOCKS_BYTES`] (4 MiB) of it are read.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Most bytes of `/proc/locks` read to find a lock's holder.
pub const MAX_PROC_LOCKS_BYTES: u64 = 4 << 20;

/// Why a device could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the flock.
    #[error("{} is in use by {}", .path.display(), holder_text(*.pid))]
    Held {
        /// The path.
        path: PathBuf,
        /// The holder, if `/proc/locks` names it.
        pid: Option<u32>,
    },
    /// The block device is claimed exclusively by someone else (`O_EXCL` gave `EBUSY`).
    #[error(
        "{} is busy: it is mounted, or claimed by device-mapper, DRBD, another tandem or \
         another exclusive opener (the kernel refused O_EXCL with EBUSY)",
        .path.display()
    )]
    Busy {
        /// The path.
        path: PathBuf,
    },
    /// Opening or locking failed for another reason.
    #[error("cannot lock {}: {source}", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn holder_text(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("process {p}"),
        None => "another process".into(),
    }
}

impl LockError {
    /// The pid of the process holding the lock, when known.
    pub fn holder(&self) -> Option<u32> {
        match self {
            LockError::Held { pid, .. } => *pid,
            _ => None,
        }
    }
}

/// An exclusive lock on one path, held until dropped.
#[derive(Debug)]
pub struct DeviceLock {
    file: File,
    /// The `O_EXCL` open of a block device.
    _claim: Option<File>,
    path: PathBuf,
}

impl DeviceLock {
    /// Locks `path` (see the module docs). With `create`, a missing file is created
    /// (mode 0600) — for lock files; a missing device is an error otherwise.
    pub fn acquire(path: &Path, create: bool) -> Result<DeviceLock, LockError> {
        let io_err = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(create)
            .create(create)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        // SAFETY: flock takes an fd and an integer; the fd belongs to `file`, open for the
        // whole call. It touches no memory.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let pid = file
                    .metadata()
                    .ok()
                    .and_then(|m| flock_holder(m.dev(), m.ino()));
                return Err(LockError::Held {
                    path: path.to_path_buf(),
                    pid,
                });
            }
            return Err(io_err(e));
        }
        let is_block = file
            .metadata()
            .map_err(io_err)?
            .file_type()
            .is_block_device();
        let claim = if is_block {
            match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_EXCL)
                .open(path)
            {
                Ok(f) => Some(f),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(LockError::Busy {
                        path: path.to_path_buf(),
                    })
                }
                Err(e) => return Err(io_err(e)),
            }
        } else {
            None
        };
        Ok(DeviceLock {
            file,
            _claim: claim,
            path: path.to_path_buf(),
        })
    }

    /// The locked file (a lock file's owner writes its pid into it).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path it was locked by.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid of the process holding an `FLOCK` on the inode `(dev, ino)`, from `/proc/locks`.
pub fn flock_holder(dev: u64, ino: u64) -> Option<u32> {
    let mut text = String::new();
    File::open("/proc/locks")
        .ok()?
        .take(MAX_PROC_LOCKS_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    parse_proc_locks(&text, dev, ino)
}

/// glibc's `major()` / `minor()` of a `dev_t`.
fn major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// Finds the holder of an `FLOCK` on `(dev, ino)` in `/proc/locks` text: lines such as
/// `1: FLOCK  ADVISORY  WRITE 3420 fd:01:1234 0 EOF` (`->` lines are waiters).
fn parse_proc_locks(text: &str, dev: u64, ino: u64) -> Option<u32> {
    let (major, minor) = major_minor(dev);
    text.lines().find_map(|line| {
        let mut f = line.split_whitespace().skip(1);
        if f.next()? != "FLOCK" {
            return None;
        }
        let pid = f.nth(2)?.parse::<u32>().ok()?;
        let mut id = f.next()?.split(':');
        let ma = u64::from_str_radix(id.next()?, 16).ok()?;
        let mi = u64::from_str_radix(id.next()?, 16).ok()?;
        let i = id.next()?.parse::<u64>().ok()?;
        (ma == major && mi == minor && i == ino).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_name_the_holder() {
        let dev = (253u64 << 8) | 1; // fd:01
        let text = "1: POSIX  ADVISORY  WRITE 11 fd:01:77 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 fd:01:77 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 99 fd:01:77 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 5 fd:01:78 0 EOF\n";
        assert_eq!(parse_proc_locks(text, dev, 77), Some(4242));
        assert_eq!(parse_proc_locks(text, dev, 78), Some(5));
        assert_eq!(parse_proc_locks(text, dev, 79), None);
        assert_eq!(parse_proc_locks("garbage\n: :\n", dev, 77), None);
    }

    #[test]
    fn a_second_lock_is_refused_with_our_pid() {
        let dir = crate::store::testdir::TempDir::new("lock");
        let path = dir.path("x.lock");
        let first = DeviceLock::acquire(&path, true).expect("first lock");
        let err = DeviceLock::acquire(&path, true).expect_err("second lock must fail");
        assert_eq!(err.holder(), Some(std::process::id()), "{err}");
        assert!(err.to_string().contains(&std::process::id().to_string()));
        drop(first);
        // A test running beside this one may fork (losetup) while `first` is open: the
        // child shares its open file, and so the flock, until it execs (O_CLOEXEC). So the
        // lock is free again once that exec happened: retry for up to 2 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match DeviceLock::acquire(&path, true) {
                Ok(_) => break,
                Err(LockError::Held { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("free again after drop: {e}"),
            }
        }
        let missing = dir.path("missing");
        assert!(matches!(
            DeviceLock::acquire(&missing, false),
            Err(LockError::Io { .. })
        ));
    }
}
