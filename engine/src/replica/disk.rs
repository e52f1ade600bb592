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
//! Through [`Node::step`] ([`super::Event::WriteFailed`], which takes the place of a
//! failed write's `WriteDone`): the failure reported ([`Action::DiskLeftService`]), the
//! record and, for a peer's write that reached the disk, the bitmap pages with its bits
//! asked for as one plan ([`Action::Persist`], [`Then::FailureRecorded`]); once that is
//! durable (or failed: logged, never retried) the peer is told, a `pass_on` node renews
//! the connection ([`Action::RenewForResync`]), a detached Secondary leaves it
//! ([`Action::DetachedStandAlone`]), and the write completes as failed. The record goes
//! into every failure's plan until one such plan has ended, so no failed write completes
//! before it is durable (the metadata writer coalesces the repeats: at most two
//! superblock writes for a burst); later ones skip it.
//!
//! Before this module the daemon's volume decided this, and the simulator's Secondary
//! had its own copy (which also told the running target of the range, where the daemon
//! did not).

use super::{Action, Durable, LocalWrite, Node, Outcome, Side, Then};
use crate::meta::disk::SbChange;
use crate::request::Error;
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
    pub(super) fn local_write_failed(
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
    pub(super) fn failure_record(&self) -> SbChange {
        SbChange::Failure {
            full_sync: DiskFailure { disk: self.disk }.full_sync(),
        }
    }

    /// [`super::Event::WriteFailed`] (see the module docs): the local write `w` failed
    /// (`attempted`: it reached the disk; a write a detached disk refused did not).
    pub(super) fn write_failed(
        &mut self,
        w: LocalWrite,
        attempted: bool,
        out: &mut Vec<Action>,
    ) -> Result<Outcome, Error> {
        let failure = self.local_write_failed(&w, self.detach_on_io_error);
        if let Some(failure) = failure {
            out.push(Action::DiskLeftService { w, failure });
        }
        let mut plan = Vec::with_capacity(2);
        if !self.failure_recorded {
            plan.push(Durable::Superblock(vec![self.failure_record()]));
        }
        // A write skipped because the disk is detached adds only its bit in memory: no
        // more metadata IO to a disk that already failed.
        if attempted && matches!(w.side, Side::Peer { .. }) {
            plan.push(Durable::Pages);
        }
        let first = failure.is_some();
        if plan.is_empty() {
            self.failure_done(w, first, out)?;
            return Ok(Outcome::Done);
        }
        out.push(Action::Persist {
            plan,
            then: Then::FailureRecorded { w, first },
            reply: None,
        });
        Ok(Outcome::Persisting)
    }

    /// [`Then::FailureRecorded`]: the plan of a failed write ended (`ok`: durable).
    pub(super) fn failure_persisted(
        &mut self,
        w: LocalWrite,
        first: bool,
        ok: bool,
        out: &mut Vec<Action>,
    ) -> Result<(), Error> {
        if !ok && !self.failure_recorded {
            tracing::error!(
                "cannot record the failed disk as Inconsistent in the metadata; do not \
                 promote this node before a resync"
            );
        }
        self.failure_recorded = true;
        self.failure_done(w, first, out)
    }

    /// The failed write's record is durable (or failed): the peer told of the first
    /// failure, the write completes as failed, then the connection renewed (`pass_on`)
    /// or left (a detached Secondary) once those packets are out.
    fn failure_done(
        &mut self,
        w: LocalWrite,
        first: bool,
        out: &mut Vec<Action>,
    ) -> Result<(), Error> {
        if first && self.agreed.is_some() {
            self.push_state(out);
        }
        if !self.write_done(&w, false)? {
            out.push(Action::DropConnection {
                reason: "too many failed local writes to record during the connection",
            });
        }
        // Its `P_NEG_ACK` before what drops the connection.
        self.drain(out);
        if !first {
            return Ok(());
        }
        if !self.detach_on_io_error {
            if self.agreed.is_some() {
                out.push(Action::RenewForResync { target: false });
            }
        } else if self.role != Role::Primary {
            out.push(Action::DetachedStandAlone);
        }
        Ok(())
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

    // ----- through `Node::step` (`Event::WriteFailed`) ---------------------------------

    use crate::replica::Event;
    use crate::request::PeerWrite;
    use crate::wire::{dp, Packet};

    /// A peer write taken by a connected Secondary: its local write.
    fn peer_write(n: &mut Node, block_id: u64, sector: u64) -> LocalWrite {
        let mut out = Vec::new();
        let ev = Event::PeerWrite(PeerWrite {
            block_id,
            sector,
            len: 4096,
            kind: WriteKind::Data,
            dp_flags: dp::DP_SEND_WRITE_ACK,
        });
        n.step(ev, &mut out).unwrap();
        let w = out.iter().find_map(|a| match a {
            Action::LocalWrite(w) => Some(*w),
            _ => None,
        });
        w.unwrap()
    }

    fn failed(n: &mut Node, w: LocalWrite, attempted: bool) -> (Outcome, Vec<Action>) {
        let mut out = Vec::new();
        let o = n
            .step(Event::WriteFailed { w, attempted }, &mut out)
            .unwrap();
        (o, out)
    }

    fn plan_of(out: &[Action]) -> (Vec<Durable>, Then) {
        let p = out.iter().find_map(|a| match a {
            Action::Persist { plan, then, .. } => Some((plan.clone(), *then)),
            _ => None,
        });
        p.unwrap()
    }

    fn connected_secondary(detach: bool) -> Node {
        let mut n = node(Role::Secondary);
        n.detach_on_io_error = detach;
        n.connection_up(101, Role::Primary, DiskState::UpToDate);
        n
    }

    #[test]
    fn a_failed_write_completes_only_once_its_record_is_durable() {
        let mut n = connected_secondary(true);
        let (a, b) = (peer_write(&mut n, 1, 0), peer_write(&mut n, 2, 8));
        let (o, out) = failed(&mut n, a, true);
        assert_eq!(o, Outcome::Persisting);
        assert!(matches!(out[0], Action::DiskLeftService { failure, .. }
            if failure.disk == DiskState::Failed));
        let (plan, then) = plan_of(&out);
        let record = Durable::Superblock(vec![SbChange::Failure { full_sync: false }]);
        assert_eq!(
            plan,
            [record.clone(), Durable::Pages],
            "the record, then its bits"
        );
        assert!(
            !out.iter().any(|a| matches!(a, Action::Send { .. })),
            "no ack yet"
        );
        // A second failure before the record is durable waits for it too.
        let (_, out) = failed(&mut n, b, true);
        let (plan2, then2) = plan_of(&out);
        assert_eq!(plan2, [record, Durable::Pages]);
        let mut out = Vec::new();
        n.step(Event::Persisted { then, ok: true }, &mut out)
            .unwrap();
        let state = out.iter().position(|a| {
            matches!(
                a,
                Action::Send {
                    pkt: Packet::State(_),
                    ..
                }
            )
        });
        let neg = out.iter().position(|a| {
            matches!(a, Action::Send { pkt: Packet::BlockAck { cmd, .. }, .. }
                if *cmd == crate::wire::Command::P_NEG_ACK)
        });
        assert!(
            state.unwrap() < neg.unwrap(),
            "P_STATE, then P_NEG_ACK: {out:?}"
        );
        assert!(
            matches!(out.last(), Some(Action::DetachedStandAlone)),
            "{out:?}"
        );
        out.clear();
        n.step(
            Event::Persisted {
                then: then2,
                ok: true,
            },
            &mut out,
        )
        .unwrap();
        assert!(
            !out.iter().any(|a| matches!(a, Action::DetachedStandAlone)),
            "once"
        );
        // Later: the record is not written again; a refused write adds only its bit.
        let c = peer_write(&mut n, 3, 16);
        let (o, out) = failed(&mut n, c, false);
        assert_eq!(o, Outcome::Done, "completed at once");
        assert!(out.iter().any(|a| matches!(
            a,
            Action::Send {
                pkt: Packet::BlockAck { .. },
                ..
            }
        )));
        assert_eq!(n.primary.out_of_sync().count(), 3);
    }

    #[test]
    fn pass_on_renews_the_connection_and_a_diskless_primary_stays() {
        let mut n = connected_secondary(false);
        let w = peer_write(&mut n, 1, 0);
        let (_, out) = failed(&mut n, w, true);
        let (_, then) = plan_of(&out);
        let mut out = Vec::new();
        n.step(Event::Persisted { then, ok: false }, &mut out)
            .unwrap();
        assert!(matches!(
            out.last(),
            Some(Action::RenewForResync { target: false })
        ));
        assert_eq!(n.disk, DiskState::Inconsistent);
        // A Primary's own write: Diskless, a full sync recorded, still connected.
        let mut n = node(Role::Primary);
        let mut out = Vec::new();
        let req = Event::Request {
            id: 7,
            io: crate::replica::Io::Write {
                sector: 0,
                len: 4096,
                kind: WriteKind::Data,
                fua: false,
            },
        };
        n.step(req, &mut out).unwrap();
        let w = out.iter().find_map(|a| match a {
            Action::LocalWrite(w) => Some(*w),
            _ => None,
        });
        let (_, out) = failed(&mut n, w.unwrap(), true);
        let (plan, then) = plan_of(&out);
        let record = Durable::Superblock(vec![SbChange::Failure { full_sync: true }]);
        assert_eq!(plan, [record]);
        let mut out = Vec::new();
        n.step(Event::Persisted { then, ok: true }, &mut out)
            .unwrap();
        assert!(!out.iter().any(|a| matches!(a, Action::DetachedStandAlone)));
        assert_eq!(n.disk, DiskState::Diskless);
    }
}
