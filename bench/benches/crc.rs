//! crc32c over one 4 KiB block: the cost of a data-integrity digest or a resync checksum
//! per replicated block.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

fn crc_4k(c: &mut Criterion) {
    let block: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(31) >> 3).to_le_bytes()[0])
        .collect();
    let mut g = c.benchmark_group("crc32c");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("4 KiB", |b| b.iter(|| crc32c::crc32c(black_box(&block))));
    g.finish();
}

criterion_group!(benches, crc_4k);
criterion_main!(benches);
