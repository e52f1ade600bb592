//! What a sequence of the node makes durable, and in which order: each sequence that
//! changes the node's state on disk through several writes (a demotion, `invalidate`, a
//! skipped initial sync, the start, the write-backs and the end of a SyncTarget's run, a
//! clean stop)
//! returns a plan of
//! [`Durable`] steps; the driver performs them one after the other — each complete
//! before the next is issued — and then makes the sequence's next call
//! (`Node::invalidated`, `Node::target_end_recorded`, …). A superblock write whose
//! content depends on the node's state when it is reached ([`Deferred`]) is computed
//! then, by [`Node::superblock_at`]. (A promotion, its abandonment, a SyncSource's end
//! and a failure record are one superblock write each, staged with the change:
//! `Promotion::durable`, `Node::abandon_promotion`, `SourceEnd::durable`,
//! `Node::failure_record`.)
//!
//! The order is the rule, so it lives here once: the daemon (`volume/`) performs a plan
//! on its data disk, its page writer and its superblock; the simulator on its in-memory
//! disks and metadata devices (it keeps the superblock's state in the node). Before,
//! each driver wrote the order out itself.
//!
//! Why each order is what it is:
//! - demotion: the data disk is flushed before the metadata says "not Primary" (DRBD's
//!   metadata writes carry a preflush; the simulator's switchover found the gap), the
//!   bitmap pages before the superblock (writes the peer has not acked are then only in
//!   the bitmap), the demoted UUIDs with "not Primary" in one superblock write, taken
//!   from the node at that step (a handshake may have changed them meanwhile);
//! - promotion: the new generation with `MDF_PRIMARY_IND` (and "consistent" when
//!   forced) in one write before the first write as Primary — the flag is what makes
//!   the next attach after a crash apply the activity log;
//! - `invalidate`: every bit on disk before "inconsistent" (a power loss in between
//!   still resyncs everything), both before the connection drops;
//! - a SyncTarget's start: the merged bitmap's pages, then "not consistent" with the
//!   sync UUID, before the first resync write (a restart mid-run comes back
//!   Inconsistent with every block still to fetch);
//! - a SyncTarget's end: the data flushed (the resync writes durable), then the pages
//!   (their images leave the run's clears out only once a flush covers them), then
//!   "consistent", the completed generation and the crash repaired in one write —
//!   unless the UUIDs changed meanwhile (a connection loss): then the disk stays
//!   Inconsistent and the next handshake decides;
//! - a clean stop: the data flushed, the pages (what a running resync cleared, so that
//!   a restart resumes there), then the activity log's ring and the superblock marked
//!   clean (the next attach applies no activity log) — only when no write is in flight
//!   and no metadata write failed, else the metadata stays as after a crash;
//! - a skipped initial sync: the generation with "consistent", then the cleared pages,
//!   before the peer is told.

use super::{Node, TargetEnd};
use crate::meta::disk::SbChange;
use crate::state::uuid::UuidSet;

/// One step of a plan (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Durable {
    /// Flush the data disk: the writes it completed become durable.
    FlushData,
    /// Write the node's dirty bitmap pages (FUA), every one durable.
    Pages,
    /// One superblock write of these changes; a [`SbChange::Uuids`] among them is the
    /// node's generation from this step on.
    Superblock(Vec<SbChange>),
    /// One superblock write computed when the step is reached ([`Node::superblock_at`]).
    At(Deferred),
    /// The activity log's ring re-initialised and the superblock marked clean (no
    /// "Primary"), after every staged superblock write.
    MarkClean,
}

/// A superblock write that depends on the node's state when it is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deferred {
    /// "Not Primary" with the node's UUIDs demoted then (a handshake may have changed
    /// them while the pages were written).
    Demoted,
    /// A SyncTarget's "not consistent" and its UUIDs with the peer's sync UUID.
    SyncTarget { sync_uuid: u64 },
    /// The end of a target run: "consistent", the completed generation, the crash
    /// repaired.
    TargetEnd(TargetEnd),
}

impl Node {
    /// The superblock write of a deferred step, computed now (the node's state moves
    /// with it: a SyncTarget's disk becomes Inconsistent). `Ok(None)`: nothing to write;
    /// `Err`: the sequence stops here (an operating outcome: the UUIDs changed while the
    /// end of a run was recorded).
    pub(crate) fn superblock_at(&mut self, d: Deferred) -> Result<Option<Vec<SbChange>>, String> {
        Ok(match d {
            Deferred::Demoted => Some(vec![
                SbChange::Primary(false),
                SbChange::Uuids(self.demoted_uuids()),
            ]),
            Deferred::SyncTarget { sync_uuid } => Some(vec![
                SbChange::Consistent(false),
                SbChange::Uuids(self.begin_sync_target(sync_uuid)),
            ]),
            Deferred::TargetEnd(end) => self.target_end_uuids(&end)?.map(|u| {
                vec![
                    SbChange::Consistent(true),
                    SbChange::ClearCrashedPrimary,
                    SbChange::Uuids(u),
                ]
            }),
        })
    }

    /// A clean stop (see the module docs); `Err`: the metadata stays unclean (the next
    /// attach applies the activity log, as after a crash) and only the data is flushed.
    pub(crate) fn clean_stop_plan(&self) -> Result<Vec<Durable>, &'static str> {
        let s = self.primary.stats();
        if s.in_flight_writes > 0 || s.al_waiting > 0 || s.meta_failed {
            return Err("writes still in flight or a metadata write failed");
        }
        Ok(vec![Durable::FlushData, Durable::Pages, Durable::MarkClean])
    }

    /// A SyncTarget's write-back during a run (`SyncAction::WriteBack`): the resync's
    /// cleared bits on disk — a flush that covers them, then the dirty pages, whose
    /// images leave those bits clear only once a flush covers them. If the flush fails
    /// nothing is taken: the pages keep the bits set on disk (a restart resyncs more,
    /// never less).
    pub(crate) fn write_back_plan() -> Vec<Durable> {
        vec![Durable::FlushData, Durable::Pages]
    }

    /// A SyncTarget's start, once `P_SYNC_UUID` arrived (see the module docs).
    pub(crate) fn sync_target_plan(sync_uuid: u64) -> Vec<Durable> {
        vec![
            Durable::Pages,
            Durable::At(Deferred::SyncTarget { sync_uuid }),
        ]
    }

    /// Recording the end of a target run (see the module docs); the driver then calls
    /// [`Node::target_end_recorded`], durable if the plan completed and `end` had UUIDs.
    pub(crate) fn target_end_plan(end: TargetEnd) -> Vec<Durable> {
        vec![
            Durable::FlushData,
            Durable::Pages,
            Durable::At(Deferred::TargetEnd(end)),
        ]
    }
}

impl Durable {
    /// The generation a superblock step records, if any.
    pub(crate) fn uuids(changes: &[SbChange]) -> Option<UuidSet> {
        changes.iter().rev().find_map(|c| match c {
            SbChange::Uuids(u) => Some(*u),
            _ => None,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::state::DiskState;

    use crate::replica::node::TEST_GEN as GEN;

    /// The deferred writes are computed when reached: a SyncTarget's disk becomes
    /// Inconsistent with the sync UUID; the end of a run writes the completed generation
    /// with "consistent" and the crash repaired, or nothing without UUIDs, or stops the
    /// plan if the node's UUIDs changed since the run ended.
    #[test]
    fn deferred_superblock_writes_follow_the_node_s_state_when_reached() {
        let mut n = Node::for_test(2048, GEN, DiskState::UpToDate);
        assert_eq!(
            Node::sync_target_plan(0xB000)[0],
            Durable::Pages,
            "the merged bitmap first"
        );
        let w = n
            .superblock_at(Deferred::SyncTarget { sync_uuid: 0xB000 })
            .unwrap()
            .unwrap();
        assert_eq!(w[0], SbChange::Consistent(false));
        assert_eq!(Durable::uuids(&w).unwrap().current & !1, 0xB000);
        assert_eq!(n.disk, DiskState::Inconsistent);

        n.uuids = Durable::uuids(&w).unwrap();
        let end = n.target_end(
            1,
            Some(UuidSet {
                current: 0xB000,
                ..GEN
            }),
        );
        let plan = Node::target_end_plan(end);
        assert_eq!(plan[..2], [Durable::FlushData, Durable::Pages]);
        let w = n.superblock_at(Deferred::TargetEnd(end)).unwrap().unwrap();
        assert_eq!(
            w[..2],
            [SbChange::Consistent(true), SbChange::ClearCrashedPrimary]
        );
        assert_eq!(Durable::uuids(&w), end.uuids.map(|(_, done)| done));

        let none = n.target_end(2, None);
        assert_eq!(n.superblock_at(Deferred::TargetEnd(none)).unwrap(), None);
        n.uuids.current = 0xC000; // a connection loss started a generation meanwhile
        assert!(n.superblock_at(Deferred::TargetEnd(end)).is_err());
    }

    /// A clean stop flushes, writes the pages and marks the metadata clean, in that
    /// order; with a write in flight it is refused (the metadata stays as after a crash).
    #[test]
    fn a_clean_stop_only_when_idle() {
        let mut n = Node::for_test(2048, GEN, DiskState::UpToDate);
        assert_eq!(
            n.clean_stop_plan().unwrap(),
            [Durable::FlushData, Durable::Pages, Durable::MarkClean]
        );
        n.primary
            .write(1, 0, 4096, crate::request::WriteKind::Data, false)
            .unwrap();
        assert!(n.clean_stop_plan().is_err());
    }
}
