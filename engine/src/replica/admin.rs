//! The management commands that change a node's state, as [`Node`] methods the driver
//! runs: `invalidate`, `new-current-uuid` (with `--clear-bitmap`: the initial sync
//! skipped, and the peer's side of that), and online verify (`verify`, the peer's start,
//! the end). `primary` and `secondary` are [`Admin`]s too; their rules and sequences are
//! in `roles.rs` and `role_cmd.rs`.
//!
//! Each command is a check, a change of the node's state in memory, and what the driver
//! makes durable, in this order:
//!
//! - **invalidate**: [`Node::begin_invalidate`] (a Secondary, connected, no run going:
//!   every block marked out of sync) → the driver writes every bitmap page, then
//!   "inconsistent" in the superblock → [`Node::invalidated`] (the disk Inconsistent, the
//!   connection dropped: the next handshake makes this node the SyncTarget of a full
//!   resync, as DRBD 8.4's `invalidate` does). A crash between the two writes leaves a
//!   full bitmap on a consistent disk: more to resync, never less.
//! - **new-current-uuid**: [`Node::new_current_uuid`] (StandAlone only): the new
//!   generation, which the driver makes durable and assigns.
//! - **new-current-uuid --clear-bitmap**: [`Node::skip_initial_sync`] (connected at
//!   protocol ≥ 90, metadata just created): the pair's first generation; the bitmap is
//!   cleared and both disks are UpToDate in memory at once → the driver makes the UUIDs
//!   and "consistent" durable, then the bitmap pages (either order is safe: a crash
//!   between resyncs more) → [`Then::AnnounceSkip`] (`P_UUIDS` with the
//!   skip-initial-sync flag, then `P_STATE`). The peer's side is
//!   [`Node::peer_skipped_initial_sync`], with the same durable order before its
//!   `P_STATE` says UpToDate.
//! - **verify**: [`Node::start_verify`] (Connected, verify-alg here and on the peer):
//!   VerifyS; the peer's first request starts its side, [`Node::ensure_verify_peer`]:
//!   VerifyT; [`Node::verify_ended`] returns to Connected.
//!
//! Through [`super::Node::step`]: every command here is [`super::Event::Admin`]
//! ([`Admin`]: also `pause-sync` and `connect --discard-my-data`), the peer's live
//! `P_UUIDS` is [`super::Event::PeerUuids`]. `invalidate`, `new-current-uuid` and the
//! peer's skip ask for their plan as [`super::Action::Persist`] and finish at
//! [`super::Event::Persisted`] ([`Then`]: the connection renewed, the peer told, this
//! node's `P_STATE`); `verify`, `pause-sync` and `discard-my-data` are done at once —
//! the same in both drivers. The role changes' steps are `role_cmd.rs`'s (the peer's
//! answer to a promotion request is [`super::Event::StateReply`]).
//!
//! A refusal is an operating error: a message for the operator, the node unchanged.
//! The simulator's operator runs `invalidate` (its checker 13), on a fresh pair's day 0
//! `new-current-uuid --clear-bitmap` with the peer's side (checker 14), and `verify`
//! with the peer's side (checker 16), each with a sabotage caught; plain
//! `new-current-uuid` is checked by the unit tests below. The daemon's integration tests
//! run them all (`invalidate` and `verify` in `tests/tests/resync.rs`,
//! `new-current-uuid` and the peer's skipped initial sync in
//! `tests/tests/peer_requests.rs`).

use super::{Action, Durable, LocalWrite, Node, Outcome, Promotion, Why};
use crate::meta::disk::SbChange;
use crate::net::Stream;
use crate::request::Error;
use crate::resync::{TickInput, VerifyConfig};
use crate::state::uuid::{UuidPacket, UuidSet};
use crate::state::{ConnState, DiskState, Role};
use crate::wire::{self, Packet};

/// The `P_UUIDS` that announces a skipped initial sync (flag 8): `new-current-uuid
/// --clear-bitmap`, and the first promotion of a pair just created (`roles.rs`).
pub(super) fn skip_announcement(a: UuidSet) -> wire::Uuids {
    wire::Uuids {
        current: a.current,
        bitmap: a.bitmap,
        history: a.history,
        dirty_bits: 0,
        uuid_flags: wire::uuid_flags::UUID_FLAG_SKIP_INITIAL_SYNC,
    }
}

/// `new-current-uuid --clear-bitmap`, declared in memory ([`Node::skip_initial_sync`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SkippedSync {
    /// The pair's first generation.
    pub(crate) uuids: UuidSet,
    /// What the peer is told once it is durable.
    pub(crate) announce: wire::Uuids,
}

/// A skipped initial sync's plan, on either side: the generation with "consistent",
/// then the cleared bitmap pages, before the peer is told (`P_UUIDS`, `P_STATE`).
pub(super) fn skipped_sync_durable(uuids: UuidSet) -> Vec<Durable> {
    vec![
        Durable::Superblock(vec![SbChange::Consistent(true), SbChange::Uuids(uuids)]),
        Durable::Pages,
    ]
}

/// A management command that changes the node's state ([`super::Event::Admin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admin {
    /// `invalidate` ([`Node::begin_invalidate`]).
    Invalidate,
    /// `new-current-uuid` (`clear_bitmap`: `--clear-bitmap`, [`Node::skip_initial_sync`]);
    /// `random` is the new current UUID.
    NewCurrentUuid { clear_bitmap: bool, random: u64 },
    /// `verify`: this node's online verify (VerifyS, [`Node::start_verify`]), started at
    /// `tick`, configured as the connection's start said ([`super::PeerStartedRuns`]).
    Verify { tick: TickInput },
    /// `pause-sync` (`paused`) / `resume-sync`, at `now_ms`: holds for every target run
    /// until resumed.
    PauseSync { paused: bool, now_ms: u64 },
    /// `connect --discard-my-data` (or its reset): this node loses the next split brain.
    DiscardMyData(bool),
    /// `primary` (`force`: `primary --force`); `random`: the draws of the generation it
    /// may start (`role_cmd.rs`).
    Promote { force: bool, random: [u64; 2] },
    /// `secondary` (`role_cmd.rs`; the driver has checked that no frontend client holds
    /// the device open).
    Demote,
}

/// What the node does once the plan of an [`Action::Persist`] is durable
/// ([`super::Event::Persisted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Then {
    /// `invalidate`: the disk is Inconsistent and the connection renewed
    /// ([`Node::invalidated`]).
    Invalidated,
    /// `new-current-uuid --clear-bitmap`: the peer is told (`P_UUIDS`, then `P_STATE`).
    AnnounceSkip(wire::Uuids),
    /// The peer's skipped initial sync, adopted: this node's `P_STATE` (UpToDate) on the
    /// connection that told it, if it is still up (the `connection`-th).
    PeerSkipAdopted { connection: u64 },
    /// Nothing more (`new-current-uuid`: the generation is durable; an abandoned
    /// promotion's old generation).
    Nothing,
    /// `primary`: the role is taken if the rules still allow it (`role_cmd.rs`).
    Promoted(Promotion),
    /// `secondary`: the peer is told; `detached`: a Diskless Primary's, best effort.
    Demoted { detached: bool },
    /// A generation the peer lacks ([`Node::lost_peer_disk`]) is durable; if it is not,
    /// the disk goes out of use (`step.rs`).
    NewGeneration,
    /// The failed local write `w` is recorded (`first`: it took the disk out of
    /// service): the peer told, the write completed as failed (`disk.rs`).
    FailureRecorded { w: LocalWrite, first: bool },
}

impl Then {
    /// A failure of this plan does not fail its command (the driver logs it): a
    /// Diskless Primary's demotion, whose metadata is on the failed disk.
    pub(crate) fn best_effort(&self) -> bool {
        matches!(self, Then::Demoted { detached: true })
    }
}

impl Node {
    /// [`super::Event::Admin`]: what [`Self::admin`] did, as the step's outcome.
    pub(super) fn admin_outcome(
        &mut self,
        cmd: Admin,
        reply: u64,
        out: &mut Vec<Action>,
    ) -> Outcome {
        self.admin(cmd, reply, out).unwrap_or_else(Outcome::Refused)
    }

    /// A management command ([`Admin`]): done at once ([`Outcome::Done`]), its plan
    /// asked for ([`Outcome::Persisting`]: [`Action::Persist`], carrying the driver's
    /// `reply` handle), the peer asked ([`Outcome::AskedPeer`], `role_cmd.rs`), or
    /// refused with the node unchanged.
    fn admin(&mut self, cmd: Admin, reply: u64, out: &mut Vec<Action>) -> Result<Outcome, Why> {
        let (plan, then) = match cmd {
            Admin::Verify { tick } => {
                self.start_verify(self.peer_started.verify, self.peer_verify, &tick)?;
                self.push_state(out);
                return Ok(Outcome::Done);
            }
            Admin::PauseSync { paused, now_ms } => {
                self.runs.set_paused(paused, now_ms);
                return Ok(Outcome::Done);
            }
            Admin::DiscardMyData(discard) => {
                self.discard_my_data = discard;
                return Ok(Outcome::Done);
            }
            Admin::Promote { force, random } => return self.promote_cmd(force, random, reply, out),
            Admin::Demote => return self.demote_cmd(reply, out),
            Admin::Invalidate => (self.begin_invalidate()?, Then::Invalidated),
            Admin::NewCurrentUuid {
                clear_bitmap: true,
                random,
            } => {
                let s = self.skip_initial_sync(random)?;
                (
                    skipped_sync_durable(s.uuids),
                    Then::AnnounceSkip(s.announce),
                )
            }
            Admin::NewCurrentUuid {
                clear_bitmap: false,
                random,
            } => {
                let uuids = self.new_current_uuid(random)?;
                (
                    vec![Durable::Superblock(vec![SbChange::Uuids(uuids)])],
                    Then::Nothing,
                )
            }
        };
        out.push(Action::Persist {
            plan,
            then,
            reply: Some(reply),
        });
        Ok(Outcome::Persisting)
    }

    /// The peer's `P_UUIDS` on a live connection: a skipped initial sync is adopted and
    /// made durable before this node's `P_STATE` says UpToDate; anything else is ignored
    /// ([`Self::peer_skipped_initial_sync`]).
    pub(super) fn peer_uuids(&mut self, p: &UuidPacket, out: &mut Vec<Action>) {
        if let Some(uuids) = self.peer_skipped_initial_sync(p) {
            tracing::info!("the peer skipped the initial sync: UpToDate");
            let then = Then::PeerSkipAdopted {
                connection: self.connections,
            };
            let plan = skipped_sync_durable(uuids);
            out.push(Action::Persist {
                plan,
                then,
                reply: None,
            });
        }
    }

    /// The plan of an [`Action::Persist`] was made durable (`ok`) or failed: what
    /// follows ([`Then`]). A failed `invalidate` or skipped sync changes nothing more
    /// (the node stays as the command left it in memory: more to resync, never less);
    /// the peer's adopted skip still says UpToDate, as its data is. A role change's
    /// outcome is `role_cmd.rs`'s. `Err`: a contract violation.
    pub(super) fn persisted(
        &mut self,
        then: Then,
        ok: bool,
        out: &mut Vec<Action>,
    ) -> Result<Outcome, Error> {
        match then {
            Then::Promoted(_) | Then::Demoted { .. } => return self.role_persisted(then, ok, out),
            Then::FailureRecorded { w, first } => self.failure_persisted(w, first, ok, out)?,
            Then::NewGeneration if !ok => {
                tracing::error!(
                    "a generation the peer lacks is not on disk: the disk goes out of use"
                );
                self.primary.fail_disk();
            }
            Then::Invalidated if ok => self.invalidated(out),
            Then::AnnounceSkip(a) if ok => {
                out.push(Action::Send {
                    stream: Stream::Data,
                    pkt: Packet::Uuids(a),
                });
                self.push_state(out);
            }
            Then::PeerSkipAdopted { connection }
                if self.agreed.is_some() && self.connections == connection =>
            {
                self.push_state(out);
            }
            _ => {}
        }
        Ok(Outcome::Done)
    }

    /// `invalidate`: refused on a Primary, during a run, or without a peer to resync
    /// from; otherwise every block is marked out of sync. The driver makes the plan
    /// durable (the pages, then "inconsistent"), then calls [`Self::invalidated`].
    pub(super) fn begin_invalidate(&mut self) -> Result<Vec<Durable>, &'static str> {
        if self.role == Role::Primary {
            return Err("invalidate works on a Secondary; demote this node first");
        }
        // DRBD's rule: a connected node must be Connected (no resync or verify going). A
        // source that served a finished run stays in the runs until the connection ends;
        // it does not count (the simulator found `invalidate` refused on the old
        // Primary after a switchover).
        if self.runs.target().is_some()
            || (self.agreed.is_some() && self.conn != ConnState::Connected)
        {
            return Err("a resync is running; wait for it, or pause it");
        }
        if self.agreed.is_none() {
            return Err("not connected: there is no peer to resync from");
        }
        let plan = vec![
            Durable::Pages,
            Durable::Superblock(vec![SbChange::Consistent(false)]),
        ];
        #[cfg(test)]
        if self.sabotage_invalidate_marks_nothing {
            return Ok(plan);
        }
        self.primary.out_of_sync_mut().mark_all();
        Ok(plan)
    }

    /// The full bitmap and "inconsistent" are durable: the disk is Inconsistent and the
    /// connection is dropped, so that a new handshake starts the full resync.
    pub(super) fn invalidated(&mut self, out: &mut Vec<Action>) {
        self.disk = DiskState::Inconsistent;
        out.push(Action::DropConnection {
            reason: "invalidated: a full resync from the peer follows",
        });
    }

    /// `new-current-uuid` without `--clear-bitmap`: a new generation (`random` is its
    /// current UUID), refused while connected.
    pub(super) fn new_current_uuid(&self, random: u64) -> Result<UuidSet, &'static str> {
        if self.agreed.is_some() {
            return Err("new-current-uuid needs StandAlone (disconnect first), or \
                        --clear-bitmap on a new pair");
        }
        let mut uuids = self.uuids;
        uuids.new_current_uuid_cmd(random, self.role == Role::Primary, false);
        Ok(uuids)
    }

    /// `new-current-uuid --clear-bitmap`: refused unless the pair is connected at ≥ 90
    /// and its metadata just created; otherwise declared in sync at once.
    pub(super) fn skip_initial_sync(&mut self, random: u64) -> Result<SkippedSync, &'static str> {
        let mut uuids = self.uuids;
        let version = self.agreed.unwrap_or(0);
        let announce = uuids
            .may_skip_initial_sync(self.agreed.is_some(), version)
            .then(|| uuids.new_current_uuid_cmd(random, self.role == Role::Primary, true))
            .flatten()
            .ok_or(
                "--clear-bitmap skips the initial sync only on a connected pair whose \
                 metadata was just created (current UUID still the create-md value)",
            )?;
        self.declare_in_sync();
        Ok(SkippedSync {
            uuids,
            announce: skip_announcement(announce),
        })
    }

    /// `P_UUIDS` on a live connection: the peer skipped the initial sync. `Some`: this
    /// node adopts its generation (declared in sync; the driver makes
    /// [`skipped_sync_durable`] durable before its `P_STATE`); anything else is
    /// ignored, as DRBD 8.4 does outside the handshake.
    pub(super) fn peer_skipped_initial_sync(&mut self, p: &UuidPacket) -> Option<UuidSet> {
        #[cfg(test)]
        if self.sabotage_ignore_peer_skip {
            return None;
        }
        let mut uuids = self.uuids;
        let version = self.agreed.unwrap_or(0);
        let primary = self.role == Role::Primary;
        if !uuids.accept_skip_initial_sync(p, self.agreed.is_some(), version, primary) {
            return None;
        }
        self.declare_in_sync();
        Some(uuids)
    }

    /// Both disks are equal: an empty bitmap, both UpToDate.
    fn declare_in_sync(&mut self) {
        let blocks = self.primary.out_of_sync().blocks();
        self.primary.out_of_sync_mut().clear_blocks(0, blocks);
        self.disk = DiskState::UpToDate;
        self.peer_disk = DiskState::UpToDate;
    }

    /// `verify`: compares every block with the peer's by digest; this node is VerifyS.
    /// `cfg` is `None` when verify-alg is not set here; `peer_verify`: the peer's is.
    pub(super) fn start_verify(
        &mut self,
        cfg: Option<VerifyConfig>,
        peer_verify: bool,
        tick: &TickInput,
    ) -> Result<(), &'static str> {
        if self.agreed.is_none() || self.conn != ConnState::Connected {
            return Err("verify needs a Connected peer (no resync or verify running)");
        }
        let Some(cfg) = cfg else {
            return Err("verify-alg is not set in [net]; set verify-alg = \"crc32c\"");
        };
        if !peer_verify {
            return Err("the peer has no verify-alg crc32c");
        }
        self.runs.start_verify(cfg, tick).map_err(|e| match e {
            crate::request::Error::Busy => "too many requests in flight",
            crate::request::Error::Invalid(m) | crate::request::Error::Protocol(m) => m,
        })?;
        self.conn = ConnState::VerifyS;
        Ok(())
    }

    /// The peer's first `P_OV_REQUEST` starts this node's side (VerifyT); `cfg` starts
    /// at its sector (`None`: verify-alg is not set here). `true`: it started now.
    pub(super) fn ensure_verify_peer(&mut self, cfg: Option<VerifyConfig>) -> Result<bool, String> {
        if self.runs.verify_running() {
            return Ok(false);
        }
        let Some(cfg) = cfg else {
            return Err("the peer runs online verify but verify-alg is not set here".into());
        };
        self.runs
            .start_verify_peer(cfg)
            .map_err(|e| e.to_string())?;
        self.conn = ConnState::VerifyT;
        Ok(true)
    }

    /// The online verify ended: back to Connected. `true`: the crashed-Primary flag was
    /// cleared by that ([`Node::reached_connected`]); the driver records it durably.
    pub(super) fn verify_ended(&mut self) -> bool {
        if matches!(self.conn, ConnState::VerifyS | ConnState::VerifyT) {
            self.conn = ConnState::Connected;
            return self.reached_connected();
        }
        false
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::state::uuid::UUID_JUST_CREATED;

    use crate::replica::node::TEST_GEN as GEN;

    /// A node over a 1 MiB volume (256 blocks).
    fn node(uuids: UuidSet, disk: DiskState) -> Node {
        Node::for_test(2048, uuids, disk)
    }

    fn tick() -> TickInput {
        TickInput::default()
    }

    #[test]
    fn invalidate_marks_every_block_then_drops_the_connection_once_durable() {
        let mut n = node(GEN, DiskState::UpToDate);
        assert!(n.begin_invalidate().is_err(), "no peer to resync from");
        n.connection_up(101, Role::Primary, DiskState::UpToDate);
        assert_eq!(
            n.begin_invalidate().unwrap(),
            [
                Durable::Pages,
                Durable::Superblock(vec![SbChange::Consistent(false)])
            ],
            "every bit on disk before \"inconsistent\""
        );
        let oos = n.primary.out_of_sync();
        assert_eq!(oos.count(), oos.blocks(), "every block");
        assert_eq!(n.disk, DiskState::UpToDate, "not before it is durable");
        let mut out = Vec::new();
        n.invalidated(&mut out);
        assert_eq!(n.disk, DiskState::Inconsistent);
        assert!(
            matches!(out[..], [Action::DropConnection { .. }]),
            "{out:?}"
        );
        n.role = Role::Primary;
        assert!(
            n.begin_invalidate().is_err(),
            "a Primary's data is not invalidated"
        );
    }

    /// DRBD's rule: refused while a resync runs, taken once it ended although its
    /// source stays in the runs until the connection goes (an old Primary after a
    /// switchover; the simulator found it refused).
    #[test]
    fn invalidate_waits_for_a_running_resync_but_not_for_an_idle_source() {
        let mut n = node(GEN, DiskState::UpToDate);
        n.connection_up(101, Role::Secondary, DiskState::Inconsistent);
        n.start_source(crate::resync::SourceConfig::new(2048), &tick())
            .unwrap();
        assert!(n.begin_invalidate().is_err(), "SyncSource");
        assert!(n.peer_sync_ended(ConnState::Connected).is_some());
        assert!(n.runs.source().is_some(), "the source stays");
        n.begin_invalidate().unwrap();
    }

    /// `invalidate` as an event: refused on a Primary (nothing asked for); on a
    /// connected Secondary its plan is asked for with the driver's handle, and only a
    /// durable plan makes the disk Inconsistent and renews the connection.
    #[test]
    fn invalidate_through_step_asks_for_its_plan_then_renews_the_connection() {
        use crate::replica::Event;
        let mut n = node(GEN, DiskState::UpToDate);
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        n.role = Role::Primary;
        let mut out = Vec::new();
        let ev = Event::Admin {
            cmd: Admin::Invalidate,
            reply: 7,
        };
        let refused = n.step(ev, &mut out).unwrap();
        assert!(matches!(refused, crate::replica::Outcome::Refused(_)));
        assert!(out.is_empty() && n.primary.out_of_sync().count() == 0);
        n.role = Role::Secondary;
        n.step(ev, &mut out).unwrap();
        let [Action::Persist {
            plan,
            then: Then::Invalidated,
            reply: Some(7),
        }] = &out[..]
        else {
            panic!("the plan is asked for: {out:?}");
        };
        assert_eq!(plan[0], Durable::Pages, "the pages first");
        out.clear();
        let failed = Event::Persisted {
            then: Then::Invalidated,
            ok: false,
        };
        n.step(failed, &mut out).unwrap();
        assert!(out.is_empty() && n.disk == DiskState::UpToDate, "{out:?}");
        let done = Event::Persisted {
            then: Then::Invalidated,
            ok: true,
        };
        n.step(done, &mut out).unwrap();
        assert_eq!(n.disk, DiskState::Inconsistent);
        assert!(
            matches!(out[..], [Action::DropConnection { .. }]),
            "{out:?}"
        );
    }

    /// The peer's skipped initial sync: its plan, then this node's `P_STATE` — only on
    /// the connection that told it.
    #[test]
    fn a_peer_s_skip_says_up_to_date_only_on_its_own_connection() {
        use crate::replica::Event;
        let fresh = UuidSet {
            current: UUID_JUST_CREATED,
            ..GEN
        };
        let mut a = node(fresh, DiskState::Inconsistent);
        a.connection_up(101, Role::Secondary, DiskState::Inconsistent);
        let s = a.skip_initial_sync(0xC000).unwrap();
        let mut n = node(fresh, DiskState::Inconsistent);
        n.connection_up(101, Role::Secondary, DiskState::Inconsistent);
        let mut out = Vec::new();
        n.step(Event::PeerUuids(UuidPacket::from(s.announce)), &mut out)
            .unwrap();
        let [Action::Persist {
            then, reply: None, ..
        }] = out[..]
        else {
            panic!("the adopted generation is made durable first: {out:?}");
        };
        out.clear();
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        n.step(Event::Persisted { then, ok: true }, &mut out)
            .unwrap();
        assert!(out.is_empty(), "another connection: {out:?}");
        n.connections -= 1;
        n.step(Event::Persisted { then, ok: true }, &mut out)
            .unwrap();
        assert!(
            matches!(
                out[..],
                [Action::Send {
                    pkt: Packet::State(_),
                    ..
                }]
            ),
            "{out:?}"
        );
    }

    /// The commands without a plan, as events: `verify` needs what the connection's
    /// start configured (a Connected peer with verify-alg) and says VerifyS in
    /// `P_STATE`; `pause-sync` and `discard-my-data` are done at once.
    #[test]
    fn verify_pause_and_discard_through_step_are_done_at_once() {
        use crate::replica::{Event, Outcome};
        let mut n = node(GEN, DiskState::UpToDate);
        let mut out = Vec::new();
        let mut admin = |n: &mut Node, cmd| n.step(Event::Admin { cmd, reply: 1 }, &mut out);
        let verify = Admin::Verify { tick: tick() };
        let refused = admin(&mut n, verify).unwrap();
        assert!(matches!(refused, Outcome::Refused(m) if m.to_string().contains("Connected")));
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        n.peer_verify = true;
        let refused = admin(&mut n, verify).unwrap();
        assert!(matches!(refused, Outcome::Refused(m) if m.to_string().contains("verify-alg")));
        n.peer_started.verify = Some(VerifyConfig::new(2048));
        assert_eq!(admin(&mut n, verify), Ok(Outcome::Done));
        assert_eq!(n.conn, ConnState::VerifyS);
        let pause = Admin::PauseSync {
            paused: true,
            now_ms: 0,
        };
        assert_eq!(admin(&mut n, pause), Ok(Outcome::Done));
        assert!(n.runs.paused());
        assert_eq!(admin(&mut n, Admin::DiscardMyData(true)), Ok(Outcome::Done));
        assert!(n.discard_my_data);
        assert!(
            matches!(
                out[..],
                [Action::Send {
                    pkt: Packet::State(_),
                    ..
                }]
            ),
            "only verify's P_STATE: {out:?}"
        );
    }

    #[test]
    fn a_new_generation_needs_standalone() {
        let mut n = node(GEN, DiskState::UpToDate);
        let u = n.new_current_uuid(0xC000).unwrap();
        assert_eq!(u.current & !1, 0xC000);
        assert_eq!(u.bitmap, GEN.current, "the old one becomes the bitmap UUID");
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        assert!(n.new_current_uuid(0xC000).is_err());
    }

    #[test]
    fn skipping_the_initial_sync_needs_a_new_connected_pair_and_declares_it_in_sync() {
        let fresh = UuidSet {
            current: UUID_JUST_CREATED,
            ..GEN
        };
        let mut n = node(fresh, DiskState::Inconsistent);
        n.primary.out_of_sync_mut().mark_all();
        assert!(n.skip_initial_sync(0xC000).is_err(), "not connected");
        n.connection_up(101, Role::Secondary, DiskState::Inconsistent);
        let s = n.skip_initial_sync(0xC000).unwrap();
        assert_eq!(s.uuids.current & !1, 0xC000);
        assert_eq!(s.announce.current, s.uuids.current);
        assert_eq!(n.primary.out_of_sync().count(), 0);
        assert_eq!(
            (n.disk, n.peer_disk),
            (DiskState::UpToDate, DiskState::UpToDate)
        );
        assert_eq!(n.uuids, fresh, "the driver assigns them as it stages them");
        let mut out = Vec::new();
        n.persisted(Then::AnnounceSkip(s.announce), true, &mut out)
            .unwrap();
        assert!(
            matches!(
                &out[..],
                [
                    Action::Send {
                        pkt: Packet::Uuids(_),
                        ..
                    },
                    Action::Send {
                        pkt: Packet::State(_),
                        ..
                    }
                ]
            ),
            "{out:?}"
        );
        let mut old = node(GEN, DiskState::UpToDate);
        old.connection_up(101, Role::Secondary, DiskState::UpToDate);
        assert!(
            old.skip_initial_sync(0xC000).is_err(),
            "metadata not just created"
        );

        // The peer's side adopts the announced generation, and only that.
        let mut peer = node(fresh, DiskState::Inconsistent);
        peer.connection_up(101, Role::Secondary, DiskState::Inconsistent);
        peer.primary.out_of_sync_mut().mark_all();
        let plain = UuidPacket::from(wire::Uuids {
            uuid_flags: 0,
            ..s.announce
        });
        assert_eq!(peer.peer_skipped_initial_sync(&plain), None);
        assert_eq!(peer.disk, DiskState::Inconsistent);
        let u = peer
            .peer_skipped_initial_sync(&UuidPacket::from(s.announce))
            .unwrap();
        assert_eq!(u.current & !1, 0xC000);
        assert_eq!(peer.primary.out_of_sync().count(), 0);
        assert_eq!(peer.disk, DiskState::UpToDate);
    }

    #[test]
    fn verify_runs_only_connected_with_verify_alg_on_both_sides() {
        let cfg = || Some(VerifyConfig::new(2048));
        let mut n = node(GEN, DiskState::UpToDate);
        assert!(
            n.start_verify(cfg(), true, &tick()).is_err(),
            "not connected"
        );
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        assert!(
            n.start_verify(None, true, &tick()).is_err(),
            "no verify-alg here"
        );
        assert!(
            n.start_verify(cfg(), false, &tick()).is_err(),
            "none on the peer"
        );
        assert_eq!(n.conn, ConnState::Connected);
        n.start_verify(cfg(), true, &tick()).unwrap();
        assert_eq!(n.conn, ConnState::VerifyS);
        assert!(
            n.start_verify(cfg(), true, &tick()).is_err(),
            "one at a time"
        );
        assert!(!n.verify_ended(), "no crashed-Primary flag to clear");
        assert_eq!(n.conn, ConnState::Connected);

        let mut t = node(GEN, DiskState::UpToDate);
        t.crashed_primary = true;
        t.connection_up(101, Role::Primary, DiskState::UpToDate);
        assert!(t.ensure_verify_peer(None).is_err());
        assert!(t.ensure_verify_peer(cfg()).unwrap());
        assert!(!t.ensure_verify_peer(cfg()).unwrap(), "already running");
        assert_eq!(t.conn, ConnState::VerifyT);
        assert!(t.verify_ended(), "the flag ends as at Connected");
        assert!(!t.verify_ended());
    }
}
