//! A two-sided in-memory harness: a [`Target`] and a [`Source`] (or a [`VerifySource`] and
//! a [`VerifyPeer`]) connected through their outputs, every packet through the real codec
//! (encoded, counted, decoded), over two in-memory disks, with seeded random network and
//! disk delays (so packets overtake each other and IO completes in any order). Not the
//! project simulator: this one exists to test the resync rules alone.
//!
//! Each block of each disk carries a version (0 at the start, then one per application
//! write, the newest highest). Resync data carries the versions the source read, so a
//! resync write that lands on a block holding a newer version is caught the moment it
//! happens ("older resync data overwrote an application write"), not only at the end.
//! When the target is Primary its application may also read: each read goes to the peer
//! or to the local disk as [`Target::must_read_remotely`] says, and must return the
//! source's (up-to-date) data.

// Sizes here are a 32 MiB test volume: every cast fits.
#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::target::TargetSabotage;
use super::*;
use crate::request::OutOfSync;
use crate::wire::{decode_frame, encode, ff, Packet, WireCtx};

const BS: u64 = 4096;

#[derive(Clone)]
struct Disk {
    data: Vec<u8>,
    ver: Vec<u64>,
}

impl Disk {
    fn random(sectors: u64, rng: &mut StdRng) -> Disk {
        let mut data = vec![0u8; (sectors * 512) as usize];
        // xorshift64*: a seeded pattern, cheaper than the crate's generator over 32 MiB.
        let mut x: u64 = rng.gen::<u64>() | 1;
        for c in data.chunks_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
        Disk {
            data,
            ver: vec![0; sectors.div_ceil(8) as usize],
        }
    }

    fn range(&self, sector: u64, len: u32) -> std::ops::Range<usize> {
        let a = (sector * 512) as usize;
        a..a + len as usize
    }

    fn blocks(sector: u64, len: u32) -> std::ops::Range<usize> {
        (sector / 8) as usize..(sector + u64::from(len / 512)).div_ceil(8) as usize
    }

    fn read(&self, sector: u64, len: u32) -> (Vec<u8>, Vec<u64>) {
        (
            self.data[self.range(sector, len)].to_vec(),
            self.ver[Self::blocks(sector, len)].to_vec(),
        )
    }

    /// Writes `data` with per-block versions `vers`; returns the blocks whose version went
    /// backwards (an older write landed over a newer one).
    fn write(&mut self, sector: u64, data: &[u8], vers: &[u64]) -> Vec<u64> {
        let r = self.range(sector, data.len() as u32);
        self.data[r].copy_from_slice(data);
        let mut older = Vec::new();
        for (b, &v) in Self::blocks(sector, data.len() as u32).zip(vers) {
            if v < self.ver[b] {
                older.push(b as u64);
            }
            self.ver[b] = v;
        }
        older
    }
}

/// Which side's application writes (if any) run during the resync.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Apps {
    None,
    /// The source is Primary; its writes replicate to the target (target Secondary).
    OnSource,
    /// The target is Primary; its writes replicate to the source.
    OnTarget,
}

#[derive(Clone)]
struct AppW {
    sector: u64,
    data: Vec<u8>,
    ver: u64,
    tgt_done: bool,
    peer_done: bool,
}

enum Ev {
    Tick,
    ToSource(Packet),
    ToTarget(Packet, Vec<u8>, Vec<u64>),
    TDigest {
        tag: u64,
        sector: u64,
        len: u32,
    },
    TWrite {
        tag: u64,
        sector: u64,
        data: Vec<u8>,
        vers: Vec<u64>,
    },
    TZero {
        tag: u64,
        sector: u64,
        len: u32,
        vers: Vec<u64>,
    },
    SRead {
        tag: u64,
        sector: u64,
        len: u32,
    },
    /// Application write `id`: local write on its origin, `P_DATA` to the other side,
    /// the other side's local write, the ack back.
    AppOriginLocal(u64),
    AppToPeer(u64),
    AppPeerLocal(u64),
    AppAck(u64),
}

struct Pair {
    rng: StdRng,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Ev>,
    ctx: WireCtx,
    target: Target,
    source: Source,
    tdisk: Disk,
    sdisk: Disk,
    /// The source's bitmap (the driver's; the source only says what became in sync).
    sbm: OutOfSync,
    /// The target's bitmap (the driver's; the target borrows it per call).
    tbm: OutOfSync,
    sbufs: HashMap<u64, (Vec<u8>, Vec<u64>)>,
    connected: bool,
    net_max: u64,
    disk_max: u64,
    fail_reads: HashSet<u64>,
    // Accounting.
    wire_bytes: u64,
    data_bytes: u64,
    requests: Vec<(u64, u32)>,
    rs_written: HashSet<u64>,
    violations: Vec<String>,
    finished: Option<ResyncSummary>,
    // Application writes.
    apps: Apps,
    app_rate: f64,
    app_writes: HashMap<u64, AppW>,
    held: HashSet<u64>,
    /// Application writes that had to wait for a resync write (rule 3).
    holds: u64,
    next_id: u64,
    next_ver: u64,
    app_io_sectors: u64,
    app_count: u64,
    /// The target is Primary and its application reads: each read goes to the peer when
    /// [`Target::must_read_remotely`] says so, to its own disk otherwise.
    app_reads: bool,
    /// Reads served by the peer / by the target's disk.
    remote_reads: u64,
    local_reads: u64,
}

struct Setup {
    seed: u64,
    sectors: u64,
    tcfg: TargetConfig,
    scfg: SourceConfig,
}

impl Setup {
    fn new(seed: u64, sectors: u64) -> Setup {
        let mut tcfg = TargetConfig::new(sectors);
        // A slow fixed rate (4000 KiB/s = 100 blocks per step), so a run spans many steps
        // and requests from different steps are in flight together.
        tcfg.rate.c_plan_ahead = 0;
        tcfg.rate.resync_rate = 4000;
        Setup {
            seed,
            sectors,
            tcfg,
            scfg: SourceConfig::new(sectors),
        }
    }
}

impl Pair {
    /// Two identical random disks, then `dirty` applied to the source and marked in both
    /// bitmaps (what an outage leaves).
    fn new(s: Setup, dirty: &OutOfSync, tdisk: Option<Disk>, sdisk: Option<Disk>) -> Pair {
        let mut rng = StdRng::seed_from_u64(s.seed);
        let base = Disk::random(s.sectors, &mut rng);
        let tdisk = tdisk.unwrap_or_else(|| base.clone());
        let sdisk = sdisk.unwrap_or(base);
        let start = TickInput::default();
        let target = Target::new(s.tcfg, dirty, &start).unwrap();
        let source = Source::new(s.scfg, &start).unwrap();
        let mut p = Pair {
            rng,
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            ctx: WireCtx::new(101, ff::PRO_FEATURES_84).unwrap(),
            target,
            source,
            tdisk,
            sdisk,
            sbm: dirty.clone(),
            tbm: dirty.clone(),
            sbufs: HashMap::new(),
            connected: true,
            net_max: 30,
            disk_max: 10,
            fail_reads: HashSet::new(),
            wire_bytes: 0,
            data_bytes: 0,
            requests: Vec::new(),
            rs_written: HashSet::new(),
            violations: Vec::new(),
            finished: None,
            apps: Apps::None,
            app_rate: 0.0,
            app_writes: HashMap::new(),
            held: HashSet::new(),
            holds: 0,
            next_id: 1,
            next_ver: 1,
            app_io_sectors: 0,
            app_count: 0,
            app_reads: false,
            remote_reads: 0,
            local_reads: 0,
        };
        p.schedule(100, Ev::Tick);
        p
    }

    fn schedule(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert((self.now + delay, self.seq), ev);
    }

    fn net_delay(&mut self) -> u64 {
        self.rng.gen_range(0..=self.net_max)
    }

    fn disk_delay(&mut self) -> u64 {
        self.rng.gen_range(0..=self.disk_max)
    }

    /// Encodes `pkt` (+ data) with the real codec, counts it, decodes it back.
    fn wire(&mut self, pkt: &Packet, data: &[u8]) -> Packet {
        let mut buf = Vec::new();
        encode(pkt, &self.ctx, 0, &mut buf).unwrap();
        buf.extend_from_slice(data);
        self.wire_bytes += buf.len() as u64;
        self.data_bytes += data.len() as u64;
        let f = decode_frame(&buf, &self.ctx).unwrap().unwrap();
        assert_eq!(f.len, buf.len());
        f.packet
    }

    fn send_to_source(&mut self, pkt: Packet) {
        if !self.connected {
            return;
        }
        let p = self.wire(&pkt, &[]);
        let d = self.net_delay();
        self.schedule(d, Ev::ToSource(p));
    }

    fn send_to_target(&mut self, pkt: Packet, data: Vec<u8>, vers: Vec<u64>) {
        if !self.connected {
            return;
        }
        let p = self.wire(&pkt, &data);
        let d = self.net_delay();
        self.schedule(d, Ev::ToTarget(p, data, vers));
    }

    fn pump_target(&mut self) {
        let outs: Vec<TargetOutput> = self.target.drain_outputs().collect();
        for o in outs {
            if let Some(p) = o.packet() {
                if let TargetOutput::SendRsDataRequest { sector, len, .. }
                | TargetOutput::SendCsumRsRequest { sector, len, .. } = o
                {
                    self.requests.push((sector, len));
                }
                self.send_to_source(p);
                continue;
            }
            match o {
                TargetOutput::ReadForDigest { tag, sector, len } => {
                    let d = self.disk_delay();
                    self.schedule(d, Ev::TDigest { tag, sector, len });
                }
                TargetOutput::WriteZeroes { .. } => {
                    unreachable!("zero writes are scheduled where the versions are known")
                }
                TargetOutput::AppWriteReady { id } => {
                    assert!(self.held.remove(&id), "ready for a write that was not held");
                    self.submit_app_on_target(id);
                }
                TargetOutput::Finished(s) => {
                    assert!(self.finished.is_none(), "finished twice");
                    self.finished = Some(s);
                }
                _ => unreachable!("sends handled above"),
            }
        }
    }

    fn pump_source(&mut self, read: Option<&(Vec<u8>, Vec<u64>)>) {
        let outs: Vec<SourceOutput> = self.source.drain_outputs().collect();
        for o in outs {
            match o {
                SourceOutput::ReadLocal {
                    tag, sector, len, ..
                } => {
                    let d = self.disk_delay();
                    self.schedule(d, Ev::SRead { tag, sector, len });
                }
                SourceOutput::SetInSync { sector, len } => {
                    self.sbm.clear(sector, len);
                }
                SourceOutput::SendRsDataReply { tag, .. } => {
                    let (data, vers) = self.sbufs.remove(&tag).unwrap();
                    let p = o.packet().unwrap();
                    self.send_to_target(p, data, vers);
                }
                _ => {
                    let vers = read.map(|r| r.1.clone()).unwrap_or_default();
                    let p = o.packet().unwrap();
                    self.send_to_target(p, Vec::new(), vers);
                }
            }
        }
    }

    fn tick_input(&self) -> TickInput {
        TickInput {
            now_ms: self.now,
            app_io_sectors: self.app_io_sectors,
            app_waiting: false,
            congested: false,
        }
    }

    fn step(&mut self) -> bool {
        let Some(((t, _), ev)) = self.events.pop_first() else {
            return false;
        };
        self.now = t;
        match ev {
            Ev::Tick => {
                let input = self.tick_input();
                self.target.tick(&self.tbm, &input);
                self.pump_target();
                self.source.tick(&input);
                self.pump_source(None);
                self.start_app_writes();
                self.app_reads();
                self.schedule(SLEEP_TIME_MS, Ev::Tick);
            }
            Ev::ToSource(p) => match Inbound::from_packet(&p).unwrap() {
                Some(Inbound::RsRequest { sector, len, kind }) => {
                    if !self.source.can_accept() {
                        // Not read off the socket yet.
                        self.schedule(1, Ev::ToSource(p));
                        return true;
                    }
                    self.source.request(sector, len, kind).unwrap();
                    self.pump_source(None);
                }
                Some(Inbound::RsWriteAck { sector, len }) => {
                    self.source.rs_write_ack(sector, len).unwrap();
                    self.pump_source(None);
                }
                Some(Inbound::RsNegAck { sector, len }) => {
                    self.source.neg_ack(sector, len).unwrap();
                }
                other => panic!("source got {other:?}"),
            },
            Ev::ToTarget(p, data, vers) => self.answer_target(&p, data, vers),
            Ev::TDigest { tag, sector, len } => {
                let (data, _) = self.tdisk.read(sector, len);
                self.target
                    .digest_done(&self.tbm, tag, Some(Digest::of(&data)))
                    .unwrap();
                self.pump_target();
            }
            Ev::TWrite {
                tag,
                sector,
                data,
                vers,
            } => {
                self.resync_write(sector, &data, &vers);
                self.target.write_done(&mut self.tbm, tag, true).unwrap();
                self.pump_target();
            }
            Ev::TZero {
                tag,
                sector,
                len,
                vers,
            } => {
                self.resync_write(sector, &vec![0u8; len as usize], &vers);
                self.target.write_done(&mut self.tbm, tag, true).unwrap();
                self.pump_target();
            }
            Ev::SRead { tag, sector, len } => {
                let (data, vers) = self.sdisk.read(sector, len);
                let failed =
                    Disk::blocks(sector, len).any(|b| self.fail_reads.contains(&(b as u64)));
                let outcome = if failed {
                    ReadOutcome::Failed
                } else {
                    ReadOutcome::Ok {
                        all_zero: data.iter().all(|&b| b == 0),
                        digest: Some(Digest::of(&data)),
                    }
                };
                self.sbufs.insert(tag, (data, vers));
                self.source.read_done(tag, outcome).unwrap();
                let ctx = self.sbufs.get(&tag).cloned();
                self.pump_source(ctx.as_ref());
                self.sbufs.remove(&tag);
            }
            Ev::AppOriginLocal(id) => self.app_origin_local(id),
            Ev::AppToPeer(id) => self.app_to_peer(id),
            Ev::AppPeerLocal(id) => self.app_peer_local(id),
            Ev::AppAck(id) => self.app_ack(id),
        }
        true
    }

    fn resync_write(&mut self, sector: u64, data: &[u8], vers: &[u64]) {
        let older = self.tdisk.write(sector, data, vers);
        if !older.is_empty() {
            self.violations.push(format!(
                "t={} older resync data overwrote an application write in blocks {older:?}",
                self.now
            ));
        }
        for b in Disk::blocks(sector, data.len() as u32) {
            self.rs_written.insert(b as u64);
        }
    }

    // ---- application writes -------------------------------------------------------

    fn start_app_writes(&mut self) {
        if self.apps == Apps::None || !self.connected || self.finished.is_some() {
            return;
        }
        let blocks = self.tdisk.ver.len() as u64;
        let n = if self.rng.gen_bool(self.app_rate.min(1.0)) {
            self.rng.gen_range(1..=8)
        } else {
            0
        };
        for _ in 0..n {
            let nb = self.rng.gen_range(1..=4u64);
            // Mostly onto a recent request's range (likely in flight): that is where the
            // conflicts are.
            let recent = self.requests.len().saturating_sub(20)..self.requests.len();
            let first = if !recent.is_empty() && self.rng.gen_bool(0.7) {
                let (sector, len) = self.requests[self.rng.gen_range(recent)];
                (sector / 8 + self.rng.gen_range(0..u64::from(len).div_ceil(BS)))
                    .min(blocks - nb - 1)
            } else {
                self.rng.gen_range(0..blocks.saturating_sub(nb))
            };
            // The write pipeline serialises overlapping writes; so does this harness.
            let sector = first * 8;
            let len = (nb * BS) as u32;
            if self
                .app_writes
                .values()
                .any(|w| overlaps(w.sector, w.data.len() as u32, sector, len))
            {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let ver = self.next_ver;
            self.next_ver += 1;
            let mut data = vec![0u8; len as usize];
            self.rng.fill(&mut data[..]);
            self.app_writes.insert(
                id,
                AppW {
                    sector,
                    data,
                    ver,
                    tgt_done: false,
                    peer_done: false,
                },
            );
            self.app_count += 1;
            self.app_io_sectors += u64::from(len / 512);
            match self.apps {
                Apps::OnSource => {
                    self.source.app_write_begin(id, sector, len).unwrap();
                    let d = self.disk_delay();
                    self.schedule(d, Ev::AppOriginLocal(id));
                    let d = self.net_delay();
                    self.schedule(d, Ev::AppToPeer(id));
                }
                Apps::OnTarget => {
                    if self.target.app_write_begin(id, sector, len).unwrap() {
                        self.submit_app_on_target(id);
                    } else {
                        self.held.insert(id);
                        self.holds += 1;
                    }
                }
                Apps::None => {}
            }
        }
    }

    /// Reads of a SyncTarget Primary's application, each at once: from the peer (the
    /// source's disk) when the target says a block of it is still to be fetched, from its
    /// own disk otherwise. Either way the data must be the source's — the up-to-date
    /// copy — except under an application write still in flight (not read here; the
    /// write pipeline orders a read after an overlapping write).
    fn app_reads(&mut self) {
        if !self.app_reads || self.apps != Apps::OnTarget || !self.connected {
            return;
        }
        let blocks = self.tdisk.ver.len() as u64;
        for _ in 0..self.rng.gen_range(0..=16) {
            let nb = self.rng.gen_range(1..=4u64);
            let sector = self.rng.gen_range(0..blocks - nb) * 8;
            let len = (nb * BS) as u32;
            if self
                .app_writes
                .values()
                .any(|w| overlaps(w.sector, w.data.len() as u32, sector, len))
            {
                continue;
            }
            let remote = self.target.must_read_remotely(&self.tbm, sector, len);
            let (disk, n) = if remote {
                (&self.sdisk, &mut self.remote_reads)
            } else {
                (&self.tdisk, &mut self.local_reads)
            };
            *n += 1;
            let (got, _) = disk.read(sector, len);
            let (want, _) = self.sdisk.read(sector, len);
            if got != want {
                self.violations.push(format!(
                    "t={} a read of sectors {sector}+{len}B on the SyncTarget Primary returned \
                     data older than the source's",
                    self.now
                ));
            }
        }
    }

    /// A target-side write may go: on OnSource it is the peer's write reaching this disk,
    /// on OnTarget the application's write starting (local + `P_DATA`).
    fn submit_app_on_target(&mut self, id: u64) {
        match self.apps {
            Apps::OnSource => {
                let d = self.disk_delay();
                self.schedule(d, Ev::AppPeerLocal(id));
            }
            Apps::OnTarget => {
                let d = self.disk_delay();
                self.schedule(d, Ev::AppOriginLocal(id));
                let d = self.net_delay();
                self.schedule(d, Ev::AppToPeer(id));
            }
            Apps::None => {}
        }
    }

    fn write_app(&mut self, on_target: bool, id: u64) {
        let w = self.app_writes.get(&id).unwrap().clone();
        let vers = vec![w.ver; w.data.len() / BS as usize];
        let disk = if on_target {
            &mut self.tdisk
        } else {
            &mut self.sdisk
        };
        let older = disk.write(w.sector, &w.data, &vers);
        assert!(older.is_empty(), "application writes are the newest");
    }

    fn app_origin_local(&mut self, id: u64) {
        match self.apps {
            Apps::OnSource => {
                self.write_app(false, id);
                self.source.app_write_end(id).unwrap();
                self.pump_source(None);
                self.app_writes.get_mut(&id).unwrap().tgt_done = true; // origin done
                self.maybe_retire(id);
            }
            Apps::OnTarget => {
                self.write_app(true, id);
                self.app_writes.get_mut(&id).unwrap().tgt_done = true;
                self.maybe_retire(id);
            }
            Apps::None => {}
        }
    }

    fn app_to_peer(&mut self, id: u64) {
        match self.apps {
            Apps::OnSource => {
                let w = self.app_writes.get(&id).unwrap().clone();
                if self
                    .target
                    .app_write_begin(id, w.sector, w.data.len() as u32)
                    .unwrap()
                {
                    self.submit_app_on_target(id);
                } else {
                    self.held.insert(id);
                    self.holds += 1;
                }
            }
            Apps::OnTarget => {
                let w = self.app_writes.get(&id).unwrap().clone();
                self.source
                    .app_write_begin(id, w.sector, w.data.len() as u32)
                    .unwrap();
                let d = self.disk_delay();
                self.schedule(d, Ev::AppPeerLocal(id));
            }
            Apps::None => {}
        }
    }

    fn app_peer_local(&mut self, id: u64) {
        let w = self.app_writes.get(&id).unwrap().clone();
        let len = w.data.len() as u32;
        match self.apps {
            Apps::OnSource => {
                self.write_app(true, id);
                // DP_MAY_SET_IN_SYNC: the target clears the blocks it wrote and acks with
                // P_RS_WRITE_ACK, on which the source clears them too.
                self.target.set_in_sync(&mut self.tbm, w.sector, len);
                self.target.app_write_end(id).unwrap();
                self.pump_target();
            }
            Apps::OnTarget => {
                self.write_app(false, id);
                self.source.app_write_end(id).unwrap();
                self.sbm.clear(w.sector, len);
                self.pump_source(None);
            }
            Apps::None => {}
        }
        let d = self.net_delay();
        self.schedule(d, Ev::AppAck(id));
    }

    fn app_ack(&mut self, id: u64) {
        let w = self.app_writes.get_mut(&id).unwrap();
        w.peer_done = true;
        let (sector, len) = (w.sector, w.data.len() as u32);
        if self.apps == Apps::OnSource {
            self.sbm.clear(sector, len);
        }
        self.maybe_retire(id);
    }

    /// Both disks have the write: it leaves the pipeline (on OnTarget this is the
    /// Primary's `Retired`, when the target ends it and clears the blocks).
    fn maybe_retire(&mut self, id: u64) {
        let w = self.app_writes.get(&id).unwrap();
        if !(w.tgt_done && w.peer_done) {
            return;
        }
        let (sector, len) = (w.sector, w.data.len() as u32);
        self.app_writes.remove(&id);
        if self.apps == Apps::OnTarget {
            self.target.set_in_sync(&mut self.tbm, sector, len);
            self.target.app_write_end(id).unwrap();
            self.pump_target();
        }
    }

    /// A resync answer reaches the target.
    fn answer_target(&mut self, p: &Packet, data: Vec<u8>, vers: Vec<u64>) {
        match Inbound::from_packet(p).unwrap() {
            Some(Inbound::RsDataReply { sector, len }) => {
                assert_eq!(data.len(), len as usize);
                if let Some(tag) = self.target.data_reply(&self.tbm, sector, len).unwrap() {
                    let d = self.disk_delay();
                    self.schedule(
                        d,
                        Ev::TWrite {
                            tag,
                            sector,
                            data,
                            vers,
                        },
                    );
                }
            }
            Some(Inbound::RsDeallocated { sector, len }) => {
                self.target.deallocated(&self.tbm, sector, len).unwrap();
                let outs: Vec<TargetOutput> = self.target.drain_outputs().collect();
                for o in outs {
                    match o {
                        TargetOutput::WriteZeroes { tag, sector, len } => {
                            let d = self.disk_delay();
                            let vers = vers.clone();
                            self.schedule(
                                d,
                                Ev::TZero {
                                    tag,
                                    sector,
                                    len,
                                    vers,
                                },
                            );
                        }
                        TargetOutput::SendRsWriteAck { .. } => {
                            let p = o.packet().unwrap();
                            self.send_to_source(p);
                        }
                        other => panic!("after deallocated: {other:?}"),
                    }
                }
            }
            Some(Inbound::RsIsInSync { sector, len }) => {
                self.target
                    .in_sync_reply(&mut self.tbm, sector, len)
                    .unwrap();
            }
            Some(Inbound::NegRsDReply { sector, len }) => {
                self.target.neg_reply(&self.tbm, sector, len).unwrap();
            }
            other => panic!("target got {other:?}"),
        }
        self.pump_target();
    }

    // ---- running ----------------------------------------------------------------------

    fn run_to_finish(&mut self, limit_ms: u64) {
        while self.finished.is_none() || !self.app_writes.is_empty() {
            assert!(
                self.now < limit_ms,
                "no finish by {limit_ms} ms: {:?}",
                self.target.progress(&self.tbm)
            );
            assert!(self.step(), "ran out of events");
        }
        // Let the last acks arrive.
        while let Some((&(t, _), _)) = self.events.first_key_value() {
            if self.events.values().all(|e| matches!(e, Ev::Tick)) {
                break;
            }
            let _ = t;
            self.step();
        }
    }

    /// Drops the connection at once: packets in the network are lost, both machines told,
    /// local IO in flight still completes.
    fn disconnect(&mut self) {
        self.connected = false;
        self.events
            .retain(|_, e| !matches!(e, Ev::ToSource(..) | Ev::ToTarget(..) | Ev::Tick));
        self.target.connection_lost();
        self.source.connection_lost();
        while self.step() {}
    }

    fn assert_clean(&self, dirty: &OutOfSync) {
        assert!(self.violations.is_empty(), "{:?}", self.violations);
        assert!(
            self.tdisk.data == self.sdisk.data,
            "disks differ at blocks {:?}",
            (0..self.tdisk.ver.len())
                .filter(|&b| self.tdisk.data
                    [b * 4096..(b * 4096 + 4096).min(self.tdisk.data.len())]
                    != self.sdisk.data[b * 4096..(b * 4096 + 4096).min(self.sdisk.data.len())])
                .take(10)
                .collect::<Vec<_>>()
        );
        assert_eq!(self.tbm.count(), 0);
        assert_eq!(
            self.sbm.count(),
            0,
            "the source's bits are all cleared by acks"
        );
        let s = self.finished.expect("finished");
        assert_eq!((s.left_blocks, s.failed_blocks), (0, 0));
        if self.apps == Apps::None {
            for b in &self.rs_written {
                assert!(dirty.is_set(*b), "resync wrote block {b} that was in sync");
            }
        }
    }
}

/// An outage: `n` random writes of 1..=16 blocks applied to `disk`, their blocks marked.
fn outage(rng: &mut StdRng, disk: &mut Disk, n: usize) -> OutOfSync {
    let sectors = disk.data.len() as u64 / 512;
    let mut bm = OutOfSync::new(sectors);
    let blocks = sectors.div_ceil(8);
    for _ in 0..n {
        let nb = rng.gen_range(1..=16u64);
        let first = rng.gen_range(0..blocks);
        let end_sector = ((first + nb) * 8).min(sectors);
        let sector = first * 8;
        let len = ((end_sector - sector) * 512) as u32;
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data[..]);
        let vers = vec![0; Disk::blocks(sector, len).len()];
        disk.write(sector, &data, &vers);
        bm.mark(sector, len);
    }
    bm
}

/// 32 MiB and 3 sectors: three resync extents (the last one 3 sectors) and a partial
/// last block.
const SECTORS: u64 = 32 * 2048 + 3;

fn outage_pair(seed: u64, writes: usize, tune: impl FnOnce(&mut Setup)) -> (Pair, OutOfSync) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6f75_7461);
    let mut base = Disk::random(SECTORS, &mut StdRng::seed_from_u64(seed));
    let tdisk = base.clone();
    let dirty = outage(&mut rng, &mut base, writes);
    let mut s = Setup::new(seed, SECTORS);
    tune(&mut s);
    let p = Pair::new(s, &dirty, Some(tdisk), Some(base));
    (p, dirty)
}

#[test]
fn outage_resync_copies_exactly_the_dirty_blocks_within_5_percent() {
    for seed in 1..=4 {
        let (mut p, dirty) = outage_pair(seed, 400, |_| {});
        // Include the partial last block.
        if let Some(b) = p.sdisk.data.last_mut() {
            *b ^= 0xff;
        }
        let mut dirty = dirty;
        dirty.mark(SECTORS - 1, 512);
        p.target.mark_out_of_sync(&mut p.tbm, SECTORS - 1, 512);
        p.sbm.mark(SECTORS - 1, 512);
        p.run_to_finish(600_000);
        p.assert_clean(&dirty);
        let dirty_bytes = dirty.count() * BS - (BS - 3 * 512);
        assert_eq!(
            p.data_bytes, dirty_bytes,
            "seed {seed}: data moved = dirty bytes"
        );
        let ratio = p.wire_bytes as f64 / dirty_bytes as f64;
        eprintln!(
            "seed {seed}: wire/dirty = {ratio:.4}, {} requests for {} blocks",
            p.requests.len(),
            dirty.count()
        );
        assert!(
            ratio <= 1.05,
            "seed {seed}: {} bytes on the wire for {dirty_bytes} dirty: {ratio:.4}",
            p.wire_bytes
        );
        // Requests are merged, aligned, and never cross an extent.
        for &(sector, len) in &p.requests {
            let blocks = u64::from(len).div_ceil(BS);
            assert!(len <= 1 << 20);
            let start = sector / 8;
            assert_eq!(start / EXTENT_BLOCKS, (start + blocks - 1) / EXTENT_BLOCKS);
            let align = 1u64 << (start.trailing_zeros().min(8));
            assert!(
                blocks <= align.max(1),
                "request of {blocks} blocks at block {start}"
            );
        }
        assert!(
            p.requests.len() < dirty.count() as usize,
            "merging happened"
        );
    }
}

#[test]
fn walk_merges_aligned_within_extents_and_max_bio() {
    let sectors = 2 * EXTENT_BLOCKS * 8;
    let mut bm = OutOfSync::new(sectors);
    for b in 1..=8u64 {
        bm.mark(b * 8, 4096);
    }
    bm.mark_blocks(EXTENT_BLOCKS - 2, 4); // straddles the extent boundary
    bm.mark_blocks(EXTENT_BLOCKS + 64, 300); // long run: 256 blocks max (1 MiB)
    let mut cfg = TargetConfig::new(sectors);
    cfg.rate.c_plan_ahead = 0;
    cfg.rate.resync_rate = 8 << 20; // budget far above what is set
    cfg.rate.max_buffers = 131_072;
    let mut t = Target::new(cfg, &bm, &TickInput::default()).unwrap();
    t.tick(&bm, &TickInput::default());
    let got: Vec<(u64, u64)> = t
        .drain_outputs()
        .map(|o| match o {
            TargetOutput::SendRsDataRequest { sector, len, thin } => {
                assert!(!thin);
                (sector / 8, u64::from(len) / BS)
            }
            other => panic!("{other:?}"),
        })
        .collect();
    let e = EXTENT_BLOCKS;
    assert_eq!(
        got,
        vec![
            (1, 1),
            (2, 2),
            (4, 4),
            (8, 1),
            (e - 2, 2),
            (e, 2),
            (e + 64, 64),
            (e + 128, 128),
            (e + 256, 108),
        ]
    );
    // Thin: requests stop at exactly the granularity (8 KiB) and go as P_RS_THIN_REQ.
    cfg.thin_granularity = 8192;
    let mut t = Target::new(cfg, &bm, &TickInput::default()).unwrap();
    t.tick(&bm, &TickInput::default());
    let outs: Vec<TargetOutput> = t.drain_outputs().collect();
    assert!(outs.iter().all(|o| match o {
        TargetOutput::SendRsDataRequest { len, thin, .. } => *thin == (*len == 8192),
        _ => false,
    }));
    assert!(outs
        .iter()
        .all(|o| matches!(o, TargetOutput::SendRsDataRequest { len, .. } if *len <= 8192)));
    // A budget of 3 blocks: 1 + 2.
    cfg.thin_granularity = 0;
    cfg.rate.resync_rate = 120; // 3 blocks per step
    let mut t = Target::new(cfg, &bm, &TickInput::default()).unwrap();
    t.tick(&bm, &TickInput::default());
    assert_eq!(t.drain_outputs().count(), 2);
    assert_eq!(t.resume_position(), 1);
    assert_eq!(t.progress(&bm).sectors_in_flight, 24);
}

#[test]
fn checksum_resync_moves_data_only_for_differing_blocks() {
    for seed in 10..=12 {
        let mut rng = StdRng::seed_from_u64(seed);
        let sdisk = Disk::random(SECTORS, &mut rng);
        let mut tdisk = sdisk.clone();
        // A crash: 2000 blocks marked (whole AL-like extents of 4 MiB), 150 differ.
        let mut dirty = OutOfSync::new(SECTORS);
        dirty.mark_blocks(1024, 1000);
        dirty.mark_blocks(5000, 1000);
        let mut differ = HashSet::new();
        while differ.len() < 150 {
            let b = if rng.gen_bool(0.5) {
                rng.gen_range(1024..2024)
            } else {
                rng.gen_range(5000..6000)
            };
            differ.insert(b);
        }
        for &b in &differ {
            tdisk.data[(b * BS) as usize] ^= 0x5a;
        }
        let mut s = Setup::new(seed, SECTORS);
        s.tcfg.csums = true;
        let mut p = Pair::new(s, &dirty, Some(tdisk), Some(sdisk));
        p.run_to_finish(600_000);
        p.assert_clean(&dirty);
        assert_eq!(p.data_bytes, differ.len() as u64 * BS, "seed {seed}");
        let sum = p.finished.unwrap();
        assert_eq!(sum.same_csum_blocks, 2000 - differ.len() as u64);
        assert_eq!(p.source.stats().same_csum_bytes, sum.same_csum_blocks * BS);
    }
}

#[test]
fn checksum_requests_of_1_mib_move_whole_requests_like_drbd() {
    let mut rng = StdRng::seed_from_u64(77);
    let sdisk = Disk::random(SECTORS, &mut rng);
    let mut tdisk = sdisk.clone();
    let mut dirty = OutOfSync::new(SECTORS);
    dirty.mark_blocks(0, 1024); // 4 MiB = 4 requests of 1 MiB
    tdisk.data[5 * BS as usize] ^= 1; // one block differs in the first MiB
    let mut s = Setup::new(77, SECTORS);
    s.tcfg.csums = true;
    s.tcfg.csums_max_bio_size = 1 << 20;
    s.tcfg.rate.resync_rate = 8 << 20; // a budget that lets requests reach 1 MiB
    s.tcfg.rate.max_buffers = 131_072;
    let mut p = Pair::new(s, &dirty, Some(tdisk), Some(sdisk));
    p.run_to_finish(600_000);
    p.assert_clean(&dirty);
    assert_eq!(p.data_bytes, 1 << 20);
    assert_eq!(p.finished.unwrap().same_csum_blocks, 768);
}

#[test]
fn interrupted_resync_resumes_from_the_persisted_position() {
    for seed in 20..=23 {
        let (mut p, dirty) = outage_pair(seed, 300, |_| {});
        let total = dirty.count();
        // Run a while (~40% of the blocks at 100 blocks per step), then cut everything.
        while p.tbm.count() > total * 6 / 10 {
            assert!(p.step());
        }
        p.disconnect();
        let pos = p.target.resume_position();
        let mut bm = p.tbm.clone();
        // Nothing below the persisted position still needs a request.
        assert!(
            bm.next_set(0).is_some_and(|b| b >= pos),
            "a set bit below {pos}"
        );
        // The reconnect's bitmap exchange OR-merges both sides: blocks written here whose
        // P_RS_WRITE_ACK was lost are still set on the source and come back.
        for b in 0..bm.blocks() {
            if p.sbm.is_set(b) {
                bm.mark_blocks(b, 1);
            } else if bm.is_set(b) {
                p.sbm.mark_blocks(b, 1);
            }
        }
        let left = bm.count();
        assert!(pos > 0 && left < total && left > 0, "pos {pos} left {left}");
        let synced_before = p.data_bytes;
        // A new run on a new connection, from the persisted bitmap and position.
        let mut s = Setup::new(seed, SECTORS);
        s.tcfg.start_block = pos;
        let start = TickInput {
            now_ms: p.now,
            ..TickInput::default()
        };
        p.target = Target::new(s.tcfg, &bm, &start).unwrap();
        p.tbm = bm;
        p.source = Source::new(s.scfg, &start).unwrap();
        p.connected = true;
        p.data_bytes = 0;
        p.requests.clear();
        p.schedule(100, Ev::Tick);
        p.run_to_finish(p.now + 600_000);
        p.assert_clean(&dirty);
        // The second run fetched only what was left; the first request is at the position.
        assert!(p.data_bytes <= left * BS, "seed {seed}");
        assert!(p.requests[0].0 / 8 >= pos);
        assert!(synced_before + p.data_bytes >= (total - 1) * BS);
    }
}

#[test]
fn a_run_started_past_set_bits_goes_round_and_misses_none() {
    let (mut p, dirty) = outage_pair(31, 200, |s| {
        s.tcfg.start_block = 8000; // as if persisted by a run that then lost its bitmap's tail
    });
    p.run_to_finish(600_000);
    p.assert_clean(&dirty);
}

/// Application writes on the source (the Primary) replicate to the target during the
/// resync; every resync write is checked against the blocks' versions as it lands.
#[test]
fn application_writes_on_the_source_are_never_overwritten_by_older_resync_data() {
    let (mut voids, mut holds) = (0, 0);
    for seed in 40..=45 {
        let (mut p, dirty) = outage_pair(seed, 400, |s| {
            s.tcfg.rate.resync_rate = 2000;
        });
        p.apps = Apps::OnSource;
        p.app_rate = 0.9;
        p.net_max = 60;
        p.run_to_finish(3_000_000);
        p.assert_clean(&dirty);
        assert!(p.app_count > 100);
        voids += p.target.progress(&p.tbm).void_replies;
        holds += p.holds;
    }
    assert!(
        voids > 0 && holds > 0,
        "the rules were exercised: {voids} void replies, {holds} held writes"
    );
}

/// The target is Primary: its application writes replicate to the source while the
/// resync runs.
#[test]
fn application_writes_on_the_target_are_never_overwritten_by_older_resync_data() {
    let (mut voids, mut holds) = (0, 0);
    for seed in 50..=55 {
        let (mut p, dirty) = outage_pair(seed, 400, |s| {
            s.tcfg.rate.resync_rate = 2000;
        });
        p.apps = Apps::OnTarget;
        p.app_rate = 0.9;
        p.net_max = 60;
        p.run_to_finish(3_000_000);
        p.assert_clean(&dirty);
        voids += p.target.progress(&p.tbm).void_replies;
        holds += p.holds;
    }
    assert!(
        voids > 0 && holds > 0,
        "the rules were exercised: {voids} void replies, {holds} held writes"
    );
}

/// A SyncTarget Primary's application reads while the resync runs and its own writes
/// replicate: every read returns the source's data (blocks still to be fetched come from
/// the peer), and both kinds of read happen.
/// An outage pair whose target is Primary and whose application writes and reads.
fn reading_target_primary(seed: u64) -> (Pair, OutOfSync) {
    let (mut p, dirty) = outage_pair(seed, 400, |s| {
        s.tcfg.rate.resync_rate = 2000;
    });
    p.apps = Apps::OnTarget;
    p.app_rate = 0.5;
    p.app_reads = true;
    (p, dirty)
}

#[test]
fn reads_on_a_sync_target_primary_return_the_up_to_date_data() {
    let (mut remote, mut local) = (0, 0);
    for seed in 90..=93 {
        let (mut p, dirty) = reading_target_primary(seed);
        p.run_to_finish(3_000_000);
        p.assert_clean(&dirty);
        remote += p.remote_reads;
        local += p.local_reads;
    }
    assert!(
        remote > 0 && local > 0,
        "{remote} remote and {local} local reads"
    );
}

/// With the read-routing rule off (every read answered from the SyncTarget Primary's
/// own disk), a read returns a block not yet fetched: caught.
#[test]
fn the_harness_catches_a_sync_target_primary_that_reads_stale_blocks_locally() {
    let (mut p, _) = reading_target_primary(94);
    p.target.sabotage.read_locally = true;
    p.run_to_finish(3_000_000);
    assert!(
        p.violations
            .iter()
            .any(|v| v.contains("returned data older")),
        "a stale local read went unnoticed ({} reads)",
        p.local_reads
    );
}

/// The harness catches what the rules prevent: with rule 2 or 3 switched off, older
/// resync data lands on newer application data (or the disks end different).
#[test]
fn the_harness_catches_a_resync_that_ignores_application_writes() {
    for sabotage in [
        TargetSabotage {
            no_void: true,
            ..TargetSabotage::default()
        },
        TargetSabotage {
            no_hold: true,
            ..TargetSabotage::default()
        },
    ] {
        let mut caught = false;
        for seed in 60..=75 {
            let (mut p, _) = outage_pair(seed, 400, |s| {
                s.tcfg.rate.resync_rate = 2000;
            });
            p.target.sabotage = sabotage;
            p.apps = if sabotage.no_void {
                Apps::OnTarget
            } else {
                Apps::OnSource
            };
            p.app_rate = 1.0;
            p.net_max = 60;
            p.disk_max = 40;
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                p.run_to_finish(3_000_000);
                p
            }));
            match r {
                Ok(p) => {
                    if !p.violations.is_empty() || p.tdisk.data != p.sdisk.data {
                        caught = true;
                    }
                }
                Err(_) => caught = true,
            }
            if caught {
                break;
            }
        }
        assert!(caught, "{sabotage:?} went unnoticed");
    }
}

#[test]
fn thin_resync_sends_zero_ranges_as_deallocated() {
    let mut rng = StdRng::seed_from_u64(80);
    let tdisk = Disk::random(SECTORS, &mut rng);
    let mut sdisk = tdisk.clone();
    let mut dirty = OutOfSync::new(SECTORS);
    // 64 blocks discarded on the source (zeroes), 64 written with data.
    let z = 4096 * 8;
    sdisk.data[z as usize * 512..(z as usize + 64 * 8) * 512].fill(0);
    dirty.mark(z, 64 * 4096);
    let d = 6000 * 8;
    rng.fill(&mut sdisk.data[d as usize * 512..(d as usize + 64 * 8) * 512]);
    dirty.mark(d, 64 * 4096);
    let mut s = Setup::new(80, SECTORS);
    s.tcfg.thin_granularity = 64 * 1024;
    s.scfg.thin = true;
    let mut p = Pair::new(s, &dirty, Some(tdisk), Some(sdisk));
    p.run_to_finish(600_000);
    p.assert_clean(&dirty);
    assert_eq!(p.data_bytes, 64 * BS);
    assert_eq!(p.target.progress(&p.tbm).deallocated_bytes, 64 * BS);
    assert_eq!(p.source.stats().deallocated_bytes, 64 * BS);
}

#[test]
fn source_read_errors_fail_their_blocks_and_the_run_still_ends() {
    let (mut p, dirty) = outage_pair(90, 300, |_| {});
    let bad: Vec<u64> = (0..dirty.blocks())
        .filter(|&b| dirty.is_set(b))
        .step_by(37)
        .collect();
    p.fail_reads = bad.iter().copied().collect();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.run_to_finish(600_000)));
    assert!(r.is_ok());
    let s = p.finished.unwrap();
    assert!(s.failed_blocks >= bad.len() as u64);
    assert_eq!(s.left_blocks, s.failed_blocks);
    assert_eq!(p.tbm.count(), s.failed_blocks);
    assert!(p.source.stats().read_failures > 0);
    // Every block outside the failed requests is in sync.
    for b in 0..dirty.blocks() as usize {
        if !p.tbm.is_set(b as u64) {
            let r = b * 4096..((b + 1) * 4096).min(p.tdisk.data.len());
            assert!(p.tdisk.data[r.clone()] == p.sdisk.data[r], "block {b}");
        }
    }
}

#[test]
fn pause_stops_requests_and_resume_continues() {
    let (mut p, dirty) = outage_pair(100, 300, |_| {});
    while p.requests.len() < 5 {
        assert!(p.step());
    }
    p.target.pause(p.now);
    // Let what is in flight finish, then a long quiet stretch.
    let until = p.now + 5000;
    while p.now < until {
        assert!(p.step());
    }
    let n = p.requests.len();
    let until = p.now + 5000;
    while p.now < until {
        assert!(p.step());
    }
    assert_eq!(p.requests.len(), n, "no requests while paused");
    assert!(p.target.progress(&p.tbm).paused);
    assert_eq!(p.target.progress(&p.tbm).requests_in_flight, 0);
    p.target.resume(p.now);
    p.run_to_finish(p.now + 600_000);
    p.assert_clean(&dirty);
    assert!(p.finished.unwrap().paused_ms >= 10_000);
}

#[test]
fn progress_reports_rate_and_eta() {
    let (mut p, dirty) = outage_pair(110, 1500, |s| s.tcfg.rate.resync_rate = 400);
    while p.now < 30_000 {
        assert!(p.step());
    }
    let pr = p.target.progress(&p.tbm);
    assert_eq!(pr.total_blocks, dirty.count());
    assert!(pr.left_blocks > 0 && pr.permille > 0 && pr.permille < 1000);
    // 10 blocks per step = 400 KiB/s (fixed mode).
    assert!((380..=410).contains(&pr.rate_kib), "rate {}", pr.rate_kib);
    let eta = pr.eta_secs.unwrap();
    let expect = pr.left_blocks / 100;
    assert!(
        eta.abs_diff(expect) <= expect / 5 + 2,
        "eta {eta} vs {expect}"
    );
}

#[test]
fn the_c_min_rate_check_holds_resync_back_while_the_application_is_busy() {
    let (mut p, _) = outage_pair(120, 3000, |s| {
        s.tcfg.rate = RateConfig {
            c_min_rate: 250,
            ..RateConfig::TANDEM
        };
        s.tcfg.rate.resync_rate = 2000; // 50 blocks per step
        s.tcfg.rate.c_plan_ahead = 0;
    });
    // Busy application from 5 s to 15 s: resync falls to about c-min-rate (250 KiB/s ≈ 62
    // blocks/s) instead of 500 blocks/s.
    while p.now < 5_000 {
        assert!(p.step());
    }
    let before = p.tbm.count();
    while p.now < 15_000 {
        p.app_io_sectors += 1000;
        assert!(p.step());
    }
    let moved = before - p.tbm.count();
    assert!(p.target.progress(&p.tbm).throttled_steps > 50);
    // Unthrottled it would have moved 10 s × 500 blocks.
    assert!(
        moved < 1500,
        "moved {moved} blocks while the application was busy"
    );
    assert!(moved > 0, "c-min-rate still lets resync through");
}

#[test]
fn verify_finds_exactly_the_corrupted_blocks_and_the_next_resync_repairs_them() {
    for seed in 130..=133 {
        let mut rng = StdRng::seed_from_u64(seed);
        let a = Disk::random(SECTORS, &mut rng);
        let mut b = a.clone();
        let mut bad = std::collections::BTreeSet::new();
        while bad.len() < 25 {
            bad.insert(rng.gen_range(0..SECTORS.div_ceil(8)));
        }
        // Two adjacent ones, reported as one range.
        bad.insert(5000);
        bad.insert(5001);
        for &blk in &bad {
            let i = (blk * BS) as usize + rng.gen_range(0..512);
            let n = b.data.len() - 1;
            b.data[i.min(n)] ^= 0x80;
        }
        let mut v = VerifyHarness::new(seed, a.clone(), b.clone(), 0);
        v.run(600_000);
        // Interrupt and resume once in another run: same result.
        let mut half = VerifyHarness::new(seed, a.clone(), b.clone(), 0);
        while half.vs.progress().done_blocks < 6000 {
            half.step();
        }
        let resume = half.vs.resume_sector();
        half.vs.connection_lost();
        let mut rest = VerifyHarness::new(seed + 1, a.clone(), b.clone(), resume);
        rest.run(600_000);
        {
            let h = &v;
            let found: Vec<u64> = (0..h.abm.blocks()).filter(|&x| h.abm.is_set(x)).collect();
            assert_eq!(
                found,
                bad.iter().copied().collect::<Vec<_>>(),
                "seed {seed}"
            );
            assert_eq!(
                h.abm.words(),
                h.bbm.words(),
                "both sides mark the same blocks"
            );
            let p = h.vs.progress();
            assert_eq!(p.out_of_sync_blocks, bad.len() as u64);
            assert_eq!(p.done_blocks, SECTORS.div_ceil(8));
            assert!(p.ranges.contains(&(5000 * 8, 16)));
            assert_eq!(h.vp.progress().out_of_sync_blocks, bad.len() as u64);
        }
        let mut both = half.abm.clone();
        for x in 0..both.blocks() {
            if rest.abm.is_set(x) {
                both.mark_blocks(x, 1);
            }
        }
        assert_eq!(
            both.count(),
            bad.len() as u64,
            "resumed verify: seed {seed}"
        );
        assert!(resume > 0);
        // The next resync (a is the source) repairs exactly those blocks.
        let s = Setup::new(seed, SECTORS);
        let mut p = Pair::new(s, &v.bbm, Some(b), Some(a));
        p.run_to_finish(600_000);
        p.assert_clean(&v.bbm);
        assert_eq!(p.data_bytes, bad.len() as u64 * BS);
    }
}

/// VerifyS on disk `a`, VerifyT on disk `b`, through the codec with random delays.
struct VerifyHarness {
    rng: StdRng,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), VEv>,
    ctx: WireCtx,
    vs: VerifySource,
    vp: VerifyPeer,
    a: Disk,
    b: Disk,
    abm: OutOfSync,
    bbm: OutOfSync,
    done: bool,
}

enum VEv {
    Tick,
    ToPeer(Packet),
    ToSource(Packet),
    ARead(u64, u64, u32),
    BRead(u64, u64, u32),
}

impl VerifyHarness {
    fn new(seed: u64, a: Disk, b: Disk, start: u64) -> Self {
        let mut cfg = VerifyConfig::new(SECTORS);
        cfg.start_sector = start;
        let mut h = VerifyHarness {
            rng: StdRng::seed_from_u64(seed),
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            ctx: WireCtx::new(101, ff::PRO_FEATURES_84).unwrap(),
            vs: VerifySource::new(cfg, &TickInput::default()).unwrap(),
            vp: VerifyPeer::new(cfg).unwrap(),
            abm: OutOfSync::new(SECTORS),
            bbm: OutOfSync::new(SECTORS),
            a,
            b,
            done: false,
        };
        h.at(100, VEv::Tick);
        h
    }

    fn at(&mut self, d: u64, e: VEv) {
        self.seq += 1;
        self.events.insert((self.now + d, self.seq), e);
    }

    fn wire(&mut self, p: &Packet) -> Packet {
        let mut buf = Vec::new();
        encode(p, &self.ctx, 0, &mut buf).unwrap();
        decode_frame(&buf, &self.ctx).unwrap().unwrap().packet
    }

    fn pump(&mut self) {
        let outs: Vec<VerifyOutput> = self.vs.drain_outputs().collect();
        for o in outs {
            if let Some(p) = o.packet() {
                let p = self.wire(&p);
                let d = self.rng.gen_range(0..20);
                self.at(d, VEv::ToPeer(p));
                continue;
            }
            match o {
                VerifyOutput::ReadForDigest { tag, sector, len } => {
                    let d = self.rng.gen_range(0..5);
                    self.at(d, VEv::ARead(tag, sector, len));
                }
                VerifyOutput::OutOfSync { sector, len } => self.abm.mark(sector, len),
                VerifyOutput::Finished(_) => self.done = true,
                _ => unreachable!(),
            }
        }
        let outs: Vec<VerifyOutput> = self.vp.drain_outputs().collect();
        for o in outs {
            if let Some(p) = o.packet() {
                let p = self.wire(&p);
                let d = self.rng.gen_range(0..20);
                self.at(d, VEv::ToSource(p));
                continue;
            }
            match o {
                VerifyOutput::ReadForDigest { tag, sector, len } => {
                    let d = self.rng.gen_range(0..5);
                    self.at(d, VEv::BRead(tag, sector, len));
                }
                VerifyOutput::OutOfSync { sector, len } => self.bbm.mark(sector, len),
                VerifyOutput::Finished(_) => {}
                _ => unreachable!(),
            }
        }
    }

    fn step(&mut self) {
        let ((t, _), e) = self.events.pop_first().unwrap();
        self.now = t;
        match e {
            VEv::Tick => {
                self.vs.tick(&TickInput {
                    now_ms: t,
                    ..TickInput::default()
                });
                self.at(100, VEv::Tick);
            }
            VEv::ToPeer(p) => match Inbound::from_packet(&p).unwrap() {
                Some(Inbound::OvRequest { sector, len }) => {
                    if self.vp.can_accept() {
                        self.vp.ov_request(sector, len).unwrap();
                    } else {
                        self.at(1, VEv::ToPeer(p));
                    }
                }
                Some(Inbound::OvResult {
                    sector,
                    len,
                    in_sync,
                }) => self.vp.ov_result(sector, len, in_sync).unwrap(),
                o => panic!("{o:?}"),
            },
            VEv::ToSource(p) => match Inbound::from_packet(&p).unwrap() {
                Some(Inbound::OvReply {
                    sector,
                    len,
                    digest,
                }) => self.vs.ov_reply(sector, len, digest).unwrap(),
                o => panic!("{o:?}"),
            },
            VEv::ARead(tag, sector, len) => {
                let d = Digest::of(&self.a.read(sector, len).0);
                self.vs.digest_done(tag, Some(d)).unwrap();
            }
            VEv::BRead(tag, sector, len) => {
                let d = Digest::of(&self.b.read(sector, len).0);
                self.vp.digest_done(tag, Some(d)).unwrap();
            }
        }
        self.pump();
    }

    fn run(&mut self, limit: u64) {
        while !self.done || !self.vp.progress().finished {
            assert!(self.now < limit, "verify did not finish");
            self.step();
        }
    }
}

#[test]
fn source_holds_reads_behind_local_writes_and_answers_by_kind() {
    let mut s = Source::new(
        SourceConfig {
            thin: true,
            ..SourceConfig::new(1 << 20)
        },
        &TickInput::default(),
    )
    .unwrap();
    s.app_write_begin(7, 8, 4096).unwrap();
    s.request(0, 8192, RequestKind::Data).unwrap();
    s.request(64, 4096, RequestKind::Thin).unwrap();
    let outs: Vec<SourceOutput> = s.drain_outputs().collect();
    // The first overlaps write 7 and waits; the second goes.
    assert_eq!(outs.len(), 1);
    let SourceOutput::ReadLocal {
        tag,
        sector: 64,
        zero_check: true,
        digest: false,
        ..
    } = outs[0]
    else {
        panic!("{outs:?}")
    };
    s.read_done(
        tag,
        ReadOutcome::Ok {
            all_zero: true,
            digest: None,
        },
    )
    .unwrap();
    assert_eq!(
        s.drain_outputs().collect::<Vec<_>>(),
        vec![SourceOutput::SendRsDeallocated {
            sector: 64,
            len: 4096
        }]
    );
    s.app_write_end(7).unwrap();
    let outs: Vec<SourceOutput> = s.drain_outputs().collect();
    let SourceOutput::ReadLocal {
        tag,
        sector: 0,
        zero_check: false,
        ..
    } = outs[0]
    else {
        panic!("{outs:?}")
    };
    // A plain request over zeroes is answered with data (see the module docs).
    s.read_done(
        tag,
        ReadOutcome::Ok {
            all_zero: true,
            digest: None,
        },
    )
    .unwrap();
    assert!(matches!(
        s.drain_outputs().next(),
        Some(SourceOutput::SendRsDataReply { sector: 0, .. })
    ));
    // Csum: equal → in sync; different → data; failed → neg reply.
    let d = Digest::of(b"a");
    for (outcome, want) in [
        (
            ReadOutcome::Ok {
                all_zero: false,
                digest: Some(d),
            },
            "in sync",
        ),
        (
            ReadOutcome::Ok {
                all_zero: false,
                digest: Some(Digest::of(b"b")),
            },
            "data",
        ),
        (ReadOutcome::Failed, "neg"),
    ] {
        s.request(128, 4096, RequestKind::Csum(d)).unwrap();
        let Some(SourceOutput::ReadLocal {
            tag, digest: true, ..
        }) = s.drain_outputs().next()
        else {
            panic!()
        };
        s.read_done(tag, outcome).unwrap();
        let outs: Vec<SourceOutput> = s.drain_outputs().collect();
        match want {
            "in sync" => assert_eq!(
                outs,
                vec![
                    SourceOutput::SetInSync {
                        sector: 128,
                        len: 4096
                    },
                    SourceOutput::SendRsIsInSync {
                        sector: 128,
                        len: 4096
                    }
                ]
            ),
            "data" => assert!(matches!(outs[..], [SourceOutput::SendRsDataReply { .. }])),
            _ => assert_eq!(
                outs,
                vec![SourceOutput::SendNegRsDReply {
                    sector: 128,
                    len: 4096
                }]
            ),
        }
    }
    // Hostile ranges are protocol errors.
    assert_eq!(
        s.request(u64::MAX - 4, 4096, RequestKind::Data),
        Err(Error::Protocol("resync request range"))
    );
    assert!(s.request(0, 2 << 20, RequestKind::Data).is_err());
    assert!(s.request((1 << 20) - 4, 4096, RequestKind::Data).is_err());
    assert!(s.read_done(12345, ReadOutcome::Failed).is_err());
}

#[test]
fn target_refuses_replies_it_did_not_ask_for() {
    let mut bm = OutOfSync::new(1 << 16);
    bm.mark(0, 8192);
    let mut t = Target::new(TargetConfig::new(1 << 16), &bm, &TickInput::default()).unwrap();
    assert!(t.data_reply(&bm, 0, 8192).is_err());
    t.tick(&bm, &TickInput::default());
    assert_eq!(t.drain_outputs().count(), 1);
    assert!(t.data_reply(&bm, 0, 4096).is_err(), "wrong length");
    assert!(t.in_sync_reply(&mut bm, 8, 4096).is_err(), "wrong sector");
    let tag = t.data_reply(&bm, 0, 8192).unwrap().unwrap();
    assert!(t.data_reply(&bm, 0, 8192).is_err(), "answered twice");
    assert!(
        t.write_done(&mut bm, tag ^ (1 << 40), true).is_err(),
        "forged tag"
    );
    t.write_done(&mut bm, tag, true).unwrap();
    assert!(t.write_done(&mut bm, tag, true).is_err(), "stale tag");
    let outs: Vec<TargetOutput> = t.drain_outputs().collect();
    assert_eq!(
        outs[0],
        TargetOutput::SendRsWriteAck {
            sector: 0,
            len: 8192
        }
    );
    assert!(matches!(outs[1], TargetOutput::Finished(_)));
    assert!(t.app_write_end(3).is_err());
    assert!(t.app_write_begin(1, (1 << 16) - 4, 4096).is_err());
}

/// A SyncTarget Primary's write that the peer failed (`P_NEG_ACK`): this side has the
/// newer data, so the run neither fetches the range nor sends reads of it to the peer,
/// and it ends as a success with the bits still set (this node resyncs them to the peer
/// later). Without `peer_lacks` the walk would fetch the peer's older block over it.
#[test]
fn a_range_the_peer_lacks_is_not_fetched_and_outlives_the_run() {
    let mut bm = OutOfSync::new(1 << 16);
    bm.mark(0, 8192); // blocks 0, 1: to fetch
    let mut t = Target::new(TargetConfig::new(1 << 16), &bm, &TickInput::default()).unwrap();
    // The application writes block 10; the peer answers P_NEG_ACK: the core marks it.
    bm.mark(80, 4096);
    assert!(
        t.must_read_remotely(&bm, 80, 4096),
        "before the peer is known to lack it"
    );
    t.peer_lacks(80, 4096);
    assert!(!t.must_read_remotely(&bm, 80, 4096));
    assert!(t.must_read_remotely(&bm, 0, 4096));
    assert!(
        t.must_read_remotely(&bm, 0, 128 << 10),
        "a read spanning both"
    );
    assert_eq!(t.progress(&bm).left_blocks, 2);
    t.tick(&bm, &TickInput::default());
    let asked: Vec<TargetOutput> = t.drain_outputs().collect();
    assert_eq!(
        asked,
        vec![TargetOutput::SendRsDataRequest {
            sector: 0,
            len: 8192,
            thin: false
        }]
    );
    let tag = t.data_reply(&bm, 0, 8192).unwrap().unwrap();
    t.write_done(&mut bm, tag, true).unwrap();
    let outs: Vec<TargetOutput> = t.drain_outputs().collect();
    let Some(TargetOutput::Finished(sum)) = outs.last() else {
        panic!("{outs:?}");
    };
    assert_eq!((sum.left_blocks, sum.failed_blocks), (0, 0));
    assert!(
        bm.is_set(10) && bm.count() == 1,
        "the lacking block stays out of sync"
    );
    // A second tick asks for nothing more.
    t.tick(&bm, &TickInput::default());
    assert_eq!(t.drain_outputs().count(), 0);
}

/// Whether block 0's bit is still set in its page's disk image after a resync write of it
/// completed (`flushed`: and a flush issued after it completed).
fn resynced_block_on_disk(sabotage: bool, flushed: bool) -> bool {
    let mut bm = OutOfSync::new(1 << 16);
    bm.mark(0, 8192);
    bm.sabotage_image_without_unflushed = sabotage;
    let mut t = Target::new(TargetConfig::new(1 << 16), &bm, &TickInput::default()).unwrap();
    t.tick(&bm, &TickInput::default());
    let _ = t.drain_outputs().count();
    let tag = t.data_reply(&bm, 0, 8192).unwrap().unwrap();
    t.write_done(&mut bm, tag, true).unwrap();
    assert_eq!(bm.count(), 0, "clear in memory at once");
    if flushed {
        let id = bm.begin_flush().unwrap();
        bm.flush_done(id, true);
    }
    bm.page_bytes(0)[0] & 1 != 0
}

/// A resync write completes before its data is durable: until a flush covers it, every
/// bitmap page written (an activity-log eviction writes pages without a flush first)
/// keeps its bit set, or a crash would leave a stale block no resync fetches again.
#[test]
fn a_resynced_block_stays_out_of_sync_on_disk_until_flushed() {
    assert!(resynced_block_on_disk(false, false));
    assert!(!resynced_block_on_disk(false, true));
    // Sabotage: an image without the unflushed clears is caught.
    assert!(!resynced_block_on_disk(true, false));
}

/// Hostile or buggy input never panics and never corrupts a machine's bounds: random calls
/// with random ranges, tags and ids, interleaved with ticks.
#[test]
fn random_inputs_return_errors_never_panic() {
    let mut rng = StdRng::seed_from_u64(140);
    let sectors = 3 * EXTENT_BLOCKS * 8 + 5;
    let pick_sector = |rng: &mut StdRng| match rng.gen_range(0..4) {
        0 => rng.gen::<u64>(),
        1 => sectors - rng.gen_range(0..16),
        _ => rng.gen_range(0..sectors) / 8 * 8,
    };
    let pick_len = |rng: &mut StdRng| match rng.gen_range(0..4) {
        0 => rng.gen::<u32>(),
        1 => 0,
        _ => rng.gen_range(1..=256u32) * 4096,
    };
    for round in 0..20 {
        let mut bm = OutOfSync::new(sectors);
        bm.mark_blocks(rng.gen_range(0..1000), rng.gen_range(0..100_000));
        let mut cfg = TargetConfig::new(sectors);
        cfg.csums = round % 2 == 0;
        cfg.max_requests = 64;
        cfg.max_app_writes = 16;
        let mut t = Target::new(cfg, &bm, &TickInput::default()).unwrap();
        let mut s = Source::new(
            SourceConfig {
                max_queue: 8,
                max_reads: 4,
                max_app_writes: 8,
                thin: true,
                ..SourceConfig::new(sectors)
            },
            &TickInput::default(),
        )
        .unwrap();
        let mut vs = VerifySource::new(VerifyConfig::new(sectors), &TickInput::default()).unwrap();
        let mut vp = VerifyPeer::new(VerifyConfig {
            max_requests: 8,
            max_reads: 2,
            ..VerifyConfig::new(sectors)
        })
        .unwrap();
        let mut tags: Vec<u64> = vec![0, u64::MAX];
        for i in 0..3000u64 {
            let (sec, len) = (pick_sector(&mut rng), pick_len(&mut rng));
            let tag = tags[rng.gen_range(0..tags.len())] ^ rng.gen_range(0..2);
            let d = Digest(rng.gen());
            let now = i * 10;
            let input = TickInput {
                now_ms: now,
                ..TickInput::default()
            };
            match rng.gen_range(0..22) {
                0 => t.tick(&bm, &input),
                1 => {
                    let _ = t.data_reply(&bm, sec, len);
                }
                2 => {
                    let _ = t.deallocated(&bm, sec, len);
                }
                3 => {
                    let _ = t.in_sync_reply(&mut bm, sec, len);
                }
                4 => {
                    let _ = t.neg_reply(&bm, sec, len);
                }
                5 => {
                    let _ = t.write_done(&mut bm, tag, rng.gen());
                }
                6 => {
                    let _ = t.digest_done(&bm, tag, rng.gen::<bool>().then_some(d));
                }
                7 => {
                    let _ = t.app_write_begin(rng.gen_range(0..32), sec, len);
                }
                8 => {
                    let _ = t.app_write_end(rng.gen_range(0..32));
                }
                9 => {
                    t.set_in_sync(&mut bm, sec, len);
                    t.mark_out_of_sync(&mut bm, sec, len);
                    t.peer_lacks(sec, len);
                    let _ = t.must_read_remotely(&bm, sec, len);
                }
                10 => {
                    let kind = [RequestKind::Data, RequestKind::Thin, RequestKind::Csum(d)]
                        [rng.gen_range(0..3)];
                    let _ = s.request(sec, len, kind);
                }
                11 => {
                    let _ = s.read_done(tag, ReadOutcome::Failed);
                    let _ = s.read_done(
                        tag,
                        ReadOutcome::Ok {
                            all_zero: rng.gen(),
                            digest: Some(d),
                        },
                    );
                }
                12 => {
                    let _ = s.rs_write_ack(sec, len);
                    let _ = s.neg_ack(sec, len);
                }
                13 => {
                    let _ = s.app_write_begin(rng.gen_range(0..16), sec, len);
                    let _ = s.app_write_end(rng.gen_range(0..16));
                }
                14 => s.tick(&TickInput {
                    now_ms: now,
                    app_io_sectors: i * 100,
                    ..TickInput::default()
                }),
                15 => vs.tick(&input),
                16 => {
                    let _ = vs.ov_reply(sec, len, d);
                    let _ = vs.digest_done(tag, Some(d));
                }
                17 => {
                    let _ = vp.ov_request(sec, len);
                    let _ = vp.ov_result(sec, len, rng.gen());
                    let _ = vp.digest_done(tag, None);
                }
                18 => {
                    let _ = t.cancel_reply(&bm, sec, len);
                    if rng.gen_range(0..50) == 0 {
                        t.pause(now);
                    } else {
                        t.resume(now);
                    }
                }
                19 if rng.gen_range(0..200) == 0 => {
                    t.connection_lost();
                    s.connection_lost();
                    vs.connection_lost();
                }
                _ => {
                    let _ = vs.app_write_begin(rng.gen_range(0..8), sec, len);
                    let _ = vs.app_write_end(rng.gen_range(0..8));
                }
            }
            // Learn the tags the machines hand out, so some calls hit live ones.
            let touts: Vec<TargetOutput> = t.drain_outputs().collect();
            for o in touts {
                if let TargetOutput::ReadForDigest { tag, .. }
                | TargetOutput::WriteZeroes { tag, .. } = o
                {
                    tags.push(tag);
                }
                if let TargetOutput::SendRsDataRequest { sector, len, .. } = o {
                    if let Ok(Some(tag)) = t.data_reply(&bm, sector, len) {
                        tags.push(tag);
                    }
                }
            }
            for o in s.drain_outputs() {
                if let SourceOutput::ReadLocal { tag, .. } = o {
                    tags.push(tag);
                }
            }
            for o in vs.drain_outputs() {
                if let VerifyOutput::ReadForDigest { tag, .. } = o {
                    tags.push(tag);
                }
            }
            for o in vp.drain_outputs() {
                if let VerifyOutput::ReadForDigest { tag, .. } = o {
                    tags.push(tag);
                }
            }
            if tags.len() > 256 {
                tags.drain(..128);
            }
            let p = t.progress(&bm);
            assert!(p.requests_in_flight <= 64);
            assert!(s.stats().queued + s.stats().reading <= 8 && s.stats().reading <= 4);
        }
    }
}

#[test]
fn marks_outside_the_device_leave_the_position_inside() {
    let mut bm = OutOfSync::new(800);
    let mut t = Target::new(TargetConfig::new(800), &bm, &TickInput::default()).unwrap();
    t.tick(&bm, &TickInput::default());
    assert!(t.is_finished());
    t.mark_out_of_sync(&mut bm, u64::MAX - 7, 4096);
    assert_eq!(t.resume_position(), 100);
    assert_eq!(bm.count(), 0);
}

/// The source's c-min-rate check: once resync runs faster than c-min-rate and the
/// application is busy, at most one read starts per step (DRBD sleeps 100 ms per request).
#[test]
fn a_throttled_source_starts_one_read_per_step() {
    let sectors = 1 << 20;
    let mut s = Source::new(
        SourceConfig {
            c_min_rate: 250,
            max_queue: 4096,
            max_reads: 64,
            ..SourceConfig::new(sectors)
        },
        &TickInput::default(),
    )
    .unwrap();
    let mut next = 0u64;
    let mut reads_per_step = Vec::new();
    for step in 1..=100u64 {
        let busy = step > 60;
        s.tick(&TickInput {
            now_ms: step * 100,
            app_io_sectors: if busy { step * 1000 } else { 0 },
            ..TickInput::default()
        });
        // The target keeps 20 requests of 64 KiB coming per step (12.5 MiB/s).
        for _ in 0..20 {
            if s.can_accept() {
                s.request(next % (sectors - 128), 65_536, RequestKind::Data)
                    .unwrap();
                next += 128;
            }
        }
        let tags: Vec<u64> = s
            .drain_outputs()
            .filter_map(|o| match o {
                SourceOutput::ReadLocal { tag, .. } => Some(tag),
                _ => None,
            })
            .collect();
        reads_per_step.push(tags.len());
        for tag in tags {
            s.read_done(
                tag,
                ReadOutcome::Ok {
                    all_zero: false,
                    digest: None,
                },
            )
            .unwrap();
            s.drain_outputs().for_each(drop);
        }
    }
    assert!(
        reads_per_step[10..60].iter().all(|&n| n >= 20),
        "{reads_per_step:?}"
    );
    assert!(
        reads_per_step[65..].iter().all(|&n| n <= 1),
        "{reads_per_step:?}"
    );
    assert!(s.stats().throttled_steps >= 30);
    // The peer is Primary: never throttled.
    s.set_peer_primary(true);
    s.tick(&TickInput {
        now_ms: 10_100,
        app_io_sectors: 1 << 30,
        ..TickInput::default()
    });
    assert!(s.drain_outputs().count() > 1);
}

#[test]
fn verify_waits_at_an_extent_with_a_write_in_flight() {
    let sectors = 2 * EXTENT_BLOCKS * 8;
    let mut v = VerifySource::new(VerifyConfig::new(sectors), &TickInput::default()).unwrap();
    v.app_write_begin(1, 8, 4096).unwrap();
    v.tick(&TickInput::default());
    assert_eq!(v.drain_outputs().count(), 0);
    v.app_write_end(1).unwrap();
    v.tick(&TickInput {
        now_ms: 100,
        ..TickInput::default()
    });
    let outs: Vec<VerifyOutput> = v.drain_outputs().collect();
    assert!(!outs.is_empty());
    assert_eq!(
        outs[0],
        VerifyOutput::SendOvRequest {
            sector: 0,
            len: 4096
        }
    );
    assert!(v.app_write_begin(2, sectors, 512).is_err());
}
