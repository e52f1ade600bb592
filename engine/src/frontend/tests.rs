//! The seam against the real volume: a request submitted from a plain thread that is in
//! no tokio runtime (what a ublk queue thread is) completes, with the right data, when
//! its future is polled by a ten-line executor on that thread.

use super::*;
use crate::config::Config;
use crate::store::testdir::TempDir;
use crate::volume::Volume;
use std::pin::pin;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// Polls `fut` on this thread until it is ready, parking between wake-ups: an executor
/// with no runtime, no timer and no other thread. Panics after `limit`.
pub(crate) fn block_on<F: Future>(fut: F, limit: Duration) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    let deadline = Instant::now() + limit;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        let now = Instant::now();
        assert!(now < deadline, "not completed within {limit:?}");
        std::thread::park_timeout(deadline - now);
    }
}

const MIB: u64 = 1 << 20;
const MIB_USIZE: usize = 1 << 20;
const LIMIT: Duration = Duration::from_secs(30);

fn pattern(len: usize, seed: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len).expect("buffer");
    for (i, x) in b.iter_mut().enumerate() {
        let i = i.to_le_bytes();
        *x = seed ^ i[0] ^ i[1].rotate_left(3) ^ i[2];
    }
    b
}

/// The daemon's shape: a current-thread runtime driven by its own thread (as `tandem
/// up`'s main thread drives it) holds a Primary volume over a fresh 16 MiB file; a
/// second plain thread, outside any runtime, is the frontend's queue thread.
#[test]
fn a_volume_serves_a_thread_outside_any_runtime() {
    let dir = TempDir::new("frontend-seam");
    let disk = dir.path("a.img");
    let text = format!(
        "[resource]\nname = \"r0\"\nsize = \"16MiB\"\n\
         [[node]]\nname = \"a\"\naddress = \"127.0.0.1:7789\"\ndisk = \"{}\"\n\
         mgmt-socket = \"{}\"\n\
         [[node]]\nname = \"b\"\naddress = \"127.0.0.1:7790\"\ndisk = \"/nonexistent/b.img\"\n",
        disk.display(),
        dir.path("a.sock").display()
    );
    let config = Config::parse(&text, "seam test").expect("config");
    let (me, peer) = config.split("a").expect("node a");
    let mut locks = Vec::new();
    let (store, md, attach) = crate::daemon::attach_disk(&config, me, &mut locks).expect("attach");
    let lbs = store.logical_block_size();

    let (vol_tx, vol_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (config2, me2, peer2) = (config.clone(), me.clone(), peer.clone());
    let runtime = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let v = Volume::new(&config2, &me2, &peer2, store, md, attach).expect("volume");
            v.promote(false)
                .await
                .expect("a fresh volume alone becomes Primary");
            vol_tx.send(Arc::clone(&v)).expect("send volume");
            // Runs the volume's tasks (store completions, local writes) until told to stop.
            let _ = stop_rx.await;
            v.shutdown(Duration::from_secs(5)).await;
        });
    });
    let volume: Arc<Volume> = vol_rx.recv_timeout(LIMIT).expect("volume up");

    let info = volume.info();
    assert!(info.writable);
    assert_eq!(info.logical_block_size, lbs);
    assert!(lbs == 512 || lbs == 4096, "{lbs}");
    assert_eq!(info.physical_block_size, 4096);
    assert_eq!(info.max_io_bytes, MAX_IO_BYTES);
    assert_eq!(info.max_discard_bytes, 128 * MIB);
    assert_eq!(info.max_write_zeroes_bytes, 128 * MIB);
    assert!(info.volatile_cache && info.fua);

    let v = Arc::clone(&volume);
    let queue_thread = std::thread::spawn(move || queue_thread_io(&v, lbs));
    let (data, big) = queue_thread.join().expect("queue thread");

    let _ = stop_tx.send(());
    runtime.join().expect("runtime thread");
    drop(volume);
    drop(locks);
    // The writes reached the backing file (internal metadata: data starts at byte 0).
    let file = std::fs::read(&disk).expect("backing file");
    let mib = MIB_USIZE;
    assert!(file[mib..mib + 8192].iter().all(|&x| x == 0));
    assert!(file[mib + 8192..mib + data.len()] == data[8192..]);
    assert!(file[4 * mib..6 * mib] == big[..]);
}

/// What the queue thread of `a_volume_serves_a_thread_outside_any_runtime` does, outside
/// any runtime: writes, a flush, reads into its own buffers, discard and write-zeroes,
/// refusals. Returns the data it wrote at 1 MiB and at 4 MiB.
fn queue_thread_io(v: &Arc<Volume>, lbs: u32) -> (Arc<AlignedBuf>, Arc<AlignedBuf>) {
    assert!(
        tokio::runtime::Handle::try_current().is_err(),
        "the queue thread must be outside any runtime"
    );
    let submit = |io| block_on(v.submit(BlockRequest::new(3, io)), LIMIT);
    let data = Arc::new(pattern(64 * 1024, 0x5a));
    let r = submit(BlockIo::Write {
        offset: MIB,
        data: Arc::clone(&data),
        fua: false,
    });
    assert!(matches!(r, Ok(BlockReply::Done)), "write: {r:?}");
    // A 2 MiB FUA write: two replicated 1 MiB pieces.
    let big = Arc::new(pattern(2 * MIB_USIZE, 0xc3));
    let r = submit(BlockIo::Write {
        offset: 4 * MIB,
        data: Arc::clone(&big),
        fua: true,
    });
    assert!(matches!(r, Ok(BlockReply::Done)), "FUA write: {r:?}");
    assert!(matches!(submit(BlockIo::Flush), Ok(BlockReply::Done)));

    // The read fills the caller's buffer and hands that same buffer back.
    let buf = AlignedBuf::new(64 * 1024).expect("buffer");
    let at = buf.as_ptr();
    match submit(BlockIo::Read { offset: MIB, buf }) {
        Ok(BlockReply::Data(b)) => {
            assert_eq!(b.as_ptr(), at, "not the caller's buffer");
            assert!(b[..] == data[..], "read back differs");
        }
        other => panic!("read: {other:?}"),
    }
    match submit(BlockIo::Read {
        offset: 4 * MIB,
        buf: AlignedBuf::new(2 * MIB_USIZE).expect("buffer"),
    }) {
        Ok(BlockReply::Data(b)) => assert!(b[..] == big[..], "2 MiB read back differs"),
        other => panic!("read: {other:?}"),
    }

    // Discard and write-zeroes, then the range reads as zeroes.
    let r = submit(BlockIo::WriteZeroes {
        offset: MIB,
        len: 4096,
        may_unmap: false,
        fua: false,
    });
    assert!(matches!(r, Ok(BlockReply::Done)), "write-zeroes: {r:?}");
    let r = submit(BlockIo::Discard {
        offset: MIB + 4096,
        len: 4096,
        fua: false,
    });
    assert!(matches!(r, Ok(BlockReply::Done)), "discard: {r:?}");
    match submit(BlockIo::Read {
        offset: MIB,
        buf: pattern(8192, 0xff),
    }) {
        Ok(BlockReply::Data(b)) => assert!(b.iter().all(|&x| x == 0), "not zeroes"),
        other => panic!("read: {other:?}"),
    }

    // Out of the limits: refused, not served.
    let r = submit(BlockIo::Discard {
        offset: 0,
        len: 128 * MIB + u64::from(lbs),
        fua: false,
    });
    assert_eq!(r.err(), Some(BlockError::Invalid));
    let r = submit(BlockIo::Read {
        offset: 16 * MIB,
        buf: AlignedBuf::new(4096).expect("buffer"),
    });
    assert_eq!(r.err(), Some(BlockError::Invalid), "read past the end");
    assert!(matches!(submit(BlockIo::Flush), Ok(BlockReply::Done)));
    (data, big)
}
