//! This node's disk leaving service after a failed local write: DRBD's `on-io-error`, as
//! both drivers apply it ([`Node::local_write_failed`]).
//!
//! In memory, at once: a failed write of the peer's marks its range out of sync (a
//! running target fetches it again; this node's own failed writes are marked by the
//! Primary core), and the first failure takes the disk out of UpToDate — with `detach`
//! a Secondary's disk is `Failed` (no more writes reach it), a Primary's `Diskless` (its
//! core serves through the peer: [`crate::request::Primary::detach_local`]); with
//! `pass_on` it is `Inconsistent` and stays in service. The returned [`DiskFailure`]
//! says what the driver makes durable before the write completes (so before a
//! Secondary's `P_NEG_ACK` lets the Primary count the block as only its own):
//! "consistent" cleared, and for a Diskless Primary "full sync from the peer" (its bitmap
//! of what it misses cannot be kept on the failed disk). Then the peer learns the disk
//! state (`P_STATE`); a detached Secondary goes StandAlone until the operator attaches
//! the disk again, a `pass_on` node renews the connection so that the handshake resyncs
//! the failed blocks at once.
//!
//! Before this module the daemon's volume decided this, and the simulator's Secondary
//! had its own copy (which also told the running target of the range, where the daemon
//! did not).

use super::{LocalWrite, Node, Side};
use crate::meta::disk::SbChange;
use crate::state::{DiskState, Role};

/// What a node's first failed local write changed ([`Node::local_write_failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiskFailure {
    /// The disk state it left UpToDate (or Inconsistent) for: `Failed`, `Diskless` or,
    /// with `pass_on`, `Inconsistent`.
    pub(crate) disk: DiskState,
}

impl DiskFailure {
    /// The record sets "full sync from the peer" too: a Diskless Primary.
    pub(crate) fn full_sync(&self) -> bool {
        self.disk == DiskState::Diskless
    }
}

impl Node {
    /// The local write `w` failed; `detach`: `on-io-error detach` (else `pass_on`). See
    /// the module docs. `Some` for the failure that takes the disk out of service (the
    /// first one), `None` for later ones.
    pub(crate) fn local_write_failed(
        &mut self,
        w: &LocalWrite,
        detach: bool,
    ) -> Option<DiskFailure> {
        if matches!(w.side, Side::Peer { .. }) {
            let (runs, bm) = self.runs_and_bitmap();
            runs.mark(bm, w.sector, w.len);
        }
        if self.disk_failed || self.disk <= DiskState::Failed {
            return None;
        }
        #[cfg(test)]
        if self.sabotage_failed_disk_stays_up_to_date {
            return None;
        }
        self.disk_failed = true;
        let diskless = detach && self.role == Role::Primary;
        self.disk = if diskless {
            DiskState::Diskless
        } else if detach {
            DiskState::Failed
        } else {
            DiskState::Inconsistent
        };
        if diskless {
            self.primary.detach_local();
        }
        Some(DiskFailure { disk: self.disk })
    }

    /// The failure record the driver makes durable (once) before a failed write
    /// completes: "consistent" cleared, and "full sync from the peer" for a Diskless
    /// Primary ([`DiskFailure::full_sync`]; later failures find the disk as the first
    /// one left it).
    pub(crate) fn failure_record(&self) -> SbChange {
        SbChange::Failure {
            full_sync: DiskFailure { disk: self.disk }.full_sync(),
        }
    }

    /// The disk is attached again (the simulator's operator restarts a Secondary whose
    /// disk failed; the daemon attaches once, in [`Node::new`]): `disk` as its metadata
    /// says, and a later failure takes it out of service again.
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn disk_attached(&mut self, disk: DiskState) {
        self.disk = disk;
        self.disk_failed = false;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::request::WriteKind;
    use crate::state::uuid::UuidSet;

    fn node(role: Role) -> Node {
        let mut n = Node::for_test(2048, UuidSet::default(), DiskState::UpToDate);
        n.role = role;
        n
    }

    fn write(side: Side, sector: u64) -> LocalWrite {
        LocalWrite {
            side,
            sector,
            len: 4096,
            kind: WriteKind::Data,
            fua: false,
        }
    }

    #[test]
    fn detach_fails_a_secondary_s_disk_once_and_marks_every_failed_peer_write() {
        let mut n = node(Role::Secondary);
        let f = n.local_write_failed(&write(Side::Peer { token: 1 }, 8), true);
        let want = DiskFailure {
            disk: DiskState::Failed,
        };
        assert_eq!(f, Some(want));
        assert!(!want.full_sync());
        assert_eq!(n.failure_record(), SbChange::Failure { full_sync: false });
        assert_eq!(n.disk, DiskState::Failed);
        assert_eq!(
            n.local_write_failed(&write(Side::Peer { token: 2 }, 16), true),
            None
        );
        assert_eq!(
            n.primary.out_of_sync().count(),
            2,
            "both failed ranges are marked"
        );
    }

    #[test]
    fn detach_makes_a_primary_diskless_with_a_full_sync_to_come() {
        let mut n = node(Role::Primary);
        let f = n.local_write_failed(&write(Side::Primary { tag: 1, id: 1 }, 0), true);
        let want = DiskFailure {
            disk: DiskState::Diskless,
        };
        assert_eq!(f, Some(want));
        assert!(want.full_sync());
        assert_eq!(n.failure_record(), SbChange::Failure { full_sync: true });
        assert!(n.primary.is_detached());
        assert_eq!(
            n.primary.out_of_sync().count(),
            0,
            "its core marks its own writes"
        );
    }

    #[test]
    fn pass_on_keeps_the_disk_in_service_as_inconsistent_once() {
        let mut n = node(Role::Secondary);
        n.disk = DiskState::Inconsistent;
        let f = n.local_write_failed(&write(Side::Peer { token: 1 }, 0), false);
        let want = DiskFailure {
            disk: DiskState::Inconsistent,
        };
        assert!(!want.full_sync());
        assert_eq!(
            f,
            Some(want),
            "an Inconsistent disk's failure is recorded too"
        );
        assert_eq!(
            n.local_write_failed(&write(Side::Peer { token: 2 }, 0), false),
            None
        );
        assert!(!n.primary.is_detached());
    }
}
