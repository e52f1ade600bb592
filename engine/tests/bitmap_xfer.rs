//! The bitmap exchange codec against the kernel: every `P_BITMAP` / `P_COMPRESSED_BITMAP`
//! the two kernel DRBD 8.4.11 nodes of `tests/data/drbd84-captures/` sent each other (read
//! with the shared pcap decoder of `capture/`) is decoded by [`BitmapReceiver`]; the decoded
//! bitmap must be exactly the blocks the following resync then requests (and, where the
//! kernel reports it, its `P_UUIDS.dirty_bits`); and [`BitmapSender`] must re-encode that
//! bitmap into byte-identical packets.
//!
//! What the captures hold (4 MiB devices: 8112 sectors = 1014 bits, 16 words): six
//! transfers, one per direction and connection, each a single `P_COMPRESSED_BITMAP`, no
//! plain packet; two full-sync bitmaps (all 1014 bits) per initial sync and the 8-bit
//! bitmap of the reconnect after 8 scattered writes (sent by the SyncSource, merged and
//! sent back by the SyncTarget).

mod capture;

use std::collections::BTreeSet;

use capture::Capture;
use tandem_engine::wire::bitmap_xfer::{bm_words, vli_encode};
use tandem_engine::wire::{
    encode, BitmapReceiver, BitmapSender, Command, CompressedBitmap, Packet, WireCtx,
};

/// One bitmap transfer as captured.
struct Transfer {
    /// "sport->dport".
    stream: String,
    packets: Vec<Packet>,
    bitmap: Vec<u64>,
    receiver: BitmapReceiver,
}

/// Bits of the bitmap of the captured devices: every `P_SIZES` must carry the same
/// capacity; DRBD's bitmap has one bit per 8 sectors, rounded up.
fn bm_bits(cap: &Capture) -> u64 {
    let sizes: BTreeSet<u64> = cap
        .packets
        .iter()
        .filter_map(|p| match &p.packet {
            Packet::Sizes(s) => Some(s.c_size),
            _ => None,
        })
        .collect();
    assert_eq!(sizes.len(), 1, "one capacity: {sizes:?}");
    let sectors = *sizes.first().expect("a P_SIZES");
    sectors.div_ceil(8)
}

/// Every bitmap transfer of a capture, each decoded by a fresh receiver into a clear
/// bitmap. A transfer ends when the receiver says so; a stream's next bitmap packet starts
/// another one. Every transfer must be complete.
fn transfers(cap: &Capture) -> Vec<Transfer> {
    let bits = bm_bits(cap);
    let mut out: Vec<Transfer> = Vec::new();
    let mut open: Option<Transfer> = None;
    let mut stream = String::new();
    for p in &cap.packets {
        if !matches!(p.packet, Packet::Bitmap(_) | Packet::CompressedBitmap(_)) {
            continue;
        }
        if p.stream != stream {
            assert!(open.is_none(), "{stream}: bitmap transfer left incomplete");
            stream.clone_from(&p.stream);
        }
        let t = open.get_or_insert_with(|| Transfer {
            stream: p.stream.clone(),
            packets: Vec::new(),
            bitmap: vec![0; usize::try_from(bm_words(bits)).expect("small")],
            receiver: BitmapReceiver::new(bits, &cap.agreed).expect("receiver"),
        });
        t.packets.push(p.packet.clone());
        let done = t
            .receiver
            .receive_packet(&mut t.bitmap, &p.packet)
            .unwrap_or_else(|e| panic!("{}: kernel bitmap packet refused: {e}", p.stream));
        if done {
            out.extend(open.take());
        }
    }
    assert!(open.is_none(), "{stream}: bitmap transfer left incomplete");
    out
}

/// The 4 KiB blocks the capture's resync asked for (`P_RS_DATA_REQUEST`, and
/// `P_CSUM_RS_REQUEST` for a checksum-based resync).
fn resync_blocks(cap: &Capture) -> BTreeSet<u64> {
    let mut blocks = BTreeSet::new();
    for p in &cap.packets {
        if let Packet::BlockReq { cmd, req, .. } = &p.packet {
            if matches!(
                *cmd,
                Command::P_RS_DATA_REQUEST | Command::P_CSUM_RS_REQUEST
            ) {
                assert_eq!((req.sector % 8, req.blksize % 4096), (0, 0));
                blocks.extend(req.sector / 8..req.sector / 8 + u64::from(req.blksize / 4096));
            }
        }
    }
    blocks
}

fn set_bits(bitmap: &[u64]) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for (w, &word) in (0u64..).zip(bitmap) {
        for b in 0..64 {
            if word & (1 << b) != 0 {
                s.insert(w * 64 + b);
            }
        }
    }
    s
}

/// Re-encodes `t`'s decoded bitmap with our sender at the kernels' agreement (use-rle is
/// DRBD's default) and requires the kernel's packets, byte for byte.
fn check_reencodes(t: &Transfer, bits: u64, ctx: &WireCtx) {
    let mut sender = BitmapSender::new(&t.bitmap, bits, ctx, true).expect("sender");
    let mut ours = Vec::new();
    while let Some(p) = sender.next_packet() {
        ours.push(p);
    }
    assert_eq!(ours, t.packets, "{}", t.stream);
    for (a, b) in ours.iter().zip(&t.packets) {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        encode(a, ctx, 0, &mut x).expect("encodes");
        encode(b, ctx, 0, &mut y).expect("encodes");
        assert_eq!(x, y, "{}", t.stream);
    }
    // Both ends count the same packets and bytes.
    assert_eq!(sender.stats(), t.receiver.stats(), "{}", t.stream);
}

fn compressed(p: &Packet) -> &CompressedBitmap {
    match p {
        Packet::CompressedBitmap(c) => c,
        other => panic!("want a compressed bitmap, got {other:?}"),
    }
}

/// Initial full syncs (plain resync and checksum resync): both sides send an all-set
/// bitmap, one compressed packet with one run of 1014 set bits.
#[test]
fn full_sync_bitmaps() {
    for (name, streams) in [
        ("handshake-sync-writes.pcap", ["32853->7788", "7788->32853"]),
        ("auth-verify-csums.pcap", ["37435->7788", "7788->37435"]),
    ] {
        let cap = capture::load(name);
        let bits = bm_bits(&cap);
        assert_eq!(bits, 1014);
        let ts = transfers(&cap);
        let got: Vec<&str> = ts.iter().map(|t| t.stream.as_str()).collect();
        assert_eq!(got, streams, "{name}");
        let resync = resync_blocks(&cap);
        assert_eq!(
            resync,
            (0..1014).collect(),
            "{name}: the resync moves every block"
        );
        for t in &ts {
            assert_eq!(set_bits(&t.bitmap), resync, "{name} {}", t.stream);
            assert_eq!(t.receiver.newly_set(), 1014);
            // One run of 1014 set bits: level 7 (305..=8496), (1014 − 305) << 8 | 0x3f =
            // 0x2c53f in 21 bits = 3f c5 02 with 3 pad bits; encoding 0x80 | 3 << 4 | 2.
            assert_eq!(vli_encode(1014), Ok((0x2_c53f, 21)));
            assert_eq!(t.packets.len(), 1);
            let c = compressed(&t.packets[0]);
            assert_eq!(
                (c.encoding, c.code.as_slice()),
                (0xb2, &[0x3f, 0xc5, 0x02][..])
            );
            // What the kernel logs for it: 20 bytes against DRBD's plain estimate of 160.
            let st = t.receiver.stats();
            assert_eq!((st.rle_packets, st.rle_bytes, st.plain_packets), (1, 20, 0));
            assert_eq!(
                st.info_line("receive").as_deref(),
                Some(
                    "receive bitmap stats [Bytes(packets)]: plain 0(0), RLE 20(1), total 20; \
                     compression: 87.5%"
                )
            );
            check_reencodes(t, bits, &cap.agreed);
        }
        // The just-created disks reported all 1014 bits dirty in P_UUIDS.
        for p in cap.all(Command::P_UUIDS) {
            let Packet::Uuids(u) = &p.packet else {
                panic!("uuids")
            };
            assert_eq!(u.dirty_bits, 1014);
        }
    }
}

/// Reconnect after 8 scattered 4 KiB writes on the disconnected Primary: the SyncSource
/// (7788) sends its 8-bit bitmap, the SyncTarget (58125) merges it and sends the merged
/// bitmap back; the resync then requests exactly those 8 blocks.
#[test]
fn reconnect_bitmap() {
    let cap = capture::load("bitmap-resync.pcap");
    let bits = bm_bits(&cap);
    let ts = transfers(&cap);
    let got: Vec<&str> = ts.iter().map(|t| t.stream.as_str()).collect();
    assert_eq!(got, ["58125->7788", "7788->58125"]);
    let dirty: BTreeSet<u64> = [3, 17, 18, 19, 40, 200, 201, 600].into();
    assert_eq!(resync_blocks(&cap), dirty);
    // The SyncSource's P_UUIDS on the new connection counts them.
    let Packet::Uuids(u) = &cap.find(7788, 58125, Command::P_UUIDS, 0).packet else {
        panic!("uuids")
    };
    assert_eq!(u.dirty_bits, 8);

    // Runs: clear 3, set 1, clear 13, set 3, clear 20, set 1, clear 159, set 2, clear 398,
    // set 1, clear 413 (= 1014). Hand-computed codewords (value − level start) << prefix
    // bits | prefix: 87 bits, so 11 bytes with 1 pad bit; clear first: encoding 0x12.
    let runs: [(u64, u64, u32); 11] = [
        (3, 0b001, 3),
        (1, 0b00, 2),
        (13, (13 - 9) << 4 | 0x07, 7),
        (3, 0b001, 3),
        (20, (20 - 17) << 5 | 0x0f, 10),
        (1, 0b00, 2),
        (159, (159 - 49) << 6 | 0x1f, 14),
        (2, 0b10, 2),
        (398, (398 - 305) << 8 | 0x3f, 21),
        (1, 0b00, 2),
        (413, (413 - 305) << 8 | 0x3f, 21),
    ];
    assert_eq!(runs.iter().map(|r| r.0).sum::<u64>(), bits);
    assert_eq!(runs.iter().map(|r| r.2).sum::<u32>(), 87);
    for &(v, code, n) in &runs {
        assert_eq!(vli_encode(v), Ok((code, n)));
    }
    // The codewords concatenated LSB-first.
    let mut stream = 0u128;
    let mut at = 0;
    for &(_, code, n) in &runs {
        stream |= u128::from(code) << at;
        at += n;
    }
    let want: Vec<u8> = stream.to_le_bytes()[..11].to_vec();
    assert_eq!(
        want,
        [0xe1, 0x98, 0x37, 0xf8, 0xdc, 0xfc, 0xe9, 0x02, 0xfc, 0xb0, 0x01]
    );

    for t in &ts {
        assert_eq!(set_bits(&t.bitmap), dirty, "{}", t.stream);
        assert_eq!(t.packets.len(), 1);
        let c = compressed(&t.packets[0]);
        assert_eq!((c.encoding, &c.code), (0x12, &want));
        // 16 + 12 bytes against DRBD's plain estimate of 160: 82.5 %.
        assert_eq!(
            t.receiver.stats().info_line("receive").as_deref(),
            Some(
                "receive bitmap stats [Bytes(packets)]: plain 0(0), RLE 28(1), total 28; \
                 compression: 82.5%"
            )
        );
        check_reencodes(t, bits, &cap.agreed);
    }
}

/// Merging the SyncSource's bitmap into a SyncTarget bitmap that already has bits of its
/// own gives the union (what the SyncTarget then sends back).
#[test]
fn kernel_bitmap_merges_into_an_existing_one() {
    let cap = capture::load("bitmap-resync.pcap");
    let bits = bm_bits(&cap);
    let source = &transfers(&cap)[1];
    let mut target = vec![0u64; 16];
    target[0] = 1 << 5 | 1 << 3; // block 3 is already set: not counted again
    target[15] = 1 << 53; // block 1013, the last
    let mut r = BitmapReceiver::new(bits, &cap.agreed).expect("receiver");
    for p in &source.packets {
        r.receive_packet(&mut target, p).expect("valid");
    }
    assert!(r.is_done());
    assert_eq!(r.newly_set(), 7);
    let want: BTreeSet<u64> = [3, 5, 17, 18, 19, 40, 200, 201, 600, 1013].into();
    assert_eq!(set_bits(&target), want);
}
