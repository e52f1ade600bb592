//! The node's one entry point for the events of the write path and of resync:
//! [`Node::step`] takes one [`Event`] — a request of the application, a packet of the
//! peer's write path (its writes and barriers on the data stream, its acks and barrier
//! acks on the meta stream), the peer's state, state change requests and live
//! `P_OUT_OF_SYNC`, protocol A's hand-off to the network, a local write or a flush round
//! that ended, the connection's start and loss; a resync or online-verify packet, the data of a
//! `P_RS_DATA_REPLY`, the resync clock, a run's read or write that ended — and appends
//! the [`Action`]s it leads to (the runs' among them, [`Node::drain`]). The daemon
//! (`volume/`) and both nodes of the simulator (`sim/`) feed these events through it and
//! nothing else, so the rules on them are one code:
//!
//! - **Admission.** The application's requests are taken only by a Primary
//!   ([`Outcome::ReadOnly`]) and only while the core has room ([`Outcome::Full`]: the
//!   driver waits for a retirement, which frees room, and feeds the request again).
//! - **Who takes what.** A write or barrier from the peer while this node is Primary
//!   (two primaries), an ack while it is Secondary, a command that is not an ack: the
//!   peer's error.
//! - **Back-pressure.** While the Receiver holds [`crate::request::ReceiverConfig`]'s
//!   `max_held` writes and barriers, a peer write or barrier is not taken
//!   ([`Outcome::Full`]); the driver stops reading the data stream (TCP pushes back on
//!   the peer) and feeds the same event again after a local write or flush ends.
//! - **The peer's `P_OUT_OF_SYNC` on a live connection** (a kernel peer in DRBD's Ahead
//!   mode sends it instead of a write): its range is marked, as DRBD's
//!   `receive_out_of_sync` does in any state (it only logs a state other than Behind);
//!   a range that is not one of this volume is the peer's error.
//! - **A Diskless peer.** Every write applied while the peer's disk is below
//!   Inconsistent is marked out of sync (DRBD's `receive_Data`): the peer lacks it (see
//!   `volume/`'s module docs on the Diskless Primary).
//! - **A SyncTarget Primary's `P_NEG_ACK`.** The peer lacks that range and this node has
//!   the newer data: the core keeps its bits set and the running target is told
//!   ([`crate::resync::Target::peer_lacks`]); it neither fetches the range nor reads it
//!   from the peer.
//! - **The peer's `P_STATE`.** Its disk failing while connected makes a Primary start a
//!   generation the peer lacks (an [`Action::Persist`] of `Then::NewGeneration`, DRBD's
//!   `after_state_ch`: durable before the next write, else the disk goes out of use);
//!   its disk becoming UpToDate while this one is Inconsistent and no run goes renews
//!   the connection, so that the handshake resyncs (DRBD 8.4's `receive_state` runs its
//!   sync handshake again); its Connected ends this node's SyncSource run
//!   ([`Action::SourceEnded`]).
//! - **The peer's state change requests.** Decided over this node's state
//!   ([`Node::peer_request`]); the reply goes first, then what a grant changes: a failed
//!   peer disk as from its `P_STATE`, a full resync (the peer's `invalidate` or
//!   `invalidate-remote`) or one that became due renews the connection once the reply
//!   has left ([`Action::RenewForResync`]: tandem decides a resync at the handshake).
//! - **The connection's start** ([`Up`]): once the handshake and the bitmap exchange are
//!   done, the run starts or the node is Connected, its `P_STATE` goes out, a Primary
//!   replicates (`handshake.rs`'s module docs).
//! - **Management commands** (`invalidate`, `new-current-uuid`, `verify`, `pause-sync`,
//!   `discard-my-data`, `primary`, `secondary`: [`Event::Admin`]) and the peer's live
//!   `P_UUIDS`: refused ([`Outcome::Refused`]), done, or a durable plan asked for
//!   ([`Action::Persist`], [`Outcome::Persisting`]) whose outcome ([`Event::Persisted`])
//!   leads to the rest (`admin.rs`); a connected `primary` asks the peer first
//!   ([`Outcome::AskedPeer`]; its reply [`Event::StateReply`], its silence
//!   [`Event::PeerSilent`], `role_cmd.rs`).
//! - **Resync and verify packets.** A resync request that comes before the
//!   handshake's start (a kernel peer may send one first) starts the source, the peer's
//!   first `P_OV_REQUEST` this node's side of its verify, each configured by
//!   [`super::PeerStartedRuns`] (none: the peer's error); a request the run has no room
//!   for is not taken ([`Outcome::Full`]: the driver stops reading and feeds it again
//!   after a completion). A packet no run expects is the peer's error. The data of a
//!   `P_RS_DATA_REPLY` is written only when the target says so
//!   ([`Outcome::SyncWrite`]; a reply an application write overtook is void).
//! - **A connection loss.** The runs are cut before the cores let go of the peer
//!   ([`Node::connection_lost`]); an online verify it interrupts is reported
//!   ([`Action::VerifyInterrupted`]); a Primary that loses its peer's disk starts a
//!   generation the peer lacks (`Then::NewGeneration`).
//! - **A failed local write the runs cannot record** (their list is full,
//!   [`super::FailedLocal`]): the connection is renewed ([`Action::DropConnection`])
//!   rather than a failed block forgotten.
//!
//! Errors ([`StepError`]) say whose they are. The peer's (a protocol violation) are
//! operating errors: the driver drops the connection with the reason, never panics. The
//! application's (a request the core cannot take) are refused to the frontend. The
//! driver's (an unknown handle, a second completion: a broken contract between driver and
//! core) are programmer errors: the daemon panics, the simulator fails the seed.
//!
//! Bounds: one event's actions are what the cores emit for it (a write ack and a
//! barrier ack at most for a peer write; for a completion, the writes it frees — at most
//! the cores' in-flight limits).

use super::{Action, Admin, Durable, LocalWrite, Node, PeerDisk, ReadFor, Then, Up, Why};
use crate::meta::disk::SbChange;
use crate::net::Stream;
use crate::request::{Error, PeerWrite, WriteKind};
use crate::resync::{Inbound, ReadOutcome, TickInput, VerifyConfig};
use crate::state::change::StateRv;
use crate::state::uuid::UuidPacket;
use crate::state::{DiskState, Role};
use crate::wire::{self, Command, Packet};

/// What a request of this node's application asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Io {
    /// Write (or discard, or zero) `len` bytes at `sector`; `fua`: durable on completion.
    Write {
        sector: u64,
        len: u32,
        kind: WriteKind,
        fua: bool,
    },
    /// Make every write completed before it durable.
    Flush,
}

/// One event of the write path (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    /// A request of this node's application, under the driver's handle `id` (a write's
    /// data stays with the driver, keyed by `id`, until [`Action::SendWrite`] and
    /// [`Action::LocalWrite`] have used it and [`Action::Complete`] names `id`).
    Request { id: u64, io: Io },
    /// `P_DATA` / `P_TRIM` / `P_ZEROES` from the peer. Its data stays with the driver,
    /// keyed by the token of [`Outcome::Taken`].
    PeerWrite(PeerWrite),
    /// `P_BARRIER` from the peer.
    PeerBarrier(u32),
    /// The peer's `P_RECV_ACK`, `P_WRITE_ACK`, `P_RS_WRITE_ACK` or `P_NEG_ACK` of this
    /// node's write `block_id`.
    PeerAck { cmd: Command, block_id: u64 },
    /// The peer's `P_BARRIER_ACK` of epoch `nr` with `set_size` writes.
    BarrierAck { nr: u32, set_size: u32 },
    /// Protocol A: this node's write `block_id` left for the network.
    Handed { block_id: u64 },
    /// The local write `w` an action asked for ended (`ok`).
    WriteDone { w: LocalWrite, ok: bool },
    /// The local write `w` failed (`attempted`: it reached the disk; else a detached
    /// disk refused it): instead of `WriteDone`, the failure is recorded first and the
    /// write completes once that is durable (`disk.rs`).
    WriteFailed { w: LocalWrite, attempted: bool },
    /// The running flush round ended (`ok`).
    FlushRoundDone { ok: bool },
    /// The peer's `P_OUT_OF_SYNC` on a live connection: it did not send the write of
    /// this range (DRBD's Ahead mode).
    PeerOutOfSync { sector: u64, len: u32 },
    /// The peer's `P_STATE` (`word`); `random` is the current UUID of a generation it
    /// may start ([`Node::lost_peer_disk`]).
    PeerState { word: u32, random: u64 },
    /// The connection is gone ([`Node::connection_lost`]); `random` as for
    /// [`Event::PeerState`]: a Primary that loses its peer's disk starts a generation.
    ConnectionLost { random: u64 },
    /// The peer's `P_STATE_CHG_REQ` or `P_CONN_ST_CHG_REQ` (`cmd`, `req`), decided
    /// over this node's state ([`Node::peer_request`]; `resolve_conflicts`: this node
    /// wins a crossing); `random` as for [`Event::PeerState`].
    StateRequest {
        cmd: Command,
        req: wire::ReqState,
        resolve_conflicts: bool,
        random: u64,
    },
    /// The peer's `P_STATE_CHG_REPLY` / `P_CONN_ST_CHG_REPLY` (`code`) to this node's
    /// promotion request (`role_cmd.rs`).
    StateReply { code: i32 },
    /// No reply to the promotion request of command `reply` came within the driver's
    /// timeout ([`Outcome::AskedPeer`]).
    PeerSilent { reply: u64 },
    /// A resync or online-verify packet without data (not `P_RS_DATA_REPLY`) from
    /// either stream, read at `tick`: a request the peer sends first starts the run that
    /// answers it ([`super::PeerStartedRuns`]); one the run has no room for is not taken
    /// ([`Outcome::Full`]).
    SyncPacket { inbound: Inbound, tick: TickInput },
    /// `P_RS_DATA_REPLY` of `len` bytes at `sector`: its data stays with the driver
    /// until the write [`Outcome::SyncWrite`] names takes it (none: a newer write
    /// overtook it, the data is dropped).
    SyncDataReply { sector: u64, len: u32 },
    /// A step of the resync clock ([`crate::replica::SyncRuns::tick`];
    /// [`Outcome::Ticked`] says whether a run still needs it).
    SyncTick(TickInput),
    /// A run's read ([`Action::SyncRead`]: its `run`, `tag` and `purpose`) ended.
    SyncReadDone {
        run: u64,
        tag: u64,
        purpose: ReadFor,
        outcome: ReadOutcome,
    },
    /// A run's write ([`Action::SyncZeroes`], or [`Outcome::SyncWrite`]'s) ended.
    SyncWriteDone { run: u64, tag: u64, ok: bool },
    /// The connection's handshake, and the bitmap exchange it decided, are done
    /// ([`Up`]).
    ConnectionUp(Up),
    /// A management command ([`Admin`]) under the driver's handle `reply`, which the
    /// [`Action::Persist`] it leads to carries back ([`Outcome::Refused`]: not taken).
    Admin { cmd: Admin, reply: u64 },
    /// The peer's `P_UUIDS` on a live connection (a skipped initial sync).
    PeerUuids(UuidPacket),
    /// An [`Action::Persist`]'s plan is durable (`ok`) or failed.
    Persisted { then: Then, ok: bool },
}

/// What [`Node::step`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done,
    /// The peer's write was taken as this token: the driver keeps its data under it
    /// until [`Action::LocalWrite`] names it (a write is never dropped, not even when
    /// its connection is lost: `request::Receiver`'s module docs).
    Taken(u64),
    /// Not taken, nothing changed: the Receiver (a peer write or barrier) or the Primary
    /// core (a request) has no room (see the module docs).
    Full,
    /// The peer's state change request was answered with this code (a refusal is the
    /// driver's to log).
    Answered(StateRv),
    /// A request while this node is not Primary: refused, nothing changed.
    ReadOnly,
    /// Write the `P_RS_DATA_REPLY`'s data; report [`Event::SyncWriteDone`] with this
    /// run and tag.
    SyncWrite {
        run: u64,
        tag: u64,
    },
    /// A step of the resync clock: whether a run (a target, a source, this node's
    /// verify) still needs the clock.
    Ticked {
        running: bool,
    },
    /// A management command refused, the node unchanged: the operator's message.
    Refused(Why),
    /// A management command taken whose plan is asked for ([`Action::Persist`]): it is
    /// done at its [`Event::Persisted`].
    Persisting,
    /// A promotion that asked the peer (`role_cmd.rs`): its answer is an
    /// [`Action::Reply`] or its plan's end; the driver feeds [`Event::PeerSilent`]
    /// after its timeout.
    AskedPeer,
}

/// Whose error an event revealed (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StepError {
    /// The peer broke the protocol: drop the connection with this reason.
    Peer(String),
    /// The driver broke its contract with the core: a bug on this node.
    Contract(String),
    /// The application's request is not one the core takes (a range past the end, a
    /// write over more activity-log extents than one transaction holds): refuse it.
    Request(String),
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Peer(why) => write!(f, "the peer broke the protocol: {why}"),
            StepError::Contract(why) => write!(f, "BUG: driver/core contract broken: {why}"),
            StepError::Request(why) => write!(f, "request refused: {why}"),
        }
    }
}

impl StepError {
    /// A core's error on `what`: `Invalid` is the driver's, the rest the peer's.
    pub(super) fn core(what: &str, e: Error) -> StepError {
        match e {
            Error::Invalid(_) => StepError::Contract(format!("{what}: {e}")),
            Error::Busy | Error::Protocol(_) => StepError::Peer(format!("{what}: {e}")),
        }
    }
}

impl Node {
    /// Feeds one event (see the module docs); the actions it leads to are appended to
    /// `out`, in the order the cores emitted them.
    pub(crate) fn step(&mut self, ev: Event, out: &mut Vec<Action>) -> Result<Outcome, StepError> {
        let outcome = match ev {
            Event::Request { id, io } => self.request(id, io)?,
            Event::PeerWrite(w) => self.peer_write(w)?,
            Event::PeerBarrier(nr) => self.peer_barrier(nr)?,
            Event::PeerAck { cmd, block_id } => {
                self.peer_ack(cmd, block_id)?;
                Outcome::Done
            }
            Event::BarrierAck { nr, set_size } => {
                self.primary_only(Command::P_BARRIER_ACK)?;
                self.primary
                    .barrier_ack(nr, set_size)
                    .map_err(|e| StepError::core("P_BARRIER_ACK", e))?;
                Outcome::Done
            }
            Event::Handed { block_id } => {
                self.primary.handed_to_network(block_id);
                Outcome::Done
            }
            Event::WriteDone { w, ok } => {
                let recorded = self
                    .write_done(&w, ok)
                    .map_err(|e| StepError::core("local write done", e))?;
                if !recorded {
                    out.push(Action::DropConnection {
                        reason: "too many failed local writes to record during the connection",
                    });
                }
                Outcome::Done
            }
            Event::WriteFailed { w, attempted } => self
                .write_failed(w, attempted, out)
                .map_err(|e| StepError::core("local write failed", e))?,
            Event::FlushRoundDone { ok } => {
                self.flush_round_done(ok, out)
                    .map_err(|e| StepError::core("flush round done", e))?;
                Outcome::Done
            }
            Event::PeerOutOfSync { sector, len } => {
                self.primary
                    .out_of_sync_mut()
                    .mark_checked(sector, len)
                    .map_err(|e| {
                        StepError::Peer(format!(
                            "P_OUT_OF_SYNC of {len} bytes at sector {sector}: {e}"
                        ))
                    })?;
                Outcome::Done
            }
            Event::PeerState { word, random } => {
                self.peer_state_changed(word, random, out);
                Outcome::Done
            }
            Event::StateRequest {
                cmd,
                req,
                resolve_conflicts,
                random,
            } => Outcome::Answered(self.state_request(cmd, req, resolve_conflicts, random, out)),
            Event::StateReply { code } => {
                self.state_reply(code, out);
                Outcome::Done
            }
            Event::PeerSilent { reply } => self.peer_silent(reply, out),
            Event::ConnectionLost { random } => {
                self.lost(random, out);
                Outcome::Done
            }
            Event::SyncPacket { inbound, tick } => self.sync_packet(inbound, &tick)?,
            Event::SyncDataReply { sector, len } => self.sync_data_reply(sector, len)?,
            Event::SyncTick(tick) => {
                let bm = self.primary.out_of_sync_mut();
                let running = self.runs.tick(bm, &tick);
                Outcome::Ticked { running }
            }
            Event::SyncReadDone {
                run,
                tag,
                purpose,
                outcome,
            } => self.sync_read_done((run, tag, purpose), outcome)?,
            Event::SyncWriteDone { run, tag, ok } => self.sync_write_done(run, tag, ok)?,
            Event::ConnectionUp(up) => {
                self.up(up, out)?;
                Outcome::Done
            }
            Event::Admin { cmd, reply } => self.admin_outcome(cmd, reply, out),
            Event::PeerUuids(p) => {
                self.peer_uuids(&p, out);
                Outcome::Done
            }
            Event::Persisted { then, ok } => self
                .persisted(then, ok, out)
                .map_err(|e| StepError::core("persisted", e))?,
        };
        self.drain(out);
        Ok(outcome)
    }

    /// A resync or verify packet without data: a request the peer sends first starts the
    /// run that answers it; a request the run has no room for waits (`Full`).
    fn sync_packet(&mut self, inbound: Inbound, tick: &TickInput) -> Result<Outcome, StepError> {
        match inbound {
            Inbound::RsRequest { .. } => {
                if self.runs.source().is_none() {
                    if let Some(cfg) = self.peer_started.source {
                        self.ensure_source(cfg, tick).map_err(|e| {
                            StepError::Peer(format!("cannot start the resync source: {e}"))
                        })?;
                    }
                }
                if !self.runs.source_can_accept() {
                    return Ok(Outcome::Full);
                }
            }
            Inbound::OvRequest { sector, .. } => {
                let cfg = self.peer_started.verify.map(|c| VerifyConfig {
                    start_sector: sector,
                    ..c
                });
                if self.ensure_verify_peer(cfg).map_err(StepError::Peer)? {
                    tracing::info!("online verify started by the peer at sector {sector}");
                }
                if !self.runs.verify_can_accept() {
                    return Ok(Outcome::Full);
                }
            }
            _ => {}
        }
        let bm = self.primary.out_of_sync_mut();
        self.runs.inbound(bm, inbound).map_err(StepError::Peer)?;
        Ok(Outcome::Done)
    }

    /// A run's read ended: its digest (a verify's or a checksum-based target's) or its
    /// data's outcome (a source's) goes to the run that asked; a run that ended since
    /// drops it.
    fn sync_read_done(
        &mut self,
        (run, tag, purpose): (u64, u64, ReadFor),
        outcome: ReadOutcome,
    ) -> Result<Outcome, StepError> {
        let digest = match outcome {
            ReadOutcome::Ok { digest, .. } => digest,
            ReadOutcome::Failed => None,
        };
        let bm = self.primary.out_of_sync_mut();
        let r = match purpose {
            ReadFor::Verify => self.runs.verify_digest_done(bm, run, tag, digest),
            ReadFor::TargetDigest => self.runs.digest_done(bm, run, tag, digest),
            ReadFor::Source { .. } => self.runs.source_read_done(bm, run, tag, outcome),
        };
        r.map_err(|e| StepError::Contract(format!("resync read done: {e}")))?;
        Ok(Outcome::Done)
    }

    /// `P_RS_DATA_REPLY`: the write of its data, or none when it is void.
    fn sync_data_reply(&mut self, sector: u64, len: u32) -> Result<Outcome, StepError> {
        let bm = self.primary.out_of_sync_mut();
        let write = self.runs.data_reply(bm, sector, len);
        Ok(match write.map_err(StepError::Peer)? {
            Some((run, tag)) => Outcome::SyncWrite { run, tag },
            None => Outcome::Done,
        })
    }

    /// A run's write ended.
    fn sync_write_done(&mut self, run: u64, tag: u64, ok: bool) -> Result<Outcome, StepError> {
        let bm = self.primary.out_of_sync_mut();
        self.runs
            .write_done(bm, run, tag, ok)
            .map_err(|e| StepError::Contract(format!("resync write done: {e}")))?;
        Ok(Outcome::Done)
    }

    /// `P_BARRIER` from the peer: not taken while the Receiver is full.
    fn peer_barrier(&mut self, nr: u32) -> Result<Outcome, StepError> {
        self.not_primary("P_BARRIER received while Primary")?;
        if !self.receiver.can_accept() {
            return Ok(Outcome::Full);
        }
        self.receiver
            .peer_barrier(nr)
            .map_err(|e| StepError::core("P_BARRIER", e))?;
        Ok(Outcome::Done)
    }

    /// The connection is gone: an interrupted verify is reported, and a Primary that
    /// lost its peer's disk starts a generation.
    fn lost(&mut self, random: u64, out: &mut Vec<Action>) {
        self.asking_lost(out);
        if let Some(progress) = self.connection_lost(out) {
            out.push(Action::VerifyInterrupted(progress));
        }
        self.new_generation(random, out);
    }

    /// A generation the peer lacks, if this node starts one ([`Node::lost_peer_disk`]):
    /// durable before the next application write enters the core (the driver stages
    /// the plan's superblock write with the change: `Then::NewGeneration`); if it cannot
    /// be made durable the disk goes out of use, as writing on in a generation that is
    /// not on disk would hide a split brain later.
    fn new_generation(&self, random: u64, out: &mut Vec<Action>) {
        if let Some(uuids) = self.lost_peer_disk(random) {
            out.push(Action::Persist {
                plan: vec![Durable::Superblock(vec![SbChange::Uuids(uuids)])],
                then: Then::NewGeneration,
                reply: None,
            });
        }
    }

    /// A request of the application (see the module docs: admission).
    fn request(&mut self, id: u64, io: Io) -> Result<Outcome, StepError> {
        if self.role != Role::Primary {
            return Ok(Outcome::ReadOnly);
        }
        if !self.primary.can_accept() {
            return Ok(Outcome::Full);
        }
        let r = match io {
            Io::Write {
                sector,
                len,
                kind,
                fua,
            } => self.primary.write(id, sector, len, kind, fua),
            Io::Flush => self.primary.flush(id),
        };
        r.map_err(|e| StepError::Request(e.to_string()))?;
        Ok(Outcome::Done)
    }

    /// A write from the peer: taken under a token, or not while the Receiver is full.
    fn peer_write(&mut self, w: PeerWrite) -> Result<Outcome, StepError> {
        self.not_primary("the peer sent a write but this node is Primary (two primaries)")?;
        if !self.receiver.can_accept() {
            return Ok(Outcome::Full);
        }
        let token = self
            .receiver
            .peer_write(w)
            .map_err(|e| StepError::core("peer write", e))?;
        if self.peer_disk < DiskState::Inconsistent && !self.sabotaged_diskless_peer() {
            self.primary.out_of_sync_mut().mark(w.sector, w.len);
        }
        Ok(Outcome::Taken(token))
    }

    /// The peer's `P_STATE`: its role, disk and connection state as
    /// [`Node::peer_state`] reads them, and what they lead to here.
    fn peer_state_changed(&mut self, word: u32, random: u64, out: &mut Vec<Action>) {
        let (seen, conn) = self.peer_state(word);
        match seen {
            PeerDisk::Unchanged => {}
            PeerDisk::Failed => self.peer_disk_lost(random, out),
            PeerDisk::ResyncDue => out.push(Action::DropConnection {
                reason: "the peer's disk is UpToDate now and this one is Inconsistent: \
                         renewing the connection for the resync",
            }),
        }
        if let Some(end) = self.peer_sync_ended(conn) {
            out.push(Action::SourceEnded(end));
        }
    }

    /// The peer's state change request: the reply (on the meta stream, before anything
    /// it leads to) and, if granted, what the grant changes here — a failed peer disk
    /// ([`Self::peer_disk_lost`]), a full resync either way or one that became due
    /// ([`Action::RenewForResync`], after the reply).
    fn state_request(
        &mut self,
        cmd: Command,
        req: wire::ReqState,
        resolve_conflicts: bool,
        random: u64,
        out: &mut Vec<Action>,
    ) -> StateRv {
        let (d, seen) = self.peer_request(req, resolve_conflicts);
        let reply = if cmd == Command::P_CONN_ST_CHG_REQ {
            Command::P_CONN_ST_CHG_REPLY
        } else {
            Command::P_STATE_CHG_REPLY
        };
        out.push(Action::Send {
            stream: Stream::Meta,
            pkt: Packet::ReqStateReply {
                cmd: reply,
                retcode: d.rv.code(),
            },
        });
        if !d.rv.is_success() {
            return d.rv;
        }
        if seen == PeerDisk::Failed {
            self.peer_disk_lost(random, out);
        }
        let g = d.grant;
        if g.sync_source || g.sync_target || seen == PeerDisk::ResyncDue {
            out.push(Action::RenewForResync {
                target: g.sync_target,
            });
        }
        d.rv
    }

    /// The peer's disk failed while connected ([`PeerDisk::Failed`], from its `P_STATE`
    /// or a state change request the driver granted): reported, and a Primary starts a
    /// generation the peer lacks (`random` its current UUID).
    fn peer_disk_lost(&self, random: u64, out: &mut Vec<Action>) {
        out.push(Action::PeerDiskFailed {
            disk: self.peer_disk,
        });
        self.new_generation(random, out);
    }

    /// The peer's ack `cmd` of this node's write `block_id`.
    fn peer_ack(&mut self, cmd: Command, block_id: u64) -> Result<(), StepError> {
        self.primary_only(cmd)?;
        let r = match cmd {
            Command::P_RECV_ACK => self.primary.peer_recv_ack(block_id),
            Command::P_WRITE_ACK | Command::P_RS_WRITE_ACK => self.primary.peer_write_ack(block_id),
            Command::P_NEG_ACK => self
                .primary
                .peer_neg_ack(block_id)
                .map(|(sector, len)| self.runs.peer_lacks(sector, len)),
            other => {
                return Err(StepError::Peer(format!(
                    "unexpected {} on the meta stream",
                    other.name()
                )))
            }
        };
        r.map_err(|e| StepError::core(cmd.name(), e))
    }

    fn primary_only(&self, cmd: Command) -> Result<(), StepError> {
        if self.role == Role::Primary {
            Ok(())
        } else {
            Err(StepError::Peer(format!(
                "{} received while Secondary",
                cmd.name()
            )))
        }
    }

    fn not_primary(&self, why: &str) -> Result<(), StepError> {
        if self.role == Role::Primary {
            Err(StepError::Peer(why.to_owned()))
        } else {
            Ok(())
        }
    }

    #[cfg(test)]
    fn sabotaged_diskless_peer(&self) -> bool {
        self.sabotage_diskless_peer_unmarked
    }

    #[cfg(not(test))]
    fn sabotaged_diskless_peer(&self) -> bool {
        false
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{Event, Io, Outcome, StepError};
    use crate::net::Stream;
    use crate::replica::{Action, Node, RunStart, Side, Up};
    use crate::request::{PeerWrite, WriteKind};
    use crate::resync::{Inbound, ReadOutcome, RequestKind, SourceConfig, TargetConfig, TickInput};
    use crate::state::uuid::UuidSet;
    use crate::state::{ConnState, DiskState, Role};
    use crate::wire::{self, dp, Command, Packet};

    const SECTORS: u64 = 2048;

    fn node(role: Role) -> Node {
        let mut n = Node::for_test(SECTORS, UuidSet::default(), DiskState::UpToDate);
        n.role = role;
        n
    }

    fn write(block_id: u64, sector: u64) -> Event {
        Event::PeerWrite(PeerWrite {
            block_id,
            sector,
            len: 4096,
            kind: WriteKind::Data,
            dp_flags: dp::DP_SEND_WRITE_ACK,
        })
    }

    fn peer_error(r: Result<Outcome, StepError>) -> String {
        match r {
            Err(StepError::Peer(why)) => why,
            other => panic!("expected the peer's error, got {other:?}"),
        }
    }

    #[test]
    fn acks_while_secondary_and_non_acks_are_the_peer_s_errors() {
        let mut n = node(Role::Secondary);
        let mut out = Vec::new();
        let ack = |cmd, block_id| Event::PeerAck { cmd, block_id };
        let e = peer_error(n.step(ack(Command::P_WRITE_ACK, 1), &mut out));
        assert!(e.contains("while Secondary"), "{e}");
        let barrier_ack = Event::BarrierAck { nr: 1, set_size: 1 };
        assert!(peer_error(n.step(barrier_ack, &mut out)).contains("while Secondary"));
        n.role = Role::Primary;
        let e = peer_error(n.step(ack(Command::P_DATA, 1), &mut out));
        assert!(e.contains("unexpected P_DATA"), "{e}");
        let e = peer_error(n.step(ack(Command::P_WRITE_ACK, 77), &mut out));
        assert!(e.contains("unknown block_id"), "an unknown id: {e}");
    }

    #[test]
    fn writes_and_barriers_to_a_primary_are_the_peer_s_errors() {
        let mut n = node(Role::Primary);
        let mut out = Vec::new();
        assert!(peer_error(n.step(write(1, 0), &mut out)).contains("two primaries"));
        let e = peer_error(n.step(Event::PeerBarrier(1), &mut out));
        assert!(e.contains("P_BARRIER received while Primary"), "{e}");
        assert!(out.is_empty());
    }

    /// A second completion of the same write is the driver's bug, not the peer's.
    #[test]
    fn a_completion_fed_twice_breaks_the_contract() {
        let mut n = node(Role::Secondary);
        let mut out = Vec::new();
        let Ok(Outcome::Taken(_)) = n.step(write(1, 0), &mut out) else {
            panic!("not taken");
        };
        let w = out
            .iter()
            .find_map(|a| match a {
                Action::LocalWrite(w) => Some(*w),
                _ => None,
            })
            .unwrap();
        let done = Event::WriteDone { w, ok: true };
        n.step(done, &mut out).unwrap();
        assert!(matches!(
            n.step(done, &mut out),
            Err(StepError::Contract(_))
        ));
    }

    /// A full Receiver takes nothing; the same event is taken once a write ends.
    #[test]
    fn a_full_receiver_takes_the_event_again_after_a_completion() {
        let mut n = node(Role::Secondary);
        let mut out = Vec::new();
        let mut first = None;
        let mut id = 0;
        loop {
            id += 1;
            match n.step(write(id, (id % 64) * 8), &mut out).unwrap() {
                Outcome::Taken(_) => {}
                Outcome::Full => break,
                other => panic!("a write is taken or not: {other:?}"),
            }
            assert!(id < 100_000, "never full");
        }
        for a in out.drain(..) {
            if let (Action::LocalWrite(w), None) = (a, first) {
                first = Some(w);
            }
        }
        assert_eq!(n.step(Event::PeerBarrier(1), &mut out), Ok(Outcome::Full));
        let w = first.unwrap();
        n.step(Event::WriteDone { w, ok: true }, &mut out).unwrap();
        assert!(matches!(
            n.step(write(id, 0), &mut out),
            Ok(Outcome::Taken(_))
        ));
    }

    fn rs_request(sector: u64) -> Event {
        Event::SyncPacket {
            inbound: Inbound::RsRequest {
                sector,
                len: 4096,
                kind: RequestKind::Data,
            },
            tick: TickInput::default(),
        }
    }

    /// A resync request that comes before the handshake's start starts the source the
    /// connection configured, which reads the block; without that configuration it is
    /// the peer's error. A request the source has no room for is not taken, and is
    /// taken once a read makes room.
    #[test]
    fn a_resync_request_starts_the_source_and_waits_for_room() {
        let mut n = node(Role::Primary);
        n.connection_up(101, Role::Secondary, DiskState::Inconsistent);
        let mut out = Vec::new();
        let e = peer_error(n.step(rs_request(0), &mut out));
        assert!(e.contains("without a source"), "{e}");
        n.peer_started.source = Some(SourceConfig {
            max_queue: 1,
            max_reads: 1,
            ..SourceConfig::new(SECTORS)
        });
        assert_eq!(n.step(rs_request(0), &mut out), Ok(Outcome::Done));
        let [Action::SyncRead(read)] = out[..] else {
            panic!("the source reads the block: {out:?}");
        };
        assert_eq!((read.sector, read.len), (0, 4096));
        out.clear();
        assert_eq!(n.step(rs_request(8), &mut out), Ok(Outcome::Full));
        assert!(out.is_empty(), "{out:?}");
        let done = Event::SyncReadDone {
            run: read.run,
            tag: read.tag,
            purpose: read.purpose,
            outcome: ReadOutcome::Ok {
                all_zero: false,
                digest: None,
            },
        };
        n.step(done, &mut out).unwrap();
        assert!(
            matches!(
                &out[..],
                [Action::SendSync { stream: Stream::Resync, reply: Some(t), .. }] if *t == read.tag
            ),
            "the reply carries the read's buffer: {out:?}"
        );
        assert!(matches!(
            n.step(done, &mut out),
            Err(StepError::Contract(_))
        ));
        assert_eq!(n.step(rs_request(8), &mut out), Ok(Outcome::Done));
    }

    /// A SyncTarget holds the peer's write over a resync write in flight; when that
    /// ends, the held write comes out of the same step as an ordinary local write.
    #[test]
    fn a_write_held_by_the_target_is_a_local_write_when_released() {
        let mut n = node(Role::Secondary);
        n.connection_up(101, Role::Primary, DiskState::UpToDate);
        n.primary.out_of_sync_mut().mark(0, 4096);
        let run = n
            .start_target(TargetConfig::new(SECTORS), &TickInput::default())
            .unwrap();
        let mut out = Vec::new();
        let later = TickInput {
            now_ms: 100,
            ..TickInput::default()
        };
        let ticked = n.step(Event::SyncTick(later), &mut out);
        assert_eq!(ticked, Ok(Outcome::Ticked { running: true }));
        assert!(
            out.iter().any(|a| matches!(
                a,
                Action::SendSync {
                    stream: Stream::Resync,
                    ..
                }
            )),
            "the target asks for block 0: {out:?}"
        );
        let reply = Event::SyncDataReply {
            sector: 0,
            len: 4096,
        };
        let Ok(Outcome::SyncWrite { run: r, tag }) = n.step(reply, &mut out) else {
            panic!("the reply's data is written");
        };
        assert_eq!(r, run);
        out.clear();
        let Ok(Outcome::Taken(token)) = n.step(write(1, 0), &mut out) else {
            panic!("the peer's write is taken");
        };
        assert!(
            !out.iter().any(|a| matches!(a, Action::LocalWrite(_))),
            "held behind the resync write: {out:?}"
        );
        n.step(Event::SyncWriteDone { run, tag, ok: true }, &mut out)
            .unwrap();
        let released: Vec<_> = out
            .iter()
            .filter_map(|a| match a {
                Action::LocalWrite(w) => Some(w.side),
                _ => None,
            })
            .collect();
        assert_eq!(released, [Side::Peer { token }]);
        assert_eq!(n.released, 1);
    }

    fn up(peer_role: Role, peer_disk: DiskState, run: Option<RunStart>) -> Event {
        Event::ConnectionUp(Up {
            version: 101,
            peer_role,
            peer_disk,
            run,
            peer_verify: false,
            tick: TickInput::default(),
        })
    }

    /// A connection's start with a target run: the node is SyncTarget, the target starts
    /// paused while the operator paused resync (asking for nothing), and the node's
    /// `P_STATE` goes out. A peer whose parameters make the run impossible is refused.
    #[test]
    fn a_connection_up_starts_the_run_paused_while_paused() {
        let mut n = node(Role::Secondary);
        n.disk = DiskState::Inconsistent;
        n.primary.out_of_sync_mut().mark(0, 4096);
        let mut out = Vec::new();
        let bad = TargetConfig {
            max_bio_size: 0,
            ..TargetConfig::new(SECTORS)
        };
        let e = peer_error(n.step(
            up(
                Role::Primary,
                DiskState::UpToDate,
                Some(RunStart::Target(bad)),
            ),
            &mut out,
        ));
        assert!(e.contains("cannot start the resync"), "{e}");
        n.runs.set_paused(true, 0);
        out.clear();
        let run = Some(RunStart::Target(TargetConfig::new(SECTORS)));
        n.step(up(Role::Primary, DiskState::UpToDate, run), &mut out)
            .unwrap();
        assert_eq!(n.conn, ConnState::SyncTarget);
        let t = n.runs.target().unwrap();
        assert!(
            t.progress(n.primary.out_of_sync()).paused,
            "paused from the start"
        );
        assert!(
            matches!(
                &out[..],
                [Action::Send {
                    stream: Stream::Data,
                    pkt: Packet::State(_)
                }]
            ),
            "{out:?}"
        );
        let later = TickInput {
            now_ms: 1_000,
            ..TickInput::default()
        };
        out.clear();
        n.step(Event::SyncTick(later), &mut out).unwrap();
        assert!(out.is_empty(), "a paused target asks for nothing: {out:?}");
    }

    /// A connection's start without a run: Connected; a crash of this node as Primary
    /// is repaired once; a Primary replicates its writes from then on.
    #[test]
    fn a_connection_up_without_a_run_is_connected_and_replicates() {
        let mut n = node(Role::Primary);
        n.crashed_primary = true;
        let mut out = Vec::new();
        n.step(up(Role::Secondary, DiskState::UpToDate, None), &mut out)
            .unwrap();
        assert_eq!(n.conn, ConnState::Connected);
        assert!(matches!(out[0], Action::CrashRepaired), "{out:?}");
        assert!(!n.crashed_primary);
        out.clear();
        let io = Io::Write {
            sector: 0,
            len: 4096,
            kind: WriteKind::Data,
            fua: false,
        };
        n.step(Event::Request { id: 1, io }, &mut out).unwrap();
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::SendWrite { id: 1, .. })),
            "the write goes to the peer: {out:?}"
        );
    }

    /// Writes applied while the peer is Diskless are out of sync here; before, not.
    #[test]
    fn writes_from_a_diskless_peer_are_marked() {
        let mut n = node(Role::Secondary);
        n.connection_up(101, Role::Primary, DiskState::UpToDate);
        let mut out = Vec::new();
        n.step(write(1, 0), &mut out).unwrap();
        assert!(!n.primary.out_of_sync().is_set(0));
        n.peer_reported(Role::Primary, DiskState::Diskless);
        n.step(write(2, 8), &mut out).unwrap();
        assert!(n.primary.out_of_sync().is_set(1), "block 1");
        assert!(!n.primary.out_of_sync().is_set(0));
    }

    fn state(role: Role, disk: DiskState, conn: ConnState) -> Event {
        let bits = wire::StateBits {
            role: u8::try_from(role.as_u32()).unwrap(),
            conn: u8::try_from(conn.as_u32()).unwrap(),
            disk: u8::try_from(disk.as_u32()).unwrap(),
            ..wire::StateBits::default()
        };
        Event::PeerState {
            word: bits.pack().unwrap(),
            random: 0xcc00,
        }
    }

    /// The peer's disk fails while connected: reported, and a Primary starts a
    /// generation; a second report of it changes nothing.
    #[test]
    fn a_peer_disk_that_fails_starts_a_generation_once() {
        let mut n = node(Role::Primary);
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        let mut out = Vec::new();
        let failed = state(Role::Secondary, DiskState::Failed, ConnState::Connected);
        n.step(failed, &mut out).unwrap();
        assert!(
            matches!(
                out[..],
                [
                    Action::PeerDiskFailed {
                        disk: DiskState::Failed
                    },
                    Action::Persist {
                        then: crate::replica::Then::NewGeneration,
                        ..
                    }
                ]
            ),
            "{out:?}"
        );
        let Some(Action::Persist { plan, .. }) = out.pop() else {
            unreachable!("matched above");
        };
        let [crate::replica::Durable::Superblock(changes)] = &plan[..] else {
            panic!("one superblock write: {plan:?}");
        };
        let [crate::meta::disk::SbChange::Uuids(u)] = changes[..] else {
            panic!("the generation alone: {changes:?}");
        };
        assert_ne!(u.current, n.uuids.current, "a new current UUID");
        out.clear();
        n.step(failed, &mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        // Not on disk: the disk goes out of use.
        assert!(!n.primary.stats().meta_failed);
        let then = crate::replica::Then::NewGeneration;
        n.step(Event::Persisted { then, ok: false }, &mut out)
            .unwrap();
        assert!(n.primary.stats().meta_failed);
    }

    /// An Inconsistent node without a run whose peer becomes UpToDate renews the
    /// connection, so that the handshake resyncs.
    #[test]
    fn a_peer_that_becomes_up_to_date_makes_a_resync_due() {
        let mut n = Node::for_test(SECTORS, UuidSet::default(), DiskState::Inconsistent);
        n.connection_up(101, Role::Secondary, DiskState::Inconsistent);
        let mut out = Vec::new();
        let up = state(Role::Primary, DiskState::UpToDate, ConnState::Connected);
        n.step(up, &mut out).unwrap();
        assert!(
            matches!(out[..], [Action::DropConnection { .. }]),
            "{out:?}"
        );
    }

    /// A SyncSource's run ends when the peer says Connected: complete if it is UpToDate
    /// (the bitmap UUID rotates into history), incomplete if its disk failed.
    #[test]
    fn a_peer_that_says_connected_ends_the_source_run() {
        for (disk, complete) in [(DiskState::UpToDate, true), (DiskState::Failed, false)] {
            let gen = UuidSet {
                current: 0xA000,
                bitmap: 0xB000,
                history: [0, 0],
            };
            let mut n = Node::for_test(SECTORS, gen, DiskState::UpToDate);
            n.role = Role::Primary;
            n.connection_up(101, Role::Secondary, DiskState::Inconsistent);
            n.conn = ConnState::SyncSource;
            let mut out = Vec::new();
            n.step(state(Role::Secondary, disk, ConnState::Connected), &mut out)
                .unwrap();
            let end = out.iter().find_map(|a| match a {
                Action::SourceEnded(end) => Some(*end),
                _ => None,
            });
            let end = end.unwrap_or_else(|| panic!("no end with {disk}: {out:?}"));
            assert_eq!(end.uuids.is_some(), complete, "{disk}");
            assert_eq!(n.conn, ConnState::Connected);
        }
    }

    /// The peer's `invalidate-remote` (StartingSyncS there): granted, the reply goes
    /// first and the connection is renewed with this node as target; refused while a
    /// resync runs, only the refusal goes.
    #[test]
    fn a_granted_invalidate_remote_answers_then_renews_as_target() {
        let bits = |conn: u8| wire::StateBits {
            conn,
            ..wire::StateBits::default()
        };
        let starting = u8::try_from(ConnState::StartingSyncS.as_u32()).unwrap();
        let ev = Event::StateRequest {
            cmd: Command::P_CONN_ST_CHG_REQ,
            req: wire::ReqState {
                mask: bits(0x1f).pack().unwrap(),
                val: bits(starting).pack().unwrap(),
            },
            resolve_conflicts: false,
            random: 0,
        };
        let mut n = node(Role::Secondary);
        n.connection_up(101, Role::Primary, DiskState::UpToDate);
        let mut out = Vec::new();
        let Ok(Outcome::Answered(rv)) = n.step(ev, &mut out) else {
            panic!("not answered");
        };
        assert!(rv.is_success());
        assert!(
            matches!(
                out[..],
                [
                    Action::Send {
                        pkt: wire::Packet::ReqStateReply {
                            cmd: Command::P_CONN_ST_CHG_REPLY,
                            retcode: 1
                        },
                        ..
                    },
                    Action::RenewForResync { target: true }
                ]
            ),
            "{out:?}"
        );
        out.clear();
        n.conn = ConnState::SyncTarget;
        let Ok(Outcome::Answered(rv)) = n.step(ev, &mut out) else {
            panic!("not answered");
        };
        assert!(!rv.is_success());
        assert!(matches!(out[..], [Action::Send { .. }]), "{out:?}");
    }

    /// The application's requests: refused on a Secondary, not taken while the core is
    /// full, refused when the core cannot take the range; taken, a write goes to the
    /// disk.
    #[test]
    fn requests_are_taken_only_by_a_primary_with_room() {
        let write = |id, sector| Event::Request {
            id,
            io: Io::Write {
                sector,
                len: 4096,
                kind: WriteKind::Data,
                fua: false,
            },
        };
        let mut out = Vec::new();
        let mut n = node(Role::Secondary);
        assert_eq!(n.step(write(1, 0), &mut out), Ok(Outcome::ReadOnly));
        n.role = Role::Primary;
        let e = n.step(write(1, SECTORS), &mut out).unwrap_err();
        assert!(matches!(e, StepError::Request(_)), "{e}");
        assert!(out.is_empty(), "{out:?}");
        let mut id = 0;
        loop {
            id += 1;
            match n.step(write(id, (id % 64) * 8), &mut out).unwrap() {
                Outcome::Done => {}
                Outcome::Full => break,
                other => panic!("{other:?}"),
            }
            assert!(id < 100_000, "never full");
        }
        assert!(out.iter().any(|a| matches!(a, Action::LocalWrite(_))));
        let flush = Event::Request { id, io: Io::Flush };
        assert_eq!(n.step(flush, &mut out), Ok(Outcome::Full));
    }

    /// A live connection's `P_OUT_OF_SYNC` marks its range; one that is not a range of
    /// the volume is the peer's error and marks nothing.
    #[test]
    fn out_of_sync_on_a_live_connection_marks_the_range() {
        let mut n = node(Role::Secondary);
        n.connection_up(101, Role::Primary, DiskState::UpToDate);
        let mut out = Vec::new();
        let oos = |sector, len| Event::PeerOutOfSync { sector, len };
        n.step(oos(8, 8192), &mut out).unwrap();
        assert_eq!(n.primary.out_of_sync().count(), 2);
        for bad in [oos(SECTORS, 4096), oos(0, 0), oos(0, 100), oos(0, 2 << 20)] {
            assert!(peer_error(n.step(bad, &mut out)).contains("P_OUT_OF_SYNC"));
        }
        assert_eq!(n.primary.out_of_sync().count(), 2);
        assert!(out.is_empty(), "{out:?}");
    }

    /// A SyncTarget Primary's write refused by the peer: the bits stay and the target
    /// learns that the peer lacks the range (it does not fetch it from the peer).
    #[test]
    fn a_neg_ack_on_a_sync_target_primary_tells_the_target() {
        let mut n = node(Role::Primary);
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        n.primary.connected().unwrap();
        n.primary.out_of_sync_mut().mark(0, 8192);
        n.start_target(TargetConfig::new(SECTORS), &TickInput::default())
            .unwrap();
        let remote = |n: &Node| {
            let t = n.runs.target().unwrap();
            t.must_read_remotely(n.primary.out_of_sync(), 0, 4096)
        };
        assert!(remote(&n), "block 0 is still to be fetched");
        n.primary.write(1, 0, 4096, WriteKind::Data, false).unwrap();
        let mut out = Vec::new();
        n.drain(&mut out);
        let block_id = out
            .iter()
            .find_map(|a| match a {
                Action::SendWrite { block_id, .. } => Some(*block_id),
                _ => None,
            })
            .unwrap();
        let neg = Event::PeerAck {
            cmd: Command::P_NEG_ACK,
            block_id,
        };
        n.step(neg, &mut out).unwrap();
        assert!(n.primary.out_of_sync().is_set(0), "the bits stay");
        assert!(!remote(&n), "the target knows the peer lacks block 0");
    }
}
