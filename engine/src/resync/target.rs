//! The SyncTarget: it walks the node's out-of-sync bitmap, asks the SyncSource for the set
//! blocks, writes what comes back, and clears the bits.
//!
//! **The bitmap is not the target's.** The node has one bitmap, owned by its driver (the
//! Primary core holds it); every call that reads or changes it borrows it (`bm`). So a
//! bit set by anyone during the run — a failed local write, a write the peer did not
//! get — is in the one bitmap the pages on disk are written from; nothing is lent, merged
//! back or written as a union. The target's own state is its requests, its cursor and its
//! skipped ranges: the ranges that failed, and the ranges the peer lacks
//! ([`Target::peer_lacks`]: a SyncTarget Primary's write the peer answered with
//! `P_NEG_ACK`; this side has the newer data, so they are neither fetched nor read from
//! the peer, and their bits outlive the run).
//!
//! **The walk** (DRBD's `make_resync_request`). Every controller step ([`Target::tick`],
//! 100 ms) the [`Controller`] grants a number of 4 KiB blocks. From the cursor the target
//! finds the next set bit and merges the set bits after it into one request while: the
//! request stays within the peer's max bio size (≤ 1 MiB), its start sector stays aligned
//! to its size (a request grows past 2^k blocks only if it starts on a 2^(k+1)-block
//! boundary, as DRBD does "to be prepared for all stripe sizes of software RAIDs"), it
//! does not cross a 16 MiB resync extent, and it stops at exactly `thin_granularity`
//! (then it goes as `P_RS_THIN_REQ`). The last request is clipped to the device. With
//! `csums` the target first reads its own range ([`TargetOutput::ReadForDigest`]) and
//! sends `P_CSUM_RS_REQUEST` with the digest the driver computed.
//!
//! **Replies.** `P_RS_DATA_REPLY` → the driver writes the data ([`Target::data_reply`]
//! returns the tag); when the write is done the bits are cleared and `P_RS_WRITE_ACK` goes
//! to the source (DRBD's `e_end_resync_block`: the target acks, the source clears its bits
//! on the ack). `P_RS_DEALLOCATED` → write zeroes, then the same. `P_RS_IS_IN_SYNC` →
//! clear the bits, no write, no ack. `P_NEG_RS_DREPLY` → the bits stay, the range counts
//! as failed and is not asked for again in this run (DRBD's `rs_failed`). A failed local
//! write → `P_NEG_ACK`, failed too. `P_RS_CANCEL` → the bits stay and the range is asked
//! for again later.
//!
//! **Resuming.** Bits are cleared only when a block is on this disk (a completed local
//! write, possibly still in a volatile cache: [`OutOfSync::clear_unflushed`], so the
//! pages' disk images keep those bits set until a flush issued after them completed),
//! and the bitmap is the driver's to persist (its dirty pages).
//! [`Target::resume_position`] is the lowest block that may still need a request (the
//! cursor, or an earlier block that
//! was skipped or whose request is still in flight); the driver persists it with the
//! bitmap and passes it as `start_block` to the next run, which starts there instead of at
//! block 0. Whatever happens, a run ends only when no set bit is left outside the failed
//! ranges: if bits remain behind the cursor (set while the walk was past them), the walk
//! goes round again from block 0 before it reports [`TargetOutput::Finished`].
//!
//! **Application writes** (`docs/design.md` §3: neither may overwrite the other's newer data).
//! The driver reports every write to this disk that is not resync's — the application's
//! own writes when this node is Primary, and the peer's replicated writes when it is
//! Secondary — with [`Target::app_write_begin`] / [`Target::app_write_end`]. The rule has
//! three parts, each the simplest thing that makes an overwrite by older data impossible:
//!
//! 1. *No request into a busy extent.* A request (or its digest read) is not issued into a
//!    16 MiB resync extent that has an application write in flight; the walk skips the
//!    extent and comes back to it later (DRBD's `drbd_try_rs_begin_io` refuses an extent
//!    with activity-log references likewise).
//! 2. *A request overtaken by a write is void.* An application write that begins while an
//!    overlapping request is in flight (digest read, or sent and unanswered) marks the
//!    request void: its reply is not written, its bits stay set, and the range is asked
//!    for again once the extent is quiet. The reply may have been read on the source
//!    before the write reached it, so writing it would put older data over the newer. The
//!    void reply is still acknowledged with `P_RS_WRITE_ACK`, which keeps a kernel
//!    source's `rs_pending` count balanced (a `P_NEG_ACK` would count a failure and leave
//!    the peer disk Inconsistent); the source clearing its bit early is harmless, because
//!    this side still has it set and bitmaps are OR-merged at every handshake.
//! 3. *A write waits for an overlapping resync write.* An application write that begins
//!    while an overlapping reply is being written locally is held
//!    ([`Target::app_write_begin`] returns `false`) until that local write completed
//!    ([`TargetOutput::AppWriteReady`]); two writes in flight to one block land in any
//!    order. This wait depends only on a local write, never on the network, so it cannot
//!    deadlock (DRBD's `overlapping_resync_write`).
//!
//! What "in flight" means for the driver: a local application write from the moment its
//! submission is decided until it is *retired* (`PrimaryOutput::Retired`: completed and
//! its epoch barrier-acked, so it is on the peer's disk too — under protocol A/B the
//! completion alone comes before that, and a request issued in between could read the old
//! block on the source); a peer write from its arrival until its local write completed.
//! The source must, in turn, not read a range for resync while a write to it is in flight
//! on its side ([`crate::resync::Source`] holds such reads).
//!
//! Bounds: `max_requests` requests in flight in any state; the controller's `max-buffers`
//! cap on unanswered blocks; `max_app_writes` application writes tracked;
//! [`MAX_FAILED_RANGES`] failed ranges (past it the run stops with failures). The output
//! vector holds what one call produced.

use std::collections::{BTreeMap, HashMap};

use super::controller::{Controller, MinRateThrottle, RateConfig, SyncMarks};
use super::slab::Slab;
use super::{overlaps, Digest, Error, ExtentCounts, TickInput, EXTENT_BLOCKS, SECT_PER_BLOCK};
use crate::request::{OutOfSync, SECTOR};
use crate::wire::DRBD_MAX_BIO_SIZE;

/// Failed ranges remembered per run; past it the run ends with failures.
pub const MAX_FAILED_RANGES: usize = 65_536;

/// Configuration of a [`Target`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetConfig {
    /// Volume size in sectors (the bitmap's).
    pub sectors: u64,
    /// Largest request in bytes: the peer's max bio size from `P_SIZES` (and ours),
    /// rounded down to 4 KiB, at most 1 MiB.
    pub max_bio_size: u32,
    /// Checksum-based resync (`csums-alg` crc32c agreed, protocol ≥ 89).
    pub csums: bool,
    /// Largest checksum request in bytes (a multiple of 4 KiB, ≤ `max_bio_size`). DRBD
    /// merges csum requests up to the max bio size, so one differing 4 KiB block moves a
    /// whole 1 MiB request. After a crash the blocks that differ are the few writes that
    /// were in flight, scattered one by one over the activity log's extents; tandem's
    /// default of 4 KiB moves exactly those (docs/design.md's target: data ≤ 1.1× the blocks
    /// that differ) for one 108-byte request/answer pair per 4 KiB checked — 136 MB of
    /// packets for a full default activity log (4.8 GiB), 0.1 s of a 10 Gbit/s link,
    /// against ≥ 2 s to read those 4.8 GiB.
    pub csums_max_bio_size: u32,
    /// `rs-discard-granularity` in bytes when `DRBD_FF_THIN_RESYNC` is agreed, else 0:
    /// requests of exactly this size go as `P_RS_THIN_REQ`. A multiple of 4 KiB.
    pub thin_granularity: u32,
    /// The rate controller's settings.
    pub rate: RateConfig,
    /// Requests in flight in any state (digest read, sent, being written).
    pub max_requests: usize,
    /// Application writes tracked at once (in flight or held).
    pub max_app_writes: usize,
    /// Block to start the walk at (the previous run's [`Target::resume_position`]).
    pub start_block: u64,
}

impl TargetConfig {
    /// Defaults: 1 MiB requests (4 KiB with csums), no csums, no thin requests, tandem's rate
    /// settings, 8192 requests and 4096 application writes, start at block 0.
    pub fn new(sectors: u64) -> Self {
        TargetConfig {
            sectors,
            max_bio_size: DRBD_MAX_BIO_SIZE,
            csums: false,
            csums_max_bio_size: 4096,
            thin_granularity: 0,
            rate: RateConfig::TANDEM,
            max_requests: 8192,
            max_app_writes: 4096,
            start_block: 0,
        }
    }
}

/// What the target asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetOutput {
    /// Send `P_RS_DATA_REQUEST` (or `P_RS_THIN_REQ` when `thin`) with `block_id` =
    /// `ID_SYNCER`.
    SendRsDataRequest {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
        /// Send as `P_RS_THIN_REQ`.
        thin: bool,
    },
    /// Read the local range and compute its [`Digest`]; report [`Target::digest_done`].
    ReadForDigest {
        /// Handle to pass back.
        tag: u64,
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// Send `P_CSUM_RS_REQUEST` (`block_id` = `ID_SYNCER`) with the digest.
    SendCsumRsRequest {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
        /// The local range's digest.
        digest: Digest,
    },
    /// Write zeroes over the range (a discard if the device reads zeroes after one);
    /// report [`Target::write_done`].
    WriteZeroes {
        /// Handle to pass back.
        tag: u64,
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// Send `P_RS_WRITE_ACK` (meta socket, `block_id` = `ID_SYNCER`).
    SendRsWriteAck {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// Send `P_NEG_ACK` (meta socket, `block_id` = `ID_SYNCER`): the local write failed.
    SendNegAck {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// The held application write `id` may be submitted now.
    AppWriteReady {
        /// The id given to [`Target::app_write_begin`].
        id: u64,
    },
    /// The run is over (emitted once): nothing in flight, no set bit left outside the
    /// failed ranges. The driver changes state (SyncTarget → Connected) and, if
    /// `left_blocks` is 0, the disk becomes UpToDate.
    Finished(ResyncSummary),
}

/// The numbers of a finished run (what DRBD logs in `drbd_resync_finished`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ResyncSummary {
    /// Set bits when the run started.
    pub total_blocks: u64,
    /// Set bits in failed ranges.
    pub failed_blocks: u64,
    /// Set bits left (0 = the disk is now a copy of the source's; else it stays
    /// Inconsistent). More than `failed_blocks` only if the run stopped early
    /// ([`MAX_FAILED_RANGES`]).
    pub left_blocks: u64,
    /// Blocks whose digests matched (no data moved).
    pub same_csum_blocks: u64,
    /// Run time without pauses, milliseconds.
    pub active_ms: u64,
    /// Time paused, milliseconds.
    pub paused_ms: u64,
    /// Average rate over `active_ms`, KiB/s.
    pub rate_kib: u64,
}

/// Progress for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct TargetProgress {
    /// Set bits when the run started.
    pub total_blocks: u64,
    /// Set bits now (× 4 KiB = out-of-sync bytes).
    pub left_blocks: u64,
    /// Done, in per-mille of `total_blocks`.
    pub permille: u32,
    /// Set bits in failed ranges.
    pub failed_blocks: u64,
    /// Blocks found equal by digest.
    pub same_csum_blocks: u64,
    /// Requests in flight (any state).
    pub requests_in_flight: usize,
    /// Sectors requested and not answered.
    pub sectors_in_flight: u64,
    /// Requests sent (data, thin and csum).
    pub requests_sent: u64,
    /// Data bytes received in `P_RS_DATA_REPLY`.
    pub data_bytes: u64,
    /// Bytes covered by `P_RS_DEALLOCATED`.
    pub deallocated_bytes: u64,
    /// Replies not written because an application write overtook their request.
    pub void_replies: u64,
    /// Steps in which the c-min-rate check held resync back.
    pub throttled_steps: u64,
    /// The controller's rate in the last step, KiB/s (`c_sync_rate`).
    pub planned_rate_kib: u32,
    /// Resync rate over the status window (≥ 18 s), KiB/s.
    pub rate_kib: u64,
    /// Seconds to go at that rate.
    pub eta_secs: Option<u64>,
    /// Where a new run would start ([`Target::resume_position`]).
    pub resume_block: u64,
    /// Paused by the user (`pause-sync`).
    pub paused: bool,
    /// The run is over.
    pub finished: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The local read for the digest is in flight.
    Digesting,
    /// Sent; no reply yet.
    Outstanding,
    /// The reply's data (or zeroes) is being written locally.
    Writing,
}

#[derive(Debug, Clone)]
struct Req {
    sector: u64,
    len: u32,
    phase: Phase,
    /// An application write overtook it (rule 2).
    void: bool,
    /// The connection went; nothing more is sent for it.
    orphan: bool,
}

#[derive(Debug, Clone, Copy)]
struct AppWrite {
    sector: u64,
    len: u32,
    held: bool,
}

/// The SyncTarget's resync machine. See the module docs.
#[derive(Debug)]
pub struct Target {
    cfg: TargetConfig,
    /// The bitmap's size in blocks.
    blocks: u64,
    ctl: Controller,
    marks: SyncMarks,
    throttle: MinRateThrottle,
    reqs: Slab<Req>,
    /// In-flight requests by start sector (they never overlap each other).
    by_sector: BTreeMap<u64, u64>,
    req_extents: ExtentCounts,
    apps: HashMap<u64, AppWrite>,
    app_extents: ExtentCounts,
    held: usize,
    cursor: u64,
    rewind: Option<u64>,
    /// Failed ranges, start block → end block (exclusive), merged when adjacent.
    failed: BTreeMap<u64, u64>,
    /// Ranges the peer failed to write during the run (a SyncTarget Primary's write it
    /// answered with `P_NEG_ACK`): this side has the newer data, so they are neither
    /// fetched nor read from the peer; their bits stay set. Same shape as `failed`.
    lacking: BTreeMap<u64, u64>,
    failed_overflow: bool,
    sect_in: u64,
    in_flight_sectors: u64,
    connected: bool,
    paused_since: Option<u64>,
    paused_ms: u64,
    start_ms: u64,
    last_now: u64,
    finished: bool,
    total_blocks: u64,
    same_csum_blocks: u64,
    requests_sent: u64,
    data_bytes: u64,
    deallocated_bytes: u64,
    void_replies: u64,
    throttled_steps: u64,
    planned_rate_kib: u32,
    outputs: Vec<TargetOutput>,
    #[cfg(test)]
    pub(crate) sabotage: TargetSabotage,
}

/// Deliberate bugs, to prove the harness catches what the conflict rules prevent.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TargetSabotage {
    /// Rule 2 off: write replies of requests that an application write overtook.
    pub no_void: bool,
    /// Rule 3 off: never hold an application write.
    pub no_hold: bool,
    /// A SyncTarget Primary reads every block locally, also those still to be fetched.
    pub read_locally: bool,
}

impl Target {
    /// A run over the node's bitmap (its set bits are what to fetch), starting at `start`.
    /// The bitmap stays the caller's; every call that reads or changes it borrows it.
    pub fn new(cfg: TargetConfig, bitmap: &OutOfSync, start: &TickInput) -> Result<Self, Error> {
        let blocks = cfg.sectors.div_ceil(SECT_PER_BLOCK);
        if bitmap.blocks() != blocks {
            return Err(Error::Invalid("bitmap size differs from the volume"));
        }
        if cfg.max_bio_size < 4096 || cfg.max_bio_size > DRBD_MAX_BIO_SIZE {
            return Err(Error::Invalid("max_bio_size must be 4 KiB..=1 MiB"));
        }
        if cfg.csums_max_bio_size < 4096
            || !cfg.csums_max_bio_size.is_multiple_of(4096)
            || cfg.csums_max_bio_size > cfg.max_bio_size
        {
            return Err(Error::Invalid(
                "csums_max_bio_size must be 4 KiB..=max_bio_size",
            ));
        }
        if !cfg.thin_granularity.is_multiple_of(4096) || cfg.thin_granularity > DRBD_MAX_BIO_SIZE {
            return Err(Error::Invalid(
                "thin_granularity must be a multiple of 4 KiB ≤ 1 MiB",
            ));
        }
        if cfg.max_requests == 0 || cfg.max_app_writes == 0 {
            return Err(Error::Invalid("bounds must be non-zero"));
        }
        let ctl = Controller::new(cfg.rate).map_err(|_| Error::Invalid("rate settings"))?;
        let total = bitmap.count();
        Ok(Target {
            marks: SyncMarks::new(total, start.now_ms),
            throttle: MinRateThrottle::new(start.app_io_sectors),
            reqs: Slab::new(cfg.max_requests),
            by_sector: BTreeMap::new(),
            req_extents: ExtentCounts::default(),
            apps: HashMap::new(),
            app_extents: ExtentCounts::default(),
            held: 0,
            cursor: cfg.start_block.min(blocks),
            rewind: None,
            failed: BTreeMap::new(),
            lacking: BTreeMap::new(),
            failed_overflow: false,
            sect_in: 0,
            in_flight_sectors: 0,
            connected: true,
            paused_since: None,
            paused_ms: 0,
            start_ms: start.now_ms,
            last_now: start.now_ms,
            finished: false,
            total_blocks: total,
            same_csum_blocks: 0,
            requests_sent: 0,
            data_bytes: 0,
            deallocated_bytes: 0,
            void_replies: 0,
            throttled_steps: 0,
            planned_rate_kib: 0,
            outputs: Vec::new(),
            #[cfg(test)]
            sabotage: TargetSabotage::default(),
            blocks,
            ctl,
            cfg,
        })
    }

    /// The outputs of the last calls, in order.
    pub fn drain_outputs(&mut self) -> std::vec::Drain<'_, TargetOutput> {
        self.outputs.drain(..)
    }

    /// The run is over ([`TargetOutput::Finished`] was emitted).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The lowest block a new run must start at so that nothing is missed: the cursor, an
    /// earlier skipped or cancelled block, or the first block of a request in flight.
    pub fn resume_position(&self) -> u64 {
        let mut p = self.cursor;
        if let Some(r) = self.rewind {
            p = p.min(r);
        }
        for (_, r) in self.reqs.iter() {
            p = p.min(r.sector / SECT_PER_BLOCK);
        }
        p
    }

    /// New rate settings (`P_SYNC_PARAM`, `disk-options`).
    pub fn set_rate(&mut self, rate: RateConfig) -> Result<(), Error> {
        self.ctl
            .set_config(rate)
            .map_err(|_| Error::Invalid("rate settings"))?;
        self.cfg.rate = rate;
        Ok(())
    }

    /// `pause-sync`: no new requests until [`Target::resume`]; those in flight complete.
    pub fn pause(&mut self, now_ms: u64) {
        if self.paused_since.is_none() {
            self.paused_since = Some(now_ms);
            self.marks.suspend(now_ms);
        }
    }

    /// `resume-sync`.
    pub fn resume(&mut self, now_ms: u64) {
        if let Some(t) = self.paused_since.take() {
            self.paused_ms += now_ms.saturating_sub(t);
        }
    }

    /// Requests not yet done (outstanding at the peer, digesting, or being written).
    pub fn requests_in_flight(&self) -> usize {
        self.reqs.len()
    }

    /// Progress for status.
    pub fn progress(&self, bm: &OutOfSync) -> TargetProgress {
        let left = self.left(bm);
        let permille = if self.total_blocks == 0 {
            1000
        } else {
            let done = self.total_blocks.saturating_sub(left);
            u32::try_from(done * 1000 / self.total_blocks).unwrap_or(1000)
        };
        TargetProgress {
            total_blocks: self.total_blocks,
            left_blocks: left,
            permille,
            failed_blocks: Self::set_in(&self.failed, bm),
            same_csum_blocks: self.same_csum_blocks,
            requests_in_flight: self.reqs.len(),
            sectors_in_flight: self.in_flight_sectors,
            requests_sent: self.requests_sent,
            data_bytes: self.data_bytes,
            deallocated_bytes: self.deallocated_bytes,
            void_replies: self.void_replies,
            throttled_steps: self.throttled_steps,
            planned_rate_kib: self.planned_rate_kib,
            rate_kib: self.marks.rate_kib(left, self.last_now),
            eta_secs: self.marks.eta_secs(left, self.last_now),
            resume_block: self.resume_position(),
            paused: self.paused_since.is_some(),
            finished: self.finished,
        }
    }

    /// One controller step (every [`super::SLEEP_TIME_MS`]): requests what the controller,
    /// `max-buffers`, the c-min-rate check and congestion allow.
    pub fn tick(&mut self, bm: &OutOfSync, input: &TickInput) {
        self.last_now = input.now_ms;
        let paused = self.paused_since.is_some();
        self.marks.advance(self.left(bm), input.now_ms, paused);
        // Paused, DRBD's resync timer does not run (PausedSyncT): no step at all.
        if self.finished || !self.connected || paused {
            return;
        }
        // Throttled or congested, DRBD takes the step and then sends nothing, so the plan
        // keeps time.
        let sect_in = std::mem::take(&mut self.sect_in);
        let step = self.ctl.step(sect_in, self.in_flight_sectors);
        self.planned_rate_kib = step.rate_kib;
        let left = self.left(bm);
        let throttled = self.throttle.should_throttle(
            self.cfg.rate.c_min_rate,
            input.app_io_sectors,
            input.app_waiting,
            self.marks.recent_rate_kib(left, input.now_ms),
        );
        if throttled {
            self.throttled_steps += 1;
        }
        if !throttled && !input.congested && step.blocks > 0 {
            self.walk(bm, u64::from(step.blocks));
        }
        self.maybe_finish(bm);
    }

    /// The walk: issue requests for up to `budget` blocks.
    fn walk(&mut self, bm: &OutOfSync, mut budget: u64) {
        let blocks = self.blocks;
        let max_bytes = if self.cfg.csums {
            self.cfg.csums_max_bio_size
        } else {
            self.cfg.max_bio_size
        };
        let max_blocks = u64::from(max_bytes / 4096);
        let thin_blocks = u64::from(self.cfg.thin_granularity / 4096);
        // At most one jump back per step, so a step whose only bits sit in busy extents
        // ends instead of circling.
        let mut jumped = false;
        while budget > 0 && !self.reqs.is_full() && !self.failed_overflow {
            if self.cursor >= blocks {
                match self.rewind.take() {
                    Some(r) if !jumped => {
                        self.cursor = r;
                        jumped = true;
                        continue;
                    }
                    Some(r) => {
                        self.rewind = Some(r);
                        break;
                    }
                    None => break,
                }
            }
            let Some(b) = bm.next_set(self.cursor) else {
                self.cursor = blocks;
                continue;
            };
            if let Some(end) = self.skipped_end(b) {
                self.cursor = end;
                continue;
            }
            if let Some(end) = self.in_flight_end(b) {
                self.cursor = end;
                continue;
            }
            let ext = b / EXTENT_BLOCKS;
            if self.app_extents.has_extent(ext) {
                // Rule 1: come back when the extent is quiet.
                self.rewind = Some(self.rewind.map_or(b, |r| r.min(b)));
                self.cursor = (ext + 1) * EXTENT_BLOCKS;
                continue;
            }
            let mut last = b;
            let mut size = 1u64;
            let mut align = 1u32;
            while size < budget {
                if size + 1 > max_blocks {
                    break;
                }
                // Keep the start aligned to the request's size.
                if b & ((1u64 << align) - 1) != 0 {
                    break;
                }
                if thin_blocks != 0 && size == thin_blocks {
                    break;
                }
                let next = last + 1;
                if next.is_multiple_of(EXTENT_BLOCKS) || next >= blocks || !bm.is_set(next) {
                    break;
                }
                if self.skipped_end(next).is_some() || self.in_flight_end(next).is_some() {
                    break;
                }
                last = next;
                size += 1;
                if (1u64 << align) <= size {
                    align += 1;
                }
            }
            self.cursor = last + 1;
            budget -= size;
            let sector = b * SECT_PER_BLOCK;
            let end = (sector + size * SECT_PER_BLOCK).min(self.cfg.sectors);
            // ≤ 1 MiB: fits.
            let len = u32::try_from((end - sector) * u64::from(SECTOR)).unwrap_or(u32::MAX);
            let thin = thin_blocks != 0 && size == thin_blocks && !self.cfg.csums;
            self.issue(sector, len, thin);
        }
    }

    fn issue(&mut self, sector: u64, len: u32, thin: bool) {
        let phase = if self.cfg.csums {
            Phase::Digesting
        } else {
            Phase::Outstanding
        };
        let Some(tag) = self.reqs.insert(Req {
            sector,
            len,
            phase,
            void: false,
            orphan: false,
        }) else {
            return;
        };
        self.by_sector.insert(sector, tag);
        self.req_extents.add(sector, len);
        self.in_flight_sectors += u64::from(len / SECTOR);
        if self.cfg.csums {
            self.outputs
                .push(TargetOutput::ReadForDigest { tag, sector, len });
        } else {
            self.requests_sent += 1;
            self.outputs
                .push(TargetOutput::SendRsDataRequest { sector, len, thin });
        }
    }

    /// End block of the range of `ranges` holding block `b`.
    fn range_end(ranges: &BTreeMap<u64, u64>, b: u64) -> Option<u64> {
        ranges
            .range(..=b)
            .next_back()
            .and_then(|(_, &end)| (end > b).then_some(end))
    }

    /// End block of the failed or lacking range holding block `b`: the walk skips it.
    fn skipped_end(&self, b: u64) -> Option<u64> {
        Self::range_end(&self.failed, b).or_else(|| Self::range_end(&self.lacking, b))
    }

    /// End block of the in-flight request holding block `b`.
    fn in_flight_end(&self, b: u64) -> Option<u64> {
        let s = b * SECT_PER_BLOCK;
        let (_, &tag) = self
            .by_sector
            .range(..=s + SECT_PER_BLOCK - 1)
            .next_back()?;
        let r = self.reqs.get(tag)?;
        let end = r.sector + u64::from(r.len / SECTOR);
        (end > s).then(|| end.div_ceil(SECT_PER_BLOCK))
    }

    /// Set bits of `bm` inside `ranges`.
    fn set_in(ranges: &BTreeMap<u64, u64>, bm: &OutOfSync) -> u64 {
        ranges
            .iter()
            .map(|(&a, &b)| bm.count_blocks(a, b - a))
            .sum()
    }

    /// Set bits the run is to fetch: all but the ranges the peer lacks.
    fn left(&self, bm: &OutOfSync) -> u64 {
        bm.count().saturating_sub(Self::set_in(&self.lacking, bm))
    }

    fn record_failed(&mut self, sector: u64, len: u32) {
        if !Self::add_range(&mut self.failed, sector, len) {
            self.failed_overflow = true;
        }
    }

    /// Adds the blocks of `[sector, sector + len bytes)` to `ranges`, merged with its
    /// neighbours. `false` when `ranges` holds [`MAX_FAILED_RANGES`] or more.
    fn add_range(ranges: &mut BTreeMap<u64, u64>, sector: u64, len: u32) -> bool {
        let mut a = sector / SECT_PER_BLOCK;
        let mut b = sector
            .saturating_add(u64::from(len / SECTOR))
            .div_ceil(SECT_PER_BLOCK);
        if let Some((&s, &e)) = ranges.range(..=a).next_back() {
            if e >= a {
                a = s;
                b = b.max(e);
                ranges.remove(&s);
            }
        }
        while let Some((&s, &e)) = ranges.range(a..=b).next() {
            b = b.max(e);
            ranges.remove(&s);
        }
        let room = ranges.len() < MAX_FAILED_RANGES;
        ranges.insert(a, b);
        room
    }

    fn push_rewind(&mut self, sector: u64) {
        let b = (sector / SECT_PER_BLOCK).min(self.blocks);
        self.rewind = Some(self.rewind.map_or(b, |r| r.min(b)));
    }

    /// Looks up the request a reply answers: it must be sent and unanswered, same length.
    fn answered(&mut self, sector: u64, len: u32) -> Result<(u64, Req), Error> {
        let tag = *self
            .by_sector
            .get(&sector)
            .ok_or(Error::Protocol("resync reply for no request"))?;
        let r = self
            .reqs
            .get(tag)
            .ok_or(Error::Protocol("resync reply for no request"))?
            .clone();
        if r.phase != Phase::Outstanding || r.len != len {
            return Err(Error::Protocol("resync reply does not match its request"));
        }
        let sectors = u64::from(len / SECTOR);
        self.sect_in += sectors;
        self.in_flight_sectors = self.in_flight_sectors.saturating_sub(sectors);
        Ok((tag, r))
    }

    /// Drops a request (in-flight sectors are adjusted by the caller: a request leaves
    /// the controller's count when it is answered or abandoned, not when it is freed).
    fn free(&mut self, tag: u64) {
        if let Some(r) = self.reqs.remove(tag) {
            self.by_sector.remove(&r.sector);
            self.req_extents.remove(r.sector, r.len);
        }
    }

    /// A void reply: not written, asked for again, acked so the source's count balances.
    fn void_reply(&mut self, tag: u64, r: &Req) {
        self.void_replies += 1;
        self.free(tag);
        self.push_rewind(r.sector);
        self.outputs.push(TargetOutput::SendRsWriteAck {
            sector: r.sector,
            len: r.len,
        });
    }

    /// `P_RS_DATA_REPLY` for `[sector, sector + len)` arrived (its data read by the
    /// driver). `Some(tag)`: write the data, report [`Target::write_done`]. `None`: drop
    /// the data (an application write overtook the request).
    pub fn data_reply(
        &mut self,
        bm: &OutOfSync,
        sector: u64,
        len: u32,
    ) -> Result<Option<u64>, Error> {
        let (tag, r) = self.answered(sector, len)?;
        if r.void {
            self.void_reply(tag, &r);
            self.maybe_finish(bm);
            return Ok(None);
        }
        self.data_bytes += u64::from(len);
        if let Some(req) = self.reqs.get_mut(tag) {
            req.phase = Phase::Writing;
        }
        Ok(Some(tag))
    }

    /// `P_RS_DEALLOCATED`: the range reads as zeroes on the source.
    pub fn deallocated(&mut self, bm: &OutOfSync, sector: u64, len: u32) -> Result<(), Error> {
        let (tag, r) = self.answered(sector, len)?;
        if r.void {
            self.void_reply(tag, &r);
            self.maybe_finish(bm);
            return Ok(());
        }
        self.deallocated_bytes += u64::from(len);
        if let Some(req) = self.reqs.get_mut(tag) {
            req.phase = Phase::Writing;
        }
        self.outputs
            .push(TargetOutput::WriteZeroes { tag, sector, len });
        Ok(())
    }

    /// `P_RS_IS_IN_SYNC`: the source's digest matched ours.
    pub fn in_sync_reply(
        &mut self,
        bm: &mut OutOfSync,
        sector: u64,
        len: u32,
    ) -> Result<(), Error> {
        let (tag, r) = self.answered(sector, len)?;
        self.free(tag);
        if r.void {
            self.void_replies += 1;
            self.push_rewind(sector);
        } else {
            let cleared = bm.clear_unflushed(sector, len);
            self.same_csum_blocks += cleared;
        }
        self.maybe_finish(bm);
        Ok(())
    }

    /// `P_NEG_RS_DREPLY`: the source could not read the range.
    pub fn neg_reply(&mut self, bm: &OutOfSync, sector: u64, len: u32) -> Result<(), Error> {
        let (tag, _) = self.answered(sector, len)?;
        self.free(tag);
        self.record_failed(sector, len);
        self.maybe_finish(bm);
        Ok(())
    }

    /// `P_RS_CANCEL`: the source declined (Ahead mode); ask again later.
    pub fn cancel_reply(&mut self, bm: &OutOfSync, sector: u64, len: u32) -> Result<(), Error> {
        let (tag, _) = self.answered(sector, len)?;
        self.free(tag);
        self.push_rewind(sector);
        self.maybe_finish(bm);
        Ok(())
    }

    /// The local digest read for `tag` finished: `Some(digest)`, or `None` when the read
    /// failed (then the range is asked for as plain data).
    pub fn digest_done(
        &mut self,
        bm: &OutOfSync,
        tag: u64,
        digest: Option<Digest>,
    ) -> Result<(), Error> {
        let r = self
            .reqs
            .get(tag)
            .filter(|r| r.phase == Phase::Digesting)
            .ok_or(Error::Invalid("digest_done: unknown tag"))?
            .clone();
        if r.orphan || r.void {
            // Disconnected, or overtaken before it was sent: nothing goes out.
            self.in_flight_sectors = self
                .in_flight_sectors
                .saturating_sub(u64::from(r.len / SECTOR));
            self.free(tag);
            if !r.orphan {
                self.push_rewind(r.sector);
            }
            self.maybe_finish(bm);
            return Ok(());
        }
        if let Some(req) = self.reqs.get_mut(tag) {
            req.phase = Phase::Outstanding;
        }
        self.requests_sent += 1;
        self.outputs.push(match digest {
            Some(digest) => TargetOutput::SendCsumRsRequest {
                sector: r.sector,
                len: r.len,
                digest,
            },
            None => TargetOutput::SendRsDataRequest {
                sector: r.sector,
                len: r.len,
                thin: false,
            },
        });
        Ok(())
    }

    /// The local write (data or zeroes) for `tag` finished.
    pub fn write_done(&mut self, bm: &mut OutOfSync, tag: u64, ok: bool) -> Result<(), Error> {
        let r = self
            .reqs
            .get(tag)
            .filter(|r| r.phase == Phase::Writing)
            .ok_or(Error::Invalid("write_done: unknown tag"))?
            .clone();
        self.free(tag);
        if ok {
            // The data came from the source and reached this disk before any overlapping
            // application write (rule 3 held those): the blocks are in sync.
            bm.clear_unflushed(r.sector, r.len);
            if !r.orphan {
                self.outputs.push(TargetOutput::SendRsWriteAck {
                    sector: r.sector,
                    len: r.len,
                });
            }
        } else {
            self.record_failed(r.sector, r.len);
            if !r.orphan {
                self.outputs.push(TargetOutput::SendNegAck {
                    sector: r.sector,
                    len: r.len,
                });
            }
        }
        self.release_held();
        self.maybe_finish(bm);
        Ok(())
    }

    /// Lets held application writes go whose overlapping resync writes are done.
    fn release_held(&mut self) {
        if self.held == 0 {
            return;
        }
        let mut ready: Vec<u64> = Vec::new();
        for (&id, a) in &self.apps {
            if a.held && !self.overlaps_writing(a.sector, a.len) {
                ready.push(id);
            }
        }
        ready.sort_unstable();
        for id in ready {
            if let Some(a) = self.apps.get_mut(&id) {
                a.held = false;
                self.held -= 1;
                self.outputs.push(TargetOutput::AppWriteReady { id });
            }
        }
    }

    /// Requests overlapping `[sector, sector + len)`.
    fn overlapping(&self, sector: u64, len: u32) -> Vec<u64> {
        if !self.req_extents.any(sector, len) {
            return Vec::new();
        }
        let end = sector + u64::from(len / SECTOR);
        let from = sector.saturating_sub(u64::from(DRBD_MAX_BIO_SIZE / SECTOR));
        self.by_sector
            .range(from..end)
            .filter_map(|(_, &tag)| {
                let r = self.reqs.get(tag)?;
                overlaps(r.sector, r.len, sector, len).then_some(tag)
            })
            .collect()
    }

    fn overlaps_writing(&self, sector: u64, len: u32) -> bool {
        self.overlapping(sector, len)
            .into_iter()
            .any(|t| self.reqs.get(t).is_some_and(|r| r.phase == Phase::Writing))
    }

    /// An application write to this disk is about to be submitted (`id` unique among those
    /// tracked). `true`: submit it now. `false`: hold it until
    /// [`TargetOutput::AppWriteReady`] (rule 3). Either way call
    /// [`Target::app_write_end`] when it is done (see the module docs for when).
    pub fn app_write_begin(&mut self, id: u64, sector: u64, len: u32) -> Result<bool, Error> {
        if crate::request::check_range(sector, len, self.cfg.sectors).is_none() {
            return Err(Error::Invalid(
                "app write empty, unaligned or beyond the device",
            ));
        }
        if self.apps.contains_key(&id) {
            return Err(Error::Invalid("app write id already tracked"));
        }
        if self.apps.len() >= self.cfg.max_app_writes {
            return Err(Error::Busy);
        }
        let mut must_wait = false;
        #[cfg(test)]
        let sabotage = self.sabotage;
        for tag in self.overlapping(sector, len) {
            if let Some(r) = self.reqs.get_mut(tag) {
                match r.phase {
                    // Rule 2.
                    Phase::Digesting | Phase::Outstanding => r.void = true,
                    // Rule 3.
                    Phase::Writing => must_wait = true,
                }
                #[cfg(test)]
                if sabotage.no_void {
                    r.void = false;
                }
            }
        }
        #[cfg(test)]
        if sabotage.no_hold {
            must_wait = false;
        }
        self.app_extents.add(sector, len);
        self.apps.insert(
            id,
            AppWrite {
                sector,
                len,
                held: must_wait,
            },
        );
        if must_wait {
            self.held += 1;
        }
        Ok(!must_wait)
    }

    /// The application write `id` is done (see the module docs). A held write that is
    /// given up may be ended too.
    pub fn app_write_end(&mut self, id: u64) -> Result<(), Error> {
        let a = self
            .apps
            .remove(&id)
            .ok_or(Error::Invalid("app_write_end: unknown id"))?;
        if a.held {
            self.held -= 1;
        }
        self.app_extents.remove(a.sector, a.len);
        Ok(())
    }

    /// The peer confirmed an application write with `P_RS_WRITE_ACK` (`DP_MAY_SET_IN_SYNC`):
    /// its whole blocks are in sync.
    pub fn set_in_sync(&mut self, bm: &mut OutOfSync, sector: u64, len: u32) {
        bm.clear_unflushed(sector, len);
        self.maybe_finish(bm);
    }

    /// Blocks became out of sync during the run (a local write failed, a write the
    /// target could not track): set them, and make the walk come back for them.
    pub fn mark_out_of_sync(&mut self, bm: &mut OutOfSync, sector: u64, len: u32) {
        bm.mark(sector, len);
        self.push_rewind(sector);
    }

    /// The peer failed to write `[sector, sector + len bytes)` (`P_NEG_ACK` for a
    /// SyncTarget Primary's write): this side has the newer data. The caller set the bits;
    /// the run neither fetches the range nor reads it from the peer, and a run that ends
    /// with only such bits left has succeeded (the bits stay: this node resyncs them to
    /// the peer later). Past [`MAX_FAILED_RANGES`] ranges the run stops with failures.
    pub fn peer_lacks(&mut self, sector: u64, len: u32) {
        if !Self::add_range(&mut self.lacking, sector, len) {
            self.failed_overflow = true;
        }
    }

    /// Whether a read of `[sector, sector + len bytes)` must go to the peer: a block in
    /// it is still to be fetched (set, and not one the peer lacks).
    pub fn must_read_remotely(&self, bm: &OutOfSync, sector: u64, len: u32) -> bool {
        #[cfg(test)]
        if self.sabotage.read_locally {
            return false;
        }
        if self.lacking.is_empty() {
            return bm.any_in(sector, len);
        }
        let first = sector / SECT_PER_BLOCK;
        let end = sector
            .saturating_add(u64::from(len / SECTOR))
            .div_ceil(SECT_PER_BLOCK)
            .min(self.blocks);
        (first..end).any(|b| bm.is_set(b) && Self::range_end(&self.lacking, b).is_none())
    }

    /// The connection is gone: unanswered requests are dropped (their bits stay set),
    /// local IO in flight still completes (report it as usual) but nothing more is sent.
    /// Persist [`Target::resume_position`] and the bitmap; the next connection starts a
    /// new run.
    pub fn connection_lost(&mut self) {
        self.connected = false;
        let tags: Vec<(u64, Phase)> = self.reqs.iter().map(|(t, r)| (t, r.phase)).collect();
        for (tag, phase) in tags {
            match phase {
                Phase::Outstanding => {
                    if let Some(r) = self.reqs.get(tag).cloned() {
                        self.free(tag);
                        self.push_rewind(r.sector);
                    }
                }
                Phase::Digesting | Phase::Writing => {
                    if let Some(r) = self.reqs.get_mut(tag) {
                        r.orphan = true;
                    }
                }
            }
        }
        // Orphaned digest reads: their ranges were never asked for.
        let digesting: Vec<u64> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.phase == Phase::Digesting)
            .map(|(_, r)| r.sector)
            .collect();
        for sector in digesting {
            self.push_rewind(sector);
        }
        self.sect_in = 0;
        self.in_flight_sectors = 0;
    }

    fn maybe_finish(&mut self, bm: &OutOfSync) {
        if self.finished || !self.connected || self.reqs.len() > 0 {
            return;
        }
        if self.failed_overflow {
            self.finish(bm);
            return;
        }
        if self.cursor < self.blocks || self.rewind.is_some() {
            return;
        }
        if self.left(bm) > Self::set_in(&self.failed, bm) {
            // Bits behind the cursor (set after the walk passed): go round again.
            self.cursor = 0;
            return;
        }
        self.finish(bm);
    }

    fn finish(&mut self, bm: &OutOfSync) {
        self.finished = true;
        let now = self.last_now;
        let paused = self.paused_ms + self.paused_since.map_or(0, |t| now.saturating_sub(t));
        let active = now.saturating_sub(self.start_ms).saturating_sub(paused);
        let left = self.left(bm);
        let done = self.total_blocks.saturating_sub(left);
        self.outputs.push(TargetOutput::Finished(ResyncSummary {
            total_blocks: self.total_blocks,
            failed_blocks: Self::set_in(&self.failed, bm),
            left_blocks: left,
            same_csum_blocks: self.same_csum_blocks,
            active_ms: active,
            paused_ms: paused,
            rate_kib: done.saturating_mul(4000) / active.max(1000),
        }));
    }
}
