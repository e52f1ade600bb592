//! Who may become Primary: the promotion rules, once, for the daemon's `primary`
//! command and for the simulator's operator (its failover after a Primary's death and
//! its promotion races).
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
//! What the rules do not know: whether a disconnected, UpToDate Secondary missed writes
//! its peer made alone. Without fencing tandem (like DRBD without fencing) promotes it;
//! the simulator's operator does not, and counts how often that would lose writes.

use crate::state::uuid::UuidSet;
use crate::state::{DiskState, Role};
use crate::wire;
use std::fmt;

/// What the promotion rules look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PromotionFacts {
    /// Connected to the peer (the handshake is done).
    pub connected: bool,
    pub peer_role: Role,
    pub disk: DiskState,
    pub peer_disk: DiskState,
    /// Peer writes are in flight to this disk.
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
            .map(|a| wire::Uuids {
                current: a.current,
                bitmap: a.bitmap,
                history: a.history,
                dirty_bits: 0,
                uuid_flags: wire::uuid_flags::UUID_FLAG_SKIP_INITIAL_SYNC,
            });
    }
    uuids.promote(random(), f.peer_disk_reachable, f.force);
    (uuids, announce)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
