//! Fuzz body for the NBD codec: option haggling and the request stream, pure, no sockets.
//!
//! `run` feeds the same bytes to (1) a [`Handshake`] in the chunk sizes it asks for, as
//! the server does, and (2) the transmission-phase decoder: 28-byte headers through
//! [`parse_request`] and [`classify`], skipping WRITE payloads like the server. Byte 0
//! picks the export's properties (size, writable, discard, 512/4096 logical blocks,
//! 1/32 MiB READ/WRITE limit, cache and FUA). Beyond "no panic", it asserts the
//! invariants the server relies on: every action it would submit is aligned to the
//! advertised minimum block size, non-empty, inside the export, within the advertised
//! maximum for READ/WRITE, a write only on a writable export, and only advertised
//! commands and flags.

use crate::frontend::nbd::proto::{
    block_sizes, classify, parse_request, Action, Export, Handshake, Step, CMD_FLAG_FUA, MAX_BLOCK,
    MAX_OPTIONS, MAX_OPTION_DATA, REQUEST_LEN,
};
use crate::frontend::TargetInfo;

/// Runs the NBD decoders on arbitrary bytes; panics only on a broken invariant.
pub fn run(data: &[u8]) {
    let (selector, rest) = data.split_first().map_or((0, data), |(s, r)| (*s, r));
    let discard = if selector & 0b1000 != 0 { 128 << 20 } else { 0 };
    let cache = selector & 0b100_0000 == 0;
    let info = TargetInfo {
        // 0 (an empty export), 512 and odd-ish sizes, 1 MiB, and u64::MAX rounded down.
        size_bytes: match selector & 0b11 {
            0 => 0,
            1 => 512 * 3,
            2 => 1 << 20,
            _ => u64::MAX - 511,
        },
        writable: selector & 0b100 != 0,
        logical_block_size: if selector & 0b1_0000 != 0 { 4096 } else { 512 },
        physical_block_size: 4096,
        max_io_bytes: if selector & 0b10_0000 != 0 {
            1 << 20
        } else {
            32 << 20
        },
        discard_granularity: 4096,
        max_discard_bytes: discard,
        max_write_zeroes_bytes: discard,
        volatile_cache: cache,
        fua: cache,
    };
    handshake(rest, info);
    requests(rest, &info);
}

fn handshake(mut input: &[u8], info: TargetInfo) {
    let mut hs = Handshake::new(Export {
        name: "vol".into(),
        description: "fuzz".into(),
        info,
    });
    let mut out = Vec::new();
    let mut fed = 0u32;
    loop {
        let want = hs.wants();
        assert!(want <= MAX_OPTION_DATA as usize, "asks for {want} bytes");
        let Some((chunk, tail)) = input.split_at_checked(want) else {
            return;
        };
        input = tail;
        fed += 1;
        // Flags, then at most header + data per option.
        assert!(
            fed <= 1 + 2 * MAX_OPTIONS + 1,
            "more feeds than options allow"
        );
        out.clear();
        match hs.feed(chunk, &mut out) {
            Ok(Step::Continue) => assert_ne!(hs.wants(), 0),
            Ok(Step::Transmit | Step::Abort) | Err(_) => {
                assert_eq!(hs.wants(), 0, "a finished handshake wants nothing");
                return;
            }
        }
        // Outputs are small: bounded replies, never an echo of unbounded input.
        assert!(out.len() <= 4 * 4096 + 256, "{} bytes of output", out.len());
    }
}

fn requests(mut input: &[u8], info: &TargetInfo) {
    while let Some((header, tail)) = input.split_first_chunk::<REQUEST_LEN>() {
        input = tail;
        let Ok(req) = parse_request(header) else {
            return; // the server drops the connection
        };
        let action = classify(&req, info);
        let (_, _, max) = block_sizes(info);
        if !info.fua && !matches!(action, Action::Refuse { .. } | Action::Close { .. }) {
            assert!(
                req.flags & CMD_FLAG_FUA == 0,
                "FUA not advertised: {action:?}"
            );
        }
        let payload = match action {
            Action::Read { offset, len } => {
                check_range(offset, u64::from(len), info);
                assert!(len <= max && max <= MAX_BLOCK);
                0
            }
            Action::Write { offset, len, .. } => {
                assert!(info.writable);
                assert!(len <= max && max <= MAX_BLOCK);
                check_range(offset, u64::from(len), info);
                len
            }
            Action::Trim { offset, len, .. } => {
                assert!(info.writable && info.max_discard_bytes > 0);
                check_range(offset, u64::from(len), info);
                0
            }
            Action::WriteZeroes { offset, len, .. } => {
                assert!(info.writable && info.max_write_zeroes_bytes > 0);
                check_range(offset, u64::from(len), info);
                0
            }
            Action::Refuse { errno, skip, .. } => {
                assert_ne!(errno, 0);
                assert!(skip == 0 || skip == req.len);
                assert!(skip <= MAX_BLOCK);
                skip
            }
            Action::Flush => {
                assert!(info.volatile_cache);
                0
            }
            Action::Disconnect | Action::Close { .. } => return,
        };
        let Some(rest) = input.get(payload as usize..) else {
            return; // truncated payload: the server drops the connection
        };
        input = rest;
    }
}

fn check_range(offset: u64, len: u64, info: &TargetInfo) {
    let min = u64::from(block_sizes(info).0);
    assert!(min >= u64::from(info.logical_block_size) && min >= 512);
    assert!(len > 0 && offset.is_multiple_of(min) && len.is_multiple_of(min));
    let end = offset.checked_add(len).expect("range overflows");
    assert!(
        end <= info.size_bytes,
        "{offset}+{len} past {}",
        info.size_bytes
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::nbd::proto::{
        CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES,
        IHAVEOPT, INFO_BLOCK_SIZE, INFO_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_STRUCTURED_REPLY,
        REQUEST_MAGIC,
    };
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn option(v: &mut Vec<u8>, code: u32, data: &[u8]) {
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&u32::try_from(data.len()).expect("small").to_be_bytes());
        v.extend_from_slice(data);
    }

    fn request(v: &mut Vec<u8>, flags: u16, kind: u16, offset: u64, len: u32) {
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&7u64.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        if kind == CMD_WRITE {
            v.extend(std::iter::repeat_n(0xab, len as usize));
        }
    }

    /// Valid inputs to mutate: a full handshake, and a request stream.
    fn seeds() -> Vec<Vec<u8>> {
        let mut hs = vec![0x0f, 0, 0, 0, 3];
        option(&mut hs, OPT_STRUCTURED_REPLY, &[]);
        option(&mut hs, OPT_LIST, &[]);
        let go = [
            &[0, 0, 0, 3][..],
            b"vol",
            &[0, 2],
            &INFO_NAME.to_be_bytes(),
            &INFO_BLOCK_SIZE.to_be_bytes(),
        ]
        .concat();
        option(&mut hs, OPT_INFO, &go);
        option(&mut hs, OPT_GO, &go);
        let mut reqs = vec![0x0e];
        request(&mut reqs, 0, CMD_WRITE, 4096, 4096);
        request(&mut reqs, CMD_FLAG_FUA, CMD_WRITE, 0, 512);
        request(&mut reqs, 0, CMD_READ, 0, 8192);
        request(&mut reqs, 0, CMD_TRIM, 0, 1 << 16);
        request(&mut reqs, CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 512, 1024);
        request(&mut reqs, 0, CMD_FLUSH, 0, 0);
        request(&mut reqs, 0, CMD_WRITE, 3, 100);
        // The same stream against 4096-byte logical blocks, and against an export with a
        // 1 MiB limit and neither a cache (no FLUSH) nor FUA.
        let mut reqs_4k = reqs.clone();
        reqs_4k[0] = 0x1e;
        let mut reqs_no_cache = reqs.clone();
        reqs_no_cache[0] = 0x6e;
        vec![hs, reqs, reqs_4k, reqs_no_cache]
    }

    #[test]
    fn seeds_and_edge_cases() {
        for s in seeds() {
            run(&s);
        }
        run(&[]);
        run(&[0xff]);
        run(&[0xff; 100]);
        run(&[0; 100]);
    }

    #[test]
    fn random_and_mutated_inputs() {
        let mut rng = StdRng::seed_from_u64(0x6e62_6421);
        let seeds = seeds();
        for i in 0..20_000 {
            let input = if i % 2 == 0 {
                let len = rng.gen_range(0..600);
                (0..len).map(|_| rng.gen()).collect::<Vec<u8>>()
            } else {
                let mut v = seeds[(i / 2) % seeds.len()].clone();
                for _ in 0..rng.gen_range(1..8) {
                    let pos = rng.gen_range(0..v.len().max(1));
                    match rng.gen_range(0..5) {
                        0 if !v.is_empty() => v[pos] ^= 1 << rng.gen_range(0..8),
                        1 if !v.is_empty() => v[pos] = rng.gen(),
                        2 => v.truncate(pos),
                        3 => v.insert(pos.min(v.len()), rng.gen()),
                        _ if v.len() > 4 => {
                            // Overwrite a 4-byte field with a boundary value.
                            let at = pos.min(v.len() - 4);
                            let val: u32 = [0, 1, 511, 512, u32::MAX, MAX_BLOCK, MAX_BLOCK + 1]
                                [rng.gen_range(0..7)];
                            v[at..at + 4].copy_from_slice(&val.to_be_bytes());
                        }
                        _ => {}
                    }
                }
                v
            };
            run(&input);
        }
    }
}
