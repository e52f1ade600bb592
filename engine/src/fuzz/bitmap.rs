//! Fuzz body of the bitmap exchange codec ([`crate::wire::bitmap_xfer`]).
//!
//! Input: `[sel, n0, n1, rest…]`. `sel & 3` picks the agreed version (101, 100, 95, 89:
//! h100 or h80 headers, so 4080- or 4088-byte payloads; 89 also turns the sender's RLE
//! off), `sel & 4` the mode:
//!
//! - **receive** (`sel & 4 == 0`): a bitmap of `n0 | n1 << 8` bits (× 5 if `sel & 0x10`,
//!   up to 327 675 bits), clear, or filled with a pattern if `sel & 8`; `rest` is a
//!   sequence of packets `[kind, len_lo, len_hi, payload…]` (`kind` 0xff: a non-bitmap
//!   command; odd: `P_COMPRESSED_BITMAP`; even: `P_BITMAP`; a short tail is cut to what
//!   is there) fed to one [`BitmapReceiver`]. After every packet: bits only ever get set,
//!   none past `bm_bits`, `newly_set` counts exactly the new ones, the offset stays in
//!   the bitmap, a failed or complete transfer accepts nothing more, and no more than
//!   `bm_bits + 1` packets are accepted. A transfer that completes from a clear bitmap must
//!   survive a round trip through [`BitmapSender`].
//! - **round trip** (`sel & 4 != 0`): `rest` is a bitmap, as raw bits (`bm_bits` = 8 ×
//!   len − `n0 % 8`) or, if `sel & 8`, as run lengths (`1 + byte × (1 + n0)`, alternating,
//!   the first set if `sel & 0x20`, up to 1 Mi bits). It goes through a sender (RLE unless
//!   `sel & 0x40`) and a receiver and must come back identical, in packets within the
//!   module's bounds.
//!
//! A panic, an out-of-bounds write or an oracle mismatch is a bug.

use crate::wire::bitmap_xfer::{bm_words, max_payload, BitmapError};
use crate::wire::{BitmapReceiver, BitmapSender, Command, WireCtx};

const VERSIONS: [u32; 4] = [101, 100, 95, 89];
/// Largest bitmap the run-length mode builds (1 Mi bits, 128 KiB: 32 full plain packets).
const MAX_RUN_BITS: u64 = 1 << 20;

fn ctx_for(sel: u8) -> WireCtx {
    let v = VERSIONS[usize::from(sel & 3)];
    WireCtx::new(v, 0).unwrap_or(WireCtx::pre_features())
}

fn words_for(bits: u64) -> Vec<u64> {
    vec![0; usize::try_from(bm_words(bits)).unwrap_or(0)]
}

fn ones(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Clears the bits past `bits` in the last word.
fn clear_surplus(bitmap: &mut [u64], bits: u64) {
    if !bits.is_multiple_of(64) {
        if let Some(last) = bitmap.last_mut() {
            *last &= (1u64 << (bits % 64)) - 1;
        }
    }
}

/// Runs the codec over `data`; panics only on a codec bug.
pub fn run(data: &[u8]) {
    run_counted(data);
}

/// [`run`], returning how many packets were accepted (receive mode) or exchanged (round
/// trip), so tests can check inputs get far.
pub(crate) fn run_counted(data: &[u8]) -> usize {
    outcome(data).0
}

/// Packets accepted or exchanged, and whether the transfer completed.
fn outcome(data: &[u8]) -> (usize, bool) {
    let [sel, n0, n1, rest @ ..] = data else {
        return (0, false);
    };
    let ctx = ctx_for(*sel);
    if sel & 4 == 0 {
        let mut bits = u64::from(*n0) | u64::from(*n1) << 8;
        if sel & 0x10 != 0 {
            bits *= 5;
        }
        receive(&ctx, bits, sel & 8 != 0, rest)
    } else {
        let (bitmap, bits) = if sel & 8 != 0 {
            from_runs(rest, u64::from(*n0) + 1, sel & 0x20 != 0)
        } else {
            from_raw(rest, u64::from(n0 % 8))
        };
        let n = round_trip(&ctx, &bitmap, bits, sel & 0x40 == 0);
        (n, n > 0)
    }
}

/// Receive mode: see the module docs.
fn receive(ctx: &WireCtx, bits: u64, pattern: bool, mut rest: &[u8]) -> (usize, bool) {
    let mut bitmap = words_for(bits);
    if pattern {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ bits;
        for w in &mut bitmap {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *w = x & x.rotate_left(29);
        }
        clear_surplus(&mut bitmap, bits);
    }
    let initial = bitmap.clone();
    let initial_ones = ones(&initial);
    let Ok(mut r) = BitmapReceiver::new(bits, ctx) else {
        return (0, false);
    };
    let mut accepted = 0usize;
    let mut ended = None;
    while let [kind, l0, l1, tail @ ..] = rest {
        let len = usize::from(*l0) | usize::from(*l1) << 8;
        let (payload, next) = tail.split_at(len.min(tail.len()));
        rest = next;
        let cmd = match kind {
            0xff => Command::P_DATA,
            k if k & 1 == 1 => Command::P_COMPRESSED_BITMAP,
            _ => Command::P_BITMAP,
        };
        let before = bitmap.clone();
        let result = r.receive(&mut bitmap, cmd, payload);
        // Bits only get set; none past the end; the count is exact.
        for (old, new) in before.iter().zip(&bitmap) {
            assert_eq!(old & !new, 0, "a bit was cleared");
        }
        let mut masked = bitmap.clone();
        clear_surplus(&mut masked, bits);
        assert_eq!(masked, bitmap, "a bit past bm_bits was set");
        assert_eq!(ones(&bitmap) - initial_ones, r.newly_set(), "newly_set");
        assert!(r.bit_offset() <= bits, "offset past the end");
        match (ended, result) {
            (Some(e), res) => {
                let want = match e {
                    Ok(()) => BitmapError::AfterDone,
                    Err(()) => BitmapError::Failed,
                };
                assert_eq!(res, Err(want), "a packet after the end was not refused");
                assert_eq!(before, bitmap, "merged after the end");
            }
            (None, Ok(done)) => {
                accepted += 1;
                assert!(accepted as u64 <= bits + 1, "more packets than bits");
                assert_eq!(done, r.is_done());
                if done {
                    ended = Some(Ok(()));
                }
            }
            (None, Err(_)) => ended = Some(Err(())),
        }
    }
    if r.is_done() && !pattern {
        // What arrived must survive our own sender and a fresh receiver.
        assert!(round_trip(ctx, &bitmap, bits, true) > 0);
    }
    (accepted, r.is_done())
}

/// A bitmap from raw bytes: `8 × len − cut` bits.
fn from_raw(bytes: &[u8], cut: u64) -> (Vec<u64>, u64) {
    let bits = (bytes.len() as u64 * 8).saturating_sub(cut);
    let mut bitmap = words_for(bits);
    for (i, chunk) in bytes.chunks(8).enumerate() {
        let mut le = [0u8; 8];
        le.get_mut(..chunk.len())
            .unwrap_or_default()
            .copy_from_slice(chunk);
        if let Some(w) = bitmap.get_mut(i) {
            *w = u64::from_le_bytes(le);
        }
    }
    // Leave the surplus bits set: the sender must not send them.
    (bitmap, bits)
}

/// A bitmap from run lengths `1 + byte × mult`, alternating, capped at [`MAX_RUN_BITS`].
fn from_runs(bytes: &[u8], mult: u64, first_set: bool) -> (Vec<u64>, u64) {
    let runs: Vec<u64> = bytes.iter().map(|&b| 1 + u64::from(b) * mult).collect();
    let bits = runs.iter().sum::<u64>().min(MAX_RUN_BITS);
    let mut bitmap = words_for(bits);
    let mut at = 0u64;
    let mut set = first_set;
    for rl in runs {
        if set {
            let end = (at + rl).min(bits);
            let mut b = at;
            while b < end {
                let w = usize::try_from(b / 64).unwrap_or(usize::MAX);
                let hi = (end - b / 64 * 64).min(64);
                let lo = b % 64;
                if let Some(x) = bitmap.get_mut(w) {
                    *x |= (u64::MAX >> (64 - (hi - lo))) << lo;
                }
                b = b / 64 * 64 + hi;
            }
        }
        at += rl;
        if at >= bits {
            break;
        }
        set = !set;
    }
    (bitmap, bits)
}

/// Round trip: sender → receiver must give back `bitmap` (minus surplus bits), within the
/// packet bounds. Returns the number of packets.
fn round_trip(ctx: &WireCtx, bitmap: &[u64], bits: u64, use_rle: bool) -> usize {
    let Ok(mut s) = BitmapSender::new(bitmap, bits, ctx, use_rle) else {
        return 0;
    };
    let Ok(mut r) = BitmapReceiver::new(bits, ctx) else {
        return 0;
    };
    let mut got = words_for(bits);
    let payload = max_payload(ctx);
    let (mut plain, mut rle, mut n) = (0u64, 0u64, 0usize);
    let mut buf = Vec::new();
    let mut last = None;
    while let Some(cmd) = s.next_payload(&mut buf) {
        assert!(buf.len() <= payload, "payload of {} bytes", buf.len());
        if let Some((Command::P_BITMAP, 0)) = last {
            panic!("a packet after the empty P_BITMAP");
        }
        match cmd {
            Command::P_BITMAP => plain += 1,
            _ => rle += 1,
        }
        n += 1;
        let done = r
            .receive(&mut got, cmd, &buf)
            .unwrap_or_else(|e| panic!("our own packet {n} refused: {e}"));
        assert_eq!(done, s.is_done(), "sender and receiver disagree on the end");
        last = Some((cmd, buf.len()));
    }
    assert!(r.is_done(), "transfer incomplete");
    let mut want = bitmap.to_vec();
    clear_surplus(&mut want, bits);
    assert_eq!(got, want, "round trip changed the bitmap");
    let per_plain = 8 * payload as u64;
    assert!(
        plain <= bits.div_ceil(per_plain) + 1,
        "{plain} plain packets"
    );
    assert!(
        rle <= bits.div_ceil(per_plain - 72) + 1,
        "{rle} compressed packets"
    );
    if !use_rle || ctx.version() < 90 {
        assert_eq!(rle, 0);
    }
    assert_eq!(s.stats(), r.stats());
    n
}

/// Valid inputs: whole transfers of several bitmaps in receive mode (including the
/// kernel's two compressed packets from the captures), and round-trip inputs.
pub fn corpus() -> Vec<Vec<u8>> {
    let mut inputs = Vec::new();
    // The kernel's: all 1014 bits set; 8 scattered bits (engine/tests/bitmap_xfer.rs).
    let kernel: [&[u8]; 2] = [
        &[0xb2, 0x3f, 0xc5, 0x02],
        &[
            0x12, 0xe1, 0x98, 0x37, 0xf8, 0xdc, 0xfc, 0xe9, 0x02, 0xfc, 0xb0, 0x01,
        ],
    ];
    for k in kernel {
        let mut v = vec![0u8, 0xf6, 0x03, 1];
        v.extend_from_slice(&u16::try_from(k.len()).unwrap_or(0).to_le_bytes());
        v.extend_from_slice(k);
        inputs.push(v);
    }
    // Our sender's transfers of run-shaped and noisy bitmaps, as receive-mode inputs.
    for (sel, seed) in (0u8..32).zip(1u64..) {
        let bits = 1 + (seed * 7919) % 60_000;
        let mut bitmap = words_for(bits);
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut b = 0;
        while b < bits {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 1 + x % if seed % 3 == 0 { 4 } else { 5000 };
            if x & 1 == 1 {
                for i in b..(b + len).min(bits) {
                    if let Some(w) = bitmap.get_mut(usize::try_from(i / 64).unwrap_or(0)) {
                        *w |= 1 << (i % 64);
                    }
                }
            }
            b += len;
        }
        let sel = sel & 0x03;
        let ctx = ctx_for(sel);
        let Ok(mut s) = BitmapSender::new(&bitmap, bits, &ctx, true) else {
            continue;
        };
        let bits16 = u16::try_from(bits).unwrap_or(0).to_le_bytes();
        let mut v = vec![sel, bits16[0], bits16[1]];
        let mut buf = Vec::new();
        while let Some(cmd) = s.next_payload(&mut buf) {
            v.push(if cmd == Command::P_COMPRESSED_BITMAP {
                1
            } else {
                0
            });
            v.extend_from_slice(&u16::try_from(buf.len()).unwrap_or(0).to_le_bytes());
            v.extend_from_slice(&buf);
        }
        inputs.push(v);
        // And round-trip inputs: raw bits and run lengths.
        let raw: Vec<u8> = bitmap
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .take(600)
            .collect();
        inputs.push([&[sel | 4, bits16[0], 0][..], &raw].concat());
        let runs: Vec<u8> = raw.iter().map(|b| b % 17).collect();
        inputs.push([&[sel | 0x2c, bits16[0], 0][..], &runs].concat());
    }
    inputs
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn corpus_transfers_complete() {
        let corpus = corpus();
        assert!(corpus.len() > 90, "{}", corpus.len());
        for input in &corpus {
            let (n, done) = outcome(input);
            assert!(n >= 1 && done, "{:02x?}", &input[..8.min(input.len())]);
        }
    }

    #[test]
    fn random_and_mutated_inputs_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x626d_6670);
        let corpus = corpus();
        let mut accepted = 0;
        for i in 0..6000 {
            let input = if i % 3 == 0 {
                let len = rng.gen_range(0..600);
                (0..len).map(|_| rng.gen()).collect::<Vec<u8>>()
            } else {
                let mut v = corpus[rng.gen_range(0..corpus.len())].clone();
                match rng.gen_range(0..4) {
                    0 => {
                        for _ in 0..rng.gen_range(1..5) {
                            let at = rng.gen_range(0..v.len());
                            v[at] ^= rng.gen::<u8>() | 1;
                        }
                    }
                    1 => v.truncate(rng.gen_range(0..v.len())),
                    2 => {
                        let other = &corpus[rng.gen_range(0..corpus.len())];
                        v.extend_from_slice(&other[3..]);
                    }
                    _ => {
                        // Rewrite the bitmap size or the selector.
                        let at = rng.gen_range(0..3);
                        v[at] = rng.gen();
                    }
                }
                v
            };
            accepted += run_counted(&input);
        }
        assert!(accepted > 2000, "{accepted}");
    }
}
