//! The metadata writer's gate against the real volume: no application write enters the
//! core while a staged superblock is not on disk, and writes fail once it cannot be
//! written (`durable.rs`).

use super::*;
use crate::frontend::{BlockIo, BlockRequest};
use crate::meta::SbChange;
use crate::store::testdir::TempDir;
use std::future::Future;
use std::task::Poll;

fn request(offset: u64, seed: u8) -> BlockRequest {
    let mut data = AlignedBuf::new(4096).expect("buffer");
    data.as_mut_slice().fill(seed);
    BlockRequest {
        queue: 0,
        io: BlockIo::Write {
            offset,
            data: Arc::new(data),
            fua: false,
        },
    }
}

/// Node `a` of a pair whose peer never comes, Secondary, over files in `dir`, with its
/// metadata on a file of its own (flex-external, so that the metadata store can fail
/// while the data store works): the volume, the metadata store and the device locks.
fn lone_node(dir: &TempDir) -> (Arc<Volume>, Store, Vec<crate::store::DeviceLock>) {
    let text = format!(
        "[resource]\nname = \"r0\"\nsize = \"16MiB\"\n\
         [[node]]\nname = \"a\"\naddress = \"127.0.0.1:7789\"\ndisk = \"{}\"\n\
         meta-disk = \"{}\"\nmgmt-socket = \"{}\"\n\
         [[node]]\nname = \"b\"\naddress = \"127.0.0.1:7790\"\ndisk = \"/nonexistent/b.img\"\n",
        dir.path("a.img").display(),
        dir.path("a.md").display(),
        dir.path("a.sock").display()
    );
    let config = Config::parse(&text, "volume test").expect("config");
    let (me, peer) = config.split("a").expect("node a");
    let mut locks = Vec::new();
    let (store, md, attach) = crate::daemon::attach_disk(&config, me, &mut locks).expect("attach");
    let meta_store = md.store().clone();
    let v = Volume::new(&config, me, peer, store, md, attach).expect("volume");
    (v, meta_store, locks)
}

/// A Primary alone: the gate at the core's door.
#[tokio::test(flavor = "current_thread")]
async fn writes_wait_for_a_staged_superblock_and_fail_when_it_cannot_be_written() {
    let dir = TempDir::new("volume-gate");
    let (v, meta_store, locks) = lone_node(&dir);
    v.promote(false).await.expect("alone, UpToDate: Primary");
    // The promotion's superblock is on disk: the gate is open.
    assert_eq!(v.meta.write_gate(), Gate::Open);
    v.submit(request(0, 1)).await.expect("a write");

    // A change staged and not yet written holds a write at the door until it is. The
    // writer is a task on this (current-thread) runtime: it has not run yet.
    let t = v
        .meta
        .stage(&[SbChange::ClearCrashedPrimary, SbChange::Consistent(false)]);
    assert_eq!(v.meta.write_gate(), Gate::Wait);
    let mut w = std::pin::pin!(v.submit(request(4096, 2)));
    let first = std::future::poll_fn(|cx| Poll::Ready(w.as_mut().poll(cx))).await;
    assert!(first.is_pending());
    assert_eq!(
        v.lock().node.primary.stats().in_flight_writes,
        0,
        "a write entered the core before the staged superblock was on disk"
    );
    v.meta.durable(t).await.expect("durable");
    w.await
        .expect("the write goes once the superblock is on disk");

    // The metadata device fails: the new generation of `new-current-uuid` cannot be
    // recorded, and no write lands in it.
    meta_store.close();
    let e = v
        .new_current_uuid(false)
        .await
        .expect_err("metadata closed");
    assert!(e.contains("superblock"), "{e}");
    assert_eq!(v.meta.write_gate(), Gate::Failed);
    match v.submit(request(8192, 3)).await {
        Err(BlockError::Io) => {}
        other => panic!("a write in an unrecorded generation: {other:?}"),
    }
    v.shutdown(Duration::from_secs(5)).await;
    drop(locks);
}

#[test]
fn a_peer_read_reply_of_the_wrong_length_fails_the_read() {
    for (asked, got, ok) in [(8192, 8192, true), (8192, 4096, false), (4096, 8192, false)] {
        let (tx, mut rx) = oneshot::channel();
        let r = RemoteRead {
            len: asked,
            done: tx,
        };
        let buf = AlignedBuf::new(got).expect("buffer");
        assert_eq!(r.complete(buf).is_ok(), ok, "{asked} asked, {got} got");
        match rx.try_recv().expect("answered") {
            Ok(b) => assert!(ok && b.len() == 8192),
            Err(e) => assert!(!ok && e == BlockError::Io, "{e:?}"),
        }
    }
}

/// A promotion waiting for its superblock refuses the peer's own promotion requests
/// (`promoting`); its caller gone while it waits, it still completes (the node's plan
/// runs on: `replica/role_cmd.rs`) and leaves them refused no longer.
#[tokio::test(flavor = "current_thread")]
async fn a_promotion_whose_caller_went_away_completes_and_leaves_no_trace() {
    let dir = TempDir::new("volume-promoting");
    let (v, _meta_store, locks) = lone_node(&dir);
    {
        let mut p = std::pin::pin!(v.promote(false));
        let first = std::future::poll_fn(|cx| Poll::Ready(p.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "waits for its superblock");
        assert!(v.lock().node.promoting);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while v.lock().node.role != Role::Primary {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the promotion never completed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!v.lock().node.promoting);
    assert_ne!(
        v.meta.md().superblock().flags & crate::meta::superblock::mdf::PRIMARY_IND,
        0,
        "the Primary's superblock says Primary"
    );
    // And the role changes on.
    v.demote(false).await.expect("demoted");
    assert_eq!(v.lock().node.role, Role::Secondary);
    v.shutdown(Duration::from_secs(5)).await;
    drop(locks);
}

/// A Primary alone: discards and write-zeroes (FUA or not) go through the store's
/// completion sink and read back as zeroes, the blocks around them untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discards_and_write_zeroes_read_back_as_zeroes() {
    let dir = TempDir::new("volume-zeroes");
    let (v, _meta_store, locks) = lone_node(&dir);
    v.promote(false).await.expect("alone, UpToDate: Primary");
    for i in 0..16u8 {
        v.submit(request(u64::from(i) * 4096, 0x40 + i))
            .await
            .expect("a write");
    }
    let ranges = [
        (
            4096,
            4096,
            BlockIo::Discard {
                offset: 4096,
                len: 4096,
                fua: false,
            },
        ),
        (
            12288,
            8192,
            BlockIo::Discard {
                offset: 12288,
                len: 8192,
                fua: true,
            },
        ),
        (
            28672,
            4096,
            BlockIo::WriteZeroes {
                offset: 28672,
                len: 4096,
                may_unmap: false,
                fua: false,
            },
        ),
        (
            40960,
            12288,
            BlockIo::WriteZeroes {
                offset: 40960,
                len: 12288,
                may_unmap: true,
                fua: true,
            },
        ),
    ];
    let mut zeroed = Vec::new();
    for (offset, len, io) in ranges {
        match v.submit(BlockRequest { queue: 0, io }).await {
            Ok(BlockReply::Done) => {}
            other => panic!("range at {offset}: {other:?}"),
        }
        zeroed.push((offset, len));
    }
    let buf = AlignedBuf::new(16 * 4096).expect("buffer");
    let back = match v
        .submit(BlockRequest {
            queue: 0,
            io: BlockIo::Read { offset: 0, buf },
        })
        .await
    {
        Ok(BlockReply::Data(b)) => b,
        other => panic!("read: {other:?}"),
    };
    for (i, block) in (0u8..).zip(back.chunks(4096)) {
        let at = u64::from(i) * 4096;
        let z = zeroed.iter().any(|&(o, l)| at >= o && at < o + l);
        let want = if z { 0 } else { 0x40 + i };
        assert!(block.iter().all(|&b| b == want), "block {i}");
    }
    v.shutdown(Duration::from_secs(5)).await;
    drop(locks);
}

/// A discard the disk refuses fails as a failed write does: recorded in the metadata
/// first (the node's `Event::WriteFailed` plan), then the request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_discard_is_recorded_as_a_disk_failure() {
    let dir = TempDir::new("volume-discard-fails");
    let (v, _meta_store, locks) = lone_node(&dir);
    v.promote(false).await.expect("alone, UpToDate: Primary");
    // Its activity-log extent is active now: the discard needs no metadata write (whose
    // preflush would fail first, on the closed data device).
    v.submit(request(4096, 1)).await.expect("a write");
    v.store.close();
    let io = BlockIo::Discard {
        offset: 0,
        len: 4096,
        fua: false,
    };
    match v.submit(BlockRequest { queue: 0, io }).await {
        Err(BlockError::Io) => {}
        other => panic!("a discard on a closed disk: {other:?}"),
    }
    let failure = v.lock().disk_failure.clone();
    assert!(
        failure
            .as_ref()
            .is_some_and(|w| w.contains("4096 bytes at sector 0")),
        "{failure:?}"
    );
    v.shutdown(Duration::from_secs(5)).await;
    drop(locks);
}

/// A demotion flushes the data disk before its metadata says "not Primary": the writes
/// this Primary completed unflushed would otherwise stay volatile on what becomes the
/// Secondary (the simulator's switchover found it). A flush that fails keeps the
/// superblock saying Primary (a crash then applies the activity log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demotion_flushes_the_data_disk_before_its_metadata() {
    let dir = TempDir::new("volume-demotion-flush");
    let (v, _meta_store, locks) = lone_node(&dir);
    v.promote(false).await.expect("alone, UpToDate: Primary");
    v.submit(request(0, 1)).await.expect("a write");
    // The data disk fails; the metadata (a file of its own) still works.
    v.store.close();
    let e = v
        .demote(false)
        .await
        .expect_err("the data disk cannot be flushed");
    assert!(e.contains("flush"), "{e}");
    assert_ne!(
        v.meta.md().superblock().flags & crate::meta::superblock::mdf::PRIMARY_IND,
        0,
        "the superblock says Primary until the data is durable"
    );
    v.shutdown(Duration::from_secs(5)).await;
    drop(locks);
}
