//! Store tests on real files (under a disk-backed directory: `$TANDEM_TEST_DIR` or
//! `/var/tmp`), real loop devices and a real small tmpfs for ENOSPC. No mocks.
//!
//! Loop-device and tmpfs tests need root (losetup / mount); they fail with a clear
//! message when the tool is missing or fails, and skip loudly only when the kernel
//! facility itself is absent (`/dev/loop-control`).

#![allow(clippy::unwrap_used)]

use super::device::RangeIoctl;
use super::*;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const MIB_USIZE: usize = 1 << 20;

use super::testdir::TempDir;

/// A buffer of `len` bytes whose content depends on `seed` and the position.
fn pattern(len: usize, seed: u64) -> AlignedBuf {
    let mut b = AlignedBuf::new(len).expect("alloc");
    for (i, chunk) in b.chunks_mut(8).enumerate() {
        let v = (i as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(seed.wrapping_mul(0xD6E8_FEB8_6659_FD93))
            .to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    b
}

fn opts(size: u64) -> StoreOptions {
    StoreOptions {
        create_size_bytes: Some(size),
        ..StoreOptions::default()
    }
}

fn assert_invalid<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) {
    match r {
        Err(StoreError::Invalid { .. }) => {}
        other => panic!("{what}: expected Invalid, got {other:?}"),
    }
}

#[test]
fn open_create_and_size_rules() {
    let dir = TempDir::new("open");
    let p = dir.path("disk.img");

    // Missing path without create_size_bytes: an open error naming the path.
    match Store::open(&p, &StoreOptions::default()) {
        Err(StoreError::Open { path, source }) => {
            assert_eq!(path, p);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Open error, got {other:?}"),
    }

    // Create.
    let s = Store::open(&p, &opts(MIB)).expect("create");
    assert_eq!(s.size_bytes(), MIB);
    assert_eq!(s.kind(), DeviceKind::File);
    let lbs = s.logical_block_size();
    assert!(lbs == 512 || lbs == 4096, "lbs {lbs}");
    assert_eq!(s.physical_block_size(), 4096);
    assert_eq!(std::fs::metadata(&p).expect("stat").len(), MIB);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&p).expect("stat").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    drop(s);

    // Existing larger file, smaller create size: opened as is, never truncated.
    let s = Store::open(&p, &opts(MIB / 2)).expect("reopen smaller ask");
    assert_eq!(s.size_bytes(), MIB);
    drop(s);
    assert_eq!(std::fs::metadata(&p).expect("stat").len(), MIB);

    // Existing smaller file: refused, and the file is untouched.
    match Store::open(&p, &opts(2 * MIB)) {
        Err(StoreError::TooSmall { size, wanted, .. }) => {
            assert_eq!((size, wanted), (MIB, 2 * MIB));
        }
        other => panic!("expected TooSmall, got {other:?}"),
    }
    assert_eq!(std::fs::metadata(&p).expect("stat").len(), MIB);

    // Bad options.
    assert_invalid(Store::open(&p, &opts(1000)), "create size 1000");
    assert_invalid(Store::open(&p, &opts(0)), "create size 0");
    for qd in [0, MAX_QUEUE_DEPTH + 1] {
        let o = StoreOptions {
            create_size_bytes: None,
            queue_depth: qd,
        };
        assert_invalid(Store::open(&p, &o), "queue depth");
    }
    let o = StoreOptions {
        create_size_bytes: None,
        queue_depth: MAX_QUEUE_DEPTH,
    };
    Store::open(&p, &o).expect("max queue depth").close();

    // Sizes that are not a non-zero multiple of 512.
    for (name, len) in [("odd.img", 1000u64), ("empty.img", 0)] {
        let q = dir.path(name);
        std::fs::File::create(&q)
            .and_then(|f| f.set_len(len))
            .expect("make file");
        match Store::open(&q, &StoreOptions::default()) {
            Err(StoreError::BadDevice { reason, .. }) => {
                assert!(reason.contains("512"), "{reason}")
            }
            other => panic!("{name}: expected BadDevice, got {other:?}"),
        }
    }

    // Not a file or block device.
    assert!(Store::open(dir.path(""), &StoreOptions::default()).is_err());
    match Store::open("/dev/null", &StoreOptions::default()) {
        Err(StoreError::BadDevice { .. }) | Err(StoreError::Open { .. }) => {}
        other => panic!("/dev/null: expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_round_trip_sizes_and_offsets() {
    let dir = TempDir::new("rt");
    let size = 8 * MIB;
    let s = Store::open(dir.path("d.img"), &opts(size)).expect("open");
    let mut seed = 1u64;
    for len in [512usize, 4096, 8192, 65536, 1 << 20] {
        let l = len as u64;
        for off in [0u64, 512 * 7, 4096 * 3, MIB + 512, size - l] {
            if off % u64::from(s.logical_block_size()) != 0 {
                continue;
            }
            seed += 1;
            let data = Arc::new(pattern(len, seed));
            s.write(off, Arc::clone(&data), false).await.expect("write");
            let back = s.read(off, len).await.expect("read");
            assert!(back[..] == data[..], "len {len} off {off}");
            // The blocking path sees the same bytes.
            let back = s.read_blocking(off, len).expect("read_blocking");
            assert!(back[..] == data[..], "blocking len {len} off {off}");
        }
    }
    // Blocking write, async read.
    let data = pattern(4096, 99);
    s.write_blocking(2 * MIB, &data, true)
        .expect("write_blocking");
    s.flush_blocking().expect("flush_blocking");
    assert!(s.read(2 * MIB, 4096).await.expect("read")[..] == data[..]);
    // The maximum data length is accepted.
    let big = Arc::new(pattern(MAX_BUF_LEN, 5));
    let s2 = Store::open(dir.path("big.img"), &opts(MAX_BUF_LEN as u64)).expect("open big");
    s2.write(0, Arc::clone(&big), false)
        .await
        .expect("32 MiB write");
    assert!(s2.read(0, MAX_BUF_LEN).await.expect("32 MiB read")[..] == big[..]);
}

#[tokio::test]
async fn fua_write_and_flush() {
    let dir = TempDir::new("fua");
    let s = Store::open(dir.path("d.img"), &opts(MIB)).expect("open");
    let data = Arc::new(pattern(8192, 3));
    s.write(4096, Arc::clone(&data), true)
        .await
        .expect("fua write");
    s.flush().await.expect("flush");
    // A fresh open (new fd, O_DIRECT: no page cache) reads what was written.
    s.close();
    let s = Store::open(dir.path("d.img"), &StoreOptions::default()).expect("reopen");
    assert!(s.read(4096, 8192).await.expect("read")[..] == data[..]);
}

#[tokio::test]
async fn discard_and_write_zeroes_read_back_zeros() {
    let dir = TempDir::new("zero");
    let s = Store::open(dir.path("d.img"), &opts(MIB)).expect("open");
    let data = Arc::new(pattern(256 * 1024, 4));
    let zero_ops: [(&str, u64, u64); 4] = [
        ("discard", 16 * 1024, 32 * 1024),
        ("zeroes", 64 * 1024, 8 * 1024),
        ("zeroes-unmap", 128 * 1024, 64 * 1024),
        ("discard-sectors", 200 * 1024 + 512, 1024),
    ];
    s.write(0, Arc::clone(&data), false).await.expect("write");
    for (what, off, len) in zero_ops {
        match what {
            "discard" | "discard-sectors" => s.discard(off, len).await,
            "zeroes" => s.write_zeroes(off, len, false).await,
            _ => s.write_zeroes(off, len, true).await,
        }
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let back = s.read(0, data.len()).await.expect("read");
    for (i, (&got, &orig)) in back.iter().zip(data.iter()).enumerate() {
        let i = i as u64;
        let zeroed = zero_ops.iter().any(|&(_, o, l)| i >= o && i < o + l);
        let want = if zeroed { 0 } else { orig };
        assert_eq!(got, want, "byte {i}");
    }
    // The file keeps its size (KEEP_SIZE).
    assert_eq!(
        std::fs::metadata(dir.path("d.img")).expect("stat").len(),
        MIB
    );
    // Range ops at the very end of the device.
    s.discard(MIB - 4096, 4096).await.expect("discard at end");
    s.write_zeroes(MIB - 4096, 4096, false)
        .await
        .expect("zeroes at end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_ops_complete() {
    let dir = TempDir::new("conc");
    // Queue depth 16 < 64 concurrent callers exercises the async back-pressure too.
    for qd in [16u32, DEFAULT_QUEUE_DEPTH] {
        let s = Store::open(
            dir.path(&format!("d{qd}.img")),
            &StoreOptions {
                create_size_bytes: Some(64 * 65536),
                queue_depth: qd,
            },
        )
        .expect("open");
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let data = Arc::new(pattern(65536, i + 1000));
                s.write(i * 65536, Arc::clone(&data), i % 4 == 0)
                    .await
                    .expect("write");
                data
            }));
        }
        let mut written = Vec::new();
        for t in tasks {
            written.push(t.await.expect("join"));
        }
        let mut tasks = Vec::new();
        for (i, data) in written.into_iter().enumerate() {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let back = s.read(i as u64 * 65536, 65536).await.expect("read");
                assert!(back[..] == data[..], "block {i}");
                if i % 8 == 0 {
                    s.flush().await.expect("flush");
                }
            }));
        }
        for t in tasks {
            t.await.expect("join");
        }
    }
}

#[tokio::test]
async fn invalid_requests_are_refused_and_store_keeps_working() {
    let dir = TempDir::new("inval");
    let size = MIB;
    let s = Store::open(dir.path("d.img"), &opts(size)).expect("open");
    let lbs = u64::from(s.logical_block_size());
    let buf = |len| Arc::new(AlignedBuf::new(len).expect("alloc"));

    assert_invalid(s.read(1, 512).await, "unaligned offset");
    assert_invalid(s.read(100, 4096).await, "unaligned offset 100");
    assert_invalid(s.read(0, 0).await, "zero length");
    assert_invalid(s.read(0, 100).await, "unaligned length");
    assert_invalid(s.read(size, 4096).await, "at end");
    assert_invalid(s.read(size - 4096, 8192).await, "crossing end");
    assert_invalid(s.read(u64::MAX - 511, 4096).await, "offset overflow");
    assert_invalid(s.read(0, MAX_BUF_LEN + 4096).await, "too long");
    assert_invalid(s.write(size, buf(4096), false).await, "write beyond");
    assert_invalid(
        s.write(512 * 3 + 1, buf(4096), true).await,
        "write unaligned",
    );
    assert_invalid(s.discard(0, 0).await, "discard 0");
    assert_invalid(s.discard(size - 4096, 8192).await, "discard beyond");
    assert_invalid(s.discard(7, 4096).await, "discard unaligned");
    assert_invalid(
        s.write_zeroes(u64::MAX - 4095, 4096, true).await,
        "zeroes overflow",
    );
    assert_invalid(
        s.write_zeroes(0, size + 4096, false).await,
        "zeroes too long",
    );
    assert_invalid(s.read_blocking(size, 4096), "blocking beyond");
    assert_invalid(
        s.write_blocking(1, &AlignedBuf::new(4096).expect("alloc"), false),
        "blocking unaligned",
    );
    if lbs == 4096 {
        assert_invalid(s.read(512, 512).await, "sub-block on a 4K device");
    }

    // Still works.
    let data = Arc::new(pattern(4096, 8));
    s.write(size - 4096, Arc::clone(&data), false)
        .await
        .expect("write");
    assert!(s.read(size - 4096, 4096).await.expect("read")[..] == data[..]);
    s.discard(0, size).await.expect("discard whole device");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_store_returns_errors_and_close_drains_in_flight() {
    let dir = TempDir::new("close");
    let s = Store::open(dir.path("d.img"), &opts(16 * MIB)).expect("open");
    let other = s.clone();

    // Writes racing with close: each either completes (and its data is there) or
    // fails with Closed; none hangs.
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let data = Arc::new(pattern(256 * 1024, i));
            let r = s.write(i * 256 * 1024, Arc::clone(&data), false).await;
            (i, data, r)
        }));
    }
    tokio::task::yield_now().await;
    let closer = s.clone();
    tokio::task::spawn_blocking(move || closer.close())
        .await
        .expect("close");
    assert!(other.is_closed());
    let mut done = Vec::new();
    for t in tasks {
        let (i, data, r) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a write hung across close")
            .expect("join");
        match r {
            Ok(()) => done.push((i, data)),
            Err(StoreError::Closed) => {}
            Err(e) => panic!("write {i}: unexpected {e}"),
        }
    }

    assert!(matches!(other.read(0, 4096).await, Err(StoreError::Closed)));
    assert!(matches!(other.flush().await, Err(StoreError::Closed)));
    assert!(matches!(
        other.write(0, Arc::new(pattern(512, 1)), true).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        other.discard(0, 4096).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        other.read_blocking(0, 4096),
        Err(StoreError::Closed)
    ));
    other.close(); // idempotent
    drop(s);
    drop(other);

    // What completed is on disk.
    let s = Store::open(dir.path("d.img"), &StoreOptions::default()).expect("reopen");
    for (i, data) in done {
        let back = s.read(i * 256 * 1024, 256 * 1024).await.expect("read");
        assert!(
            back[..] == data[..],
            "write {i} completed but is not on disk"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_futures_do_not_break_the_thread() {
    let dir = TempDir::new("dropfut");
    let s = Store::open(
        dir.path("d.img"),
        &StoreOptions {
            create_size_bytes: Some(65 * MIB),
            queue_depth: 8,
        },
    )
    .expect("open");
    let data = Arc::new(pattern(MIB_USIZE, 77));
    // Poll each op once (so it is queued or in the kernel) and drop it. They cover the
    // first 64 MiB; abandoned writes still land after their futures are gone, so the
    // checks below use the last MiB, which none of them touches.
    let mut abandoned = 0;
    for i in 0..200u64 {
        let off = (i % 64) * MIB;
        let r = if i % 2 == 0 {
            tokio::time::timeout(Duration::ZERO, s.write(off, Arc::clone(&data), false))
                .await
                .map(|r| r.map(|_| ()))
        } else {
            tokio::time::timeout(Duration::ZERO, s.read(off, MIB_USIZE))
                .await
                .map(|r| r.map(|_| ()))
        };
        if r.is_err() {
            abandoned += 1;
        }
    }
    assert!(abandoned > 0, "every op finished within its first poll");
    // The thread still serves requests, and all permits came back (qd 8, 16 at once).
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let d = Arc::new(pattern(4096, i));
            let at = 64 * MIB + i * 4096;
            s.write(at, Arc::clone(&d), false).await.expect("write");
            assert!(s.read(at, 4096).await.expect("read")[..] == d[..]);
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("store stuck after dropped futures")
            .expect("join");
    }
    // Our Arc is the only one left once the thread reaped the abandoned writes.
    s.flush().await.expect("flush");
    drop(s);
    assert_eq!(Arc::strong_count(&data), 1, "a buffer reference leaked");
}

#[tokio::test]
async fn short_reads_are_errors_not_silent() {
    let dir = TempDir::new("short");
    let p = dir.path("d.img");
    let s = Store::open(&p, &opts(MIB)).expect("open");
    s.write(0, Arc::new(pattern(MIB_USIZE, 1)), false)
        .await
        .expect("fill");
    // Someone else shrinks the file under the store.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .and_then(|f| f.set_len(MIB / 2))
        .expect("shrink");
    match s.read(MIB / 2 - 4096, 8192).await {
        Err(StoreError::Short { done, len, .. }) => assert_eq!((done, len), (4096, 8192)),
        other => panic!("expected Short, got {other:?}"),
    }
    match s.read(MIB - 4096, 4096).await {
        Err(StoreError::Short { done: 0, .. }) => {}
        other => panic!("expected Short with 0 bytes, got {other:?}"),
    }
    match s.read_blocking(MIB - 4096, 4096) {
        Err(StoreError::Short { done: 0, .. }) => {}
        other => panic!("blocking: expected Short, got {other:?}"),
    }
    // The store keeps working.
    s.read(0, 4096).await.expect("read inside");
}

#[test]
fn store_and_its_futures_are_send_and_sync() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let dir = TempDir::new("send");
    let s = Store::open(dir.path("d.img"), &opts(MIB)).expect("open");
    send_sync(&s);
    send(&s.read(0, 512));
    send(&s.write(0, Arc::new(pattern(512, 0)), false));
    send(&s.flush());
    send(&s.discard(0, 512));
    send(&s.write_zeroes(0, 512, true));
}

#[test]
fn errno_mapping() {
    let e = StoreError::from_errno(StoreOp::Write, libc::ENOSPC);
    assert!(matches!(e, StoreError::NoSpace { .. }));
    assert_eq!(e.errno(), Some(libc::ENOSPC));
    assert!(matches!(
        StoreError::from_errno(StoreOp::Write, libc::EDQUOT),
        StoreError::NoSpace { .. }
    ));
    let e = StoreError::from_errno(StoreOp::Read, libc::EIO);
    assert!(matches!(
        e,
        StoreError::Io {
            errno: libc::EIO,
            ..
        }
    ));
    assert!(e.to_string().contains("errno 5"), "{e}");
    assert!(matches!(
        StoreError::from_errno(StoreOp::Discard, libc::EOPNOTSUPP),
        StoreError::Unsupported { .. }
    ));
    assert_eq!(StoreError::Closed.errno(), None);
}

// ---------------------------------------------------------------------------------------
// Root-only tests: loop devices and a tiny tmpfs.

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A loop device over a file, detached on drop.
struct LoopDev {
    dev: PathBuf,
}

impl LoopDev {
    fn attach(file: &Path, extra: &[&str]) -> Self {
        let out = Command::new("losetup")
            .args(extra)
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .unwrap_or_else(|e| {
                panic!("loop-device test needs `losetup` (util-linux) in PATH and root: {e}")
            });
        assert!(
            out.status.success(),
            "`losetup -f --show {}` failed (needs root): {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            std::fs::metadata(&dev)
                .map(|m| m.file_type().is_block_device())
                .unwrap_or(false),
            "losetup printed {dev:?}, not a block device"
        );
        LoopDev { dev }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// What the kernel says a block device's physical block size is (what `BLKPBSZGET`
/// returns, read another way).
fn sysfs_physical_block_size(dev: &Path) -> u32 {
    let name = dev.file_name().expect("device name").to_string_lossy();
    let text = std::fs::read_to_string(format!("/sys/block/{name}/queue/physical_block_size"))
        .expect("sysfs physical_block_size");
    text.trim().parse().expect("a number")
}

fn loop_available() -> bool {
    if Path::new("/dev/loop-control").exists() {
        true
    } else {
        eprintln!("SKIPPED: /dev/loop-control is absent; loop-device store tests did not run");
        false
    }
}

#[tokio::test]
async fn block_device_size_block_size_and_range_ops() {
    if !loop_available() {
        return;
    }
    let dir = TempDir::new("loop");
    let img = dir.path("backing.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(64 * MIB))
        .expect("backing file");
    let lo = LoopDev::attach(&img, &[]);
    {
        let s = Store::open(&lo.dev, &StoreOptions::default()).expect("open loop device");
        assert_eq!(s.kind(), DeviceKind::BlockDevice);
        assert_eq!(s.size_bytes(), 64 * MIB);
        assert_eq!(s.logical_block_size(), 512);
        assert_eq!(s.physical_block_size(), sysfs_physical_block_size(&lo.dev));
        // create_size_bytes larger than the device is refused, never "created".
        assert!(matches!(
            Store::open(&lo.dev, &opts(128 * MIB)),
            Err(StoreError::TooSmall { .. })
        ));

        let data = Arc::new(pattern(MIB_USIZE, 11));
        s.write(3 * MIB, Arc::clone(&data), true)
            .await
            .expect("write");
        assert!(s.read(3 * MIB, MIB_USIZE).await.expect("read")[..] == data[..]);
        s.flush().await.expect("flush");

        // fallocate paths (PUNCH_HOLE / ZERO_RANGE on the block device).
        s.write_zeroes(3 * MIB, 4096, false)
            .await
            .expect("zero range");
        s.write_zeroes(3 * MIB + 8192, 4096, true)
            .await
            .expect("zero unmap");
        s.discard(3 * MIB + 65536, 65536).await.expect("discard");
        let back = s.read(3 * MIB, MIB_USIZE).await.expect("read");
        assert!(back[..4096].iter().all(|&b| b == 0), "zero range");
        assert!(back[4096..8192] == data[4096..8192], "untouched");
        assert!(back[8192..12288].iter().all(|&b| b == 0), "zero unmap");
        // Loop devices implement write-zeroes with unmap, so the punch-hole discard zeroes.
        assert!(back[65536..131072].iter().all(|&b| b == 0), "discard");
        assert!(back[131072..] == data[131072..], "untouched tail");

        // The ioctl fallbacks on the helper thread.
        s.write(5 * MIB, Arc::clone(&data), false)
            .await
            .expect("write");
        s.range_ioctl_for_test(RangeIoctl::ZeroOut, 5 * MIB, 16384)
            .await
            .expect("BLKZEROOUT");
        s.range_ioctl_for_test(RangeIoctl::Discard, 5 * MIB + 65536, 65536)
            .await
            .expect("BLKDISCARD");
        let back = s.read(5 * MIB, MIB_USIZE).await.expect("read");
        assert!(back[..16384].iter().all(|&b| b == 0), "BLKZEROOUT");
        assert!(back[16384..65536] == data[16384..65536], "untouched");
        // The same chains through a completion sink.
        let rec = Recorder::new();
        let sink: Arc<dyn Completions> = rec.clone();
        let zeroes = SinkOp::WriteZeroes {
            offset: 5 * MIB + 131072,
            len: 8192,
            may_unmap: false,
        };
        s.submit_to(zeroes, &sink, 1).expect("sink zeroes");
        let discard = SinkOp::Discard {
            offset: 5 * MIB + 262144,
            len: 65536,
        };
        s.submit_to(discard, &sink, 2).expect("sink discard");
        rec.wait_for(2).await;
        assert_eq!(rec.seen().iter().filter(|(_, r)| r.is_ok()).count(), 2);
        let back = s.read(5 * MIB, MIB_USIZE).await.expect("read");
        assert!(back[131072..139264].iter().all(|&b| b == 0), "sink zeroes");
        assert!(back[139264..262144] == data[139264..262144], "untouched");
        assert!(back[262144..327680].iter().all(|&b| b == 0), "sink discard");
        // The kernel rejects an ioctl range beyond the device; the error keeps its errno.
        let e = s
            .range_ioctl_for_test(RangeIoctl::ZeroOut, 0, 128 * MIB)
            .await
            .expect_err("zeroout beyond the end");
        assert!(e.errno().is_some(), "{e}");
        s.close();
    }

    // A 4096-byte-sector loop device: 512-aligned requests are refused before submission.
    let lo4k = LoopDev::attach(&img, &["--sector-size", "4096"]);
    let s = Store::open(&lo4k.dev, &StoreOptions::default()).expect("open 4K loop");
    assert_eq!(s.logical_block_size(), 4096);
    assert_eq!(s.physical_block_size(), 4096);
    assert_invalid(s.read(512, 4096).await, "512-aligned offset on 4K device");
    assert_invalid(s.read(0, 512).await, "512 length on 4K device");
    let d = Arc::new(pattern(8192, 12));
    s.write(8192, Arc::clone(&d), false).await.expect("write");
    assert!(s.read(8192, 8192).await.expect("read")[..] == d[..]);
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A sparse 8 MiB store on a 1 MiB tmpfs mounted for the test (unmounted when the
/// `Mount` drops); `None` (and a SKIPPED line) where this kernel's tmpfs has no O_DIRECT
/// (Linux < 6.6). Needs root.
fn store_on_a_full_tmpfs(name: &str) -> Option<(TempDir, Mount, Store)> {
    let dir = TempDir::new(name);
    let mnt = dir.path("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tandem-test"])
        .arg(&mnt)
        .status()
        .expect("mount(8) is needed");
    assert!(st.success(), "mounting a tmpfs failed");
    let m = Mount(mnt.clone());
    match Store::open(mnt.join("d.img"), &opts(8 * MIB)) {
        Ok(s) => Some((dir, m, s)),
        Err(StoreError::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("SKIPPED: this kernel's tmpfs has no O_DIRECT (Linux < 6.6)");
            None
        }
        Err(e) => panic!("open on tmpfs: {e}"),
    }
}

#[tokio::test]
async fn full_device_reports_no_space() {
    if !is_root() {
        eprintln!("SKIPPED: full_device_reports_no_space needs root to mount a 1 MiB tmpfs");
        return;
    }
    let Some((_dir, _m, s)) = store_on_a_full_tmpfs("nospc") else {
        return;
    };
    let data = Arc::new(pattern(MIB_USIZE, 1));
    let mut saw_nospace = false;
    for i in 0..8 {
        match s.write(i * MIB, Arc::clone(&data), false).await {
            Ok(()) => {}
            Err(e @ StoreError::NoSpace { .. }) => {
                assert_eq!(e.errno(), Some(libc::ENOSPC));
                saw_nospace = true;
                break;
            }
            Err(e) => panic!("expected NoSpace, got {e}"),
        }
    }
    assert!(saw_nospace, "8 MiB of writes fit into a 1 MiB tmpfs");
    // Freeing space makes writes work again: the store did not wedge.
    s.discard(0, 8 * MIB).await.expect("punch everything");
    s.write(0, Arc::clone(&data), false)
        .await
        .expect("write after freeing");
    s.close();
}

// ----- the completion-sink path (`Store::submit_to`) -----------------------------------

/// Records every completion it gets (a read's buffer apart), and the ops in flight at
/// that moment.
struct Recorder {
    store: std::sync::OnceLock<Store>,
    seen: std::sync::Mutex<Vec<(u64, Result<(), String>)>>,
    bufs: std::sync::Mutex<std::collections::HashMap<u64, AlignedBuf>>,
    max_in_flight: std::sync::atomic::AtomicUsize,
    more: tokio::sync::Notify,
}

impl Recorder {
    fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            store: std::sync::OnceLock::new(),
            seen: std::sync::Mutex::new(Vec::new()),
            bufs: std::sync::Mutex::new(std::collections::HashMap::new()),
            max_in_flight: std::sync::atomic::AtomicUsize::new(0),
            more: tokio::sync::Notify::new(),
        })
    }

    fn seen(&self) -> Vec<(u64, Result<(), String>)> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits (≤ 10 s) until `n` completions arrived.
    async fn wait_for(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let more = self.more.notified();
            if self.seen.lock().unwrap().len() >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, more).await.is_err() {
                panic!("{} of {n} completions after 10 s", self.seen().len());
            }
        }
    }
}

impl Completions for Recorder {
    fn done(&self, token: u64, result: Result<(), StoreError>) {
        if let Some(s) = self.store.get() {
            // Ops holding a permit now (this one released its own before the call).
            self.max_in_flight
                .fetch_max(s.ops_in_flight(), std::sync::atomic::Ordering::SeqCst);
        }
        self.seen
            .lock()
            .unwrap()
            .push((token, result.map_err(|e| e.to_string())));
        self.more.notify_one();
    }

    fn read_done(&self, token: u64, result: Result<AlignedBuf, StoreError>) {
        let result = result.map(|buf| {
            self.bufs.lock().unwrap().insert(token, buf);
        });
        self.done(token, result);
    }
}

/// The result recorded for `token`.
fn result_of(rec: &Recorder, token: u64) -> Result<(), String> {
    let seen = rec.seen();
    let mut found = seen.iter().filter(|(t, _)| *t == token);
    let r = found
        .next()
        .unwrap_or_else(|| panic!("no completion for {token}"));
    assert!(found.next().is_none(), "two completions for {token}");
    r.1.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_is_called_once_per_op_within_the_queue_depth() {
    let dir = TempDir::new("sink");
    let qd = 4u32;
    let s = Store::open(
        dir.path("d.img"),
        &StoreOptions {
            create_size_bytes: Some(MIB),
            queue_depth: qd,
        },
    )
    .expect("open");
    let rec = Recorder::new();
    rec.store.set(s.clone()).expect("once");
    let sink: Arc<dyn Completions> = rec.clone();
    // 64 writes (owned and shared buffers, some FUA) and 8 flushes, far more than the
    // queue depth: the ones without a permit wait in the store's fallback.
    let mut tokens = Vec::new();
    for i in 0..64u64 {
        let data = if i % 2 == 0 {
            WriteData::Owned(pattern(4096, i))
        } else {
            WriteData::Shared(Arc::new(pattern(4096, i)))
        };
        let op = SinkOp::Write {
            offset: i * 4096,
            data,
            fua: i % 5 == 0,
        };
        s.submit_to(op, &sink, i).expect("submit");
        assert!(s.ops_in_flight() <= qd as usize);
        tokens.push(i);
        if i % 8 == 7 {
            s.submit_to(SinkOp::Flush, &sink, 1000 + i).expect("flush");
            tokens.push(1000 + i);
        }
    }
    rec.wait_for(tokens.len()).await;
    // Nothing more arrives: each op completed exactly once.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut seen = rec.seen();
    assert_eq!(seen.len(), tokens.len(), "one completion per op");
    seen.sort_by_key(|(t, _)| *t);
    let got: Vec<u64> = seen.iter().map(|(t, _)| *t).collect();
    tokens.sort_unstable();
    assert_eq!(got, tokens);
    assert!(seen.iter().all(|(_, r)| r.is_ok()), "{seen:?}");
    let max = rec.max_in_flight.load(std::sync::atomic::Ordering::SeqCst);
    assert!(max <= qd as usize, "{max} ops in flight at once");
    assert_eq!(s.ops_in_flight(), 0);
    for i in 0..64u64 {
        let back = s.read(i * 4096, 4096).await.expect("read");
        assert!(back[..] == pattern(4096, i)[..], "block {i}");
    }
}

/// An op that fails at its submission (here a refused SQE push, which a real ring never
/// does) is delivered by the reaper, never from inside `submit_to`: the volume submits
/// from a step whose completion must not re-enter it.
#[tokio::test(flavor = "current_thread")]
async fn a_failure_at_submission_is_not_delivered_inline() {
    let dir = TempDir::new("sinkinline");
    let s = Store::open(
        dir.path("d.img"),
        &StoreOptions {
            create_size_bytes: Some(MIB),
            queue_depth: 4,
        },
    )
    .expect("open");
    let rec = Recorder::new();
    let sink: Arc<dyn Completions> = rec.clone();
    s.refuse_pushes(true);
    let op = SinkOp::Write {
        offset: 0,
        data: WriteData::Owned(pattern(4096, 1)),
        fua: false,
    };
    s.submit_to(op, &sink, 7).expect("submit");
    assert!(rec.seen().is_empty(), "delivered inside submit_to");
    rec.wait_for(1).await;
    let r = result_of(&rec, 7);
    assert!(
        r.as_ref()
            .is_err_and(|e| e.contains("EBUSY") || e.contains("busy")),
        "{r:?}"
    );
    s.refuse_pushes(false);
    s.submit_to(SinkOp::Flush, &sink, 8).expect("submit");
    rec.wait_for(2).await;
    assert_eq!(result_of(&rec, 8), Ok(()));
    assert_eq!(s.ops_in_flight(), 0);
}

#[test]
fn sink_gets_errors_and_refusals_are_not_delivered() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = TempDir::new("sinkerr");
    let s = Store::open(
        dir.path("d.img"),
        &StoreOptions {
            create_size_bytes: Some(MIB),
            queue_depth: 1,
        },
    )
    .expect("open");
    let rec = Recorder::new();
    let sink: Arc<dyn Completions> = rec.clone();
    rt.block_on(async {
        // An invalid request is refused at once; the sink never hears of it.
        let bad = SinkOp::Write {
            offset: 100,
            data: WriteData::Owned(pattern(4096, 1)),
            fua: false,
        };
        assert_invalid(s.submit_to(bad, &sink, 9), "unaligned sink write");
        // Op 1 takes the only permit; op 2 waits for it in a task that has not run yet
        // (one thread, no await in between).
        let w = |seed| SinkOp::Write {
            offset: 0,
            data: WriteData::Owned(pattern(4096, seed)),
            fua: false,
        };
        s.submit_to(w(1), &sink, 1).expect("op 1");
        s.submit_to(w(2), &sink, 2).expect("op 2 (queued)");
        assert_eq!(s.ops_in_flight(), 1, "the queued op holds no permit");
        // Closing reaps op 1 (its sink is called from the closing thread) and refuses
        // the waiting op 2, which gets `Closed` through the sink.
        s.close();
        assert_eq!(rec.seen(), vec![(1, Ok(()))]);
        rec.wait_for(2).await;
        let seen = rec.seen();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].0, 2);
        assert_eq!(seen[1].1, Err(StoreError::Closed.to_string()));
        // After close: refused at once, not delivered.
        assert!(matches!(
            s.submit_to(SinkOp::Flush, &sink, 3),
            Err(StoreError::Closed)
        ));
        tokio::task::yield_now().await;
        assert_eq!(rec.seen().len(), 2);
    });
}

#[tokio::test]
async fn sink_gets_kernel_errors() {
    if !is_root() {
        eprintln!("SKIPPED: sink_gets_kernel_errors needs root to mount a 1 MiB tmpfs");
        return;
    }
    let Some((_dir, _m, s)) = store_on_a_full_tmpfs("sinknospc") else {
        return;
    };
    let rec = Recorder::new();
    let sink: Arc<dyn Completions> = rec.clone();
    let data = Arc::new(pattern(MIB_USIZE, 1));
    for i in 0..8u64 {
        let op = SinkOp::Write {
            offset: i * MIB,
            data: WriteData::Shared(Arc::clone(&data)),
            fua: false,
        };
        s.submit_to(op, &sink, i).expect("submit");
    }
    rec.wait_for(8).await;
    let seen = rec.seen();
    let nospace = StoreError::NoSpace {
        op: StoreOp::Write,
        errno: libc::ENOSPC,
    }
    .to_string();
    assert!(
        seen.iter().any(|(_, r)| r.as_ref().err() == Some(&nospace)),
        "8 MiB of sink writes fit into a 1 MiB tmpfs: {seen:?}"
    );
    // Zeroes that must stay allocated, in a hole of the full tmpfs: no room for them
    // (or no ZERO_RANGE on tmpfs at all); the error reaches the sink either way.
    let zeroes = SinkOp::WriteZeroes {
        offset: 7 * MIB,
        len: MIB,
        may_unmap: false,
    };
    s.submit_to(zeroes, &sink, 8).expect("submit");
    rec.wait_for(9).await;
    let e = result_of(&rec, 8).expect_err("zero range on a full tmpfs");
    assert!(e.contains("write-zeroes"), "{e}");
    s.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_reads_hand_back_the_filled_buffer() {
    let dir = TempDir::new("sinkread");
    let p = dir.path("d.img");
    let s = Store::open(&p, &opts(4 * MIB)).expect("open");
    let data = Arc::new(pattern(2 * MIB_USIZE, 21));
    s.write(0, Arc::clone(&data), false).await.expect("fill");
    let rec = Recorder::new();
    let sink: Arc<dyn Completions> = rec.clone();
    // Pooled buffers hold stale bytes: the read must overwrite every one.
    let reads: [(u64, u64, usize); 4] = [
        (1, 0, 4096),
        (2, 12288, 8192),
        (3, MIB, MIB_USIZE),
        (4, 2 * MIB - 512, 512),
    ];
    for (token, offset, len) in reads {
        let mut buf = AlignedBuf::from_pool(len).expect("buffer");
        buf.fill(0xA5);
        s.submit_to(SinkOp::Read { offset, buf }, &sink, token)
            .expect("submit read");
    }
    // A no-op comes back through `done` too.
    s.submit_to(SinkOp::Nop, &sink, 5).expect("nop");
    // Refused at once, never delivered: unaligned, beyond the end.
    let buf = || AlignedBuf::new(4096).expect("buffer");
    assert_invalid(
        s.submit_to(
            SinkOp::Read {
                offset: 100,
                buf: buf(),
            },
            &sink,
            90,
        ),
        "unaligned sink read",
    );
    assert_invalid(
        s.submit_to(
            SinkOp::Read {
                offset: 4 * MIB,
                buf: buf(),
            },
            &sink,
            91,
        ),
        "sink read beyond the end",
    );
    rec.wait_for(5).await;
    for (token, offset, len) in reads {
        assert_eq!(result_of(&rec, token), Ok(()), "read {token}");
        let got = rec
            .bufs
            .lock()
            .unwrap()
            .remove(&token)
            .expect("buffer back");
        assert_eq!(got.len(), len);
        let at = usize::try_from(offset).unwrap();
        assert!(
            got[..] == data[at..at + len],
            "read {token} has the written bytes"
        );
    }
    assert_eq!(result_of(&rec, 5), Ok(()), "nop");
    // A read the kernel cuts short (the file shrank under the store) fails through the
    // sink, without its buffer.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .and_then(|f| f.set_len(MIB))
        .expect("shrink");
    s.submit_to(
        SinkOp::Read {
            offset: MIB,
            buf: buf(),
        },
        &sink,
        6,
    )
    .expect("submit");
    rec.wait_for(6).await;
    let err = result_of(&rec, 6).expect_err("read past the shrunk end");
    assert!(err.contains("short"), "{err}");
    assert!(rec.bufs.lock().unwrap().is_empty());
    assert_eq!(s.ops_in_flight(), 0);
    s.close();
    // After close: refused at once.
    assert!(matches!(
        s.submit_to(
            SinkOp::Read {
                offset: 0,
                buf: buf()
            },
            &sink,
            7
        ),
        Err(StoreError::Closed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_discard_and_write_zeroes_read_back_zeros() {
    let dir = TempDir::new("sinkzero");
    let s = Store::open(dir.path("d.img"), &opts(MIB)).expect("open");
    let data = Arc::new(pattern(256 * 1024, 22));
    s.write(0, Arc::clone(&data), false).await.expect("write");
    let rec = Recorder::new();
    let sink: Arc<dyn Completions> = rec.clone();
    let ops = [
        SinkOp::Discard {
            offset: 16 * 1024,
            len: 32 * 1024,
        },
        SinkOp::WriteZeroes {
            offset: 64 * 1024,
            len: 8 * 1024,
            may_unmap: false,
        },
        SinkOp::WriteZeroes {
            offset: 128 * 1024,
            len: 64 * 1024,
            may_unmap: true,
        },
        SinkOp::Discard {
            offset: 200 * 1024 + 512,
            len: 1024,
        },
    ];
    let zeroed: Vec<(u64, u64)> = ops
        .iter()
        .map(|op| match op {
            SinkOp::Discard { offset, len } | SinkOp::WriteZeroes { offset, len, .. } => {
                (*offset, *len)
            }
            _ => unreachable!(),
        })
        .collect();
    for (token, op) in (0u64..).zip(ops) {
        s.submit_to(op, &sink, token).expect("submit");
    }
    // Refused at once: a range beyond the device, a zero length.
    let beyond = SinkOp::Discard {
        offset: MIB - 4096,
        len: 8192,
    };
    assert_invalid(s.submit_to(beyond, &sink, 90), "discard beyond the end");
    let empty = SinkOp::WriteZeroes {
        offset: 0,
        len: 0,
        may_unmap: true,
    };
    assert_invalid(s.submit_to(empty, &sink, 91), "empty write-zeroes");
    rec.wait_for(4).await;
    for token in 0..4 {
        assert_eq!(result_of(&rec, token), Ok(()), "op {token}");
    }
    let back = s.read(0, data.len()).await.expect("read");
    for (i, (&got, &orig)) in back.iter().zip(data.iter()).enumerate() {
        let i = i as u64;
        let z = zeroed.iter().any(|&(o, l)| i >= o && i < o + l);
        assert_eq!(got, if z { 0 } else { orig }, "byte {i}");
    }
    assert_eq!(rec.seen().len(), 4, "refused ops are not delivered");
}
