//! The NBD frontend driven by real clients: `nbdinfo`, `nbdsh` (libnbd), `qemu-img`, `fio`
//! with its nbd engine, plus a raw-socket client for hostile input and exact ordering.
//!
//! The target is a test double for frontend tests only: a `Vec<u8>` behind a mutex that
//! records what it was asked (FUA, flushes, discards, write-zeroes modes) and the highest
//! number of requests it had in flight. It can delay every operation (so concurrency is
//! observable) and hold reads at one offset behind a gate (so reply order is provable
//! without timing). Missing tools fail the test with the Debian package to install.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_engine::frontend::nbd::{ListenAddr, NbdListener, NbdOptions};
use tandem_engine::frontend::{
    BlockError, BlockIo, BlockReply, BlockRequest, BlockTarget, TargetInfo,
};
use tokio::sync::{watch, Semaphore};

const MIB: usize = 1 << 20;

/// Reads at this offset wait for [`MemTarget::open_gate`].
const GATE_OFFSET: u64 = 1 << 20;

#[derive(Default)]
struct Stats {
    writes: AtomicU64,
    fua_writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    zeroes_unmap: AtomicU64,
    zeroes_no_hole: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    bytes_in_flight: AtomicUsize,
    max_bytes_in_flight: AtomicUsize,
}

struct MemTarget {
    data: Mutex<Vec<u8>>,
    /// What `info` answers instead of [`TargetInfo::simple`], when set.
    shape: Mutex<Option<TargetInfo>>,
    writable: bool,
    delay: Duration,
    gated: AtomicBool,
    gate: Semaphore,
    stats: Stats,
}

impl MemTarget {
    fn new(size: usize, writable: bool, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0u8; size]),
            shape: Mutex::new(None),
            writable,
            delay,
            gated: AtomicBool::new(false),
            gate: Semaphore::new(0),
            stats: Stats::default(),
        })
    }

    fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    fn open_gate(&self) {
        self.gate.add_permits(1);
    }

    fn count(c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, BlockError> {
        let start = usize::try_from(offset).map_err(|_| BlockError::Invalid)?;
        let end = start
            .checked_add(usize::try_from(len).map_err(|_| BlockError::Invalid)?)
            .ok_or(BlockError::Invalid)?;
        if end > self.data.lock().unwrap().len() {
            return Err(BlockError::Invalid);
        }
        Ok(start..end)
    }

    fn apply(&self, io: BlockIo) -> Result<BlockReply, BlockError> {
        let s = &self.stats;
        match io {
            BlockIo::Read { offset, mut buf } => {
                let r = self.range(offset, buf.len() as u64)?;
                buf.copy_from_slice(&self.data.lock().unwrap()[r]);
                Ok(BlockReply::Data(buf))
            }
            BlockIo::Write { offset, data, fua } => {
                if !self.writable {
                    return Err(BlockError::ReadOnly);
                }
                let r = self.range(offset, data.len() as u64)?;
                self.data.lock().unwrap()[r].copy_from_slice(&data);
                s.writes.fetch_add(1, Ordering::SeqCst);
                if fua {
                    s.fua_writes.fetch_add(1, Ordering::SeqCst);
                }
                Ok(BlockReply::Done)
            }
            BlockIo::Flush => {
                s.flushes.fetch_add(1, Ordering::SeqCst);
                Ok(BlockReply::Done)
            }
            BlockIo::Discard { offset, len, .. } => {
                let r = self.range(offset, len)?;
                self.data.lock().unwrap()[r].fill(0);
                s.discards.fetch_add(1, Ordering::SeqCst);
                Ok(BlockReply::Done)
            }
            BlockIo::WriteZeroes {
                offset,
                len,
                may_unmap,
                ..
            } => {
                let r = self.range(offset, len)?;
                self.data.lock().unwrap()[r].fill(0);
                let c = if may_unmap {
                    &s.zeroes_unmap
                } else {
                    &s.zeroes_no_hole
                };
                c.fetch_add(1, Ordering::SeqCst);
                Ok(BlockReply::Done)
            }
        }
    }
}

impl BlockTarget for MemTarget {
    fn info(&self) -> TargetInfo {
        let simple = TargetInfo::simple(self.data.lock().unwrap().len() as u64, self.writable);
        self.shape.lock().unwrap().unwrap_or(simple)
    }

    async fn submit(&self, req: BlockRequest) -> Result<BlockReply, BlockError> {
        let io = req.io;
        let now = self.stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let bytes = match &io {
            BlockIo::Read { buf, .. } => buf.len(),
            BlockIo::Write { data, .. } => data.len(),
            _ => 0,
        };
        let now_bytes = self
            .stats
            .bytes_in_flight
            .fetch_add(bytes, Ordering::SeqCst)
            + bytes;
        self.stats
            .max_bytes_in_flight
            .fetch_max(now_bytes, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if let BlockIo::Read {
            offset: GATE_OFFSET,
            ..
        } = io
        {
            if self.gated.load(Ordering::SeqCst) {
                self.gate.acquire().await.unwrap().forget();
            }
        }
        let result = self.apply(io);
        self.stats.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.stats
            .bytes_in_flight
            .fetch_sub(bytes, Ordering::SeqCst);
        result
    }
}

/// An NBD server on its own runtime thread; dropping it shuts it down and joins it.
struct Server {
    addr: ListenAddr,
    shutdown: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    dir: PathBuf,
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tandem-nbd-test-{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Server {
    fn start(target: Arc<MemTarget>, unix: bool, opts: NbdOptions) -> Server {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "tandem_engine=info".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = scratch_dir();
        let socket = dir.join("nbd.sock");
        let (shutdown, rx) = watch::channel(false);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = if unix {
                    NbdListener::bind_unix(&socket)?
                } else {
                    NbdListener::bind_tcp("127.0.0.1:0".parse().unwrap()).await?
                };
                addr_tx.send(listener.local_addr()?).unwrap();
                listener.serve(target, opts, rx).await
            })
        });
        let addr = addr_rx.recv().expect("server failed to bind");
        Server {
            addr,
            shutdown,
            thread: Some(thread),
            dir,
        }
    }

    fn uri(&self) -> String {
        match &self.addr {
            ListenAddr::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
            ListenAddr::Tcp(a) => format!("nbd://{a}/"),
        }
    }

    fn socket(&self) -> &Path {
        match &self.addr {
            ListenAddr::Unix(p) => p,
            ListenAddr::Tcp(_) => panic!("not a unix server"),
        }
    }

    fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            t.join()
                .expect("server thread panicked")
                .expect("server failed");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_inner();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a client tool; fails with the Debian package to install when it is missing.
fn run(tool: &str, package: &str, args: &[&str]) -> String {
    run_with_path(tool, package, args, None)
}

fn run_with_path(tool: &str, package: &str, args: &[&str], path: Option<&str>) -> String {
    let mut cmd = Command::new(tool);
    cmd.args(args);
    if let Some(path) = path {
        cmd.env("PATH", path);
    }
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{tool}` is not installed: install the Debian package `{package}`")
        }
        Err(e) => panic!("cannot run {tool}: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn nbdinfo(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&run("nbdinfo", "libnbd-bin", args)).expect("nbdinfo --json output")
}

fn nbdsh(uri: &str, script: &str) {
    // nbdsh is `#!/usr/bin/env python3` and its module lives in the system Python; put
    // /usr/bin first so a Python from pyenv or a venv does not shadow it.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    run_with_path(
        "nbdsh",
        "python3-libnbd",
        &["-u", uri, "-c", script],
        Some(&path),
    );
}

fn opts() -> NbdOptions {
    NbdOptions {
        export_name: "vol0".into(),
        description: "tandem test volume".into(),
        ..NbdOptions::default()
    }
}

#[test]
fn nbdinfo_shows_size_flags_and_block_sizes() {
    for unix in [true, false] {
        let target = MemTarget::new(8 * MIB, true, Duration::ZERO);
        let server = Server::start(target, unix, opts());
        let v = nbdinfo(&["--json", &server.uri()]);
        let e = &v["exports"][0];
        assert_eq!(v["protocol"], "newstyle-fixed", "{v}");
        assert_eq!(e["export-size"], 8 * MIB as u64, "{v}");
        assert_eq!(e["is_read_only"], false, "{v}");
        for flag in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_multi_conn",
        ] {
            assert_eq!(e[flag], true, "{flag}: {v}");
        }
        assert_eq!(e["block_size_minimum"], 512, "{v}");
        assert_eq!(e["block_size_preferred"], 4096, "{v}");
        assert_eq!(e["block_size_maximum"], 32 * MIB as u64, "{v}");
        assert_eq!(e["description"], "tandem test volume", "{v}");

        // NBD_OPT_LIST then NBD_OPT_INFO on the listed name.
        let list = nbdinfo(&["--list", "--json", &server.uri()]);
        assert_eq!(list["exports"][0]["export-name"], "vol0", "{list}");
        assert_eq!(list["exports"][0]["export-size"], 8 * MIB as u64, "{list}");
        server.stop();
    }
}

#[test]
fn unknown_export_is_refused_and_named_export_works() {
    let target = MemTarget::new(MIB, true, Duration::ZERO);
    let server = Server::start(target, true, opts());
    let sock = server.socket().display().to_string();
    let v = nbdinfo(&["--json", &format!("nbd+unix:///vol0?socket={sock}")]);
    assert_eq!(v["exports"][0]["export-size"], MIB as u64);
    let out = Command::new("nbdinfo")
        .arg(format!("nbd+unix:///nosuch?socket={sock}"))
        .output()
        .expect("nbdinfo (Debian package libnbd-bin)");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT.
    assert!(err.contains("No such file or directory"), "{err}");
}

/// A raw image with random data, runs of zeroes and a repeated pattern.
fn make_image(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut img = vec![0u8; len];
    for (i, chunk) in img.chunks_mut(64 * 1024).enumerate() {
        match i % 4 {
            0 => rng.fill(chunk),
            1 => {} // zeroes: qemu-img sends WRITE_ZEROES or skips them
            2 => chunk.fill(0x5a),
            _ => rng.fill(&mut chunk[..4096]),
        }
    }
    std::fs::write(path, &img).unwrap();
    img
}

#[test]
fn qemu_img_convert_and_compare() {
    for unix in [true, false] {
        let target = MemTarget::new(16 * MIB, true, Duration::ZERO);
        // Start non-zero so zero runs in the image must really be written.
        target.data.lock().unwrap().fill(0xee);
        let server = Server::start(Arc::clone(&target), unix, opts());
        let src = server.dir.join("src.raw");
        let img = make_image(&src, 16 * MIB, 7);
        let src = src.to_str().unwrap();
        let uri = server.uri();
        run(
            "qemu-img",
            "qemu-utils",
            &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
        );
        assert!(target.snapshot() == img, "export differs from the image");
        run(
            "qemu-img",
            "qemu-utils",
            &["compare", "-f", "raw", "-F", "raw", src, &uri],
        );
        // And compare notices a difference: the test can fail.
        target.data.lock().unwrap()[12345] ^= 1;
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", src, &uri])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "qemu-img compare must see the flipped bit"
        );
        server.stop();
    }
}

#[test]
fn fio_randwrite_verify_runs_32_deep() {
    // (unix socket?, per-connection in-flight bound)
    for (unix, bound) in [(true, 128), (false, 128), (true, 4)] {
        // Every op sleeps 1 ms so requests overlap observably.
        let target = MemTarget::new(64 * MIB, true, Duration::from_millis(1));
        let opts = NbdOptions {
            max_in_flight: bound,
            ..opts()
        };
        let server = Server::start(Arc::clone(&target), unix, opts);
        let uri = format!("--uri={}", server.uri());
        run(
            "fio",
            "fio",
            &[
                "--name=nbd-qd32",
                "--ioengine=nbd",
                &uri,
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--size=8m",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--output-format=terse",
            ],
        );
        let max = target.stats.max_in_flight.load(Ordering::SeqCst);
        if bound >= 32 {
            assert!(max >= 8, "only {max} requests were ever in flight at once");
        } else {
            assert!(max <= bound as usize, "{max} in flight, bound {bound}");
        }
        assert!(MemTarget::count(&target.stats.writes) >= 2048);
        server.stop();
    }
}

/// Large requests are bounded by bytes, not only by count: 16 MiB writes at depth 8 would
/// be 128 MiB in flight; the connection's 64 MiB budget lets at most four through.
#[test]
fn large_writes_are_bounded_by_the_byte_budget() {
    // Each op takes 300 ms, far longer than reading 128 MiB from the socket.
    let target = MemTarget::new(256 * MIB, true, Duration::from_millis(300));
    let server = Server::start(Arc::clone(&target), true, opts());
    let uri = format!("--uri={}", server.uri());
    run(
        "fio",
        "fio",
        &[
            "--name=nbd-big",
            "--ioengine=nbd",
            &uri,
            "--rw=write",
            "--bs=16m",
            "--iodepth=8",
            "--size=256m",
            "--output-format=terse",
        ],
    );
    let max = target.stats.max_bytes_in_flight.load(Ordering::SeqCst);
    assert_eq!(tandem_engine::frontend::nbd::MAX_BYTES_IN_FLIGHT, 64 * MIB);
    assert!(
        max <= 64 * MIB,
        "{max} bytes in flight on one connection, budget 64 MiB"
    );
    assert!(
        max >= 32 * MIB,
        "only {max} bytes were ever in flight: no concurrency"
    );
    server.stop();
}

#[test]
fn nbdsh_trim_zero_flush_fua_and_errors() {
    let target = MemTarget::new(4 * MIB, true, Duration::ZERO);
    let server = Server::start(Arc::clone(&target), true, opts());
    nbdsh(
        &server.uri(),
        r#"
import errno
assert h.get_size() == 4 * 1024 * 1024
assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero() and h.can_multi_conn()
h.pwrite(b'\x11' * 8192, 0)
assert h.pread(8192, 0) == b'\x11' * 8192
h.pwrite(b'\x22' * 4096, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 4096) == b'\x22' * 4096
h.flush()
h.zero(4096, 0)
assert h.pread(8192, 0) == bytes(4096) + b'\x22' * 4096
h.zero(4096, 4096, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 0) == bytes(8192)
h.pwrite(b'\x33' * 65536, 65536)
h.trim(65536, 65536, nbd.CMD_FLAG_FUA)
h.flush()
# 64 pipelined writes, then 64 pipelined reads of them.
for i in range(64):
    h.aio_pwrite(bytes([i + 1]) * 4096, 1048576 + i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
bufs = [nbd.Buffer(4096) for _ in range(64)]
for i in range(64):
    h.aio_pread(bufs[i], 1048576 + i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
for i in range(64):
    assert bufs[i].to_bytearray() == bytes([i + 1]) * 4096, i
# The server's own checks, with libnbd's client-side checks off.
h.set_strict_mode(0)
for (fn, args, want) in [
    (h.pread, (512, 100), errno.EINVAL),              # unaligned offset
    (h.pread, (100, 0), errno.EINVAL),                # unaligned length
    (h.pread, (4096, 4 * 1024 * 1024), errno.EINVAL), # past the end
    (h.pwrite, (b'x' * 512, 4 * 1024 * 1024), errno.ENOSPC),
    (h.pwrite, (b'x' * 100, 0), errno.EINVAL),
    (h.cache, (4096, 0), errno.EINVAL),
]:
    try:
        fn(*args)
        raise AssertionError("expected an error from %r%r" % (fn, args))
    except nbd.Error as e:
        assert e.errnum == want, (fn, args, e)
# The connection is still in sync after refusals.
assert h.pread(4096, 1048576) == b'\x01' * 4096
h.shutdown()
"#,
    );
    let s = &target.stats;
    assert!(MemTarget::count(&s.fua_writes) >= 1);
    assert!(MemTarget::count(&s.flushes) >= 2);
    assert!(MemTarget::count(&s.discards) >= 1);
    assert!(MemTarget::count(&s.zeroes_unmap) >= 1);
    assert!(MemTarget::count(&s.zeroes_no_hole) >= 1);
    let data = target.snapshot();
    assert!(data[..8192].iter().all(|&b| b == 0));
    assert!(
        data[65536..131072].iter().all(|&b| b == 0),
        "trimmed range reads as zero here"
    );
    assert!(data[1048576..1048576 + 4096].iter().all(|&b| b == 1));
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let target = MemTarget::new(MIB, false, Duration::ZERO);
    target.data.lock().unwrap().fill(0x42);
    let server = Server::start(Arc::clone(&target), true, opts());
    let v = nbdinfo(&["--json", &server.uri()]);
    assert_eq!(v["exports"][0]["is_read_only"], true, "{v}");
    nbdsh(
        &server.uri(),
        r#"
import errno
assert h.is_read_only()
assert h.pread(4096, 0) == b'\x42' * 4096
h.set_strict_mode(0)
for (fn, args) in [
    (h.pwrite, (b'x' * 4096, 0)),
    (h.pwrite, (b'x' * 4096, 0, nbd.CMD_FLAG_FUA)),
    (h.trim, (4096, 0)),
    (h.zero, (4096, 0)),
]:
    try:
        fn(*args)
        raise AssertionError("expected EPERM from %r%r" % (fn, args))
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, (fn, args, e)
assert h.pread(4096, 0) == b'\x42' * 4096
h.flush()
"#,
    );
    assert!(target.snapshot().iter().all(|&b| b == 0x42));
    assert_eq!(MemTarget::count(&target.stats.writes), 0);
}

// ---- raw protocol client -------------------------------------------------------------

fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    // A hang guard, not a timed assertion: every expected answer comes much sooner.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

fn read_greeting(s: &mut UnixStream) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g, b"NBDMAGICIHAVEOPT\x00\x03");
}

/// Handshake with NBD_OPT_GO on the default export.
fn go(s: &mut UnixStream) {
    read_greeting(s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&6u32.to_be_bytes());
    opt.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    s.write_all(&opt).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        assert_eq!(kind & 0x8000_0000, 0, "option error {kind:#x}");
        if kind == 1 {
            return;
        }
    }
}

fn request(s: &mut UnixStream, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r.extend_from_slice(payload);
    s.write_all(&r).unwrap();
}

/// Reads a simple reply header: (error, cookie).
fn reply(s: &mut UnixStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(r[..4], 0x6744_6698u32.to_be_bytes());
    (
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
    )
}

/// The server closes the connection: reads reach EOF (or a reset).
fn expect_closed(s: &mut UnixStream, what: &str) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: connection not closed: {e}"),
        }
    }
}

fn read_ok(s: &mut UnixStream, cookie: u64, offset: u64, want: &[u8]) {
    request(
        s,
        0,
        cookie,
        offset,
        u32::try_from(want.len()).unwrap(),
        &[],
    );
    assert_eq!(reply(s), (0, cookie));
    let mut data = vec![0u8; want.len()];
    s.read_exact(&mut data).unwrap();
    assert!(data == want);
}

/// A target with 4096-byte blocks, a 1 MiB READ/WRITE limit and small discard and
/// write-zeroes limits: the server advertises them, refuses what breaks them before the
/// target sees it, and splits long TRIM / WRITE_ZEROES into pieces within the limits.
#[test]
fn the_target_shape_is_advertised_and_enforced() {
    const MIB32: u32 = 1 << 20;
    let target = MemTarget::new(4 * MIB, true, Duration::ZERO);
    let mut shape = TargetInfo::simple(4 * MIB as u64, true);
    shape.logical_block_size = 4096;
    shape.max_io_bytes = MIB32;
    shape.max_discard_bytes = 64 * 1024;
    shape.max_write_zeroes_bytes = 128 * 1024;
    *target.shape.lock().unwrap() = Some(shape);
    target.data.lock().unwrap().fill(0x55);
    let server = Server::start(Arc::clone(&target), true, opts());
    let v = nbdinfo(&["--json", &server.uri()]);
    let e = &v["exports"][0];
    assert_eq!(e["block_size_minimum"], 4096, "{v}");
    assert_eq!(e["block_size_preferred"], 4096, "{v}");
    assert_eq!(e["block_size_maximum"], MIB as u64, "{v}");

    let mut s = connect(server.socket());
    go(&mut s);
    // 512-aligned on a 4096-byte target: EINVAL from the server.
    request(&mut s, 0, 1, 512, 4096, &[]);
    assert_eq!(reply(&mut s), (22, 1));
    request(&mut s, 0, 2, 4096, 512, &[]);
    assert_eq!(reply(&mut s), (22, 2));
    // Over the READ/WRITE limit: EINVAL, a WRITE's payload skipped, the stream in sync.
    request(&mut s, 0, 3, 0, 2 * MIB32, &[]);
    assert_eq!(reply(&mut s), (22, 3));
    request(&mut s, 1, 4, 0, 2 * MIB32, &vec![0xee; 2 * MIB]);
    assert_eq!(reply(&mut s), (22, 4));
    read_ok(&mut s, 5, 4096, &[0x55; 4096]);
    assert_eq!(MemTarget::count(&target.stats.writes), 0);
    // A 1 MiB TRIM and a 1 MiB WRITE_ZEROES arrive as 16 and 8 pieces.
    request(&mut s, 4, 6, 0, MIB32, &[]);
    assert_eq!(reply(&mut s), (0, 6));
    assert_eq!(MemTarget::count(&target.stats.discards), 16);
    request(&mut s, 6, 7, MIB as u64, MIB32, &[]);
    assert_eq!(reply(&mut s), (0, 7));
    assert_eq!(MemTarget::count(&target.stats.zeroes_unmap), 8);
    let data = target.snapshot();
    assert!(data[..2 * MIB].iter().all(|&b| b == 0));
    assert!(data[2 * MIB..].iter().all(|&b| b == 0x55));
    request(&mut s, 2, 8, 0, 0, &[]);
    expect_closed(&mut s, "after NBD_CMD_DISC");
}

#[test]
fn hostile_input_drops_only_that_connection() {
    let target = MemTarget::new(4 * MIB, true, Duration::ZERO);
    target.data.lock().unwrap()[..4096].fill(0x77);
    let server = Server::start(Arc::clone(&target), true, opts());
    let path = server.socket().to_path_buf();

    let mut good = connect(&path);
    go(&mut good);
    read_ok(&mut good, 1, 0, &[0x77; 4096]);

    // Garbage instead of client flags.
    let mut s = connect(&path);
    read_greeting(&mut s);
    s.write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]).unwrap();
    expect_closed(&mut s, "garbage client flags");

    // Garbage instead of an option.
    let mut s = connect(&path);
    read_greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"NOTANOPTIONHEADER!").unwrap();
    expect_closed(&mut s, "garbage option");

    // An option longer than the server accepts.
    let mut s = connect(&path);
    read_greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPT\x00\x00\x00\x07\x7f\xff\xff\xff")
        .unwrap();
    expect_closed(&mut s, "oversized option");

    // A bad request magic.
    let mut s = connect(&path);
    go(&mut s);
    s.write_all(&[0x55; 28]).unwrap();
    expect_closed(&mut s, "bad request magic");

    // A write longer than 32 MiB: the payload cannot be skipped safely.
    let mut s = connect(&path);
    go(&mut s);
    request(&mut s, 1, 9, 0, 64 << 20, &[0u8; 4096]);
    expect_closed(&mut s, "oversized write");

    // A truncated request header, then EOF from the client.
    let mut s = connect(&path);
    go(&mut s);
    s.write_all(&0x2560_9513u32.to_be_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    expect_closed(&mut s, "truncated request");

    // In-sync errors keep the connection: unknown command, unaligned write with payload.
    let mut s = connect(&path);
    go(&mut s);
    request(&mut s, 5, 10, 0, 4096, &[]); // CACHE
    assert_eq!(reply(&mut s), (22, 10));
    request(&mut s, 0x7777, 11, 0, 4096, &[]); // unknown
    assert_eq!(reply(&mut s), (22, 11));
    request(&mut s, 1, 12, 100, 1000, &[0xab; 1000]); // unaligned WRITE: payload skipped
    assert_eq!(reply(&mut s), (22, 12));
    read_ok(&mut s, 13, 0, &[0x77; 4096]);

    // The first connection never noticed, and new connections work.
    read_ok(&mut good, 2, 0, &[0x77; 4096]);
    let v = nbdinfo(&["--json", &server.uri()]);
    assert_eq!(v["exports"][0]["export-size"], 4 * MIB as u64);
    assert!(target.snapshot()[..4096].iter().all(|&b| b == 0x77));
}

#[test]
fn replies_leave_in_completion_order() {
    let target = MemTarget::new(4 * MIB, true, Duration::ZERO);
    target.gated.store(true, Ordering::SeqCst);
    let server = Server::start(Arc::clone(&target), true, opts());
    let mut s = connect(server.socket());
    go(&mut s);
    // Read A waits at the gate; write B and read C are sent after it and answered first.
    request(&mut s, 0, 100, GATE_OFFSET, 4096, &[]);
    request(&mut s, 1, 101, 8192, 4096, &[0x99; 4096]);
    assert_eq!(reply(&mut s), (0, 101));
    request(&mut s, 0, 102, 8192, 4096, &[]);
    assert_eq!(reply(&mut s), (0, 102));
    let mut data = vec![0u8; 4096];
    s.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x99));
    target.open_gate();
    assert_eq!(reply(&mut s), (0, 100));
    s.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0));
}

#[test]
fn disconnect_finishes_requests_in_flight() {
    let target = MemTarget::new(4 * MIB, true, Duration::ZERO);
    target.gated.store(true, Ordering::SeqCst);
    let server = Server::start(Arc::clone(&target), true, opts());
    let mut s = connect(server.socket());
    go(&mut s);
    request(&mut s, 0, 1, GATE_OFFSET, 512, &[]);
    request(&mut s, 2, 2, 0, 0, &[]); // NBD_CMD_DISC while the read is held

    // The server waits for the held read, answers it, then closes.
    let releaser = {
        let target = Arc::clone(&target);
        std::thread::spawn(move || {
            // Open the gate only once the read is really in flight at the target.
            while target.stats.in_flight.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            target.open_gate();
        })
    };
    assert_eq!(reply(&mut s), (0, 1));
    let mut data = [1u8; 512];
    s.read_exact(&mut data).unwrap();
    assert_eq!(data, [0u8; 512]);
    expect_closed(&mut s, "after NBD_CMD_DISC");
    releaser.join().unwrap();
}

#[test]
fn connection_limit_and_handshake_timeout() {
    let target = MemTarget::new(MIB, true, Duration::ZERO);
    let server = Server::start(
        target,
        true,
        NbdOptions {
            max_connections: 2,
            handshake_timeout: Duration::from_millis(300),
            ..opts()
        },
    );
    let path = server.socket().to_path_buf();
    let mut a = connect(&path);
    go(&mut a);
    let mut b = connect(&path);
    go(&mut b);
    // A third is closed at once, before any greeting.
    let mut c = connect(&path);
    expect_closed(&mut c, "third connection");
    read_ok(&mut a, 1, 0, &[0u8; 512]);
    // Freeing a slot lets a new client in (the slot is freed when the server notices).
    request(&mut b, 2, 2, 0, 0, &[]);
    expect_closed(&mut b, "after NBD_CMD_DISC");
    let mut d = (0..1000)
        .find_map(|_| {
            let mut d = connect(&path);
            let mut g = [0u8; 18];
            match d.read_exact(&mut g) {
                Ok(()) => Some(d),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    None
                }
            }
        })
        .expect("a slot frees up after a disconnect");
    // This client never sends its flags: the handshake times out and the server closes.
    expect_closed(&mut d, "silent client");
}

#[test]
fn unix_socket_file_is_private_and_guarded() {
    use std::os::unix::fs::PermissionsExt;
    let target = MemTarget::new(MIB, true, Duration::ZERO);
    let server = Server::start(Arc::clone(&target), true, opts());
    let mode = std::fs::metadata(server.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A live server's socket is not stolen.
        let e = NbdListener::bind_unix(server.socket()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        // A regular file in the way is refused and left alone.
        let file = server.dir.join("not-a-socket");
        std::fs::write(&file, b"keep me").unwrap();
        let e = NbdListener::bind_unix(&file).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    });
    // Shutdown with an idle client attached: the server returns and closes it.
    let mut idle = connect(server.socket());
    go(&mut idle);
    let path = server.socket().to_path_buf();
    let dir = server.dir.clone();
    let mut server = server;
    server.stop_inner();
    expect_closed(&mut idle, "server shutdown");
    assert!(!path.exists(), "socket file removed on shutdown");
    // A stale socket file (no server) is replaced.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    rt.block_on(async {
        let l = NbdListener::bind_unix(&stale).expect("stale socket replaced");
        assert_eq!(l.local_addr().unwrap(), ListenAddr::Unix(stale.clone()));
    });
}
