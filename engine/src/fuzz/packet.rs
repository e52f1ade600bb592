//! Fuzz body of the DRBD packet codec ([`crate::wire`]).
//!
//! Input: `[sel0, sel1, bytes…]`. `sel0` picks the agreed version (pre-features 80, 86,
//! 87, 88, 89, 94, 95, 99, 100, 101), `sel1` the agreed features, the data digest length
//! (0, 4, 20, 64) and a data length (0, 512, 4096, 1 MiB) for data packets. Then:
//! 1. `bytes` is decoded as a stream of packets until the first error or incomplete one;
//! 2. `bytes` is offered as the payload of every command;
//! 3. the first 4 bytes go through `StateBits` unpack/pack.
//!
//! Whenever a decode succeeds, the packet must re-encode, its payload bytes must equal
//! the input's, and its header must carry the same command, volume and length (the header
//! kind may differ only where DRBD's `prepare_header` picks h80 vs h95 by size and the
//! input used the other; then the re-encoded bytes must decode to the same packet).
//! A codec panic, or an oracle mismatch, is a bug.

use crate::wire::{
    decode, decode_frame, encode, ff, payload_layout, sub_header_len, AlgName, Barrier, BarrierAck,
    BlockAck, BlockDesc, BlockReq, Command, CompressedBitmap, ConnectionFeatures, DataHeader,
    DelayProbe, Frame, Header, HeaderKind, Packet, Protocol, QueueLimits, ReqState,
    ResyncController, Sizes, StateBits, SyncParam, Uuids, WireCtx,
};

const VERSIONS: [u32; 10] = [80, 86, 87, 88, 89, 94, 95, 99, 100, 101];
const DIGESTS: [usize; 4] = [0, 4, 20, 64];
const DATA_LENS: [u32; 4] = [0, 512, 4096, 1 << 20];

/// The context `sel0`/`sel1` select.
fn ctx_for(sel0: u8, sel1: u8) -> WireCtx {
    let version = VERSIONS[usize::from(sel0) % VERSIONS.len()];
    let base = if version < 86 {
        WireCtx::pre_features()
    } else {
        let features = match sel1 & 3 {
            0 => 0,
            1 => ff::PRO_FEATURES_84,
            2 => ff::DRBD_FF_TRIM | ff::DRBD_FF_WZEROES,
            _ => u32::MAX,
        };
        WireCtx::new(version, features).unwrap_or(WireCtx::pre_features())
    };
    let digest = DIGESTS[usize::from(sel1 >> 2) & 3];
    base.with_data_digest(digest).unwrap_or(base)
}

/// Runs the codec over `data`; panics only on a codec bug.
pub fn run(data: &[u8]) {
    run_counted(data);
}

/// [`run`], returning how many decodes succeeded (so tests can check the round-trip
/// oracle was exercised).
pub(crate) fn run_counted(data: &[u8]) -> usize {
    let [sel0, sel1, bytes @ ..] = data else {
        return 0;
    };
    let ctx = ctx_for(*sel0, *sel1);
    let data_len = DATA_LENS[usize::from(*sel1 >> 4) & 3];
    let mut ok = 0;

    // 1. A stream of packets.
    let mut rest = bytes;
    while let Ok(Some(f)) = decode_frame(rest, &ctx) {
        assert!(
            f.len > 0 && f.len <= rest.len(),
            "frame length out of range"
        );
        check_frame(rest, &f, &ctx);
        ok += 1;
        rest = rest.get(f.len..).unwrap_or(&[]);
    }
    let _ = Header::decode(bytes, &ctx);

    // 2. The bytes as the payload (head) of every command.
    for &cmd in Command::ALL {
        let _ = sub_header_len(cmd, &ctx);
        let Ok(len) = u32::try_from(bytes.len()) else {
            continue;
        };
        // A data command: its layout splits a payload of sub-header + 512 into 512 data.
        let is_data = sub_header_len(cmd, &ctx)
            .and_then(|f| u32::try_from(f + 512).ok())
            .is_some_and(|length| {
                let h = Header {
                    kind: HeaderKind::H100,
                    command: cmd,
                    volume: 0,
                    length,
                };
                payload_layout(&h, &ctx).is_ok_and(|l| l.data == 512)
            });
        let length = if is_data {
            len.saturating_add(data_len)
        } else {
            len
        };
        // The header the encoder would write (an h80 cannot say more than 65535).
        let Ok(hdr) = Header::for_payload(cmd, 0, length, &ctx) else {
            continue;
        };
        if let Ok(p) = decode(&hdr, bytes, &ctx) {
            let mut out = Vec::new();
            encode(&p, &ctx, 0, &mut out)
                .unwrap_or_else(|e| panic!("{cmd}: decoded packet does not re-encode: {e}"));
            assert_eq!(
                out.get(ctx.header_len()..),
                Some(bytes),
                "{cmd}: payload differs"
            );
            assert_eq!(p.command(), cmd);
            ok += 1;
        }
    }

    // 3. The state word.
    if let Some(w) = bytes.get(..4) {
        let mut a = [0u8; 4];
        a.copy_from_slice(w);
        let word = u32::from_be_bytes(a);
        assert_eq!(
            StateBits::unpack(word).pack(),
            Ok(word),
            "state word round trip"
        );
    }
    ok
}

/// The round-trip oracle for one decoded frame at the start of `buf`.
fn check_frame(buf: &[u8], f: &Frame<'_>, ctx: &WireCtx) {
    let cmd = f.header.command;
    let mut out = Vec::new();
    encode(&f.packet, ctx, f.header.volume, &mut out)
        .unwrap_or_else(|e| panic!("{cmd}: decoded packet does not re-encode: {e}"));
    let hs = f.header.size();
    assert_eq!(hs, ctx.header_len(), "{cmd}: header size");
    let payload_end = f.len - f.data.len();
    assert_eq!(
        out.get(hs..),
        buf.get(hs..payload_end),
        "{cmd}: re-encoded payload differs"
    );
    let re = Header::decode(&out, ctx).expect("re-encoded header decodes");
    assert_eq!(
        (re.command, re.volume, re.length),
        (cmd, f.header.volume, f.header.length),
        "{cmd}: re-encoded header fields"
    );
    if re.kind == f.header.kind {
        assert_eq!(out.get(..hs), buf.get(..hs), "{cmd}: header bytes");
    } else {
        // h80 vs h95 at 95..=99: both are valid there; DRBD picks by size.
        assert!(ctx.version() < 100, "{cmd}: header kind changed at ≥ 100");
    }
}

/// Valid packets for the context `sel0`/`sel1` select, each as a fuzz input
/// (`[sel0, sel1, encoded packet + data]`). The seed corpus and the base of the
/// mutation test.
pub fn corpus() -> Vec<Vec<u8>> {
    let mut inputs = Vec::new();
    for sel0 in 0..u8::try_from(VERSIONS.len()).unwrap_or(10) {
        for sel1 in [0x00u8, 0x01, 0x05, 0x13, 0x2a, 0x3f] {
            let ctx = ctx_for(sel0, sel1);
            for p in samples(&ctx) {
                let mut v = vec![sel0, sel1];
                if encode(&p, &ctx, 0, &mut v).is_ok() {
                    let data_len = usize::try_from(p.data_len()).unwrap_or(0);
                    v.resize(v.len() + data_len, 0x5a);
                    inputs.push(v);
                }
            }
        }
    }
    inputs
}

/// One packet of every kind that is valid at `ctx`.
fn samples(ctx: &WireCtx) -> Vec<Packet> {
    let head = DataHeader {
        sector: 2048,
        block_id: 0xc0f8_a9eb_dac9_47ff,
        seq_num: 7,
        dp_flags: 0x102,
    };
    let digest = vec![0xab; ctx.data_digest_len()];
    let v = ctx.version();
    let alg = |s: &str| AlgName::new(s).unwrap_or_default();
    let mut p = vec![
        Packet::Data {
            cmd: Command::P_DATA,
            head,
            digest: digest.clone(),
            data_len: 4096,
        },
        Packet::Data {
            cmd: Command::P_RS_DATA_REPLY,
            head,
            digest: digest.clone(),
            data_len: 512,
        },
        Packet::WriteSame {
            head,
            size: 1 << 20,
            digest,
            data_len: 512,
        },
        Packet::Trim {
            cmd: Command::P_TRIM,
            head,
            size: 128 << 20,
        },
        Packet::Trim {
            cmd: Command::P_ZEROES,
            head,
            size: 4096,
        },
        Packet::Barrier(Barrier { barrier: 3, pad: 0 }),
        Packet::BarrierAck(BarrierAck {
            barrier: 3,
            set_size: 2,
        }),
        Packet::BlockAck {
            cmd: Command::P_WRITE_ACK,
            ack: BlockAck {
                sector: 8,
                block_id: 1,
                blksize: 4096,
                seq_num: 2,
            },
        },
        Packet::BlockReq {
            cmd: Command::P_RS_DATA_REQUEST,
            req: BlockReq {
                sector: 0,
                block_id: u64::MAX,
                blksize: 1 << 20,
                pad: 0,
            },
            digest: vec![],
        },
        Packet::BlockReq {
            cmd: Command::P_CSUM_RS_REQUEST,
            req: BlockReq {
                sector: 0,
                block_id: u64::MAX,
                blksize: 4096,
                pad: 0,
            },
            digest: vec![1, 2, 3, 4],
        },
        Packet::BlockDesc {
            cmd: Command::P_OUT_OF_SYNC,
            desc: BlockDesc {
                sector: 16,
                blksize: 4096,
                pad: 0,
            },
        },
        Packet::Features(ConnectionFeatures::drbd84(ff::PRO_FEATURES_84)),
        Packet::Protocol {
            cmd: Command::P_PROTOCOL,
            protocol: Protocol {
                protocol: 3,
                integrity_alg: if v >= 87 {
                    alg("crc32c")
                } else {
                    AlgName::none()
                },
                ..Protocol::default()
            },
        },
        Packet::SyncParam {
            cmd: if v >= 89 {
                Command::P_SYNC_PARAM89
            } else {
                Command::P_SYNC_PARAM
            },
            param: SyncParam {
                resync_rate: 250,
                verify_alg: if v >= 88 { alg("md5") } else { AlgName::none() },
                csums_alg: if v >= 89 {
                    alg("sha1")
                } else {
                    AlgName::none()
                },
                controller: (v >= 95).then_some(ResyncController {
                    c_plan_ahead: 20,
                    c_delay_target: 10,
                    c_fill_target: 100,
                    c_max_rate: 102_400,
                }),
            },
        },
        Packet::Uuids(Uuids {
            current: 0x5c18_4811_0b29_c331,
            bitmap: 4,
            history: [1, 2],
            dirty_bits: 1014,
            uuid_flags: 4,
        }),
        Packet::Sizes(Sizes {
            d_size: 8112,
            c_size: 8112,
            max_bio_size: 1 << 20,
            qlim: ctx.has(ff::DRBD_FF_WSAME).then_some(QueueLimits {
                physical_block_size: 512,
                logical_block_size: 512,
                io_min: 512,
                discard_enabled: 1,
                ..QueueLimits::default()
            }),
            ..Sizes::default()
        }),
        Packet::State(0xc882),
        Packet::ReqState {
            cmd: Command::P_STATE_CHG_REQ,
            req: ReqState {
                mask: 0x1e03,
                val: 0x1001,
            },
        },
        Packet::ReqStateReply {
            cmd: Command::P_CONN_ST_CHG_REPLY,
            retcode: -3,
        },
        Packet::SyncUuid(0x6135_10b5_3f4e_83f3),
        Packet::DelayProbe(DelayProbe {
            seq_num: 1,
            offset: 2,
        }),
        Packet::Bitmap(vec![0xa5; 96]),
        Packet::CompressedBitmap(CompressedBitmap {
            encoding: 0x82,
            code: vec![0x1d, 0x7e, 0x03],
        }),
        Packet::AuthChallenge(vec![0x11; 64]),
        Packet::AuthResponse(vec![0x22; 32]),
    ];
    for cmd in [
        Command::P_PING,
        Command::P_PING_ACK,
        Command::P_UNPLUG_REMOTE,
        Command::P_INITIAL_DATA,
        Command::P_INITIAL_META,
    ] {
        p.push(Packet::Empty(cmd));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::sim::rng::Rng;

    #[test]
    fn corpus_round_trips_through_the_oracle() {
        let corpus = corpus();
        assert!(corpus.len() > 1000, "{} inputs", corpus.len());
        for input in &corpus {
            let ctx = ctx_for(input[0], input[1]);
            let f = decode_frame(&input[2..], &ctx)
                .expect("valid packet decodes")
                .expect("complete");
            assert_eq!(f.len, input.len() - 2, "{:?}", f.header.command);
            assert!(run_counted(input) >= 1);
        }
    }

    #[test]
    fn data_sub_headers_decode_with_the_selected_data_length() {
        // sel0 9 = agreed 101, sel1 0x10 = no digest, data length 512: a 24-byte input
        // is a valid P_DATA / P_DATA_REPLY / P_RS_DATA_REPLY sub-header.
        let mut input = vec![9u8, 0x10];
        input.extend_from_slice(&[0; 24]);
        // 24 zero bytes also decode as the 11 p_block_ack commands, a P_BITMAP and a
        // P_AUTH_RESPONSE; not as a p_block_req (blksize 0 is refused) nor as a
        // P_COMPRESSED_BITMAP (code 0).
        assert_eq!(run_counted(&input), 3 + 11 + 2);
    }

    #[test]
    fn random_inputs_never_panic() {
        let mut rng = Rng::new(0x7a4d_e11e_5eed_0001);
        let mut decoded = 0;
        for i in 0..20_000 {
            let len = if i % 50 == 0 {
                rng.index(5000)
            } else {
                rng.index(200)
            };
            let mut input: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            // Half the inputs start with a real header magic so decoding gets further.
            if i % 2 == 0 && input.len() > 6 {
                let magic: &[u8] = match rng.index(3) {
                    0 => &[0x83, 0x74, 0x02, 0x67],
                    1 => &[0x83, 0x5a],
                    _ => &[0x86, 0x20, 0xec, 0x20],
                };
                input[2..2 + magic.len()].copy_from_slice(magic);
            }
            decoded += run_counted(&input);
        }
        // Payload-per-command decoding succeeds on some random bytes (e.g. fixed-size
        // structs), so the round-trip oracle ran.
        assert!(decoded > 1000, "{decoded}");
    }

    #[test]
    fn mutated_valid_packets_never_panic() {
        let corpus = corpus();
        let mut rng = Rng::new(0x5eed_0000_0000_0002);
        let mut decoded = 0;
        for i in 0..20_000 {
            let mut input = corpus[rng.index(corpus.len())].clone();
            match i % 5 {
                // Flip a few bytes (headers and payloads alike).
                0 | 1 => {
                    for _ in 0..=rng.index(4) {
                        let at = rng.index(input.len());
                        input[at] ^= rng.byte() | 1;
                    }
                }
                // Truncate.
                2 => input.truncate(rng.index(input.len())),
                // Append garbage or a second packet.
                3 => {
                    let other = &corpus[rng.index(corpus.len())];
                    input.extend_from_slice(&other[2..]);
                    let at = rng.index(input.len());
                    input[at] ^= rng.byte();
                }
                // Rewrite a length field byte (h80: 6..8, h95: 4..8, h100: 8..12).
                _ => {
                    let at = 2 + 4 + rng.index(8);
                    if at < input.len() {
                        input[at] = rng.byte();
                    }
                }
            }
            decoded += run_counted(&input);
        }
        assert!(decoded > 10_000, "{decoded}");
    }
}
