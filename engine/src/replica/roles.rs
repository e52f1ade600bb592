//! Who may become Primary and how a node changes its role: the promotion rules and the
//! promotion and demotion sequences, once, for the daemon's `primary` and `secondary`
//! commands and for the simulator's operator (its failover after a Primary's death, its
//! split brains, its restarted Primaries and its promotion races).
//!
//! A node is refused promotion when (in this order, the first one is reported):
//!
//! 1. it is connected and its peer is Primary (tandem allows one Primary);
//! 2. its disk is `Failed` or worse (a write to it failed): it cannot hold the data;
//! 3. peer writes are still being applied to its disk;
//! 4. a resync into this disk runs and the peer is not there and UpToDate to serve the
//!    blocks not yet resynced (a SyncTarget may be Primary only with its source);
//! 5. its disk is not UpToDate and this is not a SyncTarget, unless `force` (DRBD's
//!    `primary --force`: this data becomes the good copy).
//!
//! A promotion that is allowed starts from [`promoted_uuids`]: a Primary without its
//! peer's disk starts a new data generation (DRBD's `drbd_uuid_new_current`), so that a
//! later handshake sees the writes the peer lacks, or a split brain; the first Primary
//! of a pair that was just created starts the pair's first generation and announces it
//! as a skipped initial sync.
//!
//! The sequences, as [`Node`] methods that the events of `role_cmd.rs` run (both drivers
//! feed those events):
//!
//! - **Promotion**: [`Node::begin_promotion`] (the rules; the new UUIDs assigned; the
//!   peer's promotion requests refused from now on) → the driver makes the UUIDs, the
//!   Primary flag and, when forced, "consistent" durable in one superblock write →
//!   [`Node::may_take_primary`] (the rules again, on the same connection: the state
//!   may have changed during the write) → [`Node::take_primary`] (the role; to the
//!   peer the skipped-initial-sync announcement and `P_STATE`; a forced promotion
//!   drops the connection so that a handshake resyncs the peer), or
//!   [`Node::abandon_promotion`] (the old UUIDs back unless they changed meanwhile,
//!   and the flag cleared). While connected, the node asks the peer first
//!   (`state::change`, `role_cmd.rs`); the grant belongs to that connection.
//! - **Demotion**: [`Node::begin_demotion`] (refused while writes are in flight; the
//!   role at once, the core lets go of the connection: every write the peer may lack
//!   is out of sync) → the driver flushes the data disk (what this Primary completed
//!   unflushed would otherwise stay volatile on the next Secondary), writes the dirty
//!   bitmap pages, then
//!   [`Node::demoted_uuids`] and "not Primary" in one superblock write; on a failure,
//!   [`Node::demotion_failed`] takes the disk out of use (the superblock still says
//!   Primary: a crash applies the activity log).
//!
//! What the rules do not know: whether a disconnected, UpToDate Secondary missed writes
//! its peer made alone. Without fencing tandem (like DRBD without fencing) promotes it;
//! the simulator's operator does not, and counts how often that would lose writes.

use super::durable::Deferred;
use super::{Action, Durable, Node, Why};
use crate::meta::disk::SbChange;
use crate::net::Stream;
use crate::request::Error;
use crate::state::uuid::UuidSet;
use crate::state::{DiskState, Role};
use crate::wire::{self, Packet};
use std::fmt;

/// What the promotion rules look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PromotionFacts {
    /// Connected to the peer (the handshake is done).
    pub connected: bool,
    pub peer_role: Role,
    pub disk: DiskState,
    pub peer_disk: DiskState,
    /// Peer writes are in flight to this disk, or received and not yet applied.
    pub peer_writes_active: bool,
    /// A resync into this disk runs (SyncTarget).
    pub sync_target: bool,
    /// `primary --force`.
    pub force: bool,
}

/// Why a promotion is refused (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    PeerPrimary,
    DiskFailed(DiskState),
    PeerWritesActive,
    SyncTargetWithoutSource,
    NotUpToDate(DiskState),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::PeerPrimary => f.write_str(
                "the peer is Primary; make it Secondary first (tandem allows one Primary)",
            ),
            Refusal::DiskFailed(d) => write!(
                f,
                "the disk is {d} (a write to it failed): it cannot be Primary; restart the node \
                 to attach it again (a resync from the peer then repairs it)"
            ),
            Refusal::PeerWritesActive => f.write_str("peer writes are still being applied; retry"),
            Refusal::SyncTargetWithoutSource => {
                f.write_str("a resync into this disk is running and the peer is not UpToDate")
            }
            Refusal::NotUpToDate(d) => write!(
                f,
                "the disk is {d}: only an UpToDate disk may become Primary (wait for the \
                 resync, or `primary --force` to declare this data the good copy)"
            ),
        }
    }
}

/// Whether a node with `facts` may become Primary now.
pub(crate) fn may_promote(facts: &PromotionFacts) -> Result<(), Refusal> {
    if facts.connected && facts.peer_role == Role::Primary {
        return Err(Refusal::PeerPrimary);
    }
    if facts.disk <= DiskState::Failed {
        return Err(Refusal::DiskFailed(facts.disk));
    }
    if facts.peer_writes_active {
        return Err(Refusal::PeerWritesActive);
    }
    // A SyncTarget may serve as Primary while its peer is UpToDate: reads of blocks not
    // yet resynced come from the peer (docs/design.md §3 "Reads").
    if facts.sync_target && !(facts.connected && facts.peer_disk == DiskState::UpToDate) {
        return Err(Refusal::SyncTargetWithoutSource);
    }
    if facts.disk != DiskState::UpToDate && !facts.sync_target && !facts.force {
        return Err(Refusal::NotUpToDate(facts.disk));
    }
    Ok(())
}

/// Why the configured `role = "primary"` does not promote a node at start
/// ([`Node::startup_refusal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartupRefusal {
    /// Not connected, and the last handshake with the peer found a split brain: the
    /// operator resolves it first.
    SplitBrain,
    /// Connected to a peer that is Primary now (a switchover while this node was down).
    PeerPrimary,
    /// No peer in time, and this node's UUIDs do not say it was the last Primary: the
    /// peer may be Primary now.
    NotLastPrimary,
}

/// What the generation of a promotion depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GenerationFacts {
    /// Connected, and the peer's disk is at least Inconsistent (it takes the writes).
    pub peer_disk_reachable: bool,
    /// The agreed protocol version (0: not connected).
    pub agreed_version: u32,
    pub disk: DiskState,
    pub peer_disk: DiskState,
    /// This node is SyncSource now.
    pub source_running: bool,
    /// `primary --force`.
    pub force: bool,
}

/// The generation UUIDs a promotion starts (`random` draws a new UUID; one draw, two
/// for a pair just created), and the `P_UUIDS` that announces a
/// skipped initial sync, if the promotion is the first of a pair just created:
///
/// - both disks UpToDate with just-created UUIDs (two disks `tandem up` created, all
///   zeroes), connected at agreed ≥ 90, no resync running, not forced: the Primary
///   starts the pair's first generation and announces it (`P_UUIDS` flag 8, what
///   `new-current-uuid --clear-bitmap` sends), which the peer adopts. Left just-created,
///   a crash of this Primary would meet DRBD's rule 10 (both just created: no resync)
///   and its activity log's extents would never be resynced;
/// - then DRBD's promotion: a new current UUID when the peer's disk is not reachable and
///   no bitmap UUID marks a generation already, or when forced; bit 0 set (Primary).
pub(crate) fn promoted_uuids(
    mut uuids: UuidSet,
    f: &GenerationFacts,
    mut random: impl FnMut() -> u64,
) -> (UuidSet, Option<wire::Uuids>) {
    let fresh_pair = uuids.may_skip_initial_sync(f.peer_disk_reachable, f.agreed_version)
        && f.disk == DiskState::UpToDate
        && f.peer_disk == DiskState::UpToDate
        && !f.source_running;
    let mut announce = None;
    if fresh_pair && !f.force {
        announce = uuids
            .new_current_uuid_cmd(random(), true, true)
            .map(super::admin::skip_announcement);
    }
    uuids.promote(random(), f.peer_disk_reachable, f.force);
    (uuids, announce)
}

/// A promotion the rules allowed, waiting for its metadata ([`Node::begin_promotion`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Promotion {
    /// The generation before the promotion (restored if it is abandoned).
    pub(crate) old: UuidSet,
    /// The generation it starts.
    pub(crate) uuids: UuidSet,
    /// A disk that is not UpToDate (and not a SyncTarget) becomes the good copy
    /// (`primary --force`): "consistent" is recorded with the role flag.
    pub(crate) forced: bool,
    force: bool,
    /// The connection it was decided on ([`Node::connections`]); `None`: not connected.
    connection: Option<u64>,
    /// The `P_UUIDS` announcing a skipped initial sync.
    announce: Option<wire::Uuids>,
}

impl Promotion {
    /// What the driver stages with the promotion and makes durable before
    /// [`Node::may_take_primary`]: the new generation with `MDF_PRIMARY_IND` (and
    /// "consistent" when forced), one superblock write.
    pub(crate) fn durable(&self) -> Vec<SbChange> {
        let mut changes = Vec::with_capacity(3);
        if self.forced {
            changes.push(SbChange::Consistent(true));
        }
        changes.push(SbChange::Primary(true));
        changes.push(SbChange::Uuids(self.uuids));
        changes
    }

    /// It was decided while connected.
    pub(crate) fn connected(&self) -> bool {
        self.connection.is_some()
    }
}

impl Node {
    /// Whether this node may become Primary now ([`may_promote`] over its state).
    pub(crate) fn may_promote(&self, force: bool) -> Result<(), Refusal> {
        may_promote(&PromotionFacts {
            connected: self.agreed.is_some(),
            peer_role: self.peer_role,
            disk: self.disk,
            peer_disk: self.peer_disk,
            peer_writes_active: {
                let rx = self.receiver.stats();
                rx.active_writes > 0 || rx.held > 0
            },
            sync_target: self.runs.target().is_some(),
            force,
        })
    }

    /// Starts a promotion (`force`: `primary --force`; `random` draws new UUIDs): the
    /// rules, then the generation it starts ([`promoted_uuids`]), assigned now. The
    /// driver makes [`Promotion::uuids`] durable together with the role flag (and "consistent" when
    /// [`Promotion::forced`]) — `MDF_PRIMARY_IND` on disk before the first write as
    /// Primary is what makes the next attach after a crash apply the activity log — and
    /// then calls [`Self::take_primary`] or [`Self::abandon_promotion`]. Meanwhile the
    /// peer's own promotion request is refused (`promoting`).
    pub(super) fn begin_promotion(
        &mut self,
        force: bool,
        random: impl FnMut() -> u64,
    ) -> Result<Promotion, Refusal> {
        self.may_promote(force)?;
        let forced = self.disk != DiskState::UpToDate && self.runs.target().is_none();
        let facts = GenerationFacts {
            peer_disk_reachable: self.agreed.is_some() && self.peer_disk >= DiskState::Inconsistent,
            agreed_version: self.agreed.unwrap_or(0),
            disk: self.disk,
            peer_disk: self.peer_disk,
            source_running: self.runs.source().is_some(),
            force: forced,
        };
        let (uuids, announce) = promoted_uuids(self.uuids, &facts, random);
        self.promoting = true;
        let old = std::mem::replace(&mut self.uuids, uuids);
        Ok(Promotion {
            old,
            uuids,
            forced,
            force,
            connection: self.agreed.map(|_| self.connections),
            announce,
        })
    }

    /// The configured `role = "primary"` at start (DRBD's `become-primary-on`, made
    /// safe), decided once the driver has waited for the peer up to `wfc-timeout`
    /// (`connected`: it came; `split_brain`: a handshake met it and found a split
    /// brain). `None`: promote (connected, the peer is asked; alone, only a node whose
    /// bitmap UUID says it was a Primary that wrote without its peer — the peer never had
    /// those writes, so it cannot have taken over from them).
    pub(crate) fn startup_refusal(
        &self,
        connected: bool,
        split_brain: bool,
    ) -> Option<StartupRefusal> {
        if connected {
            return (self.peer_role == Role::Primary).then_some(StartupRefusal::PeerPrimary);
        }
        if split_brain {
            return Some(StartupRefusal::SplitBrain);
        }
        (self.uuids.bitmap == 0).then_some(StartupRefusal::NotLastPrimary)
    }

    /// Whether `p`, now durable, may still be taken: the rules again (the state may have
    /// changed while its metadata was written), on the connection it was decided on.
    pub(super) fn may_take_primary(&self, p: &Promotion) -> Result<(), Why> {
        self.may_promote(p.force).map_err(Why::Promotion)?;
        if self.agreed.map(|_| self.connections) != p.connection {
            return Err("the connection changed while the promotion was decided; retry".into());
        }
        Ok(())
    }

    /// Takes the role of `p` (durable, [`Self::may_take_primary`] passed): a forced disk
    /// becomes UpToDate; the announcement of a skipped initial sync and this node's new
    /// state go to the peer; a forced promotion drops the connection (the peer resyncs
    /// from the new generation: a new handshake decides it); while connected, new writes
    /// replicate. `Err`: a contract violation.
    pub(super) fn take_primary(
        &mut self,
        p: &Promotion,
        out: &mut Vec<Action>,
    ) -> Result<(), Error> {
        self.promoting = false;
        if p.forced {
            self.disk = DiskState::UpToDate;
        }
        self.role = Role::Primary;
        if self.agreed.is_some() {
            if let Some(u) = p.announce {
                out.push(Action::Send {
                    stream: Stream::Data,
                    pkt: Packet::Uuids(u),
                });
            }
            self.push_state(out);
            if p.forced {
                out.push(Action::DropConnection {
                    reason: "forced promotion: the peer resyncs from the new generation",
                });
            }
            self.primary.connected()?;
        }
        Ok(())
    }

    /// `p` will not be taken (refused after its metadata was written, or its caller went
    /// away): the peer's requests are refused no longer, and the old generation stands
    /// (nothing was written as Primary): restored, and staged with "not Primary" (one
    /// superblock write) — unless the UUIDs changed meanwhile (only the flag then).
    pub(super) fn abandon_promotion(&mut self, p: &Promotion) -> Vec<SbChange> {
        self.promoting = false;
        let mut changes = vec![SbChange::Primary(false)];
        if self.uuids == p.uuids {
            self.uuids = p.old;
            changes.push(SbChange::Uuids(p.old));
        }
        changes
    }

    /// Starts a demotion (`secondary`): refused while this node's writes are in flight.
    /// The role changes at once, so no write enters the core after; the core lets go of
    /// the connection (every write the peer may lack is out of sync in the bitmap, see
    /// [`Self::connection_lost`]), its actions appended to `out`. The driver then performs
    /// the plan: the data disk flushed (DRBD's metadata writes carry a preflush: the
    /// writes this Primary completed and no flush made durable must not stay volatile on
    /// what becomes the Secondary, since the next Primary's flush promises them on both
    /// nodes — the simulator's switchover found it; a detached disk has nothing to
    /// flush), the dirty bitmap pages, then [`Self::demoted_uuids`] with "not Primary" in
    /// one superblock write; on a failure, [`Self::demotion_failed`].
    pub(super) fn begin_demotion(
        &mut self,
        out: &mut Vec<Action>,
    ) -> Result<Vec<Durable>, &'static str> {
        if self.primary.stats().in_flight_writes > 0 {
            return Err("writes are in flight; stop the application first");
        }
        self.role = Role::Secondary;
        self.primary.connection_lost();
        self.drain(out);
        let mut plan = Vec::with_capacity(3);
        if !self.primary.is_detached() {
            plan.push(Durable::FlushData);
        }
        plan.extend([Durable::Pages, Durable::At(Deferred::Demoted)]);
        Ok(plan)
    }

    /// The generation a demotion records (bit 0, Primary, cleared).
    pub(super) fn demoted_uuids(&self) -> UuidSet {
        let mut uuids = self.uuids;
        uuids.demote();
        uuids
    }

    /// The demotion's metadata could not be written: the superblock keeps saying Primary
    /// (a crash then applies the activity log, which covers every bit not yet written)
    /// and the disk goes out of use, so that no clean stop can mark it clean later.
    pub(super) fn demotion_failed(&mut self, out: &mut Vec<Action>) {
        self.primary.fail_disk();
        self.drain(out);
    }

    /// Queues this node's state for the peer.
    pub(super) fn push_state(&self, out: &mut Vec<Action>) {
        if let Some(pkt) = self.state_packet() {
            out.push(Action::Send {
                stream: Stream::Data,
                pkt,
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::replica::PeerDisk;

    fn up_to_date() -> PromotionFacts {
        PromotionFacts {
            connected: true,
            peer_role: Role::Secondary,
            disk: DiskState::UpToDate,
            peer_disk: DiskState::UpToDate,
            peer_writes_active: false,
            sync_target: false,
            force: false,
        }
    }

    #[test]
    fn each_rule_refuses_and_says_why() {
        assert_eq!(may_promote(&up_to_date()), Ok(()));
        let cases = [
            (
                PromotionFacts {
                    peer_role: Role::Primary,
                    ..up_to_date()
                },
                Refusal::PeerPrimary,
            ),
            (
                PromotionFacts {
                    disk: DiskState::Failed,
                    force: true,
                    ..up_to_date()
                },
                Refusal::DiskFailed(DiskState::Failed),
            ),
            (
                PromotionFacts {
                    peer_writes_active: true,
                    ..up_to_date()
                },
                Refusal::PeerWritesActive,
            ),
            (
                PromotionFacts {
                    disk: DiskState::Inconsistent,
                    sync_target: true,
                    peer_disk: DiskState::Outdated,
                    ..up_to_date()
                },
                Refusal::SyncTargetWithoutSource,
            ),
            (
                PromotionFacts {
                    disk: DiskState::Outdated,
                    ..up_to_date()
                },
                Refusal::NotUpToDate(DiskState::Outdated),
            ),
        ];
        for (facts, refusal) in cases {
            assert_eq!(may_promote(&facts), Err(refusal), "{facts:?}");
            assert!(!refusal.to_string().is_empty());
        }
    }

    #[test]
    fn what_may_be_promoted() {
        // Disconnected: the peer's role is unknown and does not count.
        let alone = PromotionFacts {
            connected: false,
            peer_role: Role::Primary,
            ..up_to_date()
        };
        assert_eq!(may_promote(&alone), Ok(()));
        // A SyncTarget with its UpToDate source.
        let target = PromotionFacts {
            disk: DiskState::Inconsistent,
            sync_target: true,
            ..up_to_date()
        };
        assert_eq!(may_promote(&target), Ok(()));
        // Forced.
        let forced = PromotionFacts {
            disk: DiskState::Inconsistent,
            force: true,
            ..up_to_date()
        };
        assert_eq!(may_promote(&forced), Ok(()));
    }

    fn connected_pair() -> GenerationFacts {
        GenerationFacts {
            peer_disk_reachable: true,
            agreed_version: 101,
            disk: DiskState::UpToDate,
            peer_disk: DiskState::UpToDate,
            source_running: false,
            force: false,
        }
    }

    fn draws() -> impl FnMut() -> u64 {
        let mut next = 0x1000;
        move || {
            next += 0x100;
            next
        }
    }

    #[test]
    fn a_promotion_without_the_peers_disk_starts_a_generation() {
        let old = UuidSet {
            current: 0xaa00,
            bitmap: 0,
            history: [0; 2],
        };
        let (same, none) = promoted_uuids(old, &connected_pair(), draws());
        assert_eq!((same.current, same.bitmap, none), (0xaa01, 0, None));
        let alone = GenerationFacts {
            peer_disk_reachable: false,
            agreed_version: 0,
            peer_disk: DiskState::DUnknown,
            ..connected_pair()
        };
        let (new, _) = promoted_uuids(old, &alone, draws());
        assert_eq!(
            new.bitmap, 0xaa00,
            "the old generation is what the peer has"
        );
        assert_eq!(new.current & 1, 1, "Primary");
        assert_ne!(new.current & !1, 0xaa00, "a new generation");
        let marked = UuidSet {
            bitmap: 0xbb00,
            ..old
        };
        let (kept, _) = promoted_uuids(marked, &alone, draws());
        assert_eq!(kept.current, 0xaa01, "a bitmap UUID already marks one");
        let forced = GenerationFacts {
            force: true,
            ..connected_pair()
        };
        let (f, _) = promoted_uuids(old, &forced, draws());
        assert_ne!(
            f.current & !1,
            0xaa00,
            "forced: a new generation, even connected"
        );
    }

    #[test]
    fn the_first_primary_of_a_pair_just_created_announces_its_generation() {
        let fresh = UuidSet::JUST_CREATED;
        let (uuids, announce) = promoted_uuids(fresh, &connected_pair(), draws());
        let a = announce.expect("a skipped initial sync is announced");
        assert_eq!(a.uuid_flags, wire::uuid_flags::UUID_FLAG_SKIP_INITIAL_SYNC);
        assert_eq!(
            a.current & !1,
            uuids.current & !1,
            "the generation it takes"
        );
        assert_ne!(uuids.current & !1, fresh.current & !1);
        for not in [
            GenerationFacts {
                force: true,
                ..connected_pair()
            },
            GenerationFacts {
                source_running: true,
                ..connected_pair()
            },
            GenerationFacts {
                peer_disk: DiskState::Inconsistent,
                ..connected_pair()
            },
            GenerationFacts {
                agreed_version: 86,
                ..connected_pair()
            },
        ] {
            assert_eq!(promoted_uuids(fresh, &not, draws()).1, None, "{not:?}");
        }
    }

    // ----- the node's promotion and demotion sequences -------------------------------

    use crate::state::change::{promote_request, StateRv};
    use crate::state::ConnState;

    use crate::replica::node::TEST_GEN as GEN;

    fn node(disk: DiskState) -> Node {
        Node::for_test(64, GEN, disk)
    }

    fn counter() -> impl FnMut() -> u64 {
        let mut n = 0xB000;
        move || {
            n += 0x10;
            n
        }
    }

    #[test]
    fn the_configured_primary_role_promotes_at_start_only_when_it_is_safe() {
        let mut n = node(DiskState::UpToDate);
        // Alone, and nothing says this node wrote last: the peer may be Primary now.
        assert_eq!(
            n.startup_refusal(false, false),
            Some(StartupRefusal::NotLastPrimary)
        );
        assert_eq!(
            n.startup_refusal(false, true),
            Some(StartupRefusal::SplitBrain)
        );
        // A Primary that lost its peer (a bitmap UUID): alone, it promotes.
        n.uuids.bitmap = 0xB0B0;
        assert_eq!(n.startup_refusal(false, false), None);
        assert_eq!(
            n.startup_refusal(false, true),
            Some(StartupRefusal::SplitBrain)
        );
        // Connected: the peer decides, unless it is Primary already.
        n.uuids.bitmap = 0;
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        assert_eq!(n.startup_refusal(true, false), None);
        n.peer_reported(Role::Primary, DiskState::UpToDate);
        assert_eq!(
            n.startup_refusal(true, false),
            Some(StartupRefusal::PeerPrimary)
        );
    }

    #[test]
    fn a_promotion_alone_starts_a_generation_and_takes_the_role_only_when_durable() {
        let mut n = node(DiskState::UpToDate);
        let p = n.begin_promotion(false, counter()).unwrap();
        // Assigned at once (the driver stages it); the role waits for the metadata.
        assert_eq!(n.uuids, p.uuids);
        assert_eq!(p.old, GEN);
        assert_ne!(p.uuids.current & !1, GEN.current, "a new current UUID");
        assert_eq!(
            p.uuids.bitmap, GEN.current,
            "the old one becomes the bitmap UUID"
        );
        assert_eq!(n.role, Role::Secondary);
        assert!(n.promoting && !p.forced);
        n.may_take_primary(&p).unwrap();
        let mut out = Vec::new();
        n.take_primary(&p, &mut out).unwrap();
        assert!(out.is_empty(), "nothing to send without a peer: {out:?}");
        assert_eq!(n.role, Role::Primary);
        assert!(!n.promoting);
        // Demotion: the role at once, the UUIDs to record after the bitmap pages.
        n.begin_demotion(&mut out).unwrap();
        assert_eq!(n.role, Role::Secondary);
        assert_eq!(n.demoted_uuids().current & 1, 0);
    }

    #[test]
    fn an_abandoned_promotion_restores_the_old_generation_unless_it_changed() {
        let mut n = node(DiskState::UpToDate);
        let p = n.begin_promotion(false, counter()).unwrap();
        assert_eq!(
            n.abandon_promotion(&p),
            [SbChange::Primary(false), SbChange::Uuids(GEN)]
        );
        assert_eq!(n.uuids, GEN);
        assert!(!n.promoting);
        let p = n.begin_promotion(false, counter()).unwrap();
        n.uuids.current = 0xC000; // a resync's end recorded meanwhile
        assert_eq!(n.abandon_promotion(&p), [SbChange::Primary(false)]);
        assert_eq!(n.uuids.current, 0xC000);
    }

    #[test]
    fn a_promotion_is_not_taken_on_another_connection_or_after_the_rules_changed() {
        let mut n = node(DiskState::UpToDate);
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        let p = n.begin_promotion(false, counter()).unwrap();
        // The connection that granted it went, and another came.
        let mut out = Vec::new();
        let _ = n.connection_lost(&mut out);
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        assert!(n
            .may_take_primary(&p)
            .unwrap_err()
            .to_string()
            .contains("connection changed"));
        // Decided alone, but connected meanwhile.
        let _ = n.connection_lost(&mut out);
        let p = n.begin_promotion(false, counter()).unwrap();
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        assert!(n.may_take_primary(&p).is_err());
        // The peer became Primary meanwhile.
        let mut n = node(DiskState::UpToDate);
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        let p = n.begin_promotion(false, counter()).unwrap();
        n.peer_reported(Role::Primary, DiskState::UpToDate);
        assert!(n
            .may_take_primary(&p)
            .unwrap_err()
            .to_string()
            .contains("peer is Primary"));
    }

    #[test]
    fn a_connected_promotion_tells_the_peer_and_replicates_a_forced_one_renews() {
        let mut n = node(DiskState::UpToDate);
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        let p = n.begin_promotion(false, counter()).unwrap();
        assert_eq!(
            p.uuids.current & !1,
            GEN.current,
            "the peer takes the writes: same"
        );
        assert_eq!(
            p.durable(),
            [SbChange::Primary(true), SbChange::Uuids(p.uuids)]
        );
        let mut out = Vec::new();
        n.take_primary(&p, &mut out).unwrap();
        let state = match out.as_slice() {
            [Action::Send {
                stream: Stream::Data,
                pkt: Packet::State(w),
            }] => wire::StateBits::unpack(*w),
            other => panic!("{other:?}"),
        };
        assert_eq!(u32::from(state.role), Role::Primary.as_u32());
        assert_eq!(u32::from(state.conn), ConnState::Connected.as_u32());
        // The core replicates: connected once, a second time is a contract violation.
        assert!(n.primary.connected().is_err());

        let mut n = node(DiskState::Inconsistent);
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        assert_eq!(
            n.begin_promotion(false, counter()).unwrap_err(),
            Refusal::NotUpToDate(DiskState::Inconsistent)
        );
        let p = n.begin_promotion(true, counter()).unwrap();
        assert_eq!(
            p.durable(),
            [
                SbChange::Consistent(true),
                SbChange::Primary(true),
                SbChange::Uuids(p.uuids)
            ],
            "forced: the disk becomes the good copy, in the same write"
        );
        assert!(p.forced);
        let mut out = Vec::new();
        n.take_primary(&p, &mut out).unwrap();
        assert_eq!(n.disk, DiskState::UpToDate);
        assert!(
            matches!(out.last(), Some(Action::DropConnection { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn the_peer_s_promotion_is_refused_while_this_node_promotes_and_after_it_is_primary() {
        let mut n = node(DiskState::UpToDate);
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        let (mask, val) = promote_request(false);
        let req = wire::ReqState { mask, val };
        let p = n.begin_promotion(false, counter()).unwrap();
        // This node holds RESOLVE_CONFLICTS: its own pending promotion wins.
        let (d, _) = n.peer_request(req, true);
        assert_eq!(d.rv, StateRv::ConcurrentStChg);
        n.take_primary(&p, &mut Vec::new()).unwrap();
        let (d, _) = n.peer_request(req, true);
        assert!(!d.rv.is_success(), "{:?}", d.rv);
        // Granted to a Secondary: the peer is Primary, this node may not promote.
        let mut n = node(DiskState::UpToDate);
        n.connection_up(101, Role::Secondary, DiskState::UpToDate);
        let (d, _) = n.peer_request(req, false);
        assert!(d.rv.is_success());
        assert_eq!(n.peer_role, Role::Primary);
        assert_eq!(n.may_promote(false), Err(Refusal::PeerPrimary));
    }

    #[test]
    fn a_peer_disk_that_fails_or_comes_up_to_date_over_an_inconsistent_one_is_reported() {
        use DiskState::{Diskless, Failed, Inconsistent, UpToDate};
        // (own disk, the peer's reports in order, what each one yields)
        let cases = [
            (
                UpToDate,
                &[
                    (Role::Secondary, UpToDate, PeerDisk::Unchanged),
                    (Role::Secondary, Failed, PeerDisk::Failed),
                    (Role::Secondary, Diskless, PeerDisk::Unchanged),
                ][..],
            ),
            (
                Inconsistent,
                &[
                    (Role::Primary, UpToDate, PeerDisk::ResyncDue),
                    (Role::Primary, UpToDate, PeerDisk::Unchanged),
                ][..],
            ),
        ];
        for (own, reports) in cases {
            let mut n = node(own);
            n.connection_up(101, Role::Secondary, own);
            for &(role, disk, want) in reports {
                assert_eq!(
                    n.peer_reported(role, disk),
                    want,
                    "{own:?}: {role:?}/{disk:?}"
                );
            }
        }
    }

    #[test]
    fn a_demotion_waits_for_writes_in_flight_and_a_failed_record_takes_the_disk_out() {
        let mut n = node(DiskState::UpToDate);
        let p = n.begin_promotion(false, counter()).unwrap();
        let mut out = Vec::new();
        n.take_primary(&p, &mut out).unwrap();
        n.primary
            .write(1, 0, 4096, crate::request::WriteKind::Data, false)
            .unwrap();
        assert!(n.begin_demotion(&mut out).is_err());
        assert_eq!(n.role, Role::Primary);
        let mut n = node(DiskState::UpToDate);
        let p = n.begin_promotion(false, counter()).unwrap();
        n.take_primary(&p, &mut out).unwrap();
        assert_eq!(
            n.begin_demotion(&mut out).unwrap(),
            [
                Durable::FlushData,
                Durable::Pages,
                Durable::At(Deferred::Demoted)
            ],
            "the data disk, then the pages, then the superblock"
        );
        assert!(!n.primary.stats().meta_failed);
        n.demotion_failed(&mut out);
        assert!(
            n.primary.stats().meta_failed,
            "no clean stop may mark it clean"
        );
    }
}
