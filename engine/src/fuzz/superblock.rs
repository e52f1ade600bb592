//! Fuzz body for the DRBD 9 superblock: decode any 4096 bytes, validate them against any
//! device sizes, and check what the rest of tandem relies on when validation says yes.
//!
//! Input: byte 0 selects the metadata kind and how the device sizes are chosen, bytes
//! 1..9 and 9..17 are two little-endian u64 sizes, the rest is the superblock (cut or
//! zero-padded to 4096 bytes). Beyond "no panic", [`run`] asserts: decoding is a pure
//! function of the 4096 bytes and encoding then decoding gives the same fields back;
//! an accepted superblock's [`Layout`] keeps the superblock, the activity-log ring and
//! the bitmap inside the metadata device and apart from each other (and, for internal
//! metadata, after the data area), and the last agreed size fits the data area and the
//! bitmap.

use crate::meta::layout::{bitmap_bytes, Layout, MetaKind, BLOCK, SECTOR};
use crate::meta::superblock::{Placement, Superblock, SUPERBLOCK_BYTES};

/// Header bytes before the superblock: selector and two sizes.
pub(crate) const HEADER: usize = 17;

fn size(bytes: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    for (d, s) in a.iter_mut().zip(bytes) {
        *d = *s;
    }
    u64::from_le_bytes(a)
}

/// The device sizes the superblock is validated against. Selector bits 1..=2 pick them:
/// raw (rounded down to 512), small (≤ 4 GiB), or derived from the superblock's own
/// `md_size_sect` so that validation gets past the offset checks more often.
fn placement(selector: u8, a: u64, b: u64, sb: &Superblock) -> Placement {
    let kind = if selector & 1 == 0 {
        MetaKind::Internal
    } else {
        MetaKind::FlexExternal
    };
    let meta_bytes = match (selector >> 1) & 3 {
        0 => a & !(SECTOR - 1),
        1 => (a % (4 << 30)) & !(SECTOR - 1),
        // Internal: a device whose metadata is md_size_sect long ends a few sectors
        // after it (what create-md made); external: exactly md_size_sect.
        _ => match kind {
            MetaKind::Internal => {
                let md = u64::from(sb.md_size_sect) * SECTOR;
                md.saturating_add(a) & !(SECTOR - 1)
            }
            MetaKind::FlexExternal => u64::from(sb.md_size_sect) * SECTOR,
        },
    };
    let data_bytes = match kind {
        MetaKind::Internal => meta_bytes,
        MetaKind::FlexExternal => b & !(SECTOR - 1),
    };
    Placement {
        kind,
        meta_bytes,
        data_bytes,
    }
}

/// Decodes and validates arbitrary bytes as a superblock; panics only on a broken
/// invariant. Returns whether the superblock was accepted.
pub fn run(data: &[u8]) -> bool {
    let (header, body) = data.split_at(data.len().min(HEADER));
    let selector = header.first().copied().unwrap_or(0);
    let a = size(header.get(1..9).unwrap_or(&[]));
    let b = size(header.get(9..17).unwrap_or(&[]));
    let mut block = [0u8; SUPERBLOCK_BYTES];
    for (d, s) in block.iter_mut().zip(body) {
        *d = *s;
    }
    let sb = Superblock::decode(&block);
    assert_eq!(Superblock::decode(&block), sb, "decoding is deterministic");
    assert_eq!(
        Superblock::decode(&sb.encode()),
        sb,
        "encode/decode round trip"
    );
    let _ = sb.is_clean();
    let p = placement(selector, a, b, &sb);
    match sb.validate(&p) {
        Ok(layout) => {
            check_layout(&layout, &sb, &p);
            true
        }
        Err(e) => {
            // Every refusal explains itself.
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

/// What an accepted superblock guarantees to the code that does IO with its layout.
fn check_layout(l: &Layout, sb: &Superblock, p: &Placement) {
    let end = |start: u64, len: u64| start.checked_add(len).expect("no overflow");
    assert_eq!(l.kind, p.kind);
    assert_eq!(
        (l.md_size_sect, l.al_offset_sect, l.bm_offset_sect),
        (sb.md_size_sect, sb.al_offset, sb.bm_offset)
    );
    // Everything is 4 KiB aligned and inside the metadata device.
    for off in [l.md_offset, l.al_offset, l.bm_offset] {
        assert_eq!(off % BLOCK, 0, "{l:?}");
    }
    assert!(end(l.md_offset, BLOCK) <= p.meta_bytes, "{l:?} {p:?}");
    assert!(
        end(l.al_offset, l.al.bytes()) <= p.meta_bytes,
        "{l:?} {p:?}"
    );
    assert!(
        end(l.bm_offset, l.bm_area_bytes) <= p.meta_bytes,
        "{l:?} {p:?}"
    );
    assert!(l.bm_area_bytes >= BLOCK);
    // The parts do not overlap, in DRBD's order.
    match l.kind {
        MetaKind::Internal => {
            assert_eq!(end(l.bm_offset, l.bm_area_bytes), l.al_offset, "{l:?}");
            assert_eq!(end(l.al_offset, l.al.bytes()), l.md_offset, "{l:?}");
            // The data area ends where the bitmap begins.
            assert!(l.max_data_sectors * SECTOR <= l.bm_offset, "{l:?}");
            assert!(l.max_data_sectors > 0);
        }
        MetaKind::FlexExternal => {
            assert_eq!(l.md_offset, 0);
            assert_eq!(l.al_offset, BLOCK);
            assert_eq!(end(l.al_offset, l.al.bytes()), l.bm_offset, "{l:?}");
            assert!(l.max_data_sectors * SECTOR <= p.data_bytes, "{l:?} {p:?}");
        }
    }
    // Every ring block and every bitmap page the layout hands out is inside its part.
    let blocks = l.al.blocks();
    for blk in [0, blocks / 2, blocks - 1] {
        let o = l.al_block_offset(blk).expect("inside the ring");
        assert!(o >= l.al_offset && end(o, BLOCK) <= end(l.al_offset, l.al.bytes()));
    }
    assert!(l.al_block_offset(blocks).is_none());
    let pages = l.bm_area_bytes / BLOCK;
    let last = l.bm_page_offset(pages - 1).expect("last page");
    assert!(end(last, BLOCK) <= end(l.bm_offset, l.bm_area_bytes));
    assert!(l.bm_page_offset(pages).is_none());
    // The agreed size fits the data area, and its bitmap fits the bitmap area.
    assert!(sb.effective_size <= l.max_data_sectors, "{sb:?} {l:?}");
    let used = bitmap_bytes(sb.effective_size).expect("≤ 1 PiB");
    assert!(used <= l.bm_area_bytes, "{used} {l:?}");
    assert_eq!(l.bitmap_bytes_for(sb.effective_size), Some(used));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::al::AlGeometry;

    use crate::sim::rng::Rng;

    fn input(selector: u8, a: u64, b: u64, sb: &Superblock) -> Vec<u8> {
        let mut v = vec![selector];
        v.extend_from_slice(&a.to_le_bytes());
        v.extend_from_slice(&b.to_le_bytes());
        v.extend_from_slice(&sb.encode());
        v
    }

    /// Valid superblocks with the exact sizes they were made for: internal on several
    /// device sizes and AL shapes, flex-external on several metadata devices.
    fn seeds() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for (bytes, s, z) in [
            (1u64 << 30, 1, 8),
            ((1 << 30) + 12345 * 512, 2, 16),
            (100 << 20, 1, 8),
            (1 << 40, 4, 8),
            (1 << 50, 1, 8192),
        ] {
            let al = AlGeometry::new(s, z).expect("geometry");
            let l = Layout::internal(bytes, al).expect("fits");
            let mut sb = Superblock::created(&l, 1, 1237);
            sb.effective_size = l.max_data_sectors;
            sb.peers[0].bitmap_index = 0;
            out.push(input(0, bytes, 0, &sb));
            // Selector 4: the size derived from md_size_sect (here: a few sectors more).
            let extra = bytes - u64::from(l.md_size_sect) * SECTOR;
            out.push(input(4, extra, 0, &sb));
        }
        for (meta, data) in [
            (128u64 << 20, 1u64 << 40),
            (4 << 20, 1 << 30),
            (1 << 20, 1 << 50),
        ] {
            let l = Layout::flex_external(meta, data, AlGeometry::default_ring()).expect("fits");
            let mut sb = Superblock::created(&l, -1, 1237);
            sb.effective_size = l.max_data_sectors;
            out.push(input(1, meta, data, &sb));
            out.push(input(5, 0, data, &sb));
        }
        out
    }

    #[test]
    fn seeds_are_accepted_and_edge_cases_do_not_panic() {
        for (i, s) in seeds().iter().enumerate() {
            assert!(run(s), "seed {i} refused");
        }
        assert!(!run(&[]));
        assert!(!run(&[0xff; 17]));
        assert!(!run(&[0xff; 5000]));
        assert!(!run(&[0; 5000]));
        // Every byte value in every header byte with a valid superblock behind it.
        let base = seeds().remove(0);
        for pos in 0..HEADER {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut x = base.clone();
                x[pos] = v;
                run(&x);
            }
        }
    }

    #[test]
    fn random_and_mutated_inputs_never_panic() {
        let mut rng = Rng::new(0x5b10_c0de_0000_0001);
        let seeds = seeds();
        let mut accepted = 0;
        for i in 0..20_000 {
            let input = if i % 4 == 0 {
                let len = rng.index(HEADER + SUPERBLOCK_BYTES + 64);
                (0..len)
                    .map(|_| rng.next_u64().to_le_bytes()[0])
                    .collect::<Vec<u8>>()
            } else {
                let mut v = seeds[i % seeds.len()].clone();
                for _ in 0..1 + rng.index(4) {
                    // Mostly in the header and the first 112 bytes, where the fields are.
                    let pos = match rng.index(3) {
                        0 => rng.index(HEADER),
                        1 => HEADER + rng.index(112),
                        _ => rng.index(v.len()),
                    };
                    if pos >= v.len() {
                        break; // truncated by an earlier mutation
                    }
                    let r = rng.next_u64().to_le_bytes();
                    match rng.index(4) {
                        0 => v[pos] = r[0],
                        1 => v[pos] ^= 1 << (r[1] % 8),
                        2 => v[pos] = if r[2] & 1 == 0 { 0 } else { 0xff },
                        _ => v.truncate(pos),
                    }
                }
                v
            };
            if run(&input) {
                accepted += 1;
            }
        }
        // Mutations that miss the checked fields keep the seed valid: the layout
        // invariants were exercised, not just the refusals.
        assert!(accepted > 1000, "{accepted} accepted");
    }
}
