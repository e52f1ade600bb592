//! The node's resync runs: which [`Target`] and [`Source`] run — and this node's side of
//! an online verify ([`VerifySource`] or [`VerifyPeer`]) — under which run id, the
//! application writes a target holds, the end of a run, and how the machines' outputs
//! become actions. The daemon (`volume/sync.rs`) and the simulator (`sim/resync.rs`)
//! both reach this type through their node ([`super::Node::step`]'s resync events; the
//! node's drain turns [`SyncAction`]s into its actions); each only performs the actions
//! and feeds completions back, so the rules below are checked by the simulator's seeds,
//! not only by integration tests.
//!
//! The rules that live here:
//!
//! - **One bitmap.** The node's out-of-sync bitmap stays its driver's (the Primary core
//!   owns it in the daemon); every call that reads or changes it borrows it.
//! - **Run ids.** Each run gets an id; its reads and writes carry it. A connection loss
//!   ends the source at once (its reads complete into nothing) and *cuts* the target:
//!   the walk's position is kept for the next run ([`Target::resume_position`]), nothing
//!   more is sent, and the cut target stays only while its reads and writes are in
//!   flight. Those complete but clear no bit (a set bit only costs a resync; a cleared
//!   one could hide a write this node took meanwhile), and application writes that
//!   overlap a resync write still in flight wait for it, so the disk never takes an old
//!   resync write after a newer one. [`SyncRuns::idle`] says when no resync IO is left; a
//!   driver connects again only then.
//! - **Held writes.** An application write the target must hold (its rule 3) waits here
//!   with the driver's payload `H` until [`SyncAction::Release`] — also across a
//!   connection loss, until the resync write it waits for is done. A write the target
//!   cannot track (its bound) goes at once and its range is resynced again.
//! - **Writes in flight at the start.** A target or source that starts while application
//!   writes are on the disk is told of them first (the simulator found that a resync
//!   write could otherwise overtake one).
//! - **Failed local writes** ([`FailedLocal`], seed 30): a source's `SetInSync` never
//!   clears a block whose local write failed during the connection.
//! - **The end.** A target's `Finished` keeps the run (finishing) until the driver has
//!   made the end durable ([`SyncRuns::end_recorded`]); [`SyncAction::Finished`] carries
//!   the peer's UUIDs to adopt when nothing is left.
//! - **Stream classes.** Acks travel on the meta stream, requests and data on the
//!   resync stream ([`SyncAction::Send`]).
//! - **Lazy bitmap write-out.** Every [`BITMAP_WRITEOUT_MS`] of a target run with cleared
//!   bits not yet on disk, [`SyncAction::WriteBack`].
//! - **Online verify.** One side at a time (this node's `verify`, or the peer's first
//!   `P_OV_REQUEST`); a block found different is marked in the bitmap (a later
//!   disconnect/connect resyncs it); a connection loss interrupts it and reports where.
//!
//! Contract (programmer errors, asserted by the caller with the core's `Invalid`
//! errors): a completion for a tag the machine does not know; operating errors (a bad
//! packet, a full queue) are `Err` for the driver to drop the connection.
//!
//! Bounds: the machines' own (the target's requests, the source's queue and reads), the
//! held writes ≤ the target's `max_app_writes`, [`FailedLocal::MAX`] failed ranges.

use super::FailedLocal;
use crate::net::Stream;
use crate::request::OutOfSync;
use crate::resync::{
    Digest, Error, Inbound, ReadOutcome, ResyncSummary, Source, SourceConfig, SourceOutput, Target,
    TargetConfig, TargetOutput, TickInput, VerifyConfig, VerifyOutput, VerifyPeer, VerifyProgress,
    VerifySource,
};
use crate::state::uuid::UuidSet;
use crate::wire::Packet;
use std::collections::HashMap;

/// Cleared target bits reach the disk at most this often (DRBD writes its bitmap lazily
/// during resync, too): what a restart in the middle of a resync redoes is at most this
/// much of resync.
pub(crate) const BITMAP_WRITEOUT_MS: u64 = 5_000;

/// What a resync read is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadFor {
    /// The source answers a request.
    Source { digest: bool, zero_check: bool },
    /// The target digests its own range for a checksum request.
    TargetDigest,
    /// Online verify digests a block (either side).
    Verify,
}

/// A read a run asks for, carried as it is through the driver's IO to its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunRead {
    pub(crate) run: u64,
    pub(crate) tag: u64,
    pub(crate) sector: u64,
    pub(crate) len: u32,
    pub(crate) purpose: ReadFor,
}

/// What the driver must do for the runs.
#[derive(Debug)]
pub(crate) enum SyncAction<H> {
    /// Send `pkt` on `stream`. `reply`: the tag of the source read whose data is the
    /// packet's payload (`P_RS_DATA_REPLY`); the driver frees that buffer.
    Send {
        stream: Stream,
        pkt: Packet,
        reply: Option<u64>,
    },
    /// Read the range of the local disk; report it to [`SyncRuns::digest_done`],
    /// [`SyncRuns::source_read_done`] or [`SyncRuns::verify_digest_done`] (by its
    /// purpose) with its `run` and `tag`.
    Read(RunRead),
    /// Write zeroes over the range; report [`SyncRuns::write_done`].
    WriteZeroes {
        run: u64,
        tag: u64,
        sector: u64,
        len: u32,
    },
    /// A held application write may go now.
    Release { write: H },
    /// The target's cleared bits should reach the disk (flush the data first).
    WriteBack,
    /// The target's run ended: make it durable (flush, bitmap pages, and with `adopt`
    /// the UUIDs and "consistent"), then call [`SyncRuns::end_recorded`].
    Finished {
        run: u64,
        summary: ResyncSummary,
        /// The peer's UUIDs from the handshake, when nothing is left to fetch.
        adopt: Option<UuidSet>,
    },
    /// The online verify (either side) is over; its blocks found different are marked.
    VerifyFinished(VerifyProgress),
}

/// This node's side of an online verify.
enum Verify {
    /// This node ran `verify` (VerifyS).
    Source(Box<VerifySource>),
    /// The peer did (VerifyT).
    Peer(Box<VerifyPeer>),
}

impl Verify {
    fn progress(&self) -> VerifyProgress {
        match self {
            Verify::Source(v) => v.progress(),
            Verify::Peer(v) => v.progress(),
        }
    }
}

/// A running SyncTarget.
struct TargetRun<H> {
    t: Target,
    run: u64,
    peer_uuids: UuidSet,
    held: HashMap<u64, H>,
    /// When the cleared bits were last written (ms).
    written_ms: u64,
    finishing: bool,
    /// The connection ended; kept while its IO is in flight (see the module docs).
    cut: bool,
}

/// A running SyncSource (lives as long as the connection: late acks still clear bits).
struct SourceRun {
    s: Source,
    run: u64,
}

/// The node's resync runs (see the module docs). `H`: the driver's payload of a held
/// application write.
pub(crate) struct SyncRuns<H> {
    target: Option<TargetRun<H>>,
    source: Option<SourceRun>,
    /// Online verify and its run id.
    verify: Option<(Verify, u64)>,
    /// The last run id handed out.
    last_run: u64,
    /// Where the next target starts.
    resume_block: u64,
    /// Reads and writes of any run in flight.
    io_in_flight: u64,
    /// A target's end being recorded (outlives a connection loss).
    finishing: Option<u64>,
    failed: FailedLocal,
    /// Application writes the target could not track (their ranges resync again).
    untracked: u64,
    /// The operator paused resync (`pause-sync`): a target, and each one started while
    /// paused, requests nothing until `resume-sync`.
    paused: bool,
    out: Vec<SyncAction<H>>,
    /// Deliberate bugs for the simulator's sabotage tests, given to each new target.
    #[cfg(test)]
    pub(crate) target_sabotage: crate::resync::TargetSabotage,
    /// Online verify reports the blocks it finds different but marks none.
    #[cfg(test)]
    pub(crate) sabotage_verify_marks_nothing: bool,
}

impl<H> Default for SyncRuns<H> {
    fn default() -> Self {
        SyncRuns {
            target: None,
            source: None,
            verify: None,
            last_run: 0,
            resume_block: 0,
            io_in_flight: 0,
            finishing: None,
            failed: FailedLocal::default(),
            untracked: 0,
            paused: false,
            out: Vec::new(),
            #[cfg(test)]
            target_sabotage: Default::default(),
            #[cfg(test)]
            sabotage_verify_marks_nothing: false,
        }
    }
}

impl<H> SyncRuns<H> {
    fn new_run(&mut self) -> u64 {
        self.last_run += 1;
        self.last_run
    }

    /// Whether the operator paused resync.
    pub(crate) fn paused(&self) -> bool {
        self.paused
    }

    /// No resync IO in flight and no end being recorded: a new connection may start.
    pub(crate) fn idle(&self) -> bool {
        self.io_in_flight == 0 && self.finishing.is_none()
    }

    /// The actions the last calls produced, in order.
    pub(crate) fn take_actions(&mut self) -> Vec<SyncAction<H>> {
        std::mem::take(&mut self.out)
    }

    /// Returns the (emptied) vector [`Self::take_actions`] gave, so that its room is
    /// reused (no allocation per drain once grown).
    pub(crate) fn give_back(&mut self, mut emptied: Vec<SyncAction<H>>) {
        if self.out.is_empty() {
            emptied.clear();
            self.out = emptied;
        }
    }

    /// The running target, if any (not one the connection cut).
    pub(crate) fn target(&self) -> Option<&Target> {
        self.live_ref().map(|r| &r.t)
    }

    /// The running target's run id.
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn target_run(&self) -> Option<u64> {
        self.live_ref().map(|r| r.run)
    }

    fn live_ref(&self) -> Option<&TargetRun<H>> {
        self.target.as_ref().filter(|r| !r.cut)
    }

    fn live(&mut self) -> Option<&mut TargetRun<H>> {
        self.target.as_mut().filter(|r| !r.cut)
    }

    /// The running source, if any.
    pub(crate) fn source(&self) -> Option<&Source> {
        self.source.as_ref().map(|r| &r.s)
    }

    /// Application writes held by the target.
    pub(crate) fn held(&self) -> usize {
        self.target.as_ref().map_or(0, |r| r.held.len())
    }

    /// Application writes the target could not track since this value was created.
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn untracked(&self) -> u64 {
        self.untracked
    }

    /// The blocks set in `bm` that no failed local write of this connection explains
    /// ([`FailedLocal::blocks_outside`]).
    pub(crate) fn unexplained(&self, bm: &OutOfSync) -> u64 {
        self.failed.blocks_outside(bm)
    }

    /// The failed-local-write rule, for the simulator's sabotage.
    #[cfg(test)]
    pub(crate) fn failed_mut(&mut self) -> &mut FailedLocal {
        &mut self.failed
    }

    /// Starts a target over `bm` (its set bits are what to fetch), at the previous run's
    /// resume position, told of the writes on the disk now as `(tag or token, sector,
    /// len)`: this node's (submitted, not retired; each ended with
    /// [`Self::primary_write_retired`]) and the peer's (each ended with
    /// [`Self::peer_write_end`]). Returns the run id.
    pub(crate) fn start_target(
        &mut self,
        mut cfg: TargetConfig,
        bm: &OutOfSync,
        tick: &TickInput,
        peer_uuids: UuidSet,
        (primary, peer): (
            impl IntoIterator<Item = (u64, u64, u32)>,
            impl IntoIterator<Item = (u64, u64, u32)>,
        ),
    ) -> Result<u64, Error> {
        let primary = primary
            .into_iter()
            .map(|(tag, sector, len)| (primary_id(tag), sector, len));
        let in_flight = primary.chain(peer);
        cfg.start_block = self.resume_block;
        let mut t = Target::new(cfg, bm, tick)?;
        if let Some(old) = self.target.take() {
            // A cut run whose IO outlived the driver's wait: its completions are dropped
            // from now on and the writes it held go.
            self.out.extend(
                old.held
                    .into_values()
                    .map(|write| SyncAction::Release { write }),
            );
        }
        #[cfg(test)]
        {
            t.sabotage = self.target_sabotage;
        }
        if self.paused {
            t.pause(tick.now_ms);
        }
        for (id, sector, len) in in_flight {
            // A new target holds nothing: nothing of it is being written yet.
            t.app_write_begin(id, sector, len)?;
        }
        let run = self.new_run();
        self.target = Some(TargetRun {
            t,
            run,
            peer_uuids,
            held: HashMap::new(),
            written_ms: tick.now_ms,
            finishing: false,
            cut: false,
        });
        Ok(run)
    }

    /// Starts the source unless one runs (a peer's first request, or the handshake).
    /// `in_flight`: application writes on the disk now, `(tag, sector, len)`.
    pub(crate) fn ensure_source(
        &mut self,
        cfg: SourceConfig,
        tick: &TickInput,
        peer_primary: bool,
        in_flight: impl IntoIterator<Item = (u64, u64, u32)>,
    ) -> Result<(), Error> {
        if self.source.is_some() {
            return Ok(());
        }
        let mut s = Source::new(cfg, tick)?;
        s.set_peer_primary(peer_primary);
        for (tag, sector, len) in in_flight {
            s.app_write_begin(tag, sector, len)?;
        }
        let run = self.new_run();
        self.source = Some(SourceRun { s, run });
        Ok(())
    }

    /// The peer's role changed (a Primary peer's requests are not throttled).
    pub(crate) fn set_peer_primary(&mut self, primary: bool) {
        if let Some(r) = self.source.as_mut() {
            r.s.set_peer_primary(primary);
        }
    }

    /// Pauses or resumes the target, and every target started until resumed.
    pub(crate) fn set_paused(&mut self, paused: bool, now_ms: u64) {
        self.paused = paused;
        if let Some(r) = self.live() {
            if paused {
                r.t.pause(now_ms);
            } else {
                r.t.resume(now_ms);
            }
        }
    }

    /// The connection is gone (see the module docs): the source ends, the target is cut
    /// (its position kept for the next run), failed writes are forgotten (the next
    /// handshake resyncs their bits). Returns where an online verify was interrupted.
    pub(crate) fn connection_lost(&mut self) -> Option<VerifyProgress> {
        self.failed.connection_lost();
        self.source = None;
        let verify = self.verify.take().map(|(v, _)| v.progress());
        let Some(r) = self.live() else {
            return verify;
        };
        if r.finishing {
            self.target = None;
            self.resume_block = 0;
            return verify;
        }
        r.t.connection_lost();
        r.cut = true;
        self.resume_block = r.t.resume_position();
        self.retire_cut();
        verify
    }

    /// Starts this node's online verify (VerifyS).
    pub(crate) fn start_verify(
        &mut self,
        cfg: VerifyConfig,
        tick: &TickInput,
    ) -> Result<(), Error> {
        if self.verify.is_some() {
            return Err(Error::Invalid("an online verify is already running"));
        }
        let v = VerifySource::new(cfg, tick)?;
        let run = self.new_run();
        self.verify = Some((Verify::Source(Box::new(v)), run));
        Ok(())
    }

    /// Whether an online verify runs (either side).
    pub(crate) fn verify_running(&self) -> bool {
        self.verify.is_some()
    }

    /// The peer's first `P_OV_REQUEST` starts this node's side (VerifyT) at its sector.
    pub(crate) fn start_verify_peer(&mut self, cfg: VerifyConfig) -> Result<(), Error> {
        if self.verify.is_some() {
            return Err(Error::Invalid("an online verify is already running"));
        }
        let p = VerifyPeer::new(cfg)?;
        let run = self.new_run();
        self.verify = Some((Verify::Peer(Box::new(p)), run));
        Ok(())
    }

    /// Whether the peer's verify may send another request now (the driver stops reading
    /// the stream otherwise).
    pub(crate) fn verify_can_accept(&self) -> bool {
        match &self.verify {
            Some((Verify::Peer(p), _)) => p.can_accept(),
            _ => true,
        }
    }

    /// The running verify's side (`VerifyS` or `VerifyT`) and progress.
    pub(crate) fn verify_progress(&self) -> Option<(&'static str, VerifyProgress)> {
        self.verify.as_ref().map(|(v, _)| match v {
            Verify::Source(s) => ("VerifyS", s.progress()),
            Verify::Peer(p) => ("VerifyT", p.progress()),
        })
    }

    /// A verify digest read ended (`None`: it failed).
    pub(crate) fn verify_digest_done(
        &mut self,
        bm: &mut OutOfSync,
        run: u64,
        tag: u64,
        digest: Option<Digest>,
    ) -> Result<(), Error> {
        self.io_in_flight = self.io_in_flight.saturating_sub(1);
        let r = match self.verify.as_mut().filter(|(_, r)| *r == run) {
            Some((Verify::Source(v), _)) => v.digest_done(tag, digest),
            Some((Verify::Peer(v), _)) => v.digest_done(tag, digest),
            None => Ok(()),
        };
        self.pump(bm);
        r
    }

    /// Drops a cut target once nothing of it is in flight (it then holds no write).
    fn retire_cut(&mut self) {
        if self
            .target
            .as_ref()
            .is_some_and(|r| r.cut && r.t.requests_in_flight() == 0)
        {
            if let Some(r) = self.target.take() {
                debug_assert!(r.held.is_empty());
                self.out.extend(
                    r.held
                        .into_values()
                        .map(|write| SyncAction::Release { write }),
                );
            }
        }
    }

    /// One step of the rate controllers; returns whether a run still needs the clock.
    pub(crate) fn tick(&mut self, bm: &mut OutOfSync, input: &TickInput) -> bool {
        if let Some(r) = self.live() {
            r.t.tick(bm, input);
            if !r.finishing && input.now_ms >= r.written_ms + BITMAP_WRITEOUT_MS {
                r.written_ms = input.now_ms;
                // A stalled or paused run has nothing to write.
                if bm.needs_write_back() {
                    self.out.push(SyncAction::WriteBack);
                }
            }
        }
        if let Some(r) = self.source.as_mut() {
            r.s.tick(input);
        }
        let verifying = match self.verify.as_mut() {
            Some((Verify::Source(v), _)) => {
                v.tick(input);
                true
            }
            _ => false,
        };
        self.pump(bm);
        self.live_ref().is_some() || self.source.is_some() || verifying
    }

    /// Whether the source takes another request now (the driver stops reading the
    /// stream otherwise). No source yet: it will be started with room.
    pub(crate) fn source_can_accept(&self) -> bool {
        self.source.as_ref().is_none_or(|r| r.s.can_accept())
    }

    /// A resync or online-verify packet without data (not `P_RS_DATA_REPLY`). A request
    /// needs a source ([`Self::ensure_source`]) with room, a `P_OV_REQUEST` the peer's
    /// verify ([`Self::start_verify_peer`]).
    pub(crate) fn inbound(&mut self, bm: &mut OutOfSync, inbound: Inbound) -> Result<(), String> {
        let e = |e: Error| e.to_string();
        let target = self.target.as_mut().filter(|r| !r.cut).map(|r| &mut r.t);
        let r = match inbound {
            Inbound::RsRequest { sector, len, kind } => match self.source.as_mut() {
                Some(r) => r.s.request(sector, len, kind).map_err(e),
                None => Err("resync request without a source".into()),
            },
            Inbound::RsWriteAck { sector, len } => match self.source.as_mut() {
                Some(r) => r.s.rs_write_ack(sector, len).map_err(e),
                None => Ok(()),
            },
            Inbound::RsNegAck { sector, len } => match self.source.as_mut() {
                Some(r) => r.s.neg_ack(sector, len).map_err(e),
                None => Ok(()),
            },
            Inbound::RsDeallocated { sector, len } => match target {
                Some(t) => t.deallocated(bm, sector, len).map_err(e),
                None => Err("P_RS_DEALLOCATED while not SyncTarget".into()),
            },
            Inbound::RsIsInSync { sector, len } => match target {
                Some(t) => t.in_sync_reply(bm, sector, len).map_err(e),
                None => Err("P_RS_IS_IN_SYNC while not SyncTarget".into()),
            },
            Inbound::NegRsDReply { sector, len } => match target {
                Some(t) => t.neg_reply(bm, sector, len).map_err(e),
                None => Err("P_NEG_RS_DREPLY while not SyncTarget".into()),
            },
            Inbound::RsCancel { sector, len } => match target {
                Some(t) => t.cancel_reply(bm, sector, len).map_err(e),
                None => Err("P_RS_CANCEL while not SyncTarget".into()),
            },
            Inbound::RsDataReply { .. } => Err("P_RS_DATA_REPLY without its data".into()),
            Inbound::OvRequest { sector, len } => match self.verify.as_mut() {
                Some((Verify::Peer(p), _)) => p.ov_request(sector, len).map_err(e),
                _ => Err("P_OV_REQUEST while this node runs its own verify".into()),
            },
            Inbound::OvReply {
                sector,
                len,
                digest,
            } => match self.verify.as_mut() {
                Some((Verify::Source(v), _)) => v.ov_reply(sector, len, digest).map_err(e),
                _ => Err("P_OV_REPLY without a verify of this node".into()),
            },
            Inbound::OvResult {
                sector,
                len,
                in_sync,
            } => match self.verify.as_mut() {
                Some((Verify::Peer(p), _)) => p.ov_result(sector, len, in_sync).map_err(e),
                _ => Err("P_OV_RESULT without the peer's verify".into()),
            },
        };
        self.pump(bm);
        r
    }

    /// `P_RS_DATA_REPLY`: `Some((run, tag))` when its data must be written (report
    /// [`Self::write_done`]); `None` when it is void (an application write overtook it).
    pub(crate) fn data_reply(
        &mut self,
        bm: &mut OutOfSync,
        sector: u64,
        len: u32,
    ) -> Result<Option<(u64, u64)>, String> {
        let Some(r) = self.live() else {
            return Err("P_RS_DATA_REPLY while not SyncTarget".into());
        };
        let tag = r.t.data_reply(bm, sector, len).map_err(|e| e.to_string())?;
        let run = r.run;
        if tag.is_some() {
            self.io_in_flight += 1;
        }
        self.pump(bm);
        Ok(tag.map(|tag| (run, tag)))
    }

    /// A target's digest read ended (`None`: it failed).
    pub(crate) fn digest_done(
        &mut self,
        bm: &mut OutOfSync,
        run: u64,
        tag: u64,
        digest: Option<Digest>,
    ) -> Result<(), Error> {
        self.io_in_flight = self.io_in_flight.saturating_sub(1);
        let r = match self.target.as_mut().filter(|r| r.run == run) {
            Some(r) => r.t.digest_done(bm, tag, digest),
            None => Ok(()),
        };
        self.pump(bm);
        self.retire_cut();
        r
    }

    /// A source's read ended.
    pub(crate) fn source_read_done(
        &mut self,
        bm: &mut OutOfSync,
        run: u64,
        tag: u64,
        outcome: ReadOutcome,
    ) -> Result<(), Error> {
        self.io_in_flight = self.io_in_flight.saturating_sub(1);
        let r = match self.source.as_mut().filter(|r| r.run == run) {
            Some(r) => r.s.read_done(tag, outcome),
            None => Ok(()),
        };
        self.pump(bm);
        r
    }

    /// A target's write (data or zeroes) ended.
    pub(crate) fn write_done(
        &mut self,
        bm: &mut OutOfSync,
        run: u64,
        tag: u64,
        ok: bool,
    ) -> Result<(), Error> {
        self.io_in_flight = self.io_in_flight.saturating_sub(1);
        let r = match self.target.as_mut().filter(|r| r.run == run) {
            // A cut run's write clears nothing (see the module docs). The target's own
            // rule for its orphans clears their bits (its resume position counts on it),
            // so the run reports the write as failed: the target records it, and is
            // dropped with that record once idle.
            Some(r) => r.t.write_done(bm, tag, ok && !r.cut),
            None => Ok(()),
        };
        self.pump(bm);
        self.retire_cut();
        r
    }

    /// This node's application write `tag` (a Primary core's) is about to be submitted:
    /// the source and this node's verify hold reads of its range until
    /// [`Self::primary_write_on_disk`]; a target (a SyncTarget Primary) may hold the write
    /// itself — `Some(write)`: submit it now, `None`: [`SyncAction::Release`] gives it
    /// back — and tracks it until [`Self::primary_write_retired`].
    pub(crate) fn primary_write_begin(
        &mut self,
        bm: &mut OutOfSync,
        (tag, sector, len): (u64, u64, u32),
        write: H,
    ) -> Option<H> {
        self.source_write_begin(tag, sector, len);
        self.peer_write_begin(bm, (primary_id(tag), sector, len), write)
    }

    /// This node's application write `tag` is on the disk.
    pub(crate) fn primary_write_on_disk(&mut self, bm: &mut OutOfSync, tag: u64) {
        self.source_write_end(bm, tag);
    }

    /// This node's application write `tag` is retired (both copies done).
    pub(crate) fn primary_write_retired(&mut self, bm: &mut OutOfSync, tag: u64) {
        self.peer_write_end(bm, primary_id(tag));
    }

    fn source_write_begin(&mut self, tag: u64, sector: u64, len: u32) {
        if let Some(r) = self.source.as_mut() {
            if let Err(e) = r.s.app_write_begin(tag, sector, len) {
                tracing::warn!("resync source cannot track a write: {e}");
                self.untracked += 1;
            }
        }
        if let Some((Verify::Source(v), _)) = self.verify.as_mut() {
            if let Err(e) = v.app_write_begin(tag, sector, len) {
                tracing::warn!("online verify cannot track a write: {e}");
            }
        }
    }

    fn source_write_end(&mut self, bm: &mut OutOfSync, tag: u64) {
        if let Some((Verify::Source(v), _)) = self.verify.as_mut() {
            let _ = v.app_write_end(tag);
        }
        if let Some(r) = self.source.as_mut() {
            let _ = r.s.app_write_end(tag);
            self.pump(bm);
        }
    }

    /// The peer's write `token` is about to be submitted on this node: a target may hold
    /// it — `Some(write)`: submit it now, `None`: [`SyncAction::Release`] gives it back.
    /// Either way end it with [`Self::peer_write_end`] when it is on the disk.
    pub(crate) fn peer_write_begin(
        &mut self,
        bm: &mut OutOfSync,
        (id, sector, len): (u64, u64, u32),
        write: H,
    ) -> Option<H> {
        let Some(r) = self.target.as_mut() else {
            return Some(write);
        };
        match r.t.app_write_begin(id, sector, len) {
            Ok(true) => Some(write),
            Ok(false) => {
                r.held.insert(id, write);
                None
            }
            Err(err) => {
                // Untracked, it could race a resync write: resync that range again.
                tracing::warn!("resync cannot track a write ({err}); its range is resynced again");
                r.t.mark_out_of_sync(bm, sector, len);
                self.untracked += 1;
                Some(write)
            }
        }
    }

    /// The write `id` (the peer's token, or this node's tag as [`primary_id`]) is on the
    /// disk or retired (a held one is then forgotten): the target stops tracking it
    /// (unknown ids — writes from before the run — are ignored).
    pub(crate) fn peer_write_end(&mut self, bm: &mut OutOfSync, id: u64) {
        if let Some(r) = self.target.as_mut() {
            r.held.remove(&id);
            let _ = r.t.app_write_end(id);
            self.pump(bm);
        }
    }

    /// A local write failed: its blocks stay out of sync for the rest of the connection,
    /// whatever resync acks arrive. `false`: the list is full; renew the connection.
    pub(crate) fn local_write_failed(&mut self, sector: u64, len: u32) -> bool {
        self.failed.record(sector, len)
    }

    /// Marks a range out of sync on this node (a failed write of the peer's here,
    /// [`super::Node::local_write_failed`]): the running target fetches it again.
    pub(crate) fn mark(&mut self, bm: &mut OutOfSync, sector: u64, len: u32) {
        match self.live() {
            Some(r) => r.t.mark_out_of_sync(bm, sector, len),
            None => bm.mark(sector, len),
        }
    }

    /// The peer refused a write of a SyncTarget Primary (`P_NEG_ACK`): this side has the
    /// newer data ([`Target::peer_lacks`]).
    pub(crate) fn peer_lacks(&mut self, sector: u64, len: u32) {
        if let Some(r) = self.live() {
            r.t.peer_lacks(sector, len);
        }
    }

    /// Whether a read of the range on an Inconsistent disk must come from the peer: a
    /// block of it is out of sync (during a run, the target's rule: not one the peer
    /// lacks).
    pub(crate) fn must_read_remotely(&self, bm: &OutOfSync, sector: u64, len: u32) -> bool {
        match self.live_ref() {
            Some(r) => r.t.must_read_remotely(bm, sector, len),
            None => bm.any_in(sector, len),
        }
    }

    /// The end of target run `run` is recorded (or failed to be): the run is over and the
    /// next one starts from the beginning. `false`: the run had already ended (the
    /// connection was lost meanwhile).
    pub(crate) fn end_recorded(&mut self, run: u64) -> bool {
        if self.finishing == Some(run) {
            self.finishing = None;
        }
        if self.live_ref().is_some_and(|r| r.run == run) {
            self.target = None;
            self.resume_block = 0;
            return true;
        }
        false
    }

    /// New metadata (`create-md`): the next target walks from the beginning.
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn forget_resume_position(&mut self) {
        self.resume_block = 0;
    }

    /// Whether a target's end is being recorded.
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn finishing(&self) -> bool {
        self.finishing.is_some()
    }

    /// A source's `SetInSync`, applied through the failed-write rule (the simulator's
    /// sabotage of a source that claims a block in sync).
    #[cfg(test)]
    pub(crate) fn set_in_sync(&self, bm: &mut OutOfSync, sector: u64, len: u32) {
        self.failed.set_in_sync(bm, sector, len);
    }

    /// Turns the machines' outputs into actions.
    fn pump(&mut self, bm: &mut OutOfSync) {
        if let Some(r) = self.target.as_mut() {
            for o in r.t.drain_outputs() {
                if r.cut && !matches!(o, TargetOutput::AppWriteReady { .. }) {
                    // Nothing more goes out for a cut run.
                    continue;
                }
                if let Some(pkt) = o.packet() {
                    self.out.push(send(pkt, None));
                    continue;
                }
                match o {
                    TargetOutput::ReadForDigest { tag, sector, len } => {
                        self.io_in_flight += 1;
                        self.out.push(SyncAction::Read(RunRead {
                            run: r.run,
                            tag,
                            sector,
                            len,
                            purpose: ReadFor::TargetDigest,
                        }));
                    }
                    TargetOutput::WriteZeroes { tag, sector, len } => {
                        self.io_in_flight += 1;
                        self.out.push(SyncAction::WriteZeroes {
                            run: r.run,
                            tag,
                            sector,
                            len,
                        });
                    }
                    TargetOutput::AppWriteReady { id } => {
                        if let Some(write) = r.held.remove(&id) {
                            self.out.push(SyncAction::Release { write });
                        }
                    }
                    TargetOutput::Finished(summary) => {
                        r.finishing = true;
                        self.finishing = Some(r.run);
                        let adopt = (summary.left_blocks == 0).then_some(r.peer_uuids);
                        self.out.push(SyncAction::Finished {
                            run: r.run,
                            summary,
                            adopt,
                        });
                    }
                    // The packets went above.
                    _ => {}
                }
            }
        }
        if let Some(r) = self.source.as_mut() {
            for o in r.s.drain_outputs() {
                match o {
                    SourceOutput::ReadLocal {
                        tag,
                        sector,
                        len,
                        digest,
                        zero_check,
                    } => {
                        self.io_in_flight += 1;
                        self.out.push(SyncAction::Read(RunRead {
                            run: r.run,
                            tag,
                            sector,
                            len,
                            purpose: ReadFor::Source { digest, zero_check },
                        }));
                    }
                    SourceOutput::SetInSync { sector, len } => {
                        self.failed.set_in_sync(bm, sector, len);
                    }
                    SourceOutput::SendRsDataReply { tag, .. } => {
                        if let Some(pkt) = o.packet() {
                            self.out.push(send(pkt, Some(tag)));
                        }
                    }
                    other => {
                        if let Some(pkt) = other.packet() {
                            self.out.push(send(pkt, None));
                        }
                    }
                }
            }
        }
        self.pump_verify(bm);
    }

    /// Turns online verify's outputs (either side) into actions and bitmap marks.
    fn pump_verify(&mut self, bm: &mut OutOfSync) {
        let Some((v, run)) = self.verify.as_mut() else {
            return;
        };
        let run = *run;
        let outputs: Vec<VerifyOutput> = match v {
            Verify::Source(vs) => vs.drain_outputs().collect(),
            Verify::Peer(vp) => vp.drain_outputs().collect(),
        };
        for o in outputs {
            if let Some(pkt) = o.packet() {
                self.out.push(send(pkt, None));
                continue;
            }
            match o {
                VerifyOutput::ReadForDigest { tag, sector, len } => {
                    self.io_in_flight += 1;
                    self.out.push(SyncAction::Read(RunRead {
                        run,
                        tag,
                        sector,
                        len,
                        purpose: ReadFor::Verify,
                    }));
                }
                VerifyOutput::OutOfSync { sector, len } => {
                    tracing::warn!("online verify: {len} bytes at sector {sector} differ");
                    #[cfg(test)]
                    if self.sabotage_verify_marks_nothing {
                        continue;
                    }
                    bm.mark(sector, len);
                }
                VerifyOutput::Finished(p) => {
                    self.verify = None;
                    self.out.push(SyncAction::VerifyFinished(p));
                    return;
                }
                // The sends went above.
                _ => {}
            }
        }
    }
}

/// A Primary write's id in the target: the peer's writes use the receiver's tokens, all
/// below 2^63.
fn primary_id(tag: u64) -> u64 {
    tag | 1 << 63
}

/// The stream class of a resync or verify packet: acks go on the meta stream, requests
/// and data on the resync stream.
fn stream_of(pkt: &Packet) -> Stream {
    if matches!(pkt, Packet::BlockAck { .. }) {
        Stream::Meta
    } else {
        Stream::Resync
    }
}

fn send<H>(pkt: Packet, reply: Option<u64>) -> SyncAction<H> {
    SyncAction::Send {
        stream: stream_of(&pkt),
        pkt,
        reply,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::resync::RequestKind;

    /// 64 blocks of 4 KiB.
    const SECTORS: u64 = 64 * 8;

    fn tick(now_ms: u64) -> TickInput {
        TickInput {
            now_ms,
            ..TickInput::default()
        }
    }

    fn peer() -> UuidSet {
        UuidSet {
            current: 0x1234,
            bitmap: 0,
            history: [0; 2],
        }
    }

    /// A target over a bitmap with block 0 set, its first request sent: returns the runs,
    /// the bitmap and the run id.
    fn target_with_request(
        in_flight: &[(u64, u64, u32)],
    ) -> (SyncRuns<&'static str>, OutOfSync, u64) {
        let mut bm = OutOfSync::new(SECTORS);
        bm.mark(0, 4096);
        let mut runs = SyncRuns::default();
        let cfg = TargetConfig::new(SECTORS);
        let run = runs
            .start_target(
                cfg,
                &bm,
                &tick(0),
                peer(),
                (std::iter::empty(), in_flight.iter().copied()),
            )
            .unwrap();
        assert!(runs.tick(&mut bm, &tick(100)));
        (runs, bm, run)
    }

    /// The `(sector, len)` of the resync requests among `actions`, checking their class.
    fn requests(actions: &[SyncAction<&str>]) -> Vec<(u64, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                SyncAction::Send { stream, pkt, .. } => match Inbound::from_packet(pkt) {
                    Ok(Some(Inbound::RsRequest { sector, len, .. })) => {
                        assert_eq!(*stream, Stream::Resync, "a request rides the resync stream");
                        Some((sector, len))
                    }
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_end_of_a_run_waits_until_it_is_recorded() {
        let (mut runs, mut bm, run) = target_with_request(&[]);
        assert_eq!(requests(&runs.take_actions()), vec![(0, 4096)]);
        let (r, tag) = runs.data_reply(&mut bm, 0, 4096).unwrap().unwrap();
        assert_eq!(r, run);
        assert!(!runs.idle(), "the resync write is in flight");
        runs.write_done(&mut bm, run, tag, true).unwrap();
        assert_eq!(bm.count(), 0);
        let actions = runs.take_actions();
        assert!(actions.iter().any(|a| matches!(
            a,
            SyncAction::Send {
                stream: Stream::Meta,
                pkt: Packet::BlockAck { .. },
                ..
            }
        )));
        let adopt = actions.iter().find_map(|a| match a {
            SyncAction::Finished { run: r, adopt, .. } if *r == run => Some(*adopt),
            _ => None,
        });
        assert_eq!(
            adopt,
            Some(Some(peer())),
            "nothing left: the peer's UUIDs are adopted"
        );
        assert!(!runs.idle(), "the end is not recorded yet");
        assert!(runs.end_recorded(run));
        assert!(runs.idle() && runs.target().is_none());
    }

    #[test]
    fn a_completion_of_a_run_the_connection_cut_clears_nothing() {
        let (mut runs, mut bm, run) = target_with_request(&[]);
        runs.take_actions();
        let (_, tag) = runs.data_reply(&mut bm, 0, 4096).unwrap().unwrap();
        runs.connection_lost();
        assert!(runs.target().is_none(), "a cut run is not running");
        assert!(!runs.idle(), "its write is still in flight");
        runs.write_done(&mut bm, run, tag, true).unwrap();
        assert!(bm.is_set(0), "the cut run's write cleared its bit");
        assert!(runs.idle());
        assert!(
            runs.take_actions().is_empty(),
            "nothing is sent for a cut run"
        );
    }

    #[test]
    fn a_held_write_waits_for_its_resync_write_even_across_a_connection_loss() {
        for lose in [false, true] {
            let (mut runs, mut bm, run) = target_with_request(&[]);
            runs.take_actions();
            let (_, tag) = runs.data_reply(&mut bm, 0, 4096).unwrap().unwrap();
            assert_eq!(
                runs.peer_write_begin(&mut bm, (9, 0, 4096), "w"),
                None,
                "held"
            );
            if lose {
                runs.connection_lost();
                assert!(runs.take_actions().is_empty(), "still held");
                assert_eq!(runs.held(), 1);
                // A write this node takes meanwhile waits too.
                assert_eq!(runs.peer_write_begin(&mut bm, (10, 0, 4096), "x"), None);
            }
            runs.write_done(&mut bm, run, tag, true).unwrap();
            let mut released: Vec<_> = runs
                .take_actions()
                .into_iter()
                .filter_map(|a| match a {
                    SyncAction::Release { write } => Some(write),
                    _ => None,
                })
                .collect();
            released.sort_unstable();
            let want = if lose { vec!["w", "x"] } else { vec!["w"] };
            assert_eq!(released, want);
            assert_eq!(runs.held(), 0);
            assert_eq!(bm.is_set(0), lose, "only a live run's write clears its bit");
        }
    }

    #[test]
    fn a_write_on_the_disk_when_the_target_starts_is_not_overwritten_by_resync() {
        // Without it, the reply's data is written over the block.
        let (mut runs, mut bm, _) = target_with_request(&[]);
        runs.take_actions();
        assert!(runs.data_reply(&mut bm, 0, 4096).unwrap().is_some());
        // With the write on the disk and told at the start, the reply is void.
        let (mut runs, mut bm, _) = target_with_request(&[(7, 0, 4096)]);
        for (sector, len) in requests(&runs.take_actions()) {
            assert_eq!(runs.data_reply(&mut bm, sector, len).unwrap(), None);
        }
        assert!(bm.is_set(0), "the block is still to be fetched");
    }

    #[test]
    fn the_peers_verify_marks_a_differing_block_and_a_loss_reports_where_it_stopped() {
        let mut bm = OutOfSync::new(SECTORS);
        let mut runs: SyncRuns<()> = SyncRuns::default();
        runs.start_verify_peer(VerifyConfig::new(SECTORS)).unwrap();
        let req = Inbound::OvRequest {
            sector: 0,
            len: 4096,
        };
        runs.inbound(&mut bm, req).unwrap();
        let read = runs.take_actions().into_iter().find_map(|a| match a {
            SyncAction::Read(RunRead {
                run,
                tag,
                purpose: ReadFor::Verify,
                ..
            }) => Some((run, tag)),
            _ => None,
        });
        let (run, tag) = read.expect("the block is read for its digest");
        assert!(!runs.idle());
        runs.verify_digest_done(&mut bm, run, tag, Some(Digest::of(&[1; 4096])))
            .unwrap();
        assert!(runs.idle());
        let replied = runs.take_actions().into_iter().any(|a| {
            matches!(
                a,
                SyncAction::Send {
                    stream: Stream::Resync,
                    ..
                }
            )
        });
        assert!(replied, "P_OV_REPLY goes out with the digest");
        let result = Inbound::OvResult {
            sector: 0,
            len: 4096,
            in_sync: false,
        };
        runs.inbound(&mut bm, result).unwrap();
        assert!(bm.is_set(0), "a block found different is marked");
        let (side, _) = runs.verify_progress().unwrap();
        assert_eq!(side, "VerifyT");
        assert!(
            runs.connection_lost().is_some(),
            "the interrupted verify is reported"
        );
        assert!(!runs.verify_running());
    }

    #[test]
    fn a_resync_ack_does_not_clear_a_block_whose_local_write_failed() {
        for failed in [false, true] {
            let mut bm = OutOfSync::new(SECTORS);
            bm.mark(0, 4096);
            let mut runs: SyncRuns<()> = SyncRuns::default();
            runs.ensure_source(SourceConfig::new(SECTORS), &tick(0), false, [])
                .unwrap();
            if failed {
                assert!(runs.local_write_failed(0, 4096));
            }
            let req = Inbound::RsRequest {
                sector: 0,
                len: 4096,
                kind: RequestKind::Data,
            };
            runs.inbound(&mut bm, req).unwrap();
            let read = runs.take_actions().into_iter().find_map(|a| match a {
                SyncAction::Read(RunRead { run, tag, .. }) => Some((run, tag)),
                _ => None,
            });
            let (run, tag) = read.expect("the source reads the block");
            let ok = ReadOutcome::Ok {
                all_zero: false,
                digest: None,
            };
            runs.source_read_done(&mut bm, run, tag, ok).unwrap();
            let reply = runs.take_actions().into_iter().any(|a| match a {
                SyncAction::Send { stream, reply, .. } => {
                    stream == Stream::Resync && reply == Some(tag)
                }
                _ => false,
            });
            assert!(reply, "the data reply carries the read's buffer");
            let ack = Inbound::RsWriteAck {
                sector: 0,
                len: 4096,
            };
            runs.inbound(&mut bm, ack).unwrap();
            assert_eq!(bm.is_set(0), failed);
        }
    }
}
