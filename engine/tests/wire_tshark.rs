//! An independent check of the ENCODER: Wireshark's DRBD dissector must decode what
//! tandem's encoder writes.
//!
//! Two realistic sessions (one at agreed 101 with DRBD 8.4's features and cram-hmac
//! packets, one at agreed 94 without features, i.e. h80 headers, `p_rs_param_89`, no
//! `o_qlim`) are encoded with `tandem_engine::wire` and sent over real loopback TCP
//! connections, a data and a meta socket each, while `tcpdump` captures them. Then
//! `tshark --enable-heuristic drbd_tcp` must show, per direction and in order, exactly the
//! packets sent, with the right command and the field values set, and must flag nothing
//! malformed and no error-level expert info.
//!
//! Needs `tcpdump` (run as root, as the test suite is) and `tshark`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tandem_engine::wire::{
    agree, dp, encode, ff, AlgName, Barrier, BarrierAck, BlockAck, BlockDesc, BlockReq, Command,
    CompressedBitmap, ConnectionFeatures, DataHeader, DelayProbe, Packet, Protocol, QueueLimits,
    ReqState, ResyncController, Sizes, SyncParam, Uuids, WireCtx, ID_IN_SYNC, ID_SYNCER,
};

const WAIT: Duration = Duration::from_secs(20);

/// One packet sent, and what Wireshark must show for it.
struct Sent {
    cmd: Command,
    fields: Vec<(&'static str, String)>,
}

/// Everything one side writes on one socket, one `write` per packet (data separately,
/// as a writev would).
#[derive(Default)]
struct Dir {
    writes: Vec<Vec<u8>>,
    sent: Vec<Sent>,
}

impl Dir {
    fn pkt(&mut self, p: &Packet, ctx: &WireCtx, fields: &[(&'static str, String)]) {
        let mut b = Vec::new();
        encode(p, ctx, 0, &mut b).unwrap_or_else(|e| panic!("encode {:?}: {e}", p.command()));
        self.writes.push(b);
        let n = p.data_len() as usize;
        if n > 0 {
            self.writes.push(
                (0..n)
                    .map(|i| u8::try_from(i * 7 % 251).unwrap_or(0))
                    .collect(),
            );
        }
        self.sent.push(Sent {
            cmd: p.command(),
            fields: fields.to_vec(),
        });
    }

    fn bytes(&self) -> Vec<u8> {
        self.writes.concat()
    }
}

/// The four directions of one session: A connects both sockets (A is Primary and
/// SyncSource), B accepts.
#[derive(Default)]
struct Session {
    a_data: Dir,
    b_data: Dir,
    a_meta: Dir,
    b_meta: Dir,
}

fn s<T: ToString>(v: T) -> String {
    v.to_string()
}

fn hex32(v: u32) -> String {
    format!("0x{v:08x}")
}

/// Wireshark reads the opaque block_id little-endian.
fn ws_block_id(id: u64) -> String {
    format!("0x{:016x}", u64::from_le_bytes(id.to_be_bytes()))
}

/// Wireshark reads the native-endian barrier number little-endian.
fn ws_barrier(nr: u32) -> String {
    s(u32::from_le_bytes(nr.to_ne_bytes()))
}

fn data_head(sector: u64, id: u64, seq: u32, flags: u32) -> DataHeader {
    DataHeader {
        sector,
        block_id: id,
        seq_num: seq,
        dp_flags: flags,
    }
}

/// Builds a session. `a_max` is A's protocol_max and `a_features` its feature flags; B
/// offers what DRBD 8.4 does. Returns the session and the agreed context.
fn build(a_max: u32, a_features: u32, auth: bool) -> (Session, WireCtx) {
    let mut x = Session::default();
    let pre = WireCtx::pre_features();
    let fa = ConnectionFeatures {
        protocol_max: a_max,
        ..ConnectionFeatures::drbd84(a_features)
    };
    let fb = ConnectionFeatures::drbd84(ff::PRO_FEATURES_84);
    let c = agree(&fa, &fb).expect("versions overlap");
    let v = c.version();

    x.a_data
        .pkt(&Packet::Empty(Command::P_INITIAL_DATA), &pre, &[]);
    x.a_meta
        .pkt(&Packet::Empty(Command::P_INITIAL_META), &pre, &[]);
    x.a_data.pkt(
        &Packet::Features(fa),
        &pre,
        &[
            ("drbd.protocol_min", s(86)),
            ("drbd.protocol_max", s(a_max)),
            ("drbd.feature_flags", hex32(a_features)),
        ],
    );
    x.b_data.pkt(
        &Packet::Features(fb),
        &pre,
        &[
            ("drbd.protocol_max", s(101)),
            ("drbd.feature_flags", hex32(0x0f)),
        ],
    );
    if auth {
        for d in [&mut x.a_data, &mut x.b_data] {
            d.pkt(&Packet::AuthChallenge(vec![0x42; 64]), &c, &[]);
        }
        for d in [&mut x.a_data, &mut x.b_data] {
            d.pkt(&Packet::AuthResponse(vec![0x17; 32]), &c, &[]);
        }
    }

    // The parameter exchange, the same on both sides.
    let alg = |n: &str| AlgName::new(n).expect("valid name");
    for (d, current) in [
        (&mut x.a_data, 0x5c18_4811_0b29_c331u64),
        (&mut x.b_data, 4),
    ] {
        d.pkt(
            &Packet::Protocol {
                cmd: Command::P_PROTOCOL,
                protocol: Protocol {
                    protocol: 3,
                    after_sb_1p: 1,
                    ..Protocol::default()
                },
            },
            &c,
            &[
                ("drbd.protocol", hex32(3)),
                ("drbd.after_sb_0p", hex32(0)),
                ("drbd.after_sb_1p", hex32(1)),
                ("drbd.integrity_alg", s("")),
            ],
        );
        let param = SyncParam {
            resync_rate: 102_400,
            verify_alg: alg("crc32c"),
            csums_alg: alg("md5"),
            controller: (v >= 95).then_some(ResyncController {
                c_plan_ahead: 20,
                c_delay_target: 10,
                c_fill_target: 100,
                c_max_rate: 102_400,
            }),
        };
        let mut fields = vec![
            ("drbd.resync_rate", s(102_400)),
            ("drbd.verify_alg", s("crc32c")),
            ("drbd.csums_alg", s("md5")),
        ];
        if v >= 95 {
            fields.push(("drbd.c_plan_ahead", s(20)));
            fields.push(("drbd.c_max_rate", s(102_400)));
        }
        d.pkt(
            &Packet::SyncParam {
                cmd: Command::P_SYNC_PARAM89,
                param,
            },
            &c,
            &fields,
        );
        let qlim = c.has(ff::DRBD_FF_WSAME).then_some(QueueLimits {
            physical_block_size: 4096,
            logical_block_size: 512,
            io_min: 4096,
            discard_enabled: 1,
            ..QueueLimits::default()
        });
        let mut fields = vec![
            ("drbd.d_size", s(8112)),
            ("drbd.c_size", s(8112)),
            ("drbd.max_bio_size", s(c.max_bio_size())),
        ];
        if qlim.is_some() {
            fields.push(("drbd.physical_block_size", s(4096)));
            fields.push(("drbd.discard_enabled", s(1)));
        }
        d.pkt(
            &Packet::Sizes(Sizes {
                d_size: 8112,
                u_size: 0,
                c_size: 8112,
                max_bio_size: c.max_bio_size(),
                qlim,
                ..Sizes::default()
            }),
            &c,
            &fields,
        );
        d.pkt(
            &Packet::Uuids(Uuids {
                current,
                bitmap: 0,
                history: [0, 0],
                dirty_bits: 1014,
                uuid_flags: 0,
            }),
            &c,
            &[
                ("drbd.current_uuid", format!("0x{current:016x}")),
                ("drbd.dirty_bits", s(1014)),
            ],
        );
        d.pkt(&Packet::State(0xc882), &c, &[("drbd.state", hex32(0xc882))]);
    }

    // A is promoted; a state change request and its reply.
    x.a_data.pkt(
        &Packet::ReqState {
            cmd: Command::P_STATE_CHG_REQ,
            req: ReqState {
                mask: 0x1e03,
                val: 0x1001,
            },
        },
        &c,
        &[],
    );
    x.b_meta.pkt(
        &Packet::ReqStateReply {
            cmd: Command::P_STATE_CHG_REPLY,
            retcode: 1,
        },
        &c,
        &[("drbd.retcode", hex32(1))],
    );
    x.a_data
        .pkt(&Packet::SyncUuid(0x6135_10b5_3f4e_83f3), &c, &[]);
    x.a_data.pkt(
        &Packet::CompressedBitmap(CompressedBitmap {
            encoding: 0x82,
            code: vec![0x1d, 0x7e, 0x03],
        }),
        &c,
        &[],
    );
    x.b_data.pkt(&Packet::Bitmap(vec![0xff; 512]), &c, &[]);
    x.b_data.pkt(&Packet::Bitmap(vec![]), &c, &[]);

    // Writes, epochs and acks (protocol C; flags the way each version sends them).
    let flags = if v >= 100 {
        dp::DP_RW_SYNC | dp::DP_SEND_WRITE_ACK
    } else {
        dp::DP_RW_SYNC
    };
    let ids = [
        0xc0f8_a9eb_dac9_47ffu64,
        0x60f4_a9eb_dac9_47ff,
        0x1234_5678_9abc_def0,
    ];
    for (i, &id) in ids.iter().enumerate() {
        let i32_ = u32::try_from(i).expect("small");
        let sector = 8 * u64::from(i32_);
        let f = if i == 2 {
            flags | dp::DP_FUA | dp::DP_FLUSH
        } else {
            flags
        };
        x.a_data.pkt(
            &Packet::Data {
                cmd: Command::P_DATA,
                head: data_head(sector, id, i32_ + 1, f),
                digest: vec![],
                data_len: 4096,
            },
            &c,
            &[
                ("drbd.sector", s(sector)),
                ("drbd.block_id", ws_block_id(id)),
                ("drbd.seq_num", s(i32_ + 1)),
                ("drbd.dp_flags", hex32(f)),
                ("drbd.size", s(4096)),
            ],
        );
        x.a_data
            .pkt(&Packet::Empty(Command::P_UNPLUG_REMOTE), &c, &[]);
        x.b_meta.pkt(
            &Packet::BlockAck {
                cmd: Command::P_WRITE_ACK,
                ack: BlockAck {
                    sector,
                    block_id: id,
                    blksize: 4096,
                    seq_num: i32_ + 5,
                },
            },
            &c,
            &[
                ("drbd.sector", s(sector)),
                ("drbd.block_id", ws_block_id(id)),
                ("drbd.size", s(4096)),
                ("drbd.seq_num", s(i32_ + 5)),
            ],
        );
        let nr = i32_;
        x.a_data.pkt(
            &Packet::Barrier(Barrier {
                barrier: nr,
                pad: 0,
            }),
            &c,
            &[("drbd.barrier", ws_barrier(nr))],
        );
        x.b_meta.pkt(
            &Packet::BarrierAck(BarrierAck {
                barrier: nr,
                set_size: 1,
            }),
            &c,
            &[("drbd.barrier", ws_barrier(nr)), ("drbd.set_size", s(1))],
        );
    }
    if c.has(ff::DRBD_FF_TRIM | ff::DRBD_FF_WZEROES) {
        for (cmd, f, size) in [
            (Command::P_TRIM, dp::DP_DISCARD, 1u32 << 20),
            (Command::P_ZEROES, dp::DP_ZEROES, 128 << 20),
        ] {
            x.a_data.pkt(
                &Packet::Trim {
                    cmd,
                    head: data_head(2048, 77, 9, f | flags),
                    size,
                },
                &c,
                &[("drbd.sector", s(2048)), ("drbd.size", s(size))],
            );
            x.b_meta.pkt(
                &Packet::BlockAck {
                    cmd: Command::P_WRITE_ACK,
                    ack: BlockAck {
                        sector: 2048,
                        block_id: 77,
                        blksize: size,
                        seq_num: 9,
                    },
                },
                &c,
                &[("drbd.size", s(size))],
            );
        }
        x.a_data.pkt(
            &Packet::Barrier(Barrier { barrier: 3, pad: 0 }),
            &c,
            &[("drbd.barrier", ws_barrier(3))],
        );
        x.b_meta.pkt(
            &Packet::BarrierAck(BarrierAck {
                barrier: 3,
                set_size: 2,
            }),
            &c,
            &[("drbd.set_size", s(2))],
        );
    }

    // Pings both ways.
    x.a_meta.pkt(&Packet::Empty(Command::P_PING), &c, &[]);
    x.b_meta.pkt(&Packet::Empty(Command::P_PING_ACK), &c, &[]);
    x.b_meta.pkt(&Packet::Empty(Command::P_PING), &c, &[]);
    x.a_meta.pkt(&Packet::Empty(Command::P_PING_ACK), &c, &[]);

    // Reads from the peer, resync, checksum resync and online verify.
    let req = |sector: u64, id: u64, blksize: u32| BlockReq {
        sector,
        block_id: id,
        blksize,
        pad: 0,
    };
    x.b_data.pkt(
        &Packet::BlockReq {
            cmd: Command::P_DATA_REQUEST,
            req: req(64, 99, 4096),
            digest: vec![],
        },
        &c,
        &[("drbd.sector", s(64)), ("drbd.size", s(4096))],
    );
    x.a_data.pkt(
        &Packet::Data {
            cmd: Command::P_DATA_REPLY,
            head: data_head(64, 99, 0, 0),
            digest: vec![],
            data_len: 4096,
        },
        &c,
        &[("drbd.sector", s(64))],
    );
    x.b_data.pkt(
        &Packet::BlockReq {
            cmd: Command::P_RS_DATA_REQUEST,
            req: req(128, ID_SYNCER, 8192),
            digest: vec![],
        },
        &c,
        &[("drbd.sector", s(128)), ("drbd.size", s(8192))],
    );
    x.a_data.pkt(
        &Packet::Data {
            cmd: Command::P_RS_DATA_REPLY,
            head: data_head(128, ID_SYNCER, 0, 0),
            digest: vec![],
            data_len: 8192,
        },
        &c,
        &[("drbd.sector", s(128)), ("drbd.size", s(8192))],
    );
    x.b_meta.pkt(
        &Packet::BlockAck {
            cmd: Command::P_RS_WRITE_ACK,
            ack: BlockAck {
                sector: 128,
                block_id: ID_SYNCER,
                blksize: 8192,
                seq_num: 0,
            },
        },
        &c,
        &[("drbd.sector", s(128))],
    );
    x.b_data.pkt(
        &Packet::BlockReq {
            cmd: Command::P_CSUM_RS_REQUEST,
            req: req(256, ID_SYNCER, 4096),
            digest: vec![0xde, 0xad, 0xbe, 0xef],
        },
        &c,
        &[("drbd.sector", s(256))],
    );
    x.a_meta.pkt(
        &Packet::BlockAck {
            cmd: Command::P_RS_IS_IN_SYNC,
            ack: BlockAck {
                sector: 256,
                block_id: ID_SYNCER,
                blksize: 4096,
                seq_num: 1,
            },
        },
        &c,
        &[],
    );
    x.a_data.pkt(
        &Packet::BlockReq {
            cmd: Command::P_OV_REQUEST,
            req: req(512, ID_SYNCER, 4096),
            digest: vec![],
        },
        &c,
        &[("drbd.sector", s(512))],
    );
    x.b_data.pkt(
        &Packet::BlockReq {
            cmd: Command::P_OV_REPLY,
            req: req(512, ID_SYNCER, 4096),
            digest: vec![1, 2, 3, 4],
        },
        &c,
        &[("drbd.sector", s(512))],
    );
    x.a_meta.pkt(
        &Packet::BlockAck {
            cmd: Command::P_OV_RESULT,
            ack: BlockAck {
                sector: 512,
                block_id: ID_IN_SYNC,
                blksize: 4096,
                seq_num: 0,
            },
        },
        &c,
        &[("drbd.block_id", ws_block_id(ID_IN_SYNC))],
    );
    x.a_data.pkt(
        &Packet::BlockDesc {
            cmd: Command::P_OUT_OF_SYNC,
            desc: BlockDesc {
                sector: 4096,
                blksize: 4096,
                pad: 0,
            },
        },
        &c,
        &[("drbd.sector", s(4096))],
    );
    x.a_data.pkt(
        &Packet::DelayProbe(DelayProbe {
            seq_num: 1,
            offset: 2,
        }),
        &c,
        &[],
    );
    if v >= 100 {
        x.a_data.pkt(
            &Packet::ReqState {
                cmd: Command::P_CONN_ST_CHG_REQ,
                req: ReqState {
                    mask: 0x1f0,
                    val: 0x10,
                },
            },
            &c,
            &[],
        );
        x.b_meta.pkt(
            &Packet::ReqStateReply {
                cmd: Command::P_CONN_ST_CHG_REPLY,
                retcode: 1,
            },
            &c,
            &[],
        );
    }
    (x, c)
}

/// Runs a process to completion, bounded by `WAIT`; returns (success, stdout, stderr).
fn run(prog: &str, args: &[&str]) -> (bool, String, String) {
    let mut child = Proc::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {prog} (is it installed?): {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let ok = wait_bounded(&mut child, prog);
    (
        ok,
        t_out.join().expect("stdout reader"),
        t_err.join().expect("stderr reader"),
    )
}

/// Waits for `child` at most `WAIT`; kills it and panics after that.
fn wait_bounded(child: &mut Child, what: &str) -> bool {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st.success();
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {WAIT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn require_tools() {
    for (tool, arg) in [("tcpdump", "--version"), ("tshark", "-v")] {
        match Proc::new(tool).arg(arg).output() {
            Ok(_) => {}
            Err(e) => panic!(
                "{tool} is needed by this test but cannot be run ({e}); install it \
                 (Debian: apt-get install tcpdump tshark)"
            ),
        }
    }
}

/// TCP payload bytes per (src port, dst port) in a pcap (Ethernet / Linux cooked, IPv4)
/// being written: a partial last record is ignored.
fn captured_bytes(path: &Path) -> HashMap<(u16, u16), usize> {
    let mut m = HashMap::new();
    let Ok(b) = std::fs::read(path) else {
        return m;
    };
    if b.len() < 24 {
        return m;
    }
    let le = matches!(
        &b[0..4],
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1]
    );
    let rd32 = |o: usize| {
        let a: [u8; 4] = b[o..o + 4].try_into().expect("4");
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let be16 = |p: &[u8], o: usize| u16::from_be_bytes([p[o], p[o + 1]]);
    let l3 = match rd32(20) {
        1 => 14,
        113 => 16,
        276 => 20,
        other => panic!("unexpected link type {other}"),
    };
    let mut off = 24;
    while off + 16 <= b.len() {
        let incl = rd32(off + 8) as usize;
        if off + 16 + incl > b.len() {
            break;
        }
        let p = &b[off + 16..off + 16 + incl];
        off += 16 + incl;
        if p.len() < l3 + 20 {
            continue;
        }
        let ip = &p[l3..];
        if ip[0] >> 4 != 4 || ip[9] != 6 {
            continue;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(be16(ip, 2));
        let tcp = &ip[ihl..total];
        let doff = usize::from(tcp[12] >> 4) * 4;
        *m.entry((be16(tcp, 0), be16(tcp, 2))).or_default() += tcp.len() - doff;
    }
    m
}

/// A connected data + meta socket pair: (A's end, B's end) of each.
struct Sockets {
    data: (TcpStream, TcpStream),
    meta: (TcpStream, TcpStream),
}

fn connect(data_l: &TcpListener, meta_l: &TcpListener) -> Sockets {
    let pair = |l: &TcpListener| {
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        for s in [&a, &b] {
            s.set_nodelay(true).expect("nodelay");
            s.set_read_timeout(Some(WAIT)).expect("timeout");
            s.set_write_timeout(Some(WAIT)).expect("timeout");
        }
        (a, b)
    };
    Sockets {
        data: pair(data_l),
        meta: pair(meta_l),
    }
}

/// Sends every direction's writes and checks the peer received exactly those bytes.
fn exchange(x: &Session, socks: Sockets) {
    let dirs: [(&Dir, &TcpStream, &TcpStream); 4] = [
        (&x.a_data, &socks.data.0, &socks.data.1),
        (&x.b_data, &socks.data.1, &socks.data.0),
        (&x.a_meta, &socks.meta.0, &socks.meta.1),
        (&x.b_meta, &socks.meta.1, &socks.meta.0),
    ];
    let readers: Vec<_> = dirs
        .iter()
        .map(|(_, _, rx)| {
            let mut rx = rx.try_clone().expect("clone");
            thread::spawn(move || {
                let mut v = Vec::new();
                rx.read_to_end(&mut v)
                    .expect("read until the peer shuts down");
                v
            })
        })
        .collect();
    for (d, tx, _) in &dirs {
        let mut tx = *tx;
        for w in &d.writes {
            tx.write_all(w).expect("write");
        }
        tx.shutdown(Shutdown::Write).expect("shutdown");
    }
    for ((d, _, _), r) in dirs.iter().zip(readers) {
        assert_eq!(r.join().expect("reader"), d.bytes(), "bytes received");
    }
}

/// The DRBD PDUs tshark shows, per (src port, dst port), in order.
fn tshark_pdus(
    pcap: &Path,
) -> HashMap<(u16, u16), Vec<serde_json::Map<String, serde_json::Value>>> {
    let file = pcap.to_str().expect("utf-8 path");
    let (ok, out, err) = run(
        "tshark",
        &[
            "-r",
            file,
            "--enable-heuristic",
            "drbd_tcp",
            "-Y",
            "drbd",
            "-T",
            "json",
            "--no-duplicate-keys",
            "-j",
            "tcp drbd",
        ],
    );
    assert!(ok, "tshark failed: {err}");
    let frames: serde_json::Value = serde_json::from_str(&out).expect("tshark JSON");
    let mut m: HashMap<(u16, u16), Vec<_>> = HashMap::new();
    for f in frames.as_array().expect("array of frames") {
        let layers = &f["_source"]["layers"];
        let port = |k: &str| -> u16 {
            let v = &layers["tcp"][k];
            v.as_str()
                .or_else(|| {
                    v.as_array()
                        .and_then(|a| a.first())
                        .and_then(|x| x.as_str())
                })
                .and_then(|x| x.parse().ok())
                .unwrap_or_else(|| panic!("{k} in {layers}"))
        };
        let key = (port("tcp.srcport"), port("tcp.dstport"));
        let pdus: Vec<_> = match &layers["drbd"] {
            serde_json::Value::Array(a) => a.clone(),
            o @ serde_json::Value::Object(_) => vec![o.clone()],
            other => panic!("unexpected drbd layer {other}"),
        };
        for p in pdus {
            m.entry(key)
                .or_default()
                .push(p.as_object().expect("object").clone());
        }
    }
    m
}

struct Tcpdump {
    child: Child,
}

impl Tcpdump {
    /// Starts capturing `ports` on lo into `file` and waits until tcpdump says it listens.
    fn start(file: &Path, ports: &[u16]) -> Tcpdump {
        let filter = ports
            .iter()
            .map(|p| format!("tcp port {p}"))
            .collect::<Vec<_>>()
            .join(" or ");
        let mut child = Proc::new("tcpdump")
            .args(["-i", "lo", "-U", "-s", "0", "-w"])
            .arg(file)
            .arg(&filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let start = Instant::now();
        let mut seen = Vec::new();
        loop {
            let left = WAIT.saturating_sub(start.elapsed());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains("listening on") => break,
                Ok(l) => seen.push(l),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("tcpdump did not start listening (needs root / CAP_NET_RAW): {seen:?}");
                }
            }
        }
        Tcpdump { child }
    }

    /// Stops it with SIGINT (so it flushes and closes the file) and waits, bounded.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let (ok, _, err) = run("kill", &["-INT", &pid]);
        assert!(ok, "kill -INT tcpdump: {err}");
        wait_bounded(&mut self.child, "tcpdump");
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn temp_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let d = std::env::temp_dir().join(format!("tandem-wire-tshark-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    // tcpdump drops root privileges to its own user before writing the file.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    d
}

#[test]
fn tshark_decodes_what_the_encoder_writes() {
    require_tools();
    let dir = temp_dir();
    let pcap = dir.join("tandem.pcap");

    let listeners: Vec<TcpListener> = (0..4)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect();
    let sessions = [build(101, ff::PRO_FEATURES_84, true), build(94, 0, false)];
    assert_eq!(
        (sessions[0].1.version(), sessions[0].1.features()),
        (101, 0x0f)
    );
    assert_eq!((sessions[1].1.version(), sessions[1].1.features()), (94, 0));

    let cap = Tcpdump::start(&pcap, &ports);
    let mut expected: HashMap<(u16, u16), (&Dir, usize)> = HashMap::new();
    for (i, (x, _)) in sessions.iter().enumerate() {
        let socks = connect(&listeners[2 * i], &listeners[2 * i + 1]);
        let port = |s: &TcpStream| s.local_addr().expect("addr").port();
        let (ad, bd) = (port(&socks.data.0), port(&socks.data.1));
        let (am, bm) = (port(&socks.meta.0), port(&socks.meta.1));
        for (key, d) in [
            ((ad, bd), &x.a_data),
            ((bd, ad), &x.b_data),
            ((am, bm), &x.a_meta),
            ((bm, am), &x.b_meta),
        ] {
            expected.insert(key, (d, d.bytes().len()));
        }
        exchange(x, socks);
    }
    // Wait until tcpdump has written every byte sent (it writes each packet at once, -U).
    let start = Instant::now();
    loop {
        let got = captured_bytes(&pcap);
        let missing: Vec<_> = expected
            .iter()
            .filter(|(k, (_, n))| got.get(k).copied().unwrap_or(0) < *n)
            .map(|(k, (_, n))| (*k, *n, got.get(k).copied().unwrap_or(0)))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "tcpdump did not capture everything within {WAIT:?}: (ports, sent, captured) \
             {missing:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    cap.stop();

    // Nothing malformed, no error-level expert info — except one known dissector gap:
    // Wireshark's decode_payload_sizes reads o_qlim unconditionally, but DRBD appends it
    // only when DRBD_FF_WSAME is agreed (drbd_send_sizes), so the 32-byte P_SIZES of the
    // session without features is reported as malformed there. Require exactly those.
    let file = pcap.to_str().expect("path");
    let frames = |filter: &str| -> Vec<String> {
        let (ok, out, err) = run(
            "tshark",
            &[
                "-r",
                file,
                "--enable-heuristic",
                "drbd_tcp",
                "-Y",
                filter,
                "-T",
                "fields",
                "-e",
                "frame.number",
                "-e",
                "_ws.expert.message",
            ],
        );
        assert!(ok, "tshark failed: {err}");
        out.lines().map(str::to_owned).collect()
    };
    let bad = frames("_ws.malformed || _ws.expert.severity >= error");
    let short_sizes = frames("drbd.command == 0x000d && drbd.length == 32");
    assert_eq!(
        short_sizes.len(),
        2,
        "the two P_SIZES without o_qlim: {short_sizes:?}"
    );
    let frame_no = |l: &String| l.split('\t').next().unwrap_or("").to_owned();
    assert_eq!(
        bad.iter().map(frame_no).collect::<Vec<_>>(),
        short_sizes.iter().map(frame_no).collect::<Vec<_>>(),
        "tshark flags frames as malformed / errors: {bad:?}"
    );

    // Every packet, per direction and in order, with its command and fields.
    let pdus = tshark_pdus(&pcap);
    let mut total = 0;
    let mut wrong = Vec::new();
    for (key, (d, _)) in &expected {
        let got = pdus.get(key).map(Vec::as_slice).unwrap_or(&[]);
        let want: Vec<String> = d
            .sent
            .iter()
            .map(|p| format!("0x{:04x}", p.cmd.value()))
            .collect();
        let seen: Vec<String> = got
            .iter()
            .map(|p| p["drbd.command"].as_str().unwrap_or("?").to_owned())
            .collect();
        assert_eq!(seen, want, "{key:?}: commands tshark decoded vs sent");
        for (p, sent) in got.iter().zip(&d.sent) {
            for (field, value) in &sent.fields {
                let shown = p.get(*field).and_then(|v| v.as_str());
                if shown != Some(value.as_str()) {
                    wrong.push(format!(
                        "{key:?} {}: {field} = {shown:?}, sent {value}",
                        sent.cmd
                    ));
                }
            }
        }
        total += want.len();
    }
    assert!(
        wrong.is_empty(),
        "fields tshark shows differently:\n{}",
        wrong.join("\n")
    );
    assert!(total > 100, "{total} packets checked");
    let _ = std::fs::remove_dir_all(&dir);
}
