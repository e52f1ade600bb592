//! Fuzz body for the activity log's on-disk format: any bytes as a ring of transaction
//! blocks, replayed as `apply-al` replays them (docs/drbd-reference.md §5).
//!
//! Input: byte 0 picks the ring's shape (1..=4 stripes of 2..=17 blocks, at least 8
//! blocks), the rest is the ring (cut or zero-padded to its size). Beyond "no panic",
//! [`run`] asserts what `apply-al` relies on: every block decodes (valid or not) without
//! reading outside it; a replay that succeeds returns hot extents sorted and distinct,
//! never `LC_FREE`, at most 65534 of them, each named by some valid update transaction of
//! the ring; and setting their bits in a bitmap stays inside it.

use crate::meta::al::{
    apply_hot_extents, decode_block, replay, AlGeometry, AL_BLOCK, AL_EXTENTS_MAX,
    AL_TR_INITIALIZED, LC_FREE,
};

/// The ring shape byte 0 selects.
pub fn geometry(selector: u8) -> AlGeometry {
    let stripes = u32::from(selector % 4) + 1;
    let size = (u32::from(selector / 4) % 16 + 2).max(8u32.div_ceil(stripes));
    AlGeometry::new(stripes, size).unwrap_or_else(|_| AlGeometry::default_ring())
}

/// Replays arbitrary bytes as a ring; returns whether the replay succeeded.
pub fn run(data: &[u8]) -> bool {
    let Some((&selector, rest)) = data.split_first() else {
        return false;
    };
    let geo = geometry(selector);
    let len = usize::try_from(geo.bytes()).unwrap_or(0);
    let mut ring = rest.get(..len.min(rest.len())).unwrap_or(&[]).to_vec();
    ring.resize(len, 0);
    let mut named = Vec::new();
    for chunk in ring.chunks_exact(AL_BLOCK) {
        let Ok(block) = <&[u8; AL_BLOCK]>::try_from(chunk) else {
            continue;
        };
        let d = decode_block(block);
        assert!(d.tr.updates.len() <= 64 && d.tr.context.len() <= 919);
        if d.valid && d.kind != AL_TR_INITIALIZED {
            named.extend(d.tr.updates.iter().map(|u| u.1));
            named.extend(d.tr.context.iter().copied());
        }
    }
    let Ok(r) = replay(&ring, &geo) else {
        return false;
    };
    assert!(
        r.hot.windows(2).all(|w| w[0] < w[1]),
        "hot extents sorted and distinct"
    );
    assert!(r.hot.len() <= AL_EXTENTS_MAX as usize);
    assert!(!r.hot.contains(&LC_FREE));
    named.sort_unstable();
    assert!(
        r.hot.iter().all(|e| named.binary_search(e).is_ok()),
        "a hot extent no transaction names"
    );
    assert_eq!(r.valid + r.corrupt, geo.blocks());
    let mut bitmap = vec![0u8; 4096];
    let added = apply_hot_extents(&mut bitmap, &r.hot);
    assert!(added <= 4096 * 8);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::al::{initialized_ring, ActivityLog, Begin};
    use crate::sim::rng::Rng;

    /// Rings written by the runtime activity log over random writes, one per shape.
    fn seeds() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for selector in [0u8, 1, 6, 15, 63] {
            let geo = geometry(selector);
            let mut ring = initialized_ring(&geo);
            let mut al = ActivityLog::new(geo, 67, 7).expect("log");
            let mut rng = Rng::new(u64::from(selector));
            for _ in 0..400 {
                let e = u32::try_from(rng.below(300)).expect("small");
                if al.begin(e, e) != Begin::NoRoom {
                    if let Some(p) = al.prepare() {
                        let o = p.ring_block as usize * AL_BLOCK;
                        ring[o..o + AL_BLOCK].copy_from_slice(&p.block[..]);
                        al.committed();
                    }
                    al.put(e, e);
                }
            }
            let mut v = vec![selector];
            v.extend_from_slice(&ring);
            out.push(v);
        }
        out
    }

    #[test]
    fn seeds_replay_and_edge_cases_do_not_panic() {
        for (i, s) in seeds().iter().enumerate() {
            assert!(run(s), "seed {i} did not replay");
        }
        assert!(!run(&[]));
        assert!(!run(&[0]));
        assert!(!run(&[0xff; 100]));
    }

    #[test]
    fn random_and_mutated_rings_never_panic() {
        let seeds = seeds();
        let mut rng = Rng::new(0xa1_0000_0001);
        let mut replayed = 0;
        for i in 0..3000 {
            let mut v = seeds[i % seeds.len()].clone();
            if i % 5 == 0 {
                let n = rng.index(70_000);
                v = (0..n).map(|_| rng.byte()).collect();
            } else {
                for _ in 0..1 + rng.below(6) {
                    let pos = rng.index(v.len());
                    let r = rng.next_u64().to_le_bytes();
                    match rng.below(4) {
                        0 => v[pos] = r[0],
                        1 => v[pos] ^= 1 << (r[1] % 8),
                        2 => v.truncate(pos),
                        _ => {
                            // Re-seal a block after changing it, so the change is not
                            // just a bad crc: the decoder then trusts the fields.
                            let b = pos.saturating_sub(1) / AL_BLOCK * AL_BLOCK + 1;
                            if let Some(blk) = v.get_mut(b..b + AL_BLOCK) {
                                blk[pos.saturating_sub(b).min(AL_BLOCK - 1)] = r[2];
                                blk[8..12].fill(0);
                                let arr: [u8; AL_BLOCK] = blk.try_into().expect("4 KiB");
                                let crc = crate::meta::al::al_crc(&arr);
                                blk[8..12].copy_from_slice(&crc.to_be_bytes());
                            }
                        }
                    }
                    if v.is_empty() {
                        break;
                    }
                }
            }
            if run(&v) {
                replayed += 1;
            }
        }
        assert!(
            replayed > 500,
            "mutations too destructive: {replayed} replays"
        );
    }
}
