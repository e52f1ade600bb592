//! A Primary killed (-9) under fio 4 KiB random writes, on a volume eight times larger
//! than the activity log's reach (issue 4):
//!
//! - after restart, the out-of-sync bits cover every block that differs between the two
//!   replicas and every block fio wrote in its last second, and they are at most
//!   `al-extents × 4 MiB`;
//! - the activity log the killed daemon left behind is replayed into **identical**
//!   bitmaps by drbd-utils' `drbdmeta apply-al` and by `tandem apply-al` (on copies);
//! - the resync that follows (issue 5, `csums-alg crc32c` with `csums-after-crash-only`)
//!   is bounded by those bits and moves data only for the blocks that differ: the others
//!   cost a digest; the replicas end byte-identical.
//!
//! "What fio wrote" is read back from the replicas themselves: with `--verify=crc32c`
//! every 4 KiB block fio writes starts with fio's verify header, which holds the block's
//! offset and the time fio generated it (seconds and nanoseconds since the job started).
//! fio is rate-limited to 40 writes/s so that one second of writes touches fewer extents
//! than the log holds (otherwise "the last second" would include blocks the peer already
//! has whose extents left the log — correctly not resynced, but not what this checks);
//! over its ~8 s the job touches about four times more extents than the log holds, so
//! extents are evicted many times before the kill.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use tandem_tests::loopdev::{drbdmeta, dump_md_json, loop_devices_usable, tandem, Loop, Minor};
use tandem_tests::tools::Fio;
use tandem_tests::{Cluster, ClusterOpts, StatusExt, TempDir, CONNECT_TIMEOUT};

const AL_EXTENTS: u64 = 67;
const EXTENT: u64 = 4 << 20;
const BLOCK: u64 = 4096;
/// Writes completed before the kill: ~8 s at 40/s, ~270 distinct extents of the 512.
const WRITES_BEFORE_KILL: u64 = 320;

/// Where a `tandem dump-md --json` says the bitmap is, and how many bits are set.
struct Bitmap {
    bits: Vec<u8>,
    set: u64,
}

fn dump_md(path: &Path) -> serde_json::Value {
    dump_md_json(&[&path.to_string_lossy()])
}

fn read_bitmap(image: &Path) -> Bitmap {
    let md = dump_md(image);
    let offset = md["bm_offset"].as_u64().expect("bm_offset");
    let len = md["bm_bytes"].as_u64().expect("bm_bytes");
    let mut bits = vec![0u8; usize::try_from(len).expect("small bitmap")];
    File::open(image)
        .expect("open image")
        .read_exact_at(&mut bits, offset)
        .expect("read bitmap");
    let set = bits.iter().map(|b| u64::from(b.count_ones())).sum();
    Bitmap { bits, set }
}

fn bit(bm: &[u8], block: u64) -> bool {
    usize::try_from(block / 8)
        .ok()
        .and_then(|i| bm.get(i))
        .is_some_and(|b| b & (1 << (block % 8)) != 0)
}

/// The fio verify header of a 4 KiB block at data offset `offset`: its generation time in
/// ns since the job started, if the block holds one written for this offset.
fn fio_time(block: &[u8], offset: u64) -> Option<u64> {
    let le32 = |at: usize| u32::from_le_bytes(block[at..at + 4].try_into().expect("4 bytes"));
    let le64 = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"));
    (block[0..2] == [0xca, 0xac] && le32(4) == 4096 && le64(16) == offset)
        .then(|| u64::from(le32(24)) * 1_000_000_000 + u64::from(le32(28)))
}

/// Scans the data areas of both replicas: the blocks that differ, and per block the
/// newest fio write time found in either.
fn scan(a: &Path, b: &Path, size: u64) -> (Vec<u64>, Vec<(u64, u64)>) {
    const CHUNK: usize = 1 << 20;
    let (fa, fb) = (
        File::open(a).expect("open a"),
        File::open(b).expect("open b"),
    );
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut differ = Vec::new();
    let mut written = Vec::new();
    let mut at = 0u64;
    while at < size {
        let n = usize::try_from((size - at).min(CHUNK as u64)).expect("chunk");
        fa.read_exact_at(&mut ba[..n], at).expect("read a");
        fb.read_exact_at(&mut bb[..n], at).expect("read b");
        for (i, (x, y)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
            let off = at + i as u64 * BLOCK;
            if x != y {
                differ.push(off / BLOCK);
            }
            let t = fio_time(x, off).max(fio_time(y, off));
            if let Some(t) = t {
                written.push((off / BLOCK, t));
            }
        }
        at += n as u64;
    }
    (differ, written)
}

#[test]
fn primary_kill9_under_writes_bounds_the_resync_by_the_activity_log() {
    let mut c = Cluster::new(
        ClusterOpts::new("crash-al")
            .size("2GiB")
            .disk("al-extents", &AL_EXTENTS.to_string())
            .net("csums-alg", "\"crc32c\"")
            .net("csums-after-crash-only", "true"),
    );
    c.wait_connected();
    let size = c.primary().status().u64_at("/size_bytes");
    assert!(
        size >= 7 * AL_EXTENTS * EXTENT,
        "the volume ({size} bytes) must be much larger than the log's reach"
    );
    let fio = Fio::nbd(&c.primary().nbd_unix_uri())
        .arg("--rw=randwrite")
        .arg("--bs=4k")
        .arg("--iodepth=4")
        .arg(format!("--size={size}"))
        .arg("--verify=crc32c")
        .arg("--do_verify=0")
        .arg("--rate_iops=40")
        .arg("--time_based")
        .arg("--runtime=120")
        .spawn(c.dir());
    c.primary()
        .wait_status(CONNECT_TIMEOUT * 2, "writes completed", |s| {
            s.opt_u64("/writes_completed")
                .is_some_and(|n| n >= WRITES_BEFORE_KILL)
        });
    let st = c.primary().status();
    assert_eq!(st.str_at("/connection"), "Connected", "{st}");
    assert_eq!(st.u64_at("/out_of_sync_bytes"), 0, "{st}");
    assert!(
        st.u64_at("/activity_log/evictions") > AL_EXTENTS,
        "the log must have evicted extents many times before the kill: {st}"
    );
    c.primary_mut().kill9();
    drop(fio);
    // The Secondary stops cleanly: everything it acknowledged is on its disk.
    c.secondary_mut().stop();

    let primary_img = c.primary().disk().to_path_buf();
    let secondary_img = c.secondary().disk().to_path_buf();
    let md = dump_md_unclean(&primary_img);
    assert_eq!(
        md["clean"], false,
        "a killed daemon leaves unclean metadata"
    );

    // The abandoned activity log, replayed by both tools on copies.
    replay_with_both_tools(&primary_img);

    // Restart: the daemon applies the log before it serves.
    c.primary_mut().start();
    let st = c.primary().status();
    assert_eq!(st["crashed_primary"], true, "{st}");
    let oos = st.u64_at("/out_of_sync_bytes");
    c.primary_mut().stop();
    let bm = read_bitmap(&primary_img);
    assert_eq!(bm.set * BLOCK, oos, "status and on-disk bitmap agree");
    assert!(
        bm.set <= AL_EXTENTS * (EXTENT / BLOCK),
        "{} bits set: more than al-extents × 4 MiB",
        bm.set
    );

    let (differ, written) = scan(&primary_img, &secondary_img, size);
    let uncovered: Vec<u64> = differ
        .iter()
        .copied()
        .filter(|&b| !bit(&bm.bits, b))
        .collect();
    assert!(
        uncovered.is_empty(),
        "{} of {} differing blocks are not out of sync, e.g. block {:?}",
        uncovered.len(),
        differ.len(),
        uncovered.first()
    );
    let newest = written.iter().map(|w| w.1).max().expect("fio wrote blocks");
    let last_second: Vec<u64> = written
        .iter()
        .filter(|w| w.1 + 1_000_000_000 >= newest)
        .map(|w| w.0)
        .collect();
    let mut extents: Vec<u64> = last_second.iter().map(|b| b * BLOCK / EXTENT).collect();
    extents.sort_unstable();
    extents.dedup();
    assert!(
        last_second.len() >= 10 && (extents.len() as u64) < AL_EXTENTS,
        "test premise: the last second holds {} writes over {} extents",
        last_second.len(),
        extents.len()
    );
    let missed: Vec<u64> = last_second
        .iter()
        .copied()
        .filter(|&b| !bit(&bm.bits, b))
        .collect();
    assert!(
        missed.is_empty(),
        "blocks fio wrote in its last second are not out of sync: {missed:?}"
    );
    eprintln!(
        "crash: {} writes seen, {} in the last second, {} blocks differ, {} bits set ({} MiB, \
         log reach {} MiB)",
        written.len(),
        last_second.len(),
        differ.len(),
        bm.set,
        (bm.set * BLOCK) >> 20,
        (AL_EXTENTS * EXTENT) >> 20
    );

    // The crash resync: the merged bitmap is the crashed Primary's (the Secondary's is
    // empty), every set block is compared by digest, only the differing ones move.
    c.primary_mut().start();
    c.secondary_mut().start();
    let st = c
        .secondary()
        .wait_status(CONNECT_TIMEOUT * 6, "resynced after the crash", |s| {
            s.opt_str("/connection") == Some("Connected")
                && s.opt_str("/disk") == Some("UpToDate")
                && s.opt_u64("/out_of_sync_bytes") == Some(0)
        });
    let last = &st["last_resync"];
    assert_eq!(last["total_blocks"].as_u64(), Some(bm.set), "{st}");
    let moved = c.primary().status().u64_at("/resync_bytes_sent");
    assert_eq!(
        moved,
        differ.len() as u64 * BLOCK,
        "data moved only for the differing blocks: {st}"
    );
    assert_eq!(
        last["same_csum_blocks"].as_u64(),
        Some(bm.set - differ.len() as u64),
        "every other block cost only a digest: {st}"
    );
    eprintln!(
        "crash resync: {} blocks checked, {} moved ({} KiB), {} ms",
        bm.set,
        differ.len(),
        moved / 1024,
        last["active_ms"]
    );
    c.stop_all();
    c.assert_replicas_identical(size);
}

/// `dump-md` refuses unclean metadata without `--force`, as drbdmeta does.
fn dump_md_unclean(path: &Path) -> serde_json::Value {
    dump_md_json(&["--force", &path.to_string_lossy()])
}

/// Copies the killed Primary's image twice; `drbdmeta apply-al` on a loop device over one,
/// `tandem apply-al` on the other: the bitmaps and superblocks must be identical.
fn replay_with_both_tools(image: &Path) {
    if !loop_devices_usable("crash: drbdmeta apply-al on the abandoned log") {
        return;
    }
    let tmp = TempDir::new("crash-apply");
    let copy = |name: &str| {
        let to = tmp.join(name);
        let out = tandem_tests::tools::run_cmd(
            std::process::Command::new("cp")
                .arg("--sparse=always")
                .arg(image)
                .arg(&to),
            tandem_tests::loopdev::TIMEOUT,
            "cp",
        )
        .expect("cp");
        out.assert_success("cp --sparse=always");
        to
    };
    let (a, b) = (copy("a.img"), copy("b.img"));
    let lo = Loop::attach(a.clone());
    let minor = Minor::new();
    drbdmeta(&minor, &lo.dev, "internal", &["apply-al"]).assert_success("drbdmeta apply-al");
    drop(lo);
    let t = tandem(&["apply-al", "--json", &b.to_string_lossy()]);
    t.assert_success("tandem apply-al");
    let report: serde_json::Value = serde_json::from_str(&t.stdout).expect("JSON");
    assert_eq!(report["primary"], true, "{report}");
    let hot = report["hot_extents"].as_array().map_or(0, Vec::len);
    assert!(
        hot > 0 && hot as u64 <= AL_EXTENTS,
        "hot extents of the abandoned log: {report}"
    );
    let (ba, bb) = (read_bitmap(&a), read_bitmap(&b));
    assert!(ba.set > 0, "drbdmeta set no bits");
    assert_eq!(ba.set, bb.set, "set bits: drbdmeta vs tandem");
    assert!(ba.bits == bb.bits, "the bitmaps differ");
    let md = dump_md(&a);
    let sb = |p: &Path| {
        let mut buf = vec![0u8; 4096];
        File::open(p)
            .expect("open")
            .read_exact_at(&mut buf, md["md_offset"].as_u64().expect("md_offset"))
            .expect("read superblock");
        buf
    };
    assert!(sb(&a) == sb(&b), "superblocks after apply-al differ");
}
