//! Encode/decode of the two packets on the replication hot path: the `P_DATA` header that
//! precedes every replicated write, and the `P_BARRIER_ACK` that closes every epoch.
#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use tandem_engine::wire::{
    decode_frame, encode, encode_data_header, BarrierAck, Command, DataHeader, Packet, WireCtx,
};

fn ctx() -> WireCtx {
    // DRBD 8.4.11 agrees on protocol 101; no data digest.
    WireCtx::new(101, 0).unwrap()
}

fn data_header(c: &mut Criterion) {
    let ctx = ctx();
    let head = DataHeader {
        sector: 123_456,
        block_id: 0xdead_beef,
        seq_num: 7,
        dp_flags: 0,
    };
    let mut out = Vec::with_capacity(64);
    c.bench_function("wire/encode P_DATA header (4 KiB write)", |b| {
        b.iter(|| {
            out.clear();
            encode_data_header(
                Command::P_DATA,
                black_box(&head),
                &[],
                4096,
                &ctx,
                0,
                &mut out,
            )
            .unwrap();
            black_box(out.len())
        });
    });
    let mut frame = Vec::new();
    encode_data_header(Command::P_DATA, &head, &[], 4096, &ctx, 0, &mut frame).unwrap();
    frame.resize(frame.len() + 4096, 0xa5);
    c.bench_function("wire/decode P_DATA frame (4 KiB write)", |b| {
        b.iter(|| {
            let f = decode_frame(black_box(&frame), &ctx).unwrap().unwrap();
            black_box(f.len)
        });
    });
}

fn barrier_ack(c: &mut Criterion) {
    let ctx = ctx();
    let pkt = Packet::BarrierAck(BarrierAck {
        barrier: 42,
        set_size: 17,
    });
    let mut out = Vec::with_capacity(64);
    c.bench_function("wire/encode P_BARRIER_ACK", |b| {
        b.iter(|| {
            out.clear();
            encode(black_box(&pkt), &ctx, 0, &mut out).unwrap();
            black_box(out.len())
        });
    });
    let mut frame = Vec::new();
    encode(&pkt, &ctx, 0, &mut frame).unwrap();
    c.bench_function("wire/decode P_BARRIER_ACK", |b| {
        b.iter(|| {
            let f = decode_frame(black_box(&frame), &ctx).unwrap().unwrap();
            black_box(f.len)
        });
    });
}

criterion_group!(benches, data_header, barrier_ack);
criterion_main!(benches);
