//! One node's write pipelines and what their outputs become: the [`Primary`] core (this
//! node's application writes, and the node's one out-of-sync bitmap), the [`Receiver`]
//! (the peer's writes), the resync runs ([`SyncRuns`]) and the Secondary's merged flush
//! rounds ([`FlushRounds`]). The daemon (`volume/`) and both nodes of the simulator
//! (`sim/`) hold a [`Node`], feed it the write path's and the resync's events through
//! [`Node::step`] (`step.rs`) and the rest through the calls below, and call
//! [`Node::drain`] after a call that is not a step; each only performs the [`Action`]s
//! that come out, so the rules of the drain are one code:
//!
//! - **Writes the runs hold.** Every local write of either core is shown to the runs
//!   before it is submitted ([`SyncRuns::primary_write_begin`] /
//!   [`SyncRuns::peer_write_begin`]); a SyncTarget holds an overlapping one, which the
//!   runs later release: it comes out of the drain as the same [`Action::LocalWrite`]. A
//!   retired write of this node ends its tracking ([`SyncRuns::primary_write_retired`]).
//! - **The runs' actions** come after the cores' in each drain (a retirement or a
//!   completion may release a write the runs hold): resync packets on their stream class
//!   ([`Action::SendSync`]), reads and zero writes of a run, the lazy bitmap write-back,
//!   a target's end; the end of an online verify brings the connection back to
//!   Connected here ([`Action::VerifyFinished`]), not in the driver.
//! - **Flush rounds.** The Receiver's epoch flushes are merged ([`FlushRounds`]): one
//!   [`Action::FlushRound`] per round, not one flush per epoch.
//! - **Stream classes.** A barrier goes on the data stream behind its epoch's writes;
//!   acks and barrier acks on the meta stream ([`Action::Send`]).
//! - **Order.** Actions come out in the order the cores emitted them; a driver performs
//!   sends in that order (a barrier sits between two epochs' writes; a write ack goes
//!   before its epoch's barrier ack).
//! - **The node's state.** Its role, disk state, generation UUIDs and crashed-Primary
//!   flag, and the rules that change them: a connection loss (the runs are cut before
//!   the cores let go, [`Node::connection_lost`]), a lost peer disk (a Primary starts a
//!   generation, [`Node::lost_peer_disk`]), the start of a run (its UUIDs,
//!   [`Node::begin_sync_source`] / [`Node::begin_sync_target`]; the run told of every
//!   write on the disk and the connection SyncSource or SyncTarget, [`Node::start_source`]
//!   / [`Node::start_target`]), its end ([`TargetEnd`] on the target,
//!   [`Node::peer_sync_ended`] on the source) and the transition to Connected
//!   ([`Node::reached_connected`]); the handshake's decision (`handshake.rs`); role
//!   changes (`roles.rs`); management commands (`admin.rs`). A UUID or flag change is
//!   returned, not hidden: the daemon makes it durable in its superblock before what
//!   depends on it; the simulator, which has no superblock, assigns it.
//! - **The connection and the peer.** The connection's state, the agreed protocol
//!   version while connected ([`Node::connection_up`] … [`Node::connection_lost`]), the
//!   peer's role and disk and what a change of them means ([`Node::peer_reported`],
//!   [`PeerDisk`]), the decision on the peer's state change requests
//!   ([`Node::peer_request`]) and this node's `P_STATE` ([`Node::state_packet`]).
//!
//! The bitmap has one owner, the Primary core; the runs borrow it inside each call of
//! the node, never across one.
//!
//! Contract: a driver feeds each completion once, with the handle an action carried;
//! the driver's own buffers (request data, peer data) are keyed by the ids in
//! [`LocalWrite::side`]. A violation is a programmer error: the cores answer it with
//! `Error::Invalid`, which the daemon's `contract` turns into a panic and the simulator
//! into a failed seed. Operating errors — a peer that breaks the protocol — are
//! actions ([`Action::DropConnection`]), never errors.
//!
//! Bounds: the output buffers are reused (no allocation per drain once grown); the
//! actions of one drain are at most the cores' outputs since the last one (bounded by
//! their in-flight limits).

use super::role_cmd::Asking;
use super::{DiskFailure, Durable, FlushRounds, RunRead, SyncAction, SyncRuns, Then, Why};
use crate::meta::disk::SbChange;
use crate::net::Stream;
use crate::request::{
    Error, OutOfSync, Primary, PrimaryOutput, Receiver, ReceiverOutput, WriteKind,
};
use crate::resync::{
    Error as ResyncError, ResyncSummary, SourceConfig, TargetConfig, TickInput, VerifyProgress,
};
use crate::state::change;
use crate::state::uuid::UuidSet;
use crate::state::{ConnState, DiskState, Role};
use crate::wire::{self, Command, Packet};

/// Which core a local write belongs to, with the handles that core gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// This node's application write: the Primary's `tag`, and the frontend request `id`
    /// whose buffer holds the data.
    Primary { tag: u64, id: u64 },
    /// The peer's write: the Receiver's `token` (the driver's key for the data).
    Peer { token: u64 },
}

/// A write to the local disk that a core asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LocalWrite {
    pub(crate) side: Side,
    pub(crate) sector: u64,
    pub(crate) len: u32,
    pub(crate) kind: WriteKind,
    pub(crate) fua: bool,
}

/// What the driver must do for the write pipelines, in order.
#[derive(Debug)]
pub(crate) enum Action {
    /// Write to the local disk; report [`super::Event::WriteDone`]. Never a write the
    /// runs hold: that one comes later as [`super::SyncAction::Release`].
    LocalWrite(LocalWrite),
    /// Flush the local disk for the Primary; report [`Primary::local_flush_done`].
    PrimaryFlush { tag: u64 },
    /// Flush the local disk for a round of the Receiver's epoch flushes; report
    /// [`super::Event::FlushRoundDone`].
    FlushRound,
    /// Write a 4 KiB metadata block durably, after a flush of the data disk with
    /// `preflush`; report [`Primary::meta_write_done`].
    MetaWrite {
        tag: u64,
        offset: u64,
        data: Box<[u8; 4096]>,
        preflush: bool,
    },
    /// Send the Primary's write (`P_DATA`, `P_TRIM` or `P_ZEROES`) on the data stream;
    /// its data is request `id`'s buffer.
    SendWrite {
        block_id: u64,
        id: u64,
        sector: u64,
        len: u32,
        kind: WriteKind,
        dp_flags: u32,
    },
    /// Send a packet without payload on `stream` (barriers, acks, barrier acks).
    Send { stream: Stream, pkt: Packet },
    /// Complete the frontend's request `id`.
    Complete { id: u64, ok: bool },
    /// The Primary's write `tag` left the pipeline (room for the next one).
    Retired { tag: u64 },
    /// Drop the connection: the peer broke the protocol, or a new handshake must decide
    /// (a forced promotion, a resync that became due).
    DropConnection { reason: &'static str },
    /// The peer's disk failed (or was detached) while connected and is now `disk`:
    /// everything this node writes from now on is out of sync there (report it).
    PeerDiskFailed { disk: DiskState },
    /// The peer ended the run this node served as SyncSource ([`SourceEnd`]): make
    /// [`SourceEnd::durable`] durable (in the background: application writes wait for
    /// it at the core's door) and report the end.
    SourceEnded(SourceEnd),
    /// A connection loss interrupted an online verify at this point: report it (status
    /// shows it, and `verify --start` may resume there).
    VerifyInterrupted(VerifyProgress),
    /// A resync is due that only a handshake can start (the peer's `invalidate` or
    /// `invalidate-remote` granted, or its disk UpToDate over this Inconsistent one):
    /// once the packets queued so far have left, renew the connection — as `target`,
    /// mark every block out of sync first, as `invalidate` does.
    RenewForResync { target: bool },
    /// Send a resync or online-verify packet on `stream` (acks on the meta stream,
    /// requests and data on the resync stream). `reply`: the tag of the source read
    /// whose data is the payload (`P_RS_DATA_REPLY`); the driver frees that buffer.
    SendSync {
        stream: Stream,
        pkt: Packet,
        reply: Option<u64>,
    },
    /// Read the range for a run; report [`super::Event::SyncReadDone`] with it.
    SyncRead(RunRead),
    /// Write zeroes over the range for a run (`P_RS_DEALLOCATED`); report
    /// [`super::Event::SyncWriteDone`].
    SyncZeroes {
        run: u64,
        tag: u64,
        sector: u64,
        len: u32,
    },
    /// The target's cleared bits should reach the disk: flush the data, then write the
    /// dirty bitmap pages.
    BitmapWriteBack,
    /// The target's run ended: record its end ([`Node::target_end`]; `adopt`: the
    /// peer's UUIDs, when nothing is left to fetch).
    TargetFinished {
        run: u64,
        summary: ResyncSummary,
        adopt: Option<UuidSet>,
    },
    /// The online verify (either side) ended and the connection is Connected again; the
    /// blocks it found different are marked. `crash_repaired`: reaching Connected
    /// cleared the crashed-Primary flag ([`Node::reached_connected`]), which the driver
    /// records durably.
    VerifyFinished {
        progress: VerifyProgress,
        crash_repaired: bool,
    },
    /// The connection reached Connected and that cleared the crashed-Primary flag
    /// ([`Node::reached_connected`]): record it durably.
    CrashRepaired,
    /// Make `plan` durable, step by step (`durable.rs`), then report
    /// [`super::Event::Persisted`] with `then` and whether it succeeded. `reply`: the
    /// driver's handle of the management command that asked for it (its operator waits
    /// for the outcome: the plan's failure, or the outcome of `Persisted`).
    Persist {
        plan: Vec<Durable>,
        then: Then,
        reply: Option<u64>,
    },
    /// The management command `reply` that waits ([`super::Outcome::AskedPeer`]) is
    /// refused: the peer refused it, the connection was lost, or the rules changed.
    Reply { reply: u64, refused: Why },
    /// This node's role is now this (its log and events; the peer is told by a
    /// `P_STATE` among the actions).
    RoleChanged(Role),
    /// The failed local write `w` took the disk out of service (`failure`): report it
    /// (a detached disk takes no more IO).
    DiskLeftService { w: LocalWrite, failure: DiskFailure },
    /// The disk is detached on a Secondary: once the packets queued so far have left,
    /// stay StandAlone (a restart attaches the disk again; a resync repairs it).
    DetachedStandAlone,
}

/// What the peer's new disk state means for this node ([`Node::peer_reported`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerDisk {
    Unchanged,
    /// It failed (or was detached): everything this node writes from now on is out of
    /// sync there (the peer answers each write `P_NEG_ACK`), and a Primary starts a
    /// generation the peer lacks ([`Node::lost_peer_disk`]), as after losing the peer
    /// (DRBD's `after_state_ch`).
    Failed,
    /// It became UpToDate while this disk is Inconsistent and no run is going (a kernel
    /// peer's `primary --force` on a pair that never synced): a resync is due. DRBD 8.4
    /// runs its sync handshake again (`receive_state`); the driver renews the
    /// connection so that the handshake does.
    ResyncDue,
}

/// The end of a target run, from [`super::SyncAction::Finished`] until it is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TargetEnd {
    pub(crate) run: u64,
    /// With nothing left to fetch: the node's generation when the run ended, and the one
    /// that completes it (DRBD's `drbd_resync_finished` on the target).
    pub(crate) uuids: Option<(UuidSet, UuidSet)>,
}

/// The end of a SyncSource's run ([`Node::peer_sync_ended`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SourceEnd {
    /// The peer's disk is UpToDate: the generation that completes the run (the bitmap
    /// UUID rotates into history, DRBD's `drbd_resync_finished` on the source), which
    /// the driver makes durable (with the crashed-Primary flag cleared in the same
    /// write) and assigns.
    pub(crate) uuids: Option<UuidSet>,
    /// Reaching Connected cleared the crashed-Primary flag ([`Node::reached_connected`]):
    /// the driver records that.
    pub(crate) crash_repaired: bool,
    /// With the peer UpToDate: blocks still out of sync here that no failed local write
    /// explains. DRBD asserts there are none (`n_oos == rs_failed` in
    /// `drbd_resync_finished`): the target ended without blocks this node marks, so the
    /// peer is UpToDate without them. The simulator fails on one; the daemon logs it as
    /// a bug (a disconnect/connect of the Primary resyncs them).
    pub(crate) unfetched: u64,
}

impl SourceEnd {
    /// What the driver stages: with [`Self::uuids`], the completed generation and the
    /// crash repaired in one superblock write (empty: nothing to write).
    pub(crate) fn durable(&self) -> Vec<SbChange> {
        self.uuids
            .map(|u| vec![SbChange::ClearCrashedPrimary, SbChange::Uuids(u)])
            .unwrap_or_default()
    }
}

/// The configuration of the runs the peer's first packet starts
/// ([`super::Event::SyncPacket`]): a source for a resync request that comes before the
/// handshake's start (a kernel peer may send one first), this node's side of the peer's
/// online verify. `None`: such a packet is the peer's error (a verify: verify-alg is
/// not set here).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PeerStartedRuns {
    pub(crate) source: Option<SourceConfig>,
    /// Its `start_sector` is the peer's first request's.
    pub(crate) verify: Option<crate::resync::VerifyConfig>,
}

/// One node's write pipelines (see the module docs).
pub(crate) struct Node {
    /// This node's application writes; owner of the node's out-of-sync bitmap.
    pub(crate) primary: Primary,
    /// The peer's writes.
    pub(crate) receiver: Receiver,
    /// The resync runs; a held write waits in them as its [`LocalWrite`].
    pub(crate) runs: SyncRuns<LocalWrite>,
    /// The Receiver's epoch flushes, merged into rounds.
    pub(crate) flushes: FlushRounds,
    /// This node's role.
    pub(crate) role: Role,
    /// This node's disk state.
    pub(crate) disk: DiskState,
    /// This node's generation UUIDs. Each change is made durable by the driver before
    /// what depends on it (the daemon stages it in the superblock, and the next
    /// application write waits for it).
    pub(crate) uuids: UuidSet,
    /// This node was Primary when it crashed and the crash is not repaired yet (DRBD's
    /// `CRASHED_PRIMARY`; the handshake's UUID flag 2). Set from the metadata at attach;
    /// cleared when the connection reaches Connected ([`Self::reached_connected`]).
    pub(crate) crashed_primary: bool,
    /// The connection's state (DRBD's `cstate`): set by the driver as its handshake
    /// goes, Connected at [`Self::connection_up`], a sync or verify state while one runs.
    pub(crate) conn: ConnState,
    /// The operator wants no connection (`disconnect`): a lost connection ends
    /// StandAlone, not NetworkFailure.
    pub(crate) standalone: bool,
    /// The protocol version agreed with the peer, from [`Self::connection_up`] until
    /// [`Self::connection_lost`]; `None`: not connected.
    pub(crate) agreed: Option<u32>,
    /// How many connections reached [`Self::connection_up`]: a promotion granted on one
    /// connection is not taken on the next ([`super::Promotion`]).
    pub(crate) connections: u64,
    /// The peer's role and disk as last reported (Unknown / DUnknown while not
    /// connected).
    pub(crate) peer_role: Role,
    pub(crate) peer_disk: DiskState,
    /// A promotion waits for its metadata ([`Self::begin_promotion`]): the peer's own
    /// promotion request is refused meanwhile.
    pub(crate) promoting: bool,
    /// A promotion asked the peer and waits for its reply (`role_cmd.rs`).
    pub(crate) asking: Option<Asking>,
    /// A demotion waits for its metadata (`role_cmd.rs`).
    pub(crate) demoting: bool,
    /// `connect --discard-my-data`: this node loses a split brain at the next handshake
    /// (`P_UUIDS` flag 1); it holds until a connection is up.
    pub(crate) discard_my_data: bool,
    /// The peer's UUIDs as the last handshake agreed them (corrected, `handshake.rs`):
    /// the generation a target run completes with.
    pub(crate) peer_uuids: UuidSet,
    /// A local write failed since the disk was attached: the disk left service
    /// ([`Self::local_write_failed`]).
    pub(crate) disk_failed: bool,
    /// `on-io-error detach` (DRBD's default; else `pass_on`), set by the driver.
    pub(crate) detach_on_io_error: bool,
    /// A failed write's plan with the failure record has ended (`disk.rs`).
    pub(crate) failure_recorded: bool,
    /// How a run the peer starts is configured; the driver sets it when a connection
    /// comes up (it depends on the features agreed).
    pub(crate) peer_started: PeerStartedRuns,
    /// The peer has verify-alg, as the last connection's start said.
    pub(crate) peer_verify: bool,
    /// Local writes the runs held and then released (a count the simulator's report
    /// takes and resets; not in the release library).
    #[cfg(any(test, feature = "sim"))]
    pub(crate) released: u64,
    primary_out: Vec<PrimaryOutput>,
    receiver_out: Vec<ReceiverOutput>,
    /// Deliberate bugs for the simulator's sabotage tests: `invalidate` marks nothing;
    /// a peer's skipped initial sync is ignored; a failed local write leaves the disk in
    /// service and UpToDate; a Diskless Primary reads its own disk; a Diskless peer's
    /// writes are not marked out of sync.
    #[cfg(test)]
    pub(crate) sabotage_invalidate_marks_nothing: bool,
    #[cfg(test)]
    pub(crate) sabotage_diskless_reads_locally: bool,
    #[cfg(test)]
    pub(crate) sabotage_failed_disk_stays_up_to_date: bool,
    #[cfg(test)]
    pub(crate) sabotage_ignore_peer_skip: bool,
    #[cfg(test)]
    pub(crate) sabotage_diskless_peer_unmarked: bool,
}

impl Node {
    /// A Secondary over its cores, with the UUIDs and disk state its metadata says.
    pub(crate) fn new(
        primary: Primary,
        receiver: Receiver,
        uuids: UuidSet,
        disk: DiskState,
    ) -> Self {
        Node {
            primary,
            receiver,
            runs: SyncRuns::default(),
            flushes: FlushRounds::default(),
            role: Role::Secondary,
            disk,
            uuids,
            crashed_primary: false,
            conn: ConnState::StandAlone,
            standalone: false,
            agreed: None,
            connections: 0,
            peer_role: Role::Unknown,
            peer_disk: DiskState::DUnknown,
            promoting: false,
            asking: None,
            demoting: false,
            discard_my_data: false,
            peer_uuids: UuidSet::default(),
            disk_failed: false,
            detach_on_io_error: true,
            failure_recorded: false,
            peer_started: PeerStartedRuns::default(),
            peer_verify: false,
            #[cfg(any(test, feature = "sim"))]
            released: 0,
            primary_out: Vec::new(),
            receiver_out: Vec::new(),
            #[cfg(test)]
            sabotage_invalidate_marks_nothing: false,
            #[cfg(test)]
            sabotage_diskless_reads_locally: false,
            #[cfg(test)]
            sabotage_failed_disk_stays_up_to_date: false,
            #[cfg(test)]
            sabotage_ignore_peer_skip: false,
            #[cfg(test)]
            sabotage_diskless_peer_unmarked: false,
        }
    }

    /// The runs and the bitmap they may change, for one call.
    pub(crate) fn runs_and_bitmap(&mut self) -> (&mut SyncRuns<LocalWrite>, &mut OutOfSync) {
        (&mut self.runs, self.primary.out_of_sync_mut())
    }

    /// The local write `w` ended (`ok`): the runs stop tracking it, then its core learns
    /// the result (a Primary write that failed stays out of sync through resync acks,
    /// [`super::FailedLocal`]). `Ok(false)`: the runs' list of failed writes is full;
    /// the driver renews the connection rather than forget one. `Err`: a contract
    /// violation (an unknown handle, a second completion).
    pub(super) fn write_done(&mut self, w: &LocalWrite, ok: bool) -> Result<bool, Error> {
        let bm = self.primary.out_of_sync_mut();
        match w.side {
            Side::Primary { tag, .. } => {
                self.runs.primary_write_on_disk(bm, tag);
                let recorded = ok || self.runs.local_write_failed(w.sector, w.len);
                self.primary.local_done(tag, ok)?;
                Ok(recorded)
            }
            Side::Peer { token } => {
                self.runs.peer_write_end(bm, token);
                self.receiver.local_done(token, ok)?;
                Ok(true)
            }
        }
    }

    /// The running flush round ended (`ok`): every flush it covered is reported, oldest
    /// first, and the next round starts if flushes were asked for meanwhile (the actions,
    /// with what the Receiver does next, are appended to `out`).
    pub(super) fn flush_round_done(
        &mut self,
        ok: bool,
        out: &mut Vec<Action>,
    ) -> Result<(), Error> {
        for token in self.flushes.round_done() {
            self.receiver.local_flush_done(token, ok)?;
        }
        // The flushes the Receiver asks for now start the next round (with those
        // waiting); if it asked for none, the waiting ones do.
        self.drain(out);
        if self.flushes.next_round() {
            out.push(Action::FlushRound);
        }
        Ok(())
    }

    /// A connection finished its handshake at protocol `version` with a peer of `role`
    /// and `disk`: Connected (a run the handshake decided changes that). Part of
    /// [`super::Event::ConnectionUp`] (`handshake.rs`), never called alone by a driver.
    pub(super) fn connection_up(&mut self, version: u32, role: Role, disk: DiskState) {
        self.agreed = Some(version);
        self.connections += 1;
        self.peer_role = role;
        self.peer_disk = disk;
        self.conn = ConnState::Connected;
        self.discard_my_data = false;
    }

    /// The connection is gone: the peer is unknown, and the connection NetworkFailure
    /// (StandAlone if the operator wants none). The runs go first: a source ends at once,
    /// a target is cut (kept while its IO is in flight, its held writes still held). Then
    /// both cores: the Primary marks out of sync every write the peer may lack and
    /// retires it (the runs learn of each retirement), the Receiver drops the writes it
    /// had not submitted. Their actions are appended to `out`; an online verify it
    /// interrupted is returned.
    pub(crate) fn connection_lost(&mut self, out: &mut Vec<Action>) -> Option<VerifyProgress> {
        self.agreed = None;
        self.peer_role = Role::Unknown;
        self.peer_disk = DiskState::DUnknown;
        self.conn = if self.standalone {
            ConnState::StandAlone
        } else {
            ConnState::NetworkFailure
        };
        let verify = self.runs.connection_lost();
        self.primary.connection_lost();
        self.receiver.connection_lost();
        self.drain(out);
        verify
    }

    /// The handshake made this node SyncSource (step 3): the generation of the run (a
    /// new bitmap UUID, `random`), which the driver makes durable and assigns before it
    /// sends `P_SYNC_UUID` with the returned value.
    pub(crate) fn begin_sync_source(&self, random: u64) -> (UuidSet, u64) {
        let mut uuids = self.uuids;
        let sync_uuid = uuids.start_sync_source(random);
        (uuids, sync_uuid)
    }

    /// `P_SYNC_UUID` on the SyncTarget (step 3), once the merged bitmap's pages are
    /// written: the disk is Inconsistent (a Failed one stays Failed), and the UUIDs
    /// returned are made durable with "not consistent" before the first resync write.
    pub(crate) fn begin_sync_target(&mut self, sync_uuid: u64) -> UuidSet {
        if self.disk != DiskState::Failed {
            self.disk = DiskState::Inconsistent;
        }
        let mut uuids = self.uuids;
        uuids.start_sync_target(sync_uuid, self.role == Role::Primary);
        uuids
    }

    /// Starts a target over the node's bitmap (its set bits are what to fetch), told of
    /// every write on the disk now — this node's, submitted and not retired, and the
    /// peer's, submitted and not completed, of an earlier connection too — so that no
    /// resync write lands under one (the simulator found that one could). The connection
    /// is SyncTarget, the peer's disk UpToDate. The run completes with the peer's UUIDs
    /// as the handshake agreed them ([`Self::peer_uuids`]). Returns the run.
    pub(super) fn start_target(
        &mut self,
        cfg: TargetConfig,
        tick: &TickInput,
    ) -> Result<u64, ResyncError> {
        let primary = self.primary.submitted_writes();
        let in_flight = (
            primary.map(|(tag, sector, len, _)| (tag, sector, len)),
            self.receiver.submitted_writes(),
        );
        let bm = self.primary.out_of_sync();
        let run = self
            .runs
            .start_target(cfg, bm, tick, self.peer_uuids, in_flight)?;
        self.conn = ConnState::SyncTarget;
        self.peer_disk = DiskState::UpToDate;
        Ok(run)
    }

    /// Whether an application read of `[sector, sector + len bytes)` must be answered by
    /// the peer (`P_DATA_REQUEST`), DRBD's `drbd_may_do_local_read`: an UpToDate disk
    /// answers every read; an Inconsistent one only a range with no block out of sync
    /// (still to be fetched by a running target, or left over by a run that ended with
    /// failed blocks: the simulator's checker 17 found that the daemon read those
    /// locally); a detached or Failed one none. The driver fails a read the peer cannot
    /// answer (not connected, or its disk not UpToDate).
    pub(crate) fn reads_from_peer(&self, sector: u64, len: u32) -> bool {
        if self.primary.is_detached() {
            #[cfg(test)]
            if self.sabotage_diskless_reads_locally {
                return false;
            }
            return true;
        }
        match self.disk {
            DiskState::UpToDate => false,
            DiskState::Inconsistent => {
                self.runs
                    .must_read_remotely(self.primary.out_of_sync(), sector, len)
            }
            _ => true,
        }
    }

    /// The handshake made this node SyncSource: the source starts (unless one runs), the
    /// connection is SyncSource, the peer's disk Inconsistent.
    pub(super) fn start_source(
        &mut self,
        cfg: SourceConfig,
        tick: &TickInput,
    ) -> Result<(), ResyncError> {
        self.conn = ConnState::SyncSource;
        self.peer_disk = DiskState::Inconsistent;
        self.ensure_source(cfg, tick)
    }

    /// Starts the source unless one runs (a peer's resync request may come first), told
    /// of this node's writes not yet on the disk (each holds the reads of its range until
    /// it is).
    pub(super) fn ensure_source(
        &mut self,
        cfg: SourceConfig,
        tick: &TickInput,
    ) -> Result<(), ResyncError> {
        let in_flight = self
            .primary
            .submitted_writes()
            .filter(|&(.., on_disk)| !on_disk)
            .map(|(tag, sector, len, _)| (tag, sector, len));
        let peer_primary = self.peer_role == Role::Primary;
        self.runs.ensure_source(cfg, tick, peer_primary, in_flight)
    }

    /// A target run ended ([`super::SyncAction::Finished`]; `adopt`: the peer's UUIDs
    /// when nothing is left). Recording its end is, in this order: the data flushed and
    /// the bitmap written; then, with UUIDs, [`Self::target_end_uuids`] made durable
    /// together with "consistent"; then [`Self::target_end_recorded`].
    pub(crate) fn target_end(&self, run: u64, adopt: Option<UuidSet>) -> TargetEnd {
        let uuids = adopt.map(|peer| {
            let mut done = self.uuids;
            done.finish_sync_target(&peer, self.role == Role::Primary);
            (self.uuids, done)
        });
        TargetEnd { run, uuids }
    }

    /// The generation that completes `end`, to make durable and assign — unless this
    /// node's UUIDs changed since the run ended (a connection loss started a
    /// generation): then `Err`, the disk stays Inconsistent and the next handshake
    /// decides.
    pub(crate) fn target_end_uuids(&self, end: &TargetEnd) -> Result<Option<UuidSet>, String> {
        match end.uuids {
            Some((base, _)) if base != self.uuids => Err("the generation UUIDs changed while \
                                                          the end of the resync was recorded; \
                                                          the next handshake decides"
                .into()),
            Some((_, done)) => Ok(Some(done)),
            None => Ok(None),
        }
    }

    /// The end of `end` is recorded (`durable`: its UUIDs and "consistent" are on the
    /// disk): the run is over, and with them the disk is UpToDate. If it was the run
    /// finishing, the connection is Connected again ([`Self::reached_connected`]);
    /// `true`: that cleared the crashed-Primary flag, which the driver records.
    pub(crate) fn target_end_recorded(&mut self, end: &TargetEnd, durable: bool) -> bool {
        let over = self.runs.end_recorded(end.run);
        if durable && end.uuids.is_some() {
            // The superblock write that made it durable cleared the flag too.
            self.disk = DiskState::UpToDate;
            self.crashed_primary = false;
        }
        if !over {
            return false;
        }
        self.conn = ConnState::Connected;
        self.reached_connected()
    }

    /// The peer's `P_STATE` says `conn` while this node is SyncSource: at Connected the
    /// run is over here too (`None`: it is not). See [`SourceEnd`].
    pub(super) fn peer_sync_ended(&mut self, conn: ConnState) -> Option<SourceEnd> {
        if self.conn != ConnState::SyncSource || conn != ConnState::Connected {
            return None;
        }
        self.conn = ConnState::Connected;
        let uuids = (self.peer_disk == DiskState::UpToDate).then(|| {
            let mut done = self.uuids;
            done.finish_sync_source();
            done
        });
        let mut unfetched = 0;
        if uuids.is_some() {
            self.crashed_primary = false;
            unfetched = self.runs.unexplained(self.primary.out_of_sync());
        }
        Some(SourceEnd {
            uuids,
            crash_repaired: self.reached_connected(),
            unfetched,
        })
    }

    /// The connection reached Connected: after a handshake that needs no resync, or at
    /// the end of a resync or an online verify (either side). A crash of this node as
    /// Primary is repaired then: DRBD's `after_state_ch` clears `CRASHED_PRIMARY` on every
    /// transition to Connected (the handshake already weighed the flag, and a resync that
    /// left blocks behind keeps them in the bitmap and the UUIDs). `true`: the flag was
    /// set; the driver records its clear durably.
    pub(super) fn reached_connected(&mut self) -> bool {
        std::mem::replace(&mut self.crashed_primary, false)
    }

    /// This node lost its peer's disk (the connection went, or the peer's disk failed):
    /// DRBD's `after_state_ch`. A Primary with an UpToDate disk starts a generation the
    /// peer lacks (`random` is its new current UUID) unless a bitmap UUID already marks
    /// one. `Some`: the new UUIDs, which the driver makes durable (and assigns) before
    /// the next application write.
    pub(super) fn lost_peer_disk(&self, random: u64) -> Option<UuidSet> {
        let mut uuids = self.uuids;
        uuids
            .lost_peer_disk(random, self.role == Role::Primary, false, self.disk)
            .then_some(uuids)
    }

    /// The peer's `P_STATE` (`word`): its role and disk as [`Self::peer_reported`]
    /// takes them, and its connection state (which ends a SyncSource's run,
    /// [`Self::peer_sync_ended`]). An unknown value reads as Unknown / DUnknown /
    /// StandAlone.
    pub(super) fn peer_state(&mut self, word: u32) -> (PeerDisk, ConnState) {
        let s = wire::StateBits::unpack(word);
        let role = Role::from_u32(u32::from(s.role)).unwrap_or(Role::Unknown);
        let disk = DiskState::from_u32(u32::from(s.disk)).unwrap_or(DiskState::DUnknown);
        let conn = ConnState::from_u32(u32::from(s.conn)).unwrap_or(ConnState::StandAlone);
        (self.peer_reported(role, disk), conn)
    }

    /// The peer reported its role and disk (`P_STATE`): what the new disk state means
    /// here ([`PeerDisk`]).
    pub(crate) fn peer_reported(&mut self, role: Role, disk: DiskState) -> PeerDisk {
        // A Primary peer refuses this node's promotion; a SyncSource serves its reads.
        self.peer_role = role;
        self.runs.set_peer_primary(role == Role::Primary);
        self.peer_disk_reported(disk)
    }

    fn peer_disk_reported(&mut self, disk: DiskState) -> PeerDisk {
        let was = std::mem::replace(&mut self.peer_disk, disk);
        if disk <= DiskState::Failed && was > DiskState::Failed {
            PeerDisk::Failed
        } else if disk == DiskState::UpToDate
            && was < DiskState::UpToDate
            && self.disk == DiskState::Inconsistent
            && self.runs.target().is_none()
            && self.runs.source().is_none()
        {
            PeerDisk::ResyncDue
        } else {
            PeerDisk::Unchanged
        }
    }

    /// Decides the peer's state change request (`state::change::decide`, over this
    /// node's state, a request of its own among it) and, if granted, applies what it
    /// changes of the peer's role and disk.
    pub(super) fn peer_request(
        &mut self,
        req: wire::ReqState,
        resolve_conflicts: bool,
    ) -> (change::Decision, PeerDisk) {
        let local = change::Local {
            role: self.role,
            disk: self.disk,
            conn: self.conn,
            peer_disk: self.peer_disk,
            own_request_pending: self.asking.is_some() || self.promoting,
            resolve_conflicts,
        };
        let d = change::decide(&local, req.mask, req.val);
        let mut seen = PeerDisk::Unchanged;
        if d.rv.is_success() {
            if let Some(disk) = d.grant.peer_disk {
                seen = self.peer_disk_reported(disk);
            }
            if let Some(role) = d.grant.peer_role {
                // From now on this node refuses its own promotion: the peer is Primary.
                self.peer_role = role;
            }
        }
        (d, seen)
    }

    /// This node's state as the peer sees it (`P_STATE`, on the data stream).
    pub(crate) fn state_packet(&self) -> Option<Packet> {
        let bits = wire::StateBits {
            role: u8::try_from(self.role.as_u32()).unwrap_or(0),
            peer: u8::try_from(self.peer_role.as_u32()).unwrap_or(0),
            conn: u8::try_from(self.conn.as_u32()).unwrap_or(0),
            disk: u8::try_from(self.disk.as_u32()).unwrap_or(0),
            pdsk: u8::try_from(self.peer_disk.as_u32()).unwrap_or(0),
            ..wire::StateBits::default()
        };
        bits.pack().ok().map(Packet::State)
    }

    /// Turns the cores' and the runs' outputs since the last call into actions, appended
    /// to `out`: the cores' first (their retirements and completions may release writes
    /// the runs hold), then the runs'.
    pub(crate) fn drain(&mut self, out: &mut Vec<Action>) {
        self.drain_primary(out);
        self.drain_receiver(out);
        self.drain_runs(out);
    }

    /// The runs' outputs as actions. A write they held and release is an ordinary
    /// [`Action::LocalWrite`] now; the end of a verify brings the connection back to
    /// Connected here, not in the driver, and the peer learns it (`P_STATE`).
    fn drain_runs(&mut self, out: &mut Vec<Action>) {
        let mut actions = self.runs.take_actions();
        for a in actions.drain(..) {
            out.push(match a {
                SyncAction::Send { stream, pkt, reply } => Action::SendSync { stream, pkt, reply },
                SyncAction::Read(r) => Action::SyncRead(r),
                SyncAction::WriteZeroes {
                    run,
                    tag,
                    sector,
                    len,
                } => Action::SyncZeroes {
                    run,
                    tag,
                    sector,
                    len,
                },
                SyncAction::Release { write } => {
                    #[cfg(any(test, feature = "sim"))]
                    {
                        self.released += 1;
                    }
                    Action::LocalWrite(write)
                }
                SyncAction::WriteBack => Action::BitmapWriteBack,
                SyncAction::Finished {
                    run,
                    summary,
                    adopt,
                } => Action::TargetFinished {
                    run,
                    summary,
                    adopt,
                },
                SyncAction::VerifyFinished(progress) => {
                    out.push(Action::VerifyFinished {
                        progress,
                        crash_repaired: self.verify_ended(),
                    });
                    if self.agreed.is_some() {
                        self.push_state(out);
                    }
                    continue;
                }
            });
        }
        self.runs.give_back(actions);
    }

    /// A core's local write, shown to the runs before it is submitted: its action, or
    /// `None` while a SyncTarget holds it (a SyncTarget Primary's target may hold this
    /// node's writes too).
    fn gate(
        &mut self,
        side: Side,
        sector: u64,
        len: u32,
        kind: WriteKind,
        fua: bool,
    ) -> Option<Action> {
        let w = LocalWrite {
            side,
            sector,
            len,
            kind,
            fua,
        };
        let bm = self.primary.out_of_sync_mut();
        let w = match side {
            Side::Primary { tag, .. } => self.runs.primary_write_begin(bm, (tag, sector, len), w),
            Side::Peer { token } => self.runs.peer_write_begin(bm, (token, sector, len), w),
        }?;
        Some(Action::LocalWrite(w))
    }

    fn drain_primary(&mut self, out: &mut Vec<Action>) {
        let mut outputs = std::mem::take(&mut self.primary_out);
        outputs.extend(self.primary.drain_outputs());
        for o in outputs.drain(..) {
            out.push(match o {
                PrimaryOutput::SubmitLocal {
                    tag,
                    id,
                    sector,
                    len,
                    kind,
                    fua,
                } => {
                    let side = Side::Primary { tag, id };
                    match self.gate(side, sector, len, kind, fua) {
                        Some(a) => a,
                        None => continue,
                    }
                }
                PrimaryOutput::SubmitLocalFlush { tag } => Action::PrimaryFlush { tag },
                PrimaryOutput::MetaWrite {
                    tag,
                    offset,
                    data,
                    preflush,
                } => Action::MetaWrite {
                    tag,
                    offset,
                    data,
                    preflush,
                },
                PrimaryOutput::SendWrite {
                    block_id,
                    id,
                    sector,
                    len,
                    kind,
                    dp_flags,
                } => Action::SendWrite {
                    block_id,
                    id,
                    sector,
                    len,
                    kind,
                    dp_flags,
                },
                PrimaryOutput::SendBarrier { nr } => Action::Send {
                    stream: Stream::Data,
                    pkt: Packet::Barrier(wire::Barrier {
                        barrier: nr,
                        pad: 0,
                    }),
                },
                PrimaryOutput::Complete { id, result } => Action::Complete {
                    id,
                    ok: result.is_ok(),
                },
                PrimaryOutput::Retired { tag, .. } => {
                    let bm = self.primary.out_of_sync_mut();
                    self.runs.primary_write_retired(bm, tag);
                    Action::Retired { tag }
                }
            });
        }
        self.primary_out = outputs;
    }

    fn drain_receiver(&mut self, out: &mut Vec<Action>) {
        let mut outputs = std::mem::take(&mut self.receiver_out);
        outputs.extend(self.receiver.drain_outputs());
        for o in outputs.drain(..) {
            let ack = |cmd: Command, block_id: u64, sector: u64, len: u32| Action::Send {
                stream: Stream::Meta,
                pkt: Packet::BlockAck {
                    cmd,
                    ack: wire::BlockAck {
                        sector,
                        block_id,
                        blksize: len,
                        seq_num: 0,
                    },
                },
            };
            out.push(match o {
                ReceiverOutput::SubmitLocal {
                    token,
                    sector,
                    len,
                    kind,
                    fua,
                } => match self.gate(Side::Peer { token }, sector, len, kind, fua) {
                    Some(a) => a,
                    None => continue,
                },
                ReceiverOutput::SubmitLocalFlush { token } => {
                    if !self.flushes.request(token) {
                        continue;
                    }
                    Action::FlushRound
                }
                ReceiverOutput::DropConnection { reason } => Action::DropConnection { reason },
                ReceiverOutput::SendRecvAck {
                    block_id,
                    sector,
                    len,
                } => ack(Command::P_RECV_ACK, block_id, sector, len),
                ReceiverOutput::SendWriteAck {
                    block_id,
                    sector,
                    len,
                } => ack(Command::P_WRITE_ACK, block_id, sector, len),
                ReceiverOutput::SendNegAck {
                    block_id,
                    sector,
                    len,
                } => ack(Command::P_NEG_ACK, block_id, sector, len),
                ReceiverOutput::SendBarrierAck { nr, set_size } => Action::Send {
                    stream: Stream::Meta,
                    pkt: Packet::BarrierAck(wire::BarrierAck {
                        barrier: nr,
                        set_size,
                    }),
                },
            });
        }
        self.receiver_out = outputs;
    }
}

/// A generation for the core's unit tests.
#[cfg(test)]
pub(crate) const TEST_GEN: UuidSet = UuidSet {
    current: 0xA000,
    bitmap: 0,
    history: [0, 0],
};

/// A protocol-C node over `sectors` with `uuids` and `disk`, for the core's unit tests.
#[cfg(test)]
impl Node {
    #[allow(clippy::unwrap_used)]
    pub(crate) fn for_test(sectors: u64, uuids: UuidSet, disk: DiskState) -> Node {
        let primary = Primary::new(crate::request::PrimaryConfig::new(
            crate::state::Protocol::C,
            sectors,
        ))
        .unwrap();
        let receiver = Receiver::new(crate::request::ReceiverConfig::new(sectors)).unwrap();
        Node::new(primary, receiver, uuids, disk)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::replica::SyncAction;
    use crate::request::PeerWrite;
    use crate::resync::{Inbound, TargetConfig, TickInput};
    use crate::state::uuid::UuidSet;

    /// 64 blocks of 4 KiB.
    const SECTORS: u64 = 64 * 8;

    fn node() -> Node {
        sized_node(SECTORS)
    }

    fn sized_node(sectors: u64) -> Node {
        Node::for_test(sectors, UuidSet::JUST_CREATED, DiskState::UpToDate)
    }

    fn drained(n: &mut Node) -> Vec<Action> {
        let mut out = Vec::new();
        n.drain(&mut out);
        out
    }

    fn local_writes(actions: &[Action]) -> Vec<LocalWrite> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::LocalWrite(w) => Some(*w),
                _ => None,
            })
            .collect()
    }

    fn peer_write(block_id: u64, sector: u64) -> PeerWrite {
        PeerWrite {
            block_id,
            sector,
            len: 4096,
            kind: WriteKind::Data,
            dp_flags: crate::request::dp::DP_SEND_WRITE_ACK,
        }
    }

    /// Starts a target on `n` over block 0 and steps it once: the run, whether the step
    /// asked for more, and the runs' actions.
    fn target_over_block_0(n: &mut Node) -> (u64, bool, Vec<SyncAction<LocalWrite>>) {
        n.primary.out_of_sync_mut().mark(0, 4096);
        n.peer_uuids = UuidSet {
            current: 0x1234,
            bitmap: 0,
            history: [0; 2],
        };
        let cfg = TargetConfig::new(SECTORS);
        let run = n.start_target(cfg, &TickInput::default()).unwrap();
        let later = TickInput {
            now_ms: 100,
            ..TickInput::default()
        };
        let (runs, bm) = n.runs_and_bitmap();
        let asked = runs.tick(bm, &later);
        (run, asked, runs.take_actions())
    }

    /// A target run on the node over block 0 with its resync write in flight.
    fn node_with_resync_write() -> (Node, u64, u64) {
        let mut n = node();
        let (run, asked, _) = target_over_block_0(&mut n);
        assert!(asked);
        let (runs, bm) = n.runs_and_bitmap();
        let (_, tag) = runs.data_reply(bm, 0, 4096).unwrap().unwrap();
        (n, run, tag)
    }

    #[test]
    fn a_primary_write_goes_to_the_disk_and_the_peer_and_completes_once() {
        let mut n = node();
        n.primary.connected().unwrap();
        n.primary.write(7, 8, 4096, WriteKind::Data, false).unwrap();
        let actions = drained(&mut n);
        let w = local_writes(&actions);
        assert_eq!(w.len(), 1);
        let Side::Primary { id, .. } = w[0].side else {
            panic!("a Primary write's side: {:?}", w[0].side)
        };
        assert_eq!((id, w[0].sector, w[0].len), (7, 8, 4096));
        let block_id = actions
            .iter()
            .find_map(|a| match a {
                Action::SendWrite {
                    block_id, id: 7, ..
                } => Some(*block_id),
                _ => None,
            })
            .expect("the write is sent to the peer");
        assert!(n.write_done(&w[0], true).unwrap());
        assert!(drained(&mut n).is_empty(), "protocol C waits for the peer");
        n.primary.peer_write_ack(block_id).unwrap();
        let done = drained(&mut n);
        assert!(
            matches!(done[0], Action::Complete { id: 7, ok: true }),
            "{done:?}"
        );
        assert!(
            done[1..].iter().all(|a| matches!(
                a,
                Action::Send {
                    stream: Stream::Data,
                    pkt: Packet::Barrier(_)
                }
            )),
            "then only the epoch's barrier, on the data stream: {done:?}"
        );
        assert!(n.write_done(&w[0], true).is_err(), "a second completion");
    }

    #[test]
    fn a_failed_primary_write_asks_for_a_new_connection_only_past_the_bound() {
        // Disconnected: each write completes at its local failure. Apart: no two merge.
        let writes = super::super::FailedLocal::MAX as u64 + 1;
        let mut n = sized_node(writes * 16);
        let mut renewals = 0;
        for i in 0..writes {
            let id = i + 1;
            n.primary
                .write(id, i * 16, 4096, WriteKind::Data, false)
                .unwrap();
            let w = local_writes(&drained(&mut n))[0];
            if !n.write_done(&w, false).unwrap() {
                renewals += 1;
            }
        }
        assert_eq!(renewals, 1, "only the write past the list's bound");
    }

    #[test]
    fn a_peer_write_the_target_holds_comes_back_as_a_release() {
        let (mut n, run, tag) = node_with_resync_write();
        let token = n.receiver.peer_write(peer_write(1, 0)).unwrap();
        let actions = drained(&mut n);
        assert!(
            local_writes(&actions).is_empty(),
            "held behind the resync write: {actions:?}"
        );
        let (runs, bm) = n.runs_and_bitmap();
        runs.write_done(bm, run, tag, true).unwrap();
        let released: Vec<LocalWrite> = runs
            .take_actions()
            .into_iter()
            .filter_map(|a| match a {
                SyncAction::Release { write } => Some(write),
                _ => None,
            })
            .collect();
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].side, Side::Peer { token });
        assert_eq!(n.runs.held(), 0);
        assert!(n.write_done(&released[0], true).unwrap());
    }

    #[test]
    fn epoch_flushes_merge_into_rounds_each_issued_after_its_request() {
        let mut n = node();
        let mut actions = Vec::new();
        for (epoch, block) in [(1u32, 0u64), (2, 8)] {
            let token = n
                .receiver
                .peer_write(peer_write(epoch.into(), block))
                .unwrap();
            let w = local_writes(&drained(&mut n))[0];
            assert_eq!(w.side, Side::Peer { token });
            assert!(n.write_done(&w, true).unwrap());
            n.receiver.peer_barrier(epoch).unwrap();
            n.drain(&mut actions);
        }
        let rounds = |a: &[Action]| a.iter().filter(|a| matches!(a, Action::FlushRound)).count();
        assert_eq!(rounds(&actions), 1, "the second request waits: {actions:?}");
        let mut out = Vec::new();
        n.flush_round_done(true, &mut out).unwrap();
        assert_eq!(rounds(&out), 1, "the next round: {out:?}");
        let acks = |a: &[Action]| {
            a.iter()
                .filter(|a| {
                    matches!(
                        a,
                        Action::Send {
                            stream: Stream::Meta,
                            pkt: Packet::BarrierAck(_)
                        }
                    )
                })
                .count()
        };
        assert_eq!(acks(&out), 1, "the first epoch is acked: {out:?}");
        let mut last = Vec::new();
        n.flush_round_done(true, &mut last).unwrap();
        assert_eq!((rounds(&last), acks(&last)), (0, 1), "{last:?}");
    }

    #[test]
    fn a_connection_loss_cuts_the_run_and_completes_what_waited_for_the_peer() {
        let (mut n, _, _) = node_with_resync_write();
        n.receiver.peer_write(peer_write(1, 0)).unwrap();
        assert!(local_writes(&drained(&mut n)).is_empty(), "held");
        n.primary.connected().unwrap();
        n.primary
            .write(7, 64, 4096, WriteKind::Data, false)
            .unwrap();
        let w = local_writes(&drained(&mut n))[0];
        n.write_done(&w, true).unwrap();
        let mut out = Vec::new();
        assert!(n.connection_lost(&mut out).is_none(), "no verify ran");
        assert!(n.runs.target().is_none(), "the target is cut");
        assert_eq!(
            n.runs.held(),
            1,
            "the held write waits for its resync write"
        );
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::Complete { id: 7, ok: true })),
            "the write that waited for the peer completes: {out:?}"
        );
        assert!(
            n.primary.out_of_sync().is_set(8),
            "and the peer may lack it"
        );
    }

    #[test]
    fn only_a_primary_that_loses_its_peers_disk_starts_a_generation() {
        let mut n = node();
        n.uuids = UuidSet {
            current: 0xaa01,
            bitmap: 0,
            history: [0; 2],
        };
        assert_eq!(
            n.lost_peer_disk(0xcc00),
            None,
            "a Secondary keeps its generation"
        );
        n.role = Role::Primary;
        let new = n.lost_peer_disk(0xcc00).expect("a Primary starts one");
        assert_eq!((new.current & !1, new.bitmap & !1), (0xcc00, 0xaa00));
        assert_eq!(
            n.uuids.current, 0xaa01,
            "the driver assigns it once durable"
        );
        n.disk = DiskState::Inconsistent;
        assert_eq!(n.lost_peer_disk(0xcc00), None, "not UpToDate");
        n.disk = DiskState::UpToDate;
        n.uuids = new;
        assert_eq!(
            n.lost_peer_disk(0xdd00),
            None,
            "a bitmap UUID already marks one"
        );
    }

    #[test]
    fn a_target_is_told_of_the_writes_already_on_the_disk() {
        for peer_side in [true, false] {
            let mut n = node();
            if peer_side {
                n.receiver.peer_write(peer_write(1, 0)).unwrap();
            } else {
                n.primary.write(7, 0, 4096, WriteKind::Data, false).unwrap();
            }
            let w = local_writes(&drained(&mut n));
            assert_eq!(w.len(), 1, "submitted, not completed");
            let (_, _, actions) = target_over_block_0(&mut n);
            let (runs, bm) = n.runs_and_bitmap();
            for a in actions {
                let SyncAction::Send { pkt, .. } = a else {
                    continue;
                };
                if let Ok(Some(Inbound::RsRequest { sector, len, .. })) = Inbound::from_packet(&pkt)
                {
                    assert_eq!(
                        runs.data_reply(bm, sector, len).unwrap(),
                        None,
                        "a reply would land under the write on the disk (peer's: {peer_side})"
                    );
                }
            }
            assert!(bm.is_set(0), "the block is still to be fetched");
        }
    }

    #[test]
    fn the_end_of_a_target_run_adopts_its_generation_only_if_nothing_changed_meanwhile() {
        let (mut n, run, tag) = node_with_resync_write();
        n.disk = DiskState::Inconsistent;
        let (runs, bm) = n.runs_and_bitmap();
        runs.write_done(bm, run, tag, true).unwrap();
        let adopt = runs.take_actions().into_iter().find_map(|a| match a {
            SyncAction::Finished { adopt, .. } => adopt,
            _ => None,
        });
        let peer = adopt.expect("nothing left: the peer's UUIDs");
        let end = n.target_end(run, Some(peer));
        let done = n
            .target_end_uuids(&end)
            .unwrap()
            .expect("a generation to adopt");
        assert_eq!(
            done.current & !1,
            peer.current & !1,
            "the peer's generation"
        );
        let mut changed = n.uuids;
        changed.current ^= 0x100;
        let before = std::mem::replace(&mut n.uuids, changed);
        assert!(
            n.target_end_uuids(&end).is_err(),
            "the UUIDs changed meanwhile"
        );
        n.uuids = before;
        assert!(!n.target_end_recorded(
            &TargetEnd {
                run: run + 1,
                ..end
            },
            false
        ));
        assert!(!n.runs.idle(), "another run's end records nothing");
        assert_eq!(n.conn, ConnState::SyncTarget);
        n.crashed_primary = true;
        assert!(
            n.target_end_recorded(&end, false),
            "the run is over: Connected, which repairs the crash"
        );
        assert_eq!(n.conn, ConnState::Connected);
        assert_eq!(n.disk, DiskState::Inconsistent, "not durable: not UpToDate");
        assert!(n.runs.idle());
        let later = n.target_end(run, Some(peer));
        n.target_end_recorded(&later, true);
        assert_eq!(n.disk, DiskState::UpToDate);
    }

    #[test]
    fn reaching_connected_repairs_a_crash_as_primary_once() {
        let mut n = node();
        assert!(!n.reached_connected(), "nothing to repair");
        n.crashed_primary = true;
        assert!(n.reached_connected(), "the driver records the clear");
        assert!(!n.crashed_primary && !n.reached_connected(), "once");
    }

    #[test]
    fn a_source_run_ends_when_the_peer_says_connected_and_completes_if_it_is_up_to_date() {
        let mut n = node();
        n.connection_up(101, Role::Secondary, DiskState::Inconsistent);
        let (uuids, sync_uuid) = n.begin_sync_source(0xC000);
        assert_eq!(uuids.bitmap, sync_uuid, "the run's bitmap UUID");
        n.uuids = uuids;
        n.start_source(SourceConfig::new(SECTORS), &TickInput::default())
            .unwrap();
        assert_eq!(
            (n.conn, n.peer_disk),
            (ConnState::SyncSource, DiskState::Inconsistent)
        );
        assert_eq!(
            n.peer_sync_ended(ConnState::SyncTarget),
            None,
            "still syncing"
        );
        n.crashed_primary = true;
        let end = n.peer_sync_ended(ConnState::Connected).unwrap();
        assert_eq!(
            end.uuids, None,
            "the peer is not UpToDate: nothing completes"
        );
        assert!(end.durable().is_empty());
        assert!(end.crash_repaired);
        assert_eq!(n.conn, ConnState::Connected);
        assert_eq!(n.peer_sync_ended(ConnState::Connected), None, "once");

        n.conn = ConnState::SyncSource;
        n.peer_reported(Role::Secondary, DiskState::UpToDate);
        n.crashed_primary = true;
        let end = n.peer_sync_ended(ConnState::Connected).unwrap();
        let done = end.uuids.expect("the generation that completes the run");
        assert_eq!(done.bitmap, 0, "the bitmap UUID rotates into history");
        assert_eq!(done.history[0], sync_uuid);
        assert_eq!(
            end.durable(),
            [SbChange::ClearCrashedPrimary, SbChange::Uuids(done)]
        );
        assert!(
            !end.crash_repaired,
            "cleared with the completing UUIDs instead"
        );
        assert!(!n.crashed_primary);
        assert_eq!(end.unfetched, 0);

        // Blocks still marked here that the UpToDate peer never fetched: DRBD's
        // `n_oos == rs_failed` assertion, reported to the driver.
        n.conn = ConnState::SyncSource;
        n.primary.out_of_sync_mut().mark(64, 3 * 4096);
        let end = n.peer_sync_ended(ConnState::Connected).unwrap();
        assert_eq!(end.unfetched, 3);
    }

    /// DRBD's `drbd_may_do_local_read`: an Inconsistent disk answers only ranges with no
    /// block out of sync, with or without a running target (the simulator's seed 76: a
    /// run that ended with failed blocks left a SyncTarget Primary reading stale blocks
    /// locally); an UpToDate one every range; a detached one none.
    #[test]
    fn reads_go_to_the_peer_where_the_disk_lacks_blocks() {
        let mut n = Node::for_test(SECTORS, UuidSet::default(), DiskState::UpToDate);
        n.primary.out_of_sync_mut().mark(8, 4096);
        assert!(!n.reads_from_peer(8, 4096), "UpToDate reads locally");
        n.disk = DiskState::Inconsistent;
        assert!(n.reads_from_peer(0, 8192), "a block out of sync, no run");
        assert!(!n.reads_from_peer(16, 4096), "in sync");
        n.disk = DiskState::Failed;
        assert!(n.reads_from_peer(16, 4096));
    }
}
