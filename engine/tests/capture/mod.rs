//! Kernel DRBD captures for the integration tests: reads the pcaps of
//! `tests/data/drbd84-captures/` with its own pcap / IPv4 / TCP code, reassembles every TCP
//! stream per direction by sequence number (retransmitted bytes must equal the bytes
//! already placed; holes are reported) and decodes every DRBD packet of every stream.
//! Shared by `wire_pcap.rs` (the packet codec) and `bitmap_xfer.rs` (the bitmap codec);
//! each uses a part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use tandem_engine::wire::{
    self, agree, decode_frame, encode, ff, Command, ConnectionFeatures, Header, Packet, WireCtx,
};

// ---------------------------------------------------------------------------------------
// pcap, Ethernet / Linux cooked, IPv4, TCP

/// One TCP segment as captured.
pub struct Segment {
    pub src: ([u8; 4], u16),
    pub dst: ([u8; 4], u16),
    pub seq: u32,
    pub syn: bool,
    pub fin: bool,
    pub payload: Vec<u8>,
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// Reads a classic pcap file (either byte order, µs or ns timestamps) and returns its TCP
/// segments over IPv4. Link types: Ethernet (1), Linux cooked v1 (113) and v2 (276).
pub fn read_pcap(bytes: &[u8]) -> Vec<Segment> {
    assert!(bytes.len() >= 24, "pcap global header missing");
    let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4"));
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        m => panic!("not a classic pcap file (magic {m:#010x}; pcapng is not supported)"),
    };
    let u32_at = |off: usize| {
        let a: [u8; 4] = bytes[off..off + 4].try_into().expect("4");
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = u32_at(20);
    let mut segs = Vec::new();
    let mut off = 24;
    let mut frame = 0;
    while off < bytes.len() {
        assert!(off + 16 <= bytes.len(), "truncated pcap record header");
        let incl = u32_at(off + 8) as usize;
        let orig = u32_at(off + 12) as usize;
        assert_eq!(incl, orig, "frame {frame} was cut by the snap length");
        let pkt = &bytes[off + 16..off + 16 + incl];
        off += 16 + incl;
        frame += 1;
        let (ethertype, l3) = match linktype {
            1 => {
                let mut t = be16(pkt, 12);
                let mut l3 = 14;
                while t == 0x8100 {
                    t = be16(pkt, l3 + 2);
                    l3 += 4;
                }
                (t, l3)
            }
            113 => (be16(pkt, 14), 16),
            276 => (be16(pkt, 0), 20),
            other => panic!("unsupported pcap link type {other}"),
        };
        if ethertype != 0x0800 {
            continue;
        }
        let ip = &pkt[l3..];
        assert_eq!(ip[0] >> 4, 4, "frame {frame}: not IPv4");
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(be16(ip, 2));
        assert_eq!(be16(ip, 6) & 0x3fff, 0, "frame {frame}: IP fragments");
        if ip[9] != 6 {
            continue;
        }
        let tcp = &ip[ihl..total];
        let doff = usize::from(tcp[12] >> 4) * 4;
        let flags = tcp[13];
        segs.push(Segment {
            src: (ip[12..16].try_into().expect("4"), be16(tcp, 0)),
            dst: (ip[16..20].try_into().expect("4"), be16(tcp, 2)),
            seq: be32(tcp, 4),
            syn: flags & 0x02 != 0,
            fin: flags & 0x01 != 0,
            payload: tcp[doff..].to_vec(),
        });
    }
    segs
}

pub type Endpoint = ([u8; 4], u16);

/// One direction of a TCP connection, reassembled into runs of contiguous bytes. More
/// than one run means the capture lost segments (tcpdump drops under load).
pub struct Stream {
    pub src: Endpoint,
    pub dst: Endpoint,
    /// The SYN was captured, so the first run starts at the first byte of the stream.
    pub from_start: bool,
    /// A FIN was captured: the stream ended inside the capture.
    pub closed: bool,
    /// (stream offset, bytes) of each contiguous run, in order.
    pub runs: Vec<(usize, Vec<u8>)>,
}

impl Stream {
    pub fn label(&self) -> String {
        format!("{}->{}", self.src.1, self.dst.1)
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub fn first_run(&self) -> &[u8] {
        self.runs.first().map(|r| r.1.as_slice()).unwrap_or(&[])
    }
}

/// Reassembles each direction by sequence number. Retransmitted or overlapping bytes
/// must equal what is already there; holes split the stream into runs.
pub fn reassemble(segs: &[Segment]) -> Vec<Stream> {
    let mut dirs: HashMap<(Endpoint, Endpoint), Vec<&Segment>> = HashMap::new();
    let mut order = Vec::new();
    for s in segs {
        let key = (s.src, s.dst);
        if !dirs.contains_key(&key) {
            order.push(key);
        }
        dirs.entry(key).or_default().push(s);
    }
    let mut out = Vec::new();
    for key in order {
        let list = &dirs[&key];
        let syn = list.iter().find(|s| s.syn);
        let data: Vec<&&Segment> = list.iter().filter(|s| !s.payload.is_empty()).collect();
        let base = match (syn, data.first()) {
            (Some(s), _) => s.seq.wrapping_add(1),
            (None, Some(first)) => {
                // Captured mid-stream: start at the lowest sequence number seen.
                let rel = |s: &Segment| s.seq.wrapping_sub(first.seq).cast_signed();
                let min = data.iter().map(|s| rel(s)).min().expect("non-empty");
                first.seq.wrapping_add(min.cast_unsigned())
            }
            (None, None) => continue,
        };
        let mut placed: Vec<(usize, &[u8])> = data
            .iter()
            .map(|s| (s.seq.wrapping_sub(base) as usize, s.payload.as_slice()))
            .collect();
        placed.sort_by_key(|&(off, _)| off);
        let mut runs: Vec<(usize, Vec<u8>)> = Vec::new();
        for (off, p) in placed {
            match runs.last_mut() {
                Some((start, bytes)) if off <= *start + bytes.len() => {
                    let at = off - *start;
                    let overlap = (bytes.len() - at).min(p.len());
                    assert_eq!(
                        &bytes[at..at + overlap],
                        &p[..overlap],
                        "{}->{}: retransmitted bytes differ at offset {off}",
                        key.0 .1,
                        key.1 .1
                    );
                    bytes.extend_from_slice(&p[overlap..]);
                }
                _ => runs.push((off, p.to_vec())),
            }
        }
        out.push(Stream {
            src: key.0,
            dst: key.1,
            from_start: syn.is_some(),
            closed: list.iter().any(|s| s.fin),
            runs,
        });
    }
    out
}

// ---------------------------------------------------------------------------------------
// DRBD decoding of the streams

/// One decoded packet and where it was.
pub struct Decoded {
    pub stream: String,
    pub header: Header,
    pub packet: Packet,
    /// The data bytes captured (all of them unless `cut`).
    pub data: Vec<u8>,
    /// The capture lost the end of this packet's data (a hole follows it).
    pub cut: bool,
}

/// Bytes the capture lost between packets: (stream, offset, length).
pub type Lost = (String, usize, usize);

/// Decodes a whole stream. Starting `pre` (h80), it switches to `agreed` after the
/// packet that ends a direction's h80 phase: its `P_CONNECTION_FEATURES`, or the
/// `P_INITIAL_META` of a meta socket. Every captured byte must belong to a decoded
/// packet whose re-encoding equals the capture. Where segments are missing, the packet
/// running into the hole must have its header and sub-header captured (only its data may
/// be cut); if its end lies inside the hole, decoding resumes at the first byte after
/// the hole (which then has to decode cleanly to its end, so a wrong guess fails) and the
/// skipped span is reported in `lost`.
pub fn decode_stream(
    s: &Stream,
    start_pre: bool,
    agreed: &WireCtx,
    lost: &mut Vec<Lost>,
) -> Vec<Decoded> {
    let label = s.label();
    let mut ctx = if start_pre {
        WireCtx::pre_features()
    } else {
        *agreed
    };
    let mut out = Vec::new();
    // Stream offset where the next packet starts.
    let mut next = s.runs.first().map(|r| r.0).unwrap_or(0);
    for (i, (start, run)) in s.runs.iter().enumerate() {
        let end = start + run.len();
        if next < *start {
            lost.push((label.clone(), next, start - next));
            next = *start;
        }
        while next < end {
            let off = next;
            let rest = &run[off - start..];
            let last_run = i + 1 == s.runs.len();
            let frame =
                match decode_frame(rest, &ctx) {
                    Ok(Some(f)) => f,
                    Ok(None) if !last_run => {
                        // The hole cuts this packet: header and sub-header must be here.
                        let header = Header::decode(rest, &ctx).expect("header before a hole");
                        let layout = wire::payload_layout(&header, &ctx).expect("layout");
                        let head_end = header.size() + layout.head;
                        let head = rest
                            .get(header.size()..head_end)
                            .expect("head before a hole");
                        let packet = wire::decode(&header, head, &ctx).expect("decodes");
                        let mut re = Vec::new();
                        encode(&packet, &ctx, header.volume, &mut re).expect("re-encodes");
                        assert_eq!(re, rest[..head_end], "{label}: offset {off}");
                        out.push(Decoded {
                            stream: label.clone(),
                            header,
                            packet,
                            data: rest[head_end..].to_vec(),
                            cut: true,
                        });
                        next = off + head_end + layout.data;
                        break;
                    }
                    Ok(None) => {
                        panic!(
                    "{label}: {} bytes left at offset {off} are a partial packet (stream {})",
                    rest.len(),
                    if s.closed { "closed" } else { "still open when the capture ended" }
                )
                    }
                    Err(e) => panic!(
                        "{label}: offset {off}: {e} (bytes {:02x?})",
                        &rest[..16.min(rest.len())]
                    ),
                };
            let raw = &rest[..frame.len];
            let mut re = Vec::new();
            encode(&frame.packet, &ctx, frame.header.volume, &mut re)
                .unwrap_or_else(|e| panic!("{label}: offset {off}: re-encode failed: {e}"));
            re.extend_from_slice(frame.data);
            assert!(
                re == raw,
                "{label}: offset {off}: {} re-encodes differently\n got {:02x?}\nwant {:02x?}",
                frame.header.command,
                &re[..re.len().min(64)],
                &raw[..raw.len().min(64)]
            );
            let cmd = frame.header.command;
            if ctx.is_pre_features()
                && (cmd == Command::P_CONNECTION_FEATURES || cmd == Command::P_INITIAL_META)
            {
                ctx = *agreed;
            }
            out.push(Decoded {
                stream: label.clone(),
                header: frame.header,
                packet: frame.packet,
                data: frame.data.to_vec(),
                cut: false,
            });
            next = off + frame.len;
        }
    }
    out
}

pub struct Capture {
    pub streams: Vec<Stream>,
    pub packets: Vec<Decoded>,
    /// Spans the capture lost, with the packets in them.
    pub lost: Vec<Lost>,
    /// What the two kernels agreed (protocol 101, features 0x0f).
    pub agreed: WireCtx,
}

impl Capture {
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for p in &self.packets {
            *m.entry(p.header.command.name()).or_default() += 1;
        }
        m
    }

    /// The `nth` packet with `cmd` sent from port `sport` to port `dport`.
    pub fn find(&self, sport: u16, dport: u16, cmd: Command, nth: usize) -> &Decoded {
        let label = format!("{sport}->{dport}");
        self.packets
            .iter()
            .filter(|p| p.stream == label && p.header.command == cmd)
            .nth(nth)
            .unwrap_or_else(|| panic!("no {cmd} #{nth} on {label}"))
    }

    pub fn all(&self, cmd: Command) -> impl Iterator<Item = &Decoded> {
        self.packets.iter().filter(move |p| p.header.command == cmd)
    }
}

pub fn capture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/drbd84-captures")
        .join(name)
}

/// Loads, reassembles and decodes a whole capture.
pub fn load(name: &str) -> Capture {
    let bytes = std::fs::read(capture_path(name)).expect("capture file is in the repository");
    let streams = reassemble(&read_pcap(&bytes));
    let pre = WireCtx::pre_features();

    // The initiator direction of each captured connection starts with an h80 first
    // packet; the acceptor of a data socket answers with h80 P_CONNECTION_FEATURES,
    // the acceptor of a meta socket speaks only after the agreement (h100).
    let mut first_cmd: HashMap<(Endpoint, Endpoint), Command> = HashMap::new();
    let mut features = Vec::new();
    for s in streams.iter().filter(|s| s.from_start && !s.is_empty()) {
        let bytes = s.first_run();
        if let Ok(Some(f)) = decode_frame(bytes, &pre) {
            first_cmd.insert((s.src, s.dst), f.header.command);
            if f.header.command == Command::P_INITIAL_META {
                // In all three captures the meta socket is the connection to port 7789.
                assert_eq!(s.dst.1, 7789, "{name}: meta socket");
            }
            let mut off = 0;
            while let Ok(Some(f)) = decode_frame(&bytes[off..], &pre) {
                if let Packet::Features(feat) = f.packet {
                    features.push(feat);
                    break;
                }
                off += f.len;
            }
        }
    }
    assert!(
        features.len() >= 2,
        "{name}: both P_CONNECTION_FEATURES expected"
    );
    for f in &features {
        assert_eq!(
            *f,
            ConnectionFeatures::drbd84(ff::PRO_FEATURES_84),
            "{name}"
        );
    }
    let agreed = agree(&features[0], &features[1]).expect("kernel peers agree");
    assert_eq!((agreed.version(), agreed.features()), (101, 0x0f));

    let mut packets = Vec::new();
    let mut lost = Vec::new();
    for s in &streams {
        let start_pre = s.from_start
            && match first_cmd.get(&(s.src, s.dst)) {
                Some(_) => true, // we sent the first packet (initiator)
                None => first_cmd.get(&(s.dst, s.src)) == Some(&Command::P_INITIAL_DATA),
            };
        packets.extend(decode_stream(s, start_pre, &agreed, &mut lost));
    }
    Capture {
        streams,
        packets,
        lost,
        agreed,
    }
}
