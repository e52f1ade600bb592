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
//! What the rules do not know: whether a disconnected, UpToDate Secondary missed writes
//! its peer made alone. Without fencing tandem (like DRBD without fencing) promotes it;
//! the simulator's operator does not, and counts how often that would lose writes.

use crate::state::{DiskState, Role};
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
}
