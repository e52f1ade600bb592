//! Golden byte vectors: every header kind and every payload, written out byte by byte
//! from the offsets in `docs/drbd-reference.md` §1–2 (never produced by the encoder),
//! decoded to the expected value and re-encoded to the same bytes; plus the length and
//! field rules, each with the error message it must give.

use super::*;

fn ctx(version: u32, features: u32) -> WireCtx {
    WireCtx::new(version, features).expect("a valid agreed version")
}

fn c101() -> WireCtx {
    ctx(101, ff::PRO_FEATURES_84)
}

/// `p_header100` bytes written out by hand: magic, volume, command, length, pad.
fn h100(volume: u16, cmd: u16, len: u32) -> Vec<u8> {
    let mut v = vec![0x86, 0x20, 0xec, 0x20];
    v.extend_from_slice(&volume.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, 0]);
    v
}

/// `p_header80` bytes written out by hand: magic, command, length.
fn h80(cmd: u16, len: u16) -> Vec<u8> {
    let mut v = vec![0x83, 0x74, 0x02, 0x67];
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `bytes` = header + head (for data packets the data itself is not included): decodes to
/// `expected` and `expected` encodes to `bytes`.
fn golden(c: &WireCtx, volume: u16, bytes: &[u8], expected: &Packet) {
    let hdr = Header::decode(bytes, c).expect("header decodes");
    assert_eq!(hdr.volume, volume);
    assert_eq!(hdr.command, expected.command());
    let head = bytes.get(hdr.size()..).expect("header fits");
    let layout = payload_layout(&hdr, c).expect("layout");
    assert_eq!(layout.head, head.len(), "{}: head length", hdr.command);
    assert_eq!(layout.data, expected.data_len() as usize);
    let got = decode(&hdr, head, c).expect("payload decodes");
    assert_eq!(&got, expected);
    let mut out = Vec::new();
    encode(expected, c, volume, &mut out).expect("encodes");
    assert_eq!(out, bytes, "{}: re-encoded bytes", hdr.command);
}

/// Decoding `bytes` (header + payload) fails with exactly `msg`.
fn rejects(c: &WireCtx, bytes: &[u8], msg: &str) {
    let err = match Header::decode(bytes, c) {
        Err(e) => e,
        Ok(hdr) => {
            let head = bytes.get(hdr.size()..).unwrap_or(&[]);
            match decode(&hdr, head, c) {
                Err(e) => e,
                Ok(p) => panic!("{bytes:02x?} decoded to {p:?}, expected error {msg:?}"),
            }
        }
    };
    assert_eq!(err.to_string(), msg);
}

const SECTOR: [u8; 8] = [0, 0, 0, 0, 0, 0, 0x08, 0x00]; // 2048
const BLOCK_ID: [u8; 8] = [0xc0, 0xf8, 0xa9, 0xeb, 0xda, 0xc9, 0x47, 0xff];

fn block_id() -> u64 {
    u64::from_be_bytes(BLOCK_ID)
}

#[test]
fn header80_initial_packets_and_features() {
    let pre = WireCtx::pre_features();
    let b = [0x83, 0x74, 0x02, 0x67, 0xff, 0xf2, 0x00, 0x00];
    golden(&pre, 0, &b, &Packet::Empty(Command::P_INITIAL_DATA));
    let b = [0x83, 0x74, 0x02, 0x67, 0xff, 0xf1, 0x00, 0x00];
    golden(&pre, 0, &b, &Packet::Empty(Command::P_INITIAL_META));
    let hdr = Header::decode(&b, &pre).expect("h80");
    assert_eq!((hdr.kind, hdr.size(), hdr.length), (HeaderKind::H80, 8, 0));

    // p_connection_features: 0 protocol_min 86, 4 feature_flags 0x0f, 8 protocol_max 101,
    // 12 sender_node_id, 16 receiver_node_id, 20.. zero.
    let mut b = vec![0x83, 0x74, 0x02, 0x67, 0xff, 0xfe, 0x00, 0x48];
    b.extend_from_slice(&[
        0, 0, 0, 86, 0, 0, 0, 0x0f, 0, 0, 0, 101, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    b.extend_from_slice(&[0; 52]);
    golden(
        &pre,
        0,
        &b,
        &Packet::Features(ConnectionFeatures::drbd84(ff::PRO_FEATURES_84)),
    );
}

#[test]
fn header_kinds_follow_the_agreed_version() {
    let pre = WireCtx::pre_features();
    assert_eq!((pre.header_len(), ctx(99, 0).header_len()), (8, 8));
    assert_eq!(c101().header_len(), 16);

    // h100 with a volume: magic, volume 3, command P_PING, length 0, pad 0.
    let b = [
        0x86, 0x20, 0xec, 0x20, 0x00, 0x03, 0x00, 0x13, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    golden(&c101(), 3, &b, &Packet::Empty(Command::P_PING));
    let mut bad = b;
    bad[15] = 1;
    rejects(&c101(), &bad, "p_header100 pad is 0x00000001, must be 0");

    // h95: magic 0x835a, command P_DATA, u32 length 24 + 65536.
    let c96 = ctx(96, 0);
    let b = cat(&[
        &[0x83, 0x5a, 0x00, 0x00, 0x00, 0x01, 0x00, 0x18],
        &SECTOR,
        &BLOCK_ID,
        &[0, 0, 0, 7, 0, 0, 0, 2],
    ]);
    let data = |data_len| Packet::Data {
        cmd: Command::P_DATA,
        head: DataHeader {
            sector: 2048,
            block_id: block_id(),
            seq_num: 7,
            dp_flags: dp::DP_RW_SYNC,
        },
        digest: vec![],
        data_len,
    };
    golden(&c96, 0, &b, &data(65536));
    assert_eq!(Header::decode(&b, &c96).expect("h95").kind, HeaderKind::H95);
    // ... and h80 for payloads up to 32 KiB at 95..=99, like prepare_header.
    let b = cat(&[
        &[0x83, 0x74, 0x02, 0x67, 0x00, 0x00, 0x7e, 0x18],
        &SECTOR,
        &BLOCK_ID,
        &[0, 0, 0, 7, 0, 0, 0, 2],
    ]);
    golden(&c96, 0, &b, &data(32768 - 512));
    // Below 95 h80 even above 32 KiB while the u16 length holds it, never beyond.
    let mut out = Vec::new();
    encode(&data(32768), &ctx(94, 0), 0, &mut out).expect("h80 holds 32792");
    assert_eq!(out.get(..4), Some(&[0x83, 0x74, 0x02, 0x67][..]));
    let err = encode(&data(65536), &ctx(94, 0), 0, &mut out).expect_err("too long for h80");
    assert_eq!(
        err.to_string(),
        "cannot encode P_DATA: payload of 65560 bytes does not fit p_header80's 16-bit length"
    );
    let err = encode(&Packet::Empty(Command::P_PING), &c96, 1, &mut out).expect_err("vol");
    assert!(
        err.to_string().contains("volume 1 needs p_header100"),
        "{err}"
    );

    // Wrong header for the context.
    let h95_ping = [0x83, 0x5a, 0x00, 0x13, 0, 0, 0, 0];
    rejects(
        &pre,
        &h95_ping,
        "p_header95 is not allowed at agreed protocol 80",
    );
    golden(&c96, 0, &h95_ping_as(&c96), &Packet::Empty(Command::P_PING));
    rejects(
        &pre,
        &[0x86, 0x20, 0xec, 0x20, 0, 0, 0, 0x13],
        "bad header magic: first bytes 0x8620ec20 are not a p_header80 (agreed protocol 80)",
    );
    rejects(
        &c101(),
        &cat(&[&h80(0x13, 0), &[0; 8]]),
        "bad header magic: first bytes 0x83740267 are not a p_header100 (agreed protocol 101)",
    );
    assert!(matches!(
        Header::decode(&[0x83, 0x74, 0x02], &pre),
        Err(WireError::Truncated {
            need: 8,
            have: 3,
            ..
        })
    ));
}

/// A P_PING in h80 (what the encoder writes for it at 95..=99); h95 is accepted there too.
fn h95_ping_as(c: &WireCtx) -> Vec<u8> {
    assert!(c.version() < 100);
    h80(0x13, 0)
}

#[test]
fn h95_is_accepted_at_95_to_99_only() {
    let h95 = [0x83, 0x5a, 0x00, 0x13, 0, 0, 0, 0];
    let c96 = ctx(96, 0);
    let h = Header::decode(&h95, &c96).expect("h95 ok");
    assert_eq!(
        (h.kind, h.command, h.length),
        (HeaderKind::H95, Command::P_PING, 0)
    );
    rejects(
        &ctx(94, 0),
        &h95,
        "p_header95 is not allowed at agreed protocol 94",
    );
    rejects(
        &c101(),
        &cat(&[&h95, &[0; 8]]),
        "bad header magic: first bytes 0x835a0013 are not a p_header100 (agreed protocol 101)",
    );
}

#[test]
fn unknown_and_unsupported_commands_are_named() {
    rejects(&c101(), &h100(0, 0x0025, 0), "unknown DRBD command 0x0025");
    rejects(&c101(), &h100(0, 0x1234, 0), "unknown DRBD command 0x1234");
    rejects(
        &c101(),
        &h100(0, 0x002e, 0),
        "P_TWOPC_PREPARE (0x002e) is not part of the DRBD 8.4 protocol: DRBD 9 only",
    );
    rejects(
        &c101(),
        &h100(0, 0x0005, 0),
        "P_BECOME_SYNC_TARGET (0x0005) is not part of the DRBD 8.4 protocol: named in DRBD's enum \
         but never sent",
    );
    assert_eq!(sub_header_len(Command::P_UUIDS110, &c101()), None);
}

#[test]
fn data_packets_split_sub_header_and_data() {
    // p_data: 0 sector, 8 block_id, 16 seq_num, 20 dp_flags (rw_sync|send_write_ack).
    let b = cat(&[
        &h100(0, 0x0000, 24 + 4096),
        &SECTOR,
        &BLOCK_ID,
        &[0, 0, 0, 1, 0, 0, 0x01, 0x02],
    ]);
    let head = DataHeader {
        sector: 2048,
        block_id: block_id(),
        seq_num: 1,
        dp_flags: dp::DP_RW_SYNC | dp::DP_SEND_WRITE_ACK,
    };
    let p = Packet::Data {
        cmd: Command::P_DATA,
        head,
        digest: vec![],
        data_len: 4096,
    };
    golden(&c101(), 0, &b, &p);
    assert_eq!(sub_header_len(Command::P_DATA, &c101()), Some(24));
    let mut out = Vec::new();
    encode_data_header(Command::P_DATA, &head, &[], 4096, &c101(), 0, &mut out)
        .expect("data header");
    assert_eq!(out, b);

    // P_RS_DATA_REPLY with a 4-byte data-integrity digest after p_data.
    let c = c101().with_data_digest(4).expect("4-byte digest");
    assert_eq!(sub_header_len(Command::P_RS_DATA_REPLY, &c), Some(28));
    let b = cat(&[
        &h100(1, 0x0002, 28 + 512),
        &SECTOR,
        &[0xff; 8],
        &[0, 0, 0, 0, 0, 0, 0, 0],
        &[0xde, 0xad, 0xbe, 0xef],
    ]);
    let p = Packet::Data {
        cmd: Command::P_RS_DATA_REPLY,
        head: DataHeader {
            sector: 2048,
            block_id: ID_SYNCER,
            seq_num: 0,
            dp_flags: 0,
        },
        digest: vec![0xde, 0xad, 0xbe, 0xef],
        data_len: 512,
    };
    golden(&c, 1, &b, &p);

    // Data length rules.
    rejects(
        &c101(),
        &cat(&[&h100(0, 0, 24 + 1000), &[0; 24]]),
        "P_DATA carries 1000 data bytes, expected a multiple of 512 in 0..=1048576",
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 0, 24 + (1 << 20) + 512), &[0; 24]]),
        "P_DATA carries 1049088 data bytes, expected a multiple of 512 in 0..=1048576",
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 1, 20), &[0; 20]]),
        "P_DATA_REPLY payload is 20 bytes, expected at least 24",
    );
    // A wrong-length head slice is refused, not misread.
    let hdr = Header::decode(&h100(0, 0, 24 + 512), &c101()).expect("hdr");
    assert_eq!(
        decode(&hdr, &[0; 30], &c101())
            .expect_err("head")
            .to_string(),
        "P_DATA: decode was given 30 head bytes, the header says 24"
    );
    // The encoder refuses a digest the context does not have.
    let bad = Packet::Data {
        cmd: Command::P_DATA,
        head,
        digest: vec![1, 2],
        data_len: 512,
    };
    assert!(encode(&bad, &c101(), 0, &mut out).is_err());
}

#[test]
fn trim_zeroes_and_write_same() {
    // p_trim: p_data + 24 size (1 MiB).
    let b = cat(&[
        &h100(0, 0x0031, 28),
        &SECTOR,
        &BLOCK_ID,
        &[0, 0, 0, 9, 0, 0, 0x01, 0x40],
        &[0x00, 0x10, 0x00, 0x00],
    ]);
    let head = DataHeader {
        sector: 2048,
        block_id: block_id(),
        seq_num: 9,
        dp_flags: dp::DP_DISCARD | dp::DP_SEND_WRITE_ACK,
    };
    golden(
        &c101(),
        0,
        &b,
        &Packet::Trim {
            cmd: Command::P_TRIM,
            head,
            size: 1 << 20,
        },
    );
    let b = cat(&[
        &h100(0, 0x0036, 28),
        &SECTOR,
        &BLOCK_ID,
        &[0, 0, 0, 9, 0, 0, 0x05, 0x00],
        &[0x08, 0x00, 0x00, 0x00],
    ]);
    let zhead = DataHeader {
        dp_flags: dp::DP_ZEROES | dp::DP_SEND_WRITE_ACK,
        ..head
    };
    golden(
        &c101(),
        0,
        &b,
        &Packet::Trim {
            cmd: Command::P_ZEROES,
            head: zhead,
            size: 128 << 20,
        },
    );
    let over = cat(&[&h100(0, 0x0036, 28), &[0; 24], &[0x08, 0x00, 0x02, 0x00]]);
    rejects(
        &c101(),
        &over,
        "P_ZEROES: size is 134218240, exceeds DRBD_MAX_BATCH_BIO_SIZE (128 MiB)",
    );
    let odd = cat(&[&h100(0, 0x0031, 28), &[0; 24], &[0, 0, 0x01, 0x01]]);
    rejects(
        &c101(),
        &odd,
        "P_TRIM: size is 257, is not a multiple of 512",
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x0031, 32), &[0; 32]]),
        "P_TRIM payload is 32 bytes, expected 28",
    );

    // p_wsame = p_trim layout, then one logical block of data.
    let b = cat(&[
        &h100(0, 0x0034, 28 + 4096),
        &SECTOR,
        &BLOCK_ID,
        &[0, 0, 0, 2, 0, 0, 0x03, 0x00],
        &[0x00, 0x01, 0x00, 0x00],
    ]);
    golden(
        &c101(),
        0,
        &b,
        &Packet::WriteSame {
            head: DataHeader {
                seq_num: 2,
                dp_flags: dp::DP_WSAME | dp::DP_SEND_WRITE_ACK,
                ..head
            },
            size: 65536,
            digest: vec![],
            data_len: 4096,
        },
    );
}

#[test]
fn block_acks_requests_and_descriptors() {
    // p_block_ack: 0 sector, 8 block_id, 16 blksize 4096, 20 seq_num 5.
    let b = cat(&[
        &h100(0, 0x0016, 24),
        &SECTOR,
        &BLOCK_ID,
        &[0, 0, 0x10, 0, 0, 0, 0, 5],
    ]);
    let ack = BlockAck {
        sector: 2048,
        block_id: block_id(),
        blksize: 4096,
        seq_num: 5,
    };
    golden(
        &c101(),
        0,
        &b,
        &Packet::BlockAck {
            cmd: Command::P_WRITE_ACK,
            ack,
        },
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x0016, 20), &[0; 20]]),
        "P_WRITE_ACK payload is 20 bytes, expected 24",
    );
    // P_OV_RESULT's block_id is be64 4711 (in sync).
    let b = cat(&[
        &h100(0, 0x0020, 24),
        &SECTOR,
        &[0, 0, 0, 0, 0, 0, 0x12, 0x67],
        &[0, 0, 0x10, 0, 0, 0, 0, 0],
    ]);
    golden(
        &c101(),
        0,
        &b,
        &Packet::BlockAck {
            cmd: Command::P_OV_RESULT,
            ack: BlockAck {
                sector: 2048,
                block_id: ID_IN_SYNC,
                blksize: 4096,
                seq_num: 0,
            },
        },
    );

    // p_block_req: 0 sector, 8 block_id (ID_SYNCER), 16 blksize 1 MiB, 20 pad (kept).
    let b = cat(&[
        &h100(0, 0x0009, 24),
        &SECTOR,
        &[0xff; 8],
        &[0x00, 0x10, 0x00, 0x00, 0xaa, 0xbb, 0xcc, 0xdd],
    ]);
    let req = BlockReq {
        sector: 2048,
        block_id: ID_SYNCER,
        blksize: 1 << 20,
        pad: 0xaabb_ccdd,
    };
    golden(
        &c101(),
        0,
        &b,
        &Packet::BlockReq {
            cmd: Command::P_RS_DATA_REQUEST,
            req,
            digest: vec![],
        },
    );
    // + a crc32c digest for P_CSUM_RS_REQUEST.
    let b = cat(&[
        &h100(0, 0x0021, 28),
        &SECTOR,
        &[0xff; 8],
        &[0x00, 0x00, 0x10, 0x00, 0, 0, 0, 0],
        &[1, 2, 3, 4],
    ]);
    golden(
        &c101(),
        0,
        &b,
        &Packet::BlockReq {
            cmd: Command::P_CSUM_RS_REQUEST,
            req: BlockReq {
                blksize: 4096,
                pad: 0,
                ..req
            },
            digest: vec![1, 2, 3, 4],
        },
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x0021, 24), &[0; 24]]),
        "P_CSUM_RS_REQUEST payload is 24 bytes, expected 25..=88",
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x0008, 24), &[0; 16], &[0, 0, 0, 0], &[0; 4]]),
        "P_DATA_REQUEST: blksize is 0, must not be 0",
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x0008, 24), &[0; 16], &[0, 0x10, 0x02, 0], &[0; 4]]),
        "P_DATA_REQUEST: blksize is 1049088, exceeds DRBD_MAX_BIO_SIZE (1 MiB)",
    );

    // p_block_desc: 0 sector, 8 blksize, 12 pad.
    let b = cat(&[&h100(0, 0x0028, 16), &SECTOR, &[0, 0, 0x10, 0, 0, 0, 0, 0]]);
    golden(
        &c101(),
        0,
        &b,
        &Packet::BlockDesc {
            cmd: Command::P_OUT_OF_SYNC,
            desc: BlockDesc {
                sector: 2048,
                blksize: 4096,
                pad: 0,
            },
        },
    );
}

#[test]
fn barrier_number_is_opaque_native_endian() {
    // An x86 kernel writes epoch 1 as 01 00 00 00 (native), pad 0.
    let b = cat(&[&h100(0, 0x0003, 8), &[0x01, 0, 0, 0], &[0, 0, 0, 0]]);
    let nr = u32::from_ne_bytes([0x01, 0, 0, 0]);
    golden(
        &c101(),
        0,
        &b,
        &Packet::Barrier(Barrier {
            barrier: nr,
            pad: 0,
        }),
    );
    // The ack echoes those 4 bytes unchanged; set_size is big-endian.
    let b = cat(&[&h100(0, 0x001c, 8), &[0x01, 0, 0, 0], &[0, 0, 0, 3]]);
    golden(
        &c101(),
        0,
        &b,
        &Packet::BarrierAck(BarrierAck {
            barrier: nr,
            set_size: 3,
        }),
    );
}

#[test]
fn protocol_and_its_integrity_alg() {
    // p_protocol: protocol C, after_sb_* 0, conn_flags 0, two_primaries 0, then "" + NUL.
    let fixed: [u8; 24] = [
        0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let p = Protocol {
        protocol: 3,
        ..Protocol::default()
    };
    let b = cat(&[&h100(0, 0x000b, 25), &fixed, &[0]]);
    golden(
        &c101(),
        0,
        &b,
        &Packet::Protocol {
            cmd: Command::P_PROTOCOL,
            protocol: p.clone(),
        },
    );
    let b = cat(&[&h100(0, 0x002d, 31), &fixed, b"crc32c\0"]);
    let with_alg = Protocol {
        integrity_alg: AlgName::new("crc32c").expect("valid name"),
        ..p.clone()
    };
    golden(
        &c101(),
        0,
        &b,
        &Packet::Protocol {
            cmd: Command::P_PROTOCOL_UPDATE,
            protocol: with_alg,
        },
    );
    // Below 87 there is no string at all.
    let b = cat(&[&h80(0x000b, 24), &fixed]);
    golden(
        &ctx(86, 0),
        0,
        &b,
        &Packet::Protocol {
            cmd: Command::P_PROTOCOL,
            protocol: p,
        },
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x000b, 27), &fixed, b"md5"]),
        "P_PROTOCOL: integrity_alg is not NUL-terminated",
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x000b, 28), &fixed, b"md\x005"]),
        "P_PROTOCOL: integrity_alg is not NUL-terminated",
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x000b, 28), &fixed, b"md\0\0"]),
        "P_PROTOCOL: integrity_alg has bytes after its first NUL",
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x000b, 24), &fixed]),
        "P_PROTOCOL payload is 24 bytes, expected 25..=88",
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x000b, 25 + 64), &fixed, &[b'a'; 64], &[0]]),
        "P_PROTOCOL payload is 89 bytes, expected 25..=88",
    );
    assert!(AlgName::new(&"a".repeat(64)).is_err());
    assert!(AlgName::new("hmac(sha256)").is_ok());
    assert!(AlgName::new("a b").is_err());
}

#[test]
fn sync_param_layout_follows_the_version() {
    let ctl = ResyncController {
        c_plan_ahead: 0,
        c_delay_target: 10,
        c_fill_target: 100,
        c_max_rate: 102400,
    };
    // p_rs_param_95: 0 resync_rate, 4 verify_alg[64], 68 csums_alg[64], 132 c_plan_ahead,
    // 136 c_delay_target, 140 c_fill_target, 144 c_max_rate.
    let mut verify = [0u8; 64];
    verify[..6].copy_from_slice(b"crc32c");
    let mut csums = [0u8; 64];
    csums[..3].copy_from_slice(b"md5");
    let b = cat(&[
        &h100(0, 0x0023, 148),
        &[0x00, 0x01, 0x90, 0x00],
        &verify,
        &csums,
        &[
            0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 100, 0x00, 0x01, 0x90, 0x00,
        ],
    ]);
    let p = SyncParam {
        resync_rate: 102400,
        verify_alg: AlgName::new("crc32c").expect("name"),
        csums_alg: AlgName::new("md5").expect("name"),
        controller: Some(ctl),
    };
    golden(
        &c101(),
        0,
        &b,
        &Packet::SyncParam {
            cmd: Command::P_SYNC_PARAM89,
            param: p.clone(),
        },
    );
    // p_rs_param_89 at 89..=94: no controller.
    let b = cat(&[
        &h80(0x0023, 132),
        &[0x00, 0x01, 0x90, 0x00],
        &verify,
        &csums,
    ]);
    let p89 = SyncParam {
        controller: None,
        ..p.clone()
    };
    golden(
        &ctx(90, 0),
        0,
        &b,
        &Packet::SyncParam {
            cmd: Command::P_SYNC_PARAM89,
            param: p89,
        },
    );
    // 88: p_rs_param + NUL-terminated verify_alg.
    let b = cat(&[&h80(0x000a, 11), &[0, 0, 0, 250], b"crc32c\0"]);
    let p88 = SyncParam {
        resync_rate: 250,
        verify_alg: AlgName::new("crc32c").expect("name"),
        ..SyncParam::default()
    };
    golden(
        &ctx(88, 0),
        0,
        &b,
        &Packet::SyncParam {
            cmd: Command::P_SYNC_PARAM,
            param: p88,
        },
    );
    // ≤ 87: 4 bytes.
    let b = cat(&[&h80(0x000a, 4), &[0, 0, 0, 250]]);
    let p86 = SyncParam {
        resync_rate: 250,
        ..SyncParam::default()
    };
    golden(
        &ctx(86, 0),
        0,
        &b,
        &Packet::SyncParam {
            cmd: Command::P_SYNC_PARAM,
            param: p86,
        },
    );
    // Garbage after the NUL of a fixed field, a 64-byte name without NUL, wrong sizes.
    let mut dirty = verify;
    dirty[40] = 1;
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x0023, 148), &[0; 4], &dirty, &csums, &[0; 16]]),
        "P_SYNC_PARAM89: verify_alg has non-zero bytes after its NUL",
    );
    rejects(
        &c101(),
        &cat(&[
            &h100(0, 0x0023, 148),
            &[0; 4],
            &verify,
            &[b'x'; 64],
            &[0; 16],
        ]),
        "P_SYNC_PARAM89: csums_alg is not NUL-terminated within its 64 bytes",
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x0023, 132), &[0; 132]]),
        "P_SYNC_PARAM89 payload is 132 bytes, expected 148",
    );
    // The encoder refuses fields the version cannot carry.
    let mut out = Vec::new();
    let bad = Packet::SyncParam {
        cmd: Command::P_SYNC_PARAM,
        param: p,
    };
    assert!(encode(&bad, &ctx(88, 0), 0, &mut out).is_err());
    assert!(
        out.is_empty(),
        "a failed encode leaves the buffer as it was"
    );
}

#[test]
fn uuids_sizes_state() {
    // p_uuids: current, bitmap, history[0], history[1], dirty_bits 1014, uuid_flags 4.
    let b = cat(&[
        &h100(0, 0x000c, 48),
        &[0x5c, 0x18, 0x48, 0x11, 0x0b, 0x29, 0xc3, 0x31],
        &[0, 0, 0, 0, 0, 0, 0, 4],
        &[0, 0, 0, 0, 0, 0, 0, 0],
        &[0, 0, 0, 0, 0, 0, 0, 1],
        &[0, 0, 0, 0, 0, 0, 0x03, 0xf6],
        &[0, 0, 0, 0, 0, 0, 0, 4],
    ]);
    golden(
        &c101(),
        0,
        &b,
        &Packet::Uuids(Uuids {
            current: 0x5c18_4811_0b29_c331,
            bitmap: 4,
            history: [0, 1],
            dirty_bits: 1014,
            uuid_flags: uuid_flags::UUID_FLAG_INCONSISTENT,
        }),
    );

    // p_sizes (d_size 8112, u_size 0, c_size 8112, max_bio 1 MiB, 0, dds 0) + o_qlim
    // (512, 512, 0, 512, 0, discard 1, 0, 0, pad 0) with FF_WSAME agreed.
    let sizes = cat(&[
        &[0, 0, 0, 0, 0, 0, 0x1f, 0xb0],
        &[0; 8],
        &[0, 0, 0, 0, 0, 0, 0x1f, 0xb0],
        &[0x00, 0x10, 0x00, 0x00, 0, 0, 0, 0],
    ]);
    let qlim = [
        0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0,
    ];
    let mut s = Sizes {
        d_size: 8112,
        u_size: 0,
        c_size: 8112,
        max_bio_size: 1 << 20,
        queue_order_type: 0,
        dds_flags: 0,
        qlim: Some(QueueLimits {
            physical_block_size: 512,
            logical_block_size: 512,
            alignment_offset: 0,
            io_min: 512,
            io_opt: 0,
            discard_enabled: 1,
            discard_zeroes_data: 0,
            write_same_capable: 0,
            pad: 0,
        }),
    };
    golden(
        &c101(),
        0,
        &cat(&[&h100(0, 0x000d, 56), &sizes, &qlim]),
        &Packet::Sizes(s),
    );
    assert_eq!(sub_header_len(Command::P_SIZES, &c101()), Some(56));
    // Without FF_WSAME: 32 bytes, and a 56-byte one is refused.
    let no_wsame = ctx(101, ff::DRBD_FF_TRIM);
    s.qlim = None;
    golden(
        &no_wsame,
        0,
        &cat(&[&h100(0, 0x000d, 32), &sizes]),
        &Packet::Sizes(s),
    );
    rejects(
        &no_wsame,
        &cat(&[&h100(0, 0x000d, 56), &sizes, &qlim]),
        "P_SIZES payload is 56 bytes, expected 32",
    );

    // p_state 0x0000c882: Secondary, peer Unknown, WFConnection, Inconsistent, DUnknown.
    let b = cat(&[&h100(0, 0x000e, 4), &[0x00, 0x00, 0xc8, 0x82]]);
    golden(&c101(), 0, &b, &Packet::State(0xc882));
    let st = StateBits::unpack(0xc882);
    assert_eq!(
        (st.role, st.peer, st.conn, st.disk, st.pdsk),
        (2, 0, 8, 4, 6)
    );
    assert_eq!(role_name(st.role), Some("Secondary"));
    assert_eq!(conn_name(st.conn), Some("WFConnection"));
    assert_eq!(disk_name(st.disk), Some("Inconsistent"));
    assert_eq!(disk_name(st.pdsk), Some("DUnknown"));
    // 0x000108e6: Secondary, peer Primary, WFBitMapT, Inconsistent, pdsk UpToDate.
    let st = StateBits::unpack(0x0001_08e6);
    assert_eq!(
        (st.role, st.peer, st.conn, st.disk, st.pdsk),
        (2, 1, 14, 4, 8)
    );
    assert_eq!(st.pack(), Ok(0x0001_08e6));
    let flags = StateBits {
        susp: true,
        susp_fen: true,
        upper: 1,
        ..StateBits::default()
    };
    assert_eq!(flags.pack(), Ok((1 << 17) | (1 << 22) | (1 << 23)));
    for w in [0u32, 1, 0xffff_ffff, 0x8000_0000, 0x0040_0000, 0x1234_5678] {
        assert_eq!(StateBits::unpack(w).pack(), Ok(w));
    }
    let too_big = StateBits {
        role: 4,
        ..StateBits::default()
    };
    assert_eq!(
        too_big.pack().expect_err("2-bit field").to_string(),
        "P_STATE: role is 4, does not fit its bit field of union drbd_state"
    );
}

#[test]
fn state_requests_and_replies() {
    // p_req_state: mask role|disk = 0x1e03, val Primary + UpToDate = 0x1001.
    let b = cat(&[
        &h100(0, 0x0012, 8),
        &[0x00, 0x00, 0x1e, 0x03, 0x00, 0x00, 0x10, 0x01],
    ]);
    golden(
        &c101(),
        0,
        &b,
        &Packet::ReqState {
            cmd: Command::P_STATE_CHG_REQ,
            req: ReqState {
                mask: 0x1e03,
                val: 0x1001,
            },
        },
    );
    // p_req_state_reply: retcode is signed (-3 = SS_NO_UP_TO_DATE_DISK style errors).
    let b = cat(&[&h100(0, 0x002b, 4), &[0xff, 0xff, 0xff, 0xfd]]);
    golden(
        &c101(),
        0,
        &b,
        &Packet::ReqStateReply {
            cmd: Command::P_CONN_ST_CHG_REPLY,
            retcode: -3,
        },
    );
    let b = cat(&[
        &h100(0, 0x000f, 8),
        &[0x61, 0x35, 0x10, 0xb5, 0x3f, 0x4e, 0x83, 0xf3],
    ]);
    golden(&c101(), 0, &b, &Packet::SyncUuid(0x6135_10b5_3f4e_83f3));
    let b = cat(&[&h100(0, 0x0027, 8), &[0, 0, 0, 7, 0, 0, 0x03, 0xe8]]);
    golden(
        &c101(),
        0,
        &b,
        &Packet::DelayProbe(DelayProbe {
            seq_num: 7,
            offset: 1000,
        }),
    );
}

#[test]
fn bitmaps_auth_and_empty_packets() {
    // Plain bitmap: up to 4096 - 16 bytes with h100; an empty one ends a transfer.
    let words = vec![0xa5u8; 4080];
    golden(
        &c101(),
        0,
        &cat(&[&h100(0, 0x0004, 4080), &words]),
        &Packet::Bitmap(words.clone()),
    );
    golden(&c101(), 0, &h100(0, 0x0004, 0), &Packet::Bitmap(vec![]));
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x0004, 4081), &words, &[0]]),
        "P_BITMAP payload is 4081 bytes, expected 0..=4080",
    );
    // With 8-byte headers the limit is 4088.
    assert!(payload_layout(
        &Header::decode(&h80(0x0004, 4088), &ctx(96, 0)).expect("h80"),
        &ctx(96, 0)
    )
    .is_ok());

    // Compressed: encoding 0x82 (RLE_VLI_Bits, first run set, 0 pad bits) + code.
    let b = cat(&[&h100(0, 0x0024, 4), &[0x82, 0x1d, 0x7e, 0x03]]);
    let bm = CompressedBitmap {
        encoding: 0x82,
        code: vec![0x1d, 0x7e, 0x03],
    };
    assert_eq!(
        (bm.code_kind(), bm.pad_bits(), bm.first_run_set()),
        (2, 0, true)
    );
    golden(&c101(), 0, &b, &Packet::CompressedBitmap(bm));
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x0024, 2), &[0x03, 0x00]]),
        "P_COMPRESSED_BITMAP: encoding & 0x0f is 3, is not RLE_VLI_Bits (2), the only bitmap code",
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x0024, 1), &[0x82]]),
        "P_COMPRESSED_BITMAP payload is 1 bytes, expected 2..=4080",
    );

    // Auth: a 64-byte challenge, a 32-byte HMAC-SHA256 response.
    let nonce: Vec<u8> = (0u8..64).collect();
    golden(
        &c101(),
        0,
        &cat(&[&h100(0, 0x0010, 64), &nonce]),
        &Packet::AuthChallenge(nonce.clone()),
    );
    golden(
        &c101(),
        0,
        &cat(&[&h100(0, 0x0011, 32), &nonce[..32]]),
        &Packet::AuthResponse(nonce[..32].to_vec()),
    );
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x0010, 63), &nonce[..63]]),
        "P_AUTH_CHALLENGE payload is 63 bytes, expected 64..=128",
    );

    for cmd in [0x07u16, 0x13, 0x14] {
        let c = Command::from_u16(cmd).expect("known");
        golden(&c101(), 0, &h100(0, cmd, 0), &Packet::Empty(c));
    }
    rejects(
        &c101(),
        &cat(&[&h100(0, 0x0013, 4), &[0; 4]]),
        "P_PING payload is 4 bytes, expected 0",
    );
}

#[test]
fn decode_frame_waits_for_bytes_but_not_for_bad_lengths() {
    let b = cat(&[
        &h100(0, 0x0000, 24 + 512),
        &[0; 24],
        &[0x5a; 512],
        &h100(0, 0x0013, 0),
    ]);
    for cut in 0..24 + 512 + 16 {
        assert_eq!(
            decode_frame(b.get(..cut).expect("cut"), &c101()),
            Ok(None),
            "{cut}"
        );
    }
    let f = decode_frame(&b, &c101()).expect("ok").expect("complete");
    assert_eq!((f.len, f.data.len()), (16 + 24 + 512, 512));
    assert!(f.data.iter().all(|&x| x == 0x5a));
    let rest = b.get(f.len..).expect("rest");
    let f2 = decode_frame(rest, &c101()).expect("ok").expect("ping");
    assert_eq!(f2.packet, Packet::Empty(Command::P_PING));
    // A header announcing 4 GiB is an error at once, not a wait.
    assert!(decode_frame(&h100(0, 0x0000, u32::MAX), &c101()).is_err());
}

#[test]
fn agreement_follows_drbd_do_features() {
    let ours = ConnectionFeatures::drbd84(ff::PRO_FEATURES_84);
    let agreed = agree(&ours, &ours).expect("same range");
    assert_eq!((agreed.version(), agreed.features()), (101, 0x0f));
    let drbd9 = ConnectionFeatures {
        protocol_min: 86,
        protocol_max: 124,
        feature_flags: 0x3ff,
        ..ours
    };
    assert_eq!(agree(&ours, &drbd9).expect("overlap").version(), 101);
    assert_eq!(agree(&ours, &drbd9).expect("overlap").features(), 0x0f);
    let old = ConnectionFeatures {
        protocol_min: 90,
        protocol_max: 0,
        ..ours
    };
    assert_eq!(agree(&ours, &old).expect("max 0 = min").version(), 90);
    let drbd9_only = ConnectionFeatures {
        protocol_min: 118,
        ..drbd9
    };
    assert_eq!(
        agree(&ours, &drbd9_only).expect_err("disjoint").to_string(),
        "no common protocol version: ours 86..=101, peer's 118..=124"
    );
    assert!(WireCtx::new(85, 0).is_err());
    assert!(WireCtx::new(102, 0).is_err());
    assert!(c101().with_data_digest(65).is_err());
    assert_eq!(ctx(94, 0).max_bio_size(), 32 << 10);
    assert_eq!(ctx(95, 0).max_bio_size(), 128 << 10);
    assert_eq!(c101().max_bio_size(), 1 << 20);
}

#[test]
fn encoder_refuses_mismatched_variants() {
    let mut out = vec![1, 2, 3];
    let bad = Packet::BlockAck {
        cmd: Command::P_DATA,
        ack: BlockAck::default(),
    };
    let e = encode(&bad, &c101(), 0, &mut out).expect_err("P_DATA is no ack");
    assert_eq!(
        e.to_string(),
        "cannot encode P_DATA: Packet::BlockAck does not carry this command"
    );
    assert_eq!(out, [1, 2, 3]);
    let bad = Packet::BlockReq {
        cmd: Command::P_OV_REPLY,
        req: BlockReq {
            blksize: 4096,
            ..BlockReq::default()
        },
        digest: vec![],
    };
    assert!(encode(&bad, &c101(), 0, &mut out).is_err());
    let bad = Packet::Sizes(Sizes::default());
    assert!(
        encode(&bad, &c101(), 0, &mut out).is_err(),
        "o_qlim missing"
    );
    assert!(encode(&Packet::Empty(Command::P_DATA), &c101(), 0, &mut out).is_err());
    assert_eq!(out, [1, 2, 3]);
}
