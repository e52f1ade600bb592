//! Online verify (`verify-alg`): both sides digest every 4 KiB block from a start sector
//! on and compare; differing blocks are counted, reported as ranges, and marked out of
//! sync on both sides, so that the next resync (after a disconnect/connect) repairs them.
//! Verify itself changes no data and starts no resync (DRBD's verify end leaves the UUIDs
//! alone).
//!
//! The side that runs `tandem verify` is the [`VerifySource`] (DRBD's VerifyS,
//! `make_ov_request`, `w_e_end_ov_reply`); its peer runs a [`VerifyPeer`] (VerifyT,
//! `w_e_end_ov_req`, `got_OVResult`):
//!
//! 1. every controller step, VerifyS sends `P_OV_REQUEST`s of one block each (as DRBD
//!    does: verify never merges), from its position on, as many as the [`Controller`]
//!    grants; the first one tells the peer where verify starts (agreed ≥ 90);
//! 2. VerifyT reads the block, digests it and answers `P_OV_REPLY` + digest (a zero digest
//!    if its read failed, as DRBD sends);
//! 3. VerifyS reads and digests its own block, compares, marks a difference (or its own
//!    read failure) out of sync and answers `P_OV_RESULT` with `block_id` `ID_IN_SYNC`
//!    (4711) or `ID_OUT_OF_SYNC` (4712); VerifyT marks the block too.
//!
//! VerifyS does not send a request into a 16 MiB extent with an application write in
//! flight (it waits there, DRBD's `drbd_try_rs_begin_io` in `make_ov_request`); a write
//! that lands while a block is being compared can only make it look different, which
//! costs a needless resync of that block, never a missed one. The position
//! ([`VerifySource::resume_sector`]) is where an interrupted verify continues.
//!
//! Bounds: `max_requests` blocks in flight (and the controller's `max-buffers/2`), the
//! peer's `max_queue` requests, [`MAX_REPORTED_RANGES`] reported ranges (more are counted,
//! not listed).

use std::collections::{BTreeMap, VecDeque};

use super::controller::{Controller, RateConfig, SyncMarks};
use super::slab::Slab;
use super::{check_peer_range, Digest, Error, ExtentCounts, TickInput, SECT_PER_BLOCK};
use crate::request::SECTOR;

/// Out-of-sync ranges listed in a verify report; more are counted only.
pub const MAX_REPORTED_RANGES: usize = 4096;

/// Configuration of a [`VerifySource`] or a [`VerifyPeer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyConfig {
    /// Volume size in sectors.
    pub sectors: u64,
    /// First sector to verify (rounded down to 4 KiB; a resumed verify's
    /// [`VerifySource::resume_sector`]).
    pub start_sector: u64,
    /// Stop before this sector (`None`: the end of the device).
    pub stop_sector: Option<u64>,
    /// The rate controller's settings (VerifyS).
    pub rate: RateConfig,
    /// Blocks in flight (VerifyS) or requests queued and reading (VerifyT).
    pub max_requests: usize,
    /// Local reads in flight (VerifyT).
    pub max_reads: usize,
}

impl VerifyConfig {
    /// The whole device, tandem's rate settings, 8192 requests, 64 reads.
    pub fn new(sectors: u64) -> Self {
        VerifyConfig {
            sectors,
            start_sector: 0,
            stop_sector: None,
            rate: RateConfig::TANDEM,
            max_requests: 8192,
            max_reads: 64,
        }
    }
}

/// Differing ranges found so far, adjacent ones merged whatever the order the results
/// came in (DRBD merges only consecutive results, `ov_last_oos_*`).
#[derive(Debug, Clone, Default)]
struct Found {
    /// First sector → sectors.
    ranges: BTreeMap<u64, u64>,
    blocks: u64,
    overflow: bool,
}

impl Found {
    fn add(&mut self, sector: u64, len: u32) {
        let mut start = sector;
        let mut end = sector + u64::from(len / SECTOR);
        self.blocks += u64::from(len).div_ceil(4096);
        let mut merged = false;
        if let Some((&s, &n)) = self.ranges.range(..=start).next_back() {
            if s + n >= start {
                start = s;
                end = end.max(s + n);
                self.ranges.remove(&s);
                merged = true;
            }
        }
        while let Some((&s, &n)) = self.ranges.range(start..=end).next() {
            end = end.max(s + n);
            self.ranges.remove(&s);
            merged = true;
        }
        if !merged && self.ranges.len() >= MAX_REPORTED_RANGES {
            self.overflow = true;
            return;
        }
        self.ranges.insert(start, end - start);
    }

    fn list(&self) -> Vec<(u64, u64)> {
        self.ranges.iter().map(|(&s, &n)| (s, n)).collect()
    }
}

/// Progress and result of a verify run (either side).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct VerifyProgress {
    /// Blocks to verify from the start to the stop sector.
    pub total_blocks: u64,
    /// Blocks compared so far.
    pub done_blocks: u64,
    /// Blocks found different.
    pub out_of_sync_blocks: u64,
    /// The differing ranges, (first sector, sectors), ascending, adjacent ones merged; at
    /// most [`MAX_REPORTED_RANGES`].
    pub ranges: Vec<(u64, u64)>,
    /// More ranges were found than listed.
    pub ranges_truncated: bool,
    /// Rate over the status window, KiB/s.
    pub rate_kib: u64,
    /// Seconds to go at that rate.
    pub eta_secs: Option<u64>,
    /// Where a resumed verify would start (VerifyS).
    pub resume_sector: u64,
    /// The run is over.
    pub finished: bool,
}

/// What a verify machine asks its driver to do. VerifyS ([`VerifySource`]) sends
/// `P_OV_REQUEST` and `P_OV_RESULT`, VerifyT ([`VerifyPeer`]) `P_OV_REPLY`; both read,
/// mark and finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutput {
    /// VerifyS: send `P_OV_REQUEST` (`block_id` = `ID_SYNCER`).
    SendOvRequest {
        /// First sector.
        sector: u64,
        /// Bytes (4 KiB, less at the device's end).
        len: u32,
    },
    /// VerifyT: send `P_OV_REPLY` (`block_id` = `ID_SYNCER`) with the digest.
    SendOvReply {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
        /// The block's digest ([`Digest::READ_FAILED`] if the read failed).
        digest: Digest,
    },
    /// VerifyS: send `P_OV_RESULT` (meta socket; `block_id` 4711 if `in_sync`, else
    /// 4712).
    SendOvResult {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
        /// The digests matched.
        in_sync: bool,
    },
    /// Read the local block and compute its digest; report `digest_done` of the machine.
    ReadForDigest {
        /// Handle to pass back.
        tag: u64,
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// Mark the range out of sync in this node's bitmap (and log it).
    OutOfSync {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// The run is over (emitted once): VerifyS when every block has its result, VerifyT
    /// when every block from its start sector on has.
    Finished(VerifyProgress),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OvPhase {
    Outstanding,
    Digesting(Digest),
}

#[derive(Debug, Clone, Copy)]
struct OvReq {
    sector: u64,
    len: u32,
    phase: OvPhase,
    orphan: bool,
}

/// VerifyS. See the module docs.
#[derive(Debug)]
pub struct VerifySource {
    cfg: VerifyConfig,
    ctl: Controller,
    marks: SyncMarks,
    reqs: Slab<OvReq>,
    by_sector: BTreeMap<u64, u64>,
    app_extents: ExtentCounts,
    apps: std::collections::HashMap<u64, (u64, u32)>,
    position: u64,
    stop: u64,
    total_blocks: u64,
    done_blocks: u64,
    sect_in: u64,
    in_flight_sectors: u64,
    found: Found,
    connected: bool,
    finished: bool,
    last_now: u64,
    outputs: Vec<VerifyOutput>,
}

impl VerifySource {
    /// A verify run from `cfg.start_sector`.
    pub fn new(cfg: VerifyConfig, start: &TickInput) -> Result<Self, Error> {
        if cfg.max_requests == 0 {
            return Err(Error::Invalid("bounds must be non-zero"));
        }
        let ctl = Controller::new(cfg.rate).map_err(|_| Error::Invalid("rate settings"))?;
        let position = (cfg.start_sector / SECT_PER_BLOCK * SECT_PER_BLOCK).min(cfg.sectors);
        let stop = cfg.stop_sector.unwrap_or(cfg.sectors).min(cfg.sectors);
        let total_blocks = stop.saturating_sub(position).div_ceil(SECT_PER_BLOCK);
        Ok(VerifySource {
            marks: SyncMarks::new(total_blocks, start.now_ms),
            reqs: Slab::new(cfg.max_requests),
            by_sector: BTreeMap::new(),
            app_extents: ExtentCounts::default(),
            apps: std::collections::HashMap::new(),
            position,
            stop,
            total_blocks,
            done_blocks: 0,
            sect_in: 0,
            in_flight_sectors: 0,
            found: Found::default(),
            connected: true,
            finished: false,
            last_now: start.now_ms,
            outputs: Vec::new(),
            ctl,
            cfg,
        })
    }

    /// The outputs of the last calls, in order.
    pub fn drain_outputs(&mut self) -> std::vec::Drain<'_, VerifyOutput> {
        self.outputs.drain(..)
    }

    /// Where a resumed verify starts: the first block without a result.
    pub fn resume_sector(&self) -> u64 {
        self.reqs
            .iter()
            .map(|(_, r)| r.sector)
            .fold(self.position, u64::min)
    }

    /// The run is over.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Progress and the ranges found so far.
    pub fn progress(&self) -> VerifyProgress {
        let left = self.total_blocks.saturating_sub(self.done_blocks);
        VerifyProgress {
            total_blocks: self.total_blocks,
            done_blocks: self.done_blocks,
            out_of_sync_blocks: self.found.blocks,
            ranges: self.found.list(),
            ranges_truncated: self.found.overflow,
            rate_kib: self.marks.rate_kib(left, self.last_now),
            eta_secs: self.marks.eta_secs(left, self.last_now),
            resume_sector: self.resume_sector(),
            finished: self.finished,
        }
    }

    /// A local write is in flight (verify waits at its 16 MiB extent).
    pub fn app_write_begin(&mut self, id: u64, sector: u64, len: u32) -> Result<(), Error> {
        if self.apps.contains_key(&id) {
            return Err(Error::Invalid("app write id already tracked"));
        }
        if crate::request::check_range(sector, len, self.cfg.sectors).is_none() {
            return Err(Error::Invalid(
                "app write empty, unaligned or beyond the device",
            ));
        }
        if self.apps.len() >= self.cfg.max_requests {
            return Err(Error::Busy);
        }
        self.apps.insert(id, (sector, len));
        self.app_extents.add(sector, len);
        Ok(())
    }

    /// The local write `id` completed.
    pub fn app_write_end(&mut self, id: u64) -> Result<(), Error> {
        let (s, l) = self
            .apps
            .remove(&id)
            .ok_or(Error::Invalid("app_write_end: unknown id"))?;
        self.app_extents.remove(s, l);
        Ok(())
    }

    /// One controller step: send as many one-block requests as granted.
    pub fn tick(&mut self, input: &TickInput) {
        self.last_now = input.now_ms;
        let left = self.total_blocks.saturating_sub(self.done_blocks);
        self.marks.advance(left, input.now_ms, false);
        if self.finished || !self.connected {
            return;
        }
        let sect_in = std::mem::take(&mut self.sect_in);
        let step = self.ctl.step(sect_in, self.in_flight_sectors);
        if input.congested {
            return;
        }
        for _ in 0..step.blocks {
            if self.position >= self.stop || self.reqs.is_full() {
                break;
            }
            let sector = self.position;
            if self.app_extents.any(sector, 4096) {
                break;
            }
            let end = (sector + SECT_PER_BLOCK).min(self.cfg.sectors);
            let len = u32::try_from((end - sector) * u64::from(SECTOR)).unwrap_or(4096);
            let Some(tag) = self.reqs.insert(OvReq {
                sector,
                len,
                phase: OvPhase::Outstanding,
                orphan: false,
            }) else {
                break;
            };
            self.by_sector.insert(sector, tag);
            self.in_flight_sectors += u64::from(len / SECTOR);
            self.position = end;
            self.outputs
                .push(VerifyOutput::SendOvRequest { sector, len });
        }
        self.maybe_finish();
    }

    /// `P_OV_REPLY` with the peer's digest.
    pub fn ov_reply(&mut self, sector: u64, len: u32, digest: Digest) -> Result<(), Error> {
        let tag = *self
            .by_sector
            .get(&sector)
            .ok_or(Error::Protocol("P_OV_REPLY for no request"))?;
        let r = self
            .reqs
            .get_mut(tag)
            .filter(|r| r.phase == OvPhase::Outstanding && r.len == len)
            .ok_or(Error::Protocol("P_OV_REPLY does not match its request"))?;
        r.phase = OvPhase::Digesting(digest);
        let sectors = u64::from(len / SECTOR);
        self.sect_in += sectors;
        self.in_flight_sectors = self.in_flight_sectors.saturating_sub(sectors);
        self.outputs
            .push(VerifyOutput::ReadForDigest { tag, sector, len });
        Ok(())
    }

    /// The local digest for `tag`: `None` if the read failed (then the block counts as
    /// different, as in DRBD).
    pub fn digest_done(&mut self, tag: u64, digest: Option<Digest>) -> Result<(), Error> {
        let r = *self
            .reqs
            .get(tag)
            .ok_or(Error::Invalid("digest_done: unknown tag"))?;
        let OvPhase::Digesting(theirs) = r.phase else {
            return Err(Error::Invalid("digest_done: no read in flight"));
        };
        self.reqs.remove(tag);
        self.by_sector.remove(&r.sector);
        if r.orphan {
            return Ok(());
        }
        let in_sync = digest == Some(theirs);
        self.done_blocks += 1;
        if !in_sync {
            self.found.add(r.sector, r.len);
            self.outputs.push(VerifyOutput::OutOfSync {
                sector: r.sector,
                len: r.len,
            });
        }
        self.outputs.push(VerifyOutput::SendOvResult {
            sector: r.sector,
            len: r.len,
            in_sync,
        });
        self.maybe_finish();
        Ok(())
    }

    /// The connection is gone: unanswered requests are dropped; the run stops. Persist
    /// [`VerifySource::resume_sector`] to continue later.
    pub fn connection_lost(&mut self) {
        self.connected = false;
        let tags: Vec<(u64, OvReq)> = self.reqs.iter().map(|(t, r)| (t, *r)).collect();
        for (tag, r) in tags {
            match r.phase {
                OvPhase::Outstanding => {
                    self.position = self.position.min(r.sector);
                    self.reqs.remove(tag);
                    self.by_sector.remove(&r.sector);
                }
                OvPhase::Digesting(_) => {
                    self.position = self.position.min(r.sector);
                    if let Some(x) = self.reqs.get_mut(tag) {
                        x.orphan = true;
                    }
                }
            }
        }
    }

    fn maybe_finish(&mut self) {
        if !self.finished && self.position >= self.stop && self.reqs.len() == 0 {
            self.finished = true;
            let p = self.progress();
            self.outputs.push(VerifyOutput::Finished(p));
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct PeerRead {
    sector: u64,
    len: u32,
}

/// VerifyT. See the module docs.
#[derive(Debug)]
pub struct VerifyPeer {
    cfg: VerifyConfig,
    queue: VecDeque<PeerRead>,
    reads: Slab<PeerRead>,
    /// Blocks still without a result (`ov_left`), set by the first request.
    left: Option<u64>,
    total_blocks: u64,
    found: Found,
    finished: bool,
    outputs: Vec<VerifyOutput>,
}

impl VerifyPeer {
    /// The peer side of one verify run.
    pub fn new(cfg: VerifyConfig) -> Result<Self, Error> {
        if cfg.max_requests == 0 || cfg.max_reads == 0 {
            return Err(Error::Invalid("bounds must be non-zero"));
        }
        Ok(VerifyPeer {
            reads: Slab::new(cfg.max_reads),
            queue: VecDeque::new(),
            left: None,
            total_blocks: 0,
            found: Found::default(),
            finished: false,
            outputs: Vec::new(),
            cfg,
        })
    }

    /// The outputs of the last calls, in order.
    pub fn drain_outputs(&mut self) -> std::vec::Drain<'_, VerifyOutput> {
        self.outputs.drain(..)
    }

    /// Whether another request may be read off the data socket.
    pub fn can_accept(&self) -> bool {
        self.queue.len() + self.reads.len() < self.cfg.max_requests
    }

    /// Progress and the ranges found so far.
    pub fn progress(&self) -> VerifyProgress {
        VerifyProgress {
            total_blocks: self.total_blocks,
            done_blocks: self.total_blocks - self.left.unwrap_or(self.total_blocks),
            out_of_sync_blocks: self.found.blocks,
            ranges: self.found.list(),
            ranges_truncated: self.found.overflow,
            finished: self.finished,
            ..VerifyProgress::default()
        }
    }

    /// `P_OV_REQUEST`.
    pub fn ov_request(&mut self, sector: u64, len: u32) -> Result<(), Error> {
        check_peer_range(sector, len, self.cfg.sectors)?;
        if !self.can_accept() {
            return Err(Error::Busy);
        }
        if self.left.is_none() {
            // DRBD: the first request's sector is the verify start (ov_left = bits from it).
            let blocks = self.cfg.sectors.div_ceil(SECT_PER_BLOCK);
            let left = blocks - sector / SECT_PER_BLOCK;
            self.left = Some(left);
            self.total_blocks = left;
        }
        self.queue.push_back(PeerRead { sector, len });
        self.start_reads();
        Ok(())
    }

    fn start_reads(&mut self) {
        while !self.reads.is_full() {
            let Some(p) = self.queue.pop_front() else {
                return;
            };
            let Some(tag) = self.reads.insert(p) else {
                self.queue.push_front(p);
                return;
            };
            self.outputs.push(VerifyOutput::ReadForDigest {
                tag,
                sector: p.sector,
                len: p.len,
            });
        }
    }

    /// The local digest for `tag` (`None`: the read failed).
    pub fn digest_done(&mut self, tag: u64, digest: Option<Digest>) -> Result<(), Error> {
        let p = self
            .reads
            .remove(tag)
            .ok_or(Error::Invalid("digest_done: unknown tag"))?;
        self.outputs.push(VerifyOutput::SendOvReply {
            sector: p.sector,
            len: p.len,
            digest: digest.unwrap_or(Digest::READ_FAILED),
        });
        self.start_reads();
        Ok(())
    }

    /// `P_OV_RESULT`: `in_sync` when its `block_id` was `ID_IN_SYNC`.
    pub fn ov_result(&mut self, sector: u64, len: u32, in_sync: bool) -> Result<(), Error> {
        check_peer_range(sector, len, self.cfg.sectors)?;
        if !in_sync {
            self.found.add(sector, len);
            self.outputs.push(VerifyOutput::OutOfSync { sector, len });
        }
        if let Some(left) = self.left.as_mut() {
            *left = left.saturating_sub(1);
            if *left == 0 && !self.finished {
                self.finished = true;
                let p = self.progress();
                self.outputs.push(VerifyOutput::Finished(p));
            }
        }
        Ok(())
    }

    /// VerifyS ended the run early (a stop sector, or its state change): the run is over.
    pub fn stop(&mut self) {
        if !self.finished {
            self.finished = true;
            let p = self.progress();
            self.outputs.push(VerifyOutput::Finished(p));
        }
    }
}
