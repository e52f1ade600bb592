//! The SyncSource: it answers the target's resync requests from its local disk.
//!
//! Life of a request (DRBD's `receive_DataRequest` → `w_e_end_rsdata_req` /
//! `w_e_end_csum_rs_req`):
//!
//! 1. [`Source::request`] queues it (at most `max_queue`; the driver stops reading the data
//!    socket while [`Source::can_accept`] is false — DRBD's receiver blocks the same way).
//! 2. Started when fewer than `max_reads` reads are in flight and no local write to the
//!    range is in flight ([`Source::app_write_begin`]): [`SourceOutput::ReadLocal`]. A read
//!    that overlapped a write in flight could return the block from before the write after
//!    the target already applied the write; the target issues a request only when its own
//!    side is quiet, so this is the half of the conflict rule that only the source can
//!    keep (see `target.rs`). A write that begins while the read is in flight needs
//!    nothing: its `P_DATA` was put on the stream first, and the target voids the request
//!    or writes the write over the reply.
//! 3. [`Source::read_done`]:
//!    - the read failed → `P_NEG_RS_DREPLY`;
//!    - `P_CSUM_RS_REQUEST` and the digests are equal → the bits are in sync on both
//!      sides ([`SourceOutput::SetInSync`]) and `P_RS_IS_IN_SYNC` goes out;
//!    - `P_RS_THIN_REQ`, `DRBD_FF_THIN_RESYNC` agreed, and the range reads as zeroes (or
//!      is a hole: the driver may answer without reading) → `P_RS_DEALLOCATED`;
//!    - else `P_RS_DATA_REPLY` with the data read.
//! 4. `P_RS_WRITE_ACK` ([`Source::rs_write_ack`]) clears the source's bits for the range;
//!    `P_NEG_ACK` with `ID_SYNCER` ([`Source::neg_ack`]) counts a failure.
//!
//! `P_RS_DEALLOCATED` answers only `P_RS_THIN_REQ`, as DRBD does, and not a plain
//! `P_RS_DATA_REQUEST` over zeroes: a kernel 8.4 SyncTarget counts the sectors of a
//! `P_RS_DEALLOCATED` into its controller as `pi->size >> 9` after the sub-header was
//! taken off, i.e. 0 (`receive_rs_deallocated`), so every such answer to a request it did
//! not mean as thin would leak from its in-flight count until its resync stalls.
//!
//! The source's c-min-rate check (DRBD sleeps 100 ms per request when throttled, unless
//! the peer is Primary): while [`Source::tick`] finds the application busy and the resync
//! faster than `c-min-rate`, at most one read starts per step.
//!
//! The bitmap is the driver's (the Primary's, while this node is Primary); the source
//! only says which ranges became in sync.

use std::collections::{HashMap, VecDeque};

use super::controller::{MinRateThrottle, SyncMarks};
use super::slab::Slab;
use super::{check_peer_range, overlaps, Digest, Error, ExtentCounts, TickInput};

/// Configuration of a [`Source`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceConfig {
    /// Volume size in sectors.
    pub sectors: u64,
    /// `DRBD_FF_THIN_RESYNC` was agreed: thin requests over zeroes get `P_RS_DEALLOCATED`.
    pub thin: bool,
    /// Requests accepted and not answered (queued or reading).
    pub max_queue: usize,
    /// Local reads in flight.
    pub max_reads: usize,
    /// Local writes tracked at once.
    pub max_app_writes: usize,
    /// `c-min-rate`, KiB/s (0: never throttle).
    pub c_min_rate: u32,
}

impl SourceConfig {
    /// Defaults: thin off, 1024 queued requests, 64 reads in flight (≤ 64 MiB of read
    /// buffers at 1 MiB requests), 4096 writes tracked, tandem's c-min-rate.
    pub fn new(sectors: u64) -> Self {
        SourceConfig {
            sectors,
            thin: false,
            max_queue: 1024,
            max_reads: 64,
            max_app_writes: 4096,
            c_min_rate: super::RateConfig::TANDEM.c_min_rate,
        }
    }
}

/// What kind of resync request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// `P_RS_DATA_REQUEST`.
    Data,
    /// `P_RS_THIN_REQ`.
    Thin,
    /// `P_CSUM_RS_REQUEST` with the target's digest.
    Csum(Digest),
}

/// How a local read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// The read failed.
    Failed,
    /// The data is in the driver's buffer.
    Ok {
        /// Every byte read is zero (or the range is a hole); asked for with `zero_check`.
        all_zero: bool,
        /// The data's digest; required when `digest` was asked for.
        digest: Option<Digest>,
    },
}

/// What the source asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceOutput {
    /// Read the range into a buffer kept under `tag`; report [`Source::read_done`]. With
    /// `digest`, compute [`Digest::of`] the data; with `zero_check`, whether it is all
    /// zeroes (a hole of a file backend may be answered without reading). After
    /// `read_done` the buffer is needed only by a [`SourceOutput::SendRsDataReply`] with
    /// this tag.
    ReadLocal {
        /// Handle to pass back.
        tag: u64,
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
        /// Compute the digest.
        digest: bool,
        /// Check for all-zero data.
        zero_check: bool,
    },
    /// Send `P_RS_DATA_REPLY` (`block_id` = `ID_SYNCER`, seq 0, flags 0) with the data of
    /// read `tag`, then free the buffer.
    SendRsDataReply {
        /// The read's handle.
        tag: u64,
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// Send `P_RS_DEALLOCATED`.
    SendRsDeallocated {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// Send `P_RS_IS_IN_SYNC` (meta socket, `block_id` = `ID_SYNCER`).
    SendRsIsInSync {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// Send `P_NEG_RS_DREPLY` (meta socket, `block_id` = `ID_SYNCER`).
    SendNegRsDReply {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// Clear the whole blocks of the range in this node's bitmap
    /// ([`crate::request::OutOfSync::clear`]).
    SetInSync {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
}

/// Counters for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct SourceStats {
    /// Requests received.
    pub requests: u64,
    /// Requests queued, not yet reading.
    pub queued: usize,
    /// Reads in flight.
    pub reading: usize,
    /// Data bytes sent in `P_RS_DATA_REPLY`.
    pub data_bytes: u64,
    /// Bytes answered with `P_RS_DEALLOCATED`.
    pub deallocated_bytes: u64,
    /// Bytes answered with `P_RS_IS_IN_SYNC`.
    pub same_csum_bytes: u64,
    /// Requests answered with `P_NEG_RS_DREPLY`.
    pub read_failures: u64,
    /// Bytes the target acknowledged with `P_RS_WRITE_ACK`.
    pub acked_bytes: u64,
    /// `P_NEG_ACK`s for resync data (the target's write failed).
    pub write_failures: u64,
    /// Steps in which the c-min-rate check held reads back.
    pub throttled_steps: u64,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    sector: u64,
    len: u32,
    kind: RequestKind,
}

#[derive(Debug, Clone, Copy)]
struct Reading {
    req: Pending,
    orphan: bool,
}

/// The SyncSource's resync machine. See the module docs.
#[derive(Debug)]
pub struct Source {
    cfg: SourceConfig,
    queue: VecDeque<Pending>,
    reads: Slab<Reading>,
    apps: HashMap<u64, (u64, u32)>,
    app_extents: ExtentCounts,
    throttle: MinRateThrottle,
    marks: SyncMarks,
    /// Blocks answered so far (the marks count down from `u64::MAX`).
    answered_blocks: u64,
    throttled: bool,
    /// Reads started in this step while throttled.
    started_this_step: usize,
    peer_primary: bool,
    connected: bool,
    stats: SourceStats,
    outputs: Vec<SourceOutput>,
}

impl Source {
    /// A source for one connection.
    pub fn new(cfg: SourceConfig, start: &TickInput) -> Result<Self, Error> {
        if cfg.max_queue == 0 || cfg.max_reads == 0 || cfg.max_app_writes == 0 {
            return Err(Error::Invalid("bounds must be non-zero"));
        }
        Ok(Source {
            reads: Slab::new(cfg.max_reads),
            queue: VecDeque::new(),
            apps: HashMap::new(),
            app_extents: ExtentCounts::default(),
            throttle: MinRateThrottle::new(start.app_io_sectors),
            marks: SyncMarks::new(u64::MAX, start.now_ms),
            answered_blocks: 0,
            throttled: false,
            started_this_step: 0,
            peer_primary: false,
            connected: true,
            stats: SourceStats::default(),
            outputs: Vec::new(),
            cfg,
        })
    }

    /// The outputs of the last calls, in order.
    pub fn drain_outputs(&mut self) -> std::vec::Drain<'_, SourceOutput> {
        self.outputs.drain(..)
    }

    /// Whether another request may be read off the data socket.
    pub fn can_accept(&self) -> bool {
        self.queue.len() + self.reads.len() < self.cfg.max_queue
    }

    /// Counters.
    pub fn stats(&self) -> SourceStats {
        SourceStats {
            queued: self.queue.len(),
            reading: self.reads.len(),
            ..self.stats
        }
    }

    /// The peer is Primary: DRBD never throttles then (it would slow the peer's reads).
    pub fn set_peer_primary(&mut self, primary: bool) {
        self.peer_primary = primary;
    }

    /// A resync request from the peer. [`Error::Busy`] when the queue is full (the driver
    /// should not have read it); [`Error::Protocol`] for a range DRBD would refuse.
    pub fn request(&mut self, sector: u64, len: u32, kind: RequestKind) -> Result<(), Error> {
        check_peer_range(sector, len, self.cfg.sectors)?;
        if !self.can_accept() {
            return Err(Error::Busy);
        }
        if !self.connected {
            return Err(Error::Invalid("request after connection loss"));
        }
        self.stats.requests += 1;
        self.queue.push_back(Pending { sector, len, kind });
        self.start_reads();
        Ok(())
    }

    /// One step (every 100 ms): the c-min-rate check.
    pub fn tick(&mut self, input: &TickInput) {
        let left = u64::MAX - self.answered_blocks;
        self.marks.advance(left, input.now_ms, false);
        let rate = self.marks.recent_rate_kib(left, input.now_ms);
        self.throttled = !self.peer_primary
            && self.throttle.should_throttle(
                self.cfg.c_min_rate,
                input.app_io_sectors,
                input.app_waiting,
                rate,
            );
        if self.throttled {
            self.stats.throttled_steps += 1;
        }
        self.started_this_step = 0;
        self.start_reads();
    }

    fn busy_for_writes(&self, p: &Pending) -> bool {
        self.app_extents.any(p.sector, p.len)
            && self
                .apps
                .values()
                .any(|&(s, l)| overlaps(s, l, p.sector, p.len))
    }

    /// Starts queued reads, oldest first, skipping those behind a write in flight.
    fn start_reads(&mut self) {
        let mut i = 0;
        while i < self.queue.len() && !self.reads.is_full() {
            if self.throttled && self.started_this_step >= 1 {
                return;
            }
            let Some(&p) = self.queue.get(i) else { break };
            if self.busy_for_writes(&p) {
                i += 1;
                continue;
            }
            self.queue.remove(i);
            let Some(tag) = self.reads.insert(Reading {
                req: p,
                orphan: false,
            }) else {
                break;
            };
            self.started_this_step += 1;
            self.outputs.push(SourceOutput::ReadLocal {
                tag,
                sector: p.sector,
                len: p.len,
                digest: matches!(p.kind, RequestKind::Csum(_)),
                zero_check: self.cfg.thin && p.kind == RequestKind::Thin,
            });
        }
    }

    /// The local read `tag` finished.
    pub fn read_done(&mut self, tag: u64, outcome: ReadOutcome) -> Result<(), Error> {
        let r = *self
            .reads
            .get(tag)
            .ok_or(Error::Invalid("read_done: unknown tag"))?;
        if let (RequestKind::Csum(_), ReadOutcome::Ok { digest: None, .. }) = (r.req.kind, outcome)
        {
            return Err(Error::Invalid("read_done: the digest was asked for"));
        }
        self.reads.remove(tag);
        let Pending { sector, len, kind } = r.req;
        if r.orphan {
            self.start_reads();
            return Ok(());
        }
        self.answered_blocks += u64::from(len).div_ceil(4096);
        match outcome {
            ReadOutcome::Failed => {
                self.stats.read_failures += 1;
                self.outputs
                    .push(SourceOutput::SendNegRsDReply { sector, len });
            }
            ReadOutcome::Ok { all_zero, digest } => match kind {
                RequestKind::Csum(theirs) if digest == Some(theirs) => {
                    self.stats.same_csum_bytes += u64::from(len);
                    self.outputs.push(SourceOutput::SetInSync { sector, len });
                    self.outputs
                        .push(SourceOutput::SendRsIsInSync { sector, len });
                }
                RequestKind::Thin if self.cfg.thin && all_zero => {
                    self.stats.deallocated_bytes += u64::from(len);
                    self.outputs
                        .push(SourceOutput::SendRsDeallocated { sector, len });
                }
                _ => {
                    self.stats.data_bytes += u64::from(len);
                    self.outputs
                        .push(SourceOutput::SendRsDataReply { tag, sector, len });
                }
            },
        }
        self.start_reads();
        Ok(())
    }

    /// `P_RS_WRITE_ACK` with `block_id` = `ID_SYNCER`: the target wrote the range.
    pub fn rs_write_ack(&mut self, sector: u64, len: u32) -> Result<(), Error> {
        check_peer_range(sector, len, self.cfg.sectors)?;
        self.stats.acked_bytes += u64::from(len);
        self.outputs.push(SourceOutput::SetInSync { sector, len });
        Ok(())
    }

    /// `P_NEG_ACK` with `block_id` = `ID_SYNCER`: the target's write failed; the bits
    /// stay (DRBD's `drbd_rs_failed_io`).
    pub fn neg_ack(&mut self, sector: u64, len: u32) -> Result<(), Error> {
        check_peer_range(sector, len, self.cfg.sectors)?;
        self.stats.write_failures += 1;
        Ok(())
    }

    /// A local write (the application's while Primary, the peer's while Secondary) is
    /// submitted; `id` unique among those tracked. Call [`Source::app_write_end`] when it
    /// completed on this disk.
    pub fn app_write_begin(&mut self, id: u64, sector: u64, len: u32) -> Result<(), Error> {
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
        self.apps.insert(id, (sector, len));
        self.app_extents.add(sector, len);
        Ok(())
    }

    /// The local write `id` completed.
    pub fn app_write_end(&mut self, id: u64) -> Result<(), Error> {
        let (sector, len) = self
            .apps
            .remove(&id)
            .ok_or(Error::Invalid("app_write_end: unknown id"))?;
        self.app_extents.remove(sector, len);
        self.start_reads();
        Ok(())
    }

    /// The connection is gone: queued requests are dropped, reads in flight complete
    /// without an answer.
    pub fn connection_lost(&mut self) {
        self.connected = false;
        self.queue.clear();
        let tags: Vec<u64> = self.reads.iter().map(|(t, _)| t).collect();
        for t in tags {
            if let Some(r) = self.reads.get_mut(t) {
                r.orphan = true;
            }
        }
    }
}
