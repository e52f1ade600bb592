//! The out-of-sync bitmap of a 1 TiB volume (2^28 bits = 32 MiB): marking a 4 KiB write,
//! testing a block, the running count, and finding the next set block (resync's walk).
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use tandem_engine::request::OutOfSync;

/// 1 TiB in 512-byte sectors.
const SECTORS_1TIB: u64 = (1 << 40) / 512;

/// A cheap deterministic walk over the volume (no rand in the measured loop).
fn lcg(x: &mut u64) -> u64 {
    *x = x
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    *x >> 16
}

fn bitmap(c: &mut Criterion) {
    let mut bm = OutOfSync::new(SECTORS_1TIB);
    let blocks = bm.blocks();
    let mut x = 1u64;
    c.bench_function("bitmap 1TiB/mark 4 KiB", |b| {
        b.iter(|| {
            let block = lcg(&mut x) % blocks;
            bm.mark(black_box(block * 8), 4096);
        });
    });
    c.bench_function("bitmap 1TiB/is_set", |b| {
        b.iter(|| {
            let block = lcg(&mut x) % blocks;
            black_box(bm.is_set(black_box(block)))
        });
    });
    c.bench_function("bitmap 1TiB/count", |b| b.iter(|| black_box(bm.count())));
    // Sparse bitmap: one set block per 1 MiB of 4 KiB blocks → find-next skips ~256 words.
    let mut sparse = OutOfSync::new(SECTORS_1TIB);
    let mut blk = 0;
    while blk < blocks {
        sparse.mark(blk * 8, 4096);
        blk += 64 * 256;
    }
    c.bench_function("bitmap 1TiB/next_set (1 in 16384 set)", |b| {
        b.iter(|| {
            let from = lcg(&mut x) % blocks;
            black_box(sparse.next_set(black_box(from)))
        });
    });
    c.bench_function("bitmap 1TiB/allocate", |b| {
        b.iter_batched(
            || (),
            |()| black_box(OutOfSync::new(SECTORS_1TIB).blocks()),
            BatchSize::PerIteration,
        );
    });
}

criterion_group!(benches, bitmap);
criterion_main!(benches);
