//! Interoperability of tandem's DRBD 9 metadata with Debian's drbd-utils 9.22 `drbdmeta`,
//! on loop devices over sparse files, both ways:
//!
//! 1. `drbdmeta … v09 … create-md 1` (then `restore-md` to give it a size, UUIDs, flags,
//!    peer data and bitmap bits) → `tandem dump-md` prints the same fields.
//! 2. `tandem create-md` (then the engine writes a size and bitmap bits) →
//!    `drbdmeta … dump-md` succeeds and prints the same fields.
//! 3. Both ways again with flex-external metadata on a second loop device.
//! 4. `apply-al`: an activity log written by tandem's runtime activity log (thousands of
//!    transactions, a striped ring that wraps, evictions, a serial-number wrap, one
//!    corrupt slot) on a crashed Primary, copied to two devices: `drbdmeta apply-al` on
//!    one, `tandem apply-al` on the other → identical bitmaps and superblocks; and the
//!    documented differences at the end of the bitmap (drbdmeta's off-by-one).
//! 5. Hostile metadata: tandem refuses with a message that names the problem and the fix.
//!
//! Needs root and `losetup` (loop devices); without them every test says SKIPPED loudly
//! and passes. Without `drbdmeta` the tests fail with the package to install.

use std::collections::BTreeMap;
use std::fs::File;

use std::process::Command;
use tandem_engine::meta::al::{self, ActivityLog, Begin};
use tandem_engine::meta::superblock::mdf;
use tandem_engine::meta::{MetaDevice, MetaLocation};
use tandem_engine::store::{AlignedBuf, Store, StoreOptions};
use tandem_tests::loopdev::{
    drbdmeta, drbdmeta_bin, loop_devices_usable, tandem, Loop, Minor, TIMEOUT,
};
use tandem_tests::tools::run_cmd;
use tandem_tests::TempDir;

/// The loop device opened as a tandem store.
fn store_of(l: &Loop) -> Store {
    Store::open(&l.dev, &StoreOptions::default()).expect("open the loop device as a store")
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

// ----- dump-md parsing ------------------------------------------------------------------

/// The fields of a `dump-md` text: `key value;` lines, the `# key value` comment lines
/// drbdmeta uses for derived values, `peer[i].key` inside peer blocks and
/// `history-uuids` as one space-separated list. The bitmap block is skipped.
fn parse_dump(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut block: Option<String> = None;
    let mut history: Vec<String> = Vec::new();
    for raw in text.lines() {
        let line = raw.trim();
        if let Some(b) = &block {
            if line == "}" {
                if b == "history-uuids" {
                    out.insert(b.clone(), history.join(" "));
                }
                block = None;
                continue;
            }
            if b == "history-uuids" {
                history.extend(
                    line.split(';')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from),
                );
            } else if let Some(p) = b.strip_prefix("peer") {
                let body = line.split(';').next().unwrap_or("");
                if let Some((k, v)) = body.split_once(' ') {
                    out.insert(format!("peer{p}.{k}"), v.trim().to_string());
                }
            }
            continue;
        }
        if let Some(name) = line.strip_suffix(" {") {
            block = Some(name.to_string());
            continue;
        }
        let body = match line.strip_prefix("# ") {
            // Derived values drbdmeta prints as comments.
            Some(c) => match c.split_once(' ') {
                Some((k, _))
                    if [
                        "md_size_sect",
                        "md_offset",
                        "al_offset",
                        "bm_offset",
                        "al-extents",
                        "bm-bytes",
                        "bits-set",
                        "members",
                    ]
                    .contains(&k) =>
                {
                    c
                }
                _ => continue,
            },
            None if line.starts_with('#') || line.is_empty() => continue,
            None => line,
        };
        let body = body.split(';').next().unwrap_or("").trim();
        if let Some((k, v)) = body.split_once(' ') {
            out.insert(k.to_string(), v.trim().to_string());
        }
    }
    out
}

/// Every field drbdmeta printed has the same value in tandem's dump; tandem prints
/// nothing drbdmeta does not, except `members` (DRBD ≥ 9.2's field, reserved in 9.22).
fn assert_same_fields(drbdmeta_text: &str, tandem_text: &str) {
    let d = parse_dump(drbdmeta_text);
    let t = parse_dump(tandem_text);
    assert!(
        d.len() > 140,
        "drbdmeta's dump parsed to only {} fields:\n{drbdmeta_text}",
        d.len()
    );
    for (k, v) in &d {
        assert_eq!(
            t.get(k),
            Some(v),
            "field {k}: drbdmeta says {v}, tandem says {:?}\n--- drbdmeta \
             ---\n{drbdmeta_text}\n--- tandem ---\n{tandem_text}",
            t.get(k)
        );
    }
    for k in t.keys() {
        assert!(
            d.contains_key(k) || k == "members",
            "tandem prints {k}, drbdmeta does not"
        );
    }
}

/// tandem's JSON agrees with drbdmeta's text on the fields scripts use.
fn assert_json_agrees(drbdmeta_text: &str, json: &str) {
    let d = parse_dump(drbdmeta_text);
    let v: serde_json::Value = serde_json::from_str(json).expect("tandem dump-md --json is JSON");
    let s = |k: &str| match &v[k] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for (json_key, dump_key) in [
        ("current_uuid", "current-uuid"),
        ("flags", "flags"),
        ("node_id", "node-id"),
        ("la_size_sect", "la-size-sect"),
        ("bits_set", "bits-set"),
        ("bm_bytes", "bm-bytes"),
        ("md_offset", "md_offset"),
        ("al_offset", "al_offset"),
        ("bm_offset", "bm_offset"),
        ("md_size_sect", "md_size_sect"),
        ("al_stripes", "al-stripes"),
        ("al_stripe_size_4k", "al-stripe-size-4k"),
        ("device_uuid", "device-uuid"),
        ("max_peers", "max-peers"),
    ] {
        assert_eq!(Some(&s(json_key)), d.get(dump_key), "{json_key}");
    }
    assert_eq!(
        v["peers"][1]["bitmap_uuid"].as_str(),
        d.get("peer[1].bitmap-uuid").map(String::as_str)
    );
    assert_eq!(
        v["history_uuids"][0].as_str(),
        d.get("history-uuids").and_then(|h| h.split(' ').next())
    );
}

// ----- scenario helpers -------------------------------------------------------------------

/// Gives drbdmeta-made metadata a size, UUIDs, flags, a peer and bitmap bits through
/// drbdmeta's own `restore-md` (drbdmeta 9.22 cannot set a size otherwise). Returns the
/// number of bits set.
fn drbdmeta_populate(minor: &Minor, dev: &str, kind: &str, la_size: u64, dir: &TempDir) -> u64 {
    let dump = drbdmeta(minor, dev, kind, &["dump-md"]);
    dump.assert_success("drbdmeta dump-md");
    // As many 64-bit words as drbdmeta's bm_bytes (4 KiB-aligned) for this size; three
    // groups of bits, the last one the very last bit inside la-size.
    let bits = la_size.div_ceil(8);
    let bytes = (bits.next_multiple_of(64) / 8).next_multiple_of(4096);
    let words = usize::try_from(bytes / 8).expect("small");
    let mut bm = vec![0u64; words];
    bm[0] = 0xffff;
    bm[words / 3] = 0x8000_0000_0000_0001;
    let last = usize::try_from(bits - 1).expect("small");
    bm[last / 64] |= 1 << (last % 64);
    let body: Vec<String> = bm.iter().map(|w| format!("0x{w:016X};")).collect();
    let mut text = dump
        .stdout
        .replace("la-size-sect 0;", &format!("la-size-sect {la_size};"))
        .replace(
            "current-uuid 0x0000000000000004;",
            "current-uuid 0x1234567890ABCDEE;",
        )
        .replace("node-id -1;", "node-id 0;")
        .replace("flags 0x00000080;", "flags 0x00000091;")
        .replace(
            "device-uuid 0x0000000000000000;",
            "device-uuid 0x00C0FFEE00C0FFEE;",
        )
        .replace("la-peer-max-bio-size 0;", "la-peer-max-bio-size 1048576;")
        .replace(
            "bitmap[0] {\n}",
            &format!("bitmap[0] {{\n   # at 0kB\n   {}\n}}", body.join(" ")),
        );
    // peer[1]: bitmap slot 0, a bitmap UUID, connected | seen | exists.
    text = text.replacen(
        "peer[1] {\n    bitmap-index -1;\n    bitmap-uuid 0x0000000000000000;\n    \
         bitmap-dagtag 0x0000000000000000;\n    flags 0x00000000;",
        "peer[1] {\n    bitmap-index 0;\n    bitmap-uuid 0x0BADCAFE0BADCAFE;\n    \
         bitmap-dagtag 0x0000000000001234;\n    flags 0x00010011;",
        1,
    );
    text = text.replacen(
        "history-uuids {\n        0x0000000000000000;",
        "history-uuids {\n        0x1111222233334444;",
        1,
    );
    let file = dir.join(format!("restore-{}.txt", minor.0));
    std::fs::write(&file, &text).expect("write the dump");
    let file = file.to_string_lossy().into_owned();
    drbdmeta(minor, dev, kind, &["restore-md", &file]).assert_success("drbdmeta restore-md");
    16 + 2 + 1
}

/// Gives tandem-made metadata a size, UUIDs, flags, a peer and bitmap bits through the
/// engine. Returns the number of bits set.
fn tandem_populate(store: Store, location: MetaLocation) -> u64 {
    let mut dev = MetaDevice::open(store, location).expect("open tandem's metadata");
    let mut sb = dev.superblock().clone();
    sb.effective_size = dev.layout().max_data_sectors;
    sb.current_uuid = 0x1234_5678_9abc_def0;
    sb.flags = mdf::CONSISTENT | mdf::WAS_UP_TO_DATE | mdf::AL_CLEAN;
    sb.node_id = 1;
    sb.device_uuid = 0xc0ff_ee00_c0ff_ee00;
    sb.la_peer_max_bio_size = 1 << 17;
    sb.peers[0].bitmap_index = 0;
    sb.peers[0].bitmap_uuid = 0x0bad_cafe_0bad_cafe;
    sb.peers[0].flags = 0x0001_0011;
    sb.peers[1].bitmap_uuid = 0x5555;
    sb.history_uuids[0] = 0x1111_2222_3333_4444;
    sb.history_uuids[31] = 0x9999;
    dev.write_superblock_blocking(sb)
        .expect("write the superblock");
    let mut page = vec![0u8; 4096];
    page[0] = 0xff;
    page[4095] = 0x81;
    dev.write_bitmap_blocking(0, &page, true)
        .expect("write bitmap page 0");
    let last = dev.bitmap_bytes() - 4096;
    let mut page = vec![0u8; 4096];
    page[100] = 0x0f;
    dev.write_bitmap_blocking(last, &page, true)
        .expect("write the last bitmap page");
    8 + 2 + 4
}

// ----- 1 and 2: internal metadata ---------------------------------------------------------

#[test]
fn drbdmeta_internal_metadata_is_read_by_tandem() {
    if !loop_devices_usable("drbdmeta_internal_metadata_is_read_by_tandem") {
        return;
    }
    let dir = TempDir::new("dm-int1");
    let lo = Loop::new(&dir, "data", GIB + 12345 * 512);
    let minor = Minor::new();
    drbdmeta(&minor, &lo.dev, "internal", &["create-md", "1"]).assert_success("drbdmeta create-md");
    // As created: same fields (la-size 0, an empty bitmap).
    let d = drbdmeta(&minor, &lo.dev, "internal", &["dump-md"]);
    d.assert_success("drbdmeta dump-md");
    let t = tandem(&["dump-md", &lo.dev]);
    t.assert_success("tandem dump-md");
    assert_same_fields(&d.stdout, &t.stdout);
    // With a size, UUIDs, flags, a peer and bits.
    // The largest size the device holds: (sectors & ~7) − md_size_sect 144.
    let la = ((2_097_152 + 12345) & !7) - 144;
    let bits = drbdmeta_populate(&minor, &lo.dev, "internal", la, &dir);
    let d = drbdmeta(&minor, &lo.dev, "internal", &["dump-md"]);
    d.assert_success("drbdmeta dump-md");
    assert_eq!(
        parse_dump(&d.stdout).get("bits-set"),
        Some(&bits.to_string())
    );
    let t = tandem(&["dump-md", &lo.dev]);
    t.assert_success("tandem dump-md");
    assert_same_fields(&d.stdout, &t.stdout);
    let j = tandem(&["dump-md", "--json", &lo.dev]);
    j.assert_success("tandem dump-md --json");
    assert_json_agrees(&d.stdout, &j.stdout);
    // And the engine attaches it.
    let dev = MetaDevice::open(store_of(&lo), MetaLocation::Internal).expect("engine opens it");
    assert_eq!(dev.superblock().effective_size, la);
    assert_eq!(dev.count_bits_blocking().expect("count"), bits);
}

#[test]
fn tandem_internal_metadata_is_read_by_drbdmeta() {
    if !loop_devices_usable("tandem_internal_metadata_is_read_by_drbdmeta") {
        return;
    }
    let dir = TempDir::new("dm-int2");
    let lo = Loop::new(&dir, "data", 3 * GIB);
    let minor = Minor::new();
    tandem(&[
        "create-md",
        &lo.dev,
        "--al-stripes",
        "2",
        "--al-stripe-size",
        "64k",
        "--al-extents",
        "3000",
    ])
    .assert_success("tandem create-md");
    // drbdmeta reads tandem's fresh metadata.
    let d = drbdmeta(&minor, &lo.dev, "internal", &["dump-md"]);
    d.assert_success("drbdmeta dump-md of tandem's metadata");
    let t = tandem(&["dump-md", &lo.dev]);
    t.assert_success("tandem dump-md");
    assert_same_fields(&d.stdout, &t.stdout);
    let f = parse_dump(&d.stdout);
    assert_eq!(f.get("al-stripes").map(String::as_str), Some("2"));
    assert_eq!(f.get("al-stripe-size-4k").map(String::as_str), Some("16"));
    assert_eq!(f.get("al-extents").map(String::as_str), Some("3000"));
    assert_eq!(
        f.get("current-uuid").map(String::as_str),
        Some("0x0000000000000004")
    );
    // With a size, UUIDs, flags, a peer and bits.
    let bits = tandem_populate(store_of(&lo), MetaLocation::Internal);
    let d = drbdmeta(&minor, &lo.dev, "internal", &["dump-md"]);
    d.assert_success("drbdmeta dump-md");
    assert_eq!(
        parse_dump(&d.stdout).get("bits-set"),
        Some(&bits.to_string())
    );
    let t = tandem(&["dump-md", &lo.dev]);
    t.assert_success("tandem dump-md");
    assert_same_fields(&d.stdout, &t.stdout);
    let j = tandem(&["dump-md", "--json", &lo.dev]);
    assert_json_agrees(&d.stdout, &j.stdout);
    // drbdmeta's apply-al on tandem's clean metadata: nothing to do, still valid for both.
    drbdmeta(&minor, &lo.dev, "internal", &["apply-al"]).assert_success("drbdmeta apply-al");
    tandem(&["dump-md", &lo.dev]).assert_success("tandem dump-md after drbdmeta apply-al");
}

// ----- 3: flex-external -------------------------------------------------------------------

#[test]
fn flex_external_metadata_both_ways() {
    if !loop_devices_usable("flex_external_metadata_both_ways") {
        return;
    }
    let dir = TempDir::new("dm-ext");
    let data = Loop::new(&dir, "data", 2 * GIB);
    let meta = Loop::new(&dir, "meta", 128 * MIB);
    let minor = Minor::new();
    let ext = "flex-external";

    // drbdmeta creates, tandem reads.
    drbdmeta(&minor, &meta.dev, ext, &["create-md", "1"]).assert_success("drbdmeta create-md");
    let bits = drbdmeta_populate(&minor, &meta.dev, ext, 2 * GIB / 512, &dir);
    let d = drbdmeta(&minor, &meta.dev, ext, &["dump-md"]);
    d.assert_success("drbdmeta dump-md");
    assert_eq!(
        parse_dump(&d.stdout).get("bits-set"),
        Some(&bits.to_string())
    );
    let t = tandem(&["dump-md", &data.dev, "--meta-device", &meta.dev]);
    t.assert_success("tandem dump-md --meta-device");
    assert_same_fields(&d.stdout, &t.stdout);
    let j = tandem(&["dump-md", "--json", &data.dev, "--meta-device", &meta.dev]);
    assert_json_agrees(&d.stdout, &j.stdout);
    // Without --meta-device tandem looks for internal metadata and says so.
    let wrong = tandem(&["dump-md", &data.dev]);
    assert!(!wrong.status.success());
    assert!(wrong.stderr.contains("create-md"), "{}", wrong.stderr);

    // tandem creates (over drbdmeta's, so --force), drbdmeta reads.
    let refused = tandem(&["create-md", &data.dev, "--meta-device", &meta.dev]);
    assert!(
        !refused.status.success(),
        "create-md over existing metadata without --force"
    );
    assert!(refused.stderr.contains("--force"), "{}", refused.stderr);
    tandem(&[
        "create-md",
        &data.dev,
        "--meta-device",
        &meta.dev,
        "--force",
        "--node-id",
        "3",
    ])
    .assert_success("tandem create-md --meta-device --force");
    let d = drbdmeta(&minor, &meta.dev, ext, &["dump-md"]);
    d.assert_success("drbdmeta dump-md of tandem's flex-external metadata");
    assert_eq!(
        parse_dump(&d.stdout).get("bits-set").map(String::as_str),
        Some("0")
    );
    let t = tandem(&["dump-md", &data.dev, "--meta-device", &meta.dev]);
    assert_same_fields(&d.stdout, &t.stdout);
    let bits = tandem_populate(
        store_of(&meta),
        MetaLocation::FlexExternal {
            data_bytes: 2 * GIB,
        },
    );
    let d = drbdmeta(&minor, &meta.dev, ext, &["dump-md"]);
    d.assert_success("drbdmeta dump-md");
    assert_eq!(
        parse_dump(&d.stdout).get("bits-set"),
        Some(&bits.to_string())
    );
    let t = tandem(&["dump-md", &data.dev, "--meta-device", &meta.dev]);
    assert_same_fields(&d.stdout, &t.stdout);
}

// ----- 4: apply-al ------------------------------------------------------------------------

/// A crashed Primary's metadata on `lo`: tandem's create-md, then the engine sets the size
/// and PRIMARY_IND and runs the real runtime activity log over `writes` (each write one
/// extent, retired at once), writing every transaction into the ring; then one slot is
/// corrupted (a flipped byte: bad crc). Returns the extents the log held.
fn crash_primary(
    store: Store,
    location: MetaLocation,
    al_extents: u32,
    first_tr: u32,
    writes: &[u32],
) -> Vec<u32> {
    let mut dev = MetaDevice::open(store, location).expect("open");
    let mut sb = dev.superblock().clone();
    sb.effective_size = dev.layout().max_data_sectors;
    sb.flags = mdf::CONSISTENT | mdf::WAS_UP_TO_DATE | mdf::PRIMARY_IND;
    sb.current_uuid = 0xabcd_ef01_2345_6788;
    dev.write_superblock_blocking(sb)
        .expect("mark it a crashed Primary");
    let layout = *dev.layout();
    let mut log = ActivityLog::new(layout.al, al_extents, first_tr).expect("activity log");
    for &e in writes {
        assert_ne!(log.begin(e, e), Begin::NoRoom);
        if let Some(p) = log.prepare() {
            let at = layout.al_block_offset(p.ring_block).expect("in the ring");
            let buf = AlignedBuf::from_slice(&p.block[..]).expect("buffer");
            dev.store()
                .write_blocking(at, &buf, false)
                .expect("write a transaction");
            log.committed();
        }
        log.put(e, e);
    }
    // Corrupt the slot that the next transaction would overwrite (the oldest).
    let ring = dev.read_al_blocking().expect("read the ring");
    let oldest = (0..layout.al.blocks())
        .min_by_key(|&b| {
            let o = b as usize * 4096;
            let tr = u32::from_be_bytes(ring[o + 4..o + 8].try_into().expect("4 bytes"));
            tr.wrapping_sub(first_tr)
        })
        .expect("non-empty ring");
    let o = oldest as usize * 4096;
    let mut block = ring[o..o + 4096].to_vec();
    block[2000] ^= 0x40;
    let buf = AlignedBuf::from_slice(&block).expect("buffer");
    let at = layout.al_block_offset(oldest).expect("in the ring");
    dev.store()
        .write_blocking(at, &buf, false)
        .expect("corrupt a slot");
    dev.store().flush_blocking().expect("flush");
    log.active_extents()
}

/// Bytes of one extent in the bitmap.
const EXTENT_BYTES: usize = 128;

struct Applied {
    drbdmeta_bm: Vec<u8>,
    tandem_bm: Vec<u8>,
    drbdmeta_stderr: String,
}

/// Runs `drbdmeta apply-al` on `a` and `tandem apply-al` on `b` (copies of one crashed
/// Primary's metadata); asserts identical superblocks and rings and returns the bitmaps.
fn apply_both(
    a: &Loop,
    b: &Loop,
    kind: &str,
    tandem_args: &[&str],
    location: MetaLocation,
) -> Applied {
    let minor = Minor::new();
    let layout = *MetaDevice::open(store_of(a), location)
        .expect("open")
        .layout();
    let d = drbdmeta(&minor, &a.dev, kind, &["apply-al"]);
    d.assert_success("drbdmeta apply-al");
    let mut args = vec!["apply-al", "--json"];
    args.extend_from_slice(tandem_args);
    let t = tandem(&args);
    t.assert_success("tandem apply-al");
    let report: serde_json::Value = serde_json::from_str(&t.stdout).expect("JSON report");
    assert_eq!(report["primary"], true);
    assert_eq!(report["corrupt_slots"], 1, "{report}");
    let sb_a = a.read(layout.md_offset, 4096);
    let sb_b = b.read(layout.md_offset, 4096);
    assert_eq!(sb_a, sb_b, "superblocks after apply-al differ");
    let flags = u32::from_be_bytes(sb_a[56..60].try_into().expect("4 bytes"));
    assert_eq!(
        flags,
        mdf::CONSISTENT | mdf::WAS_UP_TO_DATE | mdf::PRIMARY_IND | mdf::AL_CLEAN
    );
    let al_len = usize::try_from(layout.al.bytes()).expect("small");
    assert_eq!(
        a.read(layout.al_offset, al_len),
        b.read(layout.al_offset, al_len),
        "rings differ"
    );
    assert_eq!(
        a.read(layout.al_offset, al_len),
        al::initialized_ring(&layout.al),
        "the ring is re-initialised"
    );
    let bm_len = usize::try_from(layout.bm_area_bytes).expect("small");
    Applied {
        drbdmeta_bm: a.read(layout.bm_offset, bm_len),
        tandem_bm: b.read(layout.bm_offset, bm_len),
        drbdmeta_stderr: d.stderr,
    }
}

fn extent_bits(bm: &[u8], e: u32) -> u32 {
    let s = e as usize * EXTENT_BYTES;
    bm[s..s + EXTENT_BYTES].iter().map(|b| b.count_ones()).sum()
}

/// The 4 MiB extents a workload writes: `n` distinct extents below `limit`, scattered,
/// some written twice, never `limit` itself.
fn workload(n: u32, limit: u32) -> Vec<u32> {
    let mut w: Vec<u32> = (0..n).map(|i| (i * 7919 + 13) % limit).collect();
    w.extend((0..n / 4).map(|i| (i * 31) % limit));
    w
}

#[test]
fn apply_al_matches_drbdmeta() {
    if !loop_devices_usable("apply_al_matches_drbdmeta") {
        return;
    }
    let dir = TempDir::new("dm-al");
    // 16 GiB: 4096 extents; the last one (4095) is partly metadata.
    let a = Loop::new(&dir, "a", 16 * GIB);
    // Striped ring: 4 stripes × 4 blocks; 1237 extents need two transactions of context.
    tandem(&[
        "create-md",
        &a.dev,
        "--al-stripes",
        "4",
        "--al-stripe-size",
        "16k",
    ])
    .assert_success("tandem create-md");
    // 3000 writes over 4095 extents with 1237 slots: evictions; ~3000 transactions wrap
    // the 16-block ring ~190 times, and the transaction number wraps past u32::MAX.
    let writes = workload(3000, 4095);
    let active = crash_primary(
        store_of(&a),
        MetaLocation::Internal,
        1237,
        u32::MAX - 1000,
        &writes,
    );
    assert_eq!(active.len(), 1237);
    assert!(!active.contains(&4095));
    let b = a.copy(&dir, "b");
    let r = apply_both(&a, &b, "internal", &[&b.dev], MetaLocation::Internal);
    assert_eq!(r.drbdmeta_bm, r.tandem_bm, "bitmaps after apply-al differ");
    let set: u32 = r.tandem_bm.iter().map(|b| b.count_ones()).sum();
    assert_eq!(set, 1237 * 1024);
    for &e in &active {
        assert_eq!(extent_bits(&r.tandem_bm, e), 1024, "extent {e}");
    }
}

/// The end of the bitmap, where apply-al implementations differ. drbd-utils 9.22 (the
/// drbdmeta tested here) sets a hot extent's 128 bitmap bytes whole, clipped to the
/// 4 KiB-aligned bitmap for la-size, so bits past la-size get set too; tandem does the
/// same, byte for byte. (drbd-utils >= 9.33 instead skips a hot extent whose bytes end
/// exactly at that 4 KiB-aligned end, an off-by-one that loses the last extent's bits:
/// cases 1 and 2 below are where it would; tandem does not copy it.)
#[test]
fn apply_al_at_the_end_of_the_bitmap() {
    if !loop_devices_usable("apply_al_at_the_end_of_the_bitmap") {
        return;
    }
    let dir = TempDir::new("dm-al-last");

    // (1) Internal, 16 GiB: la-size = 16 GiB - 1160 sectors of metadata = 4194159 bits;
    // the last extent 4095 holds 879 of them and its bytes end at the bitmap's end.
    let a = Loop::new(&dir, "a", 16 * GIB);
    tandem(&["create-md", &a.dev]).assert_success("tandem create-md");
    let mut writes = workload(300, 4095);
    writes.push(4095);
    let active = crash_primary(store_of(&a), MetaLocation::Internal, 1237, 7, &writes);
    assert!(active.contains(&4095));
    let b = a.copy(&dir, "b");
    let r = apply_both(&a, &b, "internal", &[&b.dev], MetaLocation::Internal);
    assert!(
        !r.drbdmeta_stderr.contains("beyond end of bitmap"),
        "{}",
        r.drbdmeta_stderr
    );
    assert_eq!(r.drbdmeta_bm, r.tandem_bm, "bitmaps after apply-al differ");
    assert_eq!(extent_bits(&r.tandem_bm, 4095), 1024);
    assert_eq!(r.tandem_bm.len(), 4096 * EXTENT_BYTES);

    // (2) flex-external, 1 GiB of data: extent 255 is all data, its bytes end exactly at
    // the end of the 32 KiB bitmap.
    let data = Loop::new(&dir, "data1g", GIB);
    let ma = Loop::new(&dir, "ma", 4 * MIB);
    tandem(&["create-md", &data.dev, "--meta-device", &ma.dev])
        .assert_success("tandem create-md flex-external");
    let loc = MetaLocation::FlexExternal { data_bytes: GIB };
    let mut writes = workload(100, 255);
    writes.push(255);
    let active = crash_primary(store_of(&ma), loc, 67, 0, &writes);
    assert!(active.contains(&255));
    let mb = ma.copy(&dir, "mb");
    let r = apply_both(
        &ma,
        &mb,
        "flex-external",
        &[&data.dev, "--meta-device", &mb.dev],
        loc,
    );
    assert_eq!(r.drbdmeta_bm, r.tandem_bm, "bitmaps after apply-al differ");
    assert_eq!(extent_bits(&r.tandem_bm, 255), 1024);

    // (3) flex-external, 100 MiB + 4 KiB of data (25601 bits, a 4 KiB bitmap): extent 25
    // holds one 4 KiB block, extent 31 none (it lies in the bitmap's padding), extent 32
    // starts past the bitmap. Both tools set 25 and 31 whole and skip 32.
    let data = Loop::new(&dir, "data100m", 100 * MIB + 4096);
    let mc = Loop::new(&dir, "mc", 4 * MIB);
    tandem(&["create-md", &data.dev, "--meta-device", &mc.dev])
        .assert_success("tandem create-md flex-external");
    let loc = MetaLocation::FlexExternal {
        data_bytes: 100 * MIB + 4096,
    };
    let active = crash_primary(store_of(&mc), loc, 67, 0, &[3, 25, 31, 32, 7]);
    assert_eq!(active, vec![3, 7, 25, 31, 32]);
    let md = mc.copy(&dir, "md");
    let r = apply_both(
        &mc,
        &md,
        "flex-external",
        &[&data.dev, "--meta-device", &md.dev],
        loc,
    );
    assert!(
        r.drbdmeta_stderr.contains("extent 32 beyond end of bitmap"),
        "{}",
        r.drbdmeta_stderr
    );
    assert_eq!(r.drbdmeta_bm, r.tandem_bm, "bitmaps after apply-al differ");
    for e in [3, 7, 25, 31] {
        assert_eq!(extent_bits(&r.tandem_bm, e), 1024, "extent {e}");
    }
    let set: u32 = r.tandem_bm.iter().map(|b| b.count_ones()).sum();
    assert_eq!(set, 4 * 1024);
}

/// A crashed Primary whose ring is garbage: both tools refuse and leave it unclean.
#[test]
fn apply_al_refuses_an_unusable_log_like_drbdmeta() {
    if !loop_devices_usable("apply_al_refuses_an_unusable_log_like_drbdmeta") {
        return;
    }
    let dir = TempDir::new("dm-al-bad");
    let a = Loop::new(&dir, "a", GIB);
    tandem(&["create-md", &a.dev]).assert_success("tandem create-md");
    crash_primary(store_of(&a), MetaLocation::Internal, 67, 0, &[1, 2, 3]);
    let layout = *MetaDevice::open(store_of(&a), MetaLocation::Internal)
        .expect("open")
        .layout();
    a.write(
        layout.al_offset,
        &vec![0u8; usize::try_from(layout.al.bytes()).expect("small")],
    );
    let b = a.copy(&dir, "b");
    let minor = Minor::new();
    let d = drbdmeta(&minor, &a.dev, "internal", &["apply-al"]);
    assert!(
        !d.status.success(),
        "drbdmeta apply-al succeeded on a zeroed ring"
    );
    let t = tandem(&["apply-al", &b.dev]);
    assert!(
        !t.status.success(),
        "tandem apply-al succeeded on a zeroed ring"
    );
    assert!(
        t.stderr.contains("unusable") && t.stderr.contains("create-md --force"),
        "{}",
        t.stderr
    );
    assert_eq!(
        a.read(layout.md_offset, 4096),
        b.read(layout.md_offset, 4096)
    );
    let dump = tandem(&["dump-md", &b.dev]);
    assert!(!dump.status.success());
    assert!(
        dump.stderr.contains("unclean") && dump.stderr.contains("apply-al"),
        "{}",
        dump.stderr
    );
    tandem(&["dump-md", "--force", &b.dev])
        .assert_success("tandem dump-md --force of unclean metadata");
}

// ----- 5: hostile metadata ----------------------------------------------------------------

/// Runs `tandem dump-md ARGS` and asserts it fails with every word of `words` in its
/// message (and no panic).
fn refused(args: &[&str], words: &[&str]) {
    let mut all = vec!["dump-md"];
    all.extend_from_slice(args);
    tandem(&all).assert_refused(&format!("tandem {all:?}"), words);
    // And apply-al refuses too without touching anything.
    let mut all = vec!["apply-al"];
    all.extend_from_slice(args);
    assert!(!tandem(&all).status.success(), "apply-al accepted it");
}

#[test]
fn hostile_metadata_is_refused_with_the_fix() {
    if !loop_devices_usable("hostile_metadata_is_refused_with_the_fix") {
        return;
    }
    let dir = TempDir::new("dm-hostile");
    let lo = Loop::new(&dir, "data", GIB);
    let md_offset = GIB - 4096;
    let minor = Minor::new();

    // Nothing there.
    refused(
        &[&lo.dev],
        &["no tandem/DRBD 9 metadata", "tandem create-md"],
    );
    // max-peers 2: DRBD's, not tandem's.
    drbdmeta(&minor, &lo.dev, "internal", &["create-md", "2"]).assert_success("create-md 2");
    refused(&[&lo.dev], &["max-peers is 2", "create-md"]);
    lo.write(md_offset, &[0u8; 4096]);
    // DRBD 8.4 metadata.
    let mut cmd = Command::new(drbdmeta_bin());
    cmd.args([
        "--force",
        &minor.0.to_string(),
        "v08",
        &lo.dev,
        "internal",
        "create-md",
    ]);
    run_cmd(&mut cmd, TIMEOUT, "drbdmeta v08")
        .expect("run")
        .assert_success("drbdmeta v08 create-md");
    refused(&[&lo.dev], &["DRBD 8", "v09", "drbdmeta"]);

    // Impossible fields in tandem's own metadata, one at a time.
    tandem(&["create-md", &lo.dev, "--force"]).assert_success("tandem create-md");
    let good = lo.read(md_offset, 4096);
    let cases: [(usize, &[u8], &[&str]); 6] = [
        (
            76,
            &[0x7f, 0, 0, 0],
            &["offsets do not match", "create-md --force"],
        ), // bm_offset
        (68, &[0, 0, 0, 8], &["offsets do not match"]), // al_offset
        (64, &[0xff, 0xff, 0xff, 0xff], &["offsets do not match"]), // md_size_sect
        (80, &[0, 0, 2, 0], &["bm-byte-per-bit is 512"]),
        (0, &[0xff; 8], &["la-size-sect", "larger than"]),
        (96, &[0xff; 8], &["activity log striping"]),
    ];
    for (at, bytes, words) in cases {
        let mut block = good.clone();
        block[at..at + bytes.len()].copy_from_slice(bytes);
        lo.write(md_offset, &block);
        refused(&[&lo.dev], words);
    }
    lo.write(md_offset, &good);
    tandem(&["dump-md", &lo.dev]).assert_success("restored metadata");

    // A flex-external metadata device that was truncated after create-md.
    let data = Loop::new(&dir, "d2", GIB);
    let meta = Loop::new(&dir, "m", 8 * MIB);
    tandem(&["create-md", &data.dev, "--meta-device", &meta.dev]).assert_success("create-md");
    let short_file = dir.join("m-short");
    std::fs::copy(&meta.file, &short_file).expect("copy");
    File::options()
        .write(true)
        .open(&short_file)
        .and_then(|f| f.set_len(2 * MIB))
        .expect("truncate");
    let short = Loop::attach(short_file);
    refused(
        &[&data.dev, "--meta-device", &short.dev],
        &["md_size_sect", "larger than", "create-md --force"],
    );

    // An internal device that cannot hold metadata at all.
    let tiny = Loop::new(&dir, "tiny", 64 * 1024);
    let out = tandem(&["create-md", &tiny.dev]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("cannot put internal metadata"),
        "{}",
        out.stderr
    );
    refused(&[&tiny.dev], &["tandem create-md"]);

    // Random superblocks: never a panic (tandem() checks), always a refusal or a valid dump.
    let mut seed = 0x5eed_u64;
    for _ in 0..20 {
        let mut block = good.clone();
        for _ in 0..8 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let pos = usize::try_from(seed >> 33).expect("small") % 1392;
            block[pos] = seed.to_le_bytes()[3];
        }
        lo.write(md_offset, &block);
        let _ = tandem(&["dump-md", &lo.dev]);
    }
}
