//! What a sequence of the node makes durable, and in which order: each sequence that
//! changes the node's state on disk (a demotion, a promotion and its abandonment,
//! `invalidate`, a skipped initial sync) returns a plan of [`Durable`] steps; the driver
//! performs them one after the other — each complete before the next is issued — and
//! then makes the sequence's next call (`Node::invalidated`, `Node::take_primary`, …).
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
//! - a skipped initial sync: the generation with "consistent", then the cleared pages,
//!   before the peer is told.

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
    /// One superblock write of "not Primary" with the node's UUIDs demoted at this step
    /// ([`super::Node::demoted_uuids`]).
    Demoted,
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
