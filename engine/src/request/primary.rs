//! The Primary's write pipeline: serialisation of overlapping writes, epochs and barriers,
//! completion per protocol A/B/C, flushes, and what a connection loss does.
//!
//! Life of a write (DRBD's `drbd_req.c`, docs/drbd-reference.md §4.1):
//!
//! 1. [`Primary::write`] admits it, or refuses with [`Error::Busy`] when `max_in_flight`
//!    requests are not completed or `max_unacked_writes` write slots are taken.
//! 2. If it overlaps an earlier write that has not completed to the application, it waits
//!    in the core until every such write completed. Otherwise the two writes could reach
//!    the local disk and the peer's disk in different orders and leave the replicas
//!    different with neither side knowing.
//! 3. Started: [`PrimaryOutput::SubmitLocal`], and while connected
//!    [`PrimaryOutput::SendWrite`] in the current epoch (the write joins the transfer log).
//!    While disconnected its blocks are marked out of sync instead.
//! 4. Completed ([`PrimaryOutput::Complete`]) when the local write is done and the peer's
//!    part for the protocol is done (A: handed to TCP, B: `P_RECV_ACK`, C: `P_WRITE_ACK`;
//!    a `P_NEG_ACK` or a connection loss also ends the peer's part, marking the blocks out
//!    of sync). Completion closes the epoch it belongs to, so a write issued after it is
//!    in a later epoch; then writes that waited on it may start.
//! 5. Retired ([`PrimaryOutput::Retired`]) when it is completed and its epoch's
//!    `P_BARRIER_ACK` arrived (or the connection was lost, or it never was sent). Only then
//!    may the activity log drop its reference to the write's extents.
//!
//! Epochs: every sent write carries the current epoch. The epoch closes when a write of it
//! completes, when it reaches `max_epoch_size` writes (DRBD's default 2048), or when a
//! flush arrives; a closed epoch with writes gets a `P_BARRIER` at once. (DRBD sends it
//! lazily, before the next epoch's first write or when the sender goes idle. The core has
//! no notion of idle, and sending at close gives the same barriers in the same stream
//! positions.) Barrier numbers are u32, start at `first_barrier_nr` and wrap.
//!
//! **One ordered data stream is assumed.** Overlapping writes are always in different
//! epochs (the later one starts only after the earlier one completed, which closed its
//! epoch), and the peer drains an epoch before it submits the next one; that keeps them
//! ordered on the peer only because the barrier between them arrives in stream order.
//! With several data streams the epoch number (or a sequence number) must travel in each
//! data packet and the peer must reorder by it.
//!
//! **Diskless (detached) Primary** ([`Primary::detach_local`], DRBD's `on-io-error detach`
//! on a Primary): the local disk is gone, the peer serves. Writes started after the
//! detach emit no [`PrimaryOutput::SubmitLocal`] and take no activity-log reference (the
//! metadata is on the failed disk: no transaction is written again; the log is dropped
//! once the transaction in flight, if any, is done — writes waiting for it get EIO if it
//! fails, as before). Their blocks are marked out of sync (the local disk lacks them).
//! Such a write is sent as under protocol C whatever the configured protocol
//! (`DP_SEND_WRITE_ACK`) and completes `Ok` only on its `P_WRITE_ACK` (or its epoch's
//! barrier ack): the peer's disk is its only copy, and a `P_RECV_ACK` says only that the
//! peer received it — a peer that still held it when the connection went drops it
//! (`Receiver::connection_lost`), and with no local copy and no bit to resync from, an
//! acknowledged write would be gone. (The simulator's checker 18 found this under
//! protocol B; DRBD's receiver submits on receipt and holds nothing back.) A
//! `P_NEG_ACK`, a connection loss or not being sent at all (disconnected) completes it
//! with [`RequestError::IoFailed`]: an acknowledged write must be on the peer's disk. Flushes
//! need no local flush: they complete on the barrier acks of the epochs before them, and
//! fail if disconnected (or the connection is lost before the acks). Writes and flushes
//! already submitted locally at the detach keep the usual rules (the driver fails their
//! local part).
//!
//! Bounds: `max_in_flight` requests (writes incl. those waiting on an overlap, plus
//! flushes), `max_unacked_writes` write slots (not completed, or sent and not barrier
//! acked), hence at most that many epochs un-acked. The overlap check is a linear scan of
//! the not-completed writes (≤ `max_in_flight`, a few KiB, cache-friendly); an augmented
//! interval tree would only pay off with thousands in flight.

use super::{
    check_range, dp, make_handle, split_handle, Error, OutOfSync, RequestError, WriteKind,
    PAGE_BITS, PAGE_BYTES,
};

use crate::meta::al::{
    extent_range, ActivityLog, AlGeometry, AlStats, Begin, Prepared, AL_EXTENT_SHIFT,
    AL_UPDATES_PER_TRANSACTION,
};
use crate::state::Protocol;
use std::collections::VecDeque;

/// Configuration of a [`Primary`]; every bound is fixed here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryConfig {
    /// Replication protocol (A, B or C).
    pub protocol: Protocol,
    /// Volume size in 512-byte sectors.
    pub sectors: u64,
    /// Requests (writes, including those waiting on an overlap, and flushes) accepted and
    /// not completed; beyond it [`Error::Busy`].
    pub max_in_flight: usize,
    /// Write slots: writes not completed, or sent and not barrier-acked (DRBD's transfer
    /// log). Must be ≥ `max_in_flight`. Bounds the epochs awaiting `P_BARRIER_ACK` too.
    pub max_unacked_writes: usize,
    /// Writes per epoch before it is closed (DRBD's `max-epoch-size`, default 2048).
    pub max_epoch_size: u32,
    /// Number of the first epoch's barrier (non-zero; then +1, wrapping).
    pub first_barrier_nr: u32,
    /// The activity log and where metadata goes; `None` runs without one (no crash
    /// bound: only for tests of the other rules).
    pub meta: Option<MetaConfig>,
}

/// The activity log's configuration and the metadata byte offsets the core writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaConfig {
    /// The on-disk ring.
    pub geometry: AlGeometry,
    /// `al-extents`: slots of the log.
    pub al_extents: u32,
    /// Number of the first transaction (after the ring was initialised).
    pub first_tr_number: u32,
    /// Byte offset of ring block 0 on the metadata device.
    pub ring_offset: u64,
    /// Byte offset of bitmap page 0 on the metadata device.
    pub bitmap_offset: u64,
    /// log2 of the extent size in bytes: [`AL_EXTENT_SHIFT`] (4 MiB, DRBD's). The
    /// simulator uses smaller extents so that its small disks span many of them.
    pub extent_shift: u32,
}

impl MetaConfig {
    /// DRBD's extent size over `geometry`.
    pub fn new(
        geometry: AlGeometry,
        al_extents: u32,
        ring_offset: u64,
        bitmap_offset: u64,
    ) -> Self {
        MetaConfig {
            geometry,
            al_extents,
            first_tr_number: 0,
            ring_offset,
            bitmap_offset,
            extent_shift: AL_EXTENT_SHIFT,
        }
    }
}

impl PrimaryConfig {
    /// Defaults: 1024 requests in flight, 4096 write slots, epochs of up to 2048 writes.
    pub fn new(protocol: Protocol, sectors: u64) -> Self {
        PrimaryConfig {
            protocol,
            sectors,
            max_in_flight: 1024,
            max_unacked_writes: 4096,
            max_epoch_size: 2048,
            first_barrier_nr: 1,
            meta: None,
        }
    }
}

/// IO the Primary asks its driver to do, in the order it must be done. Sends must reach
/// the data stream in output order (a barrier sits between two epochs' writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryOutput {
    /// Write (or discard/zero) the range on the local disk; report [`Primary::local_done`]
    /// with `tag`. The data is the frontend's buffer of request `id`.
    SubmitLocal {
        /// Handle to pass back in [`Primary::local_done`].
        tag: u64,
        /// The frontend's request id (the driver's key for the data buffer).
        id: u64,
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u32,
        /// Data, discard or zeroes.
        kind: WriteKind,
        /// Force unit access: durable before completion.
        fua: bool,
    },
    /// Flush the local disk's volatile cache; report [`Primary::local_flush_done`].
    SubmitLocalFlush {
        /// Handle to pass back in [`Primary::local_flush_done`].
        tag: u64,
    },
    /// Send the write to the peer (`P_DATA` / `P_TRIM` / `P_ZEROES` by `kind`). Under
    /// protocol A report [`Primary::handed_to_network`] once the bytes are in the socket.
    SendWrite {
        /// The wire `block_id`; the peer echoes it in its acks.
        block_id: u64,
        /// The frontend's request id (the data buffer).
        id: u64,
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u32,
        /// Data, discard or zeroes.
        kind: WriteKind,
        /// `dp_flags` for agreed protocol ≥ 100 (see [`dp`]).
        dp_flags: u32,
    },
    /// Send `P_BARRIER(nr)`: the epoch `nr` is closed.
    SendBarrier {
        /// The barrier number (the peer echoes it in `P_BARRIER_ACK`).
        nr: u32,
    },
    /// Complete request `id` (write or flush) to the application. After this the driver
    /// may free the request's buffer: every send of it was already emitted.
    Complete {
        /// The frontend's request id.
        id: u64,
        /// `Ok`, or the local disk failed.
        result: Result<(), RequestError>,
    },
    /// Write 4 KiB of metadata at byte `offset` of the metadata device, durably (FUA):
    /// a bitmap page, or an activity-log transaction. With `preflush`, first flush the
    /// data device's volatile cache (DRBD's `REQ_PREFLUSH` on AL writes: local writes
    /// completed in an extent must be durable before a transaction that evicts it is).
    /// Report [`Primary::meta_write_done`].
    MetaWrite {
        /// Handle to pass back.
        tag: u64,
        /// Byte offset on the metadata device.
        offset: u64,
        /// The block.
        data: Box<[u8; 4096]>,
        /// Flush the data device first.
        preflush: bool,
    },
    /// A started write left the pipeline: completed, and barrier-acked (or its range is
    /// out of sync); its activity-log references are dropped.
    /// Emitted exactly once per started write.
    Retired {
        /// The tag its `SubmitLocal` carried.
        tag: u64,
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u32,
    },
}

/// Counters for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct PrimaryStats {
    /// Whether the core replicates (between `connected` and `connection_lost`).
    pub connected: bool,
    /// Writes accepted and not completed (including those waiting on an overlap).
    pub in_flight_writes: usize,
    /// Of those, writes waiting for an overlapping write to complete.
    pub waiting_on_overlap: usize,
    /// Flushes accepted and not completed.
    pub in_flight_flushes: usize,
    /// Writes sent and not yet barrier-acked (the transfer log).
    pub unacked_writes: usize,
    /// Closed epochs waiting for their `P_BARRIER_ACK`.
    pub unacked_epochs: usize,
    /// Write slots in use (≤ `max_unacked_writes`).
    pub slots_used: usize,
    /// Writes sent to the peer since construction.
    pub writes_sent: u64,
    /// Data bytes sent to the peer (discards and zeroes carry none).
    pub bytes_replicated: u64,
    /// Barriers sent.
    pub barriers_sent: u64,
    /// Barrier acks received.
    pub barrier_acks: u64,
    /// Flushes that had to wait for barrier acks after their local flush.
    pub flushes_waited_for_peer: u64,
    /// Out-of-sync bytes (set bits × 4 KiB).
    pub out_of_sync_bytes: u64,
    /// Writes waiting for an activity-log transaction.
    pub al_waiting: usize,
    /// Activity-log counters (None without one).
    pub al: Option<AlStats>,
    /// A metadata write failed: every write fails with EIO until a restart (or until a
    /// detach makes the Primary diskless).
    pub meta_failed: bool,
    /// The local disk is detached: writes go to the peer only.
    pub detached: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Local {
    Pending,
    Ok,
    Failed,
    /// Diskless: no local part; the result is the peer's.
    Skipped,
}

/// What the peer's part of a write still needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    /// Not sent (disconnected): nothing expected, range already out of sync.
    NotSent,
    /// Sent; the protocol's event (handed over / recv ack / write ack) not yet seen.
    Pending,
    /// The protocol's event was seen, or a neg-ack / connection loss ended it.
    Done,
}

/// Which ack the peer was asked for (`dp_flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckKind {
    /// Protocol A: none; the write counts as replicated when handed to TCP.
    Handed,
    /// `P_RECV_ACK`.
    Recv,
    /// `P_WRITE_ACK`.
    Write,
}

#[derive(Debug, Clone)]
struct WriteSlot {
    gen: u32,
    live: bool,
    id: u64,
    sector: u64,
    len: u32,
    kind: WriteKind,
    fua: bool,
    /// Admission order; waiters start in this order.
    arrival: u64,
    /// Earlier not-completed writes overlapping this one; it starts at zero.
    blockers: u32,
    started: bool,
    local: Local,
    net: Net,
    ack: AckKind,
    /// The peer's part succeeded (its protocol event or the barrier ack was seen); a
    /// neg-ack, a connection loss or not sending leave it false.
    net_ok: bool,
    completed: bool,
    in_tl: bool,
    epoch_seq: u64,
    /// Index in `active`, valid while not completed.
    active_idx: usize,
    /// Holds activity-log references on its extents.
    al_held: bool,
}

impl WriteSlot {
    fn empty() -> Self {
        WriteSlot {
            gen: 0,
            live: false,
            id: 0,
            sector: 0,
            len: 0,
            kind: WriteKind::Data,
            fua: false,
            arrival: 0,
            blockers: 0,
            started: false,
            local: Local::Pending,
            net: Net::NotSent,
            ack: AckKind::Handed,
            net_ok: false,
            completed: false,
            in_tl: false,
            epoch_seq: 0,
            active_idx: 0,
            al_held: false,
        }
    }
}

/// Where the metadata writes of the current transaction are.
#[derive(Debug)]
enum MetaPhase {
    Idle,
    /// Bitmap pages `(tag, page)` in flight; then the transaction.
    Pages {
        pages: Vec<(u64, u32)>,
        failed: bool,
        tr: Prepared,
    },
    /// The transaction block in flight.
    Transaction {
        tag: u64,
    },
}

/// A not-completed write's range, for the overlap scan.
#[derive(Debug, Clone, Copy)]
struct ActiveRange {
    start: u64,
    end: u64,
    slot: u32,
}

#[derive(Debug, Clone)]
struct FlushSlot {
    gen: u32,
    live: bool,
    id: u64,
    local: Local,
    /// Epoch (internal sequence) whose barrier ack the flush waits for, if any.
    wait_epoch: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Epoch {
    nr: u32,
    /// Monotonic internal number (barrier numbers wrap; these do not).
    seq: u64,
    size: u32,
}

/// Deliberate bugs for proving that the simulator's checkers can fail.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PrimarySabotage {
    /// Start overlapping writes at once instead of serialising them.
    pub no_overlap_wait: bool,
    /// Complete flushes after the local flush without waiting for barrier acks.
    pub flush_ignores_peer: bool,
    /// Evict extents without writing their bitmap pages first.
    pub skip_evicted_pages: bool,
    /// A detached write completes on the configured protocol's event (a `P_RECV_ACK`
    /// under B) instead of the peer's `P_WRITE_ACK`.
    pub detached_keeps_protocol: bool,
}

/// The Primary's write pipeline for one volume and one peer. See the module docs.
#[derive(Debug)]
pub struct Primary {
    cfg: PrimaryConfig,
    connected: bool,
    slots: Vec<WriteSlot>,
    free: Vec<u32>,
    slots_used: usize,
    /// Not-completed writes' ranges (started or waiting).
    active: Vec<ActiveRange>,
    waiting: usize,
    arrivals: u64,
    /// Sent, not barrier-acked writes in send order; epochs are contiguous runs.
    tl: VecDeque<u32>,
    /// Closed epochs with writes, waiting for their barrier ack, oldest first.
    unacked: VecDeque<Epoch>,
    cur: Epoch,
    flushes: Vec<FlushSlot>,
    flush_free: Vec<u32>,
    flushes_live: usize,
    oos: OutOfSync,
    out: Vec<PrimaryOutput>,
    /// Scratch for writes that became ready to start.
    ready: Vec<(u64, u32)>,
    stats: PrimaryStats,
    al: Option<ActivityLog>,
    /// Writes (slot indexes) waiting for the activity log, in arrival order.
    al_wait: VecDeque<u32>,
    /// Of those, how many hold no references yet (found no room).
    al_unheld: usize,
    meta_phase: MetaPhase,
    meta_tags: u64,
    /// A metadata write failed: the disk is no longer used (see `al_failed`).
    meta_failed: bool,
    /// log2 of sectors per activity-log extent.
    ext_shift: u32,
    /// The local disk is detached (see the module docs).
    detached: bool,
    /// Diskless writes that completed at start (disconnected), to complete in
    /// [`Primary::pump_al`]'s loop rather than recursively.
    complete_now: Vec<u32>,
    #[cfg(test)]
    pub(crate) sabotage: PrimarySabotage,
}

impl Primary {
    /// A disconnected Primary with an all-clear out-of-sync bitmap.
    pub fn new(cfg: PrimaryConfig) -> Result<Self, Error> {
        if cfg.sectors == 0 {
            return Err(Error::Invalid("volume of zero sectors"));
        }
        if cfg.max_in_flight == 0 || cfg.max_unacked_writes < cfg.max_in_flight {
            return Err(Error::Invalid(
                "need 0 < max_in_flight <= max_unacked_writes",
            ));
        }
        if u32::try_from(cfg.max_unacked_writes).is_err() {
            return Err(Error::Invalid("max_unacked_writes must fit in 32 bits"));
        }
        if cfg.max_epoch_size == 0 {
            return Err(Error::Invalid("max_epoch_size must be positive"));
        }
        let oos = OutOfSync::new(cfg.sectors);
        let al = match &cfg.meta {
            Some(m) => {
                if !(12..=40).contains(&m.extent_shift) {
                    return Err(Error::Invalid("extent_shift out of range"));
                }
                Some(
                    ActivityLog::new(m.geometry, m.al_extents, m.first_tr_number)
                        .map_err(Error::Invalid)?,
                )
            }
            None => None,
        };
        let cur = Epoch {
            nr: cfg.first_barrier_nr,
            seq: 0,
            size: 0,
        };
        Ok(Primary {
            slots: Vec::new(),
            free: Vec::new(),
            slots_used: 0,
            active: Vec::with_capacity(cfg.max_in_flight),
            waiting: 0,
            arrivals: 0,
            tl: VecDeque::new(),
            unacked: VecDeque::new(),
            cur,
            flushes: Vec::new(),
            flush_free: Vec::new(),
            flushes_live: 0,
            oos,
            out: Vec::new(),
            ready: Vec::new(),
            stats: PrimaryStats::default(),
            connected: false,
            al,
            al_wait: VecDeque::new(),
            al_unheld: 0,
            meta_phase: MetaPhase::Idle,
            meta_tags: 0,
            meta_failed: false,
            ext_shift: cfg
                .meta
                .as_ref()
                .map_or(AL_EXTENT_SHIFT, |m| m.extent_shift)
                - 9,
            detached: false,
            complete_now: Vec::new(),
            cfg,
            #[cfg(test)]
            sabotage: PrimarySabotage::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PrimaryConfig {
        &self.cfg
    }

    /// Takes the IO requested since the last call, in order. Call after every input.
    pub fn drain_outputs(&mut self) -> std::vec::Drain<'_, PrimaryOutput> {
        self.out.drain(..)
    }

    /// Whether a write or flush would be admitted now.
    pub fn can_accept(&self) -> bool {
        self.in_flight() < self.cfg.max_in_flight && self.slots_used < self.cfg.max_unacked_writes
    }

    /// Whether the core replicates (between [`Primary::connected`] and
    /// [`Primary::connection_lost`]).
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The out-of-sync bitmap.
    pub fn out_of_sync(&self) -> &OutOfSync {
        &self.oos
    }

    /// Out-of-sync bytes (set bits × 4 KiB).
    pub fn out_of_sync_bytes(&self) -> u64 {
        self.oos.bytes()
    }

    /// Counters for status.
    pub fn stats(&self) -> PrimaryStats {
        PrimaryStats {
            connected: self.connected,
            in_flight_writes: self.active.len(),
            waiting_on_overlap: self.waiting,
            in_flight_flushes: self.flushes_live,
            unacked_writes: self.tl.len(),
            unacked_epochs: self.unacked.len(),
            slots_used: self.slots_used,
            out_of_sync_bytes: self.oos.bytes(),
            al_waiting: self.al_wait.len(),
            al: self.al.as_ref().map(ActivityLog::stats),
            meta_failed: self.meta_failed,
            detached: self.detached,
            ..self.stats
        }
    }

    /// Replaces the all-clear bitmap with one loaded from disk (at attach, before any
    /// write). Refused if writes were accepted or the size differs.
    pub fn load_bitmap(&mut self, oos: OutOfSync) -> Result<(), Error> {
        if self.slots_used != 0 || self.arrivals != 0 {
            return Err(Error::Invalid("bitmap loaded after writes"));
        }
        if oos.blocks() != self.oos.blocks() {
            return Err(Error::Invalid("bitmap of another size"));
        }
        self.oos = oos;
        Ok(())
    }

    /// The node's one bitmap, for resync: the SyncSource clears what the target
    /// acknowledged (`SourceOutput::SetInSync`), a SyncTarget's run clears what it wrote
    /// (`resync::Target` borrows it per call), the bitmap exchange merges the peer's bits
    /// in. Only ever more bits cleared for blocks known equal on both disks, or more bits
    /// set.
    pub fn out_of_sync_mut(&mut self) -> &mut OutOfSync {
        &mut self.oos
    }

    /// Bitmap page `p` as it goes to disk: `(byte offset on the metadata device,
    /// bytes)`; `None` without metadata.
    fn bitmap_page(&self, p: u32) -> Option<(u64, Box<[u8; 4096]>)> {
        let base = self.cfg.meta.as_ref()?.bitmap_offset;
        Some((
            base + u64::from(p) * PAGE_BYTES as u64,
            self.oos.page_bytes(p),
        ))
    }

    /// Every dirty bitmap page as `(byte offset on the metadata device, bytes)`, clearing
    /// the dirty flags: the clean-stop write-back. Empty without metadata.
    pub fn take_dirty_bitmap_pages(&mut self) -> Vec<(u64, Box<[u8; 4096]>)> {
        if self.cfg.meta.is_none() {
            return Vec::new();
        }
        self.oos
            .take_all_dirty()
            .into_iter()
            .filter_map(|p| self.bitmap_page(p))
            .collect()
    }

    /// The writes whose local part was submitted and that are not retired yet, as
    /// `(tag, sector, len, on_disk)`: what a resync starting now must be told of.
    pub fn submitted_writes(&self) -> impl Iterator<Item = (u64, u64, u32, bool)> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            let submitted = s.live && s.started && !matches!(s.local, Local::Skipped);
            submitted.then(|| {
                let tag = make_handle(i, s.gen);
                (tag, s.sector, s.len, !matches!(s.local, Local::Pending))
            })
        })
    }

    /// The extents in the activity log (committed or being added), sorted.
    pub fn active_extents(&self) -> Vec<u32> {
        self.al
            .as_ref()
            .map(ActivityLog::active_extents)
            .unwrap_or_default()
    }

    fn in_flight(&self) -> usize {
        self.active.len() + self.flushes_live
    }

    // ----- inputs from the frontend -------------------------------------------------

    /// A write (data, discard or zeroes) of `len` bytes at `sector` from the frontend.
    /// `id` is the frontend's; it comes back in [`PrimaryOutput::Complete`].
    pub fn write(
        &mut self,
        id: u64,
        sector: u64,
        len: u32,
        kind: WriteKind,
        fua: bool,
    ) -> Result<(), Error> {
        let end = check_range(sector, len, self.cfg.sectors).ok_or(Error::Invalid(
            "write range empty, unaligned or past the end",
        ))?;
        if self.al.is_some() {
            let (first, last) = extent_range(sector, len, self.ext_shift);
            if (last - first) as usize >= AL_UPDATES_PER_TRANSACTION {
                // One transaction could never make all its extents active.
                return Err(Error::Invalid(
                    "write spans more than 64 activity-log extents; split it",
                ));
            }
        }
        if !self.can_accept() {
            return Err(Error::Busy);
        }
        let idx = self.alloc_slot();
        self.arrivals += 1;
        let blockers = self.count_overlaps(sector, end);
        #[cfg(test)]
        let blockers = if self.sabotage.no_overlap_wait {
            0
        } else {
            blockers
        };
        let active_idx = self.active.len();
        self.active.push(ActiveRange {
            start: sector,
            end,
            slot: idx,
        });
        let s = &mut self.slots[idx as usize];
        s.id = id;
        s.sector = sector;
        s.len = len;
        s.kind = kind;
        s.fua = fua;
        s.arrival = self.arrivals;
        s.blockers = blockers;
        s.active_idx = active_idx;
        if blockers == 0 {
            self.start(idx);
        } else {
            self.waiting += 1;
        }
        self.pump_al();
        Ok(())
    }

    /// A flush from the frontend: every write completed before it must be durable on the
    /// local disk and (while connected) on the peer's disk before it completes.
    pub fn flush(&mut self, id: u64) -> Result<(), Error> {
        if !self.can_accept() {
            return Err(Error::Busy);
        }
        if self.detached && !self.connected {
            // No disk and no peer: nothing can make earlier writes durable.
            self.out.push(PrimaryOutput::Complete {
                id,
                result: Err(RequestError::IoFailed),
            });
            return Ok(());
        }
        let wait_epoch = if self.connected {
            self.close_epoch();
            self.unacked.back().map(|e| e.seq)
        } else {
            None
        };
        let idx = match self.flush_free.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.flushes.len()).map_err(|_| Error::Busy)?;
                self.flushes.push(FlushSlot {
                    gen: 0,
                    live: false,
                    id: 0,
                    local: Local::Pending,
                    wait_epoch: None,
                });
                i
            }
        };
        let detached = self.detached;
        let f = &mut self.flushes[idx as usize];
        f.live = true;
        f.id = id;
        f.local = if detached {
            Local::Skipped
        } else {
            Local::Pending
        };
        f.wait_epoch = wait_epoch;
        let tag = make_handle(idx as usize, f.gen);
        self.flushes_live += 1;
        if wait_epoch.is_some() {
            self.stats.flushes_waited_for_peer += 1;
        }
        if detached {
            // Complete on the barrier acks alone (at once if none is outstanding).
            self.try_complete_flush(idx as usize);
        } else {
            self.out.push(PrimaryOutput::SubmitLocalFlush { tag });
        }
        Ok(())
    }

    // ----- inputs from the local disk ----------------------------------------------------

    /// The local write `tag` finished; `ok == false` is an I/O error (the request will
    /// complete with [`RequestError::IoFailed`] and its blocks are marked out of sync).
    pub fn local_done(&mut self, tag: u64, ok: bool) -> Result<(), Error> {
        let idx = self
            .lookup(tag)
            .ok_or(Error::Invalid("local_done for an unknown tag"))?;
        let s = &mut self.slots[idx as usize];
        if !s.started || s.local != Local::Pending {
            return Err(Error::Invalid("local_done for a write not submitted"));
        }
        s.local = if ok { Local::Ok } else { Local::Failed };
        if !ok {
            let (sector, len) = (s.sector, s.len);
            self.oos.mark(sector, len);
        }
        self.try_complete(idx);
        self.pump_al();
        Ok(())
    }

    /// A metadata write outside the core failed (the driver's bitmap write-back or
    /// superblock update): the disk goes out of use exactly as after a failed AL write
    /// (see `meta_write_done`).
    pub fn fail_disk(&mut self) {
        self.al_failed();
        self.pump_al();
    }

    /// The local disk failed and is detached (DRBD's `on-io-error detach` on a Primary):
    /// from now on writes and flushes are served by the peer alone (see the module
    /// docs). Writes already submitted locally keep their rules. Idempotent.
    pub fn detach_local(&mut self) {
        self.detached = true;
        self.pump_al();
    }

    /// Whether the local disk is detached ([`Primary::detach_local`]).
    pub fn is_detached(&self) -> bool {
        self.detached
    }

    /// The metadata write `tag` finished. A failure undoes the transaction and fails
    /// every write that waited for the activity log (DRBD detaches the disk instead;
    /// here the writes report EIO and later writes try again).
    pub fn meta_write_done(&mut self, tag: u64, ok: bool) -> Result<(), Error> {
        match &mut self.meta_phase {
            MetaPhase::Pages { pages, failed, .. } => {
                let i = pages
                    .iter()
                    .position(|&(t, _)| t == tag)
                    .ok_or(Error::Invalid("meta_write_done for an unknown tag"))?;
                let (_, page) = pages.swap_remove(i);
                if !ok {
                    *failed = true;
                    self.oos.set_dirty(page);
                }
                let (done, failed) = (pages.is_empty(), *failed);
                if done {
                    let MetaPhase::Pages { tr, .. } =
                        std::mem::replace(&mut self.meta_phase, MetaPhase::Idle)
                    else {
                        return Ok(());
                    };
                    if failed {
                        self.al_failed();
                    } else {
                        self.write_transaction(tr);
                    }
                }
            }
            MetaPhase::Transaction { tag: t } if *t == tag => {
                self.meta_phase = MetaPhase::Idle;
                if ok {
                    if let Some(al) = self.al.as_mut() {
                        al.committed();
                    }
                } else {
                    self.al_failed();
                }
            }
            _ => return Err(Error::Invalid("meta_write_done for an unknown tag")),
        }
        self.pump_al();
        Ok(())
    }

    /// The local flush `tag` finished.
    pub fn local_flush_done(&mut self, tag: u64, ok: bool) -> Result<(), Error> {
        let (idx, gen) = split_handle(tag);
        let f = self
            .flushes
            .get_mut(idx)
            .filter(|f| f.live && f.gen == gen && f.local == Local::Pending)
            .ok_or(Error::Invalid("local_flush_done for an unknown flush"))?;
        f.local = if ok { Local::Ok } else { Local::Failed };
        self.try_complete_flush(idx);
        Ok(())
    }

    // ----- inputs from the network driver ----------------------------------------------

    /// Protocol A: the write `block_id` is in the socket's send buffer. Stale handles
    /// (after a connection loss, or under protocol B/C) are ignored: the driver may report
    /// a send that raced with the loss.
    pub fn handed_to_network(&mut self, block_id: u64) {
        if let Some(idx) = self.lookup(block_id) {
            let s = &mut self.slots[idx as usize];
            if s.in_tl && s.net == Net::Pending && s.ack == AckKind::Handed {
                s.net = Net::Done;
                s.net_ok = true;
                self.try_complete(idx);
                self.pump_al();
            }
        }
    }

    /// `P_RECV_ACK` for `block_id` (protocol B).
    pub fn peer_recv_ack(&mut self, block_id: u64) -> Result<(), Error> {
        self.peer_ack(block_id, AckKind::Recv)
    }

    /// `P_WRITE_ACK` for `block_id` (protocol C).
    pub fn peer_write_ack(&mut self, block_id: u64) -> Result<(), Error> {
        self.peer_ack(block_id, AckKind::Write)
    }

    /// `P_NEG_ACK` for `block_id`: the peer failed to write it. Its blocks become out of
    /// sync; the request still completes successfully if the local write did (DRBD).
    /// Returns the range (first sector, bytes): the peer lacks it.
    pub fn peer_neg_ack(&mut self, block_id: u64) -> Result<(u64, u32), Error> {
        let idx = self
            .lookup(block_id)
            .filter(|&i| self.slots[i as usize].in_tl)
            .ok_or(Error::Protocol("P_NEG_ACK for an unknown block_id"))?;
        let s = &mut self.slots[idx as usize];
        s.net = Net::Done;
        let (sector, len) = (s.sector, s.len);
        self.oos.mark(sector, len);
        self.try_complete(idx);
        self.pump_al();
        Ok((sector, len))
    }

    /// `P_BARRIER_ACK(nr, set_size)`: the peer wrote and flushed every write of epoch `nr`.
    /// It must name the oldest un-acked epoch and its write count, else a protocol error.
    pub fn barrier_ack(&mut self, nr: u32, set_size: u32) -> Result<(), Error> {
        let e = *self
            .unacked
            .front()
            .ok_or(Error::Protocol("P_BARRIER_ACK with no epoch outstanding"))?;
        if e.nr != nr {
            return Err(Error::Protocol("P_BARRIER_ACK for another epoch"));
        }
        if e.size != set_size {
            return Err(Error::Protocol("P_BARRIER_ACK with a wrong set_size"));
        }
        let n = e.size as usize;
        // Validate before changing anything: a B/C write must have been acked already
        // (the peer acks a write before it acks its epoch, on the same stream).
        for &i in self.tl.iter().take(n) {
            let s = &self.slots[i as usize];
            if s.epoch_seq != e.seq {
                return Err(Error::Invalid("transfer log out of step with epochs"));
            }
            if s.net == Net::Pending && s.ack != AckKind::Handed {
                return Err(Error::Protocol("P_BARRIER_ACK before the write's ack"));
            }
        }
        if self.tl.len() < n {
            return Err(Error::Invalid("transfer log shorter than the epoch"));
        }
        self.unacked.pop_front();
        self.stats.barrier_acks += 1;
        for _ in 0..n {
            let Some(i) = self.tl.pop_front() else { break };
            let s = &mut self.slots[i as usize];
            s.in_tl = false;
            if s.net == Net::Pending {
                // Protocol A: the ack proves the peer had it, whatever the driver says.
                s.net = Net::Done;
                s.net_ok = true;
            }
            if s.completed {
                self.retire(i);
            } else {
                self.try_complete(i);
            }
        }
        self.check_flushes();
        self.pump_al();
        Ok(())
    }

    /// The connection is established (after the handshake): new writes replicate.
    pub fn connected(&mut self) -> Result<(), Error> {
        if self.connected {
            return Err(Error::Invalid("connected while connected"));
        }
        self.connected = true;
        Ok(())
    }

    /// The connection is gone. Every write not barrier-acked is marked out of sync and its
    /// peer part ends; writes whose local part is done complete now (without error),
    /// flushes stop waiting for barrier acks. A no-op when not connected.
    pub fn connection_lost(&mut self) {
        if !self.connected {
            return;
        }
        self.connected = false;
        self.unacked.clear();
        // Epochs of the old connection are over; a fresh sequence number keeps a late
        // completion from "closing" the new connection's first epoch.
        self.cur = Epoch {
            nr: self.cur.nr.wrapping_add(1),
            seq: self.cur.seq + 1,
            size: 0,
        };
        while let Some(i) = self.tl.pop_front() {
            let s = &mut self.slots[i as usize];
            s.in_tl = false;
            s.net = Net::Done;
            let (sector, len, completed) = (s.sector, s.len, s.completed);
            self.oos.mark(sector, len);
            if completed {
                self.retire(i);
            } else {
                self.try_complete(i);
            }
        }
        for f in &mut self.flushes {
            if f.live && f.local == Local::Skipped && f.wait_epoch.is_some() {
                // Diskless: the peer was the only place its writes could be made durable.
                f.local = Local::Failed;
            }
            f.wait_epoch = None;
        }
        self.check_flushes();
        self.pump_al();
    }

    // ----- internals -------------------------------------------------------------------------

    fn alloc_slot(&mut self) -> u32 {
        self.slots_used += 1;
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(WriteSlot::empty());
                // Bounded by max_unacked_writes, checked to fit in u32 at construction.
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let s = &mut self.slots[idx as usize];
        let gen = s.gen;
        *s = WriteSlot::empty();
        s.gen = gen;
        s.live = true;
        idx
    }

    fn lookup(&self, handle: u64) -> Option<u32> {
        let (idx, gen) = split_handle(handle);
        let s = self.slots.get(idx)?;
        (s.live && s.gen == gen).then(|| u32::try_from(idx).ok())?
    }

    fn tag(&self, idx: u32) -> u64 {
        make_handle(idx as usize, self.slots[idx as usize].gen)
    }

    fn count_overlaps(&self, start: u64, end: u64) -> u32 {
        let n = self
            .active
            .iter()
            .filter(|r| r.start < end && start < r.end)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// First and last activity-log extent of slot `idx`'s range.
    fn extents(&self, idx: u32) -> (u32, u32) {
        let s = &self.slots[idx as usize];
        extent_range(s.sector, s.len, self.ext_shift)
    }

    /// The write may go once its activity-log extents are active; otherwise it queues
    /// for a transaction ([`Primary::pump_al`] releases it).
    fn start(&mut self, idx: u32) {
        let (first, last) = self.extents(idx);
        if self.detached {
            // No activity log for a detached disk: its metadata is on the failed disk.
            return self.submit(idx);
        }
        let Some(al) = self.al.as_mut() else {
            return self.submit(idx);
        };
        if self.meta_failed {
            // Failed by pump_al, outside this call chain.
            self.al_wait.push_back(idx);
            return;
        }
        // Writers that found no room keep their place: a newcomer may only pass them on
        // a pure hit.
        let decision = if self.al_unheld == 0 || al.is_active(first, last) {
            al.begin(first, last)
        } else {
            Begin::NoRoom
        };
        match decision {
            Begin::Active => {
                self.slots[idx as usize].al_held = true;
                self.submit(idx);
            }
            Begin::Pending => {
                self.slots[idx as usize].al_held = true;
                self.al_wait.push_back(idx);
            }
            Begin::NoRoom => {
                self.al_unheld += 1;
                self.al_wait.push_back(idx);
            }
        }
    }

    /// Releases writes whose extents became active, stages those that found no room
    /// before (in order, stopping at the first that still finds none), and starts the
    /// next transaction when none is being written. Called after every input.
    fn pump_al(&mut self) {
        loop {
            while let Some(idx) = self.complete_now.pop() {
                self.try_complete(idx);
            }
            if self.detached && matches!(self.meta_phase, MetaPhase::Idle) {
                self.drop_al();
            } else {
                self.pump_al_once();
            }
            if self.complete_now.is_empty() {
                break;
            }
        }
    }

    /// Detached and no transaction in flight: the activity log goes out of use. Writes
    /// still waiting for it start diskless, in arrival order; held references are
    /// forgotten (no transaction will ever record them).
    fn drop_al(&mut self) {
        if self.al.take().is_none() {
            return;
        }
        self.al_unheld = 0;
        let waiting: Vec<u32> = self.al_wait.drain(..).collect();
        for &idx in &waiting {
            self.slots[idx as usize].al_held = false;
        }
        for &s in &self.tl {
            self.slots[s as usize].al_held = false;
        }
        for r in &self.active {
            self.slots[r.slot as usize].al_held = false;
        }
        for idx in waiting {
            self.submit(idx);
        }
    }

    fn pump_al_once(&mut self) {
        let Some(al) = self.al.as_mut() else {
            return;
        };
        if self.al_wait.is_empty() && !al.has_staged() {
            return;
        }
        if self.meta_failed {
            return self.fail_waiting();
        }
        let mut ready = Vec::new();
        let mut blocked = false;
        let mut i = 0;
        while i < self.al_wait.len() {
            let idx = self.al_wait[i];
            let s = &self.slots[idx as usize];
            let (first, last) = extent_range(s.sector, s.len, self.ext_shift);
            let go = if s.al_held {
                al.is_active(first, last)
            } else if blocked {
                false
            } else {
                match al.begin(first, last) {
                    Begin::Active => {
                        self.slots[idx as usize].al_held = true;
                        self.al_unheld -= 1;
                        true
                    }
                    Begin::Pending => {
                        self.slots[idx as usize].al_held = true;
                        self.al_unheld -= 1;
                        false
                    }
                    Begin::NoRoom => {
                        blocked = true;
                        false
                    }
                }
            };
            if go {
                self.al_wait.remove(i);
                ready.push(idx);
            } else {
                i += 1;
            }
        }
        for idx in ready {
            self.submit(idx);
        }
        if matches!(self.meta_phase, MetaPhase::Idle) {
            if let Some(tr) = self.al.as_mut().and_then(ActivityLog::prepare) {
                self.begin_transaction(tr);
            }
        }
    }

    /// Writes the bitmap pages of the evicted extents (those that changed), then the
    /// transaction.
    fn begin_transaction(&mut self, tr: Prepared) {
        let Some(m) = &self.cfg.meta else { return };
        let shift = m.extent_shift;
        let mut pages: Vec<u32> = tr
            .evicted
            .iter()
            .flat_map(|&e| {
                // Blocks of the extent, then their pages.
                let first = u64::from(e) << (shift - 12);
                let last = ((u64::from(e) + 1) << (shift - 12)) - 1;
                let p = |b: u64| u32::try_from(b / PAGE_BITS).unwrap_or(u32::MAX);
                p(first)..=p(last)
            })
            .collect();
        pages.sort_unstable();
        pages.dedup();
        #[cfg(test)]
        pages.retain(|_| !self.sabotage.skip_evicted_pages);
        let mut inflight = Vec::new();
        for p in pages {
            if self.oos.take_dirty(p) {
                let Some((offset, data)) = self.bitmap_page(p) else {
                    continue;
                };
                let tag = self.next_meta_tag();
                self.out.push(PrimaryOutput::MetaWrite {
                    tag,
                    offset,
                    data,
                    preflush: false,
                });
                inflight.push((tag, p));
            }
        }
        if inflight.is_empty() {
            self.write_transaction(tr);
        } else {
            self.meta_phase = MetaPhase::Pages {
                pages: inflight,
                failed: false,
                tr,
            };
        }
    }

    fn write_transaction(&mut self, tr: Prepared) {
        let Some(m) = &self.cfg.meta else { return };
        let offset = m.ring_offset + u64::from(tr.ring_block) * 4096;
        let tag = self.next_meta_tag();
        self.out.push(PrimaryOutput::MetaWrite {
            tag,
            offset,
            data: tr.block,
            preflush: true,
        });
        self.meta_phase = MetaPhase::Transaction { tag };
    }

    fn next_meta_tag(&mut self) -> u64 {
        self.meta_tags += 1;
        self.meta_tags
    }

    /// A metadata write failed. The log's state on disk is now unknown (a write reported
    /// as failed may have landed, torn or not at all), so, like DRBD's `on-io-error
    /// detach`, the Primary stops using its disk for good: every waiting and every later
    /// write fails with EIO, and no transaction is written again. A restart attaches again
    /// (and applies whatever the ring holds).
    fn al_failed(&mut self) {
        self.meta_failed = true;
        // Drop the waiting writes' references before the log undoes its changes: once it
        // has, their extents may be staged again (by writes their failure releases) and a
        // late `put` would take a reference someone else holds.
        for &idx in &self.al_wait {
            let s = &mut self.slots[idx as usize];
            if std::mem::take(&mut s.al_held) {
                let (first, last) = extent_range(s.sector, s.len, self.ext_shift);
                if let Some(al) = self.al.as_mut() {
                    al.put(first, last);
                }
            }
        }
        if let Some(al) = self.al.as_mut() {
            al.failed();
        }
        self.fail_waiting();
    }

    /// Completes every write waiting for the log with EIO (after a metadata failure).
    /// Completing one may start writes that waited on it, which queue here too.
    fn fail_waiting(&mut self) {
        self.al_unheld = 0;
        while let Some(idx) = self.al_wait.pop_front() {
            let s = &mut self.slots[idx as usize];
            s.started = true;
            s.local = Local::Failed;
            s.net = Net::NotSent;
            self.try_complete(idx);
        }
    }

    fn submit(&mut self, idx: u32) {
        let tag = self.tag(idx);
        let connected = self.connected;
        let detached = self.detached;
        // A detached write exists only on the peer: it completes when the peer's disk has
        // it, whatever the protocol (see the module docs).
        #[cfg(test)]
        let keep = self.sabotage.detached_keeps_protocol;
        #[cfg(not(test))]
        let keep = false;
        let protocol = if detached && !keep {
            Protocol::C
        } else {
            self.cfg.protocol
        };
        let s = &mut self.slots[idx as usize];
        s.started = true;
        let (id, sector, len, kind, fua) = (s.id, s.sector, s.len, s.kind, s.fua);
        if detached {
            // The local disk lacks the block from now on.
            s.local = Local::Skipped;
            self.oos.mark(sector, len);
        } else {
            self.out.push(PrimaryOutput::SubmitLocal {
                tag,
                id,
                sector,
                len,
                kind,
                fua,
            });
        }
        if !connected {
            s.net = Net::NotSent;
            self.oos.mark(sector, len);
            if detached {
                // Neither disk has it: fails at once (from pump_al, not recursively).
                self.complete_now.push(idx);
            }
            return;
        }
        let (ack, ack_flag) = match protocol {
            Protocol::A => (AckKind::Handed, 0),
            Protocol::B => (AckKind::Recv, dp::DP_SEND_RECEIVE_ACK),
            Protocol::C => (AckKind::Write, dp::DP_SEND_WRITE_ACK),
        };
        s.net = Net::Pending;
        s.ack = ack;
        s.in_tl = true;
        s.epoch_seq = self.cur.seq;
        let fua_flag = if fua { dp::DP_FUA } else { 0 };
        let dp_flags = dp::DP_RW_SYNC | ack_flag | fua_flag | kind.dp_flags();
        self.tl.push_back(idx);
        self.cur.size += 1;
        self.stats.writes_sent += 1;
        if kind.has_data() {
            self.stats.bytes_replicated += u64::from(len);
        }
        self.out.push(PrimaryOutput::SendWrite {
            block_id: tag,
            id,
            sector,
            len,
            kind,
            dp_flags,
        });
        if self.cur.size >= self.cfg.max_epoch_size {
            self.close_epoch();
        }
    }

    fn close_epoch(&mut self) {
        if self.cur.size == 0 {
            return;
        }
        self.unacked.push_back(self.cur);
        self.out
            .push(PrimaryOutput::SendBarrier { nr: self.cur.nr });
        self.stats.barriers_sent += 1;
        self.cur = Epoch {
            nr: self.cur.nr.wrapping_add(1),
            seq: self.cur.seq + 1,
            size: 0,
        };
    }

    fn peer_ack(&mut self, block_id: u64, kind: AckKind) -> Result<(), Error> {
        let idx = self
            .lookup(block_id)
            .filter(|&i| self.slots[i as usize].in_tl)
            .ok_or(Error::Protocol("ack for an unknown block_id"))?;
        let s = &mut self.slots[idx as usize];
        if s.ack != kind {
            return Err(Error::Protocol("ack of a kind that was not requested"));
        }
        if s.net != Net::Pending {
            return Err(Error::Protocol("duplicate ack"));
        }
        s.net = Net::Done;
        s.net_ok = true;
        self.try_complete(idx);
        self.pump_al();
        Ok(())
    }

    /// Completes the write if both its parts are done; then closes its epoch if current,
    /// releases waiters, and retires it if it is out of the transfer log.
    fn try_complete(&mut self, idx: u32) {
        let s = &mut self.slots[idx as usize];
        if s.completed || !s.started || s.local == Local::Pending || s.net == Net::Pending {
            return;
        }
        s.completed = true;
        let ok = match s.local {
            Local::Ok => true,
            Local::Skipped => s.net_ok,
            Local::Pending | Local::Failed => false,
        };
        let result = if ok {
            Ok(())
        } else {
            Err(RequestError::IoFailed)
        };
        let (id, in_tl, epoch_seq, active_idx) = (s.id, s.in_tl, s.epoch_seq, s.active_idx);
        self.out.push(PrimaryOutput::Complete { id, result });
        if in_tl && epoch_seq == self.cur.seq {
            self.close_epoch();
        }
        // Leave the overlap set and count down the waiters behind this write.
        let r = self.active.swap_remove(active_idx);
        if let Some(moved) = self.active.get(active_idx) {
            let m = moved.slot;
            self.slots[m as usize].active_idx = active_idx;
        }
        let mut ready = std::mem::take(&mut self.ready);
        for a in &self.active {
            if a.start < r.end && r.start < a.end {
                let w = &mut self.slots[a.slot as usize];
                if !w.started && w.blockers > 0 {
                    w.blockers -= 1;
                    if w.blockers == 0 {
                        ready.push((w.arrival, a.slot));
                    }
                }
            }
        }
        if !in_tl {
            self.retire(idx);
        }
        ready.sort_unstable();
        for &(_, w) in &ready {
            self.waiting -= 1;
            self.start(w);
        }
        ready.clear();
        self.ready = ready;
    }

    fn retire(&mut self, idx: u32) {
        if self.slots[idx as usize].al_held {
            let (first, last) = self.extents(idx);
            if let Some(al) = self.al.as_mut() {
                al.put(first, last);
            }
        }
        let tag = self.tag(idx);
        let s = &mut self.slots[idx as usize];
        s.al_held = false;
        self.out.push(PrimaryOutput::Retired {
            tag,
            sector: s.sector,
            len: s.len,
        });
        s.live = false;
        s.gen = s.gen.wrapping_add(1);
        self.free.push(idx);
        self.slots_used -= 1;
    }

    fn check_flushes(&mut self) {
        for i in 0..self.flushes.len() {
            self.try_complete_flush(i);
        }
    }

    fn try_complete_flush(&mut self, idx: usize) {
        let oldest_unacked = self.unacked.front().map(|e| e.seq);
        let Some(f) = self.flushes.get_mut(idx) else {
            return;
        };
        if !f.live || f.local == Local::Pending {
            return;
        }
        #[cfg(test)]
        if self.sabotage.flush_ignores_peer {
            f.wait_epoch = None;
        }
        if let (Some(w), Some(o)) = (f.wait_epoch, oldest_unacked) {
            if o <= w {
                return;
            }
        }
        // A diskless flush that got here waited for its barrier acks (a connection loss
        // turned it Failed).
        let result = if matches!(f.local, Local::Ok | Local::Skipped) {
            Ok(())
        } else {
            Err(RequestError::IoFailed)
        };
        self.out.push(PrimaryOutput::Complete { id: f.id, result });
        f.live = false;
        f.gen = f.gen.wrapping_add(1);
        self.flushes_live -= 1;
        if let Ok(i) = u32::try_from(idx) {
            self.flush_free.push(i);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use PrimaryOutput as O;

    const MIB: u64 = 2048; // sectors

    fn primary(p: Protocol) -> Primary {
        let mut cfg = PrimaryConfig::new(p, 16 * MIB);
        cfg.max_in_flight = 8;
        cfg.max_unacked_writes = 16;
        cfg.first_barrier_nr = 100;
        let mut pr = Primary::new(cfg).unwrap();
        pr.connected().unwrap();
        pr
    }

    fn outs(p: &mut Primary) -> Vec<O> {
        p.drain_outputs().collect()
    }

    /// (tag, block_id) of the write `id` in the outputs.
    fn handles(o: &[O], want: u64) -> (u64, Option<u64>) {
        let tag = o
            .iter()
            .find_map(|x| match x {
                O::SubmitLocal { tag, id, .. } if *id == want => Some(*tag),
                _ => None,
            })
            .expect("write was submitted");
        let bid = o.iter().find_map(|x| match x {
            O::SendWrite { block_id, id, .. } if *id == want => Some(*block_id),
            _ => None,
        });
        (tag, bid)
    }

    fn completed(o: &[O]) -> Vec<(u64, bool)> {
        o.iter()
            .filter_map(|x| match x {
                O::Complete { id, result } => Some((*id, result.is_ok())),
                _ => None,
            })
            .collect()
    }

    fn flush_tag(o: &[O]) -> u64 {
        o.iter()
            .find_map(|x| match x {
                O::SubmitLocalFlush { tag } => Some(*tag),
                _ => None,
            })
            .expect("a local flush was submitted")
    }

    fn barriers(o: &[O]) -> Vec<u32> {
        o.iter()
            .filter_map(|x| match x {
                O::SendBarrier { nr } => Some(*nr),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn protocol_c_completes_on_local_and_write_ack_only() {
        let mut p = primary(Protocol::C);
        p.write(1, 0, 4096, WriteKind::Data, false).unwrap();
        let o = outs(&mut p);
        let (tag, bid) = handles(&o, 1);
        let bid = bid.expect("sent");
        let flags = o
            .iter()
            .find_map(|x| match x {
                O::SendWrite { dp_flags, .. } => Some(*dp_flags),
                _ => None,
            })
            .unwrap();
        assert_eq!(flags, dp::DP_RW_SYNC | dp::DP_SEND_WRITE_ACK);
        p.local_done(tag, true).unwrap();
        assert!(completed(&outs(&mut p)).is_empty());
        // Wrong ack kind for protocol C.
        assert_eq!(
            p.peer_recv_ack(bid),
            Err(Error::Protocol("ack of a kind that was not requested"))
        );
        p.peer_write_ack(bid).unwrap();
        let o = outs(&mut p);
        assert_eq!(completed(&o), vec![(1, true)]);
        // Completion closed the epoch: its barrier goes out at once.
        assert_eq!(barriers(&o), vec![100]);
        assert_eq!(p.peer_write_ack(bid), Err(Error::Protocol("duplicate ack")));
        // Retired only at the barrier ack.
        assert!(!o.iter().any(|x| matches!(x, O::Retired { .. })));
        assert_eq!(
            p.barrier_ack(100, 2),
            Err(Error::Protocol("P_BARRIER_ACK with a wrong set_size"))
        );
        assert_eq!(
            p.barrier_ack(101, 1),
            Err(Error::Protocol("P_BARRIER_ACK for another epoch"))
        );
        p.barrier_ack(100, 1).unwrap();
        assert_eq!(
            outs(&mut p),
            vec![O::Retired {
                tag,
                sector: 0,
                len: 4096
            }]
        );
        assert_eq!(p.stats().slots_used, 0);
        assert_eq!(
            p.barrier_ack(101, 0),
            Err(Error::Protocol("P_BARRIER_ACK with no epoch outstanding"))
        );
    }

    #[test]
    fn protocol_b_and_a_complete_on_their_events() {
        let mut p = primary(Protocol::B);
        p.write(1, 8, 512, WriteKind::Data, true).unwrap();
        let o = outs(&mut p);
        let (tag, bid) = handles(&o, 1);
        assert!(o.contains(&O::SendWrite {
            block_id: bid.unwrap(),
            id: 1,
            sector: 8,
            len: 512,
            kind: WriteKind::Data,
            dp_flags: dp::DP_RW_SYNC | dp::DP_SEND_RECEIVE_ACK | dp::DP_FUA,
        }));
        assert!(o.contains(&O::SubmitLocal {
            tag,
            id: 1,
            sector: 8,
            len: 512,
            kind: WriteKind::Data,
            fua: true
        }));
        p.peer_recv_ack(bid.unwrap()).unwrap();
        assert!(completed(&outs(&mut p)).is_empty());
        p.local_done(tag, true).unwrap();
        assert_eq!(completed(&outs(&mut p)), vec![(1, true)]);

        let mut p = primary(Protocol::A);
        p.write(7, 0, 512, WriteKind::Zeroes { unmap: true }, false)
            .unwrap();
        let o = outs(&mut p);
        let (tag, bid) = handles(&o, 7);
        let flags = o
            .iter()
            .find_map(|x| match x {
                O::SendWrite { dp_flags, .. } => Some(*dp_flags),
                _ => None,
            })
            .unwrap();
        assert_eq!(flags, dp::DP_RW_SYNC | dp::DP_DISCARD | dp::DP_ZEROES);
        p.local_done(tag, true).unwrap();
        assert!(completed(&outs(&mut p)).is_empty());
        p.handed_to_network(bid.unwrap());
        assert_eq!(completed(&outs(&mut p)), vec![(7, true)]);
        assert_eq!(
            p.peer_write_ack(bid.unwrap()),
            Err(Error::Protocol("ack of a kind that was not requested"))
        );
    }

    #[test]
    fn overlapping_writes_wait_and_start_in_arrival_order() {
        let mut p = primary(Protocol::C);
        p.write(1, 0, 8192, WriteKind::Data, false).unwrap(); // sectors 0..16
        p.write(2, 8, 8192, WriteKind::Data, false).unwrap(); // overlaps 1
        p.write(3, 100, 512, WriteKind::Data, false).unwrap(); // independent
        p.write(4, 15, 512, WriteKind::Discard, false).unwrap(); // overlaps 1 and 2
        let o = outs(&mut p);
        let started: Vec<u64> = o
            .iter()
            .filter_map(|x| match x {
                O::SubmitLocal { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(started, vec![1, 3]);
        assert_eq!(p.stats().waiting_on_overlap, 2);
        let (t1, b1) = handles(&o, 1);
        p.local_done(t1, true).unwrap();
        p.peer_write_ack(b1.unwrap()).unwrap();
        let o = outs(&mut p);
        // 1 completes, its epoch closes (barrier before 2's data), 2 starts; 4 still waits.
        let order: Vec<&str> = o
            .iter()
            .map(|x| match x {
                O::Complete { .. } => "complete",
                O::SendBarrier { .. } => "barrier",
                O::SubmitLocal { .. } => "submit",
                O::SendWrite { .. } => "send",
                O::SubmitLocalFlush { .. } => "flush",
                O::MetaWrite { .. } => "meta",
                O::Retired { .. } => "retired",
            })
            .collect();
        assert_eq!(order, vec!["complete", "barrier", "submit", "send"]);
        let (t2, b2) = handles(&o, 2);
        p.local_done(t2, true).unwrap();
        p.peer_write_ack(b2.unwrap()).unwrap();
        let o = outs(&mut p);
        assert_eq!(completed(&o), vec![(2, true)]);
        assert!(handles(&o, 4).1.is_some());
        assert_eq!(p.stats().waiting_on_overlap, 0);
    }

    #[test]
    fn epochs_close_at_max_size_and_barrier_acks_go_oldest_first() {
        let mut cfg = PrimaryConfig::new(Protocol::C, 16 * MIB);
        cfg.max_epoch_size = 2;
        cfg.first_barrier_nr = u32::MAX; // wraps to 0 next
        let mut p = Primary::new(cfg).unwrap();
        p.connected().unwrap();
        for i in 0..5u64 {
            p.write(i, i * 8, 4096, WriteKind::Data, false).unwrap();
        }
        let o = outs(&mut p);
        assert_eq!(barriers(&o), vec![u32::MAX, 0]);
        // The barrier follows the second write of its epoch on the stream.
        let pos: Vec<usize> = o
            .iter()
            .enumerate()
            .filter(|(_, x)| matches!(x, O::SendBarrier { .. } | O::SendWrite { .. }))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(pos.len(), 7);
        assert!(matches!(o[pos[2]], O::SendBarrier { nr: u32::MAX }));
        assert!(matches!(o[pos[5]], O::SendBarrier { nr: 0 }));
        assert_eq!(p.stats().unacked_epochs, 2);
        // A barrier ack before the writes' acks is a protocol error (protocol C).
        assert_eq!(
            p.barrier_ack(u32::MAX, 2),
            Err(Error::Protocol("P_BARRIER_ACK before the write's ack"))
        );
        for x in &o {
            if let O::SendWrite { block_id, .. } = x {
                p.peer_write_ack(*block_id).unwrap();
            }
        }
        assert_eq!(
            p.barrier_ack(0, 2),
            Err(Error::Protocol("P_BARRIER_ACK for another epoch"))
        );
        p.barrier_ack(u32::MAX, 2).unwrap();
        p.barrier_ack(0, 2).unwrap();
    }

    #[test]
    fn flush_waits_for_local_flush_and_barrier_ack() {
        let mut p = primary(Protocol::C);
        p.write(1, 0, 4096, WriteKind::Data, false).unwrap();
        let o = outs(&mut p);
        let (t1, b1) = handles(&o, 1);
        p.flush(2).unwrap();
        let o = outs(&mut p);
        // The flush closes the epoch with write 1 in it: barrier first, then local flush.
        assert_eq!(barriers(&o), vec![100]);
        let ftag = flush_tag(&o);
        p.local_done(t1, true).unwrap();
        p.peer_write_ack(b1.unwrap()).unwrap();
        p.local_flush_done(ftag, true).unwrap();
        assert_eq!(completed(&outs(&mut p)), vec![(1, true)]);
        p.barrier_ack(100, 1).unwrap();
        let o = outs(&mut p);
        assert_eq!(completed(&o), vec![(2, true)]);
        assert!(p.local_flush_done(ftag, true).is_err());

        // Nothing outstanding: a local flush only.
        p.flush(3).unwrap();
        let o = outs(&mut p);
        assert!(barriers(&o).is_empty());
        let ftag = flush_tag(&o);
        p.local_flush_done(ftag, false).unwrap();
        assert_eq!(completed(&outs(&mut p)), vec![(3, false)]);
    }

    #[test]
    fn flush_waits_for_older_epochs_too() {
        let mut p = primary(Protocol::A);
        p.write(1, 0, 512, WriteKind::Data, false).unwrap();
        let o = outs(&mut p);
        let (t1, b1) = handles(&o, 1);
        p.local_done(t1, true).unwrap();
        p.handed_to_network(b1.unwrap()); // completes, closes epoch 100
        assert_eq!(barriers(&outs(&mut p)), vec![100]);
        p.flush(2).unwrap(); // current epoch empty; waits for 100
        let o = outs(&mut p);
        assert!(barriers(&o).is_empty());
        let ftag = flush_tag(&o);
        p.local_flush_done(ftag, true).unwrap();
        assert!(completed(&outs(&mut p)).is_empty());
        p.barrier_ack(100, 1).unwrap();
        assert_eq!(completed(&outs(&mut p)), vec![(2, true)]);
    }

    #[test]
    fn neg_ack_marks_out_of_sync_and_still_completes_ok() {
        let mut p = primary(Protocol::C);
        p.write(1, 16, 4096, WriteKind::Data, false).unwrap();
        let o = outs(&mut p);
        let (t, b) = handles(&o, 1);
        p.local_done(t, true).unwrap();
        p.peer_neg_ack(b.unwrap()).unwrap();
        assert_eq!(completed(&outs(&mut p)), vec![(1, true)]);
        assert!(p.out_of_sync().is_set(2));
        assert_eq!(p.out_of_sync_bytes(), 4096);
        assert!(p.peer_neg_ack(12345).is_err());
    }

    #[test]
    fn local_failure_completes_with_error_and_marks_out_of_sync() {
        let mut p = primary(Protocol::C);
        p.write(1, 0, 8192, WriteKind::Data, false).unwrap();
        let o = outs(&mut p);
        let (t, b) = handles(&o, 1);
        p.local_done(t, false).unwrap();
        assert_eq!(p.out_of_sync_bytes(), 8192);
        p.peer_write_ack(b.unwrap()).unwrap();
        assert_eq!(completed(&outs(&mut p)), vec![(1, false)]);
        assert_eq!(
            p.local_done(t, true),
            Err(Error::Invalid("local_done for a write not submitted"))
        );
    }

    #[test]
    fn disconnected_writes_complete_locally_and_mark_out_of_sync() {
        let mut p = primary(Protocol::C);
        p.connection_lost();
        p.write(1, 0, 512, WriteKind::Data, false).unwrap();
        let o = outs(&mut p);
        assert!(!o.iter().any(|x| matches!(x, O::SendWrite { .. })));
        let (t, _) = handles(&o, 1);
        p.local_done(t, true).unwrap();
        let o = outs(&mut p);
        assert_eq!(completed(&o), vec![(1, true)]);
        assert!(o.iter().any(|x| matches!(x, O::Retired { .. })));
        assert_eq!(p.out_of_sync_bytes(), 4096);
        assert_eq!(p.stats().slots_used, 0);
    }

    #[test]
    fn connection_loss_completes_waiting_writes_and_flushes() {
        let mut p = primary(Protocol::C);
        p.write(1, 0, 4096, WriteKind::Data, false).unwrap(); // will be local-done
        p.write(2, 64, 4096, WriteKind::Data, false).unwrap(); // local still pending
        let o = outs(&mut p);
        let (t1, _) = handles(&o, 1);
        let (t2, _) = handles(&o, 2);
        p.flush(3).unwrap();
        let ftag = flush_tag(&outs(&mut p));
        p.local_done(t1, true).unwrap();
        p.local_flush_done(ftag, true).unwrap();
        assert!(completed(&outs(&mut p)).is_empty());
        p.connection_lost();
        let o = outs(&mut p);
        let mut c = completed(&o);
        c.sort_unstable();
        assert_eq!(c, vec![(1, true), (3, true)]);
        assert_eq!(p.out_of_sync_bytes(), 8192);
        p.local_done(t2, true).unwrap();
        assert_eq!(completed(&outs(&mut p)), vec![(2, true)]);
        assert_eq!(p.stats().slots_used, 0);
        // Reconnected: new writes replicate; the bitmap stays.
        p.connected().unwrap();
        assert!(p.connected().is_err());
        p.write(4, 0, 512, WriteKind::Data, false).unwrap();
        assert!(outs(&mut p)
            .iter()
            .any(|x| matches!(x, O::SendWrite { id: 4, .. })));
        assert_eq!(p.out_of_sync_bytes(), 8192);
    }

    #[test]
    fn bounds_refuse_with_busy_and_bad_input_with_invalid() {
        let mut p = primary(Protocol::C);
        for i in 0..8u64 {
            p.write(i, i * 8, 512, WriteKind::Data, false).unwrap();
        }
        assert_eq!(p.write(9, 0, 512, WriteKind::Data, false), Err(Error::Busy));
        assert_eq!(p.flush(9), Err(Error::Busy));
        assert_eq!(p.stats().in_flight_writes, 8);
        let p2 = &mut primary(Protocol::C);
        assert!(matches!(
            p2.write(1, 0, 100, WriteKind::Data, false),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            p2.write(1, 16 * MIB - 1, 1024, WriteKind::Data, false),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            p2.write(1, u64::MAX, 512, WriteKind::Data, false),
            Err(Error::Invalid(_))
        ));
        assert!(p2.local_done(42, true).is_err());
        assert!(p2.peer_write_ack(u64::MAX).is_err());
        p2.handed_to_network(u64::MAX); // ignored, no panic
        let mut cfg = PrimaryConfig::new(Protocol::C, 8);
        cfg.max_unacked_writes = 1;
        cfg.max_in_flight = 2;
        assert!(Primary::new(cfg).is_err());
    }

    #[test]
    fn barrier_acked_writes_hold_slots_until_acked() {
        let mut cfg = PrimaryConfig::new(Protocol::C, 16 * MIB);
        cfg.max_in_flight = 2;
        cfg.max_unacked_writes = 2;
        let mut p = Primary::new(cfg).unwrap();
        p.connected().unwrap();
        for i in 0..2u64 {
            p.write(i, i * 8, 512, WriteKind::Data, false).unwrap();
        }
        let o = outs(&mut p);
        for i in 0..2 {
            let (t, b) = handles(&o, i);
            p.local_done(t, true).unwrap();
            p.peer_write_ack(b.unwrap()).unwrap();
        }
        let o = outs(&mut p);
        assert_eq!(completed(&o).len(), 2);
        // Completed but not barrier-acked: the transfer log is full.
        assert_eq!(p.write(5, 0, 512, WriteKind::Data, false), Err(Error::Busy));
        let nr = barriers(&o)[0];
        p.barrier_ack(nr, 2).unwrap();
        assert!(p.can_accept());
    }

    // ----- activity log --------------------------------------------------------------

    const EXT: u64 = 8192; // sectors per 4 MiB extent

    /// A Primary with a 67-slot activity log over a 1 GiB volume (256 extents).
    fn primary_al(p: Protocol, connected: bool) -> Primary {
        let mut cfg = PrimaryConfig::new(p, 1024 * MIB);
        cfg.max_in_flight = 64;
        cfg.max_unacked_writes = 128;
        cfg.meta = Some(MetaConfig::new(
            AlGeometry::default_ring(),
            67,
            1 << 20,
            1 << 21,
        ));
        let mut pr = Primary::new(cfg).unwrap();
        if connected {
            pr.connected().unwrap();
        }
        pr
    }

    fn meta_writes(o: &[O]) -> Vec<(u64, u64, bool)> {
        o.iter()
            .filter_map(|x| match x {
                O::MetaWrite {
                    tag,
                    offset,
                    preflush,
                    ..
                } => Some((*tag, *offset, *preflush)),
                _ => None,
            })
            .collect()
    }

    fn submitted(o: &[O]) -> Vec<u64> {
        o.iter()
            .filter_map(|x| match x {
                O::SubmitLocal { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    fn decode_tr(o: &[O]) -> crate::meta::al::AlBlock {
        let data = o
            .iter()
            .find_map(|x| match x {
                O::MetaWrite {
                    data,
                    preflush: true,
                    ..
                } => Some(data.clone()),
                _ => None,
            })
            .expect("a transaction");
        crate::meta::al::decode_block(&data)
    }

    #[test]
    fn a_miss_writes_the_transaction_before_the_data_and_concurrent_misses_share_one() {
        let mut p = primary_al(Protocol::C, true);
        p.write(1, 0, 4096, WriteKind::Data, false).unwrap();
        let o = outs(&mut p);
        assert!(submitted(&o).is_empty(), "data before its AL transaction");
        let m = meta_writes(&o);
        assert_eq!(m.len(), 1);
        let (t1, off, preflush) = m[0];
        assert!(preflush);
        assert_eq!(off, 1 << 20); // transaction 0 in ring block 0
        let u = decode_tr(&o).tr.updates;
        assert_eq!((u.len(), u[0].1), (1, 0), "one update, for extent 0");
        // Three more misses while it is written, plus a hit on extent 0's neighbour
        // block: the hit waits too (its extent is not committed yet).
        for (id, ext) in [(2u64, 5u64), (3, 6), (4, 7)] {
            p.write(id, ext * EXT, 4096, WriteKind::Data, false)
                .unwrap();
        }
        p.write(5, 8, 4096, WriteKind::Data, false).unwrap();
        assert!(outs(&mut p).is_empty());
        assert_eq!(p.stats().al_waiting, 5);
        p.meta_write_done(t1, true).unwrap();
        let o = outs(&mut p);
        assert_eq!(submitted(&o), vec![1, 5]);
        let m = meta_writes(&o);
        assert_eq!(m.len(), 1);
        let tr = decode_tr(&o);
        assert_eq!(tr.tr.tr_number, 1);
        assert_eq!(
            tr.tr.updates.len(),
            3,
            "one transaction for the three misses"
        );
        p.meta_write_done(m[0].0, true).unwrap();
        assert_eq!(submitted(&outs(&mut p)), vec![2, 3, 4]);
        assert_eq!(p.active_extents(), vec![0, 5, 6, 7]);
        // A hit needs no transaction.
        p.write(9, 5 * EXT + 8, 4096, WriteKind::Data, false)
            .unwrap();
        let o = outs(&mut p);
        assert!(meta_writes(&o).is_empty());
        assert_eq!(submitted(&o), vec![9]);
        assert!(matches!(
            p.meta_write_done(12345, true),
            Err(Error::Invalid(_))
        ));
    }

    /// Drives every metadata write to success; returns the writes submitted.
    fn settle(p: &mut Primary) -> Vec<O> {
        let mut all = Vec::new();
        loop {
            let o = outs(p);
            if o.is_empty() {
                return all;
            }
            for (tag, _, _) in meta_writes(&o) {
                p.meta_write_done(tag, true).unwrap();
            }
            all.extend(o);
        }
    }

    #[test]
    fn eviction_writes_the_dirty_bitmap_page_first_and_spares_unacked_extents() {
        let mut p = primary_al(Protocol::C, true);
        // Extent 0: a write completed by the peer but not barrier-acked yet.
        p.write(1, 0, 4096, WriteKind::Data, false).unwrap();
        let o = settle(&mut p);
        let (tag, bid) = handles(&o, 1);
        p.local_done(tag, true).unwrap();
        p.peer_write_ack(bid.unwrap()).unwrap();
        let o = outs(&mut p);
        assert_eq!(completed(&o), vec![(1, true)]);
        p.connection_lost();
        // Disconnected: extent 0's write retired (out of sync); now 66 more extents,
        // each written and completed locally (retired).
        let _ = outs(&mut p);
        for e in 1..67u64 {
            p.write(100 + e, e * EXT, 4096, WriteKind::Data, false)
                .unwrap();
            let o = settle(&mut p);
            let (tag, _) = handles(&o, 100 + e);
            p.local_done(tag, true).unwrap();
            let _ = outs(&mut p);
        }
        assert_eq!(p.active_extents().len(), 67);
        // The bitmap page of the evicted extent (0, the least recently used) is dirty:
        // a 68th extent writes that page, without preflush, before the transaction.
        p.write(500, 200 * EXT, 4096, WriteKind::Data, false)
            .unwrap();
        let o = outs(&mut p);
        let m = meta_writes(&o);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].1, 1 << 21, "bitmap page 0");
        assert!(!m[0].2);
        assert!(submitted(&o).is_empty());
        p.meta_write_done(m[0].0, true).unwrap();
        let o = outs(&mut p);
        let tr = decode_tr(&o);
        assert_eq!(tr.tr.updates, vec![(tr.tr.updates[0].0, 200)]);
        p.meta_write_done(meta_writes(&o)[0].0, true).unwrap();
        assert_eq!(submitted(&outs(&mut p)), vec![500]);
        assert!(!p.active_extents().contains(&0));
        // The page is clean now: the next eviction (extent 1, same page, nothing new)
        // goes straight to the transaction.
        p.write(501, 201 * EXT, 4096, WriteKind::Data, false)
            .unwrap();
        let m = meta_writes(&outs(&mut p));
        assert_eq!(m.len(), 1);
        assert!(m[0].2, "only the transaction");
    }

    #[test]
    fn an_extent_with_an_unacked_write_is_never_evicted() {
        let mut p = primary_al(Protocol::C, true);
        p.write(1, 0, 4096, WriteKind::Data, false).unwrap();
        let o = settle(&mut p);
        let (tag, bid) = handles(&o, 1);
        p.local_done(tag, true).unwrap();
        p.peer_write_ack(bid.unwrap()).unwrap();
        let o = outs(&mut p);
        let nr = barriers(&o)[0];
        // 66 more extents whose writes are fully acked and retired.
        for e in 1..67u64 {
            p.write(100 + e, e * EXT, 4096, WriteKind::Data, false)
                .unwrap();
            let o = settle(&mut p);
            let (tag, bid) = handles(&o, 100 + e);
            p.local_done(tag, true).unwrap();
            p.peer_write_ack(bid.unwrap()).unwrap();
            let o = outs(&mut p);
            let b = barriers(&o);
            if e == 1 {
                p.barrier_ack(nr, 1).unwrap();
            }
            p.barrier_ack(b[0], 1).unwrap();
            let _ = outs(&mut p);
        }
        // Extent 0 was acked; now pin extent 3 with an unacked write, then evict.
        p.write(300, 3 * EXT, 4096, WriteKind::Data, false).unwrap();
        let o = settle(&mut p);
        let (tag, _) = handles(&o, 300);
        p.local_done(tag, true).unwrap();
        let _ = outs(&mut p);
        for (i, e) in (100u64..166).enumerate() {
            p.write(1000 + i as u64, e * EXT, 4096, WriteKind::Data, false)
                .unwrap();
            let o = settle(&mut p);
            let (tag, bid) = handles(&o, 1000 + i as u64);
            p.local_done(tag, true).unwrap();
            p.peer_write_ack(bid.unwrap()).unwrap();
            let _ = outs(&mut p);
            assert!(p.active_extents().contains(&3), "evicted a held extent");
        }
    }

    #[test]
    fn a_failed_transaction_fails_the_waiting_writes_and_stops_the_disk() {
        let mut p = primary_al(Protocol::C, false);
        p.write(1, 0, 4096, WriteKind::Data, false).unwrap();
        p.write(2, 9 * EXT, 4096, WriteKind::Data, false).unwrap();
        let o = outs(&mut p);
        let t = meta_writes(&o)[0].0;
        p.meta_write_done(t, false).unwrap();
        let o = outs(&mut p);
        assert_eq!(completed(&o), vec![(1, false), (2, false)]);
        assert!(p.active_extents().is_empty());
        assert_eq!(p.stats().slots_used, 0);
        // The disk is out of use from now on (DRBD's detach): later writes fail too, and
        // no transaction is written again.
        assert!(p.stats().meta_failed);
        p.write(3, 0, 4096, WriteKind::Data, false).unwrap();
        let o = outs(&mut p);
        assert_eq!(completed(&o), vec![(3, false)]);
        assert!(meta_writes(&o).is_empty() && submitted(&o).is_empty());
    }

    #[test]
    fn a_write_over_more_extents_than_one_transaction_adds_is_refused() {
        let mut p = primary_al(Protocol::C, true);
        assert!(matches!(
            p.write(1, 0, 65 * 4 * 1024 * 1024, WriteKind::Discard, false),
            Err(Error::Invalid(_))
        ));
        p.write(2, 0, 64 * 4 * 1024 * 1024, WriteKind::Discard, false)
            .unwrap();
    }

    // ----- diskless (detached) Primary -------------------------------------------------

    fn sent_ids(o: &[O]) -> Vec<(u64, u64)> {
        o.iter()
            .filter_map(|x| match x {
                O::SendWrite { id, block_id, .. } => Some((*id, *block_id)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn detached_writes_skip_the_disk_and_the_log_and_complete_on_the_peer_s_ack() {
        let mut p = primary_al(Protocol::C, true);
        p.detach_local();
        assert!(p.is_detached() && p.stats().detached);
        for (id, ext) in [(1u64, 0u64), (2, 9)] {
            p.write(id, ext * EXT, 4096, WriteKind::Data, false)
                .unwrap();
        }
        p.write(3, 20 * EXT, 8192, WriteKind::Discard, false)
            .unwrap();
        p.write(4, 30 * EXT, 4096, WriteKind::Zeroes { unmap: true }, true)
            .unwrap();
        let o = outs(&mut p);
        assert!(
            submitted(&o).is_empty(),
            "a detached disk got a write: {o:?}"
        );
        assert!(meta_writes(&o).is_empty(), "an AL transaction after detach");
        assert!(p.active_extents().is_empty());
        assert_eq!(p.stats().al, None);
        let sent = sent_ids(&o);
        assert_eq!(sent.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
        // The local disk lacks every block written.
        assert_eq!(p.out_of_sync_bytes(), 4096 + 4096 + 8192 + 4096);
        assert!(completed(&o).is_empty(), "completed before the peer's ack");
        for &(_, bid) in &sent {
            p.peer_write_ack(bid).unwrap();
        }
        let o = outs(&mut p);
        assert_eq!(
            completed(&o),
            vec![(1, true), (2, true), (3, true), (4, true)]
        );
    }

    #[test]
    fn a_detached_write_fails_on_neg_ack_connection_loss_or_when_disconnected() {
        let mut p = primary(Protocol::C);
        p.detach_local();
        p.write(1, 0, 4096, WriteKind::Data, false).unwrap();
        p.write(2, 64, 4096, WriteKind::Data, false).unwrap();
        let o = outs(&mut p);
        let sent = sent_ids(&o);
        // Neg-ack: the peer does not have it, neither does the local disk.
        p.peer_neg_ack(sent[0].1).unwrap();
        assert_eq!(completed(&outs(&mut p)), vec![(1, false)]);
        // Connection lost before the ack.
        p.connection_lost();
        assert_eq!(completed(&outs(&mut p)), vec![(2, false)]);
        // Disconnected: not sent at all, fails at once (no SubmitLocal either).
        p.write(3, 128, 4096, WriteKind::Data, false).unwrap();
        let o = outs(&mut p);
        assert!(submitted(&o).is_empty() && sent_ids(&o).is_empty());
        assert_eq!(completed(&o), vec![(3, false)]);
        // A chain of overlapping writes each fails in turn (iteratively).
        for id in 10..18u64 {
            p.write(id, 0, 4096, WriteKind::Data, false).unwrap();
        }
        let o = outs(&mut p);
        assert_eq!(completed(&o).len(), 8);
        assert!(completed(&o).iter().all(|c| !c.1));
        assert_eq!(p.stats().slots_used, 0);
        assert_eq!(p.stats().in_flight_writes, 0);
    }

    /// Under protocols B and A a detached write is sent as under C and completes only on
    /// the peer's `P_WRITE_ACK`: its disk is the only copy.
    #[test]
    fn a_detached_write_under_protocols_b_and_a_waits_for_the_peer_s_disk() {
        for protocol in [Protocol::B, Protocol::A] {
            let mut p = primary(protocol);
            p.detach_local();
            p.write(1, 0, 4096, WriteKind::Data, false).unwrap();
            let o = outs(&mut p);
            let Some(&O::SendWrite {
                block_id, dp_flags, ..
            }) = o.iter().find(|x| matches!(x, O::SendWrite { .. }))
            else {
                panic!("not sent: {o:?}");
            };
            assert_eq!(
                dp_flags & (dp::DP_SEND_WRITE_ACK | dp::DP_SEND_RECEIVE_ACK),
                dp::DP_SEND_WRITE_ACK,
                "{protocol:?}"
            );
            p.handed_to_network(block_id);
            assert!(p.peer_recv_ack(block_id).is_err(), "not what it asked for");
            assert!(
                completed(&outs(&mut p)).is_empty(),
                "{protocol:?}: only received"
            );
            p.peer_write_ack(block_id).unwrap();
            assert_eq!(completed(&outs(&mut p)), vec![(1, true)]);
        }
        // Before the detach the configured protocol holds.
        let mut p = primary(Protocol::B);
        p.write(1, 0, 4096, WriteKind::Data, false).unwrap();
        let o = outs(&mut p);
        assert!(o.iter().any(|x| matches!(x, O::SendWrite { dp_flags, .. }
            if dp_flags & dp::DP_SEND_RECEIVE_ACK != 0)));
    }

    #[test]
    fn a_detached_flush_needs_no_local_flush_and_the_peer_s_barrier_acks() {
        let mut p = primary(Protocol::C);
        p.detach_local();
        // Nothing outstanding: completes at once, without a local flush.
        p.flush(1).unwrap();
        let o = outs(&mut p);
        assert!(!o.iter().any(|x| matches!(x, O::SubmitLocalFlush { .. })));
        assert_eq!(completed(&o), vec![(1, true)]);
        // After a write: waits for its epoch's barrier ack.
        p.write(2, 0, 4096, WriteKind::Data, false).unwrap();
        let bid = sent_ids(&outs(&mut p))[0].1;
        p.peer_write_ack(bid).unwrap();
        let o = outs(&mut p);
        let nr = barriers(&o)[0];
        p.flush(3).unwrap();
        let o = outs(&mut p);
        assert!(!o.iter().any(|x| matches!(x, O::SubmitLocalFlush { .. })));
        assert!(completed(&o).is_empty());
        p.barrier_ack(nr, 1).unwrap();
        assert!(completed(&outs(&mut p)).contains(&(3, true)));
        // The connection is lost while a flush waits: it fails.
        p.write(4, 0, 4096, WriteKind::Data, false).unwrap();
        let bid = sent_ids(&outs(&mut p))[0].1;
        p.peer_write_ack(bid).unwrap();
        let _ = outs(&mut p);
        p.flush(5).unwrap();
        p.connection_lost();
        assert!(completed(&outs(&mut p)).contains(&(5, false)));
        // Disconnected: fails at once.
        p.flush(6).unwrap();
        assert_eq!(completed(&outs(&mut p)), vec![(6, false)]);
        assert_eq!(p.stats().in_flight_flushes, 0);
    }

    #[test]
    fn writes_in_flight_at_the_detach_keep_their_local_rules() {
        let mut p = primary(Protocol::C);
        p.write(1, 0, 4096, WriteKind::Data, false).unwrap();
        p.flush(2).unwrap();
        let o = outs(&mut p);
        let (tag, bid) = handles(&o, 1);
        let ftag = flush_tag(&o);
        let nr = barriers(&o)[0];
        p.detach_local();
        // Its local write fails (the driver fails it on the detached disk): EIO, even
        // though the peer acked.
        p.peer_write_ack(bid.unwrap()).unwrap();
        p.local_done(tag, false).unwrap();
        let o = outs(&mut p);
        assert_eq!(completed(&o), vec![(1, false)]);
        // The flush submitted before the detach waits for its local flush.
        p.local_flush_done(ftag, false).unwrap();
        p.barrier_ack(nr, 1).unwrap();
        assert!(completed(&outs(&mut p)).contains(&(2, false)));
        // A write that waited on write 1's overlap starts after the detach: diskless.
        let mut p = primary(Protocol::C);
        p.write(1, 0, 4096, WriteKind::Data, false).unwrap();
        p.write(2, 0, 4096, WriteKind::Data, false).unwrap();
        let o = outs(&mut p);
        let (tag, bid) = handles(&o, 1);
        p.detach_local();
        p.peer_write_ack(bid.unwrap()).unwrap();
        p.local_done(tag, true).unwrap();
        let o = outs(&mut p);
        assert_eq!(completed(&o), vec![(1, true)]);
        assert!(submitted(&o).is_empty());
        let sent = sent_ids(&o);
        assert_eq!(sent.len(), 1);
        p.peer_write_ack(sent[0].1).unwrap();
        assert_eq!(completed(&outs(&mut p)), vec![(2, true)]);
    }

    #[test]
    fn writes_waiting_for_the_log_at_the_detach_follow_its_transaction() {
        // The transaction fails: its waiters get EIO as before; later writes go diskless.
        let mut p = primary_al(Protocol::C, true);
        p.write(1, 0, 4096, WriteKind::Data, false).unwrap();
        let t = meta_writes(&outs(&mut p))[0].0;
        p.detach_local();
        p.write(2, 9 * EXT, 4096, WriteKind::Data, false).unwrap();
        let o = outs(&mut p);
        assert!(meta_writes(&o).is_empty() && submitted(&o).is_empty());
        p.meta_write_done(t, false).unwrap();
        let o = outs(&mut p);
        assert_eq!(completed(&o), vec![(1, false)]);
        assert!(meta_writes(&o).is_empty());
        assert_eq!(p.stats().al, None);
        // The transaction succeeds: its waiters start diskless, and no further
        // transaction is written for writes that found no room or wait on it.
        let mut p = primary_al(Protocol::C, true);
        p.write(1, 0, 4096, WriteKind::Data, false).unwrap();
        let t = meta_writes(&outs(&mut p))[0].0;
        p.write(2, 9 * EXT, 4096, WriteKind::Data, false).unwrap();
        let _ = outs(&mut p);
        p.detach_local();
        p.meta_write_done(t, true).unwrap();
        let o = outs(&mut p);
        assert!(meta_writes(&o).is_empty(), "a transaction after the detach");
        assert!(submitted(&o).is_empty());
        let sent = sent_ids(&o);
        assert_eq!(sent.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2]);
        for &(_, bid) in &sent {
            p.peer_write_ack(bid).unwrap();
        }
        assert_eq!(completed(&outs(&mut p)), vec![(1, true), (2, true)]);
        assert_eq!(p.stats().al_waiting, 0);
    }
}
